"""The ``vitatlas`` command line.

Subcommands live in their own modules and are imported only when used, so ``vitatlas --help`` is fast
and one broken optional dependency never takes the whole CLI down. Every VitatlasError is printed as
one ``error: ...`` line (exit status 2); Ctrl-C says how to resume (exit status 130).
"""

from __future__ import annotations

import importlib
import sys

import click

from ..errors import VitatlasError


class LazyGroup(click.Group):
    """A click group whose subcommands are ``"module:attribute"`` strings imported on first use."""

    def __init__(self, *args, lazy: dict[str, str] | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.lazy = lazy or {}

    def list_commands(self, ctx):
        return sorted(set(super().list_commands(ctx)) | set(self.lazy))

    def get_command(self, ctx, name):
        if name in self.lazy:
            module, _, attr = self.lazy[name].partition(":")
            return getattr(importlib.import_module(module), attr)
        return super().get_command(ctx, name)


@click.group(cls=LazyGroup, lazy={
    "extract": "vitatlas.cli.extract:extract",
    "store": "vitatlas.cli.store:store",
    "fit": "vitatlas.cli:fit",
    "eval": "vitatlas.cli.eval:eval_cmd",
    "explore": "vitatlas.cli.explore:explore",
    "probe": "vitatlas.cli.probe:probe",
    "intervene": "vitatlas.cli.intervene:intervene",
    "interpret": "vitatlas.cli.interpret:interpret",
    "scorecard": "vitatlas.cli.scorecard:scorecard",
    "import": "vitatlas.cli.formats:import_cmd",
    "export": "vitatlas.cli.formats:export_cmd",
    "compare": "vitatlas.cli.compare:compare",
}, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="vitatlas")
def main() -> None:
    """vitatlas: find the concepts inside vision transformers.

    \b
    Typical run:
      vitatlas extract --model embedded:dinov2-s --data embedded:fashion-mnist --layer 8 --tokens cls --out acts
      vitatlas fit dbksvd --acts acts --atoms 1536 --k 8 --out runs/ksvd
      vitatlas fit sae --kind topk --acts acts --atoms 1536 --k 8 --out runs/sae
      vitatlas eval runs/ksvd runs/sae --acts acts --out report
    """


@click.group(cls=LazyGroup, lazy={
    "dbksvd": "vitatlas.cli.fit_dbksvd:dbksvd",
    "sae": "vitatlas.cli.fit_sae:sae",
})
def fit() -> None:
    """Learn a dictionary from an activation store (DBK-SVD or sparse autoencoders)."""


def parse_groups(value: str | None) -> list[int] | None:
    """``--groups 64,256,1024`` (Matryoshka prefix sizes) -> [64, 256, 1024]; empty -> None."""
    if not value:
        return None
    try:
        return [int(v) for v in value.replace(" ", "").split(",") if v]
    except ValueError:
        raise VitatlasError(f"--groups must be comma-separated integers like 64,256,1024; got {value!r}") from None


def run() -> None:
    """Console-script entry point (under torchrun, each process joins the group first)."""
    from .. import distributed

    prefix = ""
    try:
        try:
            if distributed.launched_by_torchrun():
                prefix = f"[rank {distributed.init().rank}] "
                distributed.raise_on_sigterm()
            main(standalone_mode=False)
        finally:
            # the outcome is decided: a SIGTERM from torchrun (another rank failed) must not interrupt the report
            # or the shutdown below with a second error and its traceback
            if prefix:
                distributed.ignore_sigterm()
    except VitatlasError as exc:
        click.echo(f"{prefix}error: {exc}", err=True)
        sys.exit(2)
    except click.exceptions.Abort:
        click.echo("interrupted: re-run the same command to resume", err=True)
        sys.exit(130)
    except KeyboardInterrupt:
        click.echo("\ninterrupted: re-run the same command to resume", err=True)
        sys.exit(130)
    except click.ClickException as exc:
        exc.show()
        sys.exit(exc.exit_code)
    except click.exceptions.Exit as exc:
        sys.exit(exc.exit_code)
    finally:
        distributed.shutdown()


if __name__ == "__main__":
    run()

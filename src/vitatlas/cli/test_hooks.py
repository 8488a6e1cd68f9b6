"""Test hook shared by the long commands (documented so it is not mistaken for a feature).

``VITATLAS_TEST_EXIT_AT=RANK:N`` makes process RANK leave with ``os._exit(1)`` when the command's progress
callback reaches N (the step of ``fit sae`` / ``fit dbksvd``, the shard of ``extract``), as a killed
process would. The scale-out tests use it to check that the job stops with a one-line error and that a
re-run resumes.
"""

from __future__ import annotations

import os
from collections.abc import Callable

from .. import distributed


def exit_hook() -> Callable[..., None] | None:
    """The callback that kills this process at the chosen point, or None when the variable is not set."""
    spec = os.environ.get("VITATLAS_TEST_EXIT_AT")
    if not spec:
        return None
    rank, at = (int(v) for v in spec.split(":"))

    def hook(position: int, *_) -> None:
        if position == at and distributed.world().rank == rank:
            os._exit(1)

    return hook

"""``vitatlas explore`` on the command line: it serves, it exports, it makes missing cards, and bad
arguments end as one ``error:`` line with exit status 2."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
import urllib.request

import pytest
from _tiny import save_tiny_dinov2
from test_explore_fixtures import tiny_world

from vitatlas.explore import Explorer


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return tiny_world(tmp_path_factory)


def vitatlas_cli(monkeypatch, capsys, *args) -> tuple[int, str, str]:
    """Run the console entry point in this process (as `vitatlas ARGS`): (exit status, stdout, stderr)."""
    from vitatlas.cli import run

    monkeypatch.setattr(sys, "argv", ["vitatlas", *map(str, args)])
    try:
        run()
        code = 0
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    out = capsys.readouterr()
    return code, out.out, out.err


def test_explore_serves_on_localhost_until_stopped(world):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "vitatlas", "explore", *map(str, world.runs), "--acts",
                             str(world.store_path), "--cards", str(world.cards[0]), "--cards", str(world.cards[1]),
                             "--port", str(port), "--no-progress"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    try:
        deadline, meta = time.time() + 120, None
        while time.time() < deadline and proc.poll() is None:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/meta", timeout=5) as r:
                    meta = json.loads(r.read())
                break
            except OSError:
                time.sleep(0.2)
        assert meta is not None, f"the server did not answer: {proc.poll()}"
        assert [r["name"] for r in meta["runs"]] == ["ksvd", "sae"] and meta["live"] is None
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=5) as r:
            assert b"static/app.js" in r.read()
    finally:
        proc.terminate()
        out = proc.communicate(timeout=30)[0]
    assert f"http://127.0.0.1:{port}/" in out and "live intervention is off" in out


def test_export_writes_a_static_site(world, tmp_path, monkeypatch, capsys):
    code, out, err = vitatlas_cli(monkeypatch, capsys, "explore", *world.runs, "--acts", world.store_path, "--cards",
                                  world.cards[0], "--cards", world.cards[1], "--export", tmp_path / "site",
                                  "--no-progress")
    assert code == 0, err[-2000:]
    assert "index.html" in out
    site = tmp_path / "site"
    for name in ("index.html", "atom.html", "image.html", "compare.html", "static/app.js", "static/config.js",
                 "data/meta.js", "data/table-ksvd.js", "data/atom-sae-23.js", "data/compare.js"):
        assert (site / name).is_file(), name
    assert '"mode": "static"' in (site / "static/config.js").read_text()
    assert list((site / "images").glob("*.png")) and list((site / "data").glob("image-ksvd-*.js"))
    # heatmaps are stored as integer percent of their maximum: within half a percent of the live values
    text = (site / "data/atom-ksvd-3.js").read_text()
    exported = json.loads(text[text.index(",") + 1:text.rindex(")")])
    live = Explorer.open(world.runs, world.store_path, cards=world.cards, progress=False).atom("ksvd", 3)["heatmaps"]
    scale = exported["heatmaps_scale"]
    for q_row, row in zip(exported["heatmaps"], live, strict=True):
        for q, v in zip(q_row, row, strict=True):
            assert abs(q * scale / 100 - v) <= scale / 200 + 1e-9


@pytest.mark.parametrize("extra,message", [
    (["--probe", "PROBE", "--cards", "CARDS0", "--cards", "CARDS1"], "--probe needs --model"),
    (["--cards", "CARDS0"], "one per run"),
    (["--acts", "/no/such/store"], "no activation store"),
    (["--model", "nonsense:model", "--cards", "CARDS0", "--cards", "CARDS1"], "unknown model"),
    (["--model", "OTHER_MODEL", "--cards", "CARDS0", "--cards", "CARDS1"], "is not the model of store"),
])
def test_bad_arguments_are_one_error_line(world, extra, message, monkeypatch, capsys, tmp_path):
    names = {"PROBE": str(world.probe), "CARDS0": str(world.cards[0]), "CARDS1": str(world.cards[1])}
    if "OTHER_MODEL" in extra:  # a second random ViT: same shapes, another model
        names["OTHER_MODEL"] = f"hf:{save_tiny_dinov2(tmp_path / 'other', seed=1)}"
        capsys.readouterr()  # transformers' "Writing model shards" bar is not the command's output
    extra = [names.get(e, e) for e in extra]
    acts = [] if "--acts" in extra else ["--acts", str(world.store_path)]
    code, _, err = vitatlas_cli(monkeypatch, capsys, "explore", *world.runs, *acts, *extra, "--no-progress")
    assert code == 2, (code, err[-2000:])
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], err[-2000:]


def test_missing_cards_are_made_once_with_interpret(world, tmp_path):
    explorer = Explorer.open(world.runs[:1], world.store_path, cards_cache=tmp_path / "cache", progress=False)
    made = list((tmp_path / "cache").iterdir())
    assert len(made) == 1 and (made[0] / "cards.json").is_file()
    assert explorer.runs["ksvd"].cards.n_atoms == 24
    stamp = (made[0] / "atoms.jsonl").stat().st_mtime_ns
    Explorer.open(world.runs[:1], world.store_path, cards_cache=tmp_path / "cache", progress=False)
    assert (made[0] / "atoms.jsonl").stat().st_mtime_ns == stamp  # reused, not made again

"""Benchmarks are scripts, not tests, but they must keep importing the package's current API and run.

Every script must start (``--help``); the benchmarks of extraction, atom cards, interventions and the
explorer also run their quickest mode end to end on tiny random models (seconds each, one thread) and
must take ``--device``. Each runs with a TMPDIR of its own inside the test's tmp_path, which must be empty
when it is done: what a benchmark leaves there, it would leave in a user's temporary directory (and a
run killed at the time limit leaves its files under pytest's basetemp, not in the suite's TMPDIR).
"""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
SCRIPTS = sorted(BENCHMARKS.glob("*.py"))

# script -> (its quickest mode, a line its output must hold)
QUICKEST = {
    "extract.py": (["--smoke"], "pipeline keeps"),
    "interpret.py": (["--quick", "--threads", "1"], '"atoms": 1024'),
    "intervene.py": (["--tiny", "--images", "4", "--repeats", "1", "--threads", "1"], "intervention() one pass"),
    "explore.py": (["--smoke", "--threads", "1"], "intervention (clamp atom"),
    "stream.py": (["--quick"], "ratio read by each of 2"),
    "dbksvd_ideas.py": (["--quick", "--threads", "1"], "scorecard on"),
}


def run(script: str, *args: str, tmp: Path) -> subprocess.CompletedProcess:
    """``python benchmarks/SCRIPT ARGS`` with ``tmp`` (created here) as its temporary directory."""
    tmp.mkdir()
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONUNBUFFERED="1", TMPDIR=str(tmp))
    return subprocess.run([sys.executable, str(BENCHMARKS / script), *args], capture_output=True, text=True,
                          timeout=300, env=env)


def assert_left_nothing(tmp: Path) -> None:
    left = sorted(str(p.relative_to(tmp)) for p in tmp.rglob("*"))
    assert not left, f"the benchmark left files in its temporary directory: {left[:10]}"


@pytest.mark.parametrize("script", SCRIPTS, ids=[s.name for s in SCRIPTS])
def test_benchmark_script_starts(script, tmp_path):
    result = run(script.name, "--help", tmp=tmp_path / "tmp")
    assert result.returncode == 0, result.stderr[-2000:]
    assert "usage" in result.stdout.lower()
    assert_left_nothing(tmp_path / "tmp")
    if script.name in QUICKEST:
        assert "--device" in result.stdout, f"{script.name} has no --device option"


@pytest.mark.parametrize("script", list(QUICKEST))
def test_benchmark_quickest_mode_runs(script, tmp_path):
    args, expected = QUICKEST[script]
    result = run(script, *args, "--device", "cpu", tmp=tmp_path / "tmp")
    assert result.returncode == 0, (result.stdout[-2000:], result.stderr[-3000:])
    assert expected in result.stdout, result.stdout[-2000:]
    assert_left_nothing(tmp_path / "tmp")


@pytest.mark.skipif(not __import__("torch").cuda.is_available(), reason="no CUDA device: the --device cuda runs "
                    "need one (scripts/gpu_checks.sh runs the full-size ones)")
@pytest.mark.parametrize("script", list(QUICKEST))
def test_benchmark_quickest_mode_runs_on_cuda(script, tmp_path):
    args, expected = QUICKEST[script]
    result = run(script, *args, "--device", "cuda", tmp=tmp_path / "tmp")
    assert result.returncode == 0, (result.stdout[-2000:], result.stderr[-3000:])
    assert expected in result.stdout and re.search(r'device"?[=: ]+"?cuda', result.stdout), result.stdout[-2000:]
    assert_left_nothing(tmp_path / "tmp")

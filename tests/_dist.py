"""Start 2 (or N) real processes joined by gloo on the CPU, as torchrun would, for the scale-out tests.

- ``run_ranks(fn, *args, world_size=2)`` runs the module-level function ``fn(rank, *args)`` in
  ``world_size`` spawned processes inside one process group and returns the ranks' return values in rank
  order (values travel back through a pipe: keep them numpy arrays / plain Python).
- ``torchrun(args, nproc=2)`` runs ``python -m torch.distributed.run --standalone --nproc-per-node N -m
  vitatlas ARGS`` in a subprocess (the real command users type) and returns the CompletedProcess.

Each rank runs with one intra-op thread, so 2 ranks fit this machine's 2 cores.

Killed ranks leave at a point their own code reaches (a fit callback, ``VITATLAS_TEST_EXIT_AT``), never
after a delay, so what a killed job has written is the same in every run. What the survivor does next
races with the launcher's SIGTERM (torchrun stops the job ~0.1 s after a rank dies): the assertions
accept either of its two one-line errors, both of which say to re-run the command.
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import tempfile
import time
import traceback
from multiprocessing.connection import wait

import torch
import torch.multiprocessing as mp

RANK_TIMEOUT_S = 60


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_main(rank: int, world_size: int, port: int, fn, args, queue) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world_size),
                      LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world_size))
    torch.set_num_threads(1)
    from vitatlas import distributed

    try:
        distributed.init(timeout_s=RANK_TIMEOUT_S)
        queue.put((rank, "ok", fn(rank, *args)))
    except BaseException as exc:  # noqa: BLE001 - reported to the parent test
        queue.put((rank, "error", f"{type(exc).__name__}: {exc}\n{traceback.format_exc()}"))
    finally:
        distributed.shutdown()


@contextlib.contextmanager
def _ranks(fn, args, world_size: int, timeout_s: float):
    """Start ``fn(rank, *args)`` on ``world_size`` spawned ranks; yields the queue their results arrive on
    and the processes."""
    ctx = mp.get_context("spawn")
    queue = ctx.SimpleQueue()
    port = free_port()
    procs = [ctx.Process(target=_rank_main, args=(r, world_size, port, fn, args, queue)) for r in range(world_size)]
    for p in procs:
        p.start()
    try:
        yield queue, procs
    finally:
        for p in procs:
            p.join(timeout=timeout_s)
            if p.is_alive():
                p.kill()


def _next_result(queue, procs, deadline: float) -> tuple[int, str, object]:
    """The next rank's report; an AssertionError, not a hang, when no rank can send one any more.

    A rank that dies without reporting (an abort, a crash in the interpreter's exit) would otherwise
    leave ``queue.get()`` waiting forever.
    """
    while queue.empty():
        if all(p.exitcode is not None for p in procs) and queue.empty():
            raise AssertionError(f"the ranks ended without reporting (exit codes {[p.exitcode for p in procs]})")
        if time.monotonic() > deadline:
            raise AssertionError(f"no rank reported within the time limit (exit codes {[p.exitcode for p in procs]})")
        wait([p.sentinel for p in procs if p.exitcode is None], timeout=0.2)
    return queue.get()


def run_ranks(fn, *args, world_size: int = 2, timeout_s: float = 120) -> list:
    """``fn(rank, *args)`` on ``world_size`` processes in one gloo group; their results in rank order."""
    results: dict[int, tuple[str, object]] = {}
    deadline = time.monotonic() + timeout_s
    with _ranks(fn, args, world_size, timeout_s) as (queue, procs):
        for _ in range(world_size):
            rank, status, value = _next_result(queue, procs, deadline)
            results[rank] = (status, value)
    errors = [f"rank {r}: {v}" for r, (s, v) in sorted(results.items()) if s != "ok"]
    if errors:
        raise AssertionError("\n".join(errors))
    return [results[r][1] for r in range(world_size)]


def torchrun(args: list[str], nproc: int = 2, timeout_s: float = 300, env: dict | None = None,
             **kwargs) -> subprocess.CompletedProcess:
    """``torchrun --standalone --nproc-per-node nproc -m vitatlas ARGS`` in a subprocess.

    torchrun makes a log directory in the temporary directory for every job and never removes it: it
    gets one that is removed here. The ranks keep the suite's TMPDIR, so what they leave is still seen.
    """
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", **(env or {})}
    with tempfile.TemporaryDirectory(prefix="vitatlas-torchrun-logs-") as logs:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
               f"--log-dir={logs}", "-m", "vitatlas", *args]
        return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s, env=full_env, **kwargs)


def run_until_a_rank_dies(fn, *args, world_size: int = 2, timeout_s: float = 60) -> tuple[int, str, object]:
    """Run ``fn(rank, *args)`` on ``world_size`` ranks of which some leave with ``os._exit`` (a killed process);
    returns the first survivor's ``(rank, "ok" | "error", value)``."""
    with _ranks(fn, args, world_size, timeout_s) as (queue, procs):
        return _next_result(queue, procs, time.monotonic() + timeout_s)


def vanish_on_rank_1(rank: int, at: int):
    """A fit callback that makes rank 1 leave with ``os._exit`` at step ``at``, as a killed process would."""
    def stop(step, _progress):
        if rank == 1 and step == at:
            os._exit(1)
    return stop


def error_or_finished(fit) -> str:
    """Run ``fit()``: its VitatlasError's message, or "finished" when it ran to the end."""
    from vitatlas.errors import VitatlasError

    try:
        fit()
    except VitatlasError as exc:
        return str(exc)
    return "finished"


def assert_survivor_stopped_cleanly(result: tuple[int, str, object]) -> None:
    """Rank 0 outlived the killed rank and got the one-line 'lost contact ... re-run' VitatlasError."""
    rank, status, message = result
    assert (rank, status) == (0, "ok"), message
    assert "lost contact with the other processes" in message and "re-run the same command" in message
    assert "\n" not in message


def assert_job_stopped_with_one_line_error(res: subprocess.CompletedProcess) -> str:
    """A torchrun job with a killed rank failed, rank 0 said why in one ``error:`` line that says to re-run
    (it lost contact with the killed rank, or torchrun's SIGTERM stopped it first: a race either may
    win), and no rank printed a traceback. Returns that line."""
    assert res.returncode != 0, "the job did not fail"
    lines = res.stderr.replace("\r", "\n").splitlines()
    errors = [ln for ln in lines if "[rank 0] error:" in ln]
    assert errors, res.stderr[-3000:]
    assert "re-run the same command" in errors[0], errors[0]
    assert ("lost contact with the other processes" in errors[0]) != ("stopped by torchrun" in errors[0]), errors[0]
    # torchrun prints one traceback of its own (its ChildFailedError); any other is a rank's. Counted, not
    # matched by line start: torchrun prefixes the ranks' lines with "[rankN]:".
    tracebacks = res.stderr.count("Traceback (most recent call last)")
    assert tracebacks == res.stderr.count("errors.ChildFailedError:"), res.stderr[-4000:]
    return errors[0]


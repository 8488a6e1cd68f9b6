"""Start 2 (or N) real processes joined by gloo on the CPU, as torchrun would, for the scale-out tests.

- ``run_ranks(fn, *args, world_size=2)`` runs the module-level function ``fn(rank, *args)`` in
  ``world_size`` spawned processes inside one process group and returns the ranks' return values in rank
  order (values travel back through a pipe: keep them numpy arrays / plain Python).
- ``torchrun(args, nproc=2)`` runs ``python -m torch.distributed.run --standalone --nproc-per-node N -m
  vitatlas ARGS`` in a subprocess (the real command users type) and returns the CompletedProcess.

Each rank runs with one intra-op thread, so 2 ranks fit this machine's 2 cores.
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import traceback

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
    """Start ``fn(rank, *args)`` on ``world_size`` spawned ranks; yields the queue their results arrive on."""
    ctx = mp.get_context("spawn")
    queue = ctx.SimpleQueue()
    port = free_port()
    procs = [ctx.Process(target=_rank_main, args=(r, world_size, port, fn, args, queue)) for r in range(world_size)]
    for p in procs:
        p.start()
    try:
        yield queue
    finally:
        for p in procs:
            p.join(timeout=timeout_s)
            if p.is_alive():
                p.kill()


def run_ranks(fn, *args, world_size: int = 2, timeout_s: float = 120) -> list:
    """``fn(rank, *args)`` on ``world_size`` processes in one gloo group; their results in rank order."""
    results: dict[int, tuple[str, object]] = {}
    with _ranks(fn, args, world_size, timeout_s) as queue:
        for _ in range(world_size):
            rank, status, value = queue.get()
            results[rank] = (status, value)
    errors = [f"rank {r}: {v}" for r, (s, v) in sorted(results.items()) if s != "ok"]
    if errors:
        raise AssertionError("\n".join(errors))
    return [results[r][1] for r in range(world_size)]


def torchrun(args: list[str], nproc: int = 2, timeout_s: float = 300, env: dict | None = None,
             **kwargs) -> subprocess.CompletedProcess:
    """``torchrun --standalone --nproc-per-node nproc -m vitatlas ARGS`` in a subprocess."""
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", **(env or {})}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
           "-m", "vitatlas", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s, env=full_env, **kwargs)


def run_until_a_rank_dies(fn, *args, world_size: int = 2, timeout_s: float = 60) -> tuple[int, str, object]:
    """Run ``fn(rank, *args)`` on ``world_size`` ranks of which some leave with ``os._exit`` (a killed process);
    returns the first survivor's ``(rank, "ok" | "error", value)``."""
    with _ranks(fn, args, world_size, timeout_s) as queue:
        return queue.get()


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

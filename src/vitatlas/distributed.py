"""Data parallelism over the processes ``torchrun`` starts (``torch.distributed``: gloo on CPU, NCCL on GPU).

A single process is the default and nothing here changes it: without a running process group every
helper is a no-op (rank 0 of a world of 1), so single-process code paths stay exactly as they are.

Who starts the group: the ``vitatlas`` command does, when torchrun's environment says ``WORLD_SIZE`` > 1
(``init()`` from ``cli.run``). Python users run under torchrun and call ``vitatlas.distributed.init()``
(or ``torch.distributed.init_process_group`` themselves); the learners, the extractor and the streaming
passes only ask ``world()``.

What the parts of vitatlas split and reduce (see the README's "Scaling out"):
- extraction splits image batches, each rank writes its own shards, rank 0 commits the manifest;
- the SAE trainer and DBK-SVD split every global batch; gradients, counters and the K-SVD products are
  summed with ``all_reduce_``, so every rank holds the same parameters;
- evaluate/interpret split rows and reduce their statistics and top-k lists;
- rank 0 alone writes manifests, checkpoints and run directories (``is_main``), the others wait at a
  ``barrier``.

A collective that fails because another process died raises a one-line ``VitatlasError`` that says to
re-run the same command (every long job resumes from its last checkpoint), instead of a gloo traceback.
"""

from __future__ import annotations

import contextlib
import datetime
import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from .errors import VitatlasError

DEFAULT_TIMEOUT_S = 600  # a rank waiting longer than this at a collective gives up (the others are gone)


@dataclass(frozen=True)
class World:
    """Where this process stands: ``rank`` in ``[0, size)``; ``local_rank`` picks its GPU on a machine."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.size > 1


def world() -> World:
    """The running process group's view of this process (rank 0 of 1 when there is none)."""
    if not (dist.is_available() and dist.is_initialized()):
        return World()
    return World(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", dist.get_rank())))


def is_main() -> bool:
    return world().is_main


def launched_by_torchrun() -> bool:
    """True when torchrun (or a launcher setting the same variables) started several processes."""
    try:
        return int(os.environ.get("WORLD_SIZE", "1")) > 1 and "RANK" in os.environ
    except ValueError:
        raise VitatlasError(f"WORLD_SIZE={os.environ['WORLD_SIZE']!r} is not a number; launch with "
                            "torchrun --nproc-per-node N") from None


def init(timeout_s: float = DEFAULT_TIMEOUT_S) -> World:
    """Join the process group described by torchrun's environment (idempotent; a no-op for one process).

    The backend is gloo for CPU tensors and, when CUDA is present, NCCL for CUDA tensors (one group
    serves both); each rank's default CUDA device becomes ``cuda:LOCAL_RANK``, so ``device="cuda"``
    means this rank's own GPU.
    """
    if not dist.is_available():
        raise VitatlasError("this PyTorch build has no torch.distributed; run a single process instead")
    if dist.is_initialized():
        return world()
    if not launched_by_torchrun():
        return World()
    missing = [v for v in ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE") if v not in os.environ]
    if missing:
        raise VitatlasError(f"the environment lacks {', '.join(missing)}; start several processes with "
                            "torchrun --nproc-per-node N -m vitatlas ...")
    backend = "gloo"
    if torch.cuda.is_available():
        local = int(os.environ.get("LOCAL_RANK", "0"))
        if local >= torch.cuda.device_count():
            raise VitatlasError(f"LOCAL_RANK={local} but this machine has {torch.cuda.device_count()} GPU(s); "
                                "use --nproc-per-node at most the number of GPUs")
        torch.cuda.set_device(local)
        backend = "cpu:gloo,cuda:nccl"
    _import_before_joining()
    with collective("joining the process group"):
        dist.init_process_group(backend=backend, timeout=datetime.timedelta(seconds=timeout_s))
    return world()


def _import_before_joining() -> None:
    """Import ``torch._dynamo`` before the group exists (torch.optim imports it at its first step).

    Imported after, it keeps the group alive past ``destroy_process_group`` (torch 2.13): gloo's worker
    threads are never joined, and one of them releasing a finished collective's tensor while the
    interpreter exits aborts the process ("terminate called without an active exception") after the
    job's work is done. Imported before, ``shutdown`` joins them (``tests/test_distributed.py``).
    """
    import torch._dynamo  # noqa: F401


def raise_on_sigterm() -> None:
    """Under torchrun, turn the launcher's SIGTERM into a one-line VitatlasError (``[rank r] error: ...``).

    torchrun stops every process of a job with SIGTERM as soon as one fails or is killed; without this
    the others would vanish without a word, or print a gloo traceback.
    """
    import signal
    import threading

    def stop(signum, frame):
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # once: this error is already on its way out
        raise VitatlasError("stopped by torchrun because another process of the job failed or was stopped; "
                            "re-run the same command to resume")

    if world().distributed and threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, stop)


def ignore_sigterm() -> None:
    """Ignore SIGTERM from here on (the command's outcome is decided and on its way out; ``cli.run``)."""
    import signal
    import threading

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, signal.SIG_IGN)


def shutdown() -> None:
    """Leave the process group (a no-op when there is none)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


@contextlib.contextmanager
def collective(what: str) -> Iterator[None]:
    """Turn a failed collective (a peer died, timed out or disagreed) into a one-line VitatlasError."""
    try:
        yield
    except VitatlasError:
        raise
    except (RuntimeError, ValueError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        rank = world().rank if dist.is_initialized() else os.environ.get("RANK", "?")
        raise VitatlasError(f"rank {rank} lost contact with the other processes while {what} ({first[:200]}); "
                            "the job stops here: re-run the same command to resume from the last checkpoint"
                            ) from exc


def _reduce_op(op: str):
    ops = {"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX, "min": dist.ReduceOp.MIN}
    if op not in ops:
        raise ValueError(f"op must be one of {sorted(ops)}, got {op!r}")
    return ops[op]


def all_reduce_(tensor: torch.Tensor, op: str = "sum") -> torch.Tensor:
    """Reduce ``tensor`` in place over all ranks (``"sum"``, ``"max"`` or ``"min"``) and return it.

    A no-op for one process. Bool tensors are reduced as uint8 (sum means any for them, min all).
    """
    if not world().distributed:
        return tensor
    reduce_op = _reduce_op(op)
    work = tensor.to(torch.uint8) if tensor.dtype == torch.bool else tensor
    if tensor.dtype == torch.bool and op == "sum":
        reduce_op = dist.ReduceOp.MAX
    with collective(f"reducing a {tuple(tensor.shape)} tensor"):
        dist.all_reduce(work, op=reduce_op)
    if work is not tensor:
        tensor.copy_(work.bool())
    return tensor


def broadcast_(tensor: torch.Tensor, src: int = 0) -> torch.Tensor:
    """Overwrite ``tensor`` on every rank with rank ``src``'s copy (a no-op for one process)."""
    if world().distributed:
        with collective(f"broadcasting a {tuple(tensor.shape)} tensor"):
            dist.broadcast(tensor, src=src)
    return tensor


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Rank ``src``'s ``obj`` on every rank (JSON-like values: it travels pickled between our own processes)."""
    if not world().distributed:
        return obj
    box = [obj]
    with collective("broadcasting a value"):
        dist.broadcast_object_list(box, src=src)
    return box[0]


def all_gather_object(obj: Any) -> list[Any]:
    """Every rank's ``obj``, in rank order (``[obj]`` for one process)."""
    w = world()
    if not w.distributed:
        return [obj]
    out: list[Any] = [None] * w.size
    with collective("gathering values"):
        dist.all_gather_object(out, obj)
    return out


def barrier(what: str = "waiting for the other processes") -> None:
    """Wait until every rank gets here (a no-op for one process)."""
    if world().distributed:
        with collective(what):
            dist.barrier()


def check_same(value: Any, what: str) -> None:
    """Refuse to go on when the ranks were given different ``value``s (options, data, paths)."""
    values = all_gather_object(value)
    if any(v != values[0] for v in values[1:]):
        raise VitatlasError(f"the processes disagree on {what} ({values[0]!r} on rank 0, "
                            f"{next(v for v in values if v != values[0])!r} elsewhere); start every rank with "
                            "the same command")


def merge_top(values: torch.Tensor, ids: torch.Tensor, k: int) -> torch.Tensor:
    """Indices (k, A) of each column's ``k`` best candidates among every rank's gathered top lists.

    ``values`` and ``ids`` (M, A) are the concatenated lists; the order is value descending, ties by id
    ascending, so the merged lists do not depend on how many ranks the rows were split over.
    """
    by_id = torch.argsort(ids, dim=0, stable=True)
    by_value = torch.argsort(values.gather(0, by_id), dim=0, descending=True, stable=True)[:k]
    return by_id.gather(0, by_value)


def shard(n: int, rank: int | None = None, size: int | None = None) -> range:
    """This rank's contiguous part of ``range(n)``: sizes differ by at most one, lower ranks get more."""
    w = world()
    rank = w.rank if rank is None else rank
    size = w.size if size is None else size
    base, extra = divmod(n, size)
    lo = rank * base + min(rank, extra)
    return range(lo, lo + base + (1 if rank < extra else 0))

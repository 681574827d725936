"""Where a job runs: one process, N spawned processes, or N processes launched by torchrun.

Every loop of the run layer is written once, for any number of processes: it takes its shard of the
work (:func:`shard`) and meets the other processes through the collectives below, which do nothing
when there is one process. :func:`launch` starts a job in the three modes:

* one process (``workers`` 0 or 1, no torchrun): the function runs here, no process group;
* ``workers`` = N > 1 (no torchrun): N processes started with ``torch.multiprocessing.spawn``, joined
  in a gloo process group (a rendezvous file), each on ``cuda:i`` or the CPU;
* under torchrun (``RANK``/``WORLD_SIZE`` set): this process is one rank of the group torchrun
  describes (NCCL on GPUs, gloo on CPUs), on ``cuda:LOCAL_RANK`` or the CPU.

Collectives run on a gloo group of their own with a long timeout (CPU tensors: they work beside NCCL
and while rank 0 clusters for a long time).
"""

from __future__ import annotations

import logging
import os
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, TypeVar

import torch
import torch.distributed as dist

__all__ = [
    "check_device",
    "remove_dead_rendezvous",
    "RunContext",
    "launch",
    "check_workers",
    "init_from_env",
    "launched_by_torchrun",
    "is_initialized",
    "rank",
    "world_size",
    "local_rank",
    "device_for",
    "barrier",
    "broadcast_object",
    "all_gather",
    "gather_object",
    "sum_over_ranks",
    "raise_on_all_ranks",
    "shard",
    "shard_indices",
    "DEFAULT_TIMEOUT",
]

logger = logging.getLogger(__name__)

T = TypeVar("T")

DEFAULT_TIMEOUT = timedelta(hours=2)
"""Timeout of the collectives: other ranks wait while rank 0 runs K-means (long on COCO)."""

_timeout = DEFAULT_TIMEOUT
_cpu_groups: dict[int, Any] = {}


@dataclass(frozen=True)
class RunContext:
    """Where this process stands in the job.

    Attributes:
        rank: global rank (0 with one process).
        world_size: number of processes (1 with one process).
        local_rank: rank on this machine (the GPU index).
        backend: ``"nccl"``, ``"gloo"`` or None when no process group exists.
        device: the device this process computes on.
        initialized_here: whether this context created the process group (:meth:`close` destroys it).
    """

    rank: int
    world_size: int
    local_rank: int
    backend: str | None
    device: torch.device
    initialized_here: bool

    @property
    def is_main(self) -> bool:
        """True on rank 0 (the rank that logs, shows progress, clusters and saves the bank)."""
        return self.rank == 0

    @property
    def is_distributed(self) -> bool:
        """True when a process group with more than one process exists."""
        return self.world_size > 1

    def barrier(self) -> None:
        """Wait for every rank (no-op with one process)."""
        barrier()

    def close(self) -> None:
        """Destroy the process group if this context created it."""
        if self.initialized_here and is_initialized():
            _cpu_groups.clear()
            dist.destroy_process_group()

    def __enter__(self) -> RunContext:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# --------------------------------------------------------------------------- where we are


def launched_by_torchrun(environ: dict[str, str] | None = None) -> bool:
    """Whether the environment describes a distributed launch (``RANK`` and ``WORLD_SIZE`` are set)."""
    env = os.environ if environ is None else environ
    return "RANK" in env and "WORLD_SIZE" in env


def is_initialized() -> bool:
    """Whether a default process group exists."""
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    """Global rank of this process (0 without a process group)."""
    return dist.get_rank() if is_initialized() else 0


def world_size() -> int:
    """Number of processes (1 without a process group)."""
    return dist.get_world_size() if is_initialized() else 1


def local_rank() -> int:
    """Rank on this machine: ``LOCAL_RANK`` from torchrun (0 otherwise)."""
    return int(os.environ.get("LOCAL_RANK", 0))


def check_device(requested: str | torch.device, setting: str = "--device / LPCAM_DEVICE") -> torch.device:
    """``requested`` as a device this machine has, else ``ValueError`` naming ``setting``."""
    try:
        device = torch.device(requested)
    except (RuntimeError, TypeError, ValueError):
        raise ValueError(f"{setting} {str(requested)[:40]!r}: expected cpu, cuda or cuda:N") from None
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0 or (device.index is not None and device.index >= count):
            raise ValueError(f"{setting} {str(requested)[:40]!r}: this machine has {count} CUDA device(s)")
    return device


def device_for(local: int, requested: str | torch.device | None = None) -> torch.device:
    """``requested`` (checked: :func:`check_device`), else ``cuda:<local % GPUs>`` when there is a GPU, else the CPU."""
    if requested:
        return check_device(requested)
    if torch.cuda.is_available() and torch.cuda.device_count() > 0:
        return torch.device("cuda", local % torch.cuda.device_count())
    return torch.device("cpu")


def _context(initialized_here: bool, requested: str | None = None, local: int | None = None) -> RunContext:
    backend = str(dist.get_backend()) if is_initialized() else None
    local = local_rank() if local is None else local
    return RunContext(rank(), world_size(), local, backend, device_for(local, requested), initialized_here)


def init_from_env(backend: str | None = None, *, timeout: timedelta | float | None = None,
                  device: str | None = None) -> RunContext:
    """Initialise the default process group from torchrun's environment, or do nothing.

    Args:
        backend: ``"nccl"`` or ``"gloo"``; default nccl when CUDA is available, else gloo.
        timeout: collective timeout (a ``timedelta`` or seconds); default 2 hours.
        device: this rank's device (default ``cuda:LOCAL_RANK`` or the CPU).

    Returns:
        :class:`RunContext`. Without ``RANK``/``WORLD_SIZE`` in the environment: rank 0 of 1, no group.
        When a process group already exists (the host made one), it is reused as is.

    Raises:
        RuntimeError: a partial torchrun environment (e.g. no ``MASTER_ADDR``), or nccl asked for
            without a GPU for this local rank.
    """
    global _timeout
    if timeout is not None:
        _timeout = timeout if isinstance(timeout, timedelta) else timedelta(seconds=float(timeout))
    if is_initialized():
        return _context(False, device)
    if not launched_by_torchrun():
        return _context(False, device, 0)
    missing = [k for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT") if k not in os.environ]
    if missing:
        raise RuntimeError(
            f"init_from_env: RANK/WORLD_SIZE are set but {missing} are not: launch with torchrun "
            "(python -m torch.distributed.run), which sets them all"
        )
    local = local_rank()
    if backend is None:
        backend = "nccl" if torch.cuda.is_available() and dist.is_nccl_available() else "gloo"
    if backend == "nccl":
        if not torch.cuda.is_available() or torch.cuda.device_count() <= local:
            raise RuntimeError(
                f"init_from_env: backend nccl needs a GPU for LOCAL_RANK={local}, "
                f"found {torch.cuda.device_count()} GPU(s); use --nproc_per_node <= GPUs or backend='gloo'"
            )
        torch.cuda.set_device(local)
    dist.init_process_group(backend=backend, timeout=_timeout)
    ctx = _context(True, device)
    logger.info("process group: rank %d of %d, backend %s, device %s", ctx.rank, ctx.world_size, backend, ctx.device)
    return ctx


# --------------------------------------------------------------------------- launching


def launch(fn: Callable[..., T], *args: Any, workers: int | None = None, device: str | None = None) -> T | None:
    """Run ``fn(ctx, *args)`` in every process of a job (see the module docstring for the three modes).

    Args:
        fn: a module-level function (spawned processes import it by name, so the module's import-time
            work, an adapter's patches for instance, happens in each of them).
        args: picklable arguments (models included).
        workers: processes to spawn (None, 0 or 1: this process). Refused under torchrun, which
            launched the processes already.
        device: every process's device (default: ``cuda:<rank>`` when there are GPUs, else the CPU).

    Returns:
        ``fn``'s result in this process; None when the work ran in spawned processes.

    Raises:
        ValueError: ``workers`` > 1 under torchrun.
    """
    check_workers(workers)
    if launched_by_torchrun():
        with init_from_env(device=device) as ctx:
            return fn(ctx, *args)
    if workers is None or workers <= 1:
        return fn(_context(False, device, 0), *args)
    from torch import multiprocessing

    logger.info("spawning %d workers", workers)
    remove_dead_rendezvous()
    with tempfile.TemporaryDirectory(prefix=f"lpcam_rendezvous_{os.getpid()}_") as folder:
        init = "file://" + os.path.join(folder, "group")
        multiprocessing.spawn(_spawned, nprocs=workers, args=(workers, init, device, fn, args), join=True)
    return None


def remove_dead_rendezvous() -> int:
    """Remove the rendezvous folders of spawning processes that no longer run (a killed parent's); how many."""
    import shutil

    removed = 0
    root = tempfile.gettempdir()
    for name in os.listdir(root):
        parts = name.split("_")
        if not name.startswith("lpcam_rendezvous_") or len(parts) < 4 or not parts[2].isdigit():
            continue
        try:
            os.kill(int(parts[2]), 0)
        except ProcessLookupError:
            shutil.rmtree(os.path.join(root, name), ignore_errors=True)
            removed += 1
        except (PermissionError, OverflowError):
            pass
    return removed


def check_workers(workers: int | None) -> None:
    """Refuse ``workers`` > 1 (spawned processes) under torchrun, which launched the processes already."""
    if launched_by_torchrun() and workers is not None and workers > 1:
        raise ValueError(
            f"--workers {workers} (or LPCAM_WORKERS) spawns worker processes, but torchrun already launched "
            f"{os.environ.get('WORLD_SIZE')} process(es): drop --workers (or set it to 0) under torchrun, "
            "or launch without torchrun"
        )


def _spawned(index: int, workers: int, init: str, device: str | None, fn: Callable[..., Any], args: tuple) -> None:
    """Entry of a spawned process: join the gloo group, pick the device and threads, run ``fn``."""
    from ..logs import configure_logging

    configure_logging()
    dist.init_process_group("gloo", init_method=init, rank=index, world_size=workers, timeout=_timeout)
    ctx = _context(True, device, index)
    if ctx.device.type == "cpu":
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // workers))
    elif ctx.device.type == "cuda":
        torch.cuda.set_device(ctx.device)
    with ctx:
        fn(ctx, *args)


# --------------------------------------------------------------------------- collectives


def _cpu_group() -> Any:
    """The collectives' gloo group (created once per default group, collectively), or None."""
    if not is_initialized():
        return None
    key = id(dist.group.WORLD)
    group = _cpu_groups.get(key)
    if group is None:
        group = dist.new_group(backend="gloo", timeout=_timeout)
        _cpu_groups[key] = group
    return group


def barrier() -> None:
    """Wait for every rank (no-op without a process group)."""
    if is_initialized() and world_size() > 1:
        dist.barrier(group=_cpu_group())


def broadcast_object(obj: T, src: int = 0) -> T:
    """Collective: rank ``src``'s ``obj`` (picklable) on every rank (``obj`` itself with one process)."""
    if world_size() == 1:
        return obj
    payload = [obj if rank() == src else None]
    dist.broadcast_object_list(payload, src=src, group=_cpu_group())
    return payload[0]


def all_gather(obj: T) -> list[T]:
    """Collective: every rank's ``obj`` (picklable), in rank order (``[obj]`` with one process)."""
    if world_size() == 1:
        return [obj]
    out: list[Any] = [None] * world_size()
    dist.all_gather_object(out, obj, group=_cpu_group())
    return out


def gather_object(obj: T, dst: int = 0) -> list[T] | None:
    """Collective: every rank's ``obj`` on rank ``dst`` (rank order), None on the others."""
    if world_size() == 1:
        return [obj]
    received: list[Any] | None = [None] * world_size() if rank() == dst else None
    dist.gather_object(obj, received, dst=dst, group=_cpu_group())
    return received


def sum_over_ranks(values: Sequence[int]) -> list[int]:
    """Collective: element-wise sums of integer counts over the ranks."""
    if world_size() == 1:
        return [int(v) for v in values]
    tensor = torch.tensor([int(v) for v in values], dtype=torch.int64)
    dist.all_reduce(tensor, group=_cpu_group())
    return [int(v) for v in tensor.tolist()]


def raise_on_all_ranks(fn: Callable[[], T], src: int = 0) -> T | None:
    """Collective: ``fn()`` on rank ``src``; a ``ValueError``/``FileNotFoundError`` it raises is raised on
    every rank alike (no rank is left waiting). Returns ``fn``'s result on ``src``, None elsewhere."""
    result, error = None, None
    if rank() == src:
        try:
            result = fn()
        except (ValueError, FileNotFoundError) as exc:
            error = (type(exc).__name__, str(exc))
    error = broadcast_object(error, src)
    if error is not None:
        raise (FileNotFoundError if error[0] == "FileNotFoundError" else ValueError)(error[1])
    return result


def shard_indices(n: int, rank: int | None = None, world: int | None = None, *, strided: bool = True) -> range:
    """The positions 0..n-1 of an item list that ``rank`` of ``world`` handles (ascending).

    Args:
        n: list length.
        rank, world: default: this process's rank and world size.
        strided: ``rank, rank + world, ...`` (balances lists sorted by size or class; the IRN hosts'
            own split); else one contiguous block, the first ``n % world`` ranks one item longer.

    Example:
        >>> list(shard_indices(7, 1, 3)), list(shard_indices(7, 1, 3, strided=False))
        ([1, 4], [3, 4])
    """
    if n < 0:
        raise ValueError(f"shard_indices: n must be >= 0, got {n}")
    r = globals()["rank"]() if rank is None else int(rank)
    w = world_size() if world is None else int(world)
    if w < 1 or not 0 <= r < w:
        raise ValueError(f"shard: need 0 <= rank < world (got rank={r}, world={w})")
    if strided:
        return range(r, n, w)
    base, extra = divmod(n, w)
    start = r * base + min(r, extra)
    return range(start, start + base + (1 if r < extra else 0))


def shard(items: Sequence[T], rank: int | None = None, world: int | None = None, *, strided: bool = True) -> list[T]:
    """The items ``rank`` of ``world`` handles: ``[items[i] for i in shard_indices(len(items), ...)]``."""
    return [items[i] for i in shard_indices(len(items), rank, world, strided=strided)]

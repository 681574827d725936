"""Scale-out under torchrun: sharded prototype building and sharded, resumable map generation.

Only this module imports ``torch.distributed`` for lpcam; the single-process path never needs it, and
every function here also works without a process group (world size 1, nothing initialised).

Launch the host's command with ``torchrun --nproc_per_node N ...`` (or several nodes); in the script::

    from lpcam_core import distributed as lpdist

    ctx = lpdist.init_from_env()                 # no-op (world size 1) when not under torchrun
    plan = lpdist.clustering_plan(labels, config, num_classes)   # the same list on every rank
    bank = lpdist.build_prototypes(plan, load, num_classes, weight, config=config, out_path="bank.pt")
    stats = lpdist.generate(ids, compute, "cams_lpcam")          # each rank writes its shard's files
    ctx.close()

Prototype building: each rank adds its shard of the stream (``add(..., index=global_index)``); the pools
are merged into those one process would hold (bottom-k sampling, see :mod:`lpcam_core.prototypes`), so the
bank is identical whatever the world size, for a fixed seed, in or beyond the memory budget. K-means runs
once, on rank 0; the bank is saved atomically by rank 0 and sent to every rank.

Map generation: the id list is sharded; each rank writes its files atomically, skips files that already
exist and load completely, and removes temporary files that a killed run of its shard left behind, so
a restarted job (any world size) resumes without losing or duplicating work.

Collectives of this module run on a dedicated gloo group with a long timeout (CPU tensors, so it works
beside NCCL and while rank 0 clusters for a long time).
"""

from __future__ import annotations

import logging
import os
import time
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any, TypeVar, Union

import numpy as np
import torch
import torch.distributed as dist

from .config import LPCAMConfig
from .prototypes import PrototypeBuilder, _bottom_k, _cut_of, sample_images_per_class

__all__ = [
    "DistContext",
    "init_from_env",
    "launched_by_torchrun",
    "is_initialized",
    "rank",
    "world_size",
    "local_rank",
    "barrier",
    "broadcast_object",
    "all_gather",
    "shard",
    "shard_indices",
    "ClusterItem",
    "clustering_plan",
    "select_classes",
    "merge_builders",
    "build_distributed",
    "build_prototypes",
    "GenerateStats",
    "irn_writer",
    "mctformer_writer",
    "generate",
]

logger = logging.getLogger(__name__)

T = TypeVar("T")
PathLike = Union[str, "os.PathLike[str]"]

DEFAULT_TIMEOUT = timedelta(hours=2)
"""Timeout of this module's collectives: other ranks wait while rank 0 runs K-means (long on COCO)."""

_timeout = DEFAULT_TIMEOUT
_cpu_groups: dict[int, Any] = {}


# --------------------------------------------------------------------------- process group


@dataclass(frozen=True)
class DistContext:
    """Where this process stands in the job.

    Attributes:
        rank: global rank (0 when not distributed).
        world_size: number of processes (1 when not distributed).
        local_rank: rank on this machine (the GPU index under torchrun).
        backend: ``"nccl"``, ``"gloo"`` or None when no process group exists.
        device: the device this rank should compute on (``cuda:local_rank`` or CPU).
        initialized_here: whether :func:`init_from_env` created the process group (then :meth:`close`
            destroys it).
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
        """Wait for every rank (no-op when not distributed)."""
        barrier()

    def close(self) -> None:
        """Destroy the process group if :func:`init_from_env` created it."""
        if self.initialized_here and is_initialized():
            _cpu_groups.clear()
            dist.destroy_process_group()

    def __enter__(self) -> DistContext:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def launched_by_torchrun() -> bool:
    """Whether the environment describes a distributed launch (``RANK`` and ``WORLD_SIZE`` are set)."""
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


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


def _device_for(local: int) -> torch.device:
    if torch.cuda.is_available() and torch.cuda.device_count() > 0:
        return torch.device("cuda", local % torch.cuda.device_count())
    return torch.device("cpu")


def _context(initialized_here: bool) -> DistContext:
    backend = str(dist.get_backend()) if is_initialized() else None
    local = local_rank()
    return DistContext(rank(), world_size(), local, backend, _device_for(local), initialized_here)


def init_from_env(backend: str | None = None, *, timeout: timedelta | float | None = None) -> DistContext:
    """Initialise the default process group from torchrun's environment, or do nothing.

    Args:
        backend: ``"nccl"`` or ``"gloo"``; default nccl when CUDA is available, else gloo.
        timeout: collective timeout (a ``timedelta`` or seconds) of the group created here and of this
            module's own gloo group; default 2 hours (rank 0 may cluster for long while others wait).

    Returns:
        :class:`DistContext`. Without ``RANK``/``WORLD_SIZE`` in the environment: rank 0 of 1, no group.
        When a process group already exists (the host made one), it is reused as is.

    Raises:
        RuntimeError: a partial torchrun environment (e.g. no ``MASTER_ADDR``), torch without
            distributed support, or nccl asked for without a GPU for this local rank.
    """
    global _timeout
    if timeout is not None:
        _timeout = timeout if isinstance(timeout, timedelta) else timedelta(seconds=float(timeout))
    if is_initialized():
        return _context(initialized_here=False)
    if not launched_by_torchrun():
        return DistContext(0, 1, 0, None, _device_for(0), False)
    missing = [k for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT") if k not in os.environ]
    if missing:
        raise RuntimeError(
            f"init_from_env: RANK/WORLD_SIZE are set but {missing} are not: launch with torchrun "
            "(python -m torch.distributed.run), which sets them all"
        )
    if not dist.is_available():
        raise RuntimeError("init_from_env: this torch build has no torch.distributed support")
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
    ctx = _context(initialized_here=True)
    logger.info("process group: rank %d of %d, backend %s, device %s", ctx.rank, ctx.world_size, backend, ctx.device)
    return ctx


def _cpu_group() -> Any:
    """This module's gloo group (created once per default group, collectively), or None when not distributed."""
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
    """Collective: rank ``src``'s ``obj`` (picklable) on every rank (``obj`` itself without a process group)."""
    if world_size() == 1:
        return obj
    payload = [obj if rank() == src else None]
    dist.broadcast_object_list(payload, src=src, group=_cpu_group())
    return payload[0]


def all_gather(obj: T) -> list[T]:
    """Collective: every rank's ``obj`` (picklable), in rank order (``[obj]`` without a process group)."""
    if world_size() == 1:
        return [obj]
    out: list[Any] = [None] * world_size()
    dist.all_gather_object(out, obj, group=_cpu_group())
    return out


def _resolve(rank_: int | None, world: int | None) -> tuple[int, int]:
    r = rank() if rank_ is None else int(rank_)
    w = world_size() if world is None else int(world)
    if w < 1 or not 0 <= r < w:
        raise ValueError(f"shard: need 0 <= rank < world (got rank={r}, world={w})")
    return r, w


def shard_indices(n: int, rank: int | None = None, world: int | None = None, *, strided: bool = True) -> range:
    """The positions 0..n-1 of an item list that ``rank`` of ``world`` handles (ascending).

    Args:
        n: list length.
        rank, world: default: this process's rank and world size.
        strided: ``rank, rank + world, ...`` (balances lists sorted by size or class); else one
            contiguous block, the first ``n % world`` ranks one item longer.

    Returns:
        A ``range``; the ranges of all ranks partition ``range(n)``.

    Example:
        >>> list(shard_indices(7, 1, 3)), list(shard_indices(7, 1, 3, strided=False))
        ([1, 4], [3, 4])
    """
    if n < 0:
        raise ValueError(f"shard_indices: n must be >= 0, got {n}")
    r, w = _resolve(rank, world)
    if strided:
        return range(r, n, w)
    base, extra = divmod(n, w)
    start = r * base + min(r, extra)
    return range(start, start + base + (1 if r < extra else 0))


def shard(items: Sequence[T], rank: int | None = None, world: int | None = None, *, strided: bool = True) -> list[T]:
    """The items ``rank`` of ``world`` handles: ``[items[i] for i in shard_indices(len(items), ...)]``."""
    return [items[i] for i in shard_indices(len(items), rank, world, strided=strided)]


# --------------------------------------------------------------------------- what to cluster


@dataclass(frozen=True)
class ClusterItem:
    """One entry of the prototype-building stream.

    Attributes:
        image_id: the training image.
        classes: the classes whose CAMs split its features (``None``: every class present). COCO's
            per-class sampling gives one class: the one the image was drawn for.
    """

    image_id: str
    classes: tuple[int, ...] | None = None


def clustering_plan(
    labels: Mapping[str, Iterable[int]], config: LPCAMConfig, num_classes: int
) -> list[ClusterItem]:
    """The stream of images (and classes) the prototypes are built from, the same on every rank.

    Args:
        labels: image id -> class indices present, in dataset order.
        config: with ``images_per_class`` None (VOC): every image with all its classes, in order.
            With ``images_per_class`` = m (COCO: 100): for each class in index order, m images drawn
            with replacement from those labelled with it (seed ``config.seed``, as the release does,
            see :func:`~lpcam_core.prototypes.sample_images_per_class`), each with only that class.
        num_classes: classes of the classifier.

    Returns:
        The ordered plan; its positions are the images' stream indices.
    """
    if config.images_per_class is None:
        return [ClusterItem(str(image_id), None) for image_id in labels]
    picks = sample_images_per_class(labels, config.images_per_class, config.seed, num_classes)
    return [ClusterItem(str(image_id), (key,)) for key, image_id in picks]


def select_classes(
    cams: torch.Tensor | np.ndarray, keys: torch.Tensor | Sequence[int], classes: Sequence[int], *, image_id: str = "?"
) -> tuple[torch.Tensor, torch.Tensor]:
    """The maps [len(classes), H, W] and keys of ``classes`` out of an image's [n, H, W] CAMs and keys [n].

    Raises:
        ValueError: a class is not among the image's keys (its labels and CAM file disagree).
    """
    cams_t = torch.from_numpy(cams) if isinstance(cams, np.ndarray) else cams
    keys_l = [int(k) for k in (keys.tolist() if isinstance(keys, (torch.Tensor, np.ndarray)) else keys)]
    rows = []
    for c in classes:
        if int(c) not in keys_l:
            raise ValueError(f"image {image_id}: class {int(c)} was sampled for it but its CAM keys are {keys_l}")
        rows.append(keys_l.index(int(c)))
    index = torch.tensor(rows, dtype=torch.long)
    return cams_t[index.to(cams_t.device)], torch.tensor([keys_l[i] for i in rows], dtype=torch.long)


# --------------------------------------------------------------------------- merging pools


def _builder_meta(builder: PrototypeBuilder) -> dict[str, Any]:
    return {
        "num_classes": builder.num_classes,
        "config": builder.config.to_dict(),
        "class_names": builder.class_names,
        "feature_dim": builder.feature_dim,
        "dtype": None if builder.dtype is None else str(builder.dtype).replace("torch.", ""),
        "images_seen": builder.images_seen,
        "next_index": builder._next_index,
        "seen": {name: pool.seen for name, pool in builder.pools.items()},
    }


def merge_builders(builder: PrototypeBuilder, *, dst: int = 0) -> PrototypeBuilder | None:
    """Collective: merge every rank's builder into the one a single process would hold, on rank ``dst``.

    Every rank calls it with its own builder (fed its shard with ``add(..., index=global_index)``).
    The pools are trimmed to the global cap first (each rank sends only rows the merged pools keep), so
    rank ``dst`` holds at most the memory budget plus one pool in transit. The input builders are
    consumed: their pools are emptied on every rank.

    Returns:
        The merged :class:`PrototypeBuilder` on ``dst``; None on the other ranks. Without a process
        group (or with one process), ``builder`` itself.

    Raises:
        ValueError (on every rank): the ranks' builders differ in classes, config, feature dim or dtype,
            or the same image index was added on two ranks.
    """
    if world_size() == 1:
        return builder
    gathered = _gather_parts(builder, dst)
    return None if gathered is None else _assemble(gathered)


def _assemble(gathered: dict[str, Any]) -> PrototypeBuilder:
    """The merged builder from :func:`_gather_parts`'s result (local to rank ``dst``)."""
    try:
        return PrototypeBuilder.from_parts(**gathered)
    except ValueError as err:
        raise ValueError(f"merge_builders: {err} (did two ranks add the same image index?)") from None


def _gather_parts(builder: PrototypeBuilder, dst: int) -> dict[str, Any] | None:
    """Collective part of :func:`merge_builders`: ``from_parts`` arguments on ``dst``, None elsewhere.

    Every error it raises is raised on every rank alike (no rank is left waiting).
    """
    group = _cpu_group()
    me, world = rank(), world_size()
    metas: list[Any] = [None] * world
    dist.all_gather_object(metas, _builder_meta(builder), group=group)
    first = metas[0]
    for r, m in enumerate(metas):
        for field in ("num_classes", "config", "class_names"):
            if m[field] != first[field]:
                raise ValueError(f"merge_builders: rank {r} has a different {field} from rank 0 ({m[field]!r} vs {first[field]!r})")
    fed = {(m["feature_dim"], m["dtype"]) for m in metas if m["feature_dim"] is not None}
    if len(fed) > 1:
        raise ValueError(f"merge_builders: ranks saw features of different (dim, dtype): {sorted(fed, key=str)}")
    feature_dim, dtype_name = next(iter(fed)) if fed else (None, None)
    dtype = getattr(torch, dtype_name) if dtype_name else None
    seen: dict[tuple[str, int], int] = {}
    for m in metas:
        for name, count in m["seen"].items():
            seen[name] = seen.get(name, 0) + int(count)
    probe = PrototypeBuilder(builder.num_classes, builder.config, class_names=builder.class_names)
    probe.feature_dim, probe.dtype = feature_dim, dtype
    level = probe.level_for(seen.values()) if feature_dim is not None else None

    if level is not None:
        # Each rank keeps its bottom-`level` rows (a superset of its share of the global sample), then
        # the ranks agree on each pool's global cut: the largest (priority, order) the single process keeps.
        for pool in builder.pools.values():
            pool.cap(level)
        local = {name: (pool.priorities(), pool.order_keys()) for name, pool in builder.pools.items()}
        gathered: list[Any] = [None] * world
        dist.all_gather_object(gathered, local, group=group)
        del local
        for name in sorted(seen):
            pieces = [g[name] for g in gathered if name in g]
            priority = np.concatenate([p for p, _ in pieces])
            order = np.concatenate([o for _, o in pieces])
            if priority.shape[0] > level and name in builder.pools:
                keep = _bottom_k(priority, order, level)
                builder.pools[name].keep_at_most(_cut_of(priority[keep], order[keep]))
        del gathered

    parts: dict[tuple[str, int], list[tuple[torch.Tensor, np.ndarray]]] = {}
    for name in sorted(seen):
        pool = builder.pools.pop(name, None)
        mine = (pool.rows(), pool.order_keys()) if pool is not None and pool.held else None
        del pool
        received: list[Any] | None = [None] * world if me == dst else None
        dist.gather_object(mine, received, dst=dst, group=group)
        if me == dst:
            assert received is not None
            parts[name] = [p for p in received if p is not None]
        del mine, received
    builder.pools.clear()
    if me != dst:
        return None
    return dict(
        num_classes=builder.num_classes,
        config=builder.config,
        feature_dim=feature_dim,
        dtype=dtype,
        images_seen=sum(int(m["images_seen"]) for m in metas),
        next_index=max(int(m["next_index"]) for m in metas),
        seen=seen,
        parts=parts,
        class_names=builder.class_names,
    )


def build_distributed(
    builder: PrototypeBuilder,
    classifier_weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    out_path: PathLike | None = None,
    device: torch.device | str | None = None,
    progress: bool = True,
    meta: Mapping[str, Any] | None = None,
):
    """Collective: merge the ranks' builders, cluster on rank 0, save there, return the bank on every rank.

    Args:
        builder: this rank's builder (consumed when distributed).
        classifier_weight, bias: as for :meth:`PrototypeBuilder.build` (used on rank 0).
        out_path: where rank 0 saves the bank (atomically); other ranks never write it.
        device: where K-means runs on rank 0 (default: the classifier's device).
        progress: progress bar over classes on rank 0.
        meta: extra metadata (picklable) merged into the bank's before it is saved (e.g. provenance).

    Returns:
        The same :class:`~lpcam_core.bank.PrototypeBank` on every rank (sent from rank 0; no shared
        file system is needed). Every rank returns only after the bank is saved.

    Raises:
        RuntimeError on ranks other than 0 when rank 0 failed to build (rank 0 raises its own error).
    """
    from .bank import PrototypeBank

    if world_size() == 1:
        bank = builder.build(classifier_weight, bias, device=device, progress=progress)
        bank.meta.update(meta or {})
        if out_path is not None:
            bank.save(out_path)
        return bank
    gathered = _gather_parts(builder, 0)
    failure: BaseException | None = None
    payload: list[Any] = [None]
    bank = None
    if rank() == 0:
        assert gathered is not None
        try:
            merged = _assemble(gathered)
            del gathered
            bank = merged.build(classifier_weight, bias, device=device, progress=progress)
            del merged
            bank.meta.update(meta or {})
            if out_path is not None:
                bank.save(out_path)
            payload = [("ok", bank.state_dict())]
        except Exception as err:  # tell the other ranks instead of leaving them waiting
            failure = err
            payload = [("error", f"{type(err).__name__}: {err}")]
    dist.broadcast_object_list(payload, src=0, group=_cpu_group())
    if failure is not None:
        raise failure
    status, data = payload[0]
    if status != "ok":
        raise RuntimeError(f"rank 0 failed to build the prototype bank: {data}")
    if bank is None:
        bank = PrototypeBank(
            {int(k): v for k, v in data["foreground"].items()},
            {int(k): v for k, v in data["context"].items()},
            data["meta"],
        )
    return bank


LoadFn = Callable[[str], tuple[torch.Tensor, Union[torch.Tensor, np.ndarray], Union[torch.Tensor, Sequence[int]]]]


def build_prototypes(
    plan: Sequence[ClusterItem | str],
    load: LoadFn,
    num_classes: int,
    classifier_weight: torch.Tensor,
    *,
    config: LPCAMConfig | None = None,
    bias: torch.Tensor | None = None,
    out_path: PathLike | None = None,
    class_names: Sequence[str] | None = None,
    device: torch.device | str | None = None,
    strided: bool = True,
    progress: bool = True,
    meta: Mapping[str, Any] | None = None,
    record_pool_peak: bool = False,
):
    """Build the prototype bank of ``plan``, sharded over the ranks (one process works as well).

    Args:
        plan: the stream (:func:`clustering_plan`; plain ids mean every class present), identical on
            every rank. Item ``i`` is added with ``index=i``, so the bank does not depend on the sharding.
        load: ``image_id -> (features [C, h, w], cams [n, H, W], keys [n])``: the host's training-image
            features at one scale, no flip, and its max-normalised baseline CAMs of its classes.
        num_classes: classes of the classifier.
        classifier_weight, bias: the classifier scoring the centres.
        config: settings (default: the VOC preset).
        out_path: where rank 0 saves the bank atomically.
        class_names: optional, stored in the bank.
        device: where K-means runs on rank 0.
        strided: sharding of ``plan`` (see :func:`shard_indices`).
        progress: progress bars on rank 0.
        meta: extra metadata stored in the bank (see :func:`build_distributed`).
        record_pool_peak: store ``meta["pool_peak_bytes"]``: the most pool memory one rank held while
            adding (bytes, the maximum over ranks; so it depends on the world size).

    Returns:
        The :class:`~lpcam_core.bank.PrototypeBank`, on every rank.

    Example:
        >>> cfg = LPCAMConfig.preset("coco")
        >>> plan = clustering_plan(labels, cfg, 80)            # 8,000 (class, image) draws
        >>> bank = build_prototypes(plan, load, 80, weight, config=cfg, out_path="coco_bank.pt")
    """
    from tqdm.auto import tqdm

    builder = PrototypeBuilder(num_classes, config, class_names=class_names)
    indices = shard_indices(len(plan), strided=strided)
    show = progress and rank() == 0
    peak = 0
    for index in tqdm(indices, desc="prototype features", disable=not show, leave=False):
        item = plan[index]
        if not isinstance(item, ClusterItem):
            item = ClusterItem(str(item), None)
        features, cams, keys = load(item.image_id)
        if item.classes is not None:
            cams, keys = select_classes(cams, keys, item.classes, image_id=item.image_id)
        builder.add(features, cams, keys, index=index)
        peak = max(peak, builder.bytes_held)
    logger.info(
        "rank %d: %d images added, pools hold %.1f MiB (peak %.1f MiB)",
        rank(), builder.images_seen, builder.bytes_held / 2**20, peak / 2**20,
    )
    extra = dict(meta or {})
    if record_pool_peak:
        extra["pool_peak_bytes"] = max(int(p) for p in all_gather(peak))
    return build_distributed(
        builder, classifier_weight, bias, out_path=out_path, device=device, progress=progress, meta=extra
    )


# --------------------------------------------------------------------------- map generation


@dataclass(frozen=True)
class GenerateStats:
    """What :func:`generate` did.

    Attributes:
        total: ids in the list. written / skipped: files written / found complete, over all ranks.
        rank_written / rank_skipped: the same for this rank. removed_temporaries: stale temporary
            files of killed runs removed (all ranks). seconds: this rank's wall time.
    """

    total: int
    written: int
    skipped: int
    rank_written: int
    rank_skipped: int
    removed_temporaries: int
    seconds: float


def irn_writer(path: Path, result: Mapping[str, Any]) -> None:
    """Write a ``{keys, cam, high_res}`` record (``lpcam_multiscale``'s output) in the IRN format, atomically."""
    from .io import save_irn_cam

    save_irn_cam(path, result["keys"], result.get("cam"), result["high_res"])


def mctformer_writer(path: Path, result: Mapping[int, Any]) -> None:
    """Write MCTformer's ``{class_index: (H, W) map}`` dict, atomically."""
    from .io import save_mctformer_cam

    save_mctformer_cam(path, result)


def _remove_stale_temporaries(out_dir: Path, names: set[str]) -> int:
    """Remove ``.<name>.<random>.tmp`` files (left by a killed atomic write) of the given output names."""
    removed = 0
    with os.scandir(out_dir) as entries:
        for entry in entries:
            n = entry.name
            if not (n.startswith(".") and n.endswith(".tmp")):
                continue
            target = n[1:-4].rsplit(".", 1)[0]
            if target in names:
                try:
                    os.unlink(entry.path)
                    removed += 1
                except FileNotFoundError:
                    pass
    if removed:
        logger.info("removed %d temporary file(s) left by an interrupted run in %s", removed, out_dir)
    return removed


def _sum_over_ranks(values: Sequence[int]) -> list[int]:
    if world_size() == 1:
        return [int(v) for v in values]
    tensor = torch.tensor([int(v) for v in values], dtype=torch.int64)
    dist.all_reduce(tensor, group=_cpu_group())
    return [int(v) for v in tensor.tolist()]


def generate(
    ids: Sequence[str],
    compute: Callable[[str], Any],
    out_dir: PathLike,
    writer: Callable[[Path, Any], Any] | None = None,
    *,
    suffix: str = ".npy",
    overwrite: bool = False,
    loader: Callable[[Path], Any] | None = None,
    read_dirs: Iterable[PathLike | None] = (),
    strided: bool = True,
    progress: bool = True,
    desc: str = "LPCAM maps",
) -> GenerateStats:
    """Collective: compute and write one file per id, sharded over the ranks, resumable.

    Args:
        ids: image ids, the same list on every rank (no duplicates, no path separators).
        compute: ``image_id -> result`` (e.g. the ``lpcam_multiscale`` record of the image).
        out_dir: output directory (created; refused when it is one of ``read_dirs``).
        writer: ``(path, result) -> None`` writing atomically; default :func:`irn_writer`.
        suffix: file name is ``<id><suffix>``.
        overwrite: recompute files that already exist.
        loader: checks an existing file is complete (raises if not); default by suffix
            (see :func:`lpcam_core.io.should_skip`).
        read_dirs: directories the run reads from (baseline CAMs), never written into.
        strided: sharding of ``ids`` (see :func:`shard_indices`).
        progress: progress bar on rank 0 (over rank 0's shard).
        desc: progress bar label.

    Returns:
        :class:`GenerateStats` (totals summed over ranks). Returns on every rank once all files exist.
    """
    from tqdm.auto import tqdm

    from .io import check_output_dir, should_skip

    start = time.perf_counter()
    ids = [str(i) for i in ids]
    if len(set(ids)) != len(ids):
        dupes = sorted(i for i, n in Counter(ids).items() if n > 1)[:5]
        raise ValueError(f"generate: ids must be unique (two ranks would write one file), repeated: {dupes}")
    bad = [i for i in ids if "/" in i or os.sep in i or i in ("", ".", "..")]
    if bad:
        raise ValueError(f"generate: ids must be plain file names, got {bad[:5]}")
    write = writer if writer is not None else irn_writer
    out = check_output_dir(out_dir, read_dirs=read_dirs)
    mine = shard(ids, strided=strided)
    removed = _remove_stale_temporaries(out, {f"{i}{suffix}" for i in mine})
    written = skipped = 0
    show = progress and rank() == 0
    with tqdm(total=len(mine), desc=desc, disable=not show, leave=False) as bar:
        for image_id in mine:
            path = out / f"{image_id}{suffix}"
            if should_skip(path, overwrite, loader=loader):
                skipped += 1
            else:
                write(path, compute(image_id))
                written += 1
            bar.update(1)
    total_written, total_skipped, total_removed = _sum_over_ranks([written, skipped, removed])
    barrier()
    stats = GenerateStats(
        total=len(ids),
        written=total_written,
        skipped=total_skipped,
        rank_written=written,
        rank_skipped=skipped,
        removed_temporaries=total_removed,
        seconds=time.perf_counter() - start,
    )
    if rank() == 0:
        logger.info(
            "%s: %d written, %d already complete, %d ids, %d process(es), out %s",
            desc, stats.written, stats.skipped, stats.total, world_size(), out,
        )
    return stats

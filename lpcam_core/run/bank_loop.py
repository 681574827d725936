"""The one bank loop: stream images into a PrototypeBuilder, merge the processes' pools, build or reuse the bank.

Each process adds its shard of the clustering plan (every image of the list, or COCO's per-class draws)
with the images' positions in the plan, so the pools, and the bank, do not depend on how many processes
ran (bottom-k sampling, :mod:`lpcam_core.pools`). The pools are merged on rank 0, which clusters, scores
and saves the bank atomically and sends it to every process. Before any image is read, rank 0 decides
whether an existing bank built with the same classifier, settings and provenance can be reused.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Union

import numpy as np
import torch

from ..bank import BankError, PrototypeBank, check_replaceable
from ..classifier import Scorer, as_scorer
from ..config import LPCAMConfig, short_repr
from ..io import remove_dead_writers_temporaries
from ..pools import merge_cut
from ..prototypes import PrototypeBuilder, sample_images_per_class
from .context import all_gather, broadcast_object, gather_object, rank, shard_indices, world_size

__all__ = [
    "ClusterItem",
    "clustering_plan",
    "select_classes",
    "merge_builders",
    "build_from_builder",
    "stream_prototypes",
    "build_prototypes",
    "why_not_reusable",
    "reusable_bank",
    "peak_rss_mib",
]

logger = logging.getLogger(__name__)

PathLike = Union[str, "os.PathLike[str]"]
PoolInput = tuple[torch.Tensor, Union[torch.Tensor, np.ndarray], Union[torch.Tensor, Sequence[int]]]


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


def clustering_plan(labels: Mapping[str, Iterable[int]], config: LPCAMConfig, num_classes: int) -> list[ClusterItem]:
    """The stream of images (and classes) the prototypes are built from, the same on every process.

    Args:
        labels: image id -> class indices present, in dataset order.
        config: with ``images_per_class`` None (VOC): every image with all its classes, in order.
            With ``images_per_class`` = m (COCO: 100): for each class in index order, m images drawn
            with replacement from those labelled with it (the release's seeded draw,
            :func:`~lpcam_core.prototypes.sample_images_per_class`), each with only that class.
        num_classes: classes of the classifier.
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


# --------------------------------------------------------------------------- merging the processes' pools


def merge_builders(builder: PrototypeBuilder, *, dst: int = 0) -> PrototypeBuilder | None:
    """Collective: merge every process's builder into the one a single process would hold, on rank ``dst``.

    Every process calls it with its own builder (fed its shard with ``add(..., index=global_index)``).
    The pools are cut to the global cap first (each process sends only rows the merged pools keep), so
    rank ``dst`` holds at most the memory budget plus one pool in transit. The builders are consumed.

    Returns:
        The merged builder on ``dst``; None on the others. With one process, ``builder`` itself.

    Raises:
        ValueError (on every process): the builders differ in classes, config, feature dim or dtype,
            or the same image index was added by two processes.
    """
    if world_size() == 1:
        return builder
    summaries = all_gather(builder.shard_summary())
    first = summaries[0]
    for r, m in enumerate(summaries):
        for key in ("num_classes", "config", "class_names"):
            if m[key] != first[key]:
                raise ValueError(f"merge_builders: rank {r} has a different {key} from rank 0 ({m[key]!r} vs {first[key]!r})")
    fed = {(m["feature_dim"], m["dtype"]) for m in summaries if m["feature_dim"] is not None}
    if len(fed) > 1:
        raise ValueError(f"merge_builders: ranks saw features of different (dim, dtype): {sorted(fed, key=str)}")
    feature_dim, dtype_name = next(iter(fed)) if fed else (None, None)
    dtype = getattr(torch, dtype_name) if dtype_name else None
    seen: dict[tuple[str, int], int] = {}
    for m in summaries:
        for name, count in m["seen"].items():
            seen[name] = seen.get(name, 0) + int(count)
    probe = PrototypeBuilder(builder.num_classes, builder.config, class_names=builder.class_names)
    probe.feature_dim, probe.dtype = feature_dim, dtype
    level = probe.level_for(seen.values()) if feature_dim is not None else None
    if level is not None:  # each process keeps only rows that the merged pools keep
        held = all_gather(builder.cap_pools(level))
        for name in sorted(seen):
            cut = merge_cut((h[name] for h in held if name in h), level)
            if cut is not None:
                builder.keep_at_most(name, cut)
        del held
    parts: dict[tuple[str, int], list[tuple[torch.Tensor, np.ndarray]]] = {}
    for name in sorted(seen):
        received = gather_object(builder.pop_pool(name), dst)
        if received is not None:
            parts[name] = [p for p in received if p is not None]
    if rank() != dst:
        return None
    try:
        return PrototypeBuilder.from_parts(
            builder.num_classes, builder.config, feature_dim=feature_dim, dtype=dtype,
            images_seen=sum(int(m["images_seen"]) for m in summaries),
            next_index=max(int(m["next_index"]) for m in summaries), seen=seen, parts=parts,
            class_names=builder.class_names,
        )
    except ValueError as err:
        raise ValueError(f"merge_builders: {err} (did two processes add the same image index?)") from None


def build_from_builder(builder: PrototypeBuilder, scorer: Scorer, *, out_path: PathLike | None = None,
                       device: torch.device | str | None = None, progress: bool = True,
                       meta: Mapping[str, Any] | None = None) -> PrototypeBank:
    """Collective: merge the processes' builders, cluster on rank 0, save there, return the bank everywhere.

    Args:
        builder: this process's builder (consumed when there are several processes).
        scorer: scores the centres (on rank 0).
        out_path: where rank 0 saves the bank (atomically); other processes never write it.
        device: where K-means runs on rank 0.
        progress: progress bar over classes on rank 0.
        meta: extra metadata merged into the bank's before it is saved.

    Raises:
        RuntimeError on processes other than 0 when rank 0 failed to build (rank 0 raises its own error).
    """
    merged = merge_builders(builder)
    failure: BaseException | None = None
    bank = None
    payload: Any = None
    if rank() == 0:
        assert merged is not None
        try:
            bank = merged.build(scorer, device=device, progress=progress)
            del merged
            kept = [len(p) for p in bank.foreground.values()]
            if kept and max(kept) == 1:
                logger.warning("every class kept a single class prototype (%d in all): the classifier scored no "
                               "centre above mu_f=%s for any class, as an untrained or mismatched checkpoint does; "
                               "LPCAM maps from this bank are close to a plain similarity map", sum(kept),
                               bank.meta.get("config", {}).get("class_threshold", "?"))
            bank.meta.update(meta or {})
            if out_path is not None:
                os.makedirs(os.path.dirname(os.path.abspath(out_path)), exist_ok=True)
                bank.save(out_path)
            payload = ("ok", bank.state_dict() if world_size() > 1 else None)
        except Exception as err:  # tell the other processes instead of leaving them waiting
            failure = err
            payload = ("error", f"{type(err).__name__}: {err}")
    payload = broadcast_object(payload)
    if failure is not None:
        raise failure
    status, data = payload
    if status != "ok":
        raise RuntimeError(f"rank 0 failed to build the prototype bank: {data}")
    if bank is None:
        bank = PrototypeBank({int(k): v for k, v in data["foreground"].items()},
                             {int(k): v for k, v in data["context"].items()}, data["meta"])
    return bank


# --------------------------------------------------------------------------- the loop


def stream_prototypes(
    stream: Iterable[tuple[int, PoolInput]],
    num_classes: int,
    classifier: torch.Tensor | Scorer,
    *,
    config: LPCAMConfig | None = None,
    bias: torch.Tensor | None = None,
    out_path: PathLike | None = None,
    class_names: Sequence[str] | None = None,
    device: torch.device | str | None = None,
    progress: bool = True,
    meta: Mapping[str, Any] | None = None,
    record_pool_peak: bool = False,
) -> PrototypeBank:
    """Collective: the prototype bank of this process's ``stream`` and the other processes' streams.

    Args:
        stream: ``(index, (features [C, h, w], cams [n, H, W], keys [n]))`` of this process's images:
            one-scale unflipped features and the max-normalised baseline CAMs of the classes they feed;
            ``index`` is the image's position in the whole stream (strictly increasing).
        num_classes: classes of the classifier.
        classifier: [num_classes, C] weight (with ``bias``) or a :class:`~lpcam_core.classifier.Scorer`.
        config: settings (default: the VOC preset).
        out_path: where rank 0 saves the bank.
        class_names: stored in the bank.
        device: where K-means runs on rank 0.
        progress: progress bars on rank 0.
        meta: extra metadata stored in the bank.
        record_pool_peak: store ``meta["pool_peak_bytes"]``: the most pool memory one process held.
    """
    scorer = as_scorer(classifier, bias)
    builder = PrototypeBuilder(num_classes, config, class_names=class_names)
    peak = 0
    for index, (features, cams, keys) in stream:
        builder.add(features, cams, keys, index=index)
        peak = max(peak, builder.bytes_held)
    logger.info("rank %d: %d images added, pools hold %.1f MiB (peak %.1f MiB)",
                rank(), builder.images_seen, builder.bytes_held / 2**20, peak / 2**20)
    extra = dict(meta or {})
    if record_pool_peak:
        extra["pool_peak_bytes"] = max(int(p) for p in all_gather(peak))
    return build_from_builder(builder, scorer, out_path=out_path, device=device, progress=progress, meta=extra)


def build_prototypes(
    plan: Sequence[ClusterItem | str],
    load: Callable[[str], PoolInput],
    num_classes: int,
    classifier: torch.Tensor | Scorer,
    *,
    strided: bool = True,
    progress: bool | None = None,
    **options: Any,
) -> PrototypeBank:
    """Collective: the prototype bank of ``plan``, sharded over the processes (one process works as well).

    Args:
        plan: the stream (:func:`clustering_plan`; plain ids mean every class present), the same on
            every process. Item ``i`` is added with ``index=i``, so the bank does not depend on the sharding.
        load: ``image_id -> (features [C, h, w], cams [n, H, W], keys [n])``.
        num_classes, classifier: as for :func:`stream_prototypes`.
        strided: how ``plan`` is sharded (:func:`~lpcam_core.run.context.shard_indices`).
        progress: progress bar on rank 0 (default: when stderr is a terminal).
        options: ``config``, ``bias``, ``out_path``, ``class_names``, ``device``, ``meta``,
            ``record_pool_peak``, as for :func:`stream_prototypes`.

    Example:
        >>> cfg = LPCAMConfig.preset("coco")
        >>> plan = clustering_plan(labels, cfg, 80)            # 8,000 (class, image) draws
        >>> bank = build_prototypes(plan, load, 80, weight, config=cfg, out_path="coco_bank.pt")
    """
    from tqdm.auto import tqdm

    show = (sys.stderr.isatty() if progress is None else progress) and rank() == 0

    def stream():
        for index in tqdm(shard_indices(len(plan), strided=strided), desc="prototype features", disable=not show,
                          leave=False):
            item = plan[index]
            if not isinstance(item, ClusterItem):
                item = ClusterItem(str(item), None)
            with torch.no_grad():
                features, cams, keys = load(item.image_id)
            if item.classes is not None:
                cams, keys = select_classes(cams, keys, item.classes, image_id=item.image_id)
            yield index, (features, cams, keys)

    return stream_prototypes(stream(), num_classes, classifier, progress=show, **options)


# --------------------------------------------------------------------------- reuse


def why_not_reusable(bank: PrototypeBank, scorer: Scorer, config: LPCAMConfig, meta: Mapping[str, Any]) -> str | None:
    """Why ``bank`` cannot stand for a bank built now with ``scorer``, ``config`` and provenance ``meta``
    (None: it can)."""
    try:
        bank.check_fits(num_classes=scorer.num_classes, feature_dim=scorer.feature_dim)
    except BankError as err:
        return str(err)
    expected = bank.meta.get("classifier_fingerprint")
    if expected is not None and expected != scorer.fingerprint():
        return "it was built with another classifier (checkpoint)"
    wanted = config.to_dict()
    have = dict(bank.meta.get("config") or {})
    wanted.pop("preset_name", None)
    have.pop("preset_name", None)
    if have != wanted:
        diff = sorted(k for k in set(have) | set(wanted) if have.get(k) != wanted.get(k))
        return f"its settings differ ({', '.join(diff)})"
    for key, value in meta.items():
        if bank.meta.get(key) != value:
            return f"its {key} differs ({short_repr(bank.meta.get(key))} != {short_repr(value)})"
    return None


def reusable_bank(path: PathLike | None, scorer: Scorer, config: LPCAMConfig, meta: Mapping[str, Any], *,
                  rebuild: bool = False, required: str | None = None) -> PrototypeBank | None:
    """Collective: the bank at ``path`` when rank 0 finds it built with this classifier, settings and ``meta``
    (loaded on every process), else None (a warning says why).

    Args:
        required: when set, a missing or unfit bank is an error instead of None, and this text (the
            setting that forbids building, how to build one) ends its message.

    Raises:
        FileNotFoundError / ValueError: ``required`` and no bank at ``path`` / a bank that does not fit.
    """
    def decide() -> str | None:  # None: reuse; else why not
        if path is None or not os.path.lexists(path):
            return "missing"
        try:
            check_replaceable(path)
        except BankError as err:
            return f"refuse: {err}"
        if rebuild:
            return "rebuild requested"
        try:
            bank = PrototypeBank.load(path)
        except BankError as err:
            return str(err)
        return why_not_reusable(bank, scorer, config, meta)

    why = broadcast_object(decide() if rank() == 0 else None)
    if why is not None and why.startswith("refuse: "):
        raise BankError(why[len("refuse: "):])
    if why is None:
        if rank() == 0:
            logger.info("reusing the prototype bank %s (same checkpoint and settings)", path)
            remove_dead_writers_temporaries(path)  # a killed rebuild's leftover
        return PrototypeBank.load(path)
    if required is not None:
        if why == "missing":
            raise FileNotFoundError(f"prototype bank not found: {path} ({required})")
        raise ValueError(f"prototype bank {path} does not fit this run: {why} ({required})")
    if why != "missing" and rank() == 0:
        logger.warning("rebuilding the prototype bank %s: %s", path, why)
    return None


def peak_rss_mib() -> float:
    """Peak resident memory of this process (MiB; NaN where the OS does not say)."""
    try:
        import resource
    except ImportError:  # pragma: no cover - Windows
        return float("nan")
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 2**10

"""Prototype building: split local features into class and context pools, cluster them, keep the prototypes.

Steps 2-4 of the method (docs/method.md). :class:`PrototypeBuilder` streams images: ``add`` moves each
image's features into per-class pools (nothing else is kept), ``build`` runs
:func:`~lpcam_core.clustering.kmeans` on every pool and scores the centres with a
:class:`~lpcam_core.classifier.Scorer` (:func:`select_prototypes` for a plain classifier weight).

Memory: all pools together hold at most ``POOL_SHARE_OF_BUDGET`` (85%) of ``config.memory_budget_bytes``
of feature rows (plus 16 bytes of bookkeeping per row); the rest is headroom for the transients of
streaming. While everything fits, the pools hold every feature in arrival order (the result equals
clustering all of them). Once the budget is reached, a common cap ``L`` (water-filling over the pools'
counts of rows offered, rounded down to a fixed grid of levels 1/16 apart, so that it changes a few dozen
times over a stream rather than at every image) is set, and each pool larger than ``L`` keeps a seeded
uniform sample of ``L`` of the rows it was offered (bottom-k sampling, :mod:`lpcam_core.pools`). The kept
set does not depend on the order of the images nor on how they were split between processes: builders fed
shards of the image list merge (:meth:`PrototypeBuilder.merge`, :mod:`lpcam_core.run`) into exactly the
builder one process would hold. Kept rows are always returned in arrival order (image index, then position).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Mapping, MutableMapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from .classifier import Scorer, as_scorer, check_class_index
from .clustering import kmeans
from .config import LPCAMConfig
from .finite import all_finite
from .pools import (
    POOL_SHARE_OF_BUDGET,
    TRIM_EVERY_IMAGES,
    FeaturePool,
    grid_floor,
    release_free_heap,
    water_level,
)

__all__ = [
    "select_prototypes",
    "PrototypeBuilder",
    "FeaturePool",
    "sample_images_per_class",
    "split_by_cam",
    "POSITION_BITS",
    "MAX_IMAGE_INDEX",
]

#: A row's order key: (image index << POSITION_BITS) | flat position in its [h, w] feature grid.
POSITION_BITS = 32
MAX_IMAGE_INDEX = 2**31 - 1

logger = logging.getLogger(__name__)


def select_prototypes(
    centers: torch.Tensor,
    classifier_weight: torch.Tensor | Scorer,
    class_index: int,
    *,
    low: float,
    high: float = float("inf"),
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """Which centres the classifier scores for ``class_index`` strictly between ``low`` and ``high``.

    Args:
        centers: [k, C] cluster centres (raw means, as released).
        classifier_weight: [num_classes, C] (a [num_classes, C, 1, 1] conv weight is accepted), or a
            :class:`~lpcam_core.classifier.Scorer`.
        class_index: the class whose softmax probability is tested (an int; 1.7 is refused, not class 1).
        low: exclusive lower bound (mu_f for class prototypes, context_low for context ones).
        high: exclusive upper bound (inf for class prototypes, mu_b for context ones).
        bias: optional [num_classes] classifier bias.

    Returns:
        BoolTensor [k]: ``low < softmax(centers @ W.T + b, dim=1)[:, class_index] < high``.
    """
    scorer = as_scorer(classifier_weight, bias)
    if not isinstance(centers, torch.Tensor) or centers.ndim != 2 or centers.shape[1] != scorer.feature_dim:
        raise ValueError(
            f"select_prototypes: centers must be [k, {scorer.feature_dim}] to match the classifier, "
            f"got {tuple(getattr(centers, 'shape', ()))}"
        )
    for name, bound in (("low", low), ("high", high)):
        if isinstance(bound, bool) or not isinstance(bound, (int, float)) or math.isnan(bound):
            raise ValueError(f"select_prototypes: {name} must be a probability bound, got {bound!r}")
    if not low < high:
        raise ValueError(f"select_prototypes: need low < high (no centre lies between), got low={low}, high={high}")
    probability = scorer.probability(centers, check_class_index(class_index, scorer.num_classes, "select_prototypes"))
    return (probability > low) & (probability < high)


def split_by_cam(features: torch.Tensor, cam: torch.Tensor, threshold: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Step 2 of the method for one class: the rows above and below ``threshold``.

    Args:
        features: [C, h, w] local features.
        cam: [H, W] the class's normalised CAM; nearest-resized to (h, w) as the release does.
        threshold: tau. A value exactly tau goes to neither pool.

    Returns:
        (class rows [Nf, C], context rows [Nb, C]) in the features' dtype.
    """
    h, w = features.shape[1:]
    small = F.interpolate(cam[None, None].float(), size=(h, w), mode="nearest")[0, 0]
    rows = features.permute(1, 2, 0)
    return rows[small > threshold], rows[small < threshold]


def _split_with_positions(
    features: torch.Tensor, cam: torch.Tensor, threshold: float
) -> tuple[torch.Tensor, torch.Tensor, np.ndarray, np.ndarray]:
    """:func:`split_by_cam` plus the flat grid positions [Nf], [Nb] (int64) of the rows, same order."""
    c, h, w = features.shape
    small = F.interpolate(cam[None, None].float(), size=(h, w), mode="nearest")[0, 0].reshape(-1)
    flat = features.reshape(c, h * w).T  # [h*w, C]: row p is position p in row-major order
    fg_pos = torch.nonzero(small > threshold).flatten()
    bg_pos = torch.nonzero(small < threshold).flatten()
    return flat[fg_pos], flat[bg_pos], fg_pos.cpu().numpy(), bg_pos.cpu().numpy()


class PrototypeBuilder:
    """Streams training images into class/context pools and builds a :class:`~lpcam_core.bank.PrototypeBank`.

    Args:
        num_classes: foreground classes of the classifier (20 for VOC, 80 for COCO).
        config: the settings (``LPCAMConfig.preset("voc")`` by default).
        class_names: optional names, stored in the bank.

    Example:
        >>> builder = PrototypeBuilder(20, LPCAMConfig.preset("voc"))
        >>> for feats, cams, keys in stream:          # feats [C, h, w], cams [n, H, W], keys [n]
        ...     builder.add(feats, cams, keys)
        >>> bank = builder.build(model.classifier.weight)

    Sharded building: give each image its index in the global image list (``add(..., index=i)``) and
    :meth:`merge` the builders of the shards (or use :mod:`lpcam_core.run` across processes):
    the merged builder equals one builder fed the whole list, in and beyond the memory budget.
    """

    def __init__(self, num_classes: int, config: LPCAMConfig | None = None, *, class_names: Sequence[str] | None = None):
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
            raise ValueError(f"PrototypeBuilder: num_classes must be an int >= 1, got {num_classes!r}")
        if class_names is not None and len(class_names) != num_classes:
            raise ValueError(f"PrototypeBuilder: class_names has {len(class_names)} names for {num_classes} classes")
        self.num_classes = num_classes
        self.config = config if config is not None else LPCAMConfig.preset("voc")
        self.class_names = list(class_names) if class_names is not None else None
        self.feature_dim: int | None = None
        self.dtype: torch.dtype | None = None
        self.images_seen = 0
        self.pools: dict[tuple[str, int], FeaturePool] = {}
        self._level: int | None = None
        self._next_index = 0  # smallest image index the next add() may use

    # ------------------------------------------------------------------ streaming
    def add(
        self,
        features: torch.Tensor,
        cams: torch.Tensor | np.ndarray,
        keys: torch.Tensor | Sequence[int],
        *,
        index: int | None = None,
    ) -> None:
        """Split one image's local features into the pools of its present classes.

        Args:
            features: [C, h, w] features of one training image at one scale, no flip.
            cams: [n, H, W] the host's max-normalised baseline CAM of the n present classes
                (any resolution; nearest-resized to (h, w)). Numpy or torch.
            keys: [n] class indices of those maps.
            index: the image's position in the global stream (0..2**31-1), strictly increasing from
                one call to the next; seeds its rows' sampling priorities. Default: one more than the
                previous index (0 first). Pass it when the stream is split between processes.
        """
        index = self._check_index(index)
        features, cams, keys = self._check_add(features, cams, keys)
        tau = self.config.fg_threshold
        base = np.int64(index) << np.int64(POSITION_BITS)
        for cam, key in zip(cams, keys.tolist()):
            fg, bg, fg_pos, bg_pos = _split_with_positions(features, cam, tau)
            self._pool("class", key).offer(fg, base | fg_pos)
            self._pool("context", key).offer(bg, base | bg_pos)
        self.images_seen += 1
        self._next_index = index + 1
        self._enforce_budget()
        # per-image temporaries of varying sizes fragment the heap too: trim every few images as well
        release_free_heap(force=self.images_seen % TRIM_EVERY_IMAGES == 0)

    def _check_index(self, index) -> int:
        if index is None:
            index = self._next_index
        if isinstance(index, (bool, np.bool_)) or not isinstance(index, (int, np.integer)):
            raise TypeError(f"PrototypeBuilder.add: index must be an int (the image's stream position), got {index!r}")
        index = int(index)
        if not 0 <= index <= MAX_IMAGE_INDEX:
            raise ValueError(f"PrototypeBuilder.add: index={index} outside 0..{MAX_IMAGE_INDEX}")
        if index < self._next_index:
            raise ValueError(
                f"PrototypeBuilder.add: index={index} but indices must increase strictly (the previous image had "
                f"index {self._next_index - 1}); give each image its position in the global image list"
            )
        return index

    def _check_add(self, features, cams, keys):
        if not isinstance(features, torch.Tensor):
            raise TypeError(f"PrototypeBuilder.add: features must be a torch.Tensor [C, h, w], got {type(features).__name__}")
        if features.ndim != 3:
            raise ValueError(f"PrototypeBuilder.add: features must be [C, h, w] (one image, one scale), got {tuple(features.shape)}")
        if not features.is_floating_point():
            raise TypeError(f"PrototypeBuilder.add: features must be floating point, got {features.dtype}")
        if self.feature_dim is not None and features.shape[0] != self.feature_dim:
            raise ValueError(
                f"PrototypeBuilder.add: features have {features.shape[0]} channels, earlier images had {self.feature_dim}"
            )
        if features.numel() == 0:
            raise ValueError(f"PrototypeBuilder.add: features of shape {tuple(features.shape)} are empty "
                             "(no channel or no position)")
        if features.shape[1] * features.shape[2] >= 2**POSITION_BITS:
            raise ValueError(f"PrototypeBuilder.add: feature grid {tuple(features.shape[1:])} has 2**32 positions or more")
        if not all_finite(features):  # the pools keep float64 features as float32: beyond its range they become inf
            raise ValueError("PrototypeBuilder.add: features hold NaN or inf values (or float64 values beyond "
                             "float32's range, where the pools keep them)")
        if isinstance(cams, np.ndarray):
            cams = torch.from_numpy(cams)
        if not isinstance(cams, torch.Tensor) or cams.ndim != 3:
            raise ValueError(f"PrototypeBuilder.add: cams must be [n, H, W], got {getattr(cams, 'shape', type(cams).__name__)}")
        if not cams.is_floating_point():
            raise TypeError(f"PrototypeBuilder.add: cams must be floating point maps in [0, 1], got {cams.dtype}")
        if cams.numel():  # one reduction: min and max propagate NaN, and say the range
            low, high = (float(v) for v in torch.aminmax(cams))
            if not (math.isfinite(low) and math.isfinite(high)):
                raise ValueError("PrototypeBuilder.add: cams hold NaN or inf values")
            if not (low >= -1e-4 and high <= 1 + 1e-4):
                raise ValueError(f"PrototypeBuilder.add: cams must be max-normalised maps in [0, 1] (tau is a share of "
                                 f"the maximum), got values in [{low:.3g}, {high:.3g}]")
        keys = torch.as_tensor(np.asarray(keys) if not isinstance(keys, torch.Tensor) else keys).reshape(-1)
        if keys.is_floating_point() or keys.dtype == torch.bool:
            raise TypeError(f"PrototypeBuilder.add: keys must be integer class indices, got {keys.dtype}")
        if keys.numel() != len(set(keys.tolist())):
            raise ValueError(f"PrototypeBuilder.add: keys {keys.tolist()[:20]} repeat a class: each class's map "
                             "splits the features once")
        if keys.numel() != cams.shape[0]:
            raise ValueError(f"PrototypeBuilder.add: {keys.numel()} keys for {cams.shape[0]} CAM maps")
        if keys.numel() and (int(keys.min()) < 0 or int(keys.max()) >= self.num_classes):
            raise ValueError(f"PrototypeBuilder.add: keys {keys.tolist()} outside 0..{self.num_classes - 1}")
        if self.feature_dim is None:
            self.feature_dim = int(features.shape[0])
            self.dtype = torch.float32 if features.dtype == torch.float64 else features.dtype
        return features.detach(), cams.detach().to(features.device), keys.long()

    def _pool(self, kind: str, key: int) -> FeaturePool:
        pool = self.pools.get((kind, key))
        if pool is None:
            assert self.feature_dim is not None and self.dtype is not None
            pool = FeaturePool(self.feature_dim, self.dtype, self._pool_salt(kind, key))
            if self._level is not None:
                pool.cap(self._level)
            self.pools[(kind, key)] = pool
        return pool

    def _pool_salt(self, kind: str, key: int) -> np.random.Generator:
        """The seeded generator a pool draws its salt from: a function of (seed, kind, class) only."""
        return np.random.default_rng([self.config.seed, 0 if kind == "class" else 1, key])

    @property
    def budget_rows(self) -> int:
        """How many feature rows all pools may hold together: ``POOL_SHARE_OF_BUDGET`` (85%) of the memory
        budget, the rest being headroom for the transients of streaming (see that constant)."""
        if self.feature_dim is None or self.dtype is None:
            return 0
        row_bytes = self.feature_dim * torch.empty(0, dtype=self.dtype).element_size()
        pool_bytes = int(self.config.memory_budget_bytes * POOL_SHARE_OF_BUDGET)
        return max(pool_bytes // row_bytes, 2 * self.num_classes)

    @property
    def bytes_held(self) -> int:
        """Bytes of feature rows held by all pools."""
        if self.dtype is None or self.feature_dim is None:
            return 0
        size = torch.empty(0, dtype=self.dtype).element_size()
        return sum(p.held for p in self.pools.values()) * self.feature_dim * size

    def _enforce_budget(self) -> None:
        budget = self.budget_rows
        held = [p.held for p in self.pools.values()]
        if sum(held) <= budget:
            return
        level = grid_floor(water_level(held, budget), budget)
        if self._level is None:
            logger.info(
                "prototype pools reached the memory budget (%.2f GiB): sampling from now on",
                self.config.memory_budget_bytes / 1024**3,
            )
        self._level = level if self._level is None else min(level, self._level)
        for pool in self.pools.values():
            pool.cap(self._level)

    def level_for(self, seen_counts: Iterable[int]) -> int | None:
        """The common cap on pools that were offered ``seen_counts`` rows (None: they all fit the budget).

        This is the cap a builder fed all those rows ends with, whatever their order.
        """
        counts = [int(c) for c in seen_counts]
        budget = self.budget_rows
        if sum(counts) <= budget:
            return None
        return grid_floor(water_level(counts, budget), budget)

    @property
    def next_index(self) -> int:
        """Smallest stream index the next :meth:`add` may use (1 + the largest index added)."""
        return self._next_index

    # ------------------------------------------------------------------ merging shards
    def shard_summary(self) -> dict:
        """What a shard tells the others before its pools are merged (picklable, tensors excluded):
        num_classes, config, class_names, feature_dim, dtype name, images_seen, next_index and the rows
        offered to each pool."""
        return {
            "num_classes": self.num_classes,
            "config": self.config.to_dict(),
            "class_names": self.class_names,
            "feature_dim": self.feature_dim,
            "dtype": None if self.dtype is None else str(self.dtype).replace("torch.", ""),
            "images_seen": self.images_seen,
            "next_index": self._next_index,
            "seen": {name: pool.seen for name, pool in self.pools.items()},
        }

    def pool_names(self) -> list[tuple[str, int]]:
        """The (kind, class) of every pool, sorted."""
        return sorted(self.pools)

    def cap_pools(self, limit: int) -> dict[tuple[str, int], tuple[np.ndarray, np.ndarray]]:
        """Cap every pool at ``limit`` rows; returns each pool's (priorities, order keys) of the rows kept."""
        out = {}
        for name, pool in self.pools.items():
            pool.cap(limit)
            out[name] = (pool.priorities(), pool.order_keys())
        return out

    def keep_at_most(self, name: tuple[str, int], cut: tuple[int, int]) -> None:
        """Drop the rows of pool ``name`` whose (priority, order key) is above ``cut`` (see :func:`~lpcam_core.pools.merge_cut`)."""
        pool = self.pools.get(name)
        if pool is not None:
            pool.keep_at_most(cut)

    def pop_pool(self, name: tuple[str, int]) -> tuple[torch.Tensor, np.ndarray] | None:
        """Remove pool ``name`` and return its (rows [m, C], order keys [m]); None when it holds nothing."""
        pool = self.pools.pop(name, None)
        if pool is None or pool.held == 0:
            return None
        return pool.rows(), pool.order_keys()

    @classmethod
    def from_parts(
        cls,
        num_classes: int,
        config: LPCAMConfig | None,
        *,
        feature_dim: int | None,
        dtype: torch.dtype | None,
        images_seen: int,
        next_index: int,
        seen: Mapping[tuple[str, int], int],
        parts: Mapping[tuple[str, int], Sequence[tuple[torch.Tensor, np.ndarray]]],
        class_names: Sequence[str] | None = None,
    ) -> PrototypeBuilder:
        """A builder holding the union of pool parts from several shards (see :meth:`merge`).

        Args:
            num_classes, config, class_names: as for the constructor (the same on every shard).
            feature_dim, dtype: of the features (None when no shard saw an image).
            images_seen: images added over all shards. next_index: 1 + the largest index added.
            seen: (kind, class) -> rows offered to that pool over all shards.
            parts: (kind, class) -> [(rows [m, C], order keys [m])] held by the shards; each shard's
                part must contain its rows that a single builder would keep (any superset is fine).
                A mutable mapping is consumed (entries are removed as pools are built, to bound memory).

        Returns:
            A builder whose pools equal, row for row and in order, those of one builder fed every image.
        """
        merged = cls(num_classes, config, class_names=class_names)
        merged.images_seen = int(images_seen)
        merged._next_index = int(next_index)
        if feature_dim is None or dtype is None:
            if any(seen.values()):
                raise ValueError("PrototypeBuilder.from_parts: pools have rows but feature_dim/dtype are unknown")
            return merged
        merged.feature_dim, merged.dtype = int(feature_dim), dtype
        level = merged.level_for(seen.values())
        merged._level = level
        for kind, key in sorted(seen):
            # pop: each pool's parts are released once it is built (peak: the parts plus one pool)
            pool_parts = parts.pop((kind, key), ()) if isinstance(parts, MutableMapping) else parts.get((kind, key), ())
            merged.pools[(kind, key)] = FeaturePool.from_parts(
                merged.feature_dim, dtype, merged._pool_salt(kind, key), pool_parts, seen[(kind, key)], level
            )
            del pool_parts
        return merged

    @classmethod
    def merge(cls, builders: Sequence[PrototypeBuilder]) -> PrototypeBuilder:
        """One builder equal to a single builder fed the images of all ``builders`` (disjoint indices).

        Each shard's builder must have been fed its images with ``add(..., index=global_index)``; the
        result does not depend on how the image list was split, in or beyond the memory budget.
        The inputs are left unchanged.
        """
        builders = list(builders)
        if not builders:
            raise ValueError("PrototypeBuilder.merge: no builder given")
        first = builders[0]
        for other in builders[1:]:
            if other.num_classes != first.num_classes or other.config != first.config:
                raise ValueError("PrototypeBuilder.merge: builders differ in num_classes or config")
        fed = [b for b in builders if b.feature_dim is not None]
        if {(b.feature_dim, b.dtype) for b in fed}.__len__() > 1:
            raise ValueError(
                "PrototypeBuilder.merge: builders saw features of different dims/dtypes "
                f"{sorted({(b.feature_dim, str(b.dtype)) for b in fed})}"
            )
        seen: dict[tuple[str, int], int] = {}
        parts: dict[tuple[str, int], list[tuple[torch.Tensor, np.ndarray]]] = {}
        for b in builders:
            for name, pool in b.pools.items():
                seen[name] = seen.get(name, 0) + pool.seen
                parts.setdefault(name, []).append((pool.rows(), pool.order_keys()))
        return cls.from_parts(
            first.num_classes,
            first.config,
            feature_dim=fed[0].feature_dim if fed else None,
            dtype=fed[0].dtype if fed else None,
            images_seen=sum(b.images_seen for b in builders),
            next_index=max(b._next_index for b in builders),
            seen=seen,
            parts=parts,
            class_names=first.class_names,
        )

    # ------------------------------------------------------------------ clustering
    def build(
        self,
        classifier: torch.Tensor | Scorer,
        bias: torch.Tensor | None = None,
        *,
        device: torch.device | str | None = None,
        progress: bool = True,
    ):
        """Cluster every pool and keep the prototypes (steps 3-4 of the method).

        Args:
            classifier: [num_classes, C] (or [num_classes, C, 1, 1]) weight scoring the centres, or a
                :class:`~lpcam_core.classifier.Scorer` (a head that is not one linear map, e.g. AMN's).
            bias: optional [num_classes] classifier bias (with a weight only).
            device: where K-means runs (default: the classifier weight's device, else the CPU).
            progress: show a progress bar over classes.

        Returns:
            :class:`~lpcam_core.bank.PrototypeBank`.
        """
        from tqdm.auto import tqdm

        from .bank import PrototypeBank

        scorer = as_scorer(classifier, bias)
        if scorer.num_classes != self.num_classes:
            raise ValueError(f"build: the classifier scores {scorer.num_classes} classes, the builder has {self.num_classes}")
        if self.feature_dim is None:
            raise ValueError("build: no image was added; call add(features, cams, keys) first")
        if scorer.feature_dim != self.feature_dim:
            raise ValueError(f"build: the classifier takes {scorer.feature_dim} input channels, the features have {self.feature_dim}")
        weight = getattr(scorer, "weight", None)
        if device is None:
            device = weight.device if isinstance(weight, torch.Tensor) else torch.device("cpu")
        device = torch.device(device)
        cfg = self.config
        foreground: dict[int, torch.Tensor] = {}
        context: dict[int, torch.Tensor] = {}
        present = sorted({key for _, key in self.pools})
        missing = sorted(set(range(self.num_classes)) - set(present))
        if missing:
            logger.warning("classes %s never appeared in the images added: they get no prototypes", missing)
        for key in tqdm(present, desc="clustering", disable=not progress, leave=False):
            centers = self._cluster("class", key, device)
            if centers is None:
                logger.warning("class %d: no feature above tau=%g: no class prototype", key, cfg.fg_threshold)
                continue
            probs = scorer.probability(centers, key)
            keep = probs > cfg.class_threshold
            if not bool(keep.any()):
                if not cfg.fallback_best_center:
                    raise ValueError(
                        f"class {key}: no centre scores above class_threshold={cfg.class_threshold} "
                        "(set fallback_best_center=True to keep the best one)"
                    )
                keep = torch.zeros_like(keep)
                keep[int(probs.argmax())] = True
                logger.warning(
                    "class %d: no centre scores above mu_f=%g (best %.3f): keeping the best-scoring centre",
                    key, cfg.class_threshold, float(probs.max()),
                )
            foreground[key] = centers[keep].cpu()
            ctx_centers = self._cluster("context", key, device)
            if ctx_centers is None:
                context[key] = torch.empty(0, self.feature_dim)
            else:
                probs = scorer.probability(ctx_centers, key)
                context[key] = ctx_centers[(probs > cfg.context_low) & (probs < cfg.context_high)].cpu()
        meta = {
            "config": cfg.to_dict(),
            "num_classes": self.num_classes,
            "feature_dim": self.feature_dim,
            "class_names": self.class_names,
            "classifier_fingerprint": scorer.fingerprint(),
            "images_seen": self.images_seen,
            "features_seen": {f"{kind}/{key}": pool.seen for (kind, key), pool in sorted(self.pools.items())},
            "features_clustered": {f"{kind}/{key}": pool.held for (kind, key), pool in sorted(self.pools.items())},
        }
        if not foreground:
            raise ValueError(
                f"no class has a feature above tau={cfg.fg_threshold} in the {self.images_seen} prototype image(s): "
                "their baseline CAMs are all zero or below tau, as an untrained or collapsed classifier gives; "
                "no prototype bank can be built from this checkpoint")
        return PrototypeBank(foreground, context, meta)

    def _cluster(self, kind: str, key: int, device: torch.device) -> torch.Tensor | None:
        """Raw K-means centres [k, C] of one pool, or None when it is empty."""
        pool = self.pools.get((kind, key))
        if pool is None or pool.held == 0:
            return None
        rows = pool.rows()
        release_free_heap()  # if consolidating the pool freed its per-image chunks
        k = self.config.num_clusters
        if rows.shape[0] < k:
            logger.warning(
                "%s pool of class %d holds %d features, fewer than K=%d: clustering with K=%d",
                kind, key, rows.shape[0], k, rows.shape[0],
            )
            k = int(rows.shape[0])
        result = kmeans(
            rows.to(device),
            k,
            seed=self.config.seed,
            n_init=self.config.kmeans_n_init,
            max_iter=self.config.kmeans_max_iter,
            tol=self.config.kmeans_tol,
        )
        return result.centers


def sample_images_per_class(
    labels: Mapping[str, Iterable[int]], images_per_class: int, seed: int, num_classes: int
) -> list[tuple[int, str]]:
    """COCO's clustering subset: for each class, ``images_per_class`` images drawn with replacement.

    Reproduces the release's draw: ``np.random.seed(seed)`` then, class by class in index order,
    ``np.random.choice(images_of_class, images_per_class)`` (with replacement) over the images in
    dataset order. Given the same dataset order, the same images are picked.

    Args:
        labels: image id -> class indices present, in dataset order (a dict keeps insertion order).
        images_per_class: draws per class.
        seed: the draws' seed (the release uses 666).
        num_classes: classes to visit, 0..num_classes-1.

    Returns:
        [(class_index, image_id)] in class order; an image may appear several times. A class with
        no image is skipped with a warning (the release would crash).
    """
    if images_per_class < 1:
        raise ValueError(f"images_per_class must be >= 1, got {images_per_class}")
    by_class: dict[int, list[str]] = {}
    for image_id, keys in labels.items():
        for key in keys:
            by_class.setdefault(int(key), []).append(image_id)
    state = np.random.RandomState(seed)
    picks: list[tuple[int, str]] = []
    for key in range(num_classes):
        ids = by_class.get(key, [])
        if not ids:
            logger.warning("class %d has no image to sample prototypes from", key)
            continue
        for index in state.choice(len(ids), images_per_class):
            picks.append((key, ids[int(index)]))
    return picks


def pool_bytes_needed(num_rows: int, feature_dim: int, itemsize: int = 4) -> int:
    """Bytes to hold ``num_rows`` features of ``feature_dim`` channels."""
    return int(num_rows) * int(feature_dim) * int(itemsize)


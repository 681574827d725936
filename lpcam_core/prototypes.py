"""Prototype building: split local features into class and context pools, cluster them, keep the prototypes.

PAPER.md steps 2-4. :class:`PrototypeBuilder` streams images: ``add`` moves each image's features into
per-class pools (nothing else is kept), ``build`` runs :func:`~lpcam_core.kmeans.kmeans` on every pool and
:func:`select_prototypes` on the centres.

Memory: all pools together hold at most ``config.memory_budget_bytes``. While everything fits, the pools
hold every feature (the result equals clustering all of them). Once the budget is reached, a common cap
``L`` (water-filling) is set on the pools: pools larger than ``L`` are cut to a seeded uniform sample of
``L`` rows and from then on keep a reservoir sample (Algorithm R) of all the rows they are offered, which
stays a uniform sample of everything seen.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from .config import LPCAMConfig
from .kmeans import kmeans

__all__ = ["select_prototypes", "PrototypeBuilder", "FeaturePool", "sample_images_per_class", "split_by_cam"]

logger = logging.getLogger(__name__)


def select_prototypes(
    centers: torch.Tensor,
    classifier_weight: torch.Tensor,
    class_index: int,
    *,
    low: float,
    high: float = float("inf"),
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """Which centres the classifier scores for ``class_index`` strictly between ``low`` and ``high``.

    Args:
        centers: [k, C] cluster centres (raw means, as released).
        classifier_weight: [num_classes, C] (a [num_classes, C, 1, 1] conv weight is accepted).
        class_index: the class whose softmax probability is tested.
        low: exclusive lower bound (mu_f for class prototypes, context_low for context ones).
        high: exclusive upper bound (inf for class prototypes, mu_b for context ones).
        bias: optional [num_classes] classifier bias.

    Returns:
        BoolTensor [k]: ``low < softmax(centers @ W.T + b, dim=1)[:, class_index] < high``.
    """
    weight = _as_linear_weight(classifier_weight, "classifier_weight")
    if centers.ndim != 2 or centers.shape[1] != weight.shape[1]:
        raise ValueError(
            f"select_prototypes: centers must be [k, {weight.shape[1]}] to match classifier_weight, "
            f"got {tuple(centers.shape)}"
        )
    if not 0 <= int(class_index) < weight.shape[0]:
        raise ValueError(f"select_prototypes: class_index={class_index} is outside 0..{weight.shape[0] - 1}")
    probability = _class_probability(centers, weight, int(class_index), bias)
    return (probability > low) & (probability < high)


def _class_probability(centers, weight, class_index, bias) -> torch.Tensor:
    with _no_autocast(centers.device):
        logits = centers.float() @ weight.to(centers.device).float().T
        if bias is not None:
            logits = logits + bias.to(centers.device).float().reshape(1, -1)
        return torch.softmax(logits, dim=1)[:, class_index]


def _no_autocast(device: torch.device):
    return torch.autocast(device_type=device.type, enabled=False)


def _as_linear_weight(weight: torch.Tensor, name: str) -> torch.Tensor:
    """[num_classes, C] from a Linear weight or a 1x1 conv weight [num_classes, C, 1, 1]."""
    if not isinstance(weight, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor [num_classes, C], got {type(weight).__name__}")
    if weight.ndim == 4 and weight.shape[2:] == (1, 1):
        weight = weight[:, :, 0, 0]
    if weight.ndim != 2:
        raise ValueError(f"{name} must have shape [num_classes, C] (or [num_classes, C, 1, 1]), got {tuple(weight.shape)}")
    return weight.detach()


def split_by_cam(features: torch.Tensor, cam: torch.Tensor, threshold: float) -> tuple[torch.Tensor, torch.Tensor]:
    """PAPER.md step 2 for one class: the rows above and below ``threshold``.

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


class FeaturePool:
    """Rows offered to one pool, held whole until capped, then as a seeded reservoir sample."""

    def __init__(self, feature_dim: int, dtype: torch.dtype, generator: np.random.Generator) -> None:
        self.feature_dim = feature_dim
        self.dtype = dtype
        self.seen = 0  # rows offered so far
        self._chunks: list[torch.Tensor] = []
        self._data: torch.Tensor | None = None  # consolidated rows, used once capped
        self._cap: int | None = None
        self._rng = generator

    @property
    def held(self) -> int:
        """Rows currently held."""
        if self._data is not None:
            return int(self._data.shape[0])
        return sum(int(c.shape[0]) for c in self._chunks)

    def rows(self) -> torch.Tensor:
        """[held, C] every row held."""
        self._consolidate()
        assert self._data is not None
        return self._data

    def _consolidate(self) -> None:
        if self._chunks or self._data is None:
            parts = ([self._data] if self._data is not None else []) + self._chunks
            self._data = torch.cat(parts) if parts else torch.empty(0, self.feature_dim, dtype=self.dtype)
            self._chunks = []

    def offer(self, rows: torch.Tensor) -> None:
        """Add rows [m, C]: appended while under the cap, reservoir-sampled beyond it."""
        m = int(rows.shape[0])
        if m == 0:
            return
        rows = rows.detach().to(device="cpu", dtype=self.dtype)
        if self._cap is None or self.held + m <= self._cap:
            self._chunks.append(rows.clone())
            self.seen += m
            return
        # Fill up to the cap, then Algorithm R: row number t (0-based, over all rows seen) replaces
        # slot r ~ U{0..t} when r < cap.
        room = self._cap - self.held
        if room > 0:
            self._chunks.append(rows[:room].clone())
            self.seen += room
            rows = rows[room:]
        self._consolidate()
        assert self._data is not None
        t = self.seen + np.arange(rows.shape[0])
        r = np.floor(self._rng.random(rows.shape[0]) * (t + 1)).astype(np.int64)
        accepted = np.nonzero(r < self._cap)[0]
        if accepted.size:
            slots = r[accepted]
            # Several rows may land in one slot: the last one wins, as in the sequential algorithm.
            _, last = np.unique(slots[::-1], return_index=True)
            keep = accepted[::-1][last]
            self._data[torch.from_numpy(r[keep])] = rows[torch.from_numpy(keep)]
        self.seen += int(rows.shape[0])

    def cap(self, limit: int) -> None:
        """Hold at most ``limit`` rows from now on (a seeded uniform subsample if more are held)."""
        self._cap = limit if self._cap is None else min(self._cap, limit)
        if self.held > self._cap:
            self._consolidate()
            assert self._data is not None
            keep = np.sort(self._rng.choice(self._data.shape[0], size=self._cap, replace=False))
            self._data = self._data[torch.from_numpy(keep)].clone()


def _water_level(held: Sequence[int], budget_rows: int) -> int:
    """Largest L with sum(min(h, L)) <= budget_rows."""
    ordered = sorted(held)
    remaining, pools = budget_rows, len(ordered)
    for i, h in enumerate(ordered):
        share = remaining // (pools - i)
        if h > share:
            return max(share, 1)
        remaining -= h
    return max(ordered) if ordered else budget_rows


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
    """

    def __init__(self, num_classes: int, config: LPCAMConfig | None = None, *, class_names: Sequence[str] | None = None):
        if not isinstance(num_classes, int) or num_classes < 1:
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

    # ------------------------------------------------------------------ streaming
    def add(self, features: torch.Tensor, cams: torch.Tensor | np.ndarray, keys: torch.Tensor | Sequence[int]) -> None:
        """Split one image's local features into the pools of its present classes.

        Args:
            features: [C, h, w] features of one training image at one scale, no flip.
            cams: [n, H, W] the host's max-normalised baseline CAM of the n present classes
                (any resolution; nearest-resized to (h, w)). Numpy or torch.
            keys: [n] class indices of those maps.
        """
        features, cams, keys = self._check_add(features, cams, keys)
        tau = self.config.fg_threshold
        for cam, key in zip(cams, keys.tolist()):
            fg, bg = split_by_cam(features, cam, tau)
            self._pool("class", key).offer(fg)
            self._pool("context", key).offer(bg)
        self.images_seen += 1
        self._enforce_budget()

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
        if not bool(torch.isfinite(features).all()):
            raise ValueError("PrototypeBuilder.add: features hold NaN or inf values")
        if isinstance(cams, np.ndarray):
            cams = torch.from_numpy(cams)
        if not isinstance(cams, torch.Tensor) or cams.ndim != 3:
            raise ValueError(f"PrototypeBuilder.add: cams must be [n, H, W], got {getattr(cams, 'shape', type(cams).__name__)}")
        if not cams.is_floating_point():
            raise TypeError(f"PrototypeBuilder.add: cams must be floating point maps in [0, 1], got {cams.dtype}")
        if not bool(torch.isfinite(cams).all()):
            raise ValueError("PrototypeBuilder.add: cams hold NaN or inf values")
        keys = torch.as_tensor(np.asarray(keys) if not isinstance(keys, torch.Tensor) else keys).reshape(-1)
        if keys.is_floating_point() or keys.dtype == torch.bool:
            raise TypeError(f"PrototypeBuilder.add: keys must be integer class indices, got {keys.dtype}")
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
            # One stream of random numbers per pool, from (seed, kind, class): order-independent.
            rng = np.random.default_rng([self.config.seed, 0 if kind == "class" else 1, key])
            pool = FeaturePool(self.feature_dim, self.dtype, rng)
            if self._level is not None:
                pool.cap(self._level)
            self.pools[(kind, key)] = pool
        return pool

    @property
    def budget_rows(self) -> int:
        """How many feature rows all pools may hold together."""
        if self.feature_dim is None or self.dtype is None:
            return 0
        row_bytes = self.feature_dim * torch.empty(0, dtype=self.dtype).element_size()
        return max(self.config.memory_budget_bytes // row_bytes, 2 * self.num_classes)

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
        level = _water_level(held, budget)
        if self._level is None:
            logger.info(
                "prototype pools reached the memory budget (%.2f GiB): sampling from now on",
                self.config.memory_budget_bytes / 1024**3,
            )
        self._level = level if self._level is None else min(level, self._level)
        for pool in self.pools.values():
            pool.cap(self._level)

    # ------------------------------------------------------------------ clustering
    def build(
        self,
        classifier_weight: torch.Tensor,
        bias: torch.Tensor | None = None,
        *,
        device: torch.device | str | None = None,
        progress: bool = True,
    ):
        """Cluster every pool and keep the prototypes (PAPER.md steps 3-4).

        Args:
            classifier_weight: [num_classes, C] (or [num_classes, C, 1, 1]) scoring the centres.
            bias: optional [num_classes] classifier bias.
            device: where K-means runs (default: the classifier's device).
            progress: show a progress bar over classes.

        Returns:
            :class:`~lpcam_core.bank.PrototypeBank`.
        """
        from tqdm.auto import tqdm

        from .bank import PrototypeBank, classifier_fingerprint

        weight = _as_linear_weight(classifier_weight, "classifier_weight")
        if weight.shape[0] != self.num_classes:
            raise ValueError(f"build: classifier_weight has {weight.shape[0]} classes, the builder {self.num_classes}")
        if self.feature_dim is None:
            raise ValueError("build: no image was added; call add(features, cams, keys) first")
        if weight.shape[1] != self.feature_dim:
            raise ValueError(f"build: classifier_weight has {weight.shape[1]} input channels, the features {self.feature_dim}")
        device = torch.device(device) if device is not None else weight.device
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
            keep = select_prototypes(centers, weight, key, low=cfg.class_threshold, bias=bias)
            if not bool(keep.any()):
                if not cfg.fallback_best_center:
                    raise ValueError(
                        f"class {key}: no centre scores above class_threshold={cfg.class_threshold} "
                        "(set fallback_best_center=True to keep the best one)"
                    )
                probs = _class_probability(centers, weight, key, bias)
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
                keep = select_prototypes(ctx_centers, weight, key, low=cfg.context_low, high=cfg.context_high, bias=bias)
                context[key] = ctx_centers[keep].cpu()
        meta = {
            "config": cfg.to_dict(),
            "num_classes": self.num_classes,
            "feature_dim": self.feature_dim,
            "class_names": self.class_names,
            "classifier_fingerprint": classifier_fingerprint(weight, bias),
            "images_seen": self.images_seen,
            "features_seen": {f"{kind}/{key}": pool.seen for (kind, key), pool in sorted(self.pools.items())},
            "features_clustered": {f"{kind}/{key}": pool.held for (kind, key), pool in sorted(self.pools.items())},
        }
        return PrototypeBank(foreground, context, meta)

    def _cluster(self, kind: str, key: int, device: torch.device) -> torch.Tensor | None:
        """Raw K-means centres [k, C] of one pool, or None when it is empty."""
        pool = self.pools.get((kind, key))
        if pool is None or pool.held == 0:
            return None
        rows = pool.rows()
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


"""Prototype building: split local features into class and context pools, cluster them, keep the prototypes.

PAPER.md steps 2-4. :class:`PrototypeBuilder` streams images: ``add`` moves each image's features into
per-class pools (nothing else is kept), ``build`` runs :func:`~lpcam_core.kmeans.kmeans` on every pool and
:func:`select_prototypes` on the centres.

Memory: all pools together hold at most ``POOL_SHARE_OF_BUDGET`` (85%) of ``config.memory_budget_bytes`` of
feature rows (plus 16 bytes of bookkeeping per row); the rest is headroom for the transients of streaming,
so that the process stays within the budget. While everything fits, the pools hold every feature in arrival order (the result
equals clustering all of them). Once the budget is reached, a common cap ``L`` (water-filling over the
pools' counts of rows offered, rounded down to a fixed grid of levels 1/16 apart, so that it changes a few
dozen times over a stream rather than at every image, each change re-cutting every pool; at least 15/16 of
the budget stays in use) is set, and each pool larger than ``L`` keeps a seeded uniform sample
without replacement of ``L`` of the rows it was offered: "bottom-k" sampling. Every row gets a priority,
a 64-bit hash of (seed, pool, image index, position in the feature grid); a pool keeps its ``L`` rows of
lowest priority. The kept set is therefore a pure function of the seed and of the rows offered, not of the
order they came in nor of how the images were split between processes: pools built on shards of the
image list merge (:meth:`PrototypeBuilder.merge`, :mod:`lpcam_core.distributed`) into exactly the pools a
single builder would hold. Kept rows are always returned in arrival order (image index, then position).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping, MutableMapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from .config import LPCAMConfig
from .kmeans import kmeans

__all__ = ["select_prototypes", "PrototypeBuilder", "FeaturePool", "sample_images_per_class", "split_by_cam"]

# A row's order key: (image index << 32) | flat position in its [h, w] feature grid.
_POSITION_BITS = 32
MAX_IMAGE_INDEX = 2**31 - 1

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


def _mix64(x: np.ndarray) -> np.ndarray:
    """splitmix64 finaliser, element-wise on a uint64 array (wrapping arithmetic). Returns a new array."""
    x = np.array(x, dtype=np.uint64, copy=True)
    x += np.uint64(0x9E3779B97F4A7C15)
    x ^= x >> np.uint64(30)
    x *= np.uint64(0xBF58476D1CE4E5B9)
    x ^= x >> np.uint64(27)
    x *= np.uint64(0x94D049BB133111EB)
    x ^= x >> np.uint64(31)
    return x


def row_priorities(salt: int, order: np.ndarray) -> np.ndarray:
    """Sampling priorities [m] uint64 of rows with order keys ``order`` [m] in a pool salted ``salt``.

    A pure function of (salt, order key): the same row gets the same priority in any process.
    """
    keys = np.asarray(order, dtype=np.int64).view(np.uint64)
    return _mix64(keys ^ np.uint64(salt))


def _bottom_k(priority: np.ndarray, order: np.ndarray, k: int) -> np.ndarray:
    """Sorted indices of the ``k`` rows of smallest (priority, order), ties broken by order key."""
    n = priority.shape[0]
    if k >= n:
        return np.arange(n)
    if k <= 0:
        return np.empty(0, dtype=np.int64)
    cut = np.partition(priority, k - 1)[k - 1]
    below = np.flatnonzero(priority < cut)
    ties = np.flatnonzero(priority == cut)
    if below.size + ties.size > k:  # keep the ties of smallest order key (deterministic)
        ties = ties[np.argsort(order[ties], kind="stable")[: k - below.size]]
    return np.sort(np.concatenate([below, ties]))


def _cut_of(priority: np.ndarray, order: np.ndarray) -> tuple[int, int]:
    """The largest (priority, order) pair of a non-empty set of rows."""
    top = priority.max()
    return int(top), int(order[priority == top].max())


def _at_most(priority: np.ndarray, order: np.ndarray, cut: tuple[int, int]) -> np.ndarray:
    """Boolean mask [m]: rows whose (priority, order) is <= ``cut``."""
    p, o = np.uint64(cut[0]), np.int64(cut[1])
    return (priority < p) | ((priority == p) & (order <= o))


class FeaturePool:
    """Rows offered to one pool: all of them until capped, then the ``cap`` rows of lowest priority.

    Args:
        feature_dim: C.
        dtype: the dtype rows are stored in.
        generator: a seeded ``np.random.Generator`` (or an int) from which the pool's 64-bit salt is
            drawn; the builder seeds it with (config.seed, kind, class).
    """

    def __init__(self, feature_dim: int, dtype: torch.dtype, generator: np.random.Generator | int) -> None:
        self.feature_dim = feature_dim
        self.dtype = dtype
        self.seen = 0  # rows offered so far
        if isinstance(generator, np.random.Generator):
            self.salt = int(generator.integers(0, 2**64, dtype=np.uint64))
        else:
            self.salt = int(generator) % 2**64
        self._chunks: list[torch.Tensor] = []
        self._order_chunks: list[np.ndarray] = []
        self._data: torch.Tensor | None = None  # consolidated rows
        self._order: np.ndarray | None = None  # [held] int64 order keys of the consolidated rows
        self._priority: np.ndarray | None = None  # [held] uint64, computed once sampling starts
        self._cut: tuple[int, int] | None = None  # largest (priority, order) held, when full
        self._cap: int | None = None
        self._next_order = 0  # default order key of the next row offered without one

    @property
    def held(self) -> int:
        """Rows currently held."""
        chunked = sum(int(c.shape[0]) for c in self._chunks)
        return chunked + (int(self._data.shape[0]) if self._data is not None else 0)

    @property
    def limit(self) -> int | None:
        """The cap on rows held (None while uncapped)."""
        return self._cap

    def rows(self) -> torch.Tensor:
        """[held, C] every row held, in arrival order (ascending order key)."""
        self._consolidate(sort=True)
        assert self._data is not None
        return self._data

    def order_keys(self) -> np.ndarray:
        """[held] int64 order keys of :meth:`rows` (same order): ``image_index << 32 | position``."""
        self._consolidate(sort=True)
        assert self._order is not None
        return self._order.copy()

    def priorities(self) -> np.ndarray:
        """[held] uint64 sampling priorities of :meth:`rows` (same order)."""
        self._consolidate(sort=True)
        return self._priorities().copy()

    def _priorities(self) -> np.ndarray:
        assert self._order is not None
        if self._priority is None or self._priority.shape[0] != self._order.shape[0]:
            self._priority = row_priorities(self.salt, self._order)
        return self._priority

    def _consolidate(self, sort: bool = False) -> None:
        if self._chunks or self._data is None:
            parts = ([self._data] if self._data is not None else []) + self._chunks
            _note_freed(*parts)
            orders = ([self._order] if self._order is not None else []) + self._order_chunks
            self._data = torch.cat(parts) if parts else torch.empty(0, self.feature_dim, dtype=self.dtype)
            self._order = np.concatenate(orders) if orders else np.empty(0, dtype=np.int64)
            if self._priority is not None:
                tail = self._order[self._priority.shape[0]:]
                self._priority = np.concatenate([self._priority, row_priorities(self.salt, tail)])
            self._chunks, self._order_chunks = [], []
        if sort:
            assert self._order is not None and self._data is not None
            if self._order.shape[0] > 1 and not bool(np.all(self._order[1:] > self._order[:-1])):
                perm = np.argsort(self._order, kind="stable")
                _note_freed(self._data)
                self._data = self._data[torch.from_numpy(perm)]
                self._order = self._order[perm]
                if self._priority is not None:
                    self._priority = self._priority[perm]

    def offer(self, rows: torch.Tensor, order: np.ndarray | Sequence[int] | None = None) -> None:
        """Add rows [m, C] with their order keys [m] (int64, unique in the pool; default: a running count).

        Appended while under the cap; beyond it the pool keeps the ``cap`` rows of lowest priority
        among everything offered.
        """
        m = int(rows.shape[0])
        if m == 0:
            return
        if order is None:
            order = self._next_order + np.arange(m, dtype=np.int64)
        else:
            order = np.asarray(order, dtype=np.int64).reshape(-1)
            if order.shape[0] != m:
                raise ValueError(f"FeaturePool.offer: {order.shape[0]} order keys for {m} rows")
        self._next_order = max(self._next_order, int(order.max()) + 1)
        rows = rows.detach().to(device="cpu", dtype=self.dtype)
        self.seen += m
        if self._cap is None or self.held + m <= self._cap:
            self._chunks.append(rows.clone())
            self._order_chunks.append(order.copy())
            return
        if self._chunks or self._data is None or int(self._data.shape[0]) < self._cap:
            # Not yet one full tensor: gather the cap rows of lowest priority among the held parts and
            # the new rows straight into one tensor. (Consolidating first, then concatenating the kept
            # part, held up to three copies of the pool at once: +0.2 GiB of peak RSS at a 2 GiB budget.)
            self._chunks.append(rows)
            self._order_chunks.append(order)
            self._gather_lowest(self._cap)
            self._cut = None
            return
        assert self._data is not None and self._order is not None
        held_priority = self._priorities()
        priority = row_priorities(self.salt, order)
        held = int(self._data.shape[0])
        if held == self._cap:  # full: only rows below the current cut can enter
            if self._cut is None:
                self._cut = _cut_of(held_priority, self._order)
            enter = np.flatnonzero(_at_most(priority, order, self._cut))
            if enter.size == 0:
                return
            rows, order, priority = rows[torch.from_numpy(enter)], order[enter], priority[enter]
        keep = _bottom_k(np.concatenate([held_priority, priority]), np.concatenate([self._order, order]), self._cap)
        keep_held, keep_new = keep[keep < held], keep[keep >= held] - held
        new_index = torch.from_numpy(keep_new)
        if held == self._cap:  # evicted slots take the entering rows, in place
            free = np.ones(held, dtype=bool)
            free[keep_held] = False
            slots = np.flatnonzero(free)
            self._data[torch.from_numpy(slots)] = rows[new_index]
            self._order[slots] = order[keep_new]
            held_priority[slots] = priority[keep_new]
        else:
            _note_freed(self._data)
            self._data = torch.cat([self._data[torch.from_numpy(keep_held)], rows[new_index]])
            self._order = np.concatenate([self._order[keep_held], order[keep_new]])
            self._priority = np.concatenate([held_priority[keep_held], priority[keep_new]])
        self._cut = None

    def cap(self, limit: int) -> None:
        """Hold at most ``limit`` rows from now on (the ``limit`` of lowest priority if more are held)."""
        self._cap = limit if self._cap is None else min(self._cap, limit)
        self._cut = None
        if self.held > self._cap:
            self._gather_lowest(self._cap)

    def _gather_lowest(self, limit: int) -> None:
        """Keep the ``limit`` held rows of lowest priority (in arrival order of the held parts).

        The kept rows are copied straight from the held parts into one new tensor, each part released
        once read: the transient is the kept rows only, not a consolidated copy of everything held plus
        a gathered copy plus a clone. The freed per-image chunks are handed back to the OS.
        """
        had_chunks = bool(self._chunks)
        parts = ([self._data] if self._data is not None else []) + self._chunks
        _note_freed(*parts)
        orders = ([self._order] if self._order is not None else []) + self._order_chunks
        known = np.empty(0, np.uint64)  # priorities already computed for the consolidated rows, if any
        if self._priority is not None and self._data is not None and self._priority.shape[0] == self._data.shape[0]:
            known = self._priority
        self._data, self._chunks, self._order_chunks = None, [], []
        order = np.concatenate(orders) if orders else np.empty(0, dtype=np.int64)
        priority = np.concatenate([known, row_priorities(self.salt, order[known.shape[0]:])])
        keep = _bottom_k(priority, order, limit)  # ascending positions in the held parts
        out = torch.empty(keep.shape[0], self.feature_dim, dtype=self.dtype)
        start = written = 0
        for i in range(len(parts)):
            m = int(parts[i].shape[0])
            lo, hi = (int(v) for v in np.searchsorted(keep, [start, start + m]))
            if hi > lo:  # straight into ``out``: no temporary copy of the selected rows
                index = torch.from_numpy(keep[lo:hi] - start)
                torch.index_select(parts[i], 0, index, out=out[written : written + hi - lo])
                written += hi - lo
            start += m
            parts[i] = None  # type: ignore[call-overload]
        self._data, self._order, self._priority = out, order[keep], priority[keep]
        if had_chunks:  # a pool's first cap frees many per-image chunks: trim before the next pool's
            _release_free_heap()

    def keep_at_most(self, cut: tuple[int, int]) -> None:
        """Drop every held row whose (priority, order key) is above ``cut`` (used to merge shards)."""
        if self.held == 0:
            return
        self._consolidate()
        assert self._data is not None and self._order is not None
        priority = self._priorities()
        mask = _at_most(priority, self._order, cut)
        if not bool(mask.all()):
            keep = np.flatnonzero(mask)
            self._data = self._data[torch.from_numpy(keep)].clone()
            self._order, self._priority = self._order[keep], priority[keep]
            self._cut = None

    @classmethod
    def from_parts(
        cls,
        feature_dim: int,
        dtype: torch.dtype,
        generator: np.random.Generator | int,
        parts: Iterable[tuple[torch.Tensor, np.ndarray]],
        seen: int,
        limit: int | None = None,
    ) -> FeaturePool:
        """A pool holding the union of ``parts`` [(rows [m, C], order keys [m])], as if offered ``seen`` rows.

        With ``limit``, the pool is capped (keeping the ``limit`` rows of lowest priority). Order keys
        must be unique across the parts (else ``ValueError``: the same image was added twice).
        """
        pool = cls(feature_dim, dtype, generator)
        for rows, order in parts:
            order = np.asarray(order, dtype=np.int64).reshape(-1)
            if rows.ndim != 2 or rows.shape[0] != order.shape[0] or (rows.shape[0] and rows.shape[1] != feature_dim):
                raise ValueError(
                    f"FeaturePool.from_parts: a part has rows {tuple(rows.shape)} and {order.shape[0]} order keys "
                    f"(expected [m, {feature_dim}] and [m])"
                )
            if rows.shape[0]:
                pool._chunks.append(rows.detach().to(device="cpu", dtype=dtype))
                pool._order_chunks.append(order)
        pool._consolidate(sort=True)
        assert pool._order is not None
        if pool._order.shape[0] > 1 and not bool(np.all(pool._order[1:] > pool._order[:-1])):
            raise ValueError("FeaturePool.from_parts: an order key appears twice (an image index was added twice?)")
        if pool._order.shape[0]:
            pool._next_order = int(pool._order[-1]) + 1
        if seen < pool.held:
            raise ValueError(f"FeaturePool.from_parts: seen={seen} is less than the {pool.held} rows given")
        pool.seen = int(seen)
        if limit is not None:
            pool.cap(int(limit))
            pool._consolidate(sort=True)
        return pool


# The pools hold at most this share of config.memory_budget_bytes. The rest is headroom for the
# transients of streaming: the image being added (its features and their split) and, when a pool is cut
# to the cap, the new tensor of its kept rows while its old rows are still resident. Measured on the
# VOC-sized stream of benchmarks/speed.py (2 GiB budget, glibc): the whole budget for the pools gave a
# peak RSS 0.3-0.5 GiB above the budget; 90% gave a peak ~1 MiB under it, too close; 85% leaves ~5%.
POOL_SHARE_OF_BUDGET = 0.85

_MALLOC_TRIM = None
_FREED_BYTES = 0  # pool storage freed since the heap was last trimmed (process-wide, as the heap is)
_TRIM_AFTER_BYTES = 8 * 1024**2
_TRIM_EVERY_IMAGES = 8


def _note_freed(*tensors: torch.Tensor | None) -> None:
    """Record pool storage about to be dropped (see :func:`_release_free_heap`)."""
    global _FREED_BYTES
    _FREED_BYTES += sum(t.numel() * t.element_size() for t in tensors if t is not None)


def _release_free_heap(force: bool = False) -> None:
    """Hand the C heap's free pages back to the OS (glibc ``malloc_trim``; a no-op elsewhere).

    Pools receive their rows as many per-image tensors and are re-allocated whenever they are capped or
    consolidated; glibc serves these from its heap and keeps freed heap pages resident. Without trimming,
    the process's RSS grows to about twice the memory budget (measured: 4.5 GB RSS for a 2 GiB budget on
    the VOC-sized stream of benchmarks/speed.py). Trims only once some MiB of pool storage were freed.
    """
    global _MALLOC_TRIM, _FREED_BYTES
    if not force and _FREED_BYTES < _TRIM_AFTER_BYTES:
        return
    _FREED_BYTES = 0
    if _MALLOC_TRIM is None:
        try:
            import ctypes

            _MALLOC_TRIM = ctypes.CDLL("libc.so.6").malloc_trim
        except (OSError, AttributeError):
            _MALLOC_TRIM = False
    if _MALLOC_TRIM:
        _MALLOC_TRIM(0)


_LEVEL_STEP = 16  # grid of levels: each 1/16 below the previous one


def _grid_floor(level: int, budget_rows: int) -> int:
    """The largest level <= ``level`` on the grid ``g0 = budget_rows, g(j+1) = g(j) - max(1, g(j) // 16)``.

    Integer arithmetic only: every process and machine finds the same level.
    """
    grid = budget_rows
    while grid > level:
        grid -= max(1, grid // _LEVEL_STEP)
    return max(grid, 1)


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

    Sharded building: give each image its index in the global image list (``add(..., index=i)``) and
    :meth:`merge` the builders of the shards (or use :mod:`lpcam_core.distributed` under torchrun):
    the merged builder equals one builder fed the whole list, in and beyond the memory budget.
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
        base = np.int64(index) << np.int64(_POSITION_BITS)
        for cam, key in zip(cams, keys.tolist()):
            fg, bg, fg_pos, bg_pos = _split_with_positions(features, cam, tau)
            self._pool("class", key).offer(fg, base | fg_pos)
            self._pool("context", key).offer(bg, base | bg_pos)
        self.images_seen += 1
        self._next_index = index + 1
        self._enforce_budget()
        # per-image temporaries of varying sizes fragment the heap too: trim every few images as well
        _release_free_heap(force=self.images_seen % _TRIM_EVERY_IMAGES == 0)

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
        if features.shape[1] * features.shape[2] >= 2**_POSITION_BITS:
            raise ValueError(f"PrototypeBuilder.add: feature grid {tuple(features.shape[1:])} has 2**32 positions or more")
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
        level = _grid_floor(_water_level(held, budget), budget)
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
        return _grid_floor(_water_level(counts, budget), budget)

    # ------------------------------------------------------------------ merging shards
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
        _release_free_heap()  # if consolidating the pool freed its per-image chunks
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


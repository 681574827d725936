"""Bounded feature pools: bottom-k sampling keyed by a hash, and the merge of pools built in shards.

A :class:`FeaturePool` holds the feature rows offered to one (kind, class) pool of a
:class:`~lpcam_core.prototypes.PrototypeBuilder`. While everything fits, it holds every row in
arrival order. Once capped at ``L`` rows it keeps a seeded uniform sample without replacement of
``L`` of the rows it was offered: every row gets a priority, a 64-bit hash of (pool salt, order key)
(the order key is ``image index << 32 | position in the feature grid``), and the pool keeps its ``L``
rows of lowest priority. The kept set is a pure function of the salt and of the rows offered, not of
their order nor of how the images were split between processes: pools built on shards merge
(:func:`merge_cut`, :meth:`FeaturePool.from_parts`) into exactly the pool one process would hold.

The common cap of all pools (:func:`water_level`, rounded down to a grid by :func:`grid_floor`) keeps
the pools of all classes within ``POOL_SHARE_OF_BUDGET`` of the memory budget.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np
import torch

__all__ = [
    "FeaturePool",
    "row_priorities",
    "bottom_k",
    "cut_of",
    "at_most",
    "merge_cut",
    "water_level",
    "grid_floor",
    "note_freed",
    "release_free_heap",
    "POOL_SHARE_OF_BUDGET",
    "TRIM_EVERY_IMAGES",
]


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


def bottom_k(priority: np.ndarray, order: np.ndarray, k: int) -> np.ndarray:
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


def cut_of(priority: np.ndarray, order: np.ndarray) -> tuple[int, int]:
    """The largest (priority, order) pair of a non-empty set of rows."""
    top = priority.max()
    return int(top), int(order[priority == top].max())


def at_most(priority: np.ndarray, order: np.ndarray, cut: tuple[int, int]) -> np.ndarray:
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
            note_freed(*parts)
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
                note_freed(self._data)
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
                self._cut = cut_of(held_priority, self._order)
            enter = np.flatnonzero(at_most(priority, order, self._cut))
            if enter.size == 0:
                return
            rows, order, priority = rows[torch.from_numpy(enter)], order[enter], priority[enter]
        keep = bottom_k(np.concatenate([held_priority, priority]), np.concatenate([self._order, order]), self._cap)
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
            note_freed(self._data)
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
        note_freed(*parts)
        orders = ([self._order] if self._order is not None else []) + self._order_chunks
        known = np.empty(0, np.uint64)  # priorities already computed for the consolidated rows, if any
        if self._priority is not None and self._data is not None and self._priority.shape[0] == self._data.shape[0]:
            known = self._priority
        self._data, self._chunks, self._order_chunks = None, [], []
        order = np.concatenate(orders) if orders else np.empty(0, dtype=np.int64)
        priority = np.concatenate([known, row_priorities(self.salt, order[known.shape[0]:])])
        keep = bottom_k(priority, order, limit)  # ascending positions in the held parts
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
            release_free_heap()

    def keep_at_most(self, cut: tuple[int, int]) -> None:
        """Drop every held row whose (priority, order key) is above ``cut`` (used to merge shards)."""
        if self.held == 0:
            return
        self._consolidate()
        assert self._data is not None and self._order is not None
        priority = self._priorities()
        mask = at_most(priority, self._order, cut)
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
TRIM_EVERY_IMAGES = 8


def note_freed(*tensors: torch.Tensor | None) -> None:
    """Record pool storage about to be dropped (see :func:`release_free_heap`)."""
    global _FREED_BYTES
    _FREED_BYTES += sum(t.numel() * t.element_size() for t in tensors if t is not None)


def release_free_heap(force: bool = False) -> None:
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


def grid_floor(level: int, budget_rows: int) -> int:
    """The largest level <= ``level`` on the grid ``g0 = budget_rows, g(j+1) = g(j) - max(1, g(j) // 16)``.

    Integer arithmetic only: every process and machine finds the same level.
    """
    grid = budget_rows
    while grid > level:
        grid -= max(1, grid // _LEVEL_STEP)
    return max(grid, 1)


def water_level(held: Sequence[int], budget_rows: int) -> int:
    """Largest L with sum(min(h, L)) <= budget_rows."""
    ordered = sorted(held)
    remaining, pools = budget_rows, len(ordered)
    for i, h in enumerate(ordered):
        share = remaining // (pools - i)
        if h > share:
            return max(share, 1)
        remaining -= h
    return max(ordered) if ordered else budget_rows


def merge_cut(pieces: Iterable[tuple[np.ndarray, np.ndarray]], limit: int) -> tuple[int, int] | None:
    """The cut a pool merged from ``pieces`` keeps at ``limit`` rows.

    Args:
        pieces: (priorities [m] uint64, order keys [m] int64) of the rows each shard holds of one pool
            (each shard already capped at ``limit``).
        limit: the common cap.

    Returns:
        The largest (priority, order key) of the ``limit`` rows of lowest priority over all pieces (each
        shard then keeps its rows at most this cut: :meth:`FeaturePool.keep_at_most`), or None when all
        the rows fit.
    """
    pieces = list(pieces)
    priority = np.concatenate([p for p, _ in pieces]) if pieces else np.empty(0, np.uint64)
    order = np.concatenate([o for _, o in pieces]) if pieces else np.empty(0, np.int64)
    if priority.shape[0] <= limit:
        return None
    keep = bottom_k(priority, order, limit)
    return cut_of(priority[keep], order[keep])

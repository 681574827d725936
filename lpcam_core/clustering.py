"""Cosine K-means (:func:`kmeans`): seeded, bounded in iterations and memory, on any device.

Rows are assigned to the centre of highest cosine similarity; each centre is the raw (un-normalised)
mean of its member rows, as in the official release (its K-means dependency averages raw features and
LPCAM scores those raw means with the classifier). Memory is O(N*k + k*C): the rows are visited in
chunks, never as an N x k x C temporary.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .finite import all_finite

__all__ = ["KMeansResult", "kmeans"]

logger = logging.getLogger(__name__)

# Rows per chunk are chosen so one float32 chunk of features takes about this many bytes.
_CHUNK_BYTES = 64 * 1024**2


@dataclass
class KMeansResult:
    """Output of :func:`kmeans`.

    Attributes:
        centers: [k, C] float32, raw mean of each cluster's member rows.
        unit_centers: [k, C] float32, ``centers`` L2-normalised (the directions used for assignment).
        labels: [N] int64, cluster of each row.
        inertia: sum over rows of ``1 - cos(row, its centre)``.
        n_iter: Lloyd iterations run.
    """

    centers: torch.Tensor
    unit_centers: torch.Tensor
    labels: torch.Tensor
    inertia: float
    n_iter: int


def chunk_rows(n: int, c: int) -> int:
    return max(256, min(n, _CHUNK_BYTES // max(4 * c, 1)))


def _inverse_norms(x: torch.Tensor, chunk: int) -> torch.Tensor:
    """[N] float32: 1 / ||row|| (0 for an all-zero row, whose cosine with anything is then 0)."""
    out = torch.empty(x.shape[0], dtype=torch.float32, device=x.device)
    for start in range(0, x.shape[0], chunk):
        norms = x[start : start + chunk].float().norm(dim=1)
        out[start : start + chunk] = torch.where(norms > 0, 1.0 / norms.clamp_min(1e-30), torch.zeros_like(norms))
    return out


def _assign(x: torch.Tensor, inv_norm: torch.Tensor, unit_centers: torch.Tensor, chunk: int):
    """Best centre and its cosine for every row. Returns (labels [N] int64, best_cos [N] float32)."""
    n = x.shape[0]
    labels = torch.empty(n, dtype=torch.long, device=x.device)
    best = torch.empty(n, dtype=torch.float32, device=x.device)
    for start in range(0, n, chunk):
        sims = (x[start : start + chunk].float() @ unit_centers.T) * inv_norm[start : start + chunk, None]
        value, index = sims.max(dim=1)
        labels[start : start + chunk] = index
        best[start : start + chunk] = value
    return labels, best


def _member_sums(x: torch.Tensor, labels: torch.Tensor, k: int, chunk: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-cluster sums [k, C] float32 and counts [k] of the raw rows (deterministic on every device)."""
    sums = torch.zeros(k, x.shape[1], dtype=torch.float32, device=x.device)
    for start in range(0, x.shape[0], chunk):
        rows = x[start : start + chunk].float()
        lab = labels[start : start + chunk]
        if x.device.type == "cpu":
            sums.index_add_(0, lab, rows)  # sequential on the CPU, hence deterministic
        else:  # atomics in index_add_ are not deterministic on GPUs; a one-hot matmul is
            onehot = F.one_hot(lab, k).to(torch.float32)
            sums += onehot.T @ rows
    counts = torch.bincount(labels, minlength=k)
    return sums, counts


def _kmeans_pp(x: torch.Tensor, inv_norm: torch.Tensor, k: int, generator: torch.Generator, chunk: int) -> torch.Tensor:
    """Greedy k-means++ seeding, as scikit-learn's (``2 + ln k`` candidates per step, the one lowering the
    potential most is kept). Candidates are drawn with probability proportional to D^2, the squared
    distance to the nearest chosen centre; for unit rows D^2 = 2 (1 - cos) (chordal distance on the
    sphere), so the weights are ``1 - cos``: scikit-learn's k-means++ on L2-normalised rows.

    One pass over the rows per centre; memory O(N * trials). Draws come from ``generator`` (a CPU
    generator, so a seed gives the same picks on every device). Returns [k, C] float32 unit centres.
    """
    n = x.shape[0]
    trials = 2 + int(math.log(k))

    def distances(units: torch.Tensor, closest: torch.Tensor | None) -> torch.Tensor:
        """[t, N]: 1 - cos of every row to each of ``units`` [t, C], capped by ``closest`` [N]."""
        out = torch.empty(units.shape[0], n, dtype=torch.float32, device=x.device)
        for start in range(0, n, chunk):
            cos = (x[start : start + chunk].float() @ units.T) * inv_norm[start : start + chunk, None]
            dist = (1.0 - cos).clamp_min_(0.0).T
            if closest is not None:
                dist = torch.minimum(dist, closest[None, start : start + chunk])
            out[:, start : start + chunk] = dist
        return out

    first = int(torch.randint(n, (1,), generator=generator).item())
    centers = [F.normalize(x[first].float(), dim=0)]
    closest = distances(centers[0][None], None)[0]
    for _ in range(1, k):
        cumulative = torch.cumsum(closest.cpu().double(), 0)
        draws = torch.rand(trials, dtype=torch.float64, generator=generator) * cumulative[-1]
        candidates = torch.searchsorted(cumulative, draws).clamp_max_(n - 1)
        units = F.normalize(x[candidates.to(x.device)].float(), dim=1)
        capped = distances(units, closest)  # [trials, N]
        best = int(torch.argmin(capped.double().sum(1)))
        closest = capped[best].clone()
        centers.append(units[best])
    return torch.stack(centers)


def _reseed_empty(labels: torch.Tensor, best: torch.Tensor, counts: torch.Tensor) -> bool:
    """Give each empty cluster the worst-fitting row of a cluster that can spare one. Mutates ``labels``."""
    empty = (counts == 0).nonzero().flatten().tolist()
    if not empty:
        return False
    counts = counts.clone()
    order = torch.argsort(best, stable=True).tolist()  # worst-fitting rows first
    cursor = 0
    for cluster in empty:
        while cursor < len(order) and counts[labels[order[cursor]]] <= 1:
            cursor += 1
        if cursor == len(order):
            break
        row = order[cursor]
        counts[labels[row]] -= 1
        labels[row] = cluster
        counts[cluster] += 1
        cursor += 1
    logger.debug("kmeans: re-seeded %d empty cluster(s)", len(empty))
    return True


def _validate(x: torch.Tensor, k: int, max_iter: int, n_init: int, tol: float, seed: int = 0) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"kmeans: x must be a torch.Tensor [N, C], got {type(x).__name__}")
    if x.ndim != 2:
        raise ValueError(f"kmeans: x must have shape [N, C], got {tuple(x.shape)}")
    if not x.is_floating_point():
        raise TypeError(f"kmeans: x must be floating point (float16, bfloat16 or float32), got {x.dtype}")
    if isinstance(k, bool) or not isinstance(k, int):
        raise TypeError(f"kmeans: k must be an int (the number of clusters), got {type(k).__name__} {k!r}")
    if k < 1:
        raise ValueError(f"kmeans: k must be an int >= 1, got {k!r}")
    if x.shape[1] == 0:
        raise ValueError(f"kmeans: x has no feature channels (shape {tuple(x.shape)}): nothing to cluster")
    if k > x.shape[0]:
        raise ValueError(f"kmeans: k={k} is larger than the number of rows ({x.shape[0]})")
    for name, value in (("max_iter", max_iter), ("n_init", n_init), ("seed", seed)):
        least = 0 if name == "seed" else 1
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"kmeans: {name} must be an int >= {least}, got {value!r}")
        if value < least:
            raise ValueError(f"kmeans: {name} must be an int >= {least}, got {value!r}")
    if isinstance(tol, bool) or not isinstance(tol, (int, float)) or not tol >= 0:
        raise ValueError(f"kmeans: tol must be a number >= 0, got {tol!r}")
    if not all_finite(x):
        raise ValueError("kmeans: x holds NaN or inf values")


def kmeans(
    x: torch.Tensor,
    k: int,
    *,
    seed: int = 0,
    n_init: int = 1,
    max_iter: int = 100,
    tol: float = 1e-4,
) -> KMeansResult:
    """Cosine K-means over the rows of ``x``.

    Args:
        x: [N, C] rows on any device, float16/bfloat16/float32 (maths in float32).
        k: number of clusters, at most N.
        seed: seeds k-means++ through a private ``torch.Generator`` (the global RNG is untouched).
        n_init: restarts with seeds ``seed, seed + 1, ...``; the lowest inertia wins.
        max_iter: cap on Lloyd iterations.
        tol: stop when every unit centre moves less than this (squared L2), or when no label changes.

    Returns:
        :class:`KMeansResult`; same inputs and seed give identical results.

    Example:
        >>> res = kmeans(torch.randn(1000, 64), 4, seed=0)
        >>> res.centers.shape, res.labels.shape
        (torch.Size([4, 64]), torch.Size([1000]))
    """
    _validate(x, k, max_iter, n_init, tol, seed)
    x = x.detach()
    n, c = x.shape
    chunk = chunk_rows(n, c)
    inv_norm = _inverse_norms(x, chunk)
    best_result: KMeansResult | None = None
    for restart in range(n_init):
        generator = torch.Generator().manual_seed(int(seed) + restart)
        result = _lloyd(x, inv_norm, k, generator, max_iter, tol, chunk)
        if best_result is None or result.inertia < best_result.inertia:
            best_result = result
    assert best_result is not None
    return best_result


def _lloyd(x, inv_norm, k, generator, max_iter, tol, chunk) -> KMeansResult:
    unit = _kmeans_pp(x, inv_norm, k, generator, chunk)
    previous = None
    n_iter = 0
    for n_iter in range(1, max_iter + 1):
        labels, best = _assign(x, inv_norm, unit, chunk)
        sums, counts = _member_sums(x, labels, k, chunk)
        if _reseed_empty(labels, best, counts):
            sums, counts = _member_sums(x, labels, k, chunk)
        centers = sums / counts.clamp_min(1).to(torch.float32)[:, None]
        new_unit = F.normalize(centers, dim=1)
        shift = float(((new_unit - unit) ** 2).sum(dim=1).max())
        unit = new_unit
        if (previous is not None and torch.equal(previous, labels)) or shift <= tol:
            break
        previous = labels
    else:
        logger.debug("kmeans: reached max_iter=%d before converging", max_iter)
    own = torch.zeros(x.shape[0], dtype=torch.float32, device=x.device)
    for start in range(0, x.shape[0], chunk):
        # cos to the own centre from the [chunk, k] similarities: no [chunk, C] gather of centres
        sims = x[start : start + chunk].float() @ unit.T
        own[start : start + chunk] = sims.gather(1, labels[start : start + chunk, None])[:, 0] * inv_norm[start : start + chunk]
    inertia = float((1.0 - own).sum())
    return KMeansResult(centers=centers, unit_centers=unit, labels=labels, inertia=inertia, n_iter=n_iter)

"""Seed evaluation: confusion matrices, IoU/precision/recall, CAM -> label maps, threshold sweeps.

The rules reproduce the hosts' evaluators without chainercv:

* :func:`confusion_matrix` counts like ``chainercv.evaluations.calc_semantic_segmentation_confusion``
  (rows = ground truth, columns = prediction; the matrix grows to the largest label seen).
* :func:`cams_to_label` is IRN's ``step.eval_cam`` rule (a constant background plane at the
  threshold in front of the class maps, argmax, index -> class id).

Everything streams: :func:`accumulate_confusions` walks the samples once and fills one
:class:`ConfusionMatrix` per threshold; evaluation and sweeps, in memory or from files, are thin
wrappers of it. All scores are fractions in [0, 1]; callers format percentages.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any, Literal, Union

import numpy as np
import torch
from tqdm import tqdm

from ..formats import class_keys, load_irn_cam
from ..io import load_label_png

__all__ = [
    "ConfusionMatrix",
    "confusion_matrix",
    "iou_from_confusion",
    "scores_from_confusion",
    "bootstrap_difference",
    "cams_to_label",
    "accumulate_confusions",
    "evaluate_from_arrays",
    "sweep_from_arrays",
    "evaluate_seeds",
    "sweep_thresholds",
]

logger = logging.getLogger(__name__)

Background = Literal["plane", "channel0", "drop_channel0"]
_BACKGROUNDS = ("plane", "channel0", "drop_channel0")
PathLike = Union[str, "os.PathLike[str]"]


def _to_numpy(x: Any) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        return x.detach().cpu().numpy()
    return np.asarray(x)


def _nanmean(x: np.ndarray) -> float:
    """Mean over the non-NaN entries; NaN (without a warning) when there are none."""
    finite = x[~np.isnan(x)]
    return float(finite.mean()) if finite.size else float("nan")


# --------------------------------------------------------------------------- confusion matrix


class ConfusionMatrix:
    """Streaming confusion matrix; ``matrix[i, j]`` counts pixels of gt class i predicted as j.

    Ignored pixels: ground truth ``< 0`` (chainercv's ignore value -1) and ground truth
    ``== ignore_index`` (255 by default, VOC's boundary value as read from the PNGs). Ignored
    ground-truth values never enlarge the matrix.

    Args:
        num_classes: fixed size (labels must be below it; ``ValueError`` otherwise), or ``None``
            to grow like chainercv to ``max(label) + 1`` over everything seen, where prediction
            labels count at every pixel (also ignored ones) exactly as chainercv does.
        ignore_index: extra ignored ground-truth value, or ``None`` for only ``< 0``.
    """

    def __init__(self, num_classes: int | None = None, *, ignore_index: int | None = 255) -> None:
        if num_classes is not None:
            if isinstance(num_classes, bool) or not isinstance(num_classes, (int, np.integer)):
                raise TypeError(f"num_classes must be an int or None, got {type(num_classes).__name__}")
            if num_classes < 1:
                raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        if ignore_index is not None and not isinstance(ignore_index, (int, np.integer)):
            raise TypeError(f"ignore_index must be an int or None, got {type(ignore_index).__name__}")
        self._fixed = num_classes is not None
        n = int(num_classes) if num_classes is not None else 0
        self._matrix = np.zeros((n, n), dtype=np.int64)
        self.ignore_index = None if ignore_index is None else int(ignore_index)

    @property
    def num_classes(self) -> int:
        """Current size n of the (n, n) matrix."""
        return self._matrix.shape[0]

    @property
    def matrix(self) -> np.ndarray:
        """A copy of the (n, n) int64 counts."""
        return self._matrix.copy()

    def scores(self) -> dict[str, Any]:
        """:func:`scores_from_confusion` of the current counts."""
        return scores_from_confusion(self._matrix)

    def __repr__(self) -> str:
        mode = "fixed" if self._fixed else "growing"
        return f"ConfusionMatrix(num_classes={self.num_classes}, {mode}, pixels={int(self._matrix.sum())})"

    def valid_mask(self, gt: np.ndarray) -> np.ndarray:
        """Boolean mask (same shape as ``gt``) of the pixels that are counted."""
        mask = gt >= 0
        if self.ignore_index is not None:
            mask &= gt != self.ignore_index
        return mask

    def update(self, pred: Any, gt: Any) -> None:
        """Add one image.

        Args:
            pred: (H, W) integer predicted labels (numpy or torch), >= 0 where counted.
            gt: (H, W) integer ground truth; ``< 0`` and ``ignore_index`` are ignored.

        Raises:
            ValueError: not 2-D, shapes differ, negative prediction on a counted pixel, or a
                label >= ``num_classes`` in fixed mode.
            TypeError: non-integer labels.
        """
        self._update(pred, gt, "update")

    def _update(self, pred: Any, gt: Any, where: str) -> None:
        p = _to_numpy(pred)
        g = _to_numpy(gt)
        for name, arr in (("pred", p), ("gt", g)):
            if not np.issubdtype(arr.dtype, np.integer):
                raise TypeError(f"{where}: {name} labels must be an integer array, got dtype {arr.dtype}")
        if p.ndim != 2 or g.ndim != 2:
            raise ValueError(f"{where}: label maps must be 2-D (H, W), got pred {p.shape} and gt {g.shape}")
        if p.shape != g.shape:
            raise ValueError(f"{where}: pred shape {p.shape} differs from gt shape {g.shape}")
        mask = self.valid_mask(g)
        g_v = g[mask].astype(np.int64, copy=False)
        p_v = p[mask].astype(np.int64, copy=False)
        if p_v.size and p_v.min() < 0:
            raise ValueError(f"{where}: pred has negative labels on counted pixels (min {p_v.min()})")
        if self._fixed:
            top = max(int(g_v.max(initial=-1)), int(p_v.max(initial=-1)))
            if top >= self.num_classes:
                raise ValueError(f"{where}: label {top} is out of range for num_classes={self.num_classes}")
        else:
            top = max(int(g_v.max(initial=-1)), int(p.max()) if p.size else -1)
            self._grow(top + 1)
        self._add_codes(g_v * self.num_classes + p_v)

    def _grow(self, size: int) -> None:
        n = self.num_classes
        if size > n:
            grown = np.zeros((size, size), dtype=np.int64)
            grown[:n, :n] = self._matrix
            self._matrix = grown

    def _add_codes(self, codes: np.ndarray) -> None:
        """Add flat indices ``gt * n + pred`` (already validated, all < n * n)."""
        n = self.num_classes
        if codes.size:
            self._matrix += np.bincount(codes, minlength=n * n).reshape(n, n)


def confusion_matrix(
    pred_labels: Iterable[Any],
    gt_labels: Iterable[Any],
    *,
    num_classes: int | None = None,
    ignore_index: int | None = 255,
) -> np.ndarray:
    """Confusion matrix of paired label maps, like chainercv's ``calc_semantic_segmentation_confusion``.

    Same shape and counts as chainercv on its inputs (gt -1 ignored, size = largest label
    seen in pred or gt + 1); in addition gt ``== ignore_index`` (255) is ignored and does not
    enlarge the matrix. See :class:`ConfusionMatrix`.

    Args:
        pred_labels: iterable of (H, W) integer predictions.
        gt_labels: iterable of (H, W) integer ground truths, same length.
        num_classes: fixed size instead of growing.
        ignore_index: extra ignored gt value (``None``: only ``< 0``).

    Returns:
        (n, n) int64 matrix, rows = ground truth, columns = prediction.

    Raises:
        ValueError: a pair whose shapes differ or are not 2-D (the message gives its index),
            or iterables of different lengths.
    """
    cm = ConfusionMatrix(num_classes, ignore_index=ignore_index)
    preds, gts = iter(pred_labels), iter(gt_labels)
    index = 0
    sentinel = object()
    while True:
        p = next(preds, sentinel)
        g = next(gts, sentinel)
        if p is sentinel or g is sentinel:
            if p is not g:
                longer = "pred_labels" if g is sentinel else "gt_labels"
                raise ValueError(f"pred_labels and gt_labels differ in length: {longer} has more than {index} items")
            break
        cm._update(p, g, f"pair {index}")
        index += 1
    return cm._matrix


# --------------------------------------------------------------------------- scores


def _check_confusion(conf: Any) -> np.ndarray:
    c = _to_numpy(conf)
    if c.ndim != 2 or c.shape[0] != c.shape[1]:
        raise ValueError(f"confusion matrix must be square 2-D (n, n), got shape {c.shape}")
    return c.astype(np.float64)


def iou_from_confusion(conf: Any) -> np.ndarray:
    """Per-class IoU = N_ii / (sum_j N_ij + sum_j N_ji - N_ii).

    Args:
        conf: (n, n) confusion matrix (rows gt, columns prediction).

    Returns:
        (n,) float64; NaN for a class absent from both gt and prediction (as chainercv).
    """
    c = _check_confusion(conf)
    tp = np.diag(c)
    with np.errstate(divide="ignore", invalid="ignore"):
        return tp / (c.sum(axis=1) + c.sum(axis=0) - tp)


def scores_from_confusion(conf: Any) -> dict[str, Any]:
    """IoU, precision and recall from a confusion matrix (fractions in [0, 1]).

    Definitions (class 0 is background):

    * ``iou``: (n,) per class, NaN where the class is in neither gt nor prediction.
    * ``miou``: NaN-mean of ``iou`` over all classes including background (IRN's ``eval_cam``).
    * ``precision``: (n,) TP / predicted pixels, NaN where the class is never predicted.
    * ``recall``: (n,) TP / gt pixels, NaN where the class is absent from gt.
    * ``mean_precision``, ``mean_recall``: NaN-means over the foreground classes 1..n-1 (the
      paper's seed precision/recall, averaged over classes).
    * ``fp`` = 1 - ``mean_precision`` and ``fn`` = 1 - ``mean_recall`` (the paper's FP/FN).
    * ``pixel_accuracy``: correctly labelled counted pixels / counted pixels.

    Scalars are Python floats (NaN when undefined, e.g. an empty matrix).
    """
    c = _check_confusion(conf)
    tp = np.diag(c)
    gt_count = c.sum(axis=1)
    pred_count = c.sum(axis=0)
    with np.errstate(divide="ignore", invalid="ignore"):
        iou = tp / (gt_count + pred_count - tp)
        precision = tp / pred_count
        recall = tp / gt_count
    mean_precision = _nanmean(precision[1:])
    mean_recall = _nanmean(recall[1:])
    total = c.sum()
    return {
        "iou": iou,
        "miou": _nanmean(iou),
        "precision": precision,
        "recall": recall,
        "mean_precision": mean_precision,
        "mean_recall": mean_recall,
        "fp": 1.0 - mean_precision,
        "fn": 1.0 - mean_recall,
        "pixel_accuracy": float(tp.sum() / total) if total else float("nan"),
    }


def _batched_scores(conf: np.ndarray) -> dict[str, np.ndarray]:
    """``miou``, ``mean_precision``, ``mean_recall`` ``[B]`` of confusion matrices ``[B, n, n]``.

    NaN-means as :func:`scores_from_confusion` (an all-NaN row gives NaN, without a warning).
    """
    import warnings

    tp = np.diagonal(conf, axis1=1, axis2=2)
    gt_count, pred_count = conf.sum(axis=2), conf.sum(axis=1)
    with np.errstate(divide="ignore", invalid="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return {
            "miou": np.nanmean(tp / (gt_count + pred_count - tp), axis=1),
            "mean_precision": np.nanmean((tp / pred_count)[:, 1:], axis=1),
            "mean_recall": np.nanmean((tp / gt_count)[:, 1:], axis=1),
        }


def bootstrap_difference(
    confs_a: Any,
    confs_b: Any,
    *,
    num_samples: int = 1000,
    level: float = 0.95,
    seed: int = 0,
) -> dict[str, dict[str, float]]:
    """Paired bootstrap over images of the score difference ``b - a`` (e.g. LPCAM - CAM).

    Each resample draws the images with replacement, the same draw for both methods, sums
    their per-image confusion matrices and scores them: the interval says how much a gain
    measured on these images could move with other images of the same kind. Thresholds are
    held fixed (choose them before, e.g. each method's best on all images), so the interval
    does not include the threshold choice.

    Args:
        confs_a: Per-image confusion matrices ``[N, n, n]`` of method a (rows ground truth).
        confs_b: The same images' matrices ``[N, n, n]`` of method b.
        num_samples: Bootstrap resamples.
        level: Coverage of the percentile interval.
        seed: Seed of the resampling.

    Returns:
        ``{"miou" | "mean_precision" | "mean_recall": {"difference", "low", "high"}}``:
        fractions, the difference on all images and its percentile interval.

    Raises:
        ValueError: shapes that differ or are not ``[N, n, n]`` with ``N >= 1``, ``num_samples
            < 1`` or ``level`` outside (0, 1).
    """
    a = _to_numpy(confs_a).astype(np.float64)
    b = _to_numpy(confs_b).astype(np.float64)
    if a.ndim != 3 or a.shape[1] != a.shape[2] or a.shape[0] < 1:
        raise ValueError(f"confs_a must be per-image confusion matrices [N, n, n] with N >= 1, got shape {a.shape}")
    if b.shape != a.shape:
        raise ValueError(f"confs_b must have the shape of confs_a {a.shape}, got {b.shape}")
    if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < 1:
        raise ValueError(f"num_samples must be an int >= 1, got {num_samples!r}")
    if not 0.0 < level < 1.0:
        raise ValueError(f"level must be in (0, 1), got {level}")
    n_images, n = a.shape[0], a.shape[1]
    rng = np.random.default_rng(seed)
    # Counts of each image in each resample [S, N]: one multinomial draw per resample.
    weights = rng.multinomial(n_images, np.full(n_images, 1.0 / n_images), size=num_samples).astype(np.float64)
    resampled_a = (weights @ a.reshape(n_images, -1)).reshape(num_samples, n, n)
    resampled_b = (weights @ b.reshape(n_images, -1)).reshape(num_samples, n, n)
    full_a, full_b = scores_from_confusion(a.sum(axis=0)), scores_from_confusion(b.sum(axis=0))
    boot_a, boot_b = _batched_scores(resampled_a), _batched_scores(resampled_b)
    tail = 100.0 * (1.0 - level) / 2.0
    out = {}
    for key in ("miou", "mean_precision", "mean_recall"):
        diff = boot_b[key] - boot_a[key]
        diff = diff[~np.isnan(diff)]
        low, high = np.percentile(diff, [tail, 100.0 - tail]) if diff.size else (np.nan, np.nan)
        out[key] = {"difference": full_b[key] - full_a[key], "low": float(low), "high": float(high)}
    return out


# --------------------------------------------------------------------------- CAM -> labels


def _check_background(background: str) -> None:
    if background not in _BACKGROUNDS:
        raise ValueError(f"background must be one of {list(_BACKGROUNDS)}, got {background!r}")


def _check_threshold(threshold: Any, name: str = "threshold") -> float:
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float, np.integer, np.floating)):
        raise TypeError(f"{name} must be a number, got {type(threshold).__name__}")
    if not np.isfinite(threshold):
        raise ValueError(f"{name} must be finite, got {threshold}")
    return threshold


def _decompose(keys: Any, high_res: Any, background: str, where: str) -> tuple[np.ndarray | None, np.ndarray]:
    """Split CAMs into the per-pixel best foreground score and its class label.

    Returns:
        ``(score, label)``: (H, W) best foreground score (``None`` for ``"channel0"``, whose
        labels need no threshold) and (H, W) int64 label (the class id a pixel gets when it is
        foreground; for ``"channel0"`` the final label).
    """
    _check_background(background)
    k = class_keys(keys, where)
    try:
        hr = _to_numpy(high_res)
    except (ValueError, TypeError, RecursionError) as err:
        raise ValueError(f"{where}: high_res is not an array ({type(err).__name__})") from None
    if hr.ndim != 3:
        raise ValueError(f"{where}: high_res must be 3-D [c, H, W], got shape {hr.shape}")
    if not np.issubdtype(hr.dtype, np.floating):
        hr = hr.astype(np.float64)
    n = k.size
    expected = n if background == "plane" else n + 1
    if hr.shape[0] != expected:
        hint = " (AMN files hold a background channel 0: use background='drop_channel0' or 'channel0')" if (
            background == "plane" and hr.shape[0] == n + 1
        ) else ""
        raise ValueError(
            f"{where}: high_res has {hr.shape[0]} channels, expected {expected} for {n} keys "
            f"with background={background!r}{hint}"
        )
    if background == "drop_channel0":
        hr = hr[1:]
    lut = k + 1
    if background == "channel0":
        lut = np.concatenate([np.zeros(1, np.int64), lut])
    if hr.shape[0] == 0:
        height, width = hr.shape[1:]
        return np.full((height, width), -np.inf, dtype=hr.dtype), np.zeros((height, width), np.int64)
    score = hr.max(axis=0)
    if np.isnan(score).any():
        raise ValueError(f"{where}: high_res contains NaN")
    label = lut[hr.argmax(axis=0)]
    return (None if background == "channel0" else score), label


def _threshold_labels(score: np.ndarray, label: np.ndarray, threshold: float, base: Any = 0) -> np.ndarray:
    """Foreground label where the score beats the background plane, else ``base``.

    The threshold is cast to the maps' dtype first, as IRN's ``np.pad`` does, so a float32 map
    equal to float32(threshold) ties with the plane, and ties go to background (argmax keeps
    the first maximum).
    """
    return np.where(score > score.dtype.type(threshold), label, base)


def cams_to_label(
    keys: Any, high_res: Any, threshold: float | None = None, *, background: Background = "plane"
) -> np.ndarray:
    """Seed label map from class CAMs (IRN ``eval_cam`` rule).

    Args:
        keys: [n] 0-based foreground classes (numpy or torch int).
        high_res: [c, H, W] maps (numpy or torch).
        threshold: background score; unused (may be ``None``) for ``"channel0"``.
        background: ``"plane"``: c == n, a constant plane at ``threshold`` is stacked in front,
            argmax, index i > 0 -> ``keys[i-1] + 1``; ``"drop_channel0"``: c == n + 1, channel 0
            is dropped, then ``"plane"`` (AMN's ``eval_amn_cam``); ``"channel0"``: c == n + 1,
            channel 0 is the background score itself (argmax over all channels).

    Returns:
        (H, W) int64 labels, 0 = background. With no classes, all background.
    """
    score, label = _decompose(keys, high_res, background, "cams_to_label")
    if score is None:
        return label
    if threshold is None:
        raise ValueError(f"cams_to_label: threshold is required with background={background!r}")
    return _threshold_labels(score, label, _check_threshold(threshold)).astype(np.int64, copy=False)


# --------------------------------------------------------------------------- streaming evaluation


def accumulate_confusions(
    samples: Iterable[tuple[Any, Any, Any]],
    thresholds: Sequence[float],
    *,
    num_classes: int = 21,
    background: Background = "plane",
    ignore_index: int | None = 255,
    progress: bool = False,
) -> tuple[list[ConfusionMatrix], int]:
    """Stream samples once, filling one fixed-size confusion matrix per threshold.

    Args:
        samples: iterable of ``(keys [n], high_res [c, H, W], gt (H, W))``; may also be
            ``(name, keys, high_res, gt)``, the name being used in error messages.
        thresholds: background thresholds (ignored for ``"channel0"``: give one value).
        num_classes: matrix size including background (VOC 21, COCO 81).
        background: see :func:`cams_to_label`.
        ignore_index: ignored gt value besides ``< 0``.
        progress: show a tqdm bar (hidden when stderr is not a terminal).

    Returns:
        ``(matrices, num_samples)``, ``matrices[i]`` for ``thresholds[i]``.
    """
    _check_background(background)
    thrs = [_check_threshold(t, "thresholds[]") for t in thresholds]
    if not thrs:
        raise ValueError("thresholds must not be empty")
    if background == "channel0" and len(thrs) > 1:
        raise ValueError("background='channel0' uses no threshold: sweeping thresholds is meaningless")
    mats = [ConfusionMatrix(num_classes, ignore_index=ignore_index) for _ in thrs]
    n = mats[0].num_classes
    total = len(samples) if hasattr(samples, "__len__") else None  # type: ignore[arg-type]
    count = 0
    for index, sample in enumerate(tqdm(samples, total=total, disable=None if progress else True, desc="eval")):
        if len(sample) == 4:
            name, keys, high_res, gt = sample
            where = f"sample {name!r}"
        elif len(sample) == 3:
            keys, high_res, gt = sample
            where = f"sample {index}"
        else:
            raise ValueError(f"sample {index}: expected (keys, high_res, gt), got {len(sample)} items")
        score, label = _decompose(keys, high_res, background, where)
        g = _to_numpy(gt)
        if not np.issubdtype(g.dtype, np.integer):
            raise TypeError(f"{where}: gt must be an integer label map, got dtype {g.dtype}")
        if g.shape != label.shape:
            raise ValueError(f"{where}: gt shape {g.shape} differs from the CAM size {label.shape}")
        mask = mats[0].valid_mask(g)
        g_v = g[mask].astype(np.int64, copy=False)
        top = max(int(g_v.max(initial=-1)), int(label.max(initial=0)))
        if top >= n:
            raise ValueError(f"{where}: label {top} is out of range for num_classes={n}")
        base = g_v * n
        fg_codes = base + label[mask]
        if score is None:
            mats[0]._add_codes(fg_codes)
        else:
            score_v = score[mask]
            for mat, thr in zip(mats, thrs):
                mat._add_codes(_threshold_labels(score_v, fg_codes, thr, base))
        count += 1
    return mats, count


def _require_samples(count: int) -> None:
    if count == 0:
        raise ValueError("no samples to evaluate (empty samples / ids)")


def evaluate_from_arrays(
    samples: Iterable[tuple[Any, Any, Any]],
    threshold: float | None,
    *,
    num_classes: int = 21,
    background: Background = "plane",
    ignore_index: int | None = 255,
    progress: bool = False,
) -> dict[str, Any]:
    """Scores of seeds at one threshold, from in-memory samples (see :func:`accumulate_confusions`).

    Returns:
        :func:`scores_from_confusion` plus ``confusion`` ((n, n) int64), ``threshold`` and
        ``num_images``.
    """
    thr = 0.0 if (threshold is None and background == "channel0") else threshold
    if thr is None:
        raise ValueError(f"threshold is required with background={background!r}")
    mats, count = accumulate_confusions(
        samples, [thr], num_classes=num_classes, background=background, ignore_index=ignore_index, progress=progress
    )
    _require_samples(count)
    result = mats[0].scores()
    result.update(confusion=mats[0].matrix, threshold=threshold, num_images=count)
    return result


def sweep_from_arrays(
    samples: Iterable[tuple[Any, Any, Any]],
    thresholds: Sequence[float],
    *,
    num_classes: int = 21,
    background: Background = "plane",
    ignore_index: int | None = 255,
    progress: bool = False,
) -> tuple[float, list[tuple[float, float]]]:
    """mIoU for each background threshold in one pass over in-memory samples.

    Returns:
        ``(best_threshold, curve)``; ``curve`` lists ``(threshold, miou)`` in the given order;
        the best is the highest mIoU, the earliest in ``thresholds`` on ties.
    """
    if background == "channel0":
        raise ValueError("background='channel0' uses no threshold: nothing to sweep")
    thrs = list(thresholds)
    mats, count = accumulate_confusions(
        samples, thrs, num_classes=num_classes, background=background, ignore_index=ignore_index, progress=progress
    )
    _require_samples(count)
    curve = [(float(t), float(m.scores()["miou"])) for t, m in zip(thrs, mats)]
    valid = [(miou, -i) for i, (_, miou) in enumerate(curve) if not np.isnan(miou)]
    best_index = -max(valid)[1] if valid else 0
    best = curve[best_index][0]
    logger.info("threshold sweep: best %.3f (mIoU %.4f) over %d images", best, curve[best_index][1], count)
    return best, curve


def _file_samples(
    cam_dir: PathLike, gt_dir: PathLike, ids: Sequence[str], progress: bool
) -> Iterator[tuple[str, Any, np.ndarray, np.ndarray]]:
    """Yield ``(id, keys, high_res, gt)``, reading each CAM file and label PNG exactly once."""
    cams, gts = Path(cam_dir), Path(gt_dir)
    for name, d in (("--cams (cam_dir)", cams), ("--gt (gt_dir)", gts)):
        if not d.is_dir():
            raise FileNotFoundError(f"{name} {str(d)!r} is not an existing directory")
    for image_id in tqdm(ids, total=len(ids), disable=None if progress else True, desc="eval seeds"):
        cam = load_irn_cam(cams / f"{image_id}.npy")
        gt = load_label_png(gts / f"{image_id}.png")
        yield image_id, cam["keys"], cam["high_res"], gt


def _id_sequence(ids: Iterable[str]) -> list[str]:
    if isinstance(ids, (str, bytes, os.PathLike)):
        raise TypeError("ids must be a sequence of image ids; read a list file with lpcam_core.io.read_id_list")
    return [str(i) for i in ids]


def evaluate_seeds(
    cam_dir: PathLike,
    gt_dir: PathLike,
    ids: Iterable[str],
    threshold: float | None,
    *,
    num_classes: int = 21,
    background: Background = "plane",
    progress: bool = True,
) -> dict[str, Any]:
    """Evaluate IRN-family CAM files ``<cam_dir>/<id>.npy`` against ``<gt_dir>/<id>.png``.

    Ground truths are VOC palette PNGs read as index images (255 ignored).

    Returns:
        See :func:`evaluate_from_arrays`.
    """
    ids_list = _id_sequence(ids)
    return evaluate_from_arrays(
        _file_samples(cam_dir, gt_dir, ids_list, progress),
        threshold,
        num_classes=num_classes,
        background=background,
    )


def sweep_thresholds(
    cam_dir: PathLike,
    gt_dir: PathLike,
    ids: Iterable[str],
    thresholds: Sequence[float],
    *,
    num_classes: int = 21,
    background: Background = "plane",
    progress: bool = True,
) -> tuple[float, list[tuple[float, float]]]:
    """Sweep background thresholds over CAM files, reading each file once.

    Returns:
        ``(best_threshold, curve)`` as :func:`sweep_from_arrays`.
    """
    ids_list = _id_sequence(ids)
    return sweep_from_arrays(
        _file_samples(cam_dir, gt_dir, ids_list, progress),
        thresholds,
        num_classes=num_classes,
        background=background,
    )

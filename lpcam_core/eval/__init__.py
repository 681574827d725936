"""Seed evaluation beside the method: confusion matrices, IoU, precision/recall, sweeps, bootstrap.

The public API lives in :mod:`lpcam_core.eval.metrics`.
"""

from __future__ import annotations

from .metrics import (
    ConfusionMatrix,
    accumulate_confusions,
    bootstrap_difference,
    cams_to_label,
    confusion_matrix,
    evaluate_from_arrays,
    evaluate_seeds,
    iou_from_confusion,
    scores_from_confusion,
    sweep_from_arrays,
    sweep_thresholds,
)

__all__ = [
    "ConfusionMatrix", "confusion_matrix", "iou_from_confusion", "scores_from_confusion", "bootstrap_difference",
    "cams_to_label", "accumulate_confusions", "evaluate_from_arrays", "sweep_from_arrays", "evaluate_seeds",
    "sweep_thresholds",
]

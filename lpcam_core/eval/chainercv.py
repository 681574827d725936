"""chainercv's semantic-segmentation evaluation API in numpy (chainercv does not build on Python 3.11).

The hosts' evaluators import ``chainercv.datasets.VOCSemanticSegmentationDataset`` and
``chainercv.evaluations.calc_semantic_segmentation_confusion``; where chainercv is missing, the host
adapters serve these in its place. Results equal chainercv's (confusion rows are the ground truth,
columns the prediction, negative ground truth ignored).
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from typing import Any

import numpy as np

__all__ = [
    "VOCSemanticSegmentationDataset",
    "calc_semantic_segmentation_confusion",
    "calc_semantic_segmentation_iou",
    "eval_semantic_segmentation",
]


class VOCSemanticSegmentationDataset:
    """``chainercv.datasets.VOCSemanticSegmentationDataset`` in numpy.

    Reads ``<data_dir>/ImageSets/Segmentation/<split>.txt``, ``JPEGImages/<id>.jpg`` and
    ``SegmentationClass/<id>.png``. Examples are ``(img, label)``: img float32 [3, H, W] RGB,
    label int32 [H, W] with 255 turned into -1, as chainercv returns them.

    Args:
        data_dir: VOC2012 root (chainercv's ``"auto"`` download is not supported).
        split: Name of the id list (``train``, ``val``, ``trainval`` ...).
    """

    keys = ("img", "label")

    def __init__(self, data_dir: str = "auto", split: str = "train") -> None:
        if data_dir == "auto":
            raise ValueError("this chainercv equivalent cannot download VOC: pass data_dir=<VOC2012 root>")
        id_list = os.path.join(data_dir, "ImageSets", "Segmentation", f"{split}.txt")
        if not os.path.isfile(id_list):
            raise FileNotFoundError(f"VOCSemanticSegmentationDataset: split list not found: {id_list}")
        with open(id_list, encoding="utf-8") as handle:
            self.ids = [line.strip() for line in handle if line.strip()]
        self.data_dir = data_dir
        self.split = split

    def __len__(self) -> int:
        return len(self.ids)

    def _image(self, i: int) -> np.ndarray:
        from PIL import Image

        with Image.open(os.path.join(self.data_dir, "JPEGImages", self.ids[i] + ".jpg")) as im:
            img = np.asarray(im.convert("RGB"), dtype=np.float32)
        return img.transpose(2, 0, 1)

    def _label(self, i: int) -> np.ndarray:
        from ..io import load_label_png

        label = load_label_png(os.path.join(self.data_dir, "SegmentationClass", self.ids[i] + ".png"))
        label = label.astype(np.int32)
        label[label == 255] = -1
        return label

    def get_example_by_keys(self, i: int, key_indices: Iterable[int]) -> tuple[np.ndarray, ...]:
        """Example ``i`` restricted to ``key_indices`` (0: img, 1: label), as a tuple."""
        if not 0 <= i < len(self.ids):
            raise IndexError(f"index {i} out of range for {len(self.ids)} examples")
        getters = (self._image, self._label)
        out = []
        for k in key_indices:
            if k not in (0, 1):
                raise IndexError(f"key index {k} out of range: keys are {self.keys}")
            out.append(getters[k](i))
        return tuple(out)

    def get_example(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        img, label = self.get_example_by_keys(i, (0, 1))
        return img, label

    def __getitem__(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        return self.get_example(i)


def calc_semantic_segmentation_confusion(pred_labels: Iterable[Any], gt_labels: Iterable[Any]) -> np.ndarray:
    """chainercv's function: (n, n) int64, rows gt, columns pred, gt < 0 ignored."""
    from .metrics import confusion_matrix

    return confusion_matrix(pred_labels, gt_labels, ignore_index=None)


def calc_semantic_segmentation_iou(confusion: np.ndarray) -> np.ndarray:
    """chainercv's function: per-class IoU from a confusion matrix."""
    confusion = np.asarray(confusion)
    denominator = confusion.sum(axis=1) + confusion.sum(axis=0) - np.diag(confusion)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.diag(confusion) / denominator


def eval_semantic_segmentation(pred_labels: Iterable[Any], gt_labels: Iterable[Any]) -> dict[str, Any]:
    """chainercv's function (iou, miou, pixel_accuracy, class_accuracy, ...)."""
    confusion = calc_semantic_segmentation_confusion(pred_labels, gt_labels)
    iou = calc_semantic_segmentation_iou(confusion)
    with np.errstate(divide="ignore", invalid="ignore"):
        class_accuracy = np.diag(confusion) / np.sum(confusion, axis=1)
    return {
        "iou": iou,
        "miou": np.nanmean(iou),
        "pixel_accuracy": np.diag(confusion).sum() / confusion.sum(),
        "class_accuracy": class_accuracy,
        "mean_class_accuracy": np.nanmean(class_accuracy),
    }

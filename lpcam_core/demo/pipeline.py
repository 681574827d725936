"""The embedded demo: LPCAM against CAM on the synthetic part-based benchmark, on a CPU.

Pipeline (:func:`run_pipeline`), all seeded and deterministic:

1. generate the synthetic VOC-layout dataset (:mod:`lpcam_core.demo.synthetic`, cached on disk);
2. train a small stride-4 CNN from random init with image labels only (multi-label BCE on
   global-average-pooled features, a bias-free 1x1 classifier, as IRN);
3. baseline CAM of every training image, features into :class:`~lpcam_core.PrototypeBuilder`,
   prototypes scored by the classifier (steps 2-4 of the method);
4. CAM and LPCAM (with and without context prototypes) seeds of the held-out images, over
   scales and flips (steps 5-6);
5. seed mIoU / precision / recall, each method at its best background threshold and at the
   paper's 0.3; :func:`run_demo` adds ``report.md`` and pictures.

Example:
    >>> from lpcam_core.demo import run_demo
    >>> results = run_demo("lpcam_demo_out", seed=0)   # 1.5-3.5 minutes on two CPU cores
    >>> results["lpcam"]["miou"] > results["cam"]["miou"]
    True
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..config import LPCAMConfig
from .synthetic import SyntheticConfig, SyntheticSplit, class_names, load_voc, voc_palette, write_voc

logger = logging.getLogger(__name__)

__all__ = [
    "DemoSettings",
    "CAMNet",
    "run_demo",
    "demo_settings",
    "run_pipeline",
    "train_classifier",
    "inference_model",
    "build_bank",
    "compute_seeds",
    "evaluate_seeds",
    "format_table",
    "gain_interval",
    "format_gain",
    "write_report",
    "add_demo_arguments",
    "main_from_args",
    "METHODS",
    "images_to_tensor",
    "prototype_gallery",
    "cell_part",
    "seed_everything",
]

#: Rows of the results table, in order: key -> label.
METHODS = {"cam": "CAM", "lpcam_no_context": "LPCAM w/o context", "lpcam": "LPCAM"}
_MEAN = 0.5
_STD = 0.25


def default_epochs(num_classes: int) -> int:
    """Default training length: 12 epochs up to 6 classes, 2 per class beyond."""
    return max(12, 2 * int(num_classes))


@dataclass(frozen=True)
class DemoSettings:
    """Everything the demo pipeline depends on.

    Attributes:
        data: Synthetic dataset parameters (its ``seed`` is the data seed).
        seed: Seed of the network's initialisation, batches and K-means.
        epochs: Training epochs. ``None`` (default): ``max(12, 2 * num_classes)``; more classes
            need more training (with 10 classes and 12 epochs the CAM network of seed 0 was
            under-trained: its CAM's best threshold was the sweep's lowest; see docs/demo.md).
        batch_size: Training batch size.
        lr: Peak learning rate (AdamW, one-cycle cosine schedule).
        weight_decay: AdamW weight decay.
        width: Channels of the convolutional layers.
        last_kernel: Kernel of the last convolution (3: receptive field 31 px, 1: 23 px).
        feature_dim: Channels of the feature layer: a 1x1 expansion (+BN+ReLU) after the
            convolutions (0: none, the features are the last convolution's ``width``).
        lpcam: The LPCAM settings (K, tau, mu_f, mu_b, inference ``scales``, ...). ``None``
            (default): the paper's VOC preset with ``seed`` as its K-means seed.
        pool_cam_scales: Scales (with flips) of the baseline CAM that splits the training
            features into pools. ``None`` (default): ``lpcam.scales``, as the IRN family's make_cam
            whose CAM files the official release clusters with (the scale-1 CAM gave the same
            mean gain over 14 paired runs, with more weak seeds at 4 and 6 classes; docs/demo.md).
        eval_threshold: The paper's seed threshold (0.3), reported next to the best one.
        thresholds: Background thresholds swept for each method's best.
        threads: ``torch.set_num_threads`` during the run (None: leave as it is).
        overlay_images: Validation images in the overlay picture.
        gallery_classes: Classes in the prototype gallery.
    """

    data: SyntheticConfig = field(default_factory=SyntheticConfig)
    seed: int = 0
    epochs: int | None = None
    batch_size: int = 32
    lr: float = 3e-3
    weight_decay: float = 1e-4
    width: int = 96
    last_kernel: int = 1
    feature_dim: int = 256
    lpcam: LPCAMConfig | None = None
    pool_cam_scales: tuple[float, ...] | None = None
    eval_threshold: float = 0.3
    thresholds: tuple[float, ...] = tuple(round(0.05 + 0.025 * i, 3) for i in range(37))
    threads: int | None = None
    overlay_images: int = 6
    gallery_classes: int = 3

    def __post_init__(self) -> None:
        if not isinstance(self.data, SyntheticConfig):
            raise TypeError(f"data must be a SyntheticConfig, got {type(self.data).__name__}")
        if self.epochs is None:
            object.__setattr__(self, "epochs", default_epochs(self.data.num_classes))
        if self.lpcam is None:
            object.__setattr__(self, "lpcam", LPCAMConfig.preset("voc", seed=self.seed))
        if not isinstance(self.lpcam, LPCAMConfig):
            raise TypeError(f"lpcam must be an LPCAMConfig, got {type(self.lpcam).__name__}")
        if self.pool_cam_scales is None:
            object.__setattr__(self, "pool_cam_scales", tuple(self.lpcam.scales))
        if self.last_kernel not in (1, 3):
            raise ValueError(f"last_kernel must be 1 or 3, got {self.last_kernel!r}")
        for name in ("epochs", "batch_size", "width"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an int >= 1, got {value!r}")
        for name in ("overlay_images", "gallery_classes", "feature_dim"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"{name} must be an int >= 0, got {value!r}")
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        if self.weight_decay < 0:
            raise ValueError(f"weight_decay must be >= 0, got {self.weight_decay}")
        if not self.pool_cam_scales or any(s <= 0 for s in self.pool_cam_scales):
            raise ValueError(f"pool_cam_scales must be one or more positive numbers, got {self.pool_cam_scales}")
        if not self.thresholds or any(not 0 <= t <= 1 for t in self.thresholds):
            raise ValueError(f"thresholds must be one or more values in [0, 1], got {self.thresholds}")
        if self.threads is not None and (isinstance(self.threads, bool) or not isinstance(self.threads, int)
                                         or not 1 <= self.threads <= 4 * (os.cpu_count() or 1)):
            raise ValueError(f"threads must be None or an int in 1..{4 * (os.cpu_count() or 1)} (4 per CPU core here), "
                             f"got {self.threads!r}")

    @property
    def scales(self) -> tuple[float, ...]:
        """The inference scales (``lpcam.scales``), each with its horizontal flip."""
        return self.lpcam.scales

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dictionary of the settings."""
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        out["data"] = self.data.to_dict()
        out["lpcam"] = self.lpcam.to_dict()
        out["pool_cam_scales"] = list(self.pool_cam_scales)
        out["thresholds"] = list(self.thresholds)
        return out


# ----------------------------------------------------------------------------- model


def _make_net(num_classes: int, width: int, feature_dim: int, last_kernel: int):
    import torch.nn as nn

    class CAMNet(nn.Module):
        """A small stride-4 CNN: ``features`` -> GAP -> bias-free 1x1 ``classifier`` (as IRN).

        Receptive field 23 px with the default 1x1 last convolution (31 px with a 3x3 one), stride
        4: an object of the default synthetic data (38-54 px long) spans several feature cells, so
        head, body and legs get cells of their own.
        """

        def __init__(self) -> None:
            super().__init__()

            def block(cin: int, cout: int, stride: int = 1, kernel: int = 3) -> nn.Sequential:
                return nn.Sequential(
                    nn.Conv2d(cin, cout, kernel, stride, kernel // 2, bias=False), nn.BatchNorm2d(cout),
                    nn.ReLU(inplace=True),
                )

            w = width
            layers = [block(3, w // 4, 2), block(w // 4, w // 2, 2), block(w // 2, 2 * w // 3),
                      block(2 * w // 3, w), block(w, w, kernel=last_kernel)]
            if feature_dim:
                layers.append(nn.Sequential(nn.Conv2d(w, feature_dim, 1, bias=False), nn.BatchNorm2d(feature_dim),
                                            nn.ReLU(inplace=True)))
            self.features = nn.Sequential(*layers)
            self.classifier = nn.Conv2d(feature_dim or w, num_classes, 1, bias=False)

        def forward(self, x):
            """Image logits ``[B, num_classes]`` of normalised images ``[B, 3, H, W]``."""
            f = self.features(x)
            return self.classifier(f.mean(dim=(2, 3), keepdim=True)).flatten(1)

    return CAMNet()


def CAMNet(num_classes: int, width: int = 96, feature_dim: int = 256, last_kernel: int = 1):  # noqa: N802
    """The demo's small CNN (stride 4, non-negative features, bias-free classifier).

    Args:
        num_classes: Foreground classes.
        width: Channels of the convolutions.
        feature_dim: Channels of the 1x1 expansion giving the features (0: none).
        last_kernel: Kernel of the last convolution (3 or 1).

    Returns:
        ``nn.Module`` with ``.features`` ([B, 3, H, W] -> [B, D, H/4, W/4], ``D = feature_dim
        or width``) and ``.classifier`` (``Conv2d(D, num_classes, 1, bias=False)``).
    """
    return _make_net(num_classes, width, feature_dim, last_kernel)


def inference_model(model):
    """A copy of a trained :func:`CAMNet` for feature extraction, about 1.6x faster on a CPU.

    Every BatchNorm that follows a convolution is folded into it (eval statistics) and the
    copy uses channels-last memory; its features equal the original's up to float rounding
    (~1e-7 here). ``model`` itself is left as it is.
    """
    import copy

    import torch
    import torch.nn as nn
    from torch.nn.utils.fusion import fuse_conv_bn_eval

    out = copy.deepcopy(model).eval()
    for seq in [m for m in out.modules() if isinstance(m, nn.Sequential)]:
        for i in range(len(seq) - 1):
            if isinstance(seq[i], nn.Conv2d) and isinstance(seq[i + 1], nn.BatchNorm2d):
                seq[i] = fuse_conv_bn_eval(seq[i], seq[i + 1])
                seq[i + 1] = nn.Identity()
    return out.to(memory_format=torch.channels_last)


def images_to_tensor(images: np.ndarray):
    """Images [N, H, W, 3] uint8 -> the network's input [N, 3, H, W] float32 (the demo's normalisation)."""
    import torch

    x = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float()
    return (x / 255.0 - _MEAN) / _STD


def _tqdm(iterable, progress: bool, **kwargs):
    from tqdm.auto import tqdm

    return tqdm(iterable, disable=not progress, **kwargs)


def train_classifier(model, split: SyntheticSplit, settings: DemoSettings, progress: bool = True) -> list[float]:
    """Train ``model`` with image labels only (multi-label BCE, random horizontal flips).

    Args:
        model: A :func:`CAMNet`.
        split: Training images ``[N, H, W, 3]`` and labels ``[N, num_classes]``.
        settings: Epochs, batch size, learning rate, seed.
        progress: Show a tqdm progress bar.

    Returns:
        Mean training loss of every epoch.
    """
    import torch
    import torch.nn.functional as F

    gen = torch.Generator().manual_seed(settings.seed)
    x_all = images_to_tensor(split.images)
    y_all = torch.from_numpy(split.labels)
    n = len(split)
    steps_per_epoch = max(1, n // settings.batch_size)
    total = settings.epochs * steps_per_epoch
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        (no_decay if p.ndim <= 1 else decay).append(p)
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": settings.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=settings.lr,
    )
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=settings.lr, total_steps=total, pct_start=0.15)
    model.train()
    losses = []
    bar = _tqdm(range(total), progress, desc="train", unit="step", leave=False)
    it = iter(bar)
    for _ in range(settings.epochs):
        order = torch.randperm(n, generator=gen)
        running = 0.0
        for step in range(steps_per_epoch):
            idx = order[step * settings.batch_size: (step + 1) * settings.batch_size]
            x = x_all[idx]
            flip = torch.rand(len(idx), generator=gen) < 0.5
            x = torch.where(flip[:, None, None, None], x.flip(-1), x)
            loss = F.binary_cross_entropy_with_logits(model(x), y_all[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            value = float(loss.detach())
            running += value
            next(it, None)
            bar.set_postfix(loss=f"{value:.3f}")
        losses.append(running / steps_per_epoch)
    bar.close()
    model.eval()
    return losses


def _batches(x, labels: np.ndarray, batch: int) -> list:
    """``(images [B, 3, H, W], multi-hot labels [B, n])`` batches for :meth:`LPCAM.fit` (a list: views of ``x``,
    and a length for the progress bar)."""
    import torch

    return [(x[start: start + batch], torch.from_numpy(labels[start: start + batch])) for start in range(0, len(x), batch)]


def _extractor(model, settings: DemoSettings, bank=None):
    """The generic :class:`~lpcam_core.LPCAM` extractor on the demo network (forward hooks)."""
    from ..extractor import LPCAM

    return LPCAM(model, feature_layer="features", classifier="classifier", config=settings.lpcam, bank=bank)


def build_bank(model, split: SyntheticSplit, settings: DemoSettings, progress: bool = True,
               keep_features: int = 0):
    """Prototypes from the training images (steps 2-4 of the method) with :meth:`LPCAM.fit`.

    The baseline CAM that splits each image's features into class and context pools is the
    network's multi-scale CAM (``settings.pool_cam_scales`` with flips, as the IRN family's
    ``make_cam``); the pooled features are those of the image at scale 1, no flip.

    Args:
        model: Trained :func:`CAMNet`.
        split: Training split.
        settings: LPCAM hyper-parameters.
        progress: Show tqdm progress bars.
        keep_features: Also return the feature maps ``[keep_features, C, h, w]`` of the first
            images (for the prototype gallery).

    Returns:
        ``(bank, kept_features)``.
    """
    import torch

    x_all = images_to_tensor(split.images)
    with _extractor(model, settings) as lp:
        bank = lp.fit(_batches(x_all, split.labels, 32), cam_scales=settings.pool_cam_scales, progress=progress,
                      class_names=class_names(split.labels.shape[1]))
        kept = [lp.features(x_all[i: i + 64]) for i in range(0, keep_features, 64)]
    kept_t = torch.cat(kept)[:keep_features] if kept else torch.empty(0)
    return bank, kept_t


def compute_seeds(model, bank, split: SyntheticSplit, settings: DemoSettings,
                  progress: bool = True, amp: bool = False) -> dict[str, list[dict]]:
    """CAM, LPCAM without context and LPCAM seeds of ``split`` (``settings.scales`` x flips).

    Features come from the :class:`~lpcam_core.LPCAM` extractor's hook, once per view; the three
    maps are computed from the same features (``cam_multiscale`` and ``lpcam_multiscale``), in
    float32. ``amp``: the network's forward under autocast
    (:func:`lpcam_core.precision.backbone_autocast`), as ``--amp`` runs a host's maps pass.

    Returns:
        ``{method: [record]}``, one IRN-style record ``{keys, cam, high_res}`` per image, in
        the order of ``split``; ``high_res`` is ``[n, H, W]``.
    """
    import torch
    import torch.nn.functional as F

    from ..maps import cam_multiscale, lpcam_multiscale
    from ..precision import backbone_autocast

    weight = model.classifier.weight.detach()[:, :, 0, 0]
    no_context = bank.without_context()
    x_all = images_to_tensor(split.images)
    size = tuple(x_all.shape[2:])
    out: dict[str, list[dict]] = {key: [] for key in METHODS}
    missing: set[int] = set()
    batch = 32
    with _extractor(model, settings, bank) as lp:
        for start in _tqdm(range(0, len(split), batch), progress, desc="seeds", leave=False):
            x = x_all[start: start + batch]
            per_scale = []
            for s in settings.scales:
                xs = x
                if s != 1.0:
                    hw = [max(1, round(v * s)) for v in size]
                    xs = F.interpolate(x, size=hw, mode="bilinear", align_corners=False)
                with backbone_autocast(xs.device, amp):
                    pair = lp.features(torch.cat([xs, xs.flip(-1)]))
                per_scale.append(torch.stack([pair[: len(x)], pair[len(x):]], dim=1))  # [B, 2, C, h, w]
            for j in range(len(x)):
                keys = np.nonzero(split.labels[start + j])[0].tolist()
                feats = [p[j] for p in per_scale]
                # A class without prototypes gets no LPCAM map: missed, never replaced by CAM.
                known = [k for k in keys if k in bank.foreground]
                missing |= set(keys) - set(known)
                out["cam"].append(cam_multiscale(feats, weight, keys, size))
                out["lpcam"].append(lpcam_multiscale(feats, bank, known, size))
                out["lpcam_no_context"].append(lpcam_multiscale(feats, no_context, known, size))
    if missing:
        logger.warning("classes %s have no prototype: their LPCAM seeds are empty", sorted(missing))
    return out


def evaluate_seeds(seeds: dict[str, list[dict]], masks: np.ndarray, num_classes: int,
                   settings: DemoSettings, parts: np.ndarray | None = None) -> dict[str, dict[str, Any]]:
    """Seed scores of every method: at its best swept threshold and at ``eval_threshold``.

    Args:
        seeds: Output of :func:`compute_seeds`.
        masks: Ground truth ``[N, H, W]`` (255 ignored).
        num_classes: Foreground classes.
        settings: Thresholds.
        parts: Optional part maps ``[N, H, W]`` (:data:`~lpcam_core.demo.synthetic.PART_NAMES`):
            adds ``part_recall`` (share of each part's pixels given their class) and
            ``background_fp`` (share of background pixels given a class) at the best threshold.

    Returns:
        ``{method: {miou, precision, recall, threshold, miou_at_eval, precision_at_eval,
        recall_at_eval, iou, curve[, part_recall, background_fp]}}``, scores in percent.
    """
    from ..eval.metrics import accumulate_confusions

    thresholds = sorted(set(settings.thresholds) | {settings.eval_threshold})
    results = {}
    for method, records in seeds.items():
        samples = [(r["keys"], r["high_res"], m) for r, m in zip(records, masks)]
        mats, _ = accumulate_confusions(samples, thresholds, num_classes=num_classes + 1)
        scores = [m.scores() for m in mats]
        best = max(range(len(thresholds)), key=lambda i: (scores[i]["miou"], -i))
        at = thresholds.index(settings.eval_threshold)
        results[method] = {
            "miou": 100 * scores[best]["miou"],
            "precision": 100 * scores[best]["mean_precision"],
            "recall": 100 * scores[best]["mean_recall"],
            "threshold": thresholds[best],
            "miou_at_eval": 100 * scores[at]["miou"],
            "precision_at_eval": 100 * scores[at]["mean_precision"],
            "recall_at_eval": 100 * scores[at]["mean_recall"],
            "iou": [100 * float(v) for v in scores[best]["iou"]],
            "curve": [(t, 100 * s["miou"]) for t, s in zip(thresholds, scores)],
        }
        if parts is not None:
            results[method].update(_part_scores(records, masks, parts, thresholds[best]))
    return results


def gain_interval(seeds: dict[str, list[dict]], masks: np.ndarray, num_classes: int, results: dict[str, Any],
                  num_samples: int = 1000, seed: int = 0) -> dict[str, dict[str, float]]:
    """LPCAM - CAM on these images, with a 95% paired bootstrap interval over the images.

    Each method's seeds are labelled at its best threshold (from ``results``, held fixed), one
    confusion matrix per image; :func:`~lpcam_core.eval.metrics.bootstrap_difference` resamples the
    images. The interval is the evaluation's noise (which images were drawn), not the
    seed-to-seed spread of training: compare seeds for that.

    Returns:
        ``{"miou" | "precision" | "recall": {"difference", "low", "high"}}`` in percent.
    """
    from ..eval.metrics import ConfusionMatrix, bootstrap_difference

    confs = {}
    for method in ("cam", "lpcam"):
        threshold = results[method]["threshold"]
        per_image = []
        for record, mask in zip(seeds[method], masks):
            matrix = ConfusionMatrix(num_classes + 1)
            matrix.update(_seed_label(record, threshold), mask)
            per_image.append(matrix.matrix)
        confs[method] = np.stack(per_image)
    raw = bootstrap_difference(confs["cam"], confs["lpcam"], num_samples=num_samples, level=0.95, seed=seed)
    names = {"miou": "miou", "mean_precision": "precision", "mean_recall": "recall"}
    return {names[key]: {k: 100.0 * v for k, v in value.items()} for key, value in raw.items()}


def format_gain(interval: dict[str, dict[str, float]], num_images: int) -> str:
    """One line: LPCAM - CAM per score with its bootstrap interval."""
    parts = [f"{name} {v['difference']:+.1f} [{v['low']:+.1f}, {v['high']:+.1f}]" for name, v in interval.items()]
    return f"LPCAM - CAM (95% bootstrap interval over the {num_images} held-out images): " + ", ".join(parts)


def _part_scores(records: list[dict], masks: np.ndarray, parts: np.ndarray, threshold: float) -> dict[str, Any]:
    """Per-part recall and background false-positive rate (percent) of seeds at ``threshold``."""
    from .synthetic import PART_NAMES

    hit = np.zeros(len(PART_NAMES), dtype=np.int64)
    count = np.zeros(len(PART_NAMES), dtype=np.int64)
    for record, mask, part in zip(records, masks, parts):
        pred = _seed_label(record, threshold)
        valid = part != 255
        for value in PART_NAMES:
            where = valid & (part == value)
            count[value] += int(where.sum())
            if value == 0:
                hit[value] += int((pred[where] != 0).sum())
            else:
                hit[value] += int((pred[where] == mask[where]).sum())
    share = 100.0 * hit / np.maximum(count, 1)
    return {
        "part_recall": {PART_NAMES[v]: float(share[v]) for v in PART_NAMES if v != 0},
        "background_fp": float(share[0]),
    }


def format_table(results: dict[str, dict[str, Any]], eval_threshold: float = 0.3) -> str:
    """Markdown table shaped like the paper's Table 1 (scores in percent)."""
    lines = [
        f"| method | mIoU | precision | recall | best threshold | mIoU @ {eval_threshold:g} |",
        "|---|---|---|---|---|---|",
    ]
    for key, label in METHODS.items():
        if key not in results:
            continue
        r = results[key]
        lines.append(
            f"| {label} | {r['miou']:.1f} | {r['precision']:.1f} | {r['recall']:.1f} | "
            f"{r['threshold']:.3g} | {r['miou_at_eval']:.1f} |"
        )
    return "\n".join(lines)


# ----------------------------------------------------------------------------- pipeline


def seed_everything(seed: int) -> None:
    """Seed Python, numpy and torch, and ask torch for deterministic algorithms."""
    import random

    import torch

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    torch.use_deterministic_algorithms(True, warn_only=True)


def run_pipeline(settings: DemoSettings, data_dir: str | os.PathLike, progress: bool = True,
                 keep: bool = False) -> dict[str, Any]:
    """Data, training, prototypes, seeds and scores.

    Args:
        settings: The run's settings.
        data_dir: Where the synthetic dataset is written (cached: reused when it matches).
        progress: Show tqdm progress bars.
        keep: Also return the model, bank, data and seeds under ``"artifacts"`` (for reports).

    Returns:
        ``{"cam": {...}, "lpcam_no_context": {...}, "lpcam": {...}, "settings": {...},
        "timings": {...}, "bank": {...}}``; each method holds ``miou``, ``precision``,
        ``recall`` (percent, at its best threshold) and ``threshold``.
    """
    import torch

    previous_threads = torch.get_num_threads()
    if settings.threads is not None:
        torch.set_num_threads(settings.threads)
    try:
        return _run(settings, Path(data_dir), progress, keep)
    finally:
        torch.set_num_threads(previous_threads)


def _run(settings: DemoSettings, data_dir: Path, progress: bool, keep: bool) -> dict[str, Any]:
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    write_voc(settings.data, data_dir, progress=progress)
    train = load_voc(data_dir, "train", settings.data.num_classes)
    val = load_voc(data_dir, "val", settings.data.num_classes)
    timings["data"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    seed_everything(settings.seed)
    model = CAMNet(settings.data.num_classes, settings.width, settings.feature_dim, settings.last_kernel)
    losses = train_classifier(model, train, settings, progress)
    timings["train"] = time.perf_counter() - t0
    logger.info("training loss per epoch: %s", ", ".join(f"{v:.3f}" for v in losses))

    t0 = time.perf_counter()
    extractor = inference_model(model)
    bank, kept = build_bank(extractor, train, settings, progress, keep_features=200 if keep else 0)
    timings["prototypes"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    seeds = compute_seeds(extractor, bank, val, settings, progress)
    timings["seeds"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    results: dict[str, Any] = evaluate_seeds(seeds, val.masks, settings.data.num_classes, settings, val.parts)
    results["gain_interval"] = gain_interval(seeds, val.masks, settings.data.num_classes, results, seed=settings.seed)
    timings["eval"] = time.perf_counter() - t0

    results["settings"] = settings.to_dict()
    results["timings"] = timings
    results["train_loss"] = losses
    results["bank"] = bank.summary()
    results["num_val_images"] = len(val)
    if keep:
        results["artifacts"] = {"model": model, "bank": bank, "train": train, "val": val, "seeds": seeds,
                                "train_features": kept}
    return results


# ----------------------------------------------------------------------------- pictures


def _heat(values: np.ndarray) -> np.ndarray:
    """A jet-like colour map: values ``[H, W]`` in [0, 1] -> uint8 ``[H, W, 3]``."""
    v = np.clip(values, 0.0, 1.0)[..., None]
    r = np.clip(1.5 - np.abs(4 * v - 3), 0, 1)
    g = np.clip(1.5 - np.abs(4 * v - 2), 0, 1)
    b = np.clip(1.5 - np.abs(4 * v - 1), 0, 1)
    return (np.concatenate([r, g, b], axis=-1) * 255).astype(np.uint8)


def _blend(image: np.ndarray, overlay: np.ndarray, alpha: float = 0.55) -> np.ndarray:
    return (image.astype(np.float32) * (1 - alpha) + overlay.astype(np.float32) * alpha).astype(np.uint8)


def _label_colors(label: np.ndarray) -> np.ndarray:
    palette = np.asarray(voc_palette(), dtype=np.uint8).reshape(256, 3)
    return palette[label]


def _seed_label(record: dict, threshold: float) -> np.ndarray:
    from ..eval.metrics import cams_to_label

    return cams_to_label(record["keys"], record["high_res"], threshold).astype(np.uint8)


def _grid(rows: list[list[np.ndarray]], header: Sequence[str], zoom: int = 2, pad: int = 4) -> np.ndarray:
    """Tile equally sized uint8 ``[H, W, 3]`` cells into one picture with a header line."""
    from PIL import Image, ImageDraw

    h, w = rows[0][0].shape[:2]
    ch, cw = h * zoom, w * zoom
    top = 16
    out = np.full((top + len(rows) * (ch + pad), len(header) * (cw + pad), 3), 255, dtype=np.uint8)
    for i, row in enumerate(rows):
        for j, cell in enumerate(row):
            big = np.repeat(np.repeat(cell, zoom, axis=0), zoom, axis=1)
            y, x = top + i * (ch + pad), j * (cw + pad)
            out[y: y + ch, x: x + cw] = big
    img = Image.fromarray(out)
    draw = ImageDraw.Draw(img)
    for j, text in enumerate(header):
        draw.text((j * (cw + pad) + 2, 2), text, fill=(0, 0, 0))
    return np.asarray(img)


def overlay_picture(val: SyntheticSplit, seeds: dict[str, list[dict]], results: dict[str, Any],
                    indices: Sequence[int]) -> np.ndarray:
    """Rows: image | ground truth | CAM | CAM seeds | LPCAM | LPCAM seeds (best thresholds).

    Returns:
        uint8 RGB picture ``[H', W', 3]``.
    """
    rows = []
    for i in indices:
        image = val.images[i]
        row = [image, _label_colors(val.masks[i])]
        for method in ("cam", "lpcam"):
            record = seeds[method][i]
            hr = record["high_res"]
            heat = hr.max(axis=0) if hr.shape[0] else np.zeros(image.shape[:2], np.float32)
            row.append(_blend(image, _heat(heat)))
            row.append(_blend(image, _label_colors(_seed_label(record, results[method]["threshold"])), 0.7))
        rows.append(row)
    header = ["image", "ground truth", "CAM", "CAM seeds", "LPCAM", "LPCAM seeds"]
    return _grid(rows, header)


def _patch(image: np.ndarray, cy: int, cx: int, size: int) -> np.ndarray:
    """``size x size`` crop of ``image`` centred on ``(cy, cx)``, white outside the image."""
    h, w = image.shape[:2]
    out = np.full((size, size, 3), 255, dtype=np.uint8)
    y0, x0 = cy - size // 2, cx - size // 2
    ys, xs = max(y0, 0), max(x0, 0)
    ye, xe = min(y0 + size, h), min(x0 + size, w)
    out[ys - y0: ye - y0, xs - x0: xe - x0] = image[ys:ye, xs:xe]
    return out


def prototype_gallery(bank, train: SyntheticSplit, features, classes: Sequence[int], per_row: int = 6,
                      max_prototypes: int = 6, patch: int = 24) -> tuple[np.ndarray, list[dict]]:
    """For each class, the training patches nearest to its class and context prototypes.

    The paper's "head / leg / body" picture: each row is one prototype, its patches are the
    feature cells (of the first ``len(features)`` training images) of highest cosine similarity
    to it, at most one per image. With part maps, each row is named after the part that covers at least
    half of most of its cells (:func:`cell_part`), else ``mixed``; a class prototype whose cells lie on
    background within a patch of a part of its class is named ``beside <part>`` (a feature sees its
    receptive field, not only its cell: the blur of the CAM that filled the class pool).

    Args:
        bank: The prototype bank.
        train: Training split (images, and ``parts`` when available).
        features: Feature maps ``[n, C, h, w]`` of the first ``n`` training images.
        classes: Classes to show.
        per_row: Patches per prototype.
        max_prototypes: Most class (and, separately, context) prototypes per class.
        patch: Patch side in pixels.

    Returns:
        ``(picture uint8 [H', W', 3], rows)`` with one dict per row: class, kind, index,
        dominant part and its share.
    """
    import torch
    import torch.nn.functional as F

    from .synthetic import PART_NAMES

    n, c, h, w = features.shape
    size = train.images.shape[1:3]
    stride_y, stride_x = size[0] / h, size[1] / w
    unit = F.normalize(features.permute(0, 2, 3, 1).reshape(n, h * w, c).float(), dim=2)
    cells, rows = [], []
    for cls in classes:
        for kind, protos in (("class", bank.foreground.get(cls)), ("context", bank.context.get(cls))):
            if protos is None or protos.shape[0] == 0:
                continue
            for i, proto in enumerate(protos[:max_prototypes]):
                sims = unit @ F.normalize(proto.float(), dim=0)  # [n, hw]
                best, where = sims.max(dim=1)  # best cell of every image
                order = torch.argsort(best, descending=True)[:per_row]
                tiles, hits = [], []
                for j in order.tolist():
                    y, x = divmod(int(where[j]), w)
                    cy, cx = int((y + 0.5) * stride_y), int((x + 0.5) * stride_x)
                    tiles.append(_patch(train.images[j], cy, cx, patch))
                    if train.parts is not None:
                        hits.append(cell_part(train, j, y, x, stride_y, stride_x, cls, PART_NAMES,
                                              window=patch if kind == "class" else 0))
                while len(tiles) < per_row:
                    tiles.append(np.full((patch, patch, 3), 255, np.uint8))
                name, share = "", 0.0
                if hits:
                    values, counts = np.unique(hits, return_counts=True)
                    name, share = str(values[counts.argmax()]), float(counts.max() / len(hits))
                    if share < 0.5:
                        name = "mixed"  # no part is what most of the shown patches show
                rows.append({"class": int(cls), "kind": kind, "index": i, "part": name, "share": share})
                cells.append(tiles)
    if not cells:
        return np.full((patch, patch, 3), 255, np.uint8), rows
    labels = [f"c{r['class']} {r['kind']} #{r['index']}: {r['part']}" for r in rows]
    return _gallery_grid(cells, labels, zoom=2), rows


def cell_part(split: SyntheticSplit, index: int, y: int, x: int, stride_y: float, stride_x: float, cls: int,
              names: dict[int, str], window: int = 0) -> str:
    """What feature cell ``(y, x)`` of image ``index`` (the image area the prototype's similarity was taken over)
    covers: the part (or background) holding at least half of its labelled pixels, ``"other object"`` when that
    part belongs to another class's object, ``"mixed"`` when nothing holds half. With ``window`` (pixels), a
    background cell is ``"beside <part>"``, the part of class ``cls`` nearest to the cell's centre within the
    ``window`` x ``window`` square around it (what the cell's feature sees beside background)."""
    y0, x0 = int(y * stride_y), int(x * stride_x)
    y1, x1 = max(int((y + 1) * stride_y), y0 + 1), max(int((x + 1) * stride_x), x0 + 1)
    part = split.parts[index, y0:y1, x0:x1].ravel()
    mask = split.masks[index, y0:y1, x0:x1].ravel()
    valid = part != 255
    if not valid.any():
        return "border"
    values, counts = np.unique(part[valid], return_counts=True)
    if counts.max() < 0.5 * valid.sum():
        return "mixed"
    value = int(values[counts.argmax()])
    if value == 0:
        return _beside(split, index, (y + 0.5) * stride_y, (x + 0.5) * stride_x, window, cls, names) or names[0]
    on = mask[valid & (part == value)]
    return names[value] if np.mean(on == cls + 1) >= 0.5 else "other object"


def _gallery_grid(cells: list[list[np.ndarray]], labels: list[str], zoom: int = 2, pad: int = 2,
                  label_width: int = 150) -> np.ndarray:
    from PIL import Image, ImageDraw

    ph, pw = cells[0][0].shape[:2]
    ch, cw = ph * zoom, pw * zoom
    width = label_width + len(cells[0]) * (cw + pad)
    out = np.full((len(cells) * (ch + pad), width, 3), 255, dtype=np.uint8)
    for i, row in enumerate(cells):
        for j, tile in enumerate(row):
            big = np.repeat(np.repeat(tile, zoom, axis=0), zoom, axis=1)
            y, x = i * (ch + pad), label_width + j * (cw + pad)
            out[y: y + ch, x: x + cw] = big
    img = Image.fromarray(out)
    draw = ImageDraw.Draw(img)
    for i, text in enumerate(labels):
        draw.text((2, i * (ch + pad) + ch // 2 - 6), text, fill=(0, 0, 0))
    return np.asarray(img)


# ----------------------------------------------------------------------------- report


def _part_table(results: dict[str, Any]) -> str:
    if "part_recall" not in results.get("lpcam", {}):
        return ""
    parts = list(results["lpcam"]["part_recall"])
    lines = ["| method | " + " | ".join(f"{p} recall" for p in parts) + " | background marked as object |",
             "|---" * (len(parts) + 2) + "|"]
    for key, label in METHODS.items():
        r = results[key]
        cells = " | ".join(f"{r['part_recall'][p]:.1f}" for p in parts)
        lines.append(f"| {label} | {cells} | {r['background_fp']:.1f} |")
    return "\n".join(lines)


def write_report(out_dir: str | os.PathLike, results: dict[str, Any], artifacts: dict[str, Any]) -> Path:
    """Write ``report.md``, ``overlay.png``, ``prototypes.png`` and ``results.json``.

    Args:
        out_dir: Output directory (created if needed).
        results: Output of :func:`run_pipeline` (without ``"artifacts"``).
        artifacts: The ``"artifacts"`` of :func:`run_pipeline` (``keep=True``).

    Returns:
        Path of ``report.md``.
    """
    from PIL import Image

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    settings = results["settings"]
    val, train, seeds, bank = artifacts["val"], artifacts["train"], artifacts["seeds"], artifacts["bank"]

    n_overlay = min(settings["overlay_images"], len(val))
    pictures = []
    if n_overlay:
        Image.fromarray(overlay_picture(val, seeds, results, range(n_overlay))).save(out / "overlay.png")
        pictures.append(("Held-out images", "overlay.png",
                         "image | ground truth | CAM | CAM seeds | LPCAM | LPCAM seeds (seeds at each method's "
                         "best threshold; white = 255 border, ignored)"))
    gallery_rows: list[dict] = []
    classes = [c for c in bank.classes][: settings["gallery_classes"]]
    features = artifacts.get("train_features")
    if classes and features is not None and len(features):
        picture, gallery_rows = prototype_gallery(bank, train, features, classes)
        Image.fromarray(picture).save(out / "prototypes.png")
        pictures.append(("Prototype gallery", "prototypes.png",
                         "one row per prototype of the first classes (class and context prototypes): the "
                         "training patches nearest to it, named after the part most of them fall on (\"beside head\": background "
                         "cells next to that part of the class, which their features see)"))

    data = settings["data"]
    lines = [
        "# LPCAM demo: synthetic part-based benchmark",
        "",
        f"Seed {settings['seed']}; {data['num_images']} synthetic images of {data['image_size']}x"
        f"{data['image_size']} px ({data['num_classes']} classes, {len(val)} held out for evaluation); "
        f"a {settings['width']}-channel stride-4 CNN trained from scratch for {settings['epochs']} epochs "
        "with image labels only. Prototypes from the training images, their class and context pools "
        f"split by the CAM at scales {', '.join(f'{s:g}' for s in settings['pool_cam_scales'])} with flips; "
        f"seeds of the held-out images, scales {', '.join(f'{s:g}' for s in settings['lpcam']['scales'])} with flips.",
        "",
        "## Seeds (the paper's Table 1 shape)",
        "",
        "Each method at its best background threshold (swept), and mIoU at the paper's "
        f"{settings['eval_threshold']:g}. Scores in percent (precision and recall averaged over classes).",
        "",
        format_table(results, settings["eval_threshold"]),
        "",
    ]
    if "gain_interval" in results:
        lines += [format_gain(results["gain_interval"], len(val)) + ". The interval is the evaluation's noise "
                  "(other held-out images of the same kind, thresholds fixed); other seeds also retrain "
                  "the network and move the gain more (docs/demo.md).", ""]
    part_table = _part_table(results)
    if part_table:
        lines += ["Where the seeds land (at the best thresholds): share of each part's pixels labelled with "
                  "the right class, and share of background pixels labelled as an object.", "", part_table, ""]
    for title, name, caption in pictures:
        lines += [f"## {title}", "", f"![{title}]({name})", "", caption, ""]
    if gallery_rows:
        lines += ["| class | kind | prototype | nearest patches mostly on | share |", "|---|---|---|---|---|"]
        lines += [f"| {r['class']} | {r['kind']} | {r['index']} | {r['part']} | {100 * r['share']:.0f}% |"
                  for r in gallery_rows]
        lines.append("")
    lines += ["## Prototype bank", "", "| class | class prototypes | context prototypes |", "|---|---|---|"]
    lines += [f"| {b['class']} | {b['class_prototypes']} | {b['context_prototypes']} |" for b in results["bank"]]
    timings = results.get("timings", {})
    lines += ["", "## Run", "", "| step | seconds |", "|---|---|"]
    lines += [f"| {k} | {v:.1f} |" for k, v in timings.items()]
    lines += ["", "Settings (`results.json` holds everything):", "", "```json",
              json.dumps({k: v for k, v in settings.items() if k != "thresholds"}, indent=1), "```", ""]
    report = out / "report.md"
    report.write_text("\n".join(lines))
    (out / "results.json").write_text(json.dumps(results, indent=1, default=_json_default))
    return report


def _json_default(value: Any) -> Any:
    if isinstance(value, (np.integer,)):
        return int(value)
    if isinstance(value, (np.floating,)):
        return float(value)
    if isinstance(value, np.ndarray):
        return value.tolist()
    return str(value)


def demo_settings(seed: int = 0, *, quick: bool = False, **overrides: Any) -> DemoSettings:
    """The demo's settings for ``seed``: every generator parameter at its default, ``data.seed = seed``.

    Args:
        seed: Seed of the data, the network and K-means.
        quick: A tiny run (a few seconds, numbers meaningless) for smoke tests.
        **overrides: :class:`DemoSettings` fields; ``data_<name>`` keys set generator parameters
            (``data_num_classes=8``); :class:`~lpcam_core.LPCAMConfig` fields (``num_clusters=8``,
            ``scales=(1.0,)``) set the LPCAM settings.

    Returns:
        The settings.
    """
    config_fields = {f.name for f in dataclasses.fields(LPCAMConfig)}
    data_kwargs = {k[len("data_"):]: v for k, v in overrides.items() if k.startswith("data_")}
    lpcam_kwargs = {k: v for k, v in overrides.items() if k in config_fields}
    rest = {k: v for k, v in overrides.items() if not k.startswith("data_") and k not in config_fields}
    if quick:
        data_kwargs = {"num_images": 24, "image_size": 64, **data_kwargs}
        lpcam_kwargs = {"num_clusters": 3, "scales": (1.0,), **lpcam_kwargs}
        rest = {"epochs": 1, "width": 16, "feature_dim": 32, "pool_cam_scales": (1.0,),
                "overlay_images": 2, "gallery_classes": 1, **rest}
    data = SyntheticConfig(**{"seed": seed, **data_kwargs})
    if "lpcam" not in rest:
        rest["lpcam"] = LPCAMConfig.preset("voc", **{"seed": seed, **lpcam_kwargs})
    elif lpcam_kwargs:
        rest["lpcam"] = rest["lpcam"].replace(**lpcam_kwargs)
    return DemoSettings(data=data, seed=seed, **rest)


def run_demo(out_dir: str | os.PathLike = "lpcam_demo_out", seed: int = 0, *, quick: bool = False,
             progress: bool = True, data_dir: str | os.PathLike | None = None, **overrides: Any) -> dict[str, Any]:
    """Run the whole demo and write its report.

    Args:
        out_dir: Where ``report.md``, ``overlay.png``, ``prototypes.png``, ``results.json``
            and the cached dataset (``data/``) go.
        seed: Seed of everything (data, network, K-means).
        quick: A tiny smoke-test run.
        progress: Show tqdm progress bars.
        data_dir: Dataset directory (default ``<out_dir>/data``).
        **overrides: See :func:`demo_settings`.

    Returns:
        Results: ``{"cam", "lpcam_no_context", "lpcam"}`` rows (``miou``, ``precision``,
        ``recall`` in percent at the best ``threshold``, ``miou_at_eval`` ...), ``settings``,
        ``timings``, ``bank`` and ``report`` (the report's path).
    """
    settings = demo_settings(seed, quick=quick, **overrides)
    out = Path(out_dir)
    check_demo_folder(out)
    start = time.perf_counter()
    results = run_pipeline(settings, data_dir if data_dir is not None else out / "data", progress, keep=True)
    artifacts = results.pop("artifacts")
    t0 = time.perf_counter()
    results["timings"]["report"] = 0.0
    report = write_report(out, results, artifacts)
    results["timings"]["report"] = time.perf_counter() - t0
    results["timings"]["total"] = time.perf_counter() - start
    (out / "results.json").write_text(json.dumps(results, indent=1, default=_json_default))
    results["report"] = str(report)
    logger.info("demo finished in %.1f s; report: %s", results["timings"]["total"], report)
    return results


DEMO_OUTPUTS = ("report.md", "results.json", "overlay.png", "prototypes.png")


def check_demo_folder(out: Path) -> None:
    """Refuse an output folder holding a file the demo would replace but did not write (a ``report.md`` of
    the user's): the demo's own folder says so by its ``data/synthetic_params.json`` or ``.lpcam_demo``."""
    out.mkdir(parents=True, exist_ok=True)
    ours = (out / ".lpcam_demo").is_file() or (out / "data" / "synthetic_params.json").is_file()
    clashes = [name for name in DEMO_OUTPUTS if (out / name).exists()]
    if clashes and not ours:
        raise FileExistsError(f"{out} holds {', '.join(clashes)}, which the demo did not write and would replace: "
                              "choose an empty or new --out")
    (out / ".lpcam_demo").touch()


# ----------------------------------------------------------------------------- command line


def add_demo_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the demo's options to ``parser`` (the ``lpcam demo`` subcommand)."""
    parser.add_argument("--out", default="lpcam_demo_out", help="output directory (report, pictures, data cache)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the data, the network and K-means")
    parser.add_argument("--epochs", type=int, default=None, help="training epochs (default: max(12, 2 per class))")
    parser.add_argument("--num-images", type=int, default=None, help="synthetic images in all (train + val; default: max(1200, 200 per class))")
    parser.add_argument("--num-classes", type=int, default=None, help="synthetic classes (2-20)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--quick", action="store_true", help="tiny smoke-test run (seconds; numbers meaningless)")
    parser.add_argument("--no-progress", action="store_true", help="hide progress bars")
    return parser


def _overrides_from_args(args: argparse.Namespace) -> dict[str, Any]:
    overrides: dict[str, Any] = {}
    if getattr(args, "epochs", None) is not None:
        overrides["epochs"] = args.epochs
    if getattr(args, "num_images", None) is not None:
        overrides["data_num_images"] = args.num_images
    if getattr(args, "num_classes", None) is not None:
        overrides["data_num_classes"] = args.num_classes
    if getattr(args, "threads", None) is not None:
        overrides["threads"] = args.threads
    return overrides


def main_from_args(args: argparse.Namespace) -> int:
    """Run the demo from parsed :func:`add_demo_arguments` options; prints the table. Returns 0."""
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    results = run_demo(args.out, seed=args.seed, quick=args.quick, progress=not args.no_progress,
                       **_overrides_from_args(args))
    print(format_table(results, results["settings"]["eval_threshold"]))
    if "gain_interval" in results:
        print(format_gain(results["gain_interval"], results["num_val_images"]))
    print(f"\nreport: {results['report']}  ({results['timings']['total']:.0f} s)")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m lpcam_core.demo``: the same as ``lpcam demo``."""
    parser = add_demo_arguments(argparse.ArgumentParser(prog="lpcam demo", description=__doc__.split("\n")[0]))
    return main_from_args(parser.parse_args(argv))


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())


def _beside(split: SyntheticSplit, index: int, cy: float, cx: float, window: int, cls: int,
            names: dict[int, str]) -> str | None:
    """``"beside <part>"`` for the part of class ``cls`` nearest to ``(cy, cx)`` within the ``window``-pixel
    square centred there, else None."""
    if window <= 0:
        return None
    height, width = split.parts.shape[1:3]
    y0, x0 = max(0, int(cy - window / 2)), max(0, int(cx - window / 2))
    y1, x1 = min(height, int(cy + window / 2)), min(width, int(cx + window / 2))
    part = split.parts[index, y0:y1, x0:x1]
    own = (split.masks[index, y0:y1, x0:x1] == cls + 1) & (part != 255) & (part != 0)
    if not own.any():
        return None
    ys, xs = np.nonzero(own)
    nearest = int(np.argmin((ys + y0 + 0.5 - cy) ** 2 + (xs + x0 + 0.5 - cx) ** 2))
    return f"beside {names[int(part[ys[nearest], xs[nearest]])]}"

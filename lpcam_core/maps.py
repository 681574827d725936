"""LPCAM maps (steps 5-6 of the method, docs/method.md) and the baseline CAM they replace, in the IRN family's file format.

Every similarity is computed in float32, with autocast disabled, whatever the input dtype.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from .bank import PrototypeBank
from .classifier import as_linear_weight
from .config import short_repr
from .finite import all_finite
from .precision import float32_maths

logger = logging.getLogger(__name__)

__all__ = [
    "lpcam_map",
    "lpcam_multiscale",
    "cam_map",
    "cam_multiscale",
    "strided_size",
    "strided_up_size",
    "normalise_by_max",
]


def strided_size(size: Sequence[int], stride: int) -> tuple[int, int]:
    """(ceil(H / stride), ceil(W / stride)), the IRN family's ``get_strided_size``."""
    return (int(size[0]) - 1) // stride + 1, (int(size[1]) - 1) // stride + 1


def strided_up_size(size: Sequence[int], stride: int) -> tuple[int, int]:
    """``strided_size`` times ``stride``: the /16-aligned full-resolution grid."""
    h, w = strided_size(size, stride)
    return h * stride, w * stride


def _class_list(classes, name: str = "classes") -> list[int]:
    """Distinct integer class indices (bools, floats and repeats refused)."""
    if isinstance(classes, torch.Tensor):
        if classes.is_floating_point() or classes.dtype == torch.bool:
            raise TypeError(f"{name} must hold integer class indices, got {classes.dtype}")
        out = [int(c) for c in classes.reshape(-1).tolist()]
    elif isinstance(classes, np.ndarray):
        if not np.issubdtype(classes.dtype, np.integer):
            raise TypeError(f"{name} must hold integer class indices, got {classes.dtype}")
        out = [int(c) for c in classes.reshape(-1)]
    elif isinstance(classes, (bool, np.bool_)):
        raise TypeError(f"{name} must be class indices, got the bool {classes!r}")
    elif isinstance(classes, (int, np.integer)):
        out = [int(classes)]
    else:
        try:
            items = [c for c in classes]
        except TypeError:
            raise TypeError(f"{name} must be a sequence or tensor of class indices, got {type(classes).__name__}") from None
        if not all(isinstance(c, (int, np.integer)) and not isinstance(c, (bool, np.bool_)) for c in items):
            raise TypeError(f"{name} must hold integer class indices, got {short_repr(items)}")
        out = [int(c) for c in items]
    if len(set(out)) < len(out):
        raise ValueError(f"{name} repeats a class: {short_repr(out)} (one map per class)")
    if any(c < 0 for c in out):
        raise ValueError(f"{name} must be 0-based class indices >= 0, got {short_repr(out)}")
    return out


def _check_features(x: torch.Tensor, name: str, ndims: tuple[int, ...], channels: int | None) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.ndim not in ndims:
        shapes = " or ".join({3: "[C, h, w]", 4: "[B, C, h, w]"}[d] for d in ndims)
        raise ValueError(f"{name} must be {shapes}, got shape {tuple(x.shape)}")
    if not x.is_floating_point():
        raise TypeError(f"{name} must be floating point, got {x.dtype}")
    if channels is not None and x.shape[-3] != channels:
        raise ValueError(f"{name} has {x.shape[-3]} channels, the prototype bank {channels}")
    if not all_finite(x):
        raise ValueError(f"{name} holds NaN or inf values")


def lpcam_map(fused: torch.Tensor, bank: PrototypeBank, classes, *, missing: str = "error") -> torch.Tensor:
    """LPCAM of ``classes`` on one feature map (step 5 of the method), all classes in one matmul.

    ``A_c = mean_i cos(f, P_c,i) - mean_j cos(f, B_c,j)`` then ReLU; a class with no context prototype
    gets the bare mean similarity, neither subtraction nor ReLU (the official release's rule).

    Args:
        fused: [C, h, w] or [B, C, h, w] local features (the flip-fused sum for inference).
        bank: the prototypes.
        classes: sequence or tensor of class indices.
        missing: a class without prototypes in ``bank``: ``"error"`` (``ValueError``, default) or ``"zeros"``
            (an all-zero map, with a warning the first time the class is met), as for :func:`lpcam_multiscale`.

    Returns:
        [n, h, w] or [B, n, h, w] float32 on ``fused``'s device.
    """
    if missing not in ("error", "zeros"):
        raise ValueError(f"missing={missing!r}: expected 'error' or 'zeros'")
    _check_features(fused, "fused", (3, 4), bank.feature_dim)
    requested = _class_list(classes)
    keys = [k for k in requested if k in bank.foreground] if missing == "zeros" else requested
    keys = bank.check_classes(keys, "classes")
    single = fused.ndim == 3
    x = fused[None] if single else fused
    out = _lpcam_map_checked(x, bank, keys)
    if len(keys) < len(requested):
        _warn_missing(requested, keys)
        full = out.new_zeros(x.shape[0], len(requested), *x.shape[2:])
        full[:, [requested.index(k) for k in keys]] = out
        out = full
    return out[0] if single else out


def _lpcam_map_checked(x: torch.Tensor, bank: PrototypeBank, keys: list[int]) -> torch.Tensor:
    """:func:`lpcam_map` on validated [B, C, h, w] features and class indices. Returns [B, n, h, w] float32."""
    b, c, h, w = x.shape
    if not keys:  # no class requested (an image with no present class): an empty stack of maps
        return torch.zeros(b, 0, h, w, dtype=torch.float32, device=x.device)
    with float32_maths(x.device):
        directions, has_context = bank.directions(keys, x.device)
        flat = x.float().reshape(b, c, h * w)  # [B, C, hw]: channels stay the reduced, outer dim
        # cos(f, p) = (p/|p|) . f / max(|f|, 1e-8), as F.normalize / F.cosine_similarity (eps 1e-8); the mean
        # over a class's prototypes minus the mean over its context ones is one direction (Bank.directions).
        # The squared sum over the outer dim vectorises well (linalg.vector_norm over it does not, on the CPU).
        norm = (flat * flat).sum(dim=1).sqrt_().clamp_min_(1e-8)  # [B, hw]
        scores = torch.matmul(directions, flat) / norm[:, None, :]  # [B, n, hw]
        scores = torch.where(has_context[:, None], scores.clamp_min(0.0), scores)
        return scores.reshape(b, len(keys), h, w)


def normalise_by_max(maps: torch.Tensor, eps: float = 0.0) -> torch.Tensor:
    """Divide each [h, w] map of [n, h, w] by its maximum (+ eps).

    The release divides by the bare maximum. A map whose maximum is not positive has no evidence for
    the class anywhere: dividing would flip or blow up its values, so such a map becomes all zeros
    (documented guard; with eps > 0 the division is the IRN family's ``max + eps`` instead).
    """
    peak = maps.flatten(1).max(dim=1).values[:, None, None] if maps.numel() else maps.new_zeros(maps.shape[0], 1, 1)
    if eps > 0:
        return maps / (peak + eps)
    positive = peak > 0
    return torch.where(positive, maps / torch.where(positive, peak, torch.ones_like(peak)), torch.zeros_like(maps))


def _resize_and_average(per_scale: list[torch.Tensor], image_size: tuple[int, int], eps: float):
    """Per-scale maps [n, h_s, w_s] -> (cam [n, H/4, W/4], high_res [n, H, W]) averaged and max-normalised."""
    height, width = image_size
    small = strided_size(image_size, 4)
    large = strided_up_size(image_size, 16)
    cams, highs = [], []
    for maps in per_scale:
        maps = maps[:, None]  # each class resized alone, as [n, 1, h, w]
        cams.append(F.interpolate(maps, small, mode="bilinear", align_corners=False)[:, 0])
        highs.append(F.interpolate(maps, large, mode="bilinear", align_corners=False)[:, 0, :height, :width])
    cam = normalise_by_max(torch.stack(cams).mean(0), eps)
    high = normalise_by_max(torch.stack(highs).mean(0), eps)
    return cam, high


def _check_multiscale(features, image_size) -> tuple[int, int]:
    if isinstance(features, torch.Tensor):
        features = [features]
    if not isinstance(features, (list, tuple)) or not features:
        raise TypeError("features must be a non-empty list over scales of [2, C, h, w] tensors (image, flipped image)")
    try:
        values = list(image_size)
        if len(values) != 2 or not all(isinstance(v, (int, np.integer)) and not isinstance(v, (bool, np.bool_))
                                       or isinstance(v, torch.Tensor) and v.numel() == 1 and not v.is_floating_point()
                                       and v.dtype != torch.bool for v in values):
            raise TypeError
        height, width = (int(v) for v in values)
    except (TypeError, ValueError):
        raise TypeError(f"image_size must be (H, W) integers, got {short_repr(image_size)}") from None
    if height < 1 or width < 1:
        raise ValueError(f"image_size must be positive, got {image_size!r}")
    return height, width


def lpcam_multiscale(features, bank: PrototypeBank, keys, image_size, *, eps: float = 0.0,
                     missing: str = "error") -> dict:
    """LPCAM for one image over scales and flips, in the IRN family's file format (steps 5-6 of the method, docs/method.md).

    At each scale the flipped view's features are flipped back and added to the image's
    (``fused = f[0] + f[1].flip(-1)``) before any similarity; the per-scale maps are bilinearly resized to
    the stride-4 grid and to the /16-aligned grid cropped to the image, averaged over scales and divided
    by their maximum (see :func:`normalise_by_max` for the guard on non-positive maxima).

    Args:
        features: list over scales of [2, C, h_s, w_s] (image, flipped image); a single [2, C, h, w]
            tensor counts as one scale.
        bank: the prototypes.
        keys: the present classes (sequence or tensor of indices).
        image_size: (H, W) of the original image.
        eps: added to the maximum (0, the release's bare division).
        missing: a present class without prototypes in ``bank``: ``"error"`` (``ValueError``, default)
            or ``"zeros"`` (an all-zero map, with a warning the first time the class is met): what a host
            whose file must hold a map for every present class needs.

    Returns:
        ``{"keys": int64 tensor [n], "cam": float32 tensor [n, ceil(H/4), ceil(W/4)] (CPU),
        "high_res": float32 numpy [n, H, W]}``.
    """
    if missing not in ("error", "zeros"):
        raise ValueError(f"missing={missing!r}: expected 'error' or 'zeros'")
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not (math.isfinite(eps) and eps >= 0):
        raise ValueError(f"eps={short_repr(eps)}: expected a finite number >= 0")
    height, width = _check_multiscale(features, image_size)
    features = [features] if isinstance(features, torch.Tensor) else list(features)
    requested = _class_list(keys, "keys")
    if missing == "zeros":
        known = [k for k in requested if k in bank.foreground]
        if len(known) < len(requested):
            return _with_zero_maps(requested, known, lpcam_multiscale(features, bank, known, image_size, eps=eps),
                                   (height, width))
    class_list = bank.check_classes(requested, "keys")
    per_scale = []
    for i, pair in enumerate(features):
        _check_features(pair, f"features[{i}]", (4,), bank.feature_dim)
        if pair.shape[0] != 2:
            raise ValueError(f"features[{i}] must hold 2 views (image, flipped image), got {pair.shape[0]}")
        with torch.autocast(device_type=pair.device.type, enabled=False):
            fused = pair[0].float() + pair[1].float().flip(-1)
        if not all_finite(fused):  # two finite float32 views near the float32 limit can sum to inf
            raise ValueError(f"features[{i}]: the image and flipped-image features sum to inf (values near the float32 limit)")
        per_scale.append(_lpcam_map_checked(fused[None], bank, class_list)[0])
    return _irn_record(class_list, per_scale, (height, width), eps)


_warned_missing: set[int] = set()


def _warn_missing(requested: list[int], known: list[int]) -> None:
    """Warn once per process about each requested class with no prototype (its maps are zero)."""
    new = sorted(set(requested) - set(known) - _warned_missing)
    if new:
        _warned_missing.update(new)
        logger.warning("classes %s have no prototype in the bank: their LPCAM maps are zero", new)


def _with_zero_maps(requested: list[int], known: list[int], record: dict, image_size: tuple[int, int]) -> dict:
    """``record`` of the ``known`` classes spread into maps of every ``requested`` class (zeros elsewhere)."""
    _warn_missing(requested, known)
    cam = torch.zeros(len(requested), *strided_size(image_size, 4))
    high = np.zeros((len(requested), *image_size), dtype=np.float32)
    for j, k in enumerate(known):
        i = requested.index(k)
        cam[i] = record["cam"][j]
        high[i] = record["high_res"][j]
    return {"keys": torch.tensor(requested, dtype=torch.int64), "cam": cam, "high_res": high}


def _irn_record(class_list: list[int], per_scale: list[torch.Tensor], image_size: tuple[int, int], eps: float) -> dict:
    if not class_list:
        small = strided_size(image_size, 4)
        return {
            "keys": torch.zeros(0, dtype=torch.int64),
            "cam": torch.zeros(0, *small),
            "high_res": np.zeros((0, *image_size), dtype=np.float32),
        }
    cam, high = _resize_and_average(per_scale, image_size, eps)
    return {
        "keys": torch.tensor(class_list, dtype=torch.int64),
        "cam": cam.float().cpu(),
        "high_res": high.float().cpu().numpy(),
    }


def cam_map(features: torch.Tensor, classifier_weight: torch.Tensor, classes=None) -> torch.Tensor:
    """The baseline CAM ``ReLU(W . f)`` (no normalisation).

    Args:
        features: [C, h, w] or [B, C, h, w].
        classifier_weight: [num_classes, C] (or a [num_classes, C, 1, 1] conv weight).
        classes: optional class indices to keep (default: all).

    Returns:
        [n, h, w] or [B, n, h, w] float32.
    """
    weight = as_linear_weight(classifier_weight, "classifier_weight")
    _check_features(features, "features", (3, 4), weight.shape[1])
    if classes is not None:
        weight = weight[_class_list(classes)]
    with torch.autocast(device_type=features.device.type, enabled=False):
        out = torch.einsum("...chw,nc->...nhw", features.float(), weight.to(features.device).float())
    return out.clamp_min(0.0)


def cam_multiscale(features, classifier_weight: torch.Tensor, keys, image_size, *, eps: float = 1e-5) -> dict:
    """The IRN family's own multi-scale CAM (its ``make_cam``), in the same file format.

    Per scale ``relu(W f(img)) + flip(relu(W f(flip img)))``, resized like :func:`lpcam_multiscale`,
    summed over scales and divided by ``max + 1e-5``.

    Args:
        features: list over scales of [2, C, h_s, w_s] (image, flipped image).
        classifier_weight: [num_classes, C].
        keys: present classes.
        image_size: (H, W).
        eps: added to the maximum (IRN: 1e-5).
    """
    height, width = _check_multiscale(features, image_size)
    features = [features] if isinstance(features, torch.Tensor) else list(features)
    class_list = _class_list(keys, "keys")
    per_scale = []
    for i, pair in enumerate(features):
        _check_features(pair, f"features[{i}]", (4,), None)
        if pair.shape[0] != 2:
            raise ValueError(f"features[{i}] must hold 2 views (image, flipped image), got {pair.shape[0]}")
        maps = cam_map(pair, classifier_weight, class_list)
        per_scale.append(maps[0] + maps[1].flip(-1))
    # Mean and sum differ by a constant factor, which the max division removes (eps aside: the sum,
    # as IRN, is kept so the eps acts exactly as in the host).
    record = _irn_record(class_list, [m * len(per_scale) for m in per_scale], (height, width), eps)
    return record

"""LPCAM for any model: a context manager in the style of torchcam / pytorch-grad-cam.

Example:
    >>> model = torchvision.models.resnet18(weights=None, num_classes=20)
    >>> with LPCAM(model, feature_layer="layer4", classifier="fc") as lp:
    ...     lp.fit(train_loader)                 # batches of (images [B,3,H,W], labels [B,20] multi-hot)
    ...     maps = lp(images, [[3], [7, 12]])    # list of [n_i, H, W] LPCAM maps in [0, 1]

Forward hooks only, removed on exit; each module's ``.training`` flag is restored on exit; activations
stay on their device. ViT token outputs are turned into feature maps by dropping ``num_prefix_tokens``
and reshaping (or by your ``reshape_transform``).
"""

from __future__ import annotations

import difflib
import logging
from collections.abc import Callable, Iterable, Sequence

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from .bank import PrototypeBank
from .classifier import LinearScorer, equivalent_linear
from .config import LPCAMConfig
from .maps import cam_multiscale, lpcam_multiscale
from .precision import backbone_autocast

__all__ = ["LPCAM", "find_module"]

logger = logging.getLogger(__name__)


def find_module(model: nn.Module, layer: nn.Module | str, argument: str = "layer") -> nn.Module:
    """A submodule given as a module or a dotted name; a clear error lists close names."""
    if isinstance(layer, nn.Module):
        if not any(m is layer for m in model.modules()):
            raise ValueError(f"{argument}: the module given is not part of the model")
        return layer
    if not isinstance(layer, str):
        raise TypeError(f"{argument} must be an nn.Module or a dotted module name, got {type(layer).__name__}")
    modules = dict(model.named_modules())
    if layer in modules:
        return modules[layer]
    close = difflib.get_close_matches(layer, [n for n in modules if n], n=5, cutoff=0.5)
    hint = f"; close names: {close}" if close else f"; top-level modules: {[n for n, _ in model.named_children()]}"
    raise ValueError(f"{argument}={layer!r} is not a module of {type(model).__name__}{hint}")


class LPCAM:
    """Local-prototype CAM extractor for any CNN or ViT.

    Args:
        model: the trained multi-label classifier.
        feature_layer: module (or dotted name) whose output is the local feature map [B, C, h, w]
            (or ViT tokens [B, N, C]).
        classifier: module (or dotted name) of the classifier: Linear, 1x1 conv or k x k conv.
        config: LPCAM settings (default ``LPCAMConfig.preset("voc")``).
        bank: an existing prototype bank (skips :meth:`fit`).
        num_prefix_tokens: ViT tokens to drop before reshaping (class/distillation tokens).
        reshape_transform: custom callable ``output -> [B, C, h, w]`` (overrides the default).
        eval_mode: put the model in eval mode inside the context (restored on exit).
        amp: the backbone of the map passes (:meth:`record`, calling the extractor) under autocast
            (:func:`lpcam_core.precision.backbone_autocast`: bfloat16 on the CPU, float16 on CUDA);
            the similarities stay float32, :meth:`fit` and :meth:`cam` stay float32 (the bank does not
            change). Off by default: docs/performance.md measures what it changes.

    The baseline CAM used to split the pools is ``ReLU(W f + b)`` from the same classifier, over
    ``config.scales`` with flips, max-normalised as the IRN family does.
    """

    def __init__(
        self,
        model: nn.Module,
        feature_layer: nn.Module | str,
        classifier: nn.Module | str | torch.Tensor,
        *,
        config: LPCAMConfig | None = None,
        bank: PrototypeBank | None = None,
        num_prefix_tokens: int = 0,
        reshape_transform: Callable[[torch.Tensor], torch.Tensor] | None = None,
        eval_mode: bool = True,
        amp: bool = False,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
        self.model = model
        self.layer = find_module(model, feature_layer, "feature_layer")
        head = classifier if isinstance(classifier, torch.Tensor) else find_module(model, classifier, "classifier")
        self.classifier_weight, self.classifier_bias = equivalent_linear(head)
        self.num_classes = int(self.classifier_weight.shape[0])
        self.config = config if config is not None else LPCAMConfig.preset("voc")
        self.bank = bank
        if bank is not None:
            bank.check_fits(num_classes=self.num_classes, feature_dim=self.classifier_weight.shape[1])
        if num_prefix_tokens < 0:
            raise ValueError(f"num_prefix_tokens must be >= 0, got {num_prefix_tokens}")
        self.num_prefix_tokens = num_prefix_tokens
        self.reshape_transform = reshape_transform
        self.eval_mode = eval_mode
        self.amp = bool(amp)
        self._handle = None
        self._training: list[tuple[nn.Module, bool]] = []
        self._captured: torch.Tensor | None = None

    # ------------------------------------------------------------------ context
    def __enter__(self) -> LPCAM:
        self._training = [(m, m.training) for m in self.model.modules()]
        if self.eval_mode:
            for module in self.model.modules():
                module.training = False
        self._handle = self.layer.register_forward_hook(self._hook)
        return self

    def __exit__(self, *exc) -> None:
        self.remove()

    def remove(self) -> None:
        """Remove the hook and restore every module's training flag."""
        if self._handle is not None:
            self._handle.remove()
            self._handle = None
        for module, flag in self._training:
            module.training = flag
        self._training = []
        self._captured = None

    def _hook(self, module: nn.Module, inputs, output) -> None:
        self._captured = output[0] if isinstance(output, (tuple, list)) else output

    # ------------------------------------------------------------------ features
    def features(self, images: torch.Tensor) -> torch.Tensor:
        """Run the model and return the hooked local features [B, C, h, w] (on their device)."""
        if self._handle is None:
            raise RuntimeError("LPCAM must be used as a context manager: `with LPCAM(...) as lp: ...`")
        if not isinstance(images, torch.Tensor) or images.ndim != 4:
            raise ValueError(f"images must be a [B, 3, H, W] tensor, got {getattr(images, 'shape', type(images).__name__)}")
        self._captured = None
        with torch.no_grad():
            self.model(images)
        out = self._captured
        self._captured = None
        if out is None:
            raise RuntimeError("feature_layer was not called during the forward pass")
        return self._to_map(out, images.shape[-2:])

    def _to_map(self, out: torch.Tensor, image_hw) -> torch.Tensor:
        if self.reshape_transform is not None:
            out = self.reshape_transform(out)
        elif out.ndim == 3:  # ViT tokens [B, N, C]
            tokens = out[:, self.num_prefix_tokens :]
            n = tokens.shape[1]
            height, width = (int(v) for v in image_hw)
            h = max(1, round(height * (n / (height * width)) ** 0.5))
            w = n // h
            if h * w != n:
                raise ValueError(
                    f"cannot reshape {n} tokens to a grid for a {height}x{width} image; "
                    "set num_prefix_tokens or pass reshape_transform"
                )
            out = tokens.transpose(1, 2).reshape(tokens.shape[0], tokens.shape[2], h, w)
        if out.ndim != 4:
            raise ValueError(f"feature_layer output must be [B, C, h, w] or [B, N, C] tokens, got {tuple(out.shape)}")
        if out.shape[1] != self.classifier_weight.shape[1]:
            raise ValueError(
                f"feature_layer gives {out.shape[1]} channels but the classifier takes {self.classifier_weight.shape[1]}"
            )
        return out

    def _views(self, image: torch.Tensor, scales: Sequence[float]) -> list[torch.Tensor]:
        """Per scale, the features [2, C, h, w] of (image, flipped image) for one image [3, H, W]."""
        out = []
        for scale in scales:
            x = image[None]
            if scale != 1.0:
                size = [max(1, round(v * scale)) for v in image.shape[-2:]]
                x = F.interpolate(x, size=size, mode="bilinear", align_corners=False)
            out.append(self.features(torch.cat([x, x.flip(-1)])))
        return out

    # ------------------------------------------------------------------ prototypes
    def fit(
        self,
        loader: Iterable,
        *,
        cam_scales: Sequence[float] | None = None,
        progress: bool = True,
        class_names: Sequence[str] | None = None,
    ) -> PrototypeBank:
        """Build the prototype bank from labelled training images (steps 1-4 of the method, docs/method.md).

        Args:
            loader: yields ``(images [B, 3, H, W], labels)`` with labels multi-hot [B, num_classes]
                or a list of per-image class-index lists.
            cam_scales: scales of the baseline CAM that splits the pools (default ``config.scales``);
                pool features come from scale 1.0 without flip, as in the release.
            progress: progress bar.
            class_names: stored in the bank.
        """
        from tqdm.auto import tqdm

        from .run import stream_prototypes

        scales = tuple(cam_scales) if cam_scales is not None else self.config.scales
        # The scale-1 view's first row is the unflipped image: pooled without a second forward pass.
        unflipped = scales.index(1.0) if 1.0 in scales else None

        def stream():
            index = 0
            for images, labels in tqdm(loader, desc="LPCAM features", disable=not progress, leave=False):
                for image, keys in zip(images, _label_lists(labels, self.num_classes)):
                    if not keys:
                        continue
                    views = self._views(image, scales)
                    baseline = self._cam_of_views(views, keys, image.shape[-2:])["high_res"]
                    feats = views[unflipped][0] if unflipped is not None else self.features(image[None])[0]
                    yield index, (feats, torch.from_numpy(baseline), keys)
                    index += 1

        scorer = LinearScorer(self.classifier_weight, self.classifier_bias)
        self.bank = stream_prototypes(stream(), self.num_classes, scorer, config=self.config, class_names=class_names,
                                      progress=progress)
        return self.bank

    # ------------------------------------------------------------------ maps
    def cam(self, image: torch.Tensor, keys: Sequence[int], *, scales: Sequence[float] | None = None) -> dict:
        """The baseline CAM of one image [3, H, W] in the IRN file format (``cam``, ``high_res``)."""
        scales = tuple(scales) if scales is not None else self.config.scales
        return self._cam_of_views(self._views(image, scales), keys, image.shape[-2:])

    def _cam_of_views(self, views: list[torch.Tensor], keys: Sequence[int], image_hw) -> dict:
        if self.classifier_bias is not None:  # CAM = ReLU(W f + b)
            return _cam_with_bias(views, self.classifier_weight, self.classifier_bias, list(keys), image_hw)
        return cam_multiscale(views, self.classifier_weight, list(keys), image_hw)

    def record(self, image: torch.Tensor, keys: Sequence[int], *, scales: Sequence[float] | None = None) -> dict:
        """LPCAM of one image [3, H, W] in the IRN file format ``{keys, cam, high_res}``."""
        if self.bank is None:
            raise RuntimeError("no prototype bank: call fit(loader) first or pass bank=")
        scales = tuple(scales) if scales is not None else self.config.scales
        with backbone_autocast(image.device, self.amp):
            views = self._views(image, scales)
        return lpcam_multiscale(views, self.bank, list(keys), image.shape[-2:], eps=self.config.max_normalise_eps)

    def __call__(self, images: torch.Tensor, classes, *, scales: Sequence[float] | None = None) -> list[torch.Tensor]:
        """LPCAM maps at image resolution.

        Args:
            images: [B, 3, H, W].
            classes: one list of class indices for all images, or one list per image.
            scales: inference scales (default ``config.scales``), each with its flip.

        Returns:
            list of B float32 tensors [n_i, H, W] in [0, 1].
        """
        per_image = _per_image_classes(classes, images.shape[0])
        return [torch.from_numpy(self.record(img, keys, scales=scales)["high_res"]) for img, keys in zip(images, per_image)]


def _cam_with_bias(views, weight, bias, keys, image_size) -> dict:
    """cam_multiscale with a classifier bias: the bias is folded in as one constant feature channel."""
    extended = [torch.cat([v, torch.ones_like(v[:, :1])], dim=1) for v in views]
    weight = torch.cat([weight, bias.reshape(-1, 1).to(weight)], dim=1)
    return cam_multiscale(extended, weight, keys, image_size)


def _label_lists(labels, num_classes: int) -> list[list[int]]:
    if isinstance(labels, torch.Tensor) and labels.ndim == 2:
        if labels.shape[1] != num_classes:
            raise ValueError(f"labels must be multi-hot [B, {num_classes}], got {tuple(labels.shape)}")
        return [torch.nonzero(row > 0).flatten().tolist() for row in labels]
    if isinstance(labels, np.ndarray) and labels.ndim == 2:
        return _label_lists(torch.from_numpy(labels), num_classes)
    return [[int(k) for k in keys] for keys in labels]


def _per_image_classes(classes, batch: int) -> list[list[int]]:
    if isinstance(classes, torch.Tensor):
        classes = classes.tolist()
    classes = list(classes)
    if classes and all(isinstance(c, (int, np.integer)) for c in classes):
        return [[int(c) for c in classes]] * batch
    if len(classes) != batch:
        raise ValueError(f"classes: expected one list of class indices, or {batch} lists (one per image), got {len(classes)}")
    return [[int(c) for c in keys] for keys in classes]

"""The classifier that scores cluster centres: linear weights, fingerprints and scorers.

A centre (a raw mean of local features, [C]) is scored as the classifier scores one local feature:
``p = softmax(centre @ W.T + b)``. :class:`LinearScorer` does that for any Linear, 1x1 conv or
k x k conv head (taps summed: the exact response to a constant map); a host whose classifier
depends on the class being scored (AMN's label-conditioned head) gives a :class:`PerClassScorer`; a
CLIP-style classifier (text embeddings, cosine similarity, a logit scale) gives a :class:`CosineScorer`.
Every probability is computed in float32 with autocast off.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from typing import Protocol, runtime_checkable

import torch
import torch.nn as nn

__all__ = [
    "as_linear_weight",
    "equivalent_linear",
    "classifier_fingerprint",
    "Scorer",
    "LinearScorer",
    "PerClassScorer",
    "CosineScorer",
    "as_scorer",
]


def as_linear_weight(weight: torch.Tensor, name: str = "classifier_weight") -> torch.Tensor:
    """[num_classes, C] from a Linear weight or a 1x1 conv weight [num_classes, C, 1, 1] (detached)."""
    if not isinstance(weight, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor [num_classes, C], got {type(weight).__name__}")
    if weight.ndim == 4 and weight.shape[2:] == (1, 1):
        weight = weight[:, :, 0, 0]
    if weight.ndim != 2:
        raise ValueError(f"{name} must have shape [num_classes, C] (or [num_classes, C, 1, 1]), got {tuple(weight.shape)}")
    return weight.detach()


def equivalent_linear(classifier: nn.Module | torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The linear classifier [num_classes, C] (and bias) acting on one local feature.

    Linear and 1x1 conv give their weight; a k x k conv gives the sum over its taps (its exact response
    to a constant feature map away from the border), plus its bias.
    """
    if isinstance(classifier, torch.Tensor):
        weight, bias = classifier, None
    elif isinstance(classifier, (nn.Linear, nn.Conv2d)):
        weight, bias = classifier.weight, classifier.bias
    else:
        raise TypeError(
            f"classifier must be an nn.Linear, an nn.Conv2d or a weight tensor, got {type(classifier).__name__}"
        )
    weight = weight.detach()
    if weight.ndim == 4:
        weight = weight.sum(dim=(2, 3))
    if weight.ndim != 2:
        raise ValueError(f"classifier weight must be [num_classes, C] or a conv weight, got {tuple(weight.shape)}")
    return weight, (bias.detach() if bias is not None else None)


def classifier_fingerprint(weight: torch.Tensor, bias: torch.Tensor | None = None) -> str:
    """sha256 (first 16 hex digits) of the classifier's float32 values: identifies the checkpoint."""
    digest = hashlib.sha256()
    digest.update(weight.detach().float().cpu().contiguous().numpy().tobytes())
    if bias is not None:
        digest.update(bias.detach().float().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]


@runtime_checkable
class Scorer(Protocol):
    """What scores cluster centres for :meth:`lpcam_core.PrototypeBuilder.build`.

    Attributes:
        num_classes: classes that can be scored (0..num_classes-1).
        feature_dim: C, the length of a centre.
    """

    num_classes: int
    feature_dim: int

    def probability(self, centers: torch.Tensor, class_index: int) -> torch.Tensor:
        """p(class_index | centre) [k] float32 for centres [k, C]."""
        ...

    def fingerprint(self) -> str:
        """Identifies the classifier (stored in the bank, checked when it is reused)."""
        ...


class LinearScorer:
    """``softmax(centres @ W.T + b)`` over all rows of W; class c is row ``c + first_row``.

    Args:
        weight: [rows, C] (or a [rows, C, 1, 1] conv weight).
        bias: optional [rows].
        first_row: rows before class 0 (AMN's 21-way head: 1, its background row; default 0).

    Example:
        >>> scorer = LinearScorer(model.classifier.weight)
        >>> scorer.probability(centres, 3)        # [k]
    """

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None, *, first_row: int = 0) -> None:
        self.weight = as_linear_weight(weight, "classifier_weight")
        if bias is not None:
            bias = bias.detach().reshape(-1)
            if bias.shape[0] != self.weight.shape[0]:
                raise ValueError(f"classifier bias has {bias.shape[0]} entries for {self.weight.shape[0]} rows")
        self.bias = bias
        if isinstance(first_row, bool) or not isinstance(first_row, int) or not 0 <= first_row < self.weight.shape[0]:
            raise ValueError(f"first_row={first_row!r}: expected an int in 0..{self.weight.shape[0] - 1}")
        self.first_row = first_row
        self.num_classes = int(self.weight.shape[0]) - first_row
        self.feature_dim = int(self.weight.shape[1])

    def probability(self, centers: torch.Tensor, class_index: int) -> torch.Tensor:
        check_class_index(class_index, self.num_classes, "LinearScorer")
        with torch.autocast(device_type=centers.device.type, enabled=False):
            logits = centers.float() @ self.weight.to(centers.device).float().T
            if self.bias is not None:
                logits = logits + self.bias.to(centers.device).float().reshape(1, -1)
            return torch.softmax(logits, dim=1)[:, class_index + self.first_row]

    def fingerprint(self) -> str:
        return classifier_fingerprint(self.weight, self.bias)


class PerClassScorer:
    """A scorer whose classifier depends on the class scored (AMN's raw features: its head
    conditioned on the class's label embedding).

    Args:
        scorer_of: class index -> the :class:`Scorer` for that class.
        num_classes, feature_dim: as for :class:`Scorer`.
        fingerprint: identifies the whole classifier.
    """

    def __init__(self, scorer_of: Callable[[int], Scorer], num_classes: int, feature_dim: int, fingerprint: str) -> None:
        self.scorer_of = scorer_of
        self.num_classes = int(num_classes)
        self.feature_dim = int(feature_dim)
        self._fingerprint = fingerprint

    def probability(self, centers: torch.Tensor, class_index: int) -> torch.Tensor:
        check_class_index(class_index, self.num_classes, "PerClassScorer")
        return self.scorer_of(int(class_index)).probability(centers, int(class_index))

    def fingerprint(self) -> str:
        return self._fingerprint


class CosineScorer:
    """``softmax(scale * cos(to_space(centre), rows))`` over all rows; class c is row c.

    A CLIP-style classifier: the rows are text embeddings (one per class prompt, then any extra rows such
    as background prompts, which take part in the softmax but are never scored), and ``to_space`` maps a
    centre of the local features into the embedding space (CLIP's ``ln_post`` and ``proj``; None when the
    features are in that space already).

    Args:
        rows: [rows, D] embeddings; the first ``num_classes`` are the classes.
        scale: the logit scale (CLIP: ``logit_scale.exp()``, 100).
        num_classes: classes among the rows (default: all rows).
        to_space: an ``nn.Module`` [k, C] -> [k, D] applied to the centres (float32, no gradient).
        feature_dim: C (default D; required with ``to_space``).

    Example:
        >>> scorer = CosineScorer(text_features, scale=100.0)     # centres already in the text space
        >>> scorer.probability(centres, 3)                        # [k]
    """

    def __init__(self, rows: torch.Tensor, *, scale: float = 1.0, num_classes: int | None = None,
                 to_space: nn.Module | None = None, feature_dim: int | None = None) -> None:
        self.rows = as_linear_weight(rows, "rows").float()
        total = int(self.rows.shape[0])
        num_classes = total if num_classes is None else num_classes
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or not 0 < num_classes <= total:
            raise ValueError(f"num_classes={num_classes!r}: expected an int in 1..{total} (the rows given)")
        scale = float(scale)
        if not (scale > 0 and scale < float("inf")):
            raise ValueError(f"scale={scale!r}: expected a positive finite logit scale")
        if to_space is not None and not isinstance(to_space, nn.Module):
            raise TypeError(f"to_space must be an nn.Module (its tensors identify the classifier), got "
                            f"{type(to_space).__name__}")
        if to_space is not None and feature_dim is None:
            raise ValueError("feature_dim is required with to_space (the length of a centre before it)")
        self.scale = scale
        self.num_classes = num_classes
        self.to_space = to_space
        self.feature_dim = int(feature_dim if feature_dim is not None else self.rows.shape[1])

    def probability(self, centers: torch.Tensor, class_index: int) -> torch.Tensor:
        check_class_index(class_index, self.num_classes, "CosineScorer")
        with torch.autocast(device_type=centers.device.type, enabled=False), torch.no_grad():
            x = centers.float()
            if self.to_space is not None:
                x = self.to_space.to(centers.device).float()(x).float()
            x = x / x.norm(dim=1, keepdim=True).clamp_min(1e-12)
            rows = self.rows.to(centers.device)
            rows = rows / rows.norm(dim=1, keepdim=True).clamp_min(1e-12)
            return torch.softmax(self.scale * (x @ rows.T), dim=1)[:, class_index]

    def fingerprint(self) -> str:
        digest = hashlib.sha256()
        digest.update(classifier_fingerprint(self.rows).encode())
        digest.update(f"{self.scale!r}/{self.num_classes}".encode())
        if self.to_space is not None:
            for name, tensor in sorted(self.to_space.state_dict().items()):
                digest.update(name.encode())
                digest.update(tensor.detach().float().cpu().contiguous().numpy().tobytes())
        return digest.hexdigest()[:16]


def as_scorer(classifier: torch.Tensor | Scorer, bias: torch.Tensor | None = None) -> Scorer:
    """A :class:`Scorer` from a classifier weight [num_classes, C] (and bias), or the scorer itself."""
    if isinstance(classifier, torch.Tensor):
        return LinearScorer(classifier, bias)
    if bias is not None:
        raise ValueError("bias is given with a Scorer: put the bias into the scorer")
    if not isinstance(classifier, Scorer):
        raise TypeError(f"expected a classifier weight tensor or a Scorer, got {type(classifier).__name__}")
    return classifier


def check_class_index(class_index: object, num_classes: int, where: str) -> int:
    """``class_index`` as an int in 0..num_classes-1; bools and floats are refused (1.7 is not class 1)."""
    import numpy as np

    if isinstance(class_index, (bool, np.bool_)) or not isinstance(class_index, (int, np.integer)):
        raise TypeError(f"{where}: class_index must be an int class index, got {class_index!r}")
    if not 0 <= int(class_index) < num_classes:
        raise ValueError(f"{where}: class_index={int(class_index)} is outside 0..{num_classes - 1}")
    return int(class_index)

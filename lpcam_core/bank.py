"""PrototypeBank: the class and context prototypes of every class, with metadata; safe save and load.

The file is a ``torch.save`` of plain tensors, strings and numbers only, so it loads with
``torch.load(weights_only=True)``: opening a bank never runs code.
"""

from __future__ import annotations

import io
import logging
import os
from collections.abc import Iterable, Mapping
from typing import Any

import torch
import torch.nn.functional as F

from .classifier import as_linear_weight, classifier_fingerprint
from .config import short_repr
from .io import load_refusal
from .version import __version__

__all__ = ["PrototypeBank", "BankError", "classifier_fingerprint", "check_replaceable"]

logger = logging.getLogger(__name__)

FORMAT = "lpcam-prototype-bank"
#: The most classes a bank may declare (ImageNet-21k has 21,841); a file claiming more is refused.
MAX_CLASSES = 100_000
FORMAT_VERSION = 1


class BankError(ValueError):
    """A bank file is unreadable, foreign, or does not fit the model it is used with."""


def check_replaceable(path: str | os.PathLike) -> None:
    """Refuse to write a bank over anything but a bank: a checkpoint, an image or a directory given as the
    bank path by mistake is never replaced.

    Raises:
        BankError: ``path`` exists and is not an LPCAM prototype bank file (names the path).
    """
    path = os.fspath(path)
    if not os.path.lexists(path):
        return
    if not os.path.isfile(path):
        raise BankError(f"bank path {path} exists and is not a regular file: choose another bank path")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
        ours = isinstance(state, dict) and state.get("format") == FORMAT
    except Exception:  # not a torch file, or one weights_only refuses
        ours = False
    if not ours:
        raise BankError(f"bank path {path} holds a file that is not an LPCAM prototype bank (a checkpoint or an "
                        "image?): lpcam never replaces it; choose another bank path or remove the file yourself")


class PrototypeBank:
    """Class (foreground) and context prototypes per class.

    Args:
        foreground: {class_index: [k_c, C]} class prototypes (at least one row per class present).
        context: {class_index: [m_c, C]} context prototypes (m_c may be 0; a missing class means 0).
        meta: metadata (config, feature_dim, num_classes, class_names, classifier_fingerprint,
            features seen per pool, ...). ``feature_dim`` and ``num_classes`` are filled in when absent.

    Example:
        >>> bank = PrototypeBank({0: torch.randn(3, 8)}, {0: torch.randn(2, 8)}, {"num_classes": 1})
        >>> bank.classes, bank.feature_dim
        ([0], 8)
    """

    def __init__(
        self,
        foreground: Mapping[int, torch.Tensor],
        context: Mapping[int, torch.Tensor] | None = None,
        meta: Mapping[str, Any] | None = None,
    ) -> None:
        context = dict(context or {})
        self.meta: dict[str, Any] = dict(meta or {})
        for part, table in (("foreground", foreground), ("context", context)):
            bad = [k for k in table if not _is_index(k)]
            if bad:
                raise BankError(f"{part} keys must be int class indices, got {short_repr(bad[0])}")
        self.foreground = {int(k): _as_prototypes(v, f"foreground[{k}]") for k, v in sorted(foreground.items())}
        context = {int(k): _as_prototypes(v, f"context[{k}]", allow_empty=True) for k, v in context.items()}
        dims = {v.shape[1] for v in self.foreground.values()} | {v.shape[1] for v in context.values() if v.numel()}
        if not self.foreground:
            raise BankError("PrototypeBank: no class has a prototype (foreground is empty)")
        if len(dims) != 1:
            raise BankError(f"PrototypeBank: prototypes of different feature dims {sorted(dims)}")
        (dim,) = dims
        for key, rows in self.foreground.items():
            if rows.shape[0] == 0:
                raise BankError(f"PrototypeBank: class {key} has zero class prototypes")
        stray = sorted(k for k, v in context.items() if v.numel() and k not in self.foreground)
        if stray:
            raise BankError(f"PrototypeBank: context prototypes for classes {stray} that have no class prototype")
        self.context = {key: context.get(key, torch.empty(0, dim)).reshape(-1, dim) for key in self.foreground}
        declared_dim = self.meta.setdefault("feature_dim", dim)
        if not _is_int(declared_dim) or int(declared_dim) != dim:
            raise BankError(f"PrototypeBank: meta feature_dim={short_repr(declared_dim)} but prototypes have {dim} channels")
        num_classes = self.meta.setdefault("num_classes", max(self.foreground) + 1)
        if not _is_int(num_classes) or not 0 < num_classes <= MAX_CLASSES:
            raise BankError(f"PrototypeBank: meta num_classes={short_repr(num_classes)}: expected an int in 1..{MAX_CLASSES}")
        if max(self.foreground) >= num_classes or min(self.foreground) < 0:
            raise BankError(f"PrototypeBank: class indices {short_repr(list(self.foreground))} outside 0..{num_classes - 1}")
        names = self.meta.get("class_names")
        if names is not None and (not isinstance(names, (list, tuple)) or len(names) != int(num_classes)
                                  or not all(isinstance(n, str) and len(n) <= 256 for n in names)):
            raise BankError(f"PrototypeBank: meta class_names must be {int(num_classes)} names of at most 256 "
                            f"characters, got {short_repr(names)}")
        self._stack_cache: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}
        self.library_version: str | None = None  # of the lpcam that saved the file (set by load)

    # ------------------------------------------------------------------ views
    @property
    def classes(self) -> list[int]:
        """Class indices that have prototypes."""
        return list(self.foreground)

    @property
    def feature_dim(self) -> int:
        return int(self.meta["feature_dim"])

    @property
    def num_classes(self) -> int:
        return int(self.meta["num_classes"])

    def without_context(self) -> PrototypeBank:
        """The same class prototypes with every context prototype removed (the paper's ablation)."""
        return PrototypeBank(self.foreground, {}, {**self.meta, "context_removed": True})

    def check_classes(self, classes: Iterable[int], name: str = "classes") -> list[int]:
        """Validate class indices against the bank; returns them as ints."""
        out = [int(c) for c in classes]
        unknown = [c for c in out if c not in self.foreground]
        if unknown:
            raise ValueError(
                f"{name}: class(es) {unknown} have no prototype in this bank "
                f"(it holds classes {self.classes} of {self.num_classes})"
            )
        return out

    def directions(self, classes: Iterable[int], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """Everything :func:`~lpcam_core.maps.lpcam_map` needs for ``classes``, cached per device.

        The mean cosine similarity to k prototypes is the dot product with the mean of their unit
        vectors, so a class's map is one dot product: ``A_c = d_c . f / |f|`` with
        ``d_c = mean_i unit(P_c,i) - mean_j unit(B_c,j)``. The difference is taken in float64, before
        any feature is seen: the class and context means cancel exactly instead of after float32
        rounding of every similarity (docs/method.md).

        Returns:
            directions [n, C] float32 (computed in float64), has_context [n] bool.
        """
        classes = tuple(self.check_classes(classes))
        key = (classes, str(device))
        cached = self._stack_cache.get(key)
        if cached is not None:
            return cached
        rows, has_context = [], []
        for c in classes:
            fg, ctx = self.foreground[c].double(), self.context[c].double()
            direction = F.normalize(fg, dim=1, eps=1e-8).mean(0)
            if ctx.shape[0]:
                direction = direction - F.normalize(ctx, dim=1, eps=1e-8).mean(0)
            rows.append(direction)
            has_context.append(ctx.shape[0] > 0)
        result = (torch.stack(rows).float().to(device), torch.tensor(has_context, device=device))
        if len(self._stack_cache) > 256:
            self._stack_cache.clear()
        self._stack_cache[key] = result
        return result

    def summary(self) -> list[dict[str, Any]]:
        """One row per class (at most :data:`MAX_CLASSES`): index, name, prototype counts, features seen."""
        names = self.meta.get("class_names") or []
        seen = self.meta.get("features_seen") if isinstance(self.meta.get("features_seen"), dict) else {}
        out = []
        for c in range(self.num_classes):
            out.append(
                {
                    "class": c,
                    "name": names[c] if c < len(names) else "",
                    "class_prototypes": int(self.foreground[c].shape[0]) if c in self.foreground else 0,
                    "context_prototypes": int(self.context[c].shape[0]) if c in self.context else 0,
                    "class_features_seen": _count(seen.get(f"class/{c}", 0)),
                    "context_features_seen": _count(seen.get(f"context/{c}", 0)),
                }
            )
        return out

    def __repr__(self) -> str:
        n_fg = sum(v.shape[0] for v in self.foreground.values())
        n_ctx = sum(v.shape[0] for v in self.context.values())
        return (
            f"PrototypeBank(classes={len(self.foreground)}/{self.num_classes}, feature_dim={self.feature_dim}, "
            f"class_prototypes={n_fg}, context_prototypes={n_ctx})"
        )

    # ------------------------------------------------------------------ files
    def state_dict(self) -> dict[str, Any]:
        """Plain tensors and Python values only (``weights_only`` safe)."""
        return {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "library_version": __version__,
            "foreground": {str(k): v.contiguous() for k, v in self.foreground.items()},
            "context": {str(k): v.contiguous() for k, v in self.context.items()},
            "meta": _plain(self.meta),
        }

    def save(self, path: str | os.PathLike) -> None:
        """Write atomically (temporary file, then rename): an existing bank is never half-overwritten.

        Raises:
            BankError: ``path`` holds something other than a bank (:func:`check_replaceable`).
        """
        from .io import atomic_write_bytes

        check_replaceable(path)
        buffer = io.BytesIO()
        torch.save(self.state_dict(), buffer)
        atomic_write_bytes(path, buffer.getvalue())
        logger.info("saved %r to %s", self, path)

    @classmethod
    def load(
        cls,
        path: str | os.PathLike,
        *,
        classifier_weight: torch.Tensor | None = None,
        bias: torch.Tensor | None = None,
        num_classes: int | None = None,
        feature_dim: int | None = None,
    ) -> PrototypeBank:
        """Load and validate a bank.

        Args:
            path: a file written by :meth:`save`.
            classifier_weight, bias: when given, the bank must have been built with this classifier.
            num_classes, feature_dim: when given, the bank must fit a model of this shape.

        Raises:
            FileNotFoundError: no such file.
            BankError: a truncated or foreign file, or a bank that does not fit.
        """
        path = os.fspath(path)
        if not os.path.exists(path):
            raise FileNotFoundError(f"prototype bank not found: {path}")
        if not os.path.isfile(path):
            raise BankError(f"{path}: not a regular file (a directory, FIFO or device); expected a prototype bank file")
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except (PermissionError, IsADirectoryError):
            raise
        except Exception as err:  # foreign bytes fail anywhere in the unpickler (IndexError, KeyError, ...)
            raise BankError(
                f"{path}: not a readable LPCAM prototype bank (truncated or foreign file: {load_refusal(err)})"
            ) from None
        if not isinstance(state, dict) or state.get("format") != FORMAT:
            raise BankError(f"{path}: not an LPCAM prototype bank (no '{FORMAT}' marker)")
        version_of_file = state.get("format_version", -1)
        if not isinstance(version_of_file, int) or isinstance(version_of_file, bool):
            raise BankError(f"{path}: malformed LPCAM prototype bank (format_version {short_repr(version_of_file)})")
        if version_of_file > FORMAT_VERSION:
            raise BankError(
                f"{path}: bank format {state.get('format_version')} is newer than this library reads "
                f"({FORMAT_VERSION}); upgrade lpcam"
            )
        try:
            tables = []
            for part in ("foreground", "context"):
                table = {int(k): v for k, v in state[part].items()}
                if len(table) != len(state[part]):
                    raise ValueError(f"two {part} keys name the same class")
                tables.append(table)
            bank = cls(tables[0], tables[1], state.get("meta", {}))
        except BankError as err:
            raise BankError(f"{path}: {err}") from None
        except (KeyError, TypeError, AttributeError, ValueError, RuntimeError, RecursionError) as err:
            raise BankError(f"{path}: malformed LPCAM prototype bank ({type(err).__name__}: "
                            f"{short_repr(str(err), 200)})") from None
        version = state.get("library_version")
        bank.library_version = str(version)[:64] if version is not None else None
        bank.check_fits(num_classes=num_classes, feature_dim=feature_dim, classifier_weight=classifier_weight, bias=bias, source=path)
        return bank

    def check_fits(
        self,
        *,
        num_classes: int | None = None,
        feature_dim: int | None = None,
        classifier_weight: torch.Tensor | None = None,
        bias: torch.Tensor | None = None,
        source: str = "bank",
    ) -> None:
        """Raise :class:`BankError` when the bank does not fit a model of this shape or classifier."""
        if num_classes is not None and int(num_classes) != self.num_classes:
            raise BankError(f"{source}: built for {self.num_classes} classes, the model has {num_classes}")
        if feature_dim is not None and int(feature_dim) != self.feature_dim:
            raise BankError(f"{source}: built on {self.feature_dim}-d features, the model gives {feature_dim}")
        if classifier_weight is not None:
            weight = as_linear_weight(classifier_weight, "classifier_weight")
            if weight.shape[1] != self.feature_dim:
                raise BankError(f"{source}: built on {self.feature_dim}-d features, the model gives {weight.shape[1]}")
            expected = self.meta.get("classifier_fingerprint")
            got = classifier_fingerprint(weight, bias)
            if expected is None:
                logger.warning("%s: has no classifier fingerprint; cannot check it matches the model", source)
            elif expected != got:
                raise BankError(
                    f"{source}: built with another classifier (fingerprint {expected}, this model's is {got}); "
                    "rebuild the bank for this checkpoint"
                )


def _count(value: Any) -> int:
    return int(value) if _is_int(value) else 0


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_index(value: Any) -> bool:
    """An int class index (Python or numpy integer; bools, floats and strings are not)."""
    import numpy as np

    return _is_int(value) or isinstance(value, np.integer)


def _as_prototypes(value: Any, name: str, allow_empty: bool = False) -> torch.Tensor:
    if not isinstance(value, torch.Tensor):
        raise BankError(f"PrototypeBank: {name} must be a tensor [k, C], got {type(value).__name__}")
    if value.ndim == 1 and value.numel() == 0 and allow_empty:
        return value.reshape(0, 0).float()
    if value.ndim != 2:
        raise BankError(f"PrototypeBank: {name} must be [k, C], got shape {tuple(value.shape)}")
    if not value.is_floating_point():
        raise BankError(f"PrototypeBank: {name} must be floating point, got {value.dtype}")
    if not bool(torch.isfinite(value).all()):
        raise BankError(f"PrototypeBank: {name} holds NaN or inf values")
    value = value.detach().cpu().float()
    if value.numel() and not bool(torch.isfinite(value).all()):
        raise BankError(f"PrototypeBank: {name} holds values beyond float32's range")
    if value.numel() and bool((value.norm(dim=1) == 0).any()):
        raise BankError(f"PrototypeBank: {name} holds an all-zero prototype (it has no direction to compare with)")
    return value


def _plain(value: Any) -> Any:
    """Metadata as str/int/float/bool/None/list/dict only (what ``weights_only`` loads)."""
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    if isinstance(value, torch.Tensor):
        return value.tolist()
    return str(value)

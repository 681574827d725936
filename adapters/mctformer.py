"""``import lpcam_adapters.mctformer`` at the top of MCTformer's ``main.py`` swaps PatchCAM for LPCAM.

MCTformer (https://github.com/xulianuwa/MCTformer, no license: nothing of it is copied here):
V2 (commit c5db727, ``MCTformerV2``) and MCTformer+ (HEAD, ``MCTformerPlus``). Both compute

* local features: the pre-head patch tokens, reshaped by the host to [B, 384, H/16, W/16];
* PatchCAM = ``relu(head(tokens))`` with ``head = Conv2d(384, 20, 3, padding=1)``;
* ``'fused'`` = class-to-patch attention x PatchCAM (MCTformer+ takes its square root).

The import registers, through :mod:`lpcam_adapters.hooks` (nothing of the host is imported):

* ``models:forward`` (``MCTformerV2.forward`` / ``MCTformerPlus.forward``) and ``models:F``: inside
  a swapped attention-map forward (``return_att=True``), the one ``F.relu`` the host applies to the
  head's output returns LPCAM of the head's input tokens instead, so ``'fused'`` = attention x LPCAM,
  ``'patchcam'`` = LPCAM and ``'mct'`` is unchanged, with the host's own arithmetic. Logits are
  untouched. LPCAM is computed in float32 with autocast off (the engine runs under fp16 autocast).
* ``engine:generate_attention_maps_ms``: with ``LPCAM`` on (the default) it loads the prototype bank,
  or builds it (a first, unswapped pass of the host's own generation over the prototype list into
  ``LPCAM_BASELINE_DIR``, then one-scale unflipped tokens streamed into
  :class:`lpcam_core.PrototypeBuilder`), then runs the host's generation with the swap on. The
  engine's patch-affinity refinement, flips, resizing, min-max normalisation and
  ``{class_index: map}`` files are the host's own. ``LPCAM=0`` runs the host unchanged.
  MCTformer V1 has no patch classifier to score prototypes with: it is refused with ``LPCAM`` on.
* modern-stack shims: timm >= 0.6 entry points that receive (and drop) ``pretrained_cfg``,
  ``pretrained_cfg_overlay`` and ``cache_dir``; ``PIL.Image.CUBIC`` (removed in Pillow 10) for
  ``datasets``; MCTformer+'s hard-coded ``.cuda()`` in its patch-logit weights follows the input's
  device (so it runs on CPU). The host's ``torch.load`` calls already pass ``map_location='cpu'``.

Flip: the engine runs the image and its flip as two views; by default (``LPCAM_FLIP=view``) each
view gets its own LPCAM and the engine flips back and sums the fused maps as it does for PatchCAM.
``LPCAM_FLIP=feature`` reproduces the official feature-level fusion
``f(img) + flip(f(flip(img)))`` before any similarity: the first view of a pair runs the backbone
once more on the flipped image, the second view (recognised as the flip of the first) reuses it, so
both views use the same fused LPCAM (+50% backbone cost).

Settings: the common ``LPCAM_*`` variables and this host's :data:`OPTIONS` (``LPCAM_BUILD``,
``LPCAM_HEAD``, ``LPCAM_FLIP``; YAML section ``adapter:``). ``lpcam mctformer prototypes|make -- <main.py
arguments>`` runs the host's ``main.py`` with them.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import functools
import inspect
import logging
import os
import sys
import tempfile
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from types import ModuleType
from typing import Any

from . import compat, hooks
from .base import HostInfo, warn_all_zero_maps
from .lazy import LazyModule
from .settings import HostSettings, Option, read_settings

torch = LazyModule("torch")
nn = LazyModule("torch.nn")
np = LazyModule("numpy")

__all__ = [
    "INFO",
    "OPTIONS",
    "DEFAULT_TAU",
    "UnsupportedModelError",
    "host_kind",
    "score_weight",
    "patch_tokens",
    "lpcam_patchcam",
    "swap",
    "prototype_picks",
    "build_bank",
    "ensure_bank",
    "generate",
    "run_host_main",
    "main_args",
    "install",
    "install_shims",
    "register",
]

logger = logging.getLogger(__name__)

# tau for MCTformer's min-max normalised fused maps; see docs/hosts/mctformer.md for how it was chosen.
DEFAULT_TAU = 0.1

OPTIONS = (
    Option("build", "LPCAM_BUILD", "auto", "auto (default): build a missing bank; never: fail instead; only: build "
           "it and stop", choices=("auto", "never", "only")),
    Option("head", "LPCAM_HEAD", "sum", "sum (default): 3x3 taps summed + bias score the prototypes; centre: the "
           "centre tap + bias", choices=("sum", "centre"), flag="--head",
           parse=lambda v: "centre" if str(v).strip().lower() == "center" else v),
    Option("flip", "LPCAM_FLIP", "view", "view (default): LPCAM per view, the engine fuses flips; feature: official "
           "feature-level fusion", choices=("view", "feature")),
)
INFO = HostInfo(
    name="mctformer",
    title="MCTformer V2 / MCTformer+ (xulianuwa/MCTformer)",
    module=__name__,
    entry_script="main.py",
    signature={"engine.py": "def generate_attention_maps_ms", "models.py": "class MCTformer"},
    options=OPTIONS,
    env_docs={"LPCAM_PRESET": "voc or coco (default: from --data-set): the paper's K, mu_f, mu_b",
              "LPCAM_TAU": f"threshold on the min-max normalised baseline map splitting the pools (default {DEFAULT_TAU})",
              "LPCAM_BANK": "prototype bank file (default <checkpoint without extension>.lpcam_bank.pt beside --resume, "
                            "else <output_dir>/lpcam_bank.pt)",
              "LPCAM_BASELINE_DIR": "baseline maps of the prototype list (default <cam-npy-dir>_baseline)",
              "LPCAM_PROTO_LIST": "ids clustered for prototypes (default <img-list>/train_id.txt, VOC's 1,464)"},
    unread_env=("LPCAM_WORKERS", "LPCAM_DEVICE", "LPCAM_NO_PRETRAINED"),  # the host's main.py runs its own loop
    thresholds="Evaluate with the host's own `python evaluation.py --type npy --curve True ...` (background threshold sweep)",
)

_SUPPORTED = ("MCTformerV2", "MCTformerPlus")


class UnsupportedModelError(RuntimeError):
    """The model has no patch classifier (MCTformer V1) or is not an MCTformer model."""


def settings_for(args: Any = None, environ: Mapping[str, str] | None = None) -> HostSettings:
    """The run's settings: with no preset named, ``--data-set COCO*`` selects the coco preset; MCTformer's
    maps are min-max normalised, so the voc preset gets this host's own tau (:data:`DEFAULT_TAU`)."""
    coco = str(getattr(args, "data_set", "") or "").upper().startswith("COCO")
    return read_settings(OPTIONS, environ, fallback_preset="coco" if coco else "voc", host="mctformer",
                         unread=INFO.unread_env,
                         preset_defaults={"voc": {"fg_threshold": DEFAULT_TAU}})


def configure_logging() -> None:
    from lpcam_core.logs import configure_logging as configure

    configure()

# --------------------------------------------------------------------------- the model


def host_kind(model: nn.Module) -> str:
    """``"MCTformerV2"`` or ``"MCTformerPlus"`` (by class, then by shape).

    Raises:
        UnsupportedModelError: MCTformer V1 (no patch classifier) or a model without a conv head.
    """
    for cls in type(model).__mro__:
        if cls.__name__ in _SUPPORTED:
            return cls.__name__
        if cls.__name__ == "MCTformerV1":
            break
    name = type(model).__name__
    if name == "MCTformerV1" or not isinstance(getattr(model, "head", None), nn.Conv2d):
        raise UnsupportedModelError(
            f"{name}: LPCAM needs MCTformer's patch classifier (the Conv2d head of MCTformer V2 / MCTformer+) "
            "to score local prototypes; MCTformer V1 has only class tokens, whose attention maps are not "
            "scores of local features. Use an MCTformerV2 or MCTformer+ checkpoint, or set LPCAM=0 to run "
            "the host unchanged."
        )
    raise UnsupportedModelError(f"{name} is not an MCTformer V2 / MCTformer+ model (expected one of {_SUPPORTED})")


def score_weight(model: nn.Module, head: str = "sum") -> tuple[torch.Tensor, torch.Tensor | None]:
    """The linear classifier [num_classes, C] (and bias [num_classes]) that scores prototypes.

    Args:
        model: MCTformer V2 / MCTformer+ with its ``head`` Conv2d(C, num_classes, 3, padding=1).
        head: ``"sum"``: the 3x3 taps summed (the conv's exact response to a constant map, away from
            the border); ``"centre"``: the centre tap only.

    Returns:
        (weight [num_classes, C] float32 CPU, bias [num_classes] float32 CPU or None).
    """
    from lpcam_core.classifier import equivalent_linear

    conv = getattr(model, "head", None)
    if not isinstance(conv, nn.Conv2d):
        host_kind(model)  # raises the V1 message
        raise UnsupportedModelError(f"{type(model).__name__}.head is not a Conv2d")
    if head == "sum":
        weight, bias = equivalent_linear(conv)
    elif head in ("centre", "center"):
        kh, kw = conv.weight.shape[2:]
        weight, bias = conv.weight.detach()[:, :, kh // 2, kw // 2], (conv.bias.detach() if conv.bias is not None else None)
    else:
        raise ValueError(f"head={head!r}: expected 'sum' or 'centre'")
    return weight.float().cpu(), (bias.float().cpu() if bias is not None else None)


@contextlib.contextmanager
def _capture_head_input(model: nn.Module) -> Iterator[list[torch.Tensor]]:
    """Record the head's input tokens [B, C, h, w] of every forward inside the block."""
    seen: list[torch.Tensor] = []

    def hook(module: nn.Module, inputs: tuple) -> None:
        seen.append(inputs[0])

    handle = model.head.register_forward_pre_hook(hook)
    try:
        yield seen
    finally:
        handle.remove()


def patch_tokens(model: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """Local features: the pre-head patch tokens as the host reshapes them.

    Runs the host's own (classification) forward and records the head's input.

    Args:
        model: MCTformer V2 / MCTformer+ (eval mode for inputs of any size).
        images: [B, 3, H, W] normalised images.

    Returns:
        [B, C, H // 16, W // 16] (C = 384 for DeiT-S), signed, in the forward's dtype.
    """
    host_kind(model)
    with torch.no_grad(), _capture_head_input(model) as seen, _input_device(images.device):
        model(images)
    if len(seen) != 1:
        raise RuntimeError(f"{type(model).__name__}.forward called its head {len(seen)} times; expected once")
    return seen[0]


def lpcam_patchcam(tokens: torch.Tensor, bank: Any, num_classes: int) -> torch.Tensor:
    """LPCAM in place of PatchCAM: [B, num_classes, h, w] float32, non-negative.

    Classes without prototypes in ``bank`` get zero maps (the engine multiplies absent classes by
    zero anyway). A class without context prototypes gets its bare mean similarity from the core
    (no subtraction, no ReLU, as released); the ReLU here keeps the map non-negative like the
    PatchCAM it replaces (MCTformer+ takes a square root of the fused product).

    Args:
        tokens: [B, C, h, w] (any float dtype; computed in float32 with autocast off).
        bank: :class:`lpcam_core.PrototypeBank`.
        num_classes: the model's classes.
    """
    from lpcam_core import lpcam_map

    b, _, h, w = tokens.shape
    with torch.autocast(device_type=tokens.device.type, enabled=False):
        out = torch.zeros(b, num_classes, h, w, dtype=torch.float32, device=tokens.device)
        classes = [c for c in bank.classes if c < num_classes]
        if classes:
            out[:, classes] = lpcam_map(tokens.float(), bank, classes)
        return out.clamp_min(0.0)


# --------------------------------------------------------------------------- the swap


_local = threading.local()


@contextlib.contextmanager
def _input_device(device: torch.device) -> Iterator[None]:
    previous = getattr(_local, "device", None)
    _local.device = device
    try:
        yield
    finally:
        _local.device = previous


class _Substitution:
    """The one ``F.relu(head output)`` of a swapped forward, answered with LPCAM."""

    def __init__(self, model: nn.Module, compute: Callable[[], torch.Tensor]) -> None:
        self.model = model
        self.compute = compute
        self.shape: tuple[int, ...] | None = None  # head output shape, set by the head's forward hook
        self.used = 0

    def matches(self, tensor: Any) -> bool:
        return isinstance(tensor, torch.Tensor) and self.shape is not None and tuple(tensor.shape) == self.shape

    def take(self) -> torch.Tensor:
        self.used += 1
        if self.used > 1:
            raise RuntimeError(
                f"{type(self.model).__name__}.forward applied F.relu to its head's output twice: this "
                "MCTformer version is not one lpcam_adapters.mctformer knows (V2 c5db727, MCTformer+)"
            )
        return self.compute()


def _relu(real_relu: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
    @functools.wraps(real_relu)
    def relu(input: torch.Tensor, inplace: bool = False) -> torch.Tensor:  # noqa: A002 - torch's name
        sub = getattr(_local, "substitution", None)
        if sub is not None and sub.matches(input):
            return sub.take()
        return real_relu(input, inplace=inplace)

    return relu


@dataclass
class _SwapState:
    bank: Any
    flip: str = "view"
    last: tuple[torch.Tensor, torch.Tensor] | None = None  # feature mode: (flipped input, its partner's tokens)


@contextlib.contextmanager
def swap(model: nn.Module, bank: Any, *, flip: str = "view") -> Iterator[nn.Module]:
    """Inside the block ``model(x, return_att=True, ...)`` uses LPCAM in place of PatchCAM.

    Args:
        model: MCTformer V2 / MCTformer+ whose class was patched by this module's import (models
            loaded through the host's ``models`` module after ``import lpcam_adapters.mctformer``).
        bank: :class:`lpcam_core.PrototypeBank` built with this model's head.
        flip: ``"view"`` or ``"feature"`` (see the module docstring).

    Example:
        >>> with swap(model, bank):
        ...     logits, fused, patch_attn = model(x, return_att=True, attention_type="fused")
    """
    host_kind(model)
    if flip not in ("view", "feature"):
        raise ValueError(f"flip={flip!r}: expected 'view' or 'feature'")
    if not getattr(type(model).forward, "__lpcam_swappable__", False):
        raise RuntimeError(
            f"{type(model).__name__}.forward is not patched: import lpcam_adapters.mctformer before the host's "
            "`models` module (first line of main.py)"
        )
    bank.check_fits(num_classes=model.num_classes, feature_dim=model.embed_dim)
    previous = model.__dict__.get("_lpcam_swap")
    model.__dict__["_lpcam_swap"] = _SwapState(bank, flip)
    try:
        yield model
    finally:
        if previous is None:
            model.__dict__.pop("_lpcam_swap", None)
        else:
            model.__dict__["_lpcam_swap"] = previous


def _flip_tokens(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Tokens [B, C, h, w] of ``x.flip(-1)``, flipped back: the partner of x's tokens in the fusion."""
    outer = getattr(_local, "substitution", None)
    _local.substitution = None  # the nested forward's own F.relu is the real one
    try:
        with _capture_head_input(model) as seen:
            model(x.flip(-1))
    finally:
        _local.substitution = outer
    return seen[-1].flip(-1)


def _swapped_forward(model: nn.Module, state: _SwapState, original: Callable[..., Any], x: torch.Tensor,
                     args: tuple, kwargs: dict) -> Any:
    tokens: list[torch.Tensor] = []

    def compute() -> torch.Tensor:
        t = tokens[0]
        if state.flip == "feature":
            last = state.last
            if last is not None and last[0].shape == x.shape and torch.equal(last[0], x):
                partner = last[1]  # second view of a pair: the first view's tokens, flipped
                state.last = None
            else:
                partner = _flip_tokens(model, x)
                state.last = (x.flip(-1), t.flip(-1))
            with torch.autocast(device_type=t.device.type, enabled=False):
                t = t.float() + partner.float()
        return lpcam_patchcam(t, state.bank, model.num_classes)

    sub = _Substitution(model, compute)

    def pre_hook(module: nn.Module, inputs: tuple) -> None:
        tokens.append(inputs[0])

    def post_hook(module: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
        sub.shape = tuple(output.shape)

    handles = [model.head.register_forward_pre_hook(pre_hook), model.head.register_forward_hook(post_hook)]
    previous = getattr(_local, "substitution", None)
    _local.substitution = sub
    try:
        out = original(model, *args, **kwargs)
    finally:
        _local.substitution = previous
        for h in handles:
            h.remove()
    if sub.used != 1:
        raise RuntimeError(
            f"{type(model).__name__}.forward(return_att=True) did not apply F.relu to its head's output once "
            f"({sub.used} times): this MCTformer version is not one lpcam_adapters.mctformer knows"
        )
    return out


def _make_forward(original: Callable[..., Any]) -> Callable[..., Any]:
    signature = inspect.signature(original)

    @functools.wraps(original)
    def forward(self: nn.Module, *args: Any, **kwargs: Any) -> Any:
        try:
            bound = signature.bind(self, *args, **kwargs)
        except TypeError:
            return original(self, *args, **kwargs)
        x = bound.arguments.get("x")
        device = x.device if isinstance(x, torch.Tensor) else None
        with _input_device(device):
            state = self.__dict__.get("_lpcam_swap")
            if state is None or not bound.arguments.get("return_att", False) or getattr(_local, "substitution", None):
                return original(self, *args, **kwargs)
            return _swapped_forward(self, state, original, x, args, kwargs)

    forward.__lpcam_swappable__ = True  # type: ignore[attr-defined]
    return forward


# --------------------------------------------------------------------------- shims


@functools.cache
def _device_following_tensor() -> type:
    """A tensor class whose ``.cuda()`` goes to the device of the forward's input (MCTformer+ on CPU)."""
    import torch as real_torch

    class DeviceFollowingTensor(real_torch.Tensor):
        def cuda(self, *args: Any, **kwargs: Any) -> real_torch.Tensor:  # type: ignore[override]
            plain = self.as_subclass(real_torch.Tensor)
            target = getattr(_local, "device", None)
            if not args and "device" not in kwargs:
                if target is not None and target.type != "cuda":
                    return plain.to(target)
                if target is None and not real_torch.cuda.is_available():
                    return plain  # no GPU: the model can only be on the CPU
            return plain.cuda(*args, **kwargs)

    return DeviceFollowingTensor


def _torch_with_device_following_logspace() -> ModuleType:
    import torch as real_torch

    real = real_torch.logspace

    @functools.wraps(real)
    def logspace(*args: Any, **kwargs: Any) -> torch.Tensor:
        return real(*args, **kwargs).as_subclass(_device_following_tensor())

    return hooks.module_proxy(real_torch, "logspace follows the input device", logspace=logspace)


def _functional_with_swappable_relu() -> ModuleType:
    import torch.nn.functional as F

    return hooks.module_proxy(F, "relu of the head output answers LPCAM in a swapped forward", relu=_relu(F.relu))


def _pil_with_cubic(pil: ModuleType) -> ModuleType:
    import PIL.Image

    if hasattr(PIL.Image, "CUBIC"):
        return pil
    image = hooks.module_proxy(PIL.Image, "PIL.Image.CUBIC alias", CUBIC=PIL.Image.Resampling.BICUBIC)
    return hooks.module_proxy(pil, "PIL.Image.CUBIC alias", Image=image)


_DROPPED_TIMM_KWARGS = ("pretrained_cfg", "pretrained_cfg_overlay", "cache_dir")


def _entrypoint_without_cfg(fn: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(fn)
    def entrypoint(*args: Any, **kwargs: Any) -> Any:
        for key in _DROPPED_TIMM_KWARGS:
            value = kwargs.pop(key, None)
            if value is not None and key != "pretrained_cfg":
                logger.debug("%s: ignoring %s=%r (not supported by MCTformer's entry point)", fn.__name__, key, value)
        return fn(*args, **kwargs)

    entrypoint.__lpcam_wrapped__ = fn  # type: ignore[attr-defined]
    return entrypoint


def _patch_timm_entrypoints(module: ModuleType) -> hooks.Undo | None:
    """Wrap the module's timm-registered entry points so they drop timm >= 0.6's extra kwargs."""
    try:
        from timm.models import _registry as registry  # timm >= 0.9
    except ImportError:
        try:
            from timm.models import registry  # type: ignore[no-redef]  # timm 0.6-0.8 (0.4.12 passes no cfg)
        except ImportError:
            return None
    table = getattr(registry, "_model_entrypoints", None)
    if not isinstance(table, dict):
        return None
    replaced: dict[str, Callable[..., Any]] = {}
    for name, fn in list(table.items()):
        if getattr(fn, "__module__", None) == module.__name__ and not hasattr(fn, "__lpcam_wrapped__"):
            table[name] = _entrypoint_without_cfg(fn)
            replaced[name] = fn
    if replaced:
        logger.debug("timm entry points of %s accept pretrained_cfg: %s", module.__name__, sorted(replaced))

    def undo() -> None:
        for name, fn in replaced.items():
            if getattr(table.get(name), "__lpcam_wrapped__", None) is fn:
                table[name] = fn

    return undo


def _is_mct_models(module: ModuleType) -> bool:
    return any(isinstance(getattr(module, n, None), type) for n in (*_SUPPORTED, "MCTformerV1"))


def _patch_models_shims(module: ModuleType) -> hooks.Undo | None:
    if not _is_mct_models(module):
        return None
    undos = [u for u in (_patch_timm_entrypoints(module),) if u is not None]
    import torch as real_torch

    if isinstance(getattr(module, "MCTformerPlus", None), type) and getattr(module, "torch", None) is real_torch:
        module.torch = _torch_with_device_following_logspace()
        undos.append(lambda: setattr(module, "torch", real_torch))
    if isinstance(getattr(module, "MCTformerV1", None), type):
        logger.debug("%s defines MCTformerV1: it runs, but LPCAM refuses it (no patch classifier)", module.__name__)

    def undo() -> None:
        for u in reversed(undos):
            u()

    return undo


def _patch_models_swap(module: ModuleType) -> hooks.Undo | None:
    if not _is_mct_models(module):
        return None
    import torch.nn.functional as F

    undos: list[Callable[[], None]] = []
    if getattr(module, "F", None) is F:
        module.F = _functional_with_swappable_relu()
        undos.append(lambda: setattr(module, "F", F))
    elif not getattr(getattr(module, "F", None), "__lpcam_proxy__", None):
        logger.warning("%s has no module-level `F` (torch.nn.functional): the LPCAM swap cannot apply", module.__name__)
        return None
    for name in _SUPPORTED:
        cls = getattr(module, name, None)
        if isinstance(cls, type) and not getattr(cls.forward, "__lpcam_swappable__", False):
            own = "forward" in vars(cls)
            original = cls.forward
            cls.forward = _make_forward(original)
            if own:
                undos.append(lambda cls=cls, original=original: setattr(cls, "forward", original))
            else:
                undos.append(lambda cls=cls: delattr(cls, "forward"))

    def undo() -> None:
        for u in reversed(undos):
            u()

    return undo


def _patch_timm_only(module: ModuleType) -> hooks.Undo | None:
    return _patch_timm_entrypoints(module)


def _make_pil(original: Any, module: ModuleType) -> Any:
    return _pil_with_cubic(original) if isinstance(original, ModuleType) else original


def _make_generate(original: Callable[..., Any], module: ModuleType) -> Callable[..., Any]:
    @functools.wraps(original)
    def generate_attention_maps_ms(data_loader: Any, model: nn.Module, device: Any, args: Any) -> Any:
        """MCTformer's attention-map generation with LPCAM in place of PatchCAM (lpcam_adapters.mctformer)."""
        return generate(original, data_loader, model, device, args)

    return generate_attention_maps_ms


# --------------------------------------------------------------------------- prototypes


def _host_module(name: str, needs: str) -> ModuleType:
    mod = sys.modules.get(name)
    if mod is None or not hasattr(mod, needs):
        raise RuntimeError(f"MCTformer's `{name}` module is not imported (run from the host's main.py)")
    return mod


def default_bank_path(args: Any) -> str:
    """``<checkpoint without extension>.lpcam_bank.pt`` beside ``--resume`` (or ``./lpcam_bank.pt``)."""
    resume = getattr(args, "resume", "") or ""
    if resume and not resume.startswith(("http://", "https://")):
        return os.path.splitext(resume)[0] + ".lpcam_bank.pt"
    return os.path.join(getattr(args, "output_dir", "") or ".", "lpcam_bank.pt")


def default_baseline_dir(args: Any, bank_path: str) -> str:
    """``<cam_npy_dir>_baseline`` (or ``<bank>.baseline`` when no npy directory is set)."""
    npy = getattr(args, "cam_npy_dir", None)
    if npy:
        return os.path.normpath(npy) + "_baseline"
    return bank_path + ".baseline"


def default_proto_list(args: Any) -> str:
    """The first of ``<img_list>/train_id.txt``, ``<img_list>/train.txt``, ``voc12/train_id.txt``."""
    candidates = [os.path.join(getattr(args, "img_list", "") or ".", n) for n in ("train_id.txt", "train.txt")]
    candidates.append(os.path.join("voc12", "train_id.txt"))
    for path in candidates:
        if os.path.isfile(path):
            return path
    raise FileNotFoundError(
        f"no prototype id list: tried {candidates}; set LPCAM_PROTO_LIST to the list of images to cluster "
        "(VOC: the 1,464 train ids)"
    )


def _ids(path: str) -> list[str]:
    from lpcam_core.io import read_id_list

    ids = read_id_list(path)
    if not ids:
        raise ValueError(f"{path}: the prototype id list is empty")
    return ids


@contextlib.contextmanager
def _host_dataset(args: Any, ids: Sequence[str], **changes: Any) -> Iterator[tuple[Any, Any]]:
    """The host's generation dataset (``datasets.build_dataset``) over ``ids``, and the args that made it
    (``args`` with ``changes`` and an id list of its own)."""
    datasets = _host_module("datasets", "build_dataset")
    with tempfile.TemporaryDirectory(prefix="lpcam_mct_") as tmp:
        _write_lists(tmp, ids)
        d_args = copy.copy(args)
        d_args.img_list = tmp
        for key, value in changes.items():
            setattr(d_args, key, value)
        dataset, _ = datasets.build_dataset(is_train=False, gen_attn=True, args=d_args)
        yield dataset, d_args


def _write_lists(folder: str, ids: Sequence[str]) -> None:
    text = "".join(f"{i}\n" for i in ids)
    for name in ("train_aug_id.txt", "train_id.txt", "val_id.txt"):
        with open(os.path.join(folder, name), "w", encoding="utf-8") as handle:
            handle.write(text)


def _loader(dataset: Any, args: Any) -> Any:
    return torch.utils.data.DataLoader(
        dataset, batch_size=1, shuffle=False, num_workers=int(getattr(args, "num_workers", 0) or 0),
        pin_memory=bool(getattr(args, "pin_mem", False)) and torch.cuda.is_available(), drop_last=False,
    )


def baseline_pass(original: Callable[..., Any], model: nn.Module, device: Any, args: Any, ids: Sequence[str],
                  out_dir: str) -> None:
    """The host's own (unswapped) generation over ``ids`` into ``out_dir``; existing files are kept.

    Uses the host's dataset (``datasets.build_dataset``) and engine with the run's scales,
    attention type, layer index and refinement: the maps the host itself would write.
    """
    from lpcam_core.io import should_skip

    todo = [i for i in ids if not should_skip(os.path.join(out_dir, i + ".npy"))]
    logger.info("baseline maps of %d prototype images (%d already in %s)", len(todo), len(ids) - len(todo), out_dir)
    if not todo:
        return
    os.makedirs(out_dir, exist_ok=True)
    with _host_dataset(args, todo, cam_npy_dir=out_dir, attention_dir=None, visualize_cls_attn=True) as (dataset, b_args):
        original(_loader(dataset, args), model, device, b_args)


def _first_view(img: Any) -> torch.Tensor:
    if isinstance(img, (list, tuple)):
        img = img[0]
    return img


def prototype_picks(args: Any, ids: Sequence[str], settings: HostSettings,
                    num_classes: int) -> list[tuple[int | None, str]]:
    """The images clustered, as ``(class or None, id)``: every id (VOC), or COCO's per-class draws.

    With ``settings.lpcam.images_per_class`` (COCO preset: 100) each class draws that many of its
    images with replacement (seeded, the release's draw); the image then feeds that class's pools
    only. Labels come from the host's dataset (no image is read).
    """
    cfg = settings.lpcam
    if cfg.images_per_class is None:
        return [(None, i) for i in ids]
    from lpcam_core.prototypes import sample_images_per_class

    with _host_dataset(args, ids) as (dataset, _):
        labels = {ids[n]: torch.nonzero(torch.as_tensor(np.asarray(dataset.label_list[n])))[:, 0].tolist()
                  for n in range(len(ids))}
    return [(int(c), str(i)) for c, i in sample_images_per_class(labels, cfg.images_per_class, cfg.seed, num_classes)]



def build_bank(model: nn.Module, device: Any, args: Any, picks: Sequence[tuple[int | None, str]], baseline_dir: str,
               settings: HostSettings) -> Any:
    """The prototype bank of one-scale, unflipped patch tokens and the baseline maps, on the run layer.

    Args:
        model: MCTformer V2 / MCTformer+.
        device: where the model runs (the engine's ``device``).
        args: the host's parsed arguments (dataset, lists, loader settings).
        picks: ``(class or None, id)`` from :func:`prototype_picks`; the baseline map of ``id`` is
            ``<baseline_dir>/<id>.npy`` ``{class_index: (H, W) min-max normalised map}``; ``None`` feeds
            every present class, a class index only that class.
        settings: ``settings.lpcam`` drives the builder; the ``head`` option the scoring weight.

    Returns:
        :class:`lpcam_core.PrototypeBank` (not saved).
    """
    from lpcam_core import run
    from lpcam_core.classifier import LinearScorer
    from lpcam_core.formats import load_mctformer_cam

    weight, bias = score_weight(model, settings.option("head"))
    unique = list(dict.fromkeys(i for _, i in picks))
    plan = [run.ClusterItem(i, None if c is None else (c,)) for c, i in picks]
    dev = torch.device(device)
    was_training = model.training
    with _host_dataset(args, unique, scales=[1.0]) as (dataset, _):

        def load(image_id: str) -> tuple[Any, Any, list[int]]:
            img, _label = feed(image_id)
            # the engine's own autocast (fp16 on a GPU), so the tokens are those the swap will see
            with torch.autocast(device_type=dev.type, enabled=dev.type == "cuda"):
                tokens = patch_tokens(model, _first_view(img)[None].to(device))[0]
            maps = load_mctformer_cam(os.path.join(baseline_dir, image_id + ".npy"))
            keys = sorted(maps)
            cams = torch.from_numpy(np.stack([maps[k] for k in keys]).astype(np.float32)) if keys else torch.zeros(0, 1, 1)
            return tokens.float(), cams, keys

        model.eval()
        try:
            with run.ItemFeed(dataset, unique, [p.image_id for p in plan], int(getattr(args, "num_workers", 0) or 0)
                              ) as feed:
                bank = run.build_prototypes(plan, load, int(model.num_classes), LinearScorer(weight, bias),
                                            config=settings.lpcam, device=dev, meta=_bank_meta(model, settings),
                                            record_pool_peak=True)
        finally:
            model.train(was_training)
    return bank


def _bank_meta(model: nn.Module, settings: HostSettings) -> dict[str, Any]:
    return {"host": "mctformer", "model": host_kind(model), "head": settings.option("head")}


def ensure_bank(original: Callable[..., Any], model: nn.Module, device: Any, args: Any, settings: HostSettings) -> Any:
    """Load the run's prototype bank, or build and save it (baseline pass, then clustering).

    Raises:
        FileNotFoundError: no bank and the ``build`` option is ``never``. ValueError: a bank that does not
        fit and ``build=never``.
    """
    from lpcam_core import run
    from lpcam_core.classifier import LinearScorer

    path = settings.bank_path or default_bank_path(args)
    never = settings.option("build") == "never" and not settings.rebuild_bank
    bank = run.reusable_bank(path, LinearScorer(*score_weight(model, settings.option("head"))), settings.lpcam,
                             _bank_meta(model, settings), rebuild=settings.rebuild_bank,
                             required="LPCAM_BUILD=never; build it with LPCAM_BUILD=only or `lpcam mctformer "
                                      "prototypes -- <main.py arguments>`" if never else None)
    if bank is not None:
        return bank
    proto_list = settings.proto_list or default_proto_list(args)
    ids = _ids(proto_list)
    baseline_dir = settings.baseline_dir or default_baseline_dir(args, path)
    from lpcam_core.io import check_output_dir

    data = getattr(args, "data_path", None)
    inputs = [data, os.path.join(data, "JPEGImages"), os.path.join(data, "SegmentationClass")] if data else []
    # the baselines never go where the LPCAM maps or the images are
    check_output_dir(baseline_dir, read_dirs=[getattr(args, "cam_npy_dir", None), *inputs])
    picks = prototype_picks(args, ids, settings, int(model.num_classes))
    unique = list(dict.fromkeys(i for _, i in picks))
    logger.info("building the prototype bank %s from %d images of %s", path, len(unique), proto_list)
    baseline_pass(original, model, device, args, unique, baseline_dir)
    bank = build_bank(model, device, args, picks, baseline_dir, settings)
    bank.meta.update({"proto_list": os.path.abspath(proto_list), "baseline_dir": os.path.abspath(baseline_dir)})
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    bank.save(path)
    return bank


def generate(original: Callable[..., Any], data_loader: Any, model: nn.Module, device: Any, args: Any,
             settings: HostSettings | None = None) -> Any:
    """The patched ``engine.generate_attention_maps_ms``: the host's generation, with LPCAM.

    ``LPCAM=0``: the host's own function, untouched. Otherwise: refuse V1, load or build the bank, and run
    the host's generation inside :func:`swap`.
    """
    configure_logging()
    if settings is None:
        settings = settings_for(args)
    if not settings.enabled:
        logger.info("LPCAM=0: MCTformer's own maps")
        return original(data_loader, model, device, args)
    kind = host_kind(model)
    bank = ensure_bank(original, model, device, args, settings)
    if settings.option("build") == "only":
        logger.info("LPCAM_BUILD=only: prototype bank ready; attention maps not generated")
        return None
    logger.info("%s: LPCAM in place of PatchCAM (attention type %s, flip %s, head %s)", kind,
                getattr(args, "attention_type", "fused"), settings.option("flip"), settings.option("head"))
    with swap(model, bank, flip=settings.option("flip")), _counting_zero_maps(original) as counts:
        result = original(data_loader, model, device, args)
    warn_all_zero_maps(*counts)
    return result


@contextlib.contextmanager
def _counting_zero_maps(generate_fn: Callable[..., Any]) -> Iterator[list[int]]:
    """Inside the block, the engine's ``np.save`` of a ``{class: map}`` dict counts its all-zero maps:
    yields ``[all-zero maps, maps]`` (the engine writes the files; lpcam only looks at what it saves)."""
    namespace = generate_fn.__globals__
    real_np, counts = namespace.get("np", np), [0, 0]

    def save(file: Any, arr: Any, *args: Any, **kwargs: Any) -> Any:
        if isinstance(arr, dict):
            for value in arr.values():
                value = np.asarray(value)
                counts[0] += int(value.size == 0 or not value.any())
                counts[1] += 1
        return real_np.save(file, arr, *args, **kwargs)

    namespace["np"] = hooks.module_proxy(real_np, "counts all-zero LPCAM maps as the engine saves them", save=save)
    try:
        yield counts
    finally:
        namespace["np"] = real_np


# --------------------------------------------------------------------------- running the host

def run_host_main(host_dir: str | os.PathLike, argv: Sequence[str], environ: Mapping[str, str] | None = None) -> None:
    """Run MCTformer's ``main.py`` in this process with the adapter installed (no edit of the host).

    ``sys.path`` gets ``host_dir`` first and ``sys.argv`` is ``[main.py, *argv]``; the working
    directory is left as it is (the host reads ``voc12/cls_labels.npy`` relative to it).
    MCTformer runs in one process, so this reaches all of its work; with a DataLoader whose
    workers are spawned (not forked) the host's ``main.py`` should carry the import line instead
    (``lpcam mctformer patch``).

    Args:
        host_dir: The MCTformer checkout.
        argv: ``main.py`` arguments.
        environ: Variables set for the run (``LPCAM``, ``LPCAM_BANK``, ...), restored afterwards.
    """
    from .cli import run_host_script

    if not os.path.isfile(os.path.join(os.fspath(host_dir), "main.py")):
        raise FileNotFoundError(f"{host_dir}: no main.py (not an MCTformer checkout)")
    run_host_script(host_dir, "main.py", list(argv), environ=dict(environ or {}), install=install)


# --------------------------------------------------------------------------- registration

_register_lock = threading.Lock()


def install_shims() -> None:
    """Register only the modern-stack shims (timm entry points, PIL.Image.CUBIC, MCTformer+ .cuda())."""
    with _register_lock:
        hooks.register_patch(
            "models", "timm_entrypoints_and_cuda", _patch_models_shims,
            description="timm entry points drop pretrained_cfg/pretrained_cfg_overlay/cache_dir; "
            "MCTformer+'s logspace(...).cuda() follows the input's device",
        )
        hooks.register_patch(
            "vision_transformer", "timm_entrypoints", _patch_timm_only,
            description="timm entry points drop pretrained_cfg/pretrained_cfg_overlay/cache_dir",
        )
        hooks.replace_attribute(
            "datasets", "PIL", _make_pil, requires=("VOC12DatasetMS",),
            description="module-local PIL with Image.CUBIC (= BICUBIC; removed in Pillow 10)",
        )
        hooks.replace_attribute(
            "datasets", "np", compat.make_safe_numpy, name="np_safe_load", requires=("VOC12DatasetMS",),
            description="np.load(allow_pickle=True) of cls_labels.npy with a restricted unpickler",
        )


def install() -> None:
    """Register every MCTformer patch (idempotent; runs at import)."""
    install_shims()
    with _register_lock:
        hooks.register_patch(
            "models", "lpcam_swap", _patch_models_swap,
            description="MCTformerV2/MCTformerPlus.forward(return_att=True) inside swap(): LPCAM in place of "
            "PatchCAM (module-local F.relu of the head output)",
        )
        hooks.replace_attribute(
            "engine", "generate_attention_maps_ms", _make_generate, requires=("train_one_epoch",),
            description="LPCAM on: load/build the prototype bank (baseline pass + clustering), then the host's "
            "generation with the swap; LPCAM=0: unchanged; V1 refused",
        )


# --------------------------------------------------------------------------- lpcam mctformer prototypes|make


def main_args(rest: list[str]) -> list[str]:
    """``main.py`` arguments after ``--``, with ``--gen_attention_maps`` added when missing."""
    argv = list(rest)
    if argv[:1] == ["--"]:
        argv = argv[1:]
    if "--gen_attention_maps" not in argv:
        argv.append("--gen_attention_maps")
    return argv


def check_resume(argv: Sequence[str]) -> None:
    """The attention maps come from a trained checkpoint: ``--resume`` must name one (a file, relative to the
    working directory, or a URL) before MCTformer starts."""
    from .cli import script_flags

    value = script_flags(argv).get("--resume")
    if not value:
        raise ValueError("main.py needs --resume <trained checkpoint> after `--` to generate attention maps")
    if not value.startswith(("http://", "https://")) and not os.path.isfile(value):
        raise FileNotFoundError(f"--resume {value}: no such file (relative to the working directory {os.getcwd()})")


def _run_steps(ns: argparse.Namespace, env: dict[str, str]) -> int:
    from lpcam_core import run

    from .cli import settings_env

    env = {**settings_env(ns, INFO), **env}
    for option, var in (("bank", "LPCAM_BANK"), ("proto_list", "LPCAM_PROTO_LIST"), ("baseline_dir", "LPCAM_BASELINE_DIR"),
                        ("flip", "LPCAM_FLIP")):
        if getattr(ns, option, None) is not None:
            env[var] = str(getattr(ns, option))
    if getattr(ns, "rebuild", False):
        env["LPCAM_REBUILD_BANK"] = "1"
    if run.launched_by_torchrun():
        raise ValueError(
            f"`lpcam mctformer {ns.host_command}` does not run under torchrun (this process is rank "
            f"{os.environ['RANK']} of {os.environ['WORLD_SIZE']}): MCTformer's main.py runs as is, in one "
            "process; launch it with one process, without torchrun (`lpcam mctformer ...`)"
        )
    if not ns.rest:
        raise ValueError("give MCTformer's main.py arguments after `--` (model, data, --resume, ...)")
    check_resume(main_args(ns.rest))
    settings_for(None, {**os.environ, **env})  # a malformed setting fails now, before the host starts
    run_host_main(ns.host, main_args(ns.rest), environ=env)
    return 0


def _cmd_prototypes(ns: argparse.Namespace) -> int:
    return _run_steps(ns, {"LPCAM": "1", "LPCAM_BUILD": "only"})


def _cmd_make(ns: argparse.Namespace) -> int:
    env = {"LPCAM": "0"} if ns.off else {"LPCAM": "1", **({"LPCAM_BUILD": ns.build} if ns.build else {})}
    return _run_steps(ns, env)


def _steps(sub: Any) -> None:
    from .cli import add_settings_flags

    def common(p: argparse.ArgumentParser) -> None:
        p.add_argument("--host", required=True, help="MCTformer checkout (its main.py runs unmodified)")
        p.add_argument("--bank", help="prototype bank file (default <checkpoint>.lpcam_bank.pt)")
        p.add_argument("--proto-list", help="ids clustered for prototypes (default <img-list>/train_id.txt)")
        p.add_argument("--baseline-dir", help="baseline maps of the prototype list (default <cam-npy-dir>_baseline)")
        p.add_argument("--rebuild", action="store_true", help="rebuild the bank even when a matching one exists")
        add_settings_flags(p, INFO)
        p.add_argument("rest", nargs=argparse.REMAINDER, help="-- then MCTformer's main.py arguments")

    pr = sub.add_parser("prototypes", help="baseline maps of the prototype list and the prototype bank, then stop")
    common(pr)
    pr.set_defaults(func=_cmd_prototypes)
    mk = sub.add_parser("make", help="MCTformer's attention-map generation with LPCAM (builds a missing bank)")
    common(mk)
    mk.add_argument("--flip", choices=("view", "feature"), help="per-view LPCAM (default) or feature-level flip fusion")
    mk.add_argument("--build", choices=("auto", "never"), help="build a missing bank (auto) or fail (never); "
                    "default: LPCAM_BUILD, else auto")
    mk.add_argument("--off", action="store_true", help="the host's own maps (LPCAM=0)")
    mk.set_defaults(func=_cmd_make)
    from .trial import add_try_mctformer

    add_try_mctformer(sub, INFO)


def register(subparsers: Any) -> None:
    """``lpcam mctformer ...`` (entry point ``lpcam.hosts``)."""
    from .cli import add_host_group

    add_host_group(subparsers, INFO, _steps)


settings_for()  # a malformed LPCAM_* variable fails here, at import, not after training
install()

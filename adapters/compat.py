"""Modern-stack shims for the IRN-family hosts (Python 3.11, torch 2.x, numpy 2.x).

Every shim is a named patch or stand-in registered through :mod:`lpcam_adapters.hooks`, so
``lpcam irn --explain`` lists it and nothing is imported before the host imports it:

* ``voc12.dataloader:load_img_name_list``: numpy >= 1.23's ``np.loadtxt(dtype=np.int32)``
  rejects ids like ``2007_000032``; the replacement parses each id with ``int()`` exactly as
  older numpy did (``2007_000032`` -> ``2007000032``) and always returns a 1-D int32 array
  (``np.loadtxt`` returned a 0-d array for a one-line list).
* ``voc12.dataloader:decode_int_filename``: also accepts an id that is already a string.
* ``<module>:np``: numpy's removed aliases (``np.int``, ``np.float``, ``np.bool``,
  ``np.object``, ``np.str``) for the host modules that use them, local to those modules
  (numpy itself is changed only while such a module's code executes).
* ``step.make_sem_seg_labels:np`` (and ``make_ins_seg_labels``, ReCAM's ``step_coco`` copy):
  ``np.asarray(pack['size'])`` of a DataLoader batch (a list of two one-element tensors) is
  [2, 1] on numpy 2 / torch 2, whose rows numpy refuses as slice bounds (``TypeError: only
  integer scalar arrays can be converted to a scalar index``); the module gets a numpy whose
  ``asarray`` turns such a list into the 1-D ``[h, w]`` (:func:`asarray_collated`), nothing else.
* ``net.resnet50:resnet50``: no ImageNet download when a checkpoint is loaded right after
  (inside :func:`checkpoint_follows`) or always with ``LPCAM_NO_PRETRAINED=1``.
* ``step.make_sem_seg_labels:run`` (and ``make_ins_seg_labels``): IRN's untyped numeric flags
  (``--sem_seg_bg_thres 0.35`` arrives as a string) become numbers (:func:`coerce_args`).
* ``step.<module>:torch``: ``torch.load`` defaults to ``map_location="cpu"`` in the host's
  inference steps, so GPU-saved weights load on any machine.
* stand-ins for ``chainercv`` (the subset the hosts use) and ``pydensecrf`` (raises a clear
  error only when the CRF is actually called), served only when the real package is missing.

Example:
    >>> from lpcam_adapters import compat
    >>> compat.register_irn_family()     # idempotent; the host adapters call it
"""

from __future__ import annotations

import contextlib
import importlib
import logging
import os
import threading
from collections.abc import Iterator
from types import ModuleType
from typing import Any

import numpy as np

from . import hooks

__all__ = [
    "register_irn_family",
    "load_img_name_list",
    "checkpoint_follows",
    "skip_pretrained",
    "numpy_with_aliases",
    "asarray_collated",
    "numpy_with_collated_asarray",
    "torch_with_cpu_load",
    "torch_with_stacking_longtensor",
    "make_stacking_torch",
    "coerce_args",
]

logger = logging.getLogger(__name__)

ENV_NO_PRETRAINED = "LPCAM_NO_PRETRAINED"

# numpy aliases removed in 1.24 (np.bool came back in 2.0 as np.bool_).
_NUMPY_ALIASES: dict[str, Any] = {
    "int": int,
    "float": float,
    "bool": bool,
    "object": object,
    "str": str,
    "complex": complex,
    "long": int,
    "unicode": str,
}

# Host modules that use the aliases: misc.pyutils at import (np.bool default argument),
# the ReCAM/LPCAM voc12.dataloader at call time (np.int, np.str).
_ALIAS_MODULES = ("misc.pyutils", "voc12.dataloader")
# Host steps that slice with np.asarray(pack['size']) of a batch of one.
_COLLATED_SIZE_MODULES = ("step.make_sem_seg_labels", "step.make_ins_seg_labels", "step_coco.make_sem_seg_labels")
# Host modules that read pickled .npy files (np.load(..., allow_pickle=True)): labels, CAM dicts.
PICKLE_READERS = ("voc12.dataloader", "step.cam_to_ir_label", "step.eval_cam", "step.eval_ins_seg", "step.make_cocoann",
                  "step.make_ins_seg_labels", "step.make_sem_seg_labels", "step.amn_cam_to_ir_label",
                  "step.eval_amn_cam", "step_coco.cam_to_ir_label", "step_coco.eval_cam",
                  "step_coco.make_sem_seg_labels")
# Host inference steps that call torch.load.
_TORCH_LOAD_MODULES = ("step.make_cam", "step.make_recam", "step.make_sem_seg_labels", "step.make_ins_seg_labels")

_register_lock = threading.Lock()


# --------------------------------------------------------------------------- VOC id lists


def _parse_id(token: str, path: str, line_no: int) -> int:
    try:
        return int(token)  # accepts "2007_000032" (PEP 515), as numpy < 1.23 did
    except ValueError:
        raise ValueError(
            f"{path}:{line_no}: {token!r} is not an IRN-style numeric image id (like 2007_000032)"
        ) from None


def load_img_name_list(dataset_path: str | os.PathLike) -> np.ndarray:
    """IRN's ``load_img_name_list`` without ``np.loadtxt``: ids as int32.

    Args:
        dataset_path: A list file, one id per line (``2007_000032``); several whitespace
            separated ids per line give a 2-D array, as ``np.loadtxt`` did.

    Returns:
        int32 array [N] (or [N, k]) of ids with the underscore removed (``2007000032``).

    Raises:
        FileNotFoundError: missing list. ValueError: a token that is not a numeric id, or
            rows of different lengths.
    """
    path = os.fspath(dataset_path)
    rows: list[list[int]] = []
    try:
        with open(path, encoding="utf-8") as handle:
            for line_no, line in enumerate(handle, 1):
                tokens = line.split("#", 1)[0].split()
                if tokens:
                    rows.append([_parse_id(t, path, line_no) for t in tokens])
    except UnicodeDecodeError:
        raise ValueError(f"{path}: not UTF-8 text (expected one image id per line)") from None
    widths = {len(r) for r in rows}
    if len(widths) > 1:
        raise ValueError(f"{path}: lines hold different numbers of ids {sorted(widths)}")
    arr = np.asarray(rows, dtype=np.int64).reshape(len(rows), -1) if rows else np.zeros((0, 1), np.int64)
    if arr.size and (arr.max() > np.iinfo(np.int32).max or arr.min() < 0):
        raise ValueError(f"{path}: an id does not fit IRN's int32 ids")
    arr = arr.astype(np.int32)
    return arr[:, 0] if arr.shape[1] == 1 else arr


def _make_loader(orig: Any, module: ModuleType) -> Any:
    return load_img_name_list


def _make_decode(orig: Any, module: ModuleType) -> Any:
    def decode_int_filename(int_filename: Any) -> str:
        if isinstance(int_filename, str) and not int_filename.isdigit():
            return int_filename
        return orig(int_filename)

    decode_int_filename.__doc__ = "IRN's decode_int_filename; an id that is already a string is returned as is."
    return decode_int_filename


# --------------------------------------------------------------------------- numpy aliases


def numpy_with_aliases() -> ModuleType:
    """A module that is numpy plus its removed aliases (``np.int`` ...), for one host module."""
    missing = {name: value for name, value in _NUMPY_ALIASES.items() if name not in np.__dict__}
    return hooks.module_proxy(np, "numpy's removed aliases", __lpcam_numpy_aliases__=True, **missing)


def _numpy_aliases_during_exec(module: ModuleType) -> hooks.Undo:
    added = [name for name in _NUMPY_ALIASES if name not in vars(np)]
    for name in added:
        setattr(np, name, _NUMPY_ALIASES[name])
    real_load, np.load = np.load, safe_np_load  # IRN's voc12.dataloader reads cls_labels.npy at import

    def undo() -> None:
        for name in added:
            if getattr(np, name, None) is _NUMPY_ALIASES[name]:
                delattr(np, name)
        if np.load is safe_np_load:
            np.load = real_load

    return undo


# --------------------------------------------------------------------------- pickled .npy files

_REAL_NP_LOAD = np.load


def safe_np_load(file: Any, mmap_mode: Any = None, allow_pickle: bool = False, *args: Any, **kwargs: Any) -> Any:
    """``np.load`` for host code: a pickled ``.npy`` (``allow_pickle=True``: the hosts' label and CAM dicts) is
    read by lpcam's restricted unpickler (:func:`lpcam_core.io.load_npy`), so a crafted file runs no code; other
    pickles (file objects, ``.npz``) are refused."""
    if allow_pickle and isinstance(file, (str, os.PathLike)) and os.fspath(file).endswith(".npy"):
        from lpcam_core.io import load_npy

        obj = load_npy(file, what="host data")
        if isinstance(obj, np.ndarray):
            return obj
        boxed = np.empty((), dtype=object)
        boxed[()] = obj
        return boxed
    return _REAL_NP_LOAD(file, mmap_mode, False, *args, **kwargs)


def numpy_with_safe_load(base: ModuleType = np) -> ModuleType:
    """``base`` (numpy, or a numpy proxy) with ``load`` = :func:`safe_np_load`, for one host module."""
    return hooks.module_proxy(base, "np.load reads pickles without running code", load=safe_np_load)


def make_safe_numpy(orig: Any, module: ModuleType) -> Any:
    """``replace_attribute`` maker: the module's numpy (or numpy proxy) gets :func:`safe_np_load`."""
    if not isinstance(orig, ModuleType) or orig.__name__ != "numpy":  # not numpy: leave it
        return orig
    return numpy_with_safe_load(orig)


def _make_numpy_alias(orig: Any, module: ModuleType) -> Any:
    if orig is not np:  # the module names something else "np": leave it
        return orig
    return numpy_with_aliases()


# --------------------------------------------------------------------------- collated sizes


def _one_element_tensor(value: Any) -> bool:
    import torch

    return isinstance(value, torch.Tensor) and value.ndim == 1 and value.numel() == 1


def asarray_collated(a: Any, *args: Any, **kwargs: Any) -> np.ndarray:
    """``np.asarray``, except that a list of one-element tensors (a batch of one, collated) is 1-D.

    ``DataLoader`` collates ``(h, w)`` into ``[tensor([h]), tensor([w])]``; numpy 2 makes that a
    [2, 1] array whose entries are not valid slice bounds. Here it becomes ``array([h, w])``.
    """
    if isinstance(a, (list, tuple)) and a and all(_one_element_tensor(v) for v in a):
        a = [v.item() for v in a]
    return np.asarray(a, *args, **kwargs)


def numpy_with_collated_asarray(base: ModuleType = np) -> ModuleType:
    """A module that is ``base`` (numpy) with ``asarray`` = :func:`asarray_collated`, for one host module."""
    return hooks.module_proxy(base, "asarray of a collated size is 1-D", asarray=asarray_collated,
                              __lpcam_collated_asarray__=True)


def _make_collated_numpy(orig: Any, module: ModuleType) -> Any:
    if not isinstance(orig, ModuleType) or orig.__name__ != "numpy":  # not numpy: leave it
        return orig
    return numpy_with_collated_asarray(orig)


# --------------------------------------------------------------------------- ImageNet download

_skip_depth = 0
_skip_lock = threading.Lock()


@contextlib.contextmanager
def checkpoint_follows() -> Iterator[None]:
    """Inside the block, host networks skip their ImageNet download (weights are loaded next)."""
    global _skip_depth
    with _skip_lock:
        _skip_depth += 1
    try:
        yield
    finally:
        with _skip_lock:
            _skip_depth -= 1


def skip_pretrained() -> bool:
    """Whether host ``resnet50(pretrained=True)`` calls skip the download right now."""
    flag = os.environ.get(ENV_NO_PRETRAINED, "").strip().lower()
    return _skip_depth > 0 or flag in ("1", "true", "yes", "on")


def _make_resnet50(orig: Any, module: ModuleType) -> Any:
    def resnet50(pretrained: bool = True, **kwargs: Any) -> Any:
        if pretrained and skip_pretrained():
            logger.debug("net.resnet50: ImageNet weights not downloaded (a checkpoint is loaded next)")
            pretrained = False
        return orig(pretrained=pretrained, **kwargs)

    resnet50.__doc__ = orig.__doc__
    return resnet50


# --------------------------------------------------------------------------- torch.load


def torch_with_cpu_load() -> ModuleType:
    """A module that is torch except that ``load`` defaults to ``map_location="cpu"``."""
    import torch

    real_load = torch.load

    def load(f: Any, map_location: Any = None, *args: Any, **kwargs: Any) -> Any:
        if map_location is None:
            map_location = "cpu"
        return real_load(f, map_location, *args, **kwargs)

    load.__doc__ = real_load.__doc__
    return hooks.module_proxy(torch, "torch.load maps to the CPU", load=load, __lpcam_cpu_load__=True)


def _make_torch_proxy(orig: Any, module: ModuleType) -> Any:
    import torch

    return torch_with_cpu_load() if orig is torch else orig


def torch_with_stacking_longtensor(base: ModuleType | None = None) -> ModuleType:
    """A module that is torch except that ``LongTensor(list of numpy arrays)`` stacks the list first
    (AMN's ``train_amn.resize_labels`` builds its label batch so; torch 2 refuses a list of float arrays)."""
    import torch

    real = (base or torch).LongTensor

    def long_tensor(*args: Any, **kwargs: Any) -> Any:
        if len(args) == 1 and not kwargs and isinstance(args[0], list) and args[0] \
                and all(isinstance(a, np.ndarray) for a in args[0]):
            return torch.from_numpy(np.stack(args[0])).long()
        return real(*args, **kwargs)

    return hooks.module_proxy(base or torch, "LongTensor stacks a list of numpy arrays", LongTensor=long_tensor)


def make_stacking_torch(orig: Any, module: ModuleType) -> Any:
    return torch_with_stacking_longtensor(orig) if isinstance(orig, ModuleType) else orig


# --------------------------------------------------------------------------- untyped arguments

# run_sample.py flags declared without `type=`: a value given on the command line is a string.
_NUMERIC_ARGS: dict[str, type] = {
    "sem_seg_bg_thres": float,
    "ins_seg_bg_thres": float,
    "beta": float,
    "exp_times": int,
}


def coerce_args(args: Any) -> Any:
    """Turn run_sample.py's untyped numeric flags given as strings into numbers (in place).

    IRN declares ``--sem_seg_bg_thres``, ``--ins_seg_bg_thres``, ``--beta``, ``--exp_times``
    and ``--cam_scales`` without a type, so e.g. LPCAM's ``--sem_seg_bg_thres 0.35`` reaches
    the step as the string ``"0.35"``. ``cam_scales`` accepts ``"1.0,0.5"`` or ``"(1.0, 0.5)"``.
    """
    import re

    for name, kind in _NUMERIC_ARGS.items():
        value = getattr(args, name, None)
        if isinstance(value, str):
            try:
                setattr(args, name, kind(float(value)) if kind is int else kind(value))
            except ValueError:
                raise ValueError(f"--{name}={value!r}: expected a number") from None
    scales = getattr(args, "cam_scales", None)
    if isinstance(scales, str):
        parsed = tuple(float(v) for v in re.findall(r"[-+]?\d*\.?\d+(?:[eE][-+]?\d+)?", scales))
        if not parsed:
            raise ValueError(f"--cam_scales={scales!r}: expected numbers like 1.0,0.5,1.5,2.0")
        args.cam_scales = parsed
    return args


def _make_coercing_run(orig: Any, module: ModuleType) -> Any:
    def run(args: Any) -> Any:
        return orig(coerce_args(args))

    run.__doc__ = orig.__doc__
    return run


# --------------------------------------------------------------------------- chainercv stand-in


def _missing(package: str, name: str, hint: str) -> Any:
    def missing(*args: Any, **kwargs: Any) -> Any:
        raise ImportError(f"{package}.{name} is not available: {hint}")

    missing.__name__ = name
    return missing


def _module_getattr(package: str, hint: str) -> Any:
    def __getattr__(name: str) -> Any:
        if name.startswith("__"):
            raise AttributeError(name)
        return _missing(package, name, hint)

    return __getattr__


_CHAINERCV_HINT = "lpcam's chainercv stand-in only covers semantic segmentation; install chainercv for the rest"


def _chainercv_package(module: ModuleType) -> None:
    module.__version__ = "0.0+lpcam-stand-in"  # type: ignore[attr-defined]
    module.__getattr__ = _module_getattr("chainercv", _CHAINERCV_HINT)  # type: ignore[attr-defined]
    for sub in ("datasets", "evaluations"):
        setattr(module, sub, importlib.import_module(f"chainercv.{sub}"))


def _chainercv_datasets(module: ModuleType) -> None:
    from lpcam_core.eval import chainercv

    module.VOCSemanticSegmentationDataset = chainercv.VOCSemanticSegmentationDataset  # type: ignore[attr-defined]
    module.__getattr__ = _module_getattr("chainercv.datasets", _CHAINERCV_HINT)  # type: ignore[attr-defined]


def _chainercv_evaluations(module: ModuleType) -> None:
    from lpcam_core.eval import chainercv

    for name in ("calc_semantic_segmentation_confusion", "calc_semantic_segmentation_iou", "eval_semantic_segmentation"):
        setattr(module, name, getattr(chainercv, name))
    module.__getattr__ = _module_getattr("chainercv.evaluations", _CHAINERCV_HINT)  # type: ignore[attr-defined]


_CRF_HINT = "pydensecrf is not installed: `pip install pydensecrf2` (it installs the pydensecrf module)"


def _pydensecrf_package(module: ModuleType) -> None:
    module.__getattr__ = _module_getattr("pydensecrf", _CRF_HINT)  # type: ignore[attr-defined]
    for sub in ("densecrf", "utils"):
        setattr(module, sub, importlib.import_module(f"pydensecrf.{sub}"))


def _pydensecrf_sub(name: str) -> Any:
    def fill(module: ModuleType) -> None:
        module.__getattr__ = _module_getattr(f"pydensecrf.{name}", _CRF_HINT)  # type: ignore[attr-defined]

    return fill


# --------------------------------------------------------------------------- registration


def register_irn_family() -> None:
    """Register every modern-stack shim for the IRN-family hosts (idempotent)."""
    with _register_lock:
        hooks.replace_attribute(
            "voc12.dataloader",
            "load_img_name_list",
            _make_loader,
            description="parse ids like 2007_000032 with int() (np.loadtxt rejects them on numpy >= 1.23)",
        )
        hooks.replace_attribute(
            "voc12.dataloader",
            "decode_int_filename",
            _make_decode,
            description="accept ids that are already strings",
        )
        for name in _ALIAS_MODULES:
            hooks.register_patch(
                name,
                "np_aliases_at_import",
                _numpy_aliases_during_exec,
                before_exec=True,
                description="numpy's removed aliases (np.bool ...) exist while the module's code runs",
            )
            hooks.replace_attribute(
                name,
                "np",
                _make_numpy_alias,
                description="module-local numpy with the removed aliases np.int, np.float, np.str ...",
            )
        hooks.replace_attribute(
            "net.resnet50",
            "resnet50",
            _make_resnet50,
            description=f"no ImageNet download when a checkpoint is loaded next (always with {ENV_NO_PRETRAINED}=1)",
        )
        for name in _COLLATED_SIZE_MODULES:
            hooks.replace_attribute(
                name,
                "np",
                _make_collated_numpy,
                name="np_collated_size",
                description="np.asarray(pack['size']) of a batch of one is [h, w] (numpy 2 refuses [2, 1] slice bounds)",
            )
        for name in _TORCH_LOAD_MODULES:
            hooks.replace_attribute(
                name,
                "torch",
                _make_torch_proxy,
                description='torch.load defaults to map_location="cpu"',
            )
        for name in PICKLE_READERS:
            hooks.replace_attribute(
                name,
                "np",
                make_safe_numpy,
                name="np_safe_load",
                description="np.load(allow_pickle=True) reads labels and CAM dicts with a restricted unpickler",
            )
        for name in ("step.make_sem_seg_labels", "step.make_ins_seg_labels"):
            hooks.replace_attribute(
                name,
                "run",
                _make_coercing_run,
                description="numeric flags declared without type= (--sem_seg_bg_thres 0.35 ...) become numbers",
            )
        hooks.register_fallback(
            "chainercv",
            _chainercv_package,
            is_package=True,
            description="numpy stand-in: VOCSemanticSegmentationDataset, calc_semantic_segmentation_confusion",
        )
        hooks.register_fallback("chainercv.datasets", _chainercv_datasets, description="VOCSemanticSegmentationDataset stand-in")
        hooks.register_fallback(
            "chainercv.evaluations", _chainercv_evaluations, description="calc_semantic_segmentation_confusion stand-in"
        )
        hooks.register_fallback(
            "pydensecrf", _pydensecrf_package, is_package=True,
            description="import-only stand-in: the CRF raises a clear error (pip install pydensecrf2)",
        )
        hooks.register_fallback("pydensecrf.densecrf", _pydensecrf_sub("densecrf"), description="CRF stand-in")
        hooks.register_fallback("pydensecrf.utils", _pydensecrf_sub("utils"), description="CRF stand-in")

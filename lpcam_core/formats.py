"""The hosts' CAM file formats: validated writers and readers (reading never runs code).

* IRN family (IRN, ReCAM, official LPCAM, AMN): ``dict(keys=torch int64 [n],
  cam=torch float32 [c, ceil(H/4), ceil(W/4)], high_res=numpy float32 [c, H, W])`` where ``keys``
  are the 0-based foreground classes present in the image and ``c == n`` (IRN) or ``c == n + 1``
  (AMN stage (b): channel 0 is a background map). ``cam`` must stay a torch tensor (IRN's
  random-walk step calls ``.cuda()`` on it).
* MCTformer: ``{class_index: (H, W) float map}``.

Both are ``np.save`` of a dict (a pickle); they are read with :func:`lpcam_core.io.load_npy`, whose
allow-list admits arrays, tensors and plain values only.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .config import short_repr
from .io import PathLike, atomic_save_npy, load_npy

__all__ = [
    "class_keys",
    "save_irn_cam",
    "load_irn_cam",
    "save_mctformer_cam",
    "load_mctformer_cam",
    "irn_writer",
    "mctformer_writer",
    "HOST_LAYOUTS",
    "VOC_CLASS_NAMES",
    "write_host_lists",
    "write_voc_annotations",
]


# --------------------------------------------------------------------------- conversions


def _to_numpy(x: Any) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        return x.detach().cpu().numpy()
    return np.asarray(x)


def class_keys(keys: Any, where: str) -> np.ndarray:
    """Class keys (torch, numpy or a sequence of ints) as a 1-D int64 array of 0-based class indices.

    Raises:
        ValueError: not 1-D, or a negative index. TypeError: not integers. Messages start with ``where``.
    """
    try:
        arr = _to_numpy(keys)
    except (ValueError, TypeError, RecursionError) as err:  # ragged or nested lists
        raise ValueError(f"{where}: 'keys' is not a 1-D list of class indices ({type(err).__name__})") from None
    if arr.ndim != 1:
        raise ValueError(f"{where}: 'keys' must be 1-D [n], got shape {tuple(arr.shape)}")
    if arr.size and not np.issubdtype(arr.dtype, np.integer):
        raise TypeError(f"{where}: 'keys' must hold integers, got dtype {arr.dtype}")
    arr = arr.astype(np.int64, copy=False)
    if arr.size and arr.min() < 0:
        raise ValueError(f"{where}: 'keys' must be non-negative 0-based class indices, got {short_repr(arr.tolist())}")
    if len(np.unique(arr)) < arr.size:
        raise ValueError(f"{where}: 'keys' repeats a class ({short_repr(arr.tolist())}): one map per class")
    return arr


def _keys_to_tensor(keys: Any, where: str) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(class_keys(keys, where)))


def _float_array(x: Any, name: str, where: str) -> np.ndarray:
    arr = _to_numpy(x)
    if not (np.issubdtype(arr.dtype, np.floating) or np.issubdtype(arr.dtype, np.integer)):
        raise TypeError(f"{where}: {name!r} must be a numeric array, got dtype {arr.dtype}")
    if np.issubdtype(arr.dtype, np.floating) and arr.size and not np.isfinite(arr).all():
        raise ValueError(f"{where}: {name!r} holds NaN or inf values (no map file is written with them)")
    return arr


def _check_channels(c: int, n: int, name: str, where: str) -> None:
    if c not in (n, n + 1):
        raise ValueError(
            f"{where}: {name!r} has {c} channels but 'keys' has {n} classes "
            f"(expected {n}, or {n + 1} with a background channel 0 as AMN writes)"
        )


# --------------------------------------------------------------------------- IRN family


def save_irn_cam(path: PathLike, keys: Any, cam: Any, high_res: Any, *, fsync: bool = True) -> Path:
    """Save one image's CAMs in the IRN-family format, atomically.

    Args:
        path: destination ``<cam_out_dir>/<id>.npy``.
        keys: [n] 0-based foreground classes present (torch/numpy/sequence of ints).
        cam: [c, ceil(H/4), ceil(W/4)] stride-4 maps (torch or numpy; saved as torch float32),
            or ``None`` to omit it (the evaluators read ``high_res`` only; IRN's random walk
            needs ``cam``).
        high_res: [c, H, W] full-resolution maps (torch or numpy; saved as numpy float32).
            ``c == n``, or ``n + 1`` when channel 0 is a background map (AMN).

    Returns:
        ``path`` as a ``Path``.

    Raises:
        TypeError: non-integer keys or non-numeric maps.
        ValueError: inconsistent shapes.
    """
    where = f"save_irn_cam({str(path)!r})"
    keys_t = _keys_to_tensor(keys, where)
    n = int(keys_t.numel())
    hr = _float_array(high_res, "high_res", where)
    if hr.ndim != 3:
        raise ValueError(f"{where}: 'high_res' must be 3-D [c, H, W], got shape {tuple(hr.shape)}")
    _check_channels(hr.shape[0], n, "high_res", where)
    hr = np.ascontiguousarray(hr, dtype=np.float32)
    out: dict[str, Any] = {"keys": keys_t}
    if cam is not None:
        cam_np = _float_array(cam, "cam", where)
        height, width = hr.shape[1:]
        expected = (hr.shape[0], math.ceil(height / 4), math.ceil(width / 4))
        if tuple(cam_np.shape) != expected:
            raise ValueError(
                f"{where}: 'cam' must have shape [c, ceil(H/4), ceil(W/4)] = {expected} "
                f"for high_res of shape {tuple(hr.shape)}, got {tuple(cam_np.shape)}"
            )
        out["cam"] = torch.from_numpy(np.ascontiguousarray(cam_np, dtype=np.float32))
    out["high_res"] = hr
    return atomic_save_npy(path, out, fsync=fsync)


def _load_pickled_dict(path: PathLike, what: str, required: Iterable[Any]) -> dict[Any, Any]:
    """:func:`load_npy` of a file that must hold a pickled dict, with errors that name the file."""
    p = Path(path)
    obj = load_npy(p, what=what)
    if isinstance(obj, np.ndarray):
        raise ValueError(f"{what} file {str(p)!r} holds an array of shape {obj.shape} and dtype {obj.dtype}, "
                         "expected np.save of a dict")
    if not isinstance(obj, dict):
        raise ValueError(f"{what} file {str(p)!r} holds a pickled {type(obj).__name__}, expected a dict")
    missing = [k for k in required if k not in obj]
    if missing:
        raise ValueError(
            f"{what} file {str(p)!r} lacks entr{'y' if len(missing) == 1 else 'ies'} "
            f"{missing}; it has {sorted(map(str, obj))}"
        )
    return obj


def load_irn_cam(path: PathLike) -> dict[str, Any]:
    """Load an IRN-family CAM file and normalise its types.

    Reads with :func:`load_npy` (no code in the file runs). Numpy ``keys`` (official LPCAM
    release) are accepted.

    Returns:
        dict with ``keys`` (torch int64 [n]), ``high_res`` (numpy float32 [c, H, W], c = n or
        n + 1), and ``cam`` (torch float32 [c, h, w]) when the file has it. Other entries are
        passed through unchanged.

    Raises:
        FileNotFoundError: the file does not exist.
        ValueError: truncated or foreign file, not a dict, missing ``keys``/``high_res``, or
            inconsistent shapes; the message names the file.
    """
    where = f"IRN CAM file {str(path)!r}"
    obj = _load_pickled_dict(path, "IRN CAM", ("keys", "high_res"))
    try:
        keys = _keys_to_tensor(obj["keys"], where)
        hr = _float_array(obj["high_res"], "high_res", where)
        if hr.ndim != 3:
            raise ValueError(f"{where}: 'high_res' must be 3-D [c, H, W], got shape {tuple(hr.shape)}")
        _check_channels(hr.shape[0], int(keys.numel()), "high_res", where)
        out = dict(obj)
        out["keys"] = keys
        out["high_res"] = np.ascontiguousarray(hr, dtype=np.float32)
        if obj.get("cam") is not None:
            cam = _float_array(obj["cam"], "cam", where)
            if cam.ndim != 3 or cam.shape[0] != hr.shape[0]:
                raise ValueError(
                    f"{where}: 'cam' must be 3-D [c, h, w] with c = {hr.shape[0]} like high_res, "
                    f"got shape {tuple(cam.shape)}"
                )
            out["cam"] = torch.from_numpy(np.ascontiguousarray(cam, dtype=np.float32))
    except TypeError as e:
        raise ValueError(str(e)) from e
    return out


# --------------------------------------------------------------------------- MCTformer


def _class_index(k: Any, where: str) -> int:
    if isinstance(k, (bool, np.bool_)) or not isinstance(k, (int, np.integer)):
        raise TypeError(f"{where}: class keys must be integers, got {k!r} ({type(k).__name__})")
    if k < 0:
        raise ValueError(f"{where}: class keys must be non-negative, got {k}")
    return int(k)


def _check_mct_maps(maps: Mapping[Any, Any], where: str) -> dict[int, np.ndarray]:
    out: dict[int, np.ndarray] = {}
    shape: tuple[int, ...] | None = None
    for k, v in maps.items():
        idx = _class_index(k, where)
        arr = _float_array(v, f"map of class {idx}", where)
        if arr.ndim != 2:
            raise ValueError(f"{where}: map of class {idx} must be 2-D (H, W), got shape {tuple(arr.shape)}")
        if shape is not None and arr.shape != shape:
            raise ValueError(f"{where}: map of class {idx} has shape {arr.shape}, other maps have {shape}")
        shape = arr.shape
        out[idx] = arr
    return out


def save_mctformer_cam(path: PathLike, maps: Mapping[int, Any], *, fsync: bool = True) -> Path:
    """Save MCTformer's ``{class_index: (H, W) float map}`` dict atomically.

    Args:
        path: destination ``<cam_npy_dir>/<id>.npy``.
        maps: 0-based class index -> (H, W) map (numpy or torch; float dtype kept, torch
            converted to numpy). All maps must share one shape.

    Returns:
        ``path`` as a ``Path``.
    """
    where = f"save_mctformer_cam({str(path)!r})"
    if not isinstance(maps, Mapping):
        raise TypeError(f"{where}: maps must be a dict {{class_index: (H, W) map}}, got {type(maps).__name__}")
    clean = {k: np.ascontiguousarray(v) for k, v in _check_mct_maps(maps, where).items()}
    return atomic_save_npy(path, clean, fsync=fsync)


def load_mctformer_cam(path: PathLike) -> dict[int, np.ndarray]:
    """Load an MCTformer CAM file (a pickled dict, read with :func:`load_npy`).

    Returns:
        ``{class_index: (H, W) numpy map}`` with ``int`` keys; dtypes as stored.

    Raises:
        FileNotFoundError: missing file. ValueError: truncated/foreign file or bad entries.
    """
    where = f"MCTformer CAM file {str(path)!r}"
    obj = _load_pickled_dict(path, "MCTformer CAM", ())
    try:
        return _check_mct_maps(obj, where)
    except TypeError as e:
        raise ValueError(str(e)) from e


# --------------------------------------------------------------------------- writers for the map loop


def irn_writer(path: Path, record: Mapping[str, Any]) -> None:
    """Write a ``{keys, cam, high_res}`` record (``lpcam_multiscale``'s output) in the IRN format, atomically."""
    save_irn_cam(path, record["keys"], record.get("cam"), record["high_res"], fsync=False)


def mctformer_writer(path: Path, record: Mapping[int, Any]) -> None:
    """Write MCTformer's ``{class_index: (H, W) map}`` dict, atomically."""
    save_mctformer_cam(path, record, fsync=False)


# --------------------------------------------------------------------------- the lists and labels a host reads

#: What each host reads besides VOC's JPEGImages/SegmentationClass, relative to the folder it runs in.
HOST_LAYOUTS = {
    "irn": "voc12/train.txt (prototype list), voc12/train_aug.txt (CAM list), voc12/val.txt: one id per line; "
           "voc12/cls_labels.npy: {int id 2007000032: float32 [20]}",
    "mctformer": "voc12/train_id.txt (prototype list), voc12/train_aug_id.txt, voc12/val_id.txt: one id per line; "
                 "voc12/cls_labels.npy: {str id '2007_000032': float32 [20]}",
}
HOST_LAYOUTS["clip-es"] = ("voc12/train.txt (prototype list), voc12/train_aug.txt, voc12/val.txt: one id per line; "
                            "no label file: the labels come from <VOC>/Annotations/<id>.xml (object names, image size)")
HOST_LAYOUTS.update(recam=HOST_LAYOUTS["irn"], amn=HOST_LAYOUTS["irn"])

#: PASCAL VOC's 20 foreground class names, in class-index order (the names VOC's Annotations XML uses).
VOC_CLASS_NAMES = ("aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
                   "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train",
                   "tvmonitor")


def write_host_lists(host: str, folder: PathLike, labels: Mapping[str, Iterable[int]], train: Iterable[str],
                     val: Iterable[str], *, proto: Iterable[str] | None = None, num_classes: int = 20) -> list[Path]:
    """Write the id lists and the label file ``host`` reads (:data:`HOST_LAYOUTS`) under ``folder/voc12``.

    Args:
        host: ``irn``, ``recam``, ``amn``, ``mctformer`` or ``clip-es`` (lists only: CLIP-ES reads labels from
            the Annotations XML, :func:`write_voc_annotations`).
        folder: the folder the host runs in (its ``voc12/`` is written; existing lists are replaced).
        labels: image id (``2007_000032``) -> 0-based foreground classes present.
        train, val: ids of the training (CAM) list and of the validation list.
        proto: ids of the prototype list (default ``train``).
        num_classes: length of the label vectors (VOC: 20).

    Returns:
        The files written.
    """
    from .io import atomic_write_bytes

    if host not in HOST_LAYOUTS:
        raise ValueError(f"host {host!r}: expected one of {sorted(HOST_LAYOUTS)}")
    train, val = [str(i) for i in train], [str(i) for i in val]
    proto = train if proto is None else [str(i) for i in proto]
    voc = Path(folder) / "voc12"
    voc.mkdir(parents=True, exist_ok=True)
    names = (("train_id.txt", proto), ("train_aug_id.txt", train), ("val_id.txt", val)) if host == "mctformer" else (
        ("train.txt", proto), ("train_aug.txt", train), ("val.txt", val))
    written = []
    for name, ids in names:
        written.append(atomic_write_bytes(voc / name, "".join(f"{i}\n" for i in ids).encode()))
    if host == "clip-es":
        return written
    table = {}
    for image_id in dict.fromkeys([*train, *val, *proto]):
        vector = np.zeros(num_classes, np.float32)
        vector[class_keys(list(labels[image_id]), f"labels[{image_id!r}]")] = 1
        table[image_id if host == "mctformer" else int(image_id.replace("_", ""))] = vector  # IRN: 2007000032
    written.append(atomic_save_npy(voc / "cls_labels.npy", table))
    return written


def write_voc_annotations(voc_root: PathLike, labels: Mapping[str, Iterable[int]], *,
                          class_names: Iterable[str] = VOC_CLASS_NAMES) -> list[Path]:
    """Write ``<voc_root>/Annotations/<id>.xml`` as VOC does: the image size and one ``<object>`` per class
    (in class order).

    CLIP-ES reads the present classes and the image size from these files. The size is read from
    ``<voc_root>/JPEGImages/<id>.jpg``; existing XML files are replaced.

    Args:
        voc_root: a VOC-layout folder with ``JPEGImages``.
        labels: image id -> 0-based classes present.
        class_names: the ``<name>`` of each class index (VOC's names by default).
    """
    from xml.sax.saxutils import escape

    from PIL import Image

    from .io import atomic_write_bytes

    names = list(class_names)
    root = Path(voc_root)
    (root / "Annotations").mkdir(parents=True, exist_ok=True)
    written = []
    for image_id, classes in labels.items():
        with Image.open(root / "JPEGImages" / f"{image_id}.jpg") as image:
            width, height = image.size
        keys = np.unique(class_keys(list(classes), f"labels[{image_id!r}]"))
        if keys.size and keys.max() >= len(names):
            raise ValueError(f"labels[{image_id!r}]: class {int(keys.max())} has no name ({len(names)} names given)")
        objects = "".join(f"<object><name>{escape(names[k])}</name><difficult>0</difficult></object>" for k in keys)
        xml = (f"<annotation><filename>{escape(image_id)}.jpg</filename><size><width>{width}</width>"
               f"<height>{height}</height><depth>3</depth></size>{objects}</annotation>\n")
        written.append(atomic_write_bytes(root / "Annotations" / f"{image_id}.xml", xml.encode()))
    return written

"""File input/output: atomic writes, the hosts' CAM file formats, id lists and label PNGs.

CAM files of the hosts are ``np.save`` of a Python ``dict`` (a 0-d object array), i.e. they
are pickles by the hosts' own format, and ``np.load(allow_pickle=True)`` on a crafted one runs
code. lpcam never reads them that way: :func:`load_npy` unpickles with an allow-list (numpy
arrays and scalars, torch tensors rebuilt with ``torch.load(weights_only=True)``, dicts, lists,
tuples, strings, numbers); any other object in a file is refused with an error naming the file.

Formats:

* IRN family (IRN, ReCAM, official LPCAM, AMN): ``dict(keys=torch int64 [n],
  cam=torch float32 [c, ceil(H/4), ceil(W/4)], high_res=numpy float32 [c, H, W])`` where
  ``keys`` are the 0-based foreground classes present in the image and ``c == n`` (IRN) or
  ``c == n + 1`` (AMN stage (b): channel 0 is a background map). ``cam`` must stay a torch
  tensor (IRN's random-walk step calls ``.cuda()`` on it).
* MCTformer: ``{class_index: (H, W) float map}``.
"""

from __future__ import annotations

import contextlib
import io
import logging
import math
import os
import pickle
import stat
import tempfile
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import IO, Any, Union

import numpy as np
import torch

__all__ = [
    "atomic_open",
    "atomic_write_bytes",
    "atomic_save_npy",
    "save_irn_cam",
    "load_irn_cam",
    "save_mctformer_cam",
    "load_mctformer_cam",
    "load_npy",
    "UnsafeFileError",
    "should_skip",
    "check_output_dir",
    "read_id_list",
    "load_label_png",
]

logger = logging.getLogger(__name__)

PathLike = Union[str, "os.PathLike[str]"]

_TEXT_MODES = ("w", "wt")
_BINARY_MODES = ("wb",)
_IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp")
_LABEL_PNG_MODES = ("P", "L", "I", "I;16")


# --------------------------------------------------------------------------- atomic writes


def _process_umask() -> int:
    """Return the process umask without changing it where the OS lets us read it."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)  # POSIX offers no read-only query; restore immediately
    os.umask(mask)
    return mask


def _final_mode(path: Path) -> int:
    """Permission bits for the replaced file: the old file's, else what ``open`` would give."""
    try:
        return stat.S_IMODE(os.stat(path).st_mode)
    except OSError:
        return 0o666 & ~_process_umask()


@contextlib.contextmanager
def atomic_open(
    path: PathLike, mode: str = "wb", *, encoding: str | None = None, fsync: bool = True
) -> Iterator[IO[Any]]:
    """Open a temporary file next to ``path`` and move it onto ``path`` when the block succeeds.

    The temporary file lives in the same directory (``.<name>.<random>.tmp``) so the final
    ``os.replace`` is atomic: readers see either the old file or the complete new one. On any
    exception (also KeyboardInterrupt) the temporary file is removed and ``path`` is untouched.

    Args:
        path: destination file. Its directory must exist.
        mode: ``"wb"`` (binary) or ``"w"``/``"wt"`` (text).
        encoding: text encoding (text modes only; default UTF-8).
        fsync: flush the data to disk before the rename (survives power loss, not only crashes).

    Yields:
        The open temporary file object.

    Raises:
        ValueError: unsupported ``mode``, or ``encoding`` given with a binary mode.
        FileNotFoundError: the directory of ``path`` does not exist.
        IsADirectoryError: ``path`` is a directory.
    """
    if mode not in _TEXT_MODES + _BINARY_MODES:
        raise ValueError(f"atomic_open: mode must be one of 'wb', 'w', 'wt', got {mode!r}")
    if mode in _BINARY_MODES and encoding is not None:
        raise ValueError("atomic_open: encoding is only valid with a text mode ('w' or 'wt')")
    if mode in _TEXT_MODES and encoding is None:
        encoding = "utf-8"
    dest = Path(path)
    parent = dest.parent
    if not parent.is_dir():
        raise FileNotFoundError(f"atomic_open: directory {str(parent)!r} of {str(dest)!r} does not exist")
    if dest.is_dir():
        raise IsADirectoryError(f"atomic_open: destination {str(dest)!r} is a directory")

    fd, tmp_name = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".tmp", dir=parent)
    tmp = Path(tmp_name)
    try:
        try:
            f = os.fdopen(fd, mode, encoding=encoding)
        except BaseException:
            os.close(fd)
            raise
        with f:
            yield f
            f.flush()
            if fsync:
                os.fsync(f.fileno())
        os.chmod(tmp, _final_mode(dest))
        os.replace(tmp, dest)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise


def atomic_write_bytes(path: PathLike, data: bytes | bytearray | memoryview, *, fsync: bool = True) -> Path:
    """Write ``data`` to ``path`` atomically (see :func:`atomic_open`).

    Returns:
        ``path`` as a ``Path``.
    """
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise TypeError(f"atomic_write_bytes: data must be bytes-like, got {type(data).__name__}")
    with atomic_open(path, "wb", fsync=fsync) as f:
        f.write(data)
    return Path(path)


def atomic_save_npy(path: PathLike, obj: Any, *, fsync: bool = True) -> Path:
    """``np.save`` of ``obj`` (an array, or any object such as a dict, pickled) written atomically.

    Unlike ``np.save(str)``, no ``.npy`` suffix is appended: ``path`` is used as given. If
    pickling fails half-way, no partial file is left and an existing ``path`` is kept.

    Returns:
        ``path`` as a ``Path``.
    """
    with atomic_open(path, "wb", fsync=fsync) as f:
        np.save(f, obj, allow_pickle=True)
    return Path(path)


# --------------------------------------------------------------------------- conversions


def _to_numpy(x: Any) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        return x.detach().cpu().numpy()
    return np.asarray(x)


def _keys_to_tensor(keys: Any, where: str) -> torch.Tensor:
    """Normalise class keys (torch, numpy or sequence of ints) to a 1-D CPU int64 tensor."""
    arr = _to_numpy(keys)
    if arr.ndim != 1:
        raise ValueError(f"{where}: 'keys' must be 1-D [n], got shape {tuple(arr.shape)}")
    if arr.size and not np.issubdtype(arr.dtype, np.integer):
        raise TypeError(f"{where}: 'keys' must hold integers, got dtype {arr.dtype}")
    arr = arr.astype(np.int64, copy=False)
    if arr.size and arr.min() < 0:
        raise ValueError(f"{where}: 'keys' must be non-negative 0-based class indices, got {arr.tolist()}")
    return torch.from_numpy(np.ascontiguousarray(arr))


def _float_array(x: Any, name: str, where: str) -> np.ndarray:
    arr = _to_numpy(x)
    if not (np.issubdtype(arr.dtype, np.floating) or np.issubdtype(arr.dtype, np.integer)):
        raise TypeError(f"{where}: {name!r} must be a numeric array, got dtype {arr.dtype}")
    return arr


def _check_channels(c: int, n: int, name: str, where: str) -> None:
    if c not in (n, n + 1):
        raise ValueError(
            f"{where}: {name!r} has {c} channels but 'keys' has {n} classes "
            f"(expected {n}, or {n + 1} with a background channel 0 as AMN writes)"
        )


# --------------------------------------------------------------------------- reading .npy without running code


class UnsafeFileError(ValueError):
    """A ``.npy`` file's pickle asks for an object outside :func:`load_npy`'s allow-list."""


def _torch_storage_from_bytes(data: bytes) -> Any:
    """What ``torch.storage._load_from_bytes`` does, with ``weights_only=True`` (no code runs) and on the CPU."""
    if not isinstance(data, (bytes, bytearray)):
        raise pickle.UnpicklingError("a tensor storage must be given as bytes")
    return torch.load(io.BytesIO(bytes(data)), map_location="cpu", weights_only=True)


def _rebuild_tensor(storage: Any, offset: Any, size: Any, stride: Any, requires_grad: Any = False,
                    backward_hooks: Any = None, metadata: Any = None) -> torch.Tensor:
    """``torch._utils._rebuild_tensor_v2`` for plain tensors: no hooks, no gradient."""
    if backward_hooks:
        raise pickle.UnpicklingError("a tensor with backward hooks is not a map")
    if not isinstance(storage, (torch.TypedStorage, torch.UntypedStorage)):
        raise pickle.UnpicklingError(f"a tensor's storage must be a torch storage, got {type(storage).__name__}")
    from collections import OrderedDict

    return torch._utils._rebuild_tensor_v2(storage, offset, size, stride, False, OrderedDict())


def _allowed_globals() -> dict[tuple[str, str], Any]:
    from collections import OrderedDict

    reconstruct = np.zeros(1).__reduce__()[0]
    scalar = np.float32(0).__reduce__()[0]
    allowed: dict[tuple[str, str], Any] = {("collections", "OrderedDict"): OrderedDict}
    for core in ("numpy.core.multiarray", "numpy._core.multiarray"):  # files of numpy 1.x and 2.x
        allowed[(core, "_reconstruct")] = reconstruct
        allowed[(core, "scalar")] = scalar
    allowed[("numpy", "ndarray")] = np.ndarray
    allowed[("numpy", "dtype")] = np.dtype
    allowed[("torch._utils", "_rebuild_tensor_v2")] = _rebuild_tensor
    allowed[("torch.storage", "_load_from_bytes")] = _torch_storage_from_bytes
    return allowed


class _RestrictedUnpickler(pickle.Unpickler):
    """Resolves only the allow-listed globals (arrays, scalars, tensors, OrderedDict)."""

    allowed: dict[tuple[str, str], Any] = {}

    def find_class(self, module: str, name: str) -> Any:
        found = self.allowed.get((module, name))
        if found is None:
            raise UnsafeFileError(f"it asks for {module}.{name}, which is not an array, tensor or plain value")
        return found

    def persistent_load(self, pid: Any) -> Any:
        raise UnsafeFileError("it holds persistent ids, which no map file has")


def load_npy(path: PathLike, *, what: str = "map") -> Any:
    """``np.load`` of a ``.npy`` file without executing code: an object array (a pickled dict, as the
    hosts write their CAM files) is unpickled with an allow-list instead of ``pickle.load``.

    Returns:
        The array, or the object of a 0-d object array (``np.save`` of a dict gives the dict).

    Raises:
        FileNotFoundError: no such file. ValueError: not a regular file; truncated or foreign bytes;
        :class:`UnsafeFileError` (a ``ValueError``): the pickle names anything but numpy arrays and
        scalars, torch tensors, dicts, lists, tuples, strings and numbers. Every message names the file.
    """
    p = Path(path)
    if not p.is_file():
        if p.exists():
            raise ValueError(f"{what} file {str(p)!r} is not a regular file")
        raise FileNotFoundError(f"{what} file not found: {str(p)!r}")
    if not _RestrictedUnpickler.allowed:
        _RestrictedUnpickler.allowed = _allowed_globals()
    try:
        with open(p, "rb") as f:
            version = np.lib.format.read_magic(f)
            if version == (1, 0):
                _, _, dtype = np.lib.format.read_array_header_1_0(f)
            elif version in ((2, 0), (3, 0)):
                _, _, dtype = np.lib.format.read_array_header_2_0(f)
            else:
                raise ValueError(f"unknown .npy format version {version}")
            if not dtype.hasobject:
                f.seek(0)
                return np.load(f, allow_pickle=False)
            obj = _RestrictedUnpickler(f).load()
    except UnsafeFileError as e:
        raise UnsafeFileError(f"refusing {what} file {str(p)!r}: {e} (lpcam never runs code from a data file)") from None
    except PermissionError:
        raise
    except Exception as e:  # truncated pickles, foreign bytes, bad headers
        raise ValueError(f"cannot read {what} file {str(p)!r} (truncated or not a .npy file?): "
                         f"{type(e).__name__}: {_short(e)}") from None
    if not isinstance(obj, np.ndarray):
        raise ValueError(f"{what} file {str(p)!r} holds a pickled {type(obj).__name__}, not an array")
    return obj.item() if obj.shape == () else obj


def _short(err: BaseException, limit: int = 200) -> str:
    text = str(err)
    return text if len(text) <= limit else text[:limit] + "..."


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


# --------------------------------------------------------------------------- resumable runs


def _load_complete(path: Path) -> None:
    """Read ``path`` fully with a reader chosen by its suffix; raise when it is incomplete."""
    suffix = path.suffix.lower()
    if suffix == ".npy":
        load_npy(path)
    elif suffix in _IMAGE_SUFFIXES:
        from PIL import Image

        with Image.open(path) as im:
            im.load()
    elif path.stat().st_size == 0:
        raise ValueError("empty file")


def should_skip(
    path: PathLike, overwrite: bool = False, *, loader: Callable[[Path], Any] | None = None
) -> bool:
    """Whether a resumable run may skip producing ``path``.

    A file is skipped only when it exists and is complete, i.e. loads without error
    (``.npy`` via :func:`load_npy`, images via PIL, other suffixes: non-empty), or via ``loader``.
    A file that fails to load is logged and reported as not skippable (it will be rewritten).

    Args:
        path: output file.
        overwrite: never skip when True.
        loader: optional callable reading the file, raising when it is incomplete.
    """
    p = Path(path)
    if overwrite or not p.is_file():
        return False
    try:
        (loader or _load_complete)(p)
    except Exception as e:
        logger.warning("existing output %s is incomplete or unreadable (%s); it will be rewritten", p, e)
        return False
    return True


def check_output_dir(out_dir: PathLike, *, read_dirs: Iterable[PathLike | None] = ()) -> Path:
    """Create ``out_dir`` after checking it is none of the directories baseline CAMs are read from.

    Args:
        out_dir: directory the run writes to (created with parents).
        read_dirs: directories read from (``None`` entries ignored).

    Returns:
        The resolved ``out_dir``.

    Raises:
        ValueError: ``out_dir`` is the same directory as one of ``read_dirs`` (after resolving
            ``..`` and symlinks), or exists and is not a directory.
    """
    out = Path(out_dir).expanduser()
    out_resolved = out.resolve()
    reads = [Path(d).expanduser() for d in read_dirs if d is not None]

    def same(d: Path) -> bool:
        if d.resolve() == out_resolved:
            return True
        try:
            return os.path.samefile(d, out)
        except OSError:
            return False

    for d in reads:
        if same(d):
            raise ValueError(
                f"output directory {str(out_dir)!r} is the same directory as the input directory "
                f"{str(d)!r} (both resolve to {str(out_resolved)!r}); writing there would overwrite "
                "the baseline CAMs: choose another out_dir"
            )
    if out.exists() and not out.is_dir():
        raise ValueError(f"output directory {str(out_dir)!r} exists and is not a directory")
    out.mkdir(parents=True, exist_ok=True)
    for d in reads:  # after creation samefile also sees aliases resolve() cannot (bind mounts)
        if same(d):
            raise ValueError(
                f"output directory {str(out_dir)!r} is the same directory as the input directory {str(d)!r}"
            )
    return out_resolved


# --------------------------------------------------------------------------- datasets


def _id_from_token(token: str) -> str:
    if "/" in token or "\\" in token or token.lower().endswith(_IMAGE_SUFFIXES):
        return Path(token.replace("\\", "/")).stem
    return token


def read_id_list(path: PathLike) -> list[str]:
    """Read a VOC-style image list.

    Each non-blank line is either an id (``2007_000032``) or a path pair such as
    ``/JPEGImages/2007_000032.jpg /SegmentationClassAug/2007_000032.png``; for the latter the
    stem of the first token is the id.

    Returns:
        Ids in file order.

    Raises:
        FileNotFoundError: the list file does not exist.
    """
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"id list file not found: {str(p)!r}")
    ids: list[str] = []
    with open(p, encoding="utf-8") as f:
        for line in f:
            tokens = line.split()
            if tokens:
                ids.append(_id_from_token(tokens[0]))
    return ids


def load_label_png(path: PathLike) -> np.ndarray:
    """Read a label PNG (VOC palette image) as its index image.

    PIL keeps palette (mode ``P``) indices, so the class ids come back as stored; 255 marks
    ignored pixels in VOC. Grayscale (``L``/``I``) label images are accepted too.

    Returns:
        (H, W) integer array (uint8 for palette/grayscale PNGs).

    Raises:
        FileNotFoundError: missing file. ValueError: unreadable file or a colour (RGB) image.
    """
    from PIL import Image

    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"label PNG not found: {str(p)!r}")
    try:
        with Image.open(p) as im:
            if im.mode not in _LABEL_PNG_MODES:
                raise ValueError(
                    f"label PNG {str(p)!r} has mode {im.mode!r}; expected an index image "
                    f"(one of {list(_LABEL_PNG_MODES)}), not a colour rendering"
                )
            arr = np.array(im)
    except ValueError:
        raise
    except OSError as e:
        if isinstance(e, PermissionError):
            raise
        raise ValueError(f"cannot read label PNG {str(p)!r}: {e}") from e
    return arr

"""File input/output: atomic writes, reading ``.npy`` without running code, resumable outputs, id lists, label PNGs.

The hosts' CAM files are ``np.save`` of a Python ``dict`` (a 0-d object array): pickles, and
``np.load(allow_pickle=True)`` on a crafted one runs code. lpcam never reads them that way:
:func:`load_npy` unpickles with an allow-list (numpy arrays and scalars, torch tensors rebuilt with
``torch.load(weights_only=True)``, dicts, lists, tuples, strings, numbers); any other object in a file
is refused with an error naming the file. The formats themselves are in :mod:`lpcam_core.formats`.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import pickle
import re
import socket
import stat
import tempfile
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import IO, Any, Union

import numpy as np
import torch

__all__ = [
    "atomic_open",
    "atomic_write_bytes",
    "atomic_save_npy",
    "load_npy",
    "UnsafeFileError",
    "should_skip",
    "check_output_dir",
    "remove_stale_temporaries",
    "temporary_target",
    "remove_dead_writers_temporaries",
    "writer_mark",
    "read_id_list",
    "load_label_png",
    "load_refusal",
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
    if os.path.lexists(dest) and not dest.is_symlink() and not stat.S_ISREG(os.lstat(dest).st_mode):
        # a FIFO, a device (/dev/full), a socket: never replaced by a file (a symlink is replaced, its target kept)
        raise ValueError(f"{str(dest)!r} exists and is not a regular file (a FIFO, device or socket): lpcam does not "
                         "replace it; choose another output")

    remove_dead_writers_temporaries(dest)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{dest.name}{_WRITER}.", suffix=".tmp", dir=parent)
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
    except OSError as err:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        if err.filename is None and err.errno is not None:  # ENOSPC from a write or fsync: say which file
            raise OSError(err.errno, err.strerror, str(dest)) from None
        raise
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise


#: Marks a temporary file with its writer: ``.<name>.lpcam-<host>-<pid>.<random>.tmp``.
_WRITER = ".lpcam-{}-{}".format(re.sub(r"[^A-Za-z0-9]", "", socket.gethostname())[:32] or "host", os.getpid())


def writer_mark(pid: int | None = None) -> str:
    """``.lpcam-<host>-<pid>``: what an atomic write's temporary name says of its writer (this process by default)."""
    return _WRITER if pid is None else f"{_WRITER.rsplit('-', 1)[0]}-{pid}"


def temporary_target(name: str) -> tuple[str, str | None, int | None]:
    """(target file name, writer host, writer pid) of an atomic write's temporary file name
    ``.<target>.lpcam-<host>-<pid>.<random>.tmp`` (host and pid None for one without a writer mark)."""
    body = name[1:-4]
    mark = body.rfind(".lpcam-")
    if mark < 0:
        return body.rsplit(".", 1)[0], None, None
    host, _, pid = body[mark + 7:].rsplit(".", 1)[0].rpartition("-")
    return body[:mark], host or None, int(pid) if pid.isdigit() else None


def remove_dead_writers_temporaries(dest: PathLike) -> None:
    """Remove temporary files of ``dest`` whose writer, a process of this machine, is gone (killed mid-write)."""
    dest = Path(dest)
    prefix = f".{dest.name}.lpcam-"
    host = _WRITER.split("-")[1]
    try:
        names = [n for n in os.listdir(dest.parent) if n.startswith(prefix) and n.endswith(".tmp")]
    except OSError:
        return
    for name in names:
        target, writer_host, pid = temporary_target(name)
        if target != dest.name or writer_host != host or pid is None or pid == os.getpid():
            continue
        try:
            os.kill(pid, 0)
        except ProcessLookupError:  # the writer is dead: its file will never be renamed
            with contextlib.suppress(FileNotFoundError):
                os.unlink(dest.parent / name)
                logger.info("removed %s, left by a killed write of %s", name, dest)
        except OSError:  # alive (another user's) or unknown: leave it
            pass


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


def _latin1_bytes(text: Any, encoding: Any = "latin1") -> bytes:
    """``_codecs.encode`` as numpy pickles of protocol 2 use it for an array's raw bytes (the hosts' shipped
    ``voc12/cls_labels.npy``): a str's latin-1 bytes, and nothing else."""
    if not isinstance(text, str) or str(encoding).lower().replace("-", "").replace("_", "") != "latin1":
        raise UnsafeFileError("it asks for _codecs.encode of something other than latin-1 text")
    return text.encode("latin1")


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
    allowed[("_codecs", "encode")] = _latin1_bytes
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
        where = "" if p.is_absolute() else f" (relative to the working directory {os.getcwd()})"
        raise FileNotFoundError(f"{what} file not found: {str(p)!r}{where}")
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


def remove_stale_temporaries(out_dir: PathLike, names: set[str]) -> int:
    """Remove ``.<name>.<random>.tmp`` files (left by a killed atomic write) of the given output names.

    Only the process that writes ``name`` calls this for it (a shard of a map loop), so no live
    writer's temporary file is removed. Returns how many were removed.
    """
    removed = 0
    with os.scandir(out_dir) as entries:
        for entry in entries:
            n = entry.name
            if not (n.startswith(".") and n.endswith(".tmp")):
                continue
            if temporary_target(n)[0] in names:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(entry.path)
                    removed += 1
    if removed:
        logger.info("removed %d temporary file(s) left by an interrupted run in %s", removed, out_dir)
    return removed


# --------------------------------------------------------------------------- datasets


def _id_from_token(token: str) -> str:
    if "/" in token or "\\" in token or token.lower().endswith(_IMAGE_SUFFIXES):
        return Path(token.replace("\\", "/")).stem
    return token


def read_id_list(path: PathLike) -> list[str]:
    """Read a VOC-style image list.

    Each non-blank line is either an id (``2007_000032``) or a path pair such as
    ``/JPEGImages/2007_000032.jpg /SegmentationClassAug/2007_000032.png``; for the latter the
    stem of the first token is the id. Any other line (``my img``, three tokens) is refused, naming
    the file and line: its id would be a guess.

    Returns:
        Ids in file order.

    Raises:
        FileNotFoundError: the list file does not exist. ValueError: not a regular UTF-8 text file,
        or a line of neither form.
    """
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"id list file not found: {str(p)!r}")
    if not p.is_file():
        raise ValueError(f"id list {str(p)!r} is not a regular file")
    ids: list[str] = []
    try:
        with open(p, encoding="utf-8") as f:
            for number, line in enumerate(f, 1):
                tokens = line.split()
                if not tokens:
                    continue
                pair = len(tokens) == 2 and all(t != _id_from_token(t) for t in tokens)
                if len(tokens) > 1 and not pair:
                    raise ValueError(f"id list {str(p)!r} line {number}: {line.strip()[:80]!r} is neither an image id "
                                     "nor a pair of image and label paths")
                ids.append(_id_from_token(tokens[0]))
    except UnicodeDecodeError:
        raise ValueError(f"id list {str(p)!r} is not UTF-8 text") from None
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
    except PermissionError:
        raise
    except Exception as e:  # OSError, PIL's DecompressionBombError (a tiny file claiming a huge image), ...
        raise ValueError(f"cannot read label PNG {str(p)!r}: {type(e).__name__}: {_short(e)}") from None
    return arr


def load_refusal(err: BaseException) -> str:
    """Why ``torch.load(weights_only=True)`` refused a file, in one short line: torch's own message advises
    loading it again with ``weights_only=False``, which would run whatever code the file names."""
    import re

    text = str(err)
    reason = re.search(r"WeightsUnpickler error:\s*(.+?)\s*(?:\n\s*\n|Check the documentation|$)", text, re.S)
    if reason:
        text = reason.group(1)
    elif "weights_only" in text:
        text = "it names objects a weights-only load does not build"
    line = " ".join(text.split()).split(" Please ")[0][:200]  # torch's advice on allowing the globals: not ours
    return f"{type(err).__name__}: {line}" if line else type(err).__name__

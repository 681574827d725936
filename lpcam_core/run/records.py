"""What made the files of a directory: the JSON records that keep a resumed run from mixing maps.

A resumable run keeps the complete files it finds. After a retraining or a rebuilt bank it would
silently mix old maps with new ones, so each map directory records what made its files:

* ``<dir>/lpcam_maps.json`` (:func:`claim_map_dir`, :func:`seal_map_dir`): the kind of maps, the
  network's fingerprint, the scales and, for LPCAM maps, the bank file's fingerprint. A new directory
  gets the record at once; a directory with the same record resumes; any other record (or map files
  without one) needs ``overwrite``, which drops the record until every file is rewritten.
* ``<dir>/lpcam_baseline.json`` (:func:`check_baseline_record`): a baseline directory is only ever
  filled in (its files are never overwritten), so a record of another checkpoint is refused.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from ..io import atomic_write_bytes

__all__ = [
    "MAPS_RECORD",
    "BASELINE_RECORD",
    "model_fingerprint",
    "file_fingerprint",
    "maps_record",
    "read_record",
    "write_record",
    "claim_map_dir",
    "seal_map_dir",
    "check_baseline_record",
]

logger = logging.getLogger(__name__)

MAPS_RECORD = "lpcam_maps.json"
BASELINE_RECORD = "lpcam_baseline.json"
_MAX_RECORD_BYTES = 1 << 20


def model_fingerprint(model: torch.nn.Module, extra_weight: torch.Tensor | None = None) -> str:
    """sha256 (16 hex digits) of a network's state dict (and of an extra weight, e.g. ReCAM's ``W_recam``)."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    if extra_weight is not None:
        digest.update(extra_weight.detach().float().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]


def file_fingerprint(path: str | os.PathLike) -> str:
    """sha256 (16 hex digits) of a file's bytes (a prototype bank: rebuilt in place, it changes)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()[:16]


def maps_record(kind: str, model: str, scales: Sequence[float] | None, *, bank_path: str | os.PathLike | None = None,
                **extra: Any) -> dict[str, Any]:
    """``{maps, model, scales[, bank], **extra}``: what makes a map directory's files (fingerprints, not paths).

    Args:
        kind: ``"baseline"``, ``"lpcam"``, ``"amn"``, ...
        model: the network's fingerprint (:func:`model_fingerprint`).
        scales: the inference scales (None: the host's own).
        bank_path: the bank the LPCAM maps come from (its bytes are fingerprinted).
        extra: other settings that change the files (JSON values).
    """
    record: dict[str, Any] = {"maps": kind, "model": model, **extra}
    record["scales"] = None if scales is None else [float(x) for x in scales]
    if bank_path is not None:
        record["bank"] = file_fingerprint(bank_path)
    return record


def read_record(path: str | os.PathLike) -> dict[str, Any] | None:
    """The JSON record at ``path``, or None when there is none.

    Raises:
        ValueError: the file is not a JSON object of at most 1 MiB (names the file).
    """
    path = os.fspath(path)
    if not os.path.exists(path):
        return None
    if not os.path.isfile(path) or os.path.getsize(path) > _MAX_RECORD_BYTES:
        raise ValueError(f"{path}: not an lpcam directory record (expected a small JSON file); remove it")
    try:
        with open(path, encoding="utf-8") as handle:
            data = json.load(handle)
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as err:
        raise ValueError(f"{path}: not an lpcam directory record ({type(err).__name__}); remove it") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: not an lpcam directory record (a JSON {type(data).__name__}); remove it")
    return data


def write_record(path: str | os.PathLike, record: Mapping[str, Any]) -> None:
    """Write a directory's JSON record atomically."""
    atomic_write_bytes(path, json.dumps(dict(record), indent=1, sort_keys=True).encode())


def claim_map_dir(out_dir: str | os.PathLike, record: Mapping[str, Any], *, overwrite: bool) -> None:
    """Refuse to resume into a directory whose maps another checkpoint, bank or setting made.

    A new directory gets ``record`` now; a directory with the same record resumes; otherwise (another
    record, or map files without one) the run needs ``overwrite``, which removes the record until
    :func:`seal_map_dir` writes the new one once every file is rewritten (so a run killed midway leaves
    no record, and the next run asks for ``--overwrite`` again).

    Raises:
        ValueError: the directory holds maps of another record (naming the differing keys), or map
            files without a record, and ``overwrite`` is False.
    """
    folder = os.fspath(out_dir)
    if os.path.isfile(os.path.join(folder, BASELINE_RECORD)):
        raise ValueError(f"{folder} holds the baseline CAMs a prototype bank is built from ({BASELINE_RECORD}): "
                         "maps never go there, choose another output directory")
    path = os.path.join(folder, MAPS_RECORD)
    have = read_record(path)
    if have == dict(record):
        return
    if overwrite:
        if have is not None:
            os.unlink(path)
        return
    existing = sum(1 for f in os.listdir(folder) if f.endswith(".npy")) if os.path.isdir(folder) else 0
    if have is not None and existing == 0:  # a run that failed before its first map: nothing to mix
        have = None
    if have is not None:
        diff = sorted(k for k in set(record) | set(have) if have.get(k) != record.get(k))
        raise ValueError(
            f"{folder} holds maps made by another {', '.join(diff)} "
            f"({ {k: have.get(k) for k in diff} } != { {k: record.get(k) for k in diff} }); resuming would mix "
            "old and new maps: pass --overwrite to recompute every file, or choose another output directory"
        )
    if existing:
        raise ValueError(
            f"{folder} holds {existing} map file(s) without {MAPS_RECORD} (an interrupted --overwrite run, or an "
            "older version): nothing says which checkpoint and bank made them; pass --overwrite to recompute "
            "every file, or choose another output directory"
        )
    seal_map_dir(folder, record)


def seal_map_dir(out_dir: str | os.PathLike, record: Mapping[str, Any]) -> None:
    """Write ``<out_dir>/lpcam_maps.json``: every map file there was made as ``record`` says."""
    os.makedirs(out_dir, exist_ok=True)
    write_record(os.path.join(os.fspath(out_dir), MAPS_RECORD), record)


def check_baseline_record(baseline_dir: str | os.PathLike, record: Mapping[str, Any]) -> None:
    """Refuse a baseline directory made by another checkpoint or setting; record ours in a new one.

    Baselines are never overwritten, so stale maps (after retraining) would silently feed the pools:
    ``<baseline_dir>/lpcam_baseline.json`` records the network's fingerprint and scales.

    Raises:
        ValueError: the directory's record differs from ``record`` (names the differing keys).
    """
    if os.path.isfile(os.path.join(os.fspath(baseline_dir), MAPS_RECORD)):
        raise ValueError(f"{baseline_dir} holds maps written by lpcam ({MAPS_RECORD}), not baseline CAMs: choose "
                         "another baseline directory")
    path = os.path.join(os.fspath(baseline_dir), BASELINE_RECORD)
    have = read_record(path)
    if have is not None:
        diff = sorted(k for k in record if have.get(k) != record[k])
        if diff:
            raise ValueError(
                f"{baseline_dir} holds baseline CAMs of another checkpoint or setting ({', '.join(diff)} differ: "
                f"{ {k: have.get(k) for k in diff} } != { {k: record[k] for k in diff} }); baselines are never "
                "overwritten: delete that directory or set LPCAM_BASELINE_DIR to another one"
            )
        return
    os.makedirs(baseline_dir, exist_ok=True)
    existing = sum(1 for f in os.listdir(baseline_dir) if f.endswith(".npy"))
    if existing:
        logger.warning("%s holds %d baseline CAM files without a record of their checkpoint: assuming this one",
                       baseline_dir, existing)
    write_record(path, record)

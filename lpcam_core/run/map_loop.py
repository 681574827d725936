"""The one map loop: one file per image, sharded over the processes, atomic, resumable, recorded.

Every host's baseline and LPCAM passes, in every execution mode, write their files through
:func:`write_maps`, so the rules live here once:

* nothing is ever written into a directory the run reads from (:func:`lpcam_core.io.check_output_dir`);
* each file is written atomically by exactly one process (its shard of the ids);
* ``mode="resume"`` keeps complete files and refuses a directory another checkpoint, bank or setting
  filled (:func:`~lpcam_core.run.records.claim_map_dir`); ``"overwrite"`` rewrites every file and records
  the run once all are written; ``"fill"`` only adds missing files (a baseline directory, guarded by
  its own record);
* temporary files a killed run of the same shard left behind are removed.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Union

import torch

from ..config import short_repr
from ..io import check_output_dir, remove_stale_temporaries, should_skip
from .context import barrier, raise_on_all_ranks, rank, shard, sum_over_ranks, world_size
from .feed import ItemFeed
from .records import claim_map_dir, seal_map_dir

__all__ = ["MapStats", "write_maps", "MODES", "check_ids"]

logger = logging.getLogger(__name__)

PathLike = Union[str, "os.PathLike[str]"]
MODES = ("resume", "overwrite", "fill")


@dataclass(frozen=True)
class MapStats:
    """What :func:`write_maps` did.

    Attributes:
        total: ids in the list. written / skipped: files written / found complete, over all processes.
        rank_written / rank_skipped: the same for this process. removed_temporaries: stale temporary
            files of killed runs removed (all processes). seconds: this process's wall time.
    """

    total: int
    written: int
    skipped: int
    rank_written: int
    rank_skipped: int
    removed_temporaries: int
    seconds: float


def check_ids(ids: Iterable[Any]) -> list[str]:
    """The ids as strings; refused when repeated (two processes would write one file) or not plain file names."""
    if isinstance(ids, (str, bytes)):
        raise TypeError(f"ids must be a list of image ids, not one string ({short_repr(ids)})")
    ids = [str(i) for i in ids]
    if len(set(ids)) != len(ids):
        dupes = sorted(i for i, n in Counter(ids).items() if n > 1)[:5]
        raise ValueError(f"image ids must be unique (two processes would write one file), repeated: {dupes}")
    bad = [i for i in ids if "/" in i or os.sep in i or i in ("", ".", "..") or "\0" in i]
    if bad:
        raise ValueError(f"image ids must be plain file names, got {bad[:5]}")
    return ids


def write_maps(
    ids: Sequence[str],
    compute: Callable[[Any], Any],
    out_dir: PathLike,
    writer: Callable[[Path, Any], Any],
    *,
    mode: str = "resume",
    record: Mapping[str, Any] | None = None,
    reads: Iterable[PathLike | None] = (),
    dataset: Any = None,
    dataset_ids: Sequence[str] | None = None,
    num_workers: int = 0,
    suffix: str = ".npy",
    loader: Callable[[Path], Any] | None = None,
    progress: bool | None = None,
    desc: str = "maps",
) -> MapStats:
    """Collective: compute and write one file per id, sharded over the processes.

    Args:
        ids: the images to write, the same list on every process.
        compute: item -> result (under ``torch.no_grad``). The item is ``dataset``'s item of the id
            (loaded ahead by ``num_workers`` DataLoader workers), or the id itself without a dataset.
        out_dir: output directory (created; refused when it is one of ``reads``).
        writer: ``(path, result) -> None`` writing atomically (a host's file format).
        mode: ``"resume"`` (default), ``"overwrite"`` or ``"fill"`` (see the module docstring).
        record: what makes the maps (:func:`~lpcam_core.run.records.maps_record`); required for
            ``resume`` and ``overwrite``.
        reads: directories the run reads from (baselines, images), never written into.
        dataset, dataset_ids: the items and their ids, in order (default ``ids``).
        num_workers: DataLoader workers prefetching this process's items.
        suffix: file name is ``<id><suffix>``.
        loader: checks an existing file is complete (default by suffix, :func:`lpcam_core.io.should_skip`).
        progress: a progress bar on rank 0 (default: when stderr is a terminal).
        desc: progress and log label.

    Returns:
        :class:`MapStats`, on every process once all files exist.
    """
    from tqdm.auto import tqdm

    start = time.perf_counter()
    if mode not in MODES:
        raise ValueError(f"mode={mode!r}: expected one of {MODES}")
    if mode != "fill" and record is None:
        raise ValueError(f"mode={mode!r} needs the record of what makes the maps")
    ids = check_ids(ids)
    out = check_output_dir(out_dir, read_dirs=reads)
    if record is not None:
        raise_on_all_ranks(lambda: claim_map_dir(out, record, overwrite=mode == "overwrite"))
    mine = shard(ids)
    removed = remove_stale_temporaries(out, {f"{i}{suffix}" for i in mine})
    todo = mine if mode == "overwrite" else [i for i in mine if not should_skip(out / f"{i}{suffix}", loader=loader)]
    feed = ItemFeed(dataset, dataset_ids if dataset_ids is not None else ids, todo, num_workers) if dataset is not None else None
    show = (sys.stderr.isatty() if progress is None else progress) and rank() == 0
    written = 0
    try:
        with tqdm(total=len(todo), desc=desc, disable=not show, leave=False) as bar, torch.no_grad():
            for image_id in todo:
                result = compute(feed(image_id) if feed is not None else image_id)
                writer(out / f"{image_id}{suffix}", result)
                written += 1
                bar.update(1)
    finally:
        if feed is not None:
            feed.close()
    skipped = len(mine) - len(todo)
    total_written, total_skipped, total_removed = sum_over_ranks([written, skipped, removed])
    barrier()
    if record is not None and rank() == 0:
        seal_map_dir(out, record)
    stats = MapStats(len(ids), total_written, total_skipped, written, skipped, total_removed, time.perf_counter() - start)
    if rank() == 0:
        logger.info("%s: %d written, %d already complete, %d ids, %d process(es), out %s",
                    desc, stats.written, stats.skipped, stats.total, world_size(), out)
    return stats

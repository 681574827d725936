"""The Host protocol: what a host supplies (glue only), and the passes every host runs on it.

A host adapter is one file of glue. It describes itself for the CLI and the patch
(:class:`HostInfo`, torch-free) and, at run time, hands an object of the :class:`Host` protocol to
the passes below, which run on :mod:`lpcam_core.run` (one process, spawned workers or torchrun: one
code path):

* :func:`prototype_bank`: the bank, reused when built with the same classifier, settings and
  provenance, else streamed into the one bank loop in one backbone pass per prototype image (the
  baseline CAM, written to a directory guarded by its record, and the pooled features of its scale-1 view);
* :func:`fill_baselines`: the host's own CAM of the prototype images alone (missing files only);
* :func:`write_lpcam` / :func:`write_baseline`: the map loop with the host's writer.

The core never imports a host; a host never reaches inside the core or the run layer.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from .settings import HostSettings, Option

if TYPE_CHECKING:
    import torch

    from lpcam_core import PrototypeBank
    from lpcam_core.classifier import Scorer

__all__ = [
    "HostInfo",
    "Host",
    "Datasets",
    "fill_baselines",
    "prototype_bank",
    "write_lpcam",
    "write_baseline",
    "swap_pass",
    "own_pass",
    "resolve_workers",
    "warn_all_zero_maps",
]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class HostInfo:
    """What the CLI, the patch and ``--explain`` know of a host, without importing torch.

    Attributes:
        name: ``lpcam <name> ...`` and ``import lpcam_adapters.<module>``.
        title: one line, with the repository.
        module: the adapter module (``lpcam_adapters.irn``): the import line names it.
        entry_script: the host script that gets the import line (``run_sample.py``, ``main.py``).
        signature: ``{relative path: text}`` every checkout of this host holds (how ``patch`` tells it
            from another project's script of the same name).
        foreign: ``{relative path: host}`` files whose presence says the checkout is that other host's
            (an AMN checkout holds IRN's files too).
        options: the host's own settings (:class:`~lpcam_adapters.settings.Option`).
        section: the YAML section of those settings (``adapter``, ``amn``).
        env_docs: documentation overrides of the common variables.
        patch_owners: other modules whose patches ``--explain`` lists with the adapter's own (the IRN
            family's modern-stack shims, registered by ``lpcam_adapters.compat``).
        unread_env: common variables this host does not read (``LPCAM_WORKERS`` where the host runs its own
            loop): ``--explain`` leaves them out and a run that finds one set says it changes nothing.
        thresholds: what to run the host's next steps with on LPCAM maps (one line), or ''.
    """

    name: str
    title: str
    module: str
    entry_script: str
    signature: Mapping[str, str]
    foreign: Mapping[str, str] = field(default_factory=dict)
    options: tuple[Option, ...] = ()
    section: str = "adapter"
    env_docs: Mapping[str, str] = field(default_factory=dict)
    patch_owners: tuple[str, ...] = ()
    unread_env: tuple[str, ...] = ()
    thresholds: str = ""


class Host(Protocol):
    """The glue a host supplies at run time (items are the host dataset's items, opaque here).

    Attributes:
        name: for logs and bank provenance.
        num_classes: foreground classes of the classifier.
    """

    name: str
    num_classes: int

    def to(self, device: torch.device) -> Host:
        """The host's networks on ``device``."""
        ...

    def scorer(self) -> Scorer:
        """The classifier that scores prototype centres."""
        ...

    def pool_inputs(self, image_id: str, item: Any, baseline_dir: str | None) -> tuple[torch.Tensor, Any, Any]:
        """One prototype image: features [C, h, w] (one scale, no flip), baseline maps [n, H, W], keys [n]."""
        ...

    def baseline(self, item: Any) -> Any:
        """The host's own CAM of one image, in the host's file format (a record for :meth:`write`)."""
        ...

    def baseline_and_features(self, item: Any) -> tuple[Any, torch.Tensor | None]:
        """:meth:`baseline` of a multi-scale item and the pooled features [C, h, w] taken from the same
        backbone pass (its scale-1 unflipped view), or None where that pass does not compute them."""
        ...

    def pool_maps(self, record: Any) -> tuple[Any, Any]:
        """The maps [n, H, W] that split the pools and their keys [n], out of a baseline record."""
        ...

    def lpcam(self, item: Any, bank: PrototypeBank) -> Any:
        """LPCAM of one image in the host's file format."""
        ...

    def write(self, path: Any, record: Any) -> None:
        """Write a record atomically in the host's file format."""
        ...

    def maps_record(self, kind: str, bank_path: str | None = None) -> dict[str, Any]:
        """What makes a map directory's files (:func:`lpcam_core.run.maps_record`)."""
        ...


@dataclass
class Datasets:
    """The host datasets of a pass, with their image ids in order.

    Attributes:
        proto: multi-scale items of the prototype list (their baseline maps).
        proto_ids: ids of ``proto``.
        pool: one-scale, unflipped items of the prototype list (the pooled features); same ids.
        labels: prototype id -> present classes (the clustering plan).
        maps: multi-scale items of the list the maps are written for.
        map_ids: ids of ``maps``.
        loader_workers: DataLoader workers per process.
    """

    proto: Any = None
    proto_ids: Sequence[str] = ()
    pool: Any = None
    labels: Mapping[str, Sequence[int]] = field(default_factory=dict)
    maps: Any = None
    map_ids: Sequence[str] = ()
    loader_workers: int = 0


def resolve_workers(settings: HostSettings) -> int:
    """Processes to spawn for the image loops: the setting, else one per GPU (0, in-process: on a CPU machine,
    with a device named, and under torchrun, which launched the processes itself)."""
    from lpcam_core import run

    if settings.workers is not None:
        return settings.workers
    if settings.device is not None or run.launched_by_torchrun():
        return 0
    import torch

    return torch.cuda.device_count()


def fill_baselines(host: Host, data: Datasets, baseline_dir: str | None, fingerprint: Mapping[str, Any], *,
                   reads: Sequence[str | None] = ()) -> Any:
    """Collective: the host's baseline maps of the prototype images that lack one (never overwritten).

    ``<baseline_dir>/lpcam_baseline.json`` must record the same ``fingerprint`` (network, scales), or
    the directory is refused (its maps would feed the pools with another checkpoint's CAM). Nothing to
    do when ``baseline_dir`` is None (a host whose pools are split by something else).
    """
    from lpcam_core import run

    if baseline_dir is None:
        return None
    from lpcam_core.io import check_output_dir

    check_output_dir(baseline_dir, read_dirs=reads)  # before the record is written there
    run.raise_on_all_ranks(lambda: run.check_baseline_record(baseline_dir, fingerprint))
    run.barrier()
    return run.write_maps(data.proto_ids, host.baseline, baseline_dir, host.write, mode="fill", reads=reads,
                          dataset=data.proto, num_workers=data.loader_workers, desc=f"baseline CAM -> {baseline_dir}")


def prototype_bank(host: Host, data: Datasets, baseline_dir: str | None, bank_path: str | None,
                   settings: HostSettings, meta: Mapping[str, Any], *, device: torch.device | None = None,
                   fingerprint: Mapping[str, Any] | None = None, reads: Sequence[str | None] = ()) -> PrototypeBank:
    """Collective: the bank at ``bank_path`` when it was built with this classifier, settings and ``meta``;
    else a new one from the prototype images, saved there.

    One backbone pass per prototype image: an image whose baseline is missing from ``baseline_dir`` gets
    it computed (and written) by :meth:`Host.baseline_and_features`, whose scale-1 view also gives the
    pooled features; an image whose baseline exists only runs that one view (:meth:`Host.pool_inputs`).
    With ``fingerprint`` the baseline directory is checked against its record first (as
    :func:`fill_baselines` does); without it every baseline must exist already.
    """
    from lpcam_core import run
    from lpcam_core.io import check_output_dir, should_skip

    if baseline_dir is not None and fingerprint is not None:
        check_output_dir(baseline_dir, read_dirs=reads)  # before anything else: a wrong folder is a wrong command
    scorer = host.scorer()
    bank = run.reusable_bank(bank_path, scorer, settings.lpcam, meta, rebuild=settings.rebuild_bank)
    if bank is not None:
        return bank
    if baseline_dir is not None and fingerprint is not None:
        run.raise_on_all_ranks(lambda: run.check_baseline_record(baseline_dir, fingerprint))
        run.barrier()
    plan = run.clustering_plan(data.labels, settings.lpcam, host.num_classes)
    mine = [plan[i].image_id for i in run.shard_indices(len(plan))]
    missing = set()
    if baseline_dir is not None and fingerprint is not None:
        missing = {i for i in dict.fromkeys(mine) if not should_skip(os.path.join(baseline_dir, i + ".npy"))}
    counts = {"baselines written": 0, "pooled from the baseline pass": 0}

    def load(image_id: str) -> Any:
        if image_id in missing:
            missing.discard(image_id)  # an image drawn twice (COCO) finds its file the second time
            record, features = host.baseline_and_features(proto_feed(image_id))
            host.write(os.path.join(baseline_dir, image_id + ".npy"), record)
            counts["baselines written"] += 1
            if features is not None:
                counts["pooled from the baseline pass"] += 1
                return (features, *host.pool_maps(record))
        return host.pool_inputs(image_id, pool_feed(image_id), baseline_dir)

    first = [i for i in dict.fromkeys(mine) if i in missing]
    with run.ItemFeed(data.proto, data.proto_ids, first, data.loader_workers) as proto_feed, \
            run.ItemFeed(data.pool, data.proto_ids, [i for i in mine if i not in missing], data.loader_workers) as pool_feed:
        bank = run.build_prototypes(plan, load, host.num_classes, scorer, config=settings.lpcam, out_path=bank_path,
                                    device=device, meta=dict(meta), record_pool_peak=True)
    written, one_pass = run.sum_over_ranks([counts["baselines written"], counts["pooled from the baseline pass"]])
    if run.rank() == 0:
        logger.info("prototype images: %d baseline CAMs written to %s (%d of them pooled from that same pass), %d "
                    "read back", written, baseline_dir, one_pass, len(plan) - written)
        logger.info("prototype pools: peak %.1f MiB per process of %.1f MiB budget; peak RSS %.0f MiB (%d images, "
                    "%d process(es))", bank.meta["pool_peak_bytes"] / 2**20, settings.lpcam.memory_budget_bytes / 2**20,
                    run.peak_rss_mib(), len(plan), run.world_size())
    return bank


def write_lpcam(host: Host, bank: PrototypeBank, bank_path: str, data: Datasets, out_dir: str, *, mode: str,
                reads: Sequence[str | None] = ()) -> Any:
    """Collective: LPCAM maps of ``data.maps`` into ``out_dir`` (``mode``: resume or overwrite)."""
    import numpy as np

    from lpcam_core import run

    zero = [0, 0]  # all-zero maps, maps

    def compute(item: Any) -> Any:
        record = host.lpcam(item, bank)
        maps = record.get("high_res") if isinstance(record, dict) else None
        if maps is not None:
            peaks = [float(np.abs(m).max()) if m.size else 0.0 for m in np.asarray(maps)]
            zero[0] += sum(1 for p in peaks if p == 0.0)
            zero[1] += len(peaks)
        return record

    stats = run.write_maps(data.map_ids, compute, out_dir, host.write, mode=mode,
                           record=host.maps_record("lpcam", bank_path), reads=reads, dataset=data.maps,
                           num_workers=data.loader_workers, desc=f"LPCAM -> {out_dir}")
    zeros, total = run.sum_over_ranks(zero)
    if run.rank() == 0:
        warn_all_zero_maps(zeros, total)
    return stats


def warn_all_zero_maps(zeros: int, total: int) -> None:
    """Say how many of the per-class LPCAM maps a pass wrote are all zero (nothing when none is)."""
    if zeros:
        logger.warning("%d of the %d class maps written (one per class present in an image) are all zero (a class with no prototype in the bank, or its context "
                       "prototypes as similar as its class prototypes everywhere): expected of a barely trained model, "
                       "not of a trained one", zeros, total)


def write_baseline(host: Host, data: Datasets, out_dir: str, *, mode: str, reads: Sequence[str | None] = ()) -> Any:
    """Collective: the host's own CAM maps of ``data.maps`` into ``out_dir`` (``mode``: resume or overwrite)."""
    from lpcam_core import run

    return run.write_maps(data.map_ids, host.baseline, out_dir, host.write, mode=mode,
                          record=host.maps_record("baseline"), reads=reads, dataset=data.maps,
                          num_workers=data.loader_workers, desc=f"baseline CAM -> {out_dir}")


def swap_pass(ctx: Any, host: Host, data: Datasets, settings: HostSettings, *, baseline_dir: str, bank_path: str,
              out_dir: str, fingerprint: Mapping[str, Any], meta: Mapping[str, Any], reads: Sequence[str | None]) -> None:
    """A host's CAM pass with LPCAM (every process runs it): baselines of the prototype list, the bank,
    LPCAM maps of the host's list into ``out_dir`` (every file rewritten, the directory recorded)."""
    t0 = time.perf_counter()
    host = host.to(ctx.device)
    bank = prototype_bank(host, data, baseline_dir, bank_path, settings, meta, device=ctx.device,
                          fingerprint=fingerprint, reads=[out_dir, *(r for r in reads if r != baseline_dir)])
    t1 = time.perf_counter()
    write_lpcam(host, bank, bank_path, data, out_dir, mode="overwrite", reads=reads)
    if ctx.is_main:
        logger.info("LPCAM pass done: baselines and bank %.1fs, maps %.1fs (%d images)", t1 - t0,
                    time.perf_counter() - t1, len(data.map_ids))


def own_pass(ctx: Any, host: Host, data: Datasets, out_dir: str) -> None:
    """The host's own CAM maps computed by lpcam's loop (every file rewritten, recorded)."""
    write_baseline(host.to(ctx.device), data, out_dir, mode="overwrite")

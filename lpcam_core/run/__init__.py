"""The run layer: one engine for every host and every execution mode.

* :mod:`~lpcam_core.run.context`: one process, N spawned processes or torchrun N (:func:`launch`),
  and the collectives every loop uses (no-ops with one process);
* :mod:`~lpcam_core.run.bank_loop`: stream images into a PrototypeBuilder, merge, build or reuse the bank;
* :mod:`~lpcam_core.run.map_loop`: one file per image, sharded, atomic, resumable, recorded;
* :mod:`~lpcam_core.run.records`: what made a directory's files;
* :mod:`~lpcam_core.run.feed`: a dataset's items by id, prefetched.

Example (any host, any mode)::

    from lpcam_core import run

    def job(ctx, model, dataset):
        bank = run.build_prototypes(plan, load, 20, weight, config=cfg, out_path="bank.pt")
        run.write_maps(ids, compute, "cams", writer, record=record, dataset=dataset, dataset_ids=ids)

    run.launch(job, model, dataset, workers=4)        # or under torchrun, or workers=0
"""

from __future__ import annotations

from .bank_loop import (
    ClusterItem,
    build_from_builder,
    build_prototypes,
    clustering_plan,
    merge_builders,
    peak_rss_mib,
    reusable_bank,
    select_classes,
    stream_prototypes,
    why_not_reusable,
)
from .context import (
    DEFAULT_TIMEOUT,
    RunContext,
    all_gather,
    barrier,
    broadcast_object,
    check_device,
    check_workers,
    device_for,
    gather_object,
    init_from_env,
    is_initialized,
    launch,
    launched_by_torchrun,
    local_rank,
    raise_on_all_ranks,
    rank,
    remove_dead_rendezvous,
    shard,
    shard_indices,
    sum_over_ranks,
    world_size,
)
from .feed import ItemFeed, loader
from .map_loop import MODES, MapStats, check_ids, write_maps
from .records import (
    BASELINE_RECORD,
    MAPS_RECORD,
    check_baseline_record,
    claim_map_dir,
    file_fingerprint,
    maps_record,
    model_fingerprint,
    read_record,
    seal_map_dir,
    write_record,
)

__all__ = [
    "RunContext", "launch", "check_workers", "init_from_env", "launched_by_torchrun", "is_initialized", "rank", "world_size",
    "local_rank", "check_device", "remove_dead_rendezvous", "device_for", "barrier", "broadcast_object", "all_gather", "gather_object", "sum_over_ranks",
    "raise_on_all_ranks", "shard", "shard_indices", "DEFAULT_TIMEOUT",
    "ClusterItem", "clustering_plan", "select_classes", "merge_builders", "build_from_builder",
    "stream_prototypes", "build_prototypes", "why_not_reusable", "reusable_bank", "peak_rss_mib",
    "ItemFeed", "loader", "MapStats", "write_maps", "MODES", "check_ids",
    "MAPS_RECORD", "BASELINE_RECORD", "model_fingerprint", "file_fingerprint", "maps_record", "read_record",
    "write_record", "claim_map_dir", "seal_map_dir", "check_baseline_record",
]

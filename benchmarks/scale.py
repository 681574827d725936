"""Scale-out benchmark: prototype building and map generation versus processes and dataset size.

Every measurement runs in fresh processes launched with torchrun (``torch.distributed.run``, gloo on CPU,
nccl with ``--device cuda``), so the peak RSS of each row is that run's own. Features are synthetic and
made by every rank from (seed, image index): no data set is needed.

Tables (markdown on stdout):
1. Prototype building, 1 process, simulated dataset of 1,000 -> 16,000 images: throughput, clustering
   time, peak RSS. With a fixed memory budget the peak RSS must stay flat as the dataset grows.
2. Prototype building versus number of processes (throughput, peak RSS per process).
3. Map generation (``lpcam_multiscale`` + atomic IRN files) versus number of processes.
4. COCO-like stress: 80 classes, the COCO preset (K=20, 100 images per class with replacement), the
   budget must hold (largest pool bytes seen during the run <= budget).

Usage::

    python benchmarks/scale.py                 # full run (CPU, 128-d features)
    python benchmarks/scale.py --quick         # a fast smoke run
    python benchmarks/scale.py --dim 2048 --grid 32x24 --budget-mib 512   # ResNet-50-like features
    python benchmarks/scale.py --device cuda --procs 1,2,4,8               # on a GPU machine
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

SEED = 0


def _status_mib(field: str) -> float | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def _rss_mib() -> float:
    value = _status_mib("VmRSS")
    return float("nan") if value is None else value


def _peak_rss_mib() -> float:
    """This process's peak RSS: VmHWM (Linux). Not ``ru_maxrss``: Linux carries that over from the parent
    across fork + exec, so a worker would report the torchrun agent's RSS if it was larger."""
    value = _status_mib("VmHWM")
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 if value is None else value


# ----------------------------------------------------------------------------- synthetic data


def image_labels(index: int, num_classes: int) -> list[int]:
    """1-3 classes, skewed towards low class indices (COCO's 'person' effect)."""
    g = np.random.default_rng([SEED, index])
    p = 1.0 / np.arange(1, num_classes + 1) ** 0.8
    n = min(num_classes, 1 + int(g.integers(3)))
    return sorted(int(c) for c in g.choice(num_classes, n, replace=False, p=p / p.sum()))


def image_features(index: int, keys: list[int], dim: int, grid: tuple[int, int], device: torch.device):
    """(features [dim, h, w], cams [n, 2h, 2w], keys) of one simulated training image."""
    g = torch.Generator(device=device).manual_seed(SEED * 1_000_003 + index)
    feats = torch.rand(dim, *grid, generator=g, device=device)
    cams = torch.rand(len(keys), 2 * grid[0], 2 * grid[1], generator=g, device=device) ** 2
    return feats, cams, torch.tensor(keys)


# ----------------------------------------------------------------------------- workers (under torchrun)


def worker_build(args) -> dict:
    from lpcam_core import run as lpdist
    from lpcam_core.config import LPCAMConfig
    from lpcam_core.prototypes import PrototypeBuilder

    device = torch.device(args.device if args.device == "cpu" else f"cuda:{lpdist.local_rank()}")
    grid = tuple(int(v) for v in args.grid.split("x"))
    budget = int(args.budget_mib * 2**20)
    if args.coco:
        config = LPCAMConfig.preset("coco", memory_budget_bytes=budget)
        labels = {f"{i:07d}": image_labels(i, args.classes) for i in range(args.images)}
        plan = lpdist.clustering_plan(labels, config, args.classes)
    else:
        config = LPCAMConfig.preset("voc", memory_budget_bytes=budget)
        labels = None
        plan = None
    n_items = len(plan) if plan is not None else args.images
    baseline = _rss_mib()
    builder = PrototypeBuilder(args.classes, config)
    max_held = 0
    offered_bytes = 0
    lpdist.barrier()
    t0 = time.perf_counter()
    for index in lpdist.shard_indices(n_items):
        if plan is not None:
            item = plan[index]
            i = int(item.image_id)
            feats, cams, keys = image_features(i, labels[item.image_id], args.dim, grid, device)
            cams, keys = lpdist.select_classes(cams, keys, item.classes)
        else:
            feats, cams, keys = image_features(index, image_labels(index, args.classes), args.dim, grid, device)
        builder.add(feats, cams, keys, index=index)
        offered_bytes += feats.numel() * 4 * len(keys)
        max_held = max(max_held, builder.bytes_held)
    add_s = time.perf_counter() - t0
    stream_peak = _peak_rss_mib()
    offered_rows = sum(p.seen for p in builder.pools.values())
    lpdist.barrier()
    t1 = time.perf_counter()
    weight = torch.randn(args.classes, args.dim, generator=torch.Generator().manual_seed(1)).to(device)
    from lpcam_core.classifier import LinearScorer

    bank = lpdist.build_from_builder(builder, LinearScorer(weight), device=device, progress=False)
    build_s = time.perf_counter() - t1
    return {
        "rank": lpdist.rank(),
        "world": lpdist.world_size(),
        "threads": torch.get_num_threads(),
        "items": n_items,
        "add_s": add_s,
        "build_s": build_s,
        "baseline_rss_mib": baseline,
        "peak_rss_mib": _peak_rss_mib(),
        "stream_peak_rss_mib": stream_peak,
        "max_pool_bytes": max_held,
        "offered_rows_rank": offered_rows,
        "offered_bytes_rank": offered_bytes,
        "budget_bytes": budget,
        "clustered_rows": sum(bank.meta["features_clustered"].values()),
        "seen_rows": sum(bank.meta["features_seen"].values()),
        "pools": len(bank.meta["features_seen"]),
        "prototypes": sum(v.shape[0] for v in bank.foreground.values()),
    }


def worker_maps(args) -> dict:
    from lpcam_core import run as lpdist
    from lpcam_core.bank import PrototypeBank
    from lpcam_core.maps import lpcam_multiscale

    device = torch.device(args.device if args.device == "cpu" else f"cuda:{lpdist.local_rank()}")
    grid = tuple(int(v) for v in args.grid.split("x"))
    g = torch.Generator().manual_seed(SEED)
    k = 12
    bank = PrototypeBank(
        {c: torch.rand(k, args.dim, generator=g) for c in range(args.classes)},
        {c: torch.rand(k, args.dim, generator=g) for c in range(args.classes)},
        {"num_classes": args.classes},
    )
    image_size = (grid[0] * 16, grid[1] * 16)
    scales = (1.0, 0.5, 1.5, 2.0)

    def compute(image_id: str):
        index = int(image_id)
        keys = image_labels(index, args.classes)
        gen = torch.Generator(device=device).manual_seed(index)
        views = []
        for s in scales:
            h, w = max(1, round(grid[0] * s)), max(1, round(grid[1] * s))
            views.append(torch.rand(2, args.dim, h, w, generator=gen, device=device))
        return lpcam_multiscale(views, bank, keys, image_size)

    ids = [f"{i:07d}" for i in range(args.images)]
    baseline = _rss_mib()
    lpdist.barrier()
    t0 = time.perf_counter()
    from lpcam_core.formats import irn_writer

    stats = lpdist.write_maps(ids, compute, args.out, irn_writer, mode="fill", progress=False)
    seconds = time.perf_counter() - t0
    return {
        "rank": lpdist.rank(),
        "world": lpdist.world_size(),
        "threads": torch.get_num_threads(),
        "items": len(ids),
        "written": stats.written,
        "rank_written": stats.rank_written,
        "gen_s": seconds,
        "baseline_rss_mib": baseline,
        "peak_rss_mib": _peak_rss_mib(),
    }


def worker_main(argv: list[str]) -> None:
    import logging

    logging.basicConfig(level=logging.WARNING)
    args = build_parser().parse_args(argv)
    torch.set_num_threads(args.threads)
    from lpcam_core import run as lpdist

    ctx = lpdist.init_from_env()
    result = worker_build(args) if args.worker == "build" else worker_maps(args)
    Path(f"{args.result}.rank{ctx.rank}.json").write_text(json.dumps(result))
    ctx.close()


# ----------------------------------------------------------------------------- driver


def launch(nproc: int, worker: str, args, **overrides) -> list[dict]:
    """Run a worker under torchrun with ``nproc`` processes; returns each rank's result."""
    threads = overrides.pop("threads", None) or args.threads_per_process
    with tempfile.TemporaryDirectory(prefix="lpcam_scale_") as tmp:
        result = os.path.join(tmp, "result")
        opts = {
            "dim": args.dim, "grid": args.grid, "budget_mib": args.budget_mib, "classes": args.classes,
            "images": args.images, "device": args.device, "out": os.path.join(tmp, "maps"), **overrides,
        }
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
               os.path.abspath(__file__), "--worker", worker, "--result", result, "--threads", str(threads)]
        for key, value in opts.items():
            if isinstance(value, bool):
                if value:
                    cmd.append(f"--{key.replace('_', '-')}")
            else:
                cmd += [f"--{key.replace('_', '-')}", str(value)]
        env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
        for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
            env.pop(key, None)
        done = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if done.returncode != 0:
            sys.stderr.write(done.stdout[-4000:] + done.stderr[-4000:])
            raise SystemExit(f"worker {worker} with {nproc} process(es) failed (exit {done.returncode})")
        return [json.loads(Path(f"{result}.rank{r}.json").read_text()) for r in range(nproc)]


def _mib(b: float) -> str:
    return f"{b / 2**20:,.0f}"


def table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---:" for _ in header) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def build_row(results: list[dict]) -> dict:
    wall = max(r["add_s"] for r in results)
    return {
        "world": results[0]["world"],
        "threads": results[0]["threads"],
        "items": results[0]["items"],
        "img_s": results[0]["items"] / wall if wall > 0 else float("inf"),
        "add_s": wall,
        "build_s": results[0]["build_s"],
        "peak": [r["peak_rss_mib"] for r in results],
        "over_base": [r["peak_rss_mib"] - r["baseline_rss_mib"] for r in results],
        "stream_over_base": [r["stream_peak_rss_mib"] - r["baseline_rss_mib"] for r in results],
        "max_pool": max(r["max_pool_bytes"] for r in results),
        "budget": results[0]["budget_bytes"],
        "seen": results[0]["seen_rows"],
        "clustered": results[0]["clustered_rows"],
        "offered_bytes": sum(r["offered_bytes_rank"] for r in results),
        "pools": results[0]["pools"],
        "prototypes": results[0]["prototypes"],
    }


def main() -> None:
    args = build_parser().parse_args()
    if args.worker:
        return worker_main(sys.argv[1:])
    if args.quick:
        sizes, procs_images, map_images, coco_images = [1000, 2000, 4000], 2000, 100, 4000
    else:
        sizes, procs_images, map_images, coco_images = [1000, 2000, 4000, 8000, 16000], 8000, 400, 20000
    if args.sizes:
        sizes = [int(s) for s in args.sizes.split(",")]
    procs = [int(p) for p in args.procs.split(",")]
    out = [
        f"# LPCAM scale-out benchmark\n\ndevice {args.device}, {os.cpu_count()} CPU cores, features "
        f"{args.dim} x {args.grid}, memory budget {args.budget_mib:g} MiB, torch {torch.__version__}\n"
    ]
    print(out[0], flush=True)

    # 1. dataset size
    rows = []
    for n in sizes:
        r = build_row(launch(1, "build", args, images=n, classes=args.classes))
        rows.append([f"{n:,}", f"{r['img_s']:,.0f}", f"{r['add_s']:.1f}", f"{r['build_s']:.1f}",
                     _mib(r["offered_bytes"]), _mib(r["max_pool"]), f"{r['clustered']:,} / {r['seen']:,}",
                     f"{r['peak'][0]:,.0f}", f"{r['stream_over_base'][0]:,.0f}", f"{r['over_base'][0]:,.0f}"])
        print(f"  size {n}: {rows[-1]}", file=sys.stderr, flush=True)
    text = "## Prototype building versus dataset size (1 process, VOC preset, " + f"{args.classes} classes)\n\n" + table(
        ["images", "images/s", "add s", "cluster s", "all features MiB", "pools max MiB", "rows clustered / offered",
         "peak RSS MiB", "streaming peak - baseline MiB", "overall peak - baseline MiB"], rows)
    out.append(text)
    print(text + "\n", flush=True)

    # 2. processes, building
    rows = []
    for p in procs:
        r = build_row(launch(p, "build", args, images=procs_images, classes=args.classes))
        rows.append([str(p), str(r["threads"]), f"{procs_images:,}", f"{r['img_s']:,.0f}", f"{r['add_s']:.1f}",
                     f"{r['build_s']:.1f}", " / ".join(f"{v:,.0f}" for v in r["peak"])])
        print(f"  procs {p}: {rows[-1]}", file=sys.stderr, flush=True)
    text = "## Prototype building versus processes\n\n" + table(
        ["processes", "threads each", "images", "images/s", "add s", "merge + cluster s", "peak RSS MiB per rank"], rows)
    out.append(text)
    print(text + "\n", flush=True)

    # 3. processes, maps
    rows = []
    for p in procs:
        res = launch(p, "maps", args, images=map_images, classes=args.classes)
        wall = max(r["gen_s"] for r in res)
        rows.append([str(p), str(res[0]["threads"]), f"{map_images:,}", f"{map_images / wall:,.1f}", f"{wall:.1f}",
                     " / ".join(f"{r['peak_rss_mib']:,.0f}" for r in res)])
        print(f"  maps procs {p}: {rows[-1]}", file=sys.stderr, flush=True)
    text = "## Map generation versus processes (4 scales x flip, IRN files written atomically)\n\n" + table(
        ["processes", "threads each", "images", "images/s", "seconds", "peak RSS MiB per rank"], rows)
    out.append(text)
    print(text + "\n", flush=True)

    # 4. COCO-like stress
    rows = []
    for p in procs[:2]:
        r = build_row(launch(p, "build", args, images=coco_images, classes=80, coco=True))
        ok = "yes" if r["max_pool"] <= r["budget"] else "NO"
        rows.append([str(p), f"{coco_images:,}", f"{r['items']:,}", str(r["pools"]), f"{r['img_s']:,.0f}",
                     f"{r['build_s']:.1f}", _mib(r["offered_bytes"]), f"{_mib(r['max_pool'])} / {_mib(r['budget'])}", ok,
                     " / ".join(f"{v:,.0f}" for v in r["peak"]), str(r["prototypes"])])
        print(f"  coco procs {p}: {rows[-1]}", file=sys.stderr, flush=True)
    text = "## COCO-like stress: 80 classes, COCO preset (K=20, 100 draws per class)\n\n" + table(
        ["processes", "dataset images", "stream items", "pools", "items/s", "merge + cluster s", "all features MiB",
         "pools max / budget MiB", "budget holds", "peak RSS MiB per rank", "class prototypes"], rows)
    out.append(text)
    print(text + "\n", flush=True)
    if args.report:
        Path(args.report).write_text("\n\n".join(out) + "\n")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="small sizes, a fast run")
    parser.add_argument("--dim", type=int, default=128, help="feature channels (2048 for ResNet-50)")
    parser.add_argument("--grid", default="20x15", help="feature grid h x w at scale 1 (COCO ResNet-50: 32x24)")
    parser.add_argument("--budget-mib", type=float, default=64.0, help="prototype pool memory budget")
    parser.add_argument("--classes", type=int, default=20, help="classes of the dataset-size and process tables")
    parser.add_argument("--sizes", default="", help="comma-separated dataset sizes (default 1000..16000)")
    parser.add_argument("--procs", default="1,2", help="comma-separated process counts")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--report", default="", help="also write the tables to this markdown file")
    parser.add_argument(
        "--threads-per-process", type=int, default=1,
        help="torch/OpenMP threads of each process (torchrun's default 1; more threads on a busy machine "
        "make OpenMP spin and run many times slower)",
    )
    # worker-only options
    parser.add_argument("--worker", choices=["build", "maps"], help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    parser.add_argument("--threads", type=int, default=1, help=argparse.SUPPRESS)
    parser.add_argument("--images", type=int, default=1000, help=argparse.SUPPRESS)
    parser.add_argument("--coco", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    return parser


if __name__ == "__main__":
    main()

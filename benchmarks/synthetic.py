"""CAM vs LPCAM seeds on the synthetic part-based benchmark, with options for ablations.

The demo's pipeline (:func:`lpcam_core.demo.run_pipeline`), one run per seed: generate (cached)
data, train a small CNN from scratch with image labels, build prototypes, score the seeds of
held-out images. Prints a markdown table and optionally writes JSON::

    {"cam": {...}, "lpcam_no_context": {...}, "lpcam": {...}, "settings": {...}, "runs": [...]}

Each row holds ``miou``, ``precision``, ``recall`` (percent, at the method's best threshold) and
``threshold``; with several seeds the rows are means over seeds (``*_std`` their spread) and
``runs`` holds every seed's own rows and ``gain_interval``, LPCAM - CAM with a 95% paired
bootstrap interval over the held-out images (the evaluation's noise; the spread over seeds is
the training's).

Examples::

    python benchmarks/synthetic.py --seed 0 1 2 3 --json seeds.json
    python benchmarks/synthetic.py --seed 0 --num-classes 10 --tau 0.2 --k 8
    python benchmarks/synthetic.py --seed 0 --sharing 1.0        # identical bodies: no gain expected
    python benchmarks/synthetic.py --seed 0 --amp      # also the seeds with the backbone under autocast

``--amp`` scores the seeds a second time from the same network and bank with the network's forward
under autocast (bfloat16 on the CPU, float16 on CUDA; the maps' maths stay float32), as ``--amp``
runs a host's maps pass, and reports both rows and the largest difference of the maps.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import statistics
import sys
import time
from pathlib import Path
from typing import Any

from lpcam_core.demo import METHODS, demo_settings, format_gain, format_table, run_pipeline

logger = logging.getLogger("benchmarks.synthetic")

_SCORES = ("miou", "precision", "recall", "threshold", "miou_at_eval")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--seed", type=int, nargs="+", default=[0], help="one run per seed (data, network, K-means)")
    p.add_argument("--json", type=Path, default=None, help="write the results here")
    p.add_argument("--data-root", type=Path, default=Path(".cache/lpcam_synthetic"),
                   help="cache of generated datasets (one folder per parameter set)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument("--amp", action="store_true",
                   help="also score the seeds with the network under autocast (same network and bank)")
    g = p.add_argument_group("generator (lpcam_core.demo.synthetic.SyntheticConfig)")
    g.add_argument("--num-classes", type=int, default=None)
    g.add_argument("--num-images", type=int, default=None, help="train + val images (default: max(1200, 200 per class))")
    g.add_argument("--image-size", type=int, default=None)
    g.add_argument("--sharing", type=float, default=None, help="0: distinct bodies ... 1: identical bodies")
    g.add_argument("--jitter", type=float, default=None, help="per-instance variation (1: default)")
    g.add_argument("--context-correlation", type=float, default=None,
                   help="probability of the class's context background (0: no context)")
    g.add_argument("--truncation", type=float, default=None, help="probability of a head out of the frame")
    g.add_argument("--max-objects", type=int, default=None)
    g.add_argument("--max-distractors", type=int, default=None)
    m = p.add_argument_group("network and LPCAM")
    m.add_argument("--epochs", type=int, default=None, help="training epochs (default: max(12, 2 per class))")
    m.add_argument("--width", type=int, default=None, help="channels of the convolutions")
    m.add_argument("--feature-dim", type=int, default=None, help="channels of the feature layer")
    m.add_argument("--k", type=int, default=None, help="K, clusters per pool (paper: 12)")
    m.add_argument("--tau", type=float, default=None, help="CAM threshold of the class pool (paper: 0.1)")
    m.add_argument("--mu-f", type=float, default=None, help="class prototype threshold (paper: 0.9)")
    m.add_argument("--mu-b", type=float, default=None, help="context prototype upper bound (paper: 0.9)")
    m.add_argument("--context-low", type=float, default=None, help="context prototype lower bound (VOC code: 0.05)")
    m.add_argument("--scales", type=float, nargs="+", default=None, help="inference scales (paper: 1 0.5 1.5 2)")
    m.add_argument("--pool-cam-scales", type=float, nargs="+", default=None,
                   help="scales (with flips) of the baseline CAM that splits the class and context pools "
                        "(default: the inference scales, as the IRN family's make_cam)")
    return p.parse_args(argv)


_MAPPING = {
    "num_classes": "data_num_classes", "num_images": "data_num_images", "image_size": "data_image_size",
    "sharing": "data_sharing", "jitter": "data_jitter", "context_correlation": "data_context_correlation",
    "truncation": "data_truncation", "max_objects": "data_max_objects", "max_distractors": "data_max_distractors",
    "epochs": "epochs", "width": "width", "feature_dim": "feature_dim", "k": "num_clusters",
    "tau": "fg_threshold", "mu_f": "class_threshold", "mu_b": "context_high", "context_low": "context_low",
    "threads": "threads",
}


def overrides_from_args(args: argparse.Namespace) -> dict[str, Any]:
    """``demo_settings`` keyword overrides of the options that were given."""
    out = {target: getattr(args, name) for name, target in _MAPPING.items() if getattr(args, name) is not None}
    if args.scales is not None:
        out["scales"] = tuple(args.scales)
    if args.pool_cam_scales is not None:
        out["pool_cam_scales"] = tuple(args.pool_cam_scales)
    return out


def _data_dir(root: Path, data_params: dict[str, Any]) -> Path:
    digest = hashlib.sha1(json.dumps(data_params, sort_keys=True).encode()).hexdigest()[:12]
    return root / digest


def _summary(runs: list[dict[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key in METHODS:
        row: dict[str, Any] = {}
        for score in _SCORES:
            values = [r[key][score] for r in runs]
            row[score] = statistics.fmean(values)
            row[f"{score}_std"] = statistics.pstdev(values) if len(values) > 1 else 0.0
            row[f"{score}_min"], row[f"{score}_max"] = min(values), max(values)
        out[key] = row
    gains = {}
    for score in ("miou", "precision", "recall"):
        deltas = [r["lpcam"][score] - r["cam"][score] for r in runs]
        gains[score] = {"mean": statistics.fmean(deltas), "min": min(deltas), "max": max(deltas)}
    out["lpcam_minus_cam"] = gains
    return out


def markdown(runs: list[dict[str, Any]], summary: dict[str, Any]) -> str:
    """Per-seed rows and the mean (min..max) over seeds."""
    lines = ["| seed | method | mIoU | precision | recall | best thr. | mIoU @ 0.3 |", "|---|---|---|---|---|---|---|"]
    for run in runs:
        seed = run["settings"]["seed"]
        for key, label in METHODS.items():
            r = run[key]
            lines.append(f"| {seed} | {label} | {r['miou']:.1f} | {r['precision']:.1f} | {r['recall']:.1f} | "
                         f"{r['threshold']:.3g} | {r['miou_at_eval']:.1f} |")
    if len(runs) > 1:
        for key, label in METHODS.items():
            r = summary[key]
            cells = " | ".join(f"{r[s]:.1f} ± {r[s + '_std']:.1f}" for s in ("miou", "precision", "recall"))
            lines.append(f"| mean ± sd | {label} | {cells} | {r['threshold']:.3g} | "
                         f"{r['miou_at_eval']:.1f} ± {r['miou_at_eval_std']:.1f} |")
    g = summary["lpcam_minus_cam"]
    lines.append("")
    for run in runs:
        if "gain_interval" in run:
            lines.append(f"seed {run['settings']['seed']}: "
                         + format_gain(run["gain_interval"], run.get("num_val_images", 0)))
    lines.append("")
    lines.append("LPCAM - CAM over seeds (mean [min, max]): " + ", ".join(
        f"{s} {g[s]['mean']:+.1f} [{g[s]['min']:+.1f}, {g[s]['max']:+.1f}]" for s in ("miou", "precision", "recall")))
    return "\n".join(lines)


def amp_effect(result: dict[str, Any], settings: Any, progress: bool) -> dict[str, Any]:
    """The seeds of ``result``'s network and bank recomputed with the backbone under autocast: each
    method's scores and the largest absolute difference of its maps from the float32 ones."""
    import numpy as np

    from lpcam_core.demo import compute_seeds, evaluate_seeds, inference_model

    art = result["artifacts"]
    val = art["val"]
    seeds = compute_seeds(inference_model(art["model"]), art["bank"], val, settings, progress, amp=True)
    scores = evaluate_seeds(seeds, val.masks, settings.data.num_classes, settings, val.parts)
    out: dict[str, Any] = {}
    for key in METHODS:
        diff = max((float(np.abs(a["high_res"] - b["high_res"]).max()) for a, b in zip(art["seeds"][key], seeds[key])
                    if a["high_res"].size), default=0.0)
        out[key] = {**{s: scores[key][s] for s in ("miou", "precision", "recall", "threshold")}, "max_abs_diff": diff}
    return out


def amp_markdown(runs: list[dict[str, Any]]) -> str:
    """Per seed and method: mIoU float32 / with --amp, and the largest map difference."""
    lines = ["| seed | method | mIoU float32 | mIoU --amp | precision | recall | max abs diff of the maps |",
             "|---|---|---|---|---|---|---|"]
    for run in runs:
        for key, label in METHODS.items():
            a = run["amp"][key]
            lines.append(f"| {run['settings']['seed']} | {label} | {run[key]['miou']:.2f} | {a['miou']:.2f} | "
                         f"{run[key]['precision']:.1f} -> {a['precision']:.1f} | {run[key]['recall']:.1f} -> "
                         f"{a['recall']:.1f} | {a['max_abs_diff']:.2e} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    overrides = overrides_from_args(args)
    runs = []
    for seed in args.seed:
        settings = demo_settings(seed, **overrides)
        start = time.perf_counter()
        result = run_pipeline(settings, _data_dir(args.data_root, settings.data.to_dict()), progress=not args.quiet,
                              keep=args.amp)
        result["timings"]["total"] = time.perf_counter() - start
        if args.amp:
            t0 = time.perf_counter()
            result["amp"] = amp_effect(result, settings, not args.quiet)
            result["timings"]["seeds_amp"] = time.perf_counter() - t0
            result.pop("artifacts")
        runs.append(result)
        print(f"seed {seed} ({result['timings']['total']:.0f} s)\n{format_table(result)}\n", file=sys.stderr)
    summary = _summary(runs)
    print(markdown(runs, summary))
    if args.amp:
        print("\nWith --amp (backbone under autocast, maps' maths float32; same network and bank):\n")
        print(amp_markdown(runs))
    if args.json is not None:
        payload = {key: summary[key] for key in METHODS}
        payload["lpcam_minus_cam"] = summary["lpcam_minus_cam"]
        if len(runs) == 1:
            payload.update({key: runs[0][key] for key in METHODS})
        payload["settings"] = {**runs[0]["settings"], "seeds": args.seed}
        payload["runs"] = runs
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(payload, indent=1, default=_json_default))
    return 0


def _json_default(value: Any) -> Any:
    try:
        import numpy as np

        if isinstance(value, np.generic):
            return value.item()
        if isinstance(value, np.ndarray):
            return value.tolist()
    except ImportError:  # pragma: no cover
        pass
    return str(value)


if __name__ == "__main__":
    raise SystemExit(main())

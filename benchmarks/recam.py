"""ReCAM seeds (and optionally pseudo masks) with and without the LPCAM swap: the first ReCAM + LPCAM numbers.

Same protocol as ``benchmarks/irn.py`` on ReCAM's ``make_recam`` maps: ``LPCAM=0`` (ReCAM's own
maps) against LPCAM with each classifier choice scoring the prototypes (``--classifier``:
``recam`` = W_recam * W_cls, ``cls`` = W_cls; both by default, which is how the adapter's
default is chosen). ReCAM + LPCAM was never published, so the paper column stays empty.

Examples::

    python benchmarks/recam.py --host .hosts/ReCAM --voc12-root VOCdevkit/VOC2012 \\
        --weights WS/res50_cam.pth --recam-weight-dir WS/recam_weight --out bench_out/recam [--masks]
    python benchmarks/recam.py --host .hosts/ReCAM --voc12-root VOCdevkit/VOC2012 --train   # GPU
    python benchmarks/recam.py --smoke --host .hosts/ReCAM                                  # CPU, minutes
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import irn as base  # noqa: E402  (benchmarks/irn.py: the shared protocol)

RECAM = base.Bench(
    "recam", "recam", {"eval": 0.21, "conf_fg": 0.35, "conf_bg": 0.10, "sem_seg_bg": 0.28},
    ("train_cam", "train_recam", "make_cam", "make_recam", "eval_cam", "cam_to_ir_label", "train_irn",
     "make_sem_seg", "eval_sem_seg"),
    weights_name="res50_cam.pth", weights_file="ws/res50_cam.pth", extra=["--work_space", "ws"],
    make_pass="make_recam", baseline_name="ReCAM",
)

CLASSIFIERS = {"recam": "LPCAM (W_recam*W_cls)", "cls": "LPCAM (W_cls)"}


def add_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--recam-weight-dir", help="ReCAM's recam_weight dir (res50_recam_4.pth, recam_predictor_4.pth)")
    parser.add_argument("--classifier", default="recam,cls", help="comma-separated: recam, cls")


def configure(bench: base.Bench, ns: argparse.Namespace, work: Path) -> None:
    chosen = [c.strip() for c in ns.classifier.split(",") if c.strip()]
    unknown = sorted(set(chosen) - set(CLASSIFIERS))
    if unknown:
        raise SystemExit(f"--classifier: unknown {unknown}; expected {sorted(CLASSIFIERS)}")
    bench.variants = {CLASSIFIERS[c]: {"LPCAM_CLASSIFIER": c} for c in chosen}
    if ns.recam_weight_dir:
        target = work / "ws" / "recam_weight"
        target.parent.mkdir(parents=True, exist_ok=True)
        if target.is_symlink():
            target.unlink()
        target.symlink_to(Path(ns.recam_weight_dir).resolve())
    elif not (ns.smoke or ns.train):
        raise SystemExit("--recam-weight-dir is required (or --train / --smoke)")


def after_train(bench: base.Bench, work: Path, root: Path, env: dict, logfile: Path) -> None:
    base.run_host(bench, work, root, {"train_recam"}, [], {**env, "LPCAM": "0"}, logfile)


if __name__ == "__main__":
    base.main_for(RECAM, add_args=add_args, after_train=after_train, configure=configure)

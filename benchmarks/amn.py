"""AMN seeds (stage b), and optionally pseudo masks, with and without the LPCAM swap, beside the paper.

Runs AMN's own ``run_sample.py`` (a patched copy, in a work directory of symlinks: the checkout is
never modified):

1. stage (a) unless ``--ir-label-dir`` is given: IRN's make_cam and cam_to_ir_label with AMN's
   script thresholds (0.30 / 0.05), ``LPCAM=0`` (AMN's pipeline as published) or, with
   ``--lpcam-stage-a``, with LPCAM maps;
2. stage (b) seeds: ``LPCAM=0`` (AMN's own make_amn_cam on GPUs, Dropout active as AMN runs it;
   on a CPU the adapter's loop, Dropout off), ``AMN (Dropout off)`` (the adapter's deterministic
   AMN maps, on GPUs only: on a CPU it is the row above), and LPCAM with the default choices
   (``--variants all`` adds one row per alternative choice);
3. ``--masks``: amn_cam_to_ir_label, train_irn and make_sem_seg_labels (GPU) for AMN and LPCAM.

Seeds are scored on the chainer eval set with ``lpcam_core.eval.metrics`` (channel 0 dropped, a
background plane at the threshold, as eval_amn_cam does) at AMN's threshold (0.25), at LPCAM's
(0.30) and over a sweep. Writes ``results.json`` and ``table.md`` to ``--out``.

Examples::

    # trained checkpoints: AMN's sess/res50_amn.pth and the stage-(a) ir_label PNGs it was trained on
    python benchmarks/amn.py --host .hosts/AMN --voc12-root VOCdevkit/VOC2012 \\
        --amn-weights sess/res50_amn.pth --ir-label-dir result/ir_label --out bench_out/amn [--variants all] [--masks]
    # plumbing check on CPU, synthetic data, random weights (numbers meaningless), a few minutes
    python benchmarks/amn.py --smoke --host .hosts/AMN
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

PAPER = {"seed": {"AMN": 62.1, "LPCAM": 65.3}, "mask": {"AMN": 72.2, "LPCAM": 72.7}}  # PAPER.md, VOC train, mIoU %
AMN_THRESHOLDS = {"eval": 0.25, "conf_fg": 0.45, "conf_bg": 0.15, "sem_seg_bg": 0.25}
LPCAM_THRESHOLDS = {"eval": 0.30, "conf_fg": 0.45, "conf_bg": 0.25, "sem_seg_bg": 0.35}
STAGE_A_THRESHOLDS = {"conf_fg": 0.30, "conf_bg": 0.05}  # AMN's scripts/generate_pseudo_mask.sh
VARIANTS = {  # name -> LPCAM_AMN_* overrides of the defaults
    "LPCAM": {},
    "LPCAM raw features": {"LPCAM_AMN_FEATURES": "raw"},
    "LPCAM centre taps": {"LPCAM_AMN_CLASSIFIER": "centre"},
    "LPCAM 21-way": {"LPCAM_AMN_SOFTMAX": "21"},
    "LPCAM ir_label pools": {"LPCAM_AMN_SPLIT": "ir_label"},
}


def _irn_bench() -> Any:
    """benchmarks/irn.py (shared helpers: log, smoke dataset, mask scores)."""
    spec = importlib.util.spec_from_file_location("lpcam_bench_irn", Path(__file__).with_name("irn.py"))
    module = importlib.util.module_from_spec(spec)
    assert spec.loader is not None
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


IRN = _irn_bench()
log = IRN.log


def run_host(work: Path, root: Path, flags: list[str], env: dict, logfile: Path, what: str) -> str:
    """AMN's run_sample.py (every pass defaults to False there) with ``flags``."""
    return IRN.run_logged([sys.executable, "run_sample.py", "--voc12_root", str(root), *flags], work, env, logfile, what)


def prepare(ns: argparse.Namespace, out: Path) -> tuple[Path, Path, dict, list[str]]:
    """Work directory (patched copy of run_sample.py), VOC root, environment, eval ids."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from lpcam_adapters import amn, cli, irn_family

    host = Path(ns.host).resolve()
    work = out / "work"
    if ns.smoke:
        root, cls_labels, lists = IRN.smoke_dataset(out / "voc", ns.smoke_images)
    else:
        root, cls_labels, lists = Path(ns.voc12_root).resolve(), None, {}
    irn_family.prepare_workdir(host, work, cls_labels=cls_labels, lists=lists)
    script = work / "run_sample.py"
    if script.is_symlink():
        script.unlink()
        shutil.copyfile(host / "run_sample.py", script)
    cli.patch_entry_script(work, amn.INFO)
    env = {k: v for k, v in os.environ.items() if not k.startswith("LPCAM")}
    env.update(PYTHONPYCACHEPREFIX=str(out / "pycache"), PYTHONUNBUFFERED="1")
    if ns.smoke:
        env["LPCAM_NO_PRETRAINED"] = "1"
    ids = (root / "ImageSets" / "Segmentation" / f"{ns.eval_set}.txt").read_text().split()
    return work, root, env, ids


def random_weights(work: Path, env: dict) -> None:
    code = """
import os, torch
import lpcam_adapters.amn
from lpcam_adapters import compat
import net.resnet50_cam, net.resnet50_amn
with compat.checkpoint_follows():
    torch.manual_seed(0); cam = net.resnet50_cam.CAM()
    torch.manual_seed(1); amn = net.resnet50_amn.CAM()
os.makedirs("sess", exist_ok=True)
torch.save(cam.state_dict(), "sess/res50_cam.pth")
torch.save(amn.state_dict(), "sess/res50_amn.pth")
"""
    subprocess.run([sys.executable, "-c", code], cwd=work, env=env, check=True)


def _link(target: Path, source: str) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    if target.exists() or target.is_symlink():
        target.unlink()
    target.symlink_to(Path(source).resolve())


def score(cam_dir: Path, gt_dir: Path, ids: list[str], thresholds: dict[str, float]) -> dict[str, Any]:
    """mIoU (%), precision and recall at each named threshold, and the sweep's best (channel 0 dropped)."""
    from lpcam_core.eval.metrics import evaluate_seeds, sweep_thresholds

    out: dict[str, Any] = {}
    for label, thr in thresholds.items():
        r = evaluate_seeds(cam_dir, gt_dir, ids, thr, background="drop_channel0", progress=False)
        out[label] = {"threshold": thr, "miou": 100 * r["miou"], "precision": 100 * r["mean_precision"],
                      "recall": 100 * r["mean_recall"]}
    grid = [round(t, 2) for t in np.arange(0.05, 0.61, 0.05)]
    best, curve = sweep_thresholds(cam_dir, gt_dir, ids, grid, background="drop_channel0", progress=False)
    out["sweep"] = {"threshold": best, "miou": 100 * dict(curve)[best], "curve": [[t, 100 * m] for t, m in curve]}
    return out


def masks(work: Path, root: Path, cam_dir: Path, out: Path, env: dict, logfile: Path, ids: list[str],
          thr: dict[str, float], num_workers: int) -> float:
    """amn_cam_to_ir_label -> train_irn -> make_sem_seg_labels on ``cam_dir`` (GPU); mask mIoU %."""
    tag = cam_dir.name
    ir_dir, sem_dir = out / f"{tag}_amn_ir_label", out / f"{tag}_sem_seg"
    for d in (ir_dir, sem_dir):
        d.mkdir(exist_ok=True)
    flags = ["--num_workers", str(num_workers), "--amn_cam_out_dir", str(cam_dir), "--amn_ir_label_out_dir", str(ir_dir),
             "--sem_seg_out_dir", str(sem_dir), "--irn_weights_name", str(out / f"{tag}_irn.pth"),
             "--conf_fg_thres", str(thr["conf_fg"]), "--conf_bg_thres", str(thr["conf_bg"]),
             "--sem_seg_bg_thres", str(thr["sem_seg_bg"]),
             "--amn_cam_to_ir_label_pass", "True", "--train_irn_pass", "True", "--make_sem_seg_pass", "True"]
    run_host(work, root, flags, {**env, "LPCAM": "0"}, logfile, f"masks of {tag}")
    return IRN.mask_score(sem_dir, root / "SegmentationClass", ids)


def table(results: dict[str, Any]) -> str:
    lines = [f"### AMN stage (b): seeds ({results['eval_images']} images, {results['eval_set']} set)", "",
             "| maps | threshold | mIoU | precision | recall | paper mIoU |", "|---|---|---|---|---|---|"]
    for method, rows in results["seeds"].items():
        kind = "AMN" if method.startswith("AMN") else "LPCAM"
        for label, r in rows.items():
            prec = f"{r['precision']:.1f}" if "precision" in r else ""
            rec = f"{r['recall']:.1f}" if "recall" in r else ""
            ref = ""
            if method in ("AMN", "LPCAM") and label == ("amn" if kind == "AMN" else "sweep"):
                ref = f"{PAPER['seed'][kind]}"
            lines.append(f"| {method} | {label} {r['threshold']:.2f} | {r['miou']:.1f} | {prec} | {rec} | {ref} |")
    if results.get("masks"):
        lines += ["", "| pseudo masks | mIoU | paper |", "|---|---|---|"]
        for method, value in results["masks"].items():
            kind = "AMN" if method.startswith("AMN") else "LPCAM"
            lines.append(f"| {method} | {value:.1f} | {PAPER['mask'][kind]} |")
    lines += ["", "The paper's LPCAM thresholds for AMN are not published: its LPCAM seed is compared at the sweep's best."]
    if results.get("dropout_note"):
        lines += [results["dropout_note"]]
    if results.get("smoke"):
        lines += ["", "Smoke run: synthetic data and random weights; the numbers only show that the pipeline runs."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--host", default=".hosts/AMN", help="AMN checkout (branch voc12)")
    parser.add_argument("--voc12-root", help="VOC2012 root (JPEGImages, SegmentationClass, ImageSets)")
    parser.add_argument("--amn-weights", help="trained AMN checkpoint (train_amn's sess/res50_amn.pth)")
    parser.add_argument("--cam-weights", help="trained stage-(a) CAM checkpoint (to run stage (a) here)")
    parser.add_argument("--ir-label-dir", help="stage-(a) ir_label PNGs the AMN checkpoint was trained on")
    parser.add_argument("--lpcam-stage-a", action="store_true", help="stage (a) here with LPCAM maps (default CAM)")
    parser.add_argument("--infer-list", default="voc12/train.txt", help="list whose stage-(b) maps are made")
    parser.add_argument("--variants", choices=("default", "all"), default="default",
                        help="LPCAM rows: the default choices, or one row per alternative choice as well")
    parser.add_argument("--masks", action="store_true", help="also the pseudo-mask stage (train_irn: GPU)")
    parser.add_argument("--smoke", action="store_true", help="synthetic data, random weights, CPU, a few minutes")
    parser.add_argument("--smoke-images", type=int, default=20, help="train images of the smoke dataset (>= 20)")
    parser.add_argument("--eval-set", default="train", help="ImageSets/Segmentation list scored (the paper: train)")
    parser.add_argument("--num-workers", type=int, help="host --num_workers (smoke default 1: the host needs "
                        ">= 20 images per worker in cam_to_ir_label)")
    parser.add_argument("--out", help="output directory (default bench_out/amn[_smoke])")
    ns = parser.parse_args(argv)
    if not ns.smoke:
        if not ns.voc12_root or not ns.amn_weights:
            parser.error("--voc12-root and --amn-weights are required (or --smoke)")
        if not ns.ir_label_dir and not ns.cam_weights:
            parser.error("give --ir-label-dir (stage-(a) PNGs) or --cam-weights (stage (a) is run here)")
    num_workers = ns.num_workers or (1 if ns.smoke else max(1, (os.cpu_count() or 2) // 2))
    out = Path(ns.out or f"bench_out/amn{'_smoke' if ns.smoke else ''}").resolve()
    out.mkdir(parents=True, exist_ok=True)
    logfile = out / "host.log"
    work, root, env, ids = prepare(ns, out)
    t_start = time.perf_counter()
    if ns.smoke:
        random_weights(work, env)
    else:
        _link(work / "sess" / "res50_amn.pth", ns.amn_weights)
        if ns.cam_weights:
            _link(work / "sess" / "res50_cam.pth", ns.cam_weights)
    common = ["--num_workers", str(num_workers), "--cam_weights_name", "sess/res50_cam",
              "--amn_weights_name", "sess/res50_amn", "--train_list", ns.infer_list]

    ir_label = Path(ns.ir_label_dir).resolve() if ns.ir_label_dir else out / "ir_label"
    if not ns.ir_label_dir:
        ir_label.mkdir(exist_ok=True)
        stage_a_env = {**env, "LPCAM": "1" if ns.lpcam_stage_a else "0", "LPCAM_AMN_STAGES": "a"}
        run_host(work, root, [*common, "--make_cam_pass", "True", "--cam_to_ir_label_pass", "True",
                              "--cam_out_dir", str(out / "cam_stage_a"), "--ir_label_out_dir", str(ir_label),
                              "--conf_fg_thres", str(STAGE_A_THRESHOLDS["conf_fg"]),
                              "--conf_bg_thres", str(STAGE_A_THRESHOLDS["conf_bg"])],
                 stage_a_env, logfile, "stage (a)")
    common += ["--ir_label_out_dir", str(ir_label)]

    gt = root / "SegmentationClass"
    thr = {"amn": AMN_THRESHOLDS["eval"], "lpcam": LPCAM_THRESHOLDS["eval"]}
    results: dict[str, Any] = {"host": "amn", "eval_set": ns.eval_set, "eval_images": len(ids), "smoke": ns.smoke,
                               "seeds": {}, "masks": {}, "seconds_per_run": {}}
    import torch

    gpus = torch.cuda.device_count()
    amn_dir = out / "amn"
    t0 = time.perf_counter()
    run_host(work, root, [*common, "--make_amn_cam_pass", "True", "--amn_cam_out_dir", str(amn_dir)],
             {**env, "LPCAM": "0"}, logfile, "AMN stage (b), LPCAM=0")
    results["seconds_per_run"]["AMN"] = time.perf_counter() - t0
    results["seeds"]["AMN"] = score(amn_dir, gt, ids, thr)
    off_dir = amn_dir
    if gpus:
        off_dir = out / "amn_dropout_off"
        run_host(work, root, [*common, "--make_amn_cam_pass", "True", "--amn_cam_out_dir", str(off_dir)],
                 {**env, "LPCAM": "0", "LPCAM_WORKERS": str(gpus)}, logfile, "AMN stage (b), Dropout off")
        results["seeds"]["AMN (Dropout off)"] = score(off_dir, gt, ids, thr)
        results["dropout_note"] = "AMN = AMN's own make_amn_cam (Dropout active, as published); AMN (Dropout off) = the adapter's."
    else:
        results["dropout_note"] = "No GPU: the AMN row is AMN's maths with Dropout off (AMN's own pass needs a GPU)."
    variants = VARIANTS if ns.variants == "all" else {"LPCAM": {}}
    for name, extra in variants.items():
        tag = re.sub(r"[^a-z0-9]+", "_", name.lower()).strip("_")
        lp_dir = out / tag
        t0 = time.perf_counter()
        run_host(work, root, [*common, "--make_amn_cam_pass", "True", "--amn_cam_out_dir", str(lp_dir)],
                 {**env, "LPCAM": "1", "LPCAM_AMN_STAGES": "b", "LPCAM_AMN_BANK": str(lp_dir) + "_bank.pt",
                  # the Dropout-off AMN maps of the list split the pools (the prototype list must be in it)
                  "LPCAM_AMN_BASELINE_DIR": str(out / "amn_baseline_for_pools"), **extra},
                 logfile, f"{name} stage (b)")
        results["seconds_per_run"][name] = time.perf_counter() - t0
        results["seeds"][name] = score(lp_dir, gt, ids, thr)
        if ns.masks:
            results["masks"][name] = masks(work, root, lp_dir, out, env, logfile, ids, LPCAM_THRESHOLDS, num_workers)
    if ns.masks:
        results["masks"]["AMN"] = masks(work, root, amn_dir, out, env, logfile, ids, AMN_THRESHOLDS, num_workers)
    results["seconds"] = time.perf_counter() - t_start
    text = table(results)
    (out / "results.json").write_text(json.dumps(results, indent=2))
    (out / "table.md").write_text(text + "\n")
    print(text)
    log(f"results in {out} ({results['seconds']:.0f}s)")
    return results


if __name__ == "__main__":
    main()

"""IRN seeds (and optionally pseudo masks) with and without the LPCAM swap, beside the paper.

Runs the host's own ``run_sample.py`` (a patched copy, in a work directory of symlinks: the
checkout is never modified) twice: ``LPCAM=0`` (IRN's CAM) and ``LPCAM=1`` (LPCAM, the bank
built from ``voc12/train.txt``). Seeds are scored on the chainer eval set with
``lpcam_core.eval.metrics`` (chainercv's confusion matrix) at IRN's own threshold, at LPCAM's and
over a sweep. ``--masks`` adds IRN's pseudo-mask stage for both (cam_to_ir_label, train_irn,
make_sem_seg_labels: GPU). Writes ``results.json`` and ``table.md`` to ``--out``.

Examples::

    # a trained IRN checkpoint (IRN's train_cam writes sess/res50_cam.pth.pth), one GPU or more
    python benchmarks/irn.py --host .hosts/irn --voc12-root VOCdevkit/VOC2012 \\
        --weights sess/res50_cam.pth.pth --out bench_out/irn [--masks]
    # train IRN's classifier first (GPU)
    python benchmarks/irn.py --host .hosts/irn --voc12-root VOCdevkit/VOC2012 --train --out bench_out/irn
    # plumbing check on CPU, synthetic data, random weights (numbers meaningless), a few minutes
    python benchmarks/irn.py --smoke --host .hosts/irn
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

PAPER = {  # PAPER.md, VOC train set, mIoU %
    "irn": {"seed": {"CAM": 48.8, "LPCAM": 54.9}, "mask": {"CAM": 66.5, "LPCAM": 71.2}},
    "recam": {"seed": {}, "mask": {}},  # ReCAM + LPCAM was never published
}
LPCAM_THRESHOLDS = {"eval": 0.30, "conf_fg": 0.45, "conf_bg": 0.25, "sem_seg_bg": 0.35}


@dataclass
class Bench:
    """One host's way of running its run_sample.py."""

    name: str
    adapter: str
    thresholds: dict[str, float]
    passes: tuple[str, ...]
    weights_name: str  # value of --cam_weights_name, relative to the work directory
    weights_file: str  # the file the host loads
    extra: list[str] = field(default_factory=list)
    make_pass: str = "make_cam"  # the pass whose maps are compared
    baseline_name: str = "CAM"
    variants: dict[str, dict[str, str]] = field(default_factory=lambda: {"LPCAM": {}})  # name -> extra env

    def command(self, root: Path, enabled: set[str], flags: list[str]) -> list[str]:
        cmd = [sys.executable, "run_sample.py", "--voc12_root", str(root), "--cam_weights_name", self.weights_name]
        if self.name == "irn":  # IRN tests its flags with `is True`: any value given turns a pass off
            cmd += [x for p in self.passes if p not in enabled for x in (f"--{p}_pass", "0")]
        else:  # ReCAM parses booleans and defaults every pass to False
            cmd += [x for p in self.passes if p in enabled for x in (f"--{p}_pass", "True")]
        return cmd + self.extra + flags


IRN = Bench(
    "irn", "irn", {"eval": 0.15, "conf_fg": 0.30, "conf_bg": 0.05, "sem_seg_bg": 0.25},
    ("train_cam", "make_cam", "eval_cam", "cam_to_ir_label", "train_irn", "make_ins_seg", "eval_ins_seg",
     "make_sem_seg", "eval_sem_seg"),
    "sess/res50_cam", "sess/res50_cam.pth",
)


def log(msg: str) -> None:
    print(f"[bench] {msg}", flush=True)


def run_logged(cmd: list[str], work: Path, env: dict, logfile: Path, what: str) -> str:
    """Run a host command in ``work``, append its output to ``logfile``; on failure print its tail and exit."""
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=work, env=env, capture_output=True, text=True)
    logfile.parent.mkdir(parents=True, exist_ok=True)
    with open(logfile, "a") as handle:
        handle.write(f"$ {' '.join(cmd)}\n{proc.stdout}\n{proc.stderr}\n")
    if proc.returncode != 0:
        sys.stderr.write(proc.stdout[-3000:] + proc.stderr[-5000:])
        raise SystemExit(f"host run failed ({what}); full log: {logfile}")
    log(f"{what}: {time.perf_counter() - t0:.0f}s")
    return proc.stdout


def run_host(bench: Bench, work: Path, root: Path, enabled: set[str], flags: list[str], env: dict, logfile: Path) -> str:
    maps = "LPCAM" if env.get("LPCAM", "1") != "0" else "CAM"
    return run_logged(bench.command(root, enabled, flags), work, env, logfile, f"{'+'.join(sorted(enabled))} ({maps})")


def prepare(bench: Bench, ns: argparse.Namespace, out: Path) -> tuple[Path, Path, dict, list[str]]:
    """Work directory, VOC root, environment and the eval ids."""
    import importlib

    from lpcam_adapters import cli, irn_family

    host = Path(ns.host).resolve()
    work = out / "work"
    if ns.smoke:
        root, cls_labels, lists = smoke_dataset(out / "voc", ns.smoke_images)
    else:
        root, cls_labels, lists = Path(ns.voc12_root).resolve(), None, {}
    irn_family.prepare_workdir(host, work, cls_labels=cls_labels, lists=lists)
    script = work / "run_sample.py"
    if script.is_symlink():
        script.unlink()
        shutil.copyfile(host / "run_sample.py", script)
    cli.patch_entry_script(work, importlib.import_module(f"lpcam_adapters.{bench.adapter}").INFO)
    env = {k: v for k, v in os.environ.items() if not k.startswith("LPCAM")}
    env.update(PYTHONPYCACHEPREFIX=str(out / "pycache"), PYTHONUNBUFFERED="1")
    if ns.smoke:
        env["LPCAM_NO_PRETRAINED"] = "1"
    ids_file = root / "ImageSets" / "Segmentation" / f"{ns.eval_set}.txt"
    ids = ids_file.read_text().split()
    return work, root, env, ids


def smoke_dataset(base: Path, num_images: int) -> tuple[Path, Path, dict]:
    """Synthetic VOC root (32x32), IRN labels padded to 20 classes, train = train_aug."""
    from lpcam_core.demo.synthetic import SyntheticConfig, write_voc

    num_train = max(20, num_images)
    cfg = SyntheticConfig(num_classes=4, image_size=32, num_images=num_train + 5, val_fraction=5 / (num_train + 5), seed=0)
    root = write_voc(cfg, base / "VOC2012", progress=False)
    labels = np.load(root / "cls_labels.npy", allow_pickle=True).item()
    np.save(base / "cls_labels20.npy", {k: np.pad(v, (0, 20 - len(v))).astype(np.float32) for k, v in labels.items()})
    train = (root / "ImageSets" / "Segmentation" / "train.txt").read_text().split()
    return root, base / "cls_labels20.npy", {"train.txt": train, "train_aug.txt": train}


def random_weights(bench: Bench, work: Path, env: dict) -> None:
    code = f"""
import os, torch
import lpcam_adapters.{bench.adapter}
from lpcam_adapters import compat
import net.resnet50_cam as net
with compat.checkpoint_follows():
    torch.manual_seed(0); cam = net.CAM()
    torch.manual_seed(1); recam = net.CAM()
torch.manual_seed(2)
os.makedirs(os.path.dirname({bench.weights_file!r}) or ".", exist_ok=True)
torch.save(cam.state_dict(), {bench.weights_file!r})
if {bench.name!r} == "recam":
    os.makedirs("ws/recam_weight", exist_ok=True)
    torch.save(recam.state_dict(), "ws/recam_weight/res50_recam_4.pth")
    torch.save(net.Class_Predictor(20, 2048).state_dict(), "ws/recam_weight/recam_predictor_4.pth")
"""
    subprocess.run([sys.executable, "-c", code], cwd=work, env=env, check=True)


def score(cam_dir: Path, gt_dir: Path, ids: list[str], thresholds: dict[str, float]) -> dict[str, Any]:
    """mIoU (%), precision and recall at each named threshold, and the sweep's best."""
    from lpcam_core.eval.metrics import evaluate_seeds, sweep_thresholds

    out: dict[str, Any] = {}
    for label, thr in thresholds.items():
        r = evaluate_seeds(cam_dir, gt_dir, ids, thr, progress=False)
        out[label] = {"threshold": thr, "miou": 100 * r["miou"], "precision": 100 * r["mean_precision"],
                      "recall": 100 * r["mean_recall"]}
    grid = [round(t, 2) for t in np.arange(0.05, 0.61, 0.05)]
    best, curve = sweep_thresholds(cam_dir, gt_dir, ids, grid, progress=False)
    out["sweep"] = {"threshold": best, "miou": 100 * dict(curve)[best], "curve": [[t, 100 * m] for t, m in curve]}
    return out


def mask_score(sem_dir: Path, gt_dir: Path, ids: list[str]) -> float:
    """IRN's eval_sem_seg: 255 in the prediction counts as background; mIoU % over 21 classes."""
    from lpcam_core.eval.metrics import confusion_matrix, scores_from_confusion
    from lpcam_core.io import load_label_png

    preds, gts = [], []
    for i in ids:
        pred = load_label_png(sem_dir / f"{i}.png").astype(np.int64)
        pred[pred == 255] = 0
        preds.append(pred)
        gts.append(load_label_png(gt_dir / f"{i}.png").astype(np.int64))
    return 100 * scores_from_confusion(confusion_matrix(preds, gts, num_classes=21))["miou"]


def peak_rss(stdout: str) -> str | None:
    match = re.search(r"process peak RSS (\S+) MiB \((\d+) images\)", stdout)
    return f"{match.group(1)} MiB over {match.group(2)} prototype images" if match else None


def table(bench: Bench, results: dict[str, Any]) -> str:
    paper = PAPER[bench.name]
    lines = [f"### {bench.name}: seeds ({results['eval_images']} images, {results['eval_set']} set)", "",
             "| maps | threshold | mIoU | precision | recall | paper mIoU |", "|---|---|---|---|---|---|"]
    for method, rows in results["seeds"].items():
        kind = "CAM" if method == bench.baseline_name else "LPCAM"
        for label, r in rows.items():
            prec = f"{r['precision']:.1f}" if "precision" in r else ""
            rec = f"{r['recall']:.1f}" if "recall" in r else ""
            ref = paper["seed"].get(kind, "—") if label == ("host" if kind == "CAM" else "lpcam") else ""
            lines.append(f"| {method} | {label} {r['threshold']:.2f} | {r['miou']:.1f} | {prec} | {rec} | {ref} |")
    if results.get("masks"):
        lines += ["", "| pseudo masks | mIoU | paper |", "|---|---|---|"]
        for method, value in results["masks"].items():
            kind = "CAM" if method == bench.baseline_name else "LPCAM"
            lines.append(f"| {method} | {value:.1f} | {paper['mask'].get(kind, '—')} |")
    if results.get("peak_rss"):
        lines += ["", f"Prototype building peak RSS: {results['peak_rss']}."]
    if results.get("smoke"):
        lines += ["", "Smoke run: synthetic data and random weights; the numbers only show that the pipeline runs."]
    return "\n".join(lines)


def main_for(bench: Bench, argv: list[str] | None = None, add_args=None, after_train=None, configure=None) -> dict[str, Any]:
    """Parse the command line and run the benchmark of ``bench`` (``configure(bench, ns, work)`` adapts it)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--host", default=f".hosts/{'irn' if bench.name == 'irn' else 'ReCAM'}", help="host checkout")
    parser.add_argument("--voc12-root", help="VOC2012 root (JPEGImages, SegmentationClass, ImageSets)")
    parser.add_argument("--weights", help=f"trained CAM checkpoint file, any name (IRN's train_cam writes "
                        f"sess/res50_cam.pth.pth; the benchmark links it in as {bench.weights_file})")
    parser.add_argument("--train", action="store_true", help="run the host's own classifier training first (GPU)")
    parser.add_argument("--masks", action="store_true", help="also the pseudo-mask stage (IRN's train_irn: GPU)")
    parser.add_argument("--smoke", action="store_true", help="synthetic data, random weights, CPU, a few minutes")
    parser.add_argument("--smoke-images", type=int, default=20, help="train images of the smoke dataset (>= 20)")
    parser.add_argument("--eval-set", default="train", help="ImageSets/Segmentation list scored (the paper: train)")
    parser.add_argument("--num-workers", type=int, default=max(1, (os.cpu_count() or 2) // 2), help="host --num_workers")
    parser.add_argument("--out", help="output directory (default bench_out/<host>[_smoke])")
    if add_args is not None:
        add_args(parser)
    ns = parser.parse_args(argv)
    if not ns.smoke and not ns.voc12_root:
        parser.error("--voc12-root is required (or --smoke)")
    if not (ns.smoke or ns.train or ns.weights):
        parser.error("give --weights (a trained checkpoint), --train, or --smoke")
    out = Path(ns.out or f"bench_out/{bench.name}{'_smoke' if ns.smoke else ''}").resolve()
    out.mkdir(parents=True, exist_ok=True)
    logfile = out / "host.log"
    bench.extra = [*bench.extra, "--num_workers", str(ns.num_workers)]
    work, root, env, ids = prepare(bench, ns, out)
    if configure is not None:
        configure(bench, ns, work)
    t_start = time.perf_counter()

    if ns.smoke:
        random_weights(bench, work, env)
    elif ns.weights:
        target = work / bench.weights_file
        target.parent.mkdir(parents=True, exist_ok=True)
        if target.exists() or target.is_symlink():
            target.unlink()
        target.symlink_to(Path(ns.weights).resolve())
    if ns.train:
        run_host(bench, work, root, {"train_cam"}, [], {**env, "LPCAM": "0"}, logfile)
        if after_train is not None:
            after_train(bench, work, root, env, logfile)

    gt = root / "SegmentationClass"
    cam_dir, results = out / "cam", {"host": bench.name, "eval_set": ns.eval_set, "eval_images": len(ids),
                                     "smoke": ns.smoke, "seeds": {}, "masks": {}}
    make = bench.make_pass
    run_host(bench, work, root, {make}, ["--cam_out_dir", str(cam_dir)], {**env, "LPCAM": "0"}, logfile)
    thr = {"host": bench.thresholds["eval"], "lpcam": LPCAM_THRESHOLDS["eval"]}
    results["seeds"][bench.baseline_name] = score(cam_dir, gt, ids, thr)
    for name, extra_env in bench.variants.items():
        lp_dir = out / re.sub(r"[^a-z0-9]+", "_", name.lower()).strip("_")
        stdout = run_host(bench, work, root, {make}, ["--cam_out_dir", str(lp_dir)],
                          {**env, "LPCAM": "1", "LPCAM_BASELINE_DIR": str(cam_dir),
                           "LPCAM_BANK": str(lp_dir) + "_bank.pt", **extra_env}, logfile)
        results["peak_rss"] = results.get("peak_rss") or peak_rss(stdout)
        results["seeds"][name] = score(lp_dir, gt, ids, thr)
        if ns.masks:
            results["masks"][name] = masks(bench, work, root, lp_dir, out, env, logfile, ids, LPCAM_THRESHOLDS)
    if ns.masks:
        results["masks"][bench.baseline_name] = masks(bench, work, root, cam_dir, out, env, logfile, ids, bench.thresholds)
    results["seconds"] = time.perf_counter() - t_start
    text = table(bench, results)
    (out / "results.json").write_text(json.dumps(results, indent=2))
    (out / "table.md").write_text(text + "\n")
    print(text)
    log(f"results in {out} ({results['seconds']:.0f}s)")
    return results


def masks(bench: Bench, work: Path, root: Path, cam_dir: Path, out: Path, env: dict, logfile: Path, ids: list[str],
          thr: dict[str, float]) -> float:
    """cam_to_ir_label -> train_irn -> make_sem_seg_labels on ``cam_dir``; mIoU % of the masks."""
    tag = cam_dir.name
    flags = ["--cam_out_dir", str(cam_dir), "--ir_label_out_dir", str(out / f"{tag}_ir_label"),
             "--sem_seg_out_dir", str(out / f"{tag}_sem_seg"), "--irn_weights_name", str(out / f"{tag}_irn.pth"),
             "--conf_fg_thres", str(thr["conf_fg"]), "--conf_bg_thres", str(thr["conf_bg"]),
             "--sem_seg_bg_thres", str(thr["sem_seg_bg"])]
    for d in ("ir_label", "sem_seg"):
        (out / f"{tag}_{d}").mkdir(exist_ok=True)
    run_host(bench, work, root, {"cam_to_ir_label", "train_irn", "make_sem_seg"}, flags, {**env, "LPCAM": "0"}, logfile)
    return mask_score(out / f"{tag}_sem_seg", root / "SegmentationClass", ids)


if __name__ == "__main__":
    main_for(IRN)

"""MCTformer with and without LPCAM: the host's own generation and evaluation, beside the paper's row.

Two modes:

``--smoke`` (CPU, minutes): a synthetic VOC-layout dataset (:mod:`lpcam_core.demo.synthetic`, 20 classes),
a tiny DeiT built from the host's own classes (random init, or ``--train-epochs`` of multi-label
training), MCTformer's unmodified ``main.py`` generating PatchCAM-fused maps (``LPCAM=0``) and LPCAM-fused
maps; both evaluated by MCTformer's ``evaluation.py --curve`` and by ``lpcam_core.eval.metrics`` on the
same files (they must agree); ``--taus`` sweeps LPCAM's tau on the same baseline maps::

    python benchmarks/mctformer.py --smoke --hosts .hosts
    python benchmarks/mctformer.py --smoke --hosts .hosts --refs v2 --images 200 --train-epochs 30 \\
        --taus 0.05 0.1 0.2 0.3 0.4

Real mode (a GPU, VOC 2012 and a trained checkpoint): the paper's MCTformer row (seed mIoU on the
1,464 train images, best background threshold of MCTformer's curve)::

    python benchmarks/mctformer.py --host .hosts/MCTformer-v2 --voc VOCdevkit/VOC2012 \\
        --gt VOCdevkit/VOC2012/SegmentationClassAug --img-list voc12 --resume MCTformer_v2.pth \\
        --model deit_small_MCTformerV2_patch16_224 --out bench_mct

(run it from the host root: MCTformer reads ``voc12/cls_labels.npy`` from the working directory;
the train_aug list must be ``<img-list>/train_aug_id.txt``; generation runs over that list.)
The smoke numbers measure plumbing and cost, not quality: a tiny model on synthetic images says
nothing about VOC.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
LAUNCH = REPO / "tests" / "hosts" / "mct_launch.py"
PAPER = {"seed CAM": 61.7, "seed LPCAM": 63.5, "mask CAM": 69.1, "mask LPCAM": 70.8}


def _env(extra: dict[str, str]) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("LPCAM")}
    env.update(PYTHONDONTWRITEBYTECODE="1", **extra)  # nothing written into the host checkout
    return env


def _host_seconds_per_image(log: str) -> float:
    """The host's own timer: the last ``Total time: ... (X s / it)`` of its generation loop."""
    hits = re.findall(r"Total time: \S+ \(([0-9.]+) s / it\)", log)
    return float(hits[-1]) if hits else float("nan")


def _run(cmd: list[str], cwd: Path, env: dict[str, str]) -> tuple[str, float]:
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=cwd, env=_env(env), capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        sys.stderr.write(proc.stdout[-3000:] + proc.stderr[-5000:])
        raise SystemExit(f"failed: {' '.join(cmd)}")
    return proc.stdout + proc.stderr, seconds


# --------------------------------------------------------------------------- evaluation


def host_curve(host: Path, folder: Path, gt: Path, id_list: Path, work: Path) -> tuple[float, float]:
    """MCTformer's ``evaluation.py --curve``: (best threshold, best mIoU %)."""
    out, _ = _run([sys.executable, str(host / "evaluation.py"), "--list", str(id_list), "--gt_dir", str(gt),
                   "--logfile", str(folder) + "_evallog.txt", "--type", "npy", "--curve", "True",
                   "--predict_dir", str(folder), "--comment", folder.name], work, {})
    line = [x for x in out.splitlines() if x.startswith("Best background score")][-1]
    thr = float(line.split("score:")[1].split()[0])
    miou = float(line.split("mIoU:")[1].strip().rstrip("%"))
    return thr, miou


def our_curve(folder: Path, gt: Path, ids: list[str]) -> dict[float, tuple[float, float]]:
    """lpcam_core.eval.metrics on the same files: {threshold: (mIoU over 21 classes as the host, nanmean)}."""
    from lpcam_core.eval.metrics import accumulate_confusions
    from lpcam_core.formats import load_mctformer_cam
    from lpcam_core.io import load_label_png

    samples = []
    for i in ids:
        maps = load_mctformer_cam(folder / f"{i}.npy")
        keys = sorted(maps)
        samples.append((np.array(keys), np.stack([maps[k] for k in keys]), load_label_png(gt / f"{i}.png")))
    thresholds = [t / 100 for t in range(0, 60)]
    mats, _ = accumulate_confusions(samples, thresholds, num_classes=21, background="plane")
    out = {}
    for t, m in zip(thresholds, mats):
        iou = m.scores()["iou"]
        out[t] = (100 * float(np.nan_to_num(iou).mean()), 100 * float(np.nanmean(iou)))
    return out


def host_greedy(curve: dict[float, tuple[float, float]]) -> tuple[float, float]:
    """The host's curve rule on our numbers: walk up from 0 while mIoU increases."""
    best_t, best = 0.0, 0.0
    for t in sorted(curve):
        if curve[t][0] > best:
            best_t, best = t, curve[t][0]
        else:
            break
    return best_t, best


# --------------------------------------------------------------------------- smoke


def make_data(root: Path, images: int) -> dict:
    from PIL import Image

    from lpcam_core.demo.synthetic import SyntheticConfig, write_voc

    cfg = SyntheticConfig(num_classes=20, image_size=96, num_images=images, val_fraction=0.2, seed=0)
    data = write_voc(cfg, root / "VOC2012", progress=False)
    train = (data / "ImageSets/Segmentation/train.txt").read_text().split()
    val = (data / "ImageSets/Segmentation/val.txt").read_text().split()
    work = root / "work"
    (work / "voc12").mkdir(parents=True, exist_ok=True)
    labels = {}
    for i in train + val:
        mask = np.array(Image.open(data / "SegmentationClass" / f"{i}.png"))
        vec = np.zeros(20, np.float32)
        vec[[c - 1 for c in np.unique(mask) if 0 < c < 255]] = 1
        labels[i] = vec
    np.save(work / "voc12" / "cls_labels.npy", labels, allow_pickle=True)
    lists = root / "lists"
    lists.mkdir(exist_ok=True)
    (lists / "train_aug_id.txt").write_text("".join(f"{i}\n" for i in train))
    (lists / "train_id.txt").write_text("".join(f"{i}\n" for i in train))
    (lists / "val_id.txt").write_text("".join(f"{i}\n" for i in val))
    return dict(data=data, work=work, lists=lists, train=train)


def gen_args(ref: str, d: dict, ckpt: Path, out: Path, scales: list[str], input_size: int) -> list[str]:
    args = ["--model", "lpcam_tiny_MCTformerV2", "--data-set", "VOC12MS", "--img-list", str(d["lists"]),
            "--data-path", str(d["data"]), "--resume", str(ckpt), "--gen_attention_maps", "--attention-type", "fused",
            "--layer-index", "2", "--scales", *scales, "--cam-npy-dir", str(out), "--device", "cpu", "--num_workers", "0"]
    if ref == "v2":
        args += ["--visualize-cls-attn", "--patch-attn-refine"]
    else:
        args += ["--input-size", str(input_size), "--attention-dir", str(out) + "_png"]
    return args


def smoke(opts: argparse.Namespace) -> list[dict]:
    out = Path(opts.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    d = make_data(out / "data", opts.images)
    gt = d["data"] / "SegmentationClass"
    rows = []
    for ref in opts.refs:
        host = Path(opts.hosts) / ("MCTformer-v2" if ref == "v2" else "MCTformer")
        if not (host / "main.py").is_file():
            print(f"skip {ref}: no checkout at {host}", file=sys.stderr)
            continue
        base = out / ref
        base.mkdir(exist_ok=True)
        ckpt = base / "tiny.pth"
        size = 128 if ref == "plus" else 224
        cmd = [sys.executable, str(LAUNCH), str(host), "--make-checkpoint", str(ckpt), "--input-size", str(size)]
        if opts.train_epochs:
            cmd += ["--train-epochs", str(opts.train_epochs), "--data-path", str(d["data"]),
                    "--train-list", str(d["lists"] / "train_id.txt")]
        _, t_train = _run(cmd, d["work"], {})
        launch = [sys.executable, str(LAUNCH), str(host), "--input-size", str(size), "--"]
        n = len(d["train"])
        runs, logs = {}, {}
        logs["off"], runs["off"] = _run(launch + gen_args(ref, d, ckpt, base / "off", opts.scales, size), d["work"],
                                        {"LPCAM": "0"})
        logs["build"], runs["build"] = _run(launch + gen_args(ref, d, ckpt, base / "lpcam", opts.scales, size), d["work"],
                                            {"LPCAM_TAU": str(opts.tau)})
        logs["lpcam"], runs["lpcam"] = _run(launch + gen_args(ref, d, ckpt, base / "lpcam_again", opts.scales, size),
                                            d["work"], {"LPCAM_TAU": str(opts.tau), "LPCAM_BUILD": "never"})
        pairs = (("PatchCAM (LPCAM=0)", base / "off", None), (f"LPCAM tau={opts.tau}", base / "lpcam", opts.tau))
        for name, folder, tau in pairs:
            h_thr, h_miou = host_curve(host, folder, gt, d["lists"] / "train_id.txt", d["work"])
            ours = our_curve(folder, gt, d["train"])
            o_thr, o_miou = host_greedy(ours)
            rows.append(dict(ref=ref, maps=name, tau=tau, host_thr=h_thr, host_miou=h_miou, our_thr=o_thr, our_miou=o_miou,
                             our_best_nanmean=max(v[1] for v in ours.values()),
                             sec_per_image=_host_seconds_per_image(logs["off"] if tau is None else logs["lpcam"])))
        for tau in opts.taus:
            folder = base / f"lpcam_tau{tau}"
            _run(launch + gen_args(ref, d, ckpt, folder, opts.scales, size), d["work"],
                 {"LPCAM_TAU": str(tau), "LPCAM_BANK": str(base / f"bank_tau{tau}.pt"),
                  "LPCAM_BASELINE_DIR": str(base / "lpcam_baseline")})
            ours = our_curve(folder, gt, d["train"])
            o_thr, o_miou = host_greedy(ours)
            rows.append(dict(ref=ref, maps=f"LPCAM tau={tau}", tau=tau, host_thr=None, host_miou=None, our_thr=o_thr,
                             our_miou=o_miou, our_best_nanmean=max(v[1] for v in ours.values()), sec_per_image=None))
        print(f"{ref}: checkpoint {t_train:.0f}s; wall time of the whole main.py run for {n} images: LPCAM=0 "
              f"{runs['off']:.1f}s, LPCAM with baseline pass and bank building {runs['build']:.1f}s, LPCAM with the bank "
              f"reused {runs['lpcam']:.1f}s; the host's own timer (s / image): LPCAM=0 "
              f"{_host_seconds_per_image(logs['off']):.3f}, LPCAM {_host_seconds_per_image(logs['lpcam']):.3f}")
    return rows


# --------------------------------------------------------------------------- real


def real(opts: argparse.Namespace) -> list[dict]:
    from lpcam_core.io import read_id_list

    host, out = Path(opts.host).resolve(), Path(opts.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    ids = read_id_list(Path(opts.img_list) / "train_id.txt")
    rows = []
    for name, env in (("PatchCAM (LPCAM=0)", {"LPCAM": "0"}), ("LPCAM", {})):
        folder = out / ("off" if env else "lpcam")
        args = ["--model", opts.model, "--data-set", "VOC12MS", "--img-list", opts.img_list, "--data-path", opts.voc,
                "--resume", opts.resume, "--gen_attention_maps", "--attention-type", "fused",
                "--layer-index", str(opts.layer_index), "--scales", *opts.scales, "--cam-npy-dir", str(folder)]
        if "V2" in opts.model:
            args += ["--visualize-cls-attn", "--patch-attn-refine"]
        launcher = [sys.executable, "-c", "import sys, lpcam_adapters.mctformer as m; m.run_host_main(sys.argv[1], sys.argv[2:])",
                    str(host), *args]
        log, _ = _run(launcher, Path.cwd(), env)
        h_thr, h_miou = host_curve(host, folder, Path(opts.gt), Path(opts.img_list) / "train_id.txt", Path.cwd())
        ours = our_curve(folder, Path(opts.gt), ids)
        o_thr, o_miou = host_greedy(ours)
        rows.append(dict(ref=opts.model, maps=name, tau=None, host_thr=h_thr, host_miou=h_miou, our_thr=o_thr,
                         our_miou=o_miou, our_best_nanmean=max(v[1] for v in ours.values()),
                         sec_per_image=_host_seconds_per_image(log)))
    return rows


def table(rows: list[dict]) -> str:
    def f(v, fmt):
        return "" if v is None else format(v, fmt)

    lines = ["| host | maps | MCTformer eval: best bg | mIoU % | lpcam eval: best bg | mIoU % (21-class mean) | "
             "mIoU % (present classes) | s / image (host timer) |", "|---|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['ref']} | {r['maps']} | {f(r['host_thr'], '.2f')} | {f(r['host_miou'], '.2f')} | "
                     f"{r['our_thr']:.2f} | {r['our_miou']:.2f} | {r['our_best_nanmean']:.2f} | {f(r['sec_per_image'], '.3f')} |")
    lines.append(f"| paper (VOC train, DeiT-S) | CAM -> LPCAM seed | | {PAPER['seed CAM']} -> {PAPER['seed LPCAM']} | | | | |")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    """The command line (tests/test_docs.py checks the documented commands against it)."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--smoke", action="store_true", help="synthetic data, tiny DeiT, CPU")
    p.add_argument("--hosts", default=str(REPO / ".hosts"), help="smoke: folder with MCTformer and MCTformer-v2")
    p.add_argument("--refs", nargs="+", default=["v2", "plus"], choices=("v2", "plus"))
    p.add_argument("--images", type=int, default=40, help="smoke: synthetic images (80%% train)")
    p.add_argument("--train-epochs", type=int, default=0, help="smoke: train the tiny model first")
    p.add_argument("--tau", type=float, default=None, help="LPCAM's tau (default: the adapter's)")
    p.add_argument("--taus", type=float, nargs="*", default=[], help="smoke: extra LPCAM runs sweeping tau")
    p.add_argument("--scales", nargs="+", default=None)
    p.add_argument("--out", default="bench_mctformer")
    p.add_argument("--host", help="real: MCTformer checkout")
    p.add_argument("--voc", help="real: VOC2012 root (JPEGImages)")
    p.add_argument("--gt", help="real: ground-truth PNG folder (SegmentationClassAug)")
    p.add_argument("--img-list", default="voc12")
    p.add_argument("--resume", help="real: trained checkpoint")
    p.add_argument("--model", default="deit_small_MCTformerV2_patch16_224")
    p.add_argument("--layer-index", type=int, default=3)
    return p


def main(argv: list[str] | None = None) -> int:
    p = build_parser()
    opts = p.parse_args(argv)
    if opts.tau is None:
        from lpcam_adapters.mctformer import DEFAULT_TAU

        opts.tau = DEFAULT_TAU
    if opts.scales is None:
        opts.scales = ["1.0", "0.75"] if opts.smoke else ["1.0", "0.5", "1.5", "2.0"]
    if opts.smoke:
        rows = smoke(opts)
    else:
        missing = [n for n in ("host", "voc", "gt", "resume") if getattr(opts, n) is None]
        if missing:
            p.error(f"real mode needs --{', --'.join(missing)} (or use --smoke)")
        rows = real(opts)
    text = table(rows)
    print(text)
    Path(opts.out, "mctformer_benchmark.md").write_text(text + "\n")
    Path(opts.out, "mctformer_benchmark.json").write_text(json.dumps(rows, indent=2))
    for r in rows:
        if r["host_miou"] is not None and (abs(r["host_miou"] - r["our_miou"]) > 0.02 or r["host_thr"] != r["our_thr"]):
            print(f"DISAGREEMENT: {r}", file=sys.stderr)
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

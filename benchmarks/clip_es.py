"""CLIP-ES with and without LPCAM: the host's own generation and evaluation, beside CLIP-ES's published row.

Real mode (a GPU, VOC 2012 with SegmentationClassAug and Annotations, OpenAI's ViT-B-16.pt): Grad-CAM
(``LPCAM=0``) and LPCAM maps of ``voc12/train.txt`` (1,464 images) by CLIP-ES's unmodified
``generate_cams_voc12.py``, seeds scored by its ``eval_cam.py`` (attn_highres, its background rule) and
CRF masks by its ``eval_cam_with_crf.py --eval_only``, beside the published 70.8 / 75.0::

    python benchmarks/clip_es.py --host .hosts/CLIP-ES --voc VOCdevkit/VOC2012 --model ViT-B-16.pt --out bench_clip_es

``--smoke`` (CPU, a minute): the same steps on a synthetic VOC with a tiny random-init CLIP (what
``lpcam clip-es try`` runs); it checks the plumbing, not quality::

    python benchmarks/clip_es.py --smoke --host .hosts/CLIP-ES --out bench_clip_es_smoke

The LPCAM run uses the adapter's settings (``LPCAM_CLIP_FEATURES``, ``LPCAM_CLIP_SCORER``, ... from the
environment); the bank goes to ``<out>/lpcam_bank.pt`` and is reused by a second run.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

PAPER = {"seeds": 70.8, "masks": 75.0}  # CLIP-ES (CVPR 2023), VOC 2012 train, ViT-B/16: Grad-CAM + CAA, then CRF


def _env(extra: dict[str, str]) -> dict[str, str]:
    env = dict(os.environ)
    env.pop("LPCAM", None)
    env.update(PYTHONDONTWRITEBYTECODE="1", **extra)  # nothing written into the host checkout
    return env


def _run(cmd: list[str], cwd: Path, env: dict[str, str], log: Path) -> tuple[str, float]:
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=cwd, env=_env(env), capture_output=True, text=True)
    with open(log, "a", encoding="utf-8") as f:
        f.write(f"$ {' '.join(cmd)}\n{proc.stdout}{proc.stderr}\n")
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd[:4])} ... failed ({proc.returncode}); log: {log}\n{proc.stderr[-2000:]}")
    return proc.stdout, time.perf_counter() - start


def real(opts: argparse.Namespace) -> list[dict]:
    from lpcam_adapters.clip_es import mean_iou

    host, voc, out = Path(opts.host).resolve(), Path(opts.voc).resolve(), Path(opts.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    gt = Path(opts.gt).resolve() if opts.gt else voc / "SegmentationClassAug"
    log = out / "clip_es.log"
    rows = []
    for method, extra in (("Grad-CAM (CLIP-ES)", ["--off"]), ("LPCAM", [])):
        cams = out / ("voc12_gradcam" if extra else "voc12_lpcam")  # CLIP-ES's eval needs 'voc' in the folder name
        args = ["--img_root", str(voc / "JPEGImages"), "--split_file", opts.split, "--model", str(Path(opts.model).resolve()),
                "--cam_out_dir", str(cams), "--num_workers", str(opts.num_workers)]
        _, seconds = _run([sys.executable, "-m", "lpcam_core.cli", "clip-es", "make", "--host", str(host),
                           "--bank", str(out / "lpcam_bank.pt"), *extra, "--", *args], host, {}, log)
        seeds, _ = _run([sys.executable, "eval_cam.py", "--cam_out_dir", str(cams), "--cam_type", "attn_highres",
                         "--gt_root", str(gt), "--split_file", opts.split], host, {}, log)
        masks, _ = _run([sys.executable, "eval_cam_with_crf.py", "--cam_out_dir", str(cams), "--gt_root", str(gt),
                         "--image_root", str(voc / "JPEGImages"), "--split_file", opts.split, "--eval_only"], host, {}, log)
        rows.append({"method": method, "seeds": 100 * (mean_iou(seeds) or float("nan")),
                     "masks": 100 * (mean_iou(masks) or float("nan")), "generation_s": seconds})
    return rows


def smoke(opts: argparse.Namespace) -> list[dict]:
    from lpcam_adapters import clip_es

    code = clip_es.try_clip_es(clip_es.INFO, opts.host, opts.out, images=opts.images, size=64, seed=0)
    if code != 0:
        raise SystemExit(code)
    found = json.loads((Path(opts.out) / "try_results.json").read_text(encoding="utf-8"))
    nan = float("nan")
    return [{"method": method, "seeds": 100 * (r["seeds"] if r["seeds"] is not None else nan),
             "masks": 100 * (r["masks"] if r["masks"] is not None else nan), "generation_s": r["seconds"]}
            for method, r in zip(("Grad-CAM (CLIP-ES)", "LPCAM"), found)]


def table(rows: list[dict], smoke_mode: bool) -> str:
    lines = ["| method | seeds mIoU | CRF masks mIoU | published seeds / masks |", "|---|---:|---:|---|"]
    for r in rows:
        paper = "-" if smoke_mode or r["method"] == "LPCAM" else f"{PAPER['seeds']} / {PAPER['masks']}"
        lines.append(f"| {r['method']} | {r['seeds']:.1f} | {r['masks']:.1f} | {paper} |")
    if len(rows) == 2:
        lines.append(f"| LPCAM - Grad-CAM | {rows[1]['seeds'] - rows[0]['seeds']:+.1f} | "
                     f"{rows[1]['masks'] - rows[0]['masks']:+.1f} | (LPCAM on CLIP-ES was never published) |")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--host", required=True, help="CLIP-ES checkout (run unmodified; never written)")
    p.add_argument("--out", default="bench_clip_es", help="output folder (maps, bank, log, results.json)")
    p.add_argument("--smoke", action="store_true", help="synthetic VOC and a tiny random CLIP on the CPU (plumbing only)")
    p.add_argument("--voc", help="VOC2012 folder (JPEGImages, Annotations, SegmentationClassAug)")
    p.add_argument("--gt", help="ground truth folder (default <voc>/SegmentationClassAug)")
    p.add_argument("--model", help="CLIP weights (OpenAI's ViT-B-16.pt)")
    p.add_argument("--split", default="./voc12/train.txt", help="list generated and scored (default ./voc12/train.txt)")
    p.add_argument("--num-workers", type=int, default=1, help="CLIP-ES's --num_workers (GPUs; default 1)")
    p.add_argument("--images", type=int, default=20, help="--smoke: synthetic training images (default 20)")
    return p


def main(argv: list[str] | None = None) -> int:
    opts = build_parser().parse_args(argv)
    if not opts.smoke and not (opts.voc and opts.model):
        build_parser().error("--voc and --model are required (or --smoke)")
    rows = smoke(opts) if opts.smoke else real(opts)
    Path(opts.out).mkdir(parents=True, exist_ok=True)
    (Path(opts.out) / "results.json").write_text(json.dumps(rows, indent=2))
    print(table(rows, opts.smoke))
    return 0


if __name__ == "__main__":
    sys.exit(main())

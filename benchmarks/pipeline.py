"""What LPCAM costs end to end in the IRN pipeline: the host's own CAM pass, lpcam's pass, the official release.

On the same random-init ResNet-50 checkpoint and the same images (VOC-like size, default 500x375),
each in its own process so that peak memory is its own:

* **host**: IRN's ``step/make_cam.py`` ``_work``, unmodified (8 views per image: 4 scales x 2 flips);
* **lpcam**: lpcam's loop, stage by stage: the baseline CAM pass alone (the reference of the ratios),
  the prototype stage (baseline CAM + pooled features of the same backbone pass + K-means), the maps
  stage (LPCAM maps); the host's pass and lpcam's baseline pass run again in this process, before and
  after the others, and are averaged, so the time ratios compare runs of one process (the host's own
  process gives its peak memory); with ``--amp`` the maps stage runs a second time with the backbone
  under autocast (``LPCAM_AMP``: bfloat16 on the CPU, float16 on CUDA) and its largest difference from
  the float32 maps is reported;
* **release**: zhaozhengChen/LPCAM's ``step/make_cam.py`` then ``step/make_lpcam.py`` (feature cache,
  kmeans-pytorch, per-prototype maps), unmodified, on CPU with :func:`lpcam_adapters.cpu.cuda_as_cpu`
  and kmeans-pytorch told to use the CPU; skipped with a message when the clone or kmeans-pytorch
  is missing (``pip install kmeans-pytorch`` into the environment running this script).

The prototype images and the map images are the same list (as IRN's train list is both). It prints a
table: seconds and peak memory per stage, backbone passes per image, and the ratios lpcam / host
and lpcam / release (``--json`` writes them too). Working memory is the peak resident memory above
what the process held once its model was loaded.

Examples::

    python benchmarks/pipeline.py --host .hosts/irn --release .hosts/LPCAM          # CPU, 20 images
    python benchmarks/pipeline.py --host irn --release LPCAM --images 100 --device cuda
    python benchmarks/pipeline.py --host .hosts/irn --smoke                           # seconds
    python benchmarks/pipeline.py --host .hosts/irn --smoke --amp                     # + the --amp maps
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any
from unittest import mock

SCALES = (1.0, 0.5, 1.5, 2.0)  # IRN's cam_scales
NUM_CLASSES = 20


def rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# --------------------------------------------------------------------------- data and checkpoint


def write_images(root: Path, count: int, size: tuple[int, int], seed: int) -> list[str]:
    """``count`` seeded JPEGs of ``size`` (w, h) in a VOC layout and an IRN ``cls_labels.npy`` in which
    every one of the 20 classes appears (the release clusters all 20); returns the ids."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    (root / "JPEGImages").mkdir(parents=True, exist_ok=True)
    ids, labels = [], {}
    for i in range(count):
        image_id = f"2007_{i:06d}"
        w, h = size
        yy, xx = np.mgrid[0:h, 0:w]
        picture = np.zeros((h, w, 3), np.float32) + rng.uniform(40, 200, 3)
        for _ in range(4):  # a few soft blobs, so the features are not constant
            cy, cx, r = rng.uniform(0, h), rng.uniform(0, w), rng.uniform(0.1, 0.3) * min(h, w)
            picture += np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * r * r))[..., None] * rng.uniform(-80, 80, 3)
        picture += rng.normal(0, 12, picture.shape)
        Image.fromarray(picture.clip(0, 255).astype(np.uint8)).save(root / "JPEGImages" / f"{image_id}.jpg", quality=90)
        label = np.zeros(NUM_CLASSES, np.float32)
        label[[(3 * i + k) % NUM_CLASSES for k in range(1 + (i % 3))]] = 1
        labels[int(image_id.replace("_", ""))] = label
        ids.append(image_id)
    covered = {c for v in labels.values() for c in np.nonzero(v)[0]}
    if len(covered) < NUM_CLASSES:  # too few images for every class: put the rest on the first image
        first = int(ids[0].replace("_", ""))
        labels[first][sorted(set(range(NUM_CLASSES)) - covered)] = 1
    np.save(root / "cls_labels.npy", labels)
    return ids


def prepare(args: argparse.Namespace, out: Path) -> dict[str, Any]:
    from lpcam_adapters.irn_family import prepare_workdir

    size = tuple(int(v) for v in args.size.lower().split("x"))
    voc = out / "VOC2012"
    ids = write_images(voc, args.images, size, args.seed)
    lists = {"train.txt": ids, "train_aug.txt": ids}
    work = prepare_workdir(args.host, out / "host_work", cls_labels=voc / "cls_labels.npy", lists=lists)
    release = None
    if args.release:
        release = prepare_workdir(args.release, out / "release_work", cls_labels=voc / "cls_labels.npy", lists=lists)
    return {"voc": str(voc), "ids": ids, "work": str(work), "release": str(release) if release else None,
            "checkpoint": str(out / "res50_cam.pth"), "device": args.device, "threads": args.threads,
            "seed": args.seed, "out": str(out), "amp": args.amp}


# --------------------------------------------------------------------------- stages (each in its own process)


def _enter(job: dict[str, Any], workdir: str) -> None:
    import torch

    os.chdir(workdir)
    sys.path.insert(0, workdir)
    if job["threads"]:
        torch.set_num_threads(job["threads"])
    os.environ.setdefault("LPCAM_NO_PRETRAINED", "1")


def _model(job: dict[str, Any]) -> Any:
    import torch

    from lpcam_adapters import compat
    from lpcam_adapters.irn_family import load_model

    compat.register_irn_family()
    if not os.path.isfile(job["checkpoint"]):
        import net.resnet50_cam
        import voc12.dataloader

        torch.manual_seed(job["seed"])
        with compat.checkpoint_follows():
            model = net.resnet50_cam.CAM()
        model.eval()  # IRN's train() override returns None: no chaining
        # A random head can give a class no positive response anywhere (the release's K-means then crashes on an
        # empty pool): each class direction loses its component along the mean feature, so every class lights
        # up part of every image, as a trained head's classes light up their objects.
        dataset = voc12.dataloader.VOC12ClassificationDataset("voc12/train.txt", voc12_root=job["voc"])
        with torch.no_grad():
            mean = torch.stack([model.stage4(model.stage3(model.stage2(model.stage1(
                torch.as_tensor(dataset[i]["img"])[None])))).mean((0, 2, 3)) for i in range(min(4, len(dataset)))]).mean(0)
            w = model.classifier.weight[:, :, 0, 0]
            w -= (w @ mean)[:, None] * mean[None] / mean.dot(mean)
        torch.save(model.state_dict(), job["checkpoint"])
    return load_model("net.resnet50_cam", job["checkpoint"]).to(job["device"])


def warm_up(job: dict[str, Any], model: Any) -> None:
    """One forward of every view of the first images, untimed: the CPU's convolution kernels are built
    per input shape on first use, which would otherwise be charged to whichever stage runs first."""
    import torch
    import voc12.dataloader

    dataset = voc12.dataloader.VOC12ClassificationDatasetMSF("voc12/train.txt", voc12_root=job["voc"], scales=SCALES)
    with torch.no_grad():
        for i in range(min(2, len(dataset))):
            for view in dataset[i]["img"]:
                model(torch.as_tensor(view).to(job["device"]))


def stage_host(job: dict[str, Any]) -> dict[str, Any]:
    """IRN's own make_cam ``_work`` over the list."""
    import torch

    from lpcam_adapters.cpu import cuda_as_cpu

    _enter(job, job["work"])
    model = _model(job)
    import step.make_cam
    import voc12.dataloader

    dataset = voc12.dataloader.VOC12ClassificationDatasetMSF("voc12/train.txt", voc12_root=job["voc"], scales=SCALES)
    warm_up(job, model)
    out = os.path.join(job["out"], "host_cam")
    os.makedirs(out, exist_ok=True)
    base_rss = rss_mib()
    t0 = time.perf_counter()
    with cuda_as_cpu():
        step.make_cam._work(0, model, [dataset], argparse.Namespace(num_workers=0, cam_out_dir=out))
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return {"cam": time.perf_counter() - t0, "rss": rss_mib(), "work_mib": rss_mib() - base_rss,
            "gpu_mib": _gpu_peak()}


def stage_lpcam(job: dict[str, Any]) -> dict[str, Any]:
    """lpcam's loop: baseline CAM pass, prototype stage (one backbone pass per image), maps, baseline again."""
    import torch

    from lpcam_adapters import base
    from lpcam_adapters.irn_family import IRNFamily, voc_datasets
    from lpcam_adapters.settings import HostSettings
    from lpcam_core import LPCAMConfig
    from lpcam_core.formats import load_irn_cam

    _enter(job, job["work"])
    device = torch.device(job["device"])
    host = IRNFamily("irn", "net.resnet50_cam", _model(job), SCALES).to(device)
    warm_up(job, host.cam_model)
    data = voc_datasets("voc12/train.txt", "voc12/train.txt", job["voc"], SCALES)
    settings = HostSettings(lpcam=LPCAMConfig.preset("voc", seed=job["seed"]), device=job["device"])
    out = Path(job["out"])
    base_rss = rss_mib()
    times: dict[str, float] = {}

    def timed(name: str, fn: Any) -> Any:
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        result = fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times[name] = time.perf_counter() - t0
        return result

    import step.make_cam
    import voc12.dataloader

    from lpcam_adapters.cpu import cuda_as_cpu

    msf = voc12.dataloader.VOC12ClassificationDatasetMSF("voc12/train.txt", voc12_root=job["voc"], scales=SCALES)

    def host_pass(folder: str) -> None:  # the host's own pass in this process too: time ratios on one process
        os.makedirs(out / folder, exist_ok=True)
        with cuda_as_cpu():
            step.make_cam._work(0, host.cam_model, [msf], argparse.Namespace(num_workers=0, cam_out_dir=str(out / folder)))

    timed("host_a", lambda: host_pass("host_cam_a"))
    timed("cam_a", lambda: base.write_baseline(host, data, str(out / "lpcam_cam_a"), mode="overwrite"))
    bank = timed("bank", lambda: base.prototype_bank(
        host, data, str(out / "lpcam_baseline"), str(out / "lpcam_bank.pt"), settings, {"host": "irn"},
        device=device, fingerprint=host.baseline_fingerprint()))
    timed("maps", lambda: base.write_lpcam(host, bank, str(out / "lpcam_bank.pt"), data, str(out / "lpcam_maps"),
                                            mode="overwrite"))
    amp_diff = None
    if job.get("amp"):
        host.amp = True
        timed("maps_amp", lambda: base.write_lpcam(host, bank, str(out / "lpcam_bank.pt"), data,
                                                    str(out / "lpcam_maps_amp"), mode="overwrite"))
        host.amp = False
        amp_diff = max(float(abs(load_irn_cam(out / "lpcam_maps" / f"{i}.npy")["high_res"]
                                 - load_irn_cam(out / "lpcam_maps_amp" / f"{i}.npy")["high_res"]).max(initial=0.0))
                       for i in job["ids"])
    timed("cam_b", lambda: base.write_baseline(host, data, str(out / "lpcam_cam_b"), mode="overwrite"))
    timed("host_b", lambda: host_pass("host_cam_b"))
    return {**times, "amp_max_abs_diff": amp_diff, "cam": (times["cam_a"] + times["cam_b"]) / 2, "host": (times["host_a"] + times["host_b"]) / 2,
            "rss": rss_mib(),
            "work_mib": rss_mib() - base_rss, "gpu_mib": _gpu_peak(), "prototypes": sum(len(v) for v in bank.foreground.values())}


def stage_release(job: dict[str, Any]) -> dict[str, Any]:
    """The official release's make_cam then make_lpcam (save_feature, cluster, make_lpcam), unmodified."""
    import numpy as np
    import torch

    from lpcam_adapters import compat
    from lpcam_adapters.cpu import cuda_as_cpu

    _enter(job, job["release"])
    compat.register_irn_family()  # modern-stack shims only (numpy aliases, CPU torch.load)
    np.random.seed(job["seed"])  # kmeans-pytorch draws its initial centres with numpy
    torch.manual_seed(job["seed"])
    warm_up(job, _model(job))  # the shared checkpoint exists; kernels built for these shapes
    import step.make_cam
    import step.make_lpcam

    real_kmeans = step.make_lpcam.kmeans
    device = torch.device(job["device"])

    def kmeans(*a: Any, **kw: Any) -> Any:  # the release asks for cuda:0; the machine may have no GPU
        kw["device"] = device
        return real_kmeans(*a, **kw)

    times: dict[str, float] = {}

    def timing(name: str, fn: Any) -> Any:
        def timed(*a: Any, **kw: Any) -> Any:
            t0 = time.perf_counter()
            try:
                return fn(*a, **kw)
            finally:
                times[name] = time.perf_counter() - t0
        return timed

    def in_process(fn: Any, args: tuple = (), nprocs: int = 1, join: bool = True, **kw: Any) -> None:
        """The release's one process per GPU, run here: the shims above reach it (a spawned child would
        import the release without them), on one device as lpcam's stage."""
        for index in range(nprocs):
            fn(index, *args)

    step.make_lpcam.kmeans = kmeans
    for name in ("save_feature", "load_feature_select_and_cluster", "make_lpcam"):
        setattr(step.make_lpcam, name, timing(name, getattr(step.make_lpcam, name)))
    out = Path(job["out"]) / "release"
    ns = argparse.Namespace(cam_network="net.resnet50_cam", cam_weights_name=job["checkpoint"], voc12_root=job["voc"],
                            infer_list="voc12/train.txt", cam_scales=SCALES, num_workers=0,
                            cam_out_dir=str(out / "cam"), work_space=str(out), lpcam_out_dir=str(out / "lpcam"))
    for folder in (ns.cam_out_dir, ns.lpcam_out_dir):
        os.makedirs(folder, exist_ok=True)
    base_rss = rss_mib()
    devnull = open(os.devnull, "w")  # the release prints per class and per K-means iteration
    stdout, sys.stdout = sys.stdout, devnull
    lpcam_prototypes_for = []
    try:
        with cuda_as_cpu(), mock.patch.object(torch.multiprocessing, "spawn", in_process):
            step.make_cam.run = timing("make_cam", step.make_cam.run)
            step.make_cam.run(ns)
            # step.make_lpcam.run(ns), call by call, so the workspace can be looked at between them
            step.make_lpcam.save_feature(save_dir=os.path.join(ns.work_space, "cam_feature"),
                                         ckpt_path=ns.cam_weights_name, voc12_root=ns.voc12_root)
            step.make_lpcam.load_feature_select_and_cluster(
                workspace=ns.work_space, feature_dir=os.path.join(ns.work_space, "cam_feature"), mask_dir=ns.cam_out_dir,
                ckpt_path=ns.cam_weights_name)
            lpcam_prototypes_for = _fill_empty_classes(ns.work_space, Path(job["out"]) / "lpcam_bank.pt")
            step.make_lpcam.make_lpcam(workspace=ns.work_space, lpcam_out_dir=ns.lpcam_out_dir,
                                       ckpt_path=ns.cam_weights_name, voc12_root=ns.voc12_root,
                                       list_name="voc12/train_aug.txt")
    finally:
        sys.stdout = stdout
        devnull.close()
    return {"cam": times["make_cam"], "features": times["save_feature"],
            "cluster": times["load_feature_select_and_cluster"], "maps": times["make_lpcam"],
            "rss": rss_mib(), "work_mib": rss_mib() - base_rss, "gpu_mib": _gpu_peak(),
            "lpcam_prototypes_for": lpcam_prototypes_for}


def _fill_empty_classes(workspace: str, bank_path: Path) -> list[int]:
    """The release's VOC code stops in make_lpcam at a class none of whose centres passed mu_f (any untrained
    classifier leaves such classes): those classes get lpcam's prototypes (same count of maps to compute), so
    its maps stage can be timed; returns them."""
    import torch

    from lpcam_core import PrototypeBank

    centers = torch.load(os.path.join(workspace, "class_ceneters.pt"), weights_only=True)
    empty = [c for c, v in centers.items() if v.shape[0] == 0]
    if empty:
        bank = PrototypeBank.load(bank_path)
        context = torch.load(os.path.join(workspace, "class_context.pt"), weights_only=True)
        for c in empty:
            centers[c] = bank.foreground[c].clone()
            context[c] = bank.context.get(c, torch.zeros(0, bank.feature_dim)).clone()
        torch.save(centers, os.path.join(workspace, "class_ceneters.pt"))
        torch.save(context, os.path.join(workspace, "class_context.pt"))
    return empty


def _gpu_peak() -> float | None:
    import torch

    return torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else None


STAGES = {"host": stage_host, "lpcam": stage_lpcam, "release": stage_release}


def run_stage(name: str, job: dict[str, Any], timeout: float) -> dict[str, Any]:
    """One stage in a fresh Python process (its own peak memory); its JSON result."""
    with tempfile.NamedTemporaryFile("r", suffix=".json") as result:
        cmd = [sys.executable, os.path.abspath(__file__), "--_stage", name, "--_job", json.dumps(job),
               "--_result", result.name]
        env = {**os.environ, "PYTHONPYCACHEPREFIX": os.path.join(job["out"], "pycache")}
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
        if proc.returncode != 0:
            raise RuntimeError(f"stage {name} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
        return json.loads(Path(result.name).read_text())


# --------------------------------------------------------------------------- the table


def table(res: dict[str, Any], job: dict[str, Any]) -> tuple[str, dict[str, float]]:
    host, lp, rel = res["host"], res["lpcam"], res.get("release")
    times = {k: round(v, 2) for k, v in lp.items() if k.startswith(("host", "cam", "bank", "maps"))}
    n = len(job["ids"])
    lp_total = lp["bank"] + lp["maps"]
    rows = [
        ("baseline CAM pass (prototype images)", f"{lp['host']:.1f} ({host['cam']:.1f} alone)", f"{lp['cam']:.1f}",
         f"{rel['cam']:.1f}" if rel else "-"),
        ("prototype stage (features + K-means)", "-", f"{lp['bank']:.1f} (CAM included)",
         f"{rel['features'] + rel['cluster']:.1f} (+ CAM above)" if rel else "-"),
        ("maps stage", "-", f"{lp['maps']:.1f}", f"{rel['maps']:.1f}" if rel else "-"),
        *([("maps stage with --amp", "-", f"{lp['maps_amp']:.1f} (max abs diff {lp['amp_max_abs_diff']:.1e})", "-")]
          if "maps_amp" in lp else []),
        ("whole pipeline", f"{lp['host']:.1f}", f"{lp_total:.1f}",
         f"{rel['cam'] + rel['features'] + rel['cluster'] + rel['maps']:.1f}" if rel else "-"),
        ("backbone passes per image", "8", "8 + 8", "8 + 1 + 8" if rel else "-"),
        ("peak RSS (MiB)", f"{host['rss']:.0f}", f"{lp['rss']:.0f}", f"{rel['rss']:.0f}" if rel else "-"),
        ("working memory above the model (MiB)", f"{host['work_mib']:.0f}", f"{lp['work_mib']:.0f}",
         f"{rel['work_mib']:.0f}" if rel else "-"),
    ]
    if host.get("gpu_mib") is not None:
        rows.append(("peak GPU memory (MiB)", f"{host['gpu_mib']:.0f}", f"{lp['gpu_mib']:.0f}",
                     f"{rel['gpu_mib']:.0f}" if rel else "-"))
    ratios = {  # lpcam and host timed in the same process, interleaved
        "prototype stage / lpcam baseline CAM pass": lp["bank"] / lp["cam"],
        "maps stage / lpcam baseline CAM pass": lp["maps"] / lp["cam"],
        "lpcam baseline CAM pass / host's": lp["cam"] / lp["host"],
        "lpcam maps stage / host's CAM pass": lp["maps"] / lp["host"],
        "lpcam pipeline / host's CAM pass": lp_total / lp["host"],
    }
    if "maps_amp" in lp:
        ratios["maps stage --amp / maps stage float32"] = lp["maps_amp"] / lp["maps"]
        ratios["maps stage --amp / host's CAM pass"] = lp["maps_amp"] / lp["host"]
    if rel:
        rel_total = rel["cam"] + rel["features"] + rel["cluster"] + rel["maps"]
        ratios["lpcam pipeline / release pipeline"] = lp_total / rel_total
        ratios["lpcam maps stage / release make_lpcam maps"] = lp["maps"] / rel["maps"]
        ratios["lpcam working memory / release's"] = lp["work_mib"] / max(rel["work_mib"], 1e-9)
    lines = [f"{n} images of {job['size']}, random-init ResNet-50, device {job['device']}, "
             f"{job['threads'] or 'default'} threads; seconds unless said; lpcam stages in order: {times}",
             "", "| | IRN make_cam | lpcam | official release |", "|---|---|---|---|"]
    lines += [f"| {a} | {b} | {c} | {d} |" for a, b, c, d in rows]
    lines += ["", "| ratio | value |", "|---|---|"] + [f"| {k} | {v:.2f}x |" for k, v in ratios.items()]
    if not rel:
        lines.append("")
        lines.append(f"release: {res.get('release_skipped', 'not run')}")
    elif rel.get("lpcam_prototypes_for"):
        lines.append("")
        lines.append(f"release: no centre of class(es) {rel['lpcam_prototypes_for']} passed its mu_f (a random-init "
                     "classifier's), where its VOC code stops; its maps stage ran on lpcam's prototypes for them")
    return "\n".join(lines), ratios


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("--host", help="IRN checkout (jiwoon-ahn/irn; required); never modified")
    p.add_argument("--release", help="zhaozhengChen/LPCAM checkout (the official release); omitted: not timed")
    p.add_argument("--images", type=int, default=20,
                   help="images (prototype list = map list; default and least 20: IRN's make_cam divides by len // 20)")
    p.add_argument("--size", default="500x375", help="image size WxH (default 500x375, VOC-like)")
    p.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    p.add_argument("--threads", type=int, default=0, help="torch threads per process (default: torch's)")
    p.add_argument("--seed", type=int, default=0, help="images, checkpoint and K-means seed (default 0)")
    p.add_argument("--out", help="work folder (default: a temporary one, removed)")
    p.add_argument("--json", help="also write the results and ratios to this JSON file")
    p.add_argument("--timeout", type=float, default=3600, help="seconds per stage (default 3600)")
    p.add_argument("--smoke", action="store_true", help="20 images of 64x48: checks the plumbing in seconds")
    p.add_argument("--amp", action="store_true",
                   help="also time the maps stage with the backbone under autocast and report its largest difference")
    p.add_argument("--_stage", help=argparse.SUPPRESS)
    p.add_argument("--_job", help=argparse.SUPPRESS)
    p.add_argument("--_result", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args._stage:
        return args
    if not args.host:
        p.error("--host is required: the IRN checkout (git clone https://github.com/jiwoon-ahn/irn)")
    if args.smoke:
        args.images, args.size = 20, "64x48"
    if args.images < 20:
        p.error(f"--images {args.images}: expected at least 20 (IRN's make_cam divides by len(list) // 20)")
    try:
        w, h = (int(v) for v in args.size.lower().split("x"))
        if w < 16 or h < 16:
            raise ValueError
    except ValueError:
        p.error(f"--size {args.size!r}: expected WxH of at least 16x16, e.g. 500x375")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args._stage:
        result = STAGES[args._stage](json.loads(args._job))
        Path(args._result).write_text(json.dumps(result))
        return 0
    for flag, path in (("--host", args.host), ("--release", args.release)):
        if path and not (Path(path) / "voc12" / "dataloader.py").is_file():
            print(f"{flag} {path}: not an IRN-family checkout (no voc12/dataloader.py)", file=sys.stderr)
            return 2
    skipped = None
    if args.release and importlib.util.find_spec("kmeans_pytorch") is None:
        skipped = "skipped: kmeans-pytorch is not installed (the release needs it: pip install kmeans-pytorch)"
        args.release = None
    elif not args.release:
        skipped = "skipped: no --release checkout (git clone https://github.com/zhaozhengChen/LPCAM)"
    with tempfile.TemporaryDirectory(prefix="lpcam_pipeline_") as tmp:
        out = Path(args.out or tmp).resolve()
        out.mkdir(parents=True, exist_ok=True)
        job = {**prepare(args, out), "size": args.size}
        res: dict[str, Any] = {"release_skipped": skipped}
        for name in ("host", "lpcam", "release"):
            if name == "release" and not job["release"]:
                continue
            print(f"running {name} ...", file=sys.stderr, flush=True)
            try:
                res[name] = run_stage(name, job, args.timeout)
            except (RuntimeError, subprocess.TimeoutExpired) as err:
                if name != "release":
                    raise
                last = str(err).strip().splitlines()[-1]
                res["release_skipped"] = f"failed: {last}"  # e.g. kmeans-pytorch on too few features
                print(f"the release failed: {last}", file=sys.stderr)
        text, ratios = table(res, job)
    print(text)
    if args.json:
        Path(args.json).write_text(json.dumps({"results": res, "ratios": ratios, "images": args.images,
                                               "size": args.size, "device": args.device}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())

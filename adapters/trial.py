"""``lpcam <host> try HOST_DIR``: the host's own pipeline on a small synthetic VOC, on CPU, offline, with and
without the swap, before anyone spends GPU hours.

What it does (IRN): writes a synthetic VOC-layout dataset (:mod:`lpcam_core.demo.synthetic`) and the lists the
host reads; makes a work folder of links to the checkout (the checkout itself is never written) holding a
patched copy of ``run_sample.py``; runs that script twice, as a user would, under
:func:`lpcam_adapters.cpu.cuda_as_cpu` with ``LPCAM_NO_PRETRAINED=1`` (no ImageNet download):

1. ``LPCAM=0``: train_cam (2 epochs, seeded, learning rate 0.01: IRN's 0.1 can leave a tiny model's CAMs
   all zero), IRN's own make_cam, eval_cam, cam_to_ir_label;
2. ``LPCAM=1``: the swapped make_cam (bank + LPCAM maps), eval_cam, cam_to_ir_label, on the same weights.

It prints each command, where the files are and the host's own mIoU of both runs. The numbers of a
one-epoch model on synthetic images say the plumbing works, not how good LPCAM is.
"""

from __future__ import annotations

import logging
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import hooks
from .base import HostInfo

__all__ = ["RUNNER", "TrySetup", "prepare_try", "try_parser", "try_irn", "irn_family_runs", "add_try", "host_miou", "synthetic_voc", "percent", "report", "best_miou",
           "try_mctformer", "add_try_mctformer"]

logger = logging.getLogger(__name__)

#: Runs a host script in this process as ``python <script> args`` would, with the CPU shims (and a seed: IRN's
#: training is unseeded, and a one-epoch model can collapse to all-zero CAMs).
RUNNER = (
    "import os, runpy, sys, torch, numpy, random\n"
    "from lpcam_adapters.cpu import cuda_as_cpu\n"
    "seed = int(os.environ.get('LPCAM_TRY_SEED', '0'))\n"
    "torch.manual_seed(seed); numpy.random.seed(seed); random.seed(seed)\n"
    "script, sys.argv = sys.argv[1], sys.argv[1:]\n"
    "sys.path.insert(0, os.path.dirname(os.path.abspath(script)))\n"
    "with cuda_as_cpu():\n"
    "    runpy.run_path(script, run_name='__main__')\n"
)

# IRN tests its pass flags with `is True`: any value given turns a pass off.
# --num_workers is also the number of processes cam_to_ir_label spawns (0 would run nothing).
IRN_LATER_PASSES_OFF = ["--train_irn_pass", "0", "--make_ins_seg_pass", "0", "--eval_ins_seg_pass", "0",
                        "--make_sem_seg_pass", "0", "--eval_sem_seg_pass", "0"]


def host_miou(stdout: str) -> float | None:
    """The mIoU the IRN family's eval steps print (``{'iou': ..., 'miou': 0.43}``, ``np.float64(0.43)``, ReCAM's
    ``threshold: 0.21 miou: 0.43 ...``), else None."""
    found = re.findall(r"'?miou'?: (?:np\.float64\()?([0-9.eE+-]+|nan)", stdout)
    return float(found[-1]) if found else None


def synthetic_voc(out: Path, images: int, size: int, seed: int) -> tuple[Path, dict[str, list[int]], list[str], list[str]]:
    """A synthetic VOC root, its labels (id -> 0-based classes), and its train and val ids."""
    from lpcam_core.demo.synthetic import SyntheticConfig, write_voc
    from lpcam_core.io import load_npy

    held_out = max(4, images // 4)
    cfg = SyntheticConfig(num_classes=4, image_size=size, num_images=images + held_out,
                          val_fraction=held_out / (images + held_out), seed=seed)
    root = write_voc(cfg, out / "VOC2012", progress=False)
    table = load_npy(root / "cls_labels.npy", what="labels")  # {2007000032: float32 [4]}
    train = (root / "ImageSets" / "Segmentation" / "train.txt").read_text().split()
    val = (root / "ImageSets" / "Segmentation" / "val.txt").read_text().split()
    labels = {i: [int(c) for c in table[int(i.replace("_", ""))].nonzero()[0]] for i in train + val}
    return root, labels, train, val


@dataclass
class TrySetup:
    """What every ``try`` path prepares (:func:`prepare_try`).

    Attributes:
        out_dir: the work folder (absolute).
        root: the synthetic VOC root.
        labels: image id -> 0-based classes present.
        train, val: the ids of the two splits.
        work: the run folder of links to the checkout, with the patched entry script and the host's lists.
        env: the environment of the host's processes (no ``LPCAM*`` of the caller's).
    """

    out_dir: Path
    root: Path
    labels: dict[str, list[int]]
    train: list[str]
    val: list[str]
    work: Path
    env: dict[str, str]

    def run(self, script: str, argv: list[str], extra_env: dict[str, str], log: Any,
            timeout: float) -> subprocess.CompletedProcess | None:
        """Run ``python <script> argv`` of the work folder through :data:`RUNNER` (CPU shims, seed), its output
        appended to the open file ``log``; None, after one line saying why, when it failed."""
        start = time.perf_counter()
        proc = subprocess.run([sys.executable, "-c", RUNNER, script, *argv], cwd=self.work, env={**self.env, **extra_env},
                              capture_output=True, text=True, timeout=timeout)
        log.write(f"$ {command_line(extra_env, script, argv)}\n{proc.stdout}{proc.stderr}\n")
        log.flush()
        if proc.returncode != 0:
            last = (proc.stderr.strip().splitlines() or ["(no output)"])[-1]
            report(f"    failed ({proc.returncode}) after {time.perf_counter() - start:.0f}s: {last}\n    full log: {log.name}")
            return None
        return proc


def prepare_try(info: HostInfo, host_dir: str, out: str, *, images: int, size: int, seed: int,
                marker: str | None = None) -> TrySetup:
    """The common start of ``lpcam <host> try``: the synthetic VOC and the lists ``info``'s host reads, a work
    folder of links to the checkout (never written) holding a patched copy of the entry script."""
    from lpcam_core.formats import write_host_lists

    from . import cli, irn_family

    checkout = cli.check_checkout(host_dir, info)
    out_dir = Path(out).resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    report(f"lpcam {info.name} try: {checkout} (never written) -> {out_dir}")
    root, labels, train, val = synthetic_voc(out_dir, images, size, seed)
    work = irn_family.prepare_workdir(checkout, out_dir / "work", **({"marker": marker} if marker else {}))
    write_host_lists(info.name, work, labels, train, val)  # docs/hosts: the layout each host reads
    report(f"  synthetic VOC: {root} ({len(train)} train, {len(val)} val images of {size}x{size}); "
           f"lists in {work / 'voc12'}")
    script = work / info.entry_script
    if script.is_symlink():
        script.unlink()
        shutil.copyfile(checkout / info.entry_script, script)
    cli.patch_entry_script(work, info)
    env = {k: v for k, v in os.environ.items() if not k.startswith("LPCAM")}
    env.update(LPCAM_TRY_SEED=str(seed), PYTHONPYCACHEPREFIX=str(out_dir / "pycache"), PYTHONUNBUFFERED="1")
    return TrySetup(out_dir, root, labels, train, val, work, env)


def irn_family_runs(host: str, root: Path, epochs: int, crf: bool) -> tuple[list[str], list[tuple[str, dict, list[str]]]]:
    """(flags of both runs, [(title, environment, flags)]) of the try path of an IRN-family host.

    IRN: run_sample.py's passes are on unless given (``is True`` tests: any value turns one off); ReCAM and
    AMN: off unless ``True``. The own run trains (a small seeded learning rate: IRN's 0.1 can leave a tiny
    model's CAMs all zero) and makes the host's CAM; the swapped run reuses those weights.
    """
    thresholds = ["--cam_eval_thres", "0.30", "--conf_fg_thres", "0.45", "--conf_bg_thres", "0.25"]
    train = ["--cam_num_epoches", str(epochs), "--cam_batch_size", "4", "--cam_learning_rate", "0.01"]
    on = ["True"]
    if host == "irn":
        common = ["--voc12_root", str(root), "--num_workers", "1", "--cam_weights_name", "sess/res50_cam.pth",
                  *IRN_LATER_PASSES_OFF, *([] if crf else ["--cam_to_ir_label_pass", "0"])]
        return common, [
            ("LPCAM=0 (the host's own CAM)", {"LPCAM": "0"},
             [*train, "--cam_out_dir", "result/cam_own", "--ir_label_out_dir", "result/ir_label_own"]),
            ("LPCAM=1 (the swap)", {"LPCAM": "1"},
             ["--train_cam_pass", "0", "--cam_out_dir", "result/cam", "--ir_label_out_dir", "result/ir_label", *thresholds]),
        ]
    ir_label = ["--cam_to_ir_label_pass", *on] if crf else []
    if host == "recam":  # ReCAM's paths are relative to --work_space
        common = ["--voc12_root", str(root), "--num_workers", "1", "--work_space", "ws", "--recam_num_epoches", "1"]
        return common, [
            ("LPCAM=0 (the host's own ReCAM)", {"LPCAM": "0"},
             ["--train_cam_pass", *on, "--train_recam_pass", *on, "--make_recam_pass", *on, "--eval_cam_pass", *on,
              *ir_label, *train, "--cam_out_dir", "cam_own", "--ir_label_out_dir", "ir_label_own"]),
            ("LPCAM=1 (the swap)", {"LPCAM": "1"},
             ["--make_recam_pass", *on, "--eval_cam_pass", *on, *ir_label, "--cam_out_dir", "cam",
              "--ir_label_out_dir", "ir_label", *thresholds]),
        ]
    if host == "amn":  # stage (a) IRN's CAM and ir labels train AMN; the swap is stage (b), AMN's own CAM
        common = ["--voc12_root", str(root), "--num_workers", "1", "--cam_crop_size", "64", "--amn_crop_size", "64"]
        return common, [
            ("LPCAM=0 (the host's own AMN CAM)", {"LPCAM": "0"},
             ["--train_cam_pass", *on, "--make_cam_pass", *on, "--eval_cam_pass", *on, "--cam_to_ir_label_pass", *on,
              "--train_amn_pass", *on, "--make_amn_cam_pass", *on, "--eval_amn_cam_pass", *on,
              "--amn_cam_to_ir_label_pass", *on, *train, "--amn_num_epoches", "1", "--amn_batch_size", "4",
              "--amn_cam_out_dir", "result/amn_cam_own", "--amn_ir_label_out_dir", "result/amn_ir_label_own"]),
            ("LPCAM=1 (the swap)", {"LPCAM": "1"},
             ["--make_amn_cam_pass", *on, "--eval_amn_cam_pass", *on, "--amn_cam_to_ir_label_pass", *on,
              "--amn_cam_out_dir", "result/amn_cam", "--amn_ir_label_out_dir", "result/amn_ir_label"]),
        ]
    raise ValueError(f"no try path for {host!r}")


def try_irn(info: HostInfo, host_dir: str, out: str, *, images: int = 20, size: int = 64, epochs: int = 2,
            seed: int = 0, timeout: float = 3600) -> int:
    """The try path for IRN, ReCAM or AMN (see the module docstring); returns 0 when both runs finished."""
    if images < 20:
        raise ValueError(f"--images {images}: the IRN family's steps need at least 20 (they divide the list by 20)")
    crf = hooks.installed("pydensecrf")
    if not crf and info.name == "amn":
        raise ValueError(f"AMN trains on the ir labels of cam_to_ir_label, which needs pydensecrf: {CRF_INSTALL}")
    setup = prepare_try(info, host_dir, out, images=images, size=size, seed=seed)
    out_dir, root, work = setup.out_dir, setup.root, setup.work
    if not crf:
        report(f"  cam_to_ir_label skipped: pydensecrf is not installed ({CRF_INSTALL})")
    setup.env.update(LPCAM_NO_PRETRAINED="1", LPCAM_WORKERS="0", LPCAM_DEVICE="cpu")
    common, runs = irn_family_runs(info.name, root, epochs, crf)
    results = []
    for title, extra_env, flags in runs:
        argv = [*common, *flags]
        shown = command_line({**extra_env, "LPCAM_NO_PRETRAINED": "1"}, info.entry_script, argv)
        report(f"\n  {title}, in {work}:\n    {shown}")
        report(f"    (inside lpcam_adapters.cpu.cuda_as_cpu: {'; '.join(_shims())})")
        start = time.perf_counter()
        log = out_dir / f"{'lpcam' if extra_env['LPCAM'] == '1' else 'own'}.log"
        with open(log, "w", encoding="utf-8") as log_file:
            proc = setup.run(info.entry_script, argv, extra_env, log_file, timeout)
        if proc is None:
            return 2
        seconds = time.perf_counter() - start
        results.append((title, host_miou(proc.stdout), seconds, log))
        report(f"    finished in {seconds:.0f}s; host's eval mIoU {percent(results[-1][1])}; log {log}")
        for line in lpcam_warnings(proc.stdout):
            report(f"    {line}")
    banks = ", ".join(str(p.relative_to(work)) for p in sorted(work.rglob("lpcam_bank*.pt")))
    report(f"\n  files: everything the host wrote is under {work} (weights, CAM folders of both runs, the bank "
          f"{banks or '(none)'}, its baseline CAMs of the prototype list)")
    report("\n  | run | host's eval mIoU (%) | seconds |\n  |---|---:|---:|")
    for title, miou, seconds, _ in results:
        report(f"  | {title} | {percent(miou)} | {seconds:.0f} |")
    report("  Each run is scored by the host's own eval step at its threshold: " +
           ("AMN's eval_amn_cam default for both." if info.name == "amn" else
            "the host's default for LPCAM=0, --cam_eval_thres 0.30 (the value for LPCAM maps) for the swap."))
    report("\n  A briefly trained model on synthetic images: these numbers check the plumbing, not LPCAM's gain. The "
          "commands above are the toy's (LPCAM_NO_PRETRAINED, a few epochs, later passes off): on VOC with a GPU, "
          f"patch your checkout (`lpcam {info.name} patch`) and run its own pipeline with your settings "
          f"(docs/hosts/{info.name}.md).")
    return 0


#: How to get the CRF the IRN family's cam_to_ir_label (and CLIP-ES's CRF eval) use.
CRF_INSTALL = "pip install pydensecrf2 (lpcam's hosts extra: pip install '/path/to/lpcam[hosts]')"


#: The modules each lpcam extra installs for the host code that imports them: ``{extra: {module: pip package}}``
#: (setup.cfg's extras; the host tests skip on the same table).
EXTRA_MODULES = {
    "hosts": {"cv2": "opencv-python-headless", "pydensecrf": "pydensecrf2"},
    "mctformer": {"timm": "timm", "cv2": "opencv-python-headless", "sklearn": "scikit-learn", "pandas": "pandas"},
    "clip-es": {"cv2": "opencv-python-headless", "ttach": "ttach", "lxml": "lxml", "ftfy": "ftfy", "regex": "regex",
                "torchvision": "torchvision"},
}


def require_modules(info: HostInfo, extra: str) -> None:
    """Refuse a try path up front when a module of :data:`EXTRA_MODULES` ``[extra]`` is missing, naming the pip
    packages and the lpcam extra that installs them (lpcam's import-only stand-ins do not count)."""
    missing = {m: p for m, p in EXTRA_MODULES[extra].items() if not hooks.installed(m)}
    if missing:
        raise ValueError(f"{info.title} needs {', '.join(missing)}: pip install {' '.join(missing.values())} "
                         f"(lpcam's {extra} extra: pip install '/path/to/lpcam[{extra}]')")


def lpcam_warnings(output: str) -> list[str]:
    """lpcam's warnings in a host run's output (``[lpcam] WARNING: ...`` lines), in order, once each."""
    return list(dict.fromkeys(line.strip() for line in output.splitlines() if line.startswith("[lpcam] WARNING:")))


def command_line(env: dict[str, str], script: str, argv: list[str]) -> str:
    """``K=V ... python script argv`` as a shell would take it back (quoted where needed)."""
    return shlex.join([*(f"{k}={v}" for k, v in env.items()), "python", script, *argv])


def report(text: str = "") -> None:
    """One line of a ``try`` report, on standard output (the command's result, not a log message)."""
    print(text, flush=True)


def percent(value: float | None) -> str:
    return "?" if value is None else f"{100 * value:.1f}"


def _shims() -> list[str]:
    from .cpu import SHIMS

    return list(SHIMS)


def try_parser(sub: Any, info: HostInfo, *, help: str, description: str, size: int, images: int = 20) -> Any:
    """The ``try`` sub-parser with the arguments every host's try path takes (checkout, work folder, sizes, seed)."""
    p = sub.add_parser("try", help=help, description=description)
    p.add_argument("host_dir", help=f"a {info.title} checkout (never written)")
    p.add_argument("--out", default=f"lpcam_try_{info.name}", help="work folder (default lpcam_try_<host>)")
    p.add_argument("--images", type=int, default=images, help=f"training images (default {images})")
    p.add_argument("--size", type=int, default=size, help=f"image side in pixels (default {size})")
    p.add_argument("--seed", type=int, default=0, help="synthetic data and training seed (default 0)")
    return p


def add_try(sub: Any, info: HostInfo) -> None:
    """The ``try`` step of an IRN-family host's command group."""
    p = try_parser(sub, info, help="the host's pipeline on a small synthetic VOC, CPU, offline, with and without LPCAM",
                   description="Writes a small synthetic VOC and a work folder of links to HOST_DIR (never written) "
                               "with a patched copy of the entry script, then runs the host's own pipeline twice on the "
                               "CPU without any download: LPCAM=0 (training, the host's CAM, its eval, the next step) "
                               "and LPCAM=1 (the swap, the same eval and next step). Prints the commands, the files "
                               "and the host's own mIoU of both runs.", size=64)
    p.add_argument("--epochs", type=int, default=2, help="train_cam epochs (default 2; ReCAM and AMN: 1 epoch of "
                   "their own stage after it)")
    p.set_defaults(func=lambda ns: try_irn(info, ns.host_dir, ns.out, images=ns.images, size=ns.size,
                                           epochs=ns.epochs, seed=ns.seed))


# --------------------------------------------------------------------------- MCTformer


def best_miou(stdout: str) -> float | None:
    """MCTformer's ``evaluation.py --curve True``: ``Best background score: t  mIoU: 43.2%`` (as a fraction)."""
    found = re.findall(r"Best background score: \S+\s+mIoU: ([0-9.]+)%", stdout)
    return float(found[-1]) / 100 if found else None


def try_mctformer(info: HostInfo, host_dir: str, out: str, *, images: int = 20, size: int = 96, epochs: int = 2,
                  model: str | None = None, seed: int = 0, timeout: float = 3600) -> int:
    """The try path for MCTformer: main.py trains, generates (LPCAM=0, then the swap) and evaluation.py scores."""
    from . import cli

    require_modules(info, "mctformer")
    checkout = cli.check_checkout(host_dir, info)
    models_py = (checkout / "models.py").read_text(encoding="utf-8", errors="replace")
    plus = "class MCTformerPlus" in models_py
    model = model or ("deit_small_MCTformerPlus" if plus else "deit_small_MCTformerV2_patch16_224")
    setup = prepare_try(info, host_dir, out, images=images, size=size, seed=seed, marker=info.entry_script)
    out_dir, root, work = setup.out_dir, setup.root, setup.work
    size_flags = ["--input-size", str(size)] if plus else []
    common = ["--model", model, "--img-list", "voc12", "--data-path", str(root), "--device", "cpu", "--num_workers", "0",
              *size_flags]
    gen = ["--data-set", "VOC12MS", "--gen_attention_maps", "--resume", "sess/checkpoint.pth", "--scales", "1.0", "0.75"]
    gen_v2 = [] if plus else ["--visualize-cls-attn", "--patch-attn-refine"]
    steps: list[tuple[str, dict[str, str], str, list[str]]] = [
        ("train (random init: no ImageNet download)", {"LPCAM": "0"}, "main.py",
         [*common, "--data-set", "VOC12", "--epochs", str(epochs), "--batch-size", "4", "--output_dir", "sess",
          "--seed", str(seed)]),
    ]
    for tag, extra in (("own", {"LPCAM": "0"}), ("lpcam", {"LPCAM": "1"})):
        cams = f"result/cam_npy_{tag}"
        steps.append((f"generate, LPCAM={extra['LPCAM']}", extra, "main.py",
                      [*common, *gen, *gen_v2, "--cam-npy-dir", cams, "--attention-dir", f"result/cam_png_{tag}"]))
        steps.append((f"evaluate, LPCAM={extra['LPCAM']}", {}, "evaluation.py",
                      ["--list", "voc12/train_id.txt", "--gt_dir", str(root / "SegmentationClass"), "--predict_dir",
                       cams, "--type", "npy", "--curve", "True", "--comment", f"lpcam try {tag}", "--logfile",
                       f"result/evallog_{tag}.txt"]))
    log = out_dir / "mctformer.log"
    results = {}
    with open(log, "w", encoding="utf-8") as log_file:
        for title, extra_env, name, argv in steps:
            report(f"\n  {title}, in {work} (inside lpcam_adapters.cpu.cuda_as_cpu):\n"
                   f"    {command_line(extra_env, name, argv)}")
            start = time.perf_counter()
            proc = setup.run(name, argv, extra_env, log_file, timeout)
            if proc is None:
                return 2
            report(f"    finished in {time.perf_counter() - start:.0f}s")
            if name == "evaluation.py":
                results[title.split(", ")[1]] = best_miou(proc.stdout)
    report(f"\n  files: weights {work / 'sess' / 'checkpoint.pth'}; maps {work / 'result' / 'cam_npy_own'} and "
           f"{work / 'result' / 'cam_npy_lpcam'}; bank {work / 'sess' / 'checkpoint.lpcam_bank.pt'}; log {log}")
    report("\n  | run | MCTformer evaluation.py best mIoU (%) |\n  |---|---:|")
    for run_name, miou in results.items():
        report(f"  | {run_name} | {percent(miou)} |")
    report(f"\n  A {epochs}-epoch {model} from random weights on synthetic images: these numbers check the plumbing, "
           "not LPCAM's gain. With VOC, the DeiT weights and a GPU, follow docs/hosts/mctformer.md.")
    return 0


def add_try_mctformer(sub: Any, info: HostInfo) -> None:
    """The ``try`` step of ``lpcam mctformer``."""
    p = try_parser(sub, info, help="MCTformer's pipeline on a small synthetic VOC, CPU, offline, with and without LPCAM",
                   description="Writes a small synthetic VOC and a work folder of links to HOST_DIR (never written) "
                               "with a patched copy of main.py, then runs the host as a user would, on the CPU without "
                               "any download: main.py trains from random weights, generates the maps with LPCAM=0 and "
                               "with the swap, and evaluation.py scores both.", size=96)
    p.add_argument("--epochs", type=int, default=2, help="training epochs (default 2)")
    p.add_argument("--model", help="timm model name (default deit_small_MCTformerPlus, or the V2 model in a V2 checkout)")
    p.set_defaults(func=lambda ns: try_mctformer(info, ns.host_dir, ns.out, images=ns.images, size=ns.size,
                                                 epochs=ns.epochs, model=ns.model, seed=ns.seed))

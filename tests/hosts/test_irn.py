"""IRN (jiwoon-ahn/irn @ a2ece00) with `import lpcam_adapters.irn`, run for real on CPU.

Run: ``LPCAM_HOSTS=/work/main/.hosts pytest -m hosts tests/hosts/test_irn.py``.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

pytestmark = [
    pytest.mark.hosts,
    pytest.mark.skipif(not os.environ.get("LPCAM_HOSTS"), reason="LPCAM_HOSTS is not set: host integration tests "
                       "need the host clones (LPCAM_HOSTS=/path/to/.hosts pytest -m hosts tests/hosts)"),
]

OTHER_PASSES_OFF = [  # IRN tests its pass flags with `is True`: any value given turns a pass off
    "--train_cam_pass", "0", "--train_irn_pass", "0", "--make_ins_seg_pass", "0",
    "--eval_ins_seg_pass", "0", "--make_sem_seg_pass", "0", "--eval_sem_seg_pass", "0",
]

RANDOM_WEIGHTS = """
import json, os, torch
import lpcam_adapters.irn
from lpcam_adapters import compat
import net.resnet50_cam
torch.manual_seed(0)
with compat.checkpoint_follows():
    model = net.resnet50_cam.CAM()
os.makedirs("sess", exist_ok=True)
torch.save(model.state_dict(), "sess/res50_cam.pth")
print(json.dumps({"ok": True}))
"""

# IRN's own _work of make_cam, run in-process on CPU: a test-only shim makes .cuda() a no-op.
HOST_REFERENCE = """
import argparse, contextlib, json
import torch
from lpcam_adapters import compat
compat.register_irn_family()  # modern stack only: the host's make_cam itself is not swapped
torch.Tensor.cuda = lambda self, *a, **k: self
torch.nn.Module.cuda = lambda self, *a, **k: self
torch.cuda.device = lambda *a, **k: contextlib.nullcontext()
torch.cuda.device_count = lambda: 1
import net.resnet50_cam, step.make_cam, voc12.dataloader
with compat.checkpoint_follows():
    model = net.resnet50_cam.CAM()
model.load_state_dict(torch.load("sess/res50_cam.pth"), strict=True)
model.eval()
dataset = voc12.dataloader.VOC12ClassificationDatasetMSF("voc12/train_aug.txt", voc12_root={root!r}, scales=(1.0, 0.5, 1.5, 2.0))
import os
import re
os.makedirs("result/cam_host", exist_ok=True)
step.make_cam._work(0, model, [dataset], argparse.Namespace(num_workers=0, cam_out_dir="result/cam_host"))
print()
print(json.dumps({{"written": len(os.listdir("result/cam_host"))}}))
"""


# run_sample.py in-process with test-only CPU shims: IRN's train_irn and make_sem_seg_labels are hard-wired
# to CUDA (.cuda(), cuda.device, DataParallel(...).cuda(), one spawned process per GPU: none on CPU).
CPU_RUN_SAMPLE = """
import contextlib, json, runpy, sys
import torch, torch.multiprocessing
torch.Tensor.cuda = lambda self, *a, **k: self
torch.nn.Module.cuda = lambda self, *a, **k: self
torch.cuda.device = lambda *a, **k: contextlib.nullcontext()
torch.cuda.device_count = lambda: 1
torch.multiprocessing.spawn = lambda fn, args=(), nprocs=1, join=True, **k: [fn(i, *args) for i in range(nprocs)]
sys.argv = ["run_sample.py", *{argv!r}]
runpy.run_path("run_sample.py", run_name="__main__")  # its first line: import lpcam_adapters.irn
import step.make_sem_seg_labels
print()
print(json.dumps({{"collated_numpy": bool(getattr(step.make_sem_seg_labels.np, "__lpcam_collated_asarray__", False))}}))
"""


@pytest.fixture(scope="module")
def irn(tmp_path_factory, synthetic_voc, pycache, hostkit):
    host = hostkit.host_dir("irn")
    before = hostkit.git_status(host)
    work = hostkit.make_workdir(host, "irn", tmp_path_factory.mktemp("irn") / "work", synthetic_voc, pycache)
    (work / "voc12" / "small.txt").write_text("\n".join(synthetic_voc["train"][:3]) + "\n")
    env = hostkit.host_env(pycache)
    hostkit.run_python(RANDOM_WEIGHTS, work, env)
    return {"host": host, "work": work, "env": env, "root": synthetic_voc["root"], "ids": synthetic_voc["train"],
            "before": before, "kit": hostkit}


def run_sample(irn, *flags, **env):
    cmd = [sys.executable, "run_sample.py", "--voc12_root", str(irn["root"]), "--cam_weights_name", "sess/res50_cam",
           *OTHER_PASSES_OFF, *flags]
    return irn["kit"].run(cmd, irn["work"], {**irn["env"], **env}).stdout


@pytest.fixture(scope="module")
def host_maps(irn):
    """IRN's own make_cam maps (its _work, CPU shim) in result/cam_host."""
    out = irn["kit"].run_python(HOST_REFERENCE.format(root=str(irn["root"])), irn["work"], irn["env"])
    assert out["written"] == irn["kit"].NUM_TRAIN
    return irn["work"] / "result" / "cam_host"


def test_lpcam_off_reproduces_irn_maps_bit_for_bit(irn, host_maps):
    stdout = run_sample(irn, "--cam_out_dir", "result/cam_off", "--cam_to_ir_label_pass", "0", LPCAM="0")
    assert "LPCAM=0" in stdout and "'miou'" in stdout  # IRN's eval_cam read every file
    irn["kit"].compare_dirs(irn["work"] / "result" / "cam_off", host_maps, irn["ids"])


def test_lpcam_in_process_feeds_eval_cam_and_cam_to_ir_label(irn, host_maps):
    stdout = run_sample(
        irn, "--cam_out_dir", "result/cam", "--ir_label_out_dir", "result/ir_label",
        "--cam_eval_thres", "0.3", "--conf_fg_thres", "0.45", "--conf_bg_thres", "0.25",
    )
    work = irn["work"]
    assert "LPCAM swap in irn" in stdout and "--cam_eval_thres 0.3" in stdout
    assert "'miou'" in stdout, stdout[-2000:]
    # The baseline went to its own directory and is IRN's own map, bit for bit.
    irn["kit"].compare_dirs(work / "result" / "cam_baseline", host_maps, irn["ids"])
    assert (work / "result" / "lpcam_bank.pt").is_file()
    report = irn["kit"].check_lpcam_maps(work, irn["env"], adapter="irn", weights="sess/res50_cam.pth",
                              bank="result/lpcam_bank.pt", out="result/cam", root=irn["root"])
    assert report["checked"] > 0 and report["worst"] < 1e-5, report
    # IRN's cam_to_ir_label (CRF, pydensecrf2) accepted every file.
    for name in irn["ids"]:
        label = np.asarray(Image.open(work / "result" / "ir_label" / f"{name}.png"))
        assert label.shape == (32, 32) and set(np.unique(label)) <= set(range(21)) | {255}


@pytest.mark.slow  # train_irn, then IRN's EdgeDisplacement on 512x512-padded inputs: about 2 minutes on CPU
def test_lpcam_maps_through_train_irn_make_sem_seg_labels_and_eval_sem_seg(irn):
    """IRN's own train_irn, make_sem_seg_labels and eval_sem_seg (run_sample.py's passes) on LPCAM maps.

    On numpy 2 / torch 2, make_sem_seg_labels fails without lpcam's shim at
    ``[..., :orig_img_size[0], :orig_img_size[1]]`` (``orig_img_size = np.asarray(pack['size'])``
    is [2, 1]: "only integer scalar arrays can be converted to a scalar index").
    """
    work, kit = irn["work"], irn["kit"]
    run_sample(irn, "--cam_out_dir", "result/cam_sem", "--ir_label_out_dir", "result/ir_label_sem",
               "--eval_cam_pass", "0", "--conf_fg_thres", "0.45", "--conf_bg_thres", "0.25",
               LPCAM_BASELINE_DIR="result/cam_baseline")  # shared with the test above
    argv = ["--voc12_root", str(irn["root"]), "--num_workers", "0", "--cam_out_dir", "result/cam_sem",
            "--ir_label_out_dir", "result/ir_label_sem", "--sem_seg_out_dir", "result/sem_seg",
            "--irn_crop_size", "96", "--irn_batch_size", "4", "--irn_num_epoches", "1",
            "--sem_seg_bg_thres", "0.35",  # untyped flag: a string, made a number by lpcam's shim
            "--train_cam_pass", "0", "--make_cam_pass", "0", "--eval_cam_pass", "0", "--cam_to_ir_label_pass", "0",
            "--make_ins_seg_pass", "0", "--eval_ins_seg_pass", "0"]
    proc = kit.run([sys.executable, "-c", CPU_RUN_SAMPLE.format(argv=argv)], work, irn["env"])
    assert "Analyzing displacements mean ... done." in proc.stdout  # train_irn ran and saved its weights
    assert (work / "sess" / "res50_irn.pth").is_file()
    assert "'miou'" in proc.stdout, proc.stdout[-2000:]  # eval_sem_seg read every PNG
    assert '"collated_numpy": true' in proc.stdout.strip().splitlines()[-1]
    for name in irn["ids"]:
        label = np.asarray(Image.open(work / "result" / "sem_seg" / f"{name}.png"))
        keys = np.load(work / "result" / "cam_sem" / f"{name}.npy", allow_pickle=True).item()["keys"]
        assert label.shape == (32, 32) and set(np.unique(label).tolist()) <= {0} | set((keys + 1).tolist())


def test_lpcam_two_spawned_workers(irn, tmp_path):
    work = irn["work"]
    # Half of the baseline is there already: the spawned workers compute the other half.
    baseline = work / "result" / "cam_spawn_baseline"
    baseline.mkdir(parents=True)
    for name in irn["ids"][::2]:
        shutil.copyfile(work / "result" / "cam_host" / f"{name}.npy", baseline / f"{name}.npy")
    config = tmp_path / "lpcam.yaml"
    config.write_text("preset: voc\nnum_clusters: 3\ncontext_low: 0.0\nadapter:\n  bank: result/bank_spawn.pt\n")
    stdout = run_sample(
        irn, "--cam_out_dir", "result/cam_spawn", "--eval_cam_pass", "0", "--cam_to_ir_label_pass", "0",
        LPCAM_WORKERS="2", LPCAM_CONFIG=str(config),
    )
    assert stdout.count("spawning 2 workers") == 1  # one pass: baselines, bank and maps in the 2 processes
    half, total = len(irn["ids"]) // 2, len(irn["ids"])
    # the bank loop writes the missing baselines and pools the same backbone pass
    assert f"prototype images: {half} baseline CAMs written" in stdout and f"{total - half} read back" in stdout
    for name in irn["ids"][1::2]:  # IRN's maps, up to the rounding of another CPU thread count
        a = np.load(baseline / f"{name}.npy", allow_pickle=True).item()
        b = np.load(work / "result" / "cam_host" / f"{name}.npy", allow_pickle=True).item()
        assert torch.equal(a["keys"], b["keys"]) and a["cam"].shape == b["cam"].shape
        np.testing.assert_allclose(a["high_res"], b["high_res"], atol=2e-2)
    bank = torch.load(work / "result" / "bank_spawn.pt", weights_only=True)
    assert bank["meta"]["config"]["num_clusters"] == 3
    assert sum(v.shape[0] for v in bank["context"].values()) > 0  # the subtraction path is exercised
    threads = max(1, (os.cpu_count() or 1) // 2)  # what each of the 2 CPU workers uses
    report = irn["kit"].check_lpcam_maps(work, irn["env"], adapter="irn", weights="sess/res50_cam.pth",
                                         bank="result/bank_spawn.pt", out="result/cam_spawn", root=irn["root"],
                                         threads=threads)
    assert report["checked"] > 0 and report["worst"] < 1e-5, report


def test_bank_reused_then_rebuilt_when_settings_change(irn):
    flags = ("--train_list", "voc12/small.txt", "--cam_out_dir", "result/cam_small", "--eval_cam_pass", "0",
             "--cam_to_ir_label_pass", "0")
    env = {"LPCAM_BANK": "result/bank_small.pt", "LPCAM_PROTO_LIST": "voc12/small.txt"}
    first = run_sample(irn, *flags, **env)
    assert "saved PrototypeBank" in first and "3 written, 0 already complete, 3 ids" in first
    again = run_sample(irn, *flags, **env)
    assert "reusing the prototype bank" in again and "baseline CAMs written" not in again  # no baseline pass
    changed = run_sample(irn, *flags, **env, LPCAM_K="2")
    assert "rebuilding the prototype bank" in changed and "num_clusters" in changed
    # LPCAM_AMP=1 through the import: the same bank serves it (the prototype stage stays float32); the
    # maps directory is rewritten and records the precision
    amp = run_sample(irn, *flags, **env, LPCAM_K="2", LPCAM_AMP="1")
    assert "reusing the prototype bank" in amp and "3 written, 0 already complete, 3 ids" in amp
    assert json.loads((irn["work"] / "result" / "cam_small" / "lpcam_maps.json").read_text())["amp"] == "bfloat16"


def test_cli_prototypes_then_make(irn):
    """`lpcam irn prototypes` and `lpcam irn make` write the same kind of files as the import."""
    work, kit = irn["work"], irn["kit"]
    lpcam = [sys.executable, "-m", "lpcam_core.cli"]
    common = ["--host", str(work), "--voc12-root", str(irn["root"]), "--weights", str(work / "sess" / "res50_cam.pth")]
    env = {**irn["env"], "LPCAM_K": "2"}
    kit.run([*lpcam, "irn", "prototypes", *common, "--list", "voc12/small.txt", "--bank", str(work / "cli" / "bank.pt")],
            work, env)
    assert (work / "cli" / "bank.pt").is_file() and len(list((work / "cli" / "bank_baseline").glob("*.npy"))) == 3
    kit.run([*lpcam, "irn", "make", *common, "--list", "voc12/small.txt", "--bank", str(work / "cli" / "bank.pt"),
             "--out", str(work / "cli" / "cam")], work, env)
    report = kit.check_lpcam_maps(work, irn["env"], adapter="irn", weights="sess/res50_cam.pth", bank="cli/bank.pt",
                                  out="cli/cam", root=irn["root"], image_list="voc12/small.txt")
    assert report["checked"] > 0 and report["worst"] < 1e-5, report
    # --amp: the same bank, the maps pass's backbone under bfloat16 autocast; recorded, close, not equal
    kit.run([*lpcam, "irn", "make", *common, "--list", "voc12/small.txt", "--bank", str(work / "cli" / "bank.pt"),
             "--out", str(work / "cli" / "cam_amp"), "--amp"], work, env)
    assert json.loads((work / "cli" / "cam_amp" / "lpcam_maps.json").read_text())["amp"] == "bfloat16"
    assert "amp" not in json.loads((work / "cli" / "cam" / "lpcam_maps.json").read_text())
    def high_res(folder: str, image_id: str) -> np.ndarray:
        return np.load(work / "cli" / folder / f"{image_id}.npy", allow_pickle=True).item()["high_res"]

    diffs = [float(np.abs(high_res("cam_amp", i) - high_res("cam", i)).max())
             for i in (work / "voc12" / "small.txt").read_text().split()]
    assert 0 < max(diffs) < 0.1, diffs


def test_cli_never_writes_where_it_reads(irn, tmp_path):
    """Second adversarial round: prototypes' baseline dir in JPEGImages, a bank over the checkpoint, a relative
    --voc12-root from another directory, make --overwrite into a bank's baseline dir: refused, nothing changed."""
    import hashlib

    work, kit = irn["work"], irn["kit"]
    lpcam = [sys.executable, "-m", "lpcam_core.cli"]
    images = irn["root"] / "JPEGImages"
    weights = tmp_path / "w.pth"
    weights.write_bytes((work / "sess" / "res50_cam.pth").read_bytes())
    common = ["--host", str(work), "--voc12-root", str(irn["root"]), "--weights", str(weights),
              "--list", "voc12/small.txt", "--scales", "1.0"]

    def digest():
        return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in [*images.iterdir(), weights]}

    before = digest()
    env = {**irn["env"], "LPCAM_K": "2"}
    cases = [
        [*lpcam, "irn", "prototypes", *common, "--bank", str(tmp_path / "b.pt"), "--baseline-dir", str(images)],
        [*lpcam, "irn", "prototypes", *common, "--bank", str(weights)],
    ]
    for cmd in cases:
        proc = subprocess.run(cmd, cwd=work, env=env, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1, proc.stderr[-2000:]
    sub = tmp_path / "a" / "b"
    sub.mkdir(parents=True)
    relative = os.path.relpath(irn["root"], sub)
    proc = subprocess.run([*lpcam, "irn", "make", "--host", str(work), "--voc12-root", relative, "--weights",
                           str(weights), "--list", "voc12/small.txt", "--baseline", "--out", str(images)],
                          cwd=sub, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 2 and "same directory" in proc.stderr, proc.stderr[-2000:]
    assert digest() == before and not [p for p in images.iterdir() if p.suffix != ".jpg"]
    # a bank's baseline directory (moved by LPCAM_BASELINE_DIR for make) is never overwritten by maps
    bank = tmp_path / "ok.pt"
    kit.run([*lpcam, "irn", "prototypes", *common, "--bank", str(bank)], work, env)
    baseline = tmp_path / "ok_baseline"
    kept = {p.name: p.read_bytes() for p in baseline.iterdir()}
    proc = subprocess.run([*lpcam, "irn", "make", *common, "--bank", str(bank), "--out", str(baseline), "--overwrite"],
                          cwd=work, env={**env, "LPCAM_BASELINE_DIR": str(tmp_path / "elsewhere")},
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 2 and "baseline CAMs" in proc.stderr, proc.stderr[-2000:]
    assert {p.name: p.read_bytes() for p in baseline.iterdir()} == kept


def test_irn_checkout_untouched(irn):
    assert irn["kit"].git_status(irn["host"]) == irn["before"]
    assert irn["before"] == "", f"the IRN checkout was not clean before the tests:\n{irn['before']}"


def torchrun_cli(nproc: int) -> list[str]:
    """``torchrun --nproc_per_node nproc -m lpcam_core.cli`` (a free rendezvous port)."""
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
            "-m", "lpcam_core.cli"]


@pytest.mark.slow  # eight CLI processes, some under torchrun: about a minute on 2 CPU cores
def test_cli_under_torchrun_equals_one_process(irn):
    """`lpcam irn prototypes|make` under torchrun with 1 and 2 processes: the bank and the map files equal
    the plain CLI's, bit for bit; a rerun keeps complete files and reuses the bank."""
    from lpcam_core import PrototypeBank

    work, kit = irn["work"], irn["kit"]
    ids = irn["ids"][:7]  # odd: the two ranks get 4 and 3 images
    (work / "voc12" / "seven.txt").write_text("\n".join(ids) + "\n")
    common = ["--host", str(work), "--voc12-root", str(irn["root"]), "--weights", str(work / "sess" / "res50_cam.pth"),
              "--list", "voc12/seven.txt"]
    env = {**irn["env"], "LPCAM_K": "2", "OMP_NUM_THREADS": "1"}  # one thread everywhere: identical CPU rounding
    runs = {"plain": [sys.executable, "-m", "lpcam_core.cli"], "tr1": torchrun_cli(1), "tr2": torchrun_cli(2)}
    for name, launch in runs.items():
        out = work / "torchrun" / name
        kit.run([*launch, "irn", "prototypes", *common, "--bank", str(out / "bank.pt")], work, env)
        kit.run([*launch, "irn", "make", *common, "--bank", str(out / "bank.pt"), "--out", str(out / "cam")], work, env)
    root = work / "torchrun"
    plain = PrototypeBank.load(root / "plain" / "bank.pt")
    for name in ("tr1", "tr2"):
        kit.compare_dirs(root / name / "bank_baseline", root / "plain" / "bank_baseline", ids)
        kit.compare_dirs(root / name / "cam", root / "plain" / "cam", ids)
        bank = PrototypeBank.load(root / name / "bank.pt")
        assert bank.classes == plain.classes and plain.classes
        for key in plain.classes:
            assert torch.equal(bank.foreground[key], plain.foreground[key])
            assert torch.equal(bank.context[key], plain.context[key])
        # pool_peak_bytes is what one process held: the same with 1 process, less with 2
        peak = bank.meta.pop("pool_peak_bytes")
        assert (peak == plain.meta["pool_peak_bytes"]) if name == "tr1" else (0 < peak < plain.meta["pool_peak_bytes"])
        assert bank.meta == {k: v for k, v in plain.meta.items() if k != "pool_peak_bytes"}
    assert (root / "tr1" / "bank.pt").read_bytes() == (root / "plain" / "bank.pt").read_bytes()

    # rerun with 2 processes: the bank is reused, complete map files are kept, a missing one is written
    (root / "tr2" / "cam" / f"{ids[3]}.npy").unlink()
    again = kit.run([*runs["tr2"], "irn", "prototypes", *common, "--bank", str(root / "tr2" / "bank.pt")], work, env)
    assert "reusing the prototype bank" in again.stderr
    again = kit.run([*runs["tr2"], "irn", "make", *common, "--bank", str(root / "tr2" / "bank.pt"),
                     "--out", str(root / "tr2" / "cam")], work, env)
    assert "1 written, 6 already complete, 7 ids, 2 process(es)" in again.stderr, again.stderr[-3000:]
    assert again.stderr.count("LPCAM maps of 7 images written") == 1  # rank 0 only
    kit.compare_dirs(root / "tr2" / "cam", root / "plain" / "cam", ids)


def test_pipeline_benchmark_smoke(irn, tmp_path):
    """benchmarks/pipeline.py --smoke on the IRN checkout: every stage runs and the table has its ratios."""
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    release = os.path.join(os.environ["LPCAM_HOSTS"], "LPCAM")
    cmd = [sys.executable, os.path.join(root, "benchmarks", "pipeline.py"), "--host", str(irn["host"]), "--smoke",
           "--amp", "--json", str(tmp_path / "pipeline.json")]
    if os.path.isdir(release):
        cmd += ["--release", release]
    proc = subprocess.run(cmd, cwd=tmp_path, env=irn["env"], capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for row in ("baseline CAM pass", "prototype stage", "maps stage", "whole pipeline", "backbone passes per image",
                "maps stage / lpcam baseline CAM pass", "lpcam pipeline / host's CAM pass", "maps stage with --amp",
                "maps stage --amp / maps stage float32"):
        assert row in proc.stdout, proc.stdout
    result = json.loads((tmp_path / "pipeline.json").read_text())
    lp = result["results"]["lpcam"]
    assert lp["prototypes"] > 0 and all(lp[k] > 0 for k in ("cam_a", "bank", "maps", "maps_amp", "cam_b", "host_a",
                                                            "host_b"))
    assert 0 < lp["amp_max_abs_diff"] < 0.5  # the --amp maps differ from the float32 ones, as bfloat16 features do


@pytest.mark.slow  # trains IRN's ResNet-50 for one epoch on 20 tiny images, then both passes: about 3 minutes
def test_try_runs_the_readme_host_path(irn, tmp_path):
    """`lpcam irn try <checkout>`: the README's host path (patched run_sample.py, train_cam, make_cam, eval_cam,
    cam_to_ir_label) with LPCAM=0 and with the swap, offline on CPU; files and IRN's own mIoU printed."""
    stdout, rows = irn["kit"].run_try("irn", irn["host"], tmp_path / "try", irn["env"])
    assert all(re.search(r"\| \d+\.\d \|", r) for r in rows), stdout  # IRN's own mIoU
    work = tmp_path / "try" / "work"
    ids = (work / "voc12" / "train_aug.txt").read_text().split()
    for folder in ("cam_own", "cam", "cam_baseline"):
        assert len(list((work / "result" / folder).glob("*.npy"))) == len(ids), folder
    assert (work / "result" / "lpcam_bank.pt").is_file() and (work / "sess" / "res50_cam.pth.pth").is_file()
    assert len(list((work / "result" / "ir_label").glob("*.png"))) == len(ids)
    assert irn["kit"].git_status(irn["host"]) == irn["before"]

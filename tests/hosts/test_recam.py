"""ReCAM (zhaozhengChen/ReCAM) with `import lpcam_adapters.recam`, run for real on CPU.

Run: ``LPCAM_HOSTS=/work/main/.hosts pytest -m hosts tests/hosts/test_recam.py``.
"""

from __future__ import annotations

import os
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

RANDOM_WEIGHTS = """
import json, os, torch
import lpcam_adapters.recam
from lpcam_adapters import compat
import net.resnet50_cam as net
with compat.checkpoint_follows():
    torch.manual_seed(0)
    cam = net.CAM()
    torch.manual_seed(1)
    recam = net.CAM()
torch.manual_seed(2)
predictor = net.Class_Predictor(20, 2048)
os.makedirs("ws/recam_weight", exist_ok=True)
torch.save(cam.state_dict(), "ws/res50_cam.pth")
torch.save(recam.state_dict(), "ws/recam_weight/res50_recam_4.pth")
torch.save(predictor.state_dict(), "ws/recam_weight/recam_predictor_4.pth")
print(json.dumps({"ok": True}))
"""

# ReCAM's own _work of make_recam, run in-process on CPU: a test-only shim makes .cuda() a no-op.
HOST_REFERENCE = """
import argparse, contextlib, json, os
import torch
from lpcam_adapters import compat
compat.register_irn_family()  # modern stack only (and torch.load on CPU inside _work)
torch.Tensor.cuda = lambda self, *a, **k: self
torch.nn.Module.cuda = lambda self, *a, **k: self
torch.cuda.device = lambda *a, **k: contextlib.nullcontext()
torch.cuda.device_count = lambda: 1
import net.resnet50_cam, step.make_recam, voc12.dataloader
with compat.checkpoint_follows():
    model = net.resnet50_cam.CAM()
model.load_state_dict(torch.load("ws/recam_weight/res50_recam_4.pth"))
model.eval()
dataset = voc12.dataloader.VOC12ClassificationDatasetMSF("voc12/train_aug.txt", voc12_root={root!r}, scales=(1.0, 0.5, 1.5, 2.0))
os.makedirs("ws/cam_host", exist_ok=True)
args = argparse.Namespace(num_workers=0, cam_out_dir="ws/cam_host", recam_weight_dir="ws/recam_weight", recam_num_epoches=4)
step.make_recam._work(0, model, [dataset], args)
print()
print(json.dumps({{"written": len(os.listdir("ws/cam_host"))}}))
"""


@pytest.fixture(scope="module")
def recam(tmp_path_factory, synthetic_voc, pycache, hostkit):
    host = hostkit.host_dir("ReCAM")
    before = hostkit.git_status(host)
    work = hostkit.make_workdir(host, "recam", tmp_path_factory.mktemp("recam") / "work", synthetic_voc, pycache)
    (work / "voc12" / "small.txt").write_text("\n".join(synthetic_voc["train"][:3]) + "\n")
    env = hostkit.host_env(pycache)
    hostkit.run_python(RANDOM_WEIGHTS, work, env)
    return {"host": host, "work": work, "env": env, "root": synthetic_voc["root"], "ids": synthetic_voc["train"],
            "before": before, "kit": hostkit}


def run_sample(recam, *flags, **env):
    cmd = [sys.executable, "run_sample.py", "--voc12_root", str(recam["root"]), "--work_space", "ws",
           "--num_workers", "1", *flags]
    return recam["kit"].run(cmd, recam["work"], {**recam["env"], **env}).stdout


@pytest.fixture(scope="module")
def host_maps(recam):
    out = recam["kit"].run_python(HOST_REFERENCE.format(root=str(recam["root"])), recam["work"], recam["env"])
    assert out["written"] == recam["kit"].NUM_TRAIN
    return recam["work"] / "ws" / "cam_host"


def test_make_recam_lpcam_off_reproduces_recam_bit_for_bit(recam, host_maps):
    stdout = run_sample(recam, "--make_recam_pass", "True", "--eval_cam_pass", "True", "--cam_out_dir", "cam_off",
                        LPCAM="0")
    assert "LPCAM=0" in stdout and "miou:" in stdout
    recam["kit"].compare_dirs(recam["work"] / "ws" / "cam_off", host_maps, recam["ids"])


def test_make_recam_lpcam_feeds_eval_cam_and_cam_to_ir_label(recam, host_maps):
    stdout = run_sample(
        recam, "--make_recam_pass", "True", "--eval_cam_pass", "True", "--cam_to_ir_label_pass", "True",
        "--cam_eval_thres", "0.3", "--conf_fg_thres", "0.45", "--conf_bg_thres", "0.25",
    )
    work = recam["work"] / "ws"
    assert "LPCAM swap in recam" in stdout and "miou:" in stdout
    recam["kit"].compare_dirs(work / "cam_mask_recam_baseline", host_maps, recam["ids"])
    bank = torch.load(work / "lpcam_bank_recam.pt", weights_only=True)
    assert bank["meta"]["recam_classifier"] == "cls" and bank["meta"]["recam_backbone"] == "recam"
    report = recam["kit"].check_lpcam_maps(recam["work"], recam["env"], adapter="recam",
                                           weights="ws/recam_weight/res50_recam_4.pth", bank="ws/lpcam_bank_recam.pt",
                                           out="ws/cam_mask", root=recam["root"])
    assert report["checked"] > 0 and report["worst"] < 1e-5, report
    for name in recam["ids"]:
        label = np.asarray(Image.open(work / "ir_label" / f"{name}.png"))
        assert label.shape == (32, 32) and set(np.unique(label)) <= set(range(21)) | {255}


def test_plain_make_cam_in_spawned_workers_and_the_classifier_setting(recam):
    # ReCAM's plain make_cam (its weights path has no IRN-style '.pth' suffix) in 2 spawned workers,
    # on a 3-image list clustered from a 3-image prototype list.
    small = {"LPCAM_PROTO_LIST": "voc12/small.txt", "LPCAM_K": "3"}
    flags = ("--train_list", "voc12/small.txt")
    stdout = run_sample(recam, "--make_cam_pass", "True", "--cam_out_dir", "cam_plain", *flags, LPCAM_WORKERS="2", **small)
    assert stdout.count("spawning 2 workers") == 1  # one pass: baselines, bank and maps in the 2 processes
    work = recam["work"] / "ws"
    assert (work / "lpcam_bank.pt").is_file() and len(list((work / "cam_plain_baseline").glob("*.npy"))) == 3
    report = recam["kit"].check_lpcam_maps(recam["work"], recam["env"], adapter="recam", weights="ws/res50_cam.pth",
                                           bank="ws/lpcam_bank.pt", out="ws/cam_plain", root=recam["root"],
                                           image_list="voc12/small.txt", threads=max(1, (os.cpu_count() or 1) // 2))
    assert report["checked"] > 0 and report["worst"] < 1e-5, report
    # make_recam with W_recam * W_cls scoring the prototypes instead of the default W_cls.
    run_sample(recam, "--make_recam_pass", "True", "--cam_out_dir", "cam_prod", *flags, LPCAM_CLASSIFIER="recam",
               LPCAM_BANK="ws/bank_prod.pt", **small)
    bank = torch.load(work / "bank_prod.pt", weights_only=True)
    assert bank["meta"]["recam_classifier"] == "recam" and len(list((work / "cam_prod").glob("*.npy"))) == 3


def test_recam_checkout_untouched(recam):
    assert recam["kit"].git_status(recam["host"]) == recam["before"]
    assert recam["before"] == "", f"the ReCAM checkout was not clean before the tests:\n{recam['before']}"


@pytest.mark.slow  # five CLI processes, three under torchrun: about a minute on 2 CPU cores
def test_cli_under_torchrun_equals_one_process(recam):
    """`lpcam recam prototypes|make` (ReCAM's forward2 maps) in 2 torchrun processes: the bank, the
    baseline files and the LPCAM files equal the plain CLI's, bit for bit; `make --baseline` as well."""
    from lpcam_core import PrototypeBank

    work, kit = recam["work"], recam["kit"]
    ids = recam["ids"][:5]
    (work / "voc12" / "five.txt").write_text("\n".join(ids) + "\n")
    common = ["--host", str(work), "--voc12-root", str(recam["root"]), "--recam-weight-dir", "ws/recam_weight",
              "--list", "voc12/five.txt"]
    env = {**recam["env"], "LPCAM_K": "2", "OMP_NUM_THREADS": "1"}  # one thread everywhere: identical CPU rounding
    root = work / "ws" / "torchrun"
    launchers = {"plain": [sys.executable, "-m", "lpcam_core.cli"],
                 "tr2": [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                         "-m", "lpcam_core.cli"]}
    for name, launch in launchers.items():
        bank = str(root / name / "bank.pt")
        kit.run([*launch, "recam", "prototypes", *common, "--bank", bank], work, env)
        kit.run([*launch, "recam", "make", *common, "--bank", bank, "--out", str(root / name / "cam")], work, env)
    kit.run([*launchers["tr2"], "recam", "make", *common, "--baseline", "--out", str(root / "tr2" / "base")], work, env)
    kit.compare_dirs(root / "tr2" / "bank_baseline", root / "plain" / "bank_baseline", ids)
    kit.compare_dirs(root / "tr2" / "base", root / "plain" / "bank_baseline", ids)
    kit.compare_dirs(root / "tr2" / "cam", root / "plain" / "cam", ids)
    a, b = PrototypeBank.load(root / "tr2" / "bank.pt"), PrototypeBank.load(root / "plain" / "bank.pt")
    assert a.classes == b.classes and b.classes
    for key in b.classes:
        assert torch.equal(a.foreground[key], b.foreground[key]) and torch.equal(a.context[key], b.context[key])
    assert a.meta["recam_classifier"] == "cls"
    a.meta.pop("pool_peak_bytes"), b.meta.pop("pool_peak_bytes")
    assert a.meta == b.meta


@pytest.mark.slow
def test_try_runs_recams_pipeline(recam, tmp_path):
    """`lpcam recam try <checkout>`: train_cam, train_recam, make_recam, eval_cam, cam_to_ir_label with LPCAM=0,
    then the swapped make_recam with the same eval and next step, offline on the CPU; the checkout untouched."""
    import re

    stdout, rows = recam["kit"].run_try("recam", recam["host"], tmp_path / "try", recam["env"])
    assert all(re.search(r"\| \d+\.\d \|", r) for r in rows), stdout  # ReCAM's own mIoU
    ws = tmp_path / "try" / "work" / "ws"
    ids = (tmp_path / "try" / "work" / "voc12" / "train_aug.txt").read_text().split()
    for folder in ("cam_own", "cam"):
        assert len(list((ws / folder).glob("*.npy"))) == len(ids), folder
    assert (ws / "recam_weight" / "res50_recam_1.pth").is_file() and list(ws.glob("lpcam_bank*.pt"))
    assert recam["kit"].git_status(recam["host"]) == recam["before"]

"""AMN (gaviotas/AMN, branch voc12) with `import lpcam_adapters.amn`, run for real on CPU.

Random-init weights on the synthetic VOC-layout set of ``conftest.py`` (20 train images, 32x32):
the numbers mean nothing, the plumbing is real. Stage (a) (IRN's make_cam + cam_to_ir_label) runs
once for the module; every stage-(b) test then runs AMN's own ``run_sample.py`` (a patched copy)
in a work directory of symlinks, so the checkout stays untouched.

Run: ``LPCAM_HOSTS=/work/main/.hosts pytest -m hosts tests/hosts/test_amn.py``.
"""

from __future__ import annotations

import os
import shutil
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

SCALES = (1.0, 0.5, 1.5, 2.0)  # AMN's default --cam_scales

RANDOM_WEIGHTS = """
import json, os, torch
import lpcam_adapters.amn
from lpcam_adapters import compat
import net.resnet50_cam, net.resnet50_amn
torch.manual_seed(0)
with compat.checkpoint_follows():
    cam = net.resnet50_cam.CAM()
    amn = net.resnet50_amn.CAM()
os.makedirs("sess", exist_ok=True)
torch.save(cam.state_dict(), "sess/res50_cam.pth")
torch.save(amn.state_dict(), "sess/res50_amn.pth")
print(json.dumps({"ok": True}))
"""

# AMN's own _work of make_amn_cam, run in-process on CPU: test-only shims make .cuda() a no-op.
# dropout=False switches AMN's Dropout module to eval (the adapter's rule); True keeps AMN's behaviour.
HOST_REFERENCE = """
import argparse, contextlib, json, os
import torch
from lpcam_adapters import compat
compat.register_irn_family()  # modern stack only: make_amn_cam itself is not swapped
torch.Tensor.cuda = lambda self, *a, **k: self
torch.nn.Module.cuda = lambda self, *a, **k: self
torch.cuda.device = lambda *a, **k: contextlib.nullcontext()
torch.cuda.device_count = lambda: 1
import net.resnet50_amn, step.make_amn_cam, voc12.dataloader
with compat.checkpoint_follows():
    model = net.resnet50_amn.CAM()
model.load_state_dict(torch.load("sess/res50_amn.pth"), strict=True)
model.eval()
if not {dropout!r}:
    model.classifier[0].eval()
torch.manual_seed({seed!r})
dataset = voc12.dataloader.VOC12ClassificationDatasetMSF("voc12/train_aug.txt", voc12_root={root!r}, scales={scales!r})
os.makedirs({out!r}, exist_ok=True)
step.make_amn_cam._work(0, model, [dataset], argparse.Namespace(num_workers=0, ir_label_out_dir="result/ir_label",
                                                                amn_cam_out_dir={out!r}))
print()
print(json.dumps({{"written": len(os.listdir({out!r}))}}))
"""

# Every stage-(b) file equals the core's lpcam_multiscale (channels 1..n) on features computed here.
CHECK_AMN_MAPS = """
import argparse, json, os
import numpy as np, torch
import lpcam_adapters.amn as amn
from lpcam_core import PrototypeBank, lpcam_multiscale
import voc12.dataloader as loader

model = amn.load_amn_model(argparse.Namespace(amn_network="net.resnet50_amn", amn_weights_name="sess/res50_amn"))
bank = PrototypeBank.load({bank!r})
conditioned = bank.meta["amn_choices"]["features"] == "conditioned"
dataset = loader.VOC12ClassificationDatasetMSF({plist!r}, voc12_root={root!r}, scales={scales!r})
worst, checked, zero, bg = 0.0, 0, 0, 0.0
with torch.no_grad():
    for i in range(len(dataset)):
        pack = dataset[i]
        label = pack["label"]
        keys = torch.nonzero(label)[:, 0]
        feats = [amn.amn_features(model, torch.from_numpy(x), label, conditioned) for x in pack["img"]]
        got = np.load(os.path.join({out!r}, pack["name"] + ".npy"), allow_pickle=True).item()
        assert set(got) == {{"keys", "cam", "high_res"}}, set(got)
        assert isinstance(got["keys"], torch.Tensor) and got["keys"].dtype == torch.int64
        assert isinstance(got["cam"], torch.Tensor) and got["cam"].dtype == torch.float32
        assert isinstance(got["high_res"], np.ndarray) and got["high_res"].dtype == np.float32
        h, w = pack["size"]
        n = len(keys)
        assert got["high_res"].shape == (1 + n, h, w) and got["cam"].shape == (1 + n, (h + 3) // 4, (w + 3) // 4)
        assert torch.equal(got["keys"], keys)
        known = [k for k in keys.tolist() if k in bank.foreground]
        ref = lpcam_multiscale(feats, bank, known, (h, w)) if known else None
        for j, k in enumerate(keys.tolist()):
            if k in known:
                r = known.index(k)
                worst = max(worst, float(np.abs(got["high_res"][1 + j] - ref["high_res"][r]).max()),
                            float((got["cam"][1 + j] - ref["cam"][r]).abs().max()))
                checked += 1
            else:
                assert not got["high_res"][1 + j].any()
                zero += 1
        bg = max(bg, float(np.abs(got["high_res"][0] - (1 - got["high_res"][1:].max(0))).max()))
print(json.dumps({{"worst": worst, "checked": checked, "zero": zero, "background": bg}}))
"""

# make_sem_seg_labels (AMN's copy of IRN's random walk) on the adapter's files, CPU shims only.
SEM_SEG = """
import argparse, contextlib, json, os
import numpy as np, torch
from lpcam_adapters import compat
compat.register_irn_family()
torch.Tensor.cuda = lambda self, *a, **k: self
torch.nn.Module.cuda = lambda self, *a, **k: self
torch.cuda.device = lambda *a, **k: contextlib.nullcontext()
torch.cuda.device_count = lambda: 1
import net.resnet50_irn, step.make_sem_seg_labels, voc12.dataloader
assert step.make_sem_seg_labels.np.__lpcam_collated_asarray__  # lpcam's shim: np.asarray(pack['size']) is [h, w]
torch.manual_seed(0)
with compat.checkpoint_follows():
    model = net.resnet50_irn.EdgeDisplacement()
model.eval()
dataset = voc12.dataloader.VOC12ClassificationDatasetMSF("voc12/train.txt", voc12_root={root!r}, scales=(1.0,))
os.makedirs({out!r}, exist_ok=True)
args = argparse.Namespace(num_workers=0, amn_cam_out_dir={cams!r}, sem_seg_out_dir={out!r}, beta=10, exp_times=8,
                          sem_seg_bg_thres=0.25)
step.make_sem_seg_labels._work(0, model, [dataset], args)
print()
print(json.dumps({{"written": len(os.listdir({out!r}))}}))
"""

CONFIG = "preset: voc\nnum_clusters: 3\ncontext_low: 0.0\n"  # small K; context prototypes always exercised


@pytest.fixture(scope="module")
def amn(tmp_path_factory, synthetic_voc, pycache, hostkit):
    """Work directory with random weights and stage (a) done (LPCAM maps, bank, ir_label PNGs)."""
    from lpcam_adapters import amn as amn_adapter
    from lpcam_adapters import cli, irn_family

    host = hostkit.host_dir("AMN")
    if not (host / "step" / "make_amn_cam.py").is_file():
        pytest.skip(f"{host} is not an AMN checkout (branch voc12)")
    before = hostkit.git_status(host)
    base = tmp_path_factory.mktemp("amn")
    work = irn_family.prepare_workdir(host, base / "work", cls_labels=synthetic_voc["cls_labels"],
                                       lists={"train.txt": synthetic_voc["train"], "train_aug.txt": synthetic_voc["train"]})
    script = work / "run_sample.py"
    script.unlink()
    shutil.copyfile(host / "run_sample.py", script)
    assert cli.patch_entry_script(work, amn_adapter.INFO) == "applied"
    assert cli.patch_entry_script(work, amn_adapter.INFO) == "already applied"
    (work / "voc12" / "small.txt").write_text("\n".join(synthetic_voc["train"][:3]) + "\n")
    config = base / "lpcam.yaml"
    config.write_text(CONFIG)
    env = hostkit.host_env(pycache, LPCAM_CONFIG=str(config), OMP_NUM_THREADS="1")
    hostkit.run_python(RANDOM_WEIGHTS, work, env)
    ctx = {"host": host, "work": work, "env": env, "root": synthetic_voc["root"], "ids": synthetic_voc["train"],
           "before": before, "kit": hostkit, "config": config}
    ctx["stage_a"] = run_sample(ctx, "--make_cam_pass", "True", "--cam_to_ir_label_pass", "True",
                                "--conf_fg_thres", "0.30", "--conf_bg_thres", "0.05")
    return ctx


def run_sample(amn, *flags, **env):
    cmd = [sys.executable, "run_sample.py", "--voc12_root", str(amn["root"]), "--num_workers", "1",
           "--cam_weights_name", "sess/res50_cam", "--amn_weights_name", "sess/res50_amn", *flags]
    return amn["kit"].run(cmd, amn["work"], {**amn["env"], **env}).stdout


def check_maps(amn, bank: str, out: str, plist: str = "voc12/train_aug.txt") -> dict:
    code = CHECK_AMN_MAPS.format(bank=bank, out=out, plist=plist, root=str(amn["root"]), scales=SCALES)
    return amn["kit"].run_python(code, amn["work"], amn["env"])


@pytest.fixture(scope="module")
def stage_b(amn):
    """Stage (b) swapped, in-process (0 GPU), followed by AMN's own eval and ir_label steps."""
    stdout = run_sample(amn, "--make_amn_cam_pass", "True", "--eval_amn_cam_pass", "True",
                        "--amn_cam_to_ir_label_pass", "True")
    return stdout


@pytest.fixture(scope="module")
def host_maps(amn):
    """AMN's own make_amn_cam maps (its _work, CPU shim), Dropout switched off: result/amn_cam_host."""
    code = HOST_REFERENCE.format(dropout=False, seed=0, root=str(amn["root"]), scales=SCALES, out="result/amn_cam_host")
    out = amn["kit"].run_python(code, amn["work"], amn["env"])
    assert out["written"] == amn["kit"].NUM_TRAIN
    return amn["work"] / "result" / "amn_cam_host"


def test_stage_a_is_the_irn_pass(amn):
    work = amn["work"]
    assert "LPCAM swap in amn (stage a)" in amn["stage_a"]
    assert (work / "result" / "lpcam_bank.pt").is_file()
    report = amn["kit"].check_lpcam_maps(work, amn["env"], adapter="amn", weights="sess/res50_cam.pth",
                                         bank="result/lpcam_bank.pt", out="result/cam", root=amn["root"])
    assert report["checked"] > 0 and report["worst"] < 1e-5, report
    for name in amn["ids"]:  # AMN's (IRN's) cam_to_ir_label accepted every file
        label = np.asarray(Image.open(work / "result" / "ir_label" / f"{name}.png"))
        assert label.shape == (32, 32) and set(np.unique(label)) <= set(range(21)) | {255}


def test_stage_b_files_feed_amns_own_consumers(amn, stage_b):
    work = amn["work"]
    assert "LPCAM swap in AMN stage (b)" in stage_b and "features=conditioned" in stage_b
    assert "'miou'" in stage_b, stage_b[-3000:]  # eval_amn_cam read every file (chainercv stand-in)
    for name in amn["ids"]:  # amn_cam_to_ir_label (CRF) accepted every file
        label = np.asarray(Image.open(work / "result" / "amn_ir_label" / f"{name}.png"))
        assert label.shape == (32, 32) and set(np.unique(label)) <= set(range(21)) | {255}
    out = amn["kit"].run_python(SEM_SEG.format(root=str(amn["root"]), cams="result/amn_cam", out="result/sem_seg_lpcam"),
                                work, amn["env"])
    assert out["written"] == amn["kit"].NUM_TRAIN  # make_sem_seg_labels read `cam` (** 1.3, .cuda())


def test_stage_b_maps_equal_the_core_on_the_same_features(amn, stage_b):
    report = check_maps(amn, "result/lpcam_bank_amn.pt", "result/amn_cam")
    assert report["checked"] > 0 and report["worst"] == 0.0, report
    assert report["background"] < 1e-6, report
    bank = torch.load(amn["work"] / "result" / "lpcam_bank_amn.pt", weights_only=True)
    assert bank["meta"]["amn_choices"] == {"features": "conditioned", "classifier": "all_taps", "softmax": 20,
                                           "split": "amn_cam"}
    assert sum(v.shape[0] for v in bank["context"].values()) > 0


def test_pool_maps_are_amns_own_with_dropout_off(amn, stage_b, host_maps):
    amn["kit"].compare_dirs(amn["work"] / "result" / "amn_cam_baseline", host_maps, amn["ids"])


def test_lpcam_off_gives_amns_maps(amn, host_maps):
    stdout = run_sample(amn, "--make_amn_cam_pass", "True", "--amn_cam_out_dir", "result/amn_cam_off", LPCAM="0")
    assert "not swapped" in stdout
    amn["kit"].compare_dirs(amn["work"] / "result" / "amn_cam_off", host_maps, amn["ids"])


def test_amns_own_maps_are_random_with_dropout_on(amn, host_maps):
    """What the adapter avoids: AMN's Dropout-on maps differ from run to run (measured here)."""
    work = amn["work"]
    diffs = []
    for seed in (1, 2):
        code = HOST_REFERENCE.format(dropout=True, seed=seed, root=str(amn["root"]), scales=SCALES,
                                     out=f"result/amn_cam_dropout{seed}")
        amn["kit"].run_python(code, work, amn["env"])
    for name in amn["ids"]:
        a = np.load(work / "result" / "amn_cam_dropout1" / f"{name}.npy", allow_pickle=True).item()
        b = np.load(work / "result" / "amn_cam_dropout2" / f"{name}.npy", allow_pickle=True).item()
        diffs.append(float(np.abs(a["high_res"][1:] - b["high_res"][1:]).max()))
    assert max(diffs) > 0


def test_two_spawned_workers(amn, stage_b):
    stdout = run_sample(amn, "--make_amn_cam_pass", "True", "--amn_cam_out_dir", "result/amn_cam_spawn",
                        LPCAM_WORKERS="2", LPCAM_AMN_BANK="result/bank_amn_spawn.pt")
    assert stdout.count("spawning 2 workers") == 1  # one pass: AMN maps, bank and LPCAM maps in the 2 processes
    assert "saved PrototypeBank" in stdout and "prototype images:" in stdout  # the bank built by the 2 processes
    work = amn["work"]
    for name in amn["ids"]:
        for sub_a, sub_b in (("amn_cam_spawn_baseline", "amn_cam_baseline"), ("amn_cam_spawn", "amn_cam")):
            a = np.load(work / "result" / sub_a / f"{name}.npy", allow_pickle=True).item()
            b = np.load(work / "result" / sub_b / f"{name}.npy", allow_pickle=True).item()
            assert torch.equal(a["keys"], b["keys"])
            np.testing.assert_allclose(a["high_res"], b["high_res"], atol=1e-5)
            np.testing.assert_allclose(a["cam"].numpy(), b["cam"].numpy(), atol=1e-5)


def test_two_runs_give_identical_banks_and_files(amn, stage_b):
    run_sample(amn, "--make_amn_cam_pass", "True", "--amn_cam_out_dir", "result/amn_cam_again",
               LPCAM_AMN_BANK="result/bank_again.pt", LPCAM_AMN_BASELINE_DIR="result/amn_base_again")
    work = amn["work"]
    first = torch.load(work / "result" / "lpcam_bank_amn.pt", weights_only=True)
    again = torch.load(work / "result" / "bank_again.pt", weights_only=True)
    for part in ("foreground", "context"):
        assert first[part].keys() == again[part].keys()
        for key in first[part]:
            assert torch.equal(first[part][key], again[part][key]), (part, key)
    amn["kit"].compare_dirs(work / "result" / "amn_cam_again", work / "result" / "amn_cam", amn["ids"])


@pytest.mark.parametrize("choices", [
    {"LPCAM_AMN_FEATURES": "raw", "LPCAM_AMN_CLASSIFIER": "centre", "LPCAM_AMN_SOFTMAX": "21",
     "LPCAM_AMN_SPLIT": "ir_label", "LPCAM_AMN_BACKGROUND": "zeros"},
    {"LPCAM_AMN_SOFTMAX": "21"},
])
def test_alternative_choices_through_the_host(amn, stage_b, choices):
    tag = "_".join(v for v in choices.values())
    out, bank = f"result/amn_cam_{tag}", f"result/bank_{tag}.pt"
    stdout = run_sample(amn, "--make_amn_cam_pass", "True", "--train_list", "voc12/small.txt",
                        "--amn_cam_out_dir", out, LPCAM_AMN_BANK=bank, **choices)
    if choices.get("LPCAM_AMN_SPLIT") == "ir_label":
        assert "baseline CAM ->" not in stdout  # the PNGs split the pools: no AMN pass needed
        assert not (amn["work"] / f"{out}_baseline").exists()
    meta = torch.load(amn["work"] / bank, weights_only=True)["meta"]
    expected = {"features": "conditioned", "classifier": "all_taps", "softmax": 20, "split": "amn_cam"}
    for var, key in (("LPCAM_AMN_FEATURES", "features"), ("LPCAM_AMN_CLASSIFIER", "classifier"),
                     ("LPCAM_AMN_SOFTMAX", "softmax"), ("LPCAM_AMN_SPLIT", "split")):
        if var in choices:
            expected[key] = int(choices[var]) if key == "softmax" else choices[var]
    assert meta["amn_choices"] == expected
    report = check_maps(amn, bank, out, plist="voc12/small.txt")
    assert report["checked"] > 0 and report["worst"] == 0.0, report


def test_stage_a_kept_when_only_b_is_swapped(amn):
    stdout = run_sample(amn, "--make_cam_pass", "True", "--train_list", "voc12/small.txt",
                        "--cam_out_dir", "result/cam_kept", LPCAM_AMN_STAGES="b")
    assert "LPCAM=0" in stdout and "LPCAM swap" not in stdout
    names = sorted(os.listdir(amn["work"] / "result" / "cam_kept"))
    assert names == [*(f"2099_{i:06d}.npy" for i in range(3)), "lpcam_maps.json"]  # the maps and their record


def test_amn_checkout_untouched(amn, stage_b):
    assert amn["kit"].git_status(amn["host"]) == amn["before"]
    assert amn["before"] == "", f"the AMN checkout was not clean before the tests:\n{amn['before']}"


CLI = """
import argparse, json, sys
import lpcam_adapters.amn as amn
parser = argparse.ArgumentParser(prog="lpcam")
amn.register(parser.add_subparsers(dest="command"))
for argv in {argvs!r}:
    ns = parser.parse_args(argv)
    assert ns.func(ns) == 0
print(json.dumps({{"ok": True}}))
"""


def test_cli_prototypes_and_make(amn, stage_b):
    work = amn["work"]
    common = ["--host", str(work), "--voc12-root", str(amn["root"]), "--weights", "sess/res50_amn.pth",
              "--ir-label-dir", "result/ir_label", "--workers", "0"]
    argvs = [
        ["amn", "prototypes", *common, "--bank", "result/bank_cli.pt", "--list", "voc12/train.txt"],
        ["amn", "make", *common, "--bank", "result/bank_cli.pt", "--list", "voc12/small.txt", "--out", "result/amn_cam_cli"],
        ["amn", "make", *common, "--baseline", "--list", "voc12/small.txt", "--out", "result/amn_cam_cli_base"],
    ]
    amn["kit"].run_python(CLI.format(argvs=argvs), work, amn["env"])
    # same images, settings and checkpoint as the patched pass: the same bank and the same files
    first = torch.load(work / "result" / "lpcam_bank_amn.pt", weights_only=True)
    cli = torch.load(work / "result" / "bank_cli.pt", weights_only=True)
    for key in first["foreground"]:
        assert torch.equal(first["foreground"][key], cli["foreground"][key])
    small = amn["ids"][:3]
    amn["kit"].compare_dirs(work / "result" / "amn_cam_cli", work / "result" / "amn_cam", small)
    amn["kit"].compare_dirs(work / "result" / "amn_cam_cli_base", work / "result" / "amn_cam_baseline", small)


def _banks_equal(bank, plain, *, same_peak: bool) -> None:
    """Same prototypes and metadata; ``pool_peak_bytes`` is what one process held (less with 2)."""
    assert bank.classes == plain.classes and plain.classes
    for key in plain.classes:
        assert torch.equal(bank.foreground[key], plain.foreground[key])
        assert torch.equal(bank.context[key], plain.context[key])
    peak = bank.meta.pop("pool_peak_bytes")
    if same_peak:
        assert peak == plain.meta["pool_peak_bytes"]
    else:
        assert 0 < peak < plain.meta["pool_peak_bytes"]
    assert bank.meta == {k: v for k, v in plain.meta.items() if k != "pool_peak_bytes"}


@pytest.mark.slow  # ten CLI processes, some under torchrun: about a minute and a half on 2 CPU cores
def test_cli_under_torchrun_equals_one_process(amn):
    """`lpcam amn prototypes|make` under torchrun with 1 and 2 processes: the banks and the map files equal
    the plain CLI's, bit for bit (raw features: per-class pools merged); a rerun keeps complete files."""
    from lpcam_core import PrototypeBank

    work, kit = amn["work"], amn["kit"]
    ids = amn["ids"][:7]  # odd: the two ranks get 4 and 3 images
    (work / "voc12" / "seven.txt").write_text("\n".join(ids) + "\n")
    common = ["--host", str(work), "--voc12-root", str(amn["root"]), "--weights", "sess/res50_amn.pth",
              "--ir-label-dir", "result/ir_label", "--list", "voc12/seven.txt"]
    launchers = {"plain": [sys.executable, "-m", "lpcam_core.cli"],
                 "tr1": [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "1",
                         "-m", "lpcam_core.cli"],
                 "tr2": [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                         "-m", "lpcam_core.cli"]}
    root = work / "result" / "torchrun"
    for name, launch in launchers.items():
        out = root / name
        kit.run([*launch, "amn", "prototypes", *common, "--bank", str(out / "bank.pt")], work, amn["env"])
        kit.run([*launch, "amn", "make", *common, "--bank", str(out / "bank.pt"), "--out", str(out / "cam")],
                work, amn["env"])
        if name != "tr1":  # raw features: one builder per class, each merged over the ranks
            kit.run([*launch, "amn", "prototypes", *common, "--features", "raw", "--split", "ir_label",
                     "--bank", str(out / "bank_raw.pt")], work, amn["env"])
    plain = PrototypeBank.load(root / "plain" / "bank.pt")
    for name in ("tr1", "tr2"):
        kit.compare_dirs(root / name / "bank_baseline", root / "plain" / "bank_baseline", ids)
        kit.compare_dirs(root / name / "cam", root / "plain" / "cam", ids)
        _banks_equal(PrototypeBank.load(root / name / "bank.pt"), plain, same_peak=name == "tr1")
    _banks_equal(PrototypeBank.load(root / "tr2" / "bank_raw.pt"), PrototypeBank.load(root / "plain" / "bank_raw.pt"),
                 same_peak=False)

    (root / "tr2" / "cam" / f"{ids[0]}.npy").unlink()
    again = kit.run([*launchers["tr2"], "amn", "make", *common, "--bank", str(root / "tr2" / "bank.pt"),
                     "--out", str(root / "tr2" / "cam")], work, amn["env"])
    assert "1 written, 6 already complete, 7 ids, 2 process(es)" in again.stderr, again.stderr[-3000:]
    kit.compare_dirs(root / "tr2" / "cam", root / "plain" / "cam", ids)


@pytest.mark.slow
def test_try_runs_amns_pipeline(amn, tmp_path):
    """`lpcam amn try <checkout>`: stage (a) and (b) with LPCAM=0 (train_cam, make_cam, eval_cam, cam_to_ir_label,
    train_amn, make_amn_cam, eval_amn_cam, amn_cam_to_ir_label), then the swapped stage (b), on the CPU, offline."""
    import re

    stdout, rows = amn["kit"].run_try("amn", amn["host"], tmp_path / "try", amn["env"])
    assert all(re.search(r"\| \d+\.\d \|", r) for r in rows), stdout  # AMN's own mIoU
    work = tmp_path / "try" / "work"
    ids = (work / "voc12" / "train_aug.txt").read_text().split()
    for folder in ("amn_cam_own", "amn_cam", "amn_ir_label"):
        files = list((work / "result" / folder).glob("*.png" if "ir_label" in folder else "*.npy"))
        assert len(files) == len(ids), folder
    assert (work / "sess" / "res50_amn.pth").is_file() or list((work / "sess").glob("res50_amn*"))
    assert amn["kit"].git_status(amn["host"]) == amn["before"]

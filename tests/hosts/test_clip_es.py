"""CLIP-ES (linyq2117/CLIP-ES) with the real host code: generate_cams_voc12.py, eval_cam.py and
eval_cam_with_crf.py, on a synthetic VOC (with the Annotations XML the host reads), with a tiny
random-init CLIP built by the checkout's own clip/model.py, on CPU.

Checked: ``LPCAM=0`` reproduces the unpatched script's files bit for bit; with LPCAM the files are the
host's format and its evaluations read them; the maps CLIP-ES refines are the core's LPCAM maps of
features computed here from the same tokens and bank (for each choice of features and scorer); the
checkout stays clean; ``lpcam clip-es try`` runs.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import pytest

pytestmark = pytest.mark.hosts

HOST = "CLIP-ES"
NUM_IMAGES = 12
SIZE = 80  # 5 x 5 patch tokens (+1 class token: never CLIP's 77 text tokens, which the host tells apart by length)
# a random CLIP scores no centre above 0.9: every class centre is a prototype, contexts as the bounds allow
RANDOM_CLIP = {"LPCAM_MU_F": "0", "LPCAM_MU_B": "1"}

# The unpatched script, run as `python script.py` would on this stack: pkg_resources is gone from setuptools
# >= 81, so the test stands it in itself (the adapter does the same through its import hook).
REFERENCE = (
    "import os, runpy, sys, types, packaging.version\n"
    "sys.modules['pkg_resources'] = types.SimpleNamespace(packaging=packaging)\n"
    "from lpcam_adapters.cpu import cuda_as_cpu\n"
    "script, sys.argv = sys.argv[1], sys.argv[1:]\n"
    "sys.path.insert(0, os.path.dirname(os.path.abspath(script)))\n"
    "with cuda_as_cpu():\n"
    "    runpy.run_path(script, run_name='__main__')\n"
)

# The patched script; the first calls of the swapped GradCAM are recorded (tokens, text, class row, map).
RECORDING = (
    "import os, runpy, sys, torch\n"
    "import lpcam_adapters.clip_es as ces\n"
    "from lpcam_adapters.cpu import cuda_as_cpu\n"
    "record, script, sys.argv = sys.argv[1], sys.argv[2], sys.argv[2:]\n"
    "sys.path.insert(0, os.path.dirname(os.path.abspath(script)))\n"
    "calls, real = [], ces.LPCAMGradCAM.__call__\n"
    "def call(self, input_tensor, targets=None, target_size=None, *a, **k):\n"
    "    out = real(self, input_tensor, targets, target_size, *a, **k)\n"
    "    if self.bank is not None and len(calls) < 6:\n"
    "        calls.append({'tokens': input_tensor[0].detach().clone(), 'text': input_tensor[1].detach().clone(),\n"
    "                      'target': int(targets[0].category), 'hw': (input_tensor[2], input_tensor[3]),\n"
    "                      'cam': torch.from_numpy(out[0].copy())})\n"
    "    return out\n"
    "ces.LPCAMGradCAM.__call__ = call\n"
    "with cuda_as_cpu():\n"
    "    runpy.run_path(script, run_name='__main__')\n"
    "torch.save(calls, record)\n"
)

# The core's maps for the recorded calls, with features computed here from the host model's modules
# (not through the adapter's hook): last block, ln_post, proj.
INDEPENDENT = """
import json, sys, types, packaging.version
sys.modules.setdefault('pkg_resources', types.SimpleNamespace(packaging=packaging))
import numpy as np, torch
import clip
from clip_text import new_class_names
from lpcam_core import PrototypeBank, lpcam_map
model, _ = clip.load({weights!r}, device="cpu")
bank = PrototypeBank.load({bank!r})
calls = torch.load({record!r})
worst, checked = 0.0, 0
with torch.no_grad():
    for c in calls:
        x, _ = model.visual.transformer.resblocks[-1](c["tokens"])
        tokens = x.permute(1, 0, 2)[0, 1:]                      # [hw, width] after the last block
        kind = {features!r}
        if kind != "tokens":
            tokens = model.visual.ln_post(tokens)
        if kind == "proj":
            tokens = tokens @ model.visual.proj
        h, w = c["hw"][0] // 16, c["hw"][1] // 16
        feats = tokens.float().T.reshape(-1, h, w)
        ref = lpcam_map(feats, bank, [int(c["class"])])[0].numpy()
        ref = ref - ref.min(); ref = ref / (1e-7 + ref.max())
        worst = max(worst, float(np.abs(ref - c["cam"][0].numpy()).max()))
        checked += 1
print(json.dumps({{"worst": worst, "checked": checked, "feature_dim": bank.feature_dim}}))
"""


@pytest.fixture(scope="module")
def host(hostkit) -> Path:
    from tests.hosts.conftest import require_extra

    if not os.environ.get("LPCAM_HOSTS"):
        hostkit.host_dir(HOST)  # skips with the reason
    path = Path(os.environ["LPCAM_HOSTS"]) / HOST
    if not (path / "generate_cams_voc12.py").is_file():
        pytest.skip(f"{path} is not a CLIP-ES checkout (set LPCAM_HOSTS to the folder holding the clones)")
    require_extra("clip-es")
    return path


@pytest.fixture(scope="module")
def kit(host, hostkit, tmp_path_factory, pycache) -> dict:
    """Synthetic VOC + Annotations, a work folder with a patched and an unpatched copy, a tiny CLIP."""
    from lpcam_adapters import cli, clip_es, irn_family, trial
    from lpcam_core.formats import write_host_lists, write_voc_annotations

    base = tmp_path_factory.mktemp("clip_es")
    root, labels, train, val = trial.synthetic_voc(base, NUM_IMAGES, SIZE, 1)
    write_voc_annotations(root, labels)
    work = irn_family.prepare_workdir(host, base / "work", marker="generate_cams_voc12.py")
    write_host_lists("clip-es", work, labels, train, val)
    script = work / "generate_cams_voc12.py"
    script.unlink()
    shutil.copyfile(host / "generate_cams_voc12.py", script)
    shutil.copyfile(host / "generate_cams_voc12.py", work / "reference_voc12.py")
    assert cli.patch_entry_script(work, clip_es.INFO) == "applied"
    env = hostkit.host_env(pycache)
    weights = base / "tiny_clip.pt"
    hostkit.run([sys.executable, "-c", clip_es.TINY_CLIP, str(weights), "0"], work, env)
    return {"root": root, "labels": labels, "train": train, "work": work, "env": env, "weights": weights,
            "host": host}


def generate(hostkit, kit, out: str, *, runner: str = "patched", record: Path | None = None, **extra: str) -> Path:
    from lpcam_adapters import trial

    args = ["--img_root", str(kit["root"] / "JPEGImages"), "--split_file", "voc12/train.txt",
            "--model", str(kit["weights"]), "--cam_out_dir", out]
    if runner == "reference":
        cmd = [sys.executable, "-c", REFERENCE, "reference_voc12.py", *args]
    elif record is not None:
        cmd = [sys.executable, "-c", RECORDING, str(record), "generate_cams_voc12.py", *args]
    else:
        cmd = [sys.executable, "-c", trial.RUNNER, "generate_cams_voc12.py", *args]
    hostkit.run(cmd, kit["work"], {**kit["env"], **extra})
    return kit["work"] / out


@pytest.fixture(scope="module")
def runs(hostkit, kit) -> dict:
    """The unpatched script, the patched one with LPCAM=0, and with LPCAM (default settings, recorded)."""
    record = kit["work"] / "calls_default.pt"
    return {
        "reference": generate(hostkit, kit, "result/voc12_reference", runner="reference"),
        "off": generate(hostkit, kit, "result/voc12_off", LPCAM="0"),
        "lpcam": generate(hostkit, kit, "result/voc12_lpcam", record=record, LPCAM="1", **RANDOM_CLIP),
        "record": record,
    }


def load(path: Path) -> dict:
    return np.load(path, allow_pickle=True).item()


def test_lpcam_off_reproduces_the_unpatched_script_bit_for_bit(runs, kit):
    names = sorted(os.listdir(runs["reference"]))
    assert len(names) == NUM_IMAGES and names == sorted(os.listdir(runs["off"]))
    for name in names:
        a, b = load(runs["reference"] / name), load(runs["off"] / name)
        assert set(a) == set(b) == {"keys", "attn_highres"}
        assert np.array_equal(a["keys"], b["keys"]) and np.array_equal(a["attn_highres"], b["attn_highres"]), name


def test_lpcam_files_are_the_hosts_format(runs, kit):
    bank_path = kit["work"] / "result" / "lpcam_bank.pt"
    assert bank_path.is_file(), "the bank goes next to cam_out_dir"
    for image_id in kit["train"]:
        got = load(runs["lpcam"] / f"{image_id}.npy")
        own = load(runs["off"] / f"{image_id}.npy")
        assert set(got) == {"keys", "attn_highres"}
        assert got["attn_highres"].dtype == np.float16 and got["attn_highres"].shape == own["attn_highres"].shape
        xml = ET.parse(kit["root"] / "Annotations" / f"{image_id}.xml").getroot()
        assert got["keys"].tolist() == own["keys"].tolist() == sorted(kit["labels"][image_id])
        assert len(xml.findall("object")) == len(got["keys"])
        assert np.isfinite(got["attn_highres"].astype(np.float32)).all()
        assert 0 <= float(got["attn_highres"].min()) and float(got["attn_highres"].max()) <= 1.0 + 1e-3
    differs = sum(not np.array_equal(load(runs["lpcam"] / f"{i}.npy")["attn_highres"],
                                      load(runs["off"] / f"{i}.npy")["attn_highres"]) for i in kit["train"])
    assert differs == NUM_IMAGES, "LPCAM maps are not Grad-CAM's"


# Every process of the run (the spawned workers too) runs CUDA-only code on the CPU, but the host's own
# torch.multiprocessing.spawn stays real: the workers are new interpreters that unpickle the swapped GradCAM.
CPU_WORKERS_SITE = (
    "import torch.multiprocessing\n"
    "spawn = torch.multiprocessing.spawn\n"
    "from lpcam_adapters.cpu import cuda_as_cpu\n"
    "shims = cuda_as_cpu()  # kept: a dropped generator would be closed, undoing the shims\n"
    "shims.__enter__()\n"
    "torch.multiprocessing.spawn = spawn\n"
)


def test_spawned_workers_run_the_swap_with_the_same_bank(runs, kit, hostkit, tmp_path):
    """``--num_workers 2``: CLIP-ES spawns two processes and pickles its GradCAM to them; each runs LPCAM
    with the bank it carries and writes the same maps as the one-process run."""
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(CPU_WORKERS_SITE)
    bank = tmp_path / "bank.pt"
    shutil.copyfile(kit["work"] / "result" / "lpcam_bank.pt", bank)  # the one-process run's bank
    env = {**kit["env"], **RANDOM_CLIP, "LPCAM": "1", "LPCAM_BANK": str(bank), "LPCAM_BUILD": "never",
           "PYTHONPATH": os.pathsep.join(p for p in (str(site), kit["env"].get("PYTHONPATH", "")) if p)}
    out = "result/voc12_two_workers"
    proc = hostkit.run([sys.executable, "generate_cams_voc12.py", "--img_root", str(kit["root"] / "JPEGImages"),
                        "--split_file", "voc12/train.txt", "--model", str(kit["weights"]), "--cam_out_dir", out,
                        "--num_workers", "2"], kit["work"], env)
    assert proc.stdout.count("LPCAM in place of Grad-CAM") + proc.stderr.count("LPCAM in place of Grad-CAM") >= 1
    names = sorted(os.listdir(kit["work"] / out))
    assert names == sorted(f"{i}.npy" for i in kit["train"])
    for name in names:
        got, one = load(kit["work"] / out / name), load(runs["lpcam"] / name)
        assert got["keys"].tolist() == one["keys"].tolist(), name
        assert np.allclose(got["attn_highres"].astype(np.float32), one["attn_highres"].astype(np.float32),
                           atol=1e-3), name
        assert not np.array_equal(got["attn_highres"], load(runs["off"] / name)["attn_highres"]), name


def test_hosts_evaluations_read_lpcam_files(runs, kit, hostkit):
    from lpcam_adapters import clip_es, trial

    gt = str(kit["root"] / "SegmentationClass")
    proc = hostkit.run([sys.executable, "-c", trial.RUNNER, "eval_cam.py", "--cam_out_dir", "result/voc12_lpcam",
                        "--cam_type", "attn_highres", "--gt_root", gt, "--split_file", "voc12/train.txt"],
                       kit["work"], kit["env"])
    miou = clip_es.mean_iou(proc.stdout)
    assert miou is not None and 0 < miou <= 1
    proc = hostkit.run([sys.executable, "-c", trial.RUNNER, "eval_cam_with_crf.py", "--cam_out_dir",
                        "result/voc12_lpcam", "--gt_root", gt, "--image_root", str(kit["root"] / "JPEGImages"),
                        "--split_file", "voc12/train.txt", "--eval_only"], kit["work"], kit["env"])
    assert clip_es.mean_iou(proc.stdout) is not None


def independent_maps(hostkit, kit, record: Path, bank: Path, features: str) -> dict:
    """The recorded calls' maps against the core's, each call's class found as CLIP-ES finds it: the
    images in list order, the classes of an image in the order of its XML objects (sorted here)."""
    import torch

    calls = torch.load(record)
    assert calls, "no swapped call was recorded"
    order = [(i, c) for i in kit["train"] for c in sorted(kit["labels"][i])]
    for call, (image_id, cls) in zip(calls, order):
        assert call["target"] == sorted(kit["labels"][image_id]).index(cls)
        call["class"] = cls
    torch.save(calls, record)
    code = INDEPENDENT.format(weights=str(kit["weights"]), bank=str(bank), record=str(record), features=features)
    return hostkit.run_python(code, kit["work"], kit["env"])


def test_lpcam_maps_equal_the_core_on_the_same_tokens(runs, kit, hostkit):
    from lpcam_core import PrototypeBank

    bank_path = kit["work"] / "result" / "lpcam_bank.pt"
    bank = PrototypeBank.load(bank_path)
    assert bank.meta["features"] == "ln_post" and bank.meta["scorer"] == "classes" and bank.meta["host"] == "clip-es"
    present = sorted({c for i in kit["train"] for c in kit["labels"][i]})
    assert bank.classes == present
    result = independent_maps(hostkit, kit, runs["record"], bank_path, "ln_post")
    assert result["checked"] == 6 and result["feature_dim"] == 64
    assert result["worst"] < 1e-4, result


@pytest.mark.parametrize("features,scorer,width", [("proj", "classes+background", 32), ("tokens", "classes", 64)])
def test_each_feature_and_scorer_choice(runs, kit, hostkit, features, scorer, width):
    from lpcam_core import PrototypeBank

    bank_path = kit["work"] / f"bank_{features}.pt"
    record = kit["work"] / f"calls_{features}.pt"
    out = generate(hostkit, kit, f"result/voc12_{features}", record=record, LPCAM="1", LPCAM_BANK=str(bank_path),
                   LPCAM_CLIP_FEATURES=features, LPCAM_CLIP_SCORER=scorer, **RANDOM_CLIP)
    assert len(os.listdir(out)) == NUM_IMAGES
    bank = PrototypeBank.load(bank_path)
    assert (bank.meta["features"], bank.meta["scorer"], bank.feature_dim) == (features, scorer, width)
    result = independent_maps(hostkit, kit, record, bank_path, features)
    assert result["worst"] < 1e-4, result


def test_bank_is_reused_and_rebuilt_when_the_choice_changes(runs, kit, hostkit):
    bank_path = kit["work"] / "result" / "lpcam_bank.pt"
    before = bank_path.stat().st_mtime_ns
    from lpcam_adapters import trial

    log = hostkit.run([sys.executable, "-c", trial.RUNNER, "generate_cams_voc12.py",
                       "--img_root", str(kit["root"] / "JPEGImages"), "--split_file", "voc12/train.txt", "--model",
                       str(kit["weights"]), "--cam_out_dir", "result/voc12_again"], kit["work"],
                      {**kit["env"], "LPCAM": "1", "LPCAM_BUILD": "never", **RANDOM_CLIP})
    assert "reusing the prototype bank" in log.stdout + log.stderr and bank_path.stat().st_mtime_ns == before
    for name in os.listdir(runs["lpcam"]):  # same bank, same tokens: the same files
        a, b = load(runs["lpcam"] / name), load(kit["work"] / "result" / "voc12_again" / name)
        assert np.array_equal(a["attn_highres"], b["attn_highres"]), name
    with pytest.raises(AssertionError, match="LPCAM_BUILD=never"):
        generate(hostkit, kit, "result/voc12_never", LPCAM="1", LPCAM_BUILD="never", LPCAM_CLIP_SCORER="classes+background",
                 **RANDOM_CLIP)


def test_host_checkout_stays_clean(runs, kit, hostkit):
    assert hostkit.git_status(kit["host"]) == ""


@pytest.mark.slow
def test_try_runs_the_hosts_pipeline(host, tmp_path, hostkit):
    _, rows = hostkit.run_try("clip-es", host, tmp_path / "try", {**os.environ, "PYTHONPYCACHEPREFIX": str(tmp_path / "pyc")},
                              "--images", "8", "--size", "64", timeout=900)
    for row in rows:
        seeds = row.split("|")[2].strip()
        assert seeds != "?" and 0 < float(seeds) <= 100, row
    assert (tmp_path / "try" / "work" / "result" / "lpcam_bank.pt").is_file()
    assert hostkit.git_status(host) == ""


def test_benchmark_real_mode_runs_the_hosts_steps(runs, kit, tmp_path):
    """benchmarks/clip_es.py as a user with VOC runs it (here: the synthetic VOC and the tiny CLIP, on the CPU)."""
    out = tmp_path / "bench"
    repo = Path(__file__).resolve().parents[2]
    proc = subprocess.run([sys.executable, str(repo / "benchmarks" / "clip_es.py"), "--host", str(kit["host"]),
                           "--voc", str(kit["root"]), "--gt", str(kit["root"] / "SegmentationClass"), "--model",
                           str(kit["weights"]), "--split", str(kit["work"] / "voc12" / "train.txt"), "--out", str(out)],
                          capture_output=True, text=True, timeout=900,
                          env={**kit["env"], **RANDOM_CLIP, "LPCAM_PROTO_LIST": str(kit["work"] / "voc12" / "train.txt")})
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    import json

    rows = json.loads((out / "results.json").read_text())
    assert [r["method"] for r in rows] == ["Grad-CAM (CLIP-ES)", "LPCAM"]
    assert all(0 < r["seeds"] <= 100 and 0 < r["masks"] <= 100 for r in rows), rows
    assert "70.8 / 75.0" in proc.stdout and (out / "lpcam_bank.pt").is_file()
    assert len(os.listdir(out / "voc12_lpcam")) == NUM_IMAGES
    # the Grad-CAM run is the host's own: the same files as the unpatched script's
    for name in os.listdir(runs["reference"]):
        assert np.array_equal(load(runs["reference"] / name)["attn_highres"], load(out / "voc12_gradcam" / name)["attn_highres"])
    assert hostkit_clean(kit)


def hostkit_clean(kit) -> bool:
    proc = subprocess.run(["git", "status", "--porcelain"], cwd=kit["host"], capture_output=True, text=True, check=True)
    return proc.stdout == ""


def test_coco_script_takes_the_same_line(kit, hostkit):
    """generate_cams_coco14.py (labels from the list's columns, 80 classes, COCO preset): LPCAM=0 equals the
    unpatched script; the swap writes the host's files with the list's classes as keys."""
    from lpcam_adapters import cli, clip_es, trial
    from lpcam_core import PrototypeBank

    work = kit["work"]
    shutil.copyfile(kit["host"] / "generate_cams_coco14.py", work / "reference_coco14.py")
    if (work / "generate_cams_coco14.py").is_symlink():
        (work / "generate_cams_coco14.py").unlink()
    text = (kit["host"] / "generate_cams_coco14.py").read_text()
    anchor = "from pytorch_grad_cam import GradCAM"
    line = cli.patch_line(clip_es.INFO)[0]
    (work / "generate_cams_coco14.py").write_text(text.replace(anchor, line + "\n" + anchor, 1))
    coco_list = work / "coco_train.txt"  # COCO's list format: id, then the 0-based classes
    coco_list.write_text("".join(f"{i} {' '.join(map(str, sorted(kit['labels'][i])))}\n" for i in kit["train"]))
    args = ["--img_root", str(kit["root"] / "JPEGImages"), "--split_file", str(coco_list), "--model", str(kit["weights"])]
    hostkit.run([sys.executable, "-c", REFERENCE, "reference_coco14.py", *args, "--cam_out_dir", "result/coco_reference"],
                work, kit["env"])
    hostkit.run([sys.executable, "-c", trial.RUNNER, "generate_cams_coco14.py", *args, "--cam_out_dir", "result/coco_off"],
                work, {**kit["env"], "LPCAM": "0"})
    hostkit.run([sys.executable, "-c", trial.RUNNER, "generate_cams_coco14.py", *args, "--cam_out_dir", "result/coco_lpcam"],
                work, {**kit["env"], **RANDOM_CLIP, "LPCAM_PROTO_LIST": str(coco_list),
                       "LPCAM_BANK": str(work / "coco_bank.pt")})
    bank = PrototypeBank.load(work / "coco_bank.pt")
    assert bank.num_classes == 80 and bank.meta["config"]["images_per_class"] == 100
    differs = 0
    for image_id in kit["train"]:
        ref, off = load(work / "result/coco_reference" / f"{image_id}.npy"), load(work / "result/coco_off" / f"{image_id}.npy")
        assert np.array_equal(ref["attn_highres"], off["attn_highres"]) and np.array_equal(ref["keys"], off["keys"])
        got = load(work / "result/coco_lpcam" / f"{image_id}.npy")
        assert got["keys"].tolist() == sorted(kit["labels"][image_id]) and got["attn_highres"].dtype == np.float16
        differs += not np.array_equal(got["attn_highres"], off["attn_highres"])
    # COCO's CAA box threshold is 0.7: with a random CLIP some maps of both runs refine to zeros
    assert differs >= NUM_IMAGES // 2, differs
    proc = hostkit.run([sys.executable, "-c", trial.RUNNER, "eval_cam.py", "--cam_out_dir", "result/coco_lpcam",
                        "--cam_type", "attn_highres", "--gt_root", str(kit["root"] / "SegmentationClass"),
                        "--split_file", str(coco_list)], work, kit["env"])
    assert clip_es.mean_iou(proc.stdout) is not None


def test_explicit_steps_build_the_bank_then_make_the_maps(kit, hostkit, tmp_path):
    """`lpcam clip-es prototypes` builds the bank and stops (no map); `lpcam clip-es make` then reuses it and writes
    the host's files; both run the unmodified checkout in-process (on the CPU here)."""
    bank = tmp_path / "bank.pt"
    script_args = ["--img_root", str(kit["root"] / "JPEGImages"), "--split_file", "voc12/train.txt", "--model",
                   str(kit["weights"]), "--cam_out_dir", str(tmp_path / "voc12_cams")]
    env = {**kit["env"], **RANDOM_CLIP, "PYTHONDONTWRITEBYTECODE": "1"}
    cli = [sys.executable, "-m", "lpcam_core.cli", "clip-es"]
    hostkit.run([*cli, "prototypes", "--host", str(kit["host"]), "--bank", str(bank), "--", *script_args], kit["work"], env)
    assert bank.is_file()
    assert not os.listdir(tmp_path / "voc12_cams"), "prototypes stops before any map"
    before = bank.stat().st_mtime_ns
    proc = hostkit.run([*cli, "make", "--host", str(kit["host"]), "--bank", str(bank), "--", *script_args], kit["work"], env)
    assert "reusing the prototype bank" in proc.stdout + proc.stderr and bank.stat().st_mtime_ns == before
    assert len(os.listdir(tmp_path / "voc12_cams")) == NUM_IMAGES
    assert hostkit.git_status(kit["host"]) == ""

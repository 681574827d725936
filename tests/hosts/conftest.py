"""Fixtures for the real-host integration tests (marker ``hosts``).

They run the host code found under ``$LPCAM_HOSTS`` (one clone per repository name: ``irn``,
``ReCAM``, ...) on a small synthetic VOC-layout dataset with random-init weights, on CPU. The
host checkout is never written to: each test runs in a work directory of symlinks
(:func:`lpcam_adapters.irn_family.prepare_workdir`) holding a patched *copy* of
``run_sample.py``, with ``PYTHONPYCACHEPREFIX`` pointing outside the checkout.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

HOSTS_ENV = "LPCAM_HOSTS"
HOSTS = os.environ.get(HOSTS_ENV)
SKIP_REASON = (
    f"{HOSTS_ENV} is not set: the host integration tests need the host clones "
    f"(e.g. {HOSTS_ENV}=/path/to/.hosts pytest -m hosts tests/hosts)"
)
NUM_TRAIN = 20  # IRN's steps divide by len(list) // 20: fewer images per worker crash the host
IMAGE_SIZE = 32


def require_extra(extra: str) -> None:
    """Skip, naming the extra to install, when a module the host code imports is missing (lpcam's import-only
    stand-ins do not count)."""
    from lpcam_adapters import hooks
    from lpcam_adapters.trial import EXTRA_MODULES

    missing = [m for m in EXTRA_MODULES[extra] if not hooks.installed(m)]
    if missing:
        pytest.skip(f"the host code imports {', '.join(missing)}: pip install -e '.[test,hosts,mctformer,clip-es]' "
                    f"(extra `{extra}`; `make test` installs it)")


def host_dir(name: str) -> Path:
    """``$LPCAM_HOSTS/<name>``; skips the test when it is not there or the host extras are missing."""
    if not HOSTS:
        pytest.skip(SKIP_REASON)
    require_extra("hosts")
    path = Path(HOSTS) / name
    if not (path / "run_sample.py").is_file():
        pytest.skip(f"{path} is not a {name} checkout (set {HOSTS_ENV} to the folder holding the clones)")
    return path


def git_status(path: Path) -> str:
    """``git status --porcelain`` of a host checkout ('' when clean)."""
    proc = subprocess.run(["git", "status", "--porcelain"], cwd=path, capture_output=True, text=True, check=True)
    return proc.stdout


@pytest.fixture(scope="session")
def synthetic_voc(tmp_path_factory) -> dict:
    """A synthetic VOC root (20 train images, 32x32) and an IRN cls_labels file padded to 20 classes."""
    from lpcam_core.demo.synthetic import SyntheticConfig, write_voc

    base = tmp_path_factory.mktemp("voc")
    cfg = SyntheticConfig(num_classes=4, image_size=IMAGE_SIZE, num_images=NUM_TRAIN + 5, val_fraction=0.2, seed=0)
    root = write_voc(cfg, base / "VOC2012", progress=False)
    labels = np.load(root / "cls_labels.npy", allow_pickle=True).item()
    padded = {k: np.pad(v, (0, 20 - len(v))).astype(np.float32) for k, v in labels.items()}
    np.save(base / "cls_labels20.npy", padded)
    train = (root / "ImageSets" / "Segmentation" / "train.txt").read_text().split()
    assert len(train) == NUM_TRAIN
    return {"root": root, "cls_labels": base / "cls_labels20.npy", "train": train}


@pytest.fixture(scope="session")
def pycache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("pycache")


def host_env(pycache: Path, **extra: str) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("LPCAM")}
    env.update(PYTHONPYCACHEPREFIX=str(pycache), LPCAM_NO_PRETRAINED="1", PYTHONUNBUFFERED="1", **extra)
    return env


def run(cmd: list[str], cwd: Path, env: dict, timeout: int = 900) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-6000:]}")
    return proc


def run_python(code: str, cwd: Path, env: dict) -> dict:
    """Run ``code`` in the work directory; it prints one JSON line last, returned parsed."""
    proc = run([sys.executable, "-c", textwrap.dedent(code)], cwd, env)
    return json.loads(proc.stdout.strip().splitlines()[-1])


def make_workdir(host: Path, adapter: str, target: Path, synthetic: dict, pycache: Path) -> Path:
    """Work directory for ``host`` with the adapter's patch applied to a copy of run_sample.py."""
    import importlib

    from lpcam_adapters import cli, irn_family

    work = irn_family.prepare_workdir(
        host, target, cls_labels=synthetic["cls_labels"],
        lists={"train.txt": synthetic["train"], "train_aug.txt": synthetic["train"]},
    )
    script = work / "run_sample.py"
    script.unlink()
    shutil.copyfile(host / "run_sample.py", script)
    assert cli.patch_entry_script(work, importlib.import_module(f"lpcam_adapters.{adapter}").INFO) == "applied"
    return work


CHECK_MAPS = """
import json, os, sys
import numpy as np, torch
import lpcam_adapters.{adapter}
from lpcam_adapters import irn_family
from lpcam_core import PrototypeBank, lpcam_multiscale
import voc12.dataloader as loader

if {threads} is not None:
    torch.set_num_threads({threads})
model = irn_family.load_model("net.resnet50_cam", {weights!r})
bank = PrototypeBank.load({bank!r})
dataset = loader.VOC12ClassificationDatasetMSF({image_list!r}, voc12_root={root!r}, scales=(1.0, 0.5, 1.5, 2.0))
names = set(os.path.splitext(f)[0] for f in os.listdir({out!r}) if f.endswith(".npy"))
assert names == set(loader.decode_int_filename(n) for n in dataset.img_name_list), "missing or extra files"
worst, checked, zero = 0.0, 0, 0
with torch.no_grad():
    for i in range(min(len(dataset), {limit})):
        pack = dataset[i]
        feats = [model.stage4(model.stage3(model.stage2(model.stage1(torch.from_numpy(x))))) for x in pack["img"]]
        keys = torch.nonzero(pack["label"])[:, 0]
        got = np.load(os.path.join({out!r}, pack["name"] + ".npy"), allow_pickle=True).item()
        assert set(got) == {{"keys", "cam", "high_res"}}, set(got)
        assert isinstance(got["keys"], torch.Tensor) and got["keys"].dtype == torch.int64
        assert isinstance(got["cam"], torch.Tensor) and got["cam"].dtype == torch.float32
        assert isinstance(got["high_res"], np.ndarray) and got["high_res"].dtype == np.float32
        h, w = pack["size"]
        assert got["high_res"].shape == (len(keys), h, w) and got["cam"].shape == (len(keys), (h + 3) // 4, (w + 3) // 4)
        assert torch.equal(got["keys"], keys)
        known = [k for k in keys.tolist() if k in bank.foreground]
        ref = lpcam_multiscale(feats, bank, known, (h, w)) if known else None
        for j, k in enumerate(keys.tolist()):
            if k in known:
                r = known.index(k)
                worst = max(worst, float(np.abs(got["high_res"][j] - ref["high_res"][r]).max()),
                            float((got["cam"][j] - ref["cam"][r]).abs().max()))
                checked += 1
            else:
                assert not got["high_res"][j].any()
                zero += 1
print(json.dumps({{"worst": worst, "checked": checked, "zero": zero}}))
"""


def check_lpcam_maps(
    work: Path, env: dict, *, adapter: str, weights: str, bank: str, out: str, root: Path,
    image_list: str = "voc12/train_aug.txt", limit: int = 6, threads: int | None = None,
) -> dict:
    """``out`` holds a file per image of ``image_list``, and the first ``limit`` files equal
    lpcam_multiscale on features computed here from the same model with ``threads`` threads (CPU
    convolutions round differently with another thread count: compare like with like)."""
    code = CHECK_MAPS.format(adapter=adapter, weights=weights, bank=bank, out=out, root=str(root),
                             image_list=image_list, limit=limit, threads=threads)
    return run_python(code, work, env)


def compare_dirs(a: Path, b: Path, names: list[str]) -> None:
    """Bit-for-bit equality of IRN-format files."""
    import torch

    for name in names:
        x = np.load(a / f"{name}.npy", allow_pickle=True).item()
        y = np.load(b / f"{name}.npy", allow_pickle=True).item()
        assert torch.equal(torch.as_tensor(x["keys"]), torch.as_tensor(y["keys"])), name
        assert torch.equal(x["cam"], y["cam"]), f"{name}: cam differs"
        assert np.array_equal(x["high_res"], y["high_res"]), f"{name}: high_res differs"


def run_try(host: str, checkout: Path, out: Path, env: dict, *flags: str, timeout: int = 1800) -> tuple[str, list[str]]:
    """``lpcam <host> try <checkout> --out <out> flags`` with ``env`` minus its LPCAM settings; asserts it finished
    and printed its two result rows (LPCAM=0, LPCAM=1). Returns (stdout, those rows)."""
    env = {k: v for k, v in env.items() if not k.startswith("LPCAM")}
    proc = subprocess.run([sys.executable, "-m", "lpcam_core.cli", host, "try", str(checkout), "--out", str(out), *flags],
                          cwd=out.parent, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = [line for line in proc.stdout.splitlines() if line.strip().startswith("| LPCAM=")]
    assert len(rows) == 2, proc.stdout
    return proc.stdout, rows


class HostKit:
    """The helpers above, handed to the test modules as the ``hostkit`` fixture."""

    NUM_TRAIN = NUM_TRAIN
    IMAGE_SIZE = IMAGE_SIZE
    host_dir = staticmethod(host_dir)
    git_status = staticmethod(git_status)
    host_env = staticmethod(host_env)
    run = staticmethod(run)
    run_python = staticmethod(run_python)
    run_try = staticmethod(run_try)
    make_workdir = staticmethod(make_workdir)
    check_lpcam_maps = staticmethod(check_lpcam_maps)
    compare_dirs = staticmethod(compare_dirs)


@pytest.fixture(scope="session")
def hostkit() -> type[HostKit]:
    return HostKit

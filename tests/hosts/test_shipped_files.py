"""The data files the host checkouts ship, read through lpcam's patches exactly as a real VOC run reads them.

The other host tests write their own synthetic labels; these read each checkout's own
``voc12/cls_labels.npy`` (VOC's 12,031 image labels, a protocol-2 numpy pickle). With the adapter imported,
the IRN family's ``voc12.dataloader`` reads it through lpcam's safe reader (``np_safe_load``), which must
give what ``np.load(allow_pickle=True)`` gives.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

pytestmark = pytest.mark.hosts

# In the checkout, as run_sample.py's steps do: the patched dataloader reads the labels of the train list.
READ_LABELS = """
import json, sys
import lpcam_adapters.{adapter}
import voc12.dataloader as loader
from lpcam_adapters import hooks
ids = loader.load_img_name_list("voc12/train.txt")
labels = loader.load_image_label_list_from_npy(ids)
patched = [n for n in hooks.applied_patches(loader) if n == "np_safe_load"]
print(json.dumps({{"images": len(ids), "sum": float(sum(l.sum() for l in labels)), "patched": patched}}))
"""


@pytest.mark.parametrize("name, adapter", [("irn", "irn"), ("ReCAM", "recam"), ("AMN", "amn")])
def test_the_checkouts_own_labels_load_through_the_patched_dataloader(name, adapter, tmp_path):
    from tests.hosts.conftest import HOSTS, host_dir

    host = host_dir(name) if HOSTS else pytest.skip("LPCAM_HOSTS is not set")
    env = {**os.environ, "PYTHONPYCACHEPREFIX": str(tmp_path / "pycache"), "PYTHONPATH": str(host)}
    proc = subprocess.run([sys.executable, "-c", READ_LABELS.format(adapter=adapter)], cwd=host, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    labels = np.load(Path(host) / "voc12" / "cls_labels.npy", allow_pickle=True).item()
    ids = [line.strip() for line in (Path(host) / "voc12" / "train.txt").read_text().split() if line.strip()]
    expected = float(sum(labels[int(i.replace("_", ""))].sum() for i in ids))
    assert got["patched"] == ["np_safe_load"], "the safe reader is the one that read the file"
    assert got["images"] == len(ids) == 1464 and got["sum"] == expected


def test_every_checkouts_label_file_reads_as_numpy_reads_it():
    from lpcam_core.io import load_npy
    from tests.hosts.conftest import HOSTS

    if not HOSTS:
        pytest.skip("LPCAM_HOSTS is not set")
    files = sorted(Path(HOSTS).glob("*/voc12/cls_labels.npy"))
    assert files, f"no */voc12/cls_labels.npy under {HOSTS}"
    for path in files:
        got, want = load_npy(path, what="host data"), np.load(path, allow_pickle=True).item()
        assert got.keys() == want.keys(), path
        assert all(np.array_equal(got[k], want[k]) and got[k].dtype == want[k].dtype for k in want), path

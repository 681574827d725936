"""Hostile data files: a crafted map file never runs code, wherever lpcam reads map files.

IRN-family and MCTformer map files are pickled dicts (``np.save`` of a dict). Each test writes a
file whose pickle would create a marker file when unpickled by ``np.load(allow_pickle=True)``, and
checks that the reader refuses it with an error naming the file and that the marker never appears.
"""

from __future__ import annotations

import io
import os
import pickle

import numpy as np
import pytest
import torch

from lpcam_core import formats
from lpcam_core import io as lio
from lpcam_core.cli import main


class _Payload:
    """Unpickling it calls ``os.system`` (what an attacker would put in a map file)."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _hostile(path, marker, *, nested: bool = True) -> None:
    """An IRN-looking map file with the payload inside (or as the whole object)."""
    obj = {"keys": torch.tensor([0]), "cam": torch.zeros(1, 2, 2), "high_res": np.zeros((1, 8, 8), np.float32),
           "extra": _Payload(marker)} if nested else _Payload(marker)
    np.save(path, np.array(obj, dtype=object) if nested else obj, allow_pickle=True)


def _hostile_pickle_sanity(tmp_path) -> None:
    """The files above do run code under np.load(allow_pickle=True): the tests would otherwise prove nothing."""
    marker = tmp_path / "sanity"
    _hostile(tmp_path / "sanity.npy", marker)
    np.load(tmp_path / "sanity.npy", allow_pickle=True)
    assert marker.exists()
    marker.unlink()


def test_the_crafted_file_runs_code_under_a_plain_np_load(tmp_path):
    _hostile_pickle_sanity(tmp_path)


@pytest.mark.parametrize("reader", ["load_npy", "load_irn_cam", "load_mctformer_cam"])
def test_readers_refuse_the_payload(tmp_path, reader):
    marker = tmp_path / "pwned"
    path = tmp_path / "2007_000032.npy"
    _hostile(path, marker)
    with pytest.raises(lio.UnsafeFileError, match=r"2007_000032\.npy.*os\.system|2007_000032\.npy.*posix\.system"):
        getattr(lio if reader == "load_npy" else formats, reader)(path)
    assert not marker.exists()


def test_a_bare_payload_object_is_refused_too(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "x.npy"
    _hostile(path, marker, nested=False)
    with pytest.raises(ValueError, match="x.npy"):
        lio.load_npy(path)
    assert not marker.exists()


def test_resume_check_rewrites_a_hostile_file_without_running_it(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "a.npy"
    _hostile(path, marker)
    assert lio.should_skip(path) is False  # not a complete map: it will be rewritten
    assert not marker.exists()


def test_lpcam_eval_refuses_the_payload_in_one_line(tmp_path, capsys):
    marker = tmp_path / "pwned"
    cams, gt = tmp_path / "cams", tmp_path / "gt"
    cams.mkdir()
    gt.mkdir()
    _hostile(cams / "a.npy", marker)
    from PIL import Image

    Image.fromarray(np.zeros((8, 8), np.uint8), mode="P").save(gt / "a.png")
    (tmp_path / "list.txt").write_text("a\n")
    with pytest.raises(SystemExit) as exc:
        main(["eval", "--cams", str(cams), "--gt", str(gt), "--list", str(tmp_path / "list.txt"), "--num-classes", "2"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "a.npy" in err and len(err.strip().splitlines()) == 1
    assert not marker.exists()


def test_real_map_files_still_load(tmp_path):
    """What the hosts write: torch int64 keys, torch float32 cam, numpy float32 high_res, numpy scalars."""
    rng = np.random.default_rng(0)
    record = {"keys": torch.tensor([3, 17]), "cam": torch.from_numpy(rng.random((2, 3, 2), dtype=np.float32)),
              "high_res": rng.random((2, 9, 6), dtype=np.float32), "half": torch.ones(2, dtype=torch.float16),
              "scalar": np.float32(1.5), "nested": [1, 2.0, "x", (None, True)], 3: np.int64(7)}
    np.save(tmp_path / "r.npy", record, allow_pickle=True)
    got = lio.load_npy(tmp_path / "r.npy")
    assert torch.equal(got["keys"], record["keys"]) and torch.equal(got["cam"], record["cam"])
    assert np.array_equal(got["high_res"], record["high_res"]) and torch.equal(got["half"], record["half"])
    assert got["scalar"] == np.float32(1.5) and got["nested"] == [1, 2.0, "x", (None, True)] and got[3] == 7
    np.save(tmp_path / "plain.npy", np.arange(6).reshape(2, 3))
    assert np.array_equal(lio.load_npy(tmp_path / "plain.npy"), np.arange(6).reshape(2, 3))


def test_map_files_of_numpy_1_load(tmp_path):
    """Files pickled by numpy 1.x name ``numpy.core.multiarray`` (numpy 2: ``numpy._core``)."""
    arr = np.arange(4, dtype=np.float32).reshape(2, 2)
    payload = pickle.dumps(np.array({"high_res": arr}, dtype=object), protocol=3)  # as numpy 1.x np.save
    payload = payload.replace(b"numpy._core.multiarray", b"numpy.core.multiarray")
    buffer = io.BytesIO()
    np.lib.format.write_array_header_1_0(buffer, {"descr": "|O", "fortran_order": False, "shape": ()})
    (tmp_path / "old.npy").write_bytes(buffer.getvalue() + payload)
    assert b"numpy.core.multiarray" in (tmp_path / "old.npy").read_bytes()
    np.testing.assert_array_equal(lio.load_npy(tmp_path / "old.npy")["high_res"], arr)


@pytest.mark.parametrize("cut", [10, 60, 200])
def test_truncated_map_files_name_the_file(tmp_path, cut):
    formats.save_irn_cam(tmp_path / "full.npy", [1], torch.zeros(1, 2, 2), np.zeros((1, 8, 8), np.float32))
    (tmp_path / "cut.npy").write_bytes((tmp_path / "full.npy").read_bytes()[:cut])
    with pytest.raises(ValueError, match="cut.npy"):
        formats.load_irn_cam(tmp_path / "cut.npy")

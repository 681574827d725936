"""Tests of lpcam_core.io: atomic writes, host CAM formats, resumability, lists and label PNGs."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from PIL import Image

from lpcam_core import formats
from lpcam_core import io as lio


class _Unpicklable:
    def __reduce__(self):
        raise RuntimeError("cannot pickle this")


def _irn_arrays(n=2, h=9, w=6, seed=0):
    rng = np.random.default_rng(seed)
    keys = torch.tensor([3, 17][:n])
    cam = torch.from_numpy(rng.random((n, 3, 2)).astype(np.float32))  # ceil(9/4)=3, ceil(6/4)=2
    high_res = rng.random((n, h, w)).astype(np.float32)
    return keys, cam, high_res


# --------------------------------------------------------------------------- atomic writes


def test_atomic_save_roundtrip_leaves_only_the_file(tmp_path):
    path = tmp_path / "a.npy"
    lio.atomic_save_npy(path, {"x": np.arange(3)})
    assert os.listdir(tmp_path) == ["a.npy"]
    np.testing.assert_array_equal(np.load(path, allow_pickle=True).item()["x"], [0, 1, 2])
    lio.atomic_save_npy(tmp_path / "noext", np.ones(2))  # no '.npy' appended
    assert sorted(os.listdir(tmp_path)) == ["a.npy", "noext"]


def test_atomic_save_failure_keeps_old_file_and_no_temp(tmp_path, monkeypatch):
    path = tmp_path / "cam.npy"
    lio.atomic_save_npy(path, {"v": 1})
    before = path.read_bytes()

    # pickling raises after part of the payload is written
    with pytest.raises(RuntimeError, match="cannot pickle"):
        lio.atomic_save_npy(path, {"big": np.zeros(10000), "bad": _Unpicklable()})
    assert os.listdir(tmp_path) == ["cam.npy"]
    assert path.read_bytes() == before

    def boom(f, obj, **kwargs):
        f.write(b"\x93NUMPY partial")
        raise KeyboardInterrupt

    monkeypatch.setattr(np, "save", boom)
    with pytest.raises(KeyboardInterrupt):
        lio.atomic_save_npy(tmp_path / "new.npy", {"v": 2})
    assert os.listdir(tmp_path) == ["cam.npy"]  # neither new.npy nor a temp file
    assert path.read_bytes() == before


def test_atomic_open_text_and_errors(tmp_path):
    with lio.atomic_open(tmp_path / "t.txt", "w") as f:
        f.write("héllo\n")
    assert (tmp_path / "t.txt").read_text(encoding="utf-8") == "héllo\n"
    lio.atomic_write_bytes(tmp_path / "b.bin", b"\x00\x01")
    assert (tmp_path / "b.bin").read_bytes() == b"\x00\x01"
    with pytest.raises(ValueError, match="mode"):
        with lio.atomic_open(tmp_path / "x", "ab"):
            pass
    with pytest.raises(FileNotFoundError, match="missing_dir"):
        lio.atomic_write_bytes(tmp_path / "missing_dir" / "x", b"")
    with pytest.raises(TypeError, match="bytes"):
        lio.atomic_write_bytes(tmp_path / "s", "text")  # type: ignore[arg-type]
    assert sorted(os.listdir(tmp_path)) == ["b.bin", "t.txt"]


def test_atomic_write_keeps_permissions_of_replaced_file(tmp_path):
    path = tmp_path / "p.bin"
    path.write_bytes(b"old")
    os.chmod(path, 0o640)
    lio.atomic_write_bytes(path, b"new")
    assert path.read_bytes() == b"new"
    assert (os.stat(path).st_mode & 0o777) == 0o640


# --------------------------------------------------------------------------- IRN family


def test_irn_roundtrip_types(tmp_path):
    keys, cam, high_res = _irn_arrays()
    path = formats.save_irn_cam(tmp_path / "2007_000032.npy", keys, cam, torch.from_numpy(high_res))
    raw = np.load(path, allow_pickle=True).item()  # the format the hosts read
    assert isinstance(raw["cam"], torch.Tensor) and raw["cam"].dtype == torch.float32
    assert isinstance(raw["high_res"], np.ndarray) and raw["high_res"].dtype == np.float32
    assert raw["keys"].dtype == torch.int64
    d = formats.load_irn_cam(path)
    assert d["keys"].tolist() == [3, 17]
    assert torch.equal(d["cam"], cam)
    np.testing.assert_array_equal(d["high_res"], high_res)


def test_irn_load_accepts_official_release_numpy_keys_and_missing_cam(tmp_path):
    _, _, high_res = _irn_arrays()
    path = tmp_path / "x.npy"
    np.save(path, {"keys": np.array([3, 17], dtype=np.int32), "high_res": high_res.astype(np.float64)})
    d = formats.load_irn_cam(path)
    assert isinstance(d["keys"], torch.Tensor) and d["keys"].dtype == torch.int64
    assert d["high_res"].dtype == np.float32
    assert "cam" not in d


def test_irn_amn_background_channel_accepted(tmp_path):
    keys, cam, high_res = _irn_arrays()
    path = formats.save_irn_cam(
        tmp_path / "amn.npy", keys, torch.cat([cam[:1], cam]), np.concatenate([high_res[:1], high_res])
    )
    assert formats.load_irn_cam(path)["high_res"].shape[0] == 3


def test_irn_save_validation(tmp_path):
    keys, cam, high_res = _irn_arrays()
    out = tmp_path / "bad.npy"
    with pytest.raises(ValueError, match="channels"):
        formats.save_irn_cam(out, torch.tensor([1, 2, 3]), cam, high_res)  # 2 maps for 3 keys
    with pytest.raises(ValueError, match="'cam' must have shape"):
        formats.save_irn_cam(out, keys, cam[:1], high_res)
    with pytest.raises(ValueError, match=r"ceil\(H/4\)"):
        formats.save_irn_cam(out, keys, cam[:, :2], high_res)
    with pytest.raises(ValueError, match="3-D"):
        formats.save_irn_cam(out, keys, cam, high_res[0])
    with pytest.raises(TypeError, match="integers"):
        formats.save_irn_cam(out, np.array([3.0, 17.0]), cam, high_res)
    assert not out.exists()


def test_irn_load_errors_name_the_file(tmp_path):
    keys, cam, high_res = _irn_arrays()
    good = formats.save_irn_cam(tmp_path / "good.npy", keys, cam, high_res)

    with pytest.raises(FileNotFoundError, match="absent.npy"):
        formats.load_irn_cam(tmp_path / "absent.npy")

    truncated = tmp_path / "truncated.npy"
    data = good.read_bytes()
    truncated.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="truncated.npy"):
        formats.load_irn_cam(truncated)

    garbage = tmp_path / "garbage.npy"
    garbage.write_bytes(b"this is not numpy")
    with pytest.raises(ValueError, match="garbage.npy"):
        formats.load_irn_cam(garbage)

    plain = tmp_path / "plain.npy"
    np.save(plain, np.zeros((2, 3)))
    with pytest.raises(ValueError, match="plain.npy.*expected np.save of a dict"):
        formats.load_irn_cam(plain)

    mct = tmp_path / "mct.npy"
    formats.save_mctformer_cam(mct, {0: np.zeros((2, 2))})
    with pytest.raises(ValueError, match=r"mct.npy.*\['keys', 'high_res'\]"):
        formats.load_irn_cam(mct)

    wrong = tmp_path / "wrong.npy"
    np.save(wrong, {"keys": np.array([1, 2, 3]), "high_res": high_res})
    with pytest.raises(ValueError, match="wrong.npy.*channels"):
        formats.load_irn_cam(wrong)


# --------------------------------------------------------------------------- MCTformer


def test_mctformer_roundtrip_and_errors(tmp_path):
    maps = {np.int64(4): np.full((3, 5), 0.25, np.float32), 11: torch.ones(3, 5)}
    path = formats.save_mctformer_cam(tmp_path / "m.npy", maps)
    d = formats.load_mctformer_cam(path)
    assert sorted(d) == [4, 11] and all(type(k) is int for k in d)
    assert isinstance(d[11], np.ndarray) and d[4].dtype == np.float32
    np.testing.assert_array_equal(d[4], 0.25)
    with pytest.raises(ValueError, match="shape"):
        formats.save_mctformer_cam(tmp_path / "x.npy", {1: np.zeros((3, 5)), 2: np.zeros((3, 4))})
    with pytest.raises(TypeError, match="integers"):
        formats.save_mctformer_cam(tmp_path / "x.npy", {"cat": np.zeros((3, 5))})
    irn = formats.save_irn_cam(tmp_path / "irn.npy", *_irn_arrays())
    with pytest.raises(ValueError, match="irn.npy"):
        formats.load_mctformer_cam(irn)


# --------------------------------------------------------------------------- resumable runs


def test_should_skip(tmp_path):
    path = tmp_path / "c.npy"
    assert not lio.should_skip(path)
    formats.save_irn_cam(path, *_irn_arrays())
    assert lio.should_skip(path)
    assert not lio.should_skip(path, overwrite=True)
    data = path.read_bytes()
    path.write_bytes(data[:-40])
    assert not lio.should_skip(path)
    assert not lio.should_skip(path, loader=lambda p: (_ for _ in ()).throw(ValueError("bad")))
    png = tmp_path / "l.png"
    Image.fromarray(np.zeros((4, 4), np.uint8), mode="L").save(png)
    assert lio.should_skip(png)
    png.write_bytes(png.read_bytes()[:20])
    assert not lio.should_skip(png)


def test_check_output_dir(tmp_path):
    base = tmp_path / "cams"
    base.mkdir()
    with pytest.raises(ValueError, match="cams.*cams"):
        lio.check_output_dir(tmp_path / "x" / ".." / "cams", read_dirs=[base])
    link = tmp_path / "alias"
    link.symlink_to(base)
    with pytest.raises(ValueError, match="alias"):
        lio.check_output_dir(link, read_dirs=[None, base])
    out = lio.check_output_dir(tmp_path / "new" / "lpcam", read_dirs=[base])
    assert out.is_dir() and out == (tmp_path / "new" / "lpcam").resolve()
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match="not a directory"):
        lio.check_output_dir(tmp_path / "file")


# --------------------------------------------------------------------------- datasets


def test_read_id_list_both_formats(tmp_path):
    plain = tmp_path / "train.txt"
    plain.write_text("2007_000032\n\n  2007_000039  \r\n2008_000002\n")
    assert lio.read_id_list(plain) == ["2007_000032", "2007_000039", "2008_000002"]
    pairs = tmp_path / "train_aug.txt"
    pairs.write_text(
        "/JPEGImages/2007_000032.jpg /SegmentationClassAug/2007_000032.png\n"
        "\n"
        "JPEGImages/2011_003276.jpg SegmentationClassAug/2011_003276.png\n"
    )
    assert lio.read_id_list(pairs) == ["2007_000032", "2011_003276"]
    with pytest.raises(FileNotFoundError, match="nope.txt"):
        lio.read_id_list(tmp_path / "nope.txt")


def test_load_label_png_keeps_palette_indices(tmp_path):
    labels = np.array([[0, 15, 255], [3, 3, 0]], np.uint8)
    img = Image.fromarray(labels, mode="P")
    img.putpalette([v for i in range(256) for v in (255 - i, i, i // 2)])  # colours != indices
    path = tmp_path / "2007_000032.png"
    img.save(path)
    got = lio.load_label_png(path)
    np.testing.assert_array_equal(got, labels)
    assert got.dtype == np.uint8 and got.flags.writeable
    with pytest.raises(FileNotFoundError, match="missing.png"):
        lio.load_label_png(tmp_path / "missing.png")
    rgb = tmp_path / "rgb.png"
    Image.fromarray(np.zeros((2, 2, 3), np.uint8)).save(rgb)
    with pytest.raises(ValueError, match="rgb.png.*'RGB'"):
        lio.load_label_png(rgb)
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not a png")
    with pytest.raises(ValueError, match="broken.png"):
        lio.load_label_png(broken)


@pytest.mark.parametrize("host", ["irn", "mctformer"])
def test_write_host_lists_writes_what_each_host_reads(tmp_path, host):
    from lpcam_core.formats import write_host_lists
    from lpcam_core.io import load_npy

    labels = {"2007_000032": [0, 14], "2007_000039": [19], "2008_000002": [3]}
    write_host_lists(host, tmp_path, labels, train=["2007_000032", "2007_000039"], val=["2008_000002"],
                     proto=["2007_000032"])
    voc = tmp_path / "voc12"
    names = ("train_id.txt", "train_aug_id.txt", "val_id.txt") if host == "mctformer" else (
        "train.txt", "train_aug.txt", "val.txt")
    assert [(voc / n).read_text().split() for n in names] == [["2007_000032"], ["2007_000032", "2007_000039"],
                                                              ["2008_000002"]]
    table = load_npy(voc / "cls_labels.npy", what="labels")
    key = "2007_000032" if host == "mctformer" else 2007000032  # MCTformer looks ids up as strings, IRN as ints
    assert set(table) == (set(labels) if host == "mctformer" else {int(i.replace("_", "")) for i in labels})
    assert table[key].dtype == np.float32 and table[key].shape == (20,) and np.flatnonzero(table[key]).tolist() == [0, 14]
    with pytest.raises(ValueError, match="host"):
        write_host_lists("deeplab", tmp_path, labels, train=[], val=[])


def _npy_of_pickle(path, payload: bytes) -> None:
    """A .npy of a 0-d object array whose pickle is ``payload`` (as np.save writes a dict)."""
    with open(path, "wb") as f:
        np.lib.format.write_array_header_1_0(f, {"descr": "|O", "fortran_order": False, "shape": ()})
        f.write(payload)


def test_protocol_2_label_files_load_as_numpy_does(tmp_path):
    """The IRN family's shipped voc12/cls_labels.npy is a protocol-2 pickle: an array's bytes travel as
    ``_codecs.encode(text, 'latin1')``. The safe reader builds the same dict as ``np.load(allow_pickle=True)``."""
    import pickle

    rng = np.random.default_rng(0)
    labels = {2007000032 + i: (rng.random(20) > 0.8).astype(np.float32) for i in range(5)}
    labels[2007000099] = np.array([1.0, 0.0, 0.5, 255.0] * 5, np.float32)  # bytes beyond ASCII
    payload = pickle.dumps(np.array(labels, dtype=object), protocol=2)
    assert b"_codecs" in payload and b"encode" in payload
    _npy_of_pickle(tmp_path / "cls_labels.npy", payload)
    got = lio.load_npy(tmp_path / "cls_labels.npy", what="host data")
    want = np.load(tmp_path / "cls_labels.npy", allow_pickle=True).item()
    assert got.keys() == want.keys() == labels.keys()
    assert all(np.array_equal(got[k], labels[k]) and got[k].dtype == np.float32 for k in labels)


def test_codecs_encode_is_allowed_for_latin1_text_only(tmp_path):
    # _codecs.encode('abc', 'utf-8'), then _codecs.encode(b'abc', 'latin1'): neither is an array's bytes
    utf8 = b"\x80\x02c_codecs\nencode\nq\x00X\x03\x00\x00\x00abcX\x05\x00\x00\x00utf-8\x86R."
    not_text = b"\x80\x03c_codecs\nencode\nq\x00C\x03abcX\x06\x00\x00\x00latin1\x86R."
    for name, payload in (("utf8.npy", utf8), ("bytes.npy", not_text)):
        _npy_of_pickle(tmp_path / name, payload)
        with pytest.raises(lio.UnsafeFileError, match="_codecs.encode of something other than latin-1 text"):
            lio.load_npy(tmp_path / name)


def test_a_missing_relative_data_file_names_the_working_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(FileNotFoundError, match=f"host data file not found: 'voc12/cls_labels.npy' \\(relative to the "
                                                f"working directory {tmp_path}\\)"):
        lio.load_npy("voc12/cls_labels.npy", what="host data")

"""Nothing lost: no command writes into a directory it reads from, in any execution mode.

The refusal comes before any model or host code is loaded, so these run without a host checkout.
"""

from __future__ import annotations

import pytest

from lpcam_core.cli import main


def _baseline_dir_with_files(tmp_path):
    bank = tmp_path / "res" / "lpcam_bank.pt"
    baseline = tmp_path / "res" / "lpcam_bank_baseline"
    baseline.mkdir(parents=True)
    (baseline / "2007_000032.npy").write_bytes(b"baseline CAM")
    voc = tmp_path / "VOC2012"
    (voc / "JPEGImages").mkdir(parents=True)
    (voc / "JPEGImages" / "2007_000032.jpg").write_bytes(b"image")
    return bank, baseline, voc


def _snapshot(*dirs):
    return {p: p.read_bytes() for d in dirs for p in sorted(d.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("host", ["irn", "recam", "amn"])
@pytest.mark.parametrize("target", ["baseline", "voc", "images", "baseline_alias"])
@pytest.mark.parametrize("torchrun", [False, True])
def test_make_refuses_to_write_where_it_reads(tmp_path, capsys, monkeypatch, host, target, torchrun):
    bank, baseline, voc = _baseline_dir_with_files(tmp_path)
    (tmp_path / "alias").symlink_to(baseline)
    out = {"baseline": baseline, "voc": voc, "images": voc / "JPEGImages", "baseline_alias": tmp_path / "alias"}[target]
    if torchrun:
        monkeypatch.setenv("RANK", "0")
        monkeypatch.setenv("WORLD_SIZE", "1")
    before = _snapshot(baseline, voc)
    argv = [host, "make", "--host", str(tmp_path / "host"), "--voc12-root", str(voc), "--weights", str(tmp_path / "w.pth"),
            "--bank", str(bank), "--out", str(out)]
    if host == "recam":
        argv.append("--plain-cam")
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip()
    assert "same directory" in err and len(err.splitlines()) == 1
    assert _snapshot(baseline, voc) == before

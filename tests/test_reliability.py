"""Nothing lost: no command writes into a directory it reads from, in any execution mode.

The refusal comes before any model or host code is loaded, so these run without a host checkout.
"""

from __future__ import annotations

import re

import pytest

from lpcam_core.cli import main


def _baseline_dir_with_files(tmp_path):
    bank = tmp_path / "res" / "lpcam_bank.pt"
    baseline = tmp_path / "res" / "lpcam_bank_baseline"
    baseline.mkdir(parents=True)
    bank.write_bytes(b"")  # present: `make` checks for its bank before anything else
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
    if host == "amn":
        argv += ["--ir-label-dir", str(tmp_path / "ir_label")]
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip()
    assert "same directory" in err and len(err.splitlines()) == 1
    assert _snapshot(baseline, voc) == before


# --------------------------------------------------------------------------- data loss, inside a host pass


def test_a_host_pass_never_writes_its_maps_into_the_baseline_dir(tmp_path):
    """LPCAM_BASELINE_DIR pointing at cam_out_dir: refused before a file is written."""
    import torch

    from lpcam_adapters import base
    from lpcam_adapters.settings import HostSettings

    class Host:  # the smallest host: refused before any of it runs
        name, num_classes = "stub", 2

        def to(self, device):
            return self

        def baseline(self, item):
            raise AssertionError("nothing may run")

        write = baseline

    out = tmp_path / "cam"
    out.mkdir()
    (out / "a.npy").write_bytes(b"an LPCAM map")
    data = base.Datasets(proto=[{"name": "a"}], proto_ids=["a"])
    ctx = type("Ctx", (), {"device": torch.device("cpu"), "is_main": True})()
    with pytest.raises(ValueError, match="same directory"):
        base.swap_pass(ctx, Host(), data, HostSettings(), baseline_dir=str(out), bank_path=str(tmp_path / "b.pt"),
                       out_dir=str(out), fingerprint={"model": "x"}, meta={}, reads=[str(out)])
    assert (out / "a.npy").read_bytes() == b"an LPCAM map" and sorted(p.name for p in out.iterdir()) == ["a.npy"]


# --------------------------------------------------------------------------- resource exhaustion


BOMB = "a: &a [x, x, x, x, x, x, x, x, x]\nb: &b [*a, *a, *a, *a, *a, *a, *a, *a, *a]\n" + "".join(
    f"{chr(99 + i)}: &{chr(99 + i)} [" + ", ".join([f"*{chr(98 + i)}"] * 9) + "]\n" for i in range(7))


def test_yaml_alias_bomb_is_refused_at_once(tmp_path):
    import time

    from lpcam_adapters.settings import read_settings
    from lpcam_core import LPCAMConfig

    path = tmp_path / "bomb.yaml"
    path.write_text(BOMB)
    assert len(BOMB) < 400
    start = time.perf_counter()
    with pytest.raises(ValueError, match=r"bomb.yaml: YAML aliases \(\*a\) are not accepted"):
        LPCAMConfig.from_yaml(path)
    with pytest.raises(ValueError, match="YAML aliases"):
        LPCAMConfig.from_yaml(BOMB)
    with pytest.raises(ValueError, match=r"LPCAM_CONFIG=.*bomb.yaml: YAML aliases"):
        read_settings((), {"LPCAM_CONFIG": str(path)})
    assert time.perf_counter() - start < 1.0


def test_settings_files_are_bounded_and_must_be_text(tmp_path):
    from lpcam_core import LPCAMConfig

    big = tmp_path / "big.yaml"
    big.write_text("num_clusters: 3\n" + "# padding\n" * 120_000)
    with pytest.raises(ValueError, match="big.yaml: .* bytes; an LPCAM settings file holds at most"):
        LPCAMConfig.from_yaml(big)
    with pytest.raises(ValueError, match="not a regular file"):
        LPCAMConfig.from_yaml(tmp_path)
    binary = tmp_path / "bin.yaml"
    binary.write_bytes(b"\xff\xfe\x00num_clusters: 3")
    with pytest.raises(ValueError, match="bin.yaml: not UTF-8"):
        LPCAMConfig.from_yaml(binary)


def test_error_messages_do_not_carry_whole_values():
    from lpcam_core import LPCAMConfig

    with pytest.raises(ValueError) as err:
        LPCAMConfig(scales=["x"] * 1_000_000)
    assert len(str(err.value)) < 300
    with pytest.raises(ValueError) as err:
        LPCAMConfig.from_dict({f"key{i}": i for i in range(100_000)})
    assert len(str(err.value)) < 2000


@pytest.mark.parametrize("meta, match", [
    ({"num_classes": 10**10}, r"num_classes=10000000000: expected an int in 1..100000"),
    ({"num_classes": "20"}, "num_classes='20'"),
    ({"num_classes": True}, "num_classes=True"),
    ({"num_classes": 3, "class_names": ["a"] * 10**6}, "class_names must be 3 names"),
    ({"feature_dim": 10**9}, "feature_dim=1000000000"),
])
def test_bank_metadata_is_checked_against_what_it_holds(tmp_path, capsys, meta, match):
    import torch

    from lpcam_core import PrototypeBank
    from lpcam_core.bank import BankError

    good = PrototypeBank({0: torch.rand(2, 4)}, {}, {"num_classes": 3})
    state = good.state_dict()
    state["meta"].update(meta)
    path = tmp_path / "bank.pt"
    torch.save(state, path)
    with pytest.raises(BankError, match=match):
        PrototypeBank.load(path)
    with pytest.raises(SystemExit) as exc:
        main(["info", str(path)])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and len(err.strip().splitlines()) == 1 and len(err) < 500


# --------------------------------------------------------------------------- patch safety


def _irn_like(root, entry_text=b"import argparse\nimport os\n", amn=False):
    from lpcam_adapters import irn_family

    for rel, marker in irn_family.SIGNATURE.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(f"{marker}(x):\n    pass\n")
    if amn:
        (root / "step" / "make_amn_cam.py").write_text("def _work(x):\n    pass\n")
    (root / "run_sample.py").write_bytes(entry_text)
    return root / "run_sample.py"


def test_patch_refuses_what_is_not_the_hosts_checkout(tmp_path):
    from lpcam_adapters import cli, irn

    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "run_sample.py").write_text("import argparse\nprint('another project')\n")
    with pytest.raises(ValueError, match="is not a IRN .* checkout: it has no step/make_cam.py"):
        cli.patch_entry_script(tmp_path / "other", irn.INFO)
    assert (tmp_path / "other" / "run_sample.py").read_text().startswith("import argparse")
    (tmp_path / "amn").mkdir()
    _irn_like(tmp_path / "amn", amn=True)
    with pytest.raises(ValueError, match=r"another host \(amn: it has step/make_amn_cam.py\); use `lpcam amn patch`"):
        cli.patch_entry_script(tmp_path / "amn", irn.INFO)


def test_patch_keeps_bytes_and_crlf_and_recognises_any_lpcam_line(tmp_path):
    from lpcam_adapters import amn, cli, irn

    original = b"import argparse\r\nimport os\r\n\r\nprint('x')"  # CRLF, no final newline
    script = _irn_like(tmp_path, original)
    assert cli.patch_entry_script(tmp_path, irn.INFO) == "applied"
    assert script.read_bytes().startswith(b"import lpcam_adapters.irn  #") and script.read_bytes().endswith(original)
    assert script.read_bytes().split(b"\n")[0].endswith(b"\r")  # the added line ends as the file's lines do
    assert cli.patch_entry_script(tmp_path, irn.INFO, revert=True) == "reverted"
    assert script.read_bytes() == original
    # a user edited the comment (or wrote the line by hand): still recognised, still removed
    script.write_bytes(b"import lpcam_adapters.irn   # mine\r\n" + original)
    assert cli.patch_entry_script(tmp_path, irn.INFO) == "already applied"
    assert cli.patch_entry_script(tmp_path, irn.INFO, revert=True) == "reverted"
    assert script.read_bytes() == original
    # another adapter's line: refused, not stacked
    script.write_bytes(b"import lpcam_adapters.amn\n" + original)
    with pytest.raises(ValueError, match="already imports lpcam_adapters.amn"):
        cli.patch_entry_script(tmp_path, irn.INFO)
    assert script.read_bytes() == b"import lpcam_adapters.amn\n" + original
    assert amn.INFO.entry_script == "run_sample.py"


def test_patch_refuses_a_symlinked_script(tmp_path):
    from lpcam_adapters import cli, irn

    linked = _irn_like(tmp_path / "checkout")
    work = tmp_path / "work"
    _irn_like(work)
    (work / "run_sample.py").unlink()
    (work / "run_sample.py").symlink_to(linked)
    before = linked.read_bytes()
    with pytest.raises(ValueError, match="is a symlink"):
        cli.patch_entry_script(work, irn.INFO)
    assert linked.read_bytes() == before


# --------------------------------------------------------------------------- one line, exit 2


def _one_line_error(capsys, argv, match):
    with pytest.raises(SystemExit) as exc:
        code = main(argv)
        raise SystemExit(code)
    err = capsys.readouterr().err.strip()
    assert exc.value.code == 2, err
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert re.search(match, err), err
    return err


def test_cli_errors_are_one_line(tmp_path, capsys, monkeypatch):
    bank, baseline, voc = _baseline_dir_with_files(tmp_path)
    make = ["irn", "make", "--host", str(tmp_path), "--voc12-root", str(voc), "--weights", "w", "--bank", str(bank)]
    # an output directory that cannot be created (works as root too)
    _one_line_error(capsys, [*make, "--out", "/proc/lpcam_cannot_write/maps"], r"/proc/lpcam_cannot_write")
    _one_line_error(capsys, ["demo", "--quick", "--out", "/proc/lpcam_cannot_write"], r"/proc/lpcam_cannot_write")
    # --config naming a directory, or a binary file
    _one_line_error(capsys, [*make, "--out", str(tmp_path / "o"), "--config", str(tmp_path)], "not a regular file")
    (tmp_path / "bin.yaml").write_bytes(b"\xff\xfe\x00")
    _one_line_error(capsys, [*make, "--out", str(tmp_path / "o"), "--config", str(tmp_path / "bin.yaml")], "not UTF-8")
    # lpcam eval --sweep-step 0
    (tmp_path / "list.txt").write_text("a\n")
    _one_line_error(capsys, ["eval", "--cams", str(tmp_path), "--gt", str(tmp_path), "--list", str(tmp_path / "list.txt"),
                             "--sweep", "--sweep-step", "0"], "step > 0")
    # a malformed variable, read as the host adapter loads
    for value, match in (("inf", "LPCAM_MEMORY_GB='inf'"), ("nan", "LPCAM_MEMORY_GB='nan'"), ("-1", "positive")):
        monkeypatch.setenv("LPCAM_MEMORY_GB", value)
        _one_line_error(capsys, ["irn", "--explain"], match)
    monkeypatch.delenv("LPCAM_MEMORY_GB")
    monkeypatch.setenv("LPCAM_K", "abc")
    _one_line_error(capsys, ["irn", "--explain"], "LPCAM_K='abc': expected an integer")


def test_disk_full_during_make_leaves_no_partial_file(tmp_path, monkeypatch):
    import errno

    import numpy as np
    import torch

    from lpcam_core import io, run
    from lpcam_core.cli import describe_error
    from lpcam_core.formats import irn_writer

    record = {"keys": torch.tensor([0]), "cam": torch.zeros(1, 2, 2), "high_res": np.zeros((1, 8, 8), np.float32)}
    out = tmp_path / "maps"
    run.write_maps(["a"], lambda i: record, out, irn_writer, mode="fill", progress=False)
    real = io.os.fsync
    monkeypatch.setattr(io.os, "fsync", lambda fd: (_ for _ in ()).throw(OSError(errno.ENOSPC, "No space left on device")))
    with pytest.raises(OSError) as err:
        io.atomic_write_bytes(out / "a.npy", b"new bytes")
    monkeypatch.setattr(io.os, "fsync", real)
    assert describe_error(err.value) == f"No space left on device: {out / 'a.npy'}"  # the file it was writing
    assert sorted(p.name for p in out.iterdir()) == ["a.npy"]  # the old file kept, no temporary left
    assert np.load(out / "a.npy", allow_pickle=True).item()["high_res"].shape == (1, 8, 8)


def test_unknown_image_id_in_a_list_names_it(tmp_path, monkeypatch):
    import sys
    import types

    import numpy as np

    from lpcam_adapters import irn_family

    loader = types.ModuleType("voc12.dataloader")

    class Dataset:
        def __init__(self, path, voc12_root, scales=None):
            raise KeyError(np.int32(2099000001))  # what IRN's label lookup raises

    loader.VOC12ClassificationDatasetMSF = loader.VOC12ClassificationDataset = Dataset
    loader.decode_int_filename = lambda n: f"{str(int(n))[:4]}_{str(int(n))[4:]}"
    monkeypatch.setitem(sys.modules, "voc12.dataloader", loader)
    (tmp_path / "list.txt").write_text("2099_000001\n")
    (tmp_path / "JPEGImages").mkdir()
    with pytest.raises(ValueError, match=r"list.txt: image 2099_000001 has no labels in voc12/cls_labels.npy"):
        irn_family.voc_datasets(str(tmp_path / "list.txt"), None, str(tmp_path), (1.0,))
    with pytest.raises(FileNotFoundError, match="image list not found"):
        irn_family.voc_datasets(str(tmp_path / "nope.txt"), None, str(tmp_path), (1.0,))


def test_core_arguments_of_the_wrong_kind():
    import torch

    from lpcam_core import PrototypeBuilder, kmeans, select_prototypes

    with pytest.raises(TypeError, match="k must be an int"):
        kmeans(torch.rand(10, 3), True)
    with pytest.raises(ValueError, match="no feature channels"):
        kmeans(torch.rand(10, 0), 2)
    with pytest.raises(TypeError, match="class_index must be an int"):
        select_prototypes(torch.rand(3, 4), torch.rand(5, 4), 1.7, low=0.5)
    builder = PrototypeBuilder(5)
    with pytest.raises(ValueError, match="empty"):
        builder.add(torch.rand(0, 3, 3), torch.rand(1, 3, 3), [0])
    with pytest.raises(ValueError, match="repeat a class"):
        builder.add(torch.rand(4, 3, 3), torch.rand(2, 3, 3), [1, 1])


# --------------------------------------------------------------------------- silently wrong results


@pytest.mark.parametrize("changes, match", [
    ({"scales": "15"}, "scales='15': expected a list"),
    ({"context_high": 1.5}, "context_high=1.5"),
    ({"context_low": -0.1}, "context_low=-0.1"),
    ({"num_clusters": True}, "num_clusters=True"),
    ({"seed": -1}, "seed=-1"),
])
def test_settings_out_of_range_are_refused(tmp_path, changes, match):
    import yaml

    from lpcam_core import LPCAMConfig

    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(changes))
    with pytest.raises(ValueError, match=re.escape(match)):
        LPCAMConfig.from_yaml(path)


def test_id_lists_refuse_lines_they_would_have_to_guess(tmp_path):
    from lpcam_core.io import read_id_list

    path = tmp_path / "list.txt"
    path.write_text("2007_000032\n/JPEGImages/2007_000039.jpg /SegmentationClassAug/2007_000039.png\n")
    assert read_id_list(path) == ["2007_000032", "2007_000039"]
    path.write_text("2007_000032\nmy img\n")
    with pytest.raises(ValueError, match="list.txt' line 2: 'my img' is neither an image id"):
        read_id_list(path)


def test_malformed_variables_fail_at_import(tmp_path):
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if not k.startswith("LPCAM")}
    for module in ("lpcam_adapters.irn", "lpcam_adapters.amn", "lpcam_adapters.mctformer"):
        proc = subprocess.run([sys.executable, "-c", f"import {module}"], env={**env, "LPCAM_K": "abc"},
                              capture_output=True, text=True, timeout=120)
        assert proc.returncode != 0 and "LPCAM_K='abc': expected an integer" in proc.stderr, (module, proc.stderr[-500:])


# --------------------------------------------------------------------------- leftovers


def test_a_killed_write_leaves_a_temporary_that_the_next_write_removes(tmp_path):
    import subprocess
    import sys

    from lpcam_core.io import atomic_write_bytes

    target = tmp_path / "bank.pt"
    code = ("import os, signal, sys; from lpcam_core.io import atomic_open\n"
            "with atomic_open(sys.argv[1], 'wb') as f:\n    f.write(b'partial'); f.flush(); os.kill(os.getpid(), signal.SIGKILL)\n")
    proc = subprocess.run([sys.executable, "-c", code, str(target)], capture_output=True, timeout=120)
    assert proc.returncode != 0
    left = [p.name for p in tmp_path.iterdir()]
    assert len(left) == 1 and left[0].startswith(".bank.pt.lpcam-") and left[0].endswith(".tmp") and not target.exists()
    atomic_write_bytes(target, b"whole")
    assert [p.name for p in tmp_path.iterdir()] == ["bank.pt"] and target.read_bytes() == b"whole"


def test_a_bank_path_that_is_not_a_file_says_so(tmp_path):
    import os

    from lpcam_core import PrototypeBank
    from lpcam_core.bank import BankError

    with pytest.raises(BankError, match="not a regular file"):
        PrototypeBank.load(tmp_path)
    os.mkfifo(tmp_path / "fifo")
    with pytest.raises(BankError, match="not a regular file"):
        PrototypeBank.load(tmp_path / "fifo")
    with pytest.raises(FileNotFoundError, match="not found"):
        PrototypeBank.load(tmp_path / "missing.pt")

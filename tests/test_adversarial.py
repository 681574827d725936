"""The second adversarial round (docs/reliability.md): each case a tester found, as a test.

Grouped by class: data loss, code execution, resource exhaustion, patch safety, one-line errors,
silently wrong results, leftovers. Host-level cases (a prototypes run into JPEGImages, a relative
--voc12-root) are in tests/hosts/test_irn.py.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from lpcam_core import LPCAMConfig, PrototypeBank, PrototypeBuilder, kmeans, lpcam_map, lpcam_multiscale, run
from lpcam_core.bank import BankError
from lpcam_core.cli import describe_error, main

MARKER = "lpcam_adversarial_marker"


class Evil:
    """Unpickling runs a command that creates the marker file."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _evil_npy(path, marker):
    """A .npy file whose object payload runs code when read by np.load(allow_pickle=True)."""
    arr = np.empty((), dtype=object)
    arr[()] = {"labels": Evil(marker)}
    with open(path, "wb") as f:
        np.lib.format.write_array(f, arr, allow_pickle=True)


def _bank(seed=0, dim=8):
    g = torch.Generator().manual_seed(seed)
    return PrototypeBank({1: torch.randn(3, dim, generator=g), 2: torch.randn(2, dim, generator=g)},
                         {1: torch.randn(2, dim, generator=g), 2: torch.zeros(0, dim)})


# --------------------------------------------------------------------------- data loss


def test_synthetic_data_never_replaces_a_folder_lpcam_did_not_write(tmp_path):
    from lpcam_core.demo.synthetic import SyntheticConfig, write_voc

    photo = tmp_path / "data" / "JPEGImages" / "my_photo.jpg"
    photo.parent.mkdir(parents=True)
    photo.write_bytes(b"a user's photo")
    cfg = SyntheticConfig(num_classes=2, image_size=32, num_images=4, seed=0)
    with pytest.raises(FileExistsError, match="did not write"):
        write_voc(cfg, tmp_path / "data", progress=False)
    assert photo.read_bytes() == b"a user's photo"
    # its own folder, even after an interrupted write, is rewritten
    write_voc(cfg, tmp_path / "ours", progress=False)
    (tmp_path / "ours" / "synthetic_params.json").unlink()
    (tmp_path / "ours" / ".lpcam_synthetic_writing").touch()
    write_voc(cfg, tmp_path / "ours", progress=False)
    assert (tmp_path / "ours" / "synthetic_params.json").is_file()


def test_maps_never_go_into_a_baseline_directory_and_baselines_never_into_a_maps_directory(tmp_path):
    baseline, maps = tmp_path / "baseline", tmp_path / "maps"
    run.check_baseline_record(baseline, {"model": "a"})
    with pytest.raises(ValueError, match="baseline CAMs"):
        run.claim_map_dir(baseline, {"kind": "lpcam"}, overwrite=True)  # even with --overwrite
    run.claim_map_dir(maps, {"kind": "lpcam"}, overwrite=False)
    with pytest.raises(ValueError, match="maps written by lpcam"):
        run.check_baseline_record(maps, {"model": "a"})


def test_a_run_that_failed_before_its_first_map_does_not_block_the_next(tmp_path):
    run.claim_map_dir(tmp_path, {"scales": [0.0]}, overwrite=False)  # then it failed: no map written
    run.claim_map_dir(tmp_path, {"scales": [1.0]}, overwrite=False)  # the retry with other settings
    assert run.read_record(tmp_path / run.MAPS_RECORD) == {"scales": [1.0]}
    (tmp_path / "2007_000032.npy").write_bytes(b"x")
    with pytest.raises(ValueError, match="another scales"):
        run.claim_map_dir(tmp_path, {"scales": [2.0]}, overwrite=False)


@pytest.mark.parametrize("kind", ["checkpoint", "image", "directory"])
def test_a_bank_is_never_written_over_something_else(tmp_path, kind):
    target = tmp_path / "target"
    if kind == "checkpoint":
        torch.save({"stage1.weight": torch.ones(2)}, target)
    elif kind == "image":
        target.write_bytes(b"\xff\xd8\xff\xe0 jpeg")
    else:
        target.mkdir()
    before = target.read_bytes() if target.is_file() else None
    with pytest.raises(BankError, match="bank path"):
        _bank().save(target)
    with pytest.raises(BankError, match="bank path"):  # the collective check, before any image is read
        run.reusable_bank(target, _linear(), LPCAMConfig.preset("voc"), {})
    assert (target.read_bytes() if target.is_file() else None) == before
    _bank().save(tmp_path / "bank.pt")
    _bank(seed=1).save(tmp_path / "bank.pt")  # a bank replaces a bank


def _linear():
    from lpcam_core.classifier import LinearScorer

    return LinearScorer(torch.randn(3, 8, generator=torch.Generator().manual_seed(0)))


# --------------------------------------------------------------------------- code execution


def test_host_np_load_reads_pickles_without_running_code(tmp_path):
    from lpcam_adapters import compat
    from lpcam_core.io import UnsafeFileError

    marker = tmp_path / MARKER
    _evil_npy(tmp_path / "evil.npy", marker)
    with pytest.raises(UnsafeFileError):
        compat.safe_np_load(str(tmp_path / "evil.npy"), allow_pickle=True)
    assert not marker.exists()
    np.save(tmp_path / "labels.npy", {2007000032: np.ones(20, np.float32)})
    labels = compat.safe_np_load(str(tmp_path / "labels.npy"), allow_pickle=True).item()
    assert list(labels) == [2007000032] and labels[2007000032].sum() == 20


def test_a_host_dataloader_reading_an_evil_cls_labels_at_import_runs_no_code(tmp_path):
    """IRN's voc12/dataloader.py does np.load('voc12/cls_labels.npy', allow_pickle=True) at import."""
    (tmp_path / "voc12").mkdir()
    (tmp_path / "voc12" / "__init__.py").write_text("")
    (tmp_path / "voc12" / "dataloader.py").write_text(
        "import numpy as np\ncls_labels_dict = np.load('voc12/cls_labels.npy', allow_pickle=True).item()\n"
        "def load_img_name_list(p):\n    return p\ndef decode_int_filename(i):\n    return str(i)\n")
    marker = tmp_path / MARKER
    _evil_npy(tmp_path / "voc12" / "cls_labels.npy", marker)
    code = ("import sys; sys.path.insert(0, '.')\nimport lpcam_adapters.irn\ntry:\n    import voc12.dataloader\n"
            "except ValueError as err:\n    print('refused:', err)\n")
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert "refused:" in proc.stdout and "cls_labels.npy" in proc.stdout, proc.stderr[-2000:]
    assert not marker.exists()


# --------------------------------------------------------------------------- resource exhaustion


def test_eval_refuses_class_counts_whose_matrices_would_not_fit(tmp_path, capsys):
    (tmp_path / "list.txt").write_text("2007_000032\n")
    with pytest.raises(SystemExit) as exc:
        main(["eval", "--cams", str(tmp_path), "--gt", str(tmp_path), "--list", str(tmp_path / "list.txt"),
              "--num-classes", "100000"])
    assert exc.value.code == 2 and "--num-classes 100000" in capsys.readouterr().err


def test_images_per_class_is_bounded():
    with pytest.raises(ValueError, match="images_per_class"):
        LPCAMConfig.preset("coco", images_per_class=200_000_000)


def test_patch_never_blocks_on_a_fifo(tmp_path):
    from lpcam_adapters import cli, irn

    (tmp_path / "step").mkdir()
    (tmp_path / "voc12").mkdir()
    os.mkfifo(tmp_path / "step" / "make_cam.py")
    (tmp_path / "voc12" / "dataloader.py").write_text("class VOC12ClassificationDatasetMSF: pass\n")
    (tmp_path / "run_sample.py").write_text("import argparse\n")
    start = time.monotonic()
    with pytest.raises(ValueError, match="not a"):
        cli.patch_entry_script(tmp_path, irn.INFO)
    assert time.monotonic() - start < 5


def test_long_os_error_paths_are_cut():
    err = FileNotFoundError(2, "No such file or directory", "x" * 300_000)
    assert len(describe_error(err)) < 1000


# --------------------------------------------------------------------------- patch safety


def _irn_checkout(tmp_path, script):
    (tmp_path / "step").mkdir()
    (tmp_path / "voc12").mkdir()
    (tmp_path / "step" / "make_cam.py").write_text("def _work(process_id, model, dataset, args):\n    pass\n")
    (tmp_path / "voc12" / "dataloader.py").write_text("class VOC12ClassificationDatasetMSF: pass\n")
    (tmp_path / "run_sample.py").write_bytes(script)
    return tmp_path


@pytest.mark.parametrize("line", [b"import os, lpcam_adapters.amn\n", b"import sys; import lpcam_adapters.amn\n"])
def test_an_adapter_imported_in_a_combined_line_counts(tmp_path, line):
    from lpcam_adapters import cli, irn

    root = _irn_checkout(tmp_path, line + b"import argparse\n")
    with pytest.raises(ValueError, match="lpcam_adapters.amn"):
        cli.patch_entry_script(root, irn.INFO)
    assert (root / "run_sample.py").read_bytes() == line + b"import argparse\n"


def test_the_import_never_lands_inside_a_docstring(tmp_path):
    from lpcam_adapters import cli, irn

    script = b'"""Run IRN.\n\nimport argparse\n"""\nimport argparse\nargparse.ArgumentParser()\n'
    root = _irn_checkout(tmp_path, script)
    assert cli.patch_entry_script(root, irn.INFO) == "applied"
    lines = (root / "run_sample.py").read_bytes().splitlines(keepends=True)
    assert lines[:4] == script.splitlines(keepends=True)[:4]  # the docstring untouched
    assert lines[4].startswith(b"import lpcam_adapters.irn") and lines[5:] == script.splitlines(keepends=True)[4:]
    assert cli.patch_entry_script(root, irn.INFO, revert=True) == "reverted"
    assert (root / "run_sample.py").read_bytes() == script


# --------------------------------------------------------------------------- one-line errors


def test_an_unexpected_failure_is_one_line(monkeypatch, capsys):
    import lpcam_core.cli as core_cli

    def boom(args):
        raise RecursionError("maximum recursion depth exceeded")

    monkeypatch.setattr(core_cli, "_cmd_info", boom)
    with pytest.raises(SystemExit) as exc:
        main(["info", "bank.pt"])
    err = capsys.readouterr().err.strip()
    assert exc.value.code == 2 and len(err.splitlines()) == 1 and "RecursionError" in err


def test_a_worker_traceback_becomes_its_last_line():
    text = "\n\n-- Process 1 terminated with the following error:\nTraceback (most recent call last):\n  File x\nValueError: --scales 0: bad"
    assert describe_error(RuntimeError(text)) == "ValueError: --scales 0: bad"


@pytest.mark.parametrize("mutate, message", [
    (lambda s: s["foreground"].update({"01": s["foreground"]["1"]}), "same class"),
    (lambda s: s.update(format_version="abc"), "format_version"),
    (lambda s: s["foreground"].update({"x": torch.ones(1, 8)}), "malformed"),
    (lambda s: s["foreground"].update({"3": torch.ones(2, 0)}), "malformed|prototype"),
])
def test_malformed_banks_are_named(tmp_path, mutate, message):
    state = _bank().state_dict()
    state["foreground"] = {str(k): v for k, v in state["foreground"].items()}
    mutate(state)
    torch.save(state, tmp_path / "bad.pt")
    with pytest.raises(BankError, match=message) as exc:
        PrototypeBank.load(tmp_path / "bad.pt")
    assert "bad.pt" in str(exc.value)


@pytest.mark.parametrize("text, message", [
    ("num_clusters: 5\nnum_clusters: 7\n", "appears twice"),
    ("adapter: {workers: 0}\nadapter: {workers: 2}\n", "appears twice"),
    ("a: " + "[" * 20000 + "]" * 20000 + "\n", "nested too deeply"),
    ("seed: " + "9" * 100000 + "\n", "s.yaml"),
])
def test_settings_files_fail_with_their_name(tmp_path, text, message):
    from lpcam_core.config import load_yaml_mapping

    (tmp_path / "s.yaml").write_text(text)
    with pytest.raises(ValueError, match=message):
        load_yaml_mapping(tmp_path / "s.yaml", str(tmp_path / "s.yaml"))


def test_an_unreadable_settings_file_is_named():
    from lpcam_core.config import load_yaml_mapping

    if not os.path.exists("/proc/self/mem"):
        pytest.skip("no /proc/self/mem on this system")
    with pytest.raises(ValueError, match="/proc/self/mem"):
        load_yaml_mapping("/proc/self/mem", "/proc/self/mem")


def test_a_decompression_bomb_png_is_named(tmp_path):
    from PIL import Image

    from lpcam_core.io import load_label_png

    Image.new("P", (20000, 20000)).save(tmp_path / "bomb.png")
    with pytest.raises(ValueError, match="bomb.png"):
        load_label_png(tmp_path / "bomb.png")


def test_ragged_keys_are_named():
    from lpcam_core.formats import class_keys

    with pytest.raises(ValueError, match="cam.npy"):
        class_keys([[1, 2], [3]], "cam.npy")


def test_devices_are_checked_against_the_machine():
    with pytest.raises(ValueError, match="--device"):
        run.check_device("bogus")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="0 CUDA device"):
            run.check_device("cuda:5")
    assert run.check_device("cpu") == torch.device("cpu")


def test_step_flags_are_checked_by_argparse():
    import argparse

    from lpcam_adapters.cli import count_value, scale_value

    for bad in ("inf", "1e9", "0", "-1", "nan", "x"):
        with pytest.raises(argparse.ArgumentTypeError):
            scale_value(bad)
    assert scale_value("1.5") == 1.5
    with pytest.raises(argparse.ArgumentTypeError):
        count_value("-1")


def test_a_file_that_is_not_a_checkpoint_is_named(tmp_path, monkeypatch):
    from lpcam_adapters.irn_family import load_model

    (tmp_path / "tinynet.py").write_text("import torch.nn as nn\nclass CAM(nn.Module):\n    def __init__(self):\n"
                                         "        super().__init__()\n        self.classifier = nn.Conv2d(4, 2, 1)\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    _bank().save(tmp_path / "bank.pt")
    (tmp_path / "truncated.pth").write_bytes(b"PK\x03\x04 truncated")
    for name, message in (("bank.pt", "not a checkpoint of tinynet.CAM"), ("truncated.pth", "not a readable checkpoint")):
        with pytest.raises(ValueError, match=message) as exc:
            load_model("tinynet", tmp_path / name)
        assert "--weights" in str(exc.value) and name in str(exc.value)


# --------------------------------------------------------------------------- silently wrong results


def test_eval_refuses_thresholds_outside_the_maps_and_repeated_ids(tmp_path, capsys):
    (tmp_path / "list.txt").write_text("2007_000032\n")
    args = ["eval", "--cams", str(tmp_path), "--gt", str(tmp_path), "--list", str(tmp_path / "list.txt")]
    for threshold in ("-5", "7"):
        with pytest.raises(SystemExit):
            main([*args, "--threshold", threshold])
        assert f"--threshold {float(threshold)}" in capsys.readouterr().err
    (tmp_path / "list.txt").write_text("2007_000032\n2007_000032\n")
    with pytest.raises(SystemExit):
        main(args)
    assert "more than once" in capsys.readouterr().err


@pytest.mark.parametrize("text, message", [
    ("adapter:\n  workers: 1.7\n", "workers"),
    ("amn:\n  softmax: 21.9\n", "softmax"),
    ("amn:\n  softmax: [20]\n", "softmax"),
])
def test_host_settings_refuse_floats_where_ints_go(tmp_path, text, message):
    from lpcam_adapters import amn
    from lpcam_adapters.settings import read_settings

    (tmp_path / "s.yaml").write_text(text)
    with pytest.raises(ValueError, match=message):
        read_settings(amn.OPTIONS, {"LPCAM_CONFIG": str(tmp_path / "s.yaml")}, section="amn")


def test_class_indices_are_ints_and_distinct():
    bank = _bank()
    fused = torch.rand(8, 4, 5)
    for bad in (True, [1, 1], [1.0]):
        with pytest.raises((TypeError, ValueError)):
            lpcam_map(fused, bank, bad)
    for keys in ({1.5: torch.ones(1, 8)}, {True: torch.ones(1, 8)}, {"1": torch.ones(1, 8)}):
        with pytest.raises(BankError, match="keys"):
            PrototypeBank(keys)
    feats = [torch.rand(2, 8, 4, 5)]
    for size in ((10.5, 10), (True, 10), (10,)):
        with pytest.raises(TypeError, match="image_size"):
            lpcam_multiscale(feats, bank, [1], size)
    for eps in (-1.0, float("nan")):
        with pytest.raises(ValueError, match="eps"):
            lpcam_multiscale(feats, bank, [1], (10, 10), eps=eps)
    with pytest.raises(ValueError, match="repeats"):
        lpcam_multiscale(feats, bank, [1, 1], (10, 10))
    with pytest.raises(ValueError, match="num_classes"):
        PrototypeBuilder(True)


@pytest.mark.parametrize("kwargs", [{"seed": 1.9}, {"seed": True}, {"seed": "7"}, {"seed": -1},
                                    {"max_iter": True}, {"n_init": True}, {"tol": float("nan")}])
def test_kmeans_refuses_non_int_settings(kwargs):
    with pytest.raises((TypeError, ValueError)):
        kmeans(torch.rand(20, 4), 2, **kwargs)


@pytest.mark.parametrize("low, high", [(float("nan"), 1.0), (0.1, float("nan")), (0.5, 0.5), (0.5, 0.2)])
def test_select_prototypes_refuses_impossible_bounds(low, high):
    from lpcam_core import select_prototypes

    with pytest.raises(ValueError, match="select_prototypes"):
        select_prototypes(torch.rand(4, 8), torch.rand(3, 8), 1, low=low, high=high)


def test_duplicate_keys_and_string_id_lists_are_refused(tmp_path):
    from lpcam_core.formats import save_irn_cam

    with pytest.raises(ValueError, match="repeats"):
        save_irn_cam(tmp_path / "a.npy", [1, 1], torch.zeros(2, 3, 3), np.zeros((2, 9, 9), np.float32))
    with pytest.raises(TypeError, match="one string"):
        run.write_maps("abc", lambda i: i, tmp_path / "out", lambda p, r: None, mode="fill")
    assert not (tmp_path / "out").exists() or not os.listdir(tmp_path / "out")


# --------------------------------------------------------------------------- leftovers


def test_a_killed_parent_s_rendezvous_folder_is_removed(tmp_path):
    import tempfile

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    folder = os.path.join(tempfile.gettempdir(), f"lpcam_rendezvous_{dead.pid}_test")
    live = os.path.join(tempfile.gettempdir(), f"lpcam_rendezvous_{os.getpid()}_test")
    os.makedirs(folder, exist_ok=True)
    os.makedirs(live, exist_ok=True)
    try:
        run.remove_dead_rendezvous()
        assert not os.path.exists(folder) and os.path.exists(live)
    finally:
        os.rmdir(live)


def test_a_dead_writer_s_bank_temporary_goes_when_the_bank_is_reused(tmp_path):
    from lpcam_core.classifier import LinearScorer

    scorer = LinearScorer(torch.randn(3, 8, generator=torch.Generator().manual_seed(0)))
    config = LPCAMConfig.preset("voc")
    bank = _bank()
    bank.meta.update(classifier_fingerprint=scorer.fingerprint(), config=config.to_dict())
    bank.save(tmp_path / "bank.pt")
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    from lpcam_core.io import writer_mark

    stale = tmp_path / f".bank.pt{writer_mark(dead.pid)}.abc.tmp"
    stale.write_bytes(b"half a bank")
    assert run.reusable_bank(tmp_path / "bank.pt", scorer, config, {}) is not None
    assert not stale.exists()


# --------------------------------------------------------------------------- round 3


def test_a_fifo_or_device_is_never_replaced_by_a_map_file(tmp_path):
    import stat

    from lpcam_core.formats import save_irn_cam
    from lpcam_core.io import atomic_write_bytes

    fifo = tmp_path / "2007_000032.npy"
    os.mkfifo(fifo)
    with pytest.raises(ValueError, match="not a regular file"):
        save_irn_cam(fifo, [0], None, np.zeros((1, 4, 4), np.float32))
    with pytest.raises(ValueError, match="not a regular file"):
        atomic_write_bytes(fifo, b"x")
    assert stat.S_ISFIFO(os.lstat(fifo).st_mode)
    (tmp_path / "link.npy").symlink_to(fifo)
    atomic_write_bytes(tmp_path / "link.npy", b"x")  # a link is replaced, what it points to is kept
    assert stat.S_ISFIFO(os.lstat(fifo).st_mode) and (tmp_path / "link.npy").read_bytes() == b"x"


def test_the_demo_never_replaces_a_report_it_did_not_write(tmp_path):
    from lpcam_core.demo.pipeline import check_demo_folder

    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "report.md").write_text("mine")
    with pytest.raises(FileExistsError, match="report.md"):
        check_demo_folder(tmp_path / "d")
    assert (tmp_path / "d" / "report.md").read_text() == "mine"
    check_demo_folder(tmp_path / "new")
    (tmp_path / "new" / "report.md").write_text("the demo's")
    check_demo_folder(tmp_path / "new")  # its own folder: rerun allowed


def test_a_work_folder_never_replaces_files_or_overlaps_the_checkout(tmp_path):
    from lpcam_adapters import irn_family

    host = tmp_path / "irn"
    (host / "voc12").mkdir(parents=True)
    (host / "voc12" / "dataloader.py").write_text("# host\n")
    (host / "README.md").write_text("host readme")
    for work in (host, host / "work", tmp_path):
        with pytest.raises(ValueError, match="overlap"):
            irn_family.prepare_workdir(host, work)
    (tmp_path / "w").mkdir()
    (tmp_path / "w" / "README.md").write_text("my notes")
    with pytest.raises(FileExistsError, match="README.md"):
        irn_family.prepare_workdir(host, tmp_path / "w")
    assert (tmp_path / "w" / "README.md").read_text() == "my notes" and (host / "README.md").read_text() == "host readme"


def test_demo_threads_are_bounded():
    from lpcam_core.demo import DemoSettings

    with pytest.raises(ValueError, match="threads"):
        DemoSettings(threads=5000)


def test_a_list_that_is_not_utf8_is_named(tmp_path):
    from lpcam_adapters import compat

    (tmp_path / "bad.txt").write_bytes(b"2007_000032\n\xff\n")
    with pytest.raises(ValueError, match="bad.txt: not UTF-8"):
        compat.load_img_name_list(tmp_path / "bad.txt")


@pytest.mark.parametrize("labels, message", [
    (np.zeros((2, 5), np.float32), "0/1 vectors of 20"),
    (np.full((2, 20), 2.0, np.float32), "0/1 vectors of 20"),
    (np.full((2, 20), np.nan, np.float32), "0/1 vectors of 20"),
])
def test_host_labels_of_the_wrong_shape_or_values_are_named(tmp_path, monkeypatch, labels, message):
    import types

    from lpcam_adapters import irn_family

    loader = types.ModuleType("voc12.dataloader")

    class Dataset:
        def __init__(self, path, voc12_root, scales=None):
            self.label_list = labels
            self.img_name_list = np.array([2007000032, 2007000039])

    loader.VOC12ClassificationDatasetMSF = loader.VOC12ClassificationDataset = Dataset
    loader.decode_int_filename = lambda n: f"{str(int(n))[:4]}_{str(int(n))[4:]}"
    monkeypatch.setitem(sys.modules, "voc12.dataloader", loader)
    (tmp_path / "list.txt").write_text("2007_000032\n2007_000039\n")
    (tmp_path / "JPEGImages").mkdir()
    with pytest.raises(ValueError, match=message) as exc:
        irn_family.voc_datasets(str(tmp_path / "list.txt"), None, str(tmp_path), (1.0,))
    assert "cls_labels.npy" in str(exc.value)


def test_values_beyond_float32_and_cams_beyond_one_are_refused():
    with pytest.raises(ValueError, match="NaN or inf"):
        lpcam_map(torch.full((8, 2, 2), 1e200, dtype=torch.float64), _bank(), [1])
    with pytest.raises(ValueError, match="NaN or inf"):
        kmeans(torch.tensor([[1e200, 1.0], [1.0, 1e200], [2e200, 1.0]], dtype=torch.float64), 2)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        PrototypeBuilder(3).add(torch.rand(8, 4, 4), torch.full((1, 4, 4), 7.0), [0])
    with pytest.raises(ValueError, match=">= 0"):
        lpcam_multiscale([torch.rand(2, 8, 3, 3)], _bank(), [-3, 7], (8, 8), missing="zeros")
    with pytest.raises(BankError, match="all-zero prototype"):
        PrototypeBank({1: torch.zeros(1, 8)})


def test_map_files_with_nan_are_never_written(tmp_path):
    from lpcam_core.formats import save_irn_cam

    with pytest.raises(ValueError, match="NaN or inf"):
        save_irn_cam(tmp_path / "a.npy", [0], None, np.full((1, 4, 4), np.nan, np.float32))
    assert not (tmp_path / "a.npy").exists()


def test_ctrl_c_is_one_line(monkeypatch, capsys):
    import lpcam_core.cli as core_cli

    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(core_cli, "_cmd_info", interrupted)
    with pytest.raises(SystemExit) as exc:
        main(["info", "bank.pt"])
    err = capsys.readouterr().err.strip()
    assert exc.value.code == 130 and len(err.splitlines()) == 1 and "interrupted" in err

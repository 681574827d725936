"""The `lpcam` command line: info and eval on files we write ourselves."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from lpcam_core import PrototypeBank
from lpcam_core.cli import main
from lpcam_core.formats import save_irn_cam


def _palette_png(path, labels: np.ndarray) -> None:
    img = Image.fromarray(labels.astype(np.uint8), mode="P")
    img.putpalette([0, 0, 0, 128, 0, 0, 0, 128, 0] + [0] * (256 * 3 - 9))
    img.save(path)


@pytest.fixture
def seeds(tmp_path):
    """Two 8x8 images: class 0 (label 1) on the left half, with CAMs that are right on one, wrong on the other."""
    cams, gt = tmp_path / "cams", tmp_path / "gt"
    cams.mkdir()
    gt.mkdir()
    label = np.zeros((8, 8), np.uint8)
    label[:, :4] = 1
    label[0, 0] = 255  # ignored
    good = np.zeros((1, 8, 8), np.float32)
    good[0, :, :4] = 0.9
    bad = np.zeros((1, 8, 8), np.float32)
    bad[0, :, 4:] = 0.9
    for name, high in (("a", good), ("b", bad)):
        save_irn_cam(cams / f"{name}.npy", torch.tensor([0]), torch.from_numpy(high[:, ::4, ::4].copy()), high)
        _palette_png(gt / f"{name}.png", label)
    listing = tmp_path / "list.txt"
    listing.write_text("a\nb\n")
    return cams, gt, listing


def test_eval_prints_miou_by_hand(seeds, capsys):
    cams, gt, listing = seeds
    assert main(["eval", "--cams", str(cams), "--gt", str(gt), "--list", str(listing), "--threshold", "0.3",
                 "--num-classes", "2"]) == 0
    out = capsys.readouterr().out
    # Pixels (63 valid per image): image a all right; image b all wrong (32 bg predicted fg, 31 fg predicted bg).
    # background: TP 32, FP 31, FN 32 -> 32/95; class 1: TP 31, FP 32, FN 31 -> 31/94.
    expected = 100 * (32 / 95 + 31 / 94) / 2
    assert f"mIoU {expected:.2f}" in out


def test_eval_sweep_reports_curve(seeds, capsys):
    cams, gt, listing = seeds
    assert main(["eval", "--cams", str(cams), "--gt", str(gt), "--list", str(listing), "--sweep",
                 "--num-classes", "2"]) == 0
    out = capsys.readouterr().out
    assert "(best)" in out and "| 0.05" in out and "| 0.60" in out


def test_eval_missing_file_is_a_clear_error(tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["eval", "--cams", str(tmp_path), "--gt", str(tmp_path), "--list", str(tmp_path / "nope.txt")])
    assert exc.value.code == 2
    assert "nope.txt" in capsys.readouterr().err


def test_info_lists_classes(tmp_path, capsys):
    bank = PrototypeBank({0: torch.rand(2, 4), 2: torch.rand(3, 4)}, {0: torch.rand(1, 4)},
                         {"num_classes": 3, "class_names": ["cat", "dog", "cow"]})
    path = tmp_path / "bank.pt"
    bank.save(path)
    assert main(["info", str(path)]) == 0
    out = capsys.readouterr().out
    assert "| 0 | cat | 2 | 1 |" in out
    assert "| 1 | dog | 0 | 0 |" in out
    assert "| 2 | cow | 3 | 0 |" in out
    from lpcam_core import __version__

    assert f"library version {__version__}," in out  # stored in the bank, not in its meta


def test_info_on_foreign_file_names_it(tmp_path, capsys):
    path = tmp_path / "junk.pt"
    path.write_bytes(b"not a bank")
    with pytest.raises(SystemExit):
        main(["info", str(path)])
    assert "junk.pt" in capsys.readouterr().err


def test_help_lists_subcommands(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert "info" in out and "eval" in out


def test_building_the_parser_imports_no_torch():
    """`lpcam --help` (and every adapter's sub-parser) is built without importing torch (~2-3 s)."""
    import os
    import subprocess
    import sys

    code = ("import sys, lpcam_core.cli as c; p = c.build_parser(); "
            "assert {'irn', 'recam', 'amn', 'mctformer', 'clip-es'} <= set(p._subparsers._group_actions[0].choices); "
            "print('torch' in sys.modules)")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    assert out.stdout.strip() == "False", out.stdout + out.stderr


def test_bench_runs_a_shipped_benchmark(capsys):
    assert main(["bench", "pipeline", "--help"]) == 0
    assert "--release" in capsys.readouterr().out


@pytest.mark.slow  # builds and installs the wheel (no dependencies) into a folder: about 20 s
def test_the_wheel_ships_the_benchmarks_patches_and_entry_points(tmp_path):
    """A non-editable install holds what the README promises a pip user: `lpcam bench`, the host patches."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation",
                    "--target", str(target), str(root)], check=True, capture_output=True, timeout=600,
                   env={**os.environ, "PIP_NO_INDEX": "1"})
    assert (target / "lpcam_benchmarks" / "pipeline.py").is_file()
    assert (target / "lpcam_adapters" / "patches" / "irn.patch").is_file()
    env = {**os.environ, "PYTHONPATH": str(target)}
    out = subprocess.run([sys.executable, "-m", "lpcam_core.cli", "bench", "pipeline", "--help"], cwd=tmp_path,
                         env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and "--release" in out.stdout, out.stderr[-2000:]
    probe = "import lpcam_core, lpcam_adapters; print(lpcam_core.__file__, lpcam_adapters.__file__)"
    where = subprocess.run([sys.executable, "-c", probe], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert str(target) in where.stdout


@pytest.mark.parametrize("host, own_words", [("irn", "IRN's own maps"), ("recam", "ReCAM's own maps"),
                                             ("amn", "AMN stage (a)")])
def test_explain_describes_the_hosts_own_patch_whatever_was_imported_last(host, own_words, capsys):
    """IRN, ReCAM and AMN all patch step.make_cam:run; `lpcam <host> --explain` lists the one its own line registers,
    even when another adapter was imported after it in this process."""
    import importlib

    from lpcam_adapters import hooks

    with hooks.scoped():
        for other in ("irn", "recam", "amn"):  # every adapter imported, in some order, as building the parser does
            importlib.import_module(f"lpcam_adapters.{other}").install()
        assert main([host, "--explain"]) == 0
    row = [line for line in capsys.readouterr().out.splitlines() if line.startswith("step.make_cam:run")]
    assert len(row) == 1 and own_words in row[0], row


@pytest.mark.parametrize("host, module, extra", [("mctformer", "timm", "mctformer"), ("clip-es", "ttach", "clip-es"),
                                                 ("amn", "pydensecrf", "hosts")])
def test_try_refuses_up_front_when_a_host_module_is_missing(host, module, extra, tmp_path, monkeypatch, capsys):
    """A missing host dependency is named with the pip line before any data is written or anything trains
    (a stand-in lpcam serves for an import does not count as installed)."""
    from lpcam_adapters import hooks
    from lpcam_core.cli import main

    real = hooks.installed
    monkeypatch.setattr(hooks, "installed", lambda name: name != module and real(name))
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as exit_:
        main([host, "try", str(tmp_path / "checkout"), "--out", str(out)])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert module in err and f"/path/to/lpcam[{extra}]" in err
    assert not out.exists()


def test_try_prints_commands_a_shell_takes_back_as_run():
    import shlex

    from lpcam_adapters.trial import command_line

    argv = ["--comment", "lpcam try own", "--list", "voc12/train_id.txt", "--x", "it's"]
    line = command_line({"LPCAM": "0", "LPCAM_MU_F": "0"}, "evaluation.py", argv)
    assert shlex.split(line) == ["LPCAM=0", "LPCAM_MU_F=0", "python", "evaluation.py", *argv]
    assert command_line({}, "main.py", ["--a", "1"]) == "python main.py --a 1"


def test_eval_names_the_flag_of_a_missing_directory(tmp_path, capsys):
    from lpcam_core.cli import main

    (tmp_path / "cams").mkdir()
    (tmp_path / "list.txt").write_text("a\n")
    with pytest.raises(SystemExit):
        main(["eval", "--cams", str(tmp_path / "cams"), "--gt", str(tmp_path / "nowhere"), "--list",
              str(tmp_path / "list.txt")])
    err = capsys.readouterr().err
    assert "--gt" in err and "nowhere" in err


def test_a_path_that_is_not_a_checkout_is_named_for_what_it_is(tmp_path):
    from lpcam_adapters import irn
    from lpcam_adapters.cli import check_checkout

    with pytest.raises(ValueError, match="is not a IRN .* checkout: it has no step/make_cam.py"):
        check_checkout(tmp_path, irn.INFO)
    (tmp_path / "step").mkdir()
    (tmp_path / "step" / "make_cam.py").write_text("print('another project')\n")
    with pytest.raises(ValueError, match="step/make_cam.py does not contain 'def _work'"):
        check_checkout(tmp_path, irn.INFO)
    (tmp_path / "README.md").write_text("x")
    with pytest.raises(FileNotFoundError, match="README.md: not a directory"):
        check_checkout(tmp_path / "README.md", irn.INFO)
    with pytest.raises(FileNotFoundError, match="nowhere: no such directory"):
        check_checkout(tmp_path / "nowhere", irn.INFO)


def test_try_shows_lpcams_warnings_from_a_host_run():
    """A host run's output holds lpcam's messages among the host's; the try report repeats the warnings."""
    import logging

    from lpcam_adapters.trial import lpcam_warnings
    from lpcam_core.logs import HostRunFormatter

    def line(level, text):
        return HostRunFormatter().format(logging.LogRecord("lpcam_core", level, "f", 1, text, (), None))

    output = "\n".join(["epoch 1 loss 0.3", line(logging.INFO, "building the bank"),
                        line(logging.WARNING, "class 3 kept a single prototype"), "step done",
                        line(logging.WARNING, "class 3 kept a single prototype"), line(logging.ERROR, "x")])
    assert lpcam_warnings(output) == ["[lpcam] WARNING: class 3 kept a single prototype"]
    assert line(logging.INFO, "building the bank") == "[lpcam] building the bank"


@pytest.mark.parametrize("host", ["mctformer", "clip-es"])
def test_script_arguments_before_the_separator_are_named_with_the_fix(host, capsys):
    from lpcam_core.cli import main

    with pytest.raises(SystemExit) as exit_:
        main([host, "prototypes", "--host", ".", "--img_root", "/x"])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert "unrecognized arguments: --img_root" in err and "go after `--`" in err
    with pytest.raises(SystemExit):
        main(["irn", "make", "--host", "h", "--voc12-root", "v", "--weights", "w", "--out", "o", "--k", "5"])
    assert "go after" not in capsys.readouterr().err  # IRN's steps run no script of the host's


def test_eval_sweep_says_when_the_best_is_at_its_edge(tmp_path, capsys):
    """Right-half CAM 0.5 is wrong: every threshold below 0.5 is worse, so a sweep that stops at 0.5 is still
    rising there; one that goes on to 0.6 is not (0.5 to 0.6 tie)."""
    cams, gt = tmp_path / "cams", tmp_path / "gt"
    cams.mkdir()
    gt.mkdir()
    label = np.zeros((8, 8), np.uint8)
    label[:, :4] = 1
    high = np.zeros((1, 8, 8), np.float32)
    high[0, :, :4], high[0, :, 4:] = 0.9, 0.5
    save_irn_cam(cams / "a.npy", torch.tensor([0]), torch.from_numpy(high[:, ::4, ::4].copy()), high)
    _palette_png(gt / "a.png", label)
    (tmp_path / "list.txt").write_text("a\n")
    argv = ["eval", "--cams", str(cams), "--gt", str(gt), "--list", str(tmp_path / "list.txt"), "--sweep",
            "--num-classes", "2"]
    assert main([*argv, "--sweep-stop", "0.5"]) == 0
    assert "the best threshold 0.5 is the sweep's end" in capsys.readouterr().out
    assert main(argv) == 0
    assert "sweep's end" not in capsys.readouterr().out


def test_the_extras_table_is_what_setup_cfg_installs():
    """``lpcam_adapters.trial.EXTRA_MODULES`` names, per extra, packages setup.cfg's extra really installs."""
    import configparser
    import re
    from pathlib import Path

    from lpcam_adapters.trial import EXTRA_MODULES

    cfg = configparser.ConfigParser()
    cfg.read(Path(__file__).resolve().parents[1] / "setup.cfg")
    for extra, modules in EXTRA_MODULES.items():
        installed = {re.split(r"[<>=!\[ ]", line.strip())[0].lower()
                     for line in cfg["options.extras_require"][extra].splitlines() if line.strip()}
        assert {p.lower() for p in modules.values()} <= installed, (extra, installed)

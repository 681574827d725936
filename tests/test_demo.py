"""Tests of the embedded demo (lpcam_core.demo), on tiny settings."""

from __future__ import annotations

import argparse
import dataclasses
import json

import pytest

from lpcam_core import LPCAMConfig
from lpcam_core.demo import (
    METHODS,
    DemoSettings,
    add_demo_arguments,
    demo_settings,
    format_table,
    main_from_args,
    run_demo,
)

TINY = {"data_num_images": 16, "data_image_size": 48, "epochs": 1, "threads": 1}


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    return out, run_demo(out, seed=0, quick=True, progress=False, **TINY)


def test_demo_writes_report_and_returns_three_rows(tiny_run):
    out, results = tiny_run
    for name in ("report.md", "overlay.png", "prototypes.png", "results.json"):
        assert (out / name).is_file(), name
    assert (out / "data" / "JPEGImages").is_dir()
    for key in METHODS:
        row = results[key]
        for field in ("miou", "precision", "recall", "threshold", "miou_at_eval"):
            assert isinstance(row[field], float), (key, field)
        assert 0.0 <= row["miou"] <= 100.0
    report = (out / "report.md").read_text()
    assert "| CAM |" in report and "| LPCAM |" in report and "| LPCAM w/o context |" in report
    saved = json.loads((out / "results.json").read_text())
    assert set(METHODS) <= set(saved) and "settings" in saved and "timings" in saved


def test_demo_is_deterministic(tiny_run, tmp_path):
    _, first = tiny_run
    second = run_demo(tmp_path, seed=0, quick=True, progress=False, **TINY)
    for key in METHODS:
        for field in ("miou", "precision", "recall", "threshold"):
            assert first[key][field] == second[key][field], (key, field)


def test_cli_wiring(tmp_path, capsys):
    parser = add_demo_arguments(argparse.ArgumentParser())
    args = parser.parse_args(["--out", str(tmp_path), "--quick", "--no-progress", "--num-images", "16",
                              "--threads", "1", "--epochs", "1"])
    assert main_from_args(args) == 0
    printed = capsys.readouterr().out
    assert "| LPCAM |" in printed and (tmp_path / "report.md").is_file()


def test_settings_validation():
    with pytest.raises(ValueError, match="epochs"):
        DemoSettings(epochs=0)
    with pytest.raises(ValueError, match="scales"):
        DemoSettings(lpcam=LPCAMConfig.preset("voc", scales=()))
    with pytest.raises(TypeError, match="data"):
        DemoSettings(data={"num_images": 10})
    with pytest.raises(ValueError, match="num_classes"):
        demo_settings(0, data_num_classes=1)
    settings = demo_settings(4, data_num_classes=8)
    assert settings.data.num_classes == 8 and settings.data.seed == 4 and settings.seed == 4
    assert settings.lpcam.num_clusters == 12


@pytest.mark.parametrize("num_classes, epochs", [(4, 12), (6, 12), (10, 20), (20, 40)])
def test_default_training_grows_with_the_class_count(num_classes, epochs):
    # 12 epochs under-trained the 10-class network (README): 2 epochs per class beyond 6.
    assert demo_settings(0, data_num_classes=num_classes).epochs == epochs
    assert demo_settings(0, data_num_classes=num_classes, epochs=3).epochs == 3


def test_format_table_shape():
    row = {"miou": 50.0, "precision": 60.0, "recall": 70.0, "threshold": 0.25, "miou_at_eval": 45.0}
    table = format_table({key: row for key in METHODS})
    assert table.count("\n") == 4 and "mIoU @ 0.3" in table


def test_pools_are_split_by_the_inference_scales_unless_told(monkeypatch, tmp_path):
    # The release clusters with the IRN family's multi-scale CAM files (PAPER.md step 1).
    settings = DemoSettings()
    assert settings.pool_cam_scales == settings.scales == (1.0, 0.5, 1.5, 2.0)
    assert DemoSettings(lpcam=LPCAMConfig.preset("voc", scales=(1.0, 0.5))).pool_cam_scales == (1.0, 0.5)
    assert DemoSettings(pool_cam_scales=(1.0,)).pool_cam_scales == (1.0,)
    with pytest.raises(ValueError, match="pool_cam_scales"):
        DemoSettings(pool_cam_scales=(1.0, -2.0))

    from lpcam_core import demo, extractor

    seen = []
    real_fit = extractor.LPCAM.fit

    def spy(self, *args, cam_scales=None, **kwargs):
        seen.append(cam_scales)
        return real_fit(self, *args, cam_scales=cam_scales, **kwargs)

    monkeypatch.setattr(extractor.LPCAM, "fit", spy)
    quick = demo_settings(0, quick=True, data_num_images=16, data_image_size=48, threads=1,
                          scales=(1.0, 0.5), pool_cam_scales=None)
    from lpcam_core.demo.synthetic import load_voc, write_voc

    write_voc(quick.data, tmp_path, progress=False)
    train = load_voc(tmp_path, "train", quick.data.num_classes)
    model = demo.CAMNet(quick.data.num_classes, quick.width, quick.feature_dim, quick.last_kernel).eval()
    demo.build_bank(model, train, quick, progress=False)
    demo.build_bank(model, train, dataclasses.replace(quick, pool_cam_scales=(1.5,)), progress=False)
    assert [tuple(s) for s in seen] == [(1.0, 0.5), (1.5,)]


def test_gain_interval_agrees_with_the_table(tiny_run):
    # Per-image matrices at each method's best threshold must add up to the swept evaluation.
    out, results = tiny_run
    interval = results["gain_interval"]
    for name in ("miou", "precision", "recall"):
        expected = results["lpcam"][name] - results["cam"][name]
        assert interval[name]["difference"] == pytest.approx(expected, abs=1e-9)
        assert interval[name]["low"] <= interval[name]["high"]
    assert "bootstrap interval" in (out / "report.md").read_text()


def test_inference_model_folds_batchnorm_and_keeps_the_features():
    import torch
    import torch.nn as nn

    from lpcam_core.demo import CAMNet, inference_model

    torch.manual_seed(0)
    model = CAMNet(4, width=24, feature_dim=32)
    x = torch.randn(8, 3, 48, 48)
    model.train()
    model(x)  # running statistics away from their initial values
    model.eval()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.2, 0.2)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    fast = inference_model(model)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in fast.modules())
    assert sum(isinstance(m, nn.BatchNorm2d) for m in model.modules()) == 6  # the original is untouched
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())
    with torch.no_grad():
        torch.testing.assert_close(fast.features(x), model.features(x), atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(fast(x), model(x), atol=1e-5, rtol=1e-4)
    assert torch.equal(fast.classifier.weight, model.classifier.weight)


def test_gallery_rows_say_what_their_patches_show(tmp_path):
    """Each gallery row is named after what most of its shown patches hold (or 'mixed'), checked against the
    ground-truth part maps of the demo's own data; a head prototype's row never says 'background'."""
    import numpy as np
    import torch
    import torch.nn.functional as F

    from lpcam_core import PrototypeBank
    from lpcam_core.demo.pipeline import prototype_gallery
    from lpcam_core.demo.synthetic import PART_NAMES, SyntheticConfig, load_voc, write_voc

    cfg = SyntheticConfig(num_classes=3, image_size=64, num_images=24, seed=0)
    train = load_voc(write_voc(cfg, tmp_path / "voc", progress=False), "train")
    parts = torch.from_numpy(train.parts.astype(np.int64))
    onehot = F.one_hot(parts.clamp_max(3), 4).permute(0, 3, 1, 2).float() * (parts != 255)[:, None]
    features = F.avg_pool2d(onehot, 4) + 1e-3  # [n, 4, 16, 16]: each cell's share of background/head/body/legs
    bank = PrototypeBank({c: torch.eye(4)[1:] for c in range(3)}, {c: torch.eye(4)[:1] for c in range(3)})
    picture, rows = prototype_gallery(bank, train, features, classes=[0, 1], per_row=6, patch=16)
    assert picture.ndim == 3 and len(rows) == 2 * 4
    for row in rows:
        proto = (bank.foreground if row["kind"] == "class" else bank.context)[row["class"]][row["index"]]
        names = {PART_NAMES[int(proto.argmax())], "mixed", "other object", "border"}
        if row["kind"] == "class":
            names.add(f"beside {PART_NAMES[int(proto.argmax())]}")
        assert row["part"] in names, row  # a head prototype's patches are not called background
        if row["part"] not in ("mixed", "other object", "border"):
            assert row["share"] >= 0.5


def test_a_background_cell_next_to_its_class_head_is_named_beside_it():
    """The gallery's naming rule on a hand-made image: a head disc of class 1 at (20, 20), another class's
    head at (20, 50), background elsewhere; cells are 4 px, the window 16 px."""
    from types import SimpleNamespace

    import numpy as np

    from lpcam_core.demo.pipeline import cell_part
    from lpcam_core.demo.synthetic import PART_NAMES

    yy, xx = np.mgrid[:64, :64]
    parts = np.zeros((1, 64, 64), np.uint8)
    masks = np.zeros((1, 64, 64), np.uint8)
    for (cy, cx), label in (((20, 20), 2), ((20, 50), 3)):  # classes 1 and 2 (mask = class + 1)
        disc = (yy - cy) ** 2 + (xx - cx) ** 2 <= 25
        parts[0][disc], masks[0][disc] = 1, label
    split = SimpleNamespace(parts=parts, masks=masks)

    def name(y, x, window):
        return cell_part(split, 0, y, x, 4.0, 4.0, 1, PART_NAMES, window=window)

    assert name(5, 5, 16) == "head"  # the cell [20, 24) x [20, 24) lies on the disc
    assert name(5, 7, 0) == "background"  # beside the head, no window asked
    assert name(5, 7, 16) == "beside head"  # the cell [20, 24) x [28, 32): background, the head in sight
    assert name(5, 10, 16) == "background"  # the other class's head is not this class's
    assert name(12, 2, 16) == "background"  # far from any head
    assert name(5, 12, 16) == "other object"  # on the other class's head


def test_beside_names_the_nearest_part_not_the_largest():
    """A small head next to the cell and a large body further off in the same window: the cell is beside
    the head (what the gallery's patch shows next to its centre)."""
    from types import SimpleNamespace

    import numpy as np

    from lpcam_core.demo.pipeline import cell_part
    from lpcam_core.demo.synthetic import PART_NAMES

    yy, xx = np.mgrid[:64, :64]
    parts = np.zeros((1, 64, 64), np.uint8)
    head = (yy - 20) ** 2 + (xx - 20) ** 2 <= 25
    parts[0][head] = 1
    parts[0, 30:45, 0:45] = 2  # the body: more pixels in the window than the head
    masks = np.where(parts > 0, 2, 0).astype(np.uint8)  # all of class 1
    split = SimpleNamespace(parts=parts, masks=masks)
    window = (slice(10, 34), slice(18, 42))  # the 24-px window around cell (5, 7)
    assert (parts[0][window] == 2).sum() > (parts[0][window] == 1).sum()
    assert cell_part(split, 0, 5, 7, 4.0, 4.0, 1, PART_NAMES, window=24) == "beside head"

"""lpcam_adapters.amn against a small stand-in of AMN's stage-(b) network (no host checkout needed).

The stand-in has AMN's shape (stage1..stage4, ``label_enc`` Linear(20, C), ``classifier`` =
Dropout + parallel dilated 3x3 convolutions summed, 21 outputs) with tiny widths.
"""

from __future__ import annotations

import importlib
import logging
import os

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from lpcam_adapters import base, cli, hooks, irn_family
from lpcam_adapters.settings import HostSettings, read_settings
from lpcam_core import LPCAMConfig, PrototypeBank, lpcam_multiscale
from lpcam_core.formats import load_irn_cam, save_irn_cam
from lpcam_core.prototypes import split_by_cam


@pytest.fixture(scope="module")
def amn():
    """The adapter module; its import-time registrations are undone after this module's tests."""
    with hooks.scoped():
        yield importlib.import_module("lpcam_adapters.amn")


def options(amn, **choices):
    """The stage-(b) options: the defaults with ``choices``."""
    return {**{o.name: o.default for o in amn.OPTIONS}, **choices}


def settings_of(amn, env):
    return read_settings(amn.OPTIONS, env, section="amn")


def stage_b(amn, model, png_dir="ir", tau=0.1, **choices):
    return amn.AMNStageB(model, "stand_in", (1.0,), options(amn, **choices), str(png_dir), tau)


def pool_data(dataset):
    names = [it["name"] for it in dataset.items]
    labels = {it["name"]: torch.nonzero(it["label"])[:, 0].tolist() for it in dataset.items}
    return base.Datasets(pool=dataset, proto_ids=names, labels=labels)


def build(amn, model, dataset, cfg, base_dir, png_dir, bank_path=None, **choices):
    host = stage_b(amn, model, png_dir, cfg.fg_threshold, **choices)
    settings = HostSettings(lpcam=cfg, options=options(amn, **choices))
    return base.prototype_bank(host, pool_data(dataset), None if base_dir is None else str(base_dir),
                               None if bank_path is None else str(bank_path), settings, host.meta)


# --------------------------------------------------------------------------- stand-in network


class SummedBranches(nn.Module):
    """Parallel dilated 3x3 convolutions whose outputs are summed (an ASPP head)."""

    def __init__(self, cin: int, cout: int, rates) -> None:
        super().__init__()
        for i, rate in enumerate(rates):
            self.add_module(f"c{i}", nn.Conv2d(cin, cout, 3, 1, padding=rate, dilation=rate, bias=True))

    def forward(self, x):
        return sum(m(x) for m in self.children())


class StandInAMN(nn.Module):
    """AMN-shaped network: features * label_enc(y) -> Dropout -> summed dilated branches (21 ways)."""

    def __init__(self, width: int = 8, rates=(1, 2, 3, 4), seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)

        def block(cin, cout):
            return nn.Sequential(nn.Conv2d(cin, cout, 3, 2, 1), nn.ReLU())

        self.stage1 = block(3, width)
        self.stage2 = block(width, width)
        self.stage3 = block(width, width)
        self.stage4 = block(width, width)
        self.label_enc = nn.Linear(20, width)
        self.classifier = nn.Sequential(nn.Dropout(0.5), SummedBranches(width, 21, rates))
        for conv in self.classifier[1].children():
            nn.init.normal_(conv.weight, std=0.3)
            nn.init.normal_(conv.bias, std=0.3)

    def forward(self, x, y):
        f = self.stage4(self.stage3(self.stage2(self.stage1(x))))
        f = f * self.label_enc(y).unsqueeze(-1).unsqueeze(-1)
        out = self.classifier(f)
        return (out[0] + out[1].flip(-1)) / 2


def labels_of(*classes: int) -> torch.Tensor:
    y = torch.zeros(20)
    y[list(classes)] = 1.0
    return y


# --------------------------------------------------------------------------- head maths


@pytest.mark.parametrize("rates", [(1, 2, 3, 4), (6, 12, 18, 24)])
def test_all_taps_classifier_is_the_heads_interior_response_to_a_constant_map(amn, rates):
    model = StandInAMN(width=8, rates=rates)
    weight, bias = amn.equivalent_classifier(model, "all_taps")
    assert weight.shape == (21, 8) and bias.shape == (21,)
    v = torch.randn(8, generator=torch.Generator().manual_seed(1))
    size = 2 * max(rates) + 9
    const = v[None, :, None, None].expand(1, 8, size, size).contiguous()
    with torch.no_grad():
        out = model.classifier[1](const)[0]
    centre = out[:, size // 2, size // 2]
    torch.testing.assert_close(centre, weight @ v + bias, rtol=1e-5, atol=1e-5)
    # ... and only in the interior: at the border the zero padding removes taps
    assert not torch.allclose(out[:, 0, 0], weight @ v + bias, atol=1e-3)


def test_centre_taps_classifier_is_the_response_without_the_dilated_taps(amn):
    model = StandInAMN()
    weight, bias = amn.equivalent_classifier(model, "centre")
    for conv in model.classifier[1].children():
        with torch.no_grad():
            centre = conv.weight[:, :, 1, 1].clone()
            conv.weight.zero_()
            conv.weight[:, :, 1, 1] = centre
    v = torch.randn(8)
    x = v[None, :, None, None].expand(1, 8, 5, 5)
    with torch.no_grad():
        out = model.classifier[1](x)[0]
    # with only centre taps every position (border included) sees W_centre v + b
    torch.testing.assert_close(out[:, 0, 0], weight @ v + bias, rtol=1e-5, atol=1e-5)
    assert settings_of(amn, {"LPCAM_AMN_CLASSIFIER": "center"}).option("classifier") == "centre"


def test_head_errors_name_what_is_missing(amn):
    with pytest.raises(AttributeError, match="classifier"):
        amn.aspp_branches(nn.Linear(2, 2))
    model = StandInAMN()
    model.classifier = nn.Sequential(nn.Dropout(), nn.Linear(8, 21))
    with pytest.raises(ValueError, match="Conv2d"):
        amn.aspp_branches(model)
    with pytest.raises(ValueError, match="mode"):
        amn.equivalent_classifier(StandInAMN(), "middle")


def test_scoring_classifier_rows_and_conditioning(amn):
    model = StandInAMN()
    weight, bias = amn.equivalent_classifier(model, "all_taps")
    w20, b20 = amn.scoring_classifier(model, options(amn))
    torch.testing.assert_close(w20, weight[1:])
    torch.testing.assert_close(b20, bias[1:])
    w21, b21 = amn.scoring_classifier(model, options(amn, softmax=21))
    torch.testing.assert_close(w21, weight)
    torch.testing.assert_close(b21, bias)
    raw = options(amn, features="raw")
    with pytest.raises(ValueError, match="class_index"):
        amn.scoring_classifier(model, raw)
    w_raw, _ = amn.scoring_classifier(model, raw, 3)
    y3 = model.label_enc(labels_of(3)[None])[0].detach()
    torch.testing.assert_close(w_raw, weight[1:] * y3[None])
    # a raw feature scored with W * y_c equals the head on the conditioned feature of an image labelled c
    f = torch.rand(8)
    torch.testing.assert_close(w_raw @ f, weight[1:] @ (f * y3), rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------- features and Dropout


def test_features_are_stage4_times_the_label_embedding(amn):
    model = StandInAMN()
    x = torch.randn(2, 3, 32, 32)
    y = labels_of(1, 4)
    with torch.no_grad():
        raw = amn.amn_features(model, x, None, conditioned=False)
        cond = amn.amn_features(model, x, y, conditioned=True)
        emb = model.label_enc(y[None])[0]
    assert raw.shape == (2, 8, 2, 2)
    torch.testing.assert_close(cond, raw * emb[None, :, None, None])
    with pytest.raises(ValueError, match="labels"):
        amn.amn_features(model, x, None, conditioned=True)
    with pytest.raises(ValueError, match="labels must be"):
        amn.amn_features(model, x, torch.ones(3, 20), conditioned=True)


def test_logits_run_with_dropout_off_and_leave_the_models_flags_alone(amn):
    model = StandInAMN()
    assert model.training and model.classifier[0].training  # as AMN: Dropout active "at inference"
    x = torch.randn(2, 3, 32, 32)
    y = labels_of(2).unsqueeze(0).expand(2, 20)
    with torch.no_grad():
        a = amn.amn_logits(model, x, y)
        b = amn.amn_logits(model, x, y)
        host_1 = model(x, y)
        host_2 = model(x, y)
        model.classifier[0].eval()
        host_no_dropout = model(x, y)
        model.classifier[0].train()
    assert torch.equal(a, b)
    assert not torch.equal(host_1, host_2)  # the host's own forward is random
    assert torch.equal(a, host_no_dropout)
    assert a.shape == (21, 2, 2)
    assert all(m.training for m in model.modules())


# --------------------------------------------------------------------------- pools


def test_ir_label_cams_split_class_context_and_ignore(amn):
    tau = 0.1
    png = np.array([[0, 2, 2, 255], [3, 2, 0, 255]], dtype=np.uint8)  # class 1 -> value 2, class 2 -> 3
    cams = amn.ir_label_cams(png, [1, 2], tau)
    assert cams.shape == (2, 2, 4) and cams.dtype == torch.float32
    feats = torch.arange(8, dtype=torch.float32).reshape(1, 2, 4)  # one channel: position index
    fg, bg = split_by_cam(feats, cams[0], tau)
    assert sorted(fg[:, 0].tolist()) == [1, 2, 5]  # class 1 pixels
    assert sorted(bg[:, 0].tolist()) == [0, 4, 6]  # background and class 2; ignore (3, 7) in neither
    fg2, bg2 = split_by_cam(feats, cams[1], tau)
    assert fg2[:, 0].tolist() == [4] and sorted(bg2[:, 0].tolist()) == [0, 1, 2, 5, 6]


class _ProtoSet(torch.utils.data.Dataset):
    """The items of ``voc12.dataloader.VOC12ClassificationDataset``: name, img [3, H, W], label [20]."""

    def __init__(self, n: int = 6, size: int = 48, seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        self.items = []
        for i in range(n):
            classes = [i % 3] + ([3] if i % 2 else [])
            img = torch.randn(3, size, size, generator=g).numpy()
            self.items.append({"name": f"2099_{i:06d}", "img": img, "label": labels_of(*classes)})

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i):
        return self.items[i]


def _write_split_inputs(amn, model, dataset, tmp_path):
    """ir_label PNGs (random classes of the image) and AMN-format baseline maps of every item."""
    from PIL import Image

    rng = np.random.default_rng(0)
    png_dir, base_dir = tmp_path / "ir_label", tmp_path / "baseline"
    png_dir.mkdir(exist_ok=True)
    base_dir.mkdir(exist_ok=True)
    for item in dataset.items:
        keys = torch.nonzero(item["label"])[:, 0]
        h, w = item["img"].shape[1:]
        values = np.array([0, 255] + [int(k) + 1 for k in keys], dtype=np.uint8)
        Image.fromarray(values[rng.integers(0, len(values), (h, w))]).save(png_dir / f"{item['name']}.png")
        maps = rng.random((1 + len(keys), h, w)).astype(np.float32)
        small = torch.from_numpy(maps[:, ::4, ::4].copy())
        save_irn_cam(base_dir / f"{item['name']}.npy", keys, small, maps)
    return base_dir, png_dir


@pytest.mark.parametrize(
    "choices",
    [{}, {"features": "raw"}, {"classifier": "centre"}, {"softmax": 21}, {"split": "ir_label"},
     {"features": "raw", "softmax": 21, "split": "ir_label"}],
)
def test_bank_of_every_choice_covers_the_present_classes(amn, tmp_path, choices, caplog):
    model = StandInAMN()
    dataset = _ProtoSet()
    base_dir, png_dir = _write_split_inputs(amn, model, dataset, tmp_path)
    cfg = LPCAMConfig.preset("voc", num_clusters=2)
    with caplog.at_level(logging.WARNING):
        bank = build(amn, model, dataset, cfg, base_dir, png_dir, tmp_path / "bank.pt", **choices)
    assert bank.classes == [0, 1, 2, 3]
    assert bank.num_classes == 20 and bank.feature_dim == 8
    wanted = options(amn, **choices)
    assert bank.meta["amn_choices"] == {k: wanted[k] for k in ("features", "classifier", "softmax", "split")}
    absent = [r.getMessage() for r in caplog.records if "never appeared" in r.getMessage()]
    assert absent == ["classes " + str(list(range(4, 20))) + " never appeared in the images added: they get no prototypes"]
    assert all(k.split("/")[1] in {"0", "1", "2", "3"} for k in bank.meta["features_seen"])
    reloaded = PrototypeBank.load(tmp_path / "bank.pt")
    assert torch.equal(reloaded.foreground[3], bank.foreground[3])


def test_bank_is_reused_only_with_the_same_choices_and_head(amn, tmp_path, caplog):
    model = StandInAMN()
    dataset = _ProtoSet()
    base_dir, png_dir = _write_split_inputs(amn, model, dataset, tmp_path)
    cfg = LPCAMConfig.preset("voc", num_clusters=2)
    bank_path = tmp_path / "bank.pt"
    first = build(amn, model, dataset, cfg, base_dir, png_dir, bank_path)
    with caplog.at_level(logging.INFO, logger="lpcam_core.run.bank_loop"):
        again = build(amn, model, dataset, cfg, base_dir, png_dir, bank_path)
    assert "reusing" in caplog.text
    assert torch.equal(first.foreground[0], again.foreground[0])
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="lpcam_core.run.bank_loop"):
        build(amn, model, dataset, cfg, base_dir, png_dir, bank_path, softmax=21)
    assert "rebuilding" in caplog.text and "amn_choices" in caplog.text
    caplog.clear()
    with torch.no_grad():
        model.classifier[1].c0.bias.add_(1.0)
    with caplog.at_level(logging.WARNING, logger="lpcam_core.run.bank_loop"):
        build(amn, model, dataset, cfg, base_dir, png_dir, bank_path, softmax=21)
    assert "rebuilding" in caplog.text and "another classifier" in caplog.text  # the head changed


def test_two_builds_give_identical_banks(amn, tmp_path):
    model = StandInAMN()
    dataset = _ProtoSet()
    base_dir, png_dir = _write_split_inputs(amn, model, dataset, tmp_path)
    cfg = LPCAMConfig.preset("voc", num_clusters=3)
    banks = [build(amn, model, dataset, cfg, base_dir, png_dir) for _ in range(2)]
    for c in banks[0].classes:
        assert torch.equal(banks[0].foreground[c], banks[1].foreground[c])
        assert torch.equal(banks[0].context[c], banks[1].context[c])


# --------------------------------------------------------------------------- file format


def test_record_is_the_core_map_behind_a_placeholder_background(amn):
    model = StandInAMN()
    g = torch.Generator().manual_seed(0)
    bank = PrototypeBank({1: torch.randn(2, 8, generator=g), 3: torch.randn(3, 8, generator=g)},
                         {1: torch.randn(2, 8, generator=g)}, {"num_classes": 20})
    label = labels_of(1, 3)
    keys = torch.nonzero(label)[:, 0]
    views = [torch.randn(2, 3, s, s, generator=g) for s in (40, 24)]
    with torch.no_grad():
        feats = [amn.amn_features(model, x, label) for x in views]
    size = (37, 40)
    item = {"img": views, "size": size, "label": label}

    def record(background="one_minus_max", item=item):
        with torch.no_grad():
            return stage_b(amn, model, background=background).lpcam(item, bank)

    rec = record()
    core = lpcam_multiscale(feats, bank, keys, size)
    assert rec["keys"].dtype == torch.int64 and rec["keys"].tolist() == [1, 3]
    assert isinstance(rec["cam"], torch.Tensor) and rec["cam"].shape == (3, 10, 10)
    assert isinstance(rec["high_res"], np.ndarray) and rec["high_res"].shape == (3, 37, 40)
    assert torch.equal(rec["cam"][1:], core["cam"])
    assert np.array_equal(rec["high_res"][1:], core["high_res"])
    torch.testing.assert_close(rec["cam"][0], 1 - core["cam"].amax(0))
    zeros = record("zeros")
    assert not zeros["high_res"][0].any()
    empty = record(item={**item, "label": torch.zeros(20)})
    assert empty["high_res"].shape == (1, 37, 40) and (empty["high_res"][0] == 1).all()


def test_baseline_worker_follows_amns_rules(amn, tmp_path):
    """AMN's maps: softmax channel 0 + present classes; min-max normalised off the ir_label background."""
    from PIL import Image

    model = StandInAMN()
    size = (30, 44)
    png = np.zeros(size, dtype=np.uint8)
    png[5:20, 10:30] = 3
    png[0:3, :] = 255
    (tmp_path / "ir").mkdir()
    Image.fromarray(png).save(tmp_path / "ir" / "2099_000001.png")
    g = torch.Generator().manual_seed(0)
    scales = [torch.randn(2, 3, 30, 44, generator=g), torch.randn(2, 3, 15, 22, generator=g)]
    item = {"name": "2099_000001", "img": [s.numpy() for s in scales], "size": size, "label": labels_of(2, 5)}
    host = stage_b(amn, model, tmp_path / "ir")

    def write(items):
        data = base.Datasets(maps=items, map_ids=[it["name"] for it in items])
        base.write_baseline(host, data, str(tmp_path / "out"), mode="overwrite")

    for _ in range(2):
        write([item])
        rec = load_irn_cam(tmp_path / "out" / "2099_000001.npy")
        if _ == 0:
            first = rec
    assert np.array_equal(first["high_res"], rec["high_res"])  # Dropout off: deterministic
    assert rec["keys"].tolist() == [2, 5]
    assert rec["high_res"].shape == (3, 30, 44) and rec["cam"].shape == (3, 8, 11)
    fg = png != 0
    with torch.no_grad():
        logits = [amn.amn_logits(model, s, labels_of(2, 5)) for s in scales]
    up = sum(F.interpolate(o[:, None], size, mode="bilinear", align_corners=False)[:, 0] for o in logits) / 2
    prob = torch.softmax(up, 0)[[0, 3, 6]].numpy()
    np.testing.assert_allclose(rec["high_res"][:, ~fg], prob[:, ~fg], rtol=1e-5, atol=1e-6)
    for c in range(3):
        lo, hi = prob[c].min(), prob[c].max()
        np.testing.assert_allclose(rec["high_res"][c][fg], (prob[c][fg] - lo) / (hi - lo + 1e-5), rtol=1e-4, atol=1e-5)
    with pytest.raises(FileNotFoundError, match="cam_to_ir_label"):
        write([dict(item, name="2099_000002")])


# --------------------------------------------------------------------------- settings


def choices_of(s):
    return tuple(s.option(k) for k in ("features", "classifier", "softmax", "split", "background"))


def test_settings_defaults(amn):
    s = settings_of(amn, {})
    assert choices_of(s) == ("conditioned", "all_taps", 20, "amn_cam", "one_minus_max")
    assert s.option("stages") == ("a", "b") and s.enabled
    assert s.lpcam == LPCAMConfig.preset("voc")


def test_settings_from_variables(amn):
    s = settings_of(amn, {
        "LPCAM_AMN_FEATURES": "Raw", "LPCAM_AMN_CLASSIFIER": "center", "LPCAM_AMN_SOFTMAX": "21",
        "LPCAM_AMN_SPLIT": "ir_label", "LPCAM_AMN_BACKGROUND": "zeros", "LPCAM_AMN_STAGES": "b",
        "LPCAM_AMN_BANK": "/x/bank.pt", "LPCAM_K": "5",
    })
    assert choices_of(s) == ("raw", "centre", 21, "ir_label", "zeros")
    assert s.option("stages") == ("b",)
    assert s.option("bank_path") == "/x/bank.pt" and s.lpcam.num_clusters == 5
    assert settings_of(amn, {"LPCAM_AMN_STAGES": "none"}).option("stages") == ()
    assert settings_of(amn, {"LPCAM_AMN_STAGES": ""}).option("stages") == ()
    assert settings_of(amn, {"LPCAM_AMN_STAGES": "ab"}).option("stages") == ("a", "b")
    assert not settings_of(amn, {"LPCAM": "0"}).enabled


@pytest.mark.parametrize(
    "env, match",
    [({"LPCAM_AMN_SOFTMAX": "19"}, "softmax"), ({"LPCAM_AMN_SOFTMAX": "x"}, "softmax"),
     ({"LPCAM_AMN_FEATURES": "deep"}, "features"), ({"LPCAM_AMN_SPLIT": "gt"}, "split"),
     ({"LPCAM_AMN_STAGES": "c"}, "stages"), ({"LPCAM_AMN_BACKGROUND": "nan"}, "background")],
)
def test_bad_settings_name_the_setting(amn, env, match):
    with pytest.raises(ValueError, match=f"LPCAM_AMN_{match.upper()}="):  # names the variable
        settings_of(amn, env)


def test_yaml_amn_section(amn, tmp_path):
    path = tmp_path / "lpcam.yaml"
    path.write_text("preset: voc\nnum_clusters: 7\nadapter:\n  workers: 0\namn:\n  softmax: 21\n  split: ir_label\n")
    s = settings_of(amn, {"LPCAM_CONFIG": str(path)})
    assert s.option("softmax") == 21 and s.option("split") == "ir_label" and s.lpcam.num_clusters == 7
    assert s.workers == 0
    s = settings_of(amn, {"LPCAM_CONFIG": str(path), "LPCAM_AMN_SOFTMAX": "20"})
    assert s.option("softmax") == 20  # variables override the file
    path.write_text("amn:\n  colour: red\n")
    with pytest.raises(ValueError, match="colour"):
        settings_of(amn, {"LPCAM_CONFIG": str(path)})
    path.write_text("amn:\n  softmax: 21\nbogus: 1\n")
    with pytest.raises(ValueError, match=str(path)):  # the user's file is named, not a temporary copy
        settings_of(amn, {"LPCAM_CONFIG": str(path)})
    assert not [p for p in os.listdir(tmp_path) if p != "lpcam.yaml"]


# --------------------------------------------------------------------------- registration


def test_install_registers_both_stages(amn):
    with hooks.scoped():
        amn.install()
        amn.install()  # idempotent
        rows = {(p.module, p.name): p for p in hooks.describe_patches("step.")}
        assert ("step.make_cam", "run") in rows and ("step.make_amn_cam", "run") in rows
        assert rows[("step.make_amn_cam", "run")].status == "pending"
        assert rows[("step.make_cam", "run")].owner == "lpcam_adapters.amn"
        text = cli.explain_text(amn.INFO)
        assert "step.make_amn_cam:run" in text and "LPCAM_AMN_SOFTMAX" in text


def test_stage_b_patch_replaces_run_of_a_stand_in_module(amn, monkeypatch):
    import sys
    import types

    calls = []
    with hooks.scoped():
        amn.install()
        module = types.ModuleType("step.make_amn_cam")
        module._work = lambda *a: None
        module.run = lambda args: calls.append("host")
        monkeypatch.setitem(sys.modules, "step.make_amn_cam", module)
        hooks.apply_patches(module)
        assert hooks.original(module.run) is not module.run
        monkeypatch.setattr(amn, "make_amn_cam_pass", lambda args, original: calls.append(("lpcam", original)))
        module.run("args")
        assert calls and calls[0][0] == "lpcam"
        hooks.unregister_patch("step.make_amn_cam", "run")
        module.run("args")
        assert calls[-1] == "host"  # unregistering restores AMN's own run


def test_class_absent_from_every_ir_label_gets_no_prototype(amn, tmp_path, caplog):
    from PIL import Image

    model = StandInAMN()
    dataset = _ProtoSet()
    png_dir = tmp_path / "ir_label"
    png_dir.mkdir()
    rng = np.random.default_rng(0)
    for item in dataset.items:  # class 3 is labelled on half the images but never in the PNGs
        keys = [int(k) for k in torch.nonzero(item["label"])[:, 0] if k != 3]
        values = np.array([0, 255] + [k + 1 for k in keys], dtype=np.uint8)
        Image.fromarray(values[rng.integers(0, len(values), (48, 48))]).save(png_dir / f"{item['name']}.png")
    cfg = LPCAMConfig.preset("voc", num_clusters=2)
    for features in ("raw", "conditioned"):
        with caplog.at_level(logging.WARNING):
            bank = build(amn, model, dataset, cfg, None, png_dir, features=features, split="ir_label")
        assert bank.classes == [0, 1, 2]
    assert "class 3" in caplog.text


# --------------------------------------------------------------------------- CLI and patch


def amn_checkout(root, text):
    for rel, marker in {**irn_family.SIGNATURE, "step/make_amn_cam.py": "def _work"}.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(f"{marker}(x):\n    pass\n")
    (root / "run_sample.py").write_text(text)
    return root / "run_sample.py"


def test_patch_applies_once_and_reverts(amn, tmp_path):
    original = "import argparse\nimport os\n\nfrom misc import pyutils\n"
    script = amn_checkout(tmp_path, original)
    assert cli.patch_entry_script(tmp_path, amn.INFO, check=True) == "would be applied"
    assert script.read_text() == original
    assert cli.patch_entry_script(tmp_path, amn.INFO) == "applied"
    assert script.read_text().splitlines()[0].startswith("import lpcam_adapters.amn")
    assert cli.patch_entry_script(tmp_path, amn.INFO) == "already applied"
    assert cli.patch_entry_script(tmp_path, amn.INFO, revert=True) == "reverted"
    assert script.read_text() == original
    assert cli.patch_entry_script(tmp_path, amn.INFO, revert=True) == "not applied"
    script.write_text("print('something else')\n")
    with pytest.raises(ValueError, match="lpcam_adapters.amn"):
        cli.patch_entry_script(tmp_path, amn.INFO)
    with pytest.raises(FileNotFoundError, match="AMN"):
        cli.patch_entry_script(tmp_path / "missing", amn.INFO)


def test_patch_adds_only_the_import_line(amn):
    added = [line for line in cli.patch_text(amn.INFO).splitlines() if line.startswith("+") and not line.startswith("+++")]
    assert len(added) == 1 and added[0].startswith("+import lpcam_adapters.amn")


def test_cli_commands_parse(amn, capsys):
    import argparse

    parser = argparse.ArgumentParser(prog="lpcam")
    sub = parser.add_subparsers(dest="command")
    amn.register(sub)
    ns = parser.parse_args(["amn", "prototypes", "--host", "H", "--voc12-root", "V", "--weights", "W",
                            "--bank", "B", "--ir-label-dir", "I", "--softmax", "21", "--split", "ir_label"])
    assert ns.func.__name__ == "cmd_prototypes" and ns.opt_softmax == 21 and ns.list == "voc12/train.txt"
    with pytest.raises(SystemExit):  # the stage-(a) ir_label PNGs are required, by the parser
        parser.parse_args(["amn", "prototypes", "--host", "H", "--voc12-root", "V", "--weights", "W", "--bank", "B"])
    assert "--ir-label-dir" in capsys.readouterr().err
    ns = parser.parse_args(["amn", "prototypes", "--host", "H", "--voc12-root", "V", "--weights", "W", "--bank", "B",
                            "--ir-label-dir", "I", "--workers", "0", "--device", "cpu", "--rebuild", "--classifier",
                            "centre", "--softmax", "21"])
    settings = irn_family.cli_settings(ns, amn.INFO)
    assert settings.option("softmax") == 21 and settings.option("classifier") == "centre" and settings.rebuild_bank
    assert settings.enabled and settings.workers == 0
    ns = parser.parse_args(["amn", "make", "--host", "H", "--voc12-root", "V", "--weights", "W", "--out", "O",
                            "--ir-label-dir", "I"])
    with pytest.raises(ValueError, match="--bank"):
        ns.func(ns)
    ns = parser.parse_args(["amn", "--explain"])
    assert ns.func(ns) == 0
    assert "LPCAM_AMN_SPLIT" in capsys.readouterr().out


def test_amp_record_is_the_core_map_of_the_autocast_features(amn):
    """``LPCAM_AMP=1`` in AMN's stage (b): the label-conditioned features under bfloat16 autocast, the core's
    float32 maps on them, and the maps record says so (a resumed run never mixes precisions)."""
    model = StandInAMN()
    g = torch.Generator().manual_seed(1)
    bank = PrototypeBank({1: torch.randn(2, 8, generator=g)}, {1: torch.randn(2, 8, generator=g)}, {"num_classes": 20})
    label = labels_of(1)
    views = [torch.randn(2, 3, s, s, generator=g) for s in (40, 24)]
    item = {"img": views, "size": (37, 40), "label": label}
    host = stage_b(amn, model)
    host.amp = settings_of(amn, {"LPCAM_AMP": "1"}).option("amp")
    with torch.no_grad():
        rec = host.lpcam(item, bank)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            feats = [amn.amn_features(model, x, label) for x in views]
    assert feats[0].dtype == torch.bfloat16
    core = lpcam_multiscale([f.float() for f in feats], bank, [1], (37, 40))
    np.testing.assert_allclose(rec["high_res"][1:], core["high_res"], atol=1e-6)
    assert host.maps_record("lpcam", None)["amp"] == "bfloat16"
    assert "amp" not in stage_b(amn, model).maps_record("lpcam", None)

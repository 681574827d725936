"""lpcam_adapters.mctformer on stand-ins of MCTformer's modules (no host checkout needed).

The stand-ins are written here from the shapes HOSTS.md documents (a conv head on patch tokens,
``F.relu`` of its output as PatchCAM, attention x PatchCAM as 'fused'); the real host is exercised
in tests/hosts/test_mctformer.py.
"""

from __future__ import annotations

import os
import sys
import types

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from lpcam_adapters import cli, hooks
from lpcam_adapters import mctformer as mct
from lpcam_adapters.settings import HostSettings
from lpcam_core import LPCAMConfig, PrototypeBank, lpcam_map
from lpcam_core.formats import load_mctformer_cam


def _host_settings(lpcam=None, **kw):
    """MCTformer's settings: ``build``/``head``/``flip`` go to the options, the rest to the common fields."""
    names = {o.name for o in mct.OPTIONS}
    opts = {**{o.name: o.default for o in mct.OPTIONS}, **{k: v for k, v in kw.items() if k in names}}
    common = {k: v for k, v in kw.items() if k not in names}
    return HostSettings(lpcam=lpcam or mct.settings_for().lpcam, options=opts, **common)

NUM_CLASSES, DIM = 4, 8

STAND_IN_MODELS = '''
import torch
import torch.nn as nn
import torch.nn.functional as F


class _Base(nn.Module):
    sqrt = False

    def __init__(self, num_classes=4, embed_dim=8):
        super().__init__()
        self.num_classes, self.embed_dim = num_classes, embed_dim
        self.stem = nn.Conv2d(3, embed_dim, 16, 16)
        self.head = nn.Conv2d(embed_dim, num_classes, 3, padding=1)
        self.attn = nn.Conv2d(embed_dim, num_classes, 1)

    def forward_features(self, x):
        t = self.stem(x)
        return None, t.flatten(2).transpose(1, 2), []

    def extra(self, logits):
        return logits

    def forward(self, x, return_att=False, n_layers=12, attention_type="fused"):
        t = self.stem(x)
        out = self.head(t)
        fm = F.relu(out.detach().clone())
        att = torch.sigmoid(self.attn(t))
        logits = self.extra(out.mean((2, 3)))
        if not return_att:
            return logits
        if attention_type == "fused":
            cams = att * fm
            if self.sqrt:
                cams = torch.sqrt(cams)
        elif attention_type == "patchcam":
            cams = fm
        else:
            cams = att
        return logits, cams, att


class MCTformerV2(_Base):
    pass


class MCTformerPlus(_Base):
    sqrt = True

    def extra(self, logits):
        w = torch.logspace(0, 1, logits.shape[1], base=0.9).cuda()
        return logits * w


class MCTformerV1(nn.Module):
    def __init__(self, num_classes=4, embed_dim=8):
        super().__init__()
        self.num_classes, self.embed_dim = num_classes, embed_dim
        self.head = nn.Identity()
'''


@pytest.fixture
def models():
    """A stand-in ``models`` module patched by the adapter's registered patches (undone after)."""
    with hooks.scoped():
        mct.install()
        module = types.ModuleType("models")
        exec(compile(STAND_IN_MODELS, "<stand-in models>", "exec"), module.__dict__)
        hooks.apply_patches(module)
        yield module


def _bank(seed: int = 0, classes=range(NUM_CLASSES), no_context=()) -> PrototypeBank:
    g = torch.Generator().manual_seed(seed)
    fg = {c: torch.randn(3, DIM, generator=g) for c in classes}
    ctx = {c: (torch.randn(2, DIM, generator=g) if c not in no_context else torch.empty(0, DIM)) for c in classes}
    return PrototypeBank(fg, ctx, {"num_classes": NUM_CLASSES})


def _model(models, name="MCTformerV2", seed=0):
    torch.manual_seed(seed)
    return getattr(models, name)(NUM_CLASSES, DIM).eval()


def _tokens(model, x):
    return model.stem(x)


# --------------------------------------------------------------------------- settings


def test_settings_defaults_and_env(tmp_path):
    s = mct.settings_for(None, {})
    assert s.enabled and (s.option("head"), s.option("flip"), s.option("build")) == ("sum", "view", "auto")
    assert s.lpcam.fg_threshold == mct.DEFAULT_TAU and s.lpcam.num_clusters == 12
    assert mct.settings_for(types.SimpleNamespace(data_set="COCOMS"), {}).lpcam.num_clusters == 20
    s = mct.settings_for(None, {"LPCAM": "0", "LPCAM_TAU": "0.3", "LPCAM_K": "5", "LPCAM_MU": "0.8",
                                "LPCAM_HEAD": "center", "LPCAM_FLIP": "feature", "LPCAM_BANK": "b.pt"})
    assert not s.enabled and s.lpcam.fg_threshold == 0.3 and s.lpcam.num_clusters == 5
    assert s.lpcam.class_threshold == s.lpcam.context_high == 0.8
    assert (s.option("head"), s.option("flip"), s.bank_path) == ("centre", "feature", "b.pt")
    cfg = tmp_path / "c.yaml"
    cfg.write_text("num_clusters: 7\nadapter:\n  flip: feature\n  build: never\n")
    s = mct.settings_for(None, {"LPCAM_CONFIG": str(cfg)})
    assert s.lpcam.num_clusters == 7 and s.option("flip") == "feature" and s.option("build") == "never"


@pytest.mark.parametrize("env, match", [({"LPCAM_TAU": "x"}, "LPCAM_TAU"), ({"LPCAM_FLIP": "both"}, "LPCAM_FLIP"),
                                        ({"LPCAM_HEAD": "mean"}, "LPCAM_HEAD"), ({"LPCAM": "maybe"}, "LPCAM")])
def test_settings_errors_name_the_setting(env, match):
    with pytest.raises(ValueError, match=match):
        mct.settings_for(None, env)


def test_settings_yaml_unknown_adapter_key(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("adapter:\n  flipp: view\n")
    with pytest.raises(ValueError, match="flipp"):
        mct.settings_for(None, {"LPCAM_CONFIG": str(cfg)})


# --------------------------------------------------------------------------- model access


def test_v1_is_refused_with_reason(models):
    v1 = models.MCTformerV1()
    with pytest.raises(mct.UnsupportedModelError, match="patch classifier"):
        mct.host_kind(v1)
    with pytest.raises(mct.UnsupportedModelError, match="LPCAM=0"):
        mct.generate(lambda *a: None, [], v1, "cpu", types.SimpleNamespace(), _host_settings())


def test_v1_refused_only_when_lpcam_on(models):
    called = []
    mct.generate(lambda *a: called.append(a), [], models.MCTformerV1(), "cpu", types.SimpleNamespace(),
                 _host_settings(enabled=False))
    assert len(called) == 1


def test_score_weight_sum_and_centre(models):
    model = _model(models)
    w, b = mct.score_weight(model, "sum")
    assert w.shape == (NUM_CLASSES, DIM) and torch.allclose(w, model.head.weight.sum((2, 3)))
    assert torch.equal(b, model.head.bias)
    # exact response of the conv to a constant map in the interior
    f = torch.randn(DIM)
    out = model.head(f.view(1, DIM, 1, 1).expand(1, DIM, 5, 5))[0, :, 2, 2]
    assert torch.allclose(out, w @ f + b, atol=1e-5)
    wc, _ = mct.score_weight(model, "centre")
    assert torch.equal(wc, model.head.weight[:, :, 1, 1])


def test_patch_tokens_are_the_head_input(models):
    model = _model(models)
    x = torch.randn(2, 3, 48, 32)
    assert torch.equal(mct.patch_tokens(model, x), _tokens(model, x))


# --------------------------------------------------------------------------- the swap


@pytest.mark.parametrize("name", ["MCTformerV2", "MCTformerPlus"])
def test_swap_replaces_patchcam_with_core_lpcam(models, name):
    model, bank = _model(models, name), _bank()
    x = torch.randn(1, 3, 48, 64)
    ref_logits, ref_fused, ref_att = model(x, return_att=True)
    with mct.swap(model, bank):
        logits, patchcam, att = model(x, return_att=True, attention_type="patchcam")
        _, fused, _ = model(x, return_att=True, attention_type="fused")
        _, mtatt, _ = model(x, return_att=True, attention_type="mct")
        plain = model(x)
    expected = lpcam_map(_tokens(model, x), bank, range(NUM_CLASSES)).clamp_min(0)
    assert patchcam.dtype == torch.float32
    assert torch.equal(patchcam, expected)
    combined = mtatt * expected
    assert torch.allclose(fused, combined.sqrt() if name == "MCTformerPlus" else combined)
    assert torch.equal(logits, ref_logits) and torch.equal(att, ref_att) and torch.equal(plain, ref_logits)
    assert torch.equal(mtatt, ref_att)
    # outside the block: the host's forward again, bit for bit
    again = model(x, return_att=True)
    assert all(torch.equal(a, b) for a, b in zip(again, (ref_logits, ref_fused, ref_att)))
    assert "_lpcam_swap" not in model.__dict__


def test_unswapped_forward_is_the_original(models):
    model = _model(models)
    x = torch.randn(1, 3, 32, 32)
    original = type(model).forward.__wrapped__
    for att_type in ("fused", "patchcam", "mct"):
        a = model(x, return_att=True, attention_type=att_type)
        b = original(model, x, return_att=True, attention_type=att_type)
        assert all(torch.equal(u, v) for u, v in zip(a, b))


def test_classes_without_prototypes_get_zero_maps(models):
    model, bank = _model(models), _bank(classes=(1, 3), no_context=(3,))
    x = torch.randn(1, 3, 32, 48)
    with mct.swap(model, bank):
        _, cams, _ = model(x, return_att=True, attention_type="patchcam")
    assert cams[:, [0, 2]].abs().sum() == 0
    raw = lpcam_map(_tokens(model, x), bank, [1, 3])
    assert torch.equal(cams[:, [1, 3]], raw.clamp_min(0))  # class 3 has no context: ReLU keeps it >= 0
    assert (cams >= 0).all()


def test_lpcam_is_float32_under_autocast(models):
    model, bank = _model(models), _bank()
    x = torch.randn(1, 3, 32, 32)
    with mct.swap(model, bank), torch.autocast("cpu", dtype=torch.bfloat16):
        _, cams, _ = model(x, return_att=True, attention_type="patchcam")
        tokens = mct.patch_tokens(model, x)
    assert tokens.dtype == torch.bfloat16 and cams.dtype == torch.float32
    assert torch.equal(cams, lpcam_map(tokens.float(), bank, range(NUM_CLASSES)).clamp_min(0))


def test_feature_flip_fusion_matches_official(models):
    model, bank = _model(models), _bank()
    x = torch.randn(1, 3, 32, 48)
    fused = _tokens(model, x) + _tokens(model, x.flip(-1)).flip(-1)
    expected = lpcam_map(fused, bank, range(NUM_CLASSES)).clamp_min(0)
    with mct.swap(model, bank, flip="feature"):
        _, view0, _ = model(x, return_att=True, attention_type="patchcam")
        _, view1, _ = model(x.flip(-1), return_att=True, attention_type="patchcam")
    assert torch.allclose(view0, expected, atol=1e-6)
    assert torch.allclose(view1, expected.flip(-1), atol=1e-6)


def test_swap_needs_a_patched_class_and_a_fitting_bank(models):
    class Plain(nn.Module):
        def __init__(self):
            super().__init__()
            self.head, self.num_classes, self.embed_dim = nn.Conv2d(DIM, NUM_CLASSES, 3, padding=1), NUM_CLASSES, DIM

        def forward(self, x, return_att=False):
            return x

    Plain.__name__ = "MCTformerV2"
    with pytest.raises(RuntimeError, match="not patched"):
        with mct.swap(Plain(), _bank()):
            pass
    wrong = PrototypeBank({0: torch.randn(2, DIM + 1)}, {}, {"num_classes": NUM_CLASSES})
    with pytest.raises(ValueError, match="features"):
        with mct.swap(_model(models), wrong):
            pass


def test_plus_cuda_call_follows_the_input_device(models):
    assert isinstance(models.torch, types.ModuleType) and models.torch is not torch
    model = _model(models, "MCTformerPlus")
    out = model(torch.randn(1, 3, 32, 32))  # logspace(...).cuda() on a CPU-only machine
    assert out.device.type == "cpu"


def test_patches_are_listed_and_undone():
    with hooks.scoped():
        mct.install()
        module = types.ModuleType("models")
        exec(compile(STAND_IN_MODELS, "<stand-in models>", "exec"), module.__dict__)
        original = module.MCTformerV2.forward
        hooks.apply_patches(module)
        assert module.MCTformerV2.forward is not original and module.F is not F
        text = cli.explain_text(mct.INFO)
        assert "lpcam_swap" in text and "LPCAM_FLIP" in text
    assert module.MCTformerV2.forward is original and module.F is F and module.torch is torch


def test_foreign_models_module_is_left_alone():
    with hooks.scoped():
        mct.install()
        module = types.ModuleType("models")
        exec("import torch.nn.functional as F\nclass Net: pass\n", module.__dict__)
        hooks.apply_patches(module)
        assert module.F is F


# --------------------------------------------------------------------------- shims


def test_pil_cubic_alias_is_module_local():
    import PIL
    import PIL.Image

    proxy = mct._pil_with_cubic(PIL)
    assert proxy.Image.CUBIC == PIL.Image.Resampling.BICUBIC
    assert proxy.Image.open is PIL.Image.open
    if not hasattr(PIL.Image, "CUBIC"):
        assert proxy is not PIL


def test_timm_entrypoints_drop_pretrained_cfg():
    registry = pytest.importorskip("timm.models._registry")
    module = types.ModuleType("lpcam_test_fake_models")
    seen = {}

    def fake_entry(pretrained=False, **kwargs):
        seen.update(kwargs)
        return kwargs

    fake_entry.__module__ = module.__name__
    registry._model_entrypoints["lpcam_test_fake_entry"] = fake_entry
    try:
        undo = mct._patch_timm_entrypoints(module)
        wrapped = registry._model_entrypoints["lpcam_test_fake_entry"]
        wrapped(pretrained=False, pretrained_cfg=None, pretrained_cfg_overlay=None, cache_dir=None, num_classes=3)
        assert seen == {"num_classes": 3}
        undo()
        assert registry._model_entrypoints["lpcam_test_fake_entry"] is fake_entry
    finally:
        registry._model_entrypoints.pop("lpcam_test_fake_entry", None)


# --------------------------------------------------------------------------- the generation pass


class _Dataset(torch.utils.data.Dataset):
    """Stand-in of MCTformer's VOC12DatasetMS: ([img, flip] per scale, multi-hot label)."""

    def __init__(self, ids, images, labels, scales):
        self.ids, self.images, self.labels, self.scales = ids, images, labels, scales
        self.img_name_list, self.label_list = ids, [labels[i] for i in ids]

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        img = self.images[self.ids[i]]
        views = []
        for s in self.scales:
            size = (int(round(img.shape[1] * s)), int(round(img.shape[2] * s)))
            v = F.interpolate(img[None], size=size, mode="bilinear", align_corners=False)[0]
            views += [v, v.flip(-1)]
        return views, torch.from_numpy(self.labels[self.ids[i]])


@torch.no_grad()
def _stand_in_engine(data_loader, model, device, args):
    """Stand-in of generate_attention_maps_ms: per view, resize, flip back, sum, min-max, save."""
    names = open(os.path.join(args.img_list, "train_aug_id.txt")).read().split()
    os.makedirs(args.cam_npy_dir, exist_ok=True)
    for index, (views, target) in enumerate(data_loader):
        h, w = views[0].shape[2:]
        total = 0
        for s, v in enumerate(views):
            _, cams, _ = model(v, return_att=True, attention_type=args.attention_type)
            cams = F.interpolate(cams, size=(h, w), mode="bilinear", align_corners=False)[0]
            cams = cams * target.view(-1, 1, 1)
            total = total + (cams.flip(-1) if s % 2 else cams)
        out = {}
        for c in torch.nonzero(target[0])[:, 0].tolist():
            m = total[c]
            out[c] = ((m - m.min()) / (m.max() - m.min() + 1e-8)).numpy()
        np.save(os.path.join(args.cam_npy_dir, names[index] + ".npy"), out)


@pytest.fixture
def host_run(tmp_path, models):
    """A stand-in host run: datasets module, id lists, args, model."""
    g = torch.Generator().manual_seed(0)
    ids = [f"2099_{i:06d}" for i in range(6)]
    images = {i: torch.randn(3, 48, 64, generator=g) for i in ids}
    eye = np.eye(NUM_CLASSES, dtype=np.float32)
    labels = {i: eye[k % NUM_CLASSES] + eye[(k + 1) % NUM_CLASSES] for k, i in enumerate(ids)}
    datasets = types.ModuleType("datasets")

    def build_dataset(is_train, args, gen_attn=False):
        names = open(os.path.join(args.img_list, "train_aug_id.txt")).read().split()
        return _Dataset(names, images, labels, args.scales), NUM_CLASSES

    datasets.build_dataset = build_dataset
    lists = tmp_path / "lists"
    lists.mkdir()
    (lists / "train_aug_id.txt").write_text("\n".join(ids) + "\n")
    (lists / "train_id.txt").write_text("\n".join(ids[:4]) + "\n")
    args = types.SimpleNamespace(img_list=str(lists), cam_npy_dir=str(tmp_path / "out"), attention_dir=None,
                                 visualize_cls_attn=True, scales=[1.0, 0.5], attention_type="fused",
                                 resume=str(tmp_path / "ckpt.pth"), num_workers=0, pin_mem=False, data_set="VOC12MS")
    saved = sys.modules.get("datasets")
    sys.modules["datasets"] = datasets
    try:
        yield types.SimpleNamespace(model=_model(models), args=args, ids=ids, tmp=tmp_path,
                                    loader=lambda: torch.utils.data.DataLoader(build_dataset(False, args)[0], batch_size=1))
    finally:
        if saved is None:
            sys.modules.pop("datasets", None)
        else:
            sys.modules["datasets"] = saved


def _settings(**kw):
    return _host_settings(lpcam=LPCAMConfig.preset("voc", num_clusters=2, fg_threshold=0.3, class_threshold=0.0,
                                                         context_low=0.0, context_high=1.0), **kw)


def test_generate_builds_bank_then_swaps(host_run):
    run, settings = host_run, _settings()
    mct.generate(_stand_in_engine, run.loader(), run.model, "cpu", run.args, settings)
    bank_path = run.tmp / "ckpt.lpcam_bank.pt"
    baseline = run.tmp / "out_baseline"
    assert bank_path.is_file() and sorted(os.listdir(baseline)) == [f"{i}.npy" for i in run.ids[:4]]
    bank = PrototypeBank.load(bank_path)
    assert bank.meta["head"] == "sum" and bank.meta["model"] == "MCTformerV2" and bank.meta["images_seen"] == 4
    w, b = mct.score_weight(run.model)
    bank.check_fits(classifier_weight=w, bias=b, num_classes=NUM_CLASSES, feature_dim=DIM)
    lp = {i: load_mctformer_cam(run.tmp / "out" / f"{i}.npy") for i in run.ids}
    # baseline maps are the stand-in engine's own, unswapped
    os.rename(run.tmp / "out", run.tmp / "lp")
    mct.generate(_stand_in_engine, run.loader(), run.model, "cpu", run.args, _host_settings(enabled=False))
    for i in run.ids[:4]:
        base, own = load_mctformer_cam(baseline / f"{i}.npy"), load_mctformer_cam(run.tmp / "out" / f"{i}.npy")
        assert all(np.array_equal(base[k], own[k]) for k in own)
    assert any(not np.array_equal(lp[i][k], load_mctformer_cam(run.tmp / "out" / f"{i}.npy")[k])
               for i in run.ids for k in lp[i])
    assert "_lpcam_swap" not in run.model.__dict__


def test_generate_reuses_a_matching_bank_and_rebuilds_otherwise(host_run, caplog):
    run = host_run
    mct.generate(_stand_in_engine, run.loader(), run.model, "cpu", run.args, _settings())
    stamp = os.stat(run.tmp / "ckpt.lpcam_bank.pt").st_mtime_ns
    caplog.set_level("INFO")
    mct.generate(_stand_in_engine, run.loader(), run.model, "cpu", run.args, _settings())
    assert os.stat(run.tmp / "ckpt.lpcam_bank.pt").st_mtime_ns == stamp
    assert "using the prototype bank" in caplog.text
    with torch.no_grad():
        run.model.head.weight.add_(0.1)  # another checkpoint
    with pytest.raises(ValueError, match="classifier"):
        mct.generate(_stand_in_engine, run.loader(), run.model, "cpu", run.args, _settings(build="never"))
    mct.generate(_stand_in_engine, run.loader(), run.model, "cpu", run.args, _settings())
    assert "rebuilding the prototype bank" in caplog.text


def test_build_never_and_only(host_run):
    run = host_run
    with pytest.raises(FileNotFoundError, match="LPCAM_BUILD=never"):
        mct.generate(_stand_in_engine, run.loader(), run.model, "cpu", run.args, _settings(build="never"))
    mct.generate(_stand_in_engine, run.loader(), run.model, "cpu", run.args, _settings(build="only"))
    assert (run.tmp / "ckpt.lpcam_bank.pt").is_file() and not (run.tmp / "out").exists()


def test_bank_building_is_bounded_by_the_memory_budget(host_run):
    run = host_run
    cfg = LPCAMConfig.preset("voc", num_clusters=2, fg_threshold=0.3, class_threshold=0.0, context_low=0.0,
                             context_high=1.0, memory_budget_bytes=64 * DIM * 4)
    mct.ensure_bank(_stand_in_engine, run.model, "cpu", run.args, _host_settings(lpcam=cfg))
    bank = PrototypeBank.load(run.tmp / "ckpt.lpcam_bank.pt")
    assert bank.meta["pool_peak_bytes"] <= 64 * DIM * 4 + 4 * DIM * 4 * 12  # budget plus one image's rows
    seen, held = bank.meta["features_seen"], bank.meta["features_clustered"]
    assert sum(held.values()) < sum(seen.values())


def test_baseline_dir_must_differ_from_output(host_run):
    run = host_run
    with pytest.raises(ValueError, match="choose another"):
        mct.generate(_stand_in_engine, run.loader(), run.model, "cpu", run.args, _settings(baseline_dir=run.args.cam_npy_dir))


# --------------------------------------------------------------------------- CLI


def test_patch_applies_checks_and_reverts(tmp_path):
    assert "+import lpcam_adapters.mctformer" in cli.patch_text(mct.INFO)
    main = tmp_path / "main.py"
    text = "import argparse\nimport datetime\nimport time\nimport torch\n"
    main.write_text(text)
    (tmp_path / "engine.py").write_text("def generate_attention_maps_ms(data_loader, model, device, args):\n    pass\n")
    (tmp_path / "models.py").write_text("class MCTformerV2:\n    pass\n")

    def patch(**kw):
        return cli.patch_entry_script(tmp_path, mct.INFO, **kw)

    assert patch(check=True) == "would be applied" and main.read_text() == text
    assert patch() == "applied"
    assert main.read_text().splitlines()[0].startswith("import lpcam_adapters.mctformer")
    assert patch() == "already applied"
    assert patch(revert=True) == "reverted" and main.read_text() == text
    assert patch(revert=True) == "not applied"
    main.write_text("import os\n")
    with pytest.raises(ValueError, match="no line 'import argparse'"):
        patch()
    with pytest.raises(FileNotFoundError, match="MCTformer"):
        cli.patch_entry_script(tmp_path / "nowhere", mct.INFO)


def test_cli_parses_steps_into_settings(monkeypatch, tmp_path):
    import argparse

    monkeypatch.chdir(tmp_path)
    (tmp_path / "c.pth").write_bytes(b"")  # the checkpoint --resume names

    parser = argparse.ArgumentParser(prog="lpcam")
    mct.register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["mctformer", "make", "--host", "H", "--tau", "0.2", "--flip", "feature", "--head", "centre",
                              "--", "--model", "m", "--resume", "c.pth"])
    calls = []
    monkeypatch.setattr(mct, "run_host_main", lambda host, argv, environ: calls.append((host, argv, environ)))
    assert args.func(args) == 0
    host, argv, env = calls[0]
    assert host == "H" and argv == ["--model", "m", "--resume", "c.pth", "--gen_attention_maps"]
    # no --build: the run's LPCAM_BUILD (environment, YAML) decides, default auto
    assert env == {"LPCAM_TAU": "0.2", "LPCAM_FLIP": "feature", "LPCAM_HEAD": "centre", "LPCAM": "1"}
    args = parser.parse_args(["mctformer", "make", "--host", "H", "--build", "never", "--", "--resume", "c.pth"])
    args.func(args)
    assert calls[-1][2] == {"LPCAM": "1", "LPCAM_BUILD": "never"}
    del calls[1:]
    args = parser.parse_args(["mctformer", "prototypes", "--host", "H", "--k", "6", "--", "--gen_attention_maps",
                              "--resume", "c.pth"])
    args.func(args)
    assert calls[1][1] == ["--gen_attention_maps", "--resume", "c.pth"]
    assert calls[1][2] == {"LPCAM_K": "6", "LPCAM": "1", "LPCAM_BUILD": "only"}
    args = parser.parse_args(["mctformer", "make", "--host", "H", "--off", "--", "--resume", "c.pth"])
    args.func(args)
    assert calls[2][2]["LPCAM"] == "0"
    args = parser.parse_args(["mctformer", "make", "--host", "H"])
    with pytest.raises(ValueError, match="main.py arguments"):
        args.func(args)
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    args = parser.parse_args(["mctformer", "make", "--host", "H", "--", "--x"])
    with pytest.raises(ValueError, match="does not run under torchrun.*one process"):
        args.func(args)
    assert len(calls) == 3


def test_run_host_main_restores_argv_path_and_env(tmp_path, monkeypatch):
    (tmp_path / "main.py").write_text(
        "import os, sys\nopen(os.environ['OUT'], 'w').write(' '.join(sys.argv[1:]) + '|' + os.environ['LPCAM_TAU'])\n"
    )
    out = tmp_path / "out.txt"
    monkeypatch.setenv("OUT", str(out))
    monkeypatch.delenv("LPCAM_TAU", raising=False)
    argv, path = list(sys.argv), list(sys.path)
    with hooks.scoped():
        mct.run_host_main(tmp_path, ["--a", "1"], environ={"LPCAM_TAU": "0.2"})
    assert out.read_text() == "--a 1|0.2"
    assert sys.argv == argv and sys.path == path and "LPCAM_TAU" not in os.environ
    with pytest.raises(FileNotFoundError, match="MCTformer"):
        mct.run_host_main(tmp_path / "nowhere", [])


def test_coco_style_sampling_feeds_only_the_drawn_class(host_run):
    run = host_run
    cfg = LPCAMConfig.preset("coco", num_clusters=2, fg_threshold=0.3, class_threshold=0.0, context_low=0.0,
                             context_high=1.0, images_per_class=2)
    settings = _host_settings(lpcam=cfg)
    picks = mct.prototype_picks(run.args, run.ids[:4], settings, NUM_CLASSES)
    assert len(picks) == 2 * NUM_CLASSES and all(c is not None for c, _ in picks)
    assert picks == mct.prototype_picks(run.args, run.ids[:4], settings, NUM_CLASSES)  # seeded
    mct.ensure_bank(_stand_in_engine, run.model, "cpu", run.args, settings)
    bank = PrototypeBank.load(run.tmp / "ckpt.lpcam_bank.pt")
    assert bank.meta["images_seen"] == len(picks)
    assert sorted(p.stem for p in (run.tmp / "out_baseline").glob("*.npy")) == sorted({i for _, i in picks})


def _engine_with_a_zero_map(data_loader, model, device, args):
    _stand_in_engine(data_loader, model, device, args)
    np.save(os.path.join(args.cam_npy_dir, "extra.npy"), {0: np.zeros((4, 4)), 1: np.ones((4, 4))})


def test_all_zero_maps_the_engine_saves_are_warned_about(host_run, caplog):
    run = host_run
    real_save = np.save
    with caplog.at_level("WARNING", logger="lpcam_adapters.mctformer"):
        mct.generate(_engine_with_a_zero_map, run.loader(), run.model, "cpu", run.args, _settings())
    warned = [r.getMessage() for r in caplog.records if "all zero" in r.getMessage()]
    maps = sum(len(load_mctformer_cam(run.tmp / "out" / f"{i}.npy")) for i in run.ids) + 2
    assert len(warned) == 1 and warned[0].startswith("1 of ") and f" of the {maps} class maps" in warned[0], warned
    import numpy

    assert globals()["np"] is numpy and numpy.save is real_save, "the engine's numpy is restored"
    caplog.clear()
    with caplog.at_level("WARNING", logger="lpcam_adapters.mctformer"):  # LPCAM=0: the host's run is not inspected
        mct.generate(_engine_with_a_zero_map, run.loader(), run.model, "cpu", run.args, _host_settings(enabled=False))
    assert not [r for r in caplog.records if "all zero" in r.getMessage()]


def test_steps_name_a_missing_checkpoint_before_the_host_starts(tmp_path, monkeypatch):
    import argparse

    parser = argparse.ArgumentParser(prog="lpcam")
    mct.register(parser.add_subparsers(dest="command"))
    started = []
    monkeypatch.setattr(mct, "run_host_main", lambda host, argv, environ: started.append(argv))
    monkeypatch.chdir(tmp_path)
    for rest, error in ((["--model", "m"], "needs --resume"), (["--resume", "nowhere.pth"], "--resume nowhere.pth: no such"),
                        (["--resume="], "needs --resume")):
        args = parser.parse_args(["mctformer", "prototypes", "--host", "H", "--", *rest])
        with pytest.raises((ValueError, FileNotFoundError), match=error):
            args.func(args)
    (tmp_path / "c.pth").write_bytes(b"")
    for rest in (["--resume", "c.pth"], ["--resume=c.pth"], ["--resume", "https://example.org/c.pth"]):
        args = parser.parse_args(["mctformer", "prototypes", "--host", "H", "--", *rest])
        assert args.func(args) == 0
    assert len(started) == 3

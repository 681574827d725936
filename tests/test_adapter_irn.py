"""lpcam_adapters.irn_family and lpcam_adapters.irn without a real host: settings, work directory,
the passes on a tiny IRN-like network (the real-host runs are in tests/hosts)."""

from __future__ import annotations

import importlib
import os
import sys
import uuid
from argparse import Namespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from lpcam_adapters import base, cli, hooks, irn_family
from lpcam_adapters.settings import HostSettings, read_settings
from lpcam_core import LPCAMConfig, lpcam_multiscale, run

MINI_HOST = '''
import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F


class MiniCAM(nn.Module):
    """IRN's CAM shape in miniature: stage1..4 (stride 16), a bias-free 1x1 classifier."""

    def __init__(self, channels=8, classes=20):
        super().__init__()
        self.stage1 = nn.Conv2d(3, 4, 3, stride=2, padding=1)
        self.stage2 = nn.Sequential(nn.ReLU(), nn.Conv2d(4, 6, 3, stride=2, padding=1))
        self.stage3 = nn.Sequential(nn.ReLU(), nn.Conv2d(6, 8, 3, stride=2, padding=1))
        self.stage4 = nn.Sequential(nn.Conv2d(8, channels, 3, stride=2, padding=1), nn.ReLU())
        self.classifier = nn.Conv2d(channels, classes, 1, bias=False)

    def _cam(self, x, weight):
        x = self.stage4(self.stage3(self.stage2(self.stage1(x))))
        x = F.relu(F.conv2d(x, weight))
        return x[0] + x[1].flip(-1)

    def forward(self, x):
        return self._cam(x, self.classifier.weight)

    def forward2(self, x, weight):
        return self._cam(x, weight * self.classifier.weight)


class MiniMSF:
    """VOC12ClassificationDatasetMSF's items: name, img (list over scales of [2,3,h,w]), size, label."""

    def __init__(self, n=4, scales=(1.0, 0.5), seed=0):
        rng = np.random.default_rng(seed)
        self.items = []
        for i in range(n):
            h, w = 40 + 4 * i, 48 - 2 * i
            label = np.zeros(20, np.float32)
            label[rng.choice(3, size=1 + i % 2, replace=False)] = 1
            imgs = []
            for s in scales:
                hs, ws = int(round(h * s)), int(round(w * s))
                x = rng.standard_normal((3, hs, ws)).astype(np.float32)
                imgs.append(np.stack([x, np.flip(x, -1)], 0))
            self.items.append({"name": f"2007_{i:06d}", "img": imgs, "size": (h, w), "label": torch.from_numpy(label)})

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        return self.items[i]


class MiniSingle(MiniMSF):
    """VOC12ClassificationDataset's items (one scale, no flip)."""

    def __getitem__(self, i):
        item = self.items[i]
        return {"name": item["name"], "img": item["img"][0][0], "label": item["label"]}

    @property
    def label_list(self):
        return [it["label"].numpy() for it in self.items]
'''


@pytest.fixture()
def mini(tmp_path, monkeypatch):
    name = f"minihost_{uuid.uuid4().hex[:8]}"
    (tmp_path / f"{name}.py").write_text(MINI_HOST)
    monkeypatch.syspath_prepend(str(tmp_path))
    importlib.invalidate_caches()
    module = importlib.import_module(name)
    torch.manual_seed(0)
    yield module
    sys.modules.pop(name, None)


def host_work(model, dataset, extra=None):
    """IRN's make_cam _work maths (the host file, restated) for the reference."""
    out = {}
    for pack in dataset:
        size = pack["size"]
        strided = ((size[0] - 1) // 4 + 1, (size[1] - 1) // 4 + 1)
        up = (((size[0] - 1) // 16 + 1) * 16, ((size[1] - 1) // 16 + 1) * 16)
        with torch.no_grad():
            outs = [model(torch.from_numpy(i)) if extra is None else model.forward2(torch.from_numpy(i), extra)
                    for i in pack["img"]]
        cam = torch.sum(torch.stack([F.interpolate(o[None], strided, mode="bilinear", align_corners=False)[0] for o in outs]), 0)
        high = torch.sum(torch.stack([F.interpolate(o[:, None], up, mode="bilinear", align_corners=False) for o in outs], 0), 0)
        high = high[:, 0, : size[0], : size[1]]
        keys = torch.nonzero(pack["label"])[:, 0]
        cam, high = cam[keys], high[keys]
        cam /= F.adaptive_max_pool2d(cam, (1, 1)) + 1e-5
        high /= F.adaptive_max_pool2d(high, (1, 1)) + 1e-5
        out[pack["name"]] = (keys, cam, high.numpy())
    return out


def load(path):
    return np.load(path, allow_pickle=True).item()


def host_of(model, extra=None, scales=(1.0, 0.5), **kwargs):
    return irn_family.IRNFamily("mini", "minihost", model, scales, extra_weight=extra, **kwargs)


def maps_data(dataset):
    """The pass's datasets over a mini MSF dataset (maps of every image)."""
    return base.Datasets(maps=dataset, map_ids=[it["name"] for it in dataset.items])


def proto_data(msf, single):
    """The pass's datasets over mini prototype datasets (baselines, pooled features, labels)."""
    ids = [it["name"] for it in msf.items]
    labels = {it["name"]: torch.nonzero(it["label"])[:, 0].tolist() for it in msf.items}
    return base.Datasets(proto=msf, proto_ids=ids, pool=single, labels=labels, maps=msf, map_ids=ids)


def irn_checkout(root, entry="run_sample.py", text="import argparse\nimport os\n\nfrom misc import pyutils\n"):
    """A directory that looks like an IRN checkout to ``lpcam irn patch`` (its signature files)."""
    for rel, marker in irn_family.SIGNATURE.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(f"# host\n{marker}(x):\n    pass\n")
    (root / entry).write_text(text)
    return root / entry


# --------------------------------------------------------------------------- settings


def test_settings_defaults_and_env(tmp_path):
    from lpcam_adapters import recam

    s = read_settings((), {})
    assert s.enabled and s.lpcam == LPCAMConfig.preset("voc") and s.workers is None
    s = read_settings((), {"LPCAM": "0", "LPCAM_K": "5", "LPCAM_TAU": "0.2", "LPCAM_MU": "0.8", "LPCAM_WORKERS": "2",
                           "LPCAM_BANK": "b.pt", "LPCAM_MEMORY_GB": "0.5", "LPCAM_REBUILD_BANK": "yes"})
    assert not s.enabled and s.workers == 2 and s.bank_path == "b.pt" and s.rebuild_bank
    assert (s.lpcam.num_clusters, s.lpcam.fg_threshold, s.lpcam.class_threshold, s.lpcam.context_high) == (5, 0.2, 0.8, 0.8)
    assert s.lpcam.memory_budget_bytes == 512 * 2**20
    s = read_settings((), {"LPCAM_MU": "0.8", "LPCAM_MU_B": "0.7"})
    assert (s.lpcam.class_threshold, s.lpcam.context_high) == (0.8, 0.7)
    with pytest.raises(ValueError, match="LPCAM_K='x'"):
        read_settings((), {"LPCAM_K": "x"})
    with pytest.raises(ValueError, match="LPCAM='maybe'"):
        read_settings((), {"LPCAM": "maybe"})
    assert recam.recam_settings({}).option("classifier") == "cls"  # chosen by benchmarks/recam_choices.py
    assert recam.recam_settings({"LPCAM_BACKBONE": "cam"}).option("backbone") == "cam"
    with pytest.raises(ValueError, match="W_recam"):
        recam.recam_settings({"LPCAM_BACKBONE": "cam", "LPCAM_CLASSIFIER": "recam"})


def test_settings_yaml(tmp_path):
    from lpcam_adapters import recam

    path = tmp_path / "lpcam.yaml"
    path.write_text("preset: coco\nnum_clusters: 7\nadapter:\n  bank: x.pt\n  workers: 3\n  classifier: cls\n")
    s = recam.recam_settings({"LPCAM_CONFIG": str(path), "LPCAM_TAU": "0.3"})
    assert s.lpcam.num_clusters == 7 and s.lpcam.images_per_class == 100 and s.lpcam.fg_threshold == 0.3
    assert (s.bank_path, s.workers, s.option("classifier")) == ("x.pt", 3, "cls")
    path.write_text("adapter:\n  nope: 1\n")
    with pytest.raises(ValueError, match="unknown adapter key"):
        read_settings((), {"LPCAM_CONFIG": str(path)})
    path.write_text("tua: 1\n")
    with pytest.raises(ValueError, match="unknown LPCAM setting"):
        read_settings((), {"LPCAM_CONFIG": str(path)})
    with pytest.raises(FileNotFoundError, match="LPCAM_CONFIG"):
        read_settings((), {"LPCAM_CONFIG": str(tmp_path / "missing.yaml")})


def test_default_paths_and_thresholds():
    irn_args = Namespace(cam_out_dir="result/cam")
    assert irn_family.default_bank_path(irn_args) == os.path.join("result", "lpcam_bank.pt")
    assert irn_family.default_baseline_dir(irn_args) == os.path.join("result", "cam_baseline")
    recam_args = Namespace(cam_out_dir="ws/cam_mask", work_space="ws")
    assert irn_family.default_bank_path(recam_args, "recam") == os.path.join("ws", "lpcam_bank_recam.pt")
    assert irn_family.default_baseline_dir(recam_args, "recam") == os.path.join("ws", "cam_mask_recam_baseline")
    from lpcam_adapters import irn

    text = irn_family.recommended_thresholds(irn.SPEC)
    assert "--cam_eval_thres 0.3" in text and "--sem_seg_bg_thres 0.35" in text and "0.15/0.3/0.05/0.25" in text


@pytest.mark.parametrize("step", ["prototypes", "make"])
def test_explicit_steps_spawn_one_process_per_gpu_by_default(step, tmp_path, monkeypatch):
    """``lpcam irn prototypes|make`` on N GPUs: N workers unless --workers says otherwise; in-process on a
    CPU machine, with --device (one device named), and under torchrun (which launched the processes)."""
    import contextlib

    from lpcam_core.cli import build_parser

    launched = []
    monkeypatch.setattr(run, "launch", lambda fn, *a, workers=None, device=None: launched.append(workers))
    monkeypatch.setattr(irn_family, "in_host", lambda host: contextlib.nullcontext())
    monkeypatch.setattr(irn_family, "voc_datasets", lambda *a, **k: Namespace(proto_ids=["a"]))
    fake = Namespace(name="irn", meta={}, amp=False, prototype_baseline_dir=lambda d, bank: d or bank + "_baseline")
    argv = ["irn", step, "--host", str(tmp_path), "--voc12-root", str(tmp_path / "voc"), "--weights", "w.pth"]
    argv += ["--bank", str(tmp_path / "b.pt")] if step == "prototypes" else ["--baseline", "--out", str(tmp_path / "o")]
    for env, gpus, flag, expected in (({}, 2, [], 2), ({}, 0, [], 0), ({"RANK": "0", "WORLD_SIZE": "2"}, 2, [], 0),
                                      ({}, 2, ["--workers", "3"], 3), ({}, 2, ["--device", "cpu"], 0)):
        for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
            monkeypatch.delenv(key, raising=False)
        for key, value in env.items():
            monkeypatch.setenv(key, value)
        monkeypatch.setattr(torch.cuda, "device_count", lambda gpus=gpus: gpus)
        ns = build_parser([*argv, *flag]).parse_args([*argv, *flag])
        ns.plan = lambda ns, settings: fake
        assert ns.func(ns) == 0
        assert launched[-1] == expected, (env, gpus, flag)


def test_irn_import_registers_without_importing_the_host():
    with hooks.scoped():
        import lpcam_adapters.irn as irn

        irn.install()
        names = {(p.module, p.name) for p in hooks.describe_patches()}
        assert ("step.make_cam", "run") in names and ("voc12.dataloader", "load_img_name_list") in names
        assert "step.make_cam" not in sys.modules and "voc12" not in sys.modules


def test_prepare_workdir_leaves_the_host_alone(tmp_path):
    host = tmp_path / "host"
    for d in ("step", "net", "misc", "voc12"):
        (host / d).mkdir(parents=True)
    (host / "voc12" / "dataloader.py").write_text("# host\n")
    (host / "voc12" / "cls_labels.npy").write_bytes(b"host labels")
    (host / "voc12" / "train.txt").write_text("2007_000032\n")
    (host / "run_sample.py").write_text("import argparse\n")
    snapshot = sorted((p.relative_to(host), p.read_bytes() if p.is_file() else None) for p in host.rglob("*"))
    labels = tmp_path / "labels.npy"
    labels.write_bytes(b"ours")
    work = irn_family.prepare_workdir(host, tmp_path / "work", cls_labels=labels, lists={"train.txt": ["2099_000001"]})
    assert (work / "step").is_symlink() and (work / "run_sample.py").is_symlink()
    assert (work / "voc12" / "dataloader.py").resolve() == (host / "voc12" / "dataloader.py").resolve()
    assert (work / "voc12" / "cls_labels.npy").read_bytes() == b"ours"
    assert (work / "voc12" / "train.txt").read_text() == "2099_000001\n"
    irn_family.prepare_workdir(host, tmp_path / "work", cls_labels=labels)  # idempotent refresh
    assert sorted((p.relative_to(host), p.read_bytes() if p.is_file() else None) for p in host.rglob("*")) == snapshot
    with pytest.raises(FileNotFoundError, match="not a checkout of this host .no voc12/dataloader.py"):
        irn_family.prepare_workdir(tmp_path / "work" / "step", tmp_path / "w2")


# --------------------------------------------------------------------------- the passes


@pytest.mark.parametrize("recam", [False, True], ids=["make_cam", "make_recam"])
def test_baseline_pass_is_the_host_maths_bit_for_bit(mini, tmp_path, recam):
    model = mini.MiniCAM().eval()
    dataset = mini.MiniMSF()
    extra = torch.rand(20, 8, 1, 1) if recam else None
    base.write_baseline(host_of(model, extra), maps_data(dataset), str(tmp_path / "out"), mode="overwrite")
    for name, (keys, cam, high) in host_work(model, dataset, extra).items():
        got = load(tmp_path / "out" / f"{name}.npy")
        assert torch.equal(got["keys"], keys) and torch.equal(got["cam"], cam) and np.array_equal(got["high_res"], high)
        assert got["keys"].dtype == torch.int64 and got["cam"].dtype == torch.float32 and got["high_res"].dtype == np.float32


def test_fill_baselines_never_overwrites(mini, tmp_path):
    model = mini.MiniCAM().eval()
    out = tmp_path / "base"
    out.mkdir()
    from lpcam_core.formats import save_irn_cam

    save_irn_cam(out / "2007_000000.npy", [0], torch.full((1, 10, 12), 7.0), np.full((1, 40, 48), 7.0, np.float32))
    kept = (out / "2007_000000.npy").read_bytes()
    host = host_of(model)
    base.fill_baselines(host, proto_data(mini.MiniMSF(n=2), mini.MiniSingle(n=2)), str(out), host.baseline_fingerprint())
    assert (out / "2007_000000.npy").read_bytes() == kept and (out / "2007_000001.npy").is_file()


def test_bank_then_maps_equal_lpcam_multiscale(mini, tmp_path, caplog):
    model = mini.MiniCAM().eval()
    host = host_of(model)
    data = proto_data(mini.MiniMSF(), mini.MiniSingle())
    base.fill_baselines(host, data, str(tmp_path / "base"), host.baseline_fingerprint())
    cfg = LPCAMConfig.preset("voc", num_clusters=2, context_low=0.0, fallback_best_center=True)
    settings = HostSettings(lpcam=cfg)
    bank_path = str(tmp_path / "bank.pt")
    bank = base.prototype_bank(host, data, str(tmp_path / "base"), bank_path, settings, {"host": "mini"})
    assert os.path.isfile(bank_path) and bank.meta["host"] == "mini" and set(bank.classes) <= {0, 1, 2}
    dataset = mini.MiniMSF()
    base.write_lpcam(host, bank, bank_path, maps_data(dataset), str(tmp_path / "lpcam"), mode="overwrite")
    for pack in dataset:
        got = load(tmp_path / "lpcam" / f"{pack['name']}.npy")
        keys = torch.nonzero(pack["label"])[:, 0]
        with torch.no_grad():
            feats = [irn_family.extract_features(model, torch.from_numpy(i)) for i in pack["img"]]
        known = [k for k in keys.tolist() if k in bank.foreground]
        ref = lpcam_multiscale(feats, bank, known, pack["size"])
        assert torch.equal(got["keys"], keys)
        for j, k in enumerate(keys.tolist()):
            if k in known:
                np.testing.assert_allclose(got["high_res"][j], ref["high_res"][known.index(k)], atol=1e-6)
                torch.testing.assert_close(got["cam"][j], ref["cam"][known.index(k)])
            else:
                assert not got["high_res"][j].any()
    # Same checkpoint and settings: reused; other settings: rebuilt.
    with caplog.at_level("INFO", logger="lpcam_core.run.bank_loop"):
        base.prototype_bank(host, data, str(tmp_path / "base"), bank_path, settings, {"host": "mini"})
        assert "reusing the prototype bank" in caplog.text
        other = HostSettings(lpcam=cfg.replace(num_clusters=1))
        base.prototype_bank(host, data, str(tmp_path / "base"), bank_path, other, {"host": "mini"})
        assert "rebuilding the prototype bank" in caplog.text and "num_clusters" in caplog.text


@pytest.mark.parametrize("preset", ["voc", "coco"])
def test_bank_costs_one_backbone_pass_per_prototype_image(mini, tmp_path, preset):
    """Missing baselines: the baseline pass's scale-1 view gives the pooled features (no second pass); the
    baseline files and the bank equal those of the two-pass way (baselines, then a one-scale pass)."""
    from lpcam_core import PrototypeBank

    cfg = LPCAMConfig.preset(preset, num_clusters=2, context_low=0.0, fallback_best_center=True,
                             **({"images_per_class": 3} if preset == "coco" else {}))
    settings = HostSettings(lpcam=cfg)
    data = proto_data(mini.MiniMSF(), mini.MiniSingle())
    model = mini.MiniCAM().eval()
    batches = []
    model.stage1.register_forward_hook(lambda module, inputs, output: batches.append(inputs[0].shape[0]))
    host = host_of(model)
    base.fill_baselines(host, data, str(tmp_path / "two"), host.baseline_fingerprint())
    two = base.prototype_bank(host, data, str(tmp_path / "two"), str(tmp_path / "two.pt"), settings, {})
    two_pass_images = sum(batches)
    batches.clear()
    one = base.prototype_bank(host, data, str(tmp_path / "one"), str(tmp_path / "one.pt"), settings, {},
                              fingerprint=host.baseline_fingerprint())
    views = 2 * len(host.scales)  # (image, flip) at every scale
    plan = run.clustering_plan(data.labels, cfg, 20)
    drawn = {item.image_id for item in plan}
    # one backbone pass (all views) per prototype image; an image drawn again (COCO) runs its scale-1 view again
    assert sum(batches) == views * len(drawn) + len(plan) - len(drawn)
    assert two_pass_images == views * len(data.proto_ids) + len(plan)  # the two-pass way: one more image each
    assert sorted(n for n in os.listdir(tmp_path / "one") if n.endswith(".npy")) == sorted(f"{i}.npy" for i in drawn)
    for name in drawn:  # the same baseline files, value for value (pickled storages differ by address)
        a, b = load(tmp_path / "one" / f"{name}.npy"), load(tmp_path / "two" / f"{name}.npy")
        assert torch.equal(a["keys"], b["keys"]) and torch.equal(a["cam"], b["cam"])
        assert np.array_equal(a["high_res"], b["high_res"])
    assert one.classes == two.classes and one.classes
    for c in one.classes:  # stage4 of a batch of 2 (image, flip) vs of 1: the same arithmetic on this CPU
        torch.testing.assert_close(one.foreground[c], two.foreground[c], atol=1e-5, rtol=0)
        torch.testing.assert_close(one.context[c], two.context[c], atol=1e-5, rtol=0)
    assert PrototypeBank.load(tmp_path / "one.pt").meta["images_seen"] == two.meta["images_seen"]


@pytest.mark.slow
def test_spawned_workers_write_the_same_maps(mini, tmp_path):
    model = mini.MiniCAM().eval()
    dataset = mini.MiniMSF()
    run.launch(irn_family.own_job, host_of(model), maps_data(dataset), str(tmp_path / "inline"))
    run.launch(irn_family.own_job, host_of(model), maps_data(dataset), str(tmp_path / "spawned"), workers=2)
    names = sorted(n for n in os.listdir(tmp_path / "inline") if n.endswith(".npy"))
    assert names == sorted(n for n in os.listdir(tmp_path / "spawned") if n.endswith(".npy"))
    assert len(names) == len(dataset)
    record = (tmp_path / "inline" / run.MAPS_RECORD).read_text()
    assert record == (tmp_path / "spawned" / run.MAPS_RECORD).read_text()
    for name in names:
        a, b = load(tmp_path / "inline" / name), load(tmp_path / "spawned" / name)
        np.testing.assert_allclose(a["high_res"], b["high_res"], atol=1e-6)


@pytest.mark.slow
@pytest.mark.parametrize("preset", ["voc", "coco"])
def test_bank_of_two_spawned_workers_equals_one_process(mini, tmp_path, preset):
    """The one bank loop in two spawned processes joined in a gloo group: the same bank file (COCO-style
    per-class draws too), pool peak aside."""
    from lpcam_core import PrototypeBank

    model = mini.MiniCAM().eval()
    host = host_of(model)
    data = proto_data(mini.MiniMSF(), mini.MiniSingle())
    base.fill_baselines(host, data, str(tmp_path / "base"), host.baseline_fingerprint())
    cfg = LPCAMConfig.preset(preset, num_clusters=2, context_low=0.0, fallback_best_center=True,
                             **({"images_per_class": 3} if preset == "coco" else {}))
    settings = HostSettings(lpcam=cfg)
    paths = {"bank_path": str(tmp_path / "one.pt"), "baseline_dir": str(tmp_path / "base"), "meta": {"host": "mini"}}
    run.launch(irn_family.prototypes_job, host, data, settings, paths)
    run.launch(irn_family.prototypes_job, host, data, settings, {**paths, "bank_path": str(tmp_path / "two.pt")},
               workers=2)
    one, two = PrototypeBank.load(tmp_path / "one.pt"), PrototypeBank.load(tmp_path / "two.pt")
    assert one.classes == two.classes
    for c in one.classes:
        assert torch.equal(one.foreground[c], two.foreground[c]) and torch.equal(one.context[c], two.context[c])
    present = {k for it in mini.MiniMSF().items for k in torch.nonzero(it["label"])[:, 0].tolist()}
    assert one.meta["images_seen"] == two.meta["images_seen"] == (3 * len(present) if preset == "coco" else 4)
    drop = {"pool_peak_bytes"}
    assert {k: v for k, v in one.meta.items() if k not in drop} == {k: v for k, v in two.meta.items() if k not in drop}


# --------------------------------------------------------------------------- patches and CLI


@pytest.mark.parametrize("host", ["irn", "recam"])
def test_patch_apply_check_revert(tmp_path, host):
    import importlib

    info = importlib.import_module(f"lpcam_adapters.{host}").INFO
    original = "import argparse\nimport os\n\nfrom misc import pyutils\n"
    script = irn_checkout(tmp_path, text=original)
    if host == "recam":
        (tmp_path / "step" / "make_recam.py").write_text("def _work(x):\n    pass\n")
    assert cli.patch_entry_script(tmp_path, info, check=True) == "would be applied"
    assert script.read_text() == original
    assert cli.patch_entry_script(tmp_path, info) == "applied"
    assert script.read_text().splitlines()[0].startswith(f"import lpcam_adapters.{host}  #")
    assert script.read_text().splitlines()[1:] == original.splitlines()
    assert cli.patch_entry_script(tmp_path, info) == "already applied"
    assert cli.patch_entry_script(tmp_path, info, revert=True) == "reverted"
    assert script.read_text() == original
    assert cli.patch_entry_script(tmp_path, info, revert=True) == "not applied"
    script.write_text("print('not a host')\n")
    with pytest.raises(ValueError, match="no line 'import argparse'"):
        cli.patch_entry_script(tmp_path, info)
    with pytest.raises(FileNotFoundError):
        cli.patch_entry_script(tmp_path / "nowhere", info)


def test_patches_are_minimal_and_shipped():
    import importlib

    for host in ("irn", "recam"):
        text = cli.patch_text(importlib.import_module(f"lpcam_adapters.{host}").INFO)
        added = [line for line in text.splitlines() if line.startswith("+") and not line.startswith("+++")]
        context = [line for line in text.splitlines() if line.startswith(" ")]
        assert added == [line for line in added if line.startswith(f"+import lpcam_adapters.{host}")] and len(added) == 1
        assert context == [" import argparse"]  # one line of host context, nothing else of the host


def test_cli_registers_host_commands(capsys, tmp_path):
    from lpcam_core import cli as core_cli

    irn_checkout(tmp_path, text="import argparse\n")
    assert core_cli.main(["irn", "patch", str(tmp_path)]) == 0
    assert "applied" in capsys.readouterr().out
    with hooks.scoped():
        assert core_cli.main(["irn", "--explain"]) == 0
    out = capsys.readouterr().out
    assert "step.make_cam:run" in out and "LPCAM_WORKERS" in out
    parser = core_cli.build_parser(["recam"])
    ns = parser.parse_args(["recam", "make", "--host", "h", "--voc12-root", "v", "--out", "o", "--baseline"])
    assert ns.info.name == "recam" and ns.baseline


def test_baseline_record_refuses_another_checkpoint(mini, tmp_path, caplog):
    a, b = mini.MiniCAM(), mini.MiniCAM()
    rec_a = {"network": "n", "model": run.model_fingerprint(a), "scales": [1.0]}
    rec_b = {"network": "n", "model": run.model_fingerprint(b), "scales": [1.0]}
    assert rec_a["model"] != rec_b["model"]
    assert rec_a["model"] != run.model_fingerprint(a, torch.ones(20, 8, 1, 1))
    run.check_baseline_record(tmp_path / "base", rec_a)
    run.check_baseline_record(tmp_path / "base", rec_a)  # same checkpoint: fine
    with pytest.raises(ValueError, match="another checkpoint.*model"):
        run.check_baseline_record(tmp_path / "base", rec_b)
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "x.npy").write_bytes(b"")
    with caplog.at_level("WARNING"):
        run.check_baseline_record(tmp_path / "old", rec_a)
    assert "without a record" in caplog.text


def test_resumed_maps_refuse_another_bank_or_checkpoint(mini, tmp_path):
    """A resumed make keeps complete files: after the bank is rebuilt, or the network retrained, it must
    refuse the old directory rather than mix old maps with new ones."""
    from lpcam_core import PrototypeBank

    model = mini.MiniCAM().eval()
    host = host_of(model)
    data = proto_data(mini.MiniMSF(), mini.MiniSingle())
    base.fill_baselines(host, data, str(tmp_path / "base"), host.baseline_fingerprint())
    for name, k in (("a.pt", 2), ("b.pt", 3)):
        cfg = LPCAMConfig.preset("voc", num_clusters=k, context_low=0.0, fallback_best_center=True)
        base.prototype_bank(host, data, str(tmp_path / "base"), str(tmp_path / name), HostSettings(lpcam=cfg), {})
    out = tmp_path / "maps"
    names = [it["name"] for it in mini.MiniMSF().items]

    def files(folder=out):
        return {n: (load(folder / f"{n}.npy")["cam"].numpy().tobytes(), load(folder / f"{n}.npy")["high_res"].tobytes())
                for n in names}

    def make(bank_name, folder=out, mode="resume", h=host):
        path = str(tmp_path / bank_name)
        return base.write_lpcam(h, PrototypeBank.load(path), path, maps_data(mini.MiniMSF()), str(folder), mode=mode)

    assert make("a.pt").written == 4
    made_by_a = files()
    with pytest.raises(ValueError, match=r"maps made by another bank.*--overwrite"):
        make("b.pt")
    with pytest.raises(ValueError, match=r"another model"):
        make("a.pt", h=host_of(mini.MiniCAM().eval()))
    assert files() == made_by_a  # refused before anything was written
    assert make("a.pt").skipped == 4

    assert make("b.pt", mode="overwrite").written == 4
    make("b.pt", folder=tmp_path / "plain_b", mode="overwrite")
    assert files() == files(tmp_path / "plain_b") != made_by_a
    assert make("b.pt").skipped == 4

    # An --overwrite run killed midway leaves no record: the next resume must ask for --overwrite again.
    run.claim_map_dir(out, host.maps_record("lpcam", str(tmp_path / "a.pt")), overwrite=True)
    assert not (out / run.MAPS_RECORD).exists()
    with pytest.raises(ValueError, match=r"4 map file\(s\) without lpcam_maps.json"):
        make("a.pt")
    # A pass that rewrites every file (the patched make_cam) takes over such a directory and records itself.
    make("a.pt", mode="overwrite")
    assert files() == made_by_a
    assert make("a.pt").skipped == 4
    # Baseline maps are recorded by checkpoint the same way.
    base.write_baseline(host, maps_data(mini.MiniMSF()), str(tmp_path / "cams"), mode="resume")
    with pytest.raises(ValueError, match=r"maps made by another model"):
        base.write_baseline(host_of(mini.MiniCAM().eval()), maps_data(mini.MiniMSF()), str(tmp_path / "cams"),
                            mode="resume")


@pytest.mark.parametrize("host", ["irn", "amn"])
def test_torchrun_with_spawned_workers_is_refused(host, monkeypatch, tmp_path, capsys):
    from lpcam_core import cli as core_cli

    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    argv = [host, "make", "--host", str(tmp_path), "--voc12-root", "v", "--weights", "w", "--bank", "b",
            "--out", str(tmp_path / "o"), "--workers", "2"] + (["--ir-label-dir", "i"] if host == "amn" else [])
    with pytest.raises(SystemExit) as err:
        core_cli.main(argv)
    assert err.value.code == 2
    message = capsys.readouterr().err
    assert "--workers 2" in message and "torchrun" in message


def test_without_torchrun_or_workers_no_process_group_is_made(mini, tmp_path):
    import torch.distributed as dist

    run.launch(irn_family.own_job, host_of(mini.MiniCAM().eval()), maps_data(mini.MiniMSF()), str(tmp_path / "o"),
               workers=0)
    assert not dist.is_initialized() and len(os.listdir(tmp_path / "o")) == 5  # 4 maps and the record


def test_make_refuses_a_baseline_dir_as_output(mini, tmp_path):
    model = mini.MiniCAM().eval()
    host = host_of(model)
    data = proto_data(mini.MiniMSF(), mini.MiniSingle())
    base.fill_baselines(host, data, str(tmp_path / "base"), host.baseline_fingerprint())
    before = {p.name: p.read_bytes() for p in (tmp_path / "base").iterdir()}
    with pytest.raises(ValueError, match="same directory"):
        base.write_baseline(host, maps_data(mini.MiniMSF()), str(tmp_path / "base"), mode="overwrite",
                            reads=[str(tmp_path / "base")])
    assert {p.name: p.read_bytes() for p in (tmp_path / "base").iterdir()} == before


def test_all_zero_maps_and_untrained_banks_are_warned_about(mini, tmp_path, caplog):
    from lpcam_core import PrototypeBank

    model = mini.MiniCAM().eval()
    host = host_of(model)
    dataset = mini.MiniMSF()
    same = torch.rand(2, 8, generator=torch.Generator().manual_seed(0))
    bank = PrototypeBank({c: same for c in range(3)}, {c: same for c in range(3)})  # context cancels every class
    bank.save(tmp_path / "cancel.pt")
    with caplog.at_level("WARNING"):
        base.write_lpcam(host, bank, str(tmp_path / "cancel.pt"), maps_data(dataset), str(tmp_path / "zero"),
                         mode="overwrite")
    assert "class maps written (one per class present in an image) are all zero" in caplog.text
    caplog.clear()
    cfg = LPCAMConfig.preset("voc", num_clusters=2, context_low=0.0, class_threshold=0.99999,
                             fallback_best_center=True)
    data = proto_data(mini.MiniMSF(), mini.MiniSingle())
    with caplog.at_level("WARNING"):
        built = base.prototype_bank(host, data, str(tmp_path / "base"), str(tmp_path / "b.pt"), HostSettings(lpcam=cfg),
                                    {}, fingerprint=host.baseline_fingerprint())
    assert all(len(p) == 1 for p in built.foreground.values())
    assert "every class kept a single class prototype" in caplog.text


def test_amp_changes_only_the_maps_pass_and_is_recorded(mini, tmp_path):
    """``LPCAM_AMP`` / ``--amp``: the maps pass's backbone under autocast (bfloat16 on the CPU), the maps still
    float32 and close to the exact ones; the bank and the baselines untouched; a resumed run never mixes the two."""
    from lpcam_core import PrototypeBank

    model = mini.MiniCAM().eval()
    exact, amp = host_of(model), host_of(model)
    amp.amp = True
    data = proto_data(mini.MiniMSF(), mini.MiniSingle())
    cfg = LPCAMConfig.preset("voc", num_clusters=2, context_low=0.0, fallback_best_center=True)
    banks = {}
    for name, host in (("exact", exact), ("amp", amp)):
        base.fill_baselines(host, data, str(tmp_path / f"base_{name}"), host.baseline_fingerprint())
        banks[name] = base.prototype_bank(host, data, str(tmp_path / f"base_{name}"), str(tmp_path / f"{name}.pt"),
                                          HostSettings(lpcam=cfg), {})
    for k in banks["exact"].foreground:  # the prototype stage stays float32
        assert torch.equal(banks["exact"].foreground[k], banks["amp"].foreground[k])
    names = [it["name"] for it in mini.MiniMSF().items]
    for n in names:
        assert load(tmp_path / "base_exact" / f"{n}.npy")["high_res"].tobytes() == \
            load(tmp_path / "base_amp" / f"{n}.npy")["high_res"].tobytes()
    bank_path = str(tmp_path / "exact.pt")
    bank = PrototypeBank.load(bank_path)
    for name, host in (("exact", exact), ("amp", amp)):
        base.write_lpcam(host, bank, bank_path, maps_data(mini.MiniMSF()), str(tmp_path / f"maps_{name}"), mode="resume")
    diffs = []
    for n in names:
        a, b = load(tmp_path / "maps_exact" / f"{n}.npy"), load(tmp_path / "maps_amp" / f"{n}.npy")
        assert b["high_res"].dtype == np.float32 and b["cam"].dtype == torch.float32
        diffs.append(float(np.abs(a["high_res"] - b["high_res"]).max()))
    assert 0 < max(diffs) < 0.1, diffs  # bfloat16 features: changed, but a few percent of the [0, 1] range at most
    assert run.read_record(tmp_path / "maps_amp" / run.MAPS_RECORD)["amp"] == "bfloat16"
    assert "amp" not in run.read_record(tmp_path / "maps_exact" / run.MAPS_RECORD)
    with pytest.raises(ValueError, match=r"maps made by another amp"):
        base.write_lpcam(exact, bank, bank_path, maps_data(mini.MiniMSF()), str(tmp_path / "maps_amp"), mode="resume")


def test_amp_setting_and_flag():
    from lpcam_adapters import irn, recam

    for info in (irn.INFO, recam.INFO):
        assert read_settings(info.options, {}).option("amp") is False
        assert read_settings(info.options, {"LPCAM_AMP": "on"}).option("amp") is True
        with pytest.raises(ValueError, match=r"LPCAM_AMP='maybe': expected 1/0"):
            read_settings(info.options, {"LPCAM_AMP": "maybe"})
    from lpcam_core import cli as core_cli

    parser = core_cli.build_parser(["irn"])
    ns = parser.parse_args(["irn", "make", "--host", "h", "--voc12-root", "v", "--weights", "w", "--out", "o", "--amp"])
    assert cli.settings_env(ns, irn.INFO)["LPCAM_AMP"] == "1"
    ns = parser.parse_args(["irn", "make", "--host", "h", "--voc12-root", "v", "--weights", "w", "--out", "o"])
    assert "LPCAM_AMP" not in cli.settings_env(ns, irn.INFO)


def test_amp_overflow_is_named(mini, monkeypatch):
    """float16 (CUDA's autocast dtype, here forced on the CPU) overflows on large activations: the error says
    --amp did it and names the image, instead of the map function's bare 'NaN or inf'."""
    from lpcam_core import precision

    model = mini.MiniCAM().eval()
    with torch.no_grad():
        model.stage4[0].weight.mul_(1e8)
    host = host_of(model)
    host.amp = True
    item = mini.MiniMSF()[0]
    assert all(torch.isfinite(v).all() for v in host_of(model).multiscale_features(item))  # fine in float32
    monkeypatch.setitem(precision.AMP_DTYPES, "cpu", torch.float16)
    with pytest.raises(ValueError, match=r"--amp: the features of 2007_000000 overflowed under autocast"):
        host.multiscale_features(item)


def test_make_without_its_bank_says_to_run_prototypes_first_and_writes_nothing(tmp_path):
    from lpcam_core.cli import build_parser

    out, bank = tmp_path / "cam", tmp_path / "bank.pt"
    argv = ["irn", "make", "--host", str(tmp_path), "--voc12-root", str(tmp_path), "--weights", "w.pth",
            "--bank", str(bank), "--out", str(out)]
    ns = build_parser(argv).parse_args(argv)
    with pytest.raises(FileNotFoundError, match=r"--bank .*bank.pt: no such file; build it first with `lpcam irn "
                                                r"prototypes"):
        ns.func(ns)
    assert not out.exists()


def test_a_voc_root_without_images_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match=f"voc12_root {tmp_path}: no JPEGImages folder"):
        irn_family.voc_datasets("voc12/train.txt", None, str(tmp_path), [1.0])


@pytest.mark.parametrize("host", ["irn", "recam", "amn"])
def test_make_takes_no_clustering_flags_its_bank_decides_them(host, capsys):
    """``make`` reads a bank: ``--k``/``--mu``/... would change nothing there, so only ``prototypes`` has them."""
    from lpcam_core.cli import build_parser

    common = ["--host", "h", "--voc12-root", "v", "--weights", "w", "--bank", "b"]
    common += ["--ir-label-dir", "i"] if host == "amn" else []
    prototypes = [host, "prototypes", *common, "--k", "5", "--mu", "0.5"]
    assert build_parser(prototypes).parse_args(prototypes).k == 5
    for flag, value in (("--k", "5"), ("--mu", "0.1"), ("--tau", "0.2"), ("--seed", "1"), ("--preset", "coco")):
        make = [host, "make", *common, "--out", "o", flag, value]
        with pytest.raises(SystemExit):
            build_parser(make).parse_args(make)
        assert f"unrecognized arguments: {flag}" in capsys.readouterr().err
    make = [host, "make", *common, "--out", "o", "--config", "c.yaml"]
    assert build_parser(make).parse_args(make).config == "c.yaml"


def test_recam_checkpoints_load_weights_only_and_errors_name_the_steps_flags(tmp_path, monkeypatch):
    """ReCAM's predictor checkpoint is read with weights_only (a pickle naming code is refused, never run), and
    a missing file names the flags of the command that was run."""
    import argparse

    from lpcam_adapters import recam
    from lpcam_adapters.settings import read_settings

    pkg = tmp_path / "net"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "resnet50_cam.py").write_text(
        "import torch.nn as nn\n"
        "class CAM(nn.Module):\n"
        "    def __init__(self):\n        super().__init__()\n        self.classifier = nn.Conv2d(8, 20, 1, bias=False)\n"
        "class Class_Predictor(nn.Module):\n"
        "    def __init__(self, n, c):\n        super().__init__()\n        self.classifier = nn.Conv2d(c, n, 1, bias=False)\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    for name in [n for n in sys.modules if n == "net" or n.startswith("net.")]:
        monkeypatch.delitem(sys.modules, name)
    importlib.invalidate_caches()
    network = importlib.import_module("net.resnet50_cam")
    weights = tmp_path / "w"
    weights.mkdir()
    torch.save(network.CAM().state_dict(), weights / "res50_recam_1.pth")
    args = argparse.Namespace(cam_network="net.resnet50_cam", cam_scales=(1.0,), cam_weights_name=None,
                              recam_weight_dir=str(weights), recam_num_epoches=1)
    settings = read_settings(recam.OPTIONS, {})
    with pytest.raises(FileNotFoundError, match="check --recam-weight-dir / --recam-epochs"):
        recam.recam_host(args, settings, flag="--recam-weight-dir / --recam-epochs")
    with open(weights / "recam_predictor_1.pth", "wb") as f:  # a pickle that names a callable: os.system
        f.write(b"\x80\x02cos\nsystem\nq\x00X\x04\x00\x00\x00trueq\x01\x85q\x02Rq\x03.")
    with pytest.raises(ValueError, match="recam_predictor_1.pth: not a readable checkpoint"):
        recam.recam_host(args, settings)
    torch.save(network.Class_Predictor(20, 8).state_dict(), weights / "recam_predictor_1.pth")
    host = recam.recam_host(args, settings)
    assert host.extra_weight.shape == (20, 8, 1, 1)

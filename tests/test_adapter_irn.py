"""lpcam_adapters._irn_family and lpcam_adapters.irn without a real host: settings, work directory,
drivers on a tiny IRN-like network (the real-host runs are in tests/hosts)."""

from __future__ import annotations

import importlib
import os
import sys
import textwrap
import uuid
from argparse import Namespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from lpcam_adapters import _hooks, _irn_family
from lpcam_core import LPCAMConfig, lpcam_multiscale

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


# --------------------------------------------------------------------------- settings


def test_settings_defaults_and_env(tmp_path):
    s = _irn_family.settings_from_env({})
    assert s.enabled and s.lpcam == LPCAMConfig.preset("voc") and s.workers is None
    s = _irn_family.settings_from_env(
        {"LPCAM": "0", "LPCAM_K": "5", "LPCAM_TAU": "0.2", "LPCAM_MU": "0.8", "LPCAM_WORKERS": "2",
         "LPCAM_BANK": "b.pt", "LPCAM_MEMORY_GB": "0.5", "LPCAM_REBUILD_BANK": "yes"}
    )
    assert not s.enabled and s.workers == 2 and s.bank_path == "b.pt" and s.rebuild_bank
    assert (s.lpcam.num_clusters, s.lpcam.fg_threshold, s.lpcam.class_threshold, s.lpcam.context_high) == (5, 0.2, 0.8, 0.8)
    assert s.lpcam.memory_budget_bytes == 512 * 2**20
    s = _irn_family.settings_from_env({"LPCAM_MU": "0.8", "LPCAM_MU_B": "0.7"})
    assert (s.lpcam.class_threshold, s.lpcam.context_high) == (0.8, 0.7)
    with pytest.raises(ValueError, match="LPCAM_K='x'"):
        _irn_family.settings_from_env({"LPCAM_K": "x"})
    with pytest.raises(ValueError, match="LPCAM='maybe'"):
        _irn_family.settings_from_env({"LPCAM": "maybe"})
    assert _irn_family.settings_from_env({}).classifier == "cls"  # chosen by benchmarks/recam_choices.py
    assert _irn_family.settings_from_env({"LPCAM_BACKBONE": "cam"}).backbone == "cam"
    with pytest.raises(ValueError, match="W_recam"):
        _irn_family.settings_from_env({"LPCAM_BACKBONE": "cam", "LPCAM_CLASSIFIER": "recam"})


def test_settings_yaml(tmp_path):
    path = tmp_path / "lpcam.yaml"
    path.write_text("preset: coco\nnum_clusters: 7\nadapter:\n  bank: x.pt\n  workers: 3\n  classifier: cls\n")
    s = _irn_family.settings_from_env({"LPCAM_CONFIG": str(path), "LPCAM_TAU": "0.3"})
    assert s.lpcam.num_clusters == 7 and s.lpcam.images_per_class == 100 and s.lpcam.fg_threshold == 0.3
    assert (s.bank_path, s.workers, s.classifier) == ("x.pt", 3, "cls")
    path.write_text("adapter:\n  nope: 1\n")
    with pytest.raises(ValueError, match="unknown adapter key"):
        _irn_family.settings_from_env({"LPCAM_CONFIG": str(path)})
    path.write_text("tua: 1\n")
    with pytest.raises(ValueError, match="unknown LPCAM setting"):
        _irn_family.settings_from_env({"LPCAM_CONFIG": str(path)})
    with pytest.raises(FileNotFoundError, match="LPCAM_CONFIG"):
        _irn_family.settings_from_env({"LPCAM_CONFIG": str(tmp_path / "missing.yaml")})


def test_default_paths_and_thresholds():
    irn_args = Namespace(cam_out_dir="result/cam")
    assert _irn_family.default_bank_path(irn_args) == os.path.join("result", "lpcam_bank.pt")
    assert _irn_family.default_baseline_dir(irn_args) == os.path.join("result", "cam_baseline")
    recam_args = Namespace(cam_out_dir="ws/cam_mask", work_space="ws")
    assert _irn_family.default_bank_path(recam_args, "_recam") == os.path.join("ws", "lpcam_bank_recam.pt")
    assert _irn_family.default_baseline_dir(recam_args, "recam") == os.path.join("ws", "cam_mask_recam_baseline")
    from lpcam_adapters import irn

    text = _irn_family.recommended_thresholds(irn.HOST)
    assert "--cam_eval_thres 0.3" in text and "--sem_seg_bg_thres 0.35" in text and "0.15/0.3/0.05/0.25" in text


def test_irn_import_registers_without_importing_the_host():
    with _hooks.scoped():
        import lpcam_adapters.irn as irn

        irn.install()
        names = {(p.module, p.name) for p in _hooks.describe_patches()}
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
    work = _irn_family.prepare_workdir(host, tmp_path / "work", cls_labels=labels, lists={"train.txt": ["2099_000001"]})
    assert (work / "step").is_symlink() and (work / "run_sample.py").is_symlink()
    assert (work / "voc12" / "dataloader.py").resolve() == (host / "voc12" / "dataloader.py").resolve()
    assert (work / "voc12" / "cls_labels.npy").read_bytes() == b"ours"
    assert (work / "voc12" / "train.txt").read_text() == "2099_000001\n"
    _irn_family.prepare_workdir(host, tmp_path / "work", cls_labels=labels)  # idempotent refresh
    assert sorted((p.relative_to(host), p.read_bytes() if p.is_file() else None) for p in host.rglob("*")) == snapshot
    with pytest.raises(FileNotFoundError, match="not an IRN-family checkout"):
        _irn_family.prepare_workdir(tmp_path / "work" / "step", tmp_path / "w2")


# --------------------------------------------------------------------------- drivers


@pytest.mark.parametrize("recam", [False, True], ids=["make_cam", "make_recam"])
def test_baseline_pass_is_the_host_maths_bit_for_bit(mini, tmp_path, recam):
    model = mini.MiniCAM().eval()
    dataset = mini.MiniMSF()
    extra = torch.rand(20, 8, 1, 1) if recam else None
    _irn_family.baseline_pass(model, dataset, tmp_path / "out", extra_weight=extra)
    for name, (keys, cam, high) in host_work(model, dataset, extra).items():
        got = load(tmp_path / "out" / f"{name}.npy")
        assert torch.equal(got["keys"], keys) and torch.equal(got["cam"], cam) and np.array_equal(got["high_res"], high)
        assert got["keys"].dtype == torch.int64 and got["cam"].dtype == torch.float32 and got["high_res"].dtype == np.float32


def test_baseline_pass_never_overwrites_with_skip_existing(mini, tmp_path):
    model = mini.MiniCAM().eval()
    out = tmp_path / "base"
    out.mkdir()
    (out / "2007_000000.npy").write_bytes(b"kept")
    _irn_family.baseline_pass(model, mini.MiniMSF(n=2), out, skip_existing=True)
    assert (out / "2007_000000.npy").read_bytes() == b"kept" and (out / "2007_000001.npy").is_file()


def test_bank_then_maps_equal_lpcam_multiscale(mini, tmp_path, caplog):
    model = mini.MiniCAM().eval()
    _irn_family.baseline_pass(model, mini.MiniMSF(), tmp_path / "base")
    cfg = LPCAMConfig.preset("voc", num_clusters=2, context_low=0.0, fallback_best_center=True)
    settings = _irn_family.AdapterSettings(lpcam=cfg)
    weight = _irn_family.classifier_weight(model)
    bank_path = tmp_path / "bank.pt"
    bank = _irn_family.build_bank(model, mini.MiniSingle(), tmp_path / "base", settings, weight, bank_path=bank_path,
                                  extra_meta={"host": "mini"})
    assert bank_path.is_file() and bank.meta["host"] == "mini" and set(bank.classes) <= {0, 1, 2}
    dataset = mini.MiniMSF()
    _irn_family.lpcam_pass(model, dataset, bank_path, tmp_path / "lpcam")
    for pack in dataset:
        got = load(tmp_path / "lpcam" / f"{pack['name']}.npy")
        keys = torch.nonzero(pack["label"])[:, 0]
        with torch.no_grad():
            feats = [_irn_family.extract_features(model, torch.from_numpy(i)) for i in pack["img"]]
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
    with caplog.at_level("INFO", logger="lpcam_adapters._irn_family"):
        _irn_family.build_bank(model, mini.MiniSingle(), tmp_path / "base", settings, weight, bank_path=bank_path,
                               extra_meta={"host": "mini"})
        assert "reusing the prototype bank" in caplog.text
        other = _irn_family.AdapterSettings(lpcam=cfg.replace(num_clusters=1))
        _irn_family.build_bank(model, mini.MiniSingle(), tmp_path / "base", other, weight, bank_path=bank_path,
                               extra_meta={"host": "mini"})
        assert "rebuilding the prototype bank" in caplog.text and "num_clusters" in caplog.text


def test_lpcam_record_gives_zero_maps_to_classes_without_prototypes(mini):
    from lpcam_core import PrototypeBank

    bank = PrototypeBank({1: torch.rand(2, 8)}, {1: torch.rand(1, 8)}, {"num_classes": 20})
    feats = [torch.rand(2, 8, 3, 4)]
    rec = _irn_family._lpcam_record(feats, bank, torch.tensor([0, 1]), (40, 50))
    ref = lpcam_multiscale(feats, bank, [1], (40, 50))
    assert rec["keys"].tolist() == [0, 1] and not rec["high_res"][0].any()
    np.testing.assert_array_equal(rec["high_res"][1], ref["high_res"][0])
    assert rec["cam"].shape == (2, 10, 13)


@pytest.mark.slow
def test_spawned_workers_write_the_same_maps(mini, tmp_path):
    model = mini.MiniCAM().eval()
    dataset = mini.MiniMSF()
    _irn_family.baseline_pass(model, dataset, tmp_path / "inline")
    _irn_family.baseline_pass(model, dataset, tmp_path / "spawned", workers=2)
    names = sorted(n for n in os.listdir(tmp_path / "inline") if n.endswith(".npy"))
    assert names == sorted(n for n in os.listdir(tmp_path / "spawned") if n.endswith(".npy"))
    assert len(names) == len(dataset)
    record = (tmp_path / "inline" / _irn_family.MAPS_RECORD).read_text()
    assert record == (tmp_path / "spawned" / _irn_family.MAPS_RECORD).read_text()
    for name in names:
        a, b = load(tmp_path / "inline" / name), load(tmp_path / "spawned" / name)
        np.testing.assert_allclose(a["high_res"], b["high_res"], atol=1e-6)


# --------------------------------------------------------------------------- patches and CLI


@pytest.mark.parametrize("host", ["irn", "recam"])
def test_patch_apply_check_revert(tmp_path, host):
    from lpcam_adapters import _cli

    script = tmp_path / "run_sample.py"
    original = "import argparse\nimport os\n\nfrom misc import pyutils\n"
    script.write_text(original)
    assert _cli.apply_patch(tmp_path, host, check=True) == "would be applied"
    assert script.read_text() == original
    assert _cli.apply_patch(tmp_path, host) == "applied"
    assert script.read_text().splitlines()[0].startswith(f"import lpcam_adapters.{host}  #")
    assert script.read_text().splitlines()[1:] == original.splitlines()
    assert _cli.apply_patch(tmp_path, host) == "already applied"
    assert _cli.apply_patch(tmp_path, host, revert=True) == "reverted"
    assert script.read_text() == original
    assert _cli.apply_patch(tmp_path, host, revert=True) == "not applied"
    script.write_text("print('not a host')\n")
    with pytest.raises(ValueError, match="does not match"):
        _cli.apply_patch(tmp_path, host)
    with pytest.raises(FileNotFoundError):
        _cli.apply_patch(tmp_path / "nowhere", host)


def test_patches_are_minimal_and_shipped():
    from lpcam_adapters import _cli

    for host in ("irn", "recam"):
        text = _cli.patch_text(host)
        added = [l for l in text.splitlines() if l.startswith("+") and not l.startswith("+++")]
        context = [l for l in text.splitlines() if l.startswith(" ")]
        assert added == [l for l in added if l.startswith(f"+import lpcam_adapters.{host}")] and len(added) == 1
        assert context == [" import argparse"]  # one line of host context, nothing else of the host


def test_cli_registers_host_commands(capsys, tmp_path):
    from lpcam_core import cli

    script = tmp_path / "run_sample.py"
    script.write_text("import argparse\n")
    assert cli.main(["irn", "patch", str(tmp_path)]) == 0
    assert "applied" in capsys.readouterr().out
    with _hooks.scoped():
        assert cli.main(["irn", "--explain"]) == 0
    out = capsys.readouterr().out
    assert "step.make_cam:run" in out and "LPCAM_WORKERS" in out
    parser = cli.build_parser()
    ns = parser.parse_args(["recam", "make", "--host", "h", "--voc12-root", "v", "--out", "o", "--baseline"])
    assert ns.host_name == "recam" and ns.baseline


def test_baseline_record_refuses_another_checkpoint(mini, tmp_path, caplog):
    a, b = mini.MiniCAM(), mini.MiniCAM()
    rec_a = {"network": "n", "model": _irn_family.model_fingerprint(a), "scales": [1.0]}
    rec_b = {"network": "n", "model": _irn_family.model_fingerprint(b), "scales": [1.0]}
    assert rec_a["model"] != rec_b["model"]
    assert rec_a["model"] != _irn_family.model_fingerprint(a, torch.ones(20, 8, 1, 1))
    _irn_family.check_baseline_record(tmp_path / "base", rec_a)
    _irn_family.check_baseline_record(tmp_path / "base", rec_a)  # same checkpoint: fine
    with pytest.raises(ValueError, match="another checkpoint.*model"):
        _irn_family.check_baseline_record(tmp_path / "base", rec_b)
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "x.npy").write_bytes(b"")
    with caplog.at_level("WARNING"):
        _irn_family.check_baseline_record(tmp_path / "old", rec_a)
    assert "without a record" in caplog.text


def test_resumed_maps_refuse_another_bank_or_checkpoint(mini, tmp_path, monkeypatch):
    """A resumable (torchrun) make keeps complete files: after the bank is rebuilt, or the network
    retrained, it must refuse the old directory rather than mix old maps with new ones."""
    monkeypatch.setattr(_irn_family, "image_ids", lambda dataset: [it["name"] for it in dataset.items])
    cpu = torch.device("cpu")
    model = mini.MiniCAM().eval()
    _irn_family.baseline_pass(model, mini.MiniMSF(), tmp_path / "base")
    weight = _irn_family.classifier_weight(model)
    for name, k in (("a.pt", 2), ("b.pt", 3)):
        cfg = LPCAMConfig.preset("voc", num_clusters=k, context_low=0.0, fallback_best_center=True)
        _irn_family.build_bank(model, mini.MiniSingle(), tmp_path / "base", _irn_family.AdapterSettings(lpcam=cfg),
                               weight, bank_path=tmp_path / name)
    out = tmp_path / "maps"
    names = [it["name"] for it in mini.MiniMSF().items]

    def files(folder=out):
        return {n: (load(folder / f"{n}.npy")["cam"].numpy().tobytes(), load(folder / f"{n}.npy")["high_res"].tobytes())
                for n in names}

    assert _irn_family.sharded_lpcam_pass(model, mini.MiniMSF(), tmp_path / "a.pt", out, cpu).written == 4
    made_by_a = files()
    with pytest.raises(ValueError, match=r"maps made by another bank.*--overwrite"):
        _irn_family.sharded_lpcam_pass(model, mini.MiniMSF(), tmp_path / "b.pt", out, cpu)
    with pytest.raises(ValueError, match=r"another model"):
        _irn_family.sharded_lpcam_pass(mini.MiniCAM().eval(), mini.MiniMSF(), tmp_path / "a.pt", out, cpu)
    assert files() == made_by_a  # refused before anything was written
    assert _irn_family.sharded_lpcam_pass(model, mini.MiniMSF(), tmp_path / "a.pt", out, cpu).skipped == 4

    stats = _irn_family.sharded_lpcam_pass(model, mini.MiniMSF(), tmp_path / "b.pt", out, cpu, overwrite=True)
    assert stats.written == 4
    _irn_family.lpcam_pass(model, mini.MiniMSF(), tmp_path / "b.pt", tmp_path / "plain_b")
    assert files() == files(tmp_path / "plain_b") != made_by_a
    assert _irn_family.sharded_lpcam_pass(model, mini.MiniMSF(), tmp_path / "b.pt", out, cpu).skipped == 4

    # An --overwrite run killed midway leaves no record: the next resume must ask for --overwrite again.
    record_a = _irn_family.maps_record("lpcam", model, mini.MiniMSF(), bank_path=tmp_path / "a.pt")
    _irn_family.claim_map_dir(out, record_a, overwrite=True)
    assert not (out / _irn_family.MAPS_RECORD).exists()
    with pytest.raises(ValueError, match=r"4 map file\(s\) without lpcam_maps.json"):
        _irn_family.sharded_lpcam_pass(model, mini.MiniMSF(), tmp_path / "a.pt", out, cpu)
    # The one-process make rewrites every file, so it takes over such a directory and records itself.
    _irn_family.lpcam_pass(model, mini.MiniMSF(), tmp_path / "a.pt", out)
    assert files() == made_by_a
    assert _irn_family.sharded_lpcam_pass(model, mini.MiniMSF(), tmp_path / "a.pt", out, cpu).skipped == 4
    # Baseline maps are recorded by checkpoint the same way.
    _irn_family.sharded_baseline_pass(model, mini.MiniMSF(), tmp_path / "cams", cpu)
    with pytest.raises(ValueError, match=r"maps made by another model"):
        _irn_family.sharded_baseline_pass(mini.MiniCAM().eval(), mini.MiniMSF(), tmp_path / "cams", cpu)


@pytest.mark.parametrize("host", ["irn", "amn"])
def test_torchrun_with_spawned_workers_is_refused(host, monkeypatch, tmp_path, capsys):
    from lpcam_core import cli

    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    argv = [host, "make", "--host", str(tmp_path), "--voc12-root", "v", "--weights", "w", "--bank", "b",
            "--out", str(tmp_path / "o"), "--workers", "2"]
    with pytest.raises(SystemExit) as err:
        cli.main(argv)
    assert err.value.code == 2
    message = capsys.readouterr().err
    assert "--workers 2" in message and "torchrun" in message


def test_without_torchrun_nothing_distributed_is_imported():
    import subprocess

    code = ("import sys; from lpcam_adapters import _irn_family; "
            "assert _irn_family.init_torchrun(4) is None; print('lpcam_core.distributed' in sys.modules)")
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "False", out.stderr


@pytest.mark.parametrize("preset", ["voc", "coco"])
def test_sharded_drivers_in_one_process_equal_the_plain_ones(mini, tmp_path, monkeypatch, preset):
    """The torchrun drivers, without a process group (world size 1): the same bank (COCO-style
    per-class draws too) and the same files as build_bank / baseline_pass / lpcam_pass."""
    monkeypatch.setattr(_irn_family, "image_ids", lambda dataset: [it["name"] for it in dataset.items])
    model = mini.MiniCAM().eval()
    _irn_family.baseline_pass(model, mini.MiniMSF(), tmp_path / "base")
    sharded = _irn_family.sharded_baseline_pass(model, mini.MiniMSF(), tmp_path / "base_sharded", torch.device("cpu"))
    assert sharded.written == 4
    names = [it["name"] for it in mini.MiniMSF().items]
    for name in names:
        a, b = load(tmp_path / "base" / f"{name}.npy"), load(tmp_path / "base_sharded" / f"{name}.npy")
        assert torch.equal(a["keys"], b["keys"]) and torch.equal(a["cam"], b["cam"])
        assert np.array_equal(a["high_res"], b["high_res"])
    cfg = LPCAMConfig.preset(preset, num_clusters=2, context_low=0.0, fallback_best_center=True,
                             **({"images_per_class": 3} if preset == "coco" else {}))
    settings = _irn_family.AdapterSettings(lpcam=cfg)
    weight = _irn_family.classifier_weight(model)
    plain = _irn_family.build_bank(model, mini.MiniSingle(), tmp_path / "base", settings, weight,
                                   bank_path=tmp_path / "plain.pt", extra_meta={"host": "mini"})
    bank = _irn_family.build_bank_sharded(model, mini.MiniSingle(), tmp_path / "base", settings, weight,
                                          torch.device("cpu"), bank_path=tmp_path / "sharded.pt",
                                          extra_meta={"host": "mini"})
    assert (tmp_path / "sharded.pt").read_bytes() == (tmp_path / "plain.pt").read_bytes()
    present = {k for it in mini.MiniMSF().items for k in torch.nonzero(it["label"])[:, 0].tolist()}
    assert bank.meta == plain.meta and bank.meta["images_seen"] == (3 * len(present) if preset == "coco" else 4)
    _irn_family.lpcam_pass(model, mini.MiniMSF(), tmp_path / "plain.pt", tmp_path / "lpcam")
    _irn_family.sharded_lpcam_pass(model, mini.MiniMSF(), tmp_path / "sharded.pt", tmp_path / "lpcam_sharded",
                                   torch.device("cpu"), read_dirs=[tmp_path / "base"])
    for name in names:
        a, b = load(tmp_path / "lpcam" / f"{name}.npy"), load(tmp_path / "lpcam_sharded" / f"{name}.npy")
        assert torch.equal(a["cam"], b["cam"]) and np.array_equal(a["high_res"], b["high_res"])
    again = _irn_family.sharded_lpcam_pass(model, mini.MiniMSF(), tmp_path / "sharded.pt", tmp_path / "lpcam_sharded",
                                           torch.device("cpu"))
    assert again.skipped == 4 and again.written == 0
    with pytest.raises(ValueError, match="same directory"):
        _irn_family.sharded_lpcam_pass(model, mini.MiniMSF(), tmp_path / "sharded.pt", tmp_path / "base",
                                       torch.device("cpu"), read_dirs=[tmp_path / "base"])

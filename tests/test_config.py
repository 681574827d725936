"""LPCAMConfig: the paper's presets, YAML round trip, overrides, validation."""

from __future__ import annotations

import dataclasses

import pytest

from lpcam_core.config import LPCAMConfig

# PAPER.md, "Hyper-parameters": | K | tau | mu_f | mu_b | context low bound | clustering images |
PAPER = {
    "voc": dict(num_clusters=12, fg_threshold=0.1, class_threshold=0.9, context_high=0.9, context_low=0.05, images_per_class=None),
    "coco": dict(num_clusters=20, fg_threshold=0.25, class_threshold=0.9, context_high=0.5, context_low=0.0, images_per_class=100),
}


@pytest.mark.parametrize("name", ["voc", "coco"])
def test_presets_hold_paper_values(name):
    cfg = LPCAMConfig.preset(name)
    for key, value in PAPER[name].items():
        assert getattr(cfg, key) == value, key
    assert cfg.scales == (1.0, 0.5, 1.5, 2.0)  # inference scales, each with its flip
    assert cfg.fallback_best_center is True  # the rule when no centre passes mu_f: best one + warning
    assert cfg.memory_budget_bytes == 2 * 1024**3  # default budget of the issue: 2 GiB
    assert cfg.preset_name == name
    assert LPCAMConfig.preset(name.upper()) == cfg


def test_coco_sampling_seed():
    assert LPCAMConfig.preset("coco").seed == 666  # "100 images per class, sampled with replacement, seed 666"


def test_default_is_voc():
    assert LPCAMConfig() == LPCAMConfig.preset("voc")


def test_preset_overrides_and_unknown_preset():
    cfg = LPCAMConfig.preset("coco", num_clusters=7)
    assert cfg.num_clusters == 7 and cfg.fg_threshold == 0.25
    with pytest.raises(ValueError, match=r"unknown preset 'ade'"):
        LPCAMConfig.preset("ade")


@pytest.mark.parametrize("name", ["voc", "coco"])
def test_yaml_round_trip(tmp_path, name):
    cfg = LPCAMConfig.preset(name, seed=3, scales=(1.0, 2.0), memory_budget_bytes=12345)
    path = tmp_path / "lpcam.yaml"
    text = cfg.to_yaml(path)
    assert path.read_text() == text
    for loaded in (LPCAMConfig.from_yaml(path), LPCAMConfig.from_yaml(text), LPCAMConfig.from_dict(cfg.to_dict())):
        assert loaded == cfg
        assert loaded.scales == (1.0, 2.0) and isinstance(loaded.scales, tuple)
        assert loaded.images_per_class == cfg.images_per_class


def test_from_dict_preset_plus_overrides(tmp_path):
    cfg = LPCAMConfig.from_dict({"preset": "coco", "context_high": 0.6, "kmeans_max_iter": 10})
    assert cfg.num_clusters == 20 and cfg.context_high == 0.6 and cfg.kmeans_max_iter == 10
    path = tmp_path / "c.yaml"
    path.write_text("preset: voc\nnum_clusters: 8\n")
    loaded = LPCAMConfig.from_yaml(path)
    assert loaded.num_clusters == 8 and loaded.fg_threshold == 0.1 and loaded.context_low == 0.05


def test_unknown_key_named(tmp_path):
    with pytest.raises(ValueError, match=r"unknown LPCAM setting\(s\) \['num_cluster'\]"):
        LPCAMConfig.from_dict({"num_cluster": 3})
    path = tmp_path / "typo.yaml"
    path.write_text("preset: voc\ntau: 0.2\n")
    with pytest.raises(ValueError, match=r"typo.yaml.*\['tau'\]"):
        LPCAMConfig.from_yaml(path)


def test_bad_yaml_and_missing_file(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("num_clusters: [1, 2\n")
    with pytest.raises(ValueError, match="bad.yaml: not valid YAML"):
        LPCAMConfig.from_yaml(path)
    with pytest.raises(FileNotFoundError, match="missing.yaml"):
        LPCAMConfig.from_yaml(tmp_path / "missing.yaml")
    with pytest.raises(TypeError, match="mapping"):
        LPCAMConfig.from_dict([1, 2])


@pytest.mark.parametrize(
    "name, value",
    [
        ("num_clusters", 0),
        ("num_clusters", 2.5),
        ("num_clusters", True),
        ("fg_threshold", 1.5),
        ("fg_threshold", float("nan")),
        ("class_threshold", 1.0),
        ("context_low", 0.95),  # not below context_high (0.9)
        ("images_per_class", 0),
        ("memory_budget_bytes", 0),
        ("kmeans_max_iter", 0),
        ("kmeans_tol", -1.0),
        ("kmeans_n_init", 0),
        ("scales", ()),
        ("scales", (1.0, -0.5)),
        ("max_normalise_eps", -1e-5),
        ("kmeans_tol", "small"),
        ("scales", "ab"),
        ("scales", (1.0, float("inf"))),
        ("fallback_best_center", "yes"),
        ("seed", 1.5),
        ("images_per_class", True),
    ],
)
def test_invalid_values_named(name, value):
    with pytest.raises(ValueError, match=f"LPCAMConfig.{name}="):
        LPCAMConfig(**{name: value})
    with pytest.raises(ValueError, match=name):
        LPCAMConfig.from_dict({"preset": "voc", name: value})


def test_frozen_and_replace():
    cfg = LPCAMConfig.preset("voc")
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.num_clusters = 3  # type: ignore[misc]
    assert cfg.replace(num_clusters=3).num_clusters == 3
    with pytest.raises(ValueError, match="num_clusters"):
        cfg.replace(num_clusters=-1)

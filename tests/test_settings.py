"""lpcam_adapters._settings: the settings parsing every adapter shares (torch-free)."""

from __future__ import annotations

import pytest

from lpcam_adapters import _settings
from lpcam_core import LPCAMConfig

KEYS = {"bank": "bank_path", "enabled": "enabled", "rebuild_bank": "rebuild_bank"}


def test_parse_bool_and_number_name_the_variable():
    assert _settings.parse_bool(" ON ", "X") is True and _settings.parse_bool("", "X") is False
    assert _settings.parse_bool(False, "X") is False
    with pytest.raises(ValueError, match=r"LPCAM='maybe': expected 1/0, true/false, on/off"):
        _settings.parse_bool("maybe", "LPCAM")
    assert _settings.parse_number("3", int, "LPCAM_K") == 3
    with pytest.raises(ValueError, match="LPCAM_K='3.5': expected an integer"):
        _settings.parse_number("3.5", int, "LPCAM_K")
    with pytest.raises(ValueError, match="LPCAM_TAU='x': expected a number"):
        _settings.parse_number("x", float, "LPCAM_TAU")


def test_read_config_sections_and_errors(tmp_path):
    assert _settings.read_config("", {"adapter": KEYS}) == _settings.ConfigFile(sections={"adapter": {}})
    path = tmp_path / "c.yaml"
    path.write_text("preset: coco\nnum_clusters: 7\nadapter:\n  bank: b.pt\n")
    cfg = _settings.read_config(str(path), {"adapter": KEYS, "amn": {}})
    assert (cfg.preset, cfg.core, cfg.sections) == ("coco", {"num_clusters": 7}, {"adapter": {"bank_path": "b.pt"}, "amn": {}})
    with pytest.raises(FileNotFoundError, match="LPCAM_CONFIG=.*missing.yaml: file not found"):
        _settings.read_config(str(tmp_path / "missing.yaml"), {})
    for text, match in (("a: [1\n", "not valid YAML"), ("- 1\n", "expected a mapping"),
                        ("adapter: 3\n", "`adapter` must be a mapping"),
                        ("adapter:\n  bnak: 1\n", r"unknown adapter key\(s\) \['bnak'\]")):
        path.write_text(text)
        with pytest.raises(ValueError, match=f"LPCAM_CONFIG={path}: {match}"):
            _settings.read_config(str(path), {"adapter": KEYS})


def test_lpcam_config_order_preset_file_variables(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("preset: coco\nnum_clusters: 7\n")
    cfg = _settings.read_config(str(path), {})
    out = _settings.lpcam_config({"LPCAM_TAU": "0.3", "LPCAM_MU": "0.8", "LPCAM_MEMORY_GB": " 0.5 "}, cfg)
    assert out.num_clusters == 7 and out.images_per_class == LPCAMConfig.preset("coco").images_per_class
    assert (out.fg_threshold, out.class_threshold, out.context_high) == (0.3, 0.8, 0.8)
    assert out.memory_budget_bytes == 512 * 2**20
    # LPCAM_PRESET wins over the file's preset; the file's keys still apply
    out = _settings.lpcam_config({"LPCAM_PRESET": "voc"}, cfg)
    assert out == LPCAMConfig.preset("voc", num_clusters=7)
    # an adapter's preset defaults sit under the file's keys
    empty = _settings.ConfigFile()
    assert _settings.lpcam_config({}, empty, preset_defaults={"voc": {"fg_threshold": 0.1}}).fg_threshold == 0.1
    assert _settings.lpcam_config({}, empty, fallback_preset="coco") == LPCAMConfig.preset("coco")


def test_common_adapter_values(tmp_path):
    out = _settings.common_adapter_values({"LPCAM": "0", "LPCAM_BANK": " b.pt ", "LPCAM_PROTO_LIST": ""},
                                          {"rebuild_bank": "yes", "bank_path": "a.pt"}, "c.yaml")
    assert out == {"rebuild_bank": True, "bank_path": "b.pt", "enabled": False}
    with pytest.raises(ValueError, match="c.yaml: adapter.enabled='maybe'"):
        _settings.common_adapter_values({}, {"enabled": "maybe"}, "c.yaml")
    with pytest.raises(ValueError, match="LPCAM_REBUILD_BANK='2'"):
        _settings.common_adapter_values({"LPCAM_REBUILD_BANK": "2"}, {}, None)


def test_adapters_share_the_parsing(tmp_path):
    """IRN, AMN and MCTformer read the same file and variables the same way."""
    from lpcam_adapters import _irn_family, mctformer

    path = tmp_path / "c.yaml"
    path.write_text("preset: coco\nnum_clusters: 7\nadapter:\n  rebuild_bank: on\n")
    env = {"LPCAM_CONFIG": str(path), "LPCAM_K": "9", "LPCAM_PRESET": "voc", "LPCAM": "off"}
    irn = _irn_family.settings_from_env(env)
    mct = mctformer.settings_from_env(env)
    assert irn.lpcam.num_clusters == mct.lpcam.num_clusters == 9
    assert irn.lpcam.preset_name == "voc"  # the variable names the preset, not the file
    assert irn.rebuild_bank and mct.rebuild_bank and not irn.enabled and not mct.enabled
    assert set(_settings.core_env_vars(preset="p", tau="t")) <= set(_irn_family.ENV_VARS) & set(mctformer.ENV_VARS)

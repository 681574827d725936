"""lpcam_adapters.settings: the settings parsing every host shares (torch-free)."""

from __future__ import annotations

import pytest

from lpcam_adapters import settings as hs
from lpcam_core import LPCAMConfig

OPTIONS = (hs.Option("colour", "LPCAM_COLOUR", "red", "a host choice", choices=("red", "blue"), flag="--colour"),
           hs.Option("size", "LPCAM_SIZE", 3, "a number", parse=int, yaml_keys=("n",)))


def test_parse_bool_and_number_name_the_variable():
    assert hs.parse_bool(" ON ", "X") is True and hs.parse_bool("", "X") is False
    assert hs.parse_bool(False, "X") is False
    with pytest.raises(ValueError, match=r"LPCAM='maybe': expected 1/0, true/false, on/off"):
        hs.parse_bool("maybe", "LPCAM")
    assert hs.parse_number("3", int, "LPCAM_K") == 3
    with pytest.raises(ValueError, match="LPCAM_K='3.5': expected an integer"):
        hs.parse_number("3.5", int, "LPCAM_K")
    with pytest.raises(ValueError, match="LPCAM_TAU='x': expected a finite number"):
        hs.parse_number("x", float, "LPCAM_TAU")
    for bad in ("inf", "nan", "-inf"):
        with pytest.raises(ValueError, match=f"LPCAM_MEMORY_GB='{bad}'"):
            hs.parse_number(bad, float, "LPCAM_MEMORY_GB")
    with pytest.raises(ValueError, match="LPCAM_K=True"):
        hs.parse_number(True, int, "LPCAM_K")


def test_yaml_sections_and_errors(tmp_path):
    assert hs.read_settings(OPTIONS, {}).options == {"colour": "red", "size": 3}
    path = tmp_path / "c.yaml"
    path.write_text("preset: coco\nnum_clusters: 7\nadapter:\n  bank: b.pt\n  colour: blue\n  n: 5\n")
    s = hs.read_settings(OPTIONS, {"LPCAM_CONFIG": str(path)})
    assert s.lpcam.num_clusters == 7 and s.lpcam.preset_name == "coco" and s.bank_path == "b.pt"
    assert s.options == {"colour": "blue", "size": 5}
    with pytest.raises(FileNotFoundError, match="LPCAM_CONFIG=.*missing.yaml"):
        hs.read_settings(OPTIONS, {"LPCAM_CONFIG": str(tmp_path / "missing.yaml")})
    for text, match in (("a: [1\n", "not valid YAML"), ("- 1\n", "expected a mapping"),
                        ("adapter: 3\n", "`adapter` must be a mapping"),
                        ("adapter:\n  bnak: 1\n", r"unknown adapter key\(s\) \['bnak'\]"),
                        ("adapter:\n  colour: green\n", r"adapter.colour='green': expected one of \['red', 'blue'\]")):
        path.write_text(text)
        with pytest.raises(ValueError, match=f"LPCAM_CONFIG={path}: {match}"):
            hs.read_settings(OPTIONS, {"LPCAM_CONFIG": str(path)})


def test_a_host_section_holds_its_options(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("adapter:\n  workers: 0\nhost:\n  colour: blue\n")
    s = hs.read_settings(OPTIONS, {"LPCAM_CONFIG": str(path)}, section="host")
    assert s.workers == 0 and s.option("colour") == "blue"
    path.write_text("adapter:\n  colour: blue\n")
    with pytest.raises(ValueError, match="unknown adapter key"):
        hs.read_settings(OPTIONS, {"LPCAM_CONFIG": str(path)}, section="host")


def test_order_preset_file_variables(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("preset: coco\nnum_clusters: 7\n")
    env = {"LPCAM_CONFIG": str(path), "LPCAM_TAU": "0.3", "LPCAM_MU": "0.8", "LPCAM_MEMORY_GB": " 0.5 "}
    out = hs.read_settings((), env).lpcam
    assert out.num_clusters == 7 and out.images_per_class == LPCAMConfig.preset("coco").images_per_class
    assert (out.fg_threshold, out.class_threshold, out.context_high) == (0.3, 0.8, 0.8)
    assert out.memory_budget_bytes == 512 * 2**20
    # LPCAM_PRESET wins over the file's preset; the file's keys still apply
    assert hs.read_settings((), {"LPCAM_CONFIG": str(path), "LPCAM_PRESET": "voc"}).lpcam == \
        LPCAMConfig.preset("voc", num_clusters=7)
    # a host's preset defaults sit under the file's keys
    assert hs.read_settings((), {}, preset_defaults={"voc": {"fg_threshold": 0.1}}).lpcam.fg_threshold == 0.1
    assert hs.read_settings((), {}, fallback_preset="coco").lpcam == LPCAMConfig.preset("coco")
    # variables override the file for the host's options too
    path.write_text("adapter:\n  colour: blue\n")
    assert hs.read_settings(OPTIONS, {"LPCAM_CONFIG": str(path), "LPCAM_COLOUR": "Red"}).option("colour") == "red"


def test_common_fields(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("adapter:\n  rebuild_bank: yes\n  bank_path: a.pt\n")
    s = hs.read_settings((), {"LPCAM_CONFIG": str(path), "LPCAM": "0", "LPCAM_BANK": " b.pt ", "LPCAM_PROTO_LIST": ""})
    assert (s.rebuild_bank, s.bank_path, s.enabled, s.proto_list) == (True, "b.pt", False, None)
    path.write_text("adapter:\n  enabled: maybe\n")
    with pytest.raises(ValueError, match="c.yaml: adapter.enabled='maybe'"):
        hs.read_settings((), {"LPCAM_CONFIG": str(path)})
    with pytest.raises(ValueError, match="LPCAM_REBUILD_BANK='2'"):
        hs.read_settings((), {"LPCAM_REBUILD_BANK": "2"})
    with pytest.raises(ValueError, match="LPCAM_WORKERS=-1"):
        hs.read_settings((), {"LPCAM_WORKERS": "-1"})
    with pytest.raises(ValueError, match="LPCAM_DEVICE='gpu0'"):
        hs.read_settings((), {"LPCAM_DEVICE": "gpu0"})


def test_hosts_share_the_parsing(tmp_path):
    """IRN, AMN and MCTformer read the same file and variables the same way."""
    from lpcam_adapters import amn, irn, mctformer

    path = tmp_path / "c.yaml"
    path.write_text("preset: coco\nnum_clusters: 7\nadapter:\n  rebuild_bank: on\n")
    env = {"LPCAM_CONFIG": str(path), "LPCAM_K": "9", "LPCAM_PRESET": "voc", "LPCAM": "off"}
    a = hs.read_settings(irn.INFO.options, env)
    b = hs.read_settings(amn.OPTIONS, env, section="amn")
    c = mctformer.settings_for(None, env)
    assert a.lpcam.num_clusters == b.lpcam.num_clusters == c.lpcam.num_clusters == 9
    assert a.lpcam.preset_name == "voc"  # the variable names the preset, not the file
    assert a.rebuild_bank and b.rebuild_bank and c.rebuild_bank and not (a.enabled or b.enabled or c.enabled)
    for info in (irn.INFO, amn.INFO, mctformer.INFO):
        assert set(hs.COMMON_ENV) <= set(hs.env_docs(info.options, **info.env_docs))


def test_unread_variables_are_reported_once_with_the_likely_name(monkeypatch, caplog):
    """A typo or another host's variable changes nothing: the run says so instead of ignoring it silently."""
    monkeypatch.setattr(hs, "UNREAD_REPORTED", set())
    env = {"LPCAM_MUF": "0.5", "LPCAM_AMN_STAGES": "b", "LPCAM_COLOUR": "blue", "LPCAM_HOSTS": "/x", "LPCAM_K": "4",
           "LPCAM_BLANK": " "}
    with caplog.at_level("WARNING", logger=hs.__name__):
        s = hs.read_settings(OPTIONS, env, host="demo")
    assert s.lpcam.class_threshold == LPCAMConfig.preset("voc").class_threshold  # the typo changed nothing
    assert s.options["colour"] == "blue" and s.lpcam.num_clusters == 4
    text = caplog.text
    assert "LPCAM_MUF is set but demo does not read it" in text and "did you mean LPCAM_MU_F?" in text
    assert "LPCAM_AMN_STAGES is set" in text and "another host's setting" in text and "lpcam demo --explain" in text
    for read_or_allowed in ("LPCAM_COLOUR", "LPCAM_HOSTS", "LPCAM_K", "LPCAM_BLANK"):
        assert read_or_allowed not in text
    caplog.clear()
    with caplog.at_level("WARNING", logger=hs.__name__):
        hs.read_settings(OPTIONS, env, host="demo")
    assert caplog.text == ""  # once per process


def test_an_option_of_another_host_is_reported_where_it_is_not_read(monkeypatch, caplog):
    import lpcam_adapters.irn_family as irn_family
    import lpcam_adapters.mctformer as mctformer

    monkeypatch.setattr(hs, "UNREAD_REPORTED", set())
    with caplog.at_level("WARNING", logger=hs.__name__):
        hs.read_settings((irn_family.AMP,), {"LPCAM_AMP": "1"}, host="irn")
        assert caplog.text == ""
        mctformer.settings_for(None, {"LPCAM_AMP": "1"})
    assert "LPCAM_AMP is set but mctformer does not read it" in caplog.text


@pytest.mark.parametrize("key, value, named", [("scales", "[1.0]", "--cam_scales"),
                                               ("max_normalise_eps", "0.001", "max-normalised")])
def test_core_keys_a_host_cannot_honour_are_refused_not_ignored(tmp_path, key, value, named):
    path = tmp_path / "c.yaml"
    path.write_text(f"num_clusters: 7\n{key}: {value}\n")
    with pytest.raises(ValueError, match=f"LPCAM_CONFIG={path}: `{key}` does not apply to a host run.*{named}"):
        hs.read_settings(OPTIONS, {"LPCAM_CONFIG": str(path)})
    path.write_text("num_clusters: 7\n")
    assert hs.read_settings(OPTIONS, {"LPCAM_CONFIG": str(path)}).lpcam.num_clusters == 7


def test_common_variables_a_host_does_not_read_are_reported_and_left_out_of_explain(monkeypatch, caplog):
    """MCTformer and CLIP-ES run their own loops: LPCAM_WORKERS does nothing there, and says so."""
    import lpcam_adapters.clip_es as clip_es
    import lpcam_adapters.irn as irn
    import lpcam_adapters.mctformer as mctformer
    from lpcam_adapters.cli import explain_text

    monkeypatch.setattr(hs, "UNREAD_REPORTED", set())
    with caplog.at_level("WARNING", logger=hs.__name__):
        hs.read_settings(irn.INFO.options, {"LPCAM_WORKERS": "2"}, host="irn")
        assert caplog.text == ""
        mctformer.settings_for(None, {"LPCAM_WORKERS": "2"})
        clip_es.settings_for({"LPCAM_BASELINE_DIR": "b"})
    assert "LPCAM_WORKERS is set but mctformer does not read it" in caplog.text
    assert "LPCAM_BASELINE_DIR is set but clip-es does not read it" in caplog.text
    assert "LPCAM_WORKERS" in explain_text(irn.INFO)
    for info in (mctformer.INFO, clip_es.INFO):
        text = explain_text(info)
        assert "LPCAM_BANK" in text and not any(var in text for var in info.unread_env), info.name


def test_settings_file_mistakes_are_one_line_with_the_likely_key(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("num_clusterz: 5\n")
    with pytest.raises(ValueError, match=r"unknown LPCAM setting\(s\) \['num_clusterz'\] \(did you mean 'num_clusters'") as err:
        hs.read_settings(OPTIONS, {"LPCAM_CONFIG": str(path)})
    assert "'preset'" in str(err.value) and "preset_name" not in str(err.value)
    path.write_text("adapter:\n  bnak: b.pt\n")
    with pytest.raises(ValueError, match=r"unknown adapter key\(s\) \['bnak'\] \(did you mean 'bank'"):
        hs.read_settings(OPTIONS, {"LPCAM_CONFIG": str(path)})
    path.write_text("a: [1\nb: 2\n")
    with pytest.raises(ValueError, match=r"not valid YAML: .* at line 2, column 2") as err:
        hs.read_settings(OPTIONS, {"LPCAM_CONFIG": str(path)})
    assert "\\n" not in str(err.value) and "\n" not in str(err.value)


def test_a_settings_file_key_the_host_does_not_read_is_reported_like_its_variable(tmp_path, monkeypatch, caplog):
    import lpcam_adapters.clip_es as clip_es

    monkeypatch.setattr(hs, "UNREAD_REPORTED", set())
    path = tmp_path / "c.yaml"
    path.write_text("adapter:\n  workers: 4\n  bank: b.pt\n")
    with caplog.at_level("WARNING", logger=hs.__name__):
        settings = clip_es.settings_for({"LPCAM_CONFIG": str(path)})
    assert settings.bank_path == "b.pt"
    assert "adapter.workers is set but clip-es does not read it" in caplog.text and "bank" not in caplog.text

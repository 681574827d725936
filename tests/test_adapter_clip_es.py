"""The CLIP-ES adapter's pieces that need no checkout: the cosine scorer, settings, the patch, the
synthetic layout CLIP-ES reads, the CPU shims its script needs. The host's own code runs in
tests/hosts/test_clip_es.py."""

from __future__ import annotations

import xml.etree.ElementTree as ET

import numpy as np
import pytest
import torch

from lpcam_core.classifier import CosineScorer


def _softmax_cos(centres: np.ndarray, rows: np.ndarray, scale: float) -> np.ndarray:
    c = centres / np.linalg.norm(centres, axis=1, keepdims=True)
    r = rows / np.linalg.norm(rows, axis=1, keepdims=True)
    z = scale * c @ r.T
    z = np.exp(z - z.max(axis=1, keepdims=True))
    return z / z.sum(axis=1, keepdims=True)


def test_cosine_scorer_is_clips_softmax_over_every_row():
    g = torch.Generator().manual_seed(0)
    rows, centres = torch.randn(7, 5, generator=g), torch.randn(4, 5, generator=g) * 3
    scorer = CosineScorer(rows, scale=100.0, num_classes=5)  # rows 5 and 6: background prompts
    expected = _softmax_cos(centres.double().numpy(), rows.double().numpy(), 100.0)
    assert scorer.num_classes == 5 and scorer.feature_dim == 5
    for c in range(5):
        np.testing.assert_allclose(scorer.probability(centres, c).numpy(), expected[:, c], atol=1e-5)
    assert scorer.probability(centres, 0).dtype == torch.float32
    with pytest.raises(ValueError, match="outside 0..4"):
        scorer.probability(centres, 5)  # a background row is never a class
    # the length of a centre does not matter (cosine), unlike LinearScorer's logits
    torch.testing.assert_close(scorer.probability(centres * 7, 2), scorer.probability(centres, 2))


def test_cosine_scorer_maps_centres_into_the_text_space():
    g = torch.Generator().manual_seed(1)
    rows, proj, centres = torch.randn(3, 4, generator=g), torch.randn(6, 4, generator=g), torch.randn(5, 6, generator=g)

    class Proj(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.register_buffer("proj", proj)

        def forward(self, x):
            return x @ self.proj

    scorer = CosineScorer(rows, scale=10.0, to_space=Proj(), feature_dim=6)
    expected = _softmax_cos((centres @ proj).double().numpy(), rows.double().numpy(), 10.0)
    np.testing.assert_allclose(scorer.probability(centres, 1).numpy(), expected[:, 1], atol=1e-5)
    assert scorer.feature_dim == 6
    prints = {scorer.fingerprint(), CosineScorer(rows, scale=10.0).fingerprint(),
              CosineScorer(rows, scale=11.0).fingerprint(), CosineScorer(rows[:2], scale=10.0).fingerprint(),
              CosineScorer(rows, scale=10.0, num_classes=2).fingerprint()}
    assert len(prints) == 5, "scale, rows, classes and the map into the text space each identify the classifier"
    with pytest.raises(ValueError, match="feature_dim is required"):
        CosineScorer(rows, to_space=Proj())
    with pytest.raises(TypeError, match="nn.Module"):
        CosineScorer(rows, to_space=lambda x: x, feature_dim=6)
    for bad in (0, 4, True, 1.5):
        with pytest.raises(ValueError, match="num_classes"):
            CosineScorer(rows, num_classes=bad)
    for bad in (0.0, -1.0, float("inf"), float("nan")):
        with pytest.raises(ValueError, match="logit scale"):
            CosineScorer(rows, scale=bad)


def test_settings_are_checked_at_import_time_names():
    from lpcam_adapters import clip_es

    settings = clip_es.settings_for({})
    assert (settings.option("features"), settings.option("scorer"), settings.option("build")) == ("ln_post", "classes", "auto")
    assert settings.lpcam.images_per_class is None and clip_es.settings_for({}, coco=True).lpcam.images_per_class == 100
    assert clip_es.settings_for({"LPCAM_CLIP_FEATURES": "PROJ"}).option("features") == "proj"
    with pytest.raises(ValueError, match="LPCAM_CLIP_FEATURES='cls'.*ln_post"):
        clip_es.settings_for({"LPCAM_CLIP_FEATURES": "cls"})
    with pytest.raises(ValueError, match="LPCAM_CLIP_SCORER"):
        clip_es.settings_for({"LPCAM_CLIP_SCORER": "background"})


def test_gradcam_outside_the_script_is_a_clear_error():
    import types

    from lpcam_adapters import clip_es

    with pytest.raises(RuntimeError, match="outside CLIP-ES's generate_cams.*fg_text_features.*LPCAM=0"):
        clip_es.HostRun(types.SimpleNamespace(args=None, bg_text_features=None, img_ms_and_flip=None))


def test_the_import_replaces_gradcam_and_explains_it():
    from lpcam_adapters import clip_es, hooks

    rows = [p for p in hooks.describe_patches("pytorch_grad_cam") if p.name == "GradCAM"]
    assert rows and "LPCAMGradCAM" in rows[0].description
    assert "pkg_resources" in hooks.explain()
    target = clip_es.clip_target(2)
    assert float(target(torch.tensor([0.1, 0.2, 0.7]))) == pytest.approx(0.7)
    assert target(torch.tensor([[0.1, 0.2, 0.7]])).tolist() == pytest.approx([0.7])


def _fake_checkout(root, first_lines=b"# -*- coding:UTF-8 -*-\r\nfrom pytorch_grad_cam import GradCAM\r\nimport torch\r\n"):
    (root / "clip").mkdir(parents=True)
    (root / "clip" / "model.py").write_text("class CLIP:\n    def forward_last_layer(self, x, t):\n        pass\n")
    (root / "generate_cams_voc12.py").write_bytes(first_lines + b"print('cams')\r\n")
    return root / "generate_cams_voc12.py"


def test_patch_puts_the_line_before_the_gradcam_import_and_reverts_byte_for_byte(tmp_path):
    from lpcam_adapters import cli, clip_es

    script = _fake_checkout(tmp_path / "CLIP-ES")
    before = script.read_bytes()
    assert cli.patch_entry_script(script.parent, clip_es.INFO) == "applied"
    lines = script.read_bytes().split(b"\r\n")
    assert lines[0] == b"# -*- coding:UTF-8 -*-" and lines[1].startswith(b"import lpcam_adapters.clip_es  #")
    assert lines[2] == b"from pytorch_grad_cam import GradCAM", "CRLF kept, the line right before the import"
    assert cli.patch_entry_script(script.parent, clip_es.INFO) == "already applied"
    assert cli.patch_entry_script(script.parent, clip_es.INFO, revert=True) == "reverted"
    assert script.read_bytes() == before
    other = tmp_path / "other"
    other.mkdir()
    (other / "generate_cams_voc12.py").write_bytes(before)  # same script name, no CLIP-ES model: refused
    with pytest.raises(ValueError, match="CLIP-ES"):
        cli.patch_entry_script(other, clip_es.INFO)


def test_voc_annotations_hold_what_clip_es_reads(tmp_path):
    from PIL import Image

    from lpcam_core.formats import VOC_CLASS_NAMES, write_host_lists, write_voc_annotations

    (tmp_path / "JPEGImages").mkdir()
    Image.new("RGB", (40, 30)).save(tmp_path / "JPEGImages" / "2007_000032.jpg")
    Image.new("RGB", (16, 48)).save(tmp_path / "JPEGImages" / "2007_000039.jpg")
    labels = {"2007_000032": [14, 0], "2007_000039": [19]}
    write_voc_annotations(tmp_path, labels)
    xml = ET.parse(tmp_path / "Annotations" / "2007_000032.xml").getroot()
    assert (xml.findtext("size/width"), xml.findtext("size/height")) == ("40", "30")
    assert [o.findtext("name") for o in xml.findall("object")] == ["aeroplane", "person"]
    assert [o.findtext("name") for o in ET.parse(tmp_path / "Annotations" / "2007_000039.xml").getroot()
            .findall("object")] == [VOC_CLASS_NAMES[19]] == ["tvmonitor"]
    with pytest.raises(ValueError, match="class 20 has no name"):
        write_voc_annotations(tmp_path, {"2007_000039": [20]})
    written = write_host_lists("clip-es", tmp_path, labels, train=["2007_000032"], val=["2007_000039"])
    assert sorted(p.name for p in written) == ["train.txt", "train_aug.txt", "val.txt"]  # no label file: the XML
    assert (tmp_path / "voc12" / "val.txt").read_text() == "2007_000039\n"


def test_cpu_shims_send_cuda_devices_to_the_cpu():
    from lpcam_adapters.cpu import cuda_as_cpu

    real = torch.Tensor.to
    with cuda_as_cpu() as shimmed:
        if not shimmed:
            pytest.skip("CUDA is available: nothing is shimmed")
        assert torch.ones(2).to("cuda:1").device.type == "cpu"
        assert torch.nn.Linear(2, 2).to(torch.device("cuda")).weight.device.type == "cpu"
        assert torch.ones(2).to(device="cuda", dtype=torch.float16).dtype == torch.float16
        assert torch.ones(2).to(torch.float64).dtype == torch.float64
    assert torch.Tensor.to is real


def test_clip_es_eval_output_is_parsed():
    from lpcam_adapters.clip_es import mean_iou

    out = "1 0.2\n{'Pixel Accuracy': np.float64(0.7), 'Mean IoU': np.float64(0.4312), 'Class IoU': {}}\n"
    assert mean_iou(out) == pytest.approx(0.4312)
    assert mean_iou("{'Mean IoU': 0.25}") == 0.25 and mean_iou("nothing") is None


def test_mctformer_eval_output_is_parsed():
    from lpcam_adapters.trial import best_miou

    out = "0/60 background score: 0.000\tmIoU: 3.100%\nBest background score: 0.350\tmIoU: 43.210%\n"
    assert best_miou(out) == pytest.approx(0.4321) and best_miou("nothing") is None


def test_the_scripts_input_paths_are_named_before_clip_loads(tmp_path, monkeypatch):
    from lpcam_adapters import clip_es

    monkeypatch.chdir(tmp_path)
    images = tmp_path / "VOC2012" / "JPEGImages"
    images.mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match=r"--img_root nope: no such folder \(relative to the working directory"):
        clip_es.check_script_paths(["--img_root", "nope"])
    with pytest.raises(FileNotFoundError, match=r"--split_file ./voc12/train.txt \(the script's default\): no such file"):
        clip_es.check_script_paths(["--img_root", str(images)])
    (tmp_path / "voc12").mkdir()
    (tmp_path / "voc12" / "train.txt").write_text("2007_000032\n")
    with pytest.raises(FileNotFoundError, match="no Annotations folder beside it"):
        clip_es.check_script_paths([f"--img_root={images}"])
    (tmp_path / "VOC2012" / "Annotations").mkdir()
    clip_es.check_script_paths(["--img_root", str(images), "--model", "ViT-B/16"])  # a model name is the script's
    with pytest.raises(FileNotFoundError, match=r"--split_file ./coco14/train.txt \(the script's default\)"):
        clip_es.check_script_paths(["--img_root", str(images)], "generate_cams_coco14.py")

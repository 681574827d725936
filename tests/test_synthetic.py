"""Tests of the procedural VOC-layout dataset (lpcam_core.demo.synthetic)."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
from PIL import Image

from lpcam_core.demo.synthetic import (
    PART_NAMES,
    SyntheticConfig,
    class_names,
    generate,
    id_to_int,
    load_voc,
    render_image,
    voc_palette,
    write_voc,
)

TINY = {"num_images": 10, "image_size": 48, "val_fraction": 0.3}


def tiny(**changes) -> SyntheticConfig:
    return SyntheticConfig(**{**TINY, **changes})


def test_same_seed_same_arrays():
    a = generate(tiny(seed=3))
    b = generate(tiny(seed=3))
    for split in ("train", "val"):
        assert a[split].ids == b[split].ids
        np.testing.assert_array_equal(a[split].images, b[split].images)
        np.testing.assert_array_equal(a[split].masks, b[split].masks)
        np.testing.assert_array_equal(a[split].labels, b[split].labels)
        np.testing.assert_array_equal(a[split].parts, b[split].parts)


def test_different_seed_different_arrays():
    a = generate(tiny(seed=0), splits=("train",))["train"]
    b = generate(tiny(seed=1), splits=("train",))["train"]
    assert not np.array_equal(a.images, b.images)
    assert not np.array_equal(a.masks, b.masks)


def test_image_depends_only_on_seed_and_index():
    small = generate(tiny(num_images=10), splits=("train",))["train"]
    large = generate(tiny(num_images=20), splits=("train",))["train"]
    np.testing.assert_array_equal(small.images, large.images[: len(small)])
    image, mask, label, part = render_image(tiny(num_images=10), 2)
    np.testing.assert_array_equal(image, small.images[2])
    np.testing.assert_array_equal(mask, small.masks[2])
    np.testing.assert_array_equal(label, small.labels[2])
    np.testing.assert_array_equal(part, small.parts[2])


def test_arrays_shapes_and_consistency():
    cfg = tiny(num_classes=4, num_images=16)
    data = generate(cfg)
    assert len(data["train"]) == cfg.num_train and len(data["val"]) == cfg.num_val
    for split in data.values():
        n = len(split)
        assert split.images.shape == (n, 48, 48, 3) and split.images.dtype == np.uint8
        assert split.masks.shape == (n, 48, 48) and split.masks.dtype == np.uint8
        assert split.labels.shape == (n, 4) and split.labels.dtype == np.float32
        for mask, label, part in zip(split.masks, split.labels, split.parts):
            present = {int(v) - 1 for v in np.unique(mask) if 0 < v < 255}
            assert present == set(np.nonzero(label)[0].tolist())
            assert 1 <= label.sum() <= cfg.max_objects
            assert set(np.unique(part).tolist()) <= set(PART_NAMES) | {255}
            np.testing.assert_array_equal(part == 255, mask == 255)
            np.testing.assert_array_equal(part == 0, mask == 0)
        for image_id in split.ids:
            assert re.fullmatch(r"\d{4}_\d{6}", image_id)


def _no_direct_contact(mask: np.ndarray) -> bool:
    """True when two different labels (neither 255) never touch horizontally or vertically."""
    for a, b in ((mask[1:], mask[:-1]), (mask[:, 1:], mask[:, :-1])):
        touching = (a != b) & (a != 255) & (b != 255)
        if touching.any():
            return False
    return True


def test_borders_are_255_between_labels():
    data = generate(tiny(num_images=12), splits=("train",))["train"]
    assert (data.masks == 255).any()
    for mask in data.masks:
        assert _no_direct_contact(mask)
    no_border = generate(tiny(num_images=12, border=0), splits=("train",))["train"]
    assert not (no_border.masks == 255).any()


def test_write_voc_layout(tmp_path):
    cfg = tiny(num_classes=5)
    root = write_voc(cfg, tmp_path / "voc", progress=False)
    train_ids = (root / "ImageSets/Segmentation/train.txt").read_text().split()
    val_ids = (root / "ImageSets/Segmentation/val.txt").read_text().split()
    assert len(train_ids) == cfg.num_train and len(val_ids) == cfg.num_val
    assert not set(train_ids) & set(val_ids)
    labels = np.load(root / "cls_labels.npy", allow_pickle=True).item()
    assert set(labels) == {id_to_int(i) for i in train_ids + val_ids}
    palette = voc_palette()
    for image_id in train_ids + val_ids:
        with Image.open(root / "JPEGImages" / f"{image_id}.jpg") as im:
            assert im.mode == "RGB" and im.size == (48, 48)
        with Image.open(root / "SegmentationClass" / f"{image_id}.png") as im:
            assert im.mode == "P"
            assert im.getpalette()[:768] == palette
            mask = np.asarray(im)
        vector = labels[id_to_int(image_id)]
        assert vector.dtype == np.float32 and vector.shape == (5,)
        present = {int(v) - 1 for v in np.unique(mask) if 0 < v < 255}
        assert present == set(np.nonzero(vector)[0].tolist())
    record = json.loads((root / "synthetic_params.json").read_text())
    assert SyntheticConfig.from_dict(record["params"]) == cfg
    assert record["class_names"] == class_names(5)


def test_load_voc_round_trip(tmp_path):
    cfg = tiny()
    write_voc(cfg, tmp_path, progress=False)
    loaded = load_voc(tmp_path, "val")
    direct = generate(cfg, splits=("val",))["val"]
    assert loaded.ids == direct.ids
    np.testing.assert_array_equal(loaded.masks, direct.masks)
    np.testing.assert_array_equal(loaded.labels, direct.labels)
    np.testing.assert_array_equal(loaded.parts, direct.parts)
    assert np.abs(loaded.images.astype(int) - direct.images).mean() < 6  # JPEG, quality 95
    with pytest.raises(FileNotFoundError, match="split"):
        load_voc(tmp_path, "test")


def test_write_voc_is_cached(tmp_path):
    cfg = tiny()
    write_voc(cfg, tmp_path, progress=False)
    jpg = next((tmp_path / "JPEGImages").iterdir())
    stamp = jpg.stat().st_mtime_ns
    write_voc(cfg, tmp_path, progress=False)
    assert jpg.stat().st_mtime_ns == stamp
    write_voc(tiny(seed=5), tmp_path, progress=False)  # other parameters: rewritten
    assert json.loads((tmp_path / "synthetic_params.json").read_text())["params"]["seed"] == 5
    assert len(list((tmp_path / "JPEGImages").iterdir())) == cfg.num_images


def test_id_to_int_matches_irn_keys():
    assert id_to_int("2007_000032") == 2007000032
    assert class_names(3) == ["creature00", "creature01", "creature02"]


def test_voc_palette():
    palette = voc_palette()
    assert len(palette) == 768
    assert palette[3:6] == [128, 0, 0] and palette[255 * 3: 256 * 3] == [224, 224, 192]


def test_sharing_one_makes_bodies_identical():
    from lpcam_core.demo.synthetic import _class_styles

    styles = _class_styles(tiny(sharing=1.0))
    assert len({(s.body_hue, s.stripe_angle, s.stripe_period, s.leg_val) for s in styles}) == 1
    varied = _class_styles(tiny(sharing=0.5))
    assert len({s.body_hue for s in varied}) == len(varied)


def nearest_gap(values) -> float:
    ordered = np.sort(np.asarray(values, dtype=float))
    return float(np.diff(ordered).min())


def test_body_variants_never_further_apart_than_six_classes():
    """Fewer classes must not make the bodies discriminative: neighbours sit at most as far
    apart as with 6 classes, and every variant stays in the texture family's range."""
    from lpcam_core.demo.synthetic import _class_styles

    for seed in (0, 1):
        six = nearest_gap([s.body_hue for s in _class_styles(tiny(num_classes=6, seed=seed))])
        for n in (2, 3, 4, 5, 6, 10, 20):
            styles = _class_styles(tiny(num_classes=n, seed=seed))
            hues = [s.body_hue for s in styles]
            angles = [s.stripe_angle for s in styles]
            assert nearest_gap(hues) <= six + 1e-9, n
            assert nearest_gap(hues) > 0 and nearest_gap(angles) > 0, n
            # spread 0.5 around hue 30 and angle 90: within +-15 and +-30 degrees
            assert max(abs(h - 30.0) for h in hues) <= 15.0 + 1e-9, n
            assert max(abs(a - 90.0) for a in angles) <= 30.0 + 1e-9, n
        four = _class_styles(tiny(num_classes=4, seed=seed))
        assert nearest_gap([s.body_hue for s in four]) == pytest.approx(six)


@pytest.mark.parametrize(
    ("changes", "error", "name"),
    [
        ({"num_classes": 1}, ValueError, "num_classes"),
        ({"num_classes": 21}, ValueError, "num_classes"),
        ({"num_classes": 2.5}, TypeError, "num_classes"),
        ({"image_size": 8}, ValueError, "image_size"),
        ({"sharing": 1.5}, ValueError, "sharing"),
        ({"context_correlation": -0.1}, ValueError, "context_correlation"),
        ({"truncation": 2.0}, ValueError, "truncation"),
        ({"body_length": (0.6, 0.4)}, ValueError, "body_length"),
        ({"body_length": 0.5}, TypeError, "body_length"),
        ({"min_objects": 3, "max_objects": 2}, ValueError, "max_objects"),
        ({"val_fraction": 0.0}, ValueError, "val_fraction"),
        ({"num_images": 2, "val_fraction": 0.1}, ValueError, "num_images"),
        ({"jpeg_quality": 0}, ValueError, "jpeg_quality"),
    ],
)
def test_parameter_validation(changes, error, name):
    with pytest.raises(error, match=name):
        tiny(**changes)


def test_bad_arguments():
    with pytest.raises(TypeError, match="SyntheticConfig"):
        generate({"num_images": 4})
    with pytest.raises(ValueError, match="split"):
        generate(tiny(), splits=("test",))
    with pytest.raises(ValueError, match="index"):
        render_image(tiny(), 10)
    with pytest.raises(ValueError, match="unknown"):
        SyntheticConfig.from_dict({"colour": 1})


@pytest.mark.parametrize("num_classes, expected_per_class", [(4, 300), (6, 200), (10, 200), (20, 200)])
def test_default_size_keeps_enough_images_per_class(num_classes, expected_per_class):
    # The CAM network needs enough images per class: with 10 classes and 1,200 images LPCAM did not
    # beat CAM (README); the default holds >= 200 per class and never fewer than 1,200 in all.
    cfg = SyntheticConfig(num_classes=num_classes)
    assert cfg.num_images == num_classes * expected_per_class
    assert SyntheticConfig(num_classes=num_classes, num_images=50).num_images == 50

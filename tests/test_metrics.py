"""Tests of lpcam_core.eval.metrics: hand-computed confusion matrices, scores, label rule, sweeps."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from PIL import Image

from lpcam_core.eval import metrics as m
from lpcam_core.formats import save_irn_cam


def _reference_confusion(preds, gts, ignore=255):
    """Slow pixel loop with chainercv's growth rule (pred counts everywhere, gt only where valid)."""
    counts: dict[tuple[int, int], int] = {}
    size = 0
    for p, g in zip(preds, gts):
        valid_g = [int(v) for v in g.ravel() if v >= 0 and v != ignore]
        size = max(size, int(p.max()) + 1, max(valid_g, default=-1) + 1)
        for pv, gv in zip(p.ravel(), g.ravel()):
            if gv >= 0 and gv != ignore:
                counts[(int(gv), int(pv))] = counts.get((int(gv), int(pv)), 0) + 1
    out = np.zeros((size, size), np.int64)
    for (i, j), c in counts.items():
        out[i, j] = c
    return out


# --------------------------------------------------------------------------- confusion matrix


def test_confusion_small_by_hand():
    pred = np.array([[0, 1], [1, 1]])
    gt = np.array([[0, 1], [0, -1]])
    conf = m.confusion_matrix([pred], [gt])
    assert conf.dtype == np.int64
    np.testing.assert_array_equal(conf, [[1, 1], [0, 1]])


def test_confusion_grows_to_largest_label_and_keeps_counts():
    p1, g1 = np.array([[0, 1]]), np.array([[0, 1]])
    p2, g2 = np.array([[3, 0, 2]]), np.array([[0, 0, 2]])
    conf = m.confusion_matrix([p1, p2], [g1, g2])
    expected = np.zeros((4, 4), np.int64)
    expected[0, 0] = 2  # one from each image
    expected[1, 1] = 1
    expected[0, 3] = 1
    expected[2, 2] = 1
    np.testing.assert_array_equal(conf, expected)


def test_confusion_ignores_minus_one_and_255():
    pred = np.array([[1, 2, 0, 4]], dtype=np.uint8)
    gt = np.array([[1, 255, 0, -1]], dtype=np.int16)
    conf = m.confusion_matrix([pred], [gt])
    # pred 4 sits on an ignored pixel: chainercv still grows to 5 classes; 255 does not grow it
    assert conf.shape == (5, 5)
    assert conf.sum() == 2
    assert conf[1, 1] == 1 and conf[0, 0] == 1


def test_confusion_uint8_inputs_do_not_overflow():
    gt = np.full((4, 4), 20, np.uint8)
    pred = np.full((4, 4), 19, np.uint8)
    conf = m.confusion_matrix([pred], [gt])
    assert conf.shape == (21, 21) and conf[20, 19] == 16


def test_confusion_matches_reference_on_random_maps():
    rng = np.random.default_rng(0)
    preds, gts = [], []
    for _ in range(5):
        h, w = rng.integers(3, 9, size=2)
        preds.append(rng.integers(0, 6, size=(h, w)))
        g = rng.integers(0, 6, size=(h, w))
        g[rng.random((h, w)) < 0.2] = 255
        g[rng.random((h, w)) < 0.1] = -1
        gts.append(g)
    np.testing.assert_array_equal(m.confusion_matrix(preds, gts), _reference_confusion(preds, gts))


def test_confusion_shape_mismatch_names_pair_index():
    good = np.zeros((2, 2), int)
    with pytest.raises(ValueError, match="pair 1"):
        m.confusion_matrix([good, np.zeros((2, 3), int)], [good, good])
    with pytest.raises(ValueError, match="2-D"):
        m.confusion_matrix([np.zeros((2, 2, 1), int)], [np.zeros((2, 2, 1), int)])


def test_confusion_length_mismatch():
    a = np.zeros((2, 2), int)
    with pytest.raises(ValueError, match="length"):
        m.confusion_matrix([a, a], [a])


def test_confusion_rejects_float_labels():
    with pytest.raises(TypeError, match="integer"):
        m.confusion_matrix([np.zeros((2, 2))], [np.zeros((2, 2), int)])


def test_confusion_matrix_accumulator_fixed_size():
    cm = m.ConfusionMatrix(4)
    cm.update(np.array([[0, 1]]), np.array([[0, 2]]))
    cm.update(torch.tensor([[3, 3]]), torch.tensor([[3, 255]]))
    expected = np.zeros((4, 4), np.int64)
    expected[0, 0] = expected[2, 1] = expected[3, 3] = 1
    np.testing.assert_array_equal(cm.matrix, expected)
    with pytest.raises(ValueError, match="out of range"):
        cm.update(np.array([[4]]), np.array([[0]]))
    np.testing.assert_array_equal(cm.matrix, expected)  # failed update added nothing
    with pytest.raises(ValueError, match="num_classes"):
        m.ConfusionMatrix(0)


# --------------------------------------------------------------------------- scores


def test_scores_by_hand():
    conf = np.array([[3, 1, 0], [2, 4, 0], [0, 0, 0]])
    s = m.scores_from_confusion(conf)
    np.testing.assert_allclose(s["iou"][:2], [3 / 6, 4 / 7])
    assert math.isnan(s["iou"][2])
    np.testing.assert_allclose(m.iou_from_confusion(conf)[:2], [0.5, 4 / 7])
    assert s["miou"] == pytest.approx((0.5 + 4 / 7) / 2)
    np.testing.assert_allclose(s["precision"][:2], [3 / 5, 4 / 5])
    np.testing.assert_allclose(s["recall"][:2], [3 / 4, 4 / 6])
    assert math.isnan(s["precision"][2]) and math.isnan(s["recall"][2])
    assert s["mean_precision"] == pytest.approx(0.8)  # foreground only, NaN skipped
    assert s["mean_recall"] == pytest.approx(2 / 3)
    assert s["fp"] == pytest.approx(0.2)
    assert s["fn"] == pytest.approx(1 / 3)
    assert s["pixel_accuracy"] == pytest.approx(0.7)


def test_scores_empty_matrix_is_nan_without_error():
    s = m.scores_from_confusion(np.zeros((3, 3), np.int64))
    assert math.isnan(s["miou"]) and math.isnan(s["mean_precision"])
    with pytest.raises(ValueError, match="square"):
        m.iou_from_confusion(np.zeros((2, 3)))


# --------------------------------------------------------------------------- cams_to_label


HIGH_RES = np.array(
    [
        [[0.5, 0.1], [0.3, 0.2]],  # class key 4 -> label 5
        [[0.6, 0.05], [0.1, 0.7]],  # class key 14 -> label 15
    ],
    dtype=np.float32,
)


def test_cams_to_label_by_hand():
    labels = m.cams_to_label(np.array([4, 14]), HIGH_RES, 0.3)
    # (1, 0) equals the threshold: tie goes to the background plane (argmax keeps the first)
    np.testing.assert_array_equal(labels, [[15, 0], [0, 15]])
    assert labels.dtype == np.int64
    torch_labels = m.cams_to_label(torch.tensor([4, 14]), torch.from_numpy(HIGH_RES), 0.3)
    np.testing.assert_array_equal(torch_labels, labels)
    np.testing.assert_array_equal(m.cams_to_label([4, 14], HIGH_RES, 0.55), [[15, 0], [0, 15]])
    np.testing.assert_array_equal(m.cams_to_label([4, 14], HIGH_RES, 0.0), [[15, 5], [5, 15]])


def test_cams_to_label_matches_irn_pad_rule_with_float64_threshold():
    rng = np.random.default_rng(1)
    hr = rng.random((3, 6, 7)).astype(np.float32)
    hr[1, 2, 3] = np.float32(0.15)
    hr[:, 2, 3] = np.minimum(hr[:, 2, 3], np.float32(0.15))
    keys = np.array([0, 7, 19])
    thr = np.float64(0.15)  # float32(0.15) > float64(0.15): casting matters
    stacked = np.pad(hr, ((1, 0), (0, 0), (0, 0)), mode="constant", constant_values=thr)
    lut = np.pad(keys + 1, (1, 0), mode="constant")
    expected = lut[np.argmax(stacked, axis=0)]
    got = m.cams_to_label(keys, hr, thr)
    np.testing.assert_array_equal(got, expected)
    assert got[2, 3] == 0


def test_cams_to_label_background_channel_variants():
    bg = np.array([[0.9, 0.0], [0.0, 0.0]], np.float32)
    amn = np.concatenate([bg[None], HIGH_RES])
    np.testing.assert_array_equal(m.cams_to_label([4, 14], amn, background="channel0"), [[0, 5], [5, 15]])
    np.testing.assert_array_equal(
        m.cams_to_label([4, 14], amn, 0.3, background="drop_channel0"), m.cams_to_label([4, 14], HIGH_RES, 0.3)
    )
    with pytest.raises(ValueError, match="drop_channel0"):
        m.cams_to_label([4, 14], amn, 0.3)
    with pytest.raises(ValueError, match="background must be"):
        m.cams_to_label([4, 14], HIGH_RES, 0.3, background="zero")


def test_cams_to_label_no_classes_is_background():
    np.testing.assert_array_equal(m.cams_to_label(np.zeros(0, np.int64), np.zeros((0, 2, 3), np.float32), 0.1), 0)
    assert m.cams_to_label([], np.zeros((0, 2, 3), np.float32), 0.1).shape == (2, 3)
    np.testing.assert_array_equal(m.cams_to_label([], np.ones((1, 2, 3)), background="channel0"), 0)


def test_cams_to_label_rejects_nan_and_bad_shapes():
    bad = HIGH_RES.copy()
    bad[0, 0, 0] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        m.cams_to_label([4, 14], bad, 0.3)
    with pytest.raises(ValueError, match="3-D"):
        m.cams_to_label([4], HIGH_RES[0], 0.3)


# --------------------------------------------------------------------------- sweeps


def _constructed_samples():
    """Two images whose object scores 0.6 and background 0.4: any threshold in [0.4, 0.6) is perfect."""
    rng = np.random.default_rng(3)
    samples = []
    for key in (2, 11):
        gt = np.zeros((8, 10), np.uint8)
        gt[2:6, 3:8] = key + 1
        gt[0, 0] = 255
        cam = np.where(gt == key + 1, 0.6, 0.4).astype(np.float32)
        cam += rng.uniform(-0.05, 0.05, size=cam.shape).astype(np.float32)
        samples.append((np.array([key]), cam[None], gt))
    return samples


def test_sweep_picks_the_right_threshold():
    thresholds = [0.2, 0.3, 0.5, 0.7]
    best, curve = m.sweep_from_arrays(_constructed_samples(), thresholds)
    assert best == 0.5
    assert [t for t, _ in curve] == thresholds
    miou = dict(curve)
    assert miou[0.5] == pytest.approx(1.0)
    # 2 images x 79 valid pixels (one 255 each): bg gt 2*59 = 118, each class 20.
    # at 0.7 everything is background: bg IoU = 118/158, both class IoUs 0
    assert miou[0.7] == pytest.approx((118 / 158) / 3)
    # at 0.2 and 0.3 everything is foreground: bg IoU 0, fg IoU 20/79 each
    assert miou[0.2] == pytest.approx((2 * 20 / 79) / 3)
    assert miou[0.3] == miou[0.2]


def test_sweep_and_evaluate_agree_with_label_rule():
    samples = _constructed_samples()
    _, curve = m.sweep_from_arrays(samples, [0.45, 0.62])
    for thr, miou in curve:
        res = m.evaluate_from_arrays(samples, thr)
        preds = [m.cams_to_label(k, h, thr) for k, h, _ in samples]
        direct = m.confusion_matrix(preds, [g for *_, g in samples], num_classes=21)
        np.testing.assert_array_equal(res["confusion"], direct)
        assert res["miou"] == pytest.approx(miou)
        assert res["num_images"] == 2 and res["threshold"] == thr


def test_sweep_errors():
    with pytest.raises(ValueError, match="no samples"):
        m.sweep_from_arrays([], [0.1])
    with pytest.raises(ValueError, match="empty"):
        m.sweep_from_arrays(_constructed_samples(), [])
    keys, hr, gt = _constructed_samples()[0]
    with pytest.raises(ValueError, match="sample 0"):
        m.evaluate_from_arrays([(keys, hr, gt[:-1])], 0.5)
    with pytest.raises(ValueError, match="out of range"):
        m.evaluate_from_arrays([(keys, hr, gt)], 0.5, num_classes=3)


def _write_dataset(tmp_path, samples):
    cam_dir, gt_dir = tmp_path / "cams", tmp_path / "gt"
    cam_dir.mkdir()
    gt_dir.mkdir()
    palette = [v for i in range(256) for v in (i, 255 - i, (7 * i) % 256)]
    ids = []
    for i, (keys, hr, gt) in enumerate(samples):
        image_id = f"2007_{i:06d}"
        h, w = gt.shape
        save_irn_cam(cam_dir / f"{image_id}.npy", torch.as_tensor(keys), np.zeros((len(keys), -(-h // 4), -(-w // 4))), hr)
        img = Image.fromarray(gt, mode="P")
        img.putpalette(palette)
        img.save(gt_dir / f"{image_id}.png")
        ids.append(image_id)
    return cam_dir, gt_dir, ids


def test_file_sweep_reads_each_file_once(tmp_path, monkeypatch):
    samples = _constructed_samples()
    cam_dir, gt_dir, ids = _write_dataset(tmp_path, samples)
    reads: list[str] = []
    real_cam, real_png = m.load_irn_cam, m.load_label_png
    monkeypatch.setattr(m, "load_irn_cam", lambda p: (reads.append(str(p)), real_cam(p))[1])
    monkeypatch.setattr(m, "load_label_png", lambda p: (reads.append(str(p)), real_png(p))[1])
    best, curve = m.sweep_thresholds(cam_dir, gt_dir, ids, [0.2, 0.3, 0.5, 0.7], progress=False)
    assert best == 0.5
    assert sorted(reads) == sorted({*reads}) and len(reads) == 2 * len(ids)
    assert curve == m.sweep_from_arrays(samples, [0.2, 0.3, 0.5, 0.7])[1]

    reads.clear()
    res = m.evaluate_seeds(cam_dir, gt_dir, ids, 0.5, progress=False)
    assert len(reads) == 2 * len(ids)
    assert res["miou"] == pytest.approx(1.0)
    assert res["confusion"].shape == (21, 21)
    assert res["confusion"].sum() == 2 * 79  # the 255 pixels are ignored


def test_file_evaluation_errors(tmp_path):
    cam_dir, gt_dir, ids = _write_dataset(tmp_path, _constructed_samples())
    with pytest.raises(FileNotFoundError, match="2007_999999.npy"):
        m.evaluate_seeds(cam_dir, gt_dir, ["2007_999999"], 0.5, progress=False)
    with pytest.raises(FileNotFoundError, match="gt_dir"):
        m.evaluate_seeds(cam_dir, tmp_path / "nope", ids, 0.5, progress=False)
    with pytest.raises(TypeError, match="read_id_list"):
        m.evaluate_seeds(cam_dir, gt_dir, "train.txt", 0.5, progress=False)


# --------------------------------------------------------------------------- paired bootstrap


def _two_methods(seed, n, num_images, size, flip_a, flip_b):
    """Per-image confusion matrices ``[N, n, n]`` of two methods on random ground truths.

    Each method is the ground truth with a share (``flip_a``, ``flip_b``) of its pixels relabelled
    at random: the smaller the share, the better the method.
    """
    rng = np.random.default_rng(seed)
    gts = [rng.integers(0, n, size=(size, size)) for _ in range(num_images)]

    def method(flip_share):
        confs = []
        for g in gts:
            p = g.copy()
            flip = rng.random(g.shape) < flip_share
            p[flip] = rng.integers(0, n, size=int(flip.sum()))
            confs.append(m.confusion_matrix([p], [g], num_classes=n))
        return np.stack(confs)

    return method(flip_a), method(flip_b)


def test_bootstrap_difference_matches_the_scores_of_all_images_and_orders_its_interval():
    worse, better = _two_methods(3, n=4, num_images=30, size=12, flip_a=0.6, flip_b=0.2)
    out = m.bootstrap_difference(worse, better, num_samples=400, seed=1)
    full_worse, full_better = m.scores_from_confusion(worse.sum(0)), m.scores_from_confusion(better.sum(0))
    for key in ("miou", "mean_precision", "mean_recall"):
        assert out[key]["difference"] == pytest.approx(full_better[key] - full_worse[key])
        assert 0 < out[key]["low"] <= out[key]["difference"] <= out[key]["high"]
    # Swapping the methods mirrors the interval.
    swapped = m.bootstrap_difference(better, worse, num_samples=400, seed=1)
    assert swapped["miou"]["low"] == pytest.approx(-out["miou"]["high"])
    # Seeded: the same call gives the same interval, another seed another one.
    assert m.bootstrap_difference(worse, better, num_samples=400, seed=1) == out
    assert m.bootstrap_difference(worse, better, num_samples=400, seed=2)["miou"]["low"] != out["miou"]["low"]


def test_bootstrap_interval_is_zero_for_identical_methods_and_narrows_with_more_images():
    a, b = _two_methods(5, n=3, num_images=200, size=8, flip_a=0.5, flip_b=0.4)
    same = m.bootstrap_difference(a, a, num_samples=50)
    assert all(v == {"difference": 0.0, "low": 0.0, "high": 0.0} for v in same.values())
    few = m.bootstrap_difference(a[:20], b[:20], num_samples=500)["miou"]
    many = m.bootstrap_difference(a, b, num_samples=500)["miou"]
    assert many["high"] - many["low"] < few["high"] - few["low"]


def test_bootstrap_difference_rejects_bad_input():
    a = np.zeros((5, 3, 3))
    with pytest.raises(ValueError, match="confs_b"):
        m.bootstrap_difference(a, np.zeros((4, 3, 3)))
    with pytest.raises(ValueError, match="confs_a"):
        m.bootstrap_difference(np.zeros((3, 3)), np.zeros((3, 3)))
    with pytest.raises(ValueError, match="num_samples"):
        m.bootstrap_difference(a, a, num_samples=0)
    with pytest.raises(ValueError, match="level"):
        m.bootstrap_difference(a, a, level=1.0)

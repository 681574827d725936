"""Prototype building: the split, the selection, the streaming builder, its memory budget, sampling."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch
from reference import reference_select, reference_split

from lpcam_core.clustering import kmeans
from lpcam_core.config import LPCAMConfig
from lpcam_core.prototypes import PrototypeBuilder, sample_images_per_class, select_prototypes, split_by_cam

TAU = 0.1
LOGGER = "lpcam_core.prototypes"


def keep_all_config(**overrides) -> LPCAMConfig:
    """Every centre passes the selection (0 < p < 1 always), so bank rows are the raw K-means centres."""
    base = dict(num_clusters=3, fg_threshold=TAU, class_threshold=0.0, context_low=0.0, context_high=1.0, seed=5)
    return LPCAMConfig(**{**base, **overrides})


def random_image(g: torch.Generator, num_classes: int, c: int = 8, hw=(6, 5), cam_hw=(23, 19), tau_fraction=0.2):
    """(features [c, h, w], cams float32 numpy [n, H, W], keys [n]) with some CAM values exactly tau."""
    n = 1 + int(torch.randint(2, (1,), generator=g))
    keys = torch.randperm(num_classes, generator=g)[:n]
    feats = torch.rand(c, *hw, generator=g)
    cams = torch.rand(n, *cam_hw, generator=g) ** 2
    cams[torch.rand(n, *cam_hw, generator=g) < tau_fraction] = TAU  # float32(0.1) exactly
    return feats, cams.numpy(), keys


# ----------------------------------------------------------------------------- split


def test_float32_tau_is_not_above_tau_in_float64():
    # What makes the next test discriminating: float32(0.1) is > 0.1 in float64 maths.
    assert float(np.float32(TAU)) > TAU


def test_split_equals_reference_and_tau_goes_nowhere():
    g = torch.Generator().manual_seed(0)
    for _ in range(5):
        feats, cams, keys = random_image(g, 4)
        resized = torch.nn.functional.interpolate(torch.from_numpy(cams)[None], feats.shape[1:])[0]
        for i, key in enumerate(keys.tolist()):
            fg, bg = split_by_cam(feats, torch.from_numpy(cams[i]), TAU)
            ref_fg, ref_bg = reference_split(feats, cams, keys.tolist(), key, TAU)
            assert torch.equal(fg, ref_fg) and torch.equal(bg, ref_bg)
            at_tau = int((resized[i] == np.float32(TAU)).sum())
            assert at_tau > 0  # the case is exercised
            assert fg.shape[0] + bg.shape[0] + at_tau == feats.shape[1] * feats.shape[2]


def test_builder_pools_hold_exactly_the_reference_split():
    g = torch.Generator().manual_seed(1)
    builder = PrototypeBuilder(4, keep_all_config())
    expected = {}
    for _ in range(6):
        feats, cams, keys = random_image(g, 4)
        builder.add(feats, cams, keys)
        for key in keys.tolist():
            ref_fg, ref_bg = reference_split(feats, cams, keys.tolist(), key, TAU)
            expected.setdefault(("class", key), []).append(ref_fg)
            expected.setdefault(("context", key), []).append(ref_bg)
    assert set(builder.pools) == set(expected)
    for name, parts in expected.items():
        assert torch.equal(builder.pools[name].rows(), torch.cat(parts)), name
        assert builder.pools[name].seen == sum(p.shape[0] for p in parts)
    assert builder.images_seen == 6


# ----------------------------------------------------------------------------- selection


def _softmax_np(logits: np.ndarray) -> np.ndarray:
    z = np.exp(logits - logits.max(axis=1, keepdims=True))
    return z / z.sum(axis=1, keepdims=True)


def test_select_prototypes_matches_hand_softmax():
    g = torch.Generator().manual_seed(2)
    centers = torch.randn(10, 6, generator=g) * 2
    weight = torch.randn(4, 6, generator=g)
    bias = torch.randn(4, generator=g)
    p = _softmax_np(centers.double().numpy() @ weight.double().numpy().T + bias.double().numpy())
    for cls in range(4):
        v = np.sort(p[:, cls])
        low, high = (v[2] + v[3]) / 2, (v[7] + v[8]) / 2  # thresholds between centres, not on one
        got = select_prototypes(centers, weight, cls, low=low, high=high, bias=bias)
        assert got.dtype == torch.bool and got.shape == (10,)
        assert got.tolist() == ((p[:, cls] > low) & (p[:, cls] < high)).tolist()
        assert int(got.sum()) == 5
        got = select_prototypes(centers, weight, cls, low=low, bias=bias)  # no upper bound
        assert got.tolist() == (p[:, cls] > low).tolist()


def test_select_prototypes_equals_release_selection_and_is_strict():
    g = torch.Generator().manual_seed(3)
    centers = torch.randn(12, 5, generator=g) * 3
    weight = torch.randn(3, 5, generator=g)
    for cls in range(3):
        ref_class, ref_ctx = reference_select(centers, weight, cls, 0.5, 0.6, 0.05)
        assert torch.equal(select_prototypes(centers, weight, cls, low=0.5), ref_class)
        assert torch.equal(select_prototypes(centers, weight, cls, low=0.05, high=0.6), ref_ctx)
    # Strict bounds: a probability equal to a bound is excluded (release: p > mu_f, low < p < mu_b).
    p = torch.softmax(centers @ weight.T, dim=1)[:, 0]
    assert not select_prototypes(centers, weight, 0, low=float(p[4]))[4]
    assert not select_prototypes(centers, weight, 0, low=-1.0, high=float(p[4]))[4]
    # A 1x1 conv classifier weight is accepted.
    assert torch.equal(
        select_prototypes(centers, weight[:, :, None, None], 1, low=0.3), select_prototypes(centers, weight, 1, low=0.3)
    )


def test_select_prototypes_bad_input():
    with pytest.raises(ValueError, match="centers"):
        select_prototypes(torch.randn(4, 3), torch.randn(2, 5), 0, low=0.5)
    with pytest.raises(ValueError, match="class_index"):
        select_prototypes(torch.randn(4, 5), torch.randn(2, 5), 2, low=0.5)
    with pytest.raises(ValueError, match="classifier_weight"):
        select_prototypes(torch.randn(4, 5), torch.randn(2, 5, 3), 0, low=0.5)


# ----------------------------------------------------------------------------- building


def structured_stream(num_images=12, num_classes=3, c=16, seed=0):
    """Images whose CAM-high positions carry their class's direction: a classifier made of those directions
    scores class centres high, so the paper's thresholds select real prototypes."""
    g = torch.Generator().manual_seed(seed)
    dirs = torch.nn.functional.normalize(torch.rand(num_classes + 1, c, generator=g) ** 3, dim=1)
    images = []
    for _ in range(num_images):
        feats, cams, keys = random_image(g, num_classes, c=c, hw=(6, 6), cam_hw=(24, 24), tau_fraction=0.0)
        small = torch.nn.functional.interpolate(torch.from_numpy(cams)[None], (6, 6))[0]
        base = dirs[num_classes][:, None, None] * 0.5 + 0.3 * feats
        for i, key in enumerate(keys.tolist()):
            base = base + dirs[key][:, None, None] * (small[i] > TAU) * 2.0
        images.append((base, cams, keys))
    weight = 12.0 * dirs[:num_classes]
    return images, weight


def test_build_with_everything_fitting_equals_kmeans_on_all_features():
    images, weight = structured_stream()
    config = LPCAMConfig(num_clusters=4, fg_threshold=TAU, class_threshold=0.9, context_low=0.05, context_high=0.9, seed=7)
    builder = PrototypeBuilder(3, config)
    fg_rows, bg_rows = {}, {}
    for feats, cams, keys in images:
        builder.add(feats, cams, keys)
        for key in keys.tolist():
            a, b = reference_split(feats, cams, keys.tolist(), key, TAU)
            fg_rows.setdefault(key, []).append(a)
            bg_rows.setdefault(key, []).append(b)
    bank = builder.build(weight, progress=False)
    kept_any_context = False
    for key in range(3):
        kw = dict(seed=7, n_init=config.kmeans_n_init, max_iter=config.kmeans_max_iter, tol=config.kmeans_tol)
        centers = kmeans(torch.cat(fg_rows[key]), 4, **kw).centers
        ctx_centers = kmeans(torch.cat(bg_rows[key]), 4, **kw).centers
        class_mask, _ = reference_select(centers, weight, key, 0.9, 0.9, 0.05)
        _, ctx_mask = reference_select(ctx_centers, weight, key, 0.9, 0.9, 0.05)
        assert class_mask.any()
        assert torch.equal(bank.foreground[key], centers[class_mask])
        assert torch.equal(bank.context[key], ctx_centers[ctx_mask])
        kept_any_context |= bool(ctx_mask.any())
        assert bank.meta["features_seen"][f"class/{key}"] == sum(r.shape[0] for r in fg_rows[key])
    assert kept_any_context
    assert bank.meta["num_classes"] == 3 and bank.meta["feature_dim"] == 16
    assert bank.meta["config"]["num_clusters"] == 4


def _stream_into(builder, images, check_budget=None):
    for feats, cams, keys in images:
        builder.add(feats, cams, keys)
        if check_budget is not None:
            assert builder.bytes_held <= check_budget
            assert builder.bytes_held == sum(p.held for p in builder.pools.values()) * 8 * 4


def test_memory_budget_respected_and_deterministic():
    g = torch.Generator().manual_seed(4)
    images = [random_image(g, 3) for _ in range(40)]
    offered = 0
    for feats, cams, keys in images:
        for key in keys.tolist():
            offered += sum(r.shape[0] for r in reference_split(feats, cams, keys.tolist(), key, TAU))
    budget = 150 * 8 * 4  # 150 rows of 8 float32 channels
    a = PrototypeBuilder(3, keep_all_config(memory_budget_bytes=budget))
    _stream_into(a, images, check_budget=budget)
    assert a.bytes_held > budget // 2  # the budget is used, not just respected
    assert sum(p.seen for p in a.pools.values()) == offered > 4 * 150
    b = PrototypeBuilder(3, keep_all_config(memory_budget_bytes=budget))
    _stream_into(b, images)
    c = PrototypeBuilder(3, keep_all_config(memory_budget_bytes=budget, seed=6))
    _stream_into(c, images)
    differs = False
    for name in a.pools:
        assert torch.equal(a.pools[name].rows(), b.pools[name].rows())
        differs |= not torch.equal(a.pools[name].rows(), c.pools[name].rows())
    assert differs
    bank_a, bank_b = a.build(torch.randn(3, 8), progress=False), b.build(torch.randn(3, 8), progress=False)
    for key in bank_a.classes:
        assert torch.equal(bank_a.foreground[key], bank_b.foreground[key])
    # the bank records what was offered and what was clustered
    assert sum(bank_a.meta["features_seen"].values()) == sum(p.seen for p in a.pools.values())
    assert sum(bank_a.meta["features_clustered"].values()) * 32 <= budget


def test_reservoir_is_a_uniform_sample_of_the_stream():
    """Rows tagged with their stream position: the kept sample must span the whole stream uniformly."""
    builder = PrototypeBuilder(1, keep_all_config(memory_budget_bytes=1000 * 2 * 4))
    per_image, images = 100, 200
    for i in range(images):
        index = torch.arange(i * per_image, (i + 1) * per_image, dtype=torch.float32).reshape(10, 10)
        feats = torch.stack([index, torch.ones(10, 10)])
        builder.add(feats, np.ones((1, 10, 10), np.float32), [0])
    rows = builder.pools[("class", 0)].rows()
    kept = rows.shape[0]
    assert 800 <= kept == builder.budget_rows <= 1000  # the one pool holds what the budget allows
    assert builder.pools[("class", 0)].seen == per_image * images
    tags = rows[:, 0].numpy().astype(np.int64)
    assert len(np.unique(tags)) == kept  # sampled without replacement
    n = per_image * images
    mean_sd = n / np.sqrt(12 * kept)  # sd of the mean of a uniform sample from 0..n-1
    assert abs(tags.mean() - (n - 1) / 2) < 4 * mean_sd
    # every tenth of the stream is represented in about its share (~90 expected, sd ~9)
    counts = np.bincount(tags * 10 // n, minlength=10)
    assert counts.min() > 0.6 * kept / 10 and counts.max() < 1.4 * kept / 10, counts


def test_pool_smaller_than_k_warns_and_clusters_it_whole(caplog):
    builder = PrototypeBuilder(2, keep_all_config(num_clusters=12))
    feats = torch.rand(8, 3, 3, generator=torch.Generator().manual_seed(0))
    cam = np.zeros((1, 3, 3), np.float32)
    cam[0, 0, :] = 1.0
    cam[0, 1, 0] = 0.9  # 4 positions above tau
    builder.add(feats, cam, [1])
    caplog.set_level(logging.WARNING, logger=LOGGER)
    bank = builder.build(torch.randn(2, 8), progress=False)
    assert "class pool of class 1 holds 4 features, fewer than K=12" in caplog.text
    assert "context pool of class 1 holds 5 features" in caplog.text
    rows = feats.permute(1, 2, 0)[torch.from_numpy(cam[0] > TAU)]
    # with K = pool size every row is its own cluster: the centres are the rows
    got = sorted(map(tuple, bank.foreground[1].tolist()))
    assert got == sorted(map(tuple, rows.tolist()))
    assert bank.context[1].shape == (5, 8)


def test_class_never_appearing_and_empty_mask_warn(caplog):
    builder = PrototypeBuilder(4, keep_all_config())
    g = torch.Generator().manual_seed(1)
    builder.add(torch.rand(8, 4, 4, generator=g), np.full((1, 8, 8), 0.9, np.float32), [0])
    builder.add(torch.rand(8, 4, 4, generator=g), np.zeros((1, 8, 8), np.float32), [2])  # empty mask
    caplog.set_level(logging.WARNING, logger=LOGGER)
    bank = builder.build(torch.randn(4, 8), progress=False)
    assert "classes [1, 3] never appeared" in caplog.text
    assert "class 2: no feature above tau" in caplog.text
    assert bank.classes == [0]


def test_fallback_best_center(caplog):
    images, weight = structured_stream(seed=3)
    weak = weight / 100.0  # every probability near 1/3: no centre passes mu_f = 0.9
    config = LPCAMConfig(num_clusters=4, fg_threshold=TAU, class_threshold=0.9, seed=1)
    builder = PrototypeBuilder(3, config)
    for feats, cams, keys in images:
        builder.add(feats, cams, keys)
    caplog.set_level(logging.WARNING, logger=LOGGER)
    bank = builder.build(weak, progress=False)
    assert "no centre scores above mu_f" in caplog.text
    for key in range(3):
        centers = kmeans(builder.pools[("class", key)].rows(), 4, seed=1).centers
        p = _softmax_np(centers.double().numpy() @ weak.double().numpy().T)[:, key]
        assert p.max() < 0.9
        assert torch.equal(bank.foreground[key], centers[[int(p.argmax())]])

    strict = PrototypeBuilder(3, config.replace(fallback_best_center=False))
    for feats, cams, keys in images:
        strict.add(feats, cams, keys)
    with pytest.raises(ValueError, match=r"class 0: no centre scores above class_threshold=0.9"):
        strict.build(weak, progress=False)


def test_build_bad_input():
    builder = PrototypeBuilder(3, keep_all_config())
    with pytest.raises(ValueError, match="no image was added"):
        builder.build(torch.randn(3, 8), progress=False)
    builder.add(torch.rand(8, 3, 3), np.ones((1, 3, 3), np.float32), [0])
    with pytest.raises(ValueError, match="the classifier scores 4 classes"):
        builder.build(torch.randn(4, 8), progress=False)
    with pytest.raises(ValueError, match="the classifier takes 7 input channels"):
        builder.build(torch.randn(3, 7), progress=False)


# ----------------------------------------------------------------------------- COCO sampling


def test_sample_images_per_class_reproduces_release_draw():
    rng = np.random.default_rng(0)
    num_classes = 6
    ids = [f"img{i:03d}" for i in range(50)]
    labels = {i: sorted(set(rng.integers(0, num_classes, size=rng.integers(1, 4)).tolist())) for i in ids}
    for c in range(num_classes):  # every class present, as in the release's COCO list
        labels[ids[c]] = sorted(set(labels[ids[c]]) | {c})
    matrix = np.zeros((len(ids), num_classes))
    for row, image in enumerate(ids):
        matrix[row, labels[image]] = 1

    saved = np.random.get_state()
    try:  # the release: np.random.seed(666); per class np.random.choice(np.nonzero(labels[:, c])[0], 100)
        np.random.seed(666)
        literal = [np.random.choice(np.nonzero(matrix[:, c])[0], 100) for c in range(num_classes)]
    finally:
        np.random.set_state(saved)
    before = np.random.get_state()
    picks = sample_images_per_class(labels, 100, 666, num_classes)
    assert np.array_equal(np.random.get_state()[1], before[1])  # the global RNG is not used
    expected = [(c, ids[int(i)]) for c in range(num_classes) for i in literal[c]]
    assert picks == expected


def test_sample_images_per_class_skips_empty_class(caplog):
    caplog.set_level(logging.WARNING, logger=LOGGER)
    picks = sample_images_per_class({"a": [0], "b": [0, 2]}, 3, 666, 3)
    assert "class 1 has no image" in caplog.text
    assert {c for c, _ in picks} == {0, 2} and len(picks) == 6
    with pytest.raises(ValueError, match="images_per_class"):
        sample_images_per_class({"a": [0]}, 0, 666, 1)


# ----------------------------------------------------------------------------- bad input of add


@pytest.fixture
def builder():
    return PrototypeBuilder(3, keep_all_config())


def test_add_wrong_ndim(builder):
    with pytest.raises(ValueError, match=r"features must be \[C, h, w\]"):
        builder.add(torch.rand(1, 8, 3, 3), np.ones((1, 3, 3), np.float32), [0])
    with pytest.raises(ValueError, match=r"cams must be \[n, H, W\]"):
        builder.add(torch.rand(8, 3, 3), np.ones((3, 3), np.float32), [0])
    with pytest.raises(TypeError, match="features"):
        builder.add(np.ones((8, 3, 3), np.float32), np.ones((1, 3, 3), np.float32), [0])


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_add_non_finite(builder, bad):
    feats = torch.rand(8, 3, 3)
    feats[2, 1, 1] = bad
    with pytest.raises(ValueError, match="features hold NaN or inf"):
        builder.add(feats, np.ones((1, 3, 3), np.float32), [0])
    cams = np.ones((1, 3, 3), np.float32)
    cams[0, 0, 0] = bad
    with pytest.raises(ValueError, match="cams hold NaN or inf"):
        builder.add(torch.rand(8, 3, 3), cams, [0])
    assert builder.images_seen == 0 and not builder.pools


def test_add_refuses_float64_features_beyond_float32_and_reads_channels_last(builder):
    """The pools keep float64 features as float32: a value beyond its range would become inf there and poison
    K-means, so it is refused at the door; channels-last features are checked like contiguous ones."""
    feats = torch.rand(8, 3, 3, dtype=torch.float64)
    feats[1, 0, 2] = 1e300
    with pytest.raises(ValueError, match="beyond float32's range"):
        builder.add(feats, np.ones((1, 3, 3), np.float32), [0])
    strided = torch.rand(1, 8, 3, 3).contiguous(memory_format=torch.channels_last)[0]
    strided[5, 2, 1] = float("nan")
    assert not strided.is_contiguous()
    with pytest.raises(ValueError, match="features hold NaN or inf"):
        builder.add(strided, np.ones((1, 3, 3), np.float32), [0])
    assert builder.images_seen == 0 and not builder.pools
    builder.add(torch.rand(8, 3, 3, dtype=torch.float64) * 1e30, np.ones((1, 3, 3), np.float32), [0])
    assert builder.images_seen == 1


def test_add_keys_mismatch_and_range(builder):
    with pytest.raises(ValueError, match="2 keys for 1 CAM maps"):
        builder.add(torch.rand(8, 3, 3), np.ones((1, 3, 3), np.float32), [0, 1])
    with pytest.raises(ValueError, match=r"keys \[3\] outside 0..2"):
        builder.add(torch.rand(8, 3, 3), np.ones((1, 3, 3), np.float32), [3])
    with pytest.raises(ValueError, match="keys"):
        builder.add(torch.rand(8, 3, 3), np.ones((1, 3, 3), np.float32), [-1])


@pytest.mark.parametrize("keys", [[0.0], torch.tensor([1.0]), np.array([2.0]), [True]])
def test_add_float_keys(builder, keys):
    with pytest.raises(TypeError, match="keys must be integer class indices"):
        builder.add(torch.rand(8, 3, 3), np.ones((1, 3, 3), np.float32), keys)


def test_add_channel_change(builder):
    builder.add(torch.rand(8, 3, 3), np.ones((1, 3, 3), np.float32), [0])
    with pytest.raises(ValueError, match="features have 6 channels, earlier images had 8"):
        builder.add(torch.rand(6, 3, 3), np.ones((1, 3, 3), np.float32), [0])


def test_add_integer_cams_rejected(builder):
    with pytest.raises(TypeError, match="cams must be floating point"):
        builder.add(torch.rand(8, 3, 3), np.ones((1, 3, 3), np.uint8), [0])

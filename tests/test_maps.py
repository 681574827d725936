"""lpcam_map / lpcam_multiscale against the slow literal reference (tests/reference.py)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from reference import reference_lpcam

from lpcam_core.bank import PrototypeBank
from lpcam_core.maps import lpcam_map, lpcam_multiscale, normalise_by_max

# (image size, per-scale feature grids for scales 1.0, 0.5, 1.5, 2.0): odd sizes included.
CASES = [
    ((37, 53), [(3, 4), (2, 2), (4, 6), (6, 8)]),
    ((64, 48), [(4, 3), (2, 2), (6, 5), (8, 6)]),
    ((17, 9), [(2, 1), (1, 1), (3, 2), (3, 2)]),
]
KEYSETS = [[0, 3, 2], [3], [2, 0]]


def _compare(ours: dict, ref: dict, atol: float = 1e-4) -> None:
    assert ours["keys"].tolist() == ref["keys"].tolist()
    assert ours["cam"].shape == ref["cam"].shape
    assert ours["high_res"].shape == tuple(ref["high_res"].shape)
    cam_err = (ours["cam"] - ref["cam"]).abs().max().item()
    high_err = np.abs(ours["high_res"] - ref["high_res"].numpy()).max()
    assert cam_err <= atol, f"cam differs from the reference by {cam_err}"
    assert high_err <= atol, f"high_res differs from the reference by {high_err}"


def _reference(bank: PrototypeBank, features, keys, size) -> dict:
    return reference_lpcam(features, bank.foreground, bank.context, keys, size)


@pytest.mark.parametrize("case", range(len(CASES)))
@pytest.mark.parametrize("keys", KEYSETS)
def test_multiscale_equals_reference(bank, features_factory, case, keys):
    size, grids = CASES[case]
    features = features_factory(bank, grids, seed=case)
    ref = _reference(bank, features, keys, size)
    assert torch.isfinite(ref["cam"]).all()  # the inputs avoid the release's 0/0 and negative maxima
    _compare(lpcam_multiscale(features, bank, keys, size), ref)


def test_multiscale_equals_reference_wide_bank(bank_factory, features_factory):
    """More classes and prototypes than the default fixture, keys as a tensor, 12 + 12 prototypes."""
    bank = bank_factory(num_classes=20, feature_dim=32, classes=(1, 4, 7, 19), no_context=(7,), num_fg=12, num_ctx=12, seed=3)
    features = features_factory(bank, [(5, 7), (3, 4), (8, 10), (10, 14)], seed=5)
    keys = torch.tensor([19, 7, 1])
    size = (75, 101)
    _compare(lpcam_multiscale(features, bank, keys, size), _reference(bank, features, keys.tolist(), size))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_inputs_computed_in_float32(bank, features_factory, dtype):
    size, grids = CASES[0]
    features = features_factory(bank, grids, seed=7, dtype=dtype)
    ours = lpcam_multiscale(features, bank, [0, 3, 2], size)
    assert ours["cam"].dtype == torch.float32 and ours["high_res"].dtype == np.float32
    # The reference converts the same low-precision values to float32 before any arithmetic.
    _compare(ours, _reference(bank, features, [0, 3, 2], size))


def test_autocast_bfloat16_region_keeps_float32(bank, features_factory):
    size, grids = CASES[1]
    features = features_factory(bank, grids, seed=11)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ours = lpcam_multiscale(features, bank, [2, 3], size)
        single = lpcam_map(features[0][0], bank, [2, 3])
    assert ours["cam"].dtype == torch.float32 and ours["high_res"].dtype == np.float32
    assert single.dtype == torch.float32
    _compare(ours, _reference(bank, features, [2, 3], size))


def test_lpcam_map_batch_and_single_agree(bank, features_factory):
    (pair,) = features_factory(bank, [(5, 6)], seed=2)
    batch = lpcam_map(pair, bank, [3, 0])
    assert batch.shape == (2, 2, 5, 6) and batch.dtype == torch.float32
    for b in range(2):
        single = lpcam_map(pair[b], bank, [3, 0])
        assert single.shape == (2, 5, 6)
        torch.testing.assert_close(single, batch[b], rtol=0, atol=1e-6)
    # A class alone gives the same map as inside a group (no cross-class leakage).
    torch.testing.assert_close(lpcam_map(pair[0], bank, [0])[0], batch[0, 1], rtol=0, atol=1e-6)


def test_lpcam_map_single_scale_matches_hand_formula(bank, features_factory):
    """The unresized map of one class: mean cos to class prototypes minus mean cos to context, ReLU."""
    (pair,) = features_factory(bank, [(4, 5)], seed=9)
    fused = pair[0]
    out = lpcam_map(fused, bank, [0, 3])
    rows = fused.flatten(1).T.double()
    rows = rows / rows.norm(dim=1, keepdim=True)

    def mean_cos(protos):
        p = protos.double()
        p = p / p.norm(dim=1, keepdim=True)
        return (rows @ p.T).mean(1).reshape(4, 5)

    expected0 = (mean_cos(bank.foreground[0]) - mean_cos(bank.context[0])).clamp_min(0)
    expected3 = mean_cos(bank.foreground[3])  # no context: neither subtraction nor ReLU
    torch.testing.assert_close(out[0].double(), expected0, rtol=0, atol=1e-6)
    torch.testing.assert_close(out[1].double(), expected3, rtol=0, atol=1e-6)


def test_irn_format(bank, features_factory):
    size, grids = (37, 53), CASES[0][1]
    out = lpcam_multiscale(features_factory(bank, grids), bank, np.array([2, 0]), size)
    assert set(out) == {"keys", "cam", "high_res"}
    assert isinstance(out["keys"], torch.Tensor) and out["keys"].dtype == torch.int64
    assert out["keys"].tolist() == [2, 0]
    assert isinstance(out["cam"], torch.Tensor) and out["cam"].dtype == torch.float32
    assert out["cam"].shape == (2, math.ceil(37 / 4), math.ceil(53 / 4))
    assert out["cam"].device.type == "cpu"
    assert isinstance(out["high_res"], np.ndarray) and out["high_res"].dtype == np.float32
    assert out["high_res"].shape == (2, 37, 53)
    # Max-normalised: every map peaks at exactly 1.
    assert np.allclose(out["high_res"].reshape(2, -1).max(1), 1.0, atol=1e-6)
    assert torch.allclose(out["cam"].flatten(1).max(1).values, torch.ones(2), atol=1e-6)


def test_single_tensor_counts_as_one_scale(bank, features_factory):
    (pair,) = features_factory(bank, [(4, 4)], seed=4)
    a = lpcam_multiscale(pair, bank, [0], (30, 31))
    b = lpcam_multiscale([pair], bank, [0], (30, 31))
    assert torch.equal(a["cam"], b["cam"]) and np.array_equal(a["high_res"], b["high_res"])


def test_no_present_class_gives_empty_record(bank, features_factory):
    out = lpcam_multiscale(features_factory(bank, [(3, 3)]), bank, [], (20, 30))
    assert out["keys"].shape == (0,) and out["keys"].dtype == torch.int64
    assert out["cam"].shape == (0, 5, 8) and out["high_res"].shape == (0, 20, 30)
    assert lpcam_map(torch.rand(16, 3, 4), bank, []).shape == (0, 3, 4)
    assert lpcam_map(torch.rand(2, 16, 3, 4), bank, torch.zeros(0, dtype=torch.long)).shape == (2, 0, 3, 4)


# ----------------------------------------------------------------------------- the max guard


def test_non_positive_max_guard_no_context_class():
    """Documented guard: a class with no context prototype whose map is negative everywhere.

    The release divides by the (negative) maximum, which flips the map into a positive one; we return
    zeros instead (no evidence for the class anywhere). Other classes are unaffected.
    """
    g = torch.Generator().manual_seed(0)
    fg = {0: -torch.rand(3, 8, generator=g), 1: torch.rand(2, 8, generator=g)}
    bank = PrototypeBank(fg, {0: torch.empty(0, 8), 1: torch.rand(2, 8, generator=g)}, {"num_classes": 2})
    feats = [torch.rand(2, 8, 3, 4, generator=g) + 0.1, torch.rand(2, 8, 2, 2, generator=g) + 0.1]
    ref = reference_lpcam(feats, bank.foreground, bank.context, [0, 1], (24, 30))
    assert ref["cam"][0].max() > 0  # the release's flipped map
    ours = lpcam_multiscale(feats, bank, [0, 1], (24, 30))
    assert torch.count_nonzero(ours["cam"][0]) == 0 and np.count_nonzero(ours["high_res"][0]) == 0
    assert (ours["cam"][1] - ref["cam"][1]).abs().max() <= 1e-4
    assert np.abs(ours["high_res"][1] - ref["high_res"][1].numpy()).max() <= 1e-4


def test_non_positive_max_guard_all_zero_map():
    """A class with context whose ReLU map is zero everywhere: the release gives NaN (0/0), we give zeros."""
    p = torch.rand(2, 8, generator=torch.Generator().manual_seed(1))
    fg = torch.stack([p[0], p[0] * 3.0])
    ctx = torch.stack([p[1], p[1] * 0.5])
    feats = [(p[1] * 2.0)[None, :, None, None].repeat(2, 1, 3, 5)]  # every position lies on the context direction
    bank = PrototypeBank({0: fg}, {0: ctx}, {"num_classes": 1})
    ref = reference_lpcam(feats, bank.foreground, bank.context, [0], (20, 40))
    assert torch.isnan(ref["cam"]).all()
    ours = lpcam_multiscale(feats, bank, [0], (20, 40))
    assert torch.count_nonzero(ours["cam"]) == 0 and np.count_nonzero(ours["high_res"]) == 0
    assert np.isfinite(ours["high_res"]).all()


def test_normalise_by_max_eps():
    maps = torch.tensor([[[0.5, 2.0]], [[-1.0, -0.5]]])
    torch.testing.assert_close(normalise_by_max(maps), torch.tensor([[[0.25, 1.0]], [[0.0, 0.0]]]))
    torch.testing.assert_close(normalise_by_max(maps, eps=1e-5)[0], maps[0] / (2.0 + 1e-5))


# ----------------------------------------------------------------------------- bad input


@pytest.fixture
def pair(bank, features_factory):
    return features_factory(bank, [(3, 4)])[0]


def test_lpcam_map_wrong_ndim(bank, pair):
    with pytest.raises(ValueError, match="fused"):
        lpcam_map(pair[0, :, 0], bank, [0])
    with pytest.raises(ValueError, match="fused"):
        lpcam_map(pair[None], bank, [0])


def test_lpcam_map_wrong_channels(bank, pair):
    with pytest.raises(ValueError, match=r"fused.*channels"):
        lpcam_map(pair[0, :10], bank, [0])


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_features(bank, pair, bad, channels_last):
    if channels_last:  # the check reduces such views in memory order
        pair = pair.contiguous(memory_format=torch.channels_last)
    broken = pair.clone()
    broken[1, 3, 2, 1] = bad
    assert broken.is_contiguous(memory_format=torch.channels_last) == channels_last
    with pytest.raises(ValueError, match=r"fused.*NaN or inf"):
        lpcam_map(broken[1], bank, [0])
    with pytest.raises(ValueError, match=r"features\[1\].*NaN or inf"):
        lpcam_multiscale([pair, broken], bank, [0], (40, 50))


def test_integer_features_rejected(bank, pair):
    with pytest.raises(TypeError, match="fused"):
        lpcam_map(pair[0].long(), bank, [0])


def test_unknown_class(bank, pair):
    with pytest.raises(ValueError, match=r"classes.*\[1\]"):
        lpcam_map(pair[0], bank, [0, 1])
    with pytest.raises(ValueError, match=r"keys.*\[7\]"):
        lpcam_multiscale([pair], bank, [7], (40, 50))


@pytest.mark.parametrize("keys", [[0.0, 2.0], torch.tensor([0.0]), np.array([2.0]), [True]])
def test_float_or_bool_keys(bank, pair, keys):
    with pytest.raises(TypeError, match="keys"):
        lpcam_multiscale([pair], bank, keys, (40, 50))
    with pytest.raises(TypeError, match="classes"):
        lpcam_map(pair[0], bank, keys)


def test_one_view_features(bank, pair):
    with pytest.raises(ValueError, match=r"features\[0\].*2 views"):
        lpcam_multiscale([pair[:1]], bank, [0], (40, 50))


def test_multiscale_wrong_ndim_and_channels(bank, pair):
    with pytest.raises(ValueError, match=r"features\[0\]"):
        lpcam_multiscale([pair[0]], bank, [0], (40, 50))
    with pytest.raises(ValueError, match=r"features\[1\].*channels"):
        lpcam_multiscale([pair, pair[:, :5]], bank, [0], (40, 50))
    with pytest.raises(TypeError, match="features"):
        lpcam_multiscale([], bank, [0], (40, 50))


@pytest.mark.parametrize("size", [(0, 5), (5,), "big", None])
def test_bad_image_size(bank, pair, size):
    with pytest.raises((TypeError, ValueError), match="image_size"):
        lpcam_multiscale([pair], bank, [0], size)


def test_views_summing_to_inf(bank, pair):
    """Each view finite, their float32 sum not: caught before any similarity (no silently wrong map)."""
    huge = torch.full_like(pair, 3e38)
    with pytest.raises(ValueError, match=r"features\[0\].*sum to inf"):
        lpcam_multiscale([huge], bank, [0], (40, 50))


def _cancelling(seed: int, spread: float, channels: int = 2048):
    """A bank and 4 scales of features around one shared direction: every class and context similarity is
    about equal, so the un-normalised maps are 2e-4 to 3e-3 (VOC: 6e-3 to 2e-2), the hard case for rounding."""
    g = torch.Generator().manual_seed(seed)
    shared = torch.rand(channels, generator=g)
    fg = {c: shared + spread * torch.rand(12, channels, generator=g) for c in range(3)}
    ctx = {c: shared + spread * torch.rand(12, channels, generator=g) for c in range(3)}
    bank = PrototypeBank(fg, ctx, {"num_classes": 20})
    feats = []
    for h, w in ((12, 16), (6, 8), (18, 24), (24, 32)):
        f = shared[:, None, None] + spread * torch.rand(channels, h, w, generator=g)
        feats.append(torch.stack([f, f.flip(-1) + 0.1 * spread * torch.rand(channels, h, w, generator=g)]))
    return bank, feats


def _float64_maps(feats, bank, keys, size):
    """The maps computed from scratch in float64: every cosine similarity, the means, ReLU, resize, max."""
    per_scale = []
    for pair in feats:
        fused = pair[0].double() + pair[1].double().flip(-1)
        c, h, w = fused.shape
        unit_f = fused.reshape(c, -1) / fused.reshape(c, -1).norm(dim=0).clamp_min(1e-8)
        rows = []
        for k in keys:
            p = torch.nn.functional.normalize(bank.foreground[k].double(), dim=1)
            b = torch.nn.functional.normalize(bank.context[k].double(), dim=1)
            rows.append(((p @ unit_f).mean(0) - (b @ unit_f).mean(0)).clamp_min(0).reshape(h, w))
        per_scale.append(torch.stack(rows)[:, None])
    height, width = size
    up = (-(-height // 16) * 16, -(-width // 16) * 16)
    high = torch.stack([torch.nn.functional.interpolate(m, up, mode="bilinear", align_corners=False)[:, 0, :height, :width]
                        for m in per_scale]).mean(0)
    return (high / high.flatten(1).max(1).values[:, None, None]).numpy()


@pytest.mark.parametrize("spread", [0.3, 1.0])
def test_maps_are_within_1e5_of_float64_when_class_and_context_nearly_cancel(spread):
    for seed in range(2):
        bank, feats = _cancelling(seed, spread)
        raw = lpcam_map(feats[0][0] + feats[0][1].flip(-1), bank, [0, 1, 2]).flatten(1).max(1).values
        assert float(raw.max()) < 4e-3  # the cancellation is real: maps two orders below the similarities
        got = lpcam_multiscale(feats, bank, [0, 1, 2], (190, 250))["high_res"]
        assert np.abs(got - _float64_maps(feats, bank, [0, 1, 2], (190, 250))).max() <= 1e-5


def test_lpcam_map_missing_classes_zeros_or_error(caplog):
    """``missing="zeros"``: a class without prototypes gets a zero map in its place (warned once), the others are
    the maps of the plain call; the default still refuses it."""
    import lpcam_core.maps as maps_module

    g = torch.Generator().manual_seed(3)
    bank = PrototypeBank({0: torch.rand(3, 8, generator=g), 2: torch.rand(2, 8, generator=g)},
                         {0: torch.rand(2, 8, generator=g), 2: torch.rand(2, 8, generator=g)}, {"num_classes": 4})
    x = torch.rand(2, 8, 5, 6, generator=g)
    plain = lpcam_map(x, bank, [0, 2])
    maps_module._warned_missing.discard(3)
    with caplog.at_level("WARNING", logger="lpcam_core.maps"):
        got = lpcam_map(x, bank, [3, 0, 2], missing="zeros")
        again = lpcam_map(x[0], bank, [2, 3], missing="zeros")
    assert got.shape == (2, 3, 5, 6) and not got[:, 0].any()
    assert torch.equal(got[:, 1:], plain) and not again[1].any()
    assert torch.equal(again[0], lpcam_map(x[0], bank, [2])[0])  # same shapes, same arithmetic
    assert len([r for r in caplog.records if "[3]" in r.getMessage()]) == 1
    with pytest.raises(ValueError, match="no prototype"):
        lpcam_map(x, bank, [3])
    with pytest.raises(ValueError, match="missing='skip'"):
        lpcam_map(x, bank, [0], missing="skip")

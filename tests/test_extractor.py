"""LPCAM extractor on torchvision models (random init, nothing downloaded)."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torchvision

from lpcam_core import LPCAM, LPCAMConfig, PrototypeBuilder, lpcam_multiscale
from lpcam_core.classifier import equivalent_linear
from lpcam_core.extractor import find_module
from lpcam_core.maps import cam_multiscale

CFG = LPCAMConfig.preset("voc", num_clusters=3, class_threshold=0.0, context_low=0.0, context_high=1.0)


def _data(num_classes: int, size: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(6, 3, size, size, generator=g)
    labels = torch.zeros(6, num_classes)
    for i in range(6):
        labels[i, i % num_classes] = 1
        labels[i, (i * 2 + 1) % num_classes] = 1
    return images, labels


def _resnet(num_classes: int = 4) -> nn.Module:
    torch.manual_seed(0)
    return torchvision.models.resnet18(weights=None, num_classes=num_classes)


def _vit(num_classes: int = 4) -> nn.Module:
    torch.manual_seed(0)
    return torchvision.models.VisionTransformer(
        image_size=32, patch_size=8, num_layers=2, num_heads=2, hidden_dim=16, mlp_dim=32, num_classes=num_classes
    )


def _views_by_hand(model: nn.Module, image: torch.Tensor, scales) -> list[torch.Tensor]:
    """Features [2, C, h, w] of (image [1, 3, H, W], flip) at each scale from the truncated resnet, in eval mode."""
    model.eval()
    trunk = nn.Sequential(*list(model.children())[:-2])
    views = []
    for s in scales:
        x = image if s == 1.0 else torch.nn.functional.interpolate(image, scale_factor=s, mode="bilinear",
                                                                   align_corners=False)
        with torch.no_grad():
            views.append(trunk(torch.cat([x, x.flip(-1)])))
    return views


def _flags(model: nn.Module) -> list[bool]:
    return [m.training for m in model.modules()]


def test_resnet18_maps_shape_hooks_removed_and_training_restored():
    model = _resnet()
    model.train()
    model.layer2.eval()  # a mixed state must come back exactly
    before = _flags(model)
    images, labels = _data(4, 64)
    with LPCAM(model, feature_layer="layer4", classifier="fc", config=CFG.replace(scales=(1.0, 0.5))) as lp:
        assert not model.training  # eval inside the context
        bank = lp.fit([(images[:3], labels[:3]), (images[3:], labels[3:])], progress=False)
        maps = lp(images[:2], [[0, 1], [2]])
    assert [tuple(m.shape) for m in maps] == [(2, 64, 64), (1, 64, 64)]
    assert all(m.dtype == torch.float32 and float(m.max()) <= 1.0 + 1e-6 for m in maps)
    assert _flags(model) == before
    assert not model.layer4._forward_hooks
    assert set(bank.classes) == {0, 1, 2, 3}


def test_resnet18_equals_core_functions():
    model = _resnet()
    images, labels = _data(4, 64)
    scales = (1.0, 0.5)
    with LPCAM(model, "layer4", model.fc, config=CFG.replace(scales=scales)) as lp:
        lp.fit([(images, labels)], progress=False)
        got = lp.record(images[0], [0, 1])
        bank = lp.bank
    want = lpcam_multiscale(_views_by_hand(model, images[:1], scales), bank, [0, 1], (64, 64))
    assert torch.equal(got["keys"], want["keys"])
    torch.testing.assert_close(got["cam"], want["cam"])
    assert abs(got["high_res"] - want["high_res"]).max() < 1e-5


@pytest.mark.parametrize("scales", [(1.0, 0.5), (0.5,)])
def test_resnet18_fit_equals_builder_by_hand(scales):
    """fit pools the scale-1 unflipped features, split by the multi-scale CAM (with or without scale 1)."""
    model = _resnet()
    images, labels = _data(4, 64)
    cfg = CFG.replace(scales=(1.0,))
    with LPCAM(model, "layer4", "fc", config=cfg) as lp:
        got = lp.fit([(images[:4], labels[:4]), (images[4:], labels[4:])], cam_scales=scales, progress=False)
    model.eval()
    trunk = nn.Sequential(*list(model.children())[:-2])
    builder = PrototypeBuilder(4, cfg)
    for image, row in zip(images, labels):
        keys = torch.nonzero(row)[:, 0].tolist()
        views = []
        with torch.no_grad():
            for s in scales:
                x = image[None] if s == 1.0 else torch.nn.functional.interpolate(
                    image[None], scale_factor=s, mode="bilinear", align_corners=False)
                views.append(trunk(torch.cat([x, x.flip(-1)])))
            feats = trunk(image[None])[0]
        baseline = cam_multiscale(views, model.fc.weight, keys, (64, 64))["high_res"]
        builder.add(feats, torch.from_numpy(baseline), keys)
    want = builder.build(model.fc.weight.detach(), model.fc.bias.detach(), progress=False)
    assert got.classes == want.classes
    for c in want.classes:
        torch.testing.assert_close(got.foreground[c], want.foreground[c], atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(got.context.get(c, torch.empty(0)), want.context.get(c, torch.empty(0)),
                                   atol=1e-5, rtol=1e-4)


def test_vit_tokens_reshaped_and_core_equal():
    model = _vit()
    with torch.no_grad():  # torchvision zero-initialises the head: give it random weights
        nn.init.normal_(model.heads.head.weight, std=0.5)
        nn.init.normal_(model.heads.head.bias, std=0.1)
    model.train()
    images, labels = _data(4, 32, seed=1)
    layer = "encoder.layers.encoder_layer_1"
    with LPCAM(model, layer, "heads.head", config=CFG.replace(scales=(1.0,)), num_prefix_tokens=1) as lp:
        lp.fit([(images, labels)], progress=False)
        feats = lp.features(images[:2])
        maps = lp(images[:1], [1])
        bank = lp.bank
    assert feats.shape == (2, 16, 4, 4)
    assert maps[0].shape == (1, 32, 32)
    assert model.training and not model.encoder.layers.encoder_layer_1._forward_hooks
    # By hand: tokens from the layer, class token dropped, [B, C, 4, 4].
    captured = {}
    handle = find_module(model, layer).register_forward_hook(lambda m, i, o: captured.setdefault("t", o))
    model.eval()
    x = images[:1]
    with torch.no_grad():
        model(torch.cat([x, x.flip(-1)]))
    handle.remove()
    tokens = captured["t"][:, 1:]
    grid = tokens.transpose(1, 2).reshape(2, 16, 4, 4)
    want = lpcam_multiscale([grid], bank, [1], (32, 32))
    assert abs(maps[0].numpy() - want["high_res"]).max() < 1e-5


def test_equivalent_linear_of_kxk_conv_sums_taps():
    conv = nn.Conv2d(8, 3, 3, padding=1)
    weight, bias = equivalent_linear(conv)
    x = torch.randn(8)
    # On a constant map the centre output equals W_eq x + b.
    out = conv(x.reshape(1, 8, 1, 1).expand(1, 8, 5, 5))[0, :, 2, 2]
    torch.testing.assert_close(out, weight @ x + bias)


def test_missing_layer_lists_close_names():
    model = _resnet()
    with pytest.raises(ValueError, match="layer4"):
        LPCAM(model, "layer5", "fc")
    with pytest.raises(TypeError, match="classifier"):
        LPCAM(model, "layer4", model.layer1)


def test_call_outside_context_is_a_clear_error():
    lp = LPCAM(_resnet(), "layer4", "fc")
    with pytest.raises(RuntimeError, match="context manager"):
        lp.features(torch.randn(1, 3, 32, 32))


def test_hooks_removed_and_flags_restored_on_error():
    model = _resnet()
    model.train()
    with pytest.raises(ZeroDivisionError):
        with LPCAM(model, "layer4", "fc"):
            1 / 0
    assert model.training and not model.layer4._forward_hooks


def test_amp_maps_are_the_bfloat16_backbone_then_float32_maths():
    """``amp=True``: the map pass's backbone under bfloat16 autocast (CPU), the similarities in float32 on the
    features it gave; fit is unchanged (the same bank); maps close to the exact ones."""
    model = _resnet()
    images, labels = _data(4, 64)
    scales = (1.0, 0.5)
    cfg = CFG.replace(scales=scales)
    with LPCAM(model, "layer4", "fc", config=cfg) as lp:
        exact_bank = lp.fit([(images, labels)], progress=False)
        exact = lp.record(images[0], [0, 1])
    with LPCAM(model, "layer4", "fc", config=cfg, amp=True) as lp:
        amp_bank = lp.fit([(images, labels)], progress=False)
        got = lp.record(images[0], [0, 1])
    for c in exact_bank.classes:
        assert torch.equal(exact_bank.foreground[c], amp_bank.foreground[c])
    # By hand: bfloat16 features of (image, flip) per scale, then the core's float32 maps.
    with torch.autocast("cpu", dtype=torch.bfloat16):
        views = _views_by_hand(model, images[:1], scales)
    assert views[0].dtype == torch.bfloat16
    want = lpcam_multiscale([v.float() for v in views], amp_bank, [0, 1], (64, 64))
    assert got["high_res"].dtype == exact["high_res"].dtype == want["high_res"].dtype
    assert abs(got["high_res"] - want["high_res"]).max() < 1e-5
    assert 0 < abs(got["high_res"] - exact["high_res"]).max() < 0.1

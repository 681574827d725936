"""The ReCAM stage of benchmarks/recam_choices.py (which picks lpcam_adapters.recam's defaults), on tiny settings."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from benchmark_loader import load_benchmark

from lpcam_core.demo import CAMNet, demo_settings, images_to_tensor, train_classifier
from lpcam_core.demo.synthetic import generate

rc = load_benchmark("recam_choices")


@pytest.fixture(scope="module")
def tiny():
    """A trained tiny CAM network, its ReCAM copy and predictor, the data and the stage's log."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        settings = demo_settings(0, quick=True, data_num_images=40, data_image_size=48, data_num_classes=3,
                                 batch_size=8, epochs=6, scales=(1.0, 0.5), pool_cam_scales=(1.0,))
        data = generate(settings.data)
        torch.manual_seed(0)
        cam_net = CAMNet(3, settings.width, settings.feature_dim, settings.last_kernel)
        train_classifier(cam_net, data["train"], settings, progress=False)
        recam_net = copy.deepcopy(cam_net)
        torch.manual_seed(1)
        predictor = rc.ClassPredictor(3, settings.feature_dim)
        w0 = predictor.classifier.weight.detach().clone()
        history = rc.train_recam(recam_net, predictor, data["train"], settings, rc.RecamSettings(epochs=4, lr=0.5))
        yield {"settings": settings, "data": data, "cam": cam_net, "recam": recam_net, "predictor": predictor,
               "w0": w0, "history": history}
    finally:
        torch.set_num_threads(threads)


def test_recam_stage_trains_w_recam_and_leaves_fixed_parts(tiny):
    history = tiny["history"]
    assert len(history) == 4
    assert history[-1]["loss_ce"] < 0.8 * history[0]["loss_ce"], history  # the predictor learns
    assert not torch.allclose(tiny["predictor"].classifier.weight, tiny["w0"])
    cam, recam = tiny["cam"], tiny["recam"]
    # the backbone and W_cls are finetuned, the stem is frozen and BatchNorm statistics fixed (FixedBatchNorm)
    assert not torch.equal(cam.classifier.weight, recam.classifier.weight)
    assert not torch.equal(cam.features[-1][0].weight, recam.features[-1][0].weight)
    for a, b in zip(cam.features[0].parameters(), recam.features[0].parameters()):
        assert torch.equal(a, b)
    for (name, a), b in zip(cam.state_dict().items(), recam.state_dict().values()):
        if "running_" in name:
            assert torch.equal(a, b), name
    assert all(p.requires_grad for p in recam.parameters())
    assert not recam.training and not tiny["predictor"].training


def test_predictor_loss_is_recams_class_predictor_loss():
    torch.manual_seed(0)
    predictor = rc.ClassPredictor(4, 5)
    feats = torch.randn(4, 4, 5)
    labels = torch.tensor([[1.0, 0, 1, 0], [0, 0, 0, 0], [0, 0, 0, 1], [0, 1, 1, 1]])
    loss, acc = predictor(feats, labels)
    w = predictor.classifier.weight[:, :, 0, 0]
    present = {0: [0, 2], 2: [3], 3: [1, 2, 3]}
    logits = {i: feats[i, k] @ w.t() for i, k in present.items()}
    # CE averaged over each image's classes, summed over images, divided by the batch (the empty image too)
    want = sum(F.cross_entropy(logits[i], torch.tensor(k)) for i, k in present.items()) / 4
    assert torch.allclose(loss, want)
    hits = sum(int((logits[i].argmax(1) == torch.tensor(k)).sum()) for i, k in present.items())
    assert float(acc) == pytest.approx(hits / 6)


def test_cam_features_are_masked_means():
    torch.manual_seed(0)
    net = CAMNet(3, 16, 8).eval()
    x = torch.randn(2, 3, 24, 24)
    logits, feats = rc.cam_features(net, x)
    f = net.features(x)
    assert torch.allclose(logits, net(x))
    cam = F.relu(torch.einsum("kd,dhw->khw", net.classifier.weight[:, :, 0, 0], f[1]))[2]
    cam = cam / (cam.max() + 1e-5)
    assert torch.allclose(feats[1, 2], (cam[None] * f[1]).mean(dim=(1, 2)), atol=1e-6)


class _HostShaped(torch.nn.Module):
    """The demo network with ReCAM's ``CAM.forward2`` (what the adapter's make_recam baseline calls)."""

    def __init__(self, net):
        super().__init__()
        self.net = net

    def forward2(self, x, weight):
        x = F.conv2d(self.net.features(x), weight * self.net.classifier.weight)
        x = F.relu(x)
        return x[0] + x[1].flip(-1)


def test_recam_map_is_make_recams_forward2_map(tiny):
    from lpcam_adapters.irn_family import IRNFamily

    recam, predictor, val = tiny["recam"], tiny["predictor"], tiny["data"]["val"]
    scales = (1.0, 0.5)
    x = images_to_tensor(val.images[:3])
    feats = rc.views(recam, x, scales)
    host = _HostShaped(recam)
    for j in range(3):
        keys = np.nonzero(val.labels[j])[0].tolist()
        ours = rc.cam_multiscale([v[j] for v in feats], rc.recam_weight(recam, predictor), keys, x.shape[2:])
        imgs = []
        for s in scales:
            xs = x[j:j + 1] if s == 1.0 else F.interpolate(
                x[j:j + 1], size=[round(v * s) for v in x.shape[2:]], mode="bilinear", align_corners=False)
            imgs.append(torch.cat([xs, xs.flip(-1)]))
        pack = {"img": imgs, "label": torch.from_numpy(val.labels[j]), "size": tuple(x.shape[2:])}
        with torch.no_grad():
            theirs = IRNFamily("recam", "stand_in", host, scales, extra_weight=predictor.classifier.weight.detach(),
                               score_weight=predictor.classifier.weight.detach()).baseline(pack)
        assert ours["keys"].tolist() == theirs["keys"].tolist() == keys
        np.testing.assert_allclose(ours["high_res"], theirs["high_res"], atol=1e-5)
        torch.testing.assert_close(ours["cam"], theirs["cam"], atol=1e-5, rtol=1e-4)


def test_combos_mirror_recam_plan(tiny):
    cam, recam, predictor = tiny["cam"], tiny["recam"], tiny["predictor"]
    combos = rc.valid_combos()
    assert combos == [("recam", "recam"), ("recam", "cls"), ("cam", "cls")]
    net, score = rc.plan(("recam", "recam"), cam, recam, predictor)
    assert net is recam and torch.equal(score, (predictor.classifier.weight * recam.classifier.weight)[:, :, 0, 0])
    net, score = rc.plan(("recam", "cls"), cam, recam, predictor)
    assert net is recam and torch.equal(score, recam.classifier.weight[:, :, 0, 0])
    net, score = rc.plan(("cam", "cls"), cam, recam, predictor)
    assert net is cam and torch.equal(score, cam.classifier.weight[:, :, 0, 0])


def test_every_row_gives_maps_of_the_right_shape(tiny):
    settings, data = tiny["settings"], tiny["data"]
    combos = rc.valid_combos()
    banks = rc.build_banks(tiny["cam"], tiny["recam"], tiny["predictor"], data["train"], settings, combos)
    assert set(banks) == {rc.combo_key(c) for c in combos} | {rc.REFERENCE}
    # the same pools (ReCAM backbone, ReCAM split) scored by two different classifiers
    fingerprints = {k: bank.meta["classifier_fingerprint"] for k, bank in banks.items()}
    assert fingerprints["lpcam_recam_recam"] != fingerprints["lpcam_recam_cls"]
    maps = rc.compute_maps(tiny["cam"], tiny["recam"], tiny["predictor"], banks, combos, data["val"], settings)
    val = data["val"]
    assert set(maps) == {"cam", "recam", *banks}
    size = val.images.shape[1:3]
    for key, records in maps.items():
        assert len(records) == len(val), key
        for rec, label in zip(records, val.labels):
            keys = np.nonzero(label)[0].tolist()
            assert set(rec["keys"].tolist()) <= set(keys), key
            if key in ("cam", "recam"):
                assert rec["keys"].tolist() == keys
            assert rec["high_res"].shape == (len(rec["keys"]), *size), key
            assert np.isfinite(rec["high_res"]).all() and rec["high_res"].min() >= 0 and rec["high_res"].max() <= 1
    assert any(len(r["keys"]) for r in maps["lpcam_cam_cls"])

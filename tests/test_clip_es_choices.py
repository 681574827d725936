"""benchmarks/clip_es_choices.py: the CLIP-ES feature choices on the CPU proxy run end to end (tiny settings)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def _module():
    spec = importlib.util.spec_from_file_location("clip_es_choices", ROOT / "benchmarks" / "clip_es_choices.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_proxy_grad_cam_is_clip_es_rule():
    """The proxy's Grad-CAM: gradient of the class's softmax score among the present classes, w.r.t. ln_1."""
    m = _module()
    torch.manual_seed(0)
    model = m.ProxyCLIP(3, size=32, patch=8, width=16, layers=2, heads=2, dim=8).eval()
    image = torch.randn(3, 32, 32)
    maps = model.grad_cam(image, [0, 2])
    assert maps.shape == (2, 4, 4) and float(maps.min()) >= 0 and float(maps.max()) <= 1
    # by hand: autograd through the whole last block from ln_1's output
    x = model.visual.before_last(image[None]).detach()
    last = model.visual.blocks[-1]
    normed = last.ln_1(x).detach().requires_grad_(True)
    prob = model.logits(last(x, normed), model.text[[0, 2]]).softmax(-1)[0, 1]
    (grad,) = torch.autograd.grad(prob, normed)
    cam = torch.relu((normed[0, 1:] * grad[0, 1:].mean(0)).sum(-1))
    cam = (cam - cam.min()) / (1e-7 + (cam - cam.min()).max())
    torch.testing.assert_close(maps[1].flatten(), cam.detach(), atol=1e-6, rtol=0)
    # the features of each kind: proj is ln_post's output times proj
    with torch.no_grad():
        proj, ln = model.local_features(image[None], "proj"), model.local_features(image[None], "ln_post")
    torch.testing.assert_close(proj, torch.einsum("bchw,cd->bdhw", ln, model.visual.proj))


@pytest.mark.slow
def test_proxy_runs_every_choice(capsys):
    m = _module()
    assert m.main(["--seeds", "0", "--epochs", "1", "--classes", "2", "--images", "60", "--threads", "1"]) == 0
    out = capsys.readouterr().out
    for method in ("Grad-CAM", "LPCAM proj", "LPCAM ln_post", "LPCAM tokens"):
        assert f"| {method} |" in out, out

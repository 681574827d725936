"""Shared fixtures: small seeded tensors and prototype banks. Keep it small; add fixtures at the end."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lpcam_core.bank import PrototypeBank

# The test tensors are tiny: one intra-op thread is fastest, and on a shared, loaded machine OpenMP
# thread hand-offs can cost ~100 ms per op. Tests must not depend on the thread count.
torch.set_num_threads(1)


def make_bank(
    num_classes: int = 5,
    feature_dim: int = 16,
    *,
    classes=(0, 2, 3),
    no_context=(3,),
    num_fg: int = 3,
    num_ctx: int = 2,
    seed: int = 0,
) -> PrototypeBank:
    """A random bank: ``classes`` get ``num_fg`` class prototypes; those not in ``no_context`` get
    ``num_ctx`` context prototypes (the others zero). Signed Gaussian prototypes: maps change sign."""
    g = torch.Generator().manual_seed(seed)
    fg = {c: torch.randn(num_fg, feature_dim, generator=g) for c in classes}
    ctx = {c: (torch.randn(num_ctx, feature_dim, generator=g) if c not in no_context else torch.empty(0, feature_dim)) for c in classes}
    return PrototypeBank(fg, ctx, {"num_classes": num_classes})


def make_features(bank: PrototypeBank, sizes, *, seed: int = 0, dtype=torch.float32):
    """List over scales of [2, C, h, w] features: each position a scaled prototype of the bank
    plus signed noise, so the maps have a real range and change sign (the no-context rule matters)."""
    g = torch.Generator().manual_seed(seed)
    protos = torch.cat([bank.foreground[c] for c in bank.classes] + [bank.context[c] for c in bank.classes])
    out = []
    for h, w in sizes:
        pick = torch.randint(protos.shape[0], (2, h * w), generator=g)  # each position near one prototype
        scale = 0.5 + torch.rand(2, h * w, 1, generator=g)
        feats = protos[pick] * scale + 0.3 * torch.randn(2, h * w, protos.shape[1], generator=g)
        out.append(feats.transpose(1, 2).reshape(2, protos.shape[1], h, w).to(dtype).contiguous())
    return out


@pytest.fixture
def bank() -> PrototypeBank:
    """5 classes, 16-d; classes 0 and 2 have context prototypes, class 3 has none."""
    return make_bank()


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(1234)


@pytest.fixture
def bank_factory():
    """``make_bank`` as a fixture (tests call it with their own sizes)."""
    return make_bank


@pytest.fixture
def features_factory():
    """``make_features`` as a fixture."""
    return make_features

"""PrototypeBank: safe atomic files, validation on load, fingerprints, the no-context ablation."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

import lpcam_core.io as lio
from lpcam_core.bank import BankError, PrototypeBank, classifier_fingerprint


@pytest.fixture
def weight():
    return torch.randn(5, 16, generator=torch.Generator().manual_seed(9))


@pytest.fixture
def full_bank(bank, weight):
    meta = {
        **bank.meta,
        "class_names": ["a", "b", "c", "d", "e"],
        "classifier_fingerprint": classifier_fingerprint(weight),
        "features_seen": {"class/0": 12, "context/0": 30},
        "config": {"num_clusters": 3, "scales": [1.0, 0.5]},
    }
    return PrototypeBank(bank.foreground, bank.context, meta)


def test_round_trip(tmp_path, full_bank):
    path = tmp_path / "bank.pt"
    full_bank.save(path)
    loaded = PrototypeBank.load(path)
    assert loaded.classes == full_bank.classes == [0, 2, 3]
    for key in full_bank.classes:
        assert torch.equal(loaded.foreground[key], full_bank.foreground[key])
        assert torch.equal(loaded.context[key], full_bank.context[key])
    assert loaded.context[3].shape == (0, 16)
    for name in ("class_names", "classifier_fingerprint", "features_seen", "config", "num_classes", "feature_dim"):
        assert loaded.meta[name] == full_bank.meta[name], name
    assert loaded.num_classes == 5 and loaded.feature_dim == 16
    assert "library_version" not in loaded.meta or isinstance(loaded.meta["library_version"], str)


def test_file_loads_with_weights_only(tmp_path, full_bank):
    path = tmp_path / "bank.pt"
    full_bank.save(path)
    state = torch.load(path, weights_only=True)
    assert state["format"] == "lpcam-prototype-bank"
    assert torch.equal(state["foreground"]["2"], full_bank.foreground[2])


def test_save_is_atomic(tmp_path, full_bank, bank, monkeypatch):
    path = tmp_path / "bank.pt"
    full_bank.save(path)
    before = path.read_bytes()
    assert sorted(os.listdir(tmp_path)) == ["bank.pt"]  # no temporary file left behind

    def broken_fsync(fd):
        raise OSError("disk full (simulated)")

    monkeypatch.setattr(lio.os, "fsync", broken_fsync)
    other = PrototypeBank({1: torch.rand(2, 16)}, {}, {"num_classes": 5})
    with pytest.raises(OSError, match="disk full"):
        other.save(path)
    assert path.read_bytes() == before  # the existing bank is untouched
    assert sorted(os.listdir(tmp_path)) == ["bank.pt"]
    monkeypatch.undo()
    assert PrototypeBank.load(path).classes == [0, 2, 3]


def test_truncated_file(tmp_path, full_bank):
    path = tmp_path / "bank.pt"
    full_bank.save(path)
    data = path.read_bytes()
    for cut in (len(data) // 2, len(data) - 40, 10, 0):
        broken = tmp_path / f"cut{cut}.pt"
        broken.write_bytes(data[:cut])
        with pytest.raises(BankError, match=f"cut{cut}.pt"):
            PrototypeBank.load(broken)


def test_foreign_files(tmp_path):
    rng = np.random.default_rng(0)
    for i in range(200):  # random bytes fail at many places in torch's unpickler (IndexError, KeyError, ...)
        noise = tmp_path / f"noise{i}.pt"
        noise.write_bytes(rng.integers(0, 256, int(rng.integers(1, 4096)), dtype=np.uint8).tobytes())
        with pytest.raises(BankError, match=f"noise{i}.pt: not a readable"):
            PrototypeBank.load(noise)
    other = tmp_path / "model.pt"
    torch.save({"weight": torch.randn(3, 3)}, other)
    with pytest.raises(BankError, match=r"model.pt: not an LPCAM prototype bank"):
        PrototypeBank.load(other)
    tensor = tmp_path / "tensor.pt"
    torch.save(torch.randn(3), tensor)
    with pytest.raises(BankError, match="tensor.pt"):
        PrototypeBank.load(tensor)
    malformed = tmp_path / "malformed.pt"
    torch.save({"format": "lpcam-prototype-bank", "format_version": 1}, malformed)
    with pytest.raises(BankError, match="malformed.pt"):
        PrototypeBank.load(malformed)


def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nothere.pt"):
        PrototypeBank.load(tmp_path / "nothere.pt")


def test_shape_mismatch(tmp_path, full_bank):
    path = tmp_path / "bank.pt"
    full_bank.save(path)
    with pytest.raises(BankError, match=r"bank.pt: built for 5 classes, the model has 20"):
        PrototypeBank.load(path, num_classes=20)
    with pytest.raises(BankError, match=r"bank.pt: built on 16-d features, the model gives 2048"):
        PrototypeBank.load(path, feature_dim=2048)
    assert PrototypeBank.load(path, num_classes=5, feature_dim=16).classes == [0, 2, 3]


def test_classifier_fingerprint(tmp_path, full_bank, weight):
    path = tmp_path / "bank.pt"
    full_bank.save(path)
    PrototypeBank.load(path, classifier_weight=weight)
    PrototypeBank.load(path, classifier_weight=weight[:, :, None, None])  # conv form, same values
    changed = weight.clone()
    changed[4, 15] += 1e-3
    with pytest.raises(BankError, match=r"bank.pt: built with another classifier"):
        PrototypeBank.load(path, classifier_weight=changed)
    with pytest.raises(BankError, match="another classifier"):
        PrototypeBank.load(path, classifier_weight=weight, bias=torch.zeros(5))
    assert classifier_fingerprint(weight) == classifier_fingerprint(weight.double())
    assert classifier_fingerprint(weight) != classifier_fingerprint(changed)


def test_without_context(bank):
    ablated = bank.without_context()
    assert ablated.classes == bank.classes
    for key in bank.classes:
        assert torch.equal(ablated.foreground[key], bank.foreground[key])
        assert ablated.context[key].shape == (0, 16)
    assert bank.context[0].shape == (2, 16)  # the original is unchanged
    assert ablated.meta["context_removed"] is True


def test_constructor_validation():
    with pytest.raises(BankError, match="foreground is empty"):
        PrototypeBank({}, {})
    with pytest.raises(BankError, match="different feature dims"):
        PrototypeBank({0: torch.rand(2, 4), 1: torch.rand(2, 5)})
    with pytest.raises(BankError, match="zero class prototypes"):
        PrototypeBank({0: torch.rand(0, 4)})
    with pytest.raises(BankError, match="NaN or inf"):
        PrototypeBank({0: torch.tensor([[1.0, float("nan")]])})
    with pytest.raises(BankError, match=r"context prototypes for classes \[1\]"):
        PrototypeBank({0: torch.rand(2, 4)}, {1: torch.rand(1, 4)})
    with pytest.raises(BankError, match="outside 0..1"):
        PrototypeBank({3: torch.rand(2, 4)}, {}, {"num_classes": 2})
    with pytest.raises(BankError, match="feature_dim"):
        PrototypeBank({0: torch.rand(2, 4)}, {}, {"feature_dim": 8})


def test_check_classes_and_summary(bank):
    assert bank.check_classes([3, 0]) == [3, 0]
    with pytest.raises(ValueError, match=r"keys: class\(es\) \[1\]"):
        bank.check_classes([1], "keys")
    rows = bank.summary()
    assert len(rows) == 5
    assert [r["class_prototypes"] for r in rows] == [3, 0, 3, 3, 0]
    assert [r["context_prototypes"] for r in rows] == [2, 0, 2, 0, 0]


def test_a_refused_file_is_named_without_torchs_advice_to_load_it_unsafely(tmp_path):
    """torch's refusal says to retry with weights_only=False (which runs the file's code): lpcam's message
    keeps only why the file was refused."""
    import argparse

    import pytest

    from lpcam_core import PrototypeBank
    from lpcam_core.bank import BankError

    text, code = tmp_path / "notes.pt", tmp_path / "code.pt"
    text.write_text("# a README, not a bank\n")
    torch.save({"x": argparse.Namespace(a=1)}, code)  # a pickle naming a class: code a full load would run
    for path, reason in ((text, "Unsupported operand"), (code, "global")):
        with pytest.raises(BankError) as err:
            PrototypeBank.load(path)
        message = str(err.value)
        assert str(path) in message and reason.lower() in message.lower(), message
        assert "weights_only" not in message and "Re-running" not in message and "\n" not in message
        assert "add_safe_globals" not in message

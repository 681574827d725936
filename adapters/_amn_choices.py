"""The AMN adapter's stage-(b) choices (torch-free: ``lpcam amn`` offers them without importing torch).

:mod:`lpcam_adapters.amn` re-exports them; see :class:`lpcam_adapters.amn.AMNSettings`.
"""

from __future__ import annotations

__all__ = ["FEATURES", "CLASSIFIERS", "SOFTMAX_WAYS", "SPLITS", "BACKGROUNDS", "STAGES"]

FEATURES = ("conditioned", "raw")
CLASSIFIERS = ("all_taps", "centre")
SOFTMAX_WAYS = (20, 21)
SPLITS = ("amn_cam", "ir_label")
BACKGROUNDS = ("one_minus_max", "zeros")
STAGES = ("a", "b")

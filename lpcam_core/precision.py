"""Numerical precision: the similarities always in float32, the backbone optionally under autocast.

* :func:`float32_maths`: the LPCAM and CAM maths, whatever the caller's autocast or TF32 setting;
* :func:`backbone_autocast`: the opt-in mixed precision of a map pass's backbone (``--amp``);
  bfloat16 on the CPU, float16 on CUDA. Never the default: docs/performance.md measures its effect.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

__all__ = ["AMP_DTYPES", "float32_maths", "backbone_autocast"]

#: The autocast dtype of :func:`backbone_autocast` per device type (others: autocast's own default).
AMP_DTYPES = {"cuda": torch.float16, "cpu": torch.bfloat16}


@contextlib.contextmanager
def float32_maths(device: torch.device) -> Iterator[None]:
    """No autocast and, on CUDA, no TF32 matmuls (a host's global TF32 setting would cost ~1e-3 of accuracy)."""
    with torch.autocast(device_type=device.type, enabled=False):
        if device.type != "cuda":
            yield
            return
        previous = torch.get_float32_matmul_precision()
        torch.set_float32_matmul_precision("highest")
        try:
            yield
        finally:
            torch.set_float32_matmul_precision(previous)


def backbone_autocast(device: torch.device | str, enabled: bool) -> contextlib.AbstractContextManager:
    """The backbone's forward under autocast (:data:`AMP_DTYPES`) when ``enabled``, else a no-op context.

    Features come out in the lower precision; every map function casts them to float32 and computes
    its similarities under :func:`float32_maths`.
    """
    if not enabled:
        return contextlib.nullcontext()
    device_type = torch.device(device).type
    return torch.autocast(device_type=device_type, dtype=AMP_DTYPES.get(device_type))

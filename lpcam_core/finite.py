"""One finiteness check shared by K-means and the map functions."""

from __future__ import annotations

import torch


def all_finite(x: torch.Tensor) -> bool:
    """True when ``x`` holds no NaN or inf. One reduction pass (min and max propagate NaN; an inf is an
    extreme), no temporary the size of ``x``: ``isfinite(x).all()`` is ~100x slower on large CPU tensors."""
    if x.numel() == 0:
        return True
    x = x.detach()
    in_memory_order = x.permute(sorted(range(x.ndim), key=lambda d: -x.stride(d)))
    if in_memory_order.is_contiguous():  # channels-last features: ~7x faster reduced in memory order
        x = in_memory_order
    low, high = torch.aminmax(x)
    return bool(torch.isfinite(low) & torch.isfinite(high))

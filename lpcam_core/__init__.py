"""lpcam_core: local-prototype class activation maps (LPCAM, CVPR 2023).

Public API (explicit re-exports; heavy submodules are imported lazily)::

    from lpcam_core import kmeans, select_prototypes, LPCAMConfig, PrototypeBuilder, PrototypeBank
    from lpcam_core import lpcam_map, lpcam_multiscale, LPCAM, LinearScorer

Subpackages: :mod:`lpcam_core.run` (the one engine: 1 process, spawned workers or torchrun),
:mod:`lpcam_core.eval` (seed metrics), :mod:`lpcam_core.demo` (the synthetic benchmark).
"""

from __future__ import annotations

import importlib
from typing import Any

from .version import __version__

_EXPORTS = {
    "kmeans": "clustering",
    "KMeansResult": "clustering",
    "select_prototypes": "prototypes",
    "PrototypeBuilder": "prototypes",
    "PrototypeBank": "bank",
    "BankError": "bank",
    "LPCAMConfig": "config",
    "Scorer": "classifier",
    "LinearScorer": "classifier",
    "PerClassScorer": "classifier",
    "CosineScorer": "classifier",
    "lpcam_map": "maps",
    "lpcam_multiscale": "maps",
    "LPCAM": "extractor",
}

__all__ = ["__version__", *_EXPORTS]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'lpcam_core' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)

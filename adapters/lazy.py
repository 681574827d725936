"""A module imported on first use: host adapters name torch at module level and still import without it.

``lpcam --help`` and ``lpcam <host> --help`` build their parsers by importing the host adapter; torch
(2-8 s to import) is imported only when a command actually computes something.

Example:
    >>> torch = LazyModule("torch")      # nothing imported yet
    >>> torch.zeros(2).shape             # imported here
    torch.Size([2])
"""

from __future__ import annotations

import importlib
from types import ModuleType
from typing import Any

__all__ = ["LazyModule"]


class LazyModule:
    """Stands for the module ``name``; the first attribute access imports it."""

    def __init__(self, name: str) -> None:
        self._name = name
        self._module: ModuleType | None = None

    def __getattr__(self, attribute: str) -> Any:
        if self._module is None:
            self._module = importlib.import_module(self._name)
        return getattr(self._module, attribute)

    def __repr__(self) -> str:
        return f"<lazy module {self._name!r}{' (imported)' if self._module is not None else ''}>"

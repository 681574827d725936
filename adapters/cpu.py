"""Run a host's CUDA-only steps on a CPU machine: ``with cuda_as_cpu(): ...``.

The hosts' training and inference steps are written for GPUs: ``model.cuda()``,
``img.cuda(non_blocking=True)``, ``torch.cuda.device(i)``, ``DataParallel(...).cuda()``, one
``torch.multiprocessing.spawn`` process per GPU (none on a CPU machine, so nothing runs) and
``torch.cuda.synchronize()``. Inside :func:`cuda_as_cpu` on a machine without CUDA:

* ``Tensor.cuda()`` and ``Module.cuda()`` return the tensor or module unchanged (it stays on the CPU);
  ``.to("cuda:0")`` (a string or ``torch.device`` of type cuda) moves to the CPU instead;
* ``torch.cuda.device(i)`` is a no-op context and ``torch.cuda.synchronize()`` does nothing;
* ``torch.cuda.device_count()`` is 1, so the hosts split their data for one worker;
* ``torch.multiprocessing.spawn(fn, args, nprocs)`` calls ``fn(i, *args)`` in this process.

Nothing changes where CUDA is available. ``lpcam <host> try`` and ``benchmarks/pipeline.py`` use it;
the hosts' own code is never edited.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

__all__ = ["cuda_as_cpu", "SHIMS"]

SHIMS = (
    "Tensor.cuda / Module.cuda: unchanged (CPU); .to('cuda:N'): .to('cpu')",
    "torch.cuda.device: no-op context; torch.cuda.synchronize: no-op; torch.cuda.device_count: 1",
    "torch.multiprocessing.spawn: the processes run one after another in this process",
)


def _spawn_in_process(fn: Any, args: tuple = (), nprocs: int = 1, join: bool = True, **kwargs: Any) -> None:
    for process_index in range(nprocs):
        fn(process_index, *args)


def _cuda_to_cpu(value: Any) -> Any:
    import torch

    if isinstance(value, str) and value.split(":")[0] == "cuda":
        return "cpu"
    if isinstance(value, torch.device) and value.type == "cuda":
        return torch.device("cpu")
    return value


def _to_cpu_instead(real_to: Any) -> Any:
    def to(self: Any, *args: Any, **kwargs: Any) -> Any:
        if args:
            args = (_cuda_to_cpu(args[0]), *args[1:])
        if "device" in kwargs:
            kwargs["device"] = _cuda_to_cpu(kwargs["device"])
        return real_to(self, *args, **kwargs)

    return to


@contextlib.contextmanager
def cuda_as_cpu() -> Iterator[bool]:
    """Inside the block, CUDA-only host code runs on the CPU (see the module docstring).

    Yields:
        True when the shims are in place (no CUDA here), False when CUDA is available (nothing changed).
    """
    import torch
    import torch.multiprocessing

    if torch.cuda.is_available():
        yield False
        return
    saved = [(torch.Tensor, "cuda", torch.Tensor.cuda), (torch.nn.Module, "cuda", torch.nn.Module.cuda),
             (torch.Tensor, "to", torch.Tensor.to), (torch.nn.Module, "to", torch.nn.Module.to),
             (torch.cuda, "device", torch.cuda.device), (torch.cuda, "device_count", torch.cuda.device_count),
             (torch.cuda, "synchronize", torch.cuda.synchronize),
             (torch.multiprocessing, "spawn", torch.multiprocessing.spawn)]
    torch.Tensor.cuda = lambda self, *args, **kwargs: self  # type: ignore[method-assign]
    torch.nn.Module.cuda = lambda self, *args, **kwargs: self  # type: ignore[method-assign]
    torch.Tensor.to = _to_cpu_instead(torch.Tensor.to)  # type: ignore[method-assign]
    torch.nn.Module.to = _to_cpu_instead(torch.nn.Module.to)  # type: ignore[method-assign]
    torch.cuda.device = lambda *args, **kwargs: contextlib.nullcontext()  # type: ignore[assignment]
    torch.cuda.device_count = lambda: 1
    torch.cuda.synchronize = lambda *args, **kwargs: None
    torch.multiprocessing.spawn = _spawn_in_process  # type: ignore[assignment]
    try:
        yield True
    finally:
        for owner, name, value in saved:
            setattr(owner, name, value)

"""``import lpcam_adapters.irn`` as the first line of IRN's ``run_sample.py`` swaps CAM for LPCAM.

IRN (https://github.com/jiwoon-ahn/irn, MIT). The import registers, through the import hook
(:mod:`lpcam_adapters._hooks`), without importing any IRN module:

* ``step.make_cam:run``: the LPCAM pass of :func:`lpcam_adapters._irn_family.make_cam_pass`
  (baseline CAM of ``voc12/train.txt`` into ``<cam_out_dir>_baseline``, prototype bank,
  LPCAM maps into ``cam_out_dir``); ``LPCAM=0`` runs IRN's own pass (in-process on a machine
  without GPU, where IRN's spawn of zero workers writes nothing);
* the modern-stack shims of :mod:`lpcam_adapters._compat`.

Then use LPCAM's thresholds downstream:
``--cam_eval_thres 0.3 --conf_fg_thres 0.45 --conf_bg_thres 0.25 --sem_seg_bg_thres 0.35``.
``lpcam irn --explain`` lists the patches and settings.
"""

from __future__ import annotations

from types import ModuleType
from typing import Any, Callable

from . import _compat, _hooks, _irn_family

__all__ = ["HOST", "install"]

HOST = _irn_family.HostSpec(name="irn", weights_suffix=".pth", thresholds=(0.15, 0.30, 0.05, 0.25))


def _make_run(original: Callable[[Any], Any], module: ModuleType) -> Callable[[Any], None]:
    def run(args: Any) -> None:
        """IRN's make_cam pass with LPCAM maps (see lpcam_adapters.irn)."""
        _irn_family.make_cam_pass(args, HOST, _irn_family.cam_plan(HOST), original)

    return run


def install() -> None:
    """Register IRN's patches (idempotent; runs at import)."""
    _compat.register_irn_family()
    _hooks.replace_attribute(
        "step.make_cam",
        "run",
        _make_run,
        requires=("_work",),
        replace=True,  # the adapter imported last wins (the CLI imports several)
        description="LPCAM pass: baseline CAM of the prototype list, prototype bank, LPCAM maps into cam_out_dir "
        "(LPCAM=0: IRN's own maps; 0 GPU: in-process)",
    )


install()


"""``import lpcam_adapters.irn`` as the first line of IRN's ``run_sample.py`` swaps CAM for LPCAM.

IRN (https://github.com/jiwoon-ahn/irn, MIT). The import registers, through the import hook
(:mod:`lpcam_adapters.hooks`) and without importing any IRN module:

* ``step.make_cam:run``: the LPCAM pass of :func:`lpcam_adapters.irn_family.make_cam_pass` (baseline
  CAM of ``voc12/train.txt`` into ``<cam_out_dir>_baseline``, prototype bank
  ``<dirname(cam_out_dir)>/lpcam_bank.pt``, LPCAM maps of ``--train_list`` into ``cam_out_dir``);
  ``LPCAM=0`` runs IRN's own pass (in-process on a machine without GPU, where IRN's spawn of zero
  workers writes nothing);
* the modern-stack shims of :mod:`lpcam_adapters.compat`.

``lpcam irn --explain`` lists the patches and settings.
"""

from __future__ import annotations

import os
from types import ModuleType
from typing import Any, Callable

from . import hooks, irn_family
from .base import HostInfo
from .settings import HostSettings, read_settings

__all__ = ["INFO", "SPEC", "install", "register"]

SPEC = irn_family.Spec(name="irn", weights_suffix=".pth", thresholds=(0.15, 0.30, 0.05, 0.25))
INFO = HostInfo(
    name="irn",
    title="IRN (jiwoon-ahn/irn)",
    module=__name__,
    entry_script="run_sample.py",
    signature=irn_family.SIGNATURE,
    options=(irn_family.AMP,),
    foreign={"step/make_recam.py": "recam", "step/make_amn_cam.py": "amn"},
    env_docs={"LPCAM_BANK": "prototype bank file (default <dirname(cam_out_dir)>/lpcam_bank.pt)",
              "LPCAM_BASELINE_DIR": "baseline CAM directory (default <cam_out_dir>_baseline)",
              "LPCAM_PROTO_LIST": "image list clustered for prototypes (default voc12/train.txt)"},
    thresholds=irn_family.recommended_thresholds(SPEC),
    patch_owners=("lpcam_adapters.compat",),
)


def _plan(ns: Any, settings: HostSettings) -> irn_family.IRNFamily:
    """``lpcam irn prototypes|make``: the checkpoint given by ``--weights`` (used as is, no suffix)."""
    import argparse

    args = argparse.Namespace(cam_network=ns.network, cam_scales=tuple(ns.scales),
                              cam_weights_name=os.path.abspath(ns.weights))
    return irn_family.cam_host(args, irn_family.Spec("irn", "", SPEC.thresholds), flag="--weights")


def _make_run(original: Callable[[Any], Any], module: ModuleType) -> Callable[[Any], None]:
    def run(args: Any) -> None:
        """IRN's make_cam pass with LPCAM maps (see lpcam_adapters.irn)."""
        irn_family.make_cam_pass(args, SPEC, lambda a, s: irn_family.cam_host(a, SPEC), original,
                                 read_settings(INFO.options, host="irn"))

    return run


def install() -> None:
    """Register IRN's patches (idempotent; runs at import)."""
    irn_family.compat.register_irn_family()
    hooks.replace_attribute(
        "step.make_cam", "run", _make_run, requires=("_work",), replace=True,
        description="LPCAM pass: baseline CAM of the prototype list, prototype bank, LPCAM maps into cam_out_dir "
        "(LPCAM=0: IRN's own maps; 0 GPU: in-process)",
    )


def register(subparsers: Any) -> None:
    """``lpcam irn ...`` (entry point ``lpcam.hosts``)."""
    from .cli import add_host_group
    from .trial import add_try

    def steps(sub: Any) -> None:
        irn_family.add_steps(sub, INFO, _plan, weights_help="CAM checkpoint file (IRN saves sess/res50_cam.pth.pth)")
        add_try(sub, INFO)

    add_host_group(subparsers, INFO, steps)


read_settings(INFO.options, host="irn")  # a malformed LPCAM_* variable fails here, at import, not hours later
install()

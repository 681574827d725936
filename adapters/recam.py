"""``import lpcam_adapters.recam`` as the first line of ReCAM's ``run_sample.py`` swaps CAM for LPCAM.

ReCAM (https://github.com/zhaozhengChen/ReCAM, MIT) keeps IRN's pipeline and adds ``step.make_recam``,
whose maps come from ``CAM.forward2(x, W_recam)`` (classifier ``W_recam * W_cls``) of the
ReCAM-finetuned backbone ``res50_recam_<N>.pth``. The import registers, without importing ReCAM:

* ``step.make_cam:run``: the LPCAM pass on the plain CAM (``cam_weights_name``, loaded as is: ReCAM
  adds no ``.pth``), as for IRN;
* ``step.make_recam:run``: the LPCAM pass on ReCAM: baseline = ReCAM's own maps (into
  ``<cam_out_dir>_recam_baseline``), features of the backbone chosen by ``LPCAM_BACKBONE`` (``recam``,
  default, or ``cam``), prototypes scored by the classifier chosen by ``LPCAM_CLASSIFIER`` (``cls`` =
  W_cls of that backbone, default, or ``recam`` = W_recam * W_cls), bank ``<work_space>/lpcam_bank_recam.pt``;
* the modern-stack shims of :mod:`lpcam_adapters.compat`.

The default classifier (``cls``) was chosen by measurement on a proxy (ReCAM + LPCAM was never
published): ``benchmarks/recam_choices.py``, results in docs/hosts/recam.md.
"""

from __future__ import annotations

import argparse
import importlib
import os
from types import ModuleType
from typing import Any, Callable

from . import hooks, irn_family
from .base import HostInfo
from .settings import HostSettings, Option, read_settings

__all__ = ["INFO", "SPEC", "OPTIONS", "install", "register", "recam_host", "recam_weights", "recam_settings"]

SPEC = irn_family.Spec(name="recam", weights_suffix="", thresholds=(0.21, 0.35, 0.10, 0.28))
OPTIONS = (
    Option("classifier", "LPCAM_CLASSIFIER", "cls", "classifier scoring prototypes: cls (W_cls, default) or recam "
           "(W_recam * W_cls)", choices=("cls", "recam"), flag="--classifier"),
    Option("backbone", "LPCAM_BACKBONE", "recam", "backbone giving the features: recam (default) or cam "
           "(res50_cam weights)", choices=("recam", "cam"), flag="--backbone"),
    irn_family.AMP,
)
INFO = HostInfo(
    name="recam",
    title="ReCAM (zhaozhengChen/ReCAM)",
    module=__name__,
    entry_script="run_sample.py",
    signature={**irn_family.SIGNATURE, "step/make_recam.py": "def _work"},
    foreign={"step/make_amn_cam.py": "amn"},
    options=OPTIONS,
    env_docs={"LPCAM_BANK": "prototype bank file (default <work_space>/lpcam_bank.pt, _recam.pt for make_recam)",
              "LPCAM_BASELINE_DIR": "baseline CAM directory (default <cam_out_dir>_baseline, _recam_baseline)"},
    thresholds=irn_family.recommended_thresholds(SPEC),
    patch_owners=("lpcam_adapters.compat",),
)


def recam_settings(environ: Any = None) -> HostSettings:
    """ReCAM's settings (:data:`OPTIONS` on top of the common ones), the backbone/classifier pair checked."""
    settings = read_settings(OPTIONS, environ, host="recam")
    if settings.option("backbone") == "cam" and settings.option("classifier") == "recam":
        raise ValueError("LPCAM_BACKBONE=cam needs LPCAM_CLASSIFIER=cls: W_recam belongs to the ReCAM backbone")
    return settings


def recam_weights(args: Any) -> tuple[str, str]:
    """(backbone, Class_Predictor) checkpoints that ReCAM's make_recam loads."""
    epochs = str(args.recam_num_epoches)
    return (os.path.join(args.recam_weight_dir, f"res50_recam_{epochs}.pth"),
            os.path.join(args.recam_weight_dir, f"recam_predictor_{epochs}.pth"))


def recam_host(args: Any, settings: HostSettings, *,
               flag: str = "--recam_weight_dir / --recam_num_epoches") -> irn_family.IRNFamily:
    """The make_recam networks: baseline by ``forward2`` with ``W_recam``; features and scorer as chosen.
    ``flag`` names the arguments that locate the checkpoints in errors (run_sample.py's, or lpcam's step's)."""
    import torch

    backbone, classifier = settings.option("backbone"), settings.option("classifier")
    if backbone == "cam" and classifier == "recam":
        raise ValueError("LPCAM_BACKBONE=cam needs LPCAM_CLASSIFIER=cls: W_recam belongs to the ReCAM backbone")
    backbone_path, predictor_path = recam_weights(args)
    model = irn_family.load_model(args.cam_network, backbone_path, flag=flag)
    if not os.path.isfile(predictor_path):
        raise FileNotFoundError(f"ReCAM predictor weights not found: {predictor_path} (check {flag}; train_recam "
                                "writes them)")
    network = importlib.import_module("net.resnet50_cam")
    predictor = network.Class_Predictor(irn_family.NUM_CLASSES, model.classifier.weight.shape[1])
    try:  # a checkpoint never runs code: weights only
        state = torch.load(predictor_path, map_location="cpu", weights_only=True)
    except Exception as err:
        from lpcam_core.io import load_refusal

        raise ValueError(f"{flag} {predictor_path}: not a readable checkpoint ({load_refusal(err)})") from None
    predictor.load_state_dict(state)
    w_recam = predictor.classifier.weight.detach()  # [20, C, 1, 1]
    meta: dict[str, Any] = {"weights": os.path.abspath(backbone_path), "recam_predictor": os.path.abspath(predictor_path),
                            "recam_backbone": backbone, "recam_classifier": classifier}
    feature_model = model
    if backbone == "cam":
        cam_path = args.cam_weights_name + SPEC.weights_suffix
        feature_model = irn_family.load_model(args.cam_network, cam_path, flag="--cam_weights_name")
        meta["feature_weights"] = os.path.abspath(cam_path)
    score = None
    if classifier == "recam":
        score = (w_recam * model.classifier.weight.detach()).reshape(w_recam.shape[0], -1)
    return irn_family.IRNFamily(SPEC.name, args.cam_network, model, args.cam_scales, feature_model=feature_model,
                                score_weight=score, extra_weight=w_recam, meta=meta)


def _plan(ns: Any, settings: HostSettings) -> irn_family.IRNFamily:
    """``lpcam recam prototypes|make``: ReCAM's maps (``--recam-weight-dir``), or ``--plain-cam`` (``--weights``)."""
    args = argparse.Namespace(cam_network=ns.network, cam_scales=tuple(ns.scales),
                              cam_weights_name=os.path.abspath(ns.weights) if ns.weights else None,
                              recam_weight_dir=os.path.abspath(ns.recam_weight_dir) if ns.recam_weight_dir else None,
                              recam_num_epoches=ns.recam_epochs)
    if ns.plain_cam:
        if not ns.weights:
            raise ValueError("--plain-cam needs --weights (ReCAM's res50_cam.pth)")
        return irn_family.cam_host(args, SPEC, flag="--weights")
    if not ns.recam_weight_dir:
        raise ValueError("--recam-weight-dir is required for ReCAM maps (or pass --plain-cam)")
    return recam_host(args, settings, flag="--recam-weight-dir / --recam-epochs")


def _extra_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--recam-weight-dir", help="ReCAM's recam_weight dir (res50_recam_<N>.pth, recam_predictor_<N>.pth)")
    p.add_argument("--recam-epochs", type=int, default=4, help="N of those files: ReCAM's --recam_num_epoches "
                   "(default 4, ReCAM's own default)")
    p.add_argument("--plain-cam", action="store_true", help="make_cam's plain CAM model (--weights) instead of ReCAM's")


def _make_cam_run(original: Callable[[Any], Any], module: ModuleType) -> Callable[[Any], None]:
    def run(args: Any) -> None:
        """ReCAM's make_cam pass with LPCAM maps (see lpcam_adapters.recam)."""
        irn_family.make_cam_pass(args, SPEC, lambda a, s: irn_family.cam_host(a, SPEC), original,
                                 recam_settings())

    return run


def _make_recam_run(original: Callable[[Any], Any], module: ModuleType) -> Callable[[Any], None]:
    def run(args: Any) -> None:
        """ReCAM's make_recam pass with LPCAM maps (see lpcam_adapters.recam)."""
        irn_family.make_cam_pass(args, SPEC, recam_host, original, recam_settings(), tag="recam")

    return run


def install() -> None:
    """Register ReCAM's patches (idempotent; runs at import)."""
    irn_family.compat.register_irn_family()
    hooks.replace_attribute(
        "step.make_cam", "run", _make_cam_run, requires=("_work",), replace=True,
        description="LPCAM pass on the plain CAM (LPCAM=0: ReCAM's own maps; 0 GPU: in-process)",
    )
    hooks.replace_attribute(
        "step.make_recam", "run", _make_recam_run, requires=("_work",), replace=True,
        description="LPCAM pass on ReCAM: baseline = ReCAM maps, prototypes scored by LPCAM_CLASSIFIER "
        "(LPCAM=0: ReCAM's own maps; 0 GPU: in-process)",
    )


def register(subparsers: Any) -> None:
    """``lpcam recam ...`` (entry point ``lpcam.hosts``)."""
    from .cli import add_host_group
    from .trial import add_try

    def steps(sub: Any) -> None:
        irn_family.add_steps(sub, INFO, _plan, weights_required=False, extra=_extra_flags,
                             weights_help="CAM checkpoint file (ReCAM's res50_cam.pth), with --plain-cam")
        add_try(sub, INFO)

    add_host_group(subparsers, INFO, steps)


recam_settings()  # a malformed LPCAM_* variable fails here, at import, not hours later
install()

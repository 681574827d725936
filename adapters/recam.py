"""``import lpcam_adapters.recam`` as the first line of ReCAM's ``run_sample.py`` swaps CAM for LPCAM.

ReCAM (https://github.com/zhaozhengChen/ReCAM, MIT) keeps IRN's pipeline and adds
``step.make_recam``, whose maps come from ``CAM.forward2(x, W_recam)`` (classifier
``W_recam * W_cls``) of the ReCAM-finetuned backbone ``res50_recam_<N>.pth``. The import
registers, through the import hook and without importing any ReCAM module:

* ``step.make_cam:run``: the LPCAM pass on the plain CAM (checkpoint ``cam_weights_name``,
  loaded as is: ReCAM adds no ``.pth``), as for IRN;
* ``step.make_recam:run``: the LPCAM pass on ReCAM: baseline = ReCAM's own maps (into
  ``<cam_out_dir>_recam_baseline``), features of the backbone chosen by ``LPCAM_BACKBONE``
  (``recam``, default, or ``cam``), prototypes scored by the classifier chosen by
  ``LPCAM_CLASSIFIER`` (``cls`` = W_cls of that backbone, default, or ``recam`` = W_recam * W_cls), bank
  ``<work_space>/lpcam_bank_recam.pt``;
* the modern-stack shims of :mod:`lpcam_adapters._compat`.

The default classifier is chosen by measurement on a proxy (ReCAM + LPCAM was never published,
and no VOC run was possible here): ``benchmarks/recam_choices.py`` reproduces ReCAM's training
stage on the demo's small CNN and synthetic data. Over 3 seeds, ``W_recam * W_cls`` kept only 6 of
72 class centres above mu_f = 0.9 (its softmax is flatter than the ``W_cls`` the thresholds were
set for) and gave 7 to 13 mIoU less than ``W_cls`` on average, less on every seed; the ReCAM and
CAM backbones tied within noise. ``benchmarks/recam.py`` measures the choices on VOC.
"""

from __future__ import annotations

import importlib
import os
from types import ModuleType
from typing import Any, Callable

import torch

from . import _compat, _hooks, _irn_family

__all__ = ["HOST", "install", "recam_plan"]

HOST = _irn_family.HostSpec(name="recam", weights_suffix="", thresholds=(0.21, 0.35, 0.10, 0.28))


def recam_weights(args: Any) -> tuple[str, str]:
    """(backbone, Class_Predictor) checkpoints that ReCAM's make_recam loads."""
    epochs = str(args.recam_num_epoches)
    return (
        os.path.join(args.recam_weight_dir, f"res50_recam_{epochs}.pth"),
        os.path.join(args.recam_weight_dir, f"recam_predictor_{epochs}.pth"),
    )


def recam_plan(args: Any, settings: _irn_family.AdapterSettings) -> _irn_family.PassPlan:
    """Models and weights of a make_recam pass (see the module docstring for the choices)."""
    backbone_path, predictor_path = recam_weights(args)
    model = _irn_family.load_model(args.cam_network, backbone_path)
    if not os.path.isfile(predictor_path):
        raise FileNotFoundError(f"ReCAM predictor weights not found: {predictor_path} (run train_recam first)")
    network = importlib.import_module("net.resnet50_cam")
    predictor = network.Class_Predictor(_irn_family.NUM_CLASSES, model.classifier.weight.shape[1])
    predictor.load_state_dict(torch.load(predictor_path, map_location="cpu"))
    w_recam = predictor.classifier.weight.detach()  # [20, C, 1, 1]
    meta: dict[str, Any] = {
        "weights": os.path.abspath(backbone_path),
        "recam_predictor": os.path.abspath(predictor_path),
        "recam_backbone": settings.backbone,
        "recam_classifier": settings.classifier,
    }
    if settings.backbone == "cam":
        cam_path = _irn_family.weights_path(args, HOST)
        feature_model = _irn_family.load_model(args.cam_network, cam_path)
        meta["feature_weights"] = os.path.abspath(cam_path)
    else:
        feature_model = model
    if settings.classifier == "recam":
        score = (w_recam * model.classifier.weight.detach()).reshape(w_recam.shape[0], -1)
    else:
        score = _irn_family.classifier_weight(feature_model)
    return _irn_family.PassPlan(model, w_recam, feature_model, score, "recam", meta)


def _make_cam_run(original: Callable[[Any], Any], module: ModuleType) -> Callable[[Any], None]:
    def run(args: Any) -> None:
        """ReCAM's make_cam pass with LPCAM maps (see lpcam_adapters.recam)."""
        _irn_family.make_cam_pass(args, HOST, _irn_family.cam_plan(HOST), original)

    return run


def _make_recam_run(original: Callable[[Any], Any], module: ModuleType) -> Callable[[Any], None]:
    def run(args: Any) -> None:
        """ReCAM's make_recam pass with LPCAM maps (see lpcam_adapters.recam)."""
        _irn_family.make_cam_pass(args, HOST, recam_plan, original)

    return run


def install() -> None:
    """Register ReCAM's patches (idempotent; runs at import)."""
    _compat.register_irn_family()
    _hooks.replace_attribute(
        "step.make_cam",
        "run",
        _make_cam_run,
        requires=("_work",),
        replace=True,  # the adapter imported last wins (the CLI imports several)
        description="LPCAM pass on the plain CAM (LPCAM=0: ReCAM's own maps; 0 GPU: in-process)",
    )
    _hooks.replace_attribute(
        "step.make_recam",
        "run",
        _make_recam_run,
        requires=("_work",),
        replace=True,  # the adapter imported last wins (the CLI imports several)
        description="LPCAM pass on ReCAM: baseline = ReCAM maps, prototypes scored by LPCAM_CLASSIFIER "
        "(LPCAM=0: ReCAM's own maps; 0 GPU: in-process)",
    )


install()

"""``lpcam amn ...``: explicit steps for AMN's stage (b), the patch, and ``--explain``.

Commands (:func:`register` adds them to the core CLI's sub-parsers):

* ``lpcam amn --explain``: the patches ``import lpcam_adapters.amn`` registers, and its settings;
* ``lpcam amn patch HOST_DIR [--revert] [--check]``: add (remove) the one import line;
* ``lpcam amn prototypes --host HOST --voc12-root VOC --weights W --ir-label-dir D --bank OUT``:
  AMN's own maps of the prototype list (Dropout off, missing files only; ``--split amn_cam``) and
  the stage-(b) prototype bank;
* ``lpcam amn make --host HOST --voc12-root VOC --weights W --bank B --out DIR``: LPCAM maps in
  AMN's stage-(b) format (``--baseline --ir-label-dir D``: AMN's own maps, Dropout off).

``--weights`` is the AMN checkpoint file itself (``sess/res50_amn.pth``: no suffix is appended).
Stage (a) is IRN's: use ``lpcam irn prototypes|make`` on AMN's checkout for it.
``prototypes`` and ``make`` also run under ``torchrun --nproc_per_node N -m lpcam_core.cli amn ...``
(sharded loops, the same bank and files as one process).
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import logging
import os
import sys
from importlib import resources
from pathlib import Path
from typing import Any

from . import _amn_choices as choices  # torch-free: building the parser must not import lpcam_adapters.amn
from ._cli import (
    _in_host,
    _parse_patch,
    add_make_options,
    add_patch_parser,
    add_process_options,
    add_prototypes_options,
    apply_hunks,
    read_dirs_of_make,
)

__all__ = ["register", "apply_amn_patch", "patch_text"]

logger = logging.getLogger(__name__)


# --------------------------------------------------------------------------- the patch


def patch_text() -> str:
    """The shipped ``patches/amn.patch``."""
    return resources.files("lpcam_adapters.patches").joinpath("amn.patch").read_text(encoding="utf-8")


def apply_amn_patch(host_dir: str | os.PathLike, *, revert: bool = False, check: bool = False) -> str:
    """Apply (or revert) ``patches/amn.patch`` to an AMN checkout (same rules as ``lpcam irn patch``).

    Returns:
        ``"applied"``, ``"already applied"``, ``"reverted"``, ``"not applied"``, prefixed with
        ``"would be "`` under ``check`` where something changes.

    Raises:
        FileNotFoundError: no ``run_sample.py``. ValueError: the file differs from what the patch expects.
    """
    target, hunks = _parse_patch(patch_text())
    path = Path(host_dir) / target
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: is {host_dir} an AMN (gaviotas/AMN) checkout?")
    return apply_hunks(path, hunks, "amn.patch", revert=revert, check=check)


# --------------------------------------------------------------------------- commands


def _settings(ns: argparse.Namespace) -> Any:
    from . import amn

    env = dict(os.environ)
    if ns.config:
        env["LPCAM_CONFIG"] = os.path.abspath(ns.config)
    settings = amn.amn_settings_from_env(env)
    base_changes: dict[str, Any] = {"enabled": True}
    for name in ("workers", "device"):
        if getattr(ns, name, None) is not None:
            base_changes[name] = getattr(ns, name)
    if getattr(ns, "rebuild", False):
        base_changes["rebuild_bank"] = True
    changes: dict[str, Any] = {"base": dataclasses.replace(settings.base, **base_changes), "stages": ("a", "b")}
    for name in ("features", "classifier", "softmax", "split", "background"):
        if getattr(ns, name, None) is not None:
            changes[name] = getattr(ns, name)
    return dataclasses.replace(settings, **changes)


def _list_path(value: str) -> str:
    return os.path.abspath(value) if os.path.exists(value) else value


def _model(ns: argparse.Namespace) -> Any:
    from . import _irn_family

    return _irn_family.load_model(ns.network, os.path.abspath(ns.weights))


def _cmd_prototypes(ns: argparse.Namespace) -> int:
    from . import _irn_family, amn

    if not ns.ir_label_dir:
        raise ValueError("--ir-label-dir is required: the stage-(a) ir_label PNGs split the pools or normalise AMN's maps")
    settings = _settings(ns)
    bank = os.path.abspath(ns.bank)
    baseline_dir = os.path.abspath(ns.baseline_dir) if ns.baseline_dir else os.path.splitext(bank)[0] + "_baseline"
    ir_label_dir = os.path.abspath(ns.ir_label_dir)
    plist = _list_path(ns.list)
    voc = os.path.abspath(ns.voc12_root)
    with _irn_family.torchrun_session(settings.base.workers) as ctx, _in_host(ns.host):
        importlib.import_module("lpcam_adapters.amn")
        model = _model(ns)
        loader = importlib.import_module("voc12.dataloader")
        single = loader.VOC12ClassificationDataset(plist, voc12_root=voc)
        meta = {"host": "amn", "stage": "b", "proto_list": ns.list, "num_proto_images": len(single),
                "weights": os.path.abspath(ns.weights)}
        msf = None
        if settings.split == "amn_cam":
            msf = loader.VOC12ClassificationDatasetMSF(plist, voc12_root=voc, scales=tuple(ns.scales))
        if ctx is None:
            if msf is not None:
                missing = _irn_family.missing_indices(msf, baseline_dir)
                if missing:
                    from torch.utils.data import Subset

                    amn.amn_baseline_pass(model, Subset(msf, missing), baseline_dir, ir_label_dir,
                                          skip_existing=True, workers=_irn_family.resolve_workers(settings.base),
                                          device=settings.base.device, num_workers=ns.loader_workers)
            result = amn.build_amn_bank(model, single, settings, baseline_dir=baseline_dir,
                                        ir_label_dir=ir_label_dir, bank_path=bank, device=settings.base.device,
                                        extra_meta=meta, num_workers=ns.loader_workers)
        else:  # torchrun: each rank computes its shard of the missing maps and of the features
            device = _irn_family.rank_device(ctx, settings.base.device)
            if msf is not None:
                missing_ids = _irn_family.missing_files(msf, baseline_dir)
                if missing_ids:
                    amn.sharded_amn_baseline_pass(model, msf, baseline_dir, ir_label_dir, device, ids=missing_ids,
                                                  num_workers=ns.loader_workers)
            result = amn.build_amn_bank_sharded(model, single, settings, device, baseline_dir=baseline_dir,
                                                ir_label_dir=ir_label_dir, bank_path=bank, extra_meta=meta,
                                                num_workers=ns.loader_workers)
    if ctx is None or ctx.is_main:
        logger.warning("bank %s: %r", bank, result)
    return 0


def _cmd_make(ns: argparse.Namespace) -> int:
    from . import _irn_family, amn

    settings = _settings(ns)
    if ns.baseline and not ns.ir_label_dir:
        raise ValueError("--baseline (AMN's own maps) needs --ir-label-dir (AMN normalises off its background)")
    if not ns.baseline and not ns.bank:
        raise ValueError("--bank is required for LPCAM maps (build one with `lpcam amn prototypes`)")
    plist = _list_path(ns.list)
    voc = os.path.abspath(ns.voc12_root)
    out = os.path.abspath(ns.out)
    read_dirs = read_dirs_of_make(ns, settings.baseline_dir)
    if ns.ir_label_dir:
        read_dirs.append(os.path.abspath(ns.ir_label_dir))
    from lpcam_core.io import check_output_dir

    check_output_dir(out, read_dirs=read_dirs)  # in every execution mode, before anything is loaded
    with _irn_family.torchrun_session(settings.base.workers) as ctx, _in_host(ns.host):
        importlib.import_module("lpcam_adapters.amn")
        model = _model(ns)
        loader = importlib.import_module("voc12.dataloader")
        msf = loader.VOC12ClassificationDatasetMSF(plist, voc12_root=voc, scales=tuple(ns.scales))
        workers = _irn_family.resolve_workers(settings.base)
        device = None if ctx is None else _irn_family.rank_device(ctx, settings.base.device)
        if ns.baseline:
            if ctx is None:
                amn.amn_baseline_pass(model, msf, out, os.path.abspath(ns.ir_label_dir), workers=workers,
                                      device=settings.base.device, num_workers=ns.loader_workers)
            else:
                amn.sharded_amn_baseline_pass(model, msf, out, os.path.abspath(ns.ir_label_dir), device,
                                              overwrite=ns.overwrite, num_workers=ns.loader_workers)
        else:
            from lpcam_core import PrototypeBank

            bank_path = os.path.abspath(ns.bank)
            bank = PrototypeBank.load(bank_path, num_classes=amn.NUM_CLASSES)
            choices = bank.meta.get("amn_choices") or {}
            if choices and choices.get("features") != settings.features:
                raise ValueError(f"{ns.bank} was built on {choices.get('features')} features, "
                                 f"not {settings.features}: pass the same --features")
            if bank.meta.get("amn_fingerprint") not in (None, amn._amn_fingerprint(model)):
                raise ValueError(f"{ns.bank} was built with another AMN checkpoint: "
                                 "rebuild it with `lpcam amn prototypes`")
            if ctx is None:
                amn.amn_lpcam_pass(model, msf, bank_path, out, settings, workers=workers,
                                   device=settings.base.device, num_workers=ns.loader_workers)
            else:
                amn.sharded_amn_lpcam_pass(model, msf, bank_path, out, settings, device, read_dirs=read_dirs,
                                           overwrite=ns.overwrite, num_workers=ns.loader_workers)
    if ctx is None or ctx.is_main:
        logger.warning("%s maps of %d images written to %s", "AMN" if ns.baseline else "LPCAM", len(msf), out)
        if not ns.baseline:
            logger.warning(amn.recommended_amn_thresholds())
    return 0


def _cmd_patch(ns: argparse.Namespace) -> int:
    status = apply_amn_patch(ns.host_dir, revert=ns.revert, check=ns.check)
    sys.stdout.write(f"{Path(ns.host_dir) / 'run_sample.py'}: {status}\n")
    return 0


def _cmd_explain(ns: argparse.Namespace) -> int:
    from . import amn

    sys.stdout.write("`import lpcam_adapters.amn` registers these patches (applied when AMN imports the module):\n\n"
                     + amn.explain() + "\n")
    return 0


def _common(p: argparse.ArgumentParser, *, bank_required: bool) -> None:
    p.add_argument("--host", required=True, help="AMN checkout (run from its root: voc12/cls_labels.npy is read there)")
    p.add_argument("--voc12-root", required=True, help="VOC2012 root holding JPEGImages/")
    p.add_argument("--weights", required=True, help="AMN checkpoint file (train_amn writes sess/res50_amn.pth)")
    p.add_argument("--bank", required=bank_required, help="stage-(b) prototype bank file")
    p.add_argument("--network", default="net.resnet50_amn", help="AMN network module (args.amn_network)")
    p.add_argument("--scales", type=float, nargs="+", default=[1.0, 0.5, 1.5, 2.0], help="inference scales")
    p.add_argument("--ir-label-dir", help="stage-(a) ir_label PNGs (AMN's --ir_label_out_dir)")
    p.add_argument("--config", help="YAML of LPCAM settings (as LPCAM_CONFIG; an `amn:` section holds the choices)")
    p.add_argument("--features", choices=choices.FEATURES, help="conditioned (default) or raw stage4 features")
    p.add_argument("--classifier", choices=choices.CLASSIFIERS, help="ASPP taps scoring the prototypes (default all_taps)")
    p.add_argument("--softmax", type=int, choices=choices.SOFTMAX_WAYS, help="20 (default) or 21-way scoring softmax")
    p.add_argument("--split", choices=choices.SPLITS, help="what splits the pools: amn_cam (default) or ir_label")
    p.add_argument("--background", choices=choices.BACKGROUNDS, help="channel 0 of the files (default one_minus_max)")
    add_process_options(p)


def register(subparsers: Any) -> None:
    """Add ``lpcam amn ...`` to the core CLI's sub-parsers."""
    hp = subparsers.add_parser("amn", help="LPCAM for AMN (gaviotas/AMN)",
                               description="LPCAM for AMN's stage (b): explicit steps, the patch, --explain.")
    hp.add_argument("--explain", action="store_true", help="list the patches and settings of the import")
    hp.set_defaults(func=_cmd_explain)
    sub = hp.add_subparsers(dest="host_command", metavar="STEP")

    add_patch_parser(sub, "amn", "run_sample.py", "AMN checkout", func=_cmd_patch)

    pr = sub.add_parser("prototypes", help="AMN's maps of the prototype list and the stage-(b) prototype bank")
    _common(pr, bank_required=True)
    add_prototypes_options(pr, baseline_dir_help="AMN's own maps of the list (default <bank>_baseline)")
    pr.set_defaults(func=_cmd_prototypes)

    mk = sub.add_parser("make", help="LPCAM maps (or --baseline AMN maps) in AMN's stage-(b) format")
    _common(mk, bank_required=False)
    add_make_options(mk, out_help="output directory (AMN's amn_cam_out_dir)",
                     baseline_help="AMN's own maps (Dropout off) instead of LPCAM")
    mk.set_defaults(func=_cmd_make)

"""``lpcam irn ...`` and ``lpcam recam ...``: explicit steps for the IRN-family hosts.

``lpcam_core.cli`` calls :func:`register` with its sub-parsers. Commands per host:

* ``lpcam irn --explain``: the patches the import applies and the settings it reads;
* ``lpcam irn patch HOST_DIR [--revert] [--check]``: add (remove) the one import line;
* ``lpcam irn prototypes --host HOST_DIR --voc12-root VOC --weights W --bank OUT``: the
  baseline CAM of the prototype list (missing files only) and the prototype bank;
* ``lpcam irn make --host HOST_DIR --voc12-root VOC --weights W --bank B --out DIR``: LPCAM maps
  (``--baseline``: the host's own CAM maps) of a list, in the host's file format.

``lpcam recam ...`` takes the same commands plus ``--recam-weight-dir``/``--recam-epochs``
(maps of make_recam's ReCAM model, the default) or ``--plain-cam`` (make_cam's model).

``prototypes`` and ``make`` also run under ``torchrun --nproc_per_node N -m lpcam_core.cli ...``:
the image loops are sharded over the ranks (:mod:`lpcam_core.distributed`, imported only then);
the bank and the files equal those of one process.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import logging
import os
import sys
from collections.abc import Iterator
from importlib import resources
from pathlib import Path
from typing import Any

__all__ = ["register", "apply_patch", "apply_hunks", "patch_text", "add_patch_parser", "add_process_options",
           "add_prototypes_options", "add_make_options", "read_dirs_of_make"]

logger = logging.getLogger(__name__)

_HOSTS = {"irn": "IRN (jiwoon-ahn/irn)", "recam": "ReCAM (zhaozhengChen/ReCAM)"}


# --------------------------------------------------------------------------- patches


def patch_text(host: str) -> str:
    """The shipped ``patches/<host>.patch``."""
    if host not in _HOSTS:
        raise ValueError(f"no patch for host {host!r}: expected one of {sorted(_HOSTS)}")
    return resources.files("lpcam_adapters.patches").joinpath(f"{host}.patch").read_text(encoding="utf-8")


def _parse_patch(text: str) -> tuple[str, list[tuple[int, list[str], list[str]]]]:
    """(target path, [(old start line, old lines, new lines)]) of a one-file unified diff."""
    target = None
    hunks: list[tuple[int, list[str], list[str]]] = []
    current: tuple[int, list[str], list[str]] | None = None
    for line in text.splitlines():
        if line.startswith("+++ "):
            target = line[4:].split("\t")[0].strip()
            target = target[2:] if target.startswith("b/") else target
        elif line.startswith("--- "):
            continue
        elif line.startswith("@@"):
            old = line.split()[1]  # -start[,count]
            current = (int(old[1:].split(",")[0]), [], [])
            hunks.append(current)
        elif current is not None and line[:1] in (" ", "+", "-"):
            body = line[1:]
            if line[0] in (" ", "-"):
                current[1].append(body)
            if line[0] in (" ", "+"):
                current[2].append(body)
    if target is None or not hunks:
        raise ValueError("not a one-file unified diff")
    return target, hunks


def _find(lines: list[str], block: list[str], hint: int) -> int | None:
    n = len(block)
    if lines[hint:hint + n] == block:
        return hint
    hits = [i for i in range(len(lines) - n + 1) if lines[i:i + n] == block]
    return hits[0] if len(hits) == 1 else None


def apply_patch(host_dir: str | os.PathLike, host: str, *, revert: bool = False, check: bool = False) -> str:
    """Apply (or revert) ``patches/<host>.patch`` to a host checkout.

    Args:
        host_dir: The host checkout (holding ``run_sample.py``).
        host: ``"irn"`` or ``"recam"``.
        revert: Remove the line instead.
        check: Only report what would happen.

    Returns:
        ``"applied"``, ``"already applied"``, ``"reverted"``, ``"not applied"`` (revert of an
        unpatched file), prefixed with ``"would be "`` under ``check`` where something changes.

    Raises:
        FileNotFoundError: no such file. ValueError: the file differs from what the patch expects.
    """
    target, hunks = _parse_patch(patch_text(host))
    path = Path(host_dir) / target
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: is {host_dir} a {_HOSTS[host]} checkout?")
    return apply_hunks(path, hunks, f"{host}.patch", revert=revert, check=check)


def apply_hunks(path: Path, hunks: list[tuple[int, list[str], list[str]]], patch_name: str, *,
                revert: bool = False, check: bool = False) -> str:
    """Apply (or revert) parsed hunks to ``path``; the status strings of :func:`apply_patch`."""
    raw = path.read_text(encoding="utf-8")
    newline = "\r\n" if "\r\n" in raw else "\n"
    lines = raw.splitlines()
    changed = False
    for start, old, new in reversed(hunks):
        at_new = _find(lines, new, start - 1)
        if at_new is not None:  # the patched text is there
            if revert:
                lines[at_new:at_new + len(new)] = old
                changed = True
            continue
        at_old = _find(lines, old, start - 1)
        if at_old is None:
            added = next((line for line in new if line not in old), "")
            raise ValueError(f"{path}: does not match {patch_name} near line {start}; "
                             f"edit it by hand: the patch adds `{added}` as the first line")
        if not revert:
            lines[at_old:at_old + len(old)] = new
            changed = True
    if not changed:
        return "not applied" if revert else "already applied"
    status = "reverted" if revert else "applied"
    if check:
        return f"would be {status}"
    path.write_text(newline.join(lines) + (newline if raw.endswith(("\n", "\r")) else ""), encoding="utf-8")
    return status


# --------------------------------------------------------------------------- running host code


@contextlib.contextmanager
def _in_host(host_dir: str) -> Iterator[Path]:
    """cwd = host root and on sys.path (the hosts import ``voc12``, ``net``... from there)."""
    root = Path(host_dir).resolve()
    if not (root / "voc12" / "dataloader.py").is_file():
        raise FileNotFoundError(f"{root} is not an IRN-family checkout (no voc12/dataloader.py)")
    old = os.getcwd()
    sys.path.insert(0, str(root))
    os.chdir(root)
    try:
        yield root
    finally:
        os.chdir(old)
        with contextlib.suppress(ValueError):
            sys.path.remove(str(root))


def _abs(path: str | None) -> str | None:
    return None if path is None else os.path.abspath(os.path.expanduser(path))


def _settings(ns: argparse.Namespace) -> Any:
    import dataclasses

    from . import _irn_family

    env = dict(os.environ)
    if ns.config:
        env["LPCAM_CONFIG"] = _abs(ns.config)  # type: ignore[assignment]
    settings = _irn_family.settings_from_env(env)
    changes: dict[str, Any] = {"enabled": True}
    for name in ("workers", "device", "baseline_dir"):
        value = getattr(ns, name, None)
        if value is not None:
            changes[name] = value
    if getattr(ns, "rebuild", False):
        changes["rebuild_bank"] = True
    for name in ("classifier", "backbone"):
        if getattr(ns, name, None):
            changes[name] = getattr(ns, name)
    return dataclasses.replace(settings, **changes)


def _host_args(ns: argparse.Namespace, host: str) -> argparse.Namespace:
    """The host's ``args`` as its make_cam/make_recam step reads them."""
    weights = _abs(ns.weights)
    args = argparse.Namespace(
        voc12_root=_abs(ns.voc12_root),
        cam_network=ns.network,
        cam_scales=tuple(ns.scales),
        num_workers=ns.loader_workers,
        cam_out_dir=_abs(getattr(ns, "out", None) or os.path.dirname(_abs(ns.bank) or weights or ".")),
        cam_weights_name=weights,
    )
    if host == "recam":
        args.recam_weight_dir = _abs(ns.recam_weight_dir)
        args.recam_num_epoches = ns.recam_epochs
    return args


def _plan(ns: argparse.Namespace, host: str) -> tuple[Any, Any]:
    from . import _irn_family

    if host == "irn":
        from . import irn

        # The CLI takes the checkpoint file itself: no suffix is appended.
        return irn.HOST, _irn_family.cam_plan(_irn_family.HostSpec("irn", "", irn.HOST.thresholds))
    from . import recam

    if ns.plain_cam:
        return recam.HOST, _irn_family.cam_plan(recam.HOST)
    if not ns.recam_weight_dir:
        raise ValueError("--recam-weight-dir is required for ReCAM maps (or pass --plain-cam)")
    return recam.HOST, recam.recam_plan


def _cmd_prototypes(ns: argparse.Namespace) -> int:
    from . import _irn_family

    host = ns.host_name
    args = _host_args(ns, host)
    settings = _settings(ns)
    bank = _abs(ns.bank)
    baseline_dir = _abs(ns.baseline_dir) or os.path.splitext(bank)[0] + "_baseline"  # type: ignore[arg-type]
    plist = _abs(ns.list) if ns.list and os.path.exists(ns.list) else ns.list
    with _irn_family.torchrun_session(settings.workers) as ctx, _in_host(ns.host):
        _load_host_compat(host)
        spec, plan_fn = _plan(ns, host)
        plan = plan_fn(args, settings)
        loader = importlib.import_module("voc12.dataloader")
        record = {
            "network": args.cam_network,
            "model": _irn_family.model_fingerprint(plan.cam_model, plan.extra_weight),
            "scales": [float(x) for x in args.cam_scales],
        }
        msf = loader.VOC12ClassificationDatasetMSF(plist, voc12_root=args.voc12_root, scales=args.cam_scales)
        single = loader.VOC12ClassificationDataset(plist, voc12_root=args.voc12_root)
        meta = {"host": spec.name, "proto_list": ns.list, "num_proto_images": len(single), **plan.meta}
        if ctx is None:
            _irn_family.check_baseline_record(baseline_dir, record)
            missing = _irn_family.missing_indices(msf, baseline_dir)
            if missing:
                from torch.utils.data import Subset

                _irn_family.baseline_pass(plan.cam_model, Subset(msf, missing), baseline_dir,
                                          extra_weight=plan.extra_weight, skip_existing=True,
                                          workers=_irn_family.resolve_workers(settings), device=settings.device,
                                          num_workers=ns.loader_workers)
            result = _irn_family.build_bank(plan.feature_model, single, baseline_dir, settings, plan.score_weight,
                                            bank_path=bank, device=settings.device, extra_meta=meta,
                                            num_workers=ns.loader_workers)
        else:  # torchrun: each rank computes its shard of the missing baselines and of the features
            device = _irn_family.rank_device(ctx, settings.device)
            _irn_family.check_baseline_record_once(baseline_dir, record)
            missing_ids = _irn_family.missing_files(msf, baseline_dir)
            if missing_ids:
                _irn_family.sharded_baseline_pass(plan.cam_model, msf, baseline_dir, device,
                                                  extra_weight=plan.extra_weight, ids=missing_ids,
                                                  num_workers=ns.loader_workers)
            result = _irn_family.build_bank_sharded(plan.feature_model, single, baseline_dir, settings,
                                                    plan.score_weight, device, bank_path=bank, extra_meta=meta,
                                                    num_workers=ns.loader_workers)
    if ctx is None or ctx.is_main:
        logger.info("bank %s: %r", bank, result)
    return 0


def _cmd_make(ns: argparse.Namespace) -> int:
    from . import _irn_family

    host = ns.host_name
    args = _host_args(ns, host)
    settings = _settings(ns)
    if not ns.baseline and not ns.bank:
        raise ValueError("--bank is required for LPCAM maps (build one with `lpcam %s prototypes`)" % host)
    plist = _abs(ns.list) if ns.list and os.path.exists(ns.list) else ns.list
    out = _abs(ns.out)
    read_dirs = read_dirs_of_make(ns, settings.baseline_dir)
    from lpcam_core.io import check_output_dir

    check_output_dir(out, read_dirs=read_dirs)  # in every execution mode, before anything is loaded
    with _irn_family.torchrun_session(settings.workers) as ctx, _in_host(ns.host):
        _load_host_compat(host)
        spec, plan_fn = _plan(ns, host)
        plan = plan_fn(args, settings)
        loader = importlib.import_module("voc12.dataloader")
        msf = loader.VOC12ClassificationDatasetMSF(plist, voc12_root=args.voc12_root, scales=args.cam_scales)
        if not ns.baseline:
            from lpcam_core import PrototypeBank

            PrototypeBank.load(_abs(ns.bank), classifier_weight=plan.score_weight)  # fail early on a foreign bank
        if ctx is not None:  # torchrun: each rank writes its shard, complete files are kept
            device = _irn_family.rank_device(ctx, settings.device)
            if ns.baseline:
                _irn_family.sharded_baseline_pass(plan.cam_model, msf, out, device, extra_weight=plan.extra_weight,
                                                  overwrite=ns.overwrite, num_workers=ns.loader_workers)
            else:
                _irn_family.sharded_lpcam_pass(plan.feature_model, msf, _abs(ns.bank), out, device,
                                               read_dirs=read_dirs, overwrite=ns.overwrite,
                                               num_workers=ns.loader_workers)
        elif ns.baseline:
            _irn_family.baseline_pass(plan.cam_model, msf, out, extra_weight=plan.extra_weight,
                                      workers=_irn_family.resolve_workers(settings), device=settings.device,
                                      num_workers=ns.loader_workers)
        else:
            _irn_family.lpcam_pass(plan.feature_model, msf, _abs(ns.bank), out,
                                   workers=_irn_family.resolve_workers(settings), device=settings.device,
                                   num_workers=ns.loader_workers)
    if ctx is None or ctx.is_main:
        logger.info("%s maps of %d images written to %s", "baseline" if ns.baseline else "LPCAM", len(msf), out)
        if not ns.baseline:
            logger.info(_irn_family.recommended_thresholds(spec))
    return 0


def read_dirs_of_make(ns: argparse.Namespace, baseline_dir: str | None) -> list[str]:
    """What a ``make`` step reads and must never write into: the bank's baseline directory, the VOC
    root and its JPEGImages (the image root)."""
    voc = _abs(ns.voc12_root)
    dirs = [voc, os.path.join(voc, "JPEGImages")]
    if ns.bank:
        dirs.append(_abs(baseline_dir) or os.path.splitext(_abs(ns.bank))[0] + "_baseline")
    return dirs


def _load_host_compat(host: str) -> None:
    # The shims, and the host adapter's patches (harmless here: we call the drivers directly).
    importlib.import_module(f"lpcam_adapters.{host}")


def _cmd_patch(ns: argparse.Namespace) -> int:
    status = apply_patch(ns.host_dir, ns.host_name, revert=ns.revert, check=ns.check)
    target = Path(ns.host_dir) / "run_sample.py"
    sys.stdout.write(f"{target}: {status}\n")
    return 0


def _cmd_explain(ns: argparse.Namespace) -> int:
    from . import _hooks, _irn_family

    importlib.import_module(f"lpcam_adapters.{ns.host_name}")
    lines = [f"`import lpcam_adapters.{ns.host_name}` registers these patches (applied when the host imports the module):",
             "", _hooks.explain(), "", "settings (environment variables):"]
    lines += [f"  {var:<22} {doc}" for var, doc in _irn_family.ENV_VARS.items()]
    sys.stdout.write("\n".join(lines) + "\n")
    return 0


def _common(p: argparse.ArgumentParser, host: str, *, bank_required: bool) -> None:
    p.add_argument("--host", required=True, help="host checkout (run from its root: voc12/cls_labels.npy is read there)")
    p.add_argument("--voc12-root", required=True, help="VOC2012 root holding JPEGImages/")
    p.add_argument("--weights", required=host == "irn",
                   help="CAM checkpoint (IRN: sess/res50_cam.pth; ReCAM with --plain-cam: res50_cam.pth)")
    p.add_argument("--bank", required=bank_required, help="prototype bank file")
    p.add_argument("--network", default="net.resnet50_cam", help="host network module (args.cam_network)")
    p.add_argument("--scales", type=float, nargs="+", default=[1.0, 0.5, 1.5, 2.0], help="inference scales")
    p.add_argument("--config", help="YAML of LPCAM settings (as LPCAM_CONFIG)")
    add_process_options(p)
    if host == "recam":
        p.add_argument("--recam-weight-dir", help="ReCAM's recam_weight dir (res50_recam_<N>.pth, recam_predictor_<N>.pth)")
        p.add_argument("--recam-epochs", type=int, default=4, help="N of those files (args.recam_num_epoches)")
        p.add_argument("--plain-cam", action="store_true", help="make_cam's plain CAM model (--weights) instead of ReCAM's")
        p.add_argument("--classifier", choices=("recam", "cls"), help="classifier scoring the prototypes (default cls: W_cls; recam: W_recam * W_cls)")
        p.add_argument("--backbone", choices=("recam", "cam"), help="backbone giving the features")


def add_patch_parser(sub: Any, adapter: str, target: str, checkout: str, **defaults: Any) -> argparse.ArgumentParser:
    """The ``patch HOST_DIR [--revert] [--check]`` step adding ``import lpcam_adapters.<adapter>`` to ``target``."""
    pp = sub.add_parser("patch", help=f"add `import lpcam_adapters.{adapter}` to HOST_DIR/{target}")
    pp.add_argument("host_dir", help=checkout)
    pp.add_argument("--revert", action="store_true", help="remove the line")
    pp.add_argument("--check", action="store_true", help="only say what would change")
    pp.set_defaults(**defaults)
    return pp


def add_process_options(p: argparse.ArgumentParser) -> None:
    """``--workers``, ``--device``, ``--loader-workers`` of the ``prototypes`` and ``make`` steps."""
    p.add_argument("--workers", type=int, help="spawned processes (default: one per GPU; 0: in-process); "
                   "not with torchrun, which launches the processes itself")
    p.add_argument("--device", help="device for in-process work (under torchrun: default cuda:LOCAL_RANK, or CPU)")
    p.add_argument("--loader-workers", type=int, default=0, help="DataLoader workers per process")


def add_prototypes_options(p: argparse.ArgumentParser, *, baseline_dir_help: str) -> None:
    """``--list``, ``--baseline-dir``, ``--rebuild`` of a ``prototypes`` step."""
    p.add_argument("--list", default="voc12/train.txt", help="prototype image list (relative to --host)")
    p.add_argument("--baseline-dir", help=baseline_dir_help)
    p.add_argument("--rebuild", action="store_true", help="rebuild even when a matching bank exists")


def add_make_options(p: argparse.ArgumentParser, *, out_help: str, baseline_help: str) -> None:
    """``--list``, ``--out``, ``--baseline``, ``--overwrite`` of a ``make`` step."""
    p.add_argument("--list", default="voc12/train_aug.txt", help="image list (relative to --host)")
    p.add_argument("--out", required=True, help=out_help)
    p.add_argument("--baseline", action="store_true", help=baseline_help)
    p.add_argument("--overwrite", action="store_true",
                   help="under torchrun: recompute maps that already exist (default: keep complete files, so a "
                        "restarted job resumes; a directory another checkpoint or bank filled is refused, see "
                        "<out>/lpcam_maps.json); without torchrun every map is written anyway")


def register(subparsers: Any) -> None:
    """Add ``lpcam irn ...`` and ``lpcam recam ...`` to the core CLI's sub-parsers."""
    for host, title in _HOSTS.items():
        hp = subparsers.add_parser(host, help=f"LPCAM for {title}",
                                   description=f"LPCAM for {title}: explicit steps, the patch, --explain.")
        hp.add_argument("--explain", action="store_true", help="list the patches and settings of the import")
        hp.set_defaults(func=_cmd_explain, host_name=host)
        sub = hp.add_subparsers(dest="host_command", metavar="STEP")

        add_patch_parser(sub, host, "run_sample.py", "host checkout", func=_cmd_patch, host_name=host)

        pr = sub.add_parser("prototypes", help="baseline CAM of the prototype list and the prototype bank")
        _common(pr, host, bank_required=True)
        add_prototypes_options(pr, baseline_dir_help="baseline CAM directory (default <bank>_baseline)")
        pr.set_defaults(func=_cmd_prototypes, host_name=host)

        mk = sub.add_parser("make", help="LPCAM maps (or --baseline CAM maps) in the host's file format")
        _common(mk, host, bank_required=False)
        add_make_options(mk, out_help="output directory (the host's cam_out_dir)",
                         baseline_help="the host's own CAM maps instead of LPCAM")
        mk.set_defaults(func=_cmd_make, host_name=host)

    # [AMN adapter] `lpcam amn ...` lives in lpcam_adapters._cli_amn (added by the AMN engineer).
    from . import _cli_amn

    _cli_amn.register(subparsers)

"""``lpcam mctformer ...``: explicit steps for MCTformer (V2 at c5db727, MCTformer+ at HEAD).

The lead's CLI calls :func:`register` with its sub-parsers. Commands:

* ``lpcam mctformer --explain``: the patches the import applies and the settings it reads;
* ``lpcam mctformer patch HOST_DIR [--revert] [--check]``: add (remove) the one import line at the
  top of ``HOST_DIR/main.py`` (``patches/mctformer.patch``);
* ``lpcam mctformer prototypes --host HOST_DIR [options] -- <main.py arguments>``: the host's own
  baseline maps of the prototype list (missing files only) and the prototype bank, then stop;
* ``lpcam mctformer make --host HOST_DIR [options] -- <main.py arguments>``: the host's
  attention-map generation with LPCAM (the bank is built first when missing; ``--off``: the
  host's own maps).

``prototypes`` and ``make`` run the host's unmodified ``main.py`` in this process (the working
directory must be where the host finds ``voc12/cls_labels.npy``, usually the host root), with
``--gen_attention_maps`` added when missing. Options become the ``LPCAM_*`` variables of
:data:`lpcam_adapters.mctformer.ENV_VARS`.

Example:
    lpcam mctformer make --host . --tau 0.1 -- --model deit_small_MCTformerV2_patch16_224 \\
        --data-set VOC12MS --scales 1.0 0.5 1.5 --img-list voc12 --data-path VOC2012 \\
        --resume checkpoint.pth --visualize-cls-attn --patch-attn-refine --cam-npy-dir cam-npy
"""

from __future__ import annotations

import argparse
import os
from importlib import resources
from pathlib import Path
from typing import Any

from ._cli import add_patch_parser

__all__ = ["register", "patch_text", "apply_patch", "main_args"]

_PATCH = "mctformer.patch"


# --------------------------------------------------------------------------- the patch


def patch_text() -> str:
    """The shipped ``patches/mctformer.patch``."""
    return resources.files("lpcam_adapters.patches").joinpath(_PATCH).read_text(encoding="utf-8")


def _patch_lines(text: str) -> tuple[str, list[str], list[str]]:
    """(target file, old lines, new lines) of the one-hunk, one-file diff."""
    target, old, new = None, [], []
    for line in text.splitlines():
        if line.startswith("+++ "):
            target = line[4:].split("\t")[0].strip()
            target = target[2:] if target.startswith("b/") else target
        elif line.startswith(("--- ", "@@")):
            continue
        elif line[:1] in (" ", "-"):
            old.append(line[1:])
            if line[0] == " ":
                new.append(line[1:])
        elif line[:1] == "+":
            new.append(line[1:])
    if target is None or not new:
        raise ValueError(f"{_PATCH} is not a one-file unified diff")
    return target, old, new


def apply_patch(host_dir: str | os.PathLike, *, revert: bool = False, check: bool = False) -> str:
    """Add (or remove) ``import lpcam_adapters.mctformer`` at the top of the host's ``main.py``.

    Returns:
        ``"applied"``, ``"already applied"``, ``"reverted"`` or ``"not applied"``; with ``check``
        a change is reported as ``"would be applied"`` / ``"would be reverted"`` and not made.

    Raises:
        FileNotFoundError: no ``main.py``. ValueError: ``main.py`` does not start as the patch expects.
    """
    target, old, new = _patch_lines(patch_text())
    path = Path(host_dir) / target
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: is {host_dir} an MCTformer checkout?")
    raw = path.read_text(encoding="utf-8")
    newline = "\r\n" if "\r\n" in raw else "\n"
    lines = raw.splitlines()
    if lines[: len(new)] == new:
        if not revert:
            return "already applied"
        lines[: len(new)] = old
        status = "reverted"
    elif lines[: len(old)] == old:
        if revert:
            return "not applied"
        lines[: len(old)] = new
        status = "applied"
    else:
        added = next(line for line in new if line not in old)
        raise ValueError(f"{path} does not start as {_PATCH} expects ({old[0]!r}): add `{added}` as its first line by hand")
    if check:
        return f"would be {status}"
    path.write_text(newline.join(lines) + (newline if raw.endswith(("\n", "\r")) else ""), encoding="utf-8")
    return status


# --------------------------------------------------------------------------- commands


def main_args(rest: list[str]) -> list[str]:
    """``main.py`` arguments after ``--``, with ``--gen_attention_maps`` added when missing."""
    argv = list(rest)
    if argv[:1] == ["--"]:
        argv = argv[1:]
    if "--gen_attention_maps" not in argv:
        argv.append("--gen_attention_maps")
    return argv


def _env(args: argparse.Namespace) -> dict[str, str]:
    env: dict[str, str] = {}
    for option, var in (("bank", "LPCAM_BANK"), ("config", "LPCAM_CONFIG"), ("preset", "LPCAM_PRESET"),
                        ("tau", "LPCAM_TAU"), ("k", "LPCAM_K"), ("mu", "LPCAM_MU"), ("seed", "LPCAM_SEED"),
                        ("memory_gb", "LPCAM_MEMORY_GB"), ("head", "LPCAM_HEAD"), ("proto_list", "LPCAM_PROTO_LIST"),
                        ("baseline_dir", "LPCAM_BASELINE_DIR"), ("flip", "LPCAM_FLIP")):
        value = getattr(args, option, None)
        if value is not None:
            env[var] = str(value)
    if getattr(args, "rebuild", False):
        env["LPCAM_REBUILD_BANK"] = "1"
    return env


def _run(args: argparse.Namespace, env: dict[str, str]) -> int:
    from . import mctformer

    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        raise ValueError(
            f"`lpcam mctformer {args.host_command}` does not run under torchrun (this process is rank "
            f"{os.environ['RANK']} of {os.environ['WORLD_SIZE']}): MCTformer's main.py runs as is, in one "
            "process; launch it with one process, without torchrun (`lpcam mctformer ...`)"
        )
    if not args.rest:
        raise ValueError("give MCTformer's main.py arguments after `--` (model, data, --resume, ...)")
    mctformer.run_host_main(args.host, main_args(args.rest), environ=env)
    return 0


def _cmd_prototypes(args: argparse.Namespace) -> int:
    return _run(args, {**_env(args), "LPCAM": "1", "LPCAM_BUILD": "only"})


def _cmd_make(args: argparse.Namespace) -> int:
    env = _env(args)
    if args.off:
        env["LPCAM"] = "0"
    else:
        env["LPCAM"] = "1"
        env["LPCAM_BUILD"] = args.build
    return _run(args, env)


def _cmd_patch(args: argparse.Namespace) -> int:
    print(f"{Path(args.host_dir) / 'main.py'}: {apply_patch(args.host_dir, revert=args.revert, check=args.check)}")
    return 0


def _cmd_explain(args: argparse.Namespace) -> int:
    if not getattr(args, "explain", False):
        args.parser.print_help()
        return 2
    from . import mctformer

    print(mctformer.explain())
    return 0


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--host", required=True, help="MCTformer checkout (its main.py runs unmodified)")
    p.add_argument("--bank", help="prototype bank file (default <checkpoint>.lpcam_bank.pt)")
    p.add_argument("--config", help="YAML settings (LPCAMConfig keys; adapter keys under `adapter:`)")
    p.add_argument("--preset", choices=("voc", "coco"), help="the paper's hyper-parameters (default from --data-set)")
    p.add_argument("--tau", type=float, help="threshold on the min-max normalised baseline maps")
    p.add_argument("--k", type=int, help="clusters per pool")
    p.add_argument("--mu", type=float, help="mu_f and mu_b")
    p.add_argument("--seed", type=int)
    p.add_argument("--memory-gb", type=float, help="memory budget of the feature pools")
    p.add_argument("--head", choices=("sum", "centre"), help="classifier scoring the prototypes (default sum)")
    p.add_argument("--proto-list", help="ids clustered for prototypes (default <img-list>/train_id.txt)")
    p.add_argument("--baseline-dir", help="baseline maps of the prototype list (default <cam-npy-dir>_baseline)")
    p.add_argument("--rebuild", action="store_true", help="rebuild the bank even when a matching one exists")
    p.add_argument("rest", nargs=argparse.REMAINDER, help="-- then MCTformer's main.py arguments")


def register(subparsers: Any) -> None:
    """Add ``lpcam mctformer ...`` to the core CLI's sub-parsers."""
    hp = subparsers.add_parser("mctformer", help="LPCAM for MCTformer V2 / MCTformer+ (xulianuwa/MCTformer)",
                               description="LPCAM in place of MCTformer's PatchCAM: the patch, explicit steps, --explain.")
    hp.add_argument("--explain", action="store_true", help="list the patches and settings of the import")
    hp.set_defaults(func=_cmd_explain, parser=hp)
    sub = hp.add_subparsers(dest="host_command", metavar="STEP")

    add_patch_parser(sub, "mctformer", "main.py", "MCTformer checkout", func=_cmd_patch)

    pr = sub.add_parser("prototypes", help="baseline maps of the prototype list and the prototype bank, then stop")
    _common(pr)
    pr.set_defaults(func=_cmd_prototypes)

    mk = sub.add_parser("make", help="MCTformer's attention-map generation with LPCAM (builds a missing bank)")
    _common(mk)
    mk.add_argument("--flip", choices=("view", "feature"), help="per-view LPCAM (default) or feature-level flip fusion")
    mk.add_argument("--build", choices=("auto", "never"), default="auto", help="build a missing bank (default) or fail")
    mk.add_argument("--off", action="store_true", help="the host's own maps (LPCAM=0)")
    mk.set_defaults(func=_cmd_make)

"""``lpcam <host> ...``: the command groups every host shares, built without importing torch.

Each host module adds its group with :func:`add_host_group` (its ``register`` function, found by the
core CLI through the ``lpcam.hosts`` entry points). Every group has:

* ``lpcam <host> --explain``: the patches the import line applies and the settings it reads;
* ``lpcam <host> patch HOST_DIR [--revert] [--check]``: add (remove) the one import line
  (:func:`patch_entry_script`: the checkout is recognised by its files, the file's bytes and line
  endings are kept, any lpcam import line is recognised, a symlinked script is refused);
* the host's own steps (``prototypes``, ``make``, ``try``, ...).
"""

from __future__ import annotations

import argparse
import importlib
import os
import re
import sys
from collections.abc import Callable, Sequence
from importlib import resources
from pathlib import Path
from typing import Any

from .base import HostInfo
from .settings import env_docs

__all__ = [
    "add_host_group",
    "patch_text",
    "patch_line",
    "patch_entry_script",
    "check_checkout",
    "explain_text",
    "add_settings_flags",
    "settings_env",
    "run_host_script",
    "script_flags",
    "SETTINGS_FLAGS",
    "IMPORT_LINE",
]

#: Any lpcam import line, whatever its comment: ``import lpcam_adapters.<name>`` or ``from lpcam_adapters import``.
IMPORT_LINE = re.compile(rb"^[ \t]*(?:import[ \t]+lpcam_adapters\.(\w+)|from[ \t]+lpcam_adapters(?:\.(\w+))?[ \t]+import\b)")
#: Any import statement that names lpcam_adapters anywhere (``import os, lpcam_adapters.amn``, ``import sys; import ...``).
MENTIONS = re.compile(rb"^[ \t]*(?:import|from)[ \t][^#\r\n]*\blpcam_adapters\b")


def imported_adapters(line: bytes) -> set[str]:
    """The adapter modules an import line names (``''`` for a bare ``from lpcam_adapters import x``)."""
    names = {m.decode() for m in re.findall(rb"lpcam_adapters\.(\w+)", line)}
    for group in re.findall(rb"from[ \t]+lpcam_adapters[ \t]+import[ \t]+([\w, \t()]+)", line):
        names |= {n.strip().decode() for n in group.replace(b"(", b"").replace(b")", b"").split(b",") if n.strip()}
    return names or {""}


def statement_lines(text: bytes, path: Path) -> tuple[set[int], set[int]]:
    """0-based indices of the lines where the script's top-level statements start, and where any statement
    starts (lines inside a docstring or a string are neither)."""
    import ast

    try:
        tree = ast.parse(text)
    except (SyntaxError, ValueError) as err:
        raise ValueError(f"{path} is not a Python 3 script lpcam can read ({type(err).__name__}: {err})") from None
    return {node.lineno - 1 for node in tree.body}, {n.lineno - 1 for n in ast.walk(tree) if isinstance(n, ast.stmt)}


def patch_text(info: HostInfo) -> str:
    """The shipped ``patches/<host>.patch``."""
    return resources.files("lpcam_adapters.patches").joinpath(f"{info.name}.patch").read_text(encoding="utf-8")


def patch_line(info: HostInfo) -> tuple[str, str]:
    """(the line the patch adds, the host line it goes before) of the shipped patch."""
    added, anchor = None, None
    for line in patch_text(info).splitlines():
        if line.startswith("+") and not line.startswith("+++"):
            added = line[1:]
        elif line.startswith(" ") and added is not None and anchor is None:
            anchor = line[1:]
    if added is None or anchor is None:
        raise ValueError(f"patches/{info.name}.patch: expected one added line followed by a context line")
    return added, anchor


def scale_value(text: str) -> float:
    """argparse type of an inference scale: a finite number in (0, 16]."""
    import math

    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text[:40]!r} is not a number") from None
    if not (math.isfinite(value) and 0 < value <= 16):
        raise argparse.ArgumentTypeError(f"{text[:40]!r}: expected a scale in (0, 16]")
    return value


def count_value(text: str) -> int:
    """argparse type of a count: an int >= 0."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text[:40]!r} is not an int") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"{value}: expected an int >= 0")
    return value


def check_checkout(host_dir: str | os.PathLike, info: HostInfo) -> Path:
    """The checkout ``host_dir`` when its files say it is ``info``'s host, else ``ValueError`` naming what is missing."""
    root = Path(host_dir)
    if not root.is_dir():
        what = "not a directory" if root.exists() else "no such directory"
        raise FileNotFoundError(f"{root}: {what} (expected a {info.title} checkout)")
    for rel, text in info.signature.items():
        path = root / rel
        if not path.is_file():
            raise ValueError(f"{root} is not a {info.title} checkout: it has no {rel}")
        try:  # a FIFO or device never blocks the check: only regular files are read
            found = text in path.read_text(encoding="utf-8", errors="replace")
        except OSError:
            found = False
        if not found:
            raise ValueError(f"{root} is not a {info.title} checkout: {rel} does not contain {text!r}")
    for rel, other in info.foreign.items():
        if (root / rel).exists():
            raise ValueError(f"{root} is a checkout of another host ({other}: it has {rel}); use `lpcam {other} patch`")
    return root


def patch_entry_script(host_dir: str | os.PathLike, info: HostInfo, *, revert: bool = False, check: bool = False) -> str:
    """Add (or remove) ``import lpcam_adapters.<host>`` in the host's entry script.

    The checkout must hold the host's files (:data:`HostInfo.signature`). The line goes right before the
    first line equal to the patch's context line; every other byte of the file, line endings included,
    is kept, so revert gives back the file byte for byte. Any lpcam import line counts as the patch,
    whatever its comment; another adapter's line is refused. A symlinked script is refused.

    Returns:
        ``"applied"``, ``"already applied"``, ``"reverted"``, ``"not applied"``; under ``check`` a change
        is reported as ``"would be applied"`` / ``"would be reverted"`` and not made.

    Raises:
        FileNotFoundError: no checkout or no entry script. ValueError: not this host's checkout, a symlink,
        another adapter's line, or no line to put the import before.
    """
    root = check_checkout(host_dir, info)
    path = root / info.entry_script
    if path.is_symlink():
        raise ValueError(f"{path} is a symlink (to {os.readlink(path)}): patch the file it points to, not the link")
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: is {host_dir} a {info.title} checkout?")
    added, anchor = patch_line(info)
    module = info.module.rsplit(".", 1)[1]
    raw = path.read_bytes()
    lines = raw.splitlines(keepends=True)
    starts, statements = statement_lines(raw, path)
    ours = []
    for i, line in enumerate(lines):
        if not MENTIONS.match(line) or i not in statements:
            continue
        names = imported_adapters(line)
        if names != {module}:
            other = sorted(names - {module}) or [""]
            raise ValueError(f"{path} already imports lpcam_adapters.{other[0] or '...'} (line {i + 1}): only one "
                             f"adapter per host; remove that import first")
        ours.append(i)
    if ours:
        if not revert:
            return "already applied"
        mixed = [i + 1 for i in ours if not IMPORT_LINE.match(lines[i])]
        if mixed:
            raise ValueError(f"{path}: line {mixed[0]} imports lpcam_adapters.{module} together with other code; "
                             "edit that line by hand")
        new = b"".join(line for i, line in enumerate(lines) if i not in ours)
        status = "reverted"
    else:
        if revert:
            return "not applied"
        at = next((i for i, line in enumerate(lines) if line.rstrip(b"\r\n") == anchor.encode() and i in starts), None)
        if at is None:
            raise ValueError(f"{path}: no line {anchor!r} to put the import before; add `{added}` as its first "
                             "line by hand")
        ending = lines[at][len(lines[at].rstrip(b"\r\n")):] or (b"\r\n" if b"\r\n" in raw else b"\n")
        new = b"".join(lines[:at]) + added.encode() + ending + b"".join(lines[at:])
        status = "applied"
    if check:
        return f"would be {status}"
    from lpcam_core.io import atomic_write_bytes

    try:
        atomic_write_bytes(path, new)
    except OSError as err:
        raise ValueError(f"{path}: cannot write ({err.strerror or err})") from None
    return status


def explain_text(info: HostInfo) -> str:
    """The patches ``import lpcam_adapters.<host>`` registers (with their status) and the settings it reads."""
    from . import hooks

    module = importlib.import_module(info.module)
    # Another adapter imported later in this process may have replaced a patch both register (IRN, ReCAM and AMN
    # all patch step.make_cam:run): the host's own line registers its own, so explain that.
    install = getattr(module, "install", None)
    if callable(install):
        install()
    owners = {info.module, *info.patch_owners}
    rows = [r for r in hooks.describe_patches() if r.owner in owners]
    lines = [f"`import {info.module}` registers these patches (applied when the host imports the module):", ""]
    if rows:
        name_w = max(len(f"{r.module}:{r.name}") for r in rows)
        status_w = max(len(r.status) for r in rows)
        lines.append(f"{'patch':<{name_w}}  {'status':<{status_w}}  what it changes")
        lines += [f"{r.module + ':' + r.name:<{name_w}}  {r.status:<{status_w}}  {r.description}" for r in rows]
        lines += ["", "pending: applied when the host imports that module (in this `lpcam` process no host module is "
                  "imported; a module this host's checkout does not have is never imported, so its patch never applies)"]
    docs = {k: v for k, v in env_docs(info.options, **dict(info.env_docs)).items() if k not in info.unread_env}
    width = max(len(k) for k in docs)
    lines += ["", "settings (environment variables):"] + [f"  {k:<{width}}  {v}" for k, v in docs.items()]
    if info.thresholds:
        lines += ["", info.thresholds]
    return "\n".join(lines)


#: Flags every host step accepts for the core settings: (flag, variable it sets, type, help).
SETTINGS_FLAGS = (
    ("--config", "LPCAM_CONFIG", str, "YAML of LPCAM settings (as LPCAM_CONFIG)"),
    ("--preset", "LPCAM_PRESET", str, "the paper's hyper-parameters: voc or coco"),
    ("--k", "LPCAM_K", int, "clusters per pool (K)"),
    ("--tau", "LPCAM_TAU", float, "CAM threshold splitting class and context pools (tau)"),
    ("--mu", "LPCAM_MU", float, "mu_f and mu_b"),
    ("--seed", "LPCAM_SEED", int, "seed of K-means and pool sampling"),
    ("--memory-gb", "LPCAM_MEMORY_GB", float, "memory budget of the feature pools, GiB"),
)


def add_settings_flags(p: argparse.ArgumentParser, info: HostInfo, *, clustering: bool = True) -> None:
    """The core settings' flags (:data:`SETTINGS_FLAGS`) and a ``--<flag>`` for every host option that has one.
    ``clustering=False`` (a step that only reads a bank): ``--config`` alone, the bank holds the rest."""
    for flag, _, kind, text in SETTINGS_FLAGS:
        if not clustering and flag != "--config":
            continue
        p.add_argument(flag, type=kind, help=text, **({"choices": ("voc", "coco")} if flag == "--preset" else {}))
    for option in info.options:
        if option.flag:
            kwargs: dict[str, Any] = {"help": option.doc}
            if isinstance(option.default, bool):  # a switch: the bare flag turns it on
                kwargs.update(action="store_const", const="1")
            elif option.choices is not None:
                kwargs["choices"] = option.choices
                kwargs["type"] = type(option.choices[0])
            p.add_argument(option.flag, dest=f"opt_{option.name}", **kwargs)


def settings_env(ns: argparse.Namespace, info: HostInfo) -> dict[str, str]:
    """The ``LPCAM_*`` variables a step's flags set (``--config`` made absolute; host options by their variable)."""
    env = {}
    for flag, var, _, _ in SETTINGS_FLAGS:
        value = getattr(ns, flag[2:].replace("-", "_"), None)
        if value is not None:
            env[var] = os.path.abspath(value) if var == "LPCAM_CONFIG" else str(value)
    for option in info.options:
        value = getattr(ns, f"opt_{option.name}", None)
        if value is not None:
            env[option.env] = str(value)
    return env


def add_host_group(subparsers: Any, info: HostInfo, steps: Callable[[Any], None]) -> argparse.ArgumentParser:
    """Add ``lpcam <host>`` with ``--explain``, ``patch`` and the host's steps (``steps(sub)`` adds them)."""
    hp = subparsers.add_parser(info.name, help=f"LPCAM for {info.title}",
                               description=f"LPCAM for {info.title}: explicit steps, the patch, --explain.")
    hp.add_argument("--explain", action="store_true", help="list the patches and settings of the import line")
    hp.set_defaults(func=_cmd_group, info=info, parser=hp)
    sub = hp.add_subparsers(dest="host_command", metavar="STEP")
    pp = sub.add_parser("patch", help=f"add `import {info.module}` to HOST_DIR/{info.entry_script}")
    pp.add_argument("host_dir", help=f"{info.title} checkout")
    pp.add_argument("--revert", action="store_true", help="remove the line")
    pp.add_argument("--check", action="store_true", help="only say what would change")
    pp.set_defaults(func=_cmd_patch, info=info)
    steps(sub)
    return hp


def _cmd_group(ns: argparse.Namespace) -> int:
    if not ns.explain:
        ns.parser.print_help()
        return 2
    from .settings import read_settings

    read_settings(ns.info.options, section=ns.info.section, host=ns.info.name, unread=ns.info.unread_env)  # the settings it would read: refused if malformed
    sys.stdout.write(explain_text(ns.info) + "\n")
    return 0


def _cmd_patch(ns: argparse.Namespace) -> int:
    status = patch_entry_script(ns.host_dir, ns.info, revert=ns.revert, check=ns.check)
    sys.stdout.write(f"{Path(ns.host_dir) / ns.info.entry_script}: {status}\n")
    return 0


def script_flags(argv: Sequence[str]) -> dict[str, str]:
    """``{--flag: value}`` of a host script's arguments, given as ``--flag value`` or ``--flag=value`` (the
    last one wins, as argparse takes it); a flag followed by another flag maps to that flag (not read here)."""
    values: dict[str, str] = {}
    for i, arg in enumerate(argv):
        if arg.startswith("--") and "=" in arg:
            flag, value = arg.split("=", 1)
            values[flag] = value
        elif arg.startswith("--") and i + 1 < len(argv):
            values[arg] = argv[i + 1]
    return values


def run_host_script(host_dir: str | os.PathLike, script: str, argv: list[str], *, environ: dict[str, str] | None = None,
                    install: Callable[[], None] | None = None) -> None:
    """Run ``<host_dir>/<script>`` in this process as ``python <script> argv`` would, with an adapter installed.

    ``sys.path`` gets ``host_dir`` first and ``sys.argv`` is ``[script, *argv]``; the working directory is
    left as it is (run it from the checkout when the host reads files relative to it). ``environ``
    (``LPCAM``, ``LPCAM_BANK``, ...) is set for the run; it, ``sys.argv`` and ``sys.path`` are restored after.

    Args:
        host_dir: the host checkout (never written).
        script: the entry script, relative to ``host_dir``.
        argv: the script's arguments.
        environ: variables set for the run.
        install: the adapter's ``install`` (its patches), called first.
    """
    import runpy

    path = os.path.join(os.fspath(host_dir), script)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{host_dir}: no {script} (not a checkout of this host)")
    if install is not None:
        install()
    saved_argv, saved_path = list(sys.argv), list(sys.path)
    saved_env = {k: os.environ.get(k) for k in (environ or {})}
    os.environ.update({k: str(v) for k, v in (environ or {}).items()})
    sys.argv = [path, *argv]
    sys.path.insert(0, os.path.abspath(os.fspath(host_dir)))
    try:
        runpy.run_path(path, run_name="__main__")
    finally:
        sys.argv, sys.path[:] = saved_argv, saved_path
        for k, v in saved_env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v

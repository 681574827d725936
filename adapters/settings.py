"""Host settings: the ``LPCAM_*`` variables and the ``LPCAM_CONFIG`` YAML fill one :class:`HostSettings`.

Every host reads its settings in the same order: the preset, then the YAML file named by
``LPCAM_CONFIG`` (:class:`lpcam_core.LPCAMConfig` keys at top level, host keys under a section such as
``adapter:``), then the variables. The core settings have one home, :class:`lpcam_core.LPCAMConfig`;
the settings every host shares are fields of :class:`HostSettings`; a host's own choices are
:class:`Option` rows it declares (ReCAM's classifier, AMN's stages, MCTformer's flip, ...), kept in
``settings.options``. Errors name the variable (or the file and key) and the value expected.
Torch-free: the CLI reads the tables while building its parser.
"""

from __future__ import annotations

import logging
import math
import multiprocessing
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from lpcam_core.config import closest_key, did_you_mean, short_repr

__all__ = [
    "TRUE",
    "FALSE",
    "Option",
    "HostSettings",
    "parse_bool",
    "parse_number",
    "parse_switch",
    "read_settings",
    "env_docs",
    "COMMON_ENV",
    "OTHER_VARS",
    "HOST_IGNORED_KEYS",
    "COMMON_KEY_VARS",
    "UNREAD_REPORTED",
    "report_unread",
]

logger = logging.getLogger(__name__)

TRUE = frozenset({"1", "on", "true", "yes", "y", "t"})
FALSE = frozenset({"0", "off", "false", "no", "n", "f", ""})
_MAX_CONFIG_BYTES = 1 << 20

#: LPCAMConfig fields set by variables: (variable, field, type). ``LPCAM_MU`` also sets mu_b.
_CORE_VARS = (
    ("LPCAM_K", "num_clusters", int),
    ("LPCAM_TAU", "fg_threshold", float),
    ("LPCAM_MU", "class_threshold", float),
    ("LPCAM_MU_F", "class_threshold", float),
    ("LPCAM_MU_B", "context_high", float),
    ("LPCAM_SEED", "seed", int),
)

#: The variables every host reads, with their documentation (``lpcam <host> --explain``).
COMMON_ENV: dict[str, str] = {
    "LPCAM": "1 (default) swaps CAM for LPCAM; 0/off/false runs the host's own CAM",
    "LPCAM_CONFIG": "YAML file: LPCAMConfig keys (and `preset`) at top level, host keys under the host's section",
    "LPCAM_PRESET": "voc or coco: the paper's hyper-parameters",
    "LPCAM_K": "clusters per pool (K)",
    "LPCAM_TAU": "CAM threshold splitting class and context pools (tau)",
    "LPCAM_MU": "sets both mu_f and mu_b",
    "LPCAM_MU_F": "class prototype threshold (mu_f)",
    "LPCAM_MU_B": "context prototype upper threshold (mu_b)",
    "LPCAM_SEED": "seed of K-means and pool sampling",
    "LPCAM_MEMORY_GB": "memory budget of the feature pools, GiB",
    "LPCAM_BANK": "prototype bank file",
    "LPCAM_REBUILD_BANK": "1: rebuild the bank even when one built with this checkpoint and settings exists",
    "LPCAM_BASELINE_DIR": "baseline CAM directory of the prototype images",
    "LPCAM_PROTO_LIST": "image list clustered for prototypes",
    "LPCAM_WORKERS": "processes for the image loops (default: one per GPU; 0/1 in-process; >1 spawns)",
    "LPCAM_DEVICE": "device of in-process work (default cuda if available else cpu)",
    "LPCAM_NO_PRETRAINED": "1: host networks never download ImageNet weights (offline training)",
    "LPCAM_LOG_LEVEL": "log level of lpcam's messages in host runs (default INFO)",
}

#: ``LPCAM_*`` variables read outside the settings (the host test suite, try runs): never reported as unread.
OTHER_VARS = frozenset({"LPCAM_HOSTS", "LPCAM_TRY_SEED"})

#: LPCAMConfig keys a host run cannot honour (refused in its YAML rather than ignored), with the reason.
HOST_IGNORED_KEYS = {
    "scales": "the maps use the host's own scales: its --cam_scales, or --scales of `lpcam <host> prototypes|make`",
    "max_normalise_eps": "the host's files hold its own max-normalised maps, divided by the max alone",
}

#: The unread variables already reported in this process (each is reported once).
UNREAD_REPORTED: set[str] = set()

#: :class:`HostSettings` fields -> the variable that also sets them.
COMMON_KEY_VARS = {"enabled": "LPCAM", "bank_path": "LPCAM_BANK", "rebuild_bank": "LPCAM_REBUILD_BANK",
                   "baseline_dir": "LPCAM_BASELINE_DIR", "proto_list": "LPCAM_PROTO_LIST", "workers": "LPCAM_WORKERS",
                   "device": "LPCAM_DEVICE"}

#: Keys of the YAML's ``adapter:`` section -> :class:`HostSettings` fields.
_COMMON_KEYS = {"enabled": "enabled", "bank": "bank_path", "bank_path": "bank_path", "rebuild_bank": "rebuild_bank",
                "baseline_dir": "baseline_dir", "proto_list": "proto_list", "workers": "workers", "device": "device"}


def parse_bool(value: Any, name: str) -> bool:
    """``1/0, true/false, on/off, yes/no`` (any case) or a bool; ``ValueError`` naming ``name`` otherwise."""
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in TRUE:
        return True
    if text in FALSE:
        return False
    raise ValueError(f"{name}={short_repr(value)}: expected 1/0, true/false, on/off")


def parse_switch(value: Any) -> bool:
    """An :class:`Option`'s on/off value (``1/0, true/false, on/off, yes/no`` or a bool); the error names no
    variable (:meth:`Option.value` puts it in front)."""
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in TRUE or text in FALSE:
        return text in TRUE
    raise ValueError("expected 1/0, true/false, on/off")


def parse_number(value: Any, kind: type, name: str) -> Any:
    """``kind(value)`` (int or float), finite; ``ValueError`` naming ``name`` and the kind expected otherwise."""
    expected = "an integer" if kind is int else "a finite number"
    if isinstance(value, bool) or (kind is int and not isinstance(value, (int, str))):  # 1.7 is not an int
        raise ValueError(f"{name}={short_repr(value)}: expected {expected}")
    try:
        number = kind(value.strip() if isinstance(value, str) else value)
    except (TypeError, ValueError, OverflowError):
        raise ValueError(f"{name}={short_repr(value)}: expected {expected}") from None
    if kind is float and not math.isfinite(number):
        raise ValueError(f"{name}={short_repr(value)}: expected {expected}")
    return number


@dataclass(frozen=True)
class Option:
    """A host's own setting: a variable, a YAML key of the host's section and a ``--flag`` of its steps.

    Attributes:
        name: key in ``HostSettings.options`` (and in the YAML section).
        env: the variable (``LPCAM_CLASSIFIER``).
        default: the value when nothing sets it.
        doc: one line for ``--explain`` and ``--help``.
        choices: the allowed values (after ``parse``), or None.
        parse: text -> value (default: the text, lower-cased when ``choices`` are strings).
        yaml_keys: other names the YAML section accepts for it.
        flag: the ``--flag`` of the explicit steps (None: no flag).
        keep_empty: a variable set to the empty string counts (as ``parse("")``) instead of being ignored.
    """

    name: str
    env: str
    default: Any
    doc: str
    choices: tuple[Any, ...] | None = None
    parse: Callable[[Any], Any] | None = None
    yaml_keys: tuple[str, ...] = ()
    flag: str | None = None
    keep_empty: bool = False

    def value(self, raw: Any, where: str) -> Any:
        """``raw`` parsed and checked; ``ValueError`` naming ``where`` otherwise."""
        if raw is None:
            return None
        try:
            value = self.parse(raw) if self.parse is not None else raw
        except (ValueError, TypeError) as err:
            raise ValueError(f"{where}={short_repr(raw)}: {err}") from None
        if isinstance(value, str) and self.choices and all(isinstance(c, str) for c in self.choices):
            value = value.strip().lower()
        if self.choices is not None and value not in self.choices:
            raise ValueError(f"{where}={short_repr(raw)}: expected one of {list(self.choices)}")
        return value


@dataclass(frozen=True)
class HostSettings:
    """Settings of a host run.

    Attributes:
        enabled: swap CAM for LPCAM (``LPCAM=0`` turns it off).
        lpcam: the core settings (:class:`lpcam_core.LPCAMConfig`).
        bank_path: prototype bank file (None: the host's default place).
        rebuild_bank: rebuild even when a bank built with the same checkpoint and settings exists.
        baseline_dir: baseline CAM directory of the prototype images (None: the host's default).
        proto_list: image list clustered for prototypes (None: the host's default).
        workers: processes for the image loops (None: one per GPU; 0 or 1: in-process).
        device: device of in-process work (None: cuda if available, else cpu).
        options: the host's own choices (its :class:`Option` rows), parsed.
    """

    enabled: bool = True
    lpcam: Any = None
    bank_path: str | None = None
    rebuild_bank: bool = False
    baseline_dir: str | None = None
    proto_list: str | None = None
    workers: int | None = None
    device: str | None = None
    options: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.lpcam is None:
            from lpcam_core.config import LPCAMConfig

            object.__setattr__(self, "lpcam", LPCAMConfig.preset("voc"))
        if self.workers is not None and (isinstance(self.workers, bool) or not isinstance(self.workers, int)
                                         or self.workers < 0):
            raise ValueError(f"workers={self.workers!r}: expected an int >= 0")

    def option(self, name: str) -> Any:
        """The host option ``name``."""
        return self.options[name]

    def replace(self, **changes: Any) -> HostSettings:
        """A copy with some fields (or ``options`` entries, given as ``options={...}``, merged) changed."""
        if "options" in changes:
            changes["options"] = {**self.options, **changes["options"]}
        return replace(self, **changes)


def _read_yaml(path: str) -> dict[str, Any]:
    """The ``LPCAM_CONFIG`` file as a mapping (no aliases, at most 1 MiB); errors start ``LPCAM_CONFIG=<path>:``."""
    from lpcam_core.config import load_yaml_mapping

    return load_yaml_mapping(path, f"LPCAM_CONFIG={path}", max_bytes=_MAX_CONFIG_BYTES)


def read_settings(
    options: Sequence[Option] = (),
    environ: Mapping[str, str] | None = None,
    *,
    section: str = "adapter",
    fallback_preset: str = "voc",
    preset_defaults: Mapping[str, Mapping[str, Any]] | None = None,
    common_section: str = "adapter",
    host: str | None = None,
    unread: Sequence[str] = (),
) -> HostSettings:
    """Fill :class:`HostSettings`: preset, then the ``LPCAM_CONFIG`` YAML, then the variables.

    Args:
        options: the host's own settings.
        environ: variables to read (default ``os.environ``).
        section: YAML section holding the host's options (``adapter``, or e.g. ``amn``).
        fallback_preset: preset when neither ``LPCAM_PRESET`` nor the file names one.
        preset_defaults: ``{preset: {LPCAMConfig field: value}}`` the host puts under the file's keys
            (MCTformer's own tau).
        common_section: YAML section of the shared fields (``adapter``).
        host: the host's name, for the warning about ``LPCAM_*`` variables it does not read
            (:func:`report_unread`).
        unread: common variables this host does not read (reported when set, as unknown ones are).

    Raises:
        FileNotFoundError: no such config file. ValueError: a malformed value or an unknown key, naming it.
    """
    from lpcam_core.config import LPCAMConfig

    env = dict(os.environ if environ is None else environ)
    report_unread(env, options, host, unread)
    path = env.get("LPCAM_CONFIG", "").strip()
    data = _read_yaml(path) if path else {}
    where = f"LPCAM_CONFIG={path}"
    option_keys = {key: o.name for o in options for key in (o.name, *o.yaml_keys)}
    sections = {common_section: dict(_COMMON_KEYS), section: {}}
    if section == common_section:
        sections[section].update(_COMMON_KEYS)
    sections[section].update(option_keys)
    found: dict[str, dict[str, Any]] = {}
    for name, keys in sections.items():
        block = data.pop(name, {}) or {}
        if not isinstance(block, dict):
            raise ValueError(f"{where}: `{name}` must be a mapping")
        unknown = sorted(set(map(str, block)) - set(keys))
        if unknown:
            raise ValueError(f"{where}: unknown {name} key(s) {unknown}{did_you_mean(unknown, keys)}; "
                             f"known: {sorted(keys)}")
        found[name] = {keys[k]: v for k, v in block.items()}
    preset = env.get("LPCAM_PRESET", "").strip() or data.pop("preset", None) or fallback_preset
    data.pop("preset", None)
    for key, why in HOST_IGNORED_KEYS.items():
        if key in data:
            raise ValueError(f"{where}: `{key}` does not apply to a host run ({why}); it is a setting of the Python "
                             "LPCAM class only: remove it from this file")
    core = {**(preset_defaults or {}).get(str(preset).lower(), {}), **data}
    cfg = LPCAMConfig.from_dict({"preset": preset, **core}, source=path or "LPCAM settings")
    overrides: dict[str, Any] = {}
    for var, name, kind in _CORE_VARS:
        if env.get(var, "").strip():
            overrides[name] = parse_number(env[var], kind, var)
            if var == "LPCAM_MU" and not env.get("LPCAM_MU_B", "").strip():
                overrides["context_high"] = overrides[name]
    if env.get("LPCAM_MEMORY_GB", "").strip():
        gib = parse_number(env["LPCAM_MEMORY_GB"], float, "LPCAM_MEMORY_GB")
        if not 0 < gib <= 1 << 20:
            raise ValueError(f"LPCAM_MEMORY_GB={env['LPCAM_MEMORY_GB']!r}: expected a positive number of GiB")
        overrides["memory_budget_bytes"] = int(gib * 1024**3)
    if overrides:
        try:
            cfg = cfg.replace(**overrides)
        except ValueError as err:
            raise ValueError(f"LPCAM settings from the environment: {err}") from None

    common = dict(found[common_section])
    for key, var in COMMON_KEY_VARS.items():
        if key in common and var in unread and f"{where}:{key}" not in UNREAD_REPORTED:
            UNREAD_REPORTED.add(f"{where}:{key}")
            logger.warning("%s: %s.%s is set but %s does not read it, so it changes nothing", where, common_section,
                           key, host or "this host")
    for key in ("enabled", "rebuild_bank"):
        if key in common:
            common[key] = parse_bool(common[key], f"{where}: {common_section}.{key}")
    text_fields = ("bank_path", "baseline_dir", "proto_list", "device")
    for key in text_fields:
        if env.get(COMMON_KEY_VARS[key], "").strip():
            common[key] = env[COMMON_KEY_VARS[key]].strip()
    if "LPCAM_REBUILD_BANK" in env:
        common["rebuild_bank"] = parse_bool(env["LPCAM_REBUILD_BANK"], "LPCAM_REBUILD_BANK")
    if "LPCAM" in env:
        common["enabled"] = parse_bool(env["LPCAM"], "LPCAM")
    if common.get("workers") is not None:
        common["workers"] = parse_number(common["workers"], int, f"{where}: {common_section}.workers")
    if env.get("LPCAM_WORKERS", "").strip():
        common["workers"] = parse_number(env["LPCAM_WORKERS"], int, "LPCAM_WORKERS")
    if common.get("workers") is not None and common["workers"] < 0:
        raise ValueError(f"LPCAM_WORKERS={common['workers']}: expected an int >= 0")
    if common.get("device"):
        _check_device(str(common["device"]))
    for key in text_fields:
        if common.get(key) is not None:
            common[key] = str(common[key])

    values = {}
    block = found[section] if section != common_section else {k: v for k, v in found[section].items()
                                                                if k in option_keys.values()}
    for option in options:
        raw = option.default
        if option.name in block:
            raw = option.value(block[option.name], f"{where}: {section}.{option.name}")
        if env.get(option.env, "").strip() or (option.keep_empty and option.env in env):
            raw = option.value(env[option.env], option.env)
        values[option.name] = raw
    return HostSettings(lpcam=cfg, options=values, **{k: v for k, v in common.items() if k in _COMMON_KEYS.values()})


def report_unread(environ: Mapping[str, str], options: Sequence[Option] = (), host: str | None = None,
                  unread: Sequence[str] = ()) -> list[str]:
    """Warn (once per process, from the main process) about set ``LPCAM_*`` variables these settings do not read.

    A typo (``LPCAM_MUF`` for ``LPCAM_MU_F``) or another host's option (``LPCAM_AMP`` under MCTformer)
    would otherwise change nothing, silently; so would a common variable the host does not read (``unread``:
    ``LPCAM_WORKERS`` for MCTformer). Returns the variables reported by this call.
    """
    known = (set(COMMON_ENV) | {var for var, _, _ in _CORE_VARS} | {o.env for o in options}) - set(unread)
    ignored = sorted(var for var, value in environ.items() if var.startswith("LPCAM_") and str(value).strip()
                     and var not in known and var not in OTHER_VARS and var not in UNREAD_REPORTED)
    if not ignored or multiprocessing.parent_process() is not None or os.environ.get("RANK", "0") != "0":
        return []  # spawned workers and torchrun ranks > 0 read the same variables as the process that reported
    for var in ignored:
        UNREAD_REPORTED.add(var)
        close = closest_key(var[6:], [k[6:] for k in known])  # after LPCAM_: LPCAM_AMP is not LPCAM_MU
        logger.warning("%s is set but %s does not read it, so it changes nothing%s%s", var, host or "this host",
                       f" (did you mean LPCAM_{close}?)" if close else " (a typo, or another host's setting?)",
                       f"; `lpcam {host} --explain` lists what {host} reads" if host else "")
    return ignored


def _check_device(device: str) -> None:
    import re

    if not re.fullmatch(r"(cpu|cuda|mps|xpu)(:\d+)?", device):
        raise ValueError(f"LPCAM_DEVICE={device!r}: expected cpu, cuda, cuda:N, mps or xpu")


def env_docs(options: Sequence[Option] = (), **overrides: str) -> dict[str, str]:
    """``{variable: doc}``: the common variables (``overrides`` change their docs) and the host's options."""
    docs = {**COMMON_ENV, **overrides}
    docs.update({o.env: o.doc for o in options})
    return docs

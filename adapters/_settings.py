"""Settings parsing shared by the adapters: environment variables and the ``LPCAM_CONFIG`` YAML.

Every adapter reads its settings in the same order: the preset, then the YAML file named by
``LPCAM_CONFIG`` (:class:`lpcam_core.LPCAMConfig` keys at top level, adapter keys under named
sections such as ``adapter:``), then the ``LPCAM_*`` variables. Errors name the variable (or the
file and key) and the value expected. Torch-free: the CLI imports it while building its parser.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

__all__ = [
    "TRUE",
    "FALSE",
    "ConfigFile",
    "parse_bool",
    "parse_number",
    "read_config",
    "lpcam_config",
    "env_values",
    "common_adapter_values",
    "core_env_vars",
    "configure_logging",
]

TRUE = frozenset({"1", "on", "true", "yes", "y", "t"})
FALSE = frozenset({"0", "off", "false", "no", "n", "f", ""})

#: LPCAMConfig fields set by variables: (variable, field, type). ``LPCAM_MU`` also sets mu_b.
_CORE_VARS = (
    ("LPCAM_K", "num_clusters", int),
    ("LPCAM_TAU", "fg_threshold", float),
    ("LPCAM_MU", "class_threshold", float),
    ("LPCAM_MU_F", "class_threshold", float),
    ("LPCAM_MU_B", "context_high", float),
    ("LPCAM_SEED", "seed", int),
)

#: Adapter fields every adapter reads from the same variables.
_COMMON_STRINGS = (("LPCAM_BANK", "bank_path"), ("LPCAM_BASELINE_DIR", "baseline_dir"), ("LPCAM_PROTO_LIST", "proto_list"))


def parse_bool(value: Any, name: str) -> bool:
    """``1/0, true/false, on/off, yes/no`` (any case) or a bool; ``ValueError`` naming ``name`` otherwise."""
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in TRUE:
        return True
    if text in FALSE:
        return False
    raise ValueError(f"{name}={value!r}: expected 1/0, true/false, on/off")


def parse_number(value: str, kind: type, name: str) -> Any:
    """``kind(value)`` (int or float); ``ValueError`` naming ``name`` and the kind expected otherwise."""
    try:
        return kind(value)
    except ValueError:
        raise ValueError(f"{name}={value!r}: expected {'an integer' if kind is int else 'a number'}") from None


@dataclass
class ConfigFile:
    """The ``LPCAM_CONFIG`` YAML, split up.

    Attributes:
        path: The file (``None``: no ``LPCAM_CONFIG``).
        preset: Its ``preset`` key (``None``: none).
        core: Its other top-level keys (LPCAMConfig fields, checked by ``LPCAMConfig.from_dict``).
        sections: ``{section: {field: value}}``, keys already mapped to field names (empty when absent).
    """

    path: str | None = None
    preset: Any = None
    core: dict[str, Any] = field(default_factory=dict)
    sections: dict[str, dict[str, Any]] = field(default_factory=dict)


def read_config(path: str | None, sections: Mapping[str, Mapping[str, str]]) -> ConfigFile:
    """Read the YAML named by ``LPCAM_CONFIG``.

    Args:
        path: The file (empty or ``None``: nothing to read).
        sections: ``{section name: {yaml key: field name}}`` of the adapter's own sections.

    Raises:
        FileNotFoundError: no such file. ValueError: not YAML, not a mapping, or an unknown key in
        a section; every message starts ``LPCAM_CONFIG=<path>:``.
    """
    import yaml

    found = {name: {} for name in sections}
    if not path:
        return ConfigFile(sections=found)
    where = f"LPCAM_CONFIG={path}"
    try:
        with open(path, encoding="utf-8") as handle:
            data = yaml.safe_load(handle) or {}
    except FileNotFoundError:
        raise FileNotFoundError(f"{where}: file not found") from None
    except yaml.YAMLError as err:
        raise ValueError(f"{where}: not valid YAML ({err})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{where}: expected a mapping of settings")
    for name, keys in sections.items():
        section = data.pop(name, {}) or {}
        if not isinstance(section, dict):
            raise ValueError(f"{where}: `{name}` must be a mapping")
        unknown = sorted(set(section) - set(keys))
        if unknown:
            raise ValueError(f"{where}: unknown {name} key(s) {unknown}; known: {sorted(keys)}")
        found[name] = {keys[k]: v for k, v in section.items()}
    preset = data.pop("preset", None)
    return ConfigFile(path=path, preset=preset, core=data, sections=found)


def lpcam_config(
    env: Mapping[str, str],
    config: ConfigFile,
    *,
    fallback_preset: str = "voc",
    preset_defaults: Mapping[str, Mapping[str, Any]] | None = None,
) -> Any:
    """The :class:`lpcam_core.LPCAMConfig`: preset, then the file's keys, then the variables.

    Args:
        env: The variables (``LPCAM_PRESET``, ``LPCAM_K``, ``LPCAM_TAU``, ``LPCAM_MU``,
            ``LPCAM_MU_F``, ``LPCAM_MU_B``, ``LPCAM_SEED``, ``LPCAM_MEMORY_GB``).
        config: The file (:func:`read_config`).
        fallback_preset: Preset when neither ``LPCAM_PRESET`` nor the file names one.
        preset_defaults: ``{preset: {field: value}}`` an adapter puts under the file's keys.
    """
    from lpcam_core import LPCAMConfig

    preset = env.get("LPCAM_PRESET", "").strip() or config.preset or fallback_preset
    core = {**(preset_defaults or {}).get(str(preset).lower(), {}), **config.core}
    cfg = LPCAMConfig.from_dict({"preset": preset, **core}, source=config.path or "LPCAM settings")
    overrides: dict[str, Any] = {}
    for var, name, kind in _CORE_VARS:
        if env.get(var, "").strip():
            overrides[name] = parse_number(env[var].strip(), kind, var)
            if var == "LPCAM_MU" and not env.get("LPCAM_MU_B", "").strip():
                overrides["context_high"] = overrides[name]
    if env.get("LPCAM_MEMORY_GB", "").strip():
        gib = parse_number(env["LPCAM_MEMORY_GB"].strip(), float, "LPCAM_MEMORY_GB")
        overrides["memory_budget_bytes"] = int(gib * 1024**3)
    return cfg.replace(**overrides) if overrides else cfg


def env_values(env: Mapping[str, str], table: Iterable[tuple[str, str]], *, lower: Iterable[str] = ()) -> dict[str, str]:
    """``{field: stripped value}`` of the non-empty variables of ``(variable, field)`` pairs (``lower``: lower-cased)."""
    lowered = set(lower)
    out = {}
    for var, name in table:
        value = env.get(var, "").strip()
        if value:
            out[name] = value.lower() if name in lowered else value
    return out


def common_adapter_values(env: Mapping[str, str], section: Mapping[str, Any], path: str | None) -> dict[str, Any]:
    """The ``adapter:`` section updated by the variables every adapter reads.

    ``enabled`` and ``rebuild_bank`` of the file become bools (errors name ``<path>: adapter.<key>``),
    then ``LPCAM``, ``LPCAM_REBUILD_BANK``, ``LPCAM_BANK``, ``LPCAM_BASELINE_DIR`` and
    ``LPCAM_PROTO_LIST`` override them.
    """
    out = dict(section)
    for key in ("enabled", "rebuild_bank"):
        if key in out:
            out[key] = parse_bool(out[key], f"{path}: adapter.{key}")
    out.update(env_values(env, _COMMON_STRINGS))
    if "LPCAM_REBUILD_BANK" in env:
        out["rebuild_bank"] = parse_bool(env["LPCAM_REBUILD_BANK"], "LPCAM_REBUILD_BANK")
    if "LPCAM" in env:
        out["enabled"] = parse_bool(env["LPCAM"], "LPCAM")
    return out


def core_env_vars(*, preset: str, tau: str) -> dict[str, str]:
    """Docs of ``LPCAM_CONFIG``, ``LPCAM_PRESET`` and the LPCAMConfig variables (for the adapters' ENV_VARS)."""
    return {
        "LPCAM_CONFIG": "YAML file: LPCAMConfig keys (and `preset`) at top level, adapter keys under `adapter:`",
        "LPCAM_PRESET": preset,
        "LPCAM_K": "clusters per pool (K)",
        "LPCAM_TAU": tau,
        "LPCAM_MU": "sets both mu_f and mu_b",
        "LPCAM_MU_F": "class prototype threshold (mu_f)",
        "LPCAM_MU_B": "context prototype upper threshold (mu_b)",
        "LPCAM_SEED": "seed of K-means and pool sampling",
        "LPCAM_MEMORY_GB": "memory budget of the feature pools, GiB",
    }


def configure_logging() -> None:
    """Show lpcam's INFO messages in a host run (hosts print; they configure no logging).

    Adds one stdout handler to the ``lpcam_adapters`` and ``lpcam_core`` loggers unless the
    application configured logging itself. Level from ``LPCAM_LOG_LEVEL`` (default INFO).
    """
    if logging.getLogger().handlers:
        return
    level = os.environ.get("LPCAM_LOG_LEVEL", "INFO").upper()
    for name in ("lpcam_adapters", "lpcam_core"):
        log = logging.getLogger(name)
        if not any(getattr(h, "_lpcam", False) for h in log.handlers):
            handler = logging.StreamHandler(sys.stdout)
            handler.setFormatter(logging.Formatter("[lpcam] %(message)s"))
            handler._lpcam = True  # type: ignore[attr-defined]
            log.addHandler(handler)
        log.setLevel(level)

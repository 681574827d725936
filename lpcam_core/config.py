"""LPCAMConfig: the one home of every LPCAM setting, with the paper's presets and YAML round-trip.

Environment variables and YAML files only fill this dataclass; nothing else holds settings.
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, fields
from typing import Any

__all__ = ["LPCAMConfig", "PRESETS", "parse_yaml_mapping", "load_yaml_mapping", "short_repr", "closest_key", "did_you_mean"]

GIB = 1024**3


@dataclass(frozen=True)
class LPCAMConfig:
    """Settings of prototype building and map generation.

    Attributes:
        num_clusters: K, clusters per pool (class pool and context pool, each).
        fg_threshold: tau. Feature positions whose normalised CAM is > tau go to the class pool,
            those < tau to the context pool; a value exactly tau goes to neither (as released).
        class_threshold: mu_f. A class-pool centre is a class prototype when its softmax
            probability for the class is > mu_f (no upper bound).
        context_low: lower bound on a context centre's probability (code only, VOC 0.05).
        context_high: mu_b. A context-pool centre is a context prototype when
            context_low < p < mu_b.
        fallback_best_center: when no class centre passes mu_f, keep the best-scoring one and
            log a warning (the COCO release does this; the VOC release crashes instead).
        images_per_class: COCO's clustering subset: this many images per class, sampled with
            replacement from the images labelled with the class (``None``: every image; at most 10,000).
        seed: seeds K-means, reservoir sampling and image sampling.
        memory_budget_bytes: prototype building stays within this much memory above the process's
            baseline: the pools of all classes together hold at most 85% of it (the rest is headroom for
            the image being added and for re-allocating a pool when pools are capped); once full, each
            pool keeps a seeded uniform sample of the features it was offered.
        kmeans_max_iter: iteration cap of K-means.
        kmeans_tol: stop when the largest squared shift of a unit-normalised centre between two
            iterations falls below this.
        kmeans_n_init: K-means restarts (best inertia kept).
        scales: inference scales; each scale is run with its horizontal flip.
        max_normalise_eps: added to the max in the final division. 0.0 reproduces the release
            (maps whose maximum is not positive are then returned as zeros; see maps.py).
    """

    num_clusters: int = 12
    fg_threshold: float = 0.1
    class_threshold: float = 0.9
    context_low: float = 0.05
    context_high: float = 0.9
    fallback_best_center: bool = True
    images_per_class: int | None = None
    seed: int = 666
    memory_budget_bytes: int = 2 * GIB
    kmeans_max_iter: int = 100
    kmeans_tol: float = 1e-4
    kmeans_n_init: int = 1
    scales: tuple[float, ...] = (1.0, 0.5, 1.5, 2.0)
    max_normalise_eps: float = 0.0
    preset_name: str | None = field(default=None, compare=False)

    def __post_init__(self) -> None:
        raw = self.scales
        if isinstance(raw, (str, bytes)) or not isinstance(raw, (list, tuple)) or not all(
            isinstance(v, (int, float)) and not isinstance(v, bool) for v in raw
        ):
            raise ValueError(f"LPCAMConfig.scales={short_repr(raw)}: expected a list of positive numbers, e.g. [1.0, 0.5]")
        scales = tuple(float(v) for v in raw)
        object.__setattr__(self, "scales", scales)
        self.validate()

    def validate(self) -> None:
        """Raise ``ValueError`` naming the first setting out of its range."""

        def need(ok: bool, name: str, expected: str) -> None:
            if not ok:
                raise ValueError(f"LPCAMConfig.{name}={short_repr(getattr(self, name))}: expected {expected}")

        def is_int(value: Any) -> bool:  # bool is an int subclass; `num_clusters: yes` must not mean 1
            return isinstance(value, int) and not isinstance(value, bool)

        def is_number(value: Any) -> bool:
            return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)

        need(is_int(self.num_clusters) and 1 <= self.num_clusters <= 100_000, "num_clusters", "an int in 1..100000")
        for name in ("fg_threshold", "class_threshold", "context_low", "context_high", "kmeans_tol", "max_normalise_eps"):
            need(is_number(getattr(self, name)), name, "a finite number")
        need(isinstance(self.fallback_best_center, bool), "fallback_best_center", "true or false")
        need(0.0 <= self.fg_threshold <= 1.0, "fg_threshold", "a CAM value in [0, 1]")
        need(0.0 <= self.class_threshold < 1.0, "class_threshold", "a probability in [0, 1)")
        need(0.0 <= self.context_low < 1.0, "context_low", "a probability in [0, 1)")
        need(0.0 < self.context_high <= 1.0, "context_high", "a probability in (0, 1]")
        need(self.context_low < self.context_high, "context_low", f"< context_high ({self.context_high})")
        need(
            self.images_per_class is None or (is_int(self.images_per_class) and 1 <= self.images_per_class <= 10_000),
            "images_per_class",
            "None or an int in 1..10000 (COCO uses 100)",
        )
        need(is_int(self.seed) and 0 <= self.seed < 2**32, "seed", "an int in [0, 2**32)")
        need(is_int(self.memory_budget_bytes) and self.memory_budget_bytes > 0, "memory_budget_bytes", "a positive int")
        need(is_int(self.kmeans_max_iter) and 1 <= self.kmeans_max_iter <= 100_000, "kmeans_max_iter",
             "an int in 1..100000")
        need(self.kmeans_tol >= 0, "kmeans_tol", "a number >= 0")
        need(is_int(self.kmeans_n_init) and 1 <= self.kmeans_n_init <= 1000, "kmeans_n_init", "an int in 1..1000")
        need(1 <= len(self.scales) <= 16 and all(0 < s <= 16 and math.isfinite(s) for s in self.scales), "scales",
             "1 to 16 scales in (0, 16]")
        need(self.max_normalise_eps >= 0, "max_normalise_eps", "a number >= 0")

    # ------------------------------------------------------------------ presets
    @classmethod
    def preset(cls, name: str, **overrides: Any) -> LPCAMConfig:
        """The paper's settings for ``"voc"`` or ``"coco"`` (docs/method.md), with optional overrides.

        Example:
            >>> LPCAMConfig.preset("coco").num_clusters
            20
        """
        key = name.lower()
        if key not in PRESETS:
            raise ValueError(f"unknown preset {name!r}: expected one of {sorted(PRESETS)}")
        return cls(**{**PRESETS[key], "preset_name": key, **overrides})

    def replace(self, **changes: Any) -> LPCAMConfig:
        """A copy with some settings changed (validated)."""
        return dataclasses.replace(self, **changes)

    # ------------------------------------------------------------------ (de)serialisation
    def to_dict(self) -> dict[str, Any]:
        """Plain-Python dict (YAML/JSON safe)."""
        out = dataclasses.asdict(self)
        out["scales"] = list(self.scales)
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any], *, source: str = "dict") -> LPCAMConfig:
        """Build from a mapping; a ``preset`` key selects the base values, other keys override.

        Unknown keys raise ``ValueError`` naming them and ``source``.
        """
        if not isinstance(data, dict):
            raise TypeError(f"{source}: expected a mapping of LPCAM settings, got {type(data).__name__}")
        data = dict(data)
        known = {f.name for f in fields(cls)}
        preset = data.pop("preset", None)
        unknown = sorted(map(str, set(data) - known))
        if unknown:
            raise ValueError(f"{source}: unknown LPCAM setting(s) {short_repr(unknown)}{did_you_mean(unknown, known)}; "
                             f"known: {sorted(known - {'preset_name'} | {'preset'})}")  # what to_yaml writes, shown as `preset`
        try:
            if preset is not None:
                return cls.preset(str(preset), **data)
            return cls(**data)
        except ValueError as err:
            raise ValueError(f"{source}: {err}") from None

    def to_yaml(self, path: str | os.PathLike | None = None) -> str:
        """YAML text of the settings; also written atomically to ``path`` when given."""
        import yaml

        text = yaml.safe_dump(self.to_dict(), sort_keys=True)
        if path is not None:
            from .io import atomic_write_bytes

            atomic_write_bytes(path, text.encode())
        return text

    @classmethod
    def from_yaml(cls, path_or_text: str | os.PathLike) -> LPCAMConfig:
        """Load from a YAML file path (or YAML text containing a newline).

        The file may hold at most 1 MiB and no YAML aliases (``&a`` / ``*a``): a few hundred bytes of
        nested aliases expand to gigabytes.
        """
        text = os.fspath(path_or_text)
        if "\n" in text:
            return cls.from_dict(parse_yaml_mapping(text, "YAML text"), source="YAML text")
        return cls.from_dict(load_yaml_mapping(text, text), source=text)


_MAX_YAML_BYTES = 1 << 20


def short_repr(value: Any, limit: int = 80) -> str:
    """``repr(value)`` cut to ``limit`` characters: an error message never carries a whole file."""
    text = repr(value) if not isinstance(value, (dict, list, tuple)) or len(value) < 64 else f"<{type(value).__name__} of {len(value)} items>"
    return text if len(text) <= limit else text[:limit] + "..."


def parse_yaml_mapping(text: str, where: str) -> dict[str, Any]:
    """YAML text -> a mapping, with anchors/aliases refused; ``ValueError`` naming ``where`` otherwise."""
    import yaml

    class NoAliasLoader(yaml.SafeLoader):
        def compose_node(self, parent: Any, index: Any) -> Any:
            if self.check_event(yaml.AliasEvent):
                event = self.peek_event()
                raise ValueError(f"{where}: YAML aliases (*{event.anchor}) are not accepted in LPCAM settings")
            return super().compose_node(parent, index)

        def construct_mapping(self, node: Any, deep: bool = False) -> Any:
            seen: set[Any] = set()
            for key_node, _ in node.value:
                key = self.construct_object(key_node, deep=deep)
                if isinstance(key, (str, int, float, bool)):
                    if key in seen:
                        raise ValueError(f"{where}: key {short_repr(key)} appears twice (the second would silently win)")
                    seen.add(key)
            return super().construct_mapping(node, deep)

    try:
        data = yaml.load(text, Loader=NoAliasLoader) or {}
    except RecursionError:
        raise ValueError(f"{where}: nested too deeply to be a settings file") from None
    except ValueError as err:  # ours (naming where), or a value YAML itself refuses (a 100,000-digit number)
        if str(err).startswith(where):
            raise
        raise ValueError(f"{where}: {short_repr(str(err), 200)}") from None
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        problem = getattr(err, "problem", None) or str(err)
        at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        raise ValueError(f"{where}: not valid YAML: {short_repr(' '.join(str(problem).split()), 200)}{at}") from None
    if not isinstance(data, dict):
        raise ValueError(f"{where}: expected a mapping of LPCAM settings, got {type(data).__name__}")
    return data


def load_yaml_mapping(path: str | os.PathLike, where: str, *, max_bytes: int = _MAX_YAML_BYTES) -> dict[str, Any]:
    """A YAML file -> a mapping (:func:`parse_yaml_mapping`), refusing directories, huge and non-UTF-8 files."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{where}: LPCAM config file not found")
    if not os.path.isfile(path):
        raise ValueError(f"{where}: not a regular file (expected a YAML file of LPCAM settings)")
    if os.path.getsize(path) > max_bytes:
        raise ValueError(f"{where}: {os.path.getsize(path)} bytes; an LPCAM settings file holds at most {max_bytes}")
    try:
        with open(path, encoding="utf-8") as handle:
            text = handle.read(max_bytes + 1)  # /proc files report size 0: read no more than the cap
    except UnicodeDecodeError:
        raise ValueError(f"{where}: not UTF-8 text (expected a YAML file of LPCAM settings)") from None
    except OSError as err:
        raise ValueError(f"{where}: cannot read it ({err.strerror or type(err).__name__})") from None
    if len(text) > max_bytes:
        raise ValueError(f"{where}: longer than {max_bytes} bytes; an LPCAM settings file holds at most that")
    return parse_yaml_mapping(text, where)


PRESETS: dict[str, dict[str, Any]] = {
    # The paper's hyper-parameters: VOC clusters the 1,464 train images at one scale, no flip.
    "voc": dict(
        num_clusters=12,
        fg_threshold=0.1,
        class_threshold=0.9,
        context_low=0.05,
        context_high=0.9,
        fallback_best_center=True,
        images_per_class=None,
        seed=666,
    ),
    # COCO: 100 images per class sampled with replacement (seed 666), argmax fallback.
    "coco": dict(
        num_clusters=20,
        fg_threshold=0.25,
        class_threshold=0.9,
        context_low=0.0,
        context_high=0.5,
        fallback_best_center=True,
        images_per_class=100,
        seed=666,
    ),
}


def closest_key(key: str, known: Iterable[str]) -> str | None:
    """The known key ``key`` most likely misspells (difflib ratio at least 0.75), else None."""
    import difflib

    close = difflib.get_close_matches(str(key), sorted(map(str, known)), n=1, cutoff=0.75)
    return close[0] if close else None


def did_you_mean(unknown: Sequence[str], known: Iterable[str]) -> str:
    """`` (did you mean 'x' for 'y'?)`` for the first unknown key with a close known one, else ''."""
    known = list(known)
    for key in unknown:
        close = closest_key(key, known)
        if close:
            return f" (did you mean {close!r} for {str(key)!r}?)"
    return ""

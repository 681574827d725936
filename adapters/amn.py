"""``import lpcam_adapters.amn`` as the first line of AMN's ``run_sample.py`` swaps CAM for LPCAM.

AMN (https://github.com/gaviotas/AMN, branch voc12) produces CAMs in two places, and the import
registers a patch for each through the import hook (:mod:`lpcam_adapters._hooks`), without
importing any AMN module:

* stage (a), ``step.make_cam:run`` (byte-identical to IRN's): the IRN family's LPCAM pass,
  :func:`lpcam_adapters._irn_family.make_cam_pass`, exactly as ``lpcam_adapters.irn`` runs it;
* stage (b), ``step.make_amn_cam:run``: :func:`make_amn_cam_pass`. It replaces AMN's worker (not
  only the forward): LPCAM maps of the present classes in channels 1..n, a placeholder background
  in channel 0, ``{"keys", "cam" (torch), "high_res" (numpy)}`` in ``amn_cam_out_dir``, so
  ``eval_amn_cam``, ``amn_cam_to_ir_label`` and ``make_sem_seg_labels`` (which drop channel 0)
  run unchanged;
* the modern-stack shims of :mod:`lpcam_adapters._compat` (VOC ids, chainercv stand-in used by
  ``eval_amn_cam`` and ``train_amn``, no ImageNet download when a checkpoint is loaded).

Every map this module computes runs AMN's head with Dropout off (AMN's own ``eval()`` keeps it
active, so its own CAMs change run to run); the model's ``training`` flags are never touched.

Stage (b) choices the paper leaves open are settings (:class:`AMNSettings`, environment variables
``LPCAM_AMN_*`` or an ``amn:`` section in the ``LPCAM_CONFIG`` YAML):

============  ===============  ===========================================================
setting       default          why
============  ===============  ===========================================================
features      ``conditioned``  stage4 * label_enc(y) is the only input AMN's head was
                               trained on, so only its centres can be scored by that head
                               (``raw`` folds each class's own embedding into the scorer)
classifier    ``all_taps``     the head's exact response to a constant map (a prototype
                               everywhere); centre taps drop 8/9 of every branch
softmax       ``20``           mu_f / context_low / mu_b are the paper's 20-way values; with
                               the background row, background centres score p_c ~ 0 and
                               fall below context_low, leaving few context prototypes
split         ``amn_cam``      the paper's recipe (the host's own maps at tau), and AMN's
                               maps are the better seed than the CAM behind the ir_label PNGs
background    ``one_minus_max`` every AMN consumer drops channel 0; 1 - max keeps a reader
                               that argmaxes over all channels sensible
============  ===============  ===========================================================

Import only this adapter in AMN (it takes over the stage-(a) patch that ``lpcam_adapters.irn``
would register). ``lpcam amn --explain`` lists the patches and settings.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib
import logging
import os
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from . import _compat, _hooks, _irn_family, _settings
from ._amn_choices import BACKGROUNDS, CLASSIFIERS, FEATURES, SOFTMAX_WAYS, SPLITS, STAGES

__all__ = [
    "HOST_A",
    "AMN_THRESHOLDS",
    "AMN_ENV_VARS",
    "AMNSettings",
    "amn_settings_from_env",
    "load_amn_model",
    "head_modules",
    "aspp_branches",
    "equivalent_classifier",
    "scoring_classifier",
    "label_embedding",
    "amn_features",
    "amn_logits",
    "ir_label_cams",
    "background_placeholder",
    "amn_lpcam_record",
    "build_amn_bank",
    "build_amn_bank_sharded",
    "amn_baseline_pass",
    "amn_lpcam_pass",
    "sharded_amn_baseline_pass",
    "sharded_amn_lpcam_pass",
    "make_amn_cam_pass",
    "install",
    "explain",
]

logger = logging.getLogger(__name__)

NUM_CLASSES = 20

#: Stage (a) is IRN's make_cam; AMN's script runs its next steps at IRN's thresholds.
HOST_A = _irn_family.HostSpec(name="amn (stage a)", weights_suffix=".pth", thresholds=(0.15, 0.30, 0.05, 0.25))
#: AMN's stage (b) thresholds: eval_amn_cam, conf_fg, conf_bg, sem_seg_bg (maps ** 1.3).
AMN_THRESHOLDS = (0.25, 0.45, 0.15, 0.25)


#: Environment variables of the AMN adapter (on top of :data:`lpcam_adapters._irn_family.ENV_VARS`).
AMN_ENV_VARS: dict[str, str] = {
    "LPCAM_AMN_STAGES": "stages swapped: 'a,b' (default), 'b' (AMN's stage-(a) CAM kept), 'a', or 'none'",
    "LPCAM_AMN_FEATURES": "conditioned (default: stage4 * label_enc(y), what the ASPP scores) or raw (stage4)",
    "LPCAM_AMN_CLASSIFIER": "all_taps (default: exact ASPP response to a constant map) or centre (centre taps)",
    "LPCAM_AMN_SOFTMAX": "20 (default: rows 1..20, the paper's thresholds assume 20-way) or 21 (with background)",
    "LPCAM_AMN_SPLIT": "amn_cam (default: AMN's own maps, Dropout off, at tau) or ir_label (stage-(a) PNGs)",
    "LPCAM_AMN_BACKGROUND": "channel 0 of the files: one_minus_max (default) or zeros; AMN's consumers drop it",
    "LPCAM_AMN_BANK": "stage-(b) bank file (default <dirname(amn_cam_out_dir)>/lpcam_bank_amn.pt)",
    "LPCAM_AMN_BASELINE_DIR": "AMN's own maps of the prototype list (default <amn_cam_out_dir>_baseline)",
}

_YAML_KEYS = {
    "stages": "stages",
    "features": "features",
    "classifier": "classifier",
    "softmax": "softmax",
    "split": "split",
    "background": "background",
    "bank": "bank_path",
    "bank_path": "bank_path",
    "baseline_dir": "baseline_dir",
}


# --------------------------------------------------------------------------- settings


@dataclass(frozen=True)
class AMNSettings:
    """Settings of the AMN adapter.

    Attributes:
        base: The IRN family's settings (``LPCAM``, K, tau, mu, seed, workers, device, proto list,
            and stage (a)'s bank and baseline directory).
        stages: Which stages are swapped (``("a", "b")`` by default).
        features: ``"conditioned"``: stage4 features times the label embedding, the input of
            AMN's ASPP (default); ``"raw"``: stage4 features, scored with each class's own
            embedding folded into the classifier.
        classifier: ``"all_taps"``: every tap of every ASPP branch summed, biases summed (the
            exact response to a constant map, default); ``"centre"``: centre taps only.
        softmax: 20 (rows 1..20, default) or 21 (with the background row) ways when scoring.
        split: ``"amn_cam"``: AMN's own maps (Dropout off) at tau split the pools (default);
            ``"ir_label"``: the stage-(a) ir_label PNGs (class / background and other classes /
            ignore).
        background: Channel 0 written to the files: ``"one_minus_max"`` (1 - max over the
            present classes, default) or ``"zeros"``; AMN's consumers drop it.
        bank_path: Stage (b)'s bank (``None``: ``<dirname(amn_cam_out_dir)>/lpcam_bank_amn.pt``).
        baseline_dir: AMN's own maps of the prototype list (``None``: ``<amn_cam_out_dir>_baseline``).
    """

    base: _irn_family.AdapterSettings = field(default_factory=_irn_family.AdapterSettings)
    stages: tuple[str, ...] = STAGES
    features: str = "conditioned"
    classifier: str = "all_taps"
    softmax: int = 20
    split: str = "amn_cam"
    background: str = "one_minus_max"
    bank_path: str | None = None
    baseline_dir: str | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "stages", _parse_stages(self.stages, "stages"))
        classifier = "centre" if self.classifier == "center" else self.classifier
        object.__setattr__(self, "classifier", classifier)
        for name, allowed in (("features", FEATURES), ("classifier", CLASSIFIERS), ("split", SPLITS),
                              ("background", BACKGROUNDS)):
            if getattr(self, name) not in allowed:
                raise ValueError(f"AMN setting {name}={getattr(self, name)!r}: expected one of {list(allowed)}")
        try:
            ways = int(self.softmax)
        except (TypeError, ValueError):
            ways = -1
        if ways not in SOFTMAX_WAYS:
            raise ValueError(f"AMN setting softmax={self.softmax!r}: expected 20 or 21")
        object.__setattr__(self, "softmax", ways)

    @property
    def enabled_b(self) -> bool:
        """Whether stage (b) writes LPCAM maps."""
        return self.base.enabled and "b" in self.stages

    @property
    def enabled_a(self) -> bool:
        """Whether stage (a) writes LPCAM maps."""
        return self.base.enabled and "a" in self.stages

    def choices(self) -> dict[str, Any]:
        """The stage-(b) choices that change the bank (stored in its metadata, checked on reuse)."""
        return {"features": self.features, "classifier": self.classifier, "softmax": self.softmax, "split": self.split}


def _parse_stages(value: Any, name: str) -> tuple[str, ...]:
    if isinstance(value, str):
        text = value.strip().lower()
        tokens = [] if text in ("none", "") else [t for t in text.replace(",", " ").replace("+", " ").split() if t]
        if len(tokens) == 1 and tokens[0] not in STAGES and set(tokens[0]) <= set(STAGES):
            tokens = list(tokens[0])  # "ab"
    else:
        tokens = [str(t).strip().lower() for t in value]
    bad = [t for t in tokens if t not in STAGES]
    if bad:
        raise ValueError(f"{name}={value!r}: expected stages among {list(STAGES)} (e.g. 'a,b', 'b', 'none')")
    return tuple(s for s in STAGES if s in tokens)


def amn_settings_from_env(environ: Mapping[str, str] | None = None) -> AMNSettings:
    """:class:`AMNSettings` from the IRN family's settings plus ``LPCAM_AMN_*`` and the YAML ``amn:`` section.

    Order: defaults, then the ``amn:`` section of the ``LPCAM_CONFIG`` YAML, then the variables
    (see :data:`AMN_ENV_VARS`).

    Raises:
        ValueError: a malformed value or an unknown key, naming it.
    """
    env = dict(os.environ if environ is None else environ)
    config = _settings.read_config(env.get("LPCAM_CONFIG", "").strip(),
                                   {"adapter": _irn_family.ADAPTER_KEYS, "amn": _YAML_KEYS})
    base = _irn_family.settings_from_config(env, config)
    section = dict(config.sections["amn"])
    for var, name in (
        ("LPCAM_AMN_STAGES", "stages"),
        ("LPCAM_AMN_FEATURES", "features"),
        ("LPCAM_AMN_CLASSIFIER", "classifier"),
        ("LPCAM_AMN_SOFTMAX", "softmax"),
        ("LPCAM_AMN_SPLIT", "split"),
        ("LPCAM_AMN_BACKGROUND", "background"),
        ("LPCAM_AMN_BANK", "bank_path"),
        ("LPCAM_AMN_BASELINE_DIR", "baseline_dir"),
    ):
        if var in env and (env[var].strip() or var == "LPCAM_AMN_STAGES"):
            section[name] = env[var].strip()
    if "softmax" in section:
        try:
            section["softmax"] = int(section["softmax"])
        except (TypeError, ValueError):
            raise ValueError(f"AMN setting softmax={section['softmax']!r}: expected 20 or 21") from None
    for name in ("features", "classifier", "split", "background"):
        if isinstance(section.get(name), str):
            section[name] = section[name].strip().lower()
    return AMNSettings(base=base, **section)


# --------------------------------------------------------------------------- model access


def load_amn_model(args: Any) -> nn.Module:
    """AMN's stage-(b) ``CAM`` with ``args.amn_weights_name + '.pth'`` (CPU load, no ImageNet download)."""
    return _irn_family.load_model(args.amn_network, args.amn_weights_name + ".pth")


def head_modules(model: nn.Module) -> list[nn.Module]:
    """The modules of AMN's ``classifier`` that are not Dropout, in order (AMN: ``[_ASPP]``)."""
    classifier = getattr(model, "classifier", None)
    if classifier is None:
        raise AttributeError(f"{type(model).__name__} has no `classifier`: not AMN's resnet50_amn network")
    modules = list(classifier.children()) if isinstance(classifier, nn.Sequential) else [classifier]
    head = [m for m in modules if not isinstance(m, nn.modules.dropout._DropoutNd)]
    if not head:
        raise ValueError(f"{type(model).__name__}.classifier holds only Dropout")
    return head


def aspp_branches(model: nn.Module) -> list[nn.Conv2d]:
    """The convolutions of AMN's ASPP head, whose outputs it sums ([21, C, 3, 3] each, with bias).

    Raises:
        ValueError: the head is not one module of parallel ``Conv2d`` branches of equal shape.
    """
    head = head_modules(model)
    if len(head) != 1:
        raise ValueError(f"expected AMN's classifier = Dropout + one ASPP module, got {[type(m).__name__ for m in head]}")
    module = head[0]
    convs = [module] if isinstance(module, nn.Conv2d) else list(module.children())
    if not convs or not all(isinstance(c, nn.Conv2d) for c in convs):
        raise ValueError(f"{type(module).__name__}: expected parallel Conv2d branches (AMN's _ASPP)")
    shapes = {(c.in_channels, c.out_channels, c.kernel_size, c.groups) for c in convs}
    if len(shapes) != 1 or convs[0].groups != 1:
        raise ValueError(f"{type(module).__name__}: ASPP branches of different shapes {sorted(shapes)}")
    return convs


def equivalent_classifier(model: nn.Module, mode: str = "all_taps") -> tuple[torch.Tensor, torch.Tensor]:
    """The linear classifier acting on one (conditioned) local feature, from AMN's ASPP head.

    Args:
        model: AMN's ``resnet50_amn`` network.
        mode: ``"all_taps"``: each branch's taps summed, branches summed, biases summed: the head's
            exact output at any position farther than the largest rate from the border of a
            constant map; ``"centre"``: the centre tap of each branch, biases summed.

    Returns:
        (weight [21, C] float32, bias [21] float32), row 0 = background, on the model's device.
    """
    from lpcam_core.extractor import equivalent_linear

    if mode not in CLASSIFIERS and mode != "center":
        raise ValueError(f"mode={mode!r}: expected one of {list(CLASSIFIERS)}")
    weight, bias = None, None
    for conv in aspp_branches(model):
        if mode == "all_taps":
            w, b = equivalent_linear(conv)
        else:
            kh, kw = conv.kernel_size
            w, b = conv.weight.detach()[:, :, kh // 2, kw // 2], (conv.bias.detach() if conv.bias is not None else None)
        w = w.float()
        b = b.float() if b is not None else torch.zeros(w.shape[0], device=w.device)
        weight = w if weight is None else weight + w
        bias = b if bias is None else bias + b
    assert weight is not None and bias is not None
    return weight, bias


def label_embedding(model: nn.Module, labels: torch.Tensor) -> torch.Tensor:
    """``label_enc(labels)``: [B, 20] multi-hot -> [B, C] channel weights (signed)."""
    enc = getattr(model, "label_enc", None)
    if enc is None:
        raise AttributeError(f"{type(model).__name__} has no `label_enc`: not AMN's resnet50_amn network")
    return enc(labels.float())


def scoring_classifier(
    model: nn.Module, settings: AMNSettings, class_index: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """The classifier that scores prototype centres under ``settings`` (features, classifier, softmax).

    Args:
        model: AMN's network.
        settings: The stage-(b) choices.
        class_index: With ``features="raw"``: the class whose own embedding ``label_enc(e_c)`` is
            folded into the weight (``W * y_c``, the head's response to a raw feature of an image
            labelled c alone). Ignored for conditioned features.

    Returns:
        (weight [k, C], bias [k]) float32 on CPU; k = 20 (rows 1..20) or 21 (row 0 = background).
    """
    weight, bias = equivalent_classifier(model, settings.classifier)
    if settings.features == "raw":
        if class_index is None:
            raise ValueError("scoring_classifier: raw features need the class_index whose embedding is folded in")
        onehot = torch.zeros(1, NUM_CLASSES, device=weight.device)
        onehot[0, int(class_index)] = 1.0
        with torch.no_grad():
            y = label_embedding(model, onehot)[0].float()
        weight = weight * y[None, :]
    if settings.softmax == 20:
        weight, bias = weight[1:], bias[1:]
    return weight.detach().cpu(), bias.detach().cpu()


def _stages(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return _irn_family.extract_features(model, x)


def _expand_labels(labels: torch.Tensor, batch: int, device: torch.device) -> torch.Tensor:
    labels = torch.as_tensor(labels)
    if labels.ndim == 1:
        labels = labels.unsqueeze(0).expand((batch, labels.shape[0]))
    if labels.shape != (batch, NUM_CLASSES):
        raise ValueError(f"labels must be [{NUM_CLASSES}] or [{batch}, {NUM_CLASSES}], got {tuple(labels.shape)}")
    return labels.to(device)


def amn_features(model: nn.Module, x: torch.Tensor, labels: torch.Tensor | None, conditioned: bool = True) -> torch.Tensor:
    """Local features of AMN's stage-(b) network.

    Args:
        model: AMN's network.
        x: [B, 3, H, W] normalised images (AMN: image and its flip, B = 2).
        labels: [20] or [B, 20] multi-hot image labels (needed when ``conditioned``).
        conditioned: multiply stage4 by ``label_enc(labels)`` as AMN's forward does.

    Returns:
        [B, 2048, ceil(H/16), ceil(W/16)]; raw features are non-negative, conditioned ones signed.
    """
    feats = _stages(model, x)
    if not conditioned:
        return feats
    if labels is None:
        raise ValueError("amn_features: conditioned features need the image labels")
    y = label_embedding(model, _expand_labels(labels, x.shape[0], x.device))
    return feats * y.unsqueeze(-1).unsqueeze(-1)


def amn_logits(model: nn.Module, x: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """AMN's ``CAM.forward`` with Dropout off: flip-averaged 21-way logits [21, h, w].

    Args:
        model: AMN's network (its ``training`` flags are left as they are).
        x: [2, 3, H, W] image and its flip.
        labels: [20] or [2, 20] multi-hot labels.
    """
    out = amn_features(model, x, labels, conditioned=True)
    for module in head_modules(model):
        out = module(out)
    return (out[0] + out[1].flip(-1)) / 2


# --------------------------------------------------------------------------- pools


def ir_label_cams(label_png: np.ndarray, keys: Sequence[int], tau: float) -> torch.Tensor:
    """Pseudo-CAMs that make :class:`lpcam_core.PrototypeBuilder` split by an ir_label PNG.

    Args:
        label_png: [H, W] stage-(a) ir_label (0 background, c + 1 class c, 255 ignore).
        keys: the present classes.
        tau: the builder's threshold.

    Returns:
        [n, H, W] float32: 1 where the PNG says class c (class pool), tau on ignored pixels (exactly
        tau goes to neither pool), 0 elsewhere (background and the other classes: context pool).
    """
    label = torch.as_tensor(np.asarray(label_png).astype(np.int64))
    out = torch.zeros(len(keys), *label.shape, dtype=torch.float32)
    for i, key in enumerate(keys):
        out[i][label == int(key) + 1] = 1.0
        out[i][label == 255] = float(tau)
    return out


@contextlib.contextmanager
def _quiet_missing_classes() -> Iterator[None]:
    """Hide the core's 'classes never appeared' warning of builders that see a subset of classes."""

    class _Filter(logging.Filter):
        def filter(self, record: logging.LogRecord) -> bool:
            return "never appeared" not in str(record.msg)

    log = logging.getLogger("lpcam_core.prototypes")
    flt = _Filter()
    log.addFilter(flt)
    try:
        yield
    finally:
        log.removeFilter(flt)


class _AMNPools:
    """Pools for the stage-(b) choices: one builder (conditioned), or one per class (raw features,
    each scored by its own class-conditioned classifier); 21-way keys are shifted by one."""

    def __init__(self, settings: AMNSettings) -> None:
        from lpcam_core import PrototypeBuilder

        self.settings = settings
        self.offset = 1 if settings.softmax == 21 else 0
        self.rows = NUM_CLASSES + self.offset
        cfg = settings.base.lpcam
        self.shared = PrototypeBuilder(self.rows, cfg) if settings.features == "conditioned" else None
        self.per_class: dict[int, Any] = {}
        self._per_class_cfg = cfg.replace(memory_budget_bytes=max(1, cfg.memory_budget_bytes // NUM_CLASSES))
        self.images_seen = 0

    def add(
        self,
        features: torch.Tensor,
        cams: torch.Tensor,
        keys: torch.Tensor,
        *,
        index: int | None = None,
        class_index: Mapping[int, int] | None = None,
    ) -> None:
        """features [C, h, w], cams [n, H, W] of the n present classes ``keys`` [n].

        ``index`` (the image's stream position) and ``class_index`` (class -> position among the
        images of that class, for the per-class builders of raw features) are given when the stream
        is split between processes; by default each builder counts its own images.
        """
        from lpcam_core import PrototypeBuilder

        keys = keys.long()
        self.images_seen += 1
        if self.shared is not None:
            self.shared.add(features, cams, keys + self.offset, index=index)
            return
        for i, key in enumerate(keys.tolist()):
            builder = self.per_class.get(key)
            if builder is None:
                builder = self.per_class[key] = PrototypeBuilder(self.rows, self._per_class_cfg)
            position = None
            if class_index is not None:
                if key not in class_index:
                    raise ValueError(f"class {key} is in an image's maps but not in its labels")
                position = class_index[key]
            builder.add(features, cams[i : i + 1], keys[i : i + 1] + self.offset, index=position)

    def merge(self) -> _AMNPools | None:
        """Collective: every rank's pools merged into those one process would hold, on rank 0 (None elsewhere).

        Each builder goes through :func:`lpcam_core.distributed.merge_builders` (consumed here).
        """
        from lpcam_core import PrototypeBuilder
        from lpcam_core import distributed as lpdist

        images = sum(lpdist.all_gather(self.images_seen))
        merged = _AMNPools(self.settings)
        merged.images_seen = images
        if self.shared is not None:
            merged.shared = lpdist.merge_builders(self.shared)
        else:
            keys = sorted(set().union(*lpdist.all_gather(sorted(self.per_class))))
            for key in keys:
                builder = self.per_class.pop(key, None) or PrototypeBuilder(self.rows, self._per_class_cfg)
                result = lpdist.merge_builders(builder)
                if result is not None:
                    merged.per_class[key] = result
        return merged if lpdist.rank() == 0 else None

    @property
    def bytes_held(self) -> int:
        if self.shared is not None:
            return self.shared.bytes_held
        return sum(b.bytes_held for b in self.per_class.values())

    def build(self, model: nn.Module, device: torch.device) -> Any:
        from lpcam_core import PrototypeBank
        from lpcam_core.bank import classifier_fingerprint

        parts: list[tuple[Any, list[int]]] = []
        with _quiet_missing_classes():
            if self.shared is not None:
                weight, bias = scoring_classifier(model, self.settings)
                parts.append((self.shared.build(weight.to(device), bias.to(device), device=device, progress=False), []))
            else:
                for key in sorted(self.per_class):
                    pool = self.per_class[key].pools.get(("class", key + self.offset))
                    if pool is None or pool.held == 0:
                        logger.warning("class %d: no feature in its class pool: no class prototype", key)
                        continue
                    weight, bias = scoring_classifier(model, self.settings, key)
                    parts.append((self.per_class[key].build(weight.to(device), bias.to(device), device=device,
                                                            progress=False), [key]))
        foreground: dict[int, torch.Tensor] = {}
        context: dict[int, torch.Tensor] = {}
        seen: dict[str, int] = {}
        clustered: dict[str, int] = {}
        for bank, only in parts:
            for key, rows in bank.foreground.items():
                cls = key - self.offset
                if only and cls not in only:
                    continue
                foreground[cls] = rows
                context[cls] = bank.context[key]
            for name, target in (("features_seen", seen), ("features_clustered", clustered)):
                for pool, count in (bank.meta.get(name) or {}).items():
                    kind, key = pool.split("/")
                    target[f"{kind}/{int(key) - self.offset}"] = count
        missing = sorted(set(range(NUM_CLASSES)) - set(foreground))
        if missing:
            logger.warning("classes %s have no class prototype (absent from the prototype images?)", missing)
        full_w, full_b = equivalent_classifier(model, self.settings.classifier)
        meta = {
            "config": self.settings.base.lpcam.to_dict(),
            "num_classes": NUM_CLASSES,
            "class_names": None,
            "classifier_fingerprint": classifier_fingerprint(full_w.cpu(), full_b.cpu()),
            "images_seen": self.images_seen,
            "features_seen": seen,
            "features_clustered": clustered,
        }
        return PrototypeBank(foreground, context, meta)


def _amn_fingerprint(model: nn.Module) -> str:
    """Identifies AMN's head and label embedding (the bank must be rebuilt when they change)."""
    from lpcam_core.bank import classifier_fingerprint

    weight = torch.cat([c.weight.detach().float().flatten() for c in aspp_branches(model)])
    bias = torch.cat([c.bias.detach().float().flatten() for c in aspp_branches(model) if c.bias is not None]
                     + [p.detach().float().flatten() for p in model.label_enc.parameters()])
    return classifier_fingerprint(weight.cpu(), bias.cpu())


def _amn_bank_meta(model: nn.Module, settings: AMNSettings, extra_meta: Mapping[str, Any] | None) -> dict[str, Any]:
    return {**dict(extra_meta or {}), "amn_choices": settings.choices(), "amn_fingerprint": _amn_fingerprint(model)}


def _reusable_amn_bank(bank_path: str | os.PathLike | None, settings: AMNSettings, meta: Mapping[str, Any]) -> Any:
    """The bank at ``bank_path`` when built with the same settings, choices and AMN head, else None."""
    from lpcam_core import PrototypeBank
    from lpcam_core.bank import BankError

    if bank_path is None or not os.path.isfile(bank_path) or settings.base.rebuild_bank:
        return None
    try:
        bank = PrototypeBank.load(bank_path, num_classes=NUM_CLASSES)
    except BankError as err:
        logger.warning("rebuilding the AMN prototype bank: %s", err)
        return None
    why = _irn_family._bank_matches(bank, settings.base, meta)
    if why is None:
        logger.info("reusing the AMN prototype bank %s (same checkpoint, settings and choices)", bank_path)
        return bank
    logger.warning("rebuilding the AMN prototype bank %s: %s", bank_path, why)
    return None


def _check_no_sampling(cfg: Any) -> None:
    if cfg.images_per_class is not None:
        raise ValueError("the AMN adapter clusters every prototype image (VOC preset); images_per_class is not supported")


def _amn_pool_inputs(
    model: nn.Module,
    pack: Mapping[str, Any],
    settings: AMNSettings,
    baseline_dir: str | os.PathLike | None,
    ir_label_dir: str | os.PathLike | None,
    dev: torch.device,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One prototype image: features [C, h, w] (one scale, no flip), maps [n, H, W] splitting them, keys [n].

    Call under ``torch.no_grad``.
    """
    from lpcam_core.io import load_label_png

    name = pack["name"]
    label = torch.as_tensor(pack["label"])
    img = torch.as_tensor(pack["img"])[None].to(dev)
    feats = amn_features(model, img, label, settings.features == "conditioned")[0].float()
    if settings.split == "amn_cam":
        assert baseline_dir is not None
        record = _irn_family._load_cam(os.path.join(os.fspath(baseline_dir), name + ".npy"))
        keys = torch.as_tensor(np.asarray(record["keys"])).long()
        cams = torch.as_tensor(np.asarray(record["high_res"])[1:])
    else:
        assert ir_label_dir is not None
        keys = torch.nonzero(label)[:, 0]
        png = load_label_png(os.path.join(os.fspath(ir_label_dir), name + ".png"))
        cams = ir_label_cams(png, keys.tolist(), settings.base.lpcam.fg_threshold)
    return feats, cams, keys


def build_amn_bank(
    model: nn.Module,
    proto_dataset: Any,
    settings: AMNSettings,
    *,
    baseline_dir: str | os.PathLike | None,
    ir_label_dir: str | os.PathLike | None,
    bank_path: str | os.PathLike | None = None,
    device: str | None = None,
    extra_meta: Mapping[str, Any] | None = None,
    num_workers: int = 0,
) -> Any:
    """Stream the prototype images into pools split as ``settings.split`` says and build the bank.

    Each image gives its one-scale, unflipped features (:func:`amn_features`, conditioned or raw)
    and either AMN's own maps ``<baseline_dir>/<id>.npy`` (``high_res[1:]``) or pseudo-CAMs of its
    ``<ir_label_dir>/<id>.png`` (:func:`ir_label_cams`). A bank at ``bank_path`` with the same
    settings, choices and AMN head is reused unless ``settings.base.rebuild_bank``.

    Args:
        model: AMN's network.
        proto_dataset: ``voc12.dataloader.VOC12ClassificationDataset`` of the prototype list.
        settings: AMN settings.
        baseline_dir: AMN's own maps of the prototype images (``split="amn_cam"``).
        ir_label_dir: Stage-(a) ir_label PNGs (``split="ir_label"``).
        bank_path: Where the bank is cached.
        device: Device of features and K-means.
        extra_meta: Stored in the bank's metadata and compared on reuse.
        num_workers: DataLoader workers.

    Returns:
        :class:`lpcam_core.PrototypeBank` over the 20 classes.
    """
    meta = _amn_bank_meta(model, settings, extra_meta)
    bank = _reusable_amn_bank(bank_path, settings, meta)
    if bank is not None:
        return bank

    cfg = settings.base.lpcam
    _check_no_sampling(cfg)
    dev = _irn_family._device_for(0, 1, device)
    model = model.to(dev)
    pools = _AMNPools(settings)
    progress = _irn_family._Progress("AMN prototype features", len(proto_dataset), 0)
    peak = 0
    with torch.no_grad():
        for done, pack in enumerate(_irn_family._loader(proto_dataset, num_workers), 1):
            feats, cams, keys = _amn_pool_inputs(model, pack, settings, baseline_dir, ir_label_dir, dev)
            pools.add(feats, cams, keys)
            peak = max(peak, pools.bytes_held)
            progress.update(done)
    logger.info("AMN prototype pools: peak %.1f MiB (budget %.1f MiB)", peak / 2**20, cfg.memory_budget_bytes / 2**20)
    bank = pools.build(model, dev)
    bank.meta.update(meta)
    bank.meta["pool_peak_bytes"] = int(peak)
    if bank_path is not None:
        os.makedirs(os.path.dirname(os.path.abspath(bank_path)), exist_ok=True)
        bank.save(bank_path)
    return bank


# --------------------------------------------------------------------------- AMN's own maps, Dropout off


def _amn_baseline_worker(
    process_id: int,
    nprocs: int,
    model: nn.Module,
    dataset: Any,
    out_dir: str,
    ir_label_dir: str,
    skip_existing: bool,
    device: str | None,
    num_workers: int,
) -> None:
    """AMN's stage-(b) maps (its make_amn_cam maths) with Dropout off, into ``out_dir``.

    Per image: flip-averaged 21-way logits per scale, averaged over scales at the stride-4 grid
    and at the image size, softmax over the 21 channels, channel 0 and the present classes kept,
    min-max normalised where the stage-(a) ir_label is not background; saved as AMN saves them.
    """
    from lpcam_core.io import save_irn_cam

    _irn_family._worker_setup(process_id, nprocs)
    dev = _irn_family._device_for(process_id, nprocs, device)
    databin = _irn_family._split(dataset, nprocs, process_id)
    model = model.to(dev)
    progress = _irn_family._Progress(f"AMN maps (Dropout off) -> {out_dir}", len(databin), process_id)
    with torch.no_grad():
        for done, pack in enumerate(_irn_family._loader(databin, num_workers), 1):
            path = os.path.join(out_dir, pack["name"] + ".npy")
            if not (skip_existing and os.path.isfile(path)):
                rec = _amn_baseline_maps(model, pack, ir_label_dir, dev)
                save_irn_cam(path, rec["keys"], rec["cam"], rec["high_res"], fsync=False)
            progress.update(done)


def _amn_baseline_maps(model: nn.Module, pack: Mapping[str, Any], ir_label_dir: str, dev: torch.device) -> dict:
    """AMN's own maps of one MSF item (see :func:`_amn_baseline_worker`), under ``torch.no_grad``.

    Returns:
        ``{"keys": int64 [n], "cam": float32 [1 + n, ceil(H/4), ceil(W/4)], "high_res": numpy [1 + n, H, W]}``.
    """
    from PIL import Image

    name = pack["name"]
    label = torch.as_tensor(pack["label"])
    size = _irn_family._size(pack["size"])
    png = os.path.join(ir_label_dir, name + ".png")
    if not os.path.isfile(png):
        raise FileNotFoundError(f"ir_label PNG missing: {png} (run AMN's --cam_to_ir_label_pass first)")
    label_amn = Image.open(png)
    strided = ((size[0] - 1) // 4 + 1, (size[1] - 1) // 4 + 1)
    label_down = np.array(label_amn.resize((strided[1], strided[0]), resample=Image.NEAREST))
    label_up = np.array(label_amn.resize((size[1], size[0]), resample=Image.NEAREST))
    outputs = [amn_logits(model, img.to(dev, non_blocking=True), label.unsqueeze(0).expand((img.shape[0], NUM_CLASSES)).to(dev))
               for img in _irn_family._scales(pack["img"])]
    strided_cam = torch.sum(torch.stack(
        [F.interpolate(torch.unsqueeze(o, 0), strided, mode="bilinear", align_corners=False)[0] for o in outputs]
    ), 0) / len(outputs)
    highres = [F.interpolate(torch.unsqueeze(o, 1), size, mode="bilinear", align_corners=False) for o in outputs]
    highres_cam = torch.sum(torch.stack(highres, 0), 0)[:, 0, : size[0], : size[1]] / len(outputs)
    valid_cat = torch.nonzero(label)[:, 0]
    keys = np.pad(valid_cat.numpy() + 1, (1, 0), mode="constant")
    strided_cam = F.softmax(strided_cam, dim=0)[keys].cpu().numpy()
    highres_cam = F.softmax(highres_cam, dim=0)[keys].cpu().numpy()
    strided_cam = _normalise_foreground(strided_cam, label_down)
    highres_cam = _normalise_foreground(highres_cam, label_up)
    return {"keys": valid_cat, "cam": torch.tensor(strided_cam), "high_res": highres_cam}


def _normalise_foreground(cams: np.ndarray, label: np.ndarray) -> np.ndarray:
    """AMN's rule: min-max normalise each map ([c, h, w]) where ``label`` is not background (0)."""
    low = np.min(cams, (1, 2), keepdims=True)
    high = np.max(cams, (1, 2), keepdims=True)
    norm = (cams - low) / (high - low + 1e-5)
    fg = np.broadcast_to(label != 0, cams.shape)
    out = cams.copy()
    out[fg] = norm[fg]
    return out


def amn_baseline_pass(
    model: nn.Module,
    dataset: Any,
    out_dir: str | os.PathLike,
    ir_label_dir: str | os.PathLike,
    *,
    skip_existing: bool = False,
    workers: int = 0,
    device: str | None = None,
    num_workers: int = 0,
) -> None:
    """Write AMN's own stage-(b) maps (Dropout off, deterministic) of ``dataset`` (an MSF dataset).

    Args:
        model: AMN's network.
        dataset: ``voc12.dataloader.VOC12ClassificationDatasetMSF``.
        out_dir: Output directory (created).
        ir_label_dir: Stage-(a) ir_label PNGs (AMN normalises where they are not background).
        skip_existing: Keep files already there.
        workers: Processes (0/1 in-process, > 1 spawned).
        device: Device of in-process work.
        num_workers: DataLoader workers per process.
    """
    os.makedirs(out_dir, exist_ok=True)
    record = None if skip_existing else _irn_family.maps_record("amn", model, dataset)
    with _irn_family.rewriting_map_dir(out_dir, record):
        _irn_family._run(_amn_baseline_worker, workers,
                         (model, dataset, os.fspath(out_dir), os.fspath(ir_label_dir), skip_existing, device,
                          num_workers))


# --------------------------------------------------------------------------- LPCAM maps in AMN's format


def background_placeholder(maps: torch.Tensor, kind: str = "one_minus_max") -> torch.Tensor:
    """Channel 0 for [n, h, w] class maps in [0, 1]: ``1 - max`` over classes (ones if n = 0) or zeros."""
    if kind == "zeros":
        return torch.zeros(1, *maps.shape[1:], dtype=torch.float32)
    if kind != "one_minus_max":
        raise ValueError(f"background kind {kind!r}: expected one of {list(BACKGROUNDS)}")
    if maps.shape[0] == 0:
        return torch.ones(1, *maps.shape[1:], dtype=torch.float32)
    return (1.0 - maps.float().amax(0, keepdim=True)).clamp(0.0, 1.0)


def amn_lpcam_record(
    features: list[torch.Tensor], bank: Any, keys: torch.Tensor, size: tuple[int, int], background: str = "one_minus_max"
) -> dict[str, Any]:
    """LPCAM of one image in AMN's stage-(b) format.

    Args:
        features: list over scales of [2, C, h, w] (image, flip) features.
        bank: the stage-(b) prototype bank.
        keys: [n] present classes.
        size: (H, W).
        background: channel 0 (:func:`background_placeholder`).

    Returns:
        ``{"keys": int64 [n], "cam": torch float32 [1 + n, ceil(H/4), ceil(W/4)],
        "high_res": numpy float32 [1 + n, H, W]}``; channels 1..n are
        :func:`lpcam_core.lpcam_multiscale` (a class without prototypes: zeros, warned).
    """
    rec = _irn_family._lpcam_record(features, bank, keys, size)
    cam = torch.as_tensor(rec["cam"]).float()
    high = torch.as_tensor(np.asarray(rec["high_res"])).float()
    return {
        "keys": torch.as_tensor(rec["keys"]).long(),
        "cam": torch.cat([background_placeholder(cam, background), cam]),
        "high_res": torch.cat([background_placeholder(high, background), high]).numpy(),
    }


def _amn_lpcam_worker(
    process_id: int,
    nprocs: int,
    model: nn.Module,
    dataset: Any,
    bank_path: str,
    out_dir: str,
    conditioned: bool,
    background: str,
    device: str | None,
    num_workers: int,
) -> None:
    """LPCAM maps of a share of ``dataset`` in AMN's format (the bank read from ``bank_path``)."""
    from lpcam_core import PrototypeBank
    from lpcam_core.io import save_irn_cam

    _irn_family._worker_setup(process_id, nprocs)
    dev = _irn_family._device_for(process_id, nprocs, device)
    bank = PrototypeBank.load(bank_path)
    databin = _irn_family._split(dataset, nprocs, process_id)
    model = model.to(dev)
    progress = _irn_family._Progress(f"AMN LPCAM -> {out_dir}", len(databin), process_id)
    with torch.no_grad():
        for done, pack in enumerate(_irn_family._loader(databin, num_workers), 1):
            rec = _amn_lpcam_maps(model, pack, bank, dev, conditioned, background)
            save_irn_cam(os.path.join(out_dir, pack["name"] + ".npy"), rec["keys"], rec["cam"], rec["high_res"],
                         fsync=False)
            progress.update(done)


def _amn_lpcam_maps(model: nn.Module, pack: Mapping[str, Any], bank: Any, dev: torch.device, conditioned: bool,
                    background: str) -> dict[str, Any]:
    """:func:`amn_lpcam_record` of one MSF item (features at every scale), under ``torch.no_grad``."""
    label = torch.as_tensor(pack["label"])
    keys = torch.nonzero(label)[:, 0]
    features = [amn_features(model, img.to(dev, non_blocking=True), label, conditioned)
                for img in _irn_family._scales(pack["img"])]
    return amn_lpcam_record(features, bank, keys, _irn_family._size(pack["size"]), background)


def amn_lpcam_pass(
    model: nn.Module,
    dataset: Any,
    bank_path: str | os.PathLike,
    out_dir: str | os.PathLike,
    settings: AMNSettings,
    *,
    workers: int = 0,
    device: str | None = None,
    num_workers: int = 0,
) -> None:
    """Write LPCAM maps of ``dataset`` (an MSF dataset) to ``out_dir`` in AMN's stage-(b) format.

    Args:
        model: AMN's network.
        dataset: ``voc12.dataloader.VOC12ClassificationDatasetMSF``.
        bank_path: Stage-(b) bank (workers load it by path).
        out_dir: Output directory (created).
        settings: ``features`` and ``background`` are used.
        workers: Processes (0/1 in-process, > 1 spawned).
        device: Device of in-process work.
        num_workers: DataLoader workers per process.
    """
    os.makedirs(out_dir, exist_ok=True)
    with _irn_family.rewriting_map_dir(out_dir, _amn_lpcam_record(model, dataset, bank_path, settings)):
        _irn_family._run(_amn_lpcam_worker, workers, (model, dataset, os.fspath(bank_path), os.fspath(out_dir),
                                                      settings.features == "conditioned", settings.background,
                                                      device, num_workers))


def _amn_lpcam_record(model: nn.Module, dataset: Any, bank_path: str | os.PathLike, settings: AMNSettings) -> dict:
    """:func:`~lpcam_adapters._irn_family.maps_record` of AMN LPCAM maps (their background choice included)."""
    return _irn_family.maps_record("amn_lpcam", model, dataset, bank_path=bank_path, background=settings.background,
                                   features=settings.features)


# --------------------------------------------------------------------------- under torchrun


def sharded_amn_baseline_pass(
    model: nn.Module,
    dataset: Any,
    out_dir: str | os.PathLike,
    ir_label_dir: str | os.PathLike,
    device: torch.device,
    *,
    ids: Sequence[str] | None = None,
    overwrite: bool = False,
    num_workers: int = 0,
) -> Any:
    """:func:`amn_baseline_pass` under torchrun: each rank writes its shard of ``ids`` (default all) on ``device``."""
    model = model.to(device)
    label_dir = os.fspath(ir_label_dir)
    # Filling in missing ids of a prototype run's baseline directory: its own record guards it.
    record = _irn_family.maps_record("amn", model, dataset) if ids is None else None
    return _irn_family.sharded_maps(dataset, lambda pack: _amn_baseline_maps(model, pack, label_dir, device), out_dir,
                                    ids=ids, overwrite=overwrite, num_workers=num_workers,
                                    desc=f"AMN maps (Dropout off) -> {out_dir}", record=record)


def sharded_amn_lpcam_pass(
    model: nn.Module,
    dataset: Any,
    bank_path: str | os.PathLike,
    out_dir: str | os.PathLike,
    settings: AMNSettings,
    device: torch.device,
    *,
    read_dirs: Sequence[str | os.PathLike | None] = (),
    overwrite: bool = False,
    num_workers: int = 0,
) -> Any:
    """:func:`amn_lpcam_pass` under torchrun: each rank loads the bank and writes its shard on ``device``."""
    from lpcam_core import PrototypeBank

    bank = PrototypeBank.load(bank_path)
    model = model.to(device)
    conditioned = settings.features == "conditioned"

    def compute(pack: Mapping[str, Any]) -> dict[str, Any]:
        return _amn_lpcam_maps(model, pack, bank, device, conditioned, settings.background)

    return _irn_family.sharded_maps(dataset, compute, out_dir, read_dirs=read_dirs, overwrite=overwrite,
                                    num_workers=num_workers, desc=f"AMN LPCAM -> {out_dir}",
                                    record=_amn_lpcam_record(model, dataset, bank_path, settings))


def build_amn_bank_sharded(
    model: nn.Module,
    proto_dataset: Any,
    settings: AMNSettings,
    device: torch.device,
    *,
    baseline_dir: str | os.PathLike | None,
    ir_label_dir: str | os.PathLike | None,
    bank_path: str | os.PathLike | None = None,
    extra_meta: Mapping[str, Any] | None = None,
    num_workers: int = 0,
) -> Any:
    """Collective: :func:`build_amn_bank` under torchrun.

    Rank 0 decides on reuse (as :func:`build_amn_bank`) and tells the others. Otherwise each rank adds
    its shard of the images (strided) with their global stream positions (and, for raw features, their
    positions among the images of each class), the pools are merged on rank 0
    (:meth:`_AMNPools.merge`), which builds and saves the bank: the one :func:`build_amn_bank` builds,
    for any world size (``meta["pool_peak_bytes"]`` aside: the most one rank held).

    Returns:
        :class:`lpcam_core.PrototypeBank` (on every rank; the others read the file rank 0 saved).
    """
    from lpcam_core import PrototypeBank
    from lpcam_core import distributed as lpdist

    meta = _amn_bank_meta(model, settings, extra_meta)
    bank = _reusable_amn_bank(bank_path, settings, meta) if lpdist.rank() == 0 else None
    if lpdist.broadcast_object(bank is not None):
        return bank if bank is not None else PrototypeBank.load(bank_path, num_classes=NUM_CLASSES)

    cfg = settings.base.lpcam
    _check_no_sampling(cfg)
    model = model.to(device)
    ids = _irn_family.image_ids(proto_dataset)
    seen: dict[int, int] = {}
    class_index: list[dict[int, int]] = []  # per image: class -> position among the images of that class
    for i in range(len(ids)):
        classes = torch.nonzero(torch.as_tensor(proto_dataset.label_list[i]))[:, 0].tolist()
        class_index.append({c: seen.get(c, 0) for c in classes})
        for c in classes:
            seen[c] = seen.get(c, 0) + 1
    mine = lpdist.shard_indices(len(ids))
    feed = _irn_family._PackFeed(proto_dataset, ids, [ids[i] for i in mine], num_workers)
    pools = _AMNPools(settings)
    peak = 0
    try:
        with torch.no_grad():
            for i in mine:
                feats, cams, keys = _amn_pool_inputs(model, feed(ids[i]), settings, baseline_dir, ir_label_dir, device)
                pools.add(feats, cams, keys, index=i, class_index=class_index[i])
                peak = max(peak, pools.bytes_held)
    finally:
        feed.close()
    peak = max(lpdist.all_gather(peak))
    merged = pools.merge()
    outcome: Any = None
    if merged is not None:  # rank 0
        try:
            bank = merged.build(model, device)
            bank.meta.update(meta)
            bank.meta["pool_peak_bytes"] = int(peak)
            if bank_path is not None:
                os.makedirs(os.path.dirname(os.path.abspath(bank_path)), exist_ok=True)
                bank.save(bank_path)
            outcome = "ok"
        except Exception as err:  # tell the other ranks instead of leaving them waiting
            outcome = f"{type(err).__name__}: {err}"
            lpdist.broadcast_object(outcome)
            raise
        logger.info("AMN prototype pools: peak %.1f MiB per process (budget %.1f MiB, %d processes)",
                    peak / 2**20, cfg.memory_budget_bytes / 2**20, lpdist.world_size())
    outcome = lpdist.broadcast_object(outcome)
    if outcome != "ok":
        raise RuntimeError(f"rank 0 failed to build the AMN prototype bank: {outcome}")
    if bank is None:
        bank = PrototypeBank.load(bank_path, num_classes=NUM_CLASSES) if bank_path is not None else None
    return bank


# --------------------------------------------------------------------------- the patched passes


def default_amn_bank_path(args: Any) -> str:
    """``<dirname(amn_cam_out_dir)>/lpcam_bank_amn.pt``."""
    parent = os.path.dirname(os.path.normpath(args.amn_cam_out_dir)) or "."
    return os.path.join(parent, "lpcam_bank_amn.pt")


def default_amn_baseline_dir(args: Any) -> str:
    """``<amn_cam_out_dir>_baseline``."""
    return os.path.normpath(args.amn_cam_out_dir) + "_baseline"


def recommended_amn_thresholds() -> str:
    """What to run the stage-(b) consumers with."""
    names = ("--cam_eval_thres", "--conf_fg_thres", "--conf_bg_thres", "--sem_seg_bg_thres")
    own = " ".join(f"{n} {v:g}" for n, v in zip(names, AMN_THRESHOLDS))
    return (f"AMN stage (b) with LPCAM maps: no published thresholds; AMN's own are {own}, the IRN-LPCAM ones "
            "0.30/0.45/0.25/0.35; pick --cam_eval_thres by a sweep (benchmarks/amn.py) before cam_to_ir_label")


def make_amn_cam_pass(args: Any, original_run: Callable[[Any], Any] | None, settings: AMNSettings | None = None) -> None:
    """The patched ``step.make_amn_cam.run(args)``.

    With stage (b) swapped: AMN's own maps of the prototype list (Dropout off; only for
    ``split="amn_cam"``, missing files only), the stage-(b) bank, then LPCAM maps of
    ``args.train_list`` into ``args.amn_cam_out_dir``. Otherwise (``LPCAM=0`` or stage (b) not
    in ``LPCAM_AMN_STAGES``): AMN's own pass on GPUs, or AMN's maths with Dropout off in
    lpcam's loop where AMN's spawn of zero GPU workers would write nothing.

    Args:
        args: AMN's parsed arguments (``amn_network``, ``amn_weights_name``, ``train_list``,
            ``voc12_root``, ``cam_scales``, ``amn_cam_out_dir``, ``ir_label_out_dir``, ``num_workers``).
        original_run: AMN's own ``run``.
        settings: Default :func:`amn_settings_from_env`.
    """
    _irn_family.configure_logging()
    settings = settings if settings is not None else amn_settings_from_env()
    base = settings.base
    nprocs = _irn_family.resolve_workers(base)
    loader_workers = _irn_family._num_loader_workers(args, nprocs)
    dataloader = importlib.import_module("voc12.dataloader")
    if not settings.enabled_b:
        if original_run is not None and base.workers is None and torch.cuda.device_count() > 0:
            logger.info("AMN stage (b) not swapped: running AMN's own make_amn_cam")
            original_run(args)
            return
        logger.info("AMN stage (b) not swapped: AMN's maps with Dropout off, computed by lpcam's loop (%s)",
                    "in-process" if nprocs <= 1 else f"{nprocs} workers")
        model = load_amn_model(args)
        dataset = dataloader.VOC12ClassificationDatasetMSF(args.train_list, voc12_root=args.voc12_root, scales=args.cam_scales)
        amn_baseline_pass(model, dataset, args.amn_cam_out_dir, args.ir_label_out_dir, workers=nprocs,
                          device=base.device, num_workers=loader_workers)
        return

    from lpcam_core.io import check_output_dir

    t0 = time.perf_counter()
    model = load_amn_model(args)
    baseline_dir = settings.baseline_dir or default_amn_baseline_dir(args)
    bank_path = settings.bank_path or default_amn_bank_path(args)
    check_output_dir(args.amn_cam_out_dir, read_dirs=[baseline_dir, args.ir_label_out_dir])
    logger.info("LPCAM swap in AMN stage (b): %s, bank %s, maps -> %s",
                ", ".join(f"{k}={v}" for k, v in settings.choices().items()), bank_path, args.amn_cam_out_dir)

    # 1. AMN's own maps of the prototype images (never overwritten), when they split the pools
    if settings.split == "amn_cam":
        proto_msf = dataloader.VOC12ClassificationDatasetMSF(base.proto_list, voc12_root=args.voc12_root,
                                                             scales=args.cam_scales)
        missing = _irn_family.missing_indices(proto_msf, baseline_dir)
        if missing:
            from torch.utils.data import Subset

            logger.info("AMN maps (Dropout off): %d of %d prototype images to compute", len(missing), len(proto_msf))
            amn_baseline_pass(model, Subset(proto_msf, missing), baseline_dir, args.ir_label_out_dir,
                              skip_existing=True, workers=nprocs, device=base.device, num_workers=loader_workers)
    t1 = time.perf_counter()

    # 2. stage-(b) prototype bank
    proto_single = dataloader.VOC12ClassificationDataset(base.proto_list, voc12_root=args.voc12_root)
    meta = {"host": "amn", "stage": "b", "proto_list": base.proto_list, "num_proto_images": len(proto_single),
            "weights": os.path.abspath(args.amn_weights_name + ".pth")}
    build_amn_bank(model, proto_single, settings, baseline_dir=baseline_dir, ir_label_dir=args.ir_label_out_dir,
                   bank_path=bank_path, device=base.device, extra_meta=meta,
                   num_workers=_irn_family._num_loader_workers(args, 1))
    t2 = time.perf_counter()

    # 3. LPCAM maps of AMN's list, in AMN's format
    dataset = dataloader.VOC12ClassificationDatasetMSF(args.train_list, voc12_root=args.voc12_root, scales=args.cam_scales)
    amn_lpcam_pass(model, dataset, bank_path, args.amn_cam_out_dir, settings, workers=nprocs, device=base.device,
                   num_workers=loader_workers)
    t3 = time.perf_counter()
    logger.info("AMN LPCAM pass done: AMN maps %.1fs, bank %.1fs, maps %.1fs (%d images)", t1 - t0, t2 - t1, t3 - t2,
                len(dataset))
    logger.info(recommended_amn_thresholds())


def _make_cam_run(original: Callable[[Any], Any], module: ModuleType) -> Callable[[Any], None]:
    def run(args: Any) -> None:
        """AMN's stage (a) (IRN's make_cam) with LPCAM maps, as lpcam_adapters.irn runs it."""
        settings = amn_settings_from_env()
        base = settings.base if "a" in settings.stages else dataclasses.replace(settings.base, enabled=False)
        _irn_family.make_cam_pass(args, HOST_A, _irn_family.cam_plan(HOST_A), original, settings=base)

    return run


def _make_amn_run(original: Callable[[Any], Any], module: ModuleType) -> Callable[[Any], None]:
    def run(args: Any) -> None:
        """AMN's make_amn_cam with LPCAM maps in AMN's format (see lpcam_adapters.amn)."""
        make_amn_cam_pass(args, original)

    return run


def install() -> None:
    """Register AMN's patches (idempotent; runs at import)."""
    _compat.register_irn_family()
    _hooks.replace_attribute(
        "step.make_cam",
        "run",
        _make_cam_run,
        requires=("_work",),
        replace=True,
        description="AMN stage (a) = IRN's make_cam: baseline CAM, prototype bank, LPCAM maps into cam_out_dir "
        "(LPCAM=0 or LPCAM_AMN_STAGES without 'a': IRN's own maps)",
    )
    _hooks.replace_attribute(
        "step.make_amn_cam",
        "run",
        _make_amn_run,
        requires=("_work",),
        description="AMN stage (b): AMN maps of the prototype list (Dropout off), stage-(b) bank, LPCAM maps in "
        "AMN's format (placeholder channel 0) into amn_cam_out_dir (LPCAM=0: AMN's own pass / its maths, Dropout off)",
    )


def explain() -> str:
    """The AMN patches with their status, and the settings (for ``lpcam amn --explain``)."""
    lines = [_hooks.explain()]
    lines.append("")
    lines.append("settings (environment variables):")
    for name, text in {**_irn_family.ENV_VARS, **AMN_ENV_VARS}.items():
        lines.append(f"  {name:<24} {text}")
    return "\n".join(lines)


install()

"""``import lpcam_adapters.amn`` as the first line of AMN's ``run_sample.py`` swaps CAM for LPCAM.

AMN (https://github.com/gaviotas/AMN, branch voc12) produces CAMs in two places, and the import
registers a patch for each through the import hook, without importing any AMN module:

* stage (a), ``step.make_cam:run`` (byte-identical to IRN's): the IRN family's LPCAM pass, exactly as
  ``lpcam_adapters.irn`` runs it;
* stage (b), ``step.make_amn_cam:run``: :func:`make_amn_cam_pass`. It replaces AMN's worker (not only the
  forward): LPCAM maps of the present classes in channels 1..n, a placeholder background in channel 0,
  ``{"keys", "cam" (torch), "high_res" (numpy)}`` in ``amn_cam_out_dir``, so ``eval_amn_cam``,
  ``amn_cam_to_ir_label`` and ``make_sem_seg_labels`` (which drop channel 0) run unchanged;
* the modern-stack shims of :mod:`lpcam_adapters.compat`.

Every map computed here runs AMN's head with Dropout off (AMN's own ``eval()`` keeps it active, so its
own CAMs change run to run); the model's ``training`` flags are never touched.

Stage (b) choices the paper leaves open are the :data:`OPTIONS` (``LPCAM_AMN_*`` or an ``amn:`` YAML
section); their defaults, reasons and measurements are in docs/hosts/amn.md.
"""

from __future__ import annotations

import argparse
import logging
import os
from collections.abc import Mapping, Sequence
from types import ModuleType
from typing import TYPE_CHECKING, Any, Callable

from . import base, hooks, irn_family
from .base import HostInfo
from .settings import HostSettings, Option, parse_number, read_settings

if TYPE_CHECKING:
    import numpy as np
    import torch
    import torch.nn as nn

__all__ = [
    "INFO",
    "SPEC_A",
    "AMN_THRESHOLDS",
    "OPTIONS",
    "AMNStageB",
    "parse_stages",
    "head_modules",
    "aspp_branches",
    "equivalent_classifier",
    "scoring_classifier",
    "amn_scorer",
    "label_embedding",
    "amn_features",
    "amn_logits",
    "ir_label_cams",
    "background_placeholder",
    "normalise_foreground",
    "make_amn_cam_pass",
    "load_amn_model",
    "install",
    "register",
]

logger = logging.getLogger(__name__)

NUM_CLASSES = irn_family.NUM_CLASSES
STAGES = ("a", "b")
#: Stage (a) is IRN's make_cam; AMN's script runs its next steps at IRN's thresholds.
SPEC_A = irn_family.Spec(name="amn (stage a)", weights_suffix=".pth", thresholds=(0.15, 0.30, 0.05, 0.25))
#: AMN's stage (b) thresholds: eval_amn_cam, conf_fg, conf_bg, sem_seg_bg (maps ** 1.3).
AMN_THRESHOLDS = (0.25, 0.45, 0.15, 0.25)


def parse_stages(value: Any) -> tuple[str, ...]:
    """``"a,b"``, ``"ab"``, ``"b"``, ``"none"`` or ``""`` (none), or a sequence -> the stages, in order."""
    if isinstance(value, str):
        text = value.strip().lower()
        tokens = [] if text in ("none", "") else [t for t in text.replace(",", " ").replace("+", " ").split() if t]
        if len(tokens) == 1 and tokens[0] not in STAGES and set(tokens[0]) <= set(STAGES):
            tokens = list(tokens[0])  # "ab"
    else:
        tokens = [str(t).strip().lower() for t in value]
    if any(t not in STAGES for t in tokens):
        raise ValueError(f"expected stages among {list(STAGES)} (e.g. 'a,b', 'b', 'none')")
    return tuple(s for s in STAGES if s in tokens)


OPTIONS = (
    Option("stages", "LPCAM_AMN_STAGES", STAGES, "stages swapped: 'a,b' (default), 'b' (AMN's stage-(a) CAM kept), "
           "'a', or 'none'", parse=parse_stages, keep_empty=True),
    Option("features", "LPCAM_AMN_FEATURES", "conditioned", "conditioned (default: stage4 * label_enc(y), what the "
           "ASPP scores) or raw (stage4)", choices=("conditioned", "raw"), flag="--features"),
    Option("classifier", "LPCAM_AMN_CLASSIFIER", "all_taps", "all_taps (default: exact ASPP response to a constant "
           "map) or centre (centre taps)", choices=("all_taps", "centre"), flag="--classifier",
           parse=lambda v: "centre" if str(v).strip().lower() == "center" else v),
    Option("softmax", "LPCAM_AMN_SOFTMAX", 20, "20 (default: rows 1..20, the paper's thresholds assume 20-way) or 21 "
           "(with background)", choices=(20, 21), parse=lambda v: parse_number(v, int, "softmax"), flag="--softmax"),
    Option("split", "LPCAM_AMN_SPLIT", "amn_cam", "amn_cam (default: AMN's own maps, Dropout off, at tau) or "
           "ir_label (stage-(a) PNGs)", choices=("amn_cam", "ir_label"), flag="--split"),
    Option("background", "LPCAM_AMN_BACKGROUND", "one_minus_max", "channel 0 of the files: one_minus_max (default) "
           "or zeros; AMN's consumers drop it", choices=("one_minus_max", "zeros"), flag="--background"),
    Option("bank_path", "LPCAM_AMN_BANK", None, "stage-(b) bank file (default <dirname(amn_cam_out_dir)>/"
           "lpcam_bank_amn.pt)", yaml_keys=("bank",)),
    Option("baseline_dir", "LPCAM_AMN_BASELINE_DIR", None, "AMN's own maps of the prototype list (default "
           "<amn_cam_out_dir>_baseline)"),
    irn_family.AMP,
)
INFO = HostInfo(
    name="amn",
    title="AMN (gaviotas/AMN)",
    module=__name__,
    entry_script="run_sample.py",
    signature={**irn_family.SIGNATURE, "step/make_amn_cam.py": "def _work"},
    foreign={"step/make_recam.py": "recam"},
    options=OPTIONS,
    section="amn",
    env_docs={"LPCAM_BANK": "stage-(a) bank (default <dirname(cam_out_dir)>/lpcam_bank.pt)",
              "LPCAM_BASELINE_DIR": "stage-(a) baseline CAM directory (default <cam_out_dir>_baseline)"},
    thresholds="AMN stage (b) with LPCAM maps: no published thresholds; AMN's own are --cam_eval_thres 0.25 "
               "--conf_fg_thres 0.45 --conf_bg_thres 0.15 --sem_seg_bg_thres 0.25, the IRN-LPCAM ones "
               "0.30/0.45/0.25/0.35; pick --cam_eval_thres by a sweep (benchmarks/amn.py) before cam_to_ir_label",
    patch_owners=("lpcam_adapters.compat",),
)


# --------------------------------------------------------------------------- AMN's head


def head_modules(model: nn.Module) -> list[nn.Module]:
    """The modules of AMN's ``classifier`` that are not Dropout, in order (AMN: ``[_ASPP]``)."""
    import torch.nn as nn

    classifier = getattr(model, "classifier", None)
    if classifier is None:
        raise AttributeError(f"{type(model).__name__} has no `classifier`: not AMN's resnet50_amn network")
    modules = list(classifier.children()) if isinstance(classifier, nn.Sequential) else [classifier]
    head = [m for m in modules if not isinstance(m, nn.modules.dropout._DropoutNd)]
    if not head:
        raise ValueError(f"{type(model).__name__}.classifier holds only Dropout")
    return head


def aspp_branches(model: nn.Module) -> list[nn.Conv2d]:
    """The convolutions of AMN's ASPP head, whose outputs it sums ([21, C, 3, 3] each, with bias)."""
    import torch.nn as nn

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
        mode: ``"all_taps"``: each branch's taps summed, branches summed, biases summed (the head's exact
            output away from the border of a constant map); ``"centre"``: the centre tap of each branch.

    Returns:
        (weight [21, C] float32, bias [21] float32), row 0 = background, on the model's device.
    """
    import torch

    from lpcam_core.classifier import equivalent_linear

    if mode not in ("all_taps", "centre", "center"):
        raise ValueError(f"mode={mode!r}: expected 'all_taps' or 'centre'")
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


def scoring_classifier(model: nn.Module, options: Mapping[str, Any], class_index: int | None = None
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """The classifier that scores prototype centres under ``options`` (features, classifier, softmax).

    Args:
        model: AMN's network.
        options: the stage-(b) choices.
        class_index: with ``features="raw"``, the class whose embedding ``label_enc(e_c)`` is folded into
            the weight (``W * y_c``, the head's response to a raw feature of an image labelled c alone).

    Returns:
        (weight [k, C], bias [k]) float32 on the CPU; k = 20 (rows 1..20) or 21 (row 0 = background).
    """
    import torch

    weight, bias = equivalent_classifier(model, options["classifier"])
    if options["features"] == "raw":
        if class_index is None:
            raise ValueError("scoring_classifier: raw features need the class_index whose embedding is folded in")
        onehot = torch.zeros(1, NUM_CLASSES, device=weight.device)
        onehot[0, int(class_index)] = 1.0
        with torch.no_grad():
            y = label_embedding(model, onehot)[0].float()
        weight = weight * y[None, :]
    if options["softmax"] == 20:
        weight, bias = weight[1:], bias[1:]
    return weight.detach().cpu(), bias.detach().cpu()


def amn_scorer(model: nn.Module, options: Mapping[str, Any]) -> Any:
    """The :class:`~lpcam_core.classifier.Scorer` of the stage-(b) choices (21-way: class c is row c + 1; raw
    features: each class scored by the head conditioned on its own embedding)."""
    from lpcam_core.classifier import LinearScorer, PerClassScorer, classifier_fingerprint

    first_row = 1 if options["softmax"] == 21 else 0
    full_w, full_b = equivalent_classifier(model, options["classifier"])
    cache: dict[Any, Any] = {}

    def scorer_of(class_index: int) -> Any:
        key = class_index if options["features"] == "raw" else None
        if key not in cache:
            cache[key] = LinearScorer(*scoring_classifier(model, options, class_index), first_row=first_row)
        return cache[key]

    return PerClassScorer(scorer_of, NUM_CLASSES, full_w.shape[1], classifier_fingerprint(full_w.cpu(), full_b.cpu()))


def amn_fingerprint(model: nn.Module) -> str:
    """Identifies AMN's head and label embedding (the bank must be rebuilt when they change)."""
    import torch

    from lpcam_core.classifier import classifier_fingerprint

    weight = torch.cat([c.weight.detach().float().flatten() for c in aspp_branches(model)])
    bias = torch.cat([c.bias.detach().float().flatten() for c in aspp_branches(model) if c.bias is not None]
                     + [p.detach().float().flatten() for p in model.label_enc.parameters()])
    return classifier_fingerprint(weight.cpu(), bias.cpu())


def amn_features(model: nn.Module, x: torch.Tensor, labels: torch.Tensor | None, conditioned: bool = True) -> torch.Tensor:
    """Local features of AMN's stage-(b) network: [B, 2048, ceil(H/16), ceil(W/16)].

    Args:
        model: AMN's network.
        x: [B, 3, H, W] normalised images (AMN: image and its flip, B = 2).
        labels: [20] or [B, 20] multi-hot image labels (needed when ``conditioned``).
        conditioned: multiply stage4 by ``label_enc(labels)`` as AMN's forward does (signed features).
    """
    import torch

    feats = irn_family.extract_features(model, x)
    if not conditioned:
        return feats
    if labels is None:
        raise ValueError("amn_features: conditioned features need the image labels")
    labels = torch.as_tensor(labels)
    if labels.ndim == 1:
        labels = labels.unsqueeze(0).expand((x.shape[0], labels.shape[0]))
    if labels.shape != (x.shape[0], NUM_CLASSES):
        raise ValueError(f"labels must be [{NUM_CLASSES}] or [{x.shape[0]}, {NUM_CLASSES}], got {tuple(labels.shape)}")
    y = label_embedding(model, labels.to(x.device))
    return feats * y.unsqueeze(-1).unsqueeze(-1)


def amn_logits(model: nn.Module, x: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """AMN's ``CAM.forward`` with Dropout off: flip-averaged 21-way logits [21, h, w] of ``x`` [2, 3, H, W]."""
    out = amn_features(model, x, labels, conditioned=True)
    for module in head_modules(model):
        out = module(out)
    return (out[0] + out[1].flip(-1)) / 2


# --------------------------------------------------------------------------- maps


def ir_label_cams(label_png: np.ndarray, keys: Sequence[int], tau: float) -> torch.Tensor:
    """Pseudo-CAMs [n, H, W] that make the pools split by a stage-(a) ir_label PNG (0 background, c + 1 class
    c, 255 ignore): 1 where it says class c (class pool), tau on ignored pixels (neither pool), 0 elsewhere."""
    import numpy as np
    import torch

    label = torch.as_tensor(np.asarray(label_png).astype(np.int64))
    out = torch.zeros(len(keys), *label.shape, dtype=torch.float32)
    for i, key in enumerate(keys):
        out[i][label == int(key) + 1] = 1.0
        out[i][label == 255] = float(tau)
    return out


def background_placeholder(maps: torch.Tensor, kind: str = "one_minus_max") -> torch.Tensor:
    """Channel 0 for [n, h, w] class maps in [0, 1]: ``1 - max`` over classes (ones if n = 0) or zeros."""
    import torch

    if kind == "zeros":
        return torch.zeros(1, *maps.shape[1:], dtype=torch.float32)
    if kind != "one_minus_max":
        raise ValueError(f"background kind {kind!r}: expected 'one_minus_max' or 'zeros'")
    if maps.shape[0] == 0:
        return torch.ones(1, *maps.shape[1:], dtype=torch.float32)
    return (1.0 - maps.float().amax(0, keepdim=True)).clamp(0.0, 1.0)


def normalise_foreground(cams: np.ndarray, label: np.ndarray) -> np.ndarray:
    """AMN's rule: min-max normalise each map ([c, h, w]) where ``label`` is not background (0)."""
    import numpy as np

    low = np.min(cams, (1, 2), keepdims=True)
    high = np.max(cams, (1, 2), keepdims=True)
    norm = (cams - low) / (high - low + 1e-5)
    fg = np.broadcast_to(label != 0, cams.shape)
    out = cams.copy()
    out[fg] = norm[fg]
    return out


class AMNStageB(irn_family.IRNFamily):
    """AMN's stage-(b) network as a :class:`~lpcam_adapters.base.Host` (its maps in AMN's format).

    Args:
        model: AMN's ``resnet50_amn`` network.
        network: its module name.
        scales: inference scales.
        options: the stage-(b) choices.
        ir_label_dir: the stage-(a) ir_label PNGs (AMN normalises its maps where they are not background;
            ``split="ir_label"`` splits the pools by them).
        tau: the pools' CAM threshold (``split="ir_label"``: ignored pixels get exactly tau, so neither pool).
        meta: bank provenance.
    """

    def __init__(self, model: nn.Module, network: str, scales: Sequence[float], options: Mapping[str, Any],
                 ir_label_dir: str, tau: float, meta: Mapping[str, Any] | None = None) -> None:
        self.options = dict(options)
        self.ir_label_dir = os.fspath(ir_label_dir)
        self.tau = float(tau)
        choices = {k: self.options[k] for k in ("features", "classifier", "softmax", "split")}
        super().__init__("amn", network, model, scales,
                         meta={**dict(meta or {}), "amn_choices": choices, "amn_fingerprint": amn_fingerprint(model)})

    @property
    def conditioned(self) -> bool:
        return self.options["features"] == "conditioned"

    def scorer(self) -> Any:
        return amn_scorer(self.cam_model, self.options)

    def pool_inputs(self, image_id: str, item: Mapping[str, Any], baseline_dir: str | None
                    ) -> tuple[torch.Tensor, Any, Any]:
        """Features [C, h, w] (one scale, no flip), the maps [n, H, W] that split them, keys [n]."""
        import torch

        from lpcam_core.formats import load_irn_cam
        from lpcam_core.io import load_label_png

        label = torch.as_tensor(item["label"])
        img = torch.as_tensor(item["img"])[None].to(self._dev())
        feats = amn_features(self.cam_model, img, label, self.conditioned)[0].float()
        if self.options["split"] == "amn_cam":
            return (feats, *self.pool_maps(load_irn_cam(os.path.join(os.fspath(baseline_dir), image_id + ".npy"))))
        keys = torch.nonzero(label)[:, 0]
        png = load_label_png(os.path.join(self.ir_label_dir, image_id + ".png"))
        return feats, ir_label_cams(png, keys.tolist(), self.tau), keys

    def baseline_and_features(self, item: Mapping[str, Any]) -> tuple[dict[str, Any], None]:
        """AMN's maps; the pooled features (label-conditioned or raw) come from their own one-scale pass."""
        return self.baseline(item), None

    def pool_maps(self, record: Mapping[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
        import torch

        return torch.as_tensor(record["high_res"][1:]), torch.as_tensor(record["keys"]).long()

    def baseline(self, item: Mapping[str, Any]) -> dict[str, Any]:
        """AMN's make_amn_cam maths on one MSF item with Dropout off: per scale the flip-averaged 21-way logits,
        averaged over scales at the stride-4 grid and at the image size, softmax over 21 channels, channel 0 and
        the present classes kept, min-max normalised where the ir_label is not background."""
        import numpy as np
        import torch
        import torch.nn.functional as F
        from PIL import Image

        dev = self._dev()
        name = item["name"]
        label = torch.as_tensor(item["label"])
        size = (int(item["size"][0]), int(item["size"][1]))
        png = os.path.join(self.ir_label_dir, name + ".png")
        if not os.path.isfile(png):
            raise FileNotFoundError(f"ir_label PNG missing: {png} (run AMN's --cam_to_ir_label_pass first)")
        label_amn = Image.open(png)
        strided = ((size[0] - 1) // 4 + 1, (size[1] - 1) // 4 + 1)
        label_down = np.array(label_amn.resize((strided[1], strided[0]), resample=Image.NEAREST))
        label_up = np.array(label_amn.resize((size[1], size[0]), resample=Image.NEAREST))
        outputs = [amn_logits(self.cam_model, img.to(dev, non_blocking=True),
                              label.unsqueeze(0).expand((img.shape[0], NUM_CLASSES)).to(dev))
                   for img in irn_family.msf_views(item["img"])]
        strided_cam = torch.sum(torch.stack(
            [F.interpolate(torch.unsqueeze(o, 0), strided, mode="bilinear", align_corners=False)[0] for o in outputs]
        ), 0) / len(outputs)
        highres = [F.interpolate(torch.unsqueeze(o, 1), size, mode="bilinear", align_corners=False) for o in outputs]
        highres_cam = torch.sum(torch.stack(highres, 0), 0)[:, 0, : size[0], : size[1]] / len(outputs)
        valid_cat = torch.nonzero(label)[:, 0]
        keys = np.pad(valid_cat.numpy() + 1, (1, 0), mode="constant")
        strided_cam = F.softmax(strided_cam, dim=0)[keys].cpu().numpy()
        highres_cam = F.softmax(highres_cam, dim=0)[keys].cpu().numpy()
        strided_cam = normalise_foreground(strided_cam, label_down)
        highres_cam = normalise_foreground(highres_cam, label_up)
        return {"keys": valid_cat, "cam": torch.tensor(strided_cam), "high_res": highres_cam}

    def lpcam(self, item: Mapping[str, Any], bank: Any) -> dict[str, Any]:
        """LPCAM of the present classes in channels 1..n, channel 0 the background placeholder."""
        import numpy as np
        import torch

        from lpcam_core import lpcam_multiscale

        label = torch.as_tensor(item["label"])
        keys = torch.nonzero(label)[:, 0]
        features = self.multiscale_features(item, lambda x: amn_features(self.cam_model, x, label, self.conditioned))
        rec = lpcam_multiscale(features, bank, keys, (int(item["size"][0]), int(item["size"][1])), missing="zeros")
        cam = torch.as_tensor(rec["cam"]).float()
        high = torch.as_tensor(np.asarray(rec["high_res"])).float()
        kind = self.options["background"]
        return {"keys": torch.as_tensor(rec["keys"]).long(), "cam": torch.cat([background_placeholder(cam, kind), cam]),
                "high_res": torch.cat([background_placeholder(high, kind), high]).numpy()}

    def maps_record(self, kind: str, bank_path: str | None = None) -> dict[str, Any]:
        from lpcam_core import run

        fingerprint = run.model_fingerprint(self.cam_model)
        if kind == "baseline":
            return run.maps_record("amn", fingerprint, self.scales)
        return run.maps_record("amn_lpcam", fingerprint, self.scales, bank_path=bank_path,
                               background=self.options["background"], features=self.options["features"],
                               **self.precision_record())

    def prototype_baseline_dir(self, requested: str | None, bank_path: str) -> str | None:
        """AMN's own maps of the prototype list, needed only when they split the pools."""
        if self.options["split"] != "amn_cam":
            return None
        return super().prototype_baseline_dir(requested, bank_path)

    def check_bank(self, bank: Any, source: str) -> None:
        """Refuse a bank built on other features or with another AMN checkpoint."""
        choices = bank.meta.get("amn_choices") or {}
        if choices and choices.get("features") != self.options["features"]:
            raise ValueError(f"{source} was built on {choices.get('features')} features, not "
                             f"{self.options['features']}: pass the same --features")
        if bank.meta.get("amn_fingerprint") not in (None, self.meta["amn_fingerprint"]):
            raise ValueError(f"{source} was built with another AMN checkpoint: rebuild it with `lpcam amn prototypes`")


# --------------------------------------------------------------------------- the patched passes


def load_amn_model(args: Any) -> nn.Module:
    """AMN's stage-(b) network with ``args.amn_weights_name + '.pth'`` (CPU load, no ImageNet download)."""
    return irn_family.load_model(args.amn_network, args.amn_weights_name + ".pth", flag="--amn_weights_name")


def _amn_host(args: Any, settings: HostSettings) -> AMNStageB:
    model = load_amn_model(args)
    return AMNStageB(model, args.amn_network, args.cam_scales, settings.options, args.ir_label_out_dir,
                     settings.lpcam.fg_threshold,
                     meta={"host": "amn", "stage": "b", "weights": os.path.abspath(args.amn_weights_name + ".pth")})


def swap_b_job(ctx: Any, host: AMNStageB, data: base.Datasets, settings: HostSettings, paths: Mapping[str, Any]) -> None:
    """Stage (b) with LPCAM in every process (module-level: spawned processes import it by name)."""
    irn_family.compat.register_irn_family()
    base.swap_pass(ctx, host, data, settings, baseline_dir=paths["baseline_dir"], bank_path=paths["bank_path"],
                   out_dir=paths["out_dir"], fingerprint=host.baseline_fingerprint(), meta=paths["meta"],
                   reads=paths["reads"])


def make_amn_cam_pass(args: Any, original_run: Callable[[Any], Any] | None, settings: HostSettings | None = None) -> None:
    """The patched ``step.make_amn_cam.run(args)``.

    With stage (b) swapped: AMN's own maps of the prototype list (Dropout off; only for ``split=amn_cam``,
    missing files only), the stage-(b) bank, then LPCAM maps of ``args.train_list`` into
    ``args.amn_cam_out_dir``. Otherwise (``LPCAM=0`` or stage (b) not in ``LPCAM_AMN_STAGES``): AMN's own
    pass on GPUs, or AMN's maths with Dropout off in lpcam's loop where AMN's spawn of zero GPU workers
    would write nothing.
    """
    import torch

    from lpcam_core import run
    from lpcam_core.logs import configure_logging

    configure_logging()
    settings = settings if settings is not None else read_settings(OPTIONS, section="amn", host="amn")
    nprocs = base.resolve_workers(settings)
    loader_workers = max(0, int(getattr(args, "num_workers", 0) or 0)) // max(1, nprocs)
    if not (settings.enabled and "b" in settings.option("stages")):
        if original_run is not None and settings.workers is None and torch.cuda.device_count() > 0:
            logger.info("AMN stage (b) not swapped: running AMN's own make_amn_cam")
            original_run(args)
            return
        logger.info("AMN stage (b) not swapped: AMN's maps with Dropout off, computed by lpcam's loop (%s)",
                    "in-process" if nprocs <= 1 else f"{nprocs} workers")
        data = irn_family.voc_datasets(args.train_list, None, args.voc12_root, args.cam_scales,
                                       loader_workers=loader_workers)
        run.launch(irn_family.own_job, _amn_host(args, settings), data, args.amn_cam_out_dir, workers=nprocs,
                   device=settings.device)
        return
    host = _amn_host(args, settings)
    host.amp = bool(settings.options.get("amp", False))
    proto_list = settings.proto_list or "voc12/train.txt"
    out = args.amn_cam_out_dir
    baseline_dir = (settings.option("baseline_dir") or os.path.normpath(out) + "_baseline"
                    if settings.option("split") == "amn_cam" else None)
    bank_path = settings.option("bank_path") or os.path.join(os.path.dirname(os.path.normpath(out)) or ".",
                                                             "lpcam_bank_amn.pt")
    data = irn_family.voc_datasets(args.train_list, proto_list, args.voc12_root, args.cam_scales,
                                   loader_workers=loader_workers)
    voc = os.path.abspath(args.voc12_root)
    paths = {"baseline_dir": baseline_dir, "bank_path": bank_path, "out_dir": out,
             "reads": [baseline_dir, args.ir_label_out_dir, voc, os.path.join(voc, "JPEGImages")],
             "meta": {**host.meta, "proto_list": proto_list, "num_proto_images": len(data.proto_ids)}}
    logger.info("LPCAM swap in AMN stage (b): %s, bank %s, maps -> %s",
                ", ".join(f"{k}={v}" for k, v in host.meta["amn_choices"].items()), bank_path, out)
    run.launch(swap_b_job, host, data, settings, paths, workers=nprocs, device=settings.device)
    logger.info(INFO.thresholds)


def _make_cam_run(original: Callable[[Any], Any], module: ModuleType) -> Callable[[Any], None]:
    def run(args: Any) -> None:
        """AMN's stage (a) (IRN's make_cam) with LPCAM maps, as lpcam_adapters.irn runs it."""
        settings = read_settings(OPTIONS, section="amn", host="amn")
        if "a" not in settings.option("stages"):
            settings = settings.replace(enabled=False)
        irn_family.make_cam_pass(args, SPEC_A, lambda a, s: irn_family.cam_host(a, SPEC_A), original, settings)

    return run


def _make_amn_run(original: Callable[[Any], Any], module: ModuleType) -> Callable[[Any], None]:
    def run(args: Any) -> None:
        """AMN's make_amn_cam with LPCAM maps in AMN's format (see lpcam_adapters.amn)."""
        make_amn_cam_pass(args, original)

    return run


def install() -> None:
    """Register AMN's patches (idempotent; runs at import)."""
    irn_family.compat.register_irn_family()
    hooks.replace_attribute(
        "step.make_cam", "run", _make_cam_run, requires=("_work",), replace=True,
        description="AMN stage (a) = IRN's make_cam: baseline CAM, prototype bank, LPCAM maps into cam_out_dir "
        "(LPCAM=0 or LPCAM_AMN_STAGES without 'a': IRN's own maps)",
    )
    hooks.replace_attribute(
        "step.make_amn_cam", "run", _make_amn_run, requires=("_work",), replace=True,
        description="AMN stage (b): AMN maps of the prototype list (Dropout off), stage-(b) bank, LPCAM maps in "
        "AMN's format (placeholder channel 0) into amn_cam_out_dir (LPCAM=0: AMN's own pass / its maths, Dropout off)",
    )
    hooks.replace_attribute(
        "step.train_amn", "torch", irn_family.compat.make_stacking_torch, requires=("resize_labels",),
        name="torch_stacking_longtensor",
        description="module-local torch whose LongTensor stacks resize_labels' list of numpy label maps (torch 2 "
        "refuses the list)",
    )


# --------------------------------------------------------------------------- lpcam amn prototypes|make


def _plan(ns: Any, settings: HostSettings) -> AMNStageB:
    """``lpcam amn prototypes|make`` (stage b): the checkpoint file ``--weights`` as is."""
    weights = os.path.abspath(ns.weights)
    model = irn_family.load_model(ns.network, weights, flag="--weights")
    return AMNStageB(model, ns.network, ns.scales, settings.options, os.path.abspath(ns.ir_label_dir),
                     settings.lpcam.fg_threshold, meta={"host": "amn", "stage": "b", "weights": weights})


def _extra_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--ir-label-dir", required=True, help="stage-(a) ir_label PNGs (AMN's --ir_label_out_dir): they "
                   "normalise AMN's maps and can split the pools")


def register(subparsers: Any) -> None:
    """``lpcam amn ...`` (entry point ``lpcam.hosts``): AMN's stage (b); stage (a) is ``lpcam irn`` on AMN's checkout."""
    from .cli import add_host_group
    from .trial import add_try

    def steps(sub: Any) -> None:
        irn_family.add_steps(sub, INFO, _plan, network="net.resnet50_amn", extra=_extra_flags,
                             bank_help="stage-(b) prototype bank file",
                             weights_help="AMN checkpoint file (train_amn writes sess/res50_amn.pth)",
                             baseline_dir_help="AMN's own maps of the list (default <bank>_baseline)")
        add_try(sub, INFO)

    add_host_group(subparsers, INFO, steps)


read_settings(OPTIONS, section="amn", host="amn")  # a malformed LPCAM_* variable fails here, at import, not hours later
install()

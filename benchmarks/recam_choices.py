"""The ReCAM adapter's (backbone, classifier) choices compared on the demo network (CPU, synthetic data).

No ReCAM code runs here and nothing is copied from it: this is our own implementation of ReCAM's
``step/train_recam.py`` (zhaozhengChen/ReCAM, MIT) on the demo's small CNN, so its numbers *indicate*,
they do not replace the VOC measurement (``benchmarks/recam.py``). Per seed:

1. the demo's pipeline up to its trained classifier (:func:`lpcam_core.demo.train_classifier`, the
   same data, seed and settings as ``make demo``): the *CAM* network (ReCAM's ``res50_cam.pth``);
2. ReCAM's stage on a copy of it (:func:`train_recam`): the backbone and ``W_cls`` are finetuned and
   ``W_recam`` (:class:`ClassPredictor`) is trained from scratch with ReCAM's loss,
   ``multilabel_soft_margin(logits, y) + loss_weight * CE(W_recam . cam_feature_c, c)`` where
   ``cam_feature_c`` is the mean over pixels of the max-normalised ``CAM_c`` times the features
   (ReCAM's ``Net_CAM_Feature``), giving the *ReCAM* network (``res50_recam_<N>.pth``);
3. seeds of the held-out images: the CAM (``W_cls`` on the CAM network), ReCAM's map (``forward2``:
   ``W_recam * W_cls`` on the ReCAM network, what make_recam writes) and LPCAM for the three valid
   (``LPCAM_BACKBONE``, ``LPCAM_CLASSIFIER``) settings of ``lpcam_adapters.recam``, exactly as
   ``recam_plan`` + ``make_cam_pass`` wire them: the pools are split by ReCAM's map (the make_recam
   baseline), features come from the chosen backbone, the prototypes are scored by ``W_recam * W_cls``
   (classifier ``recam``) or by the feature network's own ``W_cls`` (``cls``). A reference row gives
   LPCAM of the make_cam pass (CAM split, CAM features, ``W_cls``: the demo's own LPCAM).

What follows the host and what is scaled (ReCAM's ``run_sample.py`` defaults in brackets):

* loss weight 1.0 [``recam_loss_weight`` 1.0]; plain SGD with poly decay, power 0.9 [IRN's
  ``PolyOptimizer``: no momentum], weight decay 1e-4 on every group [``cam_weight_decay``];
  the backbone and ``W_cls`` at 0.1x the predictor's lr [0.1 * ``recam_learning_rate``];
  the first block frozen [conv1/bn1] and BatchNorm statistics fixed [``FixedBatchNorm``];
  ``W_recam`` a bias-free 1x1 conv with PyTorch's default init [``Class_Predictor``]; CE averaged
  over an image's classes, summed over images, divided by the batch size; drop_last batches;
* epochs: 4 [``recam_num_epoches`` 4] of the demo's training split (960 images, batches of 32, its
  random flips) instead of VOC train_aug (10582 images, batches of 16, random crops): 120 steps
  instead of 2644, so the learning rate is scaled to keep lr x steps equal to the host's:
  ``5e-4 * 2644 / steps`` (0.011 for the predictor, 0.0011 for the backbone and ``W_cls``);
* the demo's features have 256 channels, ResNet-50's 2048, so the same lr moves ``W_recam``'s
  logits less: ``--recam-lr-scale`` (default ``1 8``) trains one ReCAM stage per factor on the same
  CAM network, x1 (lr x steps matched; the predictor's CE ends near 1.0) and x8 (also x 2048/256;
  CE near 0.1), so a conclusion can be checked under both a lightly and a fully trained ``W_recam``.

Runs with ``--threads 1`` by default: on a shared 2-core machine it is several times faster than 2.

Usage::

    python benchmarks/recam_choices.py --seed 0 1 2 --json bench_out/recam_choices.json [--quick]
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import itertools
import json
import logging
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from lpcam_core import PrototypeBuilder, lpcam_multiscale
from lpcam_core.demo import (
    CAMNet,
    DemoSettings,
    demo_settings,
    evaluate_seeds,
    images_to_tensor,
    seed_everything,
    train_classifier,
)
from lpcam_core.demo.synthetic import SyntheticSplit, class_names, load_voc, write_voc
from lpcam_core.maps import cam_multiscale

#: ReCAM's run_sample.py defaults and the step count of its train_recam on VOC train_aug.
HOST_LR = 5e-4
HOST_EPOCHS = 4
HOST_STEPS = HOST_EPOCHS * (10582 // 16)  # 2644


def log(msg: str) -> None:
    print(f"[recam-choices] {msg}", file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------- ReCAM stage


@dataclass(frozen=True)
class RecamSettings:
    """ReCAM's stage (see the module docstring for the host's values).

    Attributes:
        epochs: Epochs over the training split.
        lr: Predictor (``W_recam``) learning rate; the backbone and ``W_cls`` get ``backbone_ratio``
            of it. None: ``lr_scale * HOST_LR * HOST_STEPS / steps`` (lr x steps as in the host, x lr_scale).
        lr_scale: Multiplies the default lr (8: also the host's feature width, 2048 / 256 channels).
        backbone_ratio: Backbone and ``W_cls`` lr over the predictor's (host: 0.1).
        loss_weight: Weight of the predictor's CE (host: 1.0).
        weight_decay: SGD weight decay of every group (host: 1e-4).
        poly_power: Poly decay exponent (host: 0.9).
    """

    epochs: int = HOST_EPOCHS
    lr: float | None = None
    lr_scale: float = 1.0
    backbone_ratio: float = 0.1
    loss_weight: float = 1.0
    weight_decay: float = 1e-4
    poly_power: float = 0.9

    def resolved_lr(self, steps: int) -> float:
        return self.lr if self.lr is not None else self.lr_scale * HOST_LR * HOST_STEPS / max(1, steps)


class ClassPredictor(nn.Module):
    """``W_recam``: a bias-free 1x1 conv over the class-wise CAM features (ReCAM's ``Class_Predictor``)."""

    def __init__(self, num_classes: int, dim: int) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.classifier = nn.Conv2d(dim, num_classes, 1, bias=False)

    def forward(self, cam_feats: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(loss, accuracy) of ``cam_feats`` [B, K, D] with multi-hot ``labels`` [B, K].

        Each present class's CAM feature is classified among the K classes; CE averaged over an
        image's present classes, summed over images and divided by B (images without a class add 0).
        """
        w = self.classifier.weight[:, :, 0, 0]  # [K, D]
        loss = cam_feats.new_zeros(())
        hits, count = 0, 0
        for feats, label in zip(cam_feats, labels):
            keys = torch.nonzero(label > 0)[:, 0]
            if keys.numel() == 0:
                continue
            logits = feats[keys] @ w.t()  # [n, K]
            loss = loss + F.cross_entropy(logits, keys)
            hits += int((logits.argmax(1) == keys).sum())
            count += keys.numel()
        return loss / cam_feats.shape[0], torch.tensor(hits / max(1, count))


def cam_features(net: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits [B, K], class-wise CAM features [B, K, D]) of images ``x`` (ReCAM's ``Net_CAM_Feature``).

    ``CAM = ReLU(W_cls f)`` divided by its max (+1e-5), then ``mean_hw(CAM_c * f)`` per class.
    """
    f = net.features(x)
    logits = net.classifier(f.mean(dim=(2, 3), keepdim=True)).flatten(1)
    cams = F.relu(F.conv2d(f, net.classifier.weight))
    cams = cams / (F.adaptive_max_pool2d(cams, (1, 1)) + 1e-5)
    return logits, torch.einsum("bkhw,bdhw->bkd", cams, f) / (f.shape[2] * f.shape[3])


def _fix_batchnorm(net: nn.Module) -> None:
    for m in net.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.eval()


def train_recam(net: nn.Module, predictor: ClassPredictor, split: SyntheticSplit, settings: DemoSettings,
                recam: RecamSettings, progress: bool = False) -> list[dict[str, float]]:
    """ReCAM's stage (after ReCAM's ``train_recam``): finetune ``net`` and train ``predictor`` in place.

    Args:
        net: The trained :func:`~lpcam_core.demo.CAMNet` (a copy: it becomes the ReCAM network).
        predictor: A fresh :class:`ClassPredictor` (``W_recam``).
        split: Training images and labels.
        settings: The demo's settings (batch size, seed: the same batches rule as its training).
        recam: The stage's settings.
        progress: Log every epoch.

    Returns:
        Per epoch: mean ``loss_cls``, ``loss_ce``, ``acc`` (the host's log) and the predictor's ``lr``
        at its start.
    """
    gen = torch.Generator().manual_seed(settings.seed + 1)
    x_all = images_to_tensor(split.images)
    y_all = torch.from_numpy(split.labels)
    n, batch = len(split), settings.batch_size
    steps_per_epoch = max(1, n // batch)
    max_step = recam.epochs * steps_per_epoch
    lr = recam.resolved_lr(max_step)
    stem = list(net.features[0].parameters())
    for p in stem:
        p.requires_grad_(False)
    stem_ids = {id(p) for p in stem}
    backbone = [p for p in net.features.parameters() if id(p) not in stem_ids]
    groups = [
        {"params": backbone, "lr": recam.backbone_ratio * lr},
        {"params": list(net.classifier.parameters()), "lr": recam.backbone_ratio * lr},
        {"params": list(predictor.parameters()), "lr": lr},
    ]
    opt = torch.optim.SGD(groups, lr=lr, weight_decay=recam.weight_decay, momentum=0.0)
    initial = [g["lr"] for g in opt.param_groups]
    net.train()
    _fix_batchnorm(net)
    predictor.train()
    history = []
    step = 0
    try:
        for ep in range(recam.epochs):
            order = torch.randperm(n, generator=gen)
            sums = {"loss_cls": 0.0, "loss_ce": 0.0, "acc": 0.0}
            start_lr = opt.param_groups[2]["lr"] * (1 - step / max_step) ** recam.poly_power
            for i in range(steps_per_epoch):
                idx = order[i * batch:(i + 1) * batch]
                x, y = x_all[idx], y_all[idx]
                flip = torch.rand(len(idx), generator=gen) < 0.5
                x = torch.where(flip[:, None, None, None], x.flip(-1), x)
                logits, feats = cam_features(net, x)
                loss_cls = F.multilabel_soft_margin_loss(logits, y)
                loss_ce, acc = predictor(feats, y)
                loss = loss_cls + recam.loss_weight * loss_ce
                mult = (1 - step / max_step) ** recam.poly_power
                for g, base in zip(opt.param_groups, initial):
                    g["lr"] = base * mult
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                step += 1
                sums["loss_cls"] += float(loss_cls.detach())
                sums["loss_ce"] += float(loss_ce.detach())
                sums["acc"] += float(acc)
            row = {k: v / steps_per_epoch for k, v in sums.items()}
            row["lr"] = start_lr
            history.append(row)
            if progress:
                log(f"ReCAM epoch {ep + 1}/{recam.epochs}: loss_cls {row['loss_cls']:.3f} "
                    f"loss_ce {row['loss_ce']:.3f} acc {row['acc']:.3f} (lr {start_lr:.2g})")
    finally:
        for p in stem:
            p.requires_grad_(True)
        net.eval()
        predictor.eval()
    return history


def recam_weight(net: nn.Module, predictor: ClassPredictor) -> torch.Tensor:
    """``W_recam * W_cls`` as [K, D]: the classifier of ReCAM's ``forward2`` (and of LPCAM's ``recam`` choice)."""
    return (predictor.classifier.weight * net.classifier.weight).detach()[:, :, 0, 0]


def cls_weight(net: nn.Module) -> torch.Tensor:
    return net.classifier.weight.detach()[:, :, 0, 0]


# ----------------------------------------------------------------------------- choices and maps


def valid_combos() -> list[tuple[str, str]]:
    """The (backbone, classifier) pairs the adapter accepts (its settings decide)."""
    from lpcam_adapters.recam import recam_settings

    out = []
    for backbone, classifier in itertools.product(("recam", "cam"), ("recam", "cls")):
        try:
            recam_settings({"LPCAM_BACKBONE": backbone, "LPCAM_CLASSIFIER": classifier})
        except ValueError:
            continue
        out.append((backbone, classifier))
    return out


def plan(combo: tuple[str, str], cam_net: nn.Module, recam_net: nn.Module,
         predictor: ClassPredictor) -> tuple[nn.Module, torch.Tensor]:
    """(feature network, scoring weight [K, D]) of a combo, as ``lpcam_adapters.recam.recam_host``."""
    backbone, classifier = combo
    feature_net = cam_net if backbone == "cam" else recam_net
    score = recam_weight(recam_net, predictor) if classifier == "recam" else cls_weight(feature_net)
    return feature_net, score


def views(net: nn.Module, x: torch.Tensor, scales) -> list[torch.Tensor]:
    """Per scale [B, 2, D, h, w] features of (image, flipped image), resized as the demo's seeds."""
    size = x.shape[2:]
    out = []
    with torch.no_grad():
        for s in scales:
            xs = x
            if s != 1.0:
                xs = F.interpolate(x, size=[max(1, round(v * s)) for v in size], mode="bilinear", align_corners=False)
            pair = net.features(torch.cat([xs, xs.flip(-1)]))
            out.append(torch.stack([pair[:len(x)], pair[len(x):]], dim=1))
    return out


ROWS = {
    "cam": "CAM (W_cls, CAM backbone)",
    "recam": "ReCAM map (W_recam*W_cls, ReCAM backbone)",
}


def combo_key(combo: tuple[str, str]) -> str:
    return f"lpcam_{combo[0]}_{combo[1]}"


def combo_label(combo: tuple[str, str]) -> str:
    return f"LPCAM backbone={combo[0]}, classifier={combo[1]}"


REFERENCE = "lpcam_make_cam"
REFERENCE_LABEL = "LPCAM of make_cam (reference: CAM split, CAM backbone, W_cls)"


def build_banks(cam_net: nn.Module, recam_net: nn.Module, predictor: ClassPredictor, train: SyntheticSplit,
                settings: DemoSettings, combos: list[tuple[str, str]], reference: bool = True) -> dict[str, Any]:
    """One bank per combo (and the make_cam reference), pools streamed from the training images.

    The pool-splitting map of the make_recam pass is ReCAM's map (``forward2``) at the demo's
    ``pool_cam_scales`` with flips, whatever the combo; pool features are the feature network's
    at scale 1, no flip. Combos sharing a feature network share the pools.
    """
    cfg = settings.lpcam
    names = class_names(train.labels.shape[1])
    nets = {"recam": recam_net, "cam": cam_net}
    w_recam = recam_weight(recam_net, predictor)
    builders = {b: PrototypeBuilder(train.labels.shape[1], cfg, class_names=names) for b in {c[0] for c in combos}}
    ref_builder = PrototypeBuilder(train.labels.shape[1], cfg, class_names=names) if reference else None
    x_all = images_to_tensor(train.images)
    size = tuple(x_all.shape[2:])
    for start in range(0, len(train), 32):
        x = x_all[start:start + 32]
        recam_views = views(recam_net, x, settings.pool_cam_scales)
        cam_views = views(cam_net, x, settings.pool_cam_scales) if ref_builder is not None else None
        with torch.no_grad():
            feats = {b: nets[b].features(x) for b in builders}
            if ref_builder is not None:
                feats.setdefault("cam", cam_net.features(x))
        for j in range(len(x)):
            keys = np.nonzero(train.labels[start + j])[0].tolist()
            if not keys:
                continue
            split_map = cam_multiscale([v[j] for v in recam_views], w_recam, keys, size)["high_res"]
            for b, builder in builders.items():
                builder.add(feats[b][j], torch.from_numpy(split_map), keys)
            if ref_builder is not None:
                cam_map = cam_multiscale([v[j] for v in cam_views], cls_weight(cam_net), keys, size)["high_res"]
                ref_builder.add(feats["cam"][j], torch.from_numpy(cam_map), keys)
    banks: dict[str, Any] = {}
    logging.disable(logging.WARNING)
    try:
        for combo in combos:
            _, score = plan(combo, cam_net, recam_net, predictor)
            banks[combo_key(combo)] = builders[combo[0]].build(score, progress=False)
        if ref_builder is not None:
            banks[REFERENCE] = ref_builder.build(cls_weight(cam_net), progress=False)
    finally:
        logging.disable(logging.NOTSET)
    return banks


def compute_maps(cam_net: nn.Module, recam_net: nn.Module, predictor: ClassPredictor, banks: dict[str, Any],
                 combos: list[tuple[str, str]], split: SyntheticSplit, settings: DemoSettings) -> dict[str, list[dict]]:
    """Every row's IRN-style records ``{keys, cam, high_res}`` of ``split`` (``settings.scales`` x flips)."""
    w_cls, w_recam = cls_weight(cam_net), recam_weight(recam_net, predictor)
    feature_of = {combo_key(c): c[0] for c in combos}
    feature_of[REFERENCE] = "cam"
    out: dict[str, list[dict]] = {key: [] for key in [*ROWS, *banks]}
    x_all = images_to_tensor(split.images)
    size = tuple(x_all.shape[2:])
    for start in range(0, len(split), 32):
        x = x_all[start:start + 32]
        per = {"cam": views(cam_net, x, settings.scales), "recam": views(recam_net, x, settings.scales)}
        for j in range(len(x)):
            keys = np.nonzero(split.labels[start + j])[0].tolist()
            feats = {b: [v[j] for v in p] for b, p in per.items()}
            out["cam"].append(cam_multiscale(feats["cam"], w_cls, keys, size))
            out["recam"].append(cam_multiscale(feats["recam"], w_recam, keys, size))
            for key, bank in banks.items():
                known = [k for k in keys if k in bank.foreground]  # a class without prototypes: no map
                out[key].append(lpcam_multiscale(feats[feature_of[key]], bank, known, size))
    return out


# ----------------------------------------------------------------------------- one seed


def _data_dir(root: Path, data_params: dict[str, Any]) -> Path:
    """The cache folder of benchmarks/synthetic.py for these generator parameters."""
    return root / hashlib.sha1(json.dumps(data_params, sort_keys=True).encode()).hexdigest()[:12]


def _drift(cam_net: nn.Module, recam_net: nn.Module, predictor: ClassPredictor, w_init: torch.Tensor) -> dict:
    """Relative change of W_recam (from its init), W_cls and the backbone (from the CAM network)."""
    def rel(new: list[torch.Tensor], old: list[torch.Tensor]) -> float:
        a = torch.cat([t.detach().flatten() for t in new])
        b = torch.cat([t.detach().flatten() for t in old])
        return float((a - b).norm() / b.norm())

    return {
        "w_recam_rel_change": rel([predictor.classifier.weight], [w_init]),
        "w_cls_rel_change": rel([recam_net.classifier.weight], [cam_net.classifier.weight]),
        "backbone_rel_change": rel(list(recam_net.features.parameters()), list(cam_net.features.parameters())),
    }


def variant_tag(scale: float) -> str:
    return f"lr x{scale:g}"


def run_seed(seed: int, settings: DemoSettings, variants: list[RecamSettings], data_root: Path,
             progress: bool = True, reference: bool = True) -> dict[str, Any]:
    """One seed: the demo's CAM network, then per ReCAM variant its stage, banks and seeds."""
    t0 = time.perf_counter()
    data_dir = _data_dir(data_root, settings.data.to_dict())
    write_voc(settings.data, data_dir, progress=False)
    n_cls = settings.data.num_classes
    train, val = load_voc(data_dir, "train", n_cls), load_voc(data_dir, "val", n_cls)
    seed_everything(seed)
    cam_net = CAMNet(n_cls, settings.width, settings.feature_dim, settings.last_kernel)
    train_classifier(cam_net, train, settings, progress=False)
    log(f"seed {seed}: CAM network trained ({time.perf_counter() - t0:.0f}s)")
    combos = valid_combos()
    rows: dict[str, dict[str, Any]] = {}
    stages: dict[str, dict[str, Any]] = {}
    for i, recam in enumerate(variants):
        tag = variant_tag(recam.lr_scale)
        recam_net = copy.deepcopy(cam_net)
        torch.manual_seed(seed + 1)
        predictor = ClassPredictor(n_cls, cls_weight(cam_net).shape[1])
        w_init = predictor.classifier.weight.detach().clone()
        history = train_recam(recam_net, predictor, train, settings, recam, progress=progress)
        drift = _drift(cam_net, recam_net, predictor, w_init)
        stages[tag] = {"history": history, "drift": drift}
        log(f"seed {seed}, {tag}: ReCAM stage trained ({time.perf_counter() - t0:.0f}s): " +
            ", ".join(f"{k} {v:.3f}" for k, v in drift.items()))
        first = i == 0
        banks = build_banks(cam_net, recam_net, predictor, train, settings, combos, reference=reference and first)
        maps = compute_maps(cam_net, recam_net, predictor, banks, combos, val, settings)
        if not first:
            maps.pop("cam")
        scores = evaluate_seeds(maps, val.masks, n_cls, settings, val.parts)
        for key, bank in banks.items():
            scores[key]["class_prototypes"] = sum(v.shape[0] for v in bank.foreground.values())
            scores[key]["context_prototypes"] = sum(v.shape[0] for v in bank.context.values())
        for key, row in scores.items():
            row.pop("curve", None)
            rows[key if key in ("cam", REFERENCE) else f"{key}@{tag}"] = row
        log(f"seed {seed}, {tag}: seeds scored ({time.perf_counter() - t0:.0f}s): " +
            ", ".join(f"{k} {v['miou']:.1f}" for k, v in scores.items()))
    seconds = time.perf_counter() - t0
    return {"seed": seed, "rows": rows, "recam_stage": stages, "seconds": seconds}


# ----------------------------------------------------------------------------- report


def labels(combos: list[tuple[str, str]], tags: list[str]) -> dict[str, str]:
    out = {"cam": ROWS["cam"], REFERENCE: REFERENCE_LABEL}
    for tag in tags:
        out[f"recam@{tag}"] = f"[{tag}] {ROWS['recam']}"
        out.update({f"{combo_key(c)}@{tag}": f"[{tag}] {combo_label(c)}" for c in combos})
    return out


def summary(runs: list[dict[str, Any]]) -> dict[str, dict[str, float]]:
    out = {}
    for key in runs[0]["rows"]:
        row = {}
        for score in ("miou", "precision", "recall", "miou_at_eval", "threshold", "class_prototypes",
                      "context_prototypes"):
            values = [r["rows"][key][score] for r in runs if score in r["rows"][key]]
            if values:
                row[score] = statistics.fmean(values)
                row[f"{score}_sd"] = statistics.stdev(values) if len(values) > 1 else 0.0
        out[key] = row
    return out


def table(runs: list[dict[str, Any]], combos: list[tuple[str, str]], tags: list[str]) -> str:
    s = summary(runs)
    names = labels(combos, tags)
    lines = [f"Seeds {', '.join(str(r['seed']) for r in runs)}; val split; % at each row's best threshold "
             "(mean ± sd over seeds)", "",
             "| maps | mIoU | precision | recall | mIoU @ 0.3 | class / context prototypes |",
             "|---|---|---|---|---|---|"]
    for key in names:
        if key not in s:
            continue
        row = s[key]
        cells = " | ".join(f"{row[k]:.1f} ± {row[k + '_sd']:.1f}" for k in ("miou", "precision", "recall", "miou_at_eval"))
        protos = f"{row['class_prototypes']:.0f} / {row['context_prototypes']:.0f}" if "class_prototypes" in row else ""
        lines.append(f"| {names[key]} | {cells} | {protos} |")
    lines.append("")
    for tag in tags:
        base = f"{combo_key(('recam', 'recam'))}@{tag}"
        deltas = []
        for key in [f"{combo_key(c)}@{tag}" for c in combos if c != ("recam", "recam")] + [f"recam@{tag}"]:
            d = [r["rows"][key]["miou"] - r["rows"][base]["miou"] for r in runs]
            deltas.append(f"{names[key].split('] ')[1]} {statistics.fmean(d):+.1f} "
                          f"(per seed {', '.join(f'{v:+.1f}' for v in d)})")
        lines.append(f"[{tag}] mIoU minus recam/recam, paired by seed: " + "; ".join(deltas))
        hist = [r["recam_stage"][tag]["history"][-1] for r in runs]
        drift = [r["recam_stage"][tag]["drift"] for r in runs]
        lines.append(f"[{tag}] ReCAM stage, last epoch (mean over seeds): loss_cls "
                     f"{statistics.fmean(h['loss_cls'] for h in hist):.3f}, loss_ce "
                     f"{statistics.fmean(h['loss_ce'] for h in hist):.3f}, predictor acc "
                     f"{statistics.fmean(h['acc'] for h in hist):.3f}; relative change of W_recam "
                     f"{statistics.fmean(d['w_recam_rel_change'] for d in drift):.2f}, W_cls "
                     f"{statistics.fmean(d['w_cls_rel_change'] for d in drift):.3f}, backbone "
                     f"{statistics.fmean(d['backbone_rel_change'] for d in drift):.4f}")
    lines.append("Toy scale, synthetic data: indicative only; the VOC measurement is benchmarks/recam.py.")
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--seed", type=int, nargs="+", default=[0], help="one run per seed (data, networks, K-means)")
    p.add_argument("--json", type=Path, default=None, help="write the results here")
    p.add_argument("--quick", action="store_true", help="tiny data and networks, 1 ReCAM epoch (a plumbing check)")
    p.add_argument("--data-root", type=Path, default=Path(".cache/lpcam_synthetic"),
                   help="cache of generated datasets (shared with benchmarks/synthetic.py)")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (1: fastest on a shared CPU)")
    p.add_argument("--epochs", type=int, default=None, help="CAM training epochs (default: the demo's)")
    p.add_argument("--recam-epochs", type=int, default=None, help=f"ReCAM stage epochs (default {HOST_EPOCHS})")
    p.add_argument("--recam-lr-scale", type=float, nargs="+", default=[1.0, 8.0],
                   help="one ReCAM stage per value: its lr is VALUE x the host's lr x (host steps / our steps); "
                        "1: lr x steps as in the host, 8: also x the host's feature width (2048 / 256)")
    p.add_argument("--recam-loss-weight", type=float, default=1.0, help="weight of the predictor's CE (host: 1.0)")
    p.add_argument("--no-reference", action="store_true", help="skip the make_cam LPCAM reference row")
    p.add_argument("--quiet", action="store_true", help="no per-epoch log")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    ns = parse_args(argv)
    torch.set_num_threads(ns.threads)
    overrides: dict[str, Any] = {}
    if ns.epochs is not None:
        overrides["epochs"] = ns.epochs
    if ns.quick:
        overrides = {"data_num_images": 60, "data_image_size": 64, **overrides}
    variants = [RecamSettings(epochs=ns.recam_epochs or (1 if ns.quick else HOST_EPOCHS), lr_scale=scale,
                              loss_weight=ns.recam_loss_weight) for scale in ns.recam_lr_scale]
    tags = [variant_tag(v.lr_scale) for v in variants]
    combos = valid_combos()
    runs = []
    for seed in ns.seed:
        settings = demo_settings(seed, quick=ns.quick, **overrides)
        runs.append(run_seed(seed, settings, variants, ns.data_root, progress=not ns.quiet,
                             reference=not ns.no_reference))
    text = table(runs, combos, tags)
    print(text)
    if ns.json is not None:
        ns.json.parent.mkdir(parents=True, exist_ok=True)
        payload = {
            "command": " ".join(["python", "benchmarks/recam_choices.py", *(argv if argv is not None else sys.argv[1:])]),
            "labels": labels(combos, tags),
            "summary": summary(runs),
            "table": text,
            "settings": {**settings.to_dict(), "seeds": ns.seed, "quick": ns.quick, "threads": ns.threads},
            "recam": [{**asdict(v), "tag": variant_tag(v.lr_scale)} for v in variants],  # lr used: history[0]["lr"]
            "host": {"lr": HOST_LR, "epochs": HOST_EPOCHS, "steps": HOST_STEPS},
            "runs": runs,
        }
        ns.json.write_text(json.dumps(payload, indent=1, default=lambda v: v.item() if hasattr(v, "item") else str(v)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

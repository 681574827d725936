"""The stage-(b) choices of lpcam_adapters.amn compared on a small AMN-shaped pipeline (CPU, synthetic data).

No AMN code runs here: this is a stand-in at toy scale, so its numbers *indicate*, they do not
replace the VOC measurement (``benchmarks/amn.py --variants all`` with trained weights). Pipeline:

1. stage (a): the demo's small CNN (:func:`lpcam_core.demo.CAMNet`) trained from image labels on
   the synthetic part-based set; its CAM gives ir_label-style pseudo labels (confident
   foreground at 0.30, confident background at 0.05, ignore between: IRN's rule without the CRF);
2. stage (b): an AMN-shaped network (the classifier's features, ``label_enc`` Linear(20, D),
   Dropout, four summed dilated 3x3 convolutions to 21 channels) trained on those labels with
   AMN's loss (label smoothing eps 0.4, background and foreground losses averaged);
3. seeds on the val split: stage-(a) CAM, AMN's maps (Dropout off, its make_amn_cam rules) and
   LPCAM for all 16 combinations of features x classifier x softmax x split, scored with a
   background-threshold sweep (mIoU % at the best threshold and at 0.30).

Usage::

    python benchmarks/amn_choices.py --out bench_out/amn_choices [--seeds 0 1 2] [--quick]
"""

from __future__ import annotations

import argparse
import itertools
import json
import logging
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lpcam_core import LPCAMConfig, PrototypeBuilder, lpcam_multiscale  # noqa: E402
from lpcam_core.demo import CAMNet, DemoSettings, images_to_tensor, train_classifier  # noqa: E402
from lpcam_core.demo.synthetic import SyntheticConfig, generate  # noqa: E402
from lpcam_core.eval.metrics import accumulate_confusions  # noqa: E402
from lpcam_core.maps import cam_multiscale  # noqa: E402

NUM = 20  # label_enc input, as AMN's
THRESHOLDS = tuple(round(0.05 + 0.025 * i, 3) for i in range(37))


def log(msg: str) -> None:
    print(f"[amn-choices] {msg}", flush=True)


class SummedDilated(nn.Module):
    """Four parallel dilated 3x3 convolutions, outputs summed (AMN's ASPP shape)."""

    def __init__(self, cin: int, cout: int, rates: tuple[int, ...]) -> None:
        super().__init__()
        for i, r in enumerate(rates):
            conv = nn.Conv2d(cin, cout, 3, 1, padding=r, dilation=r, bias=True)
            nn.init.normal_(conv.weight, std=0.01)
            nn.init.zeros_(conv.bias)
            self.add_module(f"c{i}", conv)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return sum(m(x) for m in self.children())


class ToyAMN(nn.Module):
    """stage1..stage4 (the classifier's feature layers), label_enc, Dropout + summed dilated head (21 ways)."""

    def __init__(self, classifier: nn.Module, dim: int, rates: tuple[int, ...]) -> None:
        super().__init__()
        layers = list(classifier.features.children())
        cut = [0, 2, 3, 4, len(layers)]
        for i in range(4):
            setattr(self, f"stage{i + 1}", nn.Sequential(*layers[cut[i]:cut[i + 1]]))
        self.label_enc = nn.Linear(NUM, dim)
        self.classifier = nn.Sequential(nn.Dropout(0.1), SummedDilated(dim, NUM + 1, rates))

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        f = self.stage4(self.stage3(self.stage2(self.stage1(x))))
        return self.classifier(f * self.label_enc(y)[..., None, None])


def pad20(labels: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.pad(labels, ((0, 0), (0, NUM - labels.shape[1]))).astype(np.float32))


def views(x: torch.Tensor, scales) -> list[torch.Tensor]:
    """[B, 3, H, W] -> per scale [B, 2, 3, h, w] (image, flip)."""
    out = []
    for s in scales:
        xs = x if s == 1.0 else F.interpolate(x, scale_factor=s, mode="bilinear", align_corners=False,
                                              recompute_scale_factor=False)
        out.append(torch.stack([xs, xs.flip(-1)], 1))
    return out


def pseudo_labels(cam_records: list[dict], fg: float = 0.30, bg: float = 0.05) -> np.ndarray:
    """IRN's cam_to_ir_label rule without the CRF: confident fg, confident bg, ignore (255) between."""
    out = []
    for rec in cam_records:
        keys, hr = rec["keys"].numpy(), rec["high_res"]
        lab = np.concatenate([[0], keys + 1])
        fg_lab = lab[np.argmax(np.concatenate([np.full((1, *hr.shape[1:]), fg, np.float32), hr]), 0)]
        bg_lab = lab[np.argmax(np.concatenate([np.full((1, *hr.shape[1:]), bg, np.float32), hr]), 0)]
        conf = fg_lab.copy()
        conf[fg_lab == 0] = 255
        conf[(bg_lab + fg_lab) == 0] = 0
        out.append(conf.astype(np.uint8))
    return np.stack(out)


def train_amn(model: ToyAMN, x_all: torch.Tensor, y_all: torch.Tensor, labels: np.ndarray, epochs: int,
              seed: int, eps: float = 0.4) -> None:
    """AMN's training loss (train_amn.balanced_cross_entropy, label smoothing eps) with random flips."""
    gen = torch.Generator().manual_seed(seed)
    backbone = [p for n, p in model.named_parameters() if n.startswith("stage")]
    head = [p for n, p in model.named_parameters() if not n.startswith("stage")]
    opt = torch.optim.Adam([{"params": backbone, "lr": 1e-4}, {"params": head, "lr": 1e-3}], weight_decay=1e-4)
    lab_all = torch.from_numpy(labels.astype(np.int64))
    model.train()
    n, batch = len(x_all), 32
    for ep in range(epochs):
        order = torch.randperm(n, generator=gen)
        total = 0.0
        for i in range(0, n - batch + 1, batch):
            idx = order[i:i + batch]
            x, lab = x_all[idx], lab_all[idx]
            flip = torch.rand(len(idx), generator=gen) < 0.5
            x = torch.where(flip[:, None, None, None], x.flip(-1), x)
            lab = torch.where(flip[:, None, None], lab.flip(-1), lab)
            logit = model(x, y_all[idx])
            lab = F.interpolate(lab[:, None].float(), logit.shape[-2:], mode="nearest")[:, 0].long()
            target = lab.clone()
            target[lab == 255] = 0
            given = torch.full_like(logit, eps / (logit.shape[1] - 1)).scatter_(1, target[:, None], 1 - eps)
            loss_map = -(F.log_softmax(logit, 1) * given).sum(1)
            bg, fg = (lab == 0).float(), ((lab != 0) & (lab != 255)).float()
            loss = ((loss_map * bg).sum() / bg.sum().clamp_min(1) + (loss_map * fg).sum() / fg.sum().clamp_min(1)) / 2
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total += float(loss.detach())
        log(f"AMN-shaped net epoch {ep + 1}/{epochs}: loss {total / max(1, n // batch):.3f}")
    model.eval()


def amn_maps(amn_mod, model: ToyAMN, x: torch.Tensor, y20: torch.Tensor, ir_labels: np.ndarray, scales,
             batch: int = 32) -> list[dict]:
    """AMN's make_amn_cam rules with Dropout off, per image: {keys, high_res [1 + n, H, W]}."""
    size = tuple(x.shape[-2:])
    out = []
    with torch.no_grad():
        for start in range(0, len(x), batch):
            xb, yb = x[start:start + batch], y20[start:start + batch]
            high = 0
            for v in views(xb, scales):
                b = v.shape[0]
                logit = ToyAMN_head(model, v.flatten(0, 1), yb.repeat_interleave(2, 0)).unflatten(0, (b, 2))
                logit = (logit[:, 0] + logit[:, 1].flip(-1)) / 2
                high = high + F.interpolate(logit, size, mode="bilinear", align_corners=False)
            high = high / len(scales)
            for j in range(len(xb)):
                keys = torch.nonzero(yb[j])[:, 0]
                prob = F.softmax(high[j], 0)[torch.cat([torch.zeros(1, dtype=torch.long), keys + 1])].numpy()
                out.append({"keys": keys, "high_res": amn_mod.normalise_foreground(prob, ir_labels[start + j])})
    return out


def ToyAMN_head(model: ToyAMN, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:  # noqa: N802
    """Logits with Dropout off (the adapter's rule), batched."""
    import lpcam_adapters.amn as amn_mod

    f = amn_mod.amn_features(model, x, y, conditioned=True)
    for m in amn_mod.head_modules(model):
        f = m(f)
    return f


def raw_features(model: ToyAMN, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model.stage4(model.stage3(model.stage2(model.stage1(x))))


def score(records: list[dict], masks: np.ndarray, num_classes: int, drop0: bool = False) -> dict[str, Any]:
    samples = [(r["keys"], r["high_res"][1:] if drop0 else r["high_res"], m) for r, m in zip(records, masks)]
    mats, _ = accumulate_confusions(samples, THRESHOLDS, num_classes=num_classes + 1)
    scores = [m.scores() for m in mats]
    best = max(range(len(THRESHOLDS)), key=lambda i: scores[i]["miou"])
    at = THRESHOLDS.index(0.3)
    return {"miou": 100 * scores[best]["miou"], "threshold": THRESHOLDS[best], "miou_at_0.30": 100 * scores[at]["miou"],
            "precision": 100 * scores[best]["mean_precision"], "recall": 100 * scores[best]["mean_recall"]}


def run(seed: int, ns: argparse.Namespace) -> dict[str, Any]:
    import lpcam_adapters.amn as amn_mod

    torch.manual_seed(seed)
    data_cfg = SyntheticConfig(num_images=ns.images, seed=seed)
    data = generate(data_cfg)
    train, val = data["train"], data["val"]
    n_cls = data_cfg.num_classes
    settings = DemoSettings(data=data_cfg, seed=seed, epochs=ns.epochs)
    scales = settings.scales
    t0 = time.perf_counter()
    clf = CAMNet(n_cls, settings.width, settings.feature_dim)
    train_classifier(clf, train, settings, progress=False)
    log(f"seed {seed}: classifier trained ({time.perf_counter() - t0:.0f}s)")
    weight = clf.classifier.weight.detach()[:, :, 0, 0]
    result: dict[str, Any] = {"seed": seed}

    def cam_records(split) -> list[dict]:
        x_all = images_to_tensor(split.images)
        out = []
        with torch.no_grad():
            for start in range(0, len(split), 64):
                xb = x_all[start:start + 64]
                per_scale = [clf.features(v.flatten(0, 1)).unflatten(0, (len(xb), 2)) for v in views(xb, scales)]
                for j in range(len(xb)):
                    keys = np.nonzero(split.labels[start + j])[0].tolist()
                    out.append(cam_multiscale([p[j] for p in per_scale], weight, keys, x_all.shape[2:]))
        return out

    cams_train, cams_val = cam_records(train), cam_records(val)
    result["stage (a) CAM"] = score(cams_val, val.masks, n_cls)
    log(f"seed {seed}: stage (a) CAM {result['stage (a) CAM']['miou']:.1f} ({time.perf_counter() - t0:.0f}s)")
    ir_train, ir_val = pseudo_labels(cams_train), pseudo_labels(cams_val)
    clf_copy = CAMNet(n_cls, settings.width, settings.feature_dim)
    clf_copy.load_state_dict(clf.state_dict())
    model = ToyAMN(clf_copy, settings.feature_dim, rates=(1, 2, 3, 4))
    x_train, y_train = images_to_tensor(train.images), pad20(train.labels)
    x_val, y_val = images_to_tensor(val.images), pad20(val.labels)
    train_amn(model, x_train, y_train, ir_train, ns.amn_epochs, seed)
    log(f"seed {seed}: AMN-shaped net trained ({time.perf_counter() - t0:.0f}s)")
    amn_train = amn_maps(amn_mod, model, x_train, y_train, ir_train, scales)
    amn_val = amn_maps(amn_mod, model, x_val, y_val, ir_val, scales)
    result["AMN maps"] = score(amn_val, val.masks, n_cls, drop0=True)
    log(f"seed {seed}: AMN maps {result['AMN maps']['miou']:.1f} ({time.perf_counter() - t0:.0f}s)")

    cfg = LPCAMConfig.preset("voc", seed=seed, memory_budget_bytes=ns.pool_mib * 2**20)
    option = {o.name: o for o in amn_mod.OPTIONS}
    with torch.no_grad():
        emb_train = model.label_enc(y_train)[..., None, None]
        emb_val = model.label_enc(y_val)[..., None, None]
    batch = 64
    for features, softmax, split in itertools.product(option["features"].choices, option["softmax"].choices,
                                                      option["split"].choices):
        conditioned = features == "conditioned"
        pools = PrototypeBuilder(20, cfg)
        for start in range(0, len(train), batch):
            f = raw_features(model, x_train[start:start + batch])
            if conditioned:
                f = f * emb_train[start:start + batch]
            for j in range(len(f)):
                i = start + j
                keys = torch.nonzero(y_train[i])[:, 0]
                if split == "amn_cam":
                    cams = torch.from_numpy(amn_train[i]["high_res"][1:])
                else:
                    cams = amn_mod.ir_label_cams(ir_train[i], keys.tolist(), cfg.fg_threshold)
                pools.add(f[j], cams, keys)
        banks = {}
        for classifier in option["classifier"].choices:
            choices = {"features": features, "classifier": classifier, "softmax": softmax, "split": split}
            logging.disable(logging.WARNING)
            try:
                banks[classifier] = pools.build(amn_mod.amn_scorer(model, choices), progress=False)
            finally:
                logging.disable(logging.NOTSET)
        records: dict[str, list] = {c: [] for c in banks}
        for start in range(0, len(val), batch):
            xb = x_val[start:start + batch]
            per_scale = []
            for v in views(xb, scales):
                f = raw_features(model, v.flatten(0, 1)).unflatten(0, (len(xb), 2))
                if conditioned:
                    f = f * emb_val[start:start + len(xb)][:, None]
                per_scale.append(f)
            for j in range(len(xb)):
                for classifier, bank in banks.items():
                    keys = [k for k in torch.nonzero(y_val[start + j])[:, 0].tolist() if k in bank.foreground]
                    records[classifier].append(lpcam_multiscale([p[j] for p in per_scale], bank, keys, x_val.shape[2:]))
        for classifier, bank in banks.items():
            name = f"LPCAM {features}/{classifier}/{softmax}/{split}"
            result[name] = score(records[classifier], val.masks, n_cls)
            result[name]["class_prototypes"] = sum(v.shape[0] for v in bank.foreground.values())
            result[name]["context_prototypes"] = sum(v.shape[0] for v in bank.context.values())
            log(f"seed {seed}: {name}: {result[name]['miou']:.1f} ({time.perf_counter() - t0:.0f}s)")
    result["seconds"] = time.perf_counter() - t0
    return result


def table(runs: list[dict[str, Any]]) -> str:
    names = [k for k in runs[0] if k not in ("seed", "seconds")]
    lines = [f"### Stage-(b) choices on the toy AMN pipeline ({len(runs)} seed(s); val mIoU %, mean ± std)", "",
             "| maps (features/classifier/softmax/split) | best-threshold mIoU | mIoU at 0.30 | class / context prototypes |",
             "|---|---|---|---|"]
    for name in names:
        best = np.array([r[name]["miou"] for r in runs])
        at = np.array([r[name]["miou_at_0.30"] for r in runs])
        protos = ""
        if "class_prototypes" in runs[0][name]:
            protos = f"{np.mean([r[name]['class_prototypes'] for r in runs]):.0f} / " \
                     f"{np.mean([r[name]['context_prototypes'] for r in runs]):.0f}"
        lines.append(f"| {name} | {best.mean():.1f} ± {best.std():.1f} | {at.mean():.1f} ± {at.std():.1f} | {protos} |")
    lines += ["", "Toy scale, synthetic data: indicative only; the VOC measurement is benchmarks/amn.py --variants all."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="bench_out/amn_choices")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--images", type=int, default=1200, help="synthetic images (80%% train)")
    parser.add_argument("--epochs", type=int, default=12, help="classifier epochs")
    parser.add_argument("--amn-epochs", type=int, default=8, help="AMN-shaped network epochs")
    parser.add_argument("--threads", type=int, default=None, help="torch threads")
    parser.add_argument("--pool-mib", type=int, default=256, help="memory budget of each set of prototype pools")
    parser.add_argument("--quick", action="store_true", help="300 images, 4 + 3 epochs (a plumbing check)")
    ns = parser.parse_args(argv)
    if ns.quick:
        ns.images, ns.epochs, ns.amn_epochs, ns.pool_mib = 300, 4, 3, 64
    if ns.threads:
        torch.set_num_threads(ns.threads)
    out = Path(ns.out)
    out.mkdir(parents=True, exist_ok=True)
    runs = [run(seed, ns) for seed in ns.seeds]
    text = table(runs)
    (out / "results.json").write_text(json.dumps(runs, indent=2))
    (out / "table.md").write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()

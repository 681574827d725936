"""The CLIP-ES adapter's feature choice on a CPU proxy: a small CLIP-style ViT trained on the synthetic set.

No CLIP weights, VOC or CLIP-ES code are needed: the proxy is our own small image tower shaped as CLIP's
(class token, pre-norm blocks, ``ln_post``, ``proj`` into a D-dim "text" space; a small convolutional stem
in place of the one-conv patch embedding, which localised poorly when trained from scratch here:
``--patch-embedding`` restores it) whose
classifier is CLIP's: learned class embeddings ("prompts"), cosine similarity times a learned logit scale,
softmax over the classes. It is trained on the demo's synthetic training images (soft-target cross-entropy
over the present classes). Then, on the held-out images, per seed:

* **Grad-CAM** as CLIP-ES computes it: the gradient of a class's softmax score (among the image's present
  classes) with respect to the last block's ``ln_1`` output, channel weights = mean gradient, ReLU,
  min-max; this is also the map that splits the pools at tau (CLIP-ES's baseline);
* **LPCAM** with each ``LPCAM_CLIP_FEATURES`` choice (``proj``, ``ln_post``, ``tokens``), prototypes
  scored by :class:`lpcam_core.CosineScorer` through :func:`lpcam_adapters.clip_es.to_text_space`, the
  adapter's own code, softmax over the class embeddings (``LPCAM_CLIP_SCORER=classes``);

each map resized to the image and min-max scaled (as the adapter returns it), scored as seeds (mIoU,
precision, recall at the best background threshold). Command::

    python benchmarks/clip_es_choices.py --seeds 0 1 2

What the proxy can tell: whether the features in the text space (after ``proj``), before it, or before
``ln_post`` make better prototypes for a cosine classifier trained the way CLIP's is applied. What it
cannot tell: anything about CLIP's pretrained features or its text tower (the "prompts" here are learned
class rows, there are no background prompts, so ``classes+background`` is not measured), nor the effect of
CLIP-ES's CAA refinement and CRF (not run here). The VOC measurement is ``benchmarks/clip_es.py``.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

FEATURES = ("proj", "ln_post", "tokens")


class Block(nn.Module):
    """A pre-norm transformer block with CLIP's names (``ln_1``, ``attn``, ``ln_2``, ``mlp``)."""

    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.ln_1, self.ln_2 = nn.LayerNorm(width), nn.LayerNorm(width)
        self.attn = nn.MultiheadAttention(width, heads, batch_first=True)
        self.mlp = nn.Sequential(nn.Linear(width, 4 * width), nn.GELU(), nn.Linear(4 * width, width))

    def forward(self, x: torch.Tensor, normed: torch.Tensor | None = None) -> torch.Tensor:
        h = self.ln_1(x) if normed is None else normed
        x = x + self.attn(h, h, h, need_weights=False)[0]
        return x + self.mlp(self.ln_2(x))


class Visual(nn.Module):
    """CLIP's image tower in small: [B, 3, S, S] -> tokens [B, 1 + g*g, width]."""

    def __init__(self, size: int, patch: int, width: int, layers: int, heads: int, dim: int, stem: bool = True) -> None:
        super().__init__()
        self.patch, self.grid = patch, size // patch
        if stem:  # a small convolutional stem (stride ``patch``): a from-scratch ViT on ~1,000 images barely localises
            layers_ = []
            channels = 3
            for i in range(int(math.log2(patch))):
                out = width if 2 ** (i + 1) == patch else min(width, 32 * 2 ** i)
                layers_ += [nn.Conv2d(channels, out, 3, 2, 1, bias=False), nn.BatchNorm2d(out), nn.ReLU(inplace=True)]
                channels = out
            self.conv1 = nn.Sequential(*layers_[:-1])
        else:  # CLIP's patch embedding
            self.conv1 = nn.Conv2d(3, width, patch, patch, bias=False)
        self.class_embedding = nn.Parameter(torch.randn(width) * width ** -0.5)
        self.positional_embedding = nn.Parameter(torch.randn(self.grid ** 2 + 1, width) * width ** -0.5)
        self.ln_pre, self.ln_post = nn.LayerNorm(width), nn.LayerNorm(width)
        self.blocks = nn.ModuleList(Block(width, heads) for _ in range(layers))
        self.proj = nn.Parameter(torch.randn(width, dim) * width ** -0.5)

    def before_last(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv1(x).flatten(2).transpose(1, 2)
        x = torch.cat([self.class_embedding.expand(x.shape[0], 1, -1), x], 1) + self.positional_embedding
        x = self.ln_pre(x)
        for block in self.blocks[:-1]:
            x = block(x)
        return x


class ProxyCLIP(nn.Module):
    """``visual`` + class embeddings + logit scale: CLIP's classifier on the mean of ``ln_post(tokens) @ proj``."""

    def __init__(self, num_classes: int, size: int = 96, patch: int = 8, width: int = 96, layers: int = 4,
                 heads: int = 4, dim: int = 64, stem: bool = True) -> None:
        super().__init__()
        self.visual = Visual(size, patch, width, layers, heads, dim, stem)
        self.text = nn.Parameter(torch.randn(num_classes, dim) * dim ** -0.5)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))

    def logits(self, tokens: torch.Tensor, rows: torch.Tensor | None = None) -> torch.Tensor:
        pooled = self.visual.ln_post(tokens[:, 1:]).mean(1) @ self.visual.proj
        rows = self.text if rows is None else rows
        return self.logit_scale.exp().clamp(max=100) * F.normalize(pooled, dim=-1) @ F.normalize(rows, dim=-1).T

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.logits(self.visual.blocks[-1](self.visual.before_last(images)))

    def local_features(self, images: torch.Tensor, kind: str) -> torch.Tensor:
        """[B, C, g, g] patch features of the chosen kind (CLIP-ES's ``LPCAM_CLIP_FEATURES``)."""
        x = self.visual.blocks[-1](self.visual.before_last(images))[:, 1:]
        if kind != "tokens":
            x = self.visual.ln_post(x)
        if kind == "proj":
            x = x @ self.visual.proj
        g = self.visual.grid
        return x.transpose(1, 2).reshape(x.shape[0], -1, g, g)

    def grad_cam(self, image: torch.Tensor, classes: list[int]) -> torch.Tensor:
        """[n, g, g] CLIP-ES's Grad-CAM of each present class (softmax over the present classes' rows)."""
        with torch.no_grad():
            x = self.visual.before_last(image[None])
        last = self.visual.blocks[-1]
        maps = []
        for i in range(len(classes)):
            normed = last.ln_1(x).detach().requires_grad_(True)
            probs = self.logits(last(x, normed), self.text[classes]).softmax(-1)
            (grad,) = torch.autograd.grad(probs[0, i], normed)
            act, grad = normed[0, 1:].detach(), grad[0, 1:]
            cam = F.relu((act * grad.mean(0)).sum(-1))
            cam = cam - cam.min()
            maps.append((cam / (1e-7 + cam.max())).reshape(self.visual.grid, self.visual.grid))
        return torch.stack(maps)


def train(model: ProxyCLIP, images: torch.Tensor, labels: torch.Tensor, epochs: int, seed: int) -> float:
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.05)
    steps = epochs * max(1, len(images) // 32)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=1e-3, total_steps=steps, pct_start=0.1)
    target = labels / labels.sum(1, keepdim=True)
    model.train()
    loss = torch.tensor(0.0)
    for _ in range(epochs):
        order = torch.randperm(len(images), generator=gen)
        for s in range(len(images) // 32):
            idx = order[s * 32:(s + 1) * 32]
            x = images[idx]
            flip = torch.rand(len(idx), generator=gen) < 0.5
            x = torch.where(flip[:, None, None, None], x.flip(-1), x)
            loss = -(target[idx] * model(x).log_softmax(-1)).sum(-1).mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    model.eval()
    return float(loss.detach())


def upscale(maps: torch.Tensor, size: int) -> np.ndarray:
    """[n, g, g] -> [n, S, S] bilinear, min-max per map (as the adapter returns maps to CLIP-ES)."""
    up = F.interpolate(maps[None].float(), size=(size, size), mode="bilinear", align_corners=False)[0]
    low = up.flatten(1).min(1).values[:, None, None]
    up = up - low
    return (up / (1e-7 + up.flatten(1).max(1).values[:, None, None])).numpy()


def run_seed(seed: int, epochs: int, num_classes: int, progress: bool, num_images: int | None = None,
             stem: bool = True) -> dict:
    from lpcam_adapters.clip_es import to_text_space
    from lpcam_core import CosineScorer, LPCAMConfig, PrototypeBuilder, lpcam_map
    from lpcam_core.demo.pipeline import images_to_tensor, seed_everything
    from lpcam_core.demo.synthetic import SyntheticConfig, generate
    from lpcam_core.eval.metrics import accumulate_confusions

    seed_everything(seed)
    cfg = SyntheticConfig(num_classes=num_classes, num_images=num_images, seed=seed)
    data = generate(cfg)
    train_x, val_x = images_to_tensor(data["train"].images), images_to_tensor(data["val"].images)
    model = ProxyCLIP(num_classes, size=cfg.image_size, stem=stem)
    t0 = time.perf_counter()
    loss = train(model, train_x, torch.from_numpy(data["train"].labels), epochs, seed)
    config = LPCAMConfig.preset("voc")
    present = [np.flatnonzero(v).tolist() for v in data["train"].labels]
    seeds: dict[str, list[dict]] = {"Grad-CAM": [], **{f"LPCAM {k}": [] for k in FEATURES}}
    builders = {k: PrototypeBuilder(num_classes, config) for k in FEATURES}
    for i in range(len(train_x)):  # pools split by the host-style Grad-CAM at tau, one pass per image
        cams = model.grad_cam(train_x[i], present[i])
        with torch.no_grad():
            for kind in FEATURES:
                builders[kind].add(model.local_features(train_x[i:i + 1], kind)[0], cams, present[i], index=i)
    scale = float(model.logit_scale.detach().exp().clamp(max=100))
    banks = {}
    for kind in FEATURES:
        to_space = to_text_space(model, kind)
        scorer = CosineScorer(model.text.detach(), scale=scale, to_space=to_space,
                              feature_dim=model.visual.proj.shape[0] if to_space is not None else None)
        banks[kind] = builders[kind].build(scorer, progress=False)
    val_present = [np.flatnonzero(v).tolist() for v in data["val"].labels]
    size = cfg.image_size
    for i in range(len(val_x)):
        keys = val_present[i]
        seeds["Grad-CAM"].append({"keys": np.array(keys), "high_res": upscale(model.grad_cam(val_x[i], keys), size)})
        with torch.no_grad():
            for kind in FEATURES:
                feats = model.local_features(val_x[i:i + 1], kind)[0]
                maps = lpcam_map(feats, banks[kind], keys, missing="zeros")
                seeds[f"LPCAM {kind}"].append({"keys": np.array(keys), "high_res": upscale(maps, size)})
    thresholds = [round(0.05 * t, 2) for t in range(1, 20)]
    out = {"seed": seed, "train_loss": loss, "seconds": time.perf_counter() - t0,
           "prototypes": {k: [sum(r[f"{kind}_prototypes"] for r in banks[k].summary()) for kind in ("class", "context")]
                          for k in FEATURES}, "methods": {}}
    for method, records in seeds.items():
        samples = [(r["keys"], r["high_res"], m) for r, m in zip(records, data["val"].masks)]
        mats, _ = accumulate_confusions(samples, thresholds, num_classes=num_classes + 1)
        scores = [m.scores() for m in mats]
        best = max(range(len(thresholds)), key=lambda t: scores[t]["miou"])
        out["methods"][method] = {"miou": 100 * scores[best]["miou"], "precision": 100 * scores[best]["mean_precision"],
                                  "recall": 100 * scores[best]["mean_recall"], "threshold": thresholds[best]}
    if progress:
        print(f"seed {seed}: " + ", ".join(f"{m} {v['miou']:.1f}" for m, v in out["methods"].items()), file=sys.stderr)
    return out


def table(results: list[dict]) -> str:
    methods = list(results[0]["methods"])
    lines = ["| method | " + " | ".join(f"seed {r['seed']} mIoU / P / R" for r in results) + " | mean mIoU |",
             "|---|" + "---:|" * (len(results) + 1)]
    for m in methods:
        cells = [f"{r['methods'][m]['miou']:.1f} / {r['methods'][m]['precision']:.1f} / {r['methods'][m]['recall']:.1f}"
                 for r in results]
        mean = sum(r["methods"][m]["miou"] for r in results) / len(results)
        lines.append(f"| {m} | " + " | ".join(cells) + f" | {mean:.1f} |")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[0], help="seeds (data, model, K-means; default 0)")
    p.add_argument("--epochs", type=int, default=30, help="training epochs of the proxy (default 30)")
    p.add_argument("--classes", type=int, default=6, help="synthetic classes (default 6, the demo's)")
    p.add_argument("--patch-embedding", action="store_true", help="CLIP's one-conv patch embedding instead of the "
                   "convolutional stem (it localises poorly when trained from scratch on the synthetic set)")
    p.add_argument("--images", type=int, help="synthetic images (default: the demo's, 1,200 for 6 classes)")
    p.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    p.add_argument("--json", help="write the results here")
    return p


def main(argv: list[str] | None = None) -> int:
    opts = build_parser().parse_args(argv)
    torch.set_num_threads(opts.threads)
    results = [run_seed(s, opts.epochs, opts.classes, True, opts.images, not opts.patch_embedding) for s in opts.seeds]
    if opts.json:
        with open(opts.json, "w", encoding="utf-8") as f:
            json.dump(results, f, indent=2)
    print(table(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())

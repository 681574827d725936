"""Run MCTformer's own ``main.py`` with a tiny DeiT built from the host's own classes (test helper).

Usage::

    python mct_launch.py HOST_DIR [--adapter full|shims] [--make-checkpoint PATH] -- <main.py arguments>

* ``--adapter full`` (default) imports ``lpcam_adapters.mctformer`` first, as the one line at the top
  of ``main.py`` would; ``--adapter shims`` registers only its modern-stack shims (timm entry points,
  ``PIL.Image.CUBIC``, MCTformer+'s ``.cuda()``), which the host needs to run at all on this stack:
  the reference for "``LPCAM=0`` reproduces the host's maps".
* Registers the timm entry point ``lpcam_tiny_MCTformerV2``: the host's ``MCTformerV2`` (V2 checkout) or
  ``MCTformerPlus`` (MCTformer+ checkout) with embed_dim 48, depth 2, 2 heads, random init.
* ``--make-checkpoint PATH`` writes ``{'model': state_dict}`` of a seeded tiny model and exits;
  with ``--train-epochs E --data-path VOC2012 --train-list LIST`` the model is first trained from
  image labels (``voc12/cls_labels.npy`` of the working directory) with the host's multi-label
  soft-margin losses on its class-token and patch logits (a stand-in for its training loop, whose
  ``torch.cuda.synchronize()`` needs a GPU).

The host checkout is not modified: ``main.py`` runs through ``runpy`` with the host on ``sys.path``.
"""

from __future__ import annotations

import argparse
import os
import runpy
import sys
from functools import partial

TINY = dict(patch_size=16, embed_dim=48, depth=2, num_heads=2, mlp_ratio=2, qkv_bias=True)


def _register_tiny() -> None:
    import models  # the host's
    import torch.nn as nn
    from timm.models import register_model

    cls = getattr(models, "MCTformerPlus", None) or models.MCTformerV2

    def lpcam_tiny_MCTformerV2(pretrained: bool = False, **kwargs):
        for key in ("pretrained_cfg", "pretrained_cfg_overlay", "cache_dir"):
            kwargs.pop(key, None)
        if cls.__name__ != "MCTformerPlus":
            kwargs.pop("input_size", None)
        return cls(norm_layer=partial(nn.LayerNorm, eps=1e-6), **TINY, **kwargs)

    register_model(lpcam_tiny_MCTformerV2)


def _train(model, opts) -> None:
    """Multi-label training from image labels (host's losses on class-token and patch logits)."""
    import numpy as np
    import torch
    import torch.nn.functional as F
    from PIL import Image

    ids = [line.split()[0] for line in open(opts.train_list) if line.strip()]
    labels = np.load(os.path.join("voc12", "cls_labels.npy"), allow_pickle=True).item()
    mean, std = np.array([0.485, 0.456, 0.406], np.float32), np.array([0.229, 0.224, 0.225], np.float32)
    images = []
    for i in ids:
        with Image.open(os.path.join(opts.data_path, "JPEGImages", i + ".jpg")) as im:
            rgb = np.asarray(im.convert("RGB").resize((opts.train_size, opts.train_size), Image.BICUBIC), np.float32)
        images.append(((rgb / 255.0 - mean) / std).transpose(2, 0, 1))
    x_all = torch.from_numpy(np.stack(images))
    y_all = torch.from_numpy(np.stack([labels[i] for i in ids]).astype(np.float32))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.05)
    g = torch.Generator().manual_seed(0)
    model.train()
    for epoch in range(opts.train_epochs):
        order = torch.randperm(len(ids), generator=g)
        total = 0.0
        for start in range(0, len(ids), 32):
            idx = order[start : start + 32]
            x, y = x_all[idx], y_all[idx]
            flip = torch.rand(len(idx), generator=g) < 0.5
            x = torch.where(flip.view(-1, 1, 1, 1), x.flip(-1), x)
            outputs = model(x)
            logits = [o for o in outputs if o.ndim == 2 and o.shape == y.shape]
            loss = sum(F.multilabel_soft_margin_loss(o, y) for o in logits)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            total += float(loss) * len(idx)
        print(f"epoch {epoch}: loss {total / len(ids):.4f}", flush=True)
    model.eval()


def main() -> None:
    argv = sys.argv[1:]
    if "--" in argv:
        cut = argv.index("--")
        own, host_args = argv[:cut], argv[cut + 1 :]
    else:
        own, host_args = argv, []
    parser = argparse.ArgumentParser()
    parser.add_argument("host")
    parser.add_argument("--adapter", choices=("full", "shims"), default="full")
    parser.add_argument("--make-checkpoint")
    parser.add_argument("--input-size", type=int, default=128)
    parser.add_argument("--model", default="lpcam_tiny_MCTformerV2", help="entry point for --make-checkpoint")
    parser.add_argument("--train-epochs", type=int, default=0)
    parser.add_argument("--data-path")
    parser.add_argument("--train-list")
    parser.add_argument("--train-size", type=int, default=96)
    opts = parser.parse_args(own)
    host = os.path.abspath(opts.host)
    sys.path.insert(0, host)
    if opts.adapter == "full":
        import lpcam_adapters.mctformer  # noqa: F401  - the one line
    else:
        from lpcam_adapters import mctformer

        mctformer.hooks.unregister_patch("models", "lpcam_swap")
        mctformer.hooks.unregister_patch("engine", "generate_attention_maps_ms")
    _register_tiny()
    if opts.make_checkpoint:
        import torch
        from timm.models import create_model

        torch.manual_seed(0)
        kwargs = {"input_size": opts.input_size} if "Plus" in opts.model or opts.model == "lpcam_tiny_MCTformerV2" else {}
        model = create_model(opts.model, pretrained=False, num_classes=20, **kwargs)
        if opts.train_epochs:
            _train(model, opts)
        torch.save({"model": model.state_dict()}, opts.make_checkpoint)
        return
    sys.argv = [os.path.join(host, "main.py"), *host_args]
    runpy.run_path(os.path.join(host, "main.py"), run_name="__main__")


if __name__ == "__main__":
    main()

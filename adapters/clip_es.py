"""``import lpcam_adapters.clip_es`` as the first line of CLIP-ES's ``generate_cams_voc12.py`` (or
``generate_cams_coco14.py``) swaps its Grad-CAM for LPCAM.

CLIP-ES (https://github.com/linyq2117/CLIP-ES, MIT) computes, per image, the tokens of CLIP's ViT before
its last block (``model.encode_image``) and, per present class, ``cam(input_tensor=[tokens, text, h, w],
targets=[ClipOutputTarget(i)])``: the Grad-CAM [1, h/16, w/16] of that class's softmax score among the
present classes' prompts and the background prompts, plus the last block's attention. The script then
refines the map with class-aware attention affinity (CAA), writes ``{keys, attn_highres}`` (float16) and
``eval_cam.py`` / ``eval_cam_with_crf.py`` read it.

The import replaces ``pytorch_grad_cam.GradCAM`` (through :mod:`lpcam_adapters.hooks`, before the script's
``from pytorch_grad_cam import GradCAM`` runs) with :class:`LPCAMGradCAM`:

* created in the script (after its text features), it loads the prototype bank or builds it: for each
  image of the prototype list (``voc12/train.txt``; COCO: 100 draws per class of ``coco14/train.txt``)
  the host's own Grad-CAM of each present class (the maps splitting the pools at tau) and the local
  features of the same forward pass, clustered by :func:`lpcam_core.run.build_prototypes`;
* called, it returns the LPCAM map of the class (min-max scaled by the host's ``scale_cam_image``, as
  Grad-CAM's is) and the same attention as Grad-CAM would: CAA, the file format and the evaluation stay
  the host's. ``LPCAM=0``: the host's GradCAM, untouched.

Settings (``lpcam clip-es --explain``): the local features (``LPCAM_CLIP_FEATURES``: ``ln_post``, the patch
tokens after ``ln_post``, default; ``tokens``, the last block's output; or ``proj``, after ``ln_post`` and
``proj``, the text space: on the CPU proxy ``benchmarks/clip_es_choices.py`` both features before ``proj``
beat it by about 11 seed mIoU, docs/hosts/clip-es-proxy.md) and the scoring
softmax (``LPCAM_CLIP_SCORER``: ``classes``, the class prompts as the paper's softmax over all classes, or
``classes+background``). A centre is scored in the text space whatever the features (``ln_post`` and
``proj`` applied to it, :func:`to_text_space`).
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import os
import re
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from typing import Any

from . import hooks
from .base import HostInfo
from .settings import HostSettings, Option, read_settings

__all__ = ["INFO", "OPTIONS", "LPCAMGradCAM", "HostRun", "settings_for", "install", "register", "clip_target",
           "to_text_space", "TINY_CLIP", "mean_iou", "try_clip_es", "add_try"]

logger = logging.getLogger(__name__)

OPTIONS = (
    Option("features", "LPCAM_CLIP_FEATURES", "ln_post", "local features: ln_post (patch tokens after ln_post; "
           "default), tokens (the last block's output), or proj (after ln_post and proj: the text space)",
           choices=("ln_post", "tokens", "proj"), flag="--features"),
    Option("scorer", "LPCAM_CLIP_SCORER", "classes", "softmax scoring a centre: classes (the class prompts; default) "
           "or classes+background (with CLIP-ES's background prompts)", choices=("classes", "classes+background"),
           flag="--scorer"),
    Option("build", "LPCAM_BUILD", "auto", "auto: build a missing bank; never: fail without one; only: build the "
           "bank, then stop before any map", choices=("auto", "never", "only")),
)
INFO = HostInfo(
    name="clip-es",
    title="CLIP-ES (linyq2117/CLIP-ES)",
    module=__name__,
    entry_script="generate_cams_voc12.py",
    signature={"generate_cams_voc12.py": "from pytorch_grad_cam import GradCAM", "clip/model.py": "def forward_last_layer"},
    options=OPTIONS,
    env_docs={"LPCAM_BANK": "prototype bank file (default <dirname(cam_out_dir)>/lpcam_bank.pt)",
              "LPCAM_PROTO_LIST": "image list clustered for prototypes (default voc12/train.txt; COCO coco14/train.txt)"},
    # the script runs its own loop; the pools are split by Grad-CAM maps computed in the bank's own pass
    unread_env=("LPCAM_WORKERS", "LPCAM_DEVICE", "LPCAM_NO_PRETRAINED", "LPCAM_BASELINE_DIR"),
    thresholds="eval_cam.py and eval_cam_with_crf.py as for Grad-CAM (attn_highres, their own background rule)",
)


def settings_for(environ: Mapping[str, str] | None = None, *, coco: bool = False) -> HostSettings:
    """CLIP-ES's settings (VOC preset, or COCO's for the COCO script)."""
    return read_settings(OPTIONS, environ, fallback_preset="coco" if coco else "voc", host="clip-es",
                         unread=INFO.unread_env)


def clip_target(index: int) -> Any:
    """The score CLIP-ES's Grad-CAM differentiates: entry ``index`` of the softmax over the image's prompts."""
    return lambda output: output[..., index]


# --------------------------------------------------------------------------- what the script's run holds


class HostRun:
    """What LPCAM takes from the running ``generate_cams_*.py`` (its ``__main__`` globals, read once).

    Attributes:
        args: the script's parsed arguments (``img_root``, ``split_file``, ``cam_out_dir``).
        fg, bg: class and background text features [20 or 80, D], [n_bg, D].
        coco: the COCO script (labels from the list's columns) rather than VOC's (labels from the XML).
        preprocess: the script's ``img_ms_and_flip``.
    """

    NEEDED = ("args", "fg_text_features", "bg_text_features", "img_ms_and_flip")

    def __init__(self, main: Any) -> None:
        missing = [n for n in self.NEEDED if not hasattr(main, n)]
        if missing:
            raise RuntimeError(
                f"lpcam_adapters.clip_es: GradCAM was created outside CLIP-ES's generate_cams_*.py (its __main__ has "
                f"no {', '.join(missing)}); run that script, or set LPCAM=0 for pytorch_grad_cam as it is")
        self.args = main.args
        self.fg, self.bg = main.fg_text_features, main.bg_text_features
        self.coco = self.is_coco(main)
        self.preprocess = main.img_ms_and_flip

    @staticmethod
    def is_coco(main: Any) -> bool:
        """The COCO script (80 class prompts) rather than VOC's (20)."""
        features = getattr(main, "fg_text_features", None)
        return features is not None and int(features.shape[0]) == 80

    def proto_labels(self, proto_list: str) -> dict[str, list[int]]:
        """Prototype image id -> 0-based present classes (VOC: the Annotations XML; COCO: the list's columns)."""
        from lpcam_core.io import read_id_list

        if self.coco:
            labels = {}
            with open(proto_list, encoding="utf-8") as f:
                for line in f:
                    fields = line.split()
                    if fields:
                        labels[fields[0]] = sorted({int(c) for c in fields[1:]})
            return labels
        return {i: self.xml(i)[2] for i in read_id_list(proto_list)}

    def xml(self, image_id: str) -> tuple[int, int, list[int]]:
        """(height, width, present classes) of a VOC image, read from its Annotations XML as the host reads it."""
        from clip_text import class_names  # the host's own modules: the script runs in its checkout
        from lxml import etree
        from utils import parse_xml_to_dict

        path = os.path.join(self.args.img_root, image_id + ".jpg").replace("/JPEGImages", "/Annotations")
        path = path.replace(".jpg", ".xml")
        try:
            with open(path, encoding="utf-8") as f:
                data = parse_xml_to_dict(etree.fromstring(f.read()))["annotation"]
            classes = sorted({class_names.index(o["name"]) for o in data.get("object", [])})
            return int(data["size"]["height"]), int(data["size"]["width"]), classes
        except (OSError, KeyError, ValueError, etree.XMLSyntaxError) as err:
            raise ValueError(f"{path}: not a VOC annotation CLIP-ES can read ({type(err).__name__}: {err})") from None

    def image(self, image_id: str) -> Any:
        """[1, 3, h, w] the scale-1 unflipped view, as the script prepares it."""
        path = os.path.join(self.args.img_root, image_id + ".jpg")
        if self.coco:
            from PIL import Image

            with Image.open(path) as im:
                width, height = im.size
        else:
            height, width, _ = self.xml(image_id)
        return self.preprocess(path, height, width, scales=[1.0])[0][None]


# --------------------------------------------------------------------------- the replacement GradCAM


def to_text_space(model: Any, features: str) -> Any:
    """The module mapping a centre [k, C] of the chosen features into CLIP's text space [k, D], or None for
    ``proj`` (already there): ``ln_post`` (for ``tokens``) then ``@ visual.proj``, float32 copies."""
    import torch
    import torch.nn as nn

    class ToTextSpace(nn.Module):
        """[k, C] -> [k, D]: (``ln_post``, when the features precede it) then ``@ proj``."""

        def __init__(self, ln_post: nn.Module | None, proj: torch.Tensor) -> None:
            super().__init__()
            self.ln_post = ln_post
            self.register_buffer("proj", proj.detach().float().clone())

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            if self.ln_post is not None:
                x = self.ln_post(x)
            return x.float() @ self.proj

    if features not in ("proj", "ln_post", "tokens"):
        raise ValueError(f"features={features!r}: expected proj, ln_post or tokens")
    if features == "proj":
        return None
    ln = copy.deepcopy(model.visual.ln_post).float() if features == "tokens" else None
    return ToTextSpace(ln, model.visual.proj)


class LPCAMGradCAM:
    """``pytorch_grad_cam.GradCAM`` for CLIP-ES with LPCAM maps (``LPCAM=0``: the host's GradCAM itself).

    Args:
        model, target_layers, reshape_transform, **kwargs: as the host's GradCAM.
    """

    def __init__(self, model: Any, target_layers: Sequence[Any], *args: Any, **kwargs: Any) -> None:
        from lpcam_core.logs import configure_logging

        configure_logging()
        self.gradcam = _host_gradcam()(model, target_layers, *args, **kwargs)
        self.model = model
        self.bank = None
        main = sys.modules.get("__main__")
        self.settings = settings_for(coco=HostRun.is_coco(main))
        if not self.settings.enabled:
            logger.info("LPCAM=0: CLIP-ES's own Grad-CAM")
            return
        self.run = HostRun(main)
        self.features_kind = self.settings.option("features")
        self._last: tuple[Any, Any, Any] | None = None
        self.bank = self.ensure_bank()
        if self.settings.option("build") == "only":
            logger.info("LPCAM_BUILD=only: prototype bank ready; no maps generated")
            raise SystemExit(0)
        logger.info("CLIP-ES: LPCAM in place of Grad-CAM (features %s, scorer %s; CAA, files and eval the host's)",
                    self.features_kind, self.settings.option("scorer"))

    # ---- the host's calls

    def __call__(self, input_tensor: Any, targets: Any = None, target_size: Any = None, *args: Any, **kwargs: Any) -> Any:
        """(map [1, h, w] float32 in [0, 1], softmax over the image's prompts [1, n], last attention [1, L, L])."""
        if self.bank is None:
            return self.gradcam(input_tensor, targets, target_size, *args, **kwargs)
        import torch
        from pytorch_grad_cam.utils.image import scale_cam_image

        from lpcam_core.maps import lpcam_map

        tokens, text, height, width = input_tensor
        if targets is None or len(targets) != 1:
            raise ValueError("lpcam_adapters.clip_es: CLIP-ES calls GradCAM with one target per call")
        row = text[int(targets[0].category)]
        classes = [i for i in range(self.run.fg.shape[0]) if torch.equal(self.run.fg[i].to(row.device), row)]
        if not classes:
            raise ValueError("lpcam_adapters.clip_es: the target's text feature is none of the class prompts")
        features, logits, attention = self.forward(tokens, text, height, width)
        # a class with no prototype (absent from the prototype list, or no centre passed mu_f): zeros, warned once
        cam = lpcam_map(features, self.bank, classes[:1], missing="zeros").cpu().numpy()  # [1, h, w] float32
        cam = scale_cam_image(cam, target_size)
        return cam, logits, attention

    def forward(self, tokens: Any, text: Any, height: int, width: int) -> tuple[Any, Any, Any]:
        """The last block without gradient: features [C, h, w] of the chosen kind, softmax, attention."""
        import torch

        if self._last is not None and self._last[0] is tokens and self._last[1] is text:
            return self._last[2]
        seen: dict[str, Any] = {}

        def keep(module: Any, inputs: tuple, output: Any) -> None:
            seen["in"], seen["out"] = inputs[0], output

        visual = self.model.visual
        grads = self.gradcam.activations_and_grads  # its hooks on the last block see this pass too
        grads.height, grads.width = height // 16, width // 16
        handle = visual.ln_post.register_forward_hook(keep)
        try:
            with torch.no_grad():
                logits, attention = self.model.forward_last_layer(tokens, text)
        finally:
            handle.remove()
            grads.activations, grads.gradients = [], []
        x = seen["in"] if self.features_kind == "tokens" else seen["out"]  # [1, L, width]
        with torch.no_grad():
            if self.features_kind == "proj":
                x = x @ visual.proj
            h, w = height // 16, width // 16
            features = x[0, 1:].float().reshape(h, w, -1).permute(2, 0, 1).contiguous()  # [C, h, w]
        self._last = (tokens, text, (features, logits, attention))
        return self._last[2]

    def __getattr__(self, name: str) -> Any:  # the rest of the host's GradCAM (activations_and_grads, ...)
        if name == "gradcam":
            raise AttributeError(name)
        return getattr(self.gradcam, name)

    def __getstate__(self) -> dict[str, Any]:  # spawned workers get the bank, not the cache
        state = dict(self.__dict__)
        state["_last"] = None
        return state

    # ---- the bank

    def scorer(self) -> Any:
        """CLIP's classifier: cosine to the class prompts (and background prompts), times the logit scale."""
        import torch

        from lpcam_core.classifier import CosineScorer

        fg, bg = self.run.fg.float(), self.run.bg.float()
        rows = torch.cat([fg, bg]) if self.settings.option("scorer") == "classes+background" else fg
        to_space = to_text_space(self.model, self.features_kind)
        width = int(self.model.visual.proj.shape[0])
        return CosineScorer(rows.cpu(), scale=float(self.model.logit_scale.exp()), num_classes=int(fg.shape[0]),
                            to_space=to_space, feature_dim=width if to_space is not None else None)

    def ensure_bank(self) -> Any:
        """The bank at ``LPCAM_BANK`` (default ``<dirname(cam_out_dir)>/lpcam_bank.pt``) when it fits, else a new one."""
        from lpcam_core import run

        settings = self.settings
        path = os.path.abspath(settings.bank_path or os.path.join(
            os.path.dirname(os.path.abspath(self.run.args.cam_out_dir)), "lpcam_bank.pt"))
        proto_list = os.path.abspath(settings.proto_list or ("coco14/train.txt" if self.run.coco else "voc12/train.txt"))
        scorer = self.scorer()
        meta = {"host": "clip-es", "features": self.features_kind, "scorer": settings.option("scorer"),
                "visual": run.model_fingerprint(self.model.visual), "proto_list": proto_list}
        never = settings.option("build") == "never" and not settings.rebuild_bank
        bank = run.reusable_bank(path, scorer, settings.lpcam, meta, rebuild=settings.rebuild_bank,
                                 required="LPCAM_BUILD=never; build it with `lpcam clip-es prototypes -- <script arguments>` "
                                          "(or LPCAM_BUILD=only)" if never else None)
        if bank is not None:
            return bank
        from lpcam_core.io import check_output_dir

        check_output_dir(os.path.dirname(path), read_dirs=[self.run.args.img_root])
        labels = self.run.proto_labels(proto_list)
        plan = run.clustering_plan(labels, settings.lpcam, int(self.run.fg.shape[0]))
        device = self.model.visual.proj.device
        logger.info("building the prototype bank %s from %d images of %s (%s features)", path,
                    len({p.image_id for p in plan}), proto_list, self.features_kind)
        return run.build_prototypes(plan, lambda i: self.pool_inputs(i, labels[i]), int(self.run.fg.shape[0]), scorer,
                                    config=settings.lpcam, out_path=path, device=device, meta=meta,
                                    record_pool_peak=True)

    def pool_inputs(self, image_id: str, classes: Sequence[int]) -> tuple[Any, Any, list[int]]:
        """One prototype image: features [C, h, w], the host's Grad-CAM [n, h, w] of its classes, the classes."""
        import torch

        device = self.model.visual.proj.device
        image = self.run.image(image_id).to(device)
        height, width = image.shape[-2:]
        with torch.no_grad():
            tokens, _ = self.model.encode_image(image, height, width)
        text = torch.cat([self.run.fg[list(classes)], self.run.bg]).to(device)
        maps = []
        with torch.enable_grad():  # Grad-CAM differentiates the class score
            for index in range(len(classes)):
                cam, _, _ = self.gradcam(input_tensor=[tokens, text, height, width], targets=[clip_target(index)],
                                         target_size=None)
                maps.append(torch.from_numpy(cam[0]))
        features, _, _ = self.forward(tokens, text, height, width)
        self._last = None
        cams = torch.stack(maps) if maps else torch.zeros(0, *features.shape[1:])
        return features.cpu(), cams, list(classes)


def _host_gradcam() -> Any:
    """The host's own ``pytorch_grad_cam.GradCAM`` class."""
    from pytorch_grad_cam.grad_cam import GradCAM

    return GradCAM


# --------------------------------------------------------------------------- lpcam clip-es try

#: Builds a tiny random-init CLIP with the checkout's own ``clip/model.py`` (ViT: width 64, 2 layers, patch 16;
#: text: width 64, 1 layer, CLIP's vocabulary) and saves its state dict, which ``clip.load(path)`` reads offline.
TINY_CLIP = (
    "import sys, torch\n"
    "import lpcam_adapters.clip_es  # pkg_resources for clip/clip.py on a modern setuptools\n"
    "from clip.model import CLIP\n"
    "torch.manual_seed(int(sys.argv[2]))\n"
    "model = CLIP(embed_dim=32, image_resolution=32, vision_layers=2, vision_width=64, vision_patch_size=16,\n"
    "             context_length=77, vocab_size=49408, transformer_width=64, transformer_heads=1, transformer_layers=1)\n"
    "torch.save(model.state_dict(), sys.argv[1])\n"
)


def mean_iou(stdout: str) -> float | None:
    """The last ``'Mean IoU': ...`` CLIP-ES's eval scripts print, else None."""
    found = re.findall(r"'Mean IoU': (?:np\.float64\()?([0-9.eE+-]+|nan)", stdout)
    return float(found[-1]) if found else None


def try_clip_es(info: HostInfo, host_dir: str, out: str, *, images: int = 20, size: int = 96, seed: int = 0,
                timeout: float = 3600) -> int:
    """The try path for CLIP-ES: its CAM generation, eval_cam and CRF eval, with and without the swap.

    No CLIP weights can be downloaded offline: a tiny random-init CLIP (:data:`TINY_CLIP`) stands in, so the
    numbers check the plumbing only. A random CLIP scores no centre above mu_f = 0.9, so the swapped run
    sets ``LPCAM_MU_F=0 LPCAM_MU_B=1`` (every class centre a prototype, context as the bounds allow) and says so.
    """
    from lpcam_core.formats import write_voc_annotations

    from .trial import CRF_INSTALL, command_line, percent, prepare_try, report, require_modules

    require_modules(info, "clip-es")

    if images < 2:
        raise ValueError(f"--images {images}: expected at least 2 (CLIP-ES reads its list with np.loadtxt)")
    setup = prepare_try(info, host_dir, out, images=images, size=size, seed=seed, marker=info.entry_script)
    out_dir, root, work, env = setup.out_dir, setup.root, setup.work, setup.env
    write_voc_annotations(root, setup.labels)
    report(f"  Annotations XML (what CLIP-ES reads the classes and sizes from): {root / 'Annotations'}")
    weights = out_dir / "tiny_clip.pt"
    subprocess.run([sys.executable, "-c", TINY_CLIP, str(weights), str(seed)], cwd=work, env=env, check=True,
                   capture_output=True, timeout=timeout)
    report(f"  tiny random-init CLIP (ViT width 64, 2 layers, patch 16) built with the checkout's clip/model.py: {weights}")
    crf = hooks.installed("pydensecrf") and hooks.installed("joblib")
    runs = [("LPCAM=0 (the host's Grad-CAM)", {"LPCAM": "0"}, "result/voc12_own"),
            ("LPCAM=1 (the swap)", {"LPCAM": "1", "LPCAM_MU_F": "0", "LPCAM_MU_B": "1"}, "result/voc12_lpcam")]
    results = []
    for title, extra_env, cams in runs:
        steps = [(info.entry_script, ["--img_root", str(root / "JPEGImages"), "--split_file", "voc12/train.txt",
                                      "--model", str(weights), "--cam_out_dir", cams]),
                 ("eval_cam.py", ["--cam_out_dir", cams, "--cam_type", "attn_highres", "--gt_root",
                                  str(root / "SegmentationClass"), "--split_file", "voc12/train.txt"])]
        if crf:
            steps.append(("eval_cam_with_crf.py", ["--cam_out_dir", cams, "--gt_root", str(root / "SegmentationClass"),
                                                   "--image_root", str(root / "JPEGImages"), "--split_file",
                                                   "voc12/train.txt", "--eval_only"]))
        report(f"\n  {title}, in {work} (inside lpcam_adapters.cpu.cuda_as_cpu):")
        scores, start = [], time.perf_counter()
        log = out_dir / f"{'lpcam' if extra_env['LPCAM'] == '1' else 'own'}.log"
        with open(log, "w", encoding="utf-8") as log_file:
            for name, argv in steps:
                report(f"    {command_line(extra_env, name, argv)}")
                proc = setup.run(name, argv, extra_env, log_file, timeout)
                if proc is None:
                    return 2
                if name != info.entry_script:
                    scores.append(mean_iou(proc.stdout))
        seconds = time.perf_counter() - start
        results.append((title, scores, seconds))
        report(f"    finished in {seconds:.0f}s; seeds mIoU {percent(scores[0])}" +
              (f", CRF masks mIoU {percent(scores[1])}" if crf else f" (CRF skipped: {CRF_INSTALL}; and joblib)"))
    report(f"\n  files: CAMs {work / 'result' / 'voc12_own'} and {work / 'result' / 'voc12_lpcam'} "
          f"({{keys, attn_highres}} float16, the host's format); bank {work / 'result' / 'lpcam_bank.pt'}")
    (out_dir / "try_results.json").write_text(json.dumps(
        [{"run": t, "seeds": sc[0], "masks": sc[1] if len(sc) > 1 else None, "seconds": sec} for t, sc, sec in results],
        indent=2))
    report("\n  | run | seeds mIoU (%) | CRF mIoU (%) | seconds |\n  |---|---:|---:|---:|")
    for title, scores, seconds in results:
        report(f"  | {title} | {percent(scores[0])} | {percent(scores[1]) if len(scores) > 1 else '-'} | {seconds:.0f} |")
    report("\n  A random-init CLIP (LPCAM_MU_F=0 LPCAM_MU_B=1: it scores no centre above 0.9): these numbers check the "
          "plumbing, not LPCAM's gain. With CLIP's ViT-B-16.pt, VOC and a GPU, run the commands in docs/hosts/clip-es.md.")
    return 0


def add_try(sub: Any, info: HostInfo) -> None:
    """The ``try`` step of ``lpcam clip-es``."""
    from .trial import try_parser

    p = try_parser(sub, info, help="CLIP-ES's generation and evaluation on a small synthetic VOC, CPU, offline, with and "
                                   "without LPCAM",
                   description="Writes a small synthetic VOC (with Annotations XML) and a work folder of links to "
                               "HOST_DIR (never written) with a patched copy of generate_cams_voc12.py, builds a tiny "
                               "random-init CLIP with the checkout's clip/model.py (no weights are downloaded), then runs "
                               "generate_cams_voc12.py, eval_cam.py and eval_cam_with_crf.py --eval_only twice: LPCAM=0 "
                               "and LPCAM=1. Prints the commands, the files and the host's own mIoU.", size=96)
    p.set_defaults(func=lambda ns: try_clip_es(info, ns.host_dir, ns.out, images=ns.images, size=ns.size, seed=ns.seed))


# --------------------------------------------------------------------------- registration and CLI


def _make_gradcam(original: Any, module: Any) -> Any:
    return LPCAMGradCAM


def _pkg_resources(module: Any) -> None:
    import importlib

    module.packaging = importlib.import_module("packaging")
    importlib.import_module("packaging.version")


def install() -> None:
    """Register CLIP-ES's patch (idempotent; runs at import)."""
    hooks.register_fallback("pkg_resources", _pkg_resources,
                            description="pkg_resources.packaging (clip/clip.py's version checks; setuptools >= 81 "
                            "no longer ships pkg_resources)")
    hooks.replace_attribute(
        "pytorch_grad_cam", "GradCAM", _make_gradcam, requires=("GradCAM",),
        description="GradCAM -> LPCAMGradCAM: load/build the prototype bank when the script creates it, then the "
        "LPCAM map of the target class per call (CAA, files and eval the host's); LPCAM=0: the host's GradCAM",
    )


#: The generation script's input paths: (flag, "file" or "dir"); the lists' defaults are each script's
#: (``--model`` may also be a CLIP model name, which the script downloads: not checked).
SCRIPT_PATHS = (("--img_root", "dir"), ("--split_file", "file"))
DEFAULT_SPLIT = {"generate_cams_voc12.py": "./voc12/train.txt", "generate_cams_coco14.py": "./coco14/train.txt"}


def check_script_paths(argv: Sequence[str], script: str = INFO.entry_script) -> None:
    """The script's inputs exist (relative paths: to the working directory, where the script runs), so a wrong
    path is named with its flag before CLIP loads; for VOC, ``--img_root`` must have an ``Annotations`` folder
    beside it (the script reads each image's XML there)."""
    from .cli import script_flags

    given = script_flags(argv)
    where = f"(relative to the working directory {os.getcwd()})"
    for flag, kind in SCRIPT_PATHS:
        value = given.get(flag, DEFAULT_SPLIT.get(script) if flag == "--split_file" else None)
        if value is None:
            continue
        ok = os.path.isdir(value) if kind == "dir" else os.path.isfile(value)
        if not ok:
            shown = value if flag in given else f"{value} (the script's default)"
            raise FileNotFoundError(f"{flag} {shown}: no such {'folder' if kind == 'dir' else 'file'} {where}")
    root = given.get("--img_root")
    if root is not None and script == "generate_cams_voc12.py":
        annotations = os.path.join(os.path.dirname(os.path.normpath(root)), "Annotations")
        if not os.path.isdir(annotations):
            raise FileNotFoundError(f"--img_root {root}: no Annotations folder beside it ({annotations}); the script "
                                    "reads each image's VOC XML there (VOC2012/JPEGImages next to VOC2012/Annotations)")


def _run(ns: argparse.Namespace, env: dict[str, str]) -> int:
    from .cli import run_host_script, settings_env

    env = {**settings_env(ns, INFO), **env}
    for option, var in (("bank", "LPCAM_BANK"), ("proto_list", "LPCAM_PROTO_LIST")):
        if getattr(ns, option, None) is not None:
            env[var] = os.path.abspath(str(getattr(ns, option)))
    if getattr(ns, "rebuild", False):
        env["LPCAM_REBUILD_BANK"] = "1"
    rest = ns.rest[1:] if ns.rest[:1] == ["--"] else ns.rest
    if not rest:
        raise ValueError("give the generate_cams script's arguments after `--` (--img_root, --model, --cam_out_dir, ...)")
    settings_for({**os.environ, **env})  # a malformed setting fails now, before CLIP loads
    check_script_paths(rest, ns.script)
    from .cpu import cuda_as_cpu

    with cuda_as_cpu() as shimmed:  # the script divides by the GPU count; nothing changes where CUDA is
        if shimmed:
            logger.info("no CUDA here: the script runs on the CPU (lpcam_adapters.cpu.cuda_as_cpu)")
        run_host_script(ns.host, ns.script, rest, environ=env, install=install)
    return 0


def _steps(sub: Any) -> None:
    from .cli import add_settings_flags

    def common(p: argparse.ArgumentParser) -> None:
        p.add_argument("--host", required=True, help="CLIP-ES checkout (its script runs unmodified, in this process)")
        p.add_argument("--script", default=INFO.entry_script, choices=("generate_cams_voc12.py", "generate_cams_coco14.py"),
                       help="the generation script (default generate_cams_voc12.py)")
        p.add_argument("--bank", help="prototype bank file (default <dirname(cam_out_dir)>/lpcam_bank.pt)")
        p.add_argument("--proto-list", help="ids clustered for prototypes (default voc12/train.txt in the checkout)")
        p.add_argument("--rebuild", action="store_true", help="rebuild the bank even when a matching one exists")
        add_settings_flags(p, INFO)
        p.add_argument("rest", nargs=argparse.REMAINDER, help="-- then the script's arguments")

    pr = sub.add_parser("prototypes", help="the prototype bank (Grad-CAM and features of the prototype list), then stop")
    common(pr)
    pr.set_defaults(func=lambda ns: _run(ns, {"LPCAM": "1", "LPCAM_BUILD": "only"}))
    mk = sub.add_parser("make", help="CLIP-ES's CAM generation with LPCAM in place of Grad-CAM (builds a missing bank)")
    common(mk)
    mk.add_argument("--off", action="store_true", help="the host's own Grad-CAM (LPCAM=0)")
    mk.set_defaults(func=lambda ns: _run(ns, {"LPCAM": "0"} if ns.off else {"LPCAM": "1"}))
    add_try(sub, INFO)


def register(subparsers: Any) -> None:
    """``lpcam clip-es ...`` (entry point ``lpcam.hosts``)."""
    from .cli import add_host_group

    add_host_group(subparsers, INFO, _steps)


settings_for()  # a malformed LPCAM_* variable fails here, at import, not after CLIP has loaded
install()

"""Glue shared by the IRN family (IRN, ReCAM, AMN's stage a): datasets, networks, CAM maths, the pass.

The hosts (jiwoon-ahn/irn and its forks) keep their code in namespace packages ``step``, ``net``,
``misc``, ``voc12`` relative to the working directory. What lpcam takes from them:

* datasets: ``voc12.dataloader.VOC12ClassificationDatasetMSF(list, voc12_root, scales)`` (items
  ``{name, img: list over scales of [2, 3, H, W] (image, flip), size, label}``) for the maps, and
  ``VOC12ClassificationDataset(list, voc12_root)`` (one scale, no flip) for the pooled features;
* the network ``net.resnet50_cam.CAM``: features ``stage4(stage3(stage2(stage1(x))))`` and the bias-free
  1x1 ``classifier`` scoring the prototypes;
* the CAM maths of ``step/make_cam.py`` ``_work`` (and of ReCAM's ``step/make_recam.py``, through
  ``forward2``), reproduced in :meth:`IRNFamily.baseline` so its maps equal the host's bit for bit.

:func:`make_cam_pass` is the patched ``step.make_cam.run`` (and ReCAM's ``step.make_recam.run``): the
baseline CAM of the prototype list (``voc12/train.txt``) into ``<cam_out_dir>_baseline`` (missing files
only), the prototype bank beside the outputs (reused while checkpoint and settings match), and LPCAM maps
of the host's ``--train_list`` into ``cam_out_dir`` in the host's format. It runs on
:mod:`lpcam_core.run`: in this process, or one spawned process per GPU (``LPCAM_WORKERS``).

Portions of :meth:`IRNFamily.baseline` follow ``step/make_cam.py`` of IRN
(https://github.com/jiwoon-ahn/irn), MIT License, Copyright (c) 2019 Jiwoon Ahn, and
``step/make_recam.py`` of ReCAM (https://github.com/zhaozhengChen/ReCAM), MIT License,
Copyright (c) 2021 Zhaozheng Chen: the maths is reproduced so that the maps are bit-identical.
"""

from __future__ import annotations

import importlib
import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from . import base, compat
from .settings import HostSettings, Option, parse_switch

if TYPE_CHECKING:
    import torch

__all__ = [
    "NUM_CLASSES",
    "AMP",
    "SIGNATURE",
    "LPCAM_THRESHOLDS",
    "Spec",
    "IRNFamily",
    "recommended_thresholds",
    "prepare_workdir",
    "load_model",
    "extract_features",
    "classifier_weight",
    "image_ids",
    "voc_datasets",
    "msf_views",
    "make_cam_pass",
    "cam_host",
    "default_bank_path",
    "default_baseline_dir",
    "swap_job",
    "own_job",
]

logger = logging.getLogger(__name__)

NUM_CLASSES = 20

#: Mixed precision of the LPCAM maps pass (every IRN-family host declares it).
AMP = Option("amp", "LPCAM_AMP", False, "on: the backbone of the LPCAM maps pass under autocast (bfloat16 on the CPU, "
             "float16 on CUDA); similarities, baselines and bank stay float32; default off (exact float32), see "
             "docs/performance.md", parse=parse_switch, flag="--amp")
#: What every IRN-family checkout holds (how ``lpcam irn patch`` tells it from another project).
SIGNATURE = {"step/make_cam.py": "def _work", "voc12/dataloader.py": "class VOC12ClassificationDatasetMSF"}
#: cam_eval, conf_fg, conf_bg, sem_seg_bg thresholds the paper uses downstream of LPCAM maps.
LPCAM_THRESHOLDS = (0.30, 0.45, 0.25, 0.35)


@dataclass(frozen=True)
class Spec:
    """What differs between the IRN-family hosts for one pass.

    Attributes:
        name: ``"irn"``, ``"recam"``, ``"amn (stage a)"``.
        weights_suffix: appended to ``args.cam_weights_name`` (IRN ``".pth"``, ReCAM ``""``).
        thresholds: the host's own downstream thresholds (eval, conf_fg, conf_bg, sem_seg_bg).
    """

    name: str
    weights_suffix: str
    thresholds: tuple[float, float, float, float]


def recommended_thresholds(spec: Spec) -> str:
    """The downstream flags recommended for LPCAM maps, next to the host's own defaults."""
    names = ("--cam_eval_thres", "--conf_fg_thres", "--conf_bg_thres", "--sem_seg_bg_thres")
    flags = " ".join(f"{n} {v:g}" for n, v in zip(names, LPCAM_THRESHOLDS))
    own = "/".join(f"{v:g}" for v in spec.thresholds)
    return f"LPCAM maps: run the next passes with {flags} ({spec.name}'s own defaults: {own})"


# --------------------------------------------------------------------------- a run directory


def prepare_workdir(
    host_dir: str | os.PathLike,
    workdir: str | os.PathLike,
    *,
    cls_labels: str | os.PathLike | None = None,
    lists: Mapping[str, str | os.PathLike | Sequence[str]] | None = None,
    marker: str = "voc12/dataloader.py",
) -> Path:
    """A run directory for an IRN-family host (or CLIP-ES) that leaves the host checkout untouched.

    The hosts import ``step``, ``net``, ``misc``, ``voc12`` relative to the working directory and read
    ``voc12/cls_labels.npy`` there. ``workdir`` gets a symlink to every top-level entry of ``host_dir``
    except ``voc12``, which is a real directory of symlinks to the host's files, with ``cls_labels.npy``
    and the lists replaced by ``cls_labels`` and ``lists``. Run the host with ``cwd=workdir`` (and
    ``PYTHONPYCACHEPREFIX`` set, so no ``__pycache__`` lands in the checkout).

    Args:
        host_dir: the host checkout (``.hosts/irn``).
        workdir: directory to create or refresh.
        cls_labels: IRN-style ``{int id: float32 [20]}`` file replacing the host's.
        lists: ``{"train.txt": path or list of ids, ...}`` replacing or adding ``voc12`` lists.
        marker: a file every checkout of the host holds (CLIP-ES: ``generate_cams_voc12.py``).
    """
    host = Path(host_dir).resolve()
    if not (host / marker).is_file() or not (host / "voc12").is_dir():
        raise FileNotFoundError(f"{host} is not a checkout of this host (no {marker} and voc12/)")
    work = Path(workdir).resolve()
    if work == host or host in work.parents or work in host.parents:
        raise ValueError(f"work folder {work} and the checkout {host} overlap: the checkout is never written, "
                         "choose a work folder outside it")
    work.mkdir(parents=True, exist_ok=True)
    for entry in sorted(host.iterdir()):
        if entry.name in (".git", "voc12") or entry.name.startswith("."):
            continue
        _symlink(entry, work / entry.name)
    voc = work / "voc12"
    voc.mkdir(exist_ok=True)
    replaced = ({"cls_labels.npy"} if cls_labels is not None else set()) | set(lists or {})
    for entry in sorted((host / "voc12").iterdir()):
        if entry.name not in replaced and entry.name != "__pycache__":
            _symlink(entry, voc / entry.name, ours=True)
    if cls_labels is not None:
        _symlink(Path(cls_labels).resolve(), voc / "cls_labels.npy", ours=True)
    for name, value in (lists or {}).items():
        target = voc / name
        if target.is_symlink() or target.exists():
            target.unlink()
        if isinstance(value, (str, os.PathLike)):
            _symlink(Path(value).resolve(), target, ours=True)
        else:
            target.write_text("".join(f"{v}\n" for v in value))
    return work


def _symlink(src: Path, dst: Path, *, ours: bool = False) -> None:
    """Link ``dst`` to ``src``; a link is replaced, a file only where ``ours`` (the work folder's own voc12/,
    whose lists lpcam writes), a folder never."""
    if dst.is_symlink():
        if os.readlink(dst) == str(src):
            return
        dst.unlink()
    elif ours and dst.is_file():
        dst.unlink()
    elif dst.exists():
        raise FileExistsError(f"{dst} exists and is not a link lpcam made: refusing to replace it (choose an empty "
                              "or new work folder)")
    dst.symlink_to(src)


# --------------------------------------------------------------------------- networks and data


def load_model(network: str, weights: str | os.PathLike, *, cls_name: str = "CAM", flag: str = "--weights") -> Any:
    """Build ``<network>.<cls_name>()`` without the ImageNet download and load ``weights`` on the CPU.

    Raises:
        FileNotFoundError: ``weights`` does not exist (the message names ``flag``, the option to check).
    """
    import torch

    path = os.fspath(weights)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint not found: {path} (check {flag})")
    module = importlib.import_module(network)
    with compat.checkpoint_follows():
        model = getattr(module, cls_name)()
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # truncated, foreign, or a pickle that names code: never run
        from lpcam_core.io import load_refusal

        raise ValueError(f"{flag} {path}: not a readable checkpoint ({load_refusal(err)})") from None
    try:
        model.load_state_dict(state, strict=True)
    except (RuntimeError, TypeError, AttributeError, KeyError) as err:
        raise ValueError(f"{flag} {path}: not a checkpoint of {network}.{cls_name} "
                         f"({str(err).strip().splitlines()[0][:200] if str(err).strip() else type(err).__name__})") from None
    model.eval()  # IRN's Net.train override returns None and keeps self.training; BN is fixed anyway
    return model


def extract_features(model: Any, x: torch.Tensor) -> torch.Tensor:
    """Local features ``stage4(stage3(stage2(stage1(x))))``: [B, C, ceil(H/16), ceil(W/16)], non-negative."""
    for name in ("stage1", "stage2", "stage3", "stage4"):
        if not hasattr(model, name):
            raise AttributeError(f"{type(model).__name__} has no {name}: not an IRN-family network")
    return model.stage4(model.stage3(model.stage2(model.stage1(x))))


def classifier_weight(model: Any) -> torch.Tensor:
    """[num_classes, C] from the host's ``classifier`` 1x1 conv (no bias in the IRN family)."""
    conv = getattr(model, "classifier", None)
    if conv is None or not hasattr(conv, "weight"):
        raise AttributeError(f"{type(model).__name__} has no classifier conv")
    weight = conv.weight.detach()
    return weight.reshape(weight.shape[0], -1)


def image_ids(dataset: Any) -> list[str]:
    """The image ids of a host ``voc12.dataloader`` dataset, in order (as its items name them)."""
    loader = importlib.import_module("voc12.dataloader")
    return [loader.decode_int_filename(n) for n in dataset.img_name_list]


def voc_datasets(map_list: str | None, proto_list: str | None, voc12_root: str, scales: Sequence[float], *,
                 loader_workers: int = 0) -> base.Datasets:
    """The host's datasets of a pass: maps of ``map_list``, baselines and pooled features of ``proto_list``."""
    import numpy as np
    import torch

    labels_file = os.path.join(os.getcwd(), "voc12", "cls_labels.npy")
    if not os.path.isdir(os.path.join(voc12_root, "JPEGImages")):
        raise FileNotFoundError(f"voc12_root {voc12_root}: no JPEGImages folder in it (expected the VOC2012 root, "
                                "e.g. VOCdevkit/VOC2012)")
    try:
        loader = importlib.import_module("voc12.dataloader")  # it reads voc12/cls_labels.npy as it loads
    except (ValueError, TypeError, AttributeError) as err:
        raise ValueError(f"{labels_file}: not IRN's labels, a pickled {{2007000032: float32 [20]}} "
                         f"({type(err).__name__}: {str(err)[:200]})") from None
    data = base.Datasets(loader_workers=loader_workers)

    def dataset(cls: Any, image_list: str, **kwargs: Any) -> Any:
        if not os.path.isfile(image_list):
            raise FileNotFoundError(f"image list not found: {image_list} (relative to the host root {os.getcwd()})")
        try:
            made = cls(image_list, voc12_root=voc12_root, **kwargs)
        except KeyError as err:  # the host's label lookup of an id that voc12/cls_labels.npy lacks
            raise ValueError(f"{image_list}: image {loader.decode_int_filename(err.args[0])} has no labels in "
                             "voc12/cls_labels.npy") from None
        except TypeError as err:  # two ids on a line: the host looks an array up as a key
            raise ValueError(f"{image_list}: expected one image id per line ({str(err)[:100]})") from None
        labels = np.asarray(made.label_list)
        vectors = labels.ndim == 2 and labels.shape[1] == NUM_CLASSES
        if labels.size and not (vectors and np.isin(labels, (0, 1)).all()):
            raise ValueError(f"{labels_file}: the labels of {image_list} are not 0/1 vectors of {NUM_CLASSES} "
                             f"classes (got an array of shape {labels.shape} holding {np.unique(labels)[:5].tolist()})")
        return made

    if map_list is not None:
        data.maps = dataset(loader.VOC12ClassificationDatasetMSF, map_list, scales=tuple(scales))
        data.map_ids = image_ids(data.maps)
    if proto_list is not None:
        data.proto = dataset(loader.VOC12ClassificationDatasetMSF, proto_list, scales=tuple(scales))
        data.pool = dataset(loader.VOC12ClassificationDataset, proto_list)
        data.proto_ids = image_ids(data.pool)
        data.labels = {name: torch.nonzero(torch.as_tensor(data.pool.label_list[i]))[:, 0].tolist()
                       for i, name in enumerate(data.proto_ids)}
    return data


def msf_views(img: Any) -> list[torch.Tensor]:
    """MSF item's ``img`` (list over scales of [2, 3, H, W], or the bare array for one scale)."""
    import torch

    if isinstance(img, (list, tuple)):
        return [torch.as_tensor(i) for i in img]
    return [torch.as_tensor(img)]


# --------------------------------------------------------------------------- the host


class IRNFamily:
    """An IRN-family network as a :class:`~lpcam_adapters.base.Host`.

    Args:
        name: host name (bank provenance, logs).
        network: the host module of the network (``net.resnet50_cam``).
        cam_model: the network whose CAM is the baseline.
        scales: inference scales (recorded with the maps).
        feature_model: the network giving the features (default ``cam_model``).
        score_weight: [20, C] classifier scoring the prototypes (default ``feature_model``'s).
        extra_weight: ReCAM's ``W_recam`` [20, C, 1, 1]: baseline = ``forward2`` (None: ``forward``).
        meta: the bank's provenance (checked when it is reused).

    Attribute ``amp`` (set from the :data:`AMP` setting, default False): the backbone of the LPCAM
    maps pass under autocast; recorded with the maps, so a resumed run never mixes precisions.
    """

    num_classes = NUM_CLASSES

    def __init__(self, name: str, network: str, cam_model: Any, scales: Sequence[float], *, feature_model: Any = None,
                 score_weight: torch.Tensor | None = None, extra_weight: torch.Tensor | None = None,
                 meta: Mapping[str, Any] | None = None) -> None:
        self.name = name
        self.network = network
        self.cam_model = cam_model
        self.feature_model = feature_model if feature_model is not None else cam_model
        self.score_weight = score_weight
        self.extra_weight = extra_weight
        self.scales = [float(s) for s in scales]
        self.meta = dict(meta or {})
        self.device: Any = None
        self.amp = False

    def to(self, device: torch.device) -> IRNFamily:
        self.cam_model.to(device)
        self.feature_model.to(device)
        if self.extra_weight is not None:
            self.extra_weight = self.extra_weight.to(device)
        self.device = device
        return self

    def _dev(self) -> torch.device:
        import torch

        return self.device if self.device is not None else torch.device("cpu")

    # ------------------------------------------------------------------ Host protocol
    def scorer(self) -> Any:
        from lpcam_core.classifier import LinearScorer

        weight = self.score_weight if self.score_weight is not None else classifier_weight(self.feature_model)
        return LinearScorer(weight.detach().float().cpu().reshape(weight.shape[0], -1))

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return extract_features(self.feature_model, x)

    def pool_inputs(self, image_id: str, item: Mapping[str, Any], baseline_dir: str) -> tuple[torch.Tensor, Any, Any]:
        import torch

        from lpcam_core.formats import load_irn_cam

        record = load_irn_cam(os.path.join(baseline_dir, image_id + ".npy"))
        feats = self.features(torch.as_tensor(item["img"])[None].to(self._dev()))[0].float()
        return (feats, *self.pool_maps(record))

    def pool_maps(self, record: Mapping[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
        import torch

        return torch.as_tensor(record["high_res"]), torch.as_tensor(record["keys"]).long()

    def baseline_and_features(self, item: Mapping[str, Any]) -> tuple[dict[str, Any], torch.Tensor | None]:
        """:meth:`baseline`, and the pooled features: ``stage4``'s output for the unflipped image of the
        scale-1 view, recorded as the CAM network computes it (None when the features come from another
        network or 1.0 is not among the scales)."""
        if self.feature_model is not self.cam_model or 1.0 not in self.scales:
            return self.baseline(item), None
        wanted, calls, kept = self.scales.index(1.0), [0], []

        def keep(module: Any, inputs: Any, output: torch.Tensor) -> None:
            if calls[0] == wanted:
                kept.append(output[0].float())
            calls[0] += 1

        handle = self.cam_model.stage4.register_forward_hook(keep)
        try:
            record = self.baseline(item)
        finally:
            handle.remove()
        return record, kept[0] if len(kept) == 1 and calls[0] == len(self.scales) else None

    def baseline(self, item: Mapping[str, Any]) -> dict[str, Any]:
        """The host's make_cam (or make_recam: ``forward2``) maths on one MSF item, in the same order."""
        import torch
        import torch.nn.functional as F

        dev = self._dev()
        label = torch.as_tensor(item["label"])
        size = (int(item["size"][0]), int(item["size"][1]))
        strided_size = ((size[0] - 1) // 4 + 1, (size[1] - 1) // 4 + 1)
        strided_up_size = (((size[0] - 1) // 16 + 1) * 16, ((size[1] - 1) // 16 + 1) * 16)
        if self.extra_weight is None:
            outputs = [self.cam_model(img.to(dev, non_blocking=True)) for img in msf_views(item["img"])]
        else:
            outputs = [self.cam_model.forward2(img.to(dev, non_blocking=True), self.extra_weight)
                       for img in msf_views(item["img"])]
        strided_cam = torch.sum(torch.stack(
            [F.interpolate(torch.unsqueeze(o, 0), strided_size, mode="bilinear", align_corners=False)[0]
             for o in outputs]), 0)
        highres_cam = [F.interpolate(torch.unsqueeze(o, 1), strided_up_size, mode="bilinear", align_corners=False)
                       for o in outputs]
        highres_cam = torch.sum(torch.stack(highres_cam, 0), 0)[:, 0, :size[0], :size[1]]
        valid_cat = torch.nonzero(label)[:, 0]
        strided_cam = strided_cam[valid_cat]
        highres_cam = highres_cam[valid_cat]
        if valid_cat.numel():
            strided_cam /= F.adaptive_max_pool2d(strided_cam, (1, 1)) + 1e-5
            highres_cam /= F.adaptive_max_pool2d(highres_cam, (1, 1)) + 1e-5
        return {"keys": valid_cat, "cam": strided_cam.cpu(), "high_res": highres_cam.cpu().numpy()}

    def multiscale_features(self, item: Mapping[str, Any], fn: Any = None) -> list[torch.Tensor]:
        """Features [2, C, h, w] of (image, flip) at every scale of one MSF item: the two flips of a scale
        are one forward of batch 2, as the host's own pass runs them (under autocast with ``amp``)."""
        from lpcam_core.finite import all_finite
        from lpcam_core.precision import backbone_autocast

        dev = self._dev()
        with backbone_autocast(dev, self.amp):
            views = [(fn or self.features)(img.to(dev, non_blocking=True)) for img in msf_views(item["img"])]
        if self.amp and not all(all_finite(v) for v in views):
            raise ValueError(f"LPCAM_AMP / --amp: the features of {item.get('name', 'an image')} overflowed under "
                             f"autocast ({views[0].dtype}: NaN or inf); run this network without --amp")
        return views

    def precision_record(self) -> dict[str, Any]:
        """What the maps record says of the precision: ``{"amp": <dtype>}`` with ``amp``, else nothing
        (so default float32 directories keep the records they always had)."""
        if not self.amp:
            return {}
        from lpcam_core.precision import AMP_DTYPES

        return {"amp": str(AMP_DTYPES.get(self._dev().type, "autocast")).replace("torch.", "")}

    def lpcam(self, item: Mapping[str, Any], bank: Any) -> dict[str, Any]:
        import torch

        from lpcam_core import lpcam_multiscale

        keys = torch.nonzero(torch.as_tensor(item["label"]))[:, 0]
        size = (int(item["size"][0]), int(item["size"][1]))
        return lpcam_multiscale(self.multiscale_features(item), bank, keys, size, missing="zeros")

    def write(self, path: Any, record: Mapping[str, Any]) -> None:
        from lpcam_core.formats import irn_writer

        irn_writer(path, record)

    def maps_record(self, kind: str, bank_path: str | None = None) -> dict[str, Any]:
        from lpcam_core import run

        if kind == "baseline":
            return run.maps_record("baseline", run.model_fingerprint(self.cam_model, self.extra_weight), self.scales)
        return run.maps_record(kind, run.model_fingerprint(self.feature_model), self.scales, bank_path=bank_path,
                               **self.precision_record())

    def prototype_baseline_dir(self, requested: str | None, bank_path: str) -> str | None:
        """Where ``prototypes`` keeps the baselines of the prototype list: ``requested``, else ``<bank>_baseline``."""
        return requested or os.path.splitext(bank_path)[0] + "_baseline"

    def check_bank(self, bank: Any, source: str) -> None:
        """Refuse (``BankError``) a bank another checkpoint's classifier built."""
        bank.check_fits(classifier_weight=self.scorer().weight, source=source)

    def baseline_fingerprint(self) -> dict[str, Any]:
        """What the baseline directory's record holds: network, model fingerprint, scales."""
        from lpcam_core import run

        return {"network": self.network, "model": run.model_fingerprint(self.cam_model, self.extra_weight),
                "scales": self.scales}


def cam_host(args: Any, spec: Spec, *, flag: str = "--cam_weights_name") -> IRNFamily:
    """The make_cam network (``args.cam_weights_name`` + the host's weights suffix) as a host."""
    path = args.cam_weights_name + spec.weights_suffix
    model = load_model(args.cam_network, path, flag=flag)
    return IRNFamily(spec.name, args.cam_network, model, args.cam_scales, meta={"weights": os.path.abspath(path)})


# --------------------------------------------------------------------------- the patched pass


def swap_job(ctx: Any, host: IRNFamily, data: base.Datasets, settings: HostSettings, paths: Mapping[str, Any]) -> None:
    """:func:`lpcam_adapters.base.swap_pass` (module-level: spawned processes import this module by name)."""
    compat.register_irn_family()
    base.swap_pass(ctx, host, data, settings, baseline_dir=paths["baseline_dir"], bank_path=paths["bank_path"],
                   out_dir=paths["out_dir"], fingerprint=host.baseline_fingerprint(), meta=paths["meta"],
                   reads=paths["reads"])


def own_job(ctx: Any, host: IRNFamily, data: base.Datasets, out_dir: str) -> None:
    """:func:`lpcam_adapters.base.own_pass` (module-level, as :func:`swap_job`)."""
    compat.register_irn_family()
    base.own_pass(ctx, host, data, out_dir)


def default_bank_path(args: Any, tag: str = "") -> str:
    """``<work_space or parent of cam_out_dir>/lpcam_bank[_<tag>].pt``."""
    workspace = getattr(args, "work_space", None) or os.path.dirname(os.path.normpath(args.cam_out_dir)) or "."
    return os.path.join(workspace, f"lpcam_bank{'_' + tag if tag else ''}.pt")


def default_baseline_dir(args: Any, tag: str = "") -> str:
    """``<cam_out_dir>_baseline`` (``_recam_baseline`` for ReCAM's make_recam)."""
    return os.path.normpath(args.cam_out_dir) + f"_{tag + '_' if tag else ''}baseline"


def make_cam_pass(args: Any, spec: Spec, make_host: Any, original_run: Any, settings: HostSettings, *,
                  tag: str = "") -> None:
    """The patched ``run(args)`` of a host's make_cam (or make_recam) step.

    Args:
        args: the host's parsed arguments (``train_list``, ``voc12_root``, ``cam_scales``,
            ``cam_out_dir``, ``num_workers``, weights names).
        spec: the host.
        make_host: ``(args, settings) -> IRNFamily`` loading the networks.
        original_run: the host's own ``run``, used with ``LPCAM=0`` when GPUs are present.
        settings: the host's settings.
        tag: names the bank and baseline directory of a second pass (``"recam"``).
    """
    import torch

    from lpcam_core import run
    from lpcam_core.logs import configure_logging

    configure_logging()
    compat.coerce_args(args)
    nprocs = base.resolve_workers(settings)
    loader_workers = max(0, int(getattr(args, "num_workers", 0) or 0)) // max(1, nprocs)
    if not settings.enabled:
        if original_run is not None and settings.workers is None and torch.cuda.device_count() > 0:
            logger.info("LPCAM=0: running %s's own CAM pass", spec.name)
            original_run(args)
            return
        logger.info("LPCAM=0: %s's own CAM maps, computed by lpcam's loop (%s)", spec.name,
                    "in-process" if nprocs <= 1 else f"{nprocs} workers")
        data = voc_datasets(args.train_list, None, args.voc12_root, args.cam_scales, loader_workers=loader_workers)
        run.launch(own_job, make_host(args, settings), data, args.cam_out_dir, workers=nprocs, device=settings.device)
        return
    host = make_host(args, settings)
    host.amp = bool(settings.options.get("amp", False))
    proto_list = settings.proto_list or "voc12/train.txt"
    baseline_dir = settings.baseline_dir or default_baseline_dir(args, tag)
    bank_path = settings.bank_path or default_bank_path(args, tag)
    data = voc_datasets(args.train_list, proto_list, args.voc12_root, args.cam_scales, loader_workers=loader_workers)
    voc = os.path.abspath(args.voc12_root)
    paths = {"baseline_dir": baseline_dir, "bank_path": bank_path, "out_dir": args.cam_out_dir,
             "reads": [baseline_dir, voc, os.path.join(voc, "JPEGImages")],
             "meta": {"host": spec.name, "proto_list": proto_list, "num_proto_images": len(data.proto_ids), **host.meta}}
    logger.info("LPCAM swap in %s: baseline CAM %s, bank %s, maps -> %s", spec.name, baseline_dir, bank_path,
                args.cam_out_dir)
    run.launch(swap_job, host, data, settings, paths, workers=nprocs, device=settings.device)
    logger.info(recommended_thresholds(spec))


compat.register_irn_family()


# --------------------------------------------------------------------------- explicit steps: lpcam <host> prototypes|make


def in_host(host_dir: str) -> Any:
    """A context: cwd = the host root, which is also first on ``sys.path`` (the hosts import ``voc12`` ... from there)."""
    import contextlib
    import sys

    @contextlib.contextmanager
    def scope() -> Any:
        root = Path(host_dir).resolve()
        if not (root / "voc12" / "dataloader.py").is_file():
            raise FileNotFoundError(f"{root} is not an IRN-family checkout (no voc12/dataloader.py)")
        old = os.getcwd()
        sys.path.insert(0, str(root))
        os.chdir(root)
        try:
            yield root
        finally:
            os.chdir(old)
            with contextlib.suppress(ValueError):
                sys.path.remove(str(root))

    return scope()


def cli_settings(ns: Any, info: base.HostInfo) -> HostSettings:
    """The host's settings from the environment and the step's flags (which win)."""
    from .cli import settings_env
    from .settings import read_settings

    settings = read_settings(info.options, {**os.environ, **settings_env(ns, info)}, section=info.section, host=info.name)
    changes: dict[str, Any] = {"enabled": True}
    for name in ("workers", "device", "baseline_dir"):
        if getattr(ns, name, None) is not None:
            changes[name] = getattr(ns, name)
    if getattr(ns, "rebuild", False):
        changes["rebuild_bank"] = True
    settings = settings.replace(**changes)
    if settings.device:
        from lpcam_core.run import check_device

        check_device(settings.device)
    return settings


def _abs(path: str | None) -> str | None:
    return None if path is None else os.path.abspath(os.path.expanduser(path))


def _list_path(value: str) -> str:
    return os.path.abspath(value) if os.path.exists(value) else value


def absolute_paths(ns: Any) -> Any:
    """The step's path flags made absolute against the user's directory, once, before the step moves into
    the host's root (so what is read and what the guards check are the same folders)."""
    for name in ("voc12_root", "weights", "bank", "out", "baseline_dir", "ir_label_dir"):
        if getattr(ns, name, None):
            setattr(ns, name, _abs(getattr(ns, name)))
    return ns


def make_reads(ns: Any, baseline_dir: str | None) -> list[str]:
    """What a step reads and never writes into: the VOC root and its images, the ir_label PNGs, and (with a
    bank) the bank's baseline directories (the configured one and ``<bank>_baseline``)."""
    voc = _abs(ns.voc12_root)
    reads = [voc, os.path.join(voc, "JPEGImages"), os.path.join(voc, "SegmentationClass")]
    if getattr(ns, "bank", None):
        reads += [_abs(baseline_dir), os.path.splitext(_abs(ns.bank))[0] + "_baseline"]
    if getattr(ns, "ir_label_dir", None):
        reads.append(_abs(ns.ir_label_dir))
    return [r for r in reads if r]


def prototypes_job(ctx: Any, host: Any, data: base.Datasets, settings: HostSettings, paths: Mapping[str, Any]) -> None:
    """``prototypes``: the missing baselines of the prototype list, then the bank (every process runs it)."""
    compat.register_irn_family()
    host = host.to(ctx.device)
    bank = base.prototype_bank(host, data, paths["baseline_dir"], paths["bank_path"], settings, paths["meta"],
                               device=ctx.device, fingerprint=host.baseline_fingerprint(), reads=paths.get("reads", ()))
    if ctx.is_main:
        logger.info("bank %s: %r", paths["bank_path"], bank)


def make_job(ctx: Any, host: Any, data: base.Datasets, paths: Mapping[str, Any]) -> None:
    """``make``: LPCAM maps (or the host's own with ``baseline``) of the list (every process runs it)."""
    from lpcam_core import PrototypeBank

    compat.register_irn_family()
    host = host.to(ctx.device)
    if paths["bank_path"] is None:
        base.write_baseline(host, data, paths["out_dir"], mode=paths["mode"], reads=paths["reads"])
    else:
        bank = PrototypeBank.load(paths["bank_path"])
        base.write_lpcam(host, bank, paths["bank_path"], data, paths["out_dir"], mode=paths["mode"], reads=paths["reads"])
    if ctx.is_main:
        logger.info("%s maps of %d images written to %s", "LPCAM" if paths["bank_path"] else "baseline",
                    len(data.map_ids), paths["out_dir"])
        if paths["bank_path"] and paths.get("thresholds"):
            logger.info(paths["thresholds"])


def cmd_prototypes(ns: Any) -> int:
    """``lpcam <host> prototypes``: baselines of the prototype list (missing files only) and the bank."""
    from lpcam_core import run

    info = ns.info
    absolute_paths(ns)
    settings = cli_settings(ns, info)
    run.check_workers(settings.workers)
    bank = ns.bank
    if settings.options.get("amp"):
        logger.info("LPCAM_AMP / --amp changes the maps pass only: the prototype stage runs in float32")
    with in_host(ns.host):
        importlib.import_module(info.module).install()
        host = ns.plan(ns, settings)
        data = voc_datasets(None, _list_path(ns.list), ns.voc12_root, ns.scales, loader_workers=ns.loader_workers)
        reads = [r for r in make_reads(ns, None) if r != os.path.splitext(bank)[0] + "_baseline"]
        paths = {"bank_path": bank, "baseline_dir": host.prototype_baseline_dir(_abs(settings.baseline_dir), bank),
                 "reads": reads,
                 "meta": {"host": host.name, "proto_list": ns.list, "num_proto_images": len(data.proto_ids), **host.meta}}
        run.launch(prototypes_job, host, data, settings, paths, workers=base.resolve_workers(settings),
                   device=settings.device)
    return 0


def cmd_make(ns: Any) -> int:
    """``lpcam <host> make``: LPCAM maps (``--baseline``: the host's own) in the host's format."""
    from lpcam_core import PrototypeBank, run
    from lpcam_core.io import check_output_dir

    info = ns.info
    absolute_paths(ns)
    settings = cli_settings(ns, info)
    run.check_workers(settings.workers)
    if not ns.baseline and not ns.bank:
        raise ValueError(f"--bank is required for LPCAM maps (build one with `lpcam {info.name} prototypes`)")
    if not ns.baseline and not os.path.isfile(_abs(ns.bank)):
        raise FileNotFoundError(f"--bank {ns.bank}: no such file; build it first with `lpcam {info.name} prototypes "
                                f"... --bank {ns.bank}` (or give --baseline for the host's own maps)")
    out = _abs(ns.out)
    reads = make_reads(ns, settings.baseline_dir)
    check_output_dir(out, read_dirs=reads)  # before anything is loaded
    with in_host(ns.host):
        importlib.import_module(info.module).install()
        host = ns.plan(ns, settings)
        host.amp = bool(settings.options.get("amp", False))
        if not ns.baseline:  # fail early on a bank of another checkpoint or host setting
            bank = PrototypeBank.load(_abs(ns.bank), num_classes=host.num_classes)
            host.check_bank(bank, ns.bank)
            cfg = bank.meta.get("config") or {}
            logger.info("LPCAM maps with the bank %s, built with K=%s, tau=%s, mu_f=%s, mu_b=%s (the bank's settings; "
                        "`lpcam %s prototypes` changes them)", ns.bank, cfg.get("num_clusters"), cfg.get("fg_threshold"),
                        cfg.get("class_threshold"), cfg.get("context_high"), info.name)
        data = voc_datasets(_list_path(ns.list), None, ns.voc12_root, ns.scales, loader_workers=ns.loader_workers)
        paths = {"bank_path": None if ns.baseline else _abs(ns.bank), "out_dir": out, "reads": reads,
                 "mode": "overwrite" if ns.overwrite else "resume", "thresholds": info.thresholds}
        run.launch(make_job, host, data, paths, workers=base.resolve_workers(settings), device=settings.device)
    return 0


def add_steps(sub: Any, info: base.HostInfo, plan: Any, *, weights_help: str, network: str = "net.resnet50_cam",
              weights_required: bool = True, extra: Any = None, bank_help: str = "prototype bank file",
              baseline_dir_help: str = "baseline CAM directory (default <bank>_baseline)") -> None:
    """``prototypes`` and ``make`` of an IRN-family host; ``plan(ns, settings)`` loads its networks."""
    from .cli import add_settings_flags, count_value, scale_value

    def common(p: argparse.ArgumentParser, bank_required: bool, clustering: bool) -> None:
        p.add_argument("--host", required=True, help="host checkout (run from its root: voc12/cls_labels.npy is read there)")
        p.add_argument("--voc12-root", required=True, help="VOC2012 root holding JPEGImages/")
        p.add_argument("--weights", required=weights_required, help=weights_help)
        p.add_argument("--bank", required=bank_required, help=bank_help)
        p.add_argument("--network", default=network, help=f"host network module (default {network})")
        p.add_argument("--scales", type=scale_value, nargs="+", default=[1.0, 0.5, 1.5, 2.0],
                       help="inference scales (each in (0, 16])")
        p.add_argument("--workers", type=int, help="spawned processes (default: one per GPU, or in-process when --device "
                       "names one; 0: in-process); "
                       "not with torchrun, which launches the processes itself")
        p.add_argument("--device", help="device (default: cuda:<rank> when there are GPUs, else cpu)")
        p.add_argument("--loader-workers", type=count_value, default=0, help="DataLoader workers per process (>= 0)")
        add_settings_flags(p, info, clustering=clustering)  # make reads the bank: K, tau, mu... are the bank's
        if extra is not None:
            extra(p)

    import argparse

    pr = sub.add_parser("prototypes", help="baseline CAM of the prototype list and the prototype bank")
    common(pr, True, clustering=True)
    pr.add_argument("--list", default="voc12/train.txt", help="prototype image list (relative to --host)")
    pr.add_argument("--baseline-dir", help=baseline_dir_help)
    pr.add_argument("--rebuild", action="store_true", help="rebuild even when a matching bank exists")
    pr.set_defaults(func=cmd_prototypes, info=info, plan=plan)
    mk = sub.add_parser("make", help="LPCAM maps (or --baseline CAM maps) in the host's file format")
    common(mk, False, clustering=False)
    mk.add_argument("--list", default="voc12/train_aug.txt", help="image list (relative to --host)")
    mk.add_argument("--out", required=True, help="output directory (the host's CAM directory)")
    mk.add_argument("--baseline", action="store_true", help="the host's own CAM maps instead of LPCAM")
    mk.add_argument("--overwrite", action="store_true",
                    help="recompute maps that already exist (default: keep complete files, so an interrupted run "
                         "resumes; a directory another checkpoint or bank filled is refused, see <out>/lpcam_maps.json)")
    mk.set_defaults(func=cmd_make, info=info, plan=plan)

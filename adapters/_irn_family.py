"""What IRN, ReCAM and AMN's first stage share: settings, model access, drivers, file writing.

The host adapters (:mod:`lpcam_adapters.irn`, :mod:`lpcam_adapters.recam`) are thin: they name
the host modules and functions to patch and hand a :class:`HostSpec` to the drivers here.

A patched make_cam pass does, with ``LPCAM`` on (the default):

1. the host's baseline CAM of the prototype images (``voc12/train.txt``), into its own
   directory (``<cam_out_dir>_baseline``), only for files that do not exist yet;
2. the prototype bank, streamed through :class:`lpcam_core.PrototypeBuilder` (bounded memory)
   from one-scale, unflipped features and those baseline CAMs, saved beside the outputs with
   its metadata and reused while the checkpoint and settings are unchanged;
3. LPCAM maps of the host's inference list, written to ``cam_out_dir`` in the host's format
   (``{keys, cam, high_res}``), so eval_cam, cam_to_ir_label, train_irn and
   make_sem_seg_labels run unchanged.

With ``LPCAM=0`` the host's own pass runs; on a machine without GPU (where the host's spawn of
zero workers writes nothing) an in-process loop writes the host's baseline maps instead.
With N GPUs every step that loops over images runs in N spawned workers (one per GPU); the
worker functions live in this module, so unpickling them imports the patches in each worker.
Under torchrun (the ``lpcam <host> prototypes|make`` commands) the same per-image functions run in
every rank on its shard instead (``sharded_*``, :func:`build_bank_sharded`).

Settings (environment variables, or a YAML file named by ``LPCAM_CONFIG``; see
:func:`settings_from_env`) fill :class:`AdapterSettings`, whose ``lpcam`` field is the core's
:class:`lpcam_core.LPCAMConfig`.

Portions of ``_baseline_worker`` follow ``step/make_cam.py`` of IRN
(https://github.com/jiwoon-ahn/irn), MIT License, Copyright (c) 2019 Jiwoon Ahn, and of
``step/make_recam.py`` of ReCAM (https://github.com/zhaozhengChen/ReCAM), MIT License,
Copyright (c) 2021 Zhaozheng Chen: the maths is reproduced so that its maps are bit-identical
to the host's.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import json
import logging
import os
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from . import _compat, _settings

__all__ = [
    "AdapterSettings",
    "HostSpec",
    "settings_from_env",
    "prepare_workdir",
    "load_model",
    "extract_features",
    "baseline_pass",
    "build_bank",
    "lpcam_pass",
    "launched_by_torchrun",
    "init_torchrun",
    "torchrun_session",
    "missing_indices",
    "sharded_maps",
    "sharded_baseline_pass",
    "sharded_lpcam_pass",
    "build_bank_sharded",
    "make_cam_pass",
    "configure_logging",
    "ENV_VARS",
]

logger = logging.getLogger(__name__)

NUM_CLASSES = 20

# Environment variables read by settings_from_env (documented in the README and --explain).
ENV_VARS: dict[str, str] = {
    "LPCAM": "1 (default) swaps CAM for LPCAM; 0/off/false runs the host's own CAM",
    **_settings.core_env_vars(preset="voc (default) or coco: the paper's hyper-parameters",
                              tau="CAM threshold splitting class and context pools (tau)"),
    "LPCAM_BANK": "prototype bank file (default <workspace>/lpcam_bank.pt)",
    "LPCAM_REBUILD_BANK": "1: rebuild the bank even when a matching one exists",
    "LPCAM_BASELINE_DIR": "baseline CAM directory (default <cam_out_dir>_baseline)",
    "LPCAM_PROTO_LIST": "image list clustered for prototypes (default voc12/train.txt)",
    "LPCAM_WORKERS": "processes for the image loops (default: number of GPUs; 0/1 in-process; >1 spawns)",
    "LPCAM_DEVICE": "device for in-process work (default cuda if available else cpu)",
    "LPCAM_CLASSIFIER": "ReCAM: classifier scoring prototypes, cls (W_cls, default) or recam (W_recam*W_cls)",
    "LPCAM_BACKBONE": "ReCAM: backbone of features, recam (default) or cam (res50_cam weights)",
    "LPCAM_NO_PRETRAINED": "1: host networks never download ImageNet weights",
    "LPCAM_LOG_LEVEL": "log level of lpcam's messages in host runs (default INFO)",
}

# --------------------------------------------------------------------------- logging

configure_logging = _settings.configure_logging


# --------------------------------------------------------------------------- settings


@dataclass(frozen=True)
class AdapterSettings:
    """Settings of a patched host pass.

    Attributes:
        enabled: Swap CAM for LPCAM (``LPCAM=0`` turns it off).
        lpcam: The core settings (K, tau, mu_f, mu_b, seed, memory budget, ...).
        bank_path: Prototype bank file (``None``: ``<workspace>/lpcam_bank<suffix>.pt``).
        rebuild_bank: Rebuild even when a bank built with the same checkpoint and settings exists.
        baseline_dir: Baseline CAM directory (``None``: ``<cam_out_dir>_baseline``).
        proto_list: Image list whose images are clustered (relative to the host root).
        workers: Processes for the image loops (``None``: one per GPU; 0 or 1: in-process).
        device: Device of in-process work (``None``: cuda if available, else cpu).
        classifier: ReCAM only: ``"cls"`` (W_cls of the feature backbone, default) or ``"recam"``
            (W_recam * W_cls) scores the prototypes (see :mod:`lpcam_adapters.recam` for why).
        backbone: ReCAM only: ``"recam"`` or ``"cam"`` checkpoint gives the features.
    """

    enabled: bool = True
    lpcam: Any = None
    bank_path: str | None = None
    rebuild_bank: bool = False
    baseline_dir: str | None = None
    proto_list: str = "voc12/train.txt"
    workers: int | None = None
    device: str | None = None
    classifier: str = "cls"
    backbone: str = "recam"

    def __post_init__(self) -> None:
        if self.lpcam is None:
            from lpcam_core import LPCAMConfig

            object.__setattr__(self, "lpcam", LPCAMConfig.preset("voc"))
        if self.classifier not in ("recam", "cls"):
            raise ValueError(f"classifier={self.classifier!r}: expected 'recam' or 'cls'")
        if self.backbone not in ("recam", "cam"):
            raise ValueError(f"backbone={self.backbone!r}: expected 'recam' or 'cam'")
        if self.backbone == "cam" and self.classifier == "recam":
            raise ValueError("backbone='cam' needs classifier='cls': W_recam belongs to the ReCAM backbone")
        if self.workers is not None and self.workers < 0:
            raise ValueError(f"workers={self.workers}: expected >= 0")


#: Keys of the YAML's ``adapter:`` section -> :class:`AdapterSettings` fields.
ADAPTER_KEYS = {
    "enabled": "enabled",
    "bank": "bank_path",
    "bank_path": "bank_path",
    "rebuild_bank": "rebuild_bank",
    "baseline_dir": "baseline_dir",
    "proto_list": "proto_list",
    "workers": "workers",
    "device": "device",
    "classifier": "classifier",
    "backbone": "backbone",
}


def settings_from_env(environ: Mapping[str, str] | None = None) -> AdapterSettings:
    """Fill :class:`AdapterSettings` from the preset, then ``LPCAM_CONFIG`` YAML, then variables.

    Args:
        environ: Variables to read (default ``os.environ``); see :data:`ENV_VARS`.

    Raises:
        ValueError: a malformed value or an unknown YAML key, naming it.
    """
    env = dict(os.environ if environ is None else environ)
    config = _settings.read_config(env.get("LPCAM_CONFIG", "").strip(), {"adapter": ADAPTER_KEYS})
    return settings_from_config(env, config)


def settings_from_config(env: Mapping[str, str], config: _settings.ConfigFile) -> AdapterSettings:
    """:class:`AdapterSettings` from a read ``LPCAM_CONFIG`` (its ``adapter`` section) and the variables."""
    cfg = _settings.lpcam_config(env, config)
    adapter = _settings.common_adapter_values(env, config.sections.get("adapter", {}), config.path)
    adapter.update(_settings.env_values(env, (("LPCAM_DEVICE", "device"), ("LPCAM_CLASSIFIER", "classifier"),
                                              ("LPCAM_BACKBONE", "backbone"))))
    if env.get("LPCAM_WORKERS", "").strip():
        adapter["workers"] = _settings.parse_number(env["LPCAM_WORKERS"].strip(), int, "LPCAM_WORKERS")
    if adapter.get("workers") is not None:
        adapter["workers"] = int(adapter["workers"])
    return AdapterSettings(lpcam=cfg, **adapter)


# --------------------------------------------------------------------------- hosts


@dataclass(frozen=True)
class HostSpec:
    """What differs between the IRN-family hosts for one driver.

    Attributes:
        name: ``"irn"``, ``"recam"``.
        weights_suffix: Appended to ``args.cam_weights_name`` (IRN ``".pth"``, ReCAM ``""``).
        thresholds: The host's own downstream thresholds (eval, conf_fg, conf_bg, sem_seg_bg).
    """

    name: str
    weights_suffix: str
    thresholds: tuple[float, float, float, float]


LPCAM_THRESHOLDS = (0.30, 0.45, 0.25, 0.35)  # PAPER.md: used with LPCAM maps downstream


def recommended_thresholds(host: HostSpec) -> str:
    """The downstream flags recommended for LPCAM maps, next to the host's own defaults."""
    names = ("--cam_eval_thres", "--conf_fg_thres", "--conf_bg_thres", "--sem_seg_bg_thres")
    flags = " ".join(f"{n} {v:g}" for n, v in zip(names, LPCAM_THRESHOLDS))
    own = "/".join(f"{v:g}" for v in host.thresholds)
    return f"LPCAM maps: run the next passes with {flags} ({host.name}'s own defaults: {own})"


def prepare_workdir(
    host_dir: str | os.PathLike,
    workdir: str | os.PathLike,
    *,
    cls_labels: str | os.PathLike | None = None,
    lists: Mapping[str, str | os.PathLike | Sequence[str]] | None = None,
) -> Path:
    """A run directory for an IRN-family host that leaves the host checkout untouched.

    The hosts import ``step``, ``net``, ``misc``, ``voc12`` relative to the working directory
    and read ``voc12/cls_labels.npy`` there. ``workdir`` gets a symlink to every top-level
    entry of ``host_dir`` except ``voc12``, which is a real directory of symlinks to the host's
    files, with ``cls_labels.npy`` and the lists replaced by ``cls_labels`` and ``lists``.
    Run the host with ``cwd=workdir`` (and ``PYTHONPYCACHEPREFIX`` set, so no ``__pycache__``
    lands in the checkout).

    Args:
        host_dir: The host checkout (``.hosts/irn``).
        workdir: Directory to create or refresh.
        cls_labels: IRN-style ``{int id: float32 [20]}`` file replacing the host's.
        lists: ``{"train.txt": path or list of ids, ...}`` replacing or adding ``voc12`` lists.

    Returns:
        ``workdir`` as a resolved ``Path``.
    """
    host = Path(host_dir).resolve()
    if not (host / "voc12" / "dataloader.py").is_file():
        raise FileNotFoundError(f"{host} is not an IRN-family checkout (no voc12/dataloader.py)")
    work = Path(workdir).resolve()
    work.mkdir(parents=True, exist_ok=True)
    for entry in sorted(host.iterdir()):
        if entry.name in (".git", "voc12") or entry.name.startswith("."):
            continue
        _symlink(entry, work / entry.name)
    voc = work / "voc12"
    voc.mkdir(exist_ok=True)
    replaced = {"cls_labels.npy"} if cls_labels is not None else set()
    replaced |= set(lists or {})
    for entry in sorted((host / "voc12").iterdir()):
        if entry.name not in replaced and entry.name != "__pycache__":
            _symlink(entry, voc / entry.name)
    if cls_labels is not None:
        _symlink(Path(cls_labels).resolve(), voc / "cls_labels.npy")
    for name, value in (lists or {}).items():
        target = voc / name
        if target.is_symlink() or target.exists():
            target.unlink()
        if isinstance(value, (str, os.PathLike)):
            _symlink(Path(value).resolve(), target)
        else:
            target.write_text("".join(f"{v}\n" for v in value))
    return work


def _symlink(src: Path, dst: Path) -> None:
    if dst.is_symlink() or dst.exists():
        if dst.is_symlink() and os.readlink(dst) == str(src):
            return
        if dst.is_dir() and not dst.is_symlink():
            raise FileExistsError(f"{dst} exists and is a directory; refusing to replace it")
        dst.unlink()
    dst.symlink_to(src)


# --------------------------------------------------------------------------- model access


def load_model(network: str, weights: str | os.PathLike, *, cls_name: str = "CAM") -> torch.nn.Module:
    """Build ``<network>.<cls_name>()`` without the ImageNet download and load ``weights`` on CPU.

    Args:
        network: Host module (``args.cam_network``, e.g. ``"net.resnet50_cam"``).
        weights: State dict file.
        cls_name: Class in that module.

    Raises:
        FileNotFoundError: ``weights`` does not exist (the message names the flag to check).
    """
    path = os.fspath(weights)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"CAM weights not found: {path} (check --cam_weights_name / the work space)")
    module = importlib.import_module(network)
    with _compat.checkpoint_follows():
        model = getattr(module, cls_name)()
    state = torch.load(path, map_location="cpu")
    model.load_state_dict(state, strict=True)
    model.eval()  # IRN's Net.train override returns None and keeps self.training; BN is fixed anyway
    return model


def extract_features(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Local features of an IRN-family network: ``stage4(stage3(stage2(stage1(x))))``.

    Args:
        model: A host ``net.resnet50_cam.Net`` subclass.
        x: [B, 3, H, W] normalised images.

    Returns:
        [B, C, ceil(H/16), ceil(W/16)] (C = 2048 for ResNet-50), non-negative.
    """
    for name in ("stage1", "stage2", "stage3", "stage4"):
        if not hasattr(model, name):
            raise AttributeError(f"{type(model).__name__} has no {name}: not an IRN-family network")
    return model.stage4(model.stage3(model.stage2(model.stage1(x))))


def classifier_weight(model: torch.nn.Module) -> torch.Tensor:
    """[num_classes, C] from the host's ``classifier`` 1x1 conv (no bias in the IRN family)."""
    conv = getattr(model, "classifier", None)
    if conv is None or not hasattr(conv, "weight"):
        raise AttributeError(f"{type(model).__name__} has no classifier conv")
    weight = conv.weight.detach()
    return weight.reshape(weight.shape[0], -1)


# --------------------------------------------------------------------------- parallel loops


def _device_for(process_id: int, nprocs: int, requested: str | None) -> torch.device:
    if requested:
        return torch.device(requested)
    if torch.cuda.is_available():
        return torch.device("cuda", process_id % torch.cuda.device_count())
    return torch.device("cpu")


def _split(dataset: Any, nprocs: int, process_id: int) -> Any:
    """Interleaved share of a dataset (IRN's ``torchutils.split_dataset``)."""
    from torch.utils.data import Subset

    if nprocs <= 1:
        return dataset
    return Subset(dataset, np.arange(process_id, len(dataset), nprocs))


def resolve_workers(settings: AdapterSettings) -> int:
    """Processes for the image loops: the setting, else one per GPU (0 on a CPU machine)."""
    if settings.workers is not None:
        return settings.workers
    return torch.cuda.device_count()


def _run(worker: Callable[..., None], nprocs: int, args: tuple) -> None:
    """``worker(process_id, nprocs, *args)`` in-process (nprocs <= 1) or in ``nprocs`` spawned workers."""
    if nprocs <= 1:
        worker(0, 1, *args)
        return
    from torch import multiprocessing

    logger.info("spawning %d workers", nprocs)
    multiprocessing.spawn(worker, nprocs=nprocs, args=(nprocs, *args), join=True)


def _worker_setup(process_id: int, nprocs: int) -> None:
    if nprocs > 1:
        configure_logging()
        if not torch.cuda.is_available():
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // nprocs))


def _loader(dataset: Any, num_workers: int) -> Any:
    from torch.utils.data import DataLoader

    return DataLoader(dataset, batch_size=None, shuffle=False, num_workers=max(0, num_workers), pin_memory=False)


class _Progress:
    def __init__(self, what: str, total: int, process_id: int) -> None:
        self.what, self.total, self.pid = what, total, process_id
        self.step = max(1, total // 10)
        self.start = time.perf_counter()

    def update(self, done: int) -> None:
        if self.pid == 0 and (done % self.step == 0 or done == self.total):
            rate = done / max(time.perf_counter() - self.start, 1e-9)
            logger.info("%s: %d/%d images (%.2f img/s per worker)", self.what, done, self.total, rate)


def _scales(img: Any) -> list[torch.Tensor]:
    """MSF item's ``img`` (list over scales of [2,3,H,W], or the bare array for one scale)."""
    if isinstance(img, (list, tuple)):
        return [torch.as_tensor(i) for i in img]
    return [torch.as_tensor(img)]


def _size(size: Any) -> tuple[int, int]:
    return int(size[0]), int(size[1])


def _host_imutils() -> Any:
    return importlib.import_module("misc.imutils")


# --------------------------------------------------------------------------- baseline CAM


def _baseline_worker(
    process_id: int,
    nprocs: int,
    model: torch.nn.Module,
    dataset: Any,
    out_dir: str,
    extra_weight: torch.Tensor | None,
    skip_existing: bool,
    device: str | None,
    num_workers: int,
) -> None:
    """The host's ``_work`` of make_cam (``extra_weight`` None) or make_recam (``forward2``).

    Same operations in the same order as the host, so the maps are bit-identical on the
    same device. Files already in ``out_dir`` are kept when ``skip_existing``.
    """
    _worker_setup(process_id, nprocs)
    dev = _device_for(process_id, nprocs, device)
    databin = _split(dataset, nprocs, process_id)
    model = model.to(dev)
    weight = extra_weight.to(dev) if extra_weight is not None else None
    progress = _Progress(f"baseline CAM -> {out_dir}", len(databin), process_id)
    with torch.no_grad():
        for done, pack in enumerate(_loader(databin, num_workers), 1):
            path = os.path.join(out_dir, pack["name"] + ".npy")
            if not (skip_existing and os.path.isfile(path)):
                rec = _baseline_maps(model, pack, dev, weight)
                _save(path, rec["keys"], rec["cam"], rec["high_res"])
            progress.update(done)


def _baseline_maps(model: torch.nn.Module, pack: Mapping[str, Any], dev: torch.device,
                   weight: torch.Tensor | None) -> dict[str, Any]:
    """The host's CAM of one MSF item (``weight``: ReCAM's ``forward2``), under ``torch.no_grad``.

    Returns:
        ``{"keys": int64 [n], "cam": CPU float [n, ceil(H/4), ceil(W/4)], "high_res": numpy [n, H, W]}``,
        each map max-normalised (the host's make_cam/make_recam maths).
    """
    label = torch.as_tensor(pack["label"])
    size = _size(pack["size"])
    strided_size = ((size[0] - 1) // 4 + 1, (size[1] - 1) // 4 + 1)
    strided_up_size = (((size[0] - 1) // 16 + 1) * 16, ((size[1] - 1) // 16 + 1) * 16)
    if weight is None:
        outputs = [model(img.to(dev, non_blocking=True)) for img in _scales(pack["img"])]
    else:
        outputs = [model.forward2(img.to(dev, non_blocking=True), weight) for img in _scales(pack["img"])]
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


def _save(path: str, keys: torch.Tensor, cam: torch.Tensor, high_res: np.ndarray) -> None:
    from lpcam_core.io import save_irn_cam

    save_irn_cam(path, keys, cam, high_res, fsync=False)


def baseline_pass(
    model: torch.nn.Module,
    dataset: Any,
    out_dir: str | os.PathLike,
    *,
    extra_weight: torch.Tensor | None = None,
    skip_existing: bool = False,
    workers: int = 0,
    device: str | None = None,
    num_workers: int = 0,
) -> None:
    """Write the host's baseline CAM files of ``dataset`` (a host MSF dataset) to ``out_dir``.

    Args:
        model: Host CAM network (``CAM``), weights loaded.
        dataset: ``voc12.dataloader.VOC12ClassificationDatasetMSF``.
        out_dir: Output directory (created).
        extra_weight: ReCAM's ``W_recam`` ([20, 2048, 1, 1]): maps by ``model.forward2``.
        skip_existing: Keep files that already exist (never overwrite a baseline).
        workers: Processes (0/1: in-process; >1: ``torch.multiprocessing.spawn``).
        device: Device for in-process work.
        num_workers: DataLoader workers per process.
    """
    os.makedirs(out_dir, exist_ok=True)
    record = None if skip_existing else maps_record("baseline", model, dataset, extra_weight=extra_weight)
    with rewriting_map_dir(out_dir, record):
        if workers > 1:  # each worker moves its copy to its own device
            model.cpu()
        _run(_baseline_worker, workers,
             (model, dataset, os.fspath(out_dir), extra_weight, skip_existing, device, num_workers))


BASELINE_RECORD = "lpcam_baseline.json"


def model_fingerprint(model: torch.nn.Module, extra_weight: torch.Tensor | None = None) -> str:
    """sha256 (16 hex digits) of a network's state dict (and ReCAM's ``W_recam``)."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    if extra_weight is not None:
        digest.update(extra_weight.detach().float().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]


def check_baseline_record(baseline_dir: str | os.PathLike, record: Mapping[str, Any]) -> None:
    """Refuse a baseline directory made by another checkpoint or setting; record ours in a new one.

    Baselines are never overwritten, so stale maps (after retraining) would silently feed the
    pools: ``<baseline_dir>/lpcam_baseline.json`` records the network's fingerprint and scales.

    Raises:
        ValueError: the directory's record differs from ``record`` (names the differing keys).
    """
    path = os.path.join(os.fspath(baseline_dir), BASELINE_RECORD)
    have = _read_record(path)
    if have is not None:
        diff = sorted(k for k in record if have.get(k) != record[k])
        if diff:
            raise ValueError(
                f"{baseline_dir} holds baseline CAMs of another checkpoint or setting ({', '.join(diff)} differ: "
                f"{ {k: have.get(k) for k in diff} } != { {k: record[k] for k in diff} }); baselines are never "
                "overwritten: delete that directory or set LPCAM_BASELINE_DIR to another one"
            )
        return
    os.makedirs(baseline_dir, exist_ok=True)
    existing = sum(1 for f in os.listdir(baseline_dir) if f.endswith(".npy"))
    if existing:
        logger.warning("%s holds %d baseline CAM files without a record of their checkpoint: assuming this one",
                       baseline_dir, existing)
    _write_record(path, record)


def _read_record(path: str) -> dict[str, Any] | None:
    """The JSON record at ``path`` (a baseline or map directory's), or None when there is none."""
    if not os.path.isfile(path):
        return None
    with open(path, encoding="utf-8") as handle:
        return json.load(handle)


def _write_record(path: str, record: Mapping[str, Any]) -> None:
    """Write a directory's JSON record atomically."""
    from lpcam_core.io import atomic_write_bytes

    atomic_write_bytes(path, json.dumps(dict(record), indent=1, sort_keys=True).encode())


# --------------------------------------------------------------------------- prototype bank


def _bank_matches(bank: Any, settings: AdapterSettings, extra_meta: Mapping[str, Any]) -> str | None:
    """Why ``bank`` cannot be reused (``None``: it can)."""
    wanted = settings.lpcam.to_dict()
    have = dict(bank.meta.get("config") or {})
    for key in ("preset_name",):
        wanted.pop(key, None)
        have.pop(key, None)
    if have != wanted:
        diff = sorted(k for k in set(have) | set(wanted) if have.get(k) != wanted.get(k))
        return f"its settings differ ({', '.join(diff)})"
    for key, value in extra_meta.items():
        if bank.meta.get(key) != value:
            return f"its {key} differs ({bank.meta.get(key)!r} != {value!r})"
    return None


def build_bank(
    model: torch.nn.Module,
    proto_dataset: Any,
    baseline_dir: str | os.PathLike,
    settings: AdapterSettings,
    score_weight: torch.Tensor,
    *,
    bank_path: str | os.PathLike | None = None,
    device: str | None = None,
    extra_meta: Mapping[str, Any] | None = None,
    num_workers: int = 0,
) -> Any:
    """Stream the prototype images into :class:`lpcam_core.PrototypeBuilder` and build the bank.

    Each image gives its one-scale, unflipped local features (``stage4``) and the baseline CAM
    file ``<baseline_dir>/<id>.npy`` (``high_res``, ``keys``). A bank at ``bank_path`` built
    with the same classifier, settings and ``extra_meta`` is loaded instead (unless
    ``settings.rebuild_bank``); a new bank is saved there.

    Args:
        model: Host network giving the features.
        proto_dataset: ``voc12.dataloader.VOC12ClassificationDataset`` of the prototype list.
        baseline_dir: Baseline CAM files of those images.
        settings: Adapter settings (``settings.lpcam`` drives the builder).
        score_weight: [20, C] classifier scoring the centres.
        bank_path: Where the bank is cached.
        device: Device for features and K-means.
        extra_meta: Stored in the bank's metadata and compared on reuse.
        num_workers: DataLoader workers.

    Returns:
        :class:`lpcam_core.PrototypeBank`.
    """
    from lpcam_core import PrototypeBuilder

    extra_meta = dict(extra_meta or {})
    score_weight = score_weight.detach().float().cpu().reshape(score_weight.shape[0], -1)
    bank = _reusable_bank(bank_path, settings, score_weight, extra_meta)
    if bank is not None:
        return bank

    cfg = settings.lpcam
    dev = _device_for(0, 1, device)
    model = model.to(dev)
    builder = PrototypeBuilder(score_weight.shape[0], cfg)
    dataset, picks = proto_dataset, None
    if cfg.images_per_class is not None:
        from lpcam_core.prototypes import sample_images_per_class

        labels = {i: torch.nonzero(torch.as_tensor(proto_dataset.label_list[i]))[:, 0].tolist()
                  for i in range(len(proto_dataset))}
        picks = sample_images_per_class(labels, cfg.images_per_class, cfg.seed, score_weight.shape[0])
        from torch.utils.data import Subset

        dataset = Subset(proto_dataset, [i for _, i in picks])
    progress = _Progress("prototype features", len(dataset), 0)
    peak = 0
    with torch.no_grad():
        for done, pack in enumerate(_loader(dataset, num_workers), 1):
            name = pack["name"]
            record = _load_cam(os.path.join(os.fspath(baseline_dir), name + ".npy"))
            img = torch.as_tensor(pack["img"])[None].to(dev)
            feats = extract_features(model, img)[0].float()
            keys = torch.as_tensor(record["keys"]).long()
            cams = torch.as_tensor(np.asarray(record["high_res"]))
            if picks is not None:  # COCO: only the class this image was drawn for
                cls = picks[done - 1][0]
                sel = (keys == cls).nonzero()[:, 0]
                keys, cams = keys[sel], cams[sel]
            builder.add(feats, cams, keys)
            peak = max(peak, builder.bytes_held)
            progress.update(done)
    logger.info("prototype pools: peak %.1f MiB of %.1f MiB budget; process peak RSS %.0f MiB (%d images)",
                peak / 2**20, cfg.memory_budget_bytes / 2**20, _peak_rss_mib(), len(dataset))
    bank = builder.build(score_weight.to(dev), device=dev, progress=False)
    bank.meta.update(extra_meta)
    bank.meta["pool_peak_bytes"] = int(peak)
    if bank_path is not None:
        os.makedirs(os.path.dirname(os.path.abspath(bank_path)), exist_ok=True)
        bank.save(bank_path)
    return bank


def _reusable_bank(bank_path: str | os.PathLike | None, settings: AdapterSettings, score_weight: torch.Tensor,
                   extra_meta: Mapping[str, Any]) -> Any:
    """The bank at ``bank_path`` when it was built with this classifier, settings and ``extra_meta``, else None."""
    from lpcam_core import PrototypeBank
    from lpcam_core.bank import BankError

    if bank_path is None or not os.path.isfile(bank_path) or settings.rebuild_bank:
        return None
    try:
        bank = PrototypeBank.load(bank_path, classifier_weight=score_weight, num_classes=score_weight.shape[0])
    except BankError as err:
        logger.warning("rebuilding the prototype bank: %s", err)
        return None
    why = _bank_matches(bank, settings, extra_meta)
    if why is None:
        logger.info("reusing the prototype bank %s (same checkpoint and settings)", bank_path)
        return bank
    logger.warning("rebuilding the prototype bank %s: %s", bank_path, why)
    return None


def _peak_rss_mib() -> float:
    """Peak resident memory of this process (MiB; NaN where the OS does not say)."""
    try:
        import resource
    except ImportError:  # pragma: no cover - Windows
        return float("nan")
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 2**10


def _load_cam(path: str) -> dict:
    from lpcam_core.io import load_irn_cam

    if not os.path.isfile(path):
        raise FileNotFoundError(f"baseline CAM missing: {path}")
    return load_irn_cam(path)


# --------------------------------------------------------------------------- LPCAM maps


_warned_missing: set[int] = set()


def _lpcam_record(features: list[torch.Tensor], bank: Any, keys: torch.Tensor, size: tuple[int, int]) -> dict:
    """``lpcam_multiscale``; a present class without prototypes gets an all-zero map (warned)."""
    from lpcam_core import lpcam_multiscale

    keys_list = [int(k) for k in keys.tolist()]
    known = [k for k in keys_list if k in bank.foreground]
    if len(known) == len(keys_list):
        return lpcam_multiscale(features, bank, keys_list, size)
    missing = sorted(set(keys_list) - set(known) - _warned_missing)
    if missing:
        _warned_missing.update(missing)
        logger.warning("classes %s have no prototype in the bank: their LPCAM maps are zero", missing)
    rec = lpcam_multiscale(features, bank, known, size) if known else None
    small = ((size[0] - 1) // 4 + 1, (size[1] - 1) // 4 + 1)
    cam = torch.zeros(len(keys_list), *small)
    high = np.zeros((len(keys_list), *size), dtype=np.float32)
    if rec is not None:
        for j, k in enumerate(known):
            i = keys_list.index(k)
            cam[i] = rec["cam"][j]
            high[i] = rec["high_res"][j]
    return {"keys": torch.tensor(keys_list, dtype=torch.int64), "cam": cam, "high_res": high}


def _lpcam_worker(
    process_id: int,
    nprocs: int,
    model: torch.nn.Module,
    dataset: Any,
    bank_path: str,
    out_dir: str,
    device: str | None,
    num_workers: int,
) -> None:
    """LPCAM maps of a share of ``dataset`` into ``out_dir`` (the bank read from ``bank_path``)."""
    from lpcam_core import PrototypeBank

    _worker_setup(process_id, nprocs)
    dev = _device_for(process_id, nprocs, device)
    bank = PrototypeBank.load(bank_path)
    databin = _split(dataset, nprocs, process_id)
    model = model.to(dev)
    progress = _Progress(f"LPCAM -> {out_dir}", len(databin), process_id)
    with torch.no_grad():
        for done, pack in enumerate(_loader(databin, num_workers), 1):
            rec = _lpcam_maps(model, pack, bank, dev)
            _save(os.path.join(out_dir, pack["name"] + ".npy"), rec["keys"], rec["cam"], rec["high_res"])
            progress.update(done)


def _lpcam_maps(model: torch.nn.Module, pack: Mapping[str, Any], bank: Any, dev: torch.device) -> dict:
    """LPCAM record of one MSF item (:func:`_lpcam_record` on its ``stage4`` features at every scale)."""
    keys = torch.nonzero(torch.as_tensor(pack["label"]))[:, 0]
    features = [extract_features(model, img.to(dev, non_blocking=True)) for img in _scales(pack["img"])]
    return _lpcam_record(features, bank, keys, _size(pack["size"]))


def lpcam_pass(
    model: torch.nn.Module,
    dataset: Any,
    bank_path: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    workers: int = 0,
    device: str | None = None,
    num_workers: int = 0,
) -> None:
    """Write LPCAM maps of ``dataset`` (a host MSF dataset) to ``out_dir`` in the IRN format.

    Args:
        model: Host network (features from ``stage4``).
        dataset: ``voc12.dataloader.VOC12ClassificationDatasetMSF``.
        bank_path: Prototype bank file (workers load it by path).
        out_dir: Output directory (created).
        workers: Processes (0/1: in-process; >1: spawned).
        device: Device for in-process work.
        num_workers: DataLoader workers per process.
    """
    os.makedirs(out_dir, exist_ok=True)
    with rewriting_map_dir(out_dir, maps_record("lpcam", model, dataset, bank_path=bank_path)):
        if workers > 1:
            model.cpu()
        _run(_lpcam_worker, workers, (model, dataset, os.fspath(bank_path), os.fspath(out_dir), device, num_workers))


# --------------------------------------------------------------------------- under torchrun


def launched_by_torchrun(environ: Mapping[str, str] | None = None) -> bool:
    """Whether torchrun launched this process (``RANK`` and ``WORLD_SIZE`` set); imports nothing."""
    env = os.environ if environ is None else environ
    return "RANK" in env and "WORLD_SIZE" in env


@contextlib.contextmanager
def torchrun_session(workers: int | None, option: str = "--workers") -> Iterator[Any]:
    """:func:`init_torchrun` for a ``with`` block: yields the context (None without torchrun), closes it on exit."""
    ctx = init_torchrun(workers, option)
    try:
        yield ctx
    finally:
        if ctx is not None:
            ctx.close()


def init_torchrun(workers: int | None, option: str = "--workers") -> Any:
    """The process group of a torchrun launch (:func:`lpcam_core.distributed.init_from_env`), or None.

    ``lpcam_core.distributed`` (and ``torch.distributed``) is imported only under torchrun.

    Args:
        workers: the spawned-workers setting (``settings.workers``).
        option: how the user set it, for the error message.

    Raises:
        ValueError: torchrun launched us and ``workers`` > 1 asks for spawned workers as well.
    """
    if not launched_by_torchrun():
        return None
    if workers is not None and workers > 1:
        raise ValueError(
            f"{option} {workers} (or LPCAM_WORKERS) spawns worker processes, but torchrun already launched "
            f"{os.environ.get('WORLD_SIZE')} process(es): drop {option} (or set it to 0) under torchrun, "
            "or launch without torchrun"
        )
    from lpcam_core import distributed as lpdist

    return lpdist.init_from_env()


def rank_device(ctx: Any, requested: str | None) -> torch.device:
    """This rank's device: ``requested`` (``--device``/``LPCAM_DEVICE``) as is, else ``cuda:LOCAL_RANK`` or CPU."""
    return torch.device(requested) if requested else ctx.device


def image_ids(dataset: Any) -> list[str]:
    """The image ids of a host ``voc12.dataloader`` dataset, in order (as its items name them)."""
    loader = importlib.import_module("voc12.dataloader")
    return [loader.decode_int_filename(n) for n in dataset.img_name_list]


class _PackFeed:
    """A host dataset's items by image id, converted as the DataLoader converts them.

    With ``num_workers`` > 0 a DataLoader prefetches ``expected`` (the ids a sharded loop will
    most likely ask for, in that order); an id asked out of that order is read directly.
    """

    def __init__(self, dataset: Any, ids: Sequence[str], expected: Sequence[str] = (), num_workers: int = 0) -> None:
        from collections import Counter, deque

        from torch.utils.data import Subset

        self.dataset = dataset
        self.index = {name: i for i, name in enumerate(ids)}
        wanted = list(expected) if num_workers > 0 else []
        self.pending = deque(wanted)
        self.count = Counter(wanted)
        self.iter = iter(_loader(Subset(dataset, [self.index[i] for i in wanted]), num_workers)) if wanted else None

    def __call__(self, image_id: str) -> dict:
        from torch.utils.data import default_convert

        if self.count.get(image_id, 0) > 0:
            while self.pending:  # drop prefetched items the loop skipped
                name = self.pending.popleft()
                self.count[name] -= 1
                pack = next(self.iter)
                if name == image_id:
                    return pack
        if image_id not in self.index:
            raise KeyError(f"image {image_id} is not in the dataset's list")
        return default_convert(self.dataset[self.index[image_id]])

    def close(self) -> None:
        self.iter = None
        self.pending.clear()
        self.count.clear()


def sharded_maps(
    dataset: Any,
    compute: Callable[[Mapping[str, Any]], Mapping[str, Any]],
    out_dir: str | os.PathLike,
    *,
    ids: Sequence[str] | None = None,
    read_dirs: Iterable[str | os.PathLike | None] = (),
    overwrite: bool = False,
    num_workers: int = 0,
    desc: str = "maps",
    record: Mapping[str, Any] | None = None,
) -> Any:
    """Collective: one IRN-format file per image, sharded over the torchrun ranks, resumable.

    Args:
        dataset: host MSF dataset.
        compute: item -> ``{"keys", "cam", "high_res"}`` record (under ``torch.no_grad``).
        out_dir: output directory (created).
        ids: the images to write (default: the whole dataset), the same list on every rank.
        read_dirs: directories read from, never written into.
        overwrite: recompute files that exist and load (default: skip them).
        num_workers: DataLoader workers prefetching this rank's images.
        desc: log label.
        record: what makes the maps (:func:`maps_record`): a directory holding maps of another
            record is refused unless ``overwrite`` (:func:`claim_map_dir`); sealed once all exist.

    Returns:
        :class:`lpcam_core.distributed.GenerateStats` (totals over ranks).
    """
    from lpcam_core import distributed as lpdist
    from lpcam_core.io import check_output_dir

    if record is not None:
        check_output_dir(out_dir, read_dirs=read_dirs)
        claim_map_dir_once(out_dir, record, overwrite=overwrite)

    names = image_ids(dataset)
    todo = names if ids is None else [str(i) for i in ids]
    mine = lpdist.shard(todo)
    folder = os.fspath(out_dir)
    expected = mine if overwrite else [i for i in mine if not os.path.isfile(os.path.join(folder, i + ".npy"))]
    feed = _PackFeed(dataset, names, expected, num_workers)

    def one(image_id: str) -> Mapping[str, Any]:
        with torch.no_grad():
            return compute(feed(image_id))

    try:
        stats = lpdist.generate(todo, one, out_dir, writer=lpdist.irn_writer, overwrite=overwrite,
                                read_dirs=read_dirs, progress=sys.stderr.isatty(), desc=desc)
    finally:
        feed.close()
    if record is not None and lpdist.rank() == 0:
        seal_map_dir(out_dir, record)
    return stats


def sharded_baseline_pass(
    model: torch.nn.Module,
    dataset: Any,
    out_dir: str | os.PathLike,
    device: torch.device,
    *,
    extra_weight: torch.Tensor | None = None,
    ids: Sequence[str] | None = None,
    overwrite: bool = False,
    num_workers: int = 0,
) -> Any:
    """:func:`baseline_pass` under torchrun: each rank writes its shard of ``ids`` (default all) on ``device``."""
    model = model.to(device)
    weight = extra_weight.to(device) if extra_weight is not None else None
    # Filling in missing ids of a prototype run's baseline directory: its own record guards it.
    record = maps_record("baseline", model, dataset, extra_weight=extra_weight) if ids is None else None
    return sharded_maps(dataset, lambda pack: _baseline_maps(model, pack, device, weight), out_dir, ids=ids,
                        overwrite=overwrite, num_workers=num_workers, desc=f"baseline CAM -> {out_dir}",
                        record=record)


def sharded_lpcam_pass(
    model: torch.nn.Module,
    dataset: Any,
    bank_path: str | os.PathLike,
    out_dir: str | os.PathLike,
    device: torch.device,
    *,
    read_dirs: Iterable[str | os.PathLike | None] = (),
    overwrite: bool = False,
    num_workers: int = 0,
) -> Any:
    """:func:`lpcam_pass` under torchrun: each rank loads the bank and writes its shard on ``device``."""
    from lpcam_core import PrototypeBank

    bank = PrototypeBank.load(bank_path)
    model = model.to(device)
    record = maps_record("lpcam", model, dataset, bank_path=bank_path)
    return sharded_maps(dataset, lambda pack: _lpcam_maps(model, pack, bank, device), out_dir, read_dirs=read_dirs,
                        overwrite=overwrite, num_workers=num_workers, desc=f"LPCAM -> {out_dir}", record=record)


MAPS_RECORD = "lpcam_maps.json"


def file_fingerprint(path: str | os.PathLike) -> str:
    """sha256 (16 hex digits) of a file's bytes (a prototype bank: rebuilt in place, it changes)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()[:16]


def maps_record(kind: str, model: torch.nn.Module, dataset: Any, *, bank_path: str | os.PathLike | None = None,
                extra_weight: torch.Tensor | None = None, **extra: Any) -> dict[str, Any]:
    """What makes a map directory's files: ``{maps, model, scales[, bank], **extra}`` (fingerprints, not paths)."""
    record: dict[str, Any] = {"maps": kind, "model": model_fingerprint(model, extra_weight), **extra}
    scales = getattr(dataset, "scales", None)
    record["scales"] = None if scales is None else [float(x) for x in scales]
    if bank_path is not None:
        record["bank"] = file_fingerprint(bank_path)
    return record


def claim_map_dir(out_dir: str | os.PathLike, record: Mapping[str, Any], *, overwrite: bool) -> None:
    """Refuse to resume into a directory whose maps another checkpoint, bank or setting made.

    A resumable run keeps the complete files it finds, so after a retraining or a rebuilt bank it
    would silently mix old maps with new ones. ``<out_dir>/lpcam_maps.json`` records what made the
    files: a new directory gets ``record`` now; a directory with the same record resumes; otherwise
    (another record, or map files without one) the run needs ``overwrite``, which removes the record
    until :func:`seal_map_dir` writes the new one once every file is rewritten (so a run killed
    midway leaves no record, and the next run asks for ``--overwrite`` again).

    Raises:
        ValueError: the directory holds maps of another record (naming the differing keys), or map
            files without a record, and ``overwrite`` is False.
    """
    folder = os.fspath(out_dir)
    path = os.path.join(folder, MAPS_RECORD)
    have = _read_record(path)
    if have == dict(record):
        return
    if overwrite:
        if have is not None:
            os.unlink(path)
        return
    if have is not None:
        diff = sorted(k for k in set(record) | set(have) if have.get(k) != record.get(k))
        raise ValueError(
            f"{folder} holds maps made by another {', '.join(diff)} "
            f"({ {k: have.get(k) for k in diff} } != { {k: record.get(k) for k in diff} }); resuming would mix "
            "old and new maps: pass --overwrite to recompute every file, or choose another output directory"
        )
    existing = sum(1 for f in os.listdir(folder) if f.endswith(".npy")) if os.path.isdir(folder) else 0
    if existing:
        raise ValueError(
            f"{folder} holds {existing} map file(s) without {MAPS_RECORD} (an interrupted --overwrite run, or an "
            "older version): nothing says which checkpoint and bank made them; pass --overwrite to recompute "
            "every file, or choose another output directory"
        )
    seal_map_dir(folder, record)


def seal_map_dir(out_dir: str | os.PathLike, record: Mapping[str, Any]) -> None:
    """Write ``<out_dir>/lpcam_maps.json`` (atomically): every map file there was made as ``record`` says."""
    os.makedirs(out_dir, exist_ok=True)
    _write_record(os.path.join(os.fspath(out_dir), MAPS_RECORD), record)


@contextlib.contextmanager
def rewriting_map_dir(out_dir: str | os.PathLike, record: Mapping[str, Any] | None) -> Iterator[None]:
    """A run rewriting every file of ``out_dir``: its old record goes now, ``record`` is sealed on success.

    ``record=None``: nothing is recorded (a baseline directory that keeps files has its own record).
    """
    if record is None:
        yield
        return
    claim_map_dir(out_dir, record, overwrite=True)
    yield
    seal_map_dir(out_dir, record)


def claim_map_dir_once(out_dir: str | os.PathLike, record: Mapping[str, Any], *, overwrite: bool) -> None:
    """Collective: :func:`claim_map_dir` on rank 0; its refusal is raised on every rank (no rank hangs)."""
    from lpcam_core import distributed as lpdist

    error = None
    if lpdist.rank() == 0:
        try:
            claim_map_dir(out_dir, record, overwrite=overwrite)
        except ValueError as exc:
            error = str(exc)
    error = lpdist.broadcast_object(error)
    if error is not None:
        raise ValueError(error)


def check_baseline_record_once(baseline_dir: str | os.PathLike, record: Mapping[str, Any]) -> None:
    """Collective: :func:`check_baseline_record` on rank 0 (which may write the record), then on the others."""
    from lpcam_core import distributed as lpdist

    if lpdist.rank() == 0:
        check_baseline_record(baseline_dir, record)
    lpdist.barrier()
    if lpdist.rank() != 0:
        check_baseline_record(baseline_dir, record)


def missing_indices(dataset: Any, out_dir: str | os.PathLike) -> list[int]:
    """Positions of the items of ``dataset`` (a host dataset) without ``<out_dir>/<id>.npy``."""
    folder = os.fspath(out_dir)
    return [i for i, name in enumerate(image_ids(dataset)) if not os.path.isfile(os.path.join(folder, name + ".npy"))]


def missing_files(dataset: Any, out_dir: str | os.PathLike) -> list[str]:
    """Ids of ``dataset`` without ``<out_dir>/<id>.npy``, decided on rank 0 and sent to every rank."""
    from lpcam_core import distributed as lpdist

    missing = None
    if lpdist.rank() == 0:
        ids = image_ids(dataset)
        missing = [ids[i] for i in missing_indices(dataset, out_dir)]
    return lpdist.broadcast_object(missing)


def build_bank_sharded(
    model: torch.nn.Module,
    proto_dataset: Any,
    baseline_dir: str | os.PathLike,
    settings: AdapterSettings,
    score_weight: torch.Tensor,
    device: torch.device,
    *,
    bank_path: str | os.PathLike | None = None,
    extra_meta: Mapping[str, Any] | None = None,
    num_workers: int = 0,
) -> Any:
    """Collective: :func:`build_bank` under torchrun, through :func:`lpcam_core.distributed.build_prototypes`.

    Rank 0 decides whether the bank at ``bank_path`` is reused (as :func:`build_bank` does) and tells
    the others. Otherwise each rank adds its shard of the clustering plan (every image of the list,
    or COCO's ``images_per_class`` draws), rank 0 clusters and saves; the bank equals
    :func:`build_bank`'s for any world size (``meta["pool_peak_bytes"]`` aside: the most one rank held).

    Returns:
        :class:`lpcam_core.PrototypeBank` (on every rank).
    """
    from lpcam_core import PrototypeBank
    from lpcam_core import distributed as lpdist

    extra_meta = dict(extra_meta or {})
    score_weight = score_weight.detach().float().cpu().reshape(score_weight.shape[0], -1)
    num_classes = score_weight.shape[0]
    bank = _reusable_bank(bank_path, settings, score_weight, extra_meta) if lpdist.rank() == 0 else None
    if lpdist.broadcast_object(bank is not None):
        return bank if bank is not None else PrototypeBank.load(bank_path)

    cfg = settings.lpcam
    model = model.to(device)
    ids = image_ids(proto_dataset)
    labels = {name: torch.nonzero(torch.as_tensor(proto_dataset.label_list[i]))[:, 0].tolist()
              for i, name in enumerate(ids)}
    plan = lpdist.clustering_plan(labels, cfg, num_classes)
    feed = _PackFeed(proto_dataset, ids, [plan[i].image_id for i in lpdist.shard_indices(len(plan))], num_workers)

    def load(image_id: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """stage4 features [C, h, w] (scale 1, no flip), baseline CAMs [n, H, W], keys [n]."""
        pack = feed(image_id)
        record = _load_cam(os.path.join(os.fspath(baseline_dir), image_id + ".npy"))
        with torch.no_grad():
            feats = extract_features(model, torch.as_tensor(pack["img"])[None].to(device))[0].float()
        return feats, torch.as_tensor(np.asarray(record["high_res"])), torch.as_tensor(record["keys"]).long()

    if bank_path is not None and lpdist.rank() == 0:
        os.makedirs(os.path.dirname(os.path.abspath(bank_path)), exist_ok=True)
    try:
        bank = lpdist.build_prototypes(plan, load, num_classes, score_weight.to(device), config=cfg,
                                       out_path=bank_path, device=device, progress=sys.stderr.isatty(), meta=extra_meta,
                                       record_pool_peak=True)
    finally:
        feed.close()
    if lpdist.rank() == 0:
        logger.info("prototype pools: peak %.1f MiB per process of %.1f MiB budget; rank 0 peak RSS %.0f MiB "
                    "(%d items, %d processes)", bank.meta["pool_peak_bytes"] / 2**20,
                    cfg.memory_budget_bytes / 2**20, _peak_rss_mib(), len(plan), lpdist.world_size())
    return bank


# --------------------------------------------------------------------------- the patched pass


def default_bank_path(args: Any, suffix: str = "") -> str:
    """``<work_space or parent of cam_out_dir>/lpcam_bank<suffix>.pt``."""
    workspace = getattr(args, "work_space", None) or os.path.dirname(os.path.normpath(args.cam_out_dir)) or "."
    return os.path.join(workspace, f"lpcam_bank{suffix}.pt")


def default_baseline_dir(args: Any, suffix: str = "") -> str:
    """``<cam_out_dir>_baseline`` (``_recam_baseline`` for ReCAM's make_recam)."""
    return os.path.normpath(args.cam_out_dir) + f"_{suffix + '_' if suffix else ''}baseline"


@dataclass
class PassPlan:
    """Everything a make_cam-like pass needs, resolved from the host's ``args``.

    Attributes:
        cam_model: Network whose baseline CAM splits the pools (and LPCAM=0 maps).
        extra_weight: ReCAM's ``W_recam`` for ``forward2`` (``None``: plain ``forward``).
        feature_model: Network giving the features (usually ``cam_model``).
        score_weight: [20, C] classifier scoring the prototypes.
        tag: Distinguishes the bank and baseline directory of a second pass (``"recam"``).
        meta: Provenance stored in the bank (checked on reuse).
    """

    cam_model: torch.nn.Module
    extra_weight: torch.Tensor | None
    feature_model: torch.nn.Module
    score_weight: torch.Tensor
    tag: str = ""
    meta: dict[str, Any] = field(default_factory=dict)


def _num_loader_workers(args: Any, nprocs: int) -> int:
    return max(0, int(getattr(args, "num_workers", 0)) // max(1, nprocs))


def make_cam_pass(
    args: Any,
    host: HostSpec,
    plan_fn: Callable[[Any, AdapterSettings], PassPlan],
    original_run: Callable[[Any], Any] | None,
    settings: AdapterSettings | None = None,
) -> None:
    """The patched ``run(args)`` of a host's make_cam (or make_recam) step.

    Args:
        args: The host's parsed arguments (``train_list``, ``voc12_root``, ``cam_scales``,
            ``cam_out_dir``, ``num_workers``, weights names).
        host: Host description.
        plan_fn: Builds the models and weights from ``args``.
        original_run: The host's own ``run``, used with ``LPCAM=0`` when GPUs are present.
        settings: Default: :func:`settings_from_env`.
    """
    configure_logging()
    _compat.coerce_args(args)
    settings = settings if settings is not None else settings_from_env()
    nprocs = resolve_workers(settings)
    dataloader = importlib.import_module("voc12.dataloader")
    if not settings.enabled:
        if original_run is not None and settings.workers is None and torch.cuda.device_count() > 0:
            logger.info("LPCAM=0: running %s's own CAM pass", host.name)
            original_run(args)
            return
        logger.info("LPCAM=0: %s's own CAM maps, computed by lpcam's loop (%s)", host.name,
                    "in-process" if nprocs <= 1 else f"{nprocs} workers")
        plan = plan_fn(args, settings)
        dataset = dataloader.VOC12ClassificationDatasetMSF(args.train_list, voc12_root=args.voc12_root, scales=args.cam_scales)
        baseline_pass(plan.cam_model, dataset, args.cam_out_dir, extra_weight=plan.extra_weight,
                      workers=nprocs, device=settings.device, num_workers=_num_loader_workers(args, nprocs))
        return

    t0 = time.perf_counter()
    plan = plan_fn(args, settings)
    baseline_dir = settings.baseline_dir or default_baseline_dir(args, plan.tag)
    bank_path = settings.bank_path or default_bank_path(args, f"_{plan.tag}" if plan.tag else "")
    from lpcam_core.io import check_output_dir

    check_output_dir(args.cam_out_dir, read_dirs=[baseline_dir])
    logger.info("LPCAM swap in %s: baseline CAM %s, bank %s, maps -> %s", host.name, baseline_dir, bank_path, args.cam_out_dir)

    # 1. baseline CAM of the prototype images (missing files only: a baseline is never overwritten)
    check_baseline_record(baseline_dir, {
        "network": args.cam_network,
        "model": model_fingerprint(plan.cam_model, plan.extra_weight),
        "scales": [float(x) for x in args.cam_scales],
    })
    proto_msf = dataloader.VOC12ClassificationDatasetMSF(settings.proto_list, voc12_root=args.voc12_root, scales=args.cam_scales)
    missing = missing_indices(proto_msf, baseline_dir)
    if missing:
        from torch.utils.data import Subset

        logger.info("baseline CAM: %d of %d prototype images to compute", len(missing), len(proto_msf))
        baseline_pass(plan.cam_model, Subset(proto_msf, missing), baseline_dir, extra_weight=plan.extra_weight,
                      skip_existing=True, workers=nprocs, device=settings.device,
                      num_workers=_num_loader_workers(args, nprocs))
    t1 = time.perf_counter()

    # 2. prototype bank
    proto_single = dataloader.VOC12ClassificationDataset(settings.proto_list, voc12_root=args.voc12_root)
    meta = {"host": host.name, "proto_list": settings.proto_list, "num_proto_images": len(proto_single), **plan.meta}
    build_bank(plan.feature_model, proto_single, baseline_dir, settings, plan.score_weight, bank_path=bank_path,
               device=settings.device, extra_meta=meta, num_workers=_num_loader_workers(args, 1))
    t2 = time.perf_counter()

    # 3. LPCAM maps of the host's list
    dataset = dataloader.VOC12ClassificationDatasetMSF(args.train_list, voc12_root=args.voc12_root, scales=args.cam_scales)
    lpcam_pass(plan.feature_model, dataset, bank_path, args.cam_out_dir, workers=nprocs, device=settings.device,
               num_workers=_num_loader_workers(args, nprocs))
    t3 = time.perf_counter()
    logger.info("LPCAM pass done: baseline %.1fs, bank %.1fs, maps %.1fs (%d images)", t1 - t0, t2 - t1, t3 - t2, len(dataset))
    logger.info(recommended_thresholds(host))


def weights_path(args: Any, host: HostSpec) -> str:
    """The CAM checkpoint the host's make_cam loads."""
    return args.cam_weights_name + host.weights_suffix


def cam_plan(host: HostSpec) -> Callable[[Any, AdapterSettings], PassPlan]:
    """Plan of a plain make_cam pass: one checkpoint, its classifier scores the prototypes."""

    def plan(args: Any, settings: AdapterSettings) -> PassPlan:
        path = weights_path(args, host)
        model = load_model(args.cam_network, path)
        return PassPlan(model, None, model, classifier_weight(model), "", {"weights": os.path.abspath(path)})

    return plan

"""Peak memory of the IRN adapter's prototype building on a VOC-train-sized stream, against the memory budget.

Runs :func:`lpcam_adapters.base.prototype_bank` (the function ``import lpcam_adapters.irn`` and
``lpcam irn prototypes`` call: DataLoader, baseline CAM files read from disk, stage-4 features
streamed into :class:`lpcam_core.PrototypeBuilder`, K-means, bank saved) on 1,464 images of
VOC size (512 x 384: a 2048 x 24 x 32 feature grid, as ResNet-50 at stride 16 gives on VOC).

What is simulated, and why: a real ResNet-50 costs seconds per image on a CPU, so the network is a
stand-in with IRN's interface (``stage1..stage4``; one strided 16 x 16 convolution to 2048 channels
and a ReLU: same feature shape, non-negative, image dependent) and the baseline CAMs are smooth
random fields (1-3 classes per image, max-normalised, IRN's ``{keys, high_res}`` files), so that
large parts of every image pass tau = 0.1: a worst case for the pools. The network's own memory is a
constant that the budget does not cover; everything the builder holds is real.

Printed: peak RSS (VmHWM) of the process, the RSS before building (interpreter, torch, network),
peak minus that, the pools' peak bytes against the budget, and what keeping every foreground
feature would take (the release's feature cache)::

    python benchmarks/irn_memory.py --work /tmp/irn_memory [--images 1464] [--budget-gib 2]
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

import numpy as np
import torch

GIB = 2**30


def _status_mib(field: str) -> float:
    with open("/proc/self/status", encoding="ascii") as handle:
        for line in handle:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    raise RuntimeError(f"{field} not in /proc/self/status (Linux only)")


class StandInNet(torch.nn.Module):
    """IRN-shaped network: ``stage4(stage3(stage2(stage1(x))))`` is [B, 2048, H/16, W/16], >= 0."""

    def __init__(self, channels: int, seed: int) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.stage1 = torch.nn.Sequential(torch.nn.Conv2d(3, channels, 16, stride=16), torch.nn.ReLU())
        self.stage2 = self.stage3 = self.stage4 = torch.nn.Identity()


class StreamDataset(torch.utils.data.Dataset):
    """``voc12.dataloader.VOC12ClassificationDataset``'s interface: ``label_list`` and
    ``{"name", "img"}`` items; image ``i`` is seeded noise [3, H, W]."""

    def __init__(self, names: list[str], labels: list[np.ndarray], height: int, width: int, seed: int) -> None:
        self.names, self.label_list, self.size, self.seed = names, labels, (height, width), seed

    def __len__(self) -> int:
        return len(self.names)

    def __getitem__(self, i: int) -> dict:
        rng = np.random.default_rng((self.seed, i))
        img = rng.standard_normal((3, *self.size), dtype=np.float32)
        return {"name": self.names[i], "img": img, "label": torch.from_numpy(self.label_list[i])}


def write_baselines(folder: Path, count: int, height: int, width: int, seed: int) -> tuple[list[str], list[np.ndarray]]:
    """IRN-format baseline CAM files ``<id>.npy`` (skipped when present); returns ids and labels."""
    from tqdm.auto import tqdm

    from lpcam_core.formats import save_irn_cam

    folder.mkdir(parents=True, exist_ok=True)
    names, labels = [], []
    for i in tqdm(range(count), desc="baseline CAM files", leave=False):
        rng = np.random.default_rng((seed, 1, i))
        keys = np.sort(rng.choice(20, size=int(rng.integers(1, 4)), replace=False))
        label = np.zeros(20, np.float32)
        label[keys] = 1
        name = f"2099_{i:06d}"
        names.append(name)
        labels.append(label)
        path = folder / f"{name}.npy"
        if path.is_file():
            continue
        coarse = torch.from_numpy(rng.standard_normal((len(keys), 1, 6, 8)).astype(np.float32))
        maps = torch.nn.functional.interpolate(coarse, size=(height, width), mode="bilinear", align_corners=False)[:, 0]
        maps = torch.relu(maps)
        maps = maps / maps.flatten(1).amax(1).clamp_min(1e-5)[:, None, None]
        save_irn_cam(path, keys, None, maps.numpy(), fsync=False)
    return names, labels


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", required=True, help="folder for the baseline CAM files (about 2 GB) and the bank")
    parser.add_argument("--images", type=int, default=1464, help="images in the stream (VOC train: 1,464)")
    parser.add_argument("--height", type=int, default=384, help="image height (feature grid: height / 16)")
    parser.add_argument("--width", type=int, default=512, help="image width")
    parser.add_argument("--channels", type=int, default=2048, help="feature channels (ResNet-50: 2048)")
    parser.add_argument("--budget-gib", type=float, default=None, help="pools' memory budget (default: the preset's)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", help="write the figures here")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if args.threads:
        torch.set_num_threads(args.threads)

    from lpcam_adapters import base, irn_family
    from lpcam_adapters.settings import HostSettings
    from lpcam_core import LPCAMConfig

    work = Path(args.work)
    names, labels = write_baselines(work / "baseline", args.images, args.height, args.width, args.seed)
    changes = {} if args.budget_gib is None else {"memory_budget_bytes": int(args.budget_gib * GIB)}
    config = LPCAMConfig.preset("voc", **changes)
    settings = HostSettings(lpcam=config, rebuild_bank=True)
    model = StandInNet(args.channels, args.seed).eval()
    weight = torch.randn(20, args.channels, generator=torch.Generator().manual_seed(args.seed))
    dataset = StreamDataset(names, labels, args.height, args.width, args.seed)

    before = _status_mib("VmRSS")
    start = time.perf_counter()
    host = irn_family.IRNFamily("stand-in", "stand_in", model, (1.0,), score_weight=weight)
    data = base.Datasets(pool=dataset, proto_ids=names,
                         labels={n: np.flatnonzero(lab).tolist() for n, lab in zip(names, labels)})
    bank = base.prototype_bank(host, data, str(work / "baseline"), str(work / "bank.pt"), settings, {})
    seconds = time.perf_counter() - start
    peak = _status_mib("VmHWM")
    fh, fw = -(-args.height // 16), -(-args.width // 16)
    every_row = sum(int(lab.sum()) for lab in labels) * fh * fw  # upper bound: every position of every class
    result = {
        "images": args.images,
        "feature_grid": [args.channels, fh, fw],
        "budget_mib": config.memory_budget_bytes / 2**20,
        "pool_peak_mib": bank.meta["pool_peak_bytes"] / 2**20,
        "rss_before_mib": before,
        "peak_rss_mib": peak,
        "peak_above_before_mib": peak - before,
        "keep_everything_gib_upper_bound": every_row * args.channels * 4 / GIB,
        "seconds": seconds,
        "class_prototypes": sum(row["class_prototypes"] for row in bank.summary()),
        "context_prototypes": sum(row["context_prototypes"] for row in bank.summary()),
    }
    lines = [
        "| figure | value |",
        "|---|---|",
        f"| images x feature grid | {args.images:,} x {args.channels} x {fh} x {fw} |",
        f"| pools' peak / budget | {result['pool_peak_mib']:,.0f} MiB / {result['budget_mib']:,.0f} MiB |",
        f"| process RSS before building | {before:,.0f} MiB |",
        f"| process peak RSS | {peak:,.0f} MiB ({peak - before:,.0f} MiB above) |",
        f"| keeping every foreground feature (release cache, upper bound) | {result['keep_everything_gib_upper_bound']:.2f} GiB |",
        f"| prototypes (class / context, 20 classes) | {result['class_prototypes']} / {result['context_prototypes']} |",
        f"| building time (CPU) | {seconds:.0f} s |",
    ]
    sys.stdout.write("\n".join(lines) + "\n")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))
    return 0 if peak - before <= result["budget_mib"] else 1


if __name__ == "__main__":
    raise SystemExit(main())

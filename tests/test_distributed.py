"""lpcam_core.run: sharding, mergeable pools, and 1 vs 2 processes under torchrun (gloo, CPU).

The torchrun runs execute this file as a script (``worker`` mode below): every rank makes its shard's
features from (seed, image index), so no feature file is needed. One 1-process run and one 2-process run
each build two banks (everything fits / the budget forces sampling) and write maps; a third run is killed
mid-write and a fourth resumes it.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from lpcam_core import run as lpdist
from lpcam_core.bank import PrototypeBank
from lpcam_core.classifier import LinearScorer
from lpcam_core.config import LPCAMConfig
from lpcam_core.formats import irn_writer, load_irn_cam
from lpcam_core.io import atomic_open
from lpcam_core.pools import row_priorities, water_level
from lpcam_core.prototypes import PrototypeBuilder


def generate(ids, compute, out, writer=None, **kwargs):
    """The map loop adding the missing files (no directory record): resumable."""
    return lpdist.write_maps(ids, compute, out, writer or irn_writer, mode="fill", progress=False, **kwargs)

NUM_CLASSES = 5
DIM = 64
GRID = (6, 6)
CAM_HW = (12, 12)
NUM_IMAGES = 36
NUM_MAPS = 24
SEED = 11
MAP_SIZE = (24, 20)
KILL_AFTER_ENV = "LPCAM_TEST_KILL_AFTER"  # fault injection of the worker: SIGKILL mid-write after N files
KILL_RANK_ENV = "LPCAM_TEST_KILL_RANK"


# ----------------------------------------------------------------------------- synthetic data


def image_id(i: int) -> str:
    return f"img{i:04d}"


def labels() -> dict[str, list[int]]:
    """image id -> 1 or 2 present classes, in dataset order."""
    out = {}
    for i in range(NUM_IMAGES):
        g = np.random.default_rng([SEED, i])
        out[image_id(i)] = sorted(int(c) for c in g.choice(NUM_CLASSES, 1 + int(g.integers(2)), replace=False))
    return out


def class_directions() -> torch.Tensor:
    return torch.rand(NUM_CLASSES, DIM, generator=torch.Generator().manual_seed(SEED))


def load(image: str, grid: tuple[int, int] = GRID):
    """(features [DIM, h, w], cams [n, H, W], keys [n]) of an image, from (seed, image index) only."""
    i = int(image[3:])
    keys = labels()[image_id(i % NUM_IMAGES)]
    g = torch.Generator().manual_seed(SEED * 100_003 + i * 7 + grid[0])
    cams = torch.rand(len(keys), *CAM_HW, generator=g) ** 2
    small = torch.nn.functional.interpolate(cams[None], size=grid, mode="nearest")[0]
    feats = 0.3 * torch.rand(DIM, *grid, generator=g)
    for cam, key in zip(small, keys):
        feats += class_directions()[key][:, None, None] * cam[None]
    return feats, cams, torch.tensor(keys)


def classifier() -> torch.Tensor:
    return 3 * class_directions() + 0.1 * torch.randn(NUM_CLASSES, DIM, generator=torch.Generator().manual_seed(1))


def fit_config() -> LPCAMConfig:
    return LPCAMConfig.preset("voc", num_clusters=4)


def sampled_config() -> LPCAMConfig:
    """COCO preset, scaled down: 12 draws per class, a budget of 160 rows for about 2,000 offered."""
    return LPCAMConfig.preset("coco", num_clusters=4, images_per_class=12, memory_budget_bytes=160 * DIM * 4)


def compute_map(bank: PrototypeBank):
    from lpcam_core.maps import lpcam_multiscale

    def compute(image: str):
        views = []
        for grid in ((6, 5), (3, 3)):
            f, _, keys = load(image, grid)
            views.append(torch.stack([f, f.flip(-1)]))
        return lpcam_multiscale(views, bank, keys, MAP_SIZE)

    return compute


# ----------------------------------------------------------------------------- torchrun worker


def _killing_writer(kill_after: int):
    count = {"n": 0}

    def write(path: Path, result) -> None:
        if count["n"] == kill_after:  # die in the middle of an atomic write
            with atomic_open(path, "wb") as f:
                f.write(b"\x93NUMPY partial")
                f.flush()
                os.kill(os.getpid(), signal.SIGKILL)
        irn_writer(path, result)
        count["n"] += 1

    return write


def worker(argv: list[str]) -> None:
    """``worker all OUT`` builds both banks and the maps; ``worker maps OUT BANK`` only the maps;
    ``worker dupe OUT``: every rank adds the same image index (an error that must not hang)."""
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(1)
    mode, out = argv[0], Path(argv[1])
    ctx = lpdist.init_from_env()
    assert ctx.world_size == int(os.environ["WORLD_SIZE"]) and ctx.backend == "gloo"
    if mode == "dupe":
        builder = PrototypeBuilder(NUM_CLASSES, fit_config())
        builder.add(*load(image_id(0)), index=0)
        lpdist.build_from_builder(builder, LinearScorer(classifier()), out_path=out / "never.pt", progress=False)
        return
    if mode == "all":
        for name, cfg in (("fit", fit_config()), ("sampled", sampled_config())):
            plan = lpdist.clustering_plan(labels(), cfg, NUM_CLASSES)
            bank = lpdist.build_prototypes(
                plan, load, NUM_CLASSES, classifier(), config=cfg, out_path=out / f"bank_{name}.pt", progress=False
            )
            assert bank.meta["images_seen"] == len(plan)
        bank = PrototypeBank.load(out / "bank_fit.pt")
    else:
        bank = PrototypeBank.load(argv[2])
    kill_after = os.environ.get(KILL_AFTER_ENV)
    writer = None
    if kill_after is not None and ctx.rank == int(os.environ.get(KILL_RANK_ENV, "0")):
        writer = _killing_writer(int(kill_after))
    ids = [image_id(i) for i in range(NUM_MAPS)]
    stats = generate(ids, compute_map(bank), out / "maps", writer)
    (out / f"stats_rank{ctx.rank}.json").write_text(json.dumps(stats.__dict__))
    ctx.close()


def torchrun(nproc: int, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc)]
    cmd += [os.path.abspath(__file__), "worker", *args]
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        full_env.pop(key, None)
    return subprocess.run(cmd, env=full_env, capture_output=True, text=True, timeout=240)


# ----------------------------------------------------------------------------- sharding


@pytest.mark.parametrize("strided", [True, False])
def test_shards_partition_the_list_in_order(strided):
    for n in (0, 1, 5, 7, 16):
        for world in (1, 2, 3, 4):
            parts = [list(lpdist.shard_indices(n, r, world, strided=strided)) for r in range(world)]
            assert sorted(sum(parts, [])) == list(range(n))
            assert all(p == sorted(p) for p in parts)
            assert max(map(len, parts)) - min(map(len, parts)) <= 1
    assert lpdist.shard(list("abcdefg"), 1, 3) == ["b", "e"]
    assert lpdist.shard(list("abcdefg"), 1, 3, strided=False) == ["d", "e"]


def test_shard_rejects_bad_rank():
    with pytest.raises(ValueError, match="rank"):
        lpdist.shard_indices(5, 2, 2)


def test_without_torchrun_everything_is_one_process(monkeypatch):
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(key, raising=False)
    ctx = lpdist.init_from_env()
    assert (ctx.rank, ctx.world_size, ctx.backend, ctx.initialized_here) == (0, 1, None, False)
    assert ctx.is_main and not ctx.is_distributed and not lpdist.is_initialized()
    assert lpdist.shard(list(range(5))) == list(range(5))
    ctx.barrier()
    ctx.close()


def test_partial_torchrun_environment_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.delenv("MASTER_ADDR", raising=False)
    monkeypatch.delenv("MASTER_PORT", raising=False)
    with pytest.raises(RuntimeError, match="MASTER_ADDR"):
        lpdist.init_from_env()


# ----------------------------------------------------------------------------- mergeable pools


def _pools_equal(a: PrototypeBuilder, b: PrototypeBuilder) -> None:
    assert set(a.pools) == set(b.pools)
    for name in a.pools:
        pa, pb = a.pools[name], b.pools[name]
        assert pa.seen == pb.seen, name
        assert torch.equal(pa.rows(), pb.rows()), name
        assert np.array_equal(pa.order_keys(), pb.order_keys()), name


@pytest.mark.parametrize("budget_rows", [None, 300, 60])
def test_shard_builders_merge_into_the_single_builder(budget_rows):
    cfg = fit_config() if budget_rows is None else fit_config().replace(memory_budget_bytes=budget_rows * DIM * 4)
    images = [load(image_id(i)) for i in range(NUM_IMAGES)]
    single = PrototypeBuilder(NUM_CLASSES, cfg)
    for image in images:
        single.add(*image)
    offered = sum(p.seen for p in single.pools.values())
    if budget_rows is None:
        assert sum(p.held for p in single.pools.values()) == offered
    else:
        assert sum(p.held for p in single.pools.values()) <= budget_rows < offered
    rng = np.random.default_rng(budget_rows or 0)
    for world in (2, 3, 5):
        owner = rng.integers(0, world, NUM_IMAGES)  # any split, not only contiguous or strided
        shards = [PrototypeBuilder(NUM_CLASSES, cfg) for _ in range(world)]
        for i, image in enumerate(images):
            shards[owner[i]].add(*image, index=i)
        merged = PrototypeBuilder.merge(shards)
        _pools_equal(single, merged)
        assert merged.images_seen == NUM_IMAGES
    weight = classifier()
    a, b = single.build(weight, progress=False), merged.build(weight, progress=False)
    assert a.meta == b.meta
    for key in a.classes:
        assert torch.equal(a.foreground[key], b.foreground[key]) and torch.equal(a.context[key], b.context[key])


def test_sample_is_the_bottom_k_of_everything_offered():
    """Streaming (in-place eviction, caps lowered over time) ends with the rows of lowest priority."""
    cfg = fit_config().replace(memory_budget_bytes=90 * DIM * 4)
    builder = PrototypeBuilder(NUM_CLASSES, cfg)
    offered: dict = {}
    for i in range(NUM_IMAGES):
        feats, cams, keys = load(image_id(i))
        builder.add(feats, cams, keys, index=3 * i)  # gaps in the indices are fine
        probe = PrototypeBuilder(NUM_CLASSES, cfg)
        probe.add(feats, cams, keys, index=3 * i)
        for name, pool in probe.pools.items():
            offered.setdefault(name, []).append((pool.rows(), pool.order_keys()))
    seen = {name: sum(len(o) for _, o in parts) for name, parts in offered.items()}
    level = builder.level_for(seen.values())
    assert level is not None and builder.pools[("class", 0)].limit == level
    for name, parts in offered.items():
        rows, order = torch.cat([r for r, _ in parts]), np.concatenate([o for _, o in parts])
        pool = builder.pools[name]
        keep = np.sort(np.argsort(row_priorities(pool.salt, order), kind="stable")[: min(level, len(order))])
        assert np.array_equal(pool.order_keys(), order[keep]), name
        assert torch.equal(pool.rows(), rows[torch.from_numpy(keep)]), name


def test_water_level_is_the_largest_common_cap():
    rng = np.random.default_rng(0)
    for _ in range(500):
        held = [int(h) for h in rng.integers(0, 40, int(rng.integers(1, 7)))]
        budget = int(rng.integers(len(held), 120))
        if sum(held) <= budget:
            continue
        best = max(cap for cap in range(1, max(held) + 1) if sum(min(h, cap) for h in held) <= budget)
        assert water_level(held, budget) == best


def test_add_index_must_increase():
    builder = PrototypeBuilder(NUM_CLASSES, fit_config())
    feats, cams, keys = load(image_id(0))
    builder.add(feats, cams, keys, index=4)
    for bad, error in ((4, ValueError), (2, ValueError), (-1, ValueError), (2.0, TypeError), (True, TypeError)):
        with pytest.raises(error, match="index"):
            builder.add(feats, cams, keys, index=bad)
    builder.add(feats, cams, keys)  # default: the next index (5)
    assert builder.pools[("context", int(keys[0]))].order_keys()[-1] >> 32 == 5


def test_merge_refuses_the_same_image_on_two_shards():
    a, b = PrototypeBuilder(NUM_CLASSES, fit_config()), PrototypeBuilder(NUM_CLASSES, fit_config())
    a.add(*load(image_id(0)), index=0)
    b.add(*load(image_id(0)), index=0)
    with pytest.raises(ValueError, match="twice"):
        PrototypeBuilder.merge([a, b])
    with pytest.raises(ValueError, match="config"):
        PrototypeBuilder.merge([a, PrototypeBuilder(NUM_CLASSES, sampled_config())])


# ----------------------------------------------------------------------------- the COCO plan


def test_coco_plan_draws_per_class_with_only_that_class():
    cfg = sampled_config()
    plan = lpdist.clustering_plan(labels(), cfg, NUM_CLASSES)
    assert len(plan) == NUM_CLASSES * cfg.images_per_class
    assert [item.classes[0] for item in plan] == sorted(c for c in range(NUM_CLASSES) for _ in range(12))
    assert all(item.classes[0] in labels()[item.image_id] for item in plan)
    assert len({item.image_id for item in plan}) < len(plan)  # with replacement: repeats happen
    assert plan == lpdist.clustering_plan(labels(), cfg, NUM_CLASSES)  # seeded
    voc = lpdist.clustering_plan(labels(), fit_config(), NUM_CLASSES)
    assert [item.image_id for item in voc] == list(labels()) and all(item.classes is None for item in voc)
    preset = LPCAMConfig.preset("coco")
    assert (preset.num_clusters, preset.fg_threshold, preset.context_high, preset.context_low) == (20, 0.25, 0.5, 0.0)
    assert (preset.images_per_class, preset.seed, preset.fallback_best_center) == (100, 666, True)


def test_select_classes_keeps_the_sampled_class_only():
    feats, cams, keys = load("img0003")
    two = next(i for i in range(NUM_IMAGES) if len(labels()[image_id(i)]) == 2)
    feats, cams, keys = load(image_id(two))
    sub, sub_keys = lpdist.select_classes(cams, keys, [int(keys[1])])
    assert sub_keys.tolist() == [int(keys[1])] and torch.equal(sub[0], cams[1])
    missing = next(c for c in range(NUM_CLASSES) if c not in keys.tolist())
    with pytest.raises(ValueError, match=f"class {missing}"):
        lpdist.select_classes(cams, keys, [missing], image_id="x")


def test_build_prototypes_in_one_process_equals_the_plain_builder(tmp_path):
    cfg = sampled_config()
    plan = lpdist.clustering_plan(labels(), cfg, NUM_CLASSES)
    bank = lpdist.build_prototypes(plan, load, NUM_CLASSES, classifier(), config=cfg, out_path=tmp_path / "b.pt", progress=False)
    builder = PrototypeBuilder(NUM_CLASSES, cfg)
    for item in plan:  # the release: for class c, its sampled images split by the CAM of c only
        feats, cams, keys = load(item.image_id)
        row = keys.tolist().index(item.classes[0])
        builder.add(feats, cams[row : row + 1], keys[row : row + 1])
    assert builder.bytes_held <= cfg.memory_budget_bytes < sum(p.seen for p in builder.pools.values()) * DIM * 4
    plain = builder.build(classifier(), progress=False)
    saved = PrototypeBank.load(tmp_path / "b.pt", classifier_weight=classifier())
    for other in (bank, saved):
        assert other.meta["features_seen"] == plain.meta["features_seen"]
        for key in plain.classes:
            assert torch.equal(other.foreground[key], plain.foreground[key])
            assert torch.equal(other.context[key], plain.context[key])


# ----------------------------------------------------------------------------- generation, one process


def _read_maps(folder: Path) -> dict[str, dict]:
    return {p.name: load_irn_cam(p) for p in sorted(folder.glob("*.npy"))}


def _maps_equal(a: dict[str, dict], b: dict[str, dict]) -> None:
    assert sorted(a) == sorted(b)
    for name in a:
        assert torch.equal(a[name]["keys"], b[name]["keys"]), name
        assert torch.equal(a[name]["cam"], b[name]["cam"]), name
        assert np.array_equal(a[name]["high_res"], b[name]["high_res"]), name


@pytest.fixture(scope="module")
def fit_bank() -> PrototypeBank:
    cfg = fit_config()
    plan = lpdist.clustering_plan(labels(), cfg, NUM_CLASSES)
    return lpdist.build_prototypes(plan, load, NUM_CLASSES, classifier(), config=cfg, progress=False)


def test_generate_resumes_after_a_crash_and_removes_stale_temporaries(tmp_path, fit_bank):
    compute = compute_map(fit_bank)
    ids = [image_id(i) for i in range(8)]
    reference = generate(ids, compute, tmp_path / "ref")
    assert (reference.written, reference.skipped, reference.total) == (8, 0, 8)

    done: list[str] = []

    def crashing(image: str):
        if len(done) == 5:
            raise KeyboardInterrupt  # the job dies here
        done.append(image)
        return compute(image)

    out = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt):
        generate(ids, crashing, out)
    assert len(list(out.glob("*.npy"))) == 5
    (out / f".{ids[6]}.npy.k1ll3d.tmp").write_bytes(b"partial")  # what a SIGKILL mid-write leaves
    (out / ".unrelated.npy.x.tmp").write_bytes(b"x")  # not ours: left alone
    (out / f"{ids[7]}.npy").write_bytes(b"\x93NUMPY truncated")  # incomplete: rewritten
    stats = generate(ids, compute, out)
    assert (stats.skipped, stats.written, stats.removed_temporaries) == (5, 3, 1)
    assert (out / ".unrelated.npy.x.tmp").exists() and not (out / f".{ids[6]}.npy.k1ll3d.tmp").exists()
    _maps_equal(_read_maps(out), _read_maps(tmp_path / "ref"))
    again = generate(ids, compute, out)
    assert (again.written, again.skipped) == (0, 8)


def test_generate_rejects_duplicate_or_path_ids(tmp_path):
    with pytest.raises(ValueError, match="unique"):
        generate(["a", "b", "a"], lambda i: None, tmp_path)
    with pytest.raises(ValueError, match="plain file names"):
        generate(["a/b"], lambda i: None, tmp_path)


# ----------------------------------------------------------------------------- torchrun: 1 vs 2 processes


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Output folders of a 1-process and a 2-process torchrun of ``worker all``."""
    out = {}
    for nproc in (1, 2):
        folder = tmp_path_factory.mktemp(f"nproc{nproc}")
        result = torchrun(nproc, "all", str(folder))
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
        out[nproc] = folder
    return out


@pytest.mark.slow  # torchrun processes: seconds each
@pytest.mark.parametrize("name", ["fit", "sampled"])
def test_one_and_two_processes_give_identical_banks(runs, name):
    a, b = PrototypeBank.load(runs[1] / f"bank_{name}.pt"), PrototypeBank.load(runs[2] / f"bank_{name}.pt")
    assert a.classes == b.classes == list(range(NUM_CLASSES))
    for key in a.classes:
        assert torch.equal(a.foreground[key], b.foreground[key]) and torch.equal(a.context[key], b.context[key])
    assert a.meta == b.meta
    seen, clustered = sum(a.meta["features_seen"].values()), sum(a.meta["features_clustered"].values())
    if name == "fit":
        assert clustered == seen
    else:  # the budget forced sampling, and held
        assert clustered * DIM * 4 <= sampled_config().memory_budget_bytes < seen * DIM * 4
        assert a.meta["config"]["num_clusters"] == 4 and a.meta["config"]["images_per_class"] == 12
    assert (runs[1] / f"bank_{name}.pt").read_bytes() == (runs[2] / f"bank_{name}.pt").read_bytes()


@pytest.mark.slow  # torchrun processes: seconds each
def test_one_and_two_processes_write_identical_map_files(runs):
    maps1, maps2 = _read_maps(runs[1] / "maps"), _read_maps(runs[2] / "maps")
    assert len(maps1) == NUM_MAPS
    _maps_equal(maps1, maps2)
    stats = [json.loads((runs[2] / f"stats_rank{r}.json").read_text()) for r in (0, 1)]
    assert [s["rank_written"] for s in stats] == [NUM_MAPS // 2] * 2 and stats[0]["written"] == NUM_MAPS


@pytest.mark.slow  # torchrun processes: seconds each
def test_killed_generation_restarts_without_loss_or_partial_file(runs, tmp_path):
    bank = str(runs[1] / "bank_fit.pt")
    killed = torchrun(2, "maps", str(tmp_path), bank, env={KILL_AFTER_ENV: "3", KILL_RANK_ENV: "1"})
    assert killed.returncode != 0
    maps = tmp_path / "maps"
    temporaries = list(maps.glob(".*.tmp"))
    assert temporaries  # killed in the middle of a write ...
    finished = sorted(p.name for p in maps.glob("*.npy"))
    assert 3 <= len(finished) < NUM_MAPS
    for name in finished:  # ... yet every file under its final name is complete
        load_irn_cam(maps / name)
    resumed = torchrun(2, "maps", str(tmp_path), bank)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    stats = json.loads((tmp_path / "stats_rank0.json").read_text())
    assert stats["skipped"] == len(finished) and stats["written"] == NUM_MAPS - len(finished)
    assert stats["removed_temporaries"] >= len(temporaries)
    assert not list(maps.glob(".*.tmp"))
    _maps_equal(_read_maps(maps), _read_maps(runs[1] / "maps"))


@pytest.mark.slow  # torchrun processes: seconds each
def test_same_image_on_two_ranks_fails_fast_with_a_clear_error(tmp_path):
    result = torchrun(2, "dupe", str(tmp_path))
    assert result.returncode != 0
    assert "same image index" in result.stdout + result.stderr
    assert not (tmp_path / "never.pt").exists()


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "worker":
        worker(sys.argv[2:])

"""lpcam_adapters.mctformer against the real MCTformer code (V2 at c5db727 and MCTformer+ at HEAD), on CPU.

Needs ``LPCAM_HOSTS`` naming a folder with an ``MCTformer`` clone (xulianuwa/MCTformer, HEAD =
MCTformer+). V2 is read from ``$LPCAM_HOSTS/MCTformer-v2`` when that is a checkout of c5db727
(``git -C MCTformer worktree add ../MCTformer-v2 c5db727``), else exported from the clone's history
with ``git archive c5db727`` into a temporary folder. Nothing is written inside the checkouts.

The host's own ``main.py`` runs (through tests/hosts/mct_launch.py, which imports the adapter as the
one line would and registers a tiny DeiT built from the host's own classes, random init) on a small
synthetic VOC-layout dataset; its own ``evaluation.py`` reads the files.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import importlib
import os
import subprocess
import sys
from functools import partial
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

pytestmark = [
    pytest.mark.hosts,
    pytest.mark.slow,
    pytest.mark.filterwarnings("ignore::FutureWarning", "ignore:Overwriting:UserWarning"),
]

HERE = Path(__file__).resolve().parent
LAUNCH = HERE / "mct_launch.py"
V2_COMMIT = "c5db727"
HOST_MODULES = ("models", "vision_transformer", "engine", "datasets", "utils")
TINY = dict(patch_size=16, embed_dim=48, depth=2, num_heads=2, mlp_ratio=2, qkv_bias=True)
INPUT_SIZE = 128  # MCTformer+ positional grid 8x8: exact bicubic scale factors for the test sizes
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


# --------------------------------------------------------------------------- checkouts


def _hosts_root() -> Path:
    root = os.environ.get("LPCAM_HOSTS")
    if not root:
        pytest.skip("LPCAM_HOSTS is not set: it names the folder holding the MCTformer clone")
    import importlib.util

    missing = [m for m in ("timm", "cv2", "sklearn", "pandas") if importlib.util.find_spec(m) is None]
    if missing:
        pytest.skip(f"MCTformer's code imports {', '.join(missing)}: pip install -e '.[test,hosts,mctformer,clip-es]' "
                    "(extra `mctformer`; `make test` installs it)")
    clone = Path(root) / "MCTformer"
    if not (clone / "main.py").is_file():
        pytest.skip(f"no MCTformer clone at {clone} (git clone https://github.com/xulianuwa/MCTformer)")
    return Path(root)


def _git(path: Path, *args: str) -> str:
    return subprocess.run(["git", "-C", str(path), *args], check=True, capture_output=True, text=True).stdout


def _tree_digest(path: Path) -> str:
    digest = hashlib.sha256()
    for p in sorted(path.rglob("*")):
        if p.is_file() and ".git" not in p.parts and "__pycache__" not in p.parts:
            digest.update(str(p.relative_to(path)).encode())
            digest.update(p.read_bytes())
    return digest.hexdigest()


@pytest.fixture(scope="module", params=["v2", "plus"])
def host(request, tmp_path_factory):
    """(ref, checkout path, is_git_checkout) for V2 (c5db727) and MCTformer+ (HEAD)."""
    return _checkout(request.param, tmp_path_factory)


@pytest.fixture(scope="module")
def v2_host(tmp_path_factory):
    """The V2 checkout alone (MCTformer V1's model class lives there)."""
    return _checkout("v2", tmp_path_factory)


def _checkout(ref, tmp_path_factory):
    root = _hosts_root()
    clone = root / "MCTformer"
    if ref == "plus":
        if "class MCTformerPlus" not in (clone / "models.py").read_text():
            pytest.skip(f"{clone} is not at MCTformer+ (HEAD): its models.py has no MCTformerPlus")
        return "plus", clone, True
    worktree = root / "MCTformer-v2"
    if (worktree / "models.py").is_file() and "class MCTformerV2" in (worktree / "models.py").read_text():
        return "v2", worktree, True
    try:
        _git(clone, "cat-file", "-e", f"{V2_COMMIT}^{{commit}}")
    except (subprocess.CalledProcessError, FileNotFoundError):
        pytest.skip(f"no MCTformer-v2 checkout and commit {V2_COMMIT} is not in {clone}'s history")
    out = tmp_path_factory.mktemp("MCTformer-v2")
    archive = subprocess.run(["git", "-C", str(clone), "archive", V2_COMMIT], check=True, capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(out)], input=archive, check=True)
    return "v2", out, False


# --------------------------------------------------------------------------- data


@pytest.fixture(scope="module")
def voc(tmp_path_factory):
    """A synthetic VOC-layout dataset (20 classes, 96x96 and 80x96 images) and MCTformer's lists."""
    from PIL import Image

    from lpcam_core.demo.synthetic import SyntheticConfig, write_voc

    root = tmp_path_factory.mktemp("mct_voc")
    cfg = SyntheticConfig(num_classes=20, image_size=96, num_images=16, val_fraction=0.25, seed=0)
    data = write_voc(cfg, root / "VOC2012", progress=False)
    train = (data / "ImageSets/Segmentation/train.txt").read_text().split()
    val = (data / "ImageSets/Segmentation/val.txt").read_text().split()
    for i in train[::3]:  # non-square images exercise the host's w != h reshape
        for sub, ext, kw in (("JPEGImages", ".jpg", {"quality": 95}), ("SegmentationClass", ".png", {})):
            p = data / sub / (i + ext)
            with Image.open(p) as im:
                im.load()
                cropped = im.crop((0, 0, 80, 96))
            cropped.save(p, **kw)
    work = root / "work"  # the host reads voc12/cls_labels.npy relative to the working directory
    (work / "voc12").mkdir(parents=True)
    labels = {}
    for i in train + val:
        mask = np.array(Image.open(data / "SegmentationClass" / (i + ".png")))
        vec = np.zeros(20, np.float32)
        vec[[c - 1 for c in np.unique(mask) if 0 < c < 255]] = 1
        labels[i] = vec
    np.save(work / "voc12" / "cls_labels.npy", labels, allow_pickle=True)
    lists = root / "lists"
    lists.mkdir()
    (lists / "train_aug_id.txt").write_text("".join(f"{i}\n" for i in train))
    (lists / "train_id.txt").write_text("".join(f"{i}\n" for i in train[:8]))  # the prototype list
    (lists / "val_id.txt").write_text("".join(f"{i}\n" for i in val))
    return dict(root=root, data=data, work=work, lists=lists, train=train, proto=train[:8], labels=labels)


def _env(extra=None) -> dict:
    """The test's environment without LPCAM settings; no bytecode is written into the checkouts."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("LPCAM")}
    env.update(PYTHONDONTWRITEBYTECODE="1", **(extra or {}))
    return env


def _launch(host_dir: Path, args, *, cwd: Path, env=None, adapter: str = "full") -> str:
    cmd = [sys.executable, str(LAUNCH), str(host_dir), "--adapter", adapter, "--input-size", str(INPUT_SIZE), "--", *args]
    proc = subprocess.run(cmd, cwd=cwd, env=_env(env), capture_output=True, text=True, timeout=900)
    if proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-6000:]}")
    return proc.stdout + proc.stderr


def _gen_args(ref: str, voc, ckpt: Path, out: Path, *, attention_type="fused", scales=("1.0", "0.75"), refine=True):
    args = ["--model", "lpcam_tiny_MCTformerV2", "--data-set", "VOC12MS", "--img-list", str(voc["lists"]),
            "--data-path", str(voc["data"]), "--resume", str(ckpt), "--gen_attention_maps",
            "--attention-type", attention_type, "--layer-index", "2", "--scales", *scales,
            "--cam-npy-dir", str(out), "--device", "cpu", "--num_workers", "0"]
    if ref == "v2":  # c5db727: store_true flags, no files unless --visualize-cls-attn
        args += ["--visualize-cls-attn"] + (["--patch-attn-refine"] if refine else [])
    else:  # HEAD: type=bool flags (any non-empty value is True), PNGs always written
        args += ["--input-size", str(INPUT_SIZE), "--attention-dir", str(out) + "_png"]
        if not refine:
            args += ["--patch-attn-refine", ""]
    return args


@pytest.fixture(scope="module")
def runs(host, voc, tmp_path_factory):
    """The host's generation: reference (shims only), LPCAM=0, LPCAM (bank built), patchcam LPCAM."""
    ref, path, is_git = host
    before = _git(path, "status", "--porcelain") if is_git else _tree_digest(path)
    out = tmp_path_factory.mktemp(f"mct_runs_{ref}")
    ckpt = out / "tiny.pth"
    subprocess.run([sys.executable, str(LAUNCH), str(path), "--input-size", str(INPUT_SIZE), "--make-checkpoint", str(ckpt)],
                   cwd=voc["work"], env=_env(), check=True, capture_output=True)
    logs = {}
    logs["reference"] = _launch(path, _gen_args(ref, voc, ckpt, out / "reference"), cwd=voc["work"], adapter="shims")
    logs["off"] = _launch(path, _gen_args(ref, voc, ckpt, out / "off"), cwd=voc["work"], env={"LPCAM": "0"})
    logs["lpcam"] = _launch(path, _gen_args(ref, voc, ckpt, out / "lpcam"), cwd=voc["work"])
    logs["patchcam"] = _launch(
        path, _gen_args(ref, voc, ckpt, out / "patchcam", attention_type="patchcam", scales=("1.0",), refine=False),
        cwd=voc["work"], env={"LPCAM_BUILD": "never"},
    )
    after = _git(path, "status", "--porcelain") if is_git else _tree_digest(path)
    return dict(ref=ref, path=path, out=out, ckpt=ckpt, logs=logs, before=before, after=after)


def _load(folder: Path, image_id: str) -> dict:
    from lpcam_core.formats import load_mctformer_cam

    return load_mctformer_cam(folder / f"{image_id}.npy")


# --------------------------------------------------------------------------- in-process host


@contextlib.contextmanager
def host_modules(path: Path):
    """Import the host's ``models`` (patched by the adapter) and undo it all afterwards."""
    from timm.models import _registry

    import lpcam_adapters.mctformer  # noqa: F401 - registers the patches before the host's import

    saved_registry = {k: copy.deepcopy(v) for k, v in vars(_registry).items()
                      if not k.startswith("__") and isinstance(v, (dict, set))}
    saved = {n: sys.modules.pop(n) for n in HOST_MODULES if n in sys.modules}
    sys.path.insert(0, str(path))
    no_bytecode, sys.dont_write_bytecode = sys.dont_write_bytecode, True  # nothing written into the checkout
    try:
        yield importlib.import_module("models")
    finally:
        sys.dont_write_bytecode = no_bytecode
        for n in HOST_MODULES:
            sys.modules.pop(n, None)
        sys.modules.update(saved)
        sys.path.remove(str(path))
        for k, v in saved_registry.items():
            current = getattr(_registry, k)
            current.clear()
            current.update(v)


def _tiny(models, seed: int = 0):
    import torch.nn as nn

    torch.manual_seed(seed)
    if hasattr(models, "MCTformerPlus"):
        model = models.MCTformerPlus(input_size=INPUT_SIZE, num_classes=20, norm_layer=partial(nn.LayerNorm, eps=1e-6), **TINY)
    else:
        model = models.MCTformerV2(num_classes=20, norm_layer=partial(nn.LayerNorm, eps=1e-6), **TINY)
    return model.eval()


def _random_bank(num_classes: int = 20, dim: int = 48, seed: int = 0):
    from lpcam_core import PrototypeBank

    g = torch.Generator().manual_seed(seed)
    fg = {c: torch.randn(3, dim, generator=g) for c in range(num_classes)}
    ctx = {c: torch.randn(2, dim, generator=g) for c in range(num_classes)}
    return PrototypeBank(fg, ctx, {"num_classes": num_classes})


# --------------------------------------------------------------------------- tests: generation runs


def test_host_checkout_unmodified(runs):
    assert runs["before"] == runs["after"]


def test_lpcam_off_reproduces_the_hosts_maps(runs, voc):
    for i in voc["train"]:
        ref, off = _load(runs["out"] / "reference", i), _load(runs["out"] / "off", i)
        assert ref.keys() == off.keys()
        for k in ref:
            assert ref[k].dtype == off[k].dtype and np.array_equal(ref[k], off[k]), (i, k)


def test_lpcam_run_builds_bank_from_unswapped_baseline(runs, voc):
    from lpcam_core import PrototypeBank

    baseline = runs["out"] / "lpcam_baseline"
    assert sorted(p.stem for p in baseline.glob("*.npy")) == sorted(voc["proto"])
    for i in voc["proto"]:  # the first pass is the host's own, unswapped generation
        ref, base = _load(runs["out"] / "reference", i), _load(baseline, i)
        assert all(np.array_equal(ref[k], base[k]) for k in ref)
    bank = PrototypeBank.load(runs["ckpt"].with_suffix(".lpcam_bank.pt"))
    assert bank.feature_dim == 48 and bank.num_classes == 20 and bank.meta["images_seen"] == len(voc["proto"])
    assert bank.meta["model"] == ("MCTformerPlus" if runs["ref"] == "plus" else "MCTformerV2")
    assert "LPCAM in place of PatchCAM" in runs["logs"]["lpcam"]
    assert "using the prototype bank" in runs["logs"]["patchcam"]


def test_lpcam_files_in_the_hosts_format(runs, voc):
    changed = 0
    for i in voc["train"]:
        lp, ref = _load(runs["out"] / "lpcam", i), _load(runs["out"] / "reference", i)
        assert sorted(lp) == sorted(ref) == sorted(np.nonzero(voc["labels"][i])[0].tolist())
        for k in lp:
            assert lp[k].shape == ref[k].shape and lp[k].dtype == ref[k].dtype
            assert np.isfinite(lp[k]).all() and lp[k].min() >= 0 and lp[k].max() <= 1
            changed += not np.array_equal(lp[k], ref[k])
    assert changed > 0


def test_hosts_evaluation_accepts_lpcam_files(runs, voc, tmp_path):
    from lpcam_core.eval.metrics import evaluate_from_arrays

    folder = runs["out"] / "lpcam"
    cmd = [sys.executable, str(runs["path"] / "evaluation.py"), "--list", str(voc["lists"] / "train_aug_id.txt"),
           "--gt_dir", str(voc["data"] / "SegmentationClass"), "--logfile", str(tmp_path / "evallog.txt"),
           "--type", "npy", "--predict_dir", str(folder), "--comment", "lpcam", "--t", "0.4"]
    proc = subprocess.run(cmd, cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    host_miou = float(proc.stdout.split("mIoU:")[-1].split("%")[0])
    curve = subprocess.run([*cmd[:-2], "--curve", "True", "--start", "30", "--end", "33"], cwd=tmp_path, env=_env(),
                           capture_output=True, text=True, timeout=600)
    assert curve.returncode == 0 and "Best background score" in curve.stdout, curve.stderr[-3000:]
    # ours on the same files: the host averages IoU over all 21 classes (absent ones count 0)
    from lpcam_core.io import load_label_png

    samples = []
    for i in voc["train"]:
        maps = _load(folder, i)
        keys = sorted(maps)
        gt = load_label_png(voc["data"] / "SegmentationClass" / f"{i}.png")
        samples.append((np.array(keys), np.stack([maps[k] for k in keys]), gt))
    ours = evaluate_from_arrays(samples, 0.4, num_classes=21)
    assert abs(100 * np.nan_to_num(ours["iou"]).mean() - host_miou) < 1e-2


def test_lpcam_maps_equal_core_on_the_same_tokens(runs, voc):
    """patchcam, one scale, no refinement: the file = min-max(LPCAM(img) + flip(LPCAM(flip img))), resized."""
    from PIL import Image

    from lpcam_adapters import mctformer as mct
    from lpcam_core import PrototypeBank, lpcam_map

    bank = PrototypeBank.load(runs["ckpt"].with_suffix(".lpcam_bank.pt"))
    with host_modules(runs["path"]) as models:
        model = _tiny(models)
        model.load_state_dict(torch.load(runs["ckpt"], map_location="cpu")["model"])
        for i in voc["train"][:4]:
            with Image.open(voc["data"] / "JPEGImages" / f"{i}.jpg") as im:
                rgb = np.asarray(im.convert("RGB"), dtype=np.float32) / 255.0
            x = torch.from_numpy(((rgb - IMAGENET_MEAN) / IMAGENET_STD).astype(np.float32)).permute(2, 0, 1)[None]
            h, w = x.shape[2:]
            target = torch.from_numpy(voc["labels"][i]).view(20, 1, 1)
            total = 0
            for view, back in ((x, False), (x.flip(-1), True)):
                maps = torch.zeros(1, 20, *mct.patch_tokens(model, view).shape[2:])
                maps[:, bank.classes] = lpcam_map(mct.patch_tokens(model, view), bank, bank.classes).clamp_min(0)
                up = F.interpolate(maps, size=(h, w), mode="bilinear", align_corners=False)[0] * target
                total = total + (up.flip(-1) if back else up)
            saved = _load(runs["out"] / "patchcam", i)
            for k, m in saved.items():
                expected = (total[k] - total[k].min()) / (total[k].max() - total[k].min() + 1e-8)
                np.testing.assert_allclose(m, expected.numpy(), atol=2e-5, err_msg=f"{i} class {k}")


# --------------------------------------------------------------------------- tests: in-process


def test_timm_entrypoints_build_on_current_timm(host):
    from timm.models import create_model

    ref, path, _ = host
    names = ["deit_small_MCTformerPlus"] if ref == "plus" else ["deit_small_MCTformerV2_patch16_224",
                                                               "deit_small_MCTformerV1_patch16_224"]
    with host_modules(path):
        for name in names:
            model = create_model(name, pretrained=False, num_classes=20, drop_rate=0.0, drop_path_rate=0.1,
                                 drop_block_rate=None)
            assert model.num_classes == 20 and model.embed_dim == 384


def test_swap_on_host_model_equals_core(host):
    from lpcam_adapters import mctformer as mct
    from lpcam_core import lpcam_map

    ref, path, _ = host
    bank = _random_bank()
    with host_modules(path) as models:
        model = _tiny(models)
        x = torch.randn(1, 3, 96, 80)
        with torch.no_grad():
            base = model(x, return_att=True, n_layers=2, attention_type="fused")
            unwrapped = type(model).forward.__wrapped__(model, x, return_att=True, n_layers=2, attention_type="fused")
            assert all(torch.equal(a, b) for a, b in zip(base, unwrapped))
            tokens = mct.patch_tokens(model, x)
            _, patch, *_ = model.forward_features(x)
            assert torch.equal(tokens, patch.reshape(1, 6, 5, 48).permute(0, 3, 1, 2))  # [B, C, H/16, W/16]
            expected = lpcam_map(tokens, bank, range(20)).clamp_min(0)
            with mct.swap(model, bank):
                logits, patchcam, attn = model(x, return_att=True, n_layers=2, attention_type="patchcam")
                _, fused, _ = model(x, return_att=True, n_layers=2, attention_type="fused")
                _, mtatt, _ = model(x, return_att=True, n_layers=2, attention_type="mct")
            assert patchcam.dtype == torch.float32 and torch.equal(patchcam, expected)
            product = mtatt * expected
            torch.testing.assert_close(fused, product.sqrt() if ref == "plus" else product)
            assert torch.equal(logits, base[0]) and torch.equal(attn, base[2])
            again = model(x, return_att=True, n_layers=2, attention_type="fused")
            assert all(torch.equal(a, b) for a, b in zip(again, base))


def test_feature_level_flip_on_host_model(host):
    from lpcam_adapters import mctformer as mct
    from lpcam_core import lpcam_map

    _, path, _ = host
    bank = _random_bank(seed=1)
    with host_modules(path) as models, torch.no_grad():
        model = _tiny(models)
        x = torch.randn(1, 3, 80, 96)
        fused = mct.patch_tokens(model, x) + mct.patch_tokens(model, x.flip(-1)).flip(-1)
        expected = lpcam_map(fused, bank, range(20)).clamp_min(0)
        with mct.swap(model, bank, flip="feature"):
            _, v0, _ = model(x, return_att=True, n_layers=2, attention_type="patchcam")
            _, v1, _ = model(x.flip(-1), return_att=True, n_layers=2, attention_type="patchcam")
        torch.testing.assert_close(v0, expected)
        torch.testing.assert_close(v1, expected.flip(-1))


def test_v1_is_refused(v2_host):
    import torch.nn as nn

    from lpcam_adapters import mctformer as mct

    _, path, _ = v2_host
    with host_modules(path) as models:
        v1 = models.MCTformerV1(num_classes=20, norm_layer=partial(nn.LayerNorm, eps=1e-6), **TINY)
        with pytest.raises(mct.UnsupportedModelError, match="patch classifier"):
            mct.generate(lambda *a: None, [], v1, "cpu", object(), mct.settings_for())


def test_patched_main_runs_with_the_one_line(host, voc, tmp_path):
    """`lpcam mctformer patch` on a copy of the checkout, then the host's main.py as users run it."""
    from lpcam_adapters import mctformer as mct
    from lpcam_adapters.cli import patch_entry_script

    def apply_patch(folder, **kw):
        return patch_entry_script(folder, mct.INFO, **kw)

    ref, path, _ = host
    copy_dir = tmp_path / "host"
    archive = subprocess.run(["git", "-C", str(path), "archive", "HEAD"], capture_output=True)
    if archive.returncode == 0:
        copy_dir.mkdir()
        subprocess.run(["tar", "-x", "-C", str(copy_dir)], input=archive.stdout, check=True)
    else:  # an exported (non-git) V2 tree
        import shutil

        shutil.copytree(path, copy_dir)
    original_main = (copy_dir / "main.py").read_text()
    assert apply_patch(copy_dir, check=True) == "would be applied"
    assert apply_patch(copy_dir) == "applied" and apply_patch(copy_dir) == "already applied"
    assert (copy_dir / "main.py").read_text().startswith("import lpcam_adapters.mctformer")
    model = "deit_small_MCTformerPlus" if ref == "plus" else "deit_small_MCTformerV2_patch16_224"
    ckpt = tmp_path / "deit_s.pth"
    size = "448" if ref == "plus" else "224"  # main.py's --input-size (MCTformer+: its positional grid)
    subprocess.run([sys.executable, str(LAUNCH), str(copy_dir), "--make-checkpoint", str(ckpt), "--model", model,
                    "--input-size", size], cwd=voc["work"], env=_env(), check=True, capture_output=True)
    args = _gen_args(ref, voc, ckpt, tmp_path / "npy", scales=("1.0",))
    args[args.index("lpcam_tiny_MCTformerV2")] = model
    if ref == "plus":
        args[args.index("--input-size") + 1] = size
    proc = subprocess.run([sys.executable, str(copy_dir / "main.py"), *args], cwd=voc["work"], env=_env(),
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "LPCAM in place of PatchCAM" in proc.stdout
    assert ckpt.with_suffix(".lpcam_bank.pt").is_file()
    assert sorted(p.stem for p in (tmp_path / "npy").glob("*.npy")) == sorted(voc["train"])
    assert apply_patch(copy_dir, revert=True) == "reverted"
    assert (copy_dir / "main.py").read_text() == original_main


def test_try_runs_the_hosts_pipeline(tmp_path, hostkit):
    """`lpcam mctformer try <checkout>`: main.py trains from random weights, generates with LPCAM=0 and with the
    swap, evaluation.py scores both, on the CPU, offline; the checkout stays untouched."""
    root = _hosts_root()
    clone = root / "MCTformer"
    before = _git(clone, "status", "--porcelain")
    stdout, rows = hostkit.run_try("mctformer", clone, tmp_path / "try", _env(), "--images", "8", "--size", "64",
                                   "--epochs", "1")
    assert all(r.split("|")[2].strip() != "?" for r in rows), stdout
    work = tmp_path / "try" / "work"
    assert (work / "sess" / "checkpoint.lpcam_bank.pt").is_file()
    own, swapped = sorted(os.listdir(work / "result" / "cam_npy_own")), sorted(os.listdir(work / "result" / "cam_npy_lpcam"))
    assert own == swapped and len(own) == 8
    assert _git(clone, "status", "--porcelain") == before

"""Modern-stack shims of lpcam_adapters.compat, against stand-in host modules (no real host)."""

from __future__ import annotations

import importlib
import sys
import textwrap
import types

import numpy as np
import pytest
import torch
from PIL import Image

from lpcam_adapters import compat, hooks


@pytest.fixture(autouse=True)
def isolated_hooks():
    with hooks.scoped():
        yield


@pytest.fixture()
def fake_irn(tmp_path, monkeypatch):
    """Namespace packages ``voc12``, ``misc``, ``net`` like IRN's, written to tmp_path (cwd)."""
    (tmp_path / "voc12").mkdir()
    (tmp_path / "voc12" / "dataloader.py").write_text(
        textwrap.dedent(
            """
            import numpy as np

            def decode_int_filename(int_filename):
                s = str(int(int_filename))
                return s[:4] + '_' + s[4:]

            def load_img_name_list(dataset_path):
                return np.loadtxt(dataset_path, dtype=np.int32)

            def single_obj_len(labels):
                return np.sum(labels).astype(np.int)
            """
        )
    )
    (tmp_path / "misc").mkdir()
    (tmp_path / "misc" / "pyutils.py").write_text(
        "import numpy as np\n\ndef to_one_hot(x, maximum_val=None, dtype=np.int):\n    return dtype\n"
    )
    (tmp_path / "net").mkdir()
    (tmp_path / "net" / "resnet50.py").write_text(
        "CALLS = []\n\ndef resnet50(pretrained=True, **kwargs):\n    CALLS.append((pretrained, kwargs))\n    return pretrained\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.chdir(tmp_path)
    importlib.invalidate_caches()
    yield tmp_path
    for name in list(sys.modules):
        if name.split(".")[0] in ("voc12", "misc", "net"):
            del sys.modules[name]


def test_load_img_name_list_parses_voc_ids(tmp_path):
    lst = tmp_path / "train.txt"
    lst.write_text("2007_000032\n\n2012_004331\n")
    ids = compat.load_img_name_list(lst)
    assert ids.dtype == np.int32 and ids.tolist() == [2007000032, 2012004331]
    # numpy < 1.23 parsed with int(): same values.
    assert ids.tolist() == [int("2007_000032"), int("2012_004331")]
    lst.write_text("2007_000032\n")
    assert compat.load_img_name_list(lst).shape == (1,)  # np.loadtxt gave a 0-d array here
    lst.write_text("2007_000032 2007_000033\n2007_000039 2007_000040\n")
    assert compat.load_img_name_list(lst).shape == (2, 2)
    lst.write_text("2007_000032\nnot_an_id\n")
    with pytest.raises(ValueError, match=r"train.txt:2: 'not_an_id'"):
        compat.load_img_name_list(lst)
    with pytest.raises(FileNotFoundError):
        compat.load_img_name_list(tmp_path / "missing.txt")


def test_dataloader_patches(fake_irn):
    (fake_irn / "ids.txt").write_text("2007_000032\n2007_000039\n")
    compat.register_irn_family()
    loader = importlib.import_module("voc12.dataloader")
    ids = loader.load_img_name_list("ids.txt")
    assert [loader.decode_int_filename(i) for i in ids] == ["2007_000032", "2007_000039"]
    assert loader.decode_int_filename("2007_000032") == "2007_000032"
    assert loader.decode_int_filename("img_7") == "img_7"  # strings pass through
    assert loader.single_obj_len(np.ones(3)) == 3  # np.int inside the host module
    assert not hasattr(np, "int"), "numpy itself must stay unchanged"
    assert set(hooks.applied_patches(loader)) == {"load_img_name_list", "decode_int_filename", "np", "np_safe_load"}
    assert loader.np.load is compat.safe_np_load and np.load is not compat.safe_np_load  # the module's numpy only


def test_numpy_aliases_during_module_execution(fake_irn):
    compat.register_irn_family()
    pyutils = importlib.import_module("misc.pyutils")  # default argument np.int evaluated at import
    assert pyutils.to_one_hot(None) is int
    assert "int" not in vars(np)
    alias = compat.numpy_with_aliases()
    assert alias.int is int and alias.zeros is np.zeros and alias.bool is np.bool


def test_resnet50_skips_download_when_checkpoint_follows(fake_irn, monkeypatch):
    monkeypatch.delenv(compat.ENV_NO_PRETRAINED, raising=False)
    compat.register_irn_family()
    resnet = importlib.import_module("net.resnet50")
    assert resnet.resnet50(pretrained=True, strides=(2, 2, 2, 1)) is True
    with compat.checkpoint_follows():
        assert resnet.resnet50(pretrained=True, strides=(2, 2, 2, 1)) is False
    assert resnet.CALLS[-1] == (False, {"strides": (2, 2, 2, 1)})
    monkeypatch.setenv(compat.ENV_NO_PRETRAINED, "1")
    assert resnet.resnet50() is False


def test_torch_proxy_defaults_map_location_to_cpu(tmp_path, monkeypatch):
    seen = {}

    def fake_load(f, map_location=None, **kwargs):
        seen["map_location"] = map_location
        return "loaded"

    monkeypatch.setattr(torch, "load", fake_load)
    proxy = compat.torch_with_cpu_load()
    assert proxy.load("x") == "loaded" and seen["map_location"] == "cpu"
    proxy.load("x", map_location="cuda:1")
    assert seen["map_location"] == "cuda:1"
    assert proxy.nn is torch.nn and proxy.Tensor is torch.Tensor


def _write_voc(root, labels):
    (root / "ImageSets" / "Segmentation").mkdir(parents=True)
    (root / "JPEGImages").mkdir()
    (root / "SegmentationClass").mkdir()
    palette = [0] * 768
    ids = []
    for i, label in enumerate(labels):
        image_id = f"2007_{i:06d}"
        ids.append(image_id)
        Image.fromarray(np.full(label.shape + (3,), 100, np.uint8)).save(root / "JPEGImages" / f"{image_id}.jpg")
        png = Image.fromarray(label.astype(np.uint8), mode="P")
        png.putpalette(palette)
        png.save(root / "SegmentationClass" / f"{image_id}.png")
    (root / "ImageSets" / "Segmentation" / "train.txt").write_text("\n".join(ids) + "\n")
    return ids


def _chainercv_confusion(pred_labels, gt_labels):
    """chainercv 0.13's calc_semantic_segmentation_confusion, re-stated as the reference."""
    n_class = 0
    confusion = np.zeros((n_class, n_class), dtype=np.int64)
    for pred_label, gt_label in zip(pred_labels, gt_labels):
        pred_label, gt_label = pred_label.flatten(), gt_label.flatten()
        lb_max = np.max((pred_label, gt_label))
        if lb_max >= n_class:
            expanded = np.zeros((lb_max + 1, lb_max + 1), dtype=np.int64)
            expanded[0:n_class, 0:n_class] = confusion
            n_class, confusion = lb_max + 1, expanded
        mask = gt_label >= 0
        confusion += np.bincount(n_class * gt_label[mask].astype(int) + pred_label[mask],
                                 minlength=n_class**2).reshape((n_class, n_class))
    return confusion


def test_chainercv_stand_in(tmp_path):
    rng = np.random.default_rng(0)
    labels = [rng.integers(0, 4, (6, 7)) for _ in range(3)]
    labels[0][0, :3] = 255
    ids = _write_voc(tmp_path, labels)
    compat.register_irn_family()
    if importlib.util.find_spec("chainercv") is not None and not getattr(sys.modules.get("chainercv"), "__lpcam_fallback__", True):
        pytest.skip("the real chainercv is installed: the stand-in is not used")
    import chainercv
    from chainercv.datasets import VOCSemanticSegmentationDataset
    from chainercv.evaluations import calc_semantic_segmentation_confusion

    assert chainercv.__lpcam_fallback__ and chainercv.evaluations.calc_semantic_segmentation_confusion is calc_semantic_segmentation_confusion
    dataset = VOCSemanticSegmentationDataset(split="train", data_dir=str(tmp_path))
    assert dataset.ids == ids and len(dataset) == 3
    (label,) = dataset.get_example_by_keys(0, (1,))
    assert label.dtype == np.int32 and label[0, 0] == -1 and (label[1:] == labels[0][1:]).all()
    img, _ = dataset[1]
    assert img.shape == (3, 6, 7) and img.dtype == np.float32
    gts = [dataset.get_example_by_keys(i, (1,))[0] for i in range(3)]
    preds = [rng.integers(0, 5, (6, 7)) for _ in range(3)]
    np.testing.assert_array_equal(calc_semantic_segmentation_confusion(preds, gts), _chainercv_confusion(preds, gts))
    with pytest.raises(ValueError, match="cannot download"):
        VOCSemanticSegmentationDataset()
    with pytest.raises(ImportError, match="install chainercv"):
        chainercv.datasets.VOCInstanceSegmentationDataset()


def test_pydensecrf_stand_in_fails_only_when_used():
    module = types.ModuleType("pydensecrf.densecrf")
    compat._pydensecrf_sub("densecrf")(module)
    crf = module.DenseCRF2D  # attribute access works (the host imports at module level)
    with pytest.raises(ImportError, match="pip install pydensecrf2"):
        crf(10, 10, 2)


def test_register_is_idempotent_and_explained():
    compat.register_irn_family()
    compat.register_irn_family()
    names = {(p.module, p.name) for p in hooks.describe_patches()}
    for expected in [
        ("voc12.dataloader", "load_img_name_list"),
        ("voc12.dataloader", "decode_int_filename"),
        ("net.resnet50", "resnet50"),
        ("step.make_cam", "torch"),
        ("chainercv", "<stand-in>"),
        ("pydensecrf", "<stand-in>"),
    ]:
        assert expected in names
    assert "voc12" not in sys.modules and "step" not in sys.modules


def test_coerce_args_turns_untyped_flags_into_numbers():
    from argparse import Namespace

    args = Namespace(sem_seg_bg_thres="0.35", exp_times="8", beta=10, cam_scales="(1.0, 0.5, 1.5, 2)")
    assert compat.coerce_args(args) is args
    assert (args.sem_seg_bg_thres, args.exp_times, args.beta, args.cam_scales) == (0.35, 8, 10, (1.0, 0.5, 1.5, 2.0))
    args = Namespace(cam_scales=(1.0,), sem_seg_bg_thres=0.25)
    assert compat.coerce_args(args).cam_scales == (1.0,)
    with pytest.raises(ValueError, match="--sem_seg_bg_thres='x'"):
        compat.coerce_args(Namespace(sem_seg_bg_thres="x"))
    with pytest.raises(ValueError, match="--cam_scales"):
        compat.coerce_args(Namespace(cam_scales="big"))


def test_asarray_collated_gives_slice_bounds_numpy2_accepts():
    from torch.utils.data import default_collate

    size = default_collate([{"size": (5, 7)}])["size"]  # what a batch of one gives the host
    assert [t.shape for t in size] == [torch.Size([1]), torch.Size([1])]
    raw = np.asarray(size)
    assert raw.shape == (2, 1)  # numpy 2 / torch 2: the host's rows are 1-element arrays ...
    x = torch.zeros(3, 9, 9)
    with pytest.raises(TypeError, match="scalar index"):
        x[..., 0, :raw[0], :raw[1]]  # ... which are not slice bounds (step.make_sem_seg_labels)
    fixed = compat.asarray_collated(size)
    assert fixed.tolist() == [5, 7] and fixed.ndim == 1
    assert x[..., :fixed[0], :fixed[1]].shape == (3, 5, 7)
    # anything else is np.asarray unchanged: batches of more than one, arrays, scalars, dtype
    assert compat.asarray_collated([torch.tensor([1, 2]), torch.tensor([3, 4])]).shape == (2, 2)
    assert compat.asarray_collated([1.5, 2]).tolist() == [1.5, 2.0]
    assert compat.asarray_collated(size, dtype=np.float32).dtype == np.float32
    assert compat.asarray_collated([]).shape == (0,)
    proxy = compat.numpy_with_collated_asarray()
    assert proxy.asarray is compat.asarray_collated and proxy.pad is np.pad and np.asarray is not proxy.asarray


def test_make_sem_seg_labels_gets_the_collated_numpy(tmp_path, monkeypatch):
    """Stand-ins for the host steps: the shim replaces their module-level numpy, nothing else."""
    (tmp_path / "step").mkdir()
    body = textwrap.dedent(
        """
        import numpy as np
        import torch

        def crop(pack):
            orig_img_size = np.asarray(pack['size'])
            return torch.zeros(2, 9, 9)[..., :orig_img_size[0], :orig_img_size[1]].shape
        """
    )
    (tmp_path / "step" / "make_sem_seg_labels.py").write_text(body)
    (tmp_path / "step" / "make_ins_seg_labels.py").write_text("np = 'not numpy'\n")
    (tmp_path / "step" / "eval_sem_seg.py").write_text("import numpy as np\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    importlib.invalidate_caches()
    try:
        compat.register_irn_family()
        compat.register_irn_family()  # idempotent
        import step.eval_sem_seg
        import step.make_ins_seg_labels
        import step.make_sem_seg_labels

        size = [torch.tensor([4]), torch.tensor([6])]
        assert step.make_sem_seg_labels.crop({"size": size}) == (2, 4, 6)
        assert step.make_sem_seg_labels.np.__lpcam_collated_asarray__
        assert step.make_ins_seg_labels.np == "not numpy"  # not numpy: left alone
        assert step.eval_sem_seg.np is np  # a step that does not need it keeps numpy itself
        assert "np.asarray(pack['size'])" in hooks.explain()
    finally:
        for name in list(sys.modules):
            if name.split(".")[0] == "step":
                del sys.modules[name]


def test_longtensor_of_a_list_of_numpy_label_maps():
    """AMN's train_amn.resize_labels: torch.LongTensor([float32 arrays]) fails on torch 2; the module-local torch
    stacks the list first, and leaves every other use of LongTensor alone."""
    import numpy as np
    import torch

    from lpcam_adapters.compat import torch_with_stacking_longtensor

    labels = [np.array([[0, 1], [255, 2]], np.float32), np.array([[3, 3], [0, 255]], np.float32)]
    with pytest.raises(TypeError):
        torch.LongTensor(labels)
    proxy = torch_with_stacking_longtensor()
    got = proxy.LongTensor(labels)
    assert got.dtype == torch.int64 and got.tolist() == [[[0, 1], [255, 2]], [[3, 3], [0, 255]]]
    assert proxy.LongTensor([1, 2]).tolist() == [1, 2] and proxy.LongTensor(2, 3).shape == (2, 3)
    assert proxy.zeros is torch.zeros and torch.LongTensor is not proxy.LongTensor


def test_eval_outputs_of_the_irn_family_are_parsed():
    from lpcam_adapters.trial import host_miou

    assert host_miou("threshold: 0.21 miou: 0.2190 i_imgs 20") == pytest.approx(0.219)  # ReCAM's eval_cam
    assert host_miou("{'iou': array([0.9, 0.1]), 'miou': np.float64(0.43)}") == pytest.approx(0.43)  # IRN's
    assert host_miou("nothing here") is None

"""A procedural, seeded, part-based dataset in the PASCAL VOC layout (no downloads).

What it models, and why
-----------------------
LPCAM's premise is that *every* part of an object is still class-specific in the network's
local features, while the classifier leans on the most discriminative one: the CAM lights
the sheep's head, yet the sheep's woolly body is also "sheep" to the features, and local
prototypes clustered from the whole training set recover it. A synthetic benchmark is only
honest if it builds exactly that, and nothing that hands LPCAM the answer.

Each class is a "creature" made of three parts:

* a **head**: small (about a tenth of the object's area) and salient, in a saturated colour
  of its own with a black or white eye. It alone separates the classes at a glance, so the
  classifier learns it first and leans on it.
* a **body**: a large striped ellipse from one texture family (brownish fur with stripes).
  Every class has its own variant of it (hue, stripe angle and stripe period shift by
  ``1 - sharing`` times a fixed spread), blurred by per-instance jitter. Bodies look alike
  across classes yet stay class-specific, which is what makes them recoverable. The
  variants are evenly spaced over the spread; with fewer than 6 classes they keep the
  6-class spacing instead of moving apart, since bodies far apart are discriminative in
  their own right (the CAM then covers them and the premise no longer holds).
* **legs**: thin dark bars, the same for all classes up to a subtle per-class shade and width.

The ground truth is the whole creature. Backgrounds are procedural textures (waves, smooth
noise, tiles, gradients); each class has its own context texture that it appears on with
probability ``context_correlation`` (as boats on water), otherwise the background is a
random texture. Random low-saturation shapes are added as distractors. One to three
objects per image, so images are multi-label.

What it deliberately avoids (a pilot measured by the team): with ``sharing=1`` the bodies
are pixel-identical across classes; their clusters then score about ``1/n`` per class, never
pass ``mu_f`` and become context prototypes, so LPCAM cannot help, and the generator lets
you check that. Objects are drawn large relative to the receptive field of a small
stride-4 network, so its feature grid resolves head, body and legs; with receptive fields
as large as the objects the CAM is a blob and no method gains.

Two entry points: :func:`generate` returns arrays in memory (for tests and the demo), and
:func:`write_voc` writes ``JPEGImages/<id>.jpg``, ``SegmentationClass/<id>.png`` (VOC
palette, 255 on object borders), ``ImageSets/Segmentation/{train,val}.txt`` and an IRN-style
``cls_labels.npy`` ({int id: float32 multi-hot}); a directory already holding the same
parameters is left as it is. Image ``i`` depends only on the seed and ``i``.

Example:
    >>> from lpcam_core.demo.synthetic import SyntheticConfig, generate
    >>> data = generate(SyntheticConfig(num_images=8, seed=0))
    >>> data["train"].images.shape[1:], data["train"].labels.shape[1]
    ((96, 96, 3), 6)
"""

from __future__ import annotations

import colorsys
import dataclasses
import json
import logging
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

logger = logging.getLogger(__name__)

__all__ = [
    "SyntheticConfig",
    "default_num_images",
    "SyntheticSplit",
    "generate",
    "render_image",
    "write_voc",
    "load_voc",
    "voc_palette",
    "class_names",
    "id_to_int",
]

_WRITING_MARK = ".lpcam_synthetic_writing"
_PARAMS_FILE = "synthetic_params.json"
#: Values of the part maps.
PART_NAMES = {0: "background", 1: "head", 2: "body", 3: "legs"}
_FORMAT_VERSION = 3  # 3: body variants of fewer than 6 classes no further apart than 6 classes
#: Body variants are spaced as if there were at least this many classes (see ``_class_styles``).
_MIN_BODY_SLOTS = 6
_BACKGROUND_KINDS = ("waves", "noise", "tiles", "gradient")


def default_num_images(num_classes: int) -> int:
    """Default dataset size: 200 images per class (160 for training), at least 1,200."""
    return max(1200, 200 * int(num_classes))


@dataclass(frozen=True)
class SyntheticConfig:
    """Parameters of the synthetic part-based dataset.

    Attributes:
        num_classes: Object classes (2 to 20; label 0 is background as in VOC).
        image_size: Side of the square images in pixels.
        num_images: Images in all; the last ``val_fraction`` of them form the val split.
            ``None`` (default): ``max(1200, 200 * num_classes)``, so the classifier sees at
            least 160 training images per class whatever the class count (with 10 classes and
            1,200 images the CAM network was too weak for LPCAM to gain: see docs/demo.md).
        val_fraction: Share of the images held out as ``val``.
        min_objects: Fewest objects per image.
        max_objects: Most objects per image (fewer are drawn when they do not fit).
        body_length: Range of the body's length, as a fraction of ``image_size``.
        body_aspect: Range of the body's height over its length.
        head_scale: Head radius over body length (the small discriminative part).
        leg_scale: Leg length over body height.
        sharing: How alike the body and legs are across classes, from 0 (very different
            variants) to 1 (pixel-identical parts: LPCAM's premise no longer holds).
        jitter: Per-instance variation of the body and legs, relative to the defaults.
        context_correlation: Probability that an image shows the context texture of the
            class of its first object.
        truncation: Probability that an object is cut by the image border with its head
            out of the frame (only the body and legs then show the class).
        max_distractors: Most background distractor shapes per image.
        border: Half-width in pixels of the 255 band on object borders (0: none).
        noise: Standard deviation of the pixel noise (0-255 scale).
        jpeg_quality: Quality of the written JPEG images.
        year: The ``YYYY`` of the VOC-style ids ``YYYY_NNNNNN``.
        seed: Seed of the class styles and of every image.
    """

    num_classes: int = 6
    image_size: int = 96
    num_images: int | None = None
    val_fraction: float = 0.2
    min_objects: int = 1
    max_objects: int = 3
    body_length: tuple[float, float] = (0.40, 0.56)
    body_aspect: tuple[float, float] = (0.45, 0.60)
    head_scale: float = 0.14
    leg_scale: float = 0.55
    sharing: float = 0.5
    jitter: float = 1.0
    context_correlation: float = 0.6
    truncation: float = 0.1
    max_distractors: int = 3
    border: int = 1
    noise: float = 3.0
    jpeg_quality: int = 95
    year: int = 2099
    seed: int = 0

    def __post_init__(self) -> None:
        _check_int("num_classes", self.num_classes, 2, 20)
        if self.num_images is None:
            object.__setattr__(self, "num_images", default_num_images(self.num_classes))
        _check_int("image_size", self.image_size, 32, 1024)
        _check_int("num_images", self.num_images, 2, 10_000_000)
        _check_float("val_fraction", self.val_fraction, 0.0, 1.0, open_ends=True)
        _check_int("min_objects", self.min_objects, 1, 8)
        _check_int("max_objects", self.max_objects, self.min_objects, 8)
        _check_range("body_length", self.body_length, 0.05, 0.9)
        _check_range("body_aspect", self.body_aspect, 0.1, 1.0)
        _check_float("head_scale", self.head_scale, 0.02, 0.5)
        _check_float("leg_scale", self.leg_scale, 0.0, 2.0)
        _check_float("sharing", self.sharing, 0.0, 1.0)
        _check_float("jitter", self.jitter, 0.0, 10.0)
        _check_float("context_correlation", self.context_correlation, 0.0, 1.0)
        _check_float("truncation", self.truncation, 0.0, 1.0)
        _check_int("max_distractors", self.max_distractors, 0, 50)
        _check_int("border", self.border, 0, 16)
        _check_float("noise", self.noise, 0.0, 100.0)
        _check_int("jpeg_quality", self.jpeg_quality, 1, 100)
        _check_int("year", self.year, 1000, 9999)
        _check_int("seed", self.seed, 0, 2**63 - 1)
        if self.num_val < 1 or self.num_train < 1:
            raise ValueError(
                f"num_images={self.num_images} with val_fraction={self.val_fraction} "
                "leaves an empty train or val split"
            )

    @property
    def num_val(self) -> int:
        """Images in the val split."""
        return int(round(self.num_images * self.val_fraction))

    @property
    def num_train(self) -> int:
        """Images in the train split."""
        return self.num_images - self.num_val

    def to_dict(self) -> dict:
        """Plain JSON-ready dictionary of the parameters."""
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in dataclasses.asdict(self).items()}

    @classmethod
    def from_dict(cls, data: dict) -> SyntheticConfig:
        """Inverse of :meth:`to_dict`; unknown keys raise ``ValueError``."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ValueError(f"unknown SyntheticConfig parameters: {unknown}")
        kwargs = {k: (tuple(v) if isinstance(v, list) else v) for k, v in data.items()}
        return cls(**kwargs)


@dataclass
class SyntheticSplit:
    """One split held in memory.

    Attributes:
        ids: VOC-style ids ``YYYY_NNNNNN``, one per image.
        images: uint8 RGB images ``[N, H, W, 3]``.
        masks: uint8 labels ``[N, H, W]``: 0 background, ``c + 1`` for class ``c``, 255 borders.
        labels: float32 multi-hot image labels ``[N, num_classes]``.
        parts: uint8 part labels ``[N, H, W]`` (0 background, 1 head, 2 body, 3 legs, 255
            borders), for per-part diagnostics; None when not available.
    """

    ids: list[str]
    images: np.ndarray
    masks: np.ndarray
    labels: np.ndarray = field(repr=False)
    parts: np.ndarray | None = field(default=None, repr=False)

    def __len__(self) -> int:
        return len(self.ids)


# ----------------------------------------------------------------------------- validation


def _check_int(name: str, value: object, low: int, high: int) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if not low <= value <= high:
        raise ValueError(f"{name} must be in [{low}, {high}], got {value}")


def _check_float(name: str, value: object, low: float, high: float, open_ends: bool = False) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise TypeError(f"{name} must be a number, got {type(value).__name__}")
    inside = low < value < high if open_ends else low <= value <= high
    if not inside or not np.isfinite(value):
        bounds = f"({low}, {high})" if open_ends else f"[{low}, {high}]"
        raise ValueError(f"{name} must be in {bounds}, got {value}")


def _check_range(name: str, value: object, low: float, high: float) -> None:
    if not isinstance(value, (tuple, list)) or len(value) != 2:
        raise TypeError(f"{name} must be a (min, max) pair, got {value!r}")
    for v in value:
        _check_float(name, v, low, high)
    if value[0] > value[1]:
        raise ValueError(f"{name} must be (min, max) with min <= max, got {tuple(value)}")


# ----------------------------------------------------------------------------- helpers


def voc_palette() -> list[int]:
    """The PASCAL VOC colour map as a flat list of 768 ints (index 255 is the border colour)."""
    palette = []
    for i in range(256):
        r = g = b = 0
        c = i
        for j in range(8):
            r |= ((c >> 0) & 1) << (7 - j)
            g |= ((c >> 1) & 1) << (7 - j)
            b |= ((c >> 2) & 1) << (7 - j)
            c >>= 3
        palette += [r, g, b]
    return palette


def class_names(num_classes: int) -> list[str]:
    """Names of the synthetic classes: ``creature00``, ``creature01``, ..."""
    return [f"creature{c:02d}" for c in range(num_classes)]


def id_to_int(image_id: str) -> int:
    """The IRN ``cls_labels.npy`` key of an id: ``"2007_000032"`` -> ``2007000032``."""
    return int(image_id.replace("_", ""))


def _image_id(cfg: SyntheticConfig, index: int) -> str:
    return f"{cfg.year}_{index:06d}"


def _hsv(h: float, s: float, v: float) -> np.ndarray:
    """RGB colour (0-255 float32, shape [3]) from hue in degrees, saturation and value."""
    s = float(np.clip(s, 0.0, 1.0))
    v = float(np.clip(v, 0.0, 1.0))
    return np.asarray(colorsys.hsv_to_rgb((h % 360.0) / 360.0, s, v), dtype=np.float32) * 255.0


@dataclass(frozen=True)
class _ClassStyle:
    head_color: np.ndarray
    eye_color: np.ndarray
    body_hue: float
    body_sat: float
    body_val: float
    stripe_angle: float
    stripe_period: float
    leg_val: float
    leg_width: float
    context_kind: str
    context_colors: tuple[np.ndarray, np.ndarray]


def _class_styles(cfg: SyntheticConfig) -> list[_ClassStyle]:
    """Per-class looks, derived from the seed (class styles differ between seeds)."""
    n = cfg.num_classes
    rng = np.random.default_rng([cfg.seed, 7_919])
    spread = 1.0 - cfg.sharing

    # Neighbouring body variants sit ``2 / max(n - 1, 5)`` apart on each axis: evenly spaced
    # over [-1, 1] from 6 classes on, and never further apart with fewer classes, so that with
    # 4 classes the bodies do not become discriminative in their own right.
    extent = (n - 1) / max(n - 1, _MIN_BODY_SLOTS - 1)  # 1 from 6 classes on

    def spaced() -> np.ndarray:  # centred on 0, evenly spaced, in a seed-dependent order
        return rng.permutation(np.linspace(-extent, extent, n))

    hue_off, angle_off, period_off, leg_off, width_off = spaced(), spaced(), spaced(), spaced(), spaced()
    head_hue0 = rng.uniform(0, 360)
    head_order = rng.permutation(n)
    # Context textures: one per pair of classes (grass for cows and sheep), so a background
    # correlates with classes without naming one.
    num_contexts = (n + 1) // 2
    context_of = rng.permutation(n) // 2
    kinds = rng.permutation(np.resize(np.arange(len(_BACKGROUND_KINDS)), num_contexts))
    contexts = []
    for k in range(num_contexts):
        ctx_hue = rng.uniform(0, 360)
        ctx_a = _hsv(ctx_hue, rng.uniform(0.25, 0.55), rng.uniform(0.45, 0.8))
        ctx_b = _hsv(ctx_hue + rng.uniform(-25, 25), rng.uniform(0.2, 0.5), rng.uniform(0.3, 0.65))
        contexts.append((_BACKGROUND_KINDS[int(kinds[k])], (ctx_a, ctx_b)))
    styles = []
    for c in range(n):
        k = head_order[c]
        head = _hsv(head_hue0 + 360.0 * k / n, 0.95, 1.0 if k % 2 == 0 else 0.85)
        eye = np.full(3, 255.0 if k % 2 else 0.0, dtype=np.float32)
        ctx_kind, ctx_colors = contexts[int(context_of[c])]
        styles.append(
            _ClassStyle(
                head_color=head,
                eye_color=eye,
                body_hue=30.0 + 30.0 * spread * hue_off[c],
                body_sat=0.55,
                body_val=0.62,
                stripe_angle=90.0 + 60.0 * spread * angle_off[c],
                stripe_period=7.0 * (1.0 + 0.35 * spread * period_off[c]),
                leg_val=0.3 + 0.1 * spread * leg_off[c],
                leg_width=1.0 + 0.5 * spread * width_off[c],
                context_kind=ctx_kind,
                context_colors=ctx_colors,
            )
        )
    return styles


def _texture(kind: str, a: np.ndarray, b: np.ndarray, yy: np.ndarray, xx: np.ndarray,
             rng: np.random.Generator) -> np.ndarray:
    """Procedural background ``[H, W, 3]`` mixing colours ``a`` and ``b``."""
    size = yy.shape[0]
    if kind == "waves":
        theta = rng.uniform(-0.4, 0.4)
        period = rng.uniform(9, 16)
        phase = rng.uniform(0, 2 * np.pi)
        wobble = 2.0 * np.sin(2 * np.pi * xx / rng.uniform(25, 45) + phase)
        t = 0.5 + 0.5 * np.sin(2 * np.pi * (yy * np.cos(theta) + xx * np.sin(theta) + wobble) / period + phase)
    elif kind == "noise":
        cells = max(2, size // 12)
        grid = rng.random((cells + 1, cells + 1)).astype(np.float32)
        pos = np.linspace(0, cells, size, dtype=np.float32)
        i0 = np.minimum(pos.astype(int), cells - 1)
        f = pos - i0
        rows = grid[i0] * (1 - f)[:, None] + grid[i0 + 1] * f[:, None]
        t = rows[:, i0] * (1 - f)[None, :] + rows[:, i0 + 1] * f[None, :]
    elif kind == "tiles":
        tile = rng.integers(8, 15)
        oy, ox = rng.integers(0, tile, size=2)
        t = (((yy + oy) // tile + (xx + ox) // tile) % 2).astype(np.float32)
        t = 0.2 + 0.6 * t
    elif kind == "gradient":
        t = (yy / max(size - 1, 1)) * rng.uniform(0.6, 1.0)
        if rng.random() < 0.5:
            t = 1.0 - t
    else:  # pragma: no cover - internal
        raise ValueError(f"unknown background kind {kind!r}")
    return a[None, None, :] * (1.0 - t[..., None]) + b[None, None, :] * t[..., None]


def _border_mask(label: np.ndarray, width: int) -> np.ndarray:
    """True where a pixel's ``(2w+1)^2`` neighbourhood holds another label (object borders)."""
    if width <= 0:
        return np.zeros(label.shape, dtype=bool)
    h, w = label.shape
    pad = np.pad(label, width, mode="edge")
    border = np.zeros(label.shape, dtype=bool)
    for dy in range(-width, width + 1):
        for dx in range(-width, width + 1):
            if dy == 0 and dx == 0:
                continue
            shifted = pad[width + dy: width + dy + h, width + dx: width + dx + w]
            border |= shifted != label
    return border


def render_image(cfg: SyntheticConfig, index: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Render image ``index`` (it depends only on ``cfg`` and ``index``).

    Args:
        cfg: Dataset parameters.
        index: Image number, ``0 <= index < cfg.num_images``.

    Returns:
        ``(image, mask, label, parts)``: uint8 ``[H, W, 3]``, uint8 ``[H, W]`` (0 background,
        ``c + 1`` objects, 255 borders), float32 multi-hot ``[num_classes]`` and uint8 part map
        ``[H, W]`` (see ``PART_NAMES``; 255 where ``mask`` is 255).
    """
    if not 0 <= index < cfg.num_images:
        raise ValueError(f"index must be in [0, {cfg.num_images}), got {index}")
    return _render(cfg, _class_styles(cfg), index)


def _render(cfg: SyntheticConfig, styles: list[_ClassStyle], index: int
            ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng([cfg.seed, 104_729, index])
    s = cfg.image_size
    yy, xx = np.mgrid[0:s, 0:s].astype(np.float32)
    n = cfg.num_classes

    # Objects: how many, which classes (chosen first so the background can follow them).
    counts = np.arange(cfg.min_objects, cfg.max_objects + 1)
    weights = 1.0 / counts
    count = int(rng.choice(counts, p=weights / weights.sum()))
    classes = [int(c) for c in rng.integers(0, n, size=count)]

    # Background: the first object's context texture, or a random texture.
    if rng.random() < cfg.context_correlation:
        st = styles[classes[0]]
        jit = rng.uniform(0.92, 1.08, size=3).astype(np.float32)
        image = _texture(st.context_kind, st.context_colors[0] * jit, st.context_colors[1] * jit, yy, xx, rng)
    else:
        kind = _BACKGROUND_KINDS[int(rng.integers(len(_BACKGROUND_KINDS)))]
        hue = rng.uniform(0, 360)
        a = _hsv(hue, rng.uniform(0.1, 0.55), rng.uniform(0.4, 0.85))
        b = _hsv(hue + rng.uniform(-40, 40), rng.uniform(0.1, 0.5), rng.uniform(0.25, 0.7))
        image = _texture(kind, a, b, yy, xx, rng)

    # Distractors: low-saturation shapes that belong to no class.
    for _ in range(int(rng.integers(0, cfg.max_distractors + 1))):
        r = rng.uniform(0.04, 0.11) * s
        cy, cx = rng.uniform(0, s, size=2)
        color = _hsv(rng.uniform(0, 360), rng.uniform(0.05, 0.5), rng.uniform(0.2, 0.95))
        if rng.random() < 0.5:
            m = ((yy - cy) / r) ** 2 + ((xx - cx) / (r * rng.uniform(0.5, 1.5))) ** 2 <= 1.0
        else:
            m = (np.abs(yy - cy) <= r * rng.uniform(0.4, 1.0)) & (np.abs(xx - cx) <= r)
        image[m] = color

    label = np.zeros((s, s), dtype=np.uint8)
    part = np.zeros((s, s), dtype=np.uint8)
    boxes: list[tuple[float, float, float, float]] = []
    present = np.zeros(n, dtype=np.float32)
    for c in classes:
        st = styles[c]
        length = rng.uniform(*cfg.body_length) * s
        a = length / 2.0
        b = a * rng.uniform(*cfg.body_aspect)
        r = cfg.head_scale * length
        leg = cfg.leg_scale * 2.0 * b
        face = 1.0 if rng.random() < 0.5 else -1.0
        # Extent around the body centre: head in front and up, legs below.
        left = a + (2.0 * r if face < 0 else 0.0)
        right = a + (2.0 * r if face > 0 else 0.0)
        up = max(b, 0.4 * b + r)
        down = b + leg
        truncated = rng.random() < cfg.truncation
        placed = None
        for _ in range(30):
            if truncated:  # the head out of the frame, most of the body in it
                cx = s - a + 0.5 * r + rng.uniform(0.0, 0.3) * a
                if face < 0:
                    cx = s - cx
            else:
                cx = rng.uniform(left + 1, s - right - 1) if s - right - left - 2 > 0 else s / 2
            cy = rng.uniform(up + 1, s - down - 1) if s - down - up - 2 > 0 else s / 2
            box = (max(cx - left, 0.0), cy - up, min(cx + right, float(s)), cy + down)
            if all(_overlap(box, other) < 0.25 for other in boxes):
                placed = (cx, cy, box)
                break
        if placed is None:
            continue
        cx, cy, box = placed
        boxes.append(box)
        present[c] = 1.0
        sj = cfg.jitter

        # Legs (drawn first: the body covers their tops).
        leg_color = _hsv(st.body_hue + rng.normal(0, 3 * sj), 0.35, st.leg_val + rng.normal(0, 0.02 * sj))
        half_w = max(0.6, st.leg_width * s / 96.0 * (1 + rng.normal(0, 0.08 * sj)))
        obj = np.zeros((s, s), dtype=bool)
        for frac in (-0.6, -0.25, 0.25, 0.6):
            lx = cx + frac * a
            m = (np.abs(xx - lx) <= half_w) & (yy >= cy) & (yy <= cy + b + leg)
            image[m] = leg_color
            part[m] = 3
            obj |= m

        # Body: the shared striped texture family, in the class's variant.
        m = ((xx - cx) / a) ** 2 + ((yy - cy) / b) ** 2 <= 1.0
        hue = st.body_hue + rng.normal(0, 3 * sj)
        color = _hsv(hue, st.body_sat + rng.normal(0, 0.03 * sj), st.body_val + rng.normal(0, 0.03 * sj))
        angle = np.deg2rad(st.stripe_angle + rng.normal(0, 6 * sj))
        period = st.stripe_period * s / 96.0 * (1 + rng.normal(0, 0.05 * sj))
        phase = rng.uniform(0, 2 * np.pi)
        wave = np.sin(2 * np.pi * (xx * np.cos(angle) + yy * np.sin(angle)) / period + phase)
        shade = np.where(wave > 0.2, 0.72, 1.0).astype(np.float32)
        image[m] = color[None, :] * shade[m][:, None]
        part[m] = 2
        obj |= m

        # Head: the small, salient, discriminative part, with an eye.
        hx = cx + face * (a + 0.5 * r)
        hy = cy - 0.4 * b
        m = (xx - hx) ** 2 + (yy - hy) ** 2 <= r * r
        image[m] = st.head_color
        part[m] = 1
        obj |= m
        ex = hx + face * 0.35 * r
        eye = (xx - ex) ** 2 + (yy - hy) ** 2 <= (0.38 * r) ** 2
        image[eye] = st.eye_color

        label[obj] = c + 1

    if cfg.noise > 0:
        image = image + rng.normal(0, cfg.noise, size=image.shape).astype(np.float32)
    image = np.clip(np.rint(image), 0, 255).astype(np.uint8)
    mask = label.copy()
    mask[_border_mask(label, cfg.border)] = 255
    part[mask == 255] = 255
    return image, mask, present, part


def _overlap(a: tuple[float, float, float, float], b: tuple[float, float, float, float]) -> float:
    """Intersection over the smaller box's area."""
    iw = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    ih = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    area = min((a[2] - a[0]) * (a[3] - a[1]), (b[2] - b[0]) * (b[3] - b[1]))
    return iw * ih / max(area, 1e-6)


# ----------------------------------------------------------------------------- public API


def _split_indices(cfg: SyntheticConfig, split: str) -> range:
    if split == "train":
        return range(0, cfg.num_train)
    if split == "val":
        return range(cfg.num_train, cfg.num_images)
    raise ValueError(f"split must be 'train' or 'val', got {split!r}")


def generate(cfg: SyntheticConfig, splits: tuple[str, ...] = ("train", "val"),
             progress: bool = False) -> dict[str, SyntheticSplit]:
    """Render the dataset in memory.

    Args:
        cfg: Dataset parameters.
        splits: Which splits to render (``"train"``, ``"val"``).
        progress: Show a tqdm progress bar.

    Returns:
        ``{split: SyntheticSplit}`` with images ``[N, S, S, 3]`` uint8, masks ``[N, S, S]``
        uint8 and labels ``[N, num_classes]`` float32.
    """
    if not isinstance(cfg, SyntheticConfig):
        raise TypeError(f"cfg must be a SyntheticConfig, got {type(cfg).__name__}")
    styles = _class_styles(cfg)
    out = {}
    for split in splits:
        indices = _split_indices(cfg, split)
        s = cfg.image_size
        images = np.empty((len(indices), s, s, 3), dtype=np.uint8)
        masks = np.empty((len(indices), s, s), dtype=np.uint8)
        labels = np.empty((len(indices), cfg.num_classes), dtype=np.float32)
        parts = np.empty((len(indices), s, s), dtype=np.uint8)
        iterator = enumerate(indices)
        if progress:
            from tqdm.auto import tqdm

            iterator = tqdm(iterator, total=len(indices), desc=f"render {split}", leave=False)
        for k, i in iterator:
            images[k], masks[k], labels[k], parts[k] = _render(cfg, styles, i)
        out[split] = SyntheticSplit([_image_id(cfg, i) for i in indices], images, masks, labels, parts)
    return out


def _params_record(cfg: SyntheticConfig) -> dict:
    return {"format": _FORMAT_VERSION, "params": cfg.to_dict(), "class_names": class_names(cfg.num_classes)}


def write_voc(cfg: SyntheticConfig, root: str | os.PathLike, progress: bool = True,
              overwrite: bool = False) -> Path:
    """Write the dataset in the PASCAL VOC layout under ``root`` (cached).

    Layout: ``JPEGImages/<id>.jpg``, ``SegmentationClass/<id>.png`` (mode ``P``, VOC palette,
    255 on borders), ``ImageSets/Segmentation/{train,val}.txt``, ``cls_labels.npy`` (IRN's
    ``{int id: float32 [num_classes]}``), ``synthetic_params.json`` and, beyond VOC,
    ``SegmentationPart/<id>.png`` (the part map, for per-part diagnostics). When ``root`` already
    holds the same parameters nothing is written.

    Args:
        cfg: Dataset parameters.
        root: Output directory (created if needed).
        progress: Show a tqdm progress bar.
        overwrite: Rewrite even when the cached parameters match.

    Returns:
        ``root`` as a ``Path``.
    """
    from PIL import Image

    root = Path(root)
    record = _params_record(cfg)
    params_path = root / _PARAMS_FILE
    if not overwrite and params_path.is_file():
        try:
            cached = json.loads(params_path.read_text())
        except (OSError, json.JSONDecodeError):
            cached = None
        if cached == record:
            logger.info("synthetic dataset already in %s (same parameters): skipped", root)
            return root
    writing = root / _WRITING_MARK
    if root.is_dir() and any(root.iterdir()) and not params_path.is_file() and not writing.is_file():
        raise FileExistsError(f"{root} holds files lpcam did not write (no {_PARAMS_FILE}): the synthetic dataset "
                              "replaces its JPEGImages/ and SegmentationClass/, so choose an empty or new folder")
    root.mkdir(parents=True, exist_ok=True)
    writing.touch()  # an interrupted write can be redone: the folder stays recognisably lpcam's
    if params_path.exists():
        params_path.unlink()  # invalidate the cache first: a broken write is never reused
    for sub in ("JPEGImages", "SegmentationClass", "SegmentationPart"):
        if (root / sub).is_dir():
            shutil.rmtree(root / sub)
        (root / sub).mkdir(parents=True)
    (root / "ImageSets" / "Segmentation").mkdir(parents=True, exist_ok=True)

    palette = voc_palette()
    styles = _class_styles(cfg)
    cls_labels: dict[int, np.ndarray] = {}
    from tqdm.auto import tqdm

    for split in ("train", "val"):
        indices = _split_indices(cfg, split)
        ids = [_image_id(cfg, i) for i in indices]
        for i, image_id in tqdm(list(zip(indices, ids)), desc=f"write {split}", disable=not progress,
                                leave=False):
            image, mask, present, part = _render(cfg, styles, i)
            Image.fromarray(image).save(root / "JPEGImages" / f"{image_id}.jpg", quality=cfg.jpeg_quality)
            _palette_png(mask, palette).save(root / "SegmentationClass" / f"{image_id}.png")
            _palette_png(part, palette).save(root / "SegmentationPart" / f"{image_id}.png")
            cls_labels[id_to_int(image_id)] = present
        (root / "ImageSets" / "Segmentation" / f"{split}.txt").write_text("".join(f"{i}\n" for i in ids))
    np.save(root / "cls_labels.npy", cls_labels, allow_pickle=True)
    params_path.write_text(json.dumps(record, indent=2, sort_keys=True))
    writing.unlink()
    logger.info("wrote %d synthetic images to %s", cfg.num_images, root)
    return root


def _palette_png(mask: np.ndarray, palette: list[int]):
    """A mode-``P`` PIL image whose indices are ``mask`` ``[H, W]`` uint8 (no quantisation)."""
    from PIL import Image

    h, w = mask.shape
    img = Image.frombytes("P", (w, h), np.ascontiguousarray(mask, dtype=np.uint8).tobytes())
    img.putpalette(palette)
    return img


def load_voc(root: str | os.PathLike, split: str, num_classes: int | None = None) -> SyntheticSplit:
    """Read one split of a VOC-layout directory (as :func:`write_voc` writes it) into memory.

    Args:
        root: Dataset directory.
        split: ``"train"`` or ``"val"`` (any ``ImageSets/Segmentation/<split>.txt``).
        num_classes: Length of the label vectors; read from ``synthetic_params.json`` if None.

    Returns:
        The split, with labels taken from ``cls_labels.npy``.
    """
    from PIL import Image

    root = Path(root)
    list_path = root / "ImageSets" / "Segmentation" / f"{split}.txt"
    if not list_path.is_file():
        raise FileNotFoundError(f"no split list {list_path} (split={split!r})")
    ids = [line.strip() for line in list_path.read_text().splitlines() if line.strip()]
    from ..io import load_npy

    cls_labels = load_npy(root / "cls_labels.npy", what="class labels")
    if num_classes is None:
        params = json.loads((root / _PARAMS_FILE).read_text())["params"]
        num_classes = int(params["num_classes"])
    part_dir = root / "SegmentationPart"
    images, masks, labels, parts = [], [], [], []
    for image_id in ids:
        with Image.open(root / "JPEGImages" / f"{image_id}.jpg") as im:
            images.append(np.asarray(im.convert("RGB")))
        with Image.open(root / "SegmentationClass" / f"{image_id}.png") as im:
            masks.append(np.asarray(im))
        if part_dir.is_dir():
            with Image.open(part_dir / f"{image_id}.png") as im:
                parts.append(np.asarray(im))
        vec = np.asarray(cls_labels[id_to_int(image_id)], dtype=np.float32)
        if vec.shape != (num_classes,):
            raise ValueError(f"cls_labels entry of {image_id} has shape {vec.shape}, expected ({num_classes},)")
        labels.append(vec)
    return SyntheticSplit(ids, np.stack(images), np.stack(masks), np.stack(labels),
                          np.stack(parts) if parts else None)

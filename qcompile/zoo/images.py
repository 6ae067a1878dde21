"""Real, offline, deterministic 224x224 images for calibrating and evaluating ImageNet models.

Everything comes from files that ship with scikit-learn, so nothing is downloaded:

* the two bundled sample photos (``sklearn.datasets.load_sample_images()``: ``china.jpg``, a
  pagoda over a lake among trees, and ``flower.jpg``, a dahlia in front of foliage; 427x640 RGB);
* the 1797 handwritten digits of ``sklearn.datasets.load_digits()`` (8x8, 17 grey levels), tiled
  1x1 to 4x4 and colourised with random foreground and background colours.

Splits. ``calib`` and ``eval`` never share a pixel of a photo nor a digit:

* photo crops of ``calib`` lie entirely in the top rows ``[0, 213)`` of each photo, crops of
  ``eval`` in the bottom rows ``[213, 427)``. Both splits see both photos (pagoda, sky, lake,
  trees; petals, leaves), so their distributions match much better than "calibrate on one photo,
  evaluate on the other" would; a left/right cut was measured worse (it gives one split the whole
  pagoda and the other mostly lake).
* ``calib`` uses the even-indexed digits, ``eval`` the odd-indexed ones.

Each sample's source follows the fixed cycle :data:`SOURCE_CYCLE` (3/8 china, 3/8 flower, 1/4
digits). A photo sample is a random crop of the split's region (side 50-100 % of the region
height, aspect ratio 3/4-4/3: 92-246 px wide, 92-213 px high), resized to 224x224 with PIL's
bicubic filter and flipped left-right with probability 1/2. Sample ``i`` of ``(split, seed)`` is
drawn from its own generator seeded with ``(seed, split, i)``: the first ``n`` samples do not
depend on how many are requested, and the same arguments give the same bytes on one installation
(PIL and scikit-learn versions fixed).

Preprocessing (:func:`preprocess`) is EfficientNet-Lite's, the TensorFlow reference's
``(rgb - 127) / 128`` per channel (``MEAN_RGB = [127.0] * 3``, ``STDDEV_RGB = [128.0] * 3`` in
``efficientnet/lite/efficientnet_lite_builder.py``), giving NCHW float32 in [-0.992, 1.0]. It is not
the torchvision ImageNet mean/std the PyTorch port's docstrings show: its Lite weights are converted
from the TensorFlow checkpoints, and on these photos the 127/128 normalisation is the one under
which the model is consistent (on 16 random crops of each whole photo, top-1 is "palace" and
"daisy" for most, and a crop and its mirror image agree on 94 % of them; with the ImageNet
mean/std the top-1 classes scatter and crop and mirror agree on 63-75 %).
"""
from __future__ import annotations

import functools
from pathlib import Path
from typing import NamedTuple

import numpy as np

SPLITS = ("calib", "eval")
SIZE = 224
MEAN, STD = 127.0, 128.0  # EfficientNet-Lite (TensorFlow reference), same for R, G, B

PHOTOS = ("china", "flower")
PHOTO_SHAPE = (427, 640)  # height, width of both sample photos
SPLIT_ROW = 213  # calib crops lie in rows [0, SPLIT_ROW), eval crops in [SPLIT_ROW, 427)
MIN_CROP, MAX_ASPECT = 0.5, 4 / 3  # crop side as a fraction of the region height; aspect range
DIGIT_TILES = (1, 2, 3, 4)  # a digit sample is a k x k mosaic of digits
SOURCE_CYCLE = ("china", "flower", "china", "digits", "flower", "china", "flower", "digits")


class Sample(NamedTuple):
    """How one image is made.

    ``source`` is "china", "flower" or "digits". For a photo, ``box`` is the crop (top, left,
    bottom, right) in photo pixels and ``digits`` is empty; for digits, ``box`` is None and
    ``digits`` the indices into ``load_digits()`` of the k*k tiles, row-major. ``flip`` is a
    left-right mirror after resizing.
    """

    source: str
    box: tuple[int, int, int, int] | None
    digits: tuple[int, ...]
    flip: bool
    colours: tuple[tuple[int, int, int], ...] = ()  # digits: (background, foreground) per tile


def _require(*modules: str) -> None:
    from qcompile.zoo import require

    require(*modules)


@functools.lru_cache(maxsize=1)
def photos() -> dict[str, np.ndarray]:
    """The two scikit-learn sample photos, uint8 [427, 640, 3] RGB, by name."""
    _require("sklearn", "PIL")
    from sklearn.datasets import load_sample_images

    data = load_sample_images()
    out = {Path(f).stem: np.asarray(img, dtype=np.uint8) for f, img in zip(data.filenames, data.images)}
    for name in PHOTOS:
        if out[name].shape != (*PHOTO_SHAPE, 3):
            raise ValueError(f"unexpected shape {out[name].shape} for scikit-learn sample photo {name!r}")
    return {name: out[name] for name in PHOTOS}


@functools.lru_cache(maxsize=1)
def _digits() -> np.ndarray:
    """load_digits() images as float [1797, 8, 8] in [0, 1]."""
    _require("sklearn", "PIL")
    from sklearn.datasets import load_digits

    return load_digits().images.astype(np.float64) / 16.0


def region(split: str) -> tuple[int, int, int, int]:
    """(top, left, bottom, right) of the photo pixels ``split`` may crop from."""
    _check_split(split)
    height, width = PHOTO_SHAPE
    return (0, 0, SPLIT_ROW, width) if split == "calib" else (SPLIT_ROW, 0, height, width)


def digit_indices(split: str) -> range:
    """Indices into ``load_digits()`` that ``split`` may use: even for calib, odd for eval."""
    _check_split(split)
    return range(SPLITS.index(split), len(_digits()), 2)


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")


def _sample(split: str, i: int, seed: int) -> Sample:
    rng = np.random.default_rng([seed, SPLITS.index(split), i])
    source = SOURCE_CYCLE[i % len(SOURCE_CYCLE)]
    if source == "digits":
        k = int(rng.choice(DIGIT_TILES))
        pool = digit_indices(split)
        picks = tuple(int(pool[j]) for j in rng.integers(0, len(pool), k * k))
        colours = tuple(tuple(int(c) for c in rng.integers(0, 256, 3)) for _ in range(2 * k * k))
        return Sample(source, None, picks, bool(rng.integers(2)), colours)
    top, left, bottom, right = region(split)
    height, width = bottom - top, right - left
    side = rng.uniform(MIN_CROP, 1.0) * height
    aspect = np.exp(rng.uniform(-np.log(MAX_ASPECT), np.log(MAX_ASPECT)))  # width / height
    h = int(min(height, round(side / np.sqrt(aspect))))
    w = int(min(width, round(side * np.sqrt(aspect))))
    y = top + int(rng.integers(0, height - h + 1))
    x = left + int(rng.integers(0, width - w + 1))
    return Sample(source, (y, x, y + h, x + w), (), bool(rng.integers(2)))


def samples(split: str, n: int, seed: int = 0) -> list[Sample]:
    """The recipes of the first ``n`` images of ``split`` (what :func:`images` renders)."""
    _check_split(split)
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    return [_sample(split, i, seed) for i in range(n)]


def _resize(rgb: np.ndarray) -> np.ndarray:
    from PIL import Image

    return np.asarray(Image.fromarray(rgb).resize((SIZE, SIZE), Image.Resampling.BICUBIC), dtype=np.uint8)


def render(sample: Sample) -> np.ndarray:
    """One sample as uint8 [224, 224, 3] RGB (before :func:`preprocess`)."""
    if sample.source == "digits":
        k = int(round(len(sample.digits) ** 0.5))
        tiles = []
        for t, idx in enumerate(sample.digits):
            bg, fg = (np.array(c, dtype=np.float64) for c in sample.colours[2 * t : 2 * t + 2])
            v = _digits()[idx][..., None]
            tiles.append(bg + (fg - bg) * v)
        rows = [np.concatenate(tiles[r * k : (r + 1) * k], axis=1) for r in range(k)]
        rgb = _resize(np.clip(np.rint(np.concatenate(rows, axis=0)), 0, 255).astype(np.uint8))
    else:
        top, left, bottom, right = sample.box
        rgb = _resize(np.ascontiguousarray(photos()[sample.source][top:bottom, left:right]))
    return np.ascontiguousarray(rgb[:, ::-1]) if sample.flip else rgb


def preprocess(rgb: np.ndarray) -> np.ndarray:
    """uint8 RGB [..., H, W, 3] -> float32 [..., 3, H, W], ``(rgb - 127) / 128`` (EfficientNet-Lite)."""
    x = (np.asarray(rgb, dtype=np.float32) - np.float32(MEAN)) / np.float32(STD)
    return np.ascontiguousarray(np.moveaxis(x, -1, -3))


def center_view(name: str) -> np.ndarray:
    """The whole photo ``name`` the way the TensorFlow reference evaluates ImageNet images.

    Centre crop of 224/(224+32) of the shorter side, bicubic resize to 224x224, preprocessed:
    float32 [1, 3, 224, 224]. It spans both splits' regions, so it is for sanity checks of the
    model (what does it see in this photo), not for calibration or evaluation.
    """
    img = photos()[name]
    height, width = img.shape[:2]
    side = int(round(min(height, width) * SIZE / (SIZE + 32)))
    y, x = (height - side) // 2, (width - side) // 2
    return preprocess(_resize(np.ascontiguousarray(img[y : y + side, x : x + side])))[None]


def images(split: str, n: int, seed: int = 0) -> np.ndarray:
    """``n`` preprocessed images of ``split`` ("calib" or "eval"): float32 [n, 3, 224, 224].

    The same ``(split, n, seed)`` gives the same array; the first ``n`` images are the same for any
    larger ``n``; "calib" and "eval" never share a photo pixel or a digit (see the module doc).
    """
    specs = samples(split, n, seed)
    if not specs:
        return np.zeros((0, 3, SIZE, SIZE), dtype=np.float32)
    return preprocess(np.stack([render(s) for s in specs]))


def write_npz(path: str | Path, split: str, n: int, seed: int = 0) -> Path:
    """Write :func:`images` as an .npz with one array ``image`` (float32 [n, 3, 224, 224]).

    ``image`` is the graph input name of the zoo's EfficientNet-Lite0; the first axis is samples.
    """
    path = Path(path)
    array = images(split, n, seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:  # np.savez would append ".npz" to a str path without it
        np.savez(f, image=array)
    return path

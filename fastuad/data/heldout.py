"""A held-out check set: other real photographs than the demo's, with other, small drawn defects.

The demo set (:mod:`fastuad.data.demo`) is what models are tuned on; this set is for checking
that a change generalises, and is never tuned on. It is built the same way, from photographs
that ship inside installed packages (nothing is downloaded), but from other photographs and
with other defects:

- textures (crops from disjoint strips for train and test): ``ihc`` (scikit-image's
  immunohistochemistry micrograph), ``moon`` (grey lunar surface), ``retina`` (crops inside
  the fundus disk: vessels on a smooth background);
- objects (aligned views with small shifts, scale and brightness changes): ``cell`` (a grey
  microscopy image of a floating cell), ``flower`` (scikit-learn's sample photograph).

Test defects, all small (about 0.1-2% of the image) and with exact masks (the mask is exactly
the set of pixels the defect changed):

- ``patch``: a DRAEM-style Perlin-shaped patch (:func:`fastuad.data.synthesis.perlin_mask`) in
  a small window, filled with a crop of another of these photographs, partly blended;
- ``crack``: a thin jagged line (a random walk) that darkens or lightens what it crosses;
- ``stain``: a translucent irregular spot that shifts the brightness and tint of the texture
  under it (the texture stays visible).

Defects on grey photographs are grey. Everything is a pure function of ``seed``.

Layout: ``<root>/<class>/train/good/*.png``, ``<class>/test/{good,patch,crack,stain}/*.png``,
``<class>/ground_truth/<defect>/<name>_mask.png``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import numpy as np

from fastuad.data.demo import _object_view, _resize, _texture_crop, write_mvtec_set
from fastuad.data.synthesis import perlin_mask

__all__ = ["HELDOUT_CLASSES", "HELDOUT_DEFECTS", "make_heldout_dataset"]

TEXTURES = ("ihc", "moon", "retina")
OBJECTS = ("cell", "flower")
HELDOUT_CLASSES = tuple(sorted(TEXTURES + OBJECTS))
HELDOUT_DEFECTS = ("crack", "patch", "stain")
_MIN_CHANGE = 20.0  # mean absolute change (grey levels) a defect must make over its mask
_VERSION = 1


def _grey3(img: np.ndarray) -> np.ndarray:
    img = np.asarray(img)
    if img.ndim == 2:
        img = np.repeat(img[..., None], 3, axis=2)
    return np.ascontiguousarray(img[..., :3]).astype(np.uint8)


def _photo(name: str) -> np.ndarray:
    """The class photograph as uint8 HxWx3 (grey ones repeated over the channels)."""
    import skimage.data

    if name == "flower":
        from sklearn.datasets import load_sample_image

        return _grey3(load_sample_image("flower.jpg"))
    loaders: dict[str, Callable[[], np.ndarray]] = {
        "ihc": skimage.data.immunohistochemistry,
        "moon": skimage.data.moon,
        "retina": skimage.data.retina,
        "cell": skimage.data.cell,
    }
    return _grey3(loaders[name]())


def _texture_region(name: str, photo: np.ndarray) -> tuple[int, int, int, int]:
    """``(y0, x0, h, w)`` of the part of a texture photograph crops are taken from."""
    h, w = photo.shape[:2]
    if name == "retina":  # the square inside the fundus disk (radius ~0.45 of the side)
        side = int(min(h, w) * 0.45 * np.sqrt(2))
        return (h - side) // 2, (w - side) // 2, side, side
    return 0, 0, h, w


def _is_grey(img: np.ndarray) -> bool:
    return bool((img[..., 0] == img[..., 1]).all() and (img[..., 1] == img[..., 2]).all())


def _patch(img: np.ndarray, rng: np.random.Generator, donors: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """A Perlin-shaped patch, 8-16% of the side wide, filled with another photograph (opacity 0.6-1)."""
    s = img.shape[0]
    win = max(4, int(rng.uniform(0.08, 0.16) * s))
    shape = perlin_mask((win, win), rng, scale_range=(1, 3), threshold=0.25).astype(bool)
    y, x = (int(rng.integers(int(0.1 * s), int(0.9 * s) - win + 1)) for _ in range(2))
    mask = np.zeros(img.shape[:2], dtype=bool)
    mask[y : y + win, x : x + win] = shape
    donor = donors[int(rng.integers(len(donors)))]
    dh, dw = donor.shape[:2]
    side = int(min(dh, dw) * rng.uniform(0.1, 0.3))
    dy, dx = int(rng.integers(0, dh - side + 1)), int(rng.integers(0, dw - side + 1))
    fill = _resize(np.ascontiguousarray(donor[dy : dy + side, dx : dx + side]), s).astype(np.float32)
    alpha = rng.uniform(0.6, 1.0)
    out = img.astype(np.float32)
    out[mask] = alpha * fill[mask] + (1 - alpha) * out[mask]
    return out, mask


def _crack(img: np.ndarray, rng: np.random.Generator, donors: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """A jagged random-walk line, 15-35% of the side long, 1-2 px wide at 256 px, darkening or lightening."""
    from skimage.draw import disk

    s = img.shape[0]
    length = rng.uniform(0.15, 0.35) * s
    p = rng.uniform(0.2, 0.8, size=2) * s
    heading = rng.uniform(0, 2 * np.pi)
    radius = max(0.7, rng.uniform(0.5, 1.0) * s / 256)
    mask = np.zeros(img.shape[:2], dtype=bool)
    step = 0.5
    for _ in range(int(length / step)):
        heading += rng.normal(0, 0.25)
        p = np.clip(p + step * np.array([np.sin(heading), np.cos(heading)]), 1, s - 2)
        rr, cc = disk(tuple(p), radius, shape=mask.shape)
        mask[rr, cc] = True
    out = img.astype(np.float32)
    if rng.random() < 0.7:  # a dark crack
        out[mask] *= rng.uniform(0.15, 0.45)
    else:  # a bright one
        out[mask] = 255 - (255 - out[mask]) * rng.uniform(0.15, 0.45)
    return out, mask


def _stain(img: np.ndarray, rng: np.random.Generator, donors: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """A translucent irregular spot, 3-7% of the side in radius: brightness and tint shifted, texture kept."""
    from skimage.draw import polygon

    s = img.shape[0]
    cy, cx = rng.uniform(0.15, 0.85, size=2) * s
    r = rng.uniform(0.03, 0.07) * s
    angles = np.sort(rng.uniform(0, 2 * np.pi, size=11))
    radii = r * rng.uniform(0.6, 1.25, size=11)
    rr, cc = polygon(cy + radii * np.sin(angles), cx + radii * np.cos(angles), shape=img.shape[:2])
    mask = np.zeros(img.shape[:2], dtype=bool)
    mask[rr, cc] = True
    gain = rng.uniform(0.35, 0.6) if rng.random() < 0.6 else rng.uniform(1.5, 2.2)
    tint = rng.uniform(0.7, 1.3, size=3)
    tint /= tint.mean()
    out = img.astype(np.float32)
    out[mask] = out[mask] * gain * tint + (0 if gain < 1 else 25.0)
    return out, mask


_DEFECTS = {"patch": _patch, "crack": _crack, "stain": _stain}


def _draw_defect(img: np.ndarray, kind: str, rng: np.random.Generator, donors: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """``img`` with a defect of ``kind`` drawn on it, and the mask of exactly the changed pixels.

    A draw that changes too few pixels or too little (an invisible defect) is drawn again.
    """
    grey = _is_grey(img)
    for _ in range(50):
        out, mask = _DEFECTS[kind](img, rng, donors)
        if grey:
            out = np.repeat(out.mean(axis=2, keepdims=True), 3, axis=2)
        out = np.clip(np.rint(out), 0, 255).astype(np.uint8)
        changed = np.any(out != img, axis=2)
        mask = mask & changed
        if mask.sum() >= 4 and np.abs(out[mask].astype(np.float32) - img[mask]).mean() >= _MIN_CHANGE:
            break
    return out, mask


def make_heldout_dataset(
    root: str | Path,
    seed: int = 0,
    image_size: int = 256,
    n_train: int = 40,
    n_test_good: int = 10,
    n_test_per_defect: int = 8,
    classes: tuple[str, ...] = HELDOUT_CLASSES,
) -> Path:
    """Write the held-out set under ``root`` (MVTec AD layout) and return ``root``.

    A ``heldout.json`` records the parameters; calling again with the same ones reuses the files.
    """
    photos = {name: _photo(name) for name in HELDOUT_CLASSES}

    def writer(name: str, ci: int):
        rng = np.random.default_rng([seed, 1000 + ci])
        photo = photos[name]
        donors = [p for n, p in sorted(photos.items()) if n != name]
        if _is_grey(photo):
            donors = [_grey3(d.mean(axis=2).astype(np.uint8)) for d in donors]
        if name in TEXTURES:
            region = _texture_region(name, photo)
            view = lambda test: _texture_crop(photo, rng, image_size, test, region)  # noqa: E731
        else:
            view = lambda test: _object_view(photo, rng, image_size)  # noqa: E731
        return view, lambda img, kind: _draw_defect(img, kind, rng, donors)

    return write_mvtec_set(
        root, manifest="heldout.json", version=_VERSION, known_classes=HELDOUT_CLASSES, defects=HELDOUT_DEFECTS,
        classes=classes, seed=seed, image_size=image_size, n_train=n_train, n_test_good=n_test_good,
        n_test_per_defect=n_test_per_defect, writer=writer,
    )

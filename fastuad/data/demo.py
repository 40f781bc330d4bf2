"""The ``demo`` data set: real photographs bundled with scikit-image, cut into an MVTec AD layout.

Nothing is downloaded: the photographs ship inside the scikit-image wheel. Three textures
(``brick``, ``grass``, ``gravel``) give many crops each; two objects (``coffee``, ``chelsea``)
give aligned views with small shifts, scale and brightness changes, as MVTec objects are
photographed. Test images carry drawn defects - thin scratches, filled blobs, tinted colour
spots - with exact masks (the mask is exactly the set of pixels the defect changed). Texture
test crops come from a strip of the photograph that no train crop touches, so the test is not a
memory test. Everything is a pure function of ``seed``.

Layout: ``<root>/<class>/train/good/*.png``, ``<class>/test/{good,scratch,blob,spot}/*.png``,
``<class>/ground_truth/<defect>/<name>_mask.png``.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Callable

import numpy as np
from PIL import Image

from fastuad.errors import DataError

__all__ = ["DEMO_CLASSES", "DEMO_DEFECTS", "make_demo_dataset"]

TEXTURES = ("brick", "grass", "gravel")
OBJECTS = ("coffee", "chelsea")
DEMO_CLASSES = tuple(sorted(TEXTURES + OBJECTS))
DEMO_DEFECTS = ("blob", "scratch", "spot")
_TRAIN_FRACTION = 0.65  # texture train crops start left of this fraction of the width, test crops right of it
_VERSION = 1


def _photo(name: str) -> np.ndarray:
    """A bundled scikit-image photograph as uint8 HxWx3."""
    import skimage.data

    img = np.asarray(getattr(skimage.data, name)())
    if img.ndim == 2:
        img = np.repeat(img[..., None], 3, axis=2)
    return np.ascontiguousarray(img[..., :3]).astype(np.uint8)


def _resize(img: np.ndarray, size: int) -> np.ndarray:
    return np.asarray(Image.fromarray(img).resize((size, size), Image.BICUBIC))


def _texture_crop(
    photo: np.ndarray, rng: np.random.Generator, size: int, test: bool, region: tuple[int, int, int, int] | None = None
) -> np.ndarray:
    """A random square crop (30% of the shorter side of ``region``, ``(y0, x0, h, w)``, default
    the whole photograph), flipped at random, resized to ``size``: train crops from the left
    ``_TRAIN_FRACTION`` of the region's width, test crops from the rest."""
    y0, x0, h, w = (0, 0, *photo.shape[:2]) if region is None else region
    crop = int(min(h, w) * 0.3)
    split = int(w * _TRAIN_FRACTION)
    y = y0 + int(rng.integers(0, h - crop + 1))
    x = x0 + (int(rng.integers(split, w - crop + 1)) if test else int(rng.integers(0, split - crop + 1)))
    out = photo[y : y + crop, x : x + crop]
    if rng.random() < 0.5:
        out = out[:, ::-1]
    if rng.random() < 0.5:
        out = out[::-1]
    return _resize(np.ascontiguousarray(out), size)


def _object_view(photo: np.ndarray, rng: np.random.Generator, size: int) -> np.ndarray:
    """The centred square of the photograph, shifted by up to 3% and scaled by up to 4%, brightness +-6%."""
    h, w = photo.shape[:2]
    side = int(min(h, w) * 0.92 * (1 + rng.uniform(-0.04, 0.04)))
    cy = (h - side) // 2 + int(rng.uniform(-0.03, 0.03) * h)
    cx = (w - side) // 2 + int(rng.uniform(-0.03, 0.03) * w)
    cy, cx = int(np.clip(cy, 0, h - side)), int(np.clip(cx, 0, w - side))
    out = _resize(photo[cy : cy + side, cx : cx + side], size).astype(np.float32)
    out *= 1 + rng.uniform(-0.06, 0.06)
    return np.clip(out, 0, 255).astype(np.uint8)


def _contrast_colour(img: np.ndarray, mask: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A colour well away from the mean colour under ``mask`` (defects must be visible)."""
    mean = img[mask].mean(axis=0) if mask.any() else img.reshape(-1, 3).mean(axis=0)
    grey = rng.random() < 0.4  # a grey defect now and then: not every defect is a colour cue
    draw = (lambda: np.full(3, rng.uniform(0, 255))) if grey else (lambda: rng.uniform(0, 255, size=3))  # noqa: E731
    colour = draw()
    for _ in range(20):
        if np.abs(colour - mean).max() > 80:
            break
        colour = draw()
    else:
        colour = 255.0 - mean
    return colour


def _scratch(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A thin curved stroke (quadratic Bezier, 1-3 px wide at 128 px)."""
    from skimage.draw import disk

    s = img.shape[0]
    p0, p1, p2 = (rng.uniform(0.15, 0.85, size=(3, 2)) * s)
    length = rng.uniform(0.2, 0.45) * s
    p2 = p0 + (p2 - p0) / (np.linalg.norm(p2 - p0) + 1e-6) * length
    p1 = (p0 + p2) / 2 + rng.uniform(-0.15, 0.15, size=2) * s
    radius = max(1.0, rng.uniform(0.6, 1.4) * s / 128)
    mask = np.zeros(img.shape[:2], dtype=bool)
    for t in np.linspace(0, 1, int(length * 3)):
        y, x = (1 - t) ** 2 * p0 + 2 * (1 - t) * t * p1 + t**2 * p2
        rr, cc = disk((y, x), radius, shape=mask.shape)
        mask[rr, cc] = True
    return mask


def _blob(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """An irregular filled polygon, 4-12% of the image side in radius."""
    from skimage.draw import polygon

    s = img.shape[0]
    cy, cx = rng.uniform(0.2, 0.8, size=2) * s
    r = rng.uniform(0.04, 0.12) * s
    angles = np.sort(rng.uniform(0, 2 * np.pi, size=9))
    radii = r * rng.uniform(0.55, 1.3, size=9)
    rr, cc = polygon(cy + radii * np.sin(angles), cx + radii * np.cos(angles), shape=img.shape[:2])
    mask = np.zeros(img.shape[:2], dtype=bool)
    mask[rr, cc] = True
    return mask


def _spot(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A rotated ellipse, 5-14% of the side, that will be tinted (texture kept, colour changed)."""
    from skimage.draw import ellipse

    s = img.shape[0]
    cy, cx = rng.uniform(0.2, 0.8, size=2) * s
    ry, rx = rng.uniform(0.05, 0.14, size=2) * s
    rr, cc = ellipse(cy, cx, ry, rx, shape=img.shape[:2], rotation=rng.uniform(0, np.pi))
    mask = np.zeros(img.shape[:2], dtype=bool)
    mask[rr, cc] = True
    return mask


def _draw_defect(img: np.ndarray, kind: str, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """``img`` with a defect of ``kind`` drawn on it, and the mask of the changed pixels."""
    shape_fn = {"scratch": _scratch, "blob": _blob, "spot": _spot}[kind]
    mask = shape_fn(img, rng)
    while mask.sum() < 4:
        mask = shape_fn(img, rng)
    out = img.astype(np.float32)
    colour = _contrast_colour(img, mask, rng)
    if kind == "spot":  # keep the texture, change its colour: multiply by a strong tint
        tint = colour / max(colour.mean(), 1.0)
        out[mask] = np.clip(out[mask] * 0.35 + 0.65 * out[mask].mean(axis=1, keepdims=True) * tint, 0, 255)
    else:
        noise = rng.normal(0, 12, size=(int(mask.sum()), 3))
        out[mask] = np.clip(colour + noise, 0, 255)
    out = out.astype(np.uint8)
    changed = np.any(out != img, axis=2)
    return out, mask & changed


def _save(img: np.ndarray, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(img).save(path)


# A class's writer: ``(name, class position) -> (view, defect)``, where ``view(test)`` renders one
# image and ``defect(image, kind)`` draws a defect on it, returning ``(image, mask)``.
ClassWriter = Callable[[str, int], tuple[Callable[[bool], np.ndarray], Callable[[np.ndarray, str], tuple[np.ndarray, np.ndarray]]]]


def write_mvtec_set(
    root: str | Path,
    *,
    manifest: str,
    version: int,
    known_classes: tuple[str, ...],
    defects: tuple[str, ...],
    classes: tuple[str, ...],
    seed: int,
    image_size: int,
    n_train: int,
    n_test_good: int,
    n_test_per_defect: int,
    writer: ClassWriter,
) -> Path:
    """Write a generated set under ``root`` in MVTec AD layout and return ``root``.

    The parameters are checked (``DataError`` naming the argument) and recorded in the
    ``manifest`` file: an identical set already there is reused, one built with other parameters
    is rebuilt whole. Per class, in this order: ``n_train`` normal training images, ``n_test_good``
    normal test images, then ``n_test_per_defect`` images of each defect kind with their masks.
    """
    if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 32:
        raise DataError(f"image_size must be an int >= 32, got {image_size!r}")
    unknown = sorted(set(classes) - set(known_classes))
    if unknown or not classes:
        raise DataError(f"classes must be a non-empty subset of {known_classes}, got {tuple(classes)}")
    root = Path(root)
    params = {"version": version, "seed": seed, "image_size": image_size, "n_train": n_train,
              "n_test_good": n_test_good, "n_test_per_defect": n_test_per_defect, "classes": sorted(classes)}
    record = root / manifest
    if record.is_file():
        if json.loads(record.read_text()) == params:
            return root
        for name in known_classes:  # built with other parameters: rebuild it whole
            shutil.rmtree(root / name, ignore_errors=True)
        record.unlink()
    for ci, name in enumerate(sorted(classes)):
        view, defect = writer(name, ci)
        base = root / name
        for i in range(n_train):
            _save(view(False), base / "train" / "good" / f"{i:03d}.png")
        for i in range(n_test_good):
            _save(view(True), base / "test" / "good" / f"{i:03d}.png")
        for kind in defects:
            for i in range(n_test_per_defect):
                img, mask = defect(view(True), kind)
                _save(img, base / "test" / kind / f"{i:03d}.png")
                _save(mask.astype(np.uint8) * 255, base / "ground_truth" / kind / f"{i:03d}_mask.png")
    root.mkdir(parents=True, exist_ok=True)
    record.write_text(json.dumps(params))
    return root


def make_demo_dataset(
    root: str | Path,
    seed: int = 0,
    image_size: int = 128,
    n_train: int = 40,
    n_test_good: int = 10,
    n_test_per_defect: int = 8,
    classes: tuple[str, ...] = DEMO_CLASSES,
) -> Path:
    """Write the demo set under ``root`` (MVTec AD layout) and return ``root``.

    A ``demo.json`` records the parameters; calling again with the same ones reuses the files.
    """

    def writer(name: str, ci: int):
        rng = np.random.default_rng([seed, ci])
        photo = _photo(name)
        if name in TEXTURES:
            view = lambda test: _texture_crop(photo, rng, image_size, test)  # noqa: E731
        else:
            view = lambda test: _object_view(photo, rng, image_size)  # noqa: E731
        return view, lambda img, kind: _draw_defect(img, kind, rng)

    return write_mvtec_set(
        root, manifest="demo.json", version=_VERSION, known_classes=DEMO_CLASSES, defects=DEMO_DEFECTS,
        classes=classes, seed=seed, image_size=image_size, n_train=n_train, n_test_good=n_test_good,
        n_test_per_defect=n_test_per_defect, writer=writer,
    )

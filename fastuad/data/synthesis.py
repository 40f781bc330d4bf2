"""Pseudo-anomaly synthesis for models that train on fake defects (MDD-Net, DM-GRD, ...).

* :func:`perlin_mask`: a binary blob mask from thresholded 2-D Perlin noise (DRAEM).
* :class:`DraemSynthesizer`: fills a Perlin mask with another image or texture, blended with
  the original by a random opacity (DRAEM: ``I*(1-M) + (1-b)*T*M + b*I*M``).
* :class:`CutPaste`: cuts a random rectangle of the image and pastes it elsewhere.

Both synthesizers are seeded (``numpy.random.Generator``), take a float image tensor
``[3, H, W]`` with values in [0, 1] (use :func:`fastuad.data.denormalize` on dataset items
first) and return ``(image [3, H, W] float32 in [0, 1], mask [1, H, W] float32 in {0, 1})``.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from fastuad.data.transforms import IMAGE_EXTENSIONS, read_image
from fastuad.errors import DataError

__all__ = ["perlin_noise", "perlin_mask", "DraemSynthesizer", "CutPaste"]


def _fade(t: np.ndarray) -> np.ndarray:
    return t * t * t * (t * (t * 6 - 15) + 10)


def perlin_noise(shape: tuple[int, int], res: tuple[int, int], rng: np.random.Generator) -> np.ndarray:
    """2-D gradient (Perlin) noise of ``shape`` with ``res`` lattice cells per axis, in about [-1, 1]."""
    h, w = shape
    ry, rx = res
    gy = np.linspace(0, ry, h, endpoint=False)
    gx = np.linspace(0, rx, w, endpoint=False)
    yi, xi = np.floor(gy).astype(int), np.floor(gx).astype(int)
    fy, fx = (gy - yi)[:, None], (gx - xi)[None, :]
    angles = rng.uniform(0, 2 * math.pi, (ry + 1, rx + 1))
    grads = np.stack([np.cos(angles), np.sin(angles)], -1)

    def corner(dy: int, dx: int) -> np.ndarray:
        g = grads[(yi + dy)[:, None], (xi + dx)[None, :]]
        return g[..., 0] * (fy - dy) + g[..., 1] * (fx - dx)

    uy, ux = _fade(fy), _fade(fx)
    top = corner(0, 0) * (1 - ux) + corner(0, 1) * ux
    bottom = corner(1, 0) * (1 - ux) + corner(1, 1) * ux
    return math.sqrt(2) * (top * (1 - uy) + bottom * uy)


def perlin_mask(
    shape: tuple[int, int],
    rng: np.random.Generator,
    scale_range: tuple[int, int] = (0, 6),
    threshold: float = 0.5,
    max_tries: int = 100,
) -> np.ndarray:
    """A non-empty float32 ``[H, W]`` mask in {0, 1}: Perlin noise above ``threshold`` (DRAEM).

    The lattice resolution per axis is ``2**k`` with ``k`` drawn from ``scale_range`` (end
    excluded), so blobs range from image-sized to fine speckle. Draws again (up to
    ``max_tries``) until at least one pixel is set.
    """
    if len(shape) != 2 or min(shape) < 1:
        raise DataError(f"shape must be (H, W) with H, W >= 1, got {shape!r}")
    lo, hi = scale_range
    if not 0 <= lo < hi:
        raise DataError(f"scale_range must be (lo, hi) with 0 <= lo < hi, got {scale_range!r}")
    for _ in range(max_tries):
        res = (2 ** int(rng.integers(lo, hi)), 2 ** int(rng.integers(lo, hi)))
        mask = (perlin_noise(tuple(shape), res, rng) > threshold).astype(np.float32)
        if mask.any():
            return mask
    raise DataError(f"no Perlin mask above threshold {threshold} in {max_tries} draws; lower the threshold")


def _check_image(image: torch.Tensor) -> torch.Tensor:
    if not isinstance(image, torch.Tensor) or not image.is_floating_point():
        raise TypeError(f"image must be a float torch.Tensor [3, H, W] in [0, 1], got {type(image).__name__}")
    if image.dim() != 3 or image.shape[0] != 3:
        raise DataError(f"image must have shape [3, H, W], got {tuple(image.shape)}")
    return image.to(torch.float32)


def _texture_tensor(source, size: tuple[int, int]) -> torch.Tensor:
    """A texture (path, PIL image, uint8 HxWx3 array or float [3,H,W] tensor) as float [3, *size]."""
    if isinstance(source, (str, Path)):
        source = read_image(source)
    if isinstance(source, Image.Image):
        source = np.asarray(source.convert("RGB"))
    if isinstance(source, np.ndarray):
        if source.ndim != 3 or source.shape[2] != 3:
            raise DataError(f"texture arrays must be HxWx3, got shape {source.shape}")
        source = torch.from_numpy(source.astype(np.float32) / (255.0 if source.dtype == np.uint8 else 1.0)).permute(2, 0, 1)
    tex = _check_image(source)
    return F.interpolate(tex[None], size=size, mode="bilinear", align_corners=False, antialias=True)[0].clamp(0, 1)


class DraemSynthesizer:
    """DRAEM-style anomalies: a Perlin mask filled with a texture, blended with the image.

    ``texture_source`` is a directory of images (searched recursively, e.g. DTD), or a sequence
    of image paths, PIL images, uint8 ``HxWx3`` arrays or float ``[3,H,W]`` tensors in [0, 1]
    (for example other training images). Each call draws a texture, a mask and an opacity
    ``beta`` in ``beta_range`` (the texture's weight inside the mask is ``1 - beta``).
    """

    def __init__(self, texture_source, seed: int = 0, beta_range: tuple[float, float] = (0.0, 0.8), scale_range=(0, 6)):
        if isinstance(texture_source, (str, Path)):
            folder = Path(texture_source)
            if not folder.is_dir():
                raise DataError(f"texture_source {folder} is not a directory")
            textures: Sequence = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS)
        else:
            textures = list(texture_source)
        if not textures:
            raise DataError(f"texture_source holds no images: {texture_source!r}")
        lo, hi = beta_range
        if not 0 <= lo <= hi <= 1:
            raise DataError(f"beta_range must satisfy 0 <= lo <= hi <= 1, got {beta_range!r}")
        self.textures = textures
        self.beta_range = (float(lo), float(hi))
        self.scale_range = scale_range
        self.rng = np.random.default_rng(seed)

    def __call__(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        image = _check_image(image)
        h, w = image.shape[1:]
        texture = _texture_tensor(self.textures[int(self.rng.integers(len(self.textures)))], (h, w)).to(image.device)
        mask = torch.from_numpy(perlin_mask((h, w), self.rng, self.scale_range))[None].to(image.device)
        beta = float(self.rng.uniform(*self.beta_range))
        out = image * (1 - mask) + ((1 - beta) * texture + beta * image) * mask
        return out, mask


class CutPaste:
    """CutPaste (Li et al. 2021): copy a random rectangle of the image to another place.

    The patch covers ``area_ratio`` of the image (uniform) with a log-uniform aspect ratio in
    ``aspect_ratio``; its brightness is scaled by a factor in ``1 ± jitter`` so that a patch of
    a uniform region still differs from where it lands.
    """

    def __init__(
        self,
        seed: int = 0,
        area_ratio: tuple[float, float] = (0.02, 0.15),
        aspect_ratio: tuple[float, float] = (0.3, 3.3),
        jitter: float = 0.1,
    ):
        if not 0 < area_ratio[0] <= area_ratio[1] < 1:
            raise DataError(f"area_ratio must satisfy 0 < lo <= hi < 1, got {area_ratio!r}")
        if not 0 < aspect_ratio[0] <= aspect_ratio[1]:
            raise DataError(f"aspect_ratio must satisfy 0 < lo <= hi, got {aspect_ratio!r}")
        if not 0 <= jitter < 1:
            raise DataError(f"jitter must be in [0, 1), got {jitter!r}")
        self.area_ratio = area_ratio
        self.aspect_ratio = aspect_ratio
        self.jitter = jitter
        self.rng = np.random.default_rng(seed)

    def __call__(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        image = _check_image(image)
        h, w = image.shape[1:]
        rng = self.rng
        area = rng.uniform(*self.area_ratio) * h * w
        aspect = math.exp(rng.uniform(math.log(self.aspect_ratio[0]), math.log(self.aspect_ratio[1])))
        ph = int(min(h - 1, max(1, round(math.sqrt(area * aspect)))))
        pw = int(min(w - 1, max(1, round(math.sqrt(area / aspect)))))
        sy, sx = int(rng.integers(0, h - ph + 1)), int(rng.integers(0, w - pw + 1))
        ty, tx = int(rng.integers(0, h - ph + 1)), int(rng.integers(0, w - pw + 1))
        factor = float(rng.uniform(1 - self.jitter, 1 + self.jitter))
        patch = (image[:, sy : sy + ph, sx : sx + pw] * factor).clamp(0, 1)
        out = image.clone()
        out[:, ty : ty + ph, tx : tx + pw] = patch
        mask = torch.zeros(1, h, w, dtype=torch.float32, device=image.device)
        mask[:, ty : ty + ph, tx : tx + pw] = 1.0
        return out, mask

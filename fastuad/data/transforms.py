"""Image and mask transforms shared by the datasets: resize, ImageNet normalisation, masks.

Images are resized with bilinear filtering (PIL, antialiased) and normalised with the ImageNet
mean and standard deviation the pretrained encoders expect. Masks are resized with nearest
neighbour so they stay binary, then thresholded at > 0 (MVTec masks are 0/255).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image

from fastuad.errors import DataError

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "IMAGE_EXTENSIONS",
    "normalize",
    "denormalize",
    "image_to_tensor",
    "mask_to_tensor",
    "read_image",
    "read_mask",
]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")


def _channel_stats(image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    if image.dim() not in (3, 4) or image.shape[-3] != 3:
        raise DataError(f"image must have shape [3, H, W] or [B, 3, H, W], got {tuple(image.shape)}")
    shape = (3, 1, 1)
    mean = torch.tensor(IMAGENET_MEAN, dtype=image.dtype, device=image.device).view(shape)
    std = torch.tensor(IMAGENET_STD, dtype=image.dtype, device=image.device).view(shape)
    return mean, std


def normalize(image: torch.Tensor) -> torch.Tensor:
    """``[3,H,W]`` or ``[B,3,H,W]`` in [0, 1] -> ImageNet-normalised."""
    mean, std = _channel_stats(image)
    return (image - mean) / std


def denormalize(image: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`normalize`: back to [0, 1] (not clamped)."""
    mean, std = _channel_stats(image)
    return image * std + mean


def image_to_tensor(image: Image.Image, size: int) -> torch.Tensor:
    """RGB PIL image -> float32 ``[3, size, size]``, bilinear resize, ImageNet-normalised."""
    image = image.convert("RGB").resize((size, size), Image.BILINEAR)
    array = np.asarray(image, dtype=np.float32) / 255.0
    return normalize(torch.from_numpy(array).permute(2, 0, 1).contiguous())


def mask_to_tensor(mask: Image.Image, size: int) -> torch.Tensor:
    """Mask PIL image -> float32 ``[1, size, size]`` in {0, 1}, nearest resize, any non-zero is 1."""
    mask = mask.convert("L").resize((size, size), Image.NEAREST)
    return torch.from_numpy((np.asarray(mask) > 0).astype(np.float32))[None]


def _read(path: Path, what: str) -> Image.Image:
    try:
        with Image.open(path) as img:
            img.load()
            return img
    except (OSError, SyntaxError, ValueError) as exc:
        raise DataError(f"cannot read {what} {path}: {exc}") from exc


def read_image(path: str | Path) -> Image.Image:
    """Decode an image file fully (RGB); ValueError naming the file if it cannot be read."""
    return _read(Path(path), "image").convert("RGB")


def read_mask(path: str | Path) -> Image.Image:
    """Decode a mask file fully (grayscale); ValueError naming the file if it cannot be read."""
    return _read(Path(path), "mask").convert("L")

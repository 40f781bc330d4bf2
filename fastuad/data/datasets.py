"""Anomaly-detection datasets: MVTec AD, VisA (1cls split), BTAD and a plain folder layout.

Every class under ``root`` is used (unified multi-class setting) unless ``classes`` narrows
them; ``dataset.classes`` is sorted and a sample's ``class_index`` is its class's position.
An item is a dict: ``image`` float32 ``[3,S,S]`` (ImageNet-normalised), ``mask`` float32
``[1,S,S]`` in {0, 1} (zeros for good images), ``label`` (0 good, 1 anomalous),
``class_index``, ``class_name`` and ``path``.

Layouts (``<stem>`` is an image's file name without its extension):

=========  ==============================  ===================  ==========================================
name       train images                    test images          mask of an anomalous test image
=========  ==============================  ===================  ==========================================
mvtec      ``<cls>/train/good``            ``<cls>/test/<d>``   ``<cls>/ground_truth/<d>/<stem>_mask.png``
visa       ``<cls>/train/good``            ``<cls>/test/good``, ``<cls>/ground_truth/bad/<stem>.png``
                                           ``<cls>/test/bad``
btad       ``<cls>/train/ok``              ``<cls>/test/ok``,   ``<cls>/ground_truth/ko/<stem>.png`` (01,
                                           ``<cls>/test/ko``    02) or ``<stem>.bmp`` (03)
folder     ``<cls>/train/good``            ``<cls>/test/<d>``   ``<cls>/ground_truth/<d>/<stem>.<ext>`` or
                                                                ``<stem>_mask.<ext>``, any image extension
=========  ==============================  ===================  ==========================================

VisA follows the 1cls split as written by the VisA authors' ``prepare_data.py`` (amazon-science
/spot-diff ``utils/prepare_data.py``: ``<cls>/{train/good, test/good, test/bad,
ground_truth/bad}``, masks named like their image with ``.png``). BTAD follows the
``BTech_Dataset_transformed`` archive (classes ``01``-``03``, ``ok``/``ko``, masks ``.png``
except class ``03``'s ``.bmp``). The test folder of the good images is ``good`` (``ok`` for
BTAD); every other test folder holds anomalies. Image files: png, jpg, jpeg, bmp, tif, tiff.

Problems are never a silent wrong label: a missing root, no class folder, an unknown class, a
class without images for the split, an anomalous image without its mask, or a mask whose size
differs from its image's raise :class:`~fastuad.errors.DataError` (a ``ValueError``) naming
the path; a corrupt or unreadable image is skipped with a ``warnings.warn`` naming the file,
when the index is built. An image that passed that check but fails to decode later (changed or
damaged on disk mid-run) makes ``dataset[i]`` return ``None`` after a warning naming it;
:func:`collate_skip_unreadable` (the engine's ``collate_fn``) drops such items from the batch.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch
from PIL import Image

from fastuad.data.transforms import IMAGE_EXTENSIONS, image_to_tensor, mask_to_tensor, read_image, read_mask
from fastuad.errors import DataError

__all__ = [
    "AnomalyDataset",
    "MVTecDataset",
    "VisADataset",
    "BTADDataset",
    "FolderDataset",
    "DATASETS",
    "Sample",
    "build_dataset",
    "collate_skip_unreadable",
]

SPLITS = ("train", "test")


@dataclass(frozen=True)
class Sample:
    """One indexed image: its file, label, class and (anomalous test images only) mask file."""

    path: Path
    label: int
    class_index: int
    class_name: str
    mask_path: Path | None = None


def _image_files(folder: Path) -> list[Path]:
    return sorted(
        p for p in folder.iterdir() if p.is_file() and not p.name.startswith(".") and p.suffix.lower() in IMAGE_EXTENSIONS
    )


def _image_size(path: Path) -> tuple[int, int] | None:
    """Width and height of a readable image; None (after a warning naming the file) otherwise."""
    try:
        with Image.open(path) as img:
            size, fmt = img.size, img.format
            img.verify()  # checks the file's structure (PNG chunk CRCs, truncation) without decoding
        if fmt == "JPEG" and not _jpeg_complete(path):
            raise OSError("truncated JPEG (no end-of-image marker)")
        return size
    except Exception as exc:  # noqa: BLE001 - PIL raises many types for corrupt files
        warnings.warn(f"skipping unreadable image {path}: {type(exc).__name__}: {exc}", stacklevel=4)
        return None


def _jpeg_complete(path: Path) -> bool:
    """A JPEG ends with the EOI marker (PIL's ``verify`` does not check JPEG data)."""
    with open(path, "rb") as f:
        f.seek(0, 2)
        f.seek(max(0, f.tell() - 64))
        return f.read().rstrip(b"\x00\r\n ").endswith(b"\xff\xd9")


def _mask_size(path: Path) -> tuple[int, int]:
    try:
        with Image.open(path) as img:
            return img.size
    except Exception as exc:  # noqa: BLE001
        raise DataError(f"cannot read mask {path}: {type(exc).__name__}: {exc}") from exc


class AnomalyDataset(torch.utils.data.Dataset):
    """Base class: finds the classes under ``root``, indexes their images, loads items.

    Subclasses say where the images of a split live (:meth:`split_folders`) and where an
    anomalous image's mask is (:meth:`mask_candidates`).
    """

    good_folder = "good"
    layout = "abstract"

    def __init__(
        self,
        root: str | Path,
        split: str = "train",
        classes: Sequence[str] | str | None = None,
        image_size: int = 256,
    ):
        if split not in SPLITS:
            raise DataError(f"split must be one of {SPLITS}, got {split!r}")
        if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size <= 0:
            raise DataError(f"image_size must be a positive int, got {image_size!r}")
        self.root = Path(root).expanduser()
        self.split = split
        self.image_size = image_size
        if not self.root.is_dir():
            raise DataError(f"dataset root {self.root} does not exist or is not a directory")
        self.classes = self._select_classes(classes)
        self.samples: list[Sample] = []
        for index, name in enumerate(self.classes):
            found = self._index_class(index, name)
            if not found:
                where = ", ".join(str(self.root / name / f) for f in self.split_folders(self.split))
                raise DataError(f"class {name!r} has no {split} images (looked in {where})")
            self.samples.extend(found)

    # -- layout ------------------------------------------------------------------------------

    def split_folders(self, split: str) -> tuple[str, ...]:
        """Folders (relative to a class folder) whose subfolders hold the split's images."""
        return ("train",) if split == "train" else ("test",)

    def mask_candidates(self, class_dir: Path, defect: str, stem: str) -> list[Path]:
        """Where the mask of anomalous image ``stem`` of folder ``defect`` may be, in order."""
        raise NotImplementedError

    # -- indexing ----------------------------------------------------------------------------

    def _select_classes(self, classes: Sequence[str] | str | None) -> list[str]:
        found = sorted(
            p.name for p in self.root.iterdir() if p.is_dir() and any((p / f).is_dir() for f in ("train", "test"))
        )
        if not found:
            raise DataError(
                f"no class folders under {self.root}: expected {self.layout} layout <root>/<class>/train/{self.good_folder}"
            )
        if classes is None:
            return found
        wanted = [c.strip() for c in classes.split(",")] if isinstance(classes, str) else [str(c) for c in classes]
        wanted = [c for c in wanted if c]
        unknown = [c for c in wanted if c not in found]
        if unknown or not wanted:
            raise DataError(f"unknown classes {unknown or wanted} under {self.root}; available: {', '.join(found)}")
        return sorted(set(wanted))

    def _index_class(self, class_index: int, name: str) -> list[Sample]:
        class_dir = self.root / name
        samples = []
        for split_folder in self.split_folders(self.split):
            base = class_dir / split_folder
            if not base.is_dir():
                continue
            for folder in sorted(p for p in base.iterdir() if p.is_dir()):
                good = folder.name == self.good_folder
                if self.split == "train" and not good:
                    continue  # training uses defect-free images only
                for path in _image_files(folder):
                    size = _image_size(path)
                    if size is None:
                        continue
                    mask = None if good else self._find_mask(class_dir, folder.name, path, size)
                    samples.append(Sample(path, 0 if good else 1, class_index, name, mask))
        return samples

    def _find_mask(self, class_dir: Path, defect: str, image: Path, size: tuple[int, int]) -> Path:
        candidates = self.mask_candidates(class_dir, defect, image.stem)
        mask = next((p for p in candidates if p.is_file()), None)
        if mask is None:
            raise DataError(f"anomalous image {image} has no mask (looked for {', '.join(map(str, candidates))})")
        mask_size = _mask_size(mask)
        if mask_size != size:
            raise DataError(f"mask {mask} is {mask_size[0]}x{mask_size[1]} but its image {image} is {size[0]}x{size[1]}")
        return mask

    # -- access ------------------------------------------------------------------------------

    @property
    def labels(self) -> list[int]:
        return [s.label for s in self.samples]

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> dict | None:
        """The item dict, or ``None`` (after a warning naming the file) if its image or mask no
        longer decodes; :func:`collate_skip_unreadable` drops those from a batch."""
        if not -len(self) <= index < len(self):
            raise IndexError(f"index {index} out of range for a dataset of {len(self)} samples")
        s = self.samples[index]
        size = self.image_size
        try:
            image = image_to_tensor(read_image(s.path), size)
            if s.mask_path is None:
                mask = torch.zeros(1, size, size, dtype=torch.float32)
            else:
                mask = mask_to_tensor(read_mask(s.mask_path), size)
        except DataError as exc:  # read_image/read_mask name the file
            warnings.warn(f"skipping unreadable item {index}: {exc}", stacklevel=2)
            return None
        return {
            "image": image,
            "mask": mask,
            "label": s.label,
            "class_index": s.class_index,
            "class_name": s.class_name,
            "path": str(s.path),
        }

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(root={str(self.root)!r}, split={self.split!r}, classes={self.classes}, "
            f"image_size={self.image_size}, samples={len(self)})"
        )


class MVTecDataset(AnomalyDataset):
    """MVTec AD: ``<cls>/{train/good, test/<defect>, ground_truth/<defect>/<stem>_mask.png}``."""

    layout = "MVTec AD"

    def mask_candidates(self, class_dir: Path, defect: str, stem: str) -> list[Path]:
        return [class_dir / "ground_truth" / defect / f"{stem}_mask.png"]


class VisADataset(AnomalyDataset):
    """VisA after its 1cls split: ``<cls>/{train/good, test/{good,bad}, ground_truth/bad/<stem>.png}``."""

    layout = "VisA 1cls"

    def mask_candidates(self, class_dir: Path, defect: str, stem: str) -> list[Path]:
        return [class_dir / "ground_truth" / defect / f"{stem}.png"]


class BTADDataset(AnomalyDataset):
    """BTAD: ``<cls>/{train/ok, test/{ok,ko}, ground_truth/ko/<stem>.png|.bmp}``."""

    layout = "BTAD"
    good_folder = "ok"

    def mask_candidates(self, class_dir: Path, defect: str, stem: str) -> list[Path]:
        return [class_dir / "ground_truth" / defect / f"{stem}{ext}" for ext in (".png", ".bmp")]


class FolderDataset(AnomalyDataset):
    """Plain folders: MVTec-like, any image extension, masks ``<stem>.<ext>`` or ``<stem>_mask.<ext>``."""

    layout = "folder"

    def mask_candidates(self, class_dir: Path, defect: str, stem: str) -> list[Path]:
        folder = class_dir / "ground_truth" / defect
        return [folder / f"{stem}{suffix}{ext}" for suffix in ("", "_mask") for ext in IMAGE_EXTENSIONS]


def collate_skip_unreadable(items: list[dict | None]) -> dict | None:
    """``default_collate`` of the items that decoded; ``None`` when none of the batch did."""
    kept = [item for item in items if item is not None]
    if not kept:
        return None
    return torch.utils.data.default_collate(kept)


DATASETS: dict[str, type[AnomalyDataset]] = {
    "mvtec": MVTecDataset,
    "visa": VisADataset,
    "btad": BTADDataset,
    "folder": FolderDataset,
}


def build_dataset(
    name: str,
    root: str | Path,
    split: str = "train",
    classes: Sequence[str] | str | None = None,
    image_size: int = 256,
) -> AnomalyDataset:
    """The dataset of layout ``name`` (``mvtec | visa | btad | folder``) under ``root``."""
    key = str(name).lower()
    if key not in DATASETS:
        raise DataError(f"unknown dataset {name!r}; choose one of: {', '.join(DATASETS)}")
    return DATASETS[key](root, split=split, classes=classes, image_size=image_size)

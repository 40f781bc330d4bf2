"""Datasets (MVTec AD, VisA, BTAD, folder), transforms and pseudo-anomaly synthesis."""

from fastuad.data.datasets import (
    DATASETS,
    AnomalyDataset,
    BTADDataset,
    FolderDataset,
    MVTecDataset,
    Sample,
    VisADataset,
    build_dataset,
    collate_skip_unreadable,
)
from fastuad.data.transforms import IMAGENET_MEAN, IMAGENET_STD, denormalize, normalize
from fastuad.data.demo import make_demo_dataset
from fastuad.errors import DataError
from fastuad.data.heldout import make_heldout_dataset

__all__ = [
    "DATASETS",
    "AnomalyDataset",
    "BTADDataset",
    "FolderDataset",
    "MVTecDataset",
    "Sample",
    "VisADataset",
    "build_dataset",
    "collate_skip_unreadable",
    "DataError",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "denormalize",
    "normalize",
    "make_demo_dataset",
    "make_heldout_dataset",
]

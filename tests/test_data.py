"""Datasets: parsing of small generated folders in each layout, items, and every error path."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from fastuad.data import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    BTADDataset,
    FolderDataset,
    MVTecDataset,
    VisADataset,
    build_dataset,
    denormalize,
    normalize,
)

SIZE = 32  # stored image side; items are resized to IMAGE_SIZE
IMAGE_SIZE = 16


def _write_image(path: Path, seed: int, size: tuple[int, int] = (SIZE, SIZE)) -> None:
    rng = np.random.default_rng(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(path)


def _write_mask(path: Path, box: tuple[int, int, int, int], size: tuple[int, int] = (SIZE, SIZE)) -> None:
    m = np.zeros((size[1], size[0]), dtype=np.uint8)
    y0, y1, x0, x1 = box
    m[y0:y1, x0:x1] = 255
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(m).save(path)


BOX = (8, 24, 4, 12)  # rows 8..24, cols 4..12 of a 32x32 image -> rows 4..12, cols 2..6 at 16


def make_mvtec(root: Path, classes=("bottle", "cable")) -> Path:
    for ci, cls in enumerate(classes):
        for i in range(3):
            _write_image(root / cls / "train" / "good" / f"{i:03d}.png", 100 * ci + i)
        _write_image(root / cls / "test" / "good" / "000.png", 100 * ci + 10)
        for d, defect in enumerate(("crack", "scratch")):
            _write_image(root / cls / "test" / defect / "000.png", 100 * ci + 20 + d)
            _write_mask(root / cls / "ground_truth" / defect / "000_mask.png", BOX)
    (root / "license.txt").write_text("not a class")
    return root


def make_visa(root: Path) -> Path:
    for ci, cls in enumerate(("candle", "pcb1")):
        for i in range(2):
            _write_image(root / cls / "train" / "good" / f"{i:04d}.JPG", 10 * ci + i)
        _write_image(root / cls / "test" / "good" / "0100.JPG", 10 * ci + 5)
        _write_image(root / cls / "test" / "bad" / "000.JPG", 10 * ci + 6)
        _write_mask(root / cls / "ground_truth" / "bad" / "000.png", BOX)
    (root / "split_csv").mkdir()  # the VisA archive's csv folder is not a class
    return root


def make_btad(root: Path) -> Path:
    for cls, ext, mask_ext in (("01", ".bmp", ".png"), ("02", ".png", ".png"), ("03", ".bmp", ".bmp")):
        for i in range(2):
            _write_image(root / cls / "train" / "ok" / f"{i:04d}{ext}", int(cls) * 10 + i)
        _write_image(root / cls / "test" / "ok" / f"0100{ext}", int(cls) * 10 + 5)
        _write_image(root / cls / "test" / "ko" / f"0000{ext}", int(cls) * 10 + 6)
        _write_mask(root / cls / "ground_truth" / "ko" / f"0000{mask_ext}", BOX)
    return root


def make_folder(root: Path) -> Path:
    _write_image(root / "widget" / "train" / "good" / "a.jpg", 1)
    _write_image(root / "widget" / "train" / "good" / "b.tif", 2)
    _write_image(root / "widget" / "test" / "good" / "c.png", 3)
    _write_image(root / "widget" / "test" / "dent" / "d.jpg", 4)
    _write_mask(root / "widget" / "ground_truth" / "dent" / "d.png", BOX)
    _write_image(root / "widget" / "test" / "hole" / "e.png", 5)
    _write_mask(root / "widget" / "ground_truth" / "hole" / "e_mask.bmp", BOX)
    return root


def _expected_mask() -> torch.Tensor:
    m = torch.zeros(1, IMAGE_SIZE, IMAGE_SIZE)
    m[:, 4:12, 2:6] = 1
    return m


def _check_item(item: dict, ds) -> None:
    assert item["image"].shape == (3, IMAGE_SIZE, IMAGE_SIZE) and item["image"].dtype == torch.float32
    assert item["mask"].shape == (1, IMAGE_SIZE, IMAGE_SIZE) and item["mask"].dtype == torch.float32
    assert set(item["mask"].unique().tolist()) <= {0.0, 1.0}
    assert ds.classes[item["class_index"]] == item["class_name"]
    assert Path(item["path"]).is_file()
    if item["label"] == 0:
        assert item["mask"].sum() == 0
    else:
        torch.testing.assert_close(item["mask"], _expected_mask())


def test_mvtec_train_and_test(tmp_path):
    root = make_mvtec(tmp_path)
    train = build_dataset("mvtec", root, "train", image_size=IMAGE_SIZE)
    assert isinstance(train, MVTecDataset)
    assert train.classes == ["bottle", "cable"]
    assert len(train) == 6 and train.labels == [0] * 6
    assert [s.class_index for s in train.samples] == [0, 0, 0, 1, 1, 1]
    test = build_dataset("mvtec", root, "test", image_size=IMAGE_SIZE)
    assert len(test) == 6 and sorted(test.labels) == [0, 0, 1, 1, 1, 1]
    for i in range(len(test)):
        _check_item(test[i], test)
    loader = torch.utils.data.DataLoader(test, batch_size=4)
    batch = next(iter(loader))
    assert batch["image"].shape == (4, 3, IMAGE_SIZE, IMAGE_SIZE) and batch["class_index"].dtype == torch.int64


def test_image_is_resized_and_imagenet_normalised(tmp_path):
    root = make_mvtec(tmp_path)
    ds = build_dataset("mvtec", root, "train", classes=["bottle"], image_size=IMAGE_SIZE)
    item = ds[0]
    raw = Image.open(item["path"]).convert("RGB").resize((IMAGE_SIZE, IMAGE_SIZE), Image.BILINEAR)
    expected = torch.from_numpy(np.asarray(raw, dtype=np.float32) / 255).permute(2, 0, 1)
    torch.testing.assert_close(denormalize(item["image"]), expected, atol=1e-6, rtol=0)
    mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
    torch.testing.assert_close(item["image"], (expected - mean) / std, atol=1e-6, rtol=0)
    batch = torch.rand(2, 3, 4, 4)
    torch.testing.assert_close(denormalize(normalize(batch)), batch)
    with pytest.raises(ValueError, match="image must have shape"):
        normalize(torch.rand(1, 4, 4))


def test_classes_narrow_and_keep_indices_sorted(tmp_path):
    root = make_mvtec(tmp_path, classes=("zipper", "bottle", "cable"))
    ds = build_dataset("mvtec", root, "test", classes=["zipper", "bottle"], image_size=IMAGE_SIZE)
    assert ds.classes == ["bottle", "zipper"]
    assert {(s.class_name, s.class_index) for s in ds.samples} == {("bottle", 0), ("zipper", 1)}
    assert build_dataset("mvtec", root, classes="cable, zipper").classes == ["cable", "zipper"]
    with pytest.raises(ValueError, match="unknown classes \\['carpet'\\].*available: bottle, cable, zipper"):
        build_dataset("mvtec", root, classes=["carpet"])


def test_visa_1cls_layout(tmp_path):
    ds = build_dataset("visa", make_visa(tmp_path), "test", image_size=IMAGE_SIZE)
    assert isinstance(ds, VisADataset) and ds.classes == ["candle", "pcb1"]
    assert sorted(ds.labels) == [0, 0, 1, 1]
    for i in range(len(ds)):
        _check_item(ds[i], ds)
    assert len(build_dataset("visa", tmp_path, "train")) == 4


def test_btad_layout_bmp_and_png(tmp_path):
    root = make_btad(tmp_path)
    test = build_dataset("btad", root, "test", image_size=IMAGE_SIZE)
    assert isinstance(test, BTADDataset) and test.classes == ["01", "02", "03"]
    assert sorted(test.labels) == [0, 0, 0, 1, 1, 1]
    masks = {s.class_name: s.mask_path.suffix for s in test.samples if s.label}
    assert masks == {"01": ".png", "02": ".png", "03": ".bmp"}
    for i in range(len(test)):
        _check_item(test[i], test)
    train = build_dataset("btad", root, "train")
    assert len(train) == 6 and {s.path.suffix for s in train.samples} == {".bmp", ".png"}


def test_folder_layout(tmp_path):
    ds = build_dataset("folder", make_folder(tmp_path), "test", image_size=IMAGE_SIZE)
    assert isinstance(ds, FolderDataset) and ds.classes == ["widget"]
    assert [(s.path.name, s.label) for s in ds.samples] == [("d.jpg", 1), ("c.png", 0), ("e.png", 1)]
    assert [s.mask_path.name for s in ds.samples if s.label] == ["d.png", "e_mask.bmp"]
    for i in range(len(ds)):
        _check_item(ds[i], ds)
    assert len(build_dataset("folder", tmp_path, "train")) == 2


def test_missing_root_and_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        build_dataset("mvtec", tmp_path / "nope")
    with pytest.raises(ValueError, match="no class folders under"):
        build_dataset("mvtec", tmp_path)
    with pytest.raises(ValueError, match="unknown dataset 'kitti'"):
        build_dataset("kitti", tmp_path)
    make_mvtec(tmp_path)
    with pytest.raises(ValueError, match="split must be one of"):
        build_dataset("mvtec", tmp_path, split="val")
    with pytest.raises(ValueError, match="image_size must be a positive int"):
        build_dataset("mvtec", tmp_path, image_size=0)
    ds = build_dataset("mvtec", tmp_path, image_size=IMAGE_SIZE)
    with pytest.raises(IndexError):
        ds[len(ds)]


def test_empty_class_names_its_folder(tmp_path):
    root = make_mvtec(tmp_path)
    (root / "empty" / "train" / "good").mkdir(parents=True)
    with pytest.raises(ValueError, match=r"class 'empty' has no train images .*empty/train"):
        build_dataset("mvtec", root)


def test_mask_size_mismatch_names_the_mask(tmp_path):
    root = make_mvtec(tmp_path)
    _write_mask(root / "cable" / "ground_truth" / "crack" / "000_mask.png", BOX, size=(SIZE, SIZE + 2))
    with pytest.raises(ValueError, match=r"mask .*cable/ground_truth/crack/000_mask.png is 32x34 but its image"):
        build_dataset("mvtec", root, "test")
    assert len(build_dataset("mvtec", root, "train")) == 6  # train never reads masks


def test_missing_mask_is_an_error(tmp_path):
    root = make_mvtec(tmp_path)
    (root / "bottle" / "ground_truth" / "scratch" / "000_mask.png").unlink()
    with pytest.raises(ValueError, match=r"anomalous image .*bottle/test/scratch/000.png has no mask"):
        build_dataset("mvtec", root, "test")


def test_corrupt_image_warns_and_is_skipped(tmp_path):
    root = make_mvtec(tmp_path)
    bad = root / "bottle" / "train" / "good" / "001.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n this is not a png")
    truncated = root / "cable" / "train" / "good" / "002.png"
    truncated.write_bytes(truncated.read_bytes()[:60])
    jpeg = root / "cable" / "train" / "good" / "003.jpg"
    _write_image(jpeg, 7)
    jpeg.write_bytes(jpeg.read_bytes()[:-200])  # decodes the header, not the data
    with pytest.warns(UserWarning) as record:
        ds = build_dataset("mvtec", root, "train", image_size=IMAGE_SIZE)
    messages = " ".join(str(w.message) for w in record)
    assert str(bad) in messages and str(truncated) in messages and str(jpeg) in messages
    kept = [s.path for s in ds.samples]
    assert len(ds) == 4 and bad not in kept and truncated not in kept and jpeg not in kept
    for i in range(len(ds)):
        _check_item(ds[i], ds)

"""The held-out check set: deterministic, other photographs than the demo's, exact masks."""

import numpy as np
import pytest
from PIL import Image

from fastuad.data import DataError, build_dataset
from fastuad.data.demo import DEMO_CLASSES
from fastuad.data.heldout import HELDOUT_CLASSES, HELDOUT_DEFECTS, _draw_defect, _photo, make_heldout_dataset


def test_heldout_set_is_deterministic_with_masks_that_match_the_defects(tmp_path):
    kw = dict(image_size=64, n_train=2, n_test_good=1, n_test_per_defect=2, classes=("cell", "ihc"))
    a = make_heldout_dataset(tmp_path / "a", seed=3, **kw)
    b = make_heldout_dataset(tmp_path / "b", seed=3, **kw)
    c = make_heldout_dataset(tmp_path / "c", seed=4, **kw)
    files = sorted(p.relative_to(a) for p in a.rglob("*.png"))
    assert len(files) == 2 * (2 + 1 + 2 * 3 * 2)
    assert all((a / f).read_bytes() == (b / f).read_bytes() for f in files)
    assert any((a / f).read_bytes() != (c / f).read_bytes() for f in files)
    test = build_dataset("mvtec", a, "test", image_size=64)
    assert test.classes == ["cell", "ihc"] and sum(test.labels) == 2 * 3 * 2
    for i in range(len(test)):
        item = test[i]
        assert (item["mask"].sum() > 0) == bool(item["label"])
        if item["label"]:  # small defects: under 5% of the image
            assert float(item["mask"].float().mean()) < 0.05
    with pytest.raises(DataError, match="subset of"):
        make_heldout_dataset(tmp_path / "d", classes=("brick",))


@pytest.mark.parametrize("name", ["cell", "flower"])
def test_each_defect_changes_exactly_its_mask_and_visibly(name):
    rng = np.random.default_rng(0)
    photo = _photo(name)
    img = np.asarray(Image.fromarray(photo).resize((96, 96)))
    donors = [_photo(n) for n in ("ihc", "moon")]
    for kind in HELDOUT_DEFECTS:
        out, mask = _draw_defect(img, kind, rng, donors)
        assert mask.sum() >= 4
        np.testing.assert_array_equal(mask, np.any(out != img, axis=2))
        assert np.abs(out[mask].astype(float) - img[mask]).mean() >= 20
        if name == "cell":  # a grey photograph gets grey defects
            assert (out[..., 0] == out[..., 1]).all() and (out[..., 1] == out[..., 2]).all()


def test_heldout_photographs_are_not_the_demo_ones():
    assert not set(HELDOUT_CLASSES) & set(DEMO_CLASSES)
    sizes = {name: _photo(name).shape for name in HELDOUT_CLASSES}
    assert all(len(s) == 3 and s[2] == 3 and min(s[:2]) >= 400 for s in sizes.values()), sizes

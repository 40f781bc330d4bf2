"""Pseudo-anomaly synthesis: Perlin masks, DRAEM blending, CutPaste; seeded and well-formed."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from fastuad.data.synthesis import CutPaste, DraemSynthesizer, perlin_mask, perlin_noise


def _image(seed: int, h: int = 40, w: int = 48) -> torch.Tensor:
    return torch.rand(3, h, w, generator=torch.Generator().manual_seed(seed))


def test_perlin_noise_is_smooth_and_bounded():
    rng = np.random.default_rng(0)
    noise = perlin_noise((64, 64), (4, 4), rng)
    assert noise.shape == (64, 64) and np.abs(noise).max() <= 1.0 + 1e-9
    assert noise.std() > 0.1
    # Gradient noise is zero on the lattice points and varies slowly between them.
    assert np.allclose(noise[::16, ::16], 0.0)
    assert np.abs(np.diff(noise, axis=1)).max() < 0.3


def test_perlin_mask_binary_nonempty_seeded():
    masks = [perlin_mask((37, 53), np.random.default_rng(s)) for s in range(20)]
    for m in masks:
        assert m.shape == (37, 53) and m.dtype == np.float32
        assert set(np.unique(m).tolist()) <= {0.0, 1.0} and m.sum() > 0
    assert 0.0 < np.mean([m.mean() for m in masks]) < 0.5
    again = perlin_mask((37, 53), np.random.default_rng(3))
    np.testing.assert_array_equal(again, masks[3])
    with pytest.raises(ValueError, match="shape must be"):
        perlin_mask((5,), np.random.default_rng(0))
    with pytest.raises(ValueError, match="lower the threshold"):
        perlin_mask((8, 8), np.random.default_rng(0), threshold=5.0, max_tries=3)


def test_draem_blends_texture_inside_mask_only(tmp_path):
    texture = torch.zeros(3, 20, 20)
    texture[1] = 1.0  # pure green
    synth = DraemSynthesizer([texture], seed=1, beta_range=(0.25, 0.25))
    image = _image(0)
    out, mask = synth(image)
    assert out.shape == image.shape and mask.shape == (1, 40, 48)
    inside = mask[0].bool()
    assert inside.any() and (~inside).any()
    torch.testing.assert_close(out[:, ~inside], image[:, ~inside])
    expected = 0.75 * texture[:, :1, :1].expand(3, 40, 48) + 0.25 * image
    torch.testing.assert_close(out[:, inside], expected[:, inside])
    assert out.min() >= 0 and out.max() <= 1


def test_draem_seeded_and_texture_folder(tmp_path):
    rng = np.random.default_rng(0)
    for i in range(3):
        Image.fromarray(rng.integers(0, 256, (30, 30, 3), dtype=np.uint8)).save(tmp_path / f"t{i}.png")
    (tmp_path / "notes.txt").write_text("ignored")
    image = _image(1)
    a = DraemSynthesizer(tmp_path, seed=5)
    b = DraemSynthesizer(tmp_path, seed=5)
    assert len(a.textures) == 3
    for _ in range(3):
        (oa, ma), (ob, mb) = a(image), b(image)
        torch.testing.assert_close(oa, ob)
        torch.testing.assert_close(ma, mb)
    different = DraemSynthesizer(tmp_path, seed=6)(image)[1]
    assert not torch.equal(different, ma)
    with pytest.raises(ValueError, match="no images"):
        DraemSynthesizer([], seed=0)
    with pytest.raises(ValueError, match="not a directory"):
        DraemSynthesizer(tmp_path / "missing")
    with pytest.raises(ValueError, match=r"image must have shape \[3, H, W\]"):
        a(torch.rand(1, 8, 8))


def test_cutpaste_moves_a_patch():
    image = _image(2)
    cp = CutPaste(seed=3, jitter=0.0)
    for _ in range(10):
        out, mask = cp(image)
        inside = mask[0].bool()
        rows, cols = torch.nonzero(inside, as_tuple=True)
        ph, pw = int(rows.max() - rows.min() + 1), int(cols.max() - cols.min() + 1)
        assert inside.sum() == ph * pw  # a rectangle
        assert 0.02 * 0.5 <= ph * pw / (40 * 48) <= 0.15 * 1.5
        torch.testing.assert_close(out[:, ~inside], image[:, ~inside])
        patch = out[:, rows.min() : rows.max() + 1, cols.min() : cols.max() + 1]
        # The pasted patch is a copy of some same-sized window of the original image.
        windows = image.unfold(1, ph, 1).unfold(2, pw, 1)  # [3, H-ph+1, W-pw+1, ph, pw]
        err = (windows - patch[:, None, None]).abs().amax(dim=(0, 3, 4))
        assert float(err.min()) < 1e-6
    a, b = CutPaste(seed=9)(image), CutPaste(seed=9)(image)
    torch.testing.assert_close(a[0], b[0])
    with pytest.raises(ValueError, match="area_ratio"):
        CutPaste(area_ratio=(0.5, 1.5))
    with pytest.raises(TypeError, match="float torch.Tensor"):
        cp(torch.zeros(3, 8, 8, dtype=torch.uint8))

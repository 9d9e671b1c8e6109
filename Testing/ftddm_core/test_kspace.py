"""k-space helpers against the mathematics: Parseval, band-limited losslessness, inverses, data consistency."""
import numpy as np
import pytest
import torch

from ftddm_core import kspace


def rng_images(shape, seed=0):
    return np.random.default_rng(seed).standard_normal(shape)


@pytest.mark.parametrize("lib", ["numpy", "torch"])
def test_parseval_and_inverse(lib):
    x = rng_images((3, 2, 64, 64))
    x = torch.from_numpy(x) if lib == "torch" else x
    k = kspace.fft2c(x)
    energy_x = float((abs(x) ** 2).sum())
    energy_k = float((abs(k) ** 2).sum())
    assert energy_k == pytest.approx(energy_x, rel=1e-12)
    back = kspace.ifft2c(k)
    assert np.allclose(np.asarray(back.real), np.asarray(x), atol=1e-12)


def test_dc_is_at_n_over_2():
    for n in (64, 63, 9, 8):
        k = kspace.fft2c(np.ones((n, n)))
        assert np.unravel_index(np.argmax(abs(k)), k.shape) == (n // 2, n // 2)


@pytest.mark.parametrize("m", [8, 9, 16, 17, 32])
def test_truncating_band_limited_image_is_lossless(m):
    block = rng_images((m, m), seed=m) + 1j * rng_images((m, m), seed=m + 100)
    x = kspace.ifft2c(kspace.zero_pad_kspace(block, 64))  # band-limited to the central m×m block
    assert np.allclose(kspace.low_pass(x, m), x, atol=1e-12)
    assert np.allclose(kspace.truncate_kspace(kspace.fft2c(x), m), block, atol=1e-12)


@pytest.mark.parametrize("m", [8, 11, 16, 32])
@pytest.mark.parametrize("lib", ["numpy", "torch"])
def test_zero_fill_then_truncate_is_identity(m, lib):
    lr = rng_images((4, m, m), seed=m)
    lr = torch.from_numpy(lr) if lib == "torch" else lr
    back = kspace.downsample(kspace.zero_fill(lr, 64), m)
    assert np.allclose(np.asarray(back), np.asarray(lr), atol=1e-12)


def test_zero_fill_keeps_intensity_units():
    lr = np.full((16, 16), 7.5)  # a constant map stays the same constant on the fine grid
    assert np.allclose(kspace.zero_fill(lr, 64), 7.5)
    assert np.allclose(kspace.downsample(np.full((64, 64), 2.0), 16), 2.0)


def test_non_square_blocks():
    x = rng_images((64, 64))
    lr = kspace.downsample(x, (16, 12))
    assert lr.shape == (16, 12)
    assert np.allclose(kspace.downsample(kspace.zero_fill(lr, 64), (16, 12)), lr)


@pytest.mark.parametrize("weight", [1.0, 0.3])
@pytest.mark.parametrize("lib", ["numpy", "torch"])
def test_data_consistency(weight, lib):
    x = rng_images((2, 64, 64), seed=1)
    gt = rng_images((2, 64, 64), seed=2)
    measured = kspace.truncate_kspace(kspace.fft2c(gt), 16)
    if lib == "torch":
        x, measured = torch.from_numpy(x), torch.as_tensor(measured)
    out = kspace.data_consistency(x, measured, weight)
    k_out, k_x = kspace.fft2c(out), kspace.fft2c(x)
    centre = np.asarray(kspace.truncate_kspace(k_out, 16))
    expected = (1 - weight) * np.asarray(kspace.truncate_kspace(k_x, 16)) + weight * np.asarray(measured)
    assert np.allclose(centre, expected, atol=1e-12)
    if weight == 1.0:
        assert np.array_equal(centre, np.asarray(measured)) or np.allclose(centre, measured, atol=1e-13)
    # outside the measured block nothing changes
    mask = np.ones((64, 64), bool)
    mask[kspace.central_slices((64, 64), (16, 16))] = False
    assert np.allclose(np.asarray(k_out)[..., mask], np.asarray(k_x)[..., mask], atol=1e-12)


def test_bad_block_sizes():
    with pytest.raises(ValueError, match="between 1 and"):
        kspace.truncate_kspace(np.zeros((8, 8)), 9)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        kspace.data_consistency(np.zeros((8, 8)), np.zeros((4, 4)), 1.5)

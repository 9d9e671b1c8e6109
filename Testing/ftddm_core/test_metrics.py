"""Metrics equal scikit-image's definitions (the paper's evaluation) on random images."""
import numpy as np
import pytest
from skimage.metrics import normalized_root_mse, peak_signal_noise_ratio, structural_similarity

from ftddm_core import metrics


@pytest.mark.parametrize("seed", range(5))
def test_metrics_equal_scikit_image(seed):
    rng = np.random.default_rng(seed)
    gt = rng.random((64, 64)) * 3
    out = gt + 0.2 * rng.standard_normal((64, 64))
    rngd = gt.max() - gt.min()
    assert metrics.nrmse(gt, out) == pytest.approx(normalized_root_mse(gt, out, normalization="euclidean"), rel=1e-10)
    assert metrics.psnr(gt, out) == pytest.approx(peak_signal_noise_ratio(gt, out, data_range=rngd), rel=1e-10)
    assert metrics.ssim(gt, out) == pytest.approx(structural_similarity(gt, out, data_range=rngd), rel=1e-8)
    _, full = structural_similarity(gt, out, data_range=rngd, full=True)
    assert np.allclose(metrics.ssim_map(gt, out), full, atol=1e-10)


def test_in_mask_variants():
    rng = np.random.default_rng(0)
    gt = rng.random((32, 32))
    out = gt.copy()
    mask = np.zeros((32, 32), bool)
    mask[8:24, 8:24] = True
    out[~mask] += 5.0  # errors only outside the mask
    m = metrics.all_metrics(gt, out, mask)
    assert m["nrmse_mask"] == 0 and m["psnr_mask"] == float("inf") and m["ssim_mask"] > m["ssim"]
    assert m["nrmse"] > 1


def test_shape_errors():
    with pytest.raises(ValueError):
        metrics.psnr(np.zeros((4, 4)), np.zeros((4, 5)))
    with pytest.raises(ValueError):
        metrics.nrmse(np.zeros((4, 4)), np.zeros((4, 4)), mask=np.ones((3, 3)))

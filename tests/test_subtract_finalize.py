"""residual_background's host model, built in row blocks, has the one-piece bits."""

import numpy as np
import pytest

import gpudiff.tasks.subtract_finalize as fin
from gpudiff.image import GaussianPsf, MaskedImage


def _difference(h=300, w=260):
    rng = np.random.default_rng(5)
    y, x = np.mgrid[0:h, 0:w]
    sky = 0.3 + 2e-3 * x - 1.5e-3 * y + 4e-6 * x * y  # a sloped residual sky
    img = (sky + rng.normal(0.0, 1.0, (h, w))).astype(np.float32)
    var = np.ones((h, w), np.float32)
    return MaskedImage(img, var, np.zeros((h, w), np.int32))


@pytest.mark.parametrize("order", [0, 1, 2])
def test_row_blocks_give_the_one_piece_model(order, monkeypatch):
    mi, psf = _difference(), GaussianPsf(2.0)
    monkeypatch.setattr(fin, "_ROW_BLOCK", 1 << 30)  # one block: the whole image at once
    whole, rms_whole = fin.residual_background(mi, psf, order)
    # 7 rows of 260 per block: 42 full blocks and a 6-row remainder
    monkeypatch.setattr(fin, "_ROW_BLOCK", 7 * 260 + 100)
    blocks, rms_blocks = fin.residual_background(mi, psf, order)
    assert rms_whole > 0
    assert rms_blocks == rms_whole
    assert np.array_equal(blocks.image, whole.image)
    assert not np.array_equal(whole.image, mi.image)  # a model was subtracted

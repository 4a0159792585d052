"""The blocked host MEANCLIP gives clipped_stack's NumPy bits."""

import numpy as np
import pytest

import gpudiff.ops._clip_host as clip_host
from gpudiff.backend.reference import clipped_stack
from gpudiff.ops._clip_host import clip_columns_host, clip_tiled_bins_host


def _stack(rng, n, b):
    data = rng.normal(10.0, 2.0, (n, b)).astype(np.float32)
    data[rng.random((n, b)) < 0.01] *= 50  # outliers for the clip to reject
    data[rng.random((n, b)) < 0.005] = np.nan
    data[rng.random((n, b)) < 0.005] = np.inf
    good = rng.random((n, b)) > 0.2
    good[:, 0] = False  # an empty column
    if b > 2:
        good[:, 1] = False
        good[min(1, n - 1), 1] = True  # one usable sample
    if b > 3:
        data[:, 2] = 7.0  # a constant column: zero IQR
    return data, good


@pytest.mark.parametrize("shape", [(4097, 130), (1000, 37), (300, 1), (5, 3), (2, 70), (1, 4)])
@pytest.mark.parametrize("niter", [1, 3])
def test_bits_of_clipped_stack(shape, niter, monkeypatch):
    # small blocks: every stack spans several, so the carried sums are exercised
    monkeypatch.setattr(clip_host, "_BLOCK_ELEMENTS", 512)
    rng = np.random.default_rng(7)
    for _ in range(3):
        data, good = _stack(rng, *shape)
        want = clipped_stack(data, ~good, None, 3.0, niter)
        got = clip_columns_host(data, good, 3.0, niter)
        for w, g in zip(want, got):
            assert g.dtype == w.dtype and g.shape == w.shape
            # bit patterns: NaNs where the twin has them, and the sign of every zero
            assert np.array_equal(g.view(np.int32), w.view(np.int32))


def test_strided_view_and_default_blocks():
    # bin_background passes a transposed view of the image's bins
    rng = np.random.default_rng(3)
    img = rng.normal(0.0, 1.0, (256, 256)).astype(np.float32)
    ok = rng.random((256, 256)) > 0.05
    stack = img.reshape(4, 64, 4, 64).transpose(1, 3, 0, 2).reshape(64 * 64, 16)
    good = ok.reshape(4, 64, 4, 64).transpose(1, 3, 0, 2).reshape(64 * 64, 16)
    want = clipped_stack(stack, ~good, None, 2.5, 3)
    got = clip_columns_host(stack, good, 2.5, 3)
    for w, g in zip(want, got):
        assert np.array_equal(g.view(np.int32), w.view(np.int32))


@pytest.mark.parametrize("shape", [(140_000, 1), (100_000, 2)])
def test_one_or_two_deep_columns(shape):
    # deeper than a block with the default size: the carried sums of one or two columns
    # are still the twin's (NumPy's axis-0 sum is sequential for a single column too)
    rng = np.random.default_rng(2)
    data = rng.normal(3.0, 1.0, shape).astype(np.float32)
    good = rng.random(shape) > 0.1
    want = clipped_stack(data, ~good, None, 3.0, 3)
    got = clip_columns_host(data, good, 3.0, 3)
    for w, g in zip(want, got):
        assert np.array_equal(g.view(np.int32), w.view(np.int32))


@pytest.mark.parametrize("ny, nx, h, w", [(4, 4, 64, 64), (3, 5, 40, 24), (1, 1, 30, 30)])
def test_tiled_bins_are_the_stack(ny, nx, h, w, monkeypatch):
    monkeypatch.setattr(clip_host, "_BLOCK_ELEMENTS", 2048)
    rng = np.random.default_rng(11)
    img = rng.normal(5.0, 1.0, (ny * h, nx * w)).astype(np.float32)
    img[rng.random(img.shape) < 0.01] += 40.0
    img[rng.random(img.shape) < 0.003] = np.nan
    good = rng.random(img.shape) > 0.1
    good[:h, :w] = False  # an empty bin
    stack = img.reshape(ny, h, nx, w).transpose(1, 3, 0, 2).reshape(h * w, ny * nx)
    ok = good.reshape(ny, h, nx, w).transpose(1, 3, 0, 2).reshape(h * w, ny * nx)
    want = clipped_stack(stack, ~ok, None, 3.0, 3)
    got = clip_tiled_bins_host(img, good, ny, nx, 3.0, 3)
    for wnt, g in zip(want, got):
        assert np.array_equal(g.view(np.int32), wnt.view(np.int32))

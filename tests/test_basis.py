"""Kernel bases: Alard–Lupton, delta-function, regularization, PCA (docs/algorithms.md §1, §3.3,
§11.6)."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
from scipy import ndimage

from gpudiff.errors import InvalidInputError, PsfMatchingError
from gpudiff.image.psf import FWHM_PER_SIGMA
from gpudiff.psfmatch.basis import (
    KernelBasis,
    alard_lupton_parameters,
    make_alard_lupton_basis,
    make_delta_function_basis,
    make_kernel_basis,
    make_regularization_matrix,
    make_regularization_operator,
    pca_basis,
    regularization_lambda,
    renormalize_kernel_list,
)
from gpudiff.psfmatch.config import PsfMatchConfig


def _gauss(size, sx, sy, x0=0.0, y0=0.0):
    off = np.arange(size) - size // 2
    return np.exp(-0.5 * (((off[None, :] - x0) / sx) ** 2 + ((off[:, None] - y0) / sy) ** 2))


def _assert_renormalized(k, places=7):
    """ΣB_0 = 1, ΣB_i = 0, ΣB_i² = 1 for i ≥ 1 (LSST test_basisLists, 7 decimals)."""
    assert k[0].sum() == pytest.approx(1.0, abs=10**-places)
    for b in k[1:]:
        assert b.sum() == pytest.approx(0.0, abs=10**-places)
        assert np.sum(b * b) == pytest.approx(1.0, abs=10**-places)


# ---------------------------------------------------------------- delta function


def test_delta_function_basis_row_major():
    k = make_delta_function_basis(5, 3)
    assert k.shape == (15, 3, 5)
    for m in range(15):
        row, col = divmod(m, 5)
        assert k[m].sum() == 1.0 and k[m, row, col] == 1.0


def test_make_kernel_basis_delta_function():
    basis = make_kernel_basis(PsfMatchConfig.delta_function(kernel_size=7), 3.0, 5.0)
    assert basis.kind == "delta-function" and not basis.constant_first_term
    assert basis.n_bases == 49 and basis.size == basis.width == basis.height == 7  # no FWHM scaling
    with pytest.raises(InvalidInputError):  # even DF kernels have no centre pixel
        make_kernel_basis(PsfMatchConfig.delta_function(kernel_size=8))


# ---------------------------------------------------------------- Alard–Lupton


@pytest.mark.parametrize("fwhms", [(None, None), (3.0, 4.0)])
def test_alard_lupton_default_basis(fwhms):
    basis = make_kernel_basis(PsfMatchConfig(), *fwhms)
    assert basis.kind == "alard-lupton" and basis.constant_first_term
    assert basis.n_bases == 27 and basis.size == 21 and basis.kernels.shape == (27, 21, 21)
    assert basis.degrees == (4, 2, 2) and len(basis.sigmas) == 3
    _assert_renormalized(basis.kernels)


def test_kernel_basis_is_read_only_copy():
    src = make_delta_function_basis(3, 3)
    basis = KernelBasis(src, "delta-function")
    src[0, 0, 0] = 5.0
    assert basis.kernels[0, 0, 0] == 1.0 and basis.kernels.dtype == np.float64
    with pytest.raises(ValueError):
        basis.kernels[0, 0, 0] = 2.0
    with pytest.raises(InvalidInputError):
        KernelBasis(src, "hermite")
    with pytest.raises(InvalidInputError):
        KernelBasis(src[0], "pca")


def test_renormalize_gaussians():
    raw = np.stack([_gauss(19, 2, 2), _gauss(19, 3, 4), _gauss(19, 0.2, 0.25)])
    out = renormalize_kernel_list(raw)
    _assert_renormalized(out)
    np.testing.assert_allclose(out[0], raw[0] / raw[0].sum())
    assert raw[0, 0, 0] == _gauss(19, 2, 2)[0, 0]  # input untouched


def test_worked_example_convolution():
    """docs/algorithms.md §1.2: σ_T = 2.0, σ_S = 2.4 → σ_k = 1.327 → sigmas [0.7, 1.4, 2.8], size
    21."""
    cfg = PsfMatchConfig()
    sig, deg, size, mode = alard_lupton_parameters(cfg, 2.0 * FWHM_PER_SIGMA, 2.4 * FWHM_PER_SIGMA)
    assert mode == "convolution" and size == 21 and deg == (4, 2, 2)
    np.testing.assert_allclose(sig, [0.7, 1.4, 2.8], rtol=1e-12)


def test_worked_example_other_modes():
    cfg = PsfMatchConfig()
    # Exactly equal FWHMs: configured sigmas; size still recomputed: int(18) → 19 → 21.
    assert alard_lupton_parameters(cfg, 3.0, 3.0) == ((0.7, 1.5, 3.0), (4, 2, 2), 21, "config")
    assert alard_lupton_parameters(cfg.with_overrides(kernel_size_min=11), 3.0, 3.0)[2] == 19
    # Deconvolution: roles swapped, minimum sigma 0.4.
    sig, _, size, mode = alard_lupton_parameters(cfg, 2.4 * FWHM_PER_SIGMA, 2.0 * FWHM_PER_SIGMA)
    sk = np.sqrt(2.4**2 - 2.0**2)
    assert mode == "deconvolution" and size == 21
    np.testing.assert_allclose(sig, [sk / 2, sk, 2 * sk], rtol=1e-12)
    sig, _, _, _ = alard_lupton_parameters(cfg, 2.05 * FWHM_PER_SIGMA, 2.0 * FWHM_PER_SIGMA)
    np.testing.assert_allclose(sig, [0.4, 0.8, 1.6], rtol=1e-12)  # σ_k/2 < 0.4 → 0.4
    # Large kernels clamp to kernel_size_max.
    assert alard_lupton_parameters(cfg, 2.0 * FWHM_PER_SIGMA, 10.0 * FWHM_PER_SIGMA)[2] == 35
    # int(6 * 4.05) = 24 is even → 25.
    s_ref = np.sqrt(2.0**2 + 2.025**2)
    sig, _, size, _ = alard_lupton_parameters(cfg, 2.0 * FWHM_PER_SIGMA, s_ref * FWHM_PER_SIGMA)
    assert size == 25 and sig[-1] == pytest.approx(4.05)


def test_alard_lupton_parameters_fallback_and_errors():
    cfg = PsfMatchConfig(kernel_size=15)
    assert alard_lupton_parameters(cfg) == ((0.7, 1.5, 3.0), (4, 2, 2), 15, "config")
    assert alard_lupton_parameters(cfg, 3.0)[2] == 15  # one FWHM missing → config
    assert alard_lupton_parameters(cfg.with_overrides(scale_by_fwhm=False), 2.0, 9.0)[2] == 15
    with pytest.raises(InvalidInputError):  # even size (DF configs allow even kernel_size)
        alard_lupton_parameters(PsfMatchConfig.delta_function(kernel_size=20))
    with pytest.raises(InvalidInputError):  # clamp bounds force an even size
        alard_lupton_parameters(
            cfg.with_overrides(kernel_size_min=20, kernel_size_max=20), 2.0, 3.0
        )
    duck = SimpleNamespace(**{**cfg.__dict__, "alard_sig_gauss": (0.7, 1.5)})
    with pytest.raises(InvalidInputError):  # list length ≠ alard_n_gauss
        alard_lupton_parameters(duck)
    with pytest.raises(InvalidInputError):
        alard_lupton_parameters(cfg, -1.0, 3.0)
    with pytest.raises(InvalidInputError):
        make_alard_lupton_basis(0, [1.0], [2])
    with pytest.raises(InvalidInputError):
        make_alard_lupton_basis(5, [1.0, 2.0], [2])


def test_term_order_and_odd_terms():
    """Terms 1, x, y, x², xy, y²: x = column offset, y = row offset, on [-1, 1]."""
    h, sig = 7, 2.0
    k = make_alard_lupton_basis(h, [sig], [2])
    assert k.shape == (6, 15, 15)
    flip_x, flip_y = (lambda a: a[:, ::-1]), (lambda a: a[::-1, :])
    np.testing.assert_allclose(flip_x(k[1]), -k[1], atol=1e-15)  # x: odd in x
    np.testing.assert_allclose(flip_y(k[1]), k[1], atol=1e-15)  # ... even in y
    np.testing.assert_allclose(flip_y(k[2]), -k[2], atol=1e-15)  # y: odd in y
    np.testing.assert_allclose(flip_x(k[2]), k[2], atol=1e-15)
    np.testing.assert_allclose(flip_x(k[4]), -k[4], atol=1e-15)  # xy: odd in both
    np.testing.assert_allclose(flip_y(k[4]), -k[4], atol=1e-15)
    # The odd term's raw sum is ~0, so it is only scaled to unit norm (no B_0 subtraction).
    off = np.arange(-h, h + 1) / h
    raw_x = _gauss(15, sig, sig) * off[None, :]
    np.testing.assert_allclose(k[1], raw_x / np.linalg.norm(raw_x), atol=1e-14)
    # Transposing swaps x and y: x <-> y and x² <-> y²; xy is symmetric.
    np.testing.assert_allclose(k[1].T, k[2], atol=1e-15)
    np.testing.assert_allclose(k[3].T, k[5], atol=1e-15)
    np.testing.assert_allclose(k[4].T, k[4], atol=1e-15)


def test_afw_convolution_is_correlation():
    """afw "convolution" is a correlation (docs/algorithms.md §0.1): out[r,c] = Σ K[i,j] in[r-ctr+i,
    c-ctr+j].

    Correlating a centred delta picks K[ctr + (R - r), ctr + (C - c)], i.e. the kernel
    rotated by 180°.  A true convolution would reproduce K itself; the odd x term
    (K rotated = -K) tells the two apart.
    """
    k = make_alard_lupton_basis(10, [1.5], [1])[1]  # the x term, 21 x 21
    delta = np.zeros((41, 41))
    delta[20, 20] = 1.0
    out = ndimage.correlate(delta, k, mode="constant")
    np.testing.assert_allclose(out[10:31, 10:31], k[::-1, ::-1], atol=1e-15)
    assert not np.allclose(out[10:31, 10:31], k)


# ---------------------------------------------------------------- regularization


def test_regularization_validation():
    df = PsfMatchConfig.delta_function(kernel_size=7)
    for stencil in (5, 9):
        make_regularization_matrix(
            df.with_overrides(central_regularization_stencil=stencil), 7, 7, False
        )
    for orders in ((1,), (1, 2)):
        make_regularization_matrix(
            df.with_overrides(
                regularization_type="forwardDifference", forward_regularization_orders=orders
            ),
            7,
            7,
            False,
        )
    bad = [
        dict(central_regularization_stencil=7),
        dict(regularization_border_penalty=-1.0),
        dict(regularization_type="forwardDifference", forward_regularization_orders=(0,)),
        dict(regularization_type="forwardDifference", forward_regularization_orders=(4,)),
        dict(regularization_type="laplacian"),
    ]
    for override in bad:
        with pytest.raises(InvalidInputError):  # the config re-validates ...
            make_regularization_matrix(df.with_overrides(**override), 7, 7, False)
        with pytest.raises(InvalidInputError):  # ... and so does the function itself
            make_regularization_matrix(SimpleNamespace(**{**df.__dict__, **override}), 7, 7, False)


@pytest.mark.parametrize(
    "kw",
    [
        dict(central_regularization_stencil=5),
        dict(central_regularization_stencil=9),
        dict(regularization_type="forwardDifference", forward_regularization_orders=(1, 2)),
    ],
)
def test_regularization_matrix_properties(kw):
    w = 7
    cfg = PsfMatchConfig.delta_function(kernel_size=w, **kw)
    b = make_regularization_operator(cfg, w, w, False)
    h = make_regularization_matrix(cfg, w, w, False)
    assert h.shape == (w * w, w * w)
    np.testing.assert_allclose(h, h.T, atol=0)
    assert np.linalg.eigvalsh(h).min() > -1e-10  # positive semi-definite
    np.testing.assert_allclose(h, b.T @ b)
    # Difference rows annihilate a constant kernel (a Laplacian / forward difference of a
    # constant is 0); rows with a border penalty do not.
    interior = np.zeros((w, w), bool)
    if cfg.regularization_type == "centralDifference":
        interior[1:-1, 1:-1] = True
        assert np.all(np.diag(b)[~interior.ravel()] == 3.0)
        assert all(np.count_nonzero(r) == 1 for r in b[~interior.ravel()])
    else:  # the forward order tapers to 0 (penalty) only at the last column / row
        interior[:-1, :-1] = True
    ones = b @ np.ones(w * w)
    np.testing.assert_allclose(ones[interior.ravel()], 0.0, atol=1e-12)
    assert np.all(ones[~interior.ravel()] > 0)
    h_bg = make_regularization_matrix(cfg, w, w, True)
    assert h_bg.shape == (w * w + 1, w * w + 1)
    np.testing.assert_array_equal(h_bg[:-1, :-1], h)
    assert not h_bg[-1].any() and not h_bg[:, -1].any()


def test_forward_difference_rows():
    cfg = PsfMatchConfig.delta_function(
        regularization_type="forwardDifference",
        forward_regularization_orders=(2,),
        regularization_border_penalty=3.0,
    )
    b = make_regularization_operator(cfg, 4, 4, False)
    # Pixel (0, 0): second differences along x (cols 0,1,2) and along y (0, 4, 8).
    np.testing.assert_allclose(b[0, [0, 1, 2, 4, 8]], [-2.0, 2.0, -1.0, 2.0, -1.0])
    # Pixel (row 0, col 2): order tapers to 1 along x; full order along y.
    np.testing.assert_allclose(b[2, [2, 3, 6, 10]], [-2.0, 1.0, 2.0, -1.0])
    assert b[15, 15] == 6.0 and np.count_nonzero(b[15]) == 1  # far corner: penalty along x and y


def test_regularization_lambda():
    m, h = np.diag([2.0, 4.0]), np.diag([1.0, 1.0])
    assert regularization_lambda(PsfMatchConfig.delta_function(), m, h) == 0.2
    rel = PsfMatchConfig.delta_function(lambda_type="relative", lambda_scaling=1e-4)
    assert regularization_lambda(rel, m, h) == pytest.approx(1e-4 * 6.0 / 2.0)
    with pytest.raises(InvalidInputError):
        regularization_lambda(SimpleNamespace(lambda_type="minimizeBiasedRisk"), m, h)


# ---------------------------------------------------------------- PCA


def test_pca_basis_noisy_mixtures(rng):
    g1, g2 = _gauss(15, 1.5, 1.5), _gauss(15, 3.0, 2.5)
    imgs = np.stack([a * g1 + (1 - a) * g2 for a in rng.uniform(0.2, 0.8, 20)])
    imgs += rng.normal(0, 1e-3, imgs.shape)
    basis = pca_basis(imgs, n_components=5)
    assert basis.kind == "pca" and basis.constant_first_term and basis.n_bases == 5
    _assert_renormalized(basis.kernels)


def test_pca_basis_reconstructs_exact_mixtures(rng):
    g = _gauss(15, 2.0, 2.0)
    mean = g / g.sum()
    d1 = (
        _gauss(15, 1.5, 1.5) / _gauss(15, 1.5, 1.5).sum()
        - _gauss(15, 3.0, 3.0) / _gauss(15, 3.0, 3.0).sum()
    )
    d2 = g * (np.arange(15) - 7)[None, :]  # odd in x, sums to 0
    coeff = rng.normal(size=(20, 2))
    imgs = mean + coeff[:, :1, None] * d1 + 0.01 * coeff[:, 1:, None] * d2
    basis = pca_basis(imgs, n_components=5)
    # Round-off eigenvectors are dropped: only mean + 2 components carry information.
    assert basis.n_bases == 3
    _assert_renormalized(basis.kernels)
    a = basis.kernels.reshape(3, -1).T
    flat = imgs.reshape(20, -1).T
    resid = flat - a @ np.linalg.lstsq(a, flat, rcond=None)[0]
    assert np.linalg.norm(resid) < 1e-6 * np.linalg.norm(flat)


def test_pca_basis_errors_and_options(rng):
    g = _gauss(9, 2.0, 2.0)
    with pytest.raises(PsfMatchingError):  # identical images: nothing left after the mean
        pca_basis(np.stack([g] * 4))
    with pytest.raises(InvalidInputError):
        pca_basis(g)
    imgs = np.stack([g + rng.normal(0, 0.01, g.shape) for _ in range(6)])
    assert pca_basis(imgs, n_components=3).n_bases == 3
    no_mean = pca_basis(imgs, n_components=4, subtract_mean=False)
    assert no_mean.n_bases == 4
    _assert_renormalized(no_mean.kernels)
    # Flux scaling of a candidate does not change the basis (LSST normalizes to unit sum).
    scaled = imgs * np.arange(1, 7)[:, None, None]
    np.testing.assert_allclose(pca_basis(scaled).kernels, pca_basis(imgs).kernels, atol=1e-10)

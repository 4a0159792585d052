"""Separable design matrices of Alard–Lupton bases (docs/algorithms.md §1.3, §2.2).

Each raw AL function is the outer product of a y factor and an x factor, and every
renormalized basis kernel is a linear combination of them (``KernelBasis.mixing``), so
``C_j = T ⊗ B_j`` can be built from 1-D correlations.  The separable path must reproduce
the batched-FFT path to float64 round-off; bases without factors (DF, PCA, hand-made AL)
keep the FFT path.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

import gpudiff.psfmatch.solve as solve
from gpudiff.errors import InvalidInputError
from gpudiff.psfmatch import PsfMatchConfig, fit_spatial_kernel, make_candidates, make_kernel_basis
from gpudiff.psfmatch.basis import (
    KernelBasis,
    make_alard_lupton_basis,
    make_alard_lupton_kernel_basis,
    pca_basis,
)
from gpudiff.psfmatch.solve import design_matrices, valid_correlate
from gpudiff.sim import simulate_pair


def _bases():
    """(id, basis): the default 27-term basis, a 1-Gaussian basis and a 35×35 basis."""
    return [
        ("default", make_kernel_basis(PsfMatchConfig())),
        (
            "one-gaussian",
            make_kernel_basis(
                PsfMatchConfig(alard_n_gauss=1, alard_sig_gauss=(2.0,), alard_deg_gauss=(3,))
            ),
        ),
        ("size35", make_kernel_basis(PsfMatchConfig(kernel_size=35))),
    ]


BASES = _bases()
BASIS_IDS = [name for name, _ in BASES]


def _raw(basis):
    fx, fy, idx = basis.separable_x, basis.separable_y, basis.raw_index
    return fy[idx[:, 1], :, None] * fx[idx[:, 0], None, :]


def _fft_design(be, stamps, basis, bg):
    """The reference: the FFT path, forced by passing the bare kernel array."""
    return design_matrices(be, stamps, be.asarray(basis.kernels), bg)


def _rel(a, b):
    return float(np.abs(a - b).max() / np.abs(b).max())


@pytest.mark.parametrize("name,basis", BASES, ids=BASIS_IDS)
def test_factors_reproduce_kernels(name, basis):
    assert basis.kind == "alard-lupton" and basis.separable
    n_xf = sum(d + 1 for d in basis.degrees)
    n_raw = sum((d + 1) * (d + 2) // 2 for d in basis.degrees)
    assert basis.separable_x.shape == (n_xf, basis.width)
    assert basis.separable_y.shape == (n_xf, basis.height)
    assert basis.raw_index.shape == (n_raw, 2)
    assert basis.mixing.shape == (n_raw, basis.n_bases)
    recon = np.einsum("rhw,rm->mhw", _raw(basis), basis.mixing)
    assert np.abs(recon - basis.kernels).max() < 1e-12
    # the kernels are exactly those of make_alard_lupton_basis
    ref = make_alard_lupton_basis(basis.size // 2, basis.sigmas, basis.degrees)
    assert np.array_equal(basis.kernels, ref)
    for arr in (basis.separable_x, basis.separable_y, basis.raw_index, basis.mixing):
        assert not arr.flags.writeable


def test_default_factor_count_and_raw_functions():
    basis = BASES[0][1]
    assert basis.separable_x.shape[0] == 11 and basis.n_bases == 27
    h = basis.size // 2
    off = np.arange(-h, h + 1.0)
    # raw 0: the unit-sum Gaussian σ=0.7 as g(v)·g(u); raw 1: x·G; raw 2: y·G (afw order)
    g = np.exp(-(off[None, :] ** 2 + off[:, None] ** 2) / (2 * 0.7**2))
    g /= g.sum()
    raw = _raw(basis)
    np.testing.assert_allclose(raw[0], g, rtol=0, atol=1e-15)
    np.testing.assert_allclose(raw[1], g * off[None, :] / h, rtol=0, atol=1e-15)
    np.testing.assert_allclose(raw[2], g * off[:, None] / h, rtol=0, atol=1e-15)


@pytest.mark.parametrize("bg", [True, False])
@pytest.mark.parametrize("name,basis", BASES, ids=BASIS_IDS)
def test_separable_design_matches_fft(backend, rng, name, basis, bg):
    k = basis.size
    S = 2 * k + 1
    n = 2 * solve._SEP_CHUNK + 5  # several chunks, the last one partial
    stamps = rng.normal(100.0, 30.0, size=(n, S, S))
    stamps[::3] += 1e4 * np.exp(
        -((np.arange(S) - k) ** 2)[None, :] / 8.0
    )  # star-like, mixed scales
    t = backend.asarray(stamps)
    C_sep = design_matrices(backend, t, basis, bg)
    C_fft = _fft_design(backend, t, basis, bg)
    G = S - k + 1
    assert C_sep.shape == C_fft.shape == (n, G * G, basis.n_bases + bg)
    C_sep, C_fft = backend.asnumpy(C_sep), backend.asnumpy(C_fft)
    assert C_sep.flags.c_contiguous
    assert _rel(C_sep, C_fft) < 1e-10
    # column by column too (the bases have different scales)
    for j in range(basis.n_bases):
        assert _rel(C_sep[..., j], C_fft[..., j]) < 1e-10, j
    if bg:
        assert np.all(C_sep[..., -1] == 1.0)


def test_separable_design_direct_correlation(backend, rng):
    """A tiny case against an explicit afw correlation, independently of the FFT."""
    basis = make_alard_lupton_kernel_basis(2, (1.0, 2.0), (2, 1))
    stamps = rng.normal(size=(3, 9, 11))  # rectangular stamps work too
    C = backend.asnumpy(design_matrices(backend, backend.asarray(stamps), basis, False))
    K = basis.kernels
    ref = np.empty((3, 5, 7, basis.n_bases))
    for i in range(3):
        for r in range(5):
            for c in range(7):
                ref[i, r, c] = np.einsum("mab,ab->m", K, stamps[i, r : r + 5, c : c + 5])
    assert np.abs(C - ref.reshape(3, 35, -1)).max() < 1e-12 * np.abs(ref).max()


def test_empty_batch(backend):
    basis = BASES[0][1]
    C = design_matrices(backend, backend.xp.zeros((0, 43, 43)), basis, True)
    assert C.shape == (0, 23 * 23, 28)


def test_separable_path_skips_fft(backend, rng, monkeypatch):
    def boom(*a, **k):
        raise AssertionError("FFT path used")

    monkeypatch.setattr(solve, "valid_correlate", boom)
    design_matrices(backend, backend.asarray(rng.normal(size=(4, 43, 43))), BASES[0][1], True)


@pytest.mark.parametrize("kind", ["delta-function", "pca", "hand-made AL"])
def test_other_bases_take_fft_path(backend, rng, monkeypatch, kind):
    if kind == "delta-function":
        basis = make_kernel_basis(PsfMatchConfig.delta_function(kernel_size=5))
    elif kind == "pca":
        h = 3
        off = np.arange(-h, h + 1.0)
        imgs = np.stack(
            [
                np.exp(-(off[None, :] ** 2 + off[:, None] ** 2) / (2 * s * s))
                for s in (1.0, 1.3, 1.6, 2.0)
            ]
        )
        basis = pca_basis(imgs, 3)
    else:  # an AL basis built without its factors (e.g. from stored kernels)
        basis = KernelBasis(make_alard_lupton_basis(3, (1.5,), (2,)), "alard-lupton", (1.5,), (2,))
    assert basis.kind == {"hand-made AL": "alard-lupton"}.get(kind, kind)
    assert not basis.separable and basis.mixing is None
    calls = []

    def spy(*a, **k):
        calls.append(1)
        return valid_correlate(*a, **k)

    def boom(*a, **k):
        raise AssertionError("separable path used")

    monkeypatch.setattr(solve, "valid_correlate", spy)
    monkeypatch.setattr(solve, "_separable_design", boom)
    stamps = backend.asarray(rng.normal(size=(3, 2 * basis.size + 1, 2 * basis.size + 1)))
    C = design_matrices(backend, stamps, basis, True)
    assert calls
    ref = design_matrices(backend, stamps, backend.asarray(basis.kernels), True)
    np.testing.assert_array_equal(backend.asnumpy(C), backend.asnumpy(ref))


def test_factor_validation():
    basis = BASES[0][1]
    with pytest.raises(InvalidInputError):  # all or none
        dataclasses.replace(basis, mixing=None)
    with pytest.raises(InvalidInputError):  # factors that do not reproduce the kernels
        dataclasses.replace(basis, mixing=basis.mixing * 1.001)
    with pytest.raises(InvalidInputError):  # kernels replaced, factors kept
        dataclasses.replace(basis, kernels=basis.kernels[::-1].copy())
    with pytest.raises(InvalidInputError):
        dataclasses.replace(basis, raw_index=basis.raw_index + 100)
    with pytest.raises(InvalidInputError):
        dataclasses.replace(basis, separable_x=basis.separable_x[:, :-1])
    ok = dataclasses.replace(basis, sigmas=basis.sigmas)  # a valid copy is accepted
    assert ok.separable


def test_fit_spatial_kernel_same_with_and_without_factors(backend):
    """End to end: the spatial fit is the same whichever path builds C."""
    FWHM = 2.35482
    pair = simulate_pair(
        size=512,
        seed=5,
        n_stars=60,
        flux_min=5e4,
        flux_max=1e6,
        n_transients=0,
        min_separation=40,
        science=dict(psf=2.6 * FWHM),
        template=dict(psf=2.0 * FWHM),
    )
    config = PsfMatchConfig(fit_for_background=True, spatial_kernel_order=1)
    sep = make_kernel_basis(config)
    plain = KernelBasis(sep.kernels, sep.kind, sep.sigmas, sep.degrees)
    stars = pair.truth[pair.truth["is_star"]]

    def fit(basis):
        cands = make_candidates(
            pair.template.masked_image.to_backend(backend),
            pair.science.masked_image.to_backend(backend),
            stars["x"],
            stars["y"],
            kernel_size=basis.size,
            rating=stars["flux_template"],
        )
        return fit_spatial_kernel(cands, basis, config, pair.template.bbox, backend)

    a, b = fit(sep), fit(plain)
    assert a.n_used == b.n_used and a.n_used > 10
    np.testing.assert_array_equal(a.candidates.status, b.candidates.status)
    for x, y in ((100.0, 100.0), (256.0, 256.0), (400.0, 120.0)):
        ka, kb = a.kernel.kernel_image(x, y), b.kernel.kernel_image(x, y)
        assert np.abs(ka - kb).max() < 1e-8 * np.abs(kb).max()
    assert a.kernel_sum == pytest.approx(b.kernel_sum, rel=1e-9)

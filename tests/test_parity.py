"""NumPy ↔ CuPy parity: every registered kernel and every public task, same inputs.

The NumPy path is the oracle.  On a machine with CuPy and a CUDA device each case runs on
both backends and the outputs must agree to float32 tolerance; elsewhere the ``gpu`` cases
are skipped, but :func:`test_every_kernel_has_a_parity_case` still runs, so a kernel
registered without a parity case fails CI on any machine.

Tolerances, and why:

* **Kernels** compute the same arithmetic (the twins were written to the CUDA kernels'
  order of operations where it matters): relative 1e-5 on float32 outputs, integers and
  masks exact.
* **Tasks** chain FFTs (pocketfft vs cuFFT round differently, ~1e-7 relative per
  transform), solves and reductions in different orders.  A pixel of an output may move
  by a few float32 ulps of the *largest* pixel it was convolved with, so images are held
  to ``|a − b| ≤ 1e-5·max|a| + 1e-3·σ`` (σ the pixel's noise from the variance plane):
  a thousandth of the noise, invisible to any measurement, but a wrong index, a missing
  term or a flipped kernel breaks it by orders of magnitude.  Masks may differ only on
  pixels where a threshold decision sits within float32 rounding of the cut: at most
  1e-4 of the pixels.
"""

from __future__ import annotations

import numpy as np
import pytest

from gpudiff.backend import get_backend, list_kernels
from gpudiff.backend import kernels as K

# The kernel-level cases: name → callable(rng) returning (args, kwargs).  Every kernel in
# the registry must appear here (checked on every machine below).


def _clipped_stack_case(rng):
    data = rng.normal(100.0, 5.0, size=(12, 64, 80)).astype(np.float32)
    data[3, 10:20, 10:20] += 500.0  # an outlier epoch the clip must remove
    bad = rng.random(data.shape) < 0.05
    weights = rng.uniform(0.5, 2.0, size=12).astype(np.float32)
    return (data, bad, weights), dict(nsigma=3.0, niter=3, return_used=True)


def _mask_dilate_or_case(rng):
    mask = np.zeros((96, 120), np.int32)
    idx = rng.integers(0, mask.size, 200)
    mask.flat[idx] = 1 << rng.integers(0, 12, 200)
    footprint = rng.random((7, 9)) < 0.6
    footprint[3, 4] = True
    return (mask, footprint), {}


def _stamps(rng, n=64, s=21):
    """Elliptical Gaussians of random size, shape and sub-pixel centre, with noise."""
    yy, xx = np.mgrid[:s, :s].astype(np.float64) - s // 2
    cx, cy = rng.uniform(-1.5, 1.5, (2, n, 1, 1))
    sx, sy = rng.uniform(1.2, 3.0, (2, n, 1, 1))
    img = 1e3 * np.exp(-0.5 * (((xx - cx) / sx) ** 2 + ((yy - cy) / sy) ** 2))
    return img + rng.normal(0.0, 1.0, img.shape)


def _adaptive_moments_case(rng):
    stamps = _stamps(rng)
    valid = rng.random(stamps.shape) > 0.02  # a few masked pixels per stamp
    valid[0] = False  # a stamp with nothing usable must fail the same way on both
    return (stamps, valid), dict(w_init=4.0, max_iter=60, tol=1e-6)


def _weighted_centroid_case(rng):
    stamps = _stamps(rng)
    x0, y0 = np.zeros(len(stamps)), np.zeros(len(stamps))  # offsets from the central pixel
    return (stamps, x0, y0), dict(sigma=2.0, niter=20, max_shift=2.0)


def _clipped_columns_case(rng):
    data = rng.normal(100.0, 5.0, size=(4096, 24)).astype(np.float32)
    data[rng.random(data.shape) < 0.03] += 500.0  # outliers the clip must remove
    good = rng.random(data.shape) > 0.2
    good[:, 0] = False  # an empty column
    return (data, good), dict(nsigma=3.0, niter=3)


def _clipped_bins_case(rng):
    image = rng.normal(100.0, 5.0, size=(300, 260)).astype(np.float32)
    image[rng.random(image.shape) < 0.02] += 500.0
    good = rng.random(image.shape) > 0.2
    y_edges, x_edges = np.array([0, 100, 200, 300]), np.array([0, 87, 173, 260])  # uneven
    return (image, good, y_edges, x_edges), dict(nsigma=3.0, niter=3, good_is_finite=True)


def _quantile_columns_case(rng):
    data = np.stack(
        [rng.normal(0.0, 1.0, 5000), rng.standard_cauchy(5000), rng.integers(-3, 4, 5000)],
        axis=1,
    ).astype(np.float32)
    keep = rng.random(5000) > 0.3  # one mask for every column
    fractions = np.array([[0.25, 0.75], [0.5, np.nan], [0.1, 0.9]])
    return (data, keep, fractions), {}


KERNEL_CASES = {
    "clipped_stack": _clipped_stack_case,
    "clipped_columns": _clipped_columns_case,
    "clipped_bins": _clipped_bins_case,
    "quantile_columns": _quantile_columns_case,
    "mask_dilate_or": _mask_dilate_or_case,
    "adaptive_moments": _adaptive_moments_case,
    "weighted_centroid": _weighted_centroid_case,
}


def test_every_kernel_has_a_parity_case():
    """A kernel added to the registry without a parity case would escape the GPU check."""
    missing = sorted(set(list_kernels()) - set(KERNEL_CASES))
    assert not missing, (
        f"registered kernels without a parity case in tests/test_parity.py: {missing}"
    )


def _np(a):
    try:
        import cupy

        if isinstance(a, cupy.ndarray):
            return cupy.asnumpy(a)
    except ImportError:
        pass
    return np.asarray(a)


def _assert_close(a, b, what, rtol=1e-5):
    a, b = _np(a), _np(b)
    assert a.shape == b.shape, f"{what}: shape {a.shape} vs {b.shape}"
    if a.dtype.kind in "biu":
        assert np.array_equal(a, b), f"{what}: {np.count_nonzero(a != b)} integer values differ"
        return
    fin = np.isfinite(a)
    assert np.array_equal(fin, np.isfinite(b)), f"{what}: finite-pixel sets differ"
    scale = float(np.max(np.abs(a[fin]))) if fin.any() else 0.0
    err = float(np.max(np.abs(a[fin] - b[fin]))) if fin.any() else 0.0
    assert err <= rtol * max(scale, 1e-30), f"{what}: max |Δ| {err:.3g} > {rtol}·{scale:.3g}"


@pytest.mark.gpu
@pytest.mark.parametrize("name", sorted(KERNEL_CASES))
def test_kernel_parity(name):
    rng = np.random.default_rng(20261121)
    args, kwargs = KERNEL_CASES[name](rng)
    ref = K.get_kernel(name, "numpy")(*args, **kwargs)
    cp = get_backend("cupy")
    dev = K.get_kernel(name, cp)(*(cp.asarray(a) for a in args), **kwargs)
    ref = ref if isinstance(ref, tuple) else (ref,)
    dev = dev if isinstance(dev, tuple) else (dev,)
    assert len(ref) == len(dev)
    for i, (r, d) in enumerate(zip(ref, dev)):
        _assert_close(r, d, f"{name} output {i}")


# ---------------------------------------------------------------------------------------
# Tasks


def _assert_exposure_close(a, b, what):
    """Images and variances to 1e-5·max + 1e-3·σ; masks equal on all but 1e-4 of pixels."""
    ma, mb = a.masked_image.to_numpy(), b.masked_image.to_numpy()
    for plane in ("image", "variance"):
        x, y = getattr(ma, plane), getattr(mb, plane)
        fin = np.isfinite(x) & np.isfinite(y)
        assert np.mean(np.isfinite(x) != np.isfinite(y)) <= 1e-4, (
            f"{what}.{plane}: finite sets differ"
        )
        sigma = np.sqrt(np.clip(ma.variance[fin], 0, None))
        tol = 1e-5 * np.max(np.abs(x[fin])) + 1e-3 * sigma
        bad = np.abs(x[fin] - y[fin]) > tol
        assert np.mean(bad) <= 1e-4, (
            f"{what}.{plane}: {np.count_nonzero(bad)} pixels beyond tolerance, "
            f"max |Δ| {np.max(np.abs(x[fin] - y[fin])):.3g}"
        )
    assert np.mean(ma.mask != mb.mask) <= 1e-4, (
        f"{what}.mask: {np.count_nonzero(ma.mask != mb.mask)} pixels differ"
    )


@pytest.fixture(scope="module")
def pair():
    from gpudiff.sim import simulate_pair

    return simulate_pair(
        size=512,
        n_stars=150,
        template_border=20,
        seed=11,
        science=dict(sky_subtracted=True),
        template=dict(sky_subtracted=True),
    )


def _both(make_task, call):
    """Run ``call(task, to_backend)`` on NumPy and on CuPy; return both results."""
    out = []
    for name in ("numpy", "cupy"):
        task = make_task(name)
        out.append(call(task, lambda e, name=name: e.to_backend(name)))
    return out


@pytest.mark.gpu
@pytest.mark.parametrize("mode", ["convolveTemplate", "convolveScience"])
def test_alard_lupton_subtract_parity(pair, mode):
    from gpudiff.tasks import AlardLuptonSubtractConfig, AlardLuptonSubtractTask

    cfg = AlardLuptonSubtractConfig(mode=mode)
    a, b = _both(
        lambda be: AlardLuptonSubtractTask(cfg, backend=be),
        lambda t, mv: t.run(template=mv(pair.template), science=mv(pair.science)),
    )
    _assert_exposure_close(a.difference, b.difference, f"{mode} difference")
    _assert_exposure_close(a.matched_template, b.matched_template, f"{mode} matched template")
    assert a.kernel_sources is None or len(a.kernel_sources) == len(b.kernel_sources)


@pytest.mark.gpu
def test_preconvolve_parity(pair):
    from gpudiff.tasks import AlardLuptonPreconvolveSubtractTask

    a, b = _both(
        lambda be: AlardLuptonPreconvolveSubtractTask(backend=be),
        lambda t, mv: t.run(template=mv(pair.template), science=mv(pair.science)),
    )
    _assert_exposure_close(a.score_exposure, b.score_exposure, "score")


@pytest.mark.gpu
def test_image_psf_match_parity(pair):
    from gpudiff.tasks import ImagePsfMatchTask

    a, b = _both(
        lambda be: ImagePsfMatchTask(backend=be),
        lambda t, mv: t.subtract_exposures(mv(pair.template), mv(pair.science)),
    )
    _assert_exposure_close(a.subtracted_exposure, b.subtracted_exposure, "ImagePsfMatch difference")


@pytest.mark.gpu
def test_model_psf_match_parity(pair):
    from gpudiff import GaussianPsf
    from gpudiff.tasks import ModelPsfMatchTask

    ref = GaussianPsf(fwhm=4.5)
    a, b = _both(
        lambda be: ModelPsfMatchTask(backend=be), lambda t, mv: t.run(mv(pair.science), ref)
    )
    _assert_exposure_close(a.psf_matched_exposure, b.psf_matched_exposure, "ModelPsfMatch")


@pytest.mark.gpu
def test_detect_and_measure_parity(pair):
    from gpudiff.tasks import AlardLuptonSubtractTask, DetectAndMeasureTask

    diff = (
        AlardLuptonSubtractTask(backend="numpy")
        .run(template=pair.template, science=pair.science)
        .difference
    )
    a, b = _both(lambda be: DetectAndMeasureTask(backend=be), lambda t, mv: t.run(mv(diff)))
    ca, cb = a.dia_sources, b.dia_sources
    assert len(ca) == len(cb), f"{len(ca)} vs {len(cb)} DIA sources"
    for col in ("x", "y"):
        if col in ca.colnames:
            np.testing.assert_allclose(np.sort(ca[col]), np.sort(cb[col]), atol=1e-3)


@pytest.mark.gpu
def test_scale_variance_parity(pair):
    from gpudiff.tasks import ScaleVarianceTask

    a, b = _both(lambda be: ScaleVarianceTask(backend=be), lambda t, mv: t.run(mv(pair.science)))
    assert abs(float(a) - float(b)) <= 1e-5 * abs(float(a))

"""ImagePsfMatchTask end to end on simulated pairs: difference noise, transient fluxes, modes,
errors."""

from __future__ import annotations

import numpy as np
import pytest
from astropy.table import Table

from gpudiff.errors import (
    InsufficientKernelSourcesError,
    NoOverlapError,
    PsfError,
    ShapeMismatchError,
)
from gpudiff.image import Exposure
from gpudiff.psfmatch import PsfMatchConfig
from gpudiff.sim import PsfSpec, make_wcs, simulate_pair
from gpudiff.tasks import ImagePsfMatchConfig, ImagePsfMatchTask

BAD = ("NO_DATA", "EDGE", "SAT", "BAD", "DETECTED")


def _task(backend, **kernel):
    kc = PsfMatchConfig(
        fit_for_background=True, spatial_kernel_order=1, spatial_bg_order=2, **kernel
    )
    return ImagePsfMatchTask(ImagePsfMatchConfig(kernel=kc), backend=backend)


@pytest.fixture(scope="module")
def pair():
    # Moffat PSFs (not in the AL basis's Gaussian family), a template 20 px larger on
    # each side (so it is cropped onto the science grid), a 10 % photometric scale and
    # five transients of S/N 30-60.
    return simulate_pair(
        size=768,
        seed=5,
        template_border=20,
        n_transients=5,
        transient_snr=(30, 60),
        science=dict(psf=PsfSpec(kind="moffat", fwhm=4.0, beta=3.0)),
        template=dict(psf=PsfSpec(kind="moffat", fwhm=3.0, beta=3.0)),
        flux_scale=1.1,
        transient_isolation=30,
        n_stars=500,
        flux_min=2e3,
        flux_max=5e5,
    )


def _z(mi):
    good = mi.good_pixels(BAD)
    be = mi.backend
    return be.asnumpy((mi.image / be.xp.sqrt(mi.variance))[good])


def _interior(transients, size, margin=40):
    """Transients whose aperture lies away from the convolution border (NaN/NO_DATA)."""
    x, y = np.asarray(transients["x"]), np.asarray(transients["y"])
    keep = (x > margin) & (x < size - margin) & (y > margin) & (y < size - margin)
    assert keep.sum() >= 2
    return transients[keep]


def _aperture(img, x, y, r=12):
    xi, yi = int(round(x)), int(round(y))
    return float(img[yi - r : yi + r + 1, xi - r : xi + r + 1].sum())


def test_subtract_exposures_convolve_template(backend, pair):
    res = _task(backend).subtract_exposures(pair.template, pair.science)
    d = res.difference.to_numpy()
    assert d.shape == pair.science.shape and d.xy0 == pair.science.xy0
    z = _z(res.difference)
    # The difference is consistent with its variance plane (static sky subtracts to noise).
    assert abs(np.std(z) - 1) < 0.05 and abs(np.mean(z)) < 0.05
    assert abs(res.psf_matching_kernel.kernel_sum() / 1.1 - 1) < 0.01
    # Transients keep their flux in science units: aperture sums within 4σ of the
    # aperture noise (σ from the variance plane).
    for row in _interior(pair.transients, 768):
        flux = _aperture(d.image, row["x"], row["y"])
        sigma = np.sqrt(_aperture(d.variance, row["x"], row["y"]))
        assert abs(flux - row["delta_flux"]) < 4 * sigma, (row["delta_flux"], flux, sigma)
    assert res.subtracted_exposure.psf is pair.science.psf
    cands = res.candidates
    assert isinstance(cands, Table) and (cands["used"]).sum() == res.kernel_fit.n_used >= 10


def test_subtract_exposures_convolve_science_is_in_science_units(backend, pair):
    # Convolving the science (narrower template PSF here → a deconvolution-like fit would
    # be ill-posed, so swap: the template gets the broad PSF).
    swapped = simulate_pair(
        size=512,
        seed=8,
        n_transients=6,
        transient_snr=(40, 60),
        science=dict(psf=PsfSpec(kind="gaussian", fwhm=3.0)),
        template=dict(psf=PsfSpec(kind="gaussian", fwhm=4.2)),
        flux_scale=1.2,
        transient_isolation=30,
        n_stars=400,
        flux_min=2e3,
        flux_max=5e5,
    )
    res = _task(backend).subtract_exposures(
        swapped.template, swapped.science, convolve_template=False
    )
    # K maps science → template, so ΣK = template/science flux = 1/1.2.
    assert abs(res.psf_matching_kernel.kernel_sum() * 1.2 - 1) < 0.01
    z = _z(res.difference)
    assert abs(np.std(z) - 1) < 0.06
    d = res.difference.to_numpy()
    for row in _interior(swapped.transients, 512):
        flux = _aperture(d.image, row["x"], row["y"])
        sigma = np.sqrt(_aperture(d.variance, row["x"], row["y"]))
        assert abs(flux - row["delta_flux"]) < 4 * sigma


def test_candidate_list_with_flags_and_match_masked_images(backend, pair):
    task = _task(backend)
    stars = pair.truth[pair.truth["is_star"] & (pair.truth["flux_template"] > 2e4)]
    table = Table(
        {
            "x": stars["x"],
            "y": stars["y"],
            "flux": stars["flux_template"],
            "flag_bad": np.arange(len(stars)) % 5 == 0,
        }
    )
    tmpl = pair.template.subimage(pair.science.bbox)
    res = task.subtract_masked_images(
        tmpl.masked_image, pair.science.masked_image, table, 3.0 * 1.0, 4.0
    )
    rejected = dict(res.kernel_fit.candidates.rejected)
    assert all(
        rejected.get(i) == "flagged in the source table" for i in np.flatnonzero(table["flag_bad"])
    )
    assert abs(np.std(_z(res.difference)) - 1) < 0.05


def test_errors(backend, pair):
    task = _task(backend)
    far = Exposure(
        pair.template.masked_image,
        psf=pair.template.psf,
        wcs=make_wcs(pair.template.bbox, ra=10.0, dec=-40.0, xy0=pair.template.xy0),
    )
    with pytest.raises(NoOverlapError, match="template"):
        task.subtract_exposures(far, pair.science)
    nopsf = Exposure(pair.science.masked_image, psf=None, wcs=pair.science.wcs)
    with pytest.raises(PsfError, match="science exposure has no PSF"):
        task.match_exposures(
            pair.template, nopsf, candidate_list=Table({"x": [100.0], "y": [100.0]})
        )
    with pytest.raises(InsufficientKernelSourcesError):
        task.match_exposures(
            pair.template, pair.science, candidate_list=Table({"x": [100.0], "y": [100.0]})
        )
    with pytest.raises(ShapeMismatchError):
        task.match_masked_images(
            pair.template.masked_image,
            pair.science.masked_image,
            Table({"x": [100.0], "y": [100.0]}),
        )

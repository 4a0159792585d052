"""The subtraction's seams (issue 17): LSST's split of ``run`` into the input preparation,
``run_convolve_template`` / ``run_convolve_science`` and ``finalize``.

Each stage is called on its own here with the inputs the previous one returned, and the
composition must give exactly what :meth:`AlardLuptonSubtractTask.run` gives: the stages
are the run, not a second implementation of it.  The science detections travel in
:class:`PreparedInputs`, never in the metadata.
"""

from __future__ import annotations

import functools

import numpy as np
import pytest

from gpudiff.psfmatch import make_kernel_basis
from gpudiff.sim import realistic_raw_pair
from gpudiff.tasks import AlardLuptonSubtractConfig, AlardLuptonSubtractTask
from gpudiff.tasks.subtract import PreparedInputs, psf_fwhm


@functools.lru_cache(maxsize=None)
def _pair(ratio):
    return realistic_raw_pair(512, science_fwhm_ratio=ratio, seed=3)


def _assert_same(a, b):
    """Two masked images bit for bit (NaN where NaN)."""
    np.testing.assert_array_equal(np.asarray(a.image), np.asarray(b.image))
    np.testing.assert_array_equal(np.asarray(a.variance), np.asarray(b.variance))
    np.testing.assert_array_equal(np.asarray(a.mask), np.asarray(b.mask))


def _by_stages(task, template, science):
    """``run``'s flow, stage by stage, through the public seams."""
    prepared = task._prepare(template, science)
    t, s = prepared.template, prepared.science
    conv_template = task.config.mode == "convolveTemplate"
    t_fwhm, s_fwhm = psf_fwhm(t, "template"), psf_fwhm(s, "science")
    k = make_kernel_basis(task.config.make_kernel, t_fwhm, s_fwhm if conv_template else t_fwhm)
    sel = task.select_sources(s, t, prepared.science_sources, k.size, k.size)
    t_on_s = t.subimage(s.bbox)
    conv, ref = (t_on_s, s) if conv_template else (s, t_on_s)
    fwhms = (t_fwhm, s_fwhm) if conv_template else (s_fwhm, t_fwhm)
    kernel = task._fit(conv, ref, sel, fwhms, t, s).kernel
    run_mode = task.run_convolve_template if conv_template else task.run_convolve_science
    convolved = run_mode(t, s, kernel)
    return prepared, kernel, convolved, task.finalize(t, s, convolved, kernel)


@pytest.mark.parametrize("ratio, mode", [(1.4, "convolveTemplate"), (0.75, "convolveScience")])
def test_stages_compose_to_run(ratio, mode):
    pair = _pair(ratio)
    task = AlardLuptonSubtractTask(AlardLuptonSubtractConfig(mode=mode), backend="numpy")
    res = task.run(pair.template, pair.science)
    prepared, kernel, convolved, final = _by_stages(task, pair.template, pair.science)

    assert isinstance(prepared, PreparedInputs)
    # Raw pairs have no DETECTED plane: the variance scaling detected the science's
    # sources, and they come back explicitly, not through the metadata.
    assert prepared.science_sources is not None and len(prepared.science_sources) > 10
    assert "science_detections" not in prepared.metadata
    assert "science_detections" not in res.metadata
    np.testing.assert_array_equal(
        np.asarray(res.science_sources["x"]), np.asarray(prepared.science_sources["x"])
    )

    assert convolved.mode == res.mode == mode
    np.testing.assert_array_equal(kernel.kernel_sum(), res.psf_matching_kernel.kernel_sum())
    _assert_same(convolved.matched_template.masked_image, res.matched_template.masked_image)
    _assert_same(convolved.matched_science.masked_image, res.matched_science.masked_image)
    _assert_same(final.difference.masked_image, res.difference.masked_image)
    np.testing.assert_array_equal(
        np.asarray(final.difference.psf.kernel_image()),
        np.asarray(res.difference.psf.kernel_image()),
    )
    assert set(final.metadata) <= set(res.metadata)
    assert final.metadata["residual_background_rms"] == res.metadata["residual_background_rms"]

    # The convolution's difference is the plain subtraction of the images it returns,
    # and its PSF the unconvolved image's.
    d = convolved.difference
    np.testing.assert_array_equal(
        np.asarray(d.image),
        np.asarray(convolved.matched_science.masked_image.image)
        - np.asarray(convolved.matched_template.masked_image.image),
    )
    expected_psf = pair.science.psf if mode == "convolveTemplate" else pair.template.psf
    np.testing.assert_allclose(
        np.asarray(convolved.psf.kernel_image()), np.asarray(expected_psf.kernel_image())
    )

    # LSST's sign convention for the returned background: negated when the science was
    # convolved (it then models template − science).
    coef = np.asarray(kernel.background_coefficients)
    returned = np.asarray(final.background_model.background_coefficients)
    np.testing.assert_array_equal(returned, coef if mode == "convolveTemplate" else -coef)


def test_finalize_without_background_or_decorrelation_only_blanks_no_data():
    pair = _pair(1.4)
    cfg = AlardLuptonSubtractConfig(do_subtract_background=False, do_decorrelation=False)
    task = AlardLuptonSubtractTask(cfg, backend="numpy")
    _, _, convolved, final = _by_stages(task, pair.template, pair.science)
    assert final.background_model is None
    assert set(final.metadata) == {"time_convolution"}
    raw, out = convolved.difference, final.difference.masked_image
    nd = (np.asarray(out.mask) & out.mask_planes.bitmask("NO_DATA")) != 0
    assert nd.any()  # the simulated pair has a NO_DATA strip
    assert np.isnan(np.asarray(out.image)[nd]).all()
    assert np.isinf(np.asarray(out.variance)[nd]).all()
    np.testing.assert_array_equal(np.asarray(out.image)[~nd], np.asarray(raw.image)[~nd])
    assert final.difference.psf is convolved.psf

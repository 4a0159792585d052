"""LSST's test pair (docs/algorithms.md §11.1) shared by the reliability tests: science σ_PSF 2.4
px, template 2.0 px with a 20-px border, and the truth catalog as kernel sources."""

from __future__ import annotations

import functools

from gpudiff.sim import make_test_image


@functools.lru_cache(maxsize=None)
def cached_test_image(**kw):
    """``make_test_image(**kw)``, made once per argument set (callers must copy before
    modifying)."""
    return make_test_image(**kw)


def lsst_pair():
    """(science, template, catalog): fresh copies on every call, so a test may modify them."""
    sci, cat = cached_test_image(psf_size=2.4, noise_seed=6)
    tmpl, _ = cached_test_image(psf_size=2.0, noise_seed=7, template_border_size=20)
    cat = cat.copy()
    cat["psf_flux"], cat["psf_flux_err"] = cat["flux"], cat["flux_err"]
    return sci.copy(), tmpl.copy(), cat

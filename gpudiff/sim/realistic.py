"""A raw-looking science/template pair: :func:`realistic_raw_pair`.

:func:`~gpudiff.sim.simulate_pair` with its defaults makes clean pairs.  Real inputs carry
more, and every item below once broke a difference image made by gpudiff (issue 14):

- bad columns holding garbage (up to 5× saturation), masked BAD, at different columns in
  the two images (they come from different detectors or visits);
- bright stars with Moffat wings (β = 2.5) rendered far beyond the largest matching kernel
  (35 px), saturated in their cores (masked SAT where at or above saturation);
- a satellite trail in one image (unmasked, as it is before any streak finding);
- a residual sky plane of ~0.3σ (images "sky-subtracted", but not perfectly);
- cosmic rays, half of them masked CR and half not (an imperfect repair step), in the
  science image; a few, all masked, in the template;
- a NO_DATA strip (image NaN, variance +inf) along one edge of the template;
- optionally a field with fewer than 10 usable stars (``few_stars=True``).
"""

from __future__ import annotations

import math
from dataclasses import replace
from typing import Any

import numpy as np

from ..errors import InvalidInputError
from ._util import _finite_number, _is_int, _rng, _seed_entropy
from .artefacts import Trail
from .background import PolynomialBackground
from .config import FieldConfig, ObsConfig
from .pair import SimPair, simulate_pair
from .psfspec import PsfSpec

#: Saturation of the raw images, ADU (before sky subtraction).
_SATURATION = 60000.0
#: Half-size of the largest matching kernel gpudiff uses (kernel_size_max 35): the PSF
#: stamps are rendered to 7 FWHM so that their wings reach well beyond it.
_WING_FWHM = 7.0


def _sky_sigma(obs: ObsConfig) -> float:
    """Noise of a source-free pixel, ADU."""
    return math.sqrt(obs.sky * obs.gain + obs.read_noise**2) / obs.gain


def _moffat(fwhm: float) -> PsfSpec:
    return PsfSpec(
        kind="moffat", fwhm=fwhm, beta=2.5, size=2 * int(math.ceil(_WING_FWHM * fwhm)) + 1
    )


def realistic_raw_pair(
    size: int = 2048,
    *,
    science_fwhm_ratio: float = 1.4,
    template_fwhm: float = 3.0,
    few_stars: bool = False,
    seed: Any = 0,
    n_transients: int | None = None,
    transient_snr: Any = (5.0, 100.0),
    n_vanished: int | None = None,
    residual_sky_sigma: float = 0.3,
    bad_columns: int = 2,
    trail: bool = True,
    cosmic_rays_per_mpix: float = 40.0,
    no_data_width: int = 48,
    flux_scale: float = 1.0,
    dx: float = 0.12,
    dy: float = -0.08,
) -> SimPair:
    """A science/template pair with the defects of raw data, and its truth.

    Parameters
    ----------
    size : int
        Side of both (square) images, pixels; at least 128.
    science_fwhm_ratio : float
        Science PSF FWHM / template PSF FWHM: 1.4 (science broader; convolveTemplate) or
        0.75 (science sharper; convolveScience under ``mode="auto"``), or anything > 0.
    template_fwhm : float
        Template Moffat FWHM, pixels.
    few_stars : bool
        A sparse field: 8 stars of moderate flux plus one saturated star and no galaxies
        (fewer than 10 usable kernel candidates).
    seed : int or tuple of int
    n_transients : int, optional
        New point sources in the science image; default 12 per Mpix (at least 4).
    transient_snr : float or (float, float)
        Their PSF-optimal S/N range in the science image (log-uniform).
    n_vanished : int, optional
        Stars present in the template only; default 1 per Mpix (at least 1).
    residual_sky_sigma : float
        Constant term of the science image's residual sky plane in units of its sky noise
        (the template gets −half of it with the opposite gradient).
    bad_columns : int
        Bad columns per image (full height), garbage values uniform in
        [−500, 5 × saturation] ADU, masked BAD.
    trail : bool
        A satellite trail across the science image.
    cosmic_rays_per_mpix : float
        Cosmic rays in the science image per Mpix (half masked CR); the template gets a
        quarter as many, all masked.
    no_data_width : int
        Width of the NO_DATA strip along the template's right edge (0: none).
    flux_scale, dx, dy : float
        As in :func:`~gpudiff.sim.simulate_pair`.

    Returns
    -------
    SimPair
        ``science``, ``template``, ``truth`` (every source), ``transients`` (the injected
        changes, with ``x``, ``y``, ``delta_flux``, ``snr``, ``kind`` and ``near_defect``:
        within 2 template FWHM of a masked pixel, a bad column or the trail in either
        image) and ``artefacts``: ``bad_columns_science``, ``bad_columns_template``
        (array columns), ``trail`` (the :class:`Trail` or None), ``sky_plane_science``,
        ``sky_plane_template`` (the residual :class:`PolynomialBackground` s),
        ``sky_sigma_science``, ``sky_sigma_template`` (ADU), ``no_data`` (template box
        ``(x0, y0, x1, y1)`` or None), ``saturation``, ``bright_star_ids``.
    """
    if not _is_int(size) or int(size) < 128:
        raise InvalidInputError(f"size must be an integer >= 128, got {size!r}")
    size = int(size)
    ratio = _finite_number("science_fwhm_ratio", science_fwhm_ratio, positive=True)
    t_fwhm = _finite_number("template_fwhm", template_fwhm, positive=True)
    _finite_number("residual_sky_sigma", residual_sky_sigma)
    _finite_number("cosmic_rays_per_mpix", cosmic_rays_per_mpix, nonneg=True)
    if not _is_int(bad_columns) or bad_columns < 0:
        raise InvalidInputError(f"bad_columns must be a non-negative integer, got {bad_columns!r}")
    if not _is_int(no_data_width) or not 0 <= no_data_width < size // 4:
        raise InvalidInputError(
            f"no_data_width must be an integer in [0, {size // 4}), got {no_data_width!r}"
        )
    _seed_entropy(seed)
    mpix = size * size / 1e6
    rng = _rng(seed, 11)

    s_fwhm = t_fwhm * ratio
    sci_base = ObsConfig(
        psf=_moffat(s_fwhm),
        sky=1000.0,
        gain=1.5,
        read_noise=6.0,
        sky_subtracted=True,
        saturation=_SATURATION,
    )
    tpl_base = ObsConfig(
        psf=_moffat(t_fwhm),
        sky=600.0,
        gain=1.5,
        read_noise=6.0,
        sky_subtracted=True,
        saturation=_SATURATION,
    )
    s_sig, t_sig = _sky_sigma(sci_base), _sky_sigma(tpl_base)
    # Residual sky: a plane of residual_sky_sigma·σ with a gentle gradient (0.1σ across
    # half the image); the template's tilts the other way so the two do not cancel.
    s_plane = PolynomialBackground(
        offset=residual_sky_sigma * s_sig, gradient=(0.1 * s_sig, -0.05 * s_sig)
    )
    t_plane = PolynomialBackground(
        offset=-0.5 * residual_sky_sigma * t_sig, gradient=(-0.05 * t_sig, 0.1 * t_sig)
    )

    # Bad columns away from the edges, different in the two images.
    cols = rng.choice(np.arange(size // 8, size - size // 8), size=2 * bad_columns, replace=False)
    s_cols, t_cols = (
        tuple(int(c) for c in cols[:bad_columns]),
        tuple(int(c) for c in cols[bad_columns:]),
    )
    garbage = (-500.0, 5.0 * _SATURATION)

    sat_trail = None
    if trail:
        ang = float(rng.uniform(20.0, 70.0)) * (1 if rng.uniform() < 0.5 else -1)
        px, py = rng.uniform(size * 0.3, size * 0.7, 2)
        sat_trail = Trail(x=float(px), y=float(py), angle=ang, brightness=4.0 * s_sig, width=1.5)

    n_cr = int(round(cosmic_rays_per_mpix * mpix))
    nd = (size - no_data_width, 0, size, size) if no_data_width else None
    science = replace(
        sci_base,
        background=s_plane,
        bad_columns=s_cols,
        bad_column_value=garbage,
        trails=(sat_trail,) if sat_trail is not None else (),
        cosmic_rays=n_cr,
        mask_cosmic_rays=0.5,
        visit=1,
    )
    template = replace(
        tpl_base,
        background=t_plane,
        bad_columns=t_cols,
        bad_column_value=garbage,
        cosmic_rays=int(round(n_cr / 4)),
        mask_cosmic_rays=True,
        no_data=[nd] if nd is not None else (),
        visit=2,
    )

    if few_stars:
        field = FieldConfig(
            n_stars=8,
            flux_min=3.0e3,
            flux_max=1.0e5,
            n_bright_stars=1,
            bright_flux=(2.0e6, 5.0e6),
            margin=-20.0,
        )
    else:
        field = FieldConfig(
            star_density=3.0e-4,
            flux_min=300.0,
            flux_max=3.0e5,
            n_galaxies=int(round(50 * mpix)),
            galaxy_flux_min=500.0,
            galaxy_flux_max=3.0e4,
            galaxy_r_eff=(1.5, 4.0),
            n_bright_stars=max(1, int(round(1.5 * mpix))),
            bright_flux=(2.0e6, 2.0e7),
        )
    n_tr = max(4, int(round(12 * mpix))) if n_transients is None else int(n_transients)
    n_van = max(1, int(round(1 * mpix))) if n_vanished is None else int(n_vanished)

    pair = simulate_pair(
        size,
        field=field,
        science=science,
        template=template,
        dx=dx,
        dy=dy,
        flux_scale=flux_scale,
        n_transients=n_tr,
        transient_snr=transient_snr,
        n_vanished=n_van,
        transient_isolation=3.0 * max(s_fwhm, t_fwhm),
        seed=seed,
    )

    # Transients a defect touches (their measurement is legitimately compromised).
    from scipy import ndimage

    reach = 2.0 * max(s_fwhm, t_fwhm)
    defect = np.zeros((size, size), dtype=bool)
    for res in (pair.science_result, pair.template_result):
        m = res.masks
        defect |= m["bad_column"] | m["saturated"] | m["no_data"] | m["trail"] | m["cosmic_ray"]
    dist = ndimage.distance_transform_edt(~defect)
    tt = pair.transients
    ix = np.clip(np.round(np.asarray(tt["x"], float)).astype(int), 0, size - 1)
    iy = np.clip(np.round(np.asarray(tt["y"], float)).astype(int), 0, size - 1)
    tt["near_defect"] = dist[iy, ix] <= reach

    bright = np.asarray(pair.truth["flux_template"], float) >= field.bright_flux[0]
    pair.artefacts = {
        "bad_columns_science": s_cols,
        "bad_columns_template": t_cols,
        "trail": sat_trail,
        "sky_plane_science": s_plane,
        "sky_plane_template": t_plane,
        "sky_sigma_science": s_sig,
        "sky_sigma_template": t_sig,
        "no_data": nd,
        "saturation": _SATURATION,
        "bright_star_ids": np.asarray(pair.truth["id"])[bright],
        "science_fwhm": s_fwhm,
        "template_fwhm": t_fwhm,
    }
    return pair

"""The exposure simulator: :func:`simulate_exposure` and its result :class:`SimResult`."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Mapping

import numpy as np
from astropy.io import fits
from astropy.table import Table

from ..image.exposure import Exposure, PhotoCalib
from ..image.masked_image import Box
from ..image.maskplanes import MaskPlanes
from ._util import _as_box, _box_centre, _finite_number, _inside, _rng, _seed_card, _seed_entropy
from .artefacts import _bad_column_mask, _cosmic_rays, _no_data_mask, _render_ghosts, _render_trails
from .background import _eval_background
from .catalog import _GALAXY_COLUMNS, _check_catalog, make_catalog
from .config import FieldConfig, ObsConfig, _split_overrides
from .psfspec import _make_renderer, _Renderer
from .render import _Canvas, _galaxy_stamp_size, _overlapping, _render_galaxies, _render_points
from .wcs import make_wcs


@dataclass
class SimResult:
    """One simulated exposure and its truth.

    Attributes
    ----------
    exposure : Exposure
        Image (ADU), variance, mask, PSF, WCS, PhotoCalib and metadata.
    truth : astropy.table.Table
        The sources rendered into this exposure (those whose stamps overlap it): ``id``,
        ``x``, ``y`` (parent coordinates in this exposure, after any offset), ``flux``
        (ADU in this exposure), ``is_star``, ``is_galaxy``, ``is_transient``,
        ``in_image`` (centre inside the image), ``psf_fwhm`` (the profile FWHM there;
        NaN when unknown) and the galaxy parameters.
    model : numpy.ndarray
        The noiseless expectation of the image (float32): sources + sky + background +
        trails + ghosts (minus sky when sky-subtracted).  No cosmic rays, no saturation.
    background : numpy.ndarray
        sky + background (float32; minus sky when sky-subtracted).
    cr_mask : numpy.ndarray
        Boolean: pixels hit by a cosmic ray (whether or not CR is flagged).
    masks : dict of str to numpy.ndarray
        Boolean truth masks: ``cosmic_ray``, ``saturated``, ``bad_column``, ``no_data``,
        ``trail``, ``ghost``.
    seed : int or tuple
        The seed used.
    """

    exposure: Exposure
    truth: Table
    model: np.ndarray
    background: np.ndarray
    cr_mask: np.ndarray
    masks: dict = field(default_factory=dict)
    seed: Any = 0

    @property
    def sources(self) -> np.ndarray:
        """model − background: the light of sources (plus trails and ghosts)."""
        return self.model - self.background


def _flagged_cosmic_rays(
    cr_mask: np.ndarray, spec: Any, rng: np.random.Generator
) -> np.ndarray | None:
    """The cosmic-ray pixels to flag CR: all (True), none (False) or whole tracks chosen at
    random with probability ``spec`` (a fraction)."""
    if isinstance(spec, (bool, np.bool_)):
        return cr_mask if spec else None
    if spec <= 0 or not cr_mask.any():
        return None
    if spec >= 1:
        return cr_mask
    from scipy import ndimage

    labels, n = ndimage.label(cr_mask, structure=np.ones((3, 3), dtype=bool))
    keep = np.concatenate([[False], rng.uniform(size=n) < spec])
    return keep[labels]


def _simulate(
    box: Box,
    catalog: Table,
    obs: ObsConfig,
    *,
    offset=(0.0, 0.0),
    flux_scale: float = 1.0,
    seed: Any = 0,
    renderer: _Renderer | None = None,
    extra_meta: Mapping[str, Any] | None = None,
    galaxy_oversample: int | None = None,
) -> SimResult:
    H, W = box.shape
    dx = _finite_number("offset[0]", offset[0])
    dy = _finite_number("offset[1]", offset[1])
    flux_scale = _finite_number("flux_scale", flux_scale, nonneg=True)
    renderer = _make_renderer(obs.psf, box) if renderer is None else renderer

    xs = np.asarray(catalog["x"], dtype=np.float64) + dx
    ys = np.asarray(catalog["y"], dtype=np.float64) + dy
    flux = np.asarray(catalog["flux"], dtype=np.float64) * flux_scale
    is_gal = np.asarray(catalog["is_galaxy"], dtype=bool)

    # --- sources -------------------------------------------------------------------------
    canvas = _Canvas(box)
    star = ~is_gal
    _render_points(canvas, renderer, xs[star], ys[star], flux[star])
    if is_gal.any():
        ov = (
            galaxy_oversample
            or getattr(obs.psf, "oversample", None)
            or getattr(renderer.psf, "oversample", 5)
        )
        _render_galaxies(
            canvas,
            renderer,
            xs[is_gal],
            ys[is_gal],
            flux[is_gal],
            np.asarray(catalog["r_eff"])[is_gal],
            np.asarray(catalog["sersic_n"])[is_gal],
            np.asarray(catalog["axis_ratio"])[is_gal],
            np.asarray(catalog["theta"])[is_gal],
            oversample=int(ov),
        )
    sources = canvas.image()

    # --- background, trails, ghosts ------------------------------------------------------
    background = _eval_background(obs.background, box)
    background += obs.sky
    model = sources
    model += background
    del sources
    trail_mask = ghost_mask = None
    if obs.trails:
        trail_light, trail_mask = _render_trails(obs.trails, box)
        model += trail_light
        del trail_light
    if obs.ghosts:
        ghost_light, ghost_mask = _render_ghosts(obs.ghosts, box)
        model += ghost_light
        del ghost_light

    # --- noise (electrons), variance (the exact expectation) ----------------------------
    g, rn = float(obs.gain), float(obs.read_noise)
    expect_e = np.clip(model, 0.0, None)
    expect_e *= g
    variance = expect_e + rn * rn
    variance /= g * g
    nrng = _rng(seed, 1)
    if obs.noise == "poisson":
        image = nrng.poisson(expect_e).astype(np.float64)
        del expect_e
        if rn > 0:
            noise = nrng.standard_normal((H, W), dtype=np.float32)
            noise *= np.float32(rn)
            image += noise
            del noise
        image /= g
        # Negative model pixels (a negative background term) have no photon noise but keep
        # their mean, so that E[image] = model everywhere.
        neg = model < 0
        if neg.any():
            image[neg] += model[neg]
        del neg
    elif obs.noise == "gaussian":
        del expect_e
        image = nrng.standard_normal((H, W))
        image *= np.sqrt(variance)
        image += model
    else:
        del expect_e
        image = model.copy()

    # --- cosmic rays, saturation --------------------------------------------------------
    if obs.cosmic_rays:
        crs = _cosmic_rays(_rng(seed, 2), obs.cosmic_rays, box, obs.cr_amplitude, obs.cr_max_length)
        cr_mask = crs > 0
        image += crs
        del crs
    else:
        cr_mask = np.zeros((H, W), dtype=bool)
    mp = MaskPlanes()
    mask = np.zeros((H, W), dtype=np.int32)
    sat = np.zeros((H, W), dtype=bool)
    if obs.saturation is not None:
        sat = image >= obs.saturation
        image[sat] = obs.saturation
        mask[sat] |= mp.bitmask("SAT")
    cr_flagged = _flagged_cosmic_rays(cr_mask, obs.mask_cosmic_rays, _rng(seed, 6))
    if cr_flagged is not None:
        mask[cr_flagged] |= mp.bitmask("CR")

    # --- sky subtraction, bad columns, NO_DATA ------------------------------------------
    if obs.sky_subtracted:
        image -= obs.sky
        model -= obs.sky
        background -= obs.sky
    bad = _bad_column_mask(obs.bad_columns, _rng(seed, 3), box)
    if bad.any():
        if isinstance(obs.bad_column_value, tuple):
            lo_v, hi_v = obs.bad_column_value
            image[bad] = _rng(seed, 5).uniform(lo_v, hi_v, int(bad.sum()))
        else:
            image[bad] = obs.bad_column_value
        mask[bad] |= mp.bitmask("BAD")
    nodata = _no_data_mask(obs.no_data, box)
    if nodata.any():
        image[nodata] = np.nan
        variance[nodata] = np.inf
        mask[nodata] |= mp.bitmask("NO_DATA")
        cr_mask &= ~nodata

    # --- PSF, WCS, calibration, metadata -------------------------------------------------
    wcs = make_wcs(
        box, ra=obs.ra, dec=obs.dec, pixel_scale=obs.pixel_scale, reference=obs.wcs_reference
    )
    cx, cy = _box_centre(box)
    hdr = fits.Header()
    hdr["BUNIT"] = ("adu", "image units")
    hdr["GAIN"] = (g, "e-/ADU")
    hdr["RDNOISE"] = (rn, "read noise, e-")
    if obs.saturation is not None:
        hdr["SATURATE"] = (float(obs.saturation), "saturation of the raw image, ADU")
    hdr["SKYLEVEL"] = (float(obs.sky), "sky level, ADU")
    hdr["SKYSUB"] = (bool(obs.sky_subtracted), "sky level subtracted")
    hdr["SIMSEED"] = (_seed_card(seed), "gpudiff.sim seed")
    fw = float(np.asarray(renderer.profile_fwhm(np.array([cx]), np.array([cy])))[0])
    if math.isfinite(fw):
        hdr["PSFFWHM"] = (fw, "PSF profile FWHM at the centre, px")
    hdr["BAND"] = obs.band
    hdr["FILTER"] = obs.band
    if obs.visit is not None:
        hdr["VISIT"] = int(obs.visit)
    for k, v in (extra_meta or {}).items():
        hdr[k] = v

    image = image.astype(np.float32)
    variance = variance.astype(np.float32)
    exposure = Exposure.from_arrays(
        image,
        variance,
        mask,
        xy0=(box.x0, box.y0),
        mask_planes=mp,
        psf=renderer.psf,
        wcs=wcs,
        photo_calib=PhotoCalib(obs.photo_calib),
        metadata=hdr,
        backend="numpy",
    )
    del image, variance

    # --- truth ---------------------------------------------------------------------------
    half = np.where(is_gal, 0, renderer.size // 2)
    if is_gal.any():
        r = np.asarray(catalog["r_eff"], float)[is_gal]
        half[is_gal] = (_galaxy_stamp_size(float(r.max())) + renderer.size - 1) // 2
    touched = _overlapping(xs, ys, half, box) & (flux != 0)
    truth = Table()
    truth["id"] = np.asarray(catalog["id"], dtype=np.int64)[touched]
    truth["x"] = xs[touched]
    truth["y"] = ys[touched]
    truth["flux"] = flux[touched]
    for col in ("is_star", "is_galaxy", "is_transient"):
        truth[col] = np.asarray(catalog[col], dtype=bool)[touched]
    truth["in_image"] = _inside(xs[touched], ys[touched], box)
    truth["psf_fwhm"] = renderer.profile_fwhm(np.asarray(truth["x"]), np.asarray(truth["y"]))
    for col in _GALAXY_COLUMNS:
        truth[col] = np.asarray(catalog[col], dtype=np.float64)[touched]
    truth.meta.update(
        {
            "seed": str(_seed_card(seed)),
            "gain": g,
            "read_noise": rn,
            "sky": float(obs.sky),
            "units": "flux in ADU; x, y parent pixel coordinates (integer = pixel centre)",
        }
    )

    empty = np.zeros((H, W), dtype=bool)
    masks = {
        "cosmic_ray": cr_mask,
        "saturated": sat,
        "bad_column": bad,
        "no_data": nodata,
        "trail": empty if trail_mask is None else trail_mask,
        "ghost": empty if ghost_mask is None else ghost_mask,
    }
    return SimResult(
        exposure=exposure,
        truth=truth,
        model=model.astype(np.float32),
        background=background.astype(np.float32),
        cr_mask=cr_mask,
        masks=masks,
        seed=seed,
    )


def simulate_exposure(
    size: Any = 512,
    *,
    xy0=(0, 0),
    catalog: Table | None = None,
    field: FieldConfig | None = None,
    obs: ObsConfig | None = None,
    offset: tuple[float, float] = (0.0, 0.0),
    flux_scale: float = 1.0,
    seed: Any = 0,
    **overrides,
) -> SimResult:
    """Simulate one exposure of a field, with its noiseless model and truth.

    Parameters
    ----------
    size : int, (ny, nx) or Box
        Image size (rows, columns), or the parent box (then ``xy0`` is ignored).
    xy0 : (int, int)
        Parent coordinates of pixel [0, 0].
    catalog : astropy.table.Table, optional
        Sources to render (columns ``x``, ``y``, ``flux`` and optionally those of
        :func:`make_catalog`), in a reference frame; default: ``make_catalog(box,
        field=field, seed=seed)``.
    field : FieldConfig, optional
        The population when no catalog is given.
    obs : ObsConfig, optional
        Observing conditions.
    offset : (float, float)
        Added to the catalog positions (astrometric misregistration, dithers).
    flux_scale : float
        Multiplies the catalog fluxes (transparency, exposure time, zero point).
    seed : int or tuple of int
        Random seed (catalog, noise, cosmic rays and bad columns use independent streams).
    **overrides
        Fields of :class:`FieldConfig` or :class:`ObsConfig`, e.g. ``n_stars=300``,
        ``psf=PsfSpec(kind="moffat", fwhm=4)``, ``sky=200``, ``saturation=30000``.

    Returns
    -------
    SimResult

    Notes
    -----
    The variance plane is the *expected* variance of each pixel computed from the
    noiseless model, ``(max(model, 0)·gain + read_noise²) / gain²`` in ADU², not an
    estimate from the noisy pixels; so (image − model)/√variance has unit variance.
    Cosmic rays are not in it (they are not in the model either).
    """
    box = _as_box(size, xy0)
    field_cfg, obs_cfg = _split_overrides(field, obs, overrides)
    _seed_entropy(seed)
    if catalog is None:
        catalog = make_catalog(box, field=field_cfg, seed=seed)
    else:
        catalog = _check_catalog(catalog)
    return _simulate(box, catalog, obs_cfg, offset=offset, flux_scale=flux_scale, seed=seed)

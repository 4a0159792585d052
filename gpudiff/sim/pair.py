"""Science/template pairs with injected transients: :func:`simulate_pair` and :class:`SimPair`."""

from __future__ import annotations

from dataclasses import dataclass, replace
from dataclasses import field as _dc_field
from typing import Any, Mapping, Sequence

import numpy as np
from astropy.table import Table

from ..errors import InvalidInputError
from ..image.exposure import Exposure
from ._util import (
    _as_box,
    _box_centre,
    _count,
    _finite_number,
    _grow,
    _inside,
    _is_int,
    _loguniform,
    _range,
    _rng,
    _seed_card,
    _seed_entropy,
    _sub_seed,
)
from .background import _bkg_var_at
from .catalog import _GALAXY_COLUMNS, _catalog_table, _check_catalog, _place, make_catalog
from .config import _OBS_NAMES, FieldConfig, ObsConfig, _obs_from, _split_overrides
from .exposure import SimResult, _simulate
from .psfspec import PsfSpec, _make_renderer
from .snr import flux_for_snr, psf_snr


@dataclass
class SimPair:
    """A simulated science/template pair with truth.

    Attributes
    ----------
    science, template : Exposure
        The two exposures.  The template may be larger (``template_border``); both use
        parent coordinates, so the same parent pixel is the same place.
    truth : astropy.table.Table
        Every source: ``id``, ``x``, ``y`` (template/reference parent coordinates),
        ``x_science``, ``y_science`` (= x + dx, y + dy), ``flux_template``,
        ``flux_science`` (ADU in each image), ``is_star``, ``is_galaxy``,
        ``is_transient``, ``transient_kind`` ("", "new" or "vanished"), ``in_science``,
        ``in_template`` (centre inside) and the galaxy parameters.
    science_model, template_model : numpy.ndarray
        Noiseless models (see :class:`SimResult`).
    transients : astropy.table.Table
        The injected changes: ``id``, ``x``, ``y`` (science parent coordinates),
        ``x_template``, ``y_template``, ``flux_science``, ``flux_template``,
        ``delta_flux`` (= flux_science − flux_scale·flux_template, science ADU; what a
        difference image should show), ``snr`` (PSF-optimal S/N of |delta_flux| in the
        science image alone) and ``kind``.
    science_result, template_result : SimResult
        Everything else (backgrounds, cosmic-ray masks, per-exposure truth).
    dx, dy : float
        Science positions minus template positions.
    flux_scale : float
        Science flux / template flux of every non-variable source.
    artefacts : dict
        What :func:`~gpudiff.sim.realistic_raw_pair` put in besides sources (bad columns,
        trails, residual sky planes, NO_DATA strips, ...); empty for :func:`simulate_pair`.
    """

    science: Exposure
    template: Exposure
    truth: Table
    science_model: np.ndarray
    template_model: np.ndarray
    transients: Table
    science_result: SimResult
    template_result: SimResult
    dx: float = 0.0
    dy: float = 0.0
    flux_scale: float = 1.0
    artefacts: dict = _dc_field(default_factory=dict)

    @property
    def science_background(self) -> np.ndarray:
        return self.science_result.background

    @property
    def template_background(self) -> np.ndarray:
        return self.template_result.background


_SCIENCE_DEFAULT = ObsConfig(psf=PsfSpec(fwhm=3.5))
_TEMPLATE_DEFAULT = ObsConfig(psf=PsfSpec(fwhm=2.5))


def simulate_pair(
    size: Any = 512,
    *,
    xy0=(0, 0),
    field: FieldConfig | None = None,
    science: ObsConfig | Mapping[str, Any] | None = None,
    template: ObsConfig | Mapping[str, Any] | None = None,
    template_border: int = 0,
    dx: float = 0.0,
    dy: float = 0.0,
    flux_scale: float = 1.0,
    n_transients: int = 5,
    transient_snr: Any = (10.0, 100.0),
    transient_fluxes: Sequence[float] | None = None,
    transients: Table | None = None,
    n_vanished: int = 0,
    transient_isolation: float = 0.0,
    transient_margin: int | None = None,
    seed: Any = 0,
    **field_overrides,
) -> SimPair:
    """Simulate a science/template pair of one field with injected transients.

    Parameters
    ----------
    size : int, (ny, nx) or Box
        The science image.
    xy0 : (int, int)
        Parent origin of the science image.
    field : FieldConfig, optional
        Source population (drawn over the template's box); ``field_overrides`` replace
        its fields (e.g. ``n_stars=200``).
    science, template : ObsConfig or mapping, optional
        Conditions of each exposure; a mapping overrides fields of the defaults: science
        Gaussian FWHM 3.5 px, template Gaussian FWHM 2.5 px (sharper), both with sky
        1000 ADU, gain 1, read noise 5 e⁻.  The science ``photo_calib`` is set to the
        template's divided by ``flux_scale`` (so calibrated fluxes agree), and both WCSs
        use the science centre as reference unless ``wcs_reference`` is given.
    template_border : int
        The template box is the science box grown by this many pixels on each side
        (LSST tests use 20); xy0 are consistent so parent coordinates agree.
    dx, dy : float
        Misregistration: a source at template position (x, y) appears at (x + dx, y + dy)
        in the science image.  The WCSs do not know about it (an astrometric error).
    flux_scale : float
        Science flux / template flux of every static source.
    n_transients : int
        New point sources in the science image only, placed uniformly inside the science
        image at least ``transient_margin`` pixels from its edges.
    transient_snr : float or (float, float)
        Their PSF-optimal S/N in the science image (log-uniform in the range), converted
        to flux with :func:`flux_for_snr` using the local sky + background variance.
    transient_fluxes : sequence of float, optional
        Explicit fluxes (science ADU) instead; its length overrides ``n_transients``.
    transients : astropy.table.Table, optional
        Explicit transients (columns ``x``, ``y`` in science parent coordinates and
        ``flux`` in science ADU); overrides the three options above.
    n_vanished : int
        Stars (chosen among the brighter half of those well inside the science image) that
        are in the template but absent from the science image (negative in the difference).
    transient_isolation : float
        Minimum distance (pixels) of new transients from every other source and from each
        other, and of vanished stars from every other source.
    transient_margin : int, optional
        Default: half the larger PSF stamp + 1, so that transients are wholly inside.
    seed : int or tuple of int

    Returns
    -------
    SimPair
    """
    sci_box = _as_box(size, xy0)
    if not _is_int(template_border) or template_border < 0:
        raise InvalidInputError(
            f"template_border must be a non-negative integer, got {template_border!r}"
        )
    tpl_box = _grow(sci_box, int(template_border))
    dx = _finite_number("dx", dx)
    dy = _finite_number("dy", dy)
    flux_scale = _finite_number("flux_scale", flux_scale, positive=True)
    n_transients = _count("n_transients", n_transients)
    n_vanished = _count("n_vanished", n_vanished)
    iso = _finite_number("transient_isolation", transient_isolation, nonneg=True)
    _seed_entropy(seed)
    field_cfg, _ = _split_overrides(field, None, field_overrides)
    if set(field_overrides) & _OBS_NAMES:
        raise InvalidInputError(
            "simulate_pair takes observing options through science= / template=, "
            f"not {sorted(set(field_overrides) & _OBS_NAMES)}"
        )
    sci_obs = _obs_from(science, _SCIENCE_DEFAULT, "science")
    tpl_obs = _obs_from(template, _TEMPLATE_DEFAULT, "template")
    ref = _box_centre(sci_box)
    if sci_obs.wcs_reference is None:
        sci_obs = replace(sci_obs, wcs_reference=ref)
    if tpl_obs.wcs_reference is None:
        tpl_obs = replace(tpl_obs, wcs_reference=ref)
    sci_obs = replace(sci_obs, photo_calib=tpl_obs.photo_calib / flux_scale)

    sci_r = _make_renderer(sci_obs.psf, sci_box)
    tpl_r = _make_renderer(tpl_obs.psf, tpl_box)
    margin = (
        (max(sci_r.size, tpl_r.size) // 2 + 1)
        if transient_margin is None
        else int(transient_margin)
    )
    lo = (sci_box.x0 + margin - 0.5, sci_box.y0 + margin - 0.5)
    hi = (sci_box.x1 - margin - 0.5, sci_box.y1 - margin - 0.5)

    base = make_catalog(tpl_box, field=field_cfg, seed=seed)
    n_base = len(base)
    trng = _rng(seed, 4)
    xs_sci = np.asarray(base["x"], float) + dx
    ys_sci = np.asarray(base["y"], float) + dy
    others = np.column_stack([xs_sci, ys_sci]) if n_base else np.zeros((0, 2))

    # --- new transients ------------------------------------------------------------------
    if transients is not None:
        tr = _check_catalog(transients)
        t_xy = np.column_stack([np.asarray(tr["x"], float), np.asarray(tr["y"], float)])
        t_flux = np.asarray(tr["flux"], float)
        t_snr = np.full(len(tr), np.nan)
    else:
        if transient_fluxes is not None:
            t_flux = np.asarray(
                [_finite_number("transient_fluxes", f) for f in transient_fluxes], float
            )
            n_new = t_flux.size
        else:
            n_new = n_transients
        t_xy = _place(trng, n_new, lo, hi, iso, avoid=others, avoid_sep=iso)
        if transient_fluxes is None:
            s_lo, s_hi = _range("transient_snr", transient_snr)
            t_snr = _loguniform(trng, s_lo, s_hi, n_new)
            bvar = _bkg_var_at(sci_obs, sci_box, t_xy[:, 0], t_xy[:, 1])
            t_flux = (
                flux_for_snr(t_snr, sci_r.kernels(t_xy[:, 0], t_xy[:, 1]), bvar, sci_obs.gain)
                if n_new
                else np.zeros(0)
            )
        else:
            t_snr = np.full(n_new, np.nan)
    n_new = len(t_flux)

    # --- vanished stars ------------------------------------------------------------------
    van_idx = np.zeros(0, dtype=np.int64)
    if n_vanished:
        inside = (
            np.asarray(base["is_star"], bool)
            & (xs_sci >= lo[0])
            & (xs_sci < hi[0])
            & (ys_sci >= lo[1])
            & (ys_sci < hi[1])
        )
        if iso > 0 and n_base > 1:
            from scipy.spatial import cKDTree

            d, _ = cKDTree(others).query(others, k=2)
            inside &= d[:, 1] >= iso
            if n_new:
                dn, _ = cKDTree(t_xy).query(others)
                inside &= dn >= iso
        cand = np.flatnonzero(inside)
        if cand.size < n_vanished:
            raise InvalidInputError(
                f"only {cand.size} stars qualify to vanish, {n_vanished} requested"
            )
        # Prefer stars whose disappearance is as significant as the new transients.
        s_lo = _range("transient_snr", transient_snr)[0]
        c_snr = psf_snr(
            np.asarray(base["flux"], float)[cand] * flux_scale,
            sci_r.kernels(xs_sci[cand], ys_sci[cand]),
            _bkg_var_at(sci_obs, sci_box, xs_sci[cand], ys_sci[cand]),
            sci_obs.gain,
        )
        pool = cand[c_snr >= s_lo]
        if pool.size < n_vanished:
            pool = cand[np.argsort(-c_snr, kind="stable")[:n_vanished]]
        van_idx = np.sort(trng.choice(pool, size=n_vanished, replace=False))

    # --- the two catalogs ----------------------------------------------------------------
    tpl_cat = base.copy()
    new = _catalog_table(n_new)
    new["id"] = np.arange(n_base, n_base + n_new, dtype=np.int64)
    new["x"] = t_xy[:, 0] - dx
    new["y"] = t_xy[:, 1] - dy
    new["flux"] = t_flux / flux_scale
    new["is_star"] = True
    new["is_transient"] = True
    sci_cat = base.copy()
    sci_cat["flux"][van_idx] = 0.0
    sci_cat["is_transient"][van_idx] = True
    from astropy.table import vstack

    sci_cat = vstack([sci_cat, new], metadata_conflicts="silent") if n_new else sci_cat

    sci = _simulate(
        sci_box,
        sci_cat,
        sci_obs,
        offset=(dx, dy),
        flux_scale=flux_scale,
        seed=_sub_seed(seed, 1),
        renderer=sci_r,
        extra_meta={"SIMROLE": "science"},
    )
    tpl = _simulate(
        tpl_box,
        tpl_cat,
        tpl_obs,
        seed=_sub_seed(seed, 2),
        renderer=tpl_r,
        extra_meta={"SIMROLE": "template"},
    )
    # --- truth ---------------------------------------------------------------------------
    all_cat = vstack([base, new], metadata_conflicts="silent") if n_new else base.copy()
    n_all = len(all_cat)
    kind = np.full(n_all, "", dtype="<U8")
    kind[van_idx] = "vanished"
    kind[n_base:] = "new"
    flux_t = np.asarray(all_cat["flux"], float).copy()
    flux_t[n_base:] = 0.0
    flux_s = np.asarray(all_cat["flux"], float) * flux_scale
    flux_s[van_idx] = 0.0
    flux_s[n_base:] = t_flux
    truth = Table()
    truth["id"] = np.asarray(all_cat["id"], np.int64)
    truth["x"] = np.asarray(all_cat["x"], float)
    truth["y"] = np.asarray(all_cat["y"], float)
    truth["x_science"] = truth["x"] + dx
    truth["y_science"] = truth["y"] + dy
    truth["flux_template"] = flux_t
    truth["flux_science"] = flux_s
    truth["is_star"] = np.asarray(all_cat["is_star"], bool)
    truth["is_galaxy"] = np.asarray(all_cat["is_galaxy"], bool)
    truth["is_transient"] = kind != ""
    truth["transient_kind"] = kind

    truth["in_science"] = _inside(
        np.asarray(truth["x_science"]), np.asarray(truth["y_science"]), sci_box
    )
    truth["in_template"] = _inside(np.asarray(truth["x"]), np.asarray(truth["y"]), tpl_box)
    for col in _GALAXY_COLUMNS:
        truth[col] = np.asarray(all_cat[col], float)
    truth.meta.update(
        {
            "seed": str(_seed_card(seed)),
            "dx": dx,
            "dy": dy,
            "flux_scale": flux_scale,
            "template_border": int(template_border),
            "units": "flux in ADU of each image; x, y template (reference) parent coordinates",
        }
    )

    # --- transients table ----------------------------------------------------------------
    sel = np.concatenate([van_idx, np.arange(n_base, n_all)]).astype(np.int64)
    snr = np.concatenate([np.full(van_idx.size, np.nan), t_snr])
    todo = np.flatnonzero(~np.isfinite(snr))
    if todo.size:
        xs_t = np.asarray(truth["x_science"])[sel[todo]]
        ys_t = np.asarray(truth["y_science"])[sel[todo]]
        dflux = np.abs(flux_s[sel[todo]] - flux_scale * flux_t[sel[todo]])
        snr[todo] = psf_snr(
            dflux,
            sci_r.kernels(xs_t, ys_t),
            _bkg_var_at(sci_obs, sci_box, xs_t, ys_t),
            sci_obs.gain,
        )
    tt = Table()
    tt["id"] = truth["id"][sel]
    tt["x"] = np.asarray(truth["x_science"])[sel]
    tt["y"] = np.asarray(truth["y_science"])[sel]
    tt["x_template"] = np.asarray(truth["x"])[sel]
    tt["y_template"] = np.asarray(truth["y"])[sel]
    tt["flux_science"] = flux_s[sel]
    tt["flux_template"] = flux_t[sel]
    tt["delta_flux"] = flux_s[sel] - flux_scale * flux_t[sel]
    tt["snr"] = snr
    tt["kind"] = kind[sel]
    tt.meta.update(
        {"units": "x, y science parent coordinates; fluxes in ADU; delta_flux in science ADU"}
    )

    return SimPair(
        science=sci.exposure,
        template=tpl.exposure,
        truth=truth,
        science_model=sci.model,
        template_model=tpl.model,
        transients=tt,
        science_result=sci,
        template_result=tpl,
        dx=dx,
        dy=dy,
        flux_scale=flux_scale,
    )

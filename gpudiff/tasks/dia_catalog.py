"""The DIA source catalog of a detection on a difference image.

:func:`dia_catalog` turns the peaks of a detection (:func:`gpudiff.ops.detect_sources`)
into the catalog :class:`~gpudiff.tasks.detect_and_measure.DetectAndMeasureTask` returns:
the peaks of one trail and of one footprint merged into one record, the flags of
:data:`DIA_FLAGS` set, sky positions, units and descriptions.  The bright-star halos that
set ``flag_bright_star`` are :mod:`gpudiff.tasks.halos`'; :func:`flag_line_sources` flags
the records whose light in the science image or the template is a cosmic-ray track.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import numpy as np
from astropy import units as u
from astropy.table import Table

from ..errors import InvalidInputError
from ..image import Exposure
from ..ops.sharpness import line_sharpness_many
from ..ops.streaks import StreakResult
from .halos import BusyMap, _in_discs, _measured_halo_radius, own_halo_records

if TYPE_CHECKING:  # the config lives with the task, which imports this module
    from .detect_and_measure import DetectAndMeasureConfig

__all__ = ["DIA_FLAGS", "dia_catalog", "flag_line_sources"]

#: Boolean flag columns of the DIA catalog; ``clean`` is the NOR of them.
DIA_FLAGS = (
    "flag_edge",
    "flag_masked",
    "flag_saturated",
    "flag_cr",
    "flag_dipole",
    "flag_streak",
    "flag_bright_star",
    "flag_multi_peak",
    "flag_psf_flux",
)


def _groups(
    cat: Table, streak_id: np.ndarray, link: float, streaks=(), deblend: float | None = None
) -> np.ndarray:
    """Group key per peak: its streak (all peaks on one trail) or else its footprint.

    A footprint a trail runs through holds, besides the trail's peaks, whatever touches
    the trail: the peaks beside its line (farther from the infinite line of every trail in
    ``streaks`` than its band's half-width) are grouped among themselves, single-linkage
    within ``link`` pixels, not into one record of the whole footprint (a realistic 2048²
    pair lost a S/N 10 transient 6 px from a trail's centre line, 1.4 px beyond its band,
    to a record 350 px away on the same footprint).  Peaks on the line past the band's
    ends (where the trail leaves the image's data) stay with the footprint.
    """
    fid = np.asarray(cat["footprint_id"], dtype=np.int64)
    key = np.where(streak_id > 0, -streak_id, fid)
    touched = np.isin(fid, fid[streak_id > 0])
    off = (streak_id == 0) & touched
    x, y = np.asarray(cat["x"], float), np.asarray(cat["y"], float)
    for st in streaks:
        ux, uy = math.cos(math.radians(st.angle)), math.sin(math.radians(st.angle))
        off &= np.abs((x - st.x0) * uy - (y - st.y0) * ux) > st.half_width
    # Deblending: the peaks of a footprint no trail touches are grouped within
    # ``deblend`` pixels, single linkage (two transients 3.5 FWHM apart are two records).
    far_apart = (streak_id == 0) & ~touched if deblend is not None else np.zeros_like(off)
    if not (off.any() or far_apart.any()):
        return key
    idx = np.flatnonzero(off | far_apart)
    radius = np.where(off[idx], link, deblend if deblend is not None else link)
    x, y = x[idx], y[idx]
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components
    from scipy.spatial import cKDTree

    pairs = cKDTree(np.c_[x, y]).query_pairs(max(link, deblend or 0.0), output_type="ndarray")
    dd = np.hypot(x[pairs[:, 0]] - x[pairs[:, 1]], y[pairs[:, 0]] - y[pairs[:, 1]])
    pairs = pairs[dd <= radius[pairs[:, 0]]]
    pairs = pairs[fid[idx][pairs[:, 0]] == fid[idx][pairs[:, 1]]]
    n = idx.size
    graph = coo_matrix((np.ones(len(pairs)), (pairs[:, 0], pairs[:, 1])), shape=(n, n))
    _, comp = connected_components(graph, directed=False)
    key[idx] = fid.max() + 1 + comp
    return key


def _merge_groups(
    cat: Table, streak_id: np.ndarray, sep: float, link: float, streaks=(), deblend=None
):
    """One record per group: (index of each group's brightest peak, group size, multi-peak
    flag (peaks farther than ``sep`` from the brightest), group's OR of a boolean).  See
    :func:`_groups` for ``link`` and ``streaks``."""
    key = _groups(cat, streak_id, link, streaks, deblend)
    # The catalog is sorted by decreasing |peak_significance|: a group's first row is its
    # brightest peak.
    _, first, inv, count = np.unique(
        key, return_index=True, return_inverse=True, return_counts=True
    )
    inv = inv.reshape(-1)
    x, y = np.asarray(cat["x"], float), np.asarray(cat["y"], float)
    d2 = (x - x[first][inv]) ** 2 + (y - y[first][inv]) ** 2
    far = np.zeros(first.size, dtype=bool)
    np.logical_or.at(far, inv, d2 > sep * sep)

    def any_of(v):
        o = np.zeros(first.size, dtype=bool)
        np.logical_or.at(o, inv, np.asarray(v, dtype=bool))
        return o

    def or_bits(v):
        o = np.zeros(first.size, dtype=np.int64)
        np.bitwise_or.at(o, inv, np.asarray(v, dtype=np.int64))
        return o

    def total(v):
        return np.bincount(inv, weights=np.asarray(v, float), minlength=first.size)

    return first, count, far, any_of, or_bits, total, inv


#: (unit, description) of every DIA catalog column.
_DESCRIPTIONS = {
    "id": ("", "record number, 1-based"),
    "x": (
        "pix",
        "centroid column in the PARENT frame (array column + the image's xy0[0]; "
        "integer = pixel centre)",
    ),
    "y": ("pix", "centroid row in the PARENT frame (array row + the image's xy0[1])"),
    "x_array": (
        "pix",
        "centroid column in the array (0 = first column of the difference; x minus xy0[0])",
    ),
    "y_array": ("pix", "centroid row in the array (y minus xy0[1])"),
    "ra": ("deg", "right ascension of the centroid from the difference's WCS (NaN without a WCS)"),
    "dec": ("deg", "declination of the centroid from the difference's WCS (NaN without a WCS)"),
    "psf_flux": (
        "FLUX",
        "PSF flux measured on the difference (signed; the brightest peak's for a merged record)",
    ),
    "psf_flux_err": ("FLUX", "1σ error of psf_flux from the variance plane"),
    "snr": ("", "psf_flux / psf_flux_err"),
    "peak_significance": (
        "",
        "S/N of the detection image at the peak (PSF-smoothed difference, "
        "or the score image with --preconvolve)",
    ),
    "footprint_npix": ("pix2", "pixels in the detection footprint(s) of this record"),
    "n_peaks": (
        "",
        "detection peaks this record stands for (several: one footprint or one trail, merged)",
    ),
    "polarity": ("", "+1: brighter in the science, -1: brighter in the template"),
    "streak_id": (
        "",
        "1-based index of the trail this record lies on (0: none); see the STREAK mask plane",
    ),
    "masked_planes": (None, "mask planes (of the flagging set) in the footprint or central 5x5"),
    "flag_edge": ("", "PSF stamp leaves the image"),
    "flag_masked": (
        "",
        "a flagging mask plane (BAD, SAT, CR, EDGE, NO_DATA, SUSPECT, INTRP) in the "
        "central 5x5 (see masked_planes for the whole footprint)",
    ),
    "flag_saturated": ("", "SAT in the footprint or central 5x5"),
    "flag_cr": (
        "",
        "a cosmic ray at the centre (CR plane found on the difference, or a 1-px line of "
        "light in the science image)",
    ),
    "flag_dipole": ("", "an opposite-polarity record within dipole_separation_fwhm x FWHM"),
    "flag_streak": ("", "on a linear trail (satellite): all its peaks merged into this record"),
    "flag_bright_star": (
        "",
        "inside the halo of a bright or saturated star, or of a bright star's residual",
    ),
    "flag_multi_peak": (
        "",
        "its footprint held peaks more than a FWHM apart, or it is a faint record with a "
        "faint same-sign neighbour within 3 FWHM (pieces of one residual or track, not "
        "one point source)",
    ),
    "flag_psf_flux": ("", "PSF flux failed (no usable pixels in the PSF core)"),
    "clean": ("", "no flag set: a candidate transient"),
}


def _flux_unit(metadata):
    bunit = metadata.get("BUNIT") if metadata is not None else None
    if bunit:
        try:
            return u.Unit(str(bunit).strip(), parse_strict="raise")
        except (ValueError, TypeError):
            pass
    return u.adu


def dia_catalog(
    det,
    measured: Exposure,
    streaks: StreakResult | None,
    halos: np.ndarray,
    cfg: DetectAndMeasureConfig,
    busy=None,
) -> Table:
    """The DIA catalog from a detection: peaks merged per trail and per footprint, flags,
    sky positions, units and descriptions (see the module docstring).  ``busy``: as
    :func:`bright_star_halos`."""
    cat = det.catalog
    mi = measured.masked_image
    x0, y0 = mi.xy0
    fwhm = float(measured.psf.fwhm())
    n = len(cat)
    if streaks is not None and n:
        lab = streaks.labels
        px = np.clip(np.rint(np.asarray(cat["x"], float) - x0).astype(np.int64), 0, mi.shape[1] - 1)
        py = np.clip(np.rint(np.asarray(cat["y"], float) - y0).astype(np.int64), 0, mi.shape[0] - 1)
        sid = mi.backend.asnumpy(lab[mi.backend.asarray(py), mi.backend.asarray(px)]).astype(
            np.int64
        )
    else:
        sid = np.zeros(n, dtype=np.int64)
    first, count, far, any_of, or_bits, total, inv = (
        _merge_groups(
            cat,
            sid,
            cfg.multi_peak_separation_fwhm * fwhm,
            3.0 * fwhm,
            streaks.streaks if streaks is not None else (),
            None if cfg.deblend_separation_fwhm is None else cfg.deblend_separation_fwhm * fwhm,
        )
        if n
        else (np.zeros(0, np.int64),) * 3 + (None,) * 4
    )
    out = Table()
    m = first.size
    out["id"] = np.arange(1, m + 1, dtype=np.int64)
    x, y = np.asarray(cat["x"], float)[first], np.asarray(cat["y"], float)[first]
    out["x"], out["y"] = x, y
    out["x_array"], out["y_array"] = x - x0, y - y0
    ra = dec = np.full(m, np.nan)
    if measured.wcs is not None and m:
        # The WCS maps array pixels (Exposure convention).
        ra, dec = (
            np.asarray(v, dtype=np.float64)
            for v in measured.wcs.pixel_to_world_values(x - x0, y - y0)
        )
    out["ra"], out["dec"] = ra, dec
    for c in ("psf_flux", "psf_flux_err", "snr", "peak_significance"):
        out[c] = np.asarray(cat[c], dtype=np.float64)[first]
    out["footprint_npix"] = (
        np.asarray(total(_unique_footprint_npix(cat)), dtype=np.int64)
        if m
        else np.zeros(0, np.int64)
    )
    out["n_peaks"] = np.asarray(count, dtype=np.int64)
    out["polarity"] = np.where(
        np.asarray(cat["peak_significance"], float)[first] >= 0, 1, -1
    ).astype(np.int8)
    out["streak_id"] = sid[first] if m else np.zeros(0, np.int64)
    planes = det.mask_planes
    if m:
        bits = or_bits(np.asarray(cat["mask_center"]) | np.asarray(cat["mask_footprint"]))
        fl_mask = planes.bitmask_if_present(list(cfg.flag_planes))
        fl = bits & fl_mask
        names = np.empty(m, dtype=object)
        for v in np.unique(fl):  # distinct bit patterns, not sources
            names[fl == v] = ",".join(planes.interpret(int(v)))
        out["masked_planes"] = names.astype(str)
        out["flag_edge"] = any_of(cat["flag_edge"])
        # A defect (or what a kernel spread from it: the planes are grown by each kernel's
        # footprint, docs/algorithms.md §14) that reached the source's centre; for faint
        # sources, anywhere in the footprint (``masked_footprint_snr``).  A bright
        # transient's footprint reaches 10-20 px, and a bad column's plane is grown by the
        # matching kernel to ~20 px where it was filled over a source, so footprint flags
        # on every source cost 11 of 44 S/N >= 8 injections of a realistic 2048² pair
        # (none of them affected by the defect).
        # The centre is the detection's 5×5 box (mask_center), not LSST's 3×3 PixelFlags
        # centre: on the shared DECam cutouts a template cosmic-ray track, found over only
        # 5 of its ~20 px, leaves a S/N -12 residual 2 px beyond the grown fill of the part
        # found; with 3×3 two same-epoch pairs gained a clean false source (7 in the 20
        # pairs, 5.3/Mpix, against 5 with 5×5), for ~2 % of the simulated transients beside
        # defects (docs/algorithms.md §14).
        centre = or_bits(np.asarray(cat["mask_center"]))
        faint = np.abs(np.asarray(out["snr"], float)) < cfg.masked_footprint_snr
        out["flag_masked"] = (np.where(faint, bits, centre) & fl_mask) != 0
        out["flag_saturated"] = any_of(cat["flag_saturated"])
        cr = planes.bitmask_if_present("CR")
        out["flag_cr"] = (
            (np.asarray(cat["mask_center"])[first] & cr) != 0 if cr else np.zeros(m, bool)
        )
    else:
        out["masked_planes"] = np.zeros(0, dtype=str)
        for c in ("flag_edge", "flag_masked", "flag_saturated", "flag_cr"):
            out[c] = np.zeros(0, bool)
    out["flag_dipole"] = _dipoles(out, fwhm * cfg.dipole_separation_fwhm)
    out["flag_streak"] = np.asarray(out["streak_id"]) > 0
    out["flag_bright_star"] = _in_discs(
        x, y, halos, np.abs(np.asarray(out["psf_flux"], float)) / cfg.halo_own_flux_fraction
    )
    if busy is None and det.significance is not None:
        busy = BusyMap(det.significance, cfg, mi.backend)  # fetched at most once, if asked
    out["flag_multi_peak"] = far & (np.asarray(out["streak_id"]) == 0) if m else np.zeros(0, bool)
    if m:
        out["flag_multi_peak"] |= _faint_chains(
            x, y, np.asarray(out["snr"], float), cfg.masked_footprint_snr, 3.0 * fwhm
        )
    if m and det.significance is not None:
        # A bright star's residual that is not a point source (a ring, a dipole, a sharp
        # core) has a halo of its own: fainter records around it are its pieces.
        # Measured from the detection image as for saturated stars (DECam cutouts: the
        # clean false sources were 2–4 FWHM from such residuals).
        # A trail's record is every peak on the trail merged: its busy annuli are the trail
        # itself, not a residual around a star (a realistic 2048² pair lost a S/N 48
        # transient 30 px from a trail to a 35 px "halo" so).
        bad = out["flag_multi_peak"] | out["flag_dipole"] | out["flag_cr"] | out["flag_masked"]
        bad &= ~out["flag_streak"]
        src = bad & (np.abs(np.asarray(out["peak_significance"], float)) >= cfg.halo_residual_snr)
        if src.any():
            r0 = 2.0 * fwhm
            d = np.c_[x[src], y[src], np.full(int(src.sum()), r0)]
            d[:, 2] = np.maximum(
                r0,
                _measured_halo_radius(
                    busy.get(),
                    d,
                    mi.xy0,
                    cfg,
                    gap=fwhm,
                )
                + fwhm,
            )
            inside = _in_discs(x, y, d)
            out["flag_bright_star"] |= inside & ~src
            # Model radius 2 FWHM (the 5th column, as the stars' discs).
            halos = np.concatenate(
                [halos.reshape(-1, 5), np.c_[d, np.full(len(d), np.inf), np.full(len(d), r0)]]
            )
    if m and busy is not None and out["flag_bright_star"].any():
        # A record does not make its own halo: its light, out to where its significance
        # profile (a point source's: the PSF filtered by itself, σ = √2 σ_PSF) falls
        # below the busy threshold, plus a FWHM, is left out of the measured extents.
        sig_psf = fwhm / 2.3548
        ratio = np.abs(np.asarray(out["peak_significance"], float)) / cfg.halo_annulus_snr
        own_r = 2.0 * sig_psf * np.sqrt(np.log(np.maximum(ratio, 1.0))) + fwhm
        own = own_halo_records(
            x, y, own_r, out["flag_bright_star"], halos, busy.get(), mi.xy0, cfg, fwhm
        )
        out["flag_bright_star"] &= ~own
    out["flag_psf_flux"] = (
        any_of(cat["flag_psf_flux"]) if m else np.zeros(0, bool)
    ) | ~np.isfinite(np.asarray(out["psf_flux"], float))
    out["clean"] = (
        ~np.any([np.asarray(out[f], bool) for f in DIA_FLAGS], axis=0) if m else np.zeros(0, bool)
    )
    funit = _flux_unit(measured.metadata)
    for name in out.colnames:
        unit, desc = _DESCRIPTIONS[name]
        out[name].unit = funit if unit == "FLUX" else (u.Unit(unit) if unit is not None else None)
        out[name].description = desc
    out.meta.update(
        {
            "x0": int(x0),
            "y0": int(y0),
            "threshold": float(cfg.threshold),
            "n_streaks": 0 if streaks is None else len(streaks.streaks),
            "n_bright_star_halos": int(len(halos)),
            # > 1: threshold and S/N in units of the measured (correlated) noise.
            "noise_excess": float(cat.meta.get("noise_excess", float("nan"))),
            "noise_rescaled": bool(cat.meta.get("noise_rescaled", False)),
        }
    )
    return out


def _unique_footprint_npix(cat: Table) -> np.ndarray:
    """Each footprint's pixel count on its first peak only, so group sums count it once."""
    fid = np.asarray(cat["footprint_id"], dtype=np.int64)
    _, first = np.unique(fid, return_index=True)
    v = np.zeros(len(cat), dtype=np.float64)
    v[first] = np.asarray(cat["footprint_npix"], dtype=np.float64)[first]
    return v


def _dipoles(cat: Table, radius: float) -> np.ndarray:
    """True for sources with an opposite-polarity neighbour closer than ``radius``."""
    n = len(cat)
    if n < 2:
        return np.zeros(n, dtype=bool)
    x, y, p = np.asarray(cat["x"]), np.asarray(cat["y"]), np.asarray(cat["polarity"])
    d2 = (x[:, None] - x[None, :]) ** 2 + (y[:, None] - y[None, :]) ** 2
    opposite = p[:, None] != p[None, :]
    return ((d2 < radius * radius) & opposite).any(axis=1)


def _faint_chains(x: np.ndarray, y: np.ndarray, snr: np.ndarray, snr_max: float, sep: float):
    """Faint records (|S/N| < ``snr_max``) with a faint record of the same sign within
    ``sep`` pixels: the separate pieces of one faint elongated feature.

    A cosmic-ray track hit at a grazing angle, too faint for the sharpness test of
    :func:`gpudiff.ops.find_cosmic_rays`, breaks at 5σ into two or three compact
    footprints a few pixels apart (measured: 12 of the 14 clean false sources of a 2048²
    realistic pair, science sharper); isolated faint transients do not come in such pairs.
    """
    out = np.zeros(x.size, dtype=bool)
    faint = np.flatnonzero(np.isfinite(snr) & (np.abs(snr) < snr_max))
    if faint.size < 2:
        return out
    fx, fy, fs = x[faint], y[faint], np.sign(snr[faint])
    for i in range(0, faint.size, 512):  # bounded temporaries
        sl = slice(i, i + 512)
        d2 = (fx[sl, None] - fx[None, :]) ** 2 + (fy[sl, None] - fy[None, :]) ** 2
        near = (d2 <= sep * sep) & (fs[sl, None] == fs[None, :])
        near[np.arange(near.shape[0]), np.arange(i, i + near.shape[0])] = False  # itself
        out[faint[sl]] = near.any(axis=1)
    return out


def flag_line_sources(out: Table, images, cfg, backend) -> None:
    """``flag_cr`` on the records whose light in the image of their polarity (+1: the
    science's, -1: the template's; ``images`` is ((exposure or None, polarity), ...)) is
    a 1-px line (a faint cosmic-ray track the inputs' finder missed); ``clean`` follows.
    Every image is tested in one pass (one transfer).  In place."""
    jobs, sels = [], []
    pol = np.asarray(out["polarity"])
    on_streak = np.asarray(out["flag_streak"], bool)
    for image, polarity in images:
        out.meta["n_sharp_line" if polarity > 0 else "n_sharp_line_template"] = 0
        if image is None:
            continue
        if image.psf is None:
            raise InvalidInputError("an exposure given for the line test has no PSF")
        sel = (pol == polarity) & ~on_streak
        if sel.any():
            x, y = np.asarray(out["x"], float)[sel], np.asarray(out["y"], float)[sel]
            jobs.append((image.masked_image, image.psf, x, y))
            sels.append((sel, polarity))
    if not jobs:
        return
    sharp = np.zeros(len(out), bool)
    for (sel, polarity), (t, ratio, rho) in zip(sels, line_sharpness_many(jobs, backend=backend)):
        hit = (t >= cfg.sharp_line_sigma) & (ratio - rho >= cfg.sharp_line_excess)
        sharp[sel] = hit
        out.meta["n_sharp_line" if polarity > 0 else "n_sharp_line_template"] = int(hit.sum())
    if sharp.any():
        out["flag_cr"] = np.asarray(out["flag_cr"], bool) | sharp
        out["clean"] = np.asarray(out["clean"], bool) & ~sharp

"""The DIA source catalog of a detection on a difference image.

:func:`dia_catalog` turns the peaks of a detection (:func:`gpudiff.ops.detect_sources`)
into the catalog :class:`~gpudiff.tasks.detect_and_measure.DetectAndMeasureTask` returns:
the peaks of one trail and of one footprint merged into one record, the flags of
:data:`DIA_FLAGS` set, sky positions, units and descriptions.  :func:`bright_star_halos`
gives the halo discs of bright and saturated stars that flag the records inside them
(``flag_bright_star``; the halo rules are those of
:class:`~gpudiff.tasks.detect_and_measure.DetectAndMeasureConfig`).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import numpy as np
from astropy import units as u
from astropy.table import Table

from ..errors import InvalidInputError
from ..image import Exposure
from ..ops._host import fetch
from ..ops.streaks import StreakResult

if TYPE_CHECKING:  # the config lives with the task, which imports this module
    from .detect_and_measure import DetectAndMeasureConfig

__all__ = ["DIA_FLAGS", "bright_star_halos", "dia_catalog"]

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

#: Mask planes holding saturated pixels of the science (SAT) and of the template
#: (SAT_TEMPLATE, from ``rename_template_mask``), in afw and lsst-images spellings.
_SAT_PLANES = ("SAT", "SATURATED", "SAT_TEMPLATE", "SATURATED_TEMPLATE")


class BusyMap:
    """The host boolean map of |significance| ≥ ``halo_annulus_snr`` (the pixels a
    residual's measured extent counts), made once.

    On a device it crosses bit-packed (1/32 of the float32 significance's bytes: 0.5 MB
    rather than 17 at 2048²), in the transfer of whoever asks first: :func:`bright_star_halos`
    fetches it with its own arrays (no host sync of its own)."""

    def __init__(self, significance, cfg, backend):
        self._sig, self._cfg, self._be = significance, cfg, backend
        self._host = None

    @property
    def fetched(self) -> bool:
        return self._host is not None

    def device_part(self):
        """What crosses to the host: the packed bits (device) or the map itself (CPU)."""
        xp = self._be.xp
        on = xp.abs(self._sig) >= self._cfg.halo_annulus_snr
        return xp.packbits(on.ravel()) if self._be.is_gpu else on

    def accept(self, host) -> None:
        """Take the host copy of :meth:`device_part`."""
        if self._be.is_gpu:
            shape = self._sig.shape
            bits = np.unpackbits(np.asarray(host))[: shape[0] * shape[1]]
            host = bits.reshape(shape).astype(bool)
        self._host = np.asarray(host)

    def get(self) -> np.ndarray:
        if self._host is None:
            self.accept(self._be.asnumpy(self.device_part()))
        return self._host


def bright_star_halos(
    exposure: Exposure,
    bright_sources: Table | None,
    config: DetectAndMeasureConfig | None = None,
    significance=None,
    busy: BusyMap | None = None,
) -> np.ndarray:
    """Halo discs (n, 4) of bright stars: parent x, y, radius (pixels) and the star's flux
    (inf for a saturated footprint).

    From the saturated footprints of the exposure's SAT planes (radius
    ``halo_sat_factor`` × √(area/π) + FWHM) and from ``bright_sources`` (Moffat wing
    radius, see :class:`~gpudiff.tasks.detect_and_measure.DetectAndMeasureConfig`).
    With the detection ``significance`` image, each radius is at least the measured
    extent of the star's residual: the outermost 1-px annulus (out to
    ``halo_max_factor`` × the model radius) in which more than ``halo_annulus_fraction``
    of the pixels have |S/N| ≥ ``halo_annulus_snr``, plus a FWHM.  The model radius
    assumes a residual fraction; the measured one sees the actual residual, whose wings
    depend on how well the kernel matched them.  ``busy``: the :class:`BusyMap` of the
    significance when the caller shares one.
    """
    if config is None:
        # Imported here: detect_and_measure imports this module at its top.
        from .detect_and_measure import DetectAndMeasureConfig

        config = DetectAndMeasureConfig()
    cfg = config
    mi = exposure.masked_image
    be, xp = mi.backend, mi.backend.xp
    fwhm = float(exposure.psf.fwhm())
    if significance is not None and busy is None:
        busy = BusyMap(significance, cfg, be)
    # What crosses to the host goes in one transfer: the saturated footprints' sums, the
    # sky-variance sample and the busy-pixel map.
    dev: dict = {}
    sat = mi.mask_planes.bitmask_if_present(list(_SAT_PLANES))
    n_sat = 0
    if sat:
        on = (mi.mask & sat) != 0
        # On a device the emptiness test would be a host sync of its own: an empty mask
        # labels to no footprint, and the sums below are then empty.
        if be.is_gpu or bool(on.any()):
            labels, n = be.ndimage.label(on, structure=be.asarray(np.ones((3, 3), dtype=bool)))
            n_sat = int(n)
            # Pixel counts and coordinate sums of the footprints (Backend.bincount: no
            # host sync of its own on a device).
            ys, xs = xp.nonzero(labels)
            lab = labels[ys, xs]
            dev["sums"] = xp.stack(
                [
                    be.bincount(lab, n_sat + 1).astype(xp.float64),
                    be.bincount(lab, n_sat + 1, xs.astype(xp.float64)),
                    be.bincount(lab, n_sat + 1, ys.astype(xp.float64)),
                ]
            )
    use_bright = bright_sources is not None and len(bright_sources) > 0
    if use_bright:
        fcol = next((c for c in ("psf_flux", "flux") if c in bright_sources.colnames), None)
        if fcol is None or not {"x", "y"} <= set(bright_sources.colnames):
            raise InvalidInputError(
                "bright_sources needs x, y and psf_flux (or flux) columns, got "
                f"{bright_sources.colnames}"
            )
        # The sky noise: the median variance of the source-free pixels on every 4th row
        # and column (the variance plane is smooth; 1/16 of the bytes cross to the host,
        # 1 MB rather than 17 at 2048²).
        good = mi.good_pixels(("NO_DATA", "EDGE", "BAD", "SAT", "DETECTED", "DETECTED_NEGATIVE"))
        dev["v"] = xp.where(good[::4, ::4], mi.variance[::4, ::4], np.nan)
    if busy is not None and not busy.fetched and dev:
        dev["busy"] = busy.device_part()
    host = dict(zip(dev, fetch(be, *dev.values())))
    if "busy" in host:
        busy.accept(host["busy"])
    discs = []
    if "sums" in host:
        cnt, sx, sy = np.asarray(host["sums"])[:, 1:]
        r = cfg.halo_sat_factor * np.sqrt(cnt / np.pi) + fwhm
        # A saturated star's flux is unknown: its halo flags every record (inf).
        discs.append(np.c_[sx / cnt + mi.xy0[0], sy / cnt + mi.xy0[1], r, np.full(n_sat, np.inf)])
    if use_bright:
        f = np.abs(np.asarray(bright_sources[fcol], dtype=np.float64))
        ok = np.isfinite(f) & (f > 0)
        v = np.asarray(host["v"]).ravel()
        v = v[np.isfinite(v)]
        sky = math.sqrt(float(np.median(v))) if v.size else 1.0
        beta = cfg.halo_beta
        alpha = fwhm / (2.0 * math.sqrt(2.0 ** (1.0 / beta) - 1.0))
        # Moffat I(r) = F (β−1)/(π α²) (1 + r²/α²)^−β; solve ε·I(r) = nσ for r.
        q = (
            cfg.halo_residual_fraction
            * f[ok]
            * (beta - 1)
            / (math.pi * alpha**2 * cfg.halo_nsigma * sky)
        )
        r = alpha * np.sqrt(np.maximum(q ** (1.0 / beta) - 1.0, 0.0))
        big = r > fwhm  # a halo inside the PSF core is the star itself, not a halo
        x = np.asarray(bright_sources["x"], float)[ok][big]
        y = np.asarray(bright_sources["y"], float)[ok][big]
        discs.append(np.c_[x, y, r[big], f[ok][big]])
    if not discs:
        return np.zeros((0, 4))
    discs = np.concatenate(discs)
    if busy is not None and len(discs):
        discs[:, 2] = np.maximum(
            discs[:, 2], _measured_halo_radius(busy.get(), discs, mi.xy0, cfg, gap=fwhm) + fwhm
        )
    return discs


def _measured_halo_radius(
    busy: np.ndarray, discs: np.ndarray, xy0, cfg, gap: float = 4.0
) -> np.ndarray:
    """Per disc, the outermost radius of the star's significantly non-noise annuli (see
    :func:`bright_star_halos`); 0 when none is.  Host work on one cutout per star.

    Busy annuli count while they continue the star's own: each within ``gap`` pixels of
    the model radius or of the previous busy one.  An unrelated structure farther out
    (another star's residual, a masked column, a trail) is not this star's halo: counting
    the outermost busy annulus anywhere grew saturated stars' halos from ~65 px to
    ~270 px on a 2048² realistic pair and flagged 35 of 254 S/N >= 8 injections."""
    H, W = busy.shape
    out = np.zeros(len(discs))
    for i, (x, y, r0) in enumerate(discs[:, :3]):  # stars, not pixels: a few per image
        rmax = int(math.ceil(cfg.halo_max_factor * r0))
        cx, cy = x - xy0[0], y - xy0[1]
        xa, xb = max(0, int(cx) - rmax), min(W, int(cx) + rmax + 1)
        ya, yb = max(0, int(cy) - rmax), min(H, int(cy) + rmax + 1)
        if xa >= xb or ya >= yb:
            continue
        cut = busy[ya:yb, xa:xb]
        yy, xx = np.mgrid[ya:yb, xa:xb]
        r = np.hypot(xx - cx, yy - cy).astype(np.int64).ravel()
        n = np.bincount(r, minlength=rmax + 1)[: rmax + 1]
        hit = np.bincount(r, weights=cut.ravel(), minlength=rmax + 1)[: rmax + 1]
        frac = np.where(n > 0, hit / np.maximum(n, 1), 0.0)
        # Noise alone puts ~1 % of pixels above 2.5σ: annuli at 10 % are the star's.
        reach, last = float(r0), 0.0
        for b in np.flatnonzero(frac > cfg.halo_annulus_fraction):
            if b > reach + gap:
                break
            reach, last = max(reach, float(b)), float(b)
        out[i] = last
    return out


def _in_discs(x: np.ndarray, y: np.ndarray, discs: np.ndarray, own=None) -> np.ndarray:
    """True where (x, y) lies inside any disc (n_src × n_disc, both small).

    With a 4th disc column (the star's flux) and ``own`` (per source: |flux| / the own-flux
    fraction), a disc whose star is not brighter than ``own`` does not count: the source
    carries most of that star's flux, so it is the change, not the star's residual.
    """
    if not len(discs) or not x.size:
        return np.zeros(x.size, dtype=bool)
    out = np.zeros(x.size, dtype=bool)
    for i in range(0, len(discs), 256):  # bounded temporaries
        d = discs[i : i + 256]
        hit = ((x[:, None] - d[None, :, 0]) ** 2 + (y[:, None] - d[None, :, 1]) ** 2) <= d[
            None, :, 2
        ] ** 2
        if own is not None and d.shape[1] > 3:
            hit &= d[None, :, 3] > np.asarray(own, float)[:, None]
        out |= hit.any(axis=1)
    return out


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
                    (busy or BusyMap(det.significance, cfg, mi.backend)).get(),
                    d,
                    mi.xy0,
                    cfg,
                    gap=fwhm,
                )
                + fwhm,
            )
            inside = _in_discs(x, y, d)
            out["flag_bright_star"] |= inside & ~src
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

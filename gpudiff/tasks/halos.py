"""Halos of bright and saturated stars in a difference image (``flag_bright_star``).

A kernel matches a star's core, not always its wings: the residual of a bright or
saturated star's wings breaks into blobs that each pass as a point source.
:func:`bright_star_halos` gives the discs (from the SAT planes' footprints and from a
catalog of bright stars, each widened to the residual's measured extent) inside which the
DIA catalog flags records; the rules are those of
:class:`~gpudiff.tasks.detect_and_measure.DetectAndMeasureConfig`.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import numpy as np
from astropy.table import Table

from ..errors import InvalidInputError
from ..image import Exposure
from ..ops._host import fetch

if TYPE_CHECKING:  # the config lives with the task, which imports this module
    from .detect_and_measure import DetectAndMeasureConfig

__all__ = ["BusyMap", "bright_star_halos"]

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
    """Halo discs (n, 5) of bright stars: parent x, y, radius (pixels), the star's flux
    (inf for a saturated footprint) and the model radius (before the measured extent).

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
        discs.append(
            np.c_[sx / cnt + mi.xy0[0], sy / cnt + mi.xy0[1], r, np.full(n_sat, np.inf), r]
        )
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
        discs.append(np.c_[x, y, r[big], f[ok][big], r[big]])
    if not discs:
        return np.zeros((0, 5))
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
    out = np.zeros(len(discs))
    for i, (x, y, r0) in enumerate(discs[:, :3]):  # stars, not pixels: a few per image
        out[i] = _one_halo_radius(busy, x, y, r0, xy0, cfg, gap)
    return out


def _one_halo_radius(busy, x, y, r0, xy0, cfg, gap, clear=None) -> float:
    """:func:`_measured_halo_radius` of one star at parent (x, y) with model radius
    ``r0``; ``clear`` = (x, y, radius): busy pixels within that disc do not count."""
    H, W = busy.shape
    rmax = int(math.ceil(cfg.halo_max_factor * r0))
    cx, cy = x - xy0[0], y - xy0[1]
    xa, xb = max(0, int(cx) - rmax), min(W, int(cx) + rmax + 1)
    ya, yb = max(0, int(cy) - rmax), min(H, int(cy) + rmax + 1)
    if xa >= xb or ya >= yb:
        return 0.0
    cut = busy[ya:yb, xa:xb]
    yy, xx = np.mgrid[ya:yb, xa:xb]
    if clear is not None:
        qx, qy, qr = clear[0] - xy0[0], clear[1] - xy0[1], clear[2]
        cut = cut & ((xx - qx) ** 2 + (yy - qy) ** 2 > qr * qr)
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
    return last


def own_halo_records(
    x: np.ndarray,
    y: np.ndarray,
    own_radius: np.ndarray,
    flagged: np.ndarray,
    discs: np.ndarray,
    busy: np.ndarray,
    xy0,
    cfg,
    fwhm: float,
) -> np.ndarray:
    """The ``flagged`` records (parent x, y) that lie in a star's halo only because their
    own light widened it: outside every containing disc's model radius, and outside its
    measured extent once the busy pixels within ``own_radius`` of the record are left out.

    A compact source beside a bright star makes the annuli it crosses busy; the measured
    extent then grows to reach it when it lies within a gap of the model radius.  A S/N
    27 injection 42 px from a saturated star of a realistic 2048² pair (convolveTemplate;
    model radius 36 px) pushed the measured radius to 52 px and was flagged by it
    (docs/algorithms.md §14).  Host work on a few records and stars.
    """
    out = np.zeros(x.size, dtype=bool)
    if not len(discs) or discs.shape[1] < 5:
        return out
    for i in np.flatnonzero(flagged):
        d = np.hypot(discs[:, 0] - x[i], discs[:, 1] - y[i])
        inside = np.flatnonzero(d <= discs[:, 2])
        if not inside.size or np.any(d[inside] <= discs[inside, 4]):
            continue  # not in a halo, or within a star's model halo
        clear = (x[i], y[i], float(own_radius[i]))
        out[i] = all(
            d[k] > _one_halo_radius(busy, *discs[k, :2], discs[k, 4], xy0, cfg, fwhm, clear) + fwhm
            for k in inside
        )
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

"""Kernel candidates: stamps around sources, rejection, ratings and spatial cells
(docs/algorithms.md §2.1, §2.5).

All candidates live in one set of arrays (a "structure of arrays"): stamps are stacked as
``(n, S, S)`` arrays on the backend so every later step is one batched operation.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..backend import Backend
from ..errors import InsufficientKernelSourcesError, InvalidInputError, ShapeMismatchError
from ..image import Box, MaskedImage
from ..ops._host import fetch

__all__ = [
    "KernelCandidates",
    "make_candidates",
    "cell_index",
    "visit_order",
    "selection_counts",
    "stellar_locus",
    "reclassify_extended",
    "template_presence_snr",
    "GOOD",
    "BAD",
    "UNKNOWN",
]

# Candidate states (afw's KernelCandidate status).
UNKNOWN, GOOD, BAD = 0, 1, 2


@dataclass
class KernelCandidates:
    """Accepted kernel candidates and the sources rejected before fitting.

    Attributes
    ----------
    x, y : ndarray (n,)
        Parent pixel coordinates of the stamp centres (integers, pixel centres).
    rating : ndarray (n,)
        Sort key within a cell, descending (source flux, or mean S/N of the core).
    source_index : ndarray (n,)
        Row of each candidate in the source list it came from.
    template, science, template_var, science_var : backend arrays (n, S, S), float64
        Stamps of side S = 2·kernel_size + 1.
    cell : ndarray (n,)
        Spatial cell of each candidate.
    status : ndarray (n,)
        UNKNOWN / GOOD / BAD, updated by the fit.
    reason : list of str
        Why a candidate became BAD ("" while it is not).
    rejected : list of (source_index, reason)
        Sources that never became candidates.
    """

    x: np.ndarray
    y: np.ndarray
    rating: np.ndarray
    source_index: np.ndarray
    template: Any
    science: Any
    template_var: Any
    science_var: Any
    cell: np.ndarray
    n_cells: int
    kernel_size: int
    status: np.ndarray = field(default=None)  # type: ignore[assignment]
    reason: list[str] = field(default_factory=list)
    rejected: list[tuple[int, str]] = field(default_factory=list)

    def __post_init__(self):
        n = len(self.x)
        if self.status is None:
            self.status = np.full(n, UNKNOWN, dtype=np.int8)
        if not self.reason:
            self.reason = [""] * n

    def __len__(self) -> int:
        return len(self.x)

    @property
    def stamp_size(self) -> int:
        return 2 * self.kernel_size + 1

    def reject(self, which: np.ndarray, reason: str) -> None:
        """Mark candidates ``which`` (indices or boolean mask) BAD with ``reason``."""
        idx = (
            np.flatnonzero(which)
            if np.asarray(which).dtype == bool
            else np.asarray(which, dtype=int)
        )
        for i in idx:
            if self.status[i] != BAD:
                self.status[i] = BAD
                self.reason[i] = reason


def cell_index(
    x: np.ndarray, y: np.ndarray, region: Box, size_x: int, size_y: int
) -> tuple[np.ndarray, int]:
    """Cell of each position in a grid of ``size_x`` × ``size_y`` cells over ``region``.

    There are ceil(W/size) cells per axis; the last one is the partial remainder.
    """
    ncx = max(1, math.ceil(region.width / size_x))
    ncy = max(1, math.ceil(region.height / size_y))
    cx = np.clip(((np.asarray(x) - region.x0) // size_x).astype(int), 0, ncx - 1)
    cy = np.clip(((np.asarray(y) - region.y0) // size_y).astype(int), 0, ncy - 1)
    return cy * ncx + cx, ncx * ncy


def visit_order(cands: KernelCandidates, n_star_per_cell: int) -> np.ndarray:
    """Indices visited: in each cell the first ``n_star_per_cell`` non-BAD candidates by
    descending rating (all of them when ``n_star_per_cell`` is −1).  afw's
    ``visitCandidates``: rejecting a candidate promotes the next one of its cell."""
    order = np.lexsort((-cands.rating, cands.cell))
    alive = order[cands.status[order] != BAD]
    if n_star_per_cell < 0:
        return np.sort(alive)
    cells = cands.cell[alive]
    # rank within the cell among the alive candidates
    start = np.searchsorted(cells, cells, side="left")
    rank = np.arange(len(alive)) - start
    return np.sort(alive[rank < n_star_per_cell])


def _gather(be: Backend, arrays, r0: np.ndarray, c0: np.ndarray, size: int) -> list:
    """Stack ``size``² stamps of each of ``arrays`` with top-left corners (r0, c0): one
    fancy index each, on index arrays made once."""
    xp = be.xp
    off = xp.arange(size)
    rows = xp.asarray(r0)[:, None, None] + off[None, :, None]
    cols = xp.asarray(c0)[:, None, None] + off[None, None, :]
    return [arr[rows, cols] for arr in arrays]


def make_candidates(
    template: MaskedImage,
    science: MaskedImage,
    x: Any,
    y: Any,
    *,
    kernel_size: int,
    bad_mask_planes=("NO_DATA", "EDGE", "SAT"),
    rating: Any = None,
    region: Box | None = None,
    size_cell_x: int = 128,
    size_cell_y: int = 128,
) -> KernelCandidates:
    """Cut (2·kernel_size+1)² stamps of both images around each source (docs/algorithms.md §2.1).

    A source is rejected (with its reason recorded) when its box is not fully inside both
    images, when any pixel of the box has a ``bad_mask_planes`` bit in either image, or
    when a stamp pixel is not finite or has non-positive variance.

    Parameters
    ----------
    template, science : MaskedImage
        Same bounding box and backend.
    x, y : array-like
        Source positions in parent coordinates; stamps are centred on the nearest pixel.
    kernel_size : int
        Kernel width; the stamp side is 2·kernel_size + 1.
    rating : array-like, optional
        Sort key (e.g. PSF flux).  Default: mean of image/√var over the central 7×7 of
        the science stamp (afw's position-only candidate rating, docs/algorithms.md §2.1).
    region : Box, optional
        Box tiled by the spatial cells; default the template's box.

    Raises
    ------
    ShapeMismatchError
        The images differ in shape or origin.
    InsufficientKernelSourcesError
        No source survives.
    """
    if template.bbox != science.bbox:
        raise ShapeMismatchError(
            f"template box {template.bbox} and science box {science.bbox} differ; "
            "warp or crop them onto one pixel grid first"
        )
    be = template.backend
    xp = be.xp
    x = np.asarray(x, dtype=np.float64).ravel()
    y = np.asarray(y, dtype=np.float64).ravel()
    if x.shape != y.shape:
        raise InvalidInputError(f"source x and y have different lengths ({x.size}, {y.size})")
    if x.size == 0:
        raise InsufficientKernelSourcesError(
            "no sources were given to build kernel candidates from"
        )
    S = 2 * int(kernel_size) + 1
    h = S // 2
    box = template.bbox
    x0, y0 = box.x0, box.y0
    xc = np.floor(x + 0.5).astype(np.int64)
    yc = np.floor(y + 0.5).astype(np.int64)
    reasons = np.array([""] * x.size, dtype=object)
    finite_pos = np.isfinite(x) & np.isfinite(y)
    reasons[~finite_pos] = "non-finite position"
    xc[~finite_pos] = x0 + h
    yc[~finite_pos] = y0 + h
    inside = (xc - h >= box.x0) & (xc + h < box.x1) & (yc - h >= box.y0) & (yc + h < box.y1)
    reasons[(reasons == "") & ~inside] = "stamp not fully inside the image"
    ok = reasons == ""
    r0 = yc[ok] - h - y0
    c0 = xc[ok] - h - x0
    idx = np.flatnonzero(ok)
    if idx.size:
        bm_t = template.mask_planes.bitmask_if_present(bad_mask_planes)
        bm_s = science.mask_planes.bitmask_if_present(bad_mask_planes)
        planes = (template.image, science.image, template.variance, science.variance)
        mt, ms, *stamps = _gather(be, (template.mask, science.mask, *planes), r0, c0, S)
        masked = ((mt & bm_t) != 0).any(axis=(1, 2)) | ((ms & bm_s) != 0).any(axis=(1, 2))
        stamps = [a.astype(xp.float64) for a in stamps]
        # One test over the four planes stacked (4 launches, not 13).
        finite = xp.isfinite(xp.stack(stamps)).all(axis=(0, 2, 3))
        positive = (stamps[2] > 0).all(axis=(1, 2)) & (stamps[3] > 0).all(axis=(1, 2))
        # The three per-stamp flags cross to the host in one transfer.
        masked, finite, positive = fetch(be, masked, finite, positive)
        reasons[idx[masked]] = "bad mask bit (" + ", ".join(bad_mask_planes) + ") in the stamp"
        reasons[idx[~masked & ~finite]] = "non-finite pixel in the stamp"
        reasons[idx[~masked & finite & ~positive]] = "non-positive variance in the stamp"
        keep_local = ~masked & finite & positive
    else:
        stamps = []
        keep_local = np.zeros(0, dtype=bool)
    rejected = [(int(i), str(reasons[i])) for i in np.flatnonzero(reasons != "")]
    keep = idx[keep_local]
    if keep.size == 0:
        detail = "; ".join(sorted({r for _, r in rejected}))
        raise InsufficientKernelSourcesError(
            f"none of the {x.size} sources gives a usable kernel candidate ({detail})"
        )
    sel = xp.asarray(np.flatnonzero(keep_local))
    tmpl, sci, tvar, svar = (s[sel] for s in stamps)
    if rating is None:
        c = S // 2
        core = slice(c - 3, c + 4)
        snr = sci[:, core, core] / xp.sqrt(svar[:, core, core])
        rate = be.asnumpy(snr.mean(axis=(1, 2)))
    else:
        rate = np.asarray(rating, dtype=np.float64).ravel()
        if rate.size != x.size:
            raise InvalidInputError(f"rating has {rate.size} entries for {x.size} sources")
        rate = np.nan_to_num(rate[keep], nan=-np.inf)
    region = box if region is None else region
    cell, n_cells = cell_index(xc[keep], yc[keep], region, size_cell_x, size_cell_y)
    return KernelCandidates(
        x=xc[keep].astype(np.float64),
        y=yc[keep].astype(np.float64),
        rating=rate,
        source_index=keep,
        template=tmpl,
        science=sci,
        template_var=tvar,
        science_var=svar,
        cell=cell,
        n_cells=n_cells,
        kernel_size=int(kernel_size),
        rejected=rejected,
    )


def selection_counts(
    table: Any,
    box: Box,
    *,
    snr_min: float,
    snr_max: float,
    edge_buffer: int,
    require_isolated: bool = True,
    require_unresolved: bool = True,
    exclude_flags=(),
) -> dict[str, int]:
    """How many rows of a kernel-source table each selection test removes.

    The tests of :func:`gpudiff.ops.kernel_sources.select_kernel_sources`, applied in its order
    and each row counted at the first test it fails, so the counts add up to the rows
    dropped: flags/masks, S/N band, resolved (extended), not isolated, stamp not inside
    ``box`` (edge).  For error messages: a selection that leaves too few sources says
    which test removed them.
    """
    cols = table.colnames
    n = len(table)
    x, y = np.asarray(table["x"], float), np.asarray(table["y"], float)
    if "snr" in cols:
        snr = np.asarray(table["snr"], float)
    else:
        with np.errstate(invalid="ignore", divide="ignore"):
            snr = np.asarray(table["psf_flux"], float) / np.asarray(table["psf_flux_err"], float)
    alive = np.ones(n, bool)
    counts: dict[str, int] = {}

    def test(name: str, bad: np.ndarray) -> None:
        hit = alive & bad
        counts[name] = int(hit.sum())
        alive[hit] = False

    flagged = np.zeros(n, bool)
    for f in exclude_flags:
        if f in cols:
            flagged |= np.asarray(table[f], dtype=bool)
    test("flags/masks", flagged)
    with np.errstate(invalid="ignore"):
        test(
            f"S/N outside {snr_min:g}-{snr_max:g}",
            ~(np.isfinite(snr) & (snr >= snr_min) & (snr <= snr_max)),
        )
    if require_unresolved and "is_extended" in cols:
        test("extended (size/shape)", np.asarray(table["is_extended"], dtype=bool))
    if require_isolated and "isolated" in cols:
        test("not isolated (blended)", ~np.asarray(table["isolated"], dtype=bool))
    eb, rx, ry = int(edge_buffer), np.rint(x), np.rint(y)
    inside = (
        (rx - eb >= box.x0)
        & (rx + eb <= box.x1 - 1)
        & (ry - eb >= box.y0)
        & (ry + eb <= box.y1 - 1)
    )
    test("too close to the edge", ~inside)
    counts["passed"] = int(alive.sum())
    return counts


#: A stellar locus further than this (relative trace) from the PSF model's size means the
#: model does not describe the image's stars (e.g. a WebbPSF model of the detector PSF
#: used on a drizzled i2d mosaic, whose stars are ~1.5× larger in trace).
LOCUS_MISMATCH = 0.15
_LOCUS_SNR = 30.0  # sizes measured to ≲ 10 % (δT/T ≈ 3.5/S/N) define the locus
_LOCUS_WIDTH = 0.25  # relative width of the window searched for the stellar locus
_LOCUS_MIN = 3


def _trace_ratio_snr(table: Any) -> tuple[np.ndarray, np.ndarray] | None:
    """Trace ratio T/T_psf and S/N of each row (None without the moment columns)."""
    cols = table.colnames
    if not all(c in cols for c in ("ixx", "iyy", "psf_ixx", "psf_iyy")):
        return None
    with np.errstate(invalid="ignore", divide="ignore"):
        tr = (np.asarray(table["ixx"], float) + np.asarray(table["iyy"], float)) / (
            np.asarray(table["psf_ixx"], float) + np.asarray(table["psf_iyy"], float)
        )
        if "snr" in cols:
            snr = np.asarray(table["snr"], float)
        else:
            snr = np.asarray(table["psf_flux"], float) / np.asarray(table["psf_flux_err"], float)
    return tr, snr


def _well_measured_traces(table: Any) -> np.ndarray:
    """Sorted trace ratios of the unflagged sources of S/N ≥ 30 not sharper than half the
    PSF's trace (the population the stellar locus is looked for in)."""
    ts = _trace_ratio_snr(table)
    if ts is None:
        return np.zeros(0)
    tr, snr = ts
    ok = np.isfinite(tr) & np.isfinite(snr) & (snr >= _LOCUS_SNR) & (tr > 0.5)
    for f in table.colnames:
        if f.startswith("flag"):
            col = np.asarray(table[f])
            if col.dtype == bool:
                ok &= ~col
    return np.sort(tr[ok])


def _locus_group(t: np.ndarray) -> tuple[float, int]:
    """Median and size of the first window [t, 1.25 t] of the sorted traces ``t`` holding
    ≥ 3 of them; (NaN, 0) when none does."""
    if t.size < _LOCUS_MIN:
        return float("nan"), 0
    hi = np.searchsorted(t, t * (1.0 + _LOCUS_WIDTH), side="right")
    first = np.flatnonzero(hi - np.arange(t.size) >= _LOCUS_MIN)
    if first.size == 0:
        return float("nan"), 0
    i = int(first[0])
    return float(np.median(t[i : hi[i]])), int(hi[i] - i)


def stellar_locus(table: Any) -> float:
    """Trace ratio T/T_psf of the image's stars, from the compact end of the size
    distribution; NaN when the table cannot say (too few well-measured sources).

    The stars are the smallest well-measured sources (S/N ≥ 30) that are not sharper than
    half the PSF's trace (cosmic rays, hot pixels): the locus is the median trace ratio of
    the first window [t, 1.25 t] in increasing order that holds ≥ 3 of them.  Galaxies,
    the majority in a deep field, are larger and spread out, so they do not form the
    first dense group.
    """
    return _locus_group(_well_measured_traces(table))[0]


def reclassify_extended(table: Any) -> Any:
    """``table`` with ``is_extended`` judged against the image's own stars when the PSF
    model's size disagrees with them by more than ``LOCUS_MISMATCH``.

    ``is_extended`` compares a source's trace with the PSF model's.  A model narrower than
    the stars (JWST WebbPSF models on i2d mosaics: stars measure 1.3–1.6× the model's
    trace) marks every star extended, so the kernel is fitted on the faint, noise-sized
    sources left (S/N 10–20), whose noisy template stamps bias the least-squares kernel sum
    low (errors in the regressor: ΣK = 0.815 where the stars' flux ratio is 1.00).  Then the
    extendedness is re-referenced to the stellar locus with the same tolerance rule as
    detection (3·3.5/(S/N), at least 0.1), and a warning logged.  With a PSF model that fits
    the stars, the table is returned unchanged (LSST's behaviour).
    """
    t = _well_measured_traces(table)
    locus, n_locus = _locus_group(t)
    if not np.isfinite(locus) or abs(locus - 1.0) <= LOCUS_MISMATCH:
        return table
    # The compact end overrules the PSF model only when it outnumbers the sources the model
    # describes (|T/T_psf − 1| ≤ LOCUS_MISMATCH).  A handful of compact non-stars that
    # survive the 0.5 floor (cosmic rays not yet flagged: issue 14's 2048² raw pairs have
    # three at T/T_psf 0.58–0.64 below ~100 stars at 0.8–1.15) would otherwise be taken for
    # the stars, every real star judged extended, and the kernel fitted on the faint
    # remainder (ΣK = 0.71 for a true 1.00).  On JWST i2d mosaics no source sits at the
    # model's size (the stars are at 1.49), so the reclassification still applies there.
    n_model = int(np.count_nonzero(np.abs(t - 1.0) <= LOCUS_MISMATCH))
    if n_model >= n_locus:
        return table
    import logging

    logging.getLogger("gpudiff.psfmatch").warning(
        "the PSF model's size disagrees with the image's stars (their trace is %.2f x the "
        "model's): kernel sources are judged extended against the stars instead",
        locus,
    )
    out = table.copy(copy_data=True)
    with np.errstate(invalid="ignore", divide="ignore"):
        tr = (np.asarray(out["ixx"], float) + np.asarray(out["iyy"], float)) / (
            np.asarray(out["psf_ixx"], float) + np.asarray(out["psf_iyy"], float)
        )
        snr = (
            np.asarray(out["snr"], float)
            if "snr" in out.colnames
            else np.asarray(out["psf_flux"], float) / np.asarray(out["psf_flux_err"], float)
        )
        ext = tr / locus - 1.0
        tol = np.maximum(0.1, 3.0 * 3.5 / np.abs(snr))
        out["is_extended"] = np.isfinite(ext) & np.isfinite(snr) & (ext > tol)
    return out


def template_presence_snr(
    template: MaskedImage, psf_image: np.ndarray, x: Any, y: Any, fwhm: float
) -> np.ndarray:
    """S/N of each source in the template: a PSF-weighted flux above the local background.

    A kernel source must be a source in **both** images: one that is new in the science
    (a transient, a moving object) has no counterpart to match, and its stamp's kernel sum
    is ~0.  LSST selects kernel sources from the science catalog only, and its clipping
    assumes such stamps are rare; on a pair where they are not (measured: 183 of 394
    candidates on a realistic 2048² pair with 300 injected transients) they pulled the
    kernel sum to 0.76 (stars' flux ratio 1.0).

    Parameters
    ----------
    template : MaskedImage
        The template (parent coordinates; any backend).
    psf_image : ndarray (s, s)
        The template's PSF kernel image (odd side, centred, unit sum).
    x, y : array_like (n,)
        Parent positions.
    fwhm : float
        Template PSF FWHM, pixels: the background is the median of the stamp pixels beyond
        2 FWHM.

    Returns
    -------
    ndarray (n,)
        F/σ_F with F = ΣP(I − b)/ΣP², σ_F = √(ΣP²V)/ΣP² over finite pixels free of defects
        (NO_DATA, BAD, SAT, EDGE, CR)
        (the PSF centred on the nearest pixel: a presence test, not photometry); NaN
        where no pixel is usable.
    """
    be = template.backend
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    if x.size == 0:
        return np.zeros(0)
    dev, ctx = _presence_stamps(template, psf_image, x, y, fwhm)
    return _presence_snr(*fetch(be, *dev), ctx)  # to the host, in one transfer


def _presence_stamps(
    template: MaskedImage, psf_image: np.ndarray, x: np.ndarray, y: np.ndarray, fwhm: float
) -> tuple[list, tuple]:
    """The backend half of :func:`template_presence_snr` (``x`` not empty): its stamps
    (image, variance, mask, inside) and the host context of :func:`_presence_snr`.

    Split so that a caller fetches the stamps with its own arrays, in one transfer.
    """
    from ..ops.stats import gather_stamps_many

    be = template.backend
    p = np.asarray(psf_image, dtype=np.float64)
    # The core and a background annulus beyond 2 FWHM; not the whole PSF model (WebbPSF
    # images are 205 px wide: stamps of that size made this test take seconds).
    half = int(math.ceil(3 * fwhm)) + 1
    side = 2 * half + 1
    pp = np.zeros((side, side))
    o = half - p.shape[0] // 2
    if o >= 0:
        pp[o : o + p.shape[0], o : o + p.shape[0]] = p
    else:
        pp = p[-o : -o + side, -o : -o + side]
    rows = np.rint(y).astype(np.int64) - template.xy0[1]
    cols = np.rint(x).astype(np.int64) - template.xy0[0]
    planes = [template.image, template.variance, template.mask]
    (img, var, msk), inside = gather_stamps_many(be, planes, rows, cols, half, [np.nan, np.nan, 0])
    # Defects only: LSST's inputs carry DETECTED over every source, which must count.
    bad = template.mask_planes.bitmask_if_present(["NO_DATA", "BAD", "SAT", "EDGE", "CR"])
    return [img, var, msk, inside], (pp, half, bad, float(fwhm), x.size)


def _presence_snr(img, var, msk, inside, ctx: tuple) -> np.ndarray:
    """The host half of :func:`template_presence_snr`: the S/N from the fetched stamps of
    :func:`_presence_stamps` and its context."""
    pp, half, bad, fwhm, n = ctx
    ok = inside & ((msk & bad) == 0) & np.isfinite(img) & np.isfinite(var) & (var > 0)
    yy, xx = np.mgrid[-half : half + 1, -half : half + 1]
    outer = (np.hypot(xx, yy) > 2 * fwhm)[None] & ok
    with np.errstate(invalid="ignore", divide="ignore"), warnings.catch_warnings():
        # A stamp with no usable annulus pixel: background taken as 0 below.
        warnings.simplefilter("ignore", RuntimeWarning)
        b = np.nanmedian(np.where(outer, img, np.nan).reshape(n, -1), axis=1)
        b = np.where(np.isfinite(b), b, 0.0)
        w = np.where(ok, pp[None], 0.0)
        s2 = (w * w).sum(axis=(1, 2))
        f = (w * (np.where(ok, img, 0.0) - b[:, None, None])).sum(axis=(1, 2)) / s2
        e = np.sqrt((w * w * np.where(ok, var, 0.0)).sum(axis=(1, 2))) / s2
        snr = f / e
    return np.where(s2 > 0, snr, np.nan)

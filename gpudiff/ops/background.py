"""Binned sky-background models (afw ``Background`` / meas_algorithms ``SubtractBackgroundTask``).

The image is divided into a grid of bins; each bin's value is the afw ``MEANCLIP`` of its
unmasked, finite pixels.  All bins are clipped at once by the registered ``clipped_stack``
kernel: the pixels of a bin become the sample axis (axis 0) and the bins the "pixel" axis,
so one call does the whole grid on either backend.  Bins with too few usable pixels are
filled by interpolation through the good ones; the grid is interpolated to full
resolution through the bin centres (bilinear, or a cubic spline) and continued beyond the
outermost centres as afw's ``Interpolate`` does (Taylor expansion at the end centre), or
held flat.

The interpolation is separable, B = Wy · G · Wxᵀ, with Wy (H × ny) and Wx (W × nx) the
interpolation weights of rows and columns (built on the host: they are small), so the
full-resolution evaluation is two dense matrix products on the device.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable

import numpy as np

from ..backend import Backend, resolve_backend
from ..backend import kernels as _kernels
from ..backend.kernels import clipped_stack
from ..errors import AllMaskedError, InvalidInputError, NonFiniteDataError, ShapeMismatchError
from ..image import Exposure, MaskedImage
from ._clip_host import clip_columns_host, clip_tiled_bins_host
from .bin_interp import _MIN_NODES, _akima_slopes, _axis_order, _hermite_matrices, _interp_matrix

__all__ = [
    "BACKGROUND_BAD_PLANES",
    "BackgroundBins",
    "bin_background",
    "interpolate_background",
    "estimate_background",
    "evaluate_bin_grid",
    "fill_bad_bins",
]

#: Pixels ignored by the bin statistics (meas_algorithms' background ``ignoredPixelMask``
#: plus the non-sky planes).
BACKGROUND_BAD_PLANES: tuple[str, ...] = (
    "BAD",
    "SAT",
    "NO_DATA",
    "EDGE",
    "DETECTED",
    "CR",
    "INTRP",
)

_ORDERS = ("linear", "cubic", "akima")
_EXTRAPOLATIONS = ("quadratic", "linear", "flat")
_UNDERSAMPLE = ("REDUCE_INTERP_ORDER", "THROW_EXCEPTION")


def _check_modes(order: str, extrapolate: str) -> None:
    if order not in _ORDERS:
        raise InvalidInputError(f"order must be one of {_ORDERS}, got {order!r}")
    if extrapolate not in _EXTRAPOLATIONS:
        raise InvalidInputError(
            f"extrapolate must be one of {_EXTRAPOLATIONS}, got {extrapolate!r}"
        )


@dataclass
class BackgroundBins:
    """The binned background: one clipped mean per bin, on the host.

    Attributes
    ----------
    values : numpy.ndarray (ny, nx)
        Bin values after filling (float64).
    raw : numpy.ndarray (ny, nx)
        Clipped means before filling (NaN where no pixel survived).
    n_valid : numpy.ndarray (ny, nx)
        Usable pixels per bin (afw NPOINT).
    good : numpy.ndarray (ny, nx) of bool
        Bins whose own value is used (the others were filled).
    y_edges, x_edges : numpy.ndarray
        Bin boundaries in array rows/columns (bin i covers ``edges[i]:edges[i+1]``).
    """

    values: np.ndarray
    raw: np.ndarray
    n_valid: np.ndarray
    good: np.ndarray
    y_edges: np.ndarray
    x_edges: np.ndarray

    @property
    def y_centres(self) -> np.ndarray:
        """Row of each bin centre (pixel-centre convention)."""
        return 0.5 * (self.y_edges[:-1] + self.y_edges[1:] - 1)

    @property
    def x_centres(self) -> np.ndarray:
        """Column of each bin centre."""
        return 0.5 * (self.x_edges[:-1] + self.x_edges[1:] - 1)


def _bin_edges(n: int, size: int) -> np.ndarray:
    # ceil(n/size) bins of (nearly) equal size, as afw divides the image: no sliver of a
    # few pixels at the far edge whose mean would be noisy.
    nb = max(1, -(-n // size))
    return (np.arange(nb + 1, dtype=np.int64) * n) // nb


def _bin_sizes(bin_size: Any) -> tuple[int, int]:
    bs = np.broadcast_to(np.asarray(bin_size), (2,))
    try:
        by, bx = int(bs[0]), int(bs[1])
    except (TypeError, ValueError):
        raise InvalidInputError(
            f"bin_size must be an int or (rows, cols), got {bin_size!r}"
        ) from None
    if by < 1 or bx < 1 or by != bs[0] or bx != bs[1]:
        raise InvalidInputError(f"bin_size must be positive integers, got {bin_size!r}")
    return by, bx


def _gather_index(edges: np.ndarray):
    """Row (or column) indices of every bin padded to the largest bin, and their validity."""
    widths = np.diff(edges)
    wmax = int(widths.max())
    idx = edges[:-1, None] + np.arange(wmax)[None, :]
    valid = idx < edges[1:, None]
    return np.minimum(idx, edges[-1] - 1).ravel(), valid.ravel(), wmax


def bin_background(
    mi: MaskedImage | Exposure,
    bin_size: Any = 128,
    *,
    bad_planes: Iterable[str] = BACKGROUND_BAD_PLANES,
    nsigma: float = 3.0,
    niter: int = 3,
    min_fraction: float = 0.1,
) -> BackgroundBins:
    """Clipped-mean background of every bin of an image.

    Parameters
    ----------
    mi : MaskedImage or Exposure
    bin_size : int or (int, int)
        Nominal bin size in pixels (rows, columns); the image is split into
        ceil(H / size) × ceil(W / size) bins of (nearly) equal size.
    bad_planes : iterable of str
        Mask planes whose pixels are ignored (absent planes are skipped).  Non-finite
        image or variance pixels are always ignored.
    nsigma, niter : float, int
        afw ``numSigmaClip`` / ``numIter`` of the per-bin ``MEANCLIP``.
    min_fraction : float
        A bin needs at least this fraction of its pixels usable (and two survivors of the
        clipping) to keep its own value; the others are filled by linear interpolation
        through the good bins along columns, then rows (afw drops them per column).

    Returns
    -------
    BackgroundBins

    Raises
    ------
    AllMaskedError
        No bin has enough usable pixels.
    """
    if isinstance(mi, Exposure):
        mi = mi.masked_image
    if not isinstance(mi, MaskedImage):
        raise InvalidInputError(
            f"bin_background needs a MaskedImage or Exposure, got {type(mi).__name__}"
        )
    be = mi.backend
    H, W = mi.shape
    by, bx = _bin_sizes(bin_size)
    ye, xe = _bin_edges(H, by), _bin_edges(W, bx)
    ny, nx = ye.size - 1, xe.size - 1
    ridx, rval, hmax = _gather_index(ye)
    cidx, cval, wmax = _gather_index(xe)
    good = mi.good_pixels(list(bad_planes))

    if be.is_gpu:
        # A bin is a stack of hmax·wmax samples, deeper than clipped_stack's CUDA kernel
        # takes: the clipped_bins kernel clips every bin in one launch, reading the bins in
        # place (one block per bin, sort-free quartiles; no stack copied).  The three
        # vectors then cross in one transfer.
        mean, _, n_used, n_good = _kernels.get_kernel("clipped_bins", be)(
            mi.image,
            good,
            ye,
            xe,
            nsigma,
            niter,
            want_var=False,
            # good_pixels excludes non-finite pixels: finite as float32 if stored so
            good_is_finite=mi.image.dtype == np.float32,
        )
        h = be.asnumpy(be.xp.stack([mean.astype(np.float64), n_used.astype(np.float64), n_good]))
        raw, n_used, n_valid = h[0], h[1].astype(np.int32), h[2].astype(np.int64)
    else:

        def to_stack(padded):
            # (ny*hmax, nx*wmax) -> (hmax*wmax, ny*nx): the pixels of a bin along axis 0.
            return (
                padded.reshape(ny, hmax, nx, wmax)
                .transpose(1, 3, 0, 2)
                .reshape(hmax * wmax, ny * nx)
            )

        tiled = bool(rval.all() and cval.all())  # bins of equal size tile the image
        if tiled and be.xp is np:
            # clipped_stack's bits, blocked over all bins at once (its 8-bin bands made
            # every sum an 8-wide loop), the stacks made from the image's bin rows
            # (bin_background 0.37 -> 0.13 CPU-s per 2048² image)
            mean, _, n_used = clip_tiled_bins_host(mi.image, good, ny, nx, nsigma, niter)
            n_valid = good.reshape(ny, hmax, nx, wmax).sum(axis=(1, 3)).reshape(-1)
        else:
            if tiled:  # no gather
                data, ok_st = to_stack(mi.image), to_stack(good)
            else:
                r_d, c_d = be.asarray(ridx), be.asarray(cidx)
                data = to_stack(mi.image[r_d][:, c_d])
                pad_ok = be.asarray(rval[:, None] & cval[None, :])  # smaller bins' padding
                ok_st = to_stack(good[r_d][:, c_d] & pad_ok)
            if be.xp is np:
                mean, _, n_used = clip_columns_host(data, ok_st, nsigma, niter)
            else:
                mean, _, n_used = clipped_stack(data, ~ok_st, None, nsigma, niter, backend=be)
            n_valid = ok_st.sum(axis=0)
        raw, n_valid = be.asnumpy(mean).astype(np.float64), be.asnumpy(n_valid)
        n_used = be.asnumpy(n_used)
    raw, n_used, n_valid = raw.reshape(ny, nx), n_used.reshape(ny, nx), n_valid.reshape(ny, nx)
    area = np.diff(ye)[:, None] * np.diff(xe)[None, :]
    ok = np.isfinite(raw) & (n_used >= 2) & (n_valid >= min_fraction * area)
    if not ok.any():
        raise AllMaskedError(
            f"bin_background: no {by}x{bx} bin has {min_fraction:.0%} usable pixels "
            f"(planes ignored: {', '.join(bad_planes)}); cannot estimate a background"
        )
    values = (
        raw.copy()
        if ok.all()
        else _fill_bins(raw, ok, 0.5 * (ye[:-1] + ye[1:] - 1), 0.5 * (xe[:-1] + xe[1:] - 1))
    )
    return BackgroundBins(values=values, raw=raw, n_valid=n_valid, good=ok, y_edges=ye, x_edges=xe)


def _fill_line(v: np.ndarray, c: np.ndarray, method: str = "linear", end_points: int = 2) -> None:
    """Fill the NaNs of one line of bins in place: interpolation between the good bins
    (linear, or Akima with >= 5 good bins), continued beyond the end ones by the straight
    line through the last ``end_points`` good bins (least squares; constant with a single
    good bin)."""
    g = np.isfinite(v)
    if g.all() or not g.any():
        return
    cg, vg = c[g], v[g]
    out = np.interp(c, cg, vg)
    if method == "akima" and cg.size >= _MIN_NODES["akima"]:
        from scipy.interpolate import Akima1DInterpolator

        inner = (c >= cg[0]) & (c <= cg[-1])
        out[inner] = Akima1DInterpolator(cg, vg)(c[inner])
    if cg.size >= 2:
        # A straight continuation, not the end cubic (scipy/afw Akima extrapolation): a
        # cubic continued over many empty bins (a visit covering part of a tract) runs
        # away; more end points average down the noise of the extrapolated slope.
        k = min(max(2, int(end_points)), cg.size)
        for sel, first in ((c < cg[0], True), (c > cg[-1], False)):
            if sel.any():
                cc, vv = (cg[:k], vg[:k]) if first else (cg[-k:], vg[-k:])
                slope, icpt = np.polyfit(cc - cc.mean(), vv, 1)
                out[sel] = icpt + slope * (c[sel] - cc.mean())
    v[~g] = out[~g]


def fill_bad_bins(
    values: np.ndarray,
    good: np.ndarray,
    y_centres: np.ndarray,
    x_centres: np.ndarray,
    method: str = "linear",
    *,
    symmetric: bool = False,
    end_points: int = 2,
) -> np.ndarray:
    """Values for the bins without enough pixels, from the good ones (afw ``interpolateBadPixels``).

    Like afw's ``Background`` (which drops NaN bins from each column before interpolating
    it), missing bins are filled along columns, then along rows, by interpolation through
    the good bins (``"linear"``, or ``"akima"`` where a line has at least five good bins),
    continued linearly at the ends, so a sloped sky stays sloped across a masked region.
    Bins still empty (a whole row and column masked) take the nearest filled bin.  The bin
    grid is tiny: this runs on the host, over lines of bins.

    Parameters
    ----------
    values : ndarray (ny, nx)
        Bin values (those of bad bins are ignored).
    good : bool ndarray (ny, nx)
        Bins whose own value is kept; at least one must be True.
    y_centres, x_centres : ndarray
        Bin-centre coordinates along rows and columns.
    method : {"linear", "akima"}
    symmetric : bool
        Average the columns-then-rows fill with the rows-then-columns one, so a missing
        corner (a patch a visit lacks) leans on both neighbouring sides, not only one.
    end_points : int
        Good bins the straight end continuation is fitted to (2: the end segment).

    Returns
    -------
    ndarray (ny, nx), float64
    """
    if method not in ("linear", "akima"):
        raise InvalidInputError(f"fill method must be 'linear' or 'akima', got {method!r}")
    good = np.asarray(good, dtype=bool)
    if not good.any():
        raise AllMaskedError("fill_bad_bins: no good bin to interpolate from")
    v0 = np.where(good, np.asarray(values, dtype=np.float64), np.nan)
    if good.all():
        return v0
    yc, xc = np.asarray(y_centres, np.float64), np.asarray(x_centres, np.float64)

    def fill(v, columns_first):
        v = v.copy()
        for axis in (0, 1) if columns_first else (1, 0):
            if axis == 0:
                for j in range(v.shape[1]):
                    _fill_line(v[:, j], yc, method, end_points)
            else:
                for i in range(v.shape[0]):
                    _fill_line(v[i, :], xc, method, end_points)
        if not np.isfinite(v).all():
            from scipy import ndimage

            _, (iy, ix) = ndimage.distance_transform_edt(~np.isfinite(v), return_indices=True)
            v = v[iy, ix]
        return v

    out = fill(v0, True)
    return 0.5 * (out + fill(v0, False)) if symmetric else out


def _fill_bins(raw: np.ndarray, ok: np.ndarray, yc: np.ndarray, xc: np.ndarray) -> np.ndarray:
    return fill_bad_bins(raw, ok, yc, xc, "linear")


def evaluate_bin_grid(
    values: np.ndarray,
    y_centres: np.ndarray,
    x_centres: np.ndarray,
    rows: Any,
    cols: Any,
    order: str = "akima",
    extrapolate: str = "linear",
    undersample: str = "REDUCE_INTERP_ORDER",
    backend: Backend | str | None = None,
) -> Any:
    """Evaluate a smooth interpolant of a grid of bin values at rows × cols.

    As afw's ``BackgroundMI.getImage``: each column of bins is interpolated along y to
    every output row, then each output row along x.  Linear and cubic weights are linear
    in the data; Akima's are too once its node slopes are known (computed on the host on
    the small intermediate grids), so the full-resolution step is a dense matrix product
    on the device either way.

    Parameters
    ----------
    values : ndarray (ny, nx)
        Finite bin values.
    y_centres, x_centres : ndarray
        Increasing bin-centre coordinates.
    rows, cols : array_like
        Output coordinates, in the frame of the centres.
    order : {"akima", "cubic", "linear"}
        Akima spline (afw ``AKIMA_SPLINE``), not-a-knot cubic spline or linear.
    extrapolate : {"quadratic", "linear", "flat"}
        Beyond the end centres.
    undersample : {"REDUCE_INTERP_ORDER", "THROW_EXCEPTION"}
        With too few bins along an axis for ``order``: fall back to a simpler style, or raise.
    backend : Backend or str, optional

    Returns
    -------
    float32 array (len(rows), len(cols)) on ``backend``
    """
    _check_modes(order, extrapolate)
    if undersample not in _UNDERSAMPLE:
        raise InvalidInputError(f"undersample must be one of {_UNDERSAMPLE}, got {undersample!r}")
    be = resolve_backend(backend)
    # The weights are built on the host (device arrays given here are brought back).
    g = np.asarray(be.asnumpy(values), dtype=np.float64)
    yc, xc = (
        np.asarray(be.asnumpy(y_centres), np.float64),
        np.asarray(be.asnumpy(x_centres), np.float64),
    )
    if g.shape != (yc.size, xc.size):
        raise ShapeMismatchError(
            f"bin values have shape {g.shape}, centres give {(yc.size, xc.size)}"
        )
    if not np.isfinite(g).all():
        raise NonFiniteDataError(
            "evaluate_bin_grid: bin values must be finite (fill the bad bins first)"
        )
    rows = np.asarray(be.asnumpy(rows), dtype=np.float64).ravel()
    cols = np.asarray(be.asnumpy(cols), dtype=np.float64).ravel()
    oy = _axis_order(order, yc.size, undersample, "rows")
    ox = _axis_order(order, xc.size, undersample, "columns")
    if oy == "akima":
        ay, by_ = _hermite_matrices(yc, rows, extrapolate)
        t = ay @ g + by_ @ _akima_slopes(yc, g, 0)
    else:
        t = _interp_matrix(yc, rows, oy, extrapolate) @ g
    # t (len(rows), nx) is small; the product with the column weights is the big one.
    if ox == "akima":
        ax, bx = _hermite_matrices(xc, cols, extrapolate)
        mx = _akima_slopes(xc, t, 1)
        out = be.asarray(t) @ be.asarray(ax.T) + be.asarray(mx) @ be.asarray(bx.T)
    else:
        out = be.asarray(t) @ be.asarray(_interp_matrix(xc, cols, ox, extrapolate).T)
    return out.astype(np.float32)


def interpolate_background(
    bins: BackgroundBins,
    shape: tuple[int, int],
    order: str = "cubic",
    extrapolate: str = "quadratic",
    backend: Backend | str | None = None,
) -> Any:
    """Evaluate a binned background at every pixel.

    Parameters
    ----------
    bins : BackgroundBins
    shape : (int, int)
        Image shape (rows, columns) the bins were measured on.
    order : {"linear", "cubic", "akima"}
        Bilinear interpolation, a (not-a-knot) bicubic spline or an Akima spline (afw's
        default for backgrounds) through the bin centres; with too few bins along an axis
        the style is reduced as afw's ``REDUCE_INTERP_ORDER`` does.
    extrapolate : {"quadratic", "linear", "flat"}
        Beyond the outermost centres (half a bin at each edge): afw's second-order Taylor
        continuation of the interpolant, first order, or the end value held flat.
    backend : Backend or str, optional

    Returns
    -------
    float32 array (H, W) on ``backend``
    """
    _check_modes(order, extrapolate)
    H, W = int(shape[0]), int(shape[1])
    if bins.y_edges[-1] != H or bins.x_edges[-1] != W:
        raise InvalidInputError(
            f"bins were measured on a {bins.y_edges[-1]}x{bins.x_edges[-1]} image, not {H}x{W}"
        )
    return evaluate_bin_grid(
        bins.values,
        bins.y_centres,
        bins.x_centres,
        np.arange(H),
        np.arange(W),
        order,
        extrapolate,
        backend=backend,
    )


def estimate_background(
    mi: MaskedImage | Exposure,
    bin_size: Any = 128,
    *,
    bad_planes: Iterable[str] = BACKGROUND_BAD_PLANES,
    nsigma: float = 3.0,
    niter: int = 3,
    order: str = "cubic",
    extrapolate: str = "quadratic",
    min_fraction: float = 0.1,
) -> Any:
    """Smooth sky-background model of an image (binned clipped means, interpolated).

    Parameters
    ----------
    mi : MaskedImage or Exposure
        Not modified.
    bin_size : int or (int, int)
        Nominal bin size (rows, columns) in pixels.
    bad_planes : iterable of str
        Mask planes ignored by the bin statistics (default: BAD, SAT, NO_DATA, EDGE,
        DETECTED, CR, INTRP).
    nsigma, niter : float, int
        afw ``MEANCLIP`` parameters of each bin.
    order : {"cubic", "linear"}
        Interpolation through the bin centres (bicubic not-a-knot spline or bilinear).
    extrapolate : {"quadratic", "linear", "flat"}
        The model beyond the outermost bin centres: afw's second-order Taylor continuation
        of the interpolant (default; for bilinear it is the end segment's line), first
        order, or flat.  Flat costs accuracy in the outer half bin of a sloped sky.
    min_fraction : float
        Minimum usable fraction of a bin's pixels; poorer bins are filled from the good
        ones (linear interpolation along columns, then rows).

    Returns
    -------
    float32 array (H, W) on the image's backend

    Raises
    ------
    AllMaskedError
        No bin has enough usable pixels.

    Notes
    -----
    Sources bias clipped means upward by their unclipped wings; mask them (``DETECTED``)
    and re-estimate for the best sky, as SourceDetectionTask does.
    """
    if isinstance(mi, Exposure):
        mi = mi.masked_image
    _check_modes(order, extrapolate)
    bins = bin_background(
        mi, bin_size, bad_planes=bad_planes, nsigma=nsigma, niter=niter, min_fraction=min_fraction
    )
    return interpolate_background(bins, mi.shape, order, extrapolate, backend=mi.backend)

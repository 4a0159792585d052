"""NumPy twins of the column kernels of ``cuda/clipped_columns.cu`` (docs/algorithms.md §0.5):
``clipped_columns``, ``clipped_bins`` and ``quantile_columns``, and the input checks their
twins share.

Split from :mod:`gpudiff.backend.reference` (which re-exports every name here, so
``reference.clipped_columns`` and the kernel registry keep working); the conventions are
that module's: the same Python signature as the CUDA launcher, the kernel's arithmetic
step for step, an array namespace taken from the inputs.  ``array_module``,
``validate_clipped_stack`` and ``IQ_TO_STDEV`` are looked up on the ``reference`` module
when called (:func:`_ref`), so a test's stand-in for ``reference.array_module`` reaches
these twins too.

Kernels
-------
:func:`clipped_columns`
    afw ``MEANCLIP`` / ``VARIANCECLIP`` of every column of a deep (N, B) stack (unit
    weights): the binned background's bins and the whole-image clip.
:func:`clipped_bins`
    :func:`clipped_columns` of the bins of an image (the kernel reads them in place).
:func:`quantile_columns`
    Linear percentiles of the columns of an (N, B) stack under one validity mask, from
    exact float32 order statistics (the same kernel, its selection phases only).
"""

from __future__ import annotations

import numpy as np

from ..errors import InvalidInputError, ShapeMismatchError


__all__ = [
    "QUANTILE_COLUMNS_MAX_FRACTIONS",
    "clipped_bins",
    "clipped_columns",
    "quantile_columns",
    "validate_clipped_bins",
    "validate_clipped_columns",
    "validate_quantile_columns",
]


def _ref():
    """The :mod:`~gpudiff.backend.reference` module, looked up when called: it imports this
    module to re-export it (an import at module level would be a circle), and a test's
    stand-in for ``reference.array_module`` must reach these twins too."""
    from . import reference

    return reference


# ----------------------------------------------------------------------------------------
# clipped_columns
# ----------------------------------------------------------------------------------------

#: Fractions of the pass-0 quantiles (afw ``medianAndQuartiles``): q1, median, q3.
_QUARTILES = (0.25, 0.50, 0.75)


def validate_clipped_columns(data, good, nsigma=3.0, niter=3):
    """Check the arguments of :func:`clipped_columns` (both twins call this); returns
    ``(xp, nsigma, niter)`` normalized.

    Raises
    ------
    InvalidInputError
        ``data`` is not a real 2-d array, ``nsigma`` or ``niter`` is invalid (the
        messages of :func:`validate_clipped_stack`).
    ShapeMismatchError
        ``good`` does not have the shape of ``data``.
    """
    # clipped_stack's parameter checks and messages, on a host dummy (no device work)
    a = _ref().validate_clipped_stack(
        np.zeros((1, 1), np.float32), np.zeros((1, 1), bool), None, nsigma, niter
    )
    xp = _ref().array_module(data, good)
    if data is None or good is None:
        raise InvalidInputError("clipped_columns: data and good are required")
    if len(data.shape) != 2 or data.dtype.kind not in "fiub":
        raise InvalidInputError(
            f"clipped_columns: data must be a real (N, B) array, got shape "
            f"{tuple(data.shape)} dtype {data.dtype}"
        )
    if tuple(good.shape) != tuple(data.shape):
        raise ShapeMismatchError(
            f"clipped_columns: good has shape {tuple(good.shape)} but data has shape "
            f"{tuple(data.shape)}"
        )
    return xp, a.nsigma, a.niter


def clipped_columns(data, good, nsigma=3.0, niter=3, *, want_var=True, good_is_finite=False):
    """afw MEANCLIP / VARIANCECLIP of every column of a deep (N, B) stack, unit weights.

    NumPy twin of ``clipped_columns_f32`` in ``cuda/clipped_columns.cu``
    (docs/algorithms.md §0.5).  The same numbers as :func:`clipped_stack` on
    ``(data, ~good)`` (bit for bit: the same float64 operations in the same order as its
    ``_clip_band``), in about half its array passes: the three quartiles are gathered at
    once from the sorted columns, and the per-column scalar updates follow IEEE rules
    (0/0, 0·∞ = NaN) instead of masks.  The CUDA kernel finds the quartiles by a radix
    select instead of a sort (the same values) and sums in a block-reduction order, so it
    agrees with this twin to float32 rounding.

    Parameters
    ----------
    data : array (N, B)
        Samples along axis 0 (converted to float32, as the kernel reads them).
    good : bool array (N, B)
        True = sample used (non-finite samples are dropped as well).
    nsigma, niter : float, int
        As :func:`clipped_stack`.
    want_var : bool
        Return the final pass's variance (else None, and that pass skips it).
    good_is_finite : bool
        The caller guarantees ``data`` (as float32) is finite wherever ``good`` is True
        (e.g. ``MaskedImage.good_pixels`` of a float32 image): no finiteness pass.

    Returns
    -------
    mean, var : float32 arrays (B,)
    n_used : int32 array (B,)
        Survivors of the final pass.
    n_good : int64 array (B,)
        True entries of ``good`` per column (afw NPOINT when ``good`` implies finite).
    """
    xp, nsigma, niter = validate_clipped_columns(data, good, nsigma, niter)
    # C order (a no-op for C-ordered input): NumPy then sums along axis 0 in sample order,
    # as clipped_stack's twin does, whatever layout the caller's view has
    data = xp.ascontiguousarray(data.astype(xp.float32, copy=False))
    good = xp.ascontiguousarray(good)
    valid = good if good_is_finite else good & xp.isfinite(data)
    n = valid.sum(axis=0, dtype=xp.int64)
    s = xp.sort(xp.where(valid, data, xp.float32(np.inf)), axis=0)
    # q1, median, q3 (afw medianAndQuartiles, linear interpolation) in one gather per side
    fr = xp.asarray(np.asarray(_QUARTILES, dtype=np.float64)[:, None])
    nm1 = xp.maximum(n - 1, 0)
    idx = fr * nm1.astype(xp.float64)[None, :]
    lo = idx.astype(xp.int64)
    hi = xp.minimum(lo + 1, nm1[None, :])
    w_hi = idx - lo.astype(xp.float64)
    w_lo = 1.0 - w_hi  # == (lo + 1) - idx exactly: both are exact in float64
    v_lo = xp.take_along_axis(s, lo, axis=0).astype(xp.float64)
    v_hi = xp.take_along_axis(s, hi, axis=0).astype(xp.float64)
    del s
    # an empty column reads +inf at rank 0: 1·inf + 0·inf = NaN, the twin's NaN
    with np.errstate(invalid="ignore"):
        q = w_lo * v_lo + w_hi * v_hi
    iqr_width = (nsigma * _ref().IQ_TO_STDEV) * (q[2] - q[0])
    # invalid samples NaN: |d| <= width is then False for them, no mask needed per pass
    x = xp.where(valid, data, xp.float32(np.nan)).astype(xp.float64)
    center, hwidth = q[1], iqr_width
    many = n > 1
    mean = var = sel = None
    with np.errstate(all="ignore"):
        for it in range(niter):
            if it > 0:
                center = mean
                hwidth = xp.where(many, nsigma * xp.sqrt(var), iqr_width)
            d = x - center[None, :]
            sel = xp.abs(d) <= hwidth[None, :]  # False for a NaN sample, centre or width
            # Sequential sums along axis 0, as the twin's; a non-survivor adds a zero (its
            # sign cannot matter: a column with a survivor has a +0 or nonzero term).
            sumw = sel.sum(axis=0, dtype=xp.float64)
            t = xp.where(sel, d, 0.0)
            mean_d = t.sum(axis=0) / sumw  # no survivor: 0/0 = NaN, as the twin's mask
            if want_var or it < niter - 1:
                sumx2 = (t * t).sum(axis=0)  # t·t = d·d on the survivors, as the twin's t·d
                w2 = sumw * sumw
                var = (sumx2 / sumw - mean_d * mean_d) * (w2 / (w2 - sumw))  # one: 0·∞ = NaN
            mean = mean_d + center
    return (
        mean.astype(xp.float32),
        var.astype(xp.float32) if want_var else None,
        sumw.astype(xp.int32),  # the final pass's survivors
        n if good_is_finite else good.sum(axis=0, dtype=xp.int64),
    )


def validate_clipped_bins(image, good, y_edges, x_edges, nsigma=3.0, niter=3):
    """Check the arguments of :func:`clipped_bins` (both twins call this); returns
    ``(xp, nsigma, niter, y_edges, x_edges)``, the edges as host int64 arrays.

    Raises
    ------
    InvalidInputError
        ``image`` is not a real 2-d array, the edges do not increase strictly from 0 to
        the image's size, ``nsigma`` or ``niter`` is invalid.
    ShapeMismatchError
        ``good`` does not have the shape of ``image``.
    """
    xp, nsigma, niter = validate_clipped_columns(image, good, nsigma, niter)
    edges = []
    for name, e, size in (
        ("y_edges", y_edges, image.shape[0]),
        ("x_edges", x_edges, image.shape[1]),
    ):
        e = np.asarray(e.get() if hasattr(e, "__cuda_array_interface__") else e)
        if (
            e.ndim != 1
            or e.size < 2
            or e.dtype.kind not in "iu"
            or e[0] != 0
            or e[-1] != size
            or (np.diff(e) <= 0).any()
        ):
            raise InvalidInputError(
                f"clipped_bins: {name} must be integers increasing strictly from 0 to {size}"
            )
        edges.append(e.astype(np.int64))
    return xp, nsigma, niter, edges[0], edges[1]


def _bin_gather_index(edges: np.ndarray):
    """Row (or column) indices of every bin padded to the largest bin, their validity and
    the largest bin's size."""
    wmax = int(np.diff(edges).max())
    idx = edges[:-1, None] + np.arange(wmax)[None, :]
    valid = idx < edges[1:, None]
    return np.minimum(idx, edges[-1] - 1).ravel(), valid.ravel(), wmax


def clipped_bins(
    image, good, y_edges, x_edges, nsigma=3.0, niter=3, *, want_var=True, good_is_finite=False
):
    """afw MEANCLIP / VARIANCECLIP of every bin of an image, unit weights.

    NumPy twin of ``clipped_columns_f32`` in bin mode (``cuda/clipped_columns.cu``,
    docs/algorithms.md §0.5), which reads the bins in place: here each bin's pixels, in
    row-major order and padded to the largest bin (padding not usable), become a column
    of a (hmax·wmax, ny·nx) stack for :func:`clipped_columns`.

    Parameters
    ----------
    image : array (H, W)
        Read as float32.
    good : bool array (H, W)
        True = pixel used (non-finite pixels are dropped as well).
    y_edges, x_edges : integer arrays
        Bin boundaries, strictly increasing from 0 to H (W): bin (i, j) covers rows
        ``y_edges[i]:y_edges[i+1]`` and columns ``x_edges[j]:x_edges[j+1]``.
    nsigma, niter, want_var, good_is_finite
        As :func:`clipped_columns`.

    Returns
    -------
    mean, var, n_used, n_good : arrays (ny·nx,)
        As :func:`clipped_columns`, bins in row-major order.
    """
    xp, nsigma, niter, ye, xe = validate_clipped_bins(image, good, y_edges, x_edges, nsigma, niter)
    ny, nx = ye.size - 1, xe.size - 1
    ridx, rval, hmax = _bin_gather_index(ye)
    cidx, cval, wmax = _bin_gather_index(xe)

    def to_stack(padded):
        # (ny*hmax, nx*wmax) -> (hmax*wmax, ny*nx): the pixels of a bin along axis 0
        return (
            padded.reshape(ny, hmax, nx, wmax).transpose(1, 3, 0, 2).reshape(hmax * wmax, ny * nx)
        )

    if rval.all() and cval.all():  # bins of equal size tile the image: no gather, no padding
        data, ok = to_stack(image), to_stack(good)
    else:
        r_d, c_d = xp.asarray(ridx), xp.asarray(cidx)
        data = to_stack(image[r_d][:, c_d])
        ok = to_stack(good[r_d][:, c_d] & xp.asarray(rval[:, None] & cval[None, :]))
    return clipped_columns(
        data, ok, nsigma, niter, want_var=want_var, good_is_finite=good_is_finite
    )


#: Fractions per column the ``quantile_columns`` kernel finds in one launch.
QUANTILE_COLUMNS_MAX_FRACTIONS = 3


def validate_quantile_columns(data, good, fractions):
    """Check the arguments of :func:`quantile_columns` (both twins call this).

    Returns ``(xp, good2d, fractions)``: ``good`` broadcast to the shape of ``data`` (a
    view) and the fractions as a host float64 array (B, m).

    Raises
    ------
    InvalidInputError
        ``data`` is not a real (N, B) array, the fractions are not a (B, m) table with
        m <= 3 of values in [0, 1] (NaN marks an unused entry).
    ShapeMismatchError
        ``good`` is neither (N,) nor (N, B).
    """
    xp = _ref().array_module(data, good)
    if data is None or good is None or fractions is None:
        raise InvalidInputError("quantile_columns: data, good and fractions are required")
    if len(data.shape) != 2 or data.dtype.kind not in "fiub":
        raise InvalidInputError(
            f"quantile_columns: data must be a real (N, B) array, got shape "
            f"{tuple(data.shape)} dtype {data.dtype}"
        )
    n, b = (int(s) for s in data.shape)
    if tuple(good.shape) == (n,):
        good = good[:, None]
    if tuple(good.shape) not in ((n, 1), (n, b)):
        raise ShapeMismatchError(
            f"quantile_columns: good has shape {tuple(good.shape)}, data {tuple(data.shape)}"
        )
    good = xp.broadcast_to(good, (n, b))
    fr = fractions.get() if hasattr(fractions, "__cuda_array_interface__") else fractions
    fr = np.asarray(fr, dtype=np.float64)
    if fr.ndim != 2 or fr.shape[0] != b or fr.shape[1] > QUANTILE_COLUMNS_MAX_FRACTIONS:
        raise InvalidInputError(
            f"quantile_columns: fractions must be a ({b}, m <= "
            f"{QUANTILE_COLUMNS_MAX_FRACTIONS}) table, got shape {fr.shape}"
        )
    used = ~np.isnan(fr)
    if ((fr[used] < 0.0) | (fr[used] > 1.0)).any():
        raise InvalidInputError("quantile_columns: fractions must lie in [0, 1]")
    return xp, good, fr


def quantile_columns(data, good, fractions):
    """NumPy's default (linear) percentiles of the valid samples of every column.

    NumPy twin of the selection-only launch of ``clipped_columns_f32``
    (``cuda/clipped_columns.cu``): the order statistics are exact float32 values (the
    kernel selects them by a radix select, this twin by sorting), interpolated in float64
    as ``(lo + 1 - idx)·v[lo] + (idx - lo)·v[lo + 1]`` with ``idx = f·(n - 1)``.

    Parameters
    ----------
    data : array (N, B)
        Samples along axis 0 (read as float32).
    good : bool array (N,) or (N, B)
        True = sample used (one mask for every column, or one per column).  Taken as
        given: a non-finite value marked good is a sample.
    fractions : array (B, m), m <= 3
        Per column the fractions in [0, 1]; NaN marks an unused entry.  Host or device.

    Returns
    -------
    float64 array (B, m)
        NaN for unused entries and for columns without a valid sample.
    """
    xp, good, fr = validate_quantile_columns(data, good, fractions)
    data = data.astype(xp.float32, copy=False)
    n = good.sum(axis=0, dtype=xp.int64)
    s = xp.sort(xp.where(good, data, xp.float32(np.inf)), axis=0)
    frd = xp.asarray(np.nan_to_num(fr.T, nan=0.0))  # (m, B)
    nm1 = xp.maximum(n - 1, 0)
    idx = frd * nm1.astype(xp.float64)[None, :]
    lo = idx.astype(xp.int64)
    hi = xp.minimum(lo + 1, nm1[None, :])
    lo_f = lo.astype(xp.float64)
    with np.errstate(invalid="ignore"):
        out = (lo_f + 1.0 - idx) * xp.take_along_axis(s, lo, axis=0).astype(xp.float64) + (
            idx - lo_f
        ) * xp.take_along_axis(s, hi, axis=0).astype(xp.float64)
    out = xp.where((n > 0)[None, :] & xp.asarray(~np.isnan(fr.T)), out, xp.nan)
    return xp.ascontiguousarray(out.T)

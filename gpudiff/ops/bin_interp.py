"""Interpolation matrices of a binned background (docs/algorithms.md §9): linear, natural
cubic spline and Akima weights from the bin centres to the pixels, with afw's
extrapolation and undersampling rules.  Used by :mod:`gpudiff.ops.background`.
"""

from __future__ import annotations

import numpy as np

from ..errors import InvalidInputError

#: afw ``lookupMinInterpPoints``: nodes an interpolation style needs along an axis.
_MIN_NODES = {"linear": 2, "cubic": 3, "akima": 5}


def _interp_matrix(centres: np.ndarray, x: np.ndarray, order: str, extrapolate: str) -> np.ndarray:
    """(len(x), len(centres)) weights that interpolate bin values to positions ``x``.

    The interpolant is linear in the bin values, so interpolating the identity gives the
    weight of every node.  Beyond the outermost centres the model is either held flat or
    continued by its Taylor expansion at the end centre, to first ("linear") or second
    ("quadratic") order; afw's ``Interpolate`` does the latter, and for bilinear
    interpolation (zero second derivative) both are the end segment's straight line.
    """
    nb = centres.size
    x = np.asarray(x, dtype=np.float64)
    n = x.size
    if nb == 1:
        return np.ones((n, 1))
    p = np.clip(x, centres[0], centres[-1])
    if order == "cubic" and nb >= 3:
        # Not-a-knot ends: a quadratic background is reproduced exactly.  The spline is the
        # cubic Hermite interpolant through the values with its node slopes, which are
        # linear in the values; beyond the end centres its Taylor expansion (the end
        # interval's cubic), as _hermite_matrices continues it.
        a, b = _hermite_matrices(centres, x, extrapolate)
        return a + b @ _not_a_knot_slopes(centres)
    else:
        k = np.clip(np.searchsorted(centres, p, side="right") - 1, 0, nb - 2)
        t = (p - centres[k]) / (centres[k + 1] - centres[k])
        w = np.zeros((n, nb))
        rows = np.arange(n)
        w[rows, k] = 1.0 - t
        w[rows, k + 1] += t

        def d1(c):
            j = 0 if c <= centres[0] else nb - 2
            g = np.zeros(nb)
            g[j], g[j + 1] = -1.0, 1.0
            return g / (centres[j + 1] - centres[j])

        d2 = lambda c: np.zeros(nb)  # noqa: E731
    if extrapolate != "flat":
        for c, out in ((centres[0], x < centres[0]), (centres[-1], x > centres[-1])):
            if out.any():
                dx = (x[out] - c)[:, None]
                w[out] += dx * d1(c)[None, :]
                if extrapolate == "quadratic":
                    w[out] += 0.5 * dx * dx * d2(c)[None, :]
    return w


def _not_a_knot_slopes(centres: np.ndarray) -> np.ndarray:
    """(n, n) S: the node slopes of the not-a-knot cubic spline through values v are S @ v.

    The same spline as scipy's ``CubicSpline(centres, v)`` (equal to float64 round-off;
    tested), without importing ``scipy.interpolate`` (~0.2-0.4 CPU-s of a command's start):
    slopes from the tridiagonal continuity equations of the second derivative, the
    not-a-knot conditions as the first and last rows; three nodes: the parabola.
    """
    c = np.asarray(centres, dtype=np.float64)
    n = c.size
    h = np.diff(c)
    eye = np.eye(n)
    dlt = (eye[1:] - eye[:-1]) / h[:, None]  # (n-1, n): the interval slopes δ_i as S @ v
    if n == 3:
        a = (dlt[1] - dlt[0]) / (h[0] + h[1])  # f = v0 + δ0 (x - c0) + a (x - c0)(x - c1)
        return np.stack([dlt[0] - a * h[0], dlt[0] + a * h[0], dlt[0] + a * (h[0] + 2 * h[1])])
    m = np.zeros((n, n))
    r = np.zeros((n, n))
    i = np.arange(1, n - 1)
    m[i, i - 1] = h[i]
    m[i, i] = 2.0 * (h[i - 1] + h[i])
    m[i, i + 1] = h[i - 1]
    r[i] = 3.0 * (h[i, None] * dlt[i - 1] + h[i - 1, None] * dlt[i])
    d = h[0] + h[1]
    m[0, 0], m[0, 1] = h[1], d
    r[0] = ((h[0] + 2.0 * d) * h[1] * dlt[0] + h[0] ** 2 * dlt[1]) / d
    d = h[-1] + h[-2]
    m[-1, -2], m[-1, -1] = d, h[-2]
    r[-1] = (h[-1] ** 2 * dlt[-2] + (2.0 * d + h[-1]) * h[-2] * dlt[-1]) / d
    return np.linalg.solve(m, r)


def _hermite_matrices(
    centres: np.ndarray, x: np.ndarray, extrapolate: str
) -> tuple[np.ndarray, np.ndarray]:
    """(A, B), each (len(x), len(centres)): the cubic Hermite interpolant through values v
    with node slopes m is ``A @ v + B @ m``.

    Akima's spline is nonlinear in the data only through its node slopes; once they are
    known (host, on the small bin grid) the evaluation at every pixel is two matrix
    products, which run on the device.  Beyond the end centres: the end value held flat,
    or its Taylor expansion to first or second order (the end interval's cubic).
    """
    nb = centres.size
    x = np.asarray(x, dtype=np.float64)
    rows = np.arange(x.size)
    p = np.clip(x, centres[0], centres[-1])
    k = np.clip(np.searchsorted(centres, p, side="right") - 1, 0, nb - 2)
    h = centres[k + 1] - centres[k]
    t = (p - centres[k]) / h
    t2, t3 = t * t, t * t * t
    A, B = np.zeros((x.size, nb)), np.zeros((x.size, nb))
    A[rows, k] = 2 * t3 - 3 * t2 + 1
    A[rows, k + 1] += -2 * t3 + 3 * t2
    B[rows, k] = (t3 - 2 * t2 + t) * h
    B[rows, k + 1] += (t3 - t2) * h
    if extrapolate != "flat":
        for end, out in ((0, x < centres[0]), (nb - 1, x > centres[-1])):
            if not out.any():
                continue
            dx = x[out] - centres[end]
            B[out, end] += dx  # f(c_end) + m_end * dx
            if extrapolate == "quadratic":
                j0 = 0 if end == 0 else nb - 2  # the end interval [c_j0, c_j0+1]
                hh = centres[j0 + 1] - centres[j0]
                # f'' at the end node of that interval's Hermite cubic, linear in (v, m)
                sgn = 1.0 if end == 0 else -1.0
                a = np.zeros(nb)
                b = np.zeros(nb)
                a[j0], a[j0 + 1] = -6 * sgn / hh**2, 6 * sgn / hh**2
                b[j0], b[j0 + 1] = (-4.0, -2.0) if end == 0 else (2.0, 4.0)
                b /= hh
                q = 0.5 * dx * dx
                A[out] += q[:, None] * a[None, :]
                B[out] += q[:, None] * b[None, :]
    return A, B


def _akima_slopes(centres: np.ndarray, values: np.ndarray, axis: int) -> np.ndarray:
    """Akima's node slopes (scipy's ``Akima1DInterpolator``) along ``axis`` of ``values``."""
    from scipy.interpolate import Akima1DInterpolator

    # scipy puts the evaluation points back along ``axis``: the result has values' shape
    return Akima1DInterpolator(centres, values, axis=axis).derivative()(centres)


def _axis_order(order: str, nb: int, undersample: str, what: str) -> str:
    """afw ``UndersampleStyle``: the style actually used along an axis of ``nb`` nodes."""
    if nb >= _MIN_NODES[order]:
        return order
    if undersample == "THROW_EXCEPTION":
        raise InvalidInputError(
            f"{order} interpolation needs at least {_MIN_NODES[order]} bins along the {what}, "
            f"got {nb} (undersample_style THROW_EXCEPTION)"
        )
    # REDUCE_INTERP_ORDER (afw lookupMaxInterpStyle): 1 → constant, 2 → linear, else cubic
    return "cubic" if nb >= 3 else "linear"

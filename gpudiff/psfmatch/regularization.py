"""Regularization of the delta-function basis (docs/algorithms.md §1.4).

ip_diffim's ``makeRegularizationMatrix``: a finite-difference operator ``B`` over the
pixels of a delta-function kernel (a 5- or 9-point Laplacian, or forward differences of
order 1–3), ``H = BᵀB``, and the weight λ of the regularized solve ``(M + λH) a = b``.
Used with :func:`gpudiff.psfmatch.basis.make_delta_function_basis` when the config asks
for ``use_regularization``.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from ..errors import InvalidInputError

__all__ = [
    "make_regularization_operator",
    "make_regularization_matrix",
    "regularization_lambda",
]

_STENCILS = {
    5: np.array([[0.0, 1.0, 0.0], [1.0, -4.0, 1.0], [0.0, 1.0, 0.0]]),
    9: np.array([[1.0, 4.0, 1.0], [4.0, -20.0, 4.0], [1.0, 4.0, 1.0]]) / 6.0,
}
#: forward differences of order 1..3 (they penalize the 0th..2nd derivative); where the
#: tapered order reaches 0 the border penalty is used instead.
_FORWARD = {1: (-1.0, 1.0), 2: (-1.0, 2.0, -1.0), 3: (-1.0, 3.0, -3.0, 1.0)}


def _central_difference(w: int, h: int, stencil: int, penalty: float) -> np.ndarray:
    if stencil not in _STENCILS:
        raise InvalidInputError(f"Only 5- or 9-point Laplacian stencils are allowed, got {stencil}")
    coeff, n = _STENCILS[stencil].ravel(), w * h
    # flat offsets of the 3x3 neighbourhood, row-major like the stencil itself
    nbr = (np.arange(-1, 2)[None, :] + w * np.arange(-1, 2)[:, None]).ravel()
    b = np.zeros((n, n))
    for i in range(n):
        y0, x0 = divmod(i, w)
        if 0 < x0 < w - 1 and 0 < y0 < h - 1:
            b[i, i + nbr] += coeff  # Laplacian of the kernel image at an interior pixel
        else:
            b[i, i] = penalty  # outer ring: pull towards 0 instead
    return b


def _forward_difference(w: int, h: int, orders, penalty: float) -> np.ndarray:
    """LSST's ``makeForwardDifferenceMatrix`` construction (docs/algorithms.md §1.4,
    "partially read").

    For each requested order o and pixel i = (x0, y0), row i of B receives the
    forward difference along x, with order ``min(o, w-1-x0)``, placed at columns
    ``i, i+1, ...``, **plus** the forward difference along y, with order
    ``min(o, h-1-y0)``, at columns ``i, i+w, ...``.  The order is thus tapered
    towards the far (last) column/row; where it reaches 0 the border penalty goes
    on the diagonal.  Rows of all orders are summed, not stacked, so B stays
    square (n x n).  Rows without a penalty sum to 0 (constant kernels are free).
    """
    n = w * h
    b = np.zeros((n, n))
    for o in orders:
        for i in range(n):
            y0, x0 = divmod(i, w)
            ox, oy = min(w - 1 - x0, o), min(h - 1 - y0, o)
            cx = (penalty,) if ox == 0 else _FORWARD[ox]
            cy = (penalty,) if oy == 0 else _FORWARD[oy]
            b[i, i + np.arange(len(cx))] += cx  # along x: columns i, i+1, ...
            b[i, i + w * np.arange(len(cy))] += cy  # along y: columns i, i+w, ...
    return b


def make_regularization_operator(
    config: Any, width: int, height: int, fit_for_background: bool
) -> np.ndarray:
    """The finite-difference operator ``B`` whose ``BᵀB`` is the regularization matrix.

    Rows and columns index delta-function kernels row-major (``i = row*width + col``);
    ``fit_for_background`` appends an all-zero row and column (the background term is
    not regularized).  The config values are validated here too, so configs built
    without validation (or duck-typed ones) fail loudly.
    """
    w, h = int(width), int(height)
    if w < 1 or h < 1:
        raise InvalidInputError(f"width and height must be positive, got {width}, {height}")
    penalty = float(config.regularization_border_penalty)
    if not (math.isfinite(penalty) and penalty >= 0):
        raise InvalidInputError(f"regularization_border_penalty must be >= 0, got {penalty}")
    rtype = config.regularization_type
    if rtype == "centralDifference":
        b = _central_difference(w, h, int(config.central_regularization_stencil), penalty)
    elif rtype == "forwardDifference":
        orders = tuple(config.forward_regularization_orders)
        if not orders or any(isinstance(o, bool) or o not in _FORWARD for o in orders):
            raise InvalidInputError(
                f"forward_regularization_orders must be within 1..3, got {orders}"
            )
        b = _forward_difference(w, h, [int(o) for o in orders], penalty)
    else:
        raise InvalidInputError(f"regularization_type {rtype!r} not recognized")
    if fit_for_background:
        b = np.pad(b, ((0, 1), (0, 1)))
    return b


def make_regularization_matrix(
    config: Any, width: int, height: int, fit_for_background: bool
) -> np.ndarray:
    """``H = BᵀB`` (docs/algorithms.md §1.4); the regularized solve is ``(M + λH) a = b``.

    Returns an ``(n, n)`` float64 symmetric positive semi-definite matrix,
    ``n = width*height (+1 with fit_for_background)``; see
    :func:`make_regularization_operator` for ``B``.  Uses ``regularization_type``,
    ``central_regularization_stencil``, ``forward_regularization_orders`` and
    ``regularization_border_penalty``; an unknown type, a stencil other than 5/9, an
    order outside 1..3 or a negative penalty raises InvalidInputError.
    """
    b = make_regularization_operator(config, width, height, fit_for_background)
    return b.T @ b


def regularization_lambda(config: Any, M, H) -> float:
    """λ for ``(M + λH) a = b``: ``lambda_value`` ("absolute") or
    ``lambda_scaling · tr(M) / tr(H)`` ("relative").

    ``M`` and ``H`` may be NumPy or CuPy 2-D arrays.  The risk-minimizing types are
    not supported (upstream reads config keys that do not exist; docs/algorithms.md §1.4).
    """
    ltype = config.lambda_type
    if ltype == "absolute":
        return float(config.lambda_value)
    if ltype == "relative":
        tr_h = float(H.trace())
        if tr_h == 0.0 or not math.isfinite(tr_h):
            raise InvalidInputError(f"relative lambda needs tr(H) != 0, got {tr_h}")
        return float(config.lambda_scaling) * float(M.trace()) / tr_h
    raise InvalidInputError(f"lambda_type {ltype!r} not supported (use 'absolute' or 'relative')")

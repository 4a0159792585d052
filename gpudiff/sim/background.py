"""Smooth backgrounds on top of the sky: polynomial, Chebyshev, callables and arrays."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from ..errors import InvalidInputError
from ..image.masked_image import Box
from ._util import _box_centre, _finite_number, _is_number

if TYPE_CHECKING:
    from .config import ObsConfig


@dataclass(frozen=True)
class PolynomialBackground:
    """A quadratic background b = c + g_x·u + g_y·v + q_xx·u² + q_xy·u·v + q_yy·v² (ADU).

    Parameters
    ----------
    offset : float
        Constant term c (ADU), added to the exposure's ``sky``.
    gradient : (float, float)
        Linear coefficients (g_x, g_y), ADU per unit of u, v.
    quadratic : (float, float, float)
        Quadratic coefficients (q_xx, q_xy, q_yy).
    center : (float, float), optional
        Parent position of u = v = 0.  Default: the centre of the exposure.
    scale : float or (float, float), optional
        Pixels per unit of u (and v).  Default: half the exposure's size, so that u and
        v run over [−1, 1] across the exposure.  Give ``center`` and ``scale`` explicitly
        for a background that is continuous across several exposures (patches, visits)
        in a common parent frame.
    """

    offset: float = 0.0
    gradient: tuple[float, float] = (0.0, 0.0)
    quadratic: tuple[float, float, float] = (0.0, 0.0, 0.0)
    center: tuple[float, float] | None = None
    scale: Any = None

    def __post_init__(self):
        _finite_number("PolynomialBackground offset", self.offset)
        if len(tuple(self.gradient)) != 2 or len(tuple(self.quadratic)) != 3:
            raise InvalidInputError(
                "PolynomialBackground needs 2 gradient and 3 quadratic coefficients"
            )
        for v in (*self.gradient, *self.quadratic):
            _finite_number("PolynomialBackground coefficient", v)

    def evaluate(self, x, y, box: Box | None = None) -> np.ndarray:
        """b(x, y) at parent coordinates (arrays broadcast); ``box`` supplies the defaults."""
        if self.center is not None:
            cx, cy = (float(v) for v in self.center)
        elif box is not None:
            cx, cy = _box_centre(box)
        else:
            raise InvalidInputError("PolynomialBackground without center needs the exposure box")
        if self.scale is not None:
            sc = np.broadcast_to(np.asarray(self.scale, dtype=np.float64), (2,))
            sx, sy = float(sc[0]), float(sc[1])
            if not (sx > 0 and sy > 0):
                raise InvalidInputError(
                    f"PolynomialBackground scale must be > 0, got {self.scale!r}"
                )
        elif box is not None:
            sx, sy = max(0.5 * (box.width - 1), 0.5), max(0.5 * (box.height - 1), 0.5)
        else:
            raise InvalidInputError("PolynomialBackground without scale needs the exposure box")
        u = (np.asarray(x, dtype=np.float64) - cx) / sx
        v = (np.asarray(y, dtype=np.float64) - cy) / sy
        gx, gy = self.gradient
        qxx, qxy, qyy = self.quadratic
        return self.offset + gx * u + gy * v + qxx * u * u + qxy * u * v + qyy * v * v

    def __call__(self, x, y):
        return self.evaluate(x, y)


@dataclass(frozen=True)
class ChebyshevBackground:
    """An afw ``Chebyshev1Function2D`` background (docs/algorithms.md §0.4, §11.2).

    f(x, y) = Σ_k c_k T_i(x') T_j(y'), terms ordered by total degree d = i + j and, within
    a degree, by decreasing i: (0,0), (1,0), (0,1), (2,0), (1,1), (0,2), ...  x', y' map
    ``box`` taken as a Box2D (edges x0 − 0.5 … x1 − 0.5) onto [−1, 1].

    Parameters
    ----------
    coefficients : sequence of float
        (order+1)(order+2)/2 coefficients.
    box : Box, optional
        The range of the function; default: the exposure's box.
    """

    coefficients: tuple[float, ...]
    box: Box | None = None

    def __post_init__(self):
        c = tuple(float(v) for v in self.coefficients)
        n = len(c)
        order = int(round((math.sqrt(8 * n + 1) - 3) / 2))
        if n == 0 or (order + 1) * (order + 2) // 2 != n:
            raise InvalidInputError(
                f"ChebyshevBackground needs (order+1)(order+2)/2 coefficients, got {n}"
            )
        object.__setattr__(self, "coefficients", c)

    @property
    def order(self) -> int:
        return int(round((math.sqrt(8 * len(self.coefficients) + 1) - 3) / 2))

    def evaluate(self, x, y, box: Box | None = None) -> np.ndarray:
        b = self.box if self.box is not None else box
        if b is None:
            raise InvalidInputError("ChebyshevBackground without box needs the exposure box")
        xmin, xmax = b.x0 - 0.5, b.x1 - 0.5
        ymin, ymax = b.y0 - 0.5, b.y1 - 0.5
        xp = (np.asarray(x, dtype=np.float64) - 0.5 * (xmin + xmax)) * 2.0 / (xmax - xmin)
        yp = (np.asarray(y, dtype=np.float64) - 0.5 * (ymin + ymax)) * 2.0 / (ymax - ymin)
        order = self.order
        tx = [np.ones_like(xp), xp]
        ty = [np.ones_like(yp), yp]
        for k in range(2, order + 1):
            tx.append(2 * xp * tx[-1] - tx[-2])
            ty.append(2 * yp * ty[-1] - ty[-2])
        out = 0.0
        k = 0
        for d in range(order + 1):
            for j in range(d + 1):
                i = d - j
                out = out + self.coefficients[k] * tx[i] * ty[j]
                k += 1
        return out

    def __call__(self, x, y):
        return self.evaluate(x, y)


def _eval_background(bkg: Any, box: Box) -> np.ndarray:
    """The background term (without sky) over ``box`` as an (H, W) float64 array."""
    shape = box.shape
    if bkg is None:
        return np.zeros(shape)
    if _is_number(bkg):
        return np.full(shape, _finite_number("background", bkg))
    xx = np.arange(box.x0, box.x1, dtype=np.float64)[None, :]
    yy = np.arange(box.y0, box.y1, dtype=np.float64)[:, None]
    if hasattr(bkg, "evaluate"):
        val = bkg.evaluate(xx, yy, box)
    elif callable(bkg):
        val = bkg(xx, yy)
    elif isinstance(bkg, np.ndarray):
        val = bkg
    else:
        raise InvalidInputError(
            f"background must be None, a number, an array, a "
            f"PolynomialBackground/ChebyshevBackground or a callable; "
            f"got {type(bkg).__name__}"
        )
    try:
        out = np.array(np.broadcast_to(np.asarray(val, dtype=np.float64), shape))
    except ValueError:
        raise InvalidInputError(
            f"background evaluates to shape {np.shape(val)}, not broadcastable to the image "
            f"shape {shape}"
        ) from None
    if not np.isfinite(out).all():
        raise InvalidInputError("background has non-finite values")
    return out


def _background_at(bkg: Any, box: Box, x, y) -> np.ndarray:
    """The background term (without sky) at parent points (x, y)."""
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    if bkg is None:
        return np.zeros(x.shape)
    if isinstance(bkg, np.ndarray):
        ix = np.clip(np.round(x).astype(np.int64) - box.x0, 0, box.width - 1)
        iy = np.clip(np.round(y).astype(np.int64) - box.y0, 0, box.height - 1)
        return np.broadcast_to(bkg, box.shape)[iy, ix].astype(np.float64)
    if isinstance(bkg, (int, float, np.integer, np.floating)):
        return np.full(x.shape, float(bkg))
    val = bkg.evaluate(x, y, box) if hasattr(bkg, "evaluate") else bkg(x, y)
    return np.broadcast_to(np.asarray(val, dtype=np.float64), x.shape).copy()


def _bkg_var_at(obs: ObsConfig, box: Box, x, y) -> np.ndarray:
    """Expected variance (ADU²) of the sky + background at parent points (x, y)."""
    b = _background_at(obs.background, box, x, y) + obs.sky
    return (np.clip(b, 0, None) * obs.gain + obs.read_noise**2) / obs.gain**2

"""The PSF of a simulated exposure: :class:`PsfSpec` and the stamp renderers built from it."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import numpy as np

from ..errors import InvalidInputError
from ..image.masked_image import Box
from ..image.psf import FWHM_PER_SIGMA, GaussianPsf, GridPsf, MoffatPsf, Psf
from ._util import (
    _CHUNK_ELEMENTS,
    _box_centre,
    _finite_number,
    _grid_nodes,
    _is_int,
    _is_number,
    _normalized_coords,
    _odd,
)


@dataclass(frozen=True)
class PsfSpec:
    """A Gaussian or Moffat PSF over the field, constant or with a varying FWHM.

    Parameters
    ----------
    kind : {"gaussian", "moffat"}
        Profile family (:class:`~gpudiff.image.GaussianPsf` or
        :class:`~gpudiff.image.MoffatPsf`).
    fwhm : float
        Profile FWHM in pixels at the field centre (for an elliptical Gaussian: along
        its major axis).  This is the profile parameter; the moments FWHM of the
        pixelized model (``Psf.fwhm``) is slightly larger.
    beta : float
        Moffat index (> 1); ignored for Gaussians.
    variation : sequence of float or callable
        Spatial variation of the FWHM: ``fwhm(x, y) = fwhm · m(x', y')`` with x', y' the
        parent coordinates mapped linearly to [−1, 1] over the exposure's pixel centres
        (clipped outside).  A sequence ``(a, b, c, d, e)`` (shorter is zero-padded) gives
        ``m = 1 + a·x' + b·y' + c·x'² + d·x'·y' + e·y'²``; a callable ``m(x', y')`` must
        accept arrays.  Empty (default): constant PSF.
    axis_ratio : float
        Minor/major axis ratio of a Gaussian (1: round).  Moffats are round.
    theta : float
        Position angle of a Gaussian's major axis, radians counter-clockwise from +x.
    oversample : int
        Sub-samples per pixel and axis used to pixel-integrate the profile (5 by default).
    size : int, optional
        Odd side of the PSF stamp.  Default: 2·ceil(5σ)+1 for Gaussians and
        2·ceil(4·FWHM)+1 for Moffats (at least 7), with the largest FWHM over the field;
        the wings beyond are cut and the stamp renormalized to unit sum, both in the
        rendered stars and in the attached PSF model.
    grid : int
        Nodes per axis of the :class:`~gpudiff.image.GridPsf` attached to an exposure
        when the PSF varies (bilinear interpolation between nodes; exact at the nodes,
        which include the four corner pixels).
    """

    kind: str = "gaussian"
    fwhm: float = 3.0
    beta: float = 3.0
    variation: Any = ()
    axis_ratio: float = 1.0
    theta: float = 0.0
    oversample: int = 5
    size: int | None = None
    grid: int = 8

    def __post_init__(self):
        kind = str(self.kind).strip().lower()
        if kind not in ("gaussian", "moffat"):
            raise InvalidInputError(
                f"PsfSpec kind must be 'gaussian' or 'moffat', got {self.kind!r}"
            )
        object.__setattr__(self, "kind", kind)
        _finite_number("PsfSpec fwhm", self.fwhm, positive=True)
        if not (_finite_number("PsfSpec beta", self.beta) > 1):
            raise InvalidInputError(f"PsfSpec beta must be > 1, got {self.beta!r}")
        q = _finite_number("PsfSpec axis_ratio", self.axis_ratio, positive=True)
        if q > 1:
            raise InvalidInputError(
                f"PsfSpec axis_ratio must be in (0, 1], got {self.axis_ratio!r}"
            )
        if kind == "moffat" and q != 1.0:
            raise InvalidInputError("PsfSpec: Moffat PSFs are round; axis_ratio must be 1")
        _finite_number("PsfSpec theta", self.theta)
        if not _is_int(self.oversample) or self.oversample < 1:
            raise InvalidInputError(
                f"PsfSpec oversample must be an integer >= 1, got {self.oversample!r}"
            )
        if self.size is not None and (
            not isinstance(self.size, (int, np.integer)) or self.size < 3 or self.size % 2 == 0
        ):
            raise InvalidInputError(f"PsfSpec size must be an odd integer >= 3, got {self.size!r}")
        if not _is_int(self.grid) or self.grid < 2:
            raise InvalidInputError(f"PsfSpec grid must be an integer >= 2, got {self.grid!r}")
        if not callable(self.variation):
            try:
                coeffs = tuple(float(c) for c in self.variation)
            except (TypeError, ValueError):
                raise InvalidInputError(
                    "PsfSpec variation must be a sequence of up to 5 numbers or a callable, "
                    f"got {self.variation!r}"
                ) from None
            if len(coeffs) > 5 or not all(math.isfinite(c) for c in coeffs):
                raise InvalidInputError(
                    "PsfSpec variation takes up to 5 finite coefficients "
                    f"(x', y', x'², x'y', y'²), got {self.variation!r}"
                )
            object.__setattr__(self, "variation", coeffs)

    @property
    def is_varying(self) -> bool:
        """Whether the FWHM changes over the field."""
        return callable(self.variation) or any(c != 0.0 for c in self.variation)

    def multiplier(self, x, y, box: Box) -> np.ndarray:
        """The FWHM multiplier m(x', y') at parent positions (x, y) of an exposure ``box``."""
        xn, yn = _normalized_coords(x, y, box)
        xn, yn = np.broadcast_arrays(xn, yn)
        if callable(self.variation):
            m = np.asarray(self.variation(xn, yn), dtype=np.float64)
            m = np.broadcast_to(m, xn.shape)
        else:
            c = list(self.variation) + [0.0] * (5 - len(self.variation))
            m = 1.0 + c[0] * xn + c[1] * yn + c[2] * xn * xn + c[3] * xn * yn + c[4] * yn * yn
        if not (np.isfinite(m).all() and (m > 0).all()):
            raise InvalidInputError(
                "PsfSpec variation gives a non-positive or non-finite FWHM somewhere in the field"
            )
        return m

    def fwhm_at(self, x, y, box: Box) -> np.ndarray:
        """Profile FWHM (pixels) at parent positions (x, y) of an exposure ``box``."""
        return self.fwhm * self.multiplier(x, y, box)

    def max_fwhm(self, box: Box) -> float:
        """The largest profile FWHM over ``box`` (sampled on a 33×33 lattice)."""
        if not self.is_varying:
            return float(self.fwhm)
        xs, ys = _grid_nodes(box, 33)
        return float(self.fwhm_at(xs[None, :], ys[:, None], box).max())

    def stamp_size(self, box: Box) -> int:
        """Odd side of the PSF stamps used for exposures covering ``box``."""
        if self.size is not None:
            return int(self.size)
        f = self.max_fwhm(box)
        if self.kind == "gaussian":
            return max(7, _odd(2 * math.ceil(5 * f / FWHM_PER_SIGMA) + 1))
        return max(7, _odd(2 * math.ceil(4 * f) + 1))

    def make_psf(self, fwhm: float, size: int, average_position=(0.0, 0.0)) -> Psf:
        """The gpudiff PSF model of this family with profile FWHM ``fwhm``."""
        if self.kind == "gaussian":
            sigma = float(fwhm) / FWHM_PER_SIGMA
            return GaussianPsf(
                sigma=sigma,
                sigma_y=sigma * self.axis_ratio,
                theta=self.theta,
                size=size,
                oversample=int(self.oversample),
                average_position=average_position,
            )
        return MoffatPsf(
            fwhm=float(fwhm),
            beta=self.beta,
            size=size,
            oversample=int(self.oversample),
            average_position=average_position,
        )


def _sample_offsets(size: int, oversample: int) -> np.ndarray:
    """Sub-sample offsets (pixel + sub-pixel) from the stamp's centre pixel, flattened."""
    h = size // 2
    sub = (np.arange(oversample) + 0.5) / oversample - 0.5
    return (np.arange(-h, h + 1, dtype=np.float64)[:, None] + sub[None, :]).ravel()


class _Renderer:
    """Unit-sum PSF stamps at sub-pixel positions, plus the PSF model to attach.

    ``stamps(x, y)`` yields ``(start, stop, stamps)`` with stamps of shape (n, S, S)
    centred on pixel (round(x), round(y)), i.e. ``Psf.compute_image(x, y)`` of the PSF at
    (x, y); ``kernels(x, y)`` the same at the rounded positions (``kernel_image``).
    """

    size: int
    psf: Psf

    def stamps(self, x: np.ndarray, y: np.ndarray) -> Iterator[tuple[int, int, np.ndarray]]:
        raise NotImplementedError

    def kernels(self, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        x, y = np.round(np.asarray(x, dtype=np.float64)), np.round(np.asarray(y, dtype=np.float64))
        out = np.empty((x.size, self.size, self.size))
        for a, b, st in self.stamps(x, y):
            out[a:b] = st
        return out

    def profile_fwhm(self, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        return np.full(np.shape(x), np.nan)


class _AnalyticRenderer(_Renderer):
    """Gaussian or Moffat stamps with per-position parameters, fully vectorized.

    The sampling reproduces ``_AnalyticPsf.compute_image`` of gpudiff.image.psf exactly:
    the profile is sampled at ``oversample``² points per pixel, averaged, and the stamp
    normalized to unit sum.
    """

    def __init__(
        self,
        kind: str,
        size: int,
        oversample: int,
        params: Callable,
        psf: Psf,
        fwhm_fn: Callable,
        beta: float = 3.0,
    ):
        self.kind, self.size, self.oversample = kind, int(size), int(oversample)
        self._params, self.psf, self._fwhm_fn, self.beta = params, psf, fwhm_fn, float(beta)
        self._off = _sample_offsets(self.size, self.oversample)

    def profile_fwhm(self, x, y):
        return np.broadcast_to(
            np.asarray(self._fwhm_fn(np.asarray(x, float), np.asarray(y, float)), float),
            np.shape(x),
        ).copy()

    def stamps(self, x, y):
        x = np.atleast_1d(np.asarray(x, dtype=np.float64))
        y = np.atleast_1d(np.asarray(y, dtype=np.float64))
        n_tot, S, n = x.size, self.size, self.oversample
        chunk = max(1, _CHUNK_ELEMENTS // (S * n) ** 2)
        off = self._off
        for a in range(0, n_tot, chunk):
            b = min(n_tot, a + chunk)
            xs, ys = x[a:b], y[a:b]
            fx = xs - np.round(xs)
            fy = ys - np.round(ys)
            p = self._params(xs, ys)
            c = b - a
            gx = off[None, :] - fx[:, None]  # (c, S n)
            gy = off[None, :] - fy[:, None]
            if self.kind == "gaussian":
                ixx, iyy, ixy = (np.broadcast_to(np.asarray(v, np.float64), (c,)) for v in p)
                if not np.any(ixy):
                    # Separable: the mean over sub-samples of a product is the product of means.
                    px = np.exp(-0.5 * gx * gx / ixx[:, None]).reshape(c, S, n).mean(axis=2)
                    py = np.exp(-0.5 * gy * gy / iyy[:, None]).reshape(c, S, n).mean(axis=2)
                    img = py[:, :, None] * px[:, None, :]
                else:
                    det = (ixx * iyy - ixy * ixy)[:, None, None]
                    X, Y = gx[:, None, :], gy[:, :, None]
                    q = (
                        iyy[:, None, None] * X * X
                        - 2 * ixy[:, None, None] * X * Y
                        + ixx[:, None, None] * Y * Y
                    ) / det
                    q *= -0.5
                    np.exp(q, out=q)
                    img = q.reshape(c, S, n, S, n).mean(axis=(2, 4))
            else:
                alpha = np.broadcast_to(np.asarray(p[0], np.float64), (c,))
                inv_a2 = (1.0 / (alpha * alpha))[:, None, None]
                r2 = gx[:, None, :] ** 2 + gy[:, :, None] ** 2
                r2 *= inv_a2
                r2 += 1.0
                np.log(r2, out=r2)
                r2 *= -self.beta
                np.exp(r2, out=r2)
                img = r2.reshape(c, S, n, S, n).mean(axis=(2, 4))
            img /= img.sum(axis=(1, 2), keepdims=True)
            yield a, b, img


class _LoopRenderer(_Renderer):
    """Stamps from ``psf_at(x, y).compute_image(x, y, size)``, one star at a time."""

    def __init__(
        self,
        psf_at: Callable[[float, float], Psf],
        size: int,
        psf: Psf,
        fwhm_fn: Callable | None = None,
    ):
        self._psf_at, self.size, self.psf, self._fwhm_fn = psf_at, int(size), psf, fwhm_fn

    def profile_fwhm(self, x, y):
        if self._fwhm_fn is None:
            return super().profile_fwhm(x, y)
        return np.broadcast_to(np.asarray(self._fwhm_fn(x, y), float), np.shape(x)).copy()

    def stamps(self, x, y):
        x = np.atleast_1d(np.asarray(x, dtype=np.float64))
        y = np.atleast_1d(np.asarray(y, dtype=np.float64))
        chunk = 256
        for a in range(0, x.size, chunk):
            b = min(x.size, a + chunk)
            out = np.empty((b - a, self.size, self.size))
            for i in range(a, b):
                p = self._psf_at(float(x[i]), float(y[i]))
                if not isinstance(p, Psf):
                    raise InvalidInputError(
                        f"the PSF callable returned {type(p).__name__}, not a gpudiff Psf"
                    )
                out[i - a] = p.compute_image(float(x[i]), float(y[i]), size=self.size)
            yield a, b, out


def _gaussian_params(spec_sigma_fn, axis_ratio: float, theta: float):
    c, s = math.cos(theta), math.sin(theta)

    def params(x, y):
        sx = spec_sigma_fn(x, y)
        a, b = sx * sx, (sx * axis_ratio) ** 2
        return a * c * c + b * s * s, a * s * s + b * c * c, (a - b) * c * s

    return params


def _renderer_from_psf(psf: Psf) -> _Renderer:
    """A renderer for a constant gpudiff Psf instance (rendering exactly that model)."""
    if type(psf) is GaussianPsf:
        ixx, iyy, ixy = psf.covariance()
        return _AnalyticRenderer(
            "gaussian",
            psf.size,
            psf.oversample,
            lambda x, y: (ixx, iyy, ixy),
            psf,
            lambda x, y: FWHM_PER_SIGMA * math.sqrt(psf.sigma * psf.sigma_y),
        )
    if type(psf) is MoffatPsf:
        return _AnalyticRenderer(
            "moffat",
            psf.size,
            psf.oversample,
            lambda x, y: (psf.alpha,),
            psf,
            lambda x, y: psf.profile_fwhm,
            beta=psf.beta,
        )
    return _LoopRenderer(lambda x, y: psf, psf.size, psf)


def _make_renderer(psf: Any, box: Box) -> _Renderer:
    """Build the renderer (and the PSF model to attach) for exposures covering ``box``."""
    if _is_number(psf):
        psf = PsfSpec(fwhm=float(psf))
    centre = _box_centre(box)
    if isinstance(psf, PsfSpec):
        size = psf.stamp_size(box)
        if not psf.is_varying:
            return _renderer_from_psf(psf.make_psf(psf.fwhm, size, average_position=centre))
        xs, ys = _grid_nodes(box, psf.grid)
        grid_psf = GridPsf.from_function(
            lambda x, y: psf.make_psf(float(psf.fwhm_at(x, y, box)), size), xs, ys, size=size
        )

        def fwhm_fn(x, y):
            return psf.fwhm_at(x, y, box)

        if psf.kind == "gaussian":
            params = _gaussian_params(
                lambda x, y: fwhm_fn(x, y) / FWHM_PER_SIGMA, psf.axis_ratio, psf.theta
            )
            return _AnalyticRenderer("gaussian", size, psf.oversample, params, grid_psf, fwhm_fn)
        k = 2.0 * math.sqrt(2.0 ** (1.0 / psf.beta) - 1.0)
        return _AnalyticRenderer(
            "moffat",
            size,
            psf.oversample,
            lambda x, y: (fwhm_fn(x, y) / k,),
            grid_psf,
            fwhm_fn,
            beta=psf.beta,
        )
    if isinstance(psf, Psf):
        return _renderer_from_psf(psf)
    if callable(psf):
        first = psf(*centre)
        if not isinstance(first, Psf):
            raise InvalidInputError(
                f"the PSF callable must return a gpudiff Psf, got {type(first).__name__}"
            )
        size = first.size
        grid = 8
        xs, ys = _grid_nodes(box, grid)
        grid_psf = GridPsf.from_function(psf, xs, ys, size=size)
        return _LoopRenderer(psf, size, grid_psf)
    raise InvalidInputError(
        "psf must be a FWHM (float), a PsfSpec, a gpudiff Psf or a callable (x, y) -> Psf; "
        f"got {type(psf).__name__}"
    )

"""PSF models: analytic (Gaussian, double Gaussian, Moffat), pixelized, and spatially varying.

Every model answers the questions the algorithms ask of a PSF (docs/algorithms.md §0.7, §1.2):

- ``kernel_image(x, y)``: a unit-sum, odd-sized float64 image centred on its central pixel,
  evaluated at parent position (x, y);
- ``compute_image(x, y)``: the same, but centred at the sub-pixel position (x, y) — what a
  star at (x, y) looks like; used to render and to fit stars;
- ``moments(x, y)``: the second moments (Ixx, Iyy, Ixy) in pixels², adaptive
  (Gaussian-weighted, as ``SdssShape``) for image PSFs and analytic for Gaussians;
- ``fwhm(x, y)`` (trace radius, the LSST ``getPsfFwhm`` default), ``fwhm_xy(x, y)`` (per
  axis) and ``determinant_radius(x, y)`` (used by ModelPsfMatch).

PSF images are small and live on the host as NumPy arrays; the algorithms move them to the
device when they need them there.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from typing import Callable, Sequence

import numpy as np

from ..errors import PsfError

__all__ = [
    "FWHM_PER_SIGMA",
    "Psf",
    "GaussianPsf",
    "DoubleGaussianPsf",
    "MoffatPsf",
    "ImagePsf",
    "GridPsf",
    "adaptive_moments",
    "evaluate_mean_fwhm",
]

#: FWHM / sigma of a Gaussian, 2·sqrt(2·ln 2).
FWHM_PER_SIGMA = 2.0 * math.sqrt(2.0 * math.log(2.0))


def _odd(n: float) -> int:
    n = int(math.ceil(n))
    return n if n % 2 == 1 else n + 1


def adaptive_moments(
    image: np.ndarray, max_iter: int = 100, tol: float = 1e-7
) -> tuple[float, float, float, float, float]:
    """Adaptive (elliptical-Gaussian-weighted) moments of a star image.

    Iterates the weight's covariance W ← 2·Q, where Q are the W-weighted second moments:
    the fixed point of a Gaussian profile of covariance C is W = C, so Gaussians give
    their exact σ² (the ``SdssShape`` definition used by LSST's ``computeShape``).

    Returns
    -------
    xc, yc, ixx, iyy, ixy : float
        Centroid (column, row, in pixels of ``image``) and second moments in pixels².
    """
    img = np.asarray(image, dtype=np.float64)
    if img.ndim != 2 or not np.isfinite(img).all():
        raise PsfError("adaptive moments need a finite 2-D image")
    ny, nx = img.shape
    yy, xx = np.mgrid[0:ny, 0:nx].astype(np.float64)
    pos = np.clip(img, 0, None)
    total = pos.sum()
    if total <= 0:
        raise PsfError("adaptive moments need an image with positive flux")
    xc = (pos * xx).sum() / total
    yc = (pos * yy).sum() / total
    # Start from a round weight of moderate size; unweighted moments are noise-dominated.
    w_xx = w_yy = max(1.0, ((pos * ((xx - xc) ** 2 + (yy - yc) ** 2)).sum() / total) / 2.0)
    w_xy = 0.0
    for _ in range(max_iter):
        det = w_xx * w_yy - w_xy * w_xy
        if det <= 0:
            raise PsfError("adaptive moments diverged (non-positive weight determinant)")
        dx, dy = xx - xc, yy - yc
        q = (w_yy * dx * dx - 2 * w_xy * dx * dy + w_xx * dy * dy) / det
        wgt = np.exp(-0.5 * q) * img
        s = wgt.sum()
        if s <= 0:
            raise PsfError("adaptive moments failed: weighted flux is not positive")
        xc_new = (wgt * xx).sum() / s
        yc_new = (wgt * yy).sum() / s
        dx, dy = xx - xc_new, yy - yc_new
        qxx = (wgt * dx * dx).sum() / s
        qyy = (wgt * dy * dy).sum() / s
        qxy = (wgt * dx * dy).sum() / s
        n_xx, n_yy, n_xy = 2 * qxx, 2 * qyy, 2 * qxy
        change = abs(n_xx - w_xx) + abs(n_yy - w_yy) + abs(n_xy - w_xy)
        w_xx, w_yy, w_xy, xc, yc = n_xx, n_yy, n_xy, xc_new, yc_new
        if change < tol * (w_xx + w_yy):
            break
    else:
        raise PsfError(f"adaptive moments did not converge in {max_iter} iterations")
    return float(xc), float(yc), float(w_xx), float(w_yy), float(w_xy)


#: Most rounded positions whose moments one PSF instance keeps (a 4096² lattice at 128 px
#: has 33² nodes).
_MOMENTS_CACHE_MAX = 8192


class Psf(ABC):
    """Base class of PSF models.  Positions are parent pixel coordinates (x = column)."""

    #: position used when none is given (LSST ``getAveragePosition``)
    average_position: tuple[float, float] = (0.0, 0.0)
    #: True when the model is the same image everywhere (so per-position work, such as
    #: moments on a lattice, can be done once).  Subclasses that vary say False.
    spatially_constant: bool = False

    # --- to implement -------------------------------------------------------------------
    @abstractmethod
    def compute_image(
        self, x: float | None = None, y: float | None = None, size: int | None = None
    ) -> np.ndarray:
        """The PSF centred at sub-pixel position (x, y), unit sum, float64.

        The returned stamp has odd ``size`` and its central pixel is pixel
        (round(x), round(y)); the star sits ``(x - round(x), y - round(y))`` from it.
        """

    @property
    @abstractmethod
    def size(self) -> int:
        """Side of the default (odd, square) kernel image."""

    # --- derived ----------------------------------------------------------------------
    def _pos(self, x: float | None, y: float | None) -> tuple[float, float]:
        ax, ay = self.average_position
        return (ax if x is None else float(x), ay if y is None else float(y))

    def kernel_image(
        self, x: float | None = None, y: float | None = None, size: int | None = None
    ) -> np.ndarray:
        """The PSF evaluated at (x, y) and centred on the stamp's central pixel."""
        x, y = self._pos(x, y)
        # Shift to the nearest integer position so the star is exactly on the centre pixel.
        return self.compute_image(float(round(x)), float(round(y)), size=size)

    def moments(self, x: float | None = None, y: float | None = None) -> tuple[float, float, float]:
        """Second moments (Ixx, Iyy, Ixy) in pixels², adaptive, at (x, y).

        Measured once per PSF and rounded position (the kernel image depends on nothing
        else) and cached on the instance, so the moment lattice of a spatially varying
        PSF is fitted once however many detection passes ask for it.
        """
        x, y = self._pos(x, y)
        key = (round(x), round(y))
        cache = self.__dict__.setdefault("_moments_cache", {})
        hit = cache.get(key)
        if hit is None:
            _, _, ixx, iyy, ixy = adaptive_moments(self.kernel_image(x, y))
            hit = (ixx, iyy, ixy)
            if len(cache) < _MOMENTS_CACHE_MAX:  # bounded: per-source queries are not lattices
                cache[key] = hit
        return hit

    def fwhm(self, x: float | None = None, y: float | None = None) -> float:
        """Trace-radius FWHM 2.3548·sqrt((Ixx+Iyy)/2) in pixels (LSST ``getPsfFwhm``)."""
        ixx, iyy, _ = self.moments(x, y)
        return FWHM_PER_SIGMA * math.sqrt(0.5 * (ixx + iyy))

    def fwhm_xy(self, x: float | None = None, y: float | None = None) -> tuple[float, float]:
        """Per-axis FWHM (2.3548·sqrt(Ixx), 2.3548·sqrt(Iyy)) (``getPsfFwhm(average=False)``)."""
        ixx, iyy, _ = self.moments(x, y)
        return FWHM_PER_SIGMA * math.sqrt(ixx), FWHM_PER_SIGMA * math.sqrt(iyy)

    def determinant_radius(self, x: float | None = None, y: float | None = None) -> float:
        """(Ixx·Iyy − Ixy²)^(1/4) in pixels: the σ of the equal-area round Gaussian."""
        ixx, iyy, ixy = self.moments(x, y)
        return float((ixx * iyy - ixy * ixy) ** 0.25)


class _AnalyticPsf(Psf):
    """A PSF defined by a profile f(dx, dy) sampled at pixel centres (optionally oversampled)."""

    spatially_constant = True

    def __init__(
        self, size: int, oversample: int = 1, average_position: tuple[float, float] = (0.0, 0.0)
    ):
        if size < 3 or size % 2 == 0:
            raise PsfError(f"PSF image size must be odd and >= 3, got {size}")
        if oversample < 1:
            raise PsfError(f"oversample must be >= 1, got {oversample}")
        self._size = int(size)
        self.oversample = int(oversample)
        self.average_position = (float(average_position[0]), float(average_position[1]))

    @property
    def size(self) -> int:
        return self._size

    @abstractmethod
    def _profile(self, dx: np.ndarray, dy: np.ndarray) -> np.ndarray:
        """Surface brightness at offsets (dx, dy) from the centre (any normalization)."""

    def compute_image(self, x=None, y=None, size=None):
        x, y = self._pos(x, y)
        size = self._size if size is None else int(size)
        if size < 1 or size % 2 == 0:
            raise PsfError(f"PSF image size must be odd and positive, got {size}")
        h = size // 2
        fx, fy = x - round(x), y - round(y)
        n = self.oversample
        # Sub-pixel sample offsets within a pixel (pixel-centre convention, docs/algorithms.md
        # §0.4).
        sub = (np.arange(n) + 0.5) / n - 0.5
        grid = np.arange(-h, h + 1, dtype=np.float64)
        gx = (grid[None, :, None, None] + sub[None, None, None, :]) - fx
        gy = (grid[:, None, None, None] + sub[None, None, :, None]) - fy
        img = self._profile(gx, gy).mean(axis=(2, 3))
        s = img.sum()
        if not np.isfinite(s) or s <= 0:
            raise PsfError(f"{type(self).__name__} image has non-positive sum")
        return img / s


class GaussianPsf(_AnalyticPsf):
    """An elliptical Gaussian PSF (LSST ``SingleGaussianPsf`` when round).

    Parameters
    ----------
    sigma : float, optional
        σ along the x axis (before rotation) in pixels.  Give ``sigma`` or ``fwhm``.
    fwhm : float, optional
        FWHM in pixels (σ = fwhm / 2.3548).
    size : int, optional
        Odd side of the kernel image; default 2·ceil(5σ)+1 (at least 7).
    sigma_y : float, optional
        σ along the y axis; default ``sigma`` (round).
    theta : float
        Rotation of the x axis, radians counter-clockwise.
    """

    def __init__(
        self,
        sigma=None,
        fwhm=None,
        size=None,
        sigma_y=None,
        theta=0.0,
        oversample=1,
        average_position=(0.0, 0.0),
    ):
        if (sigma is None) == (fwhm is None):
            raise PsfError("GaussianPsf needs exactly one of sigma or fwhm")
        sigma = float(sigma) if sigma is not None else float(fwhm) / FWHM_PER_SIGMA
        sigma_y = sigma if sigma_y is None else float(sigma_y)
        if not (sigma > 0 and sigma_y > 0 and math.isfinite(sigma) and math.isfinite(sigma_y)):
            raise PsfError(f"GaussianPsf sigma must be positive and finite, got {sigma}, {sigma_y}")
        self.sigma, self.sigma_y, self.theta = sigma, sigma_y, float(theta)
        size = (
            max(7, _odd(2 * math.ceil(5 * max(sigma, sigma_y)) + 1)) if size is None else int(size)
        )
        super().__init__(size, oversample, average_position)

    def covariance(self) -> tuple[float, float, float]:
        """(Ixx, Iyy, Ixy) of the continuous profile."""
        c, s = math.cos(self.theta), math.sin(self.theta)
        a, b = self.sigma**2, self.sigma_y**2
        return a * c * c + b * s * s, a * s * s + b * c * c, (a - b) * c * s

    def _profile(self, dx, dy):
        ixx, iyy, ixy = self.covariance()
        det = ixx * iyy - ixy * ixy
        return np.exp(-0.5 * (iyy * dx * dx - 2 * ixy * dx * dy + ixx * dy * dy) / det)

    def moments(self, x=None, y=None):
        # Analytic, as LSST's GaussianPsf.computeShape.
        return self.covariance()

    def __repr__(self):
        return (
            f"GaussianPsf(sigma={self.sigma:.4g}, sigma_y={self.sigma_y:.4g}, "
            f"theta={self.theta:.3g}, size={self.size})"
        )


class DoubleGaussianPsf(_AnalyticPsf):
    """Sum of two concentric round Gaussians: core σ1 and wing σ2 with amplitude ratio ``b``.

    Profile ∝ exp(−r²/2σ1²) + b·exp(−r²/2σ2²) (LSST ``DoubleGaussianPsf``).
    """

    def __init__(self, sigma1, sigma2, b=0.1, size=None, oversample=1, average_position=(0.0, 0.0)):
        if not (sigma1 > 0 and sigma2 > 0 and b >= 0):
            raise PsfError(
                f"DoubleGaussianPsf needs sigma1, sigma2 > 0 and b >= 0, got {sigma1}, {sigma2}, "
                f"{b}"
            )
        self.sigma1, self.sigma2, self.b = float(sigma1), float(sigma2), float(b)
        size = (
            max(7, _odd(2 * math.ceil(5 * max(sigma1, sigma2)) + 1)) if size is None else int(size)
        )
        super().__init__(size, oversample, average_position)

    def _profile(self, dx, dy):
        r2 = dx * dx + dy * dy
        return np.exp(-0.5 * r2 / self.sigma1**2) + self.b * np.exp(-0.5 * r2 / self.sigma2**2)

    def __repr__(self):
        return (
            f"DoubleGaussianPsf(sigma1={self.sigma1:.4g}, sigma2={self.sigma2:.4g}, "
            f"b={self.b:.3g}, size={self.size})"
        )


class MoffatPsf(_AnalyticPsf):
    """A round Moffat PSF, I(r) ∝ (1 + r²/α²)^(−β), FWHM = 2α·sqrt(2^(1/β) − 1).

    Parameters
    ----------
    fwhm : float
        Full width at half maximum of the profile, pixels.
    beta : float
        Moffat index (> 1); 2.5–4.5 describes ground-based seeing.
    size : int, optional
        Odd side of the kernel image; default 2·ceil(3·fwhm)+1 (the wings beyond are cut
        and the image renormalized to unit sum).
    """

    def __init__(self, fwhm, beta=3.0, size=None, oversample=1, average_position=(0.0, 0.0)):
        if not (fwhm > 0 and beta > 1):
            raise PsfError(f"MoffatPsf needs fwhm > 0 and beta > 1, got {fwhm}, {beta}")
        self.profile_fwhm, self.beta = float(fwhm), float(beta)
        self.alpha = self.profile_fwhm / (2.0 * math.sqrt(2.0 ** (1.0 / self.beta) - 1.0))
        size = max(7, _odd(2 * math.ceil(3 * fwhm) + 1)) if size is None else int(size)
        super().__init__(size, oversample, average_position)

    def _profile(self, dx, dy):
        return (1.0 + (dx * dx + dy * dy) / self.alpha**2) ** (-self.beta)

    def __repr__(self):
        return f"MoffatPsf(fwhm={self.profile_fwhm:.4g}, beta={self.beta:.3g}, size={self.size})"


def _shift_image(img: np.ndarray, fx: float, fy: float) -> np.ndarray:
    """Shift a small image by a sub-pixel amount with a cubic spline (callers renormalize)."""
    if fx == 0.0 and fy == 0.0:
        return img.copy()
    from scipy import ndimage

    out = ndimage.shift(img, (fy, fx), order=3, mode="constant", cval=0.0)
    return out


def _resize_centred(img: np.ndarray, size: int) -> np.ndarray:
    """Crop or zero-pad a centred odd image to odd ``size``."""
    n = img.shape[0]
    if size == n:
        return img.copy()
    if size < n:
        c = (n - size) // 2
        return img[c : c + size, c : c + size].copy()
    out = np.zeros((size, size), dtype=img.dtype)
    c = (size - n) // 2
    out[c : c + n, c : c + n] = img
    return out


class ImagePsf(Psf):
    """A pixelized PSF: one image, used everywhere in the field.

    Parameters
    ----------
    image : 2-D array
        PSF image; normalized to unit sum.  Even-sized or non-square images are
        zero-padded to an odd square; input pixel ((H-1)//2, (W-1)//2) (afw's centre,
        docs/algorithms.md §0.1) becomes the central pixel.
    average_position : (float, float)
        Position reported as the PSF's average position.
    """

    spatially_constant = True

    def __init__(self, image, average_position=(0.0, 0.0)):
        img = np.array(image, dtype=np.float64)
        if img.ndim != 2 or img.size == 0:
            raise PsfError(f"ImagePsf needs a non-empty 2-D image, got shape {img.shape}")
        if not np.isfinite(img).all():
            raise PsfError("ImagePsf image contains NaN or infinite values")
        ny, nx = img.shape
        side = _odd(max(ny, nx))
        if (ny, nx) != (side, side):
            padded = np.zeros((side, side))
            # Keep afw's centre convention: pixel (W-1)//2 of the input lands on the
            # central pixel of the odd output.
            oy, ox = (side - 1) // 2 - (ny - 1) // 2, (side - 1) // 2 - (nx - 1) // 2
            padded[oy : oy + ny, ox : ox + nx] = img
            img = padded
        s = img.sum()
        if not s > 0:
            raise PsfError(f"ImagePsf image must have a positive sum, got {s}")
        self.image = img / s
        self.average_position = (float(average_position[0]), float(average_position[1]))

    @property
    def size(self) -> int:
        return self.image.shape[0]

    def compute_image(self, x=None, y=None, size=None):
        x, y = self._pos(x, y)
        img = _shift_image(self.image, x - round(x), y - round(y))
        img = _resize_centred(img, self.size if size is None else int(size))
        s = img.sum()
        if not s > 0:
            raise PsfError("ImagePsf: shifted/cropped image has non-positive sum")
        return img / s

    def __repr__(self):
        return f"ImagePsf(size={self.size})"


class GridPsf(Psf):
    """A spatially varying PSF: images on a regular grid of positions, bilinearly interpolated.

    Parameters
    ----------
    images : array, shape (ny, nx, s, s)
        PSF images (each normalized to unit sum) at positions ``(xs[j], ys[i])``.
    xs, ys : 1-D arrays
        Increasing grid coordinates (parent pixels), x = column.

    Notes
    -----
    Outside the grid the nearest edge images are used (no extrapolation).  Interpolating
    images is not interpolating widths: between nodes the narrower image dominates the
    core, so the FWHM midway is slightly below the mean of the nodes' FWHMs.
    """

    def __init__(self, images, xs: Sequence[float], ys: Sequence[float]):
        imgs = np.array(images, dtype=np.float64)
        xs = np.asarray(xs, dtype=np.float64)
        ys = np.asarray(ys, dtype=np.float64)
        if imgs.ndim != 4 or imgs.shape[0] != ys.size or imgs.shape[1] != xs.size:
            raise PsfError(
                f"GridPsf images must have shape (len(ys), len(xs), s, s); got {imgs.shape} for "
                f"{ys.size}x{xs.size} positions"
            )
        if imgs.shape[2] != imgs.shape[3] or imgs.shape[2] % 2 == 0:
            raise PsfError(f"GridPsf images must be odd squares, got {imgs.shape[2:]}")
        if (np.diff(xs) <= 0).any() or (np.diff(ys) <= 0).any():
            raise PsfError("GridPsf xs and ys must be strictly increasing")
        if not np.isfinite(imgs).all():
            raise PsfError("GridPsf images contain NaN or infinite values")
        sums = imgs.sum(axis=(2, 3), keepdims=True)
        if (sums <= 0).any():
            raise PsfError("GridPsf images must have positive sums")
        self.images = imgs / sums
        self.xs, self.ys = xs, ys
        self.average_position = (float(xs.mean()), float(ys.mean()))

    @classmethod
    def from_function(
        cls, make_psf: Callable[[float, float], Psf], xs, ys, size: int | None = None
    ) -> "GridPsf":
        """Realize ``make_psf(x, y).kernel_image()`` on the grid ``xs`` × ``ys``."""
        xs = np.asarray(xs, dtype=np.float64)
        ys = np.asarray(ys, dtype=np.float64)
        first = make_psf(float(xs[0]), float(ys[0]))
        size = first.size if size is None else int(size)
        imgs = np.empty((ys.size, xs.size, size, size))
        for i, yv in enumerate(ys):
            for j, xv in enumerate(xs):
                imgs[i, j] = make_psf(float(xv), float(yv)).kernel_image(
                    float(xv), float(yv), size=size
                )
        return cls(imgs, xs, ys)

    @property
    def size(self) -> int:
        return self.images.shape[2]

    def _interp(self, x: float, y: float) -> np.ndarray:
        def weights(grid, v):
            if grid.size == 1:
                return 0, 0, 0.0
            v = min(max(v, grid[0]), grid[-1])
            i = int(np.clip(np.searchsorted(grid, v) - 1, 0, grid.size - 2))
            t = (v - grid[i]) / (grid[i + 1] - grid[i])
            return i, i + 1, t

        j0, j1, tx = weights(self.xs, x)
        i0, i1, ty = weights(self.ys, y)
        im = self.images
        return (1 - ty) * ((1 - tx) * im[i0, j0] + tx * im[i0, j1]) + ty * (
            (1 - tx) * im[i1, j0] + tx * im[i1, j1]
        )

    def compute_image(self, x=None, y=None, size=None):
        x, y = self._pos(x, y)
        img = _shift_image(self._interp(x, y), x - round(x), y - round(y))
        img = _resize_centred(img, self.size if size is None else int(size))
        s = img.sum()
        if not s > 0:
            raise PsfError("GridPsf: interpolated/shifted image has non-positive sum")
        return img / s

    def __repr__(self):
        return f"GridPsf(grid={self.ys.size}x{self.xs.size}, size={self.size})"


def evaluate_mean_fwhm(psf: Psf, bbox, grid: int = 10, buffer: float = 0.05) -> float:
    """Mean trace-radius FWHM over a ``grid``×``grid`` lattice of the box shrunk by ``buffer``.

    LSST's ``evaluateMeanPsfFwhm`` (docs/algorithms.md §1.2): the fallback when the PSF cannot be
    evaluated at its average position.  ``bbox`` is a :class:`~gpudiff.image.Box`.
    """
    w, h = bbox.width, bbox.height
    xs = np.linspace(bbox.x0 + buffer * w, bbox.x1 - 1 - buffer * w, grid)
    ys = np.linspace(bbox.y0 + buffer * h, bbox.y1 - 1 - buffer * h, grid)
    vals = []
    for yv in ys:
        for xv in xs:
            try:
                vals.append(psf.fwhm(float(xv), float(yv)))
            except PsfError:
                vals.append(np.nan)
    out = float(np.nanmean(vals)) if np.isfinite(vals).any() else float("nan")
    if not math.isfinite(out):
        raise PsfError("could not evaluate the PSF FWHM anywhere on the grid")
    return out

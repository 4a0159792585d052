"""ScaleVarianceTask: rescale a variance plane so it matches the pixel noise
(docs/algorithms.md §6).

meas_algorithms' ``ScaleVarianceTask``.  The variance planes that reach image differencing
(instrument-signature removal, warping, coaddition) are often off by a constant factor;
the difference's variance — and so every detection threshold — inherits the error.  The
task measures that factor robustly, from the inter-quartile range of the sky pixels:

1. a smooth background is fitted and subtracted (temporarily: on a working copy);
2. good pixels have none of ``mask_planes``, a finite value and a finite, positive variance;
   fewer than two → factor 1;
3. **pixel-based**: z = image/√variance, factor = (0.74·IQR(z))²;
4. if that exceeds ``limit``, **image-based**: factor = (0.74·IQR(image))² / median(variance);
   if that also exceeds it, :class:`ExceedsMaxVarianceScaleError`.

The constant is LSST's 0.74, not 1/(2·Φ⁻¹(¾)) = 0.7413: for Gaussian noise the factor is
low by (0.74/0.7413)² ≈ 0.35 %, reproduced on purpose.  There is no lower limit.

Unlike LSST, :meth:`ScaleVarianceTask.run` never modifies its input: it returns the factor;
:meth:`ScaleVarianceTask.apply` returns a rescaled copy.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import numpy as np

from ..backend import Backend, resolve_backend
from ..configfield import option, validate_config
from ..errors import AllMaskedError, ExceedsMaxVarianceScaleError, InvalidInputError
from ..image import Exposure, MaskedImage
from ..ops._host import fetch
from ..ops.background import estimate_background
from ..ops.stats import _quantiles

__all__ = [
    "ExceedsMaxVarianceScaleError",
    "ScaleVarianceBackgroundConfig",
    "ScaleVarianceConfig",
    "ScaleVarianceFactors",
    "ScaleVarianceTask",
]

log = logging.getLogger("gpudiff.tasks.scale_variance")

#: LSST's IQR → σ constant (deliberately not 0.741301109; docs/algorithms.md §6, §13
#: "fidelity traps").
IQR_TO_SIGMA = 0.74

#: meas_algorithms ``ScaleVarianceConfig.maskPlanes`` default.
SCALE_VARIANCE_MASK_PLANES: tuple[str, ...] = (
    "DETECTED",
    "DETECTED_NEGATIVE",
    "BAD",
    "SAT",
    "NO_DATA",
    "INTRP",
)

# afw interpolation styles → gpudiff's background interpolants.  gpudiff has no Akima
# spline; the not-a-knot cubic spline is the closest smooth interpolant (they differ only
# where the bin values have kinks, and the factor is insensitive to such detail).
_ALGORITHMS = {
    "AKIMA_SPLINE": "cubic",
    "CUBIC_SPLINE": "cubic",
    "NATURAL_SPLINE": "cubic",
    "LINEAR": "linear",
    "CONSTANT": "constant",
}


@dataclass(frozen=True)
class ScaleVarianceBackgroundConfig:
    """The background subtask's configuration (LSST ``SubtractBackgroundConfig`` as set by
    ``ScaleVarianceConfig``).

    Attributes
    ----------
    bin_size : int
        Bin size in pixels (LSST ``binSize`` = 32).
    statistic : str
        Per-bin statistic; only ``"MEANCLIP"`` (the default) is implemented.
    algorithm : str
        afw interpolation style: ``"AKIMA_SPLINE"`` (default; computed with a cubic
        spline), ``"CUBIC_SPLINE"``, ``"NATURAL_SPLINE"``, ``"LINEAR"`` or ``"CONSTANT"``.
        With too few bins the order is reduced (afw ``REDUCE_INTERP_ORDER``).
    ignored_pixel_mask : tuple of str or None
        Planes ignored by the bin statistics; ``None`` uses the task's ``mask_planes``
        (as ``ScaleVarianceConfig.setDefaults`` does).
    """

    bin_size: int = option(32, doc="Background bin size in pixels.", min=1)
    statistic: str = option(
        "MEANCLIP",
        doc="Per-bin statistic (only MEANCLIP is implemented).",
        choices=("MEANCLIP",),
        fold_case=True,
    )
    algorithm: str = option(
        "AKIMA_SPLINE",
        doc="afw interpolation style of the bin grid (Akima is computed with a cubic "
        "spline); with too few bins the order is reduced.",
        choices=tuple(_ALGORITHMS),
        fold_case=True,
    )
    ignored_pixel_mask: tuple[str, ...] | None = option(
        None,
        doc="Planes ignored by the bin statistics (None: the task's mask_planes).",
        lsst="ignoredPixelMask",
    )

    def __post_init__(self):
        validate_config(self)


@dataclass(frozen=True)
class ScaleVarianceConfig:
    """Configuration of :class:`ScaleVarianceTask` (docs/algorithms.md §6).

    Attributes
    ----------
    mask_planes : tuple of str
        Pixels with any of these planes are ignored (planes absent from an image's
        definition are skipped).
    limit : float
        Largest acceptable factor; above it the image-based estimate is tried, and above
        that too an error is raised.
    background : ScaleVarianceBackgroundConfig
    max_samples : int or None
        None (LSST): every pixel.  Otherwise the statistics use a regular grid of at most
        this many pixels (every s-th row and column, s = ceil(√(npix / max_samples))), and
        the background bins keep ``bin_size`` samples a side (so they span ``bin_size·s``
        pixels).  The factor is a ratio of quartile widths: 2²⁰ samples pin it to ~0.1 %,
        far below what it is used for (a detection threshold), at 1/s² of the cost.  Not a
        field of LSST's config; CompareWarp uses it for its per-warp rescaling.
    """

    mask_planes: tuple[str, ...] = option(
        SCALE_VARIANCE_MASK_PLANES,
        doc="Pixels with any of these planes are ignored (planes an image lacks are skipped).",
    )
    limit: float = option(
        10.0,
        doc="Largest acceptable factor: above it the image-based estimate is tried, above "
        "that too an error is raised.",
        min=0,
        inclusive_min=False,
    )
    background: ScaleVarianceBackgroundConfig = option(
        doc="The background subtracted (on a working copy) before the statistics.",
        default_factory=ScaleVarianceBackgroundConfig,
    )
    max_samples: int | None = option(
        None,
        doc="Statistics on a regular grid of at most this many pixels (None: every pixel, "
        "as LSST).",
        min=1024,
        gpudiff_only=True,
    )

    def __post_init__(self):
        validate_config(self)


@dataclass(frozen=True)
class ScaleVarianceFactors:
    """Both estimates (LSST ``computeScaleFactors``): NaN where there were < 2 good pixels.

    Attributes
    ----------
    pixel_factor : float
        (0.74·IQR(image/√variance))².
    image_factor : float
        (0.74·IQR(image))² / median(variance).
    n_good : int
        Pixels used.
    """

    pixel_factor: float
    image_factor: float
    n_good: int


class ScaleVarianceTask:
    """Measure the factor by which a variance plane must be multiplied to match the noise.

    Parameters
    ----------
    config : ScaleVarianceConfig, optional
    backend : Backend or str, optional
        Where the work runs; images on another backend are copied there.

    Examples
    --------
    >>> task = ScaleVarianceTask()                                   # doctest: +SKIP
    >>> factor = task.run(exposure.masked_image)                     # doctest: +SKIP
    >>> rescaled, factor = task.apply(exposure.masked_image)         # doctest: +SKIP
    """

    def __init__(
        self, config: ScaleVarianceConfig | None = None, backend: Backend | str | None = None
    ):
        self.config = ScaleVarianceConfig() if config is None else config
        self.backend = resolve_backend(backend)

    # --- helpers -----------------------------------------------------------------------
    def _on_backend(self, mi: MaskedImage | Exposure) -> MaskedImage:
        if isinstance(mi, Exposure):
            mi = mi.masked_image
        if not isinstance(mi, MaskedImage):
            raise InvalidInputError(
                f"ScaleVarianceTask needs a MaskedImage or Exposure, got {type(mi).__name__}"
            )
        # Same backend: use it as is (we only read it); otherwise a copy on ours.
        return mi if mi.backend.name == self.backend.name else mi.to_backend(self.backend)

    def _decimate(self, mi: MaskedImage) -> MaskedImage:
        """Every s-th row and column when ``max_samples`` asks for it (see the config)."""
        cap = self.config.max_samples
        if cap is None or mi.image.size <= cap:
            return mi
        s = math.ceil(math.sqrt(mi.image.size / int(cap)))
        return MaskedImage(
            mi.image[::s, ::s],
            mi.variance[::s, ::s],
            mi.mask[::s, ::s],
            mask_planes=mi.mask_planes,
            backend=self.backend,
        )

    def _background(self, mi: MaskedImage, good, n_good: int | None, *, as_float64=True):
        """The background model (float64 backend array or scalar) to subtract
        (``n_good`` None: not known on the host yet; ``as_float64`` False: a model image
        is returned as estimated, float32, for a caller that casts only its good pixels)."""
        bc = self.config.background
        planes = self.config.mask_planes if bc.ignored_pixel_mask is None else bc.ignored_pixel_mask
        order = _ALGORITHMS[bc.algorithm.upper()]
        if order != "constant":
            try:
                bg = estimate_background(mi, int(bc.bin_size), bad_planes=planes, order=order)
                return bg.astype(np.float64) if as_float64 else bg
            except AllMaskedError:
                # No bin has enough usable pixels (a tiny or mostly masked image): reduce
                # the interpolation order all the way, to one constant level.
                log.debug("no background bin is usable; subtracting a constant level instead")
        # A constant cannot change an inter-quartile range; it only keeps the image
        # centred, so the median of the good pixels is as good as any level.
        if n_good == 0:
            return 0.0
        return _quantiles(self.backend, [mi.image.astype(np.float64)], good, [(0.5,)])[0]

    def _quartiles(self, mi: MaskedImage, good, n_good: int | None):
        """Backend vector (zq1, zq3, q1, q3, median variance) of the good pixels."""
        xp = self.backend.xp
        # The background is subtracted from a float64 working copy (LSST subtracts in place
        # and adds it back; we never touch the input).  The quartiles are order statistics
        # of the good pixels found by selection on the whole arrays under the ``good`` mask:
        # no sort, no boolean-mask compaction (each one a host sync on a device), and the
        # five numbers cross to the host together.
        fr = (0.25, 0.75)  # NumPy's default (linear) percentiles, as LSST
        if not self.backend.is_gpu and xp is np:
            # On the host only the good pixels are worked on, compacted once per plane: the
            # same float64 values in the same order as the whole-image arrays would give
            # them to the selection (the same quartiles), without six whole-image float64
            # temporaries and three compactions.
            bg = self._background(mi, good, n_good, as_float64=False)
            if np.ndim(bg):
                bg = bg[good].astype(np.float64)
            img = mi.image[good].astype(np.float64) - bg
            var = mi.variance[good].astype(np.float64)
            with np.errstate(all="ignore"):
                z = img / np.sqrt(var)
            return _quantiles(self.backend, [z, img, var], None, [fr, fr, (0.5,)])
        bg = self._background(mi, good, n_good)
        img = mi.image.astype(np.float64) - bg
        var = mi.variance.astype(np.float64)
        with np.errstate(all="ignore"):  # bad pixels (var <= 0, NaN) are outside ``good``
            z = img / xp.sqrt(var)
        return _quantiles(self.backend, [z, img, var], good, [fr, fr, (0.5,)])

    def compute_scale_factors(self, masked_image: MaskedImage | Exposure) -> ScaleVarianceFactors:
        """Both estimates of the factor, without checking the limit
        (docs/algorithms.md §6 steps 1–4).

        Parameters
        ----------
        masked_image : MaskedImage or Exposure
            Not modified.

        Returns
        -------
        ScaleVarianceFactors
        """
        mi = self._decimate(self._on_backend(masked_image))
        xp = self.backend.xp
        bm = mi.mask_planes.bitmask_if_present(list(self.config.mask_planes))
        good = (
            ((mi.mask & bm) == 0)
            & xp.isfinite(mi.image)
            & xp.isfinite(mi.variance)
            & (mi.variance > 0)
        )
        # On a device the good-pixel count crosses to the host with the five quartiles
        # (one host sync, not two); fewer than two good pixels then give NaN quartiles,
        # discarded below.  On the CPU the count is known first and such an image skips
        # the statistics.
        n_dev = good.sum() if self.backend.is_gpu else None
        n_good = None if n_dev is not None else int(good.sum())
        if n_good is not None and n_good < 2:
            return ScaleVarianceFactors(float("nan"), float("nan"), n_good)
        try:
            q = self._quartiles(mi, good, n_good)
        except Exception:
            if n_dev is not None and int(n_dev) < 2:  # nothing to measure: as on the CPU
                return ScaleVarianceFactors(float("nan"), float("nan"), int(n_dev))
            raise
        if n_dev is None:
            q = self.backend.asnumpy(q)
        else:
            q, n = fetch(self.backend, q, n_dev)
            n_good = int(n)
            if n_good < 2:
                return ScaleVarianceFactors(float("nan"), float("nan"), n_good)
        zq1, zq3, q1, q3, median_var = (float(v) for v in q)
        pixel_factor = (IQR_TO_SIGMA * (zq3 - zq1)) ** 2
        image_factor = float((IQR_TO_SIGMA * (q3 - q1) / math.sqrt(median_var)) ** 2)
        return ScaleVarianceFactors(pixel_factor, image_factor, n_good)

    # --- API ---------------------------------------------------------------------------
    def run(self, masked_image: MaskedImage | Exposure) -> float:
        """The factor by which the variance plane should be multiplied (docs/algorithms.md §6).

        Parameters
        ----------
        masked_image : MaskedImage or Exposure
            Not modified (LSST rescales in place; use :meth:`apply` for that effect).

        Returns
        -------
        float
            The pixel-based factor, or the image-based one when the pixel-based factor
            exceeds ``limit``; 1.0 with fewer than two good pixels.

        Raises
        ------
        ExceedsMaxVarianceScaleError
            Both factors exceed ``config.limit``.
        """
        return self.select_factor(self.compute_scale_factors(masked_image))

    def select_factor(self, f: ScaleVarianceFactors) -> float:
        """The factor :meth:`run` returns for the estimates ``f`` (docs/algorithms.md §6
        step 4): the pixel-based one, else the image-based one, within ``limit``.

        Parameters
        ----------
        f : ScaleVarianceFactors
            From :meth:`compute_scale_factors` (or
            :func:`~gpudiff.tasks.scale_variance_many.compute_scale_factors_many`).

        Returns
        -------
        float
            1.0 with fewer than two good pixels.

        Raises
        ------
        ExceedsMaxVarianceScaleError
            Both factors exceed ``config.limit``.
        """
        limit = self.config.limit
        if f.n_good < 2:
            log.warning("fewer than 2 good pixels (%d); variance scale factor set to 1.0", f.n_good)
            return 1.0
        if f.pixel_factor <= limit:
            log.info("variance scale factor (pixel-based): %.4g", f.pixel_factor)
            return f.pixel_factor
        log.warning(
            "pixel-based variance factor %.4g exceeds the limit %.4g; trying the image-based one",
            f.pixel_factor,
            limit,
        )
        if f.image_factor <= limit:
            log.info("variance scale factor (image-based): %.4g", f.image_factor)
            return f.image_factor
        raise ExceedsMaxVarianceScaleError(
            f"variance scale factor exceeds the limit {limit:g}: pixel-based {f.pixel_factor:.4g}, "
            f"image-based {f.image_factor:.4g} (is the variance plane in the image's units?)"
        )

    def apply(self, masked_image: MaskedImage | Exposure) -> tuple[MaskedImage, float]:
        """A copy of the image with its variance multiplied by :meth:`run`'s factor.

        Parameters
        ----------
        masked_image : MaskedImage or Exposure
            Not modified.

        Returns
        -------
        scaled : MaskedImage
            On the task's backend.
        factor : float
        """
        mi = self._on_backend(masked_image)
        factor = self.run(mi)
        scaled = MaskedImage(
            mi.image,
            mi.variance * np.float32(factor),
            mi.mask,
            xy0=mi.xy0,
            mask_planes=mi.mask_planes,
            backend=self.backend,
        )
        return scaled, factor

"""The finish of a difference image (LSST's ``finalize``), shared by the subtraction tasks.

:class:`ConvolutionResult` is what either convolution mode of
:class:`~gpudiff.tasks.subtract.AlardLuptonSubtractTask` hands to its ``finalize``, and
:class:`FinalizedDifference` what that returns.  After the convolution and the subtraction
(docs/algorithms.md §4.2 steps 11–13) gpudiff removes a residual background measured on the
difference itself (:func:`residual_background`), marks the pixels that were NO_DATA in the
inputs as no measurement (:func:`no_data_nan`), decorrelates with the defect planes grown
(:func:`decorrelation_config`) and gives the decorrelated difference the PSF the
decorrelation filter makes (:func:`decorrelated_psf`, docs/algorithms.md §5.4).  The
preconvolution task finishes its score image with the same functions.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from ..errors import AllMaskedError
from ..image import Exposure, GridPsf, ImagePsf, MaskedImage
from ..ops.background import BACKGROUND_BAD_PLANES, bin_background
from ..ops.convolution import correlate
from ..psfmatch.spatial import SpatialKernel
from .decorrelate import DecorrelateALKernelConfig
from .subtract_inputs import _source_mask_probe

if TYPE_CHECKING:  # the config lives with the task, which imports this module
    from .subtract import AlardLuptonSubtractConfig

__all__ = [
    "ConvolutionResult",
    "FinalizedDifference",
    "residual_background",
    "no_data_nan",
    "decorrelated_psf",
    "decorrelation_config",
]


@dataclass
class ConvolutionResult:
    """What a convolution mode hands to
    :meth:`~gpudiff.tasks.subtract.AlardLuptonSubtractTask.finalize`.

    Attributes
    ----------
    difference : MaskedImage
        The raw difference on the science box, in the science's flux units: no background
        subtracted, NO_DATA pixels still interpolated, not decorrelated.
    matched_template, matched_science : Exposure
        The two images as subtracted (one of them PSF-matched by the kernel).
    psf : PSF model
        The difference's PSF before decorrelation: the science's (convolveTemplate) or
        the template's (convolveScience).
    mode : str
        "convolveTemplate" or "convolveScience".
    seconds : float
        Time spent convolving and subtracting.
    """

    difference: MaskedImage
    matched_template: Exposure
    matched_science: Exposure
    psf: Any
    mode: str
    seconds: float = 0.0


@dataclass
class FinalizedDifference:
    """The output of :meth:`~gpudiff.tasks.subtract.AlardLuptonSubtractTask.finalize`.

    Attributes
    ----------
    difference : Exposure
        Background-subtracted (``do_subtract_background``), NO_DATA as NaN, decorrelated
        (``do_decorrelation``) with the decorrelated PSF.
    background_model : SpatialKernel or None
        The fitted differential background as LSST returns it (negated under
        convolveScience); None unless subtracted.
    metadata : dict
        ``residual_background_rms`` (when subtracted), ``time_convolution`` (the
        convolution's time plus the background subtraction's) and ``time_decorrelation``.
    """

    difference: Exposure
    background_model: SpatialKernel | None
    metadata: dict = field(default_factory=dict)


#: float64 values per row block of :func:`residual_background`'s host model (256 KiB).
_ROW_BLOCK = 1 << 15


def residual_background(
    mi: MaskedImage, psf, order: int, bin_size: int = 64
) -> tuple[MaskedImage, float]:
    """``mi`` minus a polynomial (total degree ``order``) fitted to the clipped means of
    its source-free bins, and the rms of that polynomial over the image.

    A departure from LSST, part of ``do_subtract_background``: the kernel fit's background
    term is constrained only by the kernel stamps (a dozen on a 1024² field) and absorbs
    the parts of bright stars' wings the kernel cannot match, so it leaves a residual sky
    of a few hundredths of σ (measured −0.05σ in one quadrant of a 1024² raw pair).  The
    difference itself has every sky pixel: sources (> 5σ, grown by 2 FWHM) and defect
    planes are left out, each ``bin_size``² bin gives a 3σ-clipped mean, and the
    polynomial is weighted by the usable pixels of each bin.

    The result holds a new image plane and ``mi``'s own variance and mask arrays (the
    callers hand over a difference of their own and keep only the result).
    """
    xp = mi.backend.xp
    probe = _source_mask_probe(mi, psf)  # only read: no copies of the image planes
    try:
        bins = bin_background(probe, bin_size, bad_planes=BACKGROUND_BAD_PLANES)
    except AllMaskedError:
        return mi, 0.0
    ok = bins.good & np.isfinite(bins.raw)
    n_terms = (order + 1) * (order + 2) // 2
    if int(ok.sum()) < 2 * n_terms:
        return mi, 0.0
    H, W = mi.shape
    yc, xc = np.meshgrid(bins.y_centres, bins.x_centres, indexing="ij")

    def design(u, v):
        return [u**i * v**j for i in range(order + 1) for j in range(order + 1 - i)]

    def norm(c, n):
        return (c - 0.5 * (n - 1)) / max(0.5 * (n - 1), 1.0)

    a = np.stack([t.ravel() for t in design(norm(xc[ok], W), norm(yc[ok], H))], axis=1)
    w = np.sqrt(bins.n_valid[ok].astype(np.float64))
    coef, *_ = np.linalg.lstsq(a * w[:, None], bins.raw[ok] * w, rcond=None)
    u = norm(np.arange(W, dtype=np.float64), W)[None, :]
    v = norm(np.arange(H, dtype=np.float64), H)[:, None]
    if mi.backend.is_gpu:
        # The powers of the row and column coordinates on the host (a few vectors: on a
        # device each is a launch), their products on the device.
        pu = [xp.asarray(u**i) for i in range(order + 1)]
        pv = [xp.asarray(v**j) for j in range(order + 1)]
        terms = [pu[i] * pv[j] for i in range(order + 1) for j in range(order + 1 - i)]
        model = sum(float(c) * t for c, t in zip(coef, terms))
        model = xp.broadcast_to(xp.asarray(model, dtype=np.float64), (H, W))
        image = (mi.image - model).astype(np.float32)
    else:
        # Row blocks: per pixel the same powers, products, sum and float32 difference (the
        # same bits), but each block's temporaries are cache-sized: no (H, W) float64 model
        # and difference (128 MiB each at 4096², 0.5 s with the cast and the rms below).
        image = np.empty((H, W), dtype=np.float32)
        step = max(1, _ROW_BLOCK // max(W, 1))
        for r0 in range(0, H, step):
            terms = design(u, v[r0 : r0 + step])
            block = sum(float(c) * t for c, t in zip(coef, terms))
            np.subtract(
                mi.image[r0 : r0 + step], block, out=image[r0 : r0 + step], casting="same_kind"
            )
    # The grid mean of a product of powers of u and v factorizes: mean(model²) =
    # Σ_ab c_a c_b mean(u^(i_a+i_b)) mean(v^(j_a+j_b)), on the host (no (H, W) pass and,
    # on a device, no host sync); equal to the pixel mean to float64 rounding.
    uh = norm(np.arange(W, dtype=np.float64), W)
    vh = norm(np.arange(H, dtype=np.float64), H)
    ij = [(i, j) for i in range(order + 1) for j in range(order + 1 - i)]
    mu = [np.mean(uh**k) for k in range(2 * order + 1)]
    mv = [np.mean(vh**k) for k in range(2 * order + 1)]
    ms = sum(
        float(ca) * float(cb) * mu[ia + ib] * mv[ja + jb]
        for ca, (ia, ja) in zip(coef, ij)
        for cb, (ib, jb) in zip(coef, ij)
    )
    rms = math.sqrt(max(ms, 0.0))
    # The callers hand over a difference of their own and keep only the result: the new
    # image plane, the variance and mask held as they are (no copies).
    out = MaskedImage._adopt(
        image,
        mi.variance,
        mi.mask,
        xy0=mi.xy0,
        mask_planes=mi.mask_planes,
        backend=mi.backend,
    )
    return out, rms


def no_data_nan(mi: MaskedImage) -> MaskedImage:
    """NO_DATA pixels as NaN image / +inf variance.

    The convention of :func:`~gpudiff.tasks.masks.mask_non_finite`: the inputs' NO_DATA
    pixels were interpolated so that no convolution spreads garbage, but a difference there
    is no measurement.

    Parameters
    ----------
    mi : MaskedImage

    Returns
    -------
    MaskedImage
        ``mi`` itself when it has no NO_DATA pixel.
    """
    xp = mi.backend.xp
    nd = mi.mask_planes.bitmask_if_present("NO_DATA")
    if not nd:
        return mi
    bad = (mi.mask & nd) != 0
    if not mi.backend.is_gpu and not bool(bad.any()):
        return mi
    # On a device no emptiness test (a host sync): without a NO_DATA pixel the two fills
    # are identities.  Fresh image and variance planes there; the mask is the input's,
    # unchanged (the constructor's copies are skipped).
    make = MaskedImage._adopt if mi.backend.is_gpu else MaskedImage
    return make(
        xp.where(bad, xp.float32(np.nan), mi.image),
        xp.where(bad, xp.float32(np.inf), mi.variance),
        mi.mask,
        xy0=mi.xy0,
        mask_planes=mi.mask_planes,
        backend=mi.backend,
    )


def decorrelated_psf(psf, correction_kernel: np.ndarray):
    """The PSF of the decorrelated difference: PSF ⊗ correction filter, unit sum.

    Departure from current LSST (docs/algorithms.md §5.4, where the update is disabled pending
    DM-47461): decorrelation sharpens point sources, and PSF photometry with the
    undecorrelated PSF then overestimates fluxes (measured +13 % for equal template and
    science depths).  The filter is real and even, so correlating with it is convolving.
    A spatially varying :class:`~gpudiff.image.GridPsf` stays one (each node filtered);
    any other model becomes an :class:`~gpudiff.image.ImagePsf` at its average position.
    """
    h = correction_kernel.shape[0] // 2

    def filt(img):
        new = np.asarray(
            correlate(
                np.pad(np.asarray(img, np.float64), h), correction_kernel, "numpy", dtype=np.float64
            )
        )
        return new / new.sum()

    if isinstance(psf, GridPsf):
        imgs = np.array([[filt(im) for im in row] for row in psf.images])
        return GridPsf(imgs, psf.xs, psf.ys)
    return ImagePsf(filt(psf.kernel_image()), average_position=psf.average_position)


def decorrelation_config(config: AlardLuptonSubtractConfig) -> DecorrelateALKernelConfig:
    """Decorrelation that grows the defect planes by its filter's footprint (so that no
    unflagged pixel holds what the filter spread from a defect).

    Parameters
    ----------
    config : AlardLuptonSubtractConfig
        Its ``interpolate_mask_planes`` and ``bad_mask_planes`` (with INTRP and
        SAT_TEMPLATE) are grown.

    Returns
    -------
    DecorrelateALKernelConfig
    """
    # EDGE is left out: its pixels hold copied data, not defects, and the tasks size
    # their EDGE frames themselves (the preconvolution's frame was measured).
    planes = tuple(
        p
        for p in dict.fromkeys(
            (*config.interpolate_mask_planes, *config.bad_mask_planes, "INTRP", "SAT_TEMPLATE")
        )
        if p != "EDGE"
    )
    return DecorrelateALKernelConfig(grow_mask_planes=planes, grow_skip_bad_fills=True)

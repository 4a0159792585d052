"""The legacy per-pair background matcher (docs/algorithms.md §9.3: Gen2
``MatchBackgroundsTask.matchBackgrounds``).

``match_background_pair(reference, science)`` bins the difference reference − science
(afw's nearly equal bins, ceil(W / bin_size) × ceil(H / bin_size)), and models it either
by interpolating the bin grid (Akima spline by default) or by an inverse-variance
weighted Chebyshev polynomial fit to the bin means; the model is added to the science
image.  It reports the §9.3 diagnostics: ``fit_rms`` (bin means − model at the bin
centres), ``matched_mse`` (mean square of the difference after matching) and
``diff_im_var`` (clipped mean of the difference's variance).  The binning and
interpolation are the tract version's (:mod:`gpudiff.ops.window_stats`,
:func:`gpudiff.ops.background.evaluate_bin_grid`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..backend import Backend, resolve_backend
from ..configfield import option, validate_config
from ..errors import InvalidInputError, NoOverlapError, ShapeMismatchError
from ..image import Box, Exposure, MaskedImage
from ..ops.background import _bin_edges, evaluate_bin_grid, fill_bad_bins
from ..ops.window_stats import window_statistics
from .tract_background import INTERPOLATION_STYLES, chebyshev_design

__all__ = ["BackgroundMatchPairConfig", "BackgroundMatchPairResult", "match_background_pair"]

_UNDERSAMPLE = ("THROW_EXCEPTION", "REDUCE_INTERP_ORDER", "INCREASE_NXNYSAMPLE")


@dataclass(frozen=True)
class BackgroundMatchPairConfig:
    """The legacy ``MatchBackgroundsConfig`` (docs/algorithms.md §9.3; Gen2, 2036049f).

    Attributes
    ----------
    use_polynomial : bool
        Fit a Chebyshev polynomial to the bin means instead of interpolating them.
    order : int
        Polynomial order (total degree, afw ``Chebyshev1Function2D``), 8.
    bad_mask_planes : tuple of str
        NO_DATA, DETECTED, DETECTED_NEGATIVE, SAT, BAD, INTRP, CR.
    grid_statistic : {"MEAN", "MEANCLIP"}
        Bin statistic (legacy default MEAN).
    undersample_style : {"REDUCE_INTERP_ORDER", "THROW_EXCEPTION", "INCREASE_NXNYSAMPLE"}
        Too few bins for the polynomial order / interpolation: lower the order, raise, or
        (polynomial only) use smaller bins until there are enough.
    bin_size : int
        256.
    interp_style : {"AKIMA_SPLINE", "CUBIC_SPLINE", "LINEAR"}
    num_sigma_clip, num_iter : float, int
        3, 2 (MEANCLIP only).
    approx_weighting : bool
        Weight the polynomial fit by 1/σ²_bin (σ_bin = stdev/√N).
    grid_stdev_epsilon : float
        Floor of the bin stdev; with every bin at the floor the fit is unweighted.
    """

    use_polynomial: bool = option(
        False, doc="Fit a Chebyshev polynomial to the bin means instead of interpolating them."
    )
    order: int = option(8, doc="Total degree of the Chebyshev polynomial (use_polynomial).", min=0)
    bad_mask_planes: tuple[str, ...] = option(
        ("NO_DATA", "DETECTED", "DETECTED_NEGATIVE", "SAT", "BAD", "INTRP", "CR"),
        doc="Pixels with any of these planes are left out of the bins.",
    )
    grid_statistic: str = option(
        "MEAN", doc="Statistic of each bin.", choices=("MEAN", "MEANCLIP"), fold_case=True
    )
    undersample_style: str = option(
        "REDUCE_INTERP_ORDER",
        doc="Too few bins for the order / interpolation: lower the order, raise, or "
        "(polynomial only) use smaller bins until there are enough.",
        choices=_UNDERSAMPLE,
        fold_case=True,
    )
    bin_size: int = option(256, doc="Bin size in pixels.", min=1)
    interp_style: str = option(
        "AKIMA_SPLINE",
        doc="Interpolation of the bin grid (without use_polynomial).",
        choices=tuple(INTERPOLATION_STYLES),
        fold_case=True,
    )
    num_sigma_clip: float = option(3.0, doc="Clipping threshold in sigmas of MEANCLIP.")
    num_iter: int = option(2, doc="Clipping passes of MEANCLIP.", min=1)
    approx_weighting: bool = option(
        True, doc="Weight the polynomial fit by 1/sigma_bin^2 (sigma_bin = stdev/sqrt(N))."
    )
    grid_stdev_epsilon: float = option(
        1e-8,
        doc="Floor of the bin stdev in the weights; with every bin at the floor the fit is "
        "unweighted.",
    )

    def __post_init__(self):
        validate_config(self)


@dataclass
class BackgroundMatchPairResult:
    """LSST's ``Struct(backgroundModel, fitRMS, matchedMSE, diffImVar, isReference)`` plus
    the matched science image.

    Attributes
    ----------
    background_model : array (H, W), float32
        Added to the science image.
    matched : Exposure or MaskedImage
        The science with the model added (same type as the input).
    fit_rms, matched_mse, diff_im_var : float
    is_reference : bool
        Always False here (LSST gives the reference fit_rms 0 and None for the rest).
    order : int or None
        The polynomial order actually used (after REDUCE_INTERP_ORDER), None for splines.
    bin_size : int
        The bin size actually used (after INCREASE_NXNYSAMPLE).
    """

    background_model: Any
    matched: Any
    fit_rms: float
    matched_mse: float
    diff_im_var: float
    is_reference: bool = False
    order: int | None = None
    bin_size: int = 0


def _as_mi(x: Any, what: str) -> MaskedImage:
    if isinstance(x, Exposure):
        return x.masked_image
    if isinstance(x, MaskedImage):
        return x
    raise InvalidInputError(f"{what} must be an Exposure or MaskedImage, got {type(x).__name__}")


def _bins(be, diff, good, shape, bin_size, cfg):
    H, W = shape
    ye, xe = _bin_edges(H, bin_size), _bin_edges(W, bin_size)
    st = window_statistics(
        diff,
        good,
        ye[:-1],
        xe[:-1],
        (np.diff(ye), np.diff(xe)),
        statistic=cfg.grid_statistic,
        nsigma=cfg.num_sigma_clip,
        niter=cfg.num_iter,
        backend=be,
    )
    yc, xc = 0.5 * (ye[:-1] + ye[1:] - 1), 0.5 * (xe[:-1] + xe[1:] - 1)
    ok = np.isfinite(st["mean"]) & (st["n_point"] >= 2)
    return st, ok, yc, xc


def match_background_pair(
    reference: Exposure | MaskedImage,
    science: Exposure | MaskedImage,
    config: BackgroundMatchPairConfig | None = None,
    backend: Backend | str | None = None,
) -> BackgroundMatchPairResult:
    """Match the background of ``science`` to ``reference`` (LSST legacy ``matchBackgrounds``).

    Parameters
    ----------
    reference, science : Exposure or MaskedImage
        Same shape; neither is modified.
    config : BackgroundMatchPairConfig, optional
    backend : Backend or str, optional
        Default: the science image's backend.

    Returns
    -------
    BackgroundMatchPairResult

    Raises
    ------
    ShapeMismatchError
        The images differ in size.  (LSST raises RuntimeError; a shape mismatch is bad
        input, so gpudiff raises its ValueError-derived ShapeMismatchError, as everywhere.)
    InvalidInputError
        Polynomial mode with the short side < ``bin_size``, or ``order`` above the number
        of bins along the short side − 1; too few bins with data for the order under
        THROW_EXCEPTION (or for the spline under THROW_EXCEPTION).
    NoOverlapError
        No bin has usable pixels in both images.
    """
    cfg = BackgroundMatchPairConfig() if config is None else config
    ref_mi, sci_mi = _as_mi(reference, "reference"), _as_mi(science, "science")
    be = resolve_backend(backend if backend is not None else sci_mi.backend)
    if ref_mi.shape != sci_mi.shape:
        raise ShapeMismatchError(
            f"reference is {ref_mi.shape[1]}x{ref_mi.shape[0]} but science is "
            f"{sci_mi.shape[1]}x{sci_mi.shape[0]}; background matching needs equal dimensions"
        )
    H, W = sci_mi.shape
    short = min(H, W)
    bin_size, order = int(cfg.bin_size), int(cfg.order)
    if cfg.use_polynomial:
        if short < bin_size:
            raise InvalidInputError(
                f"bin_size {bin_size} is larger than the image's short side {short} "
                "(polynomial background matching)"
            )
        npoints = -(-short // bin_size)
        if order > npoints - 1:
            raise InvalidInputError(
                f"order {order} needs more than the {npoints} bins of {bin_size} px along the "
                f"short side ({short} px); use order <= {npoints - 1} or smaller bins"
            )
    planes = list(cfg.bad_mask_planes)
    if ref_mi.backend.name != be.name:
        ref_mi = ref_mi.to_backend(be)
    if sci_mi.backend.name != be.name:
        sci_mi = sci_mi.to_backend(be)
    diff = ref_mi.image - sci_mi.image
    good = ref_mi.good_pixels(planes) & sci_mi.good_pixels(planes)
    st, ok, yc, xc = _bins(be, diff, good, (H, W), bin_size, cfg)
    if not ok.any():
        raise NoOverlapError(
            "no bin has usable pixels in both the reference and the science image; nothing to match"
        )
    used_order = None
    if cfg.use_polynomial:
        while True:
            n_min = min(np.unique(np.nonzero(ok)[1]).size, np.unique(np.nonzero(ok)[0]).size)
            if order < n_min:
                break
            if cfg.undersample_style == "THROW_EXCEPTION":
                raise InvalidInputError(
                    f"the science image covers only {n_min} bins of {bin_size} px along an "
                    f"axis: too few for order {order} (undersample_style THROW_EXCEPTION)"
                )
            if cfg.undersample_style == "REDUCE_INTERP_ORDER":
                order = n_min - 1
                break
            # INCREASE_NXNYSAMPLE: smaller bins (LSST: minPoints·binSize // (order + 1))
            new = (n_min * bin_size) // (order + 1)
            if new < 2 or new >= bin_size:
                raise InvalidInputError(
                    f"cannot shrink the {bin_size} px bins enough for order {order}"
                )
            bin_size = new
            st, ok, yc, xc = _bins(be, diff, good, (H, W), bin_size, cfg)
        used_order = order
        yy, xx = np.meshgrid(yc, xc, indexing="ij")
        box = Box(0, 0, W, H)
        a = chebyshev_design(xx[ok], yy[ok], order, box)
        z = st["mean"][ok]
        sd = np.maximum(np.sqrt(np.nan_to_num(st["variance"][ok], nan=0.0)), cfg.grid_stdev_epsilon)
        weighted = cfg.approx_weighting and not (sd <= cfg.grid_stdev_epsilon).all()
        w = (
            np.sqrt(st["n_point"][ok]) / sd if weighted else np.ones(z.size)
        )  # 1/σ_bin, σ_bin = sd/√N
        coef, *_ = np.linalg.lstsq(a * w[:, None], z * w, rcond=None)
        fit_at_bins = a @ coef
        # Separable full-resolution evaluation: Σ c_ij T_i(x') T_j(y') = Ty · C · Txᵀ.
        cmat = np.zeros((order + 1, order + 1))
        k = 0
        for d in range(order + 1):
            for j in range(d + 1):
                cmat[j, d - j] = coef[k]
                k += 1
        xs = (np.arange(W) - 0.5 * (W - 1)) * 2.0 / W
        ys = (np.arange(H) - 0.5 * (H - 1)) * 2.0 / H
        ty = np.polynomial.chebyshev.chebvander(ys, order)
        tx = np.polynomial.chebyshev.chebvander(xs, order)
        model = (be.asarray(ty @ cmat) @ be.asarray(tx.T)).astype(np.float32)
        fit_rms = float(np.sqrt(np.mean((z - fit_at_bins) ** 2)))
    else:
        grid = fill_bad_bins(
            st["mean"], ok, yc, xc, "akima" if cfg.interp_style == "AKIMA_SPLINE" else "linear"
        )
        interp = INTERPOLATION_STYLES[cfg.interp_style]
        undersample = (
            "THROW_EXCEPTION"
            if cfg.undersample_style == "THROW_EXCEPTION"
            else "REDUCE_INTERP_ORDER"
        )
        model = evaluate_bin_grid(
            grid, yc, xc, np.arange(H), np.arange(W), interp, "linear", undersample, be
        )
        at = be.asnumpy(evaluate_bin_grid(grid, yc, xc, yc, xc, interp, "linear", undersample, be))
        fit_rms = float(np.sqrt(np.mean((st["mean"] - at)[ok] ** 2)))
    matched_mi = MaskedImage(
        sci_mi.image + model,
        sci_mi.variance,
        sci_mi.mask,
        xy0=sci_mi.xy0,
        mask_planes=sci_mi.mask_planes,
        backend=be,
    )
    matched = (
        matched_mi
        if isinstance(science, MaskedImage)
        else Exposure(
            matched_mi,
            psf=science.psf,
            wcs=science.wcs,
            photo_calib=science.photo_calib,
            metadata=science.metadata,
        )
    )
    # §9.3 diagnostics: diffImVar = MEANCLIP of the difference variance; matchedMSE =
    # MEANSQUARE of the difference after matching (both over the and-masked pixels).
    var = ref_mi.variance + sci_mi.variance
    vs = window_statistics(
        var,
        good,
        [0],
        [0],
        (H, W),
        statistic="MEANCLIP",
        nsigma=cfg.num_sigma_clip,
        niter=cfg.num_iter,
        backend=be,
    )
    resid = be.xp.where(good, diff - model, 0).astype(np.float64)
    n = int(good.sum())
    mse = float((resid * resid).sum()) / n if n else math.nan
    return BackgroundMatchPairResult(
        model, matched, fit_rms, mse, float(vs["mean"][0, 0]), False, used_order, bin_size
    )

"""The kernel sum checked against the kernel stars' photometry (issue 14).

A PSF-matching kernel must scale fluxes by the photometric ratio of the two images.  A
kernel fitted on faint candidates can pass every residual test and still scale by 0.8,
biasing every difference flux; :func:`kernel_star_flux_ratio` measures the ratio from the
candidates' aperture fluxes and :func:`check_kernel_sum` compares the kernel sum with it.
:func:`gpudiff.psfmatch.fit.fit_spatial_kernel` runs both and records the outcome in
:class:`~gpudiff.psfmatch.fit.KernelFit`.
"""

from __future__ import annotations

import logging

import numpy as np

from ..backend import Backend
from ..ops._host import fetch
from .candidates import KernelCandidates
from .spatial import SpatialKernel

__all__ = ["KERNEL_SUM_TOLERANCE", "check_kernel_sum", "kernel_star_flux_ratio"]

# The fit's logger: these messages were the fit's before they got a module of their own.
log = logging.getLogger("gpudiff.psfmatch")

#: Largest relative disagreement tolerated between the kernel sum and the kernel stars'
#: photometric ratio (issue 14: a kernel that scales fluxes by 0.8 passes every residual
#: test when its candidates are faint, but biases every difference flux).
KERNEL_SUM_TOLERANCE = 0.02


_APERTURE_FRACTION = 0.5
_RATIO_MIN_SNR = 20.0
_RATIO_MIN_STARS = 3
_MAD_TO_SIGMA = 1.4826


def kernel_star_flux_ratio(
    backend: Backend, cands: KernelCandidates, which: np.ndarray, also: tuple = ()
) -> tuple:
    """Aperture-flux ratio reference/convolved of the candidates ``which``, and its error.

    With ``also`` (backend arrays), their host copies come back as a third item, fetched
    in the same transfer (one host sync for both).

    The aperture is a circle of radius ``_APERTURE_FRACTION`` × kernel_size (the kernel
    spans ≥ 6 FWHM of the matched PSF, so ≥ 3 FWHM: the flux of both PSFs; a larger
    aperture in a crowded field adds neighbours' noise), the local sky the median of the
    stamp's 2-px border, in each image separately (a differential background does not
    enter the ratio).  NaN when fewer than 3 candidates have an aperture S/N ≥ 20 in
    both images (the check is then not made).
    """
    if which.size == 0:
        nan = (float("nan"), float("nan"))
        return nan + (tuple(fetch(backend, *also)),) if also else nan
    S = int(cands.science.shape[-1])  # ModelPsfMatch stamps are PSF-sized, not 2k+1
    o = np.arange(S)
    edge = np.minimum(o, S - 1 - o)
    # The sky from the median of the stamp's 2-px border.
    ring = np.minimum(edge[:, None], edge[None, :]) < 2
    h = S // 2
    ap = np.hypot(*np.meshgrid(o - h, o - h)) <= _APERTURE_FRACTION * h
    xp = backend.xp
    # The sums and sky medians are taken where the stamps are, and only four numbers per
    # star cross to the host, in one transfer (the stamps themselves, float64, were 58 MB
    # at 4096²).  Each takes its candidates' ring or aperture pixels in one gather (a host
    # index: the same pixels in the same order as a boolean selection, without its sync).
    sel = xp.asarray(which)[:, None]
    ring_i, ap_i = (xp.asarray(np.flatnonzero(m.ravel())) for m in (ring, ap))

    def pixels(stack, idx):
        return stack.reshape(stack.shape[0], -1)[sel, idx[None, :]]

    dev = []
    for st, vst in ((cands.science, cands.science_var), (cands.template, cands.template_var)):
        sky = xp.median(pixels(st, ring_i), axis=1)
        dev += [(pixels(st, ap_i) - sky[:, None]).sum(axis=1), pixels(vst, ap_i).sum(axis=1)]
    fr, vr, fc, vc, *extra = fetch(backend, *dev, *also)
    ratio = _ratio(fr, vr, fc, vc)
    return ratio + (tuple(extra),) if also else ratio


def _ratio(fr, vr, fc, vc) -> tuple[float, float]:
    """The median ratio and its error from the candidates' aperture sums (host)."""
    # Only stars whose aperture flux is measured to S/N ≥ 20 in both images: fainter
    # candidates (a deep field's S/N-10 compact sources) measure the ratio to no better than
    # ±10 % each.  The median of the per-star ratios, so that one variable star or one
    # candidate on a galaxy's halo (a biased local sky) does not move it: hence ≥ 3 stars.
    with np.errstate(divide="ignore", invalid="ignore"):
        ok = (
            np.isfinite(fr)
            & np.isfinite(fc)
            & (vr > 0)
            & (vc > 0)
            & (fc > _RATIO_MIN_SNR * np.sqrt(vc))
            & (fr > _RATIO_MIN_SNR * np.sqrt(vr))
        )
        r = fr[ok] / fc[ok]
        e = np.abs(r) * np.sqrt(vr[ok] / fr[ok] ** 2 + vc[ok] / fc[ok] ** 2)
    if r.size < _RATIO_MIN_STARS:
        return float("nan"), float("nan")
    med = float(np.median(r))
    # Standard error of a median (1.2533 σ/√n), σ the larger of the ratios' MAD scatter
    # and their own measurement errors.
    sig = max(_MAD_TO_SIGMA * float(np.median(np.abs(r - med))), float(np.median(e)))
    return med, 1.2533 * sig / np.sqrt(r.size)


def check_kernel_sum(
    kernel: SpatialKernel,
    cands: KernelCandidates,
    which: np.ndarray,
    ratio: float,
    ratio_err: float,
) -> bool:
    """Whether the kernel sum agrees with the kernel stars' photometric ratio.

    The kernel sum (evaluated at the candidates and averaged) must match the median
    aperture-flux ratio within ``KERNEL_SUM_TOLERANCE`` (2 %).  A disagreement also
    within 3 standard errors of the ratio is not evidence of a bad kernel (a few faint
    stars measure the ratio to no better than that) and passes; otherwise a warning is
    logged and False returned (the caller records it as a failed quality check).
    """
    if not np.isfinite(ratio) or ratio <= 0:
        log.info(
            "kernel-sum check not made: fewer than %d kernel candidates with an aperture "
            "S/N >= %g in both images",
            _RATIO_MIN_STARS,
            _RATIO_MIN_SNR,
        )
        return True
    ks = float(
        np.mean(
            [kernel.kernel_sum(float(x), float(y)) for x, y in zip(cands.x[which], cands.y[which])]
        )
    )
    rel = abs(ks / ratio - 1.0)
    noise = 3.0 * ratio_err / ratio if np.isfinite(ratio_err) else 0.0
    if rel > KERNEL_SUM_TOLERANCE and rel > noise:
        log.warning(
            "kernel sum %.4f disagrees with the kernel stars' flux ratio %.4f ± %.4f "
            "(%.1f %% > %.0f %%): the kernel does not preserve the photometry",
            ks,
            ratio,
            ratio_err,
            100 * rel,
            100 * KERNEL_SUM_TOLERANCE,
        )
        return False
    return True

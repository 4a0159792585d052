"""DecorrelateALKernelTask: undo the pixel correlation that PSF matching puts in a difference.

ip_diffim's ``DecorrelateALKernelTask`` (docs/algorithms.md §5).  Convolving the template with the
matching kernel κ correlates its noise, so the difference D = S − T ⊗ κ has the noise
power spectrum σ_S² + σ_T²·|κ̂(k)|², not white.  Multiplying D̂ by

    corr(k) = sqrt( (σ_S² + σ_T²·kSum²) / (σ_S² + σ_T²·|κ̂(k)|²) )

whitens it while keeping the flux scale (corr(0) = 1).  Convolving the science instead
swaps the roles of σ_S² and σ_T² (§5.2); for a score (preconvolved) difference the filter
is the square-root-free form of §5.3.  The variance plane is rebuilt from the **input**
variance planes (the difference's own plane is already correlated and is discarded).

Everything follows the LSST code as docs/algorithms.md describes it, with two implementation
choices that change no result:

- The FFT size is LSST's ``computeCommonShape`` (the two largest shapes summed, minus one,
  rounded up to even), but real FFTs are used: corr is real and even and every filtered
  signal is real, so ``rfft2``/``irfft2`` give the same numbers for half the work.
- LSST wraps each padded array so that its centre lands on pixel [0, 0]; for the image
  and the variance planes that is a circular shift before and after a circular
  convolution, which cancels, so they are zero-padded at the end instead.  The kernels
  are wrapped as LSST does (index K//2 → [0, 0]), which fixes the phase of the
  full-propagation variance kernels.
"""

from __future__ import annotations

import copy
import logging
import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..backend import Backend, resolve_backend
from ..backend.threads import run_concurrently
from ..configfield import option, validate_config
from ..errors import (
    AllMaskedError,
    InvalidInputError,
    InvalidVarianceError,
    PsfError,
    ShapeMismatchError,
)
from ..image import Exposure, MaskedImage
from ..image.psf import Psf
from ..ops._host import fetch
from ..ops.stats import image_statistics
from .masks import bad_fills

__all__ = ["DecorrelateALKernelConfig", "DecorrelateALKernelTask", "DecorrelationResult"]

log = logging.getLogger("gpudiff.tasks.decorrelate")

#: float64 values per row block of the host variance-plane sum (256 KiB).
_ROW_BLOCK = 1 << 15

#: ip_diffim ``DecorrelateALKernelConfig.ignoreMaskPlanes`` default.
DECORRELATION_IGNORE_MASK_PLANES: tuple[str, ...] = (
    "INTRP",
    "EDGE",
    "DETECTED",
    "SAT",
    "CR",
    "BAD",
    "NO_DATA",
    "DETECTED_NEGATIVE",
)


@dataclass(frozen=True)
class DecorrelateALKernelConfig:
    """Configuration of :class:`DecorrelateALKernelTask` (docs/algorithms.md §5).

    Attributes
    ----------
    ignore_mask_planes : tuple of str
        The and-mask of the clipped variance means σ_S², σ_T² (MEANCLIP, 3σ, 3 passes).
    complete_var_plane_propagation : bool
        False (default): var_D = var_S·w1 + var_T·w2 with w = mean |filter|² (§5.1).
        True: var_D = var_S ⊗ c1² + var_T ⊗ c2² with the image-space filters c1, c2.
    grow_mask_planes : tuple of str
        Planes of the difference's mask OR-dilated by the footprint of the correction
        filter (its pixels where abs(c) ≥ ``grow_mask_threshold``·max abs(c)): the filter
        spreads whatever a defect left behind that far.  Empty (default, as LSST, which
        leaves the mask alone); the subtraction tasks pass their defect planes.
    grow_mask_threshold : float
        See ``grow_mask_planes``; in (0, 1].
    grow_skip_bad_fills : bool
        Filled detector defects (BAD and INTRP; not CR, SAT, NO_DATA) are not grown.
    """

    ignore_mask_planes: tuple[str, ...] = option(
        DECORRELATION_IGNORE_MASK_PLANES,
        doc="Pixels with these planes are left out of the clipped variance means of the "
        "science and the template.",
    )
    complete_var_plane_propagation: bool = option(
        False,
        doc="Propagate the variance planes through the squared correction filters (True) "
        "instead of scaling them by the filters' mean squares (False).",
    )
    grow_mask_planes: tuple[str, ...] = option(
        (),
        doc="Planes of the difference's mask dilated by the correction filter's footprint "
        "(empty: the mask is left alone, as LSST).",
        gpudiff_only=True,
    )
    grow_skip_bad_fills: bool = option(
        False,
        doc="Do not grow the filled detector defects (BAD and INTRP, no CR/SAT/NO_DATA) "
        "by the filter's footprint (they keep their bits at their pixels).",
        gpudiff_only=True,
    )
    grow_mask_threshold: float = option(
        0.01,
        doc="The filter's footprint for grow_mask_planes: pixels where |c| >= this x max |c|.",
        min=0,
        max=1,
        inclusive_min=False,
        gpudiff_only=True,
    )

    def __post_init__(self):
        validate_config(self)


@dataclass
class DecorrelationResult:
    """What :class:`DecorrelateALKernelTask` returns (LSST ``Struct`` names, snake_case).

    Attributes
    ----------
    corrected_exposure : Exposure
        The decorrelated difference (or score): a new exposure, inputs untouched.
    correction_kernel : numpy.ndarray or None
        The image-space correction filter IFFT(corr), a centred odd float64 cut-out
        (side 2·max(kernel sides)+1); its full sum is corr(0) = 1.  ``None`` when the
        correction was skipped.
    svar, tvar : float
        MEANCLIP of the science and template variance planes.
    variance_weights : (float, float) or None
        (w1, w2) of the default variance estimate.
    fft_shape : (int, int) or None
        The common frequency-space shape.
    kernel_sum : float
        Σκ of the matching kernel at the evaluation position.
    """

    corrected_exposure: Exposure
    correction_kernel: np.ndarray | None = None
    svar: float = float("nan")
    tvar: float = float("nan")
    variance_weights: tuple[float, float] | None = None
    fft_shape: tuple[int, int] | None = None
    kernel_sum: float = float("nan")


def common_shape(*shapes: tuple[int, int]) -> tuple[int, int]:
    """LSST ``computeCommonShape``: per axis N1 + N2 − 1 of the two largest, rounded up to even."""
    s = np.sort(np.array(shapes, dtype=np.int64), axis=0)
    n = s[-2:].sum(axis=0) - 1 if len(shapes) > 1 else s[0]
    n = n + (n % 2)
    return int(n[0]), int(n[1])


def _wrap_kernel(xp: Any, k: Any, shape: tuple[int, int]) -> Any:
    """Zero-pad ``k`` to ``shape`` with its pixel (kh//2, kw//2) on [0, 0] (LSST
    padCenterOriginArray)."""
    out = xp.zeros(shape, dtype=np.float64)
    kh, kw = k.shape
    out[:kh, :kw] = k
    return xp.roll(out, (-(kh // 2), -(kw // 2)), axis=(0, 1))


def _kernel_array(kernel: Any, x: float, y: float, name: str) -> np.ndarray:
    """A host float64 2-D kernel image from a SpatialKernel/Psf-like object or an array."""
    if hasattr(kernel, "kernel_image"):
        arr = kernel.kernel_image(x, y)
    else:
        arr = kernel
    if hasattr(arr, "__cuda_array_interface__"):
        arr = arr.get()
    arr = np.array(arr, dtype=np.float64)
    if arr.ndim != 2 or 0 in arr.shape:
        raise InvalidInputError(f"{name} must be a non-empty 2-D kernel, got shape {arr.shape}")
    if not np.isfinite(arr).all():
        raise InvalidInputError(f"{name} contains NaN or infinite values")
    return arr


class DecorrelateALKernelTask:
    """Decorrelate an Alard–Lupton difference (or score) image (docs/algorithms.md §5).

    Parameters
    ----------
    config : DecorrelateALKernelConfig, optional
    backend : Backend or str, optional
        Where the FFTs run; inputs on another backend are copied there.

    Examples
    --------
    >>> res = DecorrelateALKernelTask().run(science, template, difference, kernel)  # doctest: +SKIP
    >>> res.corrected_exposure.variance  # doctest: +SKIP
    """

    def __init__(
        self, config: DecorrelateALKernelConfig | None = None, backend: Backend | str | None = None
    ):
        self.config = DecorrelateALKernelConfig() if config is None else config
        self.backend = resolve_backend(backend)

    # --- pieces ------------------------------------------------------------------------
    def compute_variance_mean(self, mi: MaskedImage) -> float:
        """MEANCLIP (3σ, 3 passes) of the variance plane over pixels without an ignored
        plane; NaN when no pixel is usable (afw returns NaN there)."""
        try:
            return image_statistics(
                mi,
                bad_planes=self.config.ignore_mask_planes,
                use_variance=True,
                backend=self.backend,
            )["mean"]
        except AllMaskedError:
            return float("nan")

    def _variance_means(self, *mis: MaskedImage) -> list[float]:
        """:meth:`compute_variance_mean` of images of one shape, as the columns of one
        ``clipped_columns`` launch whose four results per image cross in one transfer
        (the device path of :func:`~gpudiff.ops.stats.image_statistics`, per column: the
        same pixels, the same clip; NaN where no pixel is usable)."""
        from ..ops.selection import _clip_columns

        be = self.backend
        xp = be.xp
        planes = list(self.config.ignore_mask_planes)
        # image_statistics(use_variance=True)'s sample: finite variances without a plane.
        good = [
            ((mi.mask & mi.mask_planes.bitmask_if_present(planes)) == 0) & xp.isfinite(mi.variance)
            for mi in mis
        ]
        data = xp.stack([mi.variance.reshape(-1) for mi in mis])
        ok = xp.stack([g.reshape(-1) for g in good])
        # (N, B) views of the (B, N) stacks: each column read contiguously on a device.
        mean, _, _, n_valid = _clip_columns(
            be, data.T, ok.T, 3.0, 3, want_var=False, good_is_finite=True
        )
        m, n = fetch(be, mean, n_valid)
        return [float(a) if int(k) > 0 else float("nan") for a, k in zip(m, n)]

    def _mi(self, exp: Exposure, name: str) -> MaskedImage:
        if not isinstance(exp, Exposure):
            raise InvalidInputError(f"{name} must be an Exposure, got {type(exp).__name__}")
        mi = exp.masked_image
        return mi if mi.backend.name == self.backend.name else mi.to_backend(self.backend)

    def _rfft(self, a: Any, shape: tuple[int, int]) -> Any:
        return self.backend.fft.rfft2(a, s=shape, **self.backend.fft_kwargs)

    def _irfft(self, a: Any, shape: tuple[int, int]) -> Any:
        return self.backend.fft.irfft2(a, s=shape, **self.backend.fft_kwargs)

    def _kernel_rfft(self, k: np.ndarray, shape: tuple[int, int]) -> Any:
        """rfft2 of the host kernel ``k`` zero-padded to ``shape`` with its centre on [0, 0]
        (:func:`_wrap_kernel`).  On the CPU only the kernel's rows are transformed along x,
        then every column (the 1-D transforms rfft2 runs, in its order: the same bits,
        tested), not the ~N zero rows: ~2.3x less work at 2048² (more where ``shape`` has
        a large prime factor, as LSST's N1 + N2 - 1 often does)."""
        be = self.backend
        if be.is_gpu:
            return self._rfft(_wrap_kernel(be.xp, be.asarray(k), shape), shape)
        (n0, n1), (kh, kw) = shape, k.shape
        rows = np.zeros((kh, n1))
        rows[:, (np.arange(kw) - kw // 2) % n1] = k
        full = np.zeros((n0, n1 // 2 + 1), dtype=np.complex128)
        full[(np.arange(kh) - kh // 2) % n0] = be.fft.rfft(rows, axis=1, **be.fft_kwargs)
        return be.fft.fft(full, axis=0, overwrite_x=True, **be.fft_kwargs)

    def _half_mean_sq(self, a: Any, shape: tuple[int, int]) -> float:
        """mean_k |a(k)|² over the full N_y·N_x spectrum, from the rfft half of a Hermitian
        spectrum: interior columns stand for two frequencies, columns 0 and N_x/2 for one."""
        return float(self._half_sum_sq(a, shape)) / (shape[0] * shape[1])

    def _half_sum_sq(self, a: Any, shape: tuple[int, int]) -> Any:
        """Σ_k |a(k)|² of :meth:`_half_mean_sq`, a backend scalar (not fetched)."""
        xp = self.backend.xp
        p = (a.real**2 + a.imag**2) if xp.iscomplexobj(a) else a * a
        # The Hermitian weights, made on the host and uploaded (on a device a fill and
        # two item writes are three launches).
        w = np.full(p.shape[1], 2.0)
        w[0] = 1.0
        if shape[1] % 2 == 0:
            w[-1] = 1.0
        return (p * self.backend.asarray(w)[None, :]).sum()

    def _filter_plane(self, plane: Any, filt_ft: Any, shape: tuple[int, int], fill: Any) -> Any:
        """IFFT(FFT(plane)·filt_ft) cropped, with non-finite pixels filled by ``fill``
        for the transform and restored (NaN stays NaN, ±inf stays ±inf) afterwards."""
        xp = self.backend.xp
        H, W = plane.shape
        # The plane in float64 (itself when it is: never modified, the fill is a new array).
        a0 = plane.astype(np.float64, copy=False)
        bad = ~xp.isfinite(a0)
        # On a device the fill and restore run whether or not a pixel needs them (both
        # are then identities): cheaper than the host sync of the test.
        has_bad = self.backend.is_gpu or bool(bad.any())
        a = xp.where(bad, fill, a0) if has_bad else a0
        out = self._irfft(self._rfft(a, shape) * filt_ft, shape)[:H, :W]
        if has_bad:
            out = xp.where(bad, a0, out)
        return out

    # --- the task ----------------------------------------------------------------------
    def run(
        self,
        science: Exposure,
        template: Exposure,
        subtracted: Exposure,
        psf_matching_kernel: Any,
        *,
        template_matched: bool = True,
        pre_conv_mode: bool = False,
        pre_conv_kernel: Any = None,
        x: float | None = None,
        y: float | None = None,
        svar: float | None = None,
        tvar: float | None = None,
    ) -> DecorrelationResult:
        """Decorrelate ``subtracted`` (docs/algorithms.md §5.1–§5.4).

        Parameters
        ----------
        science : Exposure
            The science exposure before any convolution (or preconvolution).
        template : Exposure
            The template on the science pixel grid, before PSF matching; a template
            covering more than the science box is cropped to it.
        subtracted : Exposure
            The difference (or score) on the science box, in science flux units.
        psf_matching_kernel : SpatialKernel, object with ``kernel_image(x, y)``, or 2-D array
            Evaluated once, unnormalized, at (x, y): the spatial variation is ignored.
        template_matched : bool
            True: the template was convolved (§5.1); False: the science was (§5.2).
        pre_conv_mode : bool
            ``subtracted`` is a score image (§5.3); needs ``template_matched``.
        pre_conv_kernel : Psf, object with ``kernel_image``, or 2-D array, optional
            The preconvolution kernel (normalized to sum 1 here); default: the science
            PSF at its average position.  Only with ``pre_conv_mode``.
        x, y : float, optional
            Parent position where κ is evaluated; default the centre of the difference's
            box, ((x0 + x1)/2, (y0 + y1)/2) with x1, y1 exclusive, as LSST does.
        svar, tvar : float, optional
            Override the clipped variance means.

        Returns
        -------
        DecorrelationResult

        Raises
        ------
        InvalidInputError
            Inconsistent mode arguments or a malformed kernel.
        ShapeMismatchError
            ``subtracted`` is not on the science box, or the template does not cover it.
        AllMaskedError
            A variance mean is undefined (every pixel masked) while both images have data.
        InvalidVarianceError
            The unconvolved image's variance mean is not positive.
        """
        be, xp = self.backend, self.backend.xp
        if pre_conv_mode and not template_matched:
            raise InvalidInputError("pre_conv_mode (score image) requires template_matched=True")
        if pre_conv_kernel is not None and not pre_conv_mode:
            raise InvalidInputError("pre_conv_kernel is allowed only with pre_conv_mode=True")
        sci, diff = self._mi(science, "science"), self._mi(subtracted, "subtracted")
        tmpl = self._mi(template, "template")
        if diff.bbox != sci.bbox:
            raise ShapeMismatchError(
                f"subtracted box {diff.bbox} differs from the science box {sci.bbox}"
            )
        if tmpl.bbox != sci.bbox:
            if not tmpl.bbox.contains(sci.bbox):
                raise ShapeMismatchError(
                    f"template box {tmpl.bbox} does not cover the science box {sci.bbox}"
                )
            tmpl = tmpl.subimage(sci.bbox)
        box = diff.bbox
        xc = 0.5 * (box.x0 + box.x1) if x is None else float(x)
        yc = 0.5 * (box.y0 + box.y1) if y is None else float(y)
        kappa = _kernel_array(psf_matching_kernel, xc, yc, "psf_matching_kernel")
        ksum = float(kappa.sum())
        log.info("using the matching kernel at (%.1f, %.1f); kernel sum %.6g", xc, yc, ksum)
        pre = None
        if pre_conv_mode:
            if pre_conv_kernel is None:
                if science.psf is None:
                    raise PsfError("pre_conv_mode without pre_conv_kernel needs a science PSF")
                pre = science.psf.kernel_image()
            else:
                # A PSF is taken at its average position, as LSST's default does.
                at = (None, None) if isinstance(pre_conv_kernel, Psf) else (xc, yc)
                pre = _kernel_array(pre_conv_kernel, *at, "pre_conv_kernel")
            s = float(pre.sum())
            if not s > 0:
                raise InvalidInputError(f"pre_conv_kernel must have a positive sum, got {s}")
            pre = pre / s

        if be.is_gpu and svar is None and tvar is None and sci.shape == tmpl.shape:
            # On a device both MEANCLIPs run as two columns of one kernel: one host sync.
            svar, tvar = self._variance_means(sci, tmpl)
        else:
            # two independent full-image MEANCLIPs: one CPU thread each
            svar, tvar = run_concurrently(
                lambda: self.compute_variance_mean(sci) if svar is None else float(svar),
                lambda: self.compute_variance_mean(tmpl) if tvar is None else float(tvar),
                parallel=not be.is_gpu,
            )
        log.info("variance plane means: science %.5e, template %.5e", svar, tvar)
        if math.isnan(svar) or math.isnan(tvar):
            if bool(xp.isnan(sci.image).all()) or bool(xp.isnan(tmpl.image).all()):
                log.warning("template or science image is entirely NaN: skipping decorrelation")
                return DecorrelationResult(
                    corrected_exposure=subtracted.to_backend(be),
                    svar=svar,
                    tvar=tvar,
                    kernel_sum=ksum,
                )
            raise AllMaskedError(
                f"variance mean undefined (science {svar}, template {tvar}): "
                "every pixel is masked by "
                f"{', '.join(self.config.ignore_mask_planes)} or has non-finite variance"
            )

        # "var_mean" belongs to the image that was not convolved, "target" to the one that was.
        if template_matched:
            var_mean, target_mean, plane1, plane2 = svar, tvar, sci.variance, tmpl.variance
        else:
            var_mean, target_mean, plane1, plane2 = tvar, svar, tmpl.variance, sci.variance
        if not (var_mean > 0 and target_mean >= 0):
            raise InvalidVarianceError(
                f"decorrelation needs positive variance means, got science {svar:.4g}, template "
                f"{tvar:.4g}"
            )
        if target_mean / var_mean > 1e8:
            log.warning(
                "diverging correction: convolved/unconvolved variance ratio %.2e",
                target_mean / var_mean,
            )

        shapes = [kappa.shape]
        if subtracted.psf is not None:
            try:
                shapes.append(subtracted.psf.kernel_image(xc, yc).shape)
            except PsfError:
                pass  # only the FFT size depends on it: continue without it
        if pre is not None:
            shapes.append(pre.shape)
        shape = common_shape(*shapes, diff.shape)

        # Frequency-space filters in float64: |κ̂|² and the ratio can span many decades.
        kft = self._kernel_rfft(kappa, shape)
        k2 = kft.real**2 + kft.imag**2
        num = var_mean + target_mean * ksum * ksum
        if pre is None:
            corr = xp.sqrt(num / (var_mean + target_mean * k2))
            cnft = corr
        else:
            pft = self._kernel_rfft(pre, shape)
            p2 = pft.real**2 + pft.imag**2
            tiny = np.finfo(np.float64).tiny * 1000.0
            p2 = xp.where(p2 < tiny, tiny, p2)
            # num / (σ² + σ_t²·|κ̂|²/|P̂|²), no square root (§5.3), multiplied through by
            # |P̂|² (≥ the clamp) so that a huge ratio cannot overflow.
            corr = num * p2 / (var_mean * p2 + target_mean * k2)
            cnft = xp.conj(pft) * corr
        crft = kft * corr

        # The image: corr is real and even, so filtering keeps the image real.
        img = diff.image.astype(np.float64)
        finite = xp.isfinite(img)
        if be.is_gpu:
            # The mean of the finite pixels without a host sync (an emptiness test, a
            # boolean-mask compaction): a backend scalar, 0 when no pixel is finite.
            n_fin = finite.sum()
            fill = xp.where(n_fin > 0, xp.where(finite, img, 0.0).sum() / xp.maximum(n_fin, 1), 0.0)
        else:
            # Only filled pixels use it: no compaction of the plane when every pixel is finite.
            fill = float(xp.mean(img[finite])) if bool(finite.any()) and not finite.all() else 0.0
        new_img = self._filter_plane(img, corr, shape, fill)

        # The filter's cut-out and the two variance weights cross to the host together.
        half = max(max(kappa.shape), max(pre.shape) if pre is not None else 0)
        cut, s1, s2 = fetch(
            be,
            self._cutout(corr, shape, half),
            self._half_sum_sq(cnft, shape),
            self._half_sum_sq(crft, shape),
        )
        cut = np.array(cut, dtype=np.float64)
        w1, w2 = float(s1) / (shape[0] * shape[1]), float(s2) / (shape[0] * shape[1])
        if self.config.complete_var_plane_propagation:
            new_var = self._propagate(plane1, cnft, var_mean, shape) + self._propagate(
                plane2, crft, target_mean, shape
            )
        elif not be.is_gpu:
            new_var = self._weighted_sum_host(plane1, w1, plane2, w2, ksum, template_matched)
        else:
            new_var = plane1.astype(np.float64) * w1 + plane2.astype(np.float64) * w2
        if not template_matched and be.is_gpu:
            # The subtraction divided the difference by kSum; LSST scales the whole plane
            # (template term included) by 1/kSum², and so do we.
            new_var = new_var / (ksum * ksum)

        mask = self._grow_mask(diff, cut)
        # New image and variance planes, held as they are (no copies); the mask too when
        # it is new (not the input's own).
        out_mi = MaskedImage._adopt(
            new_img.astype(np.float32),
            new_var.astype(np.float32, copy=False),  # float32 already on the host
            mask if mask is not diff.mask else mask.copy(),
            xy0=diff.xy0,
            mask_planes=diff.mask_planes,
            backend=be,
        )
        # §5.4: the difference PSF is not updated.  A difference without one gets the PSF
        # the subtraction would have given it: the science's, or the template's (§5.2).
        psf = subtracted.psf
        if psf is None:
            psf = science.psf if template_matched else template.psf
        out = Exposure(
            out_mi,
            psf=psf,
            wcs=copy.deepcopy(subtracted.wcs),
            photo_calib=subtracted.photo_calib,
            metadata=subtracted.metadata,
        )
        return DecorrelationResult(
            corrected_exposure=out,
            correction_kernel=cut,
            svar=svar,
            tvar=tvar,
            variance_weights=(w1, w2),
            fft_shape=shape,
            kernel_sum=ksum,
        )

    def _grow_mask(self, diff: MaskedImage, cut: np.ndarray) -> Any:
        """The difference's mask with ``grow_mask_planes`` dilated by the filter footprint."""
        bm = diff.mask_planes.bitmask_if_present(list(self.config.grow_mask_planes))
        if not bm:
            return diff.mask
        a = np.abs(cut)
        fp = a >= float(self.config.grow_mask_threshold) * a.max()
        from ..ops.convolution import dilate_mask

        seed = diff.mask & bm
        if self.config.grow_skip_bad_fills:
            # A filled detector defect (BAD and INTRP, no CR/SAT/NO_DATA) has clean edges
            # and a fill error of a few σ at most; the filter's off-centre taps (~1 % of
            # its peak) carry ≲ 0.1σ of it.  Its neighbours' growth cost 2 S/N >= 8
            # injections 3 px from bad columns on a realistic 2048² pair whenever those taps
            # crossed the 1 % threshold (docs/algorithms.md §14).  A cosmic ray's fill is
            # still grown: the finder may have missed the rest of its track.
            seed = self.backend.xp.where(bad_fills(diff), seed.dtype.type(0), seed)
        return diff.mask | dilate_mask(seed, fp, self.backend)

    def _propagate(self, plane: Any, filt_ft: Any, fill: float, shape: tuple[int, int]) -> Any:
        """plane ⊗ c² with c = IFFT(filt_ft) (LSST ``calculateVariancePlane``, one term)."""
        xp = self.backend.xp
        # corr alone is a real array: make it a spectrum explicitly for the inverse rfft.
        c = self._irfft(
            filt_ft if xp.iscomplexobj(filt_ft) else filt_ft.astype(np.complex128), shape
        )
        return self._filter_plane(plane, self._rfft(c * c, shape), shape, fill)

    def _cutout(self, corr: Any, shape: tuple[int, int], half: int) -> Any:
        """The centred (2·half+1)² cut-out of IFFT(corr), on the backend (not fetched)."""
        xp = self.backend.xp
        be = self.backend
        h = min(half, shape[0] // 2 - 1, shape[1] // 2 - 1)
        if not be.is_gpu:
            # irfft2's own steps, but the x transforms (and the scaling) only on the 2h + 1
            # rows of the cut-out: the inverse transform down every column of the complex
            # spectrum, unscaled; then along x on those rows, unscaled; then the 1/(N0 N1)
            # pocketfft applies last, as it computes it.  The same bits as cropping the
            # whole irfft2 (tested), ~3x less work at 2048².
            k = np.arange(-h, h + 1)
            fkw = be.fft_kwargs
            cols = be.fft.ifft(
                corr.astype(np.complex128), axis=0, norm="forward", overwrite_x=True, **fkw
            )
            rows = be.fft.irfft(cols[k % shape[0]], n=shape[1], axis=1, norm="forward", **fkw)
            return rows[:, k % shape[1]] * np.float64(1 / np.longdouble(shape[0] * shape[1]))
        full = self._irfft(corr, shape)
        return xp.roll(full, (h, h), axis=(0, 1))[: 2 * h + 1, : 2 * h + 1]

    @staticmethod
    def _weighted_sum_host(p1: Any, w1: float, p2: Any, w2: float, ksum: float, tm: bool) -> Any:
        """float32 ``p1·w1 + p2·w2`` (in float64; then ``/ kSum²`` unless ``tm``), row block
        by row block: per pixel the operations of the whole-plane expression (the same
        bits), without its five whole-plane float64 temporaries."""
        H, W = p1.shape
        out = np.empty((H, W), dtype=np.float32)
        step = max(1, _ROW_BLOCK // max(W, 1))
        k2 = ksum * ksum
        for r0 in range(0, H, step):
            r = slice(r0, r0 + step)
            v = p1[r].astype(np.float64) * w1 + p2[r].astype(np.float64) * w2
            out[r] = v if tm else v / k2
        return out

    @staticmethod
    def compute_corrected_diffim_psf(
        corr_rfft: Any,
        psf_image: np.ndarray,
        shape: tuple[int, int],
        backend: Backend | str | None = None,
    ) -> np.ndarray:
        """The PSF of a decorrelated difference, IFFT(FFT(psf)·corr), normalized to sum 1.

        LSST's ``computeCorrectedDiffimPsf``: it exists but :meth:`run` does not call it,
        because the current pipeline leaves the difference PSF unchanged (§5.4, DM-47461).

        Parameters
        ----------
        corr_rfft : array
            corr on the rfft half-plane of ``shape``.
        psf_image : 2-D array
            The difference PSF (odd, centred).
        shape : (int, int)
            The frequency-space shape corr was computed on.
        """
        be = resolve_backend(backend)
        xp = be.xp
        psf = np.asarray(psf_image, dtype=np.float64)
        ph, pw = psf.shape
        fkw = be.fft_kwargs
        ft = be.fft.rfft2(_wrap_kernel(xp, be.asarray(psf), shape), s=shape, **fkw)
        new = xp.roll(
            be.fft.irfft2(ft * be.asarray(corr_rfft), s=shape, **fkw),
            (ph // 2, pw // 2),
            axis=(0, 1),
        )[:ph, :pw]
        new = np.array(be.asnumpy(new), dtype=np.float64)
        return new / new.sum()

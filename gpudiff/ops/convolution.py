"""FFT correlation and masked-image convolution in afw's convention (docs/algorithms.md §0.1–§0.3).

afw's "convolution" is a **correlation**: for an odd kernel of centre (ctrY, ctrX),

    out[r, c] = Σ_{i,j} K[i, j] · in[r − ctrY + i, c − ctrX + j]

with the kernel **not flipped**.  Every function here follows that convention, so fitting
(``psfmatch``) and applying use the same one.  Arrays are those of the given backend; the
functions never modify their inputs.
"""

from __future__ import annotations

from typing import Any, Callable, Iterator, Sequence

import numpy as np

from ..backend import Backend, resolve_backend
from ..backend.kernels import mask_dilate_or
from ..errors import InvalidInputError, KernelTooLargeError, NonFiniteDataError
from ..image import Box, MaskedImage

__all__ = [
    "kernel_centre",
    "correlate",
    "correlate_many",
    "iter_correlations",
    "dilate_mask",
    "convolve_masked_image",
    "varying_correlate",
    "prepare_masked_input",
    "finish_masked_output",
    "process_in_row_bands",
]


def kernel_centre(shape: Sequence[int]) -> tuple[int, int]:
    """afw's kernel centre (ctrY, ctrX) = ((H−1)//2, (W−1)//2)."""
    return (int(shape[0]) - 1) // 2, (int(shape[1]) - 1) // 2


def _smooth_len(n: int) -> int:
    """Smallest m >= n whose prime factors are 2, 3, 5, 7 (fast in pocketfft and cuFFT)."""
    m = max(int(n), 1)
    while True:
        r = m
        for p in (2, 3, 5, 7):
            while r % p == 0:
                r //= p
        if r == 1:
            return m
        m += 1


def _fft_shape(shape, kshape) -> tuple[int, int]:
    # The circular correlation of length F equals the linear one on the H output pixels we
    # keep as long as F >= H + max(ctr, k − 1 − ctr): wrap-around then only lands in the
    # discarded part.  That is ~k/2 less padding than the full linear length H + k − 1,
    # which often reaches a much faster FFT size (4096 + 11 → 4116 = 2²·3·7³).
    (H, W), (kh, kw) = shape, kshape
    cy, cx = kernel_centre(kshape)
    return (
        _smooth_len(int(H) + max(cy, int(kh) - 1 - cy)),
        _smooth_len(int(W) + max(cx, int(kw) - 1 - cx)),
    )


def _check_kernels(kernels, be: Backend, ndim: int):
    # Kernels usually arrive as host arrays: check them there, before the upload (on a
    # device the finiteness test is a launch and a host sync per call).
    on_host = isinstance(kernels, np.ndarray)
    k = be.asarray(kernels)
    if k.ndim != ndim:
        raise InvalidInputError(f"kernel array must be {ndim}-D, got shape {tuple(k.shape)}")
    if k.shape[-1] < 1 or k.shape[-2] < 1:
        raise InvalidInputError(f"kernel shape {tuple(k.shape)} is empty")
    finite = np.isfinite(kernels).all() if on_host else be.xp.isfinite(k).all()
    if not bool(finite):
        raise NonFiniteDataError(
            f"kernel array of shape {tuple(k.shape)} contains NaN or inf values"
        )
    return k


def iter_correlations(
    image: Any,
    kernels: Any,
    backend: Backend | str | None = None,
    dtype=np.float32,
    *,
    check_finite: bool = True,
) -> Iterator[Any]:
    """Yield image ⊗ kernels[m] for each m, sharing one forward FFT of the image.

    One kernel at a time keeps the memory at a few image-sized arrays whatever the
    number of kernels (a stacked product of 21 variance terms at 4096² would need GBs).

    Parameters
    ----------
    image : 2-D array
        Must be finite (zero-fill masked pixels first).
    kernels : array, shape (n, kh, kw)
        Kernels in afw orientation (not flipped).
    dtype : dtype
        Output dtype; the FFTs run in float64 when ``dtype`` is float64, else float32.
    check_finite : bool
        Refuse a non-finite image (:class:`~gpudiff.errors.NonFiniteDataError`).  Callers
        whose image is finite by construction (zero-filled by
        :func:`prepare_masked_input`) pass False: on a device the test is a host sync.
    """
    be = resolve_backend(backend)
    ks = _check_kernels(kernels, be, 3)
    return _correlations(image, ks, be, dtype, check_finite)


def _correlations(image, ks, be: Backend, dtype, check_finite: bool) -> Iterator[Any]:
    """:func:`iter_correlations` of kernels already checked by :func:`_check_kernels`."""
    xp = be.xp
    work = np.float64 if np.dtype(dtype) == np.float64 else np.float32
    img = be.asarray(image, dtype=work)
    if img.ndim != 2:
        raise InvalidInputError(f"image must be 2-D, got shape {tuple(img.shape)}")
    if check_finite and not bool(xp.isfinite(img).all()):
        # One NaN would spread over the whole FFT output: refuse rather than return an
        # all-NaN (silently wrong) image.  Masked images are zero-filled by the callers.
        n_bad = int((~xp.isfinite(img)).sum())
        raise NonFiniteDataError(
            f"image to correlate has {n_bad} NaN/inf pixel(s); zero-fill and mask them "
            "first (convolve_masked_image does)"
        )
    return _correlation_terms(img, ks.astype(work, copy=False), be, dtype)


def _correlation_terms(img, ks, be: Backend, dtype) -> Iterator[Any]:
    n, kh, kw = ks.shape
    H, W = img.shape
    fy, fx = _fft_shape((H, W), (kh, kw))
    cy, cx = kernel_centre((kh, kw))
    fkw = be.fft_kwargs
    fi = be.fft.rfft2(img, s=(fy, fx), **fkw)
    # Correlation = convolution with the flipped kernel; the convolution output is offset
    # by (kh − 1 − cy, kw − 1 − cx) from the correlation's.
    oy, ox = kh - 1 - cy, kw - 1 - cx
    for m in range(n):
        # The padded kernel has only kh nonzero rows: transform those along x, then
        # down the columns (half the work of a full-size rfft2).
        rows = be.fft.rfft(ks[m, ::-1, ::-1], n=fx, axis=1, **fkw)
        fk = be.fft.fft(rows, n=fy, axis=0, **fkw)
        fk *= fi
        full = be.fft.irfft2(fk, s=(fy, fx), **fkw)
        # A view: callers that keep it copy it (correlate_many stacks them).
        yield full[oy : oy + H, ox : ox + W].astype(dtype, copy=False)


def correlate_many(
    image: Any,
    kernels: Any,
    backend: Backend | str | None = None,
    dtype=np.float32,
    *,
    check_finite: bool = True,
) -> Any:
    """Correlate one image with a stack of kernels (n, kh, kw) → (n, H, W).

    ``out[m]`` = image ⊗ kernels[m] (afw convention, zeros beyond the image edge); one
    forward FFT of the image is shared.  See :func:`iter_correlations`.
    """
    be = resolve_backend(backend)
    terms = iter_correlations(image, kernels, be, dtype, check_finite=check_finite)
    return be.xp.stack(list(terms))


def correlate(
    image: Any,
    kernel: Any,
    backend: Backend | str | None = None,
    dtype=np.float32,
    *,
    check_finite: bool = True,
) -> Any:
    """Correlate a 2-D image with one kernel (afw convention, zero outside the image).

    ``check_finite`` as :func:`iter_correlations`.  The result (H, W) may be a view of the
    FFT's larger work array (not C-contiguous); it is the caller's, as a new array is.
    """
    be = resolve_backend(backend)
    # Checked here, where a host kernel is still on the host (no device test).
    k = _check_kernels(kernel, be, 2)
    # The one term as it comes (a view of the FFT output's valid part): stacking it would
    # be a copy, a device launch, for nothing.
    return next(_correlations(image, k[None], be, dtype, check_finite))


def dilate_mask(mask: Any, footprint: Any, backend: Backend | str | None = None) -> Any:
    """Bitwise OR of mask bits under a kernel footprint (afw mask "convolution").

    ``out[r, c] = OR_{i,j: fp[i,j]} mask[r − ctrY + i, c − ctrX + j]``; pixels beyond the
    image contribute nothing.  Runs the registered ``mask_dilate_or`` kernel (CUDA on
    CuPy, its NumPy twin on the CPU).
    """
    return mask_dilate_or(mask, footprint, backend=resolve_backend(backend))


def _edge_slices(shape, kshape):
    """Slices of the border where the kernel does not fit (afw ``shrinkBBox``)."""
    H, W = shape
    kh, kw = kshape
    cy, cx = kernel_centre(kshape)
    return (
        (slice(0, min(cy, H)), slice(None)),
        (slice(max(H - (kh - 1 - cy), 0), H), slice(None)),
        (slice(None), slice(0, min(cx, W))),
        (slice(None), slice(max(W - (kw - 1 - cx), 0), W)),
    )


def finish_masked_output(mi: MaskedImage, img, var, msk, kshape, do_copy_edge: bool) -> MaskedImage:
    """Apply afw's edge convention and non-finite propagation, wrap as a MaskedImage."""
    xp = mi.backend.xp
    planes = mi.mask_planes.copy()
    no_data = planes.bitmask("NO_DATA")
    edge = planes.bitmask("EDGE")
    # Output pixels that saw a NaN/inf input are NO_DATA: we zero-filled those inputs for
    # the FFT, so their values would otherwise be silently wrong.
    bad = (msk & no_data) != 0
    img = xp.where(bad, xp.float32(np.nan), img)
    var = xp.where(bad, xp.float32(np.inf), var)
    for sl in _edge_slices(mi.shape, kshape):
        if do_copy_edge:
            img[sl] = mi.image[sl]
            var[sl] = mi.variance[sl]
            msk[sl] = mi.mask[sl] | edge
        else:
            img[sl] = np.nan
            var[sl] = np.inf
            msk[sl] = msk[sl] | no_data
    # The three planes are this function's to keep (it already wrote into them): held as
    # they are when their dtypes are right, without the constructor's copies.
    return MaskedImage._adopt(img, var, msk, xy0=mi.xy0, mask_planes=planes, backend=mi.backend)


def prepare_masked_input(mi: MaskedImage):
    """Zero-filled finite copies of image and variance, and the mask with NO_DATA where
    either was non-finite."""
    xp = mi.backend.xp
    finite = xp.isfinite(mi.image) & xp.isfinite(mi.variance)
    img = xp.where(finite, mi.image, xp.float32(0))
    var = xp.where(finite, mi.variance, xp.float32(0))
    msk = xp.where(finite, mi.mask, mi.mask | mi.mask_planes.bitmask("NO_DATA"))
    return img, var, msk


def convolve_masked_image(
    mi: MaskedImage, kernel: Any, *, do_normalize: bool = False, do_copy_edge: bool = False
) -> MaskedImage:
    """Convolve (afw sense: correlate) a MaskedImage with a spatially constant kernel.

    The image is correlated with K, the variance with K² and the mask is OR-dilated over
    the pixels where K ≠ 0 (docs/algorithms.md §0.2).  The border where the kernel does not fit gets
    NaN / +inf variance / NO_DATA, or with ``do_copy_edge`` the input pixels plus EDGE.
    Input pixels with non-finite image or variance poison (NaN, NO_DATA) every output pixel
    whose kernel footprint covers them.

    Parameters
    ----------
    mi : MaskedImage
    kernel : 2-D array
    do_normalize : bool
        Divide by the kernel sum (ModelPsfMatch uses this).
    do_copy_edge : bool
        Copy input pixels into the border instead of NaN/NO_DATA.
    """
    be = mi.backend
    # A host kernel stays on the host: its sum and finiteness are then tested there (on a
    # device each test would be a host sync); correlate uploads it.
    if isinstance(kernel, np.ndarray):
        k = np.asarray(kernel, dtype=np.float64)
    else:
        k = be.asarray(kernel, dtype=np.float64)
    if k.ndim != 2:
        raise InvalidInputError(f"kernel must be 2-D, got shape {tuple(k.shape)}")
    if k.shape[0] > mi.shape[0] or k.shape[1] > mi.shape[1]:
        raise KernelTooLargeError(f"kernel {tuple(k.shape)} is larger than the image {mi.shape}")
    if do_normalize:
        s = float(k.sum())
        if s == 0 or not np.isfinite(s):
            raise InvalidInputError(f"cannot normalize a kernel whose sum is {s}")
        k = k / s
    img, var, msk = prepare_masked_input(mi)
    # Zero-filled by prepare_masked_input: finite by construction.
    out_img = correlate(img, k, be, check_finite=False)
    out_var = correlate(var, k * k, be, check_finite=False)
    out_msk = dilate_mask(msk, k != 0, be)
    return finish_masked_output(mi, out_img, out_var, out_msk, k.shape, do_copy_edge)


def varying_correlate(
    image: Any,
    term_kernels: Any,
    term_weights: Sequence[Any],
    backend: Backend | str | None = None,
    *,
    check_finite: bool = True,
) -> Any:
    """Exact spatially varying correlation Σ_k w_k(x, y) · (image ⊗ K_k), float32.

    With K(x, y) = Σ_k p_k(x, y) K_k and w_k = p_k this is the correlation with the kernel
    evaluated at every output pixel — one FFT correlation per term, no interpolation; the
    terms are accumulated one at a time.

    Parameters
    ----------
    image : 2-D array (finite)
    term_kernels : array, shape (n_terms, kh, kw)
    term_weights : sequence of n_terms weights
        Each an array broadcastable to the image, a scalar, or a tuple of such factors
        whose product is the weight (e.g. a (1, W) row and an (H, 1) column: applied one
        after the other, no (H, W) weight array is made).
    check_finite : bool
        As :func:`iter_correlations`.
    """
    be = resolve_backend(backend)
    xp = be.xp
    ks = _check_kernels(term_kernels, be, 3)
    if len(term_weights) != ks.shape[0]:
        raise InvalidInputError(f"{ks.shape[0]} term kernels but {len(term_weights)} weight images")
    out = None
    for w, conv in zip(term_weights, _correlations(image, ks, be, np.float32, check_finite)):
        factors = w if isinstance(w, tuple) else (w,)
        factors = [
            np.float32(f) if np.isscalar(f) else xp.asarray(f, dtype=np.float32) for f in factors
        ] or [np.float32(1.0)]
        if out is None:
            out = conv * factors[0]  # a new contiguous array
            for f in factors[1:]:
                out *= f
            continue
        # ``conv`` is a view of a temporary FFT output: scaled in place, factor by factor
        # (no (H, W) temporary per term).
        for f in factors:
            conv *= f
        out += conv
    return out


def process_in_row_bands(
    mi: MaskedImage,
    process: Callable[[MaskedImage], MaskedImage],
    n_bands: int,
    halo: tuple[int, int],
) -> MaskedImage:
    """Apply a row-local ``process`` to ``mi`` band by band and stitch the result.

    The banded retry of :func:`gpudiff.backend.fallback.with_memory_fallback`: each band
    needs a fraction of the device memory.  ``process(band) -> MaskedImage`` must compute
    each output row from input rows at most ``halo = (above, below)`` away (a kernel of
    height ``kh`` and centre row ``cy`` has halo ``(cy, kh − 1 − cy)``).  At most
    ``n_bands`` bands are made, fewer if a band would be shorter than the halo.  Bands are
    :meth:`~gpudiff.image.MaskedImage.subimage` s, so parent coordinates (and a spatially
    varying kernel) are unchanged; the halo rows are dropped, and rows at the true image
    edges get ``process``'s own edge treatment.  Equal to the one-piece result up to the
    rounding of the (smaller) FFTs.
    """
    H = mi.shape[0]
    up, down = int(halo[0]), int(halo[1])
    if up < 0 or down < 0:
        raise InvalidInputError(f"halo must be two non-negative row counts, got {halo}")
    # At most H // (up + down) bands: an edge band (halo on one side only) must still be
    # as tall as the kernel, which ``process`` needs.
    n = max(1, min(int(n_bands), H // max(1, up + down)))
    edges = [round(i * H / n) for i in range(n + 1)]
    box, parts = mi.bbox, []
    for r0, r1 in zip(edges[:-1], edges[1:]):
        lo, hi = max(0, r0 - up), min(H, r1 + down)
        out = process(mi.subimage(Box(box.x0, box.y0 + lo, box.x1, box.y0 + hi)))
        parts.append(out.subimage(Box(box.x0, box.y0 + r0, box.x1, box.y0 + r1)))
    xp = parts[0].backend.xp
    return MaskedImage(
        xp.concatenate([p.image for p in parts]),
        xp.concatenate([p.variance for p in parts]),
        xp.concatenate([p.mask for p in parts]),
        xy0=mi.xy0,
        mask_planes=parts[0].mask_planes,
        backend=parts[0].backend,
    )

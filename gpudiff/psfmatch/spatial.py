"""The spatial model of the matching kernel and its exact application
(docs/algorithms.md §3, §0.2–§0.4).

K(x, y) = Σ_m a_m(x, y)·B_m with a_m(x, y) = Σ_k c_mk·p_k(x, y), the p_k being Chebyshev
(or plain polynomial) terms of the position.  Regrouping by spatial term gives
K(x, y) = Σ_k p_k(x, y)·K_k with K_k = Σ_m c_mk·B_m, so a convolved image is exactly
Σ_k p_k·(I ⊗ K_k): one FFT correlation per spatial term, no interpolation of kernels.
The variance, convolved with K(x, y)², is Σ_k Σ_l p_k p_l·(V ⊗ K_k K_l).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from ..backend import Backend
from ..backend.threads import run_concurrently
from ..errors import InvalidInputError, KernelTooLargeError
from ..image import Box, MaskedImage
from ..ops.convolution import (
    dilate_mask,
    finish_masked_output,
    prepare_masked_input,
    varying_correlate,
)
from .basis import KernelBasis

__all__ = ["SpatialFunctions", "SpatialKernel"]


def _term_powers(order: int) -> list[tuple[int, int]]:
    """afw ``PolynomialFunction2`` / ``Chebyshev1Function2`` term order: by total degree,
    then x power descending: 1, x, y, x², xy, y², x³, x²y, …"""
    return [(d - j, j) for d in range(order + 1) for j in range(d + 1)]


def _grid_term(pu: list[Any], pv: list[Any], i: int, j: int) -> Any:
    """T_i(u)·T_j(v) of :meth:`SpatialFunctions.grid_terms`, without a product by T₀ = 1."""
    if i == 0 and j == 0:
        return np.float64(1.0)
    if j == 0:
        return pu[i]
    if i == 0:
        return pv[j]
    return pu[i] * pv[j]


def _term_factors(pu: list[Any], pv: list[Any], i: int, j: int) -> Any:
    """T_i(u)·T_j(v) as a tuple of its non-constant float32 factors ((1, W) and/or
    (H, 1); empty for the constant term), the weight form of
    :func:`~gpudiff.ops.convolution.varying_correlate`."""
    return tuple(f.astype(np.float32) for f, d in ((pu[i], i), (pv[j], j)) if d != 0)


def _weight(factors: tuple) -> Any:
    """The product of :func:`_term_factors` (1 for the constant term)."""
    out = np.float32(1.0)
    for f in factors:
        out = out * f
    return out


#: float64 values per row block of the host background model (256 KiB).
_ROW_BLOCK = 1 << 15


@dataclass(frozen=True)
class SpatialFunctions:
    """Spatial basis functions p_k(x, y) of a given order over a region.

    ``kind`` "chebyshev1" maps the region's Box2D (pixel edges, docs/algorithms.md §0.4) to [−1, 1];
    "polynomial" uses raw parent coordinates.
    """

    kind: str
    order: int
    region: Box

    def __post_init__(self):
        if self.kind not in ("chebyshev1", "polynomial"):
            raise InvalidInputError(f"unknown spatial model {self.kind!r}")
        if self.order < 0:
            raise InvalidInputError(f"spatial order must be >= 0, got {self.order}")

    @property
    def n_terms(self) -> int:
        return (self.order + 1) * (self.order + 2) // 2

    def _scaled(self, xp, x, y):
        if self.kind == "polynomial":
            return x, y
        r = self.region
        min_x, max_x = r.x0 - 0.5, r.x1 - 0.5
        min_y, max_y = r.y0 - 0.5, r.y1 - 0.5
        return (
            (x - 0.5 * (min_x + max_x)) * 2.0 / (max_x - min_x),
            (y - 0.5 * (min_y + max_y)) * 2.0 / (max_y - min_y),
        )

    def evaluate(self, x: Any, y: Any, xp: Any = np) -> list[Any]:
        """The n_terms values p_k(x, y) (arrays broadcast like x and y)."""
        pu, pv = self._factors(x, y, xp)
        return [pu[i] * pv[j] for i, j in _term_powers(self.order)]

    def _factors(self, x: Any, y: Any, xp: Any = np) -> tuple[list[Any], list[Any]]:
        """The one-dimensional factors (T_i(u), T_j(v)) of the terms, i, j ≤ order."""
        x = xp.asarray(x, dtype=np.float64)
        y = xp.asarray(y, dtype=np.float64)
        u, v = self._scaled(xp, x, y)
        pu, pv = [xp.ones_like(u)], [xp.ones_like(v)]
        for d in range(1, self.order + 1):
            if self.kind == "chebyshev1":
                pu.append(u if d == 1 else 2 * u * pu[-1] - pu[-2])
                pv.append(v if d == 1 else 2 * v * pv[-1] - pv[-2])
            else:
                pu.append(pu[-1] * u)
                pv.append(pv[-1] * v)
        return pu, pv

    def grid_factors(self, box: Box, backend: Backend) -> tuple[list[Any], list[Any]]:
        """:meth:`_factors` on the pixel columns (1, W) and rows (H, 1) of ``box``:
        evaluated on the host (a few vectors: on a device each step is a launch) and
        uploaded; the same float64 operations either way."""
        xs = np.arange(box.x0, box.x1, dtype=np.float64)[None, :]
        ys = np.arange(box.y0, box.y1, dtype=np.float64)[:, None]
        pu, pv = self._factors(xs, ys, np)
        return [backend.asarray(a) for a in pu], [backend.asarray(a) for a in pv]

    def grid_terms(self, box: Box, backend: Backend) -> list[Any]:
        """The terms on every pixel of ``box`` as (H, W) backend arrays (as
        :meth:`on_grid`), from :meth:`grid_factors`; the constant term T₀(u)·T₀(v) = 1 as
        the host scalar 1.0, which broadcasts to the same values (its (H, W) array of ones
        was a launch to make and one per product with it).  A term of one coordinate only
        (T_i(u)·T₀(v) or T₀(u)·T_j(v)) is its (1, W) or (H, 1) factor, which broadcasts to
        the same values (the product with T₀ = 1 is exact): no (H, W) float64 array, a
        32 MiB page-faulted allocation per term at 2048² on the CPU."""
        pu, pv = self.grid_factors(box, backend)
        return [_grid_term(pu, pv, i, j) for i, j in _term_powers(self.order)]

    def matrix(self, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        """(n_points, n_terms) host array of the terms at the points."""
        return np.stack(self.evaluate(np.asarray(x, float), np.asarray(y, float)), axis=-1)

    def on_grid(self, box: Box, xp: Any) -> list[Any]:
        """Terms on every pixel of ``box`` (parent coordinates) as (H, W) arrays."""
        xs = xp.arange(box.x0, box.x1, dtype=np.float64)[None, :]
        ys = xp.arange(box.y0, box.y1, dtype=np.float64)[:, None]
        return [xp.broadcast_to(t, box.shape) for t in self.evaluate(xs, ys, xp)]


@dataclass(frozen=True)
class SpatialKernel:
    """A spatially varying PSF-matching kernel and differential background.

    Attributes
    ----------
    basis : KernelBasis
    coefficients : ndarray (n_bases, n_terms)
        c_mk; for a constant-first-term basis (AL, PCA) row 0 is (c_00, 0, 0, …).
    functions : SpatialFunctions
    background_coefficients : ndarray (n_bg_terms,) or None (no background fitted)
    background_functions : SpatialFunctions or None
    """

    basis: KernelBasis
    coefficients: np.ndarray
    functions: SpatialFunctions
    background_coefficients: np.ndarray | None = None
    background_functions: SpatialFunctions | None = None

    @property
    def is_spatially_varying(self) -> bool:
        return self.functions.n_terms > 1 and bool(np.any(self.coefficients[:, 1:] != 0))

    @property
    def shape(self) -> tuple[int, int]:
        return self.basis.kernels.shape[1:]

    def term_kernels(self) -> np.ndarray:
        """K_k = Σ_m c_mk B_m, shape (n_terms, kh, kw)."""
        return np.einsum("mk,mij->kij", self.coefficients, self.basis.kernels)

    def kernel_image(self, x: float | None = None, y: float | None = None) -> np.ndarray:
        """K evaluated at parent position (x, y) (default: the centre of the region)."""
        x, y = self._centre(x, y)
        p = np.array([float(t) for t in self.functions.evaluate(x, y)])
        return np.tensordot(p, self.term_kernels(), axes=1)

    def kernel_sum(self, x: float | None = None, y: float | None = None) -> float:
        """ΣK at (x, y): the photometric scaling (constant over the image for AL/PCA)."""
        return float(self.kernel_image(x, y).sum())

    def _centre(self, x, y):
        r = self.functions.region
        return (
            0.5 * (r.x0 + r.x1 - 1) if x is None else float(x),
            0.5 * (r.y0 + r.y1 - 1) if y is None else float(y),
        )

    def background(self, x: Any, y: Any, xp: Any = np) -> Any:
        """The differential background at parent positions (0 when not fitted)."""
        if self.background_coefficients is None:
            return xp.zeros(np.broadcast_shapes(np.shape(x), np.shape(y)))
        terms = self.background_functions.evaluate(x, y, xp)
        return sum(float(c) * t for c, t in zip(self.background_coefficients, terms))

    def background_image(self, box: Box, backend: Backend) -> Any:
        """The background model on every pixel of ``box`` (float32, backend array)."""
        xp = backend.xp
        if self.background_coefficients is None:
            return xp.zeros(box.shape, dtype=np.float32)
        fb = self.background_functions
        if backend.is_gpu:
            terms = fb.grid_terms(box, backend)
            out = xp.zeros(box.shape, dtype=np.float64)
            for c, t in zip(self.background_coefficients, terms):
                out += float(c) * t
            return out.astype(np.float32)
        # Row blocks: per pixel the same products and sum from 0 in the same term order
        # (the same bits), with cache-sized float64 temporaries instead of whole-image
        # ones per term.
        pu, pv = fb.grid_factors(box, backend)
        powers = _term_powers(fb.order)
        H, W = box.shape
        out = np.empty((H, W), dtype=np.float32)
        step = max(1, _ROW_BLOCK // max(W, 1))
        for r0 in range(0, H, step):
            pvb = [a[r0 : r0 + step] for a in pv]
            acc = np.zeros((pvb[0].shape[0], W), dtype=np.float64)
            for c, (i, j) in zip(self.background_coefficients, powers):
                acc += float(c) * _grid_term(pu, pvb, i, j)
            out[r0 : r0 + step] = acc
        return out

    def _variance_terms(self, kt, used, p, box: Box, be) -> tuple[np.ndarray, list]:
        """Kernels and weights of V ⊗ K(x, y)² = Σ_k Σ_l p_k p_l (V ⊗ K_k K_l), the pairs
        collected by the spatial term their product p_k p_l is.

        The products of two terms of order s span the terms of order 2s: for order 2, 15
        correlations instead of the 21 pairs (order 3: 28 instead of 55).  A product of
        monomials is one monomial; of Chebyshev polynomials, T_i T_j = (T_{i+j} + T_{|i−j|})/2
        in each coordinate.  Exact up to the rounding of the sums (float64 kernels)."""
        if len(used) == 1 and len(p) == 1:  # a constant kernel: V ⊗ K²
            k = used[0]
            return (kt[k] * kt[k])[None], [p[k]]
        fn = self.functions
        powers = _term_powers(fn.order)
        cheb = fn.kind == "chebyshev1"

        def expand(i, j):
            if not cheb or i == 0 or j == 0:
                return {i + j: 1.0}
            return {i + j: 0.5, abs(i - j): 0.5}  # distinct keys: i, j ≥ 1

        acc: dict[tuple[int, int], np.ndarray] = {}
        for a, k in enumerate(used):
            for k2 in used[a:]:
                (i, j), (i2, j2) = powers[k], powers[k2]
                kk = kt[k] * kt[k2] * (1.0 if k == k2 else 2.0)
                for A, cu in expand(i, i2).items():
                    for B, cv in expand(j, j2).items():
                        acc[(A, B)] = acc.get((A, B), 0.0) + (cu * cv) * kk
        order = max(A + B for A, B in acc)
        pu, pv = SpatialFunctions(fn.kind, order, fn.region).grid_factors(box, be)
        keys = sorted(acc, key=lambda t: (t[0] + t[1], -t[0]))
        weights = [_term_factors(pu, pv, A, B) for A, B in keys]
        return np.stack([acc[t] for t in keys]), weights

    def convolve(
        self, mi: MaskedImage, *, do_normalize: bool = False, do_copy_edge: bool = False
    ) -> MaskedImage:
        """Convolve (afw sense: correlate) a MaskedImage with K(x, y) exactly.

        Image: Σ_k p_k·(I ⊗ K_k).  Variance: Σ_k Σ_l p_k p_l·(V ⊗ K_k K_l), i.e. V ⊗ K(x, y)²
        at every pixel.  Mask: OR over the union of the terms' footprints.  Edges and
        non-finite inputs as :func:`gpudiff.ops.convolve_masked_image`.  With
        ``do_normalize`` each pixel is divided by its own kernel sum ΣK(x, y).
        """
        be = mi.backend
        xp = be.xp
        kh, kw = self.shape
        if kh > mi.shape[0] or kw > mi.shape[1]:
            raise KernelTooLargeError(f"kernel {self.shape} is larger than the image {mi.shape}")
        kt = self.term_kernels()
        nk = kt.shape[0]
        used = [k for k in range(nk) if np.any(kt[k] != 0)] or [0]
        if nk > 1:
            # Each term's weight as its float32 (1, W) and (H, 1) factors, applied one after
            # the other (no (H, W) weight: at 4096² each was a 128 MiB float64 product and
            # a cast, 0.75 s for the 21 of an order-2 kernel); Chebyshev terms lie in
            # [−1, 1], so float32 loses nothing.
            pu, pv = self.functions.grid_factors(mi.bbox, be)
            p = [_term_factors(pu, pv, i, j) for i, j in _term_powers(self.functions.order)]
        else:
            p = [()]  # the constant term: no factor
        img, var, msk = prepare_masked_input(mi)
        vkernels, vweights = self._variance_terms(kt, used, p, mi.bbox, be)
        # Image and variance planes are independent: on the CPU each of two threads gets
        # about half of the FFT correlations (one forward transform each, then one inverse
        # per term): the image's terms and the first variance terms on one, the other
        # variance terms on the other.  (Order 2: 6 image and 15 variance terms; with the
        # planes on one thread each, the variance thread's 16 transforms set the time.)
        n_img, n_var = len(used), len(vkernels)
        split = 0 if be.is_gpu else max(0, min(n_var - 1, (n_var - n_img - 1) // 2))

        def image_part():
            out = varying_correlate(img, kt[used], [p[k] for k in used], be, check_finite=False)
            if not split:
                return out, None
            return out, varying_correlate(
                var, vkernels[:split], vweights[:split], be, check_finite=False
            )

        (out_img, part), rest = run_concurrently(
            image_part,
            lambda: varying_correlate(
                var, vkernels[split:], vweights[split:], be, check_finite=False
            ),
            parallel=not be.is_gpu,
        )
        out_var = rest if part is None else rest + part
        if do_normalize:
            ksum = sum(_weight(p[k]) * np.float32(kt[k].sum()) for k in used)
            out_img = out_img / ksum
            out_var = out_var / (ksum * ksum)
        out_img = xp.asarray(out_img, dtype=np.float32)
        out_var = xp.asarray(out_var, dtype=np.float32)
        footprint = np.any(kt[used] != 0, axis=0)
        out_msk = dilate_mask(msk, footprint, be)
        return finish_masked_output(mi, out_img, out_var, out_msk, (kh, kw), do_copy_edge)

"""Kernel bases for PSF matching: Alard–Lupton, delta-function (+ regularization), PCA.

Re-implements ip_diffim's ``makeKernelBasisList.py`` and ``BasisLists.cc`` (docs/algorithms.md §1)
and the PCA basis of ``usePcaForSpatialKernel`` (docs/algorithms.md §3.3).  Bases are small, so they
are built on the host as float64 NumPy arrays of shape ``(n_bases, height, width)``; the
solver moves them to the device.  Kernels are stored in afw orientation: index
``[row, col]`` = offset ``(v, u) = (row - ctr, col - ctr)`` and they are applied as a
**correlation** (afw "convolution", docs/algorithms.md §0.1), never flipped.

The regularization of the delta-function basis is in :mod:`gpudiff.psfmatch.regularization`
(its functions are re-exported here).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..errors import InvalidInputError, NonFiniteDataError, PsfMatchingError
from ..image.psf import FWHM_PER_SIGMA

# Re-exported: the regularization lived here before it got a module of its own.
from .regularization import (
    make_regularization_matrix,
    make_regularization_operator,
    regularization_lambda,
)

__all__ = [
    "KernelBasis",
    "alard_lupton_parameters",
    "make_alard_lupton_basis",
    "make_alard_lupton_kernel_basis",
    "renormalize_kernel_list",
    "make_delta_function_basis",
    "make_kernel_basis",
    "make_regularization_operator",
    "make_regularization_matrix",
    "regularization_lambda",
    "pca_basis",
]

#: float32 epsilon: renormalizeKernelList uses the float limit even on double kernels,
#: because a ~1e-16 sum of an odd term would otherwise blow the kernel up when divided.
_KSUM_EPS = float(np.finfo(np.float32).eps)

_KINDS = ("alard-lupton", "delta-function", "pca")


@dataclass(frozen=True)
class KernelBasis:
    """An ordered list of basis kernels ``B_m`` (afw orientation, not flipped).

    Attributes
    ----------
    kernels : numpy.ndarray
        ``(n_bases, height, width)`` float64, a read-only copy of the input.
    kind : str
        ``"alard-lupton"``, ``"delta-function"`` or ``"pca"``.
    sigmas, degrees : tuple
        Gaussian widths (px) and polynomial degrees; Alard–Lupton only.
    separable_x, separable_y, raw_index, mixing : numpy.ndarray or None
        Optional separable factorization of the kernels (built by
        :func:`make_alard_lupton_kernel_basis`, hence by :func:`make_kernel_basis` for
        Alard–Lupton; ``None`` otherwise).  ``separable_x`` is ``(n_xf, width)`` 1-D
        x (column) factors, ``separable_y`` ``(n_yf, height)`` y (row) factors,
        ``raw_index`` ``(n_raw, 2)`` int pairs ``(x-factor, y-factor)`` defining the raw
        separable functions ``raw_r = outer(separable_y[j_r], separable_x[i_r])``, and
        ``mixing`` ``(n_raw, n_bases)`` the linear map with
        ``kernels[m] = Σ_r mixing[r, m] raw_r``.  Either all four are given or none;
        the identity is checked on construction (to round-off).  The design matrices
        use them to correlate with 1-D factors instead of batched 2-D FFTs.
    """

    kernels: np.ndarray
    kind: str
    sigmas: tuple[float, ...] = ()
    degrees: tuple[int, ...] = ()
    separable_x: np.ndarray | None = None
    separable_y: np.ndarray | None = None
    raw_index: np.ndarray | None = None
    mixing: np.ndarray | None = None

    def __post_init__(self):
        if self.kind not in _KINDS:
            raise InvalidInputError(f"KernelBasis.kind must be one of {_KINDS}, got {self.kind!r}")
        k = np.array(self.kernels, dtype=np.float64, copy=True)
        if k.ndim != 3 or 0 in k.shape:
            raise InvalidInputError(
                f"KernelBasis.kernels must be a non-empty 3-D array, got shape {k.shape}"
            )
        k.setflags(write=False)  # a basis is shared by solver, spatial model and results
        object.__setattr__(self, "kernels", k)
        object.__setattr__(self, "sigmas", tuple(float(s) for s in self.sigmas))
        object.__setattr__(self, "degrees", tuple(int(d) for d in self.degrees))
        self._check_factors()

    def _check_factors(self) -> None:
        """Validate (and freeze) the optional separable factorization."""
        parts = (self.separable_x, self.separable_y, self.raw_index, self.mixing)
        if all(p is None for p in parts):
            return
        if any(p is None for p in parts):
            raise InvalidInputError(
                "separable_x, separable_y, raw_index and mixing must be given together"
            )
        fx = np.array(self.separable_x, dtype=np.float64, copy=True)
        fy = np.array(self.separable_y, dtype=np.float64, copy=True)
        idx = np.array(self.raw_index, copy=True)
        mix = np.array(self.mixing, dtype=np.float64, copy=True)
        nb, kh, kw = self.kernels.shape
        if (
            fx.ndim != 2
            or fx.shape[1] != kw
            or fx.shape[0] == 0
            or fy.ndim != 2
            or fy.shape[1] != kh
            or fy.shape[0] == 0
        ):
            raise InvalidInputError(
                f"separable_x/separable_y must be (n, {kw}) and (n, {kh}), got "
                f"{fx.shape} and {fy.shape}"
            )
        if (
            idx.ndim != 2
            or idx.shape[1] != 2
            or idx.shape[0] == 0
            or not np.issubdtype(idx.dtype, np.integer)
        ):
            raise InvalidInputError(
                f"raw_index must be a non-empty (n_raw, 2) integer array, got {idx.shape}"
            )
        idx = idx.astype(np.intp)
        if idx.min() < 0 or idx[:, 0].max() >= fx.shape[0] or idx[:, 1].max() >= fy.shape[0]:
            raise InvalidInputError("raw_index refers to factors that do not exist")
        if mix.shape != (idx.shape[0], nb):
            raise InvalidInputError(
                f"mixing must be (n_raw, n_bases) = ({idx.shape[0]}, {nb}), got {mix.shape}"
            )
        if not (np.all(np.isfinite(fx)) and np.all(np.isfinite(fy)) and np.all(np.isfinite(mix))):
            raise NonFiniteDataError("separable factors contain NaN or inf")
        raw = fy[idx[:, 1], :, None] * fx[idx[:, 0], None, :]
        recon = np.einsum("rhw,rm->mhw", raw, mix)
        scale = max(float(np.abs(self.kernels).max()), np.finfo(np.float64).tiny)
        err = float(np.abs(recon - self.kernels).max()) / scale
        if not err <= 1e-9:  # round-off is ~1e-15; anything larger means mismatched factors
            raise InvalidInputError(
                f"separable factors do not reproduce the kernels (max rel. error {err:.3g})"
            )
        for name, arr in (
            ("separable_x", fx),
            ("separable_y", fy),
            ("raw_index", idx),
            ("mixing", mix),
        ):
            arr.setflags(write=False)
            object.__setattr__(self, name, arr)

    @property
    def separable(self) -> bool:
        """True when the separable factorization (``separable_x`` …) is available."""
        return self.mixing is not None

    @property
    def n_bases(self) -> int:
        return int(self.kernels.shape[0])

    @property
    def height(self) -> int:
        return int(self.kernels.shape[1])

    @property
    def width(self) -> int:
        return int(self.kernels.shape[2])

    @property
    def size(self) -> int:
        """Kernel width (the bases built here are square)."""
        return self.width

    @property
    def constant_first_term(self) -> bool:
        """True when ``B_0`` gets a single constant spatial coefficient (AL, PCA;
        docs/algorithms.md §3)."""
        return self.kind in ("alard-lupton", "pca")


# --- Alard–Lupton --------------------------------------------------------------------


def alard_lupton_parameters(
    config: Any, target_fwhm: float | None = None, reference_fwhm: float | None = None
) -> tuple[tuple[float, ...], tuple[int, ...], int, str]:
    """Gaussian widths, degrees and kernel size of the AL basis (docs/algorithms.md §1.2).

    Parameters
    ----------
    config : PsfMatchConfig
        Supplies the ``alard_*`` and ``kernel_size*`` fields.
    target_fwhm, reference_fwhm : float, optional
        FWHM (px) of the image that will be **convolved** (usually the template) and
        of the image matched **to** (usually the science image).

    Returns
    -------
    sigmas, degrees, size, mode : tuple, tuple, int, str
        ``size`` is odd; ``mode`` is ``"config"`` (fallback, or exactly equal
        widths), ``"convolution"`` or ``"deconvolution"``.

    Raises
    ------
    InvalidInputError
        List lengths differ from ``alard_n_gauss``, an even size, or a bad FWHM.
    """
    n_gauss = int(config.alard_n_gauss)
    sig_cfg = tuple(float(s) for s in config.alard_sig_gauss)
    degrees = tuple(int(d) for d in config.alard_deg_gauss)
    if n_gauss < 1 or len(sig_cfg) != n_gauss or len(degrees) != n_gauss:
        raise InvalidInputError(
            f"alard_sig_gauss ({len(sig_cfg)}) and alard_deg_gauss ({len(degrees)}) need "
            f"alard_n_gauss={n_gauss} entries"
        )

    if target_fwhm is None or reference_fwhm is None or not config.scale_by_fwhm:
        size = int(config.kernel_size)
        if size % 2 == 0:
            raise InvalidInputError(
                f"Only odd-sized Alard-Lupton bases are allowed, kernel_size={size}"
            )
        return sig_cfg, degrees, size, "config"

    for name, v in (("target_fwhm", target_fwhm), ("reference_fwhm", reference_fwhm)):
        if not (math.isfinite(float(v)) and float(v) > 0):
            raise InvalidInputError(f"{name} must be a positive finite FWHM in pixels, got {v!r}")
    sig_t = float(target_fwhm) / FWHM_PER_SIGMA
    sig_r = float(reference_fwhm) / FWHM_PER_SIGMA
    beta = float(config.alard_gauss_beta)

    def calc(a: float, b: float, min_sig: float) -> tuple[float, ...]:
        sig_k = max(math.sqrt(a * a - b * b), min_sig)
        sig = [max(min_sig, sig_k / beta) if n_gauss > 1 else sig_k]
        for _ in range(1, n_gauss):
            sig.append(sig[-1] * beta)
        return tuple(sig)

    if sig_t == sig_r:  # exact float equality, as LSST: keep the configured widths
        sigmas, mode = sig_cfg, "config"
    elif sig_r > sig_t:
        sigmas, mode = calc(sig_r, sig_t, float(config.alard_min_sig)), "convolution"
    else:
        # Roles swapped: the kernel would have to sharpen the target.
        sigmas, mode = calc(sig_t, sig_r, float(config.alard_min_sig_deconv)), "deconvolution"

    size = int(float(config.kernel_size_fwhm_scaling) * sigmas[-1])  # truncation, as int()
    size += 0 if size % 2 else 1  # make it odd
    size = min(int(config.kernel_size_max), max(size, int(config.kernel_size_min)))
    if size % 2 == 0:  # only possible with an even kernel_size_min/max
        raise InvalidInputError(
            f"Alard-Lupton kernel size {size} is even; check kernel_size_min/max"
        )
    return sigmas, degrees, size, mode


def make_alard_lupton_basis(half_width: int, sigmas, degrees) -> np.ndarray:
    """Renormalized Alard–Lupton basis (docs/algorithms.md §1.3).

    Parameters
    ----------
    half_width : int
        ``h``; kernels are ``(2h+1) x (2h+1)``.
    sigmas, degrees : sequence of float, sequence of int
        Gaussian widths (px) and the polynomial degree of each Gaussian.

    Returns
    -------
    numpy.ndarray
        ``(sum_i (d_i+1)(d_i+2)/2, 2h+1, 2h+1)`` float64, renormalized.
    """
    return _alard_lupton(half_width, sigmas, degrees)[0]


def make_alard_lupton_kernel_basis(half_width: int, sigmas, degrees) -> KernelBasis:
    """:func:`make_alard_lupton_basis` as a :class:`KernelBasis` with its separable factors.

    Every raw function is ``G(u, v)·(u/h)^i·(v/h)^j`` with the unit-sum Gaussian
    ``G = g(u)·g(v)`` (``g`` the unit-sum 1-D Gaussian), i.e. the outer product of the
    y factor ``g(v)(v/h)^j`` and the x factor ``g(u)(u/h)^i``; renormalization makes
    every ``B_m`` a linear combination of them (``mixing``).  The kernels are the same
    array :func:`make_alard_lupton_basis` returns.
    """
    kernels, fx, fy, idx, mix = _alard_lupton(half_width, sigmas, degrees)
    return KernelBasis(
        kernels,
        "alard-lupton",
        tuple(sigmas),
        tuple(degrees),
        separable_x=fx,
        separable_y=fy,
        raw_index=idx,
        mixing=mix,
    )


def _alard_lupton(half_width: int, sigmas, degrees):
    """Kernels, x factors, y factors, raw index and mixing of the AL basis."""
    h, sigmas, degrees = int(half_width), [float(s) for s in sigmas], [int(d) for d in degrees]
    if (
        h < 1
        or not sigmas
        or len(sigmas) != len(degrees)
        or min(degrees) < 0
        or not all(math.isfinite(s) and s > 0 for s in sigmas)
    ):
        raise InvalidInputError(
            f"need half_width >= 1 and one degree >= 0 per sigma > 0, got "
            f"half_width={half_width}, sigmas={sigmas}, degrees={degrees}"
        )
    off = np.arange(-h, h + 1, dtype=np.float64)
    u, v = off[None, :], off[:, None]  # u = column offset = x, v = row offset = y
    us, vs = u / h, v / h  # the polynomial spans [-1, 1] across the stamp, not sigma units
    raw, factors, index = [], [], []
    for sig, deg in zip(sigmas, degrees):
        g = np.exp(-(u * u + v * v) / (2.0 * sig * sig))
        g /= g.sum()
        # the same Gaussian as a product of two unit-sum 1-D Gaussians (x and y factors)
        g1 = np.exp(-(off * off) / (2.0 * sig * sig))
        g1 /= g1.sum()
        first = len(factors)
        factors.extend(g1 * (off / h) ** p for p in range(deg + 1))
        # afw PolynomialFunction2 term order: 1, x, y, x², xy, y², x³, x²y, xy², y³, ...
        for px, py in [(d - j, j) for d in range(deg + 1) for j in range(d + 1)]:
            raw.append(g * (us**px) * (vs**py))
            index.append((first + px, first + py))
    kernels, mixing = _renormalize(np.stack(raw))
    fac = np.stack(factors)
    return kernels, fac, fac.copy(), np.array(index, dtype=np.intp), mixing


def renormalize_kernel_list(kernels: np.ndarray) -> np.ndarray:
    """ip_diffim ``renormalizeKernelList`` (docs/algorithms.md §1.3).

    ``B_0`` is scaled to unit sum.  Every later kernel with ``|sum| > 1.1920929e-7``
    is scaled to unit sum and has ``B_0`` subtracted; kernels whose sum is already ~0
    (odd polynomial terms) are left alone.  Each later kernel is then scaled to unit
    L2 norm.  Hence ``ΣB_0 = 1``, ``ΣB_i = 0`` and ``ΣB_i² = 1`` for ``i ≥ 1``.

    Parameters
    ----------
    kernels : numpy.ndarray
        ``(n, height, width)``; not modified (a new float64 array is returned).

    Raises
    ------
    InvalidInputError
        Not 3-D, ``B_0`` sums to ~0, or a later kernel has zero norm.
    """
    return _renormalize(kernels)[0]


def _renormalize(kernels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """:func:`renormalize_kernel_list` and its linear map ``A`` (``(n, n)``):
    ``out[m] = Σ_r A[r, m] kernels[r]`` (tracked step by step, so exact to round-off)."""
    k = np.array(kernels, dtype=np.float64, copy=True)
    if k.ndim != 3:
        raise InvalidInputError(f"kernels must be (n, height, width), got shape {k.shape}")
    a = np.eye(k.shape[0])
    if k.shape[0] == 0:
        return k, a
    s0 = k[0].sum()
    if abs(s0) <= _KSUM_EPS:
        raise InvalidInputError("the first kernel sums to ~0 and cannot be normalized to unit sum")
    k[0] /= s0
    a[:, 0] /= s0
    for i in range(1, k.shape[0]):
        s = k[i].sum()
        if abs(s) > _KSUM_EPS:
            k[i] = k[i] / s - k[0]
            a[:, i] = a[:, i] / s - a[:, 0]
        norm = math.sqrt(float(np.sum(k[i] * k[i])))
        if norm == 0.0:
            raise InvalidInputError(f"kernel {i} has zero norm after renormalization")
        k[i] /= norm
        a[:, i] /= norm
    return k, a


# --- Delta function ------------------------------------------------------------------


def make_delta_function_basis(width: int, height: int) -> np.ndarray:
    """``width*height`` kernels, each a single 1, enumerated row-major (docs/algorithms.md §1.4).

    Kernel ``m`` has its 1 at ``(row, col) = divmod(m, width)``; they are not
    renormalized (each sums to 1).
    """
    w, h = int(width), int(height)
    if w < 1 or h < 1:
        raise InvalidInputError(f"width and height must be positive, got {width}, {height}")
    # identity rows reshaped: row m has its 1 at flat index m = row*w + col.
    return np.eye(w * h, dtype=np.float64).reshape(w * h, h, w)


def make_kernel_basis(
    config: Any, target_fwhm: float | None = None, reference_fwhm: float | None = None
) -> KernelBasis:
    """The basis named by ``config.kernel_basis_set`` (``makeKernelBasisList``).

    Alard–Lupton widths and size follow :func:`alard_lupton_parameters`.  The
    delta-function size is always ``config.kernel_size`` (no FWHM scaling).  afw
    accepts any DF size, but here it must be **odd**: every kernel in gpudiff is
    centred at ``size // 2``, and an even kernel has no centre pixel, which would
    shift the matched image by half a pixel.  Raises InvalidInputError for an
    unknown basis set, an even DF size or an invalid AL configuration.
    """
    kind = config.kernel_basis_set
    if kind == "alard-lupton":
        sigmas, degrees, size, _ = alard_lupton_parameters(config, target_fwhm, reference_fwhm)
        return make_alard_lupton_kernel_basis(size // 2, sigmas, degrees)
    if kind == "delta-function":
        size = int(config.kernel_size)
        if size < 1 or size % 2 == 0:
            raise InvalidInputError(
                f"delta-function kernel_size must be odd and positive, got {size}"
            )
        return KernelBasis(make_delta_function_basis(size, size), kind)
    raise InvalidInputError(f"Cannot generate {kind!r} basis set")


# --- PCA -----------------------------------------------------------------------------


def pca_basis(
    kernel_images: np.ndarray,
    n_components: int = 5,
    *,
    subtract_mean: bool = True,
    normalize_sums: bool = True,
) -> KernelBasis:
    """Karhunen–Loève (PCA) basis of per-candidate kernel images (docs/algorithms.md §3.3).

    Parameters
    ----------
    kernel_images : numpy.ndarray
        ``(n_images, height, width)`` single-candidate kernel images.
    n_components : int
        Length of the returned list, **including** the mean kernel when
        ``subtract_mean`` (LSST ``numPrincipalComponents``); fewer if fewer exist.
    subtract_mean : bool
        Subtract the mean image before the PCA and put it first in the list.
    normalize_sums : bool
        Divide each image by its sum first, as LSST's ``KernelPcaVisitor`` does,
        so every candidate has equal weight regardless of its kernel sum.

    Returns
    -------
    KernelBasis
        ``kind="pca"``: ``[mean] + eigen-kernels`` (each eigen-image divided by its
        element of largest |value|), renormalized by :func:`renormalize_kernel_list`.
        Eigen-images with round-off-level eigenvalues are dropped.

    Raises
    ------
    PsfMatchingError
        The eigenvalues sum to 0 (e.g. identical images after mean subtraction).
    InvalidInputError
        Bad shape, non-finite input (NonFiniteDataError), ~0 sum with ``normalize_sums``.
    """
    x = np.array(kernel_images, dtype=np.float64, copy=True)
    if x.ndim != 3 or 0 in x.shape or int(n_components) < 1:
        raise InvalidInputError(
            f"need (n, height, width) images and n_components >= 1, got "
            f"shape {x.shape}, n_components={n_components}"
        )
    if not np.all(np.isfinite(x)):
        raise NonFiniteDataError("kernel_images contain NaN or inf")
    n_img, kh, kw = x.shape
    flat = x.reshape(n_img, kh * kw)
    if normalize_sums:
        sums = flat.sum(axis=1)
        bad = np.flatnonzero(np.abs(sums) <= _KSUM_EPS)
        if bad.size:
            raise InvalidInputError(
                f"kernel images {bad.tolist()} sum to ~0 and cannot be normalized"
            )
        flat = flat / sums[:, None]
    scale = float(np.linalg.norm(flat))
    kernels = []
    if subtract_mean:
        mean = flat.mean(axis=0)
        flat = flat - mean
        kernels.append(mean)
    # The right singular vectors are the eigen-images of the image covariance, ordered
    # by eigenvalue s²; an SVD avoids forming the (n_pix x n_pix) covariance.
    _, s, vt = np.linalg.svd(flat, full_matrices=False)
    # Eigenvalues at round-off level (relative to the data) are 0: their eigenvectors are
    # arbitrary numerical noise, so drop them rather than hand the solver garbage bases.
    tol = max(flat.shape) * np.finfo(np.float64).eps * max(scale, 1e-300)
    if not s[0] > tol:
        raise PsfMatchingError("PCA of the kernel images failed: eigenvalues sum to 0")
    keep = s > tol
    for vec in vt[keep]:
        extreme = vec[np.argmax(np.abs(vec))]  # element of largest |value|, sign kept
        kernels.append(vec / extreme)
    kernels = kernels[: int(n_components)]
    kernels = [k for k in kernels if np.all(np.isfinite(k))]
    out = renormalize_kernel_list(np.stack(kernels).reshape(len(kernels), kh, kw))
    return KernelBasis(out, "pca")

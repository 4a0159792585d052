"""Batched per-candidate kernel solutions (docs/algorithms.md §2.2–§2.4).

Every step works on all candidates at once: the basis correlations of every template stamp
(separable 1-D correlations as GEMMs for Alard–Lupton bases, batched FFTs otherwise), the
normal matrices (one batched GEMM), the float64 solves (one batched LU, with an eigen
pseudo-inverse for the singular ones), and the residual statistics.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Sequence

import numpy as np

from ..backend import Backend
from ..backend.threads import cpu_workers, parallel_map
from ..ops._host import fetch
from ..ops.convolution import kernel_centre

__all__ = [
    "StampFit",
    "valid_correlate",
    "design_matrices",
    "fit_stamps",
    "residual_statistics",
    "residual_sums",
    "residual_moments",
    "solve_symmetric",
    "solve_symmetric_fetch",
]

#: Bytes of the complex (chunk, [n_bases,] F, F/2+1) product per FFT chunk: bounds that
#: temporary.  Chunks of equal transforms, so the results do not depend on it.
_CHUNK_BYTES = 1 << 28


def valid_correlate(backend: Backend, stamps: Any, kernels: Any, per_stamp: bool = False) -> Any:
    """'Valid' afw correlations of stamps with kernels, batched by FFT, in float64.

    Parameters
    ----------
    stamps : (n, S, S)
    kernels : (m, k, k) shared by all stamps, or (n, k, k) one per stamp (``per_stamp``)

    Returns
    -------
    (n, m, G, G) or, with ``per_stamp``, (n, G, G); G = S − k + 1.  Output [r, c]
    corresponds to stamp pixel (r + ctrY, c + ctrX).
    """
    xp, fft = backend.xp, backend.fft
    n, S, _ = stamps.shape
    k = kernels.shape[-1]
    G = S - k + 1
    # A circular correlation of length >= S has no wrap-around in its first G outputs.
    F = fft.next_fast_len(S, True) if hasattr(fft, "next_fast_len") else S
    fkw = backend.fft_kwargs
    fk = xp.conj(fft.rfft2(kernels, s=(F, F), axes=(-2, -1), **fkw))
    outs = []
    per_cand = 16 * F * (F // 2 + 1) * (1 if per_stamp else int(kernels.shape[0]))
    chunk = max(1, _CHUNK_BYTES // per_cand)
    for start in range(0, n, chunk):
        fs = fft.rfft2(stamps[start : start + chunk], s=(F, F), axes=(-2, -1), **fkw)
        if per_stamp:
            prod = fs * fk[start : start + chunk]
        else:
            prod = fs[:, None] * fk[None]
        full = fft.irfft2(prod, s=(F, F), axes=(-2, -1), **fkw)
        outs.append(full[..., :G, :G])
    return (
        xp.concatenate(outs, axis=0)
        if outs
        else xp.zeros((0,) + ((G, G) if per_stamp else (kernels.shape[0], G, G)))
    )


def design_matrices(backend: Backend, template: Any, basis: Any, fit_for_background: bool) -> Any:
    """C of every candidate: (n, G², n_bases [+1]) — template ⊗ B_j on the good region,
    plus a column of ones for the differential background.

    ``basis`` is a :class:`~gpudiff.psfmatch.basis.KernelBasis` or an ``(n_bases, k, k)``
    kernel array.  A basis with a separable factorization (Alard–Lupton, built by
    ``make_kernel_basis``) takes the separable path (1-D correlations as GEMMs,
    :func:`_separable_design`); anything else the batched FFTs of :func:`valid_correlate`.
    Both agree to float64 round-off.
    """
    xp = backend.xp
    if getattr(basis, "mixing", None) is not None:
        return _separable_design(backend, template, basis, fit_for_background)
    kernels = getattr(basis, "kernels", basis)
    kernels = backend.asarray(kernels, dtype=np.float64)
    conv = valid_correlate(backend, template, kernels)  # (n, nb, G, G)
    n, nb, G, _ = conv.shape
    C = xp.moveaxis(conv.reshape(n, nb, G * G), 1, 2)
    if fit_for_background:
        C = xp.concatenate([C, xp.ones((n, G * G, 1), dtype=C.dtype)], axis=2)
    return xp.ascontiguousarray(C)


#: Candidates per chunk of the separable design matrices, host / device: bounds the X and R
#: temporaries (~0.2 MB per candidate for 43² stamps and the default 27 bases; small chunks
#: stay in the CPU caches, large ones keep the GPU busy).
_SEP_CHUNK = 32
_SEP_CHUNK_GPU = 1024


def _toeplitz(factors: np.ndarray, n_in: int) -> np.ndarray:
    """``(n_f, n_out, n_in)`` banded matrices ``M[f, o, o + t] = factors[f, t]``: a 'valid'
    1-D correlation of a length-``n_in`` signal with each factor is ``M[f] @ signal``."""
    nf, k = factors.shape
    n_out = n_in - k + 1
    m = np.zeros((nf, n_out, n_in))
    rows = np.arange(n_out)[:, None]
    m[:, rows, rows + np.arange(k)[None, :]] = factors[:, None, :]
    return m


def _separable_design(be: Backend, template: Any, basis: Any, fit_for_background: bool) -> Any:
    """Design matrices from the separable factors of ``basis`` (docs/algorithms.md §2.2, §1.3).

    With raw functions ``raw_r = outer(fy_{j_r}, fx_{i_r})`` and ``B_m = Σ_r A[r, m] raw_r``:

    1. every stamp row is correlated with every x factor — one GEMM of the stamps,
       as ``(n·S_y, S_x)``, with the stacked banded (Toeplitz) matrices of the factors;
    2. for each x factor, the column correlations with the y factors of the raw functions
       that use it — one batched GEMM per x factor (raw functions grouped by x factor);
    3. ``C = R @ A``; the background column is then set to 1.

    Every output is the same sum of products as the direct correlation (the zeros of the
    banded matrices add exactly), so C matches the FFT path to float64 round-off.
    """
    xp = be.xp
    fx = np.asarray(basis.separable_x, dtype=np.float64)
    fy = np.asarray(basis.separable_y, dtype=np.float64)
    idx = np.asarray(basis.raw_index)
    mix = np.asarray(basis.mixing, dtype=np.float64)
    n_raw, nb = mix.shape
    n, Sy, Sx = template.shape
    kh, kw = fy.shape[1], fx.shape[1]
    Gy, Gx = Sy - kh + 1, Sx - kw + 1
    nxf = fx.shape[0]
    nc_out = nb + (1 if fit_for_background else 0)

    # raw functions grouped by x factor (stable: afw order within a group)
    order = np.argsort(idx[:, 0], kind="stable")
    idx, mix = idx[order], mix[order]
    a_ext = np.zeros((n_raw, nc_out))  # the background column (if any) is filled below
    a_ext[:, :nb] = mix

    # step 1 operand: (Sx, nxf·Gx), column f·Gx + c holds x factor f at output column c
    tx = _toeplitz(fx, Sx)  # (nxf, Gx, Sx)
    tx_all = be.asarray(np.ascontiguousarray(tx.transpose(2, 0, 1).reshape(Sx, nxf * Gx)))
    ty = _toeplitz(fy, Sy)  # (nyf, Gy, Sy)
    groups = []
    for f in np.unique(idx[:, 0]):
        r = np.flatnonzero(idx[:, 0] == f)  # contiguous after the sort
        tyf = ty[idx[r, 1]].reshape(len(r) * Gy, Sy)
        groups.append((int(f), int(r[0]), int(r[-1]) + 1, be.asarray(np.ascontiguousarray(tyf))))
    a_dev = be.asarray(a_ext)
    chunk = _SEP_CHUNK_GPU if be.is_gpu else _SEP_CHUNK

    C = xp.empty((n, Gy * Gx, nc_out), dtype=np.float64)

    def one_chunk(start: int) -> None:
        t = be.asarray(template[start : start + chunk], dtype=np.float64)
        m = t.shape[0]
        # (1) row-wise correlations: X[i, y, f·Gx + c] = Σ_u T[i, y, c + u] fx_f[u]
        X = xp.matmul(t.reshape(m * Sy, Sx), tx_all).reshape(m, Sy, nxf * Gx)
        # (2) column-wise correlations of each raw function: R[i, r, y', c]
        R = xp.empty((m, n_raw, Gy, Gx), dtype=np.float64)
        for f, r0, r1, tyf in groups:
            R[:, r0:r1] = xp.matmul(tyf, X[:, :, f * Gx : (f + 1) * Gx]).reshape(m, r1 - r0, Gy, Gx)
        # (3) renormalization map: C[i, p, j] = Σ_r R[i, r, p] A[r, j]
        xp.matmul(xp.swapaxes(R.reshape(m, n_raw, Gy * Gx), 1, 2), a_dev, out=C[start : start + m])

    # Chunks write their own rows of C: on the CPU one thread per core (the products
    # release the GIL; the same bits as one after the other).
    starts = range(0, n, chunk)
    parallel_map(one_chunk, starts, cpu_workers(len(starts), parallel=not be.is_gpu))
    if fit_for_background:
        C[:, :, nb] = 1.0
    return C


def good_region(stamps: Any, kernel_shape) -> Any:
    """The stamps restricted to where the kernel fits (afw ``shrinkBBox``), flattened."""
    cy, cx = kernel_centre(kernel_shape)
    S = stamps.shape[-1]
    G = S - kernel_shape[0] + 1
    g = stamps[:, cy : cy + G, cx : cx + G]
    return g.reshape(g.shape[0], G * G)


def solve_symmetric(backend: Backend, M: Any, b: Any) -> tuple[Any, np.ndarray]:
    """Solve a batch of symmetric systems M a = b in float64.

    LU first (afw: full-pivot LU); systems whose LU fails or gives non-finite values are
    solved with the eigen pseudo-inverse (1/λ for λ above round-off, 0 otherwise), as afw
    does for non-invertible matrices.  Returns (a, used_pinv flags on the host).
    """
    a, pinv, _ = solve_symmetric_fetch(backend, M, b)
    return a, pinv


def solve_symmetric_fetch(
    backend: Backend, M: Any, b: Any, derive: Callable[[Any], Sequence[Any]] | None = None
) -> tuple[Any, np.ndarray, tuple[np.ndarray, ...]]:
    """:func:`solve_symmetric`, and host copies of ``derive(a)`` in the same transfer.

    The solutions' finiteness flags cross to the host together with the arrays the caller
    needs from them (kernel sums, backgrounds, eigenvalues…): one host sync instead of
    one per array.  In the rare case that a system needs the pseudo-inverse, ``derive``
    is evaluated again on the corrected solutions and fetched once more.

    Returns
    -------
    a : backend array (n, p)
    used_pinv : numpy.ndarray of bool (n,)
    derived : tuple of numpy.ndarray
        ``derive(a)`` on the host (empty without ``derive``).
    """
    xp = backend.xp
    n = M.shape[0]
    pinv = np.zeros(n, dtype=bool)

    def derived(a):
        return tuple(derive(a)) if derive is not None else ()

    try:
        a = backend.linalg.solve(M, b[..., None])[..., 0]
        finite, *host = fetch(backend, xp.isfinite(a).all(axis=-1), *derived(a))
        bad = ~finite
    except np.linalg.LinAlgError:
        a = xp.zeros_like(b)
        bad, host = np.ones(n, dtype=bool), None
    except Exception as exc:  # CuPy raises its own LinAlgError type
        if type(exc).__name__ != "LinAlgError":
            raise
        a = xp.zeros_like(b)
        bad, host = np.ones(n, dtype=bool), None
    if bad.any():
        sel = xp.asarray(np.flatnonzero(bad))
        w, v = backend.linalg.eigh(M[sel])
        tol = xp.abs(w).max(axis=-1, keepdims=True) * (M.shape[-1] * np.finfo(np.float64).eps)
        inv = xp.where(xp.abs(w) > tol, 1.0 / xp.where(w == 0, 1.0, w), 0.0)
        vt_b = xp.einsum("nji,nj->ni", v, b[sel])
        a[sel] = xp.einsum("nij,nj->ni", v, inv * vt_b)
        pinv[bad] = True
        host = None
    if host is None:
        host = fetch(backend, *derived(a))
    return a, pinv, tuple(host)


@dataclass
class StampFit:
    """Single-kernel solutions of a batch of candidates (host float64 unless noted)."""

    coeffs: Any  # (n, p) backend float64: basis coefficients (+ background last)
    kernel_sum: np.ndarray  # (n,)
    background: np.ndarray  # (n,) (0 when not fitted)
    condition: np.ndarray  # (n,) eigenvalue or SVD condition number (NaN when not computed)
    used_pinv: np.ndarray  # (n,) bool
    M: Any  # (n, p, p) backend: normal matrices (reused by the spatial fit)
    b: Any  # (n, p) backend
    also: tuple = ()  # host copies of ``also(coeffs)`` (see fit_stamps)


def fit_stamps(
    backend: Backend,
    C: Any,
    science_good: Any,
    variance_good: Any,
    basis_sums: np.ndarray,
    *,
    constant_variance_weighting: bool = True,
    fit_for_background: bool = False,
    regularization: Any = None,
    lambda_type: str = "absolute",
    lambda_value: float = 0.2,
    lambda_scaling: float = 1e-4,
    condition_type: str | None = None,
    also: Callable[[Any], Sequence[Any]] | None = None,
) -> StampFit:
    """Normal equations and solutions of every candidate (docs/algorithms.md §2.2).

    ``variance_good`` is var_I + var_T on the good region.  With constant weighting the
    weight is 1/median(V) per candidate (1 when the median is not positive).
    ``regularization`` (H, delta-function basis) adds λH to M.  ``also(coeffs)``: backend
    arrays derived from the solutions (e.g. :func:`residual_sums`), fetched
    with the kernel sums in one transfer into ``StampFit.also``.
    """
    xp = backend.xp
    if constant_variance_weighting:
        med = xp.median(variance_good, axis=1)
        wgt = 1.0 / xp.where(med > 0, med, 1.0)
        Ct = xp.swapaxes(C, 1, 2)
        M = xp.matmul(Ct, C) * wgt[:, None, None]
        b = xp.matmul(Ct, science_good[..., None])[..., 0] * wgt[:, None]
    else:
        w = 1.0 / variance_good
        Ctw = xp.swapaxes(C * w[..., None], 1, 2)
        M = xp.matmul(Ctw, C)
        b = xp.matmul(Ctw, science_good[..., None])[..., 0]
    M = 0.5 * (M + xp.swapaxes(M, 1, 2))
    Msolve = M
    if regularization is not None:
        H = xp.asarray(regularization, dtype=np.float64)
        if lambda_type == "relative":
            lam = lambda_scaling * xp.trace(M, axis1=1, axis2=2) / xp.trace(H)
        else:
            lam = xp.full(M.shape[0], float(lambda_value))
        Msolve = M + lam[:, None, None] * H[None]
    nb = len(basis_sums)
    sums = xp.asarray(basis_sums, dtype=np.float64)

    n_own = 2 if fit_for_background else 1

    def derive(a):
        # Kernel sums (and backgrounds) cross to the host with the solutions' flags.
        own = (a[:, :nb] @ sums,) + ((a[:, nb],) if fit_for_background else ())
        return own + (tuple(also(a)) if also is not None else ())

    a, pinv, got = solve_symmetric_fetch(backend, Msolve, b, derive)
    ksum = got[0]
    bg = got[1] if fit_for_background else np.zeros(a.shape[0])
    cond = np.full(a.shape[0], np.nan)
    if condition_type == "EIGENVALUE":
        w = xp.abs(backend.linalg.eigvalsh(Msolve))
        cond = backend.asnumpy(w.max(axis=1) / w.min(axis=1))
    elif condition_type == "SVD":
        s = backend.linalg.svd(Msolve, compute_uv=False)
        cond = backend.asnumpy(s.max(axis=1) / s.min(axis=1))
    return StampFit(
        coeffs=a,
        kernel_sum=ksum,
        background=bg,
        condition=cond,
        used_pinv=pinv,
        M=M,
        b=b,
        also=tuple(got[n_own:]),
    )


def residual_statistics(
    backend: Backend,
    C: Any,
    coeffs: Any,
    science_good: Any,
    science_var_good: Any,
    template_var: Any,
    kernels: Any,
    core_radius: int | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Mean and rms of z = D/√var_D over each candidate's good region (docs/algorithms.md §2.3).

    D = I − (K ⊗ T + bg) = I − C·a and var_D = var_I + K² ⊗ var_T, K = Σ_j a_j B_j the
    kernel of each candidate.  ``core_radius`` restricts the statistics to the central
    (2r+1)² box (``useCoreStats``).  Returns host (mean, rms, npix).
    """
    sums = residual_sums(
        backend, C, coeffs, science_good, science_var_good, template_var, kernels, core_radius
    )
    return residual_moments(*fetch(backend, *sums))  # one transfer


def residual_sums(
    backend: Backend,
    C: Any,
    coeffs: Any,
    science_good: Any,
    science_var_good: Any,
    template_var: Any,
    kernels: Any,
    core_radius: int | None = None,
) -> tuple[Any, Any, Any]:
    """The per-candidate sums behind :func:`residual_statistics`, backend arrays (not
    fetched): (Σz, Σz², npix) over the usable pixels.  :func:`residual_moments` turns
    their host copies into (mean, rms, npix): those few per-candidate operations run on
    the host rather than as a dozen small device launches."""
    xp = backend.xp
    nb = kernels.shape[0]
    n = C.shape[0]
    D = science_good - xp.matmul(C, coeffs[..., None])[..., 0]
    K = xp.einsum("ni,ijk->njk", coeffs[:, :nb], kernels)
    kvar = valid_correlate(backend, template_var, K * K, per_stamp=True).reshape(n, -1)
    var = science_var_good + kvar
    with np.errstate(divide="ignore", invalid="ignore"):  # var <= 0 or NaN: excluded below
        z = D / xp.sqrt(var)
    G = int(round(np.sqrt(z.shape[1])))
    ok = xp.isfinite(z) & (var > 0)
    if core_radius is not None:
        c = G // 2
        core = np.zeros((G, G), dtype=bool)
        core[
            max(c - core_radius, 0) : c + core_radius + 1,
            max(c - core_radius, 0) : c + core_radius + 1,
        ] = True
        ok &= backend.asarray(core.reshape(1, -1))
    zz = xp.where(ok, z, 0.0)
    return zz.sum(axis=1), (zz * zz).sum(axis=1), ok.sum(axis=1)


def residual_moments(
    s1: np.ndarray, s2: np.ndarray, npix: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Host (mean, rms, npix) from the sums of :func:`residual_sums`: NaN mean without a
    usable pixel, NaN rms with fewer than two."""
    N = np.maximum(npix, 1).astype(np.float64)
    mean = s1 / N
    varz = s2 / N - mean * mean
    varz = varz * N / np.maximum(N - 1, 1)
    rms = np.sqrt(np.maximum(varz, 0))
    mean = np.where(npix > 0, mean, np.nan)
    rms = np.where(npix > 1, rms, np.nan)
    return mean, rms, npix

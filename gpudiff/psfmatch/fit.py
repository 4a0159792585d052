"""The PSF-matching fit: single kernels, clipping, the spatial model (spec §2.3–§3).

:func:`fit_spatial_kernel` runs LSST's ``PsfMatchTask._solve`` loop on a
:class:`~gpudiff.psfmatch.candidates.KernelCandidates` set.  Single-kernel solutions are
computed for every candidate in one batch up front: a candidate's solution does not depend
on the others, so this visits exactly the candidates afw's cell visitor would, in one pass.
"""

from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np
from astropy.table import Table

from ..backend import Backend, clipped_stack
from ..errors import InsufficientKernelSourcesError, PsfMatchingError
from ..image import Box
from .basis import KernelBasis, make_regularization_matrix, pca_basis
from .candidates import BAD, GOOD, KernelCandidates, visit_order
from .config import PsfMatchConfig
from .solve import design_matrices, fit_stamps, good_region, residual_statistics, solve_symmetric
from .spatial import SpatialFunctions, SpatialKernel

__all__ = ["KernelFit", "fit_spatial_kernel", "spatial_expansion"]

log = logging.getLogger("gpudiff.psfmatch")


@dataclass
class KernelFit:
    """Result of the kernel fit.

    Attributes
    ----------
    kernel : SpatialKernel
    candidates : KernelCandidates
        With final status and rejection reasons.
    n_iterations : int
        Spatial iterations run.
    n_used : int
        Candidates in the final spatial fit.
    spatial_condition : float
        Eigenvalue condition number of the spatial system.
    single_kernel_sum, single_background, residual_mean, residual_rms : ndarray
        Per candidate (NaN where never solved).
    """

    kernel: SpatialKernel
    candidates: KernelCandidates
    n_iterations: int
    n_used: int
    spatial_condition: float
    single_kernel_sum: np.ndarray
    single_background: np.ndarray
    residual_mean: np.ndarray
    residual_rms: np.ndarray
    used: np.ndarray

    @property
    def kernel_sum(self) -> float:
        """ΣK at the centre of the fit region."""
        return self.kernel.kernel_sum()

    def candidate_table(self) -> Table:
        """One row per candidate: position, rating, status, reason, single-kernel figures."""
        c = self.candidates
        status = np.where(c.status == BAD, "BAD", np.where(c.status == GOOD, "GOOD", "UNKNOWN"))
        return Table({
            "source_index": c.source_index, "x": c.x, "y": c.y, "rating": c.rating,
            "status": status, "used": self.used, "reason": np.array(c.reason, dtype=str),
            "kernel_sum": self.single_kernel_sum, "background": self.single_background,
            "residual_mean": self.residual_mean, "residual_rms": self.residual_rms,
        })


class _Stage:
    """Design matrices, good-region data and solutions of candidates for one basis."""

    def __init__(self, be: Backend, cands: KernelCandidates, idx: np.ndarray, basis: KernelBasis,
                 config: PsfMatchConfig):
        xp = be.xp
        self.be, self.idx, self.basis = be, idx, basis
        sel = xp.asarray(idx)
        kern = be.asarray(basis.kernels, dtype=np.float64)
        self.kernels = kern
        kshape = basis.kernels.shape[1:]
        fit_bg = config.fit_for_background
        self.C = design_matrices(be, cands.template[sel], basis, fit_bg)
        self.sci = good_region(cands.science[sel], kshape)
        self.sci_var = good_region(cands.science_var[sel], kshape)
        self.tmpl_var = cands.template_var[sel]
        var_sum = self.sci_var + good_region(cands.template_var[sel], kshape)
        H = None
        if basis.kind == "delta-function" and config.use_regularization:
            H = make_regularization_matrix(config, basis.width, basis.height, fit_bg)
        self.fit = fit_stamps(
            be, self.C, self.sci, var_sum, basis.kernels.sum(axis=(1, 2)),
            constant_variance_weighting=config.constant_variance_weighting,
            fit_for_background=fit_bg, regularization=H, lambda_type=config.lambda_type,
            lambda_value=config.lambda_value, lambda_scaling=config.lambda_scaling,
            condition_type=config.condition_number_type if config.check_condition_number else None)
        self.core = config.candidate_core_radius if config.use_core_stats else None

    def rows(self, which: np.ndarray) -> np.ndarray:
        """Positions in this stage of candidate indices ``which``."""
        return np.searchsorted(self.idx, which)

    def stats(self, coeffs: Any, rows: np.ndarray):
        be = self.be
        r = be.xp.asarray(rows)
        return residual_statistics(be, self.C[r], coeffs, self.sci[r], self.sci_var[r],
                                   self.tmpl_var[r], self.kernels, self.core)


def _clip_single(cands: KernelCandidates, which: np.ndarray, mean: np.ndarray, rms: np.ndarray,
                 config: PsfMatchConfig, what: str) -> int:
    """Spec §2.3 thresholds; returns the number rejected."""
    bad_nan = ~(np.isfinite(mean) & np.isfinite(rms))
    cands.reject(which[bad_nan], f"{what} residual statistics are NaN")
    n = int(bad_nan.sum())
    clip = config.single_kernel_clipping if what == "single-kernel" else config.spatial_kernel_clipping
    if clip:
        hi_mean = ~bad_nan & (np.abs(mean) > config.candidate_residual_mean_max)
        hi_rms = ~bad_nan & ~hi_mean & (rms > config.candidate_residual_std_max)
        cands.reject(which[hi_mean], f"{what} residual |mean| > {config.candidate_residual_mean_max}")
        cands.reject(which[hi_rms], f"{what} residual rms > {config.candidate_residual_std_max}")
        n += int(hi_mean.sum() + hi_rms.sum())
    return n


def spatial_expansion(basis: KernelBasis, x: np.ndarray, y: np.ndarray, config: PsfMatchConfig,
                      region: Box) -> tuple[np.ndarray, SpatialFunctions, SpatialFunctions | None]:
    """E (n, p, N): per-candidate coefficients a = E·c of the global spatial unknowns c.

    a_m(x, y) = Σ_k c_mk p_k(x, y) (a single constant c_00 for m = 0 with a constant first
    term) and bg(x, y) = Σ c_b p_b(x, y): the normal-equation accumulation of spec §3 is
    then Σ_c E_cᵀ M_c E_c, one batched contraction.
    """
    fk = SpatialFunctions(config.spatial_model_type, config.spatial_kernel_order, region)
    pk = fk.matrix(x, y)
    nb, nk = basis.n_bases, fk.n_terms
    fb = None
    nbg = 0
    if config.fit_for_background:
        fb = SpatialFunctions(config.spatial_model_type, config.spatial_bg_order, region)
        nbg = fb.n_terms
    const = basis.constant_first_term
    N = ((nb - 1) * nk + 1 if const else nb * nk) + nbg
    p = nb + (1 if config.fit_for_background else 0)
    E = np.zeros((len(x), p, N))
    col = 0
    for m in range(nb):
        if m == 0 and const:
            E[:, 0, 0] = 1.0
            col = 1
        else:
            E[:, m, col:col + nk] = pk
            col += nk
    if fb is not None:
        E[:, nb, col:col + nbg] = fb.matrix(x, y)
    return E, fk, fb


def _spatial_solve(be: Backend, stage: _Stage, which: np.ndarray, cands: KernelCandidates,
                   config: PsfMatchConfig, region: Box):
    xp = be.xp
    rows = stage.rows(which)
    E, fk, fb = spatial_expansion(stage.basis, cands.x[which], cands.y[which], config, region)
    Ed = xp.asarray(E)
    r = xp.asarray(rows)
    # Σ_c E_cᵀ M_c E_c as one batched matmul and one GEMM (an einsum over three
    # operands does not use BLAS).
    n, p, N = Ed.shape
    ME = xp.matmul(stage.fit.M[r], Ed).reshape(n * p, N)
    Ef = Ed.reshape(n * p, N)
    A = Ef.T @ ME
    rhs = Ef.T @ stage.fit.b[r].reshape(n * p)
    A = 0.5 * (A + A.T)
    c, _ = solve_symmetric(be, A[None], rhs[None])
    c = c[0]
    w = be.asnumpy(xp.abs(be.linalg.eigvalsh(A)))
    cond = float(w.max() / w.min()) if w.min() > 0 else float("inf")
    if cond > config.max_spatial_condition_number:
        warnings.warn(f"spatial kernel system is ill-conditioned (condition number {cond:.3g} > "
                      f"{config.max_spatial_condition_number:.3g})", RuntimeWarning, stacklevel=3)
    coeffs_per_cand = Ed @ c
    ch = be.asnumpy(c)
    nb, nk = stage.basis.n_bases, fk.n_terms
    K = np.zeros((nb, nk))
    col = 0
    for m in range(nb):
        if m == 0 and stage.basis.constant_first_term:
            K[0, 0] = ch[0]
            col = 1
        else:
            K[m] = ch[col:col + nk]
            col += nk
    bgc = ch[col:] if fb is not None else None
    kernel = SpatialKernel(stage.basis, K, fk, bgc, fb)
    return kernel, coeffs_per_cand, cond


def _ksum_clip(cands: KernelCandidates, which: np.ndarray, ksum: np.ndarray, config: PsfMatchConfig) -> int:
    """Spec §2.4: reject |kSum − MEANCLIP| > max_ksum_sigma · STDEVCLIP."""
    if not config.kernel_sum_clipping or which.size < 2:
        return 0
    # The stack kernel works in float32: clip the deviations from the median so their
    # precision is relative to the spread, not to the kernel sum itself.
    med = float(np.median(ksum))
    dev = ksum - med
    mean, var, _ = clipped_stack(dev.astype(np.float32), np.zeros(ksum.size, bool), backend="numpy")
    mu = med + float(mean)
    s = float(np.sqrt(var)) if np.isfinite(var) else 0.0
    # Departure from afw: when every candidate agrees to round-off (noiseless data) afw's
    # 3σ test rejects on rounding noise; floor the width at 1e-9 of the kernel sum.
    s = max(s, 1e-9 * abs(mu))
    out = np.abs(ksum - mu) > config.max_ksum_sigma * s
    for i, v in zip(which[out], ksum[out]):
        cands.reject([i], f"kernel sum {v:.4g} outside {mu:.4g} ± {config.max_ksum_sigma}×{s:.3g}")
    return int(out.sum())


def _require(cands: KernelCandidates, which: np.ndarray, config: PsfMatchConfig) -> None:
    need = config.n_spatial_kernel_terms
    if config.fit_for_background:
        need = max(need, config.n_spatial_bg_terms)
    if which.size < max(1, need):
        reasons = {}
        for r in cands.reason:
            if r:
                key = r.split(" ")[0:3]
                reasons[" ".join(key)] = reasons.get(" ".join(key), 0) + 1
        raise InsufficientKernelSourcesError(
            f"only {which.size} usable kernel candidate(s) for a spatial model with {need} terms "
            f"({len(cands)} candidates, {int((cands.status == BAD).sum())} rejected"
            + (f": {reasons}" if reasons else "")
            + f"; {len(cands.rejected)} sources rejected before fitting)")


def fit_spatial_kernel(cands: KernelCandidates, basis: KernelBasis, config: PsfMatchConfig,
                       region: Box, backend: Backend) -> KernelFit:
    """Solve the spatially varying matching kernel with LSST's clipping loop (spec §2.5).

    Raises
    ------
    InsufficientKernelSourcesError
        Fewer good candidates than the spatial model has terms (never a singular solve).
    """
    be = backend
    n = len(cands)
    everyone = np.arange(n)
    single = _Stage(be, cands, everyone, basis, config)
    ks_all = single.fit.kernel_sum
    mean, rms, _ = single.stats(single.fit.coeffs, everyone)
    _clip_single(cands, everyone, mean, rms, config, "single-kernel")
    if config.check_condition_number:
        cands.reject(everyone[single.fit.condition > config.max_condition_number],
                     f"single-kernel condition number > {config.max_condition_number:.3g}")
    residual_mean, residual_rms = mean.copy(), rms.copy()
    stage = single
    n_iter, n_rej, kernel, cond = 0, 0, None, float("nan")
    which = np.zeros(0, dtype=int)
    guard = 0
    while n_iter < config.max_spatial_iterations:
        guard += 1
        if guard > 10 * n + 20:  # every pass rejects >= 1 candidate; this cannot trigger
            raise PsfMatchingError("kernel fit did not converge")
        which = visit_order(cands, config.n_star_per_cell)
        _require(cands, which, config)
        if _ksum_clip(cands, which, ks_all[which], config):
            continue
        if config.use_pca_for_spatial_kernel:
            stage = _pca_stage(be, cands, which, single, config)
            m2, r2, _ = stage.stats(stage.fit.coeffs, stage.rows(which))
            if _clip_single(cands, which, m2, r2, config, "PCA single-kernel"):
                continue
        kernel, coeffs, cond = _spatial_solve(be, stage, which, cands, config, region)
        m3, r3, _ = stage.stats(coeffs, stage.rows(which))
        residual_mean[which], residual_rms[which] = m3, r3
        n_rej = _clip_single(cands, which, m3, r3, config, "spatial-kernel")
        if n_rej == 0:
            break
        n_iter += 1
    if n_rej > 0 and n_iter == config.max_spatial_iterations:
        which = visit_order(cands, config.n_star_per_cell)
        _require(cands, which, config)
        if config.use_pca_for_spatial_kernel:
            stage = _pca_stage(be, cands, which, single, config)
        kernel, _, cond = _spatial_solve(be, stage, which, cands, config, region)
    cands.status[which] = GOOD
    used = np.zeros(n, dtype=bool)
    used[which] = True
    log.info("kernel fit: %d candidates used, %d rejected, %d spatial iterations, kernel sum %.5g",
             which.size, int((cands.status == BAD).sum()), n_iter, kernel.kernel_sum())
    return KernelFit(kernel=kernel, candidates=cands, n_iterations=n_iter, n_used=int(which.size),
                     spatial_condition=cond, single_kernel_sum=ks_all,
                     single_background=single.fit.background, residual_mean=residual_mean,
                     residual_rms=residual_rms, used=used)


def _pca_stage(be: Backend, cands: KernelCandidates, which: np.ndarray, single: _Stage,
               config: PsfMatchConfig) -> _Stage:
    """Spec §3.3: a PCA basis from the visited candidates' own kernels, then refit them."""
    nb = single.basis.n_bases
    coeffs = be.asnumpy(single.fit.coeffs[be.xp.asarray(single.rows(which))])[:, :nb]
    images = np.einsum("ni,ijk->njk", coeffs, single.basis.kernels)
    basis = pca_basis(images, config.num_principal_components, config.subtract_mean_for_pca)
    return _Stage(be, cands, which, basis, config)

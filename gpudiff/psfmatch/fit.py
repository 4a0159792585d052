"""The PSF-matching fit: single kernels, clipping, the spatial model (docs/algorithms.md §2.3–§3).

:func:`fit_spatial_kernel` runs LSST's ``PsfMatchTask._solve`` loop on a
:class:`~gpudiff.psfmatch.candidates.KernelCandidates` set.  Single-kernel solutions are
computed for every candidate in one batch up front: a candidate's solution does not depend
on the others, so this visits exactly the candidates afw's cell visitor would, in one pass.
The photometric check of the kernel sum is in :mod:`gpudiff.psfmatch.kernel_sum`.
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
from ..ops._host import fetch
from .basis import KernelBasis, make_regularization_matrix, pca_basis
from .candidates import BAD, GOOD, KernelCandidates, visit_order
from .config import PsfMatchConfig
from .kernel_sum import KERNEL_SUM_TOLERANCE, check_kernel_sum, kernel_star_flux_ratio
from .solve import (
    design_matrices,
    fit_stamps,
    good_region,
    residual_moments,
    residual_sums,
    solve_symmetric_fetch,
)
from .spatial_order import (
    choose_spatial_order,
    packed_normal_equations,
    unpack_normal_equations,
)
from .spatial import SpatialFunctions, SpatialKernel

__all__ = [
    "KernelFit",
    "fit_spatial_kernel",
    "spatial_expansion",
    "rejection_counts",
    "kernel_star_flux_ratio",
    "check_kernel_sum",
    "KERNEL_SUM_TOLERANCE",
]

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
    spatial_kernel_order_used, spatial_bg_order_used : int
        Spatial orders of the final fit: the configured ones, or lower ones when the
        candidates could not constrain them (background order −1: no background fitted).
    flux_ratio, flux_ratio_err : float
        Median aperture-flux ratio (reference / convolved) of the candidates used,
        and its standard error: the photometric ratio the kernel sum must reproduce.
    kernel_sum_ok : bool
        False when the kernel sum and ``flux_ratio`` disagree (see
        :func:`check_kernel_sum`).
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
    spatial_kernel_order_used: int = -1
    spatial_bg_order_used: int = -1
    flux_ratio: float = float("nan")
    flux_ratio_err: float = float("nan")
    kernel_sum_ok: bool = True

    @property
    def kernel_sum(self) -> float:
        """ΣK at the centre of the fit region."""
        return self.kernel.kernel_sum()

    def quality_metadata(self) -> dict:
        """Figures for a result's metadata: the spatial orders used and the photometric
        check of the kernel sum (``kernel_sum_check_failed`` True = a failed quality check)."""
        return {
            "spatial_kernel_order_used": int(self.spatial_kernel_order_used),
            "spatial_bg_order_used": int(self.spatial_bg_order_used),
            "kernel_star_flux_ratio": float(self.flux_ratio),
            "kernel_star_flux_ratio_err": float(self.flux_ratio_err),
            "kernel_sum_check_failed": not self.kernel_sum_ok,
        }

    def candidate_table(self) -> Table:
        """One row per candidate: position, rating, status, reason, single-kernel figures."""
        c = self.candidates
        status = np.where(c.status == BAD, "BAD", np.where(c.status == GOOD, "GOOD", "UNKNOWN"))
        return Table(
            {
                "source_index": c.source_index,
                "x": c.x,
                "y": c.y,
                "rating": c.rating,
                "status": status,
                "used": self.used,
                "reason": np.array(c.reason, dtype=str),
                "kernel_sum": self.single_kernel_sum,
                "background": self.single_background,
                "residual_mean": self.residual_mean,
                "residual_rms": self.residual_rms,
            }
        )


class _Stage:
    """Design matrices, good-region data and solutions of candidates for one basis."""

    def __init__(
        self,
        be: Backend,
        cands: KernelCandidates,
        idx: np.ndarray,
        basis: KernelBasis,
        config: PsfMatchConfig,
    ):
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
        self.core = config.candidate_core_radius if config.use_core_stats else None
        own_rows = self.rows(idx)
        self.fit = fit_stamps(
            be,
            self.C,
            self.sci,
            var_sum,
            basis.kernels.sum(axis=(1, 2)),
            constant_variance_weighting=config.constant_variance_weighting,
            fit_for_background=fit_bg,
            regularization=H,
            lambda_type=config.lambda_type,
            lambda_value=config.lambda_value,
            lambda_scaling=config.lambda_scaling,
            condition_type=config.condition_number_type if config.check_condition_number else None,
            # The residual statistics of every candidate's own solution cross to the host
            # with the kernel sums (one transfer).
            also=lambda a: self.stats_device(a, own_rows),
        )
        #: Host (mean, rms, npix) of every candidate's single-kernel solution.
        self.own_stats = residual_moments(*self.fit.also)

    def rows(self, which: np.ndarray) -> np.ndarray:
        """Positions in this stage of candidate indices ``which``."""
        return np.searchsorted(self.idx, which)

    def stats(self, coeffs: Any, rows: np.ndarray):
        """Host (mean, rms, npix) of the residuals of ``coeffs`` for the candidates at
        ``rows`` (:func:`residual_statistics`)."""
        return residual_moments(*fetch(self.be, *self.stats_device(coeffs, rows)))

    def stats_device(self, coeffs: Any, rows: np.ndarray):
        """The backend sums behind :meth:`stats` (:func:`residual_sums`; not fetched)."""
        be, xp = self.be, self.be.xp
        n = len(self.idx)
        if len(rows) == n and np.array_equal(rows, np.arange(n)):
            # Every candidate in order (the single-kernel fits): the arrays themselves.
            return residual_sums(
                be, self.C, coeffs, self.sci, self.sci_var, self.tmpl_var, self.kernels, self.core
            )
        r = xp.asarray(rows)
        if 2 * len(rows) < n:
            return residual_sums(
                be,
                self.C[r],
                coeffs,
                self.sci[r],
                self.sci_var[r],
                self.tmpl_var[r],
                self.kernels,
                self.core,
            )
        # Most candidates (the spatial solutions): the sums of every candidate, with zero
        # coefficients for the others, then the rows asked for.  Per candidate the same
        # operations (a batched product, per-stamp FFTs, row sums: the same bits) without
        # gathered copies of the design matrices (~120 MB at 1000 candidates, whose page
        # faults cost ~0.1-0.4 s of a 2048² subtraction on the CPU).
        full = xp.zeros((n,) + tuple(coeffs.shape[1:]), dtype=coeffs.dtype)
        full[r] = coeffs
        sums = residual_sums(
            be, self.C, full, self.sci, self.sci_var, self.tmpl_var, self.kernels, self.core
        )
        return tuple(s[r] for s in sums)


def _clip_single(
    cands: KernelCandidates,
    which: np.ndarray,
    mean: np.ndarray,
    rms: np.ndarray,
    config: PsfMatchConfig,
    what: str,
) -> int:
    """docs/algorithms.md §2.3 thresholds; returns the number rejected."""
    bad_nan = ~(np.isfinite(mean) & np.isfinite(rms))
    cands.reject(which[bad_nan], f"{what} residual statistics are NaN")
    n = int(bad_nan.sum())
    clip = (
        config.single_kernel_clipping if what == "single-kernel" else config.spatial_kernel_clipping
    )
    if clip:
        hi_mean = ~bad_nan & (np.abs(mean) > config.candidate_residual_mean_max)
        hi_rms = ~bad_nan & ~hi_mean & (rms > config.candidate_residual_std_max)
        cands.reject(
            which[hi_mean], f"{what} residual |mean| > {config.candidate_residual_mean_max}"
        )
        cands.reject(which[hi_rms], f"{what} residual rms > {config.candidate_residual_std_max}")
        n += int(hi_mean.sum() + hi_rms.sum())
    return n


def spatial_expansion(
    basis: KernelBasis, x: np.ndarray, y: np.ndarray, config: PsfMatchConfig, region: Box
) -> tuple[np.ndarray, SpatialFunctions, SpatialFunctions | None]:
    """E (n, p, N): per-candidate coefficients a = E·c of the global spatial unknowns c.

    a_m(x, y) = Σ_k c_mk p_k(x, y) (a single constant c_00 for m = 0 with a constant first
    term) and bg(x, y) = Σ c_b p_b(x, y): the normal-equation accumulation of
    docs/algorithms.md §3 is then Σ_c E_cᵀ M_c E_c, one batched contraction.
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
            E[:, m, col : col + nk] = pk
            col += nk
    if fb is not None:
        E[:, nb, col : col + nbg] = fb.matrix(x, y)
    return E, fk, fb


def _spatial_solve(
    be: Backend,
    stage: _Stage,
    which: np.ndarray,
    cands: KernelCandidates,
    config: PsfMatchConfig,
    region: Box,
    with_stats: bool = False,
):
    """The spatial kernel, every candidate's coefficients under it (backend), the system's
    condition number and, ``with_stats``, the candidates' host residual statistics
    (:meth:`_Stage.stats`; fetched with the solution: one transfer)."""
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
    per_cand = []  # every candidate's coefficients under the (last) solution

    def derive(a):
        per_cand[:] = [Ed @ a[0]]
        got = (xp.abs(be.linalg.eigvalsh(A)), a[0])
        return got + (tuple(stage.stats_device(per_cand[0], rows)) if with_stats else ())

    # The solution, its finiteness, the eigenvalues (and the residual statistics) cross to
    # the host in one transfer.
    c, _, (w, ch, *sums) = solve_symmetric_fetch(be, A[None], rhs[None], derive)
    cond = float(w.max() / w.min()) if w.min() > 0 else float("inf")
    coeffs_per_cand = per_cand[0]
    nb, nk = stage.basis.n_bases, fk.n_terms
    K = np.zeros((nb, nk))
    col = 0
    for m in range(nb):
        if m == 0 and stage.basis.constant_first_term:
            K[0, 0] = ch[0]
            col = 1
        else:
            K[m] = ch[col : col + nk]
            col += nk
    bgc = ch[col:] if fb is not None else None
    kernel = SpatialKernel(stage.basis, K, fk, bgc, fb)
    return kernel, coeffs_per_cand, cond, (residual_moments(*sums) if with_stats else None)


def _solve_lowering(
    be: Backend,
    stage: _Stage,
    which: np.ndarray,
    cands: KernelCandidates,
    config: PsfMatchConfig,
    region: Box,
    with_stats: bool = False,
):
    """The spatial solve, with LSST's warning when its system is ill-conditioned.

    The orders are not lowered on the condition number: the AL basis makes even a
    constant-kernel system's eigenvalue ratio ~1e12 on well-measured stars (DECam cutouts),
    so it does not say that the spatial terms are unconstrained; :func:`_fit_orders`
    decides that from the candidates' number and positions.
    """
    kernel, coeffs, cond, stats = _spatial_solve(
        be, stage, which, cands, config, region, with_stats
    )
    if cond > config.max_spatial_condition_number:
        warnings.warn(
            f"spatial kernel system is ill-conditioned (condition number {cond:.3g} > "
            f"{config.max_spatial_condition_number:.3g})",
            RuntimeWarning,
            stacklevel=3,
        )
    return kernel, coeffs, cond, config, stats


def _ksum_clip(
    cands: KernelCandidates, which: np.ndarray, ksum: np.ndarray, config: PsfMatchConfig
) -> int:
    """docs/algorithms.md §2.4: reject |kSum − MEANCLIP| > max_ksum_sigma · STDEVCLIP."""
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


def _reason_key(reason: str) -> str:
    """The selection test behind a rejection reason (numbers of one candidate dropped)."""
    if reason.startswith("kernel sum "):
        return "kernel-sum clipping (|kSum - mean| > max_ksum_sigma x sigma)"
    return reason


def rejection_counts(cands: KernelCandidates) -> dict[str, int]:
    """How many sources each selection test removed: before fitting (stamp off the image,
    masked or non-finite pixels) and during the fit (residual and kernel-sum clipping)."""
    counts: dict[str, int] = {}
    for _, r in cands.rejected:
        counts[r] = counts.get(r, 0) + 1
    for r, st in zip(cands.reason, cands.status):
        if st == BAD and r:
            k = _reason_key(r)
            counts[k] = counts.get(k, 0) + 1
    return counts


def _n_terms(order: int) -> int:
    return (order + 1) * (order + 2) // 2


def _well_posed(
    x: np.ndarray, y: np.ndarray, order: int, config: PsfMatchConfig, region: Box
) -> bool:
    """Whether candidates at (x, y) constrain a spatial polynomial of ``order`` well
    enough when the orders are being lowered: one candidate more than terms, and
    positions that are not (nearly) degenerate for it (three collinear stars cannot fix a
    first-order variation across the line)."""
    # One candidate more than terms: with exactly as many the model goes through the stars
    # (no redundancy: kernel-sum clipping needs two, one bad star cannot be seen) and a
    # varying one extrapolates freely beyond them.  A constant kernel thus needs two.
    if x.size < _n_terms(order) + 1:
        return False
    if order == 0:
        return True
    P = SpatialFunctions(config.spatial_model_type, order, region).matrix(x, y)
    sv = np.linalg.svd(P, compute_uv=False)
    # Chebyshev terms on the region are O(1); a smallest singular value under 5 % of the
    # largest means one combination of terms is barely constrained by the positions (stars
    # in a strip 5 % of the field wide, or on a line): its fitted value would be
    # extrapolated ≥ 20-fold across the field.
    return bool(sv[-1] > _MIN_SPATIAL_SV * sv[0])


_MIN_SPATIAL_SV = 0.05


def _fit_orders(
    cands: KernelCandidates,
    which: np.ndarray,
    config: PsfMatchConfig,
    region: Box,
    lowered: bool = False,
) -> PsfMatchConfig:
    """``config``, or a copy with lower spatial orders that the candidates can constrain.

    Departure from LSST (which raises when there are fewer candidates than spatial terms):
    small fields and fields with few stars (a 256² cutout holds ~8) get the highest
    kernel and background orders the usable candidates constrain, down to a constant
    kernel and background, with a logged warning.  Only when not even a constant kernel
    is constrained (fewer than two usable candidates) does the fit fail, saying how many
    candidates each test removed.

    While the configured model has at least as many candidates as terms (LSST's own
    requirement) nothing changes, so LSST's results are reproduced; once orders must be
    lowered (``lowered``: they already were), the stricter :func:`_well_posed` applies.
    """
    ko, bo = config.spatial_kernel_order, config.spatial_bg_order
    fit_bg = config.fit_for_background
    x, y = cands.x[which], cands.y[which]
    need = max(1, config.n_spatial_kernel_terms, config.n_spatial_bg_terms)
    if not lowered and which.size >= need:
        return config
    if which.size < _n_terms(0) + 1:
        counts = rejection_counts(cands)
        detail = "; ".join(f"{v} {k}" for k, v in counts.items()) or "none given"
        raise InsufficientKernelSourcesError(
            f"{which.size} usable kernel candidate(s): a constant kernel and background need "
            f"at least {_n_terms(0) + 1} ({len(cands)} candidates, {len(cands.rejected)} "
            f"sources rejected before fitting); "
            f"removed by each test: {detail}"
        )
    while True:
        k_ok = _well_posed(x, y, ko, config, region)
        b_ok = not fit_bg or _well_posed(x, y, bo, config, region)
        if k_ok and b_ok:
            break
        # Lower the order with more terms first (the background's by default: LSST's
        # subtraction default is kernel order 1, background order 2).
        if fit_bg and not b_ok and (bo >= ko or k_ok):
            bo -= 1
        else:
            ko -= 1
    if (ko, bo) != (config.spatial_kernel_order, config.spatial_bg_order):
        changes = [
            f"{name} order {a} -> {b}"
            for name, a, b in (
                ("spatial kernel", config.spatial_kernel_order, ko),
                ("background", config.spatial_bg_order, bo),
            )
            if a != b
        ]
        log.warning(
            "only %d usable kernel candidate(s) for the spatial model: %s",
            which.size,
            ", ".join(changes),
        )
        config = config.with_overrides(spatial_kernel_order=ko, spatial_bg_order=bo)
    return config


def fit_spatial_kernel(
    cands: KernelCandidates,
    basis: KernelBasis,
    config: PsfMatchConfig,
    region: Box,
    backend: Backend,
) -> KernelFit:
    """Solve the spatially varying matching kernel with LSST's clipping loop
    (docs/algorithms.md §2.5).

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
    mean, rms, _ = single.own_stats
    _clip_single(cands, everyone, mean, rms, config, "single-kernel")
    if config.check_condition_number:
        cands.reject(
            everyone[single.fit.condition > config.max_condition_number],
            f"single-kernel condition number > {config.max_condition_number:.3g}",
        )
    residual_mean, residual_rms = mean.copy(), rms.copy()
    stage = single
    n_iter, n_rej, kernel, cond = 0, 0, None, float("nan")
    config0 = config
    which = np.zeros(0, dtype=int)
    guard = 0
    while n_iter < config.max_spatial_iterations:
        guard += 1
        if guard > 10 * n + 20:  # every pass rejects >= 1 candidate; this cannot trigger
            raise PsfMatchingError("kernel fit did not converge")
        which = visit_order(cands, config.n_star_per_cell)
        config = _fit_orders(cands, which, config, region, config is not config0)
        if _ksum_clip(cands, which, ks_all[which], config):
            continue
        if config.use_pca_for_spatial_kernel:
            stage = _pca_stage(be, cands, which, single, config)
            m2, r2, _ = stage.own_stats  # the PCA stage holds the candidates ``which``
            if _clip_single(cands, which, m2, r2, config, "PCA single-kernel"):
                continue
        kernel, coeffs, cond, config, (m3, r3, _) = _solve_lowering(
            be, stage, which, cands, config, region, with_stats=True
        )
        residual_mean[which], residual_rms[which] = m3, r3
        n_rej = _clip_single(cands, which, m3, r3, config, "spatial-kernel")
        if n_rej == 0:
            break
        n_iter += 1
    if n_rej > 0 and n_iter == config.max_spatial_iterations:
        which = visit_order(cands, config.n_star_per_cell)
        config = _fit_orders(cands, which, config, region, config is not config0)
        if config.use_pca_for_spatial_kernel:
            stage = _pca_stage(be, cands, which, single, config)
        kernel, _, cond, config, _ = _solve_lowering(be, stage, which, cands, config, region)
    cands.status[which] = GOOD
    used = np.zeros(n, dtype=bool)
    used[which] = True
    if config.spatial_order_by_cross_validation and config.spatial_kernel_order > 0:
        # The candidates' normal equations cross to the host with the flux-ratio sums
        # (one transfer).
        rows = stage.rows(which)
        ratio, ratio_err, (tri, b) = kernel_star_flux_ratio(
            be, cands, which, also=packed_normal_equations(be, stage.fit.M, stage.fit.b, rows)
        )
        E, _, _ = spatial_expansion(stage.basis, cands.x[which], cands.y[which], config, region)
        kernel, config = choose_spatial_order(
            E, unpack_normal_equations(tri, stage.fit.M.shape[-1]), b, kernel, config, region
        )
    else:
        ratio, ratio_err = kernel_star_flux_ratio(be, cands, which)
    ksum_ok = check_kernel_sum(kernel, cands, which, ratio, ratio_err)
    log.info(
        "kernel fit: %d candidates used, %d rejected, %d spatial iterations, kernel sum %.5g",
        which.size,
        int((cands.status == BAD).sum()),
        n_iter,
        kernel.kernel_sum(),
    )
    return KernelFit(
        kernel=kernel,
        candidates=cands,
        n_iterations=n_iter,
        n_used=int(which.size),
        spatial_condition=cond,
        single_kernel_sum=ks_all,
        single_background=single.fit.background,
        residual_mean=residual_mean,
        residual_rms=residual_rms,
        used=used,
        spatial_kernel_order_used=config.spatial_kernel_order,
        spatial_bg_order_used=(config.spatial_bg_order if config.fit_for_background else -1),
        flux_ratio=ratio,
        flux_ratio_err=ratio_err,
        kernel_sum_ok=ksum_ok,
    )


def _pca_stage(
    be: Backend, cands: KernelCandidates, which: np.ndarray, single: _Stage, config: PsfMatchConfig
) -> _Stage:
    """docs/algorithms.md §3.3: a PCA basis from the visited candidates' own kernels, then
    refit them."""
    nb = single.basis.n_bases
    coeffs = be.asnumpy(single.fit.coeffs[be.xp.asarray(single.rows(which))])[:, :nb]
    images = np.einsum("ni,ijk->njk", coeffs, single.basis.kernels)
    basis = pca_basis(
        images, config.num_principal_components, subtract_mean=config.subtract_mean_for_pca
    )
    return _Stage(be, cands, which, basis, config)

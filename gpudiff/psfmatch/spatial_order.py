"""Cross-validated choice of the spatial kernel order (docs/algorithms.md §14,
"Spatial kernel order by cross-validation").

A departure from LSST, which always fits the configured order: a spatial model fitted to
noisy candidates varies across the image even where the PSFs do not, and in
convolveScience the transients are convolved with it.  On a realistic 2048² pair whose PSFs
are constant, the order-1 kernel's second moment varied by ±6 % across the image and the
PSF fluxes of S/N > 20 transients with it (pulls 1.21; 0.98 with a constant kernel).  The
χ² of the spatial fit cannot decide (its stamp weights leave out correlated residuals:
order 1 "improved" it by 50σ on that pair), but held-out candidates can: the order kept is
the one whose kernel, fitted without them, predicts their stamps best.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ..image import Box
from .config import PsfMatchConfig
from .spatial import SpatialFunctions, SpatialKernel, _term_powers

__all__ = ["cross_validated_order", "reduced_kernel"]


def _columns(nb: int, const_first: bool, k_order: int, order: int, n_bg: int) -> np.ndarray:
    """Columns of the spatial unknowns (see :func:`~gpudiff.psfmatch.fit.spatial_expansion`)
    that a kernel of spatial order ``order`` ≤ ``k_order`` keeps (background all kept)."""
    powers = _term_powers(k_order)
    keep = np.array([i + j <= order for i, j in powers])
    nk = len(powers)
    cols = []
    col = 0
    for m in range(nb):
        if m == 0 and const_first:
            cols.append(col)
            col += 1
        else:
            cols.extend(col + np.flatnonzero(keep))
            col += nk
    cols.extend(range(col, col + n_bg))
    return np.asarray(cols, dtype=np.int64)


def _score(A_tr: np.ndarray, r_tr: np.ndarray, A_te: np.ndarray, r_te: np.ndarray) -> float:
    """Held-out χ² (up to a constant shared by every model) of the training solution."""
    try:
        c = np.linalg.solve(A_tr, r_tr)
    except np.linalg.LinAlgError:
        c = np.linalg.lstsq(A_tr, r_tr, rcond=None)[0]
    return float(c @ A_te @ c - 2.0 * r_te @ c)


def cross_validated_order(
    E: np.ndarray,
    M: np.ndarray,
    b: np.ndarray,
    basis_const_first: bool,
    n_bases: int,
    config: PsfMatchConfig,
    folds: int = 5,
) -> tuple[int, dict[int, float]]:
    """The spatial kernel order, at most ``config.spatial_kernel_order``, whose kernel best
    predicts candidates it was not fitted to (``folds``-fold, candidates dealt to folds in
    turn).

    Parameters
    ----------
    E : ndarray (n, p, N)
        Spatial expansion of the candidates at the configured orders.
    M, b : ndarray (n, p, p), (n, p)
        The candidates' normal equations (host).
    basis_const_first : bool
        Whether the basis's first kernel is a spatially constant term.
    n_bases : int
    config : PsfMatchConfig
    folds : int

    Returns
    -------
    order : int
        The order with the lowest held-out χ² (the lower one on a tie).
    scores : dict
        Held-out χ² (relative) per order tried.
    """
    n = E.shape[0]
    k_order = config.spatial_kernel_order
    if k_order == 0 or n < 2 * folds:
        return k_order, {}
    n_bg = (
        SpatialFunctions(
            config.spatial_model_type, config.spatial_bg_order, Box(0, 0, 1, 1)
        ).n_terms
        if config.fit_for_background
        else 0
    )
    A_c = np.einsum("nip,nij,njq->npq", E, M, E, optimize=True)
    r_c = np.einsum("nip,ni->np", E, b)
    fold = np.arange(n) % folds
    A_f = np.stack([A_c[fold == f].sum(axis=0) for f in range(folds)])
    r_f = np.stack([r_c[fold == f].sum(axis=0) for f in range(folds)])
    A_all, r_all = A_f.sum(axis=0), r_f.sum(axis=0)
    scores: dict[int, float] = {}
    for order in range(k_order + 1):
        cols = _columns(n_bases, basis_const_first, k_order, order, n_bg)
        ix = np.ix_(cols, cols)
        scores[order] = sum(
            _score((A_all - A_f[f])[ix], (r_all - r_f[f])[cols], A_f[f][ix], r_f[f][cols])
            for f in range(folds)
        )
    best = min(scores, key=lambda o: (scores[o], o))
    return best, scores


def reduced_kernel(
    E: np.ndarray,
    M: np.ndarray,
    b: np.ndarray,
    kernel: SpatialKernel,
    config: PsfMatchConfig,
    order: int,
    region: Box,
) -> SpatialKernel:
    """``kernel`` refitted (host, all candidates) with spatial kernel order ``order``."""
    basis = kernel.basis
    nb = basis.n_bases
    fb = kernel.background_functions
    n_bg = fb.n_terms if fb is not None else 0
    cols = _columns(nb, basis.constant_first_term, config.spatial_kernel_order, order, n_bg)
    A = np.einsum("nip,nij,njq->pq", E, M, E, optimize=True)[np.ix_(cols, cols)]
    r = np.einsum("nip,ni->p", E, b)[cols]
    try:
        c = np.linalg.solve(0.5 * (A + A.T), r)
    except np.linalg.LinAlgError:
        c = np.linalg.lstsq(A, r, rcond=None)[0]
    fk = SpatialFunctions(config.spatial_model_type, order, region)
    nk = fk.n_terms
    K = np.zeros((nb, nk))
    col = 0
    for m in range(nb):
        if m == 0 and basis.constant_first_term:
            K[0, 0] = c[0]
            col = 1
        else:
            K[m] = c[col : col + nk]
            col += nk
    bgc: Any = c[col:] if fb is not None else None
    return SpatialKernel(basis, K, fk, bgc, fb)

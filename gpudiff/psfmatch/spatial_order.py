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

import logging
from typing import Any

import numpy as np

from ..backend import Backend
from ..image import Box
from .config import PsfMatchConfig
from .spatial import SpatialFunctions, SpatialKernel, _term_powers

__all__ = [
    "choose_spatial_order",
    "cross_validated_order",
    "packed_normal_equations",
    "reduced_kernel",
    "unpack_normal_equations",
]


log = logging.getLogger("gpudiff.psfmatch")


def packed_normal_equations(be: Backend, M: Any, b: Any, rows: np.ndarray) -> tuple[Any, Any]:
    """The normal equations of the candidates at ``rows`` for the host, on the backend
    (not fetched): M's upper triangles (it is symmetric; one gather) and b."""
    p = M.shape[-1]
    iu = np.triu_indices(p)
    r = be.xp.asarray(rows)
    flat = be.xp.asarray(iu[0] * p + iu[1])
    return M.reshape(-1, p * p)[r[:, None], flat[None, :]], b[r]


def unpack_normal_equations(tri: np.ndarray, p: int) -> np.ndarray:
    """Host (n, p, p) float64 matrices from :func:`packed_normal_equations`' triangles."""
    tri = np.asarray(tri, dtype=np.float64)
    iu = np.triu_indices(p)
    M = np.zeros((tri.shape[0], p, p))
    M[:, iu[0], iu[1]] = tri
    M[:, iu[1], iu[0]] = tri
    return M


def choose_spatial_order(
    E: np.ndarray,
    M: np.ndarray,
    b: np.ndarray,
    kernel: SpatialKernel,
    config: PsfMatchConfig,
    region: Box,
) -> tuple[SpatialKernel, PsfMatchConfig]:
    """``kernel`` and ``config``, or, when a lower spatial order predicts held-out
    candidates better (:func:`cross_validated_order`), the kernel refitted at that order
    and the config that says so (logged).  ``E``, ``M``, ``b``: host arrays."""
    b = np.asarray(b, dtype=np.float64)
    basis = kernel.basis
    order, scores = cross_validated_order(E, M, b, basis.constant_first_term, basis.n_bases, config)
    if order == config.spatial_kernel_order:
        return kernel, config
    log.info(
        "spatial kernel order %d -> %d by cross-validation (held-out chi2 by order: %s)",
        config.spatial_kernel_order,
        order,
        ", ".join(f"{o}: {v:.6g}" for o, v in scores.items()),
    )
    kernel = reduced_kernel(E, M, b, kernel, config, order, region)
    return kernel, config.with_overrides(spatial_kernel_order=order)


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

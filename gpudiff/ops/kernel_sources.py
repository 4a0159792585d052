"""Kernel-source selection from a detection catalog (docs/algorithms.md §4.2, the science
source selector of ``AlardLuptonSubtractTask``), and the isolation test it shares with
:func:`gpudiff.ops.detection.detect_sources`: pure table work on the host."""

from __future__ import annotations

from typing import Iterable

import numpy as np
from astropy.table import Table
from scipy.spatial import cKDTree

from ..errors import InvalidInputError
from ..image import Box

__all__ = ["KERNEL_EXCLUDE_FLAGS", "select_kernel_sources"]

#: Catalog flags that disqualify a kernel source (docs/algorithms.md §4.2: away from edges and
#: masks).
KERNEL_EXCLUDE_FLAGS = (
    "flag_edge",
    "flag_masked",
    "flag_saturated",
    "flag_negative",
    "flag_centroid",
    "flag_psf_flux",
)


def _isolated(x, y, bright, radius: float, fraction: float) -> np.ndarray:
    """No other source within ``radius`` whose brightness is ≥ ``fraction`` of this one's."""
    iso = np.ones(x.size, dtype=bool)
    if x.size < 2 or radius <= 0:
        return iso
    pairs = cKDTree(np.c_[x, y]).query_pairs(radius, output_type="ndarray")
    if pairs.size:
        i, j = pairs[:, 0], pairs[:, 1]
        iso[i[bright[j] >= fraction * bright[i]]] = False
        iso[j[bright[i] >= fraction * bright[j]]] = False
    return iso


def select_kernel_sources(
    catalog: Table,
    image_box: Box,
    *,
    snr_min: float = 10.0,
    snr_max: float = 500.0,
    max_sources: int | None = None,
    edge_buffer: int = 0,
    isolation_radius: float | None = None,
    isolation_fraction: float = 0.1,
    require_isolated: bool = True,
    require_unresolved: bool = True,
    exclude_flags: Iterable[str] = KERNEL_EXCLUDE_FLAGS,
) -> Table:
    """PSF-matching kernel sources from a detection catalog (docs/algorithms.md §4.2
    ``_sourceSelector``).

    Keeps sources with snr_min ≤ psf_flux/psf_flux_err ≤ snr_max, isolated, unresolved,
    whose (2·edge_buffer+1)² box around the centroid pixel lies in ``image_box`` and with
    none of ``exclude_flags``; highest S/N first (spec: the top ``maxKernelSources`` by
    psfInstFlux/psfInstFluxErr), at most ``max_sources``.

    Parameters
    ----------
    catalog : astropy.table.Table
        From :func:`detect_sources` (parent coordinates).  Not modified.
    image_box : Box
        Where the stamps must fit (parent coordinates), e.g. the science bbox.
    snr_min, snr_max : float
        S/N band (LSST ScienceSourceSelector: 10 and 500).
    max_sources : int, optional
        At most this many (LSST ``maxKernelSources`` = 1000); None or < 0: all.
    edge_buffer : int
        Half-width of the box that must fit (LSST: the kernel size).
    isolation_radius, isolation_fraction : float, optional
        Recompute isolation over the whole catalog (a neighbour within the radius with
        |psf_flux| ≥ fraction × the source's spoils it); default: the ``isolated`` column.
    require_isolated, require_unresolved : bool
        LSST ``doIsolated`` / ``doUnresolved`` (the fallback selector drops isolation).
    exclude_flags : iterable of str
        Boolean columns that reject a source when True.

    Returns
    -------
    astropy.table.Table
        The selected rows.  Pixel checks of the stamps (no ``excludeMaskPlanes`` bit in
        either image) need the masks and belong to the candidate builder.
    """
    if not isinstance(catalog, Table):
        raise InvalidInputError(f"catalog must be an astropy Table, got {type(catalog).__name__}")
    if missing := [
        c
        for c in ("x", "y", "psf_flux", "psf_flux_err", *exclude_flags)
        if c not in catalog.colnames
    ]:
        raise InvalidInputError(f"select_kernel_sources: catalog lacks column(s) {missing}")
    x, y = np.asarray(catalog["x"], float), np.asarray(catalog["y"], float)
    flux, err = np.asarray(catalog["psf_flux"], float), np.asarray(catalog["psf_flux_err"], float)
    with np.errstate(invalid="ignore", divide="ignore"):
        snr = flux / err
        keep = np.isfinite(snr) & (snr >= snr_min) & (snr <= snr_max)
    for f in exclude_flags:
        keep &= ~np.asarray(catalog[f], dtype=bool)
    if require_unresolved and "is_extended" in catalog.colnames:
        keep &= ~np.asarray(catalog["is_extended"], dtype=bool)
    if require_isolated:
        if isolation_radius is not None:
            keep &= _isolated(
                x,
                y,
                np.nan_to_num(np.abs(flux)),
                float(isolation_radius),
                float(isolation_fraction),
            )
        elif "isolated" in catalog.colnames:
            keep &= np.asarray(catalog["isolated"], dtype=bool)
    eb, rx, ry = int(edge_buffer), np.rint(x), np.rint(y)
    keep &= (
        (rx - eb >= image_box.x0)
        & (rx + eb <= image_box.x1 - 1)
        & (ry - eb >= image_box.y0)
        & (ry + eb <= image_box.y1 - 1)
    )
    idx = np.nonzero(keep)[0]
    idx = idx[np.argsort(-snr[idx], kind="stable")]
    if max_sources is not None and max_sources >= 0:
        idx = idx[: int(max_sources)]
    return catalog[idx]

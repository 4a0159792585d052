"""Kernel-source selection of the subtraction tasks (docs/algorithms.md §4.2 step 9).

LSST's ``ScienceSourceSelector`` keeps unresolved, isolated sources of S/N in
[``source_snr_min``, ``source_snr_max``] inside the kernel-edge box.  Before it, gpudiff
normalizes any source table to ``x``, ``y``, ``snr`` and the flux columns the selector
reads, flags sources centred on a cosmic ray and (``template_source_snr_min``) sources
absent from the template, and re-judges extendedness against the PSF model.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np
from astropy.table import Table

from ..backend import Backend
from ..errors import InsufficientKernelSourcesError, InvalidInputError
from ..image import Box, Exposure, MaskedImage
from ..ops._host import fetch
from ..ops.detection import detect_sources, select_kernel_sources
from ..psfmatch.candidates import (
    _presence_snr,
    _presence_stamps,
    reclassify_extended,
    selection_counts,
)
from .subtract_inputs import psf_fwhm

if TYPE_CHECKING:  # the config lives with the task, which imports this module
    from .subtract import AlardLuptonSubtractConfig

__all__ = ["select_sources", "flag_not_in_template", "normalize_sources"]


def select_sources(
    science: Exposure,
    template: Exposure,
    sources: Any,
    kernel_size: int,
    edge_buffer: int,
    config: AlardLuptonSubtractConfig,
    backend: Backend,
) -> Table:
    """Kernel sources (docs/algorithms.md §4.2 step 9): the selector, then the box and mask
    test.

    Parameters
    ----------
    science, template : Exposure
        The prepared pair (:func:`~gpudiff.tasks.subtract_inputs.prepare_inputs`).
    sources : table or None
        ``x``, ``y`` and ``psf_flux``/``psf_flux_err`` (or ``flux``/``flux_err``, or
        ``snr``) columns; ``None`` detects on the science image.
    kernel_size : int
        Sources closer than this to the box's edge are rejected.
    edge_buffer : int
        The box is the science box shrunk by this (``restrict_kernel_edge_sources``).
    config : AlardLuptonSubtractConfig
    backend : Backend

    Returns
    -------
    astropy Table
        At most ``max_kernel_sources`` rows, the highest S/N.

    Raises
    ------
    InsufficientKernelSourcesError
        Fewer than ``min_kernel_sources`` pass; the message counts the rows each test
        removed.
    """
    cfg = config
    if sources is None:
        det = detect_sources(
            science.masked_image,
            science.psf,
            threshold=cfg.detection_threshold,
            polarity="positive",
            background="estimate",
            backend=backend,
        )
        sources = det.catalog
    table = normalize_sources(sources)
    # The pixels both pixel tests need (the CR bits around the centres, the template
    # stamps) are gathered first and cross to the host in one transfer.
    cr = _center_planes_gather(table, science.masked_image)
    presence = (
        _presence_gather(table, template, cfg)
        if cfg.template_source_snr_min is not None and len(table)
        else None
    )
    dev = ([] if cr is None else [cr[-1]]) + ([] if presence is None else presence[-1])
    host = list(fetch(backend, *dev))
    if cr is not None:
        table = _center_planes_finish(table, cr, host.pop(0))
    table = reclassify_extended(table)  # PSF model vs the stars
    if presence is not None:
        table = _presence_finish(table, presence, host, cfg)
    box = science.bbox
    if cfg.restrict_kernel_edge_sources:
        box = Box(
            box.x0 + edge_buffer,
            box.y0 + edge_buffer,
            box.x1 - edge_buffer,
            box.y1 - edge_buffer,
        )
    selected = select_kernel_sources(
        table,
        box,
        snr_min=cfg.source_snr_min,
        snr_max=cfg.source_snr_max,
        max_sources=None,
        edge_buffer=kernel_size,
        require_isolated="isolated" in table.colnames,
        require_unresolved="is_extended" in table.colnames,
        exclude_flags=[c for c in table.colnames if c.startswith("flag")],
    )
    if cfg.max_kernel_sources > 0 and len(selected) > cfg.max_kernel_sources:
        order = np.argsort(-np.asarray(selected["snr"]), kind="stable")
        selected = selected[np.sort(order[: cfg.max_kernel_sources])]
    if len(selected) < cfg.min_kernel_sources:
        removed = selection_counts(
            table,
            box,
            snr_min=cfg.source_snr_min,
            snr_max=cfg.source_snr_max,
            edge_buffer=kernel_size,
            exclude_flags=[c for c in table.colnames if c.startswith("flag")],
        )
        raise InsufficientKernelSourcesError(
            f"{len(selected)} kernel source(s) pass the selection (S/N {cfg.source_snr_min:g}–"
            f"{cfg.source_snr_max:g}, isolated, unresolved, inside the kernel-edge box) out of "
            f"{len(table)}; at least min_kernel_sources={cfg.min_kernel_sources} are needed; "
            f"removed "
            f"by each test: {removed}"
        )
    return selected


def flag_not_in_template(
    table: Table, template: Exposure, config: AlardLuptonSubtractConfig
) -> Table:
    """``table`` with ``template_snr`` and ``flag_not_in_template`` (S/N below
    ``template_source_snr_min``) for the rows in the selector's S/N range.

    A source new in the science (transient, moving object) has nothing to match in the
    template (see :func:`gpudiff.psfmatch.candidates.template_presence_snr`).

    Parameters
    ----------
    table : astropy Table
        Normalized (:func:`normalize_sources`): ``x``, ``y``, ``snr``.
    template : Exposure
        The prepared template.
    config : AlardLuptonSubtractConfig

    Returns
    -------
    astropy Table
        A shallow copy with the two columns added (NaN / False outside the S/N range).
    """
    req = _presence_gather(table, template, config)
    be = template.masked_image.backend
    return _presence_finish(table, req, list(fetch(be, *req[-1])), config)


def _presence_gather(table: Table, template: Exposure, cfg: AlardLuptonSubtractConfig):
    """The rows :func:`flag_not_in_template` tests and the backend stamps of their test
    (none when no row is in the S/N range): (rows, context, stamps)."""
    snr = np.asarray(table["snr"], dtype=np.float64)
    rows = np.flatnonzero((snr >= cfg.source_snr_min) & (snr <= cfg.source_snr_max))
    if rows.size == 0:
        return rows, None, []
    dev, ctx = _presence_stamps(
        template.masked_image,
        template.psf.kernel_image(),
        np.asarray(table["x"], dtype=np.float64)[rows],
        np.asarray(table["y"], dtype=np.float64)[rows],
        psf_fwhm(template, "template"),
    )
    return rows, ctx, dev


def _presence_finish(table: Table, req, host: list, cfg: AlardLuptonSubtractConfig) -> Table:
    """:func:`flag_not_in_template`'s columns from the fetched stamps (consumed from
    ``host``) of :func:`_presence_gather`."""
    rows, ctx, dev = req
    tsnr = np.full(len(table), np.nan)
    if rows.size:
        got = [host.pop(0) for _ in dev]
        tsnr[rows] = _presence_snr(*got, ctx)
    table = table.copy(copy_data=False)
    table["template_snr"] = tsnr
    flag = np.zeros(len(table), dtype=bool)
    flag[rows] = ~(tsnr[rows] >= cfg.template_source_snr_min)
    table["flag_not_in_template"] = flag
    return table


#: Planes whose bit within 1 px of a source's centre excludes it from the kernel sources.
#: A departure from LSST (its production selector does not test pixel flags): LSST's
#: sources are measured on calexps whose cosmic rays were found and interpolated before
#: detection, so none of them is a ray; gpudiff detects before it finds the rays.
_CENTER_FLAG_PLANES = {"flag_cr_center": "CR"}


def _flag_center_planes(table: Table, mi: MaskedImage) -> Table:
    """``table`` with a boolean ``flag_cr_center`` column: a CR bit in the 3×3 pixels
    around the source's centre in ``mi`` (added only when absent and ``mi`` has a CR plane).

    The science detections are made before the cosmic rays are found, and a ray that was
    not flagged on input is detected as a compact source of S/N 50–100.  Its pixels are
    interpolated before the fit, so its stamp holds no source (a kernel-sum outlier at best),
    and a few such rays below the stars' size once dragged the stellar locus of
    :func:`~gpudiff.psfmatch.candidates.reclassify_extended` to 0.61 × the PSF's trace:
    every star was judged extended and the kernel sum came out 0.71 for a true 1.00
    (issue 14, 2048² raw pairs).  Flagged rows are dropped by the selector (every
    ``flag*`` column) and left out of the stellar locus.
    """
    req = _center_planes_gather(table, mi)
    if req is None:
        return table
    (vals,) = fetch(mi.backend, req[-1])
    return _center_planes_finish(table, req, vals)


def _center_planes_gather(table: Table, mi: MaskedImage):
    """The 3×3 mask pixels around each centre (one gather of a host index: not the whole
    mask, 67 MB at 4096², across to the host) for :func:`_flag_center_planes`:
    (planes, inside (n, 9), backend values (n, 9)), or None when there is nothing to flag."""
    bits = {
        c: mi.mask_planes.bitmask_if_present((p,))
        for c, p in _CENTER_FLAG_PLANES.items()
        if c not in table.colnames
    }
    bits = {c: b for c, b in bits.items() if b}
    if not bits or len(table) == 0:
        return None
    h, w = mi.shape
    with np.errstate(invalid="ignore"):
        xi = np.rint(np.asarray(table["x"], float) - mi.xy0[0])
        yi = np.rint(np.asarray(table["y"], float) - mi.xy0[1])
    ok = np.isfinite(xi) & np.isfinite(yi)
    xi = np.where(ok, xi, 0).astype(np.int64)
    yi = np.where(ok, yi, 0).astype(np.int64)
    d = np.array([-1, 0, 1])
    yy = (yi[:, None, None] + d[None, :, None]).repeat(3, axis=2).reshape(-1, 9)
    xx = (xi[:, None, None] + d[None, None, :]).repeat(3, axis=1).reshape(-1, 9)
    inside = ok[:, None] & (yy >= 0) & (yy < h) & (xx >= 0) & (xx < w)
    flat = np.clip(yy, 0, h - 1) * w + np.clip(xx, 0, w - 1)
    return bits, inside, mi.mask.reshape(-1)[mi.backend.asarray(flat)]


def _center_planes_finish(table: Table, req, vals: np.ndarray) -> Table:
    """:func:`_flag_center_planes`'s columns from the fetched pixels of
    :func:`_center_planes_gather` (a pixel off the image, or a non-finite centre, is 0)."""
    bits, inside, _ = req
    v = np.where(inside, vals, 0)
    out = table.copy(copy_data=False)
    for col, bit in bits.items():
        out[col] = ((v & bit) != 0).any(axis=1)
    return out


def normalize_sources(sources: Any) -> Table:
    """A Table with x, y and snr from any supported source table.

    Parameters
    ----------
    sources : table-like
        ``x``, ``y`` and ``snr`` or a flux and its error (``psf_flux``/``psf_flux_err``,
        ``flux``/``flux_err`` or ``inst_flux``/``inst_flux_err``); ``n_peaks`` becomes
        ``isolated``.

    Returns
    -------
    astropy Table
        A shallow copy; ``psf_flux``/``psf_flux_err`` carry the S/N when absent.

    Raises
    ------
    InvalidInputError
        No position or no S/N can be had.
    """
    t = Table(sources) if not isinstance(sources, Table) else sources.copy(copy_data=False)
    for c in ("x", "y"):
        if c not in t.colnames:
            raise InvalidInputError(
                f"kernel source table has no {c!r} column (columns: {t.colnames})"
            )
    if "n_peaks" in t.colnames:
        # LSST's doIsolated means "not blended" (parent == 0 and no deblended children):
        # a footprint with a single peak.  Neighbours inside a stamp are in both images
        # and are matched by the kernel like the star itself.
        t["isolated"] = np.asarray(t["n_peaks"]) == 1
    if "snr" not in t.colnames:
        for f, e in (
            ("psf_flux", "psf_flux_err"),
            ("flux", "flux_err"),
            ("inst_flux", "inst_flux_err"),
        ):
            if f in t.colnames and e in t.colnames:
                with np.errstate(divide="ignore", invalid="ignore"):
                    t["snr"] = np.asarray(t[f], float) / np.asarray(t[e], float)
                break
        else:
            raise InvalidInputError(
                "kernel source table needs an 'snr' column or flux and flux-error "
                "columns (psf_flux/psf_flux_err or flux/flux_err)"
            )
    if "psf_flux" not in t.colnames or "psf_flux_err" not in t.colnames:
        # The selector ranks and cuts on S/N only; give it flux columns that carry it.
        t["psf_flux"], t["psf_flux_err"] = np.asarray(t["snr"], dtype=float), np.ones(len(t))
    return t

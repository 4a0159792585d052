"""MatchBackgroundsTask: match the backgrounds of a tract's warps to a reference visit
(docs/algorithms.md §9).

The current LSST design (§9.1): choose a reference visit (:class:`ChooseReferenceVisitTask`,
or ``ref_visit``); for every other visit, bin the differences "reference-visit warp −
warp" of all its patches into one :class:`TractBackground`, fill and interpolate that
grid into a smooth model (Akima spline by default), and add the model, evaluated on each
warp, to the warp.  Sources cancel in the differences and the bins are clipped means, so
the model follows the sky, not the stars.  The reference visit's warps come back
unchanged with a zero model.  Per visit the §9.3 diagnostics are reported: the fit RMS of
the model at the bin centres, the mean squared residual of the matched differences and
the clipped mean variance of the difference image.

The legacy per-pair matcher (§9.3: ``matchBackgrounds(ref, sci)``, spline or Chebyshev,
undersample styles) is :func:`match_background_pair` in
:mod:`gpudiff.tasks.match_background_pair`.  Tasks never touch files.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
from astropy.table import Table

from ..backend import Backend, resolve_backend
from ..backend.threads import cpu_workers, parallel_map
from ..configfield import option, validate_config
from ..errors import InvalidInputError, NoOverlapError
from ..image import Box, Exposure, MaskedImage
from ..image.tract import TractGrid
from ..ops.background import evaluate_bin_grid
from ..ops.window_stats import window_statistics
from .tract_background import (
    INTERPOLATION_STYLES,
    ChooseReferenceVisitConfig,
    ChooseReferenceVisitTask,
    ReferenceChoice,
    TractBackground,
    TractBackgroundConfig,
)

__all__ = [
    "MatchBackgroundsConfig",
    "MatchBackgroundsResult",
    "MatchBackgroundsTask",
    "WarpBackground",
]

log = logging.getLogger("gpudiff.tasks.match_backgrounds")

_UNDERSAMPLE = ("REDUCE_INTERP_ORDER", "THROW_EXCEPTION")


@dataclass(frozen=True)
class MatchBackgroundsConfig:
    """LSST ``MatchBackgroundsConfig`` (docs/algorithms.md §9.1).

    Attributes
    ----------
    ref_warp_visit : int, optional
        Use this visit as the reference instead of choosing one.
    tract_bg_model : TractBackgroundConfig
        Binning (128 px, MEANCLIP 3σ × 3 of 256 px windows), masks, interpolation (AKIMA).
    choose_reference : ChooseReferenceVisitConfig
        Weights of the reference-visit cost (0.3 χ², 0.3 variance, 0.4 coverage).
    undersample_style : {"REDUCE_INTERP_ORDER", "THROW_EXCEPTION"}
        Too few bins along an axis for the interpolation: reduce its order, or raise.
        (LSST rejects INCREASE_NXNYSAMPLE here too.)
    visit_key : str
        Metadata card holding a warp's visit id (not an LSST field: LSST has data ids).
    """

    ref_warp_visit: int | None = option(
        None, doc="Use this visit as the reference instead of choosing one (None: choose)."
    )
    tract_bg_model: TractBackgroundConfig = option(
        doc="Tract bins, their statistic, masks and interpolation (the difference model).",
        default_factory=TractBackgroundConfig,
    )
    choose_reference: ChooseReferenceVisitConfig = option(
        doc="Weights of the reference-visit cost (chi2, variance, coverage).",
        default_factory=ChooseReferenceVisitConfig,
    )
    undersample_style: str = option(
        "REDUCE_INTERP_ORDER",
        doc="Too few bins along an axis for the interpolation: reduce its order, or raise.",
        choices=_UNDERSAMPLE,
        fold_case=True,
    )
    visit_key: str = option(
        "VISIT",
        doc="Header card holding a warp's visit id (LSST has data ids instead).",
        gpudiff_only=True,
    )

    def __post_init__(self):
        validate_config(self)
        if not self.visit_key.strip():
            raise InvalidInputError("MatchBackgroundsConfig.visit_key must be a header keyword")


@dataclass
class WarpBackground:
    """The background model added to one warp (LSST: one ``BackgroundList`` per warp).

    Attributes
    ----------
    visit, patch : int
    bbox : Box
        The warp's box in the tract.
    model : array (H, W), float32, on the task's backend
        Added to the warp's image (zero for the reference visit).
    is_reference : bool
    binned : ndarray (ny, nx) or None
        The visit's filled tract bin grid of (reference − visit) the model interpolates,
        with ``x_centres`` / ``y_centres`` its bin centres (None for the reference).
    """

    visit: int
    patch: int
    bbox: Box
    model: Any
    is_reference: bool
    binned: np.ndarray | None = None
    x_centres: np.ndarray | None = None
    y_centres: np.ndarray | None = None


@dataclass
class MatchBackgroundsResult:
    """What :meth:`MatchBackgroundsTask.run` returns (LSST Struct fields, snake_case).

    Attributes
    ----------
    background_info_list : list of WarpBackground
        One per input warp, in input order.
    matched_image_list : list of Exposure
        The background-matched warps, in input order (new objects; inputs unchanged).
    reference_visit : int
    diagnostics : astropy.table.Table
        One row per visit: ``visit``, ``n_warps``, ``is_reference``, ``fit_rms``,
        ``matched_mse``, ``diff_im_var`` (NaN for the reference) and, when the reference was
        chosen, ``chi2``, ``variance``, ``coverage`` and ``cost``.
    reference_choice : ReferenceChoice or None
        The scores, when the reference was chosen rather than given.
    """

    background_info_list: list
    matched_image_list: list
    reference_visit: int
    diagnostics: Table
    reference_choice: ReferenceChoice | None = None


def _visit_id(value: Any, where: str) -> int:
    try:
        v = int(value)
        if v != value and not isinstance(value, str):
            raise ValueError
        return v
    except (TypeError, ValueError):
        raise InvalidInputError(f"{where}: visit id must be an integer, got {value!r}") from None


def _difference(ref: MaskedImage, warp: MaskedImage, box: Box, planes: Sequence[str]):
    """(ref − warp) image, usable-pixel mask and variance over ``box`` (afw arithmetic:
    variances add; a pixel is usable only where both are)."""

    def cut(mi, a):
        x0, y0 = mi.xy0
        return a[box.y0 - y0 : box.y1 - y0, box.x0 - x0 : box.x1 - x0]

    planes = list(planes)
    image = cut(ref, ref.image) - cut(warp, warp.image)
    good = cut(ref, ref.good_pixels(planes)) & cut(warp, warp.good_pixels(planes))
    return image, good, cut(ref, ref.variance) + cut(warp, warp.variance)


class MatchBackgroundsTask:
    """Match the backgrounds of a tract's warps to a reference visit (LSST
    ``MatchBackgroundsTask``).

    Parameters
    ----------
    config : MatchBackgroundsConfig, optional
    backend : Backend or str, optional
        Where the statistics and the model evaluation run (default: the default backend).

    Examples
    --------
    >>> task = MatchBackgroundsTask()                                # doctest: +SKIP
    >>> res = task.run(warps, TractGrid.from_size(4000, patch_inner=2000))  # doctest: +SKIP
    >>> res.reference_visit, res.diagnostics                         # doctest: +SKIP
    """

    def __init__(
        self, config: MatchBackgroundsConfig | None = None, backend: Backend | str | None = None
    ):
        self.config = MatchBackgroundsConfig() if config is None else config
        if not isinstance(self.config, MatchBackgroundsConfig):
            raise InvalidInputError(
                f"config must be a MatchBackgroundsConfig, got {type(self.config).__name__}"
            )
        self.backend = resolve_backend(backend)

    # --- input handling ----------------------------------------------------------------
    def group_warps(
        self, warps: Sequence[Exposure], tract: TractGrid, visits: Sequence[int] | None = None
    ) -> dict:
        """{visit: [(index, patch, warp), ...]} with every warp checked against the tract."""
        if not isinstance(tract, TractGrid):
            raise InvalidInputError(f"tract must be a TractGrid, got {type(tract).__name__}")
        warps = list(warps)
        if not warps:
            raise InvalidInputError("MatchBackgroundsTask: no warps given")
        if visits is not None and len(visits) != len(warps):
            raise InvalidInputError(f"visits has {len(visits)} entries for {len(warps)} warps")
        key = self.config.visit_key
        groups: dict[int, list] = {}
        seen = set()
        for i, w in enumerate(warps):
            if not isinstance(w, Exposure):
                raise InvalidInputError(f"warp {i} must be an Exposure, got {type(w).__name__}")
            if visits is not None:
                visit = _visit_id(visits[i], f"visits[{i}]")
            elif key in w.metadata:
                visit = _visit_id(w.metadata[key], f"warp {i} header {key}")
            else:
                raise InvalidInputError(
                    f"warp {i} has no {key!r} metadata card and no visit id was given"
                )
            try:
                patch = tract.patch_of(w.bbox)
            except NoOverlapError as exc:
                raise NoOverlapError(f"warp {i} (visit {visit}): {exc}") from None
            if (visit, patch) in seen:
                raise InvalidInputError(f"warp {i}: visit {visit} has two warps of patch {patch}")
            seen.add((visit, patch))
            if w.backend.name != self.backend.name:
                w = w.to_backend(self.backend)  # a copy: the caller's warp is untouched
            groups.setdefault(visit, []).append((i, patch, w))
        return groups

    # --- the task ----------------------------------------------------------------------
    def run(
        self,
        warps: Sequence[Exposure],
        tract: TractGrid,
        ref_visit: int | None = None,
        visits: Sequence[int] | None = None,
    ) -> MatchBackgroundsResult:
        """Match every warp's background to the reference visit's.

        Parameters
        ----------
        warps : sequence of Exposure
            Warps placed on the tract by their xy0; several visits, one warp per patch
            and visit.  Not modified.
        tract : TractGrid
        ref_visit : int, optional
            The reference visit (overrides ``config.ref_warp_visit`` and the choice).
        visits : sequence of int, optional
            Visit id of every warp; default: each warp's ``config.visit_key`` card.

        Returns
        -------
        MatchBackgroundsResult

        Raises
        ------
        InvalidInputError
            No warps, a warp without a visit id, two warps of one visit and patch, an
            unknown ``ref_visit``.
        NoOverlapError
            A warp outside the tract, or a visit sharing no usable pixel with the reference.
        """
        cfg, be = self.config, self.backend
        groups = self.group_warps(warps, tract, visits)
        choice = None
        ref = ref_visit if ref_visit is not None else cfg.ref_warp_visit
        if ref is None:
            chooser = ChooseReferenceVisitTask(cfg.choose_reference, cfg.tract_bg_model, be)
            choice = chooser.run(
                {v: [w for _, _, w in items] for v, items in groups.items()}, tract
            )
            ref = choice.reference_visit
            log.info("reference visit %d (cost %s)", ref, np.round(choice.cost, 3))
        ref = _visit_id(ref, "ref_visit")
        if ref not in groups:
            raise InvalidInputError(
                f"reference visit {ref} is not among the warps' visits {sorted(groups)}"
            )
        ref_by_patch = {p: w.masked_image for _, p, w in groups[ref]}
        n = sum(len(items) for items in groups.values())
        backgrounds: list = [None] * n
        matched: list = [None] * n

        def one_visit(item):
            visit, items = item
            if visit == ref:
                for i, p, w in items:
                    backgrounds[i] = WarpBackground(
                        visit, p, w.bbox, be.xp.zeros(w.shape, dtype=np.float32), True
                    )
                    matched[i] = w.to_backend(be)
                return (visit, len(items), True, 0.0, math.nan, math.nan)
            tb, pairs = self._difference_model(visit, items, ref, ref_by_patch, tract)
            stats = tb.stats_image()
            order = INTERPOLATION_STYLES[cfg.tract_bg_model.interpolation]
            at_centres = be.asnumpy(
                evaluate_bin_grid(
                    stats,
                    tb.y_centres,
                    tb.x_centres,
                    tb.y_centres,
                    tb.x_centres,
                    order,
                    "linear",
                    cfg.undersample_style,
                    be,
                )
            )
            good = tb.good_bins
            fit_rms = float(np.sqrt(np.mean((tb.centred_stats_image() - at_centres)[good] ** 2)))
            models = {}
            for i, p, w in items:
                model = tb.evaluate(w.bbox, stats)
                models[i] = model
                backgrounds[i] = WarpBackground(
                    visit, p, w.bbox, model, False, stats, tb.x_centres, tb.y_centres
                )
                mi = w.masked_image
                img = mi.image + model  # the matched image: warp + (ref − warp) model
                matched[i] = Exposure(
                    MaskedImage(
                        img,
                        mi.variance,
                        mi.mask,
                        xy0=mi.xy0,
                        mask_planes=mi.mask_planes,
                        backend=be,
                    ),
                    psf=w.psf,
                    wcs=w.wcs,
                    photo_calib=w.photo_calib,
                    metadata=w.metadata,
                )
            mse, dvar = self._residual_diagnostics(items, pairs, models, ref_by_patch)
            log.info(
                "visit %d: fit RMS %.4g, matched MSE %.4g, diff variance %.4g",
                visit,
                fit_rms,
                mse,
                dvar,
            )
            return (visit, len(items), False, fit_rms, mse, dvar)

        # Visits are matched independently (each writes only its own warps' slots): on the
        # CPU one thread per core; map keeps the visits' order for the diagnostics table.
        rows = parallel_map(
            one_visit, groups.items(), cpu_workers(len(groups), 4, parallel=not be.is_gpu)
        )
        diag = Table(
            rows=rows,
            names=("visit", "n_warps", "is_reference", "fit_rms", "matched_mse", "diff_im_var"),
            dtype=(np.int64, np.int64, bool, np.float64, np.float64, np.float64),
        )
        if choice is not None:
            order = [choice.visits.index(v) for v in diag["visit"]]
            for name in ("chi2", "variance", "coverage", "cost"):
                diag[name] = np.asarray(getattr(choice, name))[order]
        diag.meta["reference_visit"] = int(ref)
        return MatchBackgroundsResult(backgrounds, matched, int(ref), diag, choice)

    def _difference_model(self, visit, items, ref, ref_by_patch, tract):
        """The TractBackground of (reference − visit) over all the visit's warps."""
        cfg = self.config
        tb = TractBackground(tract, cfg.tract_bg_model, self.backend)
        pairs = {}
        for i, p, w in items:
            r = ref_by_patch.get(p)
            box = None if r is None else w.bbox.intersection(r.bbox)
            if box is None:
                continue  # LSST: an all-NaN reference for a patch the reference visit lacks
            image, good, _ = _difference(r, w.masked_image, box, cfg.tract_bg_model.mask)
            tb.add_image(image, good, (box.x0, box.y0))
            pairs[i] = box
        if not tb.good_bins.any():
            raise NoOverlapError(
                f"visit {visit} shares no usable pixels with reference visit {ref} "
                f"(no patch in common, or all masked); it cannot be matched"
            )
        return tb, pairs

    def _residual_diagnostics(self, items, pairs, models, ref_by_patch) -> tuple[float, float]:
        """Mean squared (reference − matched) and MEANCLIP of the difference variance (§9.3),
        over the usable pixels the visit shares with the reference."""
        be, cfg = self.backend, self.config
        sq = n_sq = 0.0
        var_sum = var_n = 0.0
        for i, p, w in items:
            if i not in pairs:
                continue
            box = pairs[i]
            image, good, var = _difference(
                ref_by_patch[p], w.masked_image, box, cfg.tract_bg_model.mask
            )
            m = models[i][
                box.y0 - w.xy0[1] : box.y1 - w.xy0[1], box.x0 - w.xy0[0] : box.x1 - w.xy0[0]
            ]
            resid = be.xp.where(good, image - m, 0).astype(np.float64)
            k = int(good.sum())
            sq += float((resid * resid).sum())
            n_sq += k
            st = window_statistics(
                var,
                good,
                [0],
                [0],
                var.shape,
                statistic="MEANCLIP",
                nsigma=cfg.tract_bg_model.num_sigma_clip,
                niter=cfg.tract_bg_model.num_iter,
                backend=be,
            )
            if np.isfinite(st["mean"][0, 0]):
                var_sum += st["mean"][0, 0] * k
                var_n += k
        return (sq / n_sq if n_sq else math.nan), (var_sum / var_n if var_n else math.nan)

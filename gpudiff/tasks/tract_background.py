"""Tract-level binned backgrounds and the choice of a reference visit (docs/algorithms.md §9.1).

:class:`TractBackground` is LSST's ``TractBackground``: a grid of bins over the whole tract
with three accumulators (Σ mean·N, Σ N, Σ variance·N).  Adding a warp measures, for every
bin the warp touches, the afw ``MEANCLIP``, ``NPOINT`` and ``VARIANCECLIP`` of its pixels in
a window of twice the bin size centred on the bin (so neighbouring windows overlap and the
grid is smooth); merging warps or patches is plain addition, so overlaps are N-weighted.
Bins with too little coverage are filled by interpolation and the grid is evaluated onto
any warp by a smooth (Akima by default) interpolant.

:class:`ChooseReferenceVisitTask` scores every visit by docs/algorithms.md's weighted cost of
plane-fit χ², mean variance and coverage and picks the cheapest.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Mapping

import numpy as np
from astropy.table import Table

from ..backend import Backend, resolve_backend
from ..backend.threads import cpu_workers, parallel_map
from ..configfield import option, validate_config
from ..errors import AllMaskedError, InvalidInputError, ShapeMismatchError
from ..image import Box, Exposure, MaskedImage
from ..image.tract import TractGrid
from ..ops.background import evaluate_bin_grid, fill_bad_bins
from ..ops.window_stats import window_statistics

__all__ = [
    "TractBackgroundConfig",
    "TractBackground",
    "ChooseReferenceVisitConfig",
    "ReferenceChoice",
    "ChooseReferenceVisitTask",
    "INTERPOLATION_STYLES",
    "chebyshev_design",
]

#: afw interpolation styles → :func:`gpudiff.ops.background.evaluate_bin_grid` orders.
INTERPOLATION_STYLES = {"AKIMA_SPLINE": "akima", "CUBIC_SPLINE": "cubic", "LINEAR": "linear"}
_STATISTICS = ("MEANCLIP", "MEAN")


@dataclass(frozen=True)
class TractBackgroundConfig:
    """LSST ``TractBackgroundConfig`` (docs/algorithms.md §9.1) plus the bin statistic's clipping.

    Attributes
    ----------
    x_bin, y_bin : int
        Bin size (128); each bin's statistics use a window of twice that, centred on it.
    min_frac : float
        A bin is measured (not interpolated) when its accumulated NPOINT reaches
        ``min_frac · x_bin · y_bin`` (0.1 → 1638.4 pixels).
    mask : tuple of str
        Planes whose pixels are ignored: BAD, SAT, EDGE, NO_DATA (add DETECTED to keep the
        bins off detected sources; the clipping already rejects their cores).
    interpolation : {"AKIMA_SPLINE", "CUBIC_SPLINE", "LINEAR"}
        Filling of bad bins (along columns, then rows) and evaluation onto warps.
    do_smooth, smooth_scale : bool, float
        Gaussian smoothing of the filled bin grid, σ in bins.
    statistic : {"MEANCLIP", "MEAN"}
        The bin statistic (LSST: MEANCLIP).
    num_sigma_clip, num_iter : float, int
        afw clipping of each window (3σ, 3 passes).
    do_centre_correction : bool
        Move each bin value from the centroid of its pixels to the bin centre, and
        remove the window's curvature bias, along the grid's own derivatives (not in
        LSST; see :meth:`TractBackground.centred_stats_image`).
    """

    x_bin: int = option(
        128, doc="Bin width in pixels (statistics over a window twice that, centred).", min=1
    )
    y_bin: int = option(
        128, doc="Bin height in pixels (statistics over a window twice that, centred).", min=1
    )
    min_frac: float = option(
        0.1,
        doc="A bin is measured (not interpolated) when its NPOINT reaches min_frac x "
        "x_bin x y_bin.",
        min=0.0,
        max=4.0,
    )
    mask: tuple[str, ...] = option(
        ("BAD", "SAT", "EDGE", "NO_DATA"),
        doc="Pixels with these planes are ignored (add DETECTED to keep bins off sources).",
    )
    interpolation: str = option(
        "AKIMA_SPLINE",
        doc="Filling of bad bins and evaluation of the grid onto the warps.",
        choices=tuple(INTERPOLATION_STYLES),
        fold_case=True,
    )
    do_smooth: bool = option(False, doc="Gaussian-smooth the filled bin grid.")
    smooth_scale: float = option(
        2.0,
        doc="Sigma of the smoothing, in bins (do_smooth).",
        min=0,
        inclusive_min=False,
    )
    statistic: str = option(
        "MEANCLIP",
        doc="Bin statistic.",
        choices=_STATISTICS,
        fold_case=True,
        gpudiff_only=True,
    )
    num_sigma_clip: float = option(
        3.0,
        doc="Clipping threshold in sigmas of each window's MEANCLIP.",
        min=0,
        inclusive_min=False,
        gpudiff_only=True,
    )
    num_iter: int = option(
        3, doc="Clipping passes of each window's MEANCLIP.", min=1, gpudiff_only=True
    )
    do_centre_correction: bool = option(
        True,
        doc="Move each bin value from the centroid of its pixels to the bin centre and "
        "remove the window's curvature bias.",
        gpudiff_only=True,
    )

    def __post_init__(self):
        validate_config(self)


def _masked_image(warp: Any, what: str) -> MaskedImage:
    if isinstance(warp, Exposure):
        return warp.masked_image
    if isinstance(warp, MaskedImage):
        return warp
    raise InvalidInputError(f"{what} must be an Exposure or MaskedImage, got {type(warp).__name__}")


class TractBackground:
    """Binned background accumulators over a whole tract (LSST ``TractBackground``).

    Parameters
    ----------
    tract : TractGrid
    config : TractBackgroundConfig, optional
    backend : Backend or str, optional
        Where window statistics and evaluations run.

    Attributes
    ----------
    values, numbers, variances : ndarray (ny, nx), float64
        Σ mean·N, Σ N and Σ variance·N over everything added (host arrays).
    """

    def __init__(
        self,
        tract: TractGrid,
        config: TractBackgroundConfig | None = None,
        backend: Backend | str | None = None,
    ):
        if not isinstance(tract, TractGrid):
            raise InvalidInputError(
                f"TractBackground needs a TractGrid, got {type(tract).__name__}"
            )
        self.tract = tract
        self.config = TractBackgroundConfig() if config is None else config
        self.backend = resolve_backend(backend)
        b = tract.bbox
        # ceil: every tract pixel belongs to a bin (docs/algorithms.md leaves truncation unverified)
        self.nx = -(-b.width // self.config.x_bin)
        self.ny = -(-b.height // self.config.y_bin)
        self.values = np.zeros((self.ny, self.nx))
        self.numbers = np.zeros((self.ny, self.nx))
        self.variances = np.zeros((self.ny, self.nx))
        # Σ N·x̄ and Σ N·ȳ: where the pixels behind each bin's value actually are
        self.x_sums = np.zeros((self.ny, self.nx))
        self.y_sums = np.zeros((self.ny, self.nx))

    # --- geometry --------------------------------------------------------------------
    @property
    def x_centres(self) -> np.ndarray:
        """Tract x of each bin centre (pixel-centre convention)."""
        return (
            self.tract.bbox.x0
            + self.config.x_bin * np.arange(self.nx)
            + 0.5 * (self.config.x_bin - 1)
        )

    @property
    def y_centres(self) -> np.ndarray:
        return (
            self.tract.bbox.y0
            + self.config.y_bin * np.arange(self.ny)
            + 0.5 * (self.config.y_bin - 1)
        )

    def _window_range(self, lo: int, hi: int, origin: int, size: int, n: int) -> np.ndarray:
        """Bins whose window [origin + size·i − size/2, … + 2·size) meets [lo, hi)."""
        half = size // 2
        i0 = max(0, -(-(lo - origin + half - 2 * size + 1) // size))
        i1 = min(n - 1, (hi - 1 - origin + half) // size)
        return np.arange(i0, i1 + 1)

    # --- accumulation ----------------------------------------------------------------
    def add_warp(self, warp: Exposure | MaskedImage) -> "TractBackground":
        """Add the binned statistics of a warp (placed in the tract by its xy0)."""
        mi = _masked_image(warp, "warp")
        good = mi.good_pixels(list(self.config.mask))
        return self.add_image(mi.image, good, mi.xy0)

    def add_image(self, image: Any, good: Any, xy0: tuple[int, int]) -> "TractBackground":
        """Add the binned statistics of an image with a usable-pixel mask at ``xy0``.

        Parameters
        ----------
        image : 2-D array
        good : 2-D bool array (same shape)
        xy0 : (int, int)
            Tract coordinates of ``image[0, 0]``.
        """
        cfg, b = self.config, self.tract.bbox
        H, W = image.shape
        x0, y0 = int(xy0[0]), int(xy0[1])
        if not b.contains(Box(x0, y0, x0 + W, y0 + H)):
            raise InvalidInputError(
                f"image at xy0 {xy0} of shape {(H, W)} is not inside the tract {b}"
            )
        ix = self._window_range(x0, x0 + W, b.x0, cfg.x_bin, self.nx)
        iy = self._window_range(y0, y0 + H, b.y0, cfg.y_bin, self.ny)
        if ix.size == 0 or iy.size == 0:
            return self
        # Window i = cells i and i+1 of the half-bin-shifted cell grid (cell k starts at
        # origin + bin·k − bin/2): every pixel is sorted once, not once per window.
        kx, ky = np.arange(ix[0], ix[-1] + 2), np.arange(iy[0], iy[-1] + 2)
        cs = b.x0 + cfg.x_bin * kx - cfg.x_bin // 2 - x0
        rs = b.y0 + cfg.y_bin * ky - cfg.y_bin // 2 - y0
        st = window_statistics(
            image,
            good,
            rs,
            cs,
            (cfg.y_bin, cfg.x_bin),
            span=2,
            statistic=cfg.statistic,
            nsigma=cfg.num_sigma_clip,
            niter=cfg.num_iter,
            backend=self.backend,
        )
        n = st["n_point"].astype(np.float64)
        ok = np.isfinite(st["mean"]) & (n > 0)
        var = np.where(np.isfinite(st["variance"]), st["variance"], 0.0)
        sl = (slice(int(iy[0]), int(iy[-1]) + 1), slice(int(ix[0]), int(ix[-1]) + 1))
        self.values[sl] += np.where(ok, st["mean"] * n, 0.0)
        self.numbers[sl] += np.where(ok, n, 0.0)
        self.variances[sl] += np.where(ok, var * n, 0.0)
        self.x_sums[sl] += np.where(ok, (x0 + st["col_mean"]) * n, 0.0)
        self.y_sums[sl] += np.where(ok, (y0 + st["row_mean"]) * n, 0.0)
        return self

    def merge(self, other: "TractBackground") -> "TractBackground":
        """Add another accumulator on the same tract and bins (in place; returns self)."""
        if (
            not isinstance(other, TractBackground)
            or other.tract != self.tract
            or (other.config.x_bin, other.config.y_bin) != (self.config.x_bin, self.config.y_bin)
        ):
            raise ShapeMismatchError(
                "can only merge TractBackgrounds of the same tract and bin size"
            )
        self.values += other.values
        self.numbers += other.numbers
        self.variances += other.variances
        self.x_sums += other.x_sums
        self.y_sums += other.y_sums
        return self

    # --- products --------------------------------------------------------------------
    @property
    def good_bins(self) -> np.ndarray:
        """Bins measured well enough to keep their own value (NPOINT ≥ min_frac·bin area)."""
        return (self.numbers >= self.config.min_frac * self.config.x_bin * self.config.y_bin) & (
            self.numbers > 0
        )

    def raw_stats_image(self) -> np.ndarray:
        """values / numbers (NaN where nothing was measured)."""
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(
                self.numbers > 0, self.values / np.where(self.numbers > 0, self.numbers, 1), np.nan
            )

    def _fill(self, values: np.ndarray) -> np.ndarray:
        method = "akima" if self.config.interpolation == "AKIMA_SPLINE" else "linear"
        # Both fill orders averaged and 4-bin end fits: a patch missing from a visit is
        # extrapolated from both neighbouring patches with a slope that is not just the
        # difference of two (partly covered, noisy) edge bins.  (LSST: Akima along one
        # direction.)
        return fill_bad_bins(
            values,
            self.good_bins,
            self.y_centres,
            self.x_centres,
            method,
            symmetric=True,
            end_points=4,
        )

    def centred_stats_image(self) -> np.ndarray:
        """values / numbers moved to the bin centres (NaN where nothing was measured).

        A window only partly covered (tract or warp edge, chip gap, coverage hole) samples
        the sky at the centroid of its usable pixels, up to half a bin from the bin
        centre; on a sloped sky (tens of σ across a tract) that is a bias of a large
        fraction of σ.  Each value is moved to its bin centre along the local gradient of
        the filled grid, iterated to convergence (departure from LSST, which uses the
        values as they are).
        """
        raw = self.raw_stats_image()
        good = self.good_bins
        if not good.any() or not self.config.do_centre_correction:
            return raw
        with np.errstate(invalid="ignore", divide="ignore"):
            nn = np.where(self.numbers > 0, self.numbers, 1.0)
            dx = np.where(good, self.x_sums / nn - self.x_centres[None, :], 0.0)
            dy = np.where(good, self.y_sums / nn - self.y_centres[:, None], 0.0)
        # A window's mean of a curved sky is also off by ½·f''·(position variance); the
        # full window's variance, (2·bin)²/12, is used for every window.
        sxx, syy = (2 * self.config.x_bin) ** 2 / 12.0, (2 * self.config.y_bin) ** 2 / 12.0
        v = raw
        for _ in range(4):
            f = self._fill(v)
            gy = np.gradient(f, self.y_centres, axis=0) if self.ny > 2 else np.zeros_like(f)
            gx = np.gradient(f, self.x_centres, axis=1) if self.nx > 2 else np.zeros_like(f)
            gyy = np.gradient(gy, self.y_centres, axis=0) if self.ny > 2 else np.zeros_like(f)
            gxx = np.gradient(gx, self.x_centres, axis=1) if self.nx > 2 else np.zeros_like(f)
            v = raw - gx * dx - gy * dy - 0.5 * (gxx * sxx + gyy * syy)
        return v

    def stats_image(self) -> np.ndarray:
        """The bin grid with poorly covered bins filled by interpolation (LSST ``getStatsImage``).

        Raises
        ------
        AllMaskedError
            No bin is covered well enough.
        """
        good = self.good_bins
        if not good.any():
            raise AllMaskedError(
                "TractBackground: no bin has enough usable pixels; nothing was added, "
                "or everything added was masked"
            )
        out = self._fill(self.centred_stats_image())
        if self.config.do_smooth:
            from scipy.ndimage import gaussian_filter

            out = gaussian_filter(out, self.config.smooth_scale, mode="nearest")
        return out

    def variance_image(self) -> np.ndarray:
        """variances / numbers: the mean pixel variance of each bin (NaN where empty)."""
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(
                self.numbers > 0,
                self.variances / np.where(self.numbers > 0, self.numbers, 1),
                np.nan,
            )

    def evaluate(self, box, stats: np.ndarray | None = None) -> Any:
        """The smooth model over a box of the tract (float32, on the backend).

        Parameters
        ----------
        box : Box
            Tract pixels to evaluate (e.g. a warp's bbox).
        stats : ndarray (ny, nx), optional
            A precomputed :meth:`stats_image` (saves refilling it for every warp).
        """
        g = self.stats_image() if stats is None else stats
        order = INTERPOLATION_STYLES[self.config.interpolation]
        # Linear continuation past the outer bin centres (half a bin at the tract edge).
        return evaluate_bin_grid(
            g,
            self.y_centres,
            self.x_centres,
            np.arange(box.y0, box.y1),
            np.arange(box.x0, box.x1),
            order,
            "linear",
            backend=self.backend,
        )

    def to_warp_background(
        self, warp: Exposure | MaskedImage, stats: np.ndarray | None = None
    ) -> Any:
        """The model evaluated on a warp's pixels (LSST ``toWarpBackground``)."""
        return self.evaluate(_masked_image(warp, "warp").bbox, stats)


def chebyshev_design(x: np.ndarray, y: np.ndarray, order: int, box) -> np.ndarray:
    """Columns T_i(x')·T_j(y') for i + j ≤ order (afw ``Chebyshev1Function2D`` term order:
    by total degree, then decreasing i), with x', y' mapping ``box`` as a Box2D onto [−1, 1]."""
    xmin, xmax, ymin, ymax = box.x0 - 0.5, box.x1 - 0.5, box.y0 - 0.5, box.y1 - 0.5
    xs = (np.asarray(x, np.float64) - 0.5 * (xmin + xmax)) * 2.0 / (xmax - xmin)
    ys = (np.asarray(y, np.float64) - 0.5 * (ymin + ymax)) * 2.0 / (ymax - ymin)
    tx = np.polynomial.chebyshev.chebvander(xs, order)
    ty = np.polynomial.chebyshev.chebvander(ys, order)
    return np.stack(
        [tx[:, d - j] * ty[:, j] for d in range(order + 1) for j in range(d + 1)], axis=1
    )


@dataclass(frozen=True)
class ChooseReferenceVisitConfig:
    """LSST ``ChooseReferenceVisitConfig`` (docs/algorithms.md §9.1): the weights of the cost
    terms."""

    best_ref_weight_chi2: float = option(
        0.3, doc="Weight of the plane-fit chi2 in a visit's cost.", min=0, finite=True
    )
    best_ref_weight_variance: float = option(
        0.3, doc="Weight of the mean variance in a visit's cost.", min=0, finite=True
    )
    best_ref_weight_global_coverage: float = option(
        0.4, doc="Weight of the (lack of) coverage in a visit's cost.", min=0, finite=True
    )

    def __post_init__(self):
        validate_config(self)
        w = (
            self.best_ref_weight_chi2,
            self.best_ref_weight_variance,
            self.best_ref_weight_global_coverage,
        )
        if sum(w) <= 0:
            raise InvalidInputError(f"reference-visit weights must be >= 0 and not all 0, got {w}")


@dataclass
class ReferenceChoice:
    """The scores of every visit and the chosen reference.

    Attributes
    ----------
    reference_visit : int
    visits : list of int
    chi2 : ndarray
        Reduced χ² of an inverse-variance-weighted plane fit to the visit's bin grid.
    variance : ndarray
        Mean pixel variance of its good bins.
    coverage : ndarray
        Number of good bins.
    cost : ndarray
        0.3·χ²/max χ² + 0.3·var/max var + 0.4·min N/N (NaN for a visit without good bins).
    """

    reference_visit: int
    visits: list
    chi2: np.ndarray
    variance: np.ndarray
    coverage: np.ndarray
    cost: np.ndarray
    tract_backgrounds: dict = field(default_factory=dict, repr=False)

    def to_table(self) -> Table:
        """One row per visit (visit, chi2, variance, coverage, cost, is_reference)."""
        t = Table()
        t["visit"] = np.asarray(self.visits, dtype=np.int64)
        t["chi2"], t["variance"] = self.chi2, self.variance
        t["coverage"], t["cost"] = self.coverage, self.cost
        t["is_reference"] = t["visit"] == self.reference_visit
        return t


class ChooseReferenceVisitTask:
    """Pick the reference visit (LSST ``ChooseReferenceVisitTask``, docs/algorithms.md §9.1).

    Parameters
    ----------
    config : ChooseReferenceVisitConfig, optional
    tract_background : TractBackgroundConfig, optional
    backend : Backend or str, optional
    """

    def __init__(
        self,
        config: ChooseReferenceVisitConfig | None = None,
        tract_background: TractBackgroundConfig | None = None,
        backend: Backend | str | None = None,
    ):
        self.config = ChooseReferenceVisitConfig() if config is None else config
        self.tract_background = (
            TractBackgroundConfig() if tract_background is None else tract_background
        )
        self.backend = resolve_backend(backend)

    def run(self, warps_by_visit: Mapping[int, list], tract: TractGrid) -> ReferenceChoice:
        """Bin every visit's warps on the tract and score the visits."""
        if not warps_by_visit:
            raise InvalidInputError("ChooseReferenceVisitTask: no visits given")

        def one_visit(item):
            visit, warps = item
            tb = TractBackground(tract, self.tract_background, self.backend)
            for w in warps:
                tb.add_warp(w)
            return visit, tb

        # Visits are binned independently: on the CPU one thread per core (NumPy releases
        # the GIL in its sorts and loops); map keeps the visits' order.
        workers = cpu_workers(len(warps_by_visit), 4, parallel=not self.backend.is_gpu)
        tbs = dict(parallel_map(one_visit, warps_by_visit.items(), workers))
        return self.score(tbs)

    @staticmethod
    def _plane_fit(tb: TractBackground) -> tuple[float, float, int]:
        stats, var = tb.centred_stats_image(), tb.variance_image()
        good = tb.good_bins & np.isfinite(stats) & np.isfinite(var) & (var > 0)
        n = int(good.sum())
        if n == 0:
            return math.nan, math.nan, 0
        yy, xx = np.meshgrid(tb.y_centres, tb.x_centres, indexing="ij")
        a = chebyshev_design(xx[good], yy[good], 1, tb.tract.bbox)
        w = 1.0 / var[good]
        coef, *_ = np.linalg.lstsq(a * np.sqrt(w)[:, None], stats[good] * np.sqrt(w), rcond=None)
        resid = stats[good] - a @ coef
        # The spec's dof is N_good - 6 (LSST's expression, although the plane has 3 terms).
        chi2 = float(np.sum(resid * resid * w) / (n - 6)) if n > 6 else math.nan
        return chi2, float(np.mean(var[good])), n

    def score(self, tract_backgrounds: Mapping[int, TractBackground]) -> ReferenceChoice:
        """Costs of the visits from their (already accumulated) tract backgrounds."""
        visits = list(tract_backgrounds)
        fits = [self._plane_fit(tract_backgrounds[v]) for v in visits]
        chi2 = np.array([f[0] for f in fits])
        var = np.array([f[1] for f in fits])
        cov = np.array([f[2] for f in fits], dtype=np.float64)
        if not (cov > 0).any():
            raise AllMaskedError("ChooseReferenceVisitTask: no visit has a usable bin")

        def frac(a):
            m = np.nanmax(a) if np.isfinite(a).any() else math.nan
            return np.zeros_like(a) if not m > 0 else a / m

        c = self.config
        with np.errstate(divide="ignore", invalid="ignore"):
            covfrac = np.where(cov > 0, cov[cov > 0].min() / np.where(cov > 0, cov, 1), np.nan)
        chi2frac = np.where(
            np.isfinite(chi2), frac(chi2), 0.0 if not np.isfinite(chi2).any() else np.nan
        )
        cost = (
            c.best_ref_weight_chi2 * chi2frac
            + c.best_ref_weight_variance * frac(var)
            + c.best_ref_weight_global_coverage * covfrac
        )
        ref = visits[int(np.nanargmin(cost))]
        return ReferenceChoice(
            reference_visit=ref,
            visits=visits,
            chi2=chi2,
            variance=var,
            coverage=cov,
            cost=cost,
            tract_backgrounds=dict(tract_backgrounds),
        )

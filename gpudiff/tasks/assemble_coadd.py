"""AssembleCoaddTask: stack warps on a common grid into a coadd (drp_tasks, docs/algorithms.md
§10.1–§10.3).

Per warp a weight 1/MEANCLIP(variance) (:meth:`AssembleCoaddTask.prepare_inputs`); then,
one **row band** at a time, the N warps' pixels of that band are stacked along a new epoch
axis and reduced per pixel with the configured statistic:

- ``MEANCLIP``: the weighted afw clipped mean (docs/algorithms.md §0.5), by the registered
  ``clipped_stack`` kernel (CUDA on a GPU, its NumPy twin on the CPU), which also returns
  which inputs survived the clipping;
- ``MEAN``: the weighted mean of the unmasked inputs (axis-0 reductions), or, with
  ``do_online_for_mean``, an accumulator fed one warp at a time (LSST
  ``AccumulatorMeanStack``: the N-deep stack is never formed);
- ``MEDIAN``: the median of the unmasked inputs (unweighted, as afw).

The variance is propagated from the inputs that were used, Σw²σ²/(Σw)²; the mask is the OR
of the used inputs' masks plus the LSST mask map (inputs rejected by a bad plane →
``REJECTED``, by ``EDGE`` → ``SENSOR_EDGE``, by ``CLIPPED`` → ``CLIPPED``; ``CLIPPED``
also where sigma clipping dropped an input), ``mask_propagation_thresholds`` (e.g. ``SAT``
where more than 10 % of the weight was rejected for SAT), ``NO_DATA`` where nothing
contributes and ``INEXACT_PSF`` on ``SENSOR_EDGE | CLIPPED | REJECTED``.  Alongside come
``n_image`` (inputs contributing per pixel) and an input map: a per-pixel bit map of the
contributing inputs (LSST stores it as HealSparse; here it is a packed uint8 array on the
coadd grid, bit ``k % 8`` of plane ``k // 8`` for input ``k``: see :func:`unpack_input_map`).

Warps are :mod:`warp sources <gpudiff.tasks.coadd_warps>` (paths, in-memory exposures or
lazy loaders); the band height is chosen so the stack of one band fits in
``max_band_bytes`` (default: 256 MiB on the CPU, a quarter of the free device memory on a
GPU), so an N-warp coadd never holds N warps in memory.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import numpy as np
from astropy.io import fits

from ..backend import Backend, resolve_backend
from ..backend.threads import cpu_workers
from ..configfield import option, validate_config
from ..errors import InvalidInputError, NoWorkFound
from ..image import Box, Exposure, ImagePsf, MaskedImage, MaskPlanes, Psf
from .coadd_inputs import (
    CoaddInputs,
    InputWeight,
    check_calibration,
    given_weights,
    warp_weight,
    weigh_inputs,
)
from .coadd_stack import COADD_PLANES, BandPlan, CoaddBits, StackedCoadd, stack_bands

__all__ = [
    "AssembleCoaddConfig",
    "AssembleCoaddResult",
    "AssembleCoaddTask",
    "COADD_PLANES",
    "CoaddInputs",
    "InputWeight",
    "STATISTICS",
    "unpack_input_map",
]

log = logging.getLogger("gpudiff.tasks.assemble_coadd")

#: The statistics this task can stack with.
STATISTICS = ("MEAN", "MEANCLIP", "MEDIAN")

#: Working bytes per pixel per warp of one band: image, variance and mask stacks (12),
#: the bool masks (3) and the float64 temporaries of the reductions (3 × 8), rounded up.
_BYTES_PER_SAMPLE = 48
_CPU_BAND_BYTES = 256 << 20
#: At most this many CPU threads reduce bands at once (each gets its share of the memory).
_CPU_BAND_THREADS = 8


@dataclass(frozen=True)
class AssembleCoaddConfig:
    """Configuration of :class:`AssembleCoaddTask` (LSST ``AssembleCoaddConfig``, docs/algorithms.md
    §10.1).

    Attributes
    ----------
    warp_type : {"direct", "psfMatched"}
        Sets the output PSF: the weighted mean of the inputs' PSF images at the coadd
        centre for direct warps (gpudiff's stand-in for CoaddPsf), the PSF of the warp with
        the largest PSF image for PSF-matched ones (as LSST).
    statistic : {"MEANCLIP", "MEAN", "MEDIAN"}
    do_online_for_mean : bool
        With ``MEAN``: accumulate warp by warp instead of stacking (same result).
    sigma_clip, clip_iter : float, int
        afw ``numSigmaClip`` / ``numIter`` of MEANCLIP and of the weight statistic.
    calc_error_from_input_variance : bool
        True: variance Σw²σ²/(Σw)² of the used inputs; False: the scatter of the used
        values, (weighted sample variance)/n_used.
    do_n_image : bool
        Return ``n_image`` (it is always computed: it is one add per input and band).
    mask_propagation_thresholds : mapping of str to float
        Plane → fraction of the weight rejected for that plane above which the plane is
        set in the coadd.
    remove_mask_planes : tuple of str
        Cleared from every warp before stacking.
    do_input_map : bool
        Return the per-pixel map of contributing inputs.
    bad_mask_planes : tuple of str
        Inputs with any of these planes are excluded per pixel (afw ``andMask``); LSST's
        ``setDefaults`` value.
    no_good_pixels_mask : str
        Plane set where no input contributes.
    max_band_bytes : int or None
        gpudiff (replaces ``subregionSize``): memory for one band's stack; None = 256 MiB on
        the CPU, a quarter of the free memory on a GPU.
    max_weight_samples : int or None
        gpudiff: the weight statistic uses every k-th pixel so that at most this many
        enter it (None = all, exactly as LSST).  Weights are relative, and a clipped mean
        of 10⁶ variance samples is within ~10⁻⁴ of that of all 1.7·10⁷ pixels of a 4096²
        warp, at a sixteenth of the cost.
    """

    warp_type: str = option(
        "direct",
        doc="Kind of warps: sets the output PSF (weighted mean of the inputs' PSFs for "
        "direct warps, the widest input PSF for PSF-matched ones).",
        choices=("direct", "psfMatched"),
    )
    statistic: str = option(
        "MEANCLIP",
        doc="Per-pixel statistic of the stack.",
        choices=STATISTICS,
        fold_case=True,
    )
    do_online_for_mean: bool = option(
        False, doc="With MEAN: accumulate warp by warp instead of stacking (same result)."
    )
    sigma_clip: float = option(
        3.0,
        doc="Clipping threshold in sigmas of MEANCLIP and of the weight statistic.",
        min=0,
        inclusive_min=False,
        finite=True,
    )
    clip_iter: int = option(
        2, doc="Clipping passes of MEANCLIP and of the weight statistic.", min=1
    )
    calc_error_from_input_variance: bool = option(
        True,
        doc="Coadd variance from the inputs' variance planes (True) or from the scatter "
        "of the stacked values (False).",
    )
    do_n_image: bool = option(
        False, doc="Return n_image, the number of inputs contributing to each pixel."
    )
    mask_propagation_thresholds: Mapping[str, float] = option(
        doc="Plane -> fraction of the weight rejected for that plane above which the plane "
        "is set in the coadd.",
        min=0,
        max=1,
        default_factory=lambda: {"SAT": 0.1},
    )
    remove_mask_planes: tuple[str, ...] = option(
        ("NOT_DEBLENDED",), doc="Planes cleared from every warp before stacking."
    )
    do_input_map: bool = option(
        False, doc="Return the per-pixel bit map of the contributing inputs."
    )
    bad_mask_planes: tuple[str, ...] = option(
        ("NO_DATA", "BAD", "SAT", "EDGE"),
        doc="An input pixel with any of these planes is left out of the stack (afw andMask).",
    )
    no_good_pixels_mask: str = option(
        "NO_DATA", doc="Plane set on coadd pixels to which no input contributes."
    )
    max_band_bytes: int | None = option(
        None,
        doc="Memory in bytes for one row band's stack (None: 256 MiB on the CPU, a quarter "
        "of the free device memory on a GPU); replaces LSST's subregionSize.",
        min=1,
        gpudiff_only=True,
    )
    max_weight_samples: int | None = option(
        1 << 20,
        doc="The weight statistic uses every k-th pixel so that at most this many enter it "
        "(None: all, as LSST).",
        min=1,
        gpudiff_only=True,
    )

    def __post_init__(self):
        # Every rule is a single-field one (the field options).
        validate_config(self)


@dataclass
class AssembleCoaddResult:
    """What :meth:`AssembleCoaddTask.run` returns (LSST ``Struct`` fields, snake_case).

    Attributes
    ----------
    coadd_exposure : Exposure
        The coadd (on the task's backend): image, propagated variance, mask, PSF, WCS.
    n_image : int32 array (H, W) or None
        Inputs contributing per pixel (``do_n_image``).
    input_map : uint8 array (ceil(N/8), H, W) or None
        Bit ``k % 8`` of plane ``k // 8`` set where input ``k`` contributes
        (``do_input_map``); :func:`unpack_input_map` expands it.
    weights : numpy.ndarray (N,)
        Per-input weight (0 for a skipped input).
    input_names : list of str
    skipped : dict of str to str
        Skipped inputs and why.
    metadata : dict
        Statistic, band height, timings, counts of clipped / no-data pixels.
    """

    coadd_exposure: Exposure
    n_image: Any
    input_map: Any
    weights: np.ndarray
    input_names: list
    skipped: dict
    metadata: dict


def unpack_input_map(input_map: Any, n_inputs: int, backend: Backend | str | None = None) -> Any:
    """Expand a packed input map to a bool array (n_inputs, H, W): True where input k
    contributes."""
    be = resolve_backend(backend)
    xp = be.xp
    m = be.asarray(input_map)
    if m.ndim != 3 or m.shape[0] * 8 < n_inputs:
        raise InvalidInputError(
            f"input_map of shape {tuple(m.shape)} cannot hold {n_inputs} inputs"
        )
    k = xp.arange(n_inputs)
    return ((m[k // 8] >> (k % 8).astype(xp.uint8)[:, None, None]) & 1).astype(bool)


# ----------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------


def _union(boxes: Sequence[Box]) -> Box:
    return Box(
        min(b.x0 for b in boxes),
        min(b.y0 for b in boxes),
        max(b.x1 for b in boxes),
        max(b.y1 for b in boxes),
    )


def _band_rows(be: Backend, n: int, width: int, max_bytes: int | None) -> int:
    if max_bytes is None:
        if be.is_gpu:
            try:
                max_bytes = int(be.xp.cuda.runtime.memGetInfo()[0]) // 4
            except Exception:  # pragma: no cover - a device that does not answer
                max_bytes = 1 << 30
        else:
            max_bytes = _CPU_BAND_BYTES
    return max(1, int(max_bytes) // (_BYTES_PER_SAMPLE * max(n, 1) * max(width, 1)))


def _shift_wcs(wcs, from_box: Box, to_box: Box):
    """The WCS of ``from_box``'s arrays re-expressed for arrays starting at ``to_box``'s corner."""
    if wcs is None or (from_box.x0, from_box.y0) == (to_box.x0, to_box.y0):
        return None if wcs is None else wcs.deepcopy()
    out = wcs.deepcopy()
    out.wcs.crpix = out.wcs.crpix - np.array(
        [to_box.x0 - from_box.x0, to_box.y0 - from_box.y0], dtype=float
    )
    out.wcs.set()
    return out


# ----------------------------------------------------------------------------------------
# the task
# ----------------------------------------------------------------------------------------


class AssembleCoaddTask:
    """Coadd warps that share a pixel grid (LSST ``AssembleCoaddTask``, docs/algorithms.md §10).

    Parameters
    ----------
    config : AssembleCoaddConfig, optional
    backend : Backend or str, optional
        Where the stacking runs; bands of the warps are moved there as they are read.

    Examples
    --------
    >>> res = AssembleCoaddTask().run(["w1.fits", "w2.fits", "w3.fits"])   # doctest: +SKIP
    >>> res.coadd_exposure.write("coadd.fits")                              # doctest: +SKIP
    """

    def __init__(
        self, config: AssembleCoaddConfig | None = None, backend: Backend | str | None = None
    ):
        self.config = AssembleCoaddConfig() if config is None else config
        if not isinstance(self.config, AssembleCoaddConfig):
            raise InvalidInputError(
                f"config must be an AssembleCoaddConfig, got {type(self.config).__name__}"
            )
        self.backend = resolve_backend(backend)

    # --- inputs ----------------------------------------------------------------------------
    def compute_weight(self, warp: Any) -> InputWeight:
        """1/MEANCLIP(variance) of the unmasked pixels (docs/algorithms.md §10.2).

        Returns
        -------
        InputWeight
            Weight 0 and a reason when the warp is all NaN or its mean variance is not
            positive and finite (:func:`~gpudiff.tasks.coadd_inputs.warp_weight`).
        """
        return warp_weight(self.config, self.backend, warp)

    def prepare_inputs(self, warps: Sequence[Any]) -> CoaddInputs:
        """Warp sources, their weights (0 = skipped) and the skipped inputs with reasons.

        Returns
        -------
        CoaddInputs
        """
        return weigh_inputs(self.config, self.backend, warps)

    # --- run -------------------------------------------------------------------------------
    def run(
        self,
        warps: Sequence[Any],
        *,
        bbox: Box | None = None,
        weights: Sequence[float] | None = None,
        alt_masks: Sequence[Mapping[str, Any] | None] | None = None,
        psf: Psf | None = None,
        extra_bad_planes: Sequence[str] = (),
    ) -> AssembleCoaddResult:
        """Coadd ``warps``.

        Parameters
        ----------
        warps : sequence
            Warp sources (:func:`gpudiff.tasks.coadd_warps.as_warp`: paths, Exposures,
            MaskedImages, loaders); None entries are missing inputs.
        bbox : Box, optional
            The coadd box (parent coordinates); default the union of the warps' boxes.
        weights : sequence of float, optional
            Per-input weights, overriding :meth:`prepare_inputs` (0 skips an input).
        alt_masks : sequence of mapping, optional
            Per input, plane name → sorted flat (row-major) indices into the coadd box of
            pixels where that plane is set before stacking (LSST ``applyAltMaskPlanes``).
        psf : Psf, optional
            The output PSF (default: see ``warp_type``).
        extra_bad_planes : sequence of str
            Planes added to ``bad_mask_planes`` for this run (CompareWarp adds CLIPPED).

        Raises
        ------
        InvalidInputError
            Malformed inputs (messages name the input).
        NoWorkFound
            No input has usable data.
        """
        t0 = time.perf_counter()
        inputs = self.prepare_inputs(warps) if weights is None else given_weights(warps, weights)
        plan = self._plan(inputs, bbox, alt_masks, extra_bad_planes)
        stacked = stack_bands(self.backend, self.config, inputs.sources, plan, alt_masks)
        self._flag_inexact_psf(stacked.mask, plan.bits)
        exposure = self._make_exposure(inputs.sources, plan, stacked, psf)
        return self._result(inputs, plan, stacked, exposure, t0)

    def _plan(
        self,
        inputs: CoaddInputs,
        bbox: Box | None,
        alt_masks: Sequence[Mapping[str, Any] | None] | None,
        extra_bad_planes: Sequence[str],
    ) -> BandPlan:
        """Check the inputs and fix the box, the mask bits and the bands of the stacking."""
        cfg, be = self.config, self.backend
        sources = inputs.sources
        if alt_masks is not None and len(alt_masks) != len(sources):
            raise InvalidInputError(
                f"alt_masks has {len(alt_masks)} entries for {len(sources)} warps"
            )
        active = [i for i, s in enumerate(sources) if s is not None and inputs.weights[i] > 0]
        if not active:
            raise NoWorkFound(f"no usable input among {len(sources)} warps: {inputs.skipped}")
        check_calibration([sources[i] for i in active])
        bbox = _union([sources[i].bbox for i in active]) if bbox is None else bbox
        planes = MaskPlanes()
        for i in active:
            planes = planes.merge(sources[i].mask_planes)
        bits = CoaddBits(planes, cfg, extra_bad_planes)
        for am in alt_masks or ():  # planes added up front: the band threads only read them
            for plane in am or {}:
                bits.planes.add(plane)
        H, W = bbox.shape
        # On the CPU, bands are reduced by one thread per core (NumPy releases the GIL in its
        # loops and sorts), each within its share of the band memory.  On a GPU the device
        # is the parallelism: one band at a time.
        n_threads = cpu_workers(H, _CPU_BAND_THREADS, parallel=not be.is_gpu)
        budget = (
            cfg.max_band_bytes if cfg.max_band_bytes is not None or be.is_gpu else _CPU_BAND_BYTES
        )
        rows = min(
            H, _band_rows(be, len(active), W, None if budget is None else budget // n_threads)
        )
        return BandPlan(
            bbox=bbox,
            active=tuple(active),
            weights=inputs.weights[active],
            bits=bits,
            rows=rows,
            n_threads=n_threads,
            n_inputs=len(sources),
        )

    def _flag_inexact_psf(self, mask: Any, bits: CoaddBits) -> None:
        """Set INEXACT_PSF, in place, where the CoaddPsf is inexact (LSST ``setInexactPsf``:
        on ``SENSOR_EDGE | CLIPPED | REJECTED``)."""
        xp = self.backend.xp
        mask |= xp.where(
            (mask & np.int32(bits.sensor_edge | bits.clipped | bits.rejected)) != 0,
            np.int32(bits.inexact),
            np.int32(0),
        )

    def _make_exposure(
        self, sources: Sequence[Any], plan: BandPlan, stacked: StackedCoadd, psf: Psf | None
    ) -> Exposure:
        """The coadd Exposure: the stacked planes, the output PSF, the first input's WCS
        (shifted to the coadd box) and calibration, and a header naming the statistic."""
        cfg, bbox = self.config, plan.bbox
        active = [sources[i] for i in plan.active]
        coadd_psf = psf if psf is not None else self._coadd_psf(active, plan.weights, bbox)
        ref = active[0]
        meta_hdr = fits.Header()
        meta_hdr["NINPUTS"] = (len(active), "inputs coadded")
        meta_hdr["COADDST"] = (
            cfg.statistic
            if not (cfg.do_online_for_mean and cfg.statistic == "MEAN")
            else "MEAN (online)",
            "coadd statistic",
        )
        mi = MaskedImage(
            stacked.image,
            stacked.variance,
            stacked.mask,
            xy0=(bbox.x0, bbox.y0),
            mask_planes=plan.bits.planes,
            backend=self.backend,
        )
        return Exposure(
            mi,
            psf=coadd_psf,
            wcs=_shift_wcs(ref.wcs, ref.bbox, bbox),
            photo_calib=ref.photo_calib,
            metadata=meta_hdr,
        )

    def _result(
        self,
        inputs: CoaddInputs,
        plan: BandPlan,
        stacked: StackedCoadd,
        exposure: Exposure,
        t0: float,
    ) -> AssembleCoaddResult:
        """The run's result: counts of clipped and no-data pixels, timings, a log line."""
        cfg, be, bits = self.config, self.backend, plan.bits
        mask = stacked.mask
        n = len(plan.active)
        H, W = plan.bbox.shape
        n_clipped = int(((mask & np.int32(bits.clipped)) != 0).sum())
        n_nodata = int(((mask & np.int32(bits.no_good)) != 0).sum())
        be.synchronize()
        meta = dict(
            statistic=cfg.statistic,
            n_inputs=n,
            band_rows=plan.rows,
            n_bands=-(-H // plan.rows),
            n_clipped_pixels=n_clipped,
            n_no_data_pixels=n_nodata,
            time_read=stacked.time_read,
            time_total=time.perf_counter() - t0,
        )
        log.info(
            "AssembleCoadd: %d inputs, %s, %dx%d in %d bands of %d rows; %d clipped, %d no-data "
            "pixels",
            n,
            cfg.statistic,
            W,
            H,
            meta["n_bands"],
            plan.rows,
            n_clipped,
            n_nodata,
        )
        sources = inputs.sources
        names = [s.name if s is not None else f"input {i}" for i, s in enumerate(sources)]
        return AssembleCoaddResult(
            coadd_exposure=exposure,
            n_image=stacked.n_image if cfg.do_n_image else None,
            input_map=stacked.input_map,
            weights=np.where(np.isin(np.arange(len(sources)), plan.active), inputs.weights, 0.0),
            input_names=names,
            skipped=inputs.skipped,
            metadata=meta,
        )

    def _coadd_psf(self, sources: Sequence[Any], w: np.ndarray, bbox: Box) -> Psf | None:
        psfs = [(s.psf, wi) for s, wi in zip(sources, w) if s.psf is not None]
        if not psfs:
            return None
        if self.config.warp_type == "psfMatched":
            return max(psfs, key=lambda p: p[0].size)[0]  # LSST: the largest PSF bbox width
        # direct warps: the weighted mean PSF image at the coadd centre (CoaddPsf there)
        cx, cy = bbox.x0 + (bbox.width - 1) / 2.0, bbox.y0 + (bbox.height - 1) / 2.0
        size = max(p.size for p, _ in psfs)
        size += 1 - size % 2
        img = sum(
            wi * np.asarray(p.kernel_image(cx, cy, size=size), dtype=np.float64) for p, wi in psfs
        )
        return ImagePsf(img / sum(wi for _, wi in psfs), average_position=(cx, cy))

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
import math
import time
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import numpy as np
from astropy.io import fits

from ..backend import Backend, resolve_backend
from ..backend.kernels import clipped_stack
from ..backend.threads import cpu_workers, parallel_map
from ..configfield import option, validate_config
from ..errors import InvalidInputError, NoWorkFound
from ..image import Box, Exposure, ImagePsf, MaskedImage, MaskPlanes, Psf
from ..ops.stats import clipped_mean_std
from .coadd_warps import as_warp, read_padded

__all__ = [
    "AssembleCoaddConfig",
    "AssembleCoaddResult",
    "AssembleCoaddTask",
    "COADD_PLANES",
    "STATISTICS",
    "unpack_input_map",
]

log = logging.getLogger("gpudiff.tasks.assemble_coadd")

#: The statistics this task can stack with.
STATISTICS = ("MEAN", "MEANCLIP", "MEDIAN")
#: Planes the coadd always defines (docs/algorithms.md §10.3 step 1, §12).
COADD_PLANES = ("NO_DATA", "REJECTED", "CLIPPED", "SENSOR_EDGE", "INEXACT_PSF")

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


def _alt_indices(be: Backend, alt: Mapping[str, Any] | None, lo: int, hi: int) -> dict:
    """The flat indices (within [lo, hi), shifted by lo) of each plane of one warp's alt
    mask, on the host (the caller's index arrays may be on the device)."""
    out = {}
    for plane, idx in (alt or {}).items():
        idx = np.asarray(be.asnumpy(idx))
        a, b = np.searchsorted(idx, [lo, hi])
        if b > a:
            out[plane] = idx[a:b] - lo
    return out


class _Bits:
    """The coadd's mask bits used by the stacking (ints, for the coadd's plane definition)."""

    def __init__(self, planes: MaskPlanes, cfg: AssembleCoaddConfig, extra_bad: Sequence[str] = ()):
        for name in (
            *COADD_PLANES,
            *cfg.bad_mask_planes,
            *extra_bad,
            cfg.no_good_pixels_mask,
            *cfg.mask_propagation_thresholds,
        ):
            planes.add(name)
        self.planes = planes
        self.and_mask = planes.bitmask([*cfg.bad_mask_planes, *extra_bad])
        b = planes.bitmask
        self.no_data, self.edge = b("NO_DATA"), planes.bitmask_if_present("EDGE")
        self.clipped, self.rejected, self.sensor_edge = (
            b("CLIPPED"),
            b("REJECTED"),
            b("SENSOR_EDGE"),
        )
        self.inexact = b("INEXACT_PSF")
        self.no_good = b(cfg.no_good_pixels_mask)
        self.reject_src = self.and_mask & ~(self.no_data | self.edge | self.clipped)
        self.remove = planes.bitmask_if_present(list(cfg.remove_mask_planes))
        self.thresholds = [(b(p), float(t)) for p, t in cfg.mask_propagation_thresholds.items()]


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
    def compute_weight(self, warp: Any) -> tuple[float, str]:
        """(weight, reason): 1/MEANCLIP(variance) of the unmasked pixels (docs/algorithms.md §10.2);
        weight 0 and a reason when the warp is all NaN or its mean variance is not positive and
        finite."""
        cfg, be = self.config, self.backend
        mi = warp.read(warp.bbox)
        xp = mi.backend.xp
        bm = mi.mask_planes.bitmask_if_present(list(cfg.bad_mask_planes))
        if not bool(xp.any(xp.isfinite(mi.image))):
            return 0.0, "every pixel is NaN"
        var, bad = mi.variance.reshape(-1), (mi.mask & np.int32(bm)).reshape(-1) != 0
        if cfg.max_weight_samples is not None and var.size > cfg.max_weight_samples:
            step = -(-var.size // cfg.max_weight_samples)  # regular stride: deterministic
            var, bad = var[::step], bad[::step]
        mean_var, _, n = clipped_mean_std(var, cfg.sigma_clip, cfg.clip_iter, bad=bad, backend=be)
        if not (math.isfinite(mean_var) and mean_var > 0):
            return (
                0.0,
                f"mean variance of the unmasked pixels is {mean_var:.3g} (must be finite and > 0)",
            )
        return 1.0 / mean_var, ""

    def prepare_inputs(self, warps: Sequence[Any]) -> tuple[list, np.ndarray, dict]:
        """Warp sources, their weights (0 = skipped) and the skipped inputs with reasons."""
        if isinstance(warps, (str, bytes)) or not isinstance(warps, Sequence) or len(warps) == 0:
            raise InvalidInputError("AssembleCoaddTask needs a non-empty list of warps")
        sources = [
            None if w is None else as_warp(w, name=f"input {i}") for i, w in enumerate(warps)
        ]
        weights = np.zeros(len(sources))
        skipped: dict = {}
        for i, src in enumerate(sources):
            if src is None:
                skipped[f"input {i}"] = "missing"
                continue
            weights[i], why = self.compute_weight(src)
            if why:
                skipped[src.name] = why
                log.warning("AssembleCoadd: skipping %s: %s", src.name, why)
        return sources, weights, skipped

    def _check_grid(self, sources: Sequence[Any]) -> None:
        ref = next(s for s in sources if s is not None)
        cal = ref.photo_calib.calibration_mean
        for s in sources:
            if s is None:
                continue
            c = s.photo_calib.calibration_mean
            if not math.isclose(c, cal, rel_tol=1e-6):
                raise InvalidInputError(
                    f"{s.name}: photometric calibration {c:g} differs from {ref.name}'s "
                    f"{cal:g}; warps must share their flux units (LSST requires nJy)"
                )

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
        cfg, be = self.config, self.backend
        xp = be.xp
        sources, w_auto, skipped = (
            self.prepare_inputs(warps) if weights is None else (None, None, {})
        )
        if sources is None:
            sources = [
                None if w is None else as_warp(w, name=f"input {i}") for i, w in enumerate(warps)
            ]
            w_auto = np.asarray(weights, dtype=np.float64)
            if (
                w_auto.shape != (len(sources),)
                or not np.all(np.isfinite(w_auto))
                or np.any(w_auto < 0)
            ):
                raise InvalidInputError(
                    f"weights must be {len(sources)} finite values >= 0, got {weights!r}"
                )
            skipped = {
                (s.name if s is not None else f"input {i}"): "weight 0"
                for i, s in enumerate(sources)
                if s is None or w_auto[i] == 0
            }
        if alt_masks is not None and len(alt_masks) != len(sources):
            raise InvalidInputError(
                f"alt_masks has {len(alt_masks)} entries for {len(sources)} warps"
            )
        active = [i for i, s in enumerate(sources) if s is not None and w_auto[i] > 0]
        if not active:
            raise NoWorkFound(f"no usable input among {len(sources)} warps: {skipped}")
        self._check_grid([sources[i] for i in active])
        bbox = _union([sources[i].bbox for i in active]) if bbox is None else bbox
        planes = MaskPlanes()
        for i in active:
            planes = planes.merge(sources[i].mask_planes)
        bits = _Bits(planes, cfg, extra_bad_planes)
        H, W = bbox.shape
        n = len(active)
        w = w_auto[active]
        # On the CPU, bands are reduced by one thread per core (NumPy releases the GIL in its
        # loops and sorts; the bands write disjoint rows), each within its share of the band
        # memory.  On a GPU the device is the parallelism: one band at a time.
        n_threads = cpu_workers(H, _CPU_BAND_THREADS, parallel=not be.is_gpu)
        budget = (
            cfg.max_band_bytes if cfg.max_band_bytes is not None or be.is_gpu else _CPU_BAND_BYTES
        )
        rows = min(H, _band_rows(be, n, W, None if budget is None else budget // n_threads))
        image = xp.empty((H, W), dtype=xp.float32)
        variance = xp.empty((H, W), dtype=xp.float32)
        mask = xp.empty((H, W), dtype=xp.int32)
        n_image = xp.zeros((H, W), dtype=xp.int32)
        imap = (
            xp.zeros(((len(sources) + 7) // 8, H, W), dtype=xp.uint8) if cfg.do_input_map else None
        )
        for am in alt_masks or ():  # planes added up front: the band threads only read them
            for plane in am or {}:
                bits.planes.add(plane)

        def one_band(y: int) -> float:
            box = Box(bbox.x0, y, bbox.x1, min(y + rows, bbox.y1))
            r0, r1 = y - bbox.y0, box.y1 - bbox.y0
            lo, hi = r0 * W, r1 * W
            ta = time.perf_counter()
            bands = []
            for i in active:
                mi = read_padded(sources[i], box, be)
                alt = _alt_indices(be, alt_masks[i] if alt_masks is not None else None, lo, hi)
                bands.append(self._conform(mi, box, bits, alt))
            t = time.perf_counter() - ta
            out = _stack_band(be, cfg, bits, bands, w)
            image[r0:r1], variance[r0:r1], mask[r0:r1], n_image[r0:r1] = out[:4]
            if imap is not None:
                for j, i in enumerate(active):
                    imap[i // 8, r0:r1] |= out[4][j].astype(xp.uint8) << np.uint8(i % 8)
            return t

        t_read = sum(parallel_map(one_band, range(bbox.y0, bbox.y1, rows), n_threads))
        # INEXACT_PSF where the CoaddPsf is inexact (setInexactPsf)
        mask |= xp.where(
            (mask & np.int32(bits.sensor_edge | bits.clipped | bits.rejected)) != 0,
            np.int32(bits.inexact),
            np.int32(0),
        )
        coadd_psf = (
            psf if psf is not None else self._coadd_psf([sources[i] for i in active], w, bbox)
        )
        ref = sources[active[0]]
        meta_hdr = fits.Header()
        meta_hdr["NINPUTS"] = (n, "inputs coadded")
        meta_hdr["COADDST"] = (
            cfg.statistic
            if not (cfg.do_online_for_mean and cfg.statistic == "MEAN")
            else "MEAN (online)",
            "coadd statistic",
        )
        exposure = Exposure(
            MaskedImage(
                image, variance, mask, xy0=(bbox.x0, bbox.y0), mask_planes=bits.planes, backend=be
            ),
            psf=coadd_psf,
            wcs=_shift_wcs(ref.wcs, ref.bbox, bbox),
            photo_calib=ref.photo_calib,
            metadata=meta_hdr,
        )
        n_clipped = int(((mask & np.int32(bits.clipped)) != 0).sum())
        n_nodata = int(((mask & np.int32(bits.no_good)) != 0).sum())
        be.synchronize()
        meta = dict(
            statistic=cfg.statistic,
            n_inputs=n,
            band_rows=rows,
            n_bands=-(-H // rows),
            n_clipped_pixels=n_clipped,
            n_no_data_pixels=n_nodata,
            time_read=t_read,
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
            rows,
            n_clipped,
            n_nodata,
        )
        names = [s.name if s is not None else f"input {i}" for i, s in enumerate(sources)]
        return AssembleCoaddResult(
            coadd_exposure=exposure,
            n_image=n_image if cfg.do_n_image else None,
            input_map=imap,
            weights=np.where(np.isin(np.arange(len(sources)), active), w_auto, 0.0),
            input_names=names,
            skipped=skipped,
            metadata=meta,
        )

    def _conform(self, mi: MaskedImage | None, box: Box, bits: _Bits, alt: dict) -> tuple:
        """(image, variance, mask) of one warp's band on the coadd's planes, alt masks applied
        and ``remove_mask_planes`` cleared."""
        xp = self.backend.xp
        if mi is None:  # the warp does not reach this band
            return (
                xp.full(box.shape, xp.nan, xp.float32),
                xp.full(box.shape, xp.inf, xp.float32),
                xp.full(box.shape, np.int32(bits.no_data), xp.int32),
            )
        m = bits.planes.conform(mi.mask, mi.mask_planes, xp)
        if alt:
            flat = m.reshape(-1)
            for plane, idx in alt.items():
                flat[self.backend.asarray(idx)] |= np.int32(1 << bits.planes.add(plane))
        if bits.remove:
            m &= np.int32(~bits.remove)
        return mi.image, mi.variance, m

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


# ----------------------------------------------------------------------------------------
# the per-band reduction (the hot loop: whole-band array operations, never per pixel)
# ----------------------------------------------------------------------------------------


def _stack_band(
    be: Backend, cfg: AssembleCoaddConfig, bits: _Bits, bands: list, w: np.ndarray
) -> tuple:
    """Reduce one band of N warps: (image, variance, mask, n_image, contributing (N, h, W))."""
    xp = be.xp
    n = len(bands)
    shape = bands[0][0].shape
    and_mask = np.int32(bits.and_mask)
    w64 = w.astype(np.float64)
    online = cfg.statistic == "MEAN" and cfg.do_online_for_mean
    with np.errstate(invalid="ignore", divide="ignore", over="ignore"):
        valid = xp.empty((n,) + shape, dtype=bool)
        for k, (img, var, m) in enumerate(bands):
            valid[k] = ((m & and_mask) == 0) & xp.isfinite(img) & xp.isfinite(var)
        if online:
            mean, var_out, used = _online_mean(be, bands, valid, w64)
        else:
            data = xp.stack([b[0] for b in bands])
            if cfg.statistic == "MEANCLIP":
                mean, vclip, _, used = clipped_stack(
                    data,
                    ~valid,
                    w.astype(np.float32),
                    cfg.sigma_clip,
                    cfg.clip_iter,
                    return_used=True,
                    backend=be,
                )
            else:
                used = valid
                if cfg.statistic == "MEDIAN":
                    mean = xp.nanmedian(xp.where(valid, data, xp.nan), axis=0).astype(xp.float32)
                else:
                    wu = xp.where(used, be.asarray(w64)[:, None, None], 0.0)
                    mean = ((wu * data).sum(axis=0) / wu.sum(axis=0)).astype(xp.float32)
                    del wu
            var_out = _propagated_variance(be, cfg, bands, used, w64, data, mean)
            del data
        n_used = used.sum(axis=0)
        mask = _band_mask(be, cfg, bits, bands, valid, used, w64)
        none = n_used == 0
        var_out = xp.where(none, xp.inf, var_out)
        mean = xp.where(none, xp.nan, mean)
        # setCoaddEdgeBits: no usable variance is no data
        mask = xp.where(none | ~(var_out > 0), mask | np.int32(bits.no_good), mask)
    return (
        mean.astype(xp.float32),
        var_out.astype(xp.float32),
        mask.astype(xp.int32),
        valid.sum(axis=0).astype(xp.int32),
        valid,
    )


def _online_mean(be: Backend, bands: list, valid, w64: np.ndarray):
    """LSST ``AccumulatorMeanStack``: running Σw·x, Σw²·σ², Σw, one warp at a time."""
    xp = be.xp
    shape = bands[0][0].shape
    sx, sv, sw = (xp.zeros(shape, dtype=xp.float64) for _ in range(3))
    for k, (img, var, _) in enumerate(bands):
        wk = xp.where(valid[k], w64[k], 0.0)
        sx += wk * xp.where(valid[k], img, 0)
        sv += wk * wk * xp.where(valid[k], var, 0)
        sw += wk
    return sx / sw, sv / (sw * sw), valid


def _propagated_variance(
    be: Backend, cfg: AssembleCoaddConfig, bands: list, used, w64: np.ndarray, data, mean
):
    """Σw²σ²/(Σw)² over the used inputs, or their scatter / n_used
    (calc_error_from_input_variance)."""
    xp = be.xp
    shape = bands[0][0].shape
    sw = xp.zeros(shape, dtype=xp.float64)
    acc = xp.zeros(shape, dtype=xp.float64)
    if cfg.calc_error_from_input_variance:
        for k, (_, var, _) in enumerate(bands):
            wk = xp.where(used[k], w64[k], 0.0)
            sw += wk
            acc += wk * wk * xp.where(used[k], var, 0)
        return acc / (sw * sw)
    sw2 = xp.zeros(shape, dtype=xp.float64)
    m64 = mean.astype(xp.float64)
    for k in range(len(bands)):
        wk = xp.where(used[k], w64[k], 0.0)
        d = xp.where(used[k], data[k] - m64, 0.0)
        sw += wk
        sw2 += wk * wk
        acc += wk * d * d
    # reliability-weighted sample variance (afw VARIANCE), divided by the number used
    var = acc / sw * (sw * sw) / (sw * sw - sw2)
    return var / used.sum(axis=0)


def _band_mask(
    be: Backend, cfg: AssembleCoaddConfig, bits: _Bits, bands: list, valid, used, w64: np.ndarray
):
    """OR of the used inputs' masks, the LSST mask map, the propagation thresholds, CLIPPED."""
    xp = be.xp
    shape = bands[0][0].shape
    out = xp.zeros(shape, dtype=xp.int32)
    and_mask, nd = np.int32(bits.and_mask), np.int32(bits.no_data)
    rej_w = [xp.zeros(shape, dtype=xp.float64) for _ in bits.thresholds]
    tot_w = xp.zeros(shape, dtype=xp.float64) if bits.thresholds else None
    zero = np.int32(0)
    for k, (img, _, m) in enumerate(bands):
        out |= xp.where(used[k], m, zero)
        excl = (m & and_mask) != 0
        out |= xp.where(
            excl & ((m & np.int32(bits.reject_src)) != 0), np.int32(bits.rejected), zero
        )
        if bits.edge:
            out |= xp.where(
                excl & ((m & np.int32(bits.edge)) != 0), np.int32(bits.sensor_edge), zero
            )
        out |= xp.where(excl & ((m & np.int32(bits.clipped)) != 0), np.int32(bits.clipped), zero)
        if bits.thresholds:
            covered = xp.isfinite(img) & ((m & nd) == 0)
            tot_w += xp.where(covered, w64[k], 0.0)
            for acc, (bit, _) in zip(rej_w, bits.thresholds):
                acc += xp.where(excl & ((m & np.int32(bit)) != 0), w64[k], 0.0)
    if cfg.statistic == "MEANCLIP":  # an input dropped by the sigma clipping
        out |= xp.where((valid & ~used).any(axis=0), np.int32(bits.clipped), zero)
    for acc, (bit, t) in zip(rej_w, bits.thresholds):
        out |= xp.where(acc > t * tot_w, np.int32(bit), zero)
    return out

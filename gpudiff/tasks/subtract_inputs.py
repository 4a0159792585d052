"""Input preparation of the subtraction tasks (docs/algorithms.md §4.2 steps 1–5).

LSST's ``subtractImages.py`` checks and conditions its inputs before any source is
selected or kernel fitted: the validation of boxes, bands and PSFs, the template coverage,
variance scaling and the mask updates.  gpudiff adds the steps its rawer inputs need
(documented departures, see :class:`~gpudiff.tasks.subtract.AlardLuptonSubtractConfig`):
defects and non-finite pixels interpolated, cosmic rays found on the science and the
template, and a source mask (or a detection) for the variance scaling of images that come
without a DETECTED plane.  :func:`prepare_inputs` runs them in LSST's order and returns
the conditioned pair with the science detections it made on the way.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
from astropy.table import Table

from ..backend import Backend
from ..backend.threads import run_concurrently
from ..errors import AllMaskedError, InvalidInputError, NoWorkFound, PsfError, ShapeMismatchError
from ..image import Exposure, MaskedImage, evaluate_mean_fwhm
from ..ops.cosmic_rays import find_cosmic_rays
from ..ops.detection import detect_sources
from ..ops._host import fetch
from ..ops.interpolate import defect_pixels, interpolate_over_defects
from .masks import mask_non_finite, update_masks
from .scale_variance import ScaleVarianceConfig, ScaleVarianceTask

if TYPE_CHECKING:  # the config lives with the task, which imports this module
    from .subtract import AlardLuptonSubtractConfig

__all__ = [
    "PreparedInputs",
    "prepare_inputs",
    "psf_fwhm",
    "choose_convolution_method",
    "interpolate_defects",
    "mask_cosmic_rays",
    "scale_variance",
    "with_source_mask",
]

# The subtraction's logger: its warnings are the subtraction's (tests capture them there).
log = logging.getLogger("gpudiff.tasks.subtract")


@dataclass
class PreparedInputs:
    """The pair as the kernel fit and the convolution see it.

    Attributes
    ----------
    template, science : Exposure
        On the task's backend; non-finite pixels NO_DATA, defects (and cosmic rays)
        interpolated and flagged INTRP, variances scaled, template masks renamed.
    science_sources : astropy Table or None
        The sources detected on the science image while scaling its variance (inputs
        without a DETECTED plane); None when none were detected.  They serve as kernel
        sources when none are given, and are returned as ``science_sources``.
    metadata : dict
        Template coverage, variance scale factors, interpolated pixel counts.
    """

    template: Exposure
    science: Exposure
    science_sources: Table | None = None
    metadata: dict = field(default_factory=dict)


def psf_fwhm(exposure: Exposure, name: str, average: bool = True):
    """The PSF FWHM (trace radius, or per axis) at the average position, falling back to
    the mean over a 10×10 grid (docs/algorithms.md §1.2 ``_checkPsfWidths``)."""
    if exposure.psf is None:
        raise PsfError(
            f"the {name} exposure has no PSF; attach one or estimate it (gpudiff.estimate_psf)"
        )
    try:
        return exposure.psf.fwhm() if average else exposure.psf.fwhm_xy()
    except PsfError:
        log.warning(
            "Unable to evaluate the %s PSF at the average position; using the grid mean", name
        )
        f = evaluate_mean_fwhm(exposure.psf, exposure.bbox)
        return f if average else (f, f)


def choose_convolution_method(template: Exposure, science: Exposure) -> bool:
    """``auto`` mode (docs/algorithms.md §4.2 step 7): True = convolve the template.

    Convolve the science image only if the template PSF is strictly wider on **both**
    axes: convolveTemplate = (T_x ≤ S_x) OR (T_y ≤ S_y).
    """
    try:
        tx, ty = template.psf.fwhm_xy()
        sx, sy = science.psf.fwhm_xy()
        return (tx <= sx) or (ty <= sy)
    except PsfError:
        return psf_fwhm(template, "template") <= psf_fwhm(science, "science")


def prepare_inputs(
    template: Exposure,
    science: Exposure,
    config: AlardLuptonSubtractConfig,
    backend: Backend,
) -> PreparedInputs:
    """Validate and condition a template–science pair for the subtraction.

    Parameters
    ----------
    template : Exposure
        On the science pixel grid, its box containing the science's.
    science : Exposure
    config : AlardLuptonSubtractConfig
    backend : Backend

    Returns
    -------
    PreparedInputs

    Raises
    ------
    ShapeMismatchError, InvalidInputError, PsfError, AllMaskedError, InvalidVarianceError
        Boxes, bands, PSFs or the science pixels are unusable.
    NoWorkFound
        The template covers less than ``required_template_fraction`` of the science.
    """
    cfg, be = config, backend
    if not template.bbox.contains(science.bbox):
        raise ShapeMismatchError(
            f"the template box {template.bbox} must contain the science box {science.bbox}; "
            "warp the template onto the science pixel grid first (gpudiff.ops.warp_exposure)"
        )
    bands = [e.metadata.get("BAND", e.metadata.get("FILTER")) for e in (science, template)]
    if None not in bands and str(bands[0]).strip() != str(bands[1]).strip():
        raise InvalidInputError(f"science band {bands[0]!r} and template band {bands[1]!r} differ")
    for name, exp in (("science", science), ("template", template)):
        if exp.psf is None:
            raise PsfError(
                f"the {name} exposure has no PSF and gpudiff does not guess one "
                "silently; attach one or call gpudiff.estimate_psf"
            )
    # Non-finite pixels are no data (LSST's convention); a usable pixel must have a
    # positive, finite variance, else every weight and S/N downstream is wrong.  Whether
    # each image has any crosses to the host with the template coverage, in one transfer.
    template, science = template.to_backend(be), science.to_backend(be)
    all_finite_t, all_finite_s, n_covered = fetch(be, *_finite_and_covered(template, science))
    if not all_finite_t:
        template = mask_non_finite(template)
    if not all_finite_s:
        science = mask_non_finite(science)
    meta: dict[str, Any] = {}
    science_sources = None
    planes = cfg.interpolate_mask_planes
    smi, tmi, bad_planes = science.masked_image, template.masked_image, cfg.bad_mask_planes
    # Defects are interpolated before anything looks at the pixels (detection, variance
    # scaling, kernel fit, convolution, decorrelation).  The template is filled before
    # update_masks clears its SAT/CR planes; its INTRP marks are restored after.  Its
    # cosmic rays are found before the interpolation, which then fills them like the
    # other defects: the defects are those of the template with its new rays marked.
    t_cr = t_marked = None
    t_probe = tmi
    if cfg.find_template_cosmic_rays:
        t_cr = _new_cosmic_rays(template, be)
        t_marked = tmi._plane_set("CR", t_cr)
        t_probe = MaskedImage._wrap(
            tmi.image, tmi.variance, t_marked[0], mask_planes=t_marked[1], xy0=tmi.xy0, backend=be
        )
    # What the next steps branch on crosses to the host in one transfer: both images'
    # validity counts, whether the template has new cosmic rays, whether each image has
    # defects to fill, and whether it comes with DETECTED pixels (cosmic rays and the
    # interpolation leave the DETECTED bits as they are).
    t_bad = defect_pixels(t_probe, planes) if planes else None
    s_bad = defect_pixels(smi, planes) if planes else None
    flags = [] if t_cr is None else [t_cr.any()]
    flags += [] if t_bad is None else [t_bad.any(), s_bad.any()]
    if cfg.do_scale_variance:
        flags += [_has_detected(tmi), _has_detected(smi)]
    s_counts, t_counts, *flags = fetch(
        be, smi._validity_counts(bad_planes), tmi._validity_counts(bad_planes), *flags
    )
    smi._check_validity("science", s_counts, bad_planes)
    try:
        tmi._check_validity("template", t_counts, bad_planes)
    except AllMaskedError:
        pass  # no template data at all: LSST's NoWorkFound from the coverage check below
    flags = [bool(f) for f in flags]
    if t_cr is not None and flags.pop(0):
        # New rays: the template as mask_cosmic_rays makes it (a copy with them marked).
        t_mask, t_planes = t_marked
        template = _replace_mi(
            template, tmi._new(tmi.image, tmi.variance, t_mask, mask_planes=t_planes)
        )
    t_ray_fills = None
    if planes:
        t_any, s_any, *flags = flags
        template, t_filled = interpolate_defects(template, planes, be, bad=(t_bad, t_any))
        science, s_filled = interpolate_defects(science, planes, be, bad=(s_bad, s_any))
        t_cr_bit = template.masked_image.mask_planes.bitmask_if_present("CR")
        if t_filled is not None and t_cr_bit:
            # The template's filled rays keep their CR mark through update_masks (which
            # clears the template's CR plane, as LSST's): a filled ray is grown by the
            # matching kernel's core, not its whole box (tasks.masks.cosmic_ray_fills).
            # Without the mark a template ray 19 px from a S/N 38 transient of a realistic
            # 2048² pair flagged it INTRP.
            t_ray_fills = t_filled & ((template.masked_image.mask & t_cr_bit) != 0)
    else:
        t_filled = s_filled = None
    n_pix = science.masked_image.image.size
    cov = float(int(n_covered)) / n_pix if n_pix else 0.0  # template_coverage's
    meta["template_coverage"] = cov
    if cov < cfg.required_template_fraction:
        raise NoWorkFound(
            f"template covers {cov:.1%} of the science image (pixels where neither image "
            f"is NO_DATA), less than required_template_fraction="
            f"{cfg.required_template_fraction:.0%}"
        )
    if cfg.do_scale_variance:
        # The two images are independent: on the CPU each gets a core.
        t_det, s_det = flags
        (template, tfac, _), (science, sfac, cat) = run_concurrently(
            lambda: scale_variance(
                template, cfg, be, need_catalog=False, has_detected=t_det, copy=False
            ),
            lambda: scale_variance(
                science, cfg, be, need_catalog=True, has_detected=s_det, copy=False
            ),
            parallel=not be.is_gpu,
        )
        # Reused for kernel-source selection (one detection of the science, not two).
        science_sources = cat
        meta["scale_template_variance_factor"] = tfac
        meta["scale_science_variance_factor"] = sfac
    template, science = update_masks(
        template, science, cfg.rename_template_mask, cfg.preserve_template_mask
    )
    if t_filled is not None:
        t_mi = template.masked_image.with_plane_set("INTRP", t_filled)
        if t_ray_fills is not None:
            t_mi = t_mi.with_plane_set("CR", t_ray_fills)
        template = Exposure(
            t_mi,
            template.psf,
            template.wcs,
            template.photo_calib,
            template.metadata,
        )
    # Whether the science has new cosmic rays crosses to the host with the interpolated
    # pixel counts; the science's is counted again if its rays are then filled.
    s_cr = _new_cosmic_rays(science, be) if cfg.find_science_cosmic_rays else None
    s_ray, n_interp = _fetch_with_counts(
        be, [] if s_cr is None else [s_cr.any()], template, science
    )
    if s_cr is not None:
        if s_ray[0]:
            science = _with_cosmic_rays(science, s_cr)
        # Without a new ray and with nothing filled above (no CR bit, every pixel finite;
        # the variance scaling and the mask update add neither) there is nothing to fill.
        if "CR" in planes and (s_ray[0] or s_filled is not None):
            # Cosmic rays found just now: filled like the defects that came flagged.
            science, _ = interpolate_defects(science, ("CR",), be)
            n_interp["science"] = _fetch_with_counts(be, [], science)[1]["science"]
    for name in ("template", "science"):
        meta[f"n_interpolated_{name}"] = n_interp.get(name, 0)
    return PreparedInputs(template, science, science_sources, meta)


def _finite_and_covered(template: Exposure, science: Exposure) -> list:
    """Backend scalars: whether every template pixel is finite, whether every science
    pixel is, and the science pixels covered by both (neither NO_DATA once the non-finite
    ones are marked so: :func:`~gpudiff.tasks.masks.template_coverage` of the prepared pair,
    counted on the inputs).

    The coverage can be counted this early because nothing between here and its test
    changes NO_DATA: :func:`~gpudiff.tasks.masks.mask_non_finite` sets it on exactly the
    non-finite pixels, and the cosmic rays and the interpolation set other planes.
    """
    tmi, smi = template.masked_image, science.masked_image
    xp = smi.backend.xp
    fin_t, fin_s = xp.isfinite(tmi.image), xp.isfinite(smi.image)
    (tx0, ty0), b = tmi.xy0, smi.bbox
    sl = (slice(b.y0 - ty0, b.y1 - ty0), slice(b.x0 - tx0, b.x1 - tx0))
    covered = fin_t[sl] & fin_s
    for mi, part in ((tmi, sl), (smi, (slice(None), slice(None)))):
        nd = mi.mask_planes.bitmask_if_present("NO_DATA")
        if nd:
            covered &= (mi.mask[part] & nd) == 0
    return [fin_t.all(), fin_s.all(), xp.count_nonzero(covered)]


def _fetch_with_counts(be: Backend, arrays: list, *exposures: Exposure):
    """Host copies of ``arrays`` and the INTRP pixel counts of ``exposures`` ("template",
    "science" in this order; 0 without the plane), in one transfer."""
    names = ("template", "science")[-len(exposures) :]
    counts = {}
    for name, exp in zip(names, exposures):
        intrp = exp.masked_image.mask_planes.bitmask_if_present("INTRP")
        if intrp:
            counts[name] = be.xp.count_nonzero(exp.masked_image.mask & intrp)
    got = fetch(be, *arrays, *counts.values())
    host = [bool(v) for v in got[: len(arrays)]]
    n = {name: int(v) for name, v in zip(counts, got[len(arrays) :])}
    return host, {name: n.get(name, 0) for name in names}


def _replace_mi(exp: Exposure, mi: MaskedImage) -> Exposure:
    """``exp`` with its pixels replaced by ``mi``."""
    return Exposure(mi, exp.psf, exp.wcs, exp.photo_calib, exp.metadata)


def _has_detected(mi: MaskedImage) -> Any:
    """Whether any pixel has DETECTED set: a backend 0-d bool (False without the plane)."""
    det_bit = mi.mask_planes.bitmask_if_present("DETECTED")
    return (mi.mask & det_bit).any() if det_bit else np.False_


def interpolate_defects(
    exp: Exposure, planes, backend: Backend, *, bad: tuple[Any, bool] | None = None
) -> tuple[Exposure, Any]:
    """``exp`` with its defects interpolated and flagged INTRP.

    Parameters
    ----------
    exp : Exposure
    planes : sequence of str
        The defect mask planes; non-finite pixels are defects too.  Empty: nothing is done.
    backend : Backend
    bad : (array of bool, bool), optional
        ``defect_pixels(exp.masked_image, planes)`` and whether it has any pixel, when the
        caller has them (it fetched that flag with others: one host sync fewer).

    Returns
    -------
    exposure : Exposure
    filled : array of bool or None
        The filled pixels; None when nothing was filled.
    """
    planes = tuple(planes)
    if not planes:
        return exp, None
    mi = exp.masked_image
    if bad is None:
        bad = defect_pixels(mi, planes)
        any_bad = bool(bad.any())
    else:
        bad, any_bad = bad
    if not any_bad:
        return exp, None
    try:
        fwhm = float(exp.psf.fwhm())
    except PsfError:
        fwhm = 3.0  # only sets the smoothing scale of the large-blob fallback
    filled = interpolate_over_defects(mi, planes, fwhm=fwhm, backend=backend)
    return Exposure(filled, exp.psf, exp.wcs, exp.photo_calib, exp.metadata), bad


def mask_cosmic_rays(exposure: Exposure, backend: Backend) -> Exposure:
    """Set the CR plane on the cosmic rays of an image (the science, or a
    single-exposure template) not flagged yet.

    LSST's calexps come with cosmic rays found (and interpolated) by
    calibrateImage; a plain FITS or a simulation does not, or not all of them.  Once the
    science is convolved (convolveScience) a cosmic ray is smeared into a PSF-like blob that
    no sharpness test can recognise, so they are found here, before any convolution,
    and the CR bits travel (dilated) into the difference.

    Parameters
    ----------
    exposure : Exposure
    backend : Backend

    Returns
    -------
    Exposure
        ``exposure`` itself when no new ray was found.
    """
    cr = _new_cosmic_rays(exposure, backend)
    if not bool(cr.any()):
        return exposure
    return _with_cosmic_rays(exposure, cr)


#: The inputs' cosmic-ray threshold (σ of the variance plane); see :func:`_new_cosmic_rays`.
INPUT_CR_MIN_SIGMA = 5.0
#: The inputs' rays are extended along their tracks to neighbours this many σ above zero
#: that pass the sharpness test with LSST's ``cond3_fac2`` slack (see
#: :func:`~gpudiff.ops.cosmic_rays.find_cosmic_rays`): a track seeded by one bright pixel
#: was found over that pixel only, and what the fill left became a false source (one of
#: the two clean records of the 20 same-epoch DECam pairs went so).
INPUT_CR_EXTEND_SIGMA = 3.0


def _new_cosmic_rays(exposure: Exposure, backend: Backend) -> Any:
    """The cosmic-ray pixels of :func:`mask_cosmic_rays` not flagged CR yet (a backend
    bool array; not tested for emptiness, which callers fetch with other flags)."""
    mi = exposure.masked_image
    # Defects already flagged are not rays: a garbage column seeded "rays" grown onto its
    # two clean neighbours, which were then filled and marked INTRP without BAD, so the
    # matching kernel grew them by its whole box (a realistic 2048² pair lost 4 transients
    # 3-11 px from a template bad column so; docs/algorithms.md §14).
    cr = find_cosmic_rays(
        mi,
        exposure.psf,
        exclude_planes=("BAD", "SAT", "NO_DATA"),
        # The inputs may carry their sky (plain FITS images): the ray tests need it gone.
        subtract_sky=True,
        # 5σ, not find_cosmic_rays' 6σ: faint science rays (3–5σ pixels) left unflagged
        # were most of the clean false sources of the sharper realistic 2048² pair
        # (preconvolve 2.38 → 2.15 per Mpix, subtract 1.43 → 1.19; no injection lost, the
        # 20 DECam pairs unchanged; 4σ gave the same; docs/algorithms.md §14).
        min_sigma=INPUT_CR_MIN_SIGMA,
        extend_sigma=INPUT_CR_EXTEND_SIGMA,
        backend=backend,
    )
    cr_bit = mi.mask_planes.bitmask_if_present("CR")
    if cr_bit:
        # A CR plane that came with the image is kept and completed: a repair step that
        # found some rays (issue 14's raw pairs: half of them) leaves the rest, which
        # convolveScience would smear into PSF-like false sources.
        cr &= (mi.mask & cr_bit) == 0
    return cr


def _with_cosmic_rays(exposure: Exposure, cr: Any) -> Exposure:
    """``exposure`` with the new rays ``cr`` set in its CR plane."""
    return _replace_mi(exposure, exposure.masked_image.with_plane_set("CR", cr))


def scale_variance(
    exp: Exposure,
    config: AlardLuptonSubtractConfig,
    backend: Backend,
    need_catalog: bool,
    has_detected: bool | None = None,
    *,
    copy: bool = True,
) -> tuple[Exposure, float, Table | None]:
    """ScaleVarianceTask's factor, applied to a copy of the exposure.

    LSST inputs carry DETECTED masks, which ScaleVariance ignores.  When an input has no
    DETECTED pixel at all (a plain FITS, a simulation) the sources would bias the
    factor upwards (measured +6 to +9 % on a crowded field), so gpudiff detects them at
    5σ for this estimate only (a documented departure: LSST would use the unmasked
    image as it comes).

    Parameters
    ----------
    exp : Exposure
    config : AlardLuptonSubtractConfig
        ``detection_threshold`` and ``scale_variance_max_samples``.
    backend : Backend
    need_catalog : bool
        Detect the sources (and return them) when the image has no DETECTED pixel; else a
        cheap source mask (:func:`with_source_mask`) is enough.
    has_detected : bool, optional
        Whether the image has a DETECTED pixel, when the caller knows (else tested here).
    copy : bool
        False: the returned exposure shares the image and mask arrays with ``exp`` (for
        callers that never modify either, as :func:`prepare_inputs`).

    Returns
    -------
    exposure : Exposure
        Variance multiplied by the factor.
    factor : float
    catalog : astropy Table or None
        The detections (errors and S/N on the scaled variance's footing), if made.
    """
    mi = exp.masked_image
    probe, catalog = mi, None
    if has_detected is None:
        has_detected = bool(_has_detected(mi))
    if not has_detected and need_catalog:
        # The science's detections are reused for kernel-source selection.
        det = detect_sources(
            mi,
            exp.psf,
            threshold=config.detection_threshold,
            polarity="both",
            background="estimate",
            backend=backend,
        )
        # Only read (by the variance scaling): the planes as they are, no copies.
        probe = MaskedImage._wrap(
            mi.image,
            mi.variance,
            det.mask,
            xy0=mi.xy0,
            mask_planes=det.mask_planes,
            backend=backend,
        )
        catalog = det.catalog
    elif not has_detected:
        probe = _source_mask_probe(mi, exp.psf)
    sv_config = ScaleVarianceConfig(max_samples=config.scale_variance_max_samples)
    factor = float(ScaleVarianceTask(sv_config, backend=backend).run(probe))
    # Without a copy the image and mask are shared with ``exp`` and the scaled variance
    # (new) is held as it is: three device copies saved, a launch each.
    make = MaskedImage if copy else MaskedImage._adopt
    scaled = make(
        mi.image,
        mi.variance * np.float32(factor),
        mi.mask,
        xy0=mi.xy0,
        mask_planes=mi.mask_planes,
        backend=backend,
    )
    if catalog is not None and len(catalog):
        # Measured with the unscaled variance: put the errors on the scaled footing.
        root = float(np.sqrt(factor))
        catalog["psf_flux_err"] = np.asarray(catalog["psf_flux_err"]) * root
        catalog["snr"] = np.asarray(catalog["snr"]) / root
    return Exposure(scaled, exp.psf, exp.wcs, exp.photo_calib, exp.metadata), factor, catalog


def with_source_mask(mi: MaskedImage, psf) -> MaskedImage:
    """``mi`` with DETECTED set on pixels more than 5σ from the median, grown by ~2 FWHM.

    A cheap source mask, enough for statistics that only need sources excluded
    (ScaleVariance, :func:`~gpudiff.tasks.subtract_finalize.residual_background`).

    Parameters
    ----------
    mi : MaskedImage
    psf
        Any PSF model with ``fwhm()``.

    Returns
    -------
    MaskedImage
    """
    return mi.with_plane_set("DETECTED", _source_pixels(mi, psf))


def _source_mask_probe(mi: MaskedImage, psf) -> MaskedImage:
    """:func:`with_source_mask` for statistics that only read it: the image and variance
    are ``mi``'s own arrays (not copied, a device launch each), the mask is new."""
    mask, planes = mi._plane_set("DETECTED", _source_pixels(mi, psf))
    return MaskedImage._wrap(
        mi.image, mi.variance, mask, xy0=mi.xy0, mask_planes=planes, backend=mi.backend
    )


def _source_pixels(mi: MaskedImage, psf) -> Any:
    """The DETECTED pixels of :func:`with_source_mask` (a backend bool array)."""
    xp = mi.backend.xp
    finite = xp.isfinite(mi.image) & xp.isfinite(mi.variance) & (mi.variance > 0)
    if mi.backend.is_gpu:
        # The same median without a host sync (an emptiness test, a boolean-mask
        # compaction): NaN outside ``finite``; NaN if nothing is, when ``on`` is all False.
        med = xp.nanmedian(xp.where(finite, mi.image, xp.float32(np.nan)))
    else:
        med = xp.median(mi.image[finite]) if bool(finite.any()) else 0.0
    with np.errstate(invalid="ignore", divide="ignore"):
        on = finite & (xp.abs(mi.image - med) > 5.0 * xp.sqrt(mi.variance))
    r = max(2, int(round(2 * psf.fwhm())))
    return mi.backend.ndimage.maximum_filter(on.astype(np.uint8), size=2 * r + 1) > 0

"""Mask handling of the subtraction tasks (docs/algorithms.md §4.2 steps 2, 4 and 11; §12).

Every function returns new objects; inputs are never modified.
"""

from __future__ import annotations

from typing import Any, Iterable

import numpy as np

from ..image import Exposure, MaskedImage
from ..ops.convolution import dilate_mask, kernel_centre
from ..ops.stats import sky_level
from ..psfmatch.spatial import SpatialKernel

__all__ = [
    "template_coverage",
    "update_masks",
    "convolve_preserving",
    "mask_non_finite",
    "quiet_fills",
    "cosmic_ray_fills",
    "bad_fills",
    "kernel_core",
    "QUIET_FILL_SNR",
    "CR_FILL_CORE",
]

#: A filled (INTRP) pixel whose value lies within this many σ (its variance plane) of the
#: image's sky is *well filled* (docs/algorithms.md §14, "Mask growth of well-filled
#: pixels").  A fill is the mean of good neighbours, so its error is their noise (σ/√2)
#: plus half the image's curvature there; a value within 3σ of the sky bounds the
#: curvature by a source peak of ~5σ, so the error is ≲ 2σ, and the matching kernel
#: (peak ≲ 0.1 of its sum) spreads at most ~0.2σ of it to any other pixel.  Sky pixels pass
#: the test unless their fill noise is a 4.2σ event.
QUIET_FILL_SNR = 3.0

#: A filled cosmic ray (INTRP and CR, no detector defect) is grown by the kernel's *core*:
#: its pixels where |K| is at least this fraction of the peak (at the four corners and the
#: centre of the kernel's region), not by the whole box (docs/algorithms.md §14, "Mask
#: growth of filled cosmic rays").  What a fill can leave is the part of a track the finder
#: missed, < 3σ per pixel next to the found part (the finder's extension pass takes the
#: rest); a record of it is centred within the core, whose 5×5 centre box then flags it,
#: and beyond the core the kernel spreads a pixel of a σ by < σ/30.  At 1 % of the peak a
#: realistic 2048² pair (seed 14, convolveScience) flagged a S/N 90 transient 7 px from a
#: ray; at 5 % it is clean, with the false sources and the 20 DECam pairs unchanged.
CR_FILL_CORE = 0.05


def template_coverage(template: Exposure, science: Exposure) -> float:
    """Fraction of the science box where neither image is NO_DATA (docs/algorithms.md §4.2 step
    2)."""
    t = (
        template.masked_image.subimage(science.bbox)
        if template.bbox != science.bbox
        else template.masked_image
    )
    s = science.masked_image
    xp = s.backend.xp
    nd_t = t.mask_planes.bitmask_if_present("NO_DATA")
    nd_s = s.mask_planes.bitmask_if_present("NO_DATA")
    bad = ((t.mask & nd_t) != 0) | ((s.mask & nd_s) != 0)
    n = bad.size
    return float(n - int(xp.count_nonzero(bad))) / n if n else 0.0


def mask_non_finite(exposure: Exposure) -> Exposure:
    """``exposure`` with every NaN/inf image pixel marked NO_DATA (image NaN, variance +inf).

    LSST's no-data convention, as :func:`gpudiff.image.read_exposure` applies it to plain
    and CCDData files: a non-finite pixel is no data, and saying so in the mask keeps it
    out of statistics, kernel stamps and the template coverage, and flags it in the
    difference (it would otherwise come out NaN but unmasked).  ``exposure`` itself when
    every pixel is finite.
    """
    mi = exposure.masked_image
    xp = mi.backend.xp
    bad = ~xp.isfinite(mi.image)
    if not bool(bad.any()):
        return exposure
    mi = mi.with_plane_set("NO_DATA", bad)
    mi = MaskedImage(
        xp.where(bad, xp.float32(np.nan), mi.image),
        xp.where(bad, xp.float32(np.inf), mi.variance),
        mi.mask,
        xy0=mi.xy0,
        mask_planes=mi.mask_planes,
        backend=mi.backend,
    )
    return Exposure(mi, exposure.psf, exposure.wcs, exposure.photo_calib, exposure.metadata)


def _copy_plane(mi: MaskedImage, src: str, dst: str) -> MaskedImage:
    return mi.with_plane_set(dst, (mi.mask & (1 << mi.mask_planes[src])) != 0)


def update_masks(
    template: Exposure,
    science: Exposure,
    rename_template_mask: Iterable[str],
    preserve_template_mask: Iterable[str],
) -> tuple[Exposure, Exposure]:
    """LSST's ``updateMasks`` (docs/algorithms.md §4.2 step 4).

    Science: DETECTED and DETECTED_NEGATIVE cleared; FAKE becomes INJECTED.  Template:
    FAKE becomes INJECTED_TEMPLATE; each ``rename_template_mask`` plane present is copied
    to ``<NAME>_TEMPLATE``; then every template plane other than
    ``preserve_template_mask`` and the new ``*_TEMPLATE`` planes is cleared.
    """
    smi = science.masked_image.with_planes_cleared(("DETECTED", "DETECTED_NEGATIVE"))
    if "FAKE" in smi.mask_planes:
        smi = _copy_plane(smi, "FAKE", "INJECTED").with_planes_cleared(("FAKE",))
    tmi = template.masked_image
    if "FAKE" in tmi.mask_planes:
        tmi = _copy_plane(tmi, "FAKE", "INJECTED_TEMPLATE")
    renamed = []
    for name in rename_template_mask:
        if name in tmi.mask_planes:
            tmi = _copy_plane(tmi, name, f"{name}_TEMPLATE")
            renamed.append(f"{name}_TEMPLATE")
    keep = (
        set(preserve_template_mask)
        | set(renamed)
        | ({"INJECTED_TEMPLATE"} if "FAKE" in template.mask_planes else set())
    )
    tmi = tmi.with_planes_cleared([n for n in tmi.mask_planes if n not in keep])
    return (
        Exposure(tmi, template.psf, template.wcs, template.photo_calib, template.metadata),
        Exposure(smi, science.psf, science.wcs, science.photo_calib, science.metadata),
    )


def quiet_fills(mi: MaskedImage, snr: float = QUIET_FILL_SNR) -> Any:
    """Boolean array: the well-filled pixels of ``mi`` (docs/algorithms.md §14).

    INTRP pixels (not NO_DATA or SAT), with finite positive variance and
    |value − sky| ≤ ``snr``·√variance, the sky being the median of the unflagged pixels
    (every 4th row and column: a level, not a map).  A fill over a source, a saturated
    core or a zero-filled gap fails the test; so does every fill of an image whose sky
    is not one level (a raw frame's vignetting), which then keeps LSST's growth.  Only
    BAD fills qualify (a cosmic ray's fill keeps LSST's growth).

    Parameters
    ----------
    mi : MaskedImage
        The image about to be convolved, its defects already interpolated.
    snr : float
        See :data:`QUIET_FILL_SNR`.

    Returns
    -------
    array of bool
        On ``mi``'s backend; all False when nothing is INTRP.
    """
    xp = mi.backend.xp
    intrp = mi.mask_planes.bitmask_if_present("INTRP")
    # Only a detector defect's fill (BAD: clean-edged columns and pixels) is exempt.  A
    # cosmic ray's fill is quiet at its core, but the finder may have found only part of
    # the ray: the rest of a track, left unmasked, is spread by the kernel into a PSF-like
    # residual that only the grown plane covers (by the kernel's core:
    # :func:`cosmic_ray_fills`).  On the shared DECam cutouts a template track at (238, 82)
    # of OBS18e, found over 5-8 of its ~20 px, gave a clean S/N -13 source in three
    # same-epoch pairs when its fill was left ungrown (a test for "nothing of the ray left
    # within 2 px above 3.5σ" still missed its 3σ middle section).
    bad = mi.mask_planes.bitmask_if_present("BAD")
    if not intrp or not bad:
        return xp.zeros(mi.shape, dtype=bool)
    # Saturated cores (bleed trails, wings above the fill) and no-data gaps are never
    # "quiet".  INTRP and BAD set, none of these: one test (two device calls).
    loud = mi.mask_planes.bitmask_if_present(["NO_DATA", "SAT", "SAT_TEMPLATE"])
    filled = (mi.mask & (intrp | bad | loud)) == (intrp | bad)
    sky = sky_level(mi)
    lim = snr * snr
    if mi.backend.is_gpu:
        # Whole-image arithmetic, no emptiness test (a host sync); a NaN sky (no usable
        # pixel) passes no fill.  A non-finite value or variance fails a comparison.
        var = mi.variance
        dev = mi.image - sky
        return filled & (dev * dev <= lim * var) & (var > 0) & (var < xp.float32(np.inf))
    # On the CPU only the filled pixels (a few columns) are tested.
    quiet = np.zeros(mi.shape, dtype=bool)
    if not filled.any() or not np.isfinite(sky):
        return quiet
    rows, cols = np.nonzero(filled)
    img, var = mi.image[rows, cols], mi.variance[rows, cols]
    ok = np.isfinite(var) & (var > 0) & np.isfinite(img)
    dev = np.where(ok, img, np.float32(0)) - sky
    quiet[rows, cols] = ok & (dev * dev <= lim * np.where(ok, var, np.float32(0)))
    return quiet


def cosmic_ray_fills(mi: MaskedImage) -> Any:
    """Boolean array: the filled cosmic-ray pixels of ``mi`` (INTRP and CR set; none of
    BAD, SAT, SAT_TEMPLATE, NO_DATA, which keep their own growth or are quiet fills).

    All False (on ``mi``'s backend) when the image has no INTRP or CR plane.
    """
    xp = mi.backend.xp
    if not {"INTRP", "CR"} <= set(mi.mask_planes):
        return xp.zeros(mi.shape, dtype=bool)
    need = mi.mask_planes.bitmask_if_present(["INTRP", "CR"])
    other = mi.mask_planes.bitmask_if_present(["BAD", "SAT", "SAT_TEMPLATE", "NO_DATA"])
    # One test for all the planes (two device calls): the quiet fills need BAD, so the
    # two sets never overlap.
    return (mi.mask & (need | other)) == need


def bad_fills(mi: MaskedImage) -> Any:
    """Boolean array: the filled detector defects of ``mi`` (BAD and INTRP set; none of CR,
    SAT, SAT_TEMPLATE, NO_DATA).  All False when the image has no BAD or INTRP plane."""
    xp = mi.backend.xp
    if not {"BAD", "INTRP"} <= set(mi.mask_planes):
        return xp.zeros(mi.shape, dtype=bool)
    need = mi.mask_planes.bitmask_if_present(["BAD", "INTRP"])
    other = mi.mask_planes.bitmask_if_present(["CR", "SAT", "SAT_TEMPLATE", "NO_DATA"])
    return (mi.mask & (need | other)) == need


def kernel_core(kernel: SpatialKernel, fraction: float = CR_FILL_CORE) -> np.ndarray:
    """Footprint (bool, the kernel's shape) where |K(x, y)| ≥ ``fraction`` × its peak at
    any of the corners or the centre of the kernel's region; always holds the centre."""
    r = kernel.functions.region
    xs = (r.x0, r.x1 - 1, 0.5 * (r.x0 + r.x1 - 1))
    ys = (r.y0, r.y1 - 1, 0.5 * (r.y0 + r.y1 - 1))
    core = np.zeros(kernel.shape, dtype=bool)
    for x, y in [(xs[0], ys[0]), (xs[1], ys[0]), (xs[0], ys[1]), (xs[1], ys[1]), (xs[2], ys[2])]:
        k = np.abs(kernel.kernel_image(x, y))
        core |= k >= fraction * k.max()
    cy, cx = kernel_centre(kernel.shape)
    core[cy, cx] = True
    return core


def convolve_preserving(
    kernel: SpatialKernel,
    mi: MaskedImage,
    preserve: Iterable[str],
    *,
    quiet_fill_snr: float | None = QUIET_FILL_SNR,
    cr_fill_core: float | None = CR_FILL_CORE,
    **kwargs,
) -> MaskedImage:
    """Convolve with ``doCopyEdge=True``, keeping ``preserve`` planes undilated (docs/algorithms.md
    §4.2 step 11: injection markers are snapshotted, cleared after the convolution, restored).

    The bits of well-filled pixels (:func:`quiet_fills`) are restored undilated too: the
    kernel spreads their filled value, whose error is at the noise level, not the defect
    (a departure from LSST, which grows every plane by the kernel's footprint; the
    matching kernel's 21-35 px box cost 5 of the 44 S/N >= 8 transients of a realistic
    2048² pair in convolveTemplate; docs/algorithms.md §14).  ``quiet_fill_snr=None``
    grows every bit as LSST.

    Filled cosmic rays (:func:`cosmic_ray_fills`) are grown by the kernel's core
    (:func:`kernel_core`, |K| ≥ ``cr_fill_core`` × its peak), not by its whole box: with
    the box, the science's rays in convolveScience flagged 7 of the 175 S/N ≥ 8
    transients of a realistic 2048² pair, with the core 4 (docs/algorithms.md §14).
    ``cr_fill_core=None`` grows them as LSST.
    """
    quiet = quiet_fills(mi, quiet_fill_snr) if quiet_fill_snr is not None else None
    if quiet is not None and not mi.backend.is_gpu and not quiet.any():
        quiet = None  # on a device the masks are combined unconditionally (no host sync)
    rays = cosmic_ray_fills(mi) if cr_fill_core is not None else None
    if rays is not None and not mi.backend.is_gpu and not rays.any():
        rays = None
    xp = mi.backend.xp
    zero = mi.mask.dtype.type(0)
    exempt = quiet if rays is None else (rays if quiet is None else quiet | rays)
    src = mi
    if exempt is not None:
        src = MaskedImage(
            mi.image,
            mi.variance,
            xp.where(exempt, zero, mi.mask),
            xy0=mi.xy0,
            mask_planes=mi.mask_planes,
            backend=mi.backend,
        )
    out = kernel.convolve(src, do_copy_edge=True, **kwargs)
    bm = mi.mask_planes.bitmask_if_present(list(preserve))
    if not bm and exempt is None:
        return out
    mask = (out.mask & ~bm) | (mi.mask & bm) if bm else out.mask
    if quiet is not None:
        mask = mask | xp.where(quiet, mi.mask, zero)
    if rays is not None:
        # The core holds its centre: the rays keep their own bits too.
        core = kernel_core(kernel, cr_fill_core)
        mask = mask | dilate_mask(xp.where(rays, mi.mask, zero), core, mi.backend)
    return MaskedImage(
        out.image, out.variance, mask, xy0=out.xy0, mask_planes=out.mask_planes, backend=out.backend
    )

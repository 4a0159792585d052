"""Resampling an exposure onto another WCS and pixel grid (afw ``warpExposure``, docs/algorithms.md
§8).

:func:`warp_exposure` maps every destination pixel to the source image (destination pixel
→ sky → source pixel, evaluated exactly with astropy on a coarse grid every
``interp_length`` pixels and bilinearly interpolated in between, as afw's ``interpLength``)
and resamples:

- image: separable Lanczos weights (a = 3: 6×6 taps), **normalized** to unit sum, so a
  constant image stays constant and an integer shift is an exact copy;
- variance: the same taps with squared weights, Σ w²·V.  Like afw this ignores the
  covariance the interpolation creates between neighbouring output pixels: each pixel's
  variance is right, sums over several pixels are underestimated;
- mask: the OR of the bits of the 2×2 bilinear neighbours with nonzero weight (afw's
  bilinear mask kernel), plus ``grow_full_mask`` planes (EDGE) ORed over the full Lanczos
  footprint (afw ``growFullMask``);
- output pixels whose Lanczos footprint leaves the source image, or touches a NO_DATA or
  non-finite source pixel, are NO_DATA with NaN image and infinite variance (afw's edge
  pixel).

Pixel values are interpolated, not flux-rescaled by the Jacobian (afw does not either):
with equal pixel areas star fluxes are preserved.  The work runs on the backend in row
bands (one CPU thread per core on NumPy), vectorized over the band, never over pixels.
Three paths give the same pixels (float32 round-off apart) at different costs:

- **no resampling** when the destination grid is the source grid moved by whole pixels,
  within 1e-3 px at every node of the mapping (the same tolerance as :func:`wcs_equal`;
  logged): pixels are copied, with the same edge, NO_DATA and EDGE-growth rules;
- **separable** when the mapping is axis-aligned (column → column, row → row within
  1e-7 px: a shift, a pixel-scale change): 6 horizontal taps on the source rows a band
  needs, then 6 vertical taps — 12 multiply-adds per pixel and plane instead of 36, with
  slices and 1-D gathers, in the same summation order as the general path;
- **general** otherwise (rotations, distortion): 36 gathers per pixel.

This module maps the grids and chooses the path; the band loops of the separable and
general paths are in :mod:`gpudiff.ops.resample`.
"""

from __future__ import annotations

import copy
import logging
import math
from typing import Iterable

import numpy as np

from ..backend import Backend, resolve_backend
from ..errors import InvalidInputError, NoOverlapError
from ..image import Box, Exposure, ImagePsf, MaskedImage, Psf
from .convolution import dilate_mask

# Private aliases: the engine is not part of this module's API (tests wrap
# ``_warp_separable`` to see which path a warp takes).
from .resample import interp_index as _interp_index
from .resample import resample_general as _warp_general
from .resample import resample_separable as _warp_separable

log = logging.getLogger("gpudiff.ops.warp")

__all__ = ["check_overlap", "pixel_mapping", "warp_exposure", "wcs_equal", "wcs_overlap"]

#: Max |J − I| under which the source PSF is kept as is.
_PSF_TOL = 1e-4
#: Grids that agree within this (px, at every mapping node, up to whole pixels) are not
#: resampled: the tolerance of :func:`wcs_equal` and of LSST's ``_validateWcs``.
_GRID_TOL = 1e-3
#: Max departure (px) of the mapping from "column depends on column only, row on row only"
#: for the separable path.  A position error δ changes a Lanczos weight by ≲ δ, so 1e-7 px
#: stays at the float32 rounding of the weights themselves (6e-8): the separable result is
#: the general one within float32 tolerance.  Exact axis-aligned maps round-trip through
#: astropy at ~1e-10 px.
_SEPARABLE_TOL = 1e-7


def _to_sky_to(wcs_from, wcs_to, x, y):
    """Array pixels of ``wcs_from`` → sky → array pixels of ``wcs_to`` (float64)."""
    ra, dec = wcs_from.pixel_to_world_values(np.asarray(x, float), np.asarray(y, float))
    u, v = wcs_to.world_to_pixel_values(ra, dec)
    return np.asarray(u, dtype=np.float64), np.asarray(v, dtype=np.float64)


def _perimeter(box: Box, n: int = 32):
    """Points along the outer pixel edges of ``box`` (array coordinates)."""
    t = np.linspace(0.0, 1.0, n)
    xl, xh, yl, yh = -0.5, box.width - 0.5, -0.5, box.height - 0.5
    xs = np.concatenate([xl + t * (xh - xl), np.full(n, xh), xh - t * (xh - xl), np.full(n, xl)])
    ys = np.concatenate([np.full(n, yl), yl + t * (yh - yl), np.full(n, yh), yh - t * (yh - yl)])
    return xs, ys


def wcs_overlap(wcs_a, box_a: Box, wcs_b, box_b: Box) -> Box | None:
    """The part of image a's pixel box covered by image b's footprint.

    Parameters
    ----------
    wcs_a, wcs_b : astropy.wcs.WCS
        Each maps the **array** pixels of its image (as :class:`~gpudiff.image.Exposure`).
    box_a, box_b : Box
        Parent boxes of the images.

    Returns
    -------
    Box or None
        In a's parent coordinates: the bounding box of b's outline mapped into a,
        intersected with ``box_a`` (for rotated frames it can include corners b does not
        reach); None when they do not overlap.
    """
    xs, ys = _perimeter(box_b)
    u, v = _to_sky_to(wcs_b, wcs_a, xs, ys)
    ok = np.isfinite(u) & np.isfinite(v)
    if not ok.any():
        return None
    u, v = u[ok] + box_a.x0, v[ok] + box_a.y0
    # Pixel i covers [i − 0.5, i + 0.5): the pixels touched by [min, max] (1e-6 px slack
    # absorbs the sky round trip, so an exact pixel edge does not pull in a neighbour).
    eps = 1e-6
    hull = Box(
        int(math.floor(u.min() + 0.5 + eps)),
        int(math.floor(v.min() + 0.5 + eps)),
        int(math.ceil(u.max() + 0.5 - eps)),
        int(math.ceil(v.max() + 0.5 - eps)),
    )
    return hull.intersection(box_a)


def check_overlap(
    wcs_a, box_a: Box, wcs_b, box_b: Box, *, name_a: str = "image A", name_b: str = "image B"
) -> Box:
    """:func:`wcs_overlap`, raising :class:`~gpudiff.errors.NoOverlapError` when empty.

    Returns
    -------
    Box
        The overlap in a's parent coordinates.
    """
    if wcs_a is None or wcs_b is None:
        raise InvalidInputError(
            f"cannot compare {name_a} and {name_b}: "
            f"{name_a if wcs_a is None else name_b} has no WCS"
        )
    box = wcs_overlap(wcs_a, box_a, wcs_b, box_b)
    if box is None:
        raise NoOverlapError(
            f"{name_b} (box {box_b}) does not overlap {name_a} (box {box_a}) on the sky"
        )
    return box


def wcs_equal(wcs_a, box_a: Box, wcs_b, box_b: Box, *, tol_pix: float = 1e-3) -> bool:
    """Whether two images share their pixel grid on the sky (docs/algorithms.md §8
    ``_validateWcs``).

    True when the dimensions agree and the four corner pixels of a land, through the
    sky, within ``tol_pix`` of the same corner pixels of b: no warping is needed.
    """
    if wcs_a is None or wcs_b is None or box_a.shape != box_b.shape:
        return False
    x = np.array([0.0, box_a.width - 1.0, 0.0, box_a.width - 1.0])
    y = np.array([0.0, 0.0, box_a.height - 1.0, box_a.height - 1.0])
    u, v = _to_sky_to(wcs_a, wcs_b, x, y)
    return bool(np.all(np.hypot(u - x, v - y) <= tol_pix))


def _nodes(n: int, step: int) -> np.ndarray:
    nodes = np.arange(0, n, max(1, int(step)), dtype=np.float64)
    return nodes if nodes[-1] == n - 1 else np.append(nodes, n - 1.0)


def pixel_mapping(src_wcs, dest_wcs, dest_box: Box, *, interp_length: int = 10):
    """Source array coordinates of destination pixels, exact on a coarse grid.

    Returns
    -------
    xs, ys : numpy.ndarray
        Destination array columns / rows of the grid nodes (every ``interp_length``
        pixels plus the last; ``interp_length`` ≤ 1: every pixel).
    u, v : numpy.ndarray (len(ys), len(xs))
        Source array column / row of each node (NaN where the mapping fails).
    """
    xs, ys = _nodes(dest_box.width, interp_length), _nodes(dest_box.height, interp_length)
    u, v = _to_sky_to(dest_wcs, src_wcs, *np.meshgrid(xs, ys))
    return xs, ys, u, v


def _kernel(name: str):
    """(taps, weight function of the fractional offset) of a warping kernel."""
    key = str(name).strip().lower()
    if key == "bilinear":
        return 2, lambda xp, f: xp.stack([1.0 - f, f])
    if key.startswith("lanczos") and key[7:].isdigit() and int(key[7:]) >= 1:
        a = int(key[7:])

        def weights(xp, f):
            # Taps floor(u) − a + 1 … floor(u) + a sit at t = f + m, m = a − 1 − k.  All
            # share sin(πt) = (−1)^m sin(πf), and sin(πt/a) follows from sin/cos(πf/a) by
            # angle addition: three transcendentals per pixel instead of 4a.
            s1, sa, ca = xp.sin(np.pi * f), xp.sin(np.pi * f / a), xp.cos(np.pi * f / a)
            taps = []
            for k in range(2 * a):
                m = a - 1 - k
                t = f + m
                num = (
                    (a * (-1.0) ** m)
                    * s1
                    * (sa * math.cos(m * np.pi / a) + ca * math.sin(m * np.pi / a))
                )
                taps.append(
                    xp.where(
                        xp.abs(t) < 1e-9, 1.0, num / (np.pi * np.pi * xp.maximum(t * t, 1e-18))
                    )
                )
            w = xp.stack(taps)  # (taps, ...): each tap's weights contiguous
            return w / w.sum(axis=0)

        return 2 * a, weights
    raise InvalidInputError(
        f"unknown warping kernel {name!r}; use 'lanczosN' (e.g. 'lanczos3') or 'bilinear'"
    )


def _integer_offset(xs, ys, u, v, tol: float | None = None):
    """(ox, oy) when every mapping node lands within ``tol`` px of destination + (ox, oy)
    with whole ox, oy (the grids agree: no resampling); otherwise None."""
    tol = _GRID_TOL if tol is None else tol
    if not (np.isfinite(u).all() and np.isfinite(v).all()):
        return None
    du, dv = u - xs[None, :], v - ys[:, None]
    ox, oy = float(np.round(du[0, 0])), float(np.round(dv[0, 0]))
    if float(np.hypot(du - ox, dv - oy).max()) <= tol:
        return int(ox), int(oy)
    return None


def _separable_axes(xs, ys, u, v, W: int, H: int, tol: float | None = None):
    """Per-column source column and per-row source row when the mapping is axis-aligned
    within ``tol`` px (u depends on the column only, v on the row only); else None."""
    tol = _SEPARABLE_TOL if tol is None else tol
    if not (np.isfinite(u).all() and np.isfinite(v).all()):
        return None
    if np.abs(u - u[:1, :]).max() > tol or np.abs(v - v[:, :1]).max() > tol:
        return None
    kx0, kx1, tx = _interp_index(xs, np.arange(W, dtype=np.float64))
    ky0, ky1, ty = _interp_index(ys, np.arange(H, dtype=np.float64))
    # Same linear interpolation between nodes as the general path's ``lerp``.
    ux = (1 - tx) * u[0, kx0] + tx * u[0, kx1]
    vy = (1 - ty) * v[ky0, 0] + ty * v[ky1, 0]
    return ux, vy


def _warped_psf(psf: Psf | None, src_wcs, src_box: Box, dest_wcs, dest_box: Box) -> Psf | None:
    """The source PSF seen in the destination frame, at the destination centre.

    Kept as is when the local linear map (Jacobian J of source per destination pixel) is
    the identity within 1e-4; otherwise P_d(q) = P_s(J·q) realized on a grid by cubic
    spline interpolation of the source kernel image (an :class:`ImagePsf`).  afw attaches
    a ``WarpedPsf`` evaluated exactly everywhere; this realization is local to the centre.
    """
    if psf is None:
        return None
    cx, cy = (dest_box.width - 1) / 2.0, (dest_box.height - 1) / 2.0
    u, v = _to_sky_to(dest_wcs, src_wcs, [cx - 1, cx + 1, cx, cx], [cy, cy, cy - 1, cy + 1])
    J = np.array([[u[1] - u[0], u[3] - u[2]], [v[1] - v[0], v[3] - v[2]]]) / 2.0
    if not np.isfinite(J).all():
        raise InvalidInputError(
            "cannot warp the PSF: the WCS mapping is undefined at the destination centre"
        )
    if np.abs(J - np.eye(2)).max() <= _PSF_TOL:
        return psf
    from scipy import ndimage

    uc, vc = 0.5 * (u[0] + u[1]), 0.5 * (v[2] + v[3])
    k = psf.kernel_image(uc + src_box.x0, vc + src_box.y0)
    s = k.shape[0]
    grow = max(1.0, float(np.linalg.norm(np.linalg.inv(J), 2)))
    h = int(math.ceil(s * grow - 1e-6)) // 2
    q = np.arange(-h, h + 1, dtype=np.float64)
    qx, qy = np.meshgrid(q, q)
    sx, sy = J[0, 0] * qx + J[0, 1] * qy, J[1, 0] * qx + J[1, 1] * qy
    img = ndimage.map_coordinates(k, [sy + s // 2, sx + s // 2], order=3, mode="constant", cval=0.0)
    return ImagePsf(img, average_position=(cx + dest_box.x0, cy + dest_box.y0))


def warp_exposure(
    exposure: Exposure,
    dest_wcs,
    dest_box: Box,
    *,
    kernel: str = "lanczos3",
    interp_length: int = 10,
    grow_full_mask: Iterable[str] = ("EDGE",),
    name: str = "exposure",
    dest_name: str = "destination",
    backend: Backend | str | None = None,
) -> Exposure:
    """Resample an exposure onto another WCS and pixel box.

    Parameters
    ----------
    exposure : Exposure
        The source; must have a WCS.  Not modified.
    dest_wcs : astropy.wcs.WCS
        WCS of the destination's array pixels (array [0, 0] = parent ``dest_box.x0, y0``).
    dest_box : Box
        Parent box of the output.
    kernel : str
        ``"lanczos3"`` (afw's default), any ``"lanczosN"``, or ``"bilinear"``.
    interp_length : int
        Spacing of the exactly evaluated grid of the pixel mapping (afw interpLength);
        ≤ 1 evaluates every pixel.
    grow_full_mask : iterable of str
        Mask planes ORed over the full kernel footprint instead of the bilinear 2×2.
    name, dest_name : str
        Names used in error messages.
    backend : Backend or str, optional
        Default: the exposure's backend.

    Returns
    -------
    Exposure
        On ``dest_box`` with WCS ``dest_wcs``, photo_calib and metadata of the source.  PSF:
        the source's when the local Jacobian (source per destination pixel) at the
        destination centre is the identity within 1e-4 (the grids differ by a shift);
        otherwise the source kernel image resampled through that Jacobian, an
        :class:`~gpudiff.image.ImagePsf` valid near the centre (afw: ``WarpedPsf``).

    Raises
    ------
    NoOverlapError
        The source does not reach the destination box at all.
    """
    if not isinstance(exposure, Exposure):
        raise InvalidInputError(f"warp_exposure needs an Exposure, got {type(exposure).__name__}")
    if exposure.wcs is None or dest_wcs is None:
        raise InvalidInputError(
            f"warp_exposure: {name if exposure.wcs is None else dest_name} has no WCS"
        )
    if not isinstance(dest_box, Box) or dest_box.width < 1 or dest_box.height < 1:
        raise InvalidInputError(
            f"warp_exposure: dest_box must be a non-empty Box, got {dest_box!r}"
        )
    ntaps, wfun = _kernel(kernel)
    check_overlap(dest_wcs, dest_box, exposure.wcs, exposure.bbox, name_a=dest_name, name_b=name)
    be = resolve_backend(backend if backend is not None else exposure.backend)
    mi = (
        exposure.masked_image
        if be.name == exposure.backend.name
        else exposure.masked_image.to_backend(be)
    )
    xp = be.xp
    planes = mi.mask_planes.copy()
    no_data = 1 << planes.add("NO_DATA")
    grow = planes.bitmask_if_present(list(grow_full_mask))
    bad = ((mi.mask & no_data) != 0) | ~xp.isfinite(mi.image) | ~xp.isfinite(mi.variance)
    aux = (mi.mask & np.int32(grow)) | xp.where(bad, np.int32(-(2**31)), np.int32(0)).astype(
        xp.int32
    )
    aux_any = bool((aux != 0).any())  # one host sync, for the whole warp
    if aux_any:
        # OR over the ntaps×ntaps footprint [floor − lo, floor − lo + ntaps) of every pixel:
        # afw's correlation convention centres an even footprint at (n − 1)//2 = lo.
        aux = dilate_mask(aux, np.ones((ntaps, ntaps), dtype=bool), be)
        planes_iv = [xp.where(bad, 0, mi.image), xp.where(bad, 0, mi.variance)]
    else:  # no bad pixel (bit 31 of aux): nothing to zero
        planes_iv = [mi.image, mi.variance]
    src = {
        "shape": mi.shape,
        "planes": planes_iv,
        "aux": aux.astype(xp.int32, copy=False).ravel(),
        "aux_any": aux_any,
        "mask": mi.mask.ravel(),
        "grow": grow,
        # int32 indices when they fit: half the index traffic of the 36 gathers.
        "itype": xp.int32 if mi.shape[0] * mi.shape[1] < 2**31 - 1 else xp.int64,
    }
    xs, ys, u, v = pixel_mapping(exposure.wcs, dest_wcs, dest_box, interp_length=interp_length)
    H, W = dest_box.shape
    out_i = xp.empty((H, W), dtype=xp.float32)
    out_v = xp.empty((H, W), dtype=xp.float32)
    out_m = xp.empty((H, W), dtype=xp.int32)
    shift = _integer_offset(xs, ys, u, v)
    sep = None if shift is not None else _separable_axes(xs, ys, u, v, W, H)
    if shift is not None:
        log.info(
            "warp of %s skipped: its grid is the destination's moved by (%d, %d) px "
            "within %g px; pixels copied",
            name,
            shift[0],
            shift[1],
            _GRID_TOL,
        )
        ux = np.arange(W, dtype=np.float64) + shift[0]
        vy = np.arange(H, dtype=np.float64) + shift[1]
        _warp_separable(
            be, ux, vy, src, ntaps, wfun, (out_i, out_v, out_m), no_data, exact_shift=True
        )
    elif sep is not None:
        _warp_separable(be, sep[0], sep[1], src, ntaps, wfun, (out_i, out_v, out_m), no_data)
    else:
        # interleaved (N, 2): one gather fetches a pixel's image and variance
        src["iv"] = xp.stack(planes_iv, axis=-1).astype(xp.float32, copy=False).reshape(-1, 2)
        _warp_general(be, xs, ys, u, v, src, ntaps, wfun, (out_i, out_v, out_m), no_data)
    out = MaskedImage(
        out_i, out_v, out_m, xy0=(dest_box.x0, dest_box.y0), mask_planes=planes, backend=be
    )
    psf = _warped_psf(exposure.psf, exposure.wcs, exposure.bbox, dest_wcs, dest_box)
    return Exposure(
        out,
        psf=psf,
        wcs=copy.deepcopy(dest_wcs),
        photo_calib=exposure.photo_calib,
        metadata=exposure.metadata,
    )

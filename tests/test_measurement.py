"""Peak measurement (gpudiff.ops.measurement) against brute force on the host: the mask
bits ORed over each footprint and over the central 5×5, on a scene with sources of both
signs and mask planes on bits 0–31 (bit 31 is the sign bit of the int32 mask word)."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.ndimage as ndi

from gpudiff.image import Exposure
from gpudiff.ops.detection import detect_sources
from gpudiff.sim import simulate_pair


def masked_two_sign_scene(size: int = 200, seed: int = 7):
    """(image, variance, mask, psf, mask_planes): stars negated on the left half, random
    blocks of mask bits 0, 3, 5, 11 and 30, and a lattice of bit-31 pixels."""
    s = simulate_pair(
        size=size,
        n_stars=90,
        flux_min=2e3,
        flux_max=5e5,
        seed=seed,
        science=dict(sky_subtracted=True),
        template=dict(sky_subtracted=True),
    ).science
    img = np.array(s.image, copy=True)
    img[:, : size // 2] *= -1
    rng = np.random.default_rng(seed)
    mask = np.array(s.mask, copy=True)
    for b in (0, 3, 5, 11, 30):
        for _ in range(30):
            y, x = rng.integers(0, size - 5, 2)
            mask[y : y + rng.integers(1, 6), x : x + rng.integers(1, 6)] |= np.int32(1 << b)
    mask[::37, ::41] |= np.int32(-(2**31))
    return img, np.array(s.variance), mask, s.psf, s.mask_planes


@pytest.mark.parametrize("grow", [0, 2])
def test_mask_bits_match_brute_force(backend, grow):
    img, var, mask, psf, planes = masked_two_sign_scene()
    exp = Exposure.from_arrays(img, var, mask, psf=psf, mask_planes=planes, backend=backend)
    r = detect_sources(exp, polarity="both", background=None, footprint_grow=grow)
    cat = r.catalog
    out = backend.asnumpy(r.mask)
    assert len(cat) > 20 and 5 < int(np.sum(cat["flag_negative"])) < len(cat)
    eight = np.ones((3, 3), bool)
    n_masked = 0
    for neg in (False, True):
        plane = r.mask_planes.bitmask("DETECTED_NEGATIVE" if neg else "DETECTED")
        labels, _ = ndi.label((out & plane) != 0, structure=eight)
        for row in cat[np.asarray(cat["flag_negative"]) == neg]:
            fp = labels == labels[row["peak_y"], row["peak_x"]]
            want_fp = np.bitwise_or.reduce(mask[fp].astype(np.int64) & 0x7FFFFFFF)
            assert row["mask_footprint"] == want_fp
            assert row["footprint_npix"] == fp.sum()
            ys, xs = np.nonzero(fp)
            box = (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1)
            assert (
                row["footprint_x0"],
                row["footprint_y0"],
                row["footprint_x1"],
                row["footprint_y1"],
            ) == box
            cy, cx = int(np.rint(row["y"])), int(np.rint(row["x"]))
            win = mask[max(cy - 2, 0) : cy + 3, max(cx - 2, 0) : cx + 3].astype(np.int64)
            want_c = np.int64(np.bitwise_or.reduce(win.ravel())).astype(np.int32)
            assert row["mask_center"] == want_c
            n_masked += want_fp != 0
    assert n_masked >= 5  # the check saw footprints with mask bits

"""The line interpolation of :func:`gpudiff.ops.interpolate_over_defects` against a plain
per-pixel reference: the nearest good pixels of each bad pixel, found by walking its row
and its column, give the same interpolated values (bit for bit) as the run-based search
(runs touching the image edges, runs that end one line and start the next, single
pixels, long runs handed to the smoothed fallback)."""

from __future__ import annotations

import numpy as np
import pytest

from gpudiff.image import MaskedImage
from gpudiff.ops.interpolate import interpolate_over_defects


def _line_reference(v, bad, i, j, axis):
    """(value, run length or inf) of the linear interpolation along ``axis`` at (i, j), as
    the module documents it: nearest good pixels on either side on the same line, weights
    by distance; one-sided: the one neighbour's value, run inf."""
    n = bad.shape[1 - axis] if axis == 0 else bad.shape[0]
    pos = j if axis == 0 else i

    def at(k):
        return (i, k) if axis == 0 else (k, j)

    lo = next((k for k in range(pos - 1, -1, -1) if not bad[at(k)]), None)
    hi = next((k for k in range(pos + 1, n) if not bad[at(k)]), None)
    if lo is not None and hi is not None:
        d_lo, d_hi = float(pos - lo), float(hi - pos)
        w_hi = d_lo / (d_lo + d_hi)
        return float(v[at(lo)]) * (1.0 - w_hi) + float(v[at(hi)]) * w_hi, d_lo + d_hi - 1.0
    if hi is not None:
        return float(v[at(hi)]), np.inf
    if lo is not None:
        return float(v[at(lo)]), np.inf
    return None, np.inf


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_two_sided_fill_matches_the_per_pixel_walk(seed):
    rng = np.random.default_rng(seed)
    H, W = 40, 37
    img = rng.normal(100.0, 5.0, size=(H, W)).astype(np.float32)
    var = rng.uniform(20.0, 30.0, size=(H, W)).astype(np.float32)
    bad = rng.random((H, W)) < 0.04
    bad[3, W - 3 :] = True  # a run ending a row ...
    bad[4, :2] = True  # ... and one starting the next (flat indices consecutive)
    bad[10:13, 0] = True  # on the left edge: one-sided along rows
    bad[0, 20:23] = True  # on the top edge: one-sided along columns
    bad[20, 5:9] = True  # a short run
    img[bad] = np.nan  # non-finite pixels are defects too
    mi = MaskedImage(img, var)
    out = interpolate_over_defects(mi, (), fwhm=2.0, max_run=10_000)
    good_img, good_var = np.where(bad, 0, img), np.where(bad, 0, var)
    checked = 0
    for i, j in zip(*np.nonzero(bad)):
        for plane, got in ((good_img, out.image), (good_var, out.variance)):
            vr, rr = _line_reference(plane, bad, i, j, 0)
            vc, rc = _line_reference(plane, bad, i, j, 1)
            wr = 1.0 / (rr * rr) if np.isfinite(rr) else 0.0
            wc = 1.0 / (rc * rc) if np.isfinite(rc) else 0.0
            if wr + wc == 0:
                continue  # one-sided both ways: the smoothed fallback
            want = ((vr or 0.0) * wr + (vc or 0.0) * wc) / (wr + wc)
            assert got[i, j] == np.float32(want), (i, j)
            checked += 1
    assert checked > 50
    assert np.array_equal(out.image[~bad], img[~bad])
    intrp = out.mask_planes.bitmask("INTRP")
    assert np.array_equal((out.mask & intrp) != 0, bad)

"""Device-call and host-sync budgets of detection, measurement and the binned background.

A GPU pays ~8 µs per launch and ~10 µs per host sync whatever the work, so these stages
must cost a fixed number of launches and syncs, not some per source, per window offset or
per bin.  Counted on the strict fake device of :mod:`strict_device` (as
``bench/bench_device_counts.py`` does), in a subprocess: installing it patches gpudiff's
backend factory for good.  The budgets are the counts reached (issue 16) with a small
margin; the source-count independence is exact.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from device_harness import child_fixture
from device_harness import count as _count


def _child(out_path: str) -> None:
    """Run in a fresh interpreter: count each case on the fake device, write JSON."""
    import numpy as np
    import strict_device as sd

    be = sd.install()
    from gpudiff.ops.background import bin_background
    from gpudiff.ops.detection import _peaks, detect_sources
    from gpudiff.image import Exposure
    from gpudiff.ops.footprints import dilate_disk
    from gpudiff.sim import simulate_pair

    res: dict = {}
    for n_stars in (30, 300):
        pair = simulate_pair(
            size=384,
            n_stars=n_stars,
            flux_min=2e3,
            flux_max=5e5,
            seed=4,
            science=dict(sky_subtracted=False),
            template=dict(sky_subtracted=True),
        )
        sci = pair.science.to_backend(be)
        c, det = _count(lambda: detect_sources(sci))
        res[f"detect_positive_{n_stars}"] = dict(c, n=len(det.catalog))
        # a difference-like image: the stars of the left half negative
        tm = pair.template
        flip = np.where(np.arange(tm.shape[1]) < tm.shape[1] // 2, -1.0, 1.0).astype(np.float32)
        diff = Exposure.from_arrays(tm.image * flip, tm.variance, tm.mask, psf=tm.psf, backend=be)
        c, det = _count(lambda: detect_sources(diff, polarity="both", background=None))
        neg = int(np.asarray(det.catalog["flag_negative"]).sum())
        res[f"detect_both_{n_stars}"] = dict(c, n=len(det.catalog), n_negative=neg)
        c, _ = _count(lambda: detect_sources(sci, footprint_grow=3, min_pixels=5))
        res[f"detect_grow_{n_stars}"] = c
        c, _ = _count(lambda: bin_background(sci, 64))
        res[f"bin_background_{n_stars}"] = c
    rng = np.random.default_rng(1)
    on = be.asarray(rng.random((200, 150)) < 0.02)
    for r in (1, 2, 5, 10):
        c, _ = _count(lambda: dilate_disk(be, on, r))
        res[f"dilate_{r}"] = c
    snr = be.asarray(rng.normal(size=(200, 150)).astype(np.float32))
    labels = be.ndimage.label(snr > 1.0)[0]
    for r in (1, 3):
        c, _ = _count(lambda: _peaks(be, snr, labels, r))
        res[f"peaks_{r}"] = c
    # the device path gives the NumPy path's catalog bit for bit (masks, both signs)
    from test_measurement import masked_two_sign_scene

    from gpudiff.image import GaussianPsf, GridPsf

    img, var, mask, psf, planes = masked_two_sign_scene()
    # Both polarities run as the halves of one canvas on a device
    # (gpudiff.ops.detection_canvas): stars of each sign against the edges that face its
    # gap (the positive half's right edge, the negative half's left edge), grown
    # footprints, a spatially varying PSF (its stamps are made in the image's columns),
    # and a scene with no negative source.
    edged = img.copy()
    yy, xx = np.mgrid[: img.shape[0], : img.shape[1]]
    for x, y, f in ((img.shape[1] - 2, 60, 4e4), (1, 140, -4e4), (img.shape[1] - 4, 150, 2e4)):
        edged += (f / (2 * np.pi * 2.0**2) * np.exp(-((xx - x) ** 2 + (yy - y) ** 2) / 8.0)).astype(
            np.float32
        )
    varying = GridPsf.from_function(
        lambda x, y: GaussianPsf(sigma=1.6 + x / 400.0), [0.0, 100.0, 199.0], [0.0, 199.0]
    )
    grown = dict(background=None, footprint_grow=3, min_pixels=3)
    cases = {
        "exact": (img, psf, dict(background="estimate", footprint_grow=1)),
        "exact_edges_varying": (edged, varying, grown),
        "exact_no_negative": (np.abs(img), psf, dict(background=None)),
    }
    for key, (im, p, kw) in cases.items():
        cats = {}
        for name in ("numpy", "device"):
            exp = Exposure.from_arrays(
                im,
                var,
                mask,
                psf=p,
                mask_planes=planes,
                backend=be if name == "device" else "numpy",
            )
            r = detect_sources(exp, polarity="both", **kw)
            cats[name] = (r.catalog, r.mask.get() if name == "device" else r.mask)
        (a, ma), (b, mb) = cats["numpy"], cats["device"]
        # The adaptive moments of a stamp depend in their last bits on which other stamps
        # share its batch (the NumPy twin's GEMM over stamps rounds by its column count,
        # measured ~1e-15 relative), and the canvas batches both polarities together:
        # those columns agree to 1e-12, every other one bit for bit.
        moments = ("ixx", "iyy", "ixy", "extendedness")
        res[f"{key}_mismatch"] = [
            c
            for c in a.colnames
            if a[c].dtype != b[c].dtype
            or not (
                np.allclose(a[c], b[c], rtol=1e-12, atol=0, equal_nan=True)
                if key != "exact" and c in moments
                else np.array_equal(
                    np.asarray(a[c]), np.asarray(b[c]), equal_nan=np.asarray(a[c]).dtype.kind == "f"
                )
            )
        ] + ([] if np.array_equal(ma, mb) else ["mask"])
        res[f"{key}_n"] = len(a)
        res[f"{key}_n_negative"] = int(np.sum(a["flag_negative"]))
        res[f"{key}_edge"] = int(np.sum(a["flag_edge"]))
    res["violations"] = len(sd.VIOLATIONS)
    Path(out_path).write_text(json.dumps(res))


counts = child_fixture("test_device_budgets")


def test_no_device_violation(counts):
    assert counts["violations"] == 0


def test_device_detection_is_the_numpy_detection_bit_for_bit(counts):
    assert counts["exact_n"] > 20 and counts["exact_mismatch"] == []


@pytest.mark.parametrize("key", ["exact_edges_varying", "exact_no_negative"])
def test_device_canvas_detection_is_the_numpy_detection(counts, key):
    """Both polarities on one device canvas give the per-polarity catalog (bit for bit but
    for the adaptive moments' last bits), at the edges facing the canvas's gap, with grown
    footprints and a varying PSF, and with one polarity empty."""
    assert counts[f"{key}_n"] > 20 and counts[f"{key}_mismatch"] == []
    if key == "exact_no_negative":
        assert counts[f"{key}_n_negative"] == 0
    else:
        assert counts[f"{key}_n_negative"] > 5 and counts[f"{key}_edge"] >= 3


def test_detection_cost_does_not_grow_with_the_sources(counts):
    few, many = counts["detect_positive_30"], counts["detect_positive_300"]
    assert many["n"] > 3 * few["n"] > 0  # the scenes differ where it matters
    assert (many["calls"], many["syncs"]) == (few["calls"], few["syncs"])
    few, many = counts["detect_both_30"], counts["detect_both_300"]
    assert many["n_negative"] > 3 * few["n_negative"] > 0
    assert (many["calls"], many["syncs"]) == (few["calls"], few["syncs"])
    assert counts["detect_grow_300"] == counts["detect_grow_30"]


@pytest.mark.parametrize("n_stars", [30, 300])
def test_detection_budget(counts, n_stars):
    """Measured (384², every launch of detect_sources, ~20 launches and 6 syncs of them in
    ops/convolution's matched filter): positive with the background 292 calls / 12 syncs,
    both polarities 357 / 16, grown footprints 312 / 13 (were ~540 / 51 for positive).
    Both polarities as one canvas (gpudiff.ops.detection_canvas, issue 16): 191 calls and 4
    syncs, what one polarity costs (positive, with its background: 189 / 5)."""
    pos, both = counts[f"detect_positive_{n_stars}"], counts[f"detect_both_{n_stars}"]
    assert pos["calls"] <= 300 and pos["syncs"] <= 12
    assert both["calls"] <= 200 and both["syncs"] <= 4
    grow = counts[f"detect_grow_{n_stars}"]
    assert grow["calls"] <= 320 and grow["syncs"] <= 13


@pytest.mark.parametrize("n_stars", [30, 300])
def test_bin_background_budget(counts, n_stars):
    """Every bin clipped at once, one transfer: 86 calls, 1 sync (were 183 and 3)."""
    c = counts[f"bin_background_{n_stars}"]
    assert c["calls"] <= 88 and c["syncs"] == 1


@pytest.mark.parametrize("r", [1, 2, 5, 10])
def test_dilate_disk_passes(counts, r):
    """4r + 3 launches (were two per disk pixel, ~2πr²), no sync."""
    assert counts[f"dilate_{r}"] == {"calls": 4 * r + 3, "syncs": 0}


def test_peaks_budget(counts):
    """Every window offset in one gather: the same launches for radius 1 and 3 (were ~5
    per offset), two syncs (the footprint pixels' and the plateaus' counts)."""
    assert counts["peaks_1"] == counts["peaks_3"]
    assert counts["peaks_1"]["calls"] <= 21 and counts["peaks_1"]["syncs"] == 2

"""Defects before every convolution (issue 14): interpolation, mask growth, background.

The op (:func:`gpudiff.ops.interpolate_over_defects`) is tested on smooth images with
known truth; the tasks on :func:`gpudiff.sim.realistic_raw_pair` pairs, which carry
garbage-valued bad columns, saturated Moffat-wing stars, a satellite trail, a residual
sky plane of 0.3σ, masked and unmasked cosmic rays and a NO_DATA strip.  The measurement
helpers (:func:`measure_pair`) are shared with the 2048² evidence script
(``bench/evidence_dia.py``), whose numbers are in the report.
"""

from __future__ import annotations

import functools
import logging

import numpy as np
import pytest

from gpudiff.image import Box, MaskedImage
from gpudiff.ops.interpolate import interpolate_over_defects
from gpudiff.sim import realistic_raw_pair
from gpudiff.tasks import (
    AlardLuptonPreconvolveSubtractConfig,
    AlardLuptonPreconvolveSubtractTask,
    AlardLuptonSubtractConfig,
    AlardLuptonSubtractTask,
)
from gpudiff.tasks.detect_and_measure import DetectAndMeasureScoreTask, DetectAndMeasureTask
from gpudiff.tasks.masks import convolve_preserving, quiet_fills

IQR_TO_SIGMA = 0.741301109


# --- the op --------------------------------------------------------------------------------


def _smooth_scene(n=256, seed=0, noise=1.0):
    """A smooth sky (plane + gentle quadratic) with one Gaussian star, and its noisy image."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[:n, :n].astype(np.float64)
    truth = 100 + 0.05 * x - 0.03 * y + 2e-4 * (x - n / 2) ** 2
    truth += 40 * np.exp(-((x - 0.3 * n) ** 2 + (y - 0.6 * n) ** 2) / (2 * 3.0**2))
    img = (truth + rng.normal(0, noise, truth.shape)).astype(np.float32)
    return truth, img


def test_garbage_column_filled_within_noise_without_step():
    truth, img = _smooth_scene()
    n = img.shape[0]
    rng = np.random.default_rng(1)
    mi0 = MaskedImage(img, np.ones_like(img))
    bad_bit = mi0.mask_planes.bitmask("BAD")
    mask = np.zeros(img.shape, np.int32)
    c = 100
    garbage = img.copy()
    garbage[:, c] = rng.uniform(-500, 3e5, n).astype(np.float32)  # raw CCD garbage
    mask[:, c] = bad_bit
    garbage[40:70, 180:230] = np.nan  # a NO_DATA blob (non-finite)
    var = np.ones_like(img)
    mi = MaskedImage(garbage, var, mask)
    before = (
        np.asarray(mi.image).copy(),
        np.asarray(mi.variance).copy(),
        np.asarray(mi.mask).copy(),
    )
    out = interpolate_over_defects(mi, fwhm=7.0)
    # Inputs unmodified (NaN-aware).
    np.testing.assert_array_equal(np.asarray(mi.image), before[0])
    np.testing.assert_array_equal(np.asarray(mi.mask), before[2])
    o = np.asarray(out.image)
    assert np.isfinite(o).all() and np.isfinite(np.asarray(out.variance)).all()
    # The column: the mean of two noisy neighbours has σ = 1/√2 about the truth; away from
    # the star (where the curvature of a 3-px Gaussian adds up to 2.7) every filled value
    # is within 4σ·(1/√2) ≈ 2.9 of the truth and the rms is ~0.71.
    rows = np.abs(np.arange(n) - 0.6 * n) > 12
    err = o[rows, c] - truth[rows, c]
    assert np.abs(err).max() < 4 / np.sqrt(2), np.abs(err).max()
    assert np.sqrt(np.mean(err**2)) == pytest.approx(1 / np.sqrt(2), rel=0.15)
    # No step: the mean of the filled column equals the mean of its neighbours' truth
    # within the error of the mean (σ/√n ≈ 0.05; 0.2 allowed), where a median fill is off by
    # the sky gradient's full range (~10 here).
    assert abs(np.mean(err)) < 0.2
    # The blob (30×50, filled by smoothed neighbourhood or 1/L²-weighted lines): within the
    # noise of a smooth sky (3σ) everywhere.
    blob = o[40:70, 180:230] - truth[40:70, 180:230]
    assert np.abs(blob).max() < 3.0, np.abs(blob).max()
    # INTRP marks exactly the filled pixels; original planes kept.
    intrp = (np.asarray(out.mask) & out.mask_planes.bitmask("INTRP")) != 0
    filled = (mask != 0) | ~np.isfinite(garbage)
    np.testing.assert_array_equal(intrp, filled)
    assert (np.asarray(out.mask)[:, c] & bad_bit).all()
    # Untouched pixels are bit-identical.
    np.testing.assert_array_equal(o[~filled], img[~filled])


def test_row_and_column_defects_and_clean_input():
    truth, img = _smooth_scene(seed=3)
    mi0 = MaskedImage(img, np.ones_like(img))
    assert interpolate_over_defects(mi0) is mi0  # nothing to fill: the same object
    mask = np.zeros(img.shape, np.int32)
    mask[120, 10:240] = mi0.mask_planes.bitmask("SAT")  # a bad row: filled from above/below
    mask[200:203, 50:53] = mi0.mask_planes.bitmask("CR")  # a small blob
    out = interpolate_over_defects(MaskedImage(img, np.ones_like(img), mask))
    o = np.asarray(out.image)
    err_row = o[120, 10:240] - truth[120, 10:240]
    away = np.abs(np.arange(10, 240) - 0.3 * 256) > 12
    assert np.abs(err_row[away]).max() < 4 / np.sqrt(2)
    assert np.abs(o[200:203, 50:53] - truth[200:203, 50:53]).max() < 3.0


def test_planes_selectable():
    _, img = _smooth_scene(seed=4)
    mi0 = MaskedImage(img, np.ones_like(img))
    mask = np.zeros(img.shape, np.int32)
    mask[:, 30] = mi0.mask_planes.bitmask("SUSPECT")
    mi = MaskedImage(img, np.ones_like(img), mask)
    assert interpolate_over_defects(mi) is mi  # SUSPECT is not a default plane
    out = interpolate_over_defects(mi, ["SUSPECT"])
    assert ((np.asarray(out.mask)[:, 30] & out.mask_planes.bitmask("INTRP")) != 0).all()


# --- tasks on realistic raw pairs ----------------------------------------------------------


def _defect_distance(pair):
    """Distance (px) of every science pixel from the nearest bad column of either image."""
    n = pair.science.shape[1]
    cols = np.array(
        list(pair.artefacts["bad_columns_science"]) + list(pair.artefacts["bad_columns_template"])
    )
    x = np.arange(n)
    d = np.abs(x[:, None] - cols[None, :]).min(axis=1) if cols.size else np.full(n, np.inf)
    return np.broadcast_to(d[None, :], pair.science.shape)


def _star_chi2_ratio(pair, z, defect, free, fwhm: float) -> float:
    """Median over bright non-variable, unsaturated stars (science S/N ≥ 50, peak below
    half the saturation level) of the mean z² of the unmasked pixels within 2 FWHM, over
    the source-free sky's mean z² (issue 14: ≤ 1.05).  Stars with a defect on > 20 % of
    those pixels or a transient within 4 FWHM are skipped."""
    t, a = pair.truth, pair.artefacts
    sig = a["science_fwhm"] / 2.3548
    f = np.asarray(t["flux_science"], float)
    snr = f / (a["sky_sigma_science"] * np.sqrt(4 * np.pi) * sig)  # Gaussian PSF S/N
    peak = f / (2 * np.pi * sig * sig)
    sel = (
        np.asarray(t["is_star"], bool)
        & ~np.asarray(t["is_transient"], bool)
        & (snr >= 50)
        & (peak < 0.5 * a["saturation"])
    )
    H, W = z.shape
    r = int(round(2 * fwhm))
    tr = pair.transients
    tx, ty = np.asarray(tr["x"], float), np.asarray(tr["y"], float)
    chis = []
    for x, y in zip(np.asarray(t["x"], float)[sel], np.asarray(t["y"], float)[sel]):
        xi, yi = int(round(x)), int(round(y))
        if not (r <= xi < W - r and r <= yi < H - r):
            continue
        if tx.size and np.min(np.hypot(tx - x, ty - y)) < 2 * r:
            continue
        zz = z[yi - r : yi + r + 1, xi - r : xi + r + 1]
        ok = ~defect[yi - r : yi + r + 1, xi - r : xi + r + 1] & np.isfinite(zz)
        if ok.sum() > 0.8 * ok.size:
            chis.append(float(np.mean(zz[ok] ** 2)))
    if len(chis) < 10:
        return float("nan")
    return float(np.median(chis) / np.mean(z[free] ** 2))


def measure_pair(
    pair, task: str = "subtract", mode: str = "auto", match_radius: float = 3.0, **cfg_kw
) -> dict:
    """Run a subtraction with the given task/mode and defaults otherwise; measure the sky of
    the difference, stripes beside bad columns, and the DIA catalog against the truth."""
    sci, tpl = pair.science, pair.template
    if task == "preconvolve":
        res = AlardLuptonPreconvolveSubtractTask(
            AlardLuptonPreconvolveSubtractConfig(mode=mode, **cfg_kw)
        ).run(tpl, sci)
        diff, score = res.difference, res.score_exposure
        # As the command line: the science sources flag bright-star halo residuals.
        dia = (
            DetectAndMeasureScoreTask()
            .run(diff, score, bright_sources=res.science_sources, science=sci, template=tpl)
            .dia_sources
        )
    else:
        res = AlardLuptonSubtractTask(AlardLuptonSubtractConfig(mode=mode, **cfg_kw)).run(tpl, sci)
        diff = res.difference
        dia = (
            DetectAndMeasureTask()
            .run(diff, bright_sources=res.science_sources, science=sci, template=tpl)
            .dia_sources
        )
    img, var, mask = (np.asarray(diff.image), np.asarray(diff.variance), np.asarray(diff.mask))
    z = img / np.sqrt(var)
    # Source-free sky: no source light above 1 % of the sky σ in either noiseless model (the
    # two images share the pixel grid), no mask bit, finite.
    s_sig = pair.artefacts["sky_sigma_science"]
    src = np.abs(pair.science_result.sources) + np.abs(pair.template_result.sources)
    # Cosmic rays the pipeline left unflagged (convolveTemplate keeps them sharp for the
    # DIA catalog's CR flag) are events, not sky: pixels within 2 px of a true one are out.
    from scipy import ndimage

    cr = pair.science_result.cr_mask | pair.template_result.cr_mask
    cr = ndimage.binary_dilation(cr, iterations=2) if cr.any() else cr
    free = (src < 0.01 * s_sig) & (mask == 0) & np.isfinite(z) & ~cr
    q1, med, q3 = np.percentile(z[free], [25, 50, 75])
    out = {
        "mode": res.metadata.get("mode"),
        "sky_std": IQR_TO_SIGMA * (q3 - q1),
        "sky_median": med,
        "n_sky": int(free.sum()),
    }
    if task == "preconvolve":
        zs = np.asarray(score.image) / np.sqrt(np.asarray(score.variance))
        fs = (src < 0.01 * s_sig) & (np.asarray(score.mask) == 0) & np.isfinite(zs) & ~cr
        q1, med, q3 = np.percentile(zs[fs], [25, 50, 75])
        out.update(score_std=IQR_TO_SIGMA * (q3 - q1), score_median=med)
    defect_bits = diff.mask_planes.bitmask_if_present(
        ["BAD", "SAT", "CR", "EDGE", "NO_DATA", "INTRP", "SUSPECT", "STREAK"]
    )
    out["star_chi2_ratio"] = _star_chi2_ratio(
        pair, z, (mask & defect_bits) != 0, free, float(diff.psf.fwhm())
    )
    near = (_defect_distance(pair) <= 20) & (mask == 0) & np.isfinite(z) & ~cr
    out["stripe_max"] = float(np.abs(z[near]).max()) if near.any() else 0.0
    out["stripe_n"] = int(near.sum())
    out["stripe_free_max"] = float(np.abs(z[near & free]).max()) if (near & free).any() else 0.0
    # DIA catalog against the injected changes.
    tt = pair.transients
    tx, ty = np.asarray(tt["x"], float), np.asarray(tt["y"], float)
    clean = (
        np.asarray(dia["clean"], bool)
        if "clean" in dia.colnames
        else ~np.any(
            [np.asarray(dia[c], bool) for c in dia.colnames if c.startswith("flag_")], axis=0
        )
    )
    dx, dy = np.asarray(dia["x"], float), np.asarray(dia["y"], float)
    if len(dia) and len(tt):
        d = np.hypot(dx[:, None] - tx[None, :], dy[:, None] - ty[None, :])
        matched_src = d.min(axis=1) <= match_radius
        nearest = d.argmin(axis=0)
        found = d.min(axis=0) <= match_radius
    else:
        matched_src = np.zeros(len(dia), bool)
        nearest = np.zeros(len(tt), int)
        found = np.zeros(len(tt), bool)
    mpix = sci.shape[0] * sci.shape[1] / 1e6
    out["n_dia"] = len(dia)
    out["n_clean"] = int(clean.sum())
    out["false_clean"] = int((clean & ~matched_src).sum())
    out["false_clean_per_mpix"] = out["false_clean"] / mpix
    out["false_all_per_mpix"] = int((~matched_src).sum()) / mpix
    snr = np.asarray(tt["snr"], float)
    nd = ~np.asarray(tt["near_defect"], bool)
    found_clean = found & (clean[nearest] if len(dia) else False)
    sel8 = snr >= 8
    out["n_snr8"] = int(sel8.sum())
    out["completeness_snr8"] = float(found_clean[sel8].mean()) if sel8.any() else float("nan")
    out["completeness_snr8_away"] = (
        float(found_clean[sel8 & nd].mean()) if (sel8 & nd).any() else float("nan")
    )
    # Injections whose centre lies on a pixel a defect reached (the difference's flagging
    # planes, grown by every kernel) cannot be clean by construction (issue 14, item 1).
    fmask = diff.masked_image.mask_planes.bitmask_if_present(
        ["BAD", "SAT", "CR", "EDGE", "NO_DATA", "SUSPECT", "INTRP"]
    )
    ix = np.clip(np.rint(tx).astype(int) - sci.bbox.x0, 0, mask.shape[1] - 1)
    iy = np.clip(np.rint(ty).astype(int) - sci.bbox.y0, 0, mask.shape[0] - 1)
    reached = (mask[iy, ix] & fmask) != 0
    out["completeness_snr8_unmasked"] = (
        float(found_clean[sel8 & ~reached].mean()) if (sel8 & ~reached).any() else float("nan")
    )
    # The simulator's S/N is the injection's in the science image alone; the difference
    # adds the template's noise (and convolveScience the kernel's), so an injection of
    # science S/N 10 can be a 5σ event in the difference.  The S/N the difference itself
    # affords: PSF-optimal, from its PSF and its variance plane's median around the
    # position (21² box).
    snr_d = np.full(len(tt), np.nan)
    h = 10
    for k in range(len(tt)):
        r0, c0 = int(iy[k]), int(ix[k])
        v = var[max(r0 - h, 0) : r0 + h + 1, max(c0 - h, 0) : c0 + h + 1]
        v = v[np.isfinite(v) & (v > 0)]
        if v.size:
            p = np.asarray(diff.psf.kernel_image(float(tx[k]), float(ty[k])), dtype=np.float64)
            p = p / p.sum()
            snr_d[k] = abs(float(tt["delta_flux"][k])) * np.sqrt((p * p).sum() / np.median(v))
    out["snr_difference"] = snr_d
    seld = snr_d >= 8
    out["n_snr8_difference"] = int(seld.sum())
    out["completeness_snr8_difference"] = (
        float(found_clean[seld].mean()) if seld.any() else float("nan")
    )
    bright = (snr > 20) & found
    if bright.any():
        f = np.asarray(dia["psf_flux"], float)[nearest[bright]]
        fe = np.asarray(dia["psf_flux_err"], float)[nearest[bright]]
        truth_f = np.asarray(tt["delta_flux"], float)[bright]
        out["flux_ratio_median"] = float(np.median(f / truth_f))
        pulls = (f - truth_f) / fe
        qa, qb = np.percentile(pulls, [25, 75])
        out["pull_std"] = float(IQR_TO_SIGMA * (qb - qa))
        out["n_bright"] = int(bright.sum())
    out["kernel_sum"] = res.metadata.get("kernel_sum")
    out["n_interpolated"] = (
        res.metadata.get("n_interpolated_science"),
        res.metadata.get("n_interpolated_template"),
    )
    return out


#: 1024² realistic pairs, both PSF orderings (science 40 % broader: convolveTemplate under
#: auto; 25 % narrower: convolveScience).  The 2048² measurement is the evidence script's;
#: the thresholds are per pixel or per Mpix, so they carry over.
_SIZE = 1024


@functools.lru_cache(maxsize=None)
def _raw_pair(ratio):
    return realistic_raw_pair(_SIZE, science_fwhm_ratio=ratio, seed=14)


@functools.lru_cache(maxsize=None)
def _measured(ratio, task="subtract"):
    return measure_pair(_raw_pair(ratio), task=task)


@pytest.mark.slow
@pytest.mark.parametrize("ratio", [1.4, 0.75], ids=["broader", "narrower"])
def test_difference_sky_stripes_and_background(ratio):
    m = _measured(ratio)
    assert m["mode"] == ("convolveTemplate" if ratio > 1 else "convolveScience")
    # Source-free sky in units of its variance plane: 1.00 ± 0.03 (issue 14's target; the
    # IQR estimate from ~7e5 pixels scatters by < 0.5 %), median within 0.02σ of zero (the
    # +0.3σ / −0.15σ residual sky planes of the inputs must be gone: the fitted background
    # and the residual background of the difference are subtracted by default).
    assert m["sky_std"] == pytest.approx(1.0, abs=0.03), m
    assert abs(m["sky_median"]) < 0.02, m
    # No ±stripes beside the garbage columns: within 20 px of a bad column, every unmasked
    # source-free pixel is below 5σ (≈1e5 pixels of N(0, 1) reach ~4.5σ; the garbage
    # spread by the kernel gave ±15σ before interpolation).
    assert m["stripe_free_max"] < 5.0, m
    # Bright non-variable stars subtract to the noise: the median χ² per pixel within 2 FWHM
    # over the sky's ≤ 1.05 (issue 14's target; measured 0.999 and 0.974 on these pairs,
    # the median of ~50-pixel means of χ² sits ~1 % below their mean).
    assert m["star_chi2_ratio"] <= 1.05, m
    # DIA sources that are clean but match no injected change: issue 14's target is ≤ 2
    # per Mpix (measured 0 and 1.9 on these pairs; ~120 per Mpix before this work).
    assert m["false_clean_per_mpix"] <= 2.0, m


@pytest.mark.slow
def test_background_departure_from_lsst_default():
    """LSST leaves the fitted background in (its calexps are sky-subtracted); gpudiff
    subtracts it by default.  With LSST's setting the +0.3σ_S / −0.15σ_T residual sky
    planes of the inputs stay in the difference."""
    assert AlardLuptonSubtractConfig().do_subtract_background is True
    pair = _raw_pair(0.75)
    off = (
        AlardLuptonSubtractTask(
            AlardLuptonSubtractConfig(
                mode="auto", do_subtract_background=False, do_decorrelation=False
            )
        )
        .run(pair.template, pair.science)
        .difference
    )
    src = np.abs(pair.science_result.sources) + np.abs(pair.template_result.sources)
    z = np.asarray(off.image) / np.sqrt(np.asarray(off.variance))
    free = (
        (src < 0.01 * pair.artefacts["sky_sigma_science"])
        & (np.asarray(off.mask) == 0)
        & np.isfinite(z)
    )
    # (0.3·26.1 + 0.15·20.4)/√(26.1² + 20.4²) ≈ 0.33σ of the difference at the centre:
    # more than 0.2σ is left without background subtraction, < 0.02σ with it (above).
    assert abs(float(np.median(z[free]))) > 0.2
    assert abs(_measured(0.75)["sky_median"]) < 0.02


@pytest.mark.slow
def test_preconvolve_difference_and_score():
    m = _measured(1.4, "preconvolve")
    # The plain difference returned beside the score, and the score itself: unit-variance
    # sky, median within 0.02σ (the residual background is removed from both).
    assert m["sky_std"] == pytest.approx(1.0, abs=0.03), m
    assert abs(m["sky_median"]) < 0.02, m
    assert m["score_std"] == pytest.approx(1.0, abs=0.03), m
    assert abs(m["score_median"]) < 0.02, m
    assert m["stripe_free_max"] < 5.0, m
    assert m["false_clean_per_mpix"] <= 2.0, m


def test_sharper_science_under_convolve_template_warns(caplog):
    pair = realistic_raw_pair(256, science_fwhm_ratio=0.75, few_stars=False, seed=2, trail=False)
    with caplog.at_level(logging.WARNING, logger="gpudiff.tasks.subtract"):
        res = AlardLuptonSubtractTask(AlardLuptonSubtractConfig(mode="convolveTemplate")).run(
            pair.template, pair.science
        )
    assert res.metadata["science_sharper_than_template"] is True
    assert any("sharper than the template" in r.getMessage() for r in caplog.records)
    ok = AlardLuptonSubtractTask(AlardLuptonSubtractConfig(mode="auto")).run(
        pair.template, pair.science
    )
    assert ok.metadata["science_sharper_than_template"] is False


def test_masks_grown_and_inputs_unchanged():
    """Every pixel the matching kernel carried a defect's value to is flagged: where the
    BAD column of the science (convolveScience) was filled over a source (not within 3σ
    of the sky) it is dilated by the kernel's half-width at least; where it was filled
    within the noise it keeps its bits at the column (docs/algorithms.md §14); INTRP marks
    the interpolated pixels of both inputs in the difference."""
    pair = realistic_raw_pair(384, science_fwhm_ratio=0.75, seed=6, trail=False)
    sci, tpl = pair.science, pair.template
    before = [np.asarray(a).copy() for e in (sci, tpl) for a in (e.image, e.variance, e.mask)]
    task = AlardLuptonSubtractTask(AlardLuptonSubtractConfig(mode="auto"))
    prepared = task._prepare(tpl, sci).science.masked_image
    quiet = np.asarray(quiet_fills(prepared))
    res = task.run(tpl, sci)
    after = [np.asarray(a) for e in (sci, tpl) for a in (e.image, e.variance, e.mask)]
    for b, a in zip(before, after):
        np.testing.assert_array_equal(a, b)
    assert res.mode == "convolveScience"
    d = res.difference
    bad = (np.asarray(d.mask) & d.mask_planes.bitmask("BAD")) != 0
    intrp = (np.asarray(d.mask) & d.mask_planes.bitmask("INTRP")) != 0
    half = res.psf_matching_kernel.shape[1] // 2
    n_loud = n_narrow = 0
    for c in pair.artefacts["bad_columns_science"]:
        lo, hi = max(c - half, 0), min(c + half + 1, d.shape[1])
        # Rows within a kernel half-height of a loud fill received its value.
        loud = ~quiet[:, c]
        reached = np.convolve(loud, np.ones(2 * half + 1), mode="same") > 0
        rows = np.arange(half, d.shape[0] - half)
        assert bad[rows, c].all() and intrp[rows, c].all()
        r = rows[reached[rows]]
        assert bad[np.ix_(r, np.arange(lo, hi))].all() and intrp[np.ix_(r, np.arange(lo, hi))].all()
        n_loud += r.size
        # Rows no loud fill reached: the band is the column ± the decorrelation's reach.
        q = rows[~reached[rows]]
        n_narrow += int((~bad[q, c + half]).sum())
    assert n_narrow > 100, (n_loud, n_narrow)
    # The rule itself, on the prepared science with the fitted kernel: a fill 50σ above the
    # sky (as over a star) on rows 150-154 of a column is grown by the whole kernel box;
    # the quiet rest of the column is not; quiet_fill_snr=None grows all (LSST).
    kernel = res.psf_matching_kernel
    c = pair.artefacts["bad_columns_science"][0]
    img = np.asarray(prepared.image).copy()
    img[150:155, c] += 50 * np.sqrt(np.asarray(prepared.variance)[150:155, c])
    loud_mi = MaskedImage(
        img,
        np.asarray(prepared.variance),
        np.asarray(prepared.mask),
        xy0=prepared.xy0,
        mask_planes=prepared.mask_planes,
    )
    grown = {}
    for snr in (3.0, None):
        out = convolve_preserving(kernel, loud_mi, (), quiet_fill_snr=snr)
        grown[snr] = (np.asarray(out.mask) & out.mask_planes.bitmask("BAD")) != 0
    box = np.arange(c - half, c + half + 1)
    assert grown[3.0][np.ix_(np.arange(150 - half, 155 + half), box)].all()
    assert not grown[3.0][150 + 2 * half : 300, c + half].any()
    assert grown[None][half:-half][:, box].all()
    for c in pair.artefacts["bad_columns_template"]:
        assert bad[:, c].all() and intrp[:, c].all()
    assert (
        res.metadata["n_interpolated_science"] > 0 and res.metadata["n_interpolated_template"] > 0
    )


def _with_point_sources(exp, xys, flux):
    """``exp`` (a copy) with PSF-shaped point sources of ``flux`` added at integer parent
    positions ``xys``; the variance gains their Poisson part (gain 1)."""
    from gpudiff.image import Exposure

    mi = exp.masked_image
    img, var = np.asarray(mi.image).copy(), np.asarray(mi.variance).copy()
    for x, y in xys:
        k = np.asarray(exp.psf.kernel_image(float(x), float(y)), dtype=np.float64)
        k = k / k.sum()
        h = k.shape[0] // 2
        r, c = y - mi.xy0[1], x - mi.xy0[0]
        img[r - h : r + h + 1, c - h : c + h + 1] += (flux * k).astype(np.float32)
        var[r - h : r + h + 1, c - h : c + h + 1] += (flux * k).astype(np.float32)
    out = MaskedImage(img, var, np.asarray(mi.mask), xy0=mi.xy0, mask_planes=mi.mask_planes)
    return Exposure(out, exp.psf, exp.wcs, exp.photo_calib, exp.metadata)


def test_well_filled_column_reach():
    """docs/algorithms.md §14: a template bad column filled within the noise is not grown by
    the matching kernel's box (LSST: ±10 px here), only by the decorrelation filter's
    footprint, so a transient 6 px from it is clean; one whose centre is on the column's
    band is flagged.  Beside the column no unmasked pixel carries its ringing (< 5σ)."""
    pair = realistic_raw_pair(384, science_fwhm_ratio=1.4, seed=6, trail=False)
    c = pair.artefacts["bad_columns_template"][0]
    sig = pair.artefacts["sky_sigma_science"]
    src = np.abs(pair.science_result.sources) + np.abs(pair.template_result.sources)
    # Two rows with no source light within 15 px of the column and 40 px apart.
    quiet = np.flatnonzero(
        np.array(
            [src[max(y - 15, 0) : y + 16, c - 15 : c + 16].max() < 0.01 * sig for y in range(384)]
        )
    )
    quiet = quiet[(quiet > 40) & (quiet < 344)]
    y_out = int(quiet[0])
    y_in = int(quiet[np.flatnonzero(quiet >= y_out + 40)[0]])
    flux = 30.0 * sig * np.sqrt(4 * np.pi) * pair.science.psf.fwhm() / 2.3548  # S/N ≈ 30
    sci = _with_point_sources(pair.science, [(c + 6, y_out), (c + 1, y_in)], flux)
    res = AlardLuptonSubtractTask(AlardLuptonSubtractConfig(mode="auto")).run(pair.template, sci)
    assert res.mode == "convolveTemplate"
    half = res.psf_matching_kernel.shape[1] // 2
    assert half >= 8
    d = res.difference
    mask = np.asarray(d.mask)
    bad = (mask & d.mask_planes.bitmask("BAD")) != 0
    # The quiet rows' BAD band: the column ± the decorrelation filter's reach (≤ 2 px),
    # not ± the kernel's half-width.
    for y in (y_out, y_in):
        xs = c - 20 + np.flatnonzero(bad[y - d.bbox.y0, c - 20 : c + 21])
        assert xs.min() >= c - 2 and xs.max() <= c + 2, (y, xs)
    # No ringing outside the band: unmasked pixels within 20 px of the column, away from
    # the two injections and from true cosmic rays (events, not ringing), stay below 5σ.
    from scipy import ndimage

    cr = ndimage.binary_dilation(
        pair.science_result.cr_mask | pair.template_result.cr_mask, iterations=2
    )
    z = np.asarray(d.image) / np.sqrt(np.asarray(d.variance))
    near = np.zeros(mask.shape, bool)
    near[:, c - 20 : c + 21] = True
    for y in (y_out, y_in):
        near[y - 12 : y + 13] = False
    free = near & (mask == 0) & (src < 0.01 * sig) & np.isfinite(z) & ~cr
    assert free.sum() > 1000 and np.abs(z[free]).max() < 5.0
    dia = DetectAndMeasureTask().run(d, bright_sources=res.science_sources).dia_sources
    dx, dy = np.asarray(dia["x"], float), np.asarray(dia["y"], float)
    out = np.argmin(np.hypot(dx - (c + 6), dy - y_out))
    inn = np.argmin(np.hypot(dx - (c + 1), dy - y_in))
    assert np.hypot(dx[out] - (c + 6), dy[out] - y_out) < 2 and dia["clean"][out], dia[out]
    assert np.hypot(dx[inn] - (c + 1), dy[inn] - y_in) < 2 and dia["flag_masked"][inn]


def test_defects_seed_no_rays_and_ray_fills_are_not_quiet():
    """A garbage bad column is as sharp as a cosmic ray: the input's ray finder must not
    seed on it (its grown "rays" would mark the clean neighbours INTRP without BAD, which
    the matching kernel then grows by its whole box; a realistic 2048² pair lost 4
    transients 3-11 px from a template column so).  And only BAD fills are quiet (kept
    at their pixels): a cosmic ray's fill is grown by the kernel's core (a track found in
    part on the shared DECam cutouts left a clean S/N -13 residual when its fill was not
    grown at all; docs/algorithms.md §14)."""
    from gpudiff.image.psf import GaussianPsf
    from gpudiff.ops.cosmic_rays import find_cosmic_rays

    rng = np.random.default_rng(3)
    n, c = 96, 40
    img = rng.normal(0.0, 1.0, (n, n)).astype(np.float32)
    img[:, c] = rng.uniform(1e3, 5e3, n).astype(np.float32)  # garbage
    mi = MaskedImage(img, np.ones((n, n), np.float32), np.zeros((n, n), np.int32))
    planes = mi.mask_planes
    mask = np.zeros((n, n), np.int32)
    mask[:, c] = planes.bitmask("BAD")
    mi = MaskedImage(img, np.ones((n, n), np.float32), mask, mask_planes=planes)
    psf = GaussianPsf(1.5)
    seeded = np.asarray(find_cosmic_rays(mi, psf))
    assert seeded[:, c - 1].all() and seeded[:, c + 1].all()  # what the exclusion prevents
    cr = np.asarray(find_cosmic_rays(mi, psf, exclude_planes=("BAD", "SAT", "NO_DATA")))
    assert not cr[:, c - 1 : c + 2].any()
    # The prepared template of a realistic pair: its BAD columns' neighbours are not
    # filled (no INTRP outside the columns there, away from true cosmic rays).
    pair = realistic_raw_pair(384, science_fwhm_ratio=1.4, seed=6, trail=False)
    task = AlardLuptonSubtractTask(AlardLuptonSubtractConfig(mode="auto"))
    prepared = task._prepare(pair.template, pair.science).template.masked_image
    m = np.asarray(prepared.mask)
    intrp = (m & prepared.mask_planes.bitmask("INTRP")) != 0
    true_cr = pair.template_result.cr_mask
    for col in pair.artefacts["bad_columns_template"]:
        for side in (col - 1, col + 1):
            rows = ~np.convolve(true_cr[:, side], np.ones(5), mode="same").astype(bool)
            assert not intrp[rows, side].any(), col
    # Fills within the noise: a BAD one is quiet, a cosmic ray's (INTRP only) is not.
    fill = np.zeros((n, n), np.int32)
    fill[10:20, 10] = planes.bitmask("BAD") | planes.bitmask("INTRP")
    fill[30:33, 50:53] = planes.bitmask("INTRP")
    sky = rng.normal(0.0, 1.0, (n, n)).clip(-2.5, 2.5).astype(np.float32)
    q = np.asarray(
        quiet_fills(MaskedImage(sky, np.ones((n, n), np.float32), fill, mask_planes=planes))
    )
    assert q[10:20, 10].all() and not q[30:33, 50:53].any()


def test_ray_fills_grow_by_the_kernel_core():
    """docs/algorithms.md §14: a filled cosmic ray (INTRP and CR) is grown by the matching
    kernel's core (|K| ≥ ``CR_FILL_CORE`` = 5 % of its peak), not by its whole box (LSST;
    ``cr_fill_core=None`` restores it), while an unfilled defect (BAD, garbage left in)
    keeps the box.  The core is where a part of the track the finder missed is spread to:
    a 6σ pixel beside the fill peaks inside the grown mask and leaves < 0.2σ outside it."""
    from gpudiff.psfmatch.basis import KernelBasis
    from gpudiff.psfmatch.spatial import SpatialFunctions, SpatialKernel
    from gpudiff.tasks.masks import CR_FILL_CORE, cosmic_ray_fills, kernel_core

    n, half = 128, 10
    yy, xx = np.mgrid[-half : half + 1, -half : half + 1]
    gauss = np.exp(-0.5 * (xx**2 + yy**2) / 1.2**2)
    gauss /= gauss.sum()
    box = Box(0, 0, n, n)
    kernel = SpatialKernel(
        KernelBasis(gauss[None], "alard-lupton"),
        np.array([[1.0]]),
        SpatialFunctions("polynomial", 0, box),
    )
    core = kernel_core(kernel)
    # The 5 % level of a σ = 1.2 px Gaussian lies at r = 1.2·√(2 ln 20) = 2.94 px.
    r_expect = 1.2 * np.sqrt(2.0 * np.log(1.0 / CR_FILL_CORE))
    r_core = np.hypot(xx, yy)[core].max()
    assert r_expect - 0.6 <= r_core <= r_expect + 0.01 and core.sum() < 0.15 * core.size
    rng = np.random.default_rng(5)
    img = rng.normal(0.0, 1.0, (n, n)).astype(np.float32)
    mi0 = MaskedImage(img, np.ones((n, n), np.float32), np.zeros((n, n), np.int32))
    planes = mi0.mask_planes
    mask = np.zeros((n, n), np.int32)
    ray = (slice(40, 41), slice(30, 38))  # a filled 8-px track
    mask[ray] = planes.bitmask("CR") | planes.bitmask("INTRP")
    mask[90, 90] = planes.bitmask("BAD")  # garbage left in: LSST's growth
    img[90, 90] = 1e4
    img[40, 38] = 6.0  # the next pixel of the track, missed by the finder
    mi = MaskedImage(img, np.ones((n, n), np.float32), mask, mask_planes=planes)
    assert np.asarray(cosmic_ray_fills(mi)).sum() == 8
    cr_bit = planes.bitmask("CR")
    grown = {}
    for frac in (CR_FILL_CORE, None):
        out = convolve_preserving(kernel, mi, (), cr_fill_core=frac)
        grown[frac] = (np.asarray(out.mask) & cr_bit) != 0
        bad = (np.asarray(out.mask) & planes.bitmask("BAD")) != 0
        assert bad[90 - half : 91 + half, 90 - half : 91 + half].all()  # box, both ways
    from scipy import ndimage

    dist = ndimage.distance_transform_edt((mask & cr_bit) == 0)
    ray_core = grown[CR_FILL_CORE]
    assert ray_core[dist <= r_expect - 0.6].all() and not ray_core[dist > r_expect + 0.1].any()
    assert grown[None][30:51, 20:48].all()  # the whole 21² box around the track
    # What the missed pixel leaves beyond the grown core (noise-free check): its peak, where
    # a record of it would be centred, lies inside the grown plane; outside, < 0.2σ per
    # pixel, far below a detection (a 6σ pixel is twice what the finder's extension pass,
    # INPUT_CR_EXTEND_SIGMA = 3σ, can leave beside a found track).
    missed = np.zeros((n, n), np.float32)
    missed[40, 38] = 6.0
    spread = kernel.convolve(MaskedImage(missed, np.ones((n, n), np.float32)))
    out = np.asarray(spread.image)[half:-half, half:-half]  # edges are NaN (afw)
    inner = ray_core[half:-half, half:-half]
    peak = np.unravel_index(np.argmax(out), out.shape)
    assert inner[peak]
    assert np.abs(out[~inner]).max() < 0.2


def test_input_ray_finder_ignores_the_sky_level():
    """The inputs may carry their sky (a plain FITS image): the ray tests compare a pixel
    with ``ratio`` times its neighbours, so the sky must go first.  On a sky of 1000
    (σ = 32) 15σ single-pixel rays are all found with ``subtract_sky`` and no other pixel;
    without it some are missed (the sky raises the excess a ray needs)."""
    from gpudiff.image.psf import GaussianPsf
    from gpudiff.ops.cosmic_rays import find_cosmic_rays

    rng = np.random.default_rng(11)
    n, sig = 512, 32.0
    img = (1000.0 + rng.normal(0.0, sig, (n, n))).astype(np.float32)
    ys, xs = rng.integers(8, n - 8, 60), rng.integers(8, n - 8, 60)
    img[ys, xs] += 15 * sig
    var = np.full((n, n), sig * sig, np.float32)
    mi = MaskedImage(img, var, np.zeros((n, n), np.int32))
    psf = GaussianPsf(1.2)
    found = np.asarray(find_cosmic_rays(mi, psf, grow=0, subtract_sky=True))
    assert found[ys, xs].all() and found.sum() == len(set(zip(ys.tolist(), xs.tolist())))
    blind = np.asarray(find_cosmic_rays(mi, psf, grow=0))
    assert blind[ys, xs].sum() < found[ys, xs].sum()


def test_input_ray_finder_finds_faint_rays_and_no_stars():
    """The inputs' finder seeds rays at 5σ (``INPUT_CR_MIN_SIGMA``, not LSST's 6σ).  The
    sharpness test (pixel − 3σ > ratio × (mean of opposite neighbours + 3σ)) passes a
    5-6σ pixel only where its neighbours scatter low, as they do for some faint rays:
    such a 5.6σ hit with neighbours at −1.5σ is found at 5σ and missed at 6σ.  Neither
    the noise nor PSF stars (FWHM 2.74 px, peaks 10-160σ) are flagged."""
    from scipy import ndimage

    from gpudiff.image import Exposure
    from gpudiff.image.psf import GaussianPsf
    from gpudiff.ops.cosmic_rays import find_cosmic_rays
    from gpudiff.tasks.subtract_inputs import INPUT_CR_MIN_SIGMA, _new_cosmic_rays

    rng = np.random.default_rng(8)
    n = 256
    s_psf = 2.74 / 2.3548  # the sharper realistic pair's science PSF
    img = rng.normal(0.0, 1.0, (n, n)).clip(-3.5, 3.5)
    yy, xx = np.mgrid[0:n, 0:n]
    stars = [(40 + 35 * i, 60 + 30 * (i % 5), 10.0 * 2.0 ** (i % 5)) for i in range(6)]
    for x, y, peak in stars:
        img += peak * np.exp(-0.5 * ((xx - x) ** 2 + (yy - y) ** 2) / s_psf**2)
    hits = [(200, 30 + 40 * k) for k in range(5)]
    for x, y in hits:
        img[y - 1 : y + 2, x - 1 : x + 2] = -1.5
        img[y, x] = 5.6
    mi = MaskedImage(img.astype(np.float32), np.ones((n, n), np.float32))
    exp = Exposure(mi, GaussianPsf(s_psf))
    cr = np.asarray(_new_cosmic_rays(exp, mi.backend))
    at6 = np.asarray(find_cosmic_rays(mi, exp.psf, min_sigma=6.0, subtract_sky=True))
    assert INPUT_CR_MIN_SIGMA == 5.0
    for x, y in hits:
        assert cr[y, x] and not at6[y, x], (x, y)
    for x, y, _ in stars:
        assert not cr[y - 4 : y + 5, x - 4 : x + 5].any(), (x, y)
    _, n_found = ndimage.label(cr)
    assert n_found == len(hits)


def test_template_ray_fills_keep_their_cr_mark_and_tracks_are_found_whole():
    """The template's cosmic rays, found and filled by the task, keep CR beside INTRP
    through update_masks (which clears the template's CR plane, as LSST's): the matching
    kernel then grows them by its core (``cosmic_ray_fills``), not its whole box — a
    template ray 19 px from a S/N 38 transient of the broader realistic 2048² pair had
    flagged it INTRP.  The inputs' finder extends a ray along its track
    (``INPUT_CR_EXTEND_SIGMA``, LSST's ``cond3_fac2``): a track of 5σ pixels off one 40σ
    hit is found whole, where the per-pixel test alone finds the hit."""
    from gpudiff.backend import resolve_backend
    from gpudiff.image import Exposure
    from gpudiff.image.psf import GaussianPsf
    from gpudiff.tasks import AlardLuptonSubtractConfig
    from gpudiff.tasks.masks import cosmic_ray_fills
    from gpudiff.tasks.subtract_inputs import prepare_inputs

    rng = np.random.default_rng(3)
    n = 200
    psf = GaussianPsf(fwhm=3.0)
    yy, xx = np.mgrid[0:n, 0:n]
    sky = np.zeros((n, n))
    for x, y, f in zip(
        rng.uniform(20, 180, 60), rng.uniform(20, 180, 60), rng.uniform(2e2, 5e3, 60)
    ):
        sky += (
            f
            * np.exp(-0.5 * ((xx - x) ** 2 + (yy - y) ** 2) / (3.0 / 2.3548) ** 2)
            / (2 * np.pi * (3.0 / 2.3548) ** 2)
        )
    t_img = sky + rng.normal(0, 1, (n, n))
    s_img = sky + rng.normal(0, 1, (n, n))
    t_img[100, 60] += 40.0  # a hit, then a faint track of 5σ pixels along the diagonal
    track = [(100 + k, 60 + k) for k in range(1, 7)]
    for r, c in track:
        t_img[r, c] += 5.0
    t_img[150, 150] += 40.0  # a single-pixel ray
    ones = np.ones((n, n), np.float32)
    tmpl = Exposure(MaskedImage(t_img.astype(np.float32), ones), psf)
    sci = Exposure(MaskedImage(s_img.astype(np.float32), ones), psf)
    prep = prepare_inputs(tmpl, sci, AlardLuptonSubtractConfig(), resolve_backend("numpy"))
    t = prep.template.masked_image
    fills = np.asarray(cosmic_ray_fills(t))
    assert fills[150, 150] and fills[100, 60]
    found = sum(bool(fills[r, c]) for r, c in track)
    assert found == len(track), found
    # ... and nothing far from the rays (no star is a ray).
    far = np.ones((n, n), bool)
    far[95:112, 55:72] = False
    far[146:155, 146:155] = False
    assert not fills[far].any()

"""TractGrid, TractBackground, MatchBackgroundsTask API and errors, and the
``gpudiff match-backgrounds`` command, on a small tract (640², 2 × 2 patches of 320 px +
16 px overlap, 64-px bins) with three visits of unit-variance-scaled noise (σ = 10)."""

from __future__ import annotations

import numpy as np
import pytest
from astropy.io import fits
from astropy.table import Table

from gpudiff.cli import main
from gpudiff.errors import AllMaskedError, InvalidInputError, NoOverlapError
from gpudiff.image import Box, Exposure, read_exposure
from gpudiff.image.tract import TractGrid
from gpudiff.tasks.match_backgrounds import MatchBackgroundsConfig, MatchBackgroundsTask
from gpudiff.tasks.tract_background import TractBackground, TractBackgroundConfig

SIGMA = 10.0
TRACT = TractGrid.from_size(640, patch_inner=320, patch_overlap=16)
TB64 = TractBackgroundConfig(x_bin=64, y_bin=64)
# visit → (offset, x gradient, y gradient per 640 px, patches)
VISITS = {
    1: (0.0, 0.0, 0.0, (0, 1, 2, 3)),
    2: (200.0, 60.0, -30.0, (0, 1, 2, 3)),
    3: (-150.0, -40.0, 80.0, (0, 1, 3)),
}


def _truth(visit, box):
    off, gx, gy, _ = VISITS[visit]
    xx = np.arange(box.x0, box.x1)[None, :] / 640.0
    yy = np.arange(box.y0, box.y1)[:, None] / 640.0
    return (off + gx * xx + gy * yy).astype(np.float32)


def _stars(box, rng_seed=3):
    rng = np.random.default_rng(rng_seed)
    xs, ys, fs = rng.uniform(0, 640, 120), rng.uniform(0, 640, 120), rng.uniform(1e3, 3e4, 120)
    xx = np.arange(box.x0, box.x1)[None, :]
    yy = np.arange(box.y0, box.y1)[:, None]
    out = np.zeros(box.shape, np.float32)
    for x, y, f in zip(xs, ys, fs):
        if box.x0 - 10 < x < box.x1 + 10 and box.y0 - 10 < y < box.y1 + 10:
            out += (
                f / (2 * np.pi * 2.0**2) * np.exp(-((xx - x) ** 2 + (yy - y) ** 2) / 8.0)
            ).astype(np.float32)
    return out


@pytest.fixture(scope="module")
def warps():
    rng = np.random.default_rng(9)
    out = []
    for visit, (_, _, _, patches) in VISITS.items():
        for p in patches:
            b = TRACT.outer_box(p)
            img = _stars(b) + _truth(visit, b) + rng.normal(0, SIGMA, b.shape).astype(np.float32)
            hdr = fits.Header()
            hdr["VISIT"] = visit
            out.append(
                Exposure.from_arrays(
                    img, np.full(b.shape, SIGMA**2), xy0=(b.x0, b.y0), metadata=hdr, backend="numpy"
                )
            )
    return out


def _check_matched(res, warps, ref, tol=0.1):
    for w, m in zip(warps, res.matched_image_list):
        r = m.backend.asnumpy(m.image) - _stars(w.bbox) - _truth(ref, w.bbox)
        assert abs(float(np.median(r))) < tol * SIGMA


def test_tract_grid_geometry():
    t = TractGrid.from_size(1000, 900, patch_inner=400, patch_overlap=20, xy0=(100, 50))
    assert (t.n_patches_x, t.n_patches_y, t.n_patches) == (3, 3, 9)
    assert t.inner_box(0) == Box(100, 50, 500, 450)
    assert t.inner_box(8) == Box(900, 850, 1100, 950)  # the last patches are cut by the tract
    assert t.outer_box(0) == Box(100, 50, 520, 470)  # overlap clipped at the tract edge
    assert t.outer_box(4) == Box(480, 430, 920, 870)
    for p in t.patch_ids():
        assert t.patch_of(t.outer_box(p)) == p and t.patch_xy(p) == (p % 3, p // 3)
    with pytest.raises(NoOverlapError, match="not inside the tract"):
        t.patch_of(Box(0, 0, 10, 10))
    with pytest.raises(InvalidInputError):
        TractGrid(Box(0, 0, 10, 10), patch_inner=0)
    with pytest.raises(InvalidInputError):
        t.patch_xy(9)


def test_tract_background_accumulates_and_merges(backend, warps):
    """Accumulators add: one TractBackground fed two warps equals two merged ones; the
    windows of a warp in the middle of the tract reach one bin beyond its edges."""
    w0, w1 = warps[0].to_backend(backend), warps[1].to_backend(backend)
    both = TractBackground(TRACT, TB64, backend).add_warp(w0).add_warp(w1)
    a = TractBackground(TRACT, TB64, backend).add_warp(w0)
    b = TractBackground(TRACT, TB64, backend).add_warp(w1)
    a.merge(b)
    for name in ("values", "numbers", "variances", "x_sums", "y_sums"):
        np.testing.assert_allclose(getattr(a, name), getattr(both, name), rtol=1e-12)
    assert a.numbers.shape == (10, 10)
    # patch 0 covers x, y < 336: the window of bin 5 (288–416 px) reaches it, bin 6's not
    c = TractBackground(TRACT, TB64, backend).add_warp(w0)
    assert (
        (c.numbers[:6, 5] > 0).all()
        and not (c.numbers[:, 6:] > 0).any()
        and not (c.numbers[6:] > 0).any()
    )
    # a flat visit: the stats image is the level to the noise (bins of 128² px: σ/128)
    stats = TractBackground(TRACT, TB64, backend)
    for w in warps[:4]:
        stats.add_warp(w.to_backend(backend))
    img = stats.stats_image()
    assert np.abs(img - np.median(img)).max() < 0.1 * SIGMA  # stars are clipped out
    assert abs(np.median(img)) < 0.05 * SIGMA
    with pytest.raises(AllMaskedError):
        TractBackground(TRACT, TB64).stats_image()


def test_run_chooses_and_matches(backend, warps):
    res = MatchBackgroundsTask(MatchBackgroundsConfig(tract_bg_model=TB64), backend=backend).run(
        warps, TRACT
    )
    # visits 1 and 2 are complete and planar; 3 misses a patch: the coverage term loses it;
    # visit 1 and 2 tie on χ² (planes) and variance (σ² plus the gradient's spread, bigger for 2)
    assert res.reference_visit == 1
    assert res.reference_choice is not None and res.diagnostics.meta["reference_visit"] == 1
    _check_matched(res, [w.to_backend("numpy") for w in warps], 1)
    assert [b.visit for b in res.background_info_list] == [int(w.metadata["VISIT"]) for w in warps]


def test_ref_visit_override_and_inputs_untouched(warps):
    before = [w.image.copy() for w in warps]
    task = MatchBackgroundsTask(MatchBackgroundsConfig(tract_bg_model=TB64, ref_warp_visit=3))
    res = task.run(warps, TRACT)
    assert res.reference_visit == 3 and res.reference_choice is None
    _check_matched(res, warps, 3)
    res2 = task.run(warps, TRACT, ref_visit=2)  # the argument beats the config
    assert res2.reference_visit == 2
    _check_matched(res2, warps, 2)
    # visit 1's patch 2 has no visit-3 counterpart: matched through the tract model anyway
    for w, before_img in zip(warps, before):
        np.testing.assert_array_equal(w.image, before_img)
    # explicit visit ids instead of header cards
    res3 = MatchBackgroundsTask(MatchBackgroundsConfig(tract_bg_model=TB64)).run(
        warps,
        TRACT,
        ref_visit=7,
        visits=[7 if int(w.metadata["VISIT"]) == 1 else 8 + i for i, w in enumerate(warps)],
    )
    assert res3.reference_visit == 7


def test_input_errors(warps):
    task = MatchBackgroundsTask(MatchBackgroundsConfig(tract_bg_model=TB64))
    with pytest.raises(InvalidInputError, match="no warps"):
        task.run([], TRACT)
    with pytest.raises(InvalidInputError, match="reference visit 99"):
        task.run(warps, TRACT, ref_visit=99)
    anon = warps[0].copy()
    del anon.metadata["VISIT"]
    with pytest.raises(InvalidInputError, match="warp 0 has no 'VISIT'"):
        task.run([anon] + warps[1:], TRACT)
    with pytest.raises(InvalidInputError, match="two warps of patch 0"):
        task.run(warps + [warps[0]], TRACT)
    with pytest.raises(NoOverlapError, match="not inside the tract"):
        task.run(warps, TractGrid.from_size(500, patch_inner=250))
    with pytest.raises(InvalidInputError, match="TractGrid"):
        task.run(warps, "tract")
    # a visit with no patch in common with the reference cannot be matched
    lone = warps[6].copy()  # visit 3, patch 2? (visit 3 has patches 0, 1, 3)
    lone.metadata["VISIT"] = 5
    only = [
        w
        for w in warps
        if int(w.metadata["VISIT"]) == 1 and TRACT.patch_of(w.bbox) != TRACT.patch_of(lone.bbox)
    ]
    with pytest.raises(NoOverlapError, match="visit 5 shares no usable pixels"):
        task.run(only + [lone], TRACT, ref_visit=1)
    with pytest.raises(InvalidInputError):
        MatchBackgroundsConfig(undersample_style="INCREASE_NXNYSAMPLE")
    with pytest.raises(InvalidInputError):
        TractBackgroundConfig(interpolation="quintic")


def test_masks_and_detected_option(warps):
    """A masked junk block (BAD) does not leak into the model; DETECTED is used unless asked."""
    junk = [w.copy() for w in warps]
    v2 = [i for i, w in enumerate(junk) if int(w.metadata["VISIT"]) == 2][0]
    mi = junk[v2].masked_image
    mi.image[100:200, 100:200] += 3000.0
    mi.mask[100:200, 100:200] |= mi.mask_planes.bitmask("BAD")
    task = MatchBackgroundsTask(MatchBackgroundsConfig(tract_bg_model=TB64))
    for w, bkg in zip(junk, task.run(junk, TRACT, ref_visit=1).background_info_list):
        err = bkg.model - (_truth(1, w.bbox) - _truth(bkg.visit, w.bbox))
        assert np.abs(err).max() < 0.3 * SIGMA  # measured ≤ 0.1σ (noise of 128² px windows ≈ 0.01σ)
    mi.mask[100:200, 100:200] = mi.mask_planes.bitmask("DETECTED")
    off = task.run(junk, TRACT, ref_visit=1).background_info_list[v2].model
    cfg = MatchBackgroundsConfig(
        tract_bg_model=TractBackgroundConfig(x_bin=64, y_bin=64, mask=TB64.mask + ("DETECTED",))
    )
    on = MatchBackgroundsTask(cfg).run(junk, TRACT, ref_visit=1).background_info_list[v2].model
    # unmasked (DETECTED not in the planes) the block, 1/4 of its bins' windows, drags the
    # clipped means; masked, it is invisible
    assert np.abs(off - on)[100:200, 100:200].max() > 0.5 * SIGMA
    b = warps[v2].bbox
    truth = _truth(1, b) - _truth(2, b)
    assert np.abs(on - truth)[100:200, 100:200].max() < 0.3 * SIGMA


def test_cli_end_to_end(tmp_path, warps, capsys):
    paths = []
    for i, w in enumerate(warps):
        p = tmp_path / f"warp{i}.fits"
        w.write(p)
        paths.append(str(p))
    out = tmp_path / "out"
    rc = main(
        [
            "match-backgrounds",
            *paths,
            "--out-dir",
            str(out),
            "--bin-size",
            "64",
            "--patch-size",
            "320",
            "--patch-overlap",
            "16",
            "--backend",
            "numpy",
        ]
    )
    assert rc == 0
    text = capsys.readouterr().out
    assert "reference visit 1 (chosen by cost)" in text and "diff_im_var" in text
    summary = Table.read(out / "match_backgrounds.ecsv")
    assert list(summary["visit"]) == [1, 2, 3] and summary.meta["reference_visit"] == 1
    for i, w in enumerate(warps):
        m = read_exposure(out / f"warp{i}.matched.fits")
        assert m.xy0 == w.xy0 and m.metadata["REFVISIT"] == 1
        with fits.open(out / f"warp{i}.background.fits") as h:
            model = h[0].data
            assert (
                h[0].header["VISIT"] == int(w.metadata["VISIT"])
                and h[0].header["LTV1"] == -w.xy0[0]
            )
            if int(w.metadata["VISIT"]) != 1:
                assert "BINNED" in h and h["BINNED"].data.shape == (10, 10)
        np.testing.assert_allclose(m.image, w.image + model, atol=1e-3, equal_nan=True)
        r = m.image - _stars(w.bbox) - _truth(1, w.bbox)
        assert abs(float(np.median(r))) < 0.1 * SIGMA
    # outputs exist: refused before any work without --overwrite; --ref-visit overrides
    assert main(["match-backgrounds", *paths, "--out-dir", str(out), "--patch-size", "320"]) == 1
    assert "exists" in capsys.readouterr().err
    assert (
        main(
            [
                "match-backgrounds",
                *paths,
                "--out-dir",
                str(out),
                "--bin-size",
                "64",
                "--patch-size",
                "320",
                "--patch-overlap",
                "16",
                "--ref-visit",
                "2",
                "--overwrite",
            ]
        )
        == 0
    )
    assert Table.read(out / "match_backgrounds.ecsv").meta["reference_visit"] == 2
    # a warp without the visit card: a one-line error naming the file and the key
    with fits.open(paths[0], mode="update") as h:
        for hdu in h:
            hdu.header.remove("VISIT", ignore_missing=True)
    assert (
        main(
            ["match-backgrounds", *paths, "--out-dir", str(tmp_path / "o2"), "--patch-size", "320"]
        )
        == 1
    )
    err = capsys.readouterr().err
    assert "warp0.fits" in err and "'VISIT'" in err


def test_evaluate_bin_grid_akima(backend):
    """The Akima evaluation (node slopes on the host, Hermite weights as matrix products)."""
    from gpudiff.errors import NonFiniteDataError
    from gpudiff.ops.background import evaluate_bin_grid

    yc, xc = 32.0 + 64.0 * np.arange(6), 32.0 + 64.0 * np.arange(8)
    rows, cols = np.arange(384), np.arange(512)
    plane = 3.0 + 0.5 * yc[:, None] - 0.25 * xc[None, :]
    out = backend.asnumpy(
        evaluate_bin_grid(plane, yc, xc, rows, cols, "akima", "linear", backend=backend)
    )
    # Akima reproduces straight lines exactly, and the linear continuation keeps the plane
    np.testing.assert_allclose(out, 3.0 + 0.5 * rows[:, None] - 0.25 * cols[None, :], atol=2e-3)
    smooth = np.sin(yc[:, None] / 90.0) * np.cos(xc[None, :] / 120.0)
    truth = np.sin(rows[:, None] / 90.0) * np.cos(cols[None, :] / 120.0)
    errs = {
        o: np.abs(
            backend.asnumpy(evaluate_bin_grid(smooth, yc, xc, rows, cols, o, backend=backend))
            - truth
        )[32:-32, 32:-32].max()
        for o in ("akima", "linear")
    }
    assert (
        errs["akima"] < 0.5 * errs["linear"]
    )  # measured 0.023 vs 0.094 (sin·cos of unit amplitude)
    flat = backend.asnumpy(
        evaluate_bin_grid(smooth, yc, xc, rows, cols, "akima", "flat", backend=backend)
    )
    np.testing.assert_allclose(flat[:, :32], np.broadcast_to(flat[:, 32:33], (384, 32)), atol=1e-6)
    # fewer than 5 nodes: REDUCE_INTERP_ORDER falls back (cubic), THROW_EXCEPTION refuses
    small = plane[:3, :3]
    evaluate_bin_grid(small, yc[:3], xc[:3], rows, cols, "akima", backend=backend)
    with pytest.raises(InvalidInputError, match="at least 5 bins"):
        evaluate_bin_grid(small, yc[:3], xc[:3], rows, cols, "akima", undersample="THROW_EXCEPTION")
    bad = plane.copy()
    bad[1, 1] = np.nan
    with pytest.raises(NonFiniteDataError):
        evaluate_bin_grid(bad, yc, xc, rows, cols)

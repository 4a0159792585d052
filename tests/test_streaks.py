"""ops.streaks and the STREAK handling of DetectAndMeasureTask (issue 14 item 4): a satellite
trail in the difference is found, masked STREAK, and reported as one flagged feature."""

from __future__ import annotations

import math

import numpy as np
import pytest

from gpudiff.errors import InvalidInputError
from gpudiff.image import Exposure, GaussianPsf, MaskedImage
from gpudiff.ops.detection import detect_sources
from gpudiff.ops.streaks import find_streaks
from gpudiff.sim.artefacts import Trail, _render_trails
from gpudiff.tasks import DetectAndMeasureTask

N = 512
PSF_SIGMA = 1.7
TRANSIENTS = [
    (60.0, 400.0, 400.0),
    (420.0, 80.0, 500.0),
    (300.0, 450.0, 350.0),
    (450.0, 300.0, 450.0),
]


def _difference(trails=(), seed=0, xy0=(0, 0)):
    """Unit white noise, four S/N ≳ 40 point transients off the trail, and ``trails``
    (rendered by gpudiff.sim; negative brightness: a trail in the template)."""
    rng = np.random.default_rng(seed)
    img = rng.normal(0.0, 1.0, (N, N))
    yy, xx = np.mgrid[0:N, 0:N]
    for x, y, f in TRANSIENTS:
        img += (
            f
            * np.exp(-0.5 * ((xx - x) ** 2 + (yy - y) ** 2) / PSF_SIGMA**2)
            / (2 * np.pi * PSF_SIGMA**2)
        )
    mi0 = MaskedImage(np.zeros((N, N), np.float32), xy0=xy0)
    if trails:
        light, _ = _render_trails(list(trails), mi0.bbox)
        img += light
    mi = MaskedImage(img.astype(np.float32), np.ones((N, N), np.float32), xy0=xy0)
    return Exposure(mi, GaussianPsf(sigma=PSF_SIGMA))


def _perp(x, y, trail):
    th = math.radians(trail.angle)
    return -(np.asarray(x) - trail.x) * math.sin(th) + (np.asarray(y) - trail.y) * math.cos(th)


@pytest.mark.parametrize("brightness", [1.2, -3.0])
def test_trail_is_one_streak_feature(brightness):
    """A faint trail (peak 1.2σ per pixel: ~8σ per PSF after smoothing, so its 5σ detections
    break into many pieces along it) or a bright negative one (in the template)."""
    trail = Trail(x=200.0, y=230.0, angle=33.0, brightness=brightness, width=1.5)
    exp = _difference([trail], seed=1)
    det = detect_sources(exp, threshold=5.0, polarity="both", background=None)
    on_trail = np.abs(_perp(det.catalog["x"], det.catalog["y"], trail)) < 5
    # Without streak handling the trail is many sources (the "twenty sources").
    assert on_trail.sum() >= 5
    res = find_streaks(exp.masked_image, det.significance, PSF_SIGMA)
    assert len(res.streaks) == 1
    st = res.streaks[0]
    # Angle within 0.3° (a 500-px line fitted on thousands of pixels), centre line within
    # 1 px, width σ within 35 % of the rendered 1.5 px (median profile of a noisy band).
    assert abs((st.angle - trail.angle + 90) % 180 - 90) < 0.3
    assert abs(_perp((st.x0 + st.x1) / 2, (st.y0 + st.y1) / 2, trail)) < 1.0
    assert abs(st.width / 1.5 - 1) < 0.35
    assert np.sign(st.amplitude) == np.sign(brightness)
    # The trail crosses the image: the detected extent is most of the chord (~610 px).
    assert st.length > 450
    cat = DetectAndMeasureTask().run(exp).dia_sources
    streaky = np.asarray(cat["flag_streak"])
    assert streaky.sum() == 1  # one feature, not one record per piece
    assert cat["n_peaks"][streaky][0] >= on_trail.sum() // 2
    # No clean record on the trail; every transient off it is found, once, and clean.
    near = np.abs(_perp(cat["x"], cat["y"], trail)) < 6
    assert not np.asarray(cat["clean"])[near].any()
    for x, y, _ in TRANSIENTS:
        hit = np.hypot(cat["x"] - x, cat["y"] - y) < 2
        assert hit.sum() == 1 and bool(cat["clean"][hit][0])


def test_transients_beside_a_trail_are_records_of_their_own():
    """Point transients whose footprints touch a bright trail's (centres beyond the
    masked band, their light joined to the trail's at 5σ) are records of their own, clean,
    with their fluxes, not one record of the brightest; the trail stays one feature (a
    realistic 2048² pair lost a S/N 10 transient 6 px from a trail's line to a record
    350 px away on the trail's footprint, docs/algorithms.md §14)."""
    trail = Trail(x=200.0, y=230.0, angle=33.0, brightness=3.0, width=1.5)
    th = math.radians(trail.angle)

    def beside(x_along, perp):
        return x_along, trail.y + (x_along - trail.x) * math.tan(th) + perp / math.cos(th)

    # (x, y, flux): S/N ≈ flux / (√(4π) σ_PSF) ≈ 66 and 130, 9 px either side.
    spots = [(*beside(330.0, 9.0), 400.0), (*beside(150.0, -9.0), 800.0)]
    exp = _difference([trail], seed=4)
    mi = exp.masked_image
    img = np.asarray(mi.image).copy()
    yy, xx = np.mgrid[0:N, 0:N]
    for x, y, f in spots:
        assert abs(abs(_perp(x, y, trail)) - 9.0) < 1e-9
        g = np.exp(-0.5 * ((xx - x) ** 2 + (yy - y) ** 2) / PSF_SIGMA**2)
        img += (f * g / (2 * np.pi * PSF_SIGMA**2)).astype(np.float32)
    exp = Exposure(MaskedImage(img, np.asarray(mi.variance)), exp.psf)
    res = DetectAndMeasureTask().run(exp)
    assert len(res.streaks) == 1
    assert res.streaks[0].half_width < 9.0 - 2 * PSF_SIGMA  # centres off the band
    # Their light touches the trail's at the detection threshold: one footprint (the case).
    det = detect_sources(exp, threshold=5.0, polarity="both", background=None)
    fid = np.asarray(det.catalog["footprint_id"])
    on = set(fid[np.abs(_perp(det.catalog["x"], det.catalog["y"], trail)) < 3].tolist())
    for x, y, _ in spots:
        assert fid[np.argmin(np.hypot(det.catalog["x"] - x, det.catalog["y"] - y))] in on
    cat = res.dia_sources
    for x, y, f in spots:
        hit = np.hypot(cat["x"] - x, cat["y"] - y) < 1.5
        assert hit.sum() == 1 and bool(cat["clean"][hit][0]), cat[hit]
        assert cat["psf_flux"][hit][0] == pytest.approx(f, rel=0.1)
    assert np.asarray(cat["flag_streak"]).sum() == 1


def test_streak_mask_plane_and_parent_frame():
    trail = Trail(x=1200.0, y=2300.0, angle=100.0, brightness=2.0, width=1.5)
    exp = _difference([trail], seed=2, xy0=(1000, 2000))
    res = DetectAndMeasureTask().run(exp)
    assert len(res.streaks) == 1
    st = res.streaks[0]
    # End points in the parent frame (xy0 included): on the true line within 1 px.
    assert abs(_perp(st.x0, st.y0, trail)) < 1 and abs(_perp(st.x1, st.y1, trail)) < 1
    mi = res.subtracted_measured_exposure.masked_image
    streak = (mi.mask & mi.mask_planes.bitmask("STREAK")) != 0
    yy, xx = np.mgrid[0:N, 0:N]
    p = np.abs(_perp(xx + 1000, yy + 2000, trail))
    # Masked: the trail's core everywhere along it (≥ 97 % of |p| ≤ 2σ within the image,
    # allowing the last pixels at the image edges); nothing beyond 4σ + 2 PSF σ.
    assert streak[p <= 3.0].mean() > 0.97
    assert not streak[p > 4 * 1.5 + 2 * PSF_SIGMA + 1].any()


def test_no_streak_without_a_trail():
    """Noise and isolated transients (and aligned ones: three on a line) give no streak."""
    exp = _difference(seed=3)
    img = exp.masked_image.image.copy()
    yy, xx = np.mgrid[0:N, 0:N]
    for x in (100.0, 250.0, 400.0):  # three bright sources on one row
        img += (
            800
            * np.exp(-0.5 * ((xx - x) ** 2 + (yy - 200.0) ** 2) / PSF_SIGMA**2)
            / (2 * np.pi * PSF_SIGMA**2)
        )
    mi = MaskedImage(img, exp.masked_image.variance)
    det = detect_sources(mi, exp.psf, threshold=5.0, polarity="both", background=None)
    assert find_streaks(mi, det.significance, PSF_SIGMA).streaks == []
    cat = DetectAndMeasureTask().run(Exposure(mi, exp.psf)).dia_sources
    assert not np.asarray(cat["flag_streak"]).any()


def test_bad_column_is_not_voted():
    """A masked BAD column (a line of garbage) is a defect, not a trail."""
    exp = _difference(seed=4)
    mi = exp.masked_image
    img, mask = mi.image.copy(), mi.mask.copy()
    img[:, 301] = 5000.0
    mask[:, 301] |= 1 << mi.mask_planes["BAD"]
    mi = MaskedImage(img, mi.variance, mask)
    det = detect_sources(mi, exp.psf, threshold=5.0, polarity="both", background=None)
    assert find_streaks(mi, det.significance, PSF_SIGMA).streaks == []


def test_bad_input():
    exp = _difference(seed=5)
    with pytest.raises(InvalidInputError):
        find_streaks(exp.masked_image, np.zeros((10, 10)), PSF_SIGMA)
    with pytest.raises(InvalidInputError):
        find_streaks(exp.masked_image, np.zeros((N, N)), 0.0)
    with pytest.raises(InvalidInputError):
        find_streaks(exp, np.zeros((N, N)), PSF_SIGMA)

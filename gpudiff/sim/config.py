"""Simulation configurations: the source population (:class:`FieldConfig`) and the observing
conditions (:class:`ObsConfig`)."""

from __future__ import annotations

from dataclasses import dataclass, fields, replace
from typing import Any, Mapping, Sequence

import numpy as np

from ..configfield import option, validate_config
from ..errors import InvalidInputError
from ..image.psf import Psf
from ._util import _count, _finite_number, _is_number, _range
from .artefacts import Ghost, Trail
from .psfspec import PsfSpec


@dataclass(frozen=True)
class FieldConfig:
    """The source population of a field.

    Parameters
    ----------
    n_stars : int, optional
        Number of stars; default ``round(star_density · area)``.
    star_density : float
        Stars per pixel² when ``n_stars`` is None.
    flux_min, flux_max : float
        Star flux range, ADU (total counts of the star in the image).
    flux_alpha : float
        Power-law index: dN/dF ∝ F^−alpha on [flux_min, flux_max] (2.5 is Euclidean).
    min_separation : float
        Minimum distance between any two sources (stars and galaxies), pixels; 0: none.
    margin : float
        Sources are placed uniformly over the box grown by ``margin`` pixels on each side
        (positive: sources just outside contribute their wings; negative: keep sources
        that far from the edges).  The box covers x ∈ [x0 − 0.5, x1 − 0.5).
    n_galaxies : int
        Number of galaxies (elliptical Sérsic profiles convolved with the PSF).
    galaxy_flux_min, galaxy_flux_max, galaxy_flux_alpha : float
        Galaxy flux power law, as for stars.
    galaxy_r_eff : (float, float)
        Range of half-light radii along the major axis, pixels (log-uniform).
    galaxy_sersic_n : (float, float)
        Range of Sérsic indices (uniform); (1, 1): exponential disks.
    galaxy_axis_ratio : (float, float)
        Range of minor/major axis ratios (uniform); position angles are uniform.
    n_bright_stars : int
        Extra bright stars (e.g. saturated ones), drawn log-uniformly in ``bright_flux``
        from their own random stream (so adding them leaves the other sources unchanged)
        and appended after the galaxies.
    bright_flux : (float, float)
        Flux range of the bright stars, ADU.
    """

    n_stars: int | None = option(
        None, doc="Number of stars (None: round(star_density x area)).", gpudiff_only=True
    )
    star_density: float = option(
        4e-4, doc="Stars per square pixel when n_stars is None.", gpudiff_only=True
    )
    flux_min: float = option(
        200.0, doc="Faintest star flux, ADU (total counts in the image).", gpudiff_only=True
    )
    flux_max: float = option(2.0e5, doc="Brightest star flux, ADU.", gpudiff_only=True)
    flux_alpha: float = option(
        2.0,
        doc="Power-law index of the star fluxes: dN/dF ~ F^-alpha (2.5 is Euclidean).",
        gpudiff_only=True,
    )
    min_separation: float = option(
        0.0,
        doc="Minimum distance between any two sources, pixels (0: none).",
        gpudiff_only=True,
    )
    margin: float = option(
        0.0,
        doc="Sources are placed over the box grown by this many pixels per side (negative: "
        "kept that far from the edges).",
        gpudiff_only=True,
    )
    n_galaxies: int = option(
        0, doc="Number of galaxies (Sersic profiles convolved with the PSF).", gpudiff_only=True
    )
    galaxy_flux_min: float = option(500.0, doc="Faintest galaxy flux, ADU.", gpudiff_only=True)
    galaxy_flux_max: float = option(5.0e4, doc="Brightest galaxy flux, ADU.", gpudiff_only=True)
    galaxy_flux_alpha: float = option(
        2.0, doc="Power-law index of the galaxy fluxes.", gpudiff_only=True
    )
    galaxy_r_eff: tuple[float, float] = option(
        (1.5, 4.0),
        doc="Range of major-axis half-light radii, pixels (log-uniform).",
        gpudiff_only=True,
    )
    galaxy_sersic_n: tuple[float, float] = option(
        (1.0, 1.0),
        doc="Range of Sersic indices (uniform; (1, 1): exponential disks).",
        gpudiff_only=True,
    )
    galaxy_axis_ratio: tuple[float, float] = option(
        (0.4, 1.0),
        doc="Range of minor/major axis ratios (uniform); position angles are uniform.",
        gpudiff_only=True,
    )
    n_bright_stars: int = option(
        0,
        doc="Extra bright (e.g. saturated) stars, from their own random stream.",
        gpudiff_only=True,
    )
    bright_flux: tuple[float, float] = option(
        (1.0e6, 1.0e7), doc="Flux range of the bright stars, ADU (log-uniform).", gpudiff_only=True
    )

    def __post_init__(self):
        validate_config(self)
        if self.n_stars is not None:
            _count("n_stars", self.n_stars)
        _finite_number("star_density", self.star_density, nonneg=True)
        lo = _finite_number("flux_min", self.flux_min, positive=True)
        hi = _finite_number("flux_max", self.flux_max, positive=True)
        if hi < lo:
            raise InvalidInputError(f"flux_max ({hi}) must be >= flux_min ({lo})")
        _finite_number("flux_alpha", self.flux_alpha)
        _finite_number("min_separation", self.min_separation, nonneg=True)
        _finite_number("margin", self.margin)
        _count("n_galaxies", self.n_galaxies)
        glo = _finite_number("galaxy_flux_min", self.galaxy_flux_min, positive=True)
        ghi = _finite_number("galaxy_flux_max", self.galaxy_flux_max, positive=True)
        if ghi < glo:
            raise InvalidInputError(f"galaxy_flux_max ({ghi}) must be >= galaxy_flux_min ({glo})")
        _finite_number("galaxy_flux_alpha", self.galaxy_flux_alpha)
        object.__setattr__(self, "galaxy_r_eff", _range("galaxy_r_eff", self.galaxy_r_eff))
        sn = _range("galaxy_sersic_n", self.galaxy_sersic_n)
        if sn[0] < 0.3 or sn[1] > 8:
            raise InvalidInputError(
                f"galaxy_sersic_n must lie in [0.3, 8], got {self.galaxy_sersic_n!r}"
            )
        object.__setattr__(self, "galaxy_sersic_n", sn)
        q = _range("galaxy_axis_ratio", self.galaxy_axis_ratio)
        if q[1] > 1:
            raise InvalidInputError(
                f"galaxy_axis_ratio must lie in (0, 1], got {self.galaxy_axis_ratio!r}"
            )
        object.__setattr__(self, "galaxy_axis_ratio", q)
        _count("n_bright_stars", self.n_bright_stars)
        object.__setattr__(self, "bright_flux", _range("bright_flux", self.bright_flux))


@dataclass(frozen=True)
class ObsConfig:
    """Observing conditions and detector of one exposure.

    Parameters
    ----------
    psf : float, PsfSpec, Psf or callable
        A FWHM in pixels (a constant Gaussian), a :class:`PsfSpec`, any constant
        :class:`~gpudiff.image.Psf` (rendered exactly; GaussianPsf and MoffatPsf in
        batches), or a callable ``(x, y) -> Psf`` (one call per star; a
        :class:`~gpudiff.image.GridPsf` of it on an 8×8 grid is attached).
    sky : float
        Sky level, ADU per pixel (>= 0).
    background : None, float, PolynomialBackground, ChebyshevBackground, callable or array
        Extra background on top of ``sky``; a callable gets parent coordinate arrays
        ``x`` of shape (1, W) and ``y`` of shape (H, 1) and returns something that
        broadcasts to (H, W).
    gain : float
        e⁻ per ADU.
    read_noise : float
        Read noise, e⁻ rms.
    noise : {"poisson", "gaussian", "none"}
        Poisson photon noise plus Gaussian read noise, a Gaussian of the same variance,
        or no noise (image = model).  The variance plane is the same in all three cases.
    sky_subtracted : bool
        Return image − ``sky`` (the model and background likewise); the variance is
        unchanged and the ``background`` term is *not* subtracted.
    saturation : float, optional
        Saturation level of the raw image, ADU (before any sky subtraction).  Pixels at
        or above it are clipped to it and flagged SAT.
    bad_columns : int or sequence of int
        Number of random bad columns (each from a random row to the top of the image or
        the whole column), or explicit parent column numbers (whole columns).  Their
        pixels are set to ``bad_column_value`` and flagged BAD.
    bad_column_value : float or (float, float)
        Image value of bad-column pixels (final units); a (lo, hi) pair gives every bad
        pixel its own value drawn uniformly in [lo, hi] (the garbage a raw CCD's dead or
        hot columns hold, e.g. up to 5× saturation).
    cosmic_rays : int
        Number of cosmic rays (added to the image, not to the model or variance).
    cr_amplitude : (float, float)
        Per-pixel charge range of cosmic rays, ADU (log-uniform).
    cr_max_length : float
        Maximum track length, pixels.
    mask_cosmic_rays : bool or float
        Flag the cosmic-ray pixels CR (by default they are unmasked, like undetected
        cosmic rays; they are always reported in the truth).  A number in [0, 1] flags
        that fraction of the rays (whole tracks, chosen at random): a repair step that
        found some of them.
    no_data : sequence of Box or (x0, y0, x1, y1), or bool array
        Regions without data (parent coordinates, x1/y1 exclusive): image NaN, variance
        +inf, NO_DATA flagged.
    trails, ghosts : sequence of Trail / Ghost
        Satellite trails and optical ghosts (part of the model: they carry photon noise).
    photo_calib : float
        ``PhotoCalib.calibration_mean`` (nJy per ADU).
    ra, dec : float
        Sky position (degrees) of the WCS reference pixel.
    pixel_scale : float
        Arcseconds per pixel (TAN projection, north up, east left).
    wcs_reference : (float, float), optional
        Parent pixel at (ra, dec); default: the exposure's centre.
    visit : int, optional
        Written as ``VISIT`` in the metadata.
    band : str
        Written as ``BAND`` and ``FILTER``.
    """

    psf: Any = option(
        PsfSpec(),
        doc="The PSF: a FWHM in pixels (Gaussian), a PsfSpec, a constant Psf, or a callable "
        "(x, y) -> Psf.",
        gpudiff_only=True,
    )
    sky: float = option(1000.0, doc="Sky level, ADU per pixel.", gpudiff_only=True)
    background: Any = option(
        None,
        doc="Extra background on top of sky: a number, a Polynomial/ChebyshevBackground, a "
        "callable (x, y) or an array.",
        gpudiff_only=True,
    )
    gain: float = option(1.0, doc="Detector gain, e- per ADU.", gpudiff_only=True)
    read_noise: float = option(5.0, doc="Read noise, e- rms.", gpudiff_only=True)
    noise: str = option(
        "poisson",
        doc="Poisson photon + Gaussian read noise, a Gaussian of the same variance, or none.",
        gpudiff_only=True,
    )
    sky_subtracted: bool = option(
        False,
        doc="Return image - sky (variance unchanged; the background term is kept).",
        gpudiff_only=True,
    )
    saturation: float | None = option(
        None,
        doc="Saturation level of the raw image, ADU: pixels at or above are clipped and "
        "flagged SAT (None: none).",
        gpudiff_only=True,
    )
    bad_columns: Any = option(
        0,
        doc="Number of random bad columns, or the parent column numbers of whole bad "
        "columns (flagged BAD).",
        gpudiff_only=True,
    )
    bad_column_value: Any = option(
        0.0,
        doc="Image value of bad-column pixels, or a (lo, hi) range drawn per pixel.",
        gpudiff_only=True,
    )
    cosmic_rays: int = option(0, doc="Number of cosmic rays added to the image.", gpudiff_only=True)
    cr_amplitude: tuple[float, float] = option(
        (100.0, 3000.0),
        doc="Per-pixel charge range of cosmic rays, ADU (log-uniform).",
        gpudiff_only=True,
    )
    cr_max_length: float = option(15.0, doc="Longest cosmic-ray track, pixels.", gpudiff_only=True)
    mask_cosmic_rays: Any = option(
        False,
        doc="Flag the cosmic rays CR: a bool, or the fraction of the rays flagged.",
        gpudiff_only=True,
    )
    no_data: Any = option(
        (),
        doc="Regions without data (boxes in parent coordinates, or a bool array): NaN, "
        "infinite variance, NO_DATA.",
        gpudiff_only=True,
    )
    trails: Sequence[Trail] = option(
        (), doc="Satellite trails (part of the model: they carry photon noise).", gpudiff_only=True
    )
    ghosts: Sequence[Ghost] = option(
        (), doc="Optical ghosts (part of the model: they carry photon noise).", gpudiff_only=True
    )
    photo_calib: float = option(
        1.0, doc="PhotoCalib calibration mean, nJy per ADU.", gpudiff_only=True
    )
    ra: float = option(
        150.0, doc="Right ascension of the WCS reference pixel, degrees.", gpudiff_only=True
    )
    dec: float = option(
        2.2, doc="Declination of the WCS reference pixel, degrees.", gpudiff_only=True
    )
    pixel_scale: float = option(
        0.2, doc="Arcseconds per pixel (TAN, north up, east left).", gpudiff_only=True
    )
    wcs_reference: tuple[float, float] | None = option(
        None,
        doc="Parent pixel at (ra, dec) (None: the exposure's centre).",
        gpudiff_only=True,
    )
    visit: int | None = option(None, doc="Written as VISIT in the metadata.", gpudiff_only=True)
    band: str = option("r", doc="Written as BAND and FILTER in the metadata.", gpudiff_only=True)

    def __post_init__(self):
        validate_config(self)
        _finite_number("sky", self.sky, nonneg=True)
        _finite_number("gain", self.gain, positive=True)
        _finite_number("read_noise", self.read_noise, nonneg=True)
        noise = str(self.noise).strip().lower()
        if noise not in ("poisson", "gaussian", "none"):
            raise InvalidInputError(
                f"noise must be 'poisson', 'gaussian' or 'none', got {self.noise!r}"
            )
        object.__setattr__(self, "noise", noise)
        if self.saturation is not None:
            _finite_number("saturation", self.saturation, positive=True)
        if not isinstance(self.bad_columns, (int, np.integer)):
            try:
                cols = tuple(int(c) for c in self.bad_columns)
            except (TypeError, ValueError):
                raise InvalidInputError(
                    f"bad_columns must be a count or a sequence of column numbers, "
                    f"got {self.bad_columns!r}"
                ) from None
            object.__setattr__(self, "bad_columns", cols)
        else:
            _count("bad_columns", self.bad_columns)
        if isinstance(self.bad_column_value, (tuple, list)):
            object.__setattr__(
                self,
                "bad_column_value",
                _range("bad_column_value", self.bad_column_value, positive=False),
            )
        else:
            _finite_number("bad_column_value", self.bad_column_value)
        if not isinstance(self.mask_cosmic_rays, (bool, np.bool_)):
            frac = _finite_number("mask_cosmic_rays", self.mask_cosmic_rays, nonneg=True)
            if frac > 1:
                raise InvalidInputError(
                    f"mask_cosmic_rays must be a bool or a fraction in [0, 1], "
                    f"got {self.mask_cosmic_rays!r}"
                )
            object.__setattr__(self, "mask_cosmic_rays", frac)
        _count("cosmic_rays", self.cosmic_rays)
        object.__setattr__(self, "cr_amplitude", _range("cr_amplitude", self.cr_amplitude))
        _finite_number("cr_max_length", self.cr_max_length, nonneg=True)
        object.__setattr__(self, "trails", tuple(self.trails))
        object.__setattr__(self, "ghosts", tuple(self.ghosts))
        if not all(isinstance(t, Trail) for t in self.trails):
            raise InvalidInputError("trails must be Trail instances")
        if not all(isinstance(g, Ghost) for g in self.ghosts):
            raise InvalidInputError("ghosts must be Ghost instances")
        _finite_number("photo_calib", self.photo_calib, positive=True)
        _finite_number("ra", self.ra)
        if not -90 <= _finite_number("dec", self.dec) <= 90:
            raise InvalidInputError(f"dec must lie in [-90, 90], got {self.dec!r}")
        _finite_number("pixel_scale", self.pixel_scale, positive=True)
        if _is_number(self.psf):
            object.__setattr__(
                self, "psf", PsfSpec(fwhm=_finite_number("psf", self.psf, positive=True))
            )
        elif not (isinstance(self.psf, (PsfSpec, Psf)) or callable(self.psf)):
            raise InvalidInputError(
                "psf must be a FWHM (float), a PsfSpec, a gpudiff Psf or a callable "
                "(x, y) -> Psf; "
                f"got {type(self.psf).__name__}"
            )

    @classmethod
    def realistic(cls, **kwargs) -> "ObsConfig":
        """Conditions with the usual detector blemishes switched on.

        A Moffat PSF (FWHM 3.5 px, β 3), gain 1.5, read noise 6 e⁻, saturation 60000 ADU,
        two bad columns and 10 cosmic rays; ``kwargs`` override any field.
        """
        base = dict(
            psf=PsfSpec(kind="moffat", fwhm=3.5, beta=3.0),
            gain=1.5,
            read_noise=6.0,
            saturation=60000.0,
            bad_columns=2,
            cosmic_rays=10,
        )
        base.update(kwargs)
        return cls(**base)


_FIELD_NAMES = frozenset(f.name for f in fields(FieldConfig))
_OBS_NAMES = frozenset(f.name for f in fields(ObsConfig))


def _split_overrides(
    field_cfg: FieldConfig | None, obs_cfg: ObsConfig | None, overrides: Mapping[str, Any]
) -> tuple[FieldConfig, ObsConfig]:
    f_kw = {k: v for k, v in overrides.items() if k in _FIELD_NAMES}
    o_kw = {k: v for k, v in overrides.items() if k in _OBS_NAMES}
    unknown = sorted(set(overrides) - _FIELD_NAMES - _OBS_NAMES)
    if unknown:
        raise InvalidInputError(
            f"unknown simulation option(s) {unknown}; FieldConfig takes {sorted(_FIELD_NAMES)}, "
            f"ObsConfig takes {sorted(_OBS_NAMES)}"
        )
    field_cfg = FieldConfig() if field_cfg is None else field_cfg
    obs_cfg = ObsConfig() if obs_cfg is None else obs_cfg
    if not isinstance(field_cfg, FieldConfig):
        raise InvalidInputError(f"field must be a FieldConfig, got {type(field_cfg).__name__}")
    if not isinstance(obs_cfg, ObsConfig):
        raise InvalidInputError(f"obs must be an ObsConfig, got {type(obs_cfg).__name__}")
    return (
        replace(field_cfg, **f_kw) if f_kw else field_cfg,
        replace(obs_cfg, **o_kw) if o_kw else obs_cfg,
    )


def _obs_from(value: Any, default: ObsConfig, name: str) -> ObsConfig:
    if value is None:
        return default
    if isinstance(value, ObsConfig):
        return value
    if isinstance(value, Mapping):
        unknown = sorted(set(value) - _OBS_NAMES)
        if unknown:
            raise InvalidInputError(
                f"unknown {name} option(s) {unknown}; ObsConfig takes {sorted(_OBS_NAMES)}"
            )
        return replace(default, **dict(value))
    raise InvalidInputError(
        f"{name} must be an ObsConfig or a mapping of ObsConfig fields, got {type(value).__name__}"
    )

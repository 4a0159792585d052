"""Simulation configurations: the source population (:class:`FieldConfig`) and the observing
conditions (:class:`ObsConfig`)."""

from __future__ import annotations

from dataclasses import dataclass, fields, replace
from typing import Any, Mapping, Sequence

import numpy as np

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

    n_stars: int | None = None
    star_density: float = 4e-4
    flux_min: float = 200.0
    flux_max: float = 2.0e5
    flux_alpha: float = 2.0
    min_separation: float = 0.0
    margin: float = 0.0
    n_galaxies: int = 0
    galaxy_flux_min: float = 500.0
    galaxy_flux_max: float = 5.0e4
    galaxy_flux_alpha: float = 2.0
    galaxy_r_eff: tuple[float, float] = (1.5, 4.0)
    galaxy_sersic_n: tuple[float, float] = (1.0, 1.0)
    galaxy_axis_ratio: tuple[float, float] = (0.4, 1.0)
    n_bright_stars: int = 0
    bright_flux: tuple[float, float] = (1.0e6, 1.0e7)

    def __post_init__(self):
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

    psf: Any = PsfSpec()
    sky: float = 1000.0
    background: Any = None
    gain: float = 1.0
    read_noise: float = 5.0
    noise: str = "poisson"
    sky_subtracted: bool = False
    saturation: float | None = None
    bad_columns: Any = 0
    bad_column_value: Any = 0.0
    cosmic_rays: int = 0
    cr_amplitude: tuple[float, float] = (100.0, 3000.0)
    cr_max_length: float = 15.0
    mask_cosmic_rays: Any = False
    no_data: Any = ()
    trails: Sequence[Trail] = ()
    ghosts: Sequence[Ghost] = ()
    photo_calib: float = 1.0
    ra: float = 150.0
    dec: float = 2.2
    pixel_scale: float = 0.2
    wcs_reference: tuple[float, float] | None = None
    visit: int | None = None
    band: str = "r"

    def __post_init__(self):
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

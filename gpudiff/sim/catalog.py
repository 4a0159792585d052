"""Source catalogs: drawing a field's sources (:func:`make_catalog`) and checking user catalogs."""

from __future__ import annotations

import math
from dataclasses import replace
from typing import Any

import numpy as np
from astropy.table import Table

from ..errors import InvalidInputError
from ._util import _as_box, _loguniform, _power_law, _rng, _seed_card
from .config import _FIELD_NAMES, FieldConfig


def _place(
    rng: np.random.Generator,
    n: int,
    lo: tuple[float, float],
    hi: tuple[float, float],
    min_sep: float,
    avoid: np.ndarray | None = None,
    avoid_sep: float = 0.0,
) -> np.ndarray:
    """n uniform positions in [lo, hi) with pairwise distance >= min_sep and distance >=
    avoid_sep from the points ``avoid`` (greedy rejection sampling, deterministic)."""
    if n == 0:
        return np.zeros((0, 2))
    lo_a, hi_a = np.asarray(lo, float), np.asarray(hi, float)
    if not (hi_a > lo_a).all():
        raise InvalidInputError(
            f"no room to place sources: the placement region {tuple(lo)}..{tuple(hi)} is empty"
        )
    if min_sep <= 0 and (avoid is None or len(avoid) == 0 or avoid_sep <= 0):
        return lo_a + rng.uniform(0.0, 1.0, (n, 2)) * (hi_a - lo_a)
    from scipy.spatial import cKDTree

    avoid_tree = cKDTree(avoid) if (avoid is not None and len(avoid) and avoid_sep > 0) else None
    accepted = np.zeros((0, 2))
    for _ in range(100):
        need = n - len(accepted)
        if need <= 0:
            break
        cand = lo_a + rng.uniform(0.0, 1.0, (max(2 * need, 32), 2)) * (hi_a - lo_a)
        if avoid_tree is not None:
            d, _ = avoid_tree.query(cand, distance_upper_bound=avoid_sep)
            cand = cand[~(d < avoid_sep)]
        if min_sep > 0 and len(cand):
            if len(accepted):
                d, _ = cKDTree(accepted).query(cand, distance_upper_bound=min_sep)
                cand = cand[~(d < min_sep)]
            if len(cand) > 1:
                pairs = cKDTree(cand).query_pairs(min_sep, output_type="ndarray")
                if len(pairs):
                    drop = np.zeros(len(cand), dtype=bool)
                    drop[pairs.max(axis=1)] = True
                    cand = cand[~drop]
        accepted = np.concatenate([accepted, cand[:need]])
    if len(accepted) < n:
        raise InvalidInputError(
            f"could only place {len(accepted)} of {n} sources with min_separation={min_sep:g} px "
            f"(avoiding others by {avoid_sep:g} px); lower the density or the separation"
        )
    return accepted[:n]


def _catalog_table(n: int) -> Table:
    return Table(
        {
            "id": np.arange(n, dtype=np.int64),
            "x": np.zeros(n),
            "y": np.zeros(n),
            "flux": np.zeros(n),
            "is_star": np.zeros(n, dtype=bool),
            "is_galaxy": np.zeros(n, dtype=bool),
            "is_transient": np.zeros(n, dtype=bool),
            "r_eff": np.full(n, np.nan),
            "sersic_n": np.full(n, np.nan),
            "axis_ratio": np.full(n, np.nan),
            "theta": np.full(n, np.nan),
        }
    )


#: The shape parameters of galaxies (NaN for stars).
_GALAXY_COLUMNS = ("r_eff", "sersic_n", "axis_ratio", "theta")

_CATALOG_COLUMNS = (
    "id",
    "x",
    "y",
    "flux",
    "is_star",
    "is_galaxy",
    "is_transient",
    *_GALAXY_COLUMNS,
)


def make_catalog(
    box: Any, *, field: FieldConfig | None = None, seed: Any = 0, xy0=(0, 0), **overrides
) -> Table:
    """Draw the sources of a field.

    Parameters
    ----------
    box : Box, int or (ny, nx)
        The area (parent coordinates); an int or shape is combined with ``xy0``.
    field : FieldConfig, optional
        The population; ``overrides`` (FieldConfig field names) replace its fields.
    seed : int or tuple of int
        Random seed; :func:`simulate_exposure` with the same seed and no catalog draws
        exactly this catalog.

    Returns
    -------
    astropy.table.Table
        Columns ``id``, ``x``, ``y`` (parent, pixel-centre convention), ``flux`` (ADU),
        ``is_star``, ``is_galaxy``, ``is_transient`` and the galaxy shape parameters
        ``r_eff`` (pixels, major axis), ``sersic_n``, ``axis_ratio``, ``theta`` (radians;
        NaN for stars).  Stars come first.
    """
    box = _as_box(box, xy0)
    unknown = sorted(set(overrides) - _FIELD_NAMES)
    if unknown:
        raise InvalidInputError(
            f"unknown FieldConfig option(s) {unknown}; valid: {sorted(_FIELD_NAMES)}"
        )
    cfg = FieldConfig() if field is None else field
    if not isinstance(cfg, FieldConfig):
        raise InvalidInputError(f"field must be a FieldConfig, got {type(cfg).__name__}")
    if overrides:
        cfg = replace(cfg, **overrides)
    rng = _rng(seed, 0)
    m = cfg.margin
    lo = (box.x0 - 0.5 - m, box.y0 - 0.5 - m)
    hi = (box.x1 - 0.5 + m, box.y1 - 0.5 + m)
    area = max(hi[0] - lo[0], 0.0) * max(hi[1] - lo[1], 0.0)
    n_stars = int(round(cfg.star_density * area)) if cfg.n_stars is None else int(cfg.n_stars)
    n_gal = int(cfg.n_galaxies)
    n = n_stars + n_gal
    pos = _place(rng, n, lo, hi, cfg.min_separation)
    t = _catalog_table(n)
    t["x"], t["y"] = pos[:, 0], pos[:, 1]
    t["is_star"][:n_stars] = True
    t["is_galaxy"][n_stars:] = True
    t["flux"][:n_stars] = _power_law(rng, n_stars, cfg.flux_min, cfg.flux_max, cfg.flux_alpha)
    t["flux"][n_stars:] = _power_law(
        rng, n_gal, cfg.galaxy_flux_min, cfg.galaxy_flux_max, cfg.galaxy_flux_alpha
    )
    if n_gal:
        t["r_eff"][n_stars:] = _loguniform(rng, *cfg.galaxy_r_eff, n_gal)
        t["sersic_n"][n_stars:] = rng.uniform(*cfg.galaxy_sersic_n, n_gal)
        t["axis_ratio"][n_stars:] = rng.uniform(*cfg.galaxy_axis_ratio, n_gal)
        t["theta"][n_stars:] = rng.uniform(0.0, math.pi, n_gal)
    if cfg.n_bright_stars:
        # Their own stream: switching bright stars on does not move the other sources.
        brng = _rng(seed, 7)
        nb = int(cfg.n_bright_stars)
        bt = _catalog_table(nb)
        bpos = _place(brng, nb, lo, hi, cfg.min_separation)
        bt["x"], bt["y"] = bpos[:, 0], bpos[:, 1]
        bt["is_star"] = True
        bt["flux"] = _loguniform(brng, cfg.bright_flux[0], cfg.bright_flux[1], nb)
        bt["id"] = np.arange(n, n + nb, dtype=np.int64)
        from astropy.table import vstack

        t = vstack([t, bt], metadata_conflicts="silent")
    t.meta.update(
        {
            "seed": str(_seed_card(seed)),
            "x0": box.x0,
            "y0": box.y0,
            "width": box.width,
            "height": box.height,
        }
    )
    return t


def _check_catalog(cat: Any) -> Table:
    if not isinstance(cat, Table):
        raise InvalidInputError(f"catalog must be an astropy Table, got {type(cat).__name__}")
    for col in ("x", "y", "flux"):
        if col not in cat.colnames:
            raise InvalidInputError(f"catalog needs columns x, y and flux; missing {col!r}")
    out = _catalog_table(len(cat))
    for col in _CATALOG_COLUMNS:
        if col in cat.colnames:
            out[col] = np.asarray(cat[col], dtype=out[col].dtype)
    if "is_star" not in cat.colnames:
        out["is_star"] = ~out["is_galaxy"]
    for col in ("x", "y", "flux"):
        if not np.isfinite(np.asarray(out[col], float)).all():
            raise InvalidInputError(f"catalog column {col!r} has non-finite values")
    gal = np.asarray(out["is_galaxy"])
    if gal.any():
        for col in _GALAXY_COLUMNS:
            v = np.asarray(out[col], float)[gal]
            if not np.isfinite(v).all():
                raise InvalidInputError(f"catalog galaxies need finite {col!r}")
        if (np.asarray(out["r_eff"])[gal] <= 0).any() or (
            np.asarray(out["axis_ratio"])[gal] <= 0
        ).any():
            raise InvalidInputError("catalog galaxies need r_eff > 0 and axis_ratio > 0")
    out.meta.update(cat.meta)
    return out

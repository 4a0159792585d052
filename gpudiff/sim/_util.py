"""Small shared helpers of the simulator: seeds, argument validation, boxes and random draws."""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from ..errors import InvalidInputError
from ..image.masked_image import Box


#: Elements of the oversampled profile array evaluated per chunk (memory ≈ 8 bytes each).
_CHUNK_ELEMENTS = 1 << 22


def _is_int(value: Any) -> bool:
    """An integer (Python or NumPy), but not a bool."""
    return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


def _is_number(value: Any) -> bool:
    """A real number (Python or NumPy int or float), but not a bool."""
    return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(
        value, (bool, np.bool_)
    )


def _seed_entropy(seed: Any) -> list[int]:
    """Validate ``seed`` (int or sequence of ints, all >= 0) and return it as a list."""
    if isinstance(seed, (bool, np.bool_)):
        raise InvalidInputError(f"seed must be a non-negative int or a tuple of them, got {seed!r}")
    if isinstance(seed, (int, np.integer)):
        items = [int(seed)]
    elif isinstance(seed, (tuple, list)) and seed and all(_is_int(s) for s in seed):
        items = [int(s) for s in seed]
    else:
        raise InvalidInputError(f"seed must be a non-negative int or a tuple of them, got {seed!r}")
    if any(s < 0 for s in items):
        raise InvalidInputError(f"seed must be non-negative, got {seed!r}")
    return items


def _rng(seed: Any, *stream: int) -> np.random.Generator:
    """An independent generator for sub-stream ``stream`` of ``seed``."""
    return np.random.default_rng(_seed_entropy(seed) + [int(s) for s in stream])


def _sub_seed(seed: Any, *stream: int) -> tuple[int, ...]:
    """A derived seed (tuple) for a nested simulation."""
    return tuple(_seed_entropy(seed) + [int(s) for s in stream])


def _seed_card(seed: Any) -> int | str:
    items = _seed_entropy(seed)
    return items[0] if len(items) == 1 else ",".join(str(s) for s in items)


def _odd(n: float) -> int:
    n = int(math.ceil(n))
    return n if n % 2 == 1 else n + 1


def _finite_number(name: str, value: Any, *, positive: bool = False, nonneg: bool = False) -> float:
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise InvalidInputError(f"{name} must be a number, got {value!r}") from None
    if not math.isfinite(v):
        raise InvalidInputError(f"{name} must be finite, got {value!r}")
    if positive and not v > 0:
        raise InvalidInputError(f"{name} must be > 0, got {value!r}")
    if nonneg and v < 0:
        raise InvalidInputError(f"{name} must be >= 0, got {value!r}")
    return v


def _range(name: str, value: Any, *, positive: bool = True) -> tuple[float, float]:
    """A (lo, hi) pair with lo <= hi (a single number means lo == hi)."""
    if isinstance(value, (int, float, np.integer, np.floating)):
        value = (value, value)
    try:
        lo, hi = value
    except (TypeError, ValueError):
        raise InvalidInputError(
            f"{name} must be a number or a (min, max) pair, got {value!r}"
        ) from None
    lo = _finite_number(f"{name}[0]", lo, positive=positive)
    hi = _finite_number(f"{name}[1]", hi, positive=positive)
    if hi < lo:
        raise InvalidInputError(f"{name} must satisfy min <= max, got {value!r}")
    return lo, hi


def _count(name: str, value: Any) -> int:
    if not _is_int(value):
        raise InvalidInputError(f"{name} must be a non-negative integer, got {value!r}")
    if value < 0:
        raise InvalidInputError(f"{name} must be >= 0, got {value!r}")
    return int(value)


def _as_box(size: Any, xy0: Any = (0, 0)) -> Box:
    """A Box from ``size`` (int side, (ny, nx) or a Box) and origin ``xy0``."""
    if isinstance(size, Box):
        if size.width <= 0 or size.height <= 0:
            raise InvalidInputError(f"image box must not be empty, got {size}")
        return size
    if _is_int(size):
        ny = nx = int(size)
    else:
        try:
            ny, nx = size
        except (TypeError, ValueError):
            raise InvalidInputError(
                f"size must be an int, a (ny, nx) pair or a Box, got {size!r}"
            ) from None
        if not all(_is_int(v) for v in (ny, nx)):
            raise InvalidInputError(f"size must hold integers, got {size!r}")
        ny, nx = int(ny), int(nx)
    if ny <= 0 or nx <= 0:
        raise InvalidInputError(f"image size must be positive, got {ny} x {nx} (rows x columns)")
    try:
        x0, y0 = xy0
        if not all(_is_int(v) for v in (x0, y0)):
            raise TypeError
    except (TypeError, ValueError):
        raise InvalidInputError(f"xy0 must be a pair of integers, got {xy0!r}") from None
    return Box(int(x0), int(y0), int(x0) + nx, int(y0) + ny)


def _grow(box: Box, border: int) -> Box:
    return Box(box.x0 - border, box.y0 - border, box.x1 + border, box.y1 + border)


def _box_centre(box: Box) -> tuple[float, float]:
    return (0.5 * (box.x0 + box.x1 - 1), 0.5 * (box.y0 + box.y1 - 1))


def _inside(x, y, box: Box) -> np.ndarray:
    """Whether parent positions (x, y) lie inside ``box`` (x ∈ [x0 − 0.5, x1 − 0.5), y likewise)."""
    return (x >= box.x0 - 0.5) & (x < box.x1 - 0.5) & (y >= box.y0 - 0.5) & (y < box.y1 - 0.5)


def _grid_nodes(box: Box, n: int) -> tuple[np.ndarray, np.ndarray]:
    """``n`` evenly spaced node coordinates per axis from the first to the last pixel centre
    of ``box``."""
    return np.linspace(box.x0, box.x1 - 1, n), np.linspace(box.y0, box.y1 - 1, n)


def _normalized_coords(x, y, box: Box) -> tuple[np.ndarray, np.ndarray]:
    """Map parent coordinates to [-1, 1] over the pixel centres of ``box`` (clipped)."""
    cx, cy = _box_centre(box)
    hx = max(0.5 * (box.width - 1), 0.5)
    hy = max(0.5 * (box.height - 1), 0.5)
    xn = np.clip((np.asarray(x, dtype=np.float64) - cx) / hx, -1.0, 1.0)
    yn = np.clip((np.asarray(y, dtype=np.float64) - cy) / hy, -1.0, 1.0)
    return xn, yn


def _loguniform(rng: np.random.Generator, lo: float, hi: float, n: int) -> np.ndarray:
    if lo == hi:
        return np.full(n, lo)
    return np.exp(rng.uniform(math.log(lo), math.log(hi), n))


def _power_law(
    rng: np.random.Generator, n: int, f_min: float, f_max: float, alpha: float
) -> np.ndarray:
    """Draw from dN/dF ∝ F^-alpha on [f_min, f_max] by inverting the CDF."""
    u = rng.uniform(0.0, 1.0, n)
    if f_min == f_max:
        return np.full(n, f_min)
    if abs(alpha - 1.0) < 1e-12:
        return f_min * (f_max / f_min) ** u
    p = 1.0 - alpha
    a, b = f_min**p, f_max**p
    return (a + u * (b - a)) ** (1.0 / p)

"""The NumPy raw-moment path of the adaptive-moment twin (stamps last, row recurrence)
against the whole-batch direct form it replaces on the CPU."""

from __future__ import annotations

import numpy as np
import pytest

from gpudiff.backend import stamp_moments as sm


def _states(rng, m: int, s: int) -> np.ndarray:
    """Weights of every kind the iteration visits: ordinary, elongated and tilted, off
    centre, and collapsed onto the 0.04 px² floor with |ρ| → 0.99 (whose recurrence
    factors would overflow), plus the initial round weight."""
    wxx = rng.uniform(0.5, 0.5 + 0.3 * s * s, m)
    wyy = rng.uniform(0.5, 0.5 + 0.3 * s * s, m)
    rho = rng.uniform(-0.95, 0.95, m)
    st = np.stack([rng.uniform(-2, 2, m), rng.uniform(-2, 2, m), wxx, wyy, np.zeros(m)], 1)
    st[:, 4] = rho * np.sqrt(wxx * wyy)
    k = m // 4
    st[:k, 2:4] = 0.04  # collapsed
    st[:k, 4] = rng.choice([-1, 1], k) * 0.99 * 0.04
    st[k : 2 * k, 2] = 0.04  # thin in x only
    st[k : 2 * k, 4] = 0.0
    st[-1] = [0.0, 0.0, 2.0, 2.0, 0.0]
    return st


@pytest.mark.parametrize("s", [1, 2, 5, 17, 25])
def test_raw_moments_columns_match_direct_form(rng, s):
    m = 300
    st = _states(rng, m, s)
    im = rng.normal(0, 1, (m, s, s)) + 50 * (rng.random((m, s, s)) < 0.05)
    c = sm._offsets(np, s)
    basis = sm._moment_basis(np, s)
    want = sm._raw_moments_batch(np, im, basis, c[None, None, :], c[None, :, None], st)
    got = sm._raw_moments_columns(
        np.ascontiguousarray(im.transpose(1, 2, 0)), np.ascontiguousarray(basis.T), c, st
    )
    # Per row, relative to Σ w·|I|·|basis| (the moments themselves may cancel to ~0): the
    # recurrence adds a few 1e-15; a wrong row, column or factor would be O(1).
    scale = sm._raw_moments_batch(
        np, np.abs(im), np.abs(basis), c[None, None, :], c[None, :, None], st
    ).max(axis=1)
    assert np.all(np.isfinite(got))
    rel = np.abs(got - want).max(axis=1) / np.maximum(scale, 1e-300)
    assert rel.max() <= 1e-12, float(rel.max())

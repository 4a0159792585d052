"""The column twins live in gpudiff/backend/reference_columns.py and stay reachable as
before (``reference.<name>``, the kernel registry); the clipped-stack twin's one-gather
quartiles equal the per-fraction helper bit for bit."""

from __future__ import annotations

import numpy as np
import pytest

from gpudiff.backend import kernels, reference, reference_columns

COLUMN_NAMES = (
    "QUANTILE_COLUMNS_MAX_FRACTIONS",
    "clipped_bins",
    "clipped_columns",
    "quantile_columns",
    "validate_clipped_bins",
    "validate_clipped_columns",
    "validate_quantile_columns",
)


@pytest.mark.parametrize("name", COLUMN_NAMES)
def test_reference_reexports_the_column_twins(name):
    assert getattr(reference, name) is getattr(reference_columns, name)
    assert name in reference.__all__ and name in reference_columns.__all__


@pytest.mark.parametrize("kernel", ["clipped_columns", "clipped_bins", "quantile_columns"])
def test_registry_runs_the_moved_twins(kernel):
    assert kernels._REGISTRY[kernel].numpy_impl is getattr(reference_columns, kernel)


@pytest.mark.parametrize("n_epochs", [1, 2, 5, 20])
def test_quartiles_in_one_gather_equal_the_per_fraction_quantiles(n_epochs):
    rng = np.random.default_rng(n_epochs)
    data = rng.standard_normal((n_epochs, 257)).astype(np.float32)
    valid = rng.random(data.shape) < 0.7
    valid[:, :3] = False  # columns without a valid sample: NaN
    valid[0, 3:6], valid[1:, 3:6] = True, False  # one valid sample
    n = valid.sum(axis=0).astype(np.int64)
    s = np.sort(np.where(valid, data, np.float32(np.inf)), axis=0)
    with np.errstate(invalid="ignore"):
        got = reference._quartiles_sorted(np, s, n)
        want = [reference._quantile_sorted(np, s, n, f) for f in (0.50, 0.25, 0.75)]
    for g, w in zip(got, want):
        assert g.dtype == w.dtype == np.float64
        np.testing.assert_array_equal(g.view(np.int64), w.view(np.int64))
    np.testing.assert_array_equal(np.isfinite(got[0]), n > 0)  # NaN exactly where empty
    assert (n[3:6] == 1).all() and (n[:3] == 0).all()

"""Several device arrays to the host in one transfer (one host sync instead of one each)."""

from __future__ import annotations

from typing import Any

import numpy as np

from ..backend import Backend

__all__ = ["fetch"]


def fetch(be: Backend, *arrays: Any) -> tuple[np.ndarray, ...]:
    """Host copies of ``arrays`` (device arrays, host arrays or scalars), in one transfer.

    On a device every array is raveled, cast to float64 and concatenated, the one vector
    crosses to the host, and each piece is cast back to its array's dtype and shape: exact
    for bool, integers below 2⁵³ (mask planes, counts, indices) and float32/float64
    values, which is all this library fetches.  On the CPU each array is returned as is
    (no copy).

    Parameters
    ----------
    be : Backend
    *arrays : array-like
        Real-valued (not complex).

    Returns
    -------
    tuple of numpy.ndarray
        In the order given; 0-d for scalar inputs.
    """
    if not be.is_gpu or not arrays:
        return tuple(be.asnumpy(a) for a in arrays)
    xp = be.xp
    dev = [be.asarray(a) for a in arrays]
    for a in dev:
        if a.dtype.kind == "c":
            raise TypeError("fetch: complex arrays are not supported")
    flat = be.asnumpy(xp.concatenate([a.reshape(-1) for a in dev], dtype=xp.float64))
    out, at = [], 0
    for a in dev:
        n = int(a.size)
        out.append(flat[at : at + n].astype(a.dtype).reshape(a.shape))
        at += n
    return tuple(out)

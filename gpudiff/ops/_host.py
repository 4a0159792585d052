"""Several device arrays to the host in one transfer (one host sync instead of one each)."""

from __future__ import annotations

from typing import Any

import numpy as np

from ..backend import Backend

__all__ = ["fetch"]


def fetch(be: Backend, *arrays: Any) -> tuple[np.ndarray, ...]:
    """Host copies of ``arrays`` (device arrays, host arrays or scalars), in one transfer.

    On a device the bytes of every array (made C-contiguous) are concatenated into one
    byte vector, which crosses to the host, and each piece is viewed back as its array's
    dtype and shape: exact for every dtype, and no more bytes than the arrays hold.  On
    the CPU each array is returned as is (no copy).

    Parameters
    ----------
    be : Backend
    *arrays : array-like

    Returns
    -------
    tuple of numpy.ndarray
        In the order given; 0-d for scalar inputs.
    """
    if not be.is_gpu or not arrays:
        return tuple(be.asnumpy(a) for a in arrays)
    xp = be.xp
    dev = [be.asarray(a) for a in arrays]
    dev = [a if a.flags.c_contiguous else xp.ascontiguousarray(a) for a in dev]
    flat = be.asnumpy(xp.concatenate([a.reshape(-1).view(xp.uint8) for a in dev]))
    out, at = [], 0
    for a in dev:
        n = int(a.nbytes)
        # A copy: aligned and owned, as a plain transfer's result.
        piece = flat[at : at + n].copy()
        out.append(piece.view(np.dtype(a.dtype)).reshape(a.shape))
        at += n
    return tuple(out)

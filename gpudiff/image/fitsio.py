"""The FITS layer's former single module, kept so that ``gpudiff.image.fitsio`` imports go on
working: every name here is :mod:`gpudiff.image.io`'s (one module per file layout there)."""

from __future__ import annotations

from . import io as _io
from .io import *  # noqa: F403  (the same public names, one list: gpudiff.image.io.__all__)

__all__ = list(_io.__all__)

# The private names other modules used before gpudiff.image.io existed (aliases).
_read_xy0 = _io.read_xy0
_write_xy0 = _io.write_xy0
_read_wcs = _io.read_wcs
_read_photocalib = _io.read_photocalib
_atomic_write = _io.atomic_write_hdus
_fset = _io.fset
_fget = _io.fget

"""PSF models that only file readers make: Piff models and the cells of a cell-based coadd.

Both are ordinary :class:`~gpudiff.image.psf.Psf` objects for the algorithms; the FITS
writer stores a :class:`CellPsf` losslessly (``PSFTYPE = 'CELLS'``) and a :class:`PiffPsf`
as a grid of its kernel images over the image it came with (Piff's own model is not
written: storing it would need a pickle).
"""

from __future__ import annotations

import importlib
import io
import math
import pickle

import numpy as np

from ...errors import PsfError
from ..psf import Psf, _resize_centred, _shift_image

__all__ = ["PiffPsf", "CellPsf", "load_piff_pickle", "piff_available"]


def piff_available() -> bool:
    """Whether the optional ``piff`` package (and GalSim) can be imported."""
    try:
        importlib.import_module("piff")
    except Exception:
        return False
    return True


class PiffPsf(Psf):
    """A Piff PSF model (``piff.PSF``), evaluated by Piff itself.

    Parameters
    ----------
    model : piff.PSF
    stamp_size : int
        Side of the kernel images (made odd).
    average_position : (float, float)
        Parent position used when none is given (the mean position of the model's stars,
        as afw's ``PiffPsf.getAveragePosition``, else the image centre).
    bbox : Box, optional
        The image the model came with: :func:`~gpudiff.image.io.psf_to_hdus` writes the
        model as a grid of kernel images over it.
    """

    spatially_constant = False

    def __init__(self, model, stamp_size: int, average_position=(0.0, 0.0), bbox=None):
        self.model = model
        self._size = int(stamp_size) | 1
        self.average_position = (float(average_position[0]), float(average_position[1]))
        self.bbox = bbox

    @property
    def size(self) -> int:
        return self._size

    def _draw(self, x: float, y: float, size: int) -> np.ndarray:
        try:
            img = np.array(
                self.model.draw(float(x), float(y), stamp_size=int(size), center=True).array,
                dtype=np.float64,
            )
        except Exception as exc:  # Piff raises its own types (e.g. chromatic models)
            raise PsfError(
                f"Piff could not draw the PSF at ({x}, {y}): {type(exc).__name__}: {exc}"
            ) from exc
        s = img.sum()
        if not (np.isfinite(img).all() and s > 0):
            raise PsfError(f"Piff drew a PSF at ({x}, {y}) with sum {s}")
        return img / s

    def kernel_image(self, x=None, y=None, size=None):
        x, y = self._pos(x, y)
        return self._draw(round(x), round(y), self.size if size is None else int(size))

    def compute_image(self, x=None, y=None, size=None):
        x, y = self._pos(x, y)
        size = self.size if size is None else int(size)
        img = _shift_image(self._draw(x, y, size), x - round(x), y - round(y))
        img = _resize_centred(img, size)
        s = img.sum()
        if not s > 0:
            raise PsfError("PiffPsf: shifted image has non-positive sum")
        return img / s

    def __repr__(self):
        return f"PiffPsf({type(self.model).__name__}, size={self.size})"


class CellPsf(Psf):
    """The PSF of a cell-based coadd: one kernel image per cell, constant within the cell.

    Parameters
    ----------
    images : array (ny, nx, s, s)
        Kernel image of cell (i, j) (row i, column j of the cells covering the image);
        a cell without a PSF (lsst-images' "missing" cells) is all NaN.
    x0, y0 : int
        Parent position of the first cell's lower-left pixel.
    cell_width, cell_height : int
        Cell size in pixels.

    Notes
    -----
    A position outside every cell, or in a missing cell, gets the kernel of the nearest
    cell that has one.
    """

    spatially_constant = False

    def __init__(self, images, x0: int, y0: int, cell_width: int, cell_height: int):
        imgs = np.array(images, dtype=np.float64)
        if imgs.ndim != 4 or imgs.shape[2] != imgs.shape[3]:
            raise PsfError(f"CellPsf images must have shape (ny, nx, s, s), got {imgs.shape}")
        if cell_width <= 0 or cell_height <= 0:
            raise PsfError(
                f"CellPsf cells must have a positive size, got {cell_width}x{cell_height}"
            )
        if imgs.shape[2] % 2 == 0:  # odd kernels, afw's centre convention
            imgs = np.stack([np.stack([_odd(im) for im in row]) for row in imgs])
        sums = imgs.sum(axis=(2, 3))
        self.valid = np.isfinite(imgs).all(axis=(2, 3)) & (sums > 0)
        if not self.valid.any():
            raise PsfError("CellPsf has no cell with a usable PSF image")
        self.images = np.where(
            self.valid[..., None, None],
            imgs / np.where(self.valid, sums, 1.0)[..., None, None],
            np.nan,
        )
        self.x0, self.y0, self.cell_width, self.cell_height = (
            int(x0),
            int(y0),
            int(cell_width),
            int(cell_height),
        )
        ny, nx = self.valid.shape
        cy, cx = (ny - 1) / 2.0, (nx - 1) / 2.0
        i, j = min(
            zip(*np.nonzero(self.valid)), key=lambda ij: (ij[0] - cy) ** 2 + (ij[1] - cx) ** 2
        )
        self.average_position = self._centre(int(i), int(j))

    def _centre(self, i: int, j: int) -> tuple[float, float]:
        return (
            self.x0 + (j + 0.5) * self.cell_width - 0.5,
            self.y0 + (i + 0.5) * self.cell_height - 0.5,
        )

    @property
    def size(self) -> int:
        return self.images.shape[2]

    def cell_of(self, x: float, y: float) -> tuple[int, int]:
        """(row, column) of the cell used at parent position (x, y)."""
        ny, nx = self.valid.shape
        i = min(max(int(math.floor((y + 0.5 - self.y0) / self.cell_height)), 0), ny - 1)
        j = min(max(int(math.floor((x + 0.5 - self.x0) / self.cell_width)), 0), nx - 1)
        if not self.valid[i, j]:
            ii, jj = np.nonzero(self.valid)
            k = int(np.argmin((ii - i) ** 2 + (jj - j) ** 2))
            i, j = int(ii[k]), int(jj[k])
        return i, j

    def compute_image(self, x=None, y=None, size=None):
        x, y = self._pos(x, y)
        img = _shift_image(self.images[self.cell_of(x, y)], x - round(x), y - round(y))
        img = _resize_centred(img, self.size if size is None else int(size))
        s = img.sum()
        if not s > 0:
            raise PsfError("CellPsf: shifted/cropped image has non-positive sum")
        return img / s

    def __repr__(self):
        ny, nx = self.valid.shape
        return f"CellPsf(cells={ny}x{nx} of {self.cell_width}x{self.cell_height}, size={self.size})"


def _odd(img: np.ndarray) -> np.ndarray:
    """An even square kernel padded to odd, input pixel (n-1)//2 on the centre (afw's, as
    ImagePsf)."""
    n = img.shape[0]
    out = np.zeros((n + 1, n + 1))
    out[1:, 1:] = img
    return out


# ------------------------------------------------------------------------------ Piff pickles
# afw stores a PiffPsf as a pickle of (width, height, piff.PSF).  Unpickling runs code named
# by the file, so only the classes such a pickle needs are let through.
_PICKLE_MODULES = ("piff", "galsim", "numpy", "coord", "treecorr")
_PICKLE_BUILTINS = {
    ("builtins", n)
    for n in (
        "set",
        "frozenset",
        "dict",
        "list",
        "tuple",
        "slice",
        "complex",
        "range",
        "bytearray",
        "object",
        "bool",
        "int",
        "float",
        "str",
    )
}
_PICKLE_OTHER = {
    ("copyreg", "_reconstructor"),
    ("collections", "OrderedDict"),
    ("_codecs", "encode"),
    ("functools", "partial"),
}


class _PiffUnpickler(pickle.Unpickler):
    def find_class(self, module, name):
        top = module.split(".")[0]
        if top in _PICKLE_MODULES or (module, name) in _PICKLE_BUILTINS | _PICKLE_OTHER:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(
            f"refusing to load {module}.{name} from a PSF pickle "
            "(only Piff, GalSim and NumPy classes are allowed)"
        )


def load_piff_pickle(data: bytes):
    """(width, height, piff.PSF) from afw's PiffPsf pickle, repaired for Piff ≥ 1.4 as
    ``lsst.meas.extensions.piff`` does (and for the PixelGrid caches newer Piff expects)."""
    width, height, model = _PiffUnpickler(io.BytesIO(data)).load()
    if not hasattr(model, "_num"):  # pickles from Piff < 1.4
        model._num = None
        for part, attrs in (("model", ("_num", "_fit_flux")), ("interp", ("_num",))):
            obj = getattr(model, part, None)
            for a in attrs:
                if obj is not None and not hasattr(obj, a):
                    setattr(obj, a, None)
    m = getattr(model, "model", None)
    for a in ("_maxk", "_stepk"):  # PixelGrid's cached Fourier scales (0: let GalSim choose)
        if m is not None and type(m).__name__ == "PixelGrid" and not hasattr(m, a):
            setattr(m, a, 0.0)
    return int(width), int(height), model


def piff_average_position(model, default):
    """The mean position of a Piff model's unflagged, unreserved stars (afw's choice), else
    ``default``."""
    try:
        pos = [
            (s.image_pos.x, s.image_pos.y)
            for s in model.stars
            if not s.is_flagged and not s.is_reserve
        ]
    except Exception:
        pos = []
    if not pos:
        return default
    return (float(np.mean([p[0] for p in pos])), float(np.mean([p[1] for p in pos])))

"""Mask-plane definitions: the name ↔ bit dictionary of an LSST-style integer mask.

Mask planes are addressed by **name**, never by bit number (spec §0.6, §12).  Two masks
made by different software may use different bits for the same name; :meth:`MaskPlanes.conform`
re-maps one mask's bits onto another's definition.
"""

from __future__ import annotations

from typing import Any, Iterable, Iterator, Mapping

import numpy as np

from ..errors import MaskPlaneError

__all__ = ["MaskPlanes", "DEFAULT_MASK_PLANES", "MAX_MASK_PLANES"]

#: afw's default planes, in bit order (spec §0.6).
DEFAULT_MASK_PLANES: tuple[str, ...] = (
    "BAD",
    "SAT",
    "INTRP",
    "CR",
    "EDGE",
    "DETECTED",
    "DETECTED_NEGATIVE",
    "SUSPECT",
    "NO_DATA",
    "VIGNETTED",
    "STREAK",
)

#: Masks are int32; bit 31 is the sign bit, which we leave unused like afw.
MAX_MASK_PLANES = 31

_HEADER_PREFIX = "MP_"


class MaskPlanes(Mapping[str, int]):
    """An ordered mapping from mask-plane name to bit number.

    Parameters
    ----------
    planes : mapping of str to int, optional
        Name → bit.  Defaults to LSST's default planes (BAD=0 … STREAK=10).

    Notes
    -----
    The object is mutable only through :meth:`add`, which never changes an existing
    name's bit; every :class:`~gpudiff.image.MaskedImage` owns its own copy so adding a
    plane to one image never changes another.
    """

    def __init__(self, planes: Mapping[str, int] | None = None):
        if planes is None:
            planes = {name: bit for bit, name in enumerate(DEFAULT_MASK_PLANES)}
        self._bits: dict[str, int] = {}
        for name, bit in sorted(planes.items(), key=lambda kv: int(kv[1])):
            self._insert(name, int(bit))

    # --- mapping protocol -------------------------------------------------------------
    def __getitem__(self, name: str) -> int:
        try:
            return self._bits[self._norm(name)]
        except KeyError:
            raise MaskPlaneError(
                f"unknown mask plane {name!r}; defined planes are {list(self._bits)}"
            ) from None

    def __iter__(self) -> Iterator[str]:
        return iter(self._bits)

    def __len__(self) -> int:
        return len(self._bits)

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and self._norm(name) in self._bits

    def __eq__(self, other: object) -> bool:
        if isinstance(other, MaskPlanes):
            return self._bits == other._bits
        return NotImplemented

    def __repr__(self) -> str:
        return f"MaskPlanes({self._bits})"

    # --- helpers ----------------------------------------------------------------------
    @staticmethod
    def _norm(name: str) -> str:
        return str(name).strip().upper()

    def _insert(self, name: str, bit: int) -> None:
        name = self._norm(name)
        if not name:
            raise MaskPlaneError("mask plane names must not be empty")
        if not 0 <= bit < MAX_MASK_PLANES:
            raise MaskPlaneError(f"mask plane {name!r} has bit {bit}, outside 0..{MAX_MASK_PLANES - 1}")
        if name in self._bits and self._bits[name] != bit:
            raise MaskPlaneError(f"mask plane {name!r} defined twice, with bits {self._bits[name]} and {bit}")
        owner = next((n for n, b in self._bits.items() if b == bit and n != name), None)
        if owner is not None:
            raise MaskPlaneError(f"mask planes {owner!r} and {name!r} both claim bit {bit}")
        self._bits[name] = bit

    def copy(self) -> "MaskPlanes":
        """An independent copy."""
        return MaskPlanes(self._bits)

    # --- API --------------------------------------------------------------------------
    def bit(self, name: str) -> int:
        """The bit number of plane ``name``."""
        return self[name]

    def bitmask(self, names: str | Iterable[str]) -> int:
        """The OR of ``1 << bit`` over ``names`` (LSST's ``getPlaneBitMask``).

        Unknown names raise :class:`MaskPlaneError`; use :meth:`bitmask_if_present` when
        a plane may legitimately be absent (e.g. ``SAT_TEMPLATE``).
        """
        if isinstance(names, str):
            names = [names]
        value = 0
        for n in names:
            value |= 1 << self[n]
        return value

    def bitmask_if_present(self, names: str | Iterable[str]) -> int:
        """Like :meth:`bitmask`, silently skipping planes that are not defined."""
        if isinstance(names, str):
            names = [names]
        return self.bitmask([n for n in names if n in self])

    def add(self, name: str) -> int:
        """Define plane ``name`` (if new) on the lowest free bit; return its bit."""
        key = self._norm(name)
        if key in self._bits:
            return self._bits[key]
        used = set(self._bits.values())
        free = next((b for b in range(MAX_MASK_PLANES) if b not in used), None)
        if free is None:
            raise MaskPlaneError(f"cannot add mask plane {key!r}: all {MAX_MASK_PLANES} bits are in use")
        self._insert(key, free)
        return free

    def merge(self, other: Mapping[str, int]) -> "MaskPlanes":
        """Return a new definition holding this one's planes plus ``other``'s new names.

        Existing names keep their bits; names only in ``other`` get free bits here (their
        bit in ``other`` when it is free, else the lowest free one).
        """
        out = self.copy()
        new = [(out._norm(n), int(b)) for n, b in other.items() if n not in out]
        used = set(out._bits.values())
        # Two passes so that a name whose bit is free keeps it even when an earlier name
        # had to move.
        moved = []
        for name, bit in new:
            if bit not in used and 0 <= bit < MAX_MASK_PLANES:
                out._insert(name, bit)
                used.add(bit)
            else:
                moved.append(name)
        for name in moved:
            out.add(name)
        return out

    def conform(self, mask: Any, source: Mapping[str, int], xp: Any = np) -> Any:
        """Re-map the bits of ``mask`` (defined by ``source``) onto this definition.

        Every plane of ``source`` must exist here (merge first if not).  Bits of
        ``mask`` that ``source`` does not name are dropped: they carry no meaning.

        Parameters
        ----------
        mask : int array
            Mask defined with ``source``'s bits; not modified.
        source : mapping of str to int
            The plane definition that ``mask`` uses.
        xp : module
            Array namespace of ``mask`` (NumPy or CuPy).
        """
        missing = [n for n in source if n not in self]
        if missing:
            raise MaskPlaneError(
                f"cannot conform mask: planes {missing} are not defined in the target "
                f"definition {list(self._bits)}; merge the definitions first"
            )
        mapping = [(int(b), self[n]) for n, b in source.items()]
        if all(s == t for s, t in mapping):
            known = sum(1 << s for s, _ in mapping)
            return xp.bitwise_and(mask, xp.int32(known)).astype(xp.int32)
        out = xp.zeros(mask.shape, dtype=xp.int32)
        for s, t in mapping:
            out |= ((mask >> s) & 1).astype(xp.int32) << t
        return out

    def interpret(self, value: int) -> list[str]:
        """Names of the planes set in the integer ``value`` (unknown bits as ``"BIT<n>"``)."""
        value = int(value)
        by_bit = {b: n for n, b in self._bits.items()}
        names = []
        for b in range(32):
            if value & (1 << b):
                names.append(by_bit.get(b, f"BIT{b}"))
        return names

    # --- FITS headers -----------------------------------------------------------------
    def to_header(self, header: Any) -> None:
        """Write ``MP_<NAME> = bit`` cards into an ``astropy.io.fits.Header``.

        Names longer than the 8-character FITS keyword limit are written as HIERARCH
        cards, as LSST does (``HIERARCH MP_DETECTED_NEGATIVE = 6``).
        """
        for key in [k for k in header.keys() if self._is_mp_key(k)]:
            del header[key]
        for name, bit in self._bits.items():
            key = _HEADER_PREFIX + name
            if len(key) > 8:
                key = "HIERARCH " + key
            header[key] = (bit, "mask plane bit")

    @staticmethod
    def _is_mp_key(key: str) -> bool:
        k = key.upper()
        if k.startswith("HIERARCH "):
            k = k[len("HIERARCH "):]
        return k.startswith(_HEADER_PREFIX)

    @classmethod
    def from_header(cls, header: Any, default: bool = True) -> "MaskPlanes":
        """Read ``MP_*`` cards (HIERARCH or not) from a FITS header.

        Parameters
        ----------
        header : astropy.io.fits.Header
        default : bool
            Return LSST's default planes when the header has no ``MP_*`` card.
        """
        planes: dict[str, int] = {}
        for key in header.keys():
            k = key.upper()
            if k.startswith("HIERARCH "):
                k = k[len("HIERARCH "):]
            if not k.startswith(_HEADER_PREFIX):
                continue
            try:
                planes[k[len(_HEADER_PREFIX):]] = int(header[key])
            except (TypeError, ValueError):
                raise MaskPlaneError(f"mask header card {key!r} = {header[key]!r} is not an integer bit") from None
        if not planes:
            return cls() if default else cls({})
        return cls(planes)

"""Mask-plane definitions: the name ↔ bit dictionary of an LSST-style integer mask.

Mask planes are addressed by **name**, never by bit number (docs/algorithms.md §0.6, §12).  Two
masks made by different software may use different bits for the same name;
:meth:`MaskPlanes.conform` re-maps one mask's bits onto another's definition.

**Names and aliases.**  A plane keeps the spelling of the file it came from; afw's and
lsst-images' spellings of the same plane are aliases (:data:`MASK_PLANE_ALIASES`: ``SAT`` ≡
``SATURATED``, ``CR`` ≡ ``COSMIC_RAY``, ``INTRP`` ≡ ``INTERPOLATED``, ``EDGE`` ≡
``DETECTION_EDGE``, ``UNMASKEDNAN`` ≡ ``UNMASKED_NAN``).  Every lookup by name goes
through one place, :meth:`MaskPlanes.resolve`, so an algorithm asking for ``SAT`` finds the
``SATURATED`` plane of an lsst-images file; :meth:`MaskPlanes.bitmask` ORs the bits of every
defined spelling (a definition may hold both).

**Width.**  A mask holding only planes on bits 0…30 is int32 (afw's and lsst-images' FITS
word; bit 31, the sign bit, is left unused); a definition with a plane on bit 31…62 makes
the mask int64 (:func:`mask_dtype`).  Files store such masks as one int32 ``MASK`` HDU per
31 planes (lsst-images' ``EXTVER`` 2, 3, …).

**FITS cards.**  :meth:`MaskPlanes.to_header` writes afw's ``MP_<NAME> = bit`` cards and
lsst-images' ``MSKNnnnn`` (name), ``MSKMnnnn`` (bit mask ``1 << n``), ``MSKDnnnn``
(description) cards; :meth:`MaskPlanes.from_header` reads either.
"""

from __future__ import annotations

import re
from typing import Any, Iterable, Iterator, Mapping

import numpy as np

from ..errors import MaskPlaneError

__all__ = [
    "MaskPlanes",
    "DEFAULT_MASK_PLANES",
    "MAX_MASK_PLANES",
    "INT32_MASK_PLANES",
    "MASK_PLANE_ALIASES",
    "PLANE_DESCRIPTIONS",
    "KNOWN_PLANES",
    "mask_dtype",
    "plane_aliases",
]

#: afw's default planes, in bit order (docs/algorithms.md §0.6).
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

#: Spellings of one plane: afw's first, lsst-images' second.
MASK_PLANE_ALIASES: tuple[tuple[str, ...], ...] = (
    ("SAT", "SATURATED"),
    ("CR", "COSMIC_RAY"),
    ("INTRP", "INTERPOLATED"),
    ("EDGE", "DETECTION_EDGE"),
    ("UNMASKEDNAN", "UNMASKED_NAN"),
)
_ALIAS_OF: dict[str, tuple[str, ...]] = {
    name: group for group in MASK_PLANE_ALIASES for name in group
}

#: Planes a mask may hold: bits 0…62 of an int64 (the sign bit is left unused, as afw does).
MAX_MASK_PLANES = 63
#: Planes an int32 mask (and one FITS ``MASK`` HDU) holds: bits 0…30.
INT32_MASK_PLANES = 31

#: One-line descriptions written as ``MSKDnnnn`` cards for planes that carry none of their own.
PLANE_DESCRIPTIONS: dict[str, str] = {
    "BAD": "Bad pixel (instrument defect).",
    "SAT": "Saturated pixel, or affected by a saturated neighbour.",
    "INTRP": "Pixel value was interpolated.",
    "CR": "Pixel was hit by a cosmic ray.",
    "EDGE": "Too close to the edge for detection.",
    "DETECTED": "Part of a detected source.",
    "DETECTED_NEGATIVE": "Part of a detected negative source.",
    "SUSPECT": "Pixel value is near saturation or otherwise suspect.",
    "NO_DATA": "No usable data at this pixel.",
    "VIGNETTED": "Pixel was vignetted.",
    "STREAK": "Part of a satellite or meteor streak.",
    "SAT_TEMPLATE": "The template pixel was saturated.",
    "CLIPPED": "Rejected as an artifact when comparing warps.",
    "REJECTED": "An input was left out of the coadd at this pixel.",
    "SENSOR_EDGE": "Near the edge of an input sensor.",
    "INEXACT_PSF": "The coadd PSF is inexact at this pixel.",
    "UNMASKEDNAN": "Pixel was NaN without being masked.",
    "CROSSTALK": "Pixel was corrected for crosstalk.",
    "PARTLY_VIGNETTED": "Pixel was partly vignetted.",
    "ITL_DIP": "Dark trail of a bright source on an ITL sensor.",
    "NOT_DEBLENDED": "Part of a detection too large to deblend.",
    "SPIKE": "Near a diffraction spike of a bright star.",
    "HIGH_VARIANCE": "The template had few inputs here: high noise.",
    "INJECTED": "A synthetic source was injected here.",
    "INJECTED_CORE": "Core of an injected synthetic source.",
    "INJECTED_TEMPLATE": "A synthetic source was injected into the template here.",
    "INJECTED_CORE_TEMPLATE": "Core of a synthetic source injected into the template.",
    "FAKE": "A fake source was added here.",
}
for _group in MASK_PLANE_ALIASES:
    for _name in _group[1:]:
        PLANE_DESCRIPTIONS.setdefault(_name, PLANE_DESCRIPTIONS.get(_group[0], ""))

#: Plane names whose meaning gpudiff knows (LSST's, in both spellings); a reader warns about others.
KNOWN_PLANES: frozenset[str] = frozenset(PLANE_DESCRIPTIONS)

_MP_PREFIX = "MP_"
_MSK_KEY = re.compile(r"^MSK([NMD])(\d{4})$")


def _norm(name: str) -> str:
    return str(name).strip().upper()


def plane_aliases(name: str) -> tuple[str, ...]:
    """All spellings of plane ``name`` (normalized), itself first."""
    key = _norm(name)
    return (key, *[n for n in _ALIAS_OF.get(key, ()) if n != key])


def mask_dtype(planes: Mapping[str, int] | None) -> np.dtype:
    """The mask dtype a definition needs: int32 while every bit is below 31, else int64."""
    top = max((int(b) for b in (planes or {}).values()), default=-1)
    return np.dtype(np.int32 if top < INT32_MASK_PLANES else np.int64)


class MaskPlanes(Mapping[str, int]):
    """An ordered mapping from mask-plane name to bit number.

    Parameters
    ----------
    planes : mapping of str to int, optional
        Name → bit (0…62).  Defaults to LSST's default planes (BAD=0 … STREAK=10).
    descriptions : mapping of str to str, optional
        Name → description (lsst-images' ``MSKD`` cards); kept through copies, merges and
        files.  Not part of equality.

    Notes
    -----
    The object is mutable only through :meth:`add` (and :meth:`set_description`), which
    never changes an existing name's bit; every :class:`~gpudiff.image.MaskedImage` owns
    its own copy so adding a plane to one image never changes another.  Names are
    case-insensitive and alias-aware (module docstring): ``planes["SAT"]`` is the bit of
    ``SATURATED`` when only that spelling is defined.
    """

    def __init__(
        self, planes: Mapping[str, int] | None = None, descriptions: Mapping[str, str] | None = None
    ):
        if planes is None:
            planes = {name: bit for bit, name in enumerate(DEFAULT_MASK_PLANES)}
        self._bits: dict[str, int] = {}
        self._desc: dict[str, str] = {}
        for name, bit in sorted(planes.items(), key=lambda kv: int(kv[1])):
            self._insert(name, int(bit))
        for name, text in (descriptions or {}).items():
            if _norm(name) in self._bits and text:
                self._desc[_norm(name)] = str(text)

    # --- the one lookup by name -------------------------------------------------------
    def resolve(self, name: str) -> str | None:
        """The defined plane that ``name`` designates: ``name`` itself (any case), else
        the first defined alias of it (``SAT`` → ``SATURATED``), else ``None``."""
        return next((n for n in plane_aliases(name) if n in self._bits), None)

    def bits_of(self, name: str) -> list[int]:
        """The bits of every defined spelling of ``name`` (empty when none is defined)."""
        return [self._bits[n] for n in plane_aliases(name) if n in self._bits]

    # --- mapping protocol -------------------------------------------------------------
    def __getitem__(self, name: str) -> int:
        key = self.resolve(name)
        if key is None:
            raise MaskPlaneError(
                f"unknown mask plane {name!r}; defined planes are {list(self._bits)}"
            ) from None
        return self._bits[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._bits)

    def __len__(self) -> int:
        return len(self._bits)

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and self.resolve(name) is not None

    def __eq__(self, other: object) -> bool:
        if isinstance(other, MaskPlanes):
            return self._bits == other._bits
        return NotImplemented

    def __repr__(self) -> str:
        return f"MaskPlanes({self._bits})"

    # --- helpers ----------------------------------------------------------------------
    _norm = staticmethod(_norm)

    def _insert(self, name: str, bit: int) -> None:
        name = _norm(name)
        if not name:
            raise MaskPlaneError("mask plane names must not be empty")
        if not 0 <= bit < MAX_MASK_PLANES:
            raise MaskPlaneError(
                f"mask plane {name!r} has bit {bit}, outside 0..{MAX_MASK_PLANES - 1}"
            )
        if name in self._bits and self._bits[name] != bit:
            raise MaskPlaneError(
                f"mask plane {name!r} defined twice, with bits {self._bits[name]} and {bit}"
            )
        owner = next((n for n, b in self._bits.items() if b == bit and n != name), None)
        if owner is not None:
            raise MaskPlaneError(f"mask planes {owner!r} and {name!r} both claim bit {bit}")
        self._bits[name] = bit

    def copy(self) -> "MaskPlanes":
        """An independent copy (descriptions included)."""
        return MaskPlanes(self._bits, self._desc)

    @property
    def dtype(self) -> np.dtype:
        """The mask dtype this definition needs (:func:`mask_dtype`)."""
        return mask_dtype(self._bits)

    # --- API --------------------------------------------------------------------------
    def bit(self, name: str) -> int:
        """The bit number of plane ``name``."""
        return self[name]

    def bitmask(self, names: str | Iterable[str]) -> int:
        """The OR of ``1 << bit`` over ``names`` and their defined aliases (LSST's
        ``getPlaneBitMask``).

        Unknown names raise :class:`MaskPlaneError`; use :meth:`bitmask_if_present` when
        a plane may legitimately be absent (e.g. ``SAT_TEMPLATE``).
        """
        if isinstance(names, str):
            names = [names]
        value = 0
        for n in names:
            bits = self.bits_of(n)
            if not bits:
                self[n]  # raises the "unknown mask plane" error
            for b in bits:
                value |= 1 << b
        return value

    def bitmask_if_present(self, names: str | Iterable[str]) -> int:
        """Like :meth:`bitmask`, silently skipping planes that are not defined."""
        if isinstance(names, str):
            names = [names]
        return self.bitmask([n for n in names if n in self])

    def add(self, name: str) -> int:
        """Define plane ``name`` (if neither it nor an alias is defined) on the lowest free
        bit; return its bit (the alias's when one is defined)."""
        key = self.resolve(name)
        if key is not None:
            return self._bits[key]
        key = _norm(name)
        used = set(self._bits.values())
        free = next((b for b in range(MAX_MASK_PLANES) if b not in used), None)
        if free is None:
            raise MaskPlaneError(
                f"cannot add mask plane {key!r}: all {MAX_MASK_PLANES} bits are in use"
            )
        self._insert(key, free)
        return free

    def description(self, name: str) -> str:
        """The description of plane ``name``: its own (from a file), else gpudiff's, else ''."""
        key = self.resolve(name) or _norm(name)
        return self._desc.get(key) or PLANE_DESCRIPTIONS.get(key, "")

    @property
    def descriptions(self) -> dict[str, str]:
        """The descriptions this definition carries of its own (name → text)."""
        return dict(self._desc)

    def set_description(self, name: str, text: str) -> None:
        """Attach ``text`` to the defined plane ``name``."""
        key = self.resolve(name)
        if key is None:
            self[name]  # raises the "unknown mask plane" error
        self._desc[key] = str(text)

    def merge(self, other: Mapping[str, int]) -> "MaskPlanes":
        """Return a new definition holding this one's planes plus ``other``'s new names.

        Existing names (or their aliases) keep their bits; names only in ``other`` get free
        bits here (their bit in ``other`` when it is free, else the lowest free one).
        """
        out = self.copy()
        new = [(_norm(n), int(b)) for n, b in other.items() if n not in out]
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
        for name, text in other.descriptions.items() if isinstance(other, MaskPlanes) else ():
            key = out.resolve(name)
            if key is not None and key not in out._desc:
                out._desc[key] = text
        return out

    def conform(self, mask: Any, source: Mapping[str, int], xp: Any = np) -> Any:
        """Re-map the bits of ``mask`` (defined by ``source``) onto this definition.

        Every plane of ``source`` must exist here, under its name or an alias (merge
        first if not).  Bits of ``mask`` that ``source`` does not name are dropped: they
        carry no meaning.  The result has this definition's dtype (:func:`mask_dtype`).

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
        dtype = self.dtype
        mapping = [(int(b), self[n]) for n, b in source.items()]
        known = sum(1 << s for s, _ in mapping)
        src = np.dtype(mask.dtype)
        if (
            all(s == t for s, t in mapping)
            and known < (1 << (8 * src.itemsize - 1))
            and src.itemsize <= dtype.itemsize
        ):
            return xp.bitwise_and(mask, src.type(known)).astype(dtype)
        out = xp.zeros(mask.shape, dtype=dtype)
        for s, t in mapping:
            out |= ((mask >> s) & 1).astype(dtype) << dtype.type(t)
        return out

    def interpret(self, value: int) -> list[str]:
        """Names of the planes set in the integer ``value`` (unknown bits as ``"BIT<n>"``)."""
        value = int(value)
        by_bit = {b: n for n, b in self._bits.items()}
        return [by_bit.get(b, f"BIT{b}") for b in range(64) if value & (1 << b)]

    # --- FITS headers -----------------------------------------------------------------
    @property
    def n_words(self) -> int:
        """Int32 words (FITS ``MASK`` HDUs) needed to hold every plane: 1 for bits 0…30."""
        top = max(self._bits.values(), default=0)
        return top // INT32_MASK_PLANES + 1

    def to_header(self, header: Any, word: int | None = None) -> None:
        """Write this definition's cards into an ``astropy.io.fits.Header``.

        Old ``MP_*`` and ``MSK*`` cards are removed first.  ``word=None`` describes one
        array holding every bit (``MP_<NAME> = bit``; ``MSKNnnnn``/``MSKMnnnn``/``MSKDnnnn``
        with n = bit).  ``word=k`` describes the int32 ``MASK`` HDU number k + 1 of a mask
        split into words of 31 planes: its planes (bits 31k…31k+30) as ``MSK*`` cards with
        n = bit − 31k, and, for k = 0 only, as ``MP_*`` cards (afw reads one HDU).  Names
        longer than the 8-character keyword limit become HIERARCH cards, as LSST does
        (``HIERARCH MP_DETECTED_NEGATIVE = 6``).
        """
        for key in [k for k in header.keys() if self._is_mp_key(k) or _MSK_KEY.match(k.upper())]:
            del header[key]
        lo, hi = (
            (0, MAX_MASK_PLANES)
            if word is None
            else (INT32_MASK_PLANES * word, INT32_MASK_PLANES * (word + 1))
        )
        planes = [(n, b) for n, b in self._bits.items() if lo <= b < hi]
        if word in (None, 0):
            for name, bit in planes:
                key = _MP_PREFIX + name
                header["HIERARCH " + key if len(key) > 8 else key] = (bit, "mask plane bit")
        for name, bit in planes:
            n = bit - lo
            header[f"MSKN{n:04d}"] = (name, f"Name for mask plane {n}.")
            header[f"MSKM{n:04d}"] = (1 << n, f"Bitmask for plane n={n}; always 1<<n.")
            header[f"MSKD{n:04d}"] = self.description(name)

    @staticmethod
    def _is_mp_key(key: str) -> bool:
        k = key.upper()
        if k.startswith("HIERARCH "):
            k = k[len("HIERARCH ") :]
        return k.startswith(_MP_PREFIX)

    @staticmethod
    def header_cards(header: Any) -> str | None:
        """Which plane cards ``header`` has: ``'MSK'`` (lsst-images), ``'MP'`` (afw), or None."""
        keys = [str(k).upper() for k in header.keys()]
        if any(_MSK_KEY.match(k) and k.startswith("MSKN") for k in keys):
            return "MSK"
        if any(MaskPlanes._is_mp_key(k) for k in keys):
            return "MP"
        return None

    @classmethod
    def from_header(cls, header: Any, default: bool = True, word: int = 0) -> "MaskPlanes":
        """Read the planes of a FITS header: lsst-images' ``MSKNnnnn``/``MSKMnnnn``/``MSKDnnnn``
        cards when present (bit = log2 ``MSKM`` + 31·``word``, ``word`` = EXTVER − 1 of
        the ``MASK`` HDU), else afw's ``MP_*`` cards (HIERARCH or not).

        Parameters
        ----------
        header : astropy.io.fits.Header
        default : bool
            Return LSST's default planes when the header has neither kind of card.
        word : int
            The 31-plane word this HDU holds (lsst-images' ``EXTVER`` 2 holds word 1).
        """
        if cls.header_cards(header) == "MSK":
            return cls._from_msk(header, word)
        planes: dict[str, int] = {}
        for key in header.keys():
            k = key.upper()
            if k.startswith("HIERARCH "):
                k = k[len("HIERARCH ") :]
            if not k.startswith(_MP_PREFIX):
                continue
            try:
                planes[k[len(_MP_PREFIX) :]] = int(header[key])
            except (TypeError, ValueError):
                raise MaskPlaneError(
                    f"mask header card {key!r} = {header[key]!r} is not an integer bit"
                ) from None
        if not planes:
            return cls() if default else cls({})
        return cls(planes)

    @classmethod
    def _from_msk(cls, header: Any, word: int) -> "MaskPlanes":
        names: dict[int, str] = {}
        for key in header.keys():
            m = _MSK_KEY.match(str(key).upper())
            if m and m.group(1) == "N":
                names[int(m.group(2))] = str(header[key]).strip()
        planes, desc = {}, {}
        for n, name in sorted(names.items()):
            value = header.get(f"MSKM{n:04d}", 1 << n)
            try:
                value = int(value)
            except (TypeError, ValueError):
                raise MaskPlaneError(
                    f"mask header card MSKM{n:04d} = {value!r} is not an integer"
                ) from None
            if value <= 0 or value & (value - 1):
                raise MaskPlaneError(
                    f"mask header card MSKM{n:04d} = {value} is not a single bit (1 << n)"
                )
            planes[name] = value.bit_length() - 1 + INT32_MASK_PLANES * word
            text = header.get(f"MSKD{n:04d}")
            if text:
                desc[name] = str(text)
        return cls(planes, desc)

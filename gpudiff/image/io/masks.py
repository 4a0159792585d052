"""Mask HDUs: reading afw's ``MP_*`` and lsst-images' ``MSKN/MSKM/MSKD`` planes over one or
more ``MASK`` HDUs, and writing both kinds of cards."""

from __future__ import annotations

import re

import numpy as np
from astropy.io import fits

from ...errors import FitsReadError, MaskPlaneError
from ..maskplanes import (
    DEFAULT_MASK_PLANES,
    INT32_MASK_PLANES,
    KNOWN_PLANES,
    MAX_MASK_PLANES,
    MaskPlanes,
)
from ._common import mask_bits, role_of, warn

__all__ = ["read_mask", "mask_hdus"]


def read_mask(
    path: str, hdus: list, shape: tuple[int, int], headers: list | None = None, foreign: bool = True
) -> tuple[np.ndarray, MaskPlanes]:
    """The mask (int64 bits) and planes of the ``MASK`` HDUs ``hdus`` (EXTVER order).

    HDU k (EXTVER k + 1) holds planes 31k…31k+30 (lsst-images' split of a wide mask).  Plane
    names come from ``MSK*`` cards, else ``MP_*`` cards; a file with neither gets afw's
    default planes, with a warning saying so.  Bits set in the data that no card names are
    kept as planes ``BIT<n>``, with a warning.  Plane bits are the file's where they can be.
    ``headers`` (one per HDU) name the planes instead of the HDUs' own headers.  In a
    ``foreign`` file (not gpudiff's own), planes whose meaning gpudiff does not know
    (:data:`~gpudiff.image.maskplanes.KNOWN_PLANES`) are kept under their names, with a warning.
    """
    raws = [mask_bits(path, h, shape) for h in hdus]
    headers = [h.header for h in hdus] if headers is None else headers
    kinds = [MaskPlanes.header_cards(h) for h in headers]
    if not any(kinds):
        planes = MaskPlanes()
        if len(hdus) > 1:
            raise FitsReadError(
                f"{path}: {len(hdus)} MASK HDUs but none names its planes (no MP_* or MSK* cards)"
            )
        warn(
            path,
            f"{role_of(hdus[0]) or 'MASK'} HDU has no MP_* or MSK* cards naming its planes: "
            "assumed afw's "
            "default bits " + ", ".join(f"{n}={b}" for b, n in enumerate(DEFAULT_MASK_PLANES)),
        )
        entries = [(0, n, b, b) for n, b in planes.items()]
    else:
        entries, merged = [], {}
        for k, h in enumerate(headers):
            if kinds[k] is None:
                warn(
                    path,
                    f"MASK HDU EXTVER {k + 1} has no MP_* or MSK* cards: its bits are kept as "
                    "BIT<n> planes",
                )
                continue
            hp = MaskPlanes.from_header(h, default=False, word=k)
            if kinds[k] == "MSK" and _has_mp(h):
                mp = MaskPlanes.from_header(_only_mp(h), default=False)
                if dict(mp) != {n: b for n, b in hp.items() if b < INT32_MASK_PLANES}:
                    warn(
                        path,
                        f"MASK HDU EXTVER {k + 1}: its MP_* cards {dict(mp)} disagree with its "
                        "MSK* cards "
                        f"{dict(hp)}; used the MSK* cards",
                    )
            for name, bit in hp.items():
                file_bit = bit - INT32_MASK_PLANES * k if kinds[k] == "MSK" else bit
                if name in merged:
                    raise FitsReadError(f"{path}: mask plane {name!r} is defined in two MASK HDUs")
                merged[name] = (bit, hp.descriptions.get(name))
                entries.append((k, name, file_bit, bit))
        try:
            planes = MaskPlanes(
                {n: b for n, (b, _) in merged.items()}, {n: d for n, (_, d) in merged.items() if d}
            )
        except MaskPlaneError as exc:
            raise FitsReadError(
                f"{path}: the MASK HDUs' plane cards are inconsistent ({exc})"
            ) from exc
    unknown = [
        n for n in planes if foreign and n not in KNOWN_PLANES and not re.fullmatch(r"BIT\d+", n)
    ]
    if unknown:
        warn(
            path,
            "mask planes with no LSST meaning known to gpudiff are kept under their own names: "
            + ", ".join(unknown),
        )
    identity = len(raws) == 1 and all(fb == b for _, _, fb, b in entries)
    mask = raws[0] if identity else np.zeros(shape, np.int64)
    if not identity:
        for k, _, fb, b in entries:
            mask |= ((raws[k] >> fb) & 1) << b
    # Bits set in the data that no card names: kept, as BIT<n>, never dropped silently.
    for k, raw in enumerate(raws):
        named = sum(1 << fb for kk, _, fb, _ in entries if kk == k)
        # One reduction, no temporary: the bits set anywhere, then those no card names.
        found = int(np.bitwise_or.reduce(raw, axis=None)) & ~named
        if not found:
            continue
        kept = []
        for fb in (b for b in range(64) if found & (1 << b)):
            want = INT32_MASK_PLANES * k + fb
            name = f"BIT{want}"
            if name not in planes:
                if want < MAX_MASK_PLANES and want not in planes.values():
                    planes._insert(name, want)
                else:
                    planes.add(name)
            hit = ((raw >> fb) & 1).astype(bool)
            mask[hit] |= np.int64(1) << np.int64(planes[name])
            kept.append(f"{name} ({int(hit.sum())} px)")
        warn(
            path,
            f"MASK HDU EXTVER {k + 1} has bits no card names; kept as planes " + ", ".join(kept),
        )
    return mask, planes


def _has_mp(header) -> bool:
    return any(MaskPlanes._is_mp_key(k) for k in header.keys())


def _only_mp(header) -> fits.Header:
    return fits.Header([c for c in header.cards if MaskPlanes._is_mp_key(c.keyword)])


def mask_hdus(mask, planes: MaskPlanes, header: fits.Header) -> list:
    """``MASK`` HDUs of an int mask: one int32 HDU per 31 planes (EXTVER 1, 2, …), each with
    ``MSK*`` cards for its planes, the first also with afw's ``MP_*`` cards; ``header``
    (WCS, xy0) is copied onto each."""
    mask = np.asarray(mask)
    n = planes.n_words
    out = []
    for k in range(n):
        hdr = header.copy()
        if n == 1:
            planes.to_header(hdr)
            data = mask.astype(np.int32)
        else:
            planes.to_header(hdr, word=k)
            data = (
                (mask.astype(np.int64) >> (INT32_MASK_PLANES * k)) & ((1 << INT32_MASK_PLANES) - 1)
            ).astype(np.int32)
        out.append(fits.ImageHDU(data, hdr, name="MASK", ver=k + 1 if n > 1 else None))
    return out

"""Mask-plane algebra: LSST defaults, add/merge/conform/interpret, MP_* header cards."""

from __future__ import annotations

import numpy as np
import pytest
from astropy.io import fits
from hypothesis import given, settings
from hypothesis import strategies as st

from gpudiff.errors import MaskPlaneError
from gpudiff.image import DEFAULT_MASK_PLANES, MaskPlanes


def test_lsst_default_bits():
    mp = MaskPlanes()
    expected = {"BAD": 0, "SAT": 1, "INTRP": 2, "CR": 3, "EDGE": 4, "DETECTED": 5,
                "DETECTED_NEGATIVE": 6, "SUSPECT": 7, "NO_DATA": 8, "VIGNETTED": 9, "STREAK": 10}
    assert dict(mp) == expected
    assert list(mp) == list(DEFAULT_MASK_PLANES)
    assert mp.bitmask(["BAD", "NO_DATA"]) == (1 << 0) | (1 << 8)
    assert mp.bitmask("sat") == 2  # names are case-insensitive


def test_unknown_plane_and_collisions():
    mp = MaskPlanes()
    with pytest.raises(MaskPlaneError, match="unknown mask plane 'CLIPPED'"):
        mp.bitmask("CLIPPED")
    assert mp.bitmask_if_present(["CLIPPED", "BAD"]) == 1
    with pytest.raises(MaskPlaneError, match="both claim bit 0"):
        MaskPlanes({"BAD": 0, "OTHER": 0})
    with pytest.raises(MaskPlaneError):
        MaskPlanes({"BAD": 40})


def test_add_uses_lowest_free_bit_and_is_idempotent():
    mp = MaskPlanes()
    assert mp.add("CLIPPED") == 11
    assert mp.add("clipped") == 11
    assert mp.add("SAT_TEMPLATE") == 12
    sparse = MaskPlanes({"BAD": 0, "NO_DATA": 2})
    assert sparse.add("EDGE") == 1


def test_merge_keeps_bits_and_adds_new_names():
    a = MaskPlanes()
    b = MaskPlanes({"BAD": 3, "CLIPPED": 11, "REJECTED": 0})
    m = a.merge(b)
    assert m["BAD"] == 0  # existing definition wins
    assert m["CLIPPED"] == 11  # free in a: keeps its bit
    assert m["REJECTED"] not in (0,)  # bit 0 taken by BAD: moved
    assert len(m) == len(a) + 2
    assert "CLIPPED" not in a  # merge returns a new object


def test_conform_remaps_bits():
    src = MaskPlanes({"NO_DATA": 0, "BAD": 1, "SAT": 5})
    dst = MaskPlanes()
    mask = np.array([[1, 2, 32, 35, 64]], dtype=np.int32)  # 64: bit 6 unnamed in src
    out = dst.conform(mask, src)
    nd, bad, sat = dst.bitmask("NO_DATA"), dst.bitmask("BAD"), dst.bitmask("SAT")
    np.testing.assert_array_equal(out, [[nd, bad, sat, nd | bad | sat, 0]])
    assert mask[0, 0] == 1  # input untouched
    with pytest.raises(MaskPlaneError, match="merge the definitions first"):
        MaskPlanes({"BAD": 0}).conform(mask, MaskPlanes({"BAD": 0, "WEIRD": 1}))


def test_interpret():
    mp = MaskPlanes()
    assert mp.interpret(mp.bitmask(["SAT", "EDGE"]) | (1 << 20)) == ["SAT", "EDGE", "BIT20"]
    assert mp.interpret(0) == []


def test_header_round_trip_with_hierarch():
    mp = MaskPlanes()
    mp.add("SAT_TEMPLATE")
    mp.add("INJECTED_CORE_TEMPLATE")
    hdr = fits.Header()
    mp.to_header(hdr)
    # Long names must be HIERARCH cards and survive a text round trip of the header.
    text = hdr.tostring()
    assert "HIERARCH MP_DETECTED_NEGATIVE" in text
    back = MaskPlanes.from_header(fits.Header.fromstring(text))
    assert back == mp
    assert MaskPlanes.from_header(fits.Header()) == MaskPlanes()
    bad = fits.Header()
    bad["MP_BAD"] = "zero"
    with pytest.raises(MaskPlaneError, match="MP_BAD"):
        MaskPlanes.from_header(bad)


@settings(max_examples=50, deadline=None)
@given(
    perm=st.permutations(list(range(11))),
    values=st.lists(st.integers(min_value=0, max_value=(1 << 11) - 1), min_size=1, max_size=30),
)
def test_conform_round_trip_is_lossless(perm, values):
    # Any relabelling of the default planes can be conformed there and back exactly, and
    # interpret() gives the same names in both definitions.
    default = MaskPlanes()
    shuffled = MaskPlanes({name: perm[i] for i, name in enumerate(DEFAULT_MASK_PLANES)})
    mask = np.array(values, dtype=np.int32)
    there = shuffled.conform(mask, default)
    back = default.conform(there, shuffled)
    np.testing.assert_array_equal(back, mask)
    for v, t in zip(mask, there):
        assert sorted(default.interpret(v)) == sorted(shuffled.interpret(t))

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
    expected = {
        "BAD": 0,
        "SAT": 1,
        "INTRP": 2,
        "CR": 3,
        "EDGE": 4,
        "DETECTED": 5,
        "DETECTED_NEGATIVE": 6,
        "SUSPECT": 7,
        "NO_DATA": 8,
        "VIGNETTED": 9,
        "STREAK": 10,
    }
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
    with pytest.raises(MaskPlaneError, match="outside 0..62"):
        MaskPlanes({"BAD": 63})  # bits 31..62 are allowed: they make the mask int64


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


# ------------------------------------------------------------ aliases (afw ≡ lsst-images spellings)
def test_aliases_resolve_at_the_single_lookup():
    li = MaskPlanes(
        {
            "BAD": 0,
            "SATURATED": 1,
            "INTERPOLATED": 2,
            "COSMIC_RAY": 3,
            "DETECTION_EDGE": 4,
            "UNMASKED_NAN": 14,
        }
    )
    for afw, new in (
        ("SAT", "SATURATED"),
        ("INTRP", "INTERPOLATED"),
        ("CR", "COSMIC_RAY"),
        ("EDGE", "DETECTION_EDGE"),
        ("UNMASKEDNAN", "UNMASKED_NAN"),
    ):
        assert (
            afw in li and li[afw] == li[new] and li.bitmask(afw) == li.bitmask(new) == 1 << li[new]
        )
        assert li.resolve(afw.lower()) == new
        assert afw not in list(li)  # the file's spelling is kept
    assert li.bitmask_if_present(["SAT", "EDGE", "NO_DATA"]) == (1 << 1) | (1 << 4)
    assert li.add("SAT") == 1 and "SAT" not in dict(li)  # no second plane for the same thing
    afw = MaskPlanes()
    assert afw["SATURATED"] == 1 and afw.bitmask("COSMIC_RAY") == 1 << 3
    both = MaskPlanes({"SAT": 1, "SATURATED": 5})  # a definition holding both spellings: both bits
    assert (
        both.bitmask("SAT") == both.bitmask("SATURATED") == (1 << 1) | (1 << 5) and both["SAT"] == 1
    )


def test_merge_and_conform_across_spellings():
    afw, li = (
        MaskPlanes(),
        MaskPlanes({"NO_DATA": 0, "SATURATED": 5, "COSMIC_RAY": 6, "ITL_DIP": 7}),
    )
    merged = afw.merge(li)
    assert (
        "SATURATED" not in dict(merged)
        and "ITL_DIP" in merged
        and merged["COSMIC_RAY"] == afw["CR"]
    )
    mask = np.array([[1, 1 << 5, 1 << 6, 1 << 7]], np.int32)
    out = merged.conform(mask, li)
    np.testing.assert_array_equal(
        out, [[1 << afw["NO_DATA"], 1 << afw["SAT"], 1 << afw["CR"], 1 << merged["ITL_DIP"]]]
    )


# ------------------------------------------------------------------- more than 31 planes, MSK cards
def test_wide_definitions_are_int64():
    mp = MaskPlanes({f"P{i}": i for i in range(31)})
    assert mp.dtype == np.int32 and mp.n_words == 1
    assert mp.add("P31") == 31 and mp.dtype == np.int64 and mp.n_words == 2
    for i in range(32, 63):
        mp.add(f"P{i}")
    with pytest.raises(MaskPlaneError, match="all 63 bits are in use"):
        mp.add("ONE_TOO_MANY")
    assert mp.interpret((1 << 62) | (1 << 40) | 1) == ["P0", "P40", "P62"]
    src = MaskPlanes({"A": 40, "B": 2})
    dst = MaskPlanes({"A": 1, "B": 50})
    out = dst.conform(np.array([(1 << 40) | 4, 1 << 40], np.int64), src)
    assert out.dtype == np.int64 and out.tolist() == [2 | (1 << 50), 2]


def test_msk_cards_round_trip_and_descriptions():
    mp = MaskPlanes({"BAD": 0, "SATURATED": 3, "HIGH": 35}, {"SATURATED": "my own words"})
    hdr = fits.Header()
    mp.to_header(hdr)
    assert (
        hdr["MSKN0003"] == "SATURATED"
        and hdr["MSKM0003"] == 8
        and hdr["MSKD0003"] == "my own words"
    )
    assert hdr["MP_BAD"] == 0 and hdr["MSKD0000"] == mp.description("BAD") != ""
    back = MaskPlanes.from_header(fits.Header.fromstring(hdr.tostring()))
    assert back == mp and back.description("SAT") == "my own words"
    words = [fits.Header(), fits.Header()]
    for k in range(2):
        mp.to_header(words[k], word=k)
    assert "MSKN0004" in words[1] and words[1]["MSKN0004"] == "HIGH" and words[1]["MSKM0004"] == 16
    assert not any(key.startswith("MP_") for key in words[1]) and "MSKN0004" not in words[0]
    assert MaskPlanes.from_header(words[1], word=1) == MaskPlanes({"HIGH": 35})
    assert (
        MaskPlanes.header_cards(words[1]) == "MSK"
        and MaskPlanes.header_cards(fits.Header()) is None
    )
    bad = fits.Header()
    bad["MSKN0000"], bad["MSKM0000"] = "X", 6
    with pytest.raises(MaskPlaneError, match="not a single bit"):
        MaskPlanes.from_header(bad)

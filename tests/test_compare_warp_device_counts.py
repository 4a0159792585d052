"""Host syncs of CompareWarpAssembleCoaddTask on a device do not grow with the number of
warps (issue 16): the artifact pass and the variance rescaling take every warp at once.

Counted on the strict fake device of tests/strict_device.py (as
``bench/bench_device_counts.py`` does; there 20 × 2048² warps cost 30 host syncs), in a
subprocess: installing it patches gpudiff's backend factory for good.  The warps are
``bench/bench_coadd.py``'s, small.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from device_harness import run_child

ROOT = Path(__file__).resolve().parents[1]

#: CompareWarp's host syncs on the fake device, whatever the number of warps (27 on these
#: warps when set: the static model's stack, the template detection, the artifact pass,
#: the batched ScaleVariance's two, the filter and the final stack; before the batched
#: ScaleVariance every warp added two).
COMPARE_WARP_SYNCS = 30


def _child(out_path: str) -> None:
    """In a fresh interpreter: count CompareWarp on the fake device for 4 and 12 warps."""
    import strict_device as sd

    sys.path.insert(0, str(ROOT / "bench"))
    from bench_coadd import make_warps

    from gpudiff.image import Exposure, GaussianPsf
    from gpudiff.tasks.compare_warp import CompareWarpAssembleCoaddTask

    be = sd.install()
    res = {}
    for nwarp in (4, 12):
        host = make_warps(96, nwarp, 3, nstars=12)
        direct = [
            Exposure.from_arrays(i, v, m, psf=GaussianPsf(sigma=s), backend=be)
            for i, v, m, s in host
        ]
        matched = [Exposure(d.masked_image, psf=GaussianPsf(sigma=2.2)) for d in direct]
        with sd.counting():
            with sd.stage("x"):
                r = CompareWarpAssembleCoaddTask(backend=be).run(direct, matched)
            rep = sd.report()
        st = rep["stages"]["x"]
        res[str(nwarp)] = {
            "calls": st["calls"],
            "syncs": st["syncs"],
            "candidates": int(r.metadata["n_artifact_candidates"]),
        }
    res["violations"] = len(sd.VIOLATIONS)
    Path(out_path).write_text(json.dumps(res))


def test_compare_warp_syncs_do_not_grow_with_the_warps(tmp_path):
    res = run_child("test_compare_warp_device_counts", "_child", tmp_path / "counts.json")
    assert res["violations"] == 0
    few, many = res["4"], res["12"]
    assert few["candidates"] > 0 and many["candidates"] > 0  # the artifact pass ran
    # 8 more warps, not one sync more (the per-warp ScaleVariance cost 16 more)
    assert many["syncs"] == few["syncs"] <= COMPARE_WARP_SYNCS, res

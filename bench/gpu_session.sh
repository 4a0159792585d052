#!/usr/bin/env bash
# Everything a GPU session should measure, in one device call (starting the machine is the
# expensive part).  From the project root on this machine, once:
#
#     ../shared/gpu/fetch_wheels.sh dask distributed partd locket tornado zict tblib attrs \
#         cloudpickle toolz fsspec msgpack sortedcontainers psutil tqdm hypothesis
#
# then run, through the device tool, with `.whl` in carry:
#
#     bash bench/gpu_session.sh            # logs land in $OUT (or ./gpu_logs)
#
# Order: ceilings first (what the hardware allows), then the GPU test suite (parity
# included), then the stage benchmarks.  Each step logs to its own file and a failing step
# does not stop the next one, so one call always brings back every number it could get.
set -u
OUT=${OUT:-gpu_logs}
mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl \
  && export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 || exit 1
step() {  # step NAME TIMEOUT_S CMD...
  local name=$1 limit=$2; shift 2
  echo "== $name: $*" | tee -a "$OUT/summary.txt"
  local t0=$SECONDS
  timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
  echo "   rc=$? in $((SECONDS - t0)) s; tail:" >> "$OUT/summary.txt"
  tail -n 25 "$OUT/$name.log" >> "$OUT/summary.txt"
}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$OUT/gpu.txt" 2>&1
step ceilings 120 python3 bench/bench_ceilings.py --backend all --size 4096
step tests_cupy 420 env GPUDIFF_BACKEND=cupy python3 -m pytest -q -x -p no:cacheprovider -m "not slow" --durations=15
step bench_kernels 120 python3 bench/bench_kernels.py --backend all --size 4096 --nepoch 20
step bench_subtract 300 python3 bench/bench_subtract.py --backend all --sizes 2048 4096 --repeat 3
step bench_warp 180 python3 bench/bench_warp.py --backend all --size 4096 --repeat 3
for b in bench/bench_coadd.py bench/bench_match_backgrounds.py bench/bench_model_psf_match.py bench/bench_psfmatch.py; do
  [ -f "$b" ] && step "$(basename "$b" .py)" 240 python3 "$b" --backend all
done
# Not here: bench/bench_device_counts.py counts device calls, syncs and bytes on the strict
# fake device; its counts do not depend on the machine, so it runs on the CPU box (no GPU
# time spent).  Its H200 estimate is what the steps above check.
cat "$OUT/summary.txt"

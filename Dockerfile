# gpudiff on NVIDIA GPUs, with Dask for batch runs.
#
# Build:   docker build -t gpudiff .
#          (add dask-cuda for its LocalCUDACluster: --build-arg EXTRA_PIP=dask-cuda; without it
#           `gpudiff batch` still starts one worker per GPU, each with its CUDA_VISIBLE_DEVICES)
# Check:   docker run --rm --gpus all gpudiff info
# Demo:    docker run --rm --gpus all -v "$PWD":/data gpudiff demo --out /data/demo_out
#
# Batch, one machine: mount the folder holding the manifest and its data at /data (paths in
# the manifest are relative to the manifest; relative outputs go under --out-dir):
#   docker run --rm --gpus all -v "$PWD/night":/data gpudiff batch /data/manifest.csv --out-dir /data/out
# Resume after an interruption (only rows without a valid output run again):
#   docker run --rm --gpus all -v "$PWD/night":/data gpudiff batch /data/manifest.csv --out-dir /data/out --resume
#
# Batch, a cluster (the data on a filesystem every node mounts at the same path, /data):
#   scheduler node:  docker run -d --network host --entrypoint dask gpudiff scheduler --port 8786
#   each GPU:        docker run -d --network host --gpus '"device=0"' -v /shared/night:/data \
#                        -e GPUDIFF_BACKEND=cupy --entrypoint dask gpudiff worker tcp://SCHED:8786 --nthreads 1
#   submit:          docker run --rm --network host -v /shared/night:/data gpudiff \
#                        batch /data/manifest.csv --out-dir /data/out --scheduler tcp://SCHED:8786
FROM nvidia/cuda:12.6.3-runtime-ubuntu24.04

RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv \
    && rm -rf /var/lib/apt/lists/*
RUN python3 -m venv /opt/gpudiff
ENV PATH=/opt/gpudiff/bin:$PATH PYTHONUNBUFFERED=1

WORKDIR /src
COPY pyproject.toml README.md ./
COPY gpudiff ./gpudiff
COPY cuda ./cuda
# README's GPU install line, plus the distributed extra (dask[distributed], tqdm) for `gpudiff batch`.
ARG EXTRA_PIP=""
RUN pip install --no-cache-dir ".[cuda12,distributed]" ${EXTRA_PIP}

# Dask scheduler and its dashboard, for the cluster recipe above.
EXPOSE 8786 8787
WORKDIR /data
ENTRYPOINT ["gpudiff"]
CMD ["info"]

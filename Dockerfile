# gpudiff on an NVIDIA GPU.  Build:  docker build -t gpudiff .
# Run:    docker run --gpus all -v "$PWD":/data gpudiff demo --out /data/demo_out
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
# The same install line as README's GPU install.
RUN pip install --no-cache-dir ".[cuda12]"

WORKDIR /data
ENTRYPOINT ["gpudiff"]
CMD ["info"]

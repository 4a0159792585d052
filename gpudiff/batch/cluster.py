"""The embedded Dask cluster of ``gpudiff batch``: CPU workers, or one worker per GPU.

Everything here imports Dask lazily (``import gpudiff`` never imports it).
"""

from __future__ import annotations

import logging
import os

__all__ = ["start_local_cluster", "detect_gpus", "parse_gpus"]

log = logging.getLogger("gpudiff.batch")


def parse_gpus(text) -> list[str]:
    """``"0,1"`` (or a list) → ``["0", "1"]``: GPU ids as ``CUDA_VISIBLE_DEVICES`` takes them."""
    from ..errors import InvalidInputError

    items = text.split(",") if isinstance(text, str) else list(text)
    gpus = [str(g).strip() for g in items if str(g).strip()]
    if not gpus or len(set(gpus)) != len(gpus):
        raise InvalidInputError(
            f"--gpus expects a comma-separated list of distinct GPU ids, got {text!r}"
        )
    return gpus


def detect_gpus() -> list[str]:
    """The GPUs this process sees (as ``CUDA_VISIBLE_DEVICES`` entries); [] without CuPy/CUDA."""
    from ..backend import cuda_device_count

    n = cuda_device_count()
    if n == 0:
        return []
    visible = [
        v.strip() for v in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if v.strip()
    ]
    # Device i of this process is entry i of CUDA_VISIBLE_DEVICES when that is set.
    return visible[:n] if len(visible) >= n else [str(i) for i in range(n)]


def _memory_per_worker(memory_limit, n: int):
    if memory_limit != "auto":
        return memory_limit
    from distributed.system import MEMORY_LIMIT

    return max(int(MEMORY_LIMIT / max(n, 1)), 1 << 28)


def start_local_cluster(
    *,
    workers: int | None = None,
    gpus=None,
    backend: str | None = None,
    retries: int = 3,
    memory_limit="auto",
    use_dask_cuda: bool = True,
    tasks_per_gpu: int = 2,
):
    """Start an embedded Dask cluster on this machine.

    Parameters
    ----------
    workers : int, optional
        CPU worker processes (default: one per core, as Dask counts them), one thread each:
        the array work is NumPy/SciPy, which releases the GIL only in parts, and a process
        per core keeps the cores busy without oversubscribing BLAS (Dask sets
        ``OMP_NUM_THREADS=1`` in its workers).  For the same reason each row runs with
        gpudiff's thread setting at 1 (its pools and FFTs), unless ``GPUDIFF_NUM_THREADS``
        is set for the workers (``gpudiff --threads N batch`` sets it):
        :func:`gpudiff.batch.task.worker_threads`.
    gpus : list of str, optional
        One worker per listed GPU.  Uses ``dask_cuda.LocalCUDACluster`` when importable,
        else a Dask ``SpecCluster`` whose workers each get ``CUDA_VISIBLE_DEVICES`` set to
        one id.  Default (``workers`` and ``gpus`` unset, ``backend`` not ``numpy``): every
        GPU found, else CPU workers.
    backend : str, optional
        The batch's backend; ``"numpy"`` never starts GPU workers.
    retries : int
        The scheduler's ``allowed_failures``: how many times a row may lose its worker
        (process killed, out of memory) and be rescheduled before it is reported failed.
    tasks_per_gpu : int
        Threads per GPU worker: that many rows run concurrently on one GPU.  Each worker
        sets ``CUPY_CUDA_PER_THREAD_DEFAULT_STREAM=1``, so every thread's kernels go to its
        own stream and one row's host work (FITS I/O, Python) overlaps another's device
        work instead of serializing on the legacy default stream.  (Under dask_cuda the
        threads share the default stream unless that variable is exported before the
        batch starts: the I/O still overlaps, the kernels do not.)
    memory_limit : str or int
        Per worker; ``"auto"`` divides this machine's memory between the workers.

    Returns
    -------
    cluster, is_gpu
        The Dask cluster object (close it when done) and whether it is one worker per GPU.
    """
    from distributed import LocalCluster

    if gpus is None and workers is None and backend in (None, "auto", "cupy"):
        gpus = detect_gpus() or None
    quiet = logging.ERROR  # worker start/stop chatter would bury the progress bar
    if int(tasks_per_gpu) < 1:
        from ..errors import InvalidInputError

        raise InvalidInputError(f"tasks_per_gpu must be >= 1, got {tasks_per_gpu!r}")
    if gpus:
        gpus = parse_gpus(gpus)
        nthreads = int(tasks_per_gpu)
        limit = _memory_per_worker(memory_limit, len(gpus))
        if use_dask_cuda:
            try:
                from dask_cuda import LocalCUDACluster
            except ImportError:
                pass
            else:
                log.info("starting a dask_cuda LocalCUDACluster on GPUs %s", gpus)
                return LocalCUDACluster(
                    CUDA_VISIBLE_DEVICES=",".join(gpus),
                    threads_per_worker=nthreads,
                    memory_limit=limit,
                    dashboard_address=":0",
                    silence_logs=quiet,
                    scheduler_kwargs={"allowed_failures": retries},
                ), True
        from distributed import Nanny, Scheduler, SpecCluster

        log.info("starting one Dask worker per GPU %s (dask_cuda is not installed)", gpus)
        specs = {
            f"gpu-{g}": {
                "cls": Nanny,
                "options": {
                    "nthreads": nthreads,
                    "memory_limit": limit,
                    "env": {"CUDA_VISIBLE_DEVICES": g, "CUPY_CUDA_PER_THREAD_DEFAULT_STREAM": "1"},
                },
            }
            for g in gpus
        }
        scheduler = {
            "cls": Scheduler,
            "options": {"dashboard_address": ":0", "allowed_failures": retries},
        }
        return SpecCluster(
            workers=specs, scheduler=scheduler, silence_logs=quiet, name="gpudiff-gpu"
        ), True
    from dask.system import CPU_COUNT

    n = int(workers or CPU_COUNT)
    log.info("starting a Dask LocalCluster of %d worker processes", n)
    return LocalCluster(
        n_workers=n,
        threads_per_worker=1,
        processes=True,
        dashboard_address=":0",
        memory_limit=_memory_per_worker(memory_limit, n),
        silence_logs=quiet,
        scheduler_kwargs={"allowed_failures": retries},
    ), False

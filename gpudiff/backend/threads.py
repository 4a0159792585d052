"""Host threads for independent pieces of CPU work (bands, warps, visits, image planes), and
the one thread setting that every pool and every SciPy FFT of gpudiff obeys.

NumPy releases the GIL inside its ufunc loops, sorts and reductions, so on the CPU
independent pieces of array work run about N× faster on N cores when each gets a thread.
On a GPU the device already runs in parallel and threads would only contend for it, so
callers pass ``parallel=not backend.is_gpu``.  Every piece must write only its own
outputs: results are then the same bits as a sequential run.

The thread setting
------------------
:func:`get_num_threads` is the number of host threads gpudiff may use at once: the thread
pools here (:func:`cpu_workers`, :func:`parallel_map`, :func:`run_concurrently`) and the
``workers`` of every ``scipy.fft`` call (:attr:`gpudiff.Backend.fft_kwargs`).  It is, in
order of precedence, the innermost ``with num_threads(n)`` of the calling context, else
:func:`set_num_threads`'s value, else the environment variable ``GPUDIFF_NUM_THREADS``, else
``os.cpu_count()``.  Several processes on one machine (Dask workers, a job array) should
each get their share, or they oversubscribe the cores: ``gpudiff batch`` workers default
to one thread each.

A pool divides the setting between its threads: each of ``w`` pool threads runs its piece
with ``num_threads(max(1, n // w))``, so an FFT inside a piece of a parallel map does not
start another ``n`` threads.  The ``with`` setting lives in a :mod:`contextvars` variable,
which the pools here carry into their threads, so concurrent callers (the threads of one
Dask worker) may each use their own setting.

Pieces are rarely even (the science image's detection runs beside the template's cheaper
variance scaling): a pool thread that runs out of pieces is lent to a pool still working
inside another piece of the same outermost pool, which then finishes on more threads than
its share, never more at once than the outermost setting (:func:`parallel_map`).
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import ctypes
import inspect
import os
import threading
from typing import Any, Callable, Iterable, Iterator

__all__ = [
    "ENV_THREADS",
    "get_num_threads",
    "set_num_threads",
    "num_threads",
    "accepts_threads",
    "cpu_workers",
    "parallel_map",
    "run_concurrently",
    "blas_threads",
]

#: Environment variable giving the default thread setting.
ENV_THREADS = "GPUDIFF_NUM_THREADS"

# The process-wide value of set_num_threads (None: the environment, else the core count),
# and the per-context value of ``with num_threads(n)`` (None: the process-wide one).
_process_threads: int | None = None
_context_threads: contextvars.ContextVar[int | None] = contextvars.ContextVar(
    "gpudiff_num_threads", default=None
)


def _check(n: Any, what: str) -> int:
    """``n`` as a positive int, else InvalidInputError naming ``what``."""
    try:
        ok = not isinstance(n, bool) and int(n) == float(n) and int(n) >= 1
    except (TypeError, ValueError):
        ok = False
    if not ok:
        from ..errors import InvalidInputError

        raise InvalidInputError(f"{what} must be a positive integer, got {n!r}")
    return int(n)


def _env_threads() -> int | None:
    text = os.environ.get(ENV_THREADS, "").strip()
    return _check(text, f"${ENV_THREADS}") if text else None


def get_num_threads() -> int:
    """The number of host threads gpudiff may use at once (pools and ``scipy.fft``).

    Returns
    -------
    int
        The innermost ``with num_threads(n)``, else :func:`set_num_threads`'s value, else
        ``$GPUDIFF_NUM_THREADS``, else ``os.cpu_count()``.

    Raises
    ------
    gpudiff.InvalidInputError
        ``$GPUDIFF_NUM_THREADS`` is set but is not a positive integer.
    """
    n = _context_threads.get()
    if n is None:
        n = _process_threads
    if n is None:
        n = _env_threads()
    return n if n is not None else (os.cpu_count() or 1)


def set_num_threads(n: int | None) -> None:
    """Set the process-wide thread setting (see :func:`get_num_threads`).

    Parameters
    ----------
    n : int or None
        Positive number of threads; ``None`` goes back to ``$GPUDIFF_NUM_THREADS``, else
        ``os.cpu_count()``.  A ``with num_threads(m)`` block still wins inside it.

    Raises
    ------
    gpudiff.InvalidInputError
        ``n`` is not a positive integer.
    """
    global _process_threads
    _process_threads = None if n is None else _check(n, "threads")


@contextlib.contextmanager
def num_threads(n: int | None) -> Iterator[int]:
    """Context manager: use ``n`` threads inside the block (in this thread and the pools it
    starts through this module), then the previous setting again.

    Parameters
    ----------
    n : int or None
        Positive number of threads; ``None`` leaves the setting as it is.

    Yields
    ------
    int
        The setting inside the block.

    Raises
    ------
    gpudiff.InvalidInputError
        ``n`` is not a positive integer.
    """
    if n is None:
        yield get_num_threads()
        return
    token = _context_threads.set(_check(n, "threads"))
    try:
        yield int(n)
    finally:
        _context_threads.reset(token)


def accepts_threads(fn: Callable) -> Callable:
    """Decorator: ``fn`` gains a keyword-only ``threads=None`` and runs inside
    ``with num_threads(threads)`` (the ``threads=`` of the file-level API functions)."""

    @functools.wraps(fn)
    def wrapper(*args, threads: int | None = None, **kwargs):
        with num_threads(threads):
            return fn(*args, **kwargs)

    sig = inspect.signature(fn)
    params = list(sig.parameters.values())
    extra = inspect.Parameter("threads", inspect.Parameter.KEYWORD_ONLY, default=None)
    at = next((i for i, p in enumerate(params) if p.kind is p.VAR_KEYWORD), len(params))
    wrapper.__signature__ = sig.replace(parameters=[*params[:at], extra, *params[at:]])
    return wrapper


class _Budget:
    """The threads of one tree of pools: the outermost :func:`parallel_map` that runs in
    parallel and every pool started inside its pieces share its ``total``.

    A piece runs with its share of the setting (``n // w``), fixed when it starts; when a
    pool thread runs out of pieces its thread is free, and a pool still working inside
    another piece (a nested map that started with its share only) takes it over as a
    helper.  Uneven pieces (the science image's detection beside the template's cheaper
    variance scaling) then keep every core busy to the end, never more than ``total``
    threads at a time.
    """

    def __init__(self, total: int, free: int):
        self.total = total
        self._free = free
        self._lock = threading.Lock()
        self._hungry: list[_Pieces] = []

    def take(self, pieces: "_Pieces") -> None:
        """Give ``pieces`` the free threads it can use; keep it waiting for more."""
        with self._lock:
            self._hungry.append(pieces)
            grant = min(self._free, pieces.wanted())
            self._free -= grant
        pieces.add_helpers(grant)

    def leave(self, pieces: "_Pieces") -> None:
        with self._lock:
            if pieces in self._hungry:
                self._hungry.remove(pieces)

    def release(self, k: int = 1) -> None:
        """``k`` threads of the tree have finished their work: each to a waiting pool, else
        free."""
        for _ in range(k):
            with self._lock:
                target = next((p for p in self._hungry if p.wanted() > 0), None)
                if target is None:
                    self._free += 1
                    continue
            target.add_helpers(1)


_budget: contextvars.ContextVar[_Budget | None] = contextvars.ContextVar(
    "gpudiff_thread_budget", default=None
)


class _Pieces:
    """The pieces of one :func:`parallel_map`, taken in order by whichever threads run
    them: the caller, the map's own threads, and helpers lent by the tree's budget."""

    def __init__(self, fn, items, share: int, limit: int, budget: _Budget):
        self.fn, self.items, self.share, self.budget = fn, items, share, budget
        self.limit = limit  # most threads this map may ever use
        self.results: list[Any] = [None] * len(items)
        self.errors: list[BaseException | None] = [None] * len(items)
        self._next = 0
        self._threads = 0  # threads working on the pieces now
        self._lock = threading.Lock()
        self._done = threading.Condition(self._lock)
        self._contexts = [contextvars.copy_context() for _ in items]

    def wanted(self) -> int:
        """More threads this map could use now: one per piece not started yet, up to
        ``limit`` threads in all."""
        with self._lock:
            return max(0, min(len(self.items) - self._next, self.limit - self._threads))

    def _run_one(self, i: int, lent: bool = False) -> None:
        # A lent helper is one thread of the budget: its piece runs single-threaded, so a
        # pool nested in it cannot start threads the budget never counted.
        share = 1 if lent else self.share

        def run():
            _budget.set(self.budget)
            with num_threads(share):
                return self.fn(self.items[i])

        try:
            self.results[i] = self._contexts[i].run(run)
        except BaseException as exc:  # noqa: BLE001  (re-raised by the caller, in order)
            self.errors[i] = exc

    def work(self, lent: bool = False) -> None:
        """Run pieces until none is left (the calling thread is already counted)."""
        while True:
            with self._lock:
                i = self._next
                if i >= len(self.items):
                    self._threads -= 1
                    self._done.notify_all()
                    return
                self._next += 1
            self._run_one(i, lent)

    def _start(self, target) -> None:
        """Start a thread on ``target`` (already counted in ``_threads``); uncount it if
        the thread cannot start, so :meth:`wait` does not wait for it for ever."""
        try:
            threading.Thread(target=target, name="gpudiff-pool", daemon=True).start()
        except BaseException:
            with self._lock:
                self._threads -= 1
                self._done.notify_all()
            raise

    def add_helpers(self, n: int) -> None:
        """Start ``n`` threads on the pieces; each hands its thread back to the budget
        when the pieces run out (or at once if none is left)."""
        for _ in range(n):
            with self._lock:
                self._threads += 1

            def helper():
                try:
                    self.work(lent=True)
                finally:
                    self.budget.release()

            self._start(helper)

    def wait(self) -> list:
        with self._lock:
            while self._threads > 0:
                self._done.wait()
        for err in self.errors:
            if err is not None:
                raise err
        return self.results


def cpu_workers(n_items: int, limit: int | None = None, *, parallel: bool = True) -> int:
    """Threads to use for ``n_items`` pieces: one per thread of :func:`get_num_threads`
    (inside a piece of a pool: of the pool's whole setting, whose threads become free as
    its other pieces end), at most ``limit``; 1 when not ``parallel`` or with fewer than
    two pieces."""
    if not parallel or n_items < 2:
        return 1
    budget = _budget.get()
    n = min(get_num_threads() if budget is None else budget.total, n_items)
    return max(1, n if limit is None else min(n, int(limit)))


def parallel_map(fn: Callable[[Any], Any], items: Iterable[Any], workers: int) -> list:
    """``[fn(x) for x in items]``, on ``workers`` threads when more than one (order kept;
    the first exception is raised, once every piece has run).

    ``workers`` is capped by :func:`get_num_threads`, and each piece runs with the setting
    divided between the threads, so the pieces' own FFTs and pools stay within it.  Inside
    a piece of another pool, ``workers`` beyond that share are taken as the other pool's
    threads become free (see :class:`_Budget`): never more threads at once than the
    outermost pool's setting.
    """
    items = list(items)
    workers = min(int(workers), len(items))
    n = get_num_threads()
    budget = _budget.get()
    start = min(workers, n)
    if workers <= 1 or (start <= 1 and budget is None):
        return [fn(x) for x in items]
    share = max(1, n // start)
    outer = budget is None
    if outer:
        # Each outer thread owns its share: the pools nested in its pieces start up to
        # ``share`` threads the budget does not count again.
        budget = _Budget(n, n - start * share)
    pieces = _Pieces(fn, items, share, start if outer else workers, budget)

    def work():
        pieces.work()
        if outer:  # this thread's part is done: its share lent to pools still working
            budget.release(share)

    # The caller works on the pieces too, with ``start - 1`` threads of this map's own.
    with pieces._lock:
        pieces._threads = start
    for _ in range(start - 1):
        pieces._start(work)
    if not outer and workers > start:
        budget.take(pieces)  # free threads of the tree now, and more as they come
    try:
        work()
        return pieces.wait()
    finally:
        if not outer:
            budget.leave(pieces)


def run_concurrently(*calls: Callable[[], Any], parallel: bool = True) -> list:
    """The results of the zero-argument ``calls``, run on one thread each when ``parallel``
    (at most :func:`get_num_threads` at a time)."""
    return parallel_map(lambda call: call(), calls, cpu_workers(len(calls), parallel=parallel))


#: (set, get) symbol pairs of the OpenBLAS builds NumPy and SciPy wheels bundle (the
#: scipy-openblas 64-bit and 32-bit interfaces) and of a system OpenBLAS.
_OPENBLAS_SYMBOLS = (
    ("scipy_openblas_set_num_threads64_", "scipy_openblas_get_num_threads64_"),
    ("scipy_openblas_set_num_threads", "scipy_openblas_get_num_threads"),
    ("openblas_set_num_threads64_", "openblas_get_num_threads64_"),
    ("openblas_set_num_threads", "openblas_get_num_threads"),
)


def _loaded_openblas() -> dict[str, tuple[Any, Any]]:
    """The (set, get) thread functions of every OpenBLAS loaded in this process, by path.

    Found in ``/proc/self/maps`` (Linux); elsewhere, or for a BLAS without these
    functions (MKL, Accelerate), none."""
    try:
        with open("/proc/self/maps") as f:
            paths = {
                parts[5].strip()
                for parts in (line.split(None, 5) for line in f)
                if len(parts) == 6 and "openblas" in os.path.basename(parts[5]).lower()
            }
    except OSError:
        return {}
    found = {}
    for path in sorted(paths):
        try:
            lib = ctypes.CDLL(path)  # already loaded: the same handle, no new copy
        except OSError:
            continue
        for set_name, get_name in _OPENBLAS_SYMBOLS:
            if hasattr(lib, set_name) and hasattr(lib, get_name):
                setter, getter = getattr(lib, set_name), getattr(lib, get_name)
                setter.argtypes, setter.restype = [ctypes.c_int], None
                getter.argtypes, getter.restype = [], ctypes.c_int
                found[path] = (setter, getter)
                break
    return found


@contextlib.contextmanager
def blas_threads(n: int) -> Iterator[None]:
    """Context manager: OpenBLAS (NumPy's and SciPy's) uses ``n`` threads inside the block.

    A process whose cores are already kept busy by gpudiff's pools and FFT workers gains
    nothing from BLAS threads of its own: OpenBLAS's threads spin-wait between calls, and
    on a shared machine that spinning costs CPU time other threads need (the ``gpudiff``
    command, measured on 2 cores: about 1 CPU-s of 14 on a 2048² subtraction).  The
    OpenBLAS libraries loaded now are set through their own API; ``OPENBLAS_NUM_THREADS``
    covers those loaded inside the block (SciPy's, on first use) and the processes it
    starts.  Afterwards every library gets its previous setting back (one loaded inside
    the block: that of the environment before it, else of the libraries loaded before,
    else one per core) and the environment variable its previous value.  Process-wide:
    meant for a process's entry point (the command line), not for library calls.

    Parameters
    ----------
    n : int
        Positive number of BLAS threads.

    Yields
    ------
    None
    """
    n = _check(n, "BLAS threads")
    env = "OPENBLAS_NUM_THREADS"
    before = {path: (s, g()) for path, (s, g) in _loaded_openblas().items()}
    old_env = os.environ.get(env)
    os.environ[env] = str(n)
    for setter, _ in before.values():
        setter(n)
    try:
        yield
    finally:
        if old_env is None:
            os.environ.pop(env, None)
        else:
            os.environ[env] = old_env
        default = next((c for _, c in before.values()), os.cpu_count() or 1)
        if old_env is not None and old_env.strip().isdigit() and int(old_env) > 0:
            default = int(old_env)
        for path, (setter, _) in _loaded_openblas().items():
            setter(before[path][1] if path in before else default)

"""A strict CPU stand-in for CuPy: checks the device discipline of library code without a GPU.

CI machines have no GPU, so the CuPy code paths of gpudiff never run there, and the bugs
typical of them (a NumPy array mixed into a device computation, an implicit device → host
conversion, a device array used to index a host array) go unseen until a GPU run.  This
module gives the ``"cupy"`` backend a *fake device*: device arrays are :class:`Dev`
wrappers around NumPy arrays that compute with NumPy but refuse what CuPy refuses, with a
``TypeError`` (recorded in :data:`VIOLATIONS`, so an error swallowed by a ``try`` in the
library is still reported).

What CuPy refuses, and the fake with it:

* implicit conversion to NumPy: ``np.asarray(dev)``, ``scipy.ndimage.*(dev)``,
  ``host[dev_index]``, ``host[...] = dev`` (CuPy: ``TypeError: Implicit conversion to a
  NumPy array is not allowed``);
* NumPy arrays (0-d included) as operands of ufuncs, ``np.*`` functions dispatched on a
  device array, and ``xp.*`` / ``fft.*`` / ``ndimage.*`` / ``linalg.*`` functions
  (CuPy: ``TypeError: Unsupported type <class 'numpy.ndarray'>``);
* a non-scalar NumPy array assigned into a *basic* slice of a device array
  (CuPy: ``ValueError: non-scalar numpy.ndarray cannot be used for fill``);
* NumPy-only call forms: ``where=`` (or ``order=``, ``subok=``, ``signature=``) in a ufunc
  call, ``where=`` / ``initial=`` in a reduction (``sum``, ``max`` ...), ``reduce`` /
  ``accumulate`` of ufuncs other than add and multiply, ``at`` of ufuncs without a CuPy
  scatter op (``cupy/_core/_kernel.pyx``: ``TypeError: Wrong arguments`` or
  ``NotImplementedError``), and ``xp.searchsorted`` with a non-device ``v`` (CuPy 13).

What CuPy accepts, and the fake with it: ``xp.asarray`` / ``xp.array`` of host data;
Python and NumPy *scalars* mixed with device arrays; NumPy arrays or lists as indices into
a device array, and as values assigned through such (advanced) indices; host arrays passed
to ``take``/``put``/``compress``; a host ``structure`` for ``ndimage.label``; explicit
transfers (``dev.get()``, ``xp.asnumpy``, ``Backend.asnumpy``).

Usage (in a fresh process: :func:`install` patches gpudiff's backend factory for good)::

    import strict_device
    be = strict_device.install()        # get_backend("cupy") now returns ``be``
    ...run library code on be...
    assert not strict_device.VIOLATIONS

The registered CUDA kernels are routed to their NumPy twins (their launchers convert
inputs with ``cupy.asarray``, so host inputs are legal there).

**Counting** (how GPU cost is measured when no GPU is lent): inside ``with counting():``
the fake counts, per stage (``with stage("label"):``, nestable, labels joined by "/") and
per library function (the innermost ``gpudiff`` frame of the call):

* *device calls*: every operation that launches work on a real device — a ufunc (or its
  ``reduce``), an ``xp.*`` / ``fft.*`` / ``ndimage.*`` / ``linalg.*`` function, an array
  method that computes (``sum``, ``astype`` to a new dtype, ``copy`` …), advanced
  indexing, an item assignment, a registered kernel.  Views (basic slicing, ``reshape``,
  ``ravel``, ``.T``) and allocations without fill (``empty``) are free.  A cuFFT transform
  or ``ndimage.label`` counts once although they are a few kernels;
* *host syncs*: explicit (``get``, ``asnumpy``, ``synchronize``) and implicit (``bool``,
  ``float``, ``int``, ``item``, ``tolist`` of a device value; boolean-mask indexing,
  ``nonzero``, ``unique``, ``label``, ``find_objects`` …, whose output size the host must
  learn);
* *bytes*: host→device (``asarray`` of host data, host indices or values, host kernel
  inputs), device→host (every sync's payload), and *touched* (the sum of the operand and
  result sizes of every device call: what the call reads and writes in device memory, if
  nothing stayed in cache).

:func:`report` returns the totals per stage and the top functions; :func:`estimate_seconds`
turns them into a device-time estimate with a stated model.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import sys
import threading
import traceback
import types
from typing import Any

import numpy as np
import scipy.fft
import scipy.ndimage
from numpy.lib.mixins import NDArrayOperatorsMixin

__all__ = [
    "VIOLATIONS",
    "DeviceDisciplineError",
    "Dev",
    "install",
    "make_backend",
    "fake_xp",
    "COUNTS",
    "counting",
    "stage",
    "report",
    "estimate_seconds",
    "H200_MODEL",
]

#: Every refusal, as ``(message, stack)``, in order; the test asserts it stays empty.
VIOLATIONS: list[tuple[str, str]] = []


# ----------------------------------------------------------------------------------------
# counting
# ----------------------------------------------------------------------------------------


class _Counts:
    """Counters of the fake device (see the module docstring).  Thread-safe."""

    def __init__(self):
        self.enabled = False
        self.lock = threading.Lock()
        self.local = threading.local()
        self.reset()

    def reset(self):
        self.stage_calls = collections.Counter()  # stage → device calls
        self.stage_syncs = collections.Counter()  # stage → host syncs
        self.stage_bytes = collections.Counter()  # (stage, "h2d" | "d2h" | "touched") → bytes
        self.func_calls = collections.Counter()  # (stage, function) → device calls
        self.func_syncs = collections.Counter()  # (stage, function) → host syncs
        self.sync_kinds = collections.Counter()  # (stage, kind) → host syncs

    def stack(self) -> list:
        st = getattr(self.local, "stack", None)
        if st is None:
            st = self.local.stack = list(getattr(self, "_main_stack", []))
        return st

    def label(self) -> str:
        st = self.stack()
        return "/".join(st) if st else "(no stage)"


COUNTS = _Counts()
_THIS = __name__


def _library_frame() -> str:
    """``module:function`` of the innermost gpudiff frame (outside gpudiff.backend) of the
    current call."""
    f = sys._getframe(2)
    while f is not None:
        mod = f.f_globals.get("__name__", "")
        # gpudiff.backend's helpers (asarray, asnumpy, kernel launchers) are attributed
        # to their caller, which is what a reader can change.
        if mod.startswith("gpudiff") and not mod.startswith("gpudiff.backend"):
            return f"{mod}:{f.f_code.co_name}"
        f = f.f_back
    return "(caller outside gpudiff)"


def _nbytes(*xs) -> int:
    n = 0
    for x in xs:
        if isinstance(x, Dev):
            n += x._a.nbytes
        elif isinstance(x, (list, tuple)):
            n += _nbytes(*x)
    return n


def _count_call(touched: int = 0, n: int = 1):
    if not COUNTS.enabled:
        return
    lab, fn = COUNTS.label(), _library_frame()
    with COUNTS.lock:
        COUNTS.stage_calls[lab] += n
        COUNTS.func_calls[(lab, fn)] += n
        COUNTS.stage_bytes[(lab, "touched")] += touched


def _count_sync(kind: str, nbytes: int = 0):
    if not COUNTS.enabled:
        return
    lab, fn = COUNTS.label(), _library_frame()
    with COUNTS.lock:
        COUNTS.stage_syncs[lab] += 1
        COUNTS.func_syncs[(lab, fn)] += 1
        COUNTS.sync_kinds[(lab, kind)] += 1
        COUNTS.stage_bytes[(lab, "d2h")] += nbytes


def _count_h2d(nbytes: int):
    if COUNTS.enabled and nbytes:
        lab = COUNTS.label()
        with COUNTS.lock:
            COUNTS.stage_bytes[(lab, "h2d")] += nbytes


def _host_nbytes(*xs) -> int:
    n = 0
    for x in xs:
        if isinstance(x, np.ndarray):
            n += x.nbytes
        elif isinstance(x, (list, tuple)):
            n += _host_nbytes(*x)
    return n


@contextlib.contextmanager
def counting():
    """Count device calls, host syncs and bytes inside the block (counters reset first)."""
    COUNTS.reset()
    COUNTS.enabled = True
    try:
        yield COUNTS
    finally:
        COUNTS.enabled = False


@contextlib.contextmanager
def stage(label: str):
    """Attribute what runs inside the block to ``label`` (nested: "outer/label").  Threads
    started inside inherit the stage of the thread that entered it first."""
    st = COUNTS.stack()
    st.append(str(label))
    COUNTS._main_stack = list(st)
    try:
        yield
    finally:
        st.pop()
        COUNTS._main_stack = list(st)


#: The cost model of :func:`estimate_seconds` (an H200; state it with every estimate).
H200_MODEL = {
    "launch_s": 8e-6,  # per device call: CuPy's Python-side launch cost, ~5-10 µs
    "sync_s": 10e-6,  # per host sync: a stream drain plus a small copy
    "hbm_Bps": 4.0e12,  # bytes touched, at ~85 % of the H200's 4.8 TB/s
    "pcie_Bps": 25e9,  # host<->device bytes, PCIe 5 x16 from pinned memory
}


def estimate_seconds(calls: int, syncs: int, touched: int, transfer: int, model: dict = H200_MODEL):
    """(total, parts) device-time estimate: launches + syncs + touched/HBM + transfer/PCIe,
    added (no overlap assumed: an upper bound when launches hide behind work)."""
    parts = {
        "launch": calls * model["launch_s"],
        "sync": syncs * model["sync_s"],
        "hbm": touched / model["hbm_Bps"],
        "pcie": transfer / model["pcie_Bps"],
    }
    return sum(parts.values()), parts


def report(top: int = 12) -> dict:
    """Totals per stage and the ``top`` functions by device calls and by syncs."""
    stages = sorted(
        set(COUNTS.stage_calls) | set(COUNTS.stage_syncs) | {k[0] for k in COUNTS.stage_bytes}
    )
    per = {}
    for lab in stages:
        b = COUNTS.stage_bytes
        per[lab] = {
            "calls": COUNTS.stage_calls[lab],
            "syncs": COUNTS.stage_syncs[lab],
            "h2d": b[(lab, "h2d")],
            "d2h": b[(lab, "d2h")],
            "touched": b[(lab, "touched")],
        }
    return {
        "stages": per,
        "top_calls": COUNTS.func_calls.most_common(top),
        "top_syncs": COUNTS.func_syncs.most_common(top),
        "sync_kinds": COUNTS.sync_kinds.most_common(top),
    }


class DeviceDisciplineError(TypeError):
    """Raised where CuPy would raise.  A TypeError, as CuPy's refusals are, except the
    fill() case, where CuPy raises ValueError (the message says so)."""


def _fail(msg: str):
    # Record before raising: library code may catch the error and fall back silently.
    VIOLATIONS.append((msg, "".join(traceback.format_stack(limit=16)[:-2])))
    raise DeviceDisciplineError("strict_device: " + msg)


def _unwrap(x: Any, allow_host: bool, where: str) -> Any:
    """The NumPy array inside ``x`` (recursing into lists and tuples); host arrays are a
    violation unless ``allow_host``.  Scalars (Python or NumPy) pass: CuPy takes them."""
    if isinstance(x, Dev):
        return x._a
    if isinstance(x, np.ndarray):
        if not allow_host:
            _fail(f"NumPy array {x.shape} {x.dtype} passed to {where}")
        return x
    if isinstance(x, (list, tuple)):
        return type(x)(_unwrap(v, allow_host, where) for v in x)
    return x


def _wrap(r: Any) -> Any:
    """Results back onto the device: arrays and NumPy scalars become :class:`Dev`, as CuPy
    returns 0-d device arrays where NumPy returns scalars (``xp.sum``, ``a.max()``)."""
    if isinstance(r, np.ndarray):
        return Dev(r)
    if isinstance(r, np.generic) and not isinstance(r, (np.str_, np.bytes_)):
        return Dev(np.asarray(r))
    if isinstance(r, tuple):
        return tuple(_wrap(v) for v in r)
    if isinstance(r, list):
        return [_wrap(v) for v in r]
    return r


def _is_advanced(key: Any) -> bool:
    """True when an index holds an array or list (CuPy then scatters, converting a host value)."""
    keys = key if isinstance(key, tuple) else (key,)
    return any(isinstance(k, (Dev, np.ndarray, list)) for k in keys)


#: ndarray methods whose array arguments CuPy converts itself (``core.array(indices)``).
_HOST_OK_METHODS = frozenset({"take", "put", "compress"})
#: Methods returning host values, not device arrays.
_HOST_RESULT_METHODS = frozenset({"tolist", "item", "get"})

#: Keyword arguments of NumPy's ufunc call that CuPy's refuses (``cupy/_core/_kernel.pyx``
#: ``ufunc.__call__`` takes ``out``, ``dtype``, ``casting`` and a private ``_where``;
#: anything else is ``TypeError: Wrong arguments``): ``np.add(a, b, out=a, where=m)``
#: runs on NumPy only.
_REFUSED_UFUNC_KW = ("where", "order", "subok", "signature")
#: Reductions whose CuPy versions take (axis, dtype, out, keepdims) only: no ``where=``, no
#: ``initial=`` (``cupy.sum``, ``cupy.amax``, ``cupy.ndarray.max`` ...).
_REDUCTIONS = frozenset(
    {"sum", "prod", "max", "min", "amax", "amin", "mean", "all", "any", "nansum", "nanprod"}
    | {"nanmax", "nanmin", "nanmean", "var", "std", "nanvar", "nanstd", "ptp"}
)
_REFUSED_REDUCTION_KW = ("where", "initial")
#: ufunc methods CuPy implements, per method the ufuncs that have them
#: (``cupy/_core/_kernel.pyx``: ``reduce``/``accumulate`` only for add and multiply,
#: ``reduceat`` for add, ``at`` for the ufuncs with a scatter op; NotImplementedError else).
_UFUNC_METHODS = {
    "reduce": frozenset({"add", "multiply"}),
    "accumulate": frozenset({"add", "multiply"}),
    "reduceat": frozenset({"add"}),
    "at": frozenset(
        {"add", "subtract", "maximum", "minimum", "bitwise_and", "bitwise_or", "bitwise_xor"}
    ),
}


def _check_ufunc(ufunc, method: str, kwargs: dict, where: str) -> None:
    """Refuse what CuPy's ufuncs refuse (see :data:`_REFUSED_UFUNC_KW`, :data:`_UFUNC_METHODS`)."""
    if not isinstance(ufunc, np.ufunc) or ufunc.__name__ == "matmul":  # CuPy: a gufunc
        return
    if method != "__call__":
        if method in _UFUNC_METHODS and ufunc.__name__ not in _UFUNC_METHODS[method]:
            _fail(f"{where}: CuPy has no {ufunc.__name__}.{method} (NotImplementedError)")
        return
    for k in _REFUSED_UFUNC_KW:
        if k in kwargs:
            _fail(f"{where}() got keyword {k!r}, which CuPy's ufuncs do not take")


def _check_searchsorted_v(v, where: str) -> None:
    """CuPy 13 (gpudiff's oldest) raises NotImplementedError unless ``v`` is a
    cupy.ndarray (``cupy/_sorting/search.py``); CuPy 14+ also takes Python scalars."""
    if not isinstance(v, Dev):
        _fail(f"{where}(): v must be a device array for CuPy, got {type(v).__name__}")


def _check_reduction(name: str, kwargs: dict, where: str) -> None:
    if name in _REDUCTIONS:
        for k in _REFUSED_REDUCTION_KW:
            if k in kwargs:
                _fail(f"{where}() got keyword {k!r}, which CuPy's {name} does not take")


#: Functions that allocate or make views: no kernel on a real device.
_FREE_FUNCS = frozenset(
    {
        "empty",
        "empty_like",
        "shape",
        "ndim",
        "size",
        "result_type",
        "can_cast",
        "broadcast_to",
        "broadcast_arrays",
        "expand_dims",
        "reshape",
        "ravel",
        "moveaxis",
        "swapaxes",
        "transpose",
        "squeeze",
        "atleast_1d",
        "atleast_2d",
        "atleast_3d",
        "iscomplexobj",
        "isrealobj",
        "isscalar",
        "asnumpy",
        "get_array_module",
        "may_share_memory",
        "shares_memory",
        "dtype",
        "finfo",
        "iinfo",
    }
)
#: Functions whose output size depends on the data (the host must learn it: a sync), or
#: that return host values.
_SYNC_FUNCS = frozenset(
    {
        "nonzero",
        "flatnonzero",
        "argwhere",
        "unique",
        "extract",
        "compress",
        "label",
        "find_objects",
        "center_of_mass",
        "maximum_position",
        "minimum_position",
        "extrema",
        "array_equal",
        "allclose",
    }
)
#: Array methods that return views (free) on a real device.
_VIEW_METHODS = frozenset({"reshape", "ravel", "view", "transpose", "swapaxes", "squeeze"})


def _has_bool_index(key) -> bool:
    keys = key if isinstance(key, tuple) else (key,)
    for k in keys:
        a = k._a if isinstance(k, Dev) else k
        if isinstance(a, np.ndarray) and a.dtype == bool:
            return True
    return False


def _method_launches(name, a, r, args, kwargs) -> bool:
    if name in _VIEW_METHODS:
        return not (isinstance(r, np.ndarray) and np.shares_memory(r, a))
    if name == "astype":
        return r is not a
    return True


def _count_func(name: str, args, kwargs, r):
    """Count one library function call of the fake namespaces (or np.* on device arrays)."""
    if not COUNTS.enabled or name in _FREE_FUNCS:
        return
    if name == "where" and len(args) == 1:
        _count_sync("where(cond) (data-dependent size)", 8)
    elif name in _SYNC_FUNCS:
        _count_sync(f"{name} (data-dependent size / host result)", 8)
    elif name == "bincount":
        # cupy.bincount tests for negative labels and sizes its output by int(x.max()):
        # two host syncs (cupy/_statistics/histogram.py); Backend.bincount has none.
        _count_sync("bincount (negativity test, output size)", 8)
        _count_sync("bincount (negativity test, output size)", 8)
    _count_call(_host_nbytes(args, tuple(kwargs.values()), r))


class Dev(NDArrayOperatorsMixin):
    """A fake device array: a NumPy array that only the fake namespaces may touch.

    Arithmetic, comparisons and ``np.*`` functions work when every array operand is a
    ``Dev`` (CuPy implements ``__array_ufunc__`` and ``__array_function__``) and fail with
    a host array among them.  ``__array__`` always fails.
    """

    __slots__ = ("_a",)

    def __init__(self, a: np.ndarray):
        object.__setattr__(self, "_a", a)

    # --- what CuPy refuses ---------------------------------------------------------------
    def __array__(self, dtype=None, copy=None):
        _fail("implicit conversion of a device array to NumPy (__array__)")

    def __array_ufunc__(self, ufunc, method, *inputs, **kwargs):
        where = f"ufunc {ufunc.__name__}"
        _check_ufunc(ufunc, method, kwargs, where)
        ins = [_unwrap(x, False, where) for x in inputs]
        if "out" in kwargs:
            kwargs["out"] = tuple(_unwrap(o, False, where + " out=") for o in kwargs["out"])
        r = getattr(ufunc, method)(*ins, **kwargs)
        _count_call(_host_nbytes(ins, r if "out" not in kwargs else ()))
        return _wrap(r)

    def __array_function__(self, func, types, args, kwargs):
        where = f"np.{func.__name__}"
        _check_reduction(func.__name__, kwargs, where)
        args = _unwrap(args, False, where)
        kwargs = {k: _unwrap(v, False, where) for k, v in kwargs.items()}
        r = func(*args, **kwargs)
        _count_func(func.__name__, args, kwargs, r)
        return _wrap(r)

    def __index__(self):
        if self._a.ndim != 0:
            _fail("__index__ of a non-scalar device array")
        _count_sync("scalar to host", self._a.itemsize)
        return int(self._a)

    # --- device identity and explicit transfer -------------------------------------------
    @property
    def __cuda_array_interface__(self):
        # Only its presence matters: gpudiff recognises device arrays by it.
        return {
            "shape": self._a.shape,
            "typestr": self._a.dtype.str,
            "data": (0, False),
            "version": 3,
        }

    def get(self) -> np.ndarray:
        """The host copy (``cupy.ndarray.get``)."""
        _count_sync("get / asnumpy", self._a.nbytes)
        return np.array(self._a, copy=True)

    # --- indexing ------------------------------------------------------------------------
    def __getitem__(self, key):
        # CuPy converts host index arrays (``_prepare_slice_list``): allowed.
        r = self._a[_unwrap(key, True, "__getitem__")]
        if COUNTS.enabled and _is_advanced(key):
            _count_h2d(_host_nbytes(key if isinstance(key, tuple) else (key,)))
            _count_call(_nbytes(key) + np.asarray(r).nbytes * 2)
            if _has_bool_index(key):  # the output size is data-dependent: CuPy syncs
                _count_sync("boolean-mask index", 8)
        return _wrap(r)

    def __setitem__(self, key, value):
        host_seq = isinstance(value, list) or (isinstance(value, np.ndarray) and value.ndim > 0)
        if host_seq and not _is_advanced(key):
            # CuPy routes a basic-slice assignment of a non-device value through fill().
            _fail(
                "non-scalar host value assigned into a basic slice of a device array "
                "(CuPy: ValueError: non-scalar numpy.ndarray cannot be used for fill)"
            )
        self._a[_unwrap(key, True, "__setitem__")] = _unwrap(value, True, "__setitem__")
        if COUNTS.enabled:
            keys = key if isinstance(key, tuple) else (key,)
            _count_h2d(_host_nbytes(keys) + _host_nbytes((value,)))
            # (a device value by its own size, even an empty one: np.asarray of it would be
            # an implicit transfer, refused)
            vbytes = _nbytes((value,)) if isinstance(value, Dev) else np.asarray(value).nbytes
            _count_call(_nbytes(keys) + 2 * vbytes)
            if _has_bool_index(key) and (
                isinstance(value, (Dev, list)) or (isinstance(value, np.ndarray) and value.ndim > 0)
            ):
                _count_sync("boolean-mask assignment", 8)

    # --- the rest of the ndarray surface -------------------------------------------------
    def __len__(self):
        return len(self._a)

    def __iter__(self):
        for i in range(len(self._a)):
            yield self[i]

    def __bool__(self):
        _count_sync("scalar to host", self._a.itemsize)
        return bool(self._a)

    def __float__(self):
        _count_sync("scalar to host", self._a.itemsize)
        return float(self._a)

    def __int__(self):
        _count_sync("scalar to host", self._a.itemsize)
        return int(self._a)

    def __complex__(self):
        _count_sync("scalar to host", self._a.itemsize)
        return complex(self._a)

    def __format__(self, spec):
        _count_sync("scalar to host", self._a.nbytes)
        return format(self._a.item() if self._a.ndim == 0 else self._a, spec)

    def __repr__(self):
        return "Dev(" + repr(self._a) + ")"

    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)
        attr = getattr(self._a, name)
        if not callable(attr):
            return _wrap(attr) if isinstance(attr, np.ndarray) else attr  # .T, .real, .shape ...
        if name == "fill":

            def fill(value):
                if isinstance(value, np.ndarray) and value.ndim > 0:
                    _fail("non-scalar numpy.ndarray passed to fill()")
                _count_call(self._a.nbytes)
                return attr(_unwrap(value, True, ".fill()"))

            return fill
        host_ok = name in _HOST_OK_METHODS
        a = self._a

        def method(*args, **kwargs):
            _check_reduction(name, kwargs, f".{name}")
            if name == "searchsorted":
                _check_searchsorted_v(args[0] if args else kwargs.get("v"), ".searchsorted")
            args = _unwrap(args, host_ok, f".{name}()")
            kwargs = {k: _unwrap(v, host_ok, f".{name}()") for k, v in kwargs.items()}
            r = attr(*args, **kwargs)
            if COUNTS.enabled:
                if name in _HOST_RESULT_METHODS:
                    _count_sync(f".{name}()", _host_nbytes((r,)) or a.nbytes)
                elif _method_launches(name, a, r, args, kwargs):
                    if host_ok:
                        _count_h2d(_host_nbytes(args) + _host_nbytes(tuple(kwargs.values())))
                    _count_call(a.nbytes + _host_nbytes((r,)))
                    if name in _SYNC_FUNCS:
                        _count_sync(f".{name}() (data-dependent size)", 8)
            return r if name in _HOST_RESULT_METHODS else _wrap(r)

        return method

    def __setattr__(self, name, value):
        setattr(self._a, name, value)  # a.shape = ...

    def __copy__(self):
        return Dev(self._a.copy())

    def __deepcopy__(self, memo):
        return Dev(self._a.copy())

    def __reduce__(self):
        return (Dev, (self._a,))


class _Func:
    """A library function of a fake namespace: device arrays in, device arrays out.

    ``host_kw`` names keyword arguments for which CuPy accepts host data; ``refuse_kw``
    keyword arguments of the SciPy function that the CuPy one does not have.
    """

    def __init__(
        self, f, where: str, host_kw: tuple[str, ...] = (), refuse_kw: tuple[str, ...] = ()
    ):
        self.f, self.where, self.host_kw, self.refuse_kw = f, where, host_kw, refuse_kw
        self.ufunc = None  # the ufunc of a ufunc method (xp.add.reduce ...)

    def __call__(self, *args, **kwargs):
        for k in self.refuse_kw:
            if k in kwargs:
                _fail(f"{self.where}() got keyword {k!r}, which CuPy's does not take")
        name = self.where.rsplit(".", 1)[-1]
        if isinstance(self.f, np.ufunc):
            _check_ufunc(self.f, "__call__", kwargs, self.where)
        elif self.ufunc is not None:
            _check_ufunc(self.ufunc, name, kwargs, self.where)
        else:
            _check_reduction(name, kwargs, self.where)
        if name == "searchsorted" and self.where.startswith("xp."):
            _check_searchsorted_v(args[1] if len(args) > 1 else kwargs.get("v"), self.where)
        args = _unwrap(args, False, self.where)
        kwargs = {k: _unwrap(v, k in self.host_kw, self.where) for k, v in kwargs.items()}
        r = self.f(*args, **kwargs)
        _count_func(self.where.rsplit(".", 1)[-1], args, kwargs, r)
        return _wrap(r)

    def __getattr__(self, name):  # ufunc.reduce, ufunc.outer ...
        a = getattr(self.f, name)
        if not callable(a):
            return a
        fn = _Func(a, f"{self.where}.{name}")
        if isinstance(self.f, np.ufunc):
            fn.ufunc = self.f
        return fn


def _to_device(a, dtype=None, copy=True, **kwargs):
    """``cupy.asarray``/``cupy.array``: host data are copied over; a device array is
    reused unless a copy is asked for (``asarray`` aliases, as CuPy's does)."""
    if isinstance(a, Dev):
        r = np.array(a._a, dtype=dtype, copy=copy or None, **kwargs)
        if r is not a._a and not np.shares_memory(r, a._a):
            _count_call(a._a.nbytes + r.nbytes)
        return Dev(r)
    r = np.array(_unwrap(a, True, "asarray"), dtype=dtype, copy=True, **kwargs)
    _count_h2d(r.nbytes)
    return Dev(r)


class _Cuda:
    """The bits of ``cupy.cuda`` gpudiff asks for."""

    class runtime:
        @staticmethod
        def memGetInfo():
            return (8 << 30, 16 << 30)  # (free, total)

        @staticmethod
        def getDeviceCount():
            return 1

    class _Stream:
        def synchronize(self):
            pass

    @staticmethod
    def get_current_stream():
        return _Cuda._Stream()


class _Namespace:
    """A fake ``cupy`` / ``cupyx.scipy.*`` module over a NumPy / SciPy one."""

    def __init__(
        self,
        mod,
        name: str,
        host_kw: dict[str, tuple[str, ...]] | None = None,
        refuse_kw: tuple[str, ...] = (),
    ):
        self._mod, self._name, self._host_kw, self._refuse_kw = mod, name, host_kw or {}, refuse_kw

    def __getattr__(self, name):
        if name == "ndarray":
            return Dev  # isinstance(a, xp.ndarray) must hold for device arrays only
        if name == "cuda":
            return _Cuda
        if name == "asnumpy":
            return lambda a, *args, **kw: a.get() if isinstance(a, Dev) else np.asarray(a)
        if name == "get_array_module":
            return lambda *arrays: fake_xp if any(isinstance(a, Dev) for a in arrays) else np
        if name == "asarray" or name == "asanyarray":
            return lambda a, dtype=None, **kw: _to_device(a, dtype, copy=False, **kw)
        if name == "array":
            return lambda a, dtype=None, copy=True, **kw: _to_device(a, dtype, copy=copy, **kw)
        if name in ("get_default_memory_pool", "get_default_pinned_memory_pool"):
            raise AttributeError(name)  # nothing to free
        obj = getattr(self._mod, name)
        if isinstance(obj, types.ModuleType):
            return _Namespace(obj, f"{self._name}.{name}")
        if isinstance(obj, type) or not callable(obj):
            return obj  # dtypes, constants, finfo ...
        return _Func(obj, f"{self._name}.{name}", self._host_kw.get(name, ()), self._refuse_kw)


fake_xp = _Namespace(np, "xp")
# cupyx.scipy.fft has no ``workers`` (scipy.fft's CPU threads): Backend.fft_kwargs must be {}.
fake_fft = _Namespace(scipy.fft, "fft", refuse_kw=("workers",))
# cupyx.scipy.ndimage.label takes any array-like structure (it builds it with numpy.array);
# every other function wants device arrays (binary_dilation calls cupy.count_nonzero on it).
fake_ndimage = _Namespace(scipy.ndimage, "ndimage", host_kw={"label": ("structure",)})
fake_linalg = _Namespace(np.linalg, "linalg")


def make_backend():
    """A :class:`gpudiff.backend.Backend` named ``"cupy"`` over the fake namespaces."""
    from gpudiff.backend.core import Backend

    def to_device(a):
        r = np.array(a, copy=True)
        _count_h2d(r.nbytes)
        return Dev(r)

    return Backend(
        name="cupy",
        xp=fake_xp,
        fft=fake_fft,
        ndimage=fake_ndimage,
        linalg=fake_linalg,
        device=0,
        _to_device=to_device,
        _sync=lambda: _count_sync("synchronize"),
    )


_INSTALLED: list = []


def install():
    """Make ``get_backend("cupy")`` (and ``"auto"``) return the fake backend, route every
    registered CUDA kernel to its NumPy twin, and return the backend.

    Not undone: call it in a process of its own (a subprocess in the tests).  Idempotent.
    """
    if _INSTALLED:
        return _INSTALLED[0]
    import gpudiff.backend.core as core
    import gpudiff.backend.kernels as kernels
    import gpudiff.backend.reference as reference

    fake = make_backend()
    orig_build = core._build

    def _build(name):
        return fake if name in ("cupy", "auto") else orig_build(name)

    core._build = _build
    core.cupy_status = lambda: (True, "strict_device stand-in")

    def launcher_for(impl):
        # The real launchers cupy.asarray their array inputs: host data are legal there.
        def launch(*args, **kwargs):
            if COUNTS.enabled:
                _count_h2d(_host_nbytes(args) + _host_nbytes(tuple(kwargs.values())))
            args = _unwrap(args, True, "kernel")
            kwargs = {k: _unwrap(v, True, "kernel") for k, v in kwargs.items()}
            was, COUNTS.enabled = COUNTS.enabled, False  # the twin's NumPy work is one kernel
            try:
                r = impl(*args, **kwargs)
            finally:
                COUNTS.enabled = was
            _count_call(_host_nbytes(args, tuple(kwargs.values()), r))
            return _wrap(r)

        return launch

    def clipped_stack_launch(data, bad, weights=None, nsigma=3.0, niter=3, **kw):
        # As the CuPy launcher: stacks deeper than the kernel's register budget run the
        # vectorized twin *on the device*, every one of its calls counted.
        d = data if isinstance(data, Dev) else _to_device(data)
        if d._a.shape[0] > kernels.CLIPPED_STACK_MAX_N:
            b = bad if isinstance(bad, Dev) or bad is None else _to_device(bad)
            return reference.clipped_stack(d, b, weights, nsigma, niter, **kw)
        return launcher_for(reference.clipped_stack)(d, bad, weights, nsigma, niter, **kw)

    for name, spec in list(kernels._REGISTRY.items()):
        if spec.cuda_launcher is not None:
            launch = (
                clipped_stack_launch if name == "clipped_stack" else launcher_for(spec.numpy_impl)
            )
            kernels._REGISTRY[name] = dataclasses.replace(spec, cuda_launcher=launch)

    orig_am = reference.array_module

    def array_module(*arrays):
        return fake_xp if any(isinstance(a, Dev) for a in arrays) else orig_am(*arrays)

    reference.array_module = array_module
    _INSTALLED.append(fake)
    return fake

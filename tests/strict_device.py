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
  (CuPy: ``ValueError: non-scalar numpy.ndarray cannot be used for fill``).

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
"""

from __future__ import annotations

import dataclasses
import traceback
import types
from typing import Any

import numpy as np
import scipy.fft
import scipy.ndimage
from numpy.lib.mixins import NDArrayOperatorsMixin

__all__ = ["VIOLATIONS", "DeviceDisciplineError", "Dev", "install", "make_backend", "fake_xp"]

#: Every refusal, as ``(message, stack)``, in order; the test asserts it stays empty.
VIOLATIONS: list[tuple[str, str]] = []


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
        ins = [_unwrap(x, False, where) for x in inputs]
        if "out" in kwargs:
            kwargs["out"] = tuple(_unwrap(o, False, where + " out=") for o in kwargs["out"])
        return _wrap(getattr(ufunc, method)(*ins, **kwargs))

    def __array_function__(self, func, types, args, kwargs):
        where = f"np.{func.__name__}"
        args = _unwrap(args, False, where)
        kwargs = {k: _unwrap(v, False, where) for k, v in kwargs.items()}
        return _wrap(func(*args, **kwargs))

    def __index__(self):
        if self._a.ndim != 0:
            _fail("__index__ of a non-scalar device array")
        return int(self._a)

    # --- device identity and explicit transfer -------------------------------------------
    @property
    def __cuda_array_interface__(self):
        # Only its presence matters: gpudiff recognises device arrays by it.
        return {"shape": self._a.shape, "typestr": self._a.dtype.str, "data": (0, False), "version": 3}

    def get(self) -> np.ndarray:
        """The host copy (``cupy.ndarray.get``)."""
        return np.array(self._a, copy=True)

    # --- indexing ------------------------------------------------------------------------
    def __getitem__(self, key):
        # CuPy converts host index arrays (``_prepare_slice_list``): allowed.
        return _wrap(self._a[_unwrap(key, True, "__getitem__")])

    def __setitem__(self, key, value):
        host_seq = isinstance(value, list) or (isinstance(value, np.ndarray) and value.ndim > 0)
        if host_seq and not _is_advanced(key):
            # CuPy routes a basic-slice assignment of a non-device value through fill().
            _fail("non-scalar host value assigned into a basic slice of a device array "
                  "(CuPy: ValueError: non-scalar numpy.ndarray cannot be used for fill)")
        self._a[_unwrap(key, True, "__setitem__")] = _unwrap(value, True, "__setitem__")

    # --- the rest of the ndarray surface -------------------------------------------------
    def __len__(self):
        return len(self._a)

    def __iter__(self):
        for i in range(len(self._a)):
            yield self[i]

    def __bool__(self):
        return bool(self._a)

    def __float__(self):
        return float(self._a)

    def __int__(self):
        return int(self._a)

    def __complex__(self):
        return complex(self._a)

    def __format__(self, spec):
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
                return attr(_unwrap(value, True, ".fill()"))
            return fill
        host_ok = name in _HOST_OK_METHODS

        def method(*args, **kwargs):
            args = _unwrap(args, host_ok, f".{name}()")
            kwargs = {k: _unwrap(v, host_ok, f".{name}()") for k, v in kwargs.items()}
            r = attr(*args, **kwargs)
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

    def __init__(self, f, where: str, host_kw: tuple[str, ...] = (), refuse_kw: tuple[str, ...] = ()):
        self.f, self.where, self.host_kw, self.refuse_kw = f, where, host_kw, refuse_kw

    def __call__(self, *args, **kwargs):
        for k in self.refuse_kw:
            if k in kwargs:
                _fail(f"{self.where}() got keyword {k!r}, which CuPy's does not take")
        args = _unwrap(args, False, self.where)
        kwargs = {k: _unwrap(v, k in self.host_kw, self.where) for k, v in kwargs.items()}
        return _wrap(self.f(*args, **kwargs))

    def __getattr__(self, name):  # ufunc.reduce, ufunc.outer ...
        a = getattr(self.f, name)
        return _Func(a, f"{self.where}.{name}") if callable(a) else a


def _to_device(a, dtype=None, copy=True, **kwargs):
    """``cupy.asarray``/``cupy.array``: host data are copied over; a device array is
    reused unless a copy is asked for (``asarray`` aliases, as CuPy's does)."""
    if isinstance(a, Dev):
        return Dev(np.array(a._a, dtype=dtype, copy=copy or None, **kwargs))
    return Dev(np.array(_unwrap(a, True, "asarray"), dtype=dtype, copy=True, **kwargs))


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

    def __init__(self, mod, name: str, host_kw: dict[str, tuple[str, ...]] | None = None,
                 refuse_kw: tuple[str, ...] = ()):
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

    return Backend(name="cupy", xp=fake_xp, fft=fake_fft, ndimage=fake_ndimage, linalg=fake_linalg, device=0,
                   _to_device=lambda a: Dev(np.array(a, copy=True)), _sync=lambda: None)


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
            args = _unwrap(args, True, "kernel")
            kwargs = {k: _unwrap(v, True, "kernel") for k, v in kwargs.items()}
            return _wrap(impl(*args, **kwargs))
        return launch

    for name, spec in list(kernels._REGISTRY.items()):
        if spec.cuda_launcher is not None:
            kernels._REGISTRY[name] = dataclasses.replace(spec, cuda_launcher=launcher_for(spec.numpy_impl))

    orig_am = reference.array_module

    def array_module(*arrays):
        return fake_xp if any(isinstance(a, Dev) for a in arrays) else orig_am(*arrays)

    reference.array_module = array_module
    _INSTALLED.append(fake)
    return fake

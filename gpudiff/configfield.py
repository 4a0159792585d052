"""Self-documenting config fields: doc, allowed values, range and LSST name in one place.

Every task config is a frozen dataclass whose fields are declared with :func:`option`
(LSST's ``pex_config`` puts a doc, allowed values and ranges on every field in the same way).
One generic validator, :func:`validate_config`, checks each field against its annotation,
its choices and its range; a config class calls it first in ``__post_init__`` and then
checks only the rules that involve several fields.  :func:`describe_config` lists the
fields (value, default, doc, LSST name, constraints; nested configs with dotted names),
:func:`format_config` prints them and :func:`config_to_toml` writes a TOML file that
``gpudiff CMD --config FILE`` reads back into an equal config.

Supported annotations: ``bool``, ``int``, ``float`` (ints accepted), ``str``, ``X | None``,
``tuple[X, ...]`` (lists accepted and stored as tuples; a single string for
``tuple[str, ...]`` becomes a one-element tuple), ``Mapping[str, X]`` / ``dict[str, X]``
(stored as a dict) and nested config dataclasses.  ``bool`` is not accepted as an ``int``
or a ``float``.  For tuples and mappings the choices and the range apply to each element.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import numbers
import re
import types
import typing
from collections.abc import Mapping
from typing import Any, NamedTuple

from .errors import InvalidInputError

__all__ = [
    "ConfigRow",
    "FieldSpec",
    "config_classes",
    "config_to_toml",
    "describe_config",
    "field_spec",
    "format_config",
    "lsst_name",
    "option",
    "validate_config",
]

#: Key of the field metadata that holds the :class:`FieldSpec`.
_META_KEY = "gpudiff.option"


@dataclasses.dataclass(frozen=True)
class FieldSpec:
    """What :func:`option` records about a field (``dataclasses.Field.metadata``).

    Attributes
    ----------
    doc : str
        One-line description.
    choices : tuple or None
        Allowed values (of each element for tuples and mappings).
    min, max : float or None
        Range bounds (of each element for tuples and mappings).
    inclusive_min, inclusive_max : bool
        Whether the bounds themselves are allowed.
    finite : bool
        NaN and ±inf are rejected.
    fold_case : bool
        String choices match case-insensitively (and ignoring surrounding blanks); the
        value is stored as the listed spelling.
    lsst : str or None
        The LSST config name; None for gpudiff-only fields.
    """

    doc: str
    choices: tuple | None = None
    min: float | None = None
    max: float | None = None
    inclusive_min: bool = True
    inclusive_max: bool = True
    finite: bool = False
    fold_case: bool = False
    lsst: str | None = None

    def constraints(self) -> str:
        """The choices and the range as text (empty when there are none)."""
        parts = []
        if self.choices is not None:
            parts.append("one of " + ", ".join(repr(c) for c in self.choices))
        rng = _range_text(self)
        if rng:
            parts.append(rng)
        if self.finite:
            parts.append("finite")
        return "; ".join(parts)


def lsst_name(name: str) -> str:
    """The camelCase of a snake_case field name: ``spatial_kernel_order`` →
    ``spatialKernelOrder`` (LSST's spelling of the same config field)."""
    head, *rest = name.split("_")
    return head + "".join(p[:1].upper() + p[1:] for p in rest)


def option(
    default: Any = dataclasses.MISSING,
    *,
    doc: str,
    choices: typing.Iterable | None = None,
    min: float | None = None,  # noqa: A002  (pex_config's RangeField spelling)
    max: float | None = None,  # noqa: A002
    inclusive_min: bool = True,
    inclusive_max: bool = True,
    finite: bool = False,
    fold_case: bool = False,
    lsst: str | None = None,
    gpudiff_only: bool = False,
    default_factory: Any = dataclasses.MISSING,
) -> Any:
    """A dataclass field with its doc, allowed values, range and LSST name.

    Parameters
    ----------
    default : object, optional
        The default value (immutable); or give ``default_factory``.
    doc : str
        One-line description of what the field does (shown by ``--show-config``).
    choices : iterable, optional
        Allowed values.
    min, max : float, optional
        Range bounds, inclusive unless ``inclusive_min``/``inclusive_max`` is False.
    finite : bool
        Reject NaN and ±inf.
    fold_case : bool
        Match string choices case-insensitively; the value is stored as listed in ``choices``.
    lsst : str, optional
        The LSST config name when it is not the camelCase of the field name
        (:func:`lsst_name`).
    gpudiff_only : bool
        The field has no LSST counterpart.
    default_factory : callable, optional
        Makes the default (for nested configs and mutable values).

    Returns
    -------
    dataclasses.Field
        With a :class:`FieldSpec` in its metadata.
    """
    if not doc or not doc.strip():
        raise ValueError("option() needs a non-empty doc")
    if gpudiff_only and lsst is not None:
        raise ValueError("option(): a gpudiff-only field has no LSST name")
    spec = FieldSpec(
        doc=" ".join(doc.split()),
        choices=None if choices is None else tuple(choices),
        min=min,
        max=max,
        inclusive_min=inclusive_min,
        inclusive_max=inclusive_max,
        finite=finite,
        fold_case=fold_case,
        lsst=None if gpudiff_only else (lsst or ""),  # "" = the camelCase, filled per field
    )
    return dataclasses.field(
        default=default, default_factory=default_factory, metadata={_META_KEY: spec}
    )


def field_spec(f: dataclasses.Field) -> FieldSpec | None:
    """The :class:`FieldSpec` of a dataclass field (None when declared without :func:`option`),
    with the LSST name filled in."""
    spec = f.metadata.get(_META_KEY)
    if spec is not None and spec.lsst == "":
        spec = dataclasses.replace(spec, lsst=lsst_name(f.name))
    return spec


# --- annotations ------------------------------------------------------------------------


class _Type(NamedTuple):
    kind: str  # bool int float str optional tuple mapping config any
    inner: Any = None  # element _Type (optional, tuple, mapping) or the class (config, any)


def _parse(tp: Any) -> _Type:
    if tp is typing.Any:  # a class since Python 3.11, but not one isinstance accepts
        return _Type("any", None)
    if tp in (bool, int, float, str):
        return _Type(tp.__name__)
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        rest = [a for a in args if a is not type(None)]
        if len(rest) == 1 and len(rest) < len(args):
            return _Type("optional", _parse(rest[0]))
        return _Type("any", None)
    if origin is tuple and len(args) == 2 and args[1] is Ellipsis:
        return _Type("tuple", _parse(args[0]))
    if origin in (dict, Mapping, typing.Mapping) and len(args) == 2:
        return _Type("mapping", _parse(args[1]))
    if isinstance(tp, type) and dataclasses.is_dataclass(tp):
        return _Type("config", tp)
    return _Type("any", tp if isinstance(tp, type) else None)


@functools.lru_cache(maxsize=None)
def _field_types(cls: type) -> dict[str, _Type]:
    hints = typing.get_type_hints(cls)
    return {f.name: _parse(hints[f.name]) for f in dataclasses.fields(cls)}


def _describe_type(t: _Type) -> str:
    if t.kind in ("bool", "int", "str"):
        return {"bool": "a bool", "int": "an int", "str": "a str"}[t.kind]
    if t.kind == "float":
        return "a float (or int)"
    if t.kind == "optional":
        return f"{_describe_type(t.inner)} or None"
    if t.kind == "tuple":
        return f"a tuple of {_type_name(t.inner)}"
    if t.kind == "mapping":
        return f"a mapping of str to {_type_name(t.inner)}"
    if t.kind == "config":
        return f"a {t.inner.__name__}"
    return f"a {t.inner.__name__}" if t.inner is not None else "a value"


def _type_name(t: _Type) -> str:
    """Short annotation text: ``int``, ``tuple[str, ...]``, ``PsfMatchConfig``."""
    if t.kind in ("bool", "int", "float", "str"):
        return t.kind
    if t.kind == "optional":
        return f"{_type_name(t.inner)} | None"
    if t.kind == "tuple":
        return f"tuple[{_type_name(t.inner)}, ...]"
    if t.kind == "mapping":
        return f"dict[str, {_type_name(t.inner)}]"
    return t.inner.__name__ if t.inner is not None else "object"


# --- validation -------------------------------------------------------------------------


def _range_text(spec: FieldSpec) -> str:
    lo, hi = spec.min, spec.max
    if lo is not None and hi is not None:
        return (
            f"in {'[' if spec.inclusive_min else '('}{lo}, {hi}{']' if spec.inclusive_max else ')'}"
        )
    if lo is not None:
        return f"{'>=' if spec.inclusive_min else '>'} {lo}"
    if hi is not None:
        return f"{'<=' if spec.inclusive_max else '<'} {hi}"
    return ""


def _is_int(v: Any) -> bool:
    # numbers.Integral covers numpy integers; bool (and numpy's bool_) are not ints here.
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def _is_real(v: Any) -> bool:
    return isinstance(v, numbers.Real) and not isinstance(v, bool) and type(v).__name__ != "bool_"


def _fail(where: str, what: str, value: Any) -> None:
    raise InvalidInputError(f"{where} must be {what}, got {value!r} ({type(value).__name__})")


def _check_scalar(value: Any, spec: FieldSpec | None, where: str) -> Any:
    """Choices and range of one value (of an element, for tuples and mappings)."""
    if spec is None:
        return value
    if spec.choices is not None:
        if value in spec.choices:
            return value
        if spec.fold_case and isinstance(value, str):
            folded = value.strip().upper()
            for c in spec.choices:
                if isinstance(c, str) and c.upper() == folded:
                    return c
        fold = " (any case)" if spec.fold_case else ""
        raise InvalidInputError(f"{where} must be one of {spec.choices}{fold}, got {value!r}")
    if _is_real(value):
        if spec.finite and not math.isfinite(value):
            raise InvalidInputError(f"{where} must be finite, got {value!r}")
        lo, hi = spec.min, spec.max
        ok = True
        if lo is not None:
            ok = value >= lo if spec.inclusive_min else value > lo
        if ok and hi is not None:
            ok = value <= hi if spec.inclusive_max else value < hi
        if not ok:  # NaN fails every comparison, so it fails any range
            raise InvalidInputError(f"{where} must be {_range_text(spec)}, got {value!r}")
    return value


def _check(value: Any, t: _Type, spec: FieldSpec | None, where: str, none: str = "") -> Any:
    """``value`` checked against the annotation and the spec, possibly normalized (list →
    tuple, case-folded choice).  ``none``: appended to the expected type (" or None")."""
    kind = t.kind
    if kind == "optional":
        return None if value is None else _check(value, t.inner, spec, where, " or None")
    if kind == "bool":
        if not (isinstance(value, bool) or type(value).__name__ == "bool_"):
            _fail(where, "a bool" + none, value)
        return value
    if kind == "int":
        if not _is_int(value):
            _fail(where, "an int" + none, value)
        return _check_scalar(value, spec, where)
    if kind == "float":
        if not _is_real(value):
            _fail(where, "a float (or int)" + none, value)
        return _check_scalar(value, spec, where)
    if kind == "str":
        if not isinstance(value, str):
            _fail(where, "a str" + none, value)
        return _check_scalar(value, spec, where)
    if kind == "tuple":
        if isinstance(value, str) and t.inner.kind == "str":
            value = (value,)
        if isinstance(value, (str, bytes, Mapping)) or not isinstance(value, typing.Iterable):
            _fail(where, _describe_type(t) + none, value)
        items = tuple(value)
        out = tuple(_check(v, t.inner, spec, f"{where}[{i}]") for i, v in enumerate(items))
        same = type(value) is tuple and all(a is b for a, b in zip(out, items))
        return value if same else out
    if kind == "mapping":
        if not isinstance(value, Mapping):
            _fail(where, _describe_type(t) + none, value)
        out = {}
        for k, v in value.items():
            if not isinstance(k, str):
                _fail(f"{where} key", "a str", k)
            out[k] = _check(v, t.inner, spec, f"{where}[{k!r}]")
        return out
    if kind == "config":
        if not isinstance(value, t.inner):
            _fail(where, _describe_type(t) + none, value)
        return value
    if t.inner is not None and not isinstance(value, t.inner):
        _fail(where, _describe_type(t) + none, value)
    return _check_scalar(value, spec, where)


def validate_config(obj: Any) -> None:
    """Check every field of the config dataclass ``obj`` against its annotation, choices
    and range; normalize in place (lists → tuples, case-folded choices, mappings → dict).

    Call it first in ``__post_init__`` (frozen dataclasses are updated with
    ``object.__setattr__``).  Fields declared without :func:`option` are type-checked only.

    Raises
    ------
    InvalidInputError
        Naming ``ClassName.field``, what was expected and the value given.
    """
    cls = type(obj)
    kinds = _field_types(cls)
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        new = _check(value, kinds[f.name], field_spec(f), f"{cls.__name__}.{f.name}")
        if new is not value:
            object.__setattr__(obj, f.name, new)


# --- description ------------------------------------------------------------------------


class ConfigRow(NamedTuple):
    """One field of :func:`describe_config`."""

    name: str  #: dotted name (``make_kernel.kernel_size``)
    value: Any
    default: Any
    type: str  #: annotation text (``int``, ``tuple[str, ...]``)
    doc: str
    lsst: str | None  #: LSST config name; None: gpudiff only
    constraints: str  #: choices / range as text


def _is_config(value: Any) -> bool:
    """A config dataclass instance (one with :func:`option` fields): expanded with dotted
    names; other dataclass values (e.g. a simulation's PsfSpec) are shown whole."""
    return (
        dataclasses.is_dataclass(value)
        and not isinstance(value, type)
        and any(_META_KEY in f.metadata for f in dataclasses.fields(value))
    )


def _default_of(cfg: Any) -> Any:
    try:
        return type(cfg)()
    except Exception:  # a config class whose fields need values has no default instance
        return None


def describe_config(cfg: Any, default: Any = None, prefix: str = "") -> list[ConfigRow]:
    """Every field of the config dataclass ``cfg``, nested configs expanded with dotted names.

    Parameters
    ----------
    cfg : dataclass instance
        The config.
    default : dataclass instance, optional
        Where the defaults are read (default: ``type(cfg)()``; a nested config's default is
        the one its parent's default holds, e.g. ``AlardLuptonSubtractConfig``'s
        ``make_kernel`` defaults differ from ``PsfMatchConfig()``).
    prefix : str
        Prepended to the names.

    Returns
    -------
    list of ConfigRow
    """
    if default is None:
        default = _default_of(cfg)
    kinds = _field_types(type(cfg))
    rows: list[ConfigRow] = []
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        dflt = getattr(default, f.name, None) if default is not None else None
        spec = field_spec(f)
        name = prefix + f.name
        if _is_config(value):
            if not isinstance(dflt, type(value)):
                dflt = _default_of(value)
            rows.extend(describe_config(value, dflt, name + "."))
            continue
        rows.append(
            ConfigRow(
                name=name,
                value=value,
                default=dflt,
                type=_type_name(kinds[f.name]),
                doc=spec.doc if spec else "",
                lsst=spec.lsst if spec else None,
                constraints=spec.constraints() if spec else "",
            )
        )
    return rows


def format_config(cfg: Any) -> str:
    """``--show-config`` text: per field its dotted name, value and default, then its doc
    (with the constraints and the LSST name)."""
    lines = [f"{type(cfg).__name__}  (NAME = VALUE  [default, type]  then what it does)"]
    for r in describe_config(cfg):
        marks = "" if _same(r.value, r.default) else "  *changed*"
        lines.append(f"{r.name} = {r.value!r}  [default {r.default!r}, {r.type}]{marks}")
        extra = [r.constraints] if r.constraints else []
        extra.append(f"LSST {r.lsst}" if r.lsst else "gpudiff only")
        lines.append(f"    {r.doc} ({'; '.join(extra)})")
    return "\n".join(lines) + "\n"


def _same(a: Any, b: Any) -> bool:
    try:
        return bool(a == b)
    except Exception:  # e.g. arrays; a value that cannot be compared counts as changed
        return False


# --- TOML -------------------------------------------------------------------------------

_BARE_KEY = re.compile(r"^[A-Za-z0-9_-]+$")


def _toml_key(key: str) -> str:
    return key if _BARE_KEY.match(key) else _toml_str(key)


def _toml_str(s: str) -> str:
    # A JSON string (ensure_ascii=False) is a valid TOML basic string: both escape \", \\
    # and control characters (\n, \t, \uXXXX) the same way.
    return json.dumps(s, ensure_ascii=False)


def _toml_value(v: Any) -> str:
    if isinstance(v, bool) or type(v).__name__ == "bool_":
        return "true" if v else "false"
    if _is_int(v):
        return str(int(v))
    if _is_real(v):
        x = float(v)
        if math.isnan(x):
            return "nan"
        if math.isinf(x):
            return "inf" if x > 0 else "-inf"
        return repr(x)  # shortest text that reads back to the same float
    if isinstance(v, str):
        return _toml_str(v)
    if isinstance(v, (tuple, list)):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    if isinstance(v, Mapping):
        items = ", ".join(f"{_toml_key(str(k))} = {_toml_value(x)}" for k, x in v.items())
        return "{ " + items + " }" if items else "{}"
    raise InvalidInputError(f"cannot write {v!r} ({type(v).__name__}) as TOML")


#: TOML has no null: an unset optional field is written as this string, which
#: ``--config`` reads back as None (:func:`gpudiff.commands._config.apply_overrides`).
TOML_NONE = "None"


def config_to_toml(cfg: Any, comments: bool = True) -> str:
    """The config as a TOML document that ``--config FILE`` reads back into an equal config.

    Scalars, tuples (arrays) and mappings (inline tables) are written as keys, nested
    configs as tables (``[make_kernel]``); None (which TOML cannot hold) as the string
    ``"None"``.  With ``comments`` each key is preceded by its doc and default.
    """
    out: list[str] = []
    if comments:
        out.append(f"# {type(cfg).__name__} (gpudiff --show-config --format toml)")
    _toml_table(cfg, _default_of(cfg), "", out, comments)
    return "\n".join(out).strip("\n") + "\n"


def _toml_table(cfg: Any, default: Any, prefix: str, out: list[str], comments: bool) -> None:
    nested = []
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        dflt = getattr(default, f.name, None) if default is not None else None
        if _is_config(value):
            nested.append((f.name, value, dflt if isinstance(dflt, type(value)) else None))
            continue
        if comments:
            spec = field_spec(f)
            if spec:
                out.append(f"# {spec.doc}")
            out.append(f"# default: {_toml_value(TOML_NONE if dflt is None else dflt)}")
        text = _toml_value(TOML_NONE if value is None else value)
        out.append(f"{_toml_key(f.name)} = {text}")
    for name, value, dflt in nested:
        out.append("")
        out.append(f"[{prefix}{_toml_key(name)}]")
        _toml_table(value, dflt or _default_of(value), f"{prefix}{_toml_key(name)}.", out, comments)


def optional_field(cls: type, name: str) -> bool:
    """True when the field ``name`` of config class ``cls`` is ``X | None`` with X not
    str (so that the string ``"None"`` can only mean None)."""
    t = _field_types(cls).get(name)
    return t is not None and t.kind == "optional" and t.inner.kind != "str"


# --- discovery --------------------------------------------------------------------------


def config_classes(package: str = "gpudiff") -> list[type]:
    """Every dataclass in ``package``'s modules with at least one :func:`option` field
    (imports every module of the package)."""
    import importlib
    import pkgutil

    pkg = importlib.import_module(package)
    found: dict[str, type] = {}
    for info in pkgutil.walk_packages(pkg.__path__, package + "."):
        if info.name.rsplit(".", 1)[-1] == "__main__":  # importing it would run the CLI
            continue
        try:
            mod = importlib.import_module(info.name)
        except ImportError:  # a module of an optional dependency (e.g. dask) not installed
            continue
        for obj in vars(mod).values():
            if (
                isinstance(obj, type)
                and dataclasses.is_dataclass(obj)
                and obj.__module__ == mod.__name__
                and any(_META_KEY in f.metadata for f in dataclasses.fields(obj))
            ):
                found[f"{obj.__module__}.{obj.__qualname__}"] = obj
    return [found[k] for k in sorted(found)]

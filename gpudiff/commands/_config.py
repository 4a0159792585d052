"""``--config FILE`` and ``--set field=value`` for task configs (frozen dataclasses).

A config file is JSON or TOML holding a (possibly nested) mapping of field names; ``--set``
takes dotted names for nested configs, e.g. ``--set make_kernel.spatial_kernel_order=2``.
Values are parsed as Python/JSON literals when they can be, else taken as strings.
"""

from __future__ import annotations

import ast
import dataclasses
import json
from pathlib import Path
from typing import Any

from ..errors import InvalidInputError

__all__ = ["apply_overrides", "load_config_file", "parse_set"]


def _literal(text: str) -> Any:
    for parse in (ast.literal_eval, json.loads):
        try:
            return parse(text)
        except (ValueError, SyntaxError, json.JSONDecodeError):
            continue
    return text


def parse_set(items: list[str] | None) -> dict[str, Any]:
    """``["a.b=1", "mode=auto"]`` → ``{"a": {"b": 1}, "mode": "auto"}``."""
    out: dict[str, Any] = {}
    for item in items or []:
        if "=" not in item:
            raise InvalidInputError(f"--set expects field=value, got {item!r}")
        key, value = item.split("=", 1)
        node = out
        parts = key.strip().split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
        node[parts[-1]] = _literal(value.strip())
    return out


def load_config_file(path: str | None) -> dict[str, Any]:
    """The mapping in a JSON (``.json``) or TOML (anything else) config file."""
    if not path:
        return {}
    p = Path(path)
    try:
        text = p.read_text()
    except OSError as exc:
        raise InvalidInputError(f"cannot read config file {p}: {exc.strerror or exc}") from None
    try:
        if p.suffix.lower() == ".json":
            data = json.loads(text)
        else:
            import tomllib  # Python >= 3.11

            data = tomllib.loads(text)
    except ModuleNotFoundError:
        raise InvalidInputError(f"config file {p}: TOML needs Python >= 3.11; use JSON") from None
    except Exception as exc:
        raise InvalidInputError(f"config file {p} is not valid: {exc}") from None
    if not isinstance(data, dict):
        raise InvalidInputError(f"config file {p} must hold a mapping of field names")
    return data


def apply_overrides(config: Any, overrides: dict[str, Any], where: str = "config") -> Any:
    """A copy of the dataclass ``config`` with ``overrides`` (nested dicts for nested configs)."""
    if not overrides:
        return config
    names = {f.name: f for f in dataclasses.fields(config)}
    changes = {}
    for key, value in overrides.items():
        if key not in names:
            raise InvalidInputError(f"{where} has no field {key!r}; fields: {sorted(names)}")
        current = getattr(config, key)
        if dataclasses.is_dataclass(current) and isinstance(value, dict):
            changes[key] = apply_overrides(current, value, f"{where}.{key}")
        elif isinstance(current, tuple) and isinstance(value, (list, tuple, str)):
            changes[key] = tuple([value] if isinstance(value, str) else value)
        else:
            changes[key] = value
    try:
        return dataclasses.replace(config, **changes)
    except (TypeError, ValueError) as exc:
        raise InvalidInputError(f"invalid {where} override: {exc}") from None

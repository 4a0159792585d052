"""``--config FILE``, ``--set field=value`` and ``--show-config`` for task configs (frozen
dataclasses declared with :func:`gpudiff.configfield.option`).

A config file is JSON or TOML holding a (possibly nested) mapping of field names; ``--set``
takes dotted names for nested configs, e.g. ``--set make_kernel.spatial_kernel_order=2``.
Values are parsed as Python/JSON literals when they can be, else taken as strings.  TOML has
no null: the string ``"None"`` stands for None in a field that may be None (this is what
``--show-config --format toml`` writes, so its output loads back into an equal config).
``--show-config`` prints every field (dotted name, value, default, doc) and exits without
reading any input.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import json
import sys
from pathlib import Path
from typing import Any

from ..errors import InvalidInputError

__all__ = ["add_show_config", "apply_overrides", "load_config_file", "parse_set", "show_config"]


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
    from ..configfield import TOML_NONE, optional_field

    names = {f.name: f for f in dataclasses.fields(config)}
    changes = {}
    for key, value in overrides.items():
        if key not in names:
            raise InvalidInputError(f"{where} has no field {key!r}; fields: {sorted(names)}")
        if value == TOML_NONE and optional_field(type(config), key):
            value = None  # TOML cannot write None (gpudiff.configfield.config_to_toml)
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


def add_show_config(parser: argparse.ArgumentParser, what: str) -> None:
    """Add ``--show-config`` and ``--format {text,toml}`` to a command's parser.

    With ``--show-config`` the command's required arguments (inputs, outputs) may be left
    out: the command prints the config and exits 0 (:func:`show_config`).
    """
    parser.add_argument(
        "--show-config",
        action="store_true",
        help=f"print every {what} field (dotted name, value after --config/--set, default, "
        "doc) and exit; needs no input files",
    )
    parser.add_argument(
        "--format",
        dest="config_format",
        choices=("text", "toml"),
        default="text",
        help="--show-config output: text (default) or toml (a file --config reads back)",
    )
    _optional_inputs_with(parser, "--show-config")


def _optional_inputs_with(parser: argparse.ArgumentParser, flag: str) -> None:
    # argparse checks required arguments and groups after parsing, before any action could
    # say they are not needed; so, when the flag is on the command line, they are made
    # optional for that one parse (as --help and --version never need them either).
    parse = parser.parse_known_args

    def parse_known_args(args=None, namespace=None):
        words = list(sys.argv[1:] if args is None else args)
        words = words[: words.index("--")] if "--" in words else words
        # argparse also takes an unambiguous prefix (--show); "--s" alone is ambiguous
        if not any(len(w) > 3 and flag.startswith(w) for w in words):
            return parse(args, namespace)
        actions = [a for a in parser._actions if a.required]
        groups = [g for g in parser._mutually_exclusive_groups if g.required]
        for item in (*actions, *groups):
            item.required = False
        try:
            return parse(args, namespace)
        finally:
            for item in (*actions, *groups):
                item.required = True

    parser.parse_known_args = parse_known_args  # type: ignore[method-assign]


def show_config(config: Any, fmt: str = "text") -> int:
    """Print ``config`` as ``--show-config`` does (``fmt``: "text" or "toml"); returns 0."""
    from ..configfield import config_to_toml, format_config

    print(config_to_toml(config) if fmt == "toml" else format_config(config), end="")
    return 0

"""Settings from TOML files and command-line flags, validated against dataclass metadata.

Each service describes its settings as a frozen dataclass whose fields carry
``metadata={"help": ..., "choices": ..., "min": ..., "max": ..., "flag": ...}``. One loader
serves both services, so every option is settable in TOML and by flag, and every refusal names
the key and what it accepts.
"""

from __future__ import annotations

import dataclasses
import math
import tomllib
import types
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")


class ConfigError(ValueError):
    """A refused setting; the message names the key and how to fix it."""


def _num(value: float) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


def number_problem(value: float, minimum: float | None = None, maximum: float | None = None,
                   *, min_open: bool = False, max_open: bool = False) -> str | None:
    """Why ``value`` is refused (None: accepted): the one numeric check for flags and TOML.

    NaN compares false with everything, so a plain ``value < minimum`` lets it through; it and
    the infinities are refused first, whatever the bounds.
    """
    if isinstance(value, float) and not math.isfinite(value):
        return f"{_num(value)} is not a finite number"
    if minimum is not None and (value < minimum or (min_open and value == minimum)):
        return (f"{_num(value)} is not above {_num(minimum)}" if min_open
                else f"{_num(value)} is below the minimum {_num(minimum)}")
    if maximum is not None and (value > maximum or (max_open and value == maximum)):
        return (f"{_num(value)} is not below {_num(maximum)}" if max_open
                else f"{_num(value)} is above the maximum {_num(maximum)}")
    return None


def parse_file_mode(key: str, text: str) -> int:
    """Permission bits from an octal string such as ``'0660'``; ValueError names ``key``."""
    try:
        mode = int(text, 8)
    except ValueError:
        mode = -1
    if not 0 <= mode <= 0o777:
        raise ValueError(f"{key}: {text!r} is not an octal mode like '0660'")
    return mode


@dataclasses.dataclass(frozen=True, slots=True)
class Option:
    """One setting as the loader, the CLI and the config reference see it."""

    key: str
    type_name: str
    default: Any
    help: str
    choices: tuple[Any, ...] | None
    minimum: float | None
    maximum: float | None
    min_open: bool
    flag: str
    is_list: bool
    base: type


def _base_type(tp: Any) -> tuple[type, bool, bool]:
    """``(base type, is_list, optional)`` for the field types the loader supports."""
    optional = False
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        optional = len(args) < len(typing.get_args(tp))
        if len(args) != 1:
            raise TypeError(f"unsupported settings type {tp}")
        tp = args[0]
        origin = typing.get_origin(tp)
    if origin in (tuple, list):
        return typing.get_args(tp)[0], True, optional
    return tp, False, optional


def options(cls: type) -> list[Option]:
    """The settings a dataclass declares, in declaration order."""
    hints = typing.get_type_hints(cls)
    result = []
    for f in dataclasses.fields(cls):
        base, is_list, optional = _base_type(hints[f.name])
        default: Any
        if f.default is not dataclasses.MISSING:
            default = f.default
        elif f.default_factory is not dataclasses.MISSING:
            default = f.default_factory()
        else:
            default = None
        type_name = base.__name__ + (" list" if is_list else "") + (" or unset" if optional else "")
        md = f.metadata
        result.append(
            Option(
                key=f.name, type_name=type_name, default=default, help=md.get("help", ""),
                choices=tuple(md["choices"]) if "choices" in md else None,
                minimum=md.get("min"), maximum=md.get("max"),
                min_open=bool(md.get("min_open", False)),
                flag=md.get("flag", "--" + f.name.replace("_", "-")),
                is_list=is_list, base=base,
            )
        )
    return result


def _coerce(opt: Option, value: Any, origin: str) -> Any:
    where = f"{opt.key} ({origin})"
    if value is None:
        return None
    if opt.is_list:
        if isinstance(value, str | bytes) or not isinstance(value, list | tuple):
            raise ConfigError(f"{where}: expected a list of {opt.base.__name__}, got {value!r}")
        return tuple(_coerce_scalar(opt, v, where) for v in value)
    return _coerce_scalar(opt, value, where)


def _coerce_scalar(opt: Option, value: Any, where: str) -> Any:
    base = opt.base
    ok = (
        isinstance(value, bool) if base is bool
        else isinstance(value, int) and not isinstance(value, bool) if base is int
        else isinstance(value, int | float) and not isinstance(value, bool) if base is float
        else isinstance(value, base)
    )
    if not ok:
        raise ConfigError(f"{where}: expected {base.__name__}, got {value!r}")
    if base is float:
        value = float(value)
    if opt.choices is not None and value not in opt.choices:
        accepted = ", ".join(repr(c) for c in opt.choices)
        raise ConfigError(f"{where}: {value!r} is not accepted; use one of {accepted}")
    if base in (int, float):
        problem = number_problem(value, opt.minimum, opt.maximum, min_open=opt.min_open)
        if problem is not None:
            raise ConfigError(f"{where}: {problem}")
    return value


def read_toml(path: str | Path, section: str | None = None) -> dict[str, Any]:
    """Read a TOML file (optionally one table of it); errors name the file and line."""
    try:
        with open(path, "rb") as fh:
            data = tomllib.load(fh)
    except OSError as exc:
        raise ConfigError(f"config file {path}: {exc.strerror or exc}") from exc
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file {path}: not valid TOML: {exc}") from exc
    if section is not None and section in data:
        table = data[section]
        if not isinstance(table, dict):
            raise ConfigError(f"config file {path}: [{section}] must be a table")
        return dict(table)
    return data


def load_settings(
    cls: type[T],
    file_values: Mapping[str, Any] | None = None,
    flag_values: Mapping[str, Any] | None = None,
    origin: str = "config file",
) -> T:
    """Build ``cls`` from defaults, then file values, then flags (given flags win).

    Unknown keys and bad values raise :class:`ConfigError` naming the key and accepted values.
    A ``validate()`` method on ``cls`` runs last, for cross-field rules.
    """
    opts = {o.key: o for o in options(cls)}
    values: dict[str, Any] = {}
    for key, value in (file_values or {}).items():
        if key not in opts:
            known = ", ".join(sorted(opts))
            raise ConfigError(f"unknown key {key!r} in {origin}; accepted keys: {known}")
        values[key] = _coerce(opts[key], value, origin)
    for key, value in (flag_values or {}).items():
        if value is None or (opts[key].is_list and value == ()):
            continue  # flag not given: keep the file's value or the default
        values[key] = _coerce(opts[key], value, "flag " + opts[key].flag)
    try:
        settings = cls(**values)
    except TypeError as exc:  # pragma: no cover - a dataclass/loader mismatch is a bug
        raise ConfigError(str(exc)) from exc
    validate = getattr(settings, "validate", None)
    if validate is not None:
        try:
            validate()
        except ValueError as exc:
            raise ConfigError(str(exc)) from exc
    return settings


def reference_markdown(title: str, cls: type, section: str) -> str:
    """A Markdown table of every option: the config reference is generated from the code."""
    lines = [f"## {title} (`[{section}]`)", "", "| key | flag | type | default | meaning |",
             "|---|---|---|---|---|"]
    for o in options(cls):
        meaning = o.help
        if o.choices:
            meaning += " One of: " + ", ".join(f"`{c}`" for c in o.choices) + "."
        if o.minimum is not None or o.maximum is not None:
            meaning += f" Range: {o.minimum if o.minimum is not None else ''}.." \
                       f"{o.maximum if o.maximum is not None else ''}" \
                       f"{' (minimum excluded)' if o.min_open else ''}."
        default = "unset" if o.default is None else f"`{o.default!r}`"
        lines.append(f"| `{o.key}` | `{o.flag}` | {o.type_name} | {default} | {meaning} |")
    return "\n".join(lines) + "\n"

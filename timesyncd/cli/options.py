"""Click options generated from a settings dataclass, so every TOML key is also a flag."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import click

from timesyncd.config import ConfigError, load_settings, number_problem, options, read_toml


class _Checked:
    """Mixin for click's range types: the bounds are checked by ``config.number_problem``, the
    same function TOML values go through, so NaN and the infinities are refused at parse time
    with one line naming the option (click's own range check lets NaN through)."""

    # Any: click's declarations differ between releases (8.4: float | None; 8.5: a type
    # variable of the range's value type); these only say the range base class has them
    min: Any
    max: Any
    min_open: bool
    max_open: bool

    def convert(self, value: Any, param: click.Parameter | None,
                ctx: click.Context | None) -> Any:
        number = self._number(value, param, ctx)  # type: ignore[attr-defined]
        problem = number_problem(number, self.min, self.max, min_open=self.min_open,
                                 max_open=self.max_open)
        if problem is not None:
            self.fail(problem, param, ctx)  # type: ignore[attr-defined]
        return number


class Float(_Checked, click.FloatRange):
    """A finite float, optionally bounded; every float option of every subcommand uses it."""

    name = "float"

    def _number(self, value: Any, param: click.Parameter | None,
                ctx: click.Context | None) -> float:
        if isinstance(value, float):
            return value
        if isinstance(value, int) and not isinstance(value, bool):
            return float(value)
        try:
            return float(str(value).strip())
        except ValueError:
            self.fail(f"{str(value)!r} is not a number", param, ctx)


class Int(_Checked, click.IntRange):
    """An integer, optionally bounded; every integer option of every subcommand uses it."""

    name = "integer"

    def _number(self, value: Any, param: click.Parameter | None,
                ctx: click.Context | None) -> int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        try:
            return int(str(value).strip())
        except ValueError:
            self.fail(f"{str(value)!r} is not an integer", param, ctx)


def number_type(base: type, minimum: float | None, maximum: float | None,
                min_open: bool = False) -> click.ParamType:
    """The click type of a numeric setting, from its metadata bounds."""
    if base is int:
        return Int(None if minimum is None else int(minimum),
                   None if maximum is None else int(maximum))
    return Float(minimum, maximum, min_open=min_open)


def default_text(opt: Any) -> str:
    """A setting's default as ``--help`` shows it, with the unit its key names."""
    value = opt.default
    if value is None:
        return "unset"
    if isinstance(value, bool):
        return ("--" if value else "--no-") + opt.flag.removeprefix("--")
    if isinstance(value, tuple | list):
        return ", ".join(map(str, value)) or "none"
    if value == "":
        return "empty"
    unit = next((u for suffix, u in (("_s", "s"), ("_ppm", "ppm"), ("poll", "log2 s"))
                 if opt.key.endswith(suffix)), "")
    text = f"{value:g}" if isinstance(value, float) else str(value)
    return f"{text} {unit}".strip()


def settings_options(
    cls: type, flags: Mapping[str, str] | None = None
) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Decorate a command with one option per setting; ``flags`` renames some (key -> flag)."""
    renames = dict(flags or {})

    def decorate(func: Callable[..., Any]) -> Callable[..., Any]:
        for opt in reversed(options(cls)):
            flag = renames.get(opt.key, opt.flag)
            help_text = opt.help + (f" [config key: {opt.key}]")
            if opt.base is bool and not opt.is_list:
                name = flag.removeprefix("--")
                decl = f"--{name}/--no-{name}"
                func = click.option(decl, opt.key, default=None, help=help_text,
                                    show_default=default_text(opt))(func)
            else:
                ptype: Any = opt.base
                if opt.choices and opt.base is str:
                    ptype = click.Choice([str(c) for c in opt.choices])
                elif opt.base in (int, float):
                    ptype = number_type(opt.base, opt.minimum, opt.maximum, opt.min_open)
                func = click.option(
                    flag, opt.key, type=ptype, multiple=opt.is_list, default=None,
                    help=help_text, show_default=default_text(opt),
                )(func)
        return func

    return decorate


def build_settings(cls: type, config: str | None, section: str, flag_values: dict[str, Any]) -> Any:
    """Defaults < config file (``[section]`` table or top level) < flags; click-friendly errors."""
    try:
        file_values = read_toml(config, section) if config else {}
        origin = f"{config} [{section}]" if config else "config file"
        return load_settings(cls, file_values, flag_values, origin=origin)
    except ConfigError as exc:
        raise click.UsageError(str(exc)) from exc

"""Click options generated from a settings dataclass, so every TOML key is also a flag."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import click

from timesyncd.config import ConfigError, load_settings, options, read_toml


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
                func = click.option(decl, opt.key, default=None, help=help_text)(func)
            else:
                ptype: Any = click.Choice([str(c) for c in opt.choices]) if (
                    opt.choices and opt.base is str) else opt.base
                func = click.option(
                    flag, opt.key, type=ptype, multiple=opt.is_list, default=None,
                    help=help_text,
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

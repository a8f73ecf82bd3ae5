"""Typed reads of a composed config that fail with a :class:`ConfigError` naming the dotted key."""

from __future__ import annotations

from collections.abc import Mapping


class ConfigError(ValueError):
    """A config value a run cannot use; the message names the key and the fix."""


def get(cfg, path: str, default=None):
    """Dotted lookup; an unset mandatory value (???) raises a ConfigError naming the key, a missing
    key gives ``default``."""
    node = cfg
    for part in path.split("."):
        if node is None:
            return default
        try:
            node = node[part] if isinstance(node, Mapping) or hasattr(node, "__getitem__") else getattr(node, part)
        except Exception as e:  # omegaconf MissingMandatoryValue / InterpolationResolutionError / KeyError
            if type(e).__name__ == "MissingMandatoryValue":
                raise ConfigError(f"{path} is not set (???); set it on the command line, e.g. {path}=...") from e
            if isinstance(e, (KeyError, AttributeError, IndexError, TypeError)):
                return default
            raise ConfigError(f"{path}: {e}") from e
    return default if node is None else node


def is_missing(cfg, path: str) -> bool:
    """True when the key holds ??? (a mandatory value nobody set)."""
    try:
        get(cfg, path)
    except ConfigError as e:
        return "is not set (???)" in str(e)
    return False


def integer(cfg, path: str, minimum=None, default=None) -> int:
    v = get(cfg, path, default)
    if isinstance(v, bool) or not isinstance(v, int):
        raise ConfigError(f"{path}={v!r} must be an integer")
    if minimum is not None and v < minimum:
        raise ConfigError(f"{path}={v} must be >= {minimum}")
    return v


def number(cfg, path: str, lo=None, hi=None, lo_open: bool = False, default=None) -> float:
    v = get(cfg, path, default)
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise ConfigError(f"{path}={v!r} must be a number")
    if lo is not None and (v < lo or (lo_open and v == lo)):
        raise ConfigError(f"{path}={v} must be {'>' if lo_open else '>='} {lo}")
    if hi is not None and v > hi:
        raise ConfigError(f"{path}={v} must be <= {hi}")
    return float(v)


def choice(cfg, path: str, choices, hint: str = "", default=None):
    v = get(cfg, path, default)
    if v not in choices:
        raise ConfigError(f"{path}={v!r} is unknown; use one of {list(choices)}{hint}")
    return v


def flag(cfg, path: str, default: bool = False) -> bool:
    v = get(cfg, path, default)
    if not isinstance(v, bool):
        raise ConfigError(f"{path}={v!r} must be true or false")
    return v


def container(x) -> dict:
    """A plain dict of a config node, {} for None. Resolved, except where an interpolation needs a Hydra
    run that does not exist (``${run_dir}`` composed outside an app): those stay unresolved strings."""
    if x is None:
        return {}
    from omegaconf import OmegaConf
    from omegaconf.errors import InterpolationResolutionError

    if not OmegaConf.is_config(x):
        return dict(x)
    try:
        return OmegaConf.to_container(x, resolve=True)
    except InterpolationResolutionError:
        return OmegaConf.to_container(x, resolve=False)

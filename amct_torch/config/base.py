"""Typed configs: frozen dataclasses, validated on construction, round-tripping through dict/JSON/YAML.

Every technique has one config class deriving from :class:`Config`. Field types are checked from the
annotations (``int``, ``float``, ``bool``, ``str``, ``Literal[...]``, ``Optional``, ``tuple[X, ...]``,
nested configs and :mod:`~amct_torch.config.granularity` value objects); range checks live in the
subclass's ``validate``. Every error is a :class:`ConfigError` naming the key, the bad value and what
is allowed::

    >>> from amct_torch.config import QuantConfig
    >>> QuantConfig(weight_bits=9)
    Traceback (most recent call last):
    ...
    amct_torch.config.base.ConfigError: QuantConfig.weight_bits: got 9; allowed: one of 4, 6, 7, 8, 16
"""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from pathlib import Path
from typing import Any, Literal, TypeVar, Union, get_args, get_origin

import yaml

from .granularity import Granularity, parse_granularity

__all__ = ["Config", "ConfigError", "allowed", "check_range"]

C = TypeVar("C", bound="Config")


class ConfigError(ValueError):
    """A config key holds a value that is not allowed. The message names key, value and what is allowed."""

    def __init__(self, key: str, value: Any, allowed: str):
        self.key, self.value, self.allowed = key, value, allowed
        super().__init__(f"{key}: got {value!r}; allowed: {allowed}")

    def __reduce__(self):  # picklable, so errors cross process boundaries (DataLoader workers, DDP)
        return (type(self), (self.key, self.value, self.allowed))


def allowed(owner: str, key: str, value: Any, choices: typing.Iterable[Any]) -> None:
    """Raise :class:`ConfigError` unless ``value`` is one of ``choices``."""
    choices = tuple(choices)
    if value not in choices:
        raise ConfigError(f"{owner}.{key}", value, "one of " + ", ".join(repr(c) if isinstance(c, str) else str(c) for c in choices))


def check_range(owner: str, key: str, value: float, lo: float | None = None, hi: float | None = None,
                *, lo_open: bool = False, hi_open: bool = False) -> None:
    """Raise :class:`ConfigError` unless ``lo <= value <= hi`` (open ends where asked)."""
    bad = (lo is not None and (value <= lo if lo_open else value < lo)) or (
        hi is not None and (value >= hi if hi_open else value > hi))
    if bad:
        left = "" if lo is None else f"{lo:g} {'<' if lo_open else '<='} "
        right = "" if hi is None else f" {'<' if hi_open else '<='} {hi:g}"
        raise ConfigError(f"{owner}.{key}", value, f"{left}{key}{right}")


def _type_name(tp: Any) -> str:
    if tp is type(None):
        return "None"
    origin = get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in get_args(tp))
    if origin in (Union, types.UnionType):
        return " or ".join(_type_name(a) for a in get_args(tp))
    if origin is tuple:
        args = get_args(tp)
        return f"a list of {_type_name(args[0])}" if len(args) == 2 and args[1] is Ellipsis else "a tuple"
    if isinstance(tp, type) and issubclass(tp, Granularity):
        return "a granularity (per_tensor, per_channel, per_token, {'per_group': N})"
    return getattr(tp, "__name__", str(tp))


class _Mismatch(Exception):
    pass


def _coerce(tp: Any, value: Any, key: str) -> Any:
    """Return ``value`` as type ``tp`` (lists become tuples, dicts nested configs) or raise _Mismatch."""
    if tp is Any:
        return value
    origin = get_origin(tp)
    if origin is Literal:
        if value in get_args(tp):
            return value
        raise _Mismatch
    if origin in (Union, types.UnionType):
        for arg in get_args(tp):
            try:
                return _coerce(arg, value, key)
            except (_Mismatch, ConfigError):
                continue
        raise _Mismatch
    if tp is type(None):
        if value is None:
            return None
        raise _Mismatch
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise _Mismatch
        args = get_args(tp)
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(args[0], v, key) for v in value)
        if len(args) != len(value):
            raise _Mismatch
        return tuple(_coerce(a, v, key) for a, v in zip(args, value))
    if origin in (dict, typing.Mapping) or tp is dict:
        if not isinstance(value, dict):
            raise _Mismatch
        return dict(value)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise _Mismatch
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise _Mismatch
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise _Mismatch
    if tp is str:
        if isinstance(value, str):
            return value
        raise _Mismatch
    if isinstance(tp, type) and issubclass(tp, Granularity):
        try:
            return parse_granularity(value)
        except ValueError as err:
            raise ConfigError(key, value, str(err).split("allowed: ", 1)[-1]) from None
    if isinstance(tp, type) and issubclass(tp, Config):
        if isinstance(value, tp):
            return value
        if isinstance(value, dict):
            return tp.from_dict(value, _prefix=key)
        raise _Mismatch
    if isinstance(tp, type):
        if isinstance(value, tp):
            return value
        raise _Mismatch
    return value


def _plain(value: Any) -> Any:
    """Turn config values into plain JSON/YAML data."""
    if isinstance(value, Config):
        return value.to_dict()
    if isinstance(value, Granularity):
        return value.to_plain()
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


@dataclasses.dataclass(frozen=True)
class Config:
    """Base of every technique config: type-checked fields, ``validate`` hook, dict/JSON/YAML round trips."""

    def __post_init__(self) -> None:
        hints = typing.get_type_hints(type(self))
        name = type(self).__name__
        for f in dataclasses.fields(self):
            if not f.init:
                continue
            value = getattr(self, f.name)
            try:
                coerced = _coerce(hints[f.name], value, f"{name}.{f.name}")
            except _Mismatch:
                raise ConfigError(f"{name}.{f.name}", value, _type_name(hints[f.name])) from None
            if coerced is not value:
                object.__setattr__(self, f.name, coerced)
        self.validate()

    def validate(self) -> None:
        """Check ranges and combinations; raise :class:`ConfigError`. Subclasses override."""

    # -- serialisation -------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """Plain nested dict (JSON/YAML-ready) of every field."""
        return {f.name: _plain(getattr(self, f.name)) for f in dataclasses.fields(self) if f.init}

    @classmethod
    def from_dict(cls: type[C], data: dict[str, Any], *, _prefix: str | None = None) -> C:
        """Build from a dict; an unknown key is an error that lists the known keys."""
        where = _prefix or cls.__name__
        if not isinstance(data, dict):
            raise ConfigError(where, data, f"a mapping of {cls.__name__} keys")
        known = {f.name for f in dataclasses.fields(cls) if f.init}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"{where}.{unknown[0]}", data[unknown[0]],
                              f"no such key; known keys: {', '.join(sorted(known))}")
        return cls(**data)

    def replace(self: C, **changes: Any) -> C:
        """A copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)

    def to_json(self, path: str | Path | None = None, *, indent: int = 2) -> str:
        text = json.dumps(self.to_dict(), indent=indent)
        if path is not None:
            _write_text(Path(path), text + "\n")
        return text

    @classmethod
    def from_json(cls: type[C], text_or_path: str | Path) -> C:
        text = _read_text_or_path(text_or_path)
        try:
            data = json.loads(text)
        except json.JSONDecodeError as err:
            raise ConfigError(cls.__name__, f"line {err.lineno}, column {err.colno}", f"valid JSON ({err.msg})") from None
        return cls.from_dict(data)

    def to_yaml(self, path: str | Path | None = None) -> str:
        text = yaml.safe_dump(self.to_dict(), sort_keys=False)
        if path is not None:
            _write_text(Path(path), text)
        return text

    @classmethod
    def from_yaml(cls: type[C], text_or_path: str | Path) -> C:
        text = _read_text_or_path(text_or_path)
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as err:
            mark = getattr(err, "problem_mark", None)
            where = f"line {mark.line + 1}, column {mark.column + 1}" if mark else "the document"
            raise ConfigError(cls.__name__, where, f"valid YAML ({getattr(err, 'problem', err)})") from None
        return cls.from_dict(data or {})


def _read_text_or_path(text_or_path: str | Path) -> str:
    if isinstance(text_or_path, Path):
        return text_or_path.read_text()
    stripped = text_or_path.lstrip()
    if "\n" not in text_or_path and stripped[:1] not in ("{", "[") and len(text_or_path) < 4096:
        p = Path(text_or_path)
        try:
            if p.suffix in {".json", ".yaml", ".yml"} or p.is_file():
                return p.read_text()
        except OSError:  # not a usable path (e.g. too long): it is the text itself
            pass
    return text_or_path


def _write_text(path: Path, text: str) -> None:
    """Write atomically: a half-written config never replaces a good one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    tmp.replace(path)

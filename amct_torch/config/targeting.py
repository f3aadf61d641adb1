"""Targeting: which config each layer gets, resolved ``global -> module type -> module name``.

The most specific entry wins: an exact module name beats a name pattern, a pattern beats a module
type, a type beats the global default. Among several matching patterns the one listed last wins; among
types, the closest class in the module's MRO. ``None`` as a value means "leave this layer alone", and
``skip`` lists names or patterns that are always left alone.

Names are module paths (``layer1.0.conv1``). A pattern is a glob (``layer1.*.conv?``) or a regular
expression prefixed with ``re:`` (``re:.*\\.(q|k|v)_proj``). Types are given as classes or as names
(``"Conv2d"`` or ``"torch.nn.Conv2d"``)::

    t = Targeting(QuantConfig(),
                  module_type={"Linear": QuantConfig(weight_bits=4)},
                  module_name={"fc": None, "layer1.*": QuantConfig(activation_offset=False)})
    t.resolve("fc", model.fc)          # Resolution(config=None, source="module_name['fc']")
"""

from __future__ import annotations

import fnmatch
import re
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, Generic, Iterable, Mapping, TypeVar

import torch.nn as nn
import yaml

from .base import Config, ConfigError

__all__ = ["Targeting", "Resolution"]

C = TypeVar("C", bound=Config)


@dataclass(frozen=True)
class Resolution(Generic[C]):
    """The config a layer resolved to (``None``: left alone) and the entry that decided it."""

    config: C | None
    source: str


def _type_key(key: Any) -> str:
    if isinstance(key, type):
        return key.__name__
    if isinstance(key, str) and key:
        return key.rsplit(".", 1)[-1]
    raise ConfigError("Targeting.module_type", key, "a module class or its name, e.g. 'Conv2d'")


def _check_pattern(where: str, key: Any) -> None:
    if not isinstance(key, str) or not key:
        raise ConfigError(f"Targeting.{where}", key, "a module path, glob or 're:' regex")
    if key.startswith("re:"):
        try:
            re.compile(key[3:])
        except re.error as err:
            raise ConfigError(f"Targeting.{where}[{key!r}]", key, f"a valid regular expression ({err})") from None


def _is_pattern(key: str) -> bool:
    return key.startswith("re:") or any(ch in key for ch in "*?[")


def _matches(pattern: str, name: str) -> bool:
    if pattern.startswith("re:"):
        return re.fullmatch(pattern[3:], name) is not None
    return fnmatch.fnmatchcase(name, pattern)


class Targeting(Generic[C]):
    """Per-layer config resolution with global, per-type and per-name entries and a skip list."""

    def __init__(self, default: C | None = None, *, module_type: Mapping[Any, C | None] | None = None,
                 module_name: Mapping[str, C | None] | None = None, skip: Iterable[str] = ()):
        types_ = {}
        for key, cfg in (module_type or {}).items():
            types_[_type_key(key)] = self._check(f"module_type[{key!r}]", cfg)
        names = {}
        for key, cfg in (module_name or {}).items():
            _check_pattern("module_name", key)
            names[key] = self._check(f"module_name[{key!r}]", cfg)
        if isinstance(skip, str):
            raise ConfigError("Targeting.skip", skip, "a list of module names or patterns, not one string")
        for key in skip:
            _check_pattern("skip", key)
        self.default: C | None = self._check("default", default)
        self.module_type: Mapping[str, C | None] = MappingProxyType(types_)
        self.module_name: Mapping[str, C | None] = MappingProxyType(names)
        self.skip: tuple[str, ...] = tuple(skip)
        kinds = {type(c) for c in [self.default, *types_.values(), *names.values()] if c is not None}
        if len(kinds) > 1:
            raise ConfigError("Targeting", sorted(k.__name__ for k in kinds), "configs of one class")

    @staticmethod
    def _check(where: str, cfg: Any) -> Any:
        if cfg is not None and not isinstance(cfg, Config):
            raise ConfigError(f"Targeting.{where}", cfg, "a Config object or None (leave the layer alone)")
        return cfg

    # -- resolution ----------------------------------------------------------------------------
    def resolve(self, name: str, module: nn.Module) -> Resolution[C]:
        """The config for the layer at module path ``name``, and which entry decided it."""
        for pattern in self.skip:
            if pattern == name or _matches(pattern, name):
                return Resolution(None, f"skip[{pattern!r}]")
        if name in self.module_name:
            return Resolution(self.module_name[name], f"module_name[{name!r}]")
        hit = None
        for key, cfg in self.module_name.items():
            if _is_pattern(key) and _matches(key, name):
                hit = Resolution(cfg, f"module_name[{key!r}]")
        if hit is not None:
            return hit
        for klass in type(module).__mro__:
            if klass.__name__ in self.module_type:
                return Resolution(self.module_type[klass.__name__], f"module_type[{klass.__name__!r}]")
        return Resolution(self.default, "global")

    def unused_entries(self, names: Iterable[str], modules: Iterable[nn.Module]) -> list[str]:
        """Entries that matched no layer: usually a typo the user wants to hear about."""
        names = list(names)
        mros = {k.__name__ for m in modules for k in type(m).__mro__}
        out = [f"module_name[{k!r}]" for k in self.module_name
               if not any(k == n or (_is_pattern(k) and _matches(k, n)) for n in names)]
        out += [f"module_type[{k!r}]" for k in self.module_type if k not in mros]
        out += [f"skip[{k!r}]" for k in self.skip if not any(k == n or _matches(k, n) for n in names)]
        return out

    # -- serialisation -------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        dump = lambda c: None if c is None else c.to_dict()  # noqa: E731
        return {"global": dump(self.default),
                "module_type": {k: dump(v) for k, v in self.module_type.items()},
                "module_name": {k: dump(v) for k, v in self.module_name.items()},
                "skip": list(self.skip)}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], config_cls: type[C]) -> "Targeting[C]":
        known = {"global", "module_type", "module_name", "skip"}
        if not isinstance(data, Mapping):
            raise ConfigError("Targeting", data, "a mapping with keys " + ", ".join(sorted(known)))
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"Targeting.{unknown[0]}", data[unknown[0]], "no such key; known keys: " + ", ".join(sorted(known)))

        def load(where: str, value: Any) -> C | None:
            if value is None:
                return None
            return config_cls.from_dict(value, _prefix=f"Targeting.{where}")

        return cls(load("global", data.get("global")),
                   module_type={k: load(f"module_type[{k!r}]", v) for k, v in (data.get("module_type") or {}).items()},
                   module_name={k: load(f"module_name[{k!r}]", v) for k, v in (data.get("module_name") or {}).items()},
                   skip=data.get("skip") or ())

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    @classmethod
    def from_yaml(cls, text: str, config_cls: type[C]) -> "Targeting[C]":
        return cls.from_dict(yaml.safe_load(text) or {}, config_cls)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Targeting) and self.to_dict() == other.to_dict()

    def __repr__(self) -> str:
        parts = [f"global={self.default!r}"]
        if self.module_type:
            parts.append(f"module_type={dict(self.module_type)!r}")
        if self.module_name:
            parts.append(f"module_name={dict(self.module_name)!r}")
        if self.skip:
            parts.append(f"skip={list(self.skip)!r}")
        return f"Targeting({', '.join(parts)})"

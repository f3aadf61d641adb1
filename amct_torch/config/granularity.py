"""Granularity value objects: which elements of a tensor share one scale.

``PerTensor()`` one scale; ``PerChannel(axis)`` one per slice along ``axis`` (for weights, the output
channel axis, which the wrapper knows); ``PerToken()`` one per row of an activation (last dim reduced);
``PerGroup(group_size)`` one per ``group_size`` consecutive input elements of each output channel.

Strings are sugar: ``"per_tensor"``, ``"per_channel"``, ``"per_token"``, and ``{"per_group": 32}``.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any

__all__ = ["Granularity", "PerTensor", "PerChannel", "PerToken", "PerGroup", "parse_granularity"]


class Granularity(ABC):
    """Base of the granularity value objects."""

    @abstractmethod
    def to_plain(self) -> Any:
        """The plain (JSON/YAML) spelling of this granularity."""


@dataclass(frozen=True)
class PerTensor(Granularity):
    def to_plain(self) -> str:
        return "per_tensor"


@dataclass(frozen=True)
class PerChannel(Granularity):
    """One scale per channel. ``axis=None`` means the layer's own output-channel axis."""

    axis: int | None = None

    def to_plain(self) -> Any:
        return "per_channel" if self.axis is None else {"per_channel": self.axis}


@dataclass(frozen=True)
class PerToken(Granularity):
    def to_plain(self) -> str:
        return "per_token"


@dataclass(frozen=True)
class PerGroup(Granularity):
    group_size: int = 32

    def __post_init__(self) -> None:
        if not isinstance(self.group_size, int) or isinstance(self.group_size, bool) or self.group_size <= 0 \
                or self.group_size % 32:
            raise ValueError(f"PerGroup.group_size: got {self.group_size!r}; allowed: a positive multiple of 32")

    def to_plain(self) -> dict[str, int]:
        return {"per_group": self.group_size}


_NAMES = {"per_tensor": PerTensor, "per_channel": PerChannel, "per_token": PerToken}


def parse_granularity(value: Any) -> Granularity:
    """Accept a Granularity, a name, or a one-key mapping; reject classes with a hint to instantiate."""
    if isinstance(value, Granularity):
        return value
    if isinstance(value, type) and issubclass(value, Granularity):
        raise ValueError(f"give a granularity object, not the class: {value.__name__}() instead of {value.__name__}")
    if isinstance(value, str) and value in _NAMES:
        return _NAMES[value]()
    if isinstance(value, dict) and len(value) == 1:
        (key, arg), = value.items()
        if key == "per_group":
            return PerGroup(arg)
        if key == "per_channel" and (arg is None or isinstance(arg, int)):
            return PerChannel(arg)
    raise ValueError(f"not a granularity: {value!r}; allowed: per_tensor, per_channel, per_token, "
                     "{'per_channel': AXIS}, {'per_group': N}")

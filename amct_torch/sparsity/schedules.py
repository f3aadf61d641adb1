"""Sparsity schedules: the target sparsity at a step (or epoch) ``t``.

Zero before ``start``. From ``start`` on, the value is held between update points
``t_k = start + k * frequency`` (and ``end``), and reaches the final sparsity ``s_f`` at ``end``::

    p   = (t_k - start) / (end - start)            # progress at the last update point
    oneshot: s = s_f                                # from start on
    linear:  s = s_i + (s_f - s_i) * p
    agp:     s = s_f + (s_i - s_f) * (1 - p) ** 3   # Zhu & Gupta 2017, n * dt = end - start

    >>> s = Schedule("agp", final=0.8, start=0, end=1000, frequency=100)
    >>> round(s(500), 4)       # 0.8 - 0.8 * 0.5 ** 3
    0.7
    >>> s(550) == s(500)       # held until the next update point
    True

Iterative pruning (lottery ticket: prune, train, rewind, repeat) raises the sparsity geometrically, each
round pruning the same fraction of what is left: :func:`iterative_sparsities`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

__all__ = ["Schedule", "SCHEDULES", "iterative_sparsities"]

#: progress ``p`` in [0, 1] -> fraction of the way from ``initial`` to ``final``
SCHEDULES: dict[str, Callable[[float], float]] = {
    "oneshot": lambda p: 1.0,
    "linear": lambda p: p,
    "agp": lambda p: 1.0 - (1.0 - p) ** 3,
}


@dataclass(frozen=True)
class Schedule:
    """A sparsity ramp: ``schedule(t)`` is the target sparsity at position ``t`` (a step or an epoch)."""

    kind: str
    final: float
    initial: float = 0.0
    start: int = 0
    end: int = 0
    frequency: int = 1

    def __post_init__(self) -> None:
        if self.kind not in SCHEDULES:
            raise ValueError(f"Schedule.kind: got {self.kind!r}; allowed: one of {', '.join(map(repr, SCHEDULES))}")
        if not 0.0 <= self.initial <= self.final < 1.0:
            raise ValueError(f"Schedule: got initial={self.initial}, final={self.final}; "
                             "allowed: 0 <= initial <= final < 1")
        if self.kind != "oneshot" and self.end <= self.start:
            raise ValueError(f"Schedule.end: got {self.end}; allowed: end > start ({self.start})")
        if self.frequency < 1:
            raise ValueError(f"Schedule.frequency: got {self.frequency}; allowed: >= 1")

    @classmethod
    def from_config(cls, config) -> "Schedule":
        """The schedule of a :class:`~amct_torch.config.MagnitudeConfig`."""
        return cls(config.schedule, config.sparsity, config.initial_sparsity, config.start, config.end, config.frequency)

    def update_point(self, t: int) -> int | None:
        """The last point ``<= t`` at which masks are recomputed; ``None`` before ``start``."""
        if t < self.start:
            return None
        if self.kind == "oneshot":
            return self.start
        if t >= self.end:
            return self.end
        return self.start + (t - self.start) // self.frequency * self.frequency

    def __call__(self, t: int) -> float:
        tk = self.update_point(t)
        if tk is None:
            return 0.0
        if self.kind == "oneshot":
            return self.final
        p = (tk - self.start) / (self.end - self.start)
        return self.initial + (self.final - self.initial) * SCHEDULES[self.kind](p)


def iterative_sparsities(final: float, rounds: int) -> tuple[float, ...]:
    """Sparsity after each of ``rounds`` prune-train-rewind rounds, pruning the same fraction of the
    remaining weights every round: ``s_r = 1 - (1 - final) ** (r / rounds)``.

    >>> [round(s, 3) for s in iterative_sparsities(0.75, 2)]
    [0.5, 0.75]
    """
    if not 0.0 <= final < 1.0:
        raise ValueError(f"iterative_sparsities(final=...): got {final!r}; allowed: 0 <= final < 1")
    if rounds < 1:
        raise ValueError(f"iterative_sparsities(rounds=...): got {rounds!r}; allowed: >= 1")
    return tuple(1.0 - (1.0 - final) ** (r / rounds) for r in range(1, rounds + 1))

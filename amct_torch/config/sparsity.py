"""Sparsity configs of one layer: unstructured magnitude pruning with a schedule, and N:M structured sparsity.

    >>> MagnitudeConfig(sparsity=0.8, schedule="agp", start=0, end=1000, frequency=100).short()
    'magnitude 0.8 agp steps 0..1000 every 100'
    >>> NMConfig().short()     # AMCT's M4N2 (4:2 selective prune), mask fixed after the first batch
    '2:4 L1 along input channels, update_freq=0'
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from .base import Config, ConfigError, check_range

__all__ = ["MagnitudeConfig", "NMConfig"]


@dataclass(frozen=True)
class MagnitudeConfig(Config):
    """Unstructured magnitude (level) pruning: the smallest ``|w|`` of a layer (or of all layers) go first.

    The target sparsity follows a schedule over steps or epochs (see :mod:`amct_torch.sparsity.schedules`):
    zero before ``start``; from ``start`` on, the value at the last update point ``start + k * frequency``
    (and ``end``):

    * ``oneshot``: ``sparsity`` from ``start`` on;
    * ``linear``: ``s_i + (s_f - s_i) * p``, ``p = (t - start) / (end - start)``;
    * ``agp`` (Zhu & Gupta 2017): ``s_f + (s_i - s_f) * (1 - p) ** 3``.

    Args:
        sparsity: the final fraction of weights set to zero, in [0, 1).
        schedule: ``agp`` (default), ``linear`` or ``oneshot``.
        start, end: first and last point of the ramp (``end > start``; ``oneshot`` reads only ``start``).
        frequency: masks are recomputed every ``frequency`` steps (or epochs) of the ramp.
        unit: ``step`` (the scheduler's ``step()``) or ``epoch`` (its ``on_epoch(epoch)``).
        initial_sparsity: the sparsity at ``start`` (``linear``/``agp``), in [0, sparsity].
        scope: ``layer`` ranks each layer's weights alone; ``global`` ranks the weights of all layers that
            share this config together (one threshold, so layers end up with different sparsities).
        rewind: lottery-ticket rewinding: the position (in ``unit``) whose weights
            ``MagnitudeScheduler.rewind()`` restores, keeping the masks; ``0`` = the weights at prepare;
            ``None`` (default) records nothing.
    """

    sparsity: float = 0.5
    schedule: Literal["agp", "linear", "oneshot"] = "agp"
    start: int = 0
    end: int = 1000
    frequency: int = 100
    unit: Literal["step", "epoch"] = "step"
    initial_sparsity: float = 0.0
    scope: Literal["layer", "global"] = "layer"
    rewind: int | None = None

    def validate(self) -> None:
        name = type(self).__name__
        check_range(name, "sparsity", self.sparsity, 0.0, 1.0, hi_open=True)
        check_range(name, "start", self.start, 0)
        check_range(name, "frequency", self.frequency, 1)
        if self.schedule == "oneshot":
            if self.initial_sparsity != 0.0:
                raise ConfigError(f"{name}.initial_sparsity", self.initial_sparsity,
                                  "0.0 with schedule='oneshot' (it jumps to sparsity at start)")
        else:
            if self.end <= self.start:
                raise ConfigError(f"{name}.end", self.end, f"end > start ({self.start}) with schedule={self.schedule!r}")
            check_range(name, "initial_sparsity", self.initial_sparsity, 0.0, self.sparsity)
        if self.rewind is not None:
            check_range(name, "rewind", self.rewind, 0)

    def short(self) -> str:
        where = (f"at {self.unit} {self.start}" if self.schedule == "oneshot"
                 else f"{self.unit}s {self.start}..{self.end} every {self.frequency}")
        extra = (" global" if self.scope == "global" else "") + ("" if self.rewind is None else f" rewind@{self.rewind}")
        return f"magnitude {self.sparsity:g} {self.schedule} {where}{extra}"


@dataclass(frozen=True)
class NMConfig(Config):
    """N:M structured sparsity: in every group of ``m`` consecutive input-channel weights, the ``n`` largest
    ``|w|`` are kept (AMCT's L1 selective prune ``M4N2`` by default: 2:4).

    Args:
        n, m: keep ``n`` of every ``m`` (``1 <= n < m``).
        update_freq: ``0`` (AMCT default): the mask is computed at prepare and fixed after the first
            training batch; ``k``: recomputed from the current dense weights every ``k`` training batches.
        ste: train the mask with a straight-through estimator (SR-STE, Zhou et al. 2021): pruned weights
            keep receiving the gradient, plus ``decay * w``, so a recomputed mask can change its mind.
        decay: SR-STE's pull of pruned weights towards zero (``>= 0``).
    """

    n: int = 2
    m: int = 4
    update_freq: int = 0
    ste: bool = False
    decay: float = 2e-4

    def validate(self) -> None:
        name = type(self).__name__
        check_range(name, "m", self.m, 2)
        if not 1 <= self.n < self.m:
            raise ConfigError(f"{name}.n", self.n, f"1 <= n < m ({self.m})")
        check_range(name, "update_freq", self.update_freq, 0)
        check_range(name, "decay", self.decay, 0.0)

    def short(self) -> str:
        return f"{self.n}:{self.m} L1 along input channels, update_freq={self.update_freq}" + (
            f", SR-STE decay={self.decay:g}" if self.ste else "")

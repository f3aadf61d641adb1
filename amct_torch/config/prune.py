"""Channel-pruning config (AMCT's ``filter_pruner`` / ``balanced_l2_norm_filter_prune``, typed).

    >>> ChannelPruneConfig(ratio=0.3, criterion="l2", ascend_optimized=True).short()
    'channel prune 0.3 l2 (x16)'
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from .base import Config, check_range

__all__ = ["ChannelPruneConfig"]

Criterion = Literal["l1", "l2", "fpgm", "bn_slim", "taylor", "apoz", "mean_activation"]


@dataclass(frozen=True)
class ChannelPruneConfig(Config):
    """How many output channels of each dependency group go, and which.

    Args:
        ratio: fraction of each group's channels pruned, in [0, 1) (AMCT ``prune_ratio``).
        criterion: ``l1``, ``l2`` (AMCT's balanced L2), ``fpgm``, ``bn_slim``, or from data ``taylor``,
            ``apoz``, ``mean_activation``.
        ascend_optimized: round the kept channels up to a multiple of ``round_to`` (AMCT: 16), the widths
            Ascend (and most CPU kernels) run fastest.
        round_to: the multiple for ``ascend_optimized``.
        min_channels: never keep fewer channels in a group.
    """

    ratio: float = 0.5
    criterion: Criterion = "l1"
    ascend_optimized: bool = False
    round_to: int = 16
    min_channels: int = 1

    def validate(self) -> None:
        name = type(self).__name__
        check_range(name, "ratio", self.ratio, 0.0, 1.0, hi_open=True)
        check_range(name, "round_to", self.round_to, 1)
        check_range(name, "min_channels", self.min_channels, 1)

    def short(self) -> str:
        return f"channel prune {self.ratio:g} {self.criterion}{f' (x{self.round_to})' if self.ascend_optimized else ''}"

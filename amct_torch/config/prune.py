"""Channel-pruning configs: AMCT's ``filter_pruner`` / ``balanced_l2_norm_filter_prune`` and its automatic
channel-prune search (``AutoChannelPruneConfig``), typed.

    >>> ChannelPruneConfig(ratio=0.3, criterion="l2", ascend_optimized=True).short()
    'channel prune 0.3 l2 (x16)'
    >>> ChannelSearchConfig(flops_target=0.6).short()
    'channel search to 0.6 of the MACs'
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from .base import Config, check_range

__all__ = ["ChannelPruneConfig", "ChannelSearchConfig"]

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


@dataclass(frozen=True)
class ChannelSearchConfig(Config):
    """How many channels each dependency group keeps, searched under a MACs budget (AMCT's
    ``auto_channel_prune_search``; see :func:`amct_torch.sparsity.search.search_channel_pruning`).

    Args:
        flops_target: the pruned model's MACs as a fraction of the dense model's, in (0, 1) (AMCT's
            ``compress_ratio`` r is ``flops_target = 1 / r``).
        ascend_optimized: groups keep a multiple of ``round_to`` channels (or all of them).
        round_to: the multiple for ``ascend_optimized`` (AMCT: 16).
        max_prune_ratio: no group loses more than this fraction of its channels, in (0, 1].
        min_channels: no group keeps fewer channels.
        num_batches: batches of data the Taylor sensitivity averages (AMCT's ``test_iteration``).
    """

    flops_target: float = 0.5
    ascend_optimized: bool = False
    round_to: int = 16
    max_prune_ratio: float = 1.0
    min_channels: int = 1
    num_batches: int = 4

    def validate(self) -> None:
        name = type(self).__name__
        check_range(name, "flops_target", self.flops_target, 0.0, 1.0, lo_open=True, hi_open=True)
        check_range(name, "round_to", self.round_to, 1)
        check_range(name, "max_prune_ratio", self.max_prune_ratio, 0.0, 1.0, lo_open=True)
        check_range(name, "min_channels", self.min_channels, 1)
        check_range(name, "num_batches", self.num_batches, 1)

    def short(self) -> str:
        return f"channel search to {self.flops_target:g} of the MACs{f' (x{self.round_to})' if self.ascend_optimized else ''}"

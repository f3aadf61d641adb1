"""Sparsity and pruning: masks (a weight-pipeline stage), magnitude and N:M pruning with schedules,
channel pruning with dependency groups, and shrinking a masked model into a smaller one."""

from ..graph.groups import ChannelGroup, GroupAnalysis, channel_groups
from ..graph.shrink import ShrinkError, ShrinkRecord, apply_shrink_record, shrink
from .channel import ChannelPrunePlan, prune_channels
from .criteria import CRITERIA, add_bn_slim_grad, bn_slim_penalty
from .masks import MaskStage, mask_stage, masked_layers, sparsity_of

__all__ = ["MaskStage", "mask_stage", "masked_layers", "sparsity_of", "prune_channels", "ChannelPrunePlan",
           "CRITERIA", "bn_slim_penalty", "add_bn_slim_grad", "channel_groups", "ChannelGroup", "GroupAnalysis",
           "shrink", "ShrinkRecord", "apply_shrink_record", "ShrinkError"]

from .magnitude import MagnitudeScheduler, global_magnitude_masks, magnitude_layers, magnitude_mask, prune_magnitude
from .nm import NMMaskStage, SemiStructuredReport, apply_nm, input_channel_axis, nm_layers, nm_mask, to_semi_structured
from .schedules import SCHEDULES, Schedule, iterative_sparsities

__all__ += ["MagnitudeScheduler", "global_magnitude_masks", "magnitude_layers", "magnitude_mask", "prune_magnitude",
            "NMMaskStage", "SemiStructuredReport", "apply_nm", "input_channel_axis", "nm_layers", "nm_mask",
            "to_semi_structured", "SCHEDULES", "Schedule", "iterative_sparsities"]

from .search import (ChannelSearchPlan, ChannelSearchRecord, SearchGraphInfo, greedy_search, search_channel_pruning,
                     search_space, taylor_sensitivity)

__all__ += ["search_channel_pruning", "ChannelSearchPlan", "ChannelSearchRecord", "SearchGraphInfo", "search_space",
            "taylor_sensitivity", "greedy_search"]

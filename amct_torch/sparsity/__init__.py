"""Sparsity and pruning: masks (a weight-pipeline stage), magnitude and N:M pruning with schedules,
channel pruning with dependency groups, and shrinking a masked model into a smaller one."""

from .masks import MaskStage, mask_stage, masked_layers, sparsity_of

__all__ = ["MaskStage", "mask_stage", "masked_layers", "sparsity_of"]

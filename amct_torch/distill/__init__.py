"""Block-wise (layer-wise) distillation: a compressed student learns, block by block, to reproduce its
float teacher's block outputs.

    blocks = find_blocks(student, x)                          # residual / transformer blocks, layer groups
    report = distill_blockwise(teacher, student, loader)      # trains the student in place, block by block
    print(report)

    loss_fn = BlockwiseLoss(teacher, student, blocks)          # the per-block loss of one batch, to add to a
    loss = task_loss + loss_fn(x)                              # training loss (gradients reach the student)
"""

import sys
import types

from .blocks import Block, blocks_from_groups, blocks_table, find_blocks, merge_blocks
from .blockwise import BlockResult, DistillReport, distill_blockwise
from .loss import BlockwiseLoss, make_loss

__all__ = ["Block", "find_blocks", "blocks_from_groups", "merge_blocks", "blocks_table", "distill_blockwise",
           "DistillReport", "BlockResult", "BlockwiseLoss", "make_loss"]


class _CallableModule(types.ModuleType):
    """``amct_torch.distill`` is this package *and* AMCT's ``distill(model, compress_model, config_file,
    train_loader, ...)`` (:func:`amct_torch.compat.distill.distill`), so that ``amct.distill(...)`` in AMCT
    scripts runs while ``amct_torch.distill.distill_blockwise`` etc. stay reachable."""

    def __call__(self, *args, **kwargs):
        from ..compat.distill import distill   # compat builds on this package: imported on first call
        return distill(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule

"""Block-wise (layer-wise) distillation config: how a compressed student is trained, block by block, to
reproduce its float teacher's block outputs.

    >>> DistillConfig().short()
    'distill adamw lr 0.001, 1 epoch(s), mse, student inputs, group 1'
    >>> DistillConfig(block_input="teacher", loss="l1", group_size=2).short()
    'distill adamw lr 0.001, 1 epoch(s), l1, teacher inputs, group 2'
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from .base import Config, ConfigError, check_range

__all__ = ["DistillConfig"]


@dataclass(frozen=True)
class DistillConfig(Config):
    """What :func:`amct_torch.distill.distill_blockwise` does per block.

    Args:
        epochs: passes over the data per block (AMCT's ``epochs``, default 1).
        lr: learning rate (AMCT's default 1e-3).
        optimizer: ``adamw`` (AMCT's default), ``adam`` or ``sgd`` (with ``momentum``).
        momentum: SGD momentum (``sgd`` only).
        weight_decay: decoupled (AdamW) or L2 (Adam, SGD) decay of the *weights*; the quantization
            parameters (activation clips, learned scales) are never decayed. 0 by default: a block sees
            few steps on little data, and decay would only pull it away from its teacher.
        quant_lr: learning rate of the quantization parameters (``None``: ``lr``).
        loss: ``mse`` (AMCT's default), ``l1`` or ``smooth_l1`` between the student's and the teacher's
            block outputs; :func:`distill_blockwise` also takes any callable.
        block_input: what the student's block receives while it trains:

            * ``student`` (default): the output of the student's own, already distilled earlier blocks
              (BRECQ / QDrop style). The block learns to correct the error that accumulated before it,
              which is what the deployed network needs; it is also what AMCT does unless the student's
              input has drifted far from the teacher's.
            * ``teacher``: the teacher's (float) block input; every block learns in isolation.
            * ``auto``: AMCT's rule per batch: the student's input, unless its squared difference from
              the teacher's exceeds ``auto_threshold`` times the smaller of their mean squares; then the
              teacher's.
        auto_threshold: the ``auto`` rule's threshold (AMCT: 0.5).
        group_size: consecutive blocks merged into one distillation unit (AMCT's ``group_size``).
        max_batches_per_epoch: batches per epoch at most (``None``: the whole data).
        eval_batches: batches (the first ones of the data, taken once) on which every block's loss is
            measured before and after its training, for the report; 0 measures nothing.
        train_weights: train the block's weights, biases and batch-norm affine parameters.
        train_quant_params: train the block's learned quantization parameters (ULQ clips, LSQ scales).
        revert_worse: a unit whose loss on the evaluation batches is higher after training than before
            gets its parameters back (noted ``reverted`` in the report). Straight-through gradients of
            coarse quantizers (4-bit weights of a layer with few weights per channel, like a stem
            convolution) can point uphill; distillation then never leaves a block worse than it found it.
            Needs ``eval_batches`` >= 1.
        cache_teacher: AMCT's ``data_dump``, kept in memory: at the start of each block one pass over the
            data is stored together with the teacher's block inputs and outputs, and every epoch reuses it
            (the teacher runs once per block instead of once per epoch; the data is not reshuffled
            between epochs; memory grows with the data). ``False``: the teacher runs on the fly.
    """

    epochs: int = 1
    lr: float = 1e-3
    optimizer: Literal["adamw", "adam", "sgd"] = "adamw"
    momentum: float = 0.9
    weight_decay: float = 0.0
    quant_lr: float | None = None
    loss: Literal["mse", "l1", "smooth_l1"] = "mse"
    block_input: Literal["student", "teacher", "auto"] = "student"
    auto_threshold: float = 0.5
    group_size: int = 1
    max_batches_per_epoch: int | None = None
    eval_batches: int = 1
    train_weights: bool = True
    train_quant_params: bool = True
    revert_worse: bool = True
    cache_teacher: bool = False

    def validate(self) -> None:
        name = type(self).__name__
        check_range(name, "epochs", self.epochs, 1)
        check_range(name, "lr", self.lr, 0.0, lo_open=True)
        check_range(name, "momentum", self.momentum, 0.0, 1.0, hi_open=True)
        check_range(name, "weight_decay", self.weight_decay, 0.0)
        if self.quant_lr is not None:
            check_range(name, "quant_lr", self.quant_lr, 0.0, lo_open=True)
        check_range(name, "auto_threshold", self.auto_threshold, 0.0, lo_open=True)
        check_range(name, "group_size", self.group_size, 1)
        if self.max_batches_per_epoch is not None:
            check_range(name, "max_batches_per_epoch", self.max_batches_per_epoch, 1)
        check_range(name, "eval_batches", self.eval_batches, 0)
        if not (self.train_weights or self.train_quant_params):
            raise ConfigError(f"{name}.(train_weights, train_quant_params)", [False, False],
                              "at least one of them true (otherwise nothing trains)")

    def short(self) -> str:
        return (f"distill {self.optimizer} lr {self.lr:g}, {self.epochs} epoch(s), {self.loss}, "
                f"{self.block_input} inputs, group {self.group_size}")

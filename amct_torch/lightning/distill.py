"""``BlockwiseDistillation``: the block-wise distillation loss added to a fine-tuning run.

The callback schedules :class:`~amct_torch.distill.BlockwiseLoss`; it holds no algorithm.

* ``setup``: unless a teacher is given, a frozen copy of ``pl_module.<attr>`` is taken *before* the other
  compression callbacks change the network (``pipeline_rank`` 0: decomposition, pruning, clustering and QAT
  set up after it, whatever order the callbacks are listed in), so the teacher is the float model.
* At fit start the blocks are found on the compressed student (:func:`~amct_torch.distill.find_blocks`:
  residual and transformer blocks, conv-bn-activation groups) or taken from ``blocks`` (lists of module
  paths, AMCT's ``distill_group``), and hooks are placed on their boundaries.
* Every training step records the student's block outputs during the step's own forward, runs the teacher
  on the same batch, and returns ``loss + weight * distill_loss`` (``distill_loss`` is logged; so is each
  block's value with ``log_blocks``). Steps outside ``[start_epoch, stop_epoch)`` are left alone.
* The teacher is not part of the LightningModule (it is not in ``state_dict`` nor seen by the optimizer);
  the callback's checkpoint state holds the teacher's weights, so a resumed run distills against the same
  float model. At the end of fit the hooks are removed and ``training_step`` is restored.

The loss is added by wrapping the module's ``training_step`` (Lightning has no hook that may change the
loss); the wrapper is what the strategy calls under DDP and FSDP as well. With manual optimization (where
``training_step`` returns no loss) the callback refuses at fit start: add ``BlockwiseLoss`` yourself there.

Example (QAT fine-tune with the distillation loss)::

    callbacks = [QuantizationAwareTraining(QatConfig(weight_bits=4)), BlockwiseDistillation(weight=1.0)]
    L.Trainer(max_epochs=3, callbacks=callbacks).fit(task, datamodule)
"""

from __future__ import annotations

import copy
import functools
from typing import Any, Callable, Mapping, Optional, Sequence, Union

import lightning as L
import torch
import torch.nn as nn
from lightning.fabric.utilities.apply_func import move_data_to_device
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info

from ..config import ConfigError
from ..distill import BlockwiseLoss, find_blocks
from ..distill.blocks import blocks_from_groups
from ._common import device_of, example_inputs, first_input, metric_name, network

__all__ = ["BlockwiseDistillation"]

_STATE_VERSION = 1


def _check_epoch(name: str, value: Any, allow_none: bool) -> None:
    if value is None and allow_none:
        return
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise ConfigError(f"BlockwiseDistillation.{name}", value, "an int >= 0" + (" or None" if allow_none else ""))


class BlockwiseDistillation(Callback):
    """Add ``weight * block-wise distillation loss`` (student blocks vs. the float teacher's) to every
    training step of ``Trainer.fit``.

    Args:
        weight: the factor of the distillation loss in the training loss.
        loss: ``mse`` (default), ``l1``, ``smooth_l1`` or a callable (student output, teacher output).
        blocks: the blocks as lists of module paths (AMCT's ``distill_group``); default: found automatically.
        teacher: the float teacher (a module sharing the student's module paths); default: a frozen copy of
            ``pl_module.<attr>`` taken at setup, before any other compression callback changes it.
        attr: the LightningModule attribute holding the network.
        start_epoch / stop_epoch: the loss is added from ``start_epoch`` up to (not including) ``stop_epoch``
            (``None``: to the end).
        input_fn: ``batch -> model input`` (default: the batch's first element, or the batch).
        log_blocks: also log ``distill/<block>`` per step.
        example_inputs: inputs for finding the blocks (default: ``example_input_array``, else the first
            training sample).
    """

    pipeline_rank = 0

    def __init__(self, weight: float = 1.0, *, loss: Union[str, Callable[..., torch.Tensor]] = "mse",
                 blocks: Optional[Sequence[Sequence[str]]] = None, teacher: Optional[nn.Module] = None,
                 attr: str = "model", start_epoch: int = 0, stop_epoch: Optional[int] = None,
                 input_fn: Optional[Callable[[Any], Any]] = None, log_blocks: bool = False,
                 example_inputs: Any = None):
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not weight > 0:
            raise ConfigError("BlockwiseDistillation.weight", weight, "a number > 0")
        _check_epoch("start_epoch", start_epoch, False)
        _check_epoch("stop_epoch", stop_epoch, True)
        if stop_epoch is not None and stop_epoch <= start_epoch:
            raise ConfigError("BlockwiseDistillation.stop_epoch", stop_epoch, f"None or an int > start_epoch ({start_epoch})")
        if blocks is not None and (isinstance(blocks, str) or not blocks
                                   or not all(isinstance(g, Sequence) and not isinstance(g, str) and g for g in blocks)):
            raise ConfigError("BlockwiseDistillation.blocks", blocks, "a non-empty list of non-empty module-path lists")
        if teacher is not None and not isinstance(teacher, nn.Module):
            raise ConfigError("BlockwiseDistillation.teacher", type(teacher).__name__, "an nn.Module or None")
        self.weight, self.loss, self.attr = float(weight), loss, attr
        self.blocks = None if blocks is None else [list(g) for g in blocks]
        self.teacher = teacher
        self.start_epoch, self.stop_epoch = start_epoch, stop_epoch
        self.input_fn, self.log_blocks, self.example_inputs = input_fn, log_blocks, example_inputs
        self._loss: Optional[BlockwiseLoss] = None
        self._wrapped: Optional[tuple[L.LightningModule, Any]] = None
        self._pending_teacher_state: Optional[dict[str, torch.Tensor]] = None

    # -- the teacher -------------------------------------------------------------------------------
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage != "fit" or self.teacher is not None:
            return
        teacher = copy.deepcopy(network(pl_module, self.attr, "BlockwiseDistillation"))
        self.teacher = teacher.eval().requires_grad_(False)
        rank_zero_info(f"BlockwiseDistillation: the teacher is a frozen copy of {self.attr} as it was at setup")

    def _active(self, epoch: int) -> bool:
        return epoch >= self.start_epoch and (self.stop_epoch is None or epoch < self.stop_epoch)

    # -- hooks and the wrapped training_step ---------------------------------------------------------
    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not pl_module.automatic_optimization:
            raise RuntimeError("BlockwiseDistillation adds its loss to what training_step returns, and with manual "
                               "optimization training_step returns none: build amct_torch.distill.BlockwiseLoss in "
                               "the LightningModule and add it to the loss before manual_backward")
        student = network(pl_module, self.attr, "BlockwiseDistillation")
        if self.teacher is None:
            raise RuntimeError("BlockwiseDistillation: no teacher (setup did not run for 'fit'); pass teacher=...")
        self.teacher.to(device_of(student))
        if self._pending_teacher_state is not None:
            self.teacher.load_state_dict(self._pending_teacher_state)
            self._pending_teacher_state = None
        inputs = self.example_inputs
        if inputs is None:
            inputs, _ = example_inputs(trainer, pl_module, None, "BlockwiseDistillation")
        inputs = move_data_to_device(inputs, device_of(student))
        blocks = (blocks_from_groups(student, self.blocks, inputs) if self.blocks is not None
                  else find_blocks(student, inputs))
        self._loss = BlockwiseLoss(self.teacher, student, blocks, self.loss, input_fn=self.input_fn or first_input)
        rank_zero_info(f"BlockwiseDistillation: {len(blocks)} blocks: " + ", ".join(b.name for b in blocks))
        original = pl_module.training_step

        @functools.wraps(original)
        def training_step(batch: Any, *args: Any, **kwargs: Any) -> Any:
            if self._loss is None or not self._active(trainer.current_epoch):
                return original(batch, *args, **kwargs)
            with self._loss.recording():
                out = original(batch, *args, **kwargs)
            extra = self._loss.loss_from_recorded(batch)
            pl_module.log("distill_loss", extra.detach(), on_step=True, on_epoch=True, prog_bar=True)
            if self.log_blocks:
                for name, value in self._loss.last.items():
                    pl_module.log(metric_name(f"distill/{name}"), value, on_step=True, on_epoch=False)
            return _add(out, self.weight * extra)

        pl_module.training_step = training_step
        self._wrapped = (pl_module, original)

    def _unwrap(self) -> None:
        if self._wrapped is not None:
            pl_module, _ = self._wrapped
            if "training_step" in vars(pl_module):
                del pl_module.training_step            # the class's method again
            self._wrapped = None
        if self._loss is not None:
            self._loss.remove()
            self._loss = None

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._unwrap()

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        self._unwrap()

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage == "fit":
            self._unwrap()

    # -- checkpoints -------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        teacher = None if self.teacher is None else {k: v.detach().cpu() for k, v in self.teacher.state_dict().items()}
        return {"version": _STATE_VERSION, "weight": self.weight, "blocks": self.blocks, "teacher": teacher}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        teacher = state_dict.get("teacher")
        if teacher is None:
            return
        if self.teacher is not None and self._loss is None:
            self.teacher.load_state_dict(teacher)
        else:
            self._pending_teacher_state = teacher


def _add(out: Any, extra: torch.Tensor) -> Any:
    """``training_step``'s output with ``extra`` added to its loss."""
    if isinstance(out, torch.Tensor):
        return out + extra
    if isinstance(out, Mapping) and isinstance(out.get("loss"), torch.Tensor):
        return {**out, "loss": out["loss"] + extra}
    if out is None:
        return None                                   # the step was skipped by the module itself
    raise TypeError(f"BlockwiseDistillation: training_step returned {type(out).__name__}; expected a loss tensor or a "
                    "dict with a 'loss' tensor")

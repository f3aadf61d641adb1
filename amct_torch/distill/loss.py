"""The block-wise distillation loss of one batch, for adding to a training loss.

:class:`BlockwiseLoss` compares every block's output in the student with the same block's output in
the teacher, both from one ordinary forward pass each (the student's blocks get the student's own
inputs). Hooks stay registered on the student until :meth:`BlockwiseLoss.remove`, so the loss can
reuse a forward the training step already ran::

    distill_loss = BlockwiseLoss(teacher, student, find_blocks(student, x))
    with distill_loss.recording():                     # the training step's own forward
        logits = student(x)
    loss = F.cross_entropy(logits, y) + 0.1 * distill_loss.loss_from_recorded(x)
    loss.backward()                                     # reaches weights and learned quantization parameters

or computes both forwards itself: ``loss = distill_loss(x)`` (the student stops after the last block).
The teacher runs under ``torch.no_grad`` in eval mode (its modes are restored); the student's mode is
left as the caller set it.
"""

from __future__ import annotations

import contextlib
import dataclasses
from typing import Any, Callable, Iterator, Literal, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..config.base import ConfigError
from .blocks import Block, blocks_from_groups, merged
from .probe import InputFn, StopForward, model_device, model_inputs, primary, to_device

__all__ = ["BlockwiseLoss", "make_loss", "LossFn", "as_blocks", "align_blocks"]

#: ``loss(student_output, teacher_output) -> scalar tensor``
LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]

_LOSSES: dict[str, LossFn] = {"mse": F.mse_loss, "l1": F.l1_loss, "smooth_l1": F.smooth_l1_loss}


def make_loss(loss: str | LossFn | None) -> LossFn:
    """The loss function ``loss`` names (``mse``, the default, ``l1``, ``smooth_l1``), or ``loss`` itself
    when it is callable (an ``nn.MSELoss()`` instance, a function of (student output, teacher output))."""
    if loss is None:
        return F.mse_loss
    if isinstance(loss, str):
        if loss not in _LOSSES:
            raise ConfigError("loss", loss, "one of " + ", ".join(repr(k) for k in _LOSSES) + " or a callable")
        return _LOSSES[loss]
    if callable(loss):
        return loss
    raise ConfigError("loss", loss, "one of " + ", ".join(repr(k) for k in _LOSSES)
                      + " or a callable (student_output, teacher_output) -> scalar tensor")


def unwrap(model: nn.Module) -> nn.Module:
    """The model inside a (Distributed)DataParallel wrapper."""
    if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
        return model.module
    return model


def as_blocks(student: nn.Module, blocks: Sequence[Block] | Sequence[Sequence[str]], example_inputs: Any = None
              ) -> list[Block]:
    """``blocks`` as a list of :class:`Block` (lists of module paths go through :func:`blocks_from_groups`)."""
    if isinstance(blocks, (str, bytes)) or not isinstance(blocks, Sequence) or len(blocks) == 0:
        raise ConfigError("blocks", blocks, "a non-empty list of Block (find_blocks) or of module-path lists")
    if all(isinstance(b, Block) for b in blocks):
        return list(blocks)
    if any(isinstance(b, Block) for b in blocks):
        raise ConfigError("blocks", [type(b).__name__ for b in blocks], "all Block objects or all module-path lists")
    return blocks_from_groups(student, blocks, example_inputs)


def _has(model: nn.Module, path: str) -> bool:
    try:
        model.get_submodule(path)
    except AttributeError:
        return False
    return True


def _ancestor_in(model: nn.Module, path: str) -> str | None:
    """``path``, or its nearest ancestor that ``model`` has (``None``: none but the root)."""
    while path and not _has(model, path):
        path = path.rpartition(".")[0]
    return path or None


def align_blocks(teacher: nn.Module, student: nn.Module, blocks: Sequence[Block]) -> list[Block]:
    """The blocks with every boundary a module of both models.

    Teacher and student share module paths, except where the student has more depth: the factors of a
    decomposed layer (``conv1.0``, ``conv1.1`` for the teacher's ``conv1``). A boundary inside such a module
    has no teacher counterpart, so the blocks on both sides of it merge, and a first start or last end inside
    one moves up to that module (its input and output are the same in both models). A boundary with no
    counterpart at all is an error naming it.
    """
    out: list[list[Block]] = []
    for b in blocks:
        if out and not (_has(teacher, out[-1][-1].end) and _has(teacher, b.start)):
            out[-1].append(b)
        else:
            out.append([b])
    aligned = []
    for chunk in out:
        unit = merged(chunk)
        start, end = _ancestor_in(teacher, unit.start), _ancestor_in(teacher, unit.end)
        for role, path, mapped in (("start", unit.start, start), ("end", unit.end, end)):
            if mapped is None or not _has(student, path):
                who, model = ("student", student) if not _has(student, path) else ("teacher", teacher)
                raise ValueError(f"block {unit.name!r}: its {role} {path!r} is not a module of the {who} "
                                 f"({type(model).__name__}); teacher and student must share module paths "
                                 "(prepare the student from the teacher with prepare_qat or quantize)")
        if (start, end) != (unit.start, unit.end):
            unit = dataclasses.replace(unit, name=start if start == end else f"{start}..{end}", start=start, end=end)
        aligned.append(unit)
    return aligned


class BlockwiseLoss:
    """Per-block distillation loss of a batch: ``reduce_b loss(student_b(x), teacher_b(x))``.

    Args:
        teacher: the float model (not trained; run under no_grad in eval mode).
        student: the compressed model; hooks are registered on its block boundaries until :meth:`remove`.
        blocks: :class:`Block` objects (:func:`find_blocks`) or lists of module paths.
        loss: ``mse`` (default), ``l1``, ``smooth_l1`` or a callable (student output, teacher output).
        reduction: ``mean`` or ``sum`` over the blocks.
        input_fn: ``batch -> model input`` (default: a tensor, the first element of ``(x, y)``, a dict as
            keyword inputs).

    After each evaluation :attr:`last` holds the per-block values (floats), for logging.
    """

    def __init__(self, teacher: nn.Module, student: nn.Module, blocks: Sequence[Block] | Sequence[Sequence[str]],
                 loss: str | LossFn | None = None, *, reduction: Literal["mean", "sum"] = "mean",
                 input_fn: InputFn | None = None):
        teacher, student = unwrap(teacher), unwrap(student)
        if teacher is student:
            raise ValueError("BlockwiseLoss: teacher and student are the same module; the student is a compressed "
                             "copy (prepare_qat / quantize return one)")
        if reduction not in ("mean", "sum"):
            raise ConfigError("BlockwiseLoss.reduction", reduction, "'mean' or 'sum'")
        self.teacher, self.student = teacher, student
        self.blocks = align_blocks(teacher, student, as_blocks(student, blocks))
        self.loss_fn = make_loss(loss)
        self.reduction = reduction
        self.input_fn = input_fn
        self.last: dict[str, float] = {}
        self._recording = False
        self._stop = False
        self._started: set[str] = set()
        self._outputs: dict[str, Any] = {}
        self._handles = self._hook(student, self._started, self._outputs, lambda: self._recording, lambda: self._stop)

    # -- hooks ---------------------------------------------------------------------------------------
    def _hook(self, model: nn.Module, started: set[str], outputs: dict[str, Any], active: Callable[[], bool],
              stop: Callable[[], bool]) -> list[Any]:
        last = self.blocks[-1].name
        handles = []
        for b in self.blocks:
            def pre(module: nn.Module, args: Any, name: str = b.name) -> None:
                if active():
                    started.add(name)

            def post(module: nn.Module, args: Any, output: Any, name: str = b.name) -> None:
                if not active() or name not in started or name in outputs:
                    return
                t = primary(output)
                if t is None:
                    raise ValueError(f"block {name!r}: its end module returned no tensor")
                outputs[name] = t
                if stop() and name == last:
                    raise StopForward(t)

            handles.append(model.get_submodule(b.start).register_forward_pre_hook(pre))
            handles.append(model.get_submodule(b.end).register_forward_hook(post))
        return handles

    def remove(self) -> None:
        """Remove the hooks from the student (the object cannot be used afterwards)."""
        for h in self._handles:
            h.remove()
        self._handles = []

    def __enter__(self) -> "BlockwiseLoss":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.remove()

    # -- student side --------------------------------------------------------------------------------
    @contextlib.contextmanager
    def recording(self) -> Iterator["BlockwiseLoss"]:
        """Record the student's block outputs during the forward run inside this context (one forward)."""
        if not self._handles:
            raise RuntimeError("BlockwiseLoss: its hooks were removed; build a new one")
        self._started.clear()
        self._outputs.clear()
        self._recording = True
        try:
            yield self
        finally:
            self._recording = False

    @property
    def recorded(self) -> dict[str, torch.Tensor]:
        """The student block outputs of the last recorded forward, by block name."""
        return dict(self._outputs)

    def _inputs(self, batch: Any, model: nn.Module) -> tuple[tuple, dict]:
        return to_device(model_inputs(batch, self.input_fn), model_device(model))

    # -- teacher side --------------------------------------------------------------------------------
    def teacher_outputs(self, batch: Any) -> dict[str, torch.Tensor]:
        """The teacher's block outputs for ``batch`` (no gradients; the forward stops after the last block)."""
        started: set[str] = set()
        outputs: dict[str, Any] = {}
        modes = {m: m.training for m in self.teacher.modules()}
        handles = self._hook(self.teacher, started, outputs, lambda: True, lambda: True)
        args, kwargs = self._inputs(batch, self.teacher)
        try:
            self.teacher.eval()
            with torch.no_grad():
                try:
                    self.teacher(*args, **kwargs)
                except StopForward:
                    pass
        finally:
            for h in handles:
                h.remove()
            for m, mode in modes.items():
                m.training = mode
        missing = [b.name for b in self.blocks if b.name not in outputs]
        if missing:
            raise RuntimeError(f"the teacher's forward did not reach the end of block(s) {', '.join(missing)}")
        return outputs

    # -- the loss --------------------------------------------------------------------------------------
    def loss_from_recorded(self, batch: Any) -> torch.Tensor:
        """The loss between the student outputs recorded by :meth:`recording` and the teacher's on ``batch``
        (the same batch the student's forward saw). Consumes the recorded outputs."""
        missing = [b.name for b in self.blocks if b.name not in self._outputs]
        if missing:
            raise RuntimeError(f"no student output recorded for block(s) {', '.join(missing)}: run the student's "
                               "forward inside `with loss.recording():` first (or call loss(batch))")
        teacher = self.teacher_outputs(batch)
        values = []
        for b in self.blocks:
            s = self._outputs[b.name]
            t = teacher[b.name].to(device=s.device, dtype=s.dtype)
            if t.shape != s.shape:
                raise ValueError(f"block {b.name!r}: student output {tuple(s.shape)} and teacher output "
                                 f"{tuple(t.shape)} differ in shape")
            values.append(self.loss_fn(s, t))
        self._outputs.clear()
        self.last = {b.name: float(v.detach()) for b, v in zip(self.blocks, values)}
        total = torch.stack([v.reshape(()) for v in values])
        return total.mean() if self.reduction == "mean" else total.sum()

    def __call__(self, batch: Any) -> torch.Tensor:
        """Run the student (up to the last block) and the teacher on ``batch``; return the reduced loss."""
        args, kwargs = self._inputs(batch, self.student)
        with self.recording():
            self._stop = True
            try:
                self.student(*args, **kwargs)
            except StopForward:
                pass
            finally:
                self._stop = False
        return self.loss_from_recorded(batch)

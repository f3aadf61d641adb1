"""Block-wise distillation: train a compressed student block by block to reproduce its float teacher.

    student = amct_torch.prepare_qat(teacher, QatConfig(weight_bits=4, activation_bits=4), x)
    report = distill_blockwise(teacher, student, loader)       # DistillConfig() defaults: AdamW, lr 1e-3, 1 epoch
    print(report)                                               # per block: loss before/after, steps, seconds

For each unit (a block of :func:`~amct_torch.distill.find_blocks`, or ``group_size`` merged blocks), in
execution order:

1. its activation quantizers that are still initialising (QAT clips over their first ``batch_num``
   forwards, uncalibrated PTQ quantizers) see the unit's first batches, exactly as they would in
   training: nothing is reset, a calibrated quantizer stays as it is;
2. its loss is measured on the evaluation batches (``loss_before``);
3. only its parameters train (every other parameter of the student is frozen): weights, biases and
   batch-norm affine parameters (``train_weights``), learned activation clips and weight scales
   (``train_quant_params``); a parameter the unit shares with a module outside it (tied embeddings) does
   not train. Each step runs the teacher up to the unit's end (no gradients) and the student up to the
   unit's end (a forward hook raises a private exception carrying the output, so nothing after the unit
   is computed) and minimises ``loss(student output, teacher output)``;
4. its loss is measured again (``loss_after``); with ``revert_worse`` (default) a unit that got worse
   on the evaluation batches gets its parameters back.

What the student's unit receives as input is ``DistillConfig.block_input``: the student's own earlier
(already distilled) blocks' output by default, the teacher's block input, or AMCT's ``auto`` rule; the
teacher's input is substituted by a forward pre-hook on the unit's start module.

Both models run in **eval mode** for the whole distillation (their modes are restored afterwards): batch
norm uses its running statistics, which never change (a QAT student's live BN folds compute the deployed
folded convolution; training single blocks on a few batches would corrupt batch statistics), and dropout
is off. Gradients flow as in training. Masks of a pruned student stay applied (mask stages keep zero
gradients on pruned weights); a PTQ student trains its weights against its calibrated, fixed factors.

The teacher runs on the fly; ``cache_teacher`` (AMCT's ``data_dump``, in memory) stores one pass of the
data with the teacher's block input and output per unit and reuses it every epoch. When every unit is
done, quantizers the units never reached (after the last unit, outside every block) are initialised by
full forwards, so a distilled student can be exported.
"""

from __future__ import annotations

import itertools
import logging
import time
from collections import defaultdict
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Iterable, Sequence, Union

import torch
import torch.nn as nn

from ..config.base import ConfigError
from ..config.distill import DistillConfig
from ..graph.plan import render_table
from ..quant.quantizers import ActivationQuantizer, ArqWeightQuantizer
from .blocks import Block, find_blocks, merge_blocks
from .loss import LossFn, align_blocks, as_blocks, make_loss, unwrap
from .probe import BlockProbe, InputFn, model_device, model_inputs, primary, run_to_end, to_device

__all__ = ["distill_blockwise", "DistillReport", "BlockResult", "OptimizerSpec"]

log = logging.getLogger("amct_torch.distill")

#: ``None`` (``DistillConfig.optimizer``), a torch optimizer instance (its class and hyper-parameters are
#: reused: a new one is built per unit over the unit's parameters) or ``f(param_groups) -> Optimizer``
OptimizerSpec = Union[torch.optim.Optimizer, Callable[[list], torch.optim.Optimizer], None]


@dataclass
class BlockResult:
    """What distilling one unit did.

    ``loss_before``/``loss_after``: mean loss on the evaluation batches before and after training (None
    when ``eval_batches`` is 0); ``train_loss``: mean loss of the last epoch's steps; ``parameters``:
    trained elements; ``teacher_inputs``: steps whose student input was the teacher's (``teacher``: all,
    ``auto``: where AMCT's rule chose it).
    """

    name: str
    kind: str
    layers: tuple[str, ...]
    loss_before: float | None
    loss_after: float | None
    train_loss: float | None
    steps: int
    seconds: float
    parameters: int
    teacher_inputs: int = 0
    note: str = ""

    @property
    def improvement(self) -> float | None:
        """Relative loss reduction ``1 - after / before`` (None without both measurements)."""
        if self.loss_before is None or self.loss_after is None or self.loss_before == 0:
            return None
        return 1.0 - self.loss_after / self.loss_before

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["layers"] = list(self.layers)
        out["improvement"] = self.improvement
        return out


def _num(v: float | None) -> str:
    return "-" if v is None else f"{v:.4g}"


@dataclass
class DistillReport:
    """The result of :func:`distill_blockwise`: one :class:`BlockResult` per unit, in training order.

    ``output_loss_before``/``output_loss_after``: the loss between the whole student's and teacher's
    outputs on the evaluation batches (before: only when every quantizer was initialised already).
    """

    config: DistillConfig
    blocks: list[BlockResult] = field(default_factory=list)
    seconds: float = 0.0
    output_loss_before: float | None = None
    output_loss_after: float | None = None
    notes: list[str] = field(default_factory=list)

    def __getitem__(self, name: str) -> BlockResult:
        for b in self.blocks:
            if b.name == name:
                return b
        raise KeyError(f"no block {name!r} in the report; blocks: {', '.join(b.name for b in self.blocks)}")

    def to_dict(self) -> dict[str, Any]:
        return {"config": self.config.to_dict(), "seconds": self.seconds, "output_loss_before": self.output_loss_before,
                "output_loss_after": self.output_loss_after, "notes": list(self.notes),
                "blocks": [b.to_dict() for b in self.blocks]}

    def __str__(self) -> str:
        rows = []
        for b in self.blocks:
            imp = b.improvement
            rows.append((b.name, b.kind, len(b.layers), b.steps, _num(b.loss_before), _num(b.loss_after),
                         "-" if imp is None else f"{100 * imp:+.1f}%", b.parameters, f"{b.seconds:.2f}", b.note))
        head = f"block-wise distillation: {len(self.blocks)} units, {self.seconds:.1f} s ({self.config.short()})"
        parts = [head, render_table(["block", "kind", "layers", "steps", "loss before", "loss after", "reduced",
                                     "parameters", "seconds", "note"], rows)]
        if self.output_loss_before is not None or self.output_loss_after is not None:
            parts.append(f"model output loss: {_num(self.output_loss_before)} -> {_num(self.output_loss_after)}")
        parts += [f"note: {n}" for n in self.notes]
        return "\n".join(parts)


# -- helpers ----------------------------------------------------------------------------------------------
def _check_data(data: Any, what: str) -> Iterable[Any]:
    if isinstance(data, torch.Tensor):
        return [data]
    try:
        it = iter(data)
    except TypeError:
        raise TypeError(f"{what}: got {type(data).__name__}; allowed: an iterable of batches (a DataLoader, a list) "
                        "or one tensor") from None
    if it is data:
        raise TypeError(f"{what}: got an iterator ({type(data).__name__}), which can be read only once; distillation "
                        "reads the data once per block and epoch: pass a DataLoader or a list (e.g. list(batches))")
    return data


def _owners(model: nn.Module) -> dict[int, list[str]]:
    out: dict[int, list[str]] = defaultdict(list)
    for path, m in model.named_modules(remove_duplicate=False):
        for p in m._parameters.values():
            if p is not None:
                out[id(p)].append(path)
    return out


def _is_quant_module(m: nn.Module) -> bool:
    return isinstance(m, (ActivationQuantizer, ArqWeightQuantizer))


def _unit_parameters(student: nn.Module, unit: Block, config: DistillConfig, trainable: dict[nn.Parameter, bool],
                     owners: dict[int, list[str]]) -> tuple[list[nn.Parameter], list[nn.Parameter], int]:
    """(weights, quantization parameters, parameters shared with modules outside the unit)."""
    weights, quant, shared = [], [], 0
    for p in student.parameters():
        paths = owners.get(id(p), [])
        inside = [o for o in paths if unit.contains(o)]
        if not inside or not trainable.get(p, False):
            continue
        if len(inside) != len(paths):
            shared += 1
            continue
        if _is_quant_module(student.get_submodule(inside[0])):
            if config.train_quant_params:
                quant.append(p)
        elif config.train_weights:
            weights.append(p)
    return weights, quant, shared


def _unit_quantizers(student: nn.Module, unit: Block) -> list[ActivationQuantizer]:
    out = []
    for m in unit.modules:
        for q in student.get_submodule(m).modules():
            if isinstance(q, ActivationQuantizer) and q.tied_to is None and q not in out:
                out.append(q)
    return out


def _pending(quantizers: Iterable[ActivationQuantizer]) -> list[ActivationQuantizer]:
    return [q for q in quantizers if q.tied_to is None and not q.is_calibrated]


def _make_optimizer(config: DistillConfig, weights: list[nn.Parameter], quant: list[nn.Parameter],
                    optimizer: Any) -> torch.optim.Optimizer:
    groups: list[dict[str, Any]] = []
    if weights:
        groups.append({"params": weights})
    if quant:
        g: dict[str, Any] = {"params": quant, "weight_decay": 0.0}
        if config.quant_lr is not None:
            g["lr"] = config.quant_lr
        groups.append(g)
    if optimizer is None:
        if config.optimizer == "adamw":
            return torch.optim.AdamW(groups, lr=config.lr, weight_decay=config.weight_decay)
        if config.optimizer == "adam":
            return torch.optim.Adam(groups, lr=config.lr, weight_decay=config.weight_decay)
        return torch.optim.SGD(groups, lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay)
    if isinstance(optimizer, torch.optim.Optimizer):
        defaults = dict(optimizer.defaults)
        if "weight_decay" not in defaults:
            for g in groups:
                g.pop("weight_decay", None)
        try:
            return type(optimizer)(groups, **defaults)
        except TypeError as err:
            raise TypeError(f"optimizer: a new {type(optimizer).__name__} could not be built from its defaults per "
                            f"block ({err}); pass a factory instead: optimizer=lambda groups: "
                            f"{type(optimizer).__name__}(groups, ...)") from None
    if callable(optimizer):
        opt = optimizer(groups)
        if not isinstance(opt, torch.optim.Optimizer):
            raise TypeError(f"optimizer factory returned {type(opt).__name__}; allowed: a torch.optim.Optimizer")
        return opt
    raise ConfigError("optimizer", optimizer, "None, a torch.optim.Optimizer (its class and hyper-parameters are "
                      "reused per block) or a callable param_groups -> Optimizer")


def _diverged(s: torch.Tensor, t: torch.Tensor, threshold: float) -> bool:
    """AMCT's rule: the student's input has drifted when its mean squared difference from the teacher's
    exceeds ``threshold`` times the smaller of their mean squares."""
    s, t = s.detach().float(), t.detach().float()
    diff = ((t - s) ** 2).mean()
    return bool(diff > threshold * torch.minimum((t ** 2).mean(), (s ** 2).mean()))


def _progress(total: int | None, desc: str, enabled: bool):
    if not enabled:
        return None
    try:
        from tqdm.auto import tqdm
    except ImportError:  # tqdm comes with lightning; without it, no bar
        return None
    return tqdm(total=total, desc=desc, unit="step", leave=False)


# -- the engine -----------------------------------------------------------------------------------------
class _Run:
    """State shared by the units of one :func:`distill_blockwise` call."""

    def __init__(self, teacher: nn.Module, student: nn.Module, data: Iterable[Any], config: DistillConfig,
                 loss_fn: LossFn, input_fn: InputFn | None, optimizer: Any, progress: bool):
        self.teacher, self.student, self.data, self.config = teacher, student, data, config
        self.loss_fn, self.input_fn, self.optimizer, self.progress = loss_fn, input_fn, optimizer, progress
        self.s_dev, self.t_dev = model_device(student), model_device(teacher)
        self.need_teacher_input = config.block_input != "student"

    def inputs(self, batch: Any) -> tuple[tuple, dict]:
        return to_device(model_inputs(batch, self.input_fn), self.s_dev)

    def batches(self, limit: int | None = None) -> Iterable[tuple[tuple, dict]]:
        n = self.config.max_batches_per_epoch if limit is None else limit
        source = self.data if n is None else itertools.islice(self.data, n)
        for batch in source:
            yield self.inputs(batch)

    def epoch_length(self) -> int | None:
        try:
            n = len(self.data)  # type: ignore[arg-type]
        except TypeError:
            return self.config.max_batches_per_epoch
        m = self.config.max_batches_per_epoch
        return n if m is None else min(n, m)

    # one unit ---------------------------------------------------------------------------------------------
    def teacher_step(self, probe: BlockProbe, inputs: tuple[tuple, dict]) -> tuple[torch.Tensor | None, torch.Tensor]:
        """The teacher's unit input (when needed) and output for ``inputs``, on the student's device."""
        t_inputs = to_device(inputs, self.t_dev) if self.t_dev != self.s_dev else inputs
        with torch.no_grad():
            out = primary(run_to_end(self.teacher, t_inputs, probe))
        if out is None:
            raise ValueError(f"block {probe.name!r}: the teacher's end module {probe.end!r} returned no tensor")
        t_in = probe.input
        return (None if t_in is None else t_in.to(self.s_dev)), out.detach().to(self.s_dev)

    def student_output(self, probe: BlockProbe, inputs: tuple[tuple, dict]) -> torch.Tensor:
        out = primary(run_to_end(self.student, inputs, probe))
        if out is None:
            raise ValueError(f"block {probe.name!r}: the student's end module {probe.end!r} returned no tensor")
        return out

    def distill(self, unit: Block, trainable: dict[nn.Parameter, bool], owners: dict[int, list[str]],
                eval_inputs: list[tuple[tuple, dict]], position: str) -> BlockResult:
        cfg, t0 = self.config, time.perf_counter()
        state: dict[str, Any] = {"t_in": None, "teacher_inputs": 0}

        def substitute(x: torch.Tensor) -> torch.Tensor | None:
            t_in = state["t_in"]
            if cfg.block_input == "student" or t_in is None:
                return None
            if cfg.block_input == "teacher" or _diverged(x, t_in, cfg.auto_threshold):
                state["teacher_inputs"] += 1
                return t_in
            return None

        tprobe = BlockProbe(self.teacher, unit.start, unit.end, capture_input=self.need_teacher_input, name=unit.name)
        sprobe = BlockProbe(self.student, unit.start, unit.end, substitute=substitute, name=unit.name)
        notes: list[str] = []
        with tprobe, sprobe:
            def pair(inputs: tuple[tuple, dict], t_in: torch.Tensor | None, t_out: torch.Tensor,
                     grad: bool) -> torch.Tensor:
                state["t_in"] = t_in
                with torch.set_grad_enabled(grad):
                    s_out = self.student_output(sprobe, inputs)
                if s_out.shape != t_out.shape:
                    raise ValueError(f"block {unit.name!r}: student output {tuple(s_out.shape)} and teacher output "
                                     f"{tuple(t_out.shape)} differ in shape")
                return s_out

            def measure() -> float | None:
                if not eval_inputs:
                    return None
                total = 0.0
                for inputs in eval_inputs:
                    t_in, t_out = self.teacher_step(tprobe, inputs)
                    with torch.no_grad():
                        total += float(self.loss_fn(pair(inputs, t_in, t_out, False), t_out))
                return total / len(eval_inputs)

            # 1. quantizers of the unit that are still initialising see the unit's first batches
            pending = _pending(_unit_quantizers(self.student, unit))
            if pending:
                need = max(q.batch_num - int(q.batches_seen) for q in pending)
                for inputs in self.batches(need):
                    t_in, _ = self.teacher_step(tprobe, inputs)
                    state["t_in"] = t_in
                    with torch.no_grad():
                        self.student_output(sprobe, inputs)
                left = _pending(pending)
                if left:
                    notes.append(f"{len(left)} quantizer(s) still initialising")
            loss_before = measure()
            state["teacher_inputs"] = 0

            # 2. train the unit's parameters
            weights, quant, shared = _unit_parameters(self.student, unit, cfg, trainable, owners)
            if shared:
                notes.append(f"{shared} parameter(s) shared outside the block not trained")
            params = weights + quant
            snapshot = [p.detach().clone() for p in params] if cfg.revert_worse and loss_before is not None else None
            steps, train_loss = 0, None
            if not params:
                notes.append("nothing to train")
            else:
                for p in params:
                    p.requires_grad_(True)
                try:
                    opt = _make_optimizer(cfg, weights, quant, self.optimizer)
                    cached = None
                    if cfg.cache_teacher:
                        cached = [(inputs, *self.teacher_step(tprobe, inputs)) for inputs in self.batches()]
                    length = len(cached) if cached is not None else self.epoch_length()
                    bar = _progress(None if length is None else length * cfg.epochs, f"distill {position} {unit.name}",
                                    self.progress)
                    detached = False
                    try:
                        for _epoch in range(cfg.epochs):
                            total, n = 0.0, 0
                            source = cached if cached is not None else (
                                (inputs, *self.teacher_step(tprobe, inputs)) for inputs in self.batches())
                            for inputs, t_in, t_out in source:
                                loss = self.loss_fn(pair(inputs, t_in, t_out, True), t_out)
                                if not loss.requires_grad:
                                    detached = True
                                    break
                                opt.zero_grad(set_to_none=True)
                                loss.backward()
                                opt.step()
                                total += float(loss.detach())
                                n += 1
                                steps += 1
                                if bar is not None:
                                    bar.update(1)
                                    bar.set_postfix(loss=f"{float(loss.detach()):.4g}")
                            train_loss = total / n if n else train_loss
                            if detached:
                                break
                    finally:
                        if bar is not None:
                            bar.close()
                    if detached:
                        notes.append("the block output does not depend on its trainable parameters")
                    elif steps == 0:
                        notes.append("no training batch")
                finally:
                    for p in params:
                        p.requires_grad_(False)
            teacher_inputs = state["teacher_inputs"]
            loss_after = measure()
            if snapshot is not None and steps and loss_after is not None and loss_after > loss_before:
                with torch.no_grad():
                    for p, saved in zip(params, snapshot):
                        p.copy_(saved)
                notes.append(f"reverted (loss rose to {loss_after:.4g})")
                loss_after = measure()
        result = BlockResult(unit.name, unit.kind, unit.layers, loss_before, loss_after, train_loss, steps,
                             time.perf_counter() - t0, sum(p.numel() for p in params), teacher_inputs, "; ".join(notes))
        log.info("distilled %s: loss %s -> %s in %d steps", unit.name, _num(loss_before), _num(loss_after), steps)
        return result

    # whole model ---------------------------------------------------------------------------------------------
    def output_loss(self, eval_inputs: list[tuple[tuple, dict]]) -> float | None:
        if not eval_inputs:
            return None
        total = 0.0
        with torch.no_grad():
            for inputs in eval_inputs:
                args, kwargs = inputs
                s = primary(self.student(*args, **kwargs))
                t_args, t_kwargs = to_device(inputs, self.t_dev) if self.t_dev != self.s_dev else inputs
                t = primary(self.teacher(*t_args, **t_kwargs))
                if s is None or t is None:
                    return None
                total += float(self.loss_fn(s, t.to(s.device, s.dtype)))
        return total / len(eval_inputs)

    def finish_initialisation(self) -> list[str]:
        """Full forwards until the quantizers no unit reached are initialised; returns those still not."""
        pending = _pending(m for m in self.student.modules() if isinstance(m, ActivationQuantizer))
        if pending:
            need = max(q.batch_num - int(q.batches_seen) for q in pending)
            with torch.no_grad():
                for args, kwargs in self.batches(need):
                    self.student(*args, **kwargs)
        names = {id(m): n for n, m in self.student.named_modules()}
        return [names.get(id(q), "?") for q in _pending(pending)]


def distill_blockwise(teacher: nn.Module, student: nn.Module, data: Iterable[Any], config: DistillConfig | None = None,
                      *, blocks: Sequence[Block] | Sequence[Sequence[str]] | None = None,
                      loss: str | LossFn | None = None, optimizer: OptimizerSpec = None, input_fn: InputFn | None = None,
                      eval_data: Iterable[Any] | None = None, progress: bool = True) -> DistillReport:
    """Distill ``student`` block by block against ``teacher``; trains ``student`` in place.

    Args:
        teacher: the float model (not changed; hooks are removed and modes restored afterwards).
        student: its compressed copy (``prepare_qat``, ``quantize`` + ``calibrate``, optionally pruned), with
            the teacher's module paths.
        data: calibration batches, read once per unit and epoch (a DataLoader or a list; a tensor is one
            batch): tensors, ``(x, y)`` tuples (``x`` is used), dicts of keyword inputs (transformers).
        config: :class:`~amct_torch.config.distill.DistillConfig` (default: AdamW, lr 1e-3, one epoch, MSE,
            the student's own block inputs).
        blocks: the units: :class:`Block` objects or lists of module paths (AMCT's ``distill_group``);
            default: :func:`find_blocks` on the student with the first batch. ``config.group_size`` merges
            consecutive ones either way.
        loss: overrides ``config.loss``: a name or a callable ``(student output, teacher output) -> scalar``.
        optimizer: ``None`` (``config.optimizer``), a torch optimizer instance (a new one of its class with
            its hyper-parameters, ``lr`` included, is built per unit over the unit's parameters; its own
            parameters and state are not used) or a factory ``param_groups -> Optimizer``. The groups are
            the unit's weights, then its quantization parameters (weight decay 0, ``config.quant_lr``).
        input_fn: ``batch -> model input`` (a tensor, a tuple of positional inputs or a dict of keyword
            inputs); AMCT's ``DistillSampleBase.get_model_input_data``.
        eval_data: batches for the before/after losses (default: the first ``config.eval_batches`` of
            ``data``, read once).
        progress: show a progress bar per unit.

    Returns:
        a :class:`DistillReport` (printable; ``to_dict()``).
    """
    config = DistillConfig() if config is None else config
    if not isinstance(config, DistillConfig):
        raise ConfigError("distill_blockwise.config", type(config).__name__, "a DistillConfig")
    teacher, student = unwrap(teacher), unwrap(student)
    if teacher is student:
        raise ValueError("distill_blockwise: teacher and student are the same module; the student must be a "
                         "compressed copy (prepare_qat / quantize return one)")
    data = _check_data(data, "data")
    loss_fn = make_loss(config.loss if loss is None else loss)
    run = _Run(teacher, student, data, config, loss_fn, input_fn, optimizer, progress)
    first = next(iter(run.batches(1)), None)
    if first is None:
        raise ValueError("distill_blockwise: data is empty (no batch to distill on)")
    example = first[1] if first[1] and not first[0] else first[0]
    if blocks is None:
        units = find_blocks(student, example, group_size=config.group_size)
    else:
        units = merge_blocks(as_blocks(student, blocks, example), config.group_size)
    units = align_blocks(teacher, student, units)
    if config.eval_batches:
        source = _check_data(eval_data, "eval_data") if eval_data is not None else data
        eval_inputs = [run.inputs(b) for b in itertools.islice(source, config.eval_batches)]
    else:
        eval_inputs = []

    t0 = time.perf_counter()
    report = DistillReport(config)
    modes = {m: m.training for m in itertools.chain(teacher.modules(), student.modules())}
    trainable = {p: p.requires_grad for p in student.parameters()}
    owners = _owners(student)
    try:
        teacher.eval()
        student.eval()
        for p in trainable:
            p.requires_grad_(False)
        if not _pending(m for m in student.modules() if isinstance(m, ActivationQuantizer)):
            report.output_loss_before = run.output_loss(eval_inputs)
        for i, unit in enumerate(units):
            report.blocks.append(run.distill(unit, trainable, owners, eval_inputs, f"{i + 1}/{len(units)}"))
        left = run.finish_initialisation()
        if left:
            report.notes.append(f"still initialising (export will refuse): {', '.join(left[:5])}"
                                + (" ..." if len(left) > 5 else "") + "; give more batches")
        report.output_loss_after = run.output_loss(eval_inputs) if not left else None
    finally:
        for p, flag in trainable.items():
            p.requires_grad_(flag)
        for m, mode in modes.items():
            m.training = mode
    report.seconds = time.perf_counter() - t0
    return report

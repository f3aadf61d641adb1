"""Pruning as Lightning callbacks: ``MagnitudePruning``, ``ChannelPruning``, ``NMSparsity``, and
``load_pruned_checkpoint``.

The callbacks schedule the passes of :mod:`amct_torch.sparsity`; they hold no algorithm. Each one
prepares ``pl_module.<attr>`` in the ``setup`` hook (before ``configure_optimizers``, before a checkpoint
is restored and before DDP wraps the module), so the optimizer trains the prepared network and a
checkpoint's ``state_dict`` (masks included: they are ``MaskStage`` buffers) loads into it.

* :class:`MagnitudePruning` — :func:`~amct_torch.sparsity.prune_magnitude` at setup, then the
  :class:`~amct_torch.sparsity.MagnitudeScheduler` follows the global step (``unit="step"``: after every
  optimizer step, the position is ``trainer.global_step``) or the epoch (``unit="epoch"``: at every epoch
  start). The scheduler's position and rewind weights are the callback's checkpoint state.
* :class:`NMSparsity` — :func:`~amct_torch.sparsity.apply_nm` at setup (2:4 by default); the masks update
  themselves in training (``update_freq``), counting batches in a buffer of the ``state_dict``.
* :class:`ChannelPruning` — every layer of every prunable channel group is wrapped at setup with an
  all-ones channel mask (the same computation as before), and :func:`~amct_torch.sparsity.prune_channels`
  sets the masks at setup (``at="setup"``) or at the start of epoch ``at``. The network therefore has one
  structure before and after the pruning point: any checkpoint of the fit resumes and reloads. With
  ``shrink_at_end`` the masked network is shrunk at the end of fit (:func:`~amct_torch.sparsity.shrink`);
  the :class:`~amct_torch.sparsity.ShrinkRecord` is kept in the callback (``shrink_record``), in its
  checkpoint state, and written with the shrunk weights next to the checkpoints (or to ``save_shrunk``).

A checkpoint of a pruned network loads into a fresh LightningModule with :func:`load_pruned_checkpoint`,
which rebuilds the structure from the callbacks' saved states (masked, or shrunk by the record) first.

Example::

    prune = ChannelPruning({"ratio": 0.5, "criterion": "taylor"}, loss_fn=F.cross_entropy, shrink_at_end=True)
    ckpt = ModelCheckpoint(dirpath="ckpt", save_last=True)
    L.Trainer(max_epochs=5, callbacks=[prune, ckpt]).fit(task, datamodule)   # ckpt/shrunk.ckpt, shrunk.shrink.json
    small = load_pruned_checkpoint(reference_task("resnet_digits"), "ckpt/shrunk.ckpt")   # the shrunk network
    masked = load_pruned_checkpoint(reference_task("resnet_digits"), "ckpt/last.ckpt")    # masked, before shrink
"""

from __future__ import annotations

import copy
import fnmatch
import importlib
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Callable, Literal, Optional, Union

import lightning as L
import torch
import torch.nn as nn
from lightning.fabric.utilities.apply_func import move_data_to_device
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

from ..config import ChannelPruneConfig, ConfigError, MagnitudeConfig, NMConfig, Targeting
from ..graph import swap_layers
from ..nn import CompressedLayer
from ..sparsity import (MagnitudeScheduler, MaskStage, ShrinkRecord, add_bn_slim_grad, apply_nm, apply_shrink_record,
                        channel_groups, magnitude_layers, mask_stage, nm_layers, prune_channels, prune_magnitude, shrink)
from ..sparsity.channel import channel_mask_stage
from ..sparsity.criteria import DATA_CRITERIA
from ._common import batches_on, detached, device_of, example_inputs, metric_name, network, parse_config, train_loader

__all__ = ["MagnitudePruning", "ChannelPruning", "NMSparsity", "load_pruned_checkpoint"]

_STATE_VERSION = 1


# -- shared ------------------------------------------------------------------------------------------
def _mask_sparsity(stages: Mapping[str, MaskStage]) -> dict[str, float]:
    """Zero fraction of every mask, plus ``total`` over all of them (read from the masks: no forward, so an
    N:M stage's batch counter is not touched)."""
    if not stages:
        return {"total": 0.0}
    zeros = {n: (s.mask == 0).sum() for n, s in stages.items()}
    counts = torch.stack(list(zeros.values())).cpu().tolist()  # one device sync
    out = {n: c / s.mask.numel() for (n, s), c in zip(stages.items(), counts)}
    out["total"] = sum(counts) / sum(s.mask.numel() for s in stages.values())
    return out


def _log_sparsity(pl_module: L.LightningModule, prefix: str, stages: Mapping[str, MaskStage], *,
                  per_layer: bool, on_step: bool) -> None:
    values = _mask_sparsity(stages)
    metrics = {metric_name(f"{prefix}/{name}"): value for name, value in values.items()
               if per_layer or name == "total"}
    pl_module.log_dict(metrics, on_step=on_step, on_epoch=not on_step, batch_size=1)


def _warn_if_other(who: str, state: Mapping[str, Any], config: dict[str, Any], options: dict[str, Any]) -> None:
    if state["config"] != config or state["options"] != options:
        rank_zero_warn(f"{who}: the checkpoint was trained with another config or options (saved: {state['config']}, "
                       f"{state['options']}); the model loaded, training goes on with the callback's own")


def _hint_on_load_failure(cb: Any, trainer: L.Trainer, exception: BaseException,
                          extra: Callable[[dict], str] | None = None) -> None:
    """After a checkpoint failed to load into the network prepared in ``setup``: say what the checkpoint holds."""
    path = trainer.ckpt_path
    if not (path and isinstance(exception, RuntimeError) and "state_dict" in str(exception)):
        return
    try:
        checkpoint = torch.load(os.fspath(path), map_location="cpu", weights_only=True)
        states = [s for name, s in _pruning_states(checkpoint) if name == type(cb).__qualname__]
    except Exception:  # noqa: BLE001 - no hint to give; Lightning's own error stands
        return
    if len(states) != 1:
        return
    state, who = states[0], type(cb).__name__
    hint = extra(state) if extra is not None else ""
    if hint:
        rank_zero_warn(f"{who}: {path} {hint}")
    elif state["config"] != cb.config.to_dict() or state["options"] != cb._options():
        rank_zero_warn(f"{who}: {path} was trained with config {state['config']} and options {state['options']}, "
                       f"but this callback prepared the network with {cb.config.to_dict()} and {cb._options()}: "
                       "resume with the checkpoint's arguments")


# -- magnitude ---------------------------------------------------------------------------------------
class MagnitudePruning(Callback):
    """Unstructured magnitude pruning of ``pl_module.<attr>`` on a schedule, inside ``Trainer.fit``.

    Args:
        config: a :class:`~amct_torch.MagnitudeConfig` (sparsity, ``agp``/``linear``/``oneshot`` schedule,
            ``start``/``end``/``frequency`` in ``unit`` = ``step`` or ``epoch``, scope, rewind), a
            :class:`~amct_torch.Targeting` of them, or a plain dict of either.
        attr: the LightningModule attribute holding the network.
        example_inputs: inputs for graph capture (default: ``example_input_array``, else the first
            training sample).
        log_sparsity: log ``magnitude/total`` (the masks' zero fraction) after every optimizer step and
            ``magnitude/<layer>`` at every epoch end.
        verbose: print the plan at setup.

    Positions: ``step`` = ``trainer.global_step`` (optimizer steps done; set after each optimizer step, so
    the masks of step ``t`` are those the next batch trains with), ``epoch`` = ``trainer.current_epoch``
    (set at each epoch start). ``scheduler`` is the :class:`~amct_torch.sparsity.MagnitudeScheduler`
    (``report()``, ``rewind()``, ``prune_to()``).

    Recipe::

        - class_path: amct_torch.lightning.MagnitudePruning
          init_args: {config: {sparsity: 0.8, schedule: agp, start: 0, end: 2000, frequency: 100}}
    """

    pipeline_rank = 10  # masks come first in a weight pipeline

    def __init__(self, config: Union[MagnitudeConfig, Targeting, dict[str, Any], None] = None, *, attr: str = "model",
                 example_inputs: Any = None, log_sparsity: bool = True, verbose: bool = False):
        self.config = parse_config(config, MagnitudeConfig, "MagnitudePruning")
        self.attr, self.example_inputs, self.log_sparsity, self.verbose = attr, example_inputs, log_sparsity, verbose
        #: the scheduler of the prepared network (after ``setup``)
        self.scheduler: MagnitudeScheduler | None = None
        self._pending: dict[str, Any] | None = None

    def _options(self) -> dict[str, Any]:
        return {"attr": self.attr}

    def prepare(self, pl_module: L.LightningModule, inputs: Any, *, verbose: bool = False) -> nn.Module:
        """Replace ``pl_module.<attr>`` by its magnitude-prepared copy (what ``setup`` does); returns it."""
        model = network(pl_module, self.attr, "MagnitudePruning")
        prepared = prune_magnitude(model, self.config, inputs, verbose=verbose)
        setattr(pl_module, self.attr, prepared)
        self.scheduler = MagnitudeScheduler(prepared)
        return prepared

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        model = network(pl_module, self.attr, "MagnitudePruning")
        if self.example_inputs is None:
            self.example_inputs, _ = example_inputs(trainer, pl_module, None, "MagnitudePruning")
        if magnitude_layers(model):
            rank_zero_info(f"MagnitudePruning: {self.attr} is magnitude-pruned already; not preparing again")
            if self.scheduler is None or self.scheduler.model is not model:
                self.scheduler = MagnitudeScheduler(model)
        else:
            self.prepare(pl_module, self.example_inputs, verbose=self.verbose and trainer.is_global_zero)
        if self._pending is not None:
            self.scheduler.load_state_dict(self._pending)
            self._pending = None

    def _stages(self) -> dict[str, MaskStage]:
        return {n: mask_stage(layer) for n, layer in self.scheduler.layers.items()}

    def _follow(self, pl_module: L.LightningModule) -> None:
        """Drive the masks of the network the module holds now: a later stage (clustering, QAT) set up after
        this one replaces it by its own copy, whose masks are the ones that train; the schedule's position
        carries over."""
        model = network(pl_module, self.attr, "MagnitudePruning")
        if self.scheduler.model is not model:
            state = self.scheduler.state_dict()
            self.scheduler = MagnitudeScheduler(model)
            self.scheduler.load_state_dict(state)

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._follow(pl_module)
        self.scheduler.on_epoch(trainer.current_epoch)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        self._follow(pl_module)
        self.scheduler.step(trainer.global_step)  # a no-op between optimizer steps (gradient accumulation)
        if self.log_sparsity:
            _log_sparsity(pl_module, "magnitude", self._stages(), per_layer=False, on_step=True)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.log_sparsity:
            _log_sparsity(pl_module, "magnitude", self._stages(), per_layer=True, on_step=False)

    # -- checkpoints -------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        scheduler = self.scheduler.state_dict() if self.scheduler is not None else self._pending
        return {"version": _STATE_VERSION, "config": self.config.to_dict(), "options": self._options(),
                "scheduler": scheduler, "example_inputs": detached(self.example_inputs)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        _warn_if_other("MagnitudePruning", state_dict, self.config.to_dict(), self._options())
        if state_dict.get("example_inputs") is not None:
            self.example_inputs = state_dict["example_inputs"]
        if state_dict.get("scheduler") is None:
            return
        if self.scheduler is None:  # restored before setup: applied there
            self._pending = state_dict["scheduler"]
        else:
            self.scheduler.load_state_dict(state_dict["scheduler"])

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        _hint_on_load_failure(self, trainer, exception)

    @staticmethod
    def _rebuild(module: L.LightningModule, state: dict[str, Any], inputs: Any) -> None:
        attr = state["options"]["attr"]
        model = network(module, attr, "load_pruned_checkpoint")
        config = parse_config(state["config"], MagnitudeConfig, "MagnitudePruning")
        setattr(module, attr, prune_magnitude(model, config, inputs))


# -- N:M -------------------------------------------------------------------------------------------
class NMSparsity(Callback):
    """N:M structured sparsity (2:4 by default) of ``pl_module.<attr>``, inside ``Trainer.fit``.

    Args:
        config: an :class:`~amct_torch.NMConfig` (``n``, ``m``, ``update_freq``, ``ste``, ``decay``), a
            :class:`~amct_torch.Targeting` of them (e.g. ``{"global": {}, "skip": ["conv1"]}`` keeps a
            one-channel stem dense), or a plain dict of either. Default: 2:4, mask fixed after the first
            training batch.
        attr: the LightningModule attribute holding the network.
        example_inputs: inputs for graph capture (default: ``example_input_array``, else the first
            training sample).
        log_sparsity: log ``nm/total`` and ``nm/<layer>`` (the masks' zero fraction) at every epoch end.
        verbose: print the plan at setup.

    The masks are computed at setup, again on the first training batch and, with ``update_freq = k``,
    every ``k`` training batches, inside the mask stages; their batch counter is a buffer, so a resumed
    fit recomputes on the same batches as an uninterrupted one. Evaluation (the sanity check included)
    does not count.

    Recipe::

        - class_path: amct_torch.lightning.NMSparsity
          init_args: {config: {global: {n: 2, m: 4}, skip: [conv1]}}
    """

    pipeline_rank = 10  # masks come first in a weight pipeline

    def __init__(self, config: Union[NMConfig, Targeting, dict[str, Any], None] = None, *, attr: str = "model",
                 example_inputs: Any = None, log_sparsity: bool = True, verbose: bool = False):
        self.config = parse_config(config, NMConfig, "NMSparsity")
        self.attr, self.example_inputs, self.log_sparsity, self.verbose = attr, example_inputs, log_sparsity, verbose

    def _options(self) -> dict[str, Any]:
        return {"attr": self.attr}

    def prepare(self, pl_module: L.LightningModule, inputs: Any, *, verbose: bool = False) -> nn.Module:
        """Replace ``pl_module.<attr>`` by its N:M-prepared copy (what ``setup`` does); returns it."""
        model = network(pl_module, self.attr, "NMSparsity")
        prepared = apply_nm(model, self.config, inputs, verbose=verbose)
        setattr(pl_module, self.attr, prepared)
        return prepared

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        model = network(pl_module, self.attr, "NMSparsity")
        if self.example_inputs is None:
            self.example_inputs, _ = example_inputs(trainer, pl_module, None, "NMSparsity")
        if nm_layers(model):
            rank_zero_info(f"NMSparsity: {self.attr} has N:M masks already; not preparing again")
            return
        self.prepare(pl_module, self.example_inputs, verbose=self.verbose and trainer.is_global_zero)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.log_sparsity:
            model = network(pl_module, self.attr, "NMSparsity")
            stages = {n: mask_stage(layer) for n, layer in nm_layers(model).items()}
            _log_sparsity(pl_module, "nm", stages, per_layer=True, on_step=False)

    def state_dict(self) -> dict[str, Any]:
        return {"version": _STATE_VERSION, "config": self.config.to_dict(), "options": self._options(),
                "example_inputs": detached(self.example_inputs)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        _warn_if_other("NMSparsity", state_dict, self.config.to_dict(), self._options())
        if state_dict.get("example_inputs") is not None:
            self.example_inputs = state_dict["example_inputs"]

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        _hint_on_load_failure(self, trainer, exception)

    @staticmethod
    def _rebuild(module: L.LightningModule, state: dict[str, Any], inputs: Any) -> None:
        attr = state["options"]["attr"]
        model = network(module, attr, "load_pruned_checkpoint")
        setattr(module, attr, apply_nm(model, parse_config(state["config"], NMConfig, "NMSparsity"), inputs))


# -- channels --------------------------------------------------------------------------------------
def _channel_stages(model: nn.Module) -> dict[str, MaskStage]:
    """The channel mask stage of every wrapper that has one, by module path."""
    out = {}
    for name, m in model.named_modules():
        if isinstance(m, CompressedLayer):
            for stage in m.weight_pipeline or ():
                if isinstance(stage, MaskStage) and stage.kind == "channel":
                    out[name] = stage
    return out


def channel_structure(model: nn.Module, example_inputs: Any, skip: tuple[str, ...] = ()) -> list[str]:
    """Wrap (in place) every layer of every prunable channel group whose producers ``skip`` (globs) does not
    name, and give it a channel mask stage (all ones: the same computation); returns the layers.

    This is the structure :class:`ChannelPruning` trains and checkpoints, whatever the masks come to hold:
    so a checkpoint saved before or after the pruning point loads into it."""
    analysis = channel_groups(model, example_inputs)
    involved = sorted({n for g in analysis.groups if g.prunable
                       and not any(fnmatch.fnmatchcase(p, pat) for p in g.producers for pat in skip)
                       for n in (*g.producers, *g.consumers)})
    if involved:
        swap_layers(model, Targeting(None, module_name={n: ChannelPruneConfig() for n in involved}), example_inputs,
                    inplace=True, title="channel pruning structure", reuse_wrapped=True)
    layers = []
    for name in involved:
        layer = model.get_submodule(name)
        if isinstance(layer, CompressedLayer):
            channel_mask_stage(layer)
            layers.append(name)
    return layers


def _resolve_callable(value: Any, who: str) -> Callable[..., Any] | None:
    if value is None or callable(value):
        return value
    if isinstance(value, str) and "." in value:
        module, _, name = value.rpartition(".")
        try:
            return getattr(importlib.import_module(module), name)
        except (ImportError, AttributeError) as err:
            raise ValueError(f"{who}: cannot import {value!r} ({err}); allowed: a callable or its import path, "
                             "e.g. 'torch.nn.functional.cross_entropy'") from None
    raise ValueError(f"{who}: got {value!r}; allowed: a callable or its import path, e.g. "
                     "'torch.nn.functional.cross_entropy'")


def _record(value: Any) -> ShrinkRecord | None:
    if value is None or isinstance(value, ShrinkRecord):
        return value
    if isinstance(value, Mapping):
        return ShrinkRecord.from_dict(dict(value))
    if isinstance(value, (str, os.PathLike)):
        return ShrinkRecord.load(value)
    raise ValueError(f"record: got {type(value).__name__}; allowed: a ShrinkRecord, its dict, or the path of its JSON")


class ChannelPruning(Callback):
    """Channel (filter) pruning of ``pl_module.<attr>`` inside ``Trainer.fit``, optionally shrunk at the end.

    Args:
        config: a :class:`~amct_torch.ChannelPruneConfig` (``ratio``, ``criterion``, ``ascend_optimized``,
            ...) or a plain dict of one.
        attr: the LightningModule attribute holding the network.
        at: ``"setup"`` (mask when fitting starts) or an epoch ``k >= 0`` (mask at the start of epoch ``k``;
            the epochs before train the dense network, e.g. with the BN-slim penalty).
        shrink_at_end: at the end of fit, replace the network by its shrunk copy
            (:func:`~amct_torch.sparsity.shrink`) and keep the :class:`~amct_torch.sparsity.ShrinkRecord`
            (``shrink_record``; in the callback's checkpoint state from then on).
        save_shrunk: file prefix of what shrinking writes: ``<prefix>.ckpt`` (the shrunk module's
            ``state_dict`` and this callback's state, for :func:`load_pruned_checkpoint`) and
            ``<prefix>.shrink.json`` (the record). Default: ``<dirpath>/shrunk`` of the Trainer's
            ``ModelCheckpoint``, nothing when it has none.
        loss_fn: ``loss_fn(output, target)`` for ``criterion="taylor"`` (a callable or its import path, e.g.
            ``torch.nn.functional.cross_entropy``).
        num_batches: training batches the data criteria (``taylor``, ``apoz``, ``mean_activation``) read.
        bn_slim_strength: with ``criterion="bn_slim"`` and an epoch ``at``: until the pruning epoch, add the
            L1 subgradient ``strength * sign(gamma)`` to every BatchNorm scale after each backward
            (:func:`~amct_torch.sparsity.add_bn_slim_grad`; divided by ``accumulate_grad_batches`` and
            multiplied by an AMP loss scale, as a loss term would be).
        flops_target: instead of ``config.ratio``, the uniform ratio at which the shrunk network has at most
            this fraction of the dense MACs (measured on ``example_inputs``).
        skip: producer layers (globs) whose channel groups stay whole.
        example_inputs: inputs for graph capture and shrinking (default: ``example_input_array``, else the
            first training sample).
        log_sparsity: log ``channel/total`` and ``channel/<layer>`` (the masks' zero fraction) at every
            epoch end once pruned.
        verbose: print the channel plan (every group, its causal chain, channels kept) when pruning.

    Under DDP the masks are computed on every rank and rank 0's are broadcast, so the ranks agree even
    when a data criterion reads different batches on each. Callbacks run in list order: put
    :class:`ONNXExport` after this one to export the shrunk network.

    Recipe (``recipes/prune_channels_resnet_digits.yaml``)::

        - class_path: amct_torch.lightning.ChannelPruning
          init_args: {config: {ratio: 0.5, criterion: taylor}, loss_fn: torch.nn.functional.cross_entropy,
                      shrink_at_end: true, save_shrunk: out/prune_channels_resnet_digits}
    """

    pipeline_rank = 10  # masks come first in a weight pipeline

    def __init__(self, config: Union[ChannelPruneConfig, dict[str, Any], None] = None, *, attr: str = "model",
                 at: Union[Literal["setup"], int] = "setup", shrink_at_end: bool = False,
                 save_shrunk: Union[str, os.PathLike, None] = None,
                 loss_fn: Optional[Callable[..., Any]] = None, num_batches: int = 4,
                 bn_slim_strength: Optional[float] = None, flops_target: Optional[float] = None,
                 skip: tuple[str, ...] = (), example_inputs: Any = None, log_sparsity: bool = True,
                 verbose: bool = False):
        who = "ChannelPruning"
        if config is None:
            config = ChannelPruneConfig()
        elif isinstance(config, Mapping):
            config = ChannelPruneConfig.from_dict(dict(config), _prefix=f"{who}.config")
        elif not isinstance(config, ChannelPruneConfig):
            raise ConfigError(f"{who}.config", config, "a ChannelPruneConfig or a dict of one")
        if not (at == "setup" or (isinstance(at, int) and not isinstance(at, bool) and at >= 0)):
            raise ValueError(f"{who}.at: got {at!r}; allowed: 'setup' or an epoch (an int >= 0)")
        if not isinstance(num_batches, int) or isinstance(num_batches, bool) or num_batches < 1:
            raise ValueError(f"{who}.num_batches: got {num_batches!r}; allowed: an int >= 1")
        if flops_target is not None and not 0.0 < flops_target < 1.0:
            raise ValueError(f"{who}.flops_target: got {flops_target!r}; allowed: None or a fraction of the dense "
                             "MACs in (0, 1)")
        loss_fn = _resolve_callable(loss_fn, f"{who}.loss_fn")
        if config.criterion == "taylor" and loss_fn is None:
            raise ValueError(f"{who}.loss_fn: criterion 'taylor' scores channels by |a * dL/da| and needs "
                             "loss_fn(output, target), e.g. torch.nn.functional.cross_entropy")
        if bn_slim_strength is not None:
            if not bn_slim_strength > 0:
                raise ValueError(f"{who}.bn_slim_strength: got {bn_slim_strength!r}; allowed: None or > 0")
            if config.criterion != "bn_slim":
                raise ValueError(f"{who}.bn_slim_strength: the penalty makes BatchNorm scales sparse for "
                                 f"criterion='bn_slim'; the config's criterion is {config.criterion!r}")
            if at == "setup":
                raise ValueError(f"{who}.bn_slim_strength: the penalty trains the epochs before pruning, and "
                                 "at='setup' prunes before any; use at=<epoch> (e.g. at=3)")
        self.config: ChannelPruneConfig = config
        self.attr, self.at, self.shrink_at_end = attr, at, shrink_at_end
        self.save_shrunk = save_shrunk
        self.loss_fn, self.num_batches = loss_fn, num_batches
        self.bn_slim_strength, self.flops_target = bn_slim_strength, flops_target
        self.skip = tuple(skip)
        self.example_inputs, self.log_sparsity, self.verbose = example_inputs, log_sparsity, verbose
        #: whether the masks are set (in checkpoints)
        self.pruned = False
        #: the config the masks were made with (``ratio`` resolved when ``flops_target`` is given)
        self.pruned_config: ChannelPruneConfig | None = None
        #: the record of the shrink at the end of fit
        self.shrink_record: ShrinkRecord | None = None
        #: files written after shrinking, by kind (``checkpoint``, ``record``)
        self.written: dict[str, Path] = {}

    def _options(self) -> dict[str, Any]:
        return {"attr": self.attr, "at": self.at, "skip": list(self.skip), "flops_target": self.flops_target,
                "num_batches": self.num_batches, "shrink_at_end": self.shrink_at_end}

    # -- preparing ---------------------------------------------------------------------------------
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        model = network(pl_module, self.attr, "ChannelPruning")
        if self.example_inputs is None:
            self.example_inputs, _ = example_inputs(trainer, pl_module, None, "ChannelPruning")
        stages = _channel_stages(model)
        if stages:  # prepared already (load_pruned_checkpoint, or an earlier fit)
            self.pruned = any(bool((s.mask == 0).any()) for s in stages.values())
            rank_zero_info(f"ChannelPruning: {self.attr} has channel masks already "
                           f"({'pruned' if self.pruned else 'all ones'}); not preparing again")
            return
        self.pruned, self.pruned_config, self.shrink_record, self.written = False, None, None, {}
        model = copy.deepcopy(model)
        channel_structure(model, self._inputs(model), self.skip)
        setattr(pl_module, self.attr, model)
        if self.at == "setup":
            self._prune(trainer, model)

    def _inputs(self, model: nn.Module) -> Any:
        return move_data_to_device(self.example_inputs, device_of(model))

    def _prune(self, trainer: L.Trainer, model: nn.Module) -> None:
        data = None
        if self.config.criterion in DATA_CRITERIA:
            loader = train_loader(trainer)
            if loader is None:
                raise ValueError(f"ChannelPruning: criterion {self.config.criterion!r} scores channels on training "
                                 "batches, and the Trainer was given no training dataloader")
            data = batches_on(loader, device_of(model))
        prune_channels(model, self.config, self._inputs(model), data=data, loss_fn=self.loss_fn,
                       num_batches=self.num_batches, skip=self.skip, flops_target=self.flops_target, inplace=True)
        self._broadcast_masks(trainer, model)
        plan = model.amct_channel_plan
        self.pruned, self.pruned_config = True, plan.config
        rank_zero_info(f"ChannelPruning (epoch {trainer.current_epoch}): {str(plan).splitlines()[0]}")
        if self.verbose and trainer.is_global_zero:
            print(plan)

    @staticmethod
    def _broadcast_masks(trainer: L.Trainer, model: nn.Module) -> None:
        if trainer.world_size <= 1:
            return
        stages = _channel_stages(model)
        payload = {n: (s.mask.cpu(), None if s.bias_mask is None else s.bias_mask.cpu()) for n, s in stages.items()}
        payload = trainer.strategy.broadcast(payload, src=0)
        for name, (mask, bias_mask) in payload.items():
            stages[name].set_mask(mask, bias_mask)

    # -- schedule ----------------------------------------------------------------------------------
    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not self.pruned and self.at != "setup" and trainer.current_epoch >= self.at:
            # in place: the wrappers exist since setup, so the optimizer keeps the same parameters
            self._prune(trainer, network(pl_module, self.attr, "ChannelPruning"))

    def on_after_backward(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.bn_slim_strength is None or self.pruned:
            return
        scale = 1.0 / trainer.accumulate_grad_batches  # as a loss term would be, under accumulation and AMP
        scaler = getattr(trainer.precision_plugin, "scaler", None)
        if scaler is not None and scaler.is_enabled():
            scale *= float(scaler.get_scale())
        add_bn_slim_grad(network(pl_module, self.attr, "ChannelPruning"), self.bn_slim_strength * scale)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.log_sparsity and self.pruned:
            stages = _channel_stages(network(pl_module, self.attr, "ChannelPruning"))
            _log_sparsity(pl_module, "channel", stages, per_layer=True, on_step=False)

    # -- the end: shrink ---------------------------------------------------------------------------
    def _shrunk_prefix(self, trainer: L.Trainer) -> Path | None:
        if self.save_shrunk is not None:
            return Path(self.save_shrunk)
        ckpt = next((cb for cb in trainer.callbacks if isinstance(cb, ModelCheckpoint) and cb.dirpath), None)
        return None if ckpt is None else Path(ckpt.dirpath) / "shrunk"

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not self.shrink_at_end or not self.pruned:
            if self.shrink_at_end:
                rank_zero_warn("ChannelPruning: fit ended before the pruning epoch; nothing was shrunk")
            return
        model = network(pl_module, self.attr, "ChannelPruning")
        small, record = shrink(model, self._inputs(model))
        setattr(pl_module, self.attr, small)
        self.shrink_record = record
        prefix = self._shrunk_prefix(trainer)
        if prefix is not None and trainer.is_global_zero:
            self.written = self.save(pl_module, prefix, epoch=trainer.current_epoch, global_step=trainer.global_step)
        where = ", ".join(str(p) for p in self.written.values()) or "the callback's shrink_record"
        rank_zero_info(f"ChannelPruning: shrank {len(record.layers)} layers; record in {where}")

    def save(self, pl_module: L.LightningModule, prefix: Union[str, os.PathLike], **extra: Any) -> dict[str, Path]:
        """Write ``<prefix>.ckpt`` (the module's ``state_dict`` and this callback's state, which
        :func:`load_pruned_checkpoint` reads) and, once shrunk, ``<prefix>.shrink.json``; returns the paths."""
        prefix = Path(prefix)
        prefix.parent.mkdir(parents=True, exist_ok=True)
        paths = {"checkpoint": prefix.with_name(prefix.name + ".ckpt")}
        state = {k: v.detach().cpu() for k, v in pl_module.state_dict().items()}
        tmp = paths["checkpoint"].with_name(paths["checkpoint"].name + ".tmp")
        torch.save({"state_dict": state, "callbacks": {self.state_key: self.state_dict()},
                    "pytorch-lightning_version": L.__version__, **extra}, tmp)
        tmp.replace(paths["checkpoint"])
        if self.shrink_record is not None:
            paths["record"] = prefix.with_name(prefix.name + ".shrink.json")
            self.shrink_record.save(paths["record"])
        return paths

    # -- checkpoints -------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {"version": _STATE_VERSION, "config": self.config.to_dict(), "options": self._options(),
                "pruned": self.pruned, "pruned_config": None if self.pruned_config is None else self.pruned_config.to_dict(),
                "shrink_record": None if self.shrink_record is None else self.shrink_record.to_dict(),
                "example_inputs": detached(self.example_inputs)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        _warn_if_other("ChannelPruning", state_dict, self.config.to_dict(), self._options())
        self.pruned = bool(state_dict["pruned"])
        saved = state_dict.get("pruned_config")
        self.pruned_config = None if saved is None else ChannelPruneConfig.from_dict(saved)
        self.shrink_record = _record(state_dict.get("shrink_record"))
        if state_dict.get("example_inputs") is not None:
            self.example_inputs = state_dict["example_inputs"]

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        def shrunk(state: dict) -> str:
            if state.get("shrink_record") is None:
                return ""
            return ("holds the shrunk network (saved after shrinking at the end of fit); it does not resume a fit. "
                    "Load it with amct_torch.lightning.load_pruned_checkpoint(module, path) and start a new fit, or "
                    "resume from a checkpoint saved during the fit")
        _hint_on_load_failure(self, trainer, exception, shrunk)

    @staticmethod
    def _rebuild(module: L.LightningModule, state: dict[str, Any], inputs: Any) -> None:
        options = state["options"]
        model = network(module, options["attr"], "load_pruned_checkpoint")
        record = _record(state.get("shrink_record"))
        if record is not None:
            apply_shrink_record(model, record)
            return
        model = copy.deepcopy(model)
        channel_structure(model, move_data_to_device(inputs, device_of(model)), tuple(options["skip"]))
        setattr(module, options["attr"], model)


# -- loading -----------------------------------------------------------------------------------------
_CALLBACKS: dict[str, type] = {cls.__qualname__: cls for cls in (MagnitudePruning, NMSparsity, ChannelPruning)}


def _pruning_states(checkpoint: Mapping[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """``(callback class name, state)`` of every pruning callback in a checkpoint, in the Trainer's order."""
    callbacks = checkpoint.get("callbacks") or {}
    return [(str(k).split("{", 1)[0], v) for k, v in callbacks.items() if str(k).split("{", 1)[0] in _CALLBACKS]


def _same_structure(module: nn.Module, state_dict: Mapping[str, Any]) -> bool:
    own = module.state_dict()
    return own.keys() == state_dict.keys() and all(
        tuple(own[k].shape) == tuple(v.shape) for k, v in state_dict.items() if isinstance(v, torch.Tensor))


def load_pruned_checkpoint(module: L.LightningModule, ckpt_path: Union[str, os.PathLike], *,
                           record: Union[ShrinkRecord, dict, str, os.PathLike, None] = None,
                           attr: str = "model", example_inputs: Any = None, map_location: Any = "cpu",
                           strict: bool = True, weights_only: bool = True) -> L.LightningModule:
    """Load a checkpoint of a pruned network into a fresh LightningModule holding the dense network.

    The structure comes first, from the saved states of the pruning callbacks in the checkpoint, in the
    Trainer's order: :class:`MagnitudePruning` / :class:`NMSparsity` prepare the network again (their masks
    then load from the checkpoint), :class:`ChannelPruning` wraps it with channel masks (a checkpoint saved
    during fit) or slices it by its :class:`~amct_torch.sparsity.ShrinkRecord` (saved after shrinking, e.g.
    ``<dirpath>/shrunk.ckpt``); then the checkpoint's ``state_dict`` loads. A module whose structure matches
    the checkpoint already is loaded as it is.

    Args:
        module: the LightningModule (e.g. ``reference_task("resnet_digits")``) around the dense network.
        ckpt_path: a checkpoint saved by a Trainer with the callbacks, or by :meth:`ChannelPruning.save`.
        record: for a checkpoint without callback state (``save_weights_only=True``): the shrink record
            (a :class:`~amct_torch.sparsity.ShrinkRecord`, its dict, or its JSON file) to slice
            ``module.<attr>`` with.
        example_inputs: inputs for graph capture (default: the ones the callbacks saved).
        map_location, strict, weights_only: as ``torch.load`` / ``load_state_dict``.

    Without a Trainer, by hand: ``apply_shrink_record(task.model, ShrinkRecord.load("shrunk.shrink.json"))``,
    then ``task.load_state_dict(torch.load("shrunk.ckpt")["state_dict"])``.

    Example::

        task = load_pruned_checkpoint(reference_task("resnet_digits"), "ckpt/shrunk.ckpt")
        evaluate_accuracy(task.model, datamodule.test_dataloader())
    """
    path = os.fspath(ckpt_path)
    checkpoint = torch.load(path, map_location=map_location, weights_only=weights_only)
    if "state_dict" not in checkpoint:
        raise ValueError(f"{path}: not a Lightning checkpoint (no 'state_dict'; keys: {', '.join(map(str, checkpoint))})")
    state_dict = checkpoint["state_dict"]
    states = _pruning_states(checkpoint)
    if not states and record is None:
        found = ", ".join(map(str, checkpoint.get("callbacks") or {})) or "none"
        raise ValueError(f"{path}: no state of a pruning callback ({', '.join(_CALLBACKS)}) in the checkpoint "
                         f"(callback states in it: {found}); checkpoints saved with save_weights_only=True carry "
                         "none: pass record=<the shrink record> for a shrunk network, or prepare the module as "
                         "the fit did and load the state_dict yourself")
    if not _same_structure(module, state_dict):
        for name, state in states:
            inputs = example_inputs if example_inputs is not None else state.get("example_inputs")
            if inputs is None and not (name == "ChannelPruning" and state.get("shrink_record") is not None):
                raise ValueError(f"{path}: the {name} state carries no example input; pass example_inputs=...")
            _CALLBACKS[name]._rebuild(module, state, inputs)
        if record is not None and not any(state.get("shrink_record") is not None for _, state in states):
            attr = states[0][1]["options"]["attr"] if states else attr
            apply_shrink_record(network(module, attr, "load_pruned_checkpoint"), _record(record))
    module.load_state_dict(state_dict, strict=strict)
    return module

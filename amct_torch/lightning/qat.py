"""``QuantizationAwareTraining``: QAT as a Lightning callback, and ``load_qat_checkpoint``.

The callback schedules the passes of :mod:`amct_torch.quant.qat`; it holds no algorithm.

* ``setup`` (before ``configure_optimizers`` and before the strategy wraps the module in DDP): the
  network ``pl_module.<attr>`` is replaced by ``prepare_qat(network, config, example_inputs)``, so the
  optimizer sees every learned clip, scale and offset.
* The learned activation ranges initialise from the first ``batch_num`` *training* forwards (averaged
  over the ranks under DDP). Lightning's sanity-check validation runs before training; it leaves the
  uninitialised quantizers exactly as they were, so the ranges never come from validation data.
* ``freeze_bn_epoch``/``freeze_bn_step`` and ``freeze_quantizers_epoch``/``freeze_quantizers_step``:
  from that epoch or global step on, :func:`~amct_torch.freeze_bn_stats` /
  :func:`~amct_torch.freeze_quantizers` (checked before every training batch).
* ``log_ranges``: at each training epoch end, ``qat/<quantizer path>/<scale|offset|lower|upper>`` (and
  ``scale_mean``/``scale_max`` for weights) go to the logger.
* ``export_path``: at the end of fit, :func:`amct_torch.export` writes the fake-quant and deploy ONNX
  models and the record file (on global rank 0).
* Checkpoints carry the callback's state (config, options, what has been frozen, the example input), so
  ``trainer.fit(ckpt_path=...)`` resumes with the same quantizers, and :func:`load_qat_checkpoint`
  rebuilds a QAT model from a checkpoint without a Trainer. Resume with the same callback arguments:
  Lightning restores the checkpoint after ``setup`` has prepared the network, so a saved config that
  differs from the callback's is reported with a warning (and a different structure fails to load).

Under DDP the callback sets the strategy's ``find_unused_parameters``: the learned clips get no gradient
while their ranges are being initialised, nor once frozen.

Example::

    qat = QuantizationAwareTraining(QatConfig(weight_bits=4), freeze_bn_epoch=3, export_path="out/resnet")
    L.Trainer(max_epochs=5, callbacks=[qat]).fit(task, datamodule)

Recipe (``amct-torch fit --config recipes/qat_resnet_digits.yaml``)::

    trainer:
      callbacks:
        - class_path: amct_torch.lightning.QuantizationAwareTraining
          init_args: {config: {weight_bits: 8, activation_algorithm: ulq}, freeze_bn_epoch: 1,
                      export_path: out/qat_resnet_digits}
"""

from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import Any, Optional, Union

import lightning as L
import torch
import torch.nn as nn
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

from ..config import QatConfig, Targeting
from ..quant import (LearnedActivationQuantizer, freeze_bn_stats, freeze_quantizers, learned_ranges, prepare_qat,
                     qat_quantizers)
from ._common import (detached, example_inputs, export_model, metric_name, network, parse_config,
                      setup_earlier_stages)

__all__ = ["QuantizationAwareTraining", "load_qat_checkpoint"]

_STATE_VERSION = 1


def _due(epoch_at: int | None, step_at: int | None, epoch: int, step: int) -> bool:
    return (epoch_at is not None and epoch >= epoch_at) or (step_at is not None and step >= step_at)


def _check_schedule(name: str, value: int | None) -> None:
    if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 0):
        raise ValueError(f"QuantizationAwareTraining.{name}: got {value!r}; allowed: None or an int >= 0")


class QuantizationAwareTraining(Callback):
    """Quantization-aware training of ``pl_module.<attr>`` inside ``Trainer.fit``.

    Args:
        config: a :class:`~amct_torch.QatConfig`, a :class:`~amct_torch.Targeting` of them, or a plain dict
            of either (as a YAML recipe gives it). Default: ``QatConfig()`` (A8W8, ULQ, ARQ-retrain).
        attr: the LightningModule attribute holding the network (``model`` for the zoo's tasks).
        example_inputs: inputs for graph capture and export. Default: ``pl_module.example_input_array``,
            else the first sample of the first training batch.
        fold_bn, skip_fusion_layers, quantize_outputs, verbose: as :func:`amct_torch.prepare_qat`.
        freeze_bn_epoch, freeze_bn_step: freeze the BatchNorm statistics from this epoch / global step on.
        freeze_quantizers_epoch, freeze_quantizers_step: stop learning the ranges from this epoch / step on.
        log_ranges: log every learned range at the end of each training epoch.
        export_path: file prefix (``out/model``) of an :func:`amct_torch.export` at the end of fit.
        export_kwargs: more arguments for that export, e.g. ``{"input_names": ["x"], "dynamic_axes":
            {"x": {0: "batch"}}}`` for a model that takes any batch size.
    """

    pipeline_rank = 30  # fake-quant comes last in a weight pipeline

    def __init__(self, config: Union[QatConfig, Targeting, dict[str, Any], None] = None, *, attr: str = "model",
                 example_inputs: Any = None, fold_bn: bool = True, skip_fusion_layers: tuple[str, ...] = (),
                 quantize_outputs: str = "auto", freeze_bn_epoch: Optional[int] = None,
                 freeze_bn_step: Optional[int] = None, freeze_quantizers_epoch: Optional[int] = None,
                 freeze_quantizers_step: Optional[int] = None, log_ranges: bool = True,
                 export_path: Union[str, os.PathLike, None] = None, export_kwargs: Optional[dict[str, Any]] = None,
                 verbose: bool = False):
        if quantize_outputs not in ("auto", "none"):
            raise ValueError(f"QuantizationAwareTraining.quantize_outputs: got {quantize_outputs!r}; "
                             "allowed: 'auto' or 'none'")
        for name, value in (("freeze_bn_epoch", freeze_bn_epoch), ("freeze_bn_step", freeze_bn_step),
                            ("freeze_quantizers_epoch", freeze_quantizers_epoch),
                            ("freeze_quantizers_step", freeze_quantizers_step)):
            _check_schedule(name, value)
        self.config = parse_config(config, QatConfig, "QuantizationAwareTraining")
        self.attr = attr
        self.example_inputs = example_inputs
        self.fold_bn, self.skip_fusion_layers, self.quantize_outputs = fold_bn, tuple(skip_fusion_layers), quantize_outputs
        self.freeze_bn_epoch, self.freeze_bn_step = freeze_bn_epoch, freeze_bn_step
        self.freeze_quantizers_epoch, self.freeze_quantizers_step = freeze_quantizers_epoch, freeze_quantizers_step
        self.log_ranges = log_ranges
        self.export_path = export_path
        self.export_kwargs = dict(export_kwargs or {})
        self.verbose = verbose
        #: what has been frozen so far (in checkpoints)
        self.bn_frozen = False
        self.quantizers_frozen = False
        #: files written by the export at the end of fit, by kind
        self.exported: dict[str, Path] = {}
        self._module: L.LightningModule | None = None
        self._sanity: dict[str, tuple[dict, nn.Module]] = {}

    # -- preparing -----------------------------------------------------------------------------
    def _options(self) -> dict[str, Any]:
        return {"attr": self.attr, "fold_bn": self.fold_bn, "skip_fusion_layers": list(self.skip_fusion_layers),
                "quantize_outputs": self.quantize_outputs}

    def prepare(self, pl_module: L.LightningModule, inputs: Any, *, verbose: bool = False) -> nn.Module:
        """Replace ``pl_module.<attr>`` by its QAT-prepared copy (what ``setup`` does); returns it."""
        model = network(pl_module, self.attr, "QuantizationAwareTraining")
        prepared = prepare_qat(model, self.config, inputs, fold_bn=self.fold_bn,
                               skip_fusion_layers=self.skip_fusion_layers, quantize_outputs=self.quantize_outputs,
                               verbose=verbose)
        setattr(pl_module, self.attr, prepared)
        self._module = pl_module
        self._apply_frozen()
        return prepared

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        setup_earlier_stages(trainer, pl_module, self)  # pruning and clustering stages go first
        model = network(pl_module, self.attr, "QuantizationAwareTraining")
        if self.example_inputs is None:
            self.example_inputs, _ = example_inputs(trainer, pl_module, None, "QuantizationAwareTraining")
        if qat_quantizers(model):  # prepared already (load_qat_checkpoint, or an earlier fit)
            self._module = pl_module
            rank_zero_info(f"QuantizationAwareTraining: {self.attr} is prepared for QAT already; not preparing again")
        else:
            self.prepare(pl_module, self.example_inputs, verbose=self.verbose and trainer.is_global_zero)
        self._ddp_unused_parameters(trainer)

    @staticmethod
    def _ddp_unused_parameters(trainer: L.Trainer) -> None:
        from lightning.pytorch.strategies import DDPStrategy

        kwargs = getattr(trainer.strategy, "_ddp_kwargs", None) if isinstance(trainer.strategy, DDPStrategy) else None
        if kwargs is not None and not kwargs.get("find_unused_parameters", False):
            kwargs["find_unused_parameters"] = True
            rank_zero_info("QuantizationAwareTraining: DDP runs with find_unused_parameters=True (the learned "
                           "ranges get no gradient while they are initialised, nor once frozen)")

    # -- the sanity check leaves uninitialised ranges alone --------------------------------------
    def on_sanity_check_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        model = network(pl_module, self.attr, "QuantizationAwareTraining")
        self._sanity = {name: (copy.deepcopy(q.state_dict()), copy.deepcopy(q.calibrator))
                        for name, q in model.named_modules()
                        if isinstance(q, LearnedActivationQuantizer) and not bool(q.calibrated)}

    def on_sanity_check_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        model = network(pl_module, self.attr, "QuantizationAwareTraining")
        for name, (state, calibrator) in self._sanity.items():
            q = model.get_submodule(name)
            q.calibrator = calibrator
            q.load_state_dict(state)
        self._sanity = {}

    # -- schedule --------------------------------------------------------------------------------
    def _apply_frozen(self) -> None:
        model = None if self._module is None else getattr(self._module, self.attr, None)
        if model is None:
            return
        if self.bn_frozen:
            freeze_bn_stats(model)
        if self.quantizers_frozen:
            freeze_quantizers(model)

    def _schedule(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        model = network(pl_module, self.attr, "QuantizationAwareTraining")
        epoch, step = trainer.current_epoch, trainer.global_step
        if not self.bn_frozen and _due(self.freeze_bn_epoch, self.freeze_bn_step, epoch, step):
            n = freeze_bn_stats(model)
            self.bn_frozen = True
            rank_zero_info(f"QuantizationAwareTraining: froze the statistics of {n} folded BatchNorms "
                           f"(epoch {epoch}, step {step})")
        if not self.quantizers_frozen and _due(self.freeze_quantizers_epoch, self.freeze_quantizers_step, epoch, step):
            n = freeze_quantizers(model)
            self.quantizers_frozen = True
            rank_zero_info(f"QuantizationAwareTraining: froze {n} quantizers (epoch {epoch}, step {step})")

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._module = pl_module
        self._apply_frozen()  # requires_grad is not in the state_dict: applied again after a restore

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int) -> None:
        self._schedule(trainer, pl_module)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not self.log_ranges:
            return
        model = network(pl_module, self.attr, "QuantizationAwareTraining")
        metrics = {metric_name(f"qat/{path}/{key}"): float(value)
                   for path, values in learned_ranges(model).items() for key, value in values.items()}
        if metrics:
            pl_module.log_dict(metrics, on_step=False, on_epoch=True, sync_dist=True, batch_size=1)

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.export_path is None or not trainer.is_global_zero:
            return
        model = network(pl_module, self.attr, "QuantizationAwareTraining")
        self.exported = export_model(model, self.export_path, self.example_inputs, "QuantizationAwareTraining",
                                     **self.export_kwargs)
        rank_zero_info("QuantizationAwareTraining: exported " + ", ".join(str(p) for p in self.exported.values()))

    # -- checkpoints -----------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {"version": _STATE_VERSION, "config": self.config.to_dict(), "options": self._options(),
                "bn_frozen": self.bn_frozen, "quantizers_frozen": self.quantizers_frozen,
                "example_inputs": detached(self.example_inputs)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        saved = parse_config(state_dict["config"], QatConfig, "QuantizationAwareTraining")
        if saved.to_dict() != self.config.to_dict() or state_dict["options"] != self._options():
            rank_zero_warn("QuantizationAwareTraining: the checkpoint was trained with another config or options "
                           f"(saved: {state_dict['config']}, {state_dict['options']}); the model loaded, "
                           "training goes on with the callback's own")
        self.bn_frozen = bool(state_dict["bn_frozen"])
        self.quantizers_frozen = bool(state_dict["quantizers_frozen"])
        if state_dict.get("example_inputs") is not None:
            self.example_inputs = state_dict["example_inputs"]
        self._apply_frozen()

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        path = trainer.ckpt_path  # a checkpoint that did not load into the network prepared here: say why
        if not (path and isinstance(exception, RuntimeError) and "state_dict" in str(exception)):
            return
        try:
            state = _callback_state(torch.load(os.fspath(path), map_location="cpu", weights_only=True), str(path))
        except Exception:  # noqa: BLE001 - no hint to give; Lightning's own error stands
            return
        if state["config"] != self.config.to_dict() or state["options"] != self._options():
            rank_zero_warn(f"QuantizationAwareTraining: {path} was trained with config {state['config']} and "
                           f"options {state['options']}, but this callback prepared the network with "
                           f"{self.config.to_dict()} and {self._options()}: resume with the checkpoint's arguments")

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> "QuantizationAwareTraining":
        """The callback a checkpoint's saved state describes (config, options, frozen flags, example input)."""
        opts = state["options"]
        cb = cls(state["config"], attr=opts["attr"], example_inputs=state.get("example_inputs"),
                 fold_bn=opts["fold_bn"], skip_fusion_layers=tuple(opts["skip_fusion_layers"]),
                 quantize_outputs=opts["quantize_outputs"])
        cb.bn_frozen, cb.quantizers_frozen = bool(state["bn_frozen"]), bool(state["quantizers_frozen"])
        return cb


def _callback_state(checkpoint: dict[str, Any], path: str) -> dict[str, Any]:
    callbacks = checkpoint.get("callbacks") or {}
    states = [v for k, v in callbacks.items() if str(k).split("{", 1)[0] == QuantizationAwareTraining.__qualname__]
    if len(states) != 1:
        found = ", ".join(map(str, callbacks)) or "none"
        raise ValueError(f"{path}: expected the state of one QuantizationAwareTraining callback in the checkpoint, "
                         f"found {len(states)} (callback states in it: {found}). Checkpoints saved with "
                         "save_weights_only=True carry no callback state.")
    return states[0]


def load_qat_checkpoint(module: L.LightningModule, ckpt_path: str | os.PathLike, *, map_location: Any = "cpu",
                        strict: bool = True, weights_only: bool = True) -> L.LightningModule:
    """Load a checkpoint saved during QAT into a fresh LightningModule holding the float network.

    Reads the :class:`QuantizationAwareTraining` state from the checkpoint, prepares ``module.<attr>`` the
    same way (config, options, example input), applies what had been frozen, then loads the checkpoint's
    ``state_dict``: the module computes exactly what it computed when the checkpoint was saved.

    Example::

        task = reference_task("resnet_digits", model=pretrained("resnet_digits"))
        load_qat_checkpoint(task, "checkpoints/last.ckpt")
        amct_torch.export(task.model.eval(), "out/resnet_qat", x)
    """
    checkpoint = torch.load(os.fspath(ckpt_path), map_location=map_location, weights_only=weights_only)
    callback = QuantizationAwareTraining.from_state(_callback_state(checkpoint, os.fspath(ckpt_path)))
    model = network(module, callback.attr, "load_qat_checkpoint")
    if not qat_quantizers(model):
        callback.prepare(module, callback.example_inputs)
    module.load_state_dict(checkpoint["state_dict"], strict=strict)
    callback._apply_frozen()
    return module

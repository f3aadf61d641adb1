"""``PostTrainingQuantization``: the quantized model's metrics next to the fp32 ones, in the same loop.

The callback schedules :func:`amct_torch.quantize` and :func:`amct_torch.calibrate`; it holds no algorithm.

When a validation or test loop starts (``trainer.validate``/``trainer.test``, and every validation
during ``trainer.fit`` unless ``during_fit=False``; never the sanity check), the current network
``pl_module.<attr>`` is quantized (a copy) and calibrated on ``num_batches`` training batches. The loop
itself runs unchanged on the fp32 network, so the module's own metrics (``val_acc``) stay the fp32 ones
and ``ModelCheckpoint``/``EarlyStopping`` keep monitoring what they monitored. Next to each evaluation
step, the module's own step runs again on a *shadow* copy of the LightningModule that holds the quantized
network (its own metric objects; nothing of the module is changed), and at the epoch end its results are
logged with a suffix: ``val_acc_quant`` next to ``val_acc``. ``metrics`` keeps both.

The quantized copy stays available as ``quantized_model``; with ``export_path`` it is exported at the end
of fit (quantized from the final weights) or of ``trainer.validate``/``trainer.test``.

Under DDP every rank calibrates its own copy on the training batches it reads (the training loader as
the datamodule builds it, without a distributed sampler).

Example::

    ptq = PostTrainingQuantization(QuantConfig(activation_calibrator="hfmg"), num_batches=4)
    trainer = L.Trainer(callbacks=[ptq])
    trainer.validate(task, datamodule)       # logs val_acc (fp32) and val_acc_quant
"""

from __future__ import annotations

import copy
import inspect
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, Optional, Union

import lightning as L
import torch
import torch.nn as nn
from lightning.fabric.utilities.apply_func import move_data_to_device
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info
from lightning.pytorch.utilities.data import extract_batch_size
from torchmetrics import Metric

from ..config import QuantConfig, Targeting
from ..quant import calibrate, quantize
from ._common import batches_on, device_of, example_inputs, export_model, network, parse_config, train_loader

__all__ = ["PostTrainingQuantization"]

_REDUCE = {"mean": "mean", "sum": "sum", "max": "max", "min": "min",
           torch.mean: "mean", torch.sum: "sum", torch.max: "max", torch.min: "min"}


class _Recorder:
    """Stands in for ``LightningModule.log`` on the shadow module and reduces what it logs over an epoch.

    Metric objects are computed (and reset) at the end; plain values are reduced with their ``reduce_fx``
    (``mean`` weighted by the batch size, ``sum``, ``max``, ``min``), as Lightning does.
    """

    def __init__(self) -> None:
        self.metrics: dict[str, Metric] = {}
        self.values: dict[str, list] = {}
        self.batch_size = 1
        self.suffix = ""

    def log(self, name: str, value: Any, *args: Any, reduce_fx: Any = "mean", batch_size: int | None = None,
            **kwargs: Any) -> None:
        name = name + self.suffix
        if isinstance(value, Metric):
            self.metrics[name] = value
            return
        if reduce_fx not in _REDUCE:
            raise ValueError(f"PostTrainingQuantization: {name!r} is logged with reduce_fx={reduce_fx!r}; "
                             "allowed for the quantized evaluation: mean, sum, max, min")
        weight = float(batch_size if batch_size is not None else self.batch_size)
        self.values.setdefault(name, [_REDUCE[reduce_fx]]).append((float(value), weight))

    def log_dict(self, dictionary: Mapping[str, Any], *args: Any, **kwargs: Any) -> None:
        for name, value in dictionary.items():
            self.log(name, value, *args, **kwargs)

    def results(self) -> dict[str, float]:
        out = {}
        for name, metric in self.metrics.items():
            out[name] = float(metric.compute())
            metric.reset()
        for name, (reduce, *pairs) in self.values.items():
            vals = [v for v, _ in pairs]
            if reduce == "mean":
                total = sum(w for _, w in pairs)
                out[name] = sum(v * w for v, w in pairs) / total if total else float("nan")
            else:
                out[name] = {"sum": sum, "max": max, "min": min}[reduce](vals)
        return out


class _Shadow:
    """A copy of the LightningModule around the quantized network, running the module's own evaluation hooks."""

    def __init__(self, pl_module: L.LightningModule, fp32: nn.Module, quantized: nn.Module, trainer: L.Trainer,
                 stage: str):
        self.module = copy.deepcopy(pl_module, memo={id(fp32): quantized})  # everything but the network is copied
        self.module.trainer = trainer
        self.recorder = _Recorder()
        self.module.log, self.module.log_dict = self.recorder.log, self.recorder.log_dict
        self.module.eval()
        self.stage = stage
        self.step = getattr(self.module, f"{stage}_step")
        self.takes_index = "dataloader_idx" in inspect.signature(self.step).parameters
        getattr(self.module, f"on_{stage}_epoch_start")()

    def run(self, batch: Any, batch_idx: int, dataloader_idx: int, num_dataloaders: int) -> None:
        try:
            self.recorder.batch_size = extract_batch_size(batch)
        except Exception:  # noqa: BLE001 - Lightning falls back the same way
            self.recorder.batch_size = 1
        self.recorder.suffix = f"/dataloader_idx_{dataloader_idx}" if num_dataloaders > 1 else ""
        kwargs = {"dataloader_idx": dataloader_idx} if self.takes_index else {}
        self.step(batch, batch_idx, **kwargs)

    def finish(self) -> dict[str, float]:
        self.recorder.suffix = ""
        getattr(self.module, f"on_{self.stage}_epoch_end")()
        return self.recorder.results()


class PostTrainingQuantization(Callback):
    """Quantize and calibrate a copy of ``pl_module.<attr>`` at evaluation time; log its metrics too.

    Args:
        config: a :class:`~amct_torch.QuantConfig`, a :class:`~amct_torch.Targeting` of them, or a plain
            dict of either. Default: ``QuantConfig()`` (INT8, IFMR activations, per-channel ARQ weights).
        num_batches: calibration batches (default: the largest ``batch_num`` of the config).
        attr: the LightningModule attribute holding the network.
        example_inputs: inputs for graph capture and export (default: ``example_input_array``, else the
            first sample of the first training batch).
        fold_bn, skip_fusion_layers, quantize_outputs, verbose: as :func:`amct_torch.quantize`.
        calibration_data: an iterable of batches to calibrate on (default: the training dataloader).
        during_fit: also evaluate the quantized copy at every validation during ``fit``.
        suffix: appended to the module's metric names for the quantized ones.
        export_path: file prefix of an :func:`amct_torch.export` of the quantized copy at the end of fit,
            validate or test (global rank 0).
    """

    def __init__(self, config: Union[QuantConfig, Targeting, dict[str, Any], None] = None,
                 num_batches: Optional[int] = None, *, attr: str = "model", example_inputs: Any = None,
                 fold_bn: bool = True, skip_fusion_layers: tuple[str, ...] = (), quantize_outputs: str = "auto",
                 calibration_data: Optional[Iterable[Any]] = None, during_fit: bool = True, suffix: str = "_quant",
                 export_path: Union[str, os.PathLike, None] = None, verbose: bool = False):
        if num_batches is not None and (not isinstance(num_batches, int) or isinstance(num_batches, bool)
                                        or num_batches < 1):
            raise ValueError(f"PostTrainingQuantization.num_batches: got {num_batches!r}; allowed: None or an int >= 1")
        if not isinstance(suffix, str) or not suffix:
            raise ValueError(f"PostTrainingQuantization.suffix: got {suffix!r}; allowed: a non-empty string")
        if quantize_outputs not in ("auto", "none"):
            raise ValueError(f"PostTrainingQuantization.quantize_outputs: got {quantize_outputs!r}; "
                             "allowed: 'auto' or 'none'")
        self.config = parse_config(config, QuantConfig, "PostTrainingQuantization")
        self.num_batches = num_batches
        self.attr = attr
        self.example_inputs = example_inputs
        self.fold_bn, self.skip_fusion_layers, self.quantize_outputs = fold_bn, tuple(skip_fusion_layers), quantize_outputs
        self.calibration_data = calibration_data
        self.during_fit = during_fit
        self.suffix = suffix
        self.export_path = export_path
        self.verbose = verbose
        #: the latest quantized and calibrated copy
        self.quantized_model: nn.Module | None = None
        #: ``{"validate"|"test": {"fp32": {name: value}, "quantized": {name: value}}}`` of the latest loops
        self.metrics: dict[str, dict[str, dict[str, float]]] = {}
        #: files of the latest export, by kind
        self.exported: dict[str, Path] = {}
        self._quantized_at: int | None = None
        self._results: dict[str, float] = {}
        self._shadow: _Shadow | None = None

    # -- quantize + calibrate --------------------------------------------------------------------
    def quantize_network(self, trainer: L.Trainer, pl_module: L.LightningModule) -> nn.Module:
        """Quantize and calibrate a copy of the current network (kept as ``quantized_model``)."""
        model = network(pl_module, self.attr, "PostTrainingQuantization")
        if self.example_inputs is None:
            self.example_inputs, _ = example_inputs(trainer, pl_module, None, "PostTrainingQuantization")
        device = device_of(model)
        verbose = self.verbose and trainer.is_global_zero
        q = quantize(model, self.config, move_data_to_device(self.example_inputs, device), fold_bn=self.fold_bn,
                     skip_fusion_layers=self.skip_fusion_layers, quantize_outputs=self.quantize_outputs, verbose=verbose)
        data = self.calibration_data if self.calibration_data is not None else train_loader(trainer)
        if data is None:
            raise ValueError("PostTrainingQuantization needs calibration batches: the Trainer has no training "
                             "dataloader (no datamodule, no train_dataloader hook). Pass calibration_data=<batches>.")
        calibrate(q, batches_on(data, device), self.num_batches, progress=False)
        self.quantized_model = q
        self._quantized_at = trainer.global_step
        return q

    # -- evaluation loops ------------------------------------------------------------------------
    def _start(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self._shadow = None
        if trainer.sanity_checking or (trainer.state.fn == "fit" and not self.during_fit):
            return
        fp32 = network(pl_module, self.attr, "PostTrainingQuantization")
        self._shadow = _Shadow(pl_module, fp32, self.quantize_network(trainer, pl_module), trainer, stage)

    def _batch(self, trainer: L.Trainer, batch: Any, batch_idx: int, dataloader_idx: int, loaders: Any) -> None:
        if self._shadow is not None:
            n = len(loaders) if isinstance(loaders, (list, tuple)) else 1
            self._shadow.run(batch, batch_idx, dataloader_idx, n)

    def _epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._shadow is None:
            return
        self._results = self._shadow.finish()
        for name, value in self._results.items():
            pl_module.log(self._quantized_name(name), value, on_step=False, on_epoch=True, sync_dist=True,
                          batch_size=1, add_dataloader_idx=False)

    def _quantized_name(self, name: str) -> str:
        base, sep, idx = name.partition("/dataloader_idx_")
        return base + self.suffix + sep + idx

    def _end(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if self._shadow is None:
            return
        self._shadow = None
        logged = trainer.callback_metrics
        fp32 = {name: float(logged[name]) for name in self._results if name in logged}
        quantized = {name: float(logged[self._quantized_name(name)]) for name in self._results
                     if self._quantized_name(name) in logged}
        self.metrics[stage] = {"fp32": fp32, "quantized": quantized}
        rank_zero_info(f"PostTrainingQuantization ({stage}): fp32 {fp32}, quantized {quantized}")
        if self.export_path is not None and trainer.state.fn != "fit":
            self._export(trainer)

    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._start(trainer, pl_module, "validation")

    def on_validation_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                                batch_idx: int, dataloader_idx: int = 0) -> None:
        self._batch(trainer, batch, batch_idx, dataloader_idx, trainer.val_dataloaders)

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._epoch_end(trainer, pl_module)

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._end(trainer, pl_module, "validate")

    def on_test_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._start(trainer, pl_module, "test")

    def on_test_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                          batch_idx: int, dataloader_idx: int = 0) -> None:
        self._batch(trainer, batch, batch_idx, dataloader_idx, trainer.test_dataloaders)

    def on_test_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._epoch_end(trainer, pl_module)

    def on_test_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._end(trainer, pl_module, "test")

    # -- export ----------------------------------------------------------------------------------
    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.export_path is None or not trainer.is_global_zero:
            return
        if self.quantized_model is None or self._quantized_at != trainer.global_step:
            self.quantize_network(trainer, pl_module)
        self._export(trainer)

    def _export(self, trainer: L.Trainer) -> None:
        if not trainer.is_global_zero or self.quantized_model is None:
            return
        self.exported = export_model(self.quantized_model, self.export_path, self.example_inputs,
                                     "PostTrainingQuantization")
        rank_zero_info("PostTrainingQuantization: exported " + ", ".join(str(p) for p in self.exported.values()))

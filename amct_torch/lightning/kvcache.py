"""``KVCacheCalibration``: KV-cache calibration during validation, logging perplexity with and without the
quantized cache.

At every validation epoch (not the sanity check; every ``every_n_epochs``) the callback observes the
key/value projections of ``pl_module.<attr>`` on the first ``config.batch_num`` validation batches
(:class:`~amct_torch.kvcache.KVObserver`, hooks removed afterwards), fixes the factors, then runs the
validation batches the trainer ran once more with and without :func:`~amct_torch.kvcache.fake_quant_kv`
(bit-equal to the INT8 cache) and logs ``kv/ppl_fp32``, ``kv/ppl_int8`` and ``kv/ppl_rel`` (relative
change). ``calibration`` holds the last factors; ``record_file`` gets AMCT's ``kv_cache_value`` entries.
Batches are ``(ids, targets)``; the network maps ids to logits (or an output with ``.logits``).

Example::

    kv = KVCacheCalibration(KVCacheConfig(granularity="per_channel"), record_file="out/kv_record.txt")
    L.Trainer(max_epochs=1, callbacks=[kv]).validate(reference_task("gpt_shakespeare"), datamodule)
"""

from __future__ import annotations

import os
from typing import Any, Optional, Union

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback

from ..config.kvcache import KVCacheConfig
from ..kvcache import KVCalibration, KVObserver, fake_quant_kv, kv_projections
from ..zoo.tasks import evaluate_perplexity
from ._common import batches_on, network, parse_config

__all__ = ["KVCacheCalibration"]


class KVCacheCalibration(Callback):
    """Calibrate the KV cache on validation data and log perplexity with and without it (see the module
    docstring). ``config``: a :class:`~amct_torch.config.KVCacheConfig` or a plain dict of one."""

    def __init__(self, config: Union[KVCacheConfig, dict[str, Any], None] = None, *, attr: str = "model",
                 record_file: Optional[Union[str, os.PathLike]] = None, every_n_epochs: int = 1):
        cfg = parse_config(config, KVCacheConfig, "KVCacheCalibration")
        if not isinstance(cfg, KVCacheConfig):
            raise TypeError("KVCacheCalibration: config must be a KVCacheConfig (or its dict); per-layer targeting "
                            "is not supported")
        self.config, self.attr, self.record_file = cfg, attr, record_file
        self.every_n_epochs = every_n_epochs
        self.calibration: KVCalibration | None = None
        self._observer: KVObserver | None = None
        self._batches: list[Any] = []

    def _active(self, trainer: L.Trainer) -> bool:
        return not trainer.sanity_checking and trainer.current_epoch % self.every_n_epochs == 0

    def on_validation_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._batches = []
        if not self._active(trainer):
            return
        model = network(pl_module, self.attr, "KVCacheCalibration")
        tensors = kv_projections(model)
        if not tensors:
            raise ValueError(f"KVCacheCalibration: {type(model).__name__} has no key/value projection (GPT-2's "
                             "c_attn, k_proj/v_proj or key/value layers)")
        self._tensors = {t.name: t for t in tensors}
        self._observer = KVObserver({t.name: self.config for t in tensors}).attach(model, tensors)

    def on_validation_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                                batch_idx: int, dataloader_idx: int = 0) -> None:
        if not self._active(trainer):
            return
        self._batches.append(batch)
        if self._observer is not None and len(self._batches) >= self.config.batch_num:
            self._observer.detach()  # calibrated on the first batch_num batches only

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not self._active(trainer) or self._observer is None:
            return
        self._observer.detach()
        model = network(pl_module, self.attr, "KVCacheCalibration")
        cal = self._observer.calibration(self.config, self._tensors.values(),
                                         min(len(self._batches), self.config.batch_num))
        self.calibration, self._observer = cal, None
        if self.record_file is not None and trainer.is_global_zero:
            cal.write(self.record_file)
        fp32 = self._perplexity(model, pl_module)
        with fake_quant_kv(model, cal):
            int8 = self._perplexity(model, pl_module)
        pl_module.log("kv/ppl_fp32", fp32, sync_dist=True)
        pl_module.log("kv/ppl_int8", int8, sync_dist=True)
        pl_module.log("kv/ppl_rel", int8 / fp32 - 1, sync_dist=True)
        self._batches = []

    def _perplexity(self, model: torch.nn.Module, pl_module: L.LightningModule) -> float:
        if not all(isinstance(b, (tuple, list)) and len(b) == 2 for b in self._batches):
            raise ValueError("KVCacheCalibration: validation batches must be (ids, targets) pairs")
        with torch.no_grad():
            return evaluate_perplexity(model, batches_on(self._batches, pl_module.device))

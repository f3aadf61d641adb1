"""``ONNXExport``: the deployable files of the last or best checkpoint, written at the end of fit.

For a network with quantizers (prepared by :class:`QuantizationAwareTraining`, or by
:func:`amct_torch.quantize` / :func:`amct_torch.prepare_qat` before fitting), :func:`amct_torch.export`
writes ``<dirpath>/<filename>_fake_quant_model.onnx``, ``..._deploy_model.onnx`` and ``..._record.txt``
(all or none). A network without quantizers gets one plain ``<filename>_fp32_model.onnx``, and a
warning says so.

``which="last"`` exports the network as fit leaves it; ``which="best"`` loads the network's weights
from the ``ModelCheckpoint`` callback's ``best_model_path`` into a copy and exports that (the module
keeps its last weights). The export runs on global rank 0 and works on a copy.

Example::

    ckpt = ModelCheckpoint(monitor="val_acc", mode="max")
    L.Trainer(callbacks=[QuantizationAwareTraining(), ckpt, ONNXExport("out", which="best")]).fit(task, dm)
"""

from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import Any, Literal, Optional

import lightning as L
import torch.nn as nn
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.utilities import rank_zero_info

from ._common import example_inputs, export_model, network

__all__ = ["ONNXExport"]


class ONNXExport(Callback):
    """Export ``pl_module.<attr>`` at the end of fit.

    Args:
        dirpath: directory of the files.
        which: ``last`` (the network as fit leaves it) or ``best`` (``ModelCheckpoint.best_model_path``).
        filename: file-name prefix.
        attr: the LightningModule attribute holding the network.
        example_inputs: inputs for the export (default: ``example_input_array``, else the example input a
            :class:`QuantizationAwareTraining` callback captured with, else the first training sample).
        input_names, output_names, dynamic_axes, on_unsupported: as :func:`amct_torch.export`.
    """

    def __init__(self, dirpath: str | os.PathLike, which: Literal["last", "best"] = "last", filename: str = "model", *,
                 attr: str = "model", example_inputs: Any = None, input_names: Optional[list[str]] = None,
                 output_names: Optional[list[str]] = None, dynamic_axes: Optional[dict] = None,
                 on_unsupported: str = "keep_float"):
        if which not in ("last", "best"):
            raise ValueError(f"ONNXExport.which: got {which!r}; allowed: 'last' or 'best'")
        if not isinstance(filename, str) or not filename or os.sep in filename or "/" in filename:
            raise ValueError(f"ONNXExport.filename: got {filename!r}; allowed: a file-name prefix without directories")
        self.dirpath, self.which, self.filename, self.attr = Path(dirpath), which, filename, attr
        self.example_inputs = example_inputs
        self.options = {"input_names": input_names, "output_names": output_names, "dynamic_axes": dynamic_axes,
                        "on_unsupported": on_unsupported}
        #: files written, by kind (``fake_quant``, ``deploy``, ``record``; or ``fp32``)
        self.exported: dict[str, Path] = {}

    def _checkpoint_callback(self, trainer: L.Trainer) -> ModelCheckpoint:
        found = [cb for cb in trainer.callbacks if isinstance(cb, ModelCheckpoint)]
        if not found:
            raise ValueError("ONNXExport(which='best') needs a ModelCheckpoint callback: the Trainer has none "
                             "(enable_checkpointing=False, or fast_dev_run). Add ModelCheckpoint(monitor=...) or "
                             "use which='last'.")
        return found[0]

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage == "fit" and self.which == "best":
            self._checkpoint_callback(trainer)  # fail before training, not after

    def _inputs(self, trainer: L.Trainer, pl_module: L.LightningModule) -> Any:
        if self.example_inputs is None:
            from .qat import QuantizationAwareTraining

            qat = [cb for cb in trainer.callbacks if isinstance(cb, QuantizationAwareTraining) and cb.attr == self.attr]
            if qat and qat[0].example_inputs is not None:
                return qat[0].example_inputs
        inputs, _ = example_inputs(trainer, pl_module, self.example_inputs, "ONNXExport")
        return inputs

    def _best(self, trainer: L.Trainer, model: nn.Module) -> nn.Module:
        ckpt = self._checkpoint_callback(trainer)
        path = ckpt.best_model_path
        if not path:
            raise ValueError("ONNXExport(which='best'): ModelCheckpoint has no best checkpoint (best_model_path is "
                             "empty: nothing was saved, or it has no monitor and save_top_k=0)")
        state = trainer.strategy.load_checkpoint(path)["state_dict"]
        prefix = self.attr + "."
        weights = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
        best = copy.deepcopy(model)
        best.load_state_dict(weights)
        rank_zero_info(f"ONNXExport: exporting the best checkpoint {path}")
        return best

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.is_global_zero:
            return
        model = network(pl_module, self.attr, "ONNXExport")
        if self.which == "best":
            model = self._best(trainer, model)
        self.exported = export_model(model, self.dirpath / self.filename, self._inputs(trainer, pl_module),
                                     "ONNXExport", **self.options)
        rank_zero_info("ONNXExport: wrote " + ", ".join(str(p) for p in self.exported.values()))

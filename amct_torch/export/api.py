"""``amct_torch.export``: the deployable files of a calibrated model, written all or nothing.

    result = amct_torch.export(model, "out/resnet", x)
    result.fake_quant   # out/resnet_fake_quant_model.onnx  (QDQ, runs in ONNX Runtime)
    result.deploy       # out/resnet_deploy_model.onnx      (AscendQuant / int8 / AscendDequant, for ATC)
    result.record       # out/resnet_record.txt             (AMCT record: scale_d, offset_d, scale_w, offset_w)

Nothing is written unless every quantizer is calibrated, and a failure part-way leaves no file behind
(and any existing files untouched): everything goes to temporary names first, then is renamed.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import onnx
import torch.nn as nn

from ..config.record import Record, write_record
from ..quant.ptq import check_calibrated, quant_layers, weight_quantizer
from ..quant.quantizers import ActivationQuantizer
from .deploy import DeployReport, qdq_to_deploy
from .files import write_all
from .onnx_qdq import export_qdq_model

__all__ = ["export", "ExportResult", "record_of"]


@dataclass
class ExportResult:
    fake_quant: Path
    deploy: Path
    record: Path
    deploy_report: DeployReport
    fake_quant_model: onnx.ModelProto
    deploy_model: onnx.ModelProto

    def sizes(self) -> dict[str, int]:
        return {k: getattr(self, k).stat().st_size for k in ("fake_quant", "deploy", "record")}

    def __repr__(self) -> str:
        return f"ExportResult(fake_quant={str(self.fake_quant)!r}, deploy={str(self.deploy)!r}, record={str(self.record)!r})"


def record_of(model: nn.Module) -> Record:
    """The AMCT record of a calibrated model: per layer ``scale_d``/``offset_d``, ``scale_w``/``offset_w`` and,
    for DMQ-balanced layers, ``tensor_balance_factor``."""
    record = Record()
    for name, layer in quant_layers(model).items():
        fields: dict[str, Any] = {}
        q = layer.input_quantizer
        if isinstance(q, ActivationQuantizer) and q.is_calibrated:
            fields.update(scale_d=float(q.scale), offset_d=int(q.offset), act_type=f"INT{q.bits}")
        stage = weight_quantizer(layer)
        if stage is not None:
            fields.update(scale_w=[float(s) for s in stage.scale], offset_w=[int(o) for o in stage.offset],
                          wts_type=f"INT{stage.bits if stage.bits in (4, 8, 16) else 8}")
        balance = getattr(layer, "input_balance", None)  # DMQ: the activation is divided by these
        if balance is not None:
            fields.update(tensor_balance_factor=[float(f) for f in balance.factor.reshape(-1)])
        record.set_layer(name, **fields)
    return record


def export(model: nn.Module, path_prefix: str | os.PathLike, example_inputs: Any, *, record_file: str | os.PathLike | None = None,
           input_names: list[str] | None = None, output_names: list[str] | None = None, dynamic_axes: dict | None = None,
           on_unsupported: str = "keep_float", int4_weights: str = "auto") -> ExportResult:
    """Write ``<prefix>_fake_quant_model.onnx``, ``<prefix>_deploy_model.onnx`` and the record file.

    Args:
        model: a model prepared by :func:`amct_torch.quantize` and calibrated.
        path_prefix: directory and file-name prefix, e.g. ``out/resnet`` (AMCT's ``save_path``).
        example_inputs: inputs for the ONNX export (tensor, tuple, or dict of keyword inputs).
        record_file: where the record goes (default ``<prefix>_record.txt``).
        input_names, output_names, dynamic_axes: passed to ``torch.onnx.export``.
        on_unsupported: ``keep_float`` keeps layers the Ascend ops cannot express in Q/DQ form in the
            deploy model (they are listed in ``deploy_report``); ``raise`` refuses.
        int4_weights: storage of 4-bit weights in the fake-quant model: ``auto`` (packed INT4 for A4W4
            layers, int8 values for A8W4, ONNX Runtime's fast path), ``packed`` or ``int8``.

    Raises:
        CalibrationError: some quantizer has not seen its ``batch_num`` batches (nothing is written).
    """
    dynamic = [n for n, m in model.named_modules() if getattr(m, "dynamic_config", None) is not None
               or type(m).__name__ in ("DynamicQuantLSTM", "DynamicQuantGRU")]
    if dynamic:
        raise ValueError(f"export: {', '.join(dynamic[:4])}{' ...' if len(dynamic) > 4 else ''} are dynamically "
                         "quantized (activation factors computed at run time): they have no static deploy form; "
                         "use amct_torch.export_dynamic(model, path, x) for onnxruntime")
    check_calibrated(model)
    raw = os.fspath(path_prefix)
    prefix = Path(raw)
    if raw.endswith(("/", os.sep)) or (os.altsep and raw.endswith(os.altsep)) or prefix.name == "" or prefix.is_dir():
        raise ValueError(f"path_prefix: got {str(path_prefix)!r}; allowed: a directory plus a file-name prefix, "
                         "e.g. 'out/model'")
    fake = export_qdq_model(model, example_inputs, input_names=input_names, output_names=output_names,
                            dynamic_axes=dynamic_axes, int4_weights=int4_weights)
    deploy, report = qdq_to_deploy(fake, on_unsupported=on_unsupported)
    record = record_of(model)
    paths = {"fake_quant": prefix.with_name(prefix.name + "_fake_quant_model.onnx"),
             "deploy": prefix.with_name(prefix.name + "_deploy_model.onnx"),
             "record": Path(record_file) if record_file is not None else prefix.with_name(prefix.name + "_record.txt")}
    write_all({paths["fake_quant"]: lambda p: onnx.save(fake, p), paths["deploy"]: lambda p: onnx.save(deploy, p),
               paths["record"]: lambda p: write_record(record, p)})
    return ExportResult(paths["fake_quant"], paths["deploy"], paths["record"], report, fake, deploy)

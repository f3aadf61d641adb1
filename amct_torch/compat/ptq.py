"""AMCT's classic, file-driven PTQ functions, built on the Pythonic API like any user code.

An AMCT script runs unchanged with ``import amct_torch as amct``::

    amct.create_quant_config("./tmp/config.json", model, x, skip_layers=[], batch_num=2)
    cal = amct.quantize_model("./tmp/config.json", "./tmp/modified_model.onnx", "./tmp/record.txt", model, x)
    for _ in range(2):
        cal(next_batch())                      # after batch_num passes the record file holds the factors
    amct.save_model("./tmp/modified_model.onnx", "./tmp/record.txt", "./results/user_model")
    # -> ./results/user_model_fake_quant_model.onnx (ONNX Runtime), ./results/user_model_deploy_model.onnx (ATC)

AMCT's own keyword spellings (``config_defination``, ``modfied_onnx_file``) are the parameter names here,
as in AMCT; the corrected spellings are accepted too.
"""

from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import Any

import onnx
import torch
import torch.nn as nn

from ..config import ConfigError, PerChannel, PerTensor, QuantConfig, Targeting
from ..config.amct_cfg import read_calibration_cfg, resolve_layer_configs
from ..config.amct_json import AmctGlobal, read_quant_json, write_quant_json
from ..config.record import read_record, write_record
from ..export.api import record_of
from ..export.files import write_all
from ..export.deploy import qdq_to_deploy
from ..export.onnx_qdq import export_qdq_model
from ..export.qdq_insert import insert_qdq
from ..quant.ptq import activation_quantizers, calibrate, quant_layers, quantize, weight_quantizer
from .balance import apply_record_balance
from ._layers import linear_like, pick_spelling as _pick, quantizable_layers as _quantizable_layers

__all__ = ["create_quant_config", "quantize_model", "save_model"]


def _amct_default(module: nn.Module, activation_offset: bool, batch_num: int) -> QuantConfig:
    """AMCT's default per-layer config: IFMR activations, ARQ weights, channel-wise except Linear-like layers."""
    return QuantConfig(activation_offset=activation_offset, batch_num=batch_num,
                       weight_granularity=PerTensor() if linear_like(module) else PerChannel())


def create_quant_config(config_file: str | os.PathLike, model: nn.Module, input_data: Any, skip_layers: list[str] | None = None,
                        batch_num: int = 1, activation_offset: bool = True, config_defination: str | None = None, *,
                        config_definition: str | None = None) -> None:
    """Write AMCT's JSON quantization config for ``model`` (overwrites ``config_file``).

    With ``config_defination`` (a simplified ``.cfg``), ``skip_layers``, ``batch_num`` and
    ``activation_offset`` are ignored and the cfg decides (override_layer_configs > override_layer_types >
    common_config > global).
    """
    config_defination = _pick(config_definition, config_defination, "config_definition")
    layers = _quantizable_layers(model, input_data)
    if config_defination is not None:
        cfg = read_calibration_cfg(config_defination)
        settings, per_layer = resolve_layer_configs(cfg, {n: type(m).__name__ for n, m in layers.items()})
    else:
        skip = list(skip_layers or [])
        unknown = [s for s in skip if s not in layers]
        if unknown:
            raise ConfigError("create_quant_config skip_layers", unknown,
                              f"names of quantizable layers ({', '.join(layers)})")
        settings = AmctGlobal(batch_num=batch_num, activation_offset=activation_offset)
        per_layer = {n: None if n in skip else _amct_default(m, activation_offset, batch_num) for n, m in layers.items()}
    write_quant_json(config_file, settings, per_layer)


class _RecordWriter:
    """Forward hook of the calibration model: once every quantizer is calibrated, write the record file."""

    def __init__(self, record_file: Path):
        self.record_file = record_file
        self.written = False

    def __call__(self, model: nn.Module, args: Any, output: Any) -> None:
        if self.written:
            return
        if all(q.is_calibrated for q in activation_quantizers(model).values()):
            write_record(record_of(model), self.record_file)
            self.written = True


class _FrozenWeight(nn.Module):
    """A fixed weight (the fake-quantized values) standing in for a pipeline in the modified ONNX."""

    def __init__(self, value: torch.Tensor):
        super().__init__()
        self.register_buffer("value", value.detach().clone())

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return self.value


def _write_modified_onnx(model: nn.Module, path: Path, input_data: Any, input_names: Any, output_names: Any,
                         dynamic_axes: Any) -> None:
    """The BN-folded float model, layers named by module path, weights already quantized (ARQ/AdaRound)."""
    float_model = copy.deepcopy(model)
    for layer in quant_layers(float_model).values():
        layer.input_quantizer = None
        if layer.weight_pipeline is not None and weight_quantizer(layer) is not None:
            with torch.no_grad():
                value = layer.effective_weight()
            layer.weight_pipeline = type(layer.weight_pipeline)([_FrozenWeight(value)])
    proto = export_qdq_model(float_model, input_data, input_names=input_names, output_names=output_names,
                             dynamic_axes=dynamic_axes)
    write_all({path: lambda p: onnx.save(proto, p)})


def quantize_model(config_file: str | os.PathLike, modfied_onnx_file: str | os.PathLike | None = None,
                   record_file: str | os.PathLike | None = None, model: nn.Module | None = None, input_data: Any = None,
                   input_names: list[str] | None = None, output_names: list[str] | None = None,
                   dynamic_axes: dict | None = None, *, modified_onnx_file: str | os.PathLike | None = None) -> nn.Module:
    """Return the calibration model; after ``batch_num`` forward passes it writes ``record_file``.

    Writes ``modfied_onnx_file`` (the BN-folded model, for :func:`save_model`). AdaRound layers learn their
    rounding here from ``input_data``, as AMCT does. ``tensor_balance_factor`` lists already in
    ``record_file`` (from :func:`quantize_preprocess`) balance their layers first (DMQ).
    """
    modfied_onnx_file = _pick(modified_onnx_file, modfied_onnx_file, "modified_onnx_file")
    if modfied_onnx_file is None or record_file is None or model is None or input_data is None:
        raise TypeError("quantize_model(config_file, modfied_onnx_file, record_file, model, input_data, ...): "
                        "all five are required")
    settings, per_layer = read_quant_json(config_file)
    targeting = Targeting(None, module_name=per_layer)
    cal = quantize(model, targeting, input_data, fold_bn=settings.do_fusion, skip_fusion_layers=settings.skip_fusion_layers,
                   quantize_outputs="none")
    missing = [n for n, c in per_layer.items() if c is not None and n not in cal.amct_plan.wrapped()]
    if missing:
        raise ConfigError(f"{Path(config_file).name}: layers", missing,
                          "quantizable layers of this model (see create_quant_config); "
                          + "; ".join(f"{n}: {cal.amct_plan.skipped().get(n, 'not found')}" for n in missing))
    apply_record_balance(cal, record_file)  # DMQ factors written by quantize_preprocess, if any
    ada = [n for n, m in quant_layers(cal).items() if type(weight_quantizer(m)).__name__ == "AdaRoundWeightQuantizer"]
    if ada:
        _adaround_from_input(cal, input_data)
    _write_modified_onnx(cal, Path(modfied_onnx_file), input_data, input_names, output_names, dynamic_axes)
    Path(record_file).parent.mkdir(parents=True, exist_ok=True)
    Path(record_file).write_text("")
    cal.register_forward_hook(_RecordWriter(Path(record_file)))
    return cal


def _adaround_from_input(model: nn.Module, input_data: Any) -> None:
    """Learn AdaRound rounding on ``input_data`` without consuming the user's calibration batches."""
    probe = copy.deepcopy(model)
    for q in activation_quantizers(probe).values():
        q.batch_num = 1
    data = [input_data if not isinstance(input_data, tuple) else input_data[0]]
    calibrate(probe, data, progress=False)
    for name, layer in quant_layers(model).items():
        src = weight_quantizer(quant_layers(probe)[name])
        dst = weight_quantizer(layer)
        if hasattr(dst, "round_up"):
            dst.round_up.copy_(src.round_up)
            dst.optimized.fill_(True)


def save_model(modfied_onnx_file: str | os.PathLike | None = None, record_file: str | os.PathLike | None = None,
               save_path: str | None = None, *, modified_onnx_file: str | os.PathLike | None = None) -> None:
    """Write ``<save_path>_fake_quant_model.onnx`` and ``<save_path>_deploy_model.onnx`` from the files alone.

    Refuses (writing nothing) when the record is empty or misses a layer: run ``batch_num`` calibration
    passes through the model :func:`quantize_model` returned first.
    """
    modfied_onnx_file = _pick(modified_onnx_file, modfied_onnx_file, "modified_onnx_file")
    if modfied_onnx_file is None or record_file is None or save_path is None:
        raise TypeError("save_model(modfied_onnx_file, record_file, save_path): all three are required")
    record = read_record(record_file)
    if not record.layers:
        raise RuntimeError(f"{record_file} holds no quantization factors: run batch_num forward passes through the "
                           "model quantize_model returned before save_model; nothing was written")
    model = onnx.load(os.fspath(modfied_onnx_file))
    fake = insert_qdq(model, record)
    deploy, _ = qdq_to_deploy(fake)
    prefix = Path(save_path)
    write_all({prefix.with_name(prefix.name + "_fake_quant_model.onnx"): lambda p: onnx.save(fake, p),
               prefix.with_name(prefix.name + "_deploy_model.onnx"): lambda p: onnx.save(deploy, p)})

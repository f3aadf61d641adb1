"""AMCT's ``quantize_preprocess``: the DMQ balancer's statistics pass, on :mod:`amct_torch.quant.balance`.

    amct.create_quant_config("./tmp/config.json", model, x, config_defination="dmq.cfg")   # dmq_balancer {...}
    pre = amct.quantize_preprocess("./tmp/config.json", "./tmp/record.txt", model, x)
    pre(x)                                   # writes tensor_balance_factor per balanced layer to the record
    cal = amct.quantize_model("./tmp/config.json", "./tmp/modified_model.onnx", "./tmp/record.txt", model, x)
    ...                                      # quantize_model reads the factors and balances before quantizing

Layers whose config has ``dmq_balancer_param`` get a balance. Every forward pass of the returned model
adds to the running ``max |X_j|`` per input channel and then *rewrites* each layer's
``tensor_balance_factor`` in the record (``s_j = max|X_j|^a / max|W_j|^(1-a)`` over all passes so far).
AMCT asks for exactly one pass because its record appends a new factor list per pass (two passes break
the later steps); here any number of passes gives one list per layer, from all of them. Other fields of
an existing record are kept.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch.nn as nn

from ..config import ConfigError, QuantConfig, Targeting
from ..config.amct_cfg import read_calibration_cfg, resolve_layer_configs
from ..config.amct_json import read_quant_json
from ..config.record import Record, read_record, write_record
from ..quant.balance import balance_factors, balanced_layers, finalize_balance, prepare_balance, set_balance_factors
from ._layers import quantizable_layers

__all__ = ["quantize_preprocess", "apply_record_balance"]


def _read_config(config_file: str | os.PathLike, model: nn.Module, input_data: Any):
    """``(settings, {layer: QuantConfig | None})`` from AMCT's JSON config or a simplified ``.cfg``."""
    text = Path(config_file).read_text(encoding="utf-8")
    try:
        json.loads(text)
    except ValueError:
        cfg = read_calibration_cfg(config_file)
        layers = quantizable_layers(model, input_data)
        return resolve_layer_configs(cfg, {n: type(m).__name__ for n, m in layers.items()})
    return read_quant_json(config_file)


def _read_record_or_empty(path: Path) -> Record:
    if not path.is_file() or not path.read_text(encoding="utf-8").strip():
        return Record()
    return read_record(path)


class _FactorWriter:
    """Forward hook: recompute every layer's factors from the running maxima; rewrite the record."""

    def __init__(self, record_file: Path):
        self.record_file = record_file
        self.passes = 0

    def __call__(self, model: nn.Module, args: Any, output: Any) -> None:
        self.passes += 1
        layers = balanced_layers(model)
        for layer in layers.values():
            finalize_balance(layer)
            layer.input_balance.observing = True  # the next pass keeps accumulating the maxima
        record = _read_record_or_empty(self.record_file)
        for name, factor in balance_factors(model).items():
            record.set_layer(name, tensor_balance_factor=factor)  # replaces the list, never appends
        write_record(record, self.record_file)


def quantize_preprocess(config_file: str | os.PathLike, record_file: str | os.PathLike, model: nn.Module,
                        input_data: Any) -> nn.Module:
    """Return the balancer's statistics model; each forward pass (re)writes ``tensor_balance_factor``.

    Args:
        config_file: AMCT's JSON config (from :func:`create_quant_config`) or a simplified ``.cfg``; layers
            with ``dmq_balancer_param`` (``dmq_balancer { migration_strength }``) are balanced.
        record_file: the record file the factors go to (other layers' fields in it are kept).
        model: the float model (not changed).
        input_data: example inputs (graph capture, BN folding as ``do_fusion`` says).

    The returned model computes what ``model`` computes. Then call :func:`quantize_model` with the same
    ``record_file``.
    """
    settings, per_layer = _read_config(config_file, model, input_data)
    dmq = {n: c for n, c in per_layer.items() if isinstance(c, QuantConfig) and c.dmq_balancer_param is not None}
    if not dmq:
        raise ConfigError(f"{Path(config_file).name}", "no layer with dmq_balancer_param",
                          "a config whose layers set dmq_balancer_param (.cfg: dmq_balancer { migration_strength: 0.5 })")
    pre = prepare_balance(model, input_data, Targeting(None, module_name=dmq), fold_bn=settings.do_fusion,
                          skip_fusion_layers=settings.skip_fusion_layers)
    missing = [n for n in dmq if n not in balanced_layers(pre)]
    if missing:
        raise ConfigError(f"{Path(config_file).name}: layers", missing,
                          "quantizable layers of this model with a weight (see create_quant_config)")
    path = Path(record_file)
    path.parent.mkdir(parents=True, exist_ok=True)
    pre.register_forward_hook(_FactorWriter(path))
    return pre


def apply_record_balance(model: nn.Module, record_file: str | os.PathLike) -> dict[str, list[float]]:
    """Balance the layers of a prepared (quantized, not yet calibrated) ``model`` with the record's
    ``tensor_balance_factor`` lists; returns them. A record without factors changes nothing."""
    path = Path(record_file)
    record = _read_record_or_empty(path)
    factors = {n: list(r.tensor_balance_factor) for n, r in record.layers.items() if r.tensor_balance_factor}
    modules = dict(model.named_modules())
    unknown = [n for n in factors if n not in modules or not hasattr(modules[n], "weight_pipeline")]
    if unknown:
        raise ConfigError(f"{path.name} tensor_balance_factor layers", unknown,
                          "quantized layers of this model (the record and the config must come from the same model)")
    for name, factor in factors.items():
        set_balance_factors(modules[name], factor, name=name)
    return factors

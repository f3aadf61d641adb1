"""AMCT's classic quantization-aware training (retrain) functions, built on :func:`amct_torch.prepare_qat`.

An AMCT script runs unchanged with ``import amct_torch as amct``::

    amct.create_quant_retrain_config("./tmp/config.json", model, x)        # or config_defination="retrain.cfg"
    qat = amct.create_quant_retrain_model("./tmp/config.json", model, "./tmp/record.txt", x)
    ... train qat as usual (the first batch_num steps initialise the activation clips) ...
    torch.save(qat.state_dict(), "./tmp/qat.pth")
    amct.save_quant_retrain_model("./tmp/config.json", qat, "./tmp/record.txt", "./results/user_model", x)
    # -> ./results/user_model_fake_quant_model.onnx (ONNX Runtime), ./results/user_model_deploy_model.onnx (ATC)
    #    and ./tmp/record.txt (the learned factors)

    # later, from a fresh float model and the checkpoint:
    qat = amct.restore_quant_retrain_model("./tmp/config.json", model, "./tmp/record.txt", x, "./tmp/qat.pth")

The QAT model quantizes layer inputs only (AMCT's placement): each retrained layer gets a learned ULQ
activation quantizer and an ARQ-retrain or ULQ-retrain weight stage; Conv+BatchNorm pairs train folded.
AMCT's ``config_defination`` spelling is the parameter name, as in AMCT; ``config_definition`` works too.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from ..config import ConfigError, QatConfig, Targeting
from ..config.amct_retrain import (RetrainSettings, default_retrain_config, read_retrain_cfg, read_retrain_json,
                                   resolve_retrain_configs, write_retrain_json)
from ..export.api import export
from ..quant import CalibrationError, prepare_qat
from ..quant.ptq import check_calibrated, quant_layers
from ._layers import linear_like, pick_spelling, quantizable_layers

__all__ = ["create_quant_retrain_config", "create_quant_retrain_model", "restore_quant_retrain_model",
           "save_quant_retrain_model"]


def _qat_layers(model: nn.Module, input_data: Any) -> dict[str, nn.Module]:
    """The layers QAT retrains (those with weights: Conv, ConvTranspose, Linear, Conv1D), by module path."""
    layers = quantizable_layers(model, input_data, train=True)
    return {name: m for name, m in layers.items() if getattr(m, "weight", None) is not None}


def _default(module: nn.Module, batch_num: int) -> QatConfig:
    """AMCT's default: channel-wise except Linear-like layers (and grouped ConvTranspose, per tensor in ONNX)."""
    grouped_transpose = isinstance(module, nn.modules.conv._ConvTransposeNd) and module.groups > 1
    return default_retrain_config(type(module).__name__, batch_num,
                                  channel_wise=not (linear_like(module) or grouped_transpose))


def create_quant_retrain_config(config_file: str | os.PathLike, model: nn.Module, input_data: Any,
                                config_defination: str | os.PathLike | None = None, *,
                                config_definition: str | os.PathLike | None = None) -> None:
    """Write AMCT's QAT JSON config for ``model`` (overwrites ``config_file``).

    Every layer QAT supports gets AMCT's default (INT8 ULQ activations, INT8 ARQ-retrain weights,
    channel-wise except Linear, batch_num 1). With ``config_defination`` (a retrain ``.cfg``: path or text)
    the cfg decides: skip lists (unions of ``skip_*`` and ``quant_skip_*``), then
    override_layer_configs > override_layer_types > the global ``retrain_*_quant_config``.
    """
    config_defination = pick_spelling(config_definition, config_defination, "config_definition")
    layers = _qat_layers(model, input_data)
    if config_defination is None:
        settings = RetrainSettings()
        per_layer = {name: _default(m, settings.batch_num) for name, m in layers.items()}
    else:
        cfg = read_retrain_cfg(config_defination)
        settings, per_layer = resolve_retrain_configs(
            cfg, {name: type(m).__name__ for name, m in layers.items()},
            defaults={name: _default(m, cfg.settings().batch_num) for name, m in layers.items()})
    write_retrain_json(config_file, settings, per_layer)


def _unwrap(model: nn.Module) -> nn.Module:
    """The model inside a (Distributed)DataParallel wrapper."""
    if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
        return model.module
    return model


def prepare_layers(model: nn.Module, per_layer: dict[str, QatConfig | None], input_data: Any, config_file: Any,
                   allowed: str) -> nn.Module:
    """``prepare_qat`` of ``model`` with one QatConfig per named layer (quantizers on layer inputs, as AMCT
    places them); a layer the file enables that the model cannot take is an error naming it and why."""
    qat = prepare_qat(_unwrap(model), Targeting(None, module_name=per_layer), input_data, quantize_outputs="none")
    wrapped = set(qat.amct_plan.wrapped())
    missing = [name for name, cfg in per_layer.items() if cfg is not None and name not in wrapped]
    if missing:
        skipped = qat.amct_plan.skipped()
        raise ConfigError(f"{Path(config_file).name}: layers", missing,
                          f"{allowed}; " + "; ".join(f"{n}: {skipped.get(n, 'not found in the model')}" for n in missing))
    return qat


def create_quant_retrain_model(config_file: str | os.PathLike, model: nn.Module, record_file: str | os.PathLike,
                               input_data: Any) -> nn.Module:
    """The trainable QAT model of ``model`` (a copy, in training mode) as ``config_file`` says.

    Quantizers sit on layer inputs only, as in AMCT. Activation clips not given in the config are
    initialised over the first ``batch_num`` forward passes (training steps). ``record_file`` is where
    :func:`save_quant_retrain_model` writes the learned factors; the returned model remembers it
    (``amct_record_file``).
    """
    if config_file is None or model is None or record_file is None or input_data is None:
        raise TypeError("create_quant_retrain_model(config_file, model, record_file, input_data): all four are required")
    _, per_layer = read_retrain_json(config_file)
    qat = prepare_layers(model, per_layer, input_data, config_file, "QAT-able layers of this model (see "
                         "create_quant_retrain_config)")
    qat.amct_record_file = Path(record_file)
    return qat


def _state_dict_of(pth_file: str | os.PathLike, state_dict_name: str | None) -> dict[str, torch.Tensor]:
    try:
        checkpoint = torch.load(pth_file, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise
    except Exception as err:  # unpickling refused: not tensors and plain containers
        raise ValueError(f"pth_file {os.fspath(pth_file)!r}: could not be loaded with torch.load(weights_only=True) "
                         f"({type(err).__name__}: {str(err).splitlines()[0]}); allowed: a file written by "
                         "torch.save(model.state_dict()) or torch.save({name: state_dict, ...})") from None
    if state_dict_name is not None:
        if not isinstance(checkpoint, dict) or state_dict_name not in checkpoint:
            keys = ", ".join(map(str, checkpoint)) if isinstance(checkpoint, dict) else type(checkpoint).__name__
            raise KeyError(f"state_dict_name {state_dict_name!r} is not in {os.fspath(pth_file)!r}; it holds: {keys}")
        checkpoint = checkpoint[state_dict_name]
    if not isinstance(checkpoint, dict) or not all(isinstance(k, str) for k in checkpoint):
        raise ValueError(f"pth_file {os.fspath(pth_file)!r}: got a {type(checkpoint).__name__}; allowed: a state_dict "
                         "(or a dict holding one under state_dict_name)")
    return checkpoint


def restore_quant_retrain_model(config_file: str | os.PathLike, model: nn.Module, record_file: str | os.PathLike,
                                input_data: Any, pth_file: str | os.PathLike, state_dict_name: str | None = None) -> nn.Module:
    """Rebuild the QAT model from the float ``model`` and a checkpoint of the QAT model's ``state_dict``.

    ``config_file`` must be the one the checkpointed model was created with. ``state_dict_name`` picks the
    state dict inside a checkpoint dict (``{"state_dict": ..., "epoch": ...}``); the ``module.`` prefix that
    DistributedDataParallel adds is removed. Keys that do not match raise an error naming them.
    """
    qat = create_quant_retrain_model(config_file, model, record_file, input_data)
    state = _state_dict_of(pth_file, state_dict_name)
    own = qat.state_dict()
    if state and not any(k in own for k in state) and all(k.startswith("module.") for k in state):
        state = {k[len("module."):]: v for k, v in state.items()}
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    if missing or unexpected:
        def shown(keys: list[str]) -> str:
            return ", ".join(keys[:10]) + (f", ... ({len(keys)} in all)" if len(keys) > 10 else "") if keys else "none"
        raise KeyError(f"{os.fspath(pth_file)!r} does not match the QAT model of {os.fspath(config_file)!r}: "
                       f"missing keys: {shown(missing)}; unexpected keys: {shown(unexpected)}. Save the model "
                       "create_quant_retrain_model returned (its state_dict) with the same config file")
    qat.load_state_dict(state)
    return qat


def save_quant_retrain_model(config_file: str | os.PathLike, model: nn.Module, record_file: str | os.PathLike,
                             save_path: str, input_data: Any, input_names: list[str] | None = None,
                             output_names: list[str] | None = None, dynamic_axes: dict | None = None) -> None:
    """Write ``<save_path>_fake_quant_model.onnx``, ``<save_path>_deploy_model.onnx`` and ``record_file``.

    ``model`` is the QAT model (trained); it is exported in eval mode from a copy and is not changed.
    Refuses, writing nothing, before its quantizers are initialised (fewer than ``batch_num`` training
    steps) or when it is not the model ``config_file`` describes.
    """
    model = _unwrap(model)
    _, per_layer = read_retrain_json(config_file)
    layers = quant_layers(model)
    expected = {name for name, cfg in per_layer.items() if cfg is not None}
    if not layers or set(layers) != expected:
        raise ConfigError("save_quant_retrain_model: model layers", sorted(layers),
                          f"the layers {os.fspath(config_file)!r} retrains ({', '.join(sorted(expected))}): pass the "
                          "model create_quant_retrain_model (or restore_quant_retrain_model) returned")
    try:
        check_calibrated(model)
    except CalibrationError as err:
        detail = str(err).split("Uncalibrated: ", 1)[-1].rsplit(". Run", 1)[0]
        raise CalibrationError("the QAT model's quantization factors are not initialised yet; nothing was written. "
                               f"Uninitialised: {detail}. Run at least batch_num training steps (forward passes) "
                               "through the model before save_quant_retrain_model") from None
    export(model, save_path, input_data, record_file=record_file, input_names=input_names,
           output_names=output_names, dynamic_axes=dynamic_axes)

"""AMCT's block-wise (layer-wise) distillation functions, built on :func:`amct_torch.prepare_qat` and
:func:`amct_torch.distill.distill_blockwise`.

An AMCT script runs unchanged::

    amct.create_distill_config("./tmp/config.json", model, x)            # or config_defination="distill.cfg"
    compress_model = amct.create_distill_model("./tmp/config.json", model, x)
    compress_model = amct.distill(model, compress_model, "./tmp/config.json", train_loader, epochs=1, lr=1e-3)
    amct.save_distill_model(compress_model, "./results/user_model", x)
    # -> ./results/user_model_fake_quant_model.onnx, ./results/user_model_deploy_model.onnx, ..._record.txt

* ``create_distill_config`` writes the distillation JSON: every Conv2d and Linear (and transformers'
  ``Conv1D``) layer with AMCT's default (INT8 ULQ activations, INT8 ``arq_distill`` weights,
  channel-wise except Linear) and ``distill_group``: the blocks :func:`~amct_torch.distill.find_blocks`
  finds (residual and transformer blocks as one module path, e.g. ``["layer1.0"]``; layer groups as
  their modules, e.g. ``["conv1", "bn1", "relu"]``) that hold an enabled layer.
* ``create_distill_model`` returns a QAT copy of the model (quantizers on layer inputs, as AMCT places
  them; Conv+BN train folded); the model is not changed.
* ``distill`` trains the compressed model group by group against ``model`` (the float teacher); see
  :func:`distill` for the defaults and what an ``optimizer`` argument means. The activation clips are
  initialised from each group's first ``batch_num`` batches.
* ``save_distill_model`` exports like ``save_quant_retrain_model``.

``DistillSampleBase`` is AMCT's hook for loaders whose samples are not ``(x, y)``: subclass it and pass
an instance as ``sample_instance``.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn as nn

from ..config import ConfigError, QatConfig
from ..config.amct_distill import DistillSettings, read_distill_cfg, read_distill_json, resolve_distill_configs, \
    write_distill_json
from ..config.distill import DistillConfig
from ..distill.blocks import blocks_from_groups, call_order, find_blocks, leaf_modules
from ..distill.blockwise import distill_blockwise
from ..export.api import export
from ..quant import CalibrationError
from ..quant.ptq import check_calibrated, quant_layers
from ._layers import pick_spelling
from .qat import _default, _qat_layers, _unwrap, prepare_layers

__all__ = ["create_distill_config", "create_distill_model", "distill", "save_distill_model", "DistillSampleBase",
           "ModelSingleTensorInput", "DISTILL_TYPES"]

log = logging.getLogger("amct_torch.distill")

#: The layer types AMCT distills (transformers' Conv1D, a Linear with transposed weight, as well)
DISTILL_TYPES = ("Conv2d", "Linear", "Conv1D")


class DistillSampleBase:
    """AMCT's base for reading the model input out of a loader sample: subclass it and implement
    :meth:`get_model_input_data`; pass an instance to :func:`distill` as ``sample_instance``."""

    @staticmethod
    def get_model_input_data(samples: Any) -> Any:
        """The model input of one loader sample: a tensor, a list/tuple of positional inputs (or, here, a
        dict of keyword inputs)."""
        raise NotImplementedError("get_model_input_data needs to be implemented for distill!")


class ModelSingleTensorInput(DistillSampleBase):
    """AMCT's default: the sample itself when it is a tensor, else its first element (``(x, y)`` -> ``x``)."""

    @staticmethod
    def get_model_input_data(samples: Any) -> Any:
        single = samples
        if isinstance(samples, (list, tuple)):
            if len(samples) == 0:
                raise ValueError("the default sample instance got an empty sample; pass a sample_instance whose "
                                 "get_model_input_data returns the model input")
            single = samples[0]
        if not isinstance(single, torch.Tensor):
            raise ValueError(f"the default sample instance found no tensor in a {type(samples).__name__} sample "
                             "(allowed: a tensor or an (x, y) tuple); pass a DistillSampleBase subclass instance "
                             "as sample_instance")
        return single


def _distill_layers(model: nn.Module, input_data: Any) -> dict[str, nn.Module]:
    """The layers AMCT distills (Conv2d, Linear, Conv1D with a QAT wrapper), by module path."""
    return {n: m for n, m in _qat_layers(model, input_data).items() if type(m).__name__ in DISTILL_TYPES}


def _expand(model: nn.Module, input_data: Any, pairs: list[tuple[str, str]], source: str) -> list[list[str]]:
    """A ``.cfg``'s (start, end) groups as module lists: start, the modules called in between, end."""
    names = dict(model.named_modules())
    trace = call_order(model, input_data)
    index = trace.index()
    leaves = [p for p in trace.order if p in set(leaf_modules(model, quantizers=False))]
    out = []
    for i, (start, end) in enumerate(pairs):
        for key, path in (("start_layer_name", start), ("end_layer_name", end)):
            if path not in names or not path:
                raise ConfigError(f"{source}: distill_group[{i}].{key}", path, "a module path of the model")
            if path not in index:
                raise ConfigError(f"{source}: distill_group[{i}].{key}", path, "a module the model's forward calls")
        if index[end] < index[start]:
            raise ConfigError(f"{source}: distill_group[{i}]", [start, end],
                              f"start before end in execution order ('{end}' runs before '{start}')")
        if start == end:
            out.append([start])
            continue
        inner = [p for p in leaves if index[start] < index[p] < index[end]
                 and not p.startswith(start + ".") and not p.startswith(end + ".")]
        out.append([start] + inner + [end])
    return out


def create_distill_config(config_file: str | os.PathLike, model: nn.Module, input_data: Any,
                          config_defination: str | os.PathLike | None = None, *,
                          config_definition: str | os.PathLike | None = None) -> None:
    """Write AMCT's distillation JSON for ``model`` (overwrites ``config_file``).

    Without ``config_defination``: every Conv2d/Linear/Conv1D layer gets AMCT's default (A8W8, ULQ
    activations, ``arq_distill`` weights, channel-wise except Linear-like, batch_num 1), ``group_size``
    1, ``data_dump`` false and the automatically found groups. With it (a distillation ``.cfg``: path or
    text) the cfg decides the globals, the per-layer configs (skip lists, overrides by type, by name) and,
    when it has ``distill_group`` entries, the groups (each ``start_layer_name`` .. ``end_layer_name``
    with the modules called in between).
    """
    config_defination = pick_spelling(config_definition, config_defination, "config_definition")
    model = _unwrap(model)
    layers = _distill_layers(model, input_data)
    if not layers:
        raise ConfigError("create_distill_config: model", type(model).__name__,
                          "a model with layers AMCT distills (" + ", ".join(DISTILL_TYPES) + ")")
    types = {name: type(m).__name__ for name, m in layers.items()}
    if config_defination is None:
        settings = DistillSettings()
        per_layer: dict[str, QatConfig | None] = {name: _default(m, 1) for name, m in layers.items()}
        groups: list[list[str]] = []
    else:
        cfg = read_distill_cfg(config_defination)
        settings, per_layer = resolve_distill_configs(
            cfg, types, defaults={name: _default(m, cfg.settings().batch_num) for name, m in layers.items()})
        groups = _expand(model, input_data, cfg.groups(), cfg.source)
    if not any(c is not None for c in per_layer.values()):
        raise ConfigError("create_distill_config: layers", sorted(per_layer),
                          "at least one layer left enabled (every distillable layer is skipped)")
    enabled = {n for n, c in per_layer.items() if c is not None}
    if groups:
        blocks_from_groups(model, groups, input_data)  # validates: known, disjoint, in execution order
    else:
        groups = [b.group() for b in find_blocks(model, input_data) if enabled.intersection(b.layers)]
    settings = DistillSettings(batch_num=settings.batch_num, group_size=settings.group_size,
                               data_dump=settings.data_dump, distill_group=tuple(tuple(g) for g in groups))
    write_distill_json(config_file, settings, per_layer)


def create_distill_model(config_file: str | os.PathLike, model: nn.Module, input_data: Any) -> nn.Module:
    """The compressed model to distill: a QAT copy of ``model`` (in training mode) as ``config_file`` says.

    Quantizers sit on layer inputs only (AMCT's placement); Conv+BatchNorm pairs train folded. ``model``
    is not changed.
    """
    if config_file is None or model is None or input_data is None:
        raise TypeError("create_distill_model(config_file, model, input_data): all three are required")
    _, per_layer = read_distill_json(config_file)
    student = prepare_layers(model, per_layer, input_data, config_file,
                             "distillable layers of this model (see create_distill_config)")
    student.amct_distill_config = Path(config_file)
    return student


def _check_layers(model: nn.Module, per_layer: dict[str, QatConfig | None], config_file: Any, who: str) -> None:
    layers = quant_layers(model)
    expected = {name for name, cfg in per_layer.items() if cfg is not None}
    if not layers or set(layers) != expected:
        raise ConfigError(f"{who}: model layers", sorted(layers),
                          f"the layers {os.fspath(config_file)!r} distills ({', '.join(sorted(expected))}): pass the "
                          "model create_distill_model returned")


def distill(model: nn.Module, compress_model: nn.Module, config_file: str | os.PathLike, train_loader: Any,
            epochs: int = 1, lr: float = 1e-3, sample_instance: DistillSampleBase | None = None,
            loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
            optimizer: torch.optim.Optimizer | Callable[[list], torch.optim.Optimizer] | None = None) -> nn.Module:
    """Distill ``compress_model`` group by group against ``model``; returns it (trained in place).

    Args:
        model: the float model (the teacher; not changed).
        compress_model: what :func:`create_distill_model` returned.
        config_file: the distillation JSON (its ``distill_group``, ``group_size`` and ``data_dump``).
        train_loader: the data, read once per group and epoch.
        epochs: passes over ``train_loader`` per group.
        lr: learning rate of the default optimizer.
        sample_instance: a :class:`DistillSampleBase` instance whose ``get_model_input_data(sample)`` is the
            model input of a loader sample (default: the sample, or its first element).
        loss: ``loss(student_output, teacher_output)`` (default ``nn.MSELoss()``).
        optimizer: default ``AdamW(lr=lr)`` per group. A torch optimizer instance: per group a new optimizer
            of its class with its hyper-parameters (its ``lr`` included; ``lr`` is then not used) over the
            group's parameters; its own parameters and state are not used. A callable: ``param_groups ->
            Optimizer``.

    Each group trains its weights and learned quantization parameters while the other groups stay fixed;
    its input is what the already distilled groups before it compute (both models run in eval mode: batch
    norm statistics stay as they are, dropout is off). A group whose loss on the loader's first batch is
    higher after training than before gets its parameters back (``DistillConfig.revert_worse``). The
    report (:class:`~amct_torch.distill.DistillReport`) is logged and kept as
    ``compress_model.amct_distill_report``.
    """
    if not isinstance(epochs, int) or isinstance(epochs, bool) or epochs < 1:
        raise ValueError(f"epochs: got {epochs!r}; allowed: an integer >= 1")
    if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not lr > 0:
        raise ValueError(f"lr: got {lr!r}; allowed: a number > 0")
    if sample_instance is None:
        sample_instance = ModelSingleTensorInput()
    elif not isinstance(sample_instance, DistillSampleBase):
        raise TypeError(f"sample_instance: got {type(sample_instance).__name__}; allowed: an instance of a "
                        "DistillSampleBase subclass (amct_torch.compat.distill.DistillSampleBase) or None")
    if loss is not None and not callable(loss):
        raise TypeError(f"loss: got {type(loss).__name__}; allowed: a callable (e.g. torch.nn.MSELoss()) or None")
    settings, per_layer = read_distill_json(config_file)
    student = _unwrap(compress_model)
    _check_layers(student, per_layer, config_file, "distill")
    if not settings.distill_group:
        raise ConfigError(f"{os.fspath(config_file)}: distill_group", [],
                          "a non-empty list of groups (create_distill_config writes them)")
    config = DistillConfig(epochs=epochs, lr=float(lr), group_size=settings.group_size,
                           cache_teacher=settings.data_dump)
    report = distill_blockwise(_unwrap(model), student, train_loader, config,
                               blocks=[list(g) for g in settings.distill_group],
                               loss=nn.MSELoss() if loss is None else loss, optimizer=optimizer,
                               input_fn=sample_instance.get_model_input_data, progress=False)
    student.amct_distill_report = report
    log.info("%s", report)
    return compress_model


def save_distill_model(model: nn.Module, save_path: str, input_data: Any, record_file: str | os.PathLike | None = None,
                       input_names: list[str] | None = None, output_names: list[str] | None = None,
                       dynamic_axes: dict | None = None) -> None:
    """Write ``<save_path>_fake_quant_model.onnx``, ``<save_path>_deploy_model.onnx`` and the record file
    (``record_file``, default ``<save_path>_record.txt``) of the distilled model.

    ``model`` is exported in eval mode from a copy and is not changed. Refuses, writing nothing, when it
    is not a compressed model or its quantizers are not initialised yet (run :func:`distill`, or
    ``batch_num`` forward passes, first).
    """
    model = _unwrap(model)
    if not quant_layers(model):
        raise ConfigError("save_distill_model: model", type(model).__name__,
                          "a compressed model (create_distill_model, then distill)")
    try:
        check_calibrated(model)
    except CalibrationError as err:
        detail = str(err).split("Uncalibrated: ", 1)[-1].rsplit(". Run", 1)[0]
        raise CalibrationError("the distilled model's quantization factors are not initialised yet; nothing was "
                               f"written. Uninitialised: {detail}. Run distill (or batch_num forward passes) first") from None
    export(model, save_path, input_data, record_file=record_file, input_names=input_names,
           output_names=output_names, dynamic_axes=dynamic_axes)

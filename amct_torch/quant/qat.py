"""Quantization-aware training: ``prepare_qat`` makes a model train with quantization in the loop.

    model = amct_torch.prepare_qat(model, QatConfig(weight_bits=4), x)   # learned ranges, BN trained folded
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3)            # sees every learned scale and clip
    ... train as usual; amct_torch.freeze_bn_stats(model) after a few epochs ...
    amct_torch.export(model, "out/model", x)                           # the same two ONNX models as PTQ

``prepare_qat`` copies the model, captures its graph, keeps Conv+BatchNorm pairs as trained-folded units
(``fold_bn``), swaps every targeted layer for its wrapper and attaches a learned activation quantizer on
its input (ULQ or LSQ+, its lower clip pinned at 0 after a ReLU-like producer unless the config says
otherwise) and a retrain weight stage (ARQ-retrain, ULQ-retrain or LSQ). With ``quantize_outputs="auto"``
the tensors around residual adds, concatenations and pools get learned quantizers too, as in PTQ.
Everything learned is created here, in the model's ``state_dict`` and ``parameters()``.
"""

from __future__ import annotations

import copy
from typing import Any, Iterable

import torch
import torch.nn as nn

from ..config import Config, ConfigError, QatConfig, Targeting
from ..cluster.api import quant_granularity_for
from ..graph import capture, fold_batch_norm, swap_layers
from ..nn import CompressedConv, CompressedConvTranspose, CompressedLayer, FoldedBatchNorm
from ..nn.refs import bind_references
from .calibrators import make_calibrator
from .placement import _View, place_quantizers
from .ptq import _groups, quant_layers, refuse_requantizing, weight_quantizer
from .qat_modules import (ArqRetrainWeightQuantizer, LearnedActivationQuantizer, LsqActivationQuantizer,
                          LsqWeightQuantizer, UlqActivationQuantizer, UlqWeightQuantizer)

__all__ = ["prepare_qat", "freeze_bn_stats", "freeze_quantizers", "learned_ranges", "qat_quantizers"]

_WEIGHT_STAGES = {"arq_retrain": ArqRetrainWeightQuantizer, "ulq_retrain": UlqWeightQuantizer, "lsq_plus": LsqWeightQuantizer}
_ACT = {"ulq": UlqActivationQuantizer, "lsq_plus": LsqActivationQuantizer}


def make_learned_quantizer(cfg: QatConfig | None, after_relu: bool) -> LearnedActivationQuantizer | None:
    """The learned activation quantizer ``cfg`` asks for (None for weight-only configs)."""
    if cfg is None or cfg.activation_bits is None:
        return None
    fixed_min = after_relu if cfg.fixed_min is None else cfg.fixed_min
    return _ACT[cfg.activation_algorithm](cfg.activation_bits, not cfg.activation_offset, make_calibrator(cfg),
                                          cfg.batch_num, clip_max=cfg.clip_max, clip_min=cfg.clip_min,
                                          fixed_min=fixed_min)


def _check(name: str, layer: CompressedLayer, cfg: QatConfig) -> None:
    kind = type(layer.module).__name__
    if not layer.has_weight:
        raise ConfigError(f"layer {name!r} ({kind})", "QAT", "a layer with weights (Conv, ConvTranspose, Linear, Conv1D)")
    if isinstance(layer, CompressedConvTranspose) and _groups(layer) > 1 and cfg.weight_granularity.to_plain() == "per_channel":
        raise ConfigError(f"layer {name!r} ({kind}, groups={_groups(layer)}) weight_granularity", "per_channel",
                          "per_tensor (grouped transposed convolutions have no per-axis ONNX form)")


def prepare_qat(model: nn.Module, config: QatConfig | Targeting | None = None, example_inputs: Any = None, *,
                fold_bn: bool = True, skip_fusion_layers: Iterable[str] = (), quantize_outputs: str = "auto",
                inplace: bool = False, verbose: bool = False) -> nn.Module:
    """Prepare ``model`` for quantization-aware training; returns the prepared copy (in training mode).

    Args:
        model: a float model (usually trained).
        config: one :class:`QatConfig` for every supported layer, or a :class:`Targeting` of them.
            Default: A8W8, ULQ activations initialised by IFMR, ARQ-retrain per-channel weights.
        example_inputs: inputs for graph capture.
        fold_bn: train Conv+BatchNorm pairs folded (BN statistics live until :func:`freeze_bn_stats`).
        skip_fusion_layers: conv/BN names (globs) not to fold.
        quantize_outputs: ``auto`` (residual adds, concatenations, pools and layer outputs that reach
            float ops, as PTQ) or ``none`` (layer inputs only, AMCT's placement).
        inplace: modify ``model`` itself.
        verbose: print the plan.
    """
    if quantize_outputs not in ("auto", "none"):
        raise ValueError(f"quantize_outputs: got {quantize_outputs!r}; allowed: 'auto' or 'none'")
    config = QatConfig() if config is None else config
    targeting = config if isinstance(config, Targeting) else Targeting(config)
    if not inplace:
        model = copy.deepcopy(model)
    graph = capture(model, example_inputs)
    folded = []
    if fold_bn:
        model, fold_plan = fold_batch_norm(model, graph=graph, skip=skip_fusion_layers, inplace=True, train=True)
        folded = fold_plan.layers
    pending = {m.conv_path: m for m in model.modules() if isinstance(m, FoldedBatchNorm) and m.conv_path}
    view = _View(model, graph)
    after_relu = set()
    for node in graph.module_nodes():
        calls = graph.calls_of(node.target)
        if len(calls) == 1 and node.inputs and view.is_relu(view.producer(node.inputs[0])):
            after_relu.add(node.target)

    def attach(name: str, layer: CompressedLayer, cfg: Config) -> None:
        if not isinstance(cfg, QatConfig):
            raise TypeError(f"prepare_qat: layer {name!r} got {type(cfg).__name__}; allowed: QatConfig")
        _check(name, layer, cfg)
        refuse_requantizing(name, layer)
        layer.quant_config = cfg
        if name in pending and isinstance(layer, CompressedConv):
            layer.attach_batch_norm(pending.pop(name))
        q = make_learned_quantizer(cfg, name in after_relu)
        if q is not None:
            layer.input_quantizer = q
        with torch.no_grad():
            w = layer.effective_weight().detach()
        granularity, note = quant_granularity_for(layer, cfg.weight_granularity)
        if note:
            notes.append(f"{name}: {note}")
        layer.weight_pipeline.append(_WEIGHT_STAGES[cfg.weight_algorithm](
            w, cfg.weight_bits, granularity, layer.weight_channel_axis, _groups(layer)))
        layer.weight_pipeline[-1].config = cfg

    notes: list[str] = []
    model, plan = swap_layers(model, targeting, graph=graph, attach=attach, inplace=True, title="prepare QAT",
                              reuse_wrapped=True)
    plan.warnings += notes
    for conv_path, bn in pending.items():  # a conv that was not quantized: fold its BN for good
        conv = model.get_submodule(conv_path)
        plan.warnings.append(f"{conv_path} is not quantized: its BatchNorm trains folded without quantization")
        if isinstance(conv, CompressedConv):
            conv.attach_batch_norm(bn)
        else:
            wrapper = CompressedConv(conv)
            wrapper.attach_batch_norm(bn)
            model.set_submodule(conv_path, wrapper)
    if quantize_outputs == "auto":
        layers = quant_layers(model)
        configs = {n: m.quant_config for n, m in layers.items() if isinstance(getattr(m, "quant_config", None), QatConfig)}
        default = targeting.default if isinstance(targeting.default, QatConfig) else next(iter(configs.values()), None)
        place_quantizers(model, graph, plan, layers, configs.get, default, factory=make_learned_quantizer)
    plan.layers = folded + plan.layers
    model.amct_plan = plan
    bind_references(model)  # tied quantizers and folded BNs stay right in DataParallel replicas
    model.train()
    if verbose:
        print(plan)
    return model


def qat_quantizers(model: nn.Module) -> dict[str, nn.Module]:
    """Every learned activation quantizer and retrain weight stage, by module path."""
    kinds = (LearnedActivationQuantizer, ArqRetrainWeightQuantizer, UlqWeightQuantizer, LsqWeightQuantizer)
    return {name: m for name, m in model.named_modules() if isinstance(m, kinds)}


def freeze_bn_stats(model: nn.Module, frozen: bool = True) -> int:
    """Stop (or resume) updating the statistics of BatchNorms trained folded; returns how many.

    From then on the folded conv computes exactly the deployed function (running statistics).
    """
    n = 0
    for m in model.modules():
        if isinstance(m, FoldedBatchNorm):
            m.frozen.fill_(frozen)
            n += 1
    return n


def freeze_quantizers(model: nn.Module, frozen: bool = True) -> int:
    """Fix (or release) every learned range: clips/scales stop learning, ARQ-retrain stops recomputing."""
    n = 0
    for m in qat_quantizers(model).values():
        m.freeze(frozen)
        n += 1
    return n


def learned_ranges(model: nn.Module) -> dict[str, dict[str, float]]:
    """``{path: {scale, offset, lower, upper}}`` of every calibrated activation quantizer (for logging)."""
    from .formulas import qrange

    out = {}
    for name, m in model.named_modules():
        if isinstance(m, LearnedActivationQuantizer) and m.is_calibrated and m.tied_to is None:
            qmin, qmax = qrange(m.bits)
            s, o = float(m.scale), int(m.offset)
            out[name] = {"scale": s, "offset": o, "lower": (qmin - o) * s, "upper": (qmax - o) * s}
    for name, layer in quant_layers(model).items():
        stage = weight_quantizer(layer)
        if stage is not None and stage.scale.numel():
            out[f"{name}.weight"] = {"scale_mean": float(stage.scale.mean()), "scale_max": float(stage.scale.max())}
    return out

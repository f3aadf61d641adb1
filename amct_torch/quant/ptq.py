"""Post-training quantization: ``quantize`` prepares, ``calibrate`` feeds data, ``export`` deploys.

    model = amct_torch.quantize(model, QuantConfig(activation_calibrator="hfmg"), x)
    amct_torch.calibrate(model, loader)              # or just run batch_num forward passes yourself
    amct_torch.export(model, "out/model", x)        # out/model_fake_quant_model.onnx, ..._deploy_model.onnx, ...

``quantize`` copies the model, folds Conv+BN (``fold_bn``), swaps every targeted layer for its wrapper
and attaches, at prepare time, an :class:`ActivationQuantizer` on the input (calibrating) and an ARQ
or AdaRound weight stage. ``model.amct_plan`` holds the plan: every layer, what it got or why not.
"""

from __future__ import annotations

import copy
from typing import Any, Iterable

import torch
import torch.nn as nn

from ..config import Config, ConfigError, PerChannel, PerTensor, QuantConfig, Targeting
from ..cluster.api import quant_granularity_for
from ..graph import capture, fold_batch_norm, swap_layers
from ..nn import CompressedAvgPool, CompressedConvTranspose, CompressedLayer
from ..nn.refs import bind_references
from .adaround import AdaRoundWeightQuantizer, optimize_rounding
from .calibrators import make_calibrator
from .placement import place_quantizers
from .quantizers import ActivationQuantizer, ArqWeightQuantizer, CalibrationError

__all__ = ["quantize", "calibrate", "quant_layers", "activation_quantizers", "weight_quantizer", "check_calibrated", "CalibrationError"]


def _groups(layer: CompressedLayer) -> int:
    return getattr(layer.module, "groups", 1)


def weight_quantizer(layer: CompressedLayer) -> ArqWeightQuantizer | None:
    """The quantization stage of a wrapper's weight pipeline, if any."""
    if layer.weight_pipeline is None:
        return None
    for stage in layer.weight_pipeline:
        if isinstance(stage, ArqWeightQuantizer):
            return stage
    return None


def activation_quantizers(model: nn.Module) -> dict[str, ActivationQuantizer]:
    """Every activation quantizer, keyed ``<layer>.input_quantizer`` / ``<layer>.output_quantizer``."""
    return {name: m for name, m in model.named_modules() if isinstance(m, ActivationQuantizer)}


def quant_layers(model: nn.Module) -> dict[str, CompressedLayer]:
    """Every wrapper in ``model`` that carries a quantizer, by module path."""
    return {name: m for name, m in model.named_modules() if isinstance(m, CompressedLayer)
            and (isinstance(m.input_quantizer, ActivationQuantizer) or weight_quantizer(m) is not None)}


def refuse_requantizing(name: str, layer: CompressedLayer) -> None:
    """A layer an earlier pass already quantized is not quantized again (quantize or prepare once)."""
    weight_only = any(type(s).__name__ == "GroupWeightQuantizer" for s in layer.weight_pipeline or ())
    if weight_quantizer(layer) is not None or layer.input_quantizer is not None or weight_only:
        raise ConfigError(f"layer {name!r}", "already quantized", "a float or pruned/clustered layer (quantize once)")


def _check_layer(name: str, layer: CompressedLayer, cfg: QuantConfig) -> None:
    kind = type(layer.module).__name__
    if cfg.weight_bits in (6, 7) and not isinstance(layer.module, nn.Conv2d):
        raise ConfigError(f"layer {name!r} ({kind}) weight_bits", cfg.weight_bits, "6 and 7 bits only for Conv2d; use 4, 8 or 16")
    if not isinstance(cfg.weight_granularity, (PerTensor, PerChannel)) and layer.has_weight:
        raise ConfigError(f"layer {name!r} ({kind}) weight_granularity", cfg.weight_granularity.to_plain(),
                          "per_tensor or per_channel for static PTQ (per_group is for weight-only quantization)")
    if isinstance(layer, CompressedAvgPool) and cfg.activation_bits is None:
        raise ConfigError(f"layer {name!r} ({kind}) activation_bits", None, "4, 8 or 16 (AvgPool quantizes only its input)")
    if cfg.weight_algorithm == "adaround" and not isinstance(layer.module, (nn.Conv2d, nn.ConvTranspose2d, nn.Linear)):
        raise ConfigError(f"layer {name!r} ({kind}) weight_algorithm", "adaround", "arq (AdaRound: Conv2d, ConvTranspose2d, Linear)")
    if isinstance(layer, CompressedConvTranspose) and _groups(layer) > 1 and isinstance(cfg.weight_granularity, PerChannel):
        raise ConfigError(f"layer {name!r} ({kind}, groups={_groups(layer)}) weight_granularity", "per_channel",
                          "per_tensor (grouped transposed convolutions have no per-axis ONNX form)")


def _attach(name: str, layer: CompressedLayer, cfg: Config) -> None:
    if not isinstance(cfg, QuantConfig):
        raise TypeError(f"quantize: layer {name!r} got {type(cfg).__name__}; allowed: QuantConfig")
    _check_layer(name, layer, cfg)
    refuse_requantizing(name, layer)
    layer.quant_config = cfg
    if cfg.activation_bits is not None:
        layer.input_quantizer = ActivationQuantizer(cfg.activation_bits, not cfg.activation_offset,
                                                    make_calibrator(cfg), cfg.batch_num)
    if layer.has_weight:
        w = layer.effective_weight().detach()
        stage_cls = AdaRoundWeightQuantizer if cfg.weight_algorithm == "adaround" else ArqWeightQuantizer
        granularity, _ = quant_granularity_for(layer, cfg.weight_granularity)  # clustered per tensor: per tensor
        stage = stage_cls(w, cfg.weight_bits, granularity, layer.weight_channel_axis, _groups(layer))
        stage.config = cfg
        layer.weight_pipeline.append(stage)


def quantize(model: nn.Module, config: QuantConfig | Targeting | None = None, example_inputs: Any = None, *,
             fold_bn: bool = True, skip_fusion_layers: Iterable[str] = (), quantize_outputs: str = "auto",
             inplace: bool = False, verbose: bool = False) -> nn.Module:
    """Prepare ``model`` for post-training quantization (calibration mode); returns the prepared copy.

    Args:
        model: a trained float model.
        config: one :class:`QuantConfig` for every supported layer, or a :class:`Targeting` (per type,
            per name, skips). Default: INT8, per-channel weights (ARQ), asymmetric IFMR activations.
        example_inputs: inputs for graph capture (tensor, tuple, or dict of keyword inputs).
        fold_bn: fold Conv+BatchNorm first (AMCT's ``do_fusion``); ``skip_fusion_layers`` excludes some.
        quantize_outputs: ``auto`` also quantizes the tensors around residual adds, concatenations and
            pools, and the outputs of quantized layers that feed float ops, so that ONNX Runtime runs the
            whole model in integer kernels (QLinearConv, QLinearAdd, ...); see
            :mod:`amct_torch.quant.placement`. ``none`` quantizes layer inputs only, as AMCT does.
        inplace: modify ``model`` itself.
        verbose: print the plan.

    The returned model has ``amct_plan`` (fold + quantize plan). Run ``batch_num`` calibration batches
    (``calibrate``), then ``export``.
    """
    if quantize_outputs not in ("auto", "none"):
        raise ValueError(f"quantize_outputs: got {quantize_outputs!r}; allowed: 'auto' or 'none'")
    config = QuantConfig() if config is None else config
    targeting = config if isinstance(config, Targeting) else Targeting(config)
    if not inplace:
        model = copy.deepcopy(model)
    model.eval()
    graph = capture(model, example_inputs)
    folded = []
    if fold_bn:
        model, fold_plan = fold_batch_norm(model, graph=graph, skip=skip_fusion_layers, inplace=True)
        folded = fold_plan.layers
    model, plan = swap_layers(model, targeting, graph=graph, attach=_attach, inplace=True, title="quantize",
                              reuse_wrapped=True)
    from .balance import balance_on_calibration  # DMQ (dmq_balancer_param): factors from the first calibration batch

    balance_on_calibration(model)
    if quantize_outputs == "auto":
        layers = quant_layers(model)
        configs = {n: m.quant_config for n, m in layers.items() if getattr(m, "quant_config", None) is not None}
        default = targeting.default if isinstance(targeting.default, QuantConfig) else next(iter(configs.values()), None)
        place_quantizers(model, graph, plan, layers, configs.get, default)
    plan.layers = folded + plan.layers
    model.amct_plan = plan
    bind_references(model)  # tied quantizers stay right in DataParallel replicas
    if verbose:
        print(plan)
    return model


def _batches(data: Any) -> Iterable[tuple[tuple, dict]]:
    if isinstance(data, torch.Tensor):
        yield (data,), {}
        return
    for batch in data:
        if isinstance(batch, dict):
            yield (), batch
        elif isinstance(batch, (list, tuple)):
            yield (batch[0],), {}
        else:
            yield (batch,), {}


def _progress(total: int, enabled: bool, desc: str = "calibrating", unit: str = "batch"):
    if not enabled:
        return None
    try:
        from tqdm.auto import tqdm
    except ImportError:  # tqdm comes with lightning; without it, no bar
        return None
    return tqdm(total=total, desc=desc, unit=unit, leave=True)


def calibrate(model: nn.Module, data: Any, num_batches: int | None = None, *, progress: bool = True) -> nn.Module:
    """Run calibration batches through a model prepared by :func:`quantize` until every quantizer is set.

    Args:
        model: the prepared model.
        data: an iterable of batches (a DataLoader; ``(x, y)`` tuples use ``x``; dicts are keyword
            inputs) or a single tensor.
        num_batches: how many batches to run (default: the largest ``batch_num`` still needed).
        progress: show a progress bar.

    Raises :class:`CalibrationError` naming the layers still uncalibrated when ``data`` runs out.
    AdaRound layers learn their rounding after their activation factors are fixed.
    """
    layers = quant_layers(model)
    if not layers:
        raise CalibrationError("nothing to calibrate: prepare the model with amct_torch.quantize first")
    acts = activation_quantizers(model)
    need = max([q.batch_num - int(q.batches_seen) for q in acts.values() if not q.is_calibrated] + [0])
    ada = {n: m for n, m in layers.items() if isinstance(weight_quantizer(m), AdaRoundWeightQuantizer)
           and not bool(weight_quantizer(m).optimized)}
    if num_batches is None:
        num_batches = max(need, 1 if ada else 0)
    cached: dict[str, list[torch.Tensor]] = {n: [] for n in ada}
    hooks = [m.register_forward_pre_hook(lambda mod, args, n=n: cached[n].append(args[0].detach()))
             for n, m in ada.items()]
    was_training = model.training
    model.eval()
    bar = _progress(num_batches, progress)
    seen = 0
    try:
        with torch.no_grad():
            for args, kwargs in _batches(data):
                if seen >= num_batches:
                    break
                model(*args, **kwargs)
                seen += 1
                if bar is not None:
                    bar.update(1)
    finally:
        for h in hooks:
            h.remove()
        if bar is not None:
            bar.close()
        model.train(was_training)
    missing = {n: f"{int(q.batches_seen)}/{q.batch_num}" for n, q in acts.items() if not q.is_calibrated}
    if missing:
        raise CalibrationError(f"calibration ran {seen} batches; still uncalibrated (batches seen/needed): "
                               + ", ".join(f"{n} {v}" for n, v in missing.items())
                               + ". Give more batches (num_batches / a longer loader) or lower batch_num.")
    bar = _progress(len(ada), progress and bool(ada), desc="AdaRound", unit="layer")
    for name, layer in ada.items():
        _adaround(layer, cached[name])
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    return model


def _adaround(layer: CompressedLayer, inputs: list[torch.Tensor]) -> dict[str, float]:
    stage = weight_quantizer(layer)
    cfg: QuantConfig = stage.config
    w = layer.weight_pipeline.input_of(stage, layer.module.weight)
    if getattr(layer, "input_balance", None) is not None:  # the op sees x / s (DMQ)
        inputs = [layer.input_balance(x) for x in inputs]
    quantized = [layer.input_quantizer(x) if layer.input_quantizer is not None else x for x in inputs]
    op = lambda x, weight: layer._op(x, weight)  # noqa: E731
    stats = optimize_rounding(stage, w, op, inputs, quantized, num_iteration=cfg.ada_num_iteration,
                              reg_param=cfg.ada_reg_param, beta_range=cfg.ada_beta_range,
                              warm_start=cfg.ada_warm_start)
    stage.stats = stats
    return stats


def check_calibrated(model: nn.Module) -> None:
    """Raise :class:`CalibrationError` listing every layer whose factors are not set yet."""
    layers = quant_layers(model)
    if not layers:
        raise CalibrationError("the model has no quantized layers: prepare it with amct_torch.quantize first")
    missing = [f"{n} ({int(q.batches_seen)}/{q.batch_num} batches)"
               for n, q in activation_quantizers(model).items() if not q.is_calibrated]
    missing += [f"{n} (AdaRound not optimised)" for n, m in layers.items()
                if isinstance(weight_quantizer(m), AdaRoundWeightQuantizer) and not bool(weight_quantizer(m).optimized)]
    if missing:
        raise CalibrationError("the model is not fully calibrated; nothing was written. Uncalibrated: "
                               + ", ".join(missing) + ". Run amct_torch.calibrate(model, data) first.")

"""DMQ balancing (AMCT's ``dmq_balancer``, SmoothQuant's scale migration) for Conv, ConvTranspose, Linear
and transformers' ``Conv1D``.

Activations are quantized per tensor, so one input channel with outliers stretches the grid of all the
others. Balancing moves part of that range into the weights, which are quantized per output channel and
absorb it cheaply. Per input channel ``j``, with migration strength ``a`` in [0.2, 0.8]:

    s_j = max|X_j|^a / max|W_j|^(1-a),    x' = x / s,    W' = W * s (along the weight's input-channel axis)

so ``op(x', W') == op(x, W)`` up to float rounding. A channel whose activation or weight maximum is zero
(below ``FLT_EPSILON``) gets ``s_j = 1``; ``s`` is clamped to ``[FLT_EPSILON, 1/FLT_EPSILON]`` (the range
AMCT's record accepts).

A balanced wrapper carries two attachments:

* :class:`BalanceScale` — the first stage of the weight pipeline (``w -> w * s``), so that every later
  stage (ARQ, AdaRound, QAT quantizers) sees the balanced weight;
* :class:`InputBalance` — the wrapper's ``input_balance`` slot, applied before the input quantizer
  (``x -> x * (1/s)``), so the activation quantizer calibrates on the balanced activation. It multiplies
  by the float32 reciprocal, exactly what the exported ONNX ``Mul`` (and AMCT's ``ApplyDMQBalancerPass``,
  which multiplies by ``1 / tensor_balance_factor``) computes.

Weight layouts (the input-channel axis of the weight):

=====================  ================================  =========================================
layer                  weight                            input channels
=====================  ================================  =========================================
Linear                 ``(out, in)``                     axis 1
Conv1d/2d/3d           ``(out, in/groups, *k)``          axis 1, per group: channel ``j`` of the
                                                         input is column ``j % (in/groups)`` of the
                                                         ``out/groups`` filters of group
                                                         ``j // (in/groups)`` (depthwise: each filter
                                                         has one input channel of its own)
ConvTranspose1d/2d/3d  ``(in, out/groups, *k)``          axis 0 (all of ``in``, any ``groups``)
transformers Conv1D    ``(in, out)``                     axis 0
=====================  ================================  =========================================

The record file keeps ``s`` as ``tensor_balance_factor`` (the divisor of the activation).

    model = balance(model, x, loader, alpha=0.5)             # float, computes what it computed before
    model = quantize(model, QuantConfig(), x)                # quantizers see balanced tensors
    calibrate(model, loader)
"""

from __future__ import annotations

import copy
from typing import Any, Iterable

import torch
import torch.nn as nn

from ..config import Config, ConfigError, QuantConfig, Targeting
from ..graph import capture, fold_batch_norm, swap_layers
from ..nn import CompressedConv, CompressedConvTranspose, CompressedLayer, CompressedLinear
from .formulas import FLT_EPSILON
from .quantizers import ActivationQuantizer, ArqWeightQuantizer

__all__ = ["BalanceScale", "InputBalance", "balance", "balance_factors", "balanced_layers", "attach_balance",
           "finalize_balance", "set_balance_factors", "prepare_balance", "balance_on_calibration", "dmq_factors"]

_MAX_FACTOR = 1.0 / FLT_EPSILON


def dmq_factors(act_max: torch.Tensor, weight_max: torch.Tensor, alpha: float) -> torch.Tensor:
    """AMCT's DMQ factors: ``s_j = act_max_j^alpha / weight_max_j^(1-alpha)`` (float32).

    Channels whose activation or weight maximum is below ``FLT_EPSILON`` (zero) get 1; the result is
    clamped to ``[FLT_EPSILON, 1/FLT_EPSILON]``.
    """
    if not 0.0 < alpha < 1.0:
        raise ConfigError("dmq_balancer_param", alpha, "0.2 <= dmq_balancer_param <= 0.8")
    a, w = act_max.detach().double(), weight_max.detach().double()
    if a.shape != w.shape:
        raise ValueError(f"dmq_factors: {a.numel()} activation channels but {w.numel()} weight input channels")
    live = (a >= FLT_EPSILON) & (w >= FLT_EPSILON)
    s = torch.where(live, a.clamp_min(FLT_EPSILON) ** alpha / w.clamp_min(FLT_EPSILON) ** (1.0 - alpha),
                    torch.ones_like(a))
    return s.clamp(FLT_EPSILON, _MAX_FACTOR).float()


# -- layouts -------------------------------------------------------------------------------------
def _weight_input_axis(layer: CompressedLayer) -> int:
    if isinstance(layer, CompressedConvTranspose):
        return 0
    if isinstance(layer, (CompressedConv, CompressedLinear)):
        return 1
    if type(layer).__name__ == "CompressedConv1D":  # transformers' Conv1D: weight (in, out)
        return 0
    raise TypeError(f"DMQ balancing does not support {type(layer.module).__name__}")


def _groups(layer: CompressedLayer) -> int:
    return getattr(layer.module, "groups", 1) if isinstance(layer, CompressedConv) else 1


def _input_channels(layer: CompressedLayer) -> int:
    w = layer.module.weight
    axis = _weight_input_axis(layer)
    return w.shape[axis] * _groups(layer)


def _activation_shape(layer: CompressedLayer, channels: int) -> tuple[int, ...]:
    """Shape of the activation factor: ``(C, 1, ..., 1)`` for convolutions (channels first, batched or
    not), ``(C,)`` for Linear-like layers (channels last)."""
    if isinstance(layer, (CompressedConv, CompressedConvTranspose)):
        return (channels,) + (1,) * (layer.module.weight.dim() - 2)
    return (channels,)


class BalanceScale(nn.Module):
    """Weight stage ``w -> w * s`` along the weight's input-channel axis (grouped convolutions per group).

    Args:
        channels: input channels of the layer (``in`` of the op, all groups).
        axis: the weight's input-channel axis (1: Linear, Conv; 0: ConvTranspose, Conv1D).
        groups: convolution groups (axis 1 only).
    """

    def __init__(self, channels: int, axis: int, groups: int = 1):
        super().__init__()
        if groups > 1 and axis != 1:
            raise ValueError("grouped BalanceScale only along axis 1 (Conv weights (out, in/groups, *k))")
        self.axis, self.groups = axis, groups
        self.register_buffer("factor", torch.ones(channels))

    def weight_factor(self, shape: torch.Size) -> torch.Tensor:
        """``factor`` laid out to multiply a weight of ``shape``."""
        if self.groups > 1:  # (out, in/g, *k): filter o belongs to group o // (out/g)
            per_group = self.factor.reshape(self.groups, -1)                   # (g, in/g)
            full = per_group.repeat_interleave(shape[0] // self.groups, dim=0)  # (out, in/g)
            return full.reshape(full.shape + (1,) * (len(shape) - 2))
        view = [1] * len(shape)
        view[self.axis] = -1
        return self.factor.reshape(view)

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return weight * self.weight_factor(weight.shape).to(weight.dtype)

    def channel_absmax(self, weight: torch.Tensor) -> torch.Tensor:
        """``max |W_j|`` per input channel ``j`` (in the order of ``factor``)."""
        w = weight.detach().abs()
        if self.groups > 1:
            g = self.groups
            per = w.reshape(g, w.shape[0] // g, w.shape[1], -1).amax(dim=(1, 3))  # (g, in/g)
            return per.reshape(-1)
        return w.transpose(0, self.axis).reshape(w.shape[self.axis], -1).amax(dim=1)

    def extra_repr(self) -> str:
        return f"channels={self.factor.numel()}, axis={self.axis}" + (f", groups={self.groups}" if self.groups > 1 else "")


class InputBalance(nn.Module):
    """The activation side of DMQ: ``x -> x * (1/s)`` per input channel, and the statistics that pick ``s``.

    While ``observing`` it records the running ``max |X_j|`` (buffer ``act_max``, accumulated over every
    forward) of the input it receives (the unbalanced activation). With ``auto_finalize`` it fixes its
    factors on the first forward (AMCT's single balancing pass), before the layer's input quantizer sees
    the batch; otherwise :func:`finalize_balance` does.

    Buffers: ``factor`` (``s``, flat), ``inv_factor`` (``1/s`` in float32, laid out to broadcast against
    the input), ``act_max``.
    """

    def __init__(self, channels: int, shape: tuple[int, ...], alpha: float, *, channel_axis: int):
        super().__init__()
        self.alpha = float(alpha)
        self.channel_axis = channel_axis  # of a batched input: 1 (conv) or -1 (linear-like)
        self.observing = False
        self.auto_finalize = False
        self.register_buffer("factor", torch.ones(channels))
        self.register_buffer("inv_factor", torch.ones(shape))
        self.register_buffer("act_max", torch.zeros(channels))

    @property
    def layer(self) -> CompressedLayer | None:
        """The wrapper this balance belongs to (a plain attribute: not a submodule)."""
        return self.__dict__.get("_layer")

    @torch.no_grad()
    def observe(self, x: torch.Tensor) -> None:
        c = self.factor.numel()
        a = x.detach().abs().float()
        if self.channel_axis == -1:
            m = a.reshape(-1, c).amax(dim=0)
        else:
            axis = 1 if a.dim() == len(self.inv_factor.shape) + 1 else 0  # unbatched conv input: (C, *spatial)
            m = a.transpose(0, axis).reshape(c, -1).amax(dim=1)
        torch.maximum(self.act_max, torch.nan_to_num(m, nan=0.0, posinf=0.0), out=self.act_max)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.observing and not torch.compiler.is_compiling():  # graph capture / ONNX export: no statistics
            self.observe(x)
            if self.auto_finalize:
                finalize_balance(self.layer)
        return x * self.inv_factor.to(x.dtype)

    def set_factor(self, factor: torch.Tensor) -> None:
        with torch.no_grad():
            f = torch.as_tensor(factor, dtype=torch.float32).reshape(-1).to(self.factor.device)
            self.factor.copy_(f)
            self.inv_factor.copy_((1.0 / f).reshape(self.inv_factor.shape))

    def extra_repr(self) -> str:
        state = "observing" if self.observing else "fixed"
        return f"channels={self.factor.numel()}, alpha={self.alpha:g}, {state}"


# -- attaching -----------------------------------------------------------------------------------
def _balance_stage(layer: CompressedLayer) -> BalanceScale | None:
    if layer.weight_pipeline is None:
        return None
    return next((s for s in layer.weight_pipeline if isinstance(s, BalanceScale)), None)


def _quant_stage_index(layer: CompressedLayer) -> int | None:
    for i, s in enumerate(layer.weight_pipeline):
        if isinstance(s, ArqWeightQuantizer):
            return i
    return None


def _pre_quant_weight(layer: CompressedLayer) -> torch.Tensor:
    """The weight as the balance stage receives it: ``module.weight`` through the stages before it."""
    stage = _balance_stage(layer)
    w = layer.module.weight
    return layer.weight_pipeline(w) if stage is None else layer.weight_pipeline.input_of(stage, w)


def attach_balance(name: str, layer: CompressedLayer, alpha: float, *, auto_finalize: bool = False) -> InputBalance:
    """Give ``layer`` a :class:`BalanceScale` (first weight stage) and an observing :class:`InputBalance`.

    The factors start at 1 (the layer computes what it did). A layer that has them already keeps them
    (its alpha is updated). Refused on layers whose weights were clustered (a cluster stage ignores its
    input's values, so the weight would lose the balance the activation got) and on layers with a folded
    QAT BatchNorm.
    """
    if not layer.has_weight:
        raise ConfigError(f"layer {name!r} ({type(layer.module).__name__})", "dmq_balancer_param",
                          "layers with a weight (Conv, ConvTranspose, Linear, Conv1D)")
    if not 0.2 <= alpha <= 0.8:
        raise ConfigError(f"layer {name!r} dmq_balancer_param", alpha, "0.2 <= dmq_balancer_param <= 0.8")
    existing = getattr(layer, "input_balance", None)
    if isinstance(existing, InputBalance):
        existing.alpha = float(alpha)
        return existing
    for stage in layer.weight_pipeline:
        kind = type(stage).__name__
        if kind in ("ClusterStage", "BatchNormScale"):
            raise ConfigError(f"layer {name!r}", f"a {kind} in its weight pipeline",
                              "balance before clustering / QAT preparation (balance, then cluster or prepare_qat)")
    q = layer.input_quantizer
    if isinstance(q, ActivationQuantizer) and q.tied_to is None and (q.is_calibrated or int(q.batches_seen) > 0):
        raise ConfigError(f"layer {name!r}", "input quantizer already calibrating",
                          "balance before calibration (balance, then quantize and calibrate)")
    axis = _weight_input_axis(layer)
    channels = _input_channels(layer)
    layer.weight_pipeline.insert(0, BalanceScale(channels, axis, _groups(layer)))
    act_axis = 1 if isinstance(layer, (CompressedConv, CompressedConvTranspose)) else -1
    ib = InputBalance(channels, _activation_shape(layer, channels), alpha, channel_axis=act_axis)
    ib.__dict__["_layer"] = layer
    ib.observing, ib.auto_finalize = True, auto_finalize
    layer.input_balance = ib
    return ib


def _refit_weight_quantizer(layer: CompressedLayer) -> None:
    """ARQ scales follow the balanced weight (recomputed from the pipeline's input at the quantizer)."""
    i = _quant_stage_index(layer)
    if i is None:
        return
    w = layer.weight_pipeline.input_of(i, layer.module.weight)
    stage = layer.weight_pipeline[i]
    with torch.no_grad():
        stage.calibrate(w.detach())
        if hasattr(stage, "round_up") and not bool(stage.optimized):  # AdaRound: nearest until it learns
            stage._nearest(w.detach())


def set_balance_factors(layer: CompressedLayer, factor: Any, *, name: str = "layer") -> None:
    """Fix ``layer``'s balance factors to ``factor`` (``s``, one per input channel; e.g. from a record).

    Creates the balance attachments if missing (alpha unknown: recorded as 0.5), refits an ARQ weight
    stage to the balanced weight, and refuses a layer whose input quantizer has already calibrated
    (it saw unbalanced activations).
    """
    ib = getattr(layer, "input_balance", None)
    if not isinstance(ib, InputBalance):
        ib = attach_balance(name, layer, 0.5)
    f = torch.as_tensor(factor, dtype=torch.float32).reshape(-1)
    if f.numel() != ib.factor.numel():
        raise ConfigError(f"layer {name!r} tensor_balance_factor", f"{f.numel()} values",
                          f"{ib.factor.numel()} (one per input channel)")
    if not bool(torch.all((f >= FLT_EPSILON) & (f <= _MAX_FACTOR))):
        raise ConfigError(f"layer {name!r} tensor_balance_factor", [float(v) for v in f[:4]],
                          f"values in [{FLT_EPSILON:g}, {_MAX_FACTOR:g}]")
    q = layer.input_quantizer
    if isinstance(q, ActivationQuantizer) and q.tied_to is None and (q.is_calibrated or int(q.batches_seen) > 0):
        raise ConfigError(f"layer {name!r}", "input quantizer already calibrating",
                          "balance before calibration (balance, then quantize and calibrate)")
    ib.set_factor(f)
    _balance_stage(layer).factor.copy_(f.to(_balance_stage(layer).factor.device))
    ib.observing = False
    _refit_weight_quantizer(layer)


@torch.no_grad()
def finalize_balance(layer: CompressedLayer) -> torch.Tensor:
    """Compute ``s`` from the activation maxima observed so far and the weight; fix it. Returns ``s``.

    Observation stops (``observing=False``). Setting ``input_balance.observing = True`` again
    accumulates more batches into the same running maximum; finalizing again recomputes ``s`` from it
    (factors are replaced, never stacked). An ARQ weight stage is refitted to the balanced weight.
    """
    ib: InputBalance = layer.input_balance
    stage = _balance_stage(layer)
    w_max = stage.channel_absmax(_pre_quant_weight(layer))
    s = dmq_factors(ib.act_max, w_max, ib.alpha)
    ib.set_factor(s)
    stage.factor.copy_(s)
    ib.observing = False
    _refit_weight_quantizer(layer)
    return s


# -- the pass ------------------------------------------------------------------------------------
def _alpha_of(name: str, cfg: Config) -> float | None:
    if isinstance(cfg, QuantConfig):
        return cfg.dmq_balancer_param
    raise TypeError(f"balance: layer {name!r} got {type(cfg).__name__}; allowed: QuantConfig (dmq_balancer_param)")


def _targeting(alpha: float | QuantConfig | Targeting) -> Targeting:
    if isinstance(alpha, Targeting):
        return alpha
    if isinstance(alpha, QuantConfig):
        return Targeting(alpha)
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)):
        raise TypeError(f"balance(alpha=...): got {type(alpha).__name__}; allowed: a float in [0.2, 0.8], "
                        "a QuantConfig or a Targeting of QuantConfigs with dmq_balancer_param")
    return Targeting(QuantConfig(dmq_balancer_param=float(alpha)))


def prepare_balance(model: nn.Module, example_inputs: Any = None, alpha: float | QuantConfig | Targeting = 0.5, *,
                    fold_bn: bool = True, skip_fusion_layers: Iterable[str] = (), auto_finalize: bool = False,
                    inplace: bool = False) -> nn.Module:
    """Wrap the targeted layers and attach observing balances (factors 1: the model is unchanged).

    Run data through the result, then :func:`finalize_balance` each layer of :func:`balanced_layers`
    (``balance`` does all of that). ``auto_finalize=True``: each layer fixes its factors on its first
    forward, as AMCT's single balancing pass does, so ``quantize`` + ``calibrate`` need nothing else.
    Layers whose config has ``dmq_balancer_param=None`` are left alone. ``model.amct_balance_plan`` is
    the plan.
    """
    targeting = _targeting(alpha)
    if not inplace:
        model = copy.deepcopy(model)
    model.eval()
    graph = capture(model, example_inputs)
    if fold_bn:
        model, _ = fold_batch_norm(model, graph=graph, skip=skip_fusion_layers, inplace=True)

    def attach(name: str, layer: CompressedLayer, cfg: Config) -> None:
        a = _alpha_of(name, cfg)
        if a is not None and layer.has_weight:
            attach_balance(name, layer, a, auto_finalize=auto_finalize)

    model, plan = swap_layers(model, targeting, graph=graph, attach=attach, inplace=True, title="balance",
                              reuse_wrapped=True)
    model.amct_balance_plan = plan
    return model


def balance_on_calibration(model: nn.Module) -> list[str]:
    """Attach auto-finalizing balances to the wrappers of a :func:`amct_torch.quantize`-prepared model whose
    ``quant_config.dmq_balancer_param`` is set (in place); returns their names.

    Each such layer fixes its factors on the first calibration batch (before its input quantizer sees the
    batch) and refits its ARQ weight scales, so ``quantize`` + ``calibrate`` balance as AMCT's
    ``quantize_preprocess`` + ``quantize_model`` do, from one batch. :func:`balance` (statistics over any
    number of batches) is the better choice when the data allows.
    """
    names = []
    for name, layer in model.named_modules():
        cfg = getattr(layer, "quant_config", None)
        if isinstance(layer, CompressedLayer) and layer.has_weight and isinstance(cfg, QuantConfig) \
                and cfg.dmq_balancer_param is not None and not isinstance(getattr(layer, "input_balance", None), InputBalance):
            attach_balance(name, layer, cfg.dmq_balancer_param, auto_finalize=True)
            names.append(name)
    return names


def balanced_layers(model: nn.Module) -> dict[str, CompressedLayer]:
    """Every wrapper with a balance, by module path."""
    return {n: m for n, m in model.named_modules()
            if isinstance(m, CompressedLayer) and isinstance(getattr(m, "input_balance", None), InputBalance)}


def balance_factors(model: nn.Module) -> dict[str, list[float]]:
    """``{layer: s}`` of every balanced layer (what the record stores as ``tensor_balance_factor``)."""
    return {n: [float(v) for v in m.input_balance.factor] for n, m in balanced_layers(model).items()}


def _run(model: nn.Module, data: Any, num_batches: int | None) -> int:
    from .ptq import _batches  # the same batch conventions as calibrate

    seen = 0
    with torch.no_grad():
        for args, kwargs in _batches(data):
            if num_batches is not None and seen >= num_batches:
                break
            model(*args, **kwargs)
            seen += 1
    return seen


def balance(model: nn.Module, example_inputs: Any, data: Any, alpha: float | QuantConfig | Targeting = 0.5, *,
            num_batches: int | None = None, fold_bn: bool = True, skip_fusion_layers: Iterable[str] = (),
            inplace: bool = False) -> nn.Module:
    """DMQ-balance ``model``: the returned float model computes the same function, with balanced inputs.

    ``s_j = max|X_j|^alpha / max|W_j|^(1-alpha)`` per input channel of every targeted layer, ``max|X_j|``
    over all batches of ``data`` (a DataLoader, a list of batches or one tensor; ``(x, y)`` uses ``x``,
    dicts are keyword inputs). Then :func:`amct_torch.quantize` on the result quantizes the balanced
    activations and weights.

    Args:
        model: a float model (BatchNorms are folded into their convolutions first unless ``fold_bn=False``).
        example_inputs: inputs for graph capture.
        data: the statistics batches.
        alpha: the migration strength in [0.2, 0.8]; or a :class:`QuantConfig` / :class:`Targeting` whose
            ``dmq_balancer_param`` decides per layer (``None``: not balanced).
        num_batches: at most this many batches (default: all of ``data``).
        inplace: modify ``model`` itself.

    Example::

        model = balance(model, x, loader, alpha=0.5)
        model = quantize(model, QuantConfig(), x)
        calibrate(model, loader)
    """
    model = prepare_balance(model, example_inputs, alpha, fold_bn=fold_bn, skip_fusion_layers=skip_fusion_layers,
                            inplace=inplace)
    layers = balanced_layers(model)
    if not layers:
        return model
    was_training = model.training
    model.eval()
    try:
        seen = _run(model, data, num_batches)
    finally:
        model.train(was_training)
    if seen == 0:
        raise ValueError("balance: data gave no batches; the activation statistics need at least one")
    unseen = [n for n, m in layers.items() if not bool(torch.any(m.input_balance.act_max > 0))]
    for layer in layers.values():
        finalize_balance(layer)
    if unseen:
        model.amct_balance_plan.warnings.append(
            "no activation seen (or all zero), factors 1: " + ", ".join(unseen))
    return model

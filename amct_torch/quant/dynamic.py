"""Dynamic quantization: int8 weights fixed once, activations quantized on the fly from each input.

    model = quantize_dynamic(model)                      # Linear, transformers' Conv1D, LSTM, GRU
    print(model.amct_plan)                               # what was quantized, and why not
    export_dynamic(model, "model.onnx", x)               # amct_torch.export.dynamic

No calibration and no example inputs (like ``torch.ao.quantization.quantize_dynamic``): a module walk
finds the layers. Activation factors follow ONNX Runtime's ``DynamicQuantizeLinear`` for the default
asymmetric uint8 activations (computed in float32)::

    lo, hi = min(0, min(x)), max(0, max(x))
    scale = (hi - lo) / 255            (1 when hi == lo)
    zero_point = round(clip(-lo / scale, 0, 255))
    q = clip(round(x / scale) + zero_point, 0, 255)     x' = (q - zero_point) * scale

per tensor, or per token (each row of ``x`` flattened to ``(-1, features)``). Symmetric activations are
int8 with AMCT's symmetric scale (``hi / 127``, or ``|lo| / 128`` when the negative side is larger).
Weights are int8 symmetric, per output channel (AMCT's ARQ scales, an :class:`ArqWeightQuantizer`).

* Linear / Conv1D: the usual wrapper with a :class:`DynamicActivationQuantizer` in the input slot and
  the ARQ stage in the weight pipeline: ``y = x' @ W'^T + b``, evaluated (in inference) in ONNX
  Runtime's order ``((q - zp) @ W_int8^T) * (x_scale * w_scale) + b`` (:class:`DynamicQuantLinear`).
* LSTM / GRU: replaced by :class:`DynamicQuantLSTM` / :class:`DynamicQuantGRU`, which hold int8
  ``weight_ih``/``weight_hh`` of every layer and direction and run torch's recurrence on the
  dequantized weights, quantizing each gate matmul's input: the layer input once per sequence (as ONNX
  Runtime's ``DynamicQuantizeLSTM`` and fbgemm do), the hidden state at every step.
"""

from __future__ import annotations

import copy
from abc import ABCMeta, abstractmethod
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..config import PerChannel, PerTensor, Targeting
from ..config.dynamic import DynamicQuantConfig
from ..graph import capture, swap_layers
from ..graph.plan import LayerPlan
from ..nn import CompressedConv1D, CompressedLayer, CompressedLinear
from .formulas import FLT_EPSILON
from .quantizers import ArqWeightQuantizer

__all__ = ["quantize_dynamic", "DynamicQuantLinear", "DynamicQuantConv1D", "dynamic_qparams", "dynamic_quantize",
           "dynamic_fake_quantize", "DynamicActivationQuantizer",
           "DynamicQuantRNN", "DynamicQuantLSTM", "DynamicQuantGRU", "dynamic_layers"]


# -- activation factors ------------------------------------------------------------------------
def dynamic_qparams(x: torch.Tensor, per_token: bool = False, symmetric: bool = False
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale (float32) and zero point (float32 holding an integer) of ``x``, computed from ``x`` itself.

    Per tensor: 0-d tensors. Per token: shape ``x.shape[:-1] + (1,)`` (one pair per row).
    Asymmetric: ONNX Runtime's ``DynamicQuantizeLinear`` (uint8). Symmetric: int8, zero point 0.
    """
    x = x.detach().float()
    if per_token:
        lo, hi = x.amin(dim=-1, keepdim=True), x.amax(dim=-1, keepdim=True)
    else:
        lo, hi = x.amin(), x.amax()
    lo, hi = torch.clamp(lo, max=0.0), torch.clamp(hi, min=0.0)
    if symmetric:
        pos, neg = hi, -lo
        scale = torch.where(pos >= neg, pos / 127.0, neg / 128.0)
        scale = torch.where(scale < FLT_EPSILON, torch.ones_like(scale), scale)
        return scale, torch.zeros_like(scale)
    span = hi - lo
    scale = torch.where(span == 0, torch.ones_like(span), span / 255.0)
    zero_point = torch.round(torch.clamp(-lo / scale, 0.0, 255.0))
    return scale, zero_point


def dynamic_quantize(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, symmetric: bool = False
                     ) -> torch.Tensor:
    """Integer values (float dtype): ``clip(round(x / scale) + zero_point, qmin, qmax)``."""
    qmin, qmax = (-128.0, 127.0) if symmetric else (0.0, 255.0)
    return torch.clamp(torch.round(x / scale) + zero_point, qmin, qmax)


def dynamic_fake_quantize(x: torch.Tensor, per_token: bool = False, symmetric: bool = False) -> torch.Tensor:
    """``x`` quantized with factors from itself and dequantized: ``(q - zero_point) * scale``."""
    scale, zero_point = dynamic_qparams(x, per_token, symmetric)
    q = dynamic_quantize(x.float(), scale, zero_point, symmetric)
    return ((q - zero_point) * scale).to(x.dtype)


class DynamicActivationQuantizer(nn.Module):
    """Input-slot quantizer whose factors come from each input (no calibration, no state).

    Args:
        per_token: one scale/zero point per row (last dim reduced) instead of one for the tensor.
        symmetric: int8 with offset 0 instead of ONNX Runtime's uint8 with a zero point.
    """

    _amct_leaf = True
    bits = 8

    def __init__(self, per_token: bool = False, symmetric: bool = False):
        super().__init__()
        self.per_token, self.symmetric = per_token, symmetric

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return dynamic_fake_quantize(x, self.per_token, self.symmetric)

    def extra_repr(self) -> str:
        return (f"{'per_token' if self.per_token else 'per_tensor'}, "
                f"{'int8 symmetric' if self.symmetric else 'uint8 asymmetric'}")


def _act_quantizer(cfg: DynamicQuantConfig) -> DynamicActivationQuantizer | None:
    if cfg.activation_bits is None:
        return None
    return DynamicActivationQuantizer(cfg.per_token, cfg.activation_symmetric)


# -- Linear / Conv1D ----------------------------------------------------------------------------
class _DynamicMatmul:
    """Forward of a dynamically quantized Linear/Conv1D in ONNX Runtime's order of operations.

    ``y = ((q - zp) @ W_int8^T) * (x_scale * w_scale) + b``: the same value as ``x' @ W'^T + b`` (the
    fake-quantized operands), computed as ONNX Runtime's ``MatMulInteger -> Cast -> Mul -> Add`` (and its
    fused ``DynamicQuantizeMatMul``) does. Products of integers are exact in float32 while the sum stays
    below 2^24 (``in_features`` up to 518 at full range), so the PyTorch model and the exported model
    meet the same rounding ties in the next layer's activation quantizer.
    """

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        act = self.input_quantizer
        stage = self.weight_pipeline[-1] if len(self.weight_pipeline) else None
        if not isinstance(act, DynamicActivationQuantizer) or not isinstance(stage, ArqWeightQuantizer) \
                or self.output_quantizer is not None or torch.is_grad_enabled() and x.requires_grad:
            return super().forward(x, *args, **kwargs)   # fake-quant form (the same values)
        w = self.module.weight
        for s in list(self.weight_pipeline)[:-1]:
            w = s(w)
        w_q = stage.integer_weight(w).float()
        if self.weight_channel_axis == 0:
            w_q = w_q.T                                   # (in, out)
        w_scale = stage.scale if stage.per_channel else stage.scale.reshape(())
        scale, zp = dynamic_qparams(x, act.per_token, act.symmetric)
        q = dynamic_quantize(x.float(), scale, zp, act.symmetric)
        y = ((q - zp) @ w_q) * (scale * w_scale)
        bias = self.effective_bias()
        return (y if bias is None else y + bias).to(x.dtype)


class DynamicQuantLinear(_DynamicMatmul, CompressedLinear):
    """A ``CompressedLinear`` whose input quantizer is dynamic: integer-domain forward (see ``_DynamicMatmul``)."""


class DynamicQuantConv1D(_DynamicMatmul, CompressedConv1D):
    """transformers' ``Conv1D`` counterpart of :class:`DynamicQuantLinear`."""


# -- LSTM / GRU --------------------------------------------------------------------------------
def _int8_rows(w: torch.Tensor, per_channel: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 values and scales of a ``(rows, cols)`` weight: one scale per row or one in all."""
    stage = ArqWeightQuantizer(w.detach().float(), 8, PerChannel() if per_channel else PerTensor(), 0)
    q = stage.integer_weight(w.detach().float())
    scale = stage.scale if per_channel else stage.scale.expand(w.shape[0])
    return q, scale.clone()


class DynamicQuantRNN(nn.Module, metaclass=ABCMeta):
    """Base of the dynamic LSTM/GRU: int8 weights per layer and direction, float biases.

    Buffers ``weight_ih_l{k}{_reverse}`` (int8) with ``..._scale`` (one per gate row, or the same for all
    rows when per tensor), likewise ``weight_hh_...``; ``bias_ih_...``/``bias_hh_...`` stay float.
    :meth:`dequantized_weight` gives the float weight the recurrence uses.
    """

    mode = ""
    gates = 1

    def __init__(self, rnn: nn.RNNBase, config: DynamicQuantConfig):
        super().__init__()
        self.input_size, self.hidden_size = rnn.input_size, rnn.hidden_size
        self.num_layers, self.bidirectional, self.batch_first = rnn.num_layers, rnn.bidirectional, rnn.batch_first
        self.has_bias = rnn.bias
        self.config = config
        self.input_quantizer = _act_quantizer(config)
        for name in self._weight_names():
            w = getattr(rnn, name)
            q, scale = _int8_rows(w, config.per_channel)
            self.register_buffer(name, q)
            self.register_buffer(name + "_scale", scale)
        for name in self._bias_names():
            self.register_buffer(name, getattr(rnn, name).detach().clone())

    @property
    def num_directions(self) -> int:
        return 2 if self.bidirectional else 1

    def _suffixes(self) -> list[tuple[int, int, str]]:
        return [(k, d, f"l{k}{'_reverse' if d else ''}") for k in range(self.num_layers)
                for d in range(self.num_directions)]

    def _weight_names(self) -> list[str]:
        return [f"weight_{kind}_{s}" for _, _, s in self._suffixes() for kind in ("ih", "hh")]

    def _bias_names(self) -> list[str]:
        return [f"bias_{kind}_{s}" for _, _, s in self._suffixes() for kind in ("ih", "hh")] if self.has_bias else []

    def dequantized_weight(self, name: str) -> torch.Tensor:
        """``int8 * scale`` (per row) of ``weight_ih_l0`` etc., as float32."""
        return getattr(self, name).float() * getattr(self, name + "_scale")[:, None]

    def dequantized_state_dict(self) -> dict[str, torch.Tensor]:
        """A state dict for a float ``nn.LSTM``/``nn.GRU`` with the dequantized weights (reference checks)."""
        out = {n: self.dequantized_weight(n) for n in self._weight_names()}
        out.update({n: getattr(self, n).clone() for n in self._bias_names()})
        return out

    def _quant(self, x: torch.Tensor) -> torch.Tensor:
        return x if self.input_quantizer is None else self.input_quantizer(x)

    @abstractmethod
    def _cell(self, gi: torch.Tensor, h: torch.Tensor, c: torch.Tensor | None, w_hh: torch.Tensor,
              b_hh: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """One time step from the input gates ``gi``: the new hidden (and cell) state."""

    @abstractmethod
    def _initial(self, x: torch.Tensor, hx: Any) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The initial hidden (and cell) state, from ``hx`` or zeros."""

    def forward(self, x: torch.Tensor, hx: Any = None):
        if isinstance(x, nn.utils.rnn.PackedSequence):
            raise TypeError(f"{type(self).__name__}: PackedSequence input is not supported; pad the batch "
                            "(the ONNX export takes padded tensors too)")
        unbatched = x.dim() == 2
        if unbatched:
            x = x.unsqueeze(1)
            if hx is not None:
                hx = tuple(h.unsqueeze(1) for h in hx) if isinstance(hx, tuple) else hx.unsqueeze(1)
        elif self.batch_first:
            x = x.transpose(0, 1)
        h0, c0 = self._initial(x, hx)
        h_n, c_n = [], []
        layer_in = x                                                    # (T, B, I)
        for k in range(self.num_layers):
            xq = self._quant(layer_in)                                  # once per sequence and layer
            outs = []
            for d in range(self.num_directions):
                s = f"l{k}{'_reverse' if d else ''}"
                w_ih, w_hh = self.dequantized_weight(f"weight_ih_{s}"), self.dequantized_weight(f"weight_hh_{s}")
                b_ih = getattr(self, f"bias_ih_{s}") if self.has_bias else None
                b_hh = getattr(self, f"bias_hh_{s}") if self.has_bias else None
                gi = F.linear(xq, w_ih, b_ih)                           # (T, B, G*H)
                idx = k * self.num_directions + d
                h, c = h0[idx], (c0[idx] if c0 is not None else None)
                steps = range(x.shape[0] - 1, -1, -1) if d else range(x.shape[0])
                ys: list[torch.Tensor] = [None] * x.shape[0]  # type: ignore[list-item]
                for t in steps:
                    h, c = self._cell(gi[t], h, c, w_hh, b_hh)
                    ys[t] = h
                outs.append(torch.stack(ys))
                h_n.append(h)
                if c is not None:
                    c_n.append(c)
            layer_in = torch.cat(outs, dim=-1) if len(outs) > 1 else outs[0]
        y, h_n_t = layer_in, torch.stack(h_n)
        c_n_t = torch.stack(c_n) if c_n else None
        if unbatched:
            y, h_n_t = y.squeeze(1), h_n_t.squeeze(1)
            c_n_t = c_n_t.squeeze(1) if c_n_t is not None else None
        elif self.batch_first:
            y = y.transpose(0, 1)
        return y, ((h_n_t, c_n_t) if c_n_t is not None else h_n_t)

    def extra_repr(self) -> str:
        return (f"{self.input_size}, {self.hidden_size}, num_layers={self.num_layers}, batch_first={self.batch_first}, "
                f"bidirectional={self.bidirectional}, {self.config.short()}")


class DynamicQuantLSTM(DynamicQuantRNN):
    """``nn.LSTM`` (no ``proj_size``) with int8 weights and dynamically quantized gate-matmul inputs."""

    mode, gates = "LSTM", 4

    def __init__(self, rnn: nn.LSTM, config: DynamicQuantConfig):
        if rnn.proj_size:
            raise ValueError("LSTM with proj_size is not supported by dynamic quantization")
        super().__init__(rnn, config)

    def _initial(self, x, hx):
        shape = (self.num_layers * self.num_directions, x.shape[1], self.hidden_size)
        if hx is None:
            z = x.new_zeros(shape)
            return z, z
        return hx

    def _cell(self, gi, h, c, w_hh, b_hh):
        g = gi + F.linear(self._quant(h), w_hh, b_hh)
        i, f, gg, o = g.chunk(4, dim=-1)
        c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(gg)
        return torch.sigmoid(o) * torch.tanh(c), c


class DynamicQuantGRU(DynamicQuantRNN):
    """``nn.GRU`` with int8 weights and dynamically quantized gate-matmul inputs."""

    mode, gates = "GRU", 3

    def _initial(self, x, hx):
        if hx is None:
            hx = x.new_zeros(self.num_layers * self.num_directions, x.shape[1], self.hidden_size)
        return hx, None

    def _cell(self, gi, h, c, w_hh, b_hh):
        gh = F.linear(self._quant(h), w_hh, b_hh)
        i_r, i_z, i_n = gi.chunk(3, dim=-1)
        h_r, h_z, h_n = gh.chunk(3, dim=-1)
        r, z = torch.sigmoid(i_r + h_r), torch.sigmoid(i_z + h_z)
        n = torch.tanh(i_n + r * h_n)
        return (1 - z) * n + z * h, None


_RNNS: dict[type, type[DynamicQuantRNN]] = {nn.LSTM: DynamicQuantLSTM, nn.GRU: DynamicQuantGRU}


def _rnn_unsupported(m: nn.Module) -> str | None:
    base = next(k for k in _RNNS if isinstance(m, k))
    if type(m).forward is not base.forward:
        return f"{type(m).__name__} overrides forward; a replacement would bypass it"
    if isinstance(m, nn.LSTM) and m.proj_size:
        return f"LSTM with proj_size={m.proj_size} is not supported (no dynamic kernel for projected LSTMs)"
    if m._forward_hooks or m._forward_pre_hooks:
        return "it has forward hooks that a replacement would bypass"
    return None


# -- the pass ----------------------------------------------------------------------------------
def _check(name: str, cfg: Any) -> DynamicQuantConfig:
    if not isinstance(cfg, DynamicQuantConfig):
        raise TypeError(f"quantize_dynamic: layer {name!r} got {type(cfg).__name__}; allowed: DynamicQuantConfig")
    return cfg


def _attach(name: str, layer: CompressedLayer, cfg: Any) -> None:
    cfg = _check(name, cfg)
    if layer.input_quantizer is not None or any(isinstance(s, ArqWeightQuantizer) for s in layer.weight_pipeline):
        raise ValueError(f"quantize_dynamic: layer {name!r} is already quantized (quantize once)")
    layer.dynamic_config = cfg
    # same wrapper and state, a forward that computes in the integer domain (see _DynamicMatmul)
    layer.__class__ = DynamicQuantLinear if isinstance(layer, CompressedLinear) else DynamicQuantConv1D
    layer.input_quantizer = _act_quantizer(cfg)
    w = layer.effective_weight().detach()
    layer.weight_pipeline.append(ArqWeightQuantizer(w, 8, cfg.weight_granularity, layer.weight_channel_axis))


_NOT_DYNAMIC = " (dynamic quantization takes Linear, Conv1D, LSTM and GRU)"


class _LinearOnly(Targeting):
    """The user's targeting, giving no config to the other wrappable types (convolutions, pools)."""

    def __init__(self, targeting: Targeting):  # noqa: D107 - shares the user's entries
        self.__dict__.update(targeting.__dict__)
        self._inner = targeting

    def resolve(self, name, module):  # type: ignore[override]
        res = self._inner.resolve(name, module)
        if res.config is not None and not (isinstance(module, nn.Linear) or type(module).__name__ == "Conv1D"):
            return type(res)(None, res.source + _NOT_DYNAMIC)
        return res


def dynamic_layers(model: nn.Module) -> dict[str, nn.Module]:
    """Every dynamically quantized layer of ``model`` (wrappers and LSTM/GRU replacements), by module path."""
    return {n: m for n, m in model.named_modules()
            if isinstance(m, DynamicQuantRNN) or (isinstance(m, CompressedLayer) and getattr(m, "dynamic_config", None))}


def quantize_dynamic(model: nn.Module, config_or_targeting: DynamicQuantConfig | Targeting | None = None, *,
                     inplace: bool = False, verbose: bool = False) -> nn.Module:
    """Dynamically quantize Linear, transformers' Conv1D, LSTM and GRU layers; returns the model.

    Args:
        model: a trained float model (no example inputs needed: a module walk finds the layers).
        config_or_targeting: one :class:`DynamicQuantConfig` for every supported layer (default: int8
            per-channel weights, per-tensor uint8 activations as ONNX Runtime), or a :class:`Targeting`.
        inplace: modify ``model`` itself.
        verbose: print the plan.

    ``model.amct_plan`` lists every layer: what it got, or why not (e.g. an LSTM with ``proj_size``).

    Example::

        qmodel = quantize_dynamic(model, DynamicQuantConfig(activation_granularity="per_token"))
        print(qmodel.amct_plan)
    """
    cfg = DynamicQuantConfig() if config_or_targeting is None else config_or_targeting
    targeting = cfg if isinstance(cfg, Targeting) else Targeting(cfg)
    if not inplace:
        model = copy.deepcopy(model)
    model.eval()
    graph = capture(model, methods=("module_walk",))
    model, plan = swap_layers(model, _LinearOnly(targeting), graph=graph, attach=_attach, inplace=True,
                              title="quantize_dynamic")
    rnn_lines: dict[str, LayerPlan] = {}
    for name, m in list(model.named_modules()):
        if not isinstance(m, tuple(_RNNS)) or isinstance(m, DynamicQuantRNN):
            continue
        kind = type(m).__name__
        res = targeting.resolve(name, m)
        if res.config is None:
            rnn_lines[name] = LayerPlan(name, kind, "skip", "targeting gives no config", res.source)
            continue
        reason = _rnn_unsupported(m)
        if reason is not None:
            rnn_lines[name] = LayerPlan(name, kind, "unsupported", reason, res.source)
            continue
        klass = next(v for k, v in _RNNS.items() if isinstance(m, k))
        model.set_submodule(name, klass(m, _check(name, res.config)))
        rnn_lines[name] = LayerPlan(name, kind, "wrap", f"{klass.__name__}: {res.config.short()}", res.source)
    layers = []
    for lp in plan.layers:
        if lp.source.endswith(_NOT_DYNAMIC):
            lp = LayerPlan(lp.name, lp.layer_type, "skip", "not dynamically quantized" + _NOT_DYNAMIC,
                           lp.source[: -len(_NOT_DYNAMIC)])
        layers.append(rnn_lines.pop(lp.name, lp))
    plan.layers = layers + list(rnn_lines.values())
    plan.capture = ""
    model.amct_plan = plan
    if verbose:
        print(plan)
    return model

"""ONNX export of a dynamically quantized model, in the forms ONNX Runtime runs as integer kernels.

    qmodel = quantize_dynamic(model)
    export_dynamic(qmodel, "model.onnx", x)

* Linear / Conv1D, per-tensor uint8 activations (the default): ONNX Runtime's own pattern
  ``DynamicQuantizeLinear(x) -> MatMulInteger(x_q, W_int8, x_zp) -> Cast -> Mul(x_scale * w_scale)
  -> Add(bias)``, with an INT8 ``(in, out)`` weight initializer ``<layer>.weight_int8`` and a per-column
  ``<layer>.weight_scale``. Only standard ops, so any runtime reads it; ONNX Runtime's level-2
  optimizer fuses the chain into its ``DynamicQuantizeMatMul`` kernel (the same pattern, and the same
  fused kernel, as ``onnxruntime.quantization.quantize_dynamic`` produces), so writing the contrib op
  ourselves would gain nothing and lose portability. The PyTorch model computes in the same order, so
  the outputs agree bit for bit on the CPU tested.
* Per-token or symmetric activations (no such mode in ``DynamicQuantizeLinear``, and ONNX Runtime's
  ``MatMulInteger`` takes one activation zero point): the factors are computed with standard ops
  (ReduceMin/ReduceMax per row, Div, Round, Clip, Cast), ``MatMulInteger`` runs without a zero point
  and the zero point's share, ``zp_row * colsum(W)``, is subtracted in int32.
* Weight-only layers (``activation_bits=None``): ``DequantizeLinear(W_int8) -> MatMul``. Note that
  ONNX Runtime (1.31, level-2 optimizations) rewrites this pair into ``MatMulNBits`` with 8-bit weights,
  whose default accuracy level quantizes the activations blockwise: its output then differs from the
  PyTorch weight-only model by about an activation quantization step.
* LSTM: ``com.microsoft.DynamicQuantizeLSTM`` (ONNX Runtime's CPU kernel: int8 per-row weights
  ``(dirs, in, 4*hidden)``, uint8 activations quantized per tensor, the layer input once per sequence
  and the hidden state every step — what the PyTorch model computes). One node per layer. Only the
  default activation mode exists there: other LSTM configs are refused with the reason. With more than
  one intra-op thread, ONNX Runtime splits each step's hidden-state matmul over batch rows and
  quantizes each chunk with its own factors, so its output then depends on the thread count (by about
  an activation quantization step); with ``intra_op_num_threads=1`` it matches the PyTorch model to
  float rounding.
* GRU: ONNX Runtime has no dynamically quantized GRU kernel; the GRU exports as a standard float
  ``GRU`` whose weights are INT8 initializers through ``DequantizeLinear`` (int8 storage, float
  activations). Its output therefore differs from the PyTorch dynamic GRU by the activation
  quantization error (exactly what a weight-only GRU computes).
"""

from __future__ import annotations

import copy
import warnings
from pathlib import Path
from typing import Any

import onnx
import torch
import torch.nn as nn
from onnxscript import opset20 as op
from onnxscript import values as _values

from .._quiet import quiet
from ..graph.capture import normalize_inputs
from ..nn import CompressedLayer
from ..quant.dynamic import DynamicQuantLSTM, DynamicQuantRNN, dynamic_qparams, dynamic_quantize
from ..quant.quantizers import ArqWeightQuantizer

__all__ = ["export_dynamic", "DynamicExportError"]

_MS = _values.Opset("com.microsoft", 1)
_T = onnx.TensorProto
_FLOAT, _INT32, _UINT8, _INT8 = _T.FLOAT, _T.INT32, _T.UINT8, _T.INT8


def _dynamic_quantize_lstm_schema() -> onnx.defs.OpSchema:
    """ONNX Runtime's ``com.microsoft.DynamicQuantizeLSTM`` (contrib op, CPU), for onnxscript to build the node.

    A local schema object: nothing is registered in onnx's global registry.
    """
    S = onnx.defs.OpSchema
    opt, single = S.FormalParameterOption.Optional, S.FormalParameterOption.Single
    ins = [("X", "T", single), ("W", "T2", single), ("R", "T2", single), ("B", "T", opt), ("sequence_lens", "T1", opt),
           ("initial_h", "T", opt), ("initial_c", "T", opt), ("P", "T", opt), ("W_scale", "T", single),
           ("W_zero_point", "T2", single), ("R_scale", "T", single), ("R_zero_point", "T2", single)]
    outs = [("Y", "T"), ("Y_h", "T"), ("Y_c", "T")]
    A = S.AttrType
    return S("DynamicQuantizeLSTM", "com.microsoft", 1,
             inputs=[S.FormalParameter(n, t, "", param_option=o) for n, t, o in ins],
             outputs=[S.FormalParameter(n, t, "", param_option=opt) for n, t in outs],
             type_constraints=[("T", ["tensor(float)"], ""), ("T1", ["tensor(int32)"], ""),
                               ("T2", ["tensor(uint8)", "tensor(int8)"], "")],
             attributes=[S.Attribute("hidden_size", A.INT, ""), S.Attribute("direction", A.STRING, ""),
                         S.Attribute("clip", A.FLOAT, ""), S.Attribute("input_forget", A.INT, ""),
                         S.Attribute("activations", A.STRINGS, ""), S.Attribute("activation_alpha", A.FLOATS, ""),
                         S.Attribute("activation_beta", A.FLOATS, "")])


_DQ_LSTM = _values.Op(_MS, "DynamicQuantizeLSTM", _dynamic_quantize_lstm_schema())


class DynamicExportError(ValueError):
    """A dynamically quantized layer has no ONNX form ONNX Runtime runs (the message says which and why)."""


# -- torch ops the exporter translates -----------------------------------------------------------
@torch.library.custom_op("amct::dynamic_linear", mutates_args=())
def _dynamic_linear(x: torch.Tensor, w_q: torch.Tensor, w_scale: torch.Tensor, bias: torch.Tensor | None,
                    colsum: torch.Tensor, quant_act: bool, per_token: bool, symmetric: bool) -> torch.Tensor:
    w = w_q.float()
    if not quant_act:
        y = x @ (w * w_scale)
    else:
        scale, zp = dynamic_qparams(x, per_token, symmetric)
        q = dynamic_quantize(x.float(), scale, zp, symmetric)
        y = ((q - zp) @ w) * (scale * w_scale)
    return y if bias is None else y + bias


@_dynamic_linear.register_fake
def _(x, w_q, w_scale, bias, colsum, quant_act, per_token, symmetric):
    return x.new_empty((*x.shape[:-1], w_q.shape[1]))


def _onnx_dynamic_linear(x, w_q, w_scale, bias, colsum, quant_act: bool, per_token: bool, symmetric: bool):
    if not quant_act:
        y = op.MatMul(x, op.DequantizeLinear(w_q, w_scale, axis=1))
    elif not per_token and not symmetric:
        x_q, x_scale, x_zp = op.DynamicQuantizeLinear(x)
        y = op.Mul(op.Cast(op.MatMulInteger(x_q, w_q, x_zp), to=_FLOAT), op.Mul(x_scale, w_scale))
    else:
        scale, zp, x_q = _quantize_rows(x, per_token, symmetric)
        acc = op.MatMulInteger(x_q, w_q)
        if not symmetric:  # (q - zp) @ W = q @ W - zp * colsum(W)
            acc = op.Sub(acc, op.Mul(op.Cast(zp, to=_INT32), colsum))
        y = op.Mul(op.Cast(acc, to=_FLOAT), op.Mul(scale, w_scale))
    return y if bias is None else op.Add(y, bias)


def _quantize_rows(x, per_token: bool, symmetric: bool):
    """Dynamic factors with standard ops: the formulas of :func:`amct_torch.quant.dynamic.dynamic_qparams`."""
    zero = op.Constant(value_float=0.0)
    one = op.Constant(value_float=1.0)
    if per_token:
        axes = op.Constant(value_ints=[-1])
        lo, hi = op.ReduceMin(x, axes, keepdims=1), op.ReduceMax(x, axes, keepdims=1)
    else:
        lo, hi = op.ReduceMin(x, keepdims=0), op.ReduceMax(x, keepdims=0)
    lo, hi = op.Min(lo, zero), op.Max(hi, zero)
    if symmetric:
        neg = op.Neg(lo)
        scale = op.Where(op.GreaterOrEqual(hi, neg), op.Div(hi, op.Constant(value_float=127.0)),
                         op.Div(neg, op.Constant(value_float=128.0)))
        scale = op.Where(op.Less(scale, op.Constant(value_float=float(torch.finfo(torch.float32).eps))), one, scale)
        q = op.Clip(op.Round(op.Div(x, scale)), op.Constant(value_float=-128.0), op.Constant(value_float=127.0))
        return scale, None, op.Cast(q, to=_INT8)
    span = op.Sub(hi, lo)
    scale = op.Where(op.Equal(span, zero), one, op.Div(span, op.Constant(value_float=255.0)))
    top = op.Constant(value_float=255.0)
    zp = op.Round(op.Clip(op.Neg(op.Div(lo, scale)), zero, top))
    q = op.Clip(op.Add(op.Round(op.Div(x, scale)), zp), zero, top)
    return scale, zp, op.Cast(q, to=_UINT8)


@torch.library.custom_op("amct::dynamic_lstm", mutates_args=())
def _dynamic_lstm(x: torch.Tensor, h0: torch.Tensor, c0: torch.Tensor, w_q: torch.Tensor, w_scale: torch.Tensor,
                  r_q: torch.Tensor, r_scale: torch.Tensor, b: torch.Tensor, w_zp: torch.Tensor, r_zp: torch.Tensor,
                  hidden: int, dirs: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One LSTM layer in ONNX layout (gates i, o, f, c; weights ``(dirs, in, 4H)``): x ``(T, B, I)``."""
    ys, hs, cs = [], [], []
    for d in range(w_q.shape[0]):
        w = w_q[d].float() * w_scale[d]
        r = r_q[d].float() * r_scale[d]
        s, zp = dynamic_qparams(x)
        gx = (dynamic_quantize(x, s, zp) - zp) * s @ w + b[d, :4 * hidden] + b[d, 4 * hidden:]
        h, c = h0[d], c0[d]
        out: list[torch.Tensor] = [None] * x.shape[0]  # type: ignore[list-item]
        for t in (range(x.shape[0] - 1, -1, -1) if d else range(x.shape[0])):
            s, zp = dynamic_qparams(h)
            g = gx[t] + ((dynamic_quantize(h, s, zp) - zp) * s) @ r
            i, o, f, cc = g.chunk(4, dim=-1)
            c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(cc)
            h = torch.sigmoid(o) * torch.tanh(c)
            out[t] = h
        ys.append(torch.stack(out))
        hs.append(h)
        cs.append(c)
    return torch.cat(ys, dim=-1), torch.stack(hs), torch.stack(cs)


@_dynamic_lstm.register_fake
def _(x, h0, c0, w_q, w_scale, r_q, r_scale, b, w_zp, r_zp, hidden, dirs):
    return x.new_empty((x.shape[0], x.shape[1], dirs * hidden)), h0.new_empty(h0.shape), c0.new_empty(c0.shape)


def _onnx_dynamic_lstm(x, h0, c0, w_q, w_scale, r_q, r_scale, b, w_zp, r_zp, hidden: int, dirs: int):
    direction = "bidirectional" if dirs == 2 else "forward"
    y, y_h, y_c = _DQ_LSTM(x, w_q, r_q, b, None, h0, c0, None, w_scale, w_zp, r_scale, r_zp,
                                          hidden_size=hidden, direction=direction, _outputs=3)
    return _merge_directions(y), y_h, y_c


@torch.library.custom_op("amct::dynamic_gru", mutates_args=())
def _dynamic_gru(x: torch.Tensor, h0: torch.Tensor, w_q: torch.Tensor, w_scale: torch.Tensor, r_q: torch.Tensor,
                 r_scale: torch.Tensor, b: torch.Tensor, hidden: int, dirs: int) -> tuple[torch.Tensor, torch.Tensor]:
    """One GRU layer in ONNX layout (gates z, r, h; weights ``(dirs * 3H, in)``, linear_before_reset)."""
    ys, hs = [], []
    g3 = 3 * hidden
    for d in range(dirs):
        w = w_q[d * g3:(d + 1) * g3].float() * w_scale[d * g3:(d + 1) * g3, None]
        r = r_q[d * g3:(d + 1) * g3].float() * r_scale[d * g3:(d + 1) * g3, None]
        gx = x @ w.T + b[d, :g3]
        h = h0[d]
        out: list[torch.Tensor] = [None] * x.shape[0]  # type: ignore[list-item]
        for t in (range(x.shape[0] - 1, -1, -1) if d else range(x.shape[0])):
            gh = h @ r.T + b[d, g3:]
            xz, xr, xn = gx[t].chunk(3, dim=-1)
            hz, hr, hn = gh.chunk(3, dim=-1)
            z, rr = torch.sigmoid(xz + hz), torch.sigmoid(xr + hr)
            n = torch.tanh(xn + rr * hn)
            h = (1 - z) * n + z * h
            out[t] = h
        ys.append(torch.stack(out))
        hs.append(h)
    return torch.cat(ys, dim=-1), torch.stack(hs)


@_dynamic_gru.register_fake
def _(x, h0, w_q, w_scale, r_q, r_scale, b, hidden, dirs):
    return x.new_empty((x.shape[0], x.shape[1], dirs * hidden)), h0.new_empty(h0.shape)


def _onnx_dynamic_gru(x, h0, w_q, w_scale, r_q, r_scale, b, hidden: int, dirs: int):
    shape_w = op.Constant(value_ints=[dirs, 3 * hidden, -1])
    w = op.Reshape(op.DequantizeLinear(w_q, w_scale, axis=0), shape_w)
    r = op.Reshape(op.DequantizeLinear(r_q, r_scale, axis=0), shape_w)
    y, y_h = op.GRU(x, w, r, b, None, h0, hidden_size=hidden, linear_before_reset=1,
                    direction="bidirectional" if dirs == 2 else "forward")
    return _merge_directions(y), y_h


def _merge_directions(y):
    """ONNX ``Y (T, dirs, B, H)`` -> ``(T, B, dirs * H)`` (torch's layout)."""
    return op.Reshape(op.Transpose(y, perm=[0, 2, 1, 3]), op.Constant(value_ints=[0, 0, -1]))


# -- export stand-ins --------------------------------------------------------------------------
class _ExportLinear(nn.Module):
    def __init__(self, layer: CompressedLayer):
        super().__init__()
        stage = next(s for s in layer.weight_pipeline if isinstance(s, ArqWeightQuantizer))
        with torch.no_grad():
            pre = layer.weight_pipeline.input_of(stage, layer.module.weight)
            w_q = stage.integer_weight(pre)
            if layer.weight_channel_axis == 0:  # Linear (out, in) -> (in, out); Conv1D is (in, out) already
                w_q = w_q.T
            scale = stage.scale if stage.per_channel else stage.scale.expand(w_q.shape[1])
            bias = layer.effective_bias()
        self.register_buffer("weight_int8", w_q.contiguous())
        self.register_buffer("weight_scale", scale.detach().float().clone())
        self.register_buffer("colsum", w_q.to(torch.int32).sum(dim=0).to(torch.int32))
        self.register_buffer("bias", None if bias is None else bias.detach().float().clone())
        act = layer.input_quantizer
        self.quant_act = act is not None
        self.per_token = bool(getattr(act, "per_token", False))
        self.symmetric = bool(getattr(act, "symmetric", False))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.amct.dynamic_linear(x, self.weight_int8, self.weight_scale, self.bias, self.colsum,
                                             self.quant_act, self.per_token, self.symmetric)


def _reorder(t: torch.Tensor, hidden: int, order: list[int]) -> torch.Tensor:
    """Gate blocks of ``hidden`` rows in ``order`` (torch i,f,g,o -> ONNX i,o,f,c: [0, 3, 1, 2])."""
    blocks = t.split(hidden, dim=0)
    return torch.cat([blocks[i] for i in order], dim=0)


class _ExportRNN(nn.Module):
    def __init__(self, name: str, rnn: DynamicQuantRNN):
        super().__init__()
        self.lstm = isinstance(rnn, DynamicQuantLSTM)
        cfg = rnn.config
        if self.lstm and cfg.activation_bits is not None and (cfg.per_token or cfg.activation_symmetric):
            raise DynamicExportError(
                f"layer {name!r} (LSTM): {cfg.short()} has no ONNX Runtime kernel; DynamicQuantizeLSTM quantizes "
                "activations per tensor as uint8. Use DynamicQuantConfig() (the default activations) for LSTMs")
        if self.lstm and cfg.activation_bits is None:
            raise DynamicExportError(
                f"layer {name!r} (LSTM): weight-only dynamic LSTM is not exported; ONNX Runtime's DynamicQuantizeLSTM "
                "always quantizes activations. Use DynamicQuantConfig() (activation_bits=8) for LSTMs")
        self.hidden, self.layers, self.dirs = rnn.hidden_size, rnn.num_layers, rnn.num_directions
        self.batch_first = rnn.batch_first
        h = self.hidden
        order = [0, 3, 1, 2] if self.lstm else [1, 0, 2]  # ONNX gate order: LSTM i,o,f,c; GRU z,r,h
        for k in range(self.layers):
            ws, wss, rs, rss, bs = [], [], [], [], []
            for d in range(self.dirs):
                s = f"l{k}{'_reverse' if d else ''}"
                ws.append(_reorder(getattr(rnn, f"weight_ih_{s}"), h, order))
                wss.append(_reorder(getattr(rnn, f"weight_ih_{s}_scale"), h, order))
                rs.append(_reorder(getattr(rnn, f"weight_hh_{s}"), h, order))
                rss.append(_reorder(getattr(rnn, f"weight_hh_{s}_scale"), h, order))
                g = (4 if self.lstm else 3) * h
                b_ih = getattr(rnn, f"bias_ih_{s}") if rnn.has_bias else torch.zeros(g)
                b_hh = getattr(rnn, f"bias_hh_{s}") if rnn.has_bias else torch.zeros(g)
                bs.append(torch.cat([_reorder(b_ih, h, order), _reorder(b_hh, h, order)]))
            if self.lstm:  # DynamicQuantizeLSTM: W (dirs, in, 4H), R (dirs, H, 4H), scales/zero points (dirs, 4H)
                self.register_buffer(f"w_l{k}", torch.stack([w.T for w in ws]).contiguous())
                self.register_buffer(f"r_l{k}", torch.stack([r.T for r in rs]).contiguous())
                self.register_buffer(f"w_scale_l{k}", torch.stack(wss).float())
                self.register_buffer(f"r_scale_l{k}", torch.stack(rss).float())
                self.register_buffer(f"w_zp_l{k}", torch.zeros(self.dirs, 4 * h, dtype=torch.int8))
                self.register_buffer(f"r_zp_l{k}", torch.zeros(self.dirs, 4 * h, dtype=torch.int8))
            else:  # GRU: DequantizeLinear per row of (dirs * 3H, in), reshaped to (dirs, 3H, in)
                self.register_buffer(f"w_l{k}", torch.cat(ws).contiguous())
                self.register_buffer(f"r_l{k}", torch.cat(rs).contiguous())
                self.register_buffer(f"w_scale_l{k}", torch.cat(wss).float())
                self.register_buffer(f"r_scale_l{k}", torch.cat(rss).float())
            self.register_buffer(f"b_l{k}", torch.stack(bs).float())

    def forward(self, x: torch.Tensor, hx: Any = None):
        unbatched = x.dim() == 2
        if unbatched:
            raise DynamicExportError("unbatched (2-D) LSTM/GRU inputs are not exported; add a batch dimension")
        if self.batch_first:
            x = x.transpose(0, 1)
        n = self.layers * self.dirs
        if hx is None:
            h0 = x.new_zeros(n, x.shape[1], self.hidden)
            c0 = h0
        elif self.lstm:
            h0, c0 = hx
        else:
            h0, c0 = hx, None
        hs, cs = [], []
        for k in range(self.layers):
            sl = slice(k * self.dirs, (k + 1) * self.dirs)
            if self.lstm:
                x, h, c = torch.ops.amct.dynamic_lstm(
                    x, h0[sl], c0[sl], getattr(self, f"w_l{k}"), getattr(self, f"w_scale_l{k}"), getattr(self, f"r_l{k}"),
                    getattr(self, f"r_scale_l{k}"), getattr(self, f"b_l{k}"), getattr(self, f"w_zp_l{k}"),
                    getattr(self, f"r_zp_l{k}"), self.hidden, self.dirs)
                cs.append(c)
            else:
                x, h = torch.ops.amct.dynamic_gru(
                    x, h0[sl], getattr(self, f"w_l{k}"), getattr(self, f"w_scale_l{k}"), getattr(self, f"r_l{k}"),
                    getattr(self, f"r_scale_l{k}"), getattr(self, f"b_l{k}"), self.hidden, self.dirs)
            hs.append(h)
        y = x.transpose(0, 1) if self.batch_first else x
        h_n = torch.cat(hs) if len(hs) > 1 else hs[0]
        if self.lstm:
            return y, (h_n, torch.cat(cs) if len(cs) > 1 else cs[0])
        return y, h_n


def _export_copy(model: nn.Module) -> nn.Module:
    out = copy.deepcopy(model).eval()
    found = 0
    for name, m in list(out.named_modules()):
        if isinstance(m, DynamicQuantRNN):
            out.set_submodule(name, _ExportRNN(name, m))
            found += 1
        elif isinstance(m, CompressedLayer) and getattr(m, "dynamic_config", None) is not None:
            out.set_submodule(name, _ExportLinear(m))
            found += 1
    if not found:
        raise DynamicExportError("the model has no dynamically quantized layers: run "
                                 "amct_torch.quant.dynamic.quantize_dynamic(model) first")
    return out


_TRANSLATIONS = {torch.ops.amct.dynamic_linear.default: _onnx_dynamic_linear,
                 torch.ops.amct.dynamic_lstm.default: _onnx_dynamic_lstm,
                 torch.ops.amct.dynamic_gru.default: _onnx_dynamic_gru}


def export_dynamic(model: nn.Module, path: str | Path, example_inputs: Any, input_names: list[str] | None = None,
                   output_names: list[str] | None = None, dynamic_axes: dict | None = None) -> onnx.ModelProto:
    """Write the ONNX model of a :func:`~amct_torch.quant.dynamic.quantize_dynamic` model to ``path``.

    Args:
        model: the dynamically quantized model (not changed).
        path: the ``.onnx`` file to write.
        example_inputs: a tensor, a tuple of positional inputs or a dict of keyword inputs.
        input_names, output_names, dynamic_axes: as ``torch.onnx.export`` (e.g. a dynamic batch axis).

    Returns the ONNX model (also written). Raises :class:`DynamicExportError` for a layer with no form
    ONNX Runtime runs (LSTM with per-token or symmetric activations). Opset 20 plus ``com.microsoft``.

    Example::

        export_dynamic(quantize_dynamic(model), "model.onnx", torch.randn(1, 16),
                       input_names=["x"], dynamic_axes={"x": {0: "batch"}})
    """
    export_model = _export_copy(model)
    args, kwargs = normalize_inputs(example_inputs)
    with quiet(("torch.onnx", "torch.export", "torch._export", "onnxscript"), stdout=True), torch.no_grad(), \
            warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*dynamic_axes.*")
        program = torch.onnx.export(export_model, args, kwargs=kwargs or None, dynamo=True, input_names=input_names,
                                    output_names=output_names, dynamic_axes=dynamic_axes, opset_version=20,
                                    verbose=False, optimize=True, custom_translation_table=_TRANSLATIONS)
    proto = program.model_proto
    for node in proto.graph.node:  # exporter debug metadata would double the file
        del node.metadata_props[:]
        node.doc_string = ""
    if not any(o.domain == "com.microsoft" for o in proto.opset_import) and any(
            n.domain == "com.microsoft" for n in proto.graph.node):
        proto.opset_import.append(onnx.helper.make_opsetid("com.microsoft", 1))
    onnx.checker.check_model(proto)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    onnx.save(proto, str(tmp))
    tmp.replace(path)
    return proto

"""QDQ ONNX -> AMCT "deploy" ONNX (the model ATC compiles), by graph structure.

:func:`qdq_to_deploy` finds every quantizable layer of a QuantizeLinear/DequantizeLinear model (the format
``torch.onnx.export`` of fake-quantized modules and ``onnxruntime.quantization.quantize_static(...,
quant_format=QuantFormat.QDQ)`` produce, and the input of AMCT's ``convert_qat_model``) and rewrites it
into AMCT's integer form::

    x -> QuantizeLinear -> DequantizeLinear -> Conv(DequantizeLinear(W_int8), bias) -> y
  becomes
    x -> AscendQuant(scale=1/s_x, offset=o_x, dst_type) -> Conv(<layer>.weight: int8, <layer>.bias: int32)
      -> AscendDequant(<layer>.dequant.param: uint64, dtype=0) -> y

Recognised layers: Conv, ConvTranspose, Gemm and MatMul (weight as second input) whose data input is
``DequantizeLinear(QuantizeLinear(x))`` with matching per-tensor parameters (int8, uint8, int4, uint4) and
whose weight is ``DequantizeLinear(integer initializer)`` or ``DequantizeLinear(QuantizeLinear(float
initializer))`` (quantized here with ONNX QuantizeLinear semantics), symmetric (zero point 0; uint8/uint4
weights with the mid-range zero point 128/8 are the same thing shifted), per-tensor or per output channel.
Matching never looks at node names.

Arithmetic (scale is a divisor: ``q = clip(round(x/s + o))``, ``x' = (q - o)*s``):

* AscendQuant ``scale = 1/s_x``, ``offset = o_x``; uint8 activations are moved to the int8 convention
  (``o = z - 128``, the same real values), uint4 to int4 (``o = z - 8``).
* weight: int8 values (``q_w``), or INT4 values packed two per byte along C_in (:func:`pack_int4`) when
  both activation and weight are 4-bit;
* bias: ``round(b / (s_w*s_x))`` as int32 (the integers of a ``DequantizeLinear(int32)`` bias are reused
  when its scale already equals ``s_w*s_x``); overflow raises :class:`DeployConversionError` naming the layer;
* ``<layer>.dequant.param``: uint64 per output channel (or one), ``float32(s_w*s_x)`` bits in [31:0],
  ``offset_w = 0`` above (:func:`pack_deq_param`); Gemm's ``alpha`` is folded into it, ``beta`` into the bias;
* MatMul followed by a bias ``Add`` of a constant: the Add takes the int32 bias and AscendDequant goes after
  it (AMCT's ``MATMUL_DEQUANT_AFTER_ADD``).

The activation offset is *not* compensated in the graph (no ``-o_x*sum(W)`` term), exactly as AMCT: ATC
folds the AscendQuant offset into the convolution (its ``offset_x``). The reference evaluator
(:func:`amct_torch.export.ascend_ops.make_reference_evaluator`) reproduces that by subtracting the offset
before the integer convolution in an evaluation copy; see :mod:`amct_torch.export.ascend_ops`.

What stays float: a layer's *output* Q/DQ pair (the next layer's input quantization) is left as it is,
QuantizeLinear -> DequantizeLinear in float, unless it is consumed by a converted layer (then it becomes that
layer's AscendQuant); so are Q/DQ pairs in front of ops the Ascend ops cannot express (Add, pools, ...), unless
``remaining_qdq="ascend"`` asks for AMCT's ``AscendQuant -> AscendAntiQuant`` pair. A QuantizeLinear whose int8
output is a graph output becomes an AscendQuant. Layers that cannot be expressed (per-channel activation
scales, asymmetric weights, a DequantizeLinear without QuantizeLinear, weight-only quantization, blocked
quantization, ...) and integer ops ATC does not parse (DynamicQuantizeLinear, ConvInteger, MatMulInteger,
QLinearConv, ...) are listed in the :class:`DeployReport` and kept unchanged, or raise
(``on_unsupported="raise"``).
"""

from __future__ import annotations

import copy
import os
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from .ascend_ops import ASCEND_DOMAIN, deq_from_param, unpack_int4
from ._onnx_util import name_allocator, taken_names, weight_in_axis, weight_out_axis
from .files import write_all

__all__ = [
    "qdq_to_deploy", "DeployReport", "ConvertedLayer", "UnsupportedLayer", "DeployConversionError",
    "pack_deq_param", "unpack_deq_param", "pack_int4", "unpack_int4", "fake_quant_from_qdq", "convert_qat_model",
]

_LAYER_TYPES = ("Conv", "ConvTranspose", "Gemm", "MatMul")
#: ONNX integer ops ATC has no parser for ("E19010: No parser is registered for Op"), amct.md §4.4.
_INTEGER_OPS = {
    "DynamicQuantizeLinear": "dynamic (runtime) activation quantization; AscendQuant needs static scale/offset",
    "ConvInteger": "integer ONNX op not parsed by ATC (use QDQ Conv instead)",
    "MatMulInteger": "integer ONNX op not parsed by ATC (use QDQ MatMul instead)",
    "QLinearConv": "QOperator-format op not parsed by ATC (export with QuantFormat.QDQ)",
    "QLinearMatMul": "QOperator-format op not parsed by ATC (export with QuantFormat.QDQ)",
    "QGemm": "QOperator-format op not parsed by ATC (export with QuantFormat.QDQ)",
    "QLinearAdd": "QOperator-format op not parsed by ATC (export with QuantFormat.QDQ)",
    "QLinearMul": "QOperator-format op not parsed by ATC (export with QuantFormat.QDQ)",
}
# quantized type -> (AscendQuant dst_type, shift that maps the zero point to the signed convention)
_ACT_TYPES = {TensorProto.INT8: ("INT8", 0), TensorProto.UINT8: ("INT8", 128),
              TensorProto.INT4: ("INT4", 0), TensorProto.UINT4: ("INT4", 8)}
_TYPE_RANGE = {TensorProto.INT8: (-128, 127), TensorProto.UINT8: (0, 255), TensorProto.INT4: (-8, 7),
               TensorProto.UINT4: (0, 15), TensorProto.INT16: (-32768, 32767), TensorProto.UINT16: (0, 65535)}
_INT32 = (np.iinfo(np.int32).min, np.iinfo(np.int32).max)


class DeployConversionError(ValueError):
    """A layer cannot be converted (and ``on_unsupported="raise"``), or its int32 bias overflows."""


# ----------------------------------------------------------------------------------------------------------
# packing helpers
# ----------------------------------------------------------------------------------------------------------
def pack_deq_param(scale_w: np.ndarray, scale_d: float) -> np.ndarray:
    """AscendDequant's uint64 parameter: ``float32(scale_w * scale_d)`` IEEE bits in [31:0], ``offset_w = 0``.

    ``scale_w`` is a scalar or one scale per output channel; the result has the same number of elements.
    The product is taken in float64 and rounded once to float32.
    """
    deq = (np.asarray(scale_w, dtype=np.float64).reshape(-1) * float(scale_d)).astype(np.float32)
    if not np.all(np.isfinite(deq)) or np.any(deq <= 0):
        raise ValueError(f"dequant scales must be finite and positive, got {deq}")
    return np.ascontiguousarray(deq).view(np.uint32).astype(np.uint64)


def unpack_deq_param(param: np.ndarray) -> np.ndarray:
    """float32 dequant scales from a packed uint64 parameter (inverse of :func:`pack_deq_param`)."""
    return deq_from_param(np.asarray(param))


def pack_int4(w_int8: np.ndarray, axis: int) -> np.ndarray:
    """Pack INT4 values (held in int8, range [-8, 7]) two per byte along ``axis``: even index in the low nibble,
    odd index in the high nibble (AMCT's proprietary deploy format, amct.md §4.2). ``axis`` must have even length;
    the result is int8 with that axis halved. :func:`unpack_int4` inverts it.
    """
    w = np.asarray(w_int8)
    if w.size and (w.min() < -8 or w.max() > 7):
        raise ValueError("INT4 values must lie in [-8, 7]")
    moved = np.moveaxis(w.astype(np.int8), axis, -1)
    if moved.shape[-1] % 2:
        raise ValueError(f"INT4 packing axis has odd length {moved.shape[-1]}")
    low = moved[..., 0::2].view(np.uint8) & 0x0F
    high = moved[..., 1::2].view(np.uint8) & 0x0F
    packed = (low | (high << 4)).astype(np.uint8).view(np.int8)
    return np.ascontiguousarray(np.moveaxis(packed, -1, axis))


# ----------------------------------------------------------------------------------------------------------
# report
# ----------------------------------------------------------------------------------------------------------
@dataclass
class ConvertedLayer:
    """A layer rewritten to AscendQuant -> op(int) -> AscendDequant; fields named as AMCT's record (amct.md §3)."""

    name: str
    op_type: str
    dst_type: str  # activation type of AscendQuant ("INT8"/"INT4")
    wts_type: str  # "INT8"/"INT4" (INT4 packed only when dst_type is INT4 too)
    scale_d: float
    offset_d: int
    scale_w: tuple[float, ...]
    has_bias: bool
    notes: str = ""

    @property
    def weight_granularity(self) -> str:
        return "per-tensor" if len(self.scale_w) == 1 else f"per-channel[{len(self.scale_w)}]"


@dataclass
class UnsupportedLayer:
    """A node kept unchanged (float simulation or original integer op), with why."""

    name: str
    op_type: str
    reason: str


@dataclass
class DeployReport:
    converted: list[ConvertedLayer] = field(default_factory=list)
    kept_float: list[UnsupportedLayer] = field(default_factory=list)
    output_quants: list[str] = field(default_factory=list)  # QuantizeLinear graph outputs turned into AscendQuant
    notes: list[str] = field(default_factory=list)

    def layer(self, name: str) -> ConvertedLayer | None:
        return next((c for c in self.converted if c.name == name), None)

    def to_record_text(self) -> str:
        """The converted layers' factors as AMCT record-file prototext (``ScaleOffsetRecord``, amct.md §3)."""
        lines = []
        for c in self.converted:
            parts = [f"scale_d: {c.scale_d:.9g}", f"offset_d: {c.offset_d}"]
            parts += [f"scale_w: {s:.9g}" for s in c.scale_w]
            parts += ["offset_w: 0"] * len(c.scale_w)
            parts += [f'dst_type: "{c.dst_type}"', f'act_type: "{c.dst_type}"', f'wts_type: "{c.wts_type}"']
            lines.append(f'record {{ key: "{c.name}" value {{ ' + " ".join(parts) + " } }")
        return "\n".join(lines) + ("\n" if lines else "")

    def __str__(self) -> str:
        out = [f"QDQ -> AMCT deploy: {len(self.converted)} layer(s) converted, "
               f"{len(self.kept_float)} kept unconverted"]
        if self.converted:
            rows = [("layer", "op", "act", "scale_d", "offset_d", "weight", "bias", "notes")]
            for c in self.converted:
                rows.append((c.name, c.op_type, c.dst_type, f"{c.scale_d:.6g}", str(c.offset_d),
                             f"{c.wts_type} {c.weight_granularity}", "int32" if c.has_bias else "-", c.notes))
            out.append("converted:")
            out.extend(_table(rows))
        if self.kept_float:
            rows = [("node", "op", "reason")] + [(u.name, u.op_type, u.reason) for u in self.kept_float]
            out.append("kept unconverted (float QDQ simulation / original op):")
            out.extend(_table(rows))
        if self.output_quants:
            out.append("graph-output QuantizeLinear -> AscendQuant: " + ", ".join(self.output_quants))
        out.extend(f"note: {n}" for n in self.notes)
        return "\n".join(out)


def _table(rows: list[tuple[str, ...]]) -> list[str]:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    fmt = lambda r: "  " + "  ".join(v.ljust(w) for v, w in zip(r, widths)).rstrip()  # noqa: E731
    return [fmt(rows[0]), "  " + "  ".join("-" * w for w in widths)] + [fmt(r) for r in rows[1:]]


# ----------------------------------------------------------------------------------------------------------
# graph access
# ----------------------------------------------------------------------------------------------------------
class _Unsupported(Exception):
    pass


@dataclass
class _QParams:
    scale: np.ndarray  # float64, flattened
    zero_point: np.ndarray  # int64, flattened
    qtype: int
    axis: int
    block_size: int
    scale_dtype: Any


def _attrs(node: onnx.NodeProto) -> dict[str, Any]:
    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


class _GraphView:
    def __init__(self, graph: onnx.GraphProto) -> None:
        self.graph = graph
        self.inits = {t.name: t for t in graph.initializer}
        self.producer: dict[str, onnx.NodeProto] = {}
        self.consumers: dict[str, list[onnx.NodeProto]] = defaultdict(list)
        for node in graph.node:
            for o in node.output:
                self.producer[o] = node
            for i in node.input:
                if i:
                    self.consumers[i].append(node)
        self.outputs = {o.name for o in graph.output}
        self.tensor_types: dict[str, int] = {t.name: t.data_type for t in graph.initializer}
        for vi in list(graph.input) + list(graph.value_info) + list(graph.output):
            if vi.type.HasField("tensor_type"):
                self.tensor_types.setdefault(vi.name, vi.type.tensor_type.elem_type)

    def const(self, name: str) -> np.ndarray | None:
        if not name:
            return None
        if name in self.inits:
            return numpy_helper.to_array(self.inits[name])
        node = self.producer.get(name)
        if node is not None and node.op_type == "Constant":
            a = _attrs(node)
            if "value" in a:
                return numpy_helper.to_array(a["value"])
            for k in ("value_float", "value_floats", "value_int", "value_ints"):
                if k in a:
                    return np.asarray(a[k])
        return None

    def const_type(self, name: str) -> int | None:
        if name in self.inits:
            return self.inits[name].data_type
        node = self.producer.get(name)
        if node is not None and node.op_type == "Constant":
            a = _attrs(node)
            if "value" in a:
                return a["value"].data_type
        return None

    def qparams(self, node: onnx.NodeProto, *, for_dq_of: _QParams | None = None) -> _QParams:
        """Quantization parameters of a QuantizeLinear / DequantizeLinear node (constants only)."""
        scale = self.const(node.input[1]) if len(node.input) > 1 else None
        if scale is None:
            raise _Unsupported(f"{node.op_type} scale is not a constant")
        zp_name = node.input[2] if len(node.input) > 2 else ""
        a = _attrs(node)
        if zp_name:
            zp = self.const(zp_name)
            if zp is None:
                raise _Unsupported(f"{node.op_type} zero point is not a constant")
            qtype = self.const_type(zp_name)
        else:
            zp = np.zeros(scale.shape, dtype=np.int64)
            if node.op_type == "QuantizeLinear":
                qtype = a.get("output_dtype", 0) or TensorProto.UINT8
            elif for_dq_of is not None:
                qtype = for_dq_of.qtype
            else:
                qtype = self.const_type(node.input[0]) or self.tensor_types.get(node.input[0], TensorProto.UINT8)
        return _QParams(scale=np.asarray(scale, dtype=np.float64).reshape(-1),
                        zero_point=np.asarray(zp).astype(np.int64).reshape(-1), qtype=int(qtype),
                        axis=int(a.get("axis", 1)), block_size=int(a.get("block_size", 0)), scale_dtype=scale.dtype)

    def single(self, name: str, op_type: str) -> onnx.NodeProto | None:
        node = self.producer.get(name)
        return node if node is not None and node.op_type == op_type and node.domain in ("", "ai.onnx") else None


# ----------------------------------------------------------------------------------------------------------
# per-layer analysis
# ----------------------------------------------------------------------------------------------------------
@dataclass
class _LayerPlan:
    node: onnx.NodeProto
    name: str
    x_name: str  # float tensor fed to AscendQuant
    scale_d: float
    offset_d: int
    dst_type: str
    act_scale_dtype: Any
    w_q: np.ndarray  # int8 values (unpacked)
    wts_type: str
    pack_axis: int | None  # C_in axis to pack INT4 along, or None
    scale_w: np.ndarray  # float64 [C] or [1]
    out_axis_len: int
    deq: np.ndarray  # uint64
    bias_q: np.ndarray | None  # int32
    bias_add: onnx.NodeProto | None  # MatMul's bias Add
    bias_add_index: int
    notes: list[str]


def _signed_weight(values: np.ndarray, qp: _QParams) -> tuple[np.ndarray, str]:
    """Symmetric integer weights in the signed convention (int8 array) and their type name."""
    if qp.qtype in (TensorProto.INT8, TensorProto.UINT8):
        mid, wts = (0 if qp.qtype == TensorProto.INT8 else 128), "INT8"
    elif qp.qtype in (TensorProto.INT4, TensorProto.UINT4):
        mid, wts = (0 if qp.qtype == TensorProto.INT4 else 8), "INT4"
    else:
        raise _Unsupported(f"weight type {TensorProto.DataType.Name(qp.qtype)} (INT8/INT4 only)")
    if np.any(qp.zero_point != mid):
        raise _Unsupported("asymmetric weights: nonzero weight zero-point (AMCT weights are symmetric)")
    return (np.asarray(values).astype(np.int64) - mid).astype(np.int8), wts


def _quantize_linear(x: np.ndarray, qp: _QParams, axis: int) -> np.ndarray:
    """ONNX QuantizeLinear of a constant: saturate(rint(x / scale) + zp), float32 division like ONNX Runtime."""
    x = np.asarray(x, dtype=np.float32)
    shape = [1] * x.ndim
    if qp.scale.size > 1:
        shape[axis] = qp.scale.size
    s = qp.scale.astype(np.float32).reshape(shape if qp.scale.size > 1 else ())
    z = qp.zero_point.reshape(shape if qp.zero_point.size > 1 else ())
    lo, hi = _TYPE_RANGE[qp.qtype]
    return np.clip(np.rint(x / s).astype(np.int64) + z, lo, hi)


def _same_qparams(a: _QParams, b: _QParams) -> bool:
    return (a.qtype == b.qtype and a.scale.shape == b.scale.shape and np.array_equal(
        a.scale.astype(np.float32), b.scale.astype(np.float32)) and np.array_equal(a.zero_point, b.zero_point)
        and (a.scale.size == 1 or a.axis == b.axis) and a.block_size == b.block_size)


def _activation(view: _GraphView, node: onnx.NodeProto) -> tuple[str, _QParams] | None:
    """(float input of the activation Q, its params), None if the input is not dequantized at all."""
    dq = view.single(node.input[0], "DequantizeLinear")
    if dq is None:
        return None
    q = view.single(dq.input[0], "QuantizeLinear")
    if q is None:
        if view.const(dq.input[0]) is not None:
            raise _Unsupported("data input is a dequantized constant (weight as first operand); only x @ W "
                               "with a quantized activation x is supported")
        raise _Unsupported("activation DequantizeLinear has no matching QuantizeLinear (not a Q/DQ pair)")
    qp = view.qparams(q)
    dqp = view.qparams(dq, for_dq_of=qp)
    if not _same_qparams(qp, dqp):
        raise _Unsupported("activation QuantizeLinear/DequantizeLinear parameters differ")
    if qp.block_size:
        raise _Unsupported("blocked activation quantization")
    if qp.scale.size != 1 or qp.zero_point.size != 1:
        raise _Unsupported("per-channel activation quantization (AscendQuant is per-tensor)")
    if qp.qtype not in _ACT_TYPES:
        raise _Unsupported(f"activation type {TensorProto.DataType.Name(qp.qtype)} (INT8/UINT8/INT4/UINT4 only)")
    if not (np.isfinite(qp.scale[0]) and qp.scale[0] > 0):
        raise _Unsupported(f"activation scale {qp.scale[0]} is not positive")
    return q.input[0], qp


def _weight(view: _GraphView, node: onnx.NodeProto, w_name: str) -> tuple[np.ndarray, _QParams, str] | None:
    dq = view.single(w_name, "DequantizeLinear")
    if dq is None:
        return None
    src = dq.input[0]
    values = view.const(src)
    if values is not None:
        qp = view.qparams(dq)
    else:
        q = view.single(src, "QuantizeLinear")
        if q is None:
            raise _Unsupported("weight DequantizeLinear input is neither an integer constant nor "
                               "QuantizeLinear(constant)")
        fvals = view.const(q.input[0])
        if fvals is None:
            raise _Unsupported("second input is a quantized activation, not a constant weight "
                               "(activation x activation products are not supported)")
        qp = view.qparams(q)
        if not _same_qparams(qp, view.qparams(dq, for_dq_of=qp)):
            raise _Unsupported("weight QuantizeLinear/DequantizeLinear parameters differ")
        axis = qp.axis % fvals.ndim if fvals.ndim else 0
        values = _quantize_linear(fvals, qp, axis)
    if qp.block_size:
        raise _Unsupported("blocked weight quantization")
    w_q, wts = _signed_weight(values, qp)
    return w_q, qp, wts


def _bias_values(view: _GraphView, name: str) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None]:
    """(float64 values, int values or None, their scale or None) of a constant or DQ(int32 constant) bias."""
    c = view.const(name)
    if c is not None:
        if not np.issubdtype(c.dtype, np.floating):
            raise _Unsupported("bias is an integer tensor without DequantizeLinear")
        return c.astype(np.float64), None, None
    dq = view.single(name, "DequantizeLinear")
    ints = view.const(dq.input[0]) if dq is not None else None
    if ints is None:
        raise _Unsupported("bias is not a constant (or DequantizeLinear of a constant)")
    qp = view.qparams(dq)
    shape = [1] * ints.ndim
    if qp.scale.size > 1:
        shape[qp.axis % ints.ndim] = qp.scale.size
    s = qp.scale.reshape(shape if qp.scale.size > 1 else ())
    z = qp.zero_point.reshape(shape if qp.zero_point.size > 1 else ())
    real = ((ints.astype(np.int64) - z) * s).astype(np.float64)
    if np.any(qp.zero_point != 0):
        return real, None, None
    return real, ints.astype(np.int64), np.broadcast_to(s, ints.shape).astype(np.float64)


def _quantize_bias(layer: str, real: np.ndarray, exact: np.ndarray | None, exact_scale: np.ndarray | None,
                   deq: np.ndarray, n_out: int) -> np.ndarray:
    real = np.broadcast_to(real.reshape(-1), (n_out,)) if real.size == 1 else real.reshape(-1)
    deq32 = np.broadcast_to(deq.astype(np.float64), (n_out,))
    if exact is not None and exact.size == n_out and np.allclose(
            exact_scale.reshape(-1), deq32, rtol=1e-6, atol=0.0):
        q = exact.reshape(-1).astype(np.float64)
    else:
        q = np.rint(real / deq32)
    if np.any(q < _INT32[0]) or np.any(q > _INT32[1]) or not np.all(np.isfinite(q)):
        raise DeployConversionError(
            f"layer {layer!r}: quantized bias round(bias/(scale_w*scale_d)) overflows int32 "
            f"(max |bias_q| = {np.nanmax(np.abs(q)):.3g}); keep this layer in float (skip it)")
    return q.astype(np.int32)


def _analyze(view: _GraphView, node: onnx.NodeProto, name: str) -> _LayerPlan | None:
    """A plan for one layer; None if it is not quantized at all; raises _Unsupported with the reason."""
    act = _activation(view, node)
    weight = _weight(view, node, node.input[1]) if len(node.input) > 1 else None
    if act is None and weight is None:
        return None
    if act is None:
        raise _Unsupported("weight-only quantization: the data input has no QuantizeLinear/DequantizeLinear")
    if weight is None:
        raise _Unsupported("weight is not quantized (no DequantizeLinear on the weight)")
    x_name, aq = act
    w_q, wq, wts = weight
    a = _attrs(node)
    notes: list[str] = []
    if node.op_type == "MatMul" and w_q.ndim != 2:
        raise _Unsupported(f"MatMul weight of rank {w_q.ndim} (2-D weights only)")
    if node.op_type == "Gemm" and w_q.ndim != 2:
        raise _Unsupported("Gemm weight is not 2-D")
    out_axis = weight_out_axis(node, w_q.ndim)
    group = int(a.get("group", 1))
    n_out = w_q.shape[out_axis] * (group if node.op_type == "ConvTranspose" else 1)
    if wq.scale.size == 1:
        scale_w = wq.scale.copy()
    else:
        if wq.axis % w_q.ndim != out_axis:
            raise _Unsupported(f"per-channel weight scales along axis {wq.axis}, not the output-channel axis "
                               f"{out_axis}")
        if node.op_type == "ConvTranspose" and group != 1:
            raise _Unsupported("per-channel weights of a grouped ConvTranspose")
        scale_w = wq.scale.copy()
    if np.any(~np.isfinite(scale_w)) or np.any(scale_w <= 0):
        raise _Unsupported("weight scales must be positive")
    dst, shift = _ACT_TYPES[aq.qtype]
    offset_d = int(aq.zero_point[0]) - shift
    scale_d = float(aq.scale[0])
    if aq.qtype in (TensorProto.UINT8, TensorProto.UINT4):
        notes.append(f"{'uint8' if shift == 128 else 'uint4'} activation -> offset {offset_d}")

    # INT4: packed only when both sides are 4-bit (the layer's AscendQuant dst_type marks the packing).
    pack_axis = None
    cin_axis = weight_in_axis(node, w_q.ndim)
    if dst == "INT4":
        if w_q.min() < -8 or w_q.max() > 7:
            raise _Unsupported("INT4 activations with INT8 weights (INT4 layers need INT4 weights)")
        if w_q.shape[cin_axis] % 2:
            raise _Unsupported(f"INT4 weight with odd C_in ({w_q.shape[cin_axis]}) cannot be packed")
        if wts != "INT4":
            notes.append("INT8 weights within [-8, 7] packed as INT4")
        wts, pack_axis = "INT4", cin_axis
    elif wts == "INT4":
        wts = "INT8"
        notes.append("INT4 weights stored unpacked as INT8 (activation is INT8)")

    alpha = float(a.get("alpha", 1.0)) if node.op_type == "Gemm" else 1.0
    beta = float(a.get("beta", 1.0)) if node.op_type == "Gemm" else 1.0
    if alpha <= 0:
        raise _Unsupported(f"Gemm alpha {alpha} <= 0 cannot be folded into the dequant scale")
    deq_scale_w = scale_w * alpha
    if alpha != 1.0:
        notes.append(f"alpha {alpha:g} folded into the dequant scale")
    deq = pack_deq_param(deq_scale_w, scale_d)
    deq32 = unpack_deq_param(deq)

    bias_q = None
    bias_add, bias_add_index = None, -1
    bias_name = node.input[2] if node.op_type in ("Conv", "ConvTranspose", "Gemm") and len(node.input) > 2 else ""
    if bias_name:
        real, exact, exact_scale = _bias_values(view, bias_name)
        if real.size not in (1, n_out) or (real.ndim > 1 and real.shape[-1] != real.size and real.size != 1):
            raise _Unsupported(f"bias of shape {list(real.shape)} is not per output channel")
        if beta != 1.0:
            real, exact = real * beta, None
            notes.append(f"beta {beta:g} folded into the bias")
        bias_q = _quantize_bias(name, real, exact, exact_scale, deq32, n_out)
    elif node.op_type == "MatMul":
        bias_add, bias_add_index, bias_q = _matmul_bias(view, node, name, deq32, n_out)
    return _LayerPlan(node=node, name=name, x_name=x_name, scale_d=scale_d, offset_d=offset_d, dst_type=dst,
                      act_scale_dtype=aq.scale_dtype, w_q=w_q, wts_type=wts, pack_axis=pack_axis, scale_w=scale_w,
                      out_axis_len=n_out, deq=deq, bias_q=bias_q, bias_add=bias_add, bias_add_index=bias_add_index,
                      notes=notes)


def _matmul_bias(view: _GraphView, node: onnx.NodeProto, name: str, deq32: np.ndarray, n_out: int):
    out = node.output[0]
    users = view.consumers.get(out, [])
    if out in view.outputs or len(users) != 1 or users[0].op_type != "Add" or users[0].domain not in ("", "ai.onnx"):
        return None, -1, None
    add = users[0]
    if len(add.input) != 2 or add.input[0] == add.input[1]:
        return None, -1, None
    other = 1 if add.input[0] == out else 0
    try:
        real, exact, exact_scale = _bias_values(view, add.input[other])
    except _Unsupported:
        return None, -1, None
    if not (real.size == 1 or (real.size == n_out and real.shape[-1] == n_out)):
        return None, -1, None
    try:
        bias_q = _quantize_bias(name, real, exact, exact_scale, deq32, n_out)
    except DeployConversionError:
        return None, -1, None  # leave the Add in float after AscendDequant
    return add, other, bias_q


# ----------------------------------------------------------------------------------------------------------
# conversion
# ----------------------------------------------------------------------------------------------------------
def qdq_to_deploy(model: onnx.ModelProto, *, on_unsupported: Literal["keep_float", "raise"] = "keep_float",
                  remaining_qdq: Literal["keep", "ascend"] = "keep") -> tuple[onnx.ModelProto, DeployReport]:
    """Convert a QDQ ONNX model into an AMCT deploy model (see the module docstring).

    Args:
        model: the QDQ model; not modified.
        on_unsupported: ``"keep_float"`` keeps layers/nodes the Ascend ops cannot express unchanged and lists
            them in the report; ``"raise"`` raises :class:`DeployConversionError` naming them.
        remaining_qdq: what to do with per-tensor QuantizeLinear -> DequantizeLinear pairs that do not feed a
            converted layer: ``"keep"`` (float simulation, default) or ``"ascend"`` (AscendQuant ->
            AscendAntiQuant, AMCT's encoding for Add/multi-output quantization).

    Returns:
        (deploy model, report). The deploy model runs with
        :func:`amct_torch.export.ascend_ops.make_reference_evaluator`, not in ONNX Runtime.
    """
    if on_unsupported not in ("keep_float", "raise"):
        raise ValueError(f"on_unsupported must be 'keep_float' or 'raise', got {on_unsupported!r}")
    if remaining_qdq not in ("keep", "ascend"):
        raise ValueError(f"remaining_qdq must be 'keep' or 'ascend', got {remaining_qdq!r}")
    m = onnx.ModelProto()
    m.CopyFrom(model)
    g = m.graph
    view = _GraphView(g)
    report = DeployReport()

    fresh = name_allocator(taken_names(g))

    # layer names (unnamed nodes get "<op_type>_<index>")
    names: dict[int, str] = {}
    for idx, node in enumerate(g.node):
        if node.op_type in _LAYER_TYPES and node.domain in ("", "ai.onnx"):
            names[idx] = node.name or fresh(f"{node.op_type}_{idx}")

    plans: dict[int, _LayerPlan] = {}
    for idx, node in enumerate(g.node):
        if node.domain in ("", "ai.onnx", "com.microsoft") and node.op_type in _INTEGER_OPS:
            report.kept_float.append(UnsupportedLayer(node.name or f"{node.op_type}_{idx}", node.op_type,
                                                      _INTEGER_OPS[node.op_type]))
            continue
        if idx not in names:
            continue
        try:
            plan = _analyze(view, node, names[idx])
        except _Unsupported as e:
            report.kept_float.append(UnsupportedLayer(names[idx], node.op_type, str(e)))
            continue
        if plan is not None:
            plans[idx] = plan

    # QuantizeLinear nodes that are not part of a Q -> DQ pair
    out_quants: dict[int, tuple[_QParams, str]] = {}
    for idx, node in enumerate(g.node):
        if node.op_type != "QuantizeLinear" or node.domain not in ("", "ai.onnx"):
            continue
        users = view.consumers.get(node.output[0], [])
        if users and all(u.op_type == "DequantizeLinear" for u in users):
            continue
        label = node.name or f"QuantizeLinear_{idx}"
        if node.output[0] in view.outputs and not users:
            try:
                qp = view.qparams(node)
                if qp.scale.size != 1 or qp.zero_point.size != 1 or qp.block_size:
                    raise _Unsupported("per-channel/blocked QuantizeLinear graph output")
                if qp.qtype not in (TensorProto.INT8, TensorProto.INT4):
                    raise _Unsupported(f"{TensorProto.DataType.Name(qp.qtype)} QuantizeLinear graph output "
                                       "(AscendQuant emits int8 values; INT8/INT4 outputs only)")
                out_quants[idx] = (qp, label)
            except _Unsupported as e:
                report.kept_float.append(UnsupportedLayer(label, node.op_type, str(e)))
            continue
        if any(u.op_type in _INTEGER_OPS for u in users):
            continue  # reported with the integer op
        report.kept_float.append(UnsupportedLayer(label, node.op_type,
                                                  "QuantizeLinear without a matching DequantizeLinear"))

    if on_unsupported == "raise" and report.kept_float:
        lines = "; ".join(f"{u.name!r} ({u.op_type}): {u.reason}" for u in report.kept_float)
        raise DeployConversionError(f"cannot convert to an AMCT deploy model: {lines}")

    # ---- rewrite ----
    new_nodes: list[onnx.NodeProto] = []
    new_inits: list[onnx.TensorProto] = []
    quant_cache: dict[tuple, str] = {}
    deferred: dict[int, list[onnx.NodeProto]] = {}  # id(bias Add of a MatMul) -> nodes replacing it

    for idx, node in enumerate(g.node):
        if id(node) in deferred:
            new_nodes.extend(deferred.pop(id(node)))
            continue
        if idx in out_quants:
            qp, label = out_quants[idx]
            dst, shift = _ACT_TYPES[qp.qtype]
            new_nodes.append(_quant_node(label, node.input[0], node.output[0], float(qp.scale[0]),
                                         int(qp.zero_point[0]) - shift, dst))
            report.output_quants.append(label)
            continue
        plan = plans.get(idx)
        if plan is None:
            new_nodes.append(node)
            continue
        name = plan.name
        key = (plan.x_name, np.float32(1.0 / plan.scale_d).item(), plan.offset_d, plan.dst_type)
        q_out = quant_cache.get(key)
        if q_out is None:
            q_out = fresh(f"{name}.quant.output0")
            new_nodes.append(_quant_node(fresh(f"{name}.quant"), plan.x_name, q_out, plan.scale_d, plan.offset_d,
                                         plan.dst_type))
            quant_cache[key] = q_out
        w_store = pack_int4(plan.w_q, plan.pack_axis) if plan.pack_axis is not None else plan.w_q
        w_name = fresh(f"{name}.weight")
        new_inits.append(numpy_helper.from_array(np.ascontiguousarray(w_store.astype(np.int8)), w_name))
        inputs = [q_out, w_name]
        b_name = ""
        if plan.bias_q is not None:
            b_name = fresh(f"{name}.bias")
            new_inits.append(numpy_helper.from_array(plan.bias_q, b_name))
            if plan.bias_add is None:
                inputs.append(b_name)
        param_name = fresh(f"{name}.dequant.param")
        new_inits.append(numpy_helper.from_array(plan.deq, param_name))
        dtype = 1 if plan.act_scale_dtype == np.float16 else 0
        op = helper.make_node(node.op_type, inputs, [], name=name)
        op.attribute.extend(a for a in node.attribute if a.name not in ("alpha", "beta"))
        new_nodes.append(op)
        if plan.bias_add is None:
            acc = fresh(f"{name}.dequant.input0")
            op.output.append(acc)
            new_nodes.append(_dequant_node(fresh(f"{name}.dequant"), acc, param_name, node.output[0], dtype))
        else:
            mm_out = fresh(f"{name}.bias_add.input0")
            op.output.append(mm_out)
            add = plan.bias_add
            acc = fresh(f"{name}.dequant.input0")
            add_inputs = list(add.input)
            add_inputs[plan.bias_add_index] = b_name
            add_inputs[1 - plan.bias_add_index] = mm_out
            new_add = helper.make_node("Add", add_inputs, [acc], name=add.name or fresh(f"{name}.bias_add"))
            deferred[id(add)] = [new_add, _dequant_node(fresh(f"{name}.dequant"), acc, param_name, add.output[0],
                                                        dtype)]
        report.converted.append(ConvertedLayer(
            name=name, op_type=node.op_type, dst_type=plan.dst_type, wts_type=plan.wts_type, scale_d=plan.scale_d,
            offset_d=plan.offset_d, scale_w=tuple(float(s) for s in plan.scale_w), has_bias=plan.bias_q is not None,
            notes="; ".join(plan.notes)))

    del g.node[:]
    g.node.extend(new_nodes)
    g.initializer.extend(new_inits)

    _remove_dead(g, view)
    _reclaim_names(g, {t.name for t in new_inits})
    if remaining_qdq == "ascend":
        _qdq_to_quant_antiquant(g, report, fresh)
        _remove_dead(g, view)
    kept_pairs = sum(1 for n in g.node if n.op_type == "QuantizeLinear")
    if kept_pairs:
        report.notes.append(f"{kept_pairs} QuantizeLinear node(s) kept as float QDQ simulation (layer outputs / "
                            "inputs of ops without an Ascend integer form)")
    return m, report


def _quant_node(name: str, x: str, y: str, scale_d: float, offset_d: int, dst: str) -> onnx.NodeProto:
    node = helper.make_node("AscendQuant", [x], [y], name=name, domain=ASCEND_DOMAIN or None,
                            scale=float(np.float32(1.0 / scale_d)), offset=float(offset_d), dst_type=dst)
    return node


def _dequant_node(name: str, x: str, param: str, y: str, dtype: int) -> onnx.NodeProto:
    return helper.make_node("AscendDequant", [x, param], [y], name=name, domain=ASCEND_DOMAIN or None, dtype=dtype)


def _reclaim_names(g: onnx.GraphProto, new_names: set[str]) -> None:
    """``<layer>.weight_1`` -> ``<layer>.weight`` once the replaced float/QDQ tensor of that name is gone."""
    taken = {t.name for t in g.initializer} | {o for n in g.node for o in n.output} | {i.name for i in g.input}
    renames: dict[str, str] = {}
    for t in g.initializer:
        if t.name not in new_names:
            continue
        base, sep, k = t.name.rpartition("_")
        if sep and k.isdigit() and base not in taken:
            renames[t.name] = base
            taken.add(base)
    for t in g.initializer:
        t.name = renames.get(t.name, t.name)
    for n in g.node:
        for i, inp in enumerate(n.input):
            n.input[i] = renames.get(inp, inp)


def _qdq_to_quant_antiquant(g: onnx.GraphProto, report: DeployReport, fresh) -> None:
    """Per-tensor Q -> DQ pairs (still present) -> AscendQuant -> AscendAntiQuant."""
    view = _GraphView(g)
    replace: dict[int, onnx.NodeProto] = {}
    for node in g.node:
        if node.op_type != "DequantizeLinear" or node.domain not in ("", "ai.onnx"):
            continue
        q = view.single(node.input[0], "QuantizeLinear")
        if q is None:
            continue
        try:
            qp = view.qparams(q)
            if not _same_qparams(qp, view.qparams(node, for_dq_of=qp)) or qp.scale.size != 1 or qp.block_size \
                    or qp.qtype not in _ACT_TYPES:
                continue
        except _Unsupported:
            continue
        dst, shift = _ACT_TYPES[qp.qtype]
        base = node.name or q.name or node.output[0]
        q_out = fresh(f"{base}.quant.output0")
        offset = int(qp.zero_point[0]) - shift
        quant = _quant_node(fresh(f"{base}.quant"), q.input[0], q_out, float(qp.scale[0]), offset, dst)
        anti = helper.make_node("AscendAntiQuant", [q_out], [node.output[0]], name=fresh(f"{base}.anti_quant"),
                                domain=ASCEND_DOMAIN or None, scale=float(qp.scale[0]), offset=float(offset),
                                dst_type=dst)
        replace[id(node)] = (quant, anti)
    nodes = []
    for node in g.node:
        nodes.extend(replace.get(id(node), (node,)))
    del g.node[:]
    g.node.extend(nodes)
    if replace:
        report.notes.append(f"{len(replace)} QuantizeLinear/DequantizeLinear pair(s) -> AscendQuant/AscendAntiQuant")


def _subgraph_refs(g: onnx.GraphProto) -> set[str]:
    """Names read by nodes inside subgraphs (If/Loop/Scan bodies), which may come from the outer graph."""
    refs: set[str] = set()
    for node in g.node:
        for a in node.attribute:
            subs = [a.g] if a.type == onnx.AttributeProto.GRAPH else list(a.graphs)
            for sub in subs:
                refs |= {i for n in sub.node for i in n.input if i} | _subgraph_refs(sub)
    return refs


def _remove_dead(g: onnx.GraphProto, before: _GraphView) -> None:
    """Drop Q/DQ/Constant nodes and initializers the conversion left unused, and stale value_info."""
    outputs = {o.name for o in g.output} | _subgraph_refs(g)
    while True:
        used = {i for n in g.node for i in n.input if i} | outputs
        dead = [k for k, n in enumerate(g.node) if n.op_type in ("QuantizeLinear", "DequantizeLinear", "Constant")
                and n.domain in ("", "ai.onnx") and not any(o in used for o in n.output)]
        if not dead:
            break
        for k in reversed(dead):
            del g.node[k]
    used = {i for n in g.node for i in n.input if i} | outputs
    previously_used = set(before.consumers)
    keep = [t for t in g.initializer if t.name in used or t.name not in previously_used]
    removed = {t.name for t in g.initializer} - {t.name for t in keep}
    del g.initializer[:]
    g.initializer.extend(keep)
    if removed:
        inputs = [i for i in g.input if i.name not in removed]
        del g.input[:]
        g.input.extend(inputs)
    produced = {o for n in g.node for o in n.output}
    vis = [vi for vi in g.value_info if vi.name in produced]
    del g.value_info[:]
    g.value_info.extend(vis)


# ----------------------------------------------------------------------------------------------------------
# fake-quant model and file-level entry point
# ----------------------------------------------------------------------------------------------------------
def fake_quant_from_qdq(model: onnx.ModelProto) -> onnx.ModelProto:
    """The fake-quant model to ship next to the deploy model: the QDQ model itself (it runs in ONNX Runtime),
    validated with ``onnx.checker``. AMCT's own Mul/Round/Clip fake-quant encoding (amct.md §4.3) is not needed."""
    m = copy.deepcopy(model)
    onnx.checker.check_model(m)
    return m


def convert_qat_model(model_file: str | os.PathLike, save_path: str,
                      record_file: str | os.PathLike | None = None, *,
                      on_unsupported: Literal["keep_float", "raise"] = "keep_float") -> DeployReport:
    """File-level counterpart of AMCT's ``amct_onnx.convert_model.convert_qat_model``: read a QDQ ONNX file, write
    ``<save_path>_deploy_model.onnx`` and ``<save_path>_fake_quant_model.onnx`` (and the factors as an AMCT record
    file when ``record_file`` is given). ``save_path`` includes the file-name prefix, e.g. ``./outputs/lenet``."""
    model = onnx.load(os.fspath(model_file))
    fake = fake_quant_from_qdq(model)
    deploy, report = qdq_to_deploy(model, on_unsupported=on_unsupported)
    prefix = Path(os.fspath(save_path))
    writers = {prefix.with_name(prefix.name + "_deploy_model.onnx"): lambda p: onnx.save(deploy, p),
               prefix.with_name(prefix.name + "_fake_quant_model.onnx"): lambda p: onnx.save(fake, p)}
    if record_file is not None:
        writers[Path(record_file)] = lambda p: Path(p).write_text(report.to_record_text(), encoding="utf-8")
    write_all(writers)
    return report

"""Insert QuantizeLinear/DequantizeLinear into a float ONNX model from an AMCT record.

This is how AMCT's ``save_model(modified_onnx, record, save_path)`` works from files alone: the
modified ONNX holds the BN-folded float graph whose layer nodes are named by module path, and the record
holds each layer's factors. For every record layer found as a node:

* ``scale_d``/``offset_d`` -> ``<layer>.input_quant`` / ``<layer>.input_dequant`` on the data input;
* ``scale_w``/``offset_w`` -> the weight initializer quantized to int8 ``<layer>.weight`` (per tensor
  when one scale, else per output channel) and ``<layer>.weight_dequant``.

Output-channel axis of the weight: Conv 0, ConvTranspose 1, Gemm 0 with ``transB=1`` else 1, MatMul 1.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper, numpy_helper

from ..config.record import Record
from ._onnx_util import weight_out_axis

__all__ = ["insert_qdq", "InsertError"]

_OPS = {"Conv", "ConvTranspose", "Gemm", "MatMul", "AveragePool"}
_BITS = {"INT4": 4, "INT8": 8, "INT16": 16}


class InsertError(ValueError):
    """The record and the model do not fit together (missing layer, shape mismatch)."""


def insert_qdq(model: onnx.ModelProto, record: Record, *, strict: bool = True) -> onnx.ModelProto:
    """A copy of ``model`` with the record's factors inserted as Q/DQ pairs (see the module docstring)."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    g = out.graph
    nodes = {n.name: n for n in g.node}
    inits = {t.name: t for t in g.initializer}
    missing = [name for name in record.layers if name not in nodes]
    if missing and strict:
        raise InsertError(f"record layers not found as nodes of the model: {', '.join(missing)}; the record and the "
                          "modified ONNX model must come from the same quantize_model call")
    new_nodes: dict[str, list[onnx.NodeProto]] = {}
    for name, rec in record.layers.items():
        node = nodes.get(name)
        if node is None:
            continue
        if node.op_type not in _OPS:
            raise InsertError(f"layer {name!r} is a {node.op_type} node; quantizable: {', '.join(sorted(_OPS))}")
        before: list[onnx.NodeProto] = []
        if rec.scale_d is not None:
            bits = _BITS.get(rec.act_type or "INT8", 8)
            if bits != 8:
                raise InsertError(f"layer {name!r}: act_type {rec.act_type} has no standard Q/DQ form (INT8 only)")
            s, z = f"{name}.input_quant.scale", f"{name}.input_quant.zero_point"
            g.initializer.append(numpy_helper.from_array(np.array(rec.scale_d, np.float32), s))
            g.initializer.append(numpy_helper.from_array(np.array(rec.offset_d or 0, np.int8), z))
            q_out, dq_out = f"{name}.input_quant.out", f"{name}.input_dequant.out"
            before.append(helper.make_node("QuantizeLinear", [node.input[0], s, z], [q_out], name=f"{name}.input_quant"))
            before.append(helper.make_node("DequantizeLinear", [q_out, s, z], [dq_out], name=f"{name}.input_dequant"))
            node.input[0] = dq_out
        if rec.scale_w:
            if len(node.input) < 2 or node.input[1] not in inits:
                raise InsertError(f"layer {name!r}: its weight is not an initializer of the model")
            w = numpy_helper.to_array(inits[node.input[1]]).astype(np.float32)
            axis = weight_out_axis(node, w.ndim)
            scale = np.asarray(rec.scale_w, np.float32)
            if scale.size not in (1, w.shape[axis]):
                raise InsertError(f"layer {name!r}: {scale.size} weight scales for {w.shape[axis]} output channels")
            bits = _BITS.get(rec.wts_type or "INT8", 8)
            qmin, qmax = -(1 << (bits - 1)), (1 << (bits - 1)) - 1
            shape = [1] * w.ndim
            shape[axis] = -1
            s_b = scale.reshape(shape) if scale.size > 1 else scale.reshape(())
            q = np.clip(np.rint(w / s_b), qmin, qmax).astype(np.int8 if bits <= 8 else np.int16)
            wq, ws, wz = f"{name}.weight", f"{name}.weight_quant.scale", f"{name}.weight_quant.zero_point"
            g.initializer.append(numpy_helper.from_array(q, wq))
            g.initializer.append(numpy_helper.from_array(scale if scale.size > 1 else scale.reshape(()), ws))
            g.initializer.append(numpy_helper.from_array(np.zeros(scale.shape if scale.size > 1 else (), q.dtype), wz))
            attrs = {"axis": axis} if scale.size > 1 else {}
            dq_w = f"{name}.weight_dequant.out"
            before.append(helper.make_node("DequantizeLinear", [wq, ws, wz], [dq_w], name=f"{name}.weight_dequant", **attrs))
            node.input[1] = dq_w
        new_nodes[name] = before
    ordered: list[onnx.NodeProto] = []
    for node in g.node:
        ordered.extend(new_nodes.get(node.name, []))
        ordered.append(node)
    del g.node[:]
    g.node.extend(ordered)
    used = {i for n in g.node for i in n.input} | {o.name for o in g.output}
    keep = [t for t in g.initializer if t.name in used]
    del g.initializer[:]
    g.initializer.extend(keep)
    onnx.checker.check_model(out)
    return out

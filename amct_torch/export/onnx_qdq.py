"""The fake-quant model for ONNX Runtime: standard QuantizeLinear/DequantizeLinear, named by module path.

The calibrated model is exported with ``torch.onnx.export`` (the torch.export-based exporter) while its
quantizers run ``torch.ops.amct.fake_quant`` with fixed factors, which we translate to Q/DQ pairs. Then:

* weight Q/DQ pairs become an int8 initializer ``<layer>.weight`` feeding a DequantizeLinear (the
  form onnxruntime fuses into integer kernels, and the deploy converter reads);
* nodes are renamed from the module paths the exporter records in each node's name scopes:
  ``<layer>`` (the Conv/Gemm/MatMul), ``<layer>.input_quant`` / ``<layer>.input_dequant``,
  ``<layer>.weight_dequant``.
"""

from __future__ import annotations

import copy
import re
import warnings
from typing import Any

import numpy as np
import onnx
import torch
import torch.nn as nn
from onnx import TensorProto, helper, numpy_helper
from onnxscript import opset20 as op

from .._quiet import quiet
from ..graph.capture import normalize_inputs
from ..nn import CompressedConv, CompressedLayer
from ..quant.formulas import qrange
from ..quant.ptq import weight_quantizer
from ..quant.qdq_op import fake_quant as fake_quant_op
from ..quant.quantizers import ActivationQuantizer, ArqWeightQuantizer
from ._onnx_util import name_allocator

__all__ = ["export_qdq_model"]

_LAYER_OPS = {"Conv", "ConvTranspose", "Gemm", "MatMul", "AveragePool"}


class _FrozenQuantWeight(nn.Module):
    """The export stand-in for a weight pipeline: the fake-quantized weight as a constant, through Q/DQ."""

    def __init__(self, value: torch.Tensor, stage: ArqWeightQuantizer):
        super().__init__()
        self.register_buffer("value", value.detach().clone())
        self.scale = stage.scale.detach().clone()
        self.zero_point = stage.offset.detach().to(torch.int8 if stage.bits <= 8 else torch.int16)
        self.axis = stage.axis if stage.per_channel else 0
        self.qmin, self.qmax = qrange(stage.bits)
        if stage.per_channel and stage.axis == 1 and value.dim() > 2 and stage.groups > 1:
            raise ValueError("grouped ConvTranspose weights have no per-axis ONNX form; quantize them per_tensor")

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return fake_quant_op(self.value, self.scale, self.zero_point, self.axis, self.qmin, self.qmax)


def _prepare_for_onnx(model: nn.Module) -> None:
    """Fix every factor: activation quantizers to Q/DQ mode, weight pipelines to constants through Q/DQ."""
    for m in model.modules():
        if isinstance(m, CompressedLayer) and getattr(m.module, "bias", None) is not None:
            with torch.no_grad():  # pruning masks on the bias: baked before the pipeline is frozen
                m.module.bias.copy_(m.effective_bias())
        if isinstance(m, CompressedConv):
            m.bake_batch_norm()  # QAT: the BN trained folded becomes the conv's weight and bias
    for m in model.modules():
        if isinstance(m, ActivationQuantizer):
            m.set_onnx_mode(True)
        if isinstance(m, CompressedLayer) and m.weight_pipeline is not None:
            stage = weight_quantizer(m)
            if stage is not None:
                with torch.no_grad():
                    value = m.effective_weight()
                m.weight_pipeline = type(m.weight_pipeline)([_FrozenQuantWeight(value, stage)])


def _fake_quant_onnx(x, scale, zero_point, axis: int, qmin: int, qmax: int):
    q = op.QuantizeLinear(x, scale, zero_point, axis=axis)
    return op.DequantizeLinear(q, scale, zero_point, axis=axis)


def _scopes(node: onnx.NodeProto) -> list[str]:
    for p in node.metadata_props:
        if p.key == "pkg.torch.onnx.name_scopes":
            try:
                return list(eval(p.value, {"__builtins__": {}}))  # a Python list literal of strings
            except Exception:  # noqa: BLE001 - metadata is best effort
                return []
    return []


def _owner(scopes: list[str], layers: set[str]) -> tuple[str | None, str | None]:
    """The wrapper a node belongs to, and its role (``input_quantizer``, ``weight_pipeline`` or ``op``)."""
    for i in range(len(scopes) - 1, -1, -1):
        if scopes[i] in layers:
            rest = scopes[i + 1] if i + 1 < len(scopes) else ""
            role = "input_quantizer" if rest.endswith(".input_quantizer") else (
                "weight_pipeline" if ".weight_pipeline" in rest else (
                    "output_quantizer" if rest.endswith(".output_quantizer") else "op"))
            return scopes[i], role
    return None, None


def _quantize_linear(x: np.ndarray, scale: np.ndarray, zp: np.ndarray, axis: int) -> np.ndarray:
    if scale.size > 1:
        shape = [1] * x.ndim
        shape[axis] = -1
        scale, zp = scale.reshape(shape), zp.reshape(shape)
    info = np.iinfo(zp.dtype)
    q = np.rint(x / scale) + zp.astype(np.int64)
    return np.clip(q, info.min, info.max).astype(zp.dtype)


def _fold_weight_quant(model: onnx.ModelProto, names: dict[str, str]) -> None:
    """QuantizeLinear(float initializer) -> int8 initializer, so the weight is stored as integers."""
    g = model.graph
    inits = {t.name: t for t in g.initializer}
    consts = {n.output[0]: n for n in g.node if n.op_type == "Constant"}

    def value(name: str) -> np.ndarray | None:
        if name in inits:
            return numpy_helper.to_array(inits[name])
        if name in consts:
            return numpy_helper.to_array(consts[name].attribute[0].t)
        return None

    drop = []
    for node in g.node:
        if node.op_type != "QuantizeLinear":
            continue
        w = value(node.input[0])
        scale = value(node.input[1])
        zp = value(node.input[2]) if len(node.input) > 2 else np.zeros((), np.uint8)
        if w is None or scale is None or zp is None:
            continue
        axis = next((a.i for a in node.attribute if a.name == "axis"), 1)
        q = _quantize_linear(w.astype(np.float32), scale.astype(np.float32), zp, axis)
        layer = names.get(node.name)
        new_name = f"{layer}.weight" if layer else node.output[0] + "_int"
        g.initializer.append(numpy_helper.from_array(q, new_name))
        for other in g.node:
            for i, inp in enumerate(other.input):
                if inp == node.output[0]:
                    other.input[i] = new_name
        drop.append(node)
    for node in drop:
        g.node.remove(node)
    used = {i for n in g.node for i in n.input} | {o.name for o in g.output}
    keep = [t for t in g.initializer if t.name in used]
    del g.initializer[:]
    g.initializer.extend(keep)


def _rename(model: onnx.ModelProto, layers: set[str], quantizers: set[str] = frozenset()) -> dict[str, str]:
    """Rename nodes after their layer's module path; returns ``{weight QuantizeLinear name: layer}``.

    ``quantizers``: paths of activation quantizers outside layers (inserted after adds, pools, ...): their
    Q/DQ become ``<path>.quant`` / ``<path>.dequant``.
    """
    weight_q: dict[str, str] = {}
    owners = [_owner(_scopes(node), layers) for node in model.graph.node]
    standalone = [next((s for s in reversed(_scopes(node)) if s in quantizers), None)
                  if layer is None and node.op_type in ("QuantizeLinear", "DequantizeLinear") else None
                  for node, (layer, _) in zip(model.graph.node, owners)]
    unique = name_allocator((n.name for n, (layer, _), q in zip(model.graph.node, owners, standalone)
                             if layer is None and q is None), first_suffix=2)
    for node, (layer, role), quantizer in zip(model.graph.node, owners, standalone):
        if quantizer is not None:
            node.name = unique(f"{quantizer}.{'quant' if node.op_type == 'QuantizeLinear' else 'dequant'}")
            continue
        if layer is None:
            continue
        if role == "op" and node.op_type in _LAYER_OPS:
            node.name = unique(layer)
        elif role in ("input_quantizer", "output_quantizer"):
            kind = "input" if role == "input_quantizer" else "output"
            node.name = unique(f"{layer}.{kind}_{'quant' if node.op_type == 'QuantizeLinear' else 'dequant'}")
        elif role == "weight_pipeline" and node.op_type in ("QuantizeLinear", "DequantizeLinear"):
            node.name = unique(f"{layer}.weight_{'quant' if node.op_type == 'QuantizeLinear' else 'dequant'}")
            if node.op_type == "QuantizeLinear":
                weight_q[node.name] = layer
        else:
            node.name = unique(f"{layer}.{node.op_type.lower()}")
    return weight_q


def _transpose_weights(model: onnx.ModelProto) -> None:
    """``DQ(W int8) -> Transpose -> MatMul`` (a Linear on 3-D input) becomes ``DQ(W^T int8) -> MatMul``.

    The deploy converter, onnxruntime's QDQ fusion and ATC all expect the weight DQ to feed the op.
    """
    g = model.graph
    inits = {t.name: t for t in g.initializer}
    producer = {o: n for n in g.node for o in n.output}
    drop = []
    for node in g.node:
        if node.op_type != "MatMul" or len(node.input) < 2:
            continue
        tr = producer.get(node.input[1])
        if tr is None or tr.op_type != "Transpose":
            continue
        perm = next((list(a.ints) for a in tr.attribute if a.name == "perm"), None)
        dq = producer.get(tr.input[0])
        if perm != [1, 0] or dq is None or dq.op_type != "DequantizeLinear" or dq.input[0] not in inits:
            continue
        w = numpy_helper.to_array(inits[dq.input[0]])
        new_w = numpy_helper.from_array(np.ascontiguousarray(w.T), dq.input[0])
        inits[dq.input[0]].CopyFrom(new_w)
        for a in dq.attribute:
            if a.name == "axis":
                a.i = 1 - (a.i % 2)
        node.input[1] = dq.output[0]
        drop.append(tr)
    for tr in drop:
        if not any(tr.output[0] in n.input for n in g.node):
            g.node.remove(tr)


def _global_average_pools(model: onnx.ModelProto) -> None:
    """``ReduceMean`` over every spatial axis with ``keepdims=1`` -> ``GlobalAveragePool`` (the same values).

    ``adaptive_avg_pool2d(x, 1)`` exports as ReduceMean, which ONNX Runtime has no integer kernel for;
    between a DequantizeLinear and a QuantizeLinear, GlobalAveragePool runs as QLinearGlobalAveragePool.
    """
    g = model.graph
    ranks = {v.name: len(v.type.tensor_type.shape.dim) for v in [*g.value_info, *g.input]
             if v.type.tensor_type.HasField("shape")}
    consts = {t.name: numpy_helper.to_array(t) for t in g.initializer}
    consts.update({n.output[0]: numpy_helper.to_array(n.attribute[0].t) for n in g.node
                   if n.op_type == "Constant" and n.attribute and n.attribute[0].name == "value"})
    for i, node in enumerate(g.node):
        if node.op_type != "ReduceMean" or len(node.input) != 2 or node.input[1] not in consts:
            continue
        attrs = {a.name: a.i for a in node.attribute}
        rank = ranks.get(node.input[0])
        if attrs.get("keepdims", 1) != 1 or rank is None or rank < 3:
            continue
        axes = sorted(int(a) % rank for a in np.atleast_1d(consts[node.input[1]]))
        if axes != list(range(2, rank)):
            continue
        g.node[i].CopyFrom(helper.make_node("GlobalAveragePool", [node.input[0]], list(node.output), name=node.name))


def _quantize_gemm_bias(model: onnx.ModelProto) -> None:
    """A Gemm with quantized A and B gets its bias as ``DequantizeLinear(int32, s_a*s_b)``.

    ONNX Runtime fuses ``DQ(A), DQ(B), DQ(bias) -> Gemm`` into QGemm (with a float output); with a float
    bias it leaves the Gemm in float. The bias moves by at most half of ``s_a*s_b`` (what AMCT's deploy
    model does too: ``round(bias / deq_scale)``).
    """
    g = model.graph
    values = {t.name: numpy_helper.to_array(t) for t in g.initializer}
    values.update({n.output[0]: numpy_helper.to_array(n.attribute[0].t) for n in g.node
                   if n.op_type == "Constant" and n.attribute and n.attribute[0].name == "value"})
    producer = {o: n for n in g.node for o in n.output}
    new_nodes = []
    for node in g.node:
        if node.op_type != "Gemm" or len(node.input) != 3 or node.input[2] not in values:
            continue
        attrs = {a.name: a for a in node.attribute}
        if "alpha" in attrs and attrs["alpha"].f != 1.0 or "beta" in attrs and attrs["beta"].f != 1.0:
            continue
        dq_a, dq_b = producer.get(node.input[0]), producer.get(node.input[1])
        if not (dq_a and dq_b and dq_a.op_type == dq_b.op_type == "DequantizeLinear"):
            continue
        s_a, s_b = values.get(dq_a.input[1]), values.get(dq_b.input[1])
        bias = values[node.input[2]]
        if s_a is None or s_b is None or s_a.size != 1 or bias.dtype != np.float32 or s_b.size not in (1, bias.size):
            continue
        scale = (s_a.reshape(()) * s_b.reshape(-1)).astype(np.float32)
        if np.any(scale <= 0):
            continue
        q = np.round(bias.reshape(-1) / scale)
        if np.abs(q).max(initial=0) >= 2 ** 31:
            continue
        base = node.name or node.output[0]
        names = [f"{base}.bias_int32", f"{base}.bias_scale", f"{base}.bias_zero_point"]
        zp = np.zeros(scale.shape, np.int32)
        g.initializer.extend([numpy_helper.from_array(q.astype(np.int32), names[0]),
                              numpy_helper.from_array(scale if scale.size > 1 else scale.reshape(()), names[1]),
                              numpy_helper.from_array(zp if zp.size > 1 else zp.reshape(()), names[2])])
        new_nodes.append(helper.make_node("DequantizeLinear", names, [f"{base}.bias_dequantized"],
                                          name=f"{base}.bias_dequant", axis=0))
        node.input[2] = f"{base}.bias_dequantized"
    for n in reversed(new_nodes):
        g.node.insert(0, n)
    used = {i for n in g.node for i in n.input}
    keep = [t for t in g.initializer if t.name in used or t.name in {o.name for o in g.output}]
    del g.initializer[:]
    g.initializer.extend(keep)


_QNAME = re.compile(r"^(?P<path>.+?)(?:\.(?P<slot>input|output)_(?:quant|dequant)|\.(?:quant|dequant))(?:_\d+)?$")


def _narrow_activation_types(model: onnx.ModelProto, bits_of: dict[str, int]) -> None:
    """4- and 16-bit activation Q/DQ pairs: INT4 zero points (opset 21 types) and opset 21 for INT16.

    ``bits_of`` maps quantizer module paths to their bit width; Q/DQ nodes are found by their names
    (``<layer>.input_quant``, ``<path>.quant``, ...). The values do not change: 4-bit quantizers run with
    int8 zero points in [-8, 7] and saturate at [-8, 7] in PyTorch; here the type says so to ONNX.
    """
    g = model.graph
    values = {t.name: t for t in g.initializer}
    narrowed = False
    new_inits = {}
    for node in g.node:
        if node.op_type not in ("QuantizeLinear", "DequantizeLinear") or len(node.input) < 3:
            continue
        m = _QNAME.match(node.name)
        if not m:
            continue
        path = f"{m['path']}.{m['slot']}_quantizer" if m["slot"] else m["path"]
        bits = bits_of.get(path)
        if bits is None or bits == 8:
            continue
        narrowed = True
        if bits != 4:
            continue
        zp = node.input[2]
        if zp not in values:
            continue
        name = f"{zp}.int4"
        if name not in new_inits:
            arr = numpy_helper.to_array(values[zp]).astype(np.int8)
            new_inits[name] = int4_tensor(name, arr)
        node.input[2] = name
    g.initializer.extend(new_inits.values())
    q_outputs = {n.output[0] for n in g.node if n.op_type == "QuantizeLinear" and n.input[2] in new_inits}
    for vi in g.value_info:
        if vi.name in q_outputs:
            vi.type.tensor_type.elem_type = TensorProto.INT4
    if narrowed:
        for o in model.opset_import:
            if o.domain in ("", "ai.onnx") and o.version < 21:
                o.version = 21
        used = {i for n in g.node for i in n.input}
        keep = [t for t in g.initializer if t.name in used]
        del g.initializer[:]
        g.initializer.extend(keep)


def int4_tensor(name: str, values: np.ndarray) -> onnx.TensorProto:
    """An ONNX INT4 tensor, packed two values per byte (low nibble first) in ``raw_data``."""
    flat = np.asarray(values, dtype=np.int8).reshape(-1)
    if flat.size % 2:
        flat = np.concatenate([flat, np.zeros(1, np.int8)])
    nibbles = flat.astype(np.uint8) & 0x0F
    packed = (nibbles[0::2] | (nibbles[1::2] << 4)).astype(np.uint8)
    return helper.make_tensor(name, TensorProto.INT4, list(np.shape(values)), packed.tobytes(), raw=True)


def _pack_int4_weights(model: onnx.ModelProto, layers: set[str]) -> None:
    """Store the integer weights ``<layer>.weight`` of ``layers`` as ONNX INT4 (two values per byte).

    Their DequantizeLinear zero points become INT4 too, and the model moves to opset 21 (the INT4 types).
    """
    g = model.graph
    inits = {t.name: t for t in g.initializer}
    new: dict[str, onnx.TensorProto] = {}
    for node in g.node:
        if node.op_type != "DequantizeLinear" or len(node.input) < 3 or node.input[0] not in inits:
            continue
        name = node.input[0]
        if not name.endswith(".weight") or name[:-len(".weight")] not in layers:
            continue
        for k, src in ((0, name), (2, node.input[2])):
            if src not in inits or inits[src].data_type not in (TensorProto.INT8, TensorProto.INT4):
                break
            if inits[src].data_type == TensorProto.INT4:
                continue
            arr = numpy_helper.to_array(inits[src]).astype(np.int8)
            if arr.size and (arr.min() < -8 or arr.max() > 7):
                raise ValueError(f"{name}: 4-bit weight values outside [-8, 7]")
            key = f"{src}.int4" if k == 2 else src
            if key not in new:
                new[key] = int4_tensor(key, arr)
            node.input[k] = key
    if not new:
        return
    keep = [t for t in g.initializer if t.name not in new]
    del g.initializer[:]
    g.initializer.extend(keep + list(new.values()))
    used = {i for n in g.node for i in n.input}
    keep = [t for t in g.initializer if t.name in used]
    del g.initializer[:]
    g.initializer.extend(keep)
    for o in model.opset_import:
        if o.domain in ("", "ai.onnx") and o.version < 21:
            o.version = 21


_NARROW_INT_RANGE = {"int4": (-8, 7), "uint4": (0, 15)}


def _drop_redundant_clips(model: onnx.ModelProto) -> None:
    """Bypass ``Clip(lo, hi) -> QuantizeLinear`` when the clip cannot change the quantized value.

    That holds when ``lo`` quantizes to ``qmin`` or below and ``hi`` to ``qmax`` or above: everything the
    clip would cut is saturated by the quantizer anyway. (A ReLU6 whose output range was calibrated to
    [0, 6] is the common case; onnxruntime only fuses it when the float bounds match to 1 ulp.)
    """
    g = model.graph
    inits = {t.name: numpy_helper.to_array(t) for t in g.initializer}
    consts = {n.output[0]: numpy_helper.to_array(n.attribute[0].t) for n in g.node if n.op_type == "Constant"}
    value = lambda name: inits.get(name, consts.get(name))  # noqa: E731
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for n in g.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    outputs = {o.name for o in g.output}
    for clip in [n for n in g.node if n.op_type == "Clip" and len(n.input) == 3]:
        users = consumers.get(clip.output[0], [])
        lo, hi = value(clip.input[1]), value(clip.input[2])
        if clip.output[0] in outputs or lo is None or hi is None or not users \
                or any(u.op_type != "QuantizeLinear" for u in users):
            continue
        safe = True
        for q in users:
            scale, zp = value(q.input[1]), value(q.input[2])
            if scale is None or zp is None or scale.size != 1:
                safe = False
                break
            # INT4/UINT4 zero points load as onnx's 4-bit numpy types, which np.iinfo does not know
            zmin, zmax = _NARROW_INT_RANGE.get(zp.dtype.name) or (np.iinfo(zp.dtype).min, np.iinfo(zp.dtype).max)
            q_lo = np.rint(np.float32(lo) / np.float32(scale)) + int(zp)
            q_hi = np.rint(np.float32(hi) / np.float32(scale)) + int(zp)
            safe &= bool(q_lo <= zmin and q_hi >= zmax)
        if safe:
            for q in users:
                q.input[0] = clip.input[0]
            g.node.remove(clip)


def _unique_dequantize(model: onnx.ModelProto) -> None:
    """Give every consumer of a shared DequantizeLinear its own copy (and of the QuantizeLinear before it).

    The exporter's optimizer merges identical Q/DQ pairs (two layers reading one tensor with equal
    factors); onnxruntime fuses DQ -> Conv -> Q into an integer kernel only when the DQ is the layer's own.
    """
    g = model.graph
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for n in g.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    graph_outputs = {o.name for o in g.output}
    producer = {o: n for n in g.node for o in n.output}

    def clone(node: onnx.NodeProto, k: int) -> onnx.NodeProto:
        c = onnx.NodeProto()
        c.CopyFrom(node)
        c.name = f"{node.name}_{k}"
        c.output[0] = f"{node.output[0]}_{k}"
        return c

    out: list[onnx.NodeProto] = []
    for n in g.node:
        out.append(n)
        if n.op_type != "DequantizeLinear" or n.output[0] in graph_outputs:
            continue
        users = consumers.get(n.output[0], [])
        q = producer.get(n.input[0])
        for k, user in enumerate(users[1:], start=2):
            dq = clone(n, k)
            if q is not None and q.op_type == "QuantizeLinear":  # a pair of its own, Q included
                q_copy = clone(q, k)
                dq.input[0] = q_copy.output[0]
                out.append(q_copy)
            for i, inp in enumerate(user.input):
                if inp == n.output[0]:
                    user.input[i] = dq.output[0]
            out.append(dq)
    del g.node[:]
    g.node.extend(out)


def export_qdq_model(model: nn.Module, example_inputs: Any, *, input_names: list[str] | None = None,
                     output_names: list[str] | None = None, dynamic_axes: dict | None = None,
                     opset_version: int = 20, int4_weights: str = "auto") -> onnx.ModelProto:
    """The QDQ fake-quant ONNX model of a calibrated ``model`` (the model itself is not changed).

    ``int4_weights``: how 4-bit weights are stored. ``auto``: packed ONNX INT4 where the layer's input is
    4-bit too (A4W4: ONNX Runtime has no integer kernel for INT4 activations either way), int8 values in
    [-8, 7] otherwise (A8W4: ONNX Runtime then runs the layer as an int8 integer kernel, the fast path);
    ``packed``: always INT4 (half the size, float kernels in ONNX Runtime); ``int8``: never packed.

    Quantizers that define ``set_onnx_mode`` export as Q/DQ; any other module (e.g. a frozen weight) as
    itself, so the same function also writes the float "modified" model of the AMCT flow.
    """
    layers = {name for name, m in model.named_modules() if isinstance(m, CompressedLayer)}
    quantizers = {name for name, m in model.named_modules()
                  if isinstance(m, ActivationQuantizer) and not any(name.startswith(f"{l}.") for l in layers)}
    export_model = copy.deepcopy(model).eval()
    _prepare_for_onnx(export_model)
    args, kwargs = normalize_inputs(example_inputs)
    with quiet(("torch.onnx", "torch.export", "torch._export", "onnxscript"), stdout=True), torch.no_grad(), \
            warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*dynamic_axes.*")
        program = torch.onnx.export(export_model, args, kwargs=kwargs or None, dynamo=True, input_names=input_names,
                                    output_names=output_names, dynamic_axes=dynamic_axes,
                                    opset_version=opset_version, verbose=False, optimize=True,
                                    custom_translation_table={torch.ops.amct.fake_quant.default: _fake_quant_onnx})
    proto = program.model_proto
    weight_q = _rename(proto, layers, quantizers)
    _narrow_activation_types(proto, {name: m.bits for name, m in model.named_modules() if isinstance(m, ActivationQuantizer)})
    _fold_weight_quant(proto, weight_q)
    if int4_weights not in ("auto", "packed", "int8"):
        raise ValueError(f"int4_weights: got {int4_weights!r}; allowed: 'auto', 'packed' or 'int8'")
    if int4_weights != "int8":
        four = set()
        for name, m in model.named_modules():
            stage = weight_quantizer(m) if isinstance(m, CompressedLayer) else None
            if stage is not None and stage.bits == 4 and (int4_weights == "packed" or (
                    isinstance(m.input_quantizer, ActivationQuantizer) and m.input_quantizer.bits == 4)):
                four.add(name)
        _pack_int4_weights(proto, four)
    _transpose_weights(proto)
    _global_average_pools(proto)
    _quantize_gemm_bias(proto)
    _drop_redundant_clips(proto)
    _unique_dequantize(proto)
    for node in proto.graph.node:  # exporter debug metadata (stack traces, fx nodes) would double the file
        del node.metadata_props[:]
        node.doc_string = ""
    for t in proto.graph.initializer:
        if t.name.endswith(".module.bias"):
            old = t.name
            t.name = old.replace(".module.bias", ".bias")
            for n in proto.graph.node:
                for i, inp in enumerate(n.input):
                    if inp == old:
                        n.input[i] = t.name
    onnx.checker.check_model(proto)
    return proto

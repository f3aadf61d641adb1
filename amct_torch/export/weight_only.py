"""ONNX export of a weight-only quantized model: integer weights, block DequantizeLinear, float activations.

    model = quantize_weight_only(model, WeightOnlyConfig(bits=4, group_size=32), ...)
    export_weight_only(model, "model.onnx", x)

Every weight-only layer becomes ``DequantizeLinear(W_int, scale, zero_point) -> MatMul`` (or ``Gemm`` where
the exporter made one), opset 21:

* the weight is stored ``(in, out)`` (the MatMul ``B`` layout; a Linear's weight is transposed), as ONNX
  INT4 (two values per byte) for 4 bits and INT8 for 8 bits, named ``<layer>.weight``;
* per group: ``axis=0, block_size=group_size``, ``<layer>.weight_scale`` ``(in / g, out)``;
  per output channel (``group_size=-1``): per-axis ``axis=1``, scale ``(out,)``;
* ``<layer>.weight_zero_point`` (same type as the weight) only for asymmetric layers.

That is the form onnxruntime's graph optimizer fuses into its ``com.microsoft.MatMulNBits`` kernel. Note
that the fused kernel runs, by default, at ``accuracy_level`` 4: it quantizes the *activations* to int8
per block as well (faster, about 1 % relative error on a layer's output). To run exactly what the PyTorch
model computes, create the session with
``so.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", "0")`` (or without graph
optimizations). The existing QDQ exporter (``amct_torch.export``) only knows per-channel and per-tensor
weight quantizers; this is a separate function for per-group weight-only models.
"""

from __future__ import annotations

import copy
import os
import warnings
from typing import Any

import numpy as np
import onnx
import torch
import torch.nn as nn
from onnx import numpy_helper
from onnxscript import opset21 as op21

from .._quiet import quiet
from ..graph.capture import normalize_inputs
from ..nn import CompressedLayer
from ..quant.formulas import from_channel_major
from ..quant.quantizers import ActivationQuantizer, ArqWeightQuantizer, CalibrationError
from ..quant.weight_only import GroupWeightQuantizer, weight_only_quantizers
from .onnx_qdq import int4_tensor

__all__ = ["export_weight_only", "ORT_EXACT_SESSION_CONFIG"]

ORT_EXACT_SESSION_CONFIG = {"session.qdq_matmulnbits_accuracy_level": "0"}
"""onnxruntime session config entries under which the fused MatMulNBits kernel keeps activations float."""


@torch.library.custom_op("amct::weight_only_dequant", mutates_args=())
def weight_only_dequant(q: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, axis: int,
                        block_size: int) -> torch.Tensor:
    """ONNX ``DequantizeLinear`` of integer ``q``: blocked along ``axis`` (``block_size > 0``; ``scale`` has
    ``q``'s rank, ``q.shape[axis] / block_size`` on ``axis``) or per axis (``block_size == 0``; 1-D ``scale``)."""
    if block_size > 0:
        s = scale.repeat_interleave(block_size, dim=axis)
        z = zero_point.repeat_interleave(block_size, dim=axis)
    else:
        shape = [1] * q.dim()
        shape[axis] = -1
        s, z = scale.reshape(shape), zero_point.reshape(shape)
    return (q.to(torch.float32) - z.to(torch.float32)) * s


@weight_only_dequant.register_fake
def _(q: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, axis: int, block_size: int) -> torch.Tensor:
    return torch.empty(q.shape, dtype=torch.float32, device=q.device)


def _dequant_onnx(q, scale, zero_point, axis: int, block_size: int):
    if block_size > 0:
        return op21.DequantizeLinear(q, scale, zero_point, axis=axis, block_size=block_size)
    return op21.DequantizeLinear(q, scale, zero_point, axis=axis)


class _FrozenGroupWeight(nn.Module):
    """The export stand-in for a weight pipeline: integer weight, scales and zero points in the layer's layout."""

    def __init__(self, stage: GroupWeightQuantizer, pipeline_input: torch.Tensor):
        super().__init__()
        shape, out_axis = pipeline_input.shape, stage.axis
        rows = stage.integer_weight(pipeline_input)                      # (out, in)
        self.register_buffer("q", from_channel_major(rows, shape, out_axis).contiguous())
        zp = stage.offset.to(torch.int8) if not stage.symmetric else torch.zeros_like(stage.offset, dtype=torch.int8)
        if stage.group_size == -1:   # per output channel: per-axis DQ
            self.axis, self.block_size = out_axis, 0
            self.register_buffer("scale", stage.scale[:, 0].clone())
            self.register_buffer("zero_point", zp[:, 0].clone())
        else:                        # blocks along the input axis; scale (out, G) in the weight's layout
            self.axis, self.block_size = 1 - out_axis, stage.block
            self.register_buffer("scale", from_channel_major(stage.scale, (shape[0], -1) if out_axis == 0
                                                             else (-1, shape[1]), out_axis).contiguous().clone())
            self.register_buffer("zero_point", from_channel_major(zp, self.scale.shape, out_axis).contiguous().clone())

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return weight_only_dequant(self.q, self.scale, self.zero_point, self.axis, self.block_size)


def _freeze(model: nn.Module) -> dict[str, GroupWeightQuantizer]:
    stages = weight_only_quantizers(model)
    if not stages:
        raise ValueError("export_weight_only: the model has no weight-only layers; "
                         "quantize it with amct_torch.quant.weight_only.quantize_weight_only first")
    other = [n for n, m in model.named_modules() if isinstance(m, (ActivationQuantizer, ArqWeightQuantizer))]
    if other:
        raise ValueError("export_weight_only: the model also has PTQ/QAT quantizers (" + ", ".join(other[:3])
                         + "); export weight-only models on their own")
    pending = [n for n, s in stages.items() if not s.is_ready]
    if pending:
        raise CalibrationError("export_weight_only: GPTQ has not quantized " + ", ".join(pending) + "; nothing was written")
    for name, stage in stages.items():
        layer: CompressedLayer = model.get_submodule(name)
        stages_list = list(layer.weight_pipeline)
        if stages_list[-1] is not stage:
            raise ValueError(f"export_weight_only: layer {name!r}: the weight-only stage must be the last weight stage")
        with torch.no_grad():
            w = layer.module.weight
            for s in stages_list[:-1]:
                w = s(w)
        layer.weight_pipeline = type(layer.weight_pipeline)([_FrozenGroupWeight(stage, w.detach())])
    return stages


def _consumers(g: onnx.GraphProto, name: str) -> list[onnx.NodeProto]:
    return [n for n in g.node if name in n.input]


def _set_attr(node: onnx.NodeProto, name: str, value: int) -> None:
    for a in node.attribute:
        if a.name == name:
            a.i = value
            return
    node.attribute.append(onnx.helper.make_attribute(name, value))


def _attr(node: onnx.NodeProto, name: str, default: Any) -> Any:
    a = next((a for a in node.attribute if a.name == name), None)
    return default if a is None else onnx.helper.get_attribute_value(a)


def _name_layer_op(g: onnx.GraphProto, weight: str, layer: str) -> None:
    """Name the MatMul/Gemm reading ``weight`` after the layer; a plain ``Gemm`` (no transposes, alpha = beta = 1)
    becomes ``MatMul`` (+ ``Add`` for the bias), the pattern onnxruntime fuses with the DequantizeLinear."""
    for user in _consumers(g, weight):
        if user.op_type == "MatMul":
            user.name = layer
        elif user.op_type == "Gemm":
            plain = (_attr(user, "transA", 0) == 0 and _attr(user, "transB", 0) == 0 and _attr(user, "alpha", 1.0) == 1.0
                     and _attr(user, "beta", 1.0) == 1.0 and list(user.input).index(weight) == 1)
            if not plain:
                user.name = layer
                continue
            at = list(g.node).index(user)
            out = user.output[0]
            has_bias = len(user.input) > 2 and user.input[2] != ""
            mm = onnx.helper.make_node("MatMul", [user.input[0], weight], [f"{layer}.matmul" if has_bias else out], name=layer)
            new = [mm] + ([onnx.helper.make_node("Add", [mm.output[0], user.input[2]], [out], name=f"{layer}.bias_add")]
                          if has_bias else [])
            g.node.remove(user)
            for k, n in enumerate(new):
                g.node.insert(at + k, n)


def _postprocess(proto: onnx.ModelProto, stages: dict[str, GroupWeightQuantizer]) -> None:
    g = proto.graph
    inits = {t.name: t for t in g.initializer}
    prefix = {f"{name}.weight_pipeline.0.": name for name in stages}
    drop_nodes: list[onnx.NodeProto] = []
    for node in list(g.node):
        if node.op_type != "DequantizeLinear" or node.input[0] not in inits:
            continue
        layer = next((name for p, name in prefix.items() if node.input[0] == p + "q"), None)
        if layer is None:
            continue
        stage = stages[layer]
        arrays = [numpy_helper.to_array(inits[i]) for i in node.input[:3]]
        axis = _attr(node, "axis", 1)
        users = _consumers(g, node.output[0])
        # the MatMul B layout (in, out): a Linear's (out, in) weight is transposed, the axis flips
        if stage.axis == 0 and len(users) == 1:
            user = users[0]
            transposed = False
            if user.op_type == "Gemm" and list(user.input).index(node.output[0]) == 1 and _attr(user, "transB", 0) == 1:
                _set_attr(user, "transB", 0)
                transposed = True
            elif user.op_type == "Transpose" and list(_attr(user, "perm", [])) == [1, 0]:
                for n in _consumers(g, user.output[0]):
                    for k, inp in enumerate(n.input):
                        if inp == user.output[0]:
                            n.input[k] = node.output[0]
                drop_nodes.append(user)
                transposed = True
            if transposed:
                arrays = [a if a.ndim < 2 else np.ascontiguousarray(a.T) for a in arrays]
                axis = 1 - axis
                # the exporter's shape annotations of the DQ (and dropped Transpose) outputs are stale: drop them
                stale = {node.output[0], user.output[0]}
                for v in [v for v in g.value_info if v.name in stale]:
                    g.value_info.remove(v)
        _set_attr(node, "axis", axis)
        if _attr(node, "block_size", 0) == 0:  # per axis: no block_size attribute
            for a in [a for a in node.attribute if a.name == "block_size"]:
                node.attribute.remove(a)
        _name_layer_op(g, node.output[0], layer)
        q, scale, zp = arrays
        names = (f"{layer}.weight", f"{layer}.weight_scale", f"{layer}.weight_zero_point")
        new = [int4_tensor(names[0], q) if stage.bits == 4 else numpy_helper.from_array(q.astype(np.int8), names[0]),
               numpy_helper.from_array(scale.astype(np.float32), names[1])]
        if not stage.symmetric:
            new.append(int4_tensor(names[2], zp) if stage.bits == 4 else numpy_helper.from_array(zp.astype(np.int8), names[2]))
        old = list(node.input[:3])
        del node.input[:]
        node.input.extend(t.name for t in new)
        node.name = f"{layer}.weight_dequant"
        g.initializer.extend(new)
        for o in old:
            if o in inits and not _consumers(g, o):
                g.initializer.remove(inits.pop(o))
    for n in drop_nodes:
        g.node.remove(n)
    for t in g.initializer:
        if t.name.endswith(".module.bias"):
            old, t.name = t.name, t.name.replace(".module.bias", ".bias")
            for n in g.node:
                for k, inp in enumerate(n.input):
                    if inp == old:
                        n.input[k] = t.name
    for node in g.node:  # exporter debug metadata (stack traces, fx nodes) would double the file
        del node.metadata_props[:]
        node.doc_string = ""


def export_weight_only(model: nn.Module, path: str | os.PathLike | None, example_inputs: Any, *,
                       input_names: list[str] | None = None, output_names: list[str] | None = None,
                       dynamic_shapes: Any = None) -> onnx.ModelProto:
    """Write (when ``path`` is given) and return the ONNX model (opset 21) of a weight-only quantized model.

    The model itself is not changed. ``example_inputs``: a tensor, a tuple, or a dict of keyword inputs.
    Every GPTQ layer must be solved; a model that also carries PTQ/QAT quantizers is refused (use
    ``amct_torch.export`` for those). See the module docstring for the ONNX form and onnxruntime's settings.
    """
    export_model = copy.deepcopy(model).eval()
    stages = _freeze(export_model)
    args, kwargs = normalize_inputs(example_inputs)
    with quiet(("torch.onnx", "torch.export", "torch._export", "onnxscript"), stdout=True), torch.no_grad(), \
            warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(export_model, args, kwargs=kwargs or None, dynamo=True, input_names=input_names,
                                    output_names=output_names, dynamic_shapes=dynamic_shapes, opset_version=21,
                                    verbose=False, optimize=True,
                                    custom_translation_table={torch.ops.amct.weight_only_dequant.default: _dequant_onnx})
    proto = program.model_proto
    _postprocess(proto, stages)
    onnx.checker.check_model(proto)
    if path is not None:
        path = os.fspath(path)
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        tmp = path + ".tmp"
        onnx.save(proto, tmp)
        os.replace(tmp, path)
    return proto

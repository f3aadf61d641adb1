"""Where activation quantizers go besides layer inputs, so that ONNX Runtime runs the model in integers.

A layer's input quantizer (AMCT's placement) makes its Conv/Gemm an integer kernel. What sits between
layers stays float unless it, too, is quantized on both sides: ONNX Runtime runs ``DQ -> Add -> Q`` as
``QLinearAdd``, ``DQ -> GlobalAveragePool -> Q`` as ``QLinearGlobalAveragePool``, ``DQ -> Concat -> Q`` as
``QLinearConcat``, and ``DQ -> MaxPool/Reshape/Flatten -> Q`` in int8 when both sides share one scale. Without
that, every residual block dequantizes, adds in float and quantizes again, and the model is slower than the
one ``onnxruntime.quantization.quantize_static`` makes. :func:`place_quantizers` (``quantize_outputs="auto"``):

1. *int ops*: every residual add and concatenation (functions in the forward code) and every pooling
   (module or function) gets its inputs' producers and its output quantized; an output that only feeds a
   ReLU is quantized after the ReLU (ONNX Runtime then drops the ReLU into the quantization);
2. *layer outputs*: a quantized layer whose output is not consumed only by quantized layers (directly, or
   through one ReLU, or through a ReLU whose output is quantized by step 1) gets an output quantizer;
3. *ties*: a quantizer whose input comes from another quantizer through ops that keep the quantization
   grid (max-pool, flatten, reshape, identity, dropout) reuses that quantizer's factors (:meth:`tie`):
   re-quantizing a tensor with the factors it already has changes nothing, so the PyTorch model computes
   exactly what it did, and the ONNX model carries one scale on both sides of those ops.

Quantizers of a layer go in its ``output_quantizer`` slot; the others are inserted after the call that
makes the tensor, in the forward of the module that makes it (:func:`amct_torch.graph.insert_after`), and
are named ``<module path>.<call>_quant`` (``layer1.0.add_quant``, ``layer1.0.relu_1_quant``).
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import replace
from typing import Any, Callable

import torch.nn as nn

from ..graph import CapturedGraph, Node, Plan
from ..graph.insert import InsertError, insert_after
from ..graph.plan import LayerPlan
from ..nn import CompressedAvgPool, CompressedLayer, FoldedBatchNorm
from .calibrators import make_calibrator
from .quantizers import ActivationQuantizer

__all__ = ["place_quantizers"]

_INT_FUNCS = {"add", "iadd", "add_", "cat", "concat", "concatenate"}
_POOL_FUNCS = {"max_pool1d", "max_pool2d", "max_pool3d", "avg_pool1d", "avg_pool2d", "avg_pool3d",
               "adaptive_avg_pool1d", "adaptive_avg_pool2d", "adaptive_avg_pool3d",
               "adaptive_max_pool1d", "adaptive_max_pool2d", "adaptive_max_pool3d"}
_MAX_POOLS = (nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d)
_AVG_POOLS = (nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d, nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d,
              nn.AdaptiveAvgPool3d, CompressedAvgPool)
_TRANSPARENT = (nn.Identity, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, FoldedBatchNorm)
#: ops whose output is on the grid of their input (a subset of its values, rearranged)
_GRID_MODULES = _TRANSPARENT + _MAX_POOLS + (nn.Flatten, nn.Unflatten)
_GRID_FUNCS = {"flatten", "reshape", "view", "squeeze", "unsqueeze", "contiguous", "permute", "transpose",
               "dropout", "max_pool1d", "max_pool2d", "max_pool3d", "adaptive_max_pool1d", "adaptive_max_pool2d",
               "adaptive_max_pool3d"}
_RELU_MODULES = (nn.ReLU, nn.ReLU6, nn.Hardtanh)
_RELU_FUNCS = {"relu", "relu_", "relu6", "hardtanh", "hardtanh_"}


class _View:
    """The captured graph read against the prepared model (folded BNs are Identity, layers are wrapped)."""

    def __init__(self, model: nn.Module, graph: CapturedGraph):
        self.model, self.graph = model, graph

    def module(self, node: Node) -> nn.Module | None:
        if node.kind != "module":
            return None
        try:
            return self.model.get_submodule(node.target)
        except AttributeError:
            return None

    def is_a(self, node: Node, types: tuple, funcs: set[str]) -> bool:
        m = self.module(node)
        if m is not None:
            inner = m.module if isinstance(m, CompressedLayer) else m
            return isinstance(m, types) or isinstance(inner, types)
        return node.kind == "function" and node.target in funcs

    def producer(self, node: Node) -> Node:
        """Step back through Identity (folded BN) and Dropout."""
        while isinstance(self.module(node), _TRANSPARENT) and len(node.inputs) == 1:
            node = node.inputs[0]
        return node

    def consumers(self, node: Node) -> list[Node]:
        out = []
        for u in node.users:
            out.extend(self.consumers(u) if isinstance(self.module(u), _TRANSPARENT) else [u])
        return out

    def is_relu(self, node: Node) -> bool:
        return self.is_a(node, _RELU_MODULES, _RELU_FUNCS)


def _int_op_points(view: _View) -> dict[Node, str]:
    """Step 1: the tensors around residual adds, concatenations and pools."""
    points: dict[Node, str] = {}

    def want(node: Node, why: str) -> None:
        node = view.producer(node)
        if node.kind in ("module", "function"):
            points.setdefault(node, why)

    for n in view.graph.nodes:
        if n.kind == "function" and n.target in _INT_FUNCS and len(n.inputs) >= 2:
            why = f"{n.target} in {n.scope or 'the model'}"
        elif view.is_a(n, _MAX_POOLS + _AVG_POOLS, _POOL_FUNCS) and n.inputs:
            why = f"{n.target if n.kind == 'function' else type(view.module(n)).__name__} {n.target if n.kind == 'module' else ''}".strip()
        else:
            continue
        for i in n.inputs:
            want(i, f"input of {why}")
        users = view.consumers(n)
        if len(users) == 1 and view.is_relu(users[0]) and len(users[0].inputs) >= 1:
            want(users[0], f"output of {why} (after its ReLU)")
        elif users and all(u.kind != "output" for u in users):
            want(n, f"output of {why}")
    return points


def _layer_output_points(view: _View, layers: dict[str, CompressedLayer], points: dict[Node, str]) -> None:
    """Step 2: quantized layers whose output reaches float consumers."""
    quantized = {n for n, m in layers.items() if isinstance(m.input_quantizer, ActivationQuantizer)}

    def fine(node: Node, through_relu: bool = True) -> bool:
        users = view.consumers(node)
        if not users or any(u.kind == "output" for u in users):
            return True  # a model output stays float
        for u in users:
            if u.kind == "module" and u.target in quantized:
                continue
            if through_relu and view.is_relu(u) and (u in points or fine(u, through_relu=False)):
                continue
            return False
        return True

    for name in quantized:
        calls = view.graph.calls_of(name)
        if len(calls) == 1 and calls[0] not in points and not fine(calls[0]):
            points[calls[0]] = "feeds float ops"


def _grid_source(view: _View, node: Node, quantizer_of: dict[Node, ActivationQuantizer]) -> ActivationQuantizer | None:
    seen = set()
    while node not in seen:
        seen.add(node)
        if node in quantizer_of:
            return quantizer_of[node]
        if not (view.is_a(node, _GRID_MODULES, _GRID_FUNCS) and node.inputs):
            return None
        node = node.inputs[0]
    return None


def _local_name(node: Node) -> str:
    op, target, k = node.local
    base = str(target).replace(".", "_") if op == "call_module" else getattr(target, "__name__", str(target))
    return f"{base}{'_' + str(k) if k else ''}_quant"


def default_factory(cfg: Any, after_relu: bool) -> ActivationQuantizer | None:
    """A calibrating PTQ quantizer for ``cfg`` (a :class:`QuantConfig`), or None for weight-only configs."""
    if cfg is None or cfg.activation_bits is None:
        return None
    return ActivationQuantizer(cfg.activation_bits, not cfg.activation_offset, make_calibrator(cfg), cfg.batch_num)


def place_quantizers(model: nn.Module, graph: CapturedGraph, plan: Plan, layers: dict[str, CompressedLayer],
                     config_of: Callable[[str], Any], default: Any,
                     factory: Callable[[Any, bool], ActivationQuantizer | None] = default_factory) -> None:
    """Add output quantizers and inserted quantizers to a prepared model (see the module docstring).

    ``factory(config, after_relu)`` makes each quantizer (PTQ: calibrating; QAT: learned, with the lower
    clip pinned at 0 after a ReLU).
    """
    if not graph.has_dataflow:
        plan.warnings.append("no graph data flow: outputs not quantized (ONNX Runtime will run some layers in float)")
        return
    view = _View(model, graph)
    points = _int_op_points(view) if graph.method == "fx" else {}
    if graph.method != "fx":
        plan.warnings.append(f"graph captured with {graph.method}, not fx: residual adds, concatenations and pools "
                             "are not quantized (ONNX Runtime runs them in float)")
    _layer_output_points(view, layers, points)

    quantizer_of: dict[Node, ActivationQuantizer] = {}
    inserts: dict[str, list[tuple[Node, ActivationQuantizer]]] = defaultdict(list)
    for node, why in points.items():
        layer = layers.get(node.target) if node.kind == "module" else None
        if layer is not None and len(graph.calls_of(node.target)) == 1:
            q = factory(config_of(node.target) or default, False)
            if q is not None:
                layer.output_quantizer = quantizer_of[node] = q
                _note(plan, node.target, " + output")
            continue
        if node.scope is None:
            continue
        q = factory(default, view.is_relu(node))
        if q is not None:
            inserts[node.scope].append((node, q))
    for owner, items in inserts.items():
        try:
            paths = insert_after(model, owner, [(n.local, _local_name(n), q) for n, q in items])
        except InsertError as err:
            plan.warnings.append(f"not quantized: {err}")
            continue
        for (node, q), path in zip(items, paths):
            quantizer_of[node] = q
            what = node.target if node.kind == "function" else type(view.module(node)).__name__
            plan.layers.append(LayerPlan(path, str(what), "wrap", f"A{q.bits} {points[node]}", "quantize_outputs=auto"))

    _limit_ranges(view, layers, quantizer_of)
    # step 3: ties, for layer inputs and for quantizers after grid-keeping ops
    for name, layer in layers.items():
        q, calls = layer.input_quantizer, graph.calls_of(name)
        balanced = getattr(layer, "input_balance", None) is not None  # its input is x / s: not on the source's grid
        if isinstance(q, ActivationQuantizer) and len(calls) == 1 and calls[0].inputs and not balanced:
            src = _grid_source(view, calls[0].inputs[0], quantizer_of)
            if src is not None and src is not q and src.bits == q.bits:
                q.tie(src)
                _note(plan, name, " (input tied)")
    for node, q in quantizer_of.items():
        if view.is_a(node, _GRID_MODULES, _GRID_FUNCS) and node.inputs:
            src = _grid_source(view, node.inputs[0], quantizer_of)
            if src is not None and src is not q and src.bits == q.bits:
                q.tie(src)


def _bounds(view: _View, node: Node) -> tuple[float, float] | None:
    """The output interval of a bounded activation module (ReLU6, Hardtanh, ReLU), else None."""
    m = view.module(node)
    if isinstance(m, nn.Hardtanh):  # ReLU6 is a Hardtanh(0, 6)
        return float(m.min_val), float(m.max_val)
    if isinstance(m, nn.ReLU):
        return 0.0, float("inf")
    return None


def _limit_ranges(view: _View, layers: dict[str, CompressedLayer], quantizer_of: dict[Node, ActivationQuantizer]) -> None:
    """A quantizer right after a bounded activation never calibrates a range outside its bounds."""
    targets: list[tuple[Node, ActivationQuantizer]] = []
    for name, layer in layers.items():
        calls = view.graph.calls_of(name)
        if isinstance(layer.input_quantizer, ActivationQuantizer) and len(calls) == 1 and calls[0].inputs:
            targets.append((view.producer(calls[0].inputs[0]), layer.input_quantizer))
    targets += [(node, q) for node, q in quantizer_of.items()]  # a quantizer inserted after the activation
    for node, q in targets:
        bounds = _bounds(view, node)
        if bounds is not None and bounds[1] > bounds[0]:
            q.range_limit = bounds


def _note(plan: Plan, name: str, text: str) -> None:
    for i, lp in enumerate(plan.layers):
        if lp.name == name:
            plan.layers[i] = replace(lp, detail=lp.detail + text)

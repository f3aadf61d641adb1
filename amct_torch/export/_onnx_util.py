"""Small ONNX helpers shared by the export passes: unique names and weight layouts."""

from __future__ import annotations

from typing import Callable, Iterable

import onnx
from onnx import helper

__all__ = ["name_allocator", "taken_names", "weight_out_axis", "weight_in_axis"]


def taken_names(g: onnx.GraphProto) -> set[str]:
    """Every node, tensor and input name already in ``g``."""
    return ({n.name for n in g.node if n.name} | {o for n in g.node for o in n.output}
            | {t.name for t in g.initializer} | {i.name for i in g.input})


def name_allocator(taken: Iterable[str], first_suffix: int = 1) -> Callable[[str], str]:
    """``fresh(base)``: ``base`` if free, else ``base_<k>`` from ``first_suffix`` up; each result is reserved."""
    used = set(taken)

    def fresh(base: str) -> str:
        name, k = base, first_suffix
        while name in used:
            name = f"{base}_{k}"
            k += 1
        used.add(name)
        return name

    return fresh


def _trans_b(node: onnx.NodeProto) -> bool:
    return any(a.name == "transB" and helper.get_attribute_value(a) for a in node.attribute)


def weight_out_axis(node: onnx.NodeProto, w_rank: int) -> int:
    """Output-channel axis of the weight of a Conv / ConvTranspose / Gemm / MatMul node."""
    if node.op_type == "Conv":
        return 0
    if node.op_type == "ConvTranspose":
        return 1
    if node.op_type == "Gemm":
        return 0 if _trans_b(node) else 1
    return w_rank - 1  # MatMul: (..., K, N)


def weight_in_axis(node: onnx.NodeProto, w_rank: int) -> int:
    """Input-channel (reduction) axis of the weight of a Conv / ConvTranspose / Gemm / MatMul node."""
    if node.op_type == "Conv":
        return 1
    if node.op_type == "ConvTranspose":
        return 0
    if node.op_type == "Gemm":
        return 1 if _trans_b(node) else 0
    return w_rank - 2  # MatMul: (..., K, N)

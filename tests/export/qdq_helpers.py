"""Helpers for the export tests: hand-built QDQ models, runners, tolerance checks."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from amct_torch.export import make_reference_evaluator


def const(name: str, value, dtype: int | None = None) -> onnx.TensorProto:
    """An initializer; ``dtype`` forces the ONNX element type (needed for INT4/UINT4)."""
    arr = np.asarray(value)
    if dtype in (TensorProto.INT4, TensorProto.UINT4):
        return helper.make_tensor(name, dtype, list(arr.shape), arr.astype(np.int64).reshape(-1).tolist())
    if dtype is not None:
        arr = arr.astype(helper.tensor_dtype_to_np_dtype(dtype))
    return numpy_helper.from_array(arr, name)


def sym_weight_quant(w: np.ndarray, axis: int | None, bits: int = 8) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric weight quantization: (int values, scales [C] or scalar)."""
    qmax = 2 ** (bits - 1) - 1
    if axis is None:
        s = np.float32(np.abs(w).max() / qmax)
        return np.clip(np.rint(w / s), -qmax - 1, qmax).astype(np.int64), np.array(s, dtype=np.float32)
    red = tuple(i for i in range(w.ndim) if i != axis)
    s = (np.abs(w).max(axis=red) / qmax).astype(np.float32)
    shape = [1] * w.ndim
    shape[axis] = -1
    return np.clip(np.rint(w / s.reshape(shape)), -qmax - 1, qmax).astype(np.int64), s


class QDQBuilder:
    """Accumulates nodes/initializers of a QDQ graph."""

    def __init__(self, opset: int = 13) -> None:
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []
        self.opset = opset
        self._k = 0

    def uid(self, base: str) -> str:
        self._k += 1
        return f"{base}_{self._k}"

    def qdq(self, x: str, scale, zp, qtype: int, *, axis: int | None = None, dq_scale=None) -> str:
        """x -> QuantizeLinear -> DequantizeLinear; returns the dequantized tensor."""
        s, z = self.uid("s"), self.uid("z")
        self.inits += [const(s, np.asarray(scale, dtype=np.float32)), const(z, zp, qtype)]
        kw = {} if axis is None else {"axis": axis}
        q, d = self.uid("q"), self.uid("dq")
        self.nodes.append(helper.make_node("QuantizeLinear", [x, s, z], [q], name=self.uid("Q"), **kw))
        s2 = s
        if dq_scale is not None:
            s2 = self.uid("s")
            self.inits.append(const(s2, np.asarray(dq_scale, dtype=np.float32)))
        self.nodes.append(helper.make_node("DequantizeLinear", [q, s2, z], [d], name=self.uid("DQ"), **kw))
        return d

    def dq_weight(self, w_int: np.ndarray, scale, *, axis: int = 0, qtype: int = TensorProto.INT8, zp=None) -> str:
        w, s, z = self.uid("w"), self.uid("ws"), self.uid("wz")
        scale = np.asarray(scale, dtype=np.float32)
        zp = np.zeros(scale.shape, dtype=np.int64) if zp is None else np.asarray(zp)
        self.inits += [const(w, w_int, qtype), const(s, scale), const(z, zp, qtype)]
        out = self.uid("wdq")
        kw = {"axis": axis} if scale.size > 1 else {}
        self.nodes.append(helper.make_node("DequantizeLinear", [w, s, z], [out], name=self.uid("WDQ"), **kw))
        return out

    def qdq_weight_float(self, w: np.ndarray, scale, *, axis: int = 0) -> str:
        """DequantizeLinear(QuantizeLinear(float initializer))."""
        name = self.uid("wf")
        self.inits.append(const(name, w.astype(np.float32)))
        scale = np.asarray(scale, dtype=np.float32)
        return self.qdq(name, scale, np.zeros(scale.shape, dtype=np.int8), TensorProto.INT8,
                        axis=axis if scale.size > 1 else None)

    def init(self, value, dtype=None) -> str:
        name = self.uid("c")
        self.inits.append(const(name, value, dtype))
        return name

    def node(self, op: str, inputs: list[str], name: str | None = None, **attrs) -> str:
        out = self.uid(op.lower())
        self.nodes.append(helper.make_node(op, inputs, [out], name=name if name is not None else self.uid(op),
                                           **attrs))
        return out

    def model(self, inputs: dict[str, list], outputs: list[str]) -> onnx.ModelProto:
        g = helper.make_graph(
            self.nodes, "g", [helper.make_tensor_value_info(k, TensorProto.FLOAT, v) for k, v in inputs.items()],
            [helper.make_tensor_value_info(o, TensorProto.FLOAT, None) for o in outputs], self.inits)
        m = helper.make_model(g, opset_imports=[helper.make_opsetid("", self.opset)])
        m.ir_version = 8 if self.opset < 19 else 10
        # declare the outputs' shapes (onnx.checker wants them on graph outputs)
        inferred = onnx.shape_inference.infer_shapes(m).graph.output
        for out, inf in zip(m.graph.output, inferred):
            if inf.type.tensor_type.HasField("shape"):
                out.CopyFrom(inf)
        return m


def run_ort(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    so = ort.SessionOptions()
    so.log_severity_level = 3
    sess = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    return sess.run(None, feeds)


def run_deploy(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    return make_reference_evaluator(model).run(None, feeds)


def assert_within_steps(got: np.ndarray, want: np.ndarray, step: float, steps: float = 1.0) -> None:
    diff = np.abs(np.asarray(got, dtype=np.float64) - np.asarray(want, dtype=np.float64))
    assert diff.max() <= steps * step * (1 + 1e-4) + 1e-6, f"max diff {diff.max()} > {steps} x step {step}"


def with_output_qdq(b: QDQBuilder, y: str, inputs: dict[str, list], feeds) -> tuple[onnx.ModelProto, float]:
    """Finish ``b`` with an int8 Q/DQ on ``y`` whose scale covers the float output; returns (model, step)."""
    probe = run_ort(b.model(inputs, [y]), feeds)[0]
    step = float(max(np.abs(probe).max(), 1e-3) / 127)
    yq = b.qdq(y, step, 0, TensorProto.INT8)
    return b.model(inputs, [yq]), step

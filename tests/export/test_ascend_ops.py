"""Reference implementations of AscendQuant / AscendDequant / AscendAntiQuant and the reference lowering."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from amct_torch.export import (ASCEND_DOMAIN, lower_for_reference, make_reference_evaluator, pack_deq_param,
                               pack_int4, unpack_deq_param, unpack_int4)
from amct_torch.export.ascend_ops import deq_from_param


def _single(op: str, inputs: list[str], inits: list[onnx.TensorProto], in_type=TensorProto.FLOAT, opset=13,
            **attrs) -> onnx.ModelProto:
    node = helper.make_node(op, inputs, ["y"], name="n", domain=ASCEND_DOMAIN, **attrs)
    g = helper.make_graph([node], "g", [helper.make_tensor_value_info(inputs[0], in_type, None)],
                          [helper.make_tensor_value_info("y", TensorProto.UNDEFINED, None)], inits)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)])


def _run(model, **feeds):
    return make_reference_evaluator(model).run(None, feeds)[0]


def test_domain_is_default_onnx_domain():
    # AMCT writes its nodes without a domain (ai.onnx), which is what ATC's ONNX parser plugins register.
    assert ASCEND_DOMAIN == ""


def test_ascend_quant_rounds_half_even_clips_and_offsets():
    x = np.array([0.25, 0.75, -0.25, 1.25, 100.0, -100.0, 0.0], dtype=np.float32)
    m = _single("AscendQuant", ["x"], [], scale=2.0, offset=3.0, dst_type="INT8")
    y = _run(m, x=x)
    assert y.dtype == np.int8
    # x*2 + 3 = 3.5, 4.5, 2.5, 5.5, 203, -197, 3 -> rint: 4, 4, 2, 6 -> clip
    np.testing.assert_array_equal(y, [4, 4, 2, 6, 127, -128, 3])


def test_ascend_quant_int4_range_and_sqrt_mode():
    x = np.linspace(-3, 3, 13).astype(np.float32)
    y = _run(_single("AscendQuant", ["x"], [], scale=4.0, offset=-1.0, dst_type="INT4"), x=x)
    assert y.dtype == np.int8 and y.min() == -8 and y.max() == 7
    np.testing.assert_array_equal(y, np.clip(np.rint(x * 4 - 1), -8, 7))
    y2 = _run(_single("AscendQuant", ["x"], [], scale=2.0, offset=0.0, dst_type="INT8", sqrt_mode=1), x=x)
    np.testing.assert_array_equal(y2, np.clip(np.rint(x * 4), -128, 127))


def test_antiquant_inverts_quant(rng):
    s, o = 0.05, -7
    x = rng.uniform(-5, 5, size=(4, 33)).astype(np.float32)  # inside [(-128-o)s, (127-o)s]
    nodes = [helper.make_node("AscendQuant", ["x"], ["q"], scale=1 / s, offset=float(o), dst_type="INT8"),
             helper.make_node("AscendAntiQuant", ["q"], ["y"], scale=s, offset=float(o), dst_type="INT8")]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, None)],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)])
    y = _run(helper.make_model(g, opset_imports=[helper.make_opsetid("", 13)]), x=x)
    assert y.dtype == np.float32
    assert np.abs(y - x).max() <= s / 2 + 1e-6
    fake = (np.clip(np.rint(x * np.float32(1 / s) + o), -128, 127) - o) * np.float32(s)
    np.testing.assert_allclose(y, fake, rtol=0, atol=1e-6)


def test_deq_param_pack_unpack_round_trip(rng):
    scale_w = rng.uniform(1e-4, 1e-2, size=16).astype(np.float32)
    scale_d = 0.0234
    p = pack_deq_param(scale_w, scale_d)
    assert p.dtype == np.uint64 and p.shape == (16,)
    assert np.all(p >> np.uint64(32) == 0)  # offset_w = 0 above the float bits
    deq = unpack_deq_param(p)
    np.testing.assert_array_equal(deq, (scale_w.astype(np.float64) * scale_d).astype(np.float32))
    # low 32 bits are exactly the float32 bit pattern
    np.testing.assert_array_equal((p & np.uint64(0xFFFFFFFF)).astype(np.uint32), deq.view(np.uint32))
    assert pack_deq_param(np.float32(0.5), 0.25).shape == (1,)
    with pytest.raises(TypeError):
        deq_from_param(np.zeros(2, dtype=np.int64))


def test_int4_pack_unpack_round_trip(rng):
    w = rng.integers(-8, 8, size=(6, 4, 3, 3)).astype(np.int8)
    for axis in range(w.ndim):
        if w.shape[axis] % 2:
            with pytest.raises(ValueError):
                pack_int4(w, axis)
            continue
        p = pack_int4(w, axis)
        assert p.dtype == np.int8 and p.shape[axis] == w.shape[axis] // 2
        np.testing.assert_array_equal(unpack_int4(p, axis), w)
    # low nibble = even index, high nibble = odd index
    np.testing.assert_array_equal(pack_int4(np.array([1, -1, -8, 7], dtype=np.int8), 0).view(np.uint8),
                                  [0xF1, 0x78])
    with pytest.raises(ValueError):
        pack_int4(np.array([8, 0], dtype=np.int8), 0)


def _dequant_model(param: np.ndarray, **attrs) -> onnx.ModelProto:
    return _single("AscendDequant", ["x", "p"], [numpy_helper.from_array(param, "p")], in_type=TensorProto.INT32,
                   **attrs)


def test_dequant_per_tensor_per_channel_axes_dtype_relu(rng):
    x4 = rng.integers(-1000, 1000, size=(2, 3, 4, 5)).astype(np.int32)
    sc = np.array([0.5, 0.25, 0.125], dtype=np.float32)
    y = _run(_dequant_model(pack_deq_param(sc, 1.0), dtype=0), x=x4)
    assert y.dtype == np.float32
    np.testing.assert_allclose(y, x4 * sc.reshape(1, 3, 1, 1))  # NCHW: channel axis 1
    x2 = rng.integers(-1000, 1000, size=(7, 3)).astype(np.int32)
    np.testing.assert_allclose(_run(_dequant_model(pack_deq_param(sc, 1.0)), x=x2), x2 * sc)  # last axis
    x3 = rng.integers(-1000, 1000, size=(2, 3, 3)).astype(np.int32)
    np.testing.assert_allclose(_run(_dequant_model(pack_deq_param(sc, 1.0), axis=-1), x=x3), x3 * sc)
    y1 = _run(_dequant_model(pack_deq_param(np.float32(0.5), 0.5), dtype=1, relu_flag=1), x=x4)
    assert y1.dtype == np.float16
    np.testing.assert_allclose(y1, np.maximum(x4 * 0.25, 0).astype(np.float16))


def test_dequant_rejects_weight_offset_bits():
    p = pack_deq_param(np.float32(0.5), 1.0)
    x = np.array([[4, -6]], dtype=np.int32)
    np.testing.assert_array_equal(_run(_dequant_model(p), x=x), [[2.0, -3.0]])
    with pytest.raises(ValueError, match="bits above"):  # offset_w in bits [47:40]: asymmetric weights are not AMCT's format
        deq_from_param(p | (np.uint64(3) << np.uint64(40)))


def test_lowering_subtracts_offset_before_padded_conv(rng):
    """AscendQuant(offset) -> Conv(int8, padded) -> AscendDequant equals the float conv of the dequantized input."""
    s_x, o = 0.02, 37
    w = rng.integers(-127, 128, size=(4, 3, 3, 3)).astype(np.int8)
    s_w = rng.uniform(1e-3, 3e-3, size=4).astype(np.float32)
    bias = rng.integers(-500, 500, size=4).astype(np.int32)
    inits = [numpy_helper.from_array(w, "w"), numpy_helper.from_array(bias, "b"),
             numpy_helper.from_array(pack_deq_param(s_w, s_x), "p")]
    nodes = [helper.make_node("AscendQuant", ["x"], ["q"], scale=1 / s_x, offset=float(o), dst_type="INT8"),
             helper.make_node("Conv", ["q", "w", "b"], ["acc"], pads=[1, 1, 1, 1]),
             helper.make_node("AscendDequant", ["acc", "p"], ["y"], dtype=0)]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 6, 6])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 13)])
    x = rng.uniform(-2, 2, size=(1, 3, 6, 6)).astype(np.float32)
    y = _run(m, x=x)
    xq = (np.clip(np.rint(x / s_x + o), -128, 127) - o) * s_x  # fake-quant input, zero-padded in real units
    from onnx.reference import ReferenceEvaluator
    wr = (w * s_w.reshape(4, 1, 1, 1)).astype(np.float64)
    conv = helper.make_node("Conv", ["x", "w"], ["y"], pads=[1, 1, 1, 1])
    gf = helper.make_graph([conv], "f", [helper.make_tensor_value_info("x", TensorProto.DOUBLE, None),
                                         helper.make_tensor_value_info("w", TensorProto.DOUBLE, None)],
                           [helper.make_tensor_value_info("y", TensorProto.DOUBLE, None)])
    ref = ReferenceEvaluator(helper.make_model(gf, opset_imports=[helper.make_opsetid("", 13)])).run(
        None, {"x": xq.astype(np.float64), "w": wr})[0] + (bias * s_w * s_x).reshape(1, 4, 1, 1)
    np.testing.assert_allclose(y, ref, rtol=1e-5, atol=1e-5)
    # the deploy model itself is left AMCT-shaped; only the evaluation copy is rewritten
    low = lower_for_reference(m)
    assert [n.op_type for n in m.graph.node] == ["AscendQuant", "Conv", "AscendDequant"]
    assert "Sub" in [n.op_type for n in low.graph.node]
    deq = next(n for n in low.graph.node if n.op_type == "AscendDequant")
    assert helper.get_attribute_value(next(a for a in deq.attribute if a.name == "axis")) == 1


def test_dequantize_linear_fallback_for_old_opsets():
    """onnx.reference has no DequantizeLinear below opset 19; make_reference_evaluator supplies one."""
    nodes = [helper.make_node("QuantizeLinear", ["x", "s", "z"], ["q"]),
             helper.make_node("DequantizeLinear", ["q", "s", "z"], ["y"])]
    inits = [numpy_helper.from_array(np.array(0.1, np.float32), "s"),
             numpy_helper.from_array(np.array(3, np.int8), "z")]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, None)],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits)
    x = np.array([0.0, 0.26, -20.0], dtype=np.float32)
    y = _run(helper.make_model(g, opset_imports=[helper.make_opsetid("", 13)]), x=x)
    np.testing.assert_allclose(y, [0.0, 0.3, -13.1], atol=1e-6)

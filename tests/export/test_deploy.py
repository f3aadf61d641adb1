"""QDQ -> AMCT deploy conversion: AMCT's format, numerics against ONNX Runtime, unsupported patterns."""

from __future__ import annotations

import re
import warnings

import numpy as np
import onnx
import pytest
import torch
import torch.nn as nn
from qdq_helpers import QDQBuilder, assert_within_steps, run_deploy, run_ort, sym_weight_quant, with_output_qdq
from onnx import TensorProto, helper, numpy_helper

from amct_torch.export import (DeployConversionError, convert_qat_model, fake_quant_from_qdq, qdq_to_deploy,
                               unpack_deq_param, unpack_int4)

INT8, UINT8, INT4 = TensorProto.INT8, TensorProto.UINT8, TensorProto.INT4


def _attrs(node):
    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


def _inits(model):
    return {t.name: t for t in model.graph.initializer}


def check_amct_layer(deploy, layer, *, scale_d, offset_d, scale_w, has_bias=True, dst="INT8", w_int=None,
                     op_type=None):
    """The layer is AscendQuant -> op(int8 weight, int32 bias) -> AscendDequant(uint64 <layer>.dequant.param)."""
    nodes = {n.name: n for n in deploy.graph.node}
    producers = {o: n for n in deploy.graph.node for o in n.output}
    inits = _inits(deploy)
    op = nodes[layer]
    if op_type:
        assert op.op_type == op_type
    quant = producers[op.input[0]]
    assert quant.op_type == "AscendQuant" and quant.domain == ""
    qa = _attrs(quant)
    assert set(qa) == {"scale", "offset", "dst_type"}
    assert qa["scale"] == pytest.approx(1.0 / scale_d, rel=1e-6)
    assert qa["offset"] == offset_d and qa["dst_type"] == dst.encode()
    w = inits[op.input[1]]
    assert op.input[1] == f"{layer}.weight" and w.data_type == TensorProto.INT8
    if w_int is not None:
        np.testing.assert_array_equal(numpy_helper.to_array(w), w_int)
    if has_bias:
        bias_name = f"{layer}.bias"
        assert inits[bias_name].data_type == TensorProto.INT32
    else:
        assert f"{layer}.bias" not in inits
    dq = nodes[f"{layer}.dequant"]
    assert dq.op_type == "AscendDequant" and dq.domain == "" and _attrs(dq) == {"dtype": 0}
    param = inits[f"{layer}.dequant.param"]
    assert dq.input[1] == param.name and param.data_type == TensorProto.UINT64
    expect = (np.asarray(scale_w, np.float32).astype(np.float64).reshape(-1) * float(np.float32(scale_d)))
    expect = expect.astype(np.float32)
    np.testing.assert_array_equal(unpack_deq_param(numpy_helper.to_array(param)), expect)
    return op, quant, dq


def _no_qdq_into_layers(deploy):
    producers = {o: n for n in deploy.graph.node for o in n.output}
    for n in deploy.graph.node:
        if n.op_type in ("Conv", "ConvTranspose", "Gemm", "MatMul"):
            assert all(producers.get(i) is None or producers[i].op_type != "DequantizeLinear" for i in n.input)


# --------------------------------------------------------------------------------------------------------------
# hand-built models
# --------------------------------------------------------------------------------------------------------------
def _conv_model(rng, *, act=(INT8, 0.03, 0), groups=1, per_channel=True, bias=True, weight_via_q=False, **attrs):
    qtype, s_x, zp = act
    b = QDQBuilder()
    cin, cout = 4, 6
    w = rng.normal(0, 0.3, size=(cout, cin // groups, 3, 3)).astype(np.float32)
    w_int, s_w = sym_weight_quant(w, 0 if per_channel else None)
    xd = b.qdq("x", s_x, zp, qtype)
    wd = b.qdq_weight_float(w, s_w) if weight_via_q else b.dq_weight(w_int, s_w)
    inputs = [xd, wd]
    if bias:
        inputs.append(b.init(rng.normal(0, 0.5, size=cout).astype(np.float32)))
    y = b.node("Conv", inputs, name="conv", group=groups, **attrs)
    feeds = {"x": rng.uniform(-2, 3, size=(2, cin, 9, 9)).astype(np.float32)}
    model, step = with_output_qdq(b, y, {"x": [2, cin, 9, 9]}, feeds)
    return model, feeds, step, w_int, s_w


@pytest.mark.parametrize("per_channel", [True, False])
def test_conv_int8_symmetric(rng, per_channel):
    model, feeds, step, w_int, s_w = _conv_model(rng, per_channel=per_channel, pads=[1, 1, 1, 1])
    deploy, report = qdq_to_deploy(model)
    assert [c.name for c in report.converted] == ["conv"] and not report.kept_float
    check_amct_layer(deploy, "conv", scale_d=0.03, offset_d=0, scale_w=s_w, w_int=w_int, op_type="Conv")
    assert len(unpack_deq_param(numpy_helper.to_array(_inits(deploy)["conv.dequant.param"]))) == (6 if per_channel
                                                                                                  else 1)
    _no_qdq_into_layers(deploy)
    assert_within_steps(run_deploy(deploy, feeds)[0], run_ort(model, feeds)[0], step)
    assert model.graph.node[0].op_type == "QuantizeLinear"  # input model untouched


def test_conv_bias_is_round_of_bias_over_deq_scale(rng):
    model, feeds, step, w_int, s_w = _conv_model(rng)
    deploy, _ = qdq_to_deploy(model)
    inits = _inits(model)
    conv = next(n for n in model.graph.node if n.op_type == "Conv")
    b_float = numpy_helper.to_array(inits[conv.input[2]]).astype(np.float64)
    deq = (s_w.astype(np.float64) * 0.03).astype(np.float32).astype(np.float64)
    np.testing.assert_array_equal(numpy_helper.to_array(_inits(deploy)["conv.bias"]), np.rint(b_float / deq))


def test_conv_uint8_asymmetric_grouped_strided(rng):
    """uint8 zero point 70 becomes int8 offset 70-128; padding must contribute real zeros (offset handled)."""
    model, feeds, step, w_int, s_w = _conv_model(rng, act=(UINT8, 0.02, 70), groups=2, pads=[1, 2, 1, 0],
                                                 strides=[2, 1])
    deploy, report = qdq_to_deploy(model)
    check_amct_layer(deploy, "conv", scale_d=0.02, offset_d=70 - 128, scale_w=s_w, w_int=w_int)
    assert "uint8" in report.converted[0].notes
    assert_within_steps(run_deploy(deploy, feeds)[0], run_ort(model, feeds)[0], step)


def test_conv_int8_asymmetric_activation(rng):
    model, feeds, step, _, s_w = _conv_model(rng, act=(INT8, 0.02, -60), pads=[1, 1, 1, 1])
    deploy, _ = qdq_to_deploy(model)
    check_amct_layer(deploy, "conv", scale_d=0.02, offset_d=-60, scale_w=s_w)
    assert_within_steps(run_deploy(deploy, feeds)[0], run_ort(model, feeds)[0], step)


def test_weight_quantized_from_float_initializer(rng):
    model, feeds, step, w_int, s_w = _conv_model(rng, weight_via_q=True, pads=[1, 1, 1, 1])
    assert any(n.op_type == "QuantizeLinear" and n.input[0].startswith("wf") for n in model.graph.node)
    deploy, report = qdq_to_deploy(model)
    check_amct_layer(deploy, "conv", scale_d=0.03, offset_d=0, scale_w=s_w, w_int=w_int)
    assert not any(t.name.startswith("wf") for t in deploy.graph.initializer)  # float weight dropped
    assert_within_steps(run_deploy(deploy, feeds)[0], run_ort(model, feeds)[0], step)


def _gemm_model(rng, *, trans_b, per_channel, alpha=1.0, beta=1.0, act=(UINT8, 0.015, 128)):
    b = QDQBuilder()
    k, n = 12, 5
    w = rng.normal(0, 0.4, size=(n, k) if trans_b else (k, n)).astype(np.float32)
    w_int, s_w = sym_weight_quant(w, (0 if trans_b else 1) if per_channel else None)
    xd = b.qdq("x", act[1], act[2], act[0])
    wd = b.dq_weight(w_int, s_w, axis=0 if trans_b else 1)
    y = b.node("Gemm", [xd, wd, b.init(rng.normal(0, 0.3, size=n).astype(np.float32))], name="fc",
               transB=int(trans_b), alpha=alpha, beta=beta)
    feeds = {"x": rng.uniform(-1.5, 2, size=(3, k)).astype(np.float32)}
    model, step = with_output_qdq(b, y, {"x": [3, k]}, feeds)
    return model, feeds, step, s_w


@pytest.mark.parametrize("trans_b,per_channel", [(True, False), (False, False), (True, True)])
def test_gemm(rng, trans_b, per_channel):
    model, feeds, step, s_w = _gemm_model(rng, trans_b=trans_b, per_channel=per_channel)
    deploy, report = qdq_to_deploy(model)
    check_amct_layer(deploy, "fc", scale_d=0.015, offset_d=0, scale_w=s_w, op_type="Gemm")
    assert report.converted[0].weight_granularity == ("per-channel[5]" if per_channel else "per-tensor")
    assert_within_steps(run_deploy(deploy, feeds)[0], run_ort(model, feeds)[0], step)


def test_gemm_alpha_beta_folded(rng):
    model, feeds, step, s_w = _gemm_model(rng, trans_b=False, per_channel=False, alpha=0.5, beta=2.0)
    deploy, report = qdq_to_deploy(model)
    gemm = next(n for n in deploy.graph.node if n.op_type == "Gemm")
    assert "alpha" not in _attrs(gemm) and "beta" not in _attrs(gemm)
    check_amct_layer(deploy, "fc", scale_d=0.015, offset_d=0, scale_w=s_w * 0.5)
    assert_within_steps(run_deploy(deploy, feeds)[0], run_ort(model, feeds)[0], step)


@pytest.mark.parametrize("per_channel,with_bias", [(False, False), (True, True)])
def test_matmul_3d_input(rng, per_channel, with_bias):
    b = QDQBuilder()
    w = rng.normal(0, 0.3, size=(16, 8)).astype(np.float32)
    w_int, s_w = sym_weight_quant(w, 1 if per_channel else None)
    xd = b.qdq("x", 0.02, 10, INT8)
    y = b.node("MatMul", [xd, b.dq_weight(w_int, s_w, axis=1)], name="mm")
    if with_bias:
        y = b.node("Add", [y, b.init(rng.normal(0, 0.5, size=8).astype(np.float32))], name="mm_bias")
    feeds = {"x": rng.uniform(-2, 2, size=(2, 8, 16)).astype(np.float32)}  # [B, S=8, K]: S == N on purpose
    model, step = with_output_qdq(b, y, {"x": [2, 8, 16]}, feeds)
    deploy, report = qdq_to_deploy(model)
    check_amct_layer(deploy, "mm", scale_d=0.02, offset_d=10, scale_w=s_w, has_bias=with_bias, op_type="MatMul")
    if with_bias:  # AMCT's MATMUL_DEQUANT_AFTER_ADD: MatMul -> Add(int32 bias) -> AscendDequant
        add = next(n for n in deploy.graph.node if n.op_type == "Add")
        assert "mm.bias" in add.input
        assert {n.name: n for n in deploy.graph.node}["mm.dequant"].input[0] == add.output[0]
        assert report.converted[0].has_bias
    assert_within_steps(run_deploy(deploy, feeds)[0], run_ort(model, feeds)[0], step)


def test_conv_transpose_per_channel(rng):
    b = QDQBuilder()
    w = rng.normal(0, 0.3, size=(4, 6, 3, 3)).astype(np.float32)  # [C_in, C_out, kh, kw]
    w_int, s_w = sym_weight_quant(w, 1)
    y = b.node("ConvTranspose", [b.qdq("x", 0.03, 5, INT8), b.dq_weight(w_int, s_w, axis=1),
                                 b.init(rng.normal(size=6).astype(np.float32))], name="deconv", strides=[2, 2],
               pads=[1, 1, 1, 1])
    feeds = {"x": rng.uniform(-2, 2, size=(1, 4, 5, 5)).astype(np.float32)}
    model, step = with_output_qdq(b, y, {"x": [1, 4, 5, 5]}, feeds)
    deploy, _ = qdq_to_deploy(model)
    check_amct_layer(deploy, "deconv", scale_d=0.03, offset_d=5, scale_w=s_w, op_type="ConvTranspose")
    assert_within_steps(run_deploy(deploy, feeds)[0], run_ort(model, feeds)[0], step)


def test_int4_layer_packs_weights_along_cin(rng):
    b = QDQBuilder(opset=21)
    w = rng.normal(0, 0.3, size=(6, 4, 3, 3)).astype(np.float32)
    w_int, s_w = sym_weight_quant(w, 0, bits=4)
    y = b.node("Conv", [b.qdq("x", 0.3, 1, INT4), b.dq_weight(w_int, s_w, qtype=INT4)], name="conv4",
               pads=[1, 1, 1, 1])
    feeds = {"x": rng.uniform(-2, 2, size=(1, 4, 6, 6)).astype(np.float32)}
    model, step = with_output_qdq(b, y, {"x": [1, 4, 6, 6]}, feeds)
    deploy, report = qdq_to_deploy(model)
    check_amct_layer(deploy, "conv4", scale_d=0.3, offset_d=1, scale_w=s_w, dst="INT4", has_bias=False)
    packed = numpy_helper.to_array(_inits(deploy)["conv4.weight"])
    assert packed.shape == (6, 2, 3, 3)  # C_in halved
    np.testing.assert_array_equal(unpack_int4(packed, 1), w_int)
    assert report.converted[0].wts_type == "INT4"
    assert_within_steps(run_deploy(deploy, feeds)[0], run_ort(model, feeds)[0], step)


def test_shared_input_quant_is_merged_and_names_do_not_matter(rng):
    b = QDQBuilder()
    xd = b.qdq("x", 0.05, 0, INT8)
    outs = []
    for _ in range(2):
        w_int, s_w = sym_weight_quant(rng.normal(size=(3, 2, 1, 1)).astype(np.float32), 0)
        outs.append(b.node("Conv", [xd, b.dq_weight(w_int, s_w)], name=""))
    y = b.node("Add", outs, name="")
    feeds = {"x": rng.normal(size=(1, 2, 4, 4)).astype(np.float32)}
    model, step = with_output_qdq(b, y, {"x": [1, 2, 4, 4]}, feeds)
    for n in model.graph.node:
        n.name = ""
    deploy, report = qdq_to_deploy(model)
    assert len(report.converted) == 2 and all(c.name.startswith("Conv_") for c in report.converted)
    assert sum(n.op_type == "AscendQuant" for n in deploy.graph.node) == 1  # QuantFusionPass-like merge
    assert_within_steps(run_deploy(deploy, feeds)[0], run_ort(model, feeds)[0], step)


def test_output_qdq_kept_as_next_layer_input_and_graph_output_quant(rng):
    """conv1 -> Q/DQ -> conv2 -> Q (int8 graph output): the middle pair becomes conv2's AscendQuant, the final
    QuantizeLinear an AscendQuant with the same int8 output."""
    b = QDQBuilder()
    w1, s1 = sym_weight_quant(rng.normal(size=(4, 3, 3, 3)).astype(np.float32), 0)
    w2, s2 = sym_weight_quant(rng.normal(size=(2, 4, 1, 1)).astype(np.float32), 0)
    h = b.node("Conv", [b.qdq("x", 0.04, 0, INT8), b.dq_weight(w1, s1)], name="conv1", pads=[1, 1, 1, 1])
    h = b.qdq(h, 0.1, -3, INT8)
    y = b.node("Conv", [h, b.dq_weight(w2, s2)], name="conv2")
    b.inits.append(numpy_helper.from_array(np.array(0.2, np.float32), "ys"))
    b.inits.append(numpy_helper.from_array(np.array(2, np.int8), "yz"))
    b.nodes.append(helper.make_node("QuantizeLinear", [y, "ys", "yz"], ["yq"], name="out_q"))
    g = helper.make_graph(b.nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 5, 5])],
                          [helper.make_tensor_value_info("yq", TensorProto.INT8, None)], b.inits)
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    feeds = {"x": rng.normal(size=(1, 3, 5, 5)).astype(np.float32)}
    deploy, report = qdq_to_deploy(model)
    assert [c.name for c in report.converted] == ["conv1", "conv2"] and report.output_quants == ["out_q"]
    check_amct_layer(deploy, "conv2", scale_d=0.1, offset_d=-3, scale_w=s2, has_bias=False)
    assert not any(n.op_type in ("QuantizeLinear", "DequantizeLinear") for n in deploy.graph.node)
    got, want = run_deploy(deploy, feeds)[0], run_ort(model, feeds)[0]
    assert got.dtype == np.int8
    assert np.abs(got.astype(int) - want.astype(int)).max() <= 1


def test_remaining_qdq_to_quant_antiquant(rng):
    b = QDQBuilder()
    w, s = sym_weight_quant(rng.normal(size=(3, 3, 1, 1)).astype(np.float32), 0)
    h = b.node("Conv", [b.qdq("x", 0.05, 0, INT8), b.dq_weight(w, s)], name="conv")
    hd = b.qdq(h, 0.08, 4, UINT8)
    y = b.node("Add", [hd, hd], name="add")
    feeds = {"x": rng.normal(size=(1, 3, 4, 4)).astype(np.float32)}
    model = b.model({"x": [1, 3, 4, 4]}, [y])
    keep, _ = qdq_to_deploy(model)
    asc, report = qdq_to_deploy(model, remaining_qdq="ascend")
    assert any(n.op_type == "QuantizeLinear" for n in keep.graph.node)
    types = [n.op_type for n in asc.graph.node]
    assert "QuantizeLinear" not in types and "AscendAntiQuant" in types
    anti = next(n for n in asc.graph.node if n.op_type == "AscendAntiQuant")
    assert _attrs(anti)["scale"] == pytest.approx(0.08) and _attrs(anti)["offset"] == 4 - 128
    np.testing.assert_allclose(run_deploy(asc, feeds)[0], run_deploy(keep, feeds)[0], atol=1e-6)
    assert_within_steps(run_deploy(asc, feeds)[0], run_ort(model, feeds)[0], 2 * 0.08)


# --------------------------------------------------------------------------------------------------------------
# unsupported patterns
# --------------------------------------------------------------------------------------------------------------
def _unsupported_model(rng):
    """Four layers the Ascend ops cannot express, plus one that converts."""
    b = QDQBuilder()
    x = "x"
    w_int, s_w = sym_weight_quant(rng.normal(size=(4, 4, 1, 1)).astype(np.float32), 0)
    # per-channel activation scales
    h = b.node("Conv", [b.qdq(x, np.full(4, 0.05), np.zeros(4, np.int8), INT8, axis=1), b.dq_weight(w_int, s_w)],
               name="per_channel_act")
    # asymmetric weights
    h = b.node("Conv", [b.qdq(h, 0.1, 0, INT8), b.dq_weight(w_int, s_w, zp=np.full(4, 3))], name="asym_weight")
    # weight-only quantization
    h = b.node("Conv", [h, b.dq_weight(w_int, s_w)], name="weight_only")
    # a good layer
    h = b.node("Conv", [b.qdq(h, 0.1, 0, INT8), b.dq_weight(w_int, s_w)], name="good")
    # Q/DQ pair with mismatched scales
    bad = b.qdq(h, 0.1, 0, INT8, dq_scale=0.2)
    h = b.node("Conv", [bad, b.dq_weight(w_int, s_w)], name="mismatch")
    # a QuantizeLinear whose integers are consumed by something other than DequantizeLinear
    zs = b.init(np.array(0.1, np.float32))
    zz = b.init(np.array(0, np.int8))
    b.nodes.append(helper.make_node("QuantizeLinear", [h, zs, zz], ["q_alone"], name="lonely_q"))
    h = b.node("Cast", ["q_alone"], name="cast", to=TensorProto.FLOAT)
    feeds = {"x": rng.normal(size=(1, 4, 3, 3)).astype(np.float32)}
    return b.model({"x": [1, 4, 3, 3]}, [h]), feeds


def test_unsupported_layers_reported_and_kept_float(rng):
    model, feeds = _unsupported_model(rng)
    deploy, report = qdq_to_deploy(model)
    reasons = {u.name: u.reason for u in report.kept_float}
    assert set(reasons) == {"per_channel_act", "asym_weight", "weight_only", "mismatch", "lonely_q"}
    assert "without a matching DequantizeLinear" in reasons["lonely_q"]
    assert "per-channel activation" in reasons["per_channel_act"]
    assert "zero-point" in reasons["asym_weight"]
    assert "weight-only" in reasons["weight_only"]
    assert "differ" in reasons["mismatch"]
    assert [c.name for c in report.converted] == ["good"]
    text = str(report)
    assert "good" in text and "per-channel activation" in text and "kept unconverted" in text
    # the kept layers still carry their float QDQ simulation: the deploy model matches ONNX Runtime
    np.testing.assert_allclose(run_deploy(deploy, feeds)[0], run_ort(model, feeds)[0], rtol=1e-4, atol=1e-4)
    with pytest.raises(DeployConversionError, match="per_channel_act"):
        qdq_to_deploy(model, on_unsupported="raise")


def test_dq_without_q_reported(rng):
    w_int, s_w = sym_weight_quant(rng.normal(size=(2, 3, 1, 1)).astype(np.float32), 0)
    b = QDQBuilder()
    b.inits += [numpy_helper.from_array(np.array(0.1, np.float32), "xs"),
                numpy_helper.from_array(np.array(0, np.int8), "xz")]
    b.nodes.append(helper.make_node("DequantizeLinear", ["xi", "xs", "xz"], ["xd"], name="in_dq"))
    y = b.node("Conv", ["xd", b.dq_weight(w_int, s_w)], name="conv_from_int_input")
    g = helper.make_graph(b.nodes, "g", [helper.make_tensor_value_info("xi", TensorProto.INT8, [1, 3, 2, 2])],
                          [helper.make_tensor_value_info(y, TensorProto.FLOAT, None)], b.inits)
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    _, report = qdq_to_deploy(model)
    assert report.kept_float[0].name == "conv_from_int_input"
    assert "no matching QuantizeLinear" in report.kept_float[0].reason
    with pytest.raises(DeployConversionError, match="conv_from_int_input"):
        qdq_to_deploy(model, on_unsupported="raise")


def test_bias_overflow_raises_naming_layer(rng):
    b = QDQBuilder()
    w_int, _ = sym_weight_quant(rng.normal(size=(2, 3, 1, 1)).astype(np.float32), 0)
    y = b.node("Conv", [b.qdq("x", 1e-4, 0, INT8), b.dq_weight(w_int, np.full(2, 1e-4)),
                        b.init(np.array([1e4, 0], np.float32))], name="big_bias")
    with pytest.raises(DeployConversionError, match="big_bias.*int32"):
        qdq_to_deploy(b.model({"x": [1, 3, 2, 2]}, [y]))


# --------------------------------------------------------------------------------------------------------------
# onnxruntime.quantization on a torch model
# --------------------------------------------------------------------------------------------------------------
class _Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(3, 8, 3, padding=1)
        self.c2 = nn.Conv2d(8, 8, 3, stride=2, padding=1, groups=2)
        self.up = nn.ConvTranspose2d(8, 4, 2, stride=2)
        self.fc = nn.Linear(4 * 8 * 8, 10)

    def forward(self, x):
        x = torch.relu(self.c1(x))
        x = torch.relu(self.c2(x))
        x = self.up(x)
        return self.fc(x.flatten(1))


class _Seq(nn.Module):
    """Linear on a 3-D input: exported as MatMul (+ Add)."""

    def __init__(self) -> None:
        super().__init__()
        self.l1 = nn.Linear(12, 16)
        self.l2 = nn.Linear(16, 6, bias=False)

    def forward(self, x):
        return self.l2(torch.relu(self.l1(x)))


def _reader(shape, n=4, seed=1):
    from onnxruntime.quantization import CalibrationDataReader

    class Reader(CalibrationDataReader):
        def __init__(self):
            g = np.random.default_rng(seed)
            self.data = iter([{"x": g.normal(size=shape).astype(np.float32)} for _ in range(n)])

        def get_next(self):
            return next(self.data, None)

    return Reader()


@pytest.fixture(scope="module")
def float_onnx(tmp_path_factory):
    torch.manual_seed(0)
    out = {}
    d = tmp_path_factory.mktemp("float")
    for name, net, shape in [("cnn", _Net(), (2, 3, 8, 8)), ("seq", _Seq(), (2, 5, 12))]:
        path = d / f"{name}.onnx"
        with warnings.catch_warnings():  # the TorchScript exporter's deprecation notice
            warnings.simplefilter("ignore", DeprecationWarning)
            torch.onnx.export(net.eval(), (torch.randn(*shape),), str(path), dynamo=False, input_names=["x"],
                              output_names=["y"], opset_version=13)
        out[name] = (path, shape)
    return out


def _output_step(model):
    producers = {o: n for n in model.graph.node for o in n.output}
    dq = producers[model.graph.output[0].name]
    assert dq.op_type == "DequantizeLinear"
    return float(numpy_helper.to_array(_inits(model)[dq.input[1]]))


@pytest.mark.parametrize("net", ["cnn", "seq"])
@pytest.mark.parametrize("per_channel", [False, True])
@pytest.mark.parametrize("act_type", ["QInt8", "QUInt8"])
def test_onnxruntime_quantize_static(float_onnx, tmp_path, net, per_channel, act_type):
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_static

    path, shape = float_onnx[net]
    qpath = tmp_path / "q.onnx"
    quantize_static(str(path), str(qpath), _reader(shape), quant_format=QuantFormat.QDQ, per_channel=per_channel,
                    activation_type=getattr(QuantType, act_type), weight_type=QuantType.QInt8)
    model = onnx.load(str(qpath))
    deploy, report = qdq_to_deploy(model, on_unsupported="raise")
    expected = {"cnn": {"Conv": 2, "ConvTranspose": 1, "Gemm": 1}, "seq": {"MatMul": 2}}[net]
    got = {}
    for c in report.converted:
        got[c.op_type] = got.get(c.op_type, 0) + 1
    assert got == expected and not report.kept_float
    _no_qdq_into_layers(deploy)
    inits = _inits(deploy)
    for c in report.converted:
        check_amct_layer(deploy, c.name, scale_d=c.scale_d, offset_d=c.offset_d, scale_w=c.scale_w,
                         has_bias=c.has_bias)
        n_param = numpy_helper.to_array(inits[f"{c.name}.dequant.param"]).size
        assert n_param == len(c.scale_w) and (n_param > 1) == per_channel
        if act_type == "QInt8":
            assert c.dst_type == "INT8"
    feeds = {"x": np.random.default_rng(7).normal(size=shape).astype(np.float32)}
    assert_within_steps(run_deploy(deploy, feeds)[0], run_ort(model, feeds)[0], _output_step(model))


def test_onnxruntime_quantize_dynamic_reported(float_onnx, tmp_path):
    from onnxruntime.quantization import quantize_dynamic

    path, _ = float_onnx["cnn"]
    qpath = tmp_path / "d.onnx"
    quantize_dynamic(str(path), str(qpath))
    model = onnx.load(str(qpath))
    deploy, report = qdq_to_deploy(model)
    kinds = {u.op_type for u in report.kept_float}
    assert "DynamicQuantizeLinear" in kinds and kinds & {"ConvInteger", "MatMulInteger"}
    assert not report.converted
    dyn = next(u for u in report.kept_float if u.op_type == "DynamicQuantizeLinear")
    with pytest.raises(DeployConversionError, match=re.escape(dyn.name)):
        qdq_to_deploy(model, on_unsupported="raise")
    feeds = {"x": np.random.default_rng(3).normal(size=(2, 3, 8, 8)).astype(np.float32)}
    np.testing.assert_allclose(run_ort(deploy, feeds)[0], run_ort(model, feeds)[0])  # left unchanged


# --------------------------------------------------------------------------------------------------------------
# report, fake-quant model, file entry point
# --------------------------------------------------------------------------------------------------------------
def test_report_record_text_and_files(rng, tmp_path):
    model, feeds, step, _, s_w = _conv_model(rng, act=(UINT8, 0.02, 70), pads=[1, 1, 1, 1])
    _, report = qdq_to_deploy(model)
    text = str(report)
    assert "conv" in text and "per-channel[6]" in text and "-58" in text
    rec = report.to_record_text()
    assert rec.startswith('record { key: "conv" value { scale_d: 0.0199999996 offset_d: -58 scale_w:')
    assert rec.count("scale_w:") == 6 and 'dst_type: "INT8"' in rec
    src = tmp_path / "qat.onnx"
    onnx.save(model, str(src))
    rep2 = convert_qat_model(src, str(tmp_path / "out" / "net"), record_file=tmp_path / "record.txt")
    assert [c.name for c in rep2.converted] == ["conv"]
    deploy = onnx.load(str(tmp_path / "out" / "net_deploy_model.onnx"))
    fake = onnx.load(str(tmp_path / "out" / "net_fake_quant_model.onnx"))
    assert (tmp_path / "record.txt").read_text() == rec
    assert_within_steps(run_deploy(deploy, feeds)[0], run_ort(fake, feeds)[0], step)


def test_fake_quant_from_qdq_validates(rng):
    model, feeds, *_ = _conv_model(rng)
    fake = fake_quant_from_qdq(model)
    assert fake is not model and fake.SerializeToString() == model.SerializeToString()
    broken = onnx.ModelProto()
    broken.CopyFrom(model)
    broken.graph.node[0].input[0] = "missing"
    with pytest.raises(onnx.checker.ValidationError):
        fake_quant_from_qdq(broken)


def test_invalid_option():
    with pytest.raises(ValueError):
        qdq_to_deploy(onnx.ModelProto(), on_unsupported="ignore")


def test_matmul_operand_patterns_reported(rng):
    b = QDQBuilder()
    w_int, s_w = sym_weight_quant(rng.normal(size=(4, 4)).astype(np.float32), None)
    a = b.qdq("x", 0.05, 0, INT8)
    h = b.node("MatMul", [a, b.qdq("x", 0.05, 0, INT8)], name="act_x_act")
    h = b.node("MatMul", [b.dq_weight(w_int, s_w), b.qdq(h, 0.1, 0, INT8)], name="w_first")
    _, report = qdq_to_deploy(b.model({"x": [4, 4]}, [h]))
    reasons = {u.name: u.reason for u in report.kept_float}
    assert "quantized activation" in reasons["act_x_act"]
    assert "weight as first operand" in reasons["w_first"]
    assert not report.converted

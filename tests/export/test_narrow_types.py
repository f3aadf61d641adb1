"""4- and 16-bit activations and INT4 weights in the fake-quant ONNX model."""

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from onnx import TensorProto

import amct_torch
from amct_torch import QatConfig, QuantConfig


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1, self.c2, self.fc = nn.Conv2d(2, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1), nn.Linear(8, 4)

    def forward(self, x):
        x = F.relu(self.c1(x))
        x = F.relu(self.c2(x)) + x
        return self.fc(x.mean((2, 3)))


@pytest.fixture
def x():
    torch.manual_seed(0)
    return torch.randn(8, 2, 8, 8)


def run_ort(path, x):
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    sess = ort.InferenceSession(str(path), so)
    return sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0]


def types_of(model, op):
    inits = {t.name: t.data_type for t in model.graph.initializer}
    return {inits.get(n.input[2]) for n in model.graph.node if n.op_type == op and len(n.input) > 2}


def opset(model):
    return next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))


def test_a4w4_exports_int4_activations_and_packed_int4_weights(x, tmp_path):
    q = amct_torch.quantize(Net(), QuantConfig(weight_bits=4, activation_bits=4, activation_calibrator="minmax"), x)
    amct_torch.calibrate(q, [x], progress=False)
    res = amct_torch.export(q, tmp_path / "a4w4", x)
    m = res.fake_quant_model
    assert opset(m) == 21
    assert TensorProto.INT4 in types_of(m, "QuantizeLinear")
    weights = {t.name: t for t in m.graph.initializer if t.name.endswith(".weight")}
    assert weights["c2.weight"].data_type == TensorProto.INT4 and len(weights["c2.weight"].raw_data) == 8 * 8 * 9 // 2
    y = run_ort(res.fake_quant, x)
    with torch.no_grad():
        expected = q(x).numpy()
    assert (y.argmax(1) == expected.argmax(1)).all()
    assert np.abs(y - expected).max() < 0.05
    assert res.deploy_report.layer("c2").wts_type == "INT4"  # AMCT's packed INT4 in the deploy model too


def test_a8w4_keeps_int8_storage_for_the_fast_kernels_unless_asked(x, tmp_path):
    q = amct_torch.quantize(Net(), QuantConfig(weight_bits=4, activation_calibrator="minmax"), x)
    amct_torch.calibrate(q, [x], progress=False)
    auto = amct_torch.export(q, tmp_path / "auto", x).fake_quant_model
    packed = amct_torch.export(q, tmp_path / "packed", x, int4_weights="packed")
    w = lambda m: {t.name: t.data_type for t in m.graph.initializer}["c2.weight"]  # noqa: E731
    assert w(auto) == TensorProto.INT8 and opset(auto) == 20
    assert w(packed.fake_quant_model) == TensorProto.INT4
    assert np.abs(run_ort(packed.fake_quant, x) - run_ort(tmp_path / "auto_fake_quant_model.onnx", x)).max() < 1e-5
    with pytest.raises(ValueError, match="int4_weights: got 'half'"):
        amct_torch.export(q, tmp_path / "bad", x, int4_weights="half")


def test_a16w8_qat_exports_int16_activations(x, tmp_path):
    q = amct_torch.prepare_qat(Net(), QatConfig(activation_bits=16, weight_bits=8), x)
    q(x)
    q.eval()
    res = amct_torch.export(q, tmp_path / "a16", x)
    assert opset(res.fake_quant_model) == 21 and TensorProto.INT16 in types_of(res.fake_quant_model, "QuantizeLinear")
    with torch.no_grad():
        expected = q(x).numpy()
    assert np.abs(run_ort(res.fake_quant, x) - expected).max() < 1e-4
    report = res.deploy_report  # INT16 has no AscendQuant form: every layer reported and kept in float
    assert not report.converted and {u.name for u in report.kept_float} == {"c1", "c2", "fc"}
    assert all("INT16" in u.reason for u in report.kept_float)
    onnx.checker.check_model(res.fake_quant_model)


def test_a4w4_export_with_relu6_before_an_int4_quantizer(x, tmp_path):
    # the redundant-Clip pass reads INT4 zero points (onnx's 4-bit numpy type, unknown to np.iinfo)
    net = nn.Sequential(nn.Conv2d(2, 8, 3, padding=1), nn.ReLU6(), nn.Conv2d(8, 4, 3, padding=1))
    q = amct_torch.quantize(net, QuantConfig(weight_bits=4, activation_bits=4, activation_calibrator="minmax"), x)
    amct_torch.calibrate(q, [x], progress=False)
    res = amct_torch.export(q, tmp_path / "relu6", x)
    with torch.no_grad():
        expected = q(x).numpy()
    assert np.abs(run_ort(res.fake_quant, x) - expected).max() < 0.05

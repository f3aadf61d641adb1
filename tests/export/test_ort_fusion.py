"""The fake-quant model is laid out so that onnxruntime runs every quantized conv as an integer kernel."""

import collections

import onnx
import onnxruntime as ort
import pytest
import torch
import torch.nn as nn

import amct_torch
from amct_torch import QuantConfig


class Block(nn.Module):
    """conv -> bn -> relu -> conv -> bn, plus identity, -> relu: the residual pattern."""

    def __init__(self, c=8):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)
        self.conv2, self.bn2 = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)
        self.relu1, self.relu2 = nn.ReLU(), nn.ReLU()

    def forward(self, x):
        return self.relu2(self.bn2(self.conv2(self.relu1(self.bn1(self.conv1(x))))) + x)


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.relu = nn.ReLU()
        self.block = Block()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(8, 5)

    def forward(self, x):
        x = self.block(self.relu(self.stem(x)))
        return self.fc(torch.flatten(self.pool(x), 1))


def optimized_ops(path, tmp_path):
    so = ort.SessionOptions()
    so.optimized_model_filepath = str(tmp_path / "opt.onnx")
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    ort.InferenceSession(str(path), so)
    return collections.Counter(n.op_type for n in onnx.load(so.optimized_model_filepath).graph.node)


@pytest.fixture
def calibrated():
    torch.manual_seed(0)
    x = torch.randn(4, 3, 16, 16)
    return x


def test_output_quantizers_go_where_the_output_reaches_float_ops(calibrated):
    q = amct_torch.quantize(Net().eval(), QuantConfig(activation_calibrator="minmax"), calibrated)
    with_output = {lp.name for lp in q.amct_plan.layers if lp.detail.endswith("+ output")}
    # stem -> relu -> block.conv1 (quantized) and the residual add (float): needs one
    # block.conv1 -> bn -> relu -> block.conv2 (quantized only): none; block.conv2 -> add: needs one
    assert with_output == {"stem", "block.conv2"}
    assert q.fc.output_quantizer is None  # the model output stays float


def test_every_conv_runs_as_qlinearconv_in_onnxruntime(calibrated, tmp_path):
    q = amct_torch.quantize(Net().eval(), QuantConfig(activation_calibrator="minmax"), calibrated)
    amct_torch.calibrate(q, [calibrated], progress=False)
    res = amct_torch.export(q, tmp_path / "net", calibrated)
    ops = optimized_ops(res.fake_quant, tmp_path)
    assert ops["QLinearConv"] == 3 and ops["Conv"] == 0, ops


def test_inputs_only_leaves_convs_feeding_the_add_in_float(calibrated, tmp_path):
    q = amct_torch.quantize(Net().eval(), QuantConfig(activation_calibrator="minmax"), calibrated,
                            quantize_outputs="none")
    amct_torch.calibrate(q, [calibrated], progress=False)
    res = amct_torch.export(q, tmp_path / "net", calibrated)
    ops = optimized_ops(res.fake_quant, tmp_path)
    assert ops["QLinearConv"] < 3, ops


def test_bad_quantize_outputs_value_is_rejected(calibrated):
    with pytest.raises(ValueError, match="quantize_outputs: got 'some'"):
        amct_torch.quantize(Net().eval(), None, calibrated, quantize_outputs="some")

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


def test_quantizers_go_around_the_add_and_the_pool(calibrated):
    q = amct_torch.quantize(Net().eval(), QuantConfig(activation_calibrator="minmax"), calibrated)
    with_output = {lp.name for lp in q.amct_plan.layers if "+ output" in lp.detail}
    # block.conv2 -> bn2 -> add: the add's input; block.conv1 -> relu1 -> block.conv2 only: none;
    # stem -> relu -> (block.conv1, add): quantized after the ReLU instead, not at the stem's output
    assert with_output == {"block.conv2"}
    inserted = {lp.name: lp.detail for lp in q.amct_plan.layers if lp.source == "quantize_outputs=auto"}
    assert set(inserted) == {"relu_quant", "block.relu2_quant", "pool_quant"}, inserted
    assert "after its ReLU" in inserted["block.relu2_quant"]
    # the block's first conv and the fc read tensors that are already quantized: tied, not calibrated
    assert q.block.conv1.input_quantizer.tied_to is q.relu_quant
    assert q.fc.input_quantizer.tied_to is q.pool_quant  # through flatten
    assert q.block.conv2.input_quantizer.tied_to is None  # after relu1 of an unquantized conv output
    assert q.fc.output_quantizer is None  # the model output stays float
    assert isinstance(q.block, Block) and type(q.block).__name__ == "Block"  # only its forward is regenerated


def test_a_tied_quantizer_changes_nothing(calibrated):
    q = amct_torch.quantize(Net().eval(), QuantConfig(activation_calibrator="minmax"), calibrated)
    amct_torch.calibrate(q, [calibrated], progress=False)
    seen = {}
    q.block.conv1.input_quantizer.register_forward_hook(lambda m, i, o: seen.update(i=i[0], o=o))
    with torch.no_grad():
        q(calibrated + 0.5)
    tied = q.block.conv1.input_quantizer
    assert tied.is_calibrated and float(tied.scale) == float(q.relu_quant.scale)
    assert int(tied.offset) == int(q.relu_quant.offset)
    assert torch.equal(seen["i"], seen["o"])


def test_the_whole_model_runs_in_integer_kernels(calibrated, tmp_path):
    q = amct_torch.quantize(Net().eval(), QuantConfig(activation_calibrator="minmax"), calibrated)
    amct_torch.calibrate(q, [calibrated], progress=False)
    res = amct_torch.export(q, tmp_path / "net", calibrated)
    names = {n.name for n in res.fake_quant_model.graph.node}
    assert {"block.relu2_quant.quant", "pool_quant.dequant"} <= names
    ops = optimized_ops(res.fake_quant, tmp_path)
    assert ops["QLinearConv"] == 3 and ops["Conv"] == 0, ops
    assert ops["QLinearAdd"] == 1 and ops["Add"] == 0, ops
    assert ops["QLinearGlobalAveragePool"] == 1 and ops["QGemm"] == 1 and ops["Gemm"] == 0, ops
    sess = ort.InferenceSession(str(res.fake_quant))
    with torch.no_grad():
        expected = q(calibrated).numpy()
    y = sess.run(None, {sess.get_inputs()[0].name: calibrated.numpy()})[0]
    assert (y.argmax(1) == expected.argmax(1)).all()
    assert abs(y - expected).max() < 0.05


class SharedRelu(nn.Module):
    """torchvision's BasicBlock pattern: one ReLU module called twice, the second time after the add."""

    def __init__(self, c=8):
        super().__init__()
        self.conv1, self.conv2 = nn.Conv2d(c, c, 3, padding=1), nn.Conv2d(c, c, 3, padding=1)
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x):
        out = self.conv2(self.relu(self.conv1(x)))
        out += x
        return self.relu(out)


def test_the_second_call_of_a_shared_relu_gets_its_own_quantizer(calibrated, tmp_path):
    model = nn.Sequential(nn.Conv2d(3, 8, 1), nn.ReLU(), SharedRelu(), SharedRelu(), nn.Conv2d(8, 2, 1)).eval()
    q = amct_torch.quantize(model, QuantConfig(activation_calibrator="minmax"), calibrated)
    inserted = {lp.name for lp in q.amct_plan.layers if lp.source == "quantize_outputs=auto"}
    assert inserted == {"1_quant", "2.relu_1_quant", "3.relu_1_quant"}, inserted
    assert q[3].conv1.input_quantizer.tied_to is q[2].relu_1_quant
    amct_torch.calibrate(q, [calibrated], progress=False)
    res = amct_torch.export(q, tmp_path / "net", calibrated)
    ops = optimized_ops(res.fake_quant, tmp_path)
    assert ops["QLinearAdd"] == 2 and ops["Add"] == 0 and ops["Relu"] == 0, ops
    sess = ort.InferenceSession(str(res.fake_quant))
    with torch.no_grad():
        expected = q(calibrated).numpy()
    y = sess.run(None, {sess.get_inputs()[0].name: calibrated.numpy()})[0]
    assert abs(y - expected).max() < 0.05


def test_inputs_only_leaves_convs_feeding_the_add_in_float(calibrated, tmp_path):
    q = amct_torch.quantize(Net().eval(), QuantConfig(activation_calibrator="minmax"), calibrated,
                            quantize_outputs="none")
    amct_torch.calibrate(q, [calibrated], progress=False)
    res = amct_torch.export(q, tmp_path / "net", calibrated)
    ops = optimized_ops(res.fake_quant, tmp_path)
    assert ops["QLinearConv"] < 3 and ops["QLinearAdd"] == 0, ops


def test_bad_quantize_outputs_value_is_rejected(calibrated):
    with pytest.raises(ValueError, match="quantize_outputs: got 'some'"):
        amct_torch.quantize(Net().eval(), None, calibrated, quantize_outputs="some")


class Relu6Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1, self.act, self.c2 = nn.Conv2d(3, 8, 3, padding=1), nn.ReLU6(), nn.Conv2d(8, 4, 1)

    def forward(self, x):
        return self.c2(self.act(self.c1(x)))


def test_a_relu6_the_next_quantizer_saturates_anyway_is_dropped_from_the_onnx_model(tmp_path):
    torch.manual_seed(0)
    model = Relu6Net().eval()
    with torch.no_grad():
        model.c1.weight.mul_(20)  # ReLU6 saturates: the next layer's range is calibrated to [0, 6]
    x = torch.randn(4, 3, 8, 8)
    q = amct_torch.quantize(model, QuantConfig(activation_calibrator="minmax"), x)
    amct_torch.calibrate(q, [x], progress=False)
    res = amct_torch.export(q, tmp_path / "n", x)
    assert "Clip" not in {n.op_type for n in res.fake_quant_model.graph.node}
    sess = ort.InferenceSession(str(res.fake_quant))
    y = sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0]
    with torch.no_grad():
        expected = q(x).numpy()
    assert (abs(y - expected)).max() < 0.05
    assert optimized_ops(res.fake_quant, tmp_path)["QLinearConv"] == 1  # c1; c2 feeds the float model output


def test_a_dead_relu6_output_gets_the_relu6_range_and_the_clip_goes(tmp_path):
    torch.manual_seed(0)
    model = Relu6Net().eval()
    with torch.no_grad():
        model.c1.bias.fill_(-100.0)  # ReLU6 output is all zero: without the bound the scale would fall back to 1
    x = torch.randn(4, 3, 8, 8)
    q = amct_torch.quantize(model, QuantConfig(activation_calibrator="minmax"), x)
    assert q.c2.input_quantizer.range_limit == (0.0, 6.0)
    amct_torch.calibrate(q, [x], progress=False)
    assert float(q.c2.input_quantizer.scale) == pytest.approx(6 / 255)
    res = amct_torch.export(q, tmp_path / "n", x)
    assert "Clip" not in {n.op_type for n in res.fake_quant_model.graph.node}


class FunctionalRelu6(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1, self.c2 = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 4, 1)

    def forward(self, x):
        return self.c2(torch.nn.functional.relu6(self.c1(x)))


def test_a_relu6_that_still_cuts_values_is_kept(tmp_path):
    torch.manual_seed(0)
    model = FunctionalRelu6().eval()
    with torch.no_grad():
        model.c1.bias.fill_(-100.0)  # all zero, no module to read the bound from: scale 1, [0, 255] > 6
    x = torch.randn(4, 3, 8, 8)
    q = amct_torch.quantize(model, QuantConfig(activation_calibrator="minmax"), x)
    amct_torch.calibrate(q, [x], progress=False)
    res = amct_torch.export(q, tmp_path / "n", x)
    assert "Clip" in {n.op_type for n in res.fake_quant_model.graph.node}

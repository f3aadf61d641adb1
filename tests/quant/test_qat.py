"""prepare_qat: learned state created at prepare, BN trained folded, exact restore, export after QAT."""

import copy

import numpy as np
import onnxruntime as ort
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import amct_torch
from amct_torch import ConfigError, QatConfig
from amct_torch.nn import FoldedBatchNorm
from amct_torch.quant import LsqActivationQuantizer, UlqActivationQuantizer, UlqWeightQuantizer, check_calibrated


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(1, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8)
        self.conv2, self.bn2 = nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        x = F.relu(self.bn1(self.conv1(x)))
        x = torch.relu(self.bn2(self.conv2(x)) + x)
        return self.fc(torch.flatten(self.pool(x), 1))


@pytest.fixture
def data():
    g = torch.Generator().manual_seed(0)
    return [(torch.randn(8, 1, 8, 8, generator=g), torch.randint(0, 4, (8,), generator=g)) for _ in range(6)]


def trained_float(data):
    torch.manual_seed(0)
    model = Net()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    for x, y in data:
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    return model.eval()


def train(model, data, steps=None, lr=0.01):
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    for x, y in data[:steps]:
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    return opt


def test_learned_state_exists_at_prepare_and_the_optimizer_trains_it(data):
    q = amct_torch.prepare_qat(trained_float(data), QatConfig(batch_num=2), data[0][0])
    assert q.training
    names = {n for n, _ in q.named_parameters()}
    assert {"conv2.input_quantizer.clip_max", "conv2.input_quantizer.clip_min", "fc.input_quantizer.clip_max"} <= names
    assert isinstance(q.bn1, FoldedBatchNorm) and "bn1.weight" in names  # BN keeps its path and keys
    before = q.conv2.output_quantizer.clip_max.item()
    train(q, data, steps=2)  # the first batch_num=2 steps initialise the clips (IFMR)
    assert q.conv2.output_quantizer.is_calibrated
    init = q.conv2.output_quantizer.clip_max.item()
    assert init != before
    train(q, data[2:], steps=3)
    assert q.conv2.output_quantizer.clip_max.item() != init  # learned after initialisation


def test_fixed_min_after_relu_and_clips_from_the_config(data):
    q = amct_torch.prepare_qat(trained_float(data), QatConfig(clip_max=3.0, clip_min=-1.0), data[0][0])
    conv2_in = q.conv2.input_quantizer  # after F.relu: lower clip pinned at 0
    assert conv2_in.fixed_min and not conv2_in.clip_min.requires_grad and float(conv2_in.clip_min) == 0
    conv1_in = q.conv1.input_quantizer  # the model input: both clips learned
    assert not conv1_in.fixed_min and float(conv1_in.clip_min) == -1.0 and float(conv1_in.clip_max) == 3.0
    assert conv1_in.is_calibrated  # given clips: nothing to observe
    check_calibrated(q)


def test_bad_bit_widths_are_refused():
    with pytest.raises(ConfigError, match=r"A8W8, A8W4, A4W4 or A16W8"):
        QatConfig(weight_bits=8, activation_bits=4)
    with pytest.raises(ConfigError, match=r"clip_min"):
        QatConfig(clip_max=2.0, clip_min=0.5)


def test_state_dict_restores_exactly(data):
    float_model = trained_float(data)
    q = amct_torch.prepare_qat(float_model, QatConfig(activation_algorithm="lsq_plus", weight_algorithm="ulq_retrain"),
                               data[0][0])
    train(q, data, steps=4)
    fresh = amct_torch.prepare_qat(float_model, QatConfig(activation_algorithm="lsq_plus", weight_algorithm="ulq_retrain"),
                                   data[0][0])
    fresh.load_state_dict(q.state_dict())
    for mode in ("train", "eval"):
        getattr(q, mode)(), getattr(fresh, mode)()
        a, b = copy.deepcopy(q)(data[5][0]), copy.deepcopy(fresh)(data[5][0])
        assert torch.equal(a, b), mode
    assert isinstance(fresh.conv2.input_quantizer, LsqActivationQuantizer)
    assert isinstance(fresh.conv2.weight_pipeline[-1], UlqWeightQuantizer)


def test_frozen_bn_trains_exactly_what_is_deployed(data):
    q = amct_torch.prepare_qat(trained_float(data), QatConfig(), data[0][0])
    train(q, data, steps=2)
    stats = q.bn1.running_mean.clone()
    train(q, data[2:], steps=1)
    assert not torch.equal(stats, q.bn1.running_mean)  # live: BN statistics move
    assert amct_torch.freeze_bn_stats(q) == 2
    stats = q.bn1.running_mean.clone()
    x = data[4][0]
    with torch.no_grad():
        q.train()
        y_train = q(x)
        q.eval()
        y_eval = q(x)
    assert torch.equal(stats, q.bn1.running_mean)
    assert torch.allclose(y_train, y_eval, atol=1e-6)


def test_export_after_qat_matches_onnxruntime(data, tmp_path):
    q = amct_torch.prepare_qat(trained_float(data), QatConfig(weight_bits=4), data[0][0])
    train(q, data, steps=5)
    amct_torch.freeze_bn_stats(q)
    q.eval()
    res = amct_torch.export(q, tmp_path / "qat", data[0][0])
    ops = {n.op_type for n in res.fake_quant_model.graph.node}
    assert "BatchNormalization" not in ops and "QuantizeLinear" in ops
    x = data[5][0]
    with torch.no_grad():
        expected = q(x).numpy()
    sess = ort.InferenceSession(str(res.fake_quant))
    y = sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0]
    assert (y.argmax(1) == expected.argmax(1)).all()
    assert np.abs(y - expected).max() < 0.05
    assert q.training is False and isinstance(q.bn1, FoldedBatchNorm)  # export worked on a copy


@pytest.mark.parametrize("bits", [(8, 8), (8, 4), (4, 4), (16, 8)])
def test_every_amct_bit_width_trains(data, bits):
    a, w = bits
    q = amct_torch.prepare_qat(trained_float(data), QatConfig(activation_bits=a, weight_bits=w), data[0][0])
    train(q, data, steps=3)
    assert q.conv2.input_quantizer.bits == a and q.conv2.weight_pipeline[-1].bits == w
    stage = q.conv2.weight_pipeline[-1]
    qmin, qmax = (-8, 7) if w == 4 else (-128, 127)
    codes = torch.round(q.conv2.effective_weight().detach() / stage.broadcast(stage.scale, q.conv2.weight.shape))
    assert codes.min() >= qmin and codes.max() <= qmax
    assert isinstance(q.conv2.input_quantizer, UlqActivationQuantizer)

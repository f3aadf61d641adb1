"""DMQ balancing: the balanced float model is the same function; the factors are AMCT's formula; W8A8 with
an outlier channel gets better; factors reach the record, the fake-quant ONNX and the deploy ONNX; the
AMCT flow (quantize_preprocess -> quantize_model -> save_model) rewrites the factors instead of
appending them."""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
import torch.nn as nn

from amct_torch.compat.balance import quantize_preprocess
from amct_torch.compat.ptq import create_quant_config, quantize_model, save_model
from amct_torch.config import ConfigError, QuantConfig, Targeting, read_record
from amct_torch.config.record import Record, write_record
from amct_torch.export import export
from amct_torch.export.api import record_of
from amct_torch.quant import calibrate, quantize, weight_quantizer
from amct_torch.quant.balance import (BalanceScale, InputBalance, balance, balance_factors, balance_on_calibration,
                                      balanced_layers, dmq_factors)


def _sqnr(ref: torch.Tensor, got: torch.Tensor) -> float:
    return float(10 * torch.log10(ref.pow(2).sum() / (ref - got).pow(2).sum()))


def _arq_scales(w: torch.Tensor) -> torch.Tensor:
    """AMCT's symmetric per-row scale: max/127, or |min|/128 when the negative side is larger."""
    hi, lo = w.amax(1), w.amin(1)
    return torch.where(hi >= -lo, hi / 127, -lo / 128)


def _ort(model: onnx.ModelProto) -> ort.InferenceSession:
    so = ort.SessionOptions()
    so.log_severity_level = 3
    return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])


class MLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(16, 32)
        self.fc2 = nn.Linear(32, 8)

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(x)))


class ConvNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1, groups=2)
        self.dw = nn.Conv2d(8, 8, 3, padding=1, groups=8)
        self.up = nn.ConvTranspose2d(8, 4, 2, stride=2)
        self.fc = nn.Linear(4, 5)

    def forward(self, x):
        x = torch.relu(self.bn(self.conv1(x)))
        x = torch.relu(self.conv2(x))
        x = torch.relu(self.dw(x))
        x = self.up(x)
        return self.fc(x.mean(dim=(2, 3)))


def _outlier_batches(n: int, shape: tuple[int, ...], channel_axis: int = -1, seed: int = 0) -> list[torch.Tensor]:
    """Activations with two outlier channels (x40), as in transformers' hidden states."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        x = torch.randn(shape, generator=g)
        idx = [slice(None)] * len(shape)
        idx[channel_axis] = slice(0, 2)
        x[tuple(idx)] *= 40.0
        out.append(x)
    return out


# -- the formula -----------------------------------------------------------------------------------
def test_factors_by_hand_on_2x3_with_a_zero_channel():
    lin = nn.Linear(3, 2, bias=False)
    with torch.no_grad():
        lin.weight.copy_(torch.tensor([[1.0, -4.0, 0.5], [-2.0, 1.0, 0.25]]))  # max|W_j| = 2, 4, 0.5
    x = torch.tensor([[9.0, 0.0, -1.0], [-3.0, 0.0, 0.5]])                       # max|X_j| = 9, 0, 1
    model = balance(nn.Sequential(lin).eval(), x, [x], alpha=0.5)
    s = torch.tensor(balance_factors(model)["0"])
    # s_j = max|X_j|^a / max|W_j|^(1-a); the zero activation channel gets 1
    want = torch.tensor([9 ** 0.5 / 2 ** 0.5, 1.0, 1 ** 0.5 / 0.5 ** 0.5])
    torch.testing.assert_close(s, want)
    layer = model[0]
    torch.testing.assert_close(layer.effective_weight(), lin.weight * want)          # W * s per input column
    torch.testing.assert_close(layer.input_balance(x), x / want)                     # x / s
    torch.testing.assert_close(model(x), lin(x))
    # alpha moves the balance; a zero weight column also gets 1
    s3 = dmq_factors(torch.tensor([9.0, 1.0, 1.0]), torch.tensor([2.0, 0.0, 0.5]), 0.8)
    torch.testing.assert_close(s3, torch.tensor([9 ** 0.8 / 2 ** 0.2, 1.0, 1 / 0.5 ** 0.2]))
    assert torch.all(dmq_factors(torch.tensor([1e30]), torch.tensor([1e-6]), 0.8) <= 1 / torch.finfo(torch.float32).eps)


def test_alpha_out_of_range_names_the_key():
    with pytest.raises(ConfigError, match="dmq_balancer_param"):
        balance(MLP().eval(), torch.randn(2, 16), [torch.randn(2, 16)], alpha=0.9)


# -- identity ------------------------------------------------------------------------------------
def test_balanced_mlp_computes_the_same_function():
    torch.manual_seed(0)
    m = MLP().eval()
    data = _outlier_batches(3, (4, 16))
    b = balance(m, data[0], data, alpha=0.5)
    assert set(balanced_layers(b)) == {"fc1", "fc2"}
    assert isinstance(b.fc1.weight_pipeline[0], BalanceScale) and isinstance(b.fc1.input_balance, InputBalance)
    assert not torch.allclose(b.fc1.input_balance.factor, torch.ones(16))
    x = torch.randn(5, 16)
    torch.testing.assert_close(b(x), m(x), rtol=1e-5, atol=1e-5)
    # running max over all batches, not the last one
    want = torch.stack([d.abs().amax(0) for d in data]).amax(0)
    torch.testing.assert_close(b.fc1.input_balance.act_max, want)


def test_balanced_convs_grouped_depthwise_transposed_same_function():
    torch.manual_seed(0)
    m = ConvNet().eval()
    with torch.no_grad():
        m.bn.running_mean.uniform_(-0.5, 0.5)
        m.bn.running_var.uniform_(0.5, 1.5)
    data = _outlier_batches(2, (2, 3, 8, 8), channel_axis=1)
    b = balance(m, data[0], data, alpha=0.5)
    assert set(balanced_layers(b)) == {"conv1", "conv2", "dw", "up", "fc"}
    assert b.conv2.weight_pipeline[0].groups == 2
    for name in ("conv2", "dw", "up"):
        assert not torch.allclose(getattr(b, name).input_balance.factor, torch.ones(8))
    x = torch.randn(2, 3, 8, 8)
    torch.testing.assert_close(b(x), m(x), rtol=1e-5, atol=1e-5)


def test_grouped_conv_factor_layout():
    conv = nn.Conv2d(4, 6, 1, groups=2, bias=False)  # weight (6, 2, 1, 1): filters 0-2 read inputs 0-1
    stage = BalanceScale(4, axis=1, groups=2)
    stage.factor.copy_(torch.tensor([1.0, 2.0, 3.0, 4.0]))
    w = torch.ones_like(conv.weight)
    got = stage(w)[:, :, 0, 0]
    torch.testing.assert_close(got, torch.tensor([[1.0, 2.0]] * 3 + [[3.0, 4.0]] * 3))
    torch.testing.assert_close(stage.channel_absmax(torch.arange(12.0).reshape(6, 2, 1, 1)),
                               torch.tensor([4.0, 5.0, 10.0, 11.0]))


def test_balanced_gpt2_conv1d_same_function():
    transformers = pytest.importorskip("transformers")
    from transformers.pytorch_utils import Conv1D

    torch.manual_seed(0)
    cfg = transformers.GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=50, n_positions=16, use_cache=False)
    model = transformers.GPT2LMHeadModel(cfg).eval()
    ids = torch.randint(0, 50, (2, 16))
    data = [torch.randint(0, 50, (2, 16)) for _ in range(2)]
    # the LM head shares its weight with the embedding: balancing it would change the embedding too
    b = balance(model, ids, data, Targeting(QuantConfig(dmq_balancer_param=0.5), skip=["lm_head"]))
    layers = balanced_layers(b)
    assert {"transformer.h.0.attn.c_attn", "transformer.h.0.mlp.c_fc", "transformer.h.0.mlp.c_proj"} <= set(layers)
    assert all(isinstance(m.module, Conv1D) for n, m in layers.items() if ".h.0." in n)
    assert layers["transformer.h.0.mlp.c_fc"].weight_pipeline[0].axis == 0  # Conv1D weight (in, out)
    with torch.no_grad():
        torch.testing.assert_close(b(ids).logits, model(ids).logits, rtol=1e-4, atol=1e-4)


# -- PTQ composition -----------------------------------------------------------------------------
def _outlier_linear() -> tuple[nn.Module, list[torch.Tensor]]:
    """A Linear whose input has two channels 40x larger than the rest, with weights 40x smaller on them,
    so that every channel contributes alike to the output (the outliers only stretch the activation
    grid). When the outlier channels dominate the output instead, per-tensor activations already serve
    them and balancing moves their error into the weights: DMQ is for the first case."""
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(64, 32)).eval()
    with torch.no_grad():
        m[0].weight[:, :2] /= 40.0
    return m, _outlier_batches(4, (32, 64), seed=1)


def _w8a8(model: nn.Module, data: list[torch.Tensor]) -> nn.Module:
    q = quantize(model, QuantConfig(activation_calibrator="minmax", activation_offset=False), data[0])
    return calibrate(q, data, progress=False)


def test_w8a8_with_dmq_beats_without_on_an_outlier_channel():
    m, data = _outlier_linear()
    plain = _w8a8(m, data)
    balanced = _w8a8(balance(m, data[0], data, alpha=0.5), data)
    test = _outlier_batches(2, (32, 64), seed=7)
    with torch.no_grad():
        ref = torch.cat([m(x) for x in test])
        s_plain = _sqnr(ref, torch.cat([plain(x) for x in test]))
        s_dmq = _sqnr(ref, torch.cat([balanced(x) for x in test]))
    assert s_dmq > s_plain + 10.0, (s_plain, s_dmq)  # about 15 dB -> 37 dB
    # the quantizers saw the balanced tensors: ARQ scales from W*s, the activation range from x/s
    layer = balanced[0]
    s = layer.input_balance.factor
    torch.testing.assert_close(weight_quantizer(layer).scale, _arq_scales(m[0].weight * s))
    assert float(layer.input_quantizer.scale) < float(plain[0].input_quantizer.scale) / 4


def test_quantize_with_dmq_config_balances_on_the_first_calibration_batch():
    m, data = _outlier_linear()
    q = quantize(m, QuantConfig(activation_calibrator="minmax", activation_offset=False, dmq_balancer_param=0.5), data[0])
    assert isinstance(q[0].input_balance, InputBalance)  # quantize attached it (dmq_balancer_param)
    assert balance_on_calibration(q) == []               # and does not attach twice
    calibrate(q, data[:1], progress=False)
    want = dmq_factors(data[0].abs().amax(0), m[0].weight.abs().amax(0), 0.5)
    torch.testing.assert_close(q[0].input_balance.factor, want)
    torch.testing.assert_close(weight_quantizer(q[0]).scale, _arq_scales(m[0].weight * want))
    plain = _w8a8(m, data[:1])
    with torch.no_grad():
        ref, x = m(data[2]), data[2]
        assert _sqnr(ref, q(x)) > _sqnr(ref, plain(x)) + 3.0


def test_balanced_input_is_not_tied_to_an_earlier_quantizer():
    # conv -> relu -> maxpool -> conv: quantize_outputs="auto" ties the second conv's input quantizer to the
    # pool's (same grid); after balancing, that input is x / s, no longer on the pool's grid
    torch.manual_seed(0)
    m = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(8, 8, 3)).eval()
    x = torch.randn(2, 3, 16, 16)
    q = quantize(balance(m, x, [x], 0.5), QuantConfig(), x)
    assert q[3].input_quantizer.tied_to is None


# -- record, ONNX, deploy ------------------------------------------------------------------------
def test_record_round_trip_of_tensor_balance_factor(tmp_path):
    m, data = _outlier_linear()
    q = _w8a8(balance(m, data[0], data, alpha=0.5), data)
    rec = record_of(q)
    want = q[0].input_balance.factor
    assert len(rec.layers["0"].tensor_balance_factor) == 64
    write_record(rec, tmp_path / "r.txt")
    back = read_record(tmp_path / "r.txt")
    assert back.layers["0"].tensor_balance_factor == [float(v) for v in want]  # float32 exact
    assert back.layers["0"].problems("0") == []


def test_export_parity_and_the_mul_before_quant(tmp_path):
    m, data = _outlier_linear()
    m = nn.Sequential(m[0], nn.ReLU(), nn.Linear(32, 8)).eval()
    q = _w8a8(balance(m, data[0], data, alpha=0.5), data)
    r = export(q, tmp_path / "model", data[0])
    # fake-quant ONNX: x -> Mul(1/s) -> QuantizeLinear -> DequantizeLinear -> Gemm; same numbers as PyTorch
    g = r.fake_quant_model.graph
    nodes = {n.name: n for n in g.node}
    producer = {o: n for n in g.node for o in n.output}
    inits = {t.name: onnx.numpy_helper.to_array(t) for t in g.initializer}
    for layer in ("0", "2"):
        mul = producer[nodes[f"{layer}.input_quant"].input[0]]
        assert mul.op_type == "Mul" and mul.name == f"{layer}.mul"
        inv = next(inits[i] for i in mul.input if i in inits)
        np.testing.assert_array_equal(inv.reshape(-1), (1.0 / q[int(layer)].input_balance.factor).numpy())
    sess = _ort(r.fake_quant_model)
    for x in data[:2]:
        got = sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0]
        with torch.no_grad():
            want = q(x).numpy()
        step = float(q[2].input_quantizer.scale) * q[2].effective_weight().abs().sum(1).max().item()
        assert np.abs(got - want).max() <= max(step, 1e-5)
    # deploy ONNX: the Mul stays in float right before AscendQuant (AMCT's ApplyDMQBalancerPass)
    d = r.deploy_model.graph
    dprod = {o: n for n in d.node for o in n.output}
    quants = [n for n in d.node if n.op_type == "AscendQuant"]
    assert len(quants) == 2
    for n in quants:
        assert dprod[n.input[0]].op_type == "Mul"
    # the record carries s
    rec = read_record(r.record)
    assert rec.layers["0"].tensor_balance_factor == [float(v) for v in q[0].input_balance.factor]


# -- AMCT flow ------------------------------------------------------------------------------------
def _dmq_config(tmp_path, model, x) -> str:
    cfg = tmp_path / "dmq.cfg"
    cfg.write_text("batch_num: 1\ncommon_config: { arq_quantize: { channel_wise: false }"
                   " ifmr_quantize: { asymmetric: false } dmq_balancer: { migration_strength: 0.5 } }\n")
    path = str(tmp_path / "config.json")
    create_quant_config(path, model, x, config_defination=str(cfg))
    assert json.loads(open(path).read())["0"]["dmq_balancer_param"] == 0.5
    return path


def test_quantize_preprocess_two_passes_give_one_list_from_the_running_max(tmp_path):
    m, data = _outlier_linear()
    config = _dmq_config(tmp_path, m, data[0])
    record_file = tmp_path / "record.txt"
    pre = quantize_preprocess(config, str(record_file), m, data[0])
    with torch.no_grad():
        out = pre(data[0])
        pre(data[1])
    torch.testing.assert_close(out, m(data[0]), rtol=1e-5, atol=1e-5)  # the statistics model is the float model
    text = record_file.read_text()
    rec = read_record(record_file)
    assert list(rec.layers) == ["0"]
    got = rec.layers["0"].tensor_balance_factor
    assert len(got) == 64 and text.count("tensor_balance_factor") == 64  # one list, not two appended
    act_max = torch.maximum(data[0].abs().amax(0), data[1].abs().amax(0))
    want = dmq_factors(act_max, m[0].weight.abs().amax(0), 0.5)
    assert got == [float(v) for v in want]


def test_quantize_model_reads_the_factors_and_save_model_keeps_the_mul(tmp_path):
    m, data = _outlier_linear()
    config = _dmq_config(tmp_path, m, data[0])
    record_file = str(tmp_path / "record.txt")
    pre = quantize_preprocess(config, record_file, m, data[0])
    with torch.no_grad():
        pre(data[0])
    factors = read_record(record_file).layers["0"].tensor_balance_factor
    cal = quantize_model(config, str(tmp_path / "modified.onnx"), record_file, m, data[0])
    assert [float(v) for v in cal[0].input_balance.factor] == factors
    with torch.no_grad():
        cal(data[1])
    rec = read_record(record_file)
    assert rec.layers["0"].tensor_balance_factor == factors and rec.layers["0"].scale_d is not None
    save_model(str(tmp_path / "modified.onnx"), record_file, str(tmp_path / "out" / "model"))
    fake = onnx.load(str(tmp_path / "out" / "model_fake_quant_model.onnx"))
    deploy = onnx.load(str(tmp_path / "out" / "model_deploy_model.onnx"))
    prod = {o: n for n in deploy.graph.node for o in n.output}
    quant = next(n for n in deploy.graph.node if n.op_type == "AscendQuant")
    assert prod[quant.input[0]].op_type == "Mul"
    sess = _ort(fake)
    got = sess.run(None, {sess.get_inputs()[0].name: data[2].numpy()})[0]
    with torch.no_grad():
        want = cal(data[2]).numpy()
    step = float(cal[0].input_quantizer.scale) * cal[0].effective_weight().abs().sum(1).max().item()
    assert np.abs(got - want).max() <= step


def test_quantize_preprocess_without_dmq_layers_refuses(tmp_path):
    m, data = _outlier_linear()
    path = str(tmp_path / "c.json")
    create_quant_config(path, m, data[0])
    with pytest.raises(ConfigError, match="dmq_balancer_param"):
        quantize_preprocess(path, str(tmp_path / "r.txt"), m, data[0])


def test_record_factor_count_mismatch_names_the_layer(tmp_path):
    m, data = _outlier_linear()
    config = _dmq_config(tmp_path, m, data[0])
    rec = Record()
    rec.set_layer("0", tensor_balance_factor=[1.0, 2.0])
    write_record(rec, tmp_path / "r.txt")
    with pytest.raises(ConfigError, match="'0'.*tensor_balance_factor"):
        quantize_model(config, str(tmp_path / "m.onnx"), str(tmp_path / "r.txt"), m, data[0])


def test_conv_family_export_parity_and_a_mul_before_every_ascend_quant(tmp_path):
    torch.manual_seed(0)
    m = ConvNet().eval()
    data = _outlier_batches(2, (2, 3, 8, 8), channel_axis=1)
    q = quantize(balance(m, data[0], data, 0.5), QuantConfig(), data[0])
    calibrate(q, data, progress=False)
    r = export(q, tmp_path / "model", data[0])
    sess = _ort(r.fake_quant_model)
    got = sess.run(None, {sess.get_inputs()[0].name: data[1].numpy()})[0]
    with torch.no_grad():
        want = q(data[1]).numpy()
    assert np.abs(got - want).max() <= 1e-4 * max(1.0, float(np.abs(want).max()))
    g = r.deploy_model.graph
    producer = {o: n for n in g.node for o in n.output}
    quants = {n.name: n for n in g.node if n.op_type == "AscendQuant"}
    assert set(quants) == {f"{k}.quant" for k in ("conv1", "conv2", "dw", "up", "fc")}
    for name, n in quants.items():
        assert producer[n.input[0]].name == name.replace(".quant", ".mul")
    rec = read_record(r.record)
    assert len(rec.layers["conv2"].tensor_balance_factor) == 8 and len(rec.layers["conv1"].tensor_balance_factor) == 3

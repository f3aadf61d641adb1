"""The PTQ pass: quantize() (fold + wrap + quantizers), calibrate(), state_dict round trips, AdaRound."""

from __future__ import annotations

import copy
import re

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from amct_torch.config import ConfigError, PerChannel, PerTensor, QuantConfig, Targeting
from amct_torch.nn import CompressedLayer
from amct_torch.quant import (ActivationQuantizer, AdaRoundWeightQuantizer, ArqWeightQuantizer, CalibrationError,
                              calibrate, check_calibrated, quant_layers, quantize, weight_quantizer)
from amct_torch.quant.formulas import channel_major, fake_quantize, scale_offset

MINMAX = QuantConfig(activation_calibrator="minmax")


pytestmark = pytest.mark.usefixtures("one_thread")


class ConvBNReLUNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 3, padding=1)
        self.bn = nn.BatchNorm2d(6)
        self.conv2 = nn.Conv2d(6, 4, 3, padding=1, bias=False)
        self.fc = nn.Linear(4, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn(self.conv(x)))
        x = F.relu(self.conv2(x))
        return self.fc(x.mean(dim=(2, 3)))


class KeywordNet(nn.Module):
    """forward(input_ids=None): an Embedding (no wrapper) feeding a Linear."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(10, 8)
        self.norm = nn.LayerNorm(8)
        self.fc = nn.Linear(8, 4)

    def forward(self, input_ids=None):
        return self.fc(self.norm(self.emb(input_ids)))


@pytest.fixture
def net(randomize_bn) -> nn.Module:
    torch.manual_seed(0)
    return randomize_bn(ConvBNReLUNet()).eval()


@pytest.fixture
def batches() -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(5)
    return [torch.randn(2, 3, 8, 8, generator=g) * (1 + i) for i in range(4)]


def arq_reference(w: torch.Tensor, bits: int) -> torch.Tensor:
    """ARQ by hand on a (C_out, -1) weight: per row, symmetric scale from min/max, round, clip, rescale."""
    qmax = 2 ** (bits - 1) - 1
    hi, lo = w.max(dim=1, keepdim=True).values, w.min(dim=1, keepdim=True).values
    s = torch.where(hi.abs() >= lo.abs(), hi.abs().double() / qmax, lo.abs().double() / (qmax + 1)).float()
    return torch.clamp(torch.round(w / s), -qmax - 1, qmax) * s


# -- quantize() ------------------------------------------------------------------------------------
def test_quantize_folds_bn_wraps_layers_and_keeps_original(net, batches):
    x = batches[0]
    before = copy.deepcopy(net.state_dict())
    with torch.no_grad():
        ref = net(x)
    q = quantize(net, MINMAX, x)
    plan = q.amct_plan
    assert plan["bn"].action == "fold" and "conv" in plan["bn"].detail
    assert {lp.name for lp in plan.layers if lp.action == "wrap"} == {"conv", "conv2", "fc"}
    assert plan["conv"].detail.startswith("W8 per_channel / A8 minmax asym")
    assert isinstance(q.bn, nn.Identity)
    assert set(quant_layers(q)) == {"conv", "conv2", "fc"}
    for name in ("conv", "conv2", "fc"):
        layer = getattr(q, name)
        assert isinstance(layer, CompressedLayer)
        assert isinstance(layer.input_quantizer, ActivationQuantizer) and not layer.input_quantizer.is_calibrated
        assert isinstance(weight_quantizer(layer), ArqWeightQuantizer)
    # the folded float conv reproduces conv + bn
    with torch.no_grad():
        torch.testing.assert_close(q.conv.module(x), net.bn(net.conv(x)), atol=1e-5, rtol=1e-5)
    # the original model is untouched
    assert isinstance(net.bn, nn.BatchNorm2d) and type(net.conv) is nn.Conv2d and type(net.fc) is nn.Linear
    after = net.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    with torch.no_grad():
        assert torch.equal(net(x), ref)
    assert not hasattr(net, "amct_plan")


@pytest.mark.parametrize("bits", [8, 4])
def test_weights_quantized_per_channel_with_arq_math(net, batches, bits):
    q = quantize(net, QuantConfig(weight_bits=bits, activation_calibrator="minmax"), batches[0])
    if bits == 4:  # W4A8
        assert q.amct_plan["fc"].detail.startswith("W4 per_channel / A8")
    for name in ("conv", "conv2", "fc"):
        layer = getattr(q, name)
        w = layer.module.weight.detach()
        wq = layer.effective_weight().detach()
        rows = channel_major(wq, 0)
        assert rows.shape[0] == w.shape[0]
        for row in rows:
            assert row.unique().numel() <= 2 ** bits
        # equals ARQ done by hand
        torch.testing.assert_close(rows, arq_reference(channel_major(w, 0), bits), rtol=0, atol=0)
        stage = weight_quantizer(layer)
        assert stage.scale.shape == (w.shape[0],) and stage.bits == bits
        assert torch.all(stage.offset == 0)
        ints = stage.integer_weight(w)
        assert ints.dtype == torch.int8
        assert ints.min() >= -(2 ** (bits - 1)) and ints.max() <= 2 ** (bits - 1) - 1
        assert torch.equal(ints.float() * stage.scale.reshape(-1, *[1] * (w.dim() - 1)), wq)
        # the largest-magnitude weight of each channel lands on the edge of the integer range
        edge = ints.reshape(w.shape[0], -1).int().abs().max(dim=1).values
        assert torch.all((edge == 2 ** (bits - 1) - 1) | (edge == 2 ** (bits - 1)))


def test_w4a8_end_to_end(net, batches):
    q = quantize(net, QuantConfig(weight_bits=4, activation_bits=8, activation_calibrator="minmax"), batches[0])
    calibrate(q, batches[:2], progress=False)
    check_calibrated(q)
    seen = {}
    hooks = [getattr(q, n).input_quantizer.register_forward_hook(lambda m, i, o, n=n: seen.__setitem__(n, o))
             for n in ("conv", "conv2", "fc")]
    with torch.no_grad():
        y, ref = q(batches[2]), net(batches[2])
    for h in hooks:
        h.remove()
    for name, out in seen.items():
        aq = getattr(q, name).input_quantizer
        assert aq.bits == 8 and weight_quantizer(getattr(q, name)).bits == 4
        levels = torch.round(out / aq.scale + aq.offset.float())
        torch.testing.assert_close(out, (levels - aq.offset.float()) * aq.scale, rtol=0, atol=1e-6)
        assert levels.min() >= -128 and levels.max() <= 127
    # 4-bit weights: a visible but bounded error against the float model
    err = (y - ref).abs().max() / ref.abs().max()
    assert 1e-3 < err < 0.5


def test_arq_grouped_conv_transpose_scale_per_output_channel():
    torch.manual_seed(0)
    layer = nn.ConvTranspose2d(4, 6, 2, groups=2)
    w = layer.weight.detach().clone()
    w[2:4, 1] *= 10  # output channel 3 + 1 = 4 (group 1, j = 1) gets large weights
    stage = ArqWeightQuantizer(w, 8, PerChannel(), axis=1, groups=2)
    assert stage.scale.shape == (6,)
    for o in range(6):
        g_, j = divmod(o, 3)
        block = w[g_ * 2:(g_ + 1) * 2, j]
        s, _ = scale_offset(block.min(), block.max(), 8, True)
        assert stage.scale[o].item() == s.item()
    assert stage.scale.argmax().item() == 4
    out = stage(w)
    for o in range(6):
        g_, j = divmod(o, 3)
        block = w[g_ * 2:(g_ + 1) * 2, j]
        torch.testing.assert_close(out[g_ * 2:(g_ + 1) * 2, j], fake_quantize(block, stage.scale[o], stage.offset[o], 8),
                                   rtol=0, atol=0)


def test_grouped_conv_transpose_per_channel_refused_per_tensor_ok():
    class Up(nn.Module):
        def __init__(self):
            super().__init__()
            self.up = nn.ConvTranspose2d(4, 6, 2, groups=2)

        def forward(self, x):
            return self.up(x)

    x = torch.randn(1, 4, 3, 3)
    with pytest.raises(ConfigError, match="'up'"):
        quantize(Up().eval(), MINMAX, x)
    q = quantize(Up().eval(), MINMAX.replace(weight_granularity=PerTensor()), x)
    assert weight_quantizer(q.up).scale.numel() == 1


# -- activation quantizers -------------------------------------------------------------------------
def test_activation_quantizer_passes_through_until_batch_num_then_fake_quantizes(net, batches):
    q = quantize(net, MINMAX.replace(batch_num=3), batches[0])
    aq = q.fc.input_quantizer
    seen: list[tuple[torch.Tensor, torch.Tensor, bool]] = []
    aq.register_forward_hook(lambda m, inp, out: seen.append((inp[0].detach(), out.detach(), m.is_calibrated)))
    with torch.no_grad():
        for x in batches:
            q(x)
    assert len(seen) == 4
    for inp, out, calibrated in seen[:3]:
        assert torch.equal(inp, out)  # calibration batches pass through unchanged
    assert [c for *_, c in seen] == [False, False, True, True]
    assert aq.is_calibrated and int(aq.batches_seen) == 3
    # factors: asymmetric min/max over the 3 calibration batches
    lo = min(inp.min().item() for inp, *_ in seen[:3])
    hi = max(inp.max().item() for inp, *_ in seen[:3])
    scale, offset = scale_offset(torch.tensor(lo), torch.tensor(hi), 8, False)
    assert aq.scale.item() == scale.item() and aq.offset.item() == offset.item()
    inp, out, _ = seen[3]
    assert torch.equal(out, fake_quantize(inp, aq.scale, aq.offset, 8))
    assert not torch.equal(out, inp)


# -- calibrate() -----------------------------------------------------------------------------------
def test_calibrate_with_xy_tuples(net, batches):
    q = quantize(net, MINMAX.replace(batch_num=2), batches[0])
    loader = [(x, torch.zeros(2, dtype=torch.long)) for x in batches]
    out = calibrate(q, loader, progress=False)
    assert out is q
    check_calibrated(q)
    # the first layer saw exactly the first two x's (labels ignored, later batches not run)
    lo = min(batches[0].min().item(), batches[1].min().item())
    hi = max(batches[0].max().item(), batches[1].max().item())
    calib = q.conv.input_quantizer.calibrator
    assert (calib.lo.item(), calib.hi.item()) == (lo, hi)
    assert int(q.conv.input_quantizer.batches_seen) == 2


def test_calibrate_with_dict_batches_and_unsupported_layers_in_plan():
    torch.manual_seed(0)
    model = KeywordNet().eval()
    g = torch.Generator().manual_seed(0)
    ids = [torch.randint(0, 10, (2, 5), generator=g) for _ in range(3)]
    q = quantize(model, MINMAX.replace(batch_num=2), {"input_ids": ids[0]})
    plan = q.amct_plan
    assert plan["fc"].action == "wrap"
    for name, kind in (("emb", "Embedding"), ("norm", "LayerNorm")):
        assert plan[name].action == "unsupported"
        assert kind in plan[name].detail  # the reason names the layer type ("no wrapper for ...")
        assert name in plan.skipped()
    assert type(q.emb) is nn.Embedding and type(q.norm) is nn.LayerNorm
    calibrate(q, [{"input_ids": i} for i in ids], progress=False)
    aq = q.fc.input_quantizer
    assert aq.is_calibrated and int(aq.batches_seen) == 2
    with torch.no_grad():
        feats = [model.norm(model.emb(i)) for i in ids[:2]]
    assert aq.calibrator.lo.item() == min(f.min().item() for f in feats)
    assert aq.calibrator.hi.item() == max(f.max().item() for f in feats)
    with torch.no_grad():
        y = q(input_ids=ids[2])
    assert y.shape == (2, 5, 4)


def test_calibrate_raises_naming_uncalibrated_layers(net, batches):
    q = quantize(net, MINMAX.replace(batch_num=3), batches[0])
    with pytest.raises(CalibrationError) as err:
        calibrate(q, batches[:2], progress=False)
    msg = str(err.value)
    for name in ("conv", "conv2", "fc"):
        assert re.search(rf"(^|[ :,]){name}[. ][^,]*\b2/3\b", msg), msg
    with pytest.raises(CalibrationError, match="conv2"):
        check_calibrated(q)
    # one more batch finishes it
    calibrate(q, batches[2:], progress=False)
    check_calibrated(q)


def test_calibrate_unprepared_model_raises(net, batches):
    with pytest.raises(CalibrationError):
        calibrate(net, batches, progress=False)


# -- state_dict ------------------------------------------------------------------------------------
@pytest.mark.parametrize("calibrator", ["ifmr", "hfmg"])
def test_state_dict_restores_calibrated_model_exactly(net, batches, calibrator):
    cfg = QuantConfig(activation_calibrator=calibrator, num_of_bins=1024)
    q = quantize(net, cfg, batches[0])
    calibrate(q, batches[:1], progress=False)
    sd = q.state_dict()
    fresh = quantize(net, cfg, batches[0])
    assert not fresh.conv.input_quantizer.is_calibrated
    fresh.load_state_dict(sd)
    check_calibrated(fresh)
    with torch.no_grad():
        for x in batches[1:]:
            assert torch.equal(fresh(x), q(x))
    for name in ("conv", "conv2", "fc"):
        a, b = getattr(q, name).input_quantizer, getattr(fresh, name).input_quantizer
        assert torch.equal(a.scale, b.scale) and torch.equal(a.offset, b.offset)


# -- config errors ---------------------------------------------------------------------------------
def test_six_bit_weights_only_for_conv2d(net, batches):
    with pytest.raises(ConfigError, match=r"layer 'fc' \(Linear\) weight_bits"):
        quantize(net, QuantConfig(weight_bits=6), batches[0])
    t = Targeting(QuantConfig(weight_bits=6, activation_calibrator="minmax"),
                  module_type={"Linear": QuantConfig(activation_calibrator="minmax")})
    q = quantize(net, t, batches[0])
    assert weight_quantizer(q.conv).bits == 6 and weight_quantizer(q.fc).bits == 8
    for row in channel_major(q.conv.effective_weight().detach(), 0):
        assert row.unique().numel() <= 64


# -- targeting -------------------------------------------------------------------------------------
def test_targeting_none_leaves_layer_float(net, batches):
    q = quantize(net, Targeting(MINMAX, module_name={"fc": None}), batches[0])
    assert type(q.fc) is nn.Linear
    assert q.amct_plan["fc"].action == "skip" and q.amct_plan["fc"].source == "module_name['fc']"
    assert "fc" in q.amct_plan.skipped()
    assert set(quant_layers(q)) == {"conv", "conv2"}
    assert torch.equal(q.fc.weight, net.fc.weight)
    calibrate(q, batches[:1], progress=False)
    with torch.no_grad():
        feats = F.relu(q.conv2(F.relu(q.conv(batches[1])))).mean(dim=(2, 3))
        assert torch.equal(q(batches[1]), net.fc(feats))


# -- AdaRound --------------------------------------------------------------------------------------
def _adaround_model(net, batches, bits):
    cfg = QuantConfig(weight_algorithm="adaround", ada_num_iteration=50, activation_calibrator="minmax",
                      weight_bits=bits)
    q = quantize(net, cfg, batches[0])
    with pytest.raises(CalibrationError, match=r"conv \(AdaRound not optimised\)"):
        check_calibrated(q)
    calibrate(q, batches[:2], progress=False)
    check_calibrated(q)
    return q


def test_adaround_learns_binary_rounding_no_worse_than_nearest(net, batches):
    q = _adaround_model(net, batches, 8)
    improved = 0
    for name in ("conv", "conv2", "fc"):
        layer = getattr(q, name)
        stage = weight_quantizer(layer)
        assert isinstance(stage, AdaRoundWeightQuantizer)
        assert bool(stage.optimized)
        assert stage.round_up.dtype == torch.uint8
        assert set(stage.round_up.unique().tolist()) <= {0, 1}
        assert stage.stats["error_adaround"] <= stage.stats["error_nearest"]
        improved += stage.stats["error_adaround"] < stage.stats["error_nearest"]
        # the learned integers are floor or floor + 1 of w / s, within the 8-bit range
        w = layer.module.weight.detach()
        s = stage.scale.reshape(-1, *[1] * (w.dim() - 1))
        ints = stage.integer_weight(w).float()
        fl = torch.floor(w / s)
        assert torch.all((ints == torch.clamp(fl, -128, 127)) | (ints == torch.clamp(fl + 1, -128, 127)))
        assert torch.equal(layer.effective_weight().detach(), ints * s)
        # some weights were rounded differently from round-to-nearest
        if name != "fc":
            assert not torch.equal(ints, torch.clamp(torch.round(w / s), -128, 127))
    assert improved >= 2


def test_adaround_w4_never_worse_than_nearest(net, batches):
    # Regression test (was a bug): amct_torch/quant/adaround.py, optimize_rounding() always installs the learned rounding, even when its
    # reconstruction error is *larger* than round-to-nearest (both are computed: stats error_nearest/error_adaround).
    # Here, 4-bit weights and 50 iterations: conv2 gets 0.0703 vs 0.0625 for nearest (the soft h has not
    # converged to 0/1 yet, so h >= 0.5 is worse than the start point). Fix: if after > before, restore the
    # nearest rounding (stage._nearest(weight)) and report error_adaround = error_nearest (or keep the best
    # hard rounding seen).
    q = _adaround_model(net, batches, 4)
    for name in ("conv", "conv2", "fc"):
        stats = weight_quantizer(getattr(q, name)).stats
        assert stats["error_adaround"] <= stats["error_nearest"], (name, stats)


def test_avgpool_quantizes_its_input_and_its_plan_line_names_no_weight():
    import amct_torch

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.AvgPool2d(2), nn.Conv2d(4, 2, 1)).eval()
    x = torch.randn(4, 1, 8, 8)
    q = amct_torch.quantize(model, QuantConfig(activation_calibrator="minmax"), x)
    line = q.amct_plan["2"]
    assert line.layer_type == "AvgPool2d" and line.detail.startswith("A8 minmax asym") and "W8" not in line.detail
    amct_torch.calibrate(q, [x], progress=False)
    assert q[2].input_quantizer.is_calibrated and q[2].output_quantizer.is_calibrated

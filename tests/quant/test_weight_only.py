"""Weight-only quantization: per-group min/max by hand, GPTQ's error feedback, validation, GPT-2, ONNX parity."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch
import torch.nn as nn

from amct_torch.config import ConfigError, Targeting
from amct_torch.config.weight_only import WeightOnlyConfig
from amct_torch.nn import CompressedConv1D, CompressedLinear
from amct_torch.quant.quantizers import CalibrationError
from amct_torch.quant.weight_only import (GroupWeightQuantizer, gptq_quantize, group_scale_offset, quantize_weight_only,
                                          weight_only_quantizers)

transformers = pytest.importorskip("transformers")
from transformers.pytorch_utils import Conv1D  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


# -- min/max by hand ----------------------------------------------------------------------------
def _row(values: dict[int, float], n: int = 64) -> torch.Tensor:
    w = torch.zeros(1, n)
    for i, v in values.items():
        w[0, i] = v
    return w


def test_symmetric_int4_group32_by_hand():
    # group 0: max 1.75 -> s = 1.75 / 7 = 0.25; group 1: the negative side is larger -> s = 2.0 / 8 = 0.25
    w = _row({0: 1.75, 1: 0.625, 2: -0.375, 3: 0.8, 32: -2.0, 33: 0.5, 34: -1.1})
    stage = GroupWeightQuantizer(w, 4, 32, True, axis=0)
    assert stage.scale.tolist() == [[0.25, 0.25]] and stage.offset.tolist() == [[0, 0]]
    out = stage(w)
    # 0.625 / 0.25 = 2.5 -> 2 (half to even); -1.5 -> -2; 3.2 -> 3; -4.4 -> -4
    expect = _row({0: 1.75, 1: 0.5, 2: -0.5, 3: 0.75, 32: -2.0, 33: 0.5, 34: -1.0})
    assert torch.equal(out, expect)
    assert stage.integer_weight(w)[0, :4].tolist() == [7, 2, -2, 3]
    assert stage.integer_weight(w)[0, 32:35].tolist() == [-8, 2, -4]


def test_symmetric_int8_group32_by_hand():
    s = 2.0 ** -6
    w = _row({0: 127 * s, 1: 1.5 * s, 2: -2.5 * s, 40: -128 * s, 41: 3.7 * s})
    stage = GroupWeightQuantizer(w, 8, 32, True, axis=0)
    assert stage.scale.tolist() == [[s, s]]
    assert torch.equal(stage(w), _row({0: 127 * s, 1: 2 * s, 2: -2 * s, 40: -128 * s, 41: 4 * s}))


def test_asymmetric_int4_group32_by_hand():
    # group 0: [-0.5, 3.25] -> s = 3.75 / 15 = 0.25, offset = round(-8 + 0.5 / 0.25) = -6
    # group 1: all positive [1.0, 3.75]: the range is widened to contain 0 -> s = 0.25, offset = -8
    w = _row({0: -0.5, 1: 3.25, 2: 1.1, 3: 0.3})
    w[0, 32:] = 1.0
    w[0, 33], w[0, 34] = 3.75, 2.2
    stage = GroupWeightQuantizer(w, 4, 32, False, axis=0)
    assert stage.scale.tolist() == [[0.25, 0.25]] and stage.offset.tolist() == [[-6, -8]]
    out = stage(w)
    # 1.1 / 0.25 - 6 = -1.6 -> -2 -> (-2 + 6) * 0.25 = 1.0; 0.3 -> -4.8 -> -5 -> 0.25; zeros stay exactly 0
    assert out[0, :5].tolist() == [-0.5, 3.25, 1.0, 0.25, 0.0]
    assert out[0, 32:35].tolist() == [1.0, 3.75, 2.25]
    q = stage.integer_weight(w)
    assert q[0, :4].tolist() == [-8, 7, -2, -5] and q[0, 32:35].tolist() == [-4, 7, 1]


def test_asymmetric_int8_group32_by_hand():
    s = 2.0 ** -6
    w = _row({0: -1.0, 1: 255 * s - 1.0, 2: 0.5, 3: 0.25 * s})
    stage = GroupWeightQuantizer(w, 8, 32, False, axis=0)
    assert stage.scale[0, 0].item() == s and stage.offset[0, 0].item() == -64   # round(-128 + 1.0 / s)
    assert stage(w)[0, :4].tolist() == [-1.0, 255 * s - 1.0, 0.5, 0.0]


def test_conv1d_layout_groups_run_along_axis_0():
    torch.manual_seed(0)
    w = torch.randn(48, 128)                       # Linear layout (out, in)
    lin = GroupWeightQuantizer(w, 4, 32, False, axis=0)
    conv = GroupWeightQuantizer(w.T.contiguous(), 4, 32, False, axis=1)   # Conv1D layout (in, out)
    assert lin.scale.shape == conv.scale.shape == (48, 4)
    assert torch.equal(lin.scale, conv.scale) and torch.equal(lin.offset, conv.offset)
    assert torch.equal(conv(w.T.contiguous()), lin(w).T)


def test_per_channel_group_minus_one_is_one_scale_per_output_row():
    w = torch.randn(8, 96)
    stage = GroupWeightQuantizer(w, 8, -1, True, axis=0)
    assert stage.scale.shape == (8, 1)
    hi, lo = w.amax(1).double(), w.amin(1).double()
    expect = torch.where(hi.abs() >= lo.abs(), hi.abs() / 127, lo.abs() / 128).float()  # AMCT's symmetric scale
    assert torch.equal(stage.scale[:, 0], expect)


def test_minmax_stage_passes_the_gradient_straight_through():
    torch.manual_seed(2)
    w = torch.randn(4, 64).clamp(-1.8, 1.8)
    w[0, 0], w[0, 1] = -2.0, 1.9           # s = 2.0 / 8 = 0.25 and 1.9 / 0.25 = 7.6: clipped to 7
    w.requires_grad_(True)
    stage = GroupWeightQuantizer(w, 4, 32, True, axis=0)
    stage(w).sum().backward()
    # a group whose negative side is larger has s = |min| / 8: its positive maximum can round past 7 and clip
    clipped = w.detach() / stage.scale.repeat_interleave(32, 1) > 7.5
    assert clipped.any()
    assert torch.equal(w.grad, (~clipped).float())


# -- GPTQ ---------------------------------------------------------------------------------------
def _correlated_inputs(n: int, dim: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(dim, dim, generator=g) / dim ** 0.5 + 2.0 * torch.eye(dim)
    mix[:, : dim // 2] += torch.randn(dim, 1, generator=g)      # a shared factor: strongly correlated columns
    return torch.randn(n, dim, generator=g) @ mix * torch.linspace(0.2, 3.0, dim)


def _output_error(x: torch.Tensor, w: torch.Tensor, wq: torch.Tensor) -> float:
    return float((x @ w.T - x @ wq.T).norm())


@pytest.mark.parametrize("act_order", [False, True])
def test_gptq_output_error_below_minmax_on_correlated_inputs(act_order):
    torch.manual_seed(0)
    layer = nn.Linear(128, 64)
    calib, held_out = _correlated_inputs(2048, 128, 1), _correlated_inputs(1024, 128, 2)
    model = nn.Sequential(layer)
    batches = list(calib.split(256))
    cfg = WeightOnlyConfig(bits=4, group_size=32, block_size=64, act_order=act_order, batch_num=len(batches))
    rtn = quantize_weight_only(model, cfg)
    gptq = quantize_weight_only(model, cfg.replace(algorithm="gptq"), calibration_data=batches)
    w = layer.weight.detach()
    err_rtn = _output_error(held_out, w, rtn[0].effective_weight().detach())
    err_gptq = _output_error(held_out, w, gptq[0].effective_weight().detach())
    assert err_gptq < 0.8 * err_rtn
    stage = weight_only_quantizers(gptq)["0"]
    assert stage.is_ready and stage.qweight.abs().max() <= 8
    assert torch.equal(layer.weight, model[0].weight)                      # the float model is untouched
    if act_order:  # static groups: the scales are the min/max scales of the original weight
        assert torch.equal(stage.scale, group_scale_offset(w, 4, 32, True)[0])


def test_sequential_gptq_sees_the_outputs_of_the_quantized_layers_before():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 32)).eval()
    batches = list(_correlated_inputs(512, 64, 3).split(128))
    cfg = WeightOnlyConfig(bits=4, group_size=32, algorithm="gptq", batch_num=4)
    simple = quantize_weight_only(model, cfg, calibration_data=batches)
    seq = quantize_weight_only(model, cfg.replace(sequential=True), calibration_data=batches)
    first = weight_only_quantizers(seq)["0"]
    assert torch.equal(first.qweight, weight_only_quantizers(simple)["0"].qweight)   # the first layer: same inputs
    with torch.no_grad():
        x = torch.relu(torch.cat([seq[0](b) for b in batches]))       # through the quantized first layer
    q, scale, _, _ = gptq_quantize(model[2].weight, 2 * x.T.double() @ x.double() / len(x), 4, 32, True)
    second = weight_only_quantizers(seq)["2"]
    assert torch.equal(second.qweight, q) and torch.equal(second.scale, scale)
    assert not torch.equal(second.qweight, weight_only_quantizers(simple)["2"].qweight)
    with pytest.raises(ValueError, match="re-iterable"):
        quantize_weight_only(model, cfg.replace(sequential=True), calibration_data=iter(batches))


def test_gptq_with_a_diagonal_hessian_is_round_to_nearest():
    # no correlation between columns: no error feedback across columns, GPTQ = min/max rounding
    torch.manual_seed(0)
    w = torch.randn(16, 64)
    h = torch.diag(torch.rand(64) + 0.5)
    q, scale, offset, _ = gptq_quantize(w, h, 4, 32, False, act_order=True)
    ref = GroupWeightQuantizer(w, 4, 32, False, axis=0)
    assert torch.equal(scale, ref.scale) and torch.equal(offset, ref.offset)
    assert torch.equal(q, ref.integer_weight(w))


def test_gptq_dead_columns_quantize_to_zero():
    torch.manual_seed(0)
    x = torch.randn(512, 64)
    x[:, 5] = 0.0
    w = torch.randn(8, 64)
    q, scale, offset, loss = gptq_quantize(w, 2 * x.T @ x / 512, 8, 32, False)
    deq = (q.float() - offset.repeat_interleave(32, 1)) * scale.repeat_interleave(32, 1)
    assert torch.isfinite(deq).all() and np.isfinite(loss)
    assert torch.all(deq[:, 5] == 0)


# -- validation and plan ------------------------------------------------------------------------
@pytest.mark.parametrize("kwargs, key", [({"group_size": 48}, "group_size"), ({"group_size": 0}, "group_size"),
                                         ({"group_size": -2}, "group_size"), ({"bits": 3}, "bits"),
                                         ({"algorithm": "awq"}, "algorithm"), ({"damp": 0.0}, "damp"),
                                         ({"block_size": 0}, "block_size")])
def test_config_rejects_bad_values_by_key(kwargs, key):
    with pytest.raises(ConfigError, match=f"WeightOnlyConfig.{key}: got"):
        WeightOnlyConfig(**kwargs)


def test_config_round_trips():
    cfg = WeightOnlyConfig(bits=8, group_size=-1, symmetric=False, algorithm="gptq", act_order=True)
    assert WeightOnlyConfig.from_yaml(cfg.to_yaml()) == cfg


class TwoLinears(nn.Module):
    def __init__(self, hidden: int = 96) -> None:
        super().__init__()
        self.conv = nn.Conv1d(4, 4, 1)
        self.fc = nn.Linear(64, hidden)
        self.out = nn.Linear(hidden, 8)

    def forward(self, x):
        return self.out(torch.relu(self.fc(self.conv(x).flatten(1))))


def test_group_size_not_dividing_the_input_names_layer_size_and_fix():
    model = TwoLinears(96)
    with pytest.raises(ConfigError) as err:
        quantize_weight_only(model, WeightOnlyConfig(group_size=64))
    msg = str(err.value)
    assert "'out'" in msg and "96 input features" in msg and "32, 96" in msg and "-1" in msg
    assert type(model.out) is nn.Linear                        # nothing changed
    fixed = quantize_weight_only(model, Targeting(WeightOnlyConfig(group_size=64),
                                                  module_name={"out": WeightOnlyConfig(group_size=32)}))
    assert weight_only_quantizers(fixed)["out"].scale.shape == (8, 3)


def test_input_size_not_a_multiple_of_32_suggests_per_channel():
    with pytest.raises(ConfigError, match=r"80 input features.*-1 \(one scale per output channel\)"):
        quantize_weight_only(TwoLinears(80), WeightOnlyConfig(group_size=32))


def test_unsupported_layers_stay_float_and_are_reported():
    model = TwoLinears(96)
    q = quantize_weight_only(model, WeightOnlyConfig(group_size=32))
    assert type(q.conv) is nn.Conv1d and isinstance(q.fc, CompressedLinear)
    line = q.amct_weight_only_plan["conv"]
    assert line.action == "unsupported" and "Linear and transformers Conv1D" in line.detail
    assert q.amct_weight_only_plan["fc"].action == "wrap"


def test_gptq_needs_calibration_data():
    with pytest.raises(ValueError, match="calibration_data"):
        quantize_weight_only(TwoLinears(), WeightOnlyConfig(group_size=32, algorithm="gptq"))
    with pytest.raises(CalibrationError, match="needs 4 calibration batches.*gave 2"):
        quantize_weight_only(TwoLinears(), WeightOnlyConfig(group_size=32, algorithm="gptq", batch_num=4),
                             calibration_data=[torch.randn(2, 4, 16) for _ in range(2)])


def test_quantizing_twice_is_refused():
    q = quantize_weight_only(TwoLinears(), WeightOnlyConfig(group_size=32))
    with pytest.raises(ConfigError, match="already quantized"):
        quantize_weight_only(q, WeightOnlyConfig(group_size=32))


# -- GPT-2 (transformers Conv1D, module walk) -----------------------------------------------------
@pytest.fixture(scope="module")
def gpt2():
    logging.getLogger("transformers").setLevel(logging.ERROR)
    from transformers import GPT2Config, GPT2LMHeadModel
    torch.manual_seed(0)
    cfg = GPT2Config(n_layer=2, n_embd=64, n_head=2, vocab_size=100, n_positions=32, use_cache=False,
                     bos_token_id=0, eos_token_id=0)
    model = GPT2LMHeadModel(cfg).eval()
    g = torch.Generator().manual_seed(1)
    calib = [{"input_ids": torch.randint(0, 100, (4, 32), generator=g)} for _ in range(8)]
    held_out = torch.randint(0, 100, (8, 32), generator=g)
    return model, calib, held_out


@pytest.fixture(scope="module")
def gpt2_quantized(gpt2):
    model, calib, _ = gpt2
    cfg = WeightOnlyConfig(bits=4, group_size=32)
    return {"minmax": quantize_weight_only(model, cfg),
            "gptq": quantize_weight_only(model, cfg.replace(algorithm="gptq"), calibration_data=calib)}


def _rel_mse(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).pow(2).mean() / b.pow(2).mean())


def test_gpt2_w4_group32_logits_close_and_gptq_closer(gpt2, gpt2_quantized):
    model, _, held_out = gpt2
    with torch.no_grad():
        ref = model(input_ids=held_out).logits
        errs = {k: _rel_mse(q(input_ids=held_out).logits, ref) for k, q in gpt2_quantized.items()}
    assert errs["minmax"] < 0.05 and errs["gptq"] < 0.05
    assert errs["gptq"] < 0.8 * errs["minmax"]
    for q in gpt2_quantized.values():
        stages = weight_only_quantizers(q)
        assert len(stages) == 9                                              # 4 Conv1D x 2 blocks + lm_head
        assert isinstance(q.transformer.h[0].attn.c_attn, CompressedConv1D)
        assert stages["transformer.h.0.mlp.c_proj"].scale.shape == (64, 256 // 32)   # Conv1D (256, 64): in = 256
        assert "module_walk" in q.amct_weight_only_plan.capture
    # GPTQ stores its integers: the weight tied between lm_head and wte stays the float one
    gq = gpt2_quantized["gptq"]
    assert torch.equal(gq.transformer.wte.weight, model.transformer.wte.weight)


# -- ONNX export and onnxruntime parity -----------------------------------------------------------
class LinearConv1DNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(64, 96)
        self.proj = Conv1D(64, 96)                 # weight (96, 64): in 96, out 64
        self.head = nn.Linear(64, 8, bias=False)
        with torch.no_grad():
            self.proj.bias.normal_()

    def forward(self, x):
        return self.head(torch.relu(self.proj(torch.relu(self.fc(x)))))


def _ort_run(proto, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    import onnxruntime as ort

    from amct_torch.export.weight_only import ORT_EXACT_SESSION_CONFIG
    so = ort.SessionOptions()
    for k, v in ORT_EXACT_SESSION_CONFIG.items():
        so.add_session_config_entry(k, v)
    return ort.InferenceSession(proto.SerializeToString(), so, providers=["CPUExecutionProvider"]).run(None, feeds)


@pytest.mark.parametrize("cfg", [WeightOnlyConfig(bits=4, group_size=32),
                                 WeightOnlyConfig(bits=8, group_size=32, symmetric=False, algorithm="gptq", batch_num=2),
                                 WeightOnlyConfig(bits=4, group_size=-1, symmetric=False)],
                         ids=["w4-sym-minmax", "w8-asym-gptq", "w4-per-channel-asym"])
def test_export_runs_in_onnxruntime_like_the_fake_quant_model(cfg, tmp_path):
    import onnx
    from onnx import TensorProto

    from amct_torch.export.weight_only import export_weight_only
    torch.manual_seed(0)
    model = quantize_weight_only(LinearConv1DNet().eval(), cfg, calibration_data=[torch.randn(2, 8, 64) for _ in range(2)])
    x = torch.randn(2, 5, 64)
    proto = export_weight_only(model, tmp_path / "wo.onnx", x)
    assert (tmp_path / "wo.onnx").exists()
    with torch.no_grad():
        ref = model(x).numpy()
    np.testing.assert_allclose(_ort_run(proto, {proto.graph.input[0].name: x.numpy()})[0], ref, rtol=1e-5, atol=1e-5)
    inits = {t.name: t for t in proto.graph.initializer}
    dq = {n.name: n for n in proto.graph.node if n.op_type == "DequantizeLinear"}
    assert set(dq) == {"fc.weight_dequant", "proj.weight_dequant", "head.weight_dequant"}
    want = TensorProto.INT4 if cfg.bits == 4 else TensorProto.INT8
    assert inits["fc.weight"].data_type == want and list(inits["fc.weight"].dims) == [64, 96]   # (in, out)
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in dq["fc.weight_dequant"].attribute}
    if cfg.group_size == -1:
        assert attrs["axis"] == 1 and "block_size" not in attrs
    else:
        assert attrs == {"axis": 0, "block_size": 32}
        assert list(inits["fc.weight_scale"].dims) == [2, 96] and list(inits["proj.weight_scale"].dims) == [3, 64]
    assert ("fc.weight_zero_point" in inits) == (not cfg.symmetric)
    assert {n.name for n in proto.graph.node if n.op_type == "MatMul"} >= {"fc", "proj", "head"}


def test_export_gpt2_matches_in_onnxruntime(gpt2, gpt2_quantized):
    from amct_torch.export.weight_only import export_weight_only
    _, _, held_out = gpt2
    q = gpt2_quantized["gptq"]
    ids = held_out[:1]
    proto = export_weight_only(q, None, {"input_ids": ids}, input_names=["input_ids"])
    with torch.no_grad():
        ref = q(input_ids=ids).logits.numpy()
    np.testing.assert_allclose(_ort_run(proto, {"input_ids": ids.numpy()})[0], ref, rtol=1e-4, atol=1e-5)
    assert sum(n.op_type == "DequantizeLinear" for n in proto.graph.node) == 9


def test_export_refuses_an_unsolved_gptq_layer():
    from amct_torch.export.weight_only import export_weight_only
    model = quantize_weight_only(LinearConv1DNet().eval(), WeightOnlyConfig(group_size=32))
    stage = weight_only_quantizers(model)["fc"]
    model.fc.weight_pipeline[0] = GroupWeightQuantizer(model.fc.module.weight, 4, 32, True, 0, store_integers=True)
    assert stage is not model.fc.weight_pipeline[0]
    with pytest.raises(CalibrationError, match="GPTQ has not quantized fc"):
        export_weight_only(model, None, torch.randn(1, 64))

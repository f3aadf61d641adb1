"""AMCT quantization formulas (amct.md §4.6), checked against numbers computed by hand.

``q = clip(round(x / scale + offset), qmin, qmax)``, ``x' = (q - offset) * scale``;
symmetric ``scale = hi / (2^(b-1) - 1)`` (|hi| >= |lo|) or ``|lo| / 2^(b-1)``; asymmetric
``scale = (max(hi, 0) - min(lo, 0)) / (2^b - 1)``, ``offset = round(-2^(b-1) - lo / scale)``;
``scale < FLT_EPSILON`` -> 1 (asymmetric offset -2^(b-1)).

Most ranges below are chosen so that the scale is a power of two (exact in float32), so the expected
values can be written literally and compared with ``==``.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from amct_torch.quant.formulas import (FLT_EPSILON, channel_major, channel_shape, dequantize, fake_quantize,
                                       from_channel_major, qrange, quantize, scale_offset)


def so(lo, hi, bits, symmetric):
    return scale_offset(torch.tensor(lo, dtype=torch.float64), torch.tensor(hi, dtype=torch.float64), bits, symmetric)


def f32(v: float) -> float:
    """``v`` rounded to float32 (what the scale is stored as)."""
    return float(np.float32(v))


# -- integer ranges --------------------------------------------------------------------------------
def test_qrange_int4_int8_int16():
    assert qrange(4) == (-8, 7)
    assert qrange(8) == (-128, 127)
    assert qrange(16) == (-32768, 32767)
    for bad in (1, 33, 8.0):
        with pytest.raises(ValueError):
            qrange(bad)


# -- symmetric -------------------------------------------------------------------------------------
def test_symmetric_positive_side_larger():
    # |hi| = 2 >= |lo| = 1: scale = 2 / 127 = 0.015748031496..., offset 0
    scale, offset = so(-1.0, 2.0, 8, True)
    assert scale.dtype == torch.float32 and offset.dtype == torch.int32
    assert scale.item() == f32(2 / 127)
    assert scale.item() == pytest.approx(0.0157480315, rel=1e-8)
    assert offset.item() == 0
    # |hi| == |lo|: the positive branch, 1.27 / 127 = 0.01
    scale, _ = so(-1.27, 1.27, 8, True)
    assert scale.item() == f32(0.01)


def test_symmetric_negative_side_larger_uses_full_negative_range():
    # |lo| = 2 > |hi| = 1: scale = 2 / 128 = 0.015625 (not 2 / 127), so -2 maps to q = -128 exactly
    scale, offset = so(-2.0, 1.0, 8, True)
    assert scale.item() == 0.015625
    assert offset.item() == 0
    q = quantize(torch.tensor([-2.0, 1.0]), scale, offset, 8)
    assert q.tolist() == [-128.0, 64.0]  # 1 / 0.015625 = 64


# -- asymmetric ------------------------------------------------------------------------------------
def test_asymmetric_offset_formula():
    # lo=-1, hi=3: scale = 4 / 255 = 0.0156862745...; offset = round(-128 + 1 / scale) = round(-128 + 63.75)
    #            = round(-64.25) = -64
    scale, offset = so(-1.0, 3.0, 8, False)
    assert scale.item() == f32(4 / 255)
    assert offset.item() == -64
    # exact: lo = -1, hi = 2.984375 -> scale = (255/64) / 255 = 1/64, offset = round(-128 + 64) = -64
    scale, offset = so(-1.0, 2.984375, 8, False)
    assert scale.item() == 0.015625 and offset.item() == -64
    # lo = -0.25, hi = 3.734375 (= 239/64): scale = 1/64, offset = round(-128 + 16) = -112
    scale, offset = so(-0.25, 3.734375, 8, False)
    assert scale.item() == 0.015625 and offset.item() == -112
    # zero is exactly representable: q(0) = offset
    assert quantize(torch.tensor(0.0), scale, offset, 8).item() == -112


def test_asymmetric_clamps_range_to_include_zero():
    # all positive: lo=0.5 is clamped to 0 -> scale = 3.984375 / 255 = 1/64, offset = round(-128 - 0) = -128
    scale, offset = so(0.5, 3.984375, 8, False)
    assert scale.item() == 0.015625 and offset.item() == -128
    # all negative: hi=-1 is clamped to 0 -> scale = 3.984375 / 255 = 1/64, offset = round(-128 + 255) = 127
    scale, offset = so(-3.984375, -1.0, 8, False)
    assert scale.item() == 0.015625 and offset.item() == 127
    # 0 -> q = 127 (the top), -3.984375 -> -128 (the bottom)
    q = quantize(torch.tensor([0.0, -3.984375]), scale, offset, 8)
    assert q.tolist() == [127.0, -128.0]


# -- per channel -----------------------------------------------------------------------------------
def test_per_channel_vectors():
    lo = torch.tensor([-1.0, -2.0, 0.0, -0.5])
    hi = torch.tensor([2.0, 1.0, 0.0, 0.25])
    scale, offset = scale_offset(lo, hi, 8, True)
    # [2/127, 2/128, (0 < eps -> 1), 0.5/128 = 1/256]
    assert scale.tolist() == [f32(2 / 127), 0.015625, 1.0, 0.00390625]
    assert offset.tolist() == [0, 0, 0, 0]

    lo = torch.tensor([-1.0, 0.5, -3.984375, 0.0])
    hi = torch.tensor([3.0, 3.984375, -1.0, 0.0])
    scale, offset = scale_offset(lo, hi, 8, False)
    # [4/255, 1/64 (lo clamped), 1/64 (hi clamped), 1 (empty range)]; offsets [-64, -128, 127, -128]
    assert scale.tolist() == [f32(4 / 255), 0.015625, 0.015625, 1.0]
    assert offset.tolist() == [-64, -128, 127, -128]


# -- INT4 and INT16 --------------------------------------------------------------------------------
def test_int4_scales_offsets_and_clipping():
    # sym: 3.5 / 7 = 0.5; full negative: 4 / 8 = 0.5
    assert so(-1.0, 3.5, 4, True)[0].item() == 0.5
    assert so(-4.0, 1.0, 4, True)[0].item() == 0.5
    # asym: lo=-1, hi=6.5 -> scale = 7.5 / 15 = 0.5, offset = round(-8 + 2) = -6
    scale, offset = so(-1.0, 6.5, 4, False)
    assert scale.item() == 0.5 and offset.item() == -6
    x = torch.tensor([-1.0, 0.0, 6.5, 7.0, -2.0])
    # x/0.5 - 6 = [-8, -6, 7, 8, -10] -> clip to [-8, 7]
    assert quantize(x, scale, offset, 4).tolist() == [-8.0, -6.0, 7.0, 7.0, -8.0]
    # back: (q + 6) * 0.5 = [-1, 0, 6.5, 6.5, -1]
    assert fake_quantize(x, scale, offset, 4).tolist() == [-1.0, 0.0, 6.5, 6.5, -1.0]


def test_int16_scales_offsets_and_clipping():
    # sym: hi = 32767/1024 -> scale = 1/1024; full negative: lo = -32 -> 32 / 32768 = 1/1024
    assert so(-1.0, 32767 / 1024, 16, True)[0].item() == 1 / 1024
    assert so(-32.0, 1.0, 16, True)[0].item() == 1 / 1024
    # asym: lo=-1, hi=65535/1024 - 1 -> scale = (65535/1024) / 65535 = 1/1024, offset = round(-32768 + 1024) = -31744
    scale, offset = so(-1.0, 65535 / 1024 - 1, 16, False)
    assert scale.item() == 1 / 1024 and offset.item() == -31744
    q = quantize(torch.tensor([-1.0, 0.0, 100.0, -100.0], dtype=torch.float64), scale, offset, 16)
    assert q.tolist() == [-32768.0, -31744.0, 32767.0, -32768.0]


# -- scale < eps fallback --------------------------------------------------------------------------
@pytest.mark.parametrize("bits,qmin", [(4, -8), (8, -128), (16, -32768)])
def test_scale_below_eps_falls_back_to_one(bits, qmin):
    assert FLT_EPSILON == pytest.approx(1.1920929e-07)
    for lo, hi in [(0.0, 0.0), (-1e-9, 1e-9), (3e-10, 3e-10)]:
        scale, offset = so(lo, hi, bits, True)
        assert scale.item() == 1.0 and offset.item() == 0
        scale, offset = so(lo, hi, bits, False)
        assert scale.item() == 1.0 and offset.item() == qmin
    # just above eps: kept as is (sym 8 bit: 127 * 2e-7 / 127 = 2e-7)
    if bits == 8:
        assert so(0.0, 127 * 2e-7, 8, True)[0].item() == f32(2e-7)
    # an all-zero tensor still round-trips to zero with the fallback factors
    scale, offset = so(0.0, 0.0, bits, False)
    assert fake_quantize(torch.zeros(3), scale, offset, bits).tolist() == [0.0, 0.0, 0.0]


# -- quantize / dequantize / fake_quantize ---------------------------------------------------------
def test_quantize_dequantize_hand_values():
    scale, offset = torch.tensor(0.5), torch.tensor(3, dtype=torch.int32)
    x = torch.tensor([-70.0, -1.26, 0.25, 0.75, 1.0, 62.0, 63.0])
    # x/0.5 + 3 = [-137, 0.48, 3.5, 4.5, 5, 127, 129] -> round-half-even [-137, 0, 4, 4, 5, 127, 129]
    #           -> clip [-128, 0, 4, 4, 5, 127, 127]
    q = quantize(x, scale, offset, 8)
    assert q.tolist() == [-128.0, 0.0, 4.0, 4.0, 5.0, 127.0, 127.0]
    # (q - 3) * 0.5
    assert dequantize(q, scale, offset).tolist() == [-65.5, -1.5, 0.5, 0.5, 1.0, 62.0, 62.0]
    assert fake_quantize(x, scale, offset, 8).tolist() == [-65.5, -1.5, 0.5, 0.5, 1.0, 62.0, 62.0]


def _reference_fake_quant(x: np.ndarray, scale: np.ndarray, offset: np.ndarray, bits: int) -> np.ndarray:
    qmin, qmax = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    q = np.clip(np.rint(x / scale + offset.astype(np.float32)), qmin, qmax)
    return (q - offset.astype(np.float32)) * scale


@pytest.mark.parametrize("bits", [4, 8, 16])
@pytest.mark.parametrize("symmetric", [True, False])
def test_fake_quantize_equals_quantize_then_dequantize(bits, symmetric):
    g = torch.Generator().manual_seed(bits)
    x = torch.randn(6, 50, generator=g) * torch.linspace(0.1, 3, 6).reshape(6, 1)
    lo, hi = x.min(dim=1).values * 0.8, x.max(dim=1).values * 0.7  # clip some values
    scale, offset = scale_offset(lo, hi, bits, symmetric)
    s, o = scale.reshape(6, 1), offset.reshape(6, 1)
    q = quantize(x, s, o, bits)
    assert torch.equal(q, torch.round(q))
    qmin, qmax = qrange(bits)
    assert q.min() >= qmin and q.max() <= qmax
    assert (q == qmin).any() or (q == qmax).any()  # clipping happened
    fq = fake_quantize(x, s, o, bits)
    assert torch.equal(fq, dequantize(q, s, o))
    ref = _reference_fake_quant(x.numpy(), s.numpy(), o.numpy(), bits)
    np.testing.assert_array_equal(fq.numpy(), ref)


def test_rounding_is_half_to_even():
    one, zero = torch.tensor(1.0), torch.tensor(0, dtype=torch.int32)
    x = torch.tensor([-2.5, -1.5, -0.5, 0.5, 1.5, 2.5, 3.5])
    # half to even: [-2, -2, -0, 0, 2, 2, 4] (half away from zero would give [-3, -2, -1, 1, 2, 3, 4])
    assert quantize(x, one, zero, 8).tolist() == [-2.0, -2.0, 0.0, 0.0, 2.0, 2.0, 4.0]
    assert fake_quantize(x, one, zero, 8).tolist() == [-2.0, -2.0, 0.0, 0.0, 2.0, 2.0, 4.0]
    # with an offset: 0.5 + 1 = 1.5 -> 2, 1.5 + 1 = 2.5 -> 2
    assert quantize(torch.tensor([0.5, 1.5]), one, torch.tensor(1, dtype=torch.int32), 8).tolist() == [2.0, 2.0]


def test_straight_through_gradient():
    scale, offset = torch.tensor(1.0, requires_grad=True), torch.tensor(0, dtype=torch.int32)
    # rounded values: [-129, -128, 0, 127, 128, 200] -> inside [qmin, qmax] = [F, T, T, T, F, F]
    x = torch.tensor([-129.0, -128.4, 0.3, 127.4, 127.6, 200.0], requires_grad=True)
    y = fake_quantize(x, scale, offset, 8)
    assert y.tolist() == [-128.0, -128.0, 0.0, 127.0, 127.0, 127.0]
    y.backward(torch.full_like(x, 2.0))
    assert x.grad.tolist() == [0.0, 2.0, 2.0, 2.0, 0.0, 0.0]
    assert scale.grad is None
    # asymmetric, 4 bit: scale 0.5, offset -6 -> range [(-8+6)*0.5, (7+6)*0.5] = [-1, 6.5]
    x = torch.tensor([-1.3, -1.2, 0.0, 6.7, 6.8], requires_grad=True)
    # x/0.5 - 6 = [-8.6, -8.4, -6, 7.4, 7.6] -> round [-9, -8, -6, 7, 8] -> inside [F, T, T, T, F]
    fake_quantize(x, torch.tensor(0.5), torch.tensor(-6, dtype=torch.int32), 4).sum().backward()
    assert x.grad.tolist() == [0.0, 1.0, 1.0, 1.0, 0.0]


# -- per-channel layout ----------------------------------------------------------------------------
def _roundtrip(w, axis, groups=1):
    m = channel_major(w, axis, groups)
    assert torch.equal(from_channel_major(m, w.shape, axis, groups), w)
    return m


def test_layout_conv_axis0():
    w = torch.arange(4 * 3 * 2 * 2, dtype=torch.float32).reshape(4, 3, 2, 2)
    m = _roundtrip(w, 0)
    assert m.shape == (4, 12)
    assert torch.equal(m[2], w[2].flatten())
    cs = channel_shape(torch.tensor([1.0, 2.0, 3.0, 4.0]), w.shape, 0)
    assert cs.shape == (4, 1, 1, 1)
    assert torch.equal((w * cs)[2], w[2] * 3.0)


def test_layout_linear_axis0():
    w = torch.arange(15, dtype=torch.float32).reshape(5, 3)
    m = _roundtrip(w, 0)
    assert torch.equal(m, w)
    assert channel_shape(torch.arange(5.0), w.shape, 0).shape == (5, 1)


def test_layout_transformers_conv1d_axis1():
    # transformers Conv1D: weight (in, out) = (3, 5), y = x @ W; output channel o is column o
    w = torch.arange(15, dtype=torch.float32).reshape(3, 5)
    m = _roundtrip(w, 1)
    assert m.shape == (5, 3)
    assert torch.equal(m, w.T)
    assert m[1].tolist() == [1.0, 6.0, 11.0]
    cs = channel_shape(torch.arange(5.0), w.shape, 1)
    assert cs.shape == (1, 5)
    assert torch.equal((w * cs)[:, 4], w[:, 4] * 4)


def test_layout_conv_transpose_groups1():
    w = torch.arange(3 * 4 * 2 * 2, dtype=torch.float32).reshape(3, 4, 2, 2)  # (C_in, C_out, k, k)
    m = _roundtrip(w, 1)
    assert m.shape == (4, 12)
    for o in range(4):
        assert torch.equal(m[o], w[:, o].flatten())


def test_layout_grouped_conv_transpose_row_is_output_channel():
    torch.manual_seed(0)
    layer = nn.ConvTranspose2d(4, 6, 2, groups=2, bias=False)  # weight (C_in=4, C_out/g=3, 2, 2)
    w = layer.weight.detach()
    assert w.shape == (4, 3, 2, 2)
    m = _roundtrip(w, 1, groups=2)
    assert m.shape == (6, 2 * 2 * 2)  # one row per output channel: C_in/g * k * k
    # by hand: output channel o = g * 3 + j reads input channels g*2 .. g*2+1 through w[g*2:(g+1)*2, j]
    for o in range(6):
        g_, j = divmod(o, 3)
        assert torch.equal(m[o], w[g_ * 2:(g_ + 1) * 2, j].flatten())
    # by the op: a weight that is non-zero only in row o drives only output channel o
    x = torch.rand(1, 4, 3, 3) + 0.5
    for o in range(6):
        rows = torch.zeros_like(m)
        rows[o] = 1.0
        y = F.conv_transpose2d(x, from_channel_major(rows, w.shape, 1, groups=2), groups=2)
        nonzero = [c for c in range(6) if y[0, c].abs().sum() > 0]
        assert nonzero == [o]
    # channel_shape broadcasts scale[o] onto exactly the weights of output channel o
    scale = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0, 6.0])
    cs = channel_shape(scale, w.shape, 1, groups=2)
    assert cs.dim() == 4
    expect = from_channel_major(m * scale.reshape(6, 1), w.shape, 1, groups=2)
    assert torch.equal(w * cs, expect)
    y_scaled = F.conv_transpose2d(x, w * cs, groups=2)
    y = F.conv_transpose2d(x, w, groups=2)
    torch.testing.assert_close(y_scaled, y * scale.reshape(1, 6, 1, 1))


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("per_channel", [True, False])
def test_arq_calibrate_matches_scale_offset(bits, per_channel):
    """ARQ's per-step scale computation (float32, fewer ops) equals scale_offset's float64 formula,
    including channels whose negative and positive extremes tie, all-zero channels and tiny ranges."""
    from amct_torch.config import PerChannel, PerTensor
    from amct_torch.quant.quantizers import ArqWeightQuantizer

    torch.manual_seed(0)
    w = torch.randn(64, 3, 3, 3) * torch.rand(64, 1, 1, 1) * 3
    w[1] = 0.0
    w[2] = 1e-9 * torch.randn(3, 3, 3)
    w[3, 0, 0, 0], w[3, 0, 0, 1] = 0.5, -0.5
    w[4] = w[4].abs()
    w[5] = -w[5].abs()
    q = ArqWeightQuantizer(w, bits, PerChannel() if per_channel else PerTensor(), axis=0)
    rows = w.reshape(64, -1) if per_channel else w.reshape(1, -1)
    scale, offset = scale_offset(rows.min(dim=1).values, rows.max(dim=1).values, bits, symmetric=True)
    assert torch.equal(q.scale, scale) and torch.equal(q.offset, offset)

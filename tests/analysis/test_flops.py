"""count_flops: per-layer params and MACs against hand-computed numbers, sparsity-aware effective counts,
wrapped models, and no side effects on the model."""

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import amct_torch
from amct_torch.analysis import count_flops
from amct_torch.config import MagnitudeConfig, NMConfig, QuantConfig, Targeting
from amct_torch.nn import CompressedConv
from amct_torch.sparsity import MaskStage, apply_nm, prune_magnitude


class Small(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)                        # 8*3*9 + 8 = 224 params
        self.bn = nn.BatchNorm2d(8)                                      # 16
        self.gconv = nn.Conv2d(8, 8, 3, padding=1, groups=4, bias=False)  # 8*2*9 = 144
        self.pool = nn.MaxPool2d(2)
        self.up = nn.ConvTranspose2d(8, 4, 2, stride=2)                  # 8*4*4 + 4 = 132
        self.gap = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(4, 10)                                       # 50

    def forward(self, x):
        x = F.relu(self.bn(self.conv(x)))
        x = self.pool(self.gconv(x))
        x = self.gap(self.up(x)).flatten(1)
        return self.fc(x)


# hand-computed for one 3x8x8 input
MACS = {"conv": 8 * 3 * 9 * 8 * 8,        # Cout * Cin/groups * kh * kw * Hout * Wout = 13824
        "bn": 8 * 8 * 8,                  # one per output element = 512
        "gconv": 8 * (8 // 4) * 9 * 8 * 8,  # 9216
        "pool": 0,
        "up": 8 * (4 // 1) * 2 * 2 * 4 * 4,  # Cin * Cout/groups * kh * kw * Hin * Win = 2048
        "gap": 0,
        "fc": 4 * 10}
PARAMS = {"conv": 224, "bn": 16, "gconv": 144, "pool": 0, "up": 132, "gap": 0, "fc": 50}


@pytest.fixture
def small():
    torch.manual_seed(0)
    return Small().eval()


@pytest.fixture
def x():
    return torch.randn(1, 3, 8, 8)


def test_counts_match_hand_computed_numbers(small, x):
    report = count_flops(small, x)
    assert [r.name for r in report.layers] == list(MACS)
    for name in MACS:
        assert report[name].macs == MACS[name], name
        assert report[name].params == PARAMS[name], name
        assert report[name].effective_macs == MACS[name] and report[name].effective_params == PARAMS[name]
    assert report["up"].output_shape == (1, 4, 8, 8) and report["pool"].output_shape == (1, 8, 4, 4)
    assert report.total_macs == sum(MACS.values()) == 25640
    assert report.total_params == sum(PARAMS.values()) == 566
    assert report.total_flops == 2 * 25640
    assert report.notes == []
    text = report.table()
    assert "25,640" in text and "total" in text and "gconv" in text


def test_counts_are_for_the_given_batch(small):
    assert count_flops(small, torch.randn(3, 3, 8, 8)).total_macs == 3 * 25640


def test_effective_counts_follow_the_masks(small, x):
    t = Targeting(None, module_name={"conv": MagnitudeConfig(sparsity=0.5, schedule="oneshot")})
    pruned = prune_magnitude(small, t, x)
    pruned = apply_nm(pruned, Targeting(None, module_name={"fc": NMConfig()}), x)
    report = count_flops(pruned, x)
    assert report["conv"].macs == MACS["conv"] and report["conv"].params == 224  # dense figures unchanged
    assert report["conv"].effective_macs == 108 * 64   # 108 of 216 weights kept, each used at 8x8 positions
    assert report["conv"].effective_params == 224 - 108
    assert report["fc"].effective_macs == 20 and report["fc"].effective_params == 30
    assert report.total_effective_macs == 25640 - 108 * 64 - 20
    assert report.total_effective_params == 566 - 108 - 20


def test_a_channel_mask_removes_the_channel_weights_and_bias():
    conv = CompressedConv(nn.Conv2d(3, 4, 3))
    stage = MaskStage(conv.module.weight, "channel", out_channels=4)
    mask, bias_mask = torch.ones(4, 3, 3, 3), torch.ones(4)
    mask[1], bias_mask[1] = 0, 0
    stage.set_mask(mask, bias_mask)
    conv.weight_pipeline.insert(0, stage)
    row = count_flops(nn.Sequential(conv), torch.randn(1, 3, 5, 5))["0"]
    assert row.macs == 4 * 27 * 9 and row.effective_macs == 3 * 27 * 9
    assert row.params == 4 * 27 + 4 and row.effective_params == 3 * 27 + 3


def test_wrapped_quantized_model_counts_like_the_plain_one(small, x):
    q = amct_torch.quantize(small, QuantConfig(), x, fold_bn=False, quantize_outputs="none")
    report = count_flops(q, x)
    assert {r.name: r.macs for r in report.layers} == MACS
    assert {r.name: r.params for r in report.layers} == PARAMS


def test_no_side_effects_modes_and_batchnorm_statistics_are_kept(small, x):
    small.train()
    before = small.bn.running_mean.clone()
    count_flops(small, x)
    assert small.training and small.bn.training
    assert torch.equal(small.bn.running_mean, before)
    assert not small.bn._forward_hooks


class Conv1D(nn.Module):
    """transformers' Conv1D layout: weight (in, out)."""

    def __init__(self, nf, nx):
        super().__init__()
        self.nf = nf
        self.weight = nn.Parameter(torch.randn(nx, nf))
        self.bias = nn.Parameter(torch.zeros(nf))

    def forward(self, x):
        return torch.addmm(self.bias, x.view(-1, x.size(-1)), self.weight).view(*x.shape[:-1], self.nf)


class Mixed(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(10, 8)
        self.fc = nn.Linear(8, 8)
        self.proj = Conv1D(6, 8)
        self.attn = nn.MultiheadAttention(8, 2, batch_first=True)

    def forward(self, ids):
        h = self.emb(ids)
        h = self.fc(self.fc(h))  # called twice
        h = h + self.attn(h, h, h, need_weights=False)[0]
        return self.proj(h)


def test_reused_layers_add_up_and_unmodelled_parameters_are_reported():
    torch.manual_seed(0)
    report = count_flops(Mixed(), torch.randint(0, 10, (1, 5)))
    assert report["fc"].calls == 2 and report["fc"].macs == 2 * 5 * 8 * 8
    assert report["proj"].macs == 5 * 8 * 6
    assert report["emb"].macs == 0 and report["emb"].params == 80
    assert any("emb (Embedding)" in n for n in report.notes)
    assert any("outside the counted layers" in n and "attn" in n for n in report.notes)
    assert report.total_params == sum(p.numel() for p in Mixed().parameters())

"""The decomposition pass: eligibility reporting, the plan's numbers against a hand count and count_flops,
rank selection in the pass (fixed, energy, MACs target), selection and targeting, and composition with
quantization, export and fine-tuning."""

from __future__ import annotations

import json
import os

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import amct_torch
from amct_torch.analysis.flops import count_flops
from amct_torch.config import Targeting
from amct_torch.config.base import ConfigError
from amct_torch.config.decompose import DecomposeConfig
from amct_torch.decompose import decompose, plan_decomposition
from reference_nets import ConvBNResidualNet, randomize_bn_


class EligibilityNet(nn.Module):
    """One conv per eligibility case."""

    def __init__(self) -> None:
        super().__init__()
        self.ok = nn.Conv2d(8, 16, 3, padding=1)
        self.depthwise = nn.Conv2d(16, 16, 3, padding=1, groups=16)
        self.grouped = nn.Conv2d(16, 16, 3, padding=1, groups=4)
        self.pointwise = nn.Conv2d(16, 16, 1)
        self.stride3 = nn.Conv2d(16, 16, 3, stride=3, padding=1)
        self.dilated = nn.Conv2d(16, 16, 3, padding=2, dilation=2)
        self.tall = nn.Conv2d(16, 16, (3, 1), padding=(1, 0))
        self.conv1d = nn.Conv1d(16, 16, 3, padding=1)
        self.fc = nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.ok(x)
        x = self.tall(self.dilated(self.pointwise(self.grouped(self.depthwise(x)))))
        x = self.stride3(x)
        x = self.conv1d(x.flatten(2)).mean(-1)
        return self.fc(x)


class ThreeConvNet(nn.Module):
    def __init__(self, c: int = 16) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, c, 3, padding=1)
        self.conv2 = nn.Conv2d(c, 2 * c, 3, stride=2, padding=1)
        self.conv3 = nn.Conv2d(2 * c, 2 * c, 5, padding=2)
        self.fc = nn.Linear(2 * c, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.conv1(x))
        x = F.relu(self.conv2(x))
        x = F.relu(self.conv3(x))
        return self.fc(x.mean(dim=(2, 3)))


@pytest.fixture
def net() -> ThreeConvNet:
    torch.manual_seed(0)
    return ThreeConvNet().eval()


def test_eligibility_is_reported_per_layer() -> None:
    plan = plan_decomposition(EligibilityNet(), DecomposeConfig(), torch.randn(1, 8, 12, 12))
    assert plan["ok"].action == "decompose"
    reasons = {lp.name: lp.reason for lp in plan.layers if lp.action == "ineligible"}
    assert reasons == {"depthwise": "groups=16 (depthwise)", "grouped": "groups=4 (grouped)",
                       "pointwise": "kernel 1x1", "stride3": "stride 3", "dilated": "dilation 2",
                       "tall": "kernel 3x1 (both sides must be > 2)",
                       "conv1d": "Conv1d is not supported (Conv2d and Linear only)"}
    assert plan["fc"].action == "skip" and "linear=True" in plan["fc"].reason
    tucker = plan_decomposition(EligibilityNet(), DecomposeConfig(conv_method="tucker2"), torch.randn(1, 8, 12, 12))
    assert tucker["pointwise"].reason.startswith("kernel 1x1")
    assert tucker["stride3"].action != "ineligible" and tucker["dilated"].action != "ineligible"
    assert tucker["depthwise"].reason == "groups=16 (depthwise)"
    text = str(plan)
    assert "groups=16 (depthwise)" in text and "total" in text


def test_plan_numbers_equal_a_hand_count(net: ThreeConvNet) -> None:
    x = torch.randn(2, 3, 10, 10)
    plan = plan_decomposition(net, DecomposeConfig(rank_selection="fixed", rank=4), x)
    lp = plan["conv2"]  # Conv2d(16, 32, 3, stride 2, padding 1) on 10x10 -> 5x5, batch 2
    assert (lp.method, lp.action, lp.rank, lp.full_rank) == ("spatial", "decompose", 4, 48)
    assert lp.params_before == 32 * 16 * 9 + 32
    assert lp.params_after == 4 * 16 * 3 + 32 * 4 * 3 + 32
    assert lp.macs_before == 2 * 5 * 5 * 32 * 16 * 9
    # the kh x 1 conv runs at stride (2, 1): 5 rows, all 10 columns; the 1 x kw conv at 5x5
    assert lp.macs_after == 2 * 5 * 10 * 4 * 16 * 3 + 2 * 5 * 5 * 32 * 4 * 3
    model, done = decompose(net, DecomposeConfig(rank_selection="fixed", rank=4), x)
    measured = count_flops(model, x)
    for lp in done.layers:
        if lp.decomposed:
            assert sum(measured[f].macs for f in lp.factor_names()) == lp.macs_after
            assert sum(measured[f].params for f in lp.factor_names()) == lp.params_after
    t = done.totals()
    assert t["model_macs_after"] == measured.total_macs and t["model_params_after"] == measured.total_params
    assert t["model_macs_before"] == count_flops(net, x).total_macs
    json.dumps(done.to_dict())  # plain data
    assert done.changes() == {"conv1": ["conv1.0", "conv1.1"], "conv2": ["conv2.0", "conv2.1"],
                              "conv3": ["conv3.0", "conv3.1"]}


def test_tucker2_and_linear_in_the_pass(net: ThreeConvNet) -> None:
    x = torch.randn(2, 3, 10, 10)
    cfg = DecomposeConfig(conv_method="tucker2", rank_selection="fixed", rank=(8, 12), linear=True)
    model, plan = decompose(net, Targeting(cfg, module_name={"fc": cfg.replace(conv_method="spatial", rank=4)}), x)
    assert plan["conv3"].rank == [8, 12] and plan["conv3"].full_rank == [32, 32]
    assert [tuple(m.weight.shape) for m in model.conv3] == [(8, 32, 1, 1), (12, 8, 5, 5), (32, 12, 1, 1)]
    assert model.conv3[1].padding == (2, 2) and model.conv3[2].bias is not None
    assert plan["conv1"].rank == [3, 12]  # r_in capped at the 3 input channels
    assert isinstance(model.fc, nn.Sequential) and model.fc[0].out_features == 4
    measured = count_flops(model, x)
    assert sum(measured[f].macs for f in plan["conv3"].factor_names()) == plan["conv3"].macs_after


def test_layers_that_would_not_pay_are_skipped(net: ThreeConvNet) -> None:
    x = torch.randn(1, 3, 8, 8)
    plan = plan_decomposition(net, DecomposeConfig(rank_selection="fixed", rank=40), x)
    assert plan["conv2"].action == "skip"
    assert "rank 40 would not pay" in plan["conv2"].reason and "pays up to rank" in plan["conv2"].reason
    assert plan["conv2"].macs_after == plan["conv2"].macs_before
    plan = plan_decomposition(net, DecomposeConfig(rank_selection="fixed", rank=12, min_saving=0.6), x)
    assert plan["conv3"].action == "decompose"  # 1 - (12*32*5 + 32*12*5) / (32*32*25) saves 81%
    assert plan["conv2"].action == "skip" and "min_saving 0.6" in plan["conv2"].reason


def test_energy_selection_keeps_the_energy(net: ThreeConvNet) -> None:
    plan = plan_decomposition(net, DecomposeConfig(rank_selection="energy", energy=0.8, rank_multiple=4))
    for lp in plan.layers:
        if lp.rank is not None:
            assert lp.energy >= 0.8 and lp.rank % 4 == 0 or lp.rank == lp.full_rank
    assert plan.model_macs is None and plan["conv3"].macs_before is None  # no input: judged by parameters


@pytest.mark.parametrize("method", ["spatial", "tucker2"])
@pytest.mark.parametrize("scope", ["decomposable", "model"])
def test_macs_target_lands_on_target(net: ThreeConvNet, method: str, scope: str) -> None:
    x = torch.randn(1, 3, 16, 16)
    cfg = DecomposeConfig(conv_method=method, rank_selection="macs", macs_ratio=0.4, macs_scope=scope)
    model, plan = decompose(net, cfg, x)
    before, after = count_flops(net, x), count_flops(model, x)
    if scope == "model":
        ratio = after.total_macs / before.total_macs
    else:
        names = [lp.name for lp in plan.layers if lp.rank is not None]
        ratio = sum(plan[n].macs_after for n in names) / sum(plan[n].macs_before for n in names)
    assert 0.37 <= ratio <= 0.4 + 1e-9
    assert plan.target["reached_ratio"] == pytest.approx(ratio)
    assert "target: 0.4" in str(plan)


def test_unreachable_macs_target_is_reported(net: ThreeConvNet) -> None:
    plan = plan_decomposition(net, DecomposeConfig(rank_selection="macs", macs_ratio=0.01, macs_scope="model",
                                                   rank_multiple=16), torch.randn(1, 3, 8, 8))
    assert not plan.target["reachable"] and "not reachable" in plan.warnings[0]
    with pytest.raises(ValueError, match="rank_selection='macs' needs example_inputs"):
        plan_decomposition(net, DecomposeConfig(rank_selection="macs"))


def test_selection_targeting_and_explicit_ranks(net: ThreeConvNet) -> None:
    x = torch.randn(1, 3, 8, 8)
    plan = plan_decomposition(net, Targeting(DecomposeConfig(), module_name={"conv2": None}), x,
                              ranks={"conv3": 8}, skip=["conv1"])
    assert plan["conv1"].reason == "in skip list ('conv1')"
    assert plan["conv2"].reason == "left alone by module_name['conv2']"
    assert (plan["conv3"].rank, plan["conv3"].selection) == (8, "fixed (ranks=)")
    plan = plan_decomposition(net, DecomposeConfig(), x, layers=["conv3"])
    assert plan["conv1"].reason == "not selected (layers=...)"
    with pytest.raises(ConfigError, match=r"ranks\['conv9'\].*a Conv2d/Linear module path of the model: conv1, conv2"):
        plan_decomposition(net, None, x, ranks={"conv9": 4})
    with pytest.raises(ConfigError, match=r"ranks\['conv3'\]: got 200; allowed: an int rank 1\.\.160"):
        plan_decomposition(net, None, x, ranks={"conv3": 200})
    with pytest.raises(ConfigError, match=r"ranks\['conv3'\]: got \(4, 40\); allowed: \(r_in, r_out\)"):
        plan_decomposition(net, DecomposeConfig(conv_method="tucker2"), x, ranks={"conv3": (4, 40)})
    with pytest.raises(TypeError, match="not one string"):
        plan_decomposition(net, None, x, skip="conv1")


def test_copy_unless_inplace(net: ThreeConvNet) -> None:
    x = torch.randn(1, 3, 8, 8)
    model, plan = decompose(net, DecomposeConfig(rank_selection="fixed", rank=4), x)
    assert isinstance(net.conv2, nn.Conv2d) and isinstance(model.conv2, nn.Sequential)
    same, _ = decompose(net, DecomposeConfig(rank_selection="fixed", rank=4), x, inplace=True)
    assert same is net and isinstance(net.conv2, nn.Sequential)


class SharedNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(8, 8, 3, padding=1)
        self.again = self.conv
        self.attn = nn.MultiheadAttention(8, 2, batch_first=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.again(self.conv(x)).flatten(2).transpose(1, 2)
        return self.attn(x, x, x)[0]


def test_shared_modules_and_attention_projections_are_left_alone() -> None:
    plan = plan_decomposition(SharedNet(), DecomposeConfig(linear=True), torch.randn(1, 8, 6, 6))
    assert plan["conv"].reason == "shared module (also registered as again)"
    assert plan["attn.out_proj"].reason.startswith("owned by MultiheadAttention")


def test_exact_full_rank_model_equals_original(net: ThreeConvNet) -> None:
    net = net.double()
    x = torch.randn(2, 3, 9, 9, dtype=torch.float64)
    model, plan = decompose(net, DecomposeConfig(rank_selection="fixed", rank=4, linear=True),
                            x, ranks={"conv3": 160, "fc": 10})  # full ranks: no saving, so not decomposed ...
    assert plan["conv3"].action == "skip"
    low, _ = decompose(net, DecomposeConfig(conv_method="tucker2", rank_selection="fixed", rank=(32, 32)), x,
                       layers=["conv3"], ranks={"conv3": (32, 32)})
    torch.testing.assert_close(low(x), net(x), rtol=0, atol=1e-10)  # ... Tucker-2 at full rank is exact anyway


def test_decomposed_model_quantizes_folds_bn_and_exports(tmp_path) -> None:
    ort = pytest.importorskip("onnxruntime")
    torch.manual_seed(0)
    model = randomize_bn_(ConvBNResidualNet()).eval()
    x = torch.randn(2, 3, 12, 12)
    low, plan = decompose(model, DecomposeConfig(rank_selection="fixed", rank=6), x)
    assert plan.decomposed() == ["conv1", "conv2", "conv3"]
    q = amct_torch.quantize(low, None, x)
    folds = {lp.name: lp.detail for lp in q.amct_plan.layers if lp.action == "fold"}
    assert folds == {"bn1": "into conv1.1", "bn2": "into conv2.1", "bn3": "into conv3.1"}
    amct_torch.calibrate(q, [torch.randn(2, 3, 12, 12) for _ in range(2)], progress=False)
    amct_torch.export(q, str(tmp_path / "low"), x)
    sess = ort.InferenceSession(str(tmp_path / "low_fake_quant_model.onnx"))
    out = sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0]
    with torch.no_grad():
        ref = low(x).numpy()
    assert abs(out - ref).max() < 0.05 * abs(ref).max()
    assert os.path.isfile(tmp_path / "low_deploy_model.onnx")


def test_factors_fine_tune(net: ThreeConvNet) -> None:
    model, plan = decompose(net.train(), DecomposeConfig(rank_selection="fixed", rank=4), torch.randn(1, 3, 8, 8))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    before = model.conv2[0].weight.detach().clone()
    loss = model(torch.randn(4, 3, 8, 8)).pow(2).mean()
    loss.backward()
    opt.step()
    assert model.conv2[0].weight.grad is not None and not torch.equal(before, model.conv2[0].weight)
    assert model.training


def test_pretrained_resnet_to_half_the_macs() -> None:
    from amct_torch.zoo.reference import pretrained

    model = pretrained("resnet_digits").eval()
    x = torch.randn(1, 1, 16, 16)
    low, plan = decompose(model, DecomposeConfig(rank_selection="macs", macs_ratio=0.5, macs_scope="model",
                                                 rank_multiple=4), x)
    ratio = count_flops(low, x).total_macs / count_flops(model, x).total_macs
    assert 0.47 <= ratio <= 0.5
    assert plan["layer2.0.downsample.0"].reason == "kernel 1x1"
    batch = torch.randn(8, 1, 16, 16)
    with torch.no_grad():
        out = low(batch)
    assert out.shape == (8, 10) and torch.isfinite(out).all()
    assert len(plan.decomposed()) >= 10

"""Channel pruning: dependency groups, criteria rankings, masked == shrunk, rebuild from the record."""

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from amct_torch.config.prune import ChannelPruneConfig
from amct_torch.graph.groups import channel_groups
from amct_torch.graph.shrink import ShrinkError, ShrinkRecord, apply_shrink_record, shrink
from amct_torch.sparsity.channel import prune_channels
from amct_torch.sparsity.criteria import add_bn_slim_grad, bn_slim_penalty, weight_scores


class Residual(nn.Module):
    def __init__(self, c=8):
        super().__init__()
        self.stem, self.bn0 = nn.Conv2d(3, c, 3, padding=1), nn.BatchNorm2d(c)
        self.a, self.bna = nn.Conv2d(c, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16)
        self.b, self.bnb = nn.Conv2d(16, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)
        self.head = nn.Linear(c * 4 * 4, 5)

    def forward(self, x):
        x = F.relu(self.bn0(self.stem(x)))
        y = self.bnb(self.b(F.relu(self.bna(self.a(x)))))
        x = F.relu(x + y)
        return self.head(torch.flatten(F.adaptive_avg_pool2d(x, 4), 1))


class Dense(nn.Module):
    """A DenseNet-style block: every layer reads the concatenation of all before it."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.l1, self.l2 = nn.Conv2d(8, 6, 3, padding=1), nn.Conv2d(14, 6, 3, padding=1)
        self.bn = nn.BatchNorm2d(20)
        self.out = nn.Conv2d(20, 4, 1)

    def forward(self, x):
        x = F.relu(self.stem(x))
        x = torch.cat([x, F.relu(self.l1(x))], 1)
        x = torch.cat([x, F.relu(self.l2(x))], 1)
        return self.out(F.relu(self.bn(x))).mean((2, 3))


class Depthwise(nn.Module):
    def __init__(self):
        super().__init__()
        self.expand, self.bn1 = nn.Conv2d(3, 12, 1), nn.BatchNorm2d(12)
        self.dw, self.bn2 = nn.Conv2d(12, 12, 3, padding=1, groups=12), nn.BatchNorm2d(12)
        self.project = nn.Conv2d(12, 4, 1)

    def forward(self, x):
        x = F.relu6(self.bn1(self.expand(x)))
        x = F.relu6(self.bn2(self.dw(x)))
        return self.project(x).mean((2, 3))


def randomized(model):
    torch.manual_seed(0)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            nn.init.uniform_(m.weight, 0.5, 1.5)
            nn.init.uniform_(m.bias, -0.2, 0.2)
            m.running_mean.uniform_(-0.1, 0.1)
            m.running_var.uniform_(0.5, 1.5)
    return model.eval()


@pytest.mark.parametrize("cls", [Residual, Dense, Depthwise])
@pytest.mark.parametrize("criterion", ["l1", "fpgm"])
def test_masked_equals_shrunk_and_the_record_rebuilds_it(cls, criterion, tmp_path):
    model = randomized(cls())
    x = torch.randn(2, 3, 8, 8)
    masked = prune_channels(model, ChannelPruneConfig(ratio=0.5, criterion=criterion), x).eval()
    assert masked.amct_channel_plan.pruned_channels() > 0
    small, record = shrink(masked, x)
    with torch.no_grad():
        assert torch.allclose(masked(x), small(x), atol=1e-5)
    n = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert n(small) < n(model)
    record.save(tmp_path / "r.json")
    torch.save(small.state_dict(), tmp_path / "small.pt")
    fresh = apply_shrink_record(cls(), ShrinkRecord.load(tmp_path / "r.json"))
    fresh.load_state_dict(torch.load(tmp_path / "small.pt"))  # loads only into the rebuilt structure
    with torch.no_grad():
        assert torch.allclose(fresh.eval()(x), small(x), atol=1e-6)


def test_groups_couple_the_residual_and_shift_across_the_concatenation():
    x = torch.randn(1, 3, 8, 8)
    res = channel_groups(Residual(), x)
    g = res.group_of("stem")
    assert set(g.producers) == {"stem", "b"} and any(c.startswith("add") for c in g.chain)
    assert set(g.followers) == {"bn0", "bnb"} and set(g.consumers) == {"a", "head"}
    assert list(g.consumer_channels["head"][:17]) == [0] * 16 + [1]  # flatten: 16 features per channel
    assert res.group_of("head").blocked == "the channels reach the model output"
    dense = channel_groups(Dense(), x)
    g2 = dense.group_of("l2")
    assert list(g2.consumer_channels["out"]) == [-1] * 14 + list(range(6))  # the last 6 of the 20 inputs
    assert list(g2.follower_channels["bn"]) == [-1] * 14 + list(range(6))
    dw = channel_groups(Depthwise(), x)
    assert dw.group_of("expand").followers == ["bn1", "dw", "bn2"]


def test_unsupported_ops_block_their_groups_with_the_reason():
    class Mixer(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Conv2d(3, 8, 1), nn.Conv2d(8, 4, 1)

        def forward(self, x):
            y = self.a(x)
            y = y.permute(0, 2, 3, 1).permute(0, 3, 1, 2)
            return self.b(y)

    analysis = channel_groups(Mixer(), torch.randn(1, 3, 4, 4))
    g = analysis.group_of("a")
    assert not g.prunable and "permute" in g.blocked
    pruned = prune_channels(Mixer(), ChannelPruneConfig(ratio=0.5), torch.randn(1, 3, 4, 4))
    assert pruned.amct_channel_plan.pruned_channels() == 0
    assert "not prunable" in str(pruned.amct_channel_plan)


def test_criteria_rank_constructed_filters():
    conv = nn.Conv2d(1, 4, 1, bias=False)
    with torch.no_grad():
        conv.weight.copy_(torch.tensor([3.0, -0.5, 2.0, 1.0]).reshape(4, 1, 1, 1))
    model = nn.Sequential(conv, nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 2, 1))
    with torch.no_grad():
        model[1].weight.copy_(torch.tensor([0.1, 2.0, 0.3, 0.05]))
    g = channel_groups(model, torch.randn(1, 1, 2, 2)).group_of("0")
    assert np.argsort(weight_scores(model, g, "l1")).tolist() == [1, 3, 2, 0]
    assert np.argsort(weight_scores(model, g, "bn_slim")).tolist() == [3, 0, 2, 1]
    # FPGM: the filter closest to all others (the geometric median) scores lowest
    points = nn.Sequential(nn.Conv2d(2, 4, 1, bias=False), nn.ReLU(), nn.Conv2d(4, 2, 1))
    with torch.no_grad():
        points[0].weight.copy_(torch.tensor([[4.0, 0], [-2, 0], [1, 3], [1, 0]]).reshape(4, 2, 1, 1))
    gp = channel_groups(points, torch.randn(1, 2, 2, 2)).group_of("0")
    assert np.argsort(weight_scores(points, gp, "fpgm")).tolist()[0] == 3
    pruned = prune_channels(model.eval(), ChannelPruneConfig(ratio=0.5, criterion="l1"), torch.randn(1, 1, 2, 2))
    assert pruned.amct_channel_plan.decisions[0].keep.tolist() == [0, 2]


def test_data_criteria_use_the_inputs_of_the_consumers():
    model = nn.Sequential(nn.Conv2d(1, 4, 1), nn.ReLU(), nn.Conv2d(4, 2, 1)).eval()
    with torch.no_grad():
        model[0].weight.copy_(torch.tensor([1.0, 1.0, 1.0, 1.0]).reshape(4, 1, 1, 1))
        model[0].bias.copy_(torch.tensor([0.0, -10.0, 5.0, -0.5]))  # channel 1 always zero after ReLU
    data = [(torch.rand(4, 1, 3, 3), torch.randint(0, 2, (4,))) for _ in range(2)]
    x = data[0][0]
    apoz = prune_channels(model, ChannelPruneConfig(ratio=0.25, criterion="apoz"), x, data=[d[0] for d in data])
    assert apoz.amct_channel_plan.decisions[0].keep.tolist() == [0, 2, 3]  # channel 1 is always zero
    mean = prune_channels(model, ChannelPruneConfig(ratio=0.5, criterion="mean_activation"), x, data=[d[0] for d in data])
    assert mean.amct_channel_plan.decisions[0].keep.tolist() == [0, 2]
    loss = lambda out, y: F.cross_entropy(out.mean((2, 3)), y)  # noqa: E731
    taylor = prune_channels(model, ChannelPruneConfig(ratio=0.25, criterion="taylor"), x, data=data, loss_fn=loss)
    assert taylor.amct_channel_plan.decisions[0].keep.tolist() == [0, 2, 3]
    with pytest.raises(ValueError, match="taylor"):
        prune_channels(model, ChannelPruneConfig(criterion="taylor"), x, data=[d[0] for d in data])


def test_ascend_optimized_rounds_kept_channels_up_to_16():
    model = nn.Sequential(nn.Conv2d(3, 40, 1), nn.ReLU(), nn.Conv2d(40, 2, 1)).eval()
    x = torch.randn(1, 3, 2, 2)
    plain = prune_channels(model, ChannelPruneConfig(ratio=0.5), x).amct_channel_plan.decisions[0]
    rounded = prune_channels(model, ChannelPruneConfig(ratio=0.5, ascend_optimized=True), x).amct_channel_plan.decisions[0]
    assert len(plain.keep) == 20 and len(rounded.keep) == 32


def test_bn_slim_penalty_and_its_gradient_agree():
    model = nn.Sequential(nn.Conv2d(1, 3, 1), nn.BatchNorm2d(3))
    with torch.no_grad():
        model[1].weight.copy_(torch.tensor([0.5, -2.0, 1.0]))
    assert bn_slim_penalty(model, 0.1).item() == pytest.approx(0.35)
    model[1].weight.grad = torch.zeros(3)
    add_bn_slim_grad(model, 0.1)
    assert model[1].weight.grad.tolist() == pytest.approx([0.1, -0.1, 0.1])


def test_masks_checkpoint_and_shrink_refuses_quantized_layers():
    import amct_torch

    model = randomized(Residual())
    x = torch.randn(2, 3, 8, 8)
    masked = prune_channels(model, ChannelPruneConfig(ratio=0.5), x)
    again = prune_channels(model, ChannelPruneConfig(ratio=0.25), x)  # other masks, same structure
    again.load_state_dict(masked.state_dict())
    with torch.no_grad():
        assert torch.equal(again.eval()(x), masked.eval()(x))
    q = amct_torch.quantize(masked, amct_torch.QuantConfig(activation_calibrator="minmax"), x)
    with pytest.raises(ShrinkError, match="shrink before quantizing"):
        shrink(q, x)


def test_pruned_then_quantized_exports_with_the_pruned_weights_zero(tmp_path):
    import onnxruntime as ort
    from onnx import numpy_helper

    import amct_torch

    model = randomized(Residual())
    x = torch.randn(2, 3, 8, 8)
    masked = prune_channels(model, ChannelPruneConfig(ratio=0.5), x)
    q = amct_torch.quantize(masked, amct_torch.QuantConfig(activation_calibrator="minmax"), x)
    assert q.a.weight_pipeline[0].kind == "channel" and len(q.a.weight_pipeline) == 2  # mask, then quantizer
    amct_torch.calibrate(q, [x], progress=False)
    res = amct_torch.export(q, tmp_path / "pq", x)
    w = {t.name: numpy_helper.to_array(t) for t in res.fake_quant_model.graph.initializer}["a.weight"]
    keep = masked.amct_channel_plan.analysis.group_of("a")
    assert (w.reshape(16, -1) == 0).all(1).sum() == 8 and keep is not None  # half of a's filters are zero
    sess = ort.InferenceSession(str(res.fake_quant))
    with torch.no_grad():
        expected = q(x).numpy()
    assert np.abs(sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0] - expected).max() < 0.05


def test_channel_sensitivity_scan_prunes_one_group_at_a_time():
    from amct_torch.analysis import sensitivity
    from amct_torch.sparsity.channel import channel_pruner

    model = randomized(Residual())
    x = torch.randn(4, 3, 8, 8)
    with torch.no_grad():
        ref = model(x)

    def fidelity(m):
        with torch.no_grad():
            return -float((m.eval()(x) - ref).pow(2).mean())

    result = sensitivity(model, fidelity, layers=["stem", "a"], ratios=(0.25, 0.75), prune=channel_pruner(x))
    values = result.to_dict()["values"]
    assert fidelity(model) == 0.0  # the model itself is untouched
    for layer in ("stem", "a"):  # more channels pruned, further from the original outputs
        assert values[layer][1] < values[layer][0] < 0
    # the stem's group (coupled across the residual add) matters more than the inner conv a
    assert values["stem"][0] < values["a"][0]


def test_flops_target_finds_the_ratio():
    from amct_torch.analysis import count_flops

    model = randomized(Residual())
    x = torch.randn(1, 3, 8, 8)
    masked = prune_channels(model, ChannelPruneConfig(criterion="l2"), x, flops_target=0.5)
    small, _ = shrink(masked, x)
    dense, pruned = count_flops(model, x).total_macs, count_flops(small, x).total_macs
    assert 0.35 < pruned / dense <= 0.5
    assert 0 < masked.amct_channel_plan.config.ratio < 0.95


def test_overrides_give_groups_their_own_ratio_and_a_coupled_group_the_smallest():
    model = randomized(Residual())
    x = torch.randn(2, 3, 8, 8)
    masked = prune_channels(model, ChannelPruneConfig(ratio=0.0), x, overrides={"a": 0.5, "stem": 0.75})
    kept = {d.group.producers[0]: d for d in masked.amct_channel_plan.decisions}
    assert len(kept["a"].keep) == 8 and kept["a"].ratio == 0.5
    # stem is coupled with b by the residual add; b is not listed, so it counts with config.ratio 0
    assert kept["stem"].keep is None and kept["stem"].reason.startswith("keeps all 8 channels (ratio 0")
    both = prune_channels(model, ChannelPruneConfig(ratio=0.0), x, overrides={"stem": 0.75, "b": 0.5})
    stem = next(d for d in both.amct_channel_plan.decisions if "stem" in d.group.producers)
    assert len(stem.keep) == 4 and stem.ratio == 0.5
    assert "per-group ratios" in str(both.amct_channel_plan)
    with pytest.raises(ValueError, match="overrides: 'bna' is not a producer"):
        prune_channels(model, ChannelPruneConfig(ratio=0.0), x, overrides={"bna": 0.5})
    with pytest.raises(ValueError, match="flops_target .* or overrides"):
        prune_channels(model, ChannelPruneConfig(), x, overrides={"a": 0.5}, flops_target=0.5)


def test_given_scores_decide_which_channels_stay():
    model = randomized(Residual())
    x = torch.randn(2, 3, 8, 8)
    scores = np.zeros(16)
    scores[[1, 3, 5, 7, 9, 11, 13, 15]] = 1.0
    masked = prune_channels(model, ChannelPruneConfig(ratio=0.0, criterion="taylor"), x, overrides={"a": 0.5},
                            scores={"a": scores})   # no data needed: the only pruned group has its scores
    a = next(d for d in masked.amct_channel_plan.decisions if d.group.producers == ["a"])
    assert a.keep.tolist() == [1, 3, 5, 7, 9, 11, 13, 15]
    with pytest.raises(ValueError, match=r"scores\['a'\]: got 3 scores; allowed: one per channel of its group \(16\)"):
        prune_channels(model, ChannelPruneConfig(ratio=0.5), x, scores={"a": [1, 2, 3]})

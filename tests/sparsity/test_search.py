"""Automatic channel-pruning search: the MACs budget is met (and confirmed on the shrunk model), the least
Taylor importance per MAC goes first, rounding and bounds hold, and the plan applies exactly."""

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from amct_torch.analysis import count_flops
from amct_torch.config import ChannelPruneConfig, ChannelSearchConfig, ConfigError
from amct_torch.graph.shrink import shrink
from amct_torch import search_channel_pruning
from amct_torch.sparsity.channel import prune_channels
from amct_torch.sparsity.criteria import weight_scores
from amct_torch.sparsity.search import greedy_search, search_space, taylor_sensitivity


class Residual(nn.Module):
    def __init__(self, c=16, mid=32):
        super().__init__()
        self.stem, self.bn0 = nn.Conv2d(3, c, 3, padding=1), nn.BatchNorm2d(c)
        self.a, self.bna = nn.Conv2d(c, mid, 3, padding=1, bias=False), nn.BatchNorm2d(mid)
        self.b, self.bnb = nn.Conv2d(mid, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)
        self.head = nn.Linear(c * 4, 5)

    def forward(self, x):
        x = F.relu(self.bn0(self.stem(x)))
        y = self.bnb(self.b(F.relu(self.bna(self.a(x)))))
        x = F.relu(x + y)
        return self.head(torch.flatten(F.adaptive_avg_pool2d(x, 2), 1))


class Chain(nn.Module):
    """conv1 -> conv2 -> head; conv2 ignores conv1's channels 4..7 (their Taylor importance is zero)."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
        self.head = nn.Linear(8, 4)
        with torch.no_grad():
            self.conv1.weight[4:] *= 10.0      # the largest filters: a magnitude criterion would keep them
            self.conv2.weight[:, 4:] = 0.0     # ... but nothing reads them

    def forward(self, x):
        x = F.relu(self.conv2(F.relu(self.conv1(x))))
        return self.head(x.mean((2, 3)))


def batches(n=2, classes=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(8, 3, 8, 8, generator=g), torch.randint(0, classes, (8,), generator=g)) for _ in range(n)]


@pytest.fixture
def residual():
    torch.manual_seed(0)
    return Residual().eval()


def test_the_budget_is_met_and_the_shrunk_model_confirms_it(residual):
    x = torch.randn(1, 3, 8, 8)
    plan = search_channel_pruning(residual, ChannelSearchConfig(flops_target=0.6), x, data=batches(),
                                  loss_fn=F.cross_entropy)
    dense = count_flops(residual, x).total_macs
    assert plan.info.dense_macs == dense
    assert plan.macs <= 0.6 * dense and plan.macs_fraction <= 0.6
    assert plan.verified_macs == plan.macs                      # the MAC model is exact for conv / BN / linear
    masked = plan.apply(residual, x).eval()
    small, _ = shrink(masked, x)
    assert count_flops(small, x).total_macs == plan.macs
    with torch.no_grad():
        torch.testing.assert_close(small(x), masked(x), rtol=1e-5, atol=1e-5)
    # the masks are exactly the plan's: every pruned producer keeps the plan's channels
    for layer, mask in plan.masks().items():
        kept = masked.get_submodule(layer).weight_pipeline[0].mask.reshape(len(mask), -1).any(1)
        assert kept.tolist() == [bool(v) for v in mask]
    assert "pruned" in str(plan) and "not prunable" in str(plan)


def test_channels_without_taylor_importance_go_first_even_when_their_filters_are_largest():
    torch.manual_seed(0)
    model = Chain().eval()
    x = torch.randn(1, 3, 8, 8)
    records, info = search_space(model, ChannelSearchConfig(), x)
    group = next(r for r in records if r.producers == ["conv1"])
    assert sorted(np.argsort(weight_scores(model, group.group, "l1"))[-4:].tolist()) == [4, 5, 6, 7]  # l1 keeps them
    # conv1's channel costs 3*9*64 MACs in conv1 and 8*9*64 in conv2: 0.55 of the MACs needs 4 channels gone
    plan = search_channel_pruning(model, ChannelSearchConfig(flops_target=0.55), x, data=batches(classes=4),
                                  loss_fn=F.cross_entropy)
    assert plan.keep[group.index].tolist() == [0, 1, 2, 3]
    assert all(len(plan.keep[r.index]) == r.channels for r in plan.records if r.index != group.index)
    assert plan.macs_fraction <= 0.55


def test_the_greedy_step_takes_the_least_importance_per_mac_saved(residual):
    x = torch.randn(1, 3, 8, 8)
    config = ChannelSearchConfig(flops_target=0.9)
    records, info = search_space(residual, config, x)
    assert sorted(r.producers[0] for r in records) == ["a", "stem"]
    for r in records:     # equal importance everywhere: the group saving the most MACs per channel goes first
        r.sensitivity = np.ones(r.channels)
    keep = greedy_search(records, info, config)
    per_channel = {}
    for r in records:
        one_less = {r.index: np.arange(1, r.channels)}
        per_channel[r.producers[0]] = info.dense_macs - info.macs(one_less)
    cheap, dear = sorted(per_channel, key=per_channel.get, reverse=True)
    by_name = {r.producers[0]: r for r in records}
    assert len(keep[by_name[cheap].index]) < by_name[cheap].channels
    assert len(keep[by_name[dear].index]) == by_name[dear].channels
    assert info.macs(keep) <= info.target_macs


def test_ascend_optimized_and_max_prune_ratio_bound_every_group(residual):
    x = torch.randn(1, 3, 8, 8)
    data = batches()
    plan = search_channel_pruning(residual, ChannelSearchConfig(flops_target=0.6, ascend_optimized=True), x, data=data,
                                  loss_fn=F.cross_entropy)
    for name, (k, c) in plan.kept().items():
        assert k == c or k % 16 == 0, (name, k, c)
    assert any(k < c for k, c in plan.kept().values())
    bounded = search_channel_pruning(residual, ChannelSearchConfig(flops_target=0.75, max_prune_ratio=0.25), x,
                                     data=data, loss_fn=F.cross_entropy)
    for name, (k, c) in bounded.kept().items():
        assert c - k <= 0.25 * c, (name, k, c)


def test_an_unreachable_budget_says_how_far_pruning_gets(residual):
    x = torch.randn(1, 3, 8, 8)
    with pytest.raises(ValueError, match=r"flops_target 0.05: .*max_prune_ratio 0.5.* leaves 0\.\d+ of the MACs"):
        search_channel_pruning(residual, ChannelSearchConfig(flops_target=0.05, max_prune_ratio=0.5), x,
                               data=batches(), loss_fn=F.cross_entropy)
    with pytest.raises(ConfigError, match="flops_target"):
        ChannelSearchConfig(flops_target=1.0)


def test_skip_keeps_a_group_whole_and_says_why(residual):
    x = torch.randn(1, 3, 8, 8)
    plan = search_channel_pruning(residual, ChannelSearchConfig(flops_target=0.7), x, data=batches(),
                                  loss_fn=F.cross_entropy, skip=["a"])
    assert "a" not in plan.kept() and plan.info.skipped["a"] == "skipped (a in skip list)"
    assert plan.macs_fraction <= 0.7
    assert "skipped (a in skip list)" in str(plan)


def test_the_written_cfg_reproduces_the_kept_counts(residual, tmp_path):
    from amct_torch.config import read_retrain_cfg

    x = torch.randn(1, 3, 8, 8)
    plan = search_channel_pruning(residual, ChannelSearchConfig(flops_target=0.6), x, data=batches(),
                                  loss_fn=F.cross_entropy)
    plan.write_cfg(tmp_path / "pruned.cfg")
    msg = read_retrain_cfg(tmp_path / "pruned.cfg").message
    ratios = {ov.layer_name: ov.prune_config.filter_pruner.balanced_l2_norm_filter_prune.prune_ratio
              for ov in msg.override_layer_configs}
    assert set(ratios) == set(plan.ratios()) and not msg.HasField("prune_config")
    # prune_channels with those (float32) ratios keeps exactly the plan's counts
    masked = prune_channels(residual, ChannelPruneConfig(ratio=0.0, criterion="l2"), x,
                            overrides={k: float(v) for k, v in ratios.items()})
    kept = {p: (len(d.keep) if d.keep is not None else d.group.channels)
            for d in masked.amct_channel_plan.decisions for p in d.group.producers}
    for name, (k, _) in plan.kept().items():
        assert kept[name] == k


def test_taylor_sensitivity_leaves_the_model_as_it_was(residual):
    x = torch.randn(1, 3, 8, 8)
    residual.train()
    before = {k: v.clone() for k, v in residual.state_dict().items()}
    records, _ = search_space(residual, ChannelSearchConfig(), x)
    taylor_sensitivity(residual, records, batches(), F.cross_entropy, 2)
    assert residual.training and all(p.grad is None for p in residual.parameters())
    assert all(torch.equal(before[k], v) for k, v in residual.state_dict().items())
    assert all(r.sensitivity is not None and len(r.sensitivity) == r.channels for r in records)

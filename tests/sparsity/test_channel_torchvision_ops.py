"""Channel pruning through torchvision's ops, and the FLOPs target met at every target."""

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from amct_torch.analysis import count_flops
from amct_torch.config.prune import ChannelPruneConfig
from amct_torch.graph.groups import channel_groups
from amct_torch.graph.shrink import shrink
from amct_torch.sparsity.channel import prune_channels


class StochasticDepthBlock(nn.Module):
    """An EfficientNet/ConvNeXt-style residual whose branch goes through torchvision's StochasticDepth."""

    def __init__(self):
        super().__init__()
        from torchvision.ops import StochasticDepth

        self.stem, self.bn0 = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.a, self.b = nn.Conv2d(8, 16, 3, padding=1), nn.Conv2d(16, 8, 3, padding=1)
        self.drop = StochasticDepth(0.2, "row")
        self.head = nn.Conv2d(8, 4, 1)

    def forward(self, x):
        x = F.relu(self.bn0(self.stem(x)))
        x = x + self.drop(self.b(F.relu(self.a(x))))
        return self.head(x).mean((2, 3))


def test_stochastic_depth_keeps_the_residual_group_prunable():
    torch.manual_seed(0)
    model = StochasticDepthBlock().eval()
    x = torch.randn(2, 3, 8, 8)
    groups = channel_groups(model, x)
    residual = groups.group_of("stem")
    assert residual.prunable and set(residual.producers) == {"stem", "b"}
    masked = prune_channels(model, ChannelPruneConfig(ratio=0.5), x)
    small, _ = shrink(masked, x)
    assert small.stem.out_channels == small.b.out_channels == 4
    torch.testing.assert_close(small(x), masked(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("channels, target", [(97, 0.6699), (97, 0.7795), (211, 0.3137), (389, 0.4507)])
def test_flops_target_is_never_exceeded(channels, target):
    """The bisection's ratio is rounded up: rounded to nearest, these cases kept one channel too many."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, channels, 1), nn.ReLU(), nn.Conv2d(channels, 4, 1)).eval()
    x = torch.randn(1, 3, 2, 2)
    masked = prune_channels(model, ChannelPruneConfig(criterion="l1"), x, flops_target=target)
    small, _ = shrink(masked, x)
    assert count_flops(small, x).total_macs <= target * count_flops(model, x).total_macs

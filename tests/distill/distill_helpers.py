"""Small models and data for the distillation tests (imported as ``distill_helpers``)."""

import torch
import torch.nn as nn

from amct_torch.zoo.models import BasicBlock

from reference_nets import randomize_bn_


class SmallResNet(nn.Module):
    """conv-bn-relu stem, two basic blocks (the second with a projection shortcut), pool, fc."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(8)
        self.relu = nn.ReLU()
        self.layer1 = BasicBlock(8, 8, 1)
        self.layer2 = BasicBlock(8, 16, 2)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(16, 5)

    def forward(self, x):
        x = self.layer2(self.layer1(self.relu(self.bn1(self.conv1(x)))))
        return self.fc(torch.flatten(self.pool(x), 1))


def small_resnet(seed: int = 0) -> SmallResNet:
    torch.manual_seed(seed)
    return randomize_bn_(SmallResNet(), seed).eval()


def image_batches(n: int = 6, seed: int = 10, size: int = 16) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(size, 3, 8, 8, generator=g) for _ in range(n)]

"""Tiny models built in code, each exercising one capture/fold/swap situation (the fixtures in conftest.py
build them; tests that need the classes themselves import them from here, never from conftest, whose module
name is ambiguous between the test folders)."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


def randomize_bn_(model: nn.Module, seed: int = 0) -> nn.Module:
    """Give every BatchNorm non-trivial running statistics and affine parameters."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                n = m.num_features
                if m.running_mean is not None:
                    m.running_mean.copy_(torch.rand(n, generator=gen) - 0.5)
                    m.running_var.copy_(torch.rand(n, generator=gen) + 0.5)
                if m.affine:
                    m.weight.copy_(torch.rand(n, generator=gen) + 0.5)
                    m.bias.copy_(torch.rand(n, generator=gen) - 0.5)
    return model


class ConvBNResidualNet(nn.Module):
    """conv-bn-relu stem, a residual block (conv-bn-relu-conv-bn + skip add), avg pool, linear head."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(8)
        self.conv3 = nn.Conv2d(8, 8, 3, padding=1, bias=False)
        self.bn3 = nn.BatchNorm2d(8)
        self.pool = nn.AvgPool2d(2)
        self.fc = nn.Linear(8, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn1(self.conv1(x)))
        y = F.relu(self.bn2(self.conv2(x)))
        y = self.bn3(self.conv3(y))
        x = F.relu(x + y)
        x = self.pool(x).mean(dim=(2, 3))
        return self.fc(x)


class DataDependentNet(nn.Module):
    """Branches on a tensor *value*: neither torch.fx nor torch.export can capture it."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.fc = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.bn(self.conv(x)).mean(dim=(2, 3))
        if x.sum() > 0:
            return self.fc(x)
        return -self.fc(x)


class ShapeDependentNet(nn.Module):
    """Branches on a tensor *shape*: torch.fx cannot trace it, torch.export can (shapes are concrete)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.fc = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.bn(self.conv(x))
        if x.shape[-1] > 4:
            x = F.avg_pool2d(x, 2)
        return self.fc(x.mean(dim=(2, 3)))


class ReusedModuleNet(nn.Module):
    """Calls ``fc1`` twice in one forward."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(8, 8)
        self.fc2 = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.fc1(x))
        x = F.relu(self.fc1(x))
        return self.fc2(x)


class SharedModuleNet(nn.Module):
    """Registers one Linear under two names, ``encoder`` and ``decoder`` (one call each)."""

    def __init__(self) -> None:
        super().__init__()
        self.encoder = nn.Linear(8, 8)
        self.decoder = self.encoder
        self.head = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.encoder(x))
        x = F.relu(self.decoder(x))
        return self.head(x)

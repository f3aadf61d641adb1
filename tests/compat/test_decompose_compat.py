"""AMCT's auto_decomposition / decompose_network (amct_torch.tensor_decompose): in place, the changes dict,
the info file (atomic, checked paths), structure-only rebuild + state_dict load, wrapped models."""

from __future__ import annotations

import json
import os

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from amct_torch.tensor_decompose import auto_decomposition, decompose_network


class LowRankNet(nn.Module):
    """conv1: a 64x64x3x3 conv whose spatial matrix has rank 4 (EVBMF finds it; the split at the rounded
    rank is then exact); conv2: 5x5 with a near rank-2 spatial matrix; a depthwise conv; a 1x1 conv; fc."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(64, 64, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(64)
        self.dw = nn.Conv2d(64, 64, 3, padding=1, groups=64)
        self.conv2 = nn.Conv2d(64, 32, 5, padding=2, bias=False)
        self.pw = nn.Conv2d(32, 32, 1)
        self.fc = nn.Linear(32, 10)
        g = torch.Generator().manual_seed(0)
        with torch.no_grad():
            for conv, r, noise in ((self.conv1, 4, 0.0), (self.conv2, 2, 1e-4)):
                O, I, kh, kw = conv.weight.shape
                m = torch.randn(I * kh, r, generator=g) @ torch.randn(r, O * kw, generator=g) / 10
                m += noise * torch.randn(I * kh, O * kw, generator=g)
                conv.weight.copy_(m.reshape(I, kh, O, kw).permute(2, 0, 1, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn1(self.conv1(x)))
        x = self.pw(self.conv2(self.dw(x)))
        return self.fc(x.mean(dim=(2, 3)))


@pytest.fixture
def model() -> LowRankNet:
    torch.manual_seed(0)
    return LowRankNet().eval()


def test_auto_decomposition_in_place_with_amct_changes(model: LowRankNet, tmp_path) -> None:
    x = torch.randn(2, 64, 8, 8)
    with torch.no_grad():
        ref = model(x)
    conv1 = model.conv1
    path = tmp_path / "tmp" / "decompose_info.json"
    out, changes = auto_decomposition(model, str(path))
    assert out is model and model.conv1 is not conv1 and isinstance(model.conv1, nn.Sequential)
    assert changes == {"conv1": ["conv1.0", "conv1.1"], "conv2": ["conv2.0", "conv2.1"]}
    # AMCT's doc example shape: 64x64x3x3 -> r x 64 x 3 x 1 + 64 x r x 1 x 3 (here r = EVBMF's 4 rounded to 16)
    assert [tuple(m.weight.shape) for m in model.conv1] == [(16, 64, 3, 1), (64, 16, 1, 3)]
    assert [tuple(m.weight.shape) for m in model.conv2] == [(16, 64, 5, 1), (32, 16, 1, 5)]
    with torch.no_grad():
        torch.testing.assert_close(model(x), ref, rtol=1e-2, atol=1e-2)  # conv2 drops its noise
    plan = model.amct_decompose_plan
    assert plan["dw"].reason == "groups=64 (depthwise)" and plan["pw"].reason == "kernel 1x1"
    assert plan["conv1"].selection == "evbmf 4 -> 16 (x16)"
    assert "fc" not in changes  # AMCT decomposes convolutions only
    info = json.loads(path.read_text())
    assert set(info["layers"]) == {"conv1", "conv2"}
    assert sorted(os.listdir(path.parent)) == ["decompose_info.json"]
    again, none = auto_decomposition(model)  # nothing eligible is left: 3x1 / 1x3 kernels
    assert again is model and none == {}


def test_decompose_network_then_load_state_dict(model: LowRankNet, tmp_path) -> None:
    path = tmp_path / "info.json"
    low, changes = auto_decomposition(model, path)
    torch.save(low.state_dict(), tmp_path / "low.pth")
    torch.manual_seed(5)
    fresh = LowRankNet().eval()
    out, rebuilt = decompose_network(fresh, path)
    assert out is fresh and rebuilt == changes
    fresh.load_state_dict(torch.load(tmp_path / "low.pth"))
    x = torch.randn(1, 64, 6, 6)
    with torch.no_grad():
        torch.testing.assert_close(fresh(x), low(x), rtol=0, atol=0)


def test_data_parallel_is_unwrapped_ddp_refused(model: LowRankNet) -> None:
    dp = nn.DataParallel(model)
    out, changes = auto_decomposition(dp)
    assert out is dp and isinstance(dp.module.conv1, nn.Sequential) and "conv1" in changes
    ddp = nn.parallel.DistributedDataParallel.__new__(nn.parallel.DistributedDataParallel)
    nn.Module.__init__(ddp)
    ddp.module = LowRankNet()
    with pytest.raises(TypeError, match="DistributedDataParallel.*decompose the plain model first"):
        auto_decomposition(ddp)
    with pytest.raises(TypeError, match="allowed: a torch.nn.Module"):
        auto_decomposition("model")


def test_bad_paths_leave_the_model_alone(model: LowRankNet, tmp_path) -> None:
    with pytest.raises(IsADirectoryError, match="is a directory; give a file path"):
        auto_decomposition(model, tmp_path)
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(NotADirectoryError, match="is a file, not a folder"):
        auto_decomposition(model, blocker / "info.json")
    assert isinstance(model.conv1, nn.Conv2d)  # untouched
    with pytest.raises(FileNotFoundError, match="write it with auto_decomposition"):
        decompose_network(model, tmp_path / "missing.json")
    with pytest.raises(TypeError, match="decompose_info_path: got None"):
        decompose_network(model, None)


def test_failed_info_write_changes_nothing(model: LowRankNet, tmp_path, monkeypatch) -> None:
    def broken_replace(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", broken_replace)
    with pytest.raises(OSError, match="disk full"):
        auto_decomposition(model, tmp_path / "info.json")
    monkeypatch.undo()
    assert isinstance(model.conv1, nn.Conv2d) and os.listdir(tmp_path) == []


def test_info_for_another_model_is_refused(model: LowRankNet, tmp_path) -> None:
    path = tmp_path / "info.json"
    auto_decomposition(model, path)

    class Other(LowRankNet):
        def __init__(self) -> None:
            super().__init__()
            self.conv2 = nn.Conv2d(64, 16, 5, padding=2, bias=False)

    other = Other()
    with pytest.raises(ValueError, match=r"'conv2': shape mismatch \(info vs model: out_channels: 32 vs 16\)"):
        decompose_network(other, path)
    assert isinstance(other.conv1, nn.Conv2d)  # all or nothing

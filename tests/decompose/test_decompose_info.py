"""The decomposition info file: round trip onto a fresh model (strict state_dict load, equal outputs),
atomic writes, and errors that name the layer when the info does not fit."""

from __future__ import annotations

import json
import os

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from amct_torch.config import Targeting
from amct_torch.config.decompose import DecomposeConfig
from amct_torch.decompose import (apply_decomposition_info, decompose, load_decomposition_info,
                                  save_decomposition_info)


class Net(nn.Module):
    def __init__(self, width: int = 16) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, width, 3, padding=1, padding_mode="reflect")
        self.block = nn.Sequential(nn.Conv2d(width, width, 3, stride=2, padding=1, bias=False), nn.ReLU())
        self.conv3 = nn.Conv2d(width, width, 3, padding="same")
        self.fc = nn.Linear(width, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.conv1(x))
        x = F.relu(self.conv3(self.block(x)))
        return self.fc(x.mean(dim=(2, 3)))


def _fresh(seed: int = 1, width: int = 16) -> Net:
    torch.manual_seed(seed)  # other weights than the decomposed model's: the state_dict must bring them
    return Net(width).eval()


@pytest.fixture
def decomposed(tmp_path):
    torch.manual_seed(0)
    model = Net().eval()
    cfg = DecomposeConfig(rank_selection="fixed", rank=6, linear=True)
    low, plan = decompose(model, Targeting(cfg, module_name={"conv3": cfg.replace(conv_method="tucker2", rank=(8, 4))}),
                          torch.randn(1, 3, 8, 8), ranks={"fc": 4})
    path = tmp_path / "info.json"
    save_decomposition_info(plan, path)
    return low, plan, path


def test_round_trip_rebuilds_the_structure(decomposed, tmp_path) -> None:
    low, plan, path = decomposed
    assert set(plan.decomposed()) == {"conv1", "block.0", "conv3", "fc"}
    torch.save(low.state_dict(), tmp_path / "low.pth")
    fresh = _fresh()
    rebuilt, changes = apply_decomposition_info(fresh, path)
    assert isinstance(fresh.conv1, nn.Conv2d)  # not in place by default
    assert changes == plan.changes() == {"conv1": ["conv1.0", "conv1.1"], "block.0": ["block.0.0", "block.0.1"],
                                         "conv3": ["conv3.0", "conv3.1", "conv3.2"], "fc": ["fc.0", "fc.1"]}
    rebuilt.load_state_dict(torch.load(tmp_path / "low.pth"))  # strict
    x = torch.randn(2, 3, 8, 8)
    torch.testing.assert_close(rebuilt(x), low(x), rtol=0, atol=0)
    assert rebuilt.conv1[0].padding_mode == "reflect" and rebuilt.conv3[1].padding == "same"
    same, _ = apply_decomposition_info(fresh, plan.info(), inplace=True)
    assert same is fresh and isinstance(fresh.block[0], nn.Sequential)


def test_info_file_content(decomposed) -> None:
    _, plan, path = decomposed
    data = json.loads(path.read_text())
    assert data == plan.info()
    entry = data["layers"]["block.0"]
    assert entry["type"] == "Conv2d" and entry["method"] == "spatial" and entry["rank"] == 6
    assert entry["args"] == {"in_channels": 16, "out_channels": 16, "kernel_size": [3, 3], "stride": [2, 2],
                             "padding": [1, 1], "dilation": [1, 1], "groups": 1, "bias": False, "padding_mode": "zeros"}
    assert entry["factors"][0] == {"name": "block.0.0", "type": "Conv2d", "args": {
        "in_channels": 16, "out_channels": 6, "kernel_size": [3, 1], "stride": [2, 1], "padding": [1, 0],
        "dilation": [1, 1], "groups": 1, "bias": False, "padding_mode": "zeros"}}
    assert data["layers"]["conv3"]["rank"] == [8, 4]
    assert data["layers"]["fc"]["factors"][1]["args"] == {"in_features": 4, "out_features": 10, "bias": True}
    assert '"kernel_size": [3, 1]' in path.read_text()  # short lists on one line


def test_info_that_does_not_fit_names_the_layers(decomposed) -> None:
    _, plan, path = decomposed
    other = _fresh(width=8)
    with pytest.raises(ValueError, match=r"'conv1': shape mismatch \(info vs model: out_channels: 16 vs 8\).*"
                                         r"Apply it to the undecomposed model"):
        apply_decomposition_info(other, path)
    assert isinstance(other.conv1, nn.Conv2d)  # nothing changed
    info = plan.info()
    info["layers"]["head"] = info["layers"].pop("fc")
    for f in info["layers"]["head"]["factors"]:
        f["name"] = f["name"].replace("fc", "head")
    with pytest.raises(ValueError, match=r"'head': no such module in the model"):
        apply_decomposition_info(_fresh(), info)
    done, _ = apply_decomposition_info(_fresh(), path)
    with pytest.raises(ValueError, match=r"'conv1': already decomposed"):
        apply_decomposition_info(done, path)
    plain = _fresh()
    plain.fc = nn.Conv2d(16, 10, 1)
    with pytest.raises(ValueError, match=r"'fc': the info says Linear, the model has Conv2d"):
        apply_decomposition_info(plain, path)


def test_bad_info_files(tmp_path, decomposed) -> None:
    _, plan, _ = decomposed
    with pytest.raises(FileNotFoundError, match="not found"):
        load_decomposition_info(tmp_path / "missing.json")
    bad = tmp_path / "bad.json"
    bad.write_text("{\"format\": ")
    with pytest.raises(ValueError, match=r"not valid JSON \(line 1"):
        load_decomposition_info(bad)
    bad.write_text(json.dumps({"format": "something else"}))
    with pytest.raises(ValueError, match="'format' is 'something else'"):
        load_decomposition_info(bad)
    info = plan.info()
    info["layers"]["conv1"]["factors"][0]["args"]["out_channels"] = 7
    with pytest.raises(ValueError, match=r"layer 'conv1': the factors do not match method 'spatial' at rank 6"):
        save_decomposition_info(info, tmp_path / "edited.json")
    assert not (tmp_path / "edited.json").exists()


def test_writes_are_atomic(tmp_path, decomposed, monkeypatch) -> None:
    _, plan, path = decomposed
    good = path.read_text()
    with pytest.raises(IsADirectoryError, match="is a directory"):
        save_decomposition_info(plan, tmp_path)

    def broken_replace(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", broken_replace)
    with pytest.raises(OSError, match="disk full"):
        save_decomposition_info(plan, path)
    monkeypatch.undo()
    assert path.read_text() == good  # the old file is untouched
    assert sorted(p.name for p in tmp_path.iterdir()) == ["info.json"]  # no temp file left

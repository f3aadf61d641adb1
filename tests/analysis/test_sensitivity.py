"""Sensitivity analysis: metric versus ratio per layer, the model restored after every trial, custom and
registered pruners, the table, the dict round trip and the plot."""

import copy
import importlib

import pytest
import torch
import torch.nn as nn

from amct_torch.analysis import SensitivityResult, prunable_layers, register_pruner, sensitivity
from amct_torch.config import MagnitudeConfig
from amct_torch.sparsity import magnitude_mask, prune_magnitude

sens_mod = importlib.import_module("amct_torch.analysis.sensitivity_scan")


@pytest.fixture
def model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 12), nn.ReLU(), nn.Linear(12, 12), nn.ReLU(), nn.Linear(12, 3)).eval()


@pytest.fixture
def x():
    return torch.randn(16, 6, generator=torch.Generator().manual_seed(1))


def mse_to(reference_model, x):
    with torch.no_grad():
        target = reference_model(x)

    def evaluate(m):
        with torch.no_grad():
            return float(((m(x) - target) ** 2).mean())
    return evaluate


def test_magnitude_sensitivity_matches_pruning_each_layer_by_hand_and_restores_the_model(model, x):
    evaluate = mse_to(model, x)
    state = copy.deepcopy(model.state_dict())
    ratios = (0.0, 0.25, 0.5, 0.75)
    result = sensitivity(model, evaluate, ratios=ratios, metric="mse", higher_is_better=False)
    assert result.layers == ["0", "2", "4"] == prunable_layers(model)
    assert result.baseline == 0.0
    for name in result.layers:
        assert result.values[name][0] == 0.0  # ratio 0 prunes nothing
        for r, v in zip(ratios, result.values[name]):
            by_hand = copy.deepcopy(model)
            layer = by_hand.get_submodule(name)
            with torch.no_grad():
                layer.weight.mul_(magnitude_mask(layer.weight, r))
            assert v == pytest.approx(evaluate(by_hand))
        assert list(result.values[name]) == sorted(result.values[name])  # more pruning, more error here
    for key, value in model.state_dict().items():
        assert torch.equal(value, state[key]), key  # every trial undone
    assert all(not hasattr(m, "weight_pipeline") for m in model.modules())


def test_the_table_and_the_dict_round_trip(model, x):
    result = sensitivity(model, mse_to(model, x), layers=["2", "4"], ratios=(0.3, 0.6), metric="mse",
                         higher_is_better=False)
    lines = result.table().splitlines()
    assert lines[0] == "sensitivity (magnitude): mse, baseline 0"
    assert lines[1].split() == ["layer", "0.3", "0.6"]
    assert [line.split()[0] for line in lines[3:]] == ["2", "4"]
    again = SensitivityResult.from_dict(result.to_dict())
    assert again.to_dict() == result.to_dict() and again.layers == ["2", "4"]


def test_max_ratio_and_drop_respect_the_metric_direction():
    acc = SensitivityResult((0.2, 0.4, 0.6), {"a": (0.9, 0.85, 0.5), "b": (0.7, 0.9, 0.9)}, baseline=0.9,
                            metric="acc")
    assert acc.drop("a") == pytest.approx((0.0, 0.05, 0.4))
    assert acc.max_ratio(0.06) == {"a": 0.4, "b": 0.0}  # b: the first ratio already loses 0.2
    loss = SensitivityResult((0.2, 0.4), {"a": (1.0, 1.5)}, baseline=1.0, metric="loss", higher_is_better=False)
    assert loss.drop("a") == pytest.approx((0.0, 0.5))
    assert loss.max_ratio(0.1) == {"a": 0.2}
    with pytest.raises(KeyError, match="layers: a"):
        loss.drop("b")


def test_a_custom_pruner_gets_a_fresh_copy_for_every_trial(model, x):
    calls = []

    def shrink(m, name, ratio):
        calls.append((name, ratio))
        layer = m.get_submodule(name)
        with torch.no_grad():
            layer.weight.mul_(1 - ratio)  # would accumulate if trials shared a model
        m.extra_marker = True  # any change to the copy must not leak
        return m

    evaluate = mse_to(model, x)
    result = sensitivity(model, evaluate, layers=["4"], ratios=(0.5, 0.5), prune=shrink)
    assert calls == [("4", 0.5), ("4", 0.5)]
    assert result.values["4"][0] == result.values["4"][1] > 0
    assert result.mode == "shrink"
    assert not hasattr(model, "extra_marker")


def test_registered_pruners_are_selected_by_name(model, x, monkeypatch):
    monkeypatch.setattr(sens_mod, "_PRUNERS", dict(sens_mod._PRUNERS))
    monkeypatch.setattr(sens_mod, "_LAYERS", dict(sens_mod._LAYERS))

    @register_pruner("zero", layers=lambda m: ["0", "2"])  # e.g. channel pruning: producers of prunable groups
    def zero(m, name, ratio):
        with torch.no_grad():
            m.get_submodule(name).weight.zero_()
        return m

    result = sensitivity(model, mse_to(model, x), ratios=(0.5,), prune="zero")
    assert result.mode == "zero" and result.layers == ["0", "2"] and result.values["0"][0] > 0
    assert sensitivity(model, mse_to(model, x), layers=["4"], ratios=(0.5,), prune="zero").layers == ["4"]
    with pytest.raises(ValueError, match="'magnitude', 'zero'"):
        sensitivity(model, mse_to(model, x), prune="nope")
    with pytest.raises(ValueError, match="other than 'magnitude'"):
        register_pruner("magnitude", zero)


def test_masked_layers_count_their_existing_zeros(model, x):
    pruned = prune_magnitude(model, MagnitudeConfig(sparsity=0.5, schedule="oneshot"), x)
    evaluate = mse_to(pruned, x)
    result = sensitivity(pruned, evaluate, layers=["2"], ratios=(0.25, 0.5, 0.75))
    assert result.values["2"][:2] == (0.0, 0.0)  # the mask already prunes half
    assert result.values["2"][2] > 0


def test_bad_arguments_are_reported_before_any_evaluation(model, x):
    calls = []

    def evaluate(m):
        calls.append(1)
        return 0.0

    with pytest.raises(ValueError, match="ascending values in \\[0, 1\\)"):
        sensitivity(model, evaluate, ratios=(0.5, 1.0))
    with pytest.raises(KeyError, match="prunable layers: 0, 2, 4"):
        sensitivity(model, evaluate, layers=["fc"])
    with pytest.raises(ValueError, match="has no weight"):
        sensitivity(model, evaluate, layers=["1"])
    assert calls == []


def test_plot_draws_one_line_per_layer_and_saves(model, x, tmp_path):
    pytest.importorskip("matplotlib")
    result = sensitivity(model, mse_to(model, x), ratios=(0.2, 0.6), metric="mse", higher_is_better=False)
    fig = result.plot(tmp_path / "plots" / "sens.png")
    ax = fig.axes[0]
    assert [line.get_label() for line in ax.get_lines()] == ["0", "2", "4", "unpruned"]
    assert list(ax.get_lines()[0].get_xdata()) == [0.2, 0.6]
    assert ax.get_ylabel() == "mse"
    assert (tmp_path / "plots" / "sens.png").stat().st_size > 1000

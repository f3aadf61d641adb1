"""Accuracy-based automatic calibration: a model with one planted sensitive layer must get exactly that
layer back in float (or at the fallback precision), ranked worst, with the search recorded and written."""

import json
import math

import pytest
import torch
import torch.nn as nn

from amct_torch.config import ConfigError, PerTensor, QuantConfig, Targeting
from amct_torch.config.amct_json import read_quant_json
from amct_torch.config.auto_calibration import AutoCalibrationConfig
from amct_torch.nn import CompressedLayer
from amct_torch.quant import CalibrationError, calibrate, quantize
from amct_torch.quant.auto_calibration import (FILE_NAMES, auto_calibrate, layer_sensitivity, with_fallback)


class MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(16, 32)
        self.fc2 = nn.Linear(32, 32)
        self.fc3 = nn.Linear(32, 10)
        self.relu = nn.ReLU()

    def forward(self, x):
        return self.fc3(self.relu(self.fc2(self.relu(self.fc1(x)))))


def planted() -> MLP:
    """fc2 carries a weight of 1000 that multiplies a hidden unit which is always 0 and feeds an output unit
    nothing reads: the float model does not notice it, but a per-tensor weight scale of 1000/127 rounds every
    other weight of fc2 to zero. Per output channel only fc2's unused unit 0 suffers."""
    torch.manual_seed(0)
    m = MLP()
    with torch.no_grad():
        m.fc1.weight[0].zero_()
        m.fc1.bias[0] = -1.0          # hidden unit 0 of fc1 is always 0 after the ReLU
        m.fc2.weight[0, 0] = 1000.0   # the outlier multiplies it
        m.fc3.weight[:, 0] = 0.0      # fc2's unit 0 feeds nothing
    return m.eval()


BASE = QuantConfig(weight_granularity=PerTensor(), batch_num=2)


@pytest.fixture(scope="module")
def setup():
    model = planted()
    g = torch.Generator().manual_seed(1)
    calib = [torch.randn(32, 16, generator=g) for _ in range(2)]
    val = torch.randn(512, 16, generator=g)
    with torch.no_grad():
        labels = model(val).argmax(-1)

    def evaluate(m):
        with torch.no_grad():
            return (m(val).argmax(-1) == labels).float().mean().item()   # agreement with the fp32 labels

    return model, calib, evaluate


def test_binary_search_keeps_exactly_the_planted_layer_in_float(setup, capsys):
    model, calib, evaluate = setup
    before = {k: v.clone() for k, v in model.state_dict().items()}
    r = auto_calibrate(model, evaluate, calib, calib[0], config=BASE, max_drop=0.05)
    assert r.success and r.status == "fallback"
    assert r.fallback_layers == ("fc2",)
    assert r.ranking[0].name == "fc2" and r.ranking[0].rank == 1 and r.ranking[0].layer_type == "Linear"
    assert [x.score for x in r.ranking] == sorted(x.score for x in r.ranking)
    assert r.layers == ("fc1", "fc2", "fc3")
    assert r.fp_metric == 1.0 and r.quant_metric < 0.9 and r.final_metric >= 0.95
    # history: the fully quantized model, then bisection over the count (2 of 3, then 1 of 3)
    assert [t.fallback_layers for t in r.history] == [(), tuple(x.name for x in r.ranking[:2]), ("fc2",)]
    assert [t.ok for t in r.history] == [False, True, True] and [t.index for t in r.history] == [0, 1, 2]
    assert all(t.seconds > 0 for t in r.history) and r.seconds >= sum(t.seconds for t in r.history)
    assert r.history[0].loss == pytest.approx(1.0 - r.quant_metric)
    # the final config and model
    assert r.targeting.skip == ("fc2",) and r.targeting.default == BASE
    assert r.layer_configs == {"fc1": BASE, "fc2": None, "fc3": BASE}
    assert not isinstance(r.model.fc2, CompressedLayer) and isinstance(r.model.fc1, CompressedLayer)
    assert "1 of 3 layers kept in float: fc2" in capsys.readouterr().out
    # the user's model is untouched
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())


def test_final_model_is_quantize_with_the_final_targeting(setup):
    model, calib, evaluate = setup
    r = auto_calibrate(model, evaluate, calib, calib[0], config=BASE, max_drop=0.05, progress=False)
    again = calibrate(quantize(model, r.targeting, calib[0], quantize_outputs="none"), calib, progress=False)
    x = torch.randn(8, 16)
    with torch.no_grad():
        assert torch.equal(r.model(x), again(x))
    assert evaluate(r.model) == r.final_metric


def test_greedy_sqnr_with_higher_precision_fallback(setup):
    model, calib, evaluate = setup
    fallback = QuantConfig(batch_num=2)   # INT8 per output channel: only fc2's unused unit loses precision
    r = auto_calibrate(model, evaluate, calib, calib[0], config=BASE, max_drop=0.05, progress=False,
                       search=AutoCalibrationConfig(sensitivity="sqnr", strategy="greedy", fallback=fallback))
    assert r.status == "fallback" and r.fallback_layers == ("fc2",)
    assert r.ranking[0].name == "fc2"
    assert [t.fallback_layers for t in r.history] == [(), ("fc2",)]       # greedy: one more layer at a time
    assert r.targeting.module_name == {"fc2": fallback} and r.targeting.skip == ()
    assert isinstance(r.model.fc2, CompressedLayer) and r.model.fc2.quant_config == fallback
    assert r.layer_configs["fc2"] == fallback
    assert "fallback W8 per_channel" in r.table()


def test_already_good_enough_needs_no_search(setup):
    model, calib, evaluate = setup
    r = auto_calibrate(model, evaluate, calib, calib[0], config=BASE, metric_ok=lambda fp, q: q > 0.3, progress=False)
    assert r.status == "quantized" and r.fallback_layers == () and len(r.history) == 1
    assert len(r.ranking) == 3 and r.targeting.skip == ()       # the ranking is reported all the same


def test_only_all_float_would_do_means_no_model(setup, tmp_path):
    model, calib, _ = setup
    x = torch.randn(64, 16)
    with torch.no_grad():
        ref = model(x)
    exact = lambda m: -float((m(x) - ref).abs().max())  # noqa: E731  (0 only for the float model)
    with torch.no_grad():
        r = auto_calibrate(model, exact, calib, calib[0], config=BASE, metric_ok=lambda fp, q: q >= fp, progress=False)
    assert not r.success and r.status == "no_model" and r.model is None and r.targeting is None
    assert "all 3 layers in float" in r.message and r.fallback_layers == ()
    assert [len(t.fallback_layers) for t in r.history] == [0, 2] and not any(t.ok for t in r.history)
    written = r.write(tmp_path)
    assert set(written) == {"ranking", "history"}
    history = json.loads((tmp_path / FILE_NAMES["history"]).read_text())
    assert history["status"] == "no_model" and history["final_metric"] is None and len(history["trials"]) == 2
    assert not (tmp_path / FILE_NAMES["final_config"]).exists()

    # a higher-precision fallback is tried with every layer at it before giving up
    with torch.no_grad():
        r = auto_calibrate(model, exact, calib, calib[0], config=BASE, metric_ok=lambda fp, q: (q >= fp, fp - q),
                           fallback=QuantConfig(batch_num=2), progress=False)
    assert r.status == "failed" and r.model is None and "even with all 3 layers" in r.message
    assert [len(t.fallback_layers) for t in r.history] == [0, 2, 3]


def test_criterion_that_rejects_the_float_model_is_an_error(setup):
    model, calib, evaluate = setup
    with pytest.raises(ValueError, match="rejects the float model itself"):
        auto_calibrate(model, evaluate, calib, calib[0], config=BASE, metric_ok=lambda fp, q: False, progress=False)


def test_write_files(setup, tmp_path):
    model, calib, evaluate = setup
    r = auto_calibrate(model, evaluate, calib, calib[0], config=BASE, max_drop=0.05, progress=False)
    written = r.write(tmp_path / "out")
    assert set(written) == {"ranking", "history", "final_config", "final_targeting"}
    ranking = json.loads(written["ranking"].read_text())
    assert ranking["sensitivity"] == "cosine" and ranking["layers"][0] == {
        "rank": 1, "layer": "fc2", "type": "Linear", "score": r.ranking[0].score}
    history = json.loads(written["history"].read_text())
    assert history["fallback_layers"] == ["fc2"] and history["status"] == "fallback"
    assert [t["fallback_layers"] for t in history["trials"]] == [list(t.fallback_layers) for t in r.history]
    assert history["settings"]["max_drop"] == 0.05 and history["fp32_metric"] == 1.0
    settings, layers = read_quant_json(written["final_config"])       # AMCT's PTQ JSON, readable by quantize_model
    assert layers["fc2"] is None and layers["fc1"] == BASE and settings.batch_num == 2
    assert Targeting.from_yaml(written["final_targeting"].read_text(), QuantConfig) == r.targeting
    assert not list((tmp_path / "out").glob("*.tmp"))
    json.dumps(r.to_dict())                                            # everything JSON-ready
    text = r.table()
    assert "fc2" in text and "float" in text and "search history" in text


def test_layer_sensitivity_is_the_wrapper_against_the_float_layer_on_float_inputs(setup):
    model, calib, _ = setup
    q = calibrate(quantize(model, BASE, calib[0], quantize_outputs="none"), calib, progress=False)
    cos = {r.name: r.score for r in layer_sensitivity(model, q, calib[:1], calib[0], num_batches=1)}
    sqnr = {r.name: r.score for r in layer_sensitivity(model, q, calib[:1], calib[0], sensitivity="sqnr")}
    with torch.no_grad():
        h = model.relu(model.fc1(calib[0]))        # fc2's float input
        fp, qo = model.fc2(h), q.fc2(h)
    a, b = fp.double().flatten(), qo.double().flatten()
    assert cos["fc2"] == pytest.approx(float(a @ b / (a.norm() * b.norm())), rel=1e-9)
    assert sqnr["fc2"] == pytest.approx(10 * math.log10(float(a @ a) / float((a - b) @ (a - b))), rel=1e-9)
    assert min(cos, key=cos.get) == "fc2" and min(sqnr, key=sqnr.get) == "fc2"


def test_with_fallback_targeting():
    base = Targeting(BASE, module_name={"fc1": QuantConfig()}, skip=["head"])
    t = with_fallback(base, ["fc2", "fc3"])
    assert t.skip == ("head", "fc2", "fc3") and t.module_name == {"fc1": QuantConfig()} and t.default == BASE
    hi = QuantConfig(weight_bits=16)
    t = with_fallback(base, ["fc1"], hi)
    assert t.module_name == {"fc1": hi} and t.skip == ("head",)
    assert with_fallback(base, []) is base


def test_bad_settings_and_data(setup):
    model, calib, evaluate = setup
    with pytest.raises(ConfigError, match="sensitivity: got 'kl'; allowed: one of 'cosine', 'sqnr'"):
        auto_calibrate(model, evaluate, calib, calib[0], sensitivity="kl")
    with pytest.raises(ConfigError, match="strategy: got 'random'; allowed: one of 'binary', 'greedy'"):
        auto_calibrate(model, evaluate, calib, calib[0], strategy="random")
    with pytest.raises(ConfigError, match="auto_calibrate tolerance.*max_drop"):
        auto_calibrate(model, evaluate, calib, calib[0], tolerance=0.1)
    with pytest.raises(ConfigError, match="max_drop"):
        AutoCalibrationConfig(max_drop=-1)
    with pytest.raises(CalibrationError, match=r"ran no batch through the model"):
        auto_calibrate(model, evaluate, lambda m: None, calib[0], config=BASE, progress=False)
    with pytest.raises(CalibrationError, match=r"ran 1 batch\(es\), fewer than the config's batch_num \(2\)"):
        auto_calibrate(model, evaluate, lambda m: m(calib[0]), calib[0], config=BASE, progress=False)
    with pytest.raises(CalibrationError, match="calibration ran 1 batches"):
        auto_calibrate(model, evaluate, calib[:1], calib[0], config=BASE, progress=False)
    with pytest.raises(TypeError, match="with max_drop the metric must be a number"):
        auto_calibrate(model, lambda m: "good", calib, calib[0], config=BASE, progress=False)

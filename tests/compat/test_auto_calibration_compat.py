"""AMCT's accuracy_based_auto_calibration and its evaluator, as AMCT's sample script uses them (amct.md §1.1)."""

import json

import numpy as np
import onnxruntime as ort
import pytest
import torch
import torch.nn as nn

import amct_torch as amct
from amct_torch.common.auto_calibration import AutoCalibrationEvaluatorBase
from amct_torch.compat import auto_calibration as compat
from amct_torch.compat.auto_calibration import FILE_NAMES, accuracy_based_auto_calibration
from amct_torch.config import ConfigError, read_record
from amct_torch.quant import CalibrationError


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 8, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
        self.relu = nn.ReLU()
        self.pool = nn.MaxPool2d(2)
        self.fc1 = nn.Linear(128, 16)
        self.fc2 = nn.Linear(16, 4)

    def forward(self, x):
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.relu(self.conv2(x))
        x = torch.flatten(self.pool(x), 1)
        return self.fc2(self.relu(self.fc1(x)))


@pytest.fixture(scope="module")
def model():
    """fc1 (per-tensor weights, AMCT's default for Linear) holds a 1000 that multiplies a feature that is always
    0 (conv2's channel 0 never fires) in a row whose output fc2 ignores: harmless in float, fatal quantized."""
    torch.manual_seed(0)
    m = Net()
    with torch.no_grad():
        m.bn1.running_mean.uniform_(-0.5, 0.5)
        m.bn1.running_var.uniform_(0.5, 2.0)
        m.conv2.weight[0].zero_()
        m.conv2.bias[0] = -1.0
        m.fc1.weight[0, 0] = 1000.0
        m.fc2.weight.mul_(10.0)
        m.fc2.weight[:, 0] = 0.0
    m.eval()
    with torch.no_grad():   # centre the logits, so that the fp32 labels spread over the classes
        m.fc2.bias -= m(torch.cat(batches(4, seed=3))).mean(0)
    return m


def batches(n, seed):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(16, 1, 8, 8, generator=g) for _ in range(n)]


class Evaluator(AutoCalibrationEvaluatorBase):
    """As in AMCT's mobilenet_v2 sample: calibration runs batch_num batches, metric_eval a loss in percent."""

    def __init__(self, model, target_loss=5.0, batch_num=2):
        super().__init__()
        self.target_loss, self.batch_num = target_loss, batch_num
        self.calib = batches(batch_num, seed=1)
        self.val = torch.cat(batches(16, seed=2))
        with torch.no_grad():
            self.labels = model(self.val).argmax(-1)
        self.calibrations = 0

    def calibration(self, model):
        self.calibrations += 1
        with torch.no_grad():
            for x in self.calib:
                model(x)

    def evaluate(self, model):
        with torch.no_grad():
            return (model(self.val).argmax(-1) == self.labels).float().mean().item()

    def metric_eval(self, original_metric, new_metric):
        loss = original_metric - new_metric
        return loss * 100 < self.target_loss, loss


def test_amct_sample_finds_the_planted_layer_and_writes_everything(model, tmp_path):
    x = batches(1, seed=0)[0]
    config_file = str(tmp_path / "tmp/config.json")
    record_file = str(tmp_path / "tmp/scale_offset_record.txt")
    save_dir = str(tmp_path / "result/net")
    amct.create_quant_config(config_file, model, x, [], 2)
    original_config = open(config_file).read()
    evaluator = Evaluator(model)
    result = accuracy_based_auto_calibration(model=model, model_evaluator=evaluator, config_file=config_file,
                                             record_file=record_file, save_dir=save_dir, input_data=x,
                                             input_names=["input"], output_names=["output"],
                                             dynamic_axes={"input": {0: "batch_size"}, "output": {0: "batch_size"}},
                                             strategy="BinarySearch", sensitivity="CosineSimilarity")
    assert result.success and result.fallback_layers == ("fc1",)
    assert result.ranking[0].name == "fc1" and set(result.layers) == {"conv1", "conv2", "fc1", "fc2"}
    assert evaluator.calibrations == len(result.history) + 1          # every trial, plus the ranking's float pass
    assert open(config_file).read() == original_config                 # read, never rewritten

    # the models and the record
    record = read_record(record_file)
    assert set(record.layers) == {"conv1", "conv2", "fc2"}
    fake = tmp_path / "result/net_fake_quant_model.onnx"
    assert (tmp_path / "result/net_deploy_model.onnx").exists()
    # the graph's own semantics: with optimisations on, onnxruntime fuses QDQ into u8s8 integer kernels that
    # saturate on x86 without VNNI (AVX2 only), which is a property of that kernel, not of the export
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    sess = ort.InferenceSession(str(fake), options)
    probe = torch.cat(batches(2, seed=7))                               # dynamic batch axis
    y_ort = sess.run(None, {"input": probe.numpy()})[0]
    with torch.no_grad():
        y_torch = result.model(probe).numpy()
    assert np.array_equal(y_ort.argmax(1), y_torch.argmax(1))
    assert np.abs(y_ort - y_torch).max() < 0.05 * np.abs(y_torch).max() + 1e-3

    # the side files, in save_dir's folder
    folder = tmp_path / "result"
    final = json.loads((folder / FILE_NAMES["final_config"]).read_text())
    assert final["fc1"]["quant_enable"] is False
    assert all(final[n]["quant_enable"] is True for n in ("conv1", "conv2", "fc2"))
    assert final["fc1"]["weight_quant_params"] == json.loads(original_config)["fc1"]["weight_quant_params"]
    ranking = json.loads((folder / FILE_NAMES["ranking"]).read_text())
    assert [name for name, _ in ranking] == [r.name for r in result.ranking] and ranking[0][0] == "fc1"
    assert [score for _, score in ranking] == sorted(score for _, score in ranking)
    history = json.loads((folder / FILE_NAMES["record"]).read_text())
    assert len(history) == len(result.history)
    assert history[0]["roll_back_config"] == {"conv1": True, "conv2": True, "fc1": True, "fc2": True}
    assert history[0]["metric_eval"][0] is False
    assert history[-1]["roll_back_config"]["fc1"] is False and history[-1]["metric_eval"][0] is True
    assert all(set(h) == {"roll_back_config", "metric_eval", "metric", "seconds"} for h in history)


def test_sqnr_greedy_and_only_all_float(model, tmp_path):
    x = batches(1, seed=0)[0]
    config_file = str(tmp_path / "config.json")
    amct.create_quant_config(config_file, model, x, batch_num=2)

    class Exact(Evaluator):
        def metric_eval(self, original_metric, new_metric):   # nothing quantized is good enough
            return new_metric >= original_metric and new_metric > 2, original_metric - new_metric

        def evaluate(self, model):
            return 3.0 if not isinstance(model.fc1, amct.CompressedLayer) and not hasattr(model, "amct_plan") else 1.0

    with pytest.warns(RuntimeWarning, match="no quantized model was written"):
        result = accuracy_based_auto_calibration(model, Exact(model), config_file, str(tmp_path / "r.txt"),
                                                 str(tmp_path / "out/net"), x, strategy="Greedy", sensitivity="SQNR")
    assert result.status == "no_model" and result.settings.sensitivity == "sqnr"
    assert [len(t.fallback_layers) for t in result.history] == [0, 1, 2, 3]    # greedy: one more at a time
    written = {p.name for p in (tmp_path / "out").iterdir()}
    assert written == {FILE_NAMES["ranking"], FILE_NAMES["record"]}           # no models, no final config
    assert not (tmp_path / "r.txt").exists()


def test_evaluator_base_defaults_and_import_path():
    assert AutoCalibrationEvaluatorBase is compat.AutoCalibrationEvaluatorBase
    from amct_torch.common import auto_calibration as common
    assert common.accuracy_based_auto_calibration is accuracy_based_auto_calibration
    base = AutoCalibrationEvaluatorBase()
    assert base.metric_eval(0.9, 0.895) == (True, pytest.approx(0.005))
    assert base.metric_eval(0.9, 0.85)[0] is False
    assert AutoCalibrationEvaluatorBase(max_drop=0.1).metric_eval(0.9, 0.85)[0] is True
    with pytest.raises(NotImplementedError, match="calibration"):
        base.calibration(nn.Linear(1, 1))
    with pytest.raises(NotImplementedError, match="evaluate"):
        base.evaluate(nn.Linear(1, 1))
    with pytest.raises(ConfigError, match="max_drop"):
        AutoCalibrationEvaluatorBase(max_drop=-0.1)


def test_bad_arguments_name_what_is_allowed(model, tmp_path):
    x = batches(1, seed=0)[0]
    config_file = str(tmp_path / "config.json")
    amct.create_quant_config(config_file, model, x, batch_num=2)
    args = (model, Evaluator(model), config_file, str(tmp_path / "r.txt"), str(tmp_path / "out/net"), x)
    with pytest.raises(ConfigError, match="strategy: got 'Random'; allowed: one of 'BinarySearch', 'Greedy'"):
        accuracy_based_auto_calibration(*args, strategy="Random")
    with pytest.raises(ConfigError, match="sensitivity: got 'KL'; allowed: one of 'CosineSimilarity', 'SQNR'"):
        accuracy_based_auto_calibration(*args, sensitivity="KL")
    with pytest.raises(TypeError, match="AutoCalibrationEvaluatorBase"):
        accuracy_based_auto_calibration(model, object(), *args[2:])
    with pytest.raises(ValueError, match="save_dir.*file-name prefix"):
        accuracy_based_auto_calibration(*args[:4], str(tmp_path) + "/", x)

    class Lazy(Evaluator):
        def calibration(self, model):
            pass

    with pytest.raises(CalibrationError, match=r"Lazy.calibration\(model\) ran no batch through the model"):
        accuracy_based_auto_calibration(model, Lazy(model), *args[2:])

    class Short(Evaluator):
        def calibration(self, model):
            model(self.calib[0])

    with pytest.raises(CalibrationError, match=r"ran 1 batch\(es\), fewer than the config's batch_num \(2\)"):
        accuracy_based_auto_calibration(model, Short(model), *args[2:])

    class Never(Evaluator):
        def metric_eval(self, original_metric, new_metric):
            return False, 1.0

    with pytest.raises(ValueError, match="rejects the float model itself"):
        accuracy_based_auto_calibration(model, Never(model), *args[2:])
    assert not (tmp_path / "out").exists()

    cfg = json.loads(open(config_file).read())
    cfg["head"] = cfg["fc2"]
    (tmp_path / "bad.json").write_text(json.dumps(cfg))
    with pytest.raises(ConfigError, match="bad.json: layers: got \\['head'\\]; allowed: quantizable layers"):
        accuracy_based_auto_calibration(model, Evaluator(model), str(tmp_path / "bad.json"), *args[3:])

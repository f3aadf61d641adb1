"""AMCT's PTQ example script, run unchanged against amct_torch (amct.md §1.1)."""

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
import torch.nn as nn

import amct_torch as amct
from amct_torch.config import ConfigError, read_record
from amct_torch.export import make_reference_evaluator


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 8, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(8)
        self.relu = nn.ReLU()
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.relu(self.conv2(x))
        return self.fc(torch.flatten(self.pool(x), 1))


@pytest.fixture
def model():
    torch.manual_seed(0)
    m = Net()
    with torch.no_grad():
        m.bn1.running_mean.uniform_(-0.5, 0.5)
        m.bn1.running_var.uniform_(0.5, 2.0)
    return m.eval()


def batches(n, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(4, 1, 8, 8, generator=g) for _ in range(n)]


def test_amct_example_script_runs_unchanged(model, tmp_path):
    x = batches(1)[0]
    config_file, record_file = str(tmp_path / "tmp/config.json"), str(tmp_path / "tmp/record.txt")
    modified = str(tmp_path / "tmp/modified_model.onnx")
    amct.create_quant_config(config_file=config_file, model=model, input_data=x, skip_layers=[], batch_num=2)
    cfg = json.loads(open(config_file).read())
    assert cfg["version"] == 1 and cfg["batch_num"] == 2 and cfg["do_fusion"] is True
    assert set(k for k in cfg if isinstance(cfg[k], dict)) == {"conv1", "conv2", "fc"}
    assert cfg["conv1"]["weight_quant_params"]["channel_wise"] is True
    assert cfg["fc"]["weight_quant_params"]["channel_wise"] is False        # AMCT: Linear per tensor
    assert cfg["conv1"]["activation_quant_params"]["act_algo"] == "ifmr"

    cal = amct.quantize_model(config_file, modified, record_file, model, x)
    assert onnx.load(modified).graph.node  # the BN-folded model was written
    assert read_record(record_file).layers == {}  # empty until batch_num passes
    for b in batches(2):
        cal(b)
    record = read_record(record_file)
    assert set(record.layers) == {"conv1", "conv2", "fc"}
    assert len(record.layers["conv1"].scale_w) == 8 and len(record.layers["fc"].scale_w) == 1

    amct.save_model(modified, record_file, str(tmp_path / "results/user_model"))
    fake = tmp_path / "results/user_model_fake_quant_model.onnx"
    deploy = tmp_path / "results/user_model_deploy_model.onnx"
    sess = ort.InferenceSession(str(fake))
    probe = batches(1, seed=7)[0]
    y_ort = sess.run(None, {sess.get_inputs()[0].name: probe.numpy()})[0]
    with torch.no_grad():
        y_torch = cal(probe).numpy()
    assert np.array_equal(y_ort.argmax(1), y_torch.argmax(1))
    assert np.abs(y_ort - y_torch).max() < 0.05 * np.abs(y_torch).max() + 1e-3
    dep = onnx.load(str(deploy))
    assert {"AscendQuant", "AscendDequant"} <= {n.op_type for n in dep.graph.node}
    ev = make_reference_evaluator(dep)
    y_dep = ev.run(None, {ev.input_names[0]: probe.numpy()})[0]
    assert np.abs(y_dep - y_ort).max() < 0.05 * np.abs(y_ort).max() + 1e-3


def test_record_factors_equal_the_calibration_model(model, tmp_path):
    x = batches(1)[0]
    amct.create_quant_config(str(tmp_path / "c.json"), model, x, batch_num=1)
    cal = amct.quantize_model(str(tmp_path / "c.json"), str(tmp_path / "m.onnx"), str(tmp_path / "r.txt"), model, x)
    cal(x)
    rec = read_record(tmp_path / "r.txt").layers["conv2"]
    q = cal.conv2.input_quantizer
    assert rec.scale_d == float(q.scale) and rec.offset_d == int(q.offset)
    stage = cal.conv2.weight_pipeline[0]
    assert rec.scale_w == [float(s) for s in stage.scale]


def test_skip_layers_leave_the_layer_float(model, tmp_path):
    x = batches(1)[0]
    amct.create_quant_config(str(tmp_path / "c.json"), model, x, skip_layers=["fc"])
    assert json.loads((tmp_path / "c.json").read_text())["fc"]["quant_enable"] is False
    cal = amct.quantize_model(str(tmp_path / "c.json"), str(tmp_path / "m.onnx"), str(tmp_path / "r.txt"), model, x)
    assert not isinstance(cal.fc, amct.CompressedLayer)


def test_unknown_skip_layer_is_an_error_naming_it(model, tmp_path):
    with pytest.raises(ConfigError, match="fc2"):
        amct.create_quant_config(str(tmp_path / "c.json"), model, batches(1)[0], skip_layers=["fc2"])


def test_config_defination_cfg_decides_with_amct_precedence(model, tmp_path):
    cfg = tmp_path / "quant.cfg"
    cfg.write_text('batch_num : 3\nactivation_offset : false\nskip_layers : "fc"\n'
                   'common_config : { ifmr_quantize : { search_range_start : 0.8 search_range_end : 1.2 search_step : 0.02 } }\n'
                   'override_layer_configs : { layer_name : "conv2" calibration_config : { hfmg_quantize : { num_of_bins : 2048 } } }\n')
    amct.create_quant_config(str(tmp_path / "c.json"), model, batches(1)[0], skip_layers=["conv1"], batch_num=1,
                             config_defination=str(cfg))
    out = json.loads((tmp_path / "c.json").read_text())
    assert out["batch_num"] == 3 and out["fc"]["quant_enable"] is False
    assert out["conv1"]["quant_enable"] is True   # skip_layers argument ignored when a cfg is given
    assert out["conv1"]["activation_quant_params"]["search_range"] == [0.8, 1.2]
    assert out["conv1"]["activation_quant_params"]["asymmetric"] is False
    assert out["conv2"]["activation_quant_params"]["act_algo"] == "hfmg"
    assert out["conv2"]["activation_quant_params"]["num_of_bins"] == 2048


def test_save_model_before_calibration_refuses_and_writes_nothing(model, tmp_path):
    x = batches(1)[0]
    amct.create_quant_config(str(tmp_path / "c.json"), model, x, batch_num=2)
    cal = amct.quantize_model(str(tmp_path / "c.json"), str(tmp_path / "m.onnx"), str(tmp_path / "r.txt"), model, x)
    cal(x)  # one of two batches
    with pytest.raises(RuntimeError, match="batch_num"):
        amct.save_model(str(tmp_path / "m.onnx"), str(tmp_path / "r.txt"), str(tmp_path / "out/model"))
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_amct_misspelled_keywords_and_correct_ones_both_work(model, tmp_path):
    x = batches(1)[0]
    amct.create_quant_config(str(tmp_path / "c.json"), model, x)
    a = amct.quantize_model(config_file=str(tmp_path / "c.json"), modfied_onnx_file=str(tmp_path / "a.onnx"),
                            record_file=str(tmp_path / "a.txt"), model=model, input_data=x)
    b = amct.quantize_model(config_file=str(tmp_path / "c.json"), modified_onnx_file=str(tmp_path / "b.onnx"),
                            record_file=str(tmp_path / "b.txt"), model=model, input_data=x)
    assert type(a) is type(b)
    with pytest.raises(TypeError, match="not both"):
        amct.quantize_model(str(tmp_path / "c.json"), str(tmp_path / "a.onnx"), str(tmp_path / "a.txt"), model, x,
                            modified_onnx_file=str(tmp_path / "c.onnx"))


def test_adaround_config_learns_rounding_in_quantize_model(model, tmp_path):
    x = batches(1)[0]
    cfg = tmp_path / "ada.cfg"
    cfg.write_text("common_config : { ada_quantize : { num_iteration : 30 } }\n")
    amct.create_quant_config(str(tmp_path / "c.json"), model, x, config_defination=str(cfg))
    assert json.loads((tmp_path / "c.json").read_text())["conv1"]["weight_quant_params"]["wts_algo"] == "ada_quantize"
    cal = amct.quantize_model(str(tmp_path / "c.json"), str(tmp_path / "m.onnx"), str(tmp_path / "r.txt"), model, x)
    assert bool(cal.conv2.weight_pipeline[0].optimized)

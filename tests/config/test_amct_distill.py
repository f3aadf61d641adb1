"""AMCT's distillation JSON and .cfg: round trips, resolution, errors that name the file and the key."""

import json

import pytest

from amct_torch.config import ConfigError, PerTensor, QatConfig
from amct_torch.config import amct_proto as pb
from amct_torch.config.amct_distill import (DistillSettings, parse_distill_json, read_distill_cfg, read_distill_json,
                                            resolve_distill_configs, write_distill_json)

LAYERS = {"conv1": "Conv2d", "layer1.0.conv1": "Conv2d", "fc": "Linear"}


def test_json_round_trip(tmp_path):
    settings = DistillSettings(batch_num=2, group_size=2, data_dump=True,
                               distill_group=(("conv1", "bn1", "relu"), ("layer1.0",), ("fc",)))
    layers = {"conv1": QatConfig(batch_num=2, weight_bits=4, activation_bits=4, clip_max=3.0, clip_min=-3.0),
              "layer1.0.conv1": QatConfig(batch_num=2, weight_algorithm="ulq_retrain", fixed_min=True),
              "fc": None}
    path = tmp_path / "distill.json"
    write_distill_json(path, settings, layers)
    data = json.loads(path.read_text())
    assert list(data)[:5] == ["version", "batch_num", "group_size", "data_dump", "distill_group"]
    assert data["distill_group"] == [["conv1", "bn1", "relu"], ["layer1.0"], ["fc"]]
    assert data["conv1"] == {"quant_enable": True,
                             "distill_data_config": {"algo": "ulq_quantize", "dst_type": "INT4", "clip_max": 3.0,
                                                     "clip_min": -3.0},
                             "distill_weight_config": {"algo": "arq_distill", "channel_wise": True, "dst_type": "INT4"}}
    assert data["layer1.0.conv1"]["distill_weight_config"]["algo"] == "ulq_distill"
    assert data["fc"] == {"quant_enable": False}
    assert read_distill_json(path) == (settings, layers)


def test_json_defaults_and_per_tensor():
    settings, layers = parse_distill_json(json.dumps({
        "fc": {"distill_weight_config": {"channel_wise": False}}}))
    assert settings == DistillSettings()
    assert layers["fc"] == QatConfig(activation_bits=None, weight_granularity=PerTensor())


@pytest.mark.parametrize("doc, match", [
    ({"fc": {"distill_weight_config": {"algo": "arq_retrain"}}},
     r"layer 'fc' distill_weight_config.algo: got 'arq_retrain'; allowed: one of arq_distill, ulq_distill, lsq_plus"),
    ({"fc": {"distill_data_config": {"dst_type": "INT16"}}}, r"distill_data_config.dst_type: got 'INT16'; allowed: one of INT4, INT8"),
    ({"fc": {"retrain_enable": True}}, r"layer 'fc' retrain_enable.*known keys: quant_enable, distill_data_config"),
    ({"fc": {"distill_data_config": {"dst_type": "INT4"}}},
     r"distill_data_config.dst_type / distill_weight_config.dst_type: got \['INT4', 'INT8'\]"),
    ({"fc": {"quant_enable": False}}, r"at least one layer with \"quant_enable\": true"),
    ({"group_size": 0, "fc": {}}, r"group_size: got 0"),
    ({"data_dump": "yes", "fc": {}}, r"data_dump: got 'yes'"),
    ({"distill_group": [["conv1"], []], "fc": {}}, r"distill_group\[1\]: got \[\]"),
    ({"distill_group": "conv1", "fc": {}}, r"distill_group: got 'conv1'"),
    ({"version": 2, "fc": {}}, r"version: got 2"),
])
def test_json_errors(doc, match):
    with pytest.raises(ConfigError, match=match):
        parse_distill_json(json.dumps(doc), "d.json")


def test_writer_refuses_what_the_json_cannot_say(tmp_path):
    with pytest.raises(ConfigError, match="activation_bits: got 16"):
        write_distill_json(tmp_path / "x.json", DistillSettings(), {"fc": QatConfig(activation_bits=16, weight_bits=8)})
    with pytest.raises(ConfigError, match="distillation JSON has no key"):
        write_distill_json(tmp_path / "x.json", DistillSettings(), {"fc": QatConfig(init_calibrator="hfmg")})
    assert not (tmp_path / "x.json").exists()
    with pytest.raises(ConfigError, match="distill_group"):
        DistillSettings(distill_group=(("a",), ()))


CFG = """
batch_num: 2
group_size: 3
data_dump: true
distill_group { start_layer_name: "conv1" end_layer_name: "relu" }
distill_group { start_layer_name: "layer1.0" end_layer_name: "layer1.0" }
distill_data_quant_config { ulq_quantize { clip_max_min { clip_max: 6.0 clip_min: -6.0 } dst_type: INT8 } }
distill_weight_quant_config { arq_distill { channel_wise: true dst_type: INT8 } }
distill_override_layer_types { layer_type: "Linear" distill_weight_quant_config { ulq_distill { channel_wise: false } } }
distill_override_layers { layer_name: "layer1.0.conv1" distill_data_quant_config { ulq_quantize { dst_type: INT4 } }
                          distill_weight_quant_config { arq_distill { dst_type: INT4 } } }
quant_skip_layers: "conv1"
"""


def test_cfg_resolution():
    cfg = read_distill_cfg(CFG)
    assert cfg.groups() == [("conv1", "relu"), ("layer1.0", "layer1.0")]
    settings, layers = resolve_distill_configs(cfg, LAYERS)
    assert settings == DistillSettings(batch_num=2, group_size=3, data_dump=True)
    assert layers["conv1"] is None
    assert layers["layer1.0.conv1"] == QatConfig(batch_num=2, weight_bits=4, activation_bits=4, clip_max=6.0,
                                                 clip_min=-6.0)
    assert layers["fc"] == QatConfig(batch_num=2, weight_algorithm="ulq_retrain", weight_granularity=PerTensor(),
                                     clip_max=6.0, clip_min=-6.0)
    assert isinstance(cfg.message, pb.AMCTDistillConfig)


@pytest.mark.parametrize("text, match", [
    ('distill_override_layers { layer_name: "nope" }', r"distill_override_layers\[0\].layer_name: got 'nope'; "
                                                       r"allowed: a distillable layer"),
    ('quant_skip_layers: "nope"', r"quant_skip_layers\[0\]: got 'nope'"),
    ('distill_override_layer_types { layer_type: "GRU" }', r"distill_override_layer_types\[0\].layer_type: got 'GRU'"),
    ("distill_data_quant_config { ulq_quantize { dst_type: INT16 } }",
     r"distill_data_quant_config.ulq_quantize.dst_type: got 'INT16'; allowed: INT4 or INT8"),
    ('distill_override_layers { layer_name: "fc" distill_weight_quant_config { arq_distill { dst_type: INT16 } } }',
     r"distill_override_layers\[0\].distill_weight_quant_config.arq_distill.dst_type: got 'INT16'"),
    ("distill_data_quant_config { ulq_quantize { clip_max_min { clip_max: -1.0 clip_min: -2.0 } } }",
     r"layer 'conv1' \(Conv2d\) distill_data_quant_config.ulq_quantize.clip_max_min.clip_max: got -1.0"),
    ("group_size: 0", r"group_size: got 0"),
    ("distill_weight_quant_config { arq_retrain { } }", r"got 'arq_retrain'; allowed: a field of DistillWeightQuantConfig"),
    ('distill_group { start_layer_name: "conv1" }', r"distill_group\[0\].end_layer_name.*required"),
])
def test_cfg_errors(text, match):
    with pytest.raises(ConfigError, match=match):
        resolve_distill_configs(read_distill_cfg(text), LAYERS)

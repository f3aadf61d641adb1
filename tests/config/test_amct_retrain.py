"""AMCT's QAT formats: the retrain JSON (round trips, mapping to QatConfig, errors) and the retrain .cfg."""

from __future__ import annotations

import json
import re

import pytest

from amct_torch.config import ConfigError, PerChannel, PerTensor, QatConfig
from amct_torch.config import amct_proto as pb
from amct_torch.config.amct_retrain import (RetrainCfg, RetrainSettings, parse_retrain_json, read_retrain_cfg,
                                            read_retrain_json, resolve_retrain_configs, retrain_json_dict,
                                            write_retrain_json)

# The JSON of amct.md section 2.3 (its optional keys filled in), plus what AMCT's JSON can also hold.
JSON_TEXT = """\
{ "version": 1, "batch_num": 2,
  "conv1": { "retrain_enable": true,
             "retrain_data_config":   { "algo": "ulq_quantize", "dst_type": "INT8", "clip_max": 3.0, "clip_min": -3.0, "fixed_min": true },
             "retrain_weight_config": { "algo": "arq_retrain", "channel_wise": true, "dst_type": "INT8" } },
  "conv2": { "retrain_enable": true,
             "retrain_data_config":   { "algo": "ulq_quantize", "dst_type": "INT4", "batch_num": 5 },
             "retrain_weight_config": { "algo": "ulq_retrain", "channel_wise": false, "dst_type": "INT4" } },
  "fc":    { "retrain_enable": true,
             "retrain_data_config":   { "algo": "lsq_plus", "dst_type": "INT16" },
             "retrain_weight_config": { "algo": "lsq_plus", "channel_wise": false, "dst_type": "INT8" } },
  "head":  { "retrain_enable": true, "retrain_weight_config": { "algo": "arq_retrain", "channel_wise": true, "dst_type": "INT4" } },
  "skip":  { "retrain_enable": false } }
"""

# amct.md section 2.3's cfg examples, verbatim.
QAT_CFG = """\
retrain_data_quant_config: { ulq_quantize: { clip_max_min: { clip_max: 6.0 clip_min: -6.0 } fixed_min: true dst_type: INT8 } }
retrain_weight_quant_config: { arq_retrain: { channel_wise: true dst_type: INT8 } }
override_layer_types : { layer_type: "Linear" retrain_weight_quant_config: { arq_retrain: { channel_wise: false } } }
"""
PRUNE_CFGS = [
    'prune_config { filter_pruner { balanced_l2_norm_filter_prune { prune_ratio: 0.3 ascend_optimized: True } } }\n'
    'regular_prune_skip_layers: "Opname"\n',
    "prune_config { n_out_of_m_pruner { l1_selective_prune { n_out_of_m_type: M4N2 update_freq: 0 } } }\n",
]
LAYERS = {"conv1": "Conv2d", "conv2": "Conv2d", "fc": "Linear"}


# ==== proto ===========================================================================================
def test_retrain_schema_numbers_and_defaults_follow_amct():
    numbers = {f.name: f.number for f in pb.AMCTRetrainConfig.DESCRIPTOR.fields}
    assert numbers == {"batch_num": 1, "retrain_data_quant_config": 2, "retrain_weight_quant_config": 3,
                       "skip_layers": 4, "override_layer_configs": 5, "skip_layer_types": 6, "override_layer_types": 7,
                       "prune_config": 8, "regular_prune_skip_layers": 9, "regular_prune_skip_types": 10,
                       "quant_skip_layers": 11, "quant_skip_types": 12, "fakequant_precision_mode": 21}
    assert {f.name: f.number for f in pb.ClipMaxMin.DESCRIPTOR.fields} == {"clip_max": 3, "clip_min": 5}
    assert (pb.DataType.INT4, pb.DataType.INT8, pb.DataType.INT16) == (0, 1, 2)
    assert pb.AMCTRetrainConfig().batch_num == 1 and pb.ActULQquantize().dst_type == pb.DataType.INT8
    assert pb.ARQRetrain().dst_type == pb.WtsULQRetrain().dst_type == pb.DataType.INT8
    assert pb.BalancedL2NormFilterPruner().ascend_optimized is True
    assert pb.L1SelectivePruner().n_out_of_m_type == pb.NOutOfMType.M4N2 and pb.L1SelectivePruner().update_freq == 0
    assert {f.name: f.containing_oneof.name for f in pb.RetrainWeightQuantConfig.DESCRIPTOR.fields} == {
        "arq_retrain": "weights_retrain_algo", "ulq_retrain": "weights_retrain_algo"}
    # both calibration and retrain enums hold INT8: no clash in the private pool
    assert pb.CalibrationDataType.INT8 == pb.DataType.INT8 == 1


@pytest.mark.parametrize("text", [QAT_CFG] + PRUNE_CFGS)
def test_amct_md_cfg_examples_parse_and_round_trip(text):
    cfg = read_retrain_cfg(text)
    assert RetrainCfg.from_text(cfg.to_text()).message == cfg.message


def test_prune_fields_parse_and_are_kept():
    cfg = read_retrain_cfg(PRUNE_CFGS[0])
    assert cfg.message.prune_config.filter_pruner.balanced_l2_norm_filter_prune.prune_ratio == pytest.approx(0.3)
    assert list(cfg.message.regular_prune_skip_layers) == ["Opname"]
    # prune fields do not change QAT configs
    _, with_prune = resolve_retrain_configs(cfg, LAYERS)
    _, without = resolve_retrain_configs(read_retrain_cfg("batch_num: 1"), LAYERS)
    assert with_prune == without


# ==== JSON ============================================================================================
def test_json_maps_to_qat_configs():
    settings, layers = parse_retrain_json(JSON_TEXT, "c.json")
    assert settings == RetrainSettings(batch_num=2)
    assert layers["conv1"] == QatConfig(clip_max=3.0, clip_min=-3.0, fixed_min=True, batch_num=2)
    assert layers["conv2"] == QatConfig(activation_bits=4, weight_bits=4, weight_algorithm="ulq_retrain",
                                        weight_granularity=PerTensor(), batch_num=5)
    assert layers["fc"] == QatConfig(activation_bits=16, activation_algorithm="lsq_plus", weight_algorithm="lsq_plus",
                                     weight_granularity=PerTensor(), batch_num=2)
    assert layers["head"] == QatConfig(activation_bits=None, weight_bits=4, batch_num=2)  # weight-only
    assert layers["skip"] is None


def test_json_round_trip_preserves_every_value(tmp_path):
    settings, layers = parse_retrain_json(JSON_TEXT)
    assert retrain_json_dict(settings, layers) == json.loads(JSON_TEXT)
    write_retrain_json(tmp_path / "c.json", settings, layers)
    assert json.loads((tmp_path / "c.json").read_text()) == json.loads(JSON_TEXT)
    assert read_retrain_json(tmp_path / "c.json") == (settings, layers)


def test_json_accepts_amct_single_op_alias_and_defaults():
    _, layers = parse_retrain_json('{"conv": {"retrain_data_config": {}, '
                                   '"retrain_weight_config": {"weights_retrain_algo": "ulq_retrain"}}}')
    assert layers["conv"] == QatConfig(weight_algorithm="ulq_retrain")


def lit(text: str) -> str:
    return re.escape(text)


def layer(data=None, wts=None, **extra):
    entry = {"retrain_enable": True, **extra}
    if data is not None:
        entry["retrain_data_config"] = data
    if wts is not None:
        entry["retrain_weight_config"] = wts
    return json.dumps({"version": 1, "batch_num": 1, "conv1": entry})


@pytest.mark.parametrize("text, expected", [
    (layer(bogus=1), "c.json: layer 'conv1' bogus: got 1; allowed: no such key; known keys: retrain_enable"),
    (layer({"algo": "ifmr"}), "layer 'conv1' retrain_data_config.algo: got 'ifmr'; allowed: one of ulq_quantize, lsq_plus"),
    (layer({"dst_type": "INT2"}), "layer 'conv1' retrain_data_config.dst_type: got 'INT2'; allowed: one of INT4, INT8, INT16"),
    (layer(None, {"dst_type": "INT16"}), "retrain_weight_config.dst_type: got 'INT16'; allowed: one of INT4, INT8"),
    (layer({"dst_type": "INT4"}, {"dst_type": "INT8"}),
     "layer 'conv1' retrain_data_config.dst_type / retrain_weight_config.dst_type: got ['INT4', 'INT8']; "
     "allowed: A8W8, A8W4, A4W4 or A16W8"),
    (layer({"clip_max": 2.0, "clip_min": 0.5}), "layer 'conv1' retrain_data_config.clip_min: got 0.5; allowed: clip_min < 0"),
    (layer({"clip_max": -1.0}), "layer 'conv1' retrain_data_config.clip_max: got -1.0; allowed: 0 < clip_max"),
    (layer({"clip_max": "3"}), "retrain_data_config.clip_max: got '3'; allowed: a number"),
    (layer({"fixed_min": 1}), "retrain_data_config.fixed_min: got 1; allowed: true or false"),
    (layer({"batch_num": 0}), "retrain_data_config.batch_num: got 0; allowed: an integer > 0"),
    (layer(None, {"channel_wise": "yes"}), "retrain_weight_config.channel_wise: got 'yes'; allowed: true or false"),
    (layer(None, {"algo": "ada_quantize"}), "retrain_weight_config.algo: got 'ada_quantize'; allowed: one of arq_retrain"),
    (layer(None, {"algo": "arq_retrain", "weights_retrain_algo": "ulq_retrain"}), "only one of algo and weights_retrain_algo"),
    (layer(None, {"num_bits": 8}), "retrain_weight_config.num_bits: got 8; allowed: no such key"),
    ('{"version": 2}', "c.json: version: got 2; allowed: 1"),
    ('{"batch_num": 0}', "c.json: batch_num: got 0; allowed: an integer > 0"),
    ('{"conv1": 3}', "c.json: conv1: got 3; allowed: a global key (version, batch_num) or a layer name with an object"),
    ('{"batch_num": 1,\n "conv1": {]}', "c.json: line 2, column 12"),
    ('{"conv1": {}, "conv1": {}}', "c.json: key 'conv1': got 'given twice'"),
])
def test_json_errors_name_the_layer_and_key(text, expected):
    with pytest.raises(ConfigError, match=lit(expected)):
        parse_retrain_json(text, "c.json")


def test_configs_json_configs_round_trip():
    layers = {"a": QatConfig(batch_num=3), "b": QatConfig(weight_bits=4, clip_max=2.5, clip_min=-0.5, batch_num=4),
              "c": QatConfig(activation_bits=16, weight_granularity=PerTensor(), fixed_min=False, clip_max=1.0,
                             clip_min=-1.0, batch_num=3),
              "d": None}
    settings = RetrainSettings(batch_num=3)
    assert parse_retrain_json(json.dumps(retrain_json_dict(settings, layers))) == (settings, layers)


@pytest.mark.parametrize("cfg, key", [(QatConfig(activation_offset=False), "activation_offset"),
                                      (QatConfig(init_calibrator="minmax"), "init_calibrator"),
                                      (QatConfig(search_step=0.02), "search_step")])
def test_writing_refuses_what_amct_json_cannot_spell_and_leaves_the_file(tmp_path, cfg, key):
    path = tmp_path / "c.json"
    write_retrain_json(path, RetrainSettings(), {"conv": QatConfig()})
    before = path.read_text()
    with pytest.raises(ConfigError, match=lit(f"layer 'conv' {key}") + ".*AMCT's QAT JSON has no key"):
        write_retrain_json(path, RetrainSettings(), {"conv": cfg})
    assert path.read_text() == before and [p.name for p in tmp_path.iterdir()] == ["c.json"]


# ==== .cfg resolution =================================================================================
def test_defaults_conv_channel_wise_linear_per_tensor_int8():
    settings, out = resolve_retrain_configs("batch_num: 3", LAYERS)
    assert settings.batch_num == 3
    assert out["conv1"] == QatConfig(batch_num=3)
    assert out["fc"] == QatConfig(batch_num=3, weight_granularity=PerTensor())


def test_amct_md_qat_example_resolves():
    _, out = resolve_retrain_configs(QAT_CFG, LAYERS)
    assert out["conv1"] == QatConfig(clip_max=6.0, clip_min=-6.0, fixed_min=True, weight_granularity=PerChannel())
    assert out["fc"] == QatConfig(clip_max=6.0, clip_min=-6.0, fixed_min=True, weight_granularity=PerTensor())


def test_precedence_name_over_type_over_global_field_by_field():
    text = """\
retrain_data_quant_config { ulq_quantize { clip_max_min { clip_max: 4.0 clip_min: -4.0 } } }
retrain_weight_quant_config { arq_retrain { channel_wise: false } }
override_layer_configs { layer_name: "conv2"
                         retrain_weight_quant_config { ulq_retrain { dst_type: INT4 } } }
override_layer_types { layer_type: "Conv2d"
                       retrain_data_quant_config { ulq_quantize { clip_max_min { clip_max: 2.0 clip_min: -1.0 } } }
                       retrain_weight_quant_config { arq_retrain { dst_type: INT8 channel_wise: true } } }
override_layer_configs { layer_name: "conv2" retrain_data_quant_config { ulq_quantize { fixed_min: true } } }
"""
    _, out = resolve_retrain_configs(text, LAYERS)
    assert out["fc"] == QatConfig(clip_max=4.0, clip_min=-4.0, weight_granularity=PerTensor())       # global
    assert out["conv1"] == QatConfig(clip_max=2.0, clip_min=-1.0, weight_granularity=PerChannel())   # type > global
    # name > type, each level changing only what it sets: ulq_retrain INT4 keeps the type's channel_wise,
    # fixed_min keeps the type's clips
    assert out["conv2"] == QatConfig(clip_max=2.0, clip_min=-1.0, fixed_min=True, weight_algorithm="ulq_retrain",
                                     weight_bits=4, weight_granularity=PerChannel())


def test_skip_lists_are_unions():
    layers = {**LAYERS, "deconv": "ConvTranspose2d"}
    _, out = resolve_retrain_configs('skip_layers: "conv1" quant_skip_layers: "conv2"', layers)
    assert out["conv1"] is None and out["conv2"] is None and out["fc"] is not None
    _, out = resolve_retrain_configs('skip_layer_types: "Linear" quant_skip_types: "ConvTranspose2d"', layers)
    assert out["fc"] is None and out["deconv"] is None and out["conv1"] is not None
    assert list(out) == list(layers)


def test_defaults_argument_is_the_starting_point():
    _, out = resolve_retrain_configs("batch_num: 2", LAYERS, defaults={"conv1": QatConfig(weight_granularity=PerTensor())})
    assert out["conv1"] == QatConfig(weight_granularity=PerTensor(), batch_num=2)


@pytest.mark.parametrize("text, expected", [
    ("batch_num: 1\nbatchnum: 2\n", "r.cfg: line 2, column 1: got 'batchnum'; allowed: a field of AMCTRetrainConfig"),
    ("retrain_data_quant_config {\n  ulq_quantize { dst_type: INT5 }\n}", "r.cfg: line 2, column 28: got 'INT5'; "
                                                                         "allowed: one of INT4, INT8, INT16"),
    ("retrain_weight_quant_config { arq_retrain {} ulq_retrain {} }", "r.cfg: line 1, column 46: got 'ulq_retrain'"),
    ("retrain_data_quant_config { ulq_quantize { fixed_min: maybe } }", "r.cfg: line 1, column 55: fixed_min"),
    ("retrain_data_quant_config { ulq_quantize { clip_max_min { clip_max: 1 } } }",
     "r.cfg: retrain_data_quant_config.ulq_quantize.clip_max_min.clip_min: got None; allowed: a value: the field is required"),
    ('override_layer_configs { retrain_data_quant_config {} }', "override_layer_configs[0].layer_name"),
])
def test_cfg_parse_errors_name_file_line_and_field(tmp_path, text, expected):
    path = tmp_path / "r.cfg"
    path.write_text(text)
    with pytest.raises(ConfigError, match=lit(expected)):
        read_retrain_cfg(str(path))


@pytest.mark.parametrize("text, expected", [
    ("batch_num: 0", "<cfg text>: batch_num: got 0; allowed: an integer > 0"),
    ('skip_layers: "conv9"', "skip_layers[0]: got 'conv9'; allowed: a QAT-able layer of the model (conv1, conv2, fc)"),
    ('quant_skip_layers: "fc" quant_skip_layers: "fc2"', "quant_skip_layers[1]: got 'fc2'"),
    ('override_layer_configs { layer_name: "conv9" }', "override_layer_configs[0].layer_name: got 'conv9'"),
    ('override_layer_types { layer_type: "Conv2D" }', "override_layer_types[0].layer_type: got 'Conv2D'; "
                                                      "allowed: a layer type QAT supports"),
    ("retrain_data_quant_config { ulq_quantize { clip_max_min { clip_max: 2 clip_min: 0.5 } } }",
     "layer 'conv1' (Conv2d) retrain_data_quant_config.ulq_quantize.clip_max_min.clip_min: got 0.5; allowed: clip_min < 0"),
    ('override_layer_configs { layer_name: "fc" retrain_weight_quant_config { arq_retrain { dst_type: INT16 } } }',
     "layer 'fc' (Linear) override_layer_configs[0].retrain_weight_quant_config.arq_retrain.dst_type: got 'INT16'; "
     "allowed: INT4 or INT8 (weights)"),
    ('override_layer_types { layer_type: "Linear" retrain_data_quant_config { ulq_quantize { dst_type: INT4 } } }',
     "layer 'fc' (Linear) override_layer_types[0] (Linear).retrain_data_quant_config.ulq_quantize.dst_type / "
     "retrain_weight_quant_config dst_type (default INT8): got ['INT4', 'INT8']; allowed: A8W8, A8W4, A4W4 or A16W8"),
])
def test_cfg_value_errors_name_the_layer_and_key_path(text, expected):
    with pytest.raises(ConfigError, match=lit(expected)):
        resolve_retrain_configs(text, LAYERS)


def test_override_type_may_name_a_supported_type_the_model_lacks():
    _, out = resolve_retrain_configs('override_layer_types { layer_type: "ConvTranspose2d" }', LAYERS)
    assert set(out) == set(LAYERS)


def test_read_retrain_cfg_tells_a_path_from_text(tmp_path):
    path = tmp_path / "r.cfg"
    path.write_text(QAT_CFG)
    assert read_retrain_cfg(str(path)).source == str(path)
    assert read_retrain_cfg(path).message == read_retrain_cfg(QAT_CFG).message
    with pytest.raises(FileNotFoundError):
        read_retrain_cfg(str(tmp_path / "missing.cfg"))

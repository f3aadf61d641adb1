"""AMCT's KV-cache calibration functions end to end: config, calibration model, record; QuantCalibrationOp."""

import json

import pytest
import torch

import amct_torch as amct
from amct_torch.config import ConfigError, read_record
from amct_torch.config.kvcache import KVCacheConfig
from amct_torch.kvcache import calibrate_kv_cache
from test_kvcache import batches, gpt2


def test_config_model_and_record_match_the_pythonic_calibration(tmp_path):
    model = gpt2()
    cfg, record = tmp_path / "kv.json", tmp_path / "record.txt"
    amct.create_quant_cali_config(str(cfg), model)
    data = json.loads(cfg.read_text())
    assert data["batch_num"] == 1 and "transformer.h.1.attn.c_attn.value" in data
    data["batch_num"] = 2
    cfg.write_text(json.dumps(data))
    cali = amct.create_quant_cali_model(str(cfg), str(record), model)
    xs = batches(3)
    with torch.no_grad():
        cali(xs[0])
        assert not record.exists() or not read_record(record).kv_cache   # batch_num = 2: nothing yet
        cali(xs[1])
        cali(xs[2])                                                      # a third batch changes nothing
    rec = read_record(record)
    expected = calibrate_kv_cache(gpt2(), xs[:2], KVCacheConfig(batch_num=2))
    assert set(rec.kv_cache) == set(expected.tensors)
    for name in expected.tensors:
        assert rec.kv_cache[name].scale == [float(v) for v in expected.scale[name]]
        assert rec.kv_cache[name].offset == [int(v) for v in expected.offset[name]]
    # calibrating again replaces the entries instead of appending to them
    amct.create_quant_cali_model(str(cfg), str(record), gpt2())
    assert not read_record(record).kv_cache


def test_quant_calibration_op_writes_each_name_after_batch_num_calls(tmp_path):
    record = tmp_path / "record.txt"
    op = amct.QuantCalibrationOp(str(record), {"act_algo": "hfmg", "batch_num": 2, "quant_granularity": 1})
    x = torch.randn(3, 5, 8)
    assert op("matmul1", x) is x
    assert not record.exists()
    op("matmul1", x * 2)
    entry = read_record(record).kv_cache["matmul1"]
    assert len(entry.scale) == 8 and len(entry.offset) == 8  # per channel: the last axis


def test_bad_names_and_keys_are_reported(tmp_path):
    model = gpt2()
    with pytest.raises(ConfigError, match="kv_cache_quant_layers: got 'nope'"):
        amct.create_quant_cali_config(str(tmp_path / "kv.json"), model, {"kv_cache_quant_layers": ["nope"]})
    with pytest.raises(ConfigError, match="quant_algo_params.algo"):
        amct.QuantCalibrationOp(str(tmp_path / "r.txt"), {"algo": "ifmr"})
    with pytest.raises(ConfigError, match="quant_method"):
        amct.QuantCalibrationOp(str(tmp_path / "r.txt"), {}, quant_method="weights")
    cfg = tmp_path / "kv.json"
    cfg.write_text(json.dumps({"batch_num": 1, "transformer.h.0.attn.c_attn.key": {"kv_data_quant_config": {"act_algo": "mse"}}}))
    with pytest.raises(ConfigError, match="kv_data_quant_config.act_algo: got 'mse'"):
        amct.create_quant_cali_model(str(cfg), str(tmp_path / "r.txt"), model)


def test_cfg_file_becomes_the_json_config_with_overrides(tmp_path):
    model = gpt2()
    cfg = tmp_path / "kv.cfg"
    cfg.write_text("batch_num: 2\n"
                   "kv_cache_quant_config { quant_layers: 'transformer.h.0.attn.c_attn.key' "
                   "quant_layers: 'transformer.h.0.attn.c_attn.value' "
                   "calibration_config { hfmg_quantize { num_of_bins: 2048 } quant_granularity: 1 } }\n"
                   "override_layers_configs { layer_name: 'transformer.h.0.attn.c_attn.value' "
                   "kv_data_quant_config { ifmr_quantize { max_percentile: 0.999 asymmetric: false } } }\n")
    out = tmp_path / "kv.json"
    amct.create_quant_cali_config(str(out), model, config_defination=str(cfg))
    data = json.loads(out.read_text())
    assert data["batch_num"] == 2
    key = data["transformer.h.0.attn.c_attn.key"]["kv_data_quant_config"]
    assert key == {"act_algo": "hfmg", "quant_granularity": 1, "num_of_bins": 2048}
    value = data["transformer.h.0.attn.c_attn.value"]["kv_data_quant_config"]
    assert value["act_algo"] == "ifmr" and value["max_percentile"] == pytest.approx(0.999) and value["asymmetric"] is False
    record = tmp_path / "record.txt"
    cali = amct.create_quant_cali_model(str(out), str(record), model)
    with torch.no_grad():
        for x in batches(2):
            cali(x)
    rec = read_record(record)
    assert len(rec.kv_cache["transformer.h.0.attn.c_attn.key"].scale) == 64        # per channel
    assert rec.kv_cache["transformer.h.0.attn.c_attn.value"].offset == [0]         # symmetric IFMR
    cfg.write_text("kv_cache_quant_config { quant_layers: 'nope' }\n")
    with pytest.raises(ConfigError, match="quant_layers: got 'nope'"):
        amct.create_quant_cali_config(str(out), model, config_defination=str(cfg))
    cfg.write_text("kv_cache_quant_config { quant_layer: 'x' }\n")
    with pytest.raises(ConfigError, match="kv.cfg"):
        amct.create_quant_cali_config(str(out), model, config_defination=str(cfg))

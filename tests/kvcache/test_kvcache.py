"""KV-cache quantization: projections found by name, calibrated factors and their record round trip, the
fake-quant mode against the INT8 cache (prefill and a decoding step), and the cache's bytes."""

import pytest
import torch
from transformers import BertConfig, BertModel, DynamicCache, GPT2Config, GPT2LMHeadModel

from amct_torch.config import Record, read_record, write_record
from amct_torch.config.kvcache import KVCacheConfig
from amct_torch.kvcache import (KVCalibration, QuantizedKVCache, calibrate_kv_cache, fake_quant_kv, kv_projections)
from amct_torch.quant.formulas import scale_offset


def gpt2():
    torch.manual_seed(0)
    cfg = GPT2Config(n_layer=2, n_embd=64, n_head=4, vocab_size=100, n_positions=64, eos_token_id=0, bos_token_id=0)
    return GPT2LMHeadModel(cfg).eval()


def batches(n=2):
    g = torch.Generator().manual_seed(1)
    return [torch.randint(0, 100, (4, 32), generator=g) for _ in range(n)]


def test_projections_are_found_in_gpt2_and_bert():
    names = [(t.name, t.role, t.layer_idx, t.start, t.stop) for t in kv_projections(gpt2())]
    assert names == [("transformer.h.0.attn.c_attn.key", "key", 0, 64, 128),
                     ("transformer.h.0.attn.c_attn.value", "value", 0, 128, 192),
                     ("transformer.h.1.attn.c_attn.key", "key", 1, 64, 128),
                     ("transformer.h.1.attn.c_attn.value", "value", 1, 128, 192)]
    bert = BertModel(BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                                vocab_size=50))
    roles = {(t.layer_idx, t.role) for t in kv_projections(bert)}
    assert roles == {(0, "key"), (0, "value"), (1, "key"), (1, "value")}


def test_minmax_factors_are_amct_formulas_on_the_observed_range():
    model = gpt2()
    data = batches(2)
    cal = calibrate_kv_cache(model, data, KVCacheConfig(activation_calibrator="minmax", batch_num=2))
    assert cal.batches == 2
    seen = []
    h = model.transformer.h[1].attn.c_attn.register_forward_hook(lambda m, i, o: seen.append(o[..., 128:192]))
    with torch.no_grad():
        for x in data:
            model(x)
    h.remove()
    v = torch.cat([s.reshape(-1) for s in seen])
    scale, offset = scale_offset(v.min().double().reshape(1), v.max().double().reshape(1), 8, symmetric=False)
    assert torch.equal(cal.scale["transformer.h.1.attn.c_attn.value"], scale)
    assert torch.equal(cal.offset["transformer.h.1.attn.c_attn.value"], offset)


@pytest.mark.parametrize("granularity", ["per_tensor", "per_channel"])
def test_record_round_trip_keeps_other_entries(tmp_path, granularity):
    model = gpt2()
    cal = calibrate_kv_cache(model, batches(1), KVCacheConfig(granularity=granularity, activation_calibrator="hfmg"))
    path = tmp_path / "record.txt"
    rec = Record()
    rec.set_layer("lm_head", scale_d=0.5, offset_d=3)
    write_record(rec, path)
    cal.write(path)
    back = read_record(path)
    assert back.layers["lm_head"].scale_d == 0.5 and len(back.kv_cache) == 4
    again = KVCalibration.from_record(model, path)
    for name in cal.tensors:
        assert torch.equal(again.scale[name], cal.scale[name].float())
        assert torch.equal(again.offset[name], cal.offset[name])
        assert cal.scale[name].numel() == (64 if granularity == "per_channel" else 1)
    with pytest.raises(ValueError, match="record has no kv_cache_value"):
        KVCalibration.from_record(model, Record())


@pytest.mark.parametrize("granularity", ["per_tensor", "per_channel"])
def test_int8_cache_equals_fake_quant_on_prefill_and_on_a_decoding_step(granularity):
    model = gpt2()
    cal = calibrate_kv_cache(model, batches(), KVCacheConfig(granularity=granularity, batch_num=2))
    ids = torch.randint(0, 100, (2, 12), generator=torch.Generator().manual_seed(3))
    nxt = torch.randint(0, 100, (2, 1), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        ref = model(ids).logits
        with fake_quant_kv(model, cal):
            fq = model(ids).logits
            fq_full = model(torch.cat([ids, nxt], 1)).logits
        cache = QuantizedKVCache(cal)
        pre = model(ids, past_key_values=cache, use_cache=True).logits
        step = model(nxt, past_key_values=cache, use_cache=True).logits
    assert torch.equal(pre, fq)                     # the cache returns exactly the fake-quantized K and V
    torch.testing.assert_close(step[:, -1], fq_full[:, -1], rtol=1e-5, atol=1e-5)
    assert 0 < float((fq - ref).abs().max()) < 0.05  # quantized, and close to fp32
    assert cache.get_seq_length() == 13


def test_int8_cache_holds_half_the_fp16_bytes_plus_its_factors_and_generates_like_fp32():
    model = gpt2()
    cal = calibrate_kv_cache(model, batches(), KVCacheConfig(batch_num=2))
    ids = torch.randint(0, 100, (1, 8), generator=torch.Generator().manual_seed(5))
    cache = QuantizedKVCache(cal)
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=24, do_sample=False, past_key_values=cache)
        ref = model.generate(ids, max_new_tokens=24, do_sample=False)
    assert torch.equal(out, ref)
    tokens = cache.get_seq_length()
    fp16_bytes = 2 * 2 * 4 * tokens * 16 * 2          # layers x (K, V) x heads x tokens x head_dim x 2 bytes
    factor_bytes = sum(t.numel() * t.element_size() for layer in cache.layers
                       for t in (*layer.key_factors, *layer.value_factors))
    assert cache.nbytes() == fp16_bytes / 2 + factor_bytes and factor_bytes <= 64   # int8 codes: half of fp16


def test_bad_inputs_are_named():
    with pytest.raises(ValueError, match="no key/value projection found"):
        calibrate_kv_cache(torch.nn.Linear(4, 4), [torch.randn(2, 4)])
    with pytest.raises(ValueError, match="yielded no batch"):
        calibrate_kv_cache(gpt2(), [])

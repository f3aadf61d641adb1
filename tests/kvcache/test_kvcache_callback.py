"""KVCacheCalibration inside a real Trainer.validate / fit: factors from the first batch_num validation
batches, perplexity logged with and without the INT8 cache, the record written."""

import math

import lightning as L
import torch
from torch.utils.data import DataLoader, TensorDataset

from amct_torch.config import read_record
from amct_torch.config.kvcache import KVCacheConfig
from amct_torch.kvcache import calibrate_kv_cache, fake_quant_kv
from amct_torch.lightning import KVCacheCalibration
from amct_torch.zoo import CausalLM
from amct_torch.zoo.tasks import evaluate_perplexity
from test_kvcache import gpt2


def loader():
    g = torch.Generator().manual_seed(2)
    ids = torch.randint(0, 100, (12, 17), generator=g)
    return DataLoader(TensorDataset(ids[:, :-1], ids[:, 1:]), batch_size=4)


def test_validation_calibrates_logs_both_perplexities_and_writes_the_record(tmp_path):
    model = gpt2()
    task = CausalLM(model)
    cb = KVCacheCalibration(KVCacheConfig(batch_num=2), record_file=tmp_path / "record.txt")
    trainer = L.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                        enable_model_summary=False, callbacks=[cb])
    trainer.validate(task, loader())
    metrics = trainer.callback_metrics
    batches = list(loader())
    expected = calibrate_kv_cache(gpt2(), [b[0] for b in batches], KVCacheConfig(batch_num=2))
    for name in expected.tensors:
        assert torch.equal(cb.calibration.scale[name], expected.scale[name])
    fp32 = evaluate_perplexity(model, batches)
    with torch.no_grad(), fake_quant_kv(model, cb.calibration):
        int8 = evaluate_perplexity(model, batches)
    assert math.isclose(float(metrics["kv/ppl_fp32"]), fp32, rel_tol=1e-5)
    assert math.isclose(float(metrics["kv/ppl_int8"]), int8, rel_tol=1e-5) and int8 != fp32
    assert math.isclose(float(metrics["kv/ppl_rel"]), int8 / fp32 - 1, rel_tol=1e-4, abs_tol=1e-7)
    assert set(read_record(tmp_path / "record.txt").kv_cache) == set(expected.tensors)
    assert not model.transformer.h[0].attn.c_attn._forward_hooks   # hooks removed

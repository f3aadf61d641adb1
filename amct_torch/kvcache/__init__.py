"""KV-cache quantization: calibration of key/value factors (IFMR, HFMG, min/max; per tensor or per channel)
on the key/value projections, a fake-quant evaluation mode, and an INT8 transformers cache.

AMCT's ``create_quant_cali_config`` / ``create_quant_cali_model`` / ``QuantCalibrationOp`` are in
:mod:`amct_torch.compat.kvcache`; the Lightning callback is :class:`amct_torch.lightning.KVCacheCalibration`.
"""

from .calibrate import (KVCalibration, KVObserver, KVTensor, calibrate_kv_cache, dequantize_kv, fake_quant_kv, kv_projections,
                        quantize_kv)

__all__ = ["KVCalibration", "KVObserver", "KVTensor", "calibrate_kv_cache", "dequantize_kv", "fake_quant_kv", "kv_projections",
           "quantize_kv", "QuantizedKVCache", "Int8KVLayer"]


def __getattr__(name: str):  # the cache needs transformers: imported when asked for
    if name in ("QuantizedKVCache", "Int8KVLayer"):
        from . import cache

        return getattr(cache, name)
    raise AttributeError(f"module 'amct_torch.kvcache' has no attribute {name!r}")

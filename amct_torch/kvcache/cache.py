"""A transformers ``Cache`` that stores keys and values as INT8 (or INT4 values in int8) with the calibrated
factors, so the cache takes a quarter of fp32's bytes (half of fp16's) during generation.

Each layer quantizes the new key/value states with its fixed factors on ``update``, appends the integer
codes, and returns the dequantized whole, so attention sees exactly what :func:`fake_quant_kv` gives in a
single forward. Per-channel factors (one per hidden unit of the projection, ``head x head_dim``) are laid
out as ``(1, heads, 1, head_dim)`` against the cache's ``(batch, heads, seq, head_dim)``.
"""

from __future__ import annotations

import torch
from transformers.cache_utils import BaseQuantizedLayer, Cache

from .calibrate import KVCalibration, dequantize_kv, quantize_kv

__all__ = ["QuantizedKVCache", "Int8KVLayer"]


class Int8KVLayer(BaseQuantizedLayer):
    """One decoder layer's cache: int8 codes of keys and values, fixed (calibrated) factors."""

    def __init__(self, key_factors: tuple[torch.Tensor, torch.Tensor], value_factors: tuple[torch.Tensor, torch.Tensor],
                 bits: int = 8):
        super().__init__()
        self.key_factors, self.value_factors, self.bits = key_factors, value_factors, bits

    @staticmethod
    def _layout(factor: torch.Tensor, states: torch.Tensor) -> torch.Tensor:
        if factor.numel() == 1:
            return factor.reshape(())
        heads, dim = states.shape[1], states.shape[-1]
        if factor.numel() != heads * dim:
            raise ValueError(f"per-channel KV factors: got {factor.numel()} values for {heads} heads x {dim} dims")
        return factor.reshape(1, heads, 1, dim)

    def _quantize(self, states: torch.Tensor, factors: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        scale, offset = (self._layout(f, states) for f in factors)
        return quantize_kv(states, scale, offset, self.bits)

    def _dequantize(self, codes: torch.Tensor, factors: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        scale, offset = (self._layout(f, codes) for f in factors)
        return dequantize_kv(codes, scale, offset, self.dtype)

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        super().lazy_initialization(key_states, value_states)
        # the dtype handed back to attention; set here, since transformers' base layer stopped setting it (5.25)
        self.dtype, self.device = key_states.dtype, key_states.device
        self._quantized_keys = key_states.new_empty((*key_states.shape[:2], 0, key_states.shape[-1]), dtype=torch.int8)
        self._quantized_values = value_states.new_empty((*value_states.shape[:2], 0, value_states.shape[-1]),
                                                        dtype=torch.int8)

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs
               ) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        self.cumulative_length += key_states.shape[-2]
        self._quantized_keys = torch.cat([self._quantized_keys, self._quantize(key_states, self.key_factors)], dim=-2)
        self._quantized_values = torch.cat([self._quantized_values, self._quantize(value_states, self.value_factors)],
                                           dim=-2)
        return (self._dequantize(self._quantized_keys, self.key_factors),
                self._dequantize(self._quantized_values, self.value_factors))

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        if self.is_initialized:
            self._quantized_keys = self._quantized_keys.index_select(0, beam_idx.to(self._quantized_keys.device))
            self._quantized_values = self._quantized_values.index_select(0, beam_idx.to(self._quantized_values.device))

    def nbytes(self) -> int:
        """Bytes held: the integer codes and the factors."""
        if not self.is_initialized:
            return 0
        factors = sum(t.numel() * t.element_size() for t in (*self.key_factors, *self.value_factors))
        return self._quantized_keys.numel() + self._quantized_values.numel() + factors


class QuantizedKVCache(Cache):
    """An INT8 KV cache from a :class:`~amct_torch.kvcache.KVCalibration` (one layer per decoder layer).

    Example::

        cache = QuantizedKVCache(calibrate_kv_cache(model, batches))
        out = model.generate(ids, past_key_values=cache, use_cache=True, max_new_tokens=64, do_sample=False)
        cache.nbytes()

    Pass ``use_cache=True`` when the model's config says ``use_cache=False``: otherwise transformers runs the
    whole sequence at every step and appends it to the cache again (as it would to a ``DynamicCache``).
    """

    def __init__(self, calibration: KVCalibration):
        per_layer: dict[int, dict[str, tuple[torch.Tensor, torch.Tensor]]] = {}
        for name, t in calibration.tensors.items():
            per_layer.setdefault(t.layer_idx, {})[t.role] = (calibration.scale[name], calibration.offset[name])
        layers = []
        for idx in range(max(per_layer) + 1 if per_layer else 0):
            roles = per_layer.get(idx, {})
            if set(roles) != {"key", "value"}:
                raise ValueError(f"QuantizedKVCache: decoder layer {idx} has factors for {sorted(roles) or 'nothing'}; "
                                 "a key and a value are needed for every layer")
            layers.append(Int8KVLayer(roles["key"], roles["value"], calibration.config.bits))
        super().__init__(layers=layers)

    def nbytes(self) -> int:
        """Bytes held by all layers (codes and factors)."""
        return sum(layer.nbytes() for layer in self.layers)

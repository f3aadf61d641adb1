"""KV-cache quantization: calibrate key/value factors on the projections, evaluate with fake quantization,
and generate with a real INT8 cache.

    cal = calibrate_kv_cache(model, batches, KVCacheConfig(granularity="per_channel"))   # IFMR by default
    cal.write("record.txt")                       # AMCT's kv_cache_value {scale, offset} per tensor
    with fake_quant_kv(model, cal):               # K and V quantized as the cache would hold them
        loss = model(**batch).loss
    cache = QuantizedKVCache(cal)                 # INT8 keys and values + the calibrated factors
    model.generate(ids, past_key_values=cache, max_new_tokens=64); cache.nbytes()

The key/value projections are found by name, no tracing: GPT-2's fused ``c_attn`` (transformers
``Conv1D``; its output is ``[query | key | value]`` along the last axis), and ``k_proj``/``v_proj``,
``key``/``value`` linear layers (BERT, LLaMA-style). Their outputs are observed by the configured calibrator
(IFMR, HFMG or min/max; one per tensor, or one per hidden unit = head x head dimension). Factors follow
AMCT's formulas (:func:`~amct_torch.quant.formulas.scale_offset`), asymmetric with an offset by default.

Record names: a projection producing one tensor is named by its module path; the fused one by
``<path>.key`` and ``<path>.value``.
"""

from __future__ import annotations

import contextlib
import os
import re
from dataclasses import dataclass, field
from typing import Any, Iterable, Iterator

import torch
import torch.nn as nn

from ..config import Record, write_record
from ..config.kvcache import KVCacheConfig
from ..config.record import KVCacheRecord
from ..graph.plan import render_table
from ..quant.calibrators import Calibrator, make_calibrator
from ..quant.formulas import dequantize, quantize, scale_offset
from ..quant.ptq import _batches

__all__ = ["KVTensor", "KVCalibration", "KVObserver", "kv_projections", "calibrate_kv_cache", "fake_quant_kv",
           "quantize_kv", "dequantize_kv"]

_KEY_NAMES = ("k_proj", "key", "k")
_VALUE_NAMES = ("v_proj", "value", "v")


@dataclass(frozen=True)
class KVTensor:
    """One cached tensor: which projection makes it, which slice of its output, and which decoder layer."""

    name: str          # record name
    module: str        # projection module path
    role: str          # "key" or "value"
    layer_idx: int     # index of the decoder layer (the cache layer it goes to)
    start: int         # slice of the projection's last axis
    stop: int


def _layer_index(path: str) -> int | None:
    m = re.search(r"(?:^|\.)(\d+)(?:\.|$)", path)
    return int(m.group(1)) if m else None


def kv_projections(model: nn.Module) -> list[KVTensor]:
    """The key and value tensors the model caches, found by module name (see the module docstring)."""
    out: list[KVTensor] = []
    for path, m in model.named_modules():
        leaf = path.rsplit(".", 1)[-1]
        idx = _layer_index(path)
        if idx is None:
            continue
        if leaf == "c_attn" and type(m).__name__ == "Conv1D":
            n = m.weight.shape[1] // 3  # Conv1D weight (in, out): out = 3 * hidden, [q | k | v]
            out += [KVTensor(f"{path}.key", path, "key", idx, n, 2 * n),
                    KVTensor(f"{path}.value", path, "value", idx, 2 * n, 3 * n)]
        elif isinstance(m, nn.Linear) and leaf in _KEY_NAMES + _VALUE_NAMES:
            role = "key" if leaf in _KEY_NAMES else "value"
            out.append(KVTensor(path, path, role, idx, 0, m.out_features))
    return out


@dataclass
class KVCalibration:
    """Calibrated factors: per tensor name, ``scale``/``offset`` tensors (one value, or one per channel)."""

    config: KVCacheConfig
    tensors: dict[str, KVTensor]
    scale: dict[str, torch.Tensor] = field(default_factory=dict)
    offset: dict[str, torch.Tensor] = field(default_factory=dict)
    batches: int = 0

    def record(self) -> Record:
        """AMCT's record: one ``kv_cache_value {scale, offset}`` entry per tensor."""
        rec = Record()
        for name in self.tensors:
            rec.kv_cache[name] = KVCacheRecord(scale=[float(v) for v in self.scale[name].reshape(-1)],
                                               offset=[int(v) for v in self.offset[name].reshape(-1)])
        return rec

    def write(self, path: str | os.PathLike) -> None:
        """Write (or update) the record file: existing layer and prune entries are kept."""
        from ..config import read_record

        rec = read_record(path) if os.path.isfile(path) else Record()
        rec.kv_cache.update(self.record().kv_cache)
        write_record(rec, path)

    @classmethod
    def from_record(cls, model: nn.Module, record: Record | str | os.PathLike,
                    config: KVCacheConfig | None = None) -> "KVCalibration":
        """Factors read back from a record, matched to ``model``'s key/value tensors by name."""
        from ..config import read_record

        rec = record if isinstance(record, Record) else read_record(record)
        tensors = {t.name: t for t in kv_projections(model)}
        missing = [n for n in tensors if n not in rec.kv_cache]
        if missing:
            raise ValueError(f"record has no kv_cache_value for {', '.join(missing[:4])}"
                             f"{' ...' if len(missing) > 4 else ''}; it holds: {', '.join(rec.kv_cache) or 'none'}")
        cal = cls(config or KVCacheConfig(), tensors)
        for name in tensors:
            cal.scale[name] = torch.tensor(rec.kv_cache[name].scale, dtype=torch.float32)
            cal.offset[name] = torch.tensor(rec.kv_cache[name].offset, dtype=torch.int32)
        return cal

    def table(self) -> str:
        rows = []
        for name, t in self.tensors.items():
            s = self.scale[name]
            rows.append((name, t.role, t.layer_idx, s.numel(), f"{float(s.min()):.4g}", f"{float(s.max()):.4g}"))
        return render_table(["tensor", "role", "layer", "factors", "scale min", "scale max"], rows)

    def __str__(self) -> str:
        return f"{self.config.short()}, {self.batches} batches\n{self.table()}"


class KVObserver:
    """Calibrators of key/value tensors: one per tensor, or one per channel (the last axis).

    ``observe(name, x)`` accumulates a batch; ``factors(name)`` fixes AMCT's scale/offset from what was seen.
    ``attach(model, tensors)`` observes the projections' output slices with forward hooks; ``on_module`` (if
    given) is called with a module path each time that module has run one more forward (AMCT's flow writes
    the record once every layer has seen ``batch_num`` batches).
    """

    def __init__(self, configs: dict[str, KVCacheConfig]):
        self.configs = configs
        self.calibrators: dict[str, list[Calibrator]] = {}
        self.seen: dict[str, int] = {}
        self._handles: dict[str, Any] = {}  # module path -> forward hook

    def observe(self, name: str, x: torch.Tensor) -> None:
        cfg = self.configs[name]
        part = x.detach().float()
        if cfg.granularity == "per_channel":
            flat = part.reshape(-1, part.shape[-1])
            cals = self.calibrators.setdefault(name, [make_calibrator(cfg) for _ in range(flat.shape[1])])
            if len(cals) != flat.shape[1]:
                raise ValueError(f"KV tensor {name!r}: got {flat.shape[1]} channels, earlier batches had {len(cals)}")
            for c, cal in enumerate(cals):
                cal.observe(flat[:, c])
        else:
            self.calibrators.setdefault(name, [make_calibrator(cfg)])[0].observe(part)
        self.seen[name] = self.seen.get(name, 0) + 1

    def factors(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        if name not in self.calibrators:
            raise ValueError(f"KV tensor {name!r}: nothing observed yet (run calibration batches first)")
        cfg = self.configs[name]
        symmetric = not cfg.activation_offset
        ranges = [c.clip_range(cfg.bits, symmetric) for c in self.calibrators[name]]
        lo = torch.tensor([r[0] for r in ranges], dtype=torch.float64)
        hi = torch.tensor([r[1] for r in ranges], dtype=torch.float64)
        return scale_offset(lo, hi, cfg.bits, symmetric)

    def attach(self, model: nn.Module, tensors: Iterable[KVTensor], on_module: Any = None) -> "KVObserver":
        modules = dict(model.named_modules())
        by_module: dict[str, list[KVTensor]] = {}
        for t in tensors:
            by_module.setdefault(t.module, []).append(t)

        def hook_for(path: str, ts: list[KVTensor]):
            def hook(_m: nn.Module, _inp: Any, out: torch.Tensor) -> None:
                for t in ts:
                    self.observe(t.name, out[..., t.start:t.stop])
                if on_module is not None:
                    on_module(path)
            return hook

        for p, ts in by_module.items():
            self._handles[p] = modules[p].register_forward_hook(hook_for(p, ts))
        return self

    def detach(self, module: str | None = None) -> None:
        """Stop observing one projection (its module path), or all of them."""
        for p in [module] if module is not None else list(self._handles):
            handle = self._handles.pop(p, None)
            if handle is not None:
                handle.remove()

    def calibration(self, config: KVCacheConfig, tensors: Iterable[KVTensor], batches: int) -> "KVCalibration":
        """The factors of ``tensors`` from what was observed, as a :class:`KVCalibration`."""
        tensors = list(tensors)
        cal = KVCalibration(config, {t.name: t for t in tensors}, batches=batches)
        for t in tensors:
            cal.scale[t.name], cal.offset[t.name] = self.factors(t.name)
        return cal


def calibrate_kv_cache(model: nn.Module, data: Iterable[Any], config: KVCacheConfig | None = None) -> KVCalibration:
    """Observe the key/value projections over ``config.batch_num`` batches of ``data`` and fix the factors.

    ``data`` yields model inputs: a tensor (``model(x)``), a tuple/list (its first element), or a dict of
    keyword inputs (``model(**batch)``). The model is run in eval mode without gradients and left unchanged.
    """
    config = config or KVCacheConfig()
    tensors = kv_projections(model)
    if not tensors:
        raise ValueError("calibrate_kv_cache: no key/value projection found (looked for GPT-2's c_attn Conv1D and "
                         "Linear layers named k_proj/v_proj, key/value inside numbered decoder layers)")
    observer = KVObserver({t.name: config for t in tensors}).attach(model, tensors)
    was_training = model.training
    seen = 0
    try:
        model.eval()
        with torch.no_grad():
            for args, kwargs in _batches(data):
                model(*args, **kwargs)
                seen += 1
                if seen >= config.batch_num:
                    break
    finally:
        observer.detach()
        model.train(was_training)
    if seen == 0:
        raise ValueError("calibrate_kv_cache: data yielded no batch")
    return observer.calibration(config, tensors, seen)


def quantize_kv(x: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor, bits: int) -> torch.Tensor:
    """Integer codes (int8) of ``x`` whose last axis holds the channels (or any shape with one factor)."""
    return quantize(x.float(), scale.to(x.device, torch.float32), offset.to(x.device), bits).to(torch.int8)


def dequantize_kv(q: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return dequantize(q.float(), scale.to(q.device, torch.float32), offset.to(q.device)).to(dtype)


@contextlib.contextmanager
def fake_quant_kv(model: nn.Module, calibration: KVCalibration) -> Iterator[None]:
    """Within the block, the key and value projections' outputs are quantized and dequantized with the
    calibrated factors (what an INT8 cache returns), in a single forward over the whole sequence."""
    modules = dict(model.named_modules())
    bits = calibration.config.bits
    by_module: dict[str, list[KVTensor]] = {}
    for t in calibration.tensors.values():
        if t.module not in modules:
            raise ValueError(f"fake_quant_kv: the model has no module {t.module!r} (calibrated on another model?)")
        by_module.setdefault(t.module, []).append(t)

    def hook_for(ts: list[KVTensor]):
        def hook(_m: nn.Module, _inp: Any, out: torch.Tensor) -> torch.Tensor:
            out = out.clone()
            for t in ts:
                part = out[..., t.start:t.stop]
                q = quantize_kv(part, calibration.scale[t.name], calibration.offset[t.name], bits)
                out[..., t.start:t.stop] = dequantize_kv(q, calibration.scale[t.name], calibration.offset[t.name], out.dtype)
            return out
        return hook

    handles = [modules[p].register_forward_hook(hook_for(ts)) for p, ts in by_module.items()]
    try:
        yield
    finally:
        for h in handles:
            h.remove()

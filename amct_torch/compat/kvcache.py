"""AMCT's KV-cache calibration functions on :mod:`amct_torch.kvcache`.

An AMCT script runs unchanged with ``import amct_torch as amct``::

    amct.create_quant_cali_config("./kv.json", model, quant_layers={"kv_cache_quant_layers": ["model.layers.0.self_attn.k_proj", ...]})
    model = amct.create_quant_cali_model("./kv.json", "./record.txt", model)
    for batch in calibration_batches:            # batch_num forwards: the record gets kv_cache_value entries
        model(batch)

    op = amct.QuantCalibrationOp("./record.txt", {"act_algo": "hfmg", "batch_num": 2}, quant_method="kv_cache_quant")
    y = op("layer_name", y)                       # custom graphs: observe a tensor by name, passes it through

The JSON (AMCT §2.5): ``{"batch_num": 1, "activation_offset": true, "<layer>": {"kv_data_quant_config":
{"act_algo": "ifmr"|"hfmg", "quant_granularity": 0|1, "num_of_bins": 4096, "max_percentile": ...}}}``;
``create_quant_cali_config(..., config_defination="kv.cfg")`` writes it from AMCT's ``.cfg``
(``kv_cache_quant_config { quant_layers: ... calibration_config { hfmg_quantize {} } }``,
``override_layers_configs { layer_name: ... kv_data_quant_config { ifmr_quantize {} } }``).
A layer is a Linear (or transformers Conv1D) whose whole output is a key or a value (``k_proj``, ``key``...),
or one of the key/value slices of GPT-2's fused ``c_attn`` (``<path>.key`` / ``<path>.value``). Unlike AMCT,
more forwards than ``batch_num`` do not corrupt anything: the record is written once per tensor, when it has
seen ``batch_num`` batches, and later batches are not observed.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from ..config import ConfigError, Record, read_record, write_record
from ..config.kvcache import KVCacheConfig
from ..config.record import KVCacheRecord
from ..kvcache.calibrate import KVObserver, KVTensor, _layer_index, kv_projections
from ._layers import pick_spelling

__all__ = ["create_quant_cali_config", "create_quant_cali_model", "QuantCalibrationOp"]

_ALGOS = {"ifmr": "ifmr", "hfmg": "hfmg"}
_PARAM_KEYS = {"act_algo", "num_bits", "with_offset", "asymmetric", "batch_num", "quant_granularity", "max_percentile",
               "min_percentile", "search_range", "search_step", "num_of_bins"}


def _tensors_by_name(model: nn.Module) -> dict[str, KVTensor]:
    """Every nameable KV tensor: detected slices and projections, plus any Linear/Conv1D as a whole output."""
    found = {t.name: t for t in kv_projections(model)}
    for path, m in model.named_modules():
        if path in found or not (isinstance(m, nn.Linear) or type(m).__name__ == "Conv1D"):
            continue
        out = m.out_features if isinstance(m, nn.Linear) else m.weight.shape[1]
        leaf = path.rsplit(".", 1)[-1].lower()
        role = "value" if leaf.startswith("v") or "value" in leaf else "key"
        found[path] = KVTensor(path, path, role, _layer_index(path) or 0, 0, out)
    return found


def _config_of(params: dict[str, Any], where: str, batch_num: int = 1, offset: bool = True) -> KVCacheConfig:
    unknown = sorted(set(params) - _PARAM_KEYS)
    if unknown:
        raise ConfigError(f"{where}.{unknown[0]}", params[unknown[0]], "one of " + ", ".join(sorted(_PARAM_KEYS)))
    algo = params.get("act_algo", "ifmr")
    if algo not in _ALGOS:
        raise ConfigError(f"{where}.act_algo", algo, "'ifmr' or 'hfmg'")
    gran = params.get("quant_granularity", 0)
    if gran not in (0, 1):
        raise ConfigError(f"{where}.quant_granularity", gran, "0 (per_tensor) or 1 (per_channel)")
    with_offset = params.get("with_offset", params.get("asymmetric", offset))
    fields: dict[str, Any] = {"bits": params.get("num_bits", 8), "activation_calibrator": _ALGOS[algo],
                              "granularity": "per_channel" if gran == 1 else "per_tensor",
                              "activation_offset": bool(with_offset), "batch_num": params.get("batch_num", batch_num)}
    for key in ("max_percentile", "min_percentile", "search_step", "num_of_bins"):
        if key in params:
            fields[key] = params[key]
    if "search_range" in params:
        fields["search_range"] = tuple(params["search_range"])
    try:
        return KVCacheConfig(**fields)
    except ConfigError as e:
        raise ConfigError(f"{where}.{e.key.split('.', 1)[-1]}", e.value, e.allowed) from None


def create_quant_cali_config(config_file: str | os.PathLike, model: nn.Module, quant_layers: dict | None = None,
                             config_defination: str | os.PathLike | None = None, *,
                             config_definition: str | os.PathLike | None = None) -> None:
    """Write AMCT's KV-cache calibration JSON: ``quant_layers={'kv_cache_quant_layers': [names]}`` picks the
    layers (default: every key/value projection found), each with AMCT's defaults (IFMR, per tensor); or
    ``config_defination``, AMCT's .cfg (``kv_cache_quant_config`` with ``quant_layers`` and a common
    ``calibration_config``, ``override_layers_configs`` per layer), whose layers join ``quant_layers``."""
    config_defination = pick_spelling(config_definition, config_defination, "config_definition")
    tensors = _tensors_by_name(model)
    if config_defination is not None:
        data = _json_from_cfg(config_defination, quant_layers)
        bad = [n for n in data if n not in ("batch_num", "activation_offset") and n not in tensors]
        if bad:
            raise ConfigError(f"{config_defination}: quant_layers", bad[0],
                              "a Linear / Conv1D layer of the model or a fused key/value slice; found: "
                              + ", ".join(list(tensors)[:8]) + (" ..." if len(tensors) > 8 else ""))
        _write_json(config_file, data)
        return
    if quant_layers is None:
        names = [t.name for t in kv_projections(model)]
        if not names:
            raise ValueError("create_quant_cali_config: no key/value projection found; pass quant_layers="
                             "{'kv_cache_quant_layers': [<Linear layer names>]}")
    else:
        if not isinstance(quant_layers, dict) or set(quant_layers) != {"kv_cache_quant_layers"}:
            raise ConfigError("create_quant_cali_config.quant_layers", quant_layers,
                              "{'kv_cache_quant_layers': [layer names]}")
        names = list(quant_layers["kv_cache_quant_layers"])
        bad = [n for n in names if n not in tensors]
        if bad:
            raise ConfigError("create_quant_cali_config.quant_layers.kv_cache_quant_layers", bad[0],
                              "a Linear / Conv1D layer of the model or a fused key/value slice; found: "
                              + ", ".join(list(tensors)[:8]) + (" ..." if len(tensors) > 8 else ""))
    data: dict[str, Any] = {"batch_num": 1, "activation_offset": True}
    for name in names:
        data[name] = {"kv_data_quant_config": {"act_algo": "ifmr", "max_percentile": 0.999999,
                                               "min_percentile": 0.999999, "search_range": [0.7, 1.3],
                                               "search_step": 0.01, "quant_granularity": 0}}
    _write_json(config_file, data)


def _write_json(config_file: str | os.PathLike, data: dict[str, Any]) -> None:
    Path(config_file).parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(f"{config_file}.tmp")
    tmp.write_text(json.dumps(data, indent=4))
    os.replace(tmp, config_file)


def _algo_params(msg: Any) -> dict[str, Any]:
    """One ``KVDataQuantConfig`` as the JSON's ``kv_data_quant_config`` (fields set in the .cfg only, over
    AMCT's defaults)."""
    from ..config.amct_cfg import _f32

    out: dict[str, Any] = {"act_algo": "ifmr", "quant_granularity": int(msg.quant_granularity)}
    which = msg.WhichOneof("kv_quant_algo")
    if which == "hfmg_quantize":
        out["act_algo"] = "hfmg"
        out["num_of_bins"] = int(msg.hfmg_quantize.num_of_bins)
        algo = msg.hfmg_quantize
    else:
        algo = msg.ifmr_quantize
        out.update(max_percentile=_f32(algo.max_percentile), min_percentile=_f32(algo.min_percentile),
                   search_range=[_f32(algo.search_range_start), _f32(algo.search_range_end)],
                   search_step=_f32(algo.search_step))
    if algo.HasField("asymmetric"):
        out["asymmetric"] = bool(algo.asymmetric)
    return out


def _json_from_cfg(path: str | os.PathLike, quant_layers: dict | None) -> dict[str, Any]:
    """AMCT's KV-cache .cfg (``kv_cache_quant_config { quant_layers: ... calibration_config { ... } }``,
    ``override_layers_configs { layer_name: ... kv_data_quant_config { ... } }``) as the JSON config."""
    from ..config.amct_proto import AMCTQuantCaliConfig, KVDataQuantConfig, parse_text

    text = Path(path).read_text()
    cfg = parse_text(text, AMCTQuantCaliConfig, str(path))
    kv = cfg.kv_cache_quant_config
    names = list(kv.quant_layers)
    if quant_layers is not None:
        names += [n for n in quant_layers.get("kv_cache_quant_layers", []) if n not in names]
    overrides = {o.layer_name: o.kv_data_quant_config for o in cfg.override_layers_configs}
    names += [n for n in overrides if n not in names]
    if not names:
        raise ConfigError(f"{path}: kv_cache_quant_config.quant_layers", [], "at least one layer name")
    common = kv.calibration_config if kv.HasField("calibration_config") else KVDataQuantConfig()
    data: dict[str, Any] = {"batch_num": int(cfg.batch_num), "activation_offset": bool(cfg.activation_offset)}
    for name in names:
        data[name] = {"kv_data_quant_config": _algo_params(overrides.get(name, common))}
    return data


def _read_config(config_file: str | os.PathLike, model: nn.Module) -> tuple[dict[str, KVCacheConfig], dict[str, KVTensor]]:
    try:
        data = json.loads(Path(config_file).read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(f"{config_file}", f"line {e.lineno}", f"valid JSON ({e.msg})") from None
    batch_num = data.get("batch_num", 1)
    offset = data.get("activation_offset", True)
    tensors = _tensors_by_name(model)
    configs = {}
    for name, entry in data.items():
        if name in ("batch_num", "activation_offset"):
            continue
        if name not in tensors:
            raise ConfigError(f"{config_file}: {name}", name, "a layer of the model (the config was written for another)")
        if not isinstance(entry, dict) or "kv_data_quant_config" not in entry:
            raise ConfigError(f"{config_file}: {name}", entry, "{'kv_data_quant_config': {...}}")
        configs[name] = _config_of(entry["kv_data_quant_config"], f"{config_file}: {name}.kv_data_quant_config",
                                   batch_num, offset)
    if not configs:
        raise ConfigError(f"{config_file}", "no layers", "at least one layer entry with kv_data_quant_config")
    return configs, {n: tensors[n] for n in configs}


def _write_entry(record_file: str | os.PathLike, name: str, scale: torch.Tensor, offset: torch.Tensor) -> None:
    rec = read_record(record_file) if os.path.isfile(record_file) else Record()
    rec.kv_cache[name] = KVCacheRecord(scale=[float(v) for v in scale.reshape(-1)],
                                       offset=[int(v) for v in offset.reshape(-1)])
    write_record(rec, record_file)


def create_quant_cali_model(config_file: str | os.PathLike, record_file: str | os.PathLike, model: nn.Module) -> nn.Module:
    """Observe the configured layers' outputs (unchanged) on ``model``'s next forwards; once a layer has seen
    its ``batch_num`` batches its ``kv_cache_value`` goes into ``record_file``. Returns ``model`` (hooked;
    ``model.amct_kv_observer.detach()`` removes the hooks)."""
    configs, tensors = _read_config(config_file, model)
    observer = KVObserver(configs)
    written: set[str] = set()
    by_module: dict[str, list[str]] = {}
    for t in tensors.values():
        by_module.setdefault(t.module, []).append(t.name)

    def on_module(path: str) -> None:
        for name in by_module[path]:
            if name not in written and observer.seen.get(name, 0) >= configs[name].batch_num:
                _write_entry(record_file, name, *observer.factors(name))
                written.add(name)
        if all(n in written for n in by_module[path]):
            observer.detach(path)  # that layer is done: later batches are not observed

    observer.attach(model, tensors.values(), on_module)
    if os.path.isfile(record_file):
        rec = read_record(record_file)
        for name in tensors:
            rec.kv_cache.pop(name, None)  # a new calibration replaces old entries instead of appending to them
        write_record(rec, record_file)
    model.amct_kv_observer = observer
    return model


class QuantCalibrationOp(nn.Module):
    """AMCT's calibration op for custom graphs: ``op(layer_name, x)`` observes ``x`` (its last axis holds the
    channels for per-channel factors) and returns it unchanged; after ``batch_num`` calls for a name, that
    name's ``kv_cache_value`` is written into ``record_file`` (later calls for it are not observed)."""

    def __init__(self, record_file: str | os.PathLike, quant_algo_params: dict[str, Any] | None = None,
                 quant_method: str = "kv_cache_quant"):
        super().__init__()
        if quant_method != "kv_cache_quant":
            raise ConfigError("QuantCalibrationOp.quant_method", quant_method, "'kv_cache_quant'")
        self.record_file = record_file
        self.config = _config_of(dict(quant_algo_params or {}), "QuantCalibrationOp.quant_algo_params")
        self.observer = KVObserver({})
        self.written: set[str] = set()

    def forward(self, layer_name: str, x: torch.Tensor) -> torch.Tensor:
        if layer_name in self.written:
            return x
        self.observer.configs.setdefault(layer_name, self.config)
        self.observer.observe(layer_name, x)
        if self.observer.seen[layer_name] >= self.config.batch_num:
            _write_entry(self.record_file, layer_name, *self.observer.factors(layer_name))
            self.written.add(layer_name)
            self.observer.calibrators.pop(layer_name, None)
        return x

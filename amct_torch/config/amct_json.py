"""AMCT's PTQ quantization config in JSON (what ``create_quant_config`` writes), read and written.

    {"version": 1, "batch_num": 2, "activation_offset": true, "do_fusion": true, "skip_fusion_layers": [],
     "conv1": {"quant_enable": true, "dmq_balancer_param": 0.5,
               "activation_quant_params": {"num_bits": 8, "max_percentile": 0.999999, "min_percentile": 0.999999,
                                           "search_range": [0.7, 1.3], "search_step": 0.01, "act_algo": "ifmr",
                                           "asymmetric": false},
               "weight_quant_params": {"num_bits": 8, "wts_algo": "arq_quantize", "channel_wise": true}}}

Top-level keys are the global settings (:class:`AmctGlobal`) and one object per layer. A layer maps to a
:class:`~amct_torch.config.quant.QuantConfig`, or to ``None`` (``"quant_enable": false``):

- ``activation_quant_params``: ``num_bits``; ``act_algo`` ``ifmr`` (AMCT's default when absent) with
  ``max_percentile``, ``min_percentile``, ``search_range``, ``search_step``; ``hfmg`` with ``num_of_bins``;
  and this toolkit's own calibrators ``minmax``, ``percentile`` (with the two percentiles) and ``mse``
  (with ``num_of_bins``); ``asymmetric`` (absent: the global ``activation_offset``). A layer without
  ``activation_quant_params`` quantizes weights only (``activation_bits=None``).
- ``weight_quant_params``: ``num_bits``, ``wts_algo`` (``arq_quantize`` or ``ada_quantize`` with
  ``num_iteration``, ``reg_param``, ``beta_range``, ``warm_start``), ``channel_wise`` (per channel or
  per tensor). Absent: the defaults (8-bit ARQ per channel).
- ``dmq_balancer_param``: DMQ migration strength in [0.2, 0.8].

``batch_num`` is global in AMCT: the file gets ``settings.batch_num`` and reading gives every layer that
``batch_num``. Per-group weights and per-token activations have no AMCT spelling and cannot be written.
Every key is checked; errors name the file, the layer and the key path::

    config.json: layer 'conv1' activation_quant_params.num_of_bins: got 1000; allowed: one of 1024, 2048, 4096, 8192
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Any

from . import amct_proto
from .base import Config, ConfigError, check_range
from .granularity import PerChannel, PerTensor
from .quant import QuantConfig

__all__ = ["AmctGlobal", "write_quant_json", "read_quant_json", "quant_json_dict", "parse_quant_json"]

_GLOBAL_KEYS = ("version", "batch_num", "activation_offset", "do_fusion", "skip_fusion_layers")
_LAYER_KEYS = ("quant_enable", "dmq_balancer_param", "activation_quant_params", "weight_quant_params")
_ACT_KEYS = {
    "ifmr": ("num_bits", "act_algo", "max_percentile", "min_percentile", "search_range", "search_step", "asymmetric"),
    "hfmg": ("num_bits", "act_algo", "num_of_bins", "asymmetric"),
    "minmax": ("num_bits", "act_algo", "asymmetric"),
    "percentile": ("num_bits", "act_algo", "max_percentile", "min_percentile", "asymmetric"),
    "mse": ("num_bits", "act_algo", "num_of_bins", "asymmetric"),
}
_WTS_ALGOS = {"arq_quantize": "arq", "ada_quantize": "adaround"}
_WTS_KEYS = {
    "arq_quantize": ("num_bits", "wts_algo", "channel_wise"),
    "ada_quantize": ("num_bits", "wts_algo", "channel_wise", "num_iteration", "reg_param", "beta_range", "warm_start"),
}
# AMCT keys this toolkit cannot honour: named in the error instead of "no such key".
_AMCT_ONLY = ("fakequant_precision_mode", "joint_quant", "skip_approximation_layers", "tensor_quantize",
              "nuq_quantize")

# QuantConfig field -> JSON key path (to word QuantConfig's own range errors in the file's terms).
_FIELD_PATHS = {
    "weight_bits": "weight_quant_params.num_bits", "activation_bits": "activation_quant_params.num_bits",
    "activation_offset": "activation_quant_params.asymmetric", "activation_calibrator": "activation_quant_params.act_algo",
    "max_percentile": "activation_quant_params.max_percentile", "min_percentile": "activation_quant_params.min_percentile",
    "search_range": "activation_quant_params.search_range", "search_step": "activation_quant_params.search_step",
    "num_of_bins": "activation_quant_params.num_of_bins", "weight_algorithm": "weight_quant_params.wts_algo",
    "weight_granularity": "weight_quant_params.channel_wise",
    "ada_num_iteration": "weight_quant_params.num_iteration", "ada_reg_param": "weight_quant_params.reg_param",
    "ada_beta_range": "weight_quant_params.beta_range", "ada_warm_start": "weight_quant_params.warm_start",
    "batch_num": "batch_num", "dmq_balancer_param": "dmq_balancer_param",
}


@dataclass(frozen=True)
class AmctGlobal(Config):
    """The global keys of AMCT's quantization config (JSON top level, ``.cfg`` top level)."""

    version: int = 1
    batch_num: int = 1
    activation_offset: bool = True
    do_fusion: bool = True
    skip_fusion_layers: tuple[str, ...] = ()

    def validate(self) -> None:
        if self.version != 1:
            raise ConfigError("AmctGlobal.version", self.version, "1")
        check_range("AmctGlobal", "batch_num", self.batch_num, 1)


# -- writing --------------------------------------------------------------------------------------------
def quant_json_dict(settings: AmctGlobal, layers: dict[str, QuantConfig | None]) -> dict[str, Any]:
    """The JSON object (plain dict) of ``settings`` and ``layers``; raises if something has no AMCT spelling."""
    if not isinstance(settings, AmctGlobal):
        raise ConfigError("write_quant_json.settings", settings, "an AmctGlobal")
    out: dict[str, Any] = {"version": settings.version, "batch_num": settings.batch_num,
                           "activation_offset": settings.activation_offset, "do_fusion": settings.do_fusion,
                           "skip_fusion_layers": list(settings.skip_fusion_layers)}
    for name, cfg in layers.items():
        where = f"layer '{name}'"
        if not isinstance(name, str) or not name or name in _GLOBAL_KEYS:
            raise ConfigError("write_quant_json: layer name", name,
                              "a non-empty module path that is not a global key (" + ", ".join(_GLOBAL_KEYS) + ")")
        if cfg is None:
            out[name] = {"quant_enable": False}
            continue
        if not isinstance(cfg, QuantConfig):
            raise ConfigError(f"write_quant_json: {where}", cfg, "a QuantConfig or None (not quantized)")
        entry: dict[str, Any] = {"quant_enable": True}
        if cfg.dmq_balancer_param is not None:
            entry["dmq_balancer_param"] = cfg.dmq_balancer_param
        if cfg.activation_bits is not None:
            if not isinstance(cfg.activation_granularity, PerTensor):
                raise ConfigError(f"write_quant_json: {where} activation_granularity",
                                  cfg.activation_granularity.to_plain(), "per_tensor (AMCT's JSON has no per_token)")
            act: dict[str, Any] = {"num_bits": cfg.activation_bits}
            algo = cfg.activation_calibrator
            if algo in ("ifmr", "percentile"):
                act["max_percentile"] = cfg.max_percentile
                act["min_percentile"] = cfg.min_percentile
            if algo == "ifmr":
                act["search_range"] = list(cfg.search_range)
                act["search_step"] = cfg.search_step
            if algo in ("hfmg", "mse"):
                act["num_of_bins"] = cfg.num_of_bins
            act["act_algo"] = algo
            act["asymmetric"] = cfg.activation_offset
            entry["activation_quant_params"] = act
        if isinstance(cfg.weight_granularity, PerChannel):
            channel_wise = True
        elif isinstance(cfg.weight_granularity, PerTensor):
            channel_wise = False
        else:
            raise ConfigError(f"write_quant_json: {where} weight_granularity", cfg.weight_granularity.to_plain(),
                              "per_channel or per_tensor (AMCT's channel_wise true/false)")
        wts: dict[str, Any] = {"num_bits": cfg.weight_bits}
        if cfg.weight_algorithm == "adaround":
            wts.update(wts_algo="ada_quantize", num_iteration=cfg.ada_num_iteration, reg_param=cfg.ada_reg_param,
                       beta_range=list(cfg.ada_beta_range), warm_start=cfg.ada_warm_start)
        else:
            wts["wts_algo"] = "arq_quantize"
        wts["channel_wise"] = channel_wise
        entry["weight_quant_params"] = wts
        out[name] = entry
    return out


def write_quant_json(path: str | os.PathLike[str], settings: AmctGlobal,
                     layers: dict[str, QuantConfig | None]) -> None:
    """Write AMCT's PTQ JSON config atomically; ``None`` layers get ``"quant_enable": false``."""
    text = json.dumps(quant_json_dict(settings, layers), indent=4) + "\n"
    amct_proto.atomic_write_text(path, text)


# -- reading --------------------------------------------------------------------------------------------
def read_quant_json(path: str | os.PathLike[str]) -> tuple[AmctGlobal, dict[str, QuantConfig | None]]:
    """Read and validate an AMCT PTQ JSON config: ``(global settings, layer -> QuantConfig or None)``."""
    source = os.fspath(path)
    with open(source, encoding="utf-8") as fh:
        text = fh.read()
    return parse_quant_json(text, source)


def _no_duplicates(source: str):
    def hook(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for key, value in pairs:
            if key in out:
                raise ConfigError(f"{source}: key '{key}'", "given twice", "each key once per object")
            out[key] = value
        return out
    return hook


def parse_quant_json(text: str, source: str = "<json>") -> tuple[AmctGlobal, dict[str, QuantConfig | None]]:
    """:func:`read_quant_json` on a string (``source`` names it in errors)."""
    try:
        data = json.loads(text, object_pairs_hook=_no_duplicates(source))
    except json.JSONDecodeError as err:
        raise ConfigError(f"{source}: line {err.lineno}, column {err.colno}", err.doc[err.pos:err.pos + 20],
                          f"valid JSON ({err.msg})") from None
    if not isinstance(data, dict):
        raise ConfigError(source, data, "a JSON object of global keys and layers")

    glob: dict[str, Any] = {}
    layer_data: dict[str, Any] = {}
    for key, value in data.items():
        if key in _GLOBAL_KEYS:
            glob[key] = value
        elif isinstance(value, dict):
            layer_data[key] = value
        elif key in _AMCT_ONLY:
            raise ConfigError(f"{source}: {key}", value, "not supported by amct_torch (an AMCT-only key); remove it")
        else:
            raise ConfigError(f"{source}: {key}", value,
                              "a global key (" + ", ".join(_GLOBAL_KEYS) + ") or a layer name with an object")
    settings = _read_global(glob, source)

    layers: dict[str, QuantConfig | None] = {}
    for name, entry in layer_data.items():
        layers[name] = _read_layer(entry, settings, f"{source}: layer '{name}'")
    return settings, layers


def _type_ok(value: Any, kind: str) -> bool:
    if kind == "bool":
        return isinstance(value, bool)
    if kind == "int":
        return isinstance(value, int) and not isinstance(value, bool)
    if kind == "number":
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if kind == "str":
        return isinstance(value, str)
    if kind == "pair":
        return isinstance(value, list) and len(value) == 2 and all(_type_ok(v, "number") for v in value)
    if kind == "strs":
        return isinstance(value, list) and all(isinstance(v, str) for v in value)
    raise AssertionError(kind)


_KIND_WORDS = {"bool": "true or false", "int": "an integer", "number": "a number", "str": "a string",
               "pair": "a list of two numbers [start, end]", "strs": "a list of layer names (strings)"}


def _get(data: dict[str, Any], key: str, kind: str, where: str, default: Any = None) -> Any:
    if key not in data:
        return default
    value = data[key]
    if not _type_ok(value, kind):
        raise ConfigError(f"{where}{key}", value, _KIND_WORDS[kind])
    return value


def _read_global(glob: dict[str, Any], source: str) -> AmctGlobal:
    where = f"{source}: "
    version = _get(glob, "version", "int", where, 1)
    if version != 1:
        raise ConfigError(f"{where}version", version, "1")
    batch_num = _get(glob, "batch_num", "int", where, 1)
    if batch_num <= 0:
        raise ConfigError(f"{where}batch_num", batch_num, "an integer > 0")
    return AmctGlobal(version=version, batch_num=batch_num,
                      activation_offset=_get(glob, "activation_offset", "bool", where, True),
                      do_fusion=_get(glob, "do_fusion", "bool", where, True),
                      skip_fusion_layers=tuple(_get(glob, "skip_fusion_layers", "strs", where, [])))


def _check_keys(data: dict[str, Any], known: tuple[str, ...], where: str, extra: str = "") -> None:
    for key in data:
        if key not in known:
            raise ConfigError(f"{where}{key}", data[key], f"no such key{extra}; known keys: " + ", ".join(known))


def _read_layer(entry: dict[str, Any], settings: AmctGlobal, where: str) -> QuantConfig | None:
    prefix = f"{where} "
    _check_keys(entry, _LAYER_KEYS, prefix)
    enable = _get(entry, "quant_enable", "bool", prefix, True)
    fields: dict[str, Any] = {"batch_num": settings.batch_num, "activation_offset": settings.activation_offset}

    dmq = _get(entry, "dmq_balancer_param", "number", prefix)
    if dmq is not None:
        if not 0.2 <= dmq <= 0.8:
            raise ConfigError(f"{prefix}dmq_balancer_param", dmq, "0.2 <= dmq_balancer_param <= 0.8")
        fields["dmq_balancer_param"] = float(dmq)

    act = entry.get("activation_quant_params")
    if act is None and "activation_quant_params" not in entry:
        fields["activation_bits"] = None
    else:
        fields.update(_read_act(act, f"{prefix}activation_quant_params."))
    wts = entry.get("weight_quant_params", {})
    fields.update(_read_wts(wts, f"{prefix}weight_quant_params."))

    try:
        cfg = QuantConfig(**fields)
    except ConfigError as err:
        raise _reword(err, prefix) from None
    return cfg if enable else None


def _reword(err: ConfigError, prefix: str) -> ConfigError:
    """A QuantConfig error in the file's terms: ``<file>: layer 'x' <json key path>: got ...``."""
    field = err.key.rsplit(".", 1)[-1]
    path = _FIELD_PATHS.get(field, field)
    allowed = err.allowed.replace(field, path.rsplit(".", 1)[-1]) if field in _FIELD_PATHS else err.allowed
    return ConfigError(f"{prefix}{path}", err.value, allowed)


def _read_act(act: Any, where: str) -> dict[str, Any]:
    if not isinstance(act, dict):
        raise ConfigError(where.rstrip("."), act, "an object with num_bits, act_algo, ...")
    algo = _get(act, "act_algo", "str", where, "ifmr")
    if algo not in _ACT_KEYS:
        raise ConfigError(f"{where}act_algo", algo, "one of " + ", ".join(_ACT_KEYS))
    _check_keys(act, _ACT_KEYS[algo], where, f" for act_algo '{algo}'")
    out: dict[str, Any] = {"activation_calibrator": algo}
    bits = _get(act, "num_bits", "int", where, 8)
    if bits not in (4, 8, 16):
        raise ConfigError(f"{where}num_bits", bits, "one of 4, 8, 16")
    out["activation_bits"] = bits
    for key in ("max_percentile", "min_percentile"):
        value = _get(act, key, "number", where)
        if value is not None:
            if not 0.5 < value <= 1:
                raise ConfigError(f"{where}{key}", value, f"0.5 < {key} <= 1")
            out[key] = float(value)
    rng = _get(act, "search_range", "pair", where)
    if rng is not None:
        if not 0 < rng[0] < rng[1]:
            raise ConfigError(f"{where}search_range", rng, "[start, end] with 0 < start < end")
        out["search_range"] = (float(rng[0]), float(rng[1]))
    step = _get(act, "search_step", "number", where)
    if step is not None:
        start, end = out.get("search_range", QuantConfig.__dataclass_fields__["search_range"].default)
        if not 0 < step <= end - start:
            raise ConfigError(f"{where}search_step", step, f"0 < search_step <= search_range end - start ({end - start:g})")
        out["search_step"] = float(step)
    bins = _get(act, "num_of_bins", "int", where)
    if bins is not None:
        if bins not in (1024, 2048, 4096, 8192):
            raise ConfigError(f"{where}num_of_bins", bins, "one of 1024, 2048, 4096, 8192")
        out["num_of_bins"] = bins
    asym = _get(act, "asymmetric", "bool", where)
    if asym is not None:
        out["activation_offset"] = asym
    return out


def _read_wts(wts: Any, where: str) -> dict[str, Any]:
    if not isinstance(wts, dict):
        raise ConfigError(where.rstrip("."), wts, "an object with num_bits, wts_algo, channel_wise, ...")
    algo = _get(wts, "wts_algo", "str", where, "arq_quantize")
    if algo not in _WTS_ALGOS:
        hint = " (nuq_quantize is AMCT-commercial only)" if algo == "nuq_quantize" else ""
        raise ConfigError(f"{where}wts_algo", algo, "one of " + ", ".join(_WTS_ALGOS) + hint)
    _check_keys(wts, _WTS_KEYS[algo], where, f" for wts_algo '{algo}'")
    out: dict[str, Any] = {"weight_algorithm": _WTS_ALGOS[algo]}
    bits = _get(wts, "num_bits", "int", where, 8)
    if bits not in (4, 6, 7, 8, 16):
        raise ConfigError(f"{where}num_bits", bits, "one of 4, 6, 7, 8, 16")
    out["weight_bits"] = bits
    cw = _get(wts, "channel_wise", "bool", where)
    if cw is not None:
        out["weight_granularity"] = PerChannel() if cw else PerTensor()
    if algo == "ada_quantize":
        n = _get(wts, "num_iteration", "int", where)
        if n is not None:
            if n <= 0:
                raise ConfigError(f"{where}num_iteration", n, "an integer > 0")
            out["ada_num_iteration"] = n
        reg = _get(wts, "reg_param", "number", where)
        if reg is not None:
            if reg <= 0:
                raise ConfigError(f"{where}reg_param", reg, "a number > 0")
            out["ada_reg_param"] = float(reg)
        beta = _get(wts, "beta_range", "pair", where)
        if beta is not None:
            if not beta[0] > beta[1] > 0:
                raise ConfigError(f"{where}beta_range", beta, "[start, end] with start > end > 0")
            out["ada_beta_range"] = (float(beta[0]), float(beta[1]))
        warm = _get(wts, "warm_start", "number", where)
        if warm is not None:
            if not 0 <= warm < 1:
                raise ConfigError(f"{where}warm_start", warm, "0 <= warm_start < 1")
            out["ada_warm_start"] = float(warm)
    return out

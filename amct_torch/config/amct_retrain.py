"""AMCT's quantization-aware training (retrain) configs: the QAT JSON and the simplified retrain ``.cfg``.

The JSON (what ``create_quant_retrain_config`` writes) holds two global keys and one object per layer::

    {"version": 1, "batch_num": 2,
     "conv1": {"retrain_enable": true,
               "retrain_data_config": {"algo": "ulq_quantize", "dst_type": "INT8", "clip_max": 3.0, "clip_min": -3.0},
               "retrain_weight_config": {"algo": "arq_retrain", "channel_wise": true, "dst_type": "INT8"}},
     "fc":    {"retrain_enable": false}}

A layer maps to a :class:`~amct_torch.config.qat.QatConfig`, or to ``None`` (``"retrain_enable": false``):

- ``retrain_data_config``: ``algo`` ``ulq_quantize`` (``activation_algorithm="ulq"``; this toolkit also
  reads and writes ``lsq_plus``), ``dst_type`` ``INT4``/``INT8``/``INT16`` (activation bits), optional
  ``clip_max`` (> 0) and ``clip_min`` (< 0), the initial clips (absent: initialised by IFMR over the first
  ``batch_num`` steps), ``fixed_min`` (lower clip pinned at 0; absent: automatic after ReLU) and
  ``batch_num`` (this layer only; written when it differs from the global one). A layer without it trains
  its weights only (``activation_bits=None``).
- ``retrain_weight_config``: ``algo`` ``arq_retrain`` or ``ulq_retrain`` (AMCT; also ``lsq_plus``; the
  alias ``weights_retrain_algo`` of AMCT's single-op config is read too), ``channel_wise`` (per channel
  or per tensor) and ``dst_type`` ``INT4``/``INT8`` (weight bits). The (activation, weight) bits must be
  one of AMCT's pairs A8W8, A8W4, A4W4, A16W8.

Round trip: JSON -> configs -> JSON gives back every value. A config whose values AMCT's JSON cannot
spell (symmetric activations, another initial calibrator or its parameters) is refused on writing.

The ``.cfg`` is protobuf text of AMCT's ``AMCTRetrainConfig``::

    batch_num: 2
    retrain_data_quant_config: { ulq_quantize: { clip_max_min: { clip_max: 6.0 clip_min: -6.0 } fixed_min: true } }
    retrain_weight_quant_config: { arq_retrain: { channel_wise: true dst_type: INT8 } }
    skip_layers: "conv1"
    override_layer_types: { layer_type: "Linear" retrain_weight_quant_config: { arq_retrain: { channel_wise: false } } }
    override_layer_configs: { layer_name: "fc" retrain_data_quant_config: { ulq_quantize: { dst_type: INT16 } } }

:func:`resolve_retrain_configs` turns it into one config per layer: a layer named in ``skip_layers`` or
``quant_skip_layers``, or of a type in ``skip_layer_types`` or ``quant_skip_types`` (the unions), is left
alone; every other layer starts from its default (8-bit ULQ activations, 8-bit ARQ-retrain weights,
channel-wise except for ``Linear``/``Conv1D``: AMCT's "LinearQAT no channel-wise") and then takes the
global ``retrain_*_quant_config``, every ``override_layer_types`` entry of its type, then every
``override_layer_configs`` entry of its name, in file order: ``override_layer_configs`` >
``override_layer_types`` > global. Each level changes only what it sets (``arq_retrain { dst_type: INT4 }``
keeps ``channel_wise`` from the level below).

The prune fields (``prune_config``, ``regular_prune_skip_layers``, ``regular_prune_skip_types`` and an
override's ``prune_config``) are parsed and kept in :attr:`RetrainCfg.message`, but do not affect the QAT
configs here; pruning reads them. ``fakequant_precision_mode`` is kept but has no QatConfig field.

Errors name the file and line (syntax, unknown fields, bad enum values), or the file, layer and key path
(values out of range)::

    retrain.cfg: layer 'conv1' (Conv2d) retrain_data_quant_config.ulq_quantize.clip_max_min.clip_min: got 0.5; allowed: clip_min < 0
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Mapping

from . import amct_proto as pb
from .amct_cfg import ProtoCfg, _Fields, _f32
from .amct_json import _check_keys, _get, _no_duplicates
from .base import Config, ConfigError, check_range
from .granularity import PerChannel, PerTensor
from .qat import QatConfig

__all__ = ["RetrainSettings", "RetrainCfg", "read_retrain_json", "parse_retrain_json", "write_retrain_json",
           "retrain_json_dict", "read_retrain_cfg", "resolve_retrain_configs", "default_retrain_config",
           "LayerSpelling", "RETRAIN_SPELLING", "layer_entries", "read_layer_entry"]

_GLOBAL_KEYS = ("version", "batch_num")
_DATA_KEYS = ("algo", "dst_type", "clip_max", "clip_min", "fixed_min", "batch_num")
_DATA_ALGOS = {"ulq_quantize": "ulq", "lsq_plus": "lsq_plus"}
_DST_BITS = {"INT4": 4, "INT8": 8, "INT16": 16}
_BITS_DST = {v: k for k, v in _DST_BITS.items()}
#: Layer types whose weights are quantized per tensor by default (AMCT: "LinearQAT no channel-wise").
NO_CHANNEL_TYPES = ("Linear", "Conv1D")
# QatConfig fields AMCT's QAT JSON has no key for: a config writes only if they hold their defaults.
_UNSPELLED = ("activation_offset", "init_calibrator", "max_percentile", "min_percentile", "search_range",
              "search_step", "num_of_bins")

# QatConfig field -> key path in the JSON, to word QatConfig's own errors in the file's terms.
_JSON_PATHS = {
    "weight_bits": "retrain_weight_config.dst_type", "activation_bits": "retrain_data_config.dst_type",
    "(activation_bits, weight_bits)": "retrain_data_config.dst_type / retrain_weight_config.dst_type",
    "clip_max": "retrain_data_config.clip_max", "clip_min": "retrain_data_config.clip_min",
    "fixed_min": "retrain_data_config.fixed_min", "batch_num": "batch_num",
    "weight_granularity": "retrain_weight_config.channel_wise",
}


def _dst_words(err: ConfigError) -> ConfigError:
    """QatConfig's bit errors in dst_type terms (INT8 instead of 8)."""
    field = err.key.rsplit(".", 1)[-1]
    if field == "(activation_bits, weight_bits)":
        return ConfigError(err.key, [_BITS_DST.get(b, b) for b in err.value], err.allowed)
    if field == "weight_bits":
        return ConfigError(err.key, _BITS_DST.get(err.value, err.value), "INT4 or INT8 (weights)")
    if field == "activation_bits":
        return ConfigError(err.key, _BITS_DST.get(err.value, err.value), "INT4, INT8 or INT16 (activations)")
    return err


@dataclass(frozen=True)
class LayerSpelling:
    """The key names of one layer's entry in a QAT-style JSON: AMCT's QAT JSON (:data:`RETRAIN_SPELLING`)
    and its distillation JSON (same structure, other names) share the readers and writers below.

    ``weight_algos`` maps each JSON weight ``algo`` to the :class:`QatConfig` ``weight_algorithm``; the
    ``*_dst`` tuples are the ``dst_type`` values allowed; ``what`` names the file kind in errors.
    """

    enable: str = "retrain_enable"
    data: str = "retrain_data_config"
    weights: str = "retrain_weight_config"
    weight_algos: tuple[tuple[str, str], ...] = (("arq_retrain", "arq_retrain"), ("ulq_retrain", "ulq_retrain"),
                                                 ("lsq_plus", "lsq_plus"))
    weight_alias: str | None = "weights_retrain_algo"
    data_dst: tuple[str, ...] = ("INT4", "INT8", "INT16")
    weight_dst: tuple[str, ...] = ("INT4", "INT8")
    what: str = "AMCT's QAT JSON"

    @property
    def layer_keys(self) -> tuple[str, ...]:
        return (self.enable, self.data, self.weights)

    @property
    def weight_keys(self) -> tuple[str, ...]:
        return ("algo",) + ((self.weight_alias,) if self.weight_alias else ()) + ("channel_wise", "dst_type")

    def json_path(self, field: str) -> str:
        """A QatConfig field's key path in this JSON."""
        path = _JSON_PATHS.get(field, field)
        return path.replace("retrain_data_config", self.data).replace("retrain_weight_config", self.weights)


#: AMCT's QAT JSON
RETRAIN_SPELLING = LayerSpelling()


@dataclass(frozen=True)
class RetrainSettings(Config):
    """The global keys of AMCT's QAT JSON (``version``, ``batch_num``)."""

    version: int = 1
    batch_num: int = 1

    def validate(self) -> None:
        if self.version != 1:
            raise ConfigError("RetrainSettings.version", self.version, "1")
        check_range("RetrainSettings", "batch_num", self.batch_num, 1)


def default_retrain_config(layer_type: str, batch_num: int = 1, *, channel_wise: bool | None = None) -> QatConfig:
    """AMCT's default for one layer: A8W8, ULQ activations, ARQ-retrain weights, channel-wise except Linear."""
    if channel_wise is None:
        channel_wise = layer_type not in NO_CHANNEL_TYPES
    return QatConfig(batch_num=batch_num, weight_granularity=PerChannel() if channel_wise else PerTensor())


# -- JSON writing ---------------------------------------------------------------------------------------
def retrain_json_dict(settings: RetrainSettings, layers: Mapping[str, QatConfig | None]) -> dict[str, Any]:
    """The JSON object (plain dict) of ``settings`` and ``layers``; raises if a value has no AMCT spelling."""
    if not isinstance(settings, RetrainSettings):
        raise ConfigError("write_retrain_json.settings", settings, "a RetrainSettings")
    out: dict[str, Any] = {"version": settings.version, "batch_num": settings.batch_num}
    out.update(layer_entries(layers, settings.batch_num, _GLOBAL_KEYS, "write_retrain_json"))
    return out


def layer_entries(layers: Mapping[str, QatConfig | None], batch_num: int, global_keys: tuple[str, ...], who: str,
                  spelling: LayerSpelling = RETRAIN_SPELLING) -> dict[str, Any]:
    """The per-layer JSON entries of ``layers`` in ``spelling``; raises if a value has no spelling there."""
    out: dict[str, Any] = {}
    defaults = QatConfig()
    algo_names = {ours: json_name for json_name, ours in spelling.weight_algos}
    for name, cfg in layers.items():
        where = f"{who}: layer '{name}'"
        if not isinstance(name, str) or not name or name in global_keys:
            raise ConfigError(f"{who}: layer name", name,
                              "a non-empty module path that is not a global key (" + ", ".join(global_keys) + ")")
        if cfg is None:
            out[name] = {spelling.enable: False}
            continue
        if not isinstance(cfg, QatConfig):
            raise ConfigError(where, cfg, "a QatConfig or None (not retrained)")
        entry: dict[str, Any] = {spelling.enable: True}
        if cfg.activation_bits is not None:
            for key in _UNSPELLED:
                if getattr(cfg, key) != getattr(defaults, key):
                    raise ConfigError(f"{where} {key}", getattr(cfg, key),
                                      f"{getattr(defaults, key)!r} ({spelling.what} has no key for it)")
            if _BITS_DST[cfg.activation_bits] not in spelling.data_dst:
                raise ConfigError(f"{where} activation_bits", cfg.activation_bits,
                                  f"{', '.join(spelling.data_dst)} ({spelling.what})")
            data: dict[str, Any] = {"algo": "ulq_quantize" if cfg.activation_algorithm == "ulq" else cfg.activation_algorithm,
                                    "dst_type": _BITS_DST[cfg.activation_bits]}
            for key in ("clip_max", "clip_min", "fixed_min"):
                if getattr(cfg, key) is not None:
                    data[key] = getattr(cfg, key)
            if cfg.batch_num != batch_num:
                data["batch_num"] = cfg.batch_num
            entry[spelling.data] = data
        if cfg.weight_algorithm not in algo_names:
            raise ConfigError(f"{where} weight_algorithm", cfg.weight_algorithm,
                              f"one of {', '.join(algo_names)} ({spelling.what})")
        entry[spelling.weights] = {"algo": algo_names[cfg.weight_algorithm],
                                   "channel_wise": isinstance(cfg.weight_granularity, PerChannel),
                                   "dst_type": _BITS_DST[cfg.weight_bits]}
        out[name] = entry
    return out


def write_retrain_json(path: str | os.PathLike[str], settings: RetrainSettings,
                       layers: Mapping[str, QatConfig | None]) -> None:
    """Write AMCT's QAT JSON atomically; ``None`` layers get ``"retrain_enable": false``."""
    text = json.dumps(retrain_json_dict(settings, layers), indent=4) + "\n"
    pb.atomic_write_text(path, text)


# -- JSON reading ---------------------------------------------------------------------------------------
def read_retrain_json(path: str | os.PathLike[str]) -> tuple[RetrainSettings, dict[str, QatConfig | None]]:
    """Read and validate AMCT's QAT JSON: ``(global settings, layer -> QatConfig or None)``."""
    source = os.fspath(path)
    return parse_retrain_json(Path(source).read_text(encoding="utf-8"), source)


def parse_json_head(text: str, source: str, global_keys: tuple[str, ...]) -> tuple[dict[str, Any], str, int, int]:
    """The part of reading AMCT's retrain and distill JSON that they share: decode (duplicate keys and syntax
    errors named with their line), check that every non-global key holds a layer object, and read
    ``version`` (1) and ``batch_num`` (> 0). Returns ``(data, where, version, batch_num)``."""
    try:
        data = json.loads(text, object_pairs_hook=_no_duplicates(source))
    except json.JSONDecodeError as err:
        raise ConfigError(f"{source}: line {err.lineno}, column {err.colno}", err.doc[err.pos:err.pos + 20],
                          f"valid JSON ({err.msg})") from None
    if not isinstance(data, dict):
        raise ConfigError(source, data, "a JSON object of global keys and layers")
    where = f"{source}: "
    for key, value in data.items():
        if key not in global_keys and not isinstance(value, dict):
            raise ConfigError(f"{where}{key}", value,
                              "a global key (" + ", ".join(global_keys) + ") or a layer name with an object")
    version = _get(data, "version", "int", where, 1)
    if version != 1:
        raise ConfigError(f"{where}version", version, "1")
    batch_num = _get(data, "batch_num", "int", where, 1)
    if batch_num <= 0:
        raise ConfigError(f"{where}batch_num", batch_num, "an integer > 0")
    return data, where, version, batch_num


def parse_retrain_json(text: str, source: str = "<json>") -> tuple[RetrainSettings, dict[str, QatConfig | None]]:
    """:func:`read_retrain_json` on a string (``source`` names it in errors)."""
    data, where, version, batch_num = parse_json_head(text, source, _GLOBAL_KEYS)
    settings = RetrainSettings(version=version, batch_num=batch_num)
    layers = {name: _read_layer(entry, settings, f"{source}: layer '{name}' ")
              for name, entry in data.items() if name not in _GLOBAL_KEYS}
    return settings, layers


def _read_layer(entry: dict[str, Any], settings: RetrainSettings, prefix: str) -> QatConfig | None:
    return read_layer_entry(entry, settings.batch_num, prefix)


def read_layer_entry(entry: dict[str, Any], batch_num: int, prefix: str,
                     spelling: LayerSpelling = RETRAIN_SPELLING) -> QatConfig | None:
    """One layer's JSON entry in ``spelling`` -> its QatConfig, or None when not enabled; errors start with ``prefix``."""
    _check_keys(entry, spelling.layer_keys, prefix)
    enable = _get(entry, spelling.enable, "bool", prefix, True)
    fields: dict[str, Any] = {"batch_num": batch_num}
    if spelling.data in entry:
        fields.update(_read_data(entry[spelling.data], f"{prefix}{spelling.data}.", spelling))
    else:
        fields["activation_bits"] = None
    fields.update(_read_weights(entry.get(spelling.weights, {}), f"{prefix}{spelling.weights}.", spelling))
    try:
        cfg = QatConfig(**fields)
    except ConfigError as err:
        err = _dst_words(err)
        field = err.key.rsplit(".", 1)[-1]
        raise ConfigError(f"{prefix}{spelling.json_path(field)}", err.value, err.allowed) from None
    return cfg if enable else None


def _dst(data: dict[str, Any], where: str, allowed: tuple[str, ...]) -> int:
    dst = _get(data, "dst_type", "str", where, "INT8")
    if dst not in allowed:
        raise ConfigError(f"{where}dst_type", dst, "one of " + ", ".join(allowed))
    return _DST_BITS[dst]


def _read_data(data: Any, where: str, spelling: LayerSpelling = RETRAIN_SPELLING) -> dict[str, Any]:
    if not isinstance(data, dict):
        raise ConfigError(where.rstrip("."), data, "an object with algo, dst_type, clip_max, clip_min, fixed_min")
    _check_keys(data, _DATA_KEYS, where)
    algo = _get(data, "algo", "str", where, "ulq_quantize")
    if algo not in _DATA_ALGOS:
        raise ConfigError(f"{where}algo", algo, "one of " + ", ".join(_DATA_ALGOS))
    out: dict[str, Any] = {"activation_algorithm": _DATA_ALGOS[algo],
                           "activation_bits": _dst(data, where, spelling.data_dst)}
    for key in ("clip_max", "clip_min"):
        value = _get(data, key, "number", where)
        if value is not None:
            out[key] = float(value)
    fixed = _get(data, "fixed_min", "bool", where)
    if fixed is not None:
        out["fixed_min"] = fixed
    n = _get(data, "batch_num", "int", where)
    if n is not None:
        if n <= 0:
            raise ConfigError(f"{where}batch_num", n, "an integer > 0")
        out["batch_num"] = n
    return out


def _read_weights(wts: Any, where: str, spelling: LayerSpelling = RETRAIN_SPELLING) -> dict[str, Any]:
    if not isinstance(wts, dict):
        raise ConfigError(where.rstrip("."), wts, "an object with algo, channel_wise, dst_type")
    _check_keys(wts, spelling.weight_keys, where)
    alias = spelling.weight_alias
    if alias and "algo" in wts and alias in wts:
        raise ConfigError(f"{where}{alias}", wts[alias], f"only one of algo and {alias} (its alias)")
    key = alias if alias and alias in wts else "algo"
    algos = dict(spelling.weight_algos)
    algo = _get(wts, key, "str", where, spelling.weight_algos[0][0])
    if algo not in algos:
        raise ConfigError(f"{where}{key}", algo, "one of " + ", ".join(algos))
    out: dict[str, Any] = {"weight_algorithm": algos[algo], "weight_bits": _dst(wts, where, spelling.weight_dst)}
    cw = _get(wts, "channel_wise", "bool", where)
    if cw is not None:
        out["weight_granularity"] = PerChannel() if cw else PerTensor()
    return out


# -- .cfg -----------------------------------------------------------------------------------------------
@dataclass
class RetrainCfg(ProtoCfg):
    """A parsed retrain ``.cfg``: the ``AMCTRetrainConfig`` message and where it came from."""

    MESSAGE: ClassVar[Any] = pb.AMCTRetrainConfig

    def settings(self) -> RetrainSettings:
        if self.message.batch_num <= 0:
            raise ConfigError(f"{self.source}: batch_num", self.message.batch_num, "an integer > 0")
        return RetrainSettings(batch_num=self.message.batch_num)


def read_retrain_cfg(path_or_text: str | os.PathLike[str]) -> RetrainCfg:
    """Parse a retrain ``.cfg`` (a path, or its text). Errors name the file, line, column and the field."""
    return RetrainCfg.read(path_or_text, "read_retrain_cfg")


def _apply(fields: _Fields, data: Any, wts: Any, where: str) -> None:
    """One level (global or an override): only what it sets changes (protobuf has-field)."""
    if data is not None and data.WhichOneof("data_retrain_algo") == "ulq_quantize":
        ulq, p = data.ulq_quantize, f"{where}retrain_data_quant_config.ulq_quantize"
        fields.set("activation_algorithm", "ulq", p)
        if ulq.HasField("clip_max_min"):
            fields.set("clip_max", _f32(ulq.clip_max_min.clip_max), f"{p}.clip_max_min.clip_max")
            fields.set("clip_min", _f32(ulq.clip_max_min.clip_min), f"{p}.clip_max_min.clip_min")
        if ulq.HasField("fixed_min"):
            fields.set("fixed_min", ulq.fixed_min, f"{p}.fixed_min")
        if ulq.HasField("dst_type"):
            fields.set("activation_bits", _DST_BITS[pb.DataType.Name(ulq.dst_type)], f"{p}.dst_type")
    algo = None if wts is None else wts.WhichOneof("weights_retrain_algo")
    if algo is not None:
        msg, p = getattr(wts, algo), f"{where}retrain_weight_quant_config.{algo}"
        fields.set("weight_algorithm", algo, p)
        if msg.HasField("channel_wise"):
            fields.set("weight_granularity", PerChannel() if msg.channel_wise else PerTensor(), f"{p}.channel_wise")
        if msg.HasField("dst_type"):
            fields.set("weight_bits", _DST_BITS[pb.DataType.Name(msg.dst_type)], f"{p}.dst_type")


def _level(msg: Any) -> tuple[Any, Any]:
    return (msg.retrain_data_quant_config if msg.HasField("retrain_data_quant_config") else None,
            msg.retrain_weight_quant_config if msg.HasField("retrain_weight_quant_config") else None)


def resolve_retrain_configs(cfg: RetrainCfg | Any, layers: Mapping[str, str],
                            defaults: Mapping[str, QatConfig] | None = None
                            ) -> tuple[RetrainSettings, dict[str, QatConfig | None]]:
    """Per-layer QAT configs of a model from a retrain ``.cfg``: ``(settings, {layer: QatConfig or None})``.

    Args:
        cfg: a :class:`RetrainCfg`, an ``AMCTRetrainConfig`` message, a path or the text.
        layers: each QAT-able module path -> its layer type name (``'Conv2d'``, ``'Linear'``); the result
            has the same keys in the same order.
        defaults: the config a layer starts from before the cfg's levels (absent:
            :func:`default_retrain_config` of its type); its ``batch_num`` is replaced by the cfg's.

    A name in ``skip_layers``/``quant_skip_layers``/``override_layer_configs`` that is not in ``layers``
    is an error (a typo would otherwise retrain the layer the user meant to change), as is an
    ``override_layer_types`` type that is neither in the model nor a type QAT supports.
    """
    if not isinstance(cfg, RetrainCfg):
        cfg = RetrainCfg(cfg, "<cfg>") if isinstance(cfg, pb.AMCTRetrainConfig) else read_retrain_cfg(cfg)
    m, src = cfg.message, cfg.source
    settings = cfg.settings()
    types = set(layers.values())

    def unknown(key: str, value: str, what: str, known: Any) -> ConfigError:
        names = sorted(known)
        shown = ", ".join(names[:20]) + (", ..." if len(names) > 20 else "")
        return ConfigError(f"{src}: {key}", value, f"{what} ({shown})")

    for key in ("skip_layers", "quant_skip_layers"):
        for i, name in enumerate(getattr(m, key)):
            if name not in layers:
                raise unknown(f"{key}[{i}]", name, "a QAT-able layer of the model", layers)
    known_types = types | {"Conv1d", "Conv2d", "Conv3d", "ConvTranspose1d", "ConvTranspose2d", "ConvTranspose3d",
                           *NO_CHANNEL_TYPES}
    for i, ov in enumerate(m.override_layer_types):
        if ov.layer_type not in known_types:
            raise unknown(f"override_layer_types[{i}].layer_type", ov.layer_type, "a layer type QAT supports", known_types)
    for i, ov in enumerate(m.override_layer_configs):
        if ov.layer_name not in layers:
            raise unknown(f"override_layer_configs[{i}].layer_name", ov.layer_name, "a QAT-able layer of the model", layers)

    skip_names = set(m.skip_layers) | set(m.quant_skip_layers)
    skip_types = set(m.skip_layer_types) | set(m.quant_skip_types)
    out: dict[str, QatConfig | None] = {}
    for name, layer_type in layers.items():
        if name in skip_names or layer_type in skip_types:
            out[name] = None
            continue
        base = (defaults or {}).get(name) or default_retrain_config(layer_type)
        fields = _Fields()
        fields.set("batch_num", settings.batch_num, "batch_num")
        _apply(fields, *_level(m), "")
        for i, ov in enumerate(m.override_layer_types):
            if ov.layer_type == layer_type:
                _apply(fields, *_level(ov), f"override_layer_types[{i}] ({layer_type}).")
        for i, ov in enumerate(m.override_layer_configs):
            if ov.layer_name == name:
                _apply(fields, *_level(ov), f"override_layer_configs[{i}].")
        try:
            out[name] = dataclasses.replace(base, **fields.values)
        except ConfigError as err:
            err = _dst_words(err)
            field = err.key.rsplit(".", 1)[-1]
            origin = fields.origin.get(field)
            if field == "(activation_bits, weight_bits)":
                unset = {"activation_bits": "retrain_data_quant_config.ulq_quantize.dst_type (default INT8)",
                         "weight_bits": "retrain_weight_quant_config dst_type (default INT8)"}
                origin = " / ".join(fields.origin.get(k, unset[k]) for k in ("activation_bits", "weight_bits"))
            raise ConfigError(f"{src}: layer '{name}' ({layer_type}) {origin or field}", err.value, err.allowed) from None
    return settings, out

"""AMCT's simplified PTQ config (``.cfg``): protobuf text of ``AMCTConfig``, resolved per layer.

    batch_num : 2
    activation_offset : true
    skip_layers : "fc"
    common_config : { arq_quantize : { channel_wise : true }
                      ifmr_quantize : { search_step : 0.02 } }
    override_layer_types : { layer_type : "Conv2d" calibration_config : { arq_quantize : { quant_bits : 7 } } }
    override_layer_configs : { layer_name : "conv1" calibration_config : { hfmg_quantize : { num_of_bins : 2048 } } }

:func:`resolve_layer_configs` turns it into one :class:`~amct_torch.config.quant.QuantConfig` (or
``None``) per layer of a model, given ``{module path: layer type name}``:

1. a layer in ``skip_layers`` or of a type in ``skip_layer_types`` is left alone (``None``);
2. otherwise it starts from the globals (``activation_offset`` gives the default ``asymmetric``,
   ``batch_num``), then ``common_config``, then every ``override_layer_types`` entry of its type, then
   every ``override_layer_configs`` entry of its name, each applied in file order.

Each level changes only what it sets, field by field, the way protobuf's has-field works: choosing
``hfmg_quantize {}`` switches the calibrator to HFMG and keeps everything else; ``arq_quantize
{ quant_bits: 6 }`` changes the bits and keeps ``channel_wise`` from the level below; an ``asymmetric``
inside ``ifmr_quantize`` / ``hfmg_quantize`` overrides the global ``activation_offset``. A value never set
at any level is the proto default, which is also QuantConfig's default.

Errors name the file, the layer and the cfg path that set the bad value; an override, or a
``skip_layers`` entry, naming a layer or type that is not in the model is an error (a typo would
otherwise silently quantize the layer the user meant). ``skip_layer_types`` may list types the model
does not have. ``fakequant_precision_mode`` is kept in :attr:`CalibrationCfg.message` but has no
QuantConfig field.
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from . import amct_proto as pb
from .amct_json import AmctGlobal
from .base import ConfigError
from .granularity import PerChannel, PerTensor
from .quant import QuantConfig

__all__ = ["CalibrationCfg", "read_calibration_cfg", "resolve_layer_configs", "write_calibration_cfg"]


@dataclass
class ProtoCfg:
    """A parsed AMCT ``.cfg`` (protobuf text): the message and where it came from (for error messages).

    Subclasses set ``MESSAGE`` (the message class); :meth:`read` takes a path or the text itself.
    """

    message: Any
    source: str = "<cfg>"
    MESSAGE: ClassVar[Any] = None

    @classmethod
    def from_text(cls, text: str, source: str = "<cfg>"):
        return cls(pb.parse_text(text, cls.MESSAGE, source), source)

    @classmethod
    def read(cls, path_or_text: str | os.PathLike[str], who: str):
        """Parse a ``.cfg`` file (a path) or its text. Errors name the file, line, column and the field."""
        if isinstance(path_or_text, os.PathLike):
            source = os.fspath(path_or_text)
            return cls.from_text(Path(source).read_text(encoding="utf-8"), source)
        if not isinstance(path_or_text, str):
            raise ConfigError(who, path_or_text, "a path or the text of a .cfg")
        one_line = "\n" not in path_or_text
        looks_like_text = not one_line or "{" in path_or_text or ":" in path_or_text.split("/")[-1]
        if one_line and (os.path.isfile(path_or_text) or (not looks_like_text and path_or_text.endswith(".cfg"))):
            return cls.from_text(Path(path_or_text).read_text(encoding="utf-8"), path_or_text)
        return cls.from_text(path_or_text, "<cfg text>")

    def to_text(self) -> str:
        return pb.to_text(self.message)


@dataclass
class CalibrationCfg(ProtoCfg):
    """A parsed PTQ ``.cfg``: the ``AMCTConfig`` message and where it came from."""

    MESSAGE: ClassVar[Any] = pb.AMCTConfig

    def settings(self) -> AmctGlobal:
        """The global keys as :class:`AmctGlobal`."""
        m = self.message
        if m.batch_num <= 0:
            raise ConfigError(f"{self.source}: batch_num", m.batch_num, "an integer > 0")
        return AmctGlobal(batch_num=m.batch_num, activation_offset=m.activation_offset, do_fusion=m.do_fusion,
                          skip_fusion_layers=tuple(m.skip_fusion_layers))


def read_calibration_cfg(path_or_text: str | os.PathLike[str]) -> CalibrationCfg:
    """Parse a ``.cfg`` file (a path) or its text. Errors name the file, line, column and the field."""
    return CalibrationCfg.read(path_or_text, "read_calibration_cfg")


def write_calibration_cfg(cfg: CalibrationCfg | Any, path: str | os.PathLike[str]) -> None:
    """Write ``cfg`` (a :class:`CalibrationCfg` or an ``AMCTConfig`` message) atomically as protobuf text."""
    msg = cfg.message if isinstance(cfg, CalibrationCfg) else cfg
    if not isinstance(msg, pb.AMCTConfig):
        raise ConfigError("write_calibration_cfg.cfg", type(msg).__name__, "a CalibrationCfg or an AMCTConfig message")
    missing = msg.FindInitializationErrors()
    if missing:
        raise ConfigError(f"write_calibration_cfg: {missing[0]}", None, "a value: the field is required")
    pb.atomic_write_text(path, pb.to_text(msg))


# -- resolution -----------------------------------------------------------------------------------------
def _f32(value: float) -> float:
    """The shortest decimal that is the same float32 (cfg floats are float32: 0.01 -> 0.01, not 0.0099999998)."""
    packed = struct.pack("<f", value)
    for digits in range(6, 10):
        candidate = float(f"{value:.{digits}g}")
        if struct.pack("<f", candidate) == packed:
            return candidate
    return value


class _Fields:
    """QuantConfig keyword arguments being built, with the cfg path that set each one."""

    def __init__(self) -> None:
        self.values: dict[str, Any] = {}
        self.origin: dict[str, str] = {}

    def set(self, key: str, value: Any, origin: str) -> None:
        self.values[key] = value
        self.origin[key] = origin


def _apply(fields: _Fields, cc: Any, where: str) -> None:
    """Apply one ``CalibrationConfig`` level: only what it sets (has-field) changes."""
    wts = cc.WhichOneof("wts_quant_algo")
    if wts == "arq_quantize":
        arq, p = cc.arq_quantize, f"{where}.arq_quantize"
        fields.set("weight_algorithm", "arq", p)
        if arq.HasField("channel_wise"):
            fields.set("weight_granularity", PerChannel() if arq.channel_wise else PerTensor(), f"{p}.channel_wise")
        if arq.HasField("quant_bits"):
            fields.set("weight_bits", arq.quant_bits, f"{p}.quant_bits")
    elif wts == "ada_quantize":
        ada, p = cc.ada_quantize, f"{where}.ada_quantize"
        fields.set("weight_algorithm", "adaround", p)
        if ada.HasField("channel_wise"):
            fields.set("weight_granularity", PerChannel() if ada.channel_wise else PerTensor(), f"{p}.channel_wise")
        if ada.HasField("num_iteration"):
            fields.set("ada_num_iteration", ada.num_iteration, f"{p}.num_iteration")
        if ada.HasField("reg_param"):
            fields.set("ada_reg_param", _f32(ada.reg_param), f"{p}.reg_param")
        if ada.HasField("warm_start"):
            fields.set("ada_warm_start", _f32(ada.warm_start), f"{p}.warm_start")
        if ada.HasField("beta_range_start") or ada.HasField("beta_range_end"):
            start, end = fields.values.get("ada_beta_range", (_f32(ada.beta_range_start), _f32(ada.beta_range_end)))
            if ada.HasField("beta_range_start"):
                start = _f32(ada.beta_range_start)
            if ada.HasField("beta_range_end"):
                end = _f32(ada.beta_range_end)
            fields.set("ada_beta_range", (start, end), f"{p}.beta_range_start/beta_range_end")

    acts = cc.WhichOneof("acts_quant_algo")
    if acts == "ifmr_quantize":
        ifmr, p = cc.ifmr_quantize, f"{where}.ifmr_quantize"
        fields.set("activation_calibrator", "ifmr", p)
        for key in ("max_percentile", "min_percentile", "search_step"):
            if ifmr.HasField(key):
                fields.set(key, _f32(getattr(ifmr, key)), f"{p}.{key}")
        if ifmr.HasField("search_range_start") or ifmr.HasField("search_range_end"):
            start, end = fields.values.get("search_range", (_f32(ifmr.search_range_start), _f32(ifmr.search_range_end)))
            if ifmr.HasField("search_range_start"):
                start = _f32(ifmr.search_range_start)
            if ifmr.HasField("search_range_end"):
                end = _f32(ifmr.search_range_end)
            fields.set("search_range", (start, end), f"{p}.search_range_start/search_range_end")
        _acts_common(fields, ifmr, p)
    elif acts == "hfmg_quantize":
        hfmg, p = cc.hfmg_quantize, f"{where}.hfmg_quantize"
        fields.set("activation_calibrator", "hfmg", p)
        if hfmg.HasField("num_of_bins"):
            fields.set("num_of_bins", hfmg.num_of_bins, f"{p}.num_of_bins")
        _acts_common(fields, hfmg, p)

    if cc.HasField("dmq_balancer"):
        fields.set("dmq_balancer_param", _f32(cc.dmq_balancer.migration_strength),
                   f"{where}.dmq_balancer.migration_strength")


def _acts_common(fields: _Fields, msg: Any, p: str) -> None:
    if msg.HasField("asymmetric"):
        fields.set("activation_offset", msg.asymmetric, f"{p}.asymmetric")
    if msg.HasField("dst_type"):
        bits = {"INT8": 8, "INT16": 16}[pb.CalibrationDataType.Name(msg.dst_type)]
        fields.set("activation_bits", bits, f"{p}.dst_type")


def resolve_layer_configs(cfg: CalibrationCfg, layers: dict[str, str]
                          ) -> tuple[AmctGlobal, dict[str, QuantConfig | None]]:
    """Per-layer configs of a model from a ``.cfg``: ``(global settings, {layer: QuantConfig or None})``.

    ``layers`` maps each quantizable module path to its layer type name (``'Conv2d'``, ``'Linear'``);
    the result has the same keys in the same order. See the module docs for the precedence rules.
    """
    if not isinstance(cfg, CalibrationCfg):
        cfg = CalibrationCfg(cfg, "<cfg>") if isinstance(cfg, pb.AMCTConfig) else read_calibration_cfg(cfg)
    m, src = cfg.message, cfg.source
    settings = cfg.settings()
    types = set(layers.values())

    def unknown(key: str, value: str, what: str, known: Any) -> ConfigError:
        names = sorted(known)
        shown = ", ".join(names[:20]) + (", ..." if len(names) > 20 else "")
        return ConfigError(f"{src}: {key}", value, f"{what} of the model ({shown})")

    for i, name in enumerate(m.skip_layers):
        if name not in layers:
            raise unknown(f"skip_layers[{i}]", name, "a layer", layers)
    for i, ov in enumerate(m.override_layer_types):
        if ov.layer_type not in types:
            raise unknown(f"override_layer_types[{i}].layer_type", ov.layer_type, "a layer type", types)
    for i, ov in enumerate(m.override_layer_configs):
        if ov.layer_name not in layers:
            raise unknown(f"override_layer_configs[{i}].layer_name", ov.layer_name, "a layer", layers)

    skip_names, skip_types = set(m.skip_layers), set(m.skip_layer_types)
    out: dict[str, QuantConfig | None] = {}
    for name, layer_type in layers.items():
        if name in skip_names or layer_type in skip_types:
            out[name] = None
            continue
        fields = _Fields()
        fields.set("batch_num", settings.batch_num, "batch_num")
        fields.set("activation_offset", settings.activation_offset, "activation_offset")
        if m.HasField("common_config"):
            _apply(fields, m.common_config, "common_config")
        for i, ov in enumerate(m.override_layer_types):
            if ov.layer_type == layer_type:
                _apply(fields, ov.calibration_config, f"override_layer_types[{i}] ({layer_type}).calibration_config")
        for i, ov in enumerate(m.override_layer_configs):
            if ov.layer_name == name:
                _apply(fields, ov.calibration_config, f"override_layer_configs[{i}].calibration_config")
        out[name] = _build(fields, name, layer_type, src)
    return settings, out


def _build(fields: _Fields, name: str, layer_type: str, src: str) -> QuantConfig:
    where = f"{src}: layer '{name}' ({layer_type})"
    bits = fields.values.get("weight_bits")
    if bits in (6, 7) and layer_type != "Conv2d":
        raise ConfigError(f"{where} {fields.origin['weight_bits']}", bits, "4, 8 or 16 (6 and 7 only for Conv2d)")
    try:
        return QuantConfig(**fields.values)
    except ConfigError as err:
        key = err.key.rsplit(".", 1)[-1]
        origin = fields.origin.get(key, key)
        raise ConfigError(f"{where} {origin}", err.value, err.allowed) from None

"""AMCT's block-wise distillation configs: the distillation JSON and the distillation ``.cfg``.

The JSON (what ``create_distill_config`` writes) is AMCT's QAT JSON with the distillation key names, plus
the distillation globals::

    {"version": 1, "batch_num": 1, "group_size": 1, "data_dump": false,
     "distill_group": [["conv1", "bn1", "relu"], ["layer1.0"], ["layer1.1"], ["fc"]],
     "conv1": {"quant_enable": true,
               "distill_data_config": {"algo": "ulq_quantize", "dst_type": "INT8"},
               "distill_weight_config": {"algo": "arq_distill", "channel_wise": true, "dst_type": "INT8"}},
     "fc":    {"quant_enable": false}}

* ``group_size``: consecutive groups distilled together; ``data_dump``: store the teacher's block data
  once per group and reuse it every epoch (kept in memory here, see ``DistillConfig.cache_teacher``).
* ``distill_group``: lists of module paths; a group's input is its first module's input, its output its
  last module's output, and the parameters of all its modules (and everything below them) train together.
  A whole residual or transformer block is one path (``["layer1.0"]``).
* a layer maps to a :class:`~amct_torch.config.qat.QatConfig` (``"quant_enable": false``: None). The data
  config is the QAT one (``ulq_quantize``, ``clip_max``, ``clip_min``, ``fixed_min``; ``lsq_plus`` also
  read and written); weights ``arq_distill`` (AMCT's default) or ``ulq_distill`` (also ``lsq_plus``),
  ``channel_wise``, ``dst_type``. AMCT's distillation knows INT4 and INT8 only; the (activation, weight)
  pair must be one of A8W8, A8W4, A4W4 (AMCT itself requires equal types).

The ``.cfg`` is protobuf text of AMCT's ``AMCTDistillConfig``::

    batch_num: 2
    group_size: 1
    data_dump: false
    distill_group { start_layer_name: "conv1" end_layer_name: "relu" }
    distill_data_quant_config { ulq_quantize { clip_max_min { clip_max: 6.0 clip_min: -6.0 } dst_type: INT8 } }
    distill_weight_quant_config { arq_distill { channel_wise: true dst_type: INT8 } }
    distill_override_layer_types { layer_type: "Linear" distill_weight_quant_config { arq_distill { channel_wise: false } } }
    distill_override_layers { layer_name: "fc" distill_data_quant_config { ulq_quantize { dst_type: INT4 } } }
    quant_skip_layers: "conv1"
    quant_skip_layer_types: "Linear"

:func:`resolve_distill_configs` gives one config per layer with the retrain ``.cfg``'s rules (it runs
through :func:`~amct_torch.config.amct_retrain.resolve_retrain_configs`): skipped layers are None, then
the global configs, every ``distill_override_layer_types`` entry of the layer's type, every
``distill_override_layers`` entry of its name, each changing only what it sets. Errors name the file and
the distillation field at fault.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Mapping

from . import amct_proto as pb
from .amct_cfg import ProtoCfg
from .amct_json import _get
from .amct_retrain import (LayerSpelling, RetrainCfg, default_retrain_config, layer_entries, parse_json_head,
                           read_layer_entry, resolve_retrain_configs)
from .base import Config, ConfigError, check_range
from .qat import QatConfig

__all__ = ["DistillSettings", "DistillCfg", "DISTILL_SPELLING", "distill_json_dict", "write_distill_json",
           "read_distill_json", "parse_distill_json", "read_distill_cfg", "resolve_distill_configs"]

_GLOBAL_KEYS = ("version", "batch_num", "group_size", "data_dump", "distill_group")

#: the key names of one layer in AMCT's distillation JSON
DISTILL_SPELLING = LayerSpelling(
    enable="quant_enable", data="distill_data_config", weights="distill_weight_config",
    weight_algos=(("arq_distill", "arq_retrain"), ("ulq_distill", "ulq_retrain"), ("lsq_plus", "lsq_plus")),
    weight_alias=None, data_dst=("INT4", "INT8"), weight_dst=("INT4", "INT8"), what="AMCT's distillation JSON")


@dataclass(frozen=True)
class DistillSettings(Config):
    """The global keys of AMCT's distillation JSON."""

    version: int = 1
    batch_num: int = 1
    group_size: int = 1
    data_dump: bool = False
    distill_group: tuple[tuple[str, ...], ...] = ()

    def validate(self) -> None:
        name = type(self).__name__
        if self.version != 1:
            raise ConfigError(f"{name}.version", self.version, "1")
        check_range(name, "batch_num", self.batch_num, 1)
        check_range(name, "group_size", self.group_size, 1)
        for i, group in enumerate(self.distill_group):
            if not group:
                raise ConfigError(f"{name}.distill_group[{i}]", [], "a non-empty list of module paths")
            for j, path in enumerate(group):
                if not path:
                    raise ConfigError(f"{name}.distill_group[{i}][{j}]", path, "a non-empty module path")


# -- JSON -----------------------------------------------------------------------------------------------
def distill_json_dict(settings: DistillSettings, layers: Mapping[str, QatConfig | None]) -> dict[str, Any]:
    """The JSON object (plain dict) of ``settings`` and ``layers``; raises if a value has no AMCT spelling."""
    if not isinstance(settings, DistillSettings):
        raise ConfigError("write_distill_json.settings", settings, "a DistillSettings")
    out: dict[str, Any] = {"version": settings.version, "batch_num": settings.batch_num,
                           "group_size": settings.group_size, "data_dump": settings.data_dump,
                           "distill_group": [list(g) for g in settings.distill_group]}
    out.update(layer_entries(layers, settings.batch_num, _GLOBAL_KEYS, "write_distill_json", DISTILL_SPELLING))
    return out


def write_distill_json(path: str | os.PathLike[str], settings: DistillSettings,
                       layers: Mapping[str, QatConfig | None]) -> None:
    """Write AMCT's distillation JSON atomically; ``None`` layers get ``"quant_enable": false``."""
    text = json.dumps(distill_json_dict(settings, layers), indent=4) + "\n"
    pb.atomic_write_text(path, text)


def read_distill_json(path: str | os.PathLike[str]) -> tuple[DistillSettings, dict[str, QatConfig | None]]:
    """Read and validate AMCT's distillation JSON: ``(global settings, layer -> QatConfig or None)``."""
    source = os.fspath(path)
    return parse_distill_json(Path(source).read_text(encoding="utf-8"), source)


def parse_distill_json(text: str, source: str = "<json>") -> tuple[DistillSettings, dict[str, QatConfig | None]]:
    """:func:`read_distill_json` on a string (``source`` names it in errors)."""
    data, where, version, batch_num = parse_json_head(text, source, _GLOBAL_KEYS)
    group_size = _get(data, "group_size", "int", where, 1)
    if group_size <= 0:
        raise ConfigError(f"{where}group_size", group_size, "an integer > 0")
    data_dump = _get(data, "data_dump", "bool", where, False)
    groups = data.get("distill_group", [])
    if not isinstance(groups, list):
        raise ConfigError(f"{where}distill_group", groups, "a list of groups, each a list of module paths")
    for i, group in enumerate(groups):
        if not isinstance(group, list) or not group or not all(isinstance(p, str) and p for p in group):
            raise ConfigError(f"{where}distill_group[{i}]", group, "a non-empty list of module paths (strings)")
    settings = DistillSettings(version=version, batch_num=batch_num, group_size=group_size, data_dump=data_dump,
                               distill_group=tuple(tuple(g) for g in groups))
    layers = {name: read_layer_entry(entry, batch_num, f"{source}: layer '{name}' ", DISTILL_SPELLING)
              for name, entry in data.items() if name not in _GLOBAL_KEYS}
    if not any(cfg is not None for cfg in layers.values()):
        raise ConfigError(f"{source}: layers", sorted(layers),
                          "at least one layer with \"quant_enable\": true (no layer enabled for distillation)")
    return settings, layers


# -- .cfg -----------------------------------------------------------------------------------------------
@dataclass
class DistillCfg(ProtoCfg):
    """A parsed distillation ``.cfg``: the ``AMCTDistillConfig`` message and where it came from."""

    MESSAGE: ClassVar[Any] = pb.AMCTDistillConfig

    def settings(self) -> DistillSettings:
        """The globals (``distill_group`` empty: its start/end pairs need the model, see :meth:`groups`)."""
        m = self.message
        for key in ("batch_num", "group_size"):
            if getattr(m, key) <= 0:
                raise ConfigError(f"{self.source}: {key}", getattr(m, key), "an integer > 0")
        return DistillSettings(batch_num=m.batch_num, group_size=m.group_size, data_dump=m.data_dump)

    def groups(self) -> list[tuple[str, str]]:
        """The ``distill_group`` entries as ``(start_layer_name, end_layer_name)``."""
        out = []
        for i, g in enumerate(self.message.distill_group):
            for key in ("start_layer_name", "end_layer_name"):
                if not getattr(g, key):
                    raise ConfigError(f"{self.source}: distill_group[{i}].{key}", "", "a module path of the model")
            out.append((g.start_layer_name, g.end_layer_name))
        return out


def read_distill_cfg(path_or_text: str | os.PathLike[str]) -> DistillCfg:
    """Parse a distillation ``.cfg`` (a path, or its text). Errors name the file, line, column and the field."""
    return DistillCfg.read(path_or_text, "read_distill_cfg")


# distillation field names <- the retrain names the shared resolver reports (longest first)
_WORDS = (("override_layer_configs", "distill_override_layers"),
          ("override_layer_types", "distill_override_layer_types"),
          ("retrain_data_quant_config", "distill_data_quant_config"),
          ("retrain_weight_quant_config", "distill_weight_quant_config"),
          ("quant_skip_types", "quant_skip_layer_types"),
          ("arq_retrain", "arq_distill"), ("ulq_retrain", "ulq_distill"),
          ("a QAT-able layer", "a distillable layer"), ("a layer type QAT supports", "a layer type distillation supports"))


def _words(text: str) -> str:
    for old, new in _WORDS:
        text = text.replace(old, new)
    return text


def _copy_level(data: Any, wts: Any, has_data: bool, has_wts: bool, dst: Any, dst_data: str, dst_wts: str) -> None:
    if has_data:
        getattr(dst, dst_data).CopyFrom(data)
        getattr(dst, dst_data).SetInParent()
    algo = wts.WhichOneof("weights_quant_algo") if has_wts else None
    if algo is not None:
        target = getattr(getattr(dst, dst_wts), {"arq_distill": "arq_retrain", "ulq_distill": "ulq_retrain"}[algo])
        target.CopyFrom(getattr(wts, algo))
        target.SetInParent()


def _check_int16(m: Any, source: str) -> None:
    levels = [("", m)] + [(f"distill_override_layer_types[{i}].", ov) for i, ov in enumerate(m.distill_override_layer_types)] \
        + [(f"distill_override_layers[{i}].", ov) for i, ov in enumerate(m.distill_override_layers)]
    for where, level in levels:
        if level.HasField("distill_data_quant_config"):
            ulq = level.distill_data_quant_config.ulq_quantize
            if level.distill_data_quant_config.HasField("ulq_quantize") and ulq.HasField("dst_type") \
                    and pb.DataType.Name(ulq.dst_type) not in DISTILL_SPELLING.data_dst:
                raise ConfigError(f"{source}: {where}distill_data_quant_config.ulq_quantize.dst_type",
                                  pb.DataType.Name(ulq.dst_type), "INT4 or INT8 (AMCT's distillation)")
        if level.HasField("distill_weight_quant_config"):
            w = level.distill_weight_quant_config
            algo = w.WhichOneof("weights_quant_algo")
            if algo and getattr(w, algo).HasField("dst_type") \
                    and pb.DataType.Name(getattr(w, algo).dst_type) not in DISTILL_SPELLING.weight_dst:
                raise ConfigError(f"{source}: {where}distill_weight_quant_config.{algo}.dst_type",
                                  pb.DataType.Name(getattr(w, algo).dst_type), "INT4 or INT8 (AMCT's distillation)")


def _as_retrain(m: Any) -> Any:
    """The retrain message with the same quantization settings (the shared resolver reads it)."""
    r = pb.AMCTRetrainConfig(batch_num=m.batch_num)
    _copy_level(m.distill_data_quant_config, m.distill_weight_quant_config, m.HasField("distill_data_quant_config"),
                m.HasField("distill_weight_quant_config"), r, "retrain_data_quant_config", "retrain_weight_quant_config")
    for ov in m.distill_override_layers:
        o = r.override_layer_configs.add(layer_name=ov.layer_name)
        _copy_level(ov.distill_data_quant_config, ov.distill_weight_quant_config, ov.HasField("distill_data_quant_config"),
                    ov.HasField("distill_weight_quant_config"), o, "retrain_data_quant_config",
                    "retrain_weight_quant_config")
    for ov in m.distill_override_layer_types:
        o = r.override_layer_types.add(layer_type=ov.layer_type)
        _copy_level(ov.distill_data_quant_config, ov.distill_weight_quant_config, ov.HasField("distill_data_quant_config"),
                    ov.HasField("distill_weight_quant_config"), o, "retrain_data_quant_config",
                    "retrain_weight_quant_config")
    r.quant_skip_layers.extend(m.quant_skip_layers)
    r.quant_skip_types.extend(m.quant_skip_layer_types)
    return r


def resolve_distill_configs(cfg: DistillCfg | Any, layers: Mapping[str, str],
                            defaults: Mapping[str, QatConfig] | None = None
                            ) -> tuple[DistillSettings, dict[str, QatConfig | None]]:
    """Per-layer configs of a model from a distillation ``.cfg``: ``(settings, {layer: QatConfig or None})``.

    Args:
        cfg: a :class:`DistillCfg`, an ``AMCTDistillConfig`` message, a path or the text.
        layers: each distillable module path -> its layer type name; the result has the same keys.
        defaults: the config a layer starts from (absent: AMCT's default of its type); its ``batch_num`` is
            replaced by the cfg's.

    The returned settings have no ``distill_group`` (see :meth:`DistillCfg.groups`).
    """
    if not isinstance(cfg, DistillCfg):
        cfg = DistillCfg(cfg, "<cfg>") if isinstance(cfg, pb.AMCTDistillConfig) else read_distill_cfg(cfg)
    settings = cfg.settings()
    _check_int16(cfg.message, cfg.source)
    defaults = dict(defaults) if defaults is not None else {
        name: default_retrain_config(kind, settings.batch_num) for name, kind in layers.items()}
    try:
        _, per_layer = resolve_retrain_configs(RetrainCfg(_as_retrain(cfg.message), cfg.source), layers, defaults)
    except ConfigError as err:
        raise ConfigError(_words(err.key), err.value, _words(err.allowed)) from None
    return settings, per_layer

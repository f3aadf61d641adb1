"""AMCT's record file (``record.txt``): quantization factors and prune relations, as protobuf text.

The file is the text format of ``ScaleOffsetRecord`` (see :mod:`~amct_torch.config.amct_proto`)::

    record {
      key: "conv1"
      value {
        scale_d: 0.0798481479
        offset_d: 1
        scale_w: 0.00297622895
        offset_w: 0
      }
    }

:func:`read_record` turns it into a :class:`Record` (plain dataclasses), :func:`write_record` writes one
back in AMCT's own layout (``text_format.MessageToString(record, as_utf8=True)``), atomically.

Floats are float32 in the proto. Values read from a file are float32 values; a write -> read round trip
keeps every float32 bit pattern (the writer uses the shortest decimal that reads back as the same
float32). A Python float that is not a float32 value comes back rounded to float32.

Duplicated keys. AMCT reads with ``text_format.Merge`` and keeps a later entry for a key over an earlier
one. Here the entries of one key are merged *field by field*, in file order: every field the later entry
sets (an optional field present, a repeated field non-empty) replaces the earlier value; fields it does
not set keep the earlier value. A repeated field is replaced as a whole, never concatenated (two
``scale_w`` lists glued together would give a wrong channel count). Within one entry a non-repeated field
given twice keeps the last value (``Merge`` semantics, as AMCT). :meth:`Record.merge` and
:meth:`Record.set_layer` follow the same rule.
"""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass, field
from typing import Any, Iterable

from google.protobuf import text_format

from . import amct_proto as pb
from .base import ConfigError

__all__ = ["LayerRecord", "KVCacheRecord", "Record", "read_record", "write_record"]

_FLOAT_LISTS = ("scale_w", "tensor_balance_factor", "scale_r")
_INT_LISTS = ("offset_w", "shift_bit", "offset_r")
_FLOATS = ("scale_d", "scale_h")
_INTS = ("offset_d", "offset_h")
_BOOLS = ("skip_fusion",)
_STRS = ("dst_type", "act_type", "wts_type", "fakequant_precision_mode")
_DATA_TYPES = ("INT4", "INT6", "INT7", "INT8", "INT16")
_ATTR_TYPES = {"FLOAT": "f", "INT": "i", "STRING": "s", "FLOATS": "floats", "INTS": "ints", "STRINGS": "strings"}


@dataclass
class LayerRecord:
    """The factors of one layer (``SingleLayerRecord``). ``None`` / ``[]``: the field is not in the file.

    ``scale_d``/``offset_d``: activation (per tensor); ``scale_w``/``offset_w``: weights, one value or one
    per output channel (offset 0: symmetric); ``tensor_balance_factor``: DMQ per-input-channel factors;
    ``scale_h``/``offset_h``/``scale_r``/``offset_r``: RNN hidden state and recurrent weights.
    ``shift_bit`` is reserved by AMCT (kept for round trips).
    """

    scale_d: float | None = None
    offset_d: int | None = None
    scale_w: list[float] = field(default_factory=list)
    offset_w: list[int] = field(default_factory=list)
    tensor_balance_factor: list[float] = field(default_factory=list)
    skip_fusion: bool | None = None
    dst_type: str | None = None
    act_type: str | None = None
    wts_type: str | None = None
    fakequant_precision_mode: str | None = None
    scale_h: float | None = None
    offset_h: int | None = None
    scale_r: list[float] = field(default_factory=list)
    offset_r: list[int] = field(default_factory=list)
    shift_bit: list[int] = field(default_factory=list)

    def set_fields(self) -> dict[str, Any]:
        """The fields that are set (not ``None``, not empty)."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
                if getattr(self, f.name) is not None and getattr(self, f.name) != []}

    def update(self, other: "LayerRecord") -> "LayerRecord":
        """Field-level merge in place: every field ``other`` sets replaces ours. Returns ``self``."""
        for key, value in other.set_fields().items():
            setattr(self, key, list(value) if isinstance(value, list) else value)
        return self

    def problems(self, name: str) -> list[str]:
        """What AMCT would reject in this layer's factors (an empty list: nothing)."""
        out = []
        for key in ("scale_d", "scale_h"):
            v = getattr(self, key)
            if v is not None and not (math.isfinite(v) and v > 0):
                out.append(f"layer '{name}' {key}: got {v!r}; allowed: a positive finite float32")
        for key in ("scale_w", "scale_r", "tensor_balance_factor"):
            bad = [v for v in getattr(self, key) if not (math.isfinite(v) and v > 0)]
            if bad:
                out.append(f"layer '{name}' {key}: got {bad[0]!r}; allowed: positive finite float32 values")
        for key, scales in (("offset_w", "scale_w"), ("offset_r", "scale_r")):
            offsets = getattr(self, key)
            if any(o != 0 for o in offsets):
                out.append(f"layer '{name}' {key}: got {offsets}; allowed: 0 (weights are symmetric)")
            if offsets and len(offsets) != len(getattr(self, scales)):
                out.append(f"layer '{name}' {key}: got {len(offsets)} values; allowed: as many as {scales} "
                           f"({len(getattr(self, scales))})")
        for key in ("dst_type", "act_type", "wts_type"):
            v = getattr(self, key)
            if v is not None and v not in _DATA_TYPES:
                out.append(f"layer '{name}' {key}: got {v!r}; allowed: one of {', '.join(_DATA_TYPES)}")
        if self.fakequant_precision_mode not in (None, "DEFAULT", "FORCE_FP16_QUANT"):
            out.append(f"layer '{name}' fakequant_precision_mode: got {self.fakequant_precision_mode!r}; "
                       "allowed: one of DEFAULT, FORCE_FP16_QUANT")
        lo, hi = (-32768, 32767) if self.act_type == "INT16" else (-128, 127)
        for key in ("offset_d", "offset_h"):
            v = getattr(self, key)
            if v is not None and not lo <= v <= hi:
                out.append(f"layer '{name}' {key}: got {v}; allowed: {lo} <= {key} <= {hi}")
        return out


@dataclass
class KVCacheRecord:
    """The factors of one KV-cache tensor (``SingleLayerKVCacheRecord``): per tensor or per channel."""

    scale: list[float] = field(default_factory=list)
    offset: list[int] = field(default_factory=list)

    def update(self, other: "KVCacheRecord") -> "KVCacheRecord":
        """Field-level merge in place (a non-empty list of ``other`` replaces ours). Returns ``self``."""
        if other.scale:
            self.scale = list(other.scale)
        if other.offset:
            self.offset = list(other.offset)
        return self

    def problems(self, name: str) -> list[str]:
        out = []
        bad = [v for v in self.scale if not (math.isfinite(v) and v > 0)]
        if bad:
            out.append(f"kv_cache '{name}' scale: got {bad[0]!r}; allowed: positive finite float32 values")
        if self.offset and len(self.offset) != len(self.scale):
            out.append(f"kv_cache '{name}' offset: got {len(self.offset)} values; allowed: as many as scale "
                       f"({len(self.scale)})")
        bad = [v for v in self.offset if not -128 <= v <= 127]
        if bad:
            out.append(f"kv_cache '{name}' offset: got {bad[0]}; allowed: -128 <= offset <= 127")
        return out


@dataclass
class Record:
    """A whole record file.

    ``layers``: layer name -> :class:`LayerRecord` (entries with ``value``); ``kv_cache``: name ->
    :class:`KVCacheRecord` (entries with ``kv_cache_value``); ``prune_records``: one dict per
    ``prune_record`` ``{"producer": [node, ...], "consumer": [node, ...], "selective_prune": node}``
    (``selective_prune`` only when present) where a node is ``{"name": str, "attrs": {name: value}}`` and
    a value is a float (FLOAT), int (INT), str (STRING) or a list of those (FLOATS/INTS/STRINGS). An empty
    bare list is written as INTS; to write another type, or to force one, give a ``("FLOATS", [])`` style
    pair (reading gives such a pair for an empty FLOATS/STRINGS attr, so round trips keep the type).
    """

    layers: dict[str, LayerRecord] = field(default_factory=dict)
    kv_cache: dict[str, KVCacheRecord] = field(default_factory=dict)
    prune_records: list[dict[str, Any]] = field(default_factory=list)

    def set_layer(self, name: str, **fields: Any) -> LayerRecord:
        """Create or update layer ``name``; given fields replace the old ones (``None`` clears one).

        Lists may be any iterable of numbers (a tensor's ``tolist()``); a bare number for a list field
        becomes a one-element list. Unknown field names raise :class:`ConfigError`.
        """
        rec = self.layers.setdefault(name, LayerRecord())
        known = [f.name for f in dataclasses.fields(LayerRecord)]
        for key, value in fields.items():
            if key not in known:
                raise ConfigError(f"Record.set_layer('{name}').{key}", value,
                                  "no such field; known fields: " + ", ".join(known))
            setattr(rec, key, _coerce_field(f"Record.set_layer('{name}').{key}", key, value))
        return rec

    def set_kv_cache(self, name: str, scale: Iterable[float] | float, offset: Iterable[int] | int = ()) -> KVCacheRecord:
        """Create or replace the KV-cache factors of ``name``."""
        rec = KVCacheRecord(_as_list(scale, float, f"Record.set_kv_cache('{name}').scale"),
                            _as_list(offset, int, f"Record.set_kv_cache('{name}').offset"))
        self.kv_cache[name] = rec
        return rec

    def merge(self, other: "Record") -> "Record":
        """Merge ``other`` into this record in place and return ``self``.

        Layers and KV-cache entries merge field by field (``other``'s set fields win, see the module
        docs); ``other``'s prune records are appended.
        """
        for name, rec in other.layers.items():
            self.layers.setdefault(name, LayerRecord()).update(rec)
        for name, kv in other.kv_cache.items():
            self.kv_cache.setdefault(name, KVCacheRecord()).update(kv)
        self.prune_records.extend(_copy_prune(p) for p in other.prune_records)
        return self

    def problems(self) -> list[str]:
        """Everything AMCT would reject (non-zero ``offset_w``, non-positive scales, ...)."""
        out = []
        for name, rec in self.layers.items():
            out += rec.problems(name)
        for name, kv in self.kv_cache.items():
            out += kv.problems(name)
        return out

    def validate(self) -> None:
        """Raise :class:`ConfigError` describing the first of :meth:`problems` (all are listed)."""
        issues = self.problems()
        if issues:
            raise ConfigError("Record", f"{len(issues)} problem(s)", "; ".join(issues))

    # -- protobuf conversion ----------------------------------------------------------------------
    def to_proto(self) -> Any:
        """The ``ScaleOffsetRecord`` message of this record."""
        msg = pb.ScaleOffsetRecord()
        names = list(self.layers) + [k for k in self.kv_cache if k not in self.layers]
        for name in names:
            if not isinstance(name, str) or not name:
                raise ConfigError("Record.layers", name, "a non-empty layer name (str)")
            entry = msg.record.add(key=name)
            if name in self.layers:
                _fill_layer(entry.value, self.layers[name], name)
            if name in self.kv_cache:
                kv = self.kv_cache[name]
                entry.kv_cache_value.SetInParent()
                try:
                    entry.kv_cache_value.scale.extend(kv.scale)
                    entry.kv_cache_value.offset.extend(kv.offset)
                except (TypeError, ValueError) as err:
                    raise ConfigError(f"Record.kv_cache['{name}']", kv, f"float scales, int32 offsets ({err})") from None
        for i, prune in enumerate(self.prune_records):
            _fill_prune(msg.prune_record.add(), prune, f"Record.prune_records[{i}]")
        return msg

    @classmethod
    def from_proto(cls, msg: Any, source: str = "<record>", lines: list[int | None] | None = None) -> "Record":
        """Build from a ``ScaleOffsetRecord``; duplicated keys merge field by field (module docs)."""
        rec = cls()
        for i, entry in enumerate(msg.record):
            line = lines[i] if lines and i < len(lines) else None
            where = f"{source}: line {line}" if line else f"{source}: record[{i}]"
            if not entry.HasField("key") or not entry.key:
                raise ConfigError(f"{where}: key", None, "a layer name: every record entry needs key: \"...\"")
            if not entry.HasField("value") and not entry.HasField("kv_cache_value"):
                raise ConfigError(f"{where}: record '{entry.key}'", "no value",
                                  "a value { ... } or kv_cache_value { ... } block")
            if entry.HasField("value"):
                rec.layers.setdefault(entry.key, LayerRecord()).update(_layer_from(entry.value))
            if entry.HasField("kv_cache_value"):
                kv = KVCacheRecord(list(entry.kv_cache_value.scale), list(entry.kv_cache_value.offset))
                rec.kv_cache.setdefault(entry.key, KVCacheRecord()).update(kv)
        for prune in msg.prune_record:
            out: dict[str, Any] = {"producer": [_node_from(n) for n in prune.producer],
                                   "consumer": [_node_from(n) for n in prune.consumer]}
            if prune.HasField("selective_prune"):
                out["selective_prune"] = _node_from(prune.selective_prune)
            rec.prune_records.append(out)
        return rec

    def to_text(self) -> str:
        """The record file's text, in AMCT's layout."""
        return pb.to_text(self.to_proto())

    @classmethod
    def from_text(cls, text: str, source: str = "<record>") -> "Record":
        msg = pb.parse_text(text, pb.ScaleOffsetRecord, source, merge=True)
        return cls.from_proto(msg, source, _top_level_lines(text, "record"))


def read_record(path: str | os.PathLike[str]) -> Record:
    """Read an AMCT record file. Errors name the file, the line and the problem.

    A non-zero ``offset_w`` (or other value AMCT would reject) is accepted here; see
    :meth:`Record.problems` / :meth:`Record.validate`.
    """
    source = os.fspath(path)
    try:
        with open(source, encoding="utf-8") as fh:
            text = fh.read()
    except UnicodeDecodeError as err:
        raise ConfigError(source, f"byte {err.start}", "a UTF-8 text file") from None
    return Record.from_text(text, source)


def write_record(record: Record, path: str | os.PathLike[str]) -> None:
    """Write ``record`` as AMCT protobuf text, atomically (an existing file is replaced only on success)."""
    text = record.to_text()  # conversion errors happen before the file is touched
    pb.atomic_write_text(path, text)


# -- helpers --------------------------------------------------------------------------------------------
def _as_list(value: Any, kind: type, where: str) -> list:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        value = [value]
    if hasattr(value, "tolist") and not isinstance(value, (list, tuple)):
        value = value.tolist()
        value = value if isinstance(value, list) else [value]
    try:
        items = list(value)
        if kind is int:
            out = []
            for v in items:
                if isinstance(v, bool) or (isinstance(v, float) and not v.is_integer()):
                    raise TypeError(f"not an integer: {v!r}")
                out.append(int(v))
            return out
        return [float(v) for v in items]
    except (TypeError, ValueError) as err:
        raise ConfigError(where, value, f"a list of {'integers' if kind is int else 'numbers'} ({err})") from None


def _coerce_field(where: str, key: str, value: Any) -> Any:
    if key in _FLOAT_LISTS:
        return [] if value is None else _as_list(value, float, where)
    if key in _INT_LISTS:
        return [] if value is None else _as_list(value, int, where)
    if value is None:
        return None
    if key in _FLOATS:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(where, value, "a number")
        return float(value)
    if key in _INTS:
        if isinstance(value, bool) or not (isinstance(value, int) or (isinstance(value, float) and value.is_integer())):
            raise ConfigError(where, value, "an integer")
        return int(value)
    if key in _BOOLS:
        if not isinstance(value, bool):
            raise ConfigError(where, value, "true or false")
        return value
    if not isinstance(value, str):
        raise ConfigError(where, value, "a string, e.g. 'INT8'")
    return value


def _fill_layer(msg: Any, rec: LayerRecord, name: str) -> None:
    msg.SetInParent()
    for key, value in rec.set_fields().items():
        try:
            if isinstance(value, list):
                getattr(msg, key).extend(value)
            else:
                setattr(msg, key, value)
        except (TypeError, ValueError) as err:
            raise ConfigError(f"Record.layers['{name}'].{key}", value, f"a value of the proto field's type ({err})") from None


def _layer_from(msg: Any) -> LayerRecord:
    rec = LayerRecord()
    for f in dataclasses.fields(LayerRecord):
        if f.name in _FLOAT_LISTS or f.name in _INT_LISTS:
            setattr(rec, f.name, list(getattr(msg, f.name)))
        elif msg.HasField(f.name):
            setattr(rec, f.name, getattr(msg, f.name))
    return rec


def _node_from(node: Any) -> dict[str, Any]:
    attrs: dict[str, Any] = {}
    for attr in node.attr:
        type_name = pb.AttributeType.Name(attr.type) if attr.type in pb.AttributeType.DESCRIPTOR.values_by_number else None
        slot = _ATTR_TYPES.get(type_name or "")
        if slot is None:  # UNDEFINED: take whichever value is present
            slot = next((s for s in ("floats", "ints", "strings") if len(getattr(attr, s))), None) or \
                next((s for s in ("f", "i", "s") if attr.HasField(s)), None)
        if slot is None:
            attrs[attr.name] = None
        else:
            value = getattr(attr, slot)
            if slot in ("floats", "ints", "strings"):
                value = list(value)
                if not value and type_name in ("FLOATS", "STRINGS"):
                    value = (type_name, [])  # keeps its type: a bare [] is written as INTS
            attrs[attr.name] = value
    return {"name": node.name, "attrs": attrs}


def _fill_node(msg: Any, node: Any, where: str) -> None:
    if not isinstance(node, dict) or not isinstance(node.get("name"), str):
        raise ConfigError(where, node, "{'name': str, 'attrs': {attr name: value}}")
    unknown = sorted(set(node) - {"name", "attrs"})
    if unknown:
        raise ConfigError(f"{where}.{unknown[0]}", node[unknown[0]], "no such key; known keys: attrs, name")
    msg.name = node["name"]
    for aname, value in (node.get("attrs") or {}).items():
        attr = msg.attr.add(name=aname)
        type_name, value = _attr_type(value, f"{where}.attrs['{aname}']")
        if type_name is None:
            continue
        attr.type = pb.AttributeType.Value(type_name)
        slot = _ATTR_TYPES[type_name]
        try:
            if slot in ("floats", "ints", "strings"):
                getattr(attr, slot).extend(value)
            else:
                setattr(attr, slot, value)
        except (TypeError, ValueError) as err:
            raise ConfigError(f"{where}.attrs['{aname}']", value, f"a value of type {type_name} ({err})") from None


def _attr_type(value: Any, where: str) -> tuple[str | None, Any]:
    if value is None:
        return None, None
    if isinstance(value, tuple) and len(value) == 2 and isinstance(value[0], str) and value[0] in _ATTR_TYPES:
        return value
    if isinstance(value, bool):
        return "INT", int(value)
    if isinstance(value, int):
        return "INT", value
    if isinstance(value, float):
        return "FLOAT", value
    if isinstance(value, str):
        return "STRING", value
    if isinstance(value, (list, tuple)):
        items = list(value)
        if all(isinstance(v, str) for v in items) and items:
            return "STRINGS", items
        if all(isinstance(v, int) and not isinstance(v, bool) for v in items):
            return "INTS", items
        if all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in items):
            return "FLOATS", [float(v) for v in items]
    raise ConfigError(where, value, "a float, int, str, a list of one of those, or ('TYPE', value)")


def _fill_prune(msg: Any, prune: Any, where: str) -> None:
    if not isinstance(prune, dict):
        raise ConfigError(where, prune, "{'producer': [...], 'consumer': [...], 'selective_prune': {...}}")
    unknown = sorted(set(prune) - {"producer", "consumer", "selective_prune"})
    if unknown:
        raise ConfigError(f"{where}.{unknown[0]}", prune[unknown[0]],
                          "no such key; known keys: consumer, producer, selective_prune")
    for role in ("producer", "consumer"):
        for j, node in enumerate(prune.get(role) or ()):
            _fill_node(getattr(msg, role).add(), node, f"{where}.{role}[{j}]")
    if prune.get("selective_prune") is not None:
        _fill_node(msg.selective_prune, prune["selective_prune"], f"{where}.selective_prune")


def _copy_prune(prune: dict[str, Any]) -> dict[str, Any]:
    def node(n: dict[str, Any]) -> dict[str, Any]:
        return {"name": n["name"], "attrs": {k: (list(v) if isinstance(v, list) else v)
                                             for k, v in (n.get("attrs") or {}).items()}}
    out: dict[str, Any] = {"producer": [node(n) for n in prune.get("producer") or ()],
                           "consumer": [node(n) for n in prune.get("consumer") or ()]}
    if prune.get("selective_prune") is not None:
        out["selective_prune"] = node(prune["selective_prune"])
    return out


def _top_level_lines(text: str, field_name: str) -> list[int | None]:
    """1-based line of each top-level ``field_name`` entry (used to point errors at an entry)."""
    try:
        tok = text_format.Tokenizer(text.splitlines())
        depth, out = 0, []
        while not tok.AtEnd():
            t = tok.token
            if t in ("{", "<"):
                depth += 1
            elif t in ("}", ">"):
                depth -= 1
            elif depth == 0 and t == field_name:
                out.append(tok._line + 1)  # noqa: SLF001 (no public accessor)
            tok.NextToken()
        return out
    except Exception:  # noqa: BLE001 (best effort: errors then name the entry index instead)
        return []

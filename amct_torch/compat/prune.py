"""AMCT's pruning functions (channel and 4:2 retrain, the automatic channel-prune search), built on
:func:`amct_torch.prune_channels`, :func:`amct_torch.shrink` and :func:`amct_torch.sparsity.apply_nm`.

An AMCT script runs unchanged with ``import amct_torch as amct`` (amct.md §1.3)::

    pruned = amct.create_prune_retrain_model(model, x, "./prune.cfg", "./tmp/record.txt")
    ... fine-tune pruned ...
    torch.save(pruned.state_dict(), "./tmp/pruned.pth")
    amct.save_prune_retrain_model(pruned, "./results/user_model", x)
    # -> ./results/user_model_fake_quant_model.onnx and ./results/user_model_deploy_model.onnx (the same
    #    plain float model: pruning has nothing for ATC to quantize)

    # later, from the float model, the cfg, the record and the checkpoint:
    pruned = amct.restore_prune_retrain_model(model, x, "./tmp/record.txt", "./prune.cfg", "./tmp/pruned.pth")

The ``.cfg`` is AMCT's retrain config (protobuf text of ``AMCTRetrainConfig``)::

    prune_config { filter_pruner { balanced_l2_norm_filter_prune { prune_ratio: 0.3 ascend_optimized: true } } }
    regular_prune_skip_layers: "conv1"
    override_layer_configs { layer_name: "layer1.0.conv1"
        prune_config { filter_pruner { balanced_l2_norm_filter_prune { prune_ratio: 0.5 } } } }
    # or 4:2: prune_config { n_out_of_m_pruner { l1_selective_prune { n_out_of_m_type: M4N2 update_freq: 0 } } }

Per layer: ``override_layer_configs`` > ``override_layer_types`` > the global ``prune_config``; layers named in
``skip_layers`` / ``regular_prune_skip_layers`` or of a type in ``skip_layer_types`` /
``regular_prune_skip_types`` (the unions) are left alone. Channel (filter) pruning takes Conv2d and Linear
(AMCT's ``PRUNABLE_TYPES``; depthwise convolutions and BatchNorms shrink with their input): each dependency
group loses ``prune_ratio`` of its channels by balanced L2 norm (a group coupling several layers, e.g. a
residual connection, takes the smallest ratio among them; with ``ascend_optimized`` the kept channels
round up to a multiple of 16), and the model is **physically shrunk**. 4:2 (``M4N2``) takes Conv2d, Linear
and ConvTranspose2d: 2 of every 4 weights along the input channels stay, the mask chosen on the first
training batch (``update_freq: 0``) or every ``update_freq`` batches. One layer gets one of the two.

``record_file`` receives AMCT's ``prune_record`` entries: per pruned group its producers and consumers
(BatchNorms and depthwise convolutions included), each with ``type``, ``begin`` and ``end`` (the range of
the layer's channels in the group), and per 4:2 layer a ``selective_prune`` node with its ``mask_shape``.

:func:`auto_channel_prune_search` writes such a ``.cfg`` from a MACs budget (a per-layer ``prune_ratio`` for
every producer of a pruned group), from AMCT's ``AutoChannelPruneConfig``::

    compress_ratio: 1.25  ascend_optimized: true  max_prune_ratio: 0.8  test_iteration: 1

``create_compressed_retrain_model`` / ``restore_compressed_retrain_model`` / ``save_compressed_retrain_model``
(amct.md §1.4) prune first, then prepare quantization-aware training from the same ``.cfg``'s
``retrain_*_quant_config`` (channel prune + INT8 QAT, 4:2 + INT8 QAT).
"""

from __future__ import annotations

import copy
import os
import shutil
import tempfile
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from ..config import ChannelPruneConfig, ChannelSearchConfig, ConfigError, NMConfig, QuantConfig, Targeting
from ..config import amct_proto as pb
from ..config.amct_cfg import _f32
from ..config.amct_retrain import RetrainCfg, read_retrain_cfg
from ..config.record import Record, read_record, write_record
from ..export.files import write_all
from ..graph.groups import channel_groups
from ..graph.plan import render_table
from ..graph.shrink import shrink
from ..nn import CompressedLayer
from ..sparsity.channel import prune_channels
from ..sparsity.masks import MaskStage
from ..sparsity.nm import apply_nm
from ..sparsity.search import (ChannelSearchPlan, ChannelSearchRecord, SearchGraphInfo, greedy_search, search_space,
                               taylor_sensitivity)
from ._layers import pick_spelling

__all__ = ["create_prune_retrain_model", "restore_prune_retrain_model", "save_prune_retrain_model",
           "auto_channel_prune_search", "SensitivityBase", "TaylorLossSensitivity", "SearchChannelBase",
           "GreedySearch", "PruneReport", "create_compressed_retrain_model", "restore_compressed_retrain_model",
           "save_compressed_retrain_model"]

#: AMCT's PRUNABLE_TYPES (channel prune) and SELECTIVE_PRUNABLE_TYPES (4:2), amct.md §5.1.
CHANNEL_TYPES: tuple[type, ...] = (nn.Conv2d, nn.Linear)
SELECTIVE_TYPES: tuple[type, ...] = (nn.Conv2d, nn.Linear, nn.ConvTranspose2d)
_WEIGHTED = (nn.modules.conv._ConvNd, nn.Linear)
_KIND_WORDS = {"channel": "channel (filter) pruning", "n:m": "4:2 selective pruning"}


def _type_names(types: tuple[type, ...]) -> str:
    return ", ".join(t.__name__ for t in types)


# -- the .cfg's prune settings per layer ------------------------------------------------------------------
@dataclass
class _LayerPrune:
    kind: str                      # "channel", "n:m", "skip" or "none"
    config: Any = None             # ChannelPruneConfig / NMConfig
    origin: str = ""               # the cfg key that decided it, or why nothing applies


def _prune_of(pc: Any, where: str) -> tuple[str, Any]:
    """One ``PruneConfig`` message -> ("channel", ChannelPruneConfig) or ("n:m", NMConfig)."""
    strategy = pc.WhichOneof("regular_prune_strategy")
    if strategy is None:
        raise ConfigError(where, "{}", "filter_pruner { balanced_l2_norm_filter_prune { prune_ratio: ... } } or "
                                       "n_out_of_m_pruner { l1_selective_prune { ... } }")
    if strategy == "filter_pruner":
        if pc.filter_pruner.WhichOneof("filter_prune_algo") is None:
            raise ConfigError(f"{where}.filter_pruner", "{}", "balanced_l2_norm_filter_prune { prune_ratio: ... }")
        algo = pc.filter_pruner.balanced_l2_norm_filter_prune
        key = f"{where}.filter_pruner.balanced_l2_norm_filter_prune"
        ratio = _f32(algo.prune_ratio)
        if not 0.0 <= ratio < 1.0:
            raise ConfigError(f"{key}.prune_ratio", ratio, "a fraction of the channels in [0, 1) (AMCT recommends 0.2)")
        return "channel", ChannelPruneConfig(ratio=ratio, criterion="l2", ascend_optimized=algo.ascend_optimized,
                                             round_to=16)
    if pc.n_out_of_m_pruner.WhichOneof("n_out_of_m_prune_algo") is None:
        raise ConfigError(f"{where}.n_out_of_m_pruner", "{}", "l1_selective_prune { n_out_of_m_type: M4N2 update_freq: 0 }")
    algo = pc.n_out_of_m_pruner.l1_selective_prune
    n_m = {"M4N2": (2, 4)}[pb.NOutOfMType.Name(algo.n_out_of_m_type)]
    return "n:m", NMConfig(n=n_m[0], m=n_m[1], update_freq=int(algo.update_freq))


def _resolve(cfg: RetrainCfg, layers: Mapping[str, nn.Module]) -> dict[str, _LayerPrune]:
    """What the cfg gives every weighted layer (see the module docstring for the precedence)."""
    m, src = cfg.message, cfg.source
    names = sorted(layers)
    shown = ", ".join(names[:20]) + (", ..." if len(names) > 20 else "")
    for key in ("skip_layers", "regular_prune_skip_layers"):
        for i, name in enumerate(getattr(m, key)):
            if name not in layers:
                raise ConfigError(f"{src}: {key}[{i}]", name, f"a layer of the model with a weight ({shown})")
    global_ = _prune_of(m.prune_config, f"{src}: prune_config") if m.HasField("prune_config") else None
    by_type: list[tuple[int, str, tuple[str, Any]]] = []
    for i, ov in enumerate(m.override_layer_types):
        if ov.HasField("prune_config"):
            where = f"{src}: override_layer_types[{i}] ({ov.layer_type}) prune_config"
            kind, pcfg = _prune_of(ov.prune_config, where)
            allowed = CHANNEL_TYPES if kind == "channel" else SELECTIVE_TYPES
            if ov.layer_type not in {t.__name__ for t in allowed}:
                raise ConfigError(f"{src}: override_layer_types[{i}].layer_type", ov.layer_type,
                                  f"a type AMCT's {_KIND_WORDS[kind]} takes: {_type_names(allowed)}")
            by_type.append((i, ov.layer_type, (kind, pcfg)))
    by_name: dict[str, tuple[int, tuple[str, Any]]] = {}
    for i, ov in enumerate(m.override_layer_configs):
        if ov.HasField("prune_config"):
            where = f"{src}: override_layer_configs[{i}] ({ov.layer_name}) prune_config"
            if ov.layer_name not in layers:
                raise ConfigError(f"{src}: override_layer_configs[{i}].layer_name", ov.layer_name,
                                  f"a layer of the model with a weight ({shown})")
            kind, pcfg = _prune_of(ov.prune_config, where)
            allowed = CHANNEL_TYPES if kind == "channel" else SELECTIVE_TYPES
            layer = layers[ov.layer_name]
            if not isinstance(layer, allowed):
                raise ConfigError(where, type(layer).__name__,
                                  f"a layer AMCT's {_KIND_WORDS[kind]} takes: {_type_names(allowed)}")
            by_name[ov.layer_name] = (i, (kind, pcfg))
    if global_ is None and not by_type and not by_name:
        raise ConfigError(f"{src}: prune_config", None, "a prune_config { filter_pruner { ... } } or "
                          "{ n_out_of_m_pruner { ... } }, globally or in an override (the file has none)")
    skip_names = {"skip_layers": set(m.skip_layers), "regular_prune_skip_layers": set(m.regular_prune_skip_layers)}
    skip_types = {"skip_layer_types": set(m.skip_layer_types), "regular_prune_skip_types": set(m.regular_prune_skip_types)}
    out: dict[str, _LayerPrune] = {}
    for name, layer in layers.items():
        t = type(layer).__name__
        hit = next((k for k, v in skip_names.items() if name in v), None) or \
            next((k for k, v in skip_types.items() if t in v), None)
        if hit is not None:
            out[name] = _LayerPrune("skip", origin=f"in {hit}")
            continue
        chosen, origin = global_, "prune_config"
        for i, layer_type, value in by_type:
            if layer_type == t:
                chosen, origin = value, f"override_layer_types[{i}]"
        if name in by_name:
            i, chosen = by_name[name]
            origin = f"override_layer_configs[{i}]"
        if chosen is None:
            out[name] = _LayerPrune("none", origin="no prune_config for it")
            continue
        kind, pcfg = chosen
        allowed = CHANNEL_TYPES if kind == "channel" else SELECTIVE_TYPES
        if not isinstance(layer, allowed):
            out[name] = _LayerPrune("none", origin=f"{t}: AMCT's {_KIND_WORDS[kind]} takes {_type_names(allowed)}")
            continue
        out[name] = _LayerPrune(kind, pcfg, origin)
    return out


# -- the report ------------------------------------------------------------------------------------------
@dataclass
class PruneReport:
    """What the pruning did to every layer with a weight: ``rows[name] = (action, detail)``."""

    rows: dict[str, tuple[str, str]] = field(default_factory=dict)
    layer_types: dict[str, str] = field(default_factory=dict)

    def pruned(self, action: str | None = None) -> list[str]:
        """Layers channel-pruned or 4:2-pruned (``action``: ``"channel prune"`` or ``"4:2"`` for one kind)."""
        kinds = (action,) if action else ("channel prune", "4:2")
        return [n for n, (a, _) in self.rows.items() if a in kinds]

    def skipped(self) -> dict[str, str]:
        return {n: d for n, (a, d) in self.rows.items() if a not in ("channel prune", "4:2")}

    def __str__(self) -> str:
        rows = [(n, self.layer_types.get(n, ""), a, d) for n, (a, d) in self.rows.items()]
        head = (f"prune: {len(self.pruned('channel prune'))} layers channel-pruned, {len(self.pruned('4:2'))} 4:2, "
                f"{len(rows) - len(self.pruned())} left as they are")
        return "\n".join([head, render_table(["layer", "type", "action", "detail"], rows)])


# -- building the pruned model ---------------------------------------------------------------------------
def _unwrap(model: nn.Module) -> nn.Module:
    if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
        return model.module
    return model


def _node(name: str, layer_type: str, classes: np.ndarray) -> dict[str, Any]:
    idx = np.flatnonzero(np.asarray(classes) >= 0)
    return {"name": name, "attrs": {"type": layer_type, "begin": int(idx.min()), "end": int(idx.max()) + 1}}


def _read_cfg(config_defination: Any, who: str) -> RetrainCfg:
    if config_defination is None:
        raise TypeError(f"{who}: config_defination (the retrain .cfg with a prune_config) is required")
    return read_retrain_cfg(config_defination)


def _build(model: nn.Module, input_data: Any, cfg: RetrainCfg) -> tuple[nn.Module, Record, PruneReport]:
    """The pruned copy of ``model`` (channel groups shrunk, 4:2 masks attached), its prune records, the report."""
    model = copy.deepcopy(_unwrap(model))
    types = {name: type(m).__name__ for name, m in model.named_modules() if name}
    layers = {name: m for name, m in model.named_modules() if name and isinstance(m, _WEIGHTED)}
    plan = _resolve(cfg, layers)
    report = PruneReport(layer_types={n: types[n] for n in layers})
    for name, lp in plan.items():
        report.rows[name] = ("skip", lp.origin) if lp.kind == "skip" else ("keep", lp.origin) if lp.kind == "none" \
            else ("", "")
    record = Record()
    inputs: dict[str, list[str]] = {}  # consumers of shrunk groups -> notes
    channel = {n: lp for n, lp in plan.items() if lp.kind == "channel"}
    if channel:
        analysis = channel_groups(model, input_data)
        producers = {p for g in analysis.groups for p in g.producers}
        for name, lp in channel.items():
            if name not in producers:
                depthwise = isinstance(layers[name], nn.Conv2d) and layers[name].groups > 1
                report.rows[name] = ("keep", "depthwise: pruned with its input channels" if depthwise else
                                     "its output channels are in no dependency group (grouped, reused or never called)")
        overrides = {n: lp.config for n, lp in channel.items() if n in producers}
        held = [n for n, lp in plan.items() if lp.kind in ("skip", "n:m") and n in producers]
        masked = prune_channels(model, ChannelPruneConfig(ratio=0.0, criterion="l2"), input_data, overrides=overrides,
                                skip=held, inplace=True)
        groups = masked.amct_channel_plan.decisions
        model, _ = shrink(masked, input_data, inplace=True)
        for d in groups:
            g = d.group
            for p in g.producers:
                if p not in channel or p not in producers:
                    continue
                if d.keep is not None:
                    report.rows[p] = ("channel prune", f"{len(d.keep)}/{g.channels} output channels kept "
                                      f"(group {g.index}, prune_ratio {d.ratio:g}, {plan[p].origin})")
                else:
                    reason = d.reason
                    if reason.startswith("keeps all") and any(q not in overrides for q in g.producers):
                        others = [q for q in g.producers if q not in overrides]
                        reason = f"group {g.index} also holds {', '.join(others)}, which is not channel-pruned"
                    report.rows[p] = ("keep", reason)
            if d.keep is None:
                continue
            for c in g.consumers:
                inputs.setdefault(c, []).append(f"input channels shrink with group {g.index}")
            record.prune_records.append({
                "producer": [_node(p, types[p], g.producer_channels[p]) for p in g.producers],
                "consumer": [_node(f, types[f], g.follower_channels[f]) for f in g.followers]
                            + [_node(c, types[c], g.consumer_channels[c]) for c in g.consumers]})
    selective = {n: lp.config for n, lp in plan.items() if lp.kind == "n:m"}
    if selective:
        model = apply_nm(model, Targeting(None, module_name=selective), input_data, inplace=True)
        decided = {lp.name: lp for lp in model.amct_prune_plan.layers}
        for name, nm_cfg in selective.items():
            lp = decided.get(name)
            if lp is None or lp.action != "wrap":
                report.rows[name] = ("keep", f"4:2 not applied: {lp.detail if lp else 'not found'}")
                continue
            weight = model.get_submodule(name).module.weight
            report.rows[name] = ("4:2", f"{nm_cfg.short()} ({plan[name].origin})")
            record.prune_records.append({"producer": [], "consumer": [], "selective_prune": {
                "name": name, "attrs": {"type": types[name], "mask_shape": list(weight.shape)}}})
    for c, notes in inputs.items():
        if c in report.rows:
            action, detail = report.rows[c]
            report.rows[c] = (action, "; ".join([detail] + notes) if detail else "; ".join(notes))
    model.amct_prune_report = report
    return model, record, report


def create_prune_retrain_model(model: nn.Module, input_data: Any, config_defination: str | os.PathLike | None = None,
                               record_file: str | os.PathLike | None = None, *,
                               config_definition: str | os.PathLike | None = None) -> nn.Module:
    """The pruned, retrainable copy of ``model`` as the retrain ``.cfg`` says; writes the prune records.

    Channel-pruned layers come back physically smaller (plain modules); 4:2 layers come back wrapped with
    their mask (a buffer in the ``state_dict``). ``model.amct_prune_report`` lists every layer with a weight:
    what it got and from which cfg key, or why it was left alone. ``record_file`` is (over)written with the
    ``prune_record`` entries only. The user's model is not changed.
    """
    config_defination = pick_spelling(config_definition, config_defination, "config_definition")
    cfg = _read_cfg(config_defination, "create_prune_retrain_model")
    if record_file is None or input_data is None or model is None:
        raise TypeError("create_prune_retrain_model(model, input_data, config_defination, record_file): all four "
                        "are required")
    pruned, record, _ = _build(model, input_data, cfg)
    m = cfg.message
    if m.HasField("retrain_data_quant_config") or m.HasField("retrain_weight_quant_config"):
        warnings.warn(f"{cfg.source}: the quantization settings (retrain_*_quant_config) are not used by "
                      "create_prune_retrain_model; create_compressed_retrain_model prunes and quantizes",
                      UserWarning, stacklevel=2)
    write_record(record, record_file)
    pruned.amct_record_file = Path(record_file)
    return pruned


def _prune_key(records: list[dict[str, Any]]) -> list[tuple]:
    def node(n: dict[str, Any]) -> tuple:
        a = n.get("attrs") or {}
        return (n["name"], a.get("type"), a.get("begin"), a.get("end"), tuple(a.get("mask_shape") or ()))

    out = []
    for r in records:
        sel = r.get("selective_prune")
        out.append((tuple(sorted(node(n) for n in r.get("producer") or ())),
                    tuple(sorted(node(n) for n in r.get("consumer") or ())), node(sel) if sel else None))
    return sorted(out, key=repr)


def _check_record(record_file: str | os.PathLike, built: Record, config: Any) -> None:
    """The prune records in ``record_file`` must be the ones this model and cfg give."""
    path = os.fspath(record_file)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"record_file {path!r} does not exist; pass the record file create_prune_retrain_model "
                                "(or create_compressed_retrain_model) wrote")
    stored = read_record(path)
    want, have = _prune_key(built.prune_records), _prune_key(stored.prune_records)
    if want != have:
        def names(keys: list[tuple]) -> str:
            out = [k[2][0] if k[2] else "+".join(n[0] for n in k[0]) for k in keys]
            return ", ".join(out) if out else "none"
        raise ConfigError(f"{path}: prune_record", names(have),
                          f"the prune records of this model and {config!s}: {names(want)} (restore with the model, "
                          "input shapes and cfg the record was written for)")


def _load_checked(model: nn.Module, pth_file: str | os.PathLike, state_dict_name: str | None, what: str) -> None:
    from .qat import _state_dict_of

    state = _state_dict_of(pth_file, state_dict_name)
    own = model.state_dict()
    if state and not any(k in own for k in state) and all(k.startswith("module.") for k in state):
        state = {k[len("module."):]: v for k, v in state.items()}
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    wrong = [k for k in own if k in state and tuple(state[k].shape) != tuple(own[k].shape)]

    def shown(keys: list[str]) -> str:
        return ", ".join(keys[:10]) + (f", ... ({len(keys)} in all)" if len(keys) > 10 else "") if keys else "none"

    if missing or unexpected or wrong:
        shapes = "; ".join(f"{k}: {tuple(state[k].shape)} in the file, {tuple(own[k].shape)} in the model"
                           for k in wrong[:5])
        raise KeyError(f"{os.fspath(pth_file)!r} does not match the {what}: missing keys: {shown(missing)}; "
                       f"unexpected keys: {shown(unexpected)}; other shapes: {shapes or 'none'}. Save the state_dict "
                       "of the model the create function returned, with the same cfg")
    model.load_state_dict(state)


def restore_prune_retrain_model(model: nn.Module, input_data: Any, record_file: str | os.PathLike,
                                config_defination: str | os.PathLike | None = None,
                                pth_file: str | os.PathLike | None = None, state_dict_name: str | None = None, *,
                                config_definition: str | os.PathLike | None = None) -> nn.Module:
    """Rebuild the pruned model from the float ``model``, the ``.cfg`` and ``record_file``, and load ``pth_file``.

    The structure is pruned again exactly as :func:`create_prune_retrain_model` did (the kept channel counts
    follow from the cfg and the dependency groups); the record's prune records must match it.
    ``state_dict_name`` picks the state dict inside a checkpoint dict; DDP's ``module.`` prefix is removed;
    keys or shapes that do not match raise an error naming them. The record file is not written.
    """
    config_defination = pick_spelling(config_definition, config_defination, "config_definition")
    cfg = _read_cfg(config_defination, "restore_prune_retrain_model")
    if pth_file is None:
        raise TypeError("restore_prune_retrain_model: pth_file (the checkpoint of the pruned model) is required")
    pruned, record, _ = _build(model, input_data, cfg)
    _check_record(record_file, record, cfg.source)
    _load_checked(pruned, pth_file, state_dict_name, f"pruned model of {cfg.source!r}")
    pruned.amct_record_file = Path(record_file)
    return pruned


# -- saving ----------------------------------------------------------------------------------------------
def _baked(model: nn.Module, who: str) -> nn.Module:
    """A copy in eval mode whose masked layers are plain layers holding the masked (zeroed) weights."""
    model = copy.deepcopy(_unwrap(model)).eval()
    for name, m in list(model.named_modules()):
        if not isinstance(m, CompressedLayer):
            continue
        extra = [type(s).__name__ for s in m.weight_pipeline if not isinstance(s, MaskStage)]
        if extra or m.input_quantizer is not None or m.output_quantizer is not None:
            raise ValueError(f"{who}: layer {name!r} carries quantizers ({', '.join(extra) or 'activation quantizers'}); "
                             "a pruned-only model was expected: use save_compressed_retrain_model for prune + QAT")
        with torch.no_grad():
            w, b = m.effective_weight().detach().clone(), m.effective_bias()
        inner = m.module
        inner.weight = nn.Parameter(w, requires_grad=inner.weight.requires_grad)
        if b is not None:
            inner.bias = nn.Parameter(b.detach().clone(), requires_grad=inner.bias.requires_grad)
        if name:
            model.set_submodule(name, inner)
        else:
            model = inner
    return model


def _prefix(save_path: str | os.PathLike) -> Path:
    raw = os.fspath(save_path)
    prefix = Path(raw)
    if raw.endswith(("/", os.sep)) or (os.altsep and raw.endswith(os.altsep)) or prefix.name == "" or prefix.is_dir():
        raise ValueError(f"save_path: got {raw!r}; allowed: a directory plus a file-name prefix, e.g. './results/model'")
    return prefix


def _name_layers(proto: Any) -> None:
    """Name each Conv / ConvTranspose / Gemm / MatMul node after its layer (``<layer>.weight`` initializer)."""
    inits = {t.name for t in proto.graph.initializer}
    taken = {n.name for n in proto.graph.node}
    for node in proto.graph.node:
        if node.op_type in ("Conv", "ConvTranspose", "Gemm", "MatMul") and len(node.input) > 1 \
                and node.input[1] in inits and node.input[1].endswith(".weight"):
            base = node.input[1][: -len(".weight")]
            name, k = base, 2
            while name in taken and name != node.name:
                name, k = f"{base}_{k}", k + 1
            taken.discard(node.name)
            node.name = name
            taken.add(name)


def save_prune_retrain_model(model: nn.Module, save_path: str | os.PathLike, input_data: Any,
                             input_names: list[str] | None = None, output_names: list[str] | None = None,
                             dynamic_axes: dict | None = None) -> None:
    """Write ``<save_path>_fake_quant_model.onnx`` and ``<save_path>_deploy_model.onnx``, both or neither.

    For a pruned model both are the same plain float ONNX model (AMCT: pruning has nothing to quantize):
    the shrunk layers as they are, 4:2 weights with their pruned weights zeroed. ``model`` is exported from
    an eval-mode copy and is not changed.
    """
    from ..export.onnx_qdq import export_qdq_model
    import onnx

    prefix = _prefix(save_path)
    plain = _baked(model, "save_prune_retrain_model")
    proto = export_qdq_model(plain, input_data, input_names=input_names, output_names=output_names,
                             dynamic_axes=dynamic_axes)
    _name_layers(proto)
    write_all({prefix.with_name(prefix.name + "_fake_quant_model.onnx"): lambda p: onnx.save(proto, p),
               prefix.with_name(prefix.name + "_deploy_model.onnx"): lambda p: onnx.save(proto, p)})


# -- automatic channel-prune search ----------------------------------------------------------------------
class SensitivityBase:
    """AMCT's plug-in for channel importance in :func:`auto_channel_prune_search`.

    Subclass it and set, in :meth:`get_sensitivity`, every search record's ``sensitivity``: one importance per
    channel class of its group (higher = keep; ``record.group`` has the producers, consumers and channel
    maps). :meth:`setup_initialization` receives ``graph_tuple = (model, GroupAnalysis)``, the
    ``input_data`` given to the search (``[data, label]``) and ``test_iteration``.
    """

    def setup_initialization(self, graph_tuple: tuple[nn.Module, Any], input_data: Any, test_iteration: int) -> None:
        self.model, self.analysis = graph_tuple
        self.input_data, self.test_iteration = input_data, test_iteration

    def get_sensitivity(self, search_records: list[ChannelSearchRecord]) -> Any:
        raise NotImplementedError(f"{type(self).__name__}.get_sensitivity(search_records): set each record's "
                                  "sensitivity (one value per channel)")


class TaylorLossSensitivity(SensitivityBase):
    """First-order Taylor importance of each channel for the loss (AMCT's ``'TaylorLossSensitivity'``):
    ``|sum(a * dL/da)|`` at the inputs of the layers that read it, over ``test_iteration`` runs of
    ``input_data = [data, label]`` with ``loss_fn`` (default: cross entropy)."""

    def __init__(self, loss_fn: Any = None):
        self.loss_fn = loss_fn if loss_fn is not None else F.cross_entropy

    def get_sensitivity(self, search_records: list[ChannelSearchRecord]) -> None:
        data, label = _data_label(self.input_data)
        taylor_sensitivity(self.model, search_records, [(data, label)] * self.test_iteration, self.loss_fn,
                           self.test_iteration)


class SearchChannelBase:
    """AMCT's plug-in for the search in :func:`auto_channel_prune_search`.

    :meth:`channel_prune_search` receives ``graph_info`` (:class:`~amct_torch.sparsity.search.SearchGraphInfo`:
    ``dense_macs``, ``target_macs``, ``macs(keep)`` for any choice, the groups), the search records (with
    their sensitivities and ``allowed_keep`` counts) and ``prune_config``
    (:class:`~amct_torch.config.ChannelSearchConfig`), and returns ``{layer: [0/1 per output channel]}`` for
    the producers whose channels go (every producer of one group the same; unnamed groups stay whole).
    """

    def channel_prune_search(self, graph_info: SearchGraphInfo, search_records: list[ChannelSearchRecord],
                             prune_config: ChannelSearchConfig) -> dict[str, list[int]]:
        raise NotImplementedError(f"{type(self).__name__}.channel_prune_search(graph_info, search_records, "
                                  "prune_config) -> {layer: [0/1, ...]}")


class GreedySearch(SearchChannelBase):
    """AMCT's ``'GreedySearch'``: the least sensitivity per MAC saved goes first, until the budget fits
    (:func:`amct_torch.sparsity.search.greedy_search`)."""

    def channel_prune_search(self, graph_info: SearchGraphInfo, search_records: list[ChannelSearchRecord],
                             prune_config: ChannelSearchConfig) -> dict[str, list[int]]:
        keep = greedy_search(search_records, graph_info, prune_config)
        plan = ChannelSearchPlan.from_keep(None, None, prune_config, list(search_records), graph_info, keep, verify=False)
        return plan.masks()


def _data_label(input_data: Any) -> tuple[Any, Any]:
    if isinstance(input_data, (list, tuple)) and len(input_data) == 2 and isinstance(input_data[0], torch.Tensor):
        return input_data[0], input_data[1]
    raise TypeError(f"input_data: got {type(input_data).__name__}; allowed: [data, label] (a batch of inputs and "
                    "its labels, as AMCT's auto_channel_prune_search takes)")


def _plugin(value: Any, base: type, builtin: type, what: str) -> Any:
    if isinstance(value, str):
        if value != builtin.__name__:
            raise ConfigError(f"auto_channel_prune_search: {what}", value,
                              f"'{builtin.__name__}' or a {base.__name__} subclass (or an instance of one)")
        return builtin()
    if isinstance(value, type) and issubclass(value, base):
        return value()
    if isinstance(value, base):
        return value
    raise TypeError(f"auto_channel_prune_search: {what}: got {type(value).__name__}; allowed: "
                    f"'{builtin.__name__}' or a {base.__name__} subclass (or an instance of one)")


def _read_auto_cfg(config: str | os.PathLike) -> tuple[Any, str]:
    text, source = None, "<cfg text>"
    if isinstance(config, os.PathLike) or (isinstance(config, str) and "\n" not in config and os.path.isfile(config)):
        source = os.fspath(config)
        text = Path(source).read_text(encoding="utf-8")
    elif isinstance(config, str) and ":" in config:
        text = config
    else:
        raise FileNotFoundError(f"config: {config!r} is neither a file nor the text of an AutoChannelPruneConfig")
    msg = pb.parse_text(text, pb.AutoChannelPruneConfig, source)
    ratio = _f32(msg.compress_ratio)
    if not ratio > 1.0:
        raise ConfigError(f"{source}: compress_ratio", ratio, "a ratio > 1 of the MACs before to after pruning "
                                                              "(1.25: the pruned model has 80% of the MACs)")
    mpr = _f32(msg.max_prune_ratio)
    if not 0.0 < mpr <= 1.0:
        raise ConfigError(f"{source}: max_prune_ratio", mpr, "a fraction in (0, 1]")
    if msg.test_iteration < 1:
        raise ConfigError(f"{source}: test_iteration", msg.test_iteration, "an integer >= 1")
    return msg, source


def _keep_from_masks(masks: Any, records: list[ChannelSearchRecord], who: str) -> dict[int, np.ndarray]:
    if not isinstance(masks, Mapping):
        raise TypeError(f"{who} returned {type(masks).__name__}; allowed: {{layer: [0/1 per output channel]}}")
    owner = {p: r for r in records for p in r.producers}
    keep: dict[int, np.ndarray] = {}
    first: dict[int, str] = {}
    for layer, mask in masks.items():
        if layer not in owner:
            raise ValueError(f"{who}: {layer!r} is not a producer of a searched group; allowed: "
                             + ", ".join(sorted(owner)))
        r = owner[layer]
        cls = r.group.producer_channels[layer]
        mask = np.asarray(mask).reshape(-1)
        if len(mask) != len(cls) or not np.isin(mask, (0, 1)).all():
            raise ValueError(f"{who}: mask of {layer!r}: got {len(mask)} values; allowed: {len(cls)} values, each 0 or 1")
        kept = np.unique(cls[(mask != 0) & (cls >= 0)])
        if r.index in keep and not np.array_equal(keep[r.index], kept):
            raise ValueError(f"{who}: the masks of {first[r.index]!r} and {layer!r} disagree; the layers of one group "
                             f"({', '.join(r.producers)}: {'; '.join(r.group.chain) or 'coupled'}) lose the same channels")
        keep.setdefault(r.index, kept)
        first.setdefault(r.index, layer)
    return keep


def auto_channel_prune_search(model: nn.Module, config: str | os.PathLike, input_data: Any,
                              output_cfg: str | os.PathLike, sensitivity: Any = "TaylorLossSensitivity",
                              search_alg: Any = "GreedySearch") -> ChannelSearchPlan:
    """Search how many channels each group keeps under AMCT's ``compress_ratio`` and write a channel-prune
    ``.cfg`` (``output_cfg``) for :func:`create_prune_retrain_model`.

    Args:
        model: the trained float model (not changed).
        config: AMCT's ``AutoChannelPruneConfig`` cfg (path or text): ``compress_ratio`` (MACs before / after,
            > 1), ``ascend_optimized`` (kept channels in multiples of 16), ``max_prune_ratio``,
            ``test_iteration`` (sensitivity runs), ``override_prune_cfg`` (a retrain cfg whose skip lists
            and overrides are kept: their layers are not searched and the output cfg carries them).
        input_data: ``[data, label]``: a batch for the graph, the MACs and the sensitivity.
        output_cfg: where the retrain ``.cfg`` goes (per-layer ``prune_ratio`` overrides).
        sensitivity: ``'TaylorLossSensitivity'`` or a :class:`SensitivityBase` subclass (or instance).
        search_alg: ``'GreedySearch'`` or a :class:`SearchChannelBase` subclass (or instance).

    MACs stand in for AMCT's bit-complexity (MACs x activation bits x weight bits): for a float model the
    ratio is the same. Returns the :class:`~amct_torch.sparsity.search.ChannelSearchPlan`.
    """
    msg, source = _read_auto_cfg(config)
    data, _ = _data_label(input_data)
    base = None
    if msg.HasField("override_prune_cfg") and msg.override_prune_cfg:
        path = Path(msg.override_prune_cfg)
        if not path.is_file() and source != "<cfg text>" and (Path(source).parent / path).is_file():
            path = Path(source).parent / path
        if not path.is_file():
            raise FileNotFoundError(f"{source}: override_prune_cfg {msg.override_prune_cfg!r} does not exist")
        base = read_retrain_cfg(path)
    search_config = ChannelSearchConfig(flops_target=1.0 / _f32(msg.compress_ratio), ascend_optimized=msg.ascend_optimized,
                                        round_to=16, max_prune_ratio=_f32(msg.max_prune_ratio),
                                        num_batches=int(msg.test_iteration))
    layers = {name: m for name, m in _unwrap(model).named_modules() if name and isinstance(m, _WEIGHTED)}
    fixed = {n for n, m in layers.items() if not isinstance(m, CHANNEL_TYPES)}
    if base is not None:
        resolved = _resolve(base, layers) if _has_prune(base) else {}
        fixed |= {n for n, lp in resolved.items() if lp.kind in ("skip", "channel", "n:m")}
        m = base.message
        fixed |= set(m.skip_layers) | set(m.regular_prune_skip_layers)
        skip_types = set(m.skip_layer_types) | set(m.regular_prune_skip_types)
        fixed |= {n for n, layer in layers.items() if type(layer).__name__ in skip_types}
    net = _unwrap(model)
    records, info = search_space(net, search_config, data, skip=sorted(fixed))
    sens = _plugin(sensitivity, SensitivityBase, TaylorLossSensitivity, "sensitivity")
    sens.setup_initialization((net, info.analysis), input_data, int(msg.test_iteration))
    sens.get_sensitivity(records)
    alg = _plugin(search_alg, SearchChannelBase, GreedySearch, "search_alg")
    masks = alg.channel_prune_search(info, records, search_config)
    keep = _keep_from_masks(masks, records, f"{type(alg).__name__}.channel_prune_search")
    plan = ChannelSearchPlan.from_keep(net, data, search_config, records, info, keep)
    if plan.macs_fraction > search_config.flops_target * (1 + 1e-6):
        warnings.warn(f"auto_channel_prune_search: {type(alg).__name__} leaves {plan.macs_fraction:.3f} of the MACs; "
                      f"compress_ratio {_f32(msg.compress_ratio):g} asks for at most {search_config.flops_target:.3f}",
                      UserWarning, stacklevel=2)
    plan.write_cfg(output_cfg, base.message if base is not None else None)
    return plan


def _has_prune(cfg: RetrainCfg) -> bool:
    m = cfg.message
    return m.HasField("prune_config") or any(ov.HasField("prune_config") for ov in m.override_layer_configs) or \
        any(ov.HasField("prune_config") for ov in m.override_layer_types)


# -- combined compression: prune, then quantization-aware training -------------------------------------
def _compressed(model: nn.Module, input_data: Any, cfg: RetrainCfg) -> tuple[nn.Module, Record]:
    from ..config.amct_retrain import resolve_retrain_configs
    from ..graph import fold_batch_norm, swap_layers
    from ..quant import prepare_qat
    from .qat import _default

    pruned, record, report = _build(model, input_data, cfg)
    folded, _ = fold_batch_norm(pruned, input_data, train=True)
    _, dry = swap_layers(folded, Targeting(QuantConfig()), input_data, inplace=True, reuse_wrapped=True)
    layers = {name: folded.get_submodule(name) for name in dry.wrapped()}
    layers = {n: (m.module if isinstance(m, CompressedLayer) else m) for n, m in layers.items()}
    layers = {n: m for n, m in layers.items() if getattr(m, "weight", None) is not None}
    _, per_layer = resolve_retrain_configs(cfg, {n: type(m).__name__ for n, m in layers.items()},
                                           defaults={n: _default(m, cfg.settings().batch_num) for n, m in layers.items()})
    qat = prepare_qat(pruned, Targeting(None, module_name=per_layer), input_data, quantize_outputs="none")
    qat.amct_prune_report = report
    qat.amct_retrain_configs = per_layer
    return qat, record


def create_compressed_retrain_model(model: nn.Module, input_data: Any,
                                    config_defination: str | os.PathLike | None = None,
                                    record_file: str | os.PathLike | None = None, *,
                                    config_definition: str | os.PathLike | None = None) -> nn.Module:
    """Prune (channel or 4:2, as :func:`create_prune_retrain_model`), then prepare quantization-aware
    training of the pruned model from the same ``.cfg``'s ``retrain_*_quant_config`` (skip lists,
    overrides: as :func:`create_quant_retrain_config`). Writes the prune records to ``record_file``; the
    learned factors join them at :func:`save_compressed_retrain_model`."""
    config_defination = pick_spelling(config_definition, config_defination, "config_definition")
    cfg = _read_cfg(config_defination, "create_compressed_retrain_model")
    if record_file is None or input_data is None or model is None:
        raise TypeError("create_compressed_retrain_model(model, input_data, config_defination, record_file): all "
                        "four are required")
    qat, record = _compressed(model, input_data, cfg)
    write_record(record, record_file)
    qat.amct_record_file = Path(record_file)
    return qat


def restore_compressed_retrain_model(model: nn.Module, input_data: Any,
                                     config_defination: str | os.PathLike | None = None,
                                     record_file: str | os.PathLike | None = None,
                                     pth_file: str | os.PathLike | None = None, state_dict_name: str | None = None, *,
                                     config_definition: str | os.PathLike | None = None) -> nn.Module:
    """Rebuild the pruned QAT model from the float ``model``, the ``.cfg`` and ``record_file`` (its prune records
    must match), and load the checkpoint ``pth_file`` (``state_dict_name`` picks it inside a dict)."""
    config_defination = pick_spelling(config_definition, config_defination, "config_definition")
    cfg = _read_cfg(config_defination, "restore_compressed_retrain_model")
    if record_file is None or pth_file is None:
        raise TypeError("restore_compressed_retrain_model: record_file and pth_file are required")
    qat, record = _compressed(model, input_data, cfg)
    _check_record(record_file, record, cfg.source)
    _load_checked(qat, pth_file, state_dict_name, f"compressed model of {cfg.source!r}")
    qat.amct_record_file = Path(record_file)
    return qat


def save_compressed_retrain_model(model: nn.Module, record_file: str | os.PathLike, save_path: str | os.PathLike,
                                  input_data: Any, input_names: list[str] | None = None,
                                  output_names: list[str] | None = None, dynamic_axes: dict | None = None) -> None:
    """Write ``<save_path>_fake_quant_model.onnx``, ``<save_path>_deploy_model.onnx`` and ``record_file`` (the
    learned factors next to the prune records create wrote), all or nothing.

    Refuses, writing nothing, before the quantizers are initialised (fewer than ``batch_num`` steps).
    """
    from ..export.api import export

    model = _unwrap(model)
    prefix = _prefix(save_path)
    prune_records = read_record(record_file).prune_records if os.path.isfile(record_file) else []
    with tempfile.TemporaryDirectory(prefix="amct_compressed_") as tmp:
        result = export(model, Path(tmp) / "model", input_data, input_names=input_names, output_names=output_names,
                        dynamic_axes=dynamic_axes)
        record = read_record(result.record)
        record.prune_records = prune_records
        write_all({prefix.with_name(prefix.name + "_fake_quant_model.onnx"): lambda p: shutil.copyfile(result.fake_quant, p),
                   prefix.with_name(prefix.name + "_deploy_model.onnx"): lambda p: shutil.copyfile(result.deploy, p),
                   Path(record_file): lambda p: write_record(record, p)})

"""Shrink: turn channel masks into a physically smaller model (NNI's "speed-up"), and rebuild it later.

:func:`shrink` reads the channel masks that channel pruning left in each producer (an output channel is
pruned when its filter and bias mask are all zero in every producer of its dependency group), then
slices, in place on a copy: producers' output channels (weight, bias, the mask buffers), BatchNorm and
depthwise-conv channels, and consumers' input channels (or, after a flatten, their input features). The
result computes what the masked model computed (to float tolerance) with fewer parameters and FLOPs.

The slicing is recorded in a :class:`ShrinkRecord` (``model.amct_shrink_record``, JSON-serialisable:
per layer, the kept output/input indices). A fresh, unpruned model rebuilt with
:func:`apply_shrink_record` has the shrunk structure again, so the shrunk model's ``state_dict`` loads
into it::

    small, record = amct_torch.shrink(masked, x)
    torch.save(small.state_dict(), "small.pt"); record.save("small.shrink.json")
    # later
    model = build_model(); apply_shrink_record(model, ShrinkRecord.load("small.shrink.json"))
    model.load_state_dict(torch.load("small.pt"))
"""

from __future__ import annotations

import copy
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn

from ..nn import CompressedLayer
from .groups import channel_groups

__all__ = ["shrink", "ShrinkRecord", "apply_shrink_record", "ShrinkError"]


class ShrinkError(RuntimeError):
    """The model cannot be shrunk as it is (e.g. quantizers with per-channel state attached)."""


@dataclass
class ShrinkRecord:
    """Kept indices per layer: ``{path: {"out": [...], "in": [...]}}`` (either may be absent)."""

    layers: dict[str, dict[str, list[int]]] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"version": 1, "layers": self.layers}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ShrinkRecord":
        if not isinstance(d, dict) or "layers" not in d:
            raise ValueError("a shrink record is a dict with 'layers' ({path: {'out': [...], 'in': [...]}})")
        return cls({k: {a: [int(i) for i in v] for a, v in axes.items()} for k, axes in d["layers"].items()})

    def save(self, path: str | os.PathLike) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=1))

    @classmethod
    def load(cls, path: str | os.PathLike) -> "ShrinkRecord":
        return cls.from_dict(json.loads(Path(path).read_text()))


def _inner(m: nn.Module) -> nn.Module:
    return m.module if isinstance(m, CompressedLayer) else m


def _is_transpose(m: nn.Module) -> bool:
    return isinstance(_inner(m), nn.modules.conv._ConvTransposeNd)


def _is_mask(stage: nn.Module, kind: str | None = None) -> bool:
    """A mask stage (``sparsity.MaskStage``; recognised by its attributes, graph/ does not import sparsity/)."""
    return hasattr(stage, "mask") and hasattr(stage, "kind") and (kind is None or stage.kind == kind)


def _out_alive(layer: nn.Module) -> np.ndarray:
    """Per output channel: is any weight unmasked? (all True when there is no channel mask)."""
    inner = _inner(layer)
    n = inner.out_channels if hasattr(inner, "out_channels") else inner.out_features
    alive = np.ones(n, bool)
    if not isinstance(layer, CompressedLayer):
        return alive
    for stage in layer.weight_pipeline:
        if _is_mask(stage, "channel"):
            m = stage.mask
            if _is_transpose(layer):
                groups = inner.groups
                per = m.reshape(groups, m.shape[0] // groups, m.shape[1], -1).transpose(1, 2).reshape(n, -1)
            else:
                per = m.reshape(m.shape[0], -1)
            alive &= (per != 0).any(1).cpu().numpy()
    return alive


def _check_stages(name: str, layer: CompressedLayer) -> None:
    for stage in layer.weight_pipeline:
        if not _is_mask(stage):
            raise ShrinkError(f"{name}: its weight pipeline has a {type(stage).__name__}; shrink before quantizing "
                              "or clustering (their per-channel state would not follow the slicing)")
    if layer.input_quantizer is not None or layer.output_quantizer is not None:
        raise ShrinkError(f"{name}: it has activation quantizers; shrink before quantizing")


def _slice_param(owner: nn.Module, name: str, index: torch.Tensor, dim: int) -> None:
    t = getattr(owner, name, None)
    if t is None:
        return
    new = t.detach().index_select(dim, index.to(t.device)).clone()
    if isinstance(t, nn.Parameter):
        setattr(owner, name, nn.Parameter(new, requires_grad=t.requires_grad))
    else:
        owner._buffers[name] = new


def _slice_layer(model: nn.Module, path: str, out_idx: list[int] | None, in_idx: list[int] | None) -> None:
    layer = model.get_submodule(path)
    inner = _inner(layer)
    stages = list(layer.weight_pipeline) if isinstance(layer, CompressedLayer) else []
    if isinstance(inner, nn.modules.batchnorm._BatchNorm):
        idx = torch.as_tensor(out_idx, dtype=torch.long)
        for p in ("weight", "bias", "running_mean", "running_var"):
            _slice_param(inner, p, idx, 0)
        inner.num_features = len(out_idx)
        return
    transpose = _is_transpose(inner)
    depthwise = not isinstance(inner, nn.Linear) and inner.groups > 1 and inner.groups == inner.in_channels
    if depthwise:  # channel c in -> channel c out: one index list for both
        idx = torch.as_tensor(out_idx if out_idx is not None else in_idx, dtype=torch.long)
        _slice_param(inner, "weight", idx, 0)
        _slice_param(inner, "bias", idx, 0)
        for s in stages:
            if _is_mask(s):
                s._buffers["mask"] = s.mask.index_select(0, idx).clone()
                if s.bias_mask is not None:
                    s._buffers["bias_mask"] = s.bias_mask.index_select(0, idx).clone()
        inner.in_channels = inner.out_channels = inner.groups = len(idx)
        return
    if getattr(inner, "groups", 1) > 1:
        raise ShrinkError(f"{path}: grouped convolution (groups={inner.groups}) cannot be sliced")
    w_out, w_in = (1, 0) if transpose else (0, 1)
    if out_idx is not None:
        idx = torch.as_tensor(out_idx, dtype=torch.long)
        _slice_param(inner, "weight", idx, w_out)
        _slice_param(inner, "bias", idx, 0)
        for s in stages:
            if _is_mask(s):
                s._buffers["mask"] = s.mask.index_select(w_out, idx).clone()
                if s.bias_mask is not None:
                    s._buffers["bias_mask"] = s.bias_mask.index_select(0, idx).clone()
        if isinstance(inner, nn.Linear):
            inner.out_features = len(idx)
        else:
            inner.out_channels = len(idx)
    if in_idx is not None:
        idx = torch.as_tensor(in_idx, dtype=torch.long)
        _slice_param(inner, "weight", idx, w_in)
        for s in stages:
            if _is_mask(s):
                s._buffers["mask"] = s.mask.index_select(w_in, idx).clone()
        if isinstance(inner, nn.Linear):
            inner.in_features = len(idx)
        else:
            inner.in_channels = len(idx)


def _drop_channel_masks(model: nn.Module) -> None:
    for m in model.modules():
        if isinstance(m, CompressedLayer) and m.weight_pipeline is not None:
            for i in reversed(range(len(m.weight_pipeline))):
                s = m.weight_pipeline[i]
                if _is_mask(s, "channel") and bool((s.mask != 0).all()) \
                        and (s.bias_mask is None or bool((s.bias_mask != 0).all())):
                    del m.weight_pipeline[i]


def _unwrap_empty(model: nn.Module) -> None:
    """Wrappers left with nothing to do (no stage, no quantizer) give their layer back."""
    for name, m in list(model.named_modules()):
        if isinstance(m, CompressedLayer) and not len(m.weight_pipeline or ()) and m.input_quantizer is None \
                and m.output_quantizer is None and type(m).__name__ != "CompressedAvgPool":
            if name:
                model.set_submodule(name, m.module)


def apply_shrink_record(model: nn.Module, record: ShrinkRecord) -> nn.Module:
    """Slice ``model`` (in place) to the structure ``record`` describes; returns it."""
    for path, axes in record.layers.items():
        try:
            model.get_submodule(path)
        except AttributeError:
            raise ShrinkError(f"shrink record names {path!r}, which this model does not have") from None
        _slice_layer(model, path, axes.get("out"), axes.get("in"))
    _drop_channel_masks(model)
    _unwrap_empty(model)
    return model


def shrink(model: nn.Module, example_inputs: Any, *, inplace: bool = False) -> tuple[nn.Module, ShrinkRecord]:
    """Remove the channels channel pruning masked; returns the smaller model and its :class:`ShrinkRecord`.

    Raises :class:`ShrinkError` when a pruned layer carries quantizers or other per-channel stages (shrink
    first, then quantize).
    """
    for name, m in model.named_modules():  # refuse before any work: per-channel state would not follow
        if isinstance(m, CompressedLayer) and any(_is_mask(s, "channel") for s in m.weight_pipeline or ()):
            _check_stages(name, m)
    if not inplace:
        model = copy.deepcopy(model)
    analysis = channel_groups(model, example_inputs)
    record = ShrinkRecord()
    out_keep: dict[str, np.ndarray] = {}
    in_keep: dict[str, np.ndarray] = {}
    follow_keep: dict[str, np.ndarray] = {}
    for g in analysis.groups:
        if not g.producers:
            continue
        dead = np.ones(g.channels, bool)  # a class is pruned when every producer masks it
        for p in g.producers:
            alive = _out_alive(model.get_submodule(p))
            cls = g.producer_channels[p]
            for c in range(len(cls)):
                if cls[c] >= 0 and alive[c]:
                    dead[cls[c]] = False
        if not dead.any():
            continue
        if not g.prunable:
            raise ShrinkError(f"channels of {', '.join(g.producers)} are masked but the group is not prunable: {g.blocked}")

        def keep_of(cls: np.ndarray) -> np.ndarray:
            return ~((cls >= 0) & dead[np.maximum(cls, 0)])

        for p in g.producers:
            out_keep[p] = out_keep.get(p, np.ones(len(g.producer_channels[p]), bool)) & keep_of(g.producer_channels[p])
        for c in g.consumers:
            in_keep[c] = in_keep.get(c, np.ones(len(g.consumer_channels[c]), bool)) & keep_of(g.consumer_channels[c])
        for f in g.followers:
            follow_keep[f] = follow_keep.get(f, np.ones(len(g.follower_channels[f]), bool)) & keep_of(g.follower_channels[f])
    for name in set(out_keep) | set(in_keep):
        layer = model.get_submodule(name)
        if isinstance(layer, CompressedLayer):
            _check_stages(name, layer)
    for name, keep in follow_keep.items():
        record.layers.setdefault(name, {})["out"] = np.flatnonzero(keep).tolist()
    for name, keep in out_keep.items():
        record.layers.setdefault(name, {})["out"] = np.flatnonzero(keep).tolist()
    for name, keep in in_keep.items():
        record.layers.setdefault(name, {})["in"] = np.flatnonzero(keep).tolist()
    apply_shrink_record(model, record)
    model.amct_shrink_record = record
    return model, record

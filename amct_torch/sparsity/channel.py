"""Channel (filter) pruning: masks whole channels of every dependency group, by an importance criterion.

    pruned = amct_torch.prune_channels(model, ChannelPruneConfig(ratio=0.5, criterion="fpgm"), x)
    print(pruned.amct_channel_plan)          # every group: its causal chain, channels kept, or why not pruned
    ... fine-tune the masked model ...
    small, record = amct_torch.shrink(pruned, x)   # physically smaller, same outputs

The masked model keeps every tensor's shape: a pruned output channel's filter and bias are zeroed
(producers), and every layer that reads the channel ignores it (its input-channel weights are masked),
so the masked model computes exactly what the shrunk one does, while fine-tuning and checkpoints work
on the original structure (the masks are ``MaskStage`` buffers in the ``state_dict``).
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Mapping

import numpy as np
import torch
import torch.nn as nn

from ..config.prune import ChannelPruneConfig
from ..graph import swap_layers
from ..graph.groups import ChannelGroup, GroupAnalysis, channel_groups
from ..graph.plan import render_table
from ..config import Targeting
from ..nn import CompressedLayer
from .criteria import DATA_CRITERIA, data_scores, out_axis, weight_scores
from .masks import MaskStage, refuse_after_clustering

__all__ = ["prune_channels", "ChannelPrunePlan", "channel_mask_stage", "in_axis", "channel_pruner"]


def _inner(m: nn.Module) -> nn.Module:
    return m.module if isinstance(m, CompressedLayer) else m


def in_axis(m: nn.Module) -> int:
    """Input-channel axis of a layer's weight (ConvTranspose: 0, others: 1)."""
    return 0 if isinstance(_inner(m), nn.modules.conv._ConvTransposeNd) else 1


def channel_mask_stage(layer: CompressedLayer) -> MaskStage:
    """The layer's channel mask stage (created first in its pipeline if missing)."""
    for stage in layer.weight_pipeline:
        if isinstance(stage, MaskStage) and stage.kind == "channel":
            return stage
    refuse_after_clustering("prune_channels", type(layer.module).__name__, layer)
    inner = layer.module
    cout = inner.weight.shape[out_axis(layer)] if not isinstance(inner, nn.modules.conv._ConvTransposeNd) \
        else inner.out_channels
    stage = MaskStage(inner.weight.detach(), "channel", out_channels=cout if getattr(inner, "bias", None) is not None else None)
    layer.weight_pipeline.insert(0, stage)
    return stage


@dataclass
class _GroupDecision:
    group: ChannelGroup
    keep: np.ndarray | None = None  # class indices kept
    scores: np.ndarray | None = None
    reason: str = ""
    ratio: float | None = None  # the ratio this group was pruned with (set by _decide)


@dataclass
class ChannelPrunePlan:
    """What channel pruning did to every group."""

    config: ChannelPruneConfig
    decisions: list[_GroupDecision] = field(default_factory=list)
    analysis: GroupAnalysis | None = None

    def pruned_channels(self) -> int:
        return sum(d.group.channels - len(d.keep) for d in self.decisions if d.keep is not None)

    def table(self) -> str:
        rows = []
        for d in self.decisions:
            g = d.group
            kept = f"{len(d.keep)}/{g.channels}" if d.keep is not None else f"{g.channels}/{g.channels}"
            note = d.reason or (f"pruned (ratio {d.ratio:g})" if d.keep is not None else "")
            rows.append((g.index, ", ".join(g.producers)[:60], kept, note))
        return render_table(["group", "producers", "kept", "note"], rows)

    def __str__(self) -> str:
        ratios = {d.ratio for d in self.decisions if d.ratio is not None}
        ratio = f"ratio {self.config.ratio}" if ratios <= {self.config.ratio} else "per-group ratios"
        head = (f"channel pruning ({self.config.criterion}, {ratio}"
                f"{', ascend_optimized' if self.config.ascend_optimized else ''}): "
                f"{self.pruned_channels()} channels pruned in "
                f"{sum(1 for d in self.decisions if d.keep is not None)} of {len(self.decisions)} groups")
        chains = [d.group.describe() for d in self.decisions]
        return "\n".join([head, self.table(), "", "groups:"] + [f"  {c}" for c in chains])


def _n_keep(channels: int, cfg: ChannelPruneConfig) -> int:
    keep = max(cfg.min_channels, int(math.ceil(channels * (1.0 - cfg.ratio) - 1e-9)))
    if cfg.ascend_optimized:
        keep = int(math.ceil(keep / cfg.round_to) * cfg.round_to)
    return min(channels, keep)


def _set_masks(model: nn.Module, decisions: list[_GroupDecision]) -> None:
    """Producers: pruned output channels zeroed (weight and bias); consumers: pruned inputs ignored."""
    out_keep: dict[str, np.ndarray] = {}
    in_drop: dict[str, np.ndarray] = {}
    for d in decisions:
        if d.keep is None:
            continue
        g = d.group
        pruned = np.ones(g.channels, bool)
        pruned[d.keep] = False
        for p in g.producers:
            cls = g.producer_channels[p]
            drop = (cls >= 0) & pruned[np.maximum(cls, 0)]
            out_keep[p] = out_keep.get(p, np.ones(len(cls), bool)) & ~drop
        for c in g.consumers:
            cls = g.consumer_channels[c]
            drop = (cls >= 0) & pruned[np.maximum(cls, 0)]
            in_drop[c] = in_drop.get(c, np.zeros(len(cls), bool)) | drop
    for name in set(out_keep) | set(in_drop):
        layer = model.get_submodule(name)
        stage = channel_mask_stage(layer)
        w = layer.module.weight
        mask = stage.mask.clone()
        bias_mask = stage.bias_mask.clone() if stage.bias_mask is not None else None
        if name in out_keep:
            keep = torch.as_tensor(out_keep[name], dtype=mask.dtype)
            inner = layer.module
            if isinstance(inner, nn.modules.conv._ConvTransposeNd):
                groups, cin = inner.groups, w.shape[0]
                per = keep.reshape(groups, -1)  # out channels by group -> weight (in, out/groups, ...)
                m = per.repeat_interleave(cin // groups, dim=0)
                mask = mask * m.reshape(cin, -1, *([1] * (w.dim() - 2)))
            else:
                mask = mask * keep.reshape(-1, *([1] * (w.dim() - 1)))
            if bias_mask is not None:
                bias_mask = bias_mask * keep
        if name in in_drop:
            keep_in = torch.as_tensor(~in_drop[name], dtype=mask.dtype)
            ax = in_axis(layer)
            shape = [1] * w.dim()
            shape[ax] = -1
            if len(keep_in) != w.shape[ax]:
                raise RuntimeError(f"{name}: {len(keep_in)} tracked input channels, weight has {w.shape[ax]}")
            mask = mask * keep_in.reshape(shape)
        stage.set_mask(mask, bias_mask)


def prune_channels(model: nn.Module, config: ChannelPruneConfig | None = None, example_inputs: Any = None, *,
                   data: Iterable[Any] | None = None, loss_fn: Callable[..., torch.Tensor] | None = None,
                   num_batches: int = 4, skip: Iterable[str] = (), only: Iterable[str] | None = None,
                   flops_target: float | None = None, overrides: Mapping[str, float | ChannelPruneConfig] | None = None,
                   scores: Mapping[str, Any] | None = None, inplace: bool = False) -> nn.Module:
    """Mask the least important channels of every prunable dependency group.

    Args:
        model: a float model (plain, or already wrapped by another pass).
        config: ratio (fraction of each group's channels pruned), criterion, AMCT's ``ascend_optimized``
            rounding of kept channels to multiples of ``round_to``.
        example_inputs: inputs for capture and shapes.
        data, loss_fn, num_batches: for the data criteria (``taylor``, ``apoz``, ``mean_activation``).
        skip: producer layer names (globs) whose groups are left whole.
        only: prune only the groups of these producer layers (globs), e.g. for a per-layer sensitivity scan.
        flops_target: instead of ``config.ratio``, find the uniform ratio (by bisection) at which the shrunk
            model has at most this fraction of the dense model's MACs (counted on ``example_inputs``).
        overrides: per producer layer (exact module path), its ratio or a whole :class:`ChannelPruneConfig`
            (same criterion) for its group (AMCT's per-layer ``override_layer_configs``). A group takes the
            most conservative (smallest-ratio) config among its producers, an unlisted producer counting
            as ``config``; so with ``config.ratio=0`` only the listed groups are pruned.
        scores: per producer layer, channel scores decided elsewhere (one per channel class of its group,
            e.g. :class:`~amct_torch.sparsity.search.ChannelSearchPlan.scores`), used instead of the
            criterion for that group (highest kept).
        inplace: modify ``model`` itself.

    Returns the masked model; ``model.amct_channel_plan`` (:class:`ChannelPrunePlan`) says what happened
    to every group, with its causal chain.
    """
    import fnmatch

    config = ChannelPruneConfig() if config is None else config
    if not isinstance(config, ChannelPruneConfig):
        raise TypeError(f"prune_channels(config=...): got {type(config).__name__}; allowed: ChannelPruneConfig")
    if flops_target is not None and overrides:
        raise ValueError("prune_channels: give flops_target (one uniform ratio) or overrides (per-group ratios), not both")
    if not inplace:
        model = copy.deepcopy(model)
    analysis = channel_groups(model, example_inputs)
    given = _given_scores(analysis, scores)
    skip = tuple(skip)
    only = None if only is None else tuple(only)
    decisions = []
    for g in analysis.groups:
        d = _GroupDecision(g)
        hit = next((p for p in g.producers for pat in skip if fnmatch.fnmatchcase(p, pat)), None)
        if not g.prunable:
            d.reason = f"not prunable: {g.blocked}"
        elif hit is not None:
            d.reason = f"skipped ({hit} in skip list)"
        elif only is not None and not any(fnmatch.fnmatchcase(p, pat) for p in g.producers for pat in only):
            d.reason = "not selected (only=...)"
        decisions.append(d)
    active = [d for d in decisions if not d.reason]
    involved = sorted({n for d in active for n in (*d.group.producers, *d.group.consumers)})
    if involved:
        marker = ChannelPruneConfig(ratio=config.ratio)
        model, _ = swap_layers(model, Targeting(None, module_name={n: marker for n in involved}),
                               example_inputs, inplace=True, title="channel prune", reuse_wrapped=True)
    per_group = _group_configs(decisions, active, config, overrides)
    # groups that need the criterion: not given scores, and losing channels (or any, when flops_target searches)
    scored = [d for d in active if d.group.index not in given and (
        flops_target is not None or _n_keep(d.group.channels, per_group.get(d.group.index, config)) < d.group.channels)]
    if config.criterion in DATA_CRITERIA and scored:
        if data is None:
            raise ValueError(f"criterion {config.criterion!r} scores channels from data: pass data= (and loss_fn= for taylor)")
        from_data = data_scores(model, [d.group for d in scored], config.criterion, data, num_batches, loss_fn)
    for d in active:
        g = d.group
        if g.index in given:
            d.scores = given[g.index]
        elif any(d is s for s in scored):
            d.scores = from_data[g.index] if config.criterion in DATA_CRITERIA else weight_scores(model, g, config.criterion)
    if flops_target is not None:
        config = _ratio_for_flops(model, active, config, example_inputs, flops_target)
    _decide(active, config, per_group)
    _set_masks(model, [d for d in active if d.keep is not None])
    model.amct_channel_plan = ChannelPrunePlan(config, decisions, analysis)
    return model


def _given_scores(analysis: GroupAnalysis, scores: Mapping[str, Any] | None) -> dict[int, np.ndarray]:
    """``scores`` (by producer) as group index -> scores, checked against the groups."""
    out: dict[int, np.ndarray] = {}
    for name, value in (scores or {}).items():
        g = analysis.group_of(name)
        if g is None:
            raise ValueError(f"scores: {name!r} is not a producer of any dependency group; allowed: "
                             + ", ".join(p for grp in analysis.groups for p in grp.producers))
        value = np.asarray(value, dtype=np.float64).reshape(-1)
        if len(value) != g.channels:
            raise ValueError(f"scores[{name!r}]: got {len(value)} scores; allowed: one per channel of its group "
                             f"({g.channels})")
        out[g.index] = value
    return out


def _group_configs(decisions: list[_GroupDecision], active: list[_GroupDecision], config: ChannelPruneConfig,
                   overrides: Mapping[str, float | ChannelPruneConfig] | None) -> dict[int, ChannelPruneConfig]:
    """Per active group: the smallest-ratio config among its producers (unlisted ones count as ``config``)."""
    from dataclasses import replace

    if not overrides:
        return {}
    producers = {p for d in decisions for p in d.group.producers}
    unknown = [n for n in overrides if n not in producers]
    if unknown:
        raise ValueError(f"overrides: {unknown[0]!r} is not a producer of any dependency group; allowed: "
                         + ", ".join(sorted(producers)))
    resolved: dict[str, ChannelPruneConfig] = {}
    for name, value in overrides.items():
        if isinstance(value, ChannelPruneConfig):
            cfg = value
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            cfg = replace(config, ratio=float(value))
        else:
            raise TypeError(f"overrides[{name!r}]: got {type(value).__name__}; allowed: a ratio or a ChannelPruneConfig")
        if cfg.criterion != config.criterion:
            raise ValueError(f"overrides[{name!r}]: criterion {cfg.criterion!r}; allowed: the config's "
                             f"({config.criterion!r}), one criterion per call")
        resolved[name] = cfg
    out = {}
    for d in active:
        candidates = [resolved.get(p, config) for p in d.group.producers]
        out[d.group.index] = min(candidates, key=lambda c: c.ratio)
    return out


def _decide(active: list[_GroupDecision], config: ChannelPruneConfig,
            per_group: Mapping[int, ChannelPruneConfig] | None = None) -> None:
    for d in active:
        g = d.group
        d.keep, d.reason = None, ""
        cfg = (per_group or {}).get(g.index, config)
        d.ratio = cfg.ratio
        n_keep = _n_keep(g.channels, cfg)
        if n_keep >= g.channels:
            d.reason = f"keeps all {g.channels} channels (ratio {cfg.ratio:g}, rounding)"
            continue
        order = np.argsort(-d.scores, kind="stable")
        d.keep = np.sort(order[:n_keep])


def _ratio_for_flops(model: nn.Module, active: list[_GroupDecision], config: ChannelPruneConfig, example_inputs: Any,
                     target: float, iterations: int = 12) -> ChannelPruneConfig:
    """The smallest uniform ratio whose shrunk model has at most ``target`` of the dense MACs."""
    from dataclasses import replace

    from ..analysis.flops import count_flops
    from ..graph.shrink import shrink

    if not 0.0 < target < 1.0:
        raise ValueError(f"flops_target: got {target!r}; allowed: a fraction of the dense MACs in (0, 1)")
    probe = copy.deepcopy(model).eval()
    with torch.no_grad():
        dense = count_flops(probe, example_inputs).total_macs

    def macs(ratio: float) -> float:
        trial = replace(config, ratio=ratio)
        _decide(active, trial)
        m = copy.deepcopy(probe)
        _set_masks(m, [d for d in active if d.keep is not None])
        small, _ = shrink(m, example_inputs, inplace=True)
        with torch.no_grad():
            return count_flops(small, example_inputs).total_macs / dense

    lo, hi = 0.0, 0.95
    if macs(hi) > target:
        raise ValueError(f"flops_target {target:g}: even pruning 95% of every prunable group leaves "
                         f"{macs(hi):.2f} of the MACs (the rest is in layers that cannot be pruned)")
    for _ in range(iterations):
        mid = (lo + hi) / 2
        if macs(mid) <= target:
            hi = mid
        else:
            lo = mid
    # round up: a smaller ratio than the one checked could keep more channels and miss the target
    return replace(config, ratio=math.ceil(hi * 1e4) / 1e4)


def channel_pruner(example_inputs: Any, criterion: str = "l1", **options: Any) -> Callable[[nn.Module, str, float], nn.Module]:
    """A pruner for :func:`amct_torch.analysis.sensitivity`: ``prune(model, producer, ratio)`` masks that
    fraction of the channels of ``producer``'s dependency group (and nothing else)."""

    def prune(model: nn.Module, layer: str, ratio: float) -> nn.Module:
        return prune_channels(model, ChannelPruneConfig(ratio=ratio, criterion=criterion), example_inputs,
                              only=[layer], inplace=True, **options)

    return prune

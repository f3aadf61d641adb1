"""Automatic channel-pruning search under a MACs budget (AMCT's ``auto_channel_prune_search``).

    plan = search_channel_pruning(model, ChannelSearchConfig(flops_target=0.6), x, data=loader,
                                  loss_fn=F.cross_entropy)
    print(plan)                      # per group: channels kept, Taylor importance removed; MACs before/after
    masked = plan.apply(model, x)    # exactly the channels the search chose (prune_channels with its scores)
    plan.write_cfg("pruned.cfg")     # a retrain .cfg for amct_torch.create_prune_retrain_model

Three steps, each replaceable (AMCT's ``SensitivityBase`` / ``SearchChannelBase`` plug in between them):

1. :func:`search_space` — the dependency groups that may lose channels (:func:`channel_groups`; skipped,
   blocked and single-choice groups are left out, with the reason) as :class:`ChannelSearchRecord`, and a
   MAC model of the network (:class:`SearchGraphInfo`): every layer's dense MACs (``count_flops``) scaled
   by the fraction of its channels that remain, as :func:`~amct_torch.graph.shrink.shrink` leaves them
   (Conv / Linear: ``out_kept/out * in_kept/in``; BatchNorm and depthwise convolutions: ``kept/channels``).
2. :func:`taylor_sensitivity` — per channel, the first-order Taylor estimate of the loss change when it is
   removed: ``|mean over batches of sum(a * dL/da)|`` at the inputs of the layers that read it (Molchanov
   et al. 2017; the ``taylor`` criterion of :func:`prune_channels`).
3. :func:`greedy_search` — a knapsack solved greedily by value density (AMCT §4.6): from the dense model,
   repeatedly take the step (one group down to its next allowed channel count, dropping its least
   important channels) whose importance removed per MAC saved is smallest, until the MACs fit
   ``flops_target``. Every step's MACs are exact for the current state (a layer between two pruned groups
   saves ``out * in``, not the sum). ``ascend_optimized`` steps go from one multiple of ``round_to`` to
   the next, ``max_prune_ratio`` and ``min_channels`` bound every group.

The plan's MACs are then counted again on the shrunk model (``verified_macs``).
"""

from __future__ import annotations

import fnmatch
import math
import os
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Mapping, Sequence

import numpy as np
import torch
import torch.nn as nn

from ..config.prune import ChannelPruneConfig, ChannelSearchConfig
from ..graph.groups import ChannelGroup, GroupAnalysis, channel_groups
from ..graph.plan import render_table
from ..nn import CompressedLayer
from .channel import _n_keep
from .criteria import data_scores

__all__ = ["search_channel_pruning", "search_space", "taylor_sensitivity", "greedy_search", "ChannelSearchRecord",
           "SearchGraphInfo", "ChannelSearchPlan"]


@dataclass
class ChannelSearchRecord:
    """One dependency group as the search sees it.

    ``allowed_keep``: the channel counts the group may keep, descending (the first is all of them);
    ``sensitivity``: one importance per channel class (higher = keep), set by a sensitivity step.
    """

    group: ChannelGroup
    allowed_keep: list[int]
    sensitivity: np.ndarray | None = None

    @property
    def index(self) -> int:
        return self.group.index

    @property
    def producers(self) -> list[str]:
        return self.group.producers

    @property
    def channels(self) -> int:
        return self.group.channels

    def __repr__(self) -> str:
        sens = "unset" if self.sensitivity is None else f"{len(self.sensitivity)} values"
        return (f"ChannelSearchRecord(group {self.index}: {', '.join(self.producers)}, {self.channels} channels, "
                f"keep one of {self.allowed_keep[:4]}{'...' if len(self.allowed_keep) > 4 else ''}, sensitivity {sens})")


@dataclass
class _LayerModel:
    """MACs of one layer as a function of its remaining channels (see :class:`SearchGraphInfo`)."""

    macs: float
    out_total: int = 0
    in_total: int = 0
    channelwise: bool = False  # BatchNorm / depthwise: MACs follow the channels only
    out_counts: dict[int, np.ndarray] = field(default_factory=dict)  # group -> this layer's channels per class
    in_counts: dict[int, np.ndarray] = field(default_factory=dict)

    def value(self, out_removed: float, in_removed: float) -> float:
        out = (self.out_total - out_removed) / self.out_total if self.out_total else 1.0
        inp = (self.in_total - in_removed) / self.in_total if self.in_total and not self.channelwise else 1.0
        return self.macs * out * inp


@dataclass
class SearchGraphInfo:
    """The network as the search sees it: MACs before and the budget, a MAC model, the groups.

    ``macs(keep)`` gives the model's MACs when each group ``index`` keeps the channel classes ``keep[index]``
    (groups not in ``keep`` stay whole); it equals ``count_flops`` of the shrunk model for Conv, Linear,
    BatchNorm and depthwise layers (the ones a prunable group can contain).
    """

    dense_macs: float
    target_macs: float
    layers: dict[str, _LayerModel]
    analysis: GroupAnalysis
    skipped: dict[str, str] = field(default_factory=dict)  # first producer of a group left out -> why

    def _removed(self, keep: Mapping[int, Sequence[int]]) -> tuple[dict[str, float], dict[str, float]]:
        out: dict[str, float] = {}
        inp: dict[str, float] = {}
        for name, lm in self.layers.items():
            for side, counts, acc in (("out", lm.out_counts, out), ("in", lm.in_counts, inp)):
                for g, per_class in counts.items():
                    if g in keep:
                        alive = np.zeros(len(per_class), bool)
                        alive[np.asarray(keep[g], dtype=np.int64)] = True
                        acc[name] = acc.get(name, 0.0) + float(per_class[~alive].sum())
        return out, inp

    def macs(self, keep: Mapping[int, Sequence[int]]) -> float:
        """The model's MACs with ``keep`` (group index -> kept channel classes)."""
        out, inp = self._removed(keep)
        saved = sum(lm.macs - lm.value(out.get(n, 0.0), inp.get(n, 0.0)) for n, lm in self.layers.items())
        return self.dense_macs - saved

    def layers_of(self, group: int) -> list[str]:
        return [n for n, lm in self.layers.items() if group in lm.out_counts or group in lm.in_counts]


def _allowed_keep(channels: int, config: ChannelSearchConfig) -> list[int]:
    lo = max(config.min_channels, int(math.ceil(channels * (1.0 - config.max_prune_ratio) - 1e-9)))
    lo = min(lo, channels)
    if config.ascend_optimized:
        values = [k for k in range(config.round_to, channels, config.round_to) if k >= lo]
    else:
        values = list(range(lo, channels))
    return [channels] + sorted(values, reverse=True)


def _per_class(classes: np.ndarray, n: int) -> np.ndarray:
    sel = classes >= 0
    return np.bincount(classes[sel], minlength=n).astype(np.float64)


def _is_channelwise(module: nn.Module) -> bool:
    inner = module.module if isinstance(module, CompressedLayer) else module
    return not isinstance(inner, (nn.Linear, nn.modules.conv._ConvNd)) or (
        getattr(inner, "groups", 1) > 1 and inner.groups == inner.in_channels)


def search_space(model: nn.Module, config: ChannelSearchConfig, example_inputs: Any, *,
                 skip: Iterable[str] = ()) -> tuple[list[ChannelSearchRecord], SearchGraphInfo]:
    """The groups the search may prune and the MAC model (step 1; the model is not changed).

    ``skip``: producer layer names (globs) whose groups stay whole. Groups that are not prunable, skipped,
    or have no smaller allowed channel count are left out and listed in ``info.skipped`` with the reason.
    """
    from ..analysis.flops import count_flops

    if not isinstance(config, ChannelSearchConfig):
        raise TypeError(f"search_space(config=...): got {type(config).__name__}; allowed: ChannelSearchConfig")
    analysis = channel_groups(model, example_inputs)
    with torch.no_grad():
        report = count_flops(model, example_inputs)
    layer_macs = {r.name: float(r.macs) for r in report.layers}
    skip = tuple(skip)
    records: list[ChannelSearchRecord] = []
    skipped: dict[str, str] = {}
    for g in analysis.groups:
        head = g.producers[0]
        hit = next((p for p in g.producers for pat in skip if fnmatch.fnmatchcase(p, pat)), None)
        allowed = _allowed_keep(g.channels, config)
        if not g.prunable:
            skipped[head] = f"not prunable: {g.blocked}"
        elif hit is not None:
            skipped[head] = f"skipped ({hit} in skip list)"
        elif len(allowed) < 2:
            skipped[head] = (f"{g.channels} channels: no smaller count allowed (min_channels {config.min_channels}, "
                             f"max_prune_ratio {config.max_prune_ratio:g}"
                             f"{f', multiples of {config.round_to}' if config.ascend_optimized else ''})")
        else:
            records.append(ChannelSearchRecord(g, allowed))
    layers: dict[str, _LayerModel] = {}

    def model_of(name: str) -> _LayerModel:
        if name not in layers:
            layers[name] = _LayerModel(layer_macs.get(name, 0.0), channelwise=_is_channelwise(model.get_submodule(name)))
        return layers[name]

    for rec in records:
        g = rec.group
        for p in g.producers:
            lm = model_of(p)
            lm.out_total = len(g.producer_channels[p])
            lm.out_counts[g.index] = _per_class(g.producer_channels[p], g.channels)
        for f in g.followers:
            lm = model_of(f)
            lm.out_total = len(g.follower_channels[f])
            lm.out_counts[g.index] = _per_class(g.follower_channels[f], g.channels)
        for c in g.consumers:
            lm = model_of(c)
            lm.in_total = len(g.consumer_channels[c])
            lm.in_counts[g.index] = _per_class(g.consumer_channels[c], g.channels)
    dense = float(report.total_macs)
    info = SearchGraphInfo(dense, dense * config.flops_target, layers, analysis, skipped)
    return records, info


def taylor_sensitivity(model: nn.Module, records: Sequence[ChannelSearchRecord], data: Iterable[Any],
                       loss_fn: Callable[..., torch.Tensor], num_batches: int = 4) -> None:
    """Set every record's ``sensitivity``: the first-order Taylor importance of each channel (step 2).

    ``data`` yields ``(inputs, target)`` batches, ``loss_fn(output, target)`` is the training loss. The
    model's parameters, gradients and modes are left as they were.
    """
    if not records:
        return
    scores = data_scores(model, [r.group for r in records], "taylor", data, num_batches, loss_fn)
    for r in records:
        r.sensitivity = scores[r.index]


def _order(rec: ChannelSearchRecord) -> np.ndarray:
    """Channel classes, most important first (ties: lower index first, as prune_channels keeps them)."""
    if rec.sensitivity is None:
        raise ValueError(f"group {rec.index} ({', '.join(rec.producers)}) has no sensitivity; run a sensitivity "
                         "step (e.g. taylor_sensitivity) before the search")
    sens = np.asarray(rec.sensitivity, dtype=np.float64).reshape(-1)
    if len(sens) != rec.channels:
        raise ValueError(f"group {rec.index} ({', '.join(rec.producers)}): {len(sens)} sensitivities; allowed: one "
                         f"per channel ({rec.channels})")
    return np.argsort(-sens, kind="stable")


def greedy_search(records: Sequence[ChannelSearchRecord], info: SearchGraphInfo,
                  config: ChannelSearchConfig | None = None) -> dict[int, np.ndarray]:
    """Kept channel classes per group index (every record's group) so that ``info.macs(keep)`` fits
    ``info.target_macs``, removing the least importance per MAC saved first (step 3).

    Raises ``ValueError`` when even the smallest allowed counts leave the model above the budget.
    """
    orders = {r.index: _order(r) for r in records}
    sens = {r.index: np.asarray(r.sensitivity, dtype=np.float64).reshape(-1) for r in records}
    level = {r.index: 0 for r in records}  # position in allowed_keep
    by_index = {r.index: r for r in records}
    out_rm = {n: 0.0 for n in info.layers}
    in_rm = {n: 0.0 for n in info.layers}
    members = {r.index: info.layers_of(r.index) for r in records}
    neighbours = {i: {j for j in members if set(members[j]) & set(members[i])} for i in members}
    current = info.dense_macs - sum(lm.macs - lm.value(0.0, 0.0) for lm in info.layers.values())
    cache: dict[int, tuple[float, float, np.ndarray, dict, dict] | None] = {}

    def step(i: int) -> tuple[float, float, np.ndarray, dict, dict] | None:
        rec = by_index[i]
        if level[i] + 1 >= len(rec.allowed_keep):
            return None
        k, k_next = rec.allowed_keep[level[i]], rec.allowed_keep[level[i] + 1]
        removed = orders[i][k_next:k]
        value = float(sens[i][removed].sum())
        saved, new_out, new_in = 0.0, {}, {}
        for n in members[i]:
            lm = info.layers[n]
            o, p = out_rm[n], in_rm[n]
            if i in lm.out_counts:
                o = o + float(lm.out_counts[i][removed].sum())
                new_out[n] = o
            if i in lm.in_counts:
                p = p + float(lm.in_counts[i][removed].sum())
                new_in[n] = p
            saved += lm.value(out_rm[n], in_rm[n]) - lm.value(o, p)
        return value, saved, removed, new_out, new_in

    while current > info.target_macs * (1 + 1e-12):
        best, best_key = None, None
        for i in by_index:
            if i not in cache:
                cache[i] = step(i)
            s = cache[i]
            if s is None or s[1] <= 0:
                continue
            key = (s[0] / s[1], -s[1], i)
            if best_key is None or key < best_key:
                best, best_key = i, key
        if best is None:
            keep = {i: orders[i][:by_index[i].allowed_keep[level[i]]] for i in by_index}
            limits = f"max_prune_ratio {config.max_prune_ratio:g}, min_channels {config.min_channels}" if config else ""
            left_out = "; ".join(f"{head}: {why}" for head, why in list(info.skipped.items())[:5])
            raise ValueError(f"flops_target {info.target_macs / info.dense_macs:g}: pruning every searchable group as "
                             f"far as allowed{f' ({limits})' if limits else ''} leaves "
                             f"{info.macs(keep) / info.dense_macs:.3f} of the MACs (the rest is in layers no "
                             f"searchable group reaches{'; groups left out: ' + left_out if left_out else ''})")
        value, saved, removed, new_out, new_in = cache[best]
        out_rm.update(new_out)
        in_rm.update(new_in)
        level[best] += 1
        current -= saved
        for j in neighbours[best]:
            cache.pop(j, None)
    return {i: np.sort(orders[i][:by_index[i].allowed_keep[level[i]]]) for i in by_index}


@dataclass
class ChannelSearchPlan:
    """What the search decided: per group the kept channel classes, and the MACs before and after."""

    config: ChannelSearchConfig
    records: list[ChannelSearchRecord]
    info: SearchGraphInfo
    keep: dict[int, np.ndarray]
    macs: float
    verified_macs: float | None = None

    @classmethod
    def from_keep(cls, model: nn.Module, example_inputs: Any, config: ChannelSearchConfig,
                  records: list[ChannelSearchRecord], info: SearchGraphInfo, keep: Mapping[int, Sequence[int]], *,
                  verify: bool = True) -> "ChannelSearchPlan":
        """The plan of ``keep`` (group index -> kept classes), checked, with its MACs (counted on the shrunk
        model too unless ``verify=False``)."""
        by_index = {r.index: r for r in records}
        checked: dict[int, np.ndarray] = {}
        for i, kept in keep.items():
            if i not in by_index:
                raise ValueError(f"keep: group {i} is not a searched group; allowed: {sorted(by_index)}")
            rec = by_index[i]
            kept = np.unique(np.asarray(kept, dtype=np.int64))
            if len(kept) and (kept.min() < 0 or kept.max() >= rec.channels):
                raise ValueError(f"keep[{i}] ({', '.join(rec.producers)}): channel classes must be in [0, {rec.channels})")
            if len(kept) not in rec.allowed_keep:
                raise ValueError(f"group {i} ({', '.join(rec.producers)}): keeps {len(kept)} of {rec.channels} channels; "
                                 f"allowed: {_counts_text(rec.allowed_keep)}")
            checked[i] = kept
        for rec in records:
            checked.setdefault(rec.index, np.arange(rec.channels))
        plan = cls(config, list(records), info, checked, info.macs(checked))
        if verify:
            from ..analysis.flops import count_flops
            from ..graph.shrink import shrink

            masked = plan.apply(model, example_inputs)
            small, _ = shrink(masked, example_inputs, inplace=True)
            with torch.no_grad():
                plan.verified_macs = float(count_flops(small, example_inputs).total_macs)
            if plan.verified_macs > plan.macs * (1 + 1e-6):
                warnings.warn(f"channel search: the shrunk model has {plan.verified_macs:.0f} MACs, the search's MAC "
                              f"model said {plan.macs:.0f}; the budget may be missed", RuntimeWarning, stacklevel=2)
        return plan

    @property
    def macs_fraction(self) -> float:
        """MACs after pruning / dense MACs (counted on the shrunk model when verified)."""
        macs = self.verified_macs if self.verified_macs is not None else self.macs
        return macs / self.info.dense_macs if self.info.dense_macs else 1.0

    def _pruned(self) -> list[ChannelSearchRecord]:
        return [r for r in self.records if len(self.keep[r.index]) < r.channels]

    def kept(self) -> dict[str, tuple[int, int]]:
        """Per producer of every searched group: (channels kept, channels)."""
        return {p: (len(self.keep[r.index]), r.channels) for r in self.records for p in r.producers}

    def ratios(self) -> dict[str, float]:
        """Per producer of every pruned group: the fraction of its group's channels removed."""
        return {p: (r.channels - len(self.keep[r.index])) / r.channels for r in self._pruned() for p in r.producers}

    def scores(self) -> dict[str, np.ndarray]:
        """Per pruned group (by its first producer): the channel scores that make ``prune_channels`` keep
        exactly the classes this plan keeps."""
        out = {}
        for r in self._pruned():
            s = np.zeros(r.channels)
            s[self.keep[r.index]] = 1.0
            out[r.producers[0]] = s
        return out

    def masks(self) -> dict[str, list[int]]:
        """AMCT's form: per producer of a pruned group, 1 (kept) or 0 per output channel."""
        out = {}
        for r in self._pruned():
            alive = np.zeros(r.channels, bool)
            alive[self.keep[r.index]] = True
            for p in r.producers:
                cls = r.group.producer_channels[p]
                out[p] = [int(c < 0 or alive[c]) for c in cls]
        return out

    def apply(self, model: nn.Module, example_inputs: Any, *, inplace: bool = False) -> nn.Module:
        """The masked model with exactly this plan's channels removed (``prune_channels``; then ``shrink``)."""
        from .channel import prune_channels

        return prune_channels(model, ChannelPruneConfig(ratio=0.0), example_inputs, overrides=self.ratios(),
                              scores=self.scores(), inplace=inplace)

    def cfg_text(self, base: Any = None) -> str:
        """A retrain ``.cfg`` (protobuf text of AMCT's ``AMCTRetrainConfig``) that makes
        ``create_prune_retrain_model`` keep the same number of channels in every group: one
        ``override_layer_configs`` entry per producer of a pruned group with its ``prune_ratio``. ``base``
        (an ``AMCTRetrainConfig`` message, e.g. with skip lists) is copied first; its global
        ``prune_config`` is dropped, so groups the plan keeps whole stay whole."""
        from ..config import amct_proto as pb

        msg = pb.AMCTRetrainConfig()
        if base is not None:
            msg.CopyFrom(base)
            msg.ClearField("prune_config")
        for r in self._pruned():
            ratio, ascend = _cfg_ratio(r.channels, len(self.keep[r.index]), self.config.ascend_optimized)
            for p in r.producers:
                ov = msg.override_layer_configs.add(layer_name=p)
                algo = ov.prune_config.filter_pruner.balanced_l2_norm_filter_prune
                algo.prune_ratio = ratio
                algo.ascend_optimized = ascend
        return pb.to_text(msg)

    def write_cfg(self, path: str | os.PathLike, base: Any = None) -> None:
        """Write :meth:`cfg_text` to ``path`` (atomically)."""
        from ..config import amct_proto as pb

        pb.atomic_write_text(path, self.cfg_text(base))

    def table(self) -> str:
        rows = []
        for r in self.records:
            k = len(self.keep[r.index])
            removed = np.setdiff1d(np.arange(r.channels), self.keep[r.index])
            lost = float(np.asarray(r.sensitivity)[removed].sum()) if r.sensitivity is not None and len(removed) else 0.0
            rows.append((r.index, ", ".join(r.producers)[:60], f"{k}/{r.channels}", f"{lost:.3g}",
                         "pruned" if k < r.channels else "kept whole"))
        for head, why in self.info.skipped.items():
            g = self.info.analysis.group_of(head)
            rows.append((g.index if g else "", ", ".join(g.producers)[:60] if g else head, "", "", why))
        return render_table(["group", "producers", "kept", "importance removed", "note"], rows)

    def __str__(self) -> str:
        verified = "" if self.verified_macs is None else f"; shrunk model: {self.verified_macs / self.info.dense_macs:.3f}"
        head = (f"channel search ({self.config.short()}): MACs {self.info.dense_macs:,.0f} -> {self.macs:,.0f} "
                f"({self.macs / self.info.dense_macs:.3f} of dense{verified}); "
                f"{len(self._pruned())} of {len(self.records)} searched groups pruned")
        return "\n".join([head, self.table()])


def _counts_text(allowed: Sequence[int]) -> str:
    values = sorted(allowed)
    return ", ".join(map(str, values)) if len(values) <= 8 else f"{values[0]}..{values[-1]} ({len(values)} counts)"


def _cfg_ratio(channels: int, keep: int, ascend: bool) -> tuple[float, bool]:
    """A float32 ``prune_ratio`` (and ``ascend_optimized``) with which AMCT's rule keeps exactly ``keep``."""
    for candidate_ascend in ((True, False) if ascend else (False,)):
        for r in ((channels - keep) / channels, (channels - keep + 0.5) / channels):
            r32 = float(np.float32(r))
            if 0.0 <= r32 < 1.0 and _n_keep(channels, ChannelPruneConfig(ratio=r32, ascend_optimized=candidate_ascend)) == keep:
                return r32, candidate_ascend
    raise AssertionError(f"no prune_ratio keeps {keep} of {channels} channels")  # unreachable: keep >= 1


def search_channel_pruning(model: nn.Module, config: ChannelSearchConfig, example_inputs: Any, *,
                           data: Iterable[Any], loss_fn: Callable[..., torch.Tensor],
                           skip: Iterable[str] = ()) -> ChannelSearchPlan:
    """How many (and which) channels every dependency group keeps so that the pruned model has at most
    ``config.flops_target`` of the MACs, losing the least first-order Taylor importance per MAC saved.

    Args:
        model: the trained float model (not changed).
        config: budget and bounds (:class:`ChannelSearchConfig`).
        example_inputs: inputs for the graph and the MAC counts.
        data, loss_fn: ``(inputs, target)`` batches and ``loss_fn(output, target)`` for the Taylor
            importance (``config.num_batches`` batches).
        skip: producer layer names (globs) whose groups stay whole.

    Returns a :class:`ChannelSearchPlan`: ``plan.apply(model, x)`` masks the chosen channels,
    ``plan.write_cfg(path)`` writes a retrain ``.cfg`` for ``create_prune_retrain_model``.
    """
    records, info = search_space(model, config, example_inputs, skip=skip)
    taylor_sensitivity(model, records, data, loss_fn, config.num_batches)
    keep = greedy_search(records, info, config)
    return ChannelSearchPlan.from_keep(model, example_inputs, config, records, info, keep)

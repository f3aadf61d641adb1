"""Channel dependency groups: which output channels must be pruned together, and who reads them.

Removing output channel ``c`` of a convolution also removes input channel ``c`` of every layer that reads
it, the matching BatchNorm and depthwise-conv channels, and, across a residual addition, channel ``c`` of
every other branch added to it; across a concatenation the channel shifts by the widths before it; after
``flatten`` it is ``H*W`` input features of the next Linear. :func:`channel_groups` follows every channel
through the fx graph of the model (shapes from one forward) and returns the groups:

* ``producers``: the layers whose output channels the group prunes (all with the same channel classes);
* ``consumers``: the layers reading them, with which of their input channels belong to the group;
* ``followers``: per-channel layers in between (BatchNorm, depthwise convolution) that shrink with them;
* ``chain``: the causal chain, the ops that coupled the producers (``add in layer1.0``, ``cat in ...``);
* ``blocked``: why the group cannot be pruned (the channels reach the model output, a model input, or an
  op that mixes channels in a way we do not follow: a reshape, a transpose, attention, a grouped conv).

Channels are tracked one by one (a union-find over channel ids), so permutations through concatenations
and partial couplings are exact. Only models that torch.fx can trace are analysed.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.fx as fx
import torch.nn as nn
from torch.fx.passes.shape_prop import ShapeProp

from ..nn import CompressedLayer
from .capture import CaptureError, capture, normalize_inputs

__all__ = ["ChannelGroup", "GroupAnalysis", "channel_groups"]

_WEIGHTED = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d, nn.Linear)
_BN = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
_PASS_MODULES = (nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.PReLU, nn.ELU, nn.GELU, nn.SiLU, nn.Hardswish, nn.Hardsigmoid,
                 nn.Sigmoid, nn.Tanh, nn.Hardtanh, nn.Mish, nn.Identity, nn.Dropout, nn.Dropout1d, nn.Dropout2d,
                 nn.Dropout3d, nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d,
                 nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d, nn.AdaptiveMaxPool1d,
                 nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d, nn.Upsample, nn.UpsamplingNearest2d, nn.ZeroPad2d,
                 nn.ConstantPad2d)
_PASS_FUNCS = {"relu", "relu_", "relu6", "leaky_relu", "gelu", "silu", "hardswish", "hardsigmoid", "sigmoid", "tanh",
               "hardtanh", "hardtanh_", "mish", "elu", "dropout", "contiguous", "clone", "detach", "max_pool1d",
               "max_pool2d", "max_pool3d", "avg_pool1d", "avg_pool2d", "avg_pool3d", "adaptive_avg_pool1d",
               "adaptive_avg_pool2d", "adaptive_avg_pool3d", "adaptive_max_pool1d", "adaptive_max_pool2d",
               "interpolate", "pad", "clamp", "clamp_", "abs", "neg", "exp", "float", "to", "type_as", "sqrt", "pow",
               "stochastic_depth"}  # torchvision.ops: scales whole samples (identity in eval)
_BINARY = {"add", "iadd", "add_", "sub", "isub", "sub_", "mul", "imul", "mul_", "truediv", "div", "div_", "maximum",
           "minimum"}
_REDUCE = {"mean", "sum", "amax", "amin"}
_FLATTEN = {"flatten", "view", "reshape"}


@dataclass
class ChannelGroup:
    """Output channels of ``producers`` that are pruned together (see the module docstring).

    ``producer_channels[p]`` / ``follower_channels[f]`` / ``consumer_channels[c]`` map each of the layer's
    channels (output channels; for consumers, input channels or input features) to the group's channel
    class (``0..channels-1``) or ``-1`` for channels outside the group.
    """

    index: int
    channels: int
    producers: list[str] = field(default_factory=list)
    consumers: list[str] = field(default_factory=list)
    followers: list[str] = field(default_factory=list)
    chain: list[str] = field(default_factory=list)
    blocked: str | None = None
    producer_channels: dict[str, np.ndarray] = field(default_factory=dict)
    consumer_channels: dict[str, np.ndarray] = field(default_factory=dict)
    follower_channels: dict[str, np.ndarray] = field(default_factory=dict)

    @property
    def prunable(self) -> bool:
        return self.blocked is None

    def describe(self) -> str:
        """The causal chain in one paragraph."""
        head = f"group {self.index}: {self.channels} channels of {', '.join(self.producers)}"
        parts = [head]
        if self.chain:
            parts.append("coupled by " + "; ".join(self.chain))
        if self.followers:
            parts.append("pruned with " + ", ".join(self.followers))
        if self.consumers:
            parts.append("read by " + ", ".join(self.consumers))
        parts.append("prunable" if self.prunable else f"NOT prunable: {self.blocked}")
        return " -- ".join(parts)


@dataclass
class GroupAnalysis:
    groups: list[ChannelGroup]
    notes: list[str] = field(default_factory=list)

    def prunable(self) -> list[ChannelGroup]:
        return [g for g in self.groups if g.prunable]

    def group_of(self, producer: str) -> ChannelGroup | None:
        return next((g for g in self.groups if producer in g.producers), None)

    def __str__(self) -> str:
        return "\n".join([g.describe() for g in self.groups] + [f"note: {n}" for n in self.notes])


class _UnionFind:
    def __init__(self) -> None:
        self.parent: list[int] = []
        self.blocked: dict[int, str] = {}

    def new(self, n: int, blocked: str | None = None) -> np.ndarray:
        start = len(self.parent)
        self.parent.extend(range(start, start + n))
        ids = np.arange(start, start + n)
        if blocked:
            for i in ids:
                self.blocked.setdefault(int(i), blocked)
        return ids

    def find(self, i: int) -> int:
        root = i
        while self.parent[root] != root:
            root = self.parent[root]
        while self.parent[i] != root:
            self.parent[i], i = root, self.parent[i]
        return root

    def union(self, a: int, b: int) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            self.parent[rb] = ra
            if rb in self.blocked and ra not in self.blocked:
                self.blocked[ra] = self.blocked[rb]

    def block(self, ids: np.ndarray, why: str) -> None:
        for i in ids:
            self.blocked.setdefault(self.find(int(i)), why)


@dataclass
class _T:
    """Channel ids of one tensor along its channel axis."""

    ids: np.ndarray
    axis: int  # 1 (N, C, ...) or -1 (..., F)


def _name(target: Any) -> str:
    return target if isinstance(target, str) else getattr(target, "__name__", str(target))


def _inner(m: nn.Module) -> nn.Module:
    return m.module if isinstance(m, CompressedLayer) else m


def channel_groups(model: nn.Module, example_inputs: Any) -> GroupAnalysis:
    """The channel dependency groups of ``model`` (wrapped or plain); needs an fx-traceable model."""
    probe = copy.deepcopy(model).eval()  # shapes come from one forward: no BN statistics or calibrators touched
    try:
        graph = capture(probe, example_inputs, methods=("fx",))
    except CaptureError as err:
        raise CaptureError(f"channel dependency groups need a model torch.fx can trace: {err}") from err
    gm = graph.graph_module
    args, kwargs = normalize_inputs(example_inputs)
    with torch.no_grad():
        ShapeProp(gm).propagate(*args, *kwargs.values())
    return _analyse(probe, gm)


def _shape(n: Any) -> tuple[int, ...] | None:
    tm = n.meta.get("tensor_meta") if isinstance(n, fx.Node) else None
    return tuple(tm.shape) if tm is not None and hasattr(tm, "shape") else None


def _analyse(model: nn.Module, gm: fx.GraphModule) -> GroupAnalysis:
    uf = _UnionFind()
    tensors: dict[fx.Node, _T] = {}
    producers: dict[str, np.ndarray] = {}          # layer -> ids of its output channels
    consumers: dict[str, np.ndarray] = {}          # layer -> ids of its input channels / features
    followers: dict[str, np.ndarray] = {}          # BN / depthwise -> ids of its channels
    joins: list[tuple[int, str]] = []              # (an id, "add in layer1.0")
    notes: list[str] = []

    def block_inputs(node: fx.Node, why: str) -> None:
        for i in node.all_input_nodes:
            if i in tensors:
                uf.block(tensors[i].ids, why)

    def fresh_out(node: fx.Node, blocked: str | None) -> None:
        shape = _shape(node)
        if shape is None or len(shape) < 2:
            return
        tensors[node] = _T(uf.new(shape[1], blocked), 1)

    def scope(node: fx.Node) -> str:
        stack = node.meta.get("nn_module_stack") or {}
        paths = [p for p, _ in stack.values()]
        return paths[-1] if paths else "the model"

    for node in gm.graph.nodes:
        shape = _shape(node)
        if node.op == "placeholder":
            if shape is not None and len(shape) >= 2:
                tensors[node] = _T(uf.new(shape[1], "the channels come from a model input"), 1)
            continue
        if node.op == "get_attr":
            continue
        if node.op == "output":
            for i in node.all_input_nodes:
                if i in tensors:
                    uf.block(tensors[i].ids, "the channels reach the model output")
            continue
        ins = [i for i in node.all_input_nodes if i in tensors]
        if node.op == "call_module":
            path = str(node.target)
            m = gm.get_submodule(path)
            inner = _inner(m)
            x = tensors.get(node.args[0]) if node.args and isinstance(node.args[0], fx.Node) else None
            if isinstance(inner, _WEIGHTED):
                groups = getattr(inner, "groups", 1)
                cin = inner.in_features if isinstance(inner, nn.Linear) else inner.in_channels
                cout = inner.out_features if isinstance(inner, nn.Linear) else inner.out_channels
                if path in producers or path in consumers or path in followers:
                    block_inputs(node, f"{path} is called more than once")
                    fresh_out(node, f"{path} is called more than once")
                    uf.block(producers.get(path, followers.get(path, np.array([], int))), f"{path} is called more than once")
                    continue
                if groups > 1 and groups == cin and cout == cin and x is not None and x.axis == 1:
                    followers[path] = x.ids  # depthwise: channel c in -> channel c out
                    tensors[node] = _T(x.ids, 1)
                    continue
                if groups > 1:
                    block_inputs(node, f"{path} is a grouped convolution (groups={groups})")
                    fresh_out(node, f"{path} is a grouped convolution (groups={groups})")
                    continue
                if x is not None:
                    in_axis_ok = (x.axis == 1) if not isinstance(inner, nn.Linear) else (
                        x.axis == -1 or (shape is not None and len(shape) == 2))
                    if in_axis_ok and len(x.ids) == cin:
                        consumers[path] = x.ids
                    else:
                        block_inputs(node, f"{path} reads its input along another axis than the tracked channels")
                if shape is not None:
                    axis = -1 if isinstance(inner, nn.Linear) else 1
                    tensors[node] = _T(uf.new(cout), axis)
                    producers[path] = tensors[node].ids
                continue
            if isinstance(inner, _BN):
                if x is not None and x.axis == 1:
                    followers[path] = x.ids
                    tensors[node] = x
                continue
            if isinstance(inner, _PASS_MODULES) or getattr(inner, "_amct_leaf", False):  # our quantizers: elementwise
                if x is not None:
                    tensors[node] = x
                continue
            if isinstance(inner, nn.Flatten) and x is not None:
                _flatten(node, x, tensors, uf, f"{path} (Flatten)")
                continue
            why = f"{path} ({type(inner).__name__}) mixes or reshapes channels"
            block_inputs(node, why)
            fresh_out(node, why)
            continue
        # call_function / call_method
        fname = _name(node.target)
        if fname in ("getattr", "getitem", "size", "dim") and node.op != "call_module":
            if fname == "getitem" and ins:
                block_inputs(node, f"indexing a tensor ({fname} in {scope(node)})")
                fresh_out(node, f"indexing in {scope(node)}")
            continue
        if not ins:
            continue
        if fname in _PASS_FUNCS:
            tensors[node] = tensors[ins[0]]
            continue
        if fname in _BINARY:
            full = [tensors[i] for i in ins]
            out_shape = shape
            carriers = [t for t, i in zip(full, ins) if _shape(i) is not None and out_shape is not None
                        and len(_shape(i)) == len(out_shape) and _shape(i)[t.axis] == out_shape[t.axis]]
            if not carriers:
                block_inputs(node, f"{fname} in {scope(node)} broadcasts channels")
                fresh_out(node, f"{fname} in {scope(node)}")
                continue
            first = carriers[0]
            for other in carriers[1:]:
                if other.axis != first.axis or len(other.ids) != len(first.ids):
                    block_inputs(node, f"{fname} in {scope(node)} combines differently laid out tensors")
                    break
                for a, b in zip(first.ids, other.ids):
                    uf.union(int(a), int(b))
                joins.append((int(first.ids[0]), f"{fname} in {scope(node)}"))
            tensors[node] = first
            continue
        if fname in ("cat", "concat", "concatenate"):
            seq = node.args[0] if node.args else node.kwargs.get("tensors")
            dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)
            parts = [tensors.get(t) for t in seq] if isinstance(seq, (list, tuple)) else []
            if not parts or any(p is None for p in parts) or shape is None:
                block_inputs(node, f"cat in {scope(node)} of untracked tensors")
                fresh_out(node, f"cat in {scope(node)}")
                continue
            d = dim % len(shape)
            if d == 1 and all(p.axis == 1 for p in parts):
                tensors[node] = _T(np.concatenate([p.ids for p in parts]), 1)
                joins.append((int(parts[0].ids[0]), f"cat in {scope(node)}"))
            else:
                first = parts[0]
                for p in parts[1:]:
                    for a, b in zip(first.ids, p.ids):
                        uf.union(int(a), int(b))
                tensors[node] = first
            continue
        if fname in _REDUCE:
            x = tensors[ins[0]]
            dims = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
            in_shape = _shape(ins[0])
            if dims is not None and in_shape is not None and x.axis == 1:
                dims = [dims] if isinstance(dims, int) else list(dims)
                if all(d % len(in_shape) >= 2 for d in dims):
                    tensors[node] = x
                    continue
            block_inputs(node, f"{fname} over the channel axis in {scope(node)}")
            fresh_out(node, f"{fname} in {scope(node)}")
            continue
        if fname in _FLATTEN:
            _flatten(node, tensors[ins[0]], tensors, uf, f"{fname} in {scope(node)}")
            continue
        why = f"{fname} in {scope(node)} is not followed channel by channel"
        block_inputs(node, why)
        fresh_out(node, why)

    return _collect(uf, producers, consumers, followers, joins, notes)


def _flatten(node: fx.Node, x: _T, tensors: dict, uf: _UnionFind, what: str) -> None:
    """(N, C, *S) -> (N, C*prod(S)): feature f belongs to channel f // prod(S)."""
    in_shape = _shape(node.args[0]) if node.args else None
    out = _shape(node)
    if in_shape is not None and out is not None and x.axis == 1 and len(out) == 2 and out[0] == in_shape[0] \
            and out[1] == int(np.prod(in_shape[1:])):
        spatial = int(np.prod(in_shape[2:])) if len(in_shape) > 2 else 1
        tensors[node] = _T(np.repeat(x.ids, spatial), -1)
        return
    if in_shape is not None and out is not None and tuple(in_shape) == tuple(out):
        tensors[node] = x
        return
    uf.block(x.ids, f"{what} reshapes channels")
    if out is not None and len(out) >= 2:
        tensors[node] = _T(uf.new(out[1], f"{what} reshapes channels"), 1)


def _collect(uf: _UnionFind, producers: dict, consumers: dict, followers: dict, joins: list,
             notes: list) -> GroupAnalysis:
    # classes of each producer; producers sharing a class are one group
    root_of = np.array([uf.find(i) for i in range(len(uf.parent))], dtype=np.int64)
    parent = {p: p for p in producers}

    def find(p: str) -> str:
        while parent[p] != p:
            parent[p] = parent[parent[p]]
            p = parent[p]
        return p

    owner: dict[int, str] = {}
    for p, ids in producers.items():
        for root in root_of[ids].tolist():
            if root in owner:
                a, b = find(owner[root]), find(p)
                if a != b:
                    parent[b] = a
            else:
                owner[root] = p
    members: dict[str, list[str]] = {}
    for p in producers:
        members.setdefault(find(p), []).append(p)
    groups = []
    for k, (root, prods) in enumerate(members.items()):
        classes: dict[int, int] = {}
        for p in prods:
            for root in root_of[producers[p]].tolist():
                classes.setdefault(root, len(classes))
        g = ChannelGroup(index=k, channels=len(classes), producers=prods)
        lookup = np.full(len(root_of), -1, dtype=np.int64)
        for root, c in classes.items():
            lookup[root] = c

        def to_class(ids: np.ndarray, lookup: np.ndarray = lookup) -> np.ndarray:
            return lookup[root_of[np.asarray(ids, dtype=np.int64)]]
        for p in prods:
            g.producer_channels[p] = to_class(producers[p])
        for c, ids in consumers.items():
            cls = to_class(ids) if len(ids) else np.array([], np.int64)
            if (cls >= 0).any():
                g.consumers.append(c)
                g.consumer_channels[c] = cls
        for f, ids in followers.items():
            cls = to_class(ids)
            if (cls >= 0).any():
                g.followers.append(f)
                g.follower_channels[f] = cls
        roots = set(classes)
        g.chain = sorted({what for i, what in joins if int(root_of[i]) in roots})
        reasons = set()
        for root_id in roots:
            why = uf.blocked.get(root_id)
            if why:
                reasons.add(why)
        reasons.discard(None)
        if reasons:
            g.blocked = "; ".join(sorted(reasons))
        groups.append(g)
    return GroupAnalysis(groups, notes)

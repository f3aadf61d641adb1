"""Blocks: the units that block-wise distillation trains one after another.

A :class:`Block` is named by module paths: ``modules`` (whose parameters train with the block), the
quantized ``layers`` inside it, and its boundary: ``start`` (the module whose input is the block input)
and ``end`` (the module whose output is the block output). Student and teacher share module paths
(``prepare_qat`` and ``quantize`` wrap layers at the same path; a folded BatchNorm stays at its path), so
one block list serves both.

:func:`find_blocks` finds them automatically, in execution order:

1. **transformer** blocks: the repeated layers of a ``ModuleList``/``Sequential`` (at least two of one
   class) that contain attention (GPT-2's ``transformer.h.0``, BERT's ``encoder.layer.0``);
2. **residual** blocks: modules whose forward adds a computed path to another path from the same input
   (ResNet's ``BasicBlock``, MobileNetV2's ``InvertedResidual`` with its skip), found by tracing the module
   alone with torch.fx; the outermost such module is the block;
3. **sequential** blocks: other instances of a class found residual elsewhere in the model (an
   ``InvertedResidual`` whose shape change leaves it without a skip), so a repeated stage is cut the same
   way everywhere;
4. **layer groups** for quantized layers outside all of the above: the layer followed by its BatchNorm
   and its activation where the captured graph shows them feeding each other (ResNet's stem
   ``conv1, bn1, relu``; a classifier ``fc`` alone). Without data flow (a model only the module walk
   captures) the modules called right after the layer are used.

Only modules containing a quantized layer (a wrapper of a prepared student, or a layer a wrapper exists
for in a float model) become blocks. :func:`blocks_from_groups` builds blocks from explicit lists of
module paths (AMCT's ``distill_group``: start = first, end = last) with validation, and
:func:`merge_blocks` merges ``group_size`` consecutive blocks into one unit.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import operator
import warnings
from collections import Counter
from dataclasses import dataclass
from typing import Any, Sequence

import torch
import torch.fx as fx
import torch.nn as nn

from ..config.base import ConfigError
from ..graph.capture import _Tracer, capture, is_leaf, normalize_inputs
from ..graph.plan import render_table
from ..nn import CompressedLayer, FoldedBatchNorm, wrapper_for
from ..quant.quantizers import ActivationQuantizer

__all__ = ["Block", "find_blocks", "blocks_from_groups", "merge_blocks", "blocks_table", "call_order", "CallTrace",
           "leaf_modules", "quantized_layers"]

#: Block kinds: found automatically (the first four), given explicitly (``group``), or merged by ``group_size``
KINDS = ("transformer", "residual", "sequential", "layer_group", "group", "merged")

_NORMS = (nn.modules.batchnorm._BatchNorm, FoldedBatchNorm, nn.Identity)
_ACTIVATIONS = (nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.PReLU, nn.Sigmoid, nn.Tanh, nn.Softmax, nn.GELU, nn.SiLU,
                nn.Hardswish, nn.Hardsigmoid, nn.ELU, nn.Mish)
_ADDS = {operator.add, operator.iadd, torch.add}


@dataclass(frozen=True)
class Block:
    """One distillation unit.

    Attributes:
        name: a module path (a module block, or the module a layer group spans) or ``start..end``.
        kind: one of ``transformer``, ``residual``, ``sequential``, ``layer_group``, ``group`` (given
            explicitly), ``merged`` (``group_size`` > 1 over blocks of different kinds).
        modules: module paths whose parameters train with the block (everything below them belongs to it).
        layers: the quantized layers inside, in execution order.
        start: the module whose (first tensor) input is the block input.
        end: the module whose output is the block output (its first call after ``start``).
        extra: modules outside the boundary whose parameters train with the block: activation quantizers a
            prepared student placed between blocks (``quantize_outputs="auto"``), which quantize this
            block's input; with ``block_input="student"`` the block's loss reaches them.
    """

    name: str
    kind: str
    modules: tuple[str, ...]
    layers: tuple[str, ...]
    start: str
    end: str
    extra: tuple[str, ...] = ()

    def contains(self, path: str) -> bool:
        """Whether the module at ``path`` belongs to the block (its modules, their children, ``extra``)."""
        return any(path == m or path.startswith(m + ".") for m in self.modules + self.extra)

    def group(self) -> list[str]:
        """The block as an AMCT ``distill_group`` entry (its module paths; start first, end last)."""
        return list(self.modules)

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "kind": self.kind, "modules": list(self.modules), "layers": list(self.layers),
                "start": self.start, "end": self.end, "extra": list(self.extra)}

    def __str__(self) -> str:
        return f"{self.name} ({self.kind}: {self.start} -> {self.end}, {len(self.layers)} quantized layers)"


def blocks_table(blocks: Sequence[Block]) -> str:
    """A printable table of blocks: name, kind, start, end and the quantized layers."""
    rows = [(b.name, b.kind, b.start, b.end, ", ".join(b.layers) if len(b.layers) <= 4
             else f"{', '.join(b.layers[:3])}, ... ({len(b.layers)})") for b in blocks]
    return render_table(["block", "kind", "start", "end", "quantized layers"], rows)


# -- execution order -----------------------------------------------------------------------------------
@dataclass
class CallTrace:
    """Which modules one forward calls: ``order`` (paths by first call, a parent before its children),
    ``counts`` (calls per path) and ``first``/``last`` (position of a path's first and last call among
    all calls)."""

    order: list[str]
    counts: Counter
    first: dict[str, int]
    last: dict[str, int]

    def index(self) -> dict[str, int]:
        """Path -> position of its first call (increasing along ``order``)."""
        return dict(self.first)


def _probe_copy(model: nn.Module) -> nn.Module:
    """The model itself, or a deep copy when a forward would change its state (quantizers still
    calibrating observe whatever passes; their initialisation belongs to real data)."""
    if any(isinstance(m, ActivationQuantizer) for m in model.modules()):
        return copy.deepcopy(model)
    return model


def call_order(model: nn.Module, example_inputs: Any, *, inplace: bool = False) -> CallTrace:
    """Run one forward (eval mode, no gradients) and record the order and count of module calls.

    The model's state is not changed: a model with activation quantizers runs as a deep copy (unless
    ``inplace``: the caller made the copy), the modes of every module are restored.
    """
    probe = model if inplace else _probe_copy(model)
    args, kwargs = normalize_inputs(example_inputs)
    order: list[str] = []
    counts: Counter = Counter()
    first: dict[str, int] = {}
    last: dict[str, int] = {}
    total = [0]

    def hook(name: str):
        def pre(module: nn.Module, inputs: Any) -> None:
            position = total[0]
            total[0] += 1
            if counts[name] == 0:
                order.append(name)
                first[name] = position
            last[name] = position
            counts[name] += 1
        return pre

    modes = {m: m.training for m in probe.modules()}
    handles = [m.register_forward_pre_hook(hook(n)) for n, m in probe.named_modules() if n]
    try:
        probe.eval()
        with torch.no_grad():
            probe(*args, **kwargs)
    finally:
        for h in handles:
            h.remove()
        for m, mode in modes.items():
            m.training = mode
    return CallTrace(order, counts, first, last)


# -- what counts as a quantized layer ------------------------------------------------------------------
def leaf_modules(model: nn.Module, *, quantizers: bool = True) -> list[str]:
    """Paths of the leaf modules (wrappers count as one) that are not inside another leaf (without the
    activation quantizers a placement pass inserted, unless ``quantizers``)."""
    return [name for name, m in model.named_modules() if name and is_leaf(m) and not _inside_leaf(model, name)
            and (quantizers or not isinstance(m, ActivationQuantizer))]


def _inside_leaf(model: nn.Module, name: str) -> bool:
    parts = name.split(".")
    return any(is_leaf(model.get_submodule(".".join(parts[:i]))) for i in range(1, len(parts)))


def quantized_layers(model: nn.Module, counts: Counter | None = None) -> list[str]:
    """The layers blocks are built around, by module path.

    A prepared student: its wrappers that have a weight. A float model: the layers with a weight that
    a wrapper exists for (Conv, ConvTranspose, Linear, transformers' Conv1D). With ``counts``, only
    layers the forward calls.
    """
    wrapped = [n for n, m in model.named_modules() if isinstance(m, CompressedLayer)]
    if wrapped:
        names = [n for n in wrapped if model.get_submodule(n).has_weight]
    else:
        names = [n for n, m in model.named_modules() if n and getattr(m, "weight", None) is not None
                 and wrapper_for(m) is not None]
    if counts is not None:
        names = [n for n in names if counts.get(n, 0) > 0]
    return names


# -- detection rules -----------------------------------------------------------------------------------
def _has_attention(module: nn.Module) -> bool:
    return any(isinstance(m, nn.MultiheadAttention) or "attention" in type(m).__name__.lower()
               for m in module.modules())


def _is_transformer_layer(child: nn.Module, parent: nn.Module) -> bool:
    if not isinstance(parent, (nn.ModuleList, nn.Sequential)):
        return False
    same = sum(1 for m in parent.children() if type(m) is type(child))
    return same >= 2 and _has_attention(child)


def _is_add(n: fx.Node) -> bool:
    return (n.op == "call_function" and n.target in _ADDS) or (n.op == "call_method" and n.target in ("add", "add_"))


def _residual(module: nn.Module) -> bool:
    """Whether ``module``'s forward (traced alone by torch.fx) adds two different paths that both come
    from its first input, on the way to its output."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            graph = _Tracer().trace(module)
    except Exception:  # noqa: BLE001 - untraceable modules are simply not residual blocks
        return False
    nodes = list(graph.nodes)
    inputs = [n for n in nodes if n.op == "placeholder"]
    outputs = [n for n in nodes if n.op == "output"]
    if not inputs or not outputs:
        return False
    dependent = {inputs[0]}
    for n in nodes:
        if any(i in dependent for i in n.all_input_nodes):
            dependent.add(n)
    feeding: set[fx.Node] = set()
    stack = [outputs[0]]
    while stack:
        for i in stack.pop().all_input_nodes:
            if i not in feeding:
                feeding.add(i)
                stack.append(i)
    for n in nodes:
        if _is_add(n) and n in feeding:
            operands = [a for a in list(n.args)[:2] if isinstance(a, fx.Node)]
            if len(operands) == 2 and operands[0] is not operands[1] and all(o in dependent for o in operands):
                return True
    return False


def _contains_layer(path: str, layers: Sequence[str]) -> bool:
    return any(q == path or q.startswith(path + ".") for q in layers)


def _base_class(module: nn.Module) -> type:
    """The user's class of a module (a placement pass may have given it a generated subclass)."""
    return getattr(type(module), "_amct_base", type(module))


def _module_blocks(model: nn.Module, layers: Sequence[str]) -> list[tuple[str, str]]:
    """``(path, kind)`` of the transformer, residual and sequential blocks, outermost first."""
    found: list[tuple[str, str]] = []
    candidates: list[str] = []

    def visit(path: str, module: nn.Module) -> None:
        for name, child in module.named_children():
            cpath = f"{path}.{name}" if path else name
            if not _contains_layer(cpath, layers) or is_leaf(child):
                continue
            if _is_transformer_layer(child, module):
                found.append((cpath, "transformer"))
                continue
            container = type(child) in (nn.ModuleList, nn.ModuleDict, nn.Sequential)
            if not container and _residual(child):
                found.append((cpath, "residual"))
                continue
            if not container and not isinstance(child, (nn.ModuleList, nn.ModuleDict)):
                candidates.append(cpath)
            visit(cpath, child)

    visit("", model)
    residual_types = {_base_class(model.get_submodule(p)) for p, kind in found if kind == "residual"}
    chosen: list[str] = []
    for path in candidates:  # pre-order: outer modules first
        if _base_class(model.get_submodule(path)) not in residual_types:
            continue
        if any(path.startswith(c + ".") for c in chosen):
            continue
        if any(p.startswith(path + ".") for p, _ in found):
            continue
        chosen.append(path)
    return found + [(p, "sequential") for p in chosen]


def _group_name(model: nn.Module, members: list[str], leaves: list[str]) -> str:
    """The module the members make up entirely (``features.0`` for its conv, bn, relu), else ``first..last``."""
    if len(members) > 1:
        parts = [m.split(".") for m in members]
        common: list[str] = []
        for column in zip(*parts):
            if len(set(column)) != 1:
                break
            common.append(column[0])
        parent = ".".join(common)
        if parent and parent not in members:
            below = {leaf for leaf in leaves if leaf.startswith(parent + ".")}
            if below == set(members):
                return parent
        return f"{members[0]}..{members[-1]}"
    return members[0]


def _layer_groups(model: nn.Module, probe: nn.Module, example_inputs: Any, remaining: list[str], taken: set[str],
                  layer_set: set[str], trace: CallTrace) -> list[list[str]]:
    """For each remaining layer: the layer, then a BatchNorm-like and/or an activation module it feeds."""
    graph = capture(probe, example_inputs)
    top = set(leaf_modules(model))
    leaves = [p for p in trace.order if p in top]
    # a QAT student's BatchNorm trains folded into its conv: identity in the forward, absent from the graph
    folded = {m.conv_path: p for p, m in model.named_modules() if isinstance(m, FoldedBatchNorm) and m.conv_path}
    out: list[list[str]] = []
    for layer in remaining:
        members = [layer]
        stage = 0  # 0: a norm or an activation may follow; 1: only an activation; 2: done
        if layer in folded and folded[layer] not in taken:
            members.append(folded[layer])
            stage = 1

        def accept(path: str) -> bool:
            nonlocal stage
            if path in taken or path in layer_set or path in members:
                return False
            m = model.get_submodule(path)
            if stage == 0 and isinstance(m, _NORMS):
                stage = 1
                return True
            if stage < 2 and isinstance(m, _ACTIVATIONS):
                stage = 2
                return True
            return False

        if graph.has_dataflow:
            calls = graph.calls_of(layer)
            node = calls[0] if calls else None
            while node is not None and stage < 2:
                users = node.users
                if len(users) != 1 or users[0].kind != "module" or not accept(users[0].target):
                    break
                members.append(users[0].target)
                node = users[0]
        elif layer in leaves:
            for path in leaves[leaves.index(layer) + 1:]:
                if path in members:  # the folded BatchNorm, already a member
                    continue
                if stage >= 2 or not accept(path):
                    break
                members.append(path)
        taken.update(members)
        out.append(members)
    return out


def find_blocks(model: nn.Module, example_inputs: Any, *, group_size: int = 1) -> list[Block]:
    """The blocks of ``model`` in execution order (see the module docs for the rules).

    Args:
        model: a prepared student (its wrappers are the quantized layers) or a float model (the layers a
            wrapper exists for). It is not changed: a model whose quantizers still calibrate is probed
            as a copy.
        example_inputs: inputs for one forward (a tensor, a tuple of positional inputs, a dict of
            keyword inputs).
        group_size: merge that many consecutive blocks into one unit (:func:`merge_blocks`).

    Example::

        blocks = find_blocks(student, x)
        print(blocks_table(blocks))   # conv1..relu layer_group, layer1.0 residual, ..., fc layer_group
    """
    if example_inputs is None:
        raise ValueError("find_blocks(model, example_inputs): example_inputs is required (one forward finds the "
                         "execution order); pass a batch of model inputs")
    if not isinstance(group_size, int) or isinstance(group_size, bool) or group_size < 1:
        raise ConfigError("find_blocks.group_size", group_size, "an integer >= 1")
    probe = _probe_copy(model)
    trace = call_order(probe, example_inputs, inplace=True)
    layers = quantized_layers(model, trace.counts)
    if not layers:
        raise ValueError(f"find_blocks: {type(model).__name__} has no quantized (or quantizable) layer that its "
                         "forward calls: nothing to distill")
    index = trace.index()
    blocks: list[Block] = []
    for path, kind in _module_blocks(model, layers):
        inside = tuple(q for q in layers if q.startswith(path + "."))
        blocks.append(Block(path, kind, (path,), tuple(sorted(inside, key=index.get)), path, path))
    remaining = sorted((q for q in layers if not any(b.contains(q) for b in blocks)), key=index.get)
    if remaining:
        taken = {p for p in index if any(b.contains(p) for b in blocks)}
        leaves = leaf_modules(model, quantizers=False)
        for members in _layer_groups(model, probe, example_inputs, remaining, taken, set(layers), trace):
            blocks.append(Block(_group_name(model, members, leaves), "layer_group", tuple(members),
                                tuple(m for m in members if m in set(layers)), members[0], members[-1]))
    blocks.sort(key=lambda b: index.get(b.start, len(index)))
    blocks = _attach_placed_quantizers(model, blocks, index)
    return merge_blocks(blocks, group_size)


def _attach_placed_quantizers(model: nn.Module, blocks: list[Block], index: dict[str, int]) -> list[Block]:
    """Give each activation quantizer outside every block to the first block called after it (the block
    whose input it quantizes) as ``extra``; one after the last block stays outside."""
    extra: dict[int, list[str]] = {}
    for path in leaf_modules(model):
        if not isinstance(model.get_submodule(path), ActivationQuantizer) or path not in index:
            continue
        if any(b.contains(path) for b in blocks):
            continue
        for i, b in enumerate(blocks):
            if index.get(b.start, -1) > index[path]:
                extra.setdefault(i, []).append(path)
                break
    return [dataclasses.replace(b, extra=b.extra + tuple(extra[i])) if i in extra else b for i, b in enumerate(blocks)]


def merge_blocks(blocks: Sequence[Block], group_size: int) -> list[Block]:
    """Merge every ``group_size`` consecutive blocks into one unit (AMCT's ``group_size``): start of the
    first, end of the last, all modules and layers; the kind stays when all agree (else ``merged``)."""
    if not isinstance(group_size, int) or isinstance(group_size, bool) or group_size < 1:
        raise ConfigError("group_size", group_size, "an integer >= 1")
    blocks = list(blocks)
    if group_size == 1:
        return blocks
    out: list[Block] = []
    for i in range(0, len(blocks), group_size):
        chunk = blocks[i:i + group_size]
        if len(chunk) == 1:
            out.append(chunk[0])
            continue
        out.append(merged(chunk))
    return out


def merged(chunk: Sequence[Block]) -> Block:
    """Consecutive blocks as one: start of the first, end of the last, all modules and layers; the kind
    stays when all agree (else ``merged``)."""
    if len(chunk) == 1:
        return chunk[0]
    kinds = {b.kind for b in chunk}
    return Block(f"{chunk[0].start}..{chunk[-1].end}", kinds.pop() if len(kinds) == 1 else "merged",
                 tuple(m for b in chunk for m in b.modules), tuple(q for b in chunk for q in b.layers),
                 chunk[0].start, chunk[-1].end, tuple(e for b in chunk for e in b.extra))


# -- explicit groups -----------------------------------------------------------------------------------
def _unknown(where: str, path: Any, names: Sequence[str]) -> ConfigError:
    close = difflib.get_close_matches(str(path), names, n=3)
    hint = f" (did you mean {', '.join(repr(c) for c in close)}?)" if close else ""
    return ConfigError(where, path, f"a module path of the model{hint}")


def blocks_from_groups(model: nn.Module, groups: Sequence[Sequence[str]], example_inputs: Any = None) -> list[Block]:
    """Blocks from explicit groups of module paths (AMCT's ``distill_group``), validated.

    Each group is a non-empty list of module paths: its parameters train together, its input is the
    input of the first path, its output the output of the last (``[["conv1", "bn1", "relu"],
    ["layer1.0"]]``). Refused with a :class:`ConfigError` naming the group: an empty list, an unknown
    path (with close matches), a path given twice or inside another group's module (overlap), and groups
    or members out of execution order. The order is checked from one forward of ``example_inputs``
    (a module never called is an error too); without them, from the order the modules are registered in.
    """
    if isinstance(groups, (str, bytes)) or not isinstance(groups, Sequence) or len(groups) == 0:
        raise ConfigError("distill_group", groups, "a non-empty list of groups, each a non-empty list of module paths")
    modules = dict(model.named_modules())
    names = [n for n in modules if n]
    owner: dict[str, int] = {}
    for i, group in enumerate(groups):
        where = f"distill_group[{i}]"
        if isinstance(group, (str, bytes)) or not isinstance(group, Sequence):
            raise ConfigError(where, group, "a list of module paths, e.g. ['conv1', 'bn1', 'relu']")
        if len(group) == 0:
            raise ConfigError(where, [], "a non-empty list of module paths")
        for j, path in enumerate(group):
            if not isinstance(path, str) or not path or path not in modules:
                raise _unknown(f"{where}[{j}]", path, names)
            if path in owner:
                other = owner[path]
                raise ConfigError(f"{where}[{j}]", path, "each module in one group once" if other == i else
                                  f"a module not already in distill_group[{other}] (groups may not overlap)")
            owner[path] = i
    for path, i in owner.items():
        parts = path.split(".")
        for k in range(1, len(parts)):
            ancestor = ".".join(parts[:k])
            if ancestor in owner:
                j = owner[ancestor]
                raise ConfigError(f"distill_group[{i}]", path,
                                  f"a module outside '{ancestor}', which distill_group[{j}] already holds "
                                  "(a group owns everything below its modules; groups may not overlap)")
    if example_inputs is not None:
        trace = call_order(model, example_inputs)
        index, last, how = trace.index(), trace.last, "runs"
        for i, group in enumerate(groups):
            for j, path in enumerate(group):
                if path not in index:
                    raise ConfigError(f"distill_group[{i}][{j}]", path,
                                      "a module the model's forward calls (this one is never called)")
        layers = quantized_layers(model, trace.counts)
    else:
        index, how = {n: k for k, n in enumerate(names)}, "is registered"
        last = index
        layers = quantized_layers(model)
    for i, group in enumerate(groups):
        if len(group) > 1 and last[group[-1]] < index[group[0]]:
            raise ConfigError(f"distill_group[{i}]", list(group),
                              f"start first, end last: '{group[-1]}' {how} before '{group[0]}'")
        if i and index[group[0]] < index[groups[i - 1][0]]:
            raise ConfigError(f"distill_group[{i}]", list(group),
                              f"groups in execution order: '{group[0]}' {how} before distill_group[{i - 1}] "
                              f"('{groups[i - 1][0]}')")
    blocks = []
    for group in groups:
        members = tuple(group)
        inside = [q for q in layers if any(q == m or q.startswith(m + ".") for m in members)]
        inside.sort(key=lambda q: index.get(q, len(index)))
        name = members[0] if len(members) == 1 else f"{members[0]}..{members[-1]}"
        blocks.append(Block(name, "group", members, tuple(inside), members[0], members[-1]))
    return blocks

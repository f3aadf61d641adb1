"""Graph capture: torch.fx, then torch.export, then a plain module walk.

Every pass that needs the model's structure (BN folding, shared-layer detection, channel dependency
groups) reads it from a :class:`CapturedGraph`, a small data-flow graph whose nodes are *leaf module
calls* (named by module path), functions between them, inputs and outputs. The three capture paths
produce the same node vocabulary:

* ``fx``: ``torch.fx`` symbolic tracing with our wrappable layers as leaves; needs no inputs, fails on
  data-dependent control flow and on most transformers models.
* ``export``: ``torch.export.export`` (non-strict) with the example inputs; ATen nodes are grouped back
  into leaf-module calls through their ``nn_module_stack``. Handles shape-dependent branches and
  transformers models.
* ``module_walk``: no data flow at all, only the leaf modules in registration order. Passes that need
  edges report that they could not run; module swapping still works.

The chosen path and the reason each earlier path failed (with the user's source line where the
traceback shows it) are kept in :attr:`CapturedGraph.attempts` and printed by ``report()``.
"""

from __future__ import annotations

import logging
import os
import traceback
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Iterable, Literal, Sequence

import torch
import torch.fx as fx
import torch.nn as nn

from .._quiet import quiet
from ..nn import CompressedLayer, wrapper_for

__all__ = ["capture", "CapturedGraph", "CaptureAttempt", "Node", "CaptureError", "normalize_inputs"]

log = logging.getLogger("amct_torch.capture")

Method = Literal["fx", "export", "module_walk"]
METHODS: tuple[Method, ...] = ("fx", "export", "module_walk")


class CaptureError(RuntimeError):
    """No capture path worked (only raised when ``module_walk`` was excluded)."""


@dataclass(eq=False)
class Node:
    """One node of the captured graph.

    ``kind`` is ``input``, ``module`` (a leaf-module call; ``target`` is its module path), ``function``
    (an op between modules; ``target`` is its name), ``attr`` (a tensor attribute read) or ``output``.
    """

    name: str
    kind: Literal["input", "module", "function", "attr", "output"]
    target: str
    module_type: type | None = None
    inputs: list["Node"] = field(default_factory=list)
    users: list["Node"] = field(default_factory=list)
    #: fx capture only: the module whose ``forward`` made this call (``""`` for the root) and the call's
    #: key in that forward, ``(op, target, n)``: the n-th call of ``target`` there (see ``graph.insert``)
    scope: str | None = None
    local: tuple | None = None

    def __repr__(self) -> str:
        if self.kind == "module":
            return f"{self.target} ({self.module_type.__name__ if self.module_type else '?'})"
        return f"{self.kind}:{self.target}"


@dataclass(frozen=True)
class CaptureAttempt:
    method: Method
    ok: bool
    reason: str = ""

    def __str__(self) -> str:
        return f"{self.method}: {'ok' if self.ok else 'failed: ' + self.reason}"


@dataclass
class CapturedGraph:
    """The model's structure as seen by one capture path."""

    method: Method
    nodes: list[Node]
    attempts: list[CaptureAttempt]
    graph_module: fx.GraphModule | None = None
    exported: Any = None

    @property
    def has_dataflow(self) -> bool:
        """False for the module walk: nodes but no edges."""
        return self.method != "module_walk"

    def module_nodes(self) -> list[Node]:
        return [n for n in self.nodes if n.kind == "module"]

    def calls_of(self, module_path: str) -> list[Node]:
        """Every call of the module at ``module_path`` (more than one: the module is reused)."""
        return [n for n in self.nodes if n.kind == "module" and n.target == module_path]

    def call_counts(self) -> Counter:
        """How often each leaf module is called in one forward (module walk: unknown, so empty)."""
        if not self.has_dataflow:
            return Counter()
        return Counter(n.target for n in self.nodes if n.kind == "module")

    def report(self) -> str:
        lines = [f"capture: {self.method} ({len(self.module_nodes())} module calls, {len(self.nodes)} nodes)"]
        lines += [f"  {a}" for a in self.attempts]
        if not self.has_dataflow:
            lines.append("  no data flow: passes that need the graph (BN folding, dependency groups) will skip")
        return "\n".join(lines)

    def __repr__(self) -> str:
        return f"CapturedGraph(method={self.method!r}, module_calls={len(self.module_nodes())}, nodes={len(self.nodes)})"


# -- inputs ------------------------------------------------------------------------------------
def normalize_inputs(example_inputs: Any) -> tuple[tuple, dict]:
    """``tensor`` | ``tuple`` | ``list`` | ``dict`` (keyword inputs) -> ``(args, kwargs)``."""
    if example_inputs is None:
        return (), {}
    if isinstance(example_inputs, dict):
        return (), dict(example_inputs)
    if isinstance(example_inputs, (tuple, list)):
        return tuple(example_inputs), {}
    return (example_inputs,), {}


# -- leaves ------------------------------------------------------------------------------------
def is_leaf(module: nn.Module) -> bool:
    """A module whose call is one node: wrappers, wrappable layers, our own quantizers (classes with
    ``_amct_leaf = True``: one call, elementwise on its input) and modules without children."""
    return isinstance(module, CompressedLayer) or getattr(module, "_amct_leaf", False) \
        or wrapper_for(module) is not None or not any(True for _ in module.children())


class _Tracer(fx.Tracer):
    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        if isinstance(m, CompressedLayer) or getattr(m, "_amct_leaf", False) or wrapper_for(m) is not None:
            return True
        return super().is_leaf_module(m, module_qualified_name)


# -- the three paths ---------------------------------------------------------------------------
def _from_fx(model: nn.Module) -> tuple[list[Node], fx.GraphModule]:
    graph = _Tracer().trace(model)
    gm = fx.GraphModule(model, graph)
    nodes: dict[fx.Node, Node] = {}
    seen: Counter = Counter()
    for n in graph.nodes:
        if n.op == "placeholder":
            node = Node(n.name, "input", str(n.target))
        elif n.op == "call_module":
            node = Node(n.name, "module", str(n.target), type(model.get_submodule(n.target)))
        elif n.op in ("call_function", "call_method"):
            node = Node(n.name, "function", n.target if isinstance(n.target, str) else getattr(n.target, "__name__", str(n.target)))
        elif n.op == "get_attr":
            node = Node(n.name, "attr", str(n.target))
        else:
            node = Node(n.name, "output", "output")
        node.inputs = [nodes[i] for i in n.all_input_nodes]
        if node.kind in ("module", "function"):
            node.scope, local_target = _scope_of(n)
            key = (n.op, local_target)
            seen[(node.scope, key)] += 1
            node.local = key + (seen[(node.scope, key)] - 1,)
        nodes[n] = node
    return _link(nodes.values()), gm


def _scope_of(n: fx.Node) -> tuple[str, Any]:
    """(path of the module whose forward made call ``n``, the call's target as that forward sees it)."""
    paths = [path for path, _type in (n.meta.get("nn_module_stack") or {}).values()]
    if n.op == "call_module":
        owner = paths[-2] if len(paths) >= 2 else ""
        return owner, str(n.target)[len(owner) + 1:] if owner else str(n.target)
    return (paths[-1] if paths else ""), n.target


_EXPORT_LOGGERS = ("torch.fx.experimental.symbolic_shapes", "torch._dynamo", "torch.export", "torch._export",
                   "torch._subclasses.fake_tensor")


def _from_export(model: nn.Module, args: tuple, kwargs: dict) -> tuple[list[Node], Any]:
    with quiet(_EXPORT_LOGGERS, stderr=True):  # a failed export prints its partial graph; we report it ourselves
        ep = torch.export.export(model, args, kwargs=kwargs, strict=False)
    user_inputs = set(ep.graph_signature.user_inputs)
    leaf_cache: dict[str, bool] = {}

    def leaf_path(meta_stack: dict) -> tuple[str, str] | None:
        for key, (path, _type) in (meta_stack or {}).items():
            if path == "":
                continue
            if path not in leaf_cache:
                try:
                    leaf_cache[path] = is_leaf(model.get_submodule(path))
                except AttributeError:
                    leaf_cache[path] = False
            if leaf_cache[path]:
                return key, path
        return None

    out: list[Node] = []
    mapping: dict[fx.Node, Node | None] = {}
    groups: dict[str, Node] = {}
    for n in ep.graph.nodes:
        if n.op == "placeholder":
            mapping[n] = Node(n.name, "input", n.name) if n.name in user_inputs else None
            if mapping[n] is not None:
                out.append(mapping[n])
            continue
        if n.op == "output":
            node = Node("output", "output", "output")
        else:
            hit = leaf_path(n.meta.get("nn_module_stack"))
            if hit is not None:
                key, path = hit
                node = groups.get(key)
                if node is None:
                    node = groups[key] = Node(key, "module", path, type(model.get_submodule(path)))
                    out.append(node)
                mapping[n] = node
                for i in n.all_input_nodes:
                    src = mapping.get(i)
                    if src is not None and src is not node and src not in node.inputs:
                        node.inputs.append(src)
                continue
            node = Node(n.name, "function", str(n.target))
        node.inputs = [s for s in (mapping.get(i) for i in n.all_input_nodes) if s is not None]
        mapping[n] = node
        out.append(node)
    return _link(out), ep


def _from_walk(model: nn.Module) -> list[Node]:
    nodes = []
    for name, m in model.named_modules():
        if name and is_leaf(m) and not _inside_leaf(model, name):
            nodes.append(Node(name, "module", name, type(m)))
    return nodes


def _inside_leaf(model: nn.Module, name: str) -> bool:
    parts = name.split(".")
    return any(is_leaf(model.get_submodule(".".join(parts[:i]))) for i in range(1, len(parts)))


def _link(nodes: Iterable[Node]) -> list[Node]:
    nodes = list(nodes)
    for n in nodes:
        for i in n.inputs:
            i.users.append(n)
    return nodes


def _describe(err: BaseException) -> str:
    """First line of the error plus the user's source line it came from, when the traceback shows one."""
    msg = f"{type(err).__name__}: {str(err).strip().splitlines()[0] if str(err).strip() else ''}"
    torch_dir = os.path.dirname(torch.__file__) + os.sep
    ours = os.path.dirname(os.path.dirname(__file__)) + os.sep
    user = [f for f in traceback.extract_tb(err.__traceback__)
            if not f.filename.startswith((torch_dir, ours)) and "<" not in f.filename]
    if user:
        f = user[-1]
        msg += f" (at {os.path.basename(f.filename)}:{f.lineno}: {(f.line or '').strip()})"
    return msg[:500]


def capture(model: nn.Module, example_inputs: Any = None, *, methods: Sequence[Method] = METHODS) -> CapturedGraph:
    """Capture ``model``'s structure with the first path in ``methods`` that works.

    Args:
        model: any ``nn.Module``; it is not modified.
        example_inputs: a tensor, a tuple of positional inputs, or a dict of keyword inputs (needed for
            ``export``; fx needs none).
        methods: paths to try, in order.

    Example::

        g = capture(model, torch.randn(1, 1, 16, 16))
        print(g.report())     # capture: fx (12 module calls, 30 nodes) ...
    """
    bad = [m for m in methods if m not in METHODS]
    if bad or not methods:
        raise ValueError(f"capture(methods=...): got {list(methods)!r}; allowed: a non-empty list of {list(METHODS)}")
    args, kwargs = normalize_inputs(example_inputs)
    attempts: list[CaptureAttempt] = []
    for method in methods:
        try:
            if method == "fx":
                nodes, gm = _from_fx(model)
                result = CapturedGraph("fx", nodes, attempts, graph_module=gm)
            elif method == "export":
                if not args and not kwargs:
                    raise ValueError("torch.export needs example inputs; pass example_inputs=")
                nodes, ep = _from_export(model, args, kwargs)
                result = CapturedGraph("export", nodes, attempts, exported=ep)
            else:
                result = CapturedGraph("module_walk", _from_walk(model), attempts)
        except Exception as err:  # noqa: BLE001 - every failure is recorded and reported
            attempts.append(CaptureAttempt(method, False, _describe(err)))
            log.info("capture with %s failed: %s", method, attempts[-1].reason)
            continue
        attempts.append(CaptureAttempt(method, True))
        if len(attempts) > 1:
            log.warning("graph captured with %s after: %s", method, "; ".join(str(a) for a in attempts[:-1]))
        return result
    raise CaptureError("no capture path worked:\n" + "\n".join(f"  {a}" for a in attempts))

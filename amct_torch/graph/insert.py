"""Insert modules after individual calls inside a module's ``forward`` (for tensors no module owns).

Module swapping reaches layers; some tensors are made by code, not by a module: ``out + identity`` in a
residual block, ``torch.cat`` in a dense block, or the second call of a ReLU module that a block reuses.
:func:`insert_after` puts a module (an activation quantizer, say) after such a call:

* the *owner* (the module whose ``forward`` makes the call) is traced one level deep with ``torch.fx``
  (its children stay opaque calls);
* the new module is registered on the owner as a child (so it is in the ``state_dict`` under the owner's
  path, e.g. ``layer1.0.add_quant.scale``) and called right after the chosen call;
* the owner keeps its class and its children; only its ``forward`` becomes the code fx generates from the
  edited graph, bound to the owner itself. ``copy.deepcopy`` keeps that; pickling the whole model object
  does not (save the ``state_dict``, as usual).

Calls are named as :class:`~amct_torch.graph.capture.Node` names them in an fx capture: ``node.scope`` is the
owner's path, ``node.local`` the call's key ``(op, target, n)`` in the owner's forward.
"""

from __future__ import annotations

import types
from collections import Counter
from typing import Any, Sequence

import torch.fx as fx
import torch.nn as nn

__all__ = ["insert_after", "InsertError"]


class InsertError(RuntimeError):
    """The owner's ``forward`` could not be traced one level deep, or a call key was not found in it."""


class _OneLevel(fx.Tracer):
    """Trace only the owner's own code: every child module is a single call."""

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return True


def _local_keys(graph: fx.Graph) -> dict[tuple, fx.Node]:
    seen: Counter = Counter()
    out = {}
    for n in graph.nodes:
        if n.op in ("call_module", "call_function", "call_method"):
            key = (n.op, str(n.target) if n.op == "call_module" else n.target)
            out[key + (seen[key],)] = n
            seen[key] += 1
    return out


def insert_after(model: nn.Module, owner: str, points: Sequence[tuple[tuple, str, nn.Module]]) -> list[str]:
    """After each call ``key`` in the forward of ``model.get_submodule(owner)``, call a new child module.

    Args:
        model: the model (modified in place).
        owner: path of the module whose forward makes the calls (``""``: the model itself).
        points: ``(key, name, module)``: the call key (``Node.local``), a name for the new child (made
            unique on the owner if taken), the module to call on the call's output.

    Returns the full paths of the inserted modules, in the order of ``points``. Raises
    :class:`InsertError` (the model unchanged) when the owner cannot be traced or a key is missing.
    """
    target = model.get_submodule(owner) if owner else model
    try:
        graph = _OneLevel().trace(target)
    except Exception as err:  # noqa: BLE001 - reported with the owner's path
        raise InsertError(f"{owner or type(model).__name__}: its forward cannot be traced by torch.fx "
                          f"({type(err).__name__}: {str(err).strip().splitlines()[0] if str(err).strip() else ''})") from err
    index = _local_keys(graph)
    missing = [key for key, _, _ in points if key not in index]
    if missing:
        raise InsertError(f"{owner or type(model).__name__}: calls {missing} not found in its forward "
                          f"(the forward takes another path than when the model was captured)")
    taken = set(dict(target.named_children())) | set(dict(target.named_parameters(recurse=False))) \
        | set(dict(target.named_buffers(recurse=False))) | set(vars(target))
    names = []
    for key, name, module in points:
        base, k = name, 1
        while name in taken:
            name, k = f"{base}_{k}", k + 1
        taken.add(name)
        names.append(name)
        node = index[key]
        with graph.inserting_after(node):
            new = graph.call_module(name, (node,))
        node.replace_all_uses_with(new, delete_user_cb=lambda user, new=new: user is not new)
    for name, (_, _, module) in zip(names, points):
        target.add_module(name, module)
    graph.lint()
    code = fx.GraphModule(target, graph)
    target.forward = types.MethodType(type(code).forward, target)
    return [f"{owner}.{n}" if owner else n for n in names]


def has_generated_forward(module: nn.Module) -> bool:
    """True when :func:`insert_after` replaced this module's forward."""
    fwd: Any = module.__dict__.get("forward")
    return isinstance(fwd, types.MethodType) and fwd.__self__ is module

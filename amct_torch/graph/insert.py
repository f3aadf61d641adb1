"""Insert modules after individual calls inside a module's ``forward`` (for tensors no module owns).

Module swapping reaches layers; some tensors are made by code, not by a module: ``out + identity`` in a
residual block, ``torch.cat`` in a dense block, or the second call of a ReLU module that a block reuses.
:func:`insert_after` puts a module (an activation quantizer, say) after such a call:

* the *owner* (the module whose ``forward`` makes the call) is traced one level deep with ``torch.fx``
  (its children stay opaque calls);
* the new module is registered on the owner as a child (so it is in the ``state_dict`` under the owner's
  path, e.g. ``layer1.0.add_quant.scale``) and called right after the chosen call;
* the owner keeps its children, its attributes and its ``state_dict``; its class becomes a subclass of
  its class (same name, so ``isinstance`` and reprs are unchanged) whose ``forward`` is the code fx
  generates from the edited graph; instances pickle as (class, source, state), so ``copy.deepcopy``,
  ``pickle`` and ``torch.save(model)`` keep working.

Calls are named as :class:`~amct_torch.graph.capture.Node` names them in an fx capture: ``node.scope`` is the
owner's path, ``node.local`` the call's key ``(op, target, n)`` in the owner's forward.
"""

from __future__ import annotations

from collections import Counter
from typing import Any, Sequence

import torch.fx as fx
import torch.nn as nn
from torch.fx.graph_module import _format_import_block, sys_importer

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
    code = graph.python_code(root_module="self")
    source = _format_import_block(code.globals, sys_importer) + "\n" + code.src
    base = getattr(type(target), "_amct_base", type(target))
    target.__class__ = generated_class(base, source)
    return [f"{owner}.{n}" if owner else n for n in names]


_CLASSES: dict[tuple[type, str], type] = {}


def generated_class(base: type, source: str) -> type:
    """A subclass of ``base`` whose ``forward`` is ``source`` (fx-generated), picklable by rebuilding.

    It keeps ``base``'s name, so reprs and ``isinstance`` are unchanged; ``__reduce_ex__`` pickles an
    instance as (base class, source, state), so ``copy.deepcopy``, ``pickle`` and ``torch.save(model)``
    work in a fresh process too.
    """
    key = (base, source)
    if key not in _CLASSES:
        namespace: dict[str, Any] = {}
        exec(compile(source, f"<amct_torch forward of {base.__name__}>", "exec"), namespace)  # noqa: S102 - fx code

        def __reduce_ex__(self: nn.Module, protocol: Any) -> tuple:
            return _rebuild, (base, source), self.__getstate__()

        _CLASSES[key] = type(base.__name__, (base,), {
            "forward": namespace["forward"], "__module__": base.__module__, "__qualname__": base.__qualname__,
            "__reduce_ex__": __reduce_ex__, "_amct_base": base, "_amct_forward_source": source})
    return _CLASSES[key]


def _rebuild(base: type, source: str) -> nn.Module:
    cls = generated_class(base, source)
    return cls.__new__(cls)


def has_generated_forward(module: nn.Module) -> bool:
    """True when :func:`insert_after` replaced this module's forward."""
    return "_amct_forward_source" in vars(type(module))

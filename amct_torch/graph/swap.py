"""Module swap: replace supported layers by their wrappers, as targeting decides, and print the plan.

The swap is a module-level operation (``set_submodule``): the user's model keeps its class and its own
``forward``, so it works whichever capture path succeeded, including the module walk. The captured graph,
when it has data flow, adds two checks: a layer that is never called, or called more than once in one
forward, is left alone and reported. A module object registered under two names (shared) is always
reported and left alone.
"""

from __future__ import annotations

import copy
from collections import defaultdict
from typing import Any, Callable

import torch.nn as nn

from ..config import Config, Targeting
from ..nn import CompressedLayer, FoldedBatchNorm, registered_types, wrapper_for
from .capture import CapturedGraph, capture
from .plan import LayerPlan, Plan

__all__ = ["swap_layers", "Attach"]

Attach = Callable[[str, CompressedLayer, Config], None]
"""``attach(name, wrapper, config)``: a technique's hook that adds stages/quantizers to a fresh wrapper."""


def _describe(config: Config, layer: CompressedLayer) -> str:
    short = getattr(config, "short", None)
    text = short() if callable(short) else type(config).__name__
    if not layer.has_weight and " / " in text:  # "W8 ... / A8 ...": a weightless layer only has the second half
        text = text.split(" / ", 1)[1]
    return text


def _has_own_params(m: nn.Module) -> bool:
    return any(True for _ in m.parameters(recurse=False))


def swap_layers(model: nn.Module, targeting: Targeting | Config, example_inputs: Any = None, *,
                graph: CapturedGraph | None = None, attach: Attach | None = None, inplace: bool = False,
                title: str = "swap", reuse_wrapped: bool = False) -> tuple[nn.Module, Plan]:
    """Wrap every supported layer that ``targeting`` gives a config; return the model and its plan.

    Args:
        model: the model (copied unless ``inplace``).
        targeting: a :class:`Targeting`, or one config for every supported layer.
        example_inputs: inputs for graph capture (reused and unused layers are detected from it).
        graph: an already captured graph of ``model`` (skips capture).
        attach: called as ``attach(name, wrapper, config)`` for every new wrapper, before it is installed,
            so a technique creates all its state at prepare time.
        inplace: modify ``model`` itself.
        reuse_wrapped: layers that are already wrappers (an earlier pass wrapped them) get ``attach`` on
            the existing wrapper, targeted by their inner layer, instead of ``skip: already wrapped``; this
            is how passes compose (prune, then quantize: one wrapper, a longer pipeline).

    The plan lists every supported layer and every other leaf layer with parameters; skipped ones say
    why (``skip`` list, ``None`` config, shared, reused, never called, custom forward).

    Example::

        model, plan = swap_layers(model, Targeting(QuantConfig(), module_name={"fc": None}), x)
        print(plan)
    """
    if isinstance(targeting, Config):
        targeting = Targeting(targeting)
    if not isinstance(targeting, Targeting):
        raise TypeError(f"swap_layers(targeting=...): got {type(targeting).__name__}; allowed: Targeting or a Config")
    if not inplace:
        model = copy.deepcopy(model)
    graph = graph if graph is not None else capture(model, example_inputs)
    plan = Plan(title, capture=graph.report())
    counts = graph.call_counts()

    names_of: dict[int, list[str]] = defaultdict(list)
    for name, m in model.named_modules(remove_duplicate=False):
        names_of[id(m)].append(name)
    supported = registered_types()

    wrapped_prefixes: list[str] = []
    seen_names, seen_modules = [], []
    for name, m in list(model.named_modules(remove_duplicate=False)):
        if not name or any(name.startswith(p + ".") for p in wrapped_prefixes):
            continue
        kind = type(m).__name__
        if isinstance(m, CompressedLayer):
            wrapped_prefixes.append(name)
            if not reuse_wrapped:
                plan.layers.append(LayerPlan(name, type(m.module).__name__, "skip", "already wrapped"))
                continue
            seen_names.append(name)
            seen_modules.append(m.module)
            resolution = targeting.resolve(name, m.module)
            if resolution.config is None:
                plan.layers.append(LayerPlan(name, type(m.module).__name__, "skip", "targeting gives no config",
                                             resolution.source))
                continue
            if attach is not None:
                attach(name, m, resolution.config)
            plan.layers.append(LayerPlan(name, type(m.module).__name__, "wrap",
                                         _describe(resolution.config, m) + " (on the existing wrapper)", resolution.source))
            continue
        wrapper = wrapper_for(m)
        if wrapper is None:
            if isinstance(m, supported) and (m._forward_hooks or m._forward_pre_hooks):
                plan.layers.append(LayerPlan(name, kind, "unsupported",
                                             "it has forward hooks (e.g. torch.nn.utils.prune, weight_norm) that a "
                                             "wrapper would bypass; make them permanent (prune.remove) first"))
            elif isinstance(m, supported):
                plan.layers.append(LayerPlan(name, kind, "unsupported",
                                             f"{kind} overrides forward; a wrapper would bypass it"))
            elif _has_own_params(m) and not isinstance(m, FoldedBatchNorm):  # a folded BN is in the fold plan
                plan.layers.append(LayerPlan(name, kind, "unsupported", f"no wrapper for {kind}"))
            continue
        seen_names.append(name)
        seen_modules.append(m)
        resolution = targeting.resolve(name, m)
        reason = _skip_reason(model, name, m, names_of, counts, graph)
        if reason is None and resolution.config is None:
            reason = "targeting gives no config" if resolution.source.startswith("module") or resolution.source == "global" \
                else "in skip list"
        if reason is not None:
            plan.layers.append(LayerPlan(name, kind, "skip", reason, resolution.source))
            continue
        layer = wrapper(m)
        if attach is not None:
            attach(name, layer, resolution.config)
        model.set_submodule(name, layer)
        wrapped_prefixes.append(name)
        plan.layers.append(LayerPlan(name, kind, "wrap", _describe(resolution.config, layer), resolution.source))
    plan.warnings += [f"targeting entry {e} matched no layer" for e in targeting.unused_entries(seen_names, seen_modules)]
    return model, plan


_DIRECT_WEIGHT_USERS = (nn.MultiheadAttention, nn.TransformerEncoderLayer, nn.TransformerDecoderLayer)


def _skip_reason(model: nn.Module, name: str, m: nn.Module, names_of: dict[int, list[str]],
                 counts: dict[str, int], graph: CapturedGraph) -> str | None:
    aliases = [n for n in names_of[id(m)] if n != name]
    if aliases:
        return f"shared: the same module is also registered as {', '.join(aliases)}"
    parent = model.get_submodule(name.rsplit(".", 1)[0]) if "." in name else model
    if isinstance(parent, _DIRECT_WEIGHT_USERS):
        return (f"its weights are read directly by the parent {type(parent).__name__} "
                "(fused fast path), which bypasses a wrapper")
    if graph.has_dataflow:
        calls = counts.get(name, 0)
        if calls == 0:
            return f"never called in forward (capture: {graph.method})"
        if calls > 1:
            return f"called {calls} times in one forward (reused); calibration would mix its inputs"
    return None

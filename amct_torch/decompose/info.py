"""The decomposition info file: what rebuilds a decomposed model's structure from the original architecture.

    model, plan = decompose(model, config, x)
    save_decomposition_info(plan, "decompose_info.json")
    torch.save(model.state_dict(), "decomposed.pth")

    fresh, changes = apply_decomposition_info(build_model(), "decompose_info.json")   # factors default-initialised
    fresh.load_state_dict(torch.load("decomposed.pth"))                               # strict: the keys match

The JSON holds, per decomposed layer (by module path), the original layer's type and constructor arguments,
the method, the rank(s) and each factor's name, type and constructor arguments::

    {"format": "amct_torch.decomposition", "version": 1,
     "layers": {"conv1": {"type": "Conv2d", "args": {"in_channels": 64, ...}, "method": "spatial", "rank": 32,
                          "factors": [{"name": "conv1.0", "type": "Conv2d", "args": {...}}, ...]}}}

Applying checks everything first and changes nothing unless every layer fits: a missing module, another
type, other constructor arguments (a shape mismatch) or an already-decomposed layer is reported by name.
"""

from __future__ import annotations

import copy
import json
import os
import re
from typing import Any, Mapping

import torch.nn as nn

from ..config.amct_proto import atomic_write_text
from . import factors as F
from .plan import INFO_FORMAT, INFO_VERSION, DecompositionPlan

__all__ = ["decomposition_info", "save_decomposition_info", "load_decomposition_info", "check_decomposition_info",
           "apply_decomposition_info"]

_NUMBER_LIST = re.compile(r"\[\s*(-?\d+(?:,\s*-?\d+)*)\s*\]")  # [3, 3] on one line, not three
_METHOD_TYPES = {"spatial": "Conv2d", "tucker2": "Conv2d", "svd": "Linear"}


def decomposition_info(plan: DecompositionPlan) -> dict[str, Any]:
    """The info dict of a plan's decomposed layers (``plan.info()``)."""
    return plan.info()


def _as_info(info: DecompositionPlan | Mapping[str, Any]) -> dict[str, Any]:
    if isinstance(info, DecompositionPlan):
        return info.info()
    if isinstance(info, Mapping):
        return dict(info)
    raise TypeError(f"decomposition info: got {type(info).__name__}; allowed: a DecompositionPlan, an info dict, "
                    "or (to apply) a path to an info JSON file")


def check_decomposition_info(info: Mapping[str, Any], where: str = "decomposition info") -> dict[str, Any]:
    """Validate the structure of an info dict; raises ``ValueError`` naming the entry that is wrong."""
    if not isinstance(info, Mapping):
        raise ValueError(f"{where}: got {type(info).__name__}; allowed: a JSON object with 'format', 'version', 'layers'")
    if info.get("format") != INFO_FORMAT:
        raise ValueError(f"{where}: 'format' is {info.get('format')!r}; allowed: {INFO_FORMAT!r} (a file written by "
                         "save_decomposition_info or auto_decomposition)")
    if info.get("version") != INFO_VERSION:
        raise ValueError(f"{where}: 'version' is {info.get('version')!r}; allowed: {INFO_VERSION}")
    layers = info.get("layers")
    if not isinstance(layers, Mapping):
        raise ValueError(f"{where}: 'layers' is {type(layers).__name__}; allowed: an object of module path -> layer entry")
    for name, entry in layers.items():
        at = f"{where}: layer {name!r}"
        if not isinstance(entry, Mapping):
            raise ValueError(f"{at}: got {type(entry).__name__}; allowed: an object with type, args, method, rank, factors")
        missing = [k for k in ("type", "args", "method", "rank", "factors") if k not in entry]
        if missing:
            raise ValueError(f"{at}: missing {', '.join(missing)}")
        method = entry["method"]
        if _METHOD_TYPES.get(method) != entry["type"]:
            raise ValueError(f"{at}: method {method!r} for type {entry['type']!r}; allowed: spatial or tucker2 for "
                             "Conv2d, svd for Linear")
        try:
            expected = F.factor_args(method, entry["args"], entry["rank"])
        except (KeyError, TypeError, ValueError) as err:
            raise ValueError(f"{at}: args/rank do not describe a {entry['type']} {method} decomposition "
                             f"({type(err).__name__}: {err})") from None
        factors = entry["factors"]
        got = [{"type": f.get("type"), "args": f.get("args")} if isinstance(f, Mapping) else f for f in factors] \
            if isinstance(factors, list) else factors
        if got != expected:
            raise ValueError(f"{at}: the factors do not match method {method!r} at rank {entry['rank']!r} of these args "
                             f"(expected {expected}); was the file edited?")
        names = [f.get("name") for f in factors]
        want = [f"{name}.{i}" for i in range(len(factors))]
        if names != want:
            raise ValueError(f"{at}: factor names {names}; allowed: {want}")
    return dict(info)


def save_decomposition_info(info: DecompositionPlan | Mapping[str, Any], path: str | os.PathLike) -> None:
    """Write the info (of a plan, or an info dict) as JSON, atomically: the file is complete or untouched."""
    data = check_decomposition_info(_as_info(info))
    path = os.fspath(path)
    if os.path.isdir(path):
        raise IsADirectoryError(f"decomposition info path {path!r} is a directory; give a file path such as "
                                f"{os.path.join(path, 'decompose_info.json')!r}")
    text = json.dumps(data, indent=2)
    text = _NUMBER_LIST.sub(lambda m: "[" + ", ".join(v.strip() for v in m.group(1).split(",")) + "]", text)
    atomic_write_text(path, text + "\n")


def load_decomposition_info(path: str | os.PathLike) -> dict[str, Any]:
    """Read and validate an info JSON file."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"decomposition info file {path!r} not found (write it with save_decomposition_info "
                                "or auto_decomposition(model, decompose_info_path=...))")
    with open(path, encoding="utf-8") as fh:
        text = fh.read()
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        raise ValueError(f"decomposition info {path!r}: not valid JSON (line {err.lineno}, column {err.colno}: "
                         f"{err.msg})") from None
    return check_decomposition_info(data, f"decomposition info {path!r}")


def _describe(kind: str, args: Mapping[str, Any]) -> str:
    return f"{kind}({', '.join(f'{k}={v}' for k, v in args.items())})"


def apply_decomposition_info(model: nn.Module, info: DecompositionPlan | Mapping[str, Any] | str | os.PathLike, *,
                             inplace: bool = False) -> tuple[nn.Module, dict[str, list[str]]]:
    """Rebuild the decomposed structure on an undecomposed ``model``: each listed layer becomes an
    ``nn.Sequential`` of default-initialised factors (load the decomposed ``state_dict`` afterwards).

    Args:
        model: the original architecture (the one the info was written for).
        info: an info dict, a :class:`DecompositionPlan`, or the path of an info JSON file.
        inplace: modify ``model`` itself (AMCT's ``decompose_network`` does); otherwise a deep copy.

    Returns ``(model, changes)`` with AMCT's changes dict ``{'conv1': ['conv1.0', 'conv1.1'], ...}``.
    Raises ``ValueError`` (before changing anything) naming every layer that does not fit.
    """
    if isinstance(info, (str, os.PathLike)):
        data = load_decomposition_info(info)
        where = f"decomposition info {os.fspath(info)!r}"
    else:
        data = check_decomposition_info(_as_info(info))
        where = "decomposition info"
    problems, todo = [], []
    for name, entry in data["layers"].items():
        try:
            module = model.get_submodule(name)
        except AttributeError:
            problems.append(f"{name!r}: no such module in the model")
            continue
        if isinstance(module, nn.Sequential) and [f"{name}.{i}" for i in range(len(module))] == \
                [f["name"] for f in entry["factors"]]:
            problems.append(f"{name!r}: already decomposed (an nn.Sequential of {len(module)} layers)")
            continue
        if type(module).__name__ != entry["type"] or not isinstance(module, F.FACTOR_TYPES[entry["type"]]):
            problems.append(f"{name!r}: the info says {entry['type']}, the model has {type(module).__name__}")
            continue
        have = F.layer_args(module)
        if have != entry["args"]:
            diff = ", ".join(f"{k}: {entry['args'].get(k)!r} vs {have.get(k)!r}" for k in have
                             if have.get(k) != entry["args"].get(k))
            problems.append(f"{name!r}: shape mismatch (info vs model: {diff}); the info says "
                            f"{_describe(entry['type'], entry['args'])}, the model has "
                            f"{_describe(type(module).__name__, have)}")
            continue
        todo.append((name, module, entry))
    if problems:
        raise ValueError(f"{where} does not fit the model: " + "; ".join(problems) + ". Apply it to the undecomposed "
                         "model it was written for (same architecture, before any decomposition)")
    if not inplace:
        model = copy.deepcopy(model)
    changes = {}
    for name, _, entry in todo:
        module = model.get_submodule(name)
        seq = F.build_factors(entry["factors"], device=module.weight.device, dtype=module.weight.dtype)
        seq.train(module.training)
        model.set_submodule(name, seq)
        changes[name] = [f["name"] for f in entry["factors"]]
    return model, changes

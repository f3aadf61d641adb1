"""Per-layer pruning sensitivity: a metric versus the pruning ratio of one layer at a time.

    result = sensitivity(model, evaluate=lambda m: accuracy(m, val_loader), ratios=(0.2, 0.4, 0.6, 0.8))
    print(result.table())                   # one row per layer, one column per ratio
    result.plot("sensitivity.png")          # matplotlib, if installed
    result.max_ratio(tolerance=0.01)        # per layer: the largest ratio losing at most 0.01

Every trial prunes one layer to one ratio, evaluates, and puts the model back:

* ``prune="magnitude"`` (default) zeroes the ``round(ratio * numel)`` smallest ``|w|`` of the layer's
  weight in place and restores the weight afterwards; a layer that already has a mask counts its
  masked weights first (the ratio is the layer's total sparsity);
* ``prune=callable(model, layer_name, ratio) -> model`` gets a deep copy of the model for every trial,
  so it may change anything (wrap layers, remove channels);
* ``prune="<name>"`` uses a pruner registered with :func:`register_pruner` (channel pruning registers
  ``"channel"``), called like a callable, on a copy.
"""

from __future__ import annotations

import copy
import importlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import torch
import torch.nn as nn

from ..graph.plan import render_table
from ..nn import CompressedLayer

__all__ = ["sensitivity", "SensitivityResult", "register_pruner", "registered_pruners", "prunable_layers", "Pruner"]

Pruner = Callable[[nn.Module, str, float], nn.Module]
"""``prune(model, layer_name, ratio) -> model``: prune one layer of ``model`` (a copy) to ``ratio``."""

_PRUNERS: dict[str, Pruner] = {}
_LAYERS: dict[str, Callable[[nn.Module], list[str]]] = {}
_PRUNABLE = (nn.modules.conv._ConvNd, nn.Linear)


def register_pruner(name: str, fn: Pruner | None = None, *, layers: Callable[[nn.Module], list[str]] | None = None):
    """Register ``fn`` as ``sensitivity(prune=name)``; usable as a decorator ``@register_pruner("channel")``.

    ``layers(model) -> [names]``, when given, is the default layer list for this pruner (e.g. the producers
    of prunable channel groups) instead of :func:`prunable_layers`.
    """
    if not isinstance(name, str) or not name or name == "magnitude":
        raise ValueError(f"register_pruner(name=...): got {name!r}; allowed: a non-empty name other than 'magnitude'")

    def deco(f: Pruner) -> Pruner:
        if not callable(f):
            raise TypeError(f"register_pruner({name!r}): got {type(f).__name__}; allowed: callable(model, layer_name, ratio)")
        _PRUNERS[name] = f
        if layers is not None:
            _LAYERS[name] = layers
        else:
            _LAYERS.pop(name, None)
        return f

    return deco(fn) if fn is not None else deco


def registered_pruners() -> tuple[str, ...]:
    """Names ``sensitivity(prune=...)`` accepts."""
    return ("magnitude", *_PRUNERS)


def prunable_layers(model: nn.Module) -> list[str]:
    """Module paths of every layer with a weight to prune: wrappers with a weight, Conv*, ConvTranspose*, Linear."""
    out, wrapped = [], []
    for name, m in model.named_modules():
        if any(name.startswith(p + ".") for p in wrapped):
            continue
        if isinstance(m, CompressedLayer):
            wrapped.append(name)
            if m.has_weight:
                out.append(name)
        elif isinstance(m, _PRUNABLE) and getattr(m, "weight", None) is not None:
            out.append(name)
    return out


@dataclass
class SensitivityResult:
    """The metric of the unpruned model (``baseline``) and of every (layer, ratio) trial."""

    ratios: tuple[float, ...]
    values: dict[str, tuple[float, ...]]
    baseline: float
    metric: str = "metric"
    higher_is_better: bool = True
    mode: str = "magnitude"
    layers: list[str] = field(init=False)

    def __post_init__(self) -> None:
        self.layers = list(self.values)

    def drop(self, layer: str) -> tuple[float, ...]:
        """How much worse than the baseline each ratio leaves ``layer`` (positive = worse)."""
        sign = 1.0 if self.higher_is_better else -1.0
        return tuple(sign * (self.baseline - v) for v in self._row(layer))

    def max_ratio(self, tolerance: float) -> dict[str, float]:
        """Per layer: the largest ratio such that it and every smaller ratio lose at most ``tolerance``
        (0.0 when even the smallest loses more)."""
        out = {}
        for layer in self.layers:
            best = 0.0
            for r, d in zip(self.ratios, self.drop(layer)):
                if d > tolerance:
                    break
                best = r
            out[layer] = best
        return out

    def _row(self, layer: str) -> tuple[float, ...]:
        if layer not in self.values:
            raise KeyError(f"no layer {layer!r} in the result; layers: {', '.join(self.layers)}")
        return self.values[layer]

    def table(self) -> str:
        """Text table: one row per layer, the metric at each ratio."""
        head = f"sensitivity ({self.mode}): {self.metric}, baseline {self.baseline:.4g}"
        rows = [(layer, *(f"{v:.4g}" for v in self.values[layer])) for layer in self.layers]
        return head + "\n" + render_table(["layer", *(f"{r:g}" for r in self.ratios)], rows)

    def __str__(self) -> str:
        return self.table()

    def __repr__(self) -> str:
        return (f"SensitivityResult(mode={self.mode!r}, metric={self.metric!r}, baseline={self.baseline:.4g}, "
                f"layers={len(self.layers)}, ratios={list(self.ratios)})")

    def to_dict(self) -> dict[str, Any]:
        return {"metric": self.metric, "mode": self.mode, "baseline": self.baseline,
                "higher_is_better": self.higher_is_better, "ratios": list(self.ratios),
                "values": {k: list(v) for k, v in self.values.items()}}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "SensitivityResult":
        return cls(tuple(data["ratios"]), {k: tuple(v) for k, v in data["values"].items()}, data["baseline"],
                   data.get("metric", "metric"), data.get("higher_is_better", True), data.get("mode", "magnitude"))

    def plot(self, path: str | Path | None = None, *, title: str | None = None):
        """A matplotlib ``Figure``: the metric versus the ratio, one line per layer, the baseline dashed.
        Saved to ``path`` when given. Needs matplotlib (no pyplot state is touched)."""
        try:
            from matplotlib.figure import Figure
        except ImportError:  # pragma: no cover - matplotlib is in the test extras
            raise ImportError("SensitivityResult.plot needs matplotlib (pip install matplotlib); "
                              "table() and to_dict() work without it") from None
        fig = Figure(figsize=(7, 4.5))
        ax = fig.subplots()
        for layer in self.layers:
            ax.plot(self.ratios, self.values[layer], marker="o", label=layer)
        ax.axhline(self.baseline, color="black", linestyle="--", linewidth=1, label="unpruned")
        ax.set_xlabel(f"pruning ratio ({self.mode})")
        ax.set_ylabel(self.metric)
        ax.set_title(title or f"{self.metric} vs. pruning ratio, one layer at a time")
        ax.legend(fontsize="small", ncol=1 + len(self.layers) // 12)
        fig.tight_layout()
        if path is not None:
            Path(path).parent.mkdir(parents=True, exist_ok=True)
            fig.savefig(path)
        return fig


def _submodule(model: nn.Module, name: str) -> nn.Module | None:
    try:
        return model.get_submodule(name)
    except AttributeError:
        return None


def _weight_of(model: nn.Module, name: str) -> tuple[torch.Tensor, torch.Tensor | None]:
    layer = _submodule(model, name)
    if layer is None:
        raise KeyError(f"sensitivity: no layer {name!r} in the model; prunable layers: "
                       f"{', '.join(prunable_layers(model))}")
    if isinstance(layer, CompressedLayer):
        if not layer.has_weight:
            raise ValueError(f"sensitivity: layer {name!r} ({type(layer.module).__name__}) has no weight to prune")
        mask = None
        for stage in layer.weight_pipeline:
            if isinstance(getattr(stage, "mask", None), torch.Tensor):
                mask = stage.mask
                break
        return layer.module.weight, mask
    w = getattr(layer, "weight", None)
    if not isinstance(w, torch.Tensor):
        raise ValueError(f"sensitivity: layer {name!r} ({type(layer).__name__}) has no weight to prune")
    return w, None


def _resolve(prune: str | Pruner) -> Pruner | None:
    """None for the built-in in-place magnitude trial."""
    if callable(prune):
        return prune
    if prune == "magnitude":
        return None
    if prune not in _PRUNERS:
        importlib.import_module("amct_torch.sparsity")  # pruning modules register their pruners on import
    if prune not in _PRUNERS:
        raise ValueError(f"sensitivity(prune=...): got {prune!r}; allowed: one of "
                         f"{', '.join(map(repr, registered_pruners()))}, or callable(model, layer_name, ratio) -> model")
    return _PRUNERS[prune]


def sensitivity(model: nn.Module, evaluate: Callable[[nn.Module], float], layers: Iterable[str] | None = None,
                ratios: Sequence[float] = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9), *,
                prune: str | Pruner = "magnitude", metric: str = "metric", higher_is_better: bool = True,
                verbose: bool = False) -> SensitivityResult:
    """Evaluate ``model`` with each layer pruned alone to each ratio.

    Args:
        model: the model (left as it was: in-place trials are undone, other trials run on copies).
        evaluate: ``evaluate(model) -> float``, e.g. validation accuracy or loss; it sets the mode it needs.
        layers: module paths to analyse; default every prunable layer (:func:`prunable_layers`, or the
            ``layers`` a registered pruner declared).
        ratios: pruning ratios in [0, 1), ascending.
        prune: ``"magnitude"``, a registered pruner name, or ``callable(model, layer_name, ratio) -> model``.
        metric: the metric's name, for the table and the plot.
        higher_is_better: accuracy-like (True) or loss-like (False) metric; used by ``drop``/``max_ratio``.
        verbose: print one line per trial.
    """
    ratios = tuple(float(r) for r in ratios)
    if not ratios or any(not 0.0 <= r < 1.0 for r in ratios) or list(ratios) != sorted(ratios):
        raise ValueError(f"sensitivity(ratios=...): got {list(ratios)}; allowed: ascending values in [0, 1)")
    pruner = _resolve(prune)
    mode = prune if isinstance(prune, str) else getattr(prune, "__name__", "custom")
    default_layers = _LAYERS.get(prune, prunable_layers) if isinstance(prune, str) else prunable_layers
    names = default_layers(model) if layers is None else list(layers)
    if not names:
        raise ValueError("sensitivity: no layer to analyse (the model has no Conv/Linear weights, or layers=[] was given)")
    for name in names:  # fail before the first (maybe long) evaluation
        if pruner is None:
            _weight_of(model, name)
        elif not isinstance(name, str) or _submodule(model, name) is None:
            raise KeyError(f"sensitivity: no layer {name!r} in the model; prunable layers: "
                           f"{', '.join(prunable_layers(model))}")
    baseline = float(evaluate(model))
    values: dict[str, tuple[float, ...]] = {}
    for name in names:
        row = []
        for r in ratios:
            if pruner is None:
                row.append(_magnitude_trial(model, name, r, evaluate))
            else:
                trial = pruner(copy.deepcopy(model), name, r)
                if not isinstance(trial, nn.Module):
                    raise TypeError(f"sensitivity: the pruner returned {type(trial).__name__} for layer {name!r}; "
                                    "allowed: the pruned model (an nn.Module)")
                row.append(float(evaluate(trial)))
            if verbose:
                print(f"sensitivity: {name} at {r:g}: {metric} {row[-1]:.4g}")
        values[name] = tuple(row)
    return SensitivityResult(ratios, values, baseline, metric, higher_is_better, mode)


def _magnitude_trial(model: nn.Module, name: str, ratio: float, evaluate: Callable[[nn.Module], float]) -> float:
    from ..sparsity.magnitude import magnitude_mask  # lazily: the sparsity package may register pruners here

    weight, mask = _weight_of(model, name)
    saved = weight.detach().clone()
    try:
        with torch.no_grad():
            weight.mul_(magnitude_mask(weight, ratio, mask).to(weight))
        return float(evaluate(model))
    finally:
        with torch.no_grad():
            weight.copy_(saved)

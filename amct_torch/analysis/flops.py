"""FLOPs/MACs and parameter counts per layer and in total, dense and sparsity-aware.

    report = count_flops(model, torch.randn(1, 3, 224, 224))
    print(report.table())          # layer, type, params, MACs, output shape, effective params/MACs
    report.total_macs, report.total_params, report.total_effective_macs

One forward of ``example_inputs`` with forward hooks on the leaf modules (wrappers count as leaves, through
their inner layer); the numbers are for that input, batch included (pass a batch of one for per-example
figures). The model is run in eval mode without gradients and put back in the modes it had.

MACs (multiply-accumulates; FLOPs ~= 2 * MACs):

* Conv: ``C_out * (C_in / groups) * prod(k) * prod(out spatial)`` per example, i.e. every weight is used
  once per output position;
* ConvTranspose: ``C_in * (C_out / groups) * prod(k) * prod(in spatial)``: every weight once per *input*
  position;
* Linear (and transformers' Conv1D): ``in * out`` per output row (every leading dimension counts);
* BatchNorm, LayerNorm, GroupNorm, InstanceNorm: one per output element (the affine ``x * a + b``; a BN
  folded into its conv at deploy costs nothing, but is counted as the unfolded model runs it);
* pooling, activations and functional ops (``+``, ``cat``, attention's matmuls): 0. Pooling layers get a
  row for their output shape; leaf layers with parameters whose MACs are not modelled (LSTM, GRU,
  Embedding, ...) get a row with MACs 0 and are listed in ``report.notes``.

Effective (sparsity-aware) counts read the mask of a wrapper's :class:`~amct_torch.sparsity.masks.MaskStage`:
a masked weight costs no parameter and none of its MACs (``effective MACs = uses per weight * kept
weights``), a masked bias (channel pruning) no parameter. Layers without a mask count as dense; a
physically shrunk model is simply smaller.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Callable

import torch
import torch.nn as nn

from ..graph.capture import normalize_inputs
from ..graph.plan import render_table
from ..nn import CompressedLayer

__all__ = ["count_flops", "FlopsReport", "LayerCount"]

_NORMS = (nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm)
_POOLS = (nn.modules.pooling._MaxPoolNd, nn.modules.pooling._AvgPoolNd, nn.modules.pooling._AdaptiveAvgPoolNd,
          nn.modules.pooling._AdaptiveMaxPoolNd, nn.modules.pooling._LPPoolNd)


@dataclass(frozen=True)
class LayerCount:
    """One layer's line: parameters, MACs and output shape, dense and effective (masks applied)."""

    name: str
    layer_type: str
    params: int
    macs: int
    output_shape: tuple[int, ...]
    effective_params: int
    effective_macs: int
    calls: int = 1


def _fmt(n: float) -> str:
    for unit, scale in (("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.2f}{unit}"
    return f"{n:g}"


@dataclass
class FlopsReport:
    """Per-layer counts (in call order) and totals. ``total_params`` counts every parameter of the model."""

    layers: list[LayerCount] = field(default_factory=list)
    total_params: int = 0
    notes: list[str] = field(default_factory=list)

    @property
    def total_macs(self) -> int:
        return sum(r.macs for r in self.layers)

    @property
    def total_effective_macs(self) -> int:
        return sum(r.effective_macs for r in self.layers)

    @property
    def total_effective_params(self) -> int:
        return self.total_params - sum(r.params - r.effective_params for r in self.layers)

    @property
    def total_flops(self) -> int:
        """``2 * total_macs`` (a multiply and an add)."""
        return 2 * self.total_macs

    def __getitem__(self, name: str) -> LayerCount:
        for r in self.layers:
            if r.name == name:
                return r
        raise KeyError(f"no layer {name!r} in the report; layers: {', '.join(r.name for r in self.layers)}")

    def to_dict(self) -> dict[str, Any]:
        return {"layers": [asdict(r) for r in self.layers], "total_params": self.total_params,
                "total_macs": self.total_macs, "total_effective_params": self.total_effective_params,
                "total_effective_macs": self.total_effective_macs, "notes": list(self.notes)}

    def table(self) -> str:
        rows = [(r.name, r.layer_type, f"{r.params:,}", f"{r.macs:,}", "x".join(map(str, r.output_shape)),
                 f"{r.effective_params:,}", f"{r.effective_macs:,}") for r in self.layers]
        rows.append(("total", "", f"{self.total_params:,}", f"{self.total_macs:,}", "",
                     f"{self.total_effective_params:,}", f"{self.total_effective_macs:,}"))
        head = (f"MACs {_fmt(self.total_macs)} (FLOPs ~ {_fmt(self.total_flops)}), params {_fmt(self.total_params)}; "
                f"effective: MACs {_fmt(self.total_effective_macs)}, params {_fmt(self.total_effective_params)}")
        body = render_table(["layer", "type", "params", "MACs", "output", "eff. params", "eff. MACs"], rows)
        return "\n".join([head, body] + [f"note: {n}" for n in self.notes])

    def __str__(self) -> str:
        return self.table()

    def __repr__(self) -> str:
        return f"FlopsReport(layers={len(self.layers)}, macs={self.total_macs}, params={self.total_params})"


def layers_outside_wrappers(model: nn.Module, keep: Callable[[str, nn.Module], bool]) -> dict[str, nn.Module]:
    """Every compression wrapper (not what is inside it) and every other module ``keep(name, module)``
    accepts, in module order."""
    out, wrapped = {}, []
    for name, m in model.named_modules():
        if any(name.startswith(p + ".") for p in wrapped):
            continue
        if isinstance(m, CompressedLayer):
            wrapped.append(name)
            out[name] = m
        elif keep(name, m):
            out[name] = m
    return out


def _leaves(model: nn.Module) -> dict[str, nn.Module]:
    return layers_outside_wrappers(model, lambda name, m: bool(name) and not any(True for _ in m.children()))


def _mask_of(layer: nn.Module) -> Any:
    for stage in getattr(layer, "weight_pipeline", None) or ():
        if isinstance(getattr(stage, "mask", None), torch.Tensor):
            return stage
    return None


def _uses_per_weight(inner: nn.Module, x: torch.Tensor, y: torch.Tensor) -> int | None:
    """How many MACs each weight element takes part in, or None when the layer is not modelled."""
    w = getattr(inner, "weight", None)
    if isinstance(inner, nn.modules.conv._ConvTransposeNd):
        return x.numel() // inner.in_channels
    if isinstance(inner, nn.modules.conv._ConvNd):
        return y.numel() // inner.out_channels
    if isinstance(inner, nn.Linear):
        return y.numel() // inner.out_features
    if type(inner).__name__ == "Conv1D" and isinstance(w, torch.Tensor) and w.dim() == 2:  # transformers, (in, out)
        return y.numel() // w.shape[1]
    return None


def _params(m: nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


@torch.no_grad()
def _count(name: str, module: nn.Module, x: Any, y: Any) -> LayerCount:
    inner = module.module if isinstance(module, CompressedLayer) else module
    x = x[0] if isinstance(x, (tuple, list)) and x else x
    out = y[0] if isinstance(y, (tuple, list)) and y else y
    shape = tuple(out.shape) if isinstance(out, torch.Tensor) else ()
    params = _params(inner)
    macs = eff_macs = 0
    eff_params = params
    if isinstance(x, torch.Tensor) and isinstance(out, torch.Tensor):
        uses = _uses_per_weight(inner, x, out)
        if uses is not None:
            w = inner.weight
            macs = eff_macs = uses * w.numel()
            stage = _mask_of(module)
            if stage is not None:
                kept = int((stage.mask != 0).sum())
                eff_macs = uses * kept
                eff_params -= w.numel() - kept
                bias_mask = getattr(stage, "bias_mask", None)
                if bias_mask is not None and getattr(inner, "bias", None) is not None:
                    eff_params -= int((bias_mask == 0).sum())
        elif isinstance(inner, _NORMS):
            macs = eff_macs = out.numel()
    return LayerCount(name, type(inner).__name__, params, macs, shape, eff_params, eff_macs)


def _modelled(inner: nn.Module) -> bool:
    return isinstance(inner, (nn.modules.conv._ConvNd, nn.Linear, *_NORMS)) or type(inner).__name__ == "Conv1D"


def count_flops(model: nn.Module, example_inputs: Any) -> FlopsReport:
    """Count parameters and MACs of every leaf layer over one forward of ``example_inputs``.

    Args:
        model: any model, plain, wrapped (masked, quantized) or shrunk.
        example_inputs: a tensor, a tuple of positional inputs, or a dict of keyword inputs.

    Returns a :class:`FlopsReport`; ``print(report)`` shows the table.
    """
    args, kwargs = normalize_inputs(example_inputs)
    leaves = _leaves(model)
    counts: dict[str, LayerCount] = {}

    def hook_for(name: str):
        def hook(module: nn.Module, inputs: Any, output: Any) -> None:
            row = _count(name, module, inputs, output)
            if name in counts:  # called again: MACs add up, the shape is the last call's
                prev = counts[name]
                row = LayerCount(name, row.layer_type, row.params, prev.macs + row.macs, row.output_shape,
                                 row.effective_params, prev.effective_macs + row.effective_macs, prev.calls + 1)
            counts[name] = row
        return hook

    modes = {m: m.training for m in model.modules()}
    handles = [m.register_forward_hook(hook_for(n)) for n, m in leaves.items()]
    try:
        model.eval()
        with torch.no_grad():
            model(*args, **kwargs)
    finally:
        for h in handles:
            h.remove()
        for m, mode in modes.items():
            m.training = mode

    report = FlopsReport(total_params=sum(p.numel() for p in model.parameters()))
    inner_of = {n: m.module if isinstance(m, CompressedLayer) else m for n, m in leaves.items()}
    report.layers = [row for name, row in counts.items() if row.params or isinstance(inner_of[name], _POOLS)]
    unmodelled = [f"{r.name} ({r.layer_type})" for r in report.layers if r.params and not _modelled(inner_of[r.name])]
    if unmodelled:
        report.notes.append("MACs not modelled (counted as 0): " + ", ".join(unmodelled))
    outside = report.total_params - sum(r.params for r in report.layers)
    if outside:
        owners = sorted({n.rsplit(".", 1)[0] if "." in n else n for n, p in model.named_parameters()
                         if not any(n.startswith(r.name + ".") for r in report.layers)})
        report.notes.append(f"{outside:,} parameters outside the counted layers (not called, or used by a parent's "
                            f"own forward): {', '.join(owners[:8])}{' ...' if len(owners) > 8 else ''}")
    return report

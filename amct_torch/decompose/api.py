"""The decomposition pass: plan per layer (eligibility, rank, cost), then replace each chosen layer in place
by an ``nn.Sequential`` of its low-rank factors.

    model, plan = decompose(model, DecomposeConfig(rank_selection="macs", macs_ratio=0.5), x)
    print(plan)                                   # every Conv2d (and Linear with linear=True), rank, params, MACs
    plan.changes()                                # {'conv1': ['conv1.0', 'conv1.1'], ...} (AMCT's format)
    save_decomposition_info(plan, "decompose_info.json")

Eligibility. The spatial split follows AMCT's rule for its conv split: ``groups=1``, ``dilation=1``, stride
below 3 and a kernel above 2 in both dimensions. Tucker-2 needs ``groups=1`` and a kernel larger than 1x1
(a 1x1 conv has no spatial extent to keep in a core). Linear layers (``linear=True``) are decomposed by SVD
unless ``nn.MultiheadAttention`` owns them (it reads their weights directly). Any layer is skipped when its
rank would not save MACs (parameters, without an example input) by at least ``min_saving`` and strictly
save parameters: a decomposition that costs more than the layer is never made.

Rank selection per layer: ``evbmf`` and ``energy`` on the layer's spectrum (the spatial matrix's, the
Linear weight's, or for Tucker-2 each unfolding's: output rank from the mode-0 unfolding, input rank from
mode-1), rounded up to ``rank_multiple``; ``fixed`` (``config.rank`` or the ``ranks=`` mapping, which
overrides any selection for the layers it names).

``macs`` chooses the ranks of all layers that select by it together, so that their MACs (``macs_scope=
'decomposable'``), or the whole model's (``'model'``), come to ``macs_ratio`` of what they were:

1. bisection of one global energy threshold ``e``: every layer takes the smallest rank keeping ``e`` of its
   squared singular values (rounded up to ``rank_multiple``), or stays whole where that rank would not pay;
   the total MACs never decrease as ``e`` grows, so the largest ``e`` within the budget is found exactly;
2. the budget left over (at most about one rank step per layer) is then spent greedily: the rank step with
   the largest gain in kept energy per added MAC that still fits, until none fits.

The result lands at or just below the target (within a rank step of the coarsest layer); the plan's
``target`` says what was reached. A target below what rank 1 everywhere gives is reported as unreachable.
"""

from __future__ import annotations

import copy
import fnmatch
import math
import os
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping, Sequence, Union

import numpy as np
import torch
import torch.nn as nn

from ..analysis.flops import FlopsReport, count_flops
from ..config.base import ConfigError
from ..config.decompose import DecomposeConfig
from ..config.targeting import Targeting
from ..nn import CompressedLayer
from . import factors as F
from .info import save_decomposition_info
from .plan import DecompositionPlan, LayerDecomposition
from .rank import energy_kept, evbmf, round_rank

__all__ = ["decompose", "plan_decomposition", "conv_eligibility", "linear_eligibility"]

Rank = Union[int, tuple[int, int]]


# -- eligibility ----------------------------------------------------------------------------------
def _pair(v: Any) -> tuple[int, int]:
    return (int(v[0]), int(v[1])) if isinstance(v, (tuple, list)) else (int(v), int(v))


def _dims(v: tuple[int, int]) -> str:
    return str(v[0]) if v[0] == v[1] else f"{v[0]}x{v[1]}"


def conv_eligibility(conv: nn.Conv2d, method: str) -> str | None:
    """Why ``conv`` cannot be decomposed by ``method`` (``spatial`` or ``tucker2``), or ``None`` if it can.

    ``spatial`` is AMCT's rule: groups 1, dilation 1, stride below 3, kernel above 2 in both dimensions.
    ``tucker2``: groups 1 and a kernel larger than 1x1.
    """
    why = []
    if conv.groups != 1:
        kind = "depthwise" if conv.groups == conv.in_channels else "grouped"
        why.append(f"groups={conv.groups} ({kind})")
    kernel, stride, dilation = _pair(conv.kernel_size), _pair(conv.stride), _pair(conv.dilation)
    if method == "spatial":
        if dilation != (1, 1):
            why.append(f"dilation {_dims(dilation)}")
        if max(stride) >= 3:
            why.append(f"stride {_dims(stride)}")
        if min(kernel) <= 2:
            why.append(f"kernel {kernel[0]}x{kernel[1]}" + ("" if kernel == (1, 1) else " (both sides must be > 2)"))
    elif method == "tucker2":
        if kernel == (1, 1):
            why.append("kernel 1x1 (no spatial extent for a Tucker-2 core)")
    else:
        raise ValueError(f"method: got {method!r}; allowed: 'spatial', 'tucker2'")
    return "; ".join(why) or None


def linear_eligibility(linear: nn.Linear, parent: nn.Module | None) -> str | None:
    """Why ``linear`` cannot be decomposed, or ``None``."""
    if isinstance(parent, nn.MultiheadAttention):
        return "owned by MultiheadAttention (its forward reads the weight directly)"
    return None


def _common_eligibility(name: str, m: nn.Module, base: type[nn.Module], parent: nn.Module | None,
                        aliases: list[str]) -> str | None:
    if not name:
        return "the model itself is the layer (wrap it in a module to decompose it)"
    if isinstance(parent, CompressedLayer):
        return "inside a compression wrapper (decompose before quantizing, pruning or clustering)"
    if type(m).forward is not base.forward:
        return f"{type(m).__name__} overrides forward (its computation is not the {base.__name__}'s)"
    if isinstance(m, nn.modules.lazy.LazyModuleMixin) and m.has_uninitialized_params():
        return "lazy module not initialised yet (run a forward first)"
    if "weight" not in m._parameters or getattr(m, "parametrizations", None) is not None:
        return "weight computed by a parametrization or hook (make it permanent first)"
    if m._forward_pre_hooks or m._forward_hooks:
        return "has forward hooks, which the factors would not carry (remove them first)"
    if not torch.is_floating_point(m.weight):
        return f"weight dtype {m.weight.dtype} (floating point only)"
    if len(aliases) > 1:
        return f"shared module (also registered as {', '.join(a for a in aliases if a != name)})"
    return None


# -- costs ----------------------------------------------------------------------------------------
def _out_size(n: int, k: int, s: int, p: Any, d: int, axis: int) -> int:
    if p == "same":
        return n
    pad = 0 if p == "valid" else int(p[axis])
    return (n + 2 * pad - d * (k - 1) - 1) // s + 1


def _chain_macs(specs: Sequence[Mapping[str, Any]], in_shape: Sequence[int]) -> int:
    """MACs of a chain of Conv2d/Linear specs for one input of ``in_shape`` (as count_flops counts them)."""
    shape, total = tuple(int(v) for v in in_shape), 0
    for spec in specs:
        a = spec["args"]
        if spec["type"] == "Linear":
            rows = math.prod(shape[:-1])
            total += rows * a["in_features"] * a["out_features"]
            shape = (*shape[:-1], a["out_features"])
        else:
            *lead, _, h, w = shape
            (kh, kw), (sh, sw), (dh, dw) = _pair(a["kernel_size"]), _pair(a["stride"]), _pair(a["dilation"])
            ho, wo = _out_size(h, kh, sh, a["padding"], dh, 0), _out_size(w, kw, sw, a["padding"], dw, 1)
            total += math.prod(lead) * ho * wo * a["out_channels"] * (a["in_channels"] // a["groups"]) * kh * kw
            shape = (*lead, a["out_channels"], ho, wo)
    return total


def _spec_params(spec: Mapping[str, Any]) -> int:
    a = spec["args"]
    if spec["type"] == "Linear":
        return a["in_features"] * a["out_features"] + (a["out_features"] if a["bias"] else 0)
    kh, kw = _pair(a["kernel_size"])
    return a["out_channels"] * (a["in_channels"] // a["groups"]) * kh * kw + (a["out_channels"] if a["bias"] else 0)


# -- per-layer state --------------------------------------------------------------------------------
@dataclass
class _Layer:
    """What the analysis knows about one candidate layer."""

    lp: LayerDecomposition
    module: nn.Module
    cfg: DecomposeConfig | None = None
    explicit: Rank | None = None
    calls: list[tuple[int, ...]] = field(default_factory=list)
    spectrum: np.ndarray | None = None          # spatial / svd singular values
    matrix_shape: tuple[int, int] = (0, 0)
    svd: F.GramSvd | None = None
    s_in: np.ndarray | None = None              # tucker2: mode-1 (input) and mode-0 (output) spectra
    s_out: np.ndarray | None = None
    bases: tuple[torch.Tensor, torch.Tensor] | None = None
    costs: dict[Any, tuple[int, int | None, bool]] = field(default_factory=dict)
    kept: dict[str, np.ndarray] = field(default_factory=dict)

    def curve(self, which: str) -> np.ndarray:
        """Cumulative kept-energy fractions of a spectrum (``s``, ``in`` or ``out``), cached."""
        if which not in self.kept:
            self.kept[which] = energy_kept({"s": self.spectrum, "in": self.s_in, "out": self.s_out}[which])
        return self.kept[which]

    @property
    def method(self) -> str:
        return self.lp.method

    @property
    def macs_known(self) -> bool:
        return self.lp.macs_before is not None

    def full(self) -> Rank:
        if self.method == "spatial":
            return F.spatial_full_rank(self.lp.args)
        if self.method == "tucker2":
            return F.tucker2_full_rank(self.lp.args)
        return F.linear_full_rank(self.lp.args)

    def specs(self, rank: Rank) -> list[dict[str, Any]]:
        return F.factor_args(self.method, self.lp.args, rank)

    def cost(self, rank: Rank) -> tuple[int, int | None, bool]:
        """``(params_after, macs_after, pays)`` of decomposing at ``rank``."""
        key = tuple(rank) if isinstance(rank, (tuple, list)) else rank
        if key not in self.costs:
            specs = self.specs(rank)
            params = sum(_spec_params(s) for s in specs)
            macs = sum(_chain_macs(specs, shape) for shape in self.calls) if self.macs_known else None
            if self.macs_known and self.lp.macs_before:
                pays = macs < self.lp.macs_before and macs <= (1.0 - self.cfg.min_saving) * self.lp.macs_before \
                    and params < self.lp.params_before
            else:
                pays = params < self.lp.params_before and params <= (1.0 - self.cfg.min_saving) * self.lp.params_before
            self.costs[key] = (params, macs, pays)
        return self.costs[key]

    def energy(self, rank: Rank) -> float:
        if self.method == "tucker2":
            r_in, r_out = rank
            return max(0.0, float(self.curve("in")[r_in - 1] + self.curve("out")[r_out - 1] - 1.0))
        return float(self.curve("s")[int(rank) - 1])

    def rank_at_energy(self, e: float) -> Rank:
        m = self.cfg.rank_multiple
        if self.method == "tucker2":
            full_in, full_out = self.full()
            return (round_rank(_rank_for(self.curve("in"), e), m, full_in),
                    round_rank(_rank_for(self.curve("out"), e), m, full_out))
        return round_rank(_rank_for(self.curve("s"), e), m, self.full())

    def next_ranks(self, rank: Rank) -> list[Rank]:
        """The ranks one step (``rank_multiple``) up, per dimension."""
        m = self.cfg.rank_multiple
        if self.method == "tucker2":
            (r_in, r_out), (full_in, full_out) = rank, self.full()
            out = []
            if r_in < full_in:
                out.append((round_rank(r_in + 1, m, full_in), r_out))
            if r_out < full_out:
                out.append((r_in, round_rank(r_out + 1, m, full_out)))
            return out
        return [round_rank(rank + 1, m, self.full())] if rank < self.full() else []

    def budget_cost(self, rank: Rank) -> int:
        """MACs the layer runs at ``rank``: the factors' when that pays, else the layer's own."""
        _, macs, pays = self.cost(rank)
        return macs if pays else self.lp.macs_before

    def budget_energy(self, rank: Rank) -> float:
        return self.energy(rank) if self.cost(rank)[2] else 1.0


def _rank_for(kept: np.ndarray, energy: float) -> int:
    """:func:`~amct_torch.decompose.rank.energy_rank` on a precomputed cumulative curve."""
    return max(1, min(int(np.searchsorted(kept, energy - 1e-12, side="left")) + 1, kept.size))


def _selected(name: str, patterns: Iterable[str]) -> str | None:
    for p in patterns:
        if p == name or fnmatch.fnmatchcase(name, p):
            return p
    return None


def _targeting(config: DecomposeConfig | Targeting | None) -> Targeting:
    if config is None:
        return Targeting(DecomposeConfig())
    if isinstance(config, Targeting):
        for c in [config.default, *config.module_type.values(), *config.module_name.values()]:
            if c is not None and not isinstance(c, DecomposeConfig):
                raise TypeError(f"decompose: the targeting holds {type(c).__name__}; allowed: DecomposeConfig")
        return config
    if isinstance(config, DecomposeConfig):
        return Targeting(config)
    raise TypeError(f"decompose(config=...): got {type(config).__name__}; allowed: DecomposeConfig, a Targeting of "
                    "them, or None (the defaults)")


def _check_rank_value(name: str, value: Any, method: str, full: Rank) -> Rank:
    where = f"ranks[{name!r}]"
    if method == "tucker2":
        pair = (value, value) if isinstance(value, int) and not isinstance(value, bool) else value
        ok = isinstance(pair, (tuple, list)) and len(pair) == 2 and all(
            isinstance(v, int) and not isinstance(v, bool) and 1 <= v <= f for v, f in zip(pair, full))
        if not ok:
            raise ConfigError(where, value, f"(r_in, r_out) with 1 <= r_in <= {full[0]} and 1 <= r_out <= {full[1]} "
                              "(or one int for both) for this Tucker-2")
        return (int(pair[0]), int(pair[1]))
    if not (isinstance(value, int) and not isinstance(value, bool) and 1 <= value <= full):
        what = "spatial split" if method == "spatial" else "SVD"
        raise ConfigError(where, value, f"an int rank 1..{full} (the full rank of this layer's {what})")
    return int(value)


# -- analysis --------------------------------------------------------------------------------------
def _candidates(model: nn.Module) -> list[tuple[str, nn.Module, nn.Module | None, list[str]]]:
    aliases: dict[int, list[str]] = {}
    for name, m in model.named_modules(remove_duplicate=False):
        aliases.setdefault(id(m), []).append(name)
    out, seen = [], set()
    for name, m in model.named_modules():
        if not isinstance(m, (nn.modules.conv._ConvNd, nn.Linear)) or id(m) in seen:
            continue
        seen.add(id(m))
        parent = model.get_submodule(name.rsplit(".", 1)[0]) if "." in name else (model if name else None)
        out.append((name, m, parent, aliases[id(m)]))
    return out


def _collect_shapes(model: nn.Module, layers: dict[str, _Layer], example_inputs: Any) -> FlopsReport:
    """Record each candidate's input shape per call during one ``count_flops`` forward; returns its report."""
    def hook_for(layer: _Layer):
        def hook(module: nn.Module, args: tuple, output: Any) -> None:
            x = args[0] if args else None
            if isinstance(x, torch.Tensor):
                layer.calls.append(tuple(x.shape))
        return hook

    handles = [layer.module.register_forward_hook(hook_for(layer)) for layer in layers.values()]
    try:
        return count_flops(model, example_inputs)
    finally:
        for h in handles:
            h.remove()


def _spectra(layer: _Layer, vectors: bool) -> None:
    w = layer.module.weight.detach().to(torch.float64)
    if layer.method == "tucker2":
        u_out, s_out = F.gram_spectrum(F.unfold(w, 0))
        u_in, s_in = F.gram_spectrum(F.unfold(w, 1))
        rest = w[0, 0].numel()
        layer.s_out = s_out[:min(w.shape[0], w.shape[1] * rest)].cpu().numpy()
        layer.s_in = s_in[:min(w.shape[1], w.shape[0] * rest)].cpu().numpy()
        layer.bases = (u_in, u_out)
        return
    matrix = F.spatial_matrix(w) if layer.method == "spatial" else w
    svd = F.GramSvd.of(matrix, vectors=vectors)
    layer.spectrum = svd.values.cpu().numpy()
    layer.matrix_shape = tuple(matrix.shape)
    if vectors:
        layer.svd = svd


def _pad_spectrum(s: np.ndarray, n: int) -> np.ndarray:
    """Tucker-2 ranks go up to the channel count, which may exceed the unfolding's rank: pad with zeros."""
    return np.concatenate([s, np.zeros(n - len(s))]) if len(s) < n else s


def _select_rank(layer: _Layer) -> tuple[Rank, str]:
    """The rank of a layer not in the MACs pool, and how it was chosen."""
    cfg, full = layer.cfg, layer.full()
    if layer.explicit is not None:
        return layer.explicit, "fixed (ranks=)"
    if cfg.rank_selection == "fixed":
        if layer.method == "tucker2":
            want = _pair(cfg.rank)
            rank = (min(want[0], full[0]), min(want[1], full[1]))
        else:
            if isinstance(cfg.rank, tuple):
                raise ConfigError(f"{layer.lp.name}: DecomposeConfig.rank", cfg.rank, f"one int for the "
                                  f"{'SVD of a Linear' if layer.method == 'svd' else 'spatial split'}")
            want, rank = cfg.rank, min(cfg.rank, full)
        capped = " (capped at the full rank)" if rank != want else ""
        return rank, f"fixed{capped}"
    m = cfg.rank_multiple
    suffix = f" (x{m})" if m > 1 else ""
    if cfg.rank_selection == "evbmf":
        if layer.method == "tucker2":
            w = layer.module.weight
            rest = w[0, 0].numel()
            shape_out, shape_in = (w.shape[0], w.shape[1] * rest), (w.shape[1], w.shape[0] * rest)
            r_out = evbmf(layer.s_out[:min(shape_out)], shape_out).rank
            r_in = evbmf(layer.s_in[:min(shape_in)], shape_in).rank
            rank = (round_rank(r_in, m, full[0]), round_rank(r_out, m, full[1]))
            return rank, f"evbmf {r_in},{r_out} -> {rank[0]},{rank[1]}{suffix}"
        r = evbmf(layer.spectrum, layer.matrix_shape).rank
        rank = round_rank(r, m, full)
        return rank, f"evbmf {r} -> {rank}{suffix}"
    if cfg.rank_selection == "energy":
        return layer.rank_at_energy(cfg.energy), f"energy {cfg.energy:g}{suffix}"
    raise AssertionError(cfg.rank_selection)


def _solve_macs(pool: list[_Layer], budget: float) -> tuple[dict[str, Rank], float, bool]:
    """Ranks for the pool meeting ``budget`` MACs: bisection of one energy threshold, then a greedy top-up.
    Returns ``(ranks, energy threshold, reachable)``."""
    def total(e: float) -> int:
        return sum(layer.budget_cost(layer.rank_at_energy(e)) for layer in pool)

    reachable = True
    if total(1.0) <= budget:
        e_star = 1.0
    elif total(0.0) > budget:
        e_star, reachable = 0.0, False
    else:
        lo, hi = 0.0, 1.0
        for _ in range(60):
            mid = 0.5 * (lo + hi)
            if total(mid) <= budget:
                lo = mid
            else:
                hi = mid
        e_star = lo
    ranks = {layer.lp.name: layer.rank_at_energy(e_star) for layer in pool}
    if not reachable:
        return ranks, e_star, reachable
    left = budget - total(e_star)
    by_name = {layer.lp.name: layer for layer in pool}
    while True:
        best = None
        for name, layer in by_name.items():
            cur = ranks[name]
            cost, gain = layer.budget_cost(cur), layer.budget_energy(cur)
            for nxt in layer.next_ranks(cur):
                d_cost = layer.budget_cost(nxt) - cost
                d_gain = layer.budget_energy(nxt) - gain
                if d_cost > left or d_gain <= 0:
                    continue
                score = math.inf if d_cost <= 0 else d_gain / d_cost
                if best is None or score > best[0]:
                    best = (score, name, nxt, d_cost)
        if best is None:
            break
        _, name, nxt, d_cost = best
        ranks[name] = nxt
        left -= d_cost
    return ranks, e_star, reachable


def _macs_target(plan: DecompositionPlan, active: dict[str, _Layer], pool: list[_Layer],
                 chosen: dict[str, tuple[Rank, str]], ratio: float, scope: str) -> dict[str, tuple[Rank, str]]:
    """Ranks of the layers selecting by the MACs target (see the module docstring); records ``plan.target``.
    ``chosen``: the other layers' ranks, decided first (their savings count toward a model-wide target)."""
    out: dict[str, tuple[Rank, str]] = {}
    counted = [layer for layer in pool if layer.lp.macs_before]
    pool_before = sum(layer.lp.macs_before for layer in counted)
    others_saving = 0  # what the layers outside the pool save (they are decided first)
    for name, (rank, _) in chosen.items():
        layer = active[name]
        _, macs, pays = layer.cost(rank)
        if pays and layer.lp.macs_before:
            others_saving += layer.lp.macs_before - macs
    if scope == "decomposable":
        base, budget = pool_before, ratio * pool_before
    else:
        base = plan.model_macs
        budget = ratio * base - (base - pool_before - others_saving)
    pool_ranks, e_star, reachable = _solve_macs(counted, budget)
    for layer in pool:
        rank = pool_ranks.get(layer.lp.name, layer.rank_at_energy(e_star))
        m = layer.cfg.rank_multiple
        out[layer.lp.name] = (rank, f"macs{f' (x{m})' if m > 1 else ''}")
    reached_pool = sum(layer.budget_cost(pool_ranks[layer.lp.name]) for layer in counted)
    reached = reached_pool if scope == "decomposable" else base - (pool_before - reached_pool) - others_saving
    plan.target = {"ratio": ratio, "scope": "decomposable layers'" if scope == "decomposable" else "model's",
                   "base": int(base), "budget": float(ratio * base), "reached": int(reached),
                   "reached_ratio": (reached / base) if base else 1.0, "energy_threshold": e_star,
                   "reachable": reachable}
    if not reachable:
        plan.warnings.append(f"MACs target {ratio:g} of the {plan.target['scope']} MACs is not reachable: "
                             f"rank 1 (x{pool[0].cfg.rank_multiple}) everywhere keeps {reached / base:.3f}")
    return out


def _fmt_rank(rank: Rank) -> int | list[int]:
    return [int(rank[0]), int(rank[1])] if isinstance(rank, (tuple, list)) else int(rank)


def _why_not_paying(layer: _Layer, rank: Rank) -> str:
    params, macs, _ = layer.cost(rank)
    lp = layer.lp
    if layer.macs_known and lp.macs_before:
        what = f"MACs {lp.macs_before:,} -> {macs:,}"
    else:
        what = f"params {lp.params_before:,} -> {params:,}"
    shown = f"{rank[0]},{rank[1]}" if isinstance(rank, tuple) else str(rank)
    text = f"rank {shown} would not pay ({what}"
    if layer.cfg.min_saving > 0:
        text += f"; min_saving {layer.cfg.min_saving:g}"
    if not isinstance(rank, tuple):
        lo, hi = 0, int(rank)  # largest paying rank, by bisection (cost grows with the rank)
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if layer.cost(mid)[2]:
                lo = mid
            else:
                hi = mid - 1
        text += f"; pays up to rank {lo}" if lo else "; no rank pays"
    return text + ")"


def _analyse(model: nn.Module, config: DecomposeConfig | Targeting | None, example_inputs: Any,
             ranks: Mapping[str, Rank] | None, layers: Iterable[str] | None, skip: Iterable[str],
             vectors: bool) -> tuple[DecompositionPlan, dict[str, _Layer]]:
    targeting = _targeting(config)
    if isinstance(skip, str) or isinstance(layers, str):
        raise TypeError("decompose: skip= and layers= take a list of module names or globs, not one string")
    skip, selection = tuple(skip), None if layers is None else tuple(layers)
    plan = DecompositionPlan(config=targeting.to_dict() if isinstance(config, Targeting) else
                             (config or DecomposeConfig()).to_dict(),
                             model_params=sum(p.numel() for p in model.parameters()))
    found = _candidates(model)
    known = {name for name, m, _, _ in found if isinstance(m, (nn.Conv2d, nn.Linear))}
    for name in (ranks or {}):
        if name not in known:
            shown = ", ".join(sorted(known)[:12]) + (" ..." if len(known) > 12 else "")
            raise ConfigError(f"ranks[{name!r}]", ranks[name], f"a Conv2d/Linear module path of the model: {shown}")

    active: dict[str, _Layer] = {}
    for name, m, parent, aliases in found:
        lp = LayerDecomposition(name, type(m).__name__, "", "skip",
                                params_before=sum(p.numel() for p in m.parameters(recurse=False)))
        lp.params_after = lp.params_before
        plan.layers.append(lp)
        if not isinstance(m, (nn.Conv2d, nn.Linear)):
            lp.action, lp.reason = "ineligible", f"{type(m).__name__} is not supported (Conv2d and Linear only)"
            continue
        hit = _selected(name, skip)
        if hit is not None:
            lp.reason = f"in skip list ({hit!r})"
            continue
        if selection is not None and _selected(name, selection) is None:
            lp.reason = "not selected (layers=...)"
            continue
        res = targeting.resolve(name, m)
        lp.source = res.source
        cfg = res.config
        if cfg is None:
            lp.reason = f"left alone by {res.source}"
            continue
        is_conv = isinstance(m, nn.Conv2d)
        if not is_conv and not cfg.linear:
            lp.reason = "Linear layers are left alone unless DecomposeConfig(linear=True)"
            continue
        lp.method = cfg.conv_method if is_conv else "svd"
        lp.args = F.layer_args(m)
        why = _common_eligibility(name, m, nn.Conv2d if is_conv else nn.Linear, parent, aliases)
        if why is None:
            why = conv_eligibility(m, lp.method) if is_conv else linear_eligibility(m, parent)
        if why is not None:
            lp.action, lp.reason = "ineligible", why
            continue
        layer = _Layer(lp, m, cfg)
        layer.lp.full_rank = _fmt_rank(layer.full())
        if ranks and name in ranks:
            layer.explicit = _check_rank_value(name, ranks[name], lp.method, layer.full())
        active[name] = layer
    for name in (ranks or {}):
        if name not in active:
            plan.warnings.append(f"ranks[{name!r}] given, but the layer is not decomposed: {plan[name].reason}")
    for entry in targeting.unused_entries([n for n, *_ in found], [m for _, m, *_ in found]):
        plan.warnings.append(f"targeting entry {entry} matched no Conv2d/Linear layer")

    pool = [layer for layer in active.values() if layer.explicit is None and layer.cfg.rank_selection == "macs"]
    settings = {(layer.cfg.macs_ratio, layer.cfg.macs_scope) for layer in pool}
    if pool and example_inputs is None:
        raise ValueError("decompose: rank_selection='macs' needs example_inputs (MACs depend on the input size)")
    if len(settings) > 1:
        raise ConfigError("DecomposeConfig.macs_ratio/macs_scope", sorted(settings),
                          "one (macs_ratio, macs_scope) for all layers with rank_selection='macs' (one budget)")
    if example_inputs is not None:
        report = _collect_shapes(model, active, example_inputs)
        plan.model_macs = report.total_macs
        counted_macs = {r.name: r.macs for r in report.layers}
        for lp in plan.layers:  # layers not analysed keep their MACs as count_flops counts them
            if lp.name not in active:
                lp.macs_before = lp.macs_after = counted_macs.get(lp.name, 0)
    for name, layer in active.items():
        lp = layer.lp
        if example_inputs is not None:
            lp.macs_before = sum(_chain_macs([{"type": lp.layer_type, "args": lp.args}], s) for s in layer.calls)
            if not layer.calls:
                plan.warnings.append(f"{name} was not called by the example input: its MACs count as 0")
        _spectra(layer, vectors)
        if layer.method == "tucker2":
            layer.s_in = _pad_spectrum(layer.s_in, layer.full()[0])
            layer.s_out = _pad_spectrum(layer.s_out, layer.full()[1])

    chosen: dict[str, tuple[Rank, str]] = {}
    for name, layer in active.items():
        if not any(layer is p for p in pool):
            chosen[name] = _select_rank(layer)
    if pool:
        chosen.update(_macs_target(plan, active, pool, chosen, *settings.pop()))

    for name, layer in active.items():
        rank, how = chosen[name]
        lp = layer.lp
        lp.rank, lp.selection = _fmt_rank(rank), how
        lp.energy = layer.energy(rank)
        params, macs, pays = layer.cost(rank)
        if not pays:
            lp.action, lp.reason = "skip", _why_not_paying(layer, rank)
            lp.macs_after = lp.macs_before
            continue
        lp.action = "decompose"
        if "capped" in how:
            lp.reason = "rank capped at the full rank"
        lp.params_after, lp.macs_after = params, macs
        lp.factors = [{"name": f"{name}.{i}", **spec} for i, spec in enumerate(layer.specs(rank))]
    for lp in plan.layers:
        if lp.action != "decompose" and lp.macs_after is None:
            lp.macs_after = lp.macs_before
    return plan, active


# -- public passes ---------------------------------------------------------------------------------
def plan_decomposition(model: nn.Module, config: DecomposeConfig | Targeting | None = None,
                       example_inputs: Any = None, *, ranks: Mapping[str, Rank] | None = None,
                       layers: Iterable[str] | None = None, skip: Iterable[str] = ()) -> DecompositionPlan:
    """What :func:`decompose` would do, without changing anything (see :class:`DecompositionPlan`).

    Same arguments as :func:`decompose`. Without ``example_inputs`` MACs are not counted and savings are
    judged by parameters (``rank_selection='macs'`` then needs inputs).
    """
    plan, _ = _analyse(model, config, example_inputs, ranks, layers, skip, vectors=False)
    return plan


def decompose(model: nn.Module, config: DecomposeConfig | Targeting | None = None, example_inputs: Any = None, *,
              ranks: Mapping[str, Rank] | None = None, layers: Iterable[str] | None = None, skip: Iterable[str] = (),
              inplace: bool = False, info_path: str | os.PathLike | None = None,
              verbose: bool = False) -> tuple[nn.Module, DecompositionPlan]:
    """Replace every chosen Conv2d (and Linear) by an ``nn.Sequential`` of its low-rank factors.

    Args:
        model: a float model (decompose before quantizing, pruning or clustering).
        config: a :class:`~amct_torch.config.decompose.DecomposeConfig` for every layer, or a
            :class:`~amct_torch.config.Targeting` of them (``None`` for a layer leaves it alone). Default:
            AMCT's choice, the spatial split with EVBMF ranks.
        example_inputs: an input for counting MACs per layer (a tensor, a tuple of positional inputs, or a
            dict of keyword inputs); without it savings are judged by parameters.
        ranks: explicit ranks per module path (``int``; ``(r_in, r_out)`` or an int for Tucker-2), overriding
            the selection for those layers.
        layers: only these module paths or globs are considered; skip: these are left alone.
        inplace: modify ``model`` itself (as AMCT does); otherwise a deep copy is decomposed.
        info_path: also write the decomposition info JSON here (atomically), before the model is changed:
            if writing fails, nothing was decomposed.
        verbose: print the plan.

    Returns ``(model, plan)``. The factors are ``<name>.0``, ``<name>.1`` (``<name>.2`` for Tucker-2), plain
    ``nn.Conv2d`` / ``nn.Linear`` layers in the layer's dtype, device and training mode, so the model fine-tunes,
    quantizes (a BatchNorm after the layer folds into the last factor) and exports as usual.
    ``plan.changes()`` is AMCT's changes dict; ``plan.info()`` rebuilds the structure on a fresh model
    (:func:`~amct_torch.decompose.apply_decomposition_info`).
    """
    if not inplace:
        model = copy.deepcopy(model)
    plan, active = _analyse(model, config, example_inputs, ranks, layers, skip, vectors=True)
    if info_path is not None:
        save_decomposition_info(plan, info_path)
    replacements = {}
    for lp in plan.layers:
        if not lp.decomposed:
            continue
        layer = active[lp.name]
        if lp.method == "spatial":
            seq = F.spatial_svd(layer.module, int(lp.rank), svd=layer.svd)
        elif lp.method == "tucker2":
            seq = F.tucker2(layer.module, tuple(lp.rank), hooi_iterations=layer.cfg.hooi_iterations, bases=layer.bases)
        else:
            seq = F.linear_svd(layer.module, int(lp.rank), svd=layer.svd)
        replacements[lp.name] = seq
        layer.svd = layer.bases = None  # free the float64 factors as we go
    for name, seq in replacements.items():
        model.set_submodule(name, seq)
    if verbose:
        print(plan)
    return model, plan

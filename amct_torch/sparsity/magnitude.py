"""Unstructured magnitude (level) pruning with schedules, and lottery-ticket rewinding.

    model = prune_magnitude(model, MagnitudeConfig(sparsity=0.8, schedule="agp", end=3000, frequency=100), x)
    scheduler = MagnitudeScheduler(model)
    for x, y in loader:
        loss(model(x), y).backward(); optimizer.step(); optimizer.zero_grad()
        scheduler.step()                         # masks follow the schedule: 0 -> 0.8 over 3000 steps

``prune_magnitude`` wraps every targeted layer and puts a :class:`~amct_torch.sparsity.masks.MaskStage`
first in its weight pipeline (the mask is a buffer: it checkpoints with the model), then applies the
schedule's value at position 0. A layer's config is kept on the wrapper (``layer.magnitude_config``), so
a :class:`MagnitudeScheduler` can be built on any prepared model, a freshly prepared one included.

Ranking: the ``k = round(s * numel)`` smallest ``|w * mask|`` are pruned, per layer (``scope="layer"``) or
over all layers that share a config (``scope="global"``, one threshold). Already pruned weights score 0,
so they stay pruned: sparsity only ever rises (a mask is recomputed only when the schedule asks for more
zeros than it has), and the weights a mask hides keep their values.

Lottery ticket: ``MagnitudeConfig(rewind=k)`` records the weights at position ``k`` (``0``: at the
scheduler's creation, right after prepare); ``scheduler.rewind()`` writes them back, masks kept. Iterative
pruning is prune, train, rewind, repeat, with :func:`~amct_torch.sparsity.schedules.iterative_sparsities`::

    model = prune_magnitude(model, MagnitudeConfig(sparsity=0.0, schedule="oneshot", rewind=0), x)
    scheduler = MagnitudeScheduler(model)
    for s in iterative_sparsities(0.9, rounds=5):
        train(model); scheduler.prune_to(s); scheduler.rewind()
"""

from __future__ import annotations

import copy
from typing import Any, Callable

import torch
import torch.nn as nn

from ..config import Config, MagnitudeConfig, Targeting
from ..graph import LayerPlan, capture, swap_layers
from ..graph.plan import render_table
from ..nn import CompressedLayer
from .masks import MaskStage, mask_stage, refuse_after_clustering
from .schedules import Schedule

__all__ = ["prune_magnitude", "MagnitudeScheduler", "magnitude_mask", "global_magnitude_masks", "magnitude_layers"]


# -- masks ---------------------------------------------------------------------------------------
def _count(sparsity: float, numel: int) -> int:
    return min(numel, int(round(sparsity * numel)))


def _keep_mask(scores: torch.Tensor, k: int) -> torch.Tensor:
    """1 everywhere except the ``k`` smallest scores (ties: the first in memory order go first).

    A selection (``kthvalue``), not a sort: the threshold ``v`` is the k-th smallest score; everything below
    it goes, and as many of the scores equal to ``v`` as are still needed."""
    flat = scores.flatten()
    keep = torch.ones_like(flat)
    if k >= flat.numel():
        return torch.zeros_like(scores)
    if k > 0:
        v = flat.kthvalue(k).values
        below = flat < v
        keep[below] = 0
        need = k - int(below.sum())
        keep[(flat == v).nonzero().flatten()[:need]] = 0
    return keep.view_as(scores)


def magnitude_mask(weight: torch.Tensor, sparsity: float, mask: torch.Tensor | None = None) -> torch.Tensor:
    """0/1 mask (float) pruning the ``round(sparsity * numel)`` smallest ``|weight * mask|``."""
    scores = weight.detach().float().abs()
    if mask is not None:
        scores = scores * mask.to(scores.dtype)
    return _keep_mask(scores, _count(sparsity, weight.numel()))


def global_magnitude_masks(weights: dict[str, torch.Tensor], sparsity: float,
                           masks: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """Masks pruning the ``round(sparsity * total)`` smallest ``|w * mask|`` over all ``weights`` together."""
    if not weights:
        return {}
    device = next(iter(weights.values())).device
    scores = []
    for name, w in weights.items():
        s = w.detach().float().abs().to(device)
        if masks is not None and name in masks:
            s = s * masks[name].to(s)
        scores.append(s.flatten())
    flat = torch.cat(scores)
    keep = _keep_mask(flat, _count(sparsity, flat.numel()))
    out, i = {}, 0
    for name, w in weights.items():
        out[name] = keep[i:i + w.numel()].view_as(w).to(w.device)
        i += w.numel()
    return out


# -- the pass ------------------------------------------------------------------------------------
def _one_mask(title: str, name: str, layer: CompressedLayer) -> None:
    refuse_after_clustering(title, name, layer)
    stage = mask_stage(layer)
    if stage is not None:
        raise ValueError(f"{title}: layer {name!r} already has a {stage.kind} mask; one mask per layer "
                         "(skip it in the targeting, or start from the unmasked model)")


def sparsity_pass(model: nn.Module, targeting: Targeting, example_inputs: Any, attach: Callable, *, title: str,
                  inplace: bool, guard: Callable[[str, str, CompressedLayer], None] = _one_mask,
                  weightless_reason: str = "no weight to prune", plan_attr: str = "amct_prune_plan") -> nn.Module:
    """Shared by the weight-stage passes (pruning, clustering): copy, capture, swap with ``attach`` (reusing
    existing wrappers) after ``guard(title, name, layer)`` (raises when the layer cannot take the stage),
    and leave weightless layers (average pooling) unwrapped, reported with ``weightless_reason``. The plan
    is kept as ``model.<plan_attr>``."""
    if not inplace:
        model = copy.deepcopy(model)
    graph = capture(model, example_inputs)
    weightless: set[str] = set()

    def guarded(name: str, layer: CompressedLayer, cfg: Config) -> None:
        if not layer.has_weight:
            weightless.add(name)
            return
        guard(title, name, layer)
        attach(name, layer, cfg)

    model, plan = swap_layers(model, targeting, graph=graph, attach=guarded, inplace=True, title=title, reuse_wrapped=True)
    for i, lp in enumerate(plan.layers):
        if lp.name in weightless and lp.action == "wrap":
            if not lp.detail.endswith("(on the existing wrapper)"):
                model.set_submodule(lp.name, model.get_submodule(lp.name).module)
            plan.layers[i] = LayerPlan(lp.name, lp.layer_type, "skip", weightless_reason, lp.source)
    setattr(model, plan_attr, plan)
    return model


def prune_magnitude(model: nn.Module, config: MagnitudeConfig | Targeting | None = None, example_inputs: Any = None,
                    *, inplace: bool = False, verbose: bool = False) -> nn.Module:
    """Prepare ``model`` for magnitude pruning; returns the prepared copy, masks at the schedule's position 0.

    Args:
        model: the model to prune (usually trained).
        config: one :class:`MagnitudeConfig` for every layer with a weight, or a :class:`Targeting` of them.
        example_inputs: inputs for graph capture (reused and unused layers are detected from it).
        inplace: modify ``model`` itself.
        verbose: print the plan.

    ``model.amct_prune_plan`` lists every layer and what it got. Drive the schedule with
    ``MagnitudeScheduler(model).step()`` (or ``.on_epoch(epoch)`` with ``unit="epoch"``).
    """
    config = MagnitudeConfig() if config is None else config
    targeting = config if isinstance(config, Targeting) else Targeting(config)

    def attach(name: str, layer: CompressedLayer, cfg: Config) -> None:
        if not isinstance(cfg, MagnitudeConfig):
            raise TypeError(f"prune_magnitude: layer {name!r} got {type(cfg).__name__}; allowed: MagnitudeConfig")
        layer.weight_pipeline.insert(0, MaskStage(layer.module.weight, "unstructured"))
        layer.magnitude_config = cfg

    model = sparsity_pass(model, targeting, example_inputs, attach, title="prune_magnitude", inplace=inplace)
    MagnitudeScheduler(model)  # applies position 0 (oneshot at start=0, or initial_sparsity)
    if verbose:
        print(model.amct_prune_plan)
    return model


def magnitude_layers(model: nn.Module) -> dict[str, CompressedLayer]:
    """Every wrapper that :func:`prune_magnitude` prepared, by module path."""
    return {name: m for name, m in model.named_modules()
            if isinstance(getattr(m, "magnitude_config", None), MagnitudeConfig) and mask_stage(m) is not None}


# -- the scheduler -------------------------------------------------------------------------------
class _Group:
    """Layers ranked together: one layer (``scope="layer"``), or all layers sharing a global config."""

    def __init__(self, names: list[str], config: MagnitudeConfig):
        self.names, self.config, self.schedule = names, config, Schedule.from_config(config)
        self.last: float | None = None  # the last scheduled value applied (a cache, not state)


class MagnitudeScheduler:
    """Moves the masks of a :func:`prune_magnitude` model along their schedules.

    Call :meth:`step` after every optimizer step (``unit="step"``) and/or :meth:`on_epoch` at the start of
    every epoch (``unit="epoch"``). A mask is recomputed when the schedule asks for more zeros than it has.
    :meth:`state_dict` holds the position and any recorded rewind weights (the masks are in the model's
    own ``state_dict``), so a run resumes with ``model.load_state_dict`` + ``scheduler.load_state_dict``.
    """

    def __init__(self, model: nn.Module):
        self.model = model
        self.layers = magnitude_layers(model)
        if not self.layers:
            raise ValueError("MagnitudeScheduler: the model has no magnitude-pruned layers; prepare it with "
                             "prune_magnitude(model, MagnitudeConfig(...), x) first")
        self.groups: list[_Group] = []
        pools: dict[MagnitudeConfig, list[str]] = {}
        for name, layer in self.layers.items():
            cfg = layer.magnitude_config
            if cfg.scope == "global":
                pools.setdefault(cfg, []).append(name)
            else:
                self.groups.append(_Group([name], cfg))
        self.groups += [_Group(names, cfg) for cfg, names in pools.items()]
        self.position = {"step": 0, "epoch": 0}
        self._rewind: dict[str, torch.Tensor] = {}
        self._update("step")
        self._update("epoch")

    # -- driving -----------------------------------------------------------------------------
    def step(self, step: int | None = None) -> None:
        """Advance the step position by one (or set it to ``step``) and apply ``unit="step"`` schedules."""
        self.position["step"] = self.position["step"] + 1 if step is None else int(step)
        self._update("step")

    def on_epoch(self, epoch: int) -> None:
        """Set the epoch position (0-based; call at the start of each epoch) and apply ``unit="epoch"`` schedules."""
        self.position["epoch"] = int(epoch)
        self._update("epoch")

    def target(self, name: str) -> float:
        """The scheduled sparsity of layer ``name`` at the current position."""
        for g in self.groups:
            if name in g.names:
                return g.schedule(self.position[g.config.unit])
        raise KeyError(f"no magnitude-pruned layer {name!r}; layers: {', '.join(self.layers)}")

    @torch.no_grad()
    def prune_to(self, sparsity: float) -> None:
        """Raise every group to ``sparsity`` now (iterative pruning); layers already sparser are left alone."""
        if not 0.0 <= sparsity < 1.0:
            raise ValueError(f"MagnitudeScheduler.prune_to(sparsity=...): got {sparsity!r}; allowed: 0 <= sparsity < 1")
        for g in self.groups:
            self._apply(g, sparsity)

    @torch.no_grad()
    def rewind(self) -> None:
        """Write the recorded weights back into every layer configured with ``rewind``; masks are kept."""
        configured = {n: l.magnitude_config for n, l in self.layers.items() if l.magnitude_config.rewind is not None}
        if not configured:
            raise ValueError("MagnitudeScheduler.rewind: no layer records rewind weights; set MagnitudeConfig(rewind=0) "
                             "(the weights at prepare) or rewind=k (at step/epoch k)")
        missing = [n for n in configured if n not in self._rewind]
        if missing:
            cfg = configured[missing[0]]
            raise ValueError(f"MagnitudeScheduler.rewind: layer {missing[0]!r} records its weights at {cfg.unit} "
                             f"{cfg.rewind}; the scheduler is at {cfg.unit} {self.position[cfg.unit]}")
        for name, w in self._rewind.items():
            self.layers[name].module.weight.copy_(w)

    @torch.no_grad()
    def _update(self, unit: str) -> None:
        t = self.position[unit]
        for name, layer in self.layers.items():
            r = layer.magnitude_config.rewind
            if layer.magnitude_config.unit == unit and r is not None and t >= r and name not in self._rewind:
                self._rewind[name] = layer.module.weight.detach().clone()
        for g in self.groups:
            if g.config.unit == unit and g.schedule(t) != g.last:  # the schedule is flat between update points
                g.last = g.schedule(t)
                self._apply(g, g.last)

    def _apply(self, group: _Group, sparsity: float) -> None:
        stages = {n: mask_stage(self.layers[n]) for n in group.names}
        numel = sum(s.mask.numel() for s in stages.values())
        zeros = sum(int((s.mask == 0).sum()) for s in stages.values())
        if _count(sparsity, numel) <= zeros:  # never lower the sparsity; nothing to do at the same level
            return
        weights = {n: self.layers[n].module.weight for n in group.names}
        if len(group.names) == 1:
            (n,) = group.names
            masks = {n: magnitude_mask(weights[n], sparsity, stages[n].mask)}
        else:
            masks = global_magnitude_masks(weights, sparsity, {n: s.mask for n, s in stages.items()})
        for n, m in masks.items():
            stages[n].set_mask(m)

    # -- checkpoints -------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Position and recorded rewind weights (the masks live in the model's ``state_dict``)."""
        return {"step": self.position["step"], "epoch": self.position["epoch"],
                "rewind": {n: w.clone() for n, w in self._rewind.items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        known = {"step", "epoch", "rewind"}
        unknown = sorted(set(state) - known)
        if unknown:
            raise KeyError(f"MagnitudeScheduler.load_state_dict: unknown key {unknown[0]!r}; known keys: {', '.join(sorted(known))}")
        rewind = dict(state.get("rewind") or {})
        for name, w in rewind.items():
            if name not in self.layers:
                raise KeyError(f"MagnitudeScheduler.load_state_dict: rewind weights for {name!r}, which is not a "
                               f"magnitude-pruned layer of this model; layers: {', '.join(self.layers)}")
            if tuple(w.shape) != tuple(self.layers[name].module.weight.shape):
                raise ValueError(f"MagnitudeScheduler.load_state_dict: rewind weights of {name!r} have shape "
                                 f"{tuple(w.shape)}; the layer's weight is {tuple(self.layers[name].module.weight.shape)}")
        self.position = {"step": int(state.get("step", 0)), "epoch": int(state.get("epoch", 0))}
        self._rewind = {n: w.detach().clone().to(self.layers[n].module.weight) for n, w in rewind.items()}
        for g in self.groups:
            g.last = None
        self._update("step")  # a no-op when the model's masks were loaded too
        self._update("epoch")

    # -- reports -----------------------------------------------------------------------------
    def report(self) -> str:
        """A table: every layer, its schedule, the scheduled and the actual sparsity of its mask."""
        rows = []
        for g in self.groups:
            for n in g.names:
                actual = mask_stage(self.layers[n]).sparsity()
                rows.append((n, g.config.short(), f"{g.schedule(self.position[g.config.unit]):.4f}", f"{actual:.4f}"))
        head = f"magnitude pruning at step {self.position['step']}, epoch {self.position['epoch']}"
        return head + "\n" + render_table(["layer", "config", "scheduled", "actual"], rows)

    def __repr__(self) -> str:
        return (f"MagnitudeScheduler(layers={len(self.layers)}, groups={len(self.groups)}, "
                f"step={self.position['step']}, epoch={self.position['epoch']})")

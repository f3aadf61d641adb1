"""Weight clustering as a graph pass, and the checks that collaborative optimization preserves what it made.

    model = cluster_weights(model, ClusterConfig(clusters=16), x)     # (pruned or not) -> clustered
    train(model)                                                      # centroids fine-tune, zeros stay zero
    qat = prepare_qat(model, QatConfig(), x)                          # CQAT / PCQAT: the quantizer acts on centroids
    train(qat); check_preservation(qat).raise_if_broken()

``cluster_weights`` folds every Conv+BatchNorm pair first (as deployment does): a per-channel BN factor
applied after clustering would multiply one codebook into one per channel, so clusters are made on the
weights that will be deployed. The cluster stage goes after any mask stage (sparsity-preserving clustering
reads the masked weight) and before quantization; clustering a model that is already quantized is refused.

Quantizing a clustered layer keeps its number of unique values when the quantizer's granularity is no finer
than the clustering's: ``prepare_qat``/``quantize`` quantize a layer clustered per tensor per tensor (the plan
says so), since per-channel scales would map one centroid to up to one value per channel.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn as nn

from ..config import ClusterConfig, Config, Granularity, PerTensor, Targeting
from ..graph import fold_batch_norm
from ..graph.plan import render_table
from ..nn import CompressedLayer, FoldedBatchNorm
from ..quant.formulas import channel_major
from ..sparsity.magnitude import sparsity_pass
from ..sparsity.masks import MaskStage
from .stage import ClusterStage, cluster_stage

__all__ = ["cluster_weights", "activate_clusters", "clustered_layers", "reassign_clusters", "quant_granularity_for",
           "PreservationReport", "check_preservation", "strip_clustering"]


def _pre_quant_index(layer: CompressedLayer) -> int:
    """Where a pre-quantization stage goes: after the mask stages, before anything else."""
    i = 0
    for stage in layer.weight_pipeline:
        if not isinstance(stage, MaskStage):
            break
        i += 1
    return i


def _guard(title: str, name: str, layer: CompressedLayer) -> None:
    if cluster_stage(layer) is not None:
        raise ValueError(f"{title}: layer {name!r} is already clustered; strip_clustering(model) first, or skip it "
                         "in the targeting")
    others = [type(s).__name__ for s in layer.weight_pipeline if not isinstance(s, MaskStage)]
    if others:
        raise ValueError(f"{title}: layer {name!r} already has {', '.join(others)} in its weight pipeline; cluster "
                         "before quantization (mask -> cluster -> fake-quant): cluster the float (or pruned) model, "
                         "then prepare_qat/quantize the clustered one")


def cluster_weights(model: nn.Module, config: ClusterConfig | Targeting | None = None, example_inputs: Any = None, *,
                    defer: bool = False, inplace: bool = False, verbose: bool = False) -> nn.Module:
    """Cluster the weights of every targeted layer; returns the clustered copy (k-means runs now).

    Args:
        model: the float model, pruned or not (masks stay first in each pipeline).
        config: one :class:`ClusterConfig` for every layer with a weight, or a :class:`Targeting` of them
            (``None`` for a layer leaves it unclustered).
        example_inputs: inputs for graph capture and BatchNorm folding.
        defer: create the stages (parameters and buffers, so an optimizer and a checkpoint see them) but
            cluster later, with :func:`activate_clusters` (a scheduled start); until then they are the identity.
        inplace: modify ``model`` itself.
        verbose: print the plan (``model.amct_cluster_plan``).

    Every Conv+BatchNorm pair is folded first (see the module docstring). Fine-tune the result as usual:
    the centroids are parameters (an optimizer built afterwards sees them).
    """
    config = ClusterConfig() if config is None else config
    targeting = config if isinstance(config, Targeting) else Targeting(config)
    if any(isinstance(m, FoldedBatchNorm) for m in model.modules()):
        raise ValueError("cluster_weights: the model is prepared for QAT (its BatchNorms train folded); cluster "
                         "before quantization-aware training, then prepare_qat the clustered model")
    was_training = model.training
    model, _ = fold_batch_norm(model.eval() if inplace else copy.deepcopy(model).eval(), example_inputs, inplace=True)

    def attach(name: str, layer: CompressedLayer, cfg: Config) -> None:
        if not isinstance(cfg, ClusterConfig):
            raise TypeError(f"cluster_weights: layer {name!r} got {type(cfg).__name__}; allowed: ClusterConfig")
        i = _pre_quant_index(layer)
        with torch.no_grad():
            w = layer.weight_pipeline.input_of(i, layer.module.weight)
        groups = getattr(layer.module, "groups", 1) if layer.weight_channel_axis == 1 else 1
        layer.weight_pipeline.insert(i, ClusterStage(w, cfg, layer.weight_channel_axis, groups, cluster_now=not defer))

    model = sparsity_pass(model, targeting, example_inputs, attach, title="cluster_weights", inplace=True,
                          guard=_guard, weightless_reason="no weight to cluster", plan_attr="amct_cluster_plan")
    model.train(was_training)
    if verbose:
        print(model.amct_cluster_plan)
    return model


def clustered_layers(model: nn.Module) -> dict[str, CompressedLayer]:
    """Every wrapper with a cluster stage, by module path."""
    return {name: m for name, m in model.named_modules() if cluster_stage(m) is not None}


@torch.no_grad()
def activate_clusters(model: nn.Module) -> list[str]:
    """Cluster every stage :func:`cluster_weights` created with ``defer=True`` (k-means on what each stage
    receives now: the masked weight); returns the layers clustered now."""
    done = []
    for name, layer in clustered_layers(model).items():
        stage = cluster_stage(layer)
        if not bool(stage.active):
            was = layer.training
            layer.eval()
            try:
                stage.fit(_stage_input(layer, stage))
            finally:
                layer.train(was)
            done.append(name)
    return done


def _stage_input(layer: CompressedLayer, stage: nn.Module) -> torch.Tensor:
    return layer.weight_pipeline.input_of(stage, layer.module.weight)


@torch.no_grad()
def reassign_clusters(model: nn.Module) -> dict[str, int]:
    """Move every clustered weight to its nearest centroid (after fine-tuning moved weights and centroids);
    returns, per layer, how many weights changed cluster. Zeros stay zero (sparsity-preserving stages)."""
    out = {}
    for name, layer in clustered_layers(model).items():
        stage = cluster_stage(layer)
        was = layer.training
        layer.eval()
        try:
            out[name] = stage.reassign(_stage_input(layer, stage))
        finally:
            layer.train(was)
    return out


@torch.no_grad()
def strip_clustering(model: nn.Module) -> nn.Module:
    """Make clustering permanent in place: each clustered layer's ``module.weight`` becomes its clustered
    weight and the stage leaves the pipeline (masks before it keep holding; quantizers after it now see the
    same values). Returns ``model``."""
    for layer in clustered_layers(model).values():
        stage = cluster_stage(layer)
        layer.module.weight.copy_(stage(_stage_input(layer, stage)))
        idx = next(i for i, s in enumerate(layer.weight_pipeline) if s is stage)
        del layer.weight_pipeline[idx]
    return model


def quant_granularity_for(layer: CompressedLayer, granularity: Granularity) -> tuple[Granularity, str | None]:
    """The weight granularity quantizing ``layer`` keeps its clusters with: per tensor for a layer clustered
    per tensor (with a note for the plan), ``granularity`` otherwise."""
    stage = cluster_stage(layer)
    if stage is not None and not stage.per_channel and not isinstance(granularity, PerTensor):
        return PerTensor(), "weights per_tensor: clustered per tensor (per-channel scales would split the clusters)"
    return granularity, None


# -- preservation --------------------------------------------------------------------------------
@dataclass
class PreservationRow:
    """``zeros_kept``: the layer has a mask (or a zero-keeping cluster stage), so its zeros must stay exactly
    its zeros; ``clustered``: it has a cluster stage, so its unique values must not grow. (A centroid that
    quantizes to 0 in a layer without a mask makes new zeros but keeps the cluster count: not a break.)"""

    layer: str
    zeros_before: int
    zeros_after: int
    unique_before: int
    unique_after: int
    per_channel: bool
    zeros_kept: bool = True
    clustered: bool = True

    @property
    def ok(self) -> bool:
        return (not self.zeros_kept or self.zeros_after == self.zeros_before) and \
            (not self.clustered or self.unique_after <= self.unique_before)


@dataclass
class PreservationReport:
    """Per layer: zeros and unique values (per tensor, or the most in one channel) before the quantizer
    and after it. ``ok`` when quantization kept exactly the zeros a mask made and at most the unique values
    clustering made (see :class:`PreservationRow`)."""

    rows: list[PreservationRow] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return all(r.ok for r in self.rows)

    def broken(self) -> list[PreservationRow]:
        return [r for r in self.rows if not r.ok]

    def raise_if_broken(self) -> None:
        bad = self.broken()
        if bad:
            what = "; ".join(f"{r.layer}: zeros {r.zeros_before} -> {r.zeros_after}, unique values "
                             f"{r.unique_before} -> {r.unique_after}" for r in bad)
            raise AssertionError(f"quantization did not preserve the earlier stages: {what}")

    def table(self) -> str:
        rows = [(r.layer, r.zeros_before, r.zeros_after, r.unique_before, r.unique_after,
                 "per channel" if r.per_channel else "per tensor", "ok" if r.ok else "BROKEN") for r in self.rows]
        return render_table(["layer", "zeros", "zeros after", "unique", "unique after", "counted", ""], rows)

    def __str__(self) -> str:
        return self.table()


def _unique(w: torch.Tensor, per_channel: bool, axis: int) -> int:
    if not per_channel:
        return torch.unique(w).numel()
    return max(torch.unique(r).numel() for r in channel_major(w, axis))


@torch.no_grad()
def check_preservation(model: nn.Module) -> PreservationReport:
    """For every quantized layer that has a mask or cluster stage: compare the weight entering the quantizer
    with the fake-quantized weight the layer uses (and exports). Counts unique values per channel when the
    layer is clustered per channel, per tensor otherwise."""
    from ..quant.ptq import weight_quantizer

    report = PreservationReport()
    for name, layer in model.named_modules():
        if not isinstance(layer, CompressedLayer) or layer.weight_pipeline is None:
            continue
        q = weight_quantizer(layer)
        stages = list(layer.weight_pipeline)
        if q is None or not any(isinstance(s, (MaskStage, ClusterStage)) for s in stages):
            continue
        was = layer.training
        layer.eval()
        try:
            before = _stage_input(layer, q)
            after = layer.effective_weight()
        finally:
            layer.train(was)
        cs = cluster_stage(layer)
        per_channel = cs is not None and cs.per_channel
        axis = layer.weight_channel_axis or 0
        zeros_kept = any(isinstance(s, MaskStage) for s in stages) or (cs is not None and bool(cs.zero_slot))
        report.rows.append(PreservationRow(name, int((before == 0).sum()), int((after == 0).sum()),
                                           _unique(before, per_channel, axis), _unique(after, per_channel, axis),
                                           per_channel, zeros_kept, cs is not None))
    return report

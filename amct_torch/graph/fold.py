"""Conv + BatchNorm folding, read from the captured graph.

A ``ConvNd`` whose output feeds only a matching eval-mode ``BatchNormNd`` (affine, with running
statistics) absorbs it::

    g = gamma / sqrt(var + eps);  W' = W * g (per output channel);  b' = (b - mean) * g + beta

and the BatchNorm becomes ``nn.Identity``. The arithmetic runs in float64, so the folded model equals
the original to floating-point tolerance. Every BatchNorm is reported: folded, or why not.
"""

from __future__ import annotations

import copy
import fnmatch
from typing import Any, Iterable

import torch
import torch.nn as nn

from .capture import CapturedGraph, Node, capture
from .plan import LayerPlan, Plan
from ..nn import CompressedLayer, FoldedBatchNorm

__all__ = ["fold_batch_norm", "fold_conv_bn_"]

_BN_FOR_CONV = {nn.Conv1d: nn.BatchNorm1d, nn.Conv2d: nn.BatchNorm2d, nn.Conv3d: nn.BatchNorm3d}


@torch.no_grad()
def fold_conv_bn_(conv: nn.Module, bn: nn.modules.batchnorm._BatchNorm) -> None:
    """Fold ``bn``'s affine transform and running statistics into ``conv`` in place."""
    w = conv.weight.detach().double()
    g = bn.weight.double() / torch.sqrt(bn.running_var.double() + bn.eps)
    b = conv.bias.double() if conv.bias is not None else torch.zeros_like(g)
    new_b = (b - bn.running_mean.double()) * g + bn.bias.double()
    conv.weight.copy_((w * g.view(-1, *([1] * (w.dim() - 1)))).to(conv.weight.dtype))
    if conv.bias is None:
        conv.bias = nn.Parameter(new_b.to(conv.weight.dtype))
    else:
        conv.bias.copy_(new_b.to(conv.bias.dtype))


def _why_not(model: nn.Module, bn_node: Node, graph: CapturedGraph, counts: dict, skip: Iterable[str]) -> tuple[str | None, str]:
    """``(conv_name, "")`` when ``bn_node`` can be folded into its producer, else ``(conv_name?, reason)``."""
    bn = model.get_submodule(bn_node.target)
    producers = bn_node.inputs
    if len(producers) != 1 or producers[0].kind != "module":
        src = ", ".join(repr(p) for p in producers) or "nothing"
        return None, f"input is not a convolution (comes from {src})"
    conv_node = producers[0]
    conv_name = conv_node.target
    conv = model.get_submodule(conv_name)
    if isinstance(conv, CompressedLayer):  # wrapped by an earlier pass (e.g. pruning masks): fold into its layer
        if conv.input_quantizer is not None or any(hasattr(s, "scale") for s in conv.weight_pipeline or ()):
            return conv_name, f"{conv_name} is already quantized; fold before quantizing"
        conv = conv.module
    want = _BN_FOR_CONV.get(type(conv))
    if want is None:
        return conv_name, f"producer {conv_name} is {type(conv).__name__}, not Conv1d/2d/3d"
    if type(bn) is not want:
        return conv_name, f"{type(conv).__name__} is followed by {type(bn).__name__}, expected {want.__name__}"
    for pattern in skip:
        if fnmatch.fnmatchcase(conv_name, pattern) or fnmatch.fnmatchcase(bn_node.target, pattern):
            return conv_name, f"in skip list ({pattern!r})"
    if counts.get(conv_name, 0) > 1 or counts.get(bn_node.target, 0) > 1:
        return conv_name, "conv or BatchNorm is called more than once in forward (reused module)"
    others = [u for u in conv_node.users if u is not bn_node]
    if others:
        return conv_name, f"conv output is also used by {', '.join(repr(u) for u in others)}"
    if "weight" not in conv._parameters or conv._forward_pre_hooks:
        return conv_name, ("conv weight is computed by a hook or parametrization (e.g. torch.nn.utils.prune); "
                           "make it permanent (prune.remove) before folding")
    if bn.training:
        return conv_name, "BatchNorm is in training mode; call model.eval() first (folding uses running statistics)"
    if not bn.affine:
        return conv_name, "BatchNorm has affine=False"
    if not bn.track_running_stats or bn.running_mean is None:
        return conv_name, "BatchNorm has no running statistics (track_running_stats=False)"
    if bn.num_features != conv.out_channels:
        return conv_name, f"BatchNorm has {bn.num_features} features, conv {conv.out_channels} output channels"
    return conv_name, ""


def fold_batch_norm(model: nn.Module, example_inputs: Any = None, *, graph: CapturedGraph | None = None,
                    skip: Iterable[str] = (), inplace: bool = False, train: bool = False) -> tuple[nn.Module, Plan]:
    """Fold every foldable Conv+BatchNorm pair; return the model and a plan listing every BatchNorm.

    Args:
        model: the model (left untouched unless ``inplace``).
        example_inputs: inputs for capture (needed when fx cannot trace the model).
        graph: an already captured graph of ``model`` (module paths must match).
        skip: conv or BatchNorm names/globs to leave alone.
        inplace: fold into ``model`` itself instead of a copy.
        train: for QAT: keep the BN (as a :class:`~amct_torch.nn.FoldedBatchNorm` at its path, with its
            statistics) to be trained folded with its conv; the conv's wrapper attaches it
            (``attach_batch_norm``) when the model is prepared. BatchNorms in training mode are accepted.

    Example::

        folded, plan = fold_batch_norm(model.eval(), torch.randn(1, 3, 32, 32))
        print(plan)
    """
    skip = tuple(skip)
    if not inplace:
        model = copy.deepcopy(model)
    graph = graph if graph is not None else capture(model, example_inputs)
    plan = Plan("fold batch-norm", capture=graph.report())
    bn_nodes = [n for n in graph.module_nodes() if n.module_type is not None
                and issubclass(n.module_type, nn.modules.batchnorm._BatchNorm)]
    if not graph.has_dataflow:
        for name, m in model.named_modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                plan.layers.append(LayerPlan(name, type(m).__name__, "skip",
                                             "no data flow: the graph could not be captured (see capture report)"))
        plan.warnings.append("nothing folded: capture fell back to module_walk")
        return model, plan
    counts = graph.call_counts()
    seen = set()
    for node in bn_nodes:
        if node.target in seen:
            continue
        seen.add(node.target)
        bn = model.get_submodule(node.target)
        was_training = bn.training
        if train:
            bn.eval()  # the checks read the statistics; training mode is fine for QAT
        try:
            conv_name, reason = _why_not(model, node, graph, counts, skip)
        finally:
            bn.train(was_training)
        if reason:
            plan.layers.append(LayerPlan(node.target, type(bn).__name__, "skip", reason, conv_name or ""))
            continue
        if train:
            folded = FoldedBatchNorm(bn, conv_name)
            folded.train(was_training)
            model.set_submodule(node.target, folded)
            plan.layers.append(LayerPlan(node.target, type(bn).__name__, "fold",
                                         f"trained folded into {conv_name}", conv_name))
            continue
        target = model.get_submodule(conv_name)
        fold_conv_bn_(target.module if isinstance(target, CompressedLayer) else target, bn)
        model.set_submodule(node.target, nn.Identity())
        plan.layers.append(LayerPlan(node.target, type(bn).__name__, "fold", f"into {conv_name}", conv_name))
    return model, plan

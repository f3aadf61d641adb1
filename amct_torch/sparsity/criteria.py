"""Channel importance criteria: one score per channel class of a dependency group (higher = keep).

Weight criteria read the producers' output filters (every producer of a group scores its own filters;
a class's score is the sum over producers):

* ``l1`` / ``l2``: the filter norm. ``l2`` is AMCT's balanced L2: each producer's norms are divided by
  their mean first, so a group coupling layers of different scales weighs them equally.
* ``fpgm`` (He et al. 2019): the sum of distances to the other filters; filters near the geometric
  median are replaceable, so they go first.
* ``bn_slim`` (Liu et al. 2017): ``|gamma|`` of the BatchNorms on the channels (train with the L1 penalty,
  :func:`bn_slim_penalty` or :func:`add_bn_slim_grad`, to make the scale factors sparse first).

Data criteria are measured where the channels are read, at the inputs of the group's consumers, over a
few batches: ``taylor`` (Molchanov et al. 2017: ``|mean(a * dL/da)|`` per channel, needs ``loss_fn`` and
labelled batches), ``apoz`` (Hu et al. 2016: average percentage of zeros after the ReLU; score =
1 - APoZ) and ``mean_activation`` (mean ``|a|``).
"""

from __future__ import annotations

from typing import Any, Callable, Iterable

import numpy as np
import torch
import torch.nn as nn

from ..graph.groups import ChannelGroup
from ..nn import CompressedLayer

__all__ = ["CRITERIA", "DATA_CRITERIA", "weight_scores", "data_scores", "bn_slim_penalty", "add_bn_slim_grad"]

CRITERIA = ("l1", "l2", "fpgm", "bn_slim", "taylor", "apoz", "mean_activation")
DATA_CRITERIA = ("taylor", "apoz", "mean_activation")


def _inner(m: nn.Module) -> nn.Module:
    return m.module if isinstance(m, CompressedLayer) else m


def out_axis(m: nn.Module) -> int:
    """Output-channel axis of a layer's weight (ConvTranspose: 1)."""
    return 1 if isinstance(_inner(m), nn.modules.conv._ConvTransposeNd) else 0


def _filters(layer: nn.Module) -> torch.Tensor:
    inner = _inner(layer)
    w = inner.weight.detach().float()
    if isinstance(inner, nn.modules.conv._ConvTransposeNd):
        groups = inner.groups
        cin = w.shape[0]
        w = w.reshape(groups, cin // groups, *w.shape[1:]).transpose(1, 2).reshape(-1, cin // groups * int(np.prod(w.shape[2:])))
        return w
    return w.reshape(w.shape[0], -1)


def _per_class(values: np.ndarray, classes: np.ndarray, n: int) -> np.ndarray:
    out = np.zeros(n)
    sel = classes >= 0
    np.add.at(out, classes[sel], values[sel])
    return out


def weight_scores(model: nn.Module, group: ChannelGroup, criterion: str) -> np.ndarray:
    """Scores per channel class for the weight criteria (``l1``, ``l2``, ``fpgm``, ``bn_slim``)."""
    total = np.zeros(group.channels)
    if criterion == "bn_slim":
        found = False
        for f in group.followers:
            m = _inner(model.get_submodule(f))
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.weight is not None:
                total += _per_class(m.weight.detach().abs().cpu().numpy(), group.follower_channels[f], group.channels)
                found = True
        if not found:
            raise ValueError(f"bn_slim: group of {', '.join(group.producers)} has no BatchNorm; use l1, l2 or fpgm")
        return total
    for p in group.producers:
        f = _filters(model.get_submodule(p))
        if criterion == "l1":
            s = f.abs().sum(1)
        elif criterion == "l2":
            s = f.norm(dim=1)
            s = s / s.mean().clamp(min=1e-12)
        elif criterion == "fpgm":
            s = torch.cdist(f, f).sum(1)
        else:
            raise ValueError(f"criterion: got {criterion!r}; allowed: one of {', '.join(CRITERIA)}")
        total += _per_class(s.cpu().numpy().astype(np.float64), group.producer_channels[p], group.channels)
    return total


def _channel_view(x: torch.Tensor, layer: nn.Module) -> torch.Tensor:
    """``(channels, everything else)`` of a layer input (conv: dim 1; linear: last dim)."""
    if isinstance(_inner(layer), nn.Linear):
        return x.reshape(-1, x.shape[-1]).t()
    return x.transpose(0, 1).reshape(x.shape[1], -1)


def data_scores(model: nn.Module, groups: list[ChannelGroup], criterion: str, data: Iterable[Any],
                num_batches: int = 4, loss_fn: Callable[..., torch.Tensor] | None = None) -> dict[int, np.ndarray]:
    """Scores per channel class of every group from ``num_batches`` batches of ``data``.

    ``data`` yields inputs, or ``(inputs, target)`` pairs; ``taylor`` needs the pairs and ``loss_fn(output,
    target)``. The model's parameters are not changed (gradients are computed and discarded).
    """
    if criterion not in DATA_CRITERIA:
        raise ValueError(f"criterion: got {criterion!r}; allowed data criteria: {', '.join(DATA_CRITERIA)}")
    if criterion == "taylor" and loss_fn is None:
        raise ValueError("criterion 'taylor' needs loss_fn(output, target) and (input, target) batches")
    consumers = sorted({c for g in groups for c in g.consumers})
    stats: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}
    handles = []

    def hook(name: str, layer: nn.Module):
        def pre(module: nn.Module, args: tuple) -> None:
            x = args[0]
            if criterion == "taylor":
                if x.requires_grad:
                    x.register_hook(lambda g, x=x.detach(): _accumulate(name, (_channel_view(x * g, layer)).sum(1)))
                return
            v = _channel_view(x.detach(), layer)
            value = (v <= 0).float().mean(1) if criterion == "apoz" else v.abs().mean(1)
            _accumulate(name, value)
        return pre

    def _accumulate(name: str, value: torch.Tensor) -> None:
        stats[name] = stats.get(name, 0) + value.detach().float().cpu()
        counts[name] = counts.get(name, 0) + 1

    for c in consumers:
        layer = model.get_submodule(c)
        handles.append(layer.register_forward_pre_hook(hook(c, layer)))
    was_training = model.training
    model.eval()
    try:
        seen = 0
        for batch in data:
            if seen >= num_batches:
                break
            x, y = (batch[0], batch[1]) if isinstance(batch, (tuple, list)) and len(batch) >= 2 else (batch, None)
            if criterion == "taylor":
                if y is None:
                    raise ValueError("criterion 'taylor' needs (input, target) batches")
                x = x.detach().requires_grad_(True)  # so every consumer input carries a gradient
                with torch.enable_grad():
                    loss = loss_fn(model(x), y)
                    torch.autograd.grad(loss, [x], allow_unused=True)  # runs the tensor hooks; nothing is stored
            else:
                with torch.no_grad():
                    model(x)
            seen += 1
        if seen == 0:
            raise ValueError(f"criterion {criterion!r}: the data gave no batch")
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    out = {}
    for g in groups:
        total = np.zeros(g.channels)
        for c in g.consumers:
            if c not in stats:
                continue
            v = (stats[c] / counts[c]).numpy().astype(np.float64)
            v = np.abs(v) if criterion == "taylor" else (1.0 - v if criterion == "apoz" else v)
            cls = g.consumer_channels[c]
            per = _per_class(v, cls, g.channels)
            n = _per_class(np.ones_like(v), cls, g.channels)
            total += per / np.maximum(n, 1)
        out[g.index] = total
    return out


def _bns(model: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.weight is not None]


def bn_slim_penalty(model: nn.Module, strength: float = 1e-4) -> torch.Tensor:
    """``strength * sum |gamma|`` over the model's BatchNorms: add it to the loss while training for bn_slim."""
    bns = _bns(model)
    if not bns:
        return torch.zeros(())
    return strength * sum(m.weight.abs().sum() for m in bns)


@torch.no_grad()
def add_bn_slim_grad(model: nn.Module, strength: float = 1e-4) -> None:
    """The same L1 penalty as a subgradient added to ``gamma.grad`` (call after ``backward``)."""
    for m in _bns(model):
        if m.weight.grad is not None:
            m.weight.grad.add_(strength * torch.sign(m.weight))

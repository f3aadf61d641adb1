"""Masks: the first stage of a weight pipeline (mask -> cluster -> fake-quant).

A :class:`MaskStage` multiplies the weight by a 0/1 ``mask`` buffer of the weight's shape, so a masked
model checkpoints, resumes and exports like any other (the mask is in the ``state_dict``). Channel
pruning also sets ``bias_mask`` (one value per output channel), which the wrapper applies to the bias.

Gradients: ``ste=False`` (default) is the plain product, so pruned weights get no gradient and stay where
they were (they are zero in the op either way); ``ste=True`` is SR-STE (Zhou et al. 2021): the gradient
passes to every weight as if unmasked, plus ``decay * (1 - mask) * w`` pulling pruned weights towards
zero, so that an N:M mask recomputed during training can change its mind.
"""

from __future__ import annotations

import torch
import torch.nn as nn

__all__ = ["MaskStage", "mask_stage", "masked_layers", "sparsity_of", "refuse_after_clustering"]


class _SrSte(torch.autograd.Function):
    @staticmethod
    def forward(ctx, w, mask, decay: float):  # type: ignore[override]
        ctx.save_for_backward(w, mask)
        ctx.decay = decay
        return w * mask

    @staticmethod
    def backward(ctx, g):  # type: ignore[override]
        w, mask = ctx.saved_tensors
        return g + ctx.decay * (1 - mask) * w, None, None


class MaskStage(nn.Module):
    """``w -> w * mask``; ``kind`` says who made the mask (``unstructured``, ``n:m``, ``channel``)."""

    def __init__(self, weight: torch.Tensor, kind: str = "unstructured", *, ste: bool = False, decay: float = 2e-4,
                 out_channels: int | None = None):
        super().__init__()
        self.kind, self.ste, self.decay = kind, ste, decay
        self.register_buffer("mask", torch.ones_like(weight, dtype=weight.dtype))
        if out_channels is not None:
            self.register_buffer("bias_mask", torch.ones(out_channels, dtype=weight.dtype))
        else:
            self.bias_mask = None

    @torch.no_grad()
    def set_mask(self, mask: torch.Tensor, bias_mask: torch.Tensor | None = None) -> None:
        if mask.shape != self.mask.shape:
            raise ValueError(f"mask shape {tuple(mask.shape)} does not match the weight {tuple(self.mask.shape)}")
        self.mask.copy_(mask.to(self.mask.dtype))
        if bias_mask is not None:
            if self.bias_mask is None:
                raise ValueError("this mask stage has no bias mask (it is not a channel mask)")
            self.bias_mask.copy_(bias_mask.to(self.bias_mask.dtype))

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        if self.ste and self.training:
            return _SrSte.apply(weight, self.mask.to(weight.dtype), self.decay)
        return weight * self.mask.to(weight.dtype)

    def sparsity(self) -> float:
        """Fraction of weights masked to zero."""
        return float((self.mask == 0).float().mean())

    def extra_repr(self) -> str:
        return f"{self.kind}, sparsity={self.sparsity():.3f}{', SR-STE' if self.ste else ''}"


def mask_stage(layer: nn.Module) -> MaskStage | None:
    """The mask stage of a wrapper's pipeline, if any."""
    pipeline = getattr(layer, "weight_pipeline", None)
    for stage in pipeline or ():
        if isinstance(stage, MaskStage):
            return stage
    return None


def refuse_after_clustering(title: str, name: str, layer: nn.Module) -> None:
    """Masks go before clustering (mask -> cluster -> fake-quant): a cluster stage's output does not follow
    its input, so a mask added before an existing one would do nothing."""
    if any(type(s).__name__ == "ClusterStage" for s in layer.weight_pipeline or ()):
        raise ValueError(f"{title}: layer {name!r} is already clustered; prune before clustering (mask -> cluster "
                         "-> fake-quant): prune the float model, then cluster_weights the pruned one")


def masked_layers(model: nn.Module) -> dict[str, nn.Module]:
    """Every wrapper with a mask stage, by module path."""
    return {name: m for name, m in model.named_modules() if mask_stage(m) is not None}


def sparsity_of(model: nn.Module) -> dict[str, float]:
    """Zero fraction of every masked layer's effective weight, plus ``total`` over all of them."""
    out, zeros, total = {}, 0, 0
    for name, layer in masked_layers(model).items():
        modes = {m: m.training for m in layer.modules()}  # restored one by one: wrapper and layer may differ
        layer.eval()  # reading the weight must not count as a training batch (N:M mask stages count them)
        try:
            with torch.no_grad():
                w = layer.effective_weight()
        finally:
            for m, mode in modes.items():
                m.training = mode
        z = int((w == 0).sum())
        out[name] = z / w.numel()
        zeros, total = zeros + z, total + w.numel()
    out["total"] = zeros / total if total else 0.0
    return out

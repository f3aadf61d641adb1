"""Helpers the AMCT-compatible functions share: AMCT's keyword spellings and finding the layers to compress."""

from __future__ import annotations

from typing import Any

import torch.nn as nn

from ..config import QuantConfig, Targeting
from ..graph import fold_batch_norm, swap_layers
from ..nn import CompressedLayer

__all__ = ["pick_spelling", "quantizable_layers", "linear_like"]


def pick_spelling(new: Any, old: Any, name: str) -> Any:
    """The value of a keyword given in AMCT's spelling (``old``) or the correct one (``new``), not both."""
    if new is not None and old is not None and new != old:
        raise TypeError(f"give either {name} or its AMCT spelling, not both")
    return new if new is not None else old


def quantizable_layers(model: nn.Module, input_data: Any, *, train: bool = False) -> dict[str, nn.Module]:
    """The layers AMCT's flow would quantize (after BN folding), by module path, from a dry-run plan.

    ``train=False`` folds as PTQ does (the model is put in eval mode); ``train=True`` folds as QAT does
    (BatchNorms in training mode accepted, the model's mode left as it is).
    """
    folded, _ = fold_batch_norm(model if train else model.eval(), input_data, train=train)
    _, plan = swap_layers(folded, Targeting(QuantConfig()), input_data, inplace=True)
    return {name: folded.get_submodule(name).module for name in plan.wrapped()}


def linear_like(module: nn.Module) -> bool:
    """A layer without output channels in AMCT's sense (``Linear``, transformers' ``Conv1D``): per-tensor weights."""
    inner = module.module if isinstance(module, CompressedLayer) else module
    return isinstance(inner, nn.Linear) or type(inner).__name__ == "Conv1D"

"""The compressed layer: the original layer plus a weight pipeline and activation-quantizer slots.

```
 x ─► [input_balance] ─► input_quantizer ─► op(x', weight_pipeline(W), b) ─► output_quantizer ─►
```

* ``module``: the original layer, untouched; its parameters keep their meaning.
* ``weight_pipeline``: ordered stages ``w -> w'`` (mask, cluster, fake-quant...). Empty: ``w' = w``,
  and the wrapper reproduces the original layer's output exactly.
* ``input_quantizer`` / ``output_quantizer``: ``None`` until a pass attaches one.
* ``input_balance``: ``None``, or DMQ balancing's ``x -> x / s`` (applied before ``input_quantizer``).

Wrappers are registered per layer type with :func:`register_wrapper`; the swap pass asks
:func:`wrapper_for` which wrapper class a module gets. A checkpoint of the *unwrapped* model loads into
a wrapped one (``conv.weight`` is read as ``conv.module.weight``).
"""

from __future__ import annotations

import sys
from abc import ABCMeta, abstractmethod
from typing import Any, Callable, ClassVar

import torch
import torch.nn as nn

__all__ = ["CompressedLayer", "WeightPipeline", "register_wrapper", "wrapper_for", "registered_types"]


class WeightPipeline(nn.ModuleList):
    """Ordered weight stages; ``forward(w)`` applies them in turn."""

    def forward(self, weight: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        for stage in self:
            weight = stage(weight)
        return weight

    def input_of(self, stage: nn.Module | int, weight: torch.Tensor) -> torch.Tensor:
        """What ``stage`` (a stage of this pipeline, or an index: the stages before it) receives when the
        pipeline runs on ``weight``."""
        stages = list(self)
        if isinstance(stage, int):
            end = stage
        else:
            end = next((i for i, s in enumerate(stages) if s is stage), None)
            if end is None:
                raise ValueError(f"{type(stage).__name__} is not a stage of this pipeline")
        for s in stages[:end]:
            weight = s(weight)
        return weight

    def extra_repr(self) -> str:
        return "" if len(self) else "(empty)"


class CompressedLayer(nn.Module, metaclass=ABCMeta):
    """Base of every wrapper. Subclasses define ``_op(x, weight, *args)`` and the class attributes.

    Attributes:
        weight_channel_axis: the output-channel axis of ``module.weight`` (``None`` for weightless layers);
            per-channel stages read it.
    """

    weight_channel_axis: ClassVar[int | None] = 0
    has_weight: ClassVar[bool] = True

    def __init__(self, module: nn.Module):
        super().__init__()
        if isinstance(module, CompressedLayer):
            raise TypeError(f"{type(module).__name__} is already a compressed layer; wrap the original layer once")
        self.module = module
        self.weight_pipeline = WeightPipeline() if self.has_weight else None
        self.register_module("input_balance", None)  # DMQ: x -> x / s before the input quantizer
        self.register_module("input_quantizer", None)
        self.register_module("output_quantizer", None)
        self._register_load_state_dict_pre_hook(self._accept_unwrapped_keys)

    # -- the op ------------------------------------------------------------------------------
    def effective_weight(self) -> torch.Tensor:
        """The weight the op sees: ``module.weight`` through the pipeline."""
        if self.weight_pipeline is None:
            raise AttributeError(f"{type(self.module).__name__} has no weight")
        return self.weight_pipeline(self.module.weight)

    def effective_bias(self) -> torch.Tensor | None:
        """The bias the op sees: ``module.bias`` times the ``bias_mask`` of any pipeline stage that has one
        (a channel-pruning mask zeroes the bias of pruned output channels too)."""
        bias = getattr(self.module, "bias", None)
        if bias is None or self.weight_pipeline is None:
            return bias
        for stage in self.weight_pipeline:
            mask = getattr(stage, "bias_mask", None)
            if mask is not None:
                bias = bias * mask
        return bias

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        balance = self._modules.get("input_balance")  # absent in wrappers pickled before the slot existed
        if balance is not None:
            x = balance(x)
        if self.input_quantizer is not None:
            x = self.input_quantizer(x)
        weight = self.effective_weight() if self.has_weight else None
        y = self._op(x, weight, *args, **kwargs)
        if self.output_quantizer is not None:
            y = self.output_quantizer(y)
        return y

    @abstractmethod
    def _op(self, x: torch.Tensor, weight: torch.Tensor | None, *args: Any, **kwargs: Any) -> torch.Tensor:
        """The original layer's computation with ``weight`` in place of ``module.weight``."""

    @property
    def weight(self) -> torch.Tensor:
        """The original weight (what optimizers train); see :meth:`effective_weight` for what the op uses."""
        return self.module.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return getattr(self.module, "bias", None)

    # -- checkpoints ---------------------------------------------------------------------------
    def _accept_unwrapped_keys(self, state_dict: dict, prefix: str, *args: Any) -> None:
        for key in self.module.state_dict().keys():
            old, new = prefix + key, prefix + "module." + key
            if old in state_dict and new not in state_dict:
                state_dict[new] = state_dict.pop(old)

    def extra_repr(self) -> str:
        return f"wraps={type(self.module).__name__}"


_REGISTRY: dict[type, type[CompressedLayer]] = {}
_LAZY: list[tuple[str, Callable[[], None]]] = []


def register_wrapper(*layer_types: type) -> Callable[[type[CompressedLayer]], type[CompressedLayer]]:
    """Class decorator: ``@register_wrapper(nn.Linear)`` makes the swap pass wrap Linear layers with it."""

    def deco(cls: type[CompressedLayer]) -> type[CompressedLayer]:
        if not (isinstance(cls, type) and issubclass(cls, CompressedLayer)):
            raise TypeError(f"register_wrapper: {cls!r} must subclass CompressedLayer")
        for t in layer_types:
            _REGISTRY[t] = cls
        return cls

    return deco


def register_lazy(module_name: str, register: Callable[[], None]) -> None:
    """Run ``register`` once ``module_name`` has been imported by someone else (no import from us)."""
    _LAZY.append((module_name, register))


def _run_lazy() -> None:
    for item in list(_LAZY):
        if item[0] in sys.modules:
            _LAZY.remove(item)
            item[1]()


def wrapper_for(module: nn.Module) -> type[CompressedLayer] | None:
    """The wrapper class registered for ``module``'s type (or its closest registered base), or None.

    A subclass that overrides ``forward``, or a module with forward hooks (``torch.nn.utils.prune``,
    ``weight_norm``), gets no wrapper: the wrapper would bypass them.
    """
    _run_lazy()
    if module._forward_hooks or module._forward_pre_hooks:
        return None
    for klass in type(module).__mro__:
        if klass in _REGISTRY:
            if type(module).forward is not klass.forward:
                return None
            return _REGISTRY[klass]
    return None


def registered_types() -> tuple[type, ...]:
    """Layer types that have a wrapper (after lazily registering optional integrations)."""
    _run_lazy()
    return tuple(_REGISTRY)

"""Dynamic quantization config: INT8 weights fixed once, activations quantized on the fly.

Weights are symmetric int8 (offset 0), per output channel by default. Activations get their scale and
zero point from the current input at every call: per tensor (one pair for the whole input, ONNX
``DynamicQuantizeLinear``) or per token (one pair per row of the input flattened to ``(-1, features)``).
The default, asymmetric uint8 with a zero point, is what ONNX Runtime's ``DynamicQuantizeLinear``
computes; ``activation_symmetric=True`` gives int8 with offset 0 and AMCT's symmetric scale.

    >>> DynamicQuantConfig(activation_granularity="per_token").short()
    'W8 per_channel / A8 dynamic per_token uint8'
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .base import Config, ConfigError, allowed
from .granularity import Granularity, PerChannel, PerTensor, PerToken

__all__ = ["DynamicQuantConfig"]


@dataclass(frozen=True)
class DynamicQuantConfig(Config):
    """What a dynamically quantized layer (Linear, transformers' Conv1D, LSTM, GRU) gets.

    Args:
        weight_bits: 8 (int8 weights, the only width ONNX Runtime's integer kernels take).
        weight_granularity: ``per_channel`` (default: one scale per output channel, or per gate row of
            an LSTM/GRU) or ``per_tensor``.
        activation_bits: 8, or ``None`` for weight-only int8 (activations stay float).
        activation_granularity: ``per_tensor`` (default) or ``per_token`` (one scale per row).
        activation_symmetric: ``False`` (default): uint8 with a zero point, ``scale = (max(0, max) -
            min(0, min)) / 255``, as ONNX Runtime; ``True``: int8, offset 0, AMCT's symmetric scale.
    """

    weight_bits: int = 8
    weight_granularity: Granularity = field(default_factory=PerChannel)
    activation_bits: int | None = 8
    activation_granularity: Granularity = field(default_factory=PerTensor)
    activation_symmetric: bool = False

    def validate(self) -> None:
        name = type(self).__name__
        allowed(name, "weight_bits", self.weight_bits, (8,))
        if self.activation_bits is not None:
            allowed(name, "activation_bits", self.activation_bits, (8,))
        if isinstance(self.weight_granularity, PerChannel):
            if self.weight_granularity.axis is not None:
                raise ConfigError(f"{name}.weight_granularity", self.weight_granularity.to_plain(),
                                  "per_channel (the layer's own output-channel axis) or per_tensor")
        elif not isinstance(self.weight_granularity, PerTensor):
            raise ConfigError(f"{name}.weight_granularity", self.weight_granularity.to_plain(),
                              "per_channel or per_tensor (dynamic quantization has no per_group/per_token weights)")
        if not isinstance(self.activation_granularity, (PerTensor, PerToken)):
            raise ConfigError(f"{name}.activation_granularity", self.activation_granularity.to_plain(),
                              "per_tensor or per_token (activation scales are computed per call)")

    @property
    def per_token(self) -> bool:
        return isinstance(self.activation_granularity, PerToken)

    @property
    def per_channel(self) -> bool:
        return isinstance(self.weight_granularity, PerChannel)

    def short(self) -> str:
        w = f"W{self.weight_bits} {self.weight_granularity.to_plain()}"
        if self.activation_bits is None:
            return f"{w} / weight-only (float activations)"
        kind = "int8 symmetric" if self.activation_symmetric else "uint8"
        return f"{w} / A{self.activation_bits} dynamic {self.activation_granularity.to_plain()} {kind}"

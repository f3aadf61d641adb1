"""Weight-only quantization config: INT8/INT4 weights with per-group scales, activations left float.

Groups run along the layer's input dimension: ``group_size`` consecutive input features of one output
channel share a scale (and, asymmetric, an integer zero point); ``group_size=-1`` is one scale per output
channel. ``algorithm`` picks how the integers are found: ``minmax`` (round to nearest with the group's
min/max scale) or ``gptq`` (Frantar et al. 2022: error feedback through the inverse Hessian of the layer's
calibration inputs).

    >>> WeightOnlyConfig(bits=4, group_size=128, algorithm="gptq").short()
    'W4 group=128 sym gptq'
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from .base import Config, ConfigError, allowed, check_range

__all__ = ["WeightOnlyConfig"]


@dataclass(frozen=True)
class WeightOnlyConfig(Config):
    """What a weight-only quantized layer (``nn.Linear``, transformers ``Conv1D``) gets.

    Args:
        bits: 4 or 8 (signed integers, ``[-2^(b-1), 2^(b-1) - 1]``).
        group_size: input features per scale, a positive multiple of 32, or ``-1`` for one scale per
            output channel. A layer whose input size is not a multiple of it is refused by name (target it
            with a divisor or ``-1``).
        symmetric: zero point 0 (AMCT's symmetric scale); ``False``: an integer zero point per group.
        algorithm: ``minmax`` (no data needed) or ``gptq`` (needs calibration data).
        damp: GPTQ's dampening, a fraction of the mean Hessian diagonal added to the diagonal (0.01 = 1 %).
        block_size: GPTQ's lazy-batch width (columns updated together), >= 1.
        act_order: GPTQ processes columns by decreasing Hessian diagonal (scales then come from the
            original weight up front, so groups stay contiguous; see ``amct_torch.quant.weight_only``).
        batch_num: GPTQ calibration batches used to estimate each layer's Hessian.
        sequential: GPTQ quantizes the layers one at a time in call order, each from inputs computed by the
            already-quantized layers before it (as in the paper; the calibration data is run once per layer).
            ``False``: every layer's Hessian comes from one pass through the float model.
    """

    bits: int = 4
    group_size: int = 128
    symmetric: bool = True
    algorithm: Literal["minmax", "gptq"] = "minmax"
    damp: float = 0.01
    block_size: int = 128
    act_order: bool = False
    batch_num: int = 8
    sequential: bool = False

    def validate(self) -> None:
        name = type(self).__name__
        allowed(name, "bits", self.bits, (4, 8))
        if self.group_size != -1 and (self.group_size <= 0 or self.group_size % 32):
            raise ConfigError(f"{name}.group_size", self.group_size,
                              "a positive multiple of 32 (32, 64, 128, ...) or -1 for one scale per output channel")
        check_range(name, "damp", self.damp, 0.0, lo_open=True)
        check_range(name, "block_size", self.block_size, 1)
        check_range(name, "batch_num", self.batch_num, 1)

    def short(self) -> str:
        """Compact description used in plans, e.g. ``W4 group=128 sym gptq``."""
        group = "per_channel" if self.group_size == -1 else f"group={self.group_size}"
        return f"W{self.bits} {group} {'sym' if self.symmetric else 'asym'} {self.algorithm}"

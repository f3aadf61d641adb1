"""Settings of the accuracy-based automatic calibration (AMCT's ``accuracy_based_auto_calibration``).

What the search does, not what the layers get: the quantization itself is a :class:`QuantConfig` or a
:class:`~amct_torch.config.targeting.Targeting` given next to it.

    >>> AutoCalibrationConfig(max_drop=0.003).short()
    'binary search, cosine ranking, max drop 0.003, fallback float'
    >>> AutoCalibrationConfig(strategy="greedy", sensitivity="sqnr", fallback=QuantConfig()).short()
    'greedy search, sqnr ranking, max drop 0.01, fallback W8 per_channel / A8 ifmr asym'
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from .base import Config, check_range
from .quant import QuantConfig

__all__ = ["AutoCalibrationConfig"]


@dataclass(frozen=True)
class AutoCalibrationConfig(Config):
    """How the fallback search runs.

    Args:
        sensitivity: the per-layer score layers are ranked by, lowest (most sensitive) first: ``cosine``
            (AMCT's ``CosineSimilarity``: cosine similarity between the layer's output with quantized
            input and weights and its float output, on the same float inputs) or ``sqnr`` (signal to
            quantization-noise ratio of the same two outputs, in dB).
        strategy: ``binary`` (AMCT's ``BinarySearch``: the smallest number of worst-ranked layers to fall
            back, found by bisection, assuming more fallback never hurts) or ``greedy`` (one more layer at a
            time, in ranking order, until the metric holds: more trials, no monotonicity assumed).
        max_drop: the accuracy criterion when no ``metric_ok`` function is given: a quantized model is
            good enough when ``fp32_metric - metric <= max_drop`` (higher metrics are better).
        fallback: what a fallen-back layer gets: ``None`` keeps it in float (AMCT), a :class:`QuantConfig`
            quantizes it at that (higher) precision instead, e.g. INT8 when the base config is INT4.
        sensitivity_batches: calibration batches whose float layer inputs the ranking is computed on
            (``None``: as many as calibration needs, the largest ``batch_num``).
        quantize_outputs: ``none`` (AMCT's placement: each layer quantizes its own input and weights, so
            falling back a layer removes exactly what its score measured) or ``auto`` (also the quantizers
            around adds, concatenations and pools that ONNX Runtime's integer kernels need, see
            :func:`amct_torch.quantize`).
        fold_bn: fold Conv+BatchNorm before quantizing (AMCT's ``do_fusion``).
        skip_fusion_layers: convolutions or BatchNorms not to fold.
    """

    sensitivity: Literal["cosine", "sqnr"] = "cosine"
    strategy: Literal["binary", "greedy"] = "binary"
    max_drop: float = 0.01
    fallback: QuantConfig | None = None
    sensitivity_batches: int | None = None
    quantize_outputs: Literal["none", "auto"] = "none"
    fold_bn: bool = True
    skip_fusion_layers: tuple[str, ...] = ()

    def validate(self) -> None:
        name = type(self).__name__
        check_range(name, "max_drop", self.max_drop, 0.0)
        if self.sensitivity_batches is not None:
            check_range(name, "sensitivity_batches", self.sensitivity_batches, 1)

    def short(self) -> str:
        """Compact description, e.g. ``binary search, cosine ranking, max drop 0.01, fallback float``."""
        fallback = "float" if self.fallback is None else self.fallback.short()
        return f"{self.strategy} search, {self.sensitivity} ranking, max drop {self.max_drop:g}, fallback {fallback}"

"""Typed configs, granularities and targeting (global -> module type -> module name)."""

from .base import Config, ConfigError
from .granularity import Granularity, PerChannel, PerGroup, PerTensor, PerToken, parse_granularity
from .quant import QuantConfig
from .targeting import Resolution, Targeting

__all__ = ["Config", "ConfigError", "Granularity", "PerChannel", "PerGroup", "PerTensor", "PerToken",
           "parse_granularity", "QuantConfig", "Resolution", "Targeting"]

"""AMCT's classic API (file-driven), built on the Pythonic API. Re-exported by ``amct_torch``."""

from .ptq import create_quant_config, quantize_model, save_model

__all__ = ["create_quant_config", "quantize_model", "save_model"]

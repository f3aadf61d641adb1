"""AMCT's classic API (file-driven), built on the Pythonic API. Re-exported by ``amct_torch``."""

from .ptq import create_quant_config, quantize_model, save_model
from .qat import (create_quant_retrain_config, create_quant_retrain_model, restore_quant_retrain_model,
                  save_quant_retrain_model)

__all__ = ["create_quant_config", "quantize_model", "save_model", "create_quant_retrain_config",
           "create_quant_retrain_model", "restore_quant_retrain_model", "save_quant_retrain_model"]

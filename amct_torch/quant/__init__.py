"""Quantizer math (AMCT formulas), calibrators, quantizer modules, AdaRound and the PTQ pass."""

from .adaround import AdaRoundWeightQuantizer, optimize_rounding
from .calibrators import (CALIBRATORS, Calibrator, HFMGCalibrator, IFMRCalibrator, MinMaxCalibrator, MSECalibrator,
                          PercentileCalibrator, make_calibrator)
from .formulas import dequantize, fake_quantize, qrange, quantize as quantize_tensor, scale_offset
from .ptq import calibrate, check_calibrated, quant_layers, quantize, weight_quantizer
from .quantizers import ActivationQuantizer, ArqWeightQuantizer, CalibrationError

__all__ = ["AdaRoundWeightQuantizer", "optimize_rounding", "CALIBRATORS", "Calibrator", "HFMGCalibrator",
           "IFMRCalibrator", "MinMaxCalibrator", "MSECalibrator", "PercentileCalibrator", "make_calibrator",
           "dequantize", "fake_quantize", "qrange", "quantize_tensor", "scale_offset", "calibrate", "check_calibrated",
           "quant_layers", "quantize", "weight_quantizer", "ActivationQuantizer", "ArqWeightQuantizer",
           "CalibrationError"]

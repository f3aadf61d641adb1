"""Quantizer math (AMCT formulas), calibrators, quantizer modules, AdaRound and the PTQ pass."""

from .adaround import AdaRoundWeightQuantizer, optimize_rounding
from .calibrators import (CALIBRATORS, Calibrator, HFMGCalibrator, IFMRCalibrator, MinMaxCalibrator, MSECalibrator,
                          PercentileCalibrator, make_calibrator)
from .formulas import dequantize, fake_quantize, qrange, quantize as quantize_tensor, scale_offset
from .ptq import calibrate, check_calibrated, quant_layers, quantize, weight_quantizer
from .qat import freeze_bn_stats, freeze_quantizers, learned_ranges, prepare_qat, qat_quantizers
from .qat_modules import (ArqRetrainWeightQuantizer, LearnedActivationQuantizer, LsqActivationQuantizer,
                          LsqWeightQuantizer, UlqActivationQuantizer, UlqWeightQuantizer)
from .quantizers import ActivationQuantizer, ArqWeightQuantizer, CalibrationError

__all__ = ["AdaRoundWeightQuantizer", "optimize_rounding", "CALIBRATORS", "Calibrator", "HFMGCalibrator",
           "IFMRCalibrator", "MinMaxCalibrator", "MSECalibrator", "PercentileCalibrator", "make_calibrator",
           "dequantize", "fake_quantize", "qrange", "quantize_tensor", "scale_offset", "calibrate", "check_calibrated",
           "quant_layers", "quantize", "weight_quantizer", "ActivationQuantizer", "ArqWeightQuantizer",
           "CalibrationError", "prepare_qat", "freeze_bn_stats", "freeze_quantizers", "learned_ranges", "qat_quantizers",
           "ArqRetrainWeightQuantizer", "LearnedActivationQuantizer", "LsqActivationQuantizer", "LsqWeightQuantizer",
           "UlqActivationQuantizer", "UlqWeightQuantizer"]

"""Quantizer math (AMCT formulas), calibrators, quantizer modules, AdaRound, the PTQ and QAT passes, and
weight-only quantization (per-group min/max and GPTQ)."""

from .adaround import AdaRoundWeightQuantizer, optimize_rounding
from .balance import BalanceScale, InputBalance, balance, balance_factors, dmq_factors
from .calibrators import (CALIBRATORS, Calibrator, HFMGCalibrator, IFMRCalibrator, MinMaxCalibrator, MSECalibrator,
                          PercentileCalibrator, make_calibrator)
from .dynamic import (DynamicActivationQuantizer, DynamicQuantConv1D, DynamicQuantGRU, DynamicQuantLinear,
                      DynamicQuantLSTM, DynamicQuantRNN, dynamic_fake_quantize, dynamic_layers, dynamic_qparams,
                      quantize_dynamic)
from .formulas import dequantize, fake_quantize, qrange, quantize as quantize_tensor, scale_offset
from .ptq import calibrate, check_calibrated, quant_layers, quantize, weight_quantizer
from .qat import freeze_bn_stats, freeze_quantizers, learned_ranges, prepare_qat, qat_quantizers
from .qat_modules import (ArqRetrainWeightQuantizer, LearnedActivationQuantizer, LsqActivationQuantizer,
                          LsqWeightQuantizer, UlqActivationQuantizer, UlqWeightQuantizer)
from .quantizers import ActivationQuantizer, ArqWeightQuantizer, CalibrationError
from .weight_only import (GroupWeightQuantizer, gptq_quantize, group_scale_offset, quantize_weight_only,
                          weight_only_quantizers)

__all__ = ["AdaRoundWeightQuantizer", "optimize_rounding", "CALIBRATORS", "Calibrator", "HFMGCalibrator",
           "IFMRCalibrator", "MinMaxCalibrator", "MSECalibrator", "PercentileCalibrator", "make_calibrator",
           "dequantize", "fake_quantize", "qrange", "quantize_tensor", "scale_offset", "calibrate", "check_calibrated",
           "quant_layers", "quantize", "weight_quantizer", "ActivationQuantizer", "ArqWeightQuantizer",
           "CalibrationError", "prepare_qat", "freeze_bn_stats", "freeze_quantizers", "learned_ranges", "qat_quantizers",
           "ArqRetrainWeightQuantizer", "LearnedActivationQuantizer", "LsqActivationQuantizer", "LsqWeightQuantizer",
           "UlqActivationQuantizer", "UlqWeightQuantizer", "GroupWeightQuantizer", "gptq_quantize", "group_scale_offset",
           "quantize_weight_only", "weight_only_quantizers", "BalanceScale", "InputBalance", "balance", "balance_factors",
           "dmq_factors", "DynamicActivationQuantizer", "DynamicQuantConv1D", "DynamicQuantGRU", "DynamicQuantLinear",
           "DynamicQuantLSTM", "DynamicQuantRNN", "dynamic_fake_quantize", "dynamic_layers", "dynamic_qparams",
           "quantize_dynamic"]

"""AMCT's ``amct_pytorch.common`` import path, kept so AMCT scripts import unchanged.

Thin aliases onto :mod:`amct_torch.compat`: ``from amct_torch.common.auto_calibration import
AutoCalibrationEvaluatorBase`` is ``amct_pytorch.common.auto_calibration``'s class.
"""

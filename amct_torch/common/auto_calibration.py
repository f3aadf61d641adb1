"""AMCT's ``amct_pytorch.common.auto_calibration``: the evaluator base class AMCT scripts import from here.

    from amct_torch.common.auto_calibration import AutoCalibrationEvaluatorBase

A re-export of :mod:`amct_torch.compat.auto_calibration` (where the class and
``accuracy_based_auto_calibration`` live).
"""

from ..compat.auto_calibration import AutoCalibrationEvaluatorBase, accuracy_based_auto_calibration

__all__ = ["AutoCalibrationEvaluatorBase", "accuracy_based_auto_calibration"]

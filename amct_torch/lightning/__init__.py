"""Lightning callbacks that schedule the compression passes (they hold no algorithm).

* :class:`QuantizationAwareTraining` — prepare for QAT at fit setup, freeze BN statistics and ranges on a
  schedule, log the learned ranges, export at the end; resumable; :func:`load_qat_checkpoint`.
* :class:`PostTrainingQuantization` — quantize and calibrate a copy at evaluation time and log its
  metrics next to the fp32 ones.
* :class:`ONNXExport` — write the fake-quant and deploy ONNX models (or a plain fp32 one) of the last or
  best checkpoint at the end of fit.
"""

from .callbacks import ONNXExport, PostTrainingQuantization, QuantizationAwareTraining, load_qat_checkpoint

__all__ = ["QuantizationAwareTraining", "PostTrainingQuantization", "ONNXExport", "load_qat_checkpoint"]

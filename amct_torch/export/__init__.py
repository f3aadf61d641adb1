"""Export: ONNX for ONNX Runtime and Huawei ATC, and AMCT's record.

* :func:`export` — the verb (also ``amct_torch.export(model, prefix, x)``: this package is callable):
  fake-quant QDQ ONNX + deploy ONNX + record, all or nothing.
* :func:`qdq_to_deploy` — QuantizeLinear/DequantizeLinear ONNX -> AMCT deploy ONNX (AscendQuant / int8 layer /
  AscendDequant), with a :class:`DeployReport` of converted and kept-float layers.
* :func:`make_reference_evaluator` — run a deploy model on the CPU with reference implementations of the Ascend ops.
* :func:`export_dynamic` — dynamically quantized models (ORT's DynamicQuantizeLinear/MatMulInteger,
  DynamicQuantizeLSTM); :func:`export_weight_only` — per-group weight-only models (blocked DequantizeLinear).
"""

import sys
import types

from .ascend_ops import (ASCEND_DOMAIN, AscendAntiQuant, AscendDequant, AscendQuant, lower_for_reference,
                         make_reference_evaluator)
from .deploy import (ConvertedLayer, DeployConversionError, DeployReport, UnsupportedLayer, convert_qat_model,
                     fake_quant_from_qdq, pack_deq_param, pack_int4, qdq_to_deploy, unpack_deq_param, unpack_int4)

__all__ = ["ASCEND_DOMAIN", "AscendQuant", "AscendDequant", "AscendAntiQuant", "make_reference_evaluator",
           "lower_for_reference", "qdq_to_deploy", "DeployReport", "ConvertedLayer", "UnsupportedLayer",
           "DeployConversionError", "pack_deq_param", "unpack_deq_param", "pack_int4", "unpack_int4",
           "fake_quant_from_qdq", "convert_qat_model"]

from .api import ExportResult, export, record_of
from .dynamic import DynamicExportError, export_dynamic
from .onnx_qdq import export_qdq_model
from .weight_only import export_weight_only

__all__ += ["ExportResult", "export", "record_of", "export_qdq_model", "export_dynamic", "DynamicExportError",
            "export_weight_only"]


class _CallableModule(types.ModuleType):
    """``amct_torch.export`` is this package *and* the :func:`export` verb: ``amct_torch.export(model, ...)``
    writes the deployable files, ``amct_torch.export.make_reference_evaluator`` etc. stay reachable."""

    def __call__(self, *args, **kwargs):
        return export(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule

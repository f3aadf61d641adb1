"""The callbacks, in one place (``class_path: amct_torch.lightning.callbacks.<Name>`` works as well as
``amct_torch.lightning.<Name>``)."""

from .decompose import TensorDecomposition
from .distill import BlockwiseDistillation
from .clustering import WeightClustering, load_compressed_checkpoint
from .kvcache import KVCacheCalibration
from .onnx_export import ONNXExport
from .ptq import PostTrainingQuantization
from .pruning import ChannelPruning, MagnitudePruning, NMSparsity, load_pruned_checkpoint
from .qat import QuantizationAwareTraining, load_qat_checkpoint

__all__ = ["QuantizationAwareTraining", "PostTrainingQuantization", "ONNXExport", "load_qat_checkpoint",
           "MagnitudePruning", "ChannelPruning", "NMSparsity", "load_pruned_checkpoint", "WeightClustering",
           "load_compressed_checkpoint", "KVCacheCalibration", "TensorDecomposition", "BlockwiseDistillation"]

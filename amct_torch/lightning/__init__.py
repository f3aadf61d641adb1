"""Lightning callbacks that schedule the compression passes (they hold no algorithm).

* :class:`QuantizationAwareTraining` — prepare for QAT at fit setup, freeze BN statistics and ranges on a
  schedule, log the learned ranges, export at the end; resumable; :func:`load_qat_checkpoint`.
* :class:`PostTrainingQuantization` — quantize and calibrate a copy at evaluation time and log its
  metrics next to the fp32 ones.
* :class:`ONNXExport` — write the fake-quant and deploy ONNX models (or a plain fp32 one) of the last or
  best checkpoint at the end of fit.
* :class:`MagnitudePruning` — magnitude pruning on a step or epoch schedule; :class:`NMSparsity` — N:M
  (2:4) sparsity; :class:`ChannelPruning` — channel masks at setup or at an epoch, optionally shrunk at the
  end of fit. All resumable; :func:`load_pruned_checkpoint` rebuilds a pruned (or shrunk) module.
* :class:`WeightClustering` — cluster stages at setup, clustered from an epoch on; with the pruning and
  QAT callbacks in one Trainer the pipelines are mask -> cluster -> fake-quant whatever the list order
  (PQAT, CQAT, PCQAT); :func:`load_compressed_checkpoint` rebuilds any combination from a checkpoint.
* :class:`KVCacheCalibration` — KV-cache factors calibrated on validation batches; logs perplexity with
  and without the INT8 cache.
* :class:`TensorDecomposition` — low-rank factors at setup (first in the pipeline), then fine-tuned; the
  checkpoint carries the decomposition info, so :func:`load_compressed_checkpoint` rebuilds it.
* :class:`BlockwiseDistillation` — adds the block-wise distillation loss against a frozen float teacher
  (copied at setup, before the other callbacks compress the network) to every training step.
"""

from .callbacks import (BlockwiseDistillation, TensorDecomposition, ChannelPruning, MagnitudePruning, NMSparsity, ONNXExport, PostTrainingQuantization,
                        KVCacheCalibration, QuantizationAwareTraining, WeightClustering, load_compressed_checkpoint,
                        load_pruned_checkpoint, load_qat_checkpoint)

__all__ = ["QuantizationAwareTraining", "PostTrainingQuantization", "ONNXExport", "load_qat_checkpoint",
           "MagnitudePruning", "ChannelPruning", "NMSparsity", "load_pruned_checkpoint", "WeightClustering",
           "load_compressed_checkpoint", "KVCacheCalibration", "TensorDecomposition", "BlockwiseDistillation"]

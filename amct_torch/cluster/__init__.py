"""Weight clustering (k-means, trainable centroids) and the collaborative-optimization checks.

The cluster stage sits between the masks and the quantizer in a weight pipeline (mask -> cluster ->
fake-quant), so pruning, clustering and quantization compose: PQAT, CQAT and PCQAT are ``prepare_qat`` on
a pruned, clustered or pruned-and-clustered model, and :func:`check_preservation` verifies that the
quantized weights keep the zeros and the cluster count of the stages before.
"""

from .api import (PreservationReport, activate_clusters, check_preservation, cluster_weights, clustered_layers, quant_granularity_for,
                  reassign_clusters, strip_clustering)
from .kmeans import init_centroids, kmeans_rows, nearest
from .stage import ClusterStage, cluster_stage

__all__ = ["ClusterStage", "cluster_stage", "cluster_weights", "activate_clusters", "clustered_layers", "reassign_clusters",
           "strip_clustering", "quant_granularity_for", "PreservationReport", "check_preservation", "init_centroids",
           "kmeans_rows", "nearest"]

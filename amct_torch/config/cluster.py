"""Weight-clustering config (TF-MOT's ``cluster_weights``; the cluster stage of a weight pipeline).

    >>> ClusterConfig(clusters=16).short()
    'cluster 16 per_tensor kmeans++, zeros kept'
    >>> ClusterConfig(clusters=8, granularity="per_channel", init="density").short()
    'cluster 8 per_channel density, zeros kept'
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from .base import Config, check_range

__all__ = ["ClusterConfig"]


@dataclass(frozen=True)
class ClusterConfig(Config):
    """How the weights of a layer are clustered (k-means, 1-D over the weight values).

    Args:
        clusters: distinct values per tensor (``per_tensor``) or per output channel (``per_channel``), 2..256,
            the zero centroid included when ``preserve_sparsity`` keeps one.
        granularity: ``per_tensor`` (one codebook per weight, TF-MOT's default) or ``per_channel`` (one per
            output channel: better accuracy on convolution-heavy models; the count is then per channel).
        init: centroid initialisation: ``kmeans++`` (D^2 sampling, seeded), ``linear`` (evenly spaced between
            the smallest and the largest weight) or ``density`` (at evenly spaced quantiles of the weights).
        preserve_sparsity: zero weights (a pruning mask's, or exact zeros) get a fixed zero centroid that
            never trains, and nonzero weights are never assigned to it: sparsity stays exactly what it was.
        iterations: Lloyd iterations at most (stops earlier when no assignment changes).
        seed: for ``kmeans++``.
        update_weights: during fine-tuning the original weights also receive the gradient (straight
            through the cluster lookup), so :func:`~amct_torch.cluster.reassign_clusters` can move weights
            between clusters; the centroids train either way.
    """

    clusters: int = 16
    granularity: Literal["per_tensor", "per_channel"] = "per_tensor"
    init: Literal["kmeans++", "linear", "density"] = "kmeans++"
    preserve_sparsity: bool = True
    iterations: int = 50
    seed: int = 0
    update_weights: bool = True

    def validate(self) -> None:
        name = type(self).__name__
        check_range(name, "clusters", self.clusters, 2, 256)
        check_range(name, "iterations", self.iterations, 0)

    def short(self) -> str:
        return (f"cluster {self.clusters} {self.granularity} {self.init}"
                f"{', zeros kept' if self.preserve_sparsity else ''}")

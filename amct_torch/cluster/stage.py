"""The cluster stage of a weight pipeline (mask -> cluster -> fake-quant).

``w -> table[assignment]``: each weight is replaced by the centroid of its cluster. The centroids are a
parameter (``centroids``, ``(rows, k)``: one row for per-tensor clustering, one per output channel
otherwise); the assignments are a buffer and stay fixed while training, so the gradient of a centroid is
the sum of its members' gradients (the lookup's backward is a scatter-add). :meth:`ClusterStage.reassign`
moves every weight to its nearest centroid on demand.

Sparsity preserving (``preserve_sparsity``): when the stage's input has zeros (a mask stage before it, or
exact zeros), the table gets a fixed zero in front of the trainable centroids; zero weights point at it and
nonzero ones never do, so the output has exactly the input's zeros for as long as the stage lives.

With ``update_weights`` the input weight also receives the output's gradient (straight through the lookup),
as TF-MOT trains its original weights, so that a later :meth:`reassign` reflects what training wanted.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..config import ClusterConfig
from ..quant.formulas import channel_major, from_channel_major
from .kmeans import kmeans_rows, nearest

__all__ = ["ClusterStage", "cluster_stage"]


class ClusterStage(nn.Module):
    """Weight stage ``w -> table[assignment]`` (see the module docstring).

    Args:
        weight: the stage's input weight at creation (after any mask), clustered now.
        config: the :class:`~amct_torch.config.ClusterConfig`.
        axis, groups: the weight's output-channel axis and ConvTranspose groups (per-channel rows).
    """

    def __init__(self, weight: torch.Tensor, config: ClusterConfig, axis: int = 0, groups: int = 1, *,
                 cluster_now: bool = True):
        super().__init__()
        self.config = config
        self.per_channel = config.granularity == "per_channel"
        self.axis, self.groups = axis, groups
        self.shape = tuple(weight.shape)
        rows = self._rows(weight.detach())
        # shapes fixed at creation, whatever the clustering finds (checkpoints load into a fresh stage)
        self.centroids = nn.Parameter(torch.zeros(rows.shape[0], config.clusters, dtype=weight.dtype,
                                                  device=weight.device))
        self.register_buffer("assignment", torch.zeros(rows.shape, dtype=torch.uint8, device=weight.device))
        self.register_buffer("zero_slot", torch.tensor(False, device=weight.device))
        self.register_buffer("active", torch.tensor(False, device=weight.device))
        if cluster_now:
            self.fit(weight)

    @torch.no_grad()
    def fit(self, weight: torch.Tensor) -> None:
        """Cluster ``weight`` (the stage's input) now: k-means, then the stage replaces weights by centroids.
        With ``preserve_sparsity`` and zeros in ``weight``, column 0 of the table is the fixed zero."""
        cfg = self.config
        rows = self._rows(weight.detach()).float()
        zero = rows == 0
        zero_slot = bool(cfg.preserve_sparsity and zero.any())
        valid = ~zero if zero_slot else torch.ones_like(zero)
        k = cfg.clusters - 1 if zero_slot else cfg.clusters
        centroids, assign = kmeans_rows(rows, valid, k, init=cfg.init, iterations=cfg.iterations, seed=cfg.seed)
        if zero_slot:
            centroids = F.pad(centroids, (1, 0))
            assign = torch.where(valid, assign + 1, torch.zeros_like(assign))
        self.centroids.copy_(centroids)
        self.assignment.copy_(assign)
        self.zero_slot.fill_(zero_slot)
        self.active.fill_(True)

    # -- layout ------------------------------------------------------------------------------------
    def _rows(self, w: torch.Tensor) -> torch.Tensor:
        return channel_major(w, self.axis, self.groups) if self.per_channel else w.reshape(1, -1)

    def _unrows(self, rows: torch.Tensor) -> torch.Tensor:
        return from_channel_major(rows, self.shape, self.axis, self.groups) if self.per_channel else rows.reshape(self.shape)

    def table(self) -> torch.Tensor:
        """``(rows, clusters)`` lookup table: the centroids, with column 0 the fixed zero when zeros are kept
        (that column of the parameter is never used, so it gets no gradient)."""
        if not bool(self.zero_slot):
            return self.centroids
        return F.pad(self.centroids[:, 1:], (1, 0))

    # -- the stage -----------------------------------------------------------------------------------
    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        if tuple(weight.shape) != self.shape:
            raise ValueError(f"cluster stage: got a weight of shape {tuple(weight.shape)}; it was built for {self.shape}")
        if not bool(self.active):
            return weight  # created, not clustered yet (a scheduled start): the identity
        out = self._unrows(torch.gather(self.table(), 1, self.assignment.long())).to(weight.dtype)
        if self.config.update_weights and weight.requires_grad and torch.is_grad_enabled():
            out = out + (weight - weight.detach())  # exactly 0: only the gradient passes to the input weight
        return out

    @torch.no_grad()
    def reassign(self, weight: torch.Tensor) -> int:
        """Move every weight of ``weight`` (this stage's input) to its nearest centroid; returns how many
        changed cluster. Zero weights stay on the zero centroid and nonzero ones stay off it."""
        if not bool(self.active):
            raise ValueError("cluster stage: not clustered yet (fit or activate it first)")
        rows = self._rows(weight.detach()).to(self.centroids.dtype)
        if bool(self.zero_slot):
            new = nearest(rows, self.centroids.detach()[:, 1:]) + 1
            new = torch.where(self.assignment == 0, torch.zeros_like(new), new)
        else:
            new = nearest(rows, self.centroids.detach())
        new = new.to(self.assignment.dtype)
        changed = int((new != self.assignment).sum())
        self.assignment.copy_(new)
        return changed

    def unique_values(self) -> int:
        """Distinct values of the output, per tensor (or the largest count over the channels)."""
        table = self.table().detach()
        used = [torch.unique(table[r, torch.unique(self.assignment[r].long())]).numel() for r in range(table.shape[0])]
        return max(used)

    def extra_repr(self) -> str:
        return self.config.short() + ("" if bool(self.active) else ", not clustered yet")


def cluster_stage(layer: nn.Module) -> ClusterStage | None:
    """The cluster stage of a wrapper's pipeline, if any."""
    for stage in getattr(layer, "weight_pipeline", None) or ():
        if isinstance(stage, ClusterStage):
            return stage
    return None

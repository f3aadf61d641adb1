"""Tensor-decomposition config (AMCT's ``auto_decomposition``, generalised): how each Conv2d (and, on request,
Linear) layer is split into low-rank factors and how its rank is chosen.

    >>> DecomposeConfig().short()
    'decompose spatial, rank evbmf'
    >>> DecomposeConfig(conv_method="tucker2", rank_selection="macs", macs_ratio=0.5, rank_multiple=8).short()
    'decompose tucker2, rank for 0.5 of the MACs (decomposable layers) (x8)'
    >>> DecomposeConfig(rank_selection="fixed", rank=16, linear=True).short()
    'decompose spatial + linear svd, rank 16'
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Optional, Union

from .base import Config, ConfigError, check_range

__all__ = ["DecomposeConfig"]


@dataclass(frozen=True)
class DecomposeConfig(Config):
    """How layers are decomposed (see :func:`amct_torch.decompose.decompose`).

    Args:
        conv_method: ``spatial`` (AMCT's split: a ``kh x 1`` conv to ``r`` channels, then a ``1 x kw`` conv
            back to ``C_out``, by a truncated SVD of the weight seen as a ``(C_in*kh, C_out*kw)`` matrix) or
            ``tucker2`` (1x1 conv ``C_in -> r_in``, ``kh x kw`` core conv ``r_in -> r_out``, 1x1 conv
            ``r_out -> C_out``; factors by HOSVD of the output and input unfoldings).
        linear: also decompose ``nn.Linear`` layers by a truncated SVD (two Linears). AMCT decomposes
            convolutions only, hence off by default.
        rank_selection: ``evbmf`` (empirical variational Bayes matrix factorization: the number of singular
            values above the analytic threshold for the estimated noise level; AMCT's choice), ``energy``
            (smallest rank keeping ``energy`` of the sum of squared singular values), ``macs`` (one global
            target: ``macs_ratio`` of the MACs kept, see :func:`~amct_torch.decompose.decompose`) or
            ``fixed`` (``rank``).
        energy: for ``energy``: the fraction of the squared singular values kept, in (0, 1].
        macs_ratio: for ``macs``: the fraction of the MACs kept, in (0, 1).
        macs_scope: for ``macs``: the MACs the ratio is of: ``decomposable`` (the layers whose rank the target
            chooses) or ``model`` (the whole model, as :func:`~amct_torch.analysis.flops.count_flops` counts it).
        rank: for ``fixed``: one rank for every layer (``(r_in, r_out)`` for ``tucker2``; an int means both);
            capped at a layer's full rank.
        rank_multiple: round selected ranks up to a multiple of this (AMCT rounds its EVBMF rank; 8 or 16
            suit accelerators' channel blocks), never above the full rank. Fixed ranks are not rounded.
        min_saving: decompose a layer only when it saves at least this fraction of its MACs (of its
            parameters when no example input is given); a decomposition that saves nothing is always skipped.
        hooi_iterations: ``tucker2`` only: HOOI (alternating) refinement iterations after the HOSVD.
    """

    conv_method: Literal["spatial", "tucker2"] = "spatial"
    linear: bool = False
    rank_selection: Literal["evbmf", "energy", "macs", "fixed"] = "evbmf"
    energy: float = 0.9
    macs_ratio: float = 0.5
    macs_scope: Literal["decomposable", "model"] = "decomposable"
    rank: Optional[Union[int, tuple[int, int]]] = None
    rank_multiple: int = 1
    min_saving: float = 0.0
    hooi_iterations: int = 0

    def validate(self) -> None:
        name = type(self).__name__
        check_range(name, "energy", self.energy, 0.0, 1.0, lo_open=True)
        check_range(name, "macs_ratio", self.macs_ratio, 0.0, 1.0, lo_open=True, hi_open=True)
        check_range(name, "rank_multiple", self.rank_multiple, 1)
        check_range(name, "min_saving", self.min_saving, 0.0, 1.0, hi_open=True)
        check_range(name, "hooi_iterations", self.hooi_iterations, 0)
        if self.rank is not None:
            for r in (self.rank if isinstance(self.rank, tuple) else (self.rank,)):
                if r < 1:
                    raise ConfigError(f"{name}.rank", self.rank, "ranks >= 1")
            if isinstance(self.rank, tuple) and self.conv_method != "tucker2":
                raise ConfigError(f"{name}.rank", self.rank, "one int for conv_method='spatial' "
                                  "((r_in, r_out) pairs are for conv_method='tucker2')")
        if self.rank_selection == "fixed" and self.rank is None:
            raise ConfigError(f"{name}.rank", None, "a rank (int, or (r_in, r_out) for tucker2) when "
                              "rank_selection='fixed'")

    def short(self) -> str:
        what = self.conv_method + (" + linear svd" if self.linear else "")
        if self.rank_selection == "fixed":
            how = f"rank {self.rank}"
        elif self.rank_selection == "energy":
            how = f"rank for {self.energy:g} energy"
        elif self.rank_selection == "macs":
            how = f"rank for {self.macs_ratio:g} of the MACs ({self.macs_scope} layers)" \
                if self.macs_scope == "decomposable" else f"rank for {self.macs_ratio:g} of the model's MACs"
        else:
            how = "rank evbmf"
        return f"decompose {what}, {how}{f' (x{self.rank_multiple})' if self.rank_multiple > 1 else ''}"

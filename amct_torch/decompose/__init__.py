"""Tensor decomposition: Conv2d (AMCT's kx1 + 1xk spatial split, or Tucker-2) and Linear (SVD) layers
replaced in place by low-rank factors, with EVBMF / energy / MACs-target / fixed rank selection.

    from amct_torch.config.decompose import DecomposeConfig
    from amct_torch.decompose import decompose, plan_decomposition, save_decomposition_info, apply_decomposition_info

    print(plan_decomposition(model, DecomposeConfig(rank_selection="macs", macs_ratio=0.5), x))
    model, plan = decompose(model, DecomposeConfig(rank_selection="macs", macs_ratio=0.5), x)
    save_decomposition_info(plan, "decompose_info.json")       # rebuild later with apply_decomposition_info

AMCT's ``auto_decomposition`` / ``decompose_network`` are in :mod:`amct_torch.compat.decompose`
(importable as :mod:`amct_torch.tensor_decompose`).
"""

from .api import conv_eligibility, decompose, linear_eligibility, plan_decomposition
from .factors import linear_svd, spatial_matrix, spatial_svd, tucker2
from .info import (apply_decomposition_info, check_decomposition_info, decomposition_info, load_decomposition_info,
                   save_decomposition_info)
from .plan import DecompositionPlan, LayerDecomposition
from .rank import EvbmfResult, energy_kept, energy_rank, evbmf, evbmf_rank, round_rank

__all__ = ["decompose", "plan_decomposition", "conv_eligibility", "linear_eligibility", "spatial_svd", "tucker2",
           "linear_svd", "spatial_matrix", "DecompositionPlan", "LayerDecomposition", "decomposition_info",
           "save_decomposition_info", "load_decomposition_info", "check_decomposition_info",
           "apply_decomposition_info", "EvbmfResult", "evbmf", "evbmf_rank", "energy_rank", "energy_kept", "round_rank"]

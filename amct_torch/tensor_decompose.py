"""AMCT's import path for tensor decomposition: ``from amct_torch.tensor_decompose import auto_decomposition,
decompose_network`` works as ``from amct_pytorch.tensor_decompose import ...`` does in AMCT scripts.

A thin alias of :mod:`amct_torch.compat.decompose`; the Pythonic pass is :func:`amct_torch.decompose.decompose`.
"""

from .compat.decompose import auto_decomposition, decompose_network

__all__ = ["auto_decomposition", "decompose_network"]

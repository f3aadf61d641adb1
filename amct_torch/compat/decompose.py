"""AMCT's tensor-decomposition functions, built on :func:`amct_torch.decompose.decompose`.

An AMCT script runs unchanged (``amct_torch.tensor_decompose`` is AMCT's import path)::

    from amct_torch.tensor_decompose import auto_decomposition, decompose_network

    model, changes = auto_decomposition(model, decompose_info_path="./tmp/decompose_info.json")
    # changes == {'conv1': ['conv1.0', 'conv1.1'], ...}; fine-tune model, then save its state_dict

    # later, in the training or deployment script, on a fresh (undecomposed) model:
    model, changes = decompose_network(model, "./tmp/decompose_info.json")
    model.load_state_dict(torch.load("decomposed.pth"))

As in AMCT both change the model **in place** (and return it), decide eligibility from the modules alone
(no input data): ``nn.Conv2d`` with ``groups=1``, ``dilation=1``, stride below 3 and a kernel above 2 in both
dimensions, split into a ``kh x 1`` conv and a ``1 x kw`` conv. Run them before building the optimizer
and before wrapping the model in DistributedDataParallel.

AMCT's defaults, as implemented here: the rank of each layer is EVBMF's on the spatial matrix, rounded up
to a multiple of 16 (:data:`AMCT_RANK_MULTIPLE`: AMCT rounds its EVBMF rank; 16 is Ascend's channel block),
never above the full rank; a layer whose rounded rank would not save parameters is left alone (there is no
example input, so parameters are the measure; for stride-1 convs the MACs fall in the same proportion).
EVBMF ranks are aggressive (small or briefly trained layers may look like noise to it): fine-tune after
decomposing, as AMCT's workflow does, or use :func:`amct_torch.decompose.decompose` with a MACs target.
"""

from __future__ import annotations

import os
from typing import Any

import torch.nn as nn

from ..config.decompose import DecomposeConfig
from ..decompose import apply_decomposition_info, decompose

__all__ = ["auto_decomposition", "decompose_network", "AMCT_DEFAULT", "AMCT_RANK_MULTIPLE"]

AMCT_RANK_MULTIPLE = 16
AMCT_DEFAULT = DecomposeConfig(conv_method="spatial", linear=False, rank_selection="evbmf",
                               rank_multiple=AMCT_RANK_MULTIPLE)


def _unwrap(model: Any, function: str) -> nn.Module:
    """The module to change: DataParallel's ``.module``; DistributedDataParallel is refused."""
    if isinstance(model, nn.parallel.DistributedDataParallel):
        raise TypeError(f"{function}: the model is wrapped in DistributedDataParallel, which has already registered "
                        "its parameters; decompose the plain model first, then wrap it (as AMCT requires)")
    if isinstance(model, nn.DataParallel):
        return model.module
    if not isinstance(model, nn.Module):
        raise TypeError(f"{function}(model, ...): got {type(model).__name__}; allowed: a torch.nn.Module")
    return model


def _check_path(path: Any, function: str, *, must_exist: bool) -> str:
    if not isinstance(path, (str, os.PathLike)) or not os.fspath(path):
        raise TypeError(f"{function}: decompose_info_path: got {path!r}; allowed: a file path (str or os.PathLike)")
    path = os.fspath(path)
    if os.path.isdir(path):
        raise IsADirectoryError(f"{function}: decompose_info_path {path!r} is a directory; give a file path such as "
                                f"{os.path.join(path, 'decompose_info.json')!r}")
    if must_exist and not os.path.isfile(path):
        raise FileNotFoundError(f"{function}: decompose_info_path {path!r} not found; write it with "
                                "auto_decomposition(model, decompose_info_path=...)")
    if not must_exist:
        parent = os.path.dirname(os.path.abspath(path))
        probe = parent
        while probe and not os.path.exists(probe):
            probe = os.path.dirname(probe)
        if probe and not os.path.isdir(probe):
            raise NotADirectoryError(f"{function}: decompose_info_path {path!r}: {probe!r} is a file, not a folder")
        if probe and not os.access(probe, os.W_OK):
            raise PermissionError(f"{function}: decompose_info_path {path!r}: folder {probe!r} is not writable")
    return path


def auto_decomposition(model: nn.Module, decompose_info_path: str | os.PathLike | None = None
                       ) -> tuple[nn.Module, dict[str, list[str]]]:
    """Decompose every eligible ``nn.Conv2d`` of ``model`` in place (AMCT's defaults, see the module docstring).

    Args:
        model: the trained float model (a ``DataParallel`` wrapper is accepted: its ``.module`` is changed).
        decompose_info_path: where to write the decomposition info JSON (atomically: complete or untouched),
            for :func:`decompose_network`; ``None`` writes nothing.

    Returns ``(model, changes)``: the same model object, and ``{'conv1': ['conv1.0', 'conv1.1'], ...}`` with
    module paths relative to the unwrapped model. The plan (every conv, decomposed or why not) is
    ``model.amct_decompose_plan`` on the unwrapped model.
    """
    inner = _unwrap(model, "auto_decomposition")
    path = None if decompose_info_path is None else _check_path(decompose_info_path, "auto_decomposition",
                                                                must_exist=False)
    # the info is written before the model changes: a failed write leaves the model as it was
    _, plan = decompose(inner, AMCT_DEFAULT, inplace=True, info_path=path)
    inner.amct_decompose_plan = plan
    return model, plan.changes()


def decompose_network(model: nn.Module, decompose_info_path: str | os.PathLike) -> tuple[nn.Module, dict[str, list[str]]]:
    """Re-apply the structure recorded by :func:`auto_decomposition` to an undecomposed ``model``, in place.

    The factors are default-initialised: load the decomposed model's ``state_dict`` afterwards. Raises,
    before changing anything, when the file does not fit the model (a missing layer, other shapes), naming
    the layers.

    Returns ``(model, changes)`` as :func:`auto_decomposition` does.
    """
    inner = _unwrap(model, "decompose_network")
    path = _check_path(decompose_info_path, "decompose_network", must_exist=True)
    _, changes = apply_decomposition_info(inner, path, inplace=True)
    return model, changes


"""N:M structured sparsity (2:4 by default; AMCT's ``M4N2`` L1 selective prune).

    model = apply_nm(model, NMConfig(), x)                    # 2 of every 4 input-channel weights kept
    model = apply_nm(model, NMConfig(update_freq=100, ste=True), x)   # recomputed every 100 batches, SR-STE

In every group of ``m`` consecutive weights along the **input-channel** axis the ``n`` largest ``|w|`` are
kept: Conv: weight ``(out, in/groups, *k)``, groups along axis 1 for every ``(out, *k)``; ConvTranspose:
weight ``(in, out/groups, *k)``, axis 0, within each convolution group; Linear: weight ``(out, in)``,
axis 1; transformers' Conv1D: weight ``(in, out)``, axis 0.

Input channels that are not a multiple of ``m`` are padded to one, as AMCT does; the padded positions are
not weights and are never kept, so the last group of ``r < m`` real weights keeps ``min(r, n)`` of them
(it has at most ``n`` nonzeros among its ``m`` slots, as the hardware sees it).

``update_freq``: the mask is computed at prepare and again on the first training batch (AMCT: chosen on
the first batch), then fixed (``0``) or recomputed from the current dense weights every ``update_freq``
training batches. The batch counter is a buffer, so a resumed run recomputes on the same batches.

Deployment: PyTorch's semi-structured sparse kernels (``torch.sparse.to_sparse_semi_structured``) run 2:4
Linear weights in float16/bfloat16 on CUDA GPUs of compute capability 8.0 or newer;
:func:`to_semi_structured` converts the layers that qualify and reports every other one with the reason.
On a CPU the zeros stay in dense tensors: the honest figure is the zero fraction, not a speed-up.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..config import Config, NMConfig, Targeting
from ..graph.plan import render_table
from ..nn import CompressedConvTranspose, CompressedLayer
from .magnitude import sparsity_pass
from .masks import MaskStage, _SrSte, mask_stage

__all__ = ["apply_nm", "nm_mask", "NMMaskStage", "nm_layers", "input_channel_axis", "to_semi_structured",
           "SemiStructuredReport"]


def nm_mask(weight: torch.Tensor, n: int = 2, m: int = 4, axis: int = 1, groups: int = 1) -> torch.Tensor:
    """0/1 mask (float) keeping the ``n`` largest ``|w|`` of every ``m`` consecutive weights along ``axis``.

    ``groups > 1`` splits ``axis`` into that many equal parts first, so no group of ``m`` straddles two
    (ConvTranspose's input axis holds every convolution group). A part whose length is not a multiple of
    ``m`` is padded; padded slots are never kept.
    """
    if not 1 <= n < m:
        raise ValueError(f"nm_mask: got n={n}, m={m}; allowed: 1 <= n < m")
    axis = axis % weight.dim()
    scores = weight.detach().float().abs()
    shape = list(scores.shape)
    if groups > 1:
        if shape[axis] % groups:
            raise ValueError(f"nm_mask: axis {axis} has {shape[axis]} entries, not divisible by groups={groups}")
        scores = scores.reshape(shape[:axis] + [groups, shape[axis] // groups] + shape[axis + 1:])
        axis += 1
    scores = scores.movedim(axis, -1)
    length = scores.shape[-1]
    pad = (-length) % m
    if pad:
        scores = F.pad(scores, (0, pad), value=-1.0)  # below every |w|: a padded slot is never chosen
    blocks = scores.reshape(*scores.shape[:-1], -1, m)
    mask = torch.zeros_like(blocks).scatter_(-1, blocks.topk(n, dim=-1).indices, 1.0)
    mask = mask.reshape(*scores.shape[:-1], length + pad)[..., :length]
    return mask.movedim(-1, axis).reshape(weight.shape)


def input_channel_axis(layer: CompressedLayer) -> int:
    """The input-channel axis of a wrapper's weight: 1 when outputs are on axis 0 (Conv, Linear), else 0."""
    return 1 if layer.weight_channel_axis == 0 else 0


class NMMaskStage(MaskStage):
    """A :class:`MaskStage` whose mask is N:M along the input-channel axis and may be recomputed in training.

    In training mode ``forward`` counts batches (``batches`` buffer) and recomputes the mask from the
    incoming dense weight on the first batch and, with ``update_freq = k > 0``, every ``k`` batches.
    """

    def __init__(self, weight: torch.Tensor, n: int = 2, m: int = 4, axis: int = 1, *, groups: int = 1,
                 update_freq: int = 0, ste: bool = False, decay: float = 2e-4):
        super().__init__(weight, "n:m", ste=ste, decay=decay)
        self.n, self.m, self.axis, self.groups, self.update_freq = n, m, axis, groups, update_freq
        self.register_buffer("batches", torch.zeros((), dtype=torch.long))
        self._batches = 0  # mirror of the buffer: reading a CUDA buffer every batch would synchronise
        self.update(weight)

    @torch.no_grad()
    def update(self, weight: torch.Tensor) -> None:
        """Recompute the mask from ``weight`` (the dense weight)."""
        self.set_mask(nm_mask(weight, self.n, self.m, self.axis, self.groups))

    def _load_from_state_dict(self, state_dict, prefix, *args: Any) -> None:  # type: ignore[override]
        super()._load_from_state_dict(state_dict, prefix, *args)
        self._batches = int(self.batches)

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        if self.training:
            b = self._batches
            if b == 0 or (self.update_freq and b % self.update_freq == 0):
                self.update(weight)
            self._batches = b + 1
            self.batches.fill_(self._batches)
            if self.update_freq:  # a later batch updates the buffer in place: autograd must hold a copy
                mask = self.mask.to(weight.dtype, copy=True)
                return _SrSte.apply(weight, mask, self.decay) if self.ste else weight * mask
        return super().forward(weight)

    def extra_repr(self) -> str:
        return f"{self.n}:{self.m} along axis {self.axis}, update_freq={self.update_freq}, " + super().extra_repr()


def _groups_along_input(layer: CompressedLayer) -> int:
    return getattr(layer.module, "groups", 1) if isinstance(layer, CompressedConvTranspose) else 1


def apply_nm(model: nn.Module, config: NMConfig | Targeting | None = None, example_inputs: Any = None, *,
             inplace: bool = False, verbose: bool = False) -> nn.Module:
    """Prepare ``model`` for N:M sparsity; returns the prepared copy with every mask already computed.

    Args:
        model: the model (usually trained).
        config: one :class:`NMConfig` (default 2:4, mask fixed after the first batch) for every layer with
            a weight, or a :class:`Targeting` of them (e.g. ``skip=["conv1"]`` for a 3-channel stem).
        example_inputs: inputs for graph capture.
        inplace: modify ``model`` itself.
        verbose: print the plan.

    ``model.amct_prune_plan`` lists every layer and what it got. Train as usual (``update_freq`` and
    SR-STE act inside the mask stage), then :func:`to_semi_structured` on CUDA for the sparse kernels.
    """
    config = NMConfig() if config is None else config
    targeting = config if isinstance(config, Targeting) else Targeting(config)

    def attach(name: str, layer: CompressedLayer, cfg: Config) -> None:
        if not isinstance(cfg, NMConfig):
            raise TypeError(f"apply_nm: layer {name!r} got {type(cfg).__name__}; allowed: NMConfig")
        stage = NMMaskStage(layer.module.weight, cfg.n, cfg.m, input_channel_axis(layer),
                            groups=_groups_along_input(layer), update_freq=cfg.update_freq, ste=cfg.ste, decay=cfg.decay)
        layer.weight_pipeline.insert(0, stage)
        layer.nm_config = cfg

    model = sparsity_pass(model, targeting, example_inputs, attach, title="apply_nm", inplace=inplace)
    if verbose:
        print(model.amct_prune_plan)
    return model


def nm_layers(model: nn.Module) -> dict[str, CompressedLayer]:
    """Every wrapper with an N:M mask, by module path."""
    return {name: m for name, m in model.named_modules() if isinstance(mask_stage(m), NMMaskStage)}


# -- deployment: PyTorch's semi-structured sparse kernels ---------------------------------------
_KERNEL_DTYPES = (torch.float16, torch.bfloat16)


@dataclass
class SemiStructuredReport:
    """What :func:`to_semi_structured` did: converted layers, skipped ones with the reason, zero fractions."""

    converted: list[str] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)
    zero_fraction: dict[str, float] = field(default_factory=dict)
    note: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {"converted": list(self.converted), "skipped": dict(self.skipped),
                "zero_fraction": dict(self.zero_fraction), "note": self.note}

    def __str__(self) -> str:
        rows = [(n, "converted" if n in self.converted else "dense with zeros", f"{z:.1%}", self.skipped.get(n, ""))
                for n, z in self.zero_fraction.items() if n != "total"]
        head = (f"semi-structured sparsity: {len(self.converted)} of {len(rows)} N:M layers converted; "
                f"zero fraction {self.zero_fraction.get('total', 0.0):.1%}")
        parts = [head] + ([self.note] if self.note else [])
        return "\n".join(parts + [render_table(["layer", "form", "zeros", "why not converted"], rows)])


def _kernels_unavailable() -> str | None:
    if not torch.cuda.is_available():
        return ("PyTorch's semi-structured sparse kernels are CUDA-only and CUDA is not available: the N:M zeros "
                "stay in dense tensors (same size, same speed); the figure to report is the zero fraction")
    if not hasattr(torch.sparse, "to_sparse_semi_structured"):
        return f"torch {torch.__version__} has no torch.sparse.to_sparse_semi_structured"
    return None


def _why_not(layer: CompressedLayer) -> str | None:
    stage = mask_stage(layer)
    w = layer.module.weight
    if not isinstance(layer.module, nn.Linear):
        return f"{type(layer.module).__name__}: the semi-structured kernels take Linear weights only"
    if (stage.n, stage.m) != (2, 4):
        return f"{stage.n}:{stage.m} sparsity; the kernels take 2:4 only"
    if len(layer.weight_pipeline) != 1 or layer.input_quantizer is not None or layer.output_quantizer is not None:
        return "it carries more than its mask (quantizers, clusters); export that model instead"
    if w.device.type != "cuda":
        return f"its weight is on {w.device.type}; the kernels are CUDA-only (model.cuda() first)"
    if w.dtype not in _KERNEL_DTYPES:
        return f"its weight is {str(w.dtype).replace('torch.', '')}; the kernels take float16 or bfloat16 (model.half() first)"
    major, minor = torch.cuda.get_device_capability(w.device)
    if major < 8:
        return f"GPU compute capability {major}.{minor}; the kernels need 8.0 (Ampere) or newer"
    return None


def to_semi_structured(model: nn.Module, *, inplace: bool = False, strict: bool = False) -> tuple[nn.Module, SemiStructuredReport]:
    """Replace every eligible 2:4 Linear by a plain ``nn.Linear`` whose weight is a semi-structured sparse
    tensor (inference only); return the model and a :class:`SemiStructuredReport`.

    Eligible: a Linear with a 2:4 mask and nothing else attached, on CUDA (compute capability >= 8.0), in
    float16 or bfloat16, with a shape the kernels accept. Everything else keeps its zeros dense and is
    reported with the reason; on a CPU that is every layer, and the report gives the zero fraction.
    ``strict=True`` raises ``RuntimeError`` (with the report) when no layer could be converted.
    """
    if not inplace:
        model = copy.deepcopy(model)
    layers = nm_layers(model)
    report = SemiStructuredReport()
    zeros = total = 0
    for name, layer in layers.items():
        with torch.no_grad():
            w = layer.effective_weight()
        z = int((w == 0).sum())
        report.zero_fraction[name] = z / w.numel()
        zeros, total = zeros + z, total + w.numel()
    report.zero_fraction["total"] = zeros / total if total else 0.0
    if not layers:
        report.note = "the model has no N:M layers (apply_nm first)"
    blocker = _kernels_unavailable()
    for name, layer in layers.items():
        reason = blocker or _why_not(layer)
        if reason is None:
            with torch.no_grad():
                w = layer.effective_weight().detach()
            try:
                sparse = torch.sparse.to_sparse_semi_structured(w)
            except (RuntimeError, ValueError) as err:  # shape or dtype the kernels do not take
                reason = f"to_sparse_semi_structured refused it: {str(err).splitlines()[0]}"
            else:
                linear = layer.module
                linear.weight = nn.Parameter(sparse, requires_grad=False)
                model.set_submodule(name, linear)
                report.converted.append(name)
                continue
        report.skipped[name] = reason
    if blocker is not None:
        report.note = blocker
        report.skipped = {n: "CUDA-only kernels" for n in report.skipped}
    if strict and not report.converted:
        raise RuntimeError(f"to_semi_structured: no layer converted\n{report}")
    return model, report

"""Low-rank factors of one layer: the matrices that are decomposed, the factor layers' constructor
arguments, and the factor modules with their weights.

Every factorisation returns an ``nn.Sequential`` of ordinary ``nn.Conv2d`` / ``nn.Linear`` layers that
replaces the layer at its module path (so the factors are ``<name>.0``, ``<name>.1``[, ``<name>.2``]):

* :func:`spatial_svd` (AMCT's split): ``W (O, I, kh, kw)`` read as ``M[(i, y), (o, x)] = W[o, i, y, x]``,
  an ``(I*kh, O*kw)`` matrix; ``M ~ U_r S_r V_r^T``; the first conv ``I -> r`` has kernel ``(kh, 1)``,
  stride ``(sh, 1)``, padding ``(ph, 0)``, dilation ``(dh, 1)`` and weight ``U_r sqrt(S_r)``; the second
  ``r -> O`` has kernel ``(1, kw)``, stride ``(1, sw)``, padding ``(0, pw)``, dilation ``(1, dw)``, weight
  ``sqrt(S_r) V_r^T`` and the original bias. Exact at full rank ``min(I*kh, O*kw)``, for every
  ``padding_mode``: reflect/replicate/circular padding is a per-axis index map, and a ``kh x 1`` conv
  commutes with an index map of the width axis.
* :func:`tucker2`: 1x1 conv ``I -> r_in`` (``U_in^T``), the ``kh x kw`` core conv ``r_in -> r_out`` with
  the original stride, padding, dilation and padding mode (``G = W x_0 U_out^T x_1 U_in^T``), 1x1 conv
  ``r_out -> O`` (``U_out``) with the original bias. ``U_out`` / ``U_in``: leading left singular vectors of
  the mode-0 (output) and mode-1 (input) unfoldings (HOSVD, computed from the small Gram matrices), then
  optionally HOOI iterations. Exact at ``(r_in, r_out) = (I, O)``; the 1x1 convs have no bias, so they
  commute with any padding.
* :func:`linear_svd`: ``W (out, in) ~ U_r S_r V_r^T``: ``Linear(in, r, bias=False)`` with
  ``sqrt(S_r) V_r^T``, then ``Linear(r, out)`` with ``U_r sqrt(S_r)`` and the original bias.

The arithmetic runs in float64 on the weight's device; the factors get the layer's dtype and device.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import torch
import torch.nn as nn

__all__ = ["layer_args", "spatial_matrix", "spatial_full_rank", "tucker2_full_rank", "linear_full_rank",
           "unfold", "spatial_factor_args", "tucker2_factor_args", "linear_factor_args", "factor_args",
           "build_factors", "spatial_svd", "tucker2", "linear_svd", "hosvd_factors", "GramSvd", "gram_spectrum",
           "FACTOR_TYPES"]

FACTOR_TYPES: dict[str, type[nn.Module]] = {"Conv2d": nn.Conv2d, "Linear": nn.Linear}


# -- constructor arguments --------------------------------------------------------------------------
def _pair(v: Any) -> tuple[int, int]:
    return (int(v[0]), int(v[1])) if isinstance(v, (tuple, list)) else (int(v), int(v))


def layer_args(module: nn.Module) -> dict[str, Any]:
    """JSON-ready constructor arguments of a ``Conv2d`` or ``Linear`` (what rebuilds its structure)."""
    if isinstance(module, nn.Conv2d):
        padding = module.padding if isinstance(module.padding, str) else list(_pair(module.padding))
        return {"in_channels": module.in_channels, "out_channels": module.out_channels,
                "kernel_size": list(_pair(module.kernel_size)), "stride": list(_pair(module.stride)),
                "padding": padding, "dilation": list(_pair(module.dilation)), "groups": module.groups,
                "bias": module.bias is not None, "padding_mode": module.padding_mode}
    if isinstance(module, nn.Linear):
        return {"in_features": module.in_features, "out_features": module.out_features, "bias": module.bias is not None}
    raise TypeError(f"layer_args: got {type(module).__name__}; allowed: Conv2d, Linear")


def _conv(in_c: int, out_c: int, kernel: Sequence[int], stride: Sequence[int], padding: Any,
          dilation: Sequence[int], bias: bool, padding_mode: str) -> dict[str, Any]:
    return {"in_channels": int(in_c), "out_channels": int(out_c), "kernel_size": [int(k) for k in kernel],
            "stride": [int(s) for s in stride],
            "padding": padding if isinstance(padding, str) else [int(p) for p in padding],
            "dilation": [int(d) for d in dilation], "groups": 1, "bias": bool(bias), "padding_mode": padding_mode}


def _split_padding(padding: Any) -> tuple[Any, Any]:
    """The spatial split's paddings: ``(ph, 0)`` and ``(0, pw)``; ``'same'`` stays ``'same'`` for both
    (each factor pads only along its kernel's long axis), ``'valid'`` is no padding."""
    if isinstance(padding, str):
        return (padding, padding) if padding == "same" else ([0, 0], [0, 0])
    ph, pw = _pair(padding)
    return [ph, 0], [0, pw]


def spatial_factor_args(args: Mapping[str, Any], rank: int) -> list[dict[str, Any]]:
    """Constructor arguments of the ``kh x 1`` and ``1 x kw`` convs for a Conv2d with ``args``."""
    (kh, kw), (sh, sw), (dh, dw) = _pair(args["kernel_size"]), _pair(args["stride"]), _pair(args["dilation"])
    p1, p2 = _split_padding(args["padding"])
    mode = args["padding_mode"]
    return [{"type": "Conv2d", "args": _conv(args["in_channels"], rank, (kh, 1), (sh, 1), p1, (dh, 1), False, mode)},
            {"type": "Conv2d", "args": _conv(rank, args["out_channels"], (1, kw), (1, sw), p2, (1, dw), args["bias"], mode)}]


def tucker2_factor_args(args: Mapping[str, Any], ranks: tuple[int, int]) -> list[dict[str, Any]]:
    """Constructor arguments of the 1x1, core and 1x1 convs for a Conv2d with ``args``; ``ranks = (r_in, r_out)``."""
    r_in, r_out = ranks
    padding = args["padding"] if isinstance(args["padding"], str) else list(_pair(args["padding"]))
    mode = args["padding_mode"]
    return [{"type": "Conv2d", "args": _conv(args["in_channels"], r_in, (1, 1), (1, 1), (0, 0), (1, 1), False, mode)},
            {"type": "Conv2d", "args": _conv(r_in, r_out, _pair(args["kernel_size"]), _pair(args["stride"]), padding,
                                             _pair(args["dilation"]), False, mode)},
            {"type": "Conv2d", "args": _conv(r_out, args["out_channels"], (1, 1), (1, 1), (0, 0), (1, 1), args["bias"],
                                             mode)}]


def linear_factor_args(args: Mapping[str, Any], rank: int) -> list[dict[str, Any]]:
    """Constructor arguments of ``Linear(in, r, bias=False)`` and ``Linear(r, out, bias)``."""
    return [{"type": "Linear", "args": {"in_features": int(args["in_features"]), "out_features": int(rank), "bias": False}},
            {"type": "Linear", "args": {"in_features": int(rank), "out_features": int(args["out_features"]),
                                        "bias": bool(args["bias"])}}]


def factor_args(method: str, args: Mapping[str, Any], rank: int | tuple[int, int]) -> list[dict[str, Any]]:
    """The factors' ``{"type", "args"}`` for ``method`` (``spatial``, ``tucker2`` or ``svd``)."""
    if method == "spatial":
        return spatial_factor_args(args, int(rank))
    if method == "tucker2":
        return tucker2_factor_args(args, _pair(rank))
    if method == "svd":
        return linear_factor_args(args, int(rank))
    raise ValueError(f"method: got {method!r}; allowed: 'spatial', 'tucker2', 'svd'")


def build_factors(specs: Sequence[Mapping[str, Any]], *, device: torch.device | str | None = None,
                  dtype: torch.dtype | None = None) -> nn.Sequential:
    """An ``nn.Sequential`` of default-initialised factor layers from ``{"type", "args"}`` specs."""
    layers = []
    for spec in specs:
        kind = FACTOR_TYPES.get(spec["type"])
        if kind is None:
            raise ValueError(f"factor type: got {spec['type']!r}; allowed: {', '.join(FACTOR_TYPES)}")
        kwargs = dict(spec["args"])
        for key in ("kernel_size", "stride", "dilation"):
            if key in kwargs:
                kwargs[key] = tuple(kwargs[key])
        if isinstance(kwargs.get("padding"), list):
            kwargs["padding"] = tuple(kwargs["padding"])
        layers.append(kind(**kwargs, device=device, dtype=dtype))
    return nn.Sequential(*layers)


# -- matrices and spectra ---------------------------------------------------------------------------
def spatial_matrix(weight: torch.Tensor) -> torch.Tensor:
    """``M[(i, y), (o, x)] = W[o, i, y, x]``: the ``(I*kh, O*kw)`` matrix the spatial split factorises."""
    O, I, kh, kw = weight.shape
    return weight.permute(1, 2, 0, 3).reshape(I * kh, O * kw)


def spatial_full_rank(args: Mapping[str, Any]) -> int:
    (kh, kw) = _pair(args["kernel_size"])
    return min(int(args["in_channels"]) * kh, int(args["out_channels"]) * kw)


def tucker2_full_rank(args: Mapping[str, Any]) -> tuple[int, int]:
    """``(r_in, r_out)`` at which Tucker-2 is exact: ``(I, O)``."""
    return int(args["in_channels"]), int(args["out_channels"])


def linear_full_rank(args: Mapping[str, Any]) -> int:
    return min(int(args["in_features"]), int(args["out_features"]))


def unfold(weight: torch.Tensor, mode: int) -> torch.Tensor:
    """Mode-``mode`` unfolding: ``(W.shape[mode], everything else)``."""
    return torch.movedim(weight, mode, 0).reshape(weight.shape[mode], -1)


def _weight64(module: nn.Module) -> torch.Tensor:
    return module.weight.detach().to(torch.float64)


@dataclass(frozen=True)
class GramSvd:
    """Singular values and the smaller side's singular vectors of a matrix, from its Gram matrix (float64).

    For an ``(m, n)`` matrix ``A``: ``eigh`` of the ``k x k`` Gram matrix of the smaller side (``A A^T`` when
    ``m <= n``, else ``A^T A``) gives ``S^2`` and those vectors; :meth:`truncated` derives the other side's
    leading ``r`` vectors by one product (``V_r = A^T U_r / S_r``). About twice as fast as
    ``torch.linalg.svd`` on a square matrix, much faster on an elongated one, and it keeps only a ``k x k``
    matrix between the plan and the factors. ``U_r S_r V_r^T = U_r U_r^T A``, the best rank-``r``
    approximation, and exactly ``A`` at full rank. Singular values below ``~1e-8`` of the largest lose
    relative precision, which no rank selection notices.
    """

    vectors: torch.Tensor | None  # (k, k), largest first; None when only the values were asked for
    values: torch.Tensor          # (k,), largest first
    transposed: bool              # the vectors are the right ones (m > n)

    @classmethod
    def of(cls, matrix: torch.Tensor, *, vectors: bool = True) -> "GramSvd":
        m = matrix.to(torch.float64)
        transposed = m.shape[0] > m.shape[1]
        a = m.T if transposed else m
        if not vectors:
            return cls(None, torch.linalg.eigvalsh(a @ a.T).flip(0).clamp_min(0).sqrt(), transposed)
        evals, evecs = torch.linalg.eigh(a @ a.T)
        return cls(evecs.flip(1), evals.flip(0).clamp_min(0).sqrt(), transposed)

    def truncated(self, matrix: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(U_r, S_r, Vh_r)`` of ``matrix`` (the one this was computed from) at ``rank``."""
        if self.vectors is None:
            raise ValueError("GramSvd.truncated: computed without vectors")
        m = matrix.to(torch.float64)
        s = self.values[:rank]
        known = self.vectors[:, :rank]
        other = (m if self.transposed else m.T) @ known  # = the other side's vectors times S
        safe = torch.where(s > 0, s, torch.ones_like(s))
        other = torch.where(s > 0, other / safe, torch.zeros_like(other))  # a zero singular value adds nothing
        if self.transposed:
            return other, s, known.T
        return known, s, other.T


def gram_spectrum(matrix: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Left singular vectors and singular values (largest first) of a wide ``(m, n)`` matrix from its
    ``m x m`` Gram matrix (cheap when ``m << n``: the Tucker-2 unfoldings)."""
    m = matrix.to(torch.float64)
    evals, evecs = torch.linalg.eigh(m @ m.T)
    order = torch.argsort(evals, descending=True)
    return evecs[:, order], evals[order].clamp_min(0).sqrt()


# -- factor modules with weights --------------------------------------------------------------------
def _like(module: nn.Module, factors: nn.Sequential) -> nn.Sequential:
    factors.train(module.training)
    frozen = not module.weight.requires_grad
    for p in factors.parameters():
        p.requires_grad_(not frozen)
    return factors


def _check_rank(what: str, rank: int, full: int) -> None:
    if not 1 <= rank <= full:
        raise ValueError(f"{what}: got {rank!r}; allowed: 1..{full}")


@torch.no_grad()
def spatial_svd(conv: nn.Conv2d, rank: int, *, svd: GramSvd | None = None) -> nn.Sequential:
    """AMCT's ``kh x 1`` + ``1 x kw`` split of ``conv`` at ``rank`` (see the module docstring).

    ``svd``: a precomputed :class:`GramSvd` of :func:`spatial_matrix` (the plan's), else computed.
    """
    if not isinstance(conv, nn.Conv2d) or conv.groups != 1:
        raise ValueError(f"spatial_svd: got {type(conv).__name__} with groups={getattr(conv, 'groups', '?')}; "
                         "allowed: nn.Conv2d with groups=1")
    args = layer_args(conv)
    _check_rank("spatial_svd rank", rank, spatial_full_rank(args))
    O, I, kh, kw = conv.weight.shape
    matrix = spatial_matrix(_weight64(conv))
    U, S, Vh = (svd if svd is not None else GramSvd.of(matrix)).truncated(matrix, rank)
    root = S.sqrt()
    first = (U * root).T.reshape(rank, I, kh, 1)
    second = (root[:, None] * Vh).reshape(rank, O, kw).permute(1, 0, 2).reshape(O, rank, 1, kw)
    seq = build_factors(spatial_factor_args(args, rank), device=conv.weight.device, dtype=conv.weight.dtype)
    seq[0].weight.copy_(first.to(conv.weight.dtype))
    seq[1].weight.copy_(second.to(conv.weight.dtype))
    if conv.bias is not None:
        seq[1].bias.copy_(conv.bias)
    return _like(conv, seq)


@torch.no_grad()
def hosvd_factors(weight: torch.Tensor, ranks: tuple[int, int], *, hooi_iterations: int = 0,
                  bases: tuple[torch.Tensor, torch.Tensor] | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(U_in (I, r_in), core (r_out, r_in, kh, kw), U_out (O, r_out))`` in float64 for a conv weight.

    ``bases``: precomputed full eigenvector bases ``(of mode 1, of mode 0)`` (largest first), else computed.
    """
    w = weight.to(torch.float64)
    r_in, r_out = ranks
    if bases is None:
        bases = (gram_spectrum(unfold(w, 1))[0], gram_spectrum(unfold(w, 0))[0])
    u_in, u_out = bases[0][:, :r_in], bases[1][:, :r_out]
    for _ in range(hooi_iterations):
        # HOOI: each factor from the weight projected on the other one
        u_out = gram_spectrum(unfold(torch.einsum("oiyx,ir->oryx", w, u_in), 0))[0][:, :r_out]
        u_in = gram_spectrum(unfold(torch.einsum("oiyx,os->siyx", w, u_out), 1))[0][:, :r_in]
    core = torch.einsum("oiyx,os,ir->sryx", w, u_out, u_in)
    return u_in, core, u_out


@torch.no_grad()
def tucker2(conv: nn.Conv2d, ranks: tuple[int, int] | int, *, hooi_iterations: int = 0,
            bases: tuple[torch.Tensor, torch.Tensor] | None = None) -> nn.Sequential:
    """Tucker-2 of ``conv`` at ``ranks = (r_in, r_out)`` (an int means both): 1x1, core, 1x1 convs."""
    if not isinstance(conv, nn.Conv2d) or conv.groups != 1:
        raise ValueError(f"tucker2: got {type(conv).__name__} with groups={getattr(conv, 'groups', '?')}; "
                         "allowed: nn.Conv2d with groups=1")
    ranks = _pair(ranks)
    args = layer_args(conv)
    full = tucker2_full_rank(args)
    _check_rank("tucker2 r_in", ranks[0], full[0])
    _check_rank("tucker2 r_out", ranks[1], full[1])
    u_in, core, u_out = hosvd_factors(conv.weight.detach(), ranks, hooi_iterations=hooi_iterations, bases=bases)
    seq = build_factors(tucker2_factor_args(args, ranks), device=conv.weight.device, dtype=conv.weight.dtype)
    dtype = conv.weight.dtype
    seq[0].weight.copy_(u_in.T.reshape(ranks[0], -1, 1, 1).to(dtype))
    seq[1].weight.copy_(core.to(dtype))
    seq[2].weight.copy_(u_out.reshape(-1, ranks[1], 1, 1).to(dtype))
    if conv.bias is not None:
        seq[2].bias.copy_(conv.bias)
    return _like(conv, seq)


@torch.no_grad()
def linear_svd(linear: nn.Linear, rank: int, *, svd: GramSvd | None = None) -> nn.Sequential:
    """``Linear(in, out)`` -> ``Sequential(Linear(in, rank, bias=False), Linear(rank, out, bias))``.

    ``svd``: a precomputed :class:`GramSvd` of the weight, else computed.
    """
    if not isinstance(linear, nn.Linear):
        raise ValueError(f"linear_svd: got {type(linear).__name__}; allowed: nn.Linear")
    args = layer_args(linear)
    _check_rank("linear_svd rank", rank, linear_full_rank(args))
    weight = _weight64(linear)
    U, S, Vh = (svd if svd is not None else GramSvd.of(weight)).truncated(weight, rank)
    root = S.sqrt()
    seq = build_factors(linear_factor_args(args, rank), device=linear.weight.device, dtype=linear.weight.dtype)
    dtype = linear.weight.dtype
    seq[0].weight.copy_((root[:, None] * Vh).to(dtype))
    seq[1].weight.copy_((U * root).to(dtype))
    if linear.bias is not None:
        seq[1].bias.copy_(linear.bias)
    return _like(linear, seq)

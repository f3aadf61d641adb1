"""Weight-only quantization: INT8/INT4 weights with per-group scales, by min/max or by GPTQ.

    cfg = WeightOnlyConfig(bits=4, group_size=128, algorithm="gptq")
    model = quantize_weight_only(model, cfg, calibration_data=loader)   # Linear and transformers Conv1D
    export_weight_only(model, "model.onnx", x)                          # amct_torch.export.weight_only

Layout. A weight is viewed channel-major, ``(out, in)`` (``channel_major`` with the wrapper's
``weight_channel_axis``: an ``nn.Linear`` weight as it is, a transformers ``Conv1D`` weight ``(in, out)``
transposed). Group ``k`` of output row ``o`` is the input columns ``[k*g, (k+1)*g)``; ``group_size=-1`` is
one group per row. An input size that is not a multiple of ``g`` is refused, naming the layer, its size and
the divisors that would work (no partial last group: every group has the same size, which is what the
ONNX block quantization and onnxruntime's MatMulNBits kernels want).

Min/max (AMCT's formulas, :func:`~amct_torch.quant.formulas.scale_offset`, per group):

* symmetric: ``s = max / (2^(b-1) - 1)`` when ``|max| >= |min|``, else ``|min| / 2^(b-1)`` (the negative
  side uses the full range), zero point 0;
* asymmetric: the range is widened to contain 0, ``s = (max - min) / (2^b - 1)``,
  ``z = round(-2^(b-1) - min / s)`` (clamped; 0 is then exactly representable);
* ``q = clip(round(w / s + z), -2^(b-1), 2^(b-1) - 1)``, ``w' = (q - z) * s``.

GPTQ (Frantar et al. 2022), per layer, from ``H = 2 X^T X / n`` over the layer's calibration inputs
(flattened to ``(tokens, in)``): dead columns (``H_jj = 0``) are zeroed, the diagonal is dampened by
``damp * mean(diag H)``, ``U = chol(H^-1)`` (upper), columns are processed in blocks of ``block_size``
with the error feedback ``W[:, j:] -= (w_j - q_j) / U_jj * U_j,j:`` (and the lazy batch update of the
later blocks). Without ``act_order`` a group's scale is computed when its first column is reached, from the
group's columns as the error feedback has left them (the reference's ``static_groups=False``; the reference
reads a block-stale copy for groups that start inside a block, we read the current values). With
``act_order`` columns are processed by decreasing ``diag(H)`` and un-permuted at the end; the group scales
are then computed up front from the original weight (the reference's ``static_groups=True``), so groups stay
contiguous in the original column order and the stored format and the ONNX export are the same as without
``act_order`` (the reference's dynamic act-order groups need a ``g_idx`` permutation table instead). The
math runs in float64. The Hessians of all layers are collected in one pass over the calibration data through
the float model by default (the "simple" variant: every layer sees float inputs); with ``sequential=True``
the layers are solved one at a time in call order, each from inputs computed through the layers already
quantized (the paper's variant; one pass over the calibration data per layer).

What the stage stores. ``GroupWeightQuantizer`` holds ``scale`` (float32) and ``offset`` (int32) buffers of
shape ``(out, in / g)``. With ``minmax`` it re-quantizes its input on the fly (a straight-through gradient,
and it keeps what earlier pipeline stages made, like the ARQ stage). With ``gptq`` the integers are not a
function of the weight (the error feedback moved them), so the stage stores them: an int8 ``qweight`` buffer
``(out, in)`` and a ``solved`` flag; until GPTQ has run it passes the float weight through, after that it
outputs ``(qweight - offset) * scale`` and ignores its input (no gradient; ``module.weight`` is untouched,
which keeps tied weights such as GPT-2's ``lm_head``/``wte`` intact). Activations stay float.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
import torch.nn as nn

from ..config import Config, ConfigError, Targeting
from ..config.weight_only import WeightOnlyConfig
from ..graph import capture, swap_layers
from ..graph.plan import LayerPlan
from ..nn import CompressedLayer, CompressedLinear, CompressedConv1D, wrapper_for
from .formulas import channel_major, fake_quantize, from_channel_major, qrange, scale_offset
from .ptq import _batches, refuse_requantizing
from .quantizers import CalibrationError

__all__ = ["GroupWeightQuantizer", "quantize_weight_only", "group_scale_offset", "gptq_quantize",
           "weight_only_quantizers", "collect_hessians"]

_SUPPORTED = (CompressedLinear, CompressedConv1D)


def _group(in_features: int, group_size: int) -> int:
    return in_features if group_size == -1 else group_size


def _divisors_hint(in_features: int) -> str:
    ok = [d for d in range(32, in_features + 1, 32) if in_features % d == 0]
    if ok:
        return "a multiple of 32 that divides it (" + ", ".join(map(str, ok)) + ") or -1 (one scale per output channel)"
    return "-1 (one scale per output channel): the input size is not a multiple of 32"


def group_scale_offset(rows: torch.Tensor, bits: int, group_size: int, symmetric: bool
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-group min/max scale (float32) and offset (int32), both ``(out, in / g)``, of a channel-major weight.

    ``rows``: ``(out, in)``; ``group_size``: a divisor of ``in``, or -1 for one group per row.
    """
    out, n = rows.shape
    g = _group(n, group_size)
    if n % g:
        raise ValueError(f"input size {n} is not a multiple of group_size {group_size}")
    v = rows.detach().reshape(out, n // g, g)
    return scale_offset(v.amin(-1), v.amax(-1), bits, symmetric)


def _expand(t: torch.Tensor, g: int) -> torch.Tensor:
    return t.repeat_interleave(g, dim=1)


class GroupWeightQuantizer(nn.Module):
    """Weight stage with per-group scales along the input dimension (see the module docstring).

    Args:
        weight: the weight this stage will receive, in the layer's own layout (scales are computed from it).
        bits: 4 or 8.
        group_size: a positive multiple of 32 dividing the input size, or -1 (one scale per output channel).
        symmetric: zero point 0 when true.
        axis: the layer's output-channel axis (``weight_channel_axis``: 0 for Linear, 1 for Conv1D).
        store_integers: hold an int8 ``qweight`` set by :meth:`set_integers` (GPTQ) instead of
            re-quantizing the input on the fly (min/max).
    """

    def __init__(self, weight: torch.Tensor, bits: int, group_size: int, symmetric: bool, axis: int, *,
                 store_integers: bool = False):
        super().__init__()
        if weight.dim() != 2:
            raise ValueError(f"per-group weight quantization needs a 2-D weight; got shape {tuple(weight.shape)}")
        self.bits, self.group_size, self.symmetric, self.axis = bits, group_size, symmetric, axis
        rows = channel_major(weight.detach(), axis)
        out, n = rows.shape
        self.in_features, self.out_features = n, out
        g = _group(n, group_size)
        if n % g:
            raise ValueError(f"input size {n} is not a multiple of group_size {group_size}; "
                             f"use {_divisors_hint(n)}")
        self.block = g
        dev = weight.device
        self.register_buffer("scale", torch.ones(out, n // g, device=dev))
        self.register_buffer("offset", torch.zeros(out, n // g, dtype=torch.int32, device=dev))
        self.stores_integers = store_integers
        if store_integers:
            self.register_buffer("qweight", torch.zeros(out, n, dtype=torch.int8, device=dev))
            self.register_buffer("solved", torch.tensor(False, device=dev))
        self.calibrate(weight)

    @torch.no_grad()
    def calibrate(self, weight: torch.Tensor) -> None:
        """Min/max: recompute the group scales (and offsets) from ``weight``."""
        scale, offset = group_scale_offset(channel_major(weight.detach().float(), self.axis), self.bits,
                                           self.group_size, self.symmetric)
        self.scale.copy_(scale)
        self.offset.copy_(offset)

    @torch.no_grad()
    def set_integers(self, q: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor) -> None:
        """Store integers found by GPTQ (channel-major ``(out, in)``) with their group scales and offsets."""
        if not self.stores_integers:
            raise RuntimeError("this stage re-quantizes on the fly (min/max); it stores no integers")
        qmin, qmax = qrange(self.bits)
        if q.numel() and (int(q.min()) < qmin or int(q.max()) > qmax):
            raise ValueError(f"integer weights outside [{qmin}, {qmax}]")
        self.qweight.copy_(q.to(torch.int8))
        self.scale.copy_(scale)
        self.offset.copy_(offset)
        self.solved.fill_(True)

    @property
    def is_ready(self) -> bool:
        """Min/max stages always are; GPTQ stages once their integers are set."""
        return not self.stores_integers or bool(self.solved)

    def _offsets(self) -> torch.Tensor | None:
        return None if self.symmetric else _expand(self.offset, self.block)

    def dequantized(self) -> torch.Tensor:
        """GPTQ: ``(qweight - offset) * scale``, channel-major, float32."""
        z = self.offset if not self.symmetric else torch.zeros_like(self.offset)
        return (self.qweight.float() - _expand(z, self.block).float()) * _expand(self.scale, self.block)

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        if self.stores_integers:
            if not bool(self.solved):
                return weight  # GPTQ has not run yet (its Hessians are collected through the float model)
            return from_channel_major(self.dequantized(), weight.shape, self.axis).to(weight.dtype)
        rows = channel_major(weight, self.axis)
        out = fake_quantize(rows, _expand(self.scale, self.block), self._offsets(), self.bits)
        return from_channel_major(out, weight.shape, self.axis)

    @torch.no_grad()
    def integer_weight(self, weight: torch.Tensor) -> torch.Tensor:
        """The integers (int8 storage, channel-major ``(out, in)``) that the deployed model carries."""
        if self.stores_integers:
            if not bool(self.solved):
                raise CalibrationError("GPTQ has not quantized this layer yet")
            return self.qweight.clone()
        qmin, qmax = qrange(self.bits)
        rows = channel_major(weight.detach().float(), self.axis)
        z = self._offsets()
        v = rows / _expand(self.scale, self.block) + (0.0 if z is None else z.float())
        return torch.clamp(torch.round(v), qmin, qmax).to(torch.int8)

    def extra_repr(self) -> str:
        group = "per_channel" if self.group_size == -1 else f"group_size={self.group_size}"
        how = ("gptq " + ("solved" if bool(self.solved) else "pending")) if self.stores_integers else "minmax"
        sym = "sym" if self.symmetric else "asym"
        return f"bits={self.bits}, {group}, {sym}, {how}, (out, in)=({self.out_features}, {self.in_features})"


# -- GPTQ ---------------------------------------------------------------------------------------
@torch.no_grad()
def gptq_quantize(rows: torch.Tensor, hessian: torch.Tensor, bits: int, group_size: int, symmetric: bool, *,
                  damp: float = 0.01, block_size: int = 128, act_order: bool = False
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, float]:
    """GPTQ on one channel-major weight ``(out, in)`` with Hessian ``H`` ``(in, in)``.

    Returns ``(q int8 (out, in), scale float32 (out, G), offset int32 (out, G), loss)`` where ``loss`` is
    GPTQ's proxy ``sum((w - w') ^ 2 / U_jj ^ 2) / 2``. See the module docstring for the algorithm.
    """
    W = rows.detach().to(torch.float64).clone()
    H = hessian.detach().to(device=W.device, dtype=torch.float64).clone()
    out, cols = W.shape
    g = _group(cols, group_size)
    if cols % g:
        raise ValueError(f"input size {cols} is not a multiple of group_size {group_size}")
    qmin, qmax = qrange(bits)
    dead = torch.diagonal(H) == 0
    H[dead, dead] = 1.0
    W[:, dead] = 0.0
    static = act_order or group_size == -1
    scale = torch.ones(out, cols // g, dtype=torch.float32, device=W.device)
    offset = torch.zeros(out, cols // g, dtype=torch.int32, device=W.device)
    if static:
        scale, offset = group_scale_offset(W, bits, group_size, symmetric)
    perm = None
    if act_order:
        perm = torch.argsort(torch.diagonal(H), descending=True)
        W, H = W[:, perm], H[perm][:, perm]
        group_of = perm // g
    else:
        group_of = torch.arange(cols, device=W.device) // g
    group_of = group_of.tolist()
    H.diagonal().add_(damp * torch.mean(torch.diagonal(H)))
    try:
        U = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)
    except torch.linalg.LinAlgError as err:
        raise ValueError(f"GPTQ: the dampened Hessian is not positive definite ({err}); raise damp") from None
    Q = torch.zeros_like(W)
    loss = torch.zeros((), dtype=torch.float64, device=W.device)
    for i1 in range(0, cols, block_size):
        i2 = min(i1 + block_size, cols)
        W1 = W[:, i1:i2].clone()
        err1 = torch.zeros_like(W1)
        U1 = U[i1:i2, i1:i2]
        for i in range(i2 - i1):
            c = i1 + i
            if not static and c % g == 0:  # the group's scale, from its columns as they are now
                cur = torch.cat([W1[:, i:], W[:, i2:]], dim=1)[:, :g]
                s, o = group_scale_offset(cur, bits, -1, symmetric)
                scale[:, c // g], offset[:, c // g] = s[:, 0], o[:, 0]
            k = group_of[c]
            s, o = scale[:, k].double(), offset[:, k].double()
            w = W1[:, i]
            q = torch.clamp(torch.round(w / s + o), qmin, qmax)
            Q[:, c] = q
            e = (w - (q - o) * s) / U1[i, i]
            loss += (e * e).sum() / 2
            W1[:, i:] -= e.unsqueeze(1) * U1[i, i:].unsqueeze(0)
            err1[:, i] = e
        W[:, i2:] -= err1 @ U[i1:i2, i2:]
    if perm is not None:
        Q = Q[:, torch.argsort(perm)]
    return Q.to(torch.int8), scale, offset, float(loss)


@torch.no_grad()
def collect_hessians(model: nn.Module, layers: dict[str, CompressedLayer], data: Any, num_batches: int,
                     order: list[str] | None = None) -> dict[str, torch.Tensor]:
    """``H = 2 X^T X / n`` (float64) of each layer's inputs, flattened to ``(tokens, in)``, over ``num_batches``.

    ``order``, if given, receives the layer names in the order of their first call.
    Raises :class:`CalibrationError` when ``data`` has fewer batches, or a layer saw no input.
    """
    sums: dict[str, torch.Tensor] = {}
    counts = dict.fromkeys(layers, 0)

    def hook(name: str):
        def fn(module: nn.Module, args: tuple) -> None:
            x = args[0].detach()
            x = x.reshape(-1, x.shape[-1]).to(torch.float64)
            if name in sums:
                sums[name].addmm_(x.T, x)
            else:
                sums[name] = x.T @ x
            if order is not None and counts[name] == 0:
                order.append(name)
            counts[name] += x.shape[0]
        return fn

    handles = [m.register_forward_pre_hook(hook(n)) for n, m in layers.items()]
    was_training = model.training
    model.eval()
    seen = 0
    try:
        for args, kwargs in _batches(data):
            if seen >= num_batches:
                break
            model(*args, **kwargs)
            seen += 1
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    if seen < num_batches:
        raise CalibrationError(f"GPTQ needs {num_batches} calibration batches (batch_num); the data gave {seen}. "
                               "Give more batches or lower batch_num.")
    unused = [n for n, c in counts.items() if c == 0]
    if unused:
        raise CalibrationError("GPTQ: these layers received no input during calibration, so they have no Hessian: "
                               + ", ".join(unused) + ". Leave them out (Targeting(..., skip=[...])) or use minmax.")
    return {n: 2.0 * sums[n] / counts[n] for n in layers}


# -- the pass -----------------------------------------------------------------------------------
def weight_only_quantizers(model: nn.Module) -> dict[str, GroupWeightQuantizer]:
    """Every weight-only stage, keyed by the path of the layer that owns it."""
    found = {}
    for name, m in model.named_modules():
        if isinstance(m, CompressedLayer) and m.weight_pipeline is not None:
            for stage in m.weight_pipeline:
                if isinstance(stage, GroupWeightQuantizer):
                    found[name] = stage
    return found


def _in_features(layer: nn.Module, axis: int) -> int:
    return int(channel_major(layer.weight.detach(), axis).shape[1])


def _precheck(model: nn.Module, targeting: Targeting) -> list[WeightOnlyConfig]:
    """Check every targeted supported layer before anything changes; return the configs in use."""
    configs, bad = [], []
    wrapped: list[str] = []
    for name, m in model.named_modules():
        if not name or any(name.startswith(p + ".") for p in wrapped):
            continue
        if isinstance(m, CompressedLayer):
            wrapped.append(name)
            inner, cls = m.module, type(m)
        else:
            inner, cls = m, wrapper_for(m)
        if cls is None or not issubclass(cls, _SUPPORTED):
            continue
        cfg = targeting.resolve(name, inner).config
        if cfg is None:
            continue
        if not isinstance(cfg, WeightOnlyConfig):
            raise TypeError(f"quantize_weight_only: layer {name!r} got {type(cfg).__name__}; allowed: WeightOnlyConfig")
        configs.append(cfg)
        n = _in_features(inner, cls.weight_channel_axis)
        if n % _group(n, cfg.group_size):
            bad.append((name, type(inner).__name__, n, cfg.group_size))
    if bad:
        name, kind, n, g = bad[0]
        more = "" if len(bad) == 1 else " (also: " + ", ".join(f"{b[0]} in={b[2]}" for b in bad[1:]) + ")"
        raise ConfigError(f"layer {name!r} ({kind}, {n} input features) group_size", g,
                          _divisors_hint(n) + "; set it for this layer with Targeting(module_name={...})" + more)
    return configs


def _solve(layer: CompressedLayer, stage: GroupWeightQuantizer, hessian: torch.Tensor) -> None:
    cfg: WeightOnlyConfig = stage.config
    rows = channel_major(layer.module.weight.detach(), layer.weight_channel_axis)
    q, scale, offset, loss = gptq_quantize(rows, hessian, cfg.bits, cfg.group_size, cfg.symmetric, damp=cfg.damp,
                                           block_size=cfg.block_size, act_order=cfg.act_order)
    stage.set_integers(q, scale, offset)
    stage.gptq_loss = loss


def _run_gptq(model: nn.Module, pending: dict[str, GroupWeightQuantizer], data: Any) -> None:
    """Solve every pending GPTQ stage: from one float pass, or (``sequential``) one layer per pass in call order."""
    layers = {n: model.get_submodule(n) for n in pending}
    num_batches = max(s.config.batch_num for s in pending.values())
    if not any(s.config.sequential for s in pending.values()):
        hessians = collect_hessians(model, layers, data, num_batches)
        for name, stage in pending.items():
            _solve(layers[name], stage, hessians.pop(name))
        return
    if iter(data) is data:
        raise ValueError("quantize_weight_only: sequential GPTQ runs the calibration data once per layer; give a "
                         "re-iterable collection (a list or a DataLoader), not a one-shot iterator")
    order: list[str] = []
    hessians = collect_hessians(model, layers, data, num_batches, order)
    first = order[0]
    _solve(layers[first], pending[first], hessians.pop(first))
    del hessians
    for name in order[1:]:  # each from inputs computed through the layers already quantized
        _solve(layers[name], pending[name], collect_hessians(model, {name: layers[name]}, data, num_batches)[name])


def quantize_weight_only(model: nn.Module, config_or_targeting: WeightOnlyConfig | Targeting | None = None,
                         example_inputs: Any = None, calibration_data: Any = None, *, inplace: bool = False,
                         verbose: bool = False) -> nn.Module:
    """Quantize the weights of every ``nn.Linear`` and transformers ``Conv1D`` to INT8/INT4 with group scales.

    Args:
        model: a float model.
        config_or_targeting: one :class:`WeightOnlyConfig` for every supported layer, or a :class:`Targeting`
            (per type, per name, skips). Default: ``WeightOnlyConfig()`` (W4, group 128, symmetric, min/max).
        example_inputs: inputs for graph capture (optional: without them, or when tracing fails as on
            transformers models, layers are found by a module walk; the swap is module-level either way).
        calibration_data: for GPTQ: an iterable of batches (tensors, ``(inputs, labels)`` tuples, or dicts
            of keyword inputs, run as ``model(**batch)``); the first ``batch_num`` are used (with per-layer
            configs, the largest ``batch_num`` of the GPTQ layers, for all of them). One pass through the
            float model collects every layer's Hessian (GPTQ layers pass their float weight until solved);
            with ``sequential=True`` one pass per layer, through the layers already quantized.
        inplace: modify ``model`` itself.
        verbose: print the plan.

    Returns the quantized model (a copy unless ``inplace``); its forward uses the dequantized weights,
    activations stay float. ``model.amct_weight_only_plan`` lists every layer: quantized, skipped, or
    unsupported (other weighted layers, e.g. convolutions, are left float and reported).

    Example::

        model = quantize_weight_only(model, WeightOnlyConfig(bits=4, group_size=32, algorithm="gptq"),
                                     calibration_data=[{"input_ids": ids} for ids in batches])
    """
    config = WeightOnlyConfig() if config_or_targeting is None else config_or_targeting
    if isinstance(config, Config) and not isinstance(config, WeightOnlyConfig):
        raise TypeError(f"quantize_weight_only: got {type(config).__name__}; allowed: WeightOnlyConfig or Targeting")
    targeting = config if isinstance(config, Targeting) else Targeting(config)
    configs = _precheck(model, targeting)
    gptq_configs = [c for c in configs if c.algorithm == "gptq"]
    if gptq_configs and calibration_data is None:
        raise ValueError("quantize_weight_only: algorithm 'gptq' needs calibration_data (an iterable of input "
                         f"batches, at least batch_num={max(c.batch_num for c in gptq_configs)}); "
                         "or use algorithm='minmax', which needs no data")
    if not inplace:
        model = copy.deepcopy(model)
    was_training = model.training
    model.eval()
    unsupported: dict[str, tuple[CompressedLayer, bool]] = {}

    def attach(name: str, layer: CompressedLayer, cfg: Config) -> None:
        if not isinstance(cfg, WeightOnlyConfig):
            raise TypeError(f"quantize_weight_only: layer {name!r} got {type(cfg).__name__}; allowed: WeightOnlyConfig")
        if not isinstance(layer, _SUPPORTED):
            unsupported[name] = (layer, model.get_submodule(name) is not layer)
            return
        kind = type(layer.module).__name__
        if any(isinstance(stage, GroupWeightQuantizer) for stage in layer.weight_pipeline):
            raise ConfigError(f"layer {name!r}", "already quantized", "a float or pruned layer (quantize once)")
        refuse_requantizing(name, layer)  # PTQ / QAT quantizers
        if cfg.algorithm == "gptq" and len(layer.weight_pipeline):
            raise ConfigError(f"layer {name!r} ({kind}) algorithm", "gptq",
                              "minmax for a layer with earlier weight stages (GPTQ's error feedback would undo "
                              f"{', '.join(type(s).__name__ for s in layer.weight_pipeline)})")
        w = layer.effective_weight().detach()
        try:
            stage = GroupWeightQuantizer(w, cfg.bits, cfg.group_size, cfg.symmetric, layer.weight_channel_axis,
                                         store_integers=cfg.algorithm == "gptq")
        except ValueError as err:
            raise ConfigError(f"layer {name!r} ({kind}) group_size", cfg.group_size, str(err)) from None
        stage.config = cfg
        layer.weight_pipeline.append(stage)
        layer.weight_only_config = cfg

    graph = capture(model, example_inputs)
    model, plan = swap_layers(model, targeting, graph=graph, attach=attach, inplace=True,
                              title="quantize_weight_only", reuse_wrapped=True)
    for name, (layer, new) in unsupported.items():
        if new:
            model.set_submodule(name, layer.module)
        kind = type(layer.module).__name__
        plan.layers = [LayerPlan(name, kind, "unsupported", f"weight-only quantization covers Linear and "
                                 f"transformers Conv1D; {kind} left as it was", lp.source)
                       if lp.name == name else lp for lp in plan.layers]

    stages = weight_only_quantizers(model)
    pending = {n: s for n, s in stages.items() if s.stores_integers and not s.is_ready}
    if pending:
        _run_gptq(model, pending, calibration_data)
    model.train(was_training)
    model.amct_weight_only_plan = plan
    if verbose:
        print(plan)
    return model

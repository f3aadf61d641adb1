"""Channel pruning, 2:4 and magnitude sparsity against Torch-Pruning, side by side in one run.

On the pretrained digits reference models (``resnet_digits``, ``mobilenetv2_digits``; 16x16 digits,
1,257 train / 270 validation / 270 test images):

* ``dense`` - the trained model;
* ``ours <criterion>`` - ``amct_torch.sparsity.prune_channels(model, ChannelPruneConfig(criterion=...), x,
  flops_target=0.5)`` (bisection on one uniform per-group ratio until the shrunk model has at most 50 % of
  the dense MACs, our counter), for every criterion: ``l1``, ``l2`` (AMCT's balanced L2), ``fpgm``,
  ``bn_slim`` (after ``SLIM_EPOCHS`` of training with the L1 penalty on the BN scales,
  ``add_bn_slim_grad``), and from ``DATA_BATCHES`` unaugmented training batches ``taylor`` (cross-entropy),
  ``apoz``, ``mean_activation``; plus ``l1`` with AMCT's ``ascend_optimized`` rounding (kept channels a
  multiple of 16, and of 8). Then ``shrink`` (the masked and the shrunk model are checked to compute the
  same logits) and the fine-tune below on the shrunk model (the masked model computes the same function and
  its pruned weights get no gradient, so fine-tuning either is the same training; the small one is faster);
* ``TP group-L1`` / ``TP group-L2`` - Torch-Pruning's ``MagnitudePruner`` with
  ``GroupMagnitudeImportance(p=1 / 2)`` (1.6's name for the group-norm importance), the classifier ignored,
  its ``pruning_ratio`` found by bisection with its own counter (``tp.utils.count_ops_and_params``) to the
  same 50 % MACs target, then the same fine-tune;
* ``2:4`` - ``apply_nm(model, NMConfig(), x)`` on every eligible layer (input channels per group a
  multiple of 4: the 1-channel stem and depthwise convolutions are skipped), mask fixed after the first
  batch (AMCT's default), and with SR-STE (``ste=True``, mask recomputed every 4 batches); same fine-tune;
* ``AGP 80%`` - ``prune_magnitude(model, MagnitudeConfig(sparsity=0.8, schedule="agp", ...))`` with
  ``MagnitudeScheduler.step()`` after every optimizer step, ramp over the first 70 % of the fine-tune.

Fine-tune (the same for every method): ``EPOCHS`` epochs of the augmented training split (the batches
drawn once per model, the same for all), AdamW (``LR``, no weight decay), cosine decay per step,
cross-entropy with the pretraining's label smoothing. Evaluation on the test split (accuracy, drop in
points from the dense model, top-1 agreement with the dense model's predictions) and the validation split.
Parameters and MACs of every model with our counter (``amct_torch.analysis.count_flops``; masked models:
the effective counts) and Torch-Pruning's (dense counts only).

Latency (ms, median of interleaved repeats, ``benchmarks.ptq.latency_rows``): dense vs the shrunk models
(every criterion gives the same widths, so one ``ours l1`` model stands for all) in PyTorch eager and in ONNX
Runtime (fp32 ONNX from ``benchmarks.ptq.export_fp32``, dynamic batch fixed to 1 / 16), 2 threads each.
2:4 and AGP masks keep dense tensors: on a CPU they run at the dense speed and are not timed.

Also torchvision ``resnet18`` / ``mobilenet_v2`` at 3x224x224 (random weights; structure and latency):
ours ``l1`` and ``l1`` ``ascend_optimized`` (x16), Torch-Pruning group-L1 with and without
``round_to=16``, all to 50 % MACs; whether each tool could prune the model, the MACs it reached (both
counters), latency at batch 1 and 16. And a coverage check on more torchvision classifiers (random
weights, 3x64x64, ViT at 224): each tool at one fixed ratio (``COVERAGE_RATIO`` of every prunable group /
layer): did it prune (no error, same output shape, fewer MACs), and for ours is the shrunk model equal
to the masked one.

Environment: ``AMCT_BENCH_QUICK=1`` (1 epoch, fewer variants, models and repeats: a smoke run),
``BENCH_REPEATS`` (batch 1, default 30), ``BENCH_REPEATS_LARGE`` (batch 16, default 10). Writes
``benchmarks/results/sparsity.json`` (the quick run ``sparsity_quick.json``) and prints tables and PASS/FAIL
lines for the goals (informational; nothing is asserted).
"""

from __future__ import annotations

import copy
import importlib.metadata
import json
import math
import os
import platform
import sys
import tempfile
import time
import traceback
import warnings
from pathlib import Path
from typing import Any, Callable

import numpy as np
import onnx
import onnxruntime as ort
import torch
import torch.nn as nn
import torch.nn.functional as F

import amct_torch
from amct_torch.analysis import count_flops
from amct_torch.config import MagnitudeConfig, NMConfig, Targeting
from amct_torch.config.prune import ChannelPruneConfig
from amct_torch.graph.plan import render_table
from amct_torch.sparsity import (MagnitudeScheduler, add_bn_slim_grad, apply_nm, prune_channels, prune_magnitude,
                                 shrink, sparsity_of)
from amct_torch.zoo import pretrained, reference_datamodule

from .ptq import _cpu_name, _err, _f, _finite, _quiet, export_fp32, fidelity, fix_batch, latency_rows, torch_logits

RESULTS = Path(__file__).resolve().parent / "results"
QUICK = os.environ.get("AMCT_BENCH_QUICK", "") not in ("", "0")
THREADS = 2
SEED = 0
BATCHES = (1, 16)
DIGITS_MODELS = ("resnet_digits", "mobilenetv2_digits")
VISION_MODELS = ("resnet18",) if QUICK else ("resnet18", "mobilenet_v2")
FLOPS_TARGET = 0.5

# the fine-tune, the same for every method
EPOCHS = 1 if QUICK else 10
LR = 2e-3                       # AdamW, no weight decay, cosine decay per step to 0 (pretraining: 3e-3 one-cycle)
LABEL_SMOOTHING = 0.05          # as in pretraining
SLIM_EPOCHS = 1 if QUICK else 2  # bn_slim: training with the L1 penalty on BN scales before pruning
SLIM_STRENGTH = 5e-4
DATA_BATCHES = 4                # taylor / apoz / mean_activation: unaugmented training batches of 64

CRITERIA = ("l1", "taylor") if QUICK else ("l1", "l2", "fpgm", "bn_slim", "taylor", "apoz", "mean_activation")
ASCEND = (16,) if QUICK else (16, 8)               # round_to of the ascend_optimized variants (l1)
TP_NORMS = {"TP group-L1": 1} if QUICK else {"TP group-L1": 1, "TP group-L2": 2}
NM_VARIANTS = {"2:4": NMConfig()} if QUICK else {"2:4": NMConfig(), "2:4 SR-STE": NMConfig(update_freq=4, ste=True)}
AGP_SPARSITY = 0.8

REPEATS = int(os.environ.get("BENCH_REPEATS", "5" if QUICK else "30"))
REPEATS_LARGE = int(os.environ.get("BENCH_REPEATS_LARGE", "3" if QUICK else "10"))

COVERAGE_RATIO = 0.3
COVERAGE_MODELS = ("resnet50", "shufflenet_v2_x1_0") if QUICK else (
    "resnet50", "mobilenet_v3_large", "efficientnet_b0", "shufflenet_v2_x1_0", "densenet121", "googlenet",
    "regnet_y_400mf", "convnext_tiny", "squeezenet1_1", "vgg11_bn", "mnasnet0_5", "vit_b_16")

GOAL_DROP = 1.0                 # points of test accuracy below dense, after fine-tune
GOAL_SPEEDUP = 1.5              # dense ms / shrunk ms
GOAL_NM_DROP = 1.0

OURS, TP = "ours", "Torch-Pruning"
LAT_OURS, LAT_OURS_X16 = "ours l1", "ours l1 x16"
LAT_TP, LAT_TP_X16 = "TP group-L1", "TP group-L1 x16"


# --------------------------------------------------------------------------- data and training

class _Digits:
    """One digits model's data: example inputs, test/validation tensors, the fine-tune batches."""

    def __init__(self, name: str, model: nn.Module):
        dm = reference_datamodule(name)
        dm.setup()
        self.x1 = dm.example_input(1)
        self.examples = {b: dm.example_input(b) for b in BATCHES}
        self.x_test, self.y_test = dm.split.test[0], dm.split.test[1].numpy()
        self.x_val, self.y_val = dm.split.val[0], dm.split.val[1].numpy()
        self.ref_test = torch_logits(model.eval(), self.x_test)
        self.ref_val = torch_logits(model.eval(), self.x_val)
        torch.manual_seed(SEED)
        loader = dm.train_dataloader()  # augmented, shuffled (the pretraining's)
        self.epochs = [list(loader) for _ in range(EPOCHS)]
        self.slim_epochs = [list(loader) for _ in range(SLIM_EPOCHS)]
        x, y = dm.split.train
        n = dm.batch_size
        self.score_batches = [(x[i * n:(i + 1) * n], y[i * n:(i + 1) * n]) for i in range(DATA_BATCHES)]

    def evaluate(self, model: nn.Module) -> dict[str, float]:
        model.eval()
        test = fidelity(self.ref_test, torch_logits(model, self.x_test), self.y_test)
        val = fidelity(self.ref_val, torch_logits(model, self.x_val), self.y_val)
        return {"acc": test["acc"], "top1_agreement": test["top1_agreement"], "val_acc": val["acc"]}


def finetune(model: nn.Module, epochs: list[list[tuple[torch.Tensor, torch.Tensor]]], *,
             after_step: Callable[[], None] | None = None,
             after_backward: Callable[[], None] | None = None) -> dict[str, Any]:
    """The recipe: AdamW, cosine per step, label-smoothed cross-entropy; hooks for schedulers and penalties."""
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=LR, weight_decay=0.0)
    total = sum(len(e) for e in epochs)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(total, 1))
    losses = []
    start = time.perf_counter()
    for batches in epochs:
        run = 0.0
        for x, y in batches:
            opt.zero_grad(set_to_none=True)
            loss = F.cross_entropy(model(x), y, label_smoothing=LABEL_SMOOTHING)
            loss.backward()
            if after_backward is not None:
                after_backward()
            opt.step()
            sched.step()
            if after_step is not None:
                after_step()
            run += loss.item()
        losses.append(round(run / max(len(batches), 1), 4))
    model.eval()
    return {"finetune_s": time.perf_counter() - start, "epoch_loss": losses}


# --------------------------------------------------------------------------- counting

def tp_counts(model: nn.Module, x: torch.Tensor) -> tuple[float | None, float | None]:
    """Torch-Pruning's MACs and parameters (None where its counter fails)."""
    import torch_pruning as tp

    try:
        with _quiet():
            macs, params = tp.utils.count_ops_and_params(model.eval(), x)
        return float(macs), float(params)
    except Exception:  # noqa: BLE001 - its counter is a second yardstick only
        return None, None


def counts(model: nn.Module, x: torch.Tensor, dense: dict[str, Any], *, tp_counter: bool = True) -> dict[str, Any]:
    """Our counts (effective ones: masks applied) and Torch-Pruning's, with fractions of the dense model."""
    r = count_flops(model, x)
    out = {"params": r.total_effective_params, "macs": r.total_effective_macs,
           "params_frac": r.total_effective_params / dense["params"],
           "macs_frac": r.total_effective_macs / dense["macs"]}
    if tp_counter:
        macs, params = tp_counts(model, x)
        if macs is not None and dense.get("tp_macs"):
            out.update(tp_macs=macs, tp_params=params, tp_macs_frac=macs / dense["tp_macs"])
    return out


def dense_counts(model: nn.Module, x: torch.Tensor) -> dict[str, Any]:
    r = count_flops(model, x)
    macs, params = tp_counts(model, x)
    return {"params": r.total_params, "macs": r.total_macs, "tp_macs": macs, "tp_params": params}


def widths(model: nn.Module) -> list[int]:
    """Output channels of every conv / linear, in module order (what the runtimes see)."""
    return [m.out_channels if isinstance(m, nn.modules.conv._ConvNd) else m.out_features
            for m in model.modules() if isinstance(m, (nn.modules.conv._ConvNd, nn.Linear))]


def odd_widths(model: nn.Module, multiple: int = 8) -> int:
    return sum(1 for w in widths(model) if w % multiple)


# --------------------------------------------------------------------------- the pruners

def ours_channel(model: nn.Module, x: torch.Tensor, criterion: str = "l1", round_to: int | None = None, *,
                 data: Any = None, target: float | None = FLOPS_TARGET,
                 ratio: float = 0.5) -> tuple[nn.Module, dict[str, Any]]:
    """prune_channels (FLOPs target or fixed ratio) + shrink; returns the shrunk model and what happened."""
    cfg = ChannelPruneConfig(ratio=ratio, criterion=criterion, ascend_optimized=round_to is not None,
                             round_to=round_to or 16)
    kw: dict[str, Any] = {}
    if criterion in ("taylor", "apoz", "mean_activation"):
        kw = {"data": data, "loss_fn": F.cross_entropy, "num_batches": DATA_BATCHES}
    start = time.perf_counter()
    with _quiet():
        masked = prune_channels(model, cfg, x, flops_target=target, **kw)
    prune_s = time.perf_counter() - start
    plan = masked.amct_channel_plan
    start = time.perf_counter()
    with _quiet():
        small, record = shrink(masked, x)
    shrink_s = time.perf_counter() - start
    masked.eval()
    small.eval()
    with torch.no_grad():
        a, b = masked(x), small(x)
    diff = float((a - b).abs().max())
    scale = float(a.abs().max()) or 1.0
    info = {"config": plan.config.short(), "ratio": plan.config.ratio, "prune_s": prune_s, "shrink_s": shrink_s,
            "groups_pruned": sum(1 for d in plan.decisions if d.keep is not None), "groups": len(plan.decisions),
            "channels_pruned": plan.pruned_channels(), "shrunk_vs_masked_max_abs": diff,
            "shrunk_vs_masked_rel": diff / scale, "layers_sliced": len(record.layers)}
    return small, info


def _classifiers(model: nn.Module, num_classes: int) -> list[nn.Module]:
    """Layers that make the logits (Torch-Pruning must be told; ours finds them from the graph)."""
    return [m for m in model.modules() if (isinstance(m, nn.Linear) and m.out_features == num_classes)
            or (isinstance(m, nn.Conv2d) and m.out_channels == num_classes)]


def tp_prune(model: nn.Module, x: torch.Tensor, ratio: float, p: int = 1, round_to: int | None = None,
             num_classes: int = 10) -> nn.Module:
    """Torch-Pruning at one ratio (a pruned copy)."""
    import torch_pruning as tp

    m = copy.deepcopy(model).eval()
    with _quiet():
        pruner = tp.pruner.MagnitudePruner(m, x, importance=tp.importance.GroupMagnitudeImportance(p=p),
                                           pruning_ratio=ratio, ignored_layers=_classifiers(m, num_classes),
                                           round_to=round_to)
        pruner.step()
    return m


def tp_channel(model: nn.Module, x: torch.Tensor, p: int = 1, round_to: int | None = None, num_classes: int = 10,
               target: float = FLOPS_TARGET, iterations: int = 12) -> tuple[nn.Module, dict[str, Any]]:
    """Torch-Pruning to ``target`` of its own dense MACs: bisection on ``pruning_ratio`` (smallest that fits)."""
    start = time.perf_counter()
    base, _ = tp_counts(model, x)
    if base is None:
        raise RuntimeError("Torch-Pruning's counter failed on the dense model")

    def frac(r: float) -> float:
        macs, _ = tp_counts(tp_prune(model, x, r, p, round_to, num_classes), x)
        return macs / base

    # the upper end: the first of a few ratios that meets the target (with round_to, Torch-Pruning 1.6's MACs are
    # not monotone in the ratio at high ratios: on resnet18 0.7 leaves 8 % of the MACs, 0.9 leaves 55 %)
    lo, hi = 0.0, None
    for r in (0.5, 0.7, 0.8, 0.9, 0.95):
        if frac(r) <= target:
            hi = r
            break
        lo = r
    if hi is None:
        raise RuntimeError(f"no pruning_ratio up to 0.95 reaches {target:g} of the MACs")
    for _ in range(iterations):
        mid = (lo + hi) / 2
        if frac(mid) <= target:
            hi = mid
        else:
            lo = mid
    pruned = tp_prune(model, x, hi, p, round_to, num_classes)
    rounding = f" round_to={round_to}" if round_to else ""
    info = {"config": f"MagnitudePruner GroupMagnitudeImportance(p={p}){rounding}",
            "ratio": round(hi, 5), "prune_s": time.perf_counter() - start}
    return pruned, info


def eligible_24(model: nn.Module) -> tuple[list[str], dict[str, str]]:
    """Layers whose input channels per group are a multiple of 4 (2:4 along them), and the others with why."""
    ok, skipped = [], {}
    for name, m in model.named_modules():
        if isinstance(m, (nn.modules.conv._ConvNd, nn.Linear)):
            cin = m.in_features if isinstance(m, nn.Linear) else m.in_channels // m.groups
            if cin % 4 == 0:
                ok.append(name)
            else:
                depthwise = " (depthwise)" if getattr(m, "groups", 1) > 1 else ""
                skipped[name] = f"{cin} input channel(s) per group{depthwise}"
    return ok, skipped


# --------------------------------------------------------------------------- digits reference models

def run_digits(name: str, work: Path) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    dense_model = pretrained(name).eval()
    data = _Digits(name, dense_model)
    x = data.x1
    dense = dense_counts(dense_model, x)
    base = {"model": name, "input": list(x.shape[1:]), "test_samples": len(data.y_test)}
    rows: list[dict[str, Any]] = []
    onnx_models: dict[tuple[str, int], Any] = {}
    torch_models: dict[str, nn.Module] = {"torch dense": dense_model}   # "torch <variant>": eager PyTorch
    print(f"[sparsity] {name}: dense", flush=True)
    try:
        proto = export_fp32(dense_model, data.examples[1], work / f"{name}_dense.onnx")
        for b in BATCHES:
            onnx_models[("dense", b)] = fix_batch(proto, b)
    except Exception as e:  # noqa: BLE001
        failures_export = _err(e)
    else:
        failures_export = None
    d = {**base, "family": "dense", "tool": "-", "label": "dense", **data.evaluate(dense_model),
         "params": dense["params"],
         "macs": dense["macs"], "tp_macs": dense["tp_macs"], "tp_params": dense["tp_params"], "params_frac": 1.0,
         "macs_frac": 1.0, "tp_macs_frac": 1.0, "widths": widths(dense_model)}
    if failures_export:
        d["export_error"] = failures_export
    rows.append(d)

    def add(row: dict[str, Any], model: nn.Module | None, latency_key: str | None = None) -> None:
        if model is not None:
            row.update(data.evaluate(model))
            row["drop_points"] = (d["acc"] - row["acc"]) * 100
            if latency_key is not None:
                torch_models[f"torch {latency_key}"] = model
                try:
                    proto = export_fp32(model, data.examples[1], work / f"{name}_{latency_key.replace(' ', '_')}.onnx")
                    for b in BATCHES:
                        onnx_models[(latency_key, b)] = fix_batch(proto, b)
                except Exception as e:  # noqa: BLE001
                    row["export_error"] = _err(e)
        rows.append(row)

    # ours, every criterion (and ascend_optimized rounding with l1)
    variants = [(c, None) for c in CRITERIA] + [("l1", r) for r in ASCEND]
    for criterion, round_to in variants:
        label = f"ours {criterion}" + (f" x{round_to}" if round_to else "")
        print(f"[sparsity] {name}: {label}", flush=True)
        row = {**base, "family": "channel", "tool": OURS, "label": label, "criterion": criterion,
               "round_to": round_to}
        try:
            src, extra = dense_model, {}
            if criterion == "bn_slim":  # sparsify the BN scales first (counted in the row, not in the fine-tune)
                src = copy.deepcopy(dense_model)
                slim = finetune(src, data.slim_epochs, after_backward=lambda m=src: add_bn_slim_grad(m, SLIM_STRENGTH))
                extra = {"slim_epochs": SLIM_EPOCHS, "slim_strength": SLIM_STRENGTH, "slim_s": slim["finetune_s"]}
            small, info = ours_channel(src, x, criterion, round_to, data=data.score_batches)
            row.update(info, **extra, before_finetune=data.evaluate(small)["acc"])
            row.update(counts(small, x, dense), widths=widths(small), odd_widths=odd_widths(small))
            row.update(finetune(small, data.epochs))
        except Exception as e:  # noqa: BLE001
            row["error"] = _err(e)
            row["traceback"] = traceback.format_exc(limit=-4)
            add(row, None)
            continue
        key = {("l1", None): LAT_OURS, ("l1", 16): LAT_OURS_X16}.get((criterion, round_to))
        add(row, small, key)

    for label, p in TP_NORMS.items():
        print(f"[sparsity] {name}: {label}", flush=True)
        row = {**base, "family": "channel", "tool": TP, "label": label, "criterion": f"group L{p}"}
        try:
            small, info = tp_channel(dense_model, x, p)
            row.update(info, before_finetune=data.evaluate(small)["acc"])
            row.update(counts(small, x, dense), widths=widths(small), odd_widths=odd_widths(small))
            row.update(finetune(small, data.epochs))
        except Exception as e:  # noqa: BLE001
            row["error"] = _err(e)
            row["traceback"] = traceback.format_exc(limit=-4)
            add(row, None)
            continue
        add(row, small, LAT_TP if p == 1 else None)

    layers, skipped = eligible_24(dense_model)
    for label, cfg in NM_VARIANTS.items():
        print(f"[sparsity] {name}: {label}", flush=True)
        row = {**base, "family": "2:4", "tool": OURS, "label": label, "config": cfg.short(),
               "layers": len(layers), "skipped": skipped}
        try:
            with _quiet():
                m = apply_nm(dense_model, Targeting(None, module_name={n: cfg for n in layers}), x)
            row.update(before_finetune=data.evaluate(m)["acc"], **finetune(m, data.epochs))
            row.update(counts(m, x, dense, tp_counter=False), weight_sparsity=sparsity_of(m)["total"])
        except Exception as e:  # noqa: BLE001
            row["error"] = _err(e)
            add(row, None)
            continue
        add(row, m)

    label = f"AGP {AGP_SPARSITY:.0%}"
    print(f"[sparsity] {name}: {label}", flush=True)
    total = sum(len(e) for e in data.epochs)
    cfg = MagnitudeConfig(sparsity=AGP_SPARSITY, schedule="agp", start=0, end=max(1, int(0.7 * total)),
                          frequency=max(1, total // 20))
    row = {**base, "family": "magnitude", "tool": OURS, "label": label, "config": cfg.short()}
    try:
        with _quiet():
            m = prune_magnitude(dense_model, cfg, x)
        sched = MagnitudeScheduler(m)
        row.update(finetune(m, data.epochs, after_step=sched.step))
        sched.prune_to(AGP_SPARSITY)  # in case the quick run's ramp ended early (a no-op otherwise)
        row.update(counts(m, x, dense, tp_counter=False), weight_sparsity=sparsity_of(m)["total"])
    except Exception as e:  # noqa: BLE001
        row["error"] = _err(e)
        add(row, None)
        m = None
    if m is not None:
        add(row, m)

    print(f"[sparsity] {name}: latency", flush=True)
    lat = latency_rows(name, onnx_models, torch_models, data.examples, {1: REPEATS, 16: REPEATS})
    return rows, lat


# --------------------------------------------------------------------------- torchvision: structure and latency

def run_vision(name: str, work: Path) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    import torchvision

    torch.manual_seed(SEED)
    model = getattr(torchvision.models, name)(weights=None).eval()
    g = torch.Generator().manual_seed(SEED)
    examples = {b: torch.randn(b, 3, 224, 224, generator=g) for b in BATCHES}
    x = examples[1]
    dense = dense_counts(model, x)
    base = {"model": f"torchvision.{name}", "input": [3, 224, 224], "weights": "random (eval mode)"}
    rows = [{**base, "family": "dense", "tool": "-", "label": "dense", "params": dense["params"], "macs": dense["macs"],
             "tp_macs": dense["tp_macs"], "tp_params": dense["tp_params"], "macs_frac": 1.0, "tp_macs_frac": 1.0,
             "params_frac": 1.0, "odd_widths": odd_widths(model)}]
    onnx_models: dict[tuple[str, int], Any] = {}
    torch_models: dict[str, nn.Module] = {"torch dense": model}
    variants: list[tuple[str, str, Callable[[], tuple[nn.Module, dict[str, Any]]]]] = [
        (LAT_OURS, OURS, lambda: ours_channel(model, x, "l1")),
        (LAT_OURS_X16, OURS, lambda: ours_channel(model, x, "l1", 16)),
        (LAT_TP, TP, lambda: tp_channel(model, x, 1, None, 1000)),
        (LAT_TP_X16, TP, lambda: tp_channel(model, x, 1, 16, 1000)),
    ]
    for label, tool, run in variants:
        print(f"[sparsity] torchvision.{name}: {label}", flush=True)
        row: dict[str, Any] = {**base, "family": "channel", "tool": tool, "label": label}
        try:
            small, info = run()
            row.update(info, pruned=True)
            row.update(counts(small, x, dense), odd_widths=odd_widths(small))
            small.eval()
            torch_models[f"torch {label}"] = small
            proto = export_fp32(small, examples[1], work / f"{name}_{label.replace(' ', '_')}.onnx")
            for b in BATCHES:
                onnx_models[(label, b)] = fix_batch(proto, b)
        except Exception as e:  # noqa: BLE001
            row.update(pruned=False, error=_err(e))
        rows.append(row)
    try:
        proto = export_fp32(model, examples[1], work / f"{name}_dense.onnx")
        for b in BATCHES:
            onnx_models[("dense", b)] = fix_batch(proto, b)
    except Exception as e:  # noqa: BLE001
        rows[0]["export_error"] = _err(e)
    print(f"[sparsity] torchvision.{name}: latency", flush=True)
    lat = latency_rows(f"torchvision.{name}", onnx_models, torch_models, examples, {1: REPEATS, 16: REPEATS_LARGE})
    return rows, lat


def run_coverage(name: str) -> dict[str, Any]:
    """Can each tool prune this model at all (one fixed ratio)?"""
    import torchvision

    torch.manual_seed(SEED)
    model = getattr(torchvision.models, name)(weights=None).eval()
    side = 224 if name.startswith(("vit", "swin")) else 64
    x = torch.randn(1, 3, side, side, generator=torch.Generator().manual_seed(SEED))
    with torch.no_grad():
        ref_shape = tuple(model(x).shape)
    dense_macs = count_flops(model, x).total_macs
    out: dict[str, Any] = {"model": f"torchvision.{name}", "input": [3, side, side], "ratio": COVERAGE_RATIO}
    print(f"[sparsity] coverage torchvision.{name}", flush=True)
    for tool in (OURS, TP):
        res: dict[str, Any] = {}
        start = time.perf_counter()
        try:
            if tool == OURS:
                small, info = ours_channel(model, x, "l1", target=None, ratio=COVERAGE_RATIO)
                res.update(groups_pruned=info["groups_pruned"], groups=info["groups"],
                           equal=info["shrunk_vs_masked_rel"] < 1e-3, shrunk_vs_masked_rel=info["shrunk_vs_masked_rel"])
            else:
                small = tp_prune(model, x, COVERAGE_RATIO, 1, None, 1000)
            with torch.no_grad():
                shape = tuple(small.eval()(x).shape)
            frac = count_flops(small, x).total_macs / dense_macs
            res.update(macs_frac=frac, output_shape_ok=shape == ref_shape)
            res["pruned"] = bool(shape == ref_shape and frac < 0.99 and res.get("equal", True))
            if not res["pruned"]:
                res["why"] = ("output shape changed" if shape != ref_shape else
                              "shrunk model differs from the masked one" if not res.get("equal", True) else
                              "nothing pruned (MACs unchanged)")
        except Exception as e:  # noqa: BLE001
            res.update(pruned=False, why=_err(e))
        res["seconds"] = time.perf_counter() - start
        out[tool] = res
    return out


# --------------------------------------------------------------------------- report

def acc_table(rows: list[dict[str, Any]]) -> str:
    table = []
    for r in rows:
        if not r["model"].endswith("digits"):
            continue
        if "error" in r:
            table.append((r["model"], r["label"], "ERROR: " + r["error"][:90]) + ("",) * 10)
            continue
        tp_frac = _f(r.get("tp_macs_frac") and r["tp_macs_frac"] * 100, ".1f")
        table.append((r["model"], r["label"], _f(r["macs_frac"] * 100, ".1f"), tp_frac,
                      _f(r["params_frac"] * 100, ".1f"),
                      _f(r.get("ratio"), ".3f"), _f(r.get("before_finetune"), ".4f"), _f(r["acc"], ".4f"),
                      _f(r.get("drop_points"), "+.2f"), _f(r.get("val_acc"), ".4f"), _f(r.get("top1_agreement"), ".4f"),
                      _f(r.get("prune_s"), ".1f"), _f(r.get("finetune_s"), ".1f")))
    return render_table(["model", "method", "MACs %", "MACs % (TP count)", "params %", "ratio", "acc pruned",
                         "acc fine-tuned", "drop pts", "val acc", "agree", "prune s", "fine-tune s"], table)


def vision_table(rows: list[dict[str, Any]]) -> str:
    table = []
    for r in rows:
        if r["model"].endswith("digits"):
            continue
        if r.get("error"):
            table.append((r["model"], r["label"], "no", "ERROR: " + r["error"][:90], "", "", "", "", ""))
            continue
        table.append((r["model"], r["label"], "-" if r["family"] == "dense" else "yes", _f(r["macs_frac"] * 100, ".1f"),
                      _f(r.get("tp_macs_frac") and r["tp_macs_frac"] * 100, ".1f"), _f(r["params_frac"] * 100, ".1f"),
                      _f(r.get("ratio"), ".3f"), r.get("odd_widths", "-"), _f(r.get("prune_s"), ".1f")))
    return render_table(["model", "method", "pruned", "MACs %", "MACs % (TP count)", "params %", "ratio",
                         "widths not /8", "prune s"], table)


LAT_KEYS = ("dense", LAT_OURS, LAT_OURS_X16, LAT_TP, LAT_TP_X16)


def speedups(r: dict[str, Any], engine: str) -> dict[str, float]:
    """dense ms / variant ms for one latency row and engine (``torch`` or ``ORT``)."""
    ms = r["ms"]
    key = (lambda k: f"torch {k}") if engine == "torch" else (lambda k: k)
    out = {}
    if key("dense") in ms:
        for k in LAT_KEYS[1:]:
            if key(k) in ms:
                out[k] = ms[key("dense")] / ms[key(k)]
    return out


def lat_table(lat: list[dict[str, Any]]) -> str:
    table = []
    for r in lat:
        for engine in ("torch", "ORT"):
            ms = r["ms"]
            key = (lambda k: f"torch {k}") if engine == "torch" else (lambda k: k)
            sp = speedups(r, engine)
            table.append((r["model"], r["batch"], engine, *(_f(ms.get(key(k)), ".3f") for k in LAT_KEYS),
                          *(_f(sp.get(k), ".2f") for k in LAT_KEYS[1:])))
    return render_table(["model", "batch", "engine", *(f"{k} ms" for k in LAT_KEYS),
                         *(f"x {k}" for k in LAT_KEYS[1:])], table)


def coverage_table(cov: list[dict[str, Any]]) -> str:
    table = []
    for c in cov:
        cells = []
        for tool in (OURS, TP):
            t = c[tool]
            cells.append("yes" if t["pruned"] else "no")
            cells.append(_f(t.get("macs_frac") and t["macs_frac"] * 100, ".1f"))
            cells.append("" if t["pruned"] else t.get("why", "")[:70])
        table.append((c["model"], "x".join(map(str, c["input"])), *cells))
    return render_table(["model", "input", "ours", "ours MACs %", "ours note", "TP", "TP MACs %", "TP note"], table)


def goals(rows: list[dict[str, Any]], lat: list[dict[str, Any]], cov: list[dict[str, Any]]) -> list[dict[str, Any]]:
    out = []

    def add(name: str, ok: bool | None, detail: str) -> None:
        out.append({"goal": name, "status": "PASS" if ok else ("FAIL" if ok is not None else "N/A"), "detail": detail})

    for model in DIGITS_MODELS:
        mine = [r for r in rows
                if r["model"] == model and r["tool"] == OURS and r["family"] == "channel" and "acc" in r]
        peers = [r for r in rows if r["model"] == model and r["tool"] == TP and "acc" in r]
        default = next((r for r in mine if r["label"] == "ours l1"), None)
        if default is None:
            add(f"{model}: channel pruning to <= {FLOPS_TARGET:.0%} MACs, drop <= {GOAL_DROP} pt after fine-tune", None,
                "no result of ours")
            continue
        every = ", ".join(f"{r['label'].removeprefix('ours ')} {r['drop_points']:+.2f}" for r in mine)
        add(f"{model}: channel pruning to <= {FLOPS_TARGET:.0%} MACs, drop <= {GOAL_DROP} pt after fine-tune "
            f"(ours l1, the default criterion)", default["drop_points"] <= GOAL_DROP,
            f"l1 {default['acc']:.4f} vs dense {default['acc'] + default['drop_points'] / 100:.4f}, drop "
            f"{default['drop_points']:+.2f} pts at {default['macs_frac']:.1%} MACs; every variant: {every}")
        best = max(mine, key=lambda r: r["val_acc"])  # the first of equals: l1 leads the list
        if peers:
            tp_best = max(peers, key=lambda r: r["val_acc"])
            ok = default["acc"] >= min(p["acc"] for p in peers) and best["acc"] >= tp_best["acc"]
            add(f"{model}: accuracy no worse than Torch-Pruning's (ours l1 >= TP group-L1; our pick by validation >= "
                f"TP's pick by validation)", ok,
                f"ours l1 {default['acc']:.4f}, ours best-val ({best['label']}) {best['acc']:.4f}; "
                + ", ".join(f"{p['label']} {p['acc']:.4f} at {p['macs_frac']:.1%} MACs (ours count)" for p in peers))
        nm = [r for r in rows if r["model"] == model and r["family"] == "2:4" and "acc" in r]
        if nm:
            r = next((r for r in nm if r["label"] == "2:4"), nm[0])
            add(f"{model}: 2:4 on every eligible layer loses <= {GOAL_NM_DROP} pt", r["drop_points"] <= GOAL_NM_DROP,
                "; ".join(f"{r['label']} {r['acc']:.4f} ({r['drop_points']:+.2f} pts, {r['weight_sparsity']:.1%} of "
                          f"masked-layer weights zero, {r['params_frac']:.1%} params)" for r in nm))
    met = [(r["model"], r["label"], r["macs_frac"]) for r in rows if r["family"] == "channel" and r["tool"] == OURS
           and "macs_frac" in r]
    if met:
        worst = max(met, key=lambda t: t[2])
        add(f"ours reaches <= {FLOPS_TARGET:.0%} of the dense MACs (our count) on every model and variant",
            worst[2] <= FLOPS_TARGET + 1e-9, f"worst {worst[0]} {worst[1]}: {worst[2]:.2%}")
    for engine in ("torch", "ORT"):
        for label in (LAT_OURS_X16, LAT_OURS):
            cells = [(r["model"], r["batch"], speedups(r, engine).get(label)) for r in lat]
            cells = [c for c in cells if c[2] is not None]
            if not cells:
                add(f"{engine}: {label} >= {GOAL_SPEEDUP}x faster than dense", None, "not measured")
                continue
            worst = min(cells, key=lambda c: c[2])
            add(f"{engine}: shrunk model ({label}) >= {GOAL_SPEEDUP}x faster than dense, every model and batch",
                worst[2] >= GOAL_SPEEDUP, f"worst {worst[0]} b{worst[1]} {worst[2]:.2f}x; all: "
                + ", ".join(f"{m} b{b} {s:.2f}x" for m, b, s in cells))
    main = [(r["model"], r["tool"], r.get("pruned", "error" not in r)) for r in rows
            if r["family"] == "channel" and r["label"] in (LAT_OURS, LAT_TP)]
    by_model: dict[str, dict[str, bool]] = {}
    for m, tool, ok in main:
        by_model.setdefault(m, {})[tool] = bool(ok)
    for c in cov:
        key = c["model"] + f" (ratio {COVERAGE_RATIO})"
        by_model.setdefault(key, {}).update({OURS: c[OURS]["pruned"], TP: c[TP]["pruned"]})
    if by_model:
        missing = [m for m, t in by_model.items() if t.get(TP) and not t.get(OURS)]
        only_ours = [m for m, t in by_model.items() if t.get(OURS) and not t.get(TP)]
        neither = [m for m, t in by_model.items() if not t.get(OURS) and not t.get(TP)]
        add("every model Torch-Pruning can prune, ours can too", not missing,
            f"{sum(1 for t in by_model.values() if t.get(OURS))}/{len(by_model)} models pruned by ours, "
            f"{sum(1 for t in by_model.values() if t.get(TP))}/{len(by_model)} by Torch-Pruning; TP only: "
            f"{', '.join(missing) or 'none'}; ours only: {', '.join(only_ours) or 'none'}; "
            f"neither: {', '.join(neither) or 'none'}")
    return out


def main() -> None:
    start = time.perf_counter()
    torch.manual_seed(SEED)
    torch.set_num_threads(THREADS)
    warnings.filterwarnings("ignore")
    import torchvision

    tp_version = importlib.metadata.version("torch-pruning")
    rows: list[dict[str, Any]] = []
    lat: list[dict[str, Any]] = []
    cov: list[dict[str, Any]] = []
    failures: dict[str, str] = {}
    with tempfile.TemporaryDirectory(prefix="amct_bench_sparsity_") as tmp:
        work = Path(tmp)
        for name in DIGITS_MODELS:
            try:
                r, lr = run_digits(name, work)
                rows += r
                lat += lr
            except Exception as e:  # noqa: BLE001
                failures[name] = _err(e)
                traceback.print_exc()
        for name in VISION_MODELS:
            try:
                r, lr = run_vision(name, work)
                rows += r
                lat += lr
            except Exception as e:  # noqa: BLE001
                failures[f"torchvision.{name}"] = _err(e)
                traceback.print_exc()
    for name in COVERAGE_MODELS:
        try:
            cov.append(run_coverage(name))
        except Exception as e:  # noqa: BLE001
            failures[f"coverage torchvision.{name}"] = _err(e)
            traceback.print_exc()
    checks = goals(rows, lat, cov)
    result = {
        "benchmark": "sparsity", "quick": QUICK, "seconds": round(time.perf_counter() - start, 1),
        "versions": {"amct_torch": amct_torch.__version__, "torch": torch.__version__, "torch_pruning": tp_version,
                     "onnxruntime": ort.__version__, "onnx": onnx.__version__, "torchvision": torchvision.__version__,
                     "python": platform.python_version()},
        "machine": {"arch": platform.machine(), "cpu": _cpu_name(), "cpu_count": os.cpu_count(),
                    "system": platform.system()},
        "threads": {"torch": torch.get_num_threads(), "ort_intra_op": THREADS},
        "flops_target": FLOPS_TARGET,
        "finetune": {"epochs": EPOCHS, "optimizer": "AdamW, weight_decay 0", "lr": LR,
                     "schedule": "cosine per step to 0",
                     "label_smoothing": LABEL_SMOOTHING, "batch": 64,
                     "data": "augmented training split, batches drawn once per model, the same for every method",
                     "ours": "on the shrunk model (computes what the masked one does; checked)", "seed": SEED},
        "bn_slim": {"epochs": SLIM_EPOCHS, "strength": SLIM_STRENGTH, "note": "extra training before pruning"},
        "data_criteria": f"{DATA_BATCHES} unaugmented training batches of 64; taylor with cross-entropy",
        "torch_pruning": {"pruner": "tp.pruner.MagnitudePruner", "importance": "GroupMagnitudeImportance(p)",
                          "ignored_layers": "the classifier", "target": "bisection on pruning_ratio (12 steps) with "
                          "tp.utils.count_ops_and_params"},
        "latency_method": "median ms of interleaved repeats (benchmarks.ptq.latency_rows: ONNX Runtime models and "
                          "PyTorch models timed as two groups, one untimed call before each timed one); fp32 ONNX "
                          "(TorchScript exporter, benchmarks.ptq.export_fp32) fixed to batch 1 / 16",
        "repeats": {"digits": REPEATS, "vision_b1": REPEATS, "vision_b16": REPEATS_LARGE},
        "coverage": {"ratio": COVERAGE_RATIO, "ours": "prune_channels(ratio) + shrink, equal to the masked model",
                     "torch_pruning": "MagnitudePruner(pruning_ratio), classifier ignored"},
        "notes": ["macs/params: our counter (count_flops; masked models: effective counts, masked weights cost "
                  "nothing); tp_macs/tp_params: Torch-Pruning's counter; *_frac: fraction of the dense model",
                  "acc: test split; drop_points: dense test accuracy minus this, in points; val_acc: validation",
                  "2:4 and AGP models keep dense tensors: no CPU speed-up, not timed",
                  "latency keys: '<variant>' = ONNX Runtime, 'torch <variant>' = PyTorch eager"],
        "rows": rows, "latency_rows": lat, "coverage_rows": cov, "goals": checks, "failures": failures,
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    out_path = RESULTS / ("sparsity_quick.json" if QUICK else "sparsity.json")
    out_path.write_text(json.dumps(_finite(result), indent=1) + "\n")

    print(f"\nDigits: channel pruning to <= {FLOPS_TARGET:.0%} MACs, 2:4 and AGP {AGP_SPARSITY:.0%}, each fine-tuned "
          f"{EPOCHS} epochs (test accuracy; MACs/params % of dense, our counter; masked models: effective)")
    print(acc_table(rows))
    print(f"\ntorchvision at 224 (random weights): pruning to <= {FLOPS_TARGET:.0%} MACs")
    print(vision_table(rows))
    print(f"\nLatency (ms, median of interleaved repeats, {THREADS} threads; x = dense / variant)")
    print(lat_table(lat))
    if cov:
        print(f"\nCoverage: each tool at ratio {COVERAGE_RATIO} on more torchvision models (random weights)")
        print(coverage_table(cov))
    print()
    for c in checks:
        print(f"{c['status']}: {c['goal']} -- {c['detail']}")
    for k, v in failures.items():
        print(f"FAILED: {k}: {v}")
    print(f"\nwrote {out_path} in {result['seconds']:.0f} s")


if __name__ == "__main__":
    sys.exit(main())

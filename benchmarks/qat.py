"""Quantization-aware training against PTQ and torch.ao's QAT, side by side in one run.

On the pretrained digits reference models (``resnet_digits``, ``mobilenetv2_digits``; 16x16 digits, 1,257
train / 270 validation / 270 test images), at W8A8, W4A8 and W4A4:

* ``fp32`` - the trained model; and, for information, the same model fine-tuned with the QAT recipe
  below in float (``fp32 fine-tuned``: what the extra epochs alone do);
* ``ours PTQ`` - ``amct_torch.quantize`` + ``calibrate`` on ``dm.calibration_batches(4)`` with HFMG
  activations, with ARQ weights (``PTQ hfmg``) and with AdaRound weights (``PTQ adaround+hfmg``,
  ``BENCH_ADA_ITERS`` iterations: the best PTQ setting of ``benchmarks/ptq.py``);
* ``ours QAT`` - ``amct_torch.prepare_qat(model, QatConfig(...), x)`` and a plain training loop:
  ``EPOCHS`` epochs of the augmented training split (the same pre-drawn batches for every method),
  AdamW (``LR``, no weight decay), cosine decay per step, cross-entropy with the pretraining's label
  smoothing; BatchNorm statistics frozen (``freeze_bn_stats``) for the last ``FREEZE_BN_EPOCHS``
  epoch(s), the quantizers frozen (``freeze_quantizers``) after the last. Activation clips are
  initialised by HFMG over the first 4 steps (``INIT``). Variants (``QAT_VARIANTS``): ULQ activations
  with ARQ-retrain or ULQ-retrain weights, and LSQ+ for both; the one with the best *validation* logit
  SQNR among those within one validation image of the best validation accuracy is ours at that bit width
  (``select``), the others are shown. (LR, epochs and the initialisation were chosen in a few trials on
  the validation split: ``TUNING``);
* ``torch.ao QAT`` - ``prepare_qat_fx`` with ``get_default_qat_qconfig_mapping("x86")`` (4-bit weights:
  per-channel symmetric fake-quant restricted to [-8, 7]; 4-bit activations: quint8 fake-quant
  restricted to [0, 15]), trained by the same loop (same batches, optimizer, LR, schedule; BN frozen
  with ``freeze_bn_stats`` for the same epochs, observers disabled after the last), then ``convert_fx``.

Evaluation on the test split: accuracy and fidelity to the fp32 logits (top-1 agreement, logit cosine,
logit SQNR in dB; ``benchmarks.ptq.fidelity``), *simulated* (ours: fake-quant in PyTorch, eval mode;
torch.ao: its prepared fake-quant model) and *deployed* (ours: the exported QDQ fake-quant ONNX in ONNX
Runtime; torch.ao: the ``convert_fx`` int8 model in PyTorch). Goals use the deployed figures. For QAT,
the share of the PTQ accuracy loss it recovers: ``(acc_qat - acc_ptq) / (acc_fp32 - acc_ptq)`` against
our best PTQ (chosen on the validation split as above), n/a where PTQ lost nothing.

Training-step time: forward + backward + AdamW step at batch 64, medians of interleaved steps (methods
round-robin, the order rotated each round; ``benchmarks.ptq.interleaved_latency``), the same batches
for all, on freshly prepared models in their main training phase (ours after the quantizers were
initialised, BN statistics live, ranges learning; torch.ao with observers on), reported as ratios to
the fp32 step. Plus a torch.profiler breakdown of one of our steps (``PROFILE_STEPS`` steps).

Environment: ``AMCT_BENCH_QUICK=1`` (1 epoch, fewer variants and repeats: a smoke run),
``BENCH_STEP_REPEATS`` (default 20), ``BENCH_ADA_ITERS`` (default 300). Writes
``benchmarks/results/qat.json`` (the quick run: ``amct_qat_quick.json`` in the temporary directory) and
prints tables and PASS/FAIL lines for the goals (informational).
"""

from __future__ import annotations

import contextlib
import copy
import itertools
import json
import os
import platform
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any, Callable

import onnx
import onnxruntime as ort
import torch
import torch.nn as nn
import torch.nn.functional as F

import amct_torch
from amct_torch.config import QatConfig, QuantConfig
from amct_torch.graph.plan import render_table
from amct_torch.zoo import pretrained, reference_datamodule

from .ptq import (_cpu_name, _err, _f, _finite, _quiet, fidelity, interleaved_latency, ort_logits, our_export, our_ptq,
                  session, torch_logits)

RESULTS = Path(__file__).resolve().parent / "results"
QUICK = os.environ.get("AMCT_BENCH_QUICK", "") not in ("", "0")
THREADS = 2
MODELS = ("resnet_digits", "mobilenetv2_digits")
BITS = {"W8A8": (8, 8), "W4A8": (4, 8), "W4A4": (4, 4)}      # tag -> (weight bits, activation bits)

# the training recipe, the same for ours, torch.ao and fp32 fine-tuning
EPOCHS = 1 if QUICK else 4
FREEZE_BN_EPOCHS = 1            # BN statistics frozen for the last epoch(s)
LR = 1e-5                       # AdamW, no weight decay, cosine decay per step to 0
LABEL_SMOOTHING = 0.05          # as in pretraining
SEED = 0
TUNING = {  # trials on the validation split (4 epochs; val accuracy / val logit SQNR dB; 1 val image = 0.37 pts)
    "ULQ + ARQ-retrain, IFMR init over 1 step, LR 2e-4 / 1e-4 / 5e-5": {
        "resnet W4A4": "0.9815/18.3, 0.9778/19.4, 0.9852/19.6", "resnet W4A8": "0.9815/20.8, 0.9852/22.3, 0.9852/24.3",
        "mobilenet W4A4": "0.9778/14.7, 0.9815/15.2, 0.9778/14.5"},
    "ULQ + ARQ-retrain, HFMG init over 4 steps, LR 1e-4 / 5e-5": {
        "resnet W4A4": "0.9815/19.4, 0.9852/20.2", "resnet W4A8": "0.9852/22.4, 0.9852/24.2",
        "mobilenet W4A4": "0.9815/16.4, 0.9852/16.1"},
    "ULQ + ARQ-retrain, HFMG init, LR 5e-5 / 2e-5 / 1e-5": {
        "resnet W8A8": "0.9852/26.6, 0.9852/29.8, 0.9852/31.8", "resnet W4A4": "0.9852/20.2, 0.9815/20.2, 0.9852/20.1",
        "mobilenet W8A8": "0.9889/28.5, 0.9889/31.4, 0.9889/32.7",
        "mobilenet W4A4": "0.9889/16.5, 0.9926/16.1, 0.9926/16.1"},
    "torch.ao, LR 1e-4 / 5e-5 / 2e-5 / 1e-5": {
        "resnet W8A8": "-, 0.9852/26.0, 0.9852/28.5, 0.9852/29.7",
        "resnet W4A4": "0.9815/16.1, 0.9852/16.6, 0.9852/15.9, 0.9852/16.1",
        "resnet W4A8": "0.9852/22.0, 0.9852/22.5, -, -", "mobilenet W8A8": "-, 0.9889/25.9, 0.9889/27.2, 0.9889/27.5",
        "mobilenet W4A4": "0.9704/9.6, 0.9741/9.0, 0.9667/8.7, 0.9815/8.9"},
    "chosen": "LR 1e-5 and HFMG init: larger LRs drift further from the fp32 logits (fine-tuning on labels) at no "
              "validation accuracy gain; at 4 bits 1e-5..5e-5 are within noise (rerunning one trial moved it by "
              "0.4 dB and one image)",
}
INIT = {"init_calibrator": "hfmg", "batch_num": 4}   # activation clips from HFMG over the first 4 steps
QAT_VARIANTS = {                # label -> QatConfig algorithm keys (the first is AMCT's default)
    "ULQ + ARQ-retrain": {"activation_algorithm": "ulq", "weight_algorithm": "arq_retrain"},
    "ULQ + ULQ-retrain": {"activation_algorithm": "ulq", "weight_algorithm": "ulq_retrain"},
    "LSQ+ + LSQ": {"activation_algorithm": "lsq_plus", "weight_algorithm": "lsq_plus"},
}
if QUICK:
    QAT_VARIANTS = dict(itertools.islice(QAT_VARIANTS.items(), 2))
CALIB_BATCHES = 4
ADA_ITERS = int(os.environ.get("BENCH_ADA_ITERS", "50" if QUICK else "300"))
STEP_REPEATS = int(os.environ.get("BENCH_STEP_REPEATS", "5" if QUICK else "20"))
STEP_BATCHES = 4                # the timed steps cycle over this many training batches of 64
PROFILE_STEPS = 3 if QUICK else 10

GOAL_DROP = {"W8A8": 0.1, "W4A8": 0.5, "W4A4": 1.5}          # points of test accuracy below fp32
GOAL_STEP_RATIO = 1.3

M_FP32, M_FT, M_PTQ, M_QAT, M_AO = "fp32", "fp32 fine-tuned", "ours PTQ", "ours QAT", "torch.ao QAT"
DYN_AXES = {"input": {0: "batch"}, "output": {0: "batch"}}
_METRICS = ("acc", "top1_agreement", "cos_mean", "cos_min", "sqnr_db")


# --------------------------------------------------------------------------- data and training

class _Split:
    """Validation and test tensors of one model's datamodule, with the fp32 logits on both."""

    def __init__(self, dm: Any, model: nn.Module):
        self.x_val, self.y_val = dm.split.val[0], dm.split.val[1].numpy()
        self.x_test, self.y_test = dm.split.test[0], dm.split.test[1].numpy()
        self.ref_val, self.ref_test = torch_logits(model, self.x_val), torch_logits(model, self.x_test)

    def val(self, model: nn.Module) -> dict[str, float]:
        return fidelity(self.ref_val, torch_logits(model.eval(), self.x_val), self.y_val)

    def test(self, model: nn.Module) -> dict[str, float]:
        return fidelity(self.ref_test, torch_logits(model.eval(), self.x_test), self.y_test)

    def test_onnx(self, path: str | Path) -> dict[str, float]:
        return fidelity(self.ref_test, ort_logits(session(path), self.x_test.numpy()), self.y_test)


def epoch_batches(dm: Any, epochs: int, seed: int = SEED) -> list[list[tuple[torch.Tensor, torch.Tensor]]]:
    """The shuffled, augmented training batches of every epoch, drawn once so that every method sees the same."""
    torch.manual_seed(seed)
    loader = dm.train_dataloader()
    return [list(loader) for _ in range(epochs)]


def train(model: nn.Module, epochs: list[list[tuple[torch.Tensor, torch.Tensor]]],
          freeze_bn: Callable[[nn.Module], Any] | None = None,
          freeze_quant: Callable[[nn.Module], Any] | None = None) -> dict[str, Any]:
    """The recipe: AdamW, cosine per step, label-smoothed cross-entropy, BN frozen for the last epochs,
    quantizer ranges (observers) frozen at the end."""
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=LR, weight_decay=0.0)
    total = sum(len(e) for e in epochs)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=total)
    losses = []
    start = time.perf_counter()
    for e, batches in enumerate(epochs):
        if freeze_bn is not None and e == len(epochs) - FREEZE_BN_EPOCHS:
            freeze_bn(model)
        run = 0.0
        for x, y in batches:
            opt.zero_grad(set_to_none=True)
            loss = F.cross_entropy(model(x), y, label_smoothing=LABEL_SMOOTHING)
            loss.backward()
            opt.step()
            sched.step()
            run += loss.item()
        losses.append(run / len(batches))
    if freeze_quant is not None:
        freeze_quant(model)
    return {"train_s": time.perf_counter() - start, "epoch_loss": losses}


# --------------------------------------------------------------------------- methods

def qat_config(wbits: int, abits: int, algorithms: dict[str, str]) -> QatConfig:
    return QatConfig(weight_bits=wbits, activation_bits=abits, **INIT, **algorithms)


def prepare_ours(model: nn.Module, cfg: QatConfig, example: torch.Tensor) -> nn.Module:
    with _quiet():
        return amct_torch.prepare_qat(model, cfg, example)


def ptq_config(wbits: int, abits: int, adaround: bool) -> QuantConfig:
    extra = {"weight_algorithm": "adaround", "ada_num_iteration": ADA_ITERS} if adaround else {}
    return QuantConfig(weight_bits=wbits, activation_bits=abits, activation_calibrator="hfmg",
                       batch_num=CALIB_BATCHES, **extra)


def ao_qconfig_mapping(wbits: int, abits: int) -> Any:
    """torch.ao's x86 QAT mapping; narrower weights / activations through quant_min / quant_max."""
    from torch.ao.quantization import QConfig, get_default_qat_qconfig_mapping
    from torch.ao.quantization.fake_quantize import FusedMovingAvgObsFakeQuantize
    from torch.ao.quantization.observer import MovingAverageMinMaxObserver, MovingAveragePerChannelMinMaxObserver

    mapping = get_default_qat_qconfig_mapping("x86")
    if (wbits, abits) == (8, 8):
        return mapping
    default = mapping.global_qconfig
    act = default.activation if abits == 8 else FusedMovingAvgObsFakeQuantize.with_args(
        observer=MovingAverageMinMaxObserver, quant_min=0, quant_max=2 ** abits - 1, dtype=torch.quint8,
        qscheme=torch.per_tensor_affine)
    weight = default.weight if wbits == 8 else FusedMovingAvgObsFakeQuantize.with_args(
        observer=MovingAveragePerChannelMinMaxObserver, quant_min=-2 ** (wbits - 1), quant_max=2 ** (wbits - 1) - 1,
        dtype=torch.qint8, qscheme=torch.per_channel_symmetric)
    return mapping.set_global(QConfig(activation=act, weight=weight))


def prepare_ao(model: nn.Module, wbits: int, abits: int, example: torch.Tensor) -> nn.Module:
    from torch.ao.quantization.quantize_fx import prepare_qat_fx

    with _quiet():
        return prepare_qat_fx(copy.deepcopy(model).train(), ao_qconfig_mapping(wbits, abits), (example,))


def ao_freeze_bn(model: nn.Module) -> None:
    import torch.ao.nn.intrinsic.qat as nniqat

    model.apply(nniqat.freeze_bn_stats)


def ao_freeze_observers(model: nn.Module) -> None:
    """Fix torch.ao's ranges: its fake-quant modules observe in eval mode too, and would learn the test data."""
    from torch.ao.quantization import disable_observer

    model.apply(disable_observer)


def ao_convert(prepared: nn.Module) -> nn.Module:
    from torch.ao.quantization.quantize_fx import convert_fx

    with _quiet():
        return convert_fx(copy.deepcopy(prepared).eval())


# --------------------------------------------------------------------------- one model

def _deployed(row: dict[str, Any], split: _Split, q: nn.Module, prefix: Path, example: torch.Tensor) -> None:
    """Export ``q`` and evaluate its fake-quant ONNX in ONNX Runtime (or record why not)."""
    try:
        res, row["export_s"] = our_export(q.eval(), prefix, example, dynamic=True)
        row["size_bytes"] = res.sizes()["fake_quant"]
        row.update({f"dep_{k}": v for k, v in split.test_onnx(res.fake_quant).items()})
    except Exception as e:  # noqa: BLE001
        row["export_error"] = _err(e)
        row["export_traceback"] = traceback.format_exc(limit=-4)


def run_model(name: str, work: Path) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Accuracy/fidelity rows of one model, and its step timing."""
    model = pretrained(name, verbose=False).eval()
    dm = reference_datamodule(name)
    dm.setup()
    split = _Split(dm, model)
    example = dm.example_input(1)
    calib = dm.calibration_batches(CALIB_BATCHES)
    t = time.perf_counter()
    epochs = epoch_batches(dm, EPOCHS)
    data_s = time.perf_counter() - t
    base = {"model": name, "test_samples": len(split.y_test), "val_samples": len(split.y_val)}
    rows: list[dict[str, Any]] = []

    def log(msg: str) -> None:
        print(f"[qat] {name}: {msg}", flush=True)

    fp32 = {**base, "bits": "fp32", "method": M_FP32, "label": "fp32",
            **{f"val_{k}": v for k, v in split.val(model).items()},
            **{f"sim_{k}": v for k, v in split.test(model).items()}, "augmentation_s": data_s}
    rows.append(fp32)
    log("fp32 fine-tuned (the recipe without quantization)")
    ft = {**base, "bits": "fp32", "method": M_FT, "label": M_FT}
    try:
        m = copy.deepcopy(model)
        ft.update(train(m, epochs))
        ft.update({f"val_{k}": v for k, v in split.val(m).items()})
        ft.update({f"sim_{k}": v for k, v in split.test(m).items()})
    except Exception as e:  # noqa: BLE001
        ft["error"] = _err(e)
    rows.append(ft)

    selected: dict[str, dict[str, str]] = {}
    for tag, (wbits, abits) in BITS.items():
        for label, ada in (("PTQ hfmg", False), ("PTQ adaround+hfmg", True)):
            log(f"{tag} {label}")
            row: dict[str, Any] = {**base, "bits": tag, "method": M_PTQ, "label": label}
            try:
                cfg = ptq_config(wbits, abits, ada)
                row["config"] = cfg.short()
                q, row["calib_s"] = our_ptq(model, example, calib, cfg)
                row.update({f"val_{k}": v for k, v in split.val(q).items()})
                row.update({f"sim_{k}": v for k, v in split.test(q).items()})
                _deployed(row, split, q, work / f"{name}_{tag}_{label.replace(' ', '_')}", example)
            except Exception as e:  # noqa: BLE001
                row["error"] = _err(e)
            rows.append(row)

        qat_rows = []
        for label, algos in QAT_VARIANTS.items():
            log(f"{tag} QAT {label}")
            row = {**base, "bits": tag, "method": M_QAT, "label": f"QAT {label}", "algorithms": algos}
            try:
                cfg = qat_config(wbits, abits, algos)
                row["config"] = cfg.short()
                t = time.perf_counter()
                q = prepare_ours(model, cfg, example)
                row["prepare_s"] = time.perf_counter() - t
                row.update(train(q, epochs, amct_torch.freeze_bn_stats, amct_torch.freeze_quantizers))
                row.update({f"val_{k}": v for k, v in split.val(q).items()})
                row.update({f"sim_{k}": v for k, v in split.test(q).items()})
                _deployed(row, split, q, work / f"{name}_{tag}_qat_{len(qat_rows)}", example)
            except Exception as e:  # noqa: BLE001
                row["error"] = _err(e)
                row["traceback"] = traceback.format_exc(limit=-4)
            rows.append(row)
            qat_rows.append(row)
        best = select(qat_rows, len(split.y_val))
        if best is not None:
            best["selected"] = True
            selected[tag] = best["algorithms"]

        log(f"{tag} torch.ao QAT")
        row = {**base, "bits": tag, "method": M_AO, "label": M_AO,
               "config": "x86 default QAT qconfig mapping"
               + ("" if wbits == 8 else ", weights [-8, 7] per-channel symmetric")
               + ("" if abits == 8 else ", activations quint8 [0, 15]")}
        try:
            t = time.perf_counter()
            p = prepare_ao(model, wbits, abits, example)
            row["prepare_s"] = time.perf_counter() - t
            row.update(train(p, epochs, ao_freeze_bn, ao_freeze_observers))
            row.update({f"val_{k}": v for k, v in split.val(p).items()})
            row.update({f"sim_{k}": v for k, v in split.test(p).items()})
            conv = ao_convert(p)
            # convert_fx runs real int8 kernels in PyTorch: its deployed model
            row.update({f"dep_{k}": v for k, v in split.test(conv).items()})
        except Exception as e:  # noqa: BLE001
            row["error"] = _err(e)
            row["traceback"] = traceback.format_exc(limit=-4)
        rows.append(row)

    _summarise(rows)
    log("training-step timing")
    timing = step_timing(name, model, dm, example, selected)
    return rows, timing


def select(rows: list[dict[str, Any]], val_samples: int) -> dict[str, Any] | None:
    """The variant with the best validation logit SQNR among those at most one validation image below the
    best validation accuracy (one image is noise on a saturated task; SQNR tracks the test split)."""
    ok = [r for r in rows if "val_acc" in r]
    if not ok:
        return None
    top = max(r["val_acc"] for r in ok)
    near = [r for r in ok if r["val_acc"] >= top - 1.5 / val_samples]
    return max(near, key=lambda r: (r["val_sqnr_db"], r["val_acc"]))


def _summarise(rows: list[dict[str, Any]]) -> None:
    """Primary figures (deployed where there are), drops, and the share of the PTQ loss QAT recovers."""
    fp32 = next(r for r in rows if r["method"] == M_FP32)
    fp32_acc = fp32["sim_acc"]
    for r in rows:
        r["primary"] = "deployed" if "dep_acc" in r else ("simulated" if "sim_acc" in r else None)
        p = "dep_" if "dep_acc" in r else "sim_"
        for k in _METRICS:
            if p + k in r:
                r[k] = r[p + k]
        if "acc" in r:
            r["fp32_acc"] = fp32_acc
            r["drop_points"] = (fp32_acc - r["acc"]) * 100
    for tag in BITS:
        ptq = [r for r in rows if r["bits"] == tag and r["method"] == M_PTQ and "acc" in r]
        if not ptq:
            continue
        best = select(ptq, ptq[0]["val_samples"])
        best["ptq_baseline"] = True
        loss = fp32_acc - best["acc"]
        for r in rows:
            if r["bits"] == tag and r["method"] in (M_QAT, M_AO) and "acc" in r:
                r["vs_ptq"] = {"label": best["label"], "acc": best["acc"]}
                r["recovered"] = (r["acc"] - best["acc"]) / loss if loss > 0 else None


# --------------------------------------------------------------------------- step time

def _step_fn(model: nn.Module, batches: list[tuple[torch.Tensor, torch.Tensor]]) -> Callable[[], None]:
    """One training step per call (AdamW at the recipe's LR), cycling over ``batches``."""
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=LR, weight_decay=0.0)
    it = itertools.cycle(batches)
    model.train()

    def step() -> None:
        x, y = next(it)
        with torch.enable_grad():
            opt.zero_grad(set_to_none=True)
            F.cross_entropy(model(x), y, label_smoothing=LABEL_SMOOTHING).backward()
            opt.step()
    return step


def step_timing(name: str, model: nn.Module, dm: Any, example: torch.Tensor,
                selected: dict[str, dict[str, str]]) -> dict[str, Any]:
    torch.manual_seed(SEED + 1)
    batches = [b for b in itertools.islice(dm.train_dataloader(), STEP_BATCHES) if len(b[1]) == 64]
    fns: dict[str, Callable[[], None]] = {"fp32": _step_fn(copy.deepcopy(model), batches)}
    out: dict[str, Any] = {"model": name, "batch": 64, "repeats": STEP_REPEATS, "errors": {}, "configs": {}}
    ours_w8: nn.Module | None = None
    for tag, (wbits, abits) in BITS.items():
        algos = selected.get(tag, next(iter(QAT_VARIANTS.values())))
        try:
            cfg = qat_config(wbits, abits, algos)
            q = prepare_ours(model, cfg, example)
            fn = _step_fn(q, batches)
            for _ in range(cfg.batch_num):   # the quantizers initialise on the first batch_num steps
                fn()
            fns[f"ours {tag}"] = fn
            out["configs"][f"ours {tag}"] = cfg.short()
            if tag == "W8A8":
                ours_w8 = q
        except Exception as e:  # noqa: BLE001
            out["errors"][f"ours {tag}"] = _err(e)
        try:
            fns[f"torch.ao {tag}"] = _step_fn(prepare_ao(model, wbits, abits, example), batches)
        except Exception as e:  # noqa: BLE001
            out["errors"][f"torch.ao {tag}"] = _err(e)
    # where our step's time goes: without the activation quantizers, and with layer inputs only
    algos = selected.get("W8A8", next(iter(QAT_VARIANTS.values())))
    for key, cfg, options in (("ours W8A8 weights only", qat_config(8, 8, algos).replace(activation_bits=None), {}),
                              ("ours W8A8 inputs only", qat_config(8, 8, algos), {"quantize_outputs": "none"})):
        try:
            with _quiet():
                q = amct_torch.prepare_qat(model, cfg, example, **options)
            fn = _step_fn(q, batches)
            for _ in range(cfg.batch_num):
                fn()
            fns[key] = fn
        except Exception as e:  # noqa: BLE001
            out["errors"][key] = _err(e)
    ms = interleaved_latency(fns, STEP_REPEATS, warmup=2, settle=0)
    out["ms"] = ms
    out["ratio_to_fp32"] = {k: v / ms["fp32"] for k, v in ms.items()}
    if ours_w8 is not None:
        out["profile_ours_W8A8"] = profile_step(fns["ours W8A8"])
        out["profile_fp32"] = profile_step(fns["fp32"])
    return out


@contextlib.contextmanager
def _no_native_stderr() -> Any:
    """Silence native (C++) writes to stderr, e.g. the profiler's start/stop log lines."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def profile_step(fn: Callable[[], None], top: int = 12) -> dict[str, Any]:
    """torch.profiler over ``PROFILE_STEPS`` steps: the ops with the most self CPU time, ms per step."""
    from torch.profiler import ProfilerActivity, profile

    fn()
    with _quiet(), _no_native_stderr(), profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(PROFILE_STEPS):
            fn()
    events = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in events) / 1e3 / PROFILE_STEPS
    rows = sorted(events, key=lambda e: e.self_cpu_time_total, reverse=True)[:top]
    return {"self_cpu_ms_per_step": total,
            "top_ops": [{"op": e.key, "self_ms_per_step": e.self_cpu_time_total / 1e3 / PROFILE_STEPS,
                         "calls_per_step": e.count / PROFILE_STEPS} for e in rows]}


# --------------------------------------------------------------------------- report

def acc_table(rows: list[dict[str, Any]], bits: str) -> str:
    table = []
    for r in rows:
        if r["bits"] not in (bits, "fp32"):
            continue
        label = r["label"] + (" *" if r.get("selected") or r.get("ptq_baseline") else "")
        if "error" in r:
            table.append((r["model"], label, "ERROR: " + r["error"][:100]) + ("",) * 9)
            continue
        rec = r.get("recovered")
        rec_s = "-" if "recovered" not in r else ("n/a" if rec is None else f"{rec * 100:.0f}%")
        note = "export failed: " + r["export_error"][:80] if "export_error" in r else ""
        table.append((r["model"], label, _f(r.get("val_acc"), ".4f"), _f(r.get("sim_acc"), ".4f"),
                      _f(r.get("dep_acc"), ".4f"), _f(r.get("drop_points"), "+.2f"), rec_s,
                      _f(r.get("top1_agreement"), ".4f"), _f(r.get("cos_min"), ".4f"), _f(r.get("sqnr_db"), ".1f"),
                      _f(r.get("sim_sqnr_db"), ".1f"), _f(r.get("train_s", r.get("calib_s")), ".1f"), note))
    return render_table(["model", "method", "acc val", "acc sim", "acc deployed", "drop pts", "recovered",
                         "top1 agree", "cos min", "SQNR dB", "SQNR sim", "train/calib s", "note"], table)


def step_table(timings: list[dict[str, Any]]) -> str:
    keys = ["fp32"] + [f"{m} {t}" for t in BITS for m in ("ours", "torch.ao")] + ["ours W8A8 weights only",
                                                                                 "ours W8A8 inputs only"]
    table = []
    for t in timings:
        ms, ratio = t.get("ms", {}), t.get("ratio_to_fp32", {})
        table.append((t["model"], t["repeats"], *(_f(ms.get(k), ".1f") + ("" if k == "fp32" or k not in ratio else
                                                                           f" ({ratio[k]:.2f}x)") for k in keys)))
    return render_table(["model", "reps", *(f"{k} ms" for k in keys)], table)


def profile_table(timings: list[dict[str, Any]]) -> str:
    table = []
    for t in timings:
        for key in ("profile_ours_W8A8", "profile_fp32"):
            prof = t.get(key)
            if prof is None:
                continue
            for e in prof["top_ops"][:8]:
                table.append((t["model"], key.replace("profile_", ""), e["op"], f"{e['self_ms_per_step']:.2f}",
                              f"{e['calls_per_step']:.0f}"))
            table.append((t["model"], key.replace("profile_", ""), "(all ops, self CPU)",
                          f"{prof['self_cpu_ms_per_step']:.2f}", ""))
    return render_table(["model", "step", "op", "self ms/step", "calls/step"], table)


def goals(rows: list[dict[str, Any]], timings: list[dict[str, Any]]) -> list[dict[str, Any]]:
    out = []

    def add(name: str, ok: bool | None, detail: str) -> None:
        out.append({"goal": name, "status": "PASS" if ok else ("FAIL" if ok is not None else "N/A"), "detail": detail})

    for model in MODELS:
        for tag in BITS:
            ours = next((r for r in rows if r["model"] == model and r["bits"] == tag and r.get("selected")), None)
            ao = next((r for r in rows if r["model"] == model and r["bits"] == tag and r["method"] == M_AO), None)
            limit = GOAL_DROP[tag]
            if ours is None or "acc" not in ours:
                add(f"{model}: QAT {tag} within {limit} pts of fp32", None, "no result of ours")
                add(f"{model}: QAT {tag} fidelity >= torch.ao's", None, "no result of ours")
                continue
            add(f"{model}: QAT {tag} within {limit} pts of fp32 ({ours['primary']} accuracy)",
                ours["drop_points"] <= limit + 1e-9,
                f"{ours['label']}: {ours['acc']:.4f} vs fp32 {ours['fp32_acc']:.4f}, drop {ours['drop_points']:+.2f} pts")
            if ao is None or "dep_sqnr_db" not in ao:
                add(f"{model}: QAT {tag} fidelity >= torch.ao's", None,
                    "torch.ao: " + (ao.get("error", "no deployed result")[:100] if ao else "not run"))
                continue
            ok = ours["sqnr_db"] >= ao["sqnr_db"] and ours["top1_agreement"] >= ao["top1_agreement"]
            add(f"{model}: QAT {tag} fidelity (logit SQNR and top-1 agreement) >= torch.ao's", ok,
                f"ours {_f(ours['sqnr_db'], '.1f')} dB / {ours['top1_agreement']:.4f}; torch.ao (int8 convert_fx) "
                f"{_f(ao['sqnr_db'], '.1f')} dB / {ao['top1_agreement']:.4f}")
    ratios = [(t["model"], k, v) for t in timings for k, v in t.get("ratio_to_fp32", {}).items()
              if k.startswith("ours") and k.split()[-1] in BITS]
    if ratios:
        worst = max(ratios, key=lambda r: r[2])
        add(f"our QAT step <= {GOAL_STEP_RATIO}x the fp32 step (every model and bit width)", worst[2] <= GOAL_STEP_RATIO,
            f"worst {worst[0]} {worst[1]}: {worst[2]:.2f}x; torch.ao: " + ", ".join(
                f"{t['model']} {k.split()[1]} {v:.2f}x" for t in timings for k, v in t.get("ratio_to_fp32", {}).items()
                if k.startswith("torch.ao")))
    else:
        add(f"our QAT step <= {GOAL_STEP_RATIO}x the fp32 step", None, "not measured")
    return out


def main() -> None:
    start = time.perf_counter()
    torch.manual_seed(SEED)
    torch.set_num_threads(THREADS)
    rows: list[dict[str, Any]] = []
    timings: list[dict[str, Any]] = []
    failures: dict[str, str] = {}
    with tempfile.TemporaryDirectory(prefix="amct_bench_qat_") as tmp:
        for name in MODELS:
            try:
                r, t = run_model(name, Path(tmp))
                rows += r
                timings.append(t)
            except Exception as e:  # noqa: BLE001
                failures[name] = _err(e)
                traceback.print_exc()
    checks = goals(rows, timings)
    result = {
        "benchmark": "qat", "quick": QUICK, "seconds": round(time.perf_counter() - start, 1),
        "versions": {"amct_torch": amct_torch.__version__, "torch": torch.__version__, "onnxruntime": ort.__version__,
                     "onnx": onnx.__version__, "python": platform.python_version()},
        "machine": {"arch": platform.machine(), "cpu": _cpu_name(), "cpu_count": os.cpu_count(), "system": platform.system()},
        "threads": {"torch": torch.get_num_threads(), "ort_intra_op": THREADS},
        "recipe": {"epochs": EPOCHS, "freeze_bn_epochs": FREEZE_BN_EPOCHS, "freeze_quantizers": "after the last epoch",
                   "optimizer": "AdamW, weight_decay 0",
                   "lr": LR, "schedule": "cosine per step to 0", "label_smoothing": LABEL_SMOOTHING, "batch": 64,
                   "data": "augmented training split (pretraining's augmentation), batches drawn once per model, "
                           "the same for every method", "seed": SEED},
        "qat_init": INIT, "tuning": TUNING, "qat_variants": QAT_VARIANTS,
        "selection": "per model and bit width: best validation logit SQNR among the variants within one validation "
                     "image of the best validation accuracy (same rule for the PTQ baseline)",
        "ptq": {"calibration": f"dm.calibration_batches({CALIB_BATCHES}), batch_num={CALIB_BATCHES}",
                "activation_calibrator": "hfmg", "ada_num_iteration": ADA_ITERS},
        "step_timing": {"method": "median ms of interleaved training steps (forward, backward, AdamW step; "
                                  "round-robin, order rotated each round), freshly prepared models after "
                                  "initialisation, BN live, ranges learning / observers on",
                        "batches": STEP_BATCHES, "repeats": STEP_REPEATS, "profile_steps": PROFILE_STEPS},
        "notes": ["acc/top1_agreement/cos_*/sqnr_db without prefix are the deployed figures where available "
                  "(ours: fake-quant ONNX in ONNX Runtime; torch.ao: convert_fx int8 model in PyTorch), else "
                  "simulated (sim_*); val_* are simulated figures on the validation split",
                  "recovered = (acc - acc_ptq) / (acc_fp32 - acc_ptq) against our best PTQ (vs_ptq; that row has "
                  "ptq_baseline: true), "
                  "null where PTQ lost nothing"],
        "accuracy_rows": rows, "step_timing_rows": timings, "goals": checks, "failures": failures,
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    out_path = Path(tempfile.gettempdir()) / "amct_qat_quick.json" if QUICK else RESULTS / "qat.json"
    out_path.write_text(json.dumps(_finite(result), indent=1) + "\n")

    for tag in BITS:
        print(f"\n{tag}: accuracy and fidelity to fp32 (test split; acc val = validation, simulated; 'deployed' = "
              f"ONNX Runtime for ours, convert_fx int8 for torch.ao; * = selected on validation / PTQ baseline)")
        print(acc_table(rows, tag))
    print(f"\nTraining step (batch 64, forward + backward + AdamW), ms, median of {STEP_REPEATS} interleaved; "
          f"(ratio to fp32)")
    print(step_table(timings))
    print(f"\nWhere our W8A8 step spends its time (torch.profiler, self CPU ms per step, {PROFILE_STEPS} steps)")
    print(profile_table(timings))
    print()
    for c in checks:
        print(f"{c['status']}: {c['goal']} -- {c['detail']}")
    for k, v in failures.items():
        print(f"FAILED: {k}: {v}")
    print(f"\nwrote {out_path} in {result['seconds']:.0f} s")


if __name__ == "__main__":
    sys.exit(main())

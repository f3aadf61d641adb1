"""Tensor decomposition against channel pruning, and block-wise distillation against plain QAT, in one run.

On the pretrained digits reference models (``resnet_digits``, ``mobilenetv2_digits``; 16x16 digits, 1,257
train / 270 validation / 270 test images).

**A. Decomposition to half the MACs** (``amct_torch.decompose``, ``DecomposeConfig(rank_selection="macs",
macs_ratio=0.5)``: one energy threshold for all layers, bisected until the decomposable layers run half
their MACs), with AMCT's kx1 + 1xk split (``spatial``) and with Tucker-2, against our L1 channel pruning
to the same share of the *whole model's* MACs (``benchmarks.sparsity.ours_channel``: ``prune_channels``
with ``flops_target`` + ``shrink``). Each model is evaluated as made and after the same fine-tune
(``benchmarks.sparsity.finetune``: 10 epochs of the augmented training split, AdamW 2e-3, cosine).
Latency (ms, median of interleaved repeats, 2 threads): PyTorch eager and ONNX Runtime on the fp32 ONNX
of each model, batch 1 and 16 (``benchmarks.ptq.latency_rows``). MobileNetV2's convolutions are 1x1
and depthwise, which neither the spatial split nor Tucker-2 decomposes (AMCT's eligibility); its plan is
reported, not fine-tuned. The digits networks are small enough (16x16 inputs) that per-op overhead
dominates their latency, so torchvision ``resnet18`` at 3x224x224 (random weights: structure and latency
only) is timed too: both decompositions (ranks rounded to multiples of 16) and L1 channel pruning with
kept channels rounded to 16, all to half the MACs.

**B. Block-wise distillation of W4A8 and W4A4 students** (``prepare_qat(QatConfig(weight_bits=4,
activation_bits=8|4, init_calibrator="hfmg", batch_num=4))``, BN statistics frozen, activation ranges
initialised by 4 forwards on training batches: the PTQ point, the same for every method). The digits
models lose little *accuracy* at these widths (270 test images: one image is 0.37 points), so what is
lost and recovered is measured on the logits: ``loss = mean squared error of the student's test logits
against the fp32 model's``; ``recovered = 1 - loss / loss_at_PTQ``. Methods, from the same PTQ point:

* ``distill``: ``distill_blockwise(teacher, student, data, DistillConfig(lr=3e-4, epochs=1))`` on
  ``DISTILL_BATCHES`` unaugmented training batches of 64 (no labels);
* ``QAT lr=...``: plain QAT with labels (AdamW, label-smoothed cross-entropy, the augmented training
  split), for up to ``QAT_BUDGET`` times the distillation's wall clock; the logits are evaluated every
  ``EVAL_EVERY`` steps (evaluation time not counted). ``QAT at equal time`` is its state when it has
  trained as long as the distillation took; ``time to match`` is the training time it needed to recover
  as much as the distillation did (``None``: not within the budget).

Goals (issue 8): decomposition at half the MACs within 1 point of the dense accuracy after fine-tune, with
a measured latency gain; distillation recovering at least half of the PTQ loss in less time than QAT needs
for the same recovery.

``AMCT_BENCH_QUICK=1``: 1 fine-tune epoch, 4 distillation batches, resnet_digits only, 1x QAT budget,
fewer repeats.
Writes ``benchmarks/results/decompose_distill.json`` (quick: ``decompose_distill_quick.json``).
"""

from __future__ import annotations

import copy
import json
import os
import platform
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from amct_torch import (DecomposeConfig, DistillConfig, QatConfig, decompose, distill_blockwise, freeze_bn_stats,
                        prepare_qat)
from amct_torch.analysis import count_flops
from amct_torch.graph.plan import render_table
from amct_torch.zoo import pretrained, reference_datamodule

from . import sparsity as sp
from .ptq import _cpu_name, _err, _quiet, export_fp32, fidelity, fix_batch, latency_rows, torch_logits

RESULTS = Path(__file__).resolve().parent / "results"
QUICK = os.environ.get("AMCT_BENCH_QUICK", "") not in ("", "0")
THREADS = 2
SEED = 0
MODELS = ("resnet_digits",) if QUICK else ("resnet_digits", "mobilenetv2_digits")
MACS_RATIO = 0.5
VISION = ("resnet18",)
METHODS = ("spatial", "tucker2")
REPEATS = 5 if QUICK else 30

BITS = ((4, 8), (4, 4))
DISTILL = DistillConfig(lr=3e-4, epochs=1)
DISTILL_BATCHES = 4 if QUICK else 8
INIT_BATCHES = 4
QAT_LRS = (1e-5, 1e-4)          # the QAT benchmark's tuned rate, and ten times it
QAT_BUDGET = 1.0 if QUICK else 2.0
EVAL_EVERY = 5
LABEL_SMOOTHING = 0.05

GOAL_DROP = 1.0
GOAL_RECOVERY = 0.5


# --------------------------------------------------------------------------- A: decomposition

def _counts(model: nn.Module, x: torch.Tensor, dense: dict[str, int]) -> dict[str, Any]:
    r = count_flops(model.eval(), x)
    return {"params": r.total_effective_params, "macs": r.total_effective_macs,
            "params_frac": r.total_effective_params / dense["params"], "macs_frac": r.total_effective_macs / dense["macs"]}


def run_decomposition(name: str, work: Path) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    model = pretrained(name).eval()
    data = sp._Digits(name, model)
    x = data.x1
    r = count_flops(model, x)
    dense = {"params": r.total_params, "macs": r.total_macs}
    rows = [{"model": name, "label": "dense", **_counts(model, x, dense), **data.evaluate(model)}]
    onnx_models: dict[tuple[str, int], Any] = {}
    torch_models: dict[str, nn.Module] = {"torch dense": model}
    proto = export_fp32(model, data.examples[1], work / f"{name}_dense.onnx")
    for b in sp.BATCHES:
        onnx_models[("dense", b)] = fix_batch(proto, b)
    candidates: dict[str, tuple[nn.Module, dict[str, Any]]] = {}
    for method in METHODS:
        start = time.perf_counter()
        made, plan = decompose(model, DecomposeConfig(conv_method=method, rank_selection="macs", macs_ratio=MACS_RATIO), x)
        t = plan.totals()
        candidates[method] = (made, {"decompose_s": time.perf_counter() - start, "layers": t["layers"],
                                     "decomposed": t["decomposed"], "skipped": plan.skipped(),
                                     "ranks": {lp.name: lp.rank for lp in plan.layers if lp.decomposed},
                                     "energy_threshold": plan.target.get("energy_threshold")})
    target = min(_counts(m, x, dense)["macs_frac"] for m, _ in candidates.values())
    fine_tune = target < 0.9
    if fine_tune:   # channel pruning to the MACs the decompositions reached (it has nothing to match otherwise)
        small, info = sp.ours_channel(model, x, "l1", target=target)
        candidates["channel l1"] = (small, {"prune_s": info["prune_s"], "channels_pruned": info["channels_pruned"]})
    for label, (made, info) in candidates.items():
        row: dict[str, Any] = {"model": name, "label": label, **info, **_counts(made, x, dense)}
        before = data.evaluate(made)
        row.update(acc_before_ft=before["acc"], agreement_before_ft=before["top1_agreement"])
        print(f"[decompose_distill] {name} {label}: MACs {row['macs_frac']:.3f}, params {row['params_frac']:.3f}, "
              f"acc before fine-tune {100 * before['acc']:.2f}", flush=True)
        if fine_tune:
            tuned = copy.deepcopy(made)
            torch.manual_seed(SEED)
            row.update(sp.finetune(tuned, data.epochs))
            row.update(data.evaluate(tuned))
            row["drop_points"] = 100 * (rows[0]["acc"] - row["acc"])
            key = label
            torch_models[f"torch {key}"] = tuned.eval()
            try:
                p = export_fp32(tuned, data.examples[1], work / f"{name}_{key.replace(' ', '_')}.onnx")
                for b in sp.BATCHES:
                    onnx_models[(key, b)] = fix_batch(p, b)
            except Exception as e:  # noqa: BLE001
                row["export_error"] = _err(e)
        rows.append(row)
    lat = latency_rows(name, onnx_models, torch_models, data.examples, {1: REPEATS, 16: REPEATS}) if fine_tune else []
    return rows, lat


def run_vision(name: str, work: Path) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """torchvision ``name`` at 3x224x224 (random weights: structure and latency only): both decompositions
    (ranks rounded to multiples of 16) and L1 channel pruning (kept channels multiples of 16) to half the
    MACs; latency at batch 1 and 16."""
    import torchvision

    torch.manual_seed(SEED)
    model = getattr(torchvision.models, name)(weights=None).eval()
    g = torch.Generator().manual_seed(SEED)
    examples = {b: torch.randn(b, 3, 224, 224, generator=g) for b in sp.BATCHES}
    x = examples[1]
    r = count_flops(model, x)
    dense = {"params": r.total_params, "macs": r.total_macs}
    label = f"torchvision.{name}"
    rows = [{"model": label, "label": "dense", "weights": "random", **_counts(model, x, dense)}]
    onnx_models: dict[tuple[str, int], Any] = {}
    torch_models: dict[str, nn.Module] = {"torch dense": model}
    variants: dict[str, Any] = {
        m: (lambda m=m: decompose(model, DecomposeConfig(conv_method=m, rank_selection="macs", macs_ratio=MACS_RATIO,
                                                         macs_scope="model", rank_multiple=16), x)[0])
        for m in METHODS}
    variants["channel l1 x16"] = lambda: sp.ours_channel(model, x, "l1", 16, target=MACS_RATIO)[0]
    for key, make in [("dense", lambda: model), *variants.items()]:
        made = make().eval()
        if key != "dense":
            rows.append({"model": label, "label": key, "weights": "random", **_counts(made, x, dense)})
            torch_models[f"torch {key}"] = made
        p = export_fp32(made, x, work / f"{name}_{key.replace(' ', '_')}.onnx")
        for b in sp.BATCHES:
            onnx_models[(key, b)] = fix_batch(p, b)
        print(f"[decompose_distill] {label} {key}: MACs {rows[-1]['macs_frac']:.3f}", flush=True)
    lat = latency_rows(label, onnx_models, torch_models, examples, {1: REPEATS, 16: max(3, REPEATS // 3)})
    return rows, lat


# --------------------------------------------------------------------------- B: distillation

class _Logits:
    def __init__(self, model: nn.Module, x: torch.Tensor, y: np.ndarray):
        self.x, self.y = x, y
        self.ref = torch_logits(model.eval(), x)

    def __call__(self, model: nn.Module) -> dict[str, float]:
        was = model.training
        out = torch_logits(model.eval(), self.x)
        model.train(was)
        f = fidelity(self.ref, out, self.y)
        return {"mse": float(((out - self.ref) ** 2).mean()), "acc": f["acc"], "sqnr_db": f["sqnr_db"]}


def ptq_point(model: nn.Module, wbits: int, abits: int, x: torch.Tensor, init: list[torch.Tensor]) -> nn.Module:
    with _quiet():
        student = prepare_qat(model, QatConfig(weight_bits=wbits, activation_bits=abits, init_calibrator="hfmg",
                                               batch_num=INIT_BATCHES), x)
    freeze_bn_stats(student)
    student.train()
    with torch.no_grad():
        for b in init:
            student(b)
    return student.eval()


def qat_trajectory(student: nn.Module, batches: list[tuple[torch.Tensor, torch.Tensor]], lr: float, budget_s: float,
                   measure: _Logits) -> list[dict[str, float]]:
    """Train with labels until ``budget_s`` seconds of training; the logits every EVAL_EVERY steps."""
    student.train()
    opt = torch.optim.AdamW([p for p in student.parameters() if p.requires_grad], lr=lr, weight_decay=0.0)
    points = [{"step": 0, "train_s": 0.0, **measure(student)}]
    trained, step = 0.0, 0
    while trained < budget_s:
        for xb, yb in batches:
            start = time.perf_counter()
            opt.zero_grad(set_to_none=True)
            F.cross_entropy(student(xb), yb, label_smoothing=LABEL_SMOOTHING).backward()
            opt.step()
            trained += time.perf_counter() - start
            step += 1
            if step % EVAL_EVERY == 0 or trained >= budget_s:
                points.append({"step": step, "train_s": trained, **measure(student)})
            if trained >= budget_s:
                break
    return points


def run_distillation(name: str) -> list[dict[str, Any]]:
    model = pretrained(name).eval()
    dm = reference_datamodule(name)
    dm.setup()
    x1 = dm.example_input(1)
    measure = _Logits(model, dm.split.test[0], dm.split.test[1].numpy())
    xtr = dm.split.train[0]
    n = dm.batch_size
    plain = [xtr[i * n:(i + 1) * n] for i in range(max(DISTILL_BATCHES, INIT_BATCHES))]
    torch.manual_seed(SEED)
    labelled = list(dm.train_dataloader())   # augmented, shuffled: QAT's data
    rows = []
    for wbits, abits in BITS:
        bits = f"W{wbits}A{abits}"
        base = ptq_point(model, wbits, abits, x1, plain[:INIT_BATCHES])
        at_ptq = measure(base)
        row: dict[str, Any] = {"model": name, "bits": bits, "fp32_acc": measure(model)["acc"], "ptq": at_ptq}
        student = copy.deepcopy(base)
        start = time.perf_counter()
        report = distill_blockwise(model, student, plain[:DISTILL_BATCHES], DISTILL, progress=False)
        distill_s = time.perf_counter() - start
        after = measure(student)
        recovered = 1 - after["mse"] / at_ptq["mse"]
        row["distill"] = {**after, "seconds": distill_s, "recovered": recovered, "units": len(report.blocks),
                          "reverted": sum(1 for b in report.blocks if "reverted" in b.note), "config": DISTILL.to_dict(),
                          "batches": DISTILL_BATCHES}
        print(f"[decompose_distill] {name} {bits}: PTQ mse {at_ptq['mse']:.4f} acc {100 * at_ptq['acc']:.2f}; "
              f"distill {distill_s:.1f} s -> mse {after['mse']:.4f} ({100 * recovered:.0f} % recovered) "
              f"acc {100 * after['acc']:.2f}", flush=True)
        row["qat"] = {}
        for lr in QAT_LRS:
            torch.manual_seed(SEED)
            matched = "never"
            points = qat_trajectory(copy.deepcopy(base), labelled, lr, QAT_BUDGET * distill_s, measure)
            for p in points:
                p["recovered"] = 1 - p["mse"] / at_ptq["mse"]
            equal = [p for p in points if p["train_s"] <= distill_s]
            at_equal = equal[-1] if equal else points[0]
            match = next((p for p in points if p["recovered"] >= recovered), None)
            best = max(points, key=lambda p: p["recovered"])
            if match is not None:
                matched = f"after {match['train_s']:.0f} s"
            row["qat"][f"{lr:g}"] = {"at_equal_time": at_equal, "best": best,
                                     "time_to_match": None if match is None else match["train_s"],
                                     "steps": points[-1]["step"], "trajectory": points}
            print(f"[decompose_distill] {name} {bits}: QAT lr {lr:g}: at equal time {100 * at_equal['recovered']:.0f} % "
                  f"recovered (acc {100 * at_equal['acc']:.2f}); best {100 * best['recovered']:.0f} % in "
                  f"{best['train_s']:.0f} s; matched the distillation "
                  f"{matched}", flush=True)
        rows.append(row)
    return rows


# --------------------------------------------------------------------------- tables and goals

def _pct(v: Any) -> str:
    return "-" if v is None else f"{100 * v:.2f}"


def decomposition_table(rows: list[dict[str, Any]]) -> str:
    return render_table(
        ["model", "method", "MACs", "params", "acc before FT", "acc after FT", "drop (pts)", "FT s"],
        [(r["model"], r["label"], f"{r['macs_frac']:.3f}", f"{r['params_frac']:.3f}", _pct(r.get("acc_before_ft")),
          _pct(r.get("acc")), "-" if r.get("drop_points") is None else f"{r['drop_points']:.2f}",
          "-" if r.get("finetune_s") is None else f"{r['finetune_s']:.1f}") for r in rows])


def latency_table(lat: list[dict[str, Any]]) -> str:
    out = []
    for r in lat:
        ms = r["ms"]
        for key in [k for k in ms if not k.startswith("torch ")]:
            out.append((r["model"], r["batch"], key, f"{ms[key]:.3f}", f"{ms['dense'] / ms[key]:.2f}x",
                        f"{ms['torch ' + key]:.3f}", f"{ms['torch dense'] / ms['torch ' + key]:.2f}x"))
    return render_table(["model", "batch", "variant", "ORT ms", "ORT speed-up", "torch ms", "torch speed-up"], out)


def distillation_table(rows: list[dict[str, Any]]) -> str:
    out = []
    for r in rows:
        d = r["distill"]
        out.append((r["model"], r["bits"], "PTQ point", f"{r['ptq']['mse']:.4f}", "0", _pct(r["ptq"]["acc"]),
                    "-", "-"))
        out.append((r["model"], r["bits"], "distill", f"{d['mse']:.4f}", f"{100 * d['recovered']:.0f}",
                    _pct(d["acc"]), f"{d['seconds']:.1f}", "-"))
        for lr, q in r["qat"].items():
            e = q["at_equal_time"]
            out.append((r["model"], r["bits"], f"QAT lr {lr} (equal time)", f"{e['mse']:.4f}",
                        f"{100 * e['recovered']:.0f}", _pct(e["acc"]), f"{e['train_s']:.1f}",
                        "never" if q["time_to_match"] is None else f"{q['time_to_match']:.1f}"))
    return render_table(["model", "bits", "method", "logit MSE", "% recovered", "test acc", "seconds",
                         "QAT s to match"], out)


def goals(dec: list[dict[str, Any]], lat: list[dict[str, Any]], dist: list[dict[str, Any]]) -> list[dict[str, Any]]:
    out = []
    dense_acc = {r["model"]: r.get("acc") for r in dec if r["label"] == "dense"}
    for r in dec:
        if r["label"] in METHODS and r.get("drop_points") is None and r["model"].startswith("torchvision."):
            speed = [l["ms"]["dense"] / l["ms"][r["label"]] for l in lat
                     if l["model"] == r["model"] and r["label"] in l["ms"]]
            tspeed = [l["ms"]["torch dense"] / l["ms"]["torch " + r["label"]] for l in lat
                      if l["model"] == r["model"] and "torch " + r["label"] in l["ms"]]
            out.append({"goal": f"{r['model']} {r['label']} at {r['macs_frac']:.2f} of the MACs: a latency gain",
                        "pass": bool(max(speed + tspeed, default=0) > 1.0),
                        "measured": f"ORT speed-up {', '.join(f'{s:.2f}x' for s in speed)} (batch 1, 16); torch "
                                    f"{', '.join(f'{s:.2f}x' for s in tspeed)}"})
        if r["label"] in METHODS and r.get("drop_points") is not None:
            speed = [l["ms"]["dense"] / l["ms"][r["label"]] for l in lat
                     if l["model"] == r["model"] and r["label"] in l["ms"]]
            tspeed = [l["ms"]["torch dense"] / l["ms"]["torch " + r["label"]] for l in lat
                      if l["model"] == r["model"] and "torch " + r["label"] in l["ms"]]
            ok = r["drop_points"] <= GOAL_DROP and r["macs_frac"] <= 0.55 and max(speed + tspeed, default=0) > 1.0
            out.append({"goal": f"{r['model']} {r['label']} at {r['macs_frac']:.2f} of the MACs: within {GOAL_DROP} "
                                f"point after fine-tune with a latency gain", "pass": bool(ok),
                        "measured": f"drop {r['drop_points']:.2f} pts (dense {100 * dense_acc[r['model']]:.2f}); "
                                    f"ORT speed-up {', '.join(f'{s:.2f}x' for s in speed)} (batch 1, 16); torch "
                                    f"{', '.join(f'{s:.2f}x' for s in tspeed)}"})
    for r in dist:
        d = r["distill"]
        faster = []
        for lr, q in r["qat"].items():
            faster.append(q["time_to_match"] is None or q["time_to_match"] > d["seconds"])
        ok = d["recovered"] >= GOAL_RECOVERY and all(faster)
        budget = format(QAT_BUDGET * d["seconds"], ".0f")
        qat = ", ".join(f"lr {lr}: " + (f"not within {budget} s" if q["time_to_match"] is None
                                        else f"{q['time_to_match']:.1f} s") for lr, q in r["qat"].items())
        out.append({"goal": f"{r['model']} {r['bits']}: distillation recovers >= {GOAL_RECOVERY:.0%} of the PTQ logit "
                            "loss in less time than QAT needs for the same", "pass": bool(ok),
                    "measured": f"{100 * d['recovered']:.0f} % in {d['seconds']:.1f} s; QAT to match: {qat}"})
    return out


def main() -> None:
    torch.set_num_threads(THREADS)
    torch.manual_seed(SEED)
    started = time.perf_counter()
    dec_rows, lat_rows, dist_rows, failures = [], [], [], []
    with tempfile.TemporaryDirectory() as tmp:
        for name in MODELS:
            try:
                rows, lat = run_decomposition(name, Path(tmp))
                dec_rows += rows
                lat_rows += lat
            except Exception as e:  # noqa: BLE001 - reported, the rest still runs
                failures.append({"part": "decomposition", "model": name, "error": _err(e)})
        for name in VISION:
            try:
                rows, lat = run_vision(name, Path(tmp))
                dec_rows += rows
                lat_rows += lat
            except Exception as e:  # noqa: BLE001
                failures.append({"part": "decomposition", "model": name, "error": _err(e)})
    for name in MODELS:
        try:
            dist_rows += run_distillation(name)
        except Exception as e:  # noqa: BLE001
            failures.append({"part": "distillation", "model": name, "error": _err(e)})
    try:
        checked = goals(dec_rows, lat_rows, dist_rows)
    except Exception as e:  # noqa: BLE001 - the measurements are written whatever happens here
        checked = []
        failures.append({"part": "goals", "model": "-", "error": _err(e)})
    result = {"benchmark": "decompose_distill", "quick": QUICK, "seconds": time.perf_counter() - started,
              "machine": {"cpu": _cpu_name(), "python": platform.python_version(), "torch": torch.__version__},
              "threads": THREADS, "macs_ratio": MACS_RATIO, "finetune": {"epochs": sp.EPOCHS, "lr": sp.LR},
              "distill": {"config": DISTILL.to_dict(), "batches": DISTILL_BATCHES, "init_batches": INIT_BATCHES},
              "qat": {"lrs": list(QAT_LRS), "budget_x_distill": QAT_BUDGET, "eval_every": EVAL_EVERY},
              "decomposition_rows": dec_rows, "latency_rows": lat_rows, "distillation_rows": dist_rows,
              "goals": checked, "failures": failures}
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = RESULTS / ("decompose_distill_quick.json" if QUICK else "decompose_distill.json")
    out.write_text(json.dumps(result, indent=1, default=float) + "\n")
    print(decomposition_table(dec_rows))
    if lat_rows:
        print(latency_table(lat_rows))
    print(distillation_table(dist_rows))
    for g in checked:
        print(f"{'PASS' if g['pass'] else 'FAIL'}: {g['goal']}: {g['measured']}")
    for f in failures:
        print(f"ERROR in {f['part']} of {f['model']}: {f['error']}")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()

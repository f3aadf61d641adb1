"""Collaborative optimization (TF-MOT's table): pruning, clustering, QAT and their combinations, in one run.

On the pretrained digits reference models (``resnet_digits``, ``mobilenetv2_digits``; 16x16 digits,
1,257 train / 270 validation / 270 test images), one row each:

* ``baseline`` - the trained fp32 model;
* ``pruned 50%`` - ``prune_magnitude(model, MagnitudeConfig(sparsity=0.5, schedule="oneshot", scope="global"))``
  (half of all weights, one threshold: small sensitive layers such as depthwise convolutions keep more;
  per-layer 50% lost 1.5 points on mobilenetv2_digits here, global none), fine-tuned ``PRUNE_EPOCHS`` at
  ``PRUNE_LR``;
* ``clustered 16 per tensor`` / ``per channel`` - ``cluster_weights(model, ClusterConfig(clusters=16, ...))``
  (BN folded first), centroids fine-tuned ``CLUSTER_EPOCHS`` at ``CLUSTER_LR``;
* ``QAT`` - ``prepare_qat(model, QatConfig())`` (W8A8: ULQ activations, ARQ-retrain weights per channel),
  ``QAT_EPOCHS`` at ``QAT_LR`` (the QAT benchmark's recipe), BN frozen for the last epoch;
* ``PQAT`` - the same QAT on the pruned model; ``CQAT`` - on the per-tensor clustered model (weights then
  quantized per tensor, so each centroid keeps one code); ``PCQAT`` - on the pruned model clustered per
  tensor (sparsity preserving) and fine-tuned like the clustered rows; ``PCQAT 8 clusters`` the same with
  8 clusters (fewer distinct values: smaller under gzip);
* ``AMCT prune+QAT`` - AMCT's combined compression: ``create_compressed_retrain_model`` with one ``.cfg``
  holding ``prune_config`` (balanced-L2 channel pruning, ratio ``AMCT_RATIO``; and 4:2 selective pruning)
  and the INT8 retrain configs, fine-tuned ``AMCT_EPOCHS`` at ``PRUNE_LR`` then ``save_compressed_retrain_model``.

Every fine-tune: AdamW, no weight decay, cosine per step, label-smoothed cross-entropy, the same pre-drawn
augmented batches for every row of a model. Columns: test accuracy in PyTorch (fp32 or fake-int8), INT8
accuracy deployed (our fake-quant ONNX in ONNX Runtime, which runs its integer kernels; AMCT rows: the
``_fake_quant_model.onnx`` written by ``save_compressed_retrain_model``), sparsity and unique weight values
of the compressed layers (``amct_torch.compression_report``: quantized layers counted on their integer
weights; unique = the most in one tensor, and for per-channel clustering the most in one channel), and the
gzip size (level 9) of the exported model (quantized: the deploy ONNX; float: the ONNX with the pipelines
baked) against the fp32 ONNX's.

Preservation is checked, not assumed: per layer, PQAT's integer weights have exactly the pruned model's
zeros, CQAT's exactly the clustered model's unique-value count, and PCQAT's both (against its clustered
parent, whose zeros are the pruned model's); ``check_preservation`` compares the quantizer's input and
output inside each QAT model too.

Goals (issue 6): PCQAT at least 8x smaller (gzip) than fp32 with at most 1 point accuracy drop (INT8,
deployed); every collaborative row keeps its previous stage's sparsity and cluster count exactly.

Run ``python -m benchmarks.collaborative`` (``AMCT_BENCH_QUICK=1``: one epoch each, a smoke run).
Writes ``benchmarks/results/collaborative.json``.
"""

from __future__ import annotations

import copy
import json
import os
import platform
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any, Callable

import onnxruntime as ort
import torch
import torch.nn as nn
import torch.nn.functional as F

import amct_torch
from amct_torch import ClusterConfig, MagnitudeConfig, QatConfig
from amct_torch.graph.plan import render_table
from amct_torch.zoo import pretrained, reference_datamodule

from .ptq import _cpu_name, _err, _quiet
from .qat import _Split, epoch_batches

RESULTS = Path(__file__).resolve().parent / "results"
QUICK = os.environ.get("AMCT_BENCH_QUICK", "") not in ("", "0")
MODELS = ["resnet_digits", "mobilenetv2_digits"]
SEED = 0
LABEL_SMOOTHING = 0.05
PRUNE_EPOCHS, PRUNE_LR = (1, 1e-3) if QUICK else (4, 1e-3)
PRUNE_SCOPE = "global"          # one |w| threshold over all layers (50% of all weights); "layer": 50% of each
CLUSTER_EPOCHS, CLUSTER_LR = (1, 1e-4) if QUICK else (3, 1e-4)
QAT_EPOCHS, QAT_LR = (1, 1e-5) if QUICK else (3, 1e-5)
AMCT_EPOCHS = 1 if QUICK else 4
AMCT_RATIO = 0.3
CLUSTERS = 16
SMALL_CLUSTERS = 8              # a second PCQAT row: fewer distinct values, smaller under gzip
GOAL_RATIO = 8.0
GOAL_DROP_PTS = 1.0


def finetune(model: nn.Module, epochs: list[list[tuple[torch.Tensor, torch.Tensor]]], lr: float,
             freeze_bn_last: bool = False) -> float:
    """AdamW, cosine per step, label-smoothed cross-entropy; BN statistics frozen for the last epoch."""
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(1, sum(len(e) for e in epochs)))
    start = time.perf_counter()
    for e, batches in enumerate(epochs):
        if freeze_bn_last and e == len(epochs) - 1 and len(epochs) > 1:
            amct_torch.freeze_bn_stats(model)
        for x, y in batches:
            opt.zero_grad(set_to_none=True)
            F.cross_entropy(model(x), y, label_smoothing=LABEL_SMOOTHING).backward()
            opt.step()
            sched.step()
    model.eval()
    return time.perf_counter() - start


def _layer_counts(report: Any) -> dict[str, dict[str, int]]:
    return {r.name: {"zeros": r.zeros, "unique": r.unique_values, "unique_ch": r.max_unique_per_channel}
            for r in report.layers}


class _Model:
    """One model's data, baseline and the rows built on it."""

    def __init__(self, name: str, work: Path):
        self.name, self.work = name, work
        self.base = pretrained(name, verbose=False).eval()
        self.dm = reference_datamodule(name)
        self.dm.setup()
        self.example = self.dm.example_input(1)
        self.split = _Split(self.dm, self.base)
        self.epochs = epoch_batches(self.dm, max(PRUNE_EPOCHS, CLUSTER_EPOCHS, QAT_EPOCHS, AMCT_EPOCHS), SEED)
        self.rows: list[dict[str, Any]] = []
        self.counts: dict[str, dict[str, dict[str, int]]] = {}
        self.models: dict[str, nn.Module] = {}

    def _report(self, model: nn.Module, tag: str) -> dict[str, Any]:
        with _quiet():
            report = amct_torch.compression_report(model, self.example, baseline=self.base)
        self.counts[tag] = _layer_counts(report)
        unique = max(r.unique_values for r in report.layers)
        unique_ch = max(r.max_unique_per_channel for r in report.layers)
        return {"sparsity": report.sparsity, "unique_max": unique, "unique_max_per_channel": unique_ch,
                "bits": max(r.bits for r in report.layers), "gzip_bytes": report.compressed.gzip_bytes,
                "fp32_gzip_bytes": report.fp32.gzip_bytes, "gzip_ratio": report.ratio,
                "raw_bytes": report.compressed.raw_bytes, "compressed_kind": report.compressed.kind}

    def _int8(self, model: nn.Module, tag: str) -> dict[str, Any]:
        prefix = self.work / f"{self.name}_{tag.replace(' ', '_').replace('%', '')}"
        with _quiet():
            res = amct_torch.export(model.eval(), prefix, self.example, input_names=["input"],
                                    output_names=["output"], dynamic_axes={"input": {0: "batch"}, "output": {0: "batch"}})
        return self._onnx_acc(res.fake_quant)

    def _onnx_acc(self, path: str | Path) -> dict[str, Any]:
        f = self.split.test_onnx(path)
        return {"int8_acc": f["acc"], "int8_top1_agree": f.get("top1_agree")}

    def row(self, tag: str, build: Callable[[], nn.Module], *, quantized: bool, parent: str | None = None) -> None:
        print(f"[collaborative] {self.name}: {tag}", flush=True)
        row: dict[str, Any] = {"model": self.name, "row": tag, "parent": parent}
        try:
            start = time.perf_counter()
            model = build()
            row["build_s"] = round(time.perf_counter() - start, 1)
            self.models[tag] = model
            row["acc"] = self.split.test(model)["acc"]
            row.update(self._report(model, tag))
            if quantized:
                row.update(self._int8(model, tag))
                preserved = amct_torch.check_preservation(model)
                row["in_model_preservation"] = "ok" if preserved.ok else \
                    "; ".join(f"{r.layer}: zeros {r.zeros_before}->{r.zeros_after}, unique {r.unique_before}->{r.unique_after}"
                              for r in preserved.broken())
        except Exception as e:  # noqa: BLE001 - a failed row is reported, the others still run
            row["error"] = _err(e)
            row["traceback"] = traceback.format_exc(limit=-6)
            print(row["traceback"], flush=True)
        self.rows.append(row)

    def preserved(self, tag: str, parent: str, what: tuple[str, ...]) -> dict[str, Any]:
        """Per layer: does ``tag`` keep ``parent``'s zeros / unique counts exactly?"""
        if tag not in self.counts or parent not in self.counts:
            return {"ok": False, "detail": "missing row"}
        bad = []
        for layer, mine in self.counts[tag].items():
            theirs = self.counts[parent].get(layer)
            if theirs is None:
                continue
            for key in what:
                if mine[key] != theirs[key]:
                    bad.append(f"{layer} {key} {theirs[key]} -> {mine[key]}")
        return {"ok": not bad, "checked": list(what), "parent": parent, "layers": len(self.counts[tag]),
                "detail": "; ".join(bad) if bad else "exact"}


def _e(m: _Model, n: int) -> list[list[tuple[torch.Tensor, torch.Tensor]]]:
    return m.epochs[:n]


def run_model(name: str, work: Path) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    m = _Model(name, work)
    x = m.example
    base_acc = m.split.test(m.base)["acc"]
    m.rows.append({"model": name, "row": "baseline", "acc": base_acc, "sparsity": 0.0, "bits": 32})

    def pruned() -> nn.Module:
        p = amct_torch.prune_magnitude(m.base, MagnitudeConfig(sparsity=0.5, schedule="oneshot", scope=PRUNE_SCOPE), x)
        finetune(p, _e(m, PRUNE_EPOCHS), PRUNE_LR)
        return p

    def clustered(source: Callable[[], nn.Module], granularity: str) -> Callable[[], nn.Module]:
        def build() -> nn.Module:
            c = amct_torch.cluster_weights(source(), ClusterConfig(clusters=CLUSTERS, granularity=granularity), x)
            finetune(c, _e(m, CLUSTER_EPOCHS), CLUSTER_LR)
            return c
        return build

    def qat(source: Callable[[], nn.Module]) -> Callable[[], nn.Module]:
        def build() -> nn.Module:
            with _quiet():
                q = amct_torch.prepare_qat(source(), QatConfig(batch_num=4, init_calibrator="hfmg"), x)
            finetune(q, _e(m, QAT_EPOCHS), QAT_LR, freeze_bn_last=True)
            amct_torch.freeze_quantizers(q)
            return q
        return build

    m.row("pruned 50%", pruned, quantized=False, parent="baseline")
    m.row(f"clustered {CLUSTERS} per tensor", clustered(lambda: m.base, "per_tensor"), quantized=False, parent="baseline")
    m.row(f"clustered {CLUSTERS} per channel", clustered(lambda: m.base, "per_channel"), quantized=False,
          parent="baseline")
    m.row("QAT", qat(lambda: m.base), quantized=True, parent="baseline")
    m.row("PQAT", qat(lambda: m.models["pruned 50%"]), quantized=True, parent="pruned 50%")
    m.row("CQAT", qat(lambda: m.models[f"clustered {CLUSTERS} per tensor"]), quantized=True,
          parent=f"clustered {CLUSTERS} per tensor")
    m.row(f"pruned + clustered {CLUSTERS}", clustered(lambda: m.models["pruned 50%"], "per_tensor"), quantized=False,
          parent="pruned 50%")
    m.row("PCQAT", qat(lambda: m.models[f"pruned + clustered {CLUSTERS}"]), quantized=True,
          parent=f"pruned + clustered {CLUSTERS}")

    def pruned_clustered_small() -> nn.Module:
        c = amct_torch.cluster_weights(m.models["pruned 50%"], ClusterConfig(clusters=SMALL_CLUSTERS), x)
        finetune(c, _e(m, CLUSTER_EPOCHS), CLUSTER_LR)
        return c

    m.row(f"pruned + clustered {SMALL_CLUSTERS}", pruned_clustered_small, quantized=False, parent="pruned 50%")
    m.row(f"PCQAT {SMALL_CLUSTERS} clusters", qat(lambda: m.models[f"pruned + clustered {SMALL_CLUSTERS}"]),
          quantized=True, parent=f"pruned + clustered {SMALL_CLUSTERS}")
    for tag, prune in ((f"AMCT channel prune {AMCT_RATIO} + QAT",
                        f"filter_pruner {{ balanced_l2_norm_filter_prune {{ prune_ratio: {AMCT_RATIO} ascend_optimized: false }} }}"),
                       ("AMCT 4:2 + QAT", "n_out_of_m_pruner { l1_selective_prune { n_out_of_m_type: M4N2 } }")):
        amct_row(m, tag, prune)

    checks = {
        "PQAT keeps the pruned zeros": m.preserved("PQAT", "pruned 50%", ("zeros",)),
        "CQAT keeps the cluster count": m.preserved("CQAT", f"clustered {CLUSTERS} per tensor", ("unique",)),
        "PCQAT keeps zeros and cluster count": m.preserved("PCQAT", f"pruned + clustered {CLUSTERS}", ("zeros", "unique")),
        f"PCQAT {SMALL_CLUSTERS} clusters keeps zeros and cluster count": m.preserved(
            f"PCQAT {SMALL_CLUSTERS} clusters", f"pruned + clustered {SMALL_CLUSTERS}", ("zeros", "unique")),
        "clustering the pruned model keeps its zeros": m.preserved(f"pruned + clustered {CLUSTERS}", "pruned 50%", ("zeros",)),
    }
    for r in m.rows:
        r["drop_pts"] = 100 * (base_acc - r.get("int8_acc", r.get("acc", float("nan"))))
        if r["row"] == "baseline":
            r["gzip_ratio"] = 1.0
            r["gzip_bytes"] = next((x["fp32_gzip_bytes"] for x in m.rows if "fp32_gzip_bytes" in x), None)
    return m.rows, checks


def amct_row(m: _Model, tag: str, prune: str) -> None:
    """AMCT's combined compression through its own functions (one .cfg, record, save)."""
    print(f"[collaborative] {m.name}: {tag}", flush=True)
    row: dict[str, Any] = {"model": m.name, "row": tag, "parent": "baseline"}
    try:
        cfg = m.work / f"{m.name}_{tag.split()[1]}.cfg"
        cfg.write_text("retrain_data_quant_config { ulq_quantize { dst_type: INT8 } }\n"
                       "retrain_weight_quant_config { arq_retrain { channel_wise: true dst_type: INT8 } }\n"
                       f"prune_config {{ {prune} }}\n")
        record = m.work / f"{m.name}_{tag.split()[1]}_record.txt"
        start = time.perf_counter()
        with _quiet():
            q = amct_torch.create_compressed_retrain_model(copy.deepcopy(m.base), m.example, str(cfg), str(record))
        finetune(q, _e(m, AMCT_EPOCHS), PRUNE_LR / 10, freeze_bn_last=True)
        row["build_s"] = round(time.perf_counter() - start, 1)
        row["acc"] = m.split.test(q)["acc"]
        row.update(m._report(q, tag))
        prefix = m.work / f"{m.name}_{tag.split()[1]}_amct"
        with _quiet():
            amct_torch.save_compressed_retrain_model(q, str(record), str(prefix), m.example)
        row.update(m._onnx_acc(f"{prefix}_fake_quant_model.onnx"))
        row["deploy_model_bytes"] = os.path.getsize(f"{prefix}_deploy_model.onnx")
    except Exception as e:  # noqa: BLE001
        row["error"] = _err(e)
        row["traceback"] = traceback.format_exc(limit=-6)
        print(row["traceback"], flush=True)
    m.rows.append(row)


def _fmt(v: Any, spec: str) -> str:
    return "-" if v is None or (isinstance(v, float) and v != v) else format(v, spec)


def table(rows: list[dict[str, Any]]) -> str:
    out = []
    for r in rows:
        out.append((r["model"], r["row"], _fmt(r.get("acc"), ".4f"), _fmt(r.get("int8_acc"), ".4f"),
                    _fmt(r.get("drop_pts"), "+.2f"), _fmt(r.get("sparsity"), ".3f"), r.get("unique_max", "-"),
                    r.get("unique_max_per_channel", "-"), r.get("bits", "-"),
                    _fmt((r.get("gzip_bytes") or 0) / 1024, ",.1f") if r.get("gzip_bytes") else "-",
                    _fmt(r.get("gzip_ratio"), ".2f"), r.get("in_model_preservation", "-") if "error" not in r
                    else "ERROR " + r["error"][:60]))
    return render_table(["model", "row", "acc", "INT8 acc", "drop pts", "sparsity", "unique", "unique/ch", "bits",
                         "gzip KiB", "x fp32", "preserved in QAT"], out)


def goals(rows: list[dict[str, Any]], checks: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    out = []
    for name in MODELS:
        for tag in ("PCQAT", f"PCQAT {SMALL_CLUSTERS} clusters"):
            r = next((r for r in rows if r["model"] == name and r["row"] == tag), None)
            what = f"{name}: {tag} ({CLUSTERS if tag == 'PCQAT' else SMALL_CLUSTERS} clusters, 50% sparse, INT8)"
            if r is None or "error" in r:
                out.append({"goal": f"{what} >= {GOAL_RATIO:g}x smaller (gzip), drop <= {GOAL_DROP_PTS:g} pt",
                            "status": "FAIL", "detail": (r or {}).get("error", "no row")})
                continue
            ok = r["gzip_ratio"] >= GOAL_RATIO and r["drop_pts"] <= GOAL_DROP_PTS
            out.append({"goal": f"{what} >= {GOAL_RATIO:g}x smaller (gzip) than fp32 with <= {GOAL_DROP_PTS:g} pt "
                                "drop (INT8 deployed)", "status": "PASS" if ok else "FAIL",
                        "detail": f"{r['gzip_ratio']:.2f}x ({r['gzip_bytes']:,} vs {r['fp32_gzip_bytes']:,} bytes), "
                                  f"INT8 acc {r['int8_acc']:.4f}, drop {r['drop_pts']:+.2f} pts"})
        for what, c in checks[name].items():
            out.append({"goal": f"{name}: {what} exactly (every layer)", "status": "PASS" if c["ok"] else "FAIL",
                        "detail": c["detail"]})
        inside = [r for r in rows if r["model"] == name and "in_model_preservation" in r]
        bad = [f"{r['row']}: {r['in_model_preservation']}" for r in inside if r["in_model_preservation"] != "ok"]
        out.append({"goal": f"{name}: check_preservation (quantizer input vs output) ok in every QAT row",
                    "status": "PASS" if not bad else "FAIL", "detail": "; ".join(bad) or f"{len(inside)} rows ok"})
    return out


def main() -> None:
    start = time.perf_counter()
    torch.manual_seed(SEED)
    rows: list[dict[str, Any]] = []
    checks: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory(prefix="amct_collab_") as tmp:
        for name in MODELS:
            r, c = run_model(name, Path(tmp))
            rows += r
            checks[name] = c
    print()
    print(table(rows))
    results = goals(rows, checks)
    print()
    for g in results:
        print(f"{g['status']}: {g['goal']} -- {g['detail']}")
    out = {"benchmark": "collaborative", "quick": QUICK, "seconds": round(time.perf_counter() - start, 1),
           "versions": {"amct_torch": amct_torch.__version__, "torch": torch.__version__, "onnxruntime": ort.__version__},
           "machine": {"cpu": _cpu_name(), "python": platform.python_version()}, "threads": torch.get_num_threads(),
           "recipe": {"prune": {"sparsity": 0.5, "schedule": "oneshot", "scope": PRUNE_SCOPE, "epochs": PRUNE_EPOCHS,
                                "lr": PRUNE_LR},
                      "cluster": {"clusters": CLUSTERS, "epochs": CLUSTER_EPOCHS, "lr": CLUSTER_LR},
                      "qat": {"config": "W8A8 ULQ + ARQ-retrain, HFMG init over 4 steps", "epochs": QAT_EPOCHS,
                              "lr": QAT_LR},
                      "amct": {"channel_ratio": AMCT_RATIO, "epochs": AMCT_EPOCHS, "lr": PRUNE_LR / 10},
                      "optimizer": "AdamW, weight_decay 0, cosine per step", "label_smoothing": LABEL_SMOOTHING},
           "rows": rows, "preservation": checks, "goals": results,
           "failures": [g["goal"] for g in results if g["status"] != "PASS"]}
    path = Path(tempfile.gettempdir()) / "amct_collaborative_quick.json" if QUICK else RESULTS / "collaborative.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=1, default=str))
    print(f"\nwrote {path} in {out['seconds']:.0f} s")


if __name__ == "__main__":
    main()

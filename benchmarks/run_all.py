"""Run every benchmark in order (``make bench``)."""

from __future__ import annotations

import importlib
import time

BENCHMARKS = ["benchmarks.reference_models", "benchmarks.ptq", "benchmarks.qat", "benchmarks.sparsity",
              "benchmarks.collaborative", "benchmarks.transformers", "benchmarks.decompose_distill",
              "benchmarks.auto_calibration"]


def main() -> None:
    for name in BENCHMARKS:
        start = time.perf_counter()
        print(f"\n=== {name}", flush=True)
        importlib.import_module(name).main()
        print(f"=== {name}: {time.perf_counter() - start:.0f} s", flush=True)


if __name__ == "__main__":
    main()

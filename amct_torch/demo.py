"""``make demo``: the main job, end to end, on the digits reference CNN.

1. Pretrain ResNet-20 on the digits (or load it from the cache) and measure its fp32 test accuracy.
2. Capture its graph and fold every Conv+BatchNorm pair; the folded model must score the same.
3. Swap every supported layer for a quantization-ready wrapper and print the plan; with empty
   pipelines the wrapped model's outputs equal the folded model's exactly.
"""

from __future__ import annotations

import time

import torch

from .config import QuantConfig, Targeting
from .graph import capture, fold_batch_norm, swap_layers
from .zoo import evaluate_accuracy, pretrained, reference_datamodule


def main() -> None:
    torch.manual_seed(0)
    name = "resnet_digits"
    start = time.perf_counter()
    model = pretrained(name)
    dm = reference_datamodule(name)
    dm.setup()
    test = dm.test_dataloader()
    acc = evaluate_accuracy(model, test)
    print(f"\n== 1. {name}: fp32 test accuracy {acc:.4f} "
          f"({sum(p.numel() for p in model.parameters()):,} parameters)")

    x = dm.example_input(4)
    graph = capture(model, x)
    print(f"\n== 2. graph capture and BN folding\n{graph.report()}")
    folded, fold_plan = fold_batch_norm(model, x, graph=graph)
    folded_acc = evaluate_accuracy(folded, test)
    with torch.no_grad():
        diff = (folded(x) - model(x)).abs().max().item()
    print(f"folded {len(fold_plan.wrapped())} BatchNorm layers; test accuracy {folded_acc:.4f}; "
          f"max |logit difference| {diff:.2e}")

    targeting = Targeting(QuantConfig(), module_name={"conv1": QuantConfig(activation_offset=False)})
    wrapped, plan = swap_layers(folded, targeting, x)
    with torch.no_grad():
        exact = torch.equal(wrapped(x), folded(x))
    print(f"\n== 3. quantization-ready swap\n{plan}")
    print(f"\nwrapped outputs equal folded outputs exactly: {exact}")
    if not exact or folded_acc != acc:
        raise SystemExit("demo failed: a structural pass changed the model's outputs")
    print(f"demo finished in {time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
    main()

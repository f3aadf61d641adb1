"""``amct-torch``: the command line.

* ``amct-torch fit|validate|test --config recipe.yaml`` runs Lightning (LightningCLI) on any
  LightningModule and LightningDataModule named in the recipe (``class_path`` + ``init_args``).
* ``amct-torch pretrain [NAME ...] [--all] [--retrain]`` trains and caches the reference models.
* ``amct-torch plan MODEL [--targeting FILE.yaml]`` prints the capture report, the BN-folding plan
  and the quantization-ready swap plan of a reference model.
"""

from __future__ import annotations

import argparse
import sys

__all__ = ["main"]

_LIGHTNING = ("fit", "validate", "test", "predict")


def _lightning(argv: list[str]) -> None:
    import lightning as L
    from lightning.pytorch.cli import LightningCLI

    LightningCLI(L.LightningModule, L.LightningDataModule, subclass_mode_model=True, subclass_mode_data=True,
                 args=argv, save_config_kwargs={"overwrite": True})


def _plan(argv: list[str]) -> None:
    from pathlib import Path

    from .config import QuantConfig, Targeting
    from .graph import capture, fold_batch_norm, swap_layers
    from .zoo import REFERENCE_MODELS, pretrained, reference_datamodule

    parser = argparse.ArgumentParser(prog="amct-torch plan", description="show what a quantization-ready swap does")
    parser.add_argument("model", choices=list(REFERENCE_MODELS))
    parser.add_argument("--targeting", type=Path, help="targeting YAML (global / module_type / module_name / skip)")
    args = parser.parse_args(argv)
    targeting = Targeting(QuantConfig())
    if args.targeting is not None:
        targeting = Targeting.from_yaml(args.targeting.read_text(), QuantConfig)
    model = pretrained(args.model)
    x = reference_datamodule(args.model).example_input(2)
    graph = capture(model, x)
    folded, fold_plan = fold_batch_norm(model, x, graph=graph)
    _, plan = swap_layers(folded, targeting, x)
    print(fold_plan, "", plan, sep="\n")


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    command = argv[0] if argv else ""
    if command in _LIGHTNING:
        _lightning(argv)
    elif command == "pretrain":
        from .zoo.reference import main as pretrain_main

        pretrain_main(argv[1:])
    elif command == "plan":
        _plan(argv[1:])
    else:
        print(__doc__.strip(), file=sys.stderr if command not in ("-h", "--help") else sys.stdout)
        if command not in ("-h", "--help"):
            print(f"\namct-torch: unknown command {command!r}" if command else "\namct-torch: name a command",
                  file=sys.stderr)
            raise SystemExit(2)


if __name__ == "__main__":
    main()

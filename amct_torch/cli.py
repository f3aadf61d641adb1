"""``amct-torch``: the command line.

* ``amct-torch fit|validate|test --config recipe.yaml`` runs Lightning (LightningCLI) on any
  LightningModule and LightningDataModule named in the recipe (``class_path`` + ``init_args``).
* ``amct-torch export --config recipe.yaml --ckpt_path CKPT [--output PREFIX] [--dynamic_batch]`` writes
  the ONNX models of a checkpoint: the recipe's model is built, the checkpoint's compression (decomposition,
  masks, clusters, quantizers) rebuilt and its weights loaded; a quantized network gives the fake-quant
  ONNX, the deploy ONNX and the record, a float one a plain fp32 ONNX.
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


def _export(argv: list[str]) -> None:
    from pathlib import Path

    import lightning as L
    from lightning.pytorch.cli import LightningCLI

    from .lightning._common import export_model, first_input, network

    parser = argparse.ArgumentParser(
        prog="amct-torch export", description="write the ONNX models of a checkpoint of a recipe's run",
        epilog="Any other option (--config, --model.*, --data.*) is the recipe's, as for `amct-torch fit`.")
    parser.add_argument("--ckpt_path", required=True, type=Path, help="the Lightning checkpoint")
    parser.add_argument("--output", type=Path, help="file prefix of the ONNX models (default: out/<checkpoint name>)")
    parser.add_argument("--attr", default="model", help="the LightningModule attribute holding the network")
    parser.add_argument("--dynamic_batch", action="store_true", help="export with a dynamic batch axis")
    args, rest = parser.parse_known_args(argv)
    if not args.ckpt_path.is_file():
        raise SystemExit(f"amct-torch export: --ckpt_path {args.ckpt_path}: no such file")
    cli = LightningCLI(L.LightningModule, L.LightningDataModule, subclass_mode_model=True, subclass_mode_data=True,
                       args=rest, run=False, save_config_callback=None)
    module, datamodule = cli.model, cli.datamodule
    from .lightning import load_compressed_checkpoint

    load_compressed_checkpoint(module, args.ckpt_path, allow_plain=True)
    model = network(module, args.attr, "amct-torch export").eval()
    if hasattr(datamodule, "example_input"):
        inputs = datamodule.example_input(1)
    elif getattr(module, "example_input_array", None) is not None:
        inputs = module.example_input_array
    else:
        datamodule.setup("validate")
        inputs = first_input(next(iter(datamodule.val_dataloader())))[:1]
    prefix = args.output if args.output is not None else Path("out") / args.ckpt_path.stem
    kwargs = {}
    if args.dynamic_batch:
        kwargs = {"input_names": ["input"], "output_names": ["output"],
                  "dynamic_axes": {"input": {0: "batch"}, "output": {0: "batch"}}}
    files = export_model(model, prefix, inputs, "amct-torch export", **kwargs)
    for kind, path in files.items():
        print(f"{kind}: {path}")


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
    elif command == "export":
        _export(argv[1:])
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

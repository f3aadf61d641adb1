"""Pretrain each reference model once, seeded, and cache its weights in an ignored folder.

``pretrained("resnet_digits")`` returns the trained fp32 model, training it on first use (about a
minute on 2 CPU cores for the digits models, a few minutes for the GPT) and loading it afterwards.
The cache entry records the spec it was trained with; a changed spec retrains.

Cache folder: ``$AMCT_TORCH_CACHE``, else ``.cache/amct_torch`` in the source checkout, else
``~/.cache/amct_torch``.

Command line: ``amct-torch pretrain --all`` (or a list of names, ``--retrain``).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import lightning as L
import torch
import torch.nn as nn

from .digits import DigitsDataModule
from .models import gpt_shakespeare, mobilenetv2_digits, resnet_digits
from .shakespeare import ShakespeareDataModule
from .tasks import CausalLM, ImageClassifier

__all__ = ["REFERENCE_MODELS", "ReferenceSpec", "pretrained", "pretrain", "cache_dir", "reference_datamodule",
           "reference_task", "cached_info"]

log = logging.getLogger("amct_torch.pretrain")
SPEC_VERSION = 1


@dataclass(frozen=True)
class ReferenceSpec:
    """How one reference model is built and trained (the cache key)."""

    name: str
    task: str                      # "digits" or "shakespeare"
    data: dict[str, Any]
    model: dict[str, Any]
    optim: dict[str, Any]
    trainer: dict[str, Any]
    seed: int = 0
    metric: str = "test_acc"
    version: int = SPEC_VERSION
    description: str = field(default="", compare=False)


REFERENCE_MODELS: dict[str, ReferenceSpec] = {
    "resnet_digits": ReferenceSpec(
        "resnet_digits", "digits", data={"image_size": 16, "batch_size": 64, "augment": True},
        model={"depth": 20}, optim={"lr": 3e-3, "weight_decay": 5e-4, "label_smoothing": 0.05},
        trainer={"max_epochs": 30}, description="ResNet-20 (CIFAR-style), digits 16x16"),
    "mobilenetv2_digits": ReferenceSpec(
        "mobilenetv2_digits", "digits", data={"image_size": 16, "batch_size": 64, "augment": True},
        model={}, optim={"lr": 3e-3, "weight_decay": 5e-4, "label_smoothing": 0.05},
        trainer={"max_epochs": 30}, description="MobileNetV2-style (inverted residuals, depthwise), digits 16x16"),
    "gpt_shakespeare": ReferenceSpec(
        "gpt_shakespeare", "shakespeare", data={"block_size": 64, "batch_size": 32, "edition": "modern"},
        model={"n_layer": 4, "n_embd": 128, "n_head": 4, "dropout": 0.0}, optim={"lr": 3e-3, "weight_decay": 0.01},
        trainer={"max_steps": 2000, "val_check_interval": 500}, metric="test_ppl",
        description="GPT-2 (transformers, Conv1D projections), 4 layers x 128, context 64, char-level Shakespeare"),
}


def cache_dir() -> Path:
    env = os.environ.get("AMCT_TORCH_CACHE")
    if env:
        return Path(env)
    root = Path(__file__).resolve().parents[2]
    if (root / "pyproject.toml").is_file():
        return root / ".cache" / "amct_torch"
    return Path.home() / ".cache" / "amct_torch"


def _spec(name: str) -> ReferenceSpec:
    if name not in REFERENCE_MODELS:
        raise ValueError(f"reference model: got {name!r}; allowed: one of {', '.join(REFERENCE_MODELS)}")
    return REFERENCE_MODELS[name]


def reference_datamodule(name: str) -> L.LightningDataModule:
    """The datamodule the reference model ``name`` is trained and evaluated on."""
    spec = _spec(name)
    return DigitsDataModule(**spec.data) if spec.task == "digits" else ShakespeareDataModule(**spec.data)


def _build(spec: ReferenceSpec, dm: L.LightningDataModule) -> nn.Module:
    builders: dict[str, Callable[..., nn.Module]] = {"resnet_digits": resnet_digits, "mobilenetv2_digits": mobilenetv2_digits}
    if spec.name == "gpt_shakespeare":
        return gpt_shakespeare(dm.vocab_size, block_size=dm.block_size, **spec.model)
    return builders[spec.name](**spec.model)


def reference_task(name: str, model: nn.Module | None = None, **overrides: Any) -> L.LightningModule:
    """The LightningModule (loss, metrics, optimizer) of reference ``name``, around ``model``."""
    spec = _spec(name)
    if model is None:
        model = _build(spec, reference_datamodule(name))
    kwargs = {**spec.optim, **overrides}
    return ImageClassifier(model, **kwargs) if spec.task == "digits" else CausalLM(model, **kwargs)


def _trainer(**kwargs: Any) -> L.Trainer:
    base = dict(accelerator="cpu", devices=1, deterministic=True, logger=False, enable_checkpointing=False,
                enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0)
    return L.Trainer(**{**base, **kwargs})


def pretrain(name: str, *, trainer_overrides: dict[str, Any] | None = None) -> tuple[nn.Module, dict[str, Any]]:
    """Train reference ``name`` from its seed; return ``(model, info)`` with metrics and wall time."""
    spec = _spec(name)
    L.seed_everything(spec.seed, workers=True, verbose=False)
    dm = reference_datamodule(name)
    dm.setup()
    task = reference_task(name, _build(spec, dm))
    trainer = _trainer(**{**spec.trainer, **(trainer_overrides or {})})
    start = time.perf_counter()
    trainer.fit(task, datamodule=dm)
    seconds = time.perf_counter() - start
    metrics = trainer.test(task, datamodule=dm, verbose=False)[0]
    model = task.model.eval()
    info = {"name": name, "description": spec.description, "spec": asdict(spec),
            "parameters": sum(p.numel() for p in model.parameters()),
            "metrics": {k: float(v) for k, v in metrics.items()}, "train_seconds": round(seconds, 1),
            "torch": torch.__version__, "lightning": L.__version__}
    return model, info


def _path(name: str) -> Path:
    return cache_dir() / f"{name}.pt"


def cached_info(name: str) -> dict[str, Any] | None:
    """The info recorded with the cached weights of ``name`` (``None`` if absent or stale)."""
    path = _path(name)
    if not path.is_file():
        return None
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - a corrupt cache entry is retrained, and we say so
        log.warning("ignoring unreadable cache entry %s: %s", path, err)
        return None
    info = json.loads(blob["info"])
    if info.get("spec") != json.loads(json.dumps(asdict(_spec(name)))):
        log.warning("cached %s was trained with another spec; retraining", name)
        return None
    return info | {"_state_dict": blob["state_dict"]}


def pretrained(name: str, *, retrain: bool = False, verbose: bool = True) -> nn.Module:
    """The trained fp32 reference model ``name`` (eval mode), from the cache or trained now.

    Example::

        model = pretrained("resnet_digits")
    """
    spec = _spec(name)
    info = None if retrain else cached_info(name)
    if info is not None:
        dm = reference_datamodule(name)
        if spec.task == "shakespeare":
            dm.setup()
        model = _build(spec, dm)
        model.load_state_dict(info["_state_dict"])
        return model.eval()
    if verbose:
        print(f"[amct-torch] pretraining {name} ({spec.description}); cached in {cache_dir()}", flush=True)
    model, info = pretrain(name)
    path = _path(name)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save({"state_dict": model.state_dict(), "info": json.dumps(info)}, tmp)
    tmp.replace(path)
    if verbose:
        print(f"[amct-torch] {name}: {info['metrics']} in {info['train_seconds']} s", flush=True)
    return model


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="amct-torch pretrain", description=__doc__.splitlines()[0])
    parser.add_argument("names", nargs="*", help=f"reference models ({', '.join(REFERENCE_MODELS)})")
    parser.add_argument("--all", action="store_true", help="every reference model")
    parser.add_argument("--retrain", action="store_true", help="ignore the cache")
    args = parser.parse_args(argv)
    names = list(REFERENCE_MODELS) if args.all else args.names
    if not names:
        parser.error("name at least one reference model, or --all")
    for name in names:
        pretrained(name, retrain=args.retrain)
        info = cached_info(name)
        print(json.dumps({k: v for k, v in info.items() if not k.startswith("_") and k != "spec"}, indent=1))


if __name__ == "__main__":
    main()

"""What the callbacks share: finding the network, example inputs and training batches, configs, export."""

from __future__ import annotations

import os
import re
import warnings
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import lightning as L
import torch
import torch.nn as nn
from lightning.fabric.utilities.apply_func import move_data_to_device

from ..config import Config, ConfigError, Targeting

_TARGETING_KEYS = {"global", "module_type", "module_name", "skip"}


def network(pl_module: L.LightningModule, attr: str, who: str) -> nn.Module:
    """The network the callback compresses: ``pl_module.<attr>``, or an error listing the children."""
    model = getattr(pl_module, attr, None) if isinstance(attr, str) and attr else None
    if not isinstance(model, nn.Module):
        children = ", ".join(name for name, _ in pl_module.named_children()) or "none"
        raise ValueError(f"{who}(attr={attr!r}): {type(pl_module).__name__} has no module attribute {attr!r}; "
                         f"its child modules: {children}. Pass attr=<the attribute that holds the network>.")
    return model


def parse_config(config: Any, config_cls: type[Config], who: str) -> Config | Targeting:
    """A config object from a config, a :class:`Targeting`, or a plain dict of either (YAML recipes)."""
    if config is None:
        return config_cls()
    if isinstance(config, (config_cls, Targeting)):
        return config
    if isinstance(config, Mapping):
        if set(config) & _TARGETING_KEYS:
            return Targeting.from_dict(dict(config), config_cls)
        return config_cls.from_dict(dict(config), _prefix=f"{who}.config")
    raise ConfigError(f"{who}.config", config, f"a {config_cls.__name__}, a Targeting, or a dict of either")


def first_input(batch: Any) -> Any:
    """The model input of a batch: the first element of a tuple/list, the batch itself otherwise."""
    if isinstance(batch, (tuple, list)):
        if not batch:
            raise ValueError("the batch is an empty sequence")
        return batch[0]
    return batch


def detached(inputs: Any, first_sample: bool = False) -> Any:
    """``inputs`` detached, on the CPU (cut to the first sample of every batched tensor if asked)."""
    def cut(t: Any) -> Any:
        if isinstance(t, torch.Tensor):
            return (t[:1] if first_sample and t.dim() else t).detach().cpu().clone()
        if isinstance(t, (tuple, list)):
            return type(t)(cut(v) for v in t)
        if isinstance(t, Mapping):
            return {k: cut(v) for k, v in t.items()}
        return t
    return cut(inputs)


def train_loader(trainer: L.Trainer) -> Any:
    """The training dataloader the trainer was given (loader, datamodule or module hook), or None."""
    source = trainer.fit_loop._data_source  # the one place Lightning keeps what ``fit`` was given
    if not source.is_defined():
        return None
    return source.dataloader()


def example_inputs(trainer: L.Trainer, pl_module: L.LightningModule, given: Any, who: str) -> tuple[Any, str]:
    """Example inputs for graph capture and export, and where they came from.

    In order: ``given``; ``pl_module.example_input_array``; the first sample of the first training batch.
    """
    if given is not None:
        return given, "example_inputs"
    array = getattr(pl_module, "example_input_array", None)
    if array is not None:
        return array, "example_input_array"
    try:
        loader = train_loader(trainer)
        if loader is None:
            raise ValueError("no training dataloader was given to the Trainer")
        batch = next(iter(loader))
        return detached(first_input(batch), first_sample=True), "the first training batch"
    except StopIteration:
        reason = "the training dataloader is empty"
    except Exception as err:  # noqa: BLE001 - any failure here is reported with the two alternatives
        reason = f"{type(err).__name__}: {err}"
    raise ValueError(f"{who} needs example inputs to capture the model graph: example_inputs was not given, "
                     f"{type(pl_module).__name__}.example_input_array is not set, and the first training batch "
                     f"could not be read ({reason}). Pass example_inputs=... or set example_input_array.")


def batches_on(data: Iterable[Any], device: torch.device) -> Iterator[Any]:
    """``data``'s batches moved to ``device``."""
    for batch in data:
        yield move_data_to_device(batch, device)


def device_of(model: nn.Module) -> torch.device:
    for t in model.parameters():
        return t.device
    for t in model.buffers():
        return t.device
    return torch.device("cpu")


def metric_name(name: str) -> str:
    """A metric key every logger accepts (letters, digits, ``_ . / -``)."""
    return re.sub(r"[^A-Za-z0-9_./-]", "_", name)


def export_model(model: nn.Module, prefix: str | os.PathLike, inputs: Any, who: str, **kwargs: Any) -> dict[str, Path]:
    """Export ``model`` (a copy: the model is not changed) and return the written files by kind.

    A model with quantizers gets AMCT's three files (fake-quant ONNX, deploy ONNX, record, all or none);
    a model without any gets one plain fp32 ONNX ``<prefix>_fp32_model.onnx`` (weight pipelines -- masks,
    clusters -- baked into the weights), and a warning says so.
    """
    from .. import export
    from ..export.files import write_all
    from ..export.onnx_qdq import export_qdq_model
    from ..quant import quant_layers

    inputs = move_data_to_device(inputs, device_of(model))
    if quant_layers(model):
        result = export(model, prefix, inputs, **kwargs)
        return {"fake_quant": result.fake_quant, "deploy": result.deploy, "record": result.record}
    prefix = Path(prefix)
    path = prefix.with_name(prefix.name + "_fp32_model.onnx")
    names = {k: kwargs[k] for k in ("input_names", "output_names", "dynamic_axes") if kwargs.get(k) is not None}
    from ..analysis.report import plain_copy

    # masks and clusters baked into plain weights (what a float runtime needs; their stages have no ONNX form)
    proto = export_qdq_model(plain_copy(model, bake=True), inputs, **names)
    import onnx

    write_all({path: lambda p: onnx.save(proto, p)})
    warnings.warn(f"{who}: the model has no quantizers; wrote a plain fp32 ONNX model {path} "
                  "(no deploy model or record)", UserWarning, stacklevel=2)
    return {"fp32": path}


def setup_earlier_stages(trainer: L.Trainer, pl_module: L.LightningModule, me: Any) -> None:
    """Run ``setup`` of the compression callbacks whose ``pipeline_rank`` is below ``me``'s first, so the
    weight pipelines come out mask -> cluster -> fake-quant whatever order the callbacks are listed in
    (their ``setup`` is idempotent: Lightning's own call later finds the network prepared)."""
    rank = getattr(me, "pipeline_rank", None)
    earlier = [cb for cb in trainer.callbacks if cb is not me and getattr(cb, "pipeline_rank", None) is not None
               and rank is not None and cb.pipeline_rank < rank]
    for cb in sorted(earlier, key=lambda cb: cb.pipeline_rank):
        cb.setup(trainer, pl_module, "fit")

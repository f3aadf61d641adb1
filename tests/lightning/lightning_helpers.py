"""Small, fast Lightning runs on the digits task: ResNet-8, 16 images a batch, a few steps, no progress bar."""

from __future__ import annotations

import copy

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from torch.utils.data import DataLoader, TensorDataset

from amct_torch.zoo import reference_task, resnet_digits


def loaders(digits, batch_size=16):
    """Train (fixed order, so runs are reproducible) and validation loaders."""
    return (DataLoader(TensorDataset(*digits.train), batch_size=batch_size, shuffle=False),
            DataLoader(TensorDataset(*digits.val), batch_size=batch_size, shuffle=False))


def task(depth=8, model=None):
    """The digits classifier (constant learning rate) around a seeded ResNet-``depth``."""
    torch.manual_seed(0)
    return reference_task("resnet_digits", model=model if model is not None else resnet_digits(depth=depth),
                          schedule="constant", lr=1e-3)


def trainer(**kwargs):
    base = dict(accelerator="cpu", devices=1, max_epochs=1, limit_train_batches=3, limit_val_batches=1,
                num_sanity_val_steps=0, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                enable_model_summary=False, log_every_n_steps=1, deterministic=True)
    if any(isinstance(cb, ModelCheckpoint) for cb in kwargs.get("callbacks", [])):
        base["enable_checkpointing"] = True
    return L.Trainer(**{**base, **kwargs})


class Probe(Callback):
    """Calls ``fn(trainer, pl_module, hook, *args)`` at the hooks it is given (after the callbacks before it)."""

    def __init__(self, fn, *hooks):
        self.fn = fn
        for hook in hooks:
            setattr(self, hook, lambda trainer, pl_module, *args, _h=hook: self.fn(trainer, pl_module, _h, *args))


def outputs(model, x):
    """The model's eval-mode output on ``x``, from a copy (the model's modes are left alone)."""
    with torch.no_grad():
        return copy.deepcopy(model).eval()(x)

"""LightningModules for the reference tasks: image classification and causal language modelling.

They hold any ``nn.Module`` (plain, folded, wrapped or compressed), so the same training loop serves
pretraining, QAT and fine-tuning after pruning. Logged metrics: ``train_loss``, ``val_loss``,
``val_acc`` / ``val_ppl``, ``test_acc`` / ``test_ppl``.
"""

from __future__ import annotations

import math
from typing import Any

import lightning as L
import torch
import torch.nn as nn
import torch.nn.functional as F
import torchmetrics

__all__ = ["ImageClassifier", "CausalLM", "evaluate_accuracy", "evaluate_perplexity"]


class _Task(L.LightningModule):
    def __init__(self, model: nn.Module, lr: float, weight_decay: float, schedule: str):
        super().__init__()
        if schedule not in ("cosine", "constant"):
            raise ValueError(f"schedule: got {schedule!r}; allowed: 'cosine' or 'constant'")
        self.model = model
        self.lr, self.weight_decay, self.schedule = lr, weight_decay, schedule

    def configure_optimizers(self) -> Any:
        opt = torch.optim.AdamW(self.model.parameters(), lr=self.lr, weight_decay=self.weight_decay)
        if self.schedule == "constant":
            return opt
        steps = max(1, int(self.trainer.estimated_stepping_batches))
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=self.lr, total_steps=steps, pct_start=0.15)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


class ImageClassifier(_Task):
    """Cross-entropy classification of ``(x, y)`` batches.

    Example::

        task = ImageClassifier(resnet_digits(), lr=3e-3)
        L.Trainer(max_epochs=10).fit(task, DigitsDataModule())
    """

    def __init__(self, model: nn.Module, num_classes: int = 10, lr: float = 3e-3, weight_decay: float = 5e-4,
                 label_smoothing: float = 0.0, schedule: str = "cosine"):
        super().__init__(model, lr, weight_decay, schedule)
        self.save_hyperparameters(ignore=["model"])
        self.label_smoothing = label_smoothing
        self.val_acc = torchmetrics.Accuracy(task="multiclass", num_classes=num_classes)
        self.test_acc = torchmetrics.Accuracy(task="multiclass", num_classes=num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = F.cross_entropy(self(x), y, label_smoothing=self.label_smoothing)
        self.log("train_loss", loss, prog_bar=True)
        return loss

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        x, y = batch
        logits = self(x)
        self.val_acc(logits, y)
        self.log("val_loss", F.cross_entropy(logits, y))
        self.log("val_acc", self.val_acc, prog_bar=True)

    def test_step(self, batch: Any, batch_idx: int) -> None:
        x, y = batch
        self.test_acc(self(x), y)
        self.log("test_acc", self.test_acc)


class CausalLM(_Task):
    """Next-token cross-entropy for a model that maps ids ``(B, T)`` to logits ``(B, T, V)``.

    transformers models (which return an output object) are handled: ``.logits`` is taken.
    """

    def __init__(self, model: nn.Module, lr: float = 2e-3, weight_decay: float = 0.01, schedule: str = "cosine"):
        super().__init__(model, lr, weight_decay, schedule)
        self.save_hyperparameters(ignore=["model"])

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        out = self.model(ids)
        return getattr(out, "logits", out)

    def _loss(self, batch: Any, reduction: str = "mean") -> torch.Tensor:
        x, y = batch
        logits = self(x)
        return F.cross_entropy(logits.reshape(-1, logits.size(-1)), y.reshape(-1), reduction=reduction)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        loss = self._loss(batch)
        self.log("train_loss", loss, prog_bar=True)
        return loss

    def _accumulate(self, batch: Any) -> None:
        self._nll += float(self._loss(batch, "sum"))
        self._tokens += batch[1].numel()

    def _finish(self, stage: str) -> None:
        loss = self._nll / max(self._tokens, 1)
        self.log(f"{stage}_loss", loss, prog_bar=True)
        self.log(f"{stage}_ppl", math.exp(loss), prog_bar=True)

    def on_validation_epoch_start(self) -> None:
        self._nll, self._tokens = 0.0, 0

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        self._accumulate(batch)

    def on_validation_epoch_end(self) -> None:
        self._finish("val")

    def on_test_epoch_start(self) -> None:
        self._nll, self._tokens = 0.0, 0

    def test_step(self, batch: Any, batch_idx: int) -> None:
        self._accumulate(batch)

    def on_test_epoch_end(self) -> None:
        self._finish("test")


@torch.no_grad()
def evaluate_accuracy(model: nn.Module, loader: Any) -> float:
    """Top-1 accuracy of ``model`` over ``(x, y)`` batches (eval mode; the model's mode is restored)."""
    was = model.training
    model.eval()
    correct = total = 0
    for x, y in loader:
        correct += (model(x).argmax(-1) == y).sum().item()
        total += len(y)
    model.train(was)
    return correct / max(total, 1)


@torch.no_grad()
def evaluate_perplexity(model: nn.Module, loader: Any) -> float:
    """``exp`` of the mean per-token cross-entropy over ``(ids, targets)`` batches."""
    was = model.training
    model.eval()
    nll = count = 0.0
    for x, y in loader:
        out = model(x)
        logits = getattr(out, "logits", out)
        nll += F.cross_entropy(logits.reshape(-1, logits.size(-1)), y.reshape(-1), reduction="sum").item()
        count += y.numel()
    model.train(was)
    return math.exp(nll / max(count, 1))

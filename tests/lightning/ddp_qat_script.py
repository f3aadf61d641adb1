"""QAT under Lightning's DDP strategy (gloo, 2 CPU processes); run by tests/lightning/test_ddp.py.

    python tests/lightning/ddp_qat_script.py OUT_DIR

Lightning's DDP launcher runs this file again for rank 1. Rank ``r`` trains on data scaled by ``1 + 2r``, so
the ranges the ranks observe differ. Each rank writes ``OUT_DIR/rank<r>.pt``: the (min, max) of the model
input it observed while the ranges initialised (``batch_num=2``), the input quantizer's clips right after
initialisation, and after fit every quantizer's state (clips, scales, offsets, flags) and ``requires_grad``.
"""

from __future__ import annotations

import sys
from pathlib import Path

import lightning as L
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

from amct_torch import QatConfig
from amct_torch.lightning import QuantizationAwareTraining
from amct_torch.quant import qat_quantizers


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(1, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8)
        self.conv2, self.bn2 = nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.fc = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn1(self.conv1(x)))
        x = F.relu(self.bn2(self.conv2(x)) + x)
        return self.fc(x.mean(dim=(2, 3)))


class Task(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.model = Net()
        self.observed: list[float] = []
        self.init_clips: list[float] = []

    def train_dataloader(self) -> DataLoader:
        g = torch.Generator().manual_seed(1 + self.global_rank)
        x = torch.randn(32, 1, 8, 8, generator=g) * (1 + 2 * self.global_rank)
        return DataLoader(TensorDataset(x, torch.randint(0, 4, (32,), generator=g)), batch_size=4)

    def training_step(self, batch, batch_idx):
        x, y = batch
        if batch_idx < 2:  # the batches the ranges initialise from
            lo, hi = self.observed or [float("inf"), float("-inf")]
            self.observed = [min(lo, float(x.min())), max(hi, float(x.max()))]
        return F.cross_entropy(self.model(x), y)

    def on_train_batch_end(self, outputs, batch, batch_idx):
        if batch_idx == 1:
            q = self.model.conv1.input_quantizer
            self.init_clips = [float(q.clip_min), float(q.clip_max)]

    def configure_optimizers(self):
        return torch.optim.SGD(self.model.parameters(), lr=0.05, momentum=0.9)


def main(out: Path) -> None:
    task = Task()
    qat = QuantizationAwareTraining(QatConfig(init_calibrator="minmax", batch_num=2), example_inputs=torch.zeros(1, 1, 8, 8),
                                    freeze_bn_step=3, freeze_quantizers_step=4, log_ranges=False)
    trainer = L.Trainer(strategy="ddp", accelerator="cpu", devices=2, max_steps=6, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        use_distributed_sampler=False, callbacks=[qat])
    trainer.fit(task)
    state = {name: {k: v.detach().clone() for k, v in m.state_dict().items() if not k.startswith("calibrator.")}
             for name, m in qat_quantizers(task.model).items()}
    grads = {n: p.requires_grad for n, p in task.model.named_parameters()}
    torch.save({"observed": task.observed, "init_clips": task.init_clips, "quantizers": state, "requires_grad": grads,
                "bn_frozen": qat.bn_frozen, "quantizers_frozen": qat.quantizers_frozen},
               out / f"rank{trainer.global_rank}.pt")


if __name__ == "__main__":
    main(Path(sys.argv[1]))

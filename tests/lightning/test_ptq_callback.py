"""PostTrainingQuantization: the quantized copy's metrics next to the fp32 ones in validate, test and fit."""

import lightning as L
import pytest
import torch
import torch.nn as nn
from torch.utils.data import DataLoader, TensorDataset

from amct_torch import QuantConfig
from amct_torch.lightning import PostTrainingQuantization
from amct_torch.quant import check_calibrated, quant_layers
from amct_torch.zoo import DigitsDataModule, evaluate_accuracy, pretrained
from lightning_helpers import loaders, task, trainer

MINMAX = QuantConfig(activation_calibrator="minmax")


def test_validate_and_test_log_the_quantized_metrics_next_to_the_fp32_ones(digits):
    t = task(model=pretrained("resnet_digits"))
    dm = DigitsDataModule(image_size=16, batch_size=64)
    ptq = PostTrainingQuantization(MINMAX, num_batches=2)
    tr = trainer(callbacks=[ptq], limit_val_batches=None, limit_test_batches=None)
    out = tr.validate(t, dm, verbose=False)[0]
    assert set(out) == {"val_acc", "val_loss", "val_acc_quant", "val_loss_quant"}
    _, val = loaders(digits, 64)
    assert not quant_layers(t.model)  # the module's own network is untouched: the loop's metric is fp32
    assert out["val_acc"] == pytest.approx(evaluate_accuracy(t.model, val), abs=1e-6)
    check_calibrated(ptq.quantized_model)
    assert out["val_acc_quant"] == pytest.approx(evaluate_accuracy(ptq.quantized_model, val), abs=1e-6)
    assert out["val_acc"] > 0.9 and abs(out["val_acc_quant"] - out["val_acc"]) < 0.03
    assert ptq.metrics["validate"] == {"fp32": {"val_acc": out["val_acc"], "val_loss": out["val_loss"]},
                                       "quantized": {"val_acc": out["val_acc_quant"], "val_loss": out["val_loss_quant"]}}
    out = tr.test(t, dm, verbose=False)[0]
    assert set(out) == {"test_acc", "test_acc_quant"}
    assert out["test_acc_quant"] == pytest.approx(
        evaluate_accuracy(ptq.quantized_model, DataLoader(TensorDataset(*digits.test), batch_size=64)), abs=1e-6)


def test_every_validation_during_fit_and_an_export_at_the_end(digits, tmp_path):
    train, val = loaders(digits)
    t = task()
    ptq = PostTrainingQuantization(MINMAX, num_batches=1, calibration_data=train, export_path=tmp_path / "ptq")
    tr = trainer(max_epochs=2, limit_train_batches=2, limit_val_batches=2, callbacks=[ptq])
    tr.fit(t, train, val)
    assert {"val_acc", "val_acc_quant", "val_loss_quant"} <= set(tr.callback_metrics)
    assert not quant_layers(t.model)
    assert set(ptq.exported) == {"fake_quant", "deploy", "record"} and all(p.is_file() for p in ptq.exported.values())
    # the exported copy was quantized from the final weights
    assert torch.equal(ptq.quantized_model.fc.module.weight, t.model.fc.weight)

    ptq = PostTrainingQuantization(MINMAX, num_batches=1, calibration_data=train, during_fit=False)
    tr = trainer(limit_train_batches=1, callbacks=[ptq])
    tr.fit(task(), train, val)
    assert "val_acc" in tr.callback_metrics and "val_acc_quant" not in tr.callback_metrics
    assert ptq.quantized_model is None


class Regressor(L.LightningModule):
    """Logs a batch-size-weighted mean, a max, and an epoch-end value (as CausalLM does)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 1))

    def validation_step(self, batch, batch_idx):
        y = self.model(batch[0])
        self.log("val_mean", y.mean())
        self.log("val_max", y.max(), reduce_fx="max")
        self.total = getattr(self, "total", 0.0) + float(y.sum())

    def on_validation_epoch_start(self):
        self.total = 0.0

    def on_validation_epoch_end(self):
        self.log("val_total", self.total)


def test_the_quantized_metrics_reduce_as_lightning_does():
    x = torch.randn(40, 4, generator=torch.Generator().manual_seed(0))
    val = DataLoader(TensorDataset(x), batch_size=16)  # 16, 16, 8: the mean is weighted by the batch size
    ptq = PostTrainingQuantization(MINMAX, num_batches=2, calibration_data=val, example_inputs=x[:1])
    out = trainer(callbacks=[ptq], limit_val_batches=None).validate(Regressor(), val, verbose=False)[0]
    with torch.no_grad():
        y = ptq.quantized_model(x)
    assert out["val_mean_quant"] == pytest.approx(float(y.mean()), rel=1e-5)
    assert out["val_max_quant"] == pytest.approx(float(y.max()), rel=1e-6)
    assert out["val_total_quant"] == pytest.approx(float(y.sum()), rel=1e-5)
    assert out["val_total"] != out["val_total_quant"]


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match=r"num_batches: got 0; allowed: None or an int >= 1"):
        PostTrainingQuantization(num_batches=0)
    with pytest.raises(ValueError, match=r"quantize_outputs: got 'all'"):
        PostTrainingQuantization(quantize_outputs="all")
    assert PostTrainingQuantization({"weight_bits": 4}).config == QuantConfig(weight_bits=4)

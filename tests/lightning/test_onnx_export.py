"""ONNXExport at the end of fit: the last QAT model (fake-quant, deploy, record), the best fp32 checkpoint."""

import numpy as np
import onnxruntime as ort
import pytest
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint

from amct_torch import QatConfig
from amct_torch.lightning import ONNXExport, QuantizationAwareTraining
from lightning_helpers import loaders, task, trainer


def run_onnx(path, x):
    sess = ort.InferenceSession(str(path))
    return sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0]


def test_last_qat_model_exports_the_three_files_and_runs_in_onnxruntime(digits, tmp_path):
    train, val = loaders(digits)
    t = task()
    qat = QuantizationAwareTraining(QatConfig(init_calibrator="minmax"), freeze_bn_step=1, log_ranges=False)
    export = ONNXExport(tmp_path / "onnx", filename="resnet8")
    trainer(callbacks=[qat, export]).fit(t, train, val)
    assert {k: p.name for k, p in export.exported.items()} == {
        "fake_quant": "resnet8_fake_quant_model.onnx", "deploy": "resnet8_deploy_model.onnx",
        "record": "resnet8_record.txt"}
    assert "layer1.0.conv1" in export.exported["record"].read_text()
    x = qat.example_inputs  # the callback's example input (the first training sample) is what was exported with
    assert x.shape == (1, 1, 16, 16)
    with torch.no_grad():
        expected = t.model.eval()(x).numpy()
    assert np.abs(run_onnx(export.exported["fake_quant"], x) - expected).max() < 0.05


class EpochMarker(Callback):
    """Logs the epoch number, so that ModelCheckpoint(monitor='marker', mode='min') keeps epoch 0 as the best."""

    def on_validation_epoch_end(self, trainer, pl_module):
        pl_module.log("marker", float(trainer.current_epoch))


def test_best_checkpoint_of_a_float_model_gives_a_plain_onnx_and_says_so(digits, tmp_path):
    train, val = loaders(digits)
    t = task()
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", monitor="marker", mode="min")
    x = digits.val[0][:2]
    export = ONNXExport(tmp_path / "onnx", which="best", example_inputs=x)
    tr = trainer(max_epochs=2, callbacks=[EpochMarker(), ckpt, export])
    with pytest.warns(UserWarning, match=r"no quantizers; wrote a plain fp32 ONNX model"):
        tr.fit(t, train, val)
    assert ckpt.best_model_path.endswith("epoch=0-step=3.ckpt")
    assert list(export.exported) == ["fp32"] and export.exported["fp32"].name == "model_fp32_model.onnx"
    best = task()
    best.load_state_dict(torch.load(ckpt.best_model_path, weights_only=True)["state_dict"])
    with torch.no_grad():
        at_best, at_last = best.model.eval()(x).numpy(), t.model.eval()(x).numpy()
    y = run_onnx(export.exported["fp32"], x)
    assert np.abs(y - at_best).max() < 1e-4 < np.abs(y - at_last).max()
    assert not torch.equal(best.model.fc.weight, t.model.fc.weight)  # the module keeps its last weights


def test_best_without_a_checkpoint_callback_fails_before_training(digits, tmp_path):
    train, _ = loaders(digits)
    t = task()
    before = t.model.fc.weight.detach().clone()
    with pytest.raises(ValueError, match=r"needs a ModelCheckpoint callback.*use which='last'"):
        trainer(callbacks=[ONNXExport(tmp_path, which="best")]).fit(t, train)
    assert torch.equal(before, t.model.fc.weight)
    with pytest.raises(ValueError, match=r"which: got 'first'"):
        ONNXExport(tmp_path, which="first")

"""``make demo``: the main job, end to end, on the digits reference CNN.

1. Pretrain ResNet-20 on the digits (or load it from the cache) and measure its fp32 test accuracy.
2. Capture its graph, fold Conv+BatchNorm, and print the quantization plan.
3. Calibrate (HFMG, 4 batches), export the ONNX Runtime fake-quant model, the ATC deploy model and the
   AMCT record, and compare fp32 with INT8: accuracy in PyTorch and in ONNX Runtime, the deploy model
   run through the reference Ascend ops, file size and ONNX Runtime latency.
4. Quantization-aware training at A8W4 with the Lightning callback (two short epochs, BatchNorm statistics
   frozen for the second), export, and the same comparison next to PTQ at A8W4.
"""

from __future__ import annotations

import statistics
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch

import lightning as L

from . import QatConfig, QuantConfig, calibrate, capture, export, quantize
from ._quiet import quiet
from .lightning import QuantizationAwareTraining
from .export import make_reference_evaluator
from .graph.plan import render_table
from .zoo import evaluate_accuracy, pretrained, reference_datamodule, reference_task


def _ort_session(path: Path) -> ort.InferenceSession:
    so = ort.SessionOptions()
    so.intra_op_num_threads = 2
    return ort.InferenceSession(str(path), so)


def _ort_accuracy(sess: ort.InferenceSession, loader) -> float:
    name = sess.get_inputs()[0].name
    correct = total = 0
    for x, y in loader:
        out = sess.run(None, {name: x.numpy()})[0]
        correct += int((out.argmax(1) == y.numpy()).sum())
        total += len(y)
    return correct / total


def _latency_ms(sess: ort.InferenceSession, x: np.ndarray, repeats: int = 50) -> float:
    name = sess.get_inputs()[0].name
    for _ in range(5):
        sess.run(None, {name: x})
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        sess.run(None, {name: x})
        times.append((time.perf_counter() - t) * 1e3)
    return statistics.median(times)


def main() -> None:
    torch.manual_seed(0)
    name = "resnet_digits"
    start = time.perf_counter()
    model = pretrained(name)
    dm = reference_datamodule(name)
    dm.setup()
    test = dm.test_dataloader()
    acc = evaluate_accuracy(model, test)
    print(f"\n== 1. {name}: fp32 test accuracy {acc:.4f} ({sum(p.numel() for p in model.parameters()):,} parameters)")

    x = dm.example_input(1)
    print(f"\n== 2. graph capture, BN folding and the quantization plan\n{capture(model, x).report()}")
    qmodel = quantize(model, QuantConfig(activation_calibrator="hfmg", batch_num=4), x)
    print(qmodel.amct_plan)

    print("\n== 3. calibrate, export, compare")
    t = time.perf_counter()
    calibrate(qmodel, dm.calibration_batches(4))
    calib_s = time.perf_counter() - t
    out = Path(tempfile.mkdtemp(prefix="amct-demo-"))
    result = export(qmodel, out / name, x, input_names=["x"], dynamic_axes={"x": {0: "batch"}})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(model, (x,), dynamo=True, input_names=["x"], dynamic_axes={"x": {0: "batch"}},
                                    verbose=False)
    onnx.save(program.model_proto, out / "fp32.onnx")  # one file, weights inline, like the INT8 model
    fp32_sess, int8_sess = _ort_session(out / "fp32.onnx"), _ort_session(result.fake_quant)
    deploy = make_reference_evaluator(result.deploy_model)
    xb = dm.split.test[0][:16].numpy()
    deploy_out = deploy.run(None, {deploy.input_names[0]: xb})[0]
    ort_out = int8_sess.run(None, {"x": xb})[0]
    rows = [
        ("fp32", f"{acc:.4f}", f"{_ort_accuracy(fp32_sess, test):.4f}", f"{(out / 'fp32.onnx').stat().st_size / 1024:.0f}",
         f"{_latency_ms(fp32_sess, xb[:1]):.3f}", f"{_latency_ms(fp32_sess, xb):.3f}"),
        ("INT8 (W8A8 HFMG)", f"{evaluate_accuracy(qmodel, test):.4f}", f"{_ort_accuracy(int8_sess, test):.4f}",
         f"{result.fake_quant.stat().st_size / 1024:.0f}", f"{_latency_ms(int8_sess, xb[:1]):.3f}",
         f"{_latency_ms(int8_sess, xb):.3f}"),
    ]
    print(render_table(["model", "acc (PyTorch)", "acc (ORT)", "ONNX KiB", "ORT ms b=1", "ORT ms b=16"], rows))
    agree = float((deploy_out.argmax(1) == ort_out.argmax(1)).mean())
    print(f"calibration {calib_s:.1f} s; deploy model (reference Ascend ops) agrees with ORT on "
          f"{agree:.0%} of 16 test images (max |logit diff| {np.abs(deploy_out - ort_out).max():.3g})")
    print(f"files: {result.fake_quant}\n       {result.deploy}\n       {result.record}")
    print(result.deploy_report)

    print("\n== 4. quantization-aware training (A8W4) with the Lightning callback, next to PTQ at A8W4")
    ptq4 = quantize(model, QuantConfig(weight_bits=4, activation_calibrator="hfmg", batch_num=4), x)
    calibrate(ptq4, dm.calibration_batches(4), progress=False)
    ptq4_res = export(ptq4, out / f"{name}_ptq_w4", x, input_names=["x"], dynamic_axes={"x": {0: "batch"}})
    t = time.perf_counter()
    qat_cb = QuantizationAwareTraining(QatConfig(weight_bits=4), freeze_bn_epoch=1, example_inputs=x,
                                       export_path=out / f"{name}_qat_w4",
                                       export_kwargs={"input_names": ["x"], "dynamic_axes": {"x": {0: "batch"}}})
    task = reference_task(name, model=pretrained(name, verbose=False), lr=5e-4, weight_decay=0.0,
                          schedule="constant")
    with quiet(("lightning", "lightning.pytorch", "lightning.fabric"), stdout=False):
        trainer = L.Trainer(max_epochs=2, limit_train_batches=10, callbacks=[qat_cb], logger=False,
                            enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                            num_sanity_val_steps=0, limit_val_batches=0)
        trainer.fit(task, datamodule=dm)
    qat_s = time.perf_counter() - t
    qat_model = task.model.eval()
    ptq4_sess, qat_sess = _ort_session(ptq4_res.fake_quant), _ort_session(qat_cb.exported["fake_quant"])
    rows = [
        ("fp32", f"{acc:.4f}", f"{_ort_accuracy(fp32_sess, test):.4f}", f"{(out / 'fp32.onnx').stat().st_size / 1024:.0f}"),
        ("PTQ A8W4 (HFMG)", f"{evaluate_accuracy(ptq4, test):.4f}", f"{_ort_accuracy(ptq4_sess, test):.4f}",
         f"{ptq4_res.fake_quant.stat().st_size / 1024:.0f}"),
        ("QAT A8W4 (ULQ, 2x10 steps)", f"{evaluate_accuracy(qat_model, test):.4f}", f"{_ort_accuracy(qat_sess, test):.4f}",
         f"{qat_cb.exported['fake_quant'].stat().st_size / 1024:.0f}"),
    ]
    print(render_table(["model", "acc (PyTorch)", "acc (ORT)", "ONNX KiB"], rows))
    print(f"QAT: {qat_s:.1f} s; files: {qat_cb.exported['fake_quant']}\n"
          f"                      {qat_cb.exported['deploy']}")
    print(f"demo finished in {time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
    main()

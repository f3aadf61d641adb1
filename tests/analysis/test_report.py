"""compression_report: per-layer sparsity / unique values / bits against independent counts, gzip sizes of
the exported files against fp32, and no side effects (model unchanged, no files outside work_dir)."""

from __future__ import annotations

import copy
import gzip
import json
import tempfile

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
import torch.nn as nn
from onnx import numpy_helper

import amct_torch
from amct_torch.analysis import CompressionReport, compression_report
from amct_torch.config import QatConfig, QuantConfig
from amct_torch.nn import CompressedLayer
from amct_torch.quant import CalibrationError, weight_quantizer
from amct_torch.quant.formulas import channel_major
from amct_torch.sparsity import mask_stage, masked_layers
from analysis_helpers import assert_unchanged, snapshot

pytestmark = pytest.mark.usefixtures("one_thread")

ONESHOT = amct_torch.MagnitudeConfig(sparsity=0.5, schedule="oneshot", start=0)


def small_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 8, 3, padding=1), nn.ReLU(),
                         nn.Flatten(), nn.Linear(8 * 8 * 8, 10)).eval()


def inputs() -> torch.Tensor:
    return torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(1))


def unique_per_channel(w: torch.Tensor, layer: CompressedLayer) -> int:
    rows = channel_major(w, layer.weight_channel_axis)
    return max(torch.unique(r).numel() for r in rows)


def run_onnx(path, x: torch.Tensor) -> np.ndarray:
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0]


@pytest.fixture(scope="module")
def pruned(tmp_path_factory):
    fp32, x = small_net(), inputs()
    model = amct_torch.prune_magnitude(fp32, ONESHOT, x)
    before = snapshot(model)
    work = tmp_path_factory.mktemp("pruned")
    return fp32, model, before, compression_report(model, x, baseline=fp32, work_dir=work), work


@pytest.fixture(scope="module")
def ptq(tmp_path_factory):
    fp32, x = small_net(), inputs()
    model = amct_torch.quantize(fp32, QuantConfig(activation_calibrator="minmax", batch_num=1), x)
    amct_torch.calibrate(model, [x], progress=False)
    before = snapshot(model)
    work = tmp_path_factory.mktemp("ptq")
    return fp32, model, before, compression_report(model, x, work_dir=work), work


# -- per layer ---------------------------------------------------------------------------------------
def test_pruned_layer_sparsity_is_the_mask_sparsity_and_unique_counts_match_torch_unique(pruned):
    _, model, _, report, _ = pruned
    layers = masked_layers(model)
    assert [r.name for r in report.layers] == list(layers) == ["0", "2", "5"]
    for name, layer in layers.items():
        row, stage = report[name], mask_stage(layer)
        with torch.no_grad():
            w = layer.effective_weight()
        assert row.weights == w.numel()
        assert row.zeros == int((stage.mask == 0).sum())
        assert row.sparsity == stage.sparsity() == 0.5
        assert row.unique_values == torch.unique(w).numel()
        assert row.max_unique_per_channel == unique_per_channel(w, layer)
        assert row.bits == 32
        assert row.stages == ("MaskStage",)
    assert report.total_weights == sum(l.module.weight.numel() for l in layers.values())
    zeros = sum(int((mask_stage(l).mask == 0).sum()) for l in layers.values())
    assert report.total_zeros == zeros and report.sparsity == zeros / report.total_weights


def test_quantized_layers_are_counted_on_their_integer_weights(ptq):
    _, model, _, report, _ = ptq
    assert [r.name for r in report.layers] == ["0", "2", "5"]
    for row in report.layers:
        layer = model.get_submodule(row.name)
        stage = weight_quantizer(layer)
        q = stage.integer_weight(layer.module.weight)       # the int8 values the deploy model stores
        assert row.bits == stage.bits == 8
        assert row.unique_values == torch.unique(q).numel() <= 256
        assert row.max_unique_per_channel == unique_per_channel(q, layer) <= 256
        assert row.zeros == int((q == 0).sum())


# -- sizes -------------------------------------------------------------------------------------------
def test_quantized_model_is_sized_by_its_deploy_model_and_is_smaller_than_fp32(ptq):
    _, _, _, report, work = ptq
    assert report.compressed.kind == "deploy" and report.fake_quant.kind == "fake_quant"
    assert report.compressed.path == str(work / "compressed_deploy_model.onnx")
    for size in (report.compressed, report.fake_quant, report.fp32):
        data = open(size.path, "rb").read()
        assert size.raw_bytes == len(data)
        assert size.gzip_bytes == len(gzip.compress(data, compresslevel=9))
    assert report.compressed.gzip_bytes < report.fp32.gzip_bytes
    assert report.compressed.raw_bytes < report.fp32.raw_bytes
    assert report.ratio == report.fp32.gzip_bytes / report.compressed.gzip_bytes
    assert report.raw_ratio == report.fp32.raw_bytes / report.compressed.raw_bytes
    assert report.ratio > 2  # 8-bit weights of a model that is almost all weights


def test_pruned_model_exports_its_masked_weights_and_compresses_better_than_fp32(pruned):
    fp32, model, _, report, work = pruned
    x = inputs()
    assert report.compressed.kind == "float"
    proto = onnx.load(report.compressed.path)
    weights = {t.name: numpy_helper.to_array(t) for t in proto.graph.initializer}
    for name, layer in masked_layers(model).items():
        with torch.no_grad():
            np.testing.assert_array_equal(weights[f"{name}.weight"], layer.effective_weight().numpy())
    with torch.no_grad():
        np.testing.assert_allclose(run_onnx(report.compressed.path, x), model(x).numpy(), rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(run_onnx(report.fp32.path, x), fp32(x).numpy(), rtol=1e-5, atol=1e-6)
    # same graph, same float bytes: only the zeros make the difference, and only gzip sees it
    assert report.compressed.raw_bytes == report.fp32.raw_bytes
    assert report.compressed.gzip_bytes < 0.8 * report.fp32.gzip_bytes
    assert sorted(p.name for p in work.iterdir()) == ["compressed_float_model.onnx", "fp32_model.onnx"]


def test_derived_baseline_is_the_float_model_with_its_batch_norms_back(tmp_path):
    torch.manual_seed(0)
    fp32 = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(),
                         nn.Linear(4 * 8 * 8, 10)).eval()
    x = inputs()
    qat = amct_torch.prepare_qat(fp32, QatConfig(), x)   # the BN is trained folded into the conv
    amct_torch.freeze_bn_stats(qat)                      # keep the running statistics of fp32
    with torch.no_grad():
        qat(x)                                           # the learned quantizers initialise (batch_num=1)
    report = compression_report(qat, x, work_dir=tmp_path)
    assert report["0"].stages[0] == "BatchNormScale" and report["0"].bits == 8
    with torch.no_grad():
        np.testing.assert_allclose(run_onnx(report.fp32.path, x), fp32(x).numpy(), rtol=1e-5, atol=1e-6)
    assert any("baseline=" in n for n in report.notes)


# -- rendering --------------------------------------------------------------------------------------
def test_table_and_dict_carry_every_layer_and_the_totals(ptq):
    report = ptq[3]
    assert isinstance(report, CompressionReport)
    text = report.table()
    assert str(report) == text
    for word in ("deploy ONNX", "fp32", f"{report.ratio:.2f}x gzip", "ArqWeightQuantizer", "total"):
        assert word in text
    d = json.loads(json.dumps(report.to_dict()))
    assert [l["name"] for l in d["layers"]] == ["0", "2", "5"]
    assert d["ratio"] == report.ratio and d["total_weights"] == report.total_weights
    assert d["compressed"]["gzip_bytes"] == report.compressed.gzip_bytes
    assert "ratio=" in repr(report)


# -- no side effects ----------------------------------------------------------------------------------
def test_the_model_is_unchanged_by_the_report(pruned, ptq):
    for _, model, before, _, _ in (pruned, ptq):
        assert_unchanged(model, before)


def test_no_file_outlives_the_report_without_work_dir(tmp_path, monkeypatch):
    fp32, x = small_net(), inputs()
    model = amct_torch.prune_magnitude(fp32, ONESHOT, x).train()
    before = snapshot(model)
    tmp, cwd = tmp_path / "tmp", tmp_path / "cwd"
    tmp.mkdir()
    cwd.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(tmp))
    monkeypatch.chdir(cwd)
    report = compression_report(model, x)
    assert report.compressed.path is None and report.fp32.path is None
    assert list(tmp.iterdir()) == [] and list(cwd.iterdir()) == []
    assert_unchanged(model, before)


# -- errors -------------------------------------------------------------------------------------------
def test_a_model_without_compressed_layers_is_refused_with_what_to_do(tmp_path):
    with pytest.raises(ValueError, match="no compressed layers.*prune_magnitude"):
        compression_report(small_net(), inputs(), work_dir=tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_an_uncalibrated_quantized_model_is_refused_before_anything_is_written(tmp_path):
    model = amct_torch.quantize(small_net(), QuantConfig(activation_calibrator="minmax"), inputs())
    with pytest.raises(CalibrationError, match="compression_report.*calibrate"):
        compression_report(model, inputs(), work_dir=tmp_path / "w")
    assert not (tmp_path / "w").exists()


def test_a_compressed_baseline_is_refused(pruned):
    _, model, _, _, _ = pruned
    with pytest.raises(ValueError, match="baseline must be the float model"):
        compression_report(model, inputs(), baseline=copy.deepcopy(model))

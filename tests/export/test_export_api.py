"""amct_torch.export(): all-or-nothing writes, fake-quant ONNX vs torch, deploy ONNX vs fake-quant, the record."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from onnx import TensorProto, numpy_helper

from amct_torch.config import QuantConfig, read_record
from amct_torch.export import ExportResult, export, make_reference_evaluator, unpack_deq_param
from amct_torch.quant import CalibrationError, calibrate, quantize, weight_quantizer

FILES = ("fake_quant", "deploy", "record")
SUFFIXES = ("_fake_quant_model.onnx", "_deploy_model.onnx", "_record.txt")


pytestmark = pytest.mark.usefixtures("one_thread")


class SmallCNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1, bias=False)
        self.fc = nn.Linear(8 * 4 * 4, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn1(self.conv1(x)))
        x = F.avg_pool2d(F.relu(self.conv2(x)), 2)
        return self.fc(x.flatten(1))


class MLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(16, 32)
        self.fc2 = nn.Linear(32, 24)
        self.head = nn.Linear(24, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(F.relu(self.fc2(F.relu(self.fc1(x)))))


@dataclass
class Exported:
    model: nn.Module
    float_model: nn.Module
    batches: list[torch.Tensor]
    result: ExportResult
    layers: dict[str, str]  # layer -> ONNX op type in the fake-quant model


def _float_model(kind: str) -> nn.Module:
    torch.manual_seed(0)
    if kind == "cnn":
        model = SmallCNN().eval()
        with torch.no_grad():
            model.bn1.running_mean.uniform_(-0.5, 0.5)
            model.bn1.running_var.uniform_(0.5, 1.5)
        return model
    return MLP().eval()


def _prepare(kind: str, calibrator: str = "hfmg") -> tuple[nn.Module, list[torch.Tensor]]:
    model = _float_model(kind)
    g = torch.Generator().manual_seed(1)
    if kind == "cnn":
        batches = [torch.randn(4, 3, 8, 8, generator=g) for _ in range(4)]
    else:
        batches = [torch.randn(6, 16, generator=g) for _ in range(4)]
    q = quantize(model, QuantConfig(activation_calibrator=calibrator, num_of_bins=1024), batches[0])
    return q, batches


@pytest.fixture(scope="module", params=["cnn", "mlp"])
def exported(request, tmp_path_factory) -> Exported:
    q, batches = _prepare(request.param)
    calibrate(q, batches[:2], progress=False)
    out = tmp_path_factory.mktemp(f"export_{request.param}")
    result = export(q, out / "model", batches[0])
    layers = {"cnn": {"conv1": "Conv", "conv2": "Conv", "fc": "Gemm"},
              "mlp": {"fc1": "Gemm", "fc2": "Gemm", "head": "Gemm"}}[request.param]
    return Exported(q, _float_model(request.param), batches, result, layers)


def _ort(model: onnx.ModelProto) -> ort.InferenceSession:
    so = ort.SessionOptions()
    so.log_severity_level = 3
    return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])


def _last_layer_step(ex: Exported) -> float:
    """One activation quantization step at the input of the last layer, carried through its weights."""
    last = list(ex.layers)[-1]
    layer = getattr(ex.model, last)
    w = layer.effective_weight().detach()
    return float(layer.input_quantizer.scale) * w.abs().reshape(w.shape[0], -1).sum(1).max().item()


def _listing(d: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in d.iterdir()}


# -- nothing written unless calibrated -------------------------------------------------------------
def test_export_uncalibrated_raises_and_writes_nothing(tmp_path):
    q, batches = _prepare("mlp", calibrator="minmax")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(CalibrationError, match="fc1"):
        export(q, empty / "model", batches[0])
    assert list(empty.iterdir()) == []
    # nor into a directory that does not exist yet
    with pytest.raises(CalibrationError):
        export(q, tmp_path / "new" / "model", batches[0])
    assert not (tmp_path / "new").exists()
    # existing files at the target paths are left as they were
    old = tmp_path / "old"
    old.mkdir()
    for suffix in SUFFIXES:
        (old / f"model{suffix}").write_bytes(b"previous " + suffix.encode())
    before = _listing(old)
    with pytest.raises(CalibrationError):
        export(q, old / "model", batches[0])
    assert _listing(old) == before
    # partly calibrated (batch_num=2, one batch seen) is still refused
    q2 = quantize(MLP().eval(), QuantConfig(activation_calibrator="minmax", batch_num=2), batches[0])
    with torch.no_grad():
        q2(batches[0])
    with pytest.raises(CalibrationError, match=r"1/2"):
        export(q2, old / "model", batches[0])
    assert _listing(old) == before


def test_export_writes_three_files(exported):
    r = exported.result
    d = r.fake_quant.parent
    assert {p.name for p in d.iterdir()} == {f"model{s}" for s in SUFFIXES}  # no temporary files left
    for key, suffix in zip(FILES, SUFFIXES):
        path = getattr(r, key)
        assert path == d / f"model{suffix}"
        assert path.is_file() and path.stat().st_size > 0
    assert r.sizes() == {k: getattr(r, k).stat().st_size for k in FILES}
    # the files are the models the result carries
    assert onnx.load(r.fake_quant).graph == r.fake_quant_model.graph
    assert onnx.load(r.deploy).graph == r.deploy_model.graph


# -- fake-quant ONNX -------------------------------------------------------------------------------
def test_fake_quant_onnx_matches_torch(exported):
    sess = _ort(onnx.load(exported.result.fake_quant))
    name = sess.get_inputs()[0].name
    tol = max(_last_layer_step(exported), 1e-5)
    for x in exported.batches:
        got = sess.run(None, {name: x.numpy()})[0]
        with torch.no_grad():
            want = exported.model(x).numpy()
        assert got.shape == want.shape
        np.testing.assert_array_equal(got.argmax(-1), want.argmax(-1))
        assert np.abs(got - want).max() <= tol


def test_fake_quant_is_really_quantized(exported):
    # the ONNX model differs from the float model by about the quantization error, not by nothing
    sess = _ort(exported.result.fake_quant_model)
    x = exported.batches[3]
    got = sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0]
    with torch.no_grad():
        flt = exported.float_model(x).numpy()
    diff = np.abs(got - flt).max()
    assert 0 < diff < 0.1 * np.abs(flt).max()


def test_qdq_node_names_and_int8_weights(exported):
    g = exported.result.fake_quant_model.graph
    nodes = {n.name: n for n in g.node}
    inits = {t.name: t for t in g.initializer}
    producer = {o: n for n in g.node for o in n.output}
    for layer, op_type in exported.layers.items():
        op = nodes[layer]
        assert op.op_type == op_type
        q, dq = nodes[f"{layer}.input_quant"], nodes[f"{layer}.input_dequant"]
        assert q.op_type == "QuantizeLinear" and dq.op_type == "DequantizeLinear"
        assert dq.input[0] == q.output[0]
        assert producer[op.input[0]].op_type == "DequantizeLinear"
        # weight: int8 initializer <layer>.weight -> DequantizeLinear -> the layer
        w = inits[f"{layer}.weight"]
        assert w.data_type == TensorProto.INT8
        wdq = producer[op.input[1]]
        assert wdq.op_type == "DequantizeLinear" and wdq.input[0] == f"{layer}.weight"
        assert wdq.name.startswith(f"{layer}.weight_dequant")
        stage = weight_quantizer(getattr(exported.model, layer))
        module_w = getattr(exported.model, layer).module.weight
        np.testing.assert_array_equal(numpy_helper.to_array(w), stage.integer_weight(module_w).numpy())
        scale = numpy_helper.to_array(inits[wdq.input[1]])
        np.testing.assert_array_equal(scale, stage.scale.numpy())
        # activation factors: scale_d, and uint8 zero point = offset_d + 128 (the same real values as int8 with
        # offset_d; onnxruntime's x86 integer kernels want uint8 activations)
        aq = getattr(exported.model, layer).input_quantizer
        consts = {t.name: numpy_helper.to_array(t) for t in g.initializer}
        assert float(consts[q.input[1]]) == float(aq.scale)
        assert consts[q.input[2]].dtype == np.uint8
        assert int(consts[q.input[2]]) == int(aq.offset) + 128
    assert not any(n.op_type == "QuantizeLinear" and n.input[0] in inits for n in g.node)  # weights pre-quantized


# -- deploy model ----------------------------------------------------------------------------------
def test_deploy_model_matches_fake_quant_and_has_ascend_ops(exported):
    r = exported.result
    deploy = onnx.load(r.deploy)
    nodes = {n.name: n for n in deploy.graph.node}
    inits = {t.name: t for t in deploy.graph.initializer}
    producer = {o: n for n in deploy.graph.node for o in n.output}
    consumers = {}
    for n in deploy.graph.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    assert {c.name for c in r.deploy_report.converted} == set(exported.layers)
    assert not r.deploy_report.kept_float
    for layer in exported.layers:
        op = nodes[layer]
        quant = producer[op.input[0]]
        assert quant.op_type == "AscendQuant"
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in quant.attribute}
        aq = getattr(exported.model, layer).input_quantizer
        assert attrs["scale"] == pytest.approx(1.0 / float(aq.scale), rel=1e-6)
        assert attrs["offset"] == int(aq.offset)
        assert inits[op.input[1]].data_type == TensorProto.INT8
        (dq,) = consumers[op.output[0]]
        assert dq.op_type == "AscendDequant"
        assert dq.input[1] == f"{layer}.dequant.param"
        param = inits[f"{layer}.dequant.param"]
        assert param.data_type == TensorProto.UINT64
        stage = weight_quantizer(getattr(exported.model, layer))
        expect = (stage.scale.numpy().astype(np.float64) * float(aq.scale)).astype(np.float32)
        np.testing.assert_array_equal(unpack_deq_param(numpy_helper.to_array(param)), expect)
    sess = _ort(onnx.load(r.fake_quant))
    ref = make_reference_evaluator(deploy)
    tol = max(_last_layer_step(exported), 1e-5)
    for x in exported.batches:
        feeds = {sess.get_inputs()[0].name: x.numpy()}
        fake = sess.run(None, feeds)[0]
        got = ref.run(None, feeds)[0]
        np.testing.assert_array_equal(got.argmax(-1), fake.argmax(-1))
        assert np.abs(got - fake).max() <= tol


def test_deploy_weight_initializers_named_after_layer(exported):
    # AMCT's deploy format (deploy.py docstring, tests/export/test_deploy.py::check_amct_layer): the integer
    # layer reads <layer>.weight (int8) and <layer>.bias (int32).
    # Regression test (was a bug): amct_torch/export/deploy.py, qdq_to_deploy(): new names come from fresh(), which avoids every name in
    # the *input* graph; the fake-quant model already has <layer>.weight (int8) and <layer>.bias (float), so the
    # deploy model gets "conv1.weight_1" / "conv1.bias_1", and the originals are then dropped as dead. Fix: drop
    # the replaced DQ weight / float bias names from `used` before naming (or rename to the plain names after
    # _remove_dead when they are free).
    deploy = onnx.load(exported.result.deploy)
    nodes = {n.name: n for n in deploy.graph.node}
    inits = {t.name: t for t in deploy.graph.initializer}
    for layer in exported.layers:
        op = nodes[layer]
        assert op.input[1] == f"{layer}.weight"
        assert inits[f"{layer}.weight"].data_type == TensorProto.INT8
        if len(op.input) > 2:
            assert op.input[2] == f"{layer}.bias" and inits[f"{layer}.bias"].data_type == TensorProto.INT32


# -- record ----------------------------------------------------------------------------------------
def test_record_matches_quantizer_buffers(exported):
    record = read_record(exported.result.record)
    assert set(exported.layers) <= set(record.layers)
    for name in exported.layers:
        layer = getattr(exported.model, name)
        rec = record.layers[name]
        aq, stage = layer.input_quantizer, weight_quantizer(layer)
        assert np.float32(rec.scale_d) == aq.scale.numpy()  # exact float32
        assert rec.offset_d == int(aq.offset)
        np.testing.assert_array_equal(np.asarray(rec.scale_w, dtype=np.float32), stage.scale.numpy())
        assert rec.offset_w == [0] * stage.scale.numel()
        assert rec.act_type == "INT8" and rec.wts_type == "INT8"


# -- path_prefix -----------------------------------------------------------------------------------
def test_path_prefix_directory_raises(exported, tmp_path):
    with pytest.raises(ValueError, match="path_prefix"):
        export(exported.model, tmp_path, exported.batches[0])
    with pytest.raises(ValueError, match="path_prefix"):
        export(exported.model, str(tmp_path) + os.sep, exported.batches[0])
    assert list(tmp_path.iterdir()) == []


def test_path_prefix_with_trailing_separator_raises(tmp_path):
    # "out/" names a directory with an empty file-name prefix, which export() means to refuse
    # (`prefix.name == ""`, "allowed: a directory plus a file-name prefix, e.g. 'out/model'").
    # Regression test (was a bug): amct_torch/export/api.py, export(): Path("out/") drops the trailing separator, so prefix.name == "out"
    # and, when out/ does not exist yet, the files are written *next to* it as out_fake_quant_model.onnx, ...
    # Fix: check the raw string: `str(path_prefix).endswith((os.sep, "/"))` (or os.altsep) -> ValueError.
    q, batches = _prepare("mlp", calibrator="minmax")
    calibrate(q, batches[:1], progress=False)
    with pytest.raises(ValueError, match="path_prefix"):
        export(q, str(tmp_path / "out") + "/", batches[0])
    assert list(tmp_path.iterdir()) == []


def test_failed_write_leaves_no_partial_export(tmp_path):
    # all-or-nothing (api.py docstring): "a failure part-way leaves no file behind (and any existing files
    # untouched)".
    # Regression test (was a bug): amct_torch/export/api.py, export(): the three temporary files are renamed one by one; when a later
    # os.replace fails (here the record target is an existing directory -> IsADirectoryError) the fake-quant
    # and deploy files have already been moved into place (overwriting any previous ones). Fix: check every
    # target before the first rename (not a directory, writable), and on a failure roll back the renames done
    # so far (keep backups of replaced files, restore them).
    q, batches = _prepare("mlp", calibrator="minmax")
    calibrate(q, batches[:1], progress=False)
    (tmp_path / "model_record.txt").mkdir()
    with pytest.raises(OSError):
        export(q, tmp_path / "model", batches[0])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model_record.txt"]


def test_linear_on_3d_input_is_converted_to_deploy(tmp_path):
    # A Linear applied to (batch, seq, features) exports as DequantizeLinear(W) -> Transpose -> MatMul -> Add.
    # Regression test (was a bug): amct_torch/export/onnx_qdq.py / deploy.py: the deploy converter only recognises a DequantizeLinear
    # directly on the MatMul's weight input, so every such layer is kept float ("weight is not quantized (no
    # DequantizeLinear on the weight)") and the deploy model has no AscendQuant at all: transformer-style
    # models silently deploy unquantized. Fix: in export_qdq_model, fold Transpose(DequantizeLinear(int8
    # initializer)) into a transposed int8 initializer with the DequantizeLinear axis remapped (axis 0 -> 1),
    # or let deploy._weight look through a Transpose of a constant DequantizeLinear.
    q, _ = _prepare("mlp", calibrator="minmax")
    g = torch.Generator().manual_seed(2)
    batches = [torch.randn(2, 3, 16, generator=g) for _ in range(2)]
    calibrate(q, batches[:1], progress=False)
    r = export(q, tmp_path / "seq", batches[0])
    sess = _ort(r.fake_quant_model)
    with torch.no_grad():
        want = q(batches[1]).numpy()
    got = sess.run(None, {sess.get_inputs()[0].name: batches[1].numpy()})[0]
    assert np.abs(got - want).max() <= 1e-5
    assert [u.name for u in r.deploy_report.kept_float] == []
    assert {c.name for c in r.deploy_report.converted} == {"fc1", "fc2", "head"}
    assert sum(n.op_type == "AscendQuant" for n in r.deploy_model.graph.node) == 3

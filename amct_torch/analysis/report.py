"""Compression report: per-layer sparsity, unique weight values and bits, and the gzip size of the export.

    report = compression_report(model, x)              # model: pruned, clustered, quantized, or all three
    print(report.table())                              # layer, type, weights, sparsity, unique, bits, stages
    report.sparsity, report.ratio                      # zero fraction; fp32 gzip bytes / compressed gzip bytes
    json.dump(report.to_dict(), f)                     # for benchmarks

The figures TensorFlow Model Optimization reports, for a model compressed by this toolkit's passes:

* per layer (every :class:`~amct_torch.nn.CompressedLayer` with a weight), read from the weight the op sees
  (``effective_weight()``, the pipeline applied, in eval mode, without gradients): the fraction of weights
  exactly zero, the number of distinct values (in the tensor, and the most in any one output channel, which
  is what per-channel clustering and quantization bound), and the weight bits. A quantized layer is counted
  on its *integer* weight ``q = round(w' / scale) + offset`` (what the deploy model stores), so its unique
  count is at most ``2^bits`` per tensor and a weight that rounds to 0 counts as zero; other layers are
  counted on the float weight, and their bits are those of its dtype (32 for fp32);
* sizes: the exported ONNX file of the compressed model, raw and gzip-compressed (``gzip``, level 9, on
  the file bytes: what a download or a zip archive costs, and where sparsity and clustering pay off), next
  to the fp32 model's. The compressed file is the deploy model of :func:`amct_torch.export` (int8 or packed
  int4 weights, int32 biases) when the model is quantized, else a float ONNX of the model with every weight
  pipeline baked into a constant weight (masked weights are zeros, clustered ones repeat their centroids).
  ``ratio = fp32 gzip bytes / compressed gzip bytes``.

The fp32 baseline is ``baseline`` when given (the original float model: the exact comparison), else the
model itself with every wrapper unwrapped to its original layer and weight (activation quantizers removed,
BatchNorms that QAT trains folded restored as BatchNorms). BatchNorms that :func:`amct_torch.quantize`
folded into their convolutions before quantizing stay folded in that derived baseline, which makes it a
little smaller than the original model; pass ``baseline=`` for the exact figure.

The model is never changed: everything is read and exported from deep copies. Files go to a temporary
directory that is removed afterwards, or to ``work_dir`` (kept: ``compressed_deploy_model.onnx`` and the
rest of the export, or ``compressed_float_model.onnx``; ``fp32_model.onnx``).
"""

from __future__ import annotations

import copy
import gzip
import os
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import onnx
import torch
import torch.nn as nn

from ..export.api import export
from ..export.onnx_qdq import export_qdq_model
from ..graph.plan import render_table
from ..nn import CompressedConv, CompressedLayer, FoldedBatchNorm
from ..quant.formulas import channel_major
from ..quant.ptq import CalibrationError, check_calibrated, quant_layers, weight_quantizer
from ..quant.quantizers import ActivationQuantizer

__all__ = ["compression_report", "CompressionReport", "LayerCompression", "ModelSize"]


@dataclass(frozen=True)
class LayerCompression:
    """One layer's line. ``sparsity = zeros / weights``; counts are of the integer weight when quantized.

    Attributes:
        unique_values: distinct values in the whole weight tensor.
        max_unique_per_channel: the most distinct values in one output channel (per-channel clustering and
            quantization bound this one).
        bits: the weight quantizer's bits, or the float weight's dtype bits (32 for fp32) when there is none.
        stages: the weight pipeline's stages in order (class names).
    """

    name: str
    layer_type: str
    weights: int
    zeros: int
    unique_values: int
    max_unique_per_channel: int
    bits: int
    stages: tuple[str, ...] = ()

    @property
    def sparsity(self) -> float:
        return self.zeros / self.weights if self.weights else 0.0


@dataclass(frozen=True)
class ModelSize:
    """An exported ONNX file's size in bytes, raw and gzip-compressed (level 9).

    ``kind``: ``deploy`` (AMCT deploy model), ``fake_quant`` (QDQ model), ``float`` (pipelines baked into
    float weights) or ``fp32`` (the baseline). ``path`` is None when the file was in a temporary directory.
    """

    kind: str
    raw_bytes: int
    gzip_bytes: int
    path: str | None = None


def _kib(n: int) -> str:
    return f"{n / 1024:,.1f} KiB"


@dataclass
class CompressionReport:
    """Per-layer rows (in module order), the compressed and fp32 ONNX sizes, and notes."""

    layers: list[LayerCompression] = field(default_factory=list)
    compressed: ModelSize | None = None
    fp32: ModelSize | None = None
    fake_quant: ModelSize | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def total_weights(self) -> int:
        return sum(r.weights for r in self.layers)

    @property
    def total_zeros(self) -> int:
        return sum(r.zeros for r in self.layers)

    @property
    def sparsity(self) -> float:
        """Zero fraction over the weights of all reported layers."""
        return self.total_zeros / self.total_weights if self.total_weights else 0.0

    @property
    def ratio(self) -> float:
        """Compression ratio of the gzip-compressed files: ``fp32.gzip_bytes / compressed.gzip_bytes``."""
        return self.fp32.gzip_bytes / self.compressed.gzip_bytes

    @property
    def raw_ratio(self) -> float:
        """``fp32.raw_bytes / compressed.raw_bytes`` (the files as written)."""
        return self.fp32.raw_bytes / self.compressed.raw_bytes

    def __getitem__(self, name: str) -> LayerCompression:
        for r in self.layers:
            if r.name == name:
                return r
        raise KeyError(f"no layer {name!r} in the report; layers: {', '.join(r.name for r in self.layers)}")

    def to_dict(self) -> dict[str, Any]:
        """Plain values only (JSON-serialisable); derived figures included."""
        return {"layers": [{**asdict(r), "stages": list(r.stages), "sparsity": r.sparsity} for r in self.layers],
                "total_weights": self.total_weights, "total_zeros": self.total_zeros, "sparsity": self.sparsity,
                "compressed": asdict(self.compressed), "fp32": asdict(self.fp32),
                "fake_quant": asdict(self.fake_quant) if self.fake_quant is not None else None,
                "ratio": self.ratio, "raw_ratio": self.raw_ratio, "notes": list(self.notes)}

    def table(self) -> str:
        rows = [(r.name, r.layer_type, f"{r.weights:,}", f"{100 * r.sparsity:.2f}%", f"{r.unique_values:,}",
                 f"{r.max_unique_per_channel:,}", r.bits, " > ".join(r.stages) or "-") for r in self.layers]
        rows.append(("total", "", f"{self.total_weights:,}", f"{100 * self.sparsity:.2f}%", "", "", "", ""))
        body = render_table(["layer", "type", "weights", "sparsity", "unique", "max unique/ch", "bits", "stages"], rows)
        head = [f"compressed ({self.compressed.kind} ONNX): {_kib(self.compressed.raw_bytes)}, "
                f"gzip {_kib(self.compressed.gzip_bytes)}",
                f"fp32: {_kib(self.fp32.raw_bytes)}, gzip {_kib(self.fp32.gzip_bytes)}",
                f"ratio: {self.ratio:.2f}x gzip, {self.raw_ratio:.2f}x raw"]
        if self.fake_quant is not None:
            head.insert(1, f"fake-quant (QDQ ONNX): {_kib(self.fake_quant.raw_bytes)}, "
                           f"gzip {_kib(self.fake_quant.gzip_bytes)}")
        return "\n".join(head + [body] + [f"note: {n}" for n in self.notes])

    def __str__(self) -> str:
        return self.table()

    def __repr__(self) -> str:
        return (f"CompressionReport(layers={len(self.layers)}, sparsity={self.sparsity:.4f}, compressed_gzip="
                f"{self.compressed.gzip_bytes}, fp32_gzip={self.fp32.gzip_bytes}, ratio={self.ratio:.3f})")


# -- per layer -------------------------------------------------------------------------------------
def _unique_per_row(rows: torch.Tensor) -> torch.Tensor:
    """Distinct values in each row (``-0.0 == 0.0``, as ``torch.unique``)."""
    if rows.shape[1] == 0:
        return torch.zeros(rows.shape[0], dtype=torch.long)
    s = rows.sort(dim=1).values
    return (s[:, 1:] != s[:, :-1]).sum(dim=1) + 1


def _counted_weight(layer: CompressedLayer) -> tuple[torch.Tensor, int]:
    """The weight the layer's figures are counted on, and its bits (call under no_grad, in eval mode)."""
    stage = weight_quantizer(layer)
    if stage is None:
        w = layer.effective_weight()
        return w, (torch.finfo(w.dtype).bits if w.is_floating_point() else torch.iinfo(w.dtype).bits)
    w = layer.weight_pipeline.input_of(stage, layer.module.weight)  # the stages before the quantizer feed it
    fake = stage(w)  # learned stages refresh their scale here
    scale = stage.broadcast(stage.scale, fake.shape)
    offset = stage.broadcast(stage.offset, fake.shape).to(fake.dtype)
    return torch.round(fake / scale) + offset, stage.bits  # x' = (q - offset) * scale: as export folds it


def _weight_counts(w: torch.Tensor, axis: int, groups: int = 1) -> tuple[int, int, int, int]:
    """``(weights, zeros, unique values, most unique values in one output channel)`` of a weight tensor
    (``axis``/``groups``: its output-channel layout, as :func:`~amct_torch.quant.formulas.channel_major`)."""
    w = w.detach()
    per_channel = _unique_per_row(channel_major(w, axis, groups))
    return (w.numel(), int((w == 0).sum()), int(torch.unique(w).numel()),
            int(per_channel.max()) if per_channel.numel() else 0)


def _layer_row(name: str, layer: CompressedLayer) -> LayerCompression:
    modes = {m: m.training for m in layer.modules()}  # restored one by one: a wrapper and its layer may differ
    layer.eval()  # reading the weight must not count as a training batch (N:M mask stages count them)
    try:
        with torch.no_grad():
            w, bits = _counted_weight(layer)
    finally:
        for m, mode in modes.items():
            m.training = mode
    groups = getattr(layer.module, "groups", 1)
    weights, zeros, unique, per_channel = _weight_counts(w, layer.weight_channel_axis, groups)
    return LayerCompression(name=name, layer_type=type(layer.module).__name__, weights=weights, zeros=zeros,
                            unique_values=unique, max_unique_per_channel=per_channel, bits=int(bits),
                            stages=tuple(type(s).__name__ for s in layer.weight_pipeline))


def _weighted_layers(model: nn.Module) -> dict[str, CompressedLayer]:
    return {name: m for name, m in model.named_modules()
            if isinstance(m, CompressedLayer) and m.has_weight and m.weight_pipeline is not None}


# -- plain copies for the float exports ------------------------------------------------------------
def _restored_batch_norm(fbn: FoldedBatchNorm) -> nn.Module:
    cls = getattr(nn, fbn.bn_type, None)
    if not (isinstance(cls, type) and issubclass(cls, nn.modules.batchnorm._BatchNorm)):
        return fbn  # unknown kind: keep the (identity) folded module
    bn = cls(fbn.num_features, eps=fbn.eps, momentum=fbn.momentum)
    bn.weight, bn.bias = fbn.weight, fbn.bias
    bn.running_mean, bn.running_var = fbn.running_mean, fbn.running_var
    bn.num_batches_tracked = fbn.num_batches_tracked
    return bn.to(fbn.running_mean.device)


def plain_copy(model: nn.Module, *, bake: bool) -> nn.Module:
    """A copy in eval mode without wrappers or activation quantizers.

    ``bake=True``: each layer holds its effective weight and bias (pipelines baked, QAT BatchNorms folded
    into their convs); ``bake=False``: each layer holds its original weight, and QAT's folded BatchNorms
    are BatchNorms again (the float model the compression started from).
    """
    model = copy.deepcopy(model).eval()
    replaced: list[str] = []
    for name, m in list(model.named_modules()):
        if any(name.startswith(p + ".") for p in replaced):
            continue  # inside a wrapper already replaced by its layer
        new: nn.Module | None = None
        if isinstance(m, CompressedLayer):
            new = m.module
            if bake and m.has_weight and m.weight_pipeline is not None:
                if isinstance(m, CompressedConv):
                    m.bake_batch_norm()
                with torch.no_grad():
                    w, b = m.effective_weight().detach().clone(), m.effective_bias()
                new.weight = nn.Parameter(w, requires_grad=False)
                if b is not None:
                    new.bias = nn.Parameter(b.detach().clone(), requires_grad=False)
        elif isinstance(m, ActivationQuantizer):
            new = nn.Identity()
        elif isinstance(m, FoldedBatchNorm) and not bake:
            new = _restored_batch_norm(m)
        if new is None or new is m:
            continue
        replaced.append(name)
        if not name:
            model = new
        else:
            model.set_submodule(name, new)
    return model.eval()


# -- sizes -----------------------------------------------------------------------------------------
def _size_of(path: Path, kind: str, keep: bool) -> ModelSize:
    data = path.read_bytes()
    return ModelSize(kind, len(data), len(gzip.compress(data, compresslevel=9, mtime=0)), str(path) if keep else None)


def _float_onnx(model: nn.Module, example_inputs: Any, path: Path) -> None:
    # the exporter the quantized path uses (same cleanups), so the files differ only in what compression did
    onnx.save(export_qdq_model(model, example_inputs), os.fspath(path))


def _sizes(report: CompressionReport, model: nn.Module, example_inputs: Any, baseline: nn.Module | None,
           work: Path, keep: bool) -> None:
    if quant_layers(model):
        result = export(model, work / "compressed", example_inputs)
        report.compressed = _size_of(result.deploy, "deploy", keep)
        report.fake_quant = _size_of(result.fake_quant, "fake_quant", keep)
        kept = [f"{u.name} ({u.reason})" for u in result.deploy_report.kept_float]
        if kept:
            report.notes.append("kept float in the deploy model: " + ", ".join(kept))
    else:
        path = work / "compressed_float_model.onnx"
        _float_onnx(plain_copy(model, bake=True), example_inputs, path)
        report.compressed = _size_of(path, "float", keep)
    path = work / "fp32_model.onnx"
    if baseline is None:
        fp32 = plain_copy(model, bake=False)
        report.notes.append("fp32 baseline derived from the model (original weights, compression removed); "
                            "pass baseline=<the original float model> for the exact comparison")
    else:
        fp32 = baseline
    _float_onnx(fp32, example_inputs, path)
    report.fp32 = _size_of(path, "fp32", keep)


def compression_report(model: nn.Module, example_inputs: Any, *, baseline: nn.Module | None = None,
                       work_dir: str | os.PathLike | None = None) -> CompressionReport:
    """Sparsity, unique values and bits per layer, and gzip sizes of the exported model against fp32.

    Args:
        model: a model prepared by a compression pass (``prune_magnitude``, ``apply_nm``, ``prune_channels``,
            clustering, ``quantize`` + ``calibrate``, ``prepare_qat`` + training, or several in turn).
        example_inputs: inputs for the ONNX exports (tensor, tuple, or dict of keyword inputs).
        baseline: the fp32 model to compare against (the original float model); default: the model with
            every compression stage removed (see the module docstring).
        work_dir: where the ONNX files are written and kept; default: a temporary directory, removed.

    Returns a :class:`CompressionReport`; ``print(report)`` shows the table. The model is not changed.

    Raises:
        ValueError: the model has no compressed layer with a weight, or ``baseline`` has compressed layers.
        CalibrationError: the model is quantized but not calibrated (nothing is exported).

    Example::

        pruned = amct_torch.prune_magnitude(model, amct_torch.MagnitudeConfig(sparsity=0.8, schedule="oneshot"), x)
        print(compression_report(pruned, x, baseline=model))
    """
    if not _weighted_layers(model):
        raise ValueError("compression_report: the model has no compressed layers (no CompressedLayer with a "
                         "weight); prepare it with a compression pass first (amct_torch.prune_magnitude, "
                         "apply_nm, prune_channels, quantize + calibrate, prepare_qat, ...) and pass the model "
                         "that pass returns")
    if baseline is not None:
        wrapped = [n for n, m in baseline.named_modules() if isinstance(m, CompressedLayer)]
        if wrapped:
            raise ValueError(f"compression_report: baseline must be the float model, but it has compressed layers "
                             f"({', '.join(wrapped[:5])}{' ...' if len(wrapped) > 5 else ''}); pass the model "
                             "before compression")
    if quant_layers(model):
        try:
            check_calibrated(model)
        except CalibrationError as e:
            raise CalibrationError("compression_report: the model is quantized, and its deploy model cannot be "
                                   f"exported yet: {e}") from e

    work_model = copy.deepcopy(model).eval()  # stages may refresh buffers when read (ARQ-retrain scales)
    report = CompressionReport(layers=[_layer_row(n, m) for n, m in _weighted_layers(work_model).items()])
    if work_dir is None:
        with tempfile.TemporaryDirectory(prefix="amct-report-") as tmp:
            _sizes(report, work_model, example_inputs, baseline, Path(tmp), keep=False)
    else:
        work = Path(work_dir)
        work.mkdir(parents=True, exist_ok=True)
        _sizes(report, work_model, example_inputs, baseline, work, keep=True)
    return report

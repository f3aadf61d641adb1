"""layer_report: every figure of a row against what the quantizers, masks and count_flops hold, the output
error against an independent computation, the files it writes, its errors, and no side effects."""

from __future__ import annotations

import base64
import json
import math
import re

import pytest
import torch
import torch.nn as nn

import amct_torch
from amct_torch.analysis import count_flops
from amct_torch.analysis.layer_report import PLOT_KINDS, SQNR_CAP_DB, LayerReport, LayerRow, layer_report
from amct_torch.config import QatConfig, QuantConfig, Targeting
from amct_torch.quant import CalibrationError, weight_quantizer
from amct_torch.quant.formulas import channel_major, qrange
from amct_torch.sparsity import mask_stage
from amct_torch.zoo import pretrained, reference_datamodule
from analysis_helpers import assert_unchanged, snapshot

pytestmark = pytest.mark.usefixtures("one_thread")

PNG = b"\x89PNG\r\n\x1a\n"
MINMAX = QuantConfig(activation_calibrator="minmax")


def small_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 8, 3, padding=1),
                         nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(), nn.Flatten(),
                         nn.Linear(8 * 8 * 8, 10)).eval()


def batches(n: int = 3) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return [torch.randn(4, 1, 8, 8, generator=g) for _ in range(n)]


def sqnr(ref: list[torch.Tensor], out: list[torch.Tensor]) -> float:
    a = torch.cat([t.reshape(-1).double() for t in ref])
    b = torch.cat([t.reshape(-1).double() for t in out])
    return 10 * math.log10(float(a @ a) / float((a - b) @ (a - b)))


def cosine(ref: list[torch.Tensor], out: list[torch.Tensor]) -> float:
    a = torch.cat([t.reshape(-1).double() for t in ref])
    b = torch.cat([t.reshape(-1).double() for t in out])
    return float(a @ b) / math.sqrt(float(a @ a) * float(b @ b))


def record(model: nn.Module, name: str, data: list[torch.Tensor]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Inputs and outputs of ``model.<name>`` over ``data``."""
    ins, outs = [], []

    def hook(module: nn.Module, args: tuple, output: torch.Tensor) -> None:
        ins.append(args[0].clone())
        outs.append(output.clone())   # the forward may change it in place afterwards (+=, ReLU(inplace=True))

    h = model.get_submodule(name).register_forward_hook(hook)
    try:
        with torch.no_grad():
            for x in data:
                model(x)
    finally:
        h.remove()
    return ins, outs


@pytest.fixture(scope="module")
def ptq():
    """conv '0' W8, conv '3' W4 per tensor, conv '5' W8, Linear '8' float; calibrated on batch 0 only."""
    fp, data = small_net(), batches()
    cfg = Targeting(MINMAX, module_name={"3": QuantConfig(weight_bits=4, weight_granularity="per_tensor",
                                                          activation_calibrator="minmax")}, skip=("8",))
    q = amct_torch.quantize(fp, cfg, data[0])
    amct_torch.calibrate(q, data[:1], progress=False)
    before = snapshot(q)
    return fp, q, data, before, layer_report(q, data, reference=fp)


# -- what the model holds --------------------------------------------------------------------------------
def test_rows_bits_and_factors_equal_what_the_quantizers_hold(ptq):
    fp, q, data, _, report = ptq
    assert [r.name for r in report.rows] == ["0", "3", "5", "8"]
    for row in report.rows[:3]:
        layer = q.get_submodule(row.name)
        stage, act = weight_quantizer(layer), layer.input_quantizer
        assert row.wrapper == "CompressedConv" and row.layer_type == "Conv2d"
        assert row.weight_bits == stage.bits and row.activation_bits == act.bits == 8
        assert row.weight_algorithm == "arq" and row.stages == ("ArqWeightQuantizer",)
        assert row.weight_scale.count == stage.scale.numel()
        assert row.weight_scale.min == pytest.approx(float(stage.scale.min()), rel=1e-7)
        assert row.weight_scale.max == pytest.approx(float(stage.scale.max()), rel=1e-7)
        assert row.weight_offset.max == 0 == row.weight_offset.min
        info = row.activation
        assert info.calibrated and info.algorithm == "minmax"
        assert info.scale == float(act.scale) and info.offset == int(act.offset)
        qmin, qmax = qrange(8)
        assert info.clip_min == pytest.approx((qmin - info.offset) * info.scale)
        assert info.clip_max == pytest.approx((qmax - info.offset) * info.scale)
    w4 = report["3"]
    assert w4.weight_bits == 4 and w4.weight_granularity == "per_tensor" and w4.weight_scale.count == 1
    s = w4.weight_scale.value
    assert w4.weight_histogram.marks == pytest.approx({"clip min": -8 * s, "clip max": 7 * s})
    assert w4.weight_histogram.grid == pytest.approx(tuple(k * s for k in range(-8, 8)))  # 16 levels drawn
    assert report["0"].weight_granularity == "per_channel"
    assert report["0"].weight_histogram.unit.startswith("weight / channel scale")
    float_row = report["8"]
    assert (float_row.wrapper, float_row.weight_bits, float_row.activation_bits, float_row.activation) == (
        None, 32, 32, None)


def test_unique_counts_sparsity_params_and_macs(ptq):
    fp, q, data, _, report = ptq
    flops = count_flops(q, data[0])
    for row in report.rows:
        layer = q.get_submodule(row.name)
        if row.wrapper is None:
            w = layer.weight.detach()
        else:
            with torch.no_grad():
                w = weight_quantizer(layer).integer_weight(layer.module.weight)  # the stored integers
        rows = channel_major(w, 0)
        assert row.unique_values == torch.unique(w).numel()
        assert row.max_unique_per_channel == max(torch.unique(r).numel() for r in rows)
        with torch.no_grad():
            w_eff = layer.effective_weight() if row.wrapper else layer.weight
        assert row.sparsity == float((w_eff == 0).sum()) / w_eff.numel()
        assert row.macs == flops[row.name].macs and row.effective_macs == flops[row.name].effective_macs
        assert row.params == flops[row.name].params
        assert sum(row.weight_histogram.counts) == w.numel()
    assert report["3"].unique_values <= 16
    assert report.total_macs == flops.total_macs and report.total_params == flops.total_params


def test_pruned_rows_report_the_mask_sparsity():
    fp, data = small_net(), batches(2)
    pruned = amct_torch.prune_magnitude(fp, amct_torch.MagnitudeConfig(sparsity=0.6, schedule="oneshot", start=0),
                                        data[0])
    report = layer_report(pruned, data)
    assert [r.name for r in report.rows] == ["0", "3", "5", "8"]
    for row in report.rows:
        layer = pruned.get_submodule(row.name)
        stage = mask_stage(layer)
        with torch.no_grad():
            w = layer.effective_weight()
        assert row.sparsity == row.mask_sparsity == int((stage.mask == 0).sum()) / w.numel()
        assert row.mask_sparsity == pytest.approx(stage.sparsity()) == pytest.approx(0.6, abs=0.02)
        assert row.unique_values == torch.unique(w).numel()
        assert row.weight_bits == 32 and row.stages == ("MaskStage",)
        assert sum(row.weight_histogram.counts) == int((stage.mask != 0).sum())  # masked zeros left out
        assert "masked weights not shown" in row.weight_histogram.note
        assert row.effective_macs < row.macs
        assert 0 < row.sqnr_db < SQNR_CAP_DB  # against the unpruned weights


# -- output error -------------------------------------------------------------------------------------------
def test_sqnr_and_cosine_equal_an_independent_computation(ptq):
    fp, q, data, _, report = ptq
    folded, _ = amct_torch.fold_batch_norm(fp, data[0])   # what quantize compares its conv '0' with
    for name in ("0", "3", "5"):
        ins, ref = record(folded, name, data)
        with torch.no_grad():
            alone = [q.get_submodule(name)(x) for x in ins]   # the layer alone on the float inputs
        _, in_model = record(q, name, data)
        row = report[name]
        assert row.sqnr_db == pytest.approx(sqnr(ref, alone), rel=1e-9)
        assert row.cosine == pytest.approx(cosine(ref, alone), rel=1e-12)
        assert row.model_sqnr_db == pytest.approx(sqnr(ref, in_model), rel=1e-9)
        assert row.model_cosine == pytest.approx(cosine(ref, in_model), rel=1e-12)
        assert row.compared_with == name
    # the float layer alone is exact; in the model it sees the quantized layers' error
    assert report["8"].sqnr_db == SQNR_CAP_DB and report["8"].cosine == 1.0
    assert report["8"].model_sqnr_db < 60
    assert report["3"].sqnr_db < report["5"].sqnr_db and report["3"].sqnr_db < report["0"].sqnr_db
    assert report.settings == {"num_batches": 4, "reference": "the given reference model", "batches": 3}


class InPlaceResidual(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.conv2, self.relu = nn.Conv2d(4, 4, 3, padding=1), nn.Conv2d(4, 4, 3, padding=1), nn.ReLU(True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv2(self.relu(self.conv1(x)))
        out += x                                        # changes conv2's output tensor after the layer ran
        return self.relu(out)


def test_layer_outputs_changed_in_place_later_are_compared_as_the_layer_made_them():
    torch.manual_seed(0)
    fp = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(True), InPlaceResidual(), nn.Flatten(),
                       nn.Linear(4 * 8 * 8, 10)).eval()
    data = batches(2)
    q = amct_torch.quantize(fp, MINMAX, data[0])
    amct_torch.calibrate(q, data, progress=False)
    fp.train()
    before = snapshot(fp)
    report = layer_report(q, data, reference=fp)   # nothing to fold: the reference itself is run, in eval mode
    assert_unchanged(fp, before)
    fp.eval()
    for name in ("0", "2.conv1", "2.conv2"):
        _, ref = record(fp, name, data)
        _, in_model = record(q, name, data)
        assert report[name].model_sqnr_db == pytest.approx(sqnr(ref, in_model), rel=1e-9)


def test_derived_reference_folds_like_the_model_and_gives_the_same_figures(ptq):
    fp, q, data, _, given = ptq
    derived = layer_report(q, data)
    assert derived.settings["reference"] == "the model with its compression removed"
    for a, b in zip(given.rows, derived.rows):
        assert a.sqnr_db == pytest.approx(b.sqnr_db, rel=1e-6)
        assert a.model_sqnr_db == pytest.approx(b.model_sqnr_db, rel=1e-6)


def test_activation_histogram_and_clipped_fraction(ptq):
    fp, q, data, _, report = ptq
    row, layer = report["5"], q.get_submodule("5")
    ins, _ = record(q, "5", data)   # what the input quantizer receives in the compressed model
    x = torch.cat([t.reshape(-1) for t in ins])
    s = row.activation.scale
    outside = ((x < row.activation.clip_min - s / 2) | (x > row.activation.clip_max + s / 2)).double().mean()
    assert row.activation_clipped == pytest.approx(float(outside))
    assert row.activation_clipped > 0   # calibrated on batch 0 only: batches 1 and 2 go beyond its range
    h = row.activation_histogram
    assert sum(h.counts) == x.numel()   # small enough to be kept whole
    assert h.marks == {"clip min": row.activation.clip_min, "clip max": row.activation.clip_max}
    assert h.edges[0] <= min(float(x.min()), row.activation.clip_min)
    assert h.edges[-1] >= max(float(x.max()), row.activation.clip_max)


def test_four_bit_layer_has_lower_sqnr_than_the_same_layer_at_eight_bits():
    fp = pretrained("mobilenetv2_digits", verbose=False).eval()
    dm = reference_datamodule("mobilenetv2_digits")
    data, x = dm.calibration_batches(2), dm.example_input(1)
    layer = "features.3.conv.6"
    w4 = QuantConfig(weight_bits=4, activation_calibrator="minmax")
    reports = {}
    for bits, cfg in ((8, Targeting(MINMAX, skip=("classifier.1",))),
                      (4, Targeting(MINMAX, module_name={layer: w4}, skip=("classifier.1",)))):
        q = amct_torch.quantize(fp, cfg, x)
        amct_torch.calibrate(q, data, progress=False)
        reports[bits] = layer_report(q, data, x, reference=fp, num_batches=2)
    flops = count_flops(fp, x)
    expected = [n for n, m in fp.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    for report in reports.values():
        assert [r.name for r in report.rows] == expected
        assert [r.macs for r in report.rows] == [flops[n].macs for n in expected]
        assert report["classifier.1"].sqnr_db == SQNR_CAP_DB          # not quantized: exact alone
        assert report["classifier.1"].weight_bits == 32
    assert reports[4][layer].weight_bits == 4 and reports[8][layer].weight_bits == 8
    assert reports[4][layer].sqnr_db < reports[8][layer].sqnr_db - 10
    assert reports[4][layer].unique_values <= 16 < reports[8][layer].unique_values


def test_pretrained_resnet_every_layer_and_files(tmp_path):
    fp = pretrained("resnet_digits", verbose=False).eval()
    dm = reference_datamodule("resnet_digits")
    data, x = dm.calibration_batches(2), dm.example_input(1)
    q = amct_torch.quantize(fp, MINMAX, x)
    amct_torch.calibrate(q, data, progress=False)
    before = snapshot(q)
    report = layer_report(q, data, num_batches=2)
    assert_unchanged(q, before)
    wrapped = [n for n, m in q.named_modules() if isinstance(m, amct_torch.CompressedLayer)]
    assert [r.name for r in report.rows] == wrapped and len(wrapped) == 22
    for row in report.rows:
        layer = q.get_submodule(row.name)
        assert row.weight_scale.min == pytest.approx(float(weight_quantizer(layer).scale.min()), rel=1e-7)
        assert row.activation.scale == float(layer.input_quantizer.scale)
        assert 25 < row.sqnr_db < SQNR_CAP_DB and 0.99 < row.cosine <= 1
    path = report.write_html(tmp_path / "resnet.html", histograms=["layer2.0.conv1"])
    text = path.read_text()
    assert text.count("data:image/png;base64,") == 3     # error, sparsity, one histogram
    assert "layer3.2.conv2" in text


# -- decomposition and QAT ------------------------------------------------------------------------------------
def test_decomposed_layers_are_compared_as_a_chain_with_the_layer_they_replace():
    fp, data = small_net(), batches(2)
    dec, _ = amct_torch.decompose(fp, amct_torch.DecomposeConfig(linear=True, rank_selection="fixed", rank=3),
                                  data[0], layers=["3", "8"])
    report = layer_report(dec, data, reference=fp)
    assert [r.name for r in report.rows] == ["0", "3.0", "3.1", "5", "8.0", "8.1"]
    assert report["3.0"].sqnr_db is None and report["3.1"].compared_with == "3 (factor chain)"
    ins, ref = record(fp, "3", data)
    with torch.no_grad():
        mine = [dec.get_submodule("3")(t) for t in ins]
    assert report["3.1"].sqnr_db == pytest.approx(sqnr(ref, mine), rel=1e-9)
    assert report["5"].sqnr_db == SQNR_CAP_DB and report["0"].sqnr_db == SQNR_CAP_DB
    assert any("factor chain" in n for n in report.notes)


def test_qat_rows_report_learned_clips_and_scales():
    fp, data = small_net(), batches(2)
    qat = amct_torch.prepare_qat(fp, QatConfig(weight_bits=4, weight_algorithm="lsq_plus"), data[0])
    with torch.no_grad():
        qat(data[0])                                  # the learned quantizers initialise (batch_num=1)
    qat.train()
    before = snapshot(qat)
    report = layer_report(qat, data)
    assert_unchanged(qat, before)
    for row in report.rows[:3]:
        layer = qat.get_submodule(row.name)
        act = layer.input_quantizer
        assert row.activation.algorithm == "ulq" and row.weight_algorithm == "lsq_plus"
        assert row.activation.learned["clip_max"] == float(act.clip_max.detach())
        stage = weight_quantizer(layer)
        assert row.weight_learned["scale"].max == pytest.approx(float(stage.learned_scale.detach().max()), rel=1e-6)
        assert row.weight_bits == 4 and row.unique_values <= 16
    assert report["0"].stages == ("BatchNormScale", "LsqWeightQuantizer")
    assert report["0"].compared_with == "1"           # the conv applies its BatchNorm: compared with the BN
    assert 0 < report["0"].sqnr_db < SQNR_CAP_DB


# -- inputs --------------------------------------------------------------------------------------------------
def test_function_data_and_input_fn_give_the_same_report(ptq):
    fp, q, data, _, report = ptq

    def run(model):
        for x in data:
            model(x)

    by_function = layer_report(q, run, data[0], reference=fp)
    by_dicts = layer_report(q, [{"image": x, "label": 0} for x in data], reference=fp, input_fn=lambda b: b["image"])
    for other in (by_function, by_dicts):
        assert [r.sqnr_db for r in other.rows] == [r.sqnr_db for r in report.rows]
        assert [r.model_cosine for r in other.rows] == [r.model_cosine for r in report.rows]
    assert by_function.settings["batches"] == 3
    few = layer_report(q, data, reference=fp, num_batches=1)
    assert few.settings["batches"] == 1 and few["5"].activation_clipped == 0.0   # batch 0: the calibration batch


def test_plain_float_model_without_data():
    fp = small_net()
    report = layer_report(fp)
    assert [r.name for r in report.rows] == ["0", "3", "5", "8"]
    for row in report.rows:
        assert (row.weight_bits, row.activation_bits, row.wrapper, row.sqnr_db, row.macs) == (32, 32, None, None, None)
        assert row.unique_values == torch.unique(fp.get_submodule(row.name).weight).numel()
    assert any("MACs not counted" in n for n in report.notes)
    assert not report.has_errors


def test_errors_name_what_is_wrong(ptq):
    fp, q, data, _, report = ptq
    with pytest.raises(ValueError, match="allowed: " + ", ".join(PLOT_KINDS)):
        report.plot("bars")
    with pytest.raises(ValueError, match="needs layer="):
        report.plot("histogram")
    with pytest.raises(KeyError, match="no layer 'nope'"):
        report.plot("histogram", layer="nope")
    with pytest.raises(ValueError, match="pass example_inputs="):
        layer_report(q, lambda model: model(data[0]))
    with pytest.raises(ValueError, match="reference is given but data is not"):
        layer_report(q, reference=fp)
    with pytest.raises(ValueError, match="reference must be the float model"):
        layer_report(q, data, reference=q)
    with pytest.raises(ValueError, match="gave no batch"):
        layer_report(q, [])
    with pytest.raises(ValueError, match="num_batches"):
        layer_report(q, data, num_batches=0)
    with pytest.raises(ValueError, match="no layer to report"):
        layer_report(nn.Sequential(nn.ReLU()))
    with pytest.raises(ValueError, match="the report has no SQNR"):
        layer_report(fp).plot("error")
    uncalibrated = amct_torch.quantize(fp, MINMAX, data[0])
    with pytest.raises(CalibrationError, match="not fully calibrated"):
        layer_report(uncalibrated, data)
    assert layer_report(uncalibrated)["0"].activation.calibrated is False   # without data: reported as it is


# -- output ----------------------------------------------------------------------------------------------------
def test_json_round_trip(ptq, tmp_path):
    report = ptq[4]
    path = report.write_json(tmp_path / "r.json")
    assert json.loads(path.read_text()) == report.to_dict()
    back = LayerReport.read_json(path)
    assert back.to_dict() == report.to_dict()
    assert back.rows == report.rows and isinstance(back.rows[0], LayerRow)
    assert back.plot("histogram", layer="3") is not None           # histograms travel with the data
    assert [p for p in tmp_path.iterdir()] == [path]               # no temp file left


def test_markdown_and_html_files(ptq, tmp_path):
    fp, q, data, before, report = ptq
    md = report.write_markdown(tmp_path / "out" / "layers.md", histograms=["3", "8"])
    text = md.read_text()
    linked = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", text)
    assert linked == ["layers_plots/error.png", "layers_plots/sparsity.png", "layers_plots/histogram_3.png",
                      "layers_plots/histogram_8.png"]
    for rel in linked:
        assert (md.parent / rel).read_bytes().startswith(PNG)
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["layers.md", "layers_plots"]
    for row in report.rows:
        assert f"| {row.name} | {row.layer_type} |" in text
    page = report.write_html(tmp_path / "layers.html", histograms=["3"]).read_text()
    images = re.findall(r'src="data:image/png;base64,([^"]+)"', page)
    assert len(images) == 3 and all(base64.b64decode(i).startswith(PNG) for i in images)
    assert page.count("<tr>") == len(report.rows) + 1
    no_plots = report.write_markdown(tmp_path / "bare.md", plots=False)
    assert "![" not in no_plots.read_text() and not (tmp_path / "bare_plots").exists()
    for kind in ("error", "sparsity"):
        fig = report.plot(kind)
        assert len(fig.axes[0].patches) >= len(report.rows)
    assert_unchanged(q, before)
    assert "SQNR dB" in report.table() and str(report) == report.table()

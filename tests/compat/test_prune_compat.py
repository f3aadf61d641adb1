"""AMCT's pruning functions end to end: channel and 4:2 pruning from a retrain .cfg, saving to ONNX, restoring
from a checkpoint, the record's prune records, skip lists, errors, the automatic channel-prune search with
its plug-ins, and prune + QAT in one cfg."""

import copy
import filecmp

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from onnx import numpy_helper

import amct_torch as amct
from amct_torch.analysis import count_flops
from amct_torch.config import ConfigError, read_record

CHANNEL_CFG = ("prune_config { filter_pruner { balanced_l2_norm_filter_prune { prune_ratio: 0.5 ascend_optimized: false } } }\n"
               'regular_prune_skip_layers: "fc"\n')
NM_CFG = ("prune_config { n_out_of_m_pruner { l1_selective_prune { n_out_of_m_type: M4N2 update_freq: 0 } } }\n"
          'regular_prune_skip_types: "Linear"\n')


class Net(nn.Module):
    """conv1 and conv3 are added (one dependency group); conv2 reads conv1's channels; fc reads the sum."""

    def __init__(self):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16)
        self.conv2, self.bn2 = nn.Conv2d(16, 32, 3, padding=1), nn.BatchNorm2d(32)
        self.conv3, self.bn3 = nn.Conv2d(32, 16, 3, padding=1), nn.BatchNorm2d(16)
        self.pool = nn.AdaptiveAvgPool2d(2)
        self.fc = nn.Linear(16 * 4, 5)

    def forward(self, x):
        x = F.relu(self.bn1(self.conv1(x)))
        y = F.relu(self.bn2(self.conv2(x)))
        x = F.relu(x + self.bn3(self.conv3(y)))
        return self.fc(torch.flatten(self.pool(x), 1))


def batches(n, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(8, 3, 8, 8, generator=g), torch.randint(0, 5, (8,), generator=g)) for _ in range(n)]


def train(model, data, lr=0.05):
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    model.train()
    for x, y in data:
        optimizer.zero_grad()
        F.cross_entropy(model(x), y).backward()
        optimizer.step()


def onnx_output(path, x):
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]


@pytest.fixture
def model():
    torch.manual_seed(0)
    return Net()


def test_amct_channel_prune_script_runs_unchanged(model, tmp_path):
    (tmp_path / "prune.cfg").write_text(CHANNEL_CFG)
    original = copy.deepcopy(model.state_dict())
    # -- an AMCT user's script (amct.md 1.3), only the paths changed --------------------------------------
    input_data = torch.randn(1, 3, 8, 8)
    record_file = str(tmp_path / "tmp/record.txt")
    pruned = amct.create_prune_retrain_model(model, input_data, str(tmp_path / "prune.cfg"), record_file)
    train(pruned, batches(3))
    torch.save({"state_dict": pruned.state_dict(), "epoch": 1}, str(tmp_path / "tmp/pruned.pth"))
    amct.save_prune_retrain_model(pruned, str(tmp_path / "results/user_model"), input_data, input_names=["input"],
                                  output_names=["logits"], dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}})
    restored = amct.restore_prune_retrain_model(Net(), input_data, record_file, str(tmp_path / "prune.cfg"),
                                                str(tmp_path / "tmp/pruned.pth"), state_dict_name="state_dict")
    # ------------------------------------------------------------------------------------------------------
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in original.items())     # the user's model
    # physically smaller: conv1+conv3 (one group) and conv2 keep half; bn follow; fc loses input features
    assert (pruned.conv1.out_channels, pruned.conv2.out_channels, pruned.conv3.out_channels) == (8, 16, 8)
    assert (pruned.bn1.num_features, pruned.bn2.num_features, pruned.fc.in_features) == (8, 16, 32)
    assert count_flops(pruned, input_data).total_macs < 0.35 * count_flops(model, input_data).total_macs
    report = pruned.amct_prune_report
    assert report.rows["conv1"] == ("channel prune", "8/16 output channels kept (group 0, prune_ratio 0.5, prune_config)")
    assert report.rows["fc"] == ("skip", "in regular_prune_skip_layers; input channels shrink with group 0")
    # both ONNX files: the same plain float model, running in ONNX Runtime as the PyTorch model does
    fake, deploy = tmp_path / "results/user_model_fake_quant_model.onnx", tmp_path / "results/user_model_deploy_model.onnx"
    assert filecmp.cmp(fake, deploy, shallow=False)
    graph = onnx.load(str(deploy)).graph
    assert {n.op_type for n in graph.node}.isdisjoint({"QuantizeLinear", "DequantizeLinear"})
    assert {"conv1", "conv2", "conv3", "fc"} <= {n.name for n in graph.node}
    assert [i.name for i in graph.input] == ["input"] and [o.name for o in graph.output] == ["logits"]
    x = torch.randn(4, 3, 8, 8)
    pruned.eval()
    with torch.no_grad():
        expected = pruned(x)
    np.testing.assert_allclose(onnx_output(deploy, x), expected.numpy(), rtol=1e-4, atol=1e-5)
    # restored from the float model + cfg + record + checkpoint: the same model
    restored.eval()
    with torch.no_grad():
        assert torch.equal(restored(x), expected)
    assert restored.state_dict().keys() == pruned.state_dict().keys()


def test_the_prune_records_round_trip_through_the_record_file(model, tmp_path):
    (tmp_path / "prune.cfg").write_text(CHANNEL_CFG)
    record_file = tmp_path / "record.txt"
    amct.create_prune_retrain_model(model, torch.randn(1, 3, 8, 8), tmp_path / "prune.cfg", record_file)
    text = record_file.read_text()
    assert text.startswith("prune_record {") and "record {" not in text.replace("prune_record {", "")
    records = read_record(record_file).prune_records
    by_producers = {tuple(n["name"] for n in r["producer"]): r for r in records}
    assert set(by_producers) == {("conv1", "conv3"), ("conv2",)}
    residual = by_producers[("conv1", "conv3")]
    assert residual["producer"][0] == {"name": "conv1", "attrs": {"type": "Conv2d", "begin": 0, "end": 16}}
    consumers = {n["name"]: n["attrs"] for n in residual["consumer"]}
    assert consumers == {"bn1": {"type": "BatchNorm2d", "begin": 0, "end": 16},
                         "bn3": {"type": "BatchNorm2d", "begin": 0, "end": 16},
                         "conv2": {"type": "Conv2d", "begin": 0, "end": 16},
                         "fc": {"type": "Linear", "begin": 0, "end": 64}}    # after flatten: 16 channels x 2x2
    rewritten = tmp_path / "again.txt"
    amct.config.write_record(read_record(record_file), rewritten)
    assert rewritten.read_text() == text


def test_4_2_through_the_cfg_keeps_exactly_2_of_every_4_input_weights(model, tmp_path):
    (tmp_path / "nm.cfg").write_text(NM_CFG + 'override_layer_configs { layer_name: "conv3" prune_config { '
                                              "n_out_of_m_pruner { l1_selective_prune { update_freq: 2 } } } }\n")
    x = torch.randn(1, 3, 8, 8)
    pruned = amct.create_prune_retrain_model(model, x, tmp_path / "nm.cfg", tmp_path / "record.txt")
    assert pruned.amct_prune_report.pruned("4:2") == ["conv1", "conv2", "conv3"]
    stages = {name: pruned.get_submodule(name).weight_pipeline[0] for name in ("conv2", "conv3")}
    assert (stages["conv2"].update_freq, stages["conv3"].update_freq) == (0, 2)
    assert pruned.amct_prune_report.rows["fc"] == ("skip", "in regular_prune_skip_types")
    selective = [r["selective_prune"] for r in read_record(tmp_path / "record.txt").prune_records]
    assert {s["name"]: s["attrs"]["mask_shape"] for s in selective} == {
        "conv1": [16, 3, 3, 3], "conv2": [32, 16, 3, 3], "conv3": [16, 32, 3, 3]}
    masks = {name: stage.mask.clone() for name, stage in stages.items()}
    train(pruned, batches(3))
    assert torch.equal(stages["conv2"].mask, masks["conv2"])           # update_freq 0: fixed after batch 1
    assert not torch.equal(stages["conv3"].mask, masks["conv3"])       # update_freq 2: recomputed at batch 2
    torch.save(pruned.state_dict(), tmp_path / "nm.pth")
    amct.save_prune_retrain_model(pruned, tmp_path / "out/nm", x)
    weights = {t.name: numpy_helper.to_array(t) for t in onnx.load(str(tmp_path / "out/nm_deploy_model.onnx")).graph.initializer}
    for name in ("conv2.weight", "conv3.weight"):           # C_in 16 and 32: every group of 4 keeps exactly 2
        blocks = weights[name].transpose(0, 2, 3, 1).reshape(-1, 4)
        assert ((blocks != 0).sum(1) == 2).all(), name
    conv1 = weights["conv1.weight"]                          # C_in 3, padded to 4: 2 of the 3 real weights
    assert ((conv1 != 0).sum(1) == 2).all()
    assert (weights["fc.weight"] != 0).all()
    pruned.eval()
    x4 = torch.randn(4, 3, 8, 8)
    with torch.no_grad():
        expected = pruned(x4)
        np.testing.assert_allclose(onnx_output(tmp_path / "out/nm_fake_quant_model.onnx", x), pruned(x).numpy(),
                                   rtol=1e-4, atol=1e-5)
    restored = amct.restore_prune_retrain_model(Net(), x, tmp_path / "record.txt", tmp_path / "nm.cfg",
                                                tmp_path / "nm.pth").eval()
    with torch.no_grad():
        assert torch.equal(restored(x4), expected)


def test_skip_lists_and_overrides_decide_per_layer_and_are_reported(model, tmp_path):
    cfg = ("prune_config { filter_pruner { balanced_l2_norm_filter_prune { prune_ratio: 0.5 ascend_optimized: false } } }\n"
           'skip_layers: "conv3"\n'
           'override_layer_configs { layer_name: "conv2" prune_config { filter_pruner {\n'
           "    balanced_l2_norm_filter_prune { prune_ratio: 0.25 ascend_optimized: false } } } }\n")
    pruned = amct.create_prune_retrain_model(model, torch.randn(1, 3, 8, 8), cfg, tmp_path / "record.txt")
    rows = pruned.amct_prune_report.rows
    assert rows["conv3"][0] == "skip" and rows["conv3"][1].startswith("in skip_layers")
    assert rows["conv1"] == ("keep", "skipped (conv3 in skip list)")      # conv1 is added to conv3: stays whole
    assert rows["conv2"] == ("channel prune", "24/32 output channels kept (group 1, prune_ratio 0.25, "
                                              "override_layer_configs[0])")
    assert (pruned.conv1.out_channels, pruned.conv2.out_channels, pruned.conv3.in_channels) == (16, 24, 24)
    producers = [[n["name"] for n in r["producer"]] for r in read_record(tmp_path / "record.txt").prune_records]
    assert producers == [["conv2"]]
    text = str(pruned.amct_prune_report)
    assert text.splitlines()[0] == "prune: 1 layers channel-pruned, 0 4:2, 3 left as they are"


def test_ascend_optimized_rounds_kept_channels_up_to_16(model, tmp_path):
    cfg = "prune_config { filter_pruner { balanced_l2_norm_filter_prune { prune_ratio: 0.3 } } }"  # default: true
    pruned = amct.create_prune_retrain_model(model, torch.randn(1, 3, 8, 8), cfg, tmp_path / "record.txt")
    assert pruned.conv2.out_channels == 32      # 32 * 0.7 = 22.4 -> 23 -> rounded up to 32: nothing pruned
    assert pruned.amct_prune_report.rows["conv2"][0] == "keep"
    cfg = "prune_config { filter_pruner { balanced_l2_norm_filter_prune { prune_ratio: 0.6 } } }"
    pruned = amct.create_prune_retrain_model(model, torch.randn(1, 3, 8, 8), cfg, tmp_path / "record.txt")
    assert pruned.conv2.out_channels == 16      # 32 * 0.4 = 12.8 -> 13 -> 16


@pytest.mark.parametrize("cfg, match", [
    ("prune_config { filter_pruner { balanced_l2_norm_filter_prune { prune_rate: 0.3 } } }",
     r"prune\.cfg: line 1, column \d+: got 'prune_rate'; allowed: a field of BalancedL2NormFilterPruner"),
    ("prune_config { filter_pruner { balanced_l2_norm_filter_prune { prune_ratio: 1.5 } } }",
     r"prune\.cfg: prune_config\.filter_pruner\.balanced_l2_norm_filter_prune\.prune_ratio: got 1\.5; allowed: a "
     r"fraction"),
    ('prune_config { filter_pruner { balanced_l2_norm_filter_prune { prune_ratio: 0.3 } } }\n'
     'regular_prune_skip_layers: "conv9"', r"prune\.cfg: regular_prune_skip_layers\[0\]: got 'conv9'; allowed: a "
                                            r"layer of the model with a weight \(conv1, conv2, conv3, fc\)"),
    ('retrain_weight_quant_config { arq_retrain { channel_wise: true } }',
     r"prune\.cfg: prune_config: got None; allowed: a prune_config"),
    ("prune_config { }", r"prune\.cfg: prune_config: got '\{\}'; allowed: filter_pruner"),
    ('override_layer_types { layer_type: "Linear" prune_config { n_out_of_m_pruner { l1_selective_prune { } } } }\n'
     'override_layer_types { layer_type: "BatchNorm2d" prune_config { filter_pruner { balanced_l2_norm_filter_prune '
     '{ prune_ratio: 0.3 } } } }',
     r"prune\.cfg: override_layer_types\[1\]\.layer_type: got 'BatchNorm2d'; allowed: a type AMCT's channel "
     r"\(filter\) pruning takes: Conv2d, Linear"),
])
def test_cfg_errors_name_the_file_and_the_key(model, tmp_path, cfg, match):
    (tmp_path / "prune.cfg").write_text(cfg)
    with pytest.raises(ConfigError, match=match):
        amct.create_prune_retrain_model(model, torch.randn(1, 3, 8, 8), str(tmp_path / "prune.cfg"),
                                        tmp_path / "record.txt")
    assert not (tmp_path / "record.txt").exists()


def test_restore_refuses_a_checkpoint_or_record_of_another_pruning(model, tmp_path):
    x = torch.randn(1, 3, 8, 8)
    (tmp_path / "half.cfg").write_text(CHANNEL_CFG)
    (tmp_path / "quarter.cfg").write_text(CHANNEL_CFG.replace("0.5", "0.25"))
    half = amct.create_prune_retrain_model(model, x, tmp_path / "half.cfg", tmp_path / "half.txt")
    amct.create_prune_retrain_model(model, x, tmp_path / "quarter.cfg", tmp_path / "quarter.txt")
    torch.save(half.state_dict(), tmp_path / "half.pth")
    with pytest.raises(KeyError, match=r"other shapes: conv1\.weight: \(8, 3, 3, 3\) in the file, \(12, 3, 3, 3\) in "
                                       r"the model"):
        amct.restore_prune_retrain_model(Net(), x, tmp_path / "quarter.txt", tmp_path / "quarter.cfg",
                                         tmp_path / "half.pth")
    (tmp_path / "nm.cfg").write_text(NM_CFG)
    with pytest.raises(ConfigError, match=r"half\.txt: prune_record: got 'conv1\+conv3, conv2'; allowed: the prune "
                                          r"records of this model and .*nm\.cfg: conv1, conv2, conv3"):
        amct.restore_prune_retrain_model(Net(), x, tmp_path / "half.txt", tmp_path / "nm.cfg", tmp_path / "half.pth")
    with pytest.raises(ValueError, match="pruned-only model was expected"):
        qat = amct.prepare_qat(half, amct.QatConfig(), x)
        amct.save_prune_retrain_model(qat, tmp_path / "out/m", x)
    assert not (tmp_path / "out").exists()


def test_auto_channel_prune_search_writes_a_cfg_that_create_reads(model, tmp_path):
    data, label = torch.randn(16, 3, 8, 8), torch.randint(0, 5, (16,))
    (tmp_path / "skip.cfg").write_text('regular_prune_skip_layers: "conv2"\n')
    (tmp_path / "auto.cfg").write_text("compress_ratio: 1.25 ascend_optimized: false max_prune_ratio: 0.8 "
                                       'test_iteration: 1 override_prune_cfg: "skip.cfg"\n')
    plan = amct.auto_channel_prune_search(model, str(tmp_path / "auto.cfg"), [data, label], str(tmp_path / "out.cfg"))
    assert "conv2" not in plan.kept() and plan.info.skipped["conv2"].startswith("skipped (conv2")
    assert plan.macs_fraction <= 0.8
    text = (tmp_path / "out.cfg").read_text()
    assert 'regular_prune_skip_layers: "conv2"' in text and "override_layer_configs" in text
    x = torch.randn(1, 3, 8, 8)
    pruned = amct.create_prune_retrain_model(model, x, str(tmp_path / "out.cfg"), tmp_path / "record.txt")
    assert count_flops(pruned, x).total_macs <= 0.8 * count_flops(model, x).total_macs
    for name, (kept, _) in plan.kept().items():
        assert pruned.get_submodule(name).out_channels == kept
    with pytest.raises(ConfigError, match=r"auto\.cfg: compress_ratio: got 0\.5; allowed: a ratio > 1"):
        (tmp_path / "auto.cfg").write_text("compress_ratio: 0.5\n")
        amct.auto_channel_prune_search(model, str(tmp_path / "auto.cfg"), [data, label], str(tmp_path / "x.cfg"))


def test_a_user_sensitivity_and_search_plug_in(model, tmp_path):
    data, label = torch.randn(8, 3, 8, 8), torch.randint(0, 5, (8,))
    (tmp_path / "auto.cfg").write_text("compress_ratio: 1.1 ascend_optimized: false\n")

    class Ranked(amct.SensitivityBase):
        def get_sensitivity(self, search_records):
            self.called = (self.test_iteration, [r.producers for r in search_records])
            for r in search_records:
                r.sensitivity = np.arange(r.channels, dtype=float)     # later channels matter more

    class FirstHalf(amct.SearchChannelBase):
        def channel_prune_search(self, graph_info, search_records, prune_config):
            self.seen = (graph_info.target_macs / graph_info.dense_macs, prune_config.ascend_optimized)
            record = next(r for r in search_records if r.producers == ["conv2"])
            order = np.argsort(-record.sensitivity, kind="stable")
            mask = np.zeros(record.channels, int)
            mask[order[:8]] = 1
            return {"conv2": mask.tolist()}

    sensitivity, search = Ranked(), FirstHalf()
    plan = amct.auto_channel_prune_search(model, str(tmp_path / "auto.cfg"), [data, label], str(tmp_path / "out.cfg"),
                                          sensitivity=sensitivity, search_alg=search)
    assert sensitivity.called == (1, [["conv1", "conv3"], ["conv2"]])
    assert search.seen == (pytest.approx(1 / 1.1), False)
    assert plan.ratios() == {"conv2": 0.75}
    assert plan.keep[1].tolist() == list(range(24, 32))
    assert "prune_ratio: 0.75" in (tmp_path / "out.cfg").read_text()

    class Broken(amct.SearchChannelBase):
        def channel_prune_search(self, graph_info, search_records, prune_config):
            return {"conv1": [1, 0, 1]}

    with pytest.raises(ValueError, match=r"Broken\.channel_prune_search: mask of 'conv1': got 3 values; allowed: 16"):
        amct.auto_channel_prune_search(model, str(tmp_path / "auto.cfg"), [data, label], str(tmp_path / "bad.cfg"),
                                       search_alg=Broken)
    assert not (tmp_path / "bad.cfg").exists()
    with pytest.raises(ConfigError, match="'TaylorLossSensitivity' or a SensitivityBase subclass"):
        amct.auto_channel_prune_search(model, str(tmp_path / "auto.cfg"), [data, label], str(tmp_path / "bad.cfg"),
                                       sensitivity="Hessian")


@pytest.mark.parametrize("prune", [
    "filter_pruner { balanced_l2_norm_filter_prune { prune_ratio: 0.5 ascend_optimized: false } }",
    "n_out_of_m_pruner { l1_selective_prune { n_out_of_m_type: M4N2 } }"])
def test_prune_then_int8_qat_from_one_cfg(model, tmp_path, prune):
    cfg = tmp_path / "compressed.cfg"
    cfg.write_text("retrain_data_quant_config { ulq_quantize { dst_type: INT8 } }\n"
                   "retrain_weight_quant_config { arq_retrain { channel_wise: true dst_type: INT8 } }\n"
                   f"prune_config {{ {prune} }}\n")
    x = torch.randn(1, 3, 8, 8)
    record_file = tmp_path / "record.txt"
    qat = amct.create_compressed_retrain_model(model, x, cfg, record_file)
    train(qat, batches(2), lr=0.01)
    torch.save(qat.state_dict(), tmp_path / "qat.pth")
    amct.save_compressed_retrain_model(qat, record_file, tmp_path / "out/model", x)
    record = read_record(record_file)
    assert set(record.layers) == {"conv1", "conv2", "conv3", "fc"} and record.prune_records   # factors + prune
    weights = {t.name: numpy_helper.to_array(t)
               for t in onnx.load(str(tmp_path / "out/model_fake_quant_model.onnx")).graph.initializer}
    assert weights["conv2.weight"].dtype == np.int8
    if "n_out_of_m" in prune:
        blocks = weights["conv2.weight"].transpose(0, 2, 3, 1).reshape(-1, 4)
        assert ((blocks != 0).sum(1) <= 2).all()
    else:
        assert weights["conv2.weight"].shape == (16, 8, 3, 3)
    assert (tmp_path / "out/model_deploy_model.onnx").exists()
    restored = amct.restore_compressed_retrain_model(Net(), x, cfg, record_file, tmp_path / "qat.pth").eval()
    qat.eval()
    x4 = torch.randn(4, 3, 8, 8)
    with torch.no_grad():
        assert torch.equal(restored(x4), qat(x4))

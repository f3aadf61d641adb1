"""AMCT's distillation functions end to end: config (JSON and .cfg), compressed model, distill, save to ONNX."""

import copy
import json
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch
import torch.nn as nn

from amct_torch.compat.distill import (DistillSampleBase, ModelSingleTensorInput, create_distill_config,
                                       create_distill_model, distill, save_distill_model)
from amct_torch.config import ConfigError, read_record
from amct_torch.quant import CalibrationError
from amct_torch.quant.ptq import quant_layers
from amct_torch.quant.qat_modules import LearnedActivationQuantizer
from amct_torch.zoo.models import BasicBlock
from reference_nets import randomize_bn_

X = torch.randn(1, 3, 8, 8)


class SmallResNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1, self.bn1, self.relu = nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU()
        self.layer1, self.layer2 = BasicBlock(8, 8, 1), BasicBlock(8, 16, 2)
        self.pool, self.fc = nn.AdaptiveAvgPool2d(1), nn.Linear(16, 5)

    def forward(self, x):
        x = self.layer2(self.layer1(self.relu(self.bn1(self.conv1(x)))))
        return self.fc(torch.flatten(self.pool(x), 1))


def loader(n=32, batch_size=8, seed=3):
    g = torch.Generator().manual_seed(seed)
    ds = torch.utils.data.TensorDataset(torch.randn(n, 3, 8, 8, generator=g), torch.randint(0, 5, (n,), generator=g))
    return torch.utils.data.DataLoader(ds, batch_size=batch_size)


@pytest.fixture
def model():
    torch.manual_seed(0)
    return randomize_bn_(SmallResNet()).eval()


def test_amct_user_script_runs_unchanged(model, tmp_path):
    # -- an AMCT user's script (amct.md 1.6), only the paths changed ------------------------------------------
    import amct_torch.compat.distill as amct

    config_file = str(tmp_path / "tmp/distill.json")
    amct.create_distill_config(config_file, model, X)
    compress_model = amct.create_distill_model(config_file, model, X)
    distill_model = amct.distill(model, compress_model, config_file, loader(), epochs=1, lr=1e-3)
    amct.save_distill_model(distill_model, str(tmp_path / "results/user_model"), X)
    # ----------------------------------------------------------------------------------------------------------
    cfg = json.loads(Path(config_file).read_text())
    assert (cfg["version"], cfg["batch_num"], cfg["group_size"], cfg["data_dump"]) == (1, 1, 1, False)
    assert cfg["distill_group"] == [["conv1", "bn1", "relu"], ["layer1"], ["layer2"], ["fc"]]
    layers = [k for k in cfg if isinstance(cfg[k], dict)]
    assert layers == ["conv1", "layer1.conv1", "layer1.conv2", "layer2.conv1", "layer2.conv2", "layer2.downsample.0",
                      "fc"]
    assert cfg["conv1"] == {"quant_enable": True, "distill_data_config": {"algo": "ulq_quantize", "dst_type": "INT8"},
                            "distill_weight_config": {"algo": "arq_distill", "channel_wise": True, "dst_type": "INT8"}}
    assert cfg["fc"]["distill_weight_config"]["channel_wise"] is False

    assert distill_model is compress_model
    report = compress_model.amct_distill_report
    assert [b.name for b in report.blocks] == ["conv1..relu", "layer1", "layer2", "fc"]
    assert all(b.steps == 4 or "reverted" in b.note for b in report.blocks)
    assert all(q.is_calibrated for q in compress_model.modules() if isinstance(q, LearnedActivationQuantizer))

    fake = tmp_path / "results/user_model_fake_quant_model.onnx"
    assert (tmp_path / "results/user_model_deploy_model.onnx").exists()
    record = read_record(tmp_path / "results/user_model_record.txt")
    assert set(record.layers) == set(layers)
    sess = ort.InferenceSession(str(fake))
    x = torch.randn(4, 3, 8, 8)
    y_ort = sess.run(None, {sess.get_inputs()[0].name: x[:1].numpy()})[0]
    compress_model.eval()
    with torch.no_grad():
        y_torch = compress_model(x[:1]).numpy()
    assert np.abs(y_ort - y_torch).max() < 0.05 * np.abs(y_torch).max() + 1e-3


def test_model_is_not_changed_and_distill_moves_the_student(model, tmp_path):
    config_file = tmp_path / "d.json"
    create_distill_config(config_file, model, X)
    state = copy.deepcopy(model.state_dict())
    student = create_distill_model(config_file, model, X)
    assert student.training and student is not model
    before = {n: p.detach().clone() for n, p in student.named_parameters()}
    distill(model, student, str(config_file), loader(16), epochs=2)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())
    assert not model.training and student.training  # modes restored
    assert any(not torch.equal(before[n], p) for n, p in student.named_parameters())


CFG = """
batch_num: 2
group_size: 2
distill_group { start_layer_name: "conv1" end_layer_name: "relu" }
distill_group { start_layer_name: "layer1" end_layer_name: "layer1" }
distill_group { start_layer_name: "layer2.conv1" end_layer_name: "layer2.bn2" }
distill_data_quant_config { ulq_quantize { dst_type: INT8 } }
distill_weight_quant_config { arq_distill { dst_type: INT4 } }
distill_override_layer_types { layer_type: "Linear" distill_weight_quant_config { ulq_distill { dst_type: INT8 } } }
quant_skip_layers: "layer2.downsample.0"
"""


def test_cfg_variant(model, tmp_path):
    cfg_file = tmp_path / "distill.cfg"
    cfg_file.write_text(CFG)
    config_file = tmp_path / "d.json"
    create_distill_config(str(config_file), model, X, config_defination=str(cfg_file))
    cfg = json.loads(config_file.read_text())
    assert (cfg["batch_num"], cfg["group_size"]) == (2, 2)
    # start .. end with the modules called in between (AMCT's form: start first, end last)
    assert cfg["distill_group"] == [["conv1", "bn1", "relu"], ["layer1"],
                                    ["layer2.conv1", "layer2.bn1", "layer2.relu1", "layer2.conv2", "layer2.bn2"]]
    assert cfg["layer2.downsample.0"] == {"quant_enable": False}
    assert cfg["conv1"]["distill_weight_config"]["dst_type"] == "INT4"
    assert cfg["fc"]["distill_weight_config"] == {"algo": "ulq_distill", "channel_wise": False, "dst_type": "INT8"}
    student = create_distill_model(config_file, model, X)
    assert "layer2.downsample.0" not in quant_layers(student) and "layer2.conv1" in quant_layers(student)
    distill(model, student, str(config_file), loader(16))
    report = student.amct_distill_report
    # group_size 2: (stem, layer1), (layer2 without its shortcut)
    assert [b.name for b in report.blocks] == ["conv1..layer1", "layer2.conv1..layer2.bn2"]
    qs = [q for q in student.modules() if isinstance(q, LearnedActivationQuantizer) and q.tied_to is None]
    assert all(q.is_calibrated and int(q.batches_seen) == 2 for q in qs)  # batch_num 2
    # the same cfg given as text
    create_distill_config(str(tmp_path / "e.json"), model, X, config_definition=CFG)
    assert json.loads((tmp_path / "e.json").read_text()) == cfg


class DictSample(DistillSampleBase):
    calls = 0

    @staticmethod
    def get_model_input_data(samples):
        DictSample.calls += 1
        return samples["image"]


def test_sample_instance_and_optimizer(model, tmp_path):
    config_file = str(tmp_path / "d.json")
    create_distill_config(config_file, model, X)
    student = create_distill_model(config_file, model, X)
    g = torch.Generator().manual_seed(0)
    samples = [{"image": torch.randn(8, 3, 8, 8, generator=g), "label": torch.zeros(8)} for _ in range(2)]
    sgd = torch.optim.SGD(student.parameters(), lr=1e-3, momentum=0.9)
    distill(model, student, config_file, samples, sample_instance=DictSample(), optimizer=sgd, loss=nn.L1Loss())
    assert DictSample.calls > 8
    assert all(b.steps == 2 or "reverted" in b.note for b in student.amct_distill_report.blocks)
    with pytest.raises(ValueError, match="no tensor"):
        ModelSingleTensorInput.get_model_input_data({"image": X})
    with pytest.raises(NotImplementedError):
        DistillSampleBase.get_model_input_data(X)


def test_bad_input(model, tmp_path):
    config_file = str(tmp_path / "d.json")
    create_distill_config(config_file, model, X)
    student = create_distill_model(config_file, model, X)
    with pytest.raises(TypeError, match="DistillSampleBase"):
        distill(model, student, config_file, loader(8), sample_instance=lambda s: s[0])
    with pytest.raises(ValueError, match="epochs"):
        distill(model, student, config_file, loader(8), epochs=0)
    with pytest.raises(ValueError, match="lr"):
        distill(model, student, config_file, loader(8), lr=-1.0)
    with pytest.raises(ConfigError, match="pass the model create_distill_model returned"):
        distill(model, model, config_file, loader(8))
    with pytest.raises(CalibrationError, match="not initialised yet; nothing was written"):
        save_distill_model(student, str(tmp_path / "out/m"), X)
    assert not (tmp_path / "out").exists()
    with pytest.raises(ConfigError, match="a compressed model"):
        save_distill_model(model, str(tmp_path / "out/m"), X)
    # a group naming a module the model lacks
    cfg = json.loads(Path(config_file).read_text())
    cfg["distill_group"][1] = ["layer9"]
    Path(config_file).write_text(json.dumps(cfg))
    with pytest.raises(ConfigError, match=r"distill_group\[1\]\[0\]: got 'layer9'"):
        distill(model, student, config_file, loader(8))
    bad_cfg = 'distill_group { start_layer_name: "relu" end_layer_name: "conv1" }'
    with pytest.raises(ConfigError, match=r"distill_group\[0\].*'conv1' runs before 'relu'"):
        create_distill_config(str(tmp_path / "x.json"), model, X, config_defination=bad_cfg)
    with pytest.raises(ConfigError, match="layers AMCT distills"):
        create_distill_config(str(tmp_path / "x.json"), nn.Sequential(nn.ReLU()), X)
    with pytest.raises(ConfigError, match="every distillable layer is skipped"):
        create_distill_config(str(tmp_path / "x.json"), model, X,
                              config_defination='quant_skip_layer_types: "Conv2d" quant_skip_layer_types: "Linear"')

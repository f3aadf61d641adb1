"""AMCT's QAT (retrain) functions end to end: config, trainable model, save to ONNX, restore from a checkpoint."""

import copy
import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import amct_torch as amct
from amct_torch.config import ConfigError, QatConfig, read_record
from amct_torch.quant import UlqActivationQuantizer, UlqWeightQuantizer, qat_quantizers


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 8, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(8)
        self.relu = nn.ReLU()
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.relu(self.conv2(x))
        return self.fc(torch.flatten(self.pool(x), 1))


def batches(n, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(8, 1, 8, 8, generator=g), torch.randint(0, 4, (8,), generator=g)) for _ in range(n)]


@pytest.fixture
def model():
    torch.manual_seed(0)
    return Net()


def train(model, data, lr=0.05):
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    model.train()
    for x, y in data:
        optimizer.zero_grad()
        F.cross_entropy(model(x), y).backward()
        optimizer.step()


def test_amct_user_script_runs_unchanged(model, tmp_path):
    # -- an AMCT user's script (amct.md 1.2), only the paths changed --------------------------------------
    import amct_torch as amct

    input_data = torch.randn(1, 1, 8, 8)
    config_file, record_file = str(tmp_path / "tmp/config.json"), str(tmp_path / "tmp/record.txt")
    amct.create_quant_retrain_config(config_file=config_file, model=model, input_data=input_data)
    quant_retrain_model = amct.create_quant_retrain_model(config_file, model, record_file, input_data)
    optimizer = torch.optim.SGD(quant_retrain_model.parameters(), lr=0.05, momentum=0.9)
    for x, y in batches(4):
        optimizer.zero_grad()
        loss = F.cross_entropy(quant_retrain_model(x), y)
        loss.backward()
        optimizer.step()
    torch.save({"state_dict": quant_retrain_model.state_dict(), "epoch": 1}, str(tmp_path / "tmp/checkpoint.pth"))
    before = copy.deepcopy(quant_retrain_model.state_dict())
    amct.save_quant_retrain_model(config_file, quant_retrain_model, record_file, str(tmp_path / "results/user_model"),
                                  input_data)
    restored = amct.restore_quant_retrain_model(config_file, Net(), record_file, input_data,
                                                str(tmp_path / "tmp/checkpoint.pth"), state_dict_name="state_dict")
    # ------------------------------------------------------------------------------------------------------
    cfg = json.loads(open(config_file).read())
    assert cfg["version"] == 1 and cfg["batch_num"] == 1
    assert {k for k in cfg if isinstance(cfg[k], dict)} == {"conv1", "conv2", "fc"}
    assert cfg["conv1"]["retrain_data_config"] == {"algo": "ulq_quantize", "dst_type": "INT8"}
    assert cfg["conv1"]["retrain_weight_config"] == {"algo": "arq_retrain", "channel_wise": True, "dst_type": "INT8"}
    assert cfg["fc"]["retrain_weight_config"]["channel_wise"] is False           # AMCT: LinearQAT no channel-wise
    assert model.training and not isinstance(model.conv1, amct.CompressedLayer)  # the user's model is untouched
    assert quant_retrain_model.amct_record_file.name == "record.txt"
    after = quant_retrain_model.state_dict()  # save exported a copy: the QAT model is as it was
    assert quant_retrain_model.training and all(torch.equal(before[k], after[k]) for k in before)

    record = read_record(record_file)
    assert set(record.layers) == {"conv1", "conv2", "fc"}
    assert record.layers["conv2"].scale_d == float(quant_retrain_model.conv2.input_quantizer.scale)
    assert len(record.layers["conv1"].scale_w) == 8 and len(record.layers["fc"].scale_w) == 1

    fake = tmp_path / "results/user_model_fake_quant_model.onnx"
    deploy = tmp_path / "results/user_model_deploy_model.onnx"
    assert {"AscendQuant", "AscendDequant"} <= {n.op_type for n in onnx.load(str(deploy)).graph.node}
    sess = ort.InferenceSession(str(fake))
    probe = batches(1, seed=7)[0][0]
    y_ort = sess.run(None, {sess.get_inputs()[0].name: probe[:1].numpy()})[0]
    quant_retrain_model.eval()
    with torch.no_grad():
        y_torch = quant_retrain_model(probe[:1]).numpy()
        y_restored = restored.eval()(probe[:1]).numpy()
    assert np.array_equal(y_ort.argmax(1), y_torch.argmax(1))
    assert np.abs(y_ort - y_torch).max() < 0.05 * np.abs(y_torch).max() + 1e-3
    assert np.array_equal(y_restored, y_torch)


class ResidualNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1, self.conv2, self.fc = nn.Conv2d(1, 4, 3, padding=1), nn.Conv2d(4, 4, 3, padding=1), nn.Linear(4, 2)

    def forward(self, x):
        x = F.relu(self.conv1(x))
        x = F.relu(self.conv2(x) + x)
        return self.fc(x.mean(dim=(2, 3)))


def test_quantizers_sit_on_layer_inputs_only(tmp_path):
    x = torch.randn(2, 1, 6, 6)
    amct.create_quant_retrain_config(tmp_path / "c.json", ResidualNet(), x)
    qat = amct.create_quant_retrain_model(tmp_path / "c.json", ResidualNet(), tmp_path / "r.txt", x)
    # AMCT's placement: no quantizer on the residual add or on layer outputs (prepare_qat's "auto" adds them)
    assert set(qat_quantizers(qat)) == {"conv1.input_quantizer", "conv1.weight_pipeline.0", "conv2.input_quantizer",
                                        "conv2.weight_pipeline.0", "fc.input_quantizer", "fc.weight_pipeline.0"}


def test_restore_reproduces_the_saved_model_exactly(model, tmp_path):
    x = batches(1)[0][0]
    amct.create_quant_retrain_config(tmp_path / "c.json", model, x)
    qat = amct.create_quant_retrain_model(tmp_path / "c.json", model, tmp_path / "r.txt", x)
    train(qat, batches(3))
    torch.save(qat.state_dict(), tmp_path / "plain.pth")
    torch.save({f"module.{k}": v for k, v in qat.state_dict().items()}, tmp_path / "ddp.pth")  # saved from DDP
    probe = batches(1, seed=9)[0][0]
    for pth in ("plain.pth", "ddp.pth"):
        torch.manual_seed(123)
        restored = amct.restore_quant_retrain_model(tmp_path / "c.json", Net(), tmp_path / "r.txt", x, tmp_path / pth)
        for mode in ("train", "eval"):  # train mode: BN batch statistics, learned quantizers; eval: deployed function
            a, b = copy.deepcopy(qat), copy.deepcopy(restored)
            getattr(a, mode)(), getattr(b, mode)()
            assert torch.equal(a(probe), b(probe)), (pth, mode)


def test_restore_with_a_checkpoint_of_another_config_names_the_keys(model, tmp_path):
    x = batches(1)[0][0]
    amct.create_quant_retrain_config(tmp_path / "all.json", model, x)
    amct.create_quant_retrain_config(tmp_path / "no_fc.json", model, x, config_defination='skip_layers: "fc"')
    qat = amct.create_quant_retrain_model(tmp_path / "no_fc.json", model, tmp_path / "r.txt", x)
    torch.save({"net": qat.state_dict()}, tmp_path / "c.pth")
    with pytest.raises(KeyError, match=r"missing keys: .*fc\.input_quantizer\.clip_max.*unexpected keys: fc\.weight"):
        amct.restore_quant_retrain_model(tmp_path / "all.json", model, tmp_path / "r.txt", x, tmp_path / "c.pth",
                                         state_dict_name="net")
    with pytest.raises(KeyError, match=r"state_dict_name 'state_dict' is not in .*it holds: net"):
        amct.restore_quant_retrain_model(tmp_path / "no_fc.json", model, tmp_path / "r.txt", x, tmp_path / "c.pth",
                                         state_dict_name="state_dict")


def test_save_before_batch_num_steps_refuses_and_writes_nothing(model, tmp_path):
    x = batches(1)[0][0]
    amct.create_quant_retrain_config(tmp_path / "c.json", model, x, config_defination="batch_num: 2")
    qat = amct.create_quant_retrain_model(tmp_path / "c.json", model, tmp_path / "r.txt", x)
    train(qat, batches(1))  # one of two initialisation steps
    with pytest.raises(amct.CalibrationError, match=r"not initialised yet; nothing was written.*conv1\.input_quantizer "
                                                    r"\(1/2 batches\).*batch_num training steps"):
        amct.save_quant_retrain_model(tmp_path / "c.json", qat, tmp_path / "r.txt", str(tmp_path / "out/m"), x)
    assert not (tmp_path / "out").exists() and not (tmp_path / "r.txt").exists()
    train(qat, batches(1, seed=2))
    amct.save_quant_retrain_model(tmp_path / "c.json", qat, tmp_path / "r.txt", str(tmp_path / "out/m"), x)
    assert (tmp_path / "out/m_fake_quant_model.onnx").exists() and (tmp_path / "r.txt").exists()


def test_cfg_decides_the_json_and_the_model(model, tmp_path):
    cfg = tmp_path / "retrain.cfg"
    cfg.write_text('batch_num: 3\nquant_skip_layers: "conv2"\n'
                   'retrain_data_quant_config: { ulq_quantize: { clip_max_min: { clip_max: 6.0 clip_min: -6.0 } } }\n'
                   'override_layer_types: { layer_type: "Conv2d" retrain_weight_quant_config: { ulq_retrain: {} } }\n'
                   'override_layer_configs: { layer_name: "fc" retrain_data_quant_config: { ulq_quantize: { '
                   'clip_max_min: { clip_max: 2.0 clip_min: -1.0 } } } }\n')
    x = batches(1)[0][0]
    amct.create_quant_retrain_config(tmp_path / "c.json", model, x, config_definition=str(cfg))
    out = json.loads((tmp_path / "c.json").read_text())
    assert out["batch_num"] == 3 and out["conv2"] == {"retrain_enable": False}
    assert out["conv1"]["retrain_data_config"] == {"algo": "ulq_quantize", "dst_type": "INT8", "clip_max": 6.0,
                                                   "clip_min": -6.0}
    assert out["conv1"]["retrain_weight_config"] == {"algo": "ulq_retrain", "channel_wise": True, "dst_type": "INT8"}
    assert out["fc"]["retrain_data_config"]["clip_max"] == 2.0 and out["fc"]["retrain_data_config"]["clip_min"] == -1.0
    assert out["fc"]["retrain_weight_config"] == {"algo": "arq_retrain", "channel_wise": False, "dst_type": "INT8"}

    qat = amct.create_quant_retrain_model(tmp_path / "c.json", model, tmp_path / "r.txt", x)
    assert not isinstance(qat.conv2, amct.CompressedLayer)
    q = qat.conv1.input_quantizer
    assert isinstance(q, UlqActivationQuantizer) and q.is_calibrated  # clips given: nothing to observe
    assert (q.clip_max.item(), q.clip_min.item()) == (6.0, -6.0)
    assert isinstance(qat.conv1.weight_pipeline[-1], UlqWeightQuantizer)
    assert qat.fc.quant_config == QatConfig(clip_max=2.0, clip_min=-1.0, batch_num=3,
                                            weight_granularity=amct.PerTensor())


def test_json_naming_a_layer_the_model_lacks_is_an_error(model, tmp_path):
    x = batches(1)[0][0]
    amct.create_quant_retrain_config(tmp_path / "c.json", model, x)
    data = json.loads((tmp_path / "c.json").read_text())
    data["conv9"] = data["conv1"]
    (tmp_path / "c.json").write_text(json.dumps(data))
    with pytest.raises(ConfigError, match=r"c\.json: layers: got \['conv9'\].*conv9: not found in the model"):
        amct.create_quant_retrain_model(tmp_path / "c.json", model, tmp_path / "r.txt", x)


def test_save_refuses_a_model_the_config_does_not_describe(model, tmp_path):
    x = batches(1)[0][0]
    amct.create_quant_retrain_config(tmp_path / "c.json", model, x)
    with pytest.raises(ConfigError, match=r"model layers: got \[\].*create_quant_retrain_model"):
        amct.save_quant_retrain_model(tmp_path / "c.json", model, tmp_path / "r.txt", str(tmp_path / "out/m"), x)
    assert not (tmp_path / "out").exists()


def test_both_spellings_of_config_definition(model, tmp_path):
    x = batches(1)[0][0]
    amct.create_quant_retrain_config(tmp_path / "a.json", model, x, config_defination="batch_num: 2")
    amct.create_quant_retrain_config(tmp_path / "b.json", model, x, config_definition="batch_num: 2")
    assert (tmp_path / "a.json").read_text() == (tmp_path / "b.json").read_text()
    with pytest.raises(TypeError, match="not both"):
        amct.create_quant_retrain_config(tmp_path / "c.json", model, x, config_defination="batch_num: 2",
                                         config_definition="batch_num: 3")

"""QuantizationAwareTraining inside real Trainer.fit runs: prepare at setup, schedules, logging, exact resume."""

import copy
import csv

import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger
from torch.utils.data import DataLoader

from amct_torch import ConfigError, QatConfig, Targeting
from amct_torch.lightning import QuantizationAwareTraining, load_qat_checkpoint
from amct_torch.quant import LearnedActivationQuantizer, qat_quantizers
from lightning_helpers import Probe, loaders, task, trainer

MINMAX = QatConfig(init_calibrator="minmax")  # IFMR would cost seconds per run; the callback is what is tested


def learned(model):
    return {n: m for n, m in model.named_modules() if isinstance(m, LearnedActivationQuantizer)}


def test_prepares_at_setup_so_the_optimizer_trains_the_ranges_and_logs_them(digits, tmp_path):
    train, val = loaders(digits)
    t = task()
    seen = {}

    def probe(trainer, module, hook, *args):
        qs = learned(module.model)
        if hook == "on_train_start":  # after the sanity check, before the first step
            in_optimizer = {id(p) for g in trainer.optimizers[0].param_groups for p in g["params"]}
            seen["all_in_optimizer"] = all(id(p) in in_optimizer for q in qat_quantizers(module.model).values()
                                           for p in q.parameters(recurse=False))
            seen["uncalibrated_after_sanity"] = not any(bool(q.calibrated) for q in qs.values())
        elif args[-1] == 0:  # on_train_batch_end of step 0: ranges initialised (minmax)
            seen["init"] = float(module.model.conv1.input_quantizer.clip_max.detach())

    qat = QuantizationAwareTraining(MINMAX)
    tr = trainer(num_sanity_val_steps=1, logger=CSVLogger(tmp_path, name="qat"),
                 callbacks=[qat, Probe(probe, "on_train_start", "on_train_batch_end")])
    tr.fit(t, train, val)
    assert seen["all_in_optimizer"] and seen["uncalibrated_after_sanity"]
    q = t.model.conv1.input_quantizer
    assert q.is_calibrated and float(q.clip_max.detach()) != seen["init"]  # initialised at step 0, learned at steps 1-2
    with open(tr.logger.experiment.metrics_file_path) as f:
        rows = [r for r in csv.DictReader(f) if r.get("qat/conv1.input_quantizer/scale")]
    assert rows, "the learned ranges are logged at the epoch end"
    assert float(rows[-1]["qat/conv1.input_quantizer/scale"]) == pytest.approx(float(q.scale), rel=1e-6)
    assert float(rows[-1]["qat/conv1.input_quantizer/upper"]) > float(rows[-1]["qat/conv1.input_quantizer/lower"])
    assert "qat/layer1.0.conv1.weight/scale_mean" in rows[-1]


def test_bn_and_quantizers_freeze_on_schedule(digits):
    train, _ = loaders(digits)
    t = task()
    records = []

    def probe(trainer, module, hook, batch, batch_idx):
        m = module.model
        records.append((trainer.global_step, bool(m.bn1.frozen), m.conv1.input_quantizer.clip_max.requires_grad,
                        float(m.conv1.input_quantizer.clip_max.detach()), m.bn1.running_mean.clone()))

    qat = QuantizationAwareTraining(MINMAX, freeze_bn_step=1, freeze_quantizers_epoch=1, log_ranges=False)
    trainer(max_epochs=2, limit_train_batches=2, limit_val_batches=0,
            callbacks=[qat, Probe(probe, "on_train_batch_start")]).fit(t, train)
    assert [r[:3] for r in records] == [(0, False, True), (1, True, True), (2, True, False), (3, True, False)]
    assert records[2][3] == records[3][3] == float(t.model.conv1.input_quantizer.clip_max.detach())  # frozen range
    assert torch.equal(records[1][4], records[3][4]) and torch.equal(records[1][4], t.model.bn1.running_mean)
    assert qat.bn_frozen and qat.quantizers_frozen


@pytest.fixture(scope="module")
def interrupted(digits, tmp_path_factory):
    """An uninterrupted 2-epoch QAT run that checkpoints after each epoch, and what it held at the first."""
    ckpt_dir = tmp_path_factory.mktemp("ckpt")
    train, val = loaders(digits)
    x = digits.val[0][:8]
    t = task()
    at_epoch_end = {}

    def probe(trainer, module, hook):
        m = copy.deepcopy(module.model).eval()
        with torch.no_grad():
            at_epoch_end[trainer.current_epoch] = m(x)

    qat = QuantizationAwareTraining(MINMAX, freeze_quantizers_step=2, freeze_bn_epoch=1, log_ranges=False)
    ckpt = ModelCheckpoint(dirpath=ckpt_dir, save_top_k=-1, every_n_epochs=1)
    trainer(max_epochs=2, callbacks=[qat, ckpt, Probe(probe, "on_train_epoch_end")]).fit(t, train, val)
    return {"task": t, "outputs": at_epoch_end, "x": x, "first": ckpt_dir / "epoch=0-step=3.ckpt",
            "loaders": (train, val)}


def test_fit_resumes_mid_qat_with_identical_quantizers_outputs_and_training(interrupted):
    saved = torch.load(interrupted["first"], weights_only=True)
    assert saved["callbacks"]["QuantizationAwareTraining"]["quantizers_frozen"] is True
    t = task()
    restored = {}

    def probe(trainer, module, hook):
        restored["state"] = {k: v.clone() for k, v in module.state_dict().items()}
        restored["requires_grad"] = module.model.conv1.input_quantizer.clip_max.requires_grad
        with torch.no_grad():
            restored["out"] = copy.deepcopy(module.model).eval()(interrupted["x"])

    qat = QuantizationAwareTraining(MINMAX, freeze_quantizers_step=2, freeze_bn_epoch=1, log_ranges=False)
    trainer(max_epochs=2, callbacks=[qat, Probe(probe, "on_train_start")]).fit(
        t, *interrupted["loaders"], ckpt_path=interrupted["first"])
    # right after the restore: the saved model, quantizer factors and outputs included, ranges still frozen
    assert restored["state"].keys() == saved["state_dict"].keys()
    assert all(torch.equal(restored["state"][k], v) for k, v in saved["state_dict"].items())
    assert torch.equal(restored["out"], interrupted["outputs"][0])
    assert restored["requires_grad"] is False
    # and the continued run is the uninterrupted one, bit for bit
    final, reference = t.state_dict(), interrupted["task"].state_dict()
    different = [k for k in reference if not torch.equal(final[k], reference[k])]
    assert not different


def test_resuming_with_another_config_warns_or_says_which_config_to_use(interrupted):
    qat = QuantizationAwareTraining(MINMAX.replace(batch_num=2), log_ranges=False)  # same structure
    with pytest.warns(UserWarning, match=r"checkpoint was trained with another config or options"):
        trainer(callbacks=[qat]).fit(task(), *interrupted["loaders"], ckpt_path=interrupted["first"])
    assert qat.quantizers_frozen  # what was frozen comes from the checkpoint
    qat = QuantizationAwareTraining(QatConfig(init_calibrator="percentile"))  # another calibrator: other keys
    with pytest.warns(UserWarning, match=r"was trained with config \{.*'init_calibrator': 'minmax'"), \
            pytest.raises(RuntimeError, match="state_dict"):
        trainer(callbacks=[qat]).fit(task(), *interrupted["loaders"], ckpt_path=interrupted["first"])


def test_load_qat_checkpoint_rebuilds_the_model_without_a_trainer(interrupted):
    fresh = task()
    load_qat_checkpoint(fresh, interrupted["first"])
    q = fresh.model.conv1.input_quantizer
    assert isinstance(q, LearnedActivationQuantizer) and q.is_calibrated
    assert q.clip_max.requires_grad is False  # frozen when saved
    with torch.no_grad():
        assert torch.equal(fresh.model.eval()(interrupted["x"]), interrupted["outputs"][0])


def test_load_qat_checkpoint_without_callback_state_says_so(tmp_path):
    path = tmp_path / "plain.ckpt"
    torch.save({"state_dict": {}, "callbacks": {"ModelCheckpoint{}": {}}}, path)
    with pytest.raises(ValueError, match=r"found 0 \(callback states in it: ModelCheckpoint\{\}\)"):
        load_qat_checkpoint(task(), path)


def test_config_from_a_plain_dict_or_targeting_dict_and_bad_keys_named():
    assert QuantizationAwareTraining({"weight_bits": 4}).config == QatConfig(weight_bits=4)
    cb = QuantizationAwareTraining({"global": {"weight_bits": 4}, "module_name": {"fc": None}})
    assert isinstance(cb.config, Targeting) and cb.config.module_name["fc"] is None
    with pytest.raises(ConfigError, match=r"QuantizationAwareTraining\.config\.weight_bitz.*known keys"):
        QuantizationAwareTraining({"weight_bitz": 4})
    with pytest.raises(ValueError, match=r"freeze_bn_epoch: got -1"):
        QuantizationAwareTraining(freeze_bn_epoch=-1)


def test_missing_network_attribute_lists_the_children(digits):
    train, _ = loaders(digits)
    with pytest.raises(ValueError, match=r"attr='net'.*no module attribute 'net'; its child modules: model"):
        trainer(callbacks=[QuantizationAwareTraining(attr="net")]).fit(task(), train)


def test_no_example_inputs_names_the_three_sources(digits):
    with pytest.raises(ValueError, match=r"example_inputs was not given.*example_input_array is not set.*"
                                         r"the training dataloader is empty"):
        trainer(callbacks=[QuantizationAwareTraining()]).fit(task(), DataLoader([]))


def test_example_input_array_is_used_and_saved(digits):
    train, _ = loaders(digits)
    t = task()
    t.example_input_array = digits.val[0][:2]
    qat = QuantizationAwareTraining(MINMAX, log_ranges=False)
    trainer(limit_train_batches=1, limit_val_batches=0, callbacks=[qat]).fit(t, train)
    assert torch.equal(qat.state_dict()["example_inputs"], digits.val[0][:2])

"""TensorDecomposition and BlockwiseDistillation in real Trainer.fit runs: decomposition before the optimizer,
composition with QAT whatever the callback order, checkpoints that rebuild the factors, and the distillation
loss added to (and logged from) the training steps against a teacher that stays the float model."""

import copy

import pytest
import torch
import torch.nn as nn
from lightning.pytorch.callbacks import ModelCheckpoint

from amct_torch import ConfigError, DecomposeConfig, QatConfig
from amct_torch.lightning import (BlockwiseDistillation, QuantizationAwareTraining, TensorDecomposition,
                                  load_compressed_checkpoint)
from amct_torch.nn import CompressedLayer
from lightning_helpers import Probe, loaders, outputs, task, trainer

HALF = DecomposeConfig(conv_method="tucker2", rank_selection="macs", macs_ratio=0.5)


@pytest.fixture(scope="module")
def decomposed_run(digits, tmp_path_factory):
    ckpt_dir = tmp_path_factory.mktemp("decompose")
    train, val = loaders(digits)
    t = task()
    params_at_optimizer = {}
    original_configure = t.configure_optimizers

    def configure():
        params_at_optimizer["ids"] = {id(p) for p in t.parameters()}
        return original_configure()

    t.configure_optimizers = configure
    before = copy.deepcopy(t.model)
    cb = TensorDecomposition(HALF, info_path=ckpt_dir / "info.json")
    trainer(max_epochs=1, callbacks=[cb, ModelCheckpoint(dirpath=ckpt_dir, save_last=True)]).fit(t, train, val)
    return {"task": t, "cb": cb, "before": before, "ids": params_at_optimizer["ids"], "dir": ckpt_dir,
            "x": digits.val[0][:8]}


def test_decomposition_happens_before_the_optimizer_and_meets_the_target(decomposed_run):
    t, cb = decomposed_run["task"], decomposed_run["cb"]
    changed = cb.plan.changes()
    assert changed, "nothing decomposed"
    for name, factors in changed.items():
        seq = t.model.get_submodule(name)
        assert isinstance(seq, nn.Sequential) and len(seq) == len(factors)
        assert all(id(p) in decomposed_run["ids"] for p in seq.parameters())   # the optimizer trains the factors
    assert cb.ratios()["macs_ratio"] == pytest.approx(0.5, abs=0.06)
    assert (decomposed_run["dir"] / "info.json").exists()


def test_checkpoint_rebuilds_the_factors_on_a_fresh_module(decomposed_run):
    fresh = task()
    loaded = load_compressed_checkpoint(fresh, decomposed_run["dir"] / "last.ckpt")
    for name in decomposed_run["cb"].plan.changes():
        assert isinstance(loaded.model.get_submodule(name), nn.Sequential)
    x = decomposed_run["x"]
    assert torch.allclose(outputs(loaded.model, x), outputs(decomposed_run["task"].model, x), atol=1e-5)


def test_decomposition_then_qat_whatever_the_order(digits):
    train, val = loaders(digits)
    t = task()
    qat = QuantizationAwareTraining(QatConfig(batch_num=1))
    dec = TensorDecomposition(HALF)
    trainer(max_epochs=1, callbacks=[qat, dec]).fit(t, train, val)          # QAT listed first on purpose
    for name in dec.plan.changes():
        seq = t.model.get_submodule(name)
        assert isinstance(seq, nn.Sequential) and all(isinstance(f, CompressedLayer) for f in seq), name


def test_bad_decomposition_options_are_refused():
    with pytest.raises(ConfigError, match="macs_ratio"):
        TensorDecomposition({"rank_selection": "macs", "macs_ratio": 1.5})
    with pytest.raises(ConfigError, match="TensorDecomposition.layers"):
        TensorDecomposition(layers="conv1")


@pytest.fixture(scope="module")
def distill_run(digits, tmp_path_factory):
    ckpt_dir = tmp_path_factory.mktemp("distill")
    train, val = loaders(digits)
    t = task()
    float_model = copy.deepcopy(t.model)
    seen = {"losses": [], "distill": [], "task": []}
    original_step = type(t).training_step

    def probe(tr, module, hook, outputs, batch, batch_idx):
        seen["losses"].append(float(outputs["loss"]))
        seen["distill"].append(float(tr.callback_metrics["distill_loss_step"]))
        seen["task"].append(float(tr.callback_metrics["train_loss"]))

    cb = BlockwiseDistillation(weight=2.0, log_blocks=True)
    cbs = [QuantizationAwareTraining(QatConfig(weight_bits=4, batch_num=1)), cb,
           Probe(probe, "on_train_batch_end"), ModelCheckpoint(dirpath=ckpt_dir, save_last=True)]
    tr = trainer(max_epochs=1, callbacks=cbs)
    tr.fit(t, train, val)
    return {"task": t, "cb": cb, "float": float_model, "seen": seen, "trainer": tr, "dir": ckpt_dir,
            "original_step": original_step, "x": digits.val[0][:8], "loaders": (train, val)}


def test_teacher_is_the_float_model_and_not_trained(distill_run):
    teacher, reference = distill_run["cb"].teacher, distill_run["float"]
    assert not any(isinstance(m, CompressedLayer) for m in teacher.modules())
    for (n, a), (_, b) in zip(teacher.state_dict().items(), reference.state_dict().items()):
        assert torch.equal(a, b), n
    assert all(not p.requires_grad for p in teacher.parameters())
    assert not any(p is q for p in teacher.parameters() for q in distill_run["task"].parameters())


def test_distillation_loss_is_added_and_logged(distill_run):
    seen, t = distill_run["seen"], distill_run["task"]
    assert len(seen["distill"]) == 3 and all(d > 0 for d in seen["distill"])
    metrics = distill_run["trainer"].callback_metrics
    assert any(k.startswith("distill/") for k in metrics)
    for total, task_loss, d in zip(seen["losses"], seen["task"], seen["distill"]):
        assert total == pytest.approx(task_loss + 2.0 * d, rel=1e-5)   # the step's loss: task + weight x distill
    assert "training_step" not in vars(t)                           # restored at fit end
    assert distill_run["cb"]._loss is None


def test_distillation_checkpoint_carries_the_teacher(distill_run):
    state = torch.load(distill_run["dir"] / "last.ckpt", weights_only=True)["callbacks"]
    saved = next(v for k, v in state.items() if k.startswith("BlockwiseDistillation"))
    for name, value in distill_run["float"].state_dict().items():
        assert torch.equal(saved["teacher"][name], value), name
    cb = BlockwiseDistillation()
    cb.load_state_dict(saved)                                       # before setup: kept for fit start
    assert cb._pending_teacher_state is not None


def test_distillation_lowers_the_block_error_against_plain_qat(digits):
    """Same seed, same steps: with the loss weighted heavily the student's block error ends lower."""
    train, val = loaders(digits)
    errors = {}
    for name, extra in (("qat", []), ("distill", [BlockwiseDistillation(weight=50.0)])):
        t = task()
        teacher = copy.deepcopy(t.model)
        trainer(max_epochs=2, limit_train_batches=6,
                callbacks=[QuantizationAwareTraining(QatConfig(weight_bits=4, activation_bits=4, batch_num=1))] + extra
                ).fit(t, train, val)
        from amct_torch.distill import BlockwiseLoss, find_blocks
        x = digits.val[0][:64]
        bl = BlockwiseLoss(teacher, t.model, find_blocks(t.model, x[:1]))
        with torch.no_grad():
            errors[name] = float(bl(x))
        bl.remove()
    assert errors["distill"] < errors["qat"], errors


def test_stop_epoch_and_manual_optimization(digits, monkeypatch):
    from amct_torch.distill import BlockwiseLoss
    train, val = loaders(digits)
    t = task()
    calls = []
    original = BlockwiseLoss.loss_from_recorded
    holder = {}

    def counted(self, batch):
        calls.append(holder["trainer"].current_epoch)
        return original(self, batch)

    monkeypatch.setattr(BlockwiseLoss, "loss_from_recorded", counted)
    tr = trainer(max_epochs=3, limit_train_batches=2,
                 callbacks=[QuantizationAwareTraining(QatConfig(batch_num=1)), BlockwiseDistillation(start_epoch=1,
                                                                                                   stop_epoch=2)])
    holder["trainer"] = tr
    tr.fit(t, train, val)
    assert calls == [1, 1]                                          # only epoch 1's two steps
    with pytest.raises(ConfigError, match="stop_epoch"):
        BlockwiseDistillation(start_epoch=2, stop_epoch=1)
    with pytest.raises(ConfigError, match="weight"):
        BlockwiseDistillation(weight=0)

    m = task()
    m.automatic_optimization = False
    with pytest.raises(RuntimeError, match="manual optimization"):
        trainer(max_epochs=1, limit_train_batches=1, callbacks=[BlockwiseDistillation()]).fit(m, train, val)


def test_the_same_callback_decomposes_a_new_network_in_a_second_fit(digits):
    train, val = loaders(digits)
    cb = TensorDecomposition(HALF)
    first, second = task(), task()
    trainer(max_epochs=1, limit_train_batches=1, callbacks=[cb]).fit(first, train, val)
    trainer(max_epochs=1, limit_train_batches=1, callbacks=[cb]).fit(second, train, val)
    for t in (first, second):
        assert all(isinstance(t.model.get_submodule(n), nn.Sequential) for n in cb.plan.changes())

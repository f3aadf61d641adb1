"""MagnitudePruning, NMSparsity and ChannelPruning inside real Trainer.fit runs on the digits task:
schedules, logging, exact resume from checkpoints, shrinking at the end, and load_pruned_checkpoint."""

import copy
import json

import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from amct_torch.config import ChannelPruneConfig, ConfigError, MagnitudeConfig, NMConfig
from amct_torch.analysis import count_flops
from amct_torch.lightning import ChannelPruning, MagnitudePruning, NMSparsity, load_pruned_checkpoint
from amct_torch.sparsity import (ShrinkRecord, Schedule, apply_shrink_record, mask_stage, masked_layers, nm_layers,
                                 prune_channels)
from lightning_helpers import Probe, loaders, outputs, task, trainer


def masks(model):
    return {n: mask_stage(m).mask.clone() for n, m in masked_layers(model).items()}


def assert_same_state(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    different = [k for k in sa if not torch.equal(sa[k], sb[k])]
    assert not different


def in_optimizer(trainer):
    return {id(p) for g in trainer.optimizers[0].param_groups for p in g["params"]}


# -- MagnitudePruning -----------------------------------------------------------------------------
AGP = MagnitudeConfig(sparsity=0.6, schedule="agp", start=0, end=5, frequency=1)


def test_magnitude_masks_follow_the_global_step_and_the_sparsity_is_logged(digits):
    train, _ = loaders(digits)
    t = task()
    seen = []

    def probe(trainer, module, hook, *args):
        if hook == "on_train_start":
            seen.append(("optimizer", id(module.model.conv1.module.weight) in in_optimizer(trainer)))
            return
        layers = {n: mask_stage(m) for n, m in masked_layers(module.model).items()}
        zeros = {n: int((s.mask == 0).sum()) for n, s in layers.items()}
        expected = {n: round(Schedule.from_config(AGP)(trainer.global_step) * s.mask.numel()) for n, s in layers.items()}
        seen.append((trainer.global_step, zeros == expected))

    cb = MagnitudePruning(AGP)
    tr = trainer(max_epochs=2, limit_val_batches=0, callbacks=[cb, Probe(probe, "on_train_start", "on_train_batch_start")])
    tr.fit(t, train)
    assert seen == [("optimizer", True)] + [(step, True) for step in range(6)]  # the masks of every step, in order
    assert cb.scheduler.position["step"] == 6 and Schedule.from_config(AGP)(0) == 0.0
    total = sum(int((m == 0).sum()) for m in masks(t.model).values()) / sum(m.numel() for m in masks(t.model).values())
    assert total == pytest.approx(0.6, abs=1e-3)
    assert float(tr.callback_metrics["magnitude/total"]) == pytest.approx(total)
    assert float(tr.callback_metrics["magnitude/layer1.0.conv1"]) == pytest.approx(0.6, abs=1e-3)


def test_magnitude_epoch_unit_moves_the_masks_at_epoch_starts(digits):
    train, _ = loaders(digits)
    config = MagnitudeConfig(sparsity=0.5, schedule="linear", start=0, end=2, frequency=1, unit="epoch")
    seen = []

    def probe(trainer, module, hook, batch, batch_idx):
        seen.append((trainer.current_epoch, round(mask_stage(module.model.fc).sparsity(), 3)))

    trainer(max_epochs=3, limit_train_batches=2, limit_val_batches=0,
            callbacks=[MagnitudePruning(config, log_sparsity=False), Probe(probe, "on_train_batch_start")]).fit(task(), train)
    assert seen == [(0, 0.0), (0, 0.0), (1, 0.25), (1, 0.25), (2, 0.5), (2, 0.5)]


@pytest.fixture(scope="module")
def magnitude_run(digits, tmp_path_factory):
    """An uninterrupted 2-epoch AGP run (the ramp spans both epochs), checkpointed after each epoch."""
    ckpt_dir = tmp_path_factory.mktemp("magnitude")
    train, val = loaders(digits)
    t = task()
    at_epoch_end = {}
    x = digits.val[0][:8]
    probe = Probe(lambda tr, m, hook: at_epoch_end.setdefault(tr.current_epoch, outputs(m.model, x)), "on_train_epoch_end")
    cb = MagnitudePruning(AGP)
    trainer(max_epochs=2, callbacks=[cb, ModelCheckpoint(dirpath=ckpt_dir, save_top_k=-1, every_n_epochs=1), probe]).fit(
        t, train, val)
    return {"task": t, "callback": cb, "first": ckpt_dir / "epoch=0-step=3.ckpt", "loaders": (train, val), "x": x,
            "outputs": at_epoch_end}


def test_magnitude_resume_continues_the_schedule_exactly(magnitude_run):
    saved = torch.load(magnitude_run["first"], weights_only=True)
    assert saved["callbacks"]["MagnitudePruning"]["scheduler"]["step"] == 3
    t = task()
    restored = {}

    def probe(trainer, module, hook):
        restored["position"] = dict(cb.scheduler.position)
        restored["masks"] = masks(module.model)

    cb = MagnitudePruning(AGP)
    trainer(max_epochs=2, callbacks=[cb, Probe(probe, "on_train_start")]).fit(
        t, *magnitude_run["loaders"], ckpt_path=magnitude_run["first"])
    assert restored["position"] == {"step": 3, "epoch": 0}
    prefix = "model."
    assert all(torch.equal(m, saved["state_dict"][prefix + n + ".weight_pipeline.0.mask"])
               for n, m in restored["masks"].items())
    # masks, sparsity, weights and the scheduler's position: those of the uninterrupted run
    assert_same_state(t, magnitude_run["task"])
    assert cb.scheduler.state_dict()["step"] == magnitude_run["callback"].scheduler.state_dict()["step"] == 6
    assert cb.scheduler.report() == magnitude_run["callback"].scheduler.report()


def test_load_pruned_checkpoint_rebuilds_a_magnitude_pruned_module(magnitude_run):
    fresh = load_pruned_checkpoint(task(), magnitude_run["first"])
    assert set(masked_layers(fresh.model)) == set(masked_layers(magnitude_run["task"].model))
    assert torch.equal(outputs(fresh.model, magnitude_run["x"]), magnitude_run["outputs"][0])


# -- NMSparsity -----------------------------------------------------------------------------------
NM = {"global": {"n": 2, "m": 4, "update_freq": 2, "ste": True}, "skip": ["conv1"]}  # conv1 reads 1 channel


@pytest.fixture(scope="module")
def nm_run(digits, tmp_path_factory):
    ckpt_dir = tmp_path_factory.mktemp("nm")
    train, val = loaders(digits)
    t = task()
    x = digits.val[0][:8]
    at_epoch_end = {}
    probe = Probe(lambda tr, m, hook: at_epoch_end.setdefault(tr.current_epoch, outputs(m.model, x)), "on_train_epoch_end")
    tr = trainer(max_epochs=2, num_sanity_val_steps=1,
                 callbacks=[NMSparsity(NM), ModelCheckpoint(dirpath=ckpt_dir, save_top_k=-1, every_n_epochs=1), probe])
    tr.fit(t, train, val)
    return {"task": t, "trainer": tr, "first": ckpt_dir / "epoch=0-step=3.ckpt", "loaders": (train, val), "x": x,
            "outputs": at_epoch_end}


def test_nm_keeps_exactly_n_of_every_m_input_channel_weights_after_fit(nm_run):
    layers = nm_layers(nm_run["task"].model)
    assert "conv1" not in layers and {"layer1.0.conv1", "fc"} <= set(layers)
    for name, layer in layers.items():
        stage = mask_stage(layer)
        assert int(stage.batches) == 6  # training batches only: the sanity check and validation do not count
        with torch.no_grad():
            w = layer.eval().effective_weight()
        groups = w.movedim(1, -1).reshape(-1, 4)  # along the input channels (16..64, multiples of 4)
        assert torch.equal((groups != 0).sum(-1), torch.full((groups.shape[0],), 2)), name
        assert torch.equal(stage.mask.movedim(1, -1).reshape(-1, 4).sum(-1), torch.full((groups.shape[0],), 2.0))
    assert float(nm_run["trainer"].callback_metrics["nm/total"]) == pytest.approx(0.5)


def test_nm_resume_restores_the_batch_counter_and_ends_like_the_uninterrupted_run(nm_run):
    t = task()
    restored = {}

    def probe(trainer, module, hook):
        restored["batches"] = int(mask_stage(module.model.fc).batches)

    trainer(max_epochs=2, callbacks=[NMSparsity(NM), Probe(probe, "on_train_start")]).fit(
        t, *nm_run["loaders"], ckpt_path=nm_run["first"])
    assert restored["batches"] == 3  # so the masks are recomputed on the same batches (every 2nd) as before
    assert_same_state(t, nm_run["task"])
    fresh = load_pruned_checkpoint(task(), nm_run["first"])
    assert torch.equal(outputs(fresh.model, nm_run["x"]), nm_run["outputs"][0])


# -- ChannelPruning -------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def channel_run(digits, tmp_path_factory):
    """Channel pruning at setup (L2), fine-tuned 2 epochs with checkpoints, shrunk at the end of fit."""
    ckpt_dir = tmp_path_factory.mktemp("channel")
    train, val = loaders(digits)
    t = task()
    x = digits.val[0][:8]
    seen = {}

    def probe(tr, module, hook):
        if hook == "on_train_start":
            seen["optimizer"] = in_optimizer(tr)
            seen["params"] = {id(p) for p in module.model.parameters()}
            seen["pruned"] = mask_stage(module.model.layer1[0].conv1).sparsity()
        elif hook == "on_train_epoch_end":
            seen.setdefault(tr.current_epoch, outputs(module.model, x))
        else:  # on_train_end: the masked network, before on_fit_end shrinks it
            seen["masked"] = copy.deepcopy(module.model)

    cb = ChannelPruning({"ratio": 0.5, "criterion": "l2"}, shrink_at_end=True)
    tr = trainer(max_epochs=2, callbacks=[cb, ModelCheckpoint(dirpath=ckpt_dir, save_top_k=-1, every_n_epochs=1),
                                          Probe(probe, "on_train_start", "on_train_epoch_end", "on_train_end")])
    tr.fit(t, train, val)
    return {"task": t, "callback": cb, "trainer": tr, "dir": ckpt_dir, "first": ckpt_dir / "epoch=0-step=3.ckpt",
            "loaders": (train, val), "x": x, "seen": seen}


def test_channel_pruning_masks_at_setup_and_shrinks_at_the_end_of_fit(channel_run):
    seen, t, x = channel_run["seen"], channel_run["task"], channel_run["x"]
    assert seen["pruned"] == pytest.approx(0.75)  # half the outputs and half the inputs of layer1.0.conv1
    assert seen["params"] <= seen["optimizer"]  # prepared before configure_optimizers
    dense = sum(p.numel() for p in task().model.parameters())
    small = sum(p.numel() for p in t.model.parameters())
    assert small < 0.4 * dense and not masked_layers(t.model)
    assert t.model.layer1[0].conv1.weight.shape == (8, 8, 3, 3)
    torch.testing.assert_close(outputs(t.model, x), outputs(seen["masked"], x), rtol=1e-5, atol=1e-5)
    cb = channel_run["callback"]
    assert cb.written == {"checkpoint": channel_run["dir"] / "shrunk.ckpt", "record": channel_run["dir"] / "shrunk.shrink.json"}
    assert json.loads(cb.written["record"].read_text()) == cb.shrink_record.to_dict()
    assert float(channel_run["trainer"].callback_metrics["channel/total"]) > 0.5


def test_shrunk_checkpoint_loads_into_a_fresh_module(channel_run):
    t, x, cb = channel_run["task"], channel_run["x"], channel_run["callback"]
    fresh = load_pruned_checkpoint(task(), cb.written["checkpoint"])
    assert torch.equal(outputs(fresh.model, x), outputs(t.model, x))
    assert_same_state(fresh, t)
    # the documented way by hand: slice a fresh network by the record, then load the state_dict
    by_hand = task()
    apply_shrink_record(by_hand.model, ShrinkRecord.load(cb.written["record"]))
    by_hand.load_state_dict(torch.load(cb.written["checkpoint"], weights_only=True)["state_dict"])
    assert torch.equal(outputs(by_hand.model, x), outputs(t.model, x))
    # a checkpoint without callback state (save_weights_only=True) loads with the record
    weights = channel_run["dir"] / "weights_only.ckpt"
    torch.save({"state_dict": t.state_dict(), "callbacks": {}}, weights)
    by_record = load_pruned_checkpoint(task(), weights, record=cb.written["record"])
    assert torch.equal(outputs(by_record.model, x), outputs(t.model, x))
    # and so does a checkpoint taken by the Trainer after fit
    channel_run["trainer"].save_checkpoint(channel_run["dir"] / "after_fit.ckpt")
    assert torch.equal(outputs(load_pruned_checkpoint(task(), channel_run["dir"] / "after_fit.ckpt").model, x),
                       outputs(t.model, x))


def test_checkpoint_taken_before_shrink_reloads_into_a_fresh_masked_module(channel_run):
    fresh = load_pruned_checkpoint(task(), channel_run["first"])
    assert set(masked_layers(fresh.model)) == set(masked_layers(channel_run["seen"]["masked"]))
    assert torch.equal(outputs(fresh.model, channel_run["x"]), channel_run["seen"][0])


def test_channel_fit_resumes_exactly_and_refuses_to_resume_from_the_shrunk_checkpoint(channel_run, tmp_path):
    t = task()
    cb = ChannelPruning({"ratio": 0.5, "criterion": "l2"}, shrink_at_end=True, save_shrunk=tmp_path / "again")
    trainer(max_epochs=2, callbacks=[cb]).fit(t, *channel_run["loaders"], ckpt_path=channel_run["first"])
    assert_same_state(t, channel_run["task"])  # the same shrunk network as the uninterrupted run
    assert cb.shrink_record.to_dict() == channel_run["callback"].shrink_record.to_dict()
    cb = ChannelPruning({"ratio": 0.5, "criterion": "l2"})
    with pytest.warns(UserWarning, match=r"holds the shrunk network.*load_pruned_checkpoint"), \
            pytest.raises(RuntimeError, match="state_dict"):
        trainer(max_epochs=3, callbacks=[cb]).fit(task(), *channel_run["loaders"],
                                                  ckpt_path=channel_run["callback"].written["checkpoint"])


@pytest.fixture(scope="module")
def bn_slim_run(digits, tmp_path_factory):
    """BN-slim: the L1 penalty trains epoch 0, the masks come at the start of epoch 1; 3 epochs of 2 batches."""
    ckpt_dir = tmp_path_factory.mktemp("bn_slim")
    train, val = loaders(digits)
    t = task()
    grads, seen = {}, {}

    def grad(tag):
        def probe(tr, module, hook):
            grads.setdefault((tr.global_step, tag), module.model.bn1.weight.grad.clone())
        return Probe(probe, "on_after_backward")

    def at_epoch_start(tr, module, hook):
        seen[tr.current_epoch] = (mask_stage(module.model.conv1).sparsity(), id(module.model.conv1.module.weight),
                                  id(module.model.conv1.module.weight) in in_optimizer(tr))

    cb = ChannelPruning({"ratio": 0.5, "criterion": "bn_slim"}, at=1, bn_slim_strength=0.01)
    tr = trainer(max_epochs=3, limit_train_batches=2, limit_val_batches=0,
                 callbacks=[grad("before"), cb, grad("after"), Probe(at_epoch_start, "on_train_epoch_start"),
                            ModelCheckpoint(dirpath=ckpt_dir, save_top_k=-1, every_n_epochs=1)])
    tr.fit(t, train)
    return {"task": t, "grads": grads, "seen": seen, "dir": ckpt_dir, "train": train, "callback": cb}


def test_bn_slim_penalty_until_the_pruning_epoch_then_masks_on_the_same_parameters(bn_slim_run):
    grads, seen = bn_slim_run["grads"], bn_slim_run["seen"]
    for step in range(6):
        added = grads[(step, "after")] - grads[(step, "before")]
        if step < 2:  # epoch 0: strength * sign(gamma) (gammas are positive here)
            torch.testing.assert_close(added, torch.full_like(added, 0.01))
        else:
            assert torch.equal(added, torch.zeros_like(added))
    assert seen[0][0] == 0.0 and seen[1][0] == pytest.approx(0.5) and seen[2][0] == pytest.approx(0.5)
    assert seen[0][1] == seen[1][1] == seen[2][1] and all(s[2] for s in seen.values())  # the optimizer's parameter
    cb = bn_slim_run["callback"]
    assert cb.pruned and cb.pruned_config.criterion == "bn_slim"


@pytest.mark.parametrize("ckpt", ["epoch=0-step=2.ckpt", "epoch=1-step=4.ckpt"], ids=["before_pruning", "after_pruning"])
def test_bn_slim_fit_resumes_exactly_across_the_pruning_epoch(bn_slim_run, ckpt):
    saved = torch.load(bn_slim_run["dir"] / ckpt, weights_only=True)["callbacks"]["ChannelPruning"]
    assert saved["pruned"] is (ckpt.startswith("epoch=1"))
    t = task()
    cb = ChannelPruning({"ratio": 0.5, "criterion": "bn_slim"}, at=1, bn_slim_strength=0.01)
    trainer(max_epochs=3, limit_train_batches=2, limit_val_batches=0, callbacks=[cb]).fit(
        t, bn_slim_run["train"], ckpt_path=bn_slim_run["dir"] / ckpt)
    assert_same_state(t, bn_slim_run["task"])


def test_data_criterion_reads_the_training_batches_and_flops_target_sets_the_ratio(digits, tmp_path):
    train, _ = loaders(digits)
    x = digits.val[0][:1]
    reference = prune_channels(task().model, ChannelPruneConfig(ratio=0.5, criterion="taylor"), x, data=train,
                               loss_fn=torch.nn.functional.cross_entropy, num_batches=2, flops_target=0.5)
    t = task()
    cb = ChannelPruning({"criterion": "taylor"}, loss_fn="torch.nn.functional.cross_entropy", num_batches=2,
                        flops_target=0.5, example_inputs=x, shrink_at_end=True)
    got = {}
    probe = Probe(lambda tr, m, hook: got.setdefault("masks", masks(m.model)), "on_train_start")
    trainer(limit_train_batches=1, limit_val_batches=0, callbacks=[cb, probe]).fit(t, train)
    expected = masks(reference)
    assert set(expected) <= set(got["masks"])
    assert all(torch.equal(got["masks"][n], m) for n, m in expected.items())  # same batches, same scores
    assert cb.pruned_config == reference.amct_channel_plan.config and cb.pruned_config.ratio != 0.5
    with torch.no_grad():
        ratio = count_flops(t.model.eval(), x).total_macs / count_flops(task().model.eval(), x).total_macs
    assert ratio <= 0.5
    assert cb.written == {}  # no ModelCheckpoint and no save_shrunk: the record stays in the callback
    assert cb.shrink_record is not None and cb.state_dict()["shrink_record"] == cb.shrink_record.to_dict()


# -- arguments and errors -------------------------------------------------------------------------
def test_arguments_are_checked_with_what_is_allowed():
    with pytest.raises(ValueError, match=r"ChannelPruning\.loss_fn: criterion 'taylor'.*cross_entropy"):
        ChannelPruning({"criterion": "taylor"})
    with pytest.raises(ValueError, match=r"ChannelPruning\.loss_fn: cannot import 'torch\.nn\.functional\.nope'"):
        ChannelPruning({"criterion": "taylor"}, loss_fn="torch.nn.functional.nope")
    with pytest.raises(ValueError, match=r"bn_slim_strength: the penalty trains the epochs before pruning.*at=<epoch>"):
        ChannelPruning({"criterion": "bn_slim"}, bn_slim_strength=1e-4)
    with pytest.raises(ValueError, match=r"bn_slim_strength: .*criterion is 'l1'"):
        ChannelPruning(at=2, bn_slim_strength=1e-4)
    with pytest.raises(ValueError, match=r"ChannelPruning\.at: got -1; allowed: 'setup' or an epoch"):
        ChannelPruning(at=-1)
    with pytest.raises(ValueError, match=r"flops_target: got 1\.5"):
        ChannelPruning(flops_target=1.5)
    with pytest.raises(ConfigError, match=r"ChannelPruning\.config\.ration.*known keys"):
        ChannelPruning({"ration": 0.5})
    with pytest.raises(ConfigError, match=r"MagnitudePruning\.config\.sparsty.*known keys"):
        MagnitudePruning({"sparsty": 0.5})
    with pytest.raises(ConfigError, match=r"MagnitudeConfig\.sparsity: got 1\.5"):
        MagnitudePruning({"sparsity": 1.5})
    assert NMSparsity().config == NMConfig() and NMSparsity({"n": 1}).config == NMConfig(n=1)


def test_load_pruned_checkpoint_without_a_pruning_state_says_what_to_pass(tmp_path):
    path = tmp_path / "plain.ckpt"
    torch.save({"state_dict": {}, "callbacks": {"ModelCheckpoint{}": {}}}, path)
    with pytest.raises(ValueError, match=r"no state of a pruning callback.*\(callback states in it: "
                                         r"ModelCheckpoint\{\}\).*record="):
        load_pruned_checkpoint(task(), path)

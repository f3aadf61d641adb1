"""Magnitude pruning: ranking (per layer and global), schedules driving the masks, checkpoint resume,
lottery-ticket rewinding, composition with quantization."""

import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import amct_torch
from amct_torch.config import MagnitudeConfig, NMConfig, QuantConfig, Targeting
from amct_torch.quant.quantizers import ArqWeightQuantizer
from amct_torch.sparsity import (MagnitudeScheduler, MaskStage, Schedule, apply_nm, iterative_sparsities, mask_stage,
                                 prune_magnitude, sparsity_of)


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc1 = nn.Linear(8, 16)
        self.fc2 = nn.Linear(16, 4)

    def forward(self, x):
        x = torch.flatten(self.pool(F.relu(self.conv(x))), 1)
        return self.fc2(F.relu(self.fc1(x)))


@pytest.fixture
def net():
    torch.manual_seed(0)
    return Net()


@pytest.fixture
def x():
    return torch.randn(4, 3, 6, 6, generator=torch.Generator().manual_seed(1))


def data(n=6):
    g = torch.Generator().manual_seed(2)
    return [(torch.randn(4, 3, 6, 6, generator=g), torch.randint(0, 4, (4,), generator=g)) for _ in range(n)]


def train_steps(model, batches, scheduler=None, lr=0.1):
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    for xb, yb in batches:
        opt.zero_grad()
        F.cross_entropy(model(xb), yb).backward()
        opt.step()
        if scheduler is not None:
            scheduler.step()


def masks(model):
    return {n: mask_stage(m).mask.clone() for n, m in model.named_modules() if mask_stage(m) is not None}


def test_the_smallest_magnitudes_go_first_exactly_k_of_them():
    model = nn.Sequential(nn.Linear(4, 2))
    with torch.no_grad():
        model[0].weight.copy_(torch.tensor([[0.5, -0.1, 3.0, -2.0], [0.05, -4.0, 0.2, 1.0]]))
    pruned = prune_magnitude(model, MagnitudeConfig(sparsity=0.5, schedule="oneshot"), torch.randn(1, 4))
    layer = pruned[0]
    # |w| sorted: 0.05, 0.1, 0.2, 0.5 | 1, 2, 3, 4  -> the four smallest (sign ignored) are masked
    assert mask_stage(layer).mask.tolist() == [[0, 0, 1, 1], [0, 1, 0, 1]]
    assert torch.equal(layer.effective_weight(), model[0].weight * mask_stage(layer).mask)
    assert torch.equal(layer.module.weight, model[0].weight)  # the hidden weights keep their values
    assert model[0].weight.shape == (2, 4) and not hasattr(model[0], "module")  # the original is untouched (copy)


def test_per_layer_scope_prunes_each_layer_alone_global_scope_ranks_all_together():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 8))
    with torch.no_grad():  # the first layer's weights are all smaller than the second's
        model[0].weight.copy_(torch.empty(8, 8).uniform_(0.001, 0.01) * torch.randn(8, 8).sign())
        model[2].weight.copy_(torch.empty(8, 8).uniform_(0.1, 1.0) * torch.randn(8, 8).sign())
    x = torch.randn(2, 8)
    per_layer = prune_magnitude(model, MagnitudeConfig(sparsity=0.5, schedule="oneshot"), x)
    assert sparsity_of(per_layer) == {"0": 0.5, "2": 0.5, "total": 0.5}
    glob = prune_magnitude(model, MagnitudeConfig(sparsity=0.5, schedule="oneshot", scope="global"), x)
    assert sparsity_of(glob) == {"0": 1.0, "2": 0.0, "total": 0.5}


def test_global_scope_threshold_is_shared_across_layers_of_different_scale(net, x):
    pruned = prune_magnitude(net, MagnitudeConfig(sparsity=0.6, schedule="oneshot", scope="global"), x)
    weights = {n: m.module.weight.detach().abs() for n, m in pruned.named_modules() if mask_stage(m) is not None}
    kept = torch.cat([w[mask_stage(pruned.get_submodule(n)).mask.bool()] for n, w in weights.items()])
    gone = torch.cat([w[~mask_stage(pruned.get_submodule(n)).mask.bool()] for n, w in weights.items()])
    assert gone.max() <= kept.min()  # one threshold for all layers
    assert sparsity_of(pruned)["total"] == pytest.approx(0.6, abs=1e-3)
    per = sparsity_of(pruned)
    assert len({round(per[n], 3) for n in weights}) > 1  # layers end up with different sparsities


def test_the_schedule_drives_the_masks_step_by_step(net, x):
    cfg = MagnitudeConfig(sparsity=0.8, schedule="agp", start=1, end=5, frequency=2)
    pruned = prune_magnitude(net, cfg, x)
    assert sparsity_of(pruned)["total"] == 0.0  # before start: dense
    sched = MagnitudeScheduler(pruned)
    schedule = Schedule.from_config(cfg)
    numel = pruned.fc1.module.weight.numel()
    for t in range(1, 8):
        sched.step()
        assert sched.position["step"] == t
        expected = round(schedule(t) * numel)
        assert int((mask_stage(pruned.fc1).mask == 0).sum()) == expected, t
    assert sparsity_of(pruned)["fc1"] == pytest.approx(0.8, abs=1 / numel)
    assert "0.8000" in sched.report()


def test_epoch_unit_moves_only_with_on_epoch(net, x):
    pruned = prune_magnitude(net, MagnitudeConfig(sparsity=0.5, schedule="linear", start=0, end=2, frequency=1,
                                                  unit="epoch"), x)
    sched = MagnitudeScheduler(pruned)
    for _ in range(5):
        sched.step()
    assert sparsity_of(pruned)["total"] == 0.0
    sched.on_epoch(1)
    assert sparsity_of(pruned)["fc1"] == pytest.approx(0.25)
    sched.on_epoch(2)
    assert sparsity_of(pruned)["fc1"] == pytest.approx(0.5)


def test_pruned_weights_stay_pruned_and_get_no_gradient(net, x):
    pruned = prune_magnitude(net, MagnitudeConfig(sparsity=0.5, schedule="linear", start=0, end=2, frequency=1), x)
    sched = MagnitudeScheduler(pruned)
    sched.step()  # 25%
    before = mask_stage(pruned.fc1).mask.clone()
    F.cross_entropy(pruned(x), torch.zeros(4, dtype=torch.long)).backward()
    grad = pruned.fc1.module.weight.grad
    assert torch.all(grad[before == 0] == 0) and grad[before == 1].abs().sum() > 0
    with torch.no_grad():  # a hidden weight that grew large must not come back at the next level
        w = pruned.fc1.module.weight
        w[before == 0] = 100.0
    sched.step()  # 50%
    after = mask_stage(pruned.fc1).mask
    assert torch.all(after[before == 0] == 0)
    assert int((after == 0).sum()) == w.numel() // 2


def test_checkpoint_resume_restores_masks_outputs_and_the_schedule_position(net, x, tmp_path):
    cfg = MagnitudeConfig(sparsity=0.75, schedule="agp", start=0, end=8, frequency=2, rewind=0)
    model = prune_magnitude(net, cfg, x)
    sched = MagnitudeScheduler(model)
    train_steps(model, data(5), sched)
    torch.save({"model": model.state_dict(), "scheduler": sched.state_dict()}, tmp_path / "ckpt.pt")

    fresh = prune_magnitude(copy.deepcopy(net), cfg, x)
    fresh_sched = MagnitudeScheduler(fresh)
    ckpt = torch.load(tmp_path / "ckpt.pt")
    fresh.load_state_dict(ckpt["model"])
    fresh_sched.load_state_dict(ckpt["scheduler"])
    assert fresh_sched.position == sched.position == {"step": 5, "epoch": 0}
    for name, m in masks(model).items():
        assert torch.equal(m, masks(fresh)[name])
    model.eval(), fresh.eval()
    assert torch.equal(model(x), fresh(x))
    # both continue identically
    model.train(), fresh.train()
    train_steps(model, data(8)[5:], sched)
    train_steps(fresh, data(8)[5:], fresh_sched)
    for name, m in masks(model).items():
        assert torch.equal(m, masks(fresh)[name])
    assert sparsity_of(fresh)["fc1"] == pytest.approx(0.75, abs=0.01)
    fresh_sched.rewind()  # the rewind weights came with the scheduler state
    assert torch.equal(fresh.fc1.module.weight, net.fc1.weight)


def test_scheduler_state_errors_name_what_is_wrong(net, x):
    sched = MagnitudeScheduler(prune_magnitude(net, MagnitudeConfig(rewind=0), x))
    with pytest.raises(KeyError, match="unknown key 'steps'"):
        sched.load_state_dict({"steps": 3})
    with pytest.raises(KeyError, match="'nope'"):
        sched.load_state_dict({"step": 1, "epoch": 0, "rewind": {"nope": torch.zeros(1)}})
    with pytest.raises(ValueError, match="no magnitude-pruned layers"):
        MagnitudeScheduler(net)


def test_lottery_ticket_rewind_restores_weights_and_keeps_masks(net, x):
    model = prune_magnitude(net, MagnitudeConfig(sparsity=0.0, schedule="oneshot", rewind=0), x)
    sched = MagnitudeScheduler(model)
    init = {n: m.module.weight.detach().clone() for n, m in model.named_modules() if mask_stage(m) is not None}
    pruned_sets = []
    for level in iterative_sparsities(0.75, 2):  # 0.5, then 0.75: prune, train, rewind, repeat
        train_steps(model, data(3))
        assert not torch.equal(model.fc1.module.weight, init["fc1"])
        sched.prune_to(level)
        before = masks(model)
        sched.rewind()
        assert masks(model).keys() == before.keys()
        for name, m in masks(model).items():
            assert torch.equal(m, before[name])  # masks kept
            assert torch.equal(model.get_submodule(name).module.weight, init[name])  # weights back at init
        assert sparsity_of(model)["fc1"] == pytest.approx(level)
        pruned_sets.append(mask_stage(model.fc1).mask == 0)
    assert torch.all(pruned_sets[1][pruned_sets[0]])  # a later round keeps what an earlier one pruned


def test_rewind_to_step_k_records_the_weights_after_k_steps(net, x):
    model = prune_magnitude(net, MagnitudeConfig(sparsity=0.5, schedule="oneshot", start=4, rewind=2), x)
    sched = MagnitudeScheduler(model)
    batches = data(4)
    train_steps(model, batches[:1], sched)
    with pytest.raises(ValueError, match="records its weights at step 2; the scheduler is at step 1"):
        sched.rewind()
    train_steps(model, batches[1:2], sched)
    at_2 = model.fc2.module.weight.detach().clone()
    train_steps(model, batches[2:], sched)
    assert sparsity_of(model)["fc2"] == 0.5
    sched.rewind()
    assert torch.equal(model.fc2.module.weight, at_2)


def test_rewind_without_a_rewind_point_is_an_error(net, x):
    sched = MagnitudeScheduler(prune_magnitude(net, MagnitudeConfig(), x))
    with pytest.raises(ValueError, match="rewind=0"):
        sched.rewind()


def test_targeting_per_layer_configs_and_skips(net, x):
    t = Targeting(MagnitudeConfig(sparsity=0.5, schedule="oneshot"),
                  module_name={"fc2": MagnitudeConfig(sparsity=0.25, schedule="oneshot"), "conv": None})
    model = prune_magnitude(net, t, x)
    plan = model.amct_prune_plan
    assert plan["conv"].action == "skip" and plan["conv"].source == "module_name['conv']"
    assert plan["fc2"].detail.startswith("magnitude 0.25")
    assert isinstance(model.conv, nn.Conv2d)
    assert sparsity_of(model) == {"fc1": 0.5, "fc2": 0.25, "total": pytest.approx((64 + 16) / (128 + 64))}


def test_average_pooling_is_left_unwrapped_and_reported():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.AvgPool2d(2), nn.Flatten(), nn.Linear(4, 2))
    pruned = prune_magnitude(model, MagnitudeConfig(schedule="oneshot"), torch.randn(1, 3, 4, 4))
    assert isinstance(pruned[1], nn.AvgPool2d)
    assert pruned.amct_prune_plan["1"].action == "skip"
    assert pruned.amct_prune_plan["1"].detail == "no weight to prune"


def test_prune_then_quantize_compose_on_one_wrapper_mask_first(net, x):
    pruned = prune_magnitude(net, MagnitudeConfig(sparsity=0.5, schedule="oneshot"), x)
    q = amct_torch.quantize(pruned, QuantConfig(), x, quantize_outputs="none")
    stages = list(q.fc1.weight_pipeline)
    assert isinstance(stages[0], MaskStage) and isinstance(stages[1], ArqWeightQuantizer)
    mask = mask_stage(q.fc1).mask
    with torch.no_grad():
        assert torch.all(q.fc1.effective_weight()[mask == 0] == 0)  # fake-quant keeps the zeros
    assert MagnitudeScheduler(q).layers.keys() == {"conv", "fc1", "fc2"}  # the schedule still drives it


def test_a_second_mask_on_the_same_layer_is_refused(net, x):
    pruned = prune_magnitude(net, MagnitudeConfig(schedule="oneshot"), x)
    with pytest.raises(ValueError, match="layer 'conv' already has a unstructured mask"):
        apply_nm(pruned, NMConfig(), x)
    with pytest.raises(TypeError, match="allowed: MagnitudeConfig"):
        prune_magnitude(net, NMConfig(), x)

"""N:M sparsity: exactly N of every M along the input-channel axis (padding when C_in % M != 0),
update_freq semantics, SR-STE gradients, checkpoint resume, and the honest semi-structured report."""

import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from amct_torch.config import NMConfig
from amct_torch.sparsity import NMMaskStage, apply_nm, mask_stage, nm_mask, sparsity_of, to_semi_structured


def groups_of(t: torch.Tensor, axis: int, m: int) -> torch.Tensor:
    """(..., C / m, m) blocks of ``t`` along ``axis``."""
    t = t.movedim(axis, -1)
    return t.reshape(*t.shape[:-1], -1, m)


def seeded(module: nn.Module) -> nn.Module:
    torch.manual_seed(0)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn_like(p))
    return module


@pytest.mark.parametrize("layer, x, axis", [
    (nn.Conv2d(8, 6, 3, padding=1), torch.randn(1, 8, 5, 5), 1),          # weight (out, in, kh, kw)
    (nn.ConvTranspose2d(8, 6, 2, stride=2), torch.randn(1, 8, 3, 3), 0),  # weight (in, out, kh, kw)
    (nn.Linear(12, 5), torch.randn(2, 12), 1),                            # weight (out, in)
], ids=["Conv2d", "ConvTranspose2d", "Linear"])
def test_exactly_n_of_every_m_along_the_input_channel_axis_the_largest_kept(layer, x, axis):
    model = nn.Sequential(seeded(layer))
    pruned = apply_nm(model, NMConfig(n=2, m=4), x)
    stage = mask_stage(pruned[0])
    assert isinstance(stage, NMMaskStage) and stage.axis == axis
    mask_blocks = groups_of(stage.mask, axis, 4)
    assert torch.all(mask_blocks.sum(-1) == 2)
    w_blocks = groups_of(layer.weight.detach().abs(), axis, 4)
    kept_min = torch.where(mask_blocks.bool(), w_blocks, torch.inf).amin(-1)
    pruned_max = torch.where(mask_blocks.bool(), -torch.inf, w_blocks).amax(-1)
    assert torch.all(kept_min >= pruned_max)
    assert sparsity_of(pruned)["0"] == 0.5
    with torch.no_grad():  # the op runs on the masked weight
        masked = {"weight": layer.weight * stage.mask, "bias": layer.bias}
        assert torch.equal(pruned(x), torch.func.functional_call(layer, masked, (x,)))


def test_input_channels_not_a_multiple_of_m_are_padded_and_the_tail_keeps_min_r_n():
    w = torch.tensor([[1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0]])  # groups [1 2 3 4] [5 6 7 pad]
    assert nm_mask(w, 2, 4, axis=1).tolist() == [[0, 0, 1, 1, 0, 1, 1]]
    w6 = w[:, :6]  # tail [5 6 pad pad]: only two real weights, both kept
    assert nm_mask(w6, 2, 4, axis=1).tolist() == [[0, 0, 1, 1, 1, 1]]
    # a Conv2d stem with 3 input channels: one padded group per (out, kh, kw), 2 of the 3 weights kept
    conv = seeded(nn.Conv2d(3, 4, 3))
    pruned = apply_nm(nn.Sequential(conv), NMConfig(), torch.randn(1, 3, 5, 5))
    assert torch.all(mask_stage(pruned[0]).mask.sum(1) == 2)
    # 1:4 on 6 channels: [4 real] keeps 1, [2 real + 2 pad] keeps 1
    lin = seeded(nn.Linear(6, 3))
    pruned = apply_nm(nn.Sequential(lin), NMConfig(n=1, m=4), torch.randn(1, 6))
    mask = mask_stage(pruned[0]).mask
    assert torch.all(mask[:, :4].sum(1) == 1) and torch.all(mask[:, 4:].sum(1) == 1)


def test_grouped_conv_transpose_groups_never_straddle_convolution_groups():
    w = torch.arange(1.0, 7.0).view(6, 1, 1, 1)  # input axis 0: two convolution groups of 3 channels
    assert nm_mask(w, 2, 4, axis=0, groups=2).flatten().tolist() == [0, 1, 1, 0, 1, 1]
    assert nm_mask(w, 2, 4, axis=0).flatten().tolist() == [0, 0, 1, 1, 1, 1]
    convt = seeded(nn.ConvTranspose2d(8, 4, 2, groups=2))
    pruned = apply_nm(nn.Sequential(convt), NMConfig(), torch.randn(1, 8, 3, 3))
    stage = mask_stage(pruned[0])
    assert stage.groups == 2
    assert torch.all(groups_of(stage.mask, 0, 4).sum(-1) == 2)


def _perturb(layer):
    with torch.no_grad():
        layer.module.weight.copy_(torch.randn_like(layer.module.weight))


def test_update_freq_0_fixes_the_mask_after_the_first_training_batch():
    model = apply_nm(nn.Sequential(seeded(nn.Linear(8, 4))), NMConfig(update_freq=0), torch.randn(1, 8))
    layer, stage = model[0], mask_stage(model[0])
    x = torch.randn(2, 8)
    _perturb(layer)
    model.eval()
    model(x)  # eval batches neither count nor recompute
    assert int(stage.batches) == 0
    model.train()
    model(x)  # the first training batch chooses the mask from the weights it sees (AMCT)
    first = stage.mask.clone()
    assert torch.equal(first, nm_mask(layer.module.weight, 2, 4, 1))
    for _ in range(3):
        _perturb(layer)
        model(x)
        assert torch.equal(stage.mask, first)
    assert int(stage.batches) == 4


def test_update_freq_k_recomputes_every_k_batches_from_the_dense_weights():
    model = apply_nm(nn.Sequential(seeded(nn.Linear(16, 8))), NMConfig(update_freq=2), torch.randn(1, 16)).train()
    layer, stage = model[0], mask_stage(model[0])
    x = torch.randn(2, 16)
    for b in range(6):
        _perturb(layer)
        before = stage.mask.clone()
        model(x)
        recomputed = nm_mask(layer.module.weight, 2, 4, 1)
        if b % 2 == 0:
            assert torch.equal(stage.mask, recomputed), b
        else:
            assert torch.equal(stage.mask, before), b


def test_recomputing_between_accumulated_batches_keeps_backward_valid():
    model = apply_nm(nn.Sequential(seeded(nn.Linear(8, 4))), NMConfig(update_freq=1, ste=True), torch.randn(1, 8))
    model.train()
    loss = model(torch.randn(2, 8)).sum()
    loss = loss + model(torch.randn(2, 8)).sum()  # updates the mask buffer in place
    loss.backward()  # the first forward's graph kept its own copy of the mask
    assert model[0].module.weight.grad is not None


@pytest.mark.parametrize("ste", [False, True])
def test_sr_ste_masked_weights_get_g_plus_decay_w_plain_masks_get_zero(ste):
    decay = 0.05
    model = apply_nm(nn.Sequential(seeded(nn.Linear(8, 3))), NMConfig(ste=ste, decay=decay), torch.randn(1, 8))
    model.train()
    layer, mask = model[0], mask_stage(model[0]).mask
    x, c = torch.randn(5, 8), torch.randn(5, 3)
    (model(x) * c).sum().backward()
    w = layer.module.weight.detach()
    eff = (w * mask).requires_grad_()
    (F.linear(x, eff, layer.module.bias.detach()) * c).sum().backward()
    g = eff.grad
    expected = g + decay * (1 - mask) * w if ste else g * mask
    torch.testing.assert_close(layer.module.weight.grad, expected)
    assert torch.all((layer.module.weight.grad[mask == 0] != 0) == ste)


def test_checkpoint_resume_restores_masks_and_the_batch_counter(tmp_path):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4))
    cfg = NMConfig(update_freq=2, ste=True)
    g = torch.Generator().manual_seed(3)
    batches = [(torch.randn(4, 8, generator=g), torch.randint(0, 4, (4,), generator=g)) for _ in range(6)]

    def train(model, bs):
        opt = torch.optim.SGD(model.parameters(), lr=0.5)
        for xb, yb in bs:
            opt.zero_grad()
            F.cross_entropy(model(xb), yb).backward()
            opt.step()
        return opt

    model = apply_nm(net, cfg, batches[0][0]).train()
    train(model, batches[:3])
    torch.save(model.state_dict(), tmp_path / "nm.pt")
    fresh = apply_nm(copy.deepcopy(net), cfg, batches[0][0]).train()
    fresh.load_state_dict(torch.load(tmp_path / "nm.pt"))
    assert int(mask_stage(fresh[0]).batches) == 3
    for i in (0, 2):
        assert torch.equal(mask_stage(fresh[i]).mask, mask_stage(model[i]).mask)
    train(model, batches[3:])
    train(fresh, batches[3:])
    for i in (0, 2):
        assert torch.equal(mask_stage(fresh[i]).mask, mask_stage(model[i]).mask)
        assert torch.equal(fresh[i].module.weight, model[i].module.weight)


def test_plan_reports_every_layer():
    model = nn.Sequential(nn.Conv2d(4, 4, 1), nn.AvgPool2d(1), nn.Flatten(), nn.Linear(16, 2))
    pruned = apply_nm(model, NMConfig(), torch.randn(1, 4, 2, 2))
    plan = pruned.amct_prune_plan
    assert plan.wrapped() == ["0", "3"]
    assert plan["0"].detail == "2:4 L1 along input channels, update_freq=0"
    assert plan["1"].detail == "no weight to prune"


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU report")
def test_to_semi_structured_on_cpu_reports_the_zero_fraction_not_a_speedup():
    torch.manual_seed(0)
    model = apply_nm(nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 8)), NMConfig(), torch.randn(1, 64))
    x = torch.randn(3, 64)
    converted, report = to_semi_structured(model)
    assert report.converted == []
    assert report.zero_fraction == {"0": 0.5, "2": 0.5, "total": 0.5}
    assert "CUDA-only" in report.note and "zero fraction" in report.note
    assert set(report.skipped) == {"0", "2"}
    assert "50.0%" in str(report)
    with torch.no_grad():
        assert torch.equal(converted(x), model(x))  # nothing changed
    with pytest.raises(RuntimeError, match="no layer converted"):
        to_semi_structured(model, strict=True)


@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_capability() < (8, 0),
                    reason="semi-structured sparse kernels need a CUDA GPU with compute capability >= 8.0")
def test_to_semi_structured_on_cuda_uses_the_sparse_kernels():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(128, 128), nn.ReLU(), nn.Linear(128, 64))
    net = net.half().cuda().eval()
    x = torch.randn(64, 128, dtype=torch.float16, device="cuda")
    model = apply_nm(net, NMConfig(), x).eval()
    with torch.no_grad():
        reference = model(x)
    converted, report = to_semi_structured(model)
    assert report.converted == ["0", "2"], str(report)
    assert type(converted[0]) is nn.Linear
    assert isinstance(converted[0].weight, torch.sparse.SparseSemiStructuredTensor)
    with torch.no_grad():
        torch.testing.assert_close(converted(x), reference, rtol=1e-2, atol=1e-2)
    _, float_report = to_semi_structured(apply_nm(copy.deepcopy(net).float(), NMConfig(), x.float()))
    assert float_report.converted == [] and "float16 or bfloat16" in float_report.skipped["0"]


def test_reading_the_sparsity_does_not_count_as_a_training_batch():
    import amct_torch.sparsity as sp
    from amct_torch.config import NMConfig

    model = torch.nn.Sequential(torch.nn.Linear(8, 4)).train()
    nm = sp.apply_nm(model, NMConfig(update_freq=2), torch.randn(1, 8)).train()
    before = {k: v.clone() for k, v in nm.state_dict().items()}
    sp.sparsity_of(nm)
    after = nm.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before) and nm.training

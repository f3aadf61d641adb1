"""Conv + BatchNorm folding: exact to float tolerance, and every BatchNorm that is not folded says why."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision

from amct_torch.graph import capture, fold_batch_norm, fold_conv_bn_

BN = nn.modules.batchnorm._BatchNorm


def assert_rel_close(actual: torch.Tensor, expected: torch.Tensor, tol: float = 1e-5) -> None:
    """max |actual - expected| <= tol * max |expected|."""
    err = (actual - expected).abs().max().item()
    scale = expected.abs().max().item()
    assert err <= tol * scale, f"max error {err:.3g} exceeds {tol} x {scale:.3g}"


def outputs(a: nn.Module, b: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    with torch.no_grad():
        return a(x), b(x)


def count_bn(model: nn.Module) -> int:
    return sum(isinstance(m, BN) for m in model.modules())


# -- single conv + bn pairs ---------------------------------------------------------------------------
PAIRS = [
    ("conv1d_bn1d", lambda: nn.Conv1d(3, 6, 3, padding=1), nn.BatchNorm1d, (2, 3, 12)),
    ("conv2d_bn2d_bias", lambda: nn.Conv2d(3, 6, 3, padding=1), nn.BatchNorm2d, (2, 3, 8, 8)),
    ("conv2d_bn2d_no_bias", lambda: nn.Conv2d(3, 6, 3, padding=1, bias=False), nn.BatchNorm2d, (2, 3, 8, 8)),
    ("conv2d_depthwise_bn2d", lambda: nn.Conv2d(6, 6, 3, padding=1, groups=6, bias=False), nn.BatchNorm2d, (2, 6, 8, 8)),
    ("conv3d_bn3d", lambda: nn.Conv3d(3, 6, 3, padding=1), nn.BatchNorm3d, (1, 3, 5, 5, 5)),
]


@pytest.mark.parametrize("name, conv_factory, bn_cls, shape", PAIRS, ids=[p[0] for p in PAIRS])
def test_folded_pair_matches_the_original(name, conv_factory, bn_cls, shape, randomize_bn):
    torch.manual_seed(0)
    model = randomize_bn(nn.Sequential(conv_factory(), bn_cls(6), nn.ReLU())).eval()
    x = torch.randn(shape)
    folded, plan = fold_batch_norm(model, x)
    assert isinstance(folded[1], nn.Identity)
    assert folded[0].bias is not None
    assert plan["1"].action == "fold" and plan["1"].detail == "into 0" and plan["1"].source == "0"
    assert_rel_close(*outputs(folded, model, x))


def test_fold_conv_bn_gives_a_biasless_conv_a_bias(randomize_bn):
    torch.manual_seed(0)
    conv, bn = nn.Conv2d(2, 4, 1, bias=False), randomize_bn(nn.BatchNorm2d(4)).eval()
    x = torch.randn(1, 2, 4, 4)
    with torch.no_grad():
        expected = bn(conv(x))
        fold_conv_bn_(conv, bn)
        assert isinstance(conv.bias, nn.Parameter)
        assert_rel_close(conv(x), expected)


def test_fold_uses_the_batchnorm_formula(randomize_bn):
    torch.manual_seed(0)
    conv, bn = nn.Conv2d(2, 3, 1), randomize_bn(nn.BatchNorm2d(3)).eval()
    w, b = conv.weight.detach().clone(), conv.bias.detach().clone()
    fold_conv_bn_(conv, bn)
    g = bn.weight / torch.sqrt(bn.running_var + bn.eps)
    torch.testing.assert_close(conv.weight, w * g.view(-1, 1, 1, 1))
    torch.testing.assert_close(conv.bias, (b - bn.running_mean) * g + bn.bias)


# -- whole models -------------------------------------------------------------------------------------
def test_conv_bn_net_folds_every_batchnorm(conv_bn_net, image):
    folded, plan = fold_batch_norm(conv_bn_net, image)
    assert plan.wrapped() == ["bn1", "bn2", "bn3"]
    assert plan.skipped() == {}
    assert count_bn(folded) == 0
    assert_rel_close(*outputs(folded, conv_bn_net, image))
    assert str(plan).splitlines()[0] == "fold batch-norm: 3 of 3 layers"


@pytest.mark.parametrize("arch, n_bn", [("resnet18", 20), ("mobilenet_v2", 52), ("efficientnet_b0", 49)])
def test_torchvision_models_fold_exactly(arch, n_bn, randomize_bn):
    torch.manual_seed(0)
    model = randomize_bn(getattr(torchvision.models, arch)(weights=None)).eval()
    assert count_bn(model) == n_bn
    x = torch.randn(1, 3, 32, 32)
    folded, plan = fold_batch_norm(model, x)
    assert plan.skipped() == {}
    assert len(plan.wrapped()) == n_bn
    assert count_bn(folded) == 0
    assert_rel_close(*outputs(folded, model, x))


def test_resnet18_folds_all_20_batchnorms_into_their_convs(randomize_bn):
    model = randomize_bn(torchvision.models.resnet18(weights=None)).eval()
    _, plan = fold_batch_norm(model, torch.randn(1, 3, 32, 32))
    assert len(plan.wrapped()) == 20
    assert plan["bn1"].source == "conv1"
    assert plan["layer1.0.bn2"].source == "layer1.0.conv2"
    assert plan["layer2.0.downsample.1"].source == "layer2.0.downsample.0"


def test_export_captured_model_folds(shape_dependent_net, image):
    folded, plan = fold_batch_norm(shape_dependent_net, image)
    assert "capture: export" in plan.capture
    assert plan["bn"].action == "fold"
    assert_rel_close(*outputs(folded, shape_dependent_net, image))


# -- inplace and graph reuse --------------------------------------------------------------------------
def test_original_model_is_untouched_when_not_inplace(conv_bn_net, image):
    before = {k: v.clone() for k, v in conv_bn_net.state_dict().items()}
    folded, _ = fold_batch_norm(conv_bn_net, image)
    assert folded is not conv_bn_net
    assert isinstance(conv_bn_net.bn1, nn.BatchNorm2d) and conv_bn_net.conv1.bias is None
    assert conv_bn_net.state_dict().keys() == before.keys()
    assert all(torch.equal(before[k], v) for k, v in conv_bn_net.state_dict().items())


def test_inplace_folds_into_the_given_model(conv_bn_net, image):
    with torch.no_grad():
        expected = conv_bn_net(image)
    folded, _ = fold_batch_norm(conv_bn_net, image, inplace=True)
    assert folded is conv_bn_net
    assert isinstance(conv_bn_net.bn1, nn.Identity)
    with torch.no_grad():
        assert_rel_close(conv_bn_net(image), expected)


def test_a_graph_captured_beforehand_is_reused(conv_bn_net, image):
    graph = capture(conv_bn_net)
    folded, plan = fold_batch_norm(conv_bn_net, graph=graph)
    assert plan.capture == graph.report()
    assert len(plan.wrapped()) == 3
    assert_rel_close(*outputs(folded, conv_bn_net, image))


# -- what is not folded, and why ----------------------------------------------------------------------
def test_training_mode_batchnorm_is_skipped_with_a_hint_to_call_eval(conv_bn_net, image):
    conv_bn_net.train()
    folded, plan = fold_batch_norm(conv_bn_net, image)
    assert plan.wrapped() == []
    assert set(plan.skipped()) == {"bn1", "bn2", "bn3"}
    assert all("eval()" in reason for reason in plan.skipped().values())
    assert count_bn(folded) == 3


def test_skip_list_leaves_matching_pairs_alone(conv_bn_net, image):
    folded, plan = fold_batch_norm(conv_bn_net, image, skip=["conv2", "bn3"])
    assert plan.wrapped() == ["bn1"]
    assert plan["bn2"].detail == "in skip list ('conv2')"
    assert plan["bn3"].detail == "in skip list ('bn3')"
    assert isinstance(folded.bn2, nn.BatchNorm2d) and isinstance(folded.bn1, nn.Identity)
    assert_rel_close(*outputs(folded, conv_bn_net, image))


def test_skip_list_accepts_globs(conv_bn_net, image):
    _, plan = fold_batch_norm(conv_bn_net, image, skip=["bn*"])
    assert plan.wrapped() == []


class TwoConsumers(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x):
        y = self.conv(x)
        return self.bn(y) + F.relu(y)


def test_conv_output_with_two_consumers_is_not_folded(randomize_bn, image):
    model = randomize_bn(TwoConsumers()).eval()
    folded, plan = fold_batch_norm(model, image)
    assert plan["bn"].action == "skip"
    assert plan["bn"].detail.startswith("conv output is also used by")
    assert isinstance(folded.bn, nn.BatchNorm2d)
    with torch.no_grad():
        assert torch.equal(folded(image), model(image))


def test_affine_false_batchnorm_is_skipped(image):
    model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4, affine=False)).eval()
    _, plan = fold_batch_norm(model, image)
    assert plan["1"].action == "skip" and plan["1"].detail == "BatchNorm has affine=False"


def test_batchnorm_without_running_stats_is_skipped(image):
    model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4, track_running_stats=False)).eval()
    _, plan = fold_batch_norm(model, image)
    assert "track_running_stats=False" in plan["1"].detail


def test_batchnorm_after_a_linear_is_not_folded():
    model = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4)).eval()
    _, plan = fold_batch_norm(model, torch.randn(2, 4))
    assert plan["1"].detail == "producer 0 is Linear, not Conv1d/2d/3d"


def test_batchnorm_after_a_transposed_conv_is_not_folded():
    model = nn.Sequential(nn.ConvTranspose2d(3, 4, 2), nn.BatchNorm2d(4)).eval()
    _, plan = fold_batch_norm(model, torch.randn(1, 3, 4, 4))
    assert plan["1"].detail == "producer 0 is ConvTranspose2d, not Conv1d/2d/3d"


def test_batchnorm_on_the_model_input_is_not_folded():
    model = nn.Sequential(nn.BatchNorm2d(3), nn.Conv2d(3, 4, 1)).eval()
    _, plan = fold_batch_norm(model, torch.randn(1, 3, 4, 4))
    assert plan["0"].detail.startswith("input is not a convolution (comes from input:")


def test_batchnorm_of_the_wrong_rank_is_not_folded():
    model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm1d(4)).eval()  # fx does not run it
    _, plan = fold_batch_norm(model)
    assert plan["1"].detail == "Conv2d is followed by BatchNorm1d, expected BatchNorm2d"


class ReusedConv(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 1)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x):
        return self.bn(self.conv(self.conv(x)))


def test_reused_conv_is_not_folded():
    model = ReusedConv().eval()
    _, plan = fold_batch_norm(model, torch.randn(1, 4, 4, 4))
    assert plan["bn"].detail == "conv or BatchNorm is called more than once in forward (reused module)"


def test_module_walk_fallback_folds_nothing_and_says_why(data_dependent_net, image):
    folded, plan = fold_batch_norm(data_dependent_net, image)
    assert "capture: module_walk" in plan.capture
    assert plan.wrapped() == []
    assert plan["bn"].action == "skip"
    assert plan["bn"].detail.startswith("no data flow")
    assert plan.warnings == ["nothing folded: capture fell back to module_walk"]
    assert isinstance(folded.bn, nn.BatchNorm2d)
    assert "warning: nothing folded" in str(plan)


def test_conv_pruned_with_torch_prune_is_not_folded_into_a_stale_weight(randomize_bn):
    # Regression test (was a bug in amct_torch/graph/fold.py, fold_conv_bn_ / _why_not): after torch.nn.utils.prune, ``conv.weight`` is a
    # plain tensor recomputed as weight_orig * weight_mask by a forward pre-hook. fold_conv_bn_ writes the folded
    # weight into that tensor, the BatchNorm is replaced by Identity, and the next forward recomputes the
    # *unfolded* weight: the model silently loses the BatchNorm scaling (max error ~0.4 here).
    prune = pytest.importorskip("torch.nn.utils.prune")
    torch.manual_seed(0)
    model = randomize_bn(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))).eval()
    prune.l1_unstructured(model[0], "weight", amount=0.3)
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        expected = model(x)
    folded, plan = fold_batch_norm(model, x, inplace=True)  # a pruned model cannot be deep-copied
    with torch.no_grad():
        assert_rel_close(folded(x), expected)

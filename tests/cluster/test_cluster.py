"""Weight clustering: k-means on constructed weights, centroid gradients, zeros and unique values preserved
through fine-tuning, QAT (PQAT/CQAT/PCQAT) and export, deferred clustering and checkpoints."""

import copy

import numpy as np
import onnx
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from onnx import numpy_helper

import amct_torch
from amct_torch import ClusterConfig, MagnitudeConfig, QatConfig
from amct_torch.cluster import (ClusterStage, activate_clusters, check_preservation, cluster_stage, clustered_layers,
                                kmeans_rows, reassign_clusters, strip_clustering)


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1, self.b1 = nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.c2 = nn.Conv2d(8, 8, 3, padding=1)
        self.fc = nn.Linear(8 * 8 * 8, 4)

    def forward(self, x):
        return self.fc(torch.flatten(F.relu(self.c2(F.relu(self.b1(self.c1(x))))), 1))


@pytest.fixture
def data():
    g = torch.Generator().manual_seed(0)
    return [(torch.randn(16, 1, 8, 8, generator=g), torch.randint(0, 4, (16,), generator=g)) for _ in range(4)]


def net():
    torch.manual_seed(0)
    return Net().eval()


def train(model, data, lr=0.01):
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=lr)
    model.train()
    for x, y in data:
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()


@pytest.mark.parametrize("init", ["kmeans++", "linear", "density"])
def test_kmeans_finds_constructed_clusters_per_row(init):
    g = torch.Generator().manual_seed(0)
    centers = torch.tensor([[-1.0, 0.5, 2.0], [-3.0, -2.0, 4.0]])
    labels = torch.randint(0, 3, (2, 300), generator=g)
    values = centers.gather(1, labels) + 0.01 * torch.randn(2, 300, generator=g)
    c, a = kmeans_rows(values, torch.ones_like(values, dtype=torch.bool), 3, init=init)
    for r in range(2):
        assert torch.allclose(c[r].sort().values, centers[r], atol=0.01)
        # same grouping: each assigned centroid is the one nearest the true center
        assert torch.equal(c[r].gather(0, a[r]).sub(centers[r].gather(0, labels[r])).abs().lt(0.02), torch.ones(300, dtype=torch.bool))


def test_kmeans_ignores_invalid_values():
    values = torch.tensor([[0.0, 0.0, 0.0, 1.0, 1.1, 3.0, 3.1]])
    valid = values != 0
    c, a = kmeans_rows(values, valid, 2, init="linear")
    assert torch.allclose(c.sort().values, torch.tensor([[1.05, 3.05]]))
    assert torch.equal(a[~valid], torch.zeros(3, dtype=a.dtype))


def test_centroid_gradient_is_the_sum_over_its_members():
    w = torch.tensor([[0.1, 0.9, 0.12, 0.0, 0.88, 0.0]])
    stage = ClusterStage(w, ClusterConfig(clusters=3, init="linear"))  # zero kept + 2 trainable centroids
    assert bool(stage.zero_slot) and stage.assignment.tolist() == [[1, 2, 1, 0, 2, 0]]
    x = w.clone().requires_grad_(True)
    out = stage(x)
    assert torch.allclose(out, torch.tensor([[0.11, 0.89, 0.11, 0.0, 0.89, 0.0]]))
    g = torch.tensor([[1.0, 2.0, 3.0, 4.0, 5.0, 6.0]])
    out.backward(g)
    assert torch.allclose(stage.centroids.grad, torch.tensor([[0.0, 1.0 + 3.0, 2.0 + 5.0]]))  # fixed zero: none
    assert torch.equal(x.grad, g)  # update_weights: straight through to the input weight


def test_per_channel_clusters_count_per_channel():
    torch.manual_seed(0)
    w = torch.randn(6, 4, 3, 3)
    stage = ClusterStage(w, ClusterConfig(clusters=4, granularity="per_channel"))
    out = stage(w)
    for r in range(6):
        assert torch.unique(out[r]).numel() <= 4
    assert torch.unique(out).numel() > 4 and stage.unique_values() <= 4


def test_pruned_then_clustered_keeps_zeros_exactly_through_fine_tuning(data):
    x = data[0][0]
    pruned = amct_torch.prune_magnitude(net(), MagnitudeConfig(sparsity=0.5, schedule="oneshot"), x)
    clustered = amct_torch.cluster_weights(pruned, ClusterConfig(clusters=8), x)
    assert isinstance(clustered.b1, nn.Identity)  # BN folded into c1 before clustering
    masks = {n: layer.weight_pipeline[0].mask.clone() for n, layer in clustered_layers(clustered).items()}
    train(clustered, data, lr=0.05)
    for name, layer in clustered_layers(clustered).items():
        w = layer.effective_weight().detach()
        assert torch.equal(w == 0, masks[name] == 0), name
        assert torch.unique(w).numel() <= 8
    changed = reassign_clusters(clustered)
    assert set(changed) == {"c1", "c2", "fc"}
    for name, layer in clustered_layers(clustered).items():
        w = layer.effective_weight().detach()
        assert torch.equal(w == 0, masks[name] == 0), name  # reassignment keeps zeros zero, nonzeros nonzero


def test_reassign_moves_weights_to_the_nearest_centroid():
    w = torch.tensor([[0.1, 0.2, 0.8, 0.9]])
    stage = ClusterStage(w, ClusterConfig(clusters=2, init="linear", preserve_sparsity=False))
    with torch.no_grad():
        stage.centroids.copy_(torch.tensor([[0.12, 0.7]]))  # moved, but every weight keeps its nearest
    assert stage.reassign(w) == 0
    with torch.no_grad():
        stage.centroids.copy_(torch.tensor([[0.85, 0.15]]))
    assert stage.reassign(w) == 4 and stage.assignment.tolist() == [[1, 1, 0, 0]]


@pytest.mark.parametrize("granularity", ["per_tensor", "per_channel"])
def test_pcqat_keeps_sparsity_and_unique_values_through_qat_and_export(data, granularity, tmp_path):
    x = data[0][0]
    pruned = amct_torch.prune_magnitude(net(), MagnitudeConfig(sparsity=0.5, schedule="oneshot"), x)
    clustered = amct_torch.cluster_weights(pruned, ClusterConfig(clusters=8, granularity=granularity), x)
    train(clustered, data[:2])
    before = {n: (int((l.effective_weight() == 0).sum()), cluster_stage(l).unique_values())
              for n, l in clustered_layers(clustered).items()}
    q = amct_torch.prepare_qat(clustered, QatConfig(), x)
    for layer in clustered_layers(q).values():  # per-tensor clusters are quantized per tensor
        assert layer.weight_pipeline[-1].per_channel == (granularity == "per_channel")
    train(q, data)
    report = check_preservation(q)
    assert report.ok and {r.layer for r in report.rows} == {"c1", "c2", "fc"}
    report.raise_if_broken()
    res = amct_torch.export(q.eval(), tmp_path / "pcqat", x[:1])
    weights = {i.name: numpy_helper.to_array(i) for i in onnx.load(res.deploy).graph.initializer}
    for name, (zeros, unique) in before.items():
        a = weights[f"{name}.weight"]
        assert a.dtype == np.int8 and int((a == 0).sum()) == zeros
        rows = a.reshape(a.shape[0], -1) if granularity == "per_channel" else a.reshape(1, -1)
        assert max(len(np.unique(r)) for r in rows) <= unique


def test_preservation_report_flags_a_quantizer_that_zeroes_weights(data):
    x = data[0][0]
    pruned = amct_torch.prune_magnitude(net(), MagnitudeConfig(sparsity=0.5, schedule="oneshot"), x)
    q = amct_torch.prepare_qat(pruned, QatConfig(weight_bits=4), x)
    layer = q.fc
    with torch.no_grad():  # one tiny surviving weight: 4-bit per-channel rounding sends it to zero
        idx = (layer.weight_pipeline[0].mask[0] == 1).nonzero()[0, 0]
        layer.module.weight[0, idx] = 1e-6
    report = check_preservation(q)
    assert not report.ok and [r.layer for r in report.broken()] == ["fc"]
    with pytest.raises(AssertionError, match="fc: zeros"):
        report.raise_if_broken()


def test_order_is_enforced_with_clear_errors(data):
    x = data[0][0]
    clustered = amct_torch.cluster_weights(net(), ClusterConfig(clusters=4), x)
    with pytest.raises(ValueError, match="already clustered; prune before clustering"):
        amct_torch.prune_magnitude(clustered, MagnitudeConfig(sparsity=0.5, schedule="oneshot"), x)
    with pytest.raises(ValueError, match="already clustered"):
        amct_torch.cluster_weights(clustered, ClusterConfig(clusters=4), x)
    q = amct_torch.prepare_qat(net(), QatConfig(), x)
    with pytest.raises(ValueError, match="cluster before quantization-aware training"):
        amct_torch.cluster_weights(q, ClusterConfig(clusters=4), x)


def test_deferred_clusters_are_the_identity_until_activated_and_checkpoint(data):
    x = data[0][0]
    model = net()
    deferred = amct_torch.cluster_weights(model, ClusterConfig(clusters=4), x, defer=True)
    fresh = copy.deepcopy(deferred)
    reference = amct_torch.fold_batch_norm(model, x)[0]
    with torch.no_grad():
        assert torch.allclose(deferred(x), reference(x), atol=1e-6)
    assert activate_clusters(deferred) == ["c1", "c2", "fc"]
    assert all(torch.unique(l.effective_weight()).numel() <= 4 for l in clustered_layers(deferred).values())
    train(deferred, data[:1])
    fresh.load_state_dict(deferred.state_dict())  # same keys and shapes before and after clustering
    deferred.eval(), fresh.eval()
    with torch.no_grad():
        assert torch.equal(fresh(x), deferred(x))


def test_strip_clustering_bakes_the_clustered_weights(data):
    x = data[0][0]
    clustered = amct_torch.cluster_weights(net(), ClusterConfig(clusters=4), x)
    with torch.no_grad():
        expected = clustered(x)
        w = clustered.c2.effective_weight().clone()
    strip_clustering(clustered)
    assert cluster_stage(clustered.c2) is None and torch.equal(clustered.c2.module.weight, w)
    with torch.no_grad():
        assert torch.allclose(clustered(x), expected, atol=1e-6)


def test_new_zeros_in_a_clustered_layer_without_a_mask_keep_the_cluster_count(data):
    x = data[0][0]
    clustered = amct_torch.cluster_weights(net(), ClusterConfig(clusters=4, preserve_sparsity=False), x)
    with torch.no_grad():  # one centroid next to zero: per-tensor int8 rounds it to 0
        clustered.fc.weight_pipeline[0].centroids[0, 0] = 1e-7
    q = amct_torch.prepare_qat(clustered, QatConfig(), x)
    row = next(r for r in check_preservation(q).rows if r.layer == "fc")
    assert row.zeros_after > row.zeros_before == 0 and not row.zeros_kept and row.ok

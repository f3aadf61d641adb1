"""Cross references (tied quantizers, folded BNs) follow DataParallel-style replicas."""

import copy

import torch
import torch.nn as nn
import torch.nn.functional as F

import amct_torch
from amct_torch import QatConfig
from amct_torch.nn.refs import module_references


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4)
        self.pool = nn.MaxPool2d(2)
        self.conv2 = nn.Conv2d(4, 4, 3, padding=1)

    def forward(self, x):
        x = self.pool(F.relu(self.bn1(self.conv1(x))))
        return self.conv2(x) + x


def replicate_like_data_parallel(network: nn.Module) -> nn.Module:
    """What torch.nn.parallel.replicate does to the module objects (shallow __dict__ copies, children
    re-linked), without moving tensors between devices (impossible on a CPU-only machine)."""
    modules = list(network.modules())
    index = {m: i for i, m in enumerate(modules)}
    replicas = [m._replicate_for_data_parallel() for m in modules]
    for m, r in zip(modules, replicas):
        for key, child in m._modules.items():
            r._modules[key] = None if child is None else replicas[index[child]]
        for key, param in m._parameters.items():  # replicate() sets parameter copies as plain attributes
            r.__dict__[key] = None if param is None else param.detach().clone().requires_grad_(param.requires_grad)
    return replicas[0]


def test_replicas_use_their_own_tied_quantizers_and_batch_norms():
    torch.manual_seed(0)
    x = torch.randn(4, 1, 8, 8)
    q = amct_torch.prepare_qat(Net(), QatConfig(), x)
    q(x)  # initialise the ranges
    refs = module_references(q)
    assert ("conv1", "_folded_bn", "bn1") in refs
    assert any(attr == "_tied" for _, attr, _ in refs)
    replica = replicate_like_data_parallel(q)
    stale = [(p, a) for p, a, t in refs if replica.get_submodule(p).__dict__[a] is not replica.get_submodule(t)]
    assert stale  # what replication leaves behind ...
    with torch.no_grad():
        y_replica, y = replica(x), q(x)
    for p, a, t in refs:  # ... and what the replica's first forward fixes
        assert replica.get_submodule(p).__dict__[a] is replica.get_submodule(t), (p, a)
        assert q.get_submodule(p).__dict__[a] is q.get_submodule(t)
    assert torch.equal(y_replica, y)
    clone = copy.deepcopy(q)  # deepcopy maps the references itself
    assert clone.conv1.folded_bn is clone.bn1

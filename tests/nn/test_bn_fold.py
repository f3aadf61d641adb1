"""Conv + BN trained folded: with live statistics the folded pair computes (and trains) what conv + BN do."""

import copy

import pytest
import torch
import torch.nn as nn

from amct_torch.nn import FoldedBatchNorm
from amct_torch.nn.layers import CompressedConv


@pytest.mark.parametrize("bias", [False, True])
def test_live_folded_pair_equals_conv_then_batch_norm(bias):
    torch.manual_seed(0)
    conv, bn = nn.Conv2d(3, 6, 3, padding=1, bias=bias), nn.BatchNorm2d(6)
    with torch.no_grad():
        bn.weight.uniform_(0.5, 2.0)
        bn.bias.uniform_(-1, 1)
        bn.running_var.uniform_(0.5, 3.0)
    ref_conv, ref_bn = copy.deepcopy(conv), copy.deepcopy(bn)
    folded = CompressedConv(conv)
    fbn = FoldedBatchNorm(bn, "conv")
    folded.attach_batch_norm(fbn)
    folded.train(), fbn.train(), ref_conv.train(), ref_bn.train()
    x = torch.randn(4, 3, 8, 8)
    g = torch.randn(4, 6, 8, 8)
    y = folded(x)
    y_ref = ref_bn(ref_conv(x))
    assert torch.allclose(y, y_ref, atol=1e-5)
    y.backward(g)
    y_ref.backward(g)
    assert torch.allclose(conv.weight.grad, ref_conv.weight.grad, atol=1e-4)
    assert torch.allclose(bn.weight.grad, ref_bn.weight.grad, atol=1e-4)
    assert torch.allclose(bn.bias.grad, ref_bn.bias.grad, atol=1e-4)
    if bias:  # cancelled by the batch mean, as in conv + BN
        assert torch.allclose(conv.bias.grad, ref_conv.bias.grad, atol=1e-4)
    assert torch.allclose(fbn.running_mean, ref_bn.running_mean, atol=1e-6)
    assert torch.allclose(fbn.running_var, ref_bn.running_var, atol=1e-6)
    assert int(fbn.num_batches_tracked) == int(ref_bn.num_batches_tracked) == 1
    # frozen / eval: the folded conv with the running statistics, as BN in eval does
    folded.eval(), fbn.eval(), ref_conv.eval(), ref_bn.eval()
    with torch.no_grad():
        assert torch.allclose(folded(x), ref_bn(ref_conv(x)), atol=1e-5)


def test_a_qat_model_deep_copies_after_training_and_eval_forwards():
    """Nothing computed in a forward (a non-leaf tensor) may stay on the modules: deepcopy (export, the
    Lightning callbacks, DataParallel) would fail on it."""
    import amct_torch
    from amct_torch import QatConfig

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU()).eval()
    x = torch.randn(2, 3, 8, 8)
    q = amct_torch.prepare_qat(model, QatConfig(batch_num=1), x)
    q.train()
    q(x).sum().backward()
    q.eval()
    q(x)
    with torch.no_grad():
        q[0].effective_weight()
    copy.deepcopy(q)

import pytest
import torch
from transformers.pytorch_utils import Conv1D

from amct_torch.zoo import build_model, gpt_shakespeare, mobilenetv2_digits, resnet_digits


def test_resnet20_shape_and_size():
    m = resnet_digits(depth=20)
    assert m(torch.randn(2, 1, 16, 16)).shape == (2, 10)
    assert sum(p.numel() for p in m.parameters()) == 272_186


def test_resnet_depth_must_be_6n_plus_2():
    with pytest.raises(ValueError, match="depth: got 21"):
        resnet_digits(depth=21)


def test_mobilenetv2_has_depthwise_convs_and_inverted_residuals():
    m = mobilenetv2_digits()
    assert m(torch.randn(2, 1, 16, 16)).shape == (2, 10)
    depthwise = [c for c in m.modules() if isinstance(c, torch.nn.Conv2d) and c.groups == c.in_channels > 1]
    assert len(depthwise) == 8
    assert sum(b.use_residual for b in m.features if hasattr(b, "use_residual")) == 5


def test_gpt_projections_are_transformers_conv1d():
    m = gpt_shakespeare(vocab_size=70, block_size=32, n_layer=2, n_embd=32, n_head=2)
    assert sum(isinstance(c, Conv1D) for c in m.modules()) == 8
    assert m(torch.randint(0, 70, (2, 32))).logits.shape == (2, 32, 70)


def test_build_model_rejects_unknown_names():
    with pytest.raises(ValueError, match="allowed: one of resnet_digits"):
        build_model("vgg")

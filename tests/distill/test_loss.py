"""BlockwiseLoss: the per-block loss of one batch, with gradients to the student's quantization parameters."""

import pytest
import torch

import amct_torch
from amct_torch.config import ConfigError, QatConfig
from amct_torch.distill import BlockwiseLoss, find_blocks, make_loss
from amct_torch.quant.qat_modules import UlqActivationQuantizer
from distill_helpers import image_batches, small_resnet


@pytest.fixture(scope="module")
def setup():
    teacher, batches = small_resnet(), image_batches(2)
    student = amct_torch.prepare_qat(teacher, QatConfig(weight_bits=4, activation_bits=4), batches[0])
    student.eval()
    with torch.no_grad():
        student(batches[0])  # initialise the clips
    return teacher, student, find_blocks(student, batches[0]), batches


def test_gradient_reaches_quant_params_and_weights(setup):
    teacher, student, blocks, batches = setup
    student.zero_grad(set_to_none=True)
    with BlockwiseLoss(teacher, student, blocks) as loss_fn:
        loss = loss_fn(batches[1])
        assert loss.dim() == 0 and loss.requires_grad
        loss.backward()
        assert set(loss_fn.last) == {b.name for b in blocks} and all(v > 0 for v in loss_fn.last.values())
    clips = [m.clip_max for m in student.modules() if isinstance(m, UlqActivationQuantizer) and m.tied_to is None]
    assert clips and all(c.grad is not None for c in clips) and any(float(c.grad.abs()) > 0 for c in clips)
    assert student.layer2.conv2.module.weight.grad is not None
    assert all(p.grad is None for p in teacher.parameters())
    # the hooks are gone after the with block
    assert not student.layer1._forward_hooks and not student.conv1._forward_pre_hooks


def test_recorded_forward_gives_the_same_loss(setup):
    teacher, student, blocks, batches = setup
    loss_fn = BlockwiseLoss(teacher, student, blocks, reduction="sum")
    try:
        direct = loss_fn(batches[0])
        with loss_fn.recording():
            logits = student(batches[0])  # the training step's own, complete forward
        assert logits.shape == (16, 5) and set(loss_fn.recorded) == {b.name for b in blocks}
        reused = loss_fn.loss_from_recorded(batches[0])
        assert torch.allclose(direct, reused)
        assert torch.isclose(reused, torch.tensor(sum(loss_fn.last.values())))
        with pytest.raises(RuntimeError, match="no student output recorded"):
            loss_fn.loss_from_recorded(batches[0])  # consumed
        student(batches[1])  # outside recording(): nothing is recorded
        assert loss_fn.recorded == {}
    finally:
        loss_fn.remove()
    with pytest.raises(RuntimeError, match="hooks were removed"):
        with loss_fn.recording():
            pass


def test_module_path_groups_and_errors(setup):
    teacher, student, _, batches = setup
    with BlockwiseLoss(teacher, student, [["layer1"], ["fc"]], loss="l1") as loss_fn:
        assert [b.name for b in loss_fn.blocks] == ["layer1", "fc"]
        assert float(loss_fn(batches[0]).detach()) > 0
    with pytest.raises(ValueError, match="same module"):
        BlockwiseLoss(student, student, [["fc"]])
    with pytest.raises(ConfigError, match="reduction"):
        BlockwiseLoss(teacher, student, [["fc"]], reduction="max")
    with pytest.raises(ConfigError, match="non-empty list"):
        BlockwiseLoss(teacher, student, [])


def test_make_loss():
    assert make_loss(None) is torch.nn.functional.mse_loss
    assert make_loss("l1") is torch.nn.functional.l1_loss
    fn = torch.nn.MSELoss()
    assert make_loss(fn) is fn
    with pytest.raises(ConfigError, match="'mse', 'l1', 'smooth_l1'"):
        make_loss("kl")
    with pytest.raises(ConfigError, match="callable"):
        make_loss(3)

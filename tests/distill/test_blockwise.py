"""Block-wise distillation: blocks get closer to the teacher, state is kept, nothing else is touched."""

import copy
import json

import pytest
import torch
import torch.nn as nn

import amct_torch
from amct_torch.config import ConfigError, QatConfig, QuantConfig
from amct_torch.config.distill import DistillConfig
from amct_torch.distill import DistillReport, distill_blockwise, find_blocks
from amct_torch.quant.qat_modules import LearnedActivationQuantizer
from amct_torch.quant.quantizers import ActivationQuantizer
from distill_helpers import image_batches, small_resnet


def qat_student(teacher, batches, **kw):
    return amct_torch.prepare_qat(teacher, QatConfig(**kw), batches[0])


def initialise(model, batches, n=1):
    model.eval()
    with torch.no_grad():
        for x in batches[:n]:
            model(x)


def output_mse(a, b, batches):
    with torch.no_grad():
        return float(sum(nn.functional.mse_loss(a(x), b(x)) for x in batches) / len(batches))


def params_of(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def test_distillation_lowers_every_block_error_and_the_output_error():
    teacher, batches = small_resnet(), image_batches()
    student = qat_student(teacher, batches, weight_bits=4, activation_bits=8)
    initialise(student, batches)
    student.eval()
    before = output_mse(student, teacher, batches)
    report = distill_blockwise(teacher, student, batches, DistillConfig(epochs=4, eval_batches=2), progress=False)
    assert [b.name for b in report.blocks] == ["conv1..relu", "layer1", "layer2", "fc"]
    for b in report.blocks:
        assert b.loss_after <= b.loss_before
        assert b.steps == 24 or "reverted" in b.note
        if "reverted" not in b.note:
            assert b.loss_after < b.loss_before and b.train_loss is not None
    assert sum(b.loss_after < b.loss_before for b in report.blocks) >= 2
    assert report.output_loss_after < report.output_loss_before
    assert output_mse(student, teacher, batches) < before
    # the report prints and serialises
    text = str(report)
    assert "loss before" in text and "layer2" in text and "model output loss" in text
    json.dumps(report.to_dict())
    assert report["layer1"].improvement > 0
    with pytest.raises(KeyError, match="no block 'nope'"):
        report["nope"]


def test_without_revert_the_residual_blocks_still_improve():
    teacher, batches = small_resnet(1), image_batches(seed=11)
    student = qat_student(teacher, batches, weight_bits=4, activation_bits=4)
    report = distill_blockwise(teacher, student, batches, DistillConfig(epochs=3, eval_batches=2, revert_worse=False),
                               progress=False)
    for name in ("layer1", "layer2", "fc"):
        assert report[name].loss_after < report[name].loss_before
    assert not any("reverted" in b.note for b in report.blocks)


def test_state_is_kept_and_everything_else_restored():
    teacher, batches = small_resnet(), image_batches(4)
    student = qat_student(teacher, batches, weight_bits=4, activation_bits=8, batch_num=2)
    teacher.train()  # modes come back as they were
    t_state = copy.deepcopy(teacher.state_dict())
    frozen = student.layer1.conv1.module.weight
    frozen.requires_grad_(False)  # the user's freezes are respected and restored
    bn_stats = student.layer1.bn1.running_mean.clone()
    w = frozen.detach().clone()
    report = distill_blockwise(teacher, student, batches, DistillConfig(eval_batches=1), progress=False)
    assert teacher.training and teacher.bn1.training and student.training
    assert all(torch.equal(v, teacher.state_dict()[k]) for k, v in t_state.items())
    assert not frozen.requires_grad and torch.equal(frozen, w)
    assert all(p.requires_grad for n, p in student.named_parameters() if p is not frozen and "clip_min" not in n)
    assert torch.equal(student.layer1.bn1.running_mean, bn_stats)  # eval-mode BN: statistics untouched
    # every learned quantizer initialised over exactly batch_num forwards, from the units' first batches
    qs = [q for q in student.modules() if isinstance(q, LearnedActivationQuantizer)]
    assert qs and all(q.is_calibrated for q in qs)
    assert all(int(q.batches_seen) == 2 for q in qs if q.tied_to is None)
    assert report.output_loss_before is None and report.output_loss_after is not None  # before: not initialised


def test_teacher_and_auto_inputs():
    teacher, batches = small_resnet(), image_batches(4)
    student = qat_student(teacher, batches, weight_bits=4, activation_bits=4)
    report = distill_blockwise(teacher, student, batches, DistillConfig(block_input="teacher", eval_batches=1),
                               progress=False)
    assert all(b.teacher_inputs == b.steps == 4 for b in report.blocks)
    student = qat_student(teacher, batches, weight_bits=4, activation_bits=4)
    auto = distill_blockwise(teacher, student, batches, DistillConfig(block_input="auto", auto_threshold=1e-9,
                                                                      eval_batches=1), progress=False)
    # a tiny threshold: every drifted input is replaced (the stem's input is the model input itself)
    assert auto.blocks[0].teacher_inputs == 0 and all(b.teacher_inputs == 4 for b in auto.blocks[1:])


def test_cached_teacher_gives_the_same_result():
    teacher, batches = small_resnet(), image_batches(4)
    results = []
    for cache in (False, True):
        student = qat_student(teacher, batches, weight_bits=4, activation_bits=8)
        cfg = DistillConfig(epochs=2, cache_teacher=cache, max_batches_per_epoch=3, eval_batches=0)
        report = distill_blockwise(teacher, student, batches, cfg, progress=False)
        assert all(b.steps == 6 and b.loss_before is None for b in report.blocks)
        results.append(params_of(student))
    assert all(torch.allclose(results[0][k], results[1][k]) for k in results[0])


def test_ptq_student_trains_weights_against_fixed_factors():
    teacher, batches = small_resnet(), image_batches(4)
    student = amct_torch.quantize(teacher, QuantConfig(weight_bits=4), batches[0])
    amct_torch.calibrate(student, batches[:1], progress=False)
    factors = {n: (float(q.scale), int(q.offset)) for n, q in student.named_modules() if isinstance(q, ActivationQuantizer)}
    w = student.layer1.conv2.module.weight.detach().clone()
    report = distill_blockwise(teacher, student, batches, DistillConfig(epochs=2, eval_batches=2, revert_worse=False),
                               progress=False)
    assert report.output_loss_before is not None
    assert not torch.equal(student.layer1.conv2.module.weight, w)
    assert factors == {n: (float(q.scale), int(q.offset)) for n, q in student.named_modules()
                       if isinstance(q, ActivationQuantizer)}
    assert report["layer1"].loss_after < report["layer1"].loss_before


def test_pruned_student_keeps_its_masks():
    from amct_torch.config.sparsity import MagnitudeConfig
    from amct_torch.sparsity import prune_magnitude

    teacher, batches = small_resnet(), image_batches(3)
    pruned = prune_magnitude(teacher, MagnitudeConfig(sparsity=0.5, schedule="oneshot"), batches[0])
    student = amct_torch.prepare_qat(pruned, QatConfig(weight_bits=8), batches[0])
    zeros = {n: (m.effective_weight() == 0) for n, m in student.named_modules() if hasattr(m, "effective_weight")}
    distill_blockwise(teacher, student, batches, DistillConfig(eval_batches=0), progress=False)
    for n, m in student.named_modules():
        if n in zeros:
            assert torch.all(m.effective_weight()[zeros[n]] == 0)


def test_train_only_quant_params_or_only_weights():
    teacher, batches = small_resnet(), image_batches(3)
    student = qat_student(teacher, batches)
    before = params_of(student)
    distill_blockwise(teacher, student, batches, DistillConfig(train_weights=False, eval_batches=0), progress=False)
    after = params_of(student)
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all("clip" in k for k in changed)
    student = qat_student(teacher, batches)
    initialise(student, batches)
    clips = {n: p.detach().clone() for n, p in student.named_parameters() if "clip" in n}
    distill_blockwise(teacher, student, batches, DistillConfig(train_quant_params=False, eval_batches=0), progress=False)
    assert all(torch.equal(p, clips[n]) for n, p in student.named_parameters() if "clip" in n)


def test_optimizer_instance_factory_and_custom_loss():
    teacher, batches = small_resnet(), image_batches(3)
    blocks = find_blocks(teacher, batches[0])[1:2]  # layer1 only
    student = qat_student(teacher, batches)
    seen = []

    def loss(s, t):
        seen.append(s.shape)
        return (s - t).abs().mean()

    sgd = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=0.05, momentum=0.5)
    report = distill_blockwise(teacher, student, batches, DistillConfig(eval_batches=0), blocks=blocks, loss=loss,
                               optimizer=sgd, progress=False)
    assert [b.name for b in report.blocks] == ["layer1"] and len(seen) == 3 and seen[0] == (16, 8, 8, 8)
    made = []

    def factory(groups):
        made.append(groups)
        return torch.optim.Adam(groups, lr=1e-4)

    distill_blockwise(teacher, student, batches, DistillConfig(eval_batches=0), blocks=[["layer2"]], optimizer=factory,
                      progress=False)
    assert len(made) == 1 and len(made[0]) == 2  # weights, then quantization parameters
    with pytest.raises(ConfigError, match="optimizer"):
        distill_blockwise(teacher, student, batches, blocks=[["fc"]], optimizer="adamw", progress=False)


def test_dict_batches_and_input_fn_for_a_transformer():
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    teacher = GPT2LMHeadModel(GPT2Config(vocab_size=64, n_positions=16, n_embd=16, n_layer=2, n_head=2,
                                         bos_token_id=0, eos_token_id=0)).eval()
    g = torch.Generator().manual_seed(0)
    data = [{"input_ids": torch.randint(0, 64, (4, 8), generator=g), "labels": None} for _ in range(3)]
    student = amct_torch.prepare_qat(teacher, QatConfig(), {"input_ids": data[0]["input_ids"]})
    report = distill_blockwise(teacher, student, data, DistillConfig(eval_batches=1),
                               input_fn=lambda b: {"input_ids": b["input_ids"]}, progress=False)
    assert [b.name for b in report.blocks] == ["transformer.h.0", "transformer.h.1", "lm_head"]
    assert all(b.steps == 3 for b in report.blocks[:2])
    assert "shared outside the block" in report["lm_head"].note  # lm_head's weight is tied to the embedding


def test_bad_inputs():
    teacher, batches = small_resnet(), image_batches(2)
    student = qat_student(teacher, batches)
    with pytest.raises(ValueError, match="same module"):
        distill_blockwise(teacher, teacher, batches)
    with pytest.raises(TypeError, match="iterator"):
        distill_blockwise(teacher, student, iter(batches))
    with pytest.raises(ValueError, match="data is empty"):
        distill_blockwise(teacher, student, [])
    with pytest.raises(ConfigError, match="a DistillConfig"):
        distill_blockwise(teacher, student, batches, {"epochs": 1})
    with pytest.raises(ConfigError, match="loss"):
        distill_blockwise(teacher, student, batches, loss="kl")
    other = nn.Sequential(nn.Conv2d(3, 8, 3))
    with pytest.raises(ValueError, match="'layer1' is not a module of the teacher"):
        distill_blockwise(other, student, batches, blocks=[["layer1"]])
    with pytest.raises(TypeError, match="no default model input"):
        distill_blockwise(teacher, student, [3.0])


def test_config_validation():
    assert DistillConfig().short() == "distill adamw lr 0.001, 1 epoch(s), mse, student inputs, group 1"
    cfg = DistillConfig(epochs=2, block_input="teacher", quant_lr=1e-2, max_batches_per_epoch=4)
    assert DistillConfig.from_dict(cfg.to_dict()) == cfg
    for kwargs, match in [({"epochs": 0}, "epochs"), ({"lr": 0.0}, "lr"), ({"block_input": "x"}, "block_input"),
                          ({"optimizer": "lbfgs"}, "optimizer"), ({"group_size": 0}, "group_size"),
                          ({"train_weights": False, "train_quant_params": False}, "at least one"),
                          ({"max_batches_per_epoch": 0}, "max_batches_per_epoch"), ({"loss": "kl"}, "loss")]:
        with pytest.raises(ConfigError, match=match):
            DistillConfig(**kwargs)


def test_report_type():
    report = DistillReport(DistillConfig())
    assert "0 units" in str(report) and report.to_dict()["blocks"] == []


def test_a_decomposed_student_distills_against_its_undecomposed_teacher():
    """The factors of a decomposed layer (conv1.0, conv1.1, ...) have no teacher counterpart: the blocks
    around them merge up to the layer the teacher has, and distillation lowers every block's error."""
    from amct_torch import DecomposeConfig, QatConfig, decompose, prepare_qat
    from amct_torch.distill import BlockwiseLoss, find_blocks
    from amct_torch.zoo import resnet_digits

    torch.manual_seed(0)
    teacher = resnet_digits(depth=8).eval()
    x = torch.randn(2, 1, 16, 16)
    small, plan = decompose(teacher, DecomposeConfig(conv_method="tucker2", rank_selection="macs", macs_ratio=0.5), x)
    assert "conv1" in plan.changes()
    student = prepare_qat(small, QatConfig(batch_num=1), x)
    raw = find_blocks(student, x)
    assert any(b.start == "conv1.0" for b in raw)                    # the student's own blocks start inside conv1
    loss = BlockwiseLoss(teacher, student, raw)
    assert [b.name for b in loss.blocks][:2] == ["conv1..relu", "layer1.0"]
    assert all(b.start != "conv1.0" for b in loss.blocks)
    loss.remove()
    data = [torch.randn(8, 1, 16, 16, generator=torch.Generator().manual_seed(i)) for i in range(2)]
    report = distill_blockwise(teacher, student, data, DistillConfig(lr=1e-3, epochs=2), progress=False)
    assert report.blocks[0].name == "conv1..relu"
    assert all(b.loss_after <= b.loss_before for b in report.blocks)

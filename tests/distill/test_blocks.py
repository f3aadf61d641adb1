"""Finding distillation blocks: residual, transformer, sequential blocks and layer groups; explicit groups."""

import pytest
import torch
import torch.nn as nn

import amct_torch
from amct_torch.config import ConfigError, QatConfig
from amct_torch.distill import Block, blocks_from_groups, blocks_table, find_blocks, merge_blocks
from amct_torch.distill.blocks import call_order
from amct_torch.distill.probe import BlockProbe, run_to_end
from amct_torch.quant.qat_modules import LearnedActivationQuantizer
from amct_torch.zoo.models import MobileNetV2Digits, ResNetDigits

X16 = torch.randn(2, 1, 16, 16)


@pytest.fixture(scope="module")
def resnet():
    torch.manual_seed(0)
    return ResNetDigits(depth=20).eval()


@pytest.fixture(scope="module")
def resnet_blocks(resnet):
    return find_blocks(resnet, X16)


def test_resnet_blocks_stem_group_nine_basic_blocks_and_fc(resnet_blocks):
    names = [b.name for b in resnet_blocks]
    stages = [f"layer{s}.{i}" for s in (1, 2, 3) for i in range(3)]
    assert names == ["conv1..relu"] + stages + ["fc"]
    stem, fc = resnet_blocks[0], resnet_blocks[-1]
    assert (stem.kind, stem.modules, stem.start, stem.end, stem.layers) == \
        ("layer_group", ("conv1", "bn1", "relu"), "conv1", "relu", ("conv1",))
    assert (fc.kind, fc.modules, fc.start, fc.end) == ("layer_group", ("fc",), "fc", "fc")
    for b in resnet_blocks[1:-1]:
        assert (b.kind, b.modules, b.start, b.end) == ("residual", (b.name,), b.name, b.name)
    # the projection shortcut belongs to its block, and runs first
    assert resnet_blocks[4].layers == ("layer2.0.downsample.0", "layer2.0.conv1", "layer2.0.conv2")
    assert resnet_blocks[0].group() == ["conv1", "bn1", "relu"]
    table = blocks_table(resnet_blocks)
    assert "layer3.2" in table and "residual" in table and "layer_group" in table


def test_qat_student_has_the_teachers_blocks_and_keeps_its_state():
    torch.manual_seed(0)
    teacher = ResNetDigits(depth=8, widths=(4, 8, 8)).eval()
    student = amct_torch.prepare_qat(teacher, QatConfig(), X16)
    blocks = find_blocks(student, X16)
    assert [(b.name, b.kind, b.modules, b.start, b.end, b.layers) for b in blocks] == \
        [(b.name, b.kind, b.modules, b.start, b.end, b.layers) for b in find_blocks(teacher, X16)]
    assert [b.name for b in blocks] == ["conv1..relu", "layer1.0", "layer2.0", "layer3.0", "fc"]
    # the quantizer placed after the stem's relu quantizes layer1.0's input: it trains with layer1.0
    assert "relu_quant" in blocks[1].extra and blocks[1].contains("relu_quant")
    # probing ran on a copy: no quantizer observed the example input
    assert all(int(q.batches_seen) == 0 for q in student.modules() if isinstance(q, LearnedActivationQuantizer))


def test_mobilenetv2_blocks():
    torch.manual_seed(0)
    blocks = find_blocks(MobileNetV2Digits().eval(), X16)
    kinds = {b.name: b.kind for b in blocks}
    assert [b.name for b in blocks] == [f"features.{i}" for i in range(10)] + ["classifier.1"]
    assert kinds["features.0"] == kinds["features.9"] == kinds["classifier.1"] == "layer_group"
    assert [n for n, k in kinds.items() if k == "residual"] == ["features.1", "features.3", "features.5", "features.6",
                                                                  "features.8"]
    # inverted residuals without a skip (stride or width change) are blocks of the same class
    assert [n for n, k in kinds.items() if k == "sequential"] == ["features.2", "features.4", "features.7"]
    stem = blocks[0]
    assert stem.modules == ("features.0.0", "features.0.1", "features.0.2")
    assert (stem.start, stem.end) == ("features.0.0", "features.0.2")
    assert blocks[2].layers == ("features.2.conv.0", "features.2.conv.3", "features.2.conv.6")


def test_transformer_blocks_of_gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=64, n_positions=16, n_embd=16, n_layer=2, n_head=2,
                                       bos_token_id=0, eos_token_id=0)).eval()
    blocks = find_blocks(model, torch.randint(0, 64, (2, 8)))
    assert [(b.name, b.kind) for b in blocks] == [("transformer.h.0", "transformer"), ("transformer.h.1", "transformer"),
                                                  ("lm_head", "layer_group")]
    assert blocks[0].layers == ("transformer.h.0.attn.c_attn", "transformer.h.0.attn.c_proj",
                                "transformer.h.0.mlp.c_fc", "transformer.h.0.mlp.c_proj")
    assert (blocks[1].start, blocks[1].end) == ("transformer.h.1", "transformer.h.1")


def test_group_size_merges_consecutive_blocks(resnet_blocks):
    merged = merge_blocks(resnet_blocks, 2)
    assert len(merged) == 6
    first = merged[0]
    assert (first.name, first.kind, first.start, first.end) == ("conv1..layer1.0", "merged", "conv1", "layer1.0")
    assert first.modules == ("conv1", "bn1", "relu", "layer1.0")
    assert merged[1].kind == "residual" and merged[1].modules == ("layer1.1", "layer1.2")
    assert merged[-1] is resnet_blocks[-1]  # an odd block out stays as it is
    with pytest.raises(ConfigError, match="group_size"):
        merge_blocks(resnet_blocks, 0)


def test_find_blocks_refuses_without_inputs_or_layers():
    with pytest.raises(ValueError, match="example_inputs is required"):
        find_blocks(ResNetDigits(depth=8), None)
    with pytest.raises(ValueError, match="nothing to distill"):
        find_blocks(nn.Sequential(nn.ReLU(), nn.Tanh()), torch.randn(2, 3))


class Twice(nn.Module):
    """Calls one ReLU module after two different layers."""

    def __init__(self):
        super().__init__()
        self.fc1, self.fc2, self.relu, self.head = nn.Linear(4, 4), nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2)

    def forward(self, x):
        return self.head(self.relu(self.fc2(self.relu(self.fc1(x)))))


def test_explicit_groups_and_a_reused_end_module():
    torch.manual_seed(0)
    model, x = Twice().eval(), torch.randn(3, 4)
    blocks = blocks_from_groups(model, [["fc1"], ["fc2", "relu"], ["head"]], x)
    assert [(b.name, b.kind, b.start, b.end, b.layers) for b in blocks] == [
        ("fc1", "group", "fc1", "fc1", ("fc1",)), ("fc2..relu", "group", "fc2", "relu", ("fc2",)),
        ("head", "group", "head", "head", ("head",))]
    # the group ends at relu's first call *after* fc2 started, not at its first call overall
    with BlockProbe(model, "fc2", "relu") as probe:
        out = run_to_end(model, ((x,), {}), probe)
    assert torch.equal(out, model.relu(model.fc2(model.relu(model.fc1(x)))))
    # auto detection: relu already belongs to fc1's group, so fc2's group is fc2 alone
    auto = find_blocks(model, x)
    assert [b.modules for b in auto] == [("fc1", "relu"), ("fc2",), ("head",)]


@pytest.mark.parametrize("groups, match", [
    ([], "non-empty list of groups"),
    ("conv1", "non-empty list of groups"),
    ([["conv1"], []], r"distill_group\[1\]: got \[\]; allowed: a non-empty list"),
    ([["conv1"], "bn1"], r"distill_group\[1\]: got 'bn1'; allowed: a list of module paths"),
    ([["conv1", "bnn1"]], r"distill_group\[0\]\[1\]: got 'bnn1'.*did you mean 'bn1'"),
    ([["conv1"], ["conv1", "bn1"]], r"distill_group\[1\]\[0\].*already in distill_group\[0\]"),
    ([["conv1", "conv1"]], r"each module in one group once"),
    ([["layer1.0"], ["layer1.0.conv1"]], r"outside 'layer1.0', which distill_group\[0\] already holds"),
    ([["layer1.0"], ["conv1", "bn1", "relu"]], r"distill_group\[1\].*groups in execution order"),
    ([["relu", "conv1"]], r"start first, end last: 'conv1' runs before 'relu'"),
])
def test_distill_group_validation(resnet, groups, match):
    with pytest.raises(ConfigError, match=match):
        blocks_from_groups(resnet, groups, X16)


def test_uncalled_module_in_a_group():
    class Unused(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc, self.spare = nn.Linear(4, 4), nn.Linear(4, 4)

        def forward(self, x):
            return self.fc(x)

    with pytest.raises(ConfigError, match="never called"):
        blocks_from_groups(Unused(), [["fc"], ["spare"]], torch.randn(1, 4))


def test_call_order_is_execution_order_and_restores_modes(resnet):
    resnet.train()
    try:
        trace = call_order(resnet, X16)
        assert resnet.training and resnet.bn1.training
    finally:
        resnet.eval()
    order = trace.order
    # the shortcut of layer2.0 runs before its conv1; every module once
    assert order.index("layer2.0.downsample.0") < order.index("layer2.0.conv1")
    assert trace.counts["layer1.0.conv1"] == 1 and order[0] == "conv1"


def test_block_dict_and_contains():
    b = Block("layer1.0", "residual", ("layer1.0",), ("layer1.0.conv1",), "layer1.0", "layer1.0", ("relu_quant",))
    assert b.contains("layer1.0.bn1") and b.contains("relu_quant") and not b.contains("layer1.01")
    assert b.to_dict() == {"name": "layer1.0", "kind": "residual", "modules": ["layer1.0"], "layers": ["layer1.0.conv1"],
                           "start": "layer1.0", "end": "layer1.0", "extra": ["relu_quant"]}
    assert "residual" in str(b)


def test_layer_groups_without_data_flow():
    from reference_nets import DataDependentNet

    torch.manual_seed(0)
    model, x = DataDependentNet().eval(), torch.randn(2, 3, 6, 6)
    blocks = find_blocks(model, x)  # neither fx nor torch.export capture it: the call order decides
    assert [(b.modules, b.start, b.end) for b in blocks] == [(("conv", "bn"), "conv", "bn"), (("fc",), "fc", "fc")]
    student = amct_torch.prepare_qat(model, QatConfig(), x)
    assert [b.modules for b in find_blocks(student, x)] == [("conv", "bn"), ("fc",)]

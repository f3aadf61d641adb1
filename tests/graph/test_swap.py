"""Module swap: supported layers become wrappers as targeting decides; the plan says what and why."""

from __future__ import annotations

import re

import pytest
import torch
import torch.nn as nn

from amct_torch.config import QuantConfig, Targeting
from amct_torch.graph import capture, swap_layers
from amct_torch.nn import CompressedConv, CompressedConv1D, CompressedLayer, CompressedLinear

CFG = QuantConfig()
W4 = QuantConfig(weight_bits=4, activation_bits=None)


def wrapped_names(model: nn.Module) -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, CompressedLayer)]


def same_output(a: nn.Module, b: nn.Module, *args, **kwargs) -> bool:
    with torch.no_grad():
        return torch.equal(a(*args, **kwargs), b(*args, **kwargs))


class Zero(nn.Module):
    def forward(self, w: torch.Tensor) -> torch.Tensor:
        return torch.zeros_like(w)


# -- the basic swap -----------------------------------------------------------------------------------
def test_swapped_model_output_equals_the_original(conv_bn_net, image):
    swapped, plan = swap_layers(conv_bn_net, CFG, image)
    assert wrapped_names(swapped) == ["conv1", "conv2", "conv3", "pool", "fc"]
    assert isinstance(swapped.conv1, CompressedConv) and isinstance(swapped.fc, CompressedLinear)
    assert same_output(swapped, conv_bn_net, image)
    assert plan.wrapped() == ["conv1", "conv2", "conv3", "pool", "fc"]


def test_plan_lists_every_layer_with_action_and_decider(conv_bn_net, image):
    _, plan = swap_layers(conv_bn_net, Targeting(CFG, module_type={"Linear": W4}), image)
    rows = [(lp.name, lp.layer_type, lp.action, lp.source) for lp in plan.layers]
    assert rows == [
        ("conv1", "Conv2d", "wrap", "global"),
        ("bn1", "BatchNorm2d", "unsupported", ""),
        ("conv2", "Conv2d", "wrap", "global"),
        ("bn2", "BatchNorm2d", "unsupported", ""),
        ("conv3", "Conv2d", "wrap", "global"),
        ("bn3", "BatchNorm2d", "unsupported", ""),
        ("pool", "AvgPool2d", "wrap", "global"),
        ("fc", "Linear", "wrap", "module_type['Linear']"),
    ]
    assert plan["conv1"].detail == CFG.short()
    assert plan["fc"].detail == "W4 per_channel / A-"
    assert plan["bn1"].detail == "no wrapper for BatchNorm2d"


def test_str_of_plan_has_a_header_line_and_the_layer_names(conv_bn_net, image):
    _, plan = swap_layers(conv_bn_net, CFG, image, title="quantize")
    text = str(plan)
    lines = text.splitlines()
    assert lines[0] == "quantize: 5 of 8 layers"
    assert lines[1].startswith("capture: fx")
    header = next(line for line in lines if line.startswith("layer "))
    assert re.fullmatch(r"layer\s+type\s+action\s+detail\s+decided by", header)
    for name in ["conv1", "bn1", "conv2", "conv3", "pool", "fc"]:
        assert any(line.startswith(name + " ") for line in lines), name


def test_plan_to_dict_lists_the_layers(conv_bn_net, image):
    _, plan = swap_layers(conv_bn_net, CFG, image)
    data = plan.to_dict()
    assert data["title"] == "swap"
    assert [d["name"] for d in data["layers"]] == [lp.name for lp in plan.layers]


def test_targeting_must_be_a_targeting_or_a_config(conv_bn_net):
    with pytest.raises(TypeError, match="allowed: Targeting or a Config"):
        swap_layers(conv_bn_net, {"weight_bits": 8})


# -- targeting decisions ------------------------------------------------------------------------------
def test_none_entry_leaves_the_layer_alone_and_says_so(conv_bn_net, image):
    swapped, plan = swap_layers(conv_bn_net, Targeting(CFG, module_name={"fc": None}), image)
    assert type(swapped.fc) is nn.Linear
    assert plan["fc"].action == "skip"
    assert plan["fc"].detail == "targeting gives no config"
    assert plan["fc"].source == "module_name['fc']"


def test_skip_entry_leaves_layers_alone_and_says_so(conv_bn_net, image):
    swapped, plan = swap_layers(conv_bn_net, Targeting(CFG, skip=["conv*"]), image)
    assert wrapped_names(swapped) == ["pool", "fc"]
    for name in ["conv1", "conv2", "conv3"]:
        assert plan[name].action == "skip"
        assert plan[name].detail == "in skip list"
        assert plan[name].source == "skip['conv*']"


def test_no_global_config_wraps_only_what_is_targeted(conv_bn_net, image):
    swapped, plan = swap_layers(conv_bn_net, Targeting(module_name={"conv2": W4}), image)
    assert wrapped_names(swapped) == ["conv2"]
    assert plan["conv1"].detail == "targeting gives no config" and plan["conv1"].source == "global"


def test_unused_targeting_entry_is_a_warning(conv_bn_net, image):
    _, plan = swap_layers(conv_bn_net, Targeting(CFG, module_name={"fcc": None}), image)
    assert plan.warnings == ["targeting entry module_name['fcc'] matched no layer"]
    assert "warning: targeting entry module_name['fcc'] matched no layer" in str(plan)


# -- layers that must stay unwrapped ------------------------------------------------------------------
def test_shared_module_is_skipped_under_both_names(shared_module_net, vector):
    swapped, plan = swap_layers(shared_module_net, CFG, vector)
    assert plan["encoder"].action == "skip"
    assert plan["encoder"].detail == "shared: the same module is also registered as decoder"
    assert plan["decoder"].action == "skip"
    assert plan["decoder"].detail == "shared: the same module is also registered as encoder"
    assert wrapped_names(swapped) == ["head"]
    assert swapped.encoder is swapped.decoder
    assert same_output(swapped, shared_module_net, vector)


def test_reused_module_is_skipped(reused_module_net, vector):
    swapped, plan = swap_layers(reused_module_net, CFG, vector)
    assert plan["fc1"].action == "skip"
    assert plan["fc1"].detail.startswith("called 2 times in one forward (reused)")
    assert wrapped_names(swapped) == ["fc2"]
    assert same_output(swapped, reused_module_net, vector)


class NeverCalled(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(8, 8)
        self.spare = nn.Linear(8, 8)

    def forward(self, x):
        return self.fc(x)


def test_layer_never_called_is_skipped(vector):
    swapped, plan = swap_layers(NeverCalled(), CFG, vector)
    assert plan["spare"].detail == "never called in forward (capture: fx)"
    assert wrapped_names(swapped) == ["fc"]


class WithAttention(nn.Module):
    def __init__(self):
        super().__init__()
        self.attn = nn.MultiheadAttention(8, 2, batch_first=True)
        self.fc = nn.Linear(8, 8)

    def forward(self, x):
        return self.fc(self.attn(x, x, x, need_weights=False)[0])


def test_linear_inside_multihead_attention_is_skipped():
    torch.manual_seed(0)
    model, x = WithAttention().eval(), torch.randn(2, 5, 8)
    swapped, plan = swap_layers(model, CFG, x)
    assert plan["attn.out_proj"].action == "skip"
    assert "read directly by the parent MultiheadAttention" in plan["attn.out_proj"].detail
    assert plan["attn"].action == "unsupported"
    assert wrapped_names(swapped) == ["fc"]
    assert same_output(swapped, model, x)


class ReluLinear(nn.Linear):
    def forward(self, x):
        return torch.relu(super().forward(x))


def test_subclass_with_own_forward_is_reported_unsupported(vector):
    model = nn.Sequential(ReluLinear(8, 8), nn.Linear(8, 2))
    swapped, plan = swap_layers(model, CFG, vector)
    assert plan["0"].action == "unsupported"
    assert plan["0"].detail == "ReluLinear overrides forward; a wrapper would bypass it"
    assert wrapped_names(swapped) == ["1"]


def test_swapping_twice_does_not_wrap_a_wrapper(conv_bn_net, image):
    once, _ = swap_layers(conv_bn_net, CFG, image)
    twice, plan = swap_layers(once, CFG, image)
    assert plan.wrapped() == []
    assert plan["fc"].detail == "already wrapped"
    assert type(twice.fc.module) is nn.Linear
    assert same_output(twice, conv_bn_net, image)


# -- attach hook --------------------------------------------------------------------------------------
def test_attach_is_called_once_per_wrapped_layer_before_install(conv_bn_net, image):
    calls = []

    def attach(name, wrapper, config):
        # not installed yet: the model still holds the original layer, which the wrapper wraps
        calls.append((name, type(wrapper), config, conv_bn_net.get_submodule(name) is wrapper.module))

    targeting = Targeting(CFG, module_name={"fc": W4})
    swapped, plan = swap_layers(conv_bn_net, targeting, image, attach=attach, inplace=True)
    assert [c[0] for c in calls] == plan.wrapped() == ["conv1", "conv2", "conv3", "pool", "fc"]
    assert all(c[3] for c in calls)
    assert calls[0][1] is CompressedConv and calls[-1][1] is CompressedLinear
    assert [c[2] for c in calls] == [CFG, CFG, CFG, CFG, W4]


def test_state_created_by_attach_is_used_in_forward(conv_bn_net, image):
    stages = {}

    def attach(name, wrapper, config):
        stages[name] = Zero()
        wrapper.weight_pipeline.append(stages[name])

    swapped, _ = swap_layers(conv_bn_net, Targeting(module_name={"fc": CFG}), image, attach=attach)
    assert list(stages) == ["fc"]
    assert swapped.fc.weight_pipeline[0] is stages["fc"]
    with torch.no_grad():
        out = swapped(image)
    assert torch.equal(out, swapped.fc.bias.expand_as(out))  # zero weight: only the bias is left


# -- inplace ------------------------------------------------------------------------------------------
def test_original_model_is_unchanged_when_not_inplace(conv_bn_net, image):
    types_before = [(n, type(m)) for n, m in conv_bn_net.named_modules()]
    swapped, _ = swap_layers(conv_bn_net, CFG, image)
    assert swapped is not conv_bn_net
    assert [(n, type(m)) for n, m in conv_bn_net.named_modules()] == types_before
    assert wrapped_names(conv_bn_net) == []
    assert swapped.fc.module is not conv_bn_net.fc


def test_inplace_swaps_the_given_model(conv_bn_net, image):
    fc = conv_bn_net.fc
    swapped, _ = swap_layers(conv_bn_net, CFG, image, inplace=True)
    assert swapped is conv_bn_net
    assert conv_bn_net.fc.module is fc


def test_a_graph_captured_beforehand_is_reused(conv_bn_net, image):
    graph = capture(conv_bn_net, image)
    swapped, plan = swap_layers(conv_bn_net, CFG, graph=graph)
    assert plan.capture == graph.report()
    assert len(plan.wrapped()) == 5


def test_unwrapped_checkpoint_loads_into_the_swapped_model(conv_bn_net, image, randomize_bn):
    swapped, _ = swap_layers(conv_bn_net, CFG, image)
    donor = randomize_bn(type(conv_bn_net)(), seed=5).eval()
    swapped.load_state_dict(donor.state_dict())
    assert same_output(swapped, donor, image)


# -- capture fallbacks --------------------------------------------------------------------------------
def test_swap_works_on_the_module_walk_fallback(data_dependent_net, image):
    swapped, plan = swap_layers(data_dependent_net, CFG, image)
    assert "capture: module_walk" in plan.capture
    assert wrapped_names(swapped) == ["conv", "fc"]
    assert same_output(swapped, data_dependent_net, image)
    assert same_output(swapped, data_dependent_net, -image)  # the other branch too


def test_swap_works_on_the_export_fallback(shape_dependent_net, image):
    swapped, plan = swap_layers(shape_dependent_net, CFG, image)
    assert "capture: export" in plan.capture
    assert wrapped_names(swapped) == ["conv", "fc"]
    assert same_output(swapped, shape_dependent_net, image)


# -- transformers -------------------------------------------------------------------------------------
def test_gpt2_every_conv1d_is_wrapped_and_logits_are_equal():
    transformers = pytest.importorskip("transformers")
    from transformers.pytorch_utils import Conv1D

    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(
        transformers.GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=64, n_positions=64)).eval()
    ids = torch.randint(0, 64, (2, 10))
    conv1d = [n for n, m in model.named_modules() if isinstance(m, Conv1D)]
    assert len(conv1d) == 8 and {n.rsplit(".", 1)[-1] for n in conv1d} == {"c_attn", "c_proj", "c_fc"}
    swapped, plan = swap_layers(model, CFG, {"input_ids": ids})
    for name in conv1d:
        assert plan[name].action == "wrap"
        assert isinstance(swapped.get_submodule(name), CompressedConv1D)
    with torch.no_grad():
        assert torch.equal(swapped(input_ids=ids).logits, model(input_ids=ids).logits)


BERT_LINEAR = re.compile(r"encoder\.layer\.\d+\.(attention\.self\.(query|key|value)|attention\.output\.dense"
                         r"|intermediate\.dense|output\.dense)")


def test_bert_all_attention_and_ffn_linears_are_wrapped_and_outputs_equal(bert):
    model, inputs = bert
    swapped, plan = swap_layers(model, CFG, inputs)
    targets = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and BERT_LINEAR.fullmatch(n)]
    assert len(targets) == 36
    assert all(plan[n].action == "wrap" for n in targets)
    assert all(isinstance(swapped.get_submodule(n), CompressedLinear) for n in targets)
    assert not [n for n, m in swapped.named_modules() if type(m) is nn.Linear and ".module" not in n]
    assert wrapped_names(model) == []
    with torch.no_grad():
        expected = model(**inputs).last_hidden_state
        assert torch.equal(swapped(**inputs).last_hidden_state, expected)


# -- layers that a wrapper would silently bypass ------------------------------------------------------
def test_forward_hook_on_a_layer_still_runs_after_swap_or_the_layer_is_skipped(vector):
    # Regression test (was a bug in amct_torch/graph/swap.py, swap_layers / amct_torch/nn/base.py, wrapper_for): hooks registered on the
    # original layer (user hooks, torch.nn.utils.prune / weight_norm pre-hooks) never run once the layer is
    # wrapped, because the wrapper calls its own op instead of the layer. The plan still says "wrap".
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2)).eval()
    model[0].register_forward_hook(lambda module, args, out: out * 0)
    swapped, plan = swap_layers(model, CFG, vector)
    # a skipped layer keeps its hook; a wrapped one must behave as the hooked layer did
    assert same_output(swapped, model, vector), f"plan for the hooked layer: {plan['0']}"


class EncoderBlock(nn.Module):
    def __init__(self):
        super().__init__()
        self.layer = nn.TransformerEncoderLayer(8, 2, 16, batch_first=True)

    def forward(self, x):
        return self.layer(x)


def test_linear_inside_transformer_encoder_layer_is_not_wrapped_in_vain():
    # nn.TransformerEncoderLayer reads its children's weights directly on its inference fast path
    # (torch._transformer_encoder_layer_fwd), so a wrapper's pipeline would be silently ignored: its
    # linears are left alone and the plan says why.
    torch.manual_seed(0)
    model, x = EncoderBlock().eval(), torch.randn(2, 5, 8)
    graph = capture(model, x, methods=("export",))
    swapped, plan = swap_layers(model, CFG, graph=graph)
    for name in ("layer.linear1", "layer.linear2"):
        assert plan[name].action == "skip"
        assert "read directly by the parent TransformerEncoderLayer" in plan[name].detail
    assert not isinstance(swapped.layer.linear1, CompressedLayer)

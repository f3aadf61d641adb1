"""Graph capture: fx first, then torch.export, then a module walk; every failure is explained."""

from __future__ import annotations

import inspect
import os

import pytest
import torch
import torch.nn as nn
import torchvision

from amct_torch.graph import CaptureAttempt, CaptureError, capture
from amct_torch.graph.capture import normalize_inputs
from amct_torch.nn import CompressedLinear


def module_node(graph, target):
    (node,) = graph.calls_of(target)
    return node


# -- fx -----------------------------------------------------------------------------------------------
def test_conv_bn_net_captures_with_fx(conv_bn_net):
    g = capture(conv_bn_net)
    assert g.method == "fx"
    assert g.attempts == [CaptureAttempt("fx", True)]
    assert g.has_dataflow
    assert g.graph_module is not None


def test_fx_graph_has_the_conv_to_bn_edge(conv_bn_net):
    g = capture(conv_bn_net)
    conv, bn = module_node(g, "conv1"), module_node(g, "bn1")
    assert bn in conv.users
    assert bn.inputs == [conv]
    assert conv.module_type is nn.Conv2d and bn.module_type is nn.BatchNorm2d


def test_fx_graph_has_the_residual_add(conv_bn_net):
    g = capture(conv_bn_net)
    bn3 = module_node(g, "bn3")
    (add,) = [u for u in bn3.users if u.kind == "function"]
    assert add.target == "add"
    assert len(add.inputs) == 2


def test_module_nodes_follow_call_order(conv_bn_net):
    g = capture(conv_bn_net)
    assert [n.target for n in g.module_nodes()] == ["conv1", "bn1", "conv2", "bn2", "conv3", "bn3", "pool", "fc"]
    assert set(g.call_counts().values()) == {1}
    assert [n.kind for n in g.nodes][0] == "input" and g.nodes[-1].kind == "output"


def test_capture_leaves_the_model_untouched(conv_bn_net, image):
    before = {k: v.clone() for k, v in conv_bn_net.state_dict().items()}
    modules_before = [(n, type(m)) for n, m in conv_bn_net.named_modules()]
    with torch.no_grad():
        expected = conv_bn_net(image)
    capture(conv_bn_net, image)
    assert [(n, type(m)) for n, m in conv_bn_net.named_modules()] == modules_before
    assert all(torch.equal(before[k], v) for k, v in conv_bn_net.state_dict().items())
    with torch.no_grad():
        assert torch.equal(conv_bn_net(image), expected)


def test_wrappers_are_leaves_of_the_graph():
    model = nn.Sequential(CompressedLinear(nn.Linear(4, 4)), nn.ReLU(), nn.Linear(4, 2))
    g = capture(model)
    assert [(n.target, n.module_type) for n in g.module_nodes()] == [
        ("0", CompressedLinear), ("1", nn.ReLU), ("2", nn.Linear)]


def test_report_names_the_method_and_every_attempt(shape_dependent_net, image):
    text = capture(shape_dependent_net, image).report()
    assert text.splitlines()[0].startswith("capture: export (")
    assert "  fx: failed: " in text and "  export: ok" in text


# -- fallback to export -------------------------------------------------------------------------------
def test_shape_dependent_model_falls_back_to_export(shape_dependent_net, image):
    g = capture(shape_dependent_net, image)
    assert g.method == "export"
    assert g.exported is not None
    assert g.has_dataflow
    first = g.attempts[0]
    assert (first.method, first.ok) == ("fx", False)
    assert "TraceError" in first.reason
    assert "if x.shape[-1] > 4:" in first.reason
    assert g.attempts[1] == CaptureAttempt("export", True)


def test_export_graph_has_module_nodes_and_edges(shape_dependent_net, image):
    g = capture(shape_dependent_net, image)
    assert [n.target for n in g.module_nodes()] == ["conv", "bn", "fc"]
    conv, bn = module_node(g, "conv"), module_node(g, "bn")
    assert conv.inputs[0].kind == "input"
    assert bn.inputs == [conv] and bn in conv.users


def test_export_without_example_inputs_says_it_needs_them(shape_dependent_net):
    g = capture(shape_dependent_net)
    assert g.method == "module_walk"
    assert g.attempts[1].method == "export" and not g.attempts[1].ok
    assert "needs example inputs" in g.attempts[1].reason


# -- fallback to the module walk ----------------------------------------------------------------------
def test_data_dependent_model_falls_back_to_module_walk(data_dependent_net, image):
    g = capture(data_dependent_net, image)
    assert g.method == "module_walk"
    assert not g.has_dataflow
    assert [a.method for a in g.attempts] == ["fx", "export", "module_walk"]
    assert [a.ok for a in g.attempts] == [False, False, True]
    assert [n.target for n in g.module_nodes()] == ["conv", "bn", "fc"]
    assert all(not n.inputs and not n.users for n in g.nodes)
    assert g.call_counts() == {}
    assert "no data flow" in g.report()


def test_fx_failure_reason_quotes_the_users_source_line(data_dependent_net, image):
    g = capture(data_dependent_net, image)
    source_file = os.path.basename(inspect.getsourcefile(type(data_dependent_net)))
    for attempt in g.attempts[:2]:  # fx and export both point at the branch
        assert f"(at {source_file}:" in attempt.reason
        assert "if x.sum() > 0:" in attempt.reason


def test_excluding_the_module_walk_raises_capture_error(data_dependent_net, image):
    with pytest.raises(CaptureError, match=r"no capture path worked:\n  fx: failed: TraceError"):
        capture(data_dependent_net, image, methods=("fx",))


def test_module_walk_alone_never_fails(data_dependent_net):
    g = capture(data_dependent_net, methods=["module_walk"])
    assert g.method == "module_walk" and g.attempts == [CaptureAttempt("module_walk", True)]


@pytest.mark.parametrize("methods", [("fx", "dynamo"), ("jit",), ()])
def test_invalid_method_names_raise_value_error(conv_bn_net, methods):
    with pytest.raises(ValueError, match=r"capture\(methods=\.\.\.\).*allowed: a non-empty list of \['fx', 'export', 'module_walk'\]"):
        capture(conv_bn_net, methods=methods)


# -- reused modules -----------------------------------------------------------------------------------
@pytest.mark.parametrize("methods", [("fx",), ("export",)])
def test_reused_module_is_called_twice(reused_module_net, vector, methods):
    g = capture(reused_module_net, vector, methods=methods)
    assert g.method == methods[0]
    assert g.call_counts()["fc1"] == 2
    assert g.call_counts()["fc2"] == 1
    assert len(g.calls_of("fc1")) == 2


# -- inputs -------------------------------------------------------------------------------------------
def test_normalize_inputs_accepts_every_spelling():
    x = torch.zeros(1)
    assert normalize_inputs(None) == ((), {})
    assert normalize_inputs(x)[0][0] is x
    assert normalize_inputs((x, x))[0] == (x, x)
    assert normalize_inputs([x])[0] == (x,)
    assert normalize_inputs({"input_ids": x}) == ((), {"input_ids": x})


# -- real models --------------------------------------------------------------------------------------
def test_bert_captures_with_export_after_fx_fails(bert):
    model, inputs = bert
    g = capture(model, inputs)
    assert g.method == "export"
    assert g.attempts[0].method == "fx" and not g.attempts[0].ok and g.attempts[0].reason
    targets = {n.target for n in g.module_nodes()}
    assert "encoder.layer.0.attention.self.query" in targets
    assert "encoder.layer.5.output.dense" in targets
    query = module_node(g, "encoder.layer.0.attention.self.query")
    assert query.inputs and query.users


@pytest.mark.parametrize("arch", ["resnet18", "mobilenet_v2", "efficientnet_b0"])
def test_torchvision_models_capture_with_fx(arch):
    model = getattr(torchvision.models, arch)(weights=None).eval()
    g = capture(model, torch.randn(1, 3, 32, 32))
    assert g.method == "fx"
    assert g.attempts == [CaptureAttempt("fx", True)]
    convs = [n for n, m in model.named_modules() if isinstance(m, nn.Conv2d)]
    assert sorted(n.target for n in g.module_nodes() if n.module_type is nn.Conv2d) == sorted(convs)

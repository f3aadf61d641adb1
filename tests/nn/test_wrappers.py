"""Wrapper modules: bit-exact with an empty pipeline, weight stages, checkpoints, registry."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from transformers.pytorch_utils import Conv1D

from amct_torch.nn import (CompressedAvgPool, CompressedConv, CompressedConv1D, CompressedConvTranspose,
                           CompressedLayer, CompressedLinear, register_wrapper, registered_types, wrapper_for)
from amct_torch.nn import base as nn_base


class Scale(nn.Module):
    """A pipeline stage / quantizer stand-in: multiplies by a constant."""

    def __init__(self, factor: float):
        super().__init__()
        self.factor = factor

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        return t * self.factor


class AddOne(nn.Module):
    def forward(self, t: torch.Tensor) -> torch.Tensor:
        return t + 1


# (id, layer factory, input shape, forward kwargs, wrapper class)
CASES = [
    ("conv1d", lambda: nn.Conv1d(3, 4, 3), (2, 3, 10), {}, CompressedConv),
    ("conv2d", lambda: nn.Conv2d(3, 4, 3, padding=1), (2, 3, 8, 8), {}, CompressedConv),
    ("conv2d_reflect", lambda: nn.Conv2d(3, 4, 3, padding=1, padding_mode="reflect"), (2, 3, 8, 8), {}, CompressedConv),
    ("conv2d_groups_stride_dilation", lambda: nn.Conv2d(4, 6, 3, stride=2, dilation=2, groups=2, bias=False),
     (2, 4, 9, 9), {}, CompressedConv),
    ("conv3d", lambda: nn.Conv3d(2, 3, 3, padding=1), (1, 2, 5, 5, 5), {}, CompressedConv),
    ("conv3d_circular", lambda: nn.Conv3d(2, 3, 3, padding=1, padding_mode="circular"), (1, 2, 4, 4, 4), {}, CompressedConv),
    ("conv_transpose1d", lambda: nn.ConvTranspose1d(3, 4, 3, stride=2), (2, 3, 6), {}, CompressedConvTranspose),
    ("conv_transpose2d_groups_stride", lambda: nn.ConvTranspose2d(4, 6, 3, stride=2, padding=1, output_padding=1, groups=2),
     (2, 4, 5, 5), {}, CompressedConvTranspose),
    ("conv_transpose2d_output_size", lambda: nn.ConvTranspose2d(3, 4, 3, stride=2), (1, 3, 5, 5),
     {"output_size": [12, 12]}, CompressedConvTranspose),
    ("conv_transpose3d", lambda: nn.ConvTranspose3d(2, 4, 3, stride=2, groups=2), (1, 2, 3, 3, 3), {}, CompressedConvTranspose),
    ("linear_3d_input", lambda: nn.Linear(5, 7), (2, 3, 5), {}, CompressedLinear),
    ("transformers_conv1d", lambda: Conv1D(7, 5), (2, 3, 5), {}, CompressedConv1D),
    ("avgpool1d", lambda: nn.AvgPool1d(2), (2, 3, 8), {}, CompressedAvgPool),
    ("avgpool2d", lambda: nn.AvgPool2d(3, stride=2, padding=1, count_include_pad=False), (2, 3, 7, 7), {}, CompressedAvgPool),
    ("avgpool3d", lambda: nn.AvgPool3d(2), (1, 2, 4, 4, 4), {}, CompressedAvgPool),
]
IDS = [c[0] for c in CASES]
WEIGHTED = [c for c in CASES if c[4] is not CompressedAvgPool]
WEIGHTED_IDS = [c[0] for c in WEIGHTED]


def make(factory, shape, seed=0):
    torch.manual_seed(seed)
    layer = factory()
    if isinstance(layer, Conv1D):  # Conv1D initialises its bias to zeros: make it count
        with torch.no_grad():
            layer.bias.normal_()
    return layer, torch.randn(shape)


@pytest.mark.parametrize("name, factory, shape, kwargs, cls", CASES, ids=IDS)
def test_wrapper_for_picks_the_registered_wrapper(name, factory, shape, kwargs, cls):
    layer, _ = make(factory, shape)
    assert wrapper_for(layer) is cls


@pytest.mark.parametrize("name, factory, shape, kwargs, cls", CASES, ids=IDS)
def test_empty_pipeline_reproduces_the_layer_exactly(name, factory, shape, kwargs, cls):
    layer, x = make(factory, shape)
    with torch.no_grad():
        expected = layer(x, **kwargs)
        wrapped = cls(layer)
        got = wrapped(x, **kwargs)
    assert wrapped.module is layer
    assert got.shape == expected.shape
    assert torch.equal(got, expected)


def test_output_size_kwarg_changes_the_transposed_conv_output_shape():
    layer, x = make(lambda: nn.ConvTranspose2d(3, 4, 3, stride=2), (1, 3, 5, 5))
    wrapped = CompressedConvTranspose(layer)
    assert wrapped(x).shape[-2:] == (11, 11)
    assert wrapped(x, output_size=[12, 12]).shape[-2:] == (12, 12)
    assert wrapped(x, [12, 12]).shape[-2:] == (12, 12)


@pytest.mark.parametrize("name, factory, shape, kwargs, cls", WEIGHTED, ids=WEIGHTED_IDS)
def test_gradients_reach_the_original_weight(name, factory, shape, kwargs, cls):
    layer, x = make(factory, shape)
    ref = copy.deepcopy(layer)
    wrapped = cls(layer)
    wrapped(x, **kwargs).square().sum().backward()
    ref(x, **kwargs).square().sum().backward()
    assert layer.weight.grad is not None
    assert torch.equal(layer.weight.grad, ref.weight.grad)
    if ref.bias is not None:
        assert torch.equal(layer.bias.grad, ref.bias.grad)


@pytest.mark.parametrize("name, factory, shape, kwargs, cls", WEIGHTED, ids=WEIGHTED_IDS)
def test_pipeline_stage_changes_the_effective_weight(name, factory, shape, kwargs, cls):
    layer, x = make(factory, shape)
    halved = copy.deepcopy(layer)
    with torch.no_grad():
        halved.weight.mul_(0.5)
    wrapped = cls(layer)
    wrapped.weight_pipeline.append(Scale(0.5))
    assert torch.equal(wrapped.effective_weight(), layer.weight * 0.5)
    assert torch.equal(wrapped.weight, layer.weight)  # the stored weight is untouched
    with torch.no_grad():
        assert torch.equal(wrapped(x, **kwargs), halved(x, **kwargs))
        assert not torch.equal(wrapped(x, **kwargs), layer(x, **kwargs))


def test_pipeline_stages_run_in_order():
    wrapped = CompressedLinear(nn.Linear(3, 2))
    wrapped.weight_pipeline.append(AddOne())
    wrapped.weight_pipeline.append(Scale(2.0))
    assert torch.equal(wrapped.effective_weight(), (wrapped.weight + 1) * 2)


def test_gradient_flows_through_a_stage():
    layer, x = make(lambda: nn.Linear(4, 3), (5, 4))
    wrapped = CompressedLinear(layer)
    wrapped.weight_pipeline.append(Scale(0.5))
    wrapped(x).sum().backward()
    # d/dW sum(x @ (0.5 W)^T) = 0.5 * sum over batch of x
    expected = 0.5 * x.sum(0).expand(3, 4)
    torch.testing.assert_close(layer.weight.grad, expected)


def test_input_and_output_quantizer_slots_are_applied():
    layer, x = make(lambda: nn.Linear(4, 3), (5, 4))
    wrapped = CompressedLinear(layer)
    assert wrapped.input_quantizer is None and wrapped.output_quantizer is None
    wrapped.input_quantizer = Scale(2.0)
    wrapped.output_quantizer = AddOne()
    with torch.no_grad():
        assert torch.equal(wrapped(x), layer(x * 2.0) + 1)


def test_weight_and_bias_properties_expose_the_original_parameters():
    layer = nn.Conv2d(2, 3, 1)
    wrapped = CompressedConv(layer)
    assert wrapped.weight is layer.weight
    assert wrapped.bias is layer.bias
    assert CompressedConv(nn.Conv2d(2, 3, 1, bias=False)).bias is None


def test_avgpool_wrapper_has_no_weight():
    wrapped = CompressedAvgPool(nn.AvgPool2d(2))
    assert wrapped.weight_pipeline is None
    assert wrapped.weight_channel_axis is None
    with pytest.raises(AttributeError, match="AvgPool2d has no weight"):
        wrapped.effective_weight()


# -- checkpoints --------------------------------------------------------------------------------------
def test_wrapper_state_dict_keys_are_under_module():
    wrapped = CompressedConv(nn.Conv2d(2, 3, 1))
    assert list(wrapped.state_dict()) == ["module.weight", "module.bias"]


@pytest.mark.parametrize("name, factory, shape, kwargs, cls", WEIGHTED, ids=WEIGHTED_IDS)
def test_unwrapped_state_dict_loads_into_the_wrapper(name, factory, shape, kwargs, cls):
    source, x = make(factory, shape, seed=1)
    target, _ = make(factory, shape, seed=2)
    wrapped = cls(target)
    result = wrapped.load_state_dict(source.state_dict())  # strict: no missing / unexpected keys
    assert not result.missing_keys and not result.unexpected_keys
    assert torch.equal(wrapped.module.weight, source.weight)
    with torch.no_grad():
        assert torch.equal(wrapped(x, **kwargs), source(x, **kwargs))


def test_wrapped_state_dict_still_loads_into_the_wrapper():
    source = CompressedLinear(nn.Linear(3, 2))
    target = CompressedLinear(nn.Linear(3, 2))
    target.load_state_dict(source.state_dict())
    assert torch.equal(target.module.weight, source.module.weight)


def test_unwrapped_model_checkpoint_loads_into_a_model_with_a_wrapper_inside():
    torch.manual_seed(0)
    original = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
    model[0] = CompressedLinear(model[0])
    model.load_state_dict(original.state_dict())
    assert torch.equal(model[0].module.weight, original[0].weight)
    assert torch.equal(model[2].weight, original[2].weight)


def test_deep_copied_wrapper_loads_checkpoints_into_itself():
    wrapped = CompressedLinear(nn.Linear(3, 2))
    before = wrapped.module.weight.detach().clone()
    clone = copy.deepcopy(wrapped)
    source = nn.Linear(3, 2)
    clone.load_state_dict(source.state_dict())
    assert torch.equal(clone.module.weight, source.weight)
    assert torch.equal(wrapped.module.weight, before)


# -- rules --------------------------------------------------------------------------------------------
def test_wrapping_a_wrapper_raises_type_error():
    wrapped = CompressedLinear(nn.Linear(3, 2))
    with pytest.raises(TypeError, match="already a compressed layer"):
        CompressedLinear(wrapped)


def test_wrapper_for_a_wrapper_is_none():
    assert wrapper_for(CompressedLinear(nn.Linear(3, 2))) is None


class LinearWithOwnForward(nn.Linear):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(super().forward(x))


class PlainLinearSubclass(nn.Linear):
    pass


def test_wrapper_for_rejects_a_subclass_that_overrides_forward():
    assert wrapper_for(LinearWithOwnForward(3, 2)) is None


def test_wrapper_for_accepts_a_subclass_that_keeps_forward():
    assert wrapper_for(PlainLinearSubclass(3, 2)) is CompressedLinear


@pytest.mark.parametrize("module", [nn.ReLU(), nn.BatchNorm2d(3), nn.Embedding(4, 2), nn.LayerNorm(3)],
                         ids=["relu", "batchnorm", "embedding", "layernorm"])
def test_wrapper_for_unsupported_layers_is_none(module):
    assert wrapper_for(module) is None


@pytest.mark.parametrize("layer, axis", [
    (nn.Conv1d(3, 5, 1), 0), (nn.Conv2d(3, 5, 1), 0), (nn.Conv3d(3, 5, 1), 0), (nn.Linear(3, 5), 0),
    (nn.ConvTranspose1d(3, 5, 1), 1), (nn.ConvTranspose2d(3, 5, 1), 1), (nn.ConvTranspose3d(3, 5, 1), 1),
    (Conv1D(5, 3), 1),
], ids=["conv1d", "conv2d", "conv3d", "linear", "convt1d", "convt2d", "convt3d", "hf_conv1d"])
def test_weight_channel_axis_is_the_output_channel_axis(layer, axis):
    wrapped = wrapper_for(layer)(layer)
    assert wrapped.weight_channel_axis == axis
    assert layer.weight.shape[axis] == 5  # every layer above has 5 output channels


def test_transformers_conv1d_is_registered_lazily():
    assert Conv1D in registered_types()
    assert {nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear, nn.AvgPool2d, nn.ConvTranspose2d} <= set(registered_types())


# -- registering a custom layer -----------------------------------------------------------------------
class ChannelScale(nn.Module):
    """A custom layer with a weight: y = x * weight (per channel)."""

    def __init__(self, channels: int):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.weight


class CompressedChannelScale(CompressedLayer):
    weight_channel_axis = 0

    def _op(self, x, weight, *args, **kwargs):
        return x * weight


@pytest.fixture
def isolated_registry(monkeypatch):
    """Registrations made by a test vanish afterwards."""
    monkeypatch.setattr(nn_base, "_REGISTRY", dict(nn_base._REGISTRY))


def test_register_wrapper_for_a_custom_layer(isolated_registry):
    assert wrapper_for(ChannelScale(3)) is None
    returned = register_wrapper(ChannelScale)(CompressedChannelScale)
    assert returned is CompressedChannelScale
    layer, x = ChannelScale(3), torch.randn(2, 3)
    assert ChannelScale in registered_types()
    cls = wrapper_for(layer)
    assert cls is CompressedChannelScale
    wrapped = cls(layer)
    with torch.no_grad():
        assert torch.equal(wrapped(x), layer(x))
    wrapped.weight_pipeline.append(Scale(0.0))
    with torch.no_grad():
        assert torch.equal(wrapped(x), torch.zeros_like(x))


def test_register_wrapper_rejects_a_class_that_is_not_a_compressed_layer(isolated_registry):
    class NotAWrapper(nn.Module):
        pass

    with pytest.raises(TypeError, match="must subclass CompressedLayer"):
        register_wrapper(ChannelScale)(NotAWrapper)
    assert wrapper_for(ChannelScale(3)) is None


# -- layers whose weight is recomputed by a forward pre-hook ------------------------------------------
def test_pruned_layer_gets_no_wrapper_or_a_wrapper_that_sees_the_current_weight():
    # Regression test (was a bug in amct_torch/nn/base.py, CompressedLayer.forward / wrapper_for): the wrapper never calls the original
    # layer, so the layer's forward pre-hooks and hooks are bypassed. torch.nn.utils.prune (and weight_norm,
    # spectral_norm) recompute ``weight`` in a pre-hook; the wrapper reads the stale tensor computed at
    # prune time: its output diverges from the layer's once weight_orig changes, and a second backward through
    # the wrapper fails ("Trying to backward through the graph a second time").
    prune = pytest.importorskip("torch.nn.utils.prune")
    layer, x = make(lambda: nn.Linear(4, 3), (2, 4))
    prune.l1_unstructured(layer, "weight", amount=0.5)
    cls = wrapper_for(layer)
    if cls is None:  # declining to wrap a hooked layer is a correct answer too
        return
    wrapped = cls(layer)
    with torch.no_grad():
        layer.weight_orig.mul_(2.0)  # e.g. an optimizer step
        got = wrapped(x)
        expected = F.linear(x, layer.weight_orig * layer.weight_mask, layer.bias)
    assert torch.equal(got, expected)

"""Targeting: which config each layer gets, and which entry decided it."""

from __future__ import annotations

import re
from dataclasses import dataclass

import pytest
import torch.nn as nn

from amct_torch.config import Config, ConfigError, QuantConfig, Resolution, Targeting

GLOBAL = QuantConfig()
BY_TYPE = QuantConfig(weight_bits=16)
BY_PATTERN = QuantConfig(weight_bits=4, weight_granularity={"per_group": 32})
BY_NAME = QuantConfig(activation_offset=False)


class MyConv(nn.Conv2d):
    """A Conv2d subclass (keeps Conv2d's forward)."""


@dataclass(frozen=True)
class OtherConfig(Config):
    ratio: float = 0.5


def conv() -> nn.Conv2d:
    return nn.Conv2d(1, 1, 1)


def linear() -> nn.Linear:
    return nn.Linear(1, 1)


# -- precedence ---------------------------------------------------------------------------------------
def test_global_applies_when_nothing_else_matches():
    t = Targeting(GLOBAL, module_type={"Linear": BY_TYPE})
    assert t.resolve("features.0", conv()) == Resolution(GLOBAL, "global")


def test_module_type_beats_global():
    t = Targeting(GLOBAL, module_type={nn.Conv2d: BY_TYPE})
    assert t.resolve("features.0", conv()) == Resolution(BY_TYPE, "module_type['Conv2d']")


@pytest.mark.parametrize("key", [nn.Conv2d, "Conv2d", "torch.nn.Conv2d", "torch.nn.modules.conv.Conv2d"])
def test_module_type_given_as_class_or_string(key):
    t = Targeting(GLOBAL, module_type={key: BY_TYPE})
    assert t.resolve("c", conv()) == Resolution(BY_TYPE, "module_type['Conv2d']")


def test_module_type_matches_subclasses_through_the_mro():
    t = Targeting(GLOBAL, module_type={"Conv2d": BY_TYPE})
    assert t.resolve("c", MyConv(1, 1, 1)) == Resolution(BY_TYPE, "module_type['Conv2d']")


def test_closest_class_in_the_mro_wins():
    other = QuantConfig(weight_bits=7)
    t = Targeting(GLOBAL, module_type={nn.Module: other, "Conv2d": BY_TYPE, MyConv: BY_NAME})
    assert t.resolve("a", MyConv(1, 1, 1)) == Resolution(BY_NAME, "module_type['MyConv']")
    assert t.resolve("b", conv()) == Resolution(BY_TYPE, "module_type['Conv2d']")
    assert t.resolve("c", linear()) == Resolution(other, "module_type['Module']")


def test_pattern_beats_module_type():
    t = Targeting(GLOBAL, module_type={"Conv2d": BY_TYPE}, module_name={"layer1.*": BY_PATTERN})
    assert t.resolve("layer1.0.conv1", conv()) == Resolution(BY_PATTERN, "module_name['layer1.*']")
    assert t.resolve("layer2.0.conv1", conv()) == Resolution(BY_TYPE, "module_type['Conv2d']")


def test_exact_name_beats_pattern_and_type():
    t = Targeting(GLOBAL, module_type={"Conv2d": BY_TYPE},
                  module_name={"layer1.0.conv1": BY_NAME, "layer1.*": BY_PATTERN})
    assert t.resolve("layer1.0.conv1", conv()) == Resolution(BY_NAME, "module_name['layer1.0.conv1']")
    assert t.resolve("layer1.0.conv2", conv()) == Resolution(BY_PATTERN, "module_name['layer1.*']")


def test_exact_name_listed_before_a_pattern_still_wins():
    t = Targeting(GLOBAL, module_name={"fc": BY_NAME, "f?": BY_PATTERN})
    assert t.resolve("fc", linear()).source == "module_name['fc']"


def test_last_listed_pattern_wins_among_several():
    a, b = QuantConfig(weight_bits=4), QuantConfig(weight_bits=16)
    first = Targeting(GLOBAL, module_name={"layer1.*": a, "re:.*conv\\d": b})
    second = Targeting(GLOBAL, module_name={"re:.*conv\\d": b, "layer1.*": a})
    assert first.resolve("layer1.0.conv1", conv()) == Resolution(b, "module_name['re:.*conv\\\\d']")
    assert second.resolve("layer1.0.conv1", conv()) == Resolution(a, "module_name['layer1.*']")


def test_regex_pattern_must_match_the_whole_name():
    t = Targeting(GLOBAL, module_name={"re:.*\\.(q|k|v)_proj": None})
    assert t.resolve("layers.0.attn.q_proj", linear()) == Resolution(None, "module_name['re:.*\\\\.(q|k|v)_proj']")
    assert t.resolve("layers.0.attn.q_proj.lora", linear()).source == "global"
    assert t.resolve("layers.0.attn.o_proj", linear()).source == "global"


def test_glob_question_mark_and_brackets_are_patterns():
    t = Targeting(GLOBAL, module_name={"conv?": BY_PATTERN, "fc[12]": BY_NAME})
    assert t.resolve("conv3", conv()).config == BY_PATTERN
    assert t.resolve("conv33", conv()).config == GLOBAL
    assert t.resolve("fc2", linear()).config == BY_NAME
    assert t.resolve("fc3", linear()).config == GLOBAL


def test_skip_beats_everything():
    t = Targeting(GLOBAL, module_type={"Conv2d": BY_TYPE}, module_name={"stem.conv": BY_NAME, "stem.*": BY_PATTERN},
                  skip=["stem.conv"])
    assert t.resolve("stem.conv", conv()) == Resolution(None, "skip['stem.conv']")
    assert t.resolve("stem.other", conv()) == Resolution(BY_PATTERN, "module_name['stem.*']")


def test_skip_accepts_glob_and_regex():
    t = Targeting(GLOBAL, skip=["head.*", "re:.*downsample\\.\\d"])
    assert t.resolve("head.fc", linear()) == Resolution(None, "skip['head.*']")
    assert t.resolve("layer2.0.downsample.0", conv()) == Resolution(None, "skip['re:.*downsample\\\\.\\\\d']")
    assert t.resolve("layer2.0.conv1", conv()).config == GLOBAL


def test_none_value_means_leave_alone():
    t = Targeting(GLOBAL, module_type={"Linear": None}, module_name={"features.0": None})
    assert t.resolve("features.0", conv()) == Resolution(None, "module_name['features.0']")
    assert t.resolve("classifier", linear()) == Resolution(None, "module_type['Linear']")


def test_none_name_entry_beats_a_type_config():
    t = Targeting(GLOBAL, module_type={"Linear": BY_TYPE}, module_name={"fc": None})
    assert t.resolve("fc", linear()) == Resolution(None, "module_name['fc']")


def test_no_default_leaves_unmatched_layers_alone():
    t = Targeting(module_type={"Linear": BY_TYPE})
    assert t.resolve("c", conv()) == Resolution(None, "global")
    assert t.resolve("fc", linear()).config == BY_TYPE


# -- unused entries -----------------------------------------------------------------------------------
def test_unused_entries_reports_a_typo_in_a_name():
    model = nn.Sequential()
    model.add_module("conv1", conv())
    model.add_module("fc", linear())
    t = Targeting(GLOBAL, module_name={"conv1": BY_NAME, "fcc": None, "conv*": BY_PATTERN})
    names, modules = zip(*[(n, m) for n, m in model.named_modules() if n])
    assert t.unused_entries(names, modules) == ["module_name['fcc']"]


def test_unused_entries_reports_types_and_skips_that_match_nothing():
    t = Targeting(GLOBAL, module_type={"Conv2d": BY_TYPE, "Conv3d": BY_TYPE}, skip=["fc", "head.*"])
    assert t.unused_entries(["c", "fc"], [conv(), linear()]) == ["module_type['Conv3d']", "skip['head.*']"]


def test_unused_entries_counts_base_classes_as_used():
    t = Targeting(GLOBAL, module_type={"Conv2d": BY_TYPE})
    assert t.unused_entries(["c"], [MyConv(1, 1, 1)]) == []


# -- errors -------------------------------------------------------------------------------------------
def test_invalid_regex_in_module_name_raises_config_error():
    with pytest.raises(ConfigError, match=re.escape("Targeting.module_name['re:(q|k']: got 're:(q|k'; "
                                                    "allowed: a valid regular expression")):
        Targeting(GLOBAL, module_name={"re:(q|k": None})


def test_invalid_regex_in_skip_raises_config_error():
    # Regression test (was a bug in amct_torch/config/targeting.py, Targeting.__init__): ``skip`` entries accept 're:' regexes (resolve
    # runs them through _matches) but only module_name keys are compiled up front. An invalid skip regex is
    # accepted here and later makes resolve() / swap_layers raise a bare re.error instead of a ConfigError.
    with pytest.raises(ConfigError, match=re.escape("re:(q|k")):
        t = Targeting(GLOBAL, skip=["re:(q|k"])
        t.resolve("fc", linear())


def test_mixing_config_classes_raises():
    with pytest.raises(ConfigError, match=re.escape("Targeting: got ['OtherConfig', 'QuantConfig']; allowed: configs of one class")):
        Targeting(GLOBAL, module_name={"fc": OtherConfig()})


def test_value_that_is_not_a_config_raises():
    with pytest.raises(ConfigError, match=re.escape("Targeting.module_type['Linear']: got {'weight_bits': 4}; "
                                                    "allowed: a Config object or None")):
        Targeting(GLOBAL, module_type={"Linear": {"weight_bits": 4}})


def test_skip_given_as_one_string_raises():
    with pytest.raises(ConfigError, match=re.escape("Targeting.skip: got 'fc'; allowed: a list of module names")):
        Targeting(GLOBAL, skip="fc")


@pytest.mark.parametrize("key", ["", 3])
def test_bad_module_type_key_raises(key):
    with pytest.raises(ConfigError, match=re.escape("Targeting.module_type: got")):
        Targeting(GLOBAL, module_type={key: BY_TYPE})


def test_from_dict_unknown_key_raises():
    with pytest.raises(ConfigError, match=re.escape("Targeting.module_names: got {}; allowed: no such key")):
        Targeting.from_dict({"module_names": {}}, QuantConfig)


def test_from_dict_validates_nested_configs_with_their_path():
    with pytest.raises(ConfigError, match=re.escape("Targeting.module_name['fc'].bits: got 4; allowed: no such key")):
        Targeting.from_dict({"module_name": {"fc": {"bits": 4}}}, QuantConfig)


# -- serialisation ------------------------------------------------------------------------------------
def full_targeting() -> Targeting:
    return Targeting(GLOBAL, module_type={nn.Linear: BY_TYPE, "Conv2d": None},
                     module_name={"layer1.*": BY_PATTERN, "re:.*conv\\d": BY_NAME, "fc": None},
                     skip=["head.*", "stem"])


def test_to_dict_is_plain_data():
    data = full_targeting().to_dict()
    assert data["global"] == GLOBAL.to_dict()
    assert data["module_type"] == {"Linear": BY_TYPE.to_dict(), "Conv2d": None}
    assert data["module_name"]["fc"] is None
    assert data["skip"] == ["head.*", "stem"]


def test_dict_round_trip_equals_original():
    t = full_targeting()
    back = Targeting.from_dict(t.to_dict(), QuantConfig)
    assert back == t
    assert back.to_dict() == t.to_dict()


def test_yaml_round_trip_keeps_pattern_order_and_resolution():
    t = full_targeting()
    back = Targeting.from_yaml(t.to_yaml(), QuantConfig)
    assert back == t
    assert list(back.module_name) == list(t.module_name)
    for name, module in [("layer1.0.conv1", conv()), ("layer1.0.bn", nn.BatchNorm2d(1)), ("fc", linear()),
                         ("x", conv()), ("head.fc", linear()), ("y", linear())]:
        assert back.resolve(name, module) == t.resolve(name, module)


def test_empty_yaml_is_an_empty_targeting():
    t = Targeting.from_yaml("", QuantConfig)
    assert t.resolve("fc", linear()) == Resolution(None, "global")


def test_targetings_with_different_entries_differ():
    assert Targeting(GLOBAL) != Targeting(GLOBAL, skip=["fc"])
    assert Targeting(GLOBAL) == Targeting(QuantConfig())


def test_entries_are_read_only():
    t = full_targeting()
    with pytest.raises(TypeError):
        t.module_name["new"] = None  # type: ignore[index]

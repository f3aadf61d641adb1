"""QuantConfig and the Config base: validation messages, round trips, immutability."""

from __future__ import annotations

import dataclasses
import json
import pickle
import re
import typing
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from amct_torch.config import (Config, ConfigError, PerChannel, PerGroup, PerTensor, PerToken, QuantConfig,
                               parse_granularity)


def msg(text: str) -> str:
    """A ``pytest.raises(match=)`` pattern matching ``text`` literally."""
    return re.escape(text)


# -- validation: every error names the key, the bad value and what is allowed ------------------------
def test_bad_weight_bits_names_key_value_and_allowed_bit_widths():
    with pytest.raises(ConfigError, match=msg("QuantConfig.weight_bits: got 9; allowed: one of 4, 6, 7, 8, 16")) as info:
        QuantConfig(weight_bits=9)
    assert (info.value.key, info.value.value) == ("QuantConfig.weight_bits", 9)


def test_bad_activation_bits_lists_allowed_widths():
    with pytest.raises(ConfigError, match=msg("QuantConfig.activation_bits: got 6; allowed: one of 4, 8, 16")):
        QuantConfig(activation_bits=6)


def test_activation_bits_none_means_weight_only():
    assert QuantConfig(activation_bits=None).activation_bits is None


def test_unknown_calibrator_lists_every_literal():
    calibrators = typing.get_args(typing.get_type_hints(QuantConfig)["activation_calibrator"])
    assert {"minmax", "ifmr", "hfmg"} <= set(calibrators)
    expected = "QuantConfig.activation_calibrator: got 'minmaxx'; allowed: one of " + ", ".join(map(repr, calibrators))
    with pytest.raises(ConfigError, match="^" + msg(expected) + "$"):
        QuantConfig(activation_calibrator="minmaxx")


def test_unknown_weight_algorithm_lists_literals():
    with pytest.raises(ConfigError, match=msg("QuantConfig.weight_algorithm: got 'gptq'; allowed: one of 'arq', 'adaround'")):
        QuantConfig(weight_algorithm="gptq")


def test_batch_num_zero_reports_lower_bound():
    with pytest.raises(ConfigError, match=msg("QuantConfig.batch_num: got 0; allowed: 1 <= batch_num")):
        QuantConfig(batch_num=0)


@pytest.mark.parametrize("key", ["weight_bits", "batch_num"])
def test_bool_is_rejected_where_int_is_expected(key):
    with pytest.raises(ConfigError, match=msg(f"QuantConfig.{key}: got True; allowed: int")):
        QuantConfig(**{key: True})


def test_bool_is_rejected_for_optional_int():
    with pytest.raises(ConfigError, match=msg("QuantConfig.activation_bits: got False; allowed: int or None")):
        QuantConfig(activation_bits=False)


def test_float_is_rejected_where_int_is_expected():
    with pytest.raises(ConfigError, match=msg("QuantConfig.weight_bits: got 8.0; allowed: int")):
        QuantConfig(weight_bits=8.0)


def test_string_given_for_bool_is_rejected():
    with pytest.raises(ConfigError, match=msg("QuantConfig.activation_offset: got 'yes'; allowed: bool")):
        QuantConfig(activation_offset="yes")


def test_from_dict_unknown_key_names_it_and_lists_known_keys():
    known = sorted(f.name for f in dataclasses.fields(QuantConfig))
    assert {"weight_bits", "activation_bits", "batch_num"} <= set(known)
    expected = "QuantConfig.weight_bit: got 4; allowed: no such key; known keys: " + ", ".join(known)
    with pytest.raises(ConfigError, match="^" + msg(expected) + "$"):
        QuantConfig.from_dict({"weight_bit": 4})


def test_from_dict_rejects_a_non_mapping():
    with pytest.raises(ConfigError, match=msg("QuantConfig: got [8]; allowed: a mapping of QuantConfig keys")):
        QuantConfig.from_dict([8])


def test_invalid_yaml_reports_the_line():
    text = "weight_bits: 4\nactivation_bits: [8, 16\nbatch_num: 2\n"
    with pytest.raises(ConfigError, match=r"^QuantConfig: got 'line \d+, column \d+'; allowed: valid YAML \(") as info:
        QuantConfig.from_yaml(text)
    assert int(re.search(r"line (\d+)", str(info.value)).group(1)) >= 2


def test_invalid_json_reports_line_and_column():
    with pytest.raises(ConfigError, match=msg("QuantConfig: got 'line 2, column 1'; allowed: valid JSON (")):
        QuantConfig.from_json('{"weight_bits": 4,\n}')


def test_per_group_size_not_multiple_of_32_is_rejected():
    expected = "QuantConfig.weight_granularity: got {'per_group': 48}; allowed: a positive multiple of 32"
    with pytest.raises(ConfigError, match=msg(expected)):
        QuantConfig(weight_bits=4, weight_granularity={"per_group": 48})


@pytest.mark.parametrize("size", [0, -32, 48, 33])
def test_per_group_object_validates_its_size(size):
    with pytest.raises(ValueError, match=msg(f"PerGroup.group_size: got {size}; allowed: a positive multiple of 32")):
        PerGroup(size)


def test_per_token_is_not_a_weight_granularity():
    expected = "QuantConfig.weight_granularity: got 'per_token'; allowed: per_tensor, per_channel or {'per_group': N}"
    with pytest.raises(ConfigError, match=msg(expected)):
        QuantConfig(weight_granularity="per_token")
    with pytest.raises(ConfigError, match=msg(expected)):
        QuantConfig(weight_granularity=PerToken())


def test_per_channel_is_not_an_activation_granularity():
    with pytest.raises(ConfigError, match=msg("QuantConfig.activation_granularity: got 'per_channel'; allowed: per_tensor or per_token")):
        QuantConfig(activation_granularity="per_channel")


def test_per_group_weights_need_4_or_8_bits():
    with pytest.raises(ConfigError, match=msg("QuantConfig.weight_bits: got 16; allowed: 4 or 8 with per_group weights")):
        QuantConfig(weight_bits=16, weight_granularity=PerGroup(32))


def test_unknown_granularity_name_lists_spellings():
    with pytest.raises(ConfigError, match=r"^QuantConfig\.weight_granularity: got 'per_row'; allowed: per_tensor, per_channel, per_token"):
        QuantConfig(weight_granularity="per_row")


def test_granularity_class_instead_of_instance_gets_a_hint():
    with pytest.raises(ConfigError, match=msg("PerGroup() instead of PerGroup")):
        QuantConfig(weight_granularity=PerGroup)


def test_config_error_is_a_value_error():
    with pytest.raises(ValueError):
        QuantConfig(weight_bits=3)


# -- coercion -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("spelling, expected", [
    ("per_tensor", PerTensor()), ("per_channel", PerChannel()), ({"per_channel": 1}, PerChannel(1)),
    ({"per_group": 64}, PerGroup(64)), (PerGroup(128), PerGroup(128)),
])
def test_granularity_spellings_become_value_objects(spelling, expected):
    cfg = QuantConfig(weight_bits=4, weight_granularity=spelling)
    assert cfg.weight_granularity == expected
    assert type(cfg.weight_granularity) is type(expected)


def test_parse_granularity_accepts_activation_names():
    assert parse_granularity("per_token") == PerToken()


def test_short_summarizes_bits_granularity_and_calibrator():
    assert QuantConfig().short() == "W8 per_channel / A8 ifmr asym"
    cfg = QuantConfig(weight_bits=4, weight_granularity={"per_group": 64}, activation_bits=None)
    assert cfg.short() == "W4 per_group=64 / A-"
    assert QuantConfig(activation_offset=False, activation_calibrator="hfmg").short() == "W8 per_channel / A8 hfmg sym"


# -- round trips --------------------------------------------------------------------------------------
CONFIGS = [
    QuantConfig(),
    QuantConfig(weight_bits=4, weight_granularity=PerGroup(64), activation_bits=None),
    QuantConfig(weight_granularity=PerChannel(axis=1), activation_granularity=PerToken(), activation_offset=False,
                activation_calibrator="hfmg", weight_algorithm="adaround", batch_num=4),
    QuantConfig(weight_bits=16, weight_granularity="per_tensor", activation_bits=16, activation_calibrator="percentile"),
]
CONFIG_IDS = ["default", "per_group_weight_only", "per_channel_axis_per_token", "per_tensor_16bit"]


@pytest.mark.parametrize("cfg", CONFIGS, ids=CONFIG_IDS)
def test_dict_round_trip_equals_original(cfg):
    data = cfg.to_dict()
    assert QuantConfig.from_dict(data) == cfg
    assert json.loads(json.dumps(data)) == data  # plain data only


@pytest.mark.parametrize("cfg", CONFIGS, ids=CONFIG_IDS)
def test_json_round_trip_equals_original(cfg):
    assert QuantConfig.from_json(cfg.to_json()) == cfg


@pytest.mark.parametrize("cfg", CONFIGS, ids=CONFIG_IDS)
def test_yaml_round_trip_equals_original(cfg):
    assert QuantConfig.from_yaml(cfg.to_yaml()) == cfg


def test_granularities_serialize_to_their_short_spelling():
    data = CONFIGS[2].to_dict()
    assert data["weight_granularity"] == {"per_channel": 1}
    assert data["activation_granularity"] == "per_token"
    assert CONFIGS[1].to_dict()["weight_granularity"] == {"per_group": 64}


def test_to_json_path_writes_a_file_that_from_json_reads(tmp_path):
    cfg = CONFIGS[1]
    path = tmp_path / "sub" / "quant.json"
    text = cfg.to_json(path)
    assert path.read_text() == text + "\n"
    assert QuantConfig.from_json(path) == cfg
    assert QuantConfig.from_json(str(path)) == cfg
    assert [p.name for p in path.parent.iterdir()] == ["quant.json"]  # no temporary file left behind


def test_to_yaml_path_writes_a_file_that_from_yaml_reads(tmp_path):
    cfg = CONFIGS[2]
    path = tmp_path / "quant.yaml"
    cfg.to_yaml(path)
    assert QuantConfig.from_yaml(path) == cfg
    assert QuantConfig.from_yaml(str(path)) == cfg


def test_empty_yaml_gives_the_defaults():
    assert QuantConfig.from_yaml("") == QuantConfig()


def test_partial_yaml_keeps_other_defaults():
    cfg = QuantConfig.from_yaml("weight_bits: 4\nweight_granularity:\n  per_group: 32\n")
    assert cfg == QuantConfig(weight_bits=4, weight_granularity=PerGroup(32))


# -- immutability -------------------------------------------------------------------------------------
def test_config_is_frozen():
    cfg = QuantConfig()
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.weight_bits = 4
    assert cfg.weight_bits == 8


def test_granularity_objects_are_frozen():
    with pytest.raises(dataclasses.FrozenInstanceError):
        PerGroup(32).group_size = 64


def test_replace_returns_a_validated_copy():
    cfg = QuantConfig()
    assert cfg.replace(weight_bits=4).weight_bits == 4
    assert cfg.weight_bits == 8
    with pytest.raises(ConfigError, match=msg("QuantConfig.weight_bits: got 5")):
        cfg.replace(weight_bits=5)


def test_configs_are_hashable_values():
    assert hash(QuantConfig(weight_bits=4)) == hash(QuantConfig(weight_bits=4))
    assert len({QuantConfig(), QuantConfig(), QuantConfig(weight_bits=4)}) == 2


# -- the Config base, with a config of our own --------------------------------------------------------
@dataclass(frozen=True)
class LayerListConfig(Config):
    """A config with a nested config and a list field, as techniques will define them."""

    quant: QuantConfig = field(default_factory=QuantConfig)
    layers: tuple[str, ...] = ()
    ratio: float = 0.5


def test_lists_become_tuples_and_nested_dicts_become_configs():
    cfg = LayerListConfig.from_dict({"quant": {"weight_bits": 4}, "layers": ["a", "b"], "ratio": 1})
    assert cfg.quant == QuantConfig(weight_bits=4)
    assert cfg.layers == ("a", "b")
    assert cfg.ratio == 1.0 and isinstance(cfg.ratio, float)
    assert LayerListConfig.from_yaml(cfg.to_yaml()) == cfg


def test_nested_unknown_key_names_the_full_path():
    with pytest.raises(ConfigError, match=msg("LayerListConfig.quant.bits: got 4; allowed: no such key")):
        LayerListConfig.from_dict({"quant": {"bits": 4}})


def test_list_element_type_is_checked():
    with pytest.raises(ConfigError, match=msg("LayerListConfig.layers: got ['a', 3]; allowed: a list of str")):
        LayerListConfig(layers=["a", 3])


def test_config_error_survives_pickling():
    # Regression test (was a bug in amct_torch/config/base.py, ConfigError): the exception's args are the formatted message only,
    # so unpickling calls ConfigError(message) and fails with "missing 2 required positional arguments".
    # Errors raised in DataLoader workers / multiprocessing pools therefore cannot be sent back.
    with pytest.raises(ConfigError) as info:
        QuantConfig(weight_bits=9)
    clone = pickle.loads(pickle.dumps(info.value))
    assert str(clone) == str(info.value)
    assert (clone.key, clone.value, clone.allowed) == (info.value.key, info.value.value, info.value.allowed)


@pytest.mark.parametrize("cfg", [
    QuantConfig(),
    LayerListConfig(layers=tuple(f"encoder.layer.{i}.attention.self.query" for i in range(8))),
], ids=["quant_config", "long_layer_list"])
def test_compact_json_round_trips(cfg):
    # Regression test (was a bug in amct_torch/config/base.py, _read_text_or_path): a one-line text is probed with Path.is_file(),
    # which raises OSError [Errno 36] "File name too long" once the line exceeds NAME_MAX (255 bytes) and
    # contains no "/", so from_json(cfg.to_json(indent=None)) fails for any config whose compact JSON is
    # that long -- QuantConfig's own compact JSON included (about 480 characters).
    text = cfg.to_json(indent=None)
    assert "\n" not in text
    assert type(cfg).from_json(text) == cfg


def test_compact_json_of_the_long_config_exceeds_a_file_name():
    cfg = LayerListConfig(layers=tuple(f"encoder.layer.{i}.attention.self.query" for i in range(8)))
    assert len(cfg.to_json(indent=None)) > 255  # keeps the round-trip case above meaningful


def test_from_json_reads_a_path_given_as_pathlib(tmp_path: Path):
    path = tmp_path / "x.json"
    path.write_text('{"weight_bits": 4}')
    assert QuantConfig.from_json(path).weight_bits == 4

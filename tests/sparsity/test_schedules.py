"""Sparsity schedules: values at given steps against hand-computed numbers; configs validate and round-trip."""

import pytest

from amct_torch.config import ConfigError, MagnitudeConfig, NMConfig
from amct_torch.sparsity import Schedule, iterative_sparsities


def test_oneshot_is_zero_before_start_and_final_from_start_on():
    s = Schedule("oneshot", final=0.6, start=10)
    assert [s(t) for t in (0, 9, 10, 11, 10_000)] == [0.0, 0.0, 0.6, 0.6, 0.6]


def test_linear_ramp_holds_between_update_points():
    s = Schedule("linear", final=0.8, initial=0.2, start=100, end=500, frequency=100)
    assert s(99) == 0.0
    assert s(100) == pytest.approx(0.2)
    assert s(150) == pytest.approx(0.2)  # held until the next update point
    assert s(200) == pytest.approx(0.2 + 0.6 * 0.25)
    assert s(399) == pytest.approx(0.2 + 0.6 * 0.5)
    assert s(500) == pytest.approx(0.8)
    assert s(10_000) == pytest.approx(0.8)


def test_agp_follows_the_cubic_formula():
    # Zhu & Gupta: s_t = s_f + (s_i - s_f) * (1 - (t - t0) / (n * dt)) ** 3; t0 = 0, n * dt = 1000
    s = Schedule("agp", final=0.9, initial=0.1, start=0, end=1000, frequency=250)
    expected = {0: 0.1, 250: 0.9 - 0.8 * 0.75 ** 3, 500: 0.9 - 0.8 * 0.125, 750: 0.9 - 0.8 * 0.25 ** 3, 1000: 0.9}
    for t, v in expected.items():
        assert s(t) == pytest.approx(v)
    assert s(749) == pytest.approx(expected[500])
    # AGP prunes fast early and slowly late: the first interval adds more than the last
    assert s(250) - s(0) > s(1000) - s(750)


def test_agp_reaches_final_at_end_when_the_span_is_not_a_multiple_of_frequency():
    s = Schedule("agp", final=0.5, start=0, end=250, frequency=100)
    assert s(249) == pytest.approx(0.5 * (1 - (1 - 200 / 250) ** 3))
    assert s(250) == pytest.approx(0.5)


def test_schedule_from_config_and_bad_schedules():
    cfg = MagnitudeConfig(sparsity=0.7, schedule="linear", start=0, end=10, frequency=1)
    assert Schedule.from_config(cfg)(5) == pytest.approx(0.35)
    with pytest.raises(ValueError, match="kind"):
        Schedule("cosine", final=0.5, end=10)
    with pytest.raises(ValueError, match="end"):
        Schedule("agp", final=0.5, start=10, end=10)
    with pytest.raises(ValueError, match="0 <= initial <= final < 1"):
        Schedule("linear", final=0.3, initial=0.5, end=10)


def test_iterative_sparsities_prune_the_same_fraction_of_what_is_left():
    levels = iterative_sparsities(0.875, 3)
    assert levels == pytest.approx((0.5, 0.75, 0.875))
    with pytest.raises(ValueError, match="rounds"):
        iterative_sparsities(0.5, 0)


@pytest.mark.parametrize("kwargs, key", [
    ({"sparsity": 1.0}, "MagnitudeConfig.sparsity"),
    ({"sparsity": -0.1}, "MagnitudeConfig.sparsity"),
    ({"schedule": "agp", "start": 100, "end": 100}, "MagnitudeConfig.end"),
    ({"frequency": 0}, "MagnitudeConfig.frequency"),
    ({"sparsity": 0.5, "initial_sparsity": 0.6}, "MagnitudeConfig.initial_sparsity"),
    ({"schedule": "oneshot", "initial_sparsity": 0.1}, "MagnitudeConfig.initial_sparsity"),
    ({"scope": "model"}, "MagnitudeConfig.scope"),
    ({"rewind": -1}, "MagnitudeConfig.rewind"),
])
def test_magnitude_config_errors_name_the_key(kwargs, key):
    with pytest.raises(ConfigError) as err:
        MagnitudeConfig(**kwargs)
    assert err.value.key == key


@pytest.mark.parametrize("kwargs, key", [
    ({"n": 4, "m": 4}, "NMConfig.n"),
    ({"n": 0}, "NMConfig.n"),
    ({"m": 1, "n": 1}, "NMConfig.m"),
    ({"update_freq": -1}, "NMConfig.update_freq"),
    ({"decay": -1e-3}, "NMConfig.decay"),
])
def test_nm_config_errors_name_the_key(kwargs, key):
    with pytest.raises(ConfigError) as err:
        NMConfig(**kwargs)
    assert err.value.key == key


def test_configs_round_trip_through_yaml_and_json():
    mag = MagnitudeConfig(sparsity=0.8, schedule="linear", start=5, end=50, frequency=5, unit="epoch",
                          initial_sparsity=0.1, scope="global", rewind=3)
    assert MagnitudeConfig.from_yaml(mag.to_yaml()) == mag
    assert MagnitudeConfig.from_json(mag.to_json()) == mag
    nm = NMConfig(n=1, m=4, update_freq=10, ste=True, decay=1e-3)
    assert NMConfig.from_dict(nm.to_dict()) == nm
    assert NMConfig().short().startswith("2:4")

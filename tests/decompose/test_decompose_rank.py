"""Rank selection on constructed spectra (EVBMF, energy, rounding) and the DecomposeConfig checks."""

from __future__ import annotations

import math

import numpy as np
import pytest

from amct_torch.config.base import ConfigError
from amct_torch.config.decompose import DecomposeConfig
from amct_torch.decompose import energy_kept, energy_rank, evbmf, evbmf_rank, round_rank
from amct_torch.decompose.rank import tau_bar


def _low_rank_plus_noise(L: int, M: int, rank: int, noise: float, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.standard_normal((L, rank)) @ rng.standard_normal((rank, M)) + noise * rng.standard_normal((L, M))


@pytest.mark.parametrize("L,M,rank,noise", [(64, 144, 5, 0.1), (192, 192, 20, 0.05), (48, 48, 3, 0.01),
                                            (512, 64, 10, 1.0), (30, 1000, 7, 0.3)])
def test_evbmf_finds_the_signal_rank_and_the_noise(L: int, M: int, rank: int, noise: float) -> None:
    y = _low_rank_plus_noise(L, M, rank, noise)
    s = np.linalg.svd(y, compute_uv=False)
    res = evbmf(s, y.shape)
    assert res.rank == rank
    assert res.sigma2 == pytest.approx(noise ** 2, rel=0.1)  # the estimated noise variance
    assert s[rank - 1] > res.threshold > s[rank]


def test_evbmf_of_pure_noise_is_rank_zero_and_scale_free() -> None:
    rng = np.random.default_rng(1)
    for shape in [(48, 48), (16, 144), (300, 40)]:
        s = np.linalg.svd(rng.standard_normal(shape), compute_uv=False)
        assert evbmf_rank(s, shape) == 0
    y = _low_rank_plus_noise(64, 96, 6, 0.05)
    s = np.linalg.svd(y, compute_uv=False)
    for scale in (1e-6, 1.0, 1e4):  # the search runs in log(sigma2): any weight scale gives the same rank
        assert evbmf_rank(s * scale, y.shape) == 6


def test_evbmf_with_exact_low_rank_and_given_noise() -> None:
    y = _low_rank_plus_noise(20, 40, 3, 0.0)
    assert evbmf_rank(np.linalg.svd(y, compute_uv=False), y.shape) == 3  # zero singular values are harmless
    s = np.array([10.0, 5.0, 1.0])
    res = evbmf(s, (3, 100), sigma2=0.01)  # threshold sqrt(M sigma2 x_bar) with M = 100
    assert res.threshold == pytest.approx(math.sqrt(100 * 0.01 * res.x_bar))
    assert res.rank == int((s > res.threshold).sum())


def test_tau_bar_solves_its_equation() -> None:
    assert tau_bar(1.0) == pytest.approx(2.5129, abs=1e-4)  # the paper's constant for a square matrix
    for alpha in (0.05, 0.3, 0.8):
        t = tau_bar(alpha)
        phi = lambda z: math.log1p(z) / z - 0.5  # noqa: E731
        assert phi(t) + phi(t / alpha) == pytest.approx(0.0, abs=1e-9)


def test_energy_rank_on_a_constructed_spectrum() -> None:
    s = np.sqrt([50.0, 30.0, 10.0, 6.0, 4.0])  # squared: 50 30 10 6 4 of 100
    np.testing.assert_allclose(energy_kept(s), [0.5, 0.8, 0.9, 0.96, 1.0])
    assert energy_rank(s, 0.5) == 1
    assert energy_rank(s, 0.51) == 2
    assert energy_rank(s, 0.8) == 2
    assert energy_rank(s, 0.9) == 3
    assert energy_rank(s, 0.95) == 4
    assert energy_rank(s, 1.0) == 5
    assert energy_rank(s[::-1], 0.8) == 2  # order does not matter


def test_round_rank() -> None:
    assert round_rank(0, 1, 48) == 1
    assert round_rank(5, 8, 48) == 8
    assert round_rank(16, 16, 48) == 16
    assert round_rank(17, 16, 48) == 32
    assert round_rank(40, 16, 42) == 42  # never above the full rank


def test_config_validation_names_the_key() -> None:
    with pytest.raises(ConfigError, match=r"DecomposeConfig.energy: got 0.0"):
        DecomposeConfig(energy=0.0)
    with pytest.raises(ConfigError, match=r"DecomposeConfig.macs_ratio: got 1.0"):
        DecomposeConfig(macs_ratio=1.0)
    with pytest.raises(ConfigError, match=r"DecomposeConfig.rank_multiple: got 0"):
        DecomposeConfig(rank_multiple=0)
    with pytest.raises(ConfigError, match=r"DecomposeConfig.rank_selection: got 'vbmf'"):
        DecomposeConfig(rank_selection="vbmf")
    with pytest.raises(ConfigError, match=r"DecomposeConfig.rank: got None; allowed: a rank"):
        DecomposeConfig(rank_selection="fixed")
    with pytest.raises(ConfigError, match=r"DecomposeConfig.rank: got \(4, 8\); allowed: one int"):
        DecomposeConfig(rank_selection="fixed", rank=(4, 8))
    with pytest.raises(ConfigError, match=r"DecomposeConfig.rank: got 0"):
        DecomposeConfig(rank=0)
    with pytest.raises(ConfigError, match=r"DecomposeConfig.ranks: got 4; allowed: no such key"):
        DecomposeConfig.from_dict({"ranks": 4})


def test_config_round_trip_and_short() -> None:
    cfg = DecomposeConfig(conv_method="tucker2", rank_selection="fixed", rank=[4, 8], rank_multiple=8)
    assert cfg.rank == (4, 8)
    assert DecomposeConfig.from_json(cfg.to_json()) == cfg
    assert DecomposeConfig().short() == "decompose spatial, rank evbmf"
    assert DecomposeConfig(rank_selection="macs", macs_scope="model", linear=True).short() == \
        "decompose spatial + linear svd, rank for 0.5 of the model's MACs"

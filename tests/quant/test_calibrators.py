"""Activation calibrators on data whose answer is known: min/max, percentile, IFMR, HFMG, MSE."""

from __future__ import annotations


import numpy as np
import pytest
import torch

from amct_torch.config import QuantConfig
from amct_torch.quant.calibrators import (CALIBRATORS, HFMGCalibrator, IFMRCalibrator, MinMaxCalibrator,
                                          MSECalibrator, PercentileCalibrator, make_calibrator)
from amct_torch.quant.formulas import scale_offset


def fq_mse(data: torch.Tensor, lo: float, hi: float, bits: int, symmetric: bool) -> float:
    """Quantization MSE of ``data`` clipped to ``[lo, hi]``, computed here (numpy float64) with the AMCT formulas."""
    scale, offset = scale_offset(torch.tensor(float(lo)), torch.tensor(float(hi)), bits, symmetric)
    s, o = float(scale), float(offset)
    qmin, qmax = -(1 << (bits - 1)), (1 << (bits - 1)) - 1
    x = data.double().numpy()
    q = np.clip(np.rint(x / s + o), qmin, qmax)
    return float(np.mean(((q - o) * s - x) ** 2))


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def gauss() -> torch.Tensor:
    return torch.randn(50_000, generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def heavy() -> torch.Tensor:
    """Laplace(0, 1) with a few large outliers."""
    g = torch.Generator().manual_seed(1)
    u = torch.rand(50_000, generator=g) - 0.5
    x = -torch.sign(u) * torch.log1p(-2 * u.abs())
    x[:5] = torch.tensor([40.0, -35.0, 30.0, 25.0, -20.0])
    return x


# -- min/max ---------------------------------------------------------------------------------------
def test_minmax_exact_over_batches():
    c = MinMaxCalibrator()
    with pytest.raises(RuntimeError):
        c.clip_range(8, False)
    for batch in (torch.tensor([1.0, -2.0, 3.0]), torch.tensor([[0.5, 7.25]]), torch.tensor([-4.5, 0.0])):
        c.observe(batch)
    assert c.clip_range(8, False) == (-4.5, 7.25)
    assert c.clip_range(8, True) == (-4.5, 7.25)
    # kept in the state_dict
    sd = c.state_dict()
    assert sd["lo"].item() == -4.5 and sd["hi"].item() == 7.25
    # compute() applies the formulas: asym scale = 11.75 / 255, offset = round(-128 + 4.5 / scale)
    scale, offset = c.compute(8, False)
    assert scale.item() == float(np.float32(11.75 / 255))
    assert offset.item() == round(-128 + 4.5 / float(np.float32(11.75 / 255)))  # = round(-30.34...) = -30
    assert offset.item() == -30
    c.reset()
    with pytest.raises(RuntimeError):
        c.clip_range(8, False)


# -- percentile ------------------------------------------------------------------------------------
def test_percentile_exact_element_on_arange():
    # values -500 .. 499 in two batches. max_percentile=0.99: the top 1% (10 values, 490..499) are clipped,
    # hi = 489; min_percentile=0.98: the bottom 2% (20 values, -500..-481) are clipped, lo = -480.
    c = PercentileCalibrator(max_percentile=0.99, min_percentile=0.98)
    data = torch.arange(1000, dtype=torch.float32) - 500
    perm = torch.randperm(1000, generator=torch.Generator().manual_seed(0))
    c.observe(data[perm[:600]])
    c.observe(data[perm[600:]].reshape(20, 20))
    assert c.clip_range(8, False) == (-480.0, 489.0)
    assert int((data > 489).sum()) == 10 and int((data < -480).sum()) == 20


def test_percentile_defaults_and_clamping():
    # default 0.999999 on 1000 values clips nothing: exact min/max
    c = PercentileCalibrator()
    c.observe(torch.arange(1000, dtype=torch.float32) - 300)
    assert c.clip_range(8, False) == (-300.0, 699.0)
    # positive data: lo is clamped to 0 (hi to >= 0 for negative data)
    c = PercentileCalibrator(max_percentile=0.9)
    c.observe(torch.arange(1, 101, dtype=torch.float32))
    assert c.clip_range(8, False) == (0.0, 90.0)  # 10 values (91..100) clipped
    c = PercentileCalibrator(min_percentile=0.9)
    c.observe(-torch.arange(1, 101, dtype=torch.float32))
    assert c.clip_range(8, False) == (-90.0, 0.0)
    c.release()
    with pytest.raises(RuntimeError):
        c.clip_range(8, False)


# -- IFMR ------------------------------------------------------------------------------------------
def _skewed_with_outliers() -> torch.Tensor:
    g = torch.Generator().manual_seed(3)
    return torch.cat([torch.randn(4000, generator=g) * 3 + 1, torch.tensor([60.0, -50.0])])


def test_ifmr_default_candidates_exclude_search_end():
    # search_range (0.7, 1.3) with step 0.01 is max_init * [0.7, 1.3) (QuantConfig docstring, amct.md 4.6:
    # ``clip_max in max_init * [start:step:end)``): 60 candidates 0.70 .. 1.29.
    # Regression: IFMRCalibrator.ratios() was np.arange(0.7, 1.3, 0.01), which (float rounding:
    # (1.3 - 0.7) / 0.01 = 60.000000000000014) has 61 values, the last 1.3000000000000005 >= end (likewise
    # (0.9, 1.1, 0.05) included 1.1); on the data below IFMR actually picked that out-of-range candidate.
    r = IFMRCalibrator().ratios()
    assert r[0] == pytest.approx(0.7)
    assert len(r) == 60
    assert r.max() < 1.3
    assert IFMRCalibrator(search_range=(0.9, 1.1), search_step=0.05).ratios().max() < 1.1
    data = _skewed_with_outliers()
    c = IFMRCalibrator(max_percentile=0.999, min_percentile=0.99)
    c.observe(data)
    lo0, hi0 = c.percentile_range()
    _, hi = c.clip_range(8, False)
    assert hi / hi0 < 1.3


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("symmetric", [True, False])
def test_ifmr_picks_mse_minimising_candidate(heavy, bits, symmetric):
    data = heavy[:8000]
    c = IFMRCalibrator(max_percentile=0.9999, min_percentile=0.9999, search_range=(0.5, 1.3), search_step=0.05)
    for chunk in data.chunk(3):
        c.observe(chunk)
    lo0, hi0 = c.percentile_range()
    assert lo0 < 0 < hi0
    lo, hi = c.clip_range(bits, symmetric)
    # brute force over the same candidate list
    cands = [(float(r) * lo0 if symmetric else lo0, float(r) * hi0) for r in c.ratios()]
    errs = [fq_mse(data, a, b, bits, symmetric) for a, b in cands]
    best = int(np.argmin(errs))
    chosen = min(range(len(cands)), key=lambda k: abs(cands[k][1] - hi) + abs(cands[k][0] - lo))
    assert cands[chosen] == pytest.approx((lo, hi), rel=1e-12, abs=1e-12)
    assert errs[chosen] <= errs[best] * (1 + 1e-5)
    assert len(c.last_search) == len(cands)
    # the search was not trivial: the optimum is not at the percentile start point
    assert errs[best] < fq_mse(data, lo0, hi0, bits, symmetric)
    if not symmetric:
        assert lo == lo0  # asymmetric: the lower clip stays at the percentile value


def test_ifmr_asymmetric_keeps_lower_clip_at_percentile():
    data = _skewed_with_outliers()
    c = IFMRCalibrator(max_percentile=0.999, min_percentile=0.99)
    c.observe(data)
    p = PercentileCalibrator(max_percentile=0.999, min_percentile=0.99)
    p.observe(data)
    lo0, hi0 = p.clip_range(8, False)
    lo, hi = c.clip_range(8, False)
    assert lo == lo0
    assert lo0 < 0 and lo != c.ratios()[0] * lo0
    ratio = hi / hi0
    assert any(abs(ratio - r) < 1e-9 for r in c.ratios())
    # symmetric: the lower clip moves with the ratio instead
    lo_s, hi_s = c.clip_range(8, True)
    assert lo_s / lo0 == pytest.approx(hi_s / hi0, rel=1e-12)


# -- HFMG ------------------------------------------------------------------------------------------
def _best_symmetric_bound(data: torch.Tensor, bits: int, grid: np.ndarray) -> float:
    errs = [fq_mse(data, -b, b, bits, True) for b in grid]
    return float(grid[int(np.argmin(errs))])


def test_hfmg_gaussian_symmetric_near_mse_optimal_clip(gauss):
    c = HFMGCalibrator(2048)
    c.observe(gauss)
    sigma = gauss.std().item()
    # 4 bit: the MSE-optimal symmetric clip of a Gaussian is ~2.4-2.6 sigma
    lo4, hi4 = c.clip_range(4, True)
    assert lo4 == -hi4
    assert 2.2 * sigma <= hi4 <= 2.7 * sigma
    # 8 bit: ~4 sigma, far below max|x| (4.5+ sigma here) but well above 3 sigma
    lo8, hi8 = c.clip_range(8, True)
    assert lo8 == -hi8
    assert 3.5 * sigma <= hi8 <= 4.4 * sigma
    assert hi8 < gauss.abs().max().item()
    # and the error is as good as a brute-force search on the raw data (within 1%)
    for bits, hi in ((4, hi4), (8, hi8)):
        b = _best_symmetric_bound(gauss, bits, np.linspace(0.7 * hi, 1.3 * hi, 41))
        assert fq_mse(gauss, -hi, hi, bits, True) <= fq_mse(gauss, -b, b, bits, True) * 1.01


def test_hfmg_asymmetric_relu_data_has_lo_zero(gauss):
    relu = torch.relu(gauss)
    c = HFMGCalibrator(2048)
    c.observe(relu)
    for bits in (8, 4):
        lo, hi = c.clip_range(bits, False)
        assert lo == 0.0
        assert 0 < hi <= relu.max().item() + 1e-6
    # the 4-bit clip is tighter than the 8-bit one
    assert c.clip_range(4, False)[1] < c.clip_range(8, False)[1]
    scale, offset = c.compute(8, False)
    assert offset.item() == -128  # lo = 0 -> zero is the bottom of the integer range


def test_hfmg_merge_one_batch_vs_growing_batches(gauss):
    one = HFMGCalibrator(2048)
    one.observe(gauss)
    many = HFMGCalibrator(2048)
    order = gauss.abs().argsort()
    chunks = order.chunk(4)  # smallest |x| first: every batch widens the histogram range
    ranges = []
    for idx in chunks:
        many.observe(gauss[idx])
        ranges.append((many.hist.lo.item(), many.hist.hi.item()))
    assert all(b[0] <= a[0] and b[1] >= a[1] for a, b in zip(ranges, ranges[1:]))
    assert ranges[0][1] < ranges[-1][1] / 3  # it really grew
    assert many.hist.lo.item() == one.hist.lo.item() and many.hist.hi.item() == one.hist.hi.item()
    assert many.hist.counts.sum().item() == gauss.numel()
    width = one.hist.width()
    for bits in (8, 4):
        for sym in (True, False):
            a, b = one.clip_range(bits, sym), many.clip_range(bits, sym)
            assert a[0] == pytest.approx(b[0], abs=8 * width + 0.01 * abs(a[0]))
            assert a[1] == pytest.approx(b[1], abs=8 * width + 0.01 * abs(a[1]))


def test_hfmg_state_is_bounded_and_in_state_dict(gauss):
    c = HFMGCalibrator(1024)
    for chunk in gauss.chunk(10):
        c.observe(chunk)
    sd = c.state_dict()
    assert sd["hist.counts"].numel() == 1024
    assert sd["hist.counts"].sum().item() == gauss.numel()
    c2 = HFMGCalibrator(1024)
    c2.load_state_dict(sd)
    assert c2.clip_range(8, True) == c.clip_range(8, True)


# -- MSE -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("symmetric", [True, False])
def test_mse_calibrator_beats_minmax_on_heavy_tails(heavy, bits, symmetric):
    mse, mm = MSECalibrator(2048), MinMaxCalibrator()
    for chunk in heavy.chunk(2):
        mse.observe(chunk)
        mm.observe(chunk)
    lo, hi = mse.clip_range(bits, symmetric)
    lo_m, hi_m = mm.clip_range(bits, symmetric)
    assert (lo_m, hi_m) == (heavy.min().item(), heavy.max().item())
    # a common shrink factor f in (0, 1]
    f = hi / hi_m
    assert 0 < f < 1
    assert lo == pytest.approx(f * lo_m, rel=1e-9)
    assert fq_mse(heavy, lo, hi, bits, symmetric) < fq_mse(heavy, lo_m, hi_m, bits, symmetric)


# -- factory ---------------------------------------------------------------------------------------
def test_make_calibrator_maps_every_config_name():
    assert set(CALIBRATORS) == {"minmax", "percentile", "ifmr", "hfmg", "mse"}
    expect = {"minmax": MinMaxCalibrator, "percentile": PercentileCalibrator, "ifmr": IFMRCalibrator,
              "hfmg": HFMGCalibrator, "mse": MSECalibrator}
    for name, cls in expect.items():
        cfg = QuantConfig(activation_calibrator=name, max_percentile=0.99, min_percentile=0.98,
                          search_range=(0.8, 1.2), search_step=0.05, num_of_bins=1024)
        c = make_calibrator(cfg)
        assert type(c) is cls and c.name == name
        if name in ("percentile", "ifmr"):
            assert (c.max_percentile, c.min_percentile) == (0.99, 0.98)
        if name == "ifmr":
            assert c.search_range == (0.8, 1.2) and c.search_step == 0.05
        if name in ("hfmg", "mse"):
            assert c.hist.bins == 1024
    assert type(make_calibrator(QuantConfig())) is IFMRCalibrator  # AMCT's default


def test_make_calibrator_rejects_unknown_name():
    class Cfg:
        activation_calibrator = "kl"
    with pytest.raises(ValueError, match="kl"):
        make_calibrator(Cfg())

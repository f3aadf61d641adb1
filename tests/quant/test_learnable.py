"""ULQ and LSQ+ gradients against hand-computed values, and the positivity guarantee."""

import math

import pytest
import torch

from amct_torch.quant.learnable import MIN_SCALE, lsq_fake_quant, ulq_factors, ulq_fake_quant


def run(fn, x, *params):
    x = x.clone().requires_grad_(True)
    y = fn(x, *params)
    g = torch.arange(1, x.numel() + 1, dtype=torch.float32)
    y.backward(g)
    return y.detach(), x.grad


def test_ulq_asymmetric_forward_and_gradients_by_hand():
    # 4 bits, clips [-0.5, 1.0]: s = 1.5/15 = 0.1, o = round(-8 + 0.5/0.1) = -3, range [-0.5, 1.0]
    cmax, cmin = torch.tensor(1.0, requires_grad=True), torch.tensor(-0.5, requires_grad=True)
    s, o = ulq_factors(cmax, cmin, 4, False)
    assert float(s) == pytest.approx(0.1) and float(o) == -3
    x = torch.tensor([-0.7, -0.26, 0.33, 1.2, 0.5])
    y, gx = run(lambda t: ulq_fake_quant(t, cmax, cmin, 4), x)
    assert torch.allclose(y, torch.tensor([-0.5, -0.3, 0.3, 1.0, 0.5]), atol=1e-6)
    assert torch.equal(gx, torch.tensor([0.0, 2.0, 3.0, 0.0, 5.0]))  # zero outside the range
    # residuals r = round(x/s) - x/s inside: -0.4 (x=-0.26), -0.3 (x=0.33), 0 (x=0.5)
    assert float(cmax.grad) == pytest.approx((2 * -0.4 + 3 * -0.3) / 15 + 4, abs=1e-5)   # + 1[x > upper] * g
    assert float(cmin.grad) == pytest.approx(1 - (2 * -0.4 + 3 * -0.3) / 15, abs=1e-5)   # 1[x < lower] * g - r/15


def test_ulq_symmetric_gradient_counts_the_negative_saturation():
    # 4 bits symmetric, clip 0.7: s = 0.7/7 = 0.1, range [-0.8, 0.7]
    clip = torch.tensor(0.7, requires_grad=True)
    x = torch.tensor([-0.9, -0.44, 0.26, 0.8])
    y, gx = run(lambda t: ulq_fake_quant(t, clip, None, 4, symmetric=True), x)
    assert torch.allclose(y, torch.tensor([-0.8, -0.4, 0.3, 0.7]), atol=1e-6)
    assert torch.equal(gx, torch.tensor([0.0, 2.0, 3.0, 0.0]))
    assert float(clip.grad) == pytest.approx(1 * (-8 / 7) + (2 * 0.4 + 3 * 0.4) / 7 + 4, abs=1e-5)


def test_ulq_fixed_min_pins_the_lower_clip_at_zero():
    cmax = torch.tensor(2.55, requires_grad=True)
    s, o = ulq_factors(cmax, None, 8, False)
    assert float(s) == pytest.approx(0.01) and float(o) == -128
    y, gx = run(lambda t: ulq_fake_quant(t, cmax, None, 8), torch.tensor([-1.0, 1.004, 3.0]))
    assert torch.allclose(y, torch.tensor([0.0, 1.0, 2.55]), atol=1e-6)
    assert torch.equal(gx, torch.tensor([0.0, 2.0, 0.0]))
    assert float(cmax.grad) == pytest.approx(2 * (100 - 100.4) / 255 + 3, abs=1e-4)


def test_ulq_per_channel_clip_gradients_are_summed_per_channel():
    w = torch.tensor([[0.05, -0.2, 0.4], [1.0, 0.3, -0.1]])
    clip = torch.tensor([[0.35], [0.7]], requires_grad=True)
    y = ulq_fake_quant(w, clip, None, 4, symmetric=True)
    y.sum().backward()
    assert clip.grad.shape == clip.shape
    # channel 0: s = 0.05: 0.05 (r 0), -0.2 (r 0), 0.4 > 0.35 (+1): 1; channel 1: s = 0.1: 1.0 > 0.7 (+1), 0.3, -0.1
    assert torch.allclose(clip.grad, torch.tensor([[1.0], [1.0]]), atol=1e-5)


def test_lsq_plus_gradients_by_hand():
    # 4 bits, s = 0.1, beta = -0.3: o = round(0.3/0.1) = 3, range [(-8-3)*0.1, (7-3)*0.1] = [-1.1, 0.4]
    s, beta = torch.tensor(0.1, requires_grad=True), torch.tensor(-0.3, requires_grad=True)
    x = torch.tensor([-1.3, -0.26, 0.33, 0.6])
    y, gx = run(lambda t: lsq_fake_quant(t, s, beta, 4, grad_scale=1.0), x)
    assert torch.allclose(y, torch.tensor([-1.1, -0.3, 0.3, 0.4]), atol=1e-6)
    assert torch.equal(gx, torch.tensor([0.0, 2.0, 3.0, 0.0]))
    assert float(s.grad) == pytest.approx(1 * -8 + 2 * -0.4 + 3 * -0.3 + 4 * 7, abs=1e-5)  # qmin, r, r, qmax
    assert float(beta.grad) == pytest.approx(1 + 4)  # 1 outside the range, 0 inside


def test_lsq_default_gradient_scale_is_one_over_sqrt_n_qmax():
    s = torch.tensor(0.1, requires_grad=True)
    x = torch.full((50,), 100.0)  # all above the range [-12.8, 12.7]: ds = qmax per element
    lsq_fake_quant(x, s, None, 8).sum().backward()
    assert float(s.grad) == pytest.approx(50 * 127 / math.sqrt(50 * 127), rel=1e-5)


@pytest.mark.parametrize("kind", ["ulq", "lsq"])
def test_adversarial_updates_never_make_a_scale_negative_zero_or_nan(kind):
    p = torch.tensor(1.0, requires_grad=True)
    opt = torch.optim.SGD([p], lr=1e6)
    x = torch.tensor([float("inf"), float("nan"), 5.0, -3.0, 0.2])
    fq = (lambda t: ulq_fake_quant(t, p, None, 8, symmetric=True)) if kind == "ulq" else \
        (lambda t: lsq_fake_quant(t, p, None, 8))
    for push in (1e9, -1e9, float("nan")):
        opt.zero_grad()
        y = fq(x.clone().requires_grad_(True))
        y.backward(torch.ones_like(y))
        assert torch.isfinite(p.grad).all()  # NaN/inf inputs give no NaN gradient
        p.grad.fill_(push if push == push else 0.0)
        opt.step()
        with torch.no_grad():
            s = ulq_factors(p, None, 8, True)[0] if kind == "ulq" else torch.clamp(torch.nan_to_num(p), min=MIN_SCALE)
        assert float(s) >= MIN_SCALE * 0.999 and math.isfinite(float(s))
        out = fq(torch.tensor([0.5, -0.5]))
        assert torch.isfinite(out).all()
    with torch.no_grad():
        p.fill_(float("nan"))  # even a parameter that became NaN quantizes with a finite, positive scale
    assert torch.isfinite(fq(torch.tensor([0.5, -0.5]))).all()


@pytest.mark.parametrize("kind", ["ulq_asym", "ulq_fixed_min", "ulq_sym", "lsq_asym", "lsq_sym"])
def test_per_tensor_fast_backward_equals_the_masked_formulas(kind, monkeypatch):
    from amct_torch.quant import learnable

    bits = 4 if kind.endswith("asym") else 8
    if kind.startswith("ulq"):
        params = [torch.tensor(3.0), torch.tensor(-1.5) if kind == "ulq_asym" else None]
        fq = lambda t, a, b: ulq_fake_quant(t, a, b, bits, symmetric=kind == "ulq_sym")  # noqa: E731
        s, o = ulq_factors(params[0], params[1], bits, kind == "ulq_sym")
    else:
        params = [torch.tensor(0.05), torch.tensor(-0.3) if kind == "lsq_asym" else None]
        fq = lambda t, a, b: lsq_fake_quant(t, a, b, bits)  # noqa: E731
        s, o = params[0], torch.round(-params[1] / params[0]) if params[1] is not None else torch.tensor(0.0)
    qmin, qmax = -(1 << (bits - 1)), (1 << (bits - 1)) - 1
    lo, hi, inf = (qmin - o) * s, (qmax - o) * s, torch.tensor(float("inf"))
    edges = [lo, hi, torch.nextafter(lo, -inf), torch.nextafter(hi, inf), torch.nextafter(lo, inf),
             torch.nextafter(hi, -inf), inf, -inf]
    torch.manual_seed(0)
    x = torch.cat([torch.stack(edges).reshape(-1), torch.randn(500) * 2])
    g = torch.rand_like(x) + 0.5

    def grads():
        t = x.clone().requires_grad_(True)
        ps = [p.clone().requires_grad_(True) if p is not None else None for p in params]
        y = fq(t, *ps)
        y.backward(g)
        return [y.detach(), t.grad] + [p.grad for p in ps if p is not None]

    fast = grads()
    monkeypatch.setattr(learnable, "_per_tensor_sums", lambda *a, **k: None)  # the generic masked backward
    slow = grads()
    assert torch.equal(fast[0], slow[0]) and torch.equal(fast[1], slow[1])
    for a, b in zip(fast[2:], slow[2:]):
        assert a.shape == b.shape and torch.allclose(a, b, rtol=1e-5, atol=1e-4)


def test_scalar_factors_equal_the_tensor_factors():
    """One-element CPU parameters take a NumPy-scalar path for the factors; it must match the tensor ops
    bit for bit, including at rounding ties, for negative, zero, huge and non-finite parameters."""
    from amct_torch.quant.learnable import _lsq_scalars, _ulq_scalars, lsq_factors

    torch.manual_seed(0)
    values = torch.cat([torch.randn(300) * 3, torch.rand(100) * 1e-6, torch.tensor(
        [0.0, -0.0, 1e-9, -1e-9, 1.0, -1.0, 2.55, -0.5, 3e38, -3e38, float("inf"), float("-inf"), float("nan")])])
    # offsets that are exact ties of round(qmin - cmin / s): cmin = -(k + 0.5) s
    ties = [(-(k + 0.5) * 0.01, 2.55 - (k + 0.5) * 0.01) for k in range(0, 40, 3)]
    pairs = [(float(a), float(b)) for a, b in zip(values, values.flip(0))] + [(b, a) for a, b in ties]
    for bits in (4, 8, 16):
        for hi, lo in pairs:
            cmax, cmin = torch.tensor(hi), torch.tensor(lo)
            for symmetric, pmin in ((True, None), (False, None), (False, cmin)):
                s, o = ulq_factors(cmax, pmin, bits, symmetric)
                s2, o2 = _ulq_scalars(cmax, pmin, bits, symmetric)
                assert float(s) == float(s2) and float(o) == float(o2), (hi, lo, bits, symmetric, pmin)
            for beta in (None, cmin):
                s, o = lsq_factors(cmax, beta, bits)
                s2, o2 = _lsq_scalars(cmax, beta, bits)
                assert float(s) == float(s2) and float(o) == float(o2), (hi, lo, bits, beta)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_scalar_and_tensor_factor_paths_give_the_same_outputs_and_gradients(dtype, monkeypatch):
    from amct_torch.quant import learnable

    torch.manual_seed(1)
    x = torch.randn(4, 3, 5, 5, dtype=dtype) * 2

    def run_both():
        out = []
        for fq, p in ((lambda t, a, b: ulq_fake_quant(t, a, b, 8), (torch.tensor(2.5), torch.tensor(-1.25))),
                      (lambda t, a, b: lsq_fake_quant(t, a, b, 4), (torch.tensor(0.3), torch.tensor(-0.2)))):
            t = x.clone().requires_grad_(True)
            ps = [q.clone().requires_grad_(True) for q in p]
            y = fq(t, *ps)
            y.backward(torch.linspace(-1, 2, x.numel(), dtype=dtype).reshape(x.shape))
            out += [y.detach(), t.grad] + [q.grad for q in ps]
        return out

    scalar = run_both()
    monkeypatch.setattr(learnable, "_scalar_path", lambda *a: False)
    tensor = run_both()
    for a, b in zip(scalar, tensor):
        assert a.dtype == b.dtype and torch.allclose(a, b, rtol=1e-6, atol=1e-6)
    assert torch.equal(scalar[0], tensor[0]) and torch.equal(scalar[1], tensor[1])

"""Factorisations of one layer: exact at full rank (every padding mode, stride, bias), Eckart-Young error
below it, AMCT's documented shapes, and the factors keep the layer's dtype, mode and trainability."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from amct_torch.decompose import linear_svd, spatial_matrix, spatial_svd, tucker2
from amct_torch.decompose.factors import layer_args, spatial_full_rank


def _conv(**kw) -> nn.Conv2d:
    torch.manual_seed(0)
    return nn.Conv2d(5, 7, (3, 5), **kw).double()


@pytest.mark.parametrize("padding_mode", ["zeros", "reflect", "replicate", "circular"])
@pytest.mark.parametrize("stride,padding", [((1, 1), (1, 2)), ((2, 1), (1, 1)), ((2, 2), (0, 2)), ((1, 1), "same"),
                                            ((2, 2), "valid")])
def test_full_rank_is_exact(padding_mode: str, stride, padding) -> None:
    conv = _conv(stride=stride, padding=padding, bias=True, padding_mode=padding_mode)
    x = torch.randn(2, 5, 11, 13, dtype=torch.float64)
    y = conv(x)
    spatial = spatial_svd(conv, spatial_full_rank(layer_args(conv)))
    assert [f.kernel_size for f in spatial] == [(3, 1), (1, 5)]
    assert [f.stride for f in spatial] == [(stride[0], 1), (1, stride[1])]
    torch.testing.assert_close(spatial(x), y, rtol=0, atol=1e-10)
    tucker = tucker2(conv, (5, 7), hooi_iterations=1)
    assert [f.kernel_size for f in tucker] == [(1, 1), (3, 5), (1, 1)]
    torch.testing.assert_close(tucker(x), y, rtol=0, atol=1e-10)


def test_dilated_and_unbatched_inputs_are_exact() -> None:
    conv = _conv(dilation=(2, 1), padding=(2, 1))
    x = torch.randn(5, 12, 9, dtype=torch.float64)  # Conv2d accepts an unbatched (C, H, W) input
    torch.testing.assert_close(spatial_svd(conv, 15)(x), conv(x), rtol=0, atol=1e-10)
    assert spatial_svd(conv, 15)[0].dilation == (2, 1)


def test_linear_full_rank_is_exact() -> None:
    torch.manual_seed(0)
    lin = nn.Linear(6, 9).double()
    seq = linear_svd(lin, 6)
    assert (seq[0].in_features, seq[0].out_features, seq[0].bias) == (6, 6, None)
    assert (seq[1].in_features, seq[1].out_features) == (6, 9)
    x = torch.randn(3, 4, 6, dtype=torch.float64)
    torch.testing.assert_close(seq(x), lin(x), rtol=0, atol=1e-12)


def test_rank_deficient_weights_stay_exact() -> None:
    """Zero singular values (a rank-2 weight) add nothing, and nothing divides by them."""
    torch.manual_seed(0)
    lin = nn.Linear(6, 8, bias=False).double()
    with torch.no_grad():
        lin.weight.copy_(torch.randn(8, 2, dtype=torch.float64) @ torch.randn(2, 6, dtype=torch.float64))
    x = torch.randn(5, 6, dtype=torch.float64)
    for rank in (2, 6):
        seq = linear_svd(lin, rank)
        assert all(torch.isfinite(p).all() for p in seq.parameters())
        torch.testing.assert_close(seq(x), lin(x), rtol=0, atol=1e-10)


def test_truncation_error_is_the_discarded_spectrum() -> None:
    """Eckart-Young: the spatial split at rank r leaves exactly the squared singular values beyond r."""
    conv = _conv(padding=1, bias=False)
    s = torch.linalg.svdvals(spatial_matrix(conv.weight.detach()))
    seq = spatial_svd(conv, 4)
    # the composed kernel of the two factors: W'[o, i, y, x] = sum_r A[r, i, y] B[o, r, x]
    a, b = seq[0].weight[..., 0], seq[1].weight[:, :, 0, :]
    rebuilt = torch.einsum("riy,orx->oiyx", a, b)
    err = (rebuilt - conv.weight).pow(2).sum()
    torch.testing.assert_close(err, s[4:].pow(2).sum(), rtol=1e-9, atol=1e-12)


def test_hooi_refines_the_hosvd() -> None:
    """HOOI iterations never fit worse than the HOSVD they start from."""
    torch.manual_seed(0)
    conv = nn.Conv2d(12, 16, 3, bias=False).double()

    @torch.no_grad()
    def error(seq: nn.Sequential) -> float:
        u_in, core, u_out = seq[0].weight[:, :, 0, 0], seq[1].weight, seq[2].weight[:, :, 0, 0]
        rebuilt = torch.einsum("ir,sryx,os->oiyx", u_in.T, core, u_out)
        return float((rebuilt - conv.weight).norm() / conv.weight.norm())

    errors = [error(tucker2(conv, (5, 6), hooi_iterations=n)) for n in (0, 1, 5)]
    assert errors[0] >= errors[1] - 1e-12 >= errors[2] - 2e-12
    assert errors[2] < errors[0]


def test_amct_documented_shapes() -> None:
    """AMCT's example: 64x64x3x3 -> 32x64x3x1 + 64x32x1x3."""
    seq = spatial_svd(nn.Conv2d(64, 64, 3, padding=1), 32)
    assert [tuple(f.weight.shape) for f in seq] == [(32, 64, 3, 1), (64, 32, 1, 3)]
    assert [f.padding for f in seq] == [(1, 0), (0, 1)]
    assert seq[0].bias is None and seq[1].bias is not None


def test_factors_keep_dtype_mode_and_trainability() -> None:
    conv = nn.Conv2d(4, 4, 3).half().train()
    conv.weight.requires_grad_(False)
    seq = spatial_svd(conv, 2)
    assert all(p.dtype == torch.float16 for p in seq.parameters())
    assert seq.training and not any(p.requires_grad for p in seq.parameters())


def test_rank_out_of_range_and_wrong_layers_are_refused() -> None:
    with pytest.raises(ValueError, match=r"spatial_svd rank: got 13; allowed: 1\.\.12"):
        spatial_svd(nn.Conv2d(4, 4, 3), 13)
    with pytest.raises(ValueError, match="groups=1"):
        spatial_svd(nn.Conv2d(4, 4, 3, groups=4), 2)
    with pytest.raises(ValueError, match=r"tucker2 r_out: got 5; allowed: 1\.\.4"):
        tucker2(nn.Conv2d(4, 4, 3), (2, 5))
    with pytest.raises(ValueError, match="allowed: nn.Linear"):
        linear_svd(nn.Conv2d(4, 4, 3), 2)

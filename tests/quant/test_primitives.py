"""Per-group asymmetric quantization primitives: grouping, min-max/LWC parameters, RTN."""

from __future__ import annotations

from itertools import pairwise

import pytest
import torch

from mobiquant.quant.primitives import (
    MIN_SCALE,
    check_bits,
    check_group_size,
    dequantize,
    fake_quant_rtn,
    floor_ste,
    from_groups,
    lwc_params,
    num_groups,
    quantize,
    round_ste,
    to_groups,
)


@pytest.mark.parametrize("bad", [0, 9, -1, 2.0, 2.5, "4", None, True])
def test_check_bits_rejects_non_integers_and_out_of_range(bad):
    with pytest.raises(ValueError, match="bits"):
        check_bits(bad)


@pytest.mark.parametrize("bits", range(1, 9))
def test_check_bits_accepts_1_to_8(bits):
    assert check_bits(bits) == bits


@pytest.mark.parametrize("bad", [0, -64, 1.5, None, False])
def test_check_group_size_rejects_non_positive(bad):
    with pytest.raises(ValueError, match="group_size must be a positive integer"):
        check_group_size(bad)


@pytest.mark.parametrize("width,g,expect", [(576, 128, 5), (512, 128, 4), (100, 64, 2), (64, 128, 1), (1, 1, 1)])
def test_num_groups(width, g, expect):
    assert num_groups(width, g) == expect


@pytest.mark.parametrize("width,g", [(576, 128), (100, 64), (256, 32), (7, 3)])
def test_groups_round_trip_and_ragged_padding_keeps_min_max(width, g, gen):
    w = torch.randn(5, width, generator=gen)
    grouped = to_groups(w, g)
    assert grouped.shape == (5, num_groups(width, g), g)
    assert torch.equal(from_groups(grouped, width), w)
    # Padding repeats each row's last column: the ragged last group's min and max are unchanged.
    start = (num_groups(width, g) - 1) * g
    last = w[:, start:]
    assert torch.equal(grouped[:, -1].amax(-1), last.amax(-1))
    assert torch.equal(grouped[:, -1].amin(-1), last.amin(-1))


def test_ste_helpers_round_forward_and_pass_gradient_through():
    x = torch.tensor([-1.7, -0.5, 0.2, 0.5, 1.5, 2.49], requires_grad=True)
    r, f = round_ste(x), floor_ste(x)
    assert torch.equal(r, x.detach().round())
    assert torch.equal(f, x.detach().floor())
    (r.sum() + 2 * f.sum()).backward()
    assert torch.equal(x.grad, torch.full_like(x, 3.0))


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_minmax_params_cover_the_group_range(bits, gen):
    grouped = to_groups(torch.randn(8, 256, generator=gen), 64)
    p = lwc_params(grouped, bits)
    wmin, wmax = grouped.amin(-1, keepdim=True), grouped.amax(-1, keepdim=True)
    torch.testing.assert_close(p.scale, (wmax - wmin) / (2**bits - 1))
    assert torch.equal(p.zero, p.zero.round())
    codes = quantize(grouped, p, bits)
    assert codes.min() >= 0 and codes.max() <= 2**bits - 1
    assert torch.equal(codes, codes.round())
    # Every weight is within one step of its reconstruction (half a step plus the zero-point rounding).
    err = (dequantize(codes, p) - grouped).abs()
    assert bool((err <= p.scale * (1 + 1e-4)).all())


def test_constant_group_keeps_finite_min_scale():
    grouped = torch.zeros(2, 3, 16)
    p = lwc_params(grouped, 4)
    assert torch.all(p.scale == MIN_SCALE)
    assert torch.equal(dequantize(quantize(grouped, p, 4), p), grouped)


def test_lwc_formula_and_gradients(gen):
    grouped = to_groups(torch.randn(4, 128, generator=gen), 32)
    gamma = torch.randn(4, 4, generator=gen).requires_grad_()
    beta = torch.randn(4, 4, generator=gen).requires_grad_()
    p = lwc_params(grouped, 3, gamma, beta, ste=True)
    h = (
        torch.sigmoid(gamma)[..., None] * grouped.amax(-1, keepdim=True)
        - torch.sigmoid(beta)[..., None] * grouped.amin(-1, keepdim=True)
    ) / 7
    torch.testing.assert_close(p.scale, h)
    lo = torch.sigmoid(beta)[..., None] * grouped.amin(-1, keepdim=True)
    torch.testing.assert_close(p.zero, (-lo / h).round())
    deq = dequantize(quantize(grouped, p, 3, ste=True), p)
    ((deq - grouped) ** 2).sum().backward()
    assert gamma.grad is not None and gamma.grad.abs().sum() > 0
    assert beta.grad is not None and beta.grad.abs().sum() > 0


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("width,g", [(256, 128), (576, 128), (100, 64)])
def test_fake_quant_rtn_matches_reference_and_shrinks_with_bits(bits, width, g, gen):
    w = torch.randn(16, width, generator=gen)
    out = fake_quant_rtn(w, bits, g)
    assert out.shape == w.shape and out.dtype == w.dtype
    # Reference written out group by group, with explicit slicing of the ragged last group.
    ref = torch.empty_like(w)
    for s in range(0, width, g):
        blk = w[:, s : s + g]
        mx, mn = blk.amax(1, keepdim=True), blk.amin(1, keepdim=True)
        h = ((mx - mn) / (2**bits - 1)).clamp(min=MIN_SCALE)
        z = (-mn / h).round()
        q = ((blk / h).round() + z).clamp(0, 2**bits - 1)
        ref[:, s : s + g] = h * (q - z)
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-6)
    # At most 2^b distinct levels per row and group.
    for s in range(0, width, g):
        assert out[0, s : s + g].unique().numel() <= 2**bits


def test_fake_quant_rtn_error_halves_per_bit(gen):
    w = torch.randn(64, 512, generator=gen)
    errs = [float((fake_quant_rtn(w, b, 128) - w).norm() / w.norm()) for b in range(3, 9)]
    ratios = [a / b for a, b in pairwise(errs)]
    assert all(1.7 < r < 2.3 for r in ratios), ratios


def test_fake_quant_rtn_keeps_dtype_and_validates():
    w = torch.randn(4, 64, dtype=torch.float16)
    assert fake_quant_rtn(w, 4, 32).dtype == torch.float16
    with pytest.raises(ValueError):
        fake_quant_rtn(w, 0, 32)
    with pytest.raises(ValueError):
        fake_quant_rtn(w, 4, 0)

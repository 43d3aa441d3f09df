"""MoBiSlice: recursive residual slices, their error decay, and the integer shift-and-add form."""

from __future__ import annotations

from itertools import pairwise

import pytest
import torch

from mobiquant.quant.primitives import MIN_SCALE, fake_quant_rtn, to_groups
from mobiquant.quant.slicer import ResidualSlicer, check_slice_bits

BIT_LISTS = [(2, 2, 2, 2), (3, 1, 1, 1, 1, 1), (4, 2, 2), (2, 2, 2), (8,), (1, 1)]
# (out, in, g): divisible widths and two ragged ones (576 = 4 x 128 + 64, 100 = 64 + 36).
SHAPES = [(24, 256, 32), (24, 256, 64), (24, 256, 128), (24, 576, 128), (24, 100, 64)]


def gaussian(out: int, inp: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(out, inp, generator=torch.Generator().manual_seed(seed))


def student_t(out: int, inp: int, df: float = 3.0, seed: int = 0) -> torch.Tensor:
    torch.manual_seed(seed)
    return torch.distributions.StudentT(df).sample((out, inp))


def rel_errors(slicer: ResidualSlicer, w: torch.Tensor) -> list[float]:
    return [float((w - v).norm() / w.norm()) for v in slicer.views(w)]


# ---------------------------------------------------------------------------- error decay
@pytest.mark.parametrize("dist", ["gaussian", "student_t3"])
@pytest.mark.parametrize("bits", [(2, 2, 2, 2), (4, 2, 2), (3, 1, 1, 1, 1, 1)])
def test_each_slice_cuts_error_by_about_2_to_the_b(dist, bits):
    w = gaussian(64, 1024) if dist == "gaussian" else student_t(64, 1024)
    errs = rel_errors(ResidualSlicer(bits, 128), w)
    assert all(a > b for a, b in pairwise(errs)), errs
    for e in range(1, len(bits)):
        ratio = errs[e - 1] / errs[e]
        target = 2 ** bits[e]
        assert 0.5 * target <= ratio <= 2 * target, (dist, bits, e, errs)
    # Past the first residual, the remaining error is uniform in a step and the ratio is tight.
    for e in range(2, len(bits)):
        assert errs[e - 1] / errs[e] == pytest.approx(2 ** bits[e], rel=0.1)


def test_gaussian_errors_match_spec_measurements():
    errs = rel_errors(ResidualSlicer((2, 2, 2, 2), 128), gaussian(128, 1024, seed=1))
    for got, spec in zip(errs, [0.50, 0.126, 0.031, 0.008], strict=True):
        assert got == pytest.approx(spec, rel=0.15), errs


@pytest.mark.parametrize("bits", [(2, 2, 2, 2), (3, 1, 1, 1, 1, 1), (1, 1, 1)])
@pytest.mark.parametrize("out,inp,g", [(16, 256, 64), (16, 100, 64)])
def test_max_error_of_each_view_is_half_its_step(bits, out, inp, g):
    """Unclipped min-max: |W - W_k| <= h_k / 2 with h_k = h / 2^(b_2 + ... + b_k), every weight."""
    w = student_t(out, inp)
    s = ResidualSlicer(bits, g)
    h = s.base_params(to_groups(w, g)).scale
    for k, v in enumerate(s.views(w), start=1):
        step = (h / 2 ** s.residual_shift(k)).expand(-1, -1, g)
        bound = to_groups(torch.ones_like(w), g) * step / 2
        err = to_groups((w - v).abs(), g)
        assert bool((err <= bound * (1 + 1e-5) + 1e-7).all()), k


# ---------------------------------------------------------------------------- integer form
@pytest.mark.parametrize("bits", BIT_LISTS)
@pytest.mark.parametrize("out,inp,g", SHAPES)
@pytest.mark.parametrize("scale_dtype", [None, torch.float16])
def test_integer_shift_and_add_equals_float_recursion(bits, out, inp, g, scale_dtype):
    w = student_t(out, inp, seed=inp + g) * 0.02
    s = ResidualSlicer(bits, g)
    sc = s.decompose(w, scale_dtype=scale_dtype)
    views = s.views(w, scale_dtype=scale_dtype)
    assert len(views) == len(bits)
    tol = 4 * torch.finfo(torch.float32).eps * float(w.abs().max())
    for k in range(1, len(bits) + 1):
        rec = s.integer_reconstruct(sc, k, inp)
        assert rec.shape == w.shape
        torch.testing.assert_close(rec, views[k - 1], rtol=0, atol=tol)


@pytest.mark.parametrize("bits", BIT_LISTS)
def test_codes_and_concatenated_code_ranges(bits):
    w = gaussian(16, 100)
    s = ResidualSlicer(bits, 64)
    sc = s.decompose(w)
    assert len(sc.codes) == len(bits)
    for c, b in zip(sc.codes, bits, strict=True):
        assert c.dtype == torch.uint8 and int(c.max()) <= 2**b - 1
    prev = None
    for k in range(1, len(bits) + 1):
        ck = s.concat_codes(sc.codes, k)
        assert ck.dtype == torch.int32
        assert 0 <= int(ck.min()) and int(ck.max()) < 2 ** s.bits_at(k)
        if prev is not None:  # C_k is C_(k-1) with the next slice appended in the low bits
            assert torch.equal(ck >> bits[k - 1], prev)
            assert torch.equal(ck & (2 ** bits[k - 1] - 1), sc.codes[k - 1].to(torch.int32))
        prev = ck


def test_bits_at_and_residual_shift():
    s = ResidualSlicer((3, 1, 2, 2), 32)
    assert [s.bits_at(k) for k in range(1, 5)] == [3, 4, 6, 8]
    assert [s.residual_shift(k) for k in range(1, 5)] == [0, 1, 3, 5]
    assert s.num_slices == 4


def test_decompose_stores_fp16_representable_steps():
    s = ResidualSlicer((2, 2, 2, 2), 64)
    sc = s.decompose(gaussian(8, 128))
    assert torch.equal(sc.scale, sc.scale.half().float())
    assert torch.equal(sc.zero, sc.zero.round())


# ---------------------------------------------------------------------------- K = 1 and LWC
@pytest.mark.parametrize("b", [2, 3, 4, 8])
@pytest.mark.parametrize("inp,g", [(256, 128), (576, 128), (100, 64)])
def test_single_slice_is_plain_rtn(b, inp, g):
    w = gaussian(16, inp, seed=b)
    s = ResidualSlicer([b], g)
    (view,) = s.views(w)
    assert torch.equal(view, fake_quant_rtn(w, b, g))
    # The base slice of a many-slice stack is the same RTN grid.
    if b < 8:
        stacked = ResidualSlicer([b] + [1] * (8 - b), g)
        assert torch.equal(stacked.views(w, upto=1)[0], fake_quant_rtn(w, b, g))
    torch.testing.assert_close(s.integer_reconstruct(s.decompose(w, scale_dtype=None), 1, inp), view)


@pytest.mark.parametrize("b", [2, 4])
def test_single_slice_with_lwc_matches_hand_written_formula(b):
    inp, g = 100, 64  # ragged: the second group of each row is 36 wide
    w = student_t(6, inp)
    gen = torch.Generator().manual_seed(3)
    gamma = torch.randn(6, 2, generator=gen)
    beta = torch.randn(6, 2, generator=gen)
    (view,) = ResidualSlicer([b], g).views(w, gamma, beta)
    ref = torch.empty_like(w)
    qmax = 2**b - 1
    for r in range(6):
        for j, start in enumerate(range(0, inp, g)):
            grp = w[r, start : start + g]
            hi = torch.sigmoid(gamma[r, j]) * grp.max()
            lo = torch.sigmoid(beta[r, j]) * grp.min()
            h = max(float((hi - lo) / qmax), MIN_SCALE)
            z = round(float(-lo / h))
            for i in range(grp.numel()):
                q = min(max(round(float(grp[i]) / h) + z, 0), qmax)
                ref[r, start + i] = h * (q - z)
    torch.testing.assert_close(view, ref, rtol=0, atol=1e-6)


def test_clipped_weights_saturate_the_residual_slices():
    w = gaussian(4, 64)
    gamma = torch.full((4, 1), -1.0)  # clip the top at sigmoid(-1) ~ 0.27 of the max
    beta = torch.full((4, 1), 10.0)
    s = ResidualSlicer((2, 2, 2, 2), 64)
    sc = s.decompose(w, gamma, beta, scale_dtype=None)
    top = w.argmax(dim=1)
    for c, b in zip(sc.codes, s.slice_bits, strict=True):
        assert torch.all(c[torch.arange(4), 0, top] == 2**b - 1)


def test_views_are_differentiable_in_lwc_parameters():
    w = gaussian(8, 128)
    gamma = torch.full((8, 2), 2.0, requires_grad=True)
    beta = torch.full((8, 2), 2.0, requires_grad=True)
    s = ResidualSlicer((2, 2, 2, 2), 64)
    views = s.views(w, gamma, beta, ste=True, scale_dtype=torch.float16)
    sum(((v - w) ** 2).sum() for v in views).backward()
    assert gamma.grad.abs().sum() > 0 and beta.grad.abs().sum() > 0
    # The STE path has the same forward values as the hard path.
    for a, b in zip(views, s.views(w, gamma.detach(), beta.detach(), scale_dtype=torch.float16), strict=True):
        assert torch.equal(a.detach(), b)


def test_upto_limits_the_views():
    w = gaussian(8, 128)
    s = ResidualSlicer((2, 2, 2, 2), 64)
    full = s.views(w)
    for k in range(1, 5):
        part = s.views(w, upto=k)
        assert len(part) == k and all(torch.equal(a, b) for a, b in zip(part, full, strict=False))


# ---------------------------------------------------------------------------- errors
@pytest.mark.parametrize(
    "bad", [[], [0, 2], [2, -1], [2.0, 2], [2, 2.5], ["2"], [5, 4], [2, 2, 2, 2, 1], [9], 4, None, "22", {2: 2}]
)
def test_invalid_slice_bits_raise(bad):
    with pytest.raises(ValueError, match="slice_bits"):
        check_slice_bits(bad)
    with pytest.raises(ValueError, match="slice_bits"):
        ResidualSlicer(bad, 128)


def test_sum_over_8_message_names_the_sum():
    with pytest.raises(ValueError, match="sum to 9 bits"):
        ResidualSlicer([3, 3, 3])


@pytest.mark.parametrize("g", [0, -128, 1.5])
def test_invalid_group_size_raises(g):
    with pytest.raises(ValueError, match="group_size"):
        ResidualSlicer((2, 2), g)


@pytest.mark.parametrize("k", [0, 5, -1])
def test_k_out_of_range_raises(k):
    s = ResidualSlicer((2, 2, 2, 2), 64)
    sc = s.decompose(gaussian(4, 64))
    with pytest.raises(ValueError, match="k must be between 1 and 4"):
        s.bits_at(k)
    with pytest.raises(ValueError, match="k must be between 1 and 4"):
        s.integer_reconstruct(sc, k, 64)


@pytest.mark.parametrize(
    "bits,anchor",
    # anchor: the paper's grid (None), or one anchored above the base (fractional zero points)
    [((2, 2, 2, 2), None), ((3, 1, 1, 1, 1, 1), None), ((4, 2, 2), None), ((8,), None), ((2, 2, 2, 2), 6)],
)
@pytest.mark.parametrize("group_size", [32, 64])
def test_closed_form_ste_views_match_autograd_recursion(bits, anchor, group_size):
    """The fused straight-through views equal the plain autograd recursion in value and gradient."""
    from mobiquant.quant.primitives import from_groups, to_groups

    gen = torch.Generator().manual_seed(7)
    w = torch.randn(48, 100, generator=gen) * (torch.rand(48, 1, generator=gen) * 3)
    slicer = ResidualSlicer(bits, group_size, anchor)
    ng = -(-100 // group_size)
    gamma = torch.nn.Parameter(torch.randn(48, ng, generator=gen) + 2)
    beta = torch.nn.Parameter(torch.randn(48, ng, generator=gen) + 2)
    upstream = [torch.randn(48, 100, generator=gen) for _ in bits]

    fused = slicer.views(w, gamma, beta, ste=True, scale_dtype=torch.float16)
    sum((v * u).sum() for v, u in zip(fused, upstream, strict=True)).backward()
    g_fused = (gamma.grad.clone(), beta.grad.clone())
    gamma.grad = beta.grad = None

    grouped = to_groups(w, group_size)
    params = slicer.base_params(grouped, gamma, beta, ste=True, scale_dtype=torch.float16)
    plain = [from_groups(v, 100) for v in slicer.grouped_views(grouped, params, ste=True)]
    sum((v * u).sum() for v, u in zip(plain, upstream, strict=True)).backward()

    for a, b in zip(fused, plain, strict=True):
        assert torch.equal(a, b)
    for got, want in zip(g_fused, (gamma.grad, beta.grad), strict=True):
        assert want.abs().max() > 0
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5 * float(want.abs().max()))

"""Grid anchor: the ``a``-bit view of a MoBiSlice weight is the plain zero-aligned ``a``-bit min-max grid.

The straight-through gradients of anchored grids are checked in ``test_slicer.py`` beside the paper grid's.
"""

from __future__ import annotations

import pytest
import torch

from mobiquant.quant.config import MoBiConfig
from mobiquant.quant.primitives import fake_quant_rtn, to_groups
from mobiquant.quant.slicer import ResidualSlicer

SHAPES = [(32, 256, 128), (24, 576, 128), (16, 100, 64)]


def heavy_tailed(out: int, inp: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(out, inp, generator=gen) * 0.02
    w[torch.rand(out, inp, generator=gen) < 0.01] *= 8  # a few outliers, as in real layers
    return w


@pytest.mark.parametrize("bits,anchor", [((2, 2, 2, 2), 4), ((2, 2, 2, 2), 6), ((3, 1, 1, 1, 1, 1), 4), ((2, 2), 4)])
@pytest.mark.parametrize("out,inp,g", SHAPES)
def test_anchor_view_is_the_rtn_grid_of_that_many_bits(bits, anchor, out, inp, g):
    w = heavy_tailed(out, inp, seed=inp + anchor)
    s = ResidualSlicer(bits, g, anchor_bits=anchor)
    k = next(k for k in range(1, len(bits) + 1) if sum(bits[:k]) == anchor)
    view = s.views(w)[k - 1]
    rtn = fake_quant_rtn(w, anchor, g)
    step = float((w.max() - w.min()) / (2**anchor - 1))
    # Same levels; a weight exactly between two levels may fall either side in floating point.
    assert float((view - rtn).abs().max()) <= step * (1 + 1e-4)
    differ = (view - rtn).abs() > step * 1e-3  # beyond floating-point noise: a different level
    assert float(differ.float().mean()) < 1e-3


@pytest.mark.parametrize("bits,anchor", [((2, 2, 2, 2), 4), ((3, 1, 1, 1, 1, 1), 5)])
def test_views_above_the_anchor_subdivide_it_and_below_merge_it(bits, anchor):
    w = heavy_tailed(64, 256, seed=3)
    anchored = ResidualSlicer(bits, 128, anchor_bits=anchor)
    spec = ResidualSlicer(bits, 128)
    err_a = [float((w - v).norm() / w.norm()) for v in anchored.views(w)]
    err_s = [float((w - v).norm() / w.norm()) for v in spec.views(w)]
    assert err_a == sorted(err_a, reverse=True)  # still nested: every slice helps
    k_anchor = next(k for k in range(1, len(bits) + 1) if sum(bits[:k]) == anchor)
    # At and above the anchor the anchored grid is finer than the base-anchored one ...
    for k in range(k_anchor, len(bits) + 1):
        assert err_a[k - 1] < err_s[k - 1], k
    # ... and each view's levels are the centres of the anchor grid's steps: error <= half its own step.
    grouped = to_groups(w, 128)
    h = anchored.base_params(grouped).scale
    for k, v in enumerate(anchored.views(w), start=1):
        step = h / 2 ** anchored.residual_shift(k)
        err = to_groups((w - v).abs(), 128)
        assert bool((err <= step / 2 * (1 + 1e-5) + 1e-7).all()), k


@pytest.mark.parametrize("scale_dtype", [None, torch.float16])
@pytest.mark.parametrize("out,inp,g", SHAPES)
def test_anchored_integer_form_equals_float_recursion(scale_dtype, out, inp, g):
    w = heavy_tailed(out, inp, seed=11)
    s = ResidualSlicer((2, 2, 2, 2), g, anchor_bits=4)
    sc = s.decompose(w, scale_dtype=scale_dtype)
    views = s.views(w, scale_dtype=scale_dtype)
    assert not torch.equal(sc.zero, sc.zero.round())  # the zero point is fractional here
    assert torch.equal(sc.zero * 8, (sc.zero * 8).round())  # ... a multiple of 1/(2m) = 1/8, exact in fp16
    tol = 4 * torch.finfo(torch.float32).eps * float(w.abs().max())
    for k in range(1, 5):
        torch.testing.assert_close(s.integer_reconstruct(sc, k, inp), views[k - 1], rtol=0, atol=tol)


def test_anchor_at_the_base_is_the_paper_grid():
    w = heavy_tailed(16, 256, seed=1)
    anchored = ResidualSlicer((2, 2, 2, 2), 128, anchor_bits=2).views(w)
    for a, b in zip(anchored, ResidualSlicer((2, 2, 2, 2), 128).views(w), strict=True):
        assert torch.equal(a, b)
    assert MoBiConfig(anchor_bits=2).anchor_bits is None


@pytest.mark.parametrize("bad", [3, 5, 9, 0, 2.0, "4", True])
def test_anchor_must_be_the_bits_of_a_view(bad):
    with pytest.raises(ValueError, match=r"anchor_bits must be null .* one of \[2, 4, 6, 8\]"):
        ResidualSlicer((2, 2, 2, 2), 128, anchor_bits=bad)
    with pytest.raises(ValueError, match="anchor_bits"):
        MoBiConfig(slice_bits=(2, 2, 2, 2), anchor_bits=bad)

"""MoBiLinear: fake-quant and packed lives, static and routed modes, gradients, freezing, accounting."""

from __future__ import annotations

from itertools import pairwise

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from mobiquant.nn.linear import MoBiLinear
from mobiquant.nn.router import TokenRouter


def make_linear(inp: int = 100, out: int = 24, bias: bool = True, seed: int = 0) -> nn.Linear:
    torch.manual_seed(seed)
    return nn.Linear(inp, out, bias=bias)


def make_mobi(inp=100, out=24, slice_bits=(2, 2, 2, 2), group_size=64, router=False, seed=0, policy="adjacent", **kw):
    lin = make_linear(inp, out, seed=seed)
    m = MoBiLinear.from_linear(lin, slice_bits=slice_bits, group_size=group_size, **kw)
    if router:
        torch.manual_seed(seed + 1)
        m.attach_router(TokenRouter(inp, slice_bits, policy=policy))
    return m


def tokens(n: int, dim: int, seed: int = 1, batch: int | None = None) -> torch.Tensor:
    x = torch.randn(n, dim, generator=torch.Generator().manual_seed(seed))
    return x.reshape(batch, n // batch, dim) if batch else x


def perturb_lwc(m: MoBiLinear, seed: int = 2) -> None:
    """Move gamma/beta off their init, as calibration would, so the test covers real clipping."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        m.gamma.add_(torch.randn(m.gamma.shape, generator=g))
        m.beta.add_(torch.randn(m.beta.shape, generator=g))


# ---------------------------------------------------------------------------- construction
def test_from_linear_copies_weights_and_creates_lwc_params():
    lin = make_linear(100, 24)
    m = MoBiLinear.from_linear(lin, slice_bits=(2, 2, 2, 2), group_size=64, lwc_init=4.0)
    assert torch.equal(m.weight, lin.weight) and torch.equal(m.bias, lin.bias)
    assert m.gamma.shape == (24, 2) and m.beta.shape == (24, 2)  # 100 = 64 + 36: two groups per row
    assert bool((m.gamma == 4.0).all()) and m.gamma.requires_grad
    # The frozen FP weight is a buffer, never trained.
    assert [n for n, _ in m.named_parameters()] == ["gamma", "beta"]
    assert m.mode == "static" and m.static_k == 4 and not m.packed
    assert MoBiLinear.from_linear(make_linear(bias=False), lwc_init=None).bias is None


def test_static_fake_forward_is_x_times_the_k_slice_view():
    m = make_mobi()
    perturb_lwc(m)
    x = tokens(10, 100)
    views = m.slicer.views(m.weight, m.gamma.detach(), m.beta.detach(), scale_dtype=torch.float16)
    for k in range(1, 5):
        m.set_static(k)
        torch.testing.assert_close(m(x), F.linear(x, views[k - 1], m.bias))


def test_eight_bit_view_is_close_to_the_linear_without_clipping():
    lin = make_linear(256, 32)
    m = MoBiLinear.from_linear(lin, group_size=64, lwc_init=None)
    x = tokens(64, 256)
    errs = []
    with torch.no_grad():
        ref = lin(x)
        for k in range(1, 5):
            m.set_static(k)
            errs.append(float((m(x) - ref).norm() / ref.norm()))
    assert errs[-1] < 0.02
    assert all(a > 2 * b for a, b in pairwise(errs)), errs


def test_routed_fake_forward_gives_each_token_its_own_view():
    """``y = x W1^T + sum_e m_e x (W_e - W_(e-1))^T`` equals ``x W_(k(x))^T`` token by token."""
    m = make_mobi(router=True, policy="free")  # free gates: every view in one batch
    perturb_lwc(m)
    with torch.no_grad():  # spread the (nearly token-independent) initial scores over tokens
        m.router.net[2].weight.normal_(generator=torch.Generator().manual_seed(3))
        m.router.net[2].bias.zero_()
    x = tokens(300, 100, batch=3)
    m.router.fit_thresholds(x)
    m.router.set_budget(5.0)
    m.set_routed()
    with torch.no_grad():
        y = m(x)
        k = m.router.slice_counts(x)
        assert set(k.unique().tolist()) == {1, 2, 3, 4}  # every view is exercised
        for kk in range(1, 5):
            m.set_static(kk)
            ref = m(x)
            sel = k == kk
            torch.testing.assert_close(y[sel], ref[sel], rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------- gradients
def test_gradients_reach_lwc_and_router_in_routed_fake_quant_mode():
    m = make_mobi(inp=128, out=32, group_size=32, router=True)
    m.set_routed()
    m.target_bits = 5.0
    x = tokens(256, 128, batch=4)
    target = F.linear(x, m.weight, m.bias)
    loss = F.mse_loss(m(x), target)
    loss.backward()
    for p in (m.gamma, m.beta):
        assert p.grad is not None and bool(torch.isfinite(p.grad).all())
        assert float(p.grad.abs().sum()) > 0
        assert float((p.grad != 0).float().mean()) > 0.5  # most groups get a signal, not a stray one
    for name, p in m.router.named_parameters():
        assert p.grad is not None and float(p.grad.abs().sum()) > 0, name
    # The batch target is met by the hard gates of this forward.
    hard = (m.router._cache[2][0].detach() > 0.5).double().reshape(-1, 3)
    assert float(2 + 2 * hard.mean(0).sum()) == pytest.approx(5.0, abs=0.05)


def test_static_fake_quant_mode_trains_lwc_only():
    m = make_mobi(router=True)
    m.set_static(3)
    x = tokens(32, 100)
    F.mse_loss(m(x), F.linear(x, m.weight, m.bias)).backward()
    assert float(m.gamma.grad.abs().sum()) > 0 and float(m.beta.grad.abs().sum()) > 0
    assert all(p.grad is None for p in m.router.parameters())


def _train_steps(m: MoBiLinear, x: torch.Tensor, steps: int, clear: bool) -> list[float]:
    opt = torch.optim.Adam(list(m.parameters()) + list(m.router.parameters()), lr=1e-2)
    target = F.linear(x, m.weight, m.bias)
    losses = []
    for _ in range(steps):
        if clear:
            m.router.clear_cache()
        loss = F.mse_loss(m(x), target)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    return losses


def test_repeated_steps_on_one_batch_with_cleared_router_cache():
    """The calibration loop clears router caches every step; then one fixed batch trains fine."""
    m = make_mobi(router=True)
    m.set_routed()
    m.target_bits = 4.0
    router_before = [p.detach().clone() for p in m.router.parameters()]
    losses = _train_steps(m, tokens(128, 100), steps=3, clear=True)
    assert all(torch.isfinite(torch.tensor(losses))) and len(set(losses)) == 3
    assert bool((m.gamma != 4.0).any()) and bool((m.beta != 4.0).any())
    assert all(not torch.equal(a, b) for a, b in zip(router_before, m.router.parameters(), strict=True))


def test_repeated_steps_on_one_batch_without_clearing_the_cache():
    """Without clearing the router cache, a second step on the same input tensor recomputes the gates
    (the router's parameters changed) instead of reusing the first step's freed graph; the steps match
    those with the cache cleared."""
    x = tokens(128, 100)
    runs = []
    for clear in (True, False):
        m = make_mobi(router=True)
        m.set_routed()
        m.target_bits = 4.0
        runs.append(_train_steps(m, x, steps=3, clear=clear))
    assert runs[0] == runs[1]


def test_router_gates_cached_within_one_forward():
    """Linears sharing a router in one forward get the same gates object (computed once)."""
    m = make_mobi(router=True)
    x = tokens(16, 100)
    g1 = m.router.gates(x, 4.0)
    assert m.router.gates(x, 4.0) is g1
    assert m.router.gates(x, 5.0) is not g1
    with torch.no_grad():
        assert m.router.gates(x, 4.0) is not g1  # no graph in no_grad mode: not the same entry


# ---------------------------------------------------------------------------- freeze
@pytest.mark.parametrize("slice_bits", [(2, 2, 2, 2), (3, 1, 1, 1, 1, 1), (4, 2, 2), (8,)])
@pytest.mark.parametrize("inp,g", [(100, 64), (256, 128), (576, 128), (96, 32)])
@pytest.mark.parametrize("word_bits", [8, 32])
def test_packed_static_output_equals_fake_quant_output(slice_bits, inp, g, word_bits):
    m = make_mobi(inp=inp, out=16, slice_bits=slice_bits, group_size=g, word_bits=word_bits, seed=inp)
    perturb_lwc(m)
    x = tokens(12, inp, batch=3)
    with torch.no_grad():
        fake = []
        for k in range(1, len(slice_bits) + 1):
            m.set_static(k)
            fake.append(m(x))
        m.freeze()
        for k in range(1, len(slice_bits) + 1):
            m.set_static(k)
            torch.testing.assert_close(m(x), fake[k - 1], rtol=1e-5, atol=1e-5)


def test_packed_routed_output_equals_fake_routed_output():
    m = make_mobi(router=True)
    perturb_lwc(m)
    x = tokens(200, 100, batch=2)
    m.router.fit_thresholds(x)
    m.router.set_budget(4.6)
    m.set_routed()
    with torch.no_grad():
        fake = m(x)
        m.freeze()
        m.router.clear_cache()
        torch.testing.assert_close(m(x), fake, rtol=1e-5, atol=1e-5)


def test_freeze_stores_bit_planes_and_drops_the_fp_weight():
    m = make_mobi(inp=100, out=24, slice_bits=(3, 1, 2, 2), group_size=64, word_bits=32)
    codes_before = m.slicer.decompose(m.weight, m.gamma, m.beta).codes
    m.freeze()
    assert m.packed and m.weight is None and m.gamma is None and m.beta is None
    assert not list(m.parameters())
    # One plane per slice, ceil(100 / (32 // b)) int32 words per row.
    assert [tuple(m.plane(e).shape) for e in range(4)] == [(24, 10), (24, 4), (24, 7), (24, 7)]
    assert all(m.plane(e).dtype == torch.int32 for e in range(4))
    assert m.scale.dtype == torch.float16 and m.scale.shape == (24, 2)
    assert m.zero.dtype == torch.float16 and m.zero.shape == (24, 2)
    for got, want in zip(m.codes(), codes_before, strict=True):
        assert torch.equal(got, want.reshape(24, -1)[:, :100])
    m.freeze()  # idempotent
    assert m.packed


def test_freeze_matches_fake_quant_on_degenerate_groups():
    """Constant or narrow one-signed groups have zero points far outside [0, 2^b1 - 1]."""
    lin = make_linear(64, 8)
    with torch.no_grad():
        lin.weight[0, :32] = 0.5  # constant group: the step is the minimum step
        lin.weight[1, :32] = 0.3 + 1e-3 * torch.rand(32)  # narrow, all positive
        lin.weight[2, 32:] = -0.7 + 1e-4 * torch.rand(32)  # narrow, all negative
        lin.weight[3, :32] = 1.0  # constant and large: a zero point beyond the fp16 range
    m = MoBiLinear.from_linear(lin, group_size=32, lwc_init=None)
    x = tokens(5, 64)
    with torch.no_grad():
        fake = []
        for k in range(1, 5):
            m.set_static(k)
            fake.append(m(x))
        m.freeze()
        assert bool(torch.isfinite(m.zero).all())
        for k in range(1, 5):
            m.set_static(k)
            y = m(x)
            assert bool(torch.isfinite(y).all())
            torch.testing.assert_close(y, fake[k - 1], rtol=1e-5, atol=1e-5)


def test_packed_layer_follows_dtype_changes():
    m = make_mobi()
    m.freeze()
    x = tokens(4, 100)
    y32 = m(x)
    m.double()
    y64 = m(x.double())
    assert y64.dtype == torch.float64
    torch.testing.assert_close(y64.float(), y32, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------- accounting
@pytest.mark.parametrize("packed", [False, True])
def test_k_counts_sum_to_tokens_seen(packed):
    m = make_mobi(router=True)
    x = tokens(120, 100, batch=4)
    m.router.fit_thresholds(x)
    m.router.set_budget(5.0)
    if packed:
        m.freeze()
    m.reset_counts()
    m.track = True
    with torch.no_grad():
        m.set_static(2)
        m(x)
        assert m.k_counts.tolist() == [0, 120, 0, 0]
        m.set_routed()
        m(x)
        m(x[:1])
    assert float(m.k_counts.sum()) == 120 + 120 + 30
    k = m.router.slice_counts(x)
    routed = torch.bincount(k.reshape(-1), minlength=5)[1:].double()
    routed += torch.bincount(m.router.slice_counts(x[:1]).reshape(-1), minlength=5)[1:].double()
    assert torch.equal(m.k_counts - torch.tensor([0.0, 120, 0, 0], dtype=torch.float64), routed)
    m.reset_counts()
    assert float(m.k_counts.sum()) == 0


def test_counts_are_off_unless_tracking():
    m = make_mobi()
    m(tokens(8, 100))
    assert float(m.k_counts.sum()) == 0


# ---------------------------------------------------------------------------- errors
@pytest.mark.parametrize("k", [0, 5])
def test_static_k_out_of_range_raises(k):
    with pytest.raises(ValueError, match="k must be between 1 and 4"):
        make_mobi().set_static(k)


def test_routed_mode_needs_a_router():
    with pytest.raises(RuntimeError, match="no router"):
        make_mobi().set_routed()


def test_packed_accessors_need_freeze():
    m = make_mobi()
    with pytest.raises(RuntimeError, match="not packed"):
        m.codes()
    with pytest.raises(RuntimeError, match="not packed"):
        m.dequantized(2)


@pytest.mark.parametrize(
    "kw,match",
    [
        ({"slice_bits": (4, 4, 1)}, "slice_bits"),
        ({"slice_bits": (0, 2)}, "slice_bits"),
        ({"group_size": 0}, "group_size"),
        ({"group_size": -8}, "group_size"),
    ],
)
def test_invalid_construction_raises(kw, match):
    with pytest.raises(ValueError, match=match):
        MoBiLinear(64, 8, **kw)


# ---------------------------------------------------------------------------- the one kernel dispatch
def test_packed_forward_goes_through_the_kernel_dispatch(monkeypatch):
    """Static and per-token k both reach ``mobiquant.kernels.bitplane_linear`` (with the layer's cached
    views for the PyTorch path), and its result is the layer's output."""
    from mobiquant import kernels

    m = make_mobi(router=True, policy="free")
    x = tokens(40, 100)
    m.router.fit_thresholds(x)
    m.router.set_budget(5.0)
    m.freeze()
    calls = []
    real = kernels.bitplane_linear

    def spy(x_, planes, scale, zero, bits, g, k, bias=None, **kw):
        calls.append((k if isinstance(k, int) else k.clone(), kw.get("backend"), kw.get("weight")))
        return real(x_, planes, scale, zero, bits, g, k, bias, **kw)

    monkeypatch.setattr(kernels, "bitplane_linear", spy)
    with torch.no_grad():
        m.set_static(3)
        y_static = m(x)
        m.set_routed()
        y_routed = m(x)
    assert [c[0] for c in calls[:1]] == [3] and calls[0][1] == "auto"
    assert calls[0][2](3) is m.dequantized(3)  # the cached view, in the input's dtype (here the compute dtype)
    k = calls[1][0]
    assert torch.is_tensor(k) and k.shape == (40,) and k.unique().numel() > 1
    torch.testing.assert_close(y_static, F.linear(x, m.dequantized(3), m.bias))
    ref = kernels.torch_reference(x, [m.plane(e) for e in range(4)], m.scale, m.zero, m.slice_bits, 64, k, m.bias)
    torch.testing.assert_close(y_routed, ref, rtol=1e-5, atol=1e-5)


def test_route_tau_as_a_device_tensor_equals_the_float():
    """A per-linear threshold held in a 0-dim tensor routes exactly as the same float, and writing a new
    value into the tensor (a budget change on the device) changes the routing without reassignment."""
    m = make_mobi(router=True, policy="free")
    x = tokens(60, 100)
    m.router.fit_thresholds(x)
    m.router.set_budget(4.0)
    m.freeze()
    m.set_routed()
    values = m.router.gate_values(m.router.scores(x)).detach()
    lo, hi = float(values.quantile(0.3)), float(values.quantile(0.7))
    with torch.no_grad():
        m.route_tau = lo
        y_float, k_float = m(x), m._routed_k(x)
        tau = torch.tensor(lo)
        m.route_tau = tau
        y_tensor, k_tensor = m(x), m._routed_k(x)
        assert torch.equal(k_float, k_tensor) and torch.equal(y_float, y_tensor)
        tau.fill_(hi)
        k_hi = m._routed_k(x)
        m.route_tau = hi
        assert torch.equal(k_hi, m._routed_k(x))
        assert k_hi.float().mean() < k_tensor.float().mean()


def test_dispatch_backend_choice_and_errors():
    from mobiquant import kernels

    m = make_mobi()
    m.freeze()
    planes = [m.plane(e) for e in range(4)]
    x = tokens(3, 100)
    assert not kernels.use_triton(x, planes, "auto")  # CPU: PyTorch, even with TRITON_INTERPRET set
    assert not kernels.use_triton(x, planes, "torch")
    with pytest.raises(ValueError, match="backend must be"):
        kernels.use_triton(x, planes, "cuda")
    bytes_planes = [p.to(torch.uint8) for p in planes]
    assert not kernels.use_triton(x, bytes_planes, "triton")  # byte words: the PyTorch path
    y = kernels.bitplane_linear(x, planes, m.scale, m.zero, m.slice_bits, 64, 2, m.bias, weight=m.dequantized)
    torch.testing.assert_close(y, kernels.torch_reference(x, planes, m.scale, m.zero, m.slice_bits, 64, 2, m.bias))
    with pytest.raises(ValueError, match="entries for 3 tokens"):
        kernels.bitplane_linear(
            x, planes, m.scale, m.zero, m.slice_bits, 64, torch.tensor([1, 2]), weight=m.dequantized
        )


def test_per_token_views_in_the_pytorch_path_give_each_row_its_own_view():
    """Tokens grouped by k (one host read, one sort) get the rows of x W_k^T for their own k; a batch on one
    view is the plain matmul, bit for bit; an empty batch is empty."""
    from mobiquant.kernels import _torch_linear

    g = torch.Generator().manual_seed(0)
    views = {kk: torch.randn(5, 8, generator=g) for kk in range(1, 5)}
    bias = torch.randn(5, generator=g)
    x = torch.randn(3, 7, 8, generator=g)
    k = torch.randint(1, 5, (3, 7), generator=g)
    k[0, 0], k[0, 1] = 1, 4
    y = _torch_linear(x, views.__getitem__, k, bias, 5)
    expect = torch.stack(
        [torch.nn.functional.linear(x.reshape(-1, 8)[i], views[int(kk)], bias) for i, kk in enumerate(k.reshape(-1))]
    )
    torch.testing.assert_close(y.reshape(-1, 5), expect)
    same = torch.full((3, 7), 3)
    assert torch.equal(
        _torch_linear(x, views.__getitem__, same, bias, 5), torch.nn.functional.linear(x, views[3], bias)
    )
    assert _torch_linear(x[:, :0], views.__getitem__, k[:, :0], bias, 5).shape == (3, 0, 5)
    with pytest.raises(ValueError, match="entries"):
        _torch_linear(x, views.__getitem__, k[:, :3], bias, 5)


def test_dense_view_in_another_dtype_is_cast_once():
    """A bf16 model over a checkpoint that dequantizes in fp32: the dense path's view is cast once and kept."""
    m = make_mobi(router=False)
    m.freeze()
    w = m.dense_view(2, torch.bfloat16)
    assert w.dtype == torch.bfloat16 and m.dense_view(2, torch.bfloat16) is w
    torch.testing.assert_close(w, m.dequantized(2).to(torch.bfloat16))
    assert m.dense_view(2, m.dequantized(2).dtype) is m.dequantized(2)
    m.clear_cache()
    assert m.dense_view(2, torch.bfloat16) is not w

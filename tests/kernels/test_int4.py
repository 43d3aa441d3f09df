"""Packed views through ATen's int4 matmuls (``mobiquant.kernels.int4``): every view of every layout equals the
dense view it replaces (to bf16's rounding), a packed layer in bf16 on the CPU takes it by itself (static views,
per-token views, a bias), everything it cannot serve keeps the dense path; on CUDA (when a GPU is present) a few
tokens take torch's CUDA int4 matmul when ``SmallConfig.int4_tokens`` asks for it."""

from __future__ import annotations

import pytest
import torch

from mobiquant.kernels import int4
from mobiquant.nn.linear import MoBiLinear

pytestmark = pytest.mark.skipif(not int4.available(), reason="this torch has no CPU int4 matmul")


def packed_layer(n_in, n_out, slice_bits, view_steps, bias=True, seed=0, group_size=128):
    torch.manual_seed(seed)
    lin = torch.nn.Linear(n_in, n_out, bias=bias)
    m = MoBiLinear.from_linear(lin, slice_bits=slice_bits, group_size=group_size, view_steps=view_steps)
    m.freeze()
    return m.to(torch.bfloat16)


def dense_ref(m, x, k, bias=True):
    """``x W_k^T (+ bias)`` in float64 from the layer's dense view ``k``."""
    ref = x.double() @ m.dequantized(k).double().t()
    return ref + m.bias.double() if bias else ref


def rel_err(y, ref):
    return ((y.double() - ref).norm() / ref.norm()).item()


@pytest.mark.parametrize(
    "n_in,n_out,slice_bits,view_steps",
    [
        (576, 192, (3, 1, 1, 1, 1, 1), True),  # SmolLM2's k/v: 576 inputs, groups of 128 read as 64s
        (1536, 576, (2, 2, 2, 2), False),  # a 2-bit base, one pair for every view
        (320, 64, (3, 1, 1, 1, 1, 1), False),  # a last group of 64
        (256, 48, (4, 4), True),  # a 4-bit view and an 8-bit one
    ],
)
def test_every_view_matches_the_dense_view(n_in, n_out, slice_bits, view_steps):
    m = packed_layer(n_in, n_out, slice_bits, view_steps)
    views = m.int4_views()
    x = torch.randn(5, n_in).bfloat16()
    with torch.no_grad():
        for k in range(1, len(slice_bits) + 1):
            ref = dense_ref(m, x, k, bias=False)
            y = views.matmul(x, k)
            assert y.shape == (5, n_out) and y.dtype == torch.bfloat16
            assert rel_err(y, ref) < 6e-3, (k, rel_err(y, ref))
            assert len(views.parts(k)) == (1 if sum(slice_bits[:k]) <= 4 else 2)
    # the top-4-bit window is one pack, shared by every view of 4 bits or more
    wide = [k for k in range(1, len(slice_bits) + 1) if sum(slice_bits[:k]) >= 4]
    assert len({id(views.parts(k)[0][0]) for k in wide}) == 1


def test_a_packed_layer_in_bf16_takes_it_static_and_per_token():
    m = packed_layer(576, 1536, (3, 1, 1, 1, 1, 1), True)
    x = torch.randn(2, 2, 576).bfloat16()
    with torch.no_grad():
        for k in (1, 2, 6):
            m.set_static(k)
            y = m(x)
            assert m._int4 is not None and k in m._int4._parts  # the int4 path served it
            ref = dense_ref(m, x, k)
            assert rel_err(y, ref) < 6e-3
        # per-token views (a router's choice): each token's rows by its own view, as the dense path groups them
        from mobiquant import kernels

        ks = torch.tensor([[1, 6], [2, 4]])
        planes = [m.plane(e) for e in range(m.num_slices)]
        args = (x, planes, m.scale, m.zero, m.slice_bits, 128, ks, m.bias)
        y = kernels.bitplane_linear(*args, weight=m.dequantized, matmul=m.int4_views().matmul)
        yd = kernels.bitplane_linear(*args, weight=m.dequantized)
        for t in range(2):
            ref = dense_ref(m, x[0, t], int(ks[0, t]))
            assert rel_err(y[0, t], ref) < 6e-3
        assert rel_err(y, yd.double()) < 6e-3


def test_what_it_cannot_serve_keeps_the_dense_path():
    x = torch.randn(1, 576).bfloat16()
    assert int4.usable(x, 192, 576, 128, 8)
    assert not int4.usable(x.float(), 192, 576, 128, 8)  # fp32: the op's fp32 kernel is slower than dense
    assert not int4.usable(x, 200, 576, 128, 8)  # rows not a multiple of 16
    assert not int4.usable(x, 192, 576, 128, 9)  # a view of more than 8 bits
    assert not int4.usable(torch.randn(1, 100).bfloat16(), 192, 100, 100, 4)  # no group of 32-256 divides
    assert not int4.usable(x.requires_grad_(), 192, 576, 128, 8)  # gradients
    many = torch.randn(int4.MAX_TOKENS + 1, 576).bfloat16()  # a prefill: the dense GEMM is faster there
    assert not int4.usable(many, 192, 576, 128, 8)
    assert int4.usable(many[: int4.MAX_TOKENS], 192, 576, 128, 8)
    assert int4.op_group(576, 128) == 64 and int4.op_group(4096, 128) == 128 and int4.op_group(96, 32) == 32
    m = packed_layer(576, 200, (3, 1, 1, 1, 1, 1), True)
    m.set_static(2)
    with torch.no_grad():
        y = m(torch.randn(1, 576).bfloat16())
    assert m._int4 is None and y.shape == (1, 200)  # the dense view served
    m = packed_layer(576, 192, (3, 1, 1, 1, 1, 1), True)
    with torch.no_grad():
        m(many)
    assert m._int4 is None  # more tokens than MAX_TOKENS: the dense view
    m.backend = "torch"  # the dense reference, asked for
    with torch.no_grad():
        m(torch.randn(1, 576).bfloat16())
    assert m._int4 is None


def test_packs_follow_the_steps_and_the_device():
    """A change of the steps (the per-view pair blended, as calibration does) or a move drops the packs."""
    m = packed_layer(576, 192, (3, 1, 1, 1, 1, 1), True)
    m.set_static(2)
    x = torch.randn(1, 576).bfloat16()
    with torch.no_grad():
        m(x)
        assert m._int4 is not None
        m.scale.mul_(2)
        m.clear_cache()
        assert m._int4 is None
        y = m(x)
        ref = dense_ref(m, x, 2)
        assert rel_err(y, ref) < 6e-3
    m.to(torch.float32)
    assert m._int4 is None


def test_packs_made_in_inference_mode_serve_outside_it():
    m = packed_layer(576, 192, (3, 1, 1, 1, 1, 1), True)
    m.set_static(3)
    x = torch.randn(1, 576).bfloat16()
    with torch.inference_mode():
        y0 = m(x)
    assert not any(t.is_inference() for pack, sz in m.int4_views().parts(3) for t in (pack, sz))
    with torch.no_grad():
        assert torch.equal(m(x), y0)


def test_the_cuda_switch_is_checked_and_leaves_the_cpu_alone():
    """``SmallConfig.int4_tokens``: 0 (off) or 2-16, anything else a clear error; on the CPU it changes nothing (the
    CPU's own rule decides), and a CUDA input outside 2..int4_tokens tokens is refused by the input check."""
    from mobiquant.kernels.triton_bitplane import SmallConfig

    for bad in (1, 17, -2):
        with pytest.raises(ValueError, match="int4_tokens must be 0"):
            SmallConfig(int4_tokens=bad)
    m = packed_layer(576, 192, (3, 1, 1, 1, 1, 1), True)
    m.set_static(2)
    m.small_config = SmallConfig(int4_tokens=16)
    x = torch.randn(3, 576).bfloat16()
    with torch.no_grad():
        y = m(x)
    assert m._int4 is not None and rel_err(y, dense_ref(m, x, 2)) < 6e-3  # 3 tokens: the CPU rule (<= 4) served
    assert not int4.cuda_input_fits(x, 16)  # not a CUDA tensor


cuda = pytest.mark.skipif(not int4.available("cuda"), reason="needs a CUDA device with torch's int4 matmul")


@cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_cuda_int4_serves_a_few_tokens(dtype):
    """On CUDA with ``int4_tokens=16``: 2, 6 and 16 tokens of every view (one matmul up to 4 bits, two above) and
    per-token views match the dense view to bf16's rounding; one token, 17 tokens and a captured graph stay on the
    package's kernels (the packs untouched) unless the captured view's packs exist, which the graph then replays;
    on by default (16 tokens), off with ``int4_tokens=0``."""
    from mobiquant.kernels.triton_bitplane import SmallConfig

    m = packed_layer(576, 1536, (3, 1, 1, 1, 1, 1), True).to("cuda", dtype)
    with torch.no_grad():
        m.small_config = SmallConfig(int4_tokens=0)
        m(torch.randn(6, 576, device="cuda", dtype=dtype))
        assert m._int4 is None  # off
        m.small_config = None
        m(torch.randn(6, 576, device="cuda", dtype=dtype))
        assert m._int4 is not None  # on by default
        m.clear_cache()
        m.small_config = SmallConfig(int4_tokens=16)
        for n in (2, 6, 16):
            x = torch.randn(n, 576, device="cuda", dtype=dtype)
            for k in range(1, 7):
                m.set_static(k)
                y = m(x)
                assert y.dtype == dtype and k in m._int4._parts
                assert rel_err(y, dense_ref(m, x, k)) < 8e-3, (n, k)
        m.clear_cache()
        m.set_static(2)
        for n in (1, 17):
            m(torch.randn(n, 576, device="cuda", dtype=dtype))
            assert m._int4 is None, n
        x = torch.randn(6, 576, device="cuda", dtype=dtype)
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            m(x)
        torch.cuda.current_stream().wait_stream(s)
        m.clear_cache()
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            yg = m(x)
        assert m._int4 is None  # captured without packs: the package's kernels (a capture builds none)
        g.replay()
        torch.cuda.synchronize()
        assert rel_err(yg, dense_ref(m, x, 2)) < 8e-3
        # packs built by an eager forward: a capture replays them (batched decode of a static view)
        calls = []
        real = m._int4_serves
        m._int4_serves = lambda *a, **kw: calls.append(real(*a, **kw)) or calls[-1]
        ye = m(x)
        assert calls[-1] and m._int4.built(2)
        g2 = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g2):
            yg2 = m(x)
        assert calls[-1]  # the int4 op inside the graph
        g2.replay()
        torch.cuda.synchronize()
        torch.testing.assert_close(yg2, ye, rtol=0, atol=0)
        m.set_static(3)  # a view without packs: not under capture (its kernels warmed with the int4 path off)
        m.small_config = SmallConfig(int4_tokens=0)
        with torch.cuda.stream(s):
            m(x)
        torch.cuda.current_stream().wait_stream(s)
        m.small_config = SmallConfig(int4_tokens=16)
        with torch.cuda.graph(torch.cuda.CUDAGraph()):
            m(x)
        assert not calls[-1] and not m._int4.built(3)
        del m._int4_serves
        # per-token views through the package's dispatch, as a router's choice reaches it
        from mobiquant import kernels

        x = torch.randn(5, 576, device="cuda", dtype=dtype)
        ks = torch.tensor([1, 6, 3, 3, 2], device="cuda")
        planes = [m.plane(e) for e in range(m.num_slices)]
        y = kernels.bitplane_linear(
            x, planes, m.scale, m.zero, m.slice_bits, 128, ks, m.bias, backend="torch", matmul=m.int4_views().matmul
        )
        for t in range(5):
            assert rel_err(y[t], dense_ref(m, x[t], int(ks[t]))) < 8e-3


def test_a_host_known_view_traces_into_a_compiled_graph():
    """Under ``torch.compile`` a packed bf16 layer on the CPU whose view is known on the host (static, or fixed by a
    budget) and whose packs exist is traced with the code around it (no graph break: ``fullgraph=True``), and gives
    the eager forward's output; before its packs exist, on another backend, or counting slices, it is not."""
    import torch._dynamo

    m = packed_layer(576, 192, (3, 1, 1, 1, 1, 1), True)
    m.set_static(2)
    x = torch.randn(1, 3, 576).bfloat16()
    with torch.no_grad():
        assert m._traced_int4(x) is None  # no packs yet: a trace could not build them
        y = m(x)  # eager: builds view 2's packs
        torch.testing.assert_close(m._traced_int4(x), y, rtol=0, atol=0)
        torch._dynamo.reset()
        compiled = torch.compile(lambda t: torch.nn.functional.silu(m(t)) * 2, fullgraph=True, dynamic=False)
        got = compiled(x)
        torch.testing.assert_close(got, torch.nn.functional.silu(y) * 2, rtol=2e-2, atol=2e-2)
        assert m._traced_int4(torch.randn(1, 5, 576).bfloat16()) is None  # more tokens than the int4 path takes
        assert m._traced_int4(x.float()) is None  # fp32 keeps the dense views
        m.backend = "torch"
        assert m._traced_int4(x) is None
        m.backend, m.track = "auto", True
        assert m._traced_int4(x) is None
        m.track = False
        m.set_static(3)
        assert m._traced_int4(x) is None  # view 3's packs are not built yet


def test_tokens_between_two_views_take_both_without_a_host_read(monkeypatch):
    """A prompt of a few tokens whose views lie between ``j`` and ``j + 1`` (the adjacent policy, its threshold in a
    band: ``MoBiLinear.pair_k``, set by decode's budget) runs both views on every row and takes each token's: the
    grouped path's outputs, and no host read of the token counts (``torch.bincount``, the grouping's read)."""
    from mobiquant import kernels

    m = packed_layer(576, 192, (3, 1, 1, 1, 1, 1), True)
    x = torch.randn(4, 576).bfloat16()
    planes = [m.plane(e) for e in range(m.num_slices)]
    args = (x, planes, m.scale, m.zero, m.slice_bits, 128, torch.tensor([2, 3, 3, 2]), m.bias)
    with torch.no_grad():
        grouped = kernels.bitplane_linear(*args, weight=m.dequantized, matmul=m.int4_views().matmul)
        monkeypatch.setattr(torch, "bincount", lambda *a, **k: pytest.fail("the pair path read the counts"))
        both = kernels.bitplane_linear(*args, weight=m.dequantized, matmul=m.int4_views().matmul, pair=2)
    assert rel_err(both, grouped.double()) < 1e-3  # the same views (the int4 op's row blocking may round apart)


def test_a_prompt_of_an_adjacent_budget_decodes_as_grouped(monkeypatch):
    """Through a patched model at a budget where the tokens choose between two views (decode's ``BudgetControl``
    sets each linear's pair): the logits of a 4-token prompt in bf16 equal those of the grouped path."""
    import mobiquant as mq
    from mobiquant.tasks.decode import BudgetControl
    from mobiquant.tiny import tiny_llama

    model = tiny_llama(hidden_size=256, intermediate_size=512, num_attention_heads=4, num_key_value_heads=2)[0]
    mq.quantize_model(model, mq.MoBiConfig(slice_bits=(3, 1, 1, 1, 1, 1), group_size=128, router_policy="adjacent"))
    g = torch.Generator().manual_seed(100)
    mq.calibrate_thresholds(model, [torch.randint(0, 257, (4, 32), generator=g) for _ in range(2)])
    mq.freeze(model)
    model = model.to(torch.bfloat16)
    BudgetControl.of(model).apply(4.5)
    lins = [m for m in model.modules() if isinstance(m, MoBiLinear)]
    assert any(m.pair_k is not None for m in lins)
    ids = torch.randint(0, 257, (1, 4), generator=g)
    with torch.no_grad():
        pairs = model(input_ids=ids).logits
        for m in lins:
            m.pair_k = None
        grouped = model(input_ids=ids).logits
    assert rel_err(pairs, grouped.double()) < 1e-3

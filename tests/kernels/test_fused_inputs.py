"""A routed site's input made in its router's launch (``kernels.fused_input_router``, ``patching.fuse_inputs``).

On a machine without CUDA these run in Triton's interpreter (this folder's conftest sets ``TRITON_INTERPRET=1``).
"""

from __future__ import annotations

import os

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import mobiquant as mq
from mobiquant import kernels
from mobiquant.nn.fused import FusedGatedMLP, FusedRMSNorm
from mobiquant.patching import fuse_inputs, routers, set_budget
from mobiquant.tiny import tiny_llama

pytest.importorskip("triton", reason="triton is not installed: kernel tests skipped")

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA and os.environ.get("TRITON_INTERPRET", "0") in ("", "0") else "cpu"
if DEVICE == "cpu" and os.environ.get("TRITON_INTERPRET", "0") in ("", "0"):
    pytest.skip("no CUDA device and TRITON_INTERPRET is not set", allow_module_level=True)


def llama_norm(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    """``LlamaRMSNorm.forward``'s arithmetic."""
    h = x.float()
    return w * (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


def router_weights(d: int, g: torch.Generator) -> tuple[torch.Tensor, ...]:
    w1, b1 = torch.randn(12, d, generator=g), torch.randn(12, generator=g)
    w2, b2 = torch.randn(5, 12, generator=g) * 10, torch.randn(5, generator=g)
    return tuple(t.to(DEVICE) for t in (w1, b1, w2, b2))


@pytest.mark.parametrize("policy", ["free", "adjacent"])
@pytest.mark.parametrize("kind", ["rms_norm", "silu_mul"])
@pytest.mark.parametrize(
    "d,tokens,dtype",
    [(64, 1, torch.float32), (100, 5, torch.float32), (72, 19, torch.float32), (96, 1, torch.float16)],
    ids=["d64-t1", "d100-t5", "d72-t19", "d96-t1-fp16"],
)
def test_fused_input_router_is_the_module_then_the_router(policy, kind, d, tokens, dtype):
    """``y`` is the model module's arithmetic (the norm to fp32 rounding of its mean, the SiLU product to that of
    the exponential; fp16 norms equal), and ``k``, ``v`` are exactly what the fused router gives on ``y``: mixed slice
    counts over tokens, odd widths, several token blocks; the up rows may be another tensor's columns (a site
    launch's output)."""
    g = torch.Generator().manual_seed(d + tokens)
    x = (torch.randn(tokens, d, generator=g) * 3).to(DEVICE, dtype)
    if kind == "rms_norm":
        w = (torch.rand(d, generator=g) + 0.5).to(DEVICE, dtype)
        prologue: tuple = ("rms_norm", w, 1e-5)
        ref = llama_norm(x, w, 1e-5)
    else:
        both = (torch.randn(tokens, 2 * d, generator=g) * 2).to(DEVICE, dtype)  # gate and up side by side
        x, up = both[:, :d], both[:, d:]
        prologue = ("silu_mul", up)
        ref = F.silu(x) * up
    router = router_weights(d, g)
    seen = set()
    for tau in (-1e9, 0.0, 0.5, 1e9):
        t = torch.tensor([tau], device=DEVICE)
        y, k, v = kernels.fused_input_router(x, prologue, router, t, policy)
        assert y.dtype == dtype and y.shape == x.shape and k.shape == (tokens,) and v.shape == (tokens, 5)
        if dtype == torch.float16 and kind == "rms_norm":
            assert torch.equal(y, ref)
        torch.testing.assert_close(y, ref, rtol=1e-5 if dtype == torch.float32 else 1e-3, atol=1e-5)
        k2, v2 = kernels.fused_router(y, *router, t, policy)
        assert torch.equal(k, k2) and torch.equal(v, v2)
        assert torch.equal(kernels.fused_input(x, prologue), y)
        seen |= set(k.tolist())
    assert {1, 6} <= seen


@pytest.mark.parametrize("hb,warps", [(2, 4), (4, 2), (16, 8)])
def test_fused_input_router_tiling_keeps_rows_and_counts(hb, warps):
    """Another tiling (several hidden units a program, other warps: what ``router_launch_bench.py --sweep`` times)
    makes the same rows and counts; gate values agree to the rounding of the second layer's sum."""
    from mobiquant.kernels.triton_router import fused_input_router

    g = torch.Generator().manual_seed(11)
    x = (torch.randn(3, 80, generator=g) * 3).to(DEVICE)
    prologue = ("rms_norm", (torch.rand(80, generator=g) + 0.5).to(DEVICE), 1e-5)
    router = router_weights(80, g)
    t = torch.tensor([0.3], device=DEVICE)
    y, k, v = fused_input_router(x, prologue, router, t, "free")
    y2, k2, v2 = fused_input_router(x, prologue, router, t, "free", hidden_per_program=hb, num_warps=warps)
    assert torch.equal(y, y2)
    torch.testing.assert_close(v2, v, rtol=1e-5, atol=1e-4)
    assert torch.equal(k, k2) or bool(((v - t).abs() < 1e-4).any())  # a count moves only with a value at tau
    with pytest.raises(ValueError, match="num_warps=3"):
        fused_input_router(x, prologue, router, t, "free", num_warps=3)
    with pytest.raises(ValueError, match="hidden_per_program=0"):
        fused_input_router(x, prologue, router, t, "free", hidden_per_program=0)


def prologue_case(kind: str, tokens: int, d: int, seed: int) -> tuple:
    """``(x, prologue, router weights, tau)``: random rows, an RMS norm or a gated product over them, a router."""
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(tokens, d, generator=g) * 3).to(DEVICE)
    if kind == "rms_norm":
        prologue: tuple = ("rms_norm", (torch.rand(d, generator=g) + 0.5).to(DEVICE), 1e-5)
    else:
        prologue = ("silu_mul", (torch.randn(tokens, d, generator=g) * 2).to(DEVICE))
    return x, prologue, router_weights(d, g), torch.tensor([0.3], device=DEVICE)


@pytest.mark.parametrize("kind", ["rms_norm", "silu_mul"])
@pytest.mark.parametrize("tokens,cols", [(1, 16), (5, 32)])
def test_fused_input_router_column_splits_make_the_rows_and_counts(kind, tokens, cols):
    """Column splits (``cols_per_program``): each split's first hidden block stores its columns of ``y``; ``y`` is
    the module's arithmetic (the RMS scale summed in other chunks: equal to fp32 rounding), and the counts are
    those of the whole-row tiling unless a gate value sits at the threshold."""
    from mobiquant.kernels.triton_router import fused_input_router

    x, prologue, router, t = prologue_case(kind, tokens, 88, 13)
    y, k, v = fused_input_router(x, prologue, router, t, "free")
    y2, k2, v2 = fused_input_router(x, prologue, router, t, "free", hidden_per_program=4, cols_per_program=cols)
    torch.testing.assert_close(y2, y, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(v2, v, rtol=1e-5, atol=1e-4)
    assert torch.equal(k, k2) or bool(((v - t).abs() < 1e-4).any())


@pytest.mark.parametrize("kind", ["rms_norm", "silu_mul"])
@pytest.mark.parametrize("tokens,d", [(1, 88), (5, 300), (19, 72)])
def test_fused_input_router_in_one_program_makes_the_rows_and_counts(kind, tokens, d):
    """One program a token block holding every hidden unit (no partial sums, no ticket): it stores every row itself,
    bit for bit the default tiling's, and its counts are the default's unless a gate value sits at the threshold."""
    from mobiquant.kernels.triton_router import fused_input_router

    x, prologue, router, t = prologue_case(kind, tokens, d, 17)
    y, k, v = fused_input_router(x, prologue, router, t, "free")
    y2, k2, v2 = fused_input_router(x, prologue, router, t, "free", hidden_per_program=router[0].shape[0])
    assert torch.equal(y, y2)
    # the free policy's values are unbounded (up to ~20 here): fp32 sums in another order differ by their rounding
    torch.testing.assert_close(v2, v, rtol=1e-4, atol=1e-4)
    assert torch.equal(k, k2) or bool(((v - t).abs() < 1e-4).any())


def test_fused_input_rejects_operands_that_do_not_fit():
    x, w = torch.randn(1, 64, device=DEVICE), torch.ones(48, device=DEVICE)
    router = router_weights(64, torch.Generator().manual_seed(0))
    tau = torch.zeros(1, device=DEVICE)
    for prologue, match in [
        (("rms_norm", w, 1e-5), r"norm weight must be \[64\]"),
        (("silu_mul", torch.ones(1, 48, device=DEVICE)), r"up rows must match the gate's \(1, 64\)"),
        (("gelu_mul", x), "prologue 'gelu_mul' is not one of"),
    ]:
        with pytest.raises(ValueError, match=match):
            kernels.fused_input_router(x, prologue, router, tau, "free")
        with pytest.raises(ValueError, match=match):
            kernels.fused_input(x, prologue)


class OffsetRMSNorm(nn.Module):
    """An RMS norm of another arithmetic (``(1 + weight)``, as Gemma's): ``fuse_inputs`` must leave it alone."""

    def __init__(self, d: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(d))
        self.eps = eps

    def forward(self, x):
        h = x.float()
        return ((1 + self.weight) * h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype)


@pytest.fixture(scope="module")
def qmodel():
    model = tiny_llama(seed=0)[0]
    mq.quantize_model(model, mq.MoBiConfig(group_size=32, router_hidden=8))  # 8 programs a router launch
    g = torch.Generator().manual_seed(100)
    mq.calibrate_thresholds(model, [torch.randint(0, 257, (4, 32), generator=g) for _ in range(2)])
    mq.freeze(model)
    return model.to(DEVICE).eval()


def test_fuse_inputs_routes_each_site_in_the_launch_that_makes_its_input(qmodel, monkeypatch):
    """Each layer's input norm takes the q/k/v router, its post-attention norm the gate/up router and its MLP the down
    router (found by tracing); the final norm is fused alone; a norm of another arithmetic is left; state dict keys
    do not move. A one-token forward then launches only the o routers, and its logits are the unfused model's at two
    budgets; the greedy tokens of eager decoding are the unfused model's. ``enable=False`` restores the model."""
    from mobiquant.tasks.decode import generate

    model = qmodel
    layers = model.model.layers
    keys = list(model.state_dict())
    for _, r in routers(model):
        r.backend = "triton"
    x = torch.tensor([[5]], device=DEVICE)
    prompt = torch.randint(0, 257, (10,), generator=torch.Generator().manual_seed(7))
    refs = {}
    for b in (2.5, 5.5):
        set_budget(model, b)
        with torch.no_grad():
            refs[b] = model(input_ids=x).logits
    tokens = generate(model, prompt, 3, budget=4.0, cuda_graph="off").tokens
    own = layers[1].post_attention_layernorm
    layers[1].post_attention_layernorm = OffsetRMSNorm(own.weight.shape[0]).to(DEVICE)
    try:
        assert fuse_inputs(model) == 3 * len(layers)  # the offset norm left alone
        assert isinstance(layers[1].post_attention_layernorm, OffsetRMSNorm)
    finally:
        fuse_inputs(model, enable=False)
        layers[1].post_attention_layernorm = own
    assert fuse_inputs(model) == 3 * len(layers) + 1
    assert list(model.state_dict()) == keys
    fused = {n: m for n, m in model.named_modules() if isinstance(m, (FusedRMSNorm, FusedGatedMLP))}
    assert fused["model.layers.0.input_layernorm"].router is layers[0].self_attn.q_proj.router
    assert fused["model.layers.0.post_attention_layernorm"].router is layers[0].mlp.gate_proj.router
    assert fused["model.layers.1.input_layernorm"].router is layers[1].self_attn.q_proj.router
    assert isinstance(layers[0].mlp, FusedGatedMLP) and fused["model.norm"].router is None
    assert router_launches_fused(model, x, refs, monkeypatch) == [len(layers)] * 2  # o: its input is attention's
    assert torch.equal(generate(model, prompt, 3, budget=4.0, cuda_graph="off").tokens, tokens)
    assert fuse_inputs(model, enable=False) == 0
    assert not any(isinstance(m, (FusedRMSNorm, FusedGatedMLP)) for m in model.modules())
    assert list(model.state_dict()) == keys


def test_fuse_inputs_on_an_unquantized_model_makes_the_same_logits():
    """An unquantized model (plain ``nn.Linear`` consumers, no routers) gets the same fused norms and MLP products;
    its logits and greedy tokens are the unfused model's."""
    from mobiquant.tasks.decode import generate

    model = tiny_llama(seed=1)[0].to(DEVICE).eval()
    x = torch.tensor([[5]], device=DEVICE)
    prompt = torch.randint(0, 257, (10,), generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        ref = model(input_ids=x).logits
    tokens = generate(model, prompt, 3, cuda_graph="off").tokens
    assert fuse_inputs(model) == 3 * len(model.model.layers) + 1
    fused = [m for m in model.modules() if isinstance(m, (FusedRMSNorm, FusedGatedMLP))]
    assert all(getattr(m, "router", None) is None for m in fused)
    for m in fused:
        m.backend = "triton"
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=x).logits, ref, rtol=1e-5, atol=1e-5)
    assert torch.equal(generate(model, prompt, 3, cuda_graph="off").tokens, tokens)
    fuse_inputs(model, enable=False)


@pytest.mark.slow
def test_compiled_decode_fuses_only_the_inputs_a_router_decides_on(qmodel, monkeypatch):
    """Under ``cuda_graph='compile'`` the fused launches stay where they run a router (routed budgets) and give way to
    Inductor's own norm and product elsewhere (static views); the greedy tokens are eager decoding's either way."""
    from mobiquant.tasks.decode import generate

    model = qmodel
    prompt = torch.randint(0, 257, (10,), generator=torch.Generator().manual_seed(7))
    calls = {"rows": 0, "routed": 0}
    real_rows, real_routed = kernels.fused_input, kernels.fused_input_router

    def counted(name, real):
        def call(*a, **k):
            calls[name] += 1
            return real(*a, **k)

        return call

    monkeypatch.setattr(kernels, "fused_input", counted("rows", real_rows))
    monkeypatch.setattr(kernels, "fused_input_router", counted("routed", real_routed))
    assert fuse_inputs(model) > 0
    try:
        for m in model.modules():
            if isinstance(m, (FusedRMSNorm, FusedGatedMLP)) or hasattr(m, "routed_input"):
                m.backend = "triton"
        eager = generate(model, prompt, 4, budget=4.0, cuda_graph="off").tokens
        assert calls["routed"] > 0
        calls.update(rows=0, routed=0)
        assert torch.equal(generate(model, prompt, 4, budget=4.0, cuda_graph="compile").tokens, eager)
        assert calls["routed"] > 0  # the routed sites keep their launch
        mq.set_static(model, 2)
        calls.update(rows=0, routed=0)
        eager = generate(model, prompt, 4, cuda_graph="off").tokens
        per_forward = calls["rows"] // 4  # the prefill and 3 steps: a static view's inputs are fused launches too
        assert per_forward == 3 * len(model.model.layers) + 1 and calls["routed"] == 0
        calls.update(rows=0, routed=0)
        assert torch.equal(generate(model, prompt, 4, cuda_graph="compile").tokens, eager)
        # the eager prefill's and the state's first step's (eager, before the compile) only: the compiled steps none
        assert calls == {"rows": 2 * per_forward, "routed": 0}
        # back to a routed budget on the same model: the steps compiled for the static view are not reused, the
        # routed sites' launches are back in the compiled steps (more than the eager prefill's: how many more
        # depends on the traces and, on CUDA, the replay check's eager step); the final norm, which feeds no
        # router, is fused in the eager prefill and first step only
        calls.update(rows=0, routed=0)
        eager = generate(model, prompt, 4, budget=4.0, cuda_graph="off").tokens
        eager_calls = dict(calls)
        calls.update(rows=0, routed=0)
        assert torch.equal(generate(model, prompt, 4, budget=4.0, cuda_graph="compile").tokens, eager)
        assert calls["rows"] == 2 * (eager_calls["rows"] // 4), (calls, eager_calls)
        assert calls["routed"] > eager_calls["routed"] // 4, (calls, eager_calls)
    finally:
        fuse_inputs(model, enable=False)
        set_budget(model, 4.0)  # routed again, as the other tests leave it


@pytest.mark.parametrize("captured", [False, True], ids=["eager", "as-captured"])
def test_a_router_whose_linears_are_all_fixed_runs_in_no_launch(monkeypatch, captured):
    """Decoding at a budget whose plan fixes every linear's view, one router's linears at different views: with fused
    inputs no launch runs a router (the fixed router's norm or product is a rows-only launch), and the greedy tokens
    are those of the model routing for real at that budget. Uncaptured, the fixed router's linears take their views
    from the host; as a graph capture records them (``kernels.capturing``), they read constant gate values."""
    from mobiquant.tasks.decode import generate
    from tiny_models import mixed_view_model

    model, named, router, odd = mixed_view_model(0)
    model = model.to(DEVICE)
    prompt = torch.randint(0, 257, (10,), generator=torch.Generator().manual_seed(7))
    set_budget(model, 4.0)
    ids = prompt[None].to(DEVICE)
    with torch.no_grad():
        for _ in range(4):  # full-sequence forwards: every router runs
            ids = torch.cat([ids, model(ids).logits[:, -1].argmax(-1, keepdim=True)], 1)
    ref = ids[:, len(prompt) :].cpu()
    calls = {"rows": 0, "routed": 0, "router": 0}
    for name, attr in (("rows", "fused_input"), ("routed", "fused_input_router"), ("router", "fused_router")):
        real = getattr(kernels, attr)
        monkeypatch.setattr(
            kernels, attr, lambda *a, _n=name, _r=real, **k: calls.__setitem__(_n, calls[_n] + 1) or _r(*a, **k)
        )
    real_values = type(router).fixed_values
    monkeypatch.setattr(
        type(router),
        "fixed_values",
        lambda self, x: calls.__setitem__("fixed", calls["fixed"] + 1) or real_values(self, x),
    )
    calls["fixed"] = 0
    if captured:
        monkeypatch.setattr(kernels, "capturing", lambda x: True)
    assert fuse_inputs(model) > 0
    try:
        for m in model.modules():
            if isinstance(m, (FusedRMSNorm, FusedGatedMLP, mq.MoBiLinear)) or hasattr(m, "routed_input"):
                m.backend = "triton"  # the linears too: one-token steps on the one-bit plane kernel, k from the values
        g = generate(model, prompt, 4, budget=4.0, cuda_graph="off")
        assert torch.equal(g.tokens, ref)
        assert calls["rows"] > 0 and calls["routed"] == 0 and calls["router"] == 0, calls
        assert calls["fixed"] == (4 if captured else 0), calls  # as captured: the prompt and 3 steps read the values
        assert named[odd][1].mode == "routed"
    finally:
        fuse_inputs(model, enable=False)


@pytest.mark.parametrize("placement", ["sublayer", "attention", "block"])
def test_borrowing_placements_launch_no_router(monkeypatch, placement):
    """Router placements 'sublayer', 'attention' and 'block': with fused inputs the routers of q/k/v and gate/up (not
    under 'block') run in the launches of the norms before them, down's own router ('attention') in the MLP
    product's, and o (and down under 'sublayer'; o, gate/up and down under 'block') read the decisions made there:
    a one-token forward launches no router of its own, and its logits are the unfused model's at two budgets."""
    model = tiny_llama(seed=0)[0]
    mq.quantize_model(model, mq.MoBiConfig(group_size=32, router_hidden=8, router_placement=placement))
    g = torch.Generator().manual_seed(100)
    mq.calibrate_thresholds(model, [torch.randint(0, 257, (4, 32), generator=g) for _ in range(2)])
    mq.freeze(model)
    model = model.to(DEVICE).eval()
    for _, r in routers(model):
        r.backend = "triton"
    x = torch.tensor([[5]], device=DEVICE)
    refs = logits_at(model, x, (3.5, 5.5))
    assert fuse_inputs(model) == 3 * len(model.model.layers) + 1
    assert router_launches_fused(model, x, refs, monkeypatch) == [0, 0]


def test_block_borrowers_share_a_site_launch(monkeypatch):
    """Router placement 'block': gate and up borrow q/k/v's router yet read one input, so they form a site group; a
    one-token forward on the kernels launches one site a layer for q/k/v and one for gate/up, and its logits are
    those of each linear launched alone."""
    from mobiquant.kernels import triton_bitplane as tb
    from mobiquant.patching import fuse_sites

    model = default_layout_model("block")  # one token on the one-bit plane kernel, sites in one launch
    set_budget(model, 4.5)
    x = torch.tensor([[5]], device=DEVICE)
    sites = []
    real = tb.bitplane_site_bits
    monkeypatch.setattr(tb, "bitplane_site_bits", lambda *a, **k: sites.append(len(a[1].outs)) or real(*a, **k))
    with torch.no_grad():
        grouped = model(input_ids=x).logits
    assert sites == [3, 2] * len(model.model.layers)  # q/k/v, then gate/up, each layer
    assert fuse_sites(model, enable=False) == 0
    sites.clear()
    with torch.no_grad():
        alone = model(input_ids=x).logits
    assert sites == []
    torch.testing.assert_close(grouped, alone, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("placement", ["site", "sublayer"])
def test_router_partials_launch_no_tail_and_keep_the_logits(monkeypatch, placement):
    """``SmallConfig.router_partials``: every router of a one-token forward (inputs wider than one program's columns;
    here the column range is narrowed to 16 so that the tiny model's rows split) launches without its tail, in the
    launch that makes its input where fused inputs put it there (o's under 'site': alone); no launch with a tail runs,
    each linear gets the partials (``RoutedK``), the one-bit plane kernel finishes them by torch operations; the
    logits are those of the routers launched whole at two budgets. Off, nothing changes."""
    from mobiquant.kernels import triton_bitplane as tb
    from mobiquant.kernels import triton_router as tr
    from mobiquant.kernels.triton_router import RouterPartials
    from mobiquant.patching import set_small_config

    model = default_layout_model(placement)
    fuse_inputs(model)
    for m in model.modules():
        if isinstance(m, (FusedRMSNorm, FusedGatedMLP)):
            m.backend = "triton"
    monkeypatch.setattr(tr, "SPLIT_COLS_ONE_TOKEN", 16)
    x = torch.tensor([[5]], device=DEVICE)
    refs = logits_at(model, x, (3.5, 5.5))
    launches = count_router_launches(monkeypatch)
    got = []
    real_bits = tb.bitplane_linear_bits
    monkeypatch.setattr(tb, "bitplane_linear_bits", lambda *a, **k: got.append(type(a[2])) or real_bits(*a, **k))
    real_site = tb.bitplane_site_bits
    monkeypatch.setattr(tb, "bitplane_site_bits", lambda *a, **k: got.append(type(a[2][0])) or real_site(*a, **k))
    set_small_config(model, tb.SmallConfig(router_partials=True))
    per_layer = {"site": 4, "sublayer": 2}[placement]
    for b, logits in refs.items():
        set_budget(model, b)
        launches.update(whole=0, partials=0)
        got.clear()
        with torch.no_grad():
            out = model(input_ids=x).logits
        assert launches == {"whole": 0, "partials": per_layer * len(model.model.layers)}
        assert got and set(got) == {tb.RoutedK}
        torch.testing.assert_close(out, logits, rtol=1e-4, atol=1e-4)
    ks = []
    real_k = tb._bits_k
    monkeypatch.setattr(tb, "_bits_k", lambda k, *a: ks.append(k) or real_k(k, *a))
    with torch.no_grad():
        model(input_ids=x)
    assert ks and all(isinstance(k.values, RouterPartials) for k in ks)
    set_small_config(model, None)
    launches.update(whole=0, partials=0)
    with torch.no_grad():
        model(input_ids=x)
    assert launches["partials"] == 0 and launches["whole"] == per_layer * len(model.model.layers)


@pytest.mark.gpu
@pytest.mark.skipif(DEVICE != "cuda", reason="needs a CUDA device (the fragment kernel is Gluon; 2048-wide rows)")
@pytest.mark.parametrize("placement", ["site", "sublayer"])
def test_gpu_router_partials_keep_the_logits(monkeypatch, placement):
    """On the GPU, rows wide enough to split (2048) and linears on the fragment kernel: with
    ``SmallConfig.router_partials`` no router launch keeps its tail, the fragment launches finish the routers, and a
    one-token forward's logits are those of the routers launched whole at 3.5 and 4.5 bits; greedy decoding through
    the compiled step gives the same tokens."""
    from mobiquant.kernels import triton_bitplane as tb
    from mobiquant.patching import set_small_config
    from mobiquant.tasks.decode import generate

    model = tiny_llama(hidden_size=2048, intermediate_size=4096, num_hidden_layers=1, num_attention_heads=16,
                       num_key_value_heads=4, seed=3)[0]  # fmt: skip
    cfg = mq.MoBiConfig(slice_bits=(3, 1, 1, 1, 1, 1), group_size=128, router_placement=placement)
    mq.quantize_model(model, cfg)
    g = torch.Generator().manual_seed(100)
    mq.calibrate_thresholds(model, [torch.randint(0, 257, (4, 32), generator=g) for _ in range(2)])
    mq.freeze(model)
    model = model.to(DEVICE, torch.float16).eval()
    fuse_inputs(model)
    x = torch.tensor([[5]], device=DEVICE)
    refs = logits_at(model, x, (3.5, 4.5))
    prompt = torch.randint(0, 257, (6,), generator=torch.Generator().manual_seed(7))
    tokens = generate(model, prompt, 4, budget=4.5).tokens
    set_small_config(model, tb.SmallConfig(router_partials=True))
    launches = count_router_launches(monkeypatch)
    got = logits_at(model, x, (3.5, 4.5))
    assert launches["whole"] == 0 and launches["partials"] > 0, launches
    for b in refs:
        torch.testing.assert_close(got[b], refs[b], rtol=2e-3, atol=2e-3)
    assert torch.equal(generate(model, prompt, 4, budget=4.5).tokens, tokens)


def count_router_launches(monkeypatch) -> dict[str, int]:
    """Counts, from now on, the router launches with their tail (``whole``: ``kernels.fused_router`` and
    ``fused_input_router``) and without (``partials``: ``kernels.router_partials``)."""
    launches = {"whole": 0, "partials": 0}

    def counted(real, key):
        def launch(*a, **kw):
            launches[key] += 1
            return real(*a, **kw)

        return launch

    for name, key in (("fused_router", "whole"), ("fused_input_router", "whole"), ("router_partials", "partials")):
        monkeypatch.setattr(kernels, name, counted(getattr(kernels, name), key))
    return launches


def default_layout_model(placement: str) -> nn.Module:
    """The tiny LLaMA quantized in the default layout [3, 1, 1, 1, 1, 1] with routers at ``placement``, thresholds
    calibrated, frozen, on ``DEVICE`` in eval mode, its routers and linears on the kernels (``backend`` 'triton')."""
    from mobiquant.patching import mobi_linears

    model = tiny_llama(seed=0)[0]
    cfg = mq.MoBiConfig(slice_bits=(3, 1, 1, 1, 1, 1), group_size=32, router_hidden=8, router_placement=placement)
    mq.quantize_model(model, cfg)
    g = torch.Generator().manual_seed(100)
    mq.calibrate_thresholds(model, [torch.randint(0, 257, (4, 32), generator=g) for _ in range(2)])
    mq.freeze(model)
    model = model.to(DEVICE).eval()
    for _, m in (*routers(model), *mobi_linears(model)):
        m.backend = "triton"
    return model


def logits_at(model, x, budgets) -> dict[float, torch.Tensor]:
    """The logits of a forward of ``x`` at each budget."""
    refs = {}
    for b in budgets:
        set_budget(model, b)
        with torch.no_grad():
            refs[b] = model(input_ids=x).logits
    return refs


def router_launches_fused(model, x, refs, monkeypatch) -> list[int]:
    """With the model's fused modules on the kernels: the router launches of a forward of ``x`` at each budget of
    ``refs`` (budget -> the logits it must give, checked)."""
    for m in model.modules():
        if isinstance(m, (FusedRMSNorm, FusedGatedMLP)):
            m.backend = "triton"
    launches = []
    real = kernels.fused_router
    monkeypatch.setattr(kernels, "fused_router", lambda *a, **k: (launches.append(1), real(*a, **k))[1])
    counts = []
    for b, logits in refs.items():
        set_budget(model, b)
        launches.clear()
        with torch.no_grad():
            out = model(input_ids=x).logits
        counts.append(len(launches))
        torch.testing.assert_close(out, logits, rtol=1e-5, atol=1e-5)
    return counts

"""The fused router kernel against :class:`~mobiquant.nn.router.TokenRouter`'s PyTorch path.

On a machine without CUDA these run in Triton's interpreter (this folder's conftest sets
``TRITON_INTERPRET=1``) on small shapes. Thresholds are placed between gate values (never within 1e-4 of
one), so the slice counts of kernel and PyTorch must agree exactly; gate values agree to fp32 rounding.
"""

from __future__ import annotations

import os

import pytest
import torch

from mobiquant import MoBiLinear, kernels
from mobiquant.nn.router import TokenRouter

pytest.importorskip("triton", reason="triton is not installed: kernel tests skipped")

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA and os.environ.get("TRITON_INTERPRET", "0") in ("", "0") else "cpu"
if DEVICE == "cpu" and os.environ.get("TRITON_INTERPRET", "0") in ("", "0"):
    pytest.skip("no CUDA device and TRITON_INTERPRET is not set", allow_module_level=True)


def make_router(d, slice_bits, hidden, policy, seed=0):
    torch.manual_seed(seed)
    r = TokenRouter(d, slice_bits, hidden=hidden, policy=policy)
    with torch.no_grad():  # scores spread over several units: every slice count is reachable
        r.net[2].weight.mul_(10.0)
    return r.to(DEVICE).eval()


def safe_taus(values: torch.Tensor, n: int = 5) -> list[float]:
    """Thresholds at spread quantiles of ``values``, each halfway in a gap of at least 1e-3, plus one
    above and one below every value (all k = 1 and all k = K)."""
    v = values.detach().double().flatten().sort().values.cpu()
    gaps = v[1:] - v[:-1]
    ok = (gaps > 1e-3).nonzero().flatten()
    picks = ok[torch.linspace(0, len(ok) - 1, n).round().long()] if len(ok) else ok
    mids = [float((v[i] + v[i + 1]) / 2) for i in picks.tolist()]
    return [float(v[-1]) + 1.0, *mids, float(v[0]) - 1.0]


def torch_counts(r: TokenRouter, x: torch.Tensor, tau: float) -> tuple[torch.Tensor, torch.Tensor]:
    with torch.no_grad():
        m = r.gate_values(r.scores(x)).float()
    return 1 + (m > tau).sum(-1), m


@pytest.mark.parametrize("policy", ["free", "adjacent"])
@pytest.mark.parametrize(
    "d,slice_bits,hidden,tokens",
    [(64, (2, 2, 2, 2), 16, 1), (100, (2, 2, 2, 2), 24, 5), (72, (3, 1, 1, 1, 1, 1), 12, 19), (33, (4, 4), 8, 3)],
    ids=["d64-k4-t1", "d100-h24-t5", "d72-k6-t19", "d33-k2-t3"],
)
def test_fused_router_equals_torch(policy, d, slice_bits, hidden, tokens):
    """Every slice count (thresholds above and below all values, and between them), mixed k within one
    batch, odd widths (d not a multiple of the chunk, hidden not a power of two), several token blocks."""
    r = make_router(d, slice_bits, hidden, policy)
    x = torch.randn(tokens, d, generator=torch.Generator().manual_seed(1)).to(DEVICE) * 2
    _, m_ref = torch_counts(r, x, 0.0)
    K = len(slice_bits)
    seen = set()
    for tau in safe_taus(m_ref):
        k_ref, _ = torch_counts(r, x, tau)
        t = torch.tensor(tau, device=DEVICE)
        k, m = kernels.fused_router(x, r.net[0].weight, r.net[0].bias, r.net[2].weight, r.net[2].bias, t, policy)
        assert k.dtype == torch.int64 and k.shape == (tokens,) and m.shape == (tokens, K - 1)
        torch.testing.assert_close(m, m_ref, rtol=1e-5, atol=1e-5)
        assert torch.equal(k, k_ref), (tau, k.tolist(), k_ref.tolist())
        seen |= set(k.tolist())
    assert {1, K} <= seen
    if tokens >= 5:
        assert len(seen) >= 3  # mixed k inside single batches


def test_fused_router_hidden_per_program_and_batch_shape():
    from mobiquant.kernels.triton_router import fused_router

    r = make_router(48, (2, 2, 2, 2), 20, "free")
    x = torch.randn(2, 3, 48, generator=torch.Generator().manual_seed(2)).to(DEVICE)
    k_ref, m_ref = torch_counts(r, x, 0.0)
    tau = safe_taus(m_ref, 1)[1]
    k_ref, _ = torch_counts(r, x, tau)
    for hb in (1, 2, 4):
        k, m = fused_router(
            x,
            r.net[0].weight,
            r.net[0].bias,
            r.net[2].weight,
            r.net[2].bias,
            torch.tensor(tau, device=DEVICE),
            "free",
            hidden_per_program=hb,
        )
        assert k.shape == (2, 3) and m.shape == (2, 3, 3)
        assert torch.equal(k, k_ref)
        torch.testing.assert_close(m, m_ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("x_dtype,r_dtype", [(torch.float16, torch.float32), (torch.float32, torch.float16)])
def test_fused_router_reads_inputs_of_another_dtype(x_dtype, r_dtype):
    """Inputs of another dtype than the router's (fp16 activations, fp32 router: the package's decode) are read as
    they are and rounded to the router's dtype in the kernel, as the module rounds them: the same values, the same
    counts, and no copy of the inputs (no launch) before the kernel."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Ops(TorchDispatchMode):
        names: list[str] = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.names.append(func.__name__)
            return func(*args, **(kwargs or {}))

    r = make_router(96, (3, 1, 1, 1, 1, 1), 16, "free").to(r_dtype)
    x = (torch.randn(7, 96, generator=torch.Generator().manual_seed(3)) * 2).to(x_dtype).to(DEVICE)
    _, m_ref = torch_counts(r, x, 0.0)
    tau = safe_taus(m_ref, 3)[2]
    k_ref, _ = torch_counts(r, x, tau)
    t = torch.tensor(tau, device=DEVICE)
    w = [p.detach() for p in (r.net[0].weight, r.net[0].bias, r.net[2].weight, r.net[2].bias)]
    Ops.names = []
    with Ops():
        k, m = kernels.fused_router(x, *w, t, "free")
    assert "_to_copy.default" not in Ops.names, Ops.names  # (the interpreter itself copies buffers: copy_)
    tol = 1e-5 if r_dtype == torch.float32 else 2e-3  # an fp16 router's own products round
    torch.testing.assert_close(m, m_ref, rtol=tol, atol=tol)
    assert torch.equal(k, k_ref)


def tilings_equal_torch(r: TokenRouter, x: torch.Tensor, policy: str, tilings) -> torch.Tensor:
    """At spread thresholds, every ``(hidden_per_program, cols_per_program)`` tiling gives PyTorch's counts, gate
    values to fp32 rounding; every count from 1 to 6 seen. Returns the last threshold (a device tensor)."""
    from mobiquant.kernels.triton_router import fused_router

    _, m_ref = torch_counts(r, x, 0.0)
    w = (r.net[0].weight, r.net[0].bias, r.net[2].weight, r.net[2].bias)
    seen = set()
    for tau in safe_taus(m_ref, 3):
        k_ref, _ = torch_counts(r, x, tau)
        t = torch.tensor(tau, device=DEVICE)
        for hb, cols in tilings:
            k, m = fused_router(x, *w, t, policy, hidden_per_program=hb, cols_per_program=cols)
            torch.testing.assert_close(m, m_ref, rtol=1e-5, atol=1e-5)
            assert torch.equal(k, k_ref), (hb, cols, tau, k.tolist(), k_ref.tolist())
            seen |= set(k.tolist())
    assert {1, 6} <= seen
    return t


@pytest.mark.parametrize("policy", ["free", "adjacent"])
@pytest.mark.parametrize(
    "d,hidden,tokens,hb,cols",
    [(100, 24, 5, 1, 16), (100, 24, 19, 8, 32), (64, 16, 1, 16, 16), (72, 12, 3, 4, 64)],
    ids=["d100-h24-t5-c16", "d100-h24-t19-hb8-c32", "d64-t1-hb16-c16", "d72-h12-t3-hb4-c64"],
)
def test_fused_router_column_splits_equal_torch(policy, d, hidden, tokens, hb, cols):
    """``cols_per_program``: every hidden block's columns split over programs (the last split short when ``d`` is
    not a multiple), the pre-activations summed by the last program: the same counts as PyTorch at every
    threshold, gate values to fp32 rounding, several token blocks and hidden blocks, hidden not a power of two."""
    from mobiquant.kernels.triton_router import fused_router

    r = make_router(d, (3, 1, 1, 1, 1, 1), hidden, policy)
    x = torch.randn(tokens, d, generator=torch.Generator().manual_seed(5)).to(DEVICE) * 2
    w = (r.net[0].weight, r.net[0].bias, r.net[2].weight, r.net[2].bias)
    t = tilings_equal_torch(r, x, policy, [(hb, cols)])
    for whole in (0, d, 4 * d):  # whole rows: the values of the default tiling, bit for bit
        a = fused_router(x, *w, t, policy, hidden_per_program=hb)
        b = fused_router(x, *w, t, policy, hidden_per_program=hb, cols_per_program=whole)
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


@pytest.mark.parametrize("policy", ["free", "adjacent"])
@pytest.mark.parametrize(
    "d,hidden,tokens", [(64, 16, 1), (300, 24, 5), (72, 12, 19)], ids=["d64-h16-t1", "d300-h24-t5", "d72-h12-t19"]
)
def test_fused_router_in_one_program_equals_torch(policy, d, hidden, tokens):
    """``hidden_per_program`` at least the router's hidden units over whole rows: one program a token block computes
    every score, with no partial sums and no ticket (chunks unrolled, the last one short, hidden not a power of
    two, several token blocks): PyTorch's counts at every threshold, gate values to fp32 rounding."""
    r = make_router(d, (3, 1, 1, 1, 1, 1), hidden, policy)
    x = torch.randn(tokens, d, generator=torch.Generator().manual_seed(6)).to(DEVICE) * 2
    tilings_equal_torch(r, x, policy, [(hidden, 0), (64, 0)])


def test_default_tiling_splits_wide_rows_and_equals_torch():
    """The default tiling splits rows wider than its column range (1024 for one token, 512 for more) and keeps
    narrower rows whole; a default launch on such rows gives PyTorch's counts and gate values."""
    from mobiquant.kernels.triton_router import IN_LAUNCH_TILING, default_tiling

    assert default_tiling(4096, 1)["cols_per_program"] == 1024 and default_tiling(4096, 8)["cols_per_program"] == 512
    assert default_tiling(576, 1) == IN_LAUNCH_TILING and default_tiling(576, 4)["cols_per_program"] == 512
    r = make_router(1100, (3, 1, 1, 1, 1, 1), 8, "free")
    x = torch.randn(3, 1100, generator=torch.Generator().manual_seed(9)).to(DEVICE)
    _, m_ref = torch_counts(r, x, 0.0)
    w = (r.net[0].weight, r.net[0].bias, r.net[2].weight, r.net[2].bias)
    for rows in (x[:1], x):
        tau = safe_taus(m_ref, 1)[1]
        k_ref, m_rows = torch_counts(r, rows, tau)
        k, m = kernels.fused_router(rows, *w, torch.tensor(tau, device=DEVICE), "free")
        torch.testing.assert_close(m, m_rows, rtol=1e-5, atol=1e-5)
        assert torch.equal(k, k_ref)


@pytest.mark.parametrize("policy", ["free", "adjacent"])
@pytest.mark.parametrize("d,hidden,tokens,cols", [(100, 24, 1, 32), (100, 24, 5, 16), (72, 12, 19, 64)],
                         ids=["d100-h24-t1-c32", "d100-h24-t5-c16", "d72-h12-t19-c64"])  # fmt: skip
def test_router_partials_finish_as_the_tail_does(policy, d, hidden, tokens, cols):
    """``router_partials``: the launch without its tail stores each column split's pre-activations; summed,
    finished by ``RouterPartials.values`` (b1, GELU, the second layer, the policy), they give the fused router's gate
    values to fp32 rounding and PyTorch's counts at every threshold; the normed rows equal fused_input_router's."""
    from mobiquant.kernels.triton_router import fused_input_router, fused_router, router_partials

    r = make_router(d, (3, 1, 1, 1, 1, 1), hidden, policy)
    x = torch.randn(tokens, d, generator=torch.Generator().manual_seed(11)).to(DEVICE) * 2
    w = (r.net[0].weight, r.net[0].bias, r.net[2].weight, r.net[2].bias)
    tiling = dict(hidden_per_program=4, cols_per_program=cols)
    none, p = router_partials(x, w, policy, **tiling)
    assert none is None and p.tokens == tokens and p.splits == -(-d // cols) > 1
    _, m_kernel = fused_router(x, *w, torch.zeros((), device=DEVICE), policy, **tiling)
    torch.testing.assert_close(p.values(), m_kernel, rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        torch.testing.assert_close(p.pre_activations(), r.net[0](x).float() - r.net[0].bias.float(), rtol=1e-4,
                                   atol=1e-4)  # fmt: skip
    for tau in safe_taus(m_kernel):
        k_ref, _ = torch_counts(r, x, tau)
        assert torch.equal(1 + (p.values() > tau).sum(-1), k_ref)
    norm = torch.rand(d, generator=torch.Generator().manual_seed(12)).to(DEVICE) + 0.5
    y, p2 = router_partials(x, w, policy, prologue=("rms_norm", norm, 1e-5), **tiling)
    y_ref, _, m_ref = fused_input_router(x, ("rms_norm", norm, 1e-5), w, torch.zeros((), device=DEVICE), policy,
                                         **tiling)  # fmt: skip
    assert y is not None and torch.equal(y, y_ref)
    torch.testing.assert_close(p2.values(), m_ref, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="column splits"):
        router_partials(x, w, policy, hidden_per_program=4, cols_per_program=0)


def test_fused_router_errors():
    r = make_router(32, (2, 2), 8, "free")
    x = torch.randn(2, 32).to(DEVICE)
    w = (r.net[0].weight, r.net[0].bias, r.net[2].weight, r.net[2].bias)
    with pytest.raises(ValueError, match="policy"):
        kernels.fused_router(x, *w, torch.zeros((), device=DEVICE), "nearest")
    with pytest.raises(ValueError, match="do not fit"):
        kernels.fused_router(x[:, :16], *w, torch.zeros((), device=DEVICE))
    with pytest.raises(ValueError, match="one-element"):
        kernels.fused_router(x, *w, torch.zeros(2, device=DEVICE))
    with pytest.raises(ValueError, match="cols_per_program=-1"):
        kernels.triton_router.fused_router(x, *w, torch.zeros((), device=DEVICE), cols_per_program=-1)


@pytest.mark.parametrize("d,tokens,dtype", [(72, 1, torch.float32), (200, 3, torch.float16)], ids=["d72", "d200-fp16"])
def test_fused_router_pdl_changes_no_arithmetic(d, tokens, dtype):
    """``pdl=True`` (programmatic dependent launch: the weights asked of L2, then the wait on the kernel before) and
    ``early_l2=True`` (the weights asked of L2 first, no wait) give the same counts, gate values and input rows bit
    for bit, router alone and with the RMS-norm prologue (in the interpreter the wait and the L2 requests are
    no-ops; what runs is the rest of the kernel)."""
    r = make_router(d, (3, 1, 1, 1, 1, 1), 24, "adjacent").to(dtype)
    x = torch.randn(tokens, d, generator=torch.Generator().manual_seed(7)).to(DEVICE, dtype)
    w = (r.net[0].weight, r.net[0].bias, r.net[2].weight, r.net[2].bias)
    tau = torch.tensor(0.9, device=DEVICE)
    modes = (dict(), dict(pdl=True), dict(early_l2=True))
    a, *others = (kernels.fused_router(x, *w, tau, "adjacent", **m) for m in modes)
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for b in others)
    norm = ("rms_norm", torch.rand(d, generator=torch.Generator().manual_seed(8)).to(DEVICE, dtype), 1e-5)
    a, *others = (kernels.fused_input_router(x, norm, w, tau, "free", **m) for m in modes)
    assert all(torch.equal(u, v) for b in others for u, v in zip(a, b, strict=True))


_OFFLINE_EARLY = """
import sys
sys.path.insert(0, sys.argv[1])
import offline_sass as osx
for early in (False, True):
    fn, grid, args, kw = osx.router_launch("rms_norm", (4, 4, 1024), 4096, False, early)
    ops = [m.group(3) for m in osx.LINE.finditer(osx.sass_and_resources(osx.compile_sm90(fn, args, kw))[0])]
    pf = [i for i, o in enumerate(ops) if o == "CCTL.E.PF2"]
    print("RESULT", early, len(pf), bool(pf) and pf[0] < next(i for i, o in enumerate(ops) if o.startswith("LDG")))
"""


def test_router_early_l2_asks_before_it_loads_offline():
    """Compiled for sm_90 without a GPU (the 8B router's launch with the RMS-norm prologue, the default tiling):
    with ``early_l2`` every program asks L2 for its weights (``prefetch.global.L2``, SASS ``CCTL.E.PF2``) before its
    first load; without it, no request."""
    import subprocess
    import sys
    from pathlib import Path

    import triton

    if not (Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump").exists():
        pytest.skip("this triton ships no cuobjdump")
    bench = str(Path(__file__).resolve().parents[2] / "benchmarks")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    r = subprocess.run([sys.executable, "-c", _OFFLINE_EARLY, bench], capture_output=True, text=True, env=env,
                       timeout=600)  # fmt: skip
    got = {ln.split()[1]: ln.split()[2:] for ln in r.stdout.splitlines() if ln.startswith("RESULT")}
    assert got.get("False") == ["0", "False"], r.stderr[-2000:]
    assert got["True"][1] == "True" and int(got["True"][0]) > 0


def test_set_small_config_launches_the_routers_with_pdl(monkeypatch):
    """``patching.set_small_config`` with ``pdl`` (or ``router_early_l2``) marks the linears' routers, which then
    launch their fused kernel with it (and without it again when the config drops it)."""
    from mobiquant.kernels.triton_bitplane import SmallConfig
    from mobiquant.patching import set_small_config

    m = MoBiLinear.from_linear(torch.nn.Linear(64, 24), group_size=32)
    m.freeze()
    r = make_router(64, m.slice_bits, 8, "free")
    m = m.to(DEVICE)
    m.attach_router(r)
    model = torch.nn.Sequential(m)
    seen = []
    real = kernels.fused_router
    spy = lambda *a, **kw: seen.append((kw["pdl"], kw["early_l2"])) or real(*a, **kw)  # noqa: E731
    monkeypatch.setattr(kernels, "fused_router", spy)
    r.backend = "triton"
    x = torch.randn(1, 64).to(DEVICE)
    cases = (
        (SmallConfig(pdl=True), (True, False)),
        (SmallConfig(router_early_l2=True), (False, True)),
        (SmallConfig(), (False, False)),
        (None, (False, False)),
        (SmallConfig(pdl="static"), (False, False)),
        (SmallConfig(pdl="views"), (False, False)),
    )  # "static": views known on the host only; "views": the linears' launches only
    for cfg, want in cases:
        set_small_config(model, cfg)
        assert (r.launch_pdl, r.launch_early_l2) == want
        r.clear_cache()
        r.slice_counts(x)
        assert seen[-1] == want


@pytest.mark.parametrize("policy", ["free", "adjacent"])
def test_router_and_linear_take_the_kernel(policy):
    """``TokenRouter.backend='triton'``: slice_counts and a linear's own threshold (a device tensor) give
    the PyTorch path's counts, and the routed packed linear its output."""
    torch.manual_seed(3)
    lin = torch.nn.Linear(96, 40)
    m = MoBiLinear.from_linear(lin, group_size=32)
    m.freeze()
    r = make_router(96, m.slice_bits, 16, policy, seed=4)
    m = m.to(DEVICE)
    m.attach_router(r)
    m.set_routed()
    m.backend = "torch"
    x = torch.randn(7, 96, generator=torch.Generator().manual_seed(5)).to(DEVICE)
    _, vals = torch_counts(r, x, 0.0)
    taus = safe_taus(vals, 3)
    with torch.no_grad():
        r.tau.fill_(taus[2])
        r.backend = "torch"
        r.clear_cache()
        k_ref, y_ref = r.slice_counts(x), m(x)
        r.backend = "triton"
        r.clear_cache()
        k, y = r.slice_counts(x), m(x)
        assert torch.equal(k, k_ref) and k.unique().numel() > 1
        torch.testing.assert_close(y, y_ref)
        m.route_tau = torch.tensor(taus[1], device=DEVICE)
        r.clear_cache()
        k_own = m._routed_k(x)
        r.backend = "torch"
        r.clear_cache()
        assert torch.equal(k_own, m._routed_k(x))


def test_backend_auto_routes_in_torch_on_cpu():
    r = make_router(32, (2, 2), 8, "free").cpu()
    x = torch.randn(3, 32)
    assert not kernels.use_fused_router(x, "auto")
    assert not kernels.use_fused_router(x, "torch")
    with pytest.raises(ValueError, match="backend"):
        kernels.use_fused_router(x, "gpu")
    r.tau.fill_(0.1)
    k_ref, _ = torch_counts(r, x, 0.1)
    assert torch.equal(r.slice_counts(x), k_ref)


# ------------------------------------------------------------------------------------------ GPU only
needs_cuda = pytest.mark.skipif(DEVICE != "cuda", reason="needs a CUDA device (and TRITON_INTERPRET unset)")


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("policy", ["free", "adjacent"])
def test_gpu_router_graph_serves_every_threshold(policy):
    """One CUDA graph of the fused router (8B-like width, 64 hidden) replayed at several thresholds written
    into the device tensor: the counts follow each threshold without re-capture."""
    r = make_router(4096, (2, 2, 2, 2), 64, policy).half()
    x = torch.randn(1, 4096, device="cuda", dtype=torch.float16)
    w = (r.net[0].weight, r.net[0].bias, r.net[2].weight, r.net[2].bias)
    tau = torch.zeros((), device="cuda")
    kernels.fused_router(x, *w, tau, policy)  # compile
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        k, m = kernels.fused_router(x, *w, tau, policy)
    for t in (float(m.min()) - 1, 0.0, float(m.max()) + 1) if policy == "free" else (7.0, 2.5, 0.0):
        tau.fill_(t)
        g.replay()
        torch.cuda.synchronize()
        assert int(k) == 1 + int((m > t).sum())
        vals = r.gate_values(r.scores(x)).float()
        torch.testing.assert_close(m, vals, rtol=2e-2, atol=2e-2)


def test_lean_attention_takes_pdl_with_a_static_o_launch():
    """The lean step's attention launch has programmatic dependent launch where the o projection's launch has it:
    always with ``pdl=True``; with ``pdl="static"`` only while the o projection decodes a static view (routed: its
    launch does not wait in the chain, so neither does the attention's)."""
    from mobiquant.kernels.triton_bitplane import SmallConfig
    from mobiquant.nn.lean import _o_launch_pdl

    m = MoBiLinear.from_linear(torch.nn.Linear(64, 24), group_size=32)
    m.freeze()
    for cfg, want in (
        (None, False),
        (SmallConfig(), False),
        (SmallConfig(pdl=True), True),
        (SmallConfig(pdl="static"), True),
    ):  # no router: a static view
        m.small_config = cfg
        assert _o_launch_pdl(m) is want, cfg
    m.attach_router(make_router(64, m.slice_bits, 8, "free"))
    m.set_routed()
    m.small_config = SmallConfig(pdl="static")
    assert _o_launch_pdl(m) is False
    m.set_static(2)
    assert _o_launch_pdl(m) is True
    m.set_routed()
    m.small_config = SmallConfig(pdl=True)
    assert _o_launch_pdl(m) is True


def test_lean_attention_follows_the_default_pdl_rule(monkeypatch):
    """``SmallConfig.pdl`` None (the default): the attention launch has programmatic dependent launch where the o
    projection decodes a static view of at most 4 planes, or a view read on the device with no router in its launch,
    on a card that has it; not at wider views, with the o projection's router in its launch, on a card without it, or
    before an fp16 o projection."""
    from mobiquant.kernels import triton_bitplane as tb
    from mobiquant.nn.lean import _o_launch_pdl

    m = MoBiLinear.from_linear(torch.nn.Linear(64, 24), group_size=32, slice_bits=(3, 1, 1, 1, 1, 1))
    m.freeze()
    m.attach_router(make_router(64, m.slice_bits, 8, "free"))
    gpu = torch.device("cuda", 0)
    monkeypatch.setattr(tb, "_pdl_capable", lambda device: device is not None and device.type == "cuda")
    for k, want in ((1, True), (2, True), (3, False), (6, False)):
        m.set_static(k)
        assert _o_launch_pdl(m, gpu) is want, k
        assert _o_launch_pdl(m, torch.device("cpu")) is False, k
    m.set_routed()
    assert _o_launch_pdl(m, gpu) is True and _o_launch_pdl(m, torch.device("cpu")) is False
    m.small_config = tb.SmallConfig(router_in_launch=True)  # its router's programs in its launch
    assert _o_launch_pdl(m, gpu) is False
    assert _o_launch_pdl(torch.nn.Linear(64, 24), gpu) is False

#!/usr/bin/env python
"""End-to-end decode throughput at batch 1: a stack of LLaMA-3-8B-shaped linears, routers included.

Each layer has the seven linears of a LLaMA-3-8B block (q, k, v, o: 4096x4096 / 4096->1024; gate, up:
4096->14336; down: 14336->4096) with random weights and a stand-in data flow (no attention, no norms):
``a = q(h); k(h); v(h); h2 = h + o(a); h = h2 + down(silu(gate(h2)) * up(h2))``. The quantized stack
stores MoBiSlice bit-planes (slices 2-2-2-2, groups of 128) and has one router per input site (q/k/v
share one, o, gate/up share one, down), a 2-layer MLP (4096 -> 64 -> 3) run by the package's fused
Triton router kernel (``mobiquant.kernels.triton_router``) that writes the token's slice count ``k`` on the
device; the bit-plane kernels read it there (no host
synchronisation). Budgets: static k = 1..4 (2/4/6/8 bits, no router) and routed budgets 2..8 bits, the
routers' thresholds set on calibration tokens so that the average bits match the budget.

Package rows (default; ``--no-package`` skips them): a ``LlamaForCausalLM`` with ``--layers`` blocks of the
same shapes (32 heads, 8 KV heads, vocabulary 1024), patched by ``mobiquant.quantize_model`` (slices 2-2-2-2,
g128, one router per site with 64 hidden units), router thresholds fitted on random tokens, packed, and
decoded by ``mobiquant.tasks.decode.generate`` (static KV cache, CUDA-graph decode step): fp16, static views and
routed budgets, us per decode step from the timed segment of a 64-token generation (capture excluded).
Attention, norms and RoPE are included, so these rows are slower than the stand-in stack's.

``--slices 3,1,1,1,1,1``: the layout of the quantized stack and of the package rows (default 2-2-2-2; the
library's default layout is 3-1-1-1-1-1): static views k = 1 .. len(slices) (``sum(slices[:k])`` bits) and
routed budgets from the base bits to all bits. ``--bits``: every static view and routed budget also with the
one-bit plane kernel (``SmallConfig(bitplanes=True)``, rows 'bitpl k=..' and 'routed bitpl'; package rows
'package bitpl ..'); ``--bits-sweep`` first times its configs (``STACK_SWEEP``) on the stack at views 1 and 2
and keeps the fastest, ``--bits-config`` names one. A comparison table (the library's default path beside the
one-bit plane kernel, each with its ratio to fp16 cuBLAS) closes the run. One command for an H200, about
4 minutes (kernel compilation included):

    PYTHONPATH=$PWD/src python3 benchmarks/decode_bench.py --slices 3,1,1,1,1,1 --bits-sweep --no-package

``--gemlite``: PyPI ``gemlite`` (if importable; otherwise the rows are skipped with a note) at 2, 4 and 8 bits,
group 128, on the same single-linear shapes (one token) and as the same stand-in stack; the ``x gemlite``
column compares our static view of the same bits (k = 1, 2, 4 of 2-2-2-2) with it. ``--dry-run``: no GPU needed; the
package rows on a tiny model on the CPU (eager), to check the code path and the arguments.

Timing: one CUDA graph holds ``STEPS`` decode steps (each a fresh random token through every layer); the
median graph replay (``triton.testing.do_bench``) over ``STEPS`` gives tokens/s; fp16 (cuBLAS) the same
way in the same run. Needs only torch and triton. Writes ``decode_bench.csv`` to ``$OUT`` when set.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import sys
import time

import torch
import torch.nn.functional as F
import triton

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import kernel_bench as kb  # noqa: E402
from kernel_bench import GROUP, bench, bits_tag, copy_bandwidth, load_kernels, view_bits  # noqa: E402

D, FF, KV = 4096, 14336, 1024
#: The tiny CPU model of the dry runs (``package_models`` keywords): the code path only, nothing measured
DRY_RUN_SHAPE = dict(layers=1, d=256, ff=512, kv=64, heads=4, vocab=64)
#: Where the stacks' layers and routers are made (the tests make small ones on the CPU, in Triton's interpreter).
DEVICE = "cuda"
HIDDEN = 64
STEPS = 8


# ------------------------------------------------------------------------------------- fused router
def load_router_kernel():
    """``mobiquant.kernels.triton_router.fused_router`` (the package's fused router kernel)."""
    load_kernels()  # puts src/ on the path
    from mobiquant.kernels.triton_router import fused_router

    return fused_router


class Router:
    def __init__(self, d, gen):
        self.w1 = (torch.randn(HIDDEN, d, generator=gen, device=DEVICE) / math.sqrt(d)).half()
        self.b1 = (torch.randn(HIDDEN, generator=gen, device=DEVICE) * 0.1).half()
        self.w2 = (torch.randn(len(kb.SLICE_BITS) - 1, HIDDEN, generator=gen, device=DEVICE) / 8).half()
        self.b2 = torch.zeros(len(kb.SLICE_BITS) - 1, device=DEVICE).half()
        self.tau = torch.zeros((), device=DEVICE)
        self.calib = []

    def scores(self, x):  # torch reference, [T, 3]
        h = F.gelu(x.float() @ self.w1.float().t() + self.b1.float())
        return h @ self.w2.float().t() + self.b2.float()

    fused = None  # the package's kernel, set in main()
    tiling: dict = {}  # the kernel's tiling (--router-tiling); empty: the package's default_tiling

    def __call__(self, x):
        # one hidden unit per program: 64 programs share the read of W1; k is written on the device; launched with
        # programmatic dependent launch where the layers' config asks for it (as set_small_config does in the package)
        from mobiquant.kernels.triton_bitplane import launch_pdl  # loaded by then (load_kernels)

        pdl = launch_pdl(QLinear.small_config, static=False, router=True)
        k, _ = Router.fused(x, self.w1, self.b1, self.w2, self.b2, self.tau, "free", pdl=pdl, **Router.tiling)
        return k

    def routed_k(self, tb):
        """This router as a ``RoutedK`` whose gate values the one-bit plane launch computes itself (the package's
        ``SmallConfig.router_in_launch``): no router launch of its own. One values buffer per router."""
        if getattr(self, "_inl", None) is None:
            buf = torch.empty(1, len(kb.SLICE_BITS) - 1, dtype=torch.float32, device=self.w1.device)
            self._inl = (buf, tb.InLaunchRouter(self.w1, self.b1, self.w2, self.b2, adjacent=False))
        return tb.RoutedK(self._inl[0], self.tau, self._inl[1])

    def set_budget(self, bits):
        """tau such that the calibration tokens' average bits (base + residual width x #active residuals; the mean
        residual width for layouts of unequal residuals) equal ``bits``."""
        s = torch.cat(self.calib)
        nested = torch.cummin(s, dim=-1).values.flatten().sort(descending=True).values
        res = kb.SLICE_BITS[1:]
        width = sum(res) / max(1, len(res))
        want = (bits - kb.SLICE_BITS[0]) / width * s.shape[0]  # number of active residual gates
        i = int(round(want))
        if i <= 0:
            self.tau.fill_(float(nested[0]) + 1.0)
        elif i >= nested.numel():
            self.tau.fill_(float(nested[-1]) - 1.0)
        else:
            self.tau.fill_(float(nested[i - 1] + nested[i]) / 2)


# ------------------------------------------------------------------------------------------ stacks
class QLinear:
    def __init__(self, n_out, n_in, tb, gen):
        self.tb = tb
        # random words are random codes (first code in the low bits of each int32 word)
        self.planes = [
            torch.randint(
                -(2**31),
                2**31 - 1,
                (n_out, math.ceil(n_in / (32 // b))),
                generator=gen,
                device=DEVICE,
                dtype=torch.int32,
            )
            for b in kb.SLICE_BITS
        ]
        ng = math.ceil(n_in / GROUP)
        # W spans the base grid's 2^b0 steps: std ~ 1 / sqrt(n_in) (b0 = 2: 1 / (1.12 sqrt(n_in)))
        b0 = kb.SLICE_BITS[0]
        self.scale = torch.full((n_out, ng), 1.0 / (math.sqrt((4**b0 - 1) / 12) * math.sqrt(n_in)), device=DEVICE)
        self.scale = self.scale.half()
        # zero (2^b0 - 1) / 2 (1.5 for a 2-bit base): every k-view of random codes has mean ~0 (with the
        # integer zero 2 of the recorded run every weight had mean -s/2, which drives the activations of this
        # norm-free stack up layer by layer; see NOTES.md)
        self.zero = torch.full((n_out, ng), (2**b0 - 1) / 2, device=DEVICE).half()
        if QLinear.view_steps:  # a step and zero point per view ([K, out, groups]; each view's a little different)
            K = len(kb.SLICE_BITS)
            jitter = 1 + 0.01 * torch.arange(K, device=DEVICE, dtype=torch.float32)[:, None, None]
            self.scale = (self.scale.float()[None] * jitter).half().contiguous()
            self.zero = self.zero[None].repeat(K, 1, 1).contiguous()
        self.n_in, self.n_out = n_in, n_out
        self.out = None
        self.packed = None

    # --fields: each one-token kernel forced in turn (the default picks by k); --bits: SmallConfig(bitplanes=True)
    small_config = None
    # --view-steps: every layer stores a step and zero point per view (MoBiConfig.view_steps)
    view_steps = False
    # --device-k: the views a k read on the device may be (with SmallConfig(span_bodies=True))
    span = None

    def bits(self):
        """The one-bit plane buffers, built once per layer."""
        if self.packed is None:
            self.packed = self.tb.pack_bitplanes(self.planes, self.scale, self.zero, kb.SLICE_BITS, GROUP, self.n_in)
        return self.packed

    def __call__(self, x, k):
        cfg = QLinear.small_config
        kw = {}
        if cfg is not None and cfg.bitplanes:
            kw["packed"] = self.bits()
        if QLinear.span is not None:
            kw["span"] = QLinear.span
        return self.tb.bitplane_linear(
            x, self.planes, self.scale, self.zero, kb.SLICE_BITS, GROUP, k, small_config=cfg, **kw
        )


def layer_shapes():
    return dict(q=(D, D), k=(KV, D), v=(KV, D), o=(D, D), gate=(FF, D), up=(FF, D), down=(D, FF))


def fp16_step(layers, h):
    for L in layers:
        a = F.linear(h, L["q"])
        F.linear(h, L["k"])
        F.linear(h, L["v"])
        h2 = h + F.linear(a, L["o"])
        h = h2 + F.linear(F.silu(F.linear(h2, L["gate"])) * F.linear(h2, L["up"]), L["down"])
    return h


def q_step(layers, h, static_k=None, collect=False, run_routers=False):
    """One token through the quantized stack: each site's ``k`` from its router, or ``static_k`` (an int: known on
    the host; a device tensor: read by the kernels), with ``run_routers`` the routers launched all the same and
    their ``k`` dropped (what the routers cost inside the stack)."""
    for L in layers:

        def route(name, x):
            if static_k is not None:
                if run_routers:
                    L["r_" + name](x)
                return static_k
            if collect:
                L["r_" + name].calib.append(L["r_" + name].scores(x))
                return len(kb.SLICE_BITS)
            return L["r_" + name](x)

        kq = route("qkv", h)
        a = L["q"](h, kq)
        L["k"](h, kq)
        L["v"](h, kq)
        h2 = h + L["o"](a, route("o", a))
        kg = route("gu", h2)
        m = F.silu(L["gate"](h2, kg)) * L["up"](h2, kg)
        h = h2 + L["down"](m, route("down", m))
    return h


SITES = (("s_qkv", ("q", "k", "v")), ("s_gu", ("gate", "up")))


def fp16_sites(layers):
    """Each layer's q/k/v and gate/up weights concatenated: one cuBLAS GEMV a site."""
    for L in layers:
        for site, names in SITES:
            L[site] = torch.cat([L[n] for n in names])


def fp16_step_sites(layers, h):
    """fp16 as fused as cuBLAS allows: one GEMV a site (q/k/v; gate/up), the residual adds in cuBLAS's epilogue
    (``addmm``, beta 1); the gated product its own kernel."""
    for L in layers:
        a = F.linear(h, L["s_qkv"])[:, :D]
        h2 = torch.addmm(h, a, L["o"].t())
        gu = F.linear(h2, L["s_gu"])
        h = torch.addmm(h2, F.silu(gu[:, :FF]) * gu[:, FF:], L["down"].t())
    return h


def q_sites(tb, layers):
    """Each quantized layer's q/k/v and gate/up one-bit plane buffers side by side (the package's site launches)."""
    for L in layers:
        for site, names in SITES:
            L[site] = tb.site_bitplanes([L[n].bits() for n in names])


def view_buffers(tb, bp, k, x, cfg):
    """The two largest buffers the launch of static view ``k`` of one-bit plane buffers ``bp`` reads: its planes'
    words and its step/zero words (the fragment kernel's pack where that kernel serves the launch: its words and the
    view's steps; its zero points, 1/4 of the steps' bytes, are left out)."""
    p = tb.planes_of_views(bp.slice_bits)[k - 1]
    if tb.fragment_serves(cfg, bp, k, x):  # the package's own choice of kernel for this launch
        from mobiquant.kernels.gluon_fragment import fragment_of

        fp = fragment_of(bp)
        return fp.words[:p], fp.scale[p - 1]
    return bp.words[:p], (bp.sz[k - 1] if bp.per_view else bp.sz)


#: --sites-prefetch plans: which later launch's weights L2 is asked for, and before which launch.
PREFETCH_PLANS = {
    "o": "before the q/k/v site, the o launch's",
    "o+qkv": "before the q/k/v site, the o launch's; before down, the next layer's q/k/v site's",
    "self": "before the q/k/v site, its own words and the o launch's words (one launch for both)",
}


def q_step_sites(tb, layers, h, static_k=None, in_launch=False, prefetch=None, sublayer=False):
    """One token through the quantized stack as the package's decode path launches it: one launch a site (q/k/v;
    gate/up: ``bitplane_site_bits``), the residual adds in the o and down launches' epilogue (the residual is the
    launch's bias at one token); each site's ``k`` from its router (``in_launch``: the router run by the site's own
    launch), or ``static_k`` (an int). ``prefetch``: ``(mode, plan)``, a static view's later weights asked of L2 by
    ``mobiquant.kernels.l2_prefetch.prefetch_l2`` (mode 'line' or 'bulk') as ``PREFETCH_PLANS[plan]`` says.
    ``sublayer``: router placement 'sublayer' (``MoBiConfig.router_placement``): o takes the q/k/v router's ``k`` and
    down the gate/up router's, two router launches a layer instead of four."""
    cfg = QLinear.small_config
    if prefetch is not None:
        from mobiquant.kernels.l2_prefetch import prefetch_l2

        if static_k is None:
            raise ValueError("the prefetch plans ask for a static view's buffers")

        def ask(bp, x):
            prefetch_l2(*view_buffers(tb, bp, static_k, x, cfg), mode=prefetch[0])

    for i, L in enumerate(layers):
        if prefetch is not None and prefetch[1] == "self":
            words = (view_buffers(tb, bp, static_k, h, cfg)[0] for bp in (L["s_qkv"].planes, L["o"].bits()))
            prefetch_l2(*words, mode=prefetch[0])
        elif prefetch is not None:
            ask(L["o"].bits(), h)

        def route(name, x):
            if static_k is not None:
                return static_k
            return L["r_" + name].routed_k(tb) if in_launch else L["r_" + name](x)

        kq = route("qkv", h)
        a = tb.bitplane_site_bits(h, L["s_qkv"], [kq] * 3, config=cfg)[:, :D]
        ko = kq if sublayer else route("o", a)
        h2 = tb.bitplane_linear_bits(a, L["o"].bits(), ko, bias=h.reshape(-1), config=cfg)
        kg = route("gu", h2)
        gu = tb.bitplane_site_bits(h2, L["s_gu"], [kg] * 2, config=cfg)
        m = F.silu(gu[:, :FF]) * gu[:, FF:]
        if prefetch is not None and prefetch[1] == "o+qkv":
            ask(layers[(i + 1) % len(layers)]["s_qkv"].planes, h2)
        kd = kg if sublayer else route("down", m)
        h = tb.bitplane_linear_bits(m, L["down"].bits(), kd, bias=h2.reshape(-1), config=cfg)
    return h


def graph_of(step_fn, xs):
    """A CUDA graph of ``len(xs)`` decode steps, one fresh token each."""
    step_fn(xs[0])  # compile / warm up
    torch.cuda.synchronize()
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for x in xs:
            step_fn(x)
    torch.cuda.current_stream().wait_stream(s)
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for x in xs:
            step_fn(x)
    return g


# ------------------------------------------------------------------------------------- package rows
#: The router placements of the package rows (``MoBiConfig.router_placement``'s, named here: the benchmarks parse
#: their arguments before the package is imported).
PLACEMENTS = ("site", "linear", "sublayer", "attention", "block")


def package_models(layers, d, ff, kv, heads, vocab, device, dtype, seed=0, policy="free", placement="site"):
    """``(fp, quantized)``: a random LLaMA of these shapes, and a copy patched, calibrated and packed by the
    package (router ``policy`` and ``placement``: ``MoBiConfig.router_policy`` / ``router_placement``)."""
    import copy

    from transformers import LlamaConfig, LlamaForCausalLM

    load_kernels()  # puts src/ on the path
    import mobiquant as mq

    cfg = LlamaConfig(
        vocab_size=vocab,
        hidden_size=d,
        intermediate_size=ff,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=heads * kv // d,
        max_position_embeddings=4096,
    )
    torch.manual_seed(seed)
    with torch.device(device):
        fp = LlamaForCausalLM(cfg).to(dtype).eval()
    fp.requires_grad_(False)
    q = copy.deepcopy(fp)
    routing = dict(router_hidden=HIDDEN, router_policy=policy, router_placement=placement)
    mcfg = mq.MoBiConfig(slice_bits=kb.SLICE_BITS, group_size=GROUP, **routing)
    mq.quantize_model(q, mcfg)
    calib = [torch.randint(0, vocab, (4, 64), device=device, generator=torch.Generator(device).manual_seed(seed + 1))]
    mq.calibrate_thresholds(q, calib)
    mq.freeze(q)
    return fp, q


def linear_bytes(model, bits_per_weight):
    """Bytes a decode step must read: every block linear at ``bits_per_weight`` (plus fp16 step and zero per
    group of 128 when quantized) and the fp16 LM head."""
    total = 0.0
    for name, mod in model.named_modules():
        if name.endswith("lm_head"):
            total += mod.weight.numel() * 2
        elif hasattr(mod, "in_features") and ".layers." in name:
            n = mod.in_features * mod.out_features
            total += n * bits_per_weight / 8
            if bits_per_weight < 16:
                total += mod.out_features * math.ceil(mod.in_features / GROUP) * 4
    return total


def timed_generate(model, prompt, new_tokens, graph, budget=None):
    """``(Generation, step split)``: a warm-up generation of ``min(8, new_tokens)`` (captures, compiles), then the timed
    one of ``new_tokens`` with ``cuda_graph=graph``, each replayed step split into GPU time and gap
    (``step_timing``)."""
    from mobiquant.tasks.decode import generate
    from step_timing import step_events

    generate(model, prompt, min(8, new_tokens), budget=budget, cuda_graph=graph)
    with step_events() as ev:
        g = generate(model, prompt, new_tokens, budget=budget, cuda_graph=graph)
    return g, ev.summary()


def parse_shard(text: str) -> tuple[int, int]:
    """``"I/N"`` -> ``(I, N)``, shard ``I`` (0-based) of ``N``; a clear error otherwise."""
    try:
        i, n = (int(v) for v in text.split("/"))
    except ValueError:
        raise ValueError(f"--warm-shard {text!r}: expected I/N, e.g. 0/4") from None
    if not 0 <= i < n:
        raise ValueError(f"--warm-shard {text!r}: I must be in 0..N-1")
    return i, n


def package_rows(
    fp, q, device, new_tokens, graph, copy_bw, kernels=(("package", None),), budgets=None, warm=None, rounds=1,
    prompt_tokens=16, views=None,
):  # fmt: skip
    """fp16, then for each ``(label, small_config)`` of ``kernels`` (``None``: the library's defaults; ``"sites"``:
    one launch per router site; ``"inputs"``: that and fused inputs, ``patching.fuse_inputs``, with an fp16 row
    of the same fused kernels; a pair ``(mode, small_config)``: that fusion with that config, routed budgets only;
    a triple ``(mode, small_config, True)``: the static views too; modes ``"lean attention"`` / ``"lean step"`` /
    ``"lean prologues"`` (with the norms and gated products made in the launches they feed, no fp16 row of its own):
    fused inputs and ``patching.lean_step`` without / with its residual adds, each with an fp16 row of the same)
    the static views and the routed ``budgets`` (default: base bits .. all bits) through
    ``mobiquant.tasks.decode.generate``. ``warm = (i, n)``: nothing timed, no row returned; the entries ``j`` of
    ``kernels`` with ``j % n == i`` (and fp16 in shard 0) each decode a few tokens in every row's mode, so that their
    kernels are compiled into the on-disk caches (Triton's, Inductor's) that the timing run then finds. ``rounds``:
    every quantized row timed that many times, the configs in turn each round (so a difference of a few percent
    between two configs is not one of when each ran), each row's fastest kept; every round's line is printed.
    ``prompt_tokens``: the prompt's length (the cache holds it and the new tokens); ``views``: the static views
    timed (None: every one)."""
    import mobiquant as mq
    from mobiquant.patching import fuse_inputs, fuse_sites, lean_step, set_small_config
    from mobiquant.tasks.decode import generate

    vocab = fp.config.vocab_size
    prompt = torch.randint(0, vocab, (1, prompt_tokens), generator=torch.Generator().manual_seed(7)).to(device)
    rows, splits = [], []

    def timed(model, budget=None):
        if warm is not None:  # compile and capture only
            generate(model, prompt, min(4, new_tokens), budget=budget, cuda_graph=graph)
            print(f"# warmed: budget {budget}", flush=True)
            splits.append(dict(gpu_us=math.nan, gap_us=math.nan))
            return math.nan, "warm"
        g, split = timed_generate(model, prompt, new_tokens, graph, budget)
        splits.append(split)
        return g.us_per_token, f"{g.graph}; GPU {split['gpu_us']:.1f} us a step, gaps {split['gap_us']:.1f} us"

    def attempt(model, budget=None):
        """:func:`timed`, or ``(None, why)`` printed when the quantized model fails in a graph mode other than
        'graph' (the row is left out, the others run)."""
        if graph == "graph":
            return timed(model, budget)
        try:
            return timed(model, budget)
        except Exception as e:
            why = f"{type(e).__name__}: {str(e).strip().splitlines()[0][:200] if str(e).strip() else ''}"
            print(f"# package row (budget {budget}) left out with cuda_graph={graph!r}: {why}")
            return None, why

    if warm is not None:
        kernels = [kc for j, kc in enumerate(kernels) if j % warm[1] == warm[0]]
    if warm is None or warm[0] == 0:
        t16, how = timed(fp)
    else:
        t16, how = math.nan, "warm"
        splits.append(dict(gpu_us=math.nan, gap_us=math.nan))

    def row(mode, budget, bits, t, how, model=q):
        """One table row: ``t`` us/token at ``bits`` average bits, against fp16's ``t16``."""
        pct = 100 * linear_bytes(model, bits) / (t * 1e-6) / copy_bw if copy_bw else math.nan
        return dict(
            mode=mode,
            budget=budget,
            achieved_bits=bits,
            us_per_token=t,
            tok_s=1e6 / t,
            speedup=t16 / t,
            pct_copy=pct,
            gpu_us=splits[-1]["gpu_us"],
            gap_us=splits[-1]["gap_us"],
            graph=how,
        )

    def say(text):
        """A row's line, printed when timed (a warm shard times nothing: its rows would read nan)."""
        if warm is None:
            print(text)

    rows.append(row("package fp16", 16.0, 16.0, t16, how, model=fp))
    fp16_here = warm is None or warm[0] == 0  # a warm shard other than the first leaves fp16 out
    if fp16_here:
        say(f"package fp16: {t16:.1f} us/token (graph: {how})")

    def kind(cfg):
        """``(fusion mode or None, SmallConfig or None)`` of a ``kernels`` entry."""
        if isinstance(cfg, tuple):
            return cfg[:2]
        return (cfg, None) if isinstance(cfg, str) else (None, cfg)

    if fp16_here and any(kind(cfg)[0] == "inputs" for _, cfg in kernels):  # fp16, the same fused norms and products
        fuse_inputs(fp)
        t, how = timed(fp)
        fuse_inputs(fp, enable=False)
        rows.append(row("package fp16 [fused inputs]", 16.0, 16.0, t, how, model=fp))
        say(f"package fp16 [fused inputs]: {t:.1f} us/token  x{t16 / t:.2f} (graph: {how})")
    for lean, adds in (("lean attention", False), ("lean step", True)):  # fp16 with the same launches
        if fp16_here and any(kind(cfg)[0] == lean for _, cfg in kernels):
            lean_step(fp, adds=adds)
            t, how = timed(fp)
            lean_step(fp, enable=False)
            rows.append(row(f"package fp16 [{lean}]", 16.0, 16.0, t, how, model=fp))
            say(f"package fp16 [{lean}]: {t:.1f} us/token  x{t16 / t:.2f} (graph: {how})")
    ns = len(kb.SLICE_BITS)
    rounds = 1 if warm is not None else rounds
    best: dict[tuple, dict] = {}  # (mode, budget) -> the fastest of the rounds' rows, in first-timed order

    def keep(r: dict) -> None:
        key = (r["mode"], r["budget"])
        if key not in best or r["us_per_token"] < best[key]["us_per_token"]:
            best[key] = r

    for rnd, (label, cfg) in ((r, kc) for r in range(rounds) for kc in kernels):
        mark = f"[round {rnd + 1}/{rounds}] " if rounds > 1 else ""
        mode, small = kind(cfg)
        in_launch = getattr(small, "router_in_launch", False)  # the router in the site's launch: sites on
        lean = mode in ("lean attention", "lean step", "lean prologues")
        sites = mode in ("sites", "inputs") or lean or in_launch
        set_small_config(q, small)
        fuse_sites(q, enable=sites)
        fuse_inputs(q, enable=mode == "inputs" or lean)
        lean_step(q, enable=lean, adds=mode != "lean attention", prologues=mode == "lean prologues")
        if warm is not None:
            print(f"# warming: {label}", flush=True)
        # a (mode, config) entry: its routed budgets only (a config for views learnt on the device)
        static = not isinstance(cfg, tuple) or cfg[2:] == (True,)
        for k in (k for k in range(1, ns + 1) if views is None or k in views) if static else ():
            mq.set_static(q, k)
            t, how = attempt(q)
            if t is None:
                continue
            bits = float(view_bits(k))
            keep(row(f"{label} static k={k}", bits, bits, t, how))
            say(f"{mark}{label} static k={k}: {t:.1f} us/token  x{t16 / t:.2f} (graph: {how})")
        for budget in budgets or range(kb.SLICE_BITS[0], sum(kb.SLICE_BITS) + 1):
            # achieved bits of the decode tokens, counted eagerly (counting synchronises every step)
            g = generate(q, prompt, min(16, new_tokens), budget=float(budget), cuda_graph="off", track_bits=True)
            steps = g.achieved_bits[1:] or g.achieved_bits
            bits = sum(steps) / len(steps)
            t, how = attempt(q, float(budget))
            if t is None:
                continue
            keep(row(f"{label} routed", float(budget), bits, t, how))
            say(
                f"{mark}{label} routed budget {budget:g}: achieved {bits:.2f} bits, {t:.1f} us/token  x{t16 / t:.2f} "
                f"(graph: {how})"
            )
    rows.extend(best.values())
    if rounds > 1:
        say(f"# {rounds} rounds: each quantized row below the fastest of its rounds (fp16 timed once)")
    set_small_config(q, None)
    fuse_sites(q, enable=False)
    fuse_inputs(q, enable=False)
    lean_step(q, enable=False)
    return rows if warm is None else []


# ------------------------------------------------------------------------------------------ gemlite
GEMLITE_BITS = (2, 4, 8)


def gemlite_module():
    """``(GemLiteLinear class, DType)`` of the installed gemlite, or ``None`` and why not."""
    try:
        from gemlite.core import DType

        try:
            from gemlite.core import GemLiteLinearTriton as cls
        except ImportError:
            from gemlite.core import GemLiteLinear as cls
        return (cls, DType), ""
    except Exception as e:  # not installed, or an incompatible build
        return None, f"{type(e).__name__}: {e}"


class GemliteLinear:
    """A gemlite layer of random ``bits``-bit codes, group ``GROUP`` (HQQ layout: codes [out, in] uint8,
    one fp16 scale and zero point per group)."""

    def __init__(self, api, n_out, n_in, bits, gen):
        cls, dtype = api
        w_q = torch.randint(0, 2**bits, (n_out, n_in), generator=gen, device="cuda", dtype=torch.uint8)
        ng = n_in // GROUP
        scales = (torch.rand(n_out, ng, generator=gen, device="cuda") * 0.01 + 0.001).half()
        zeros = torch.full((n_out, ng), (2**bits - 1) / 2, device="cuda").half()
        self.layer = cls(
            bits,
            group_size=GROUP,
            in_features=n_in,
            out_features=n_out,
            input_dtype=dtype.FP16,
            output_dtype=dtype.FP16,
        )
        self.layer.pack(w_q, scales, zeros, None)

    def __call__(self, x):
        return self.layer(x)


def gemlite_step(layers, h):
    for L in layers:
        a = L["q"](h)
        L["k"](h)
        L["v"](h)
        h2 = h + L["o"](a)
        h = h2 + L["down"](F.silu(L["gate"](h2)) * L["up"](h2))
    return h


def gemlite_rows(api, n_layers, xs, t16, copy_bw):
    """Single linears (one token) and the stand-in stack, at 2, 4 and 8 bits."""
    rows = []
    gen = torch.Generator(device="cuda").manual_seed(3)
    shapes = layer_shapes()
    for bits in GEMLITE_BITS:
        layers = [{n: GemliteLinear(api, o, i, bits, gen) for n, (o, i) in shapes.items()} for _ in range(n_layers)]
        for name in ("q", "gate", "down", "k"):
            o, i = shapes[name]
            x = torch.randn(1, i, device="cuda").half()
            g = graph_of(lambda _: layers[0][name](x), [x] * STEPS)
            t = bench(g.replay, warmup=20, rep=200) / STEPS
            nb = o * i * bits / 8 + o * (i // GROUP) * 4
            rows.append(
                dict(
                    mode=f"gemlite {name} {o}x{i}",
                    budget=float(bits),
                    achieved_bits=float(bits),
                    us_per_token=t,
                    tok_s=1e6 / t,
                    speedup=float("nan"),
                    pct_copy=100 * nb / (t * 1e-6) / copy_bw,
                )
            )
            del g
        g = graph_of(lambda x: gemlite_step(layers, x), xs)
        t = bench(g.replay, warmup=20, rep=200) / STEPS
        nb = sum(o * i * bits / 8 + o * (i // GROUP) * 4 for o, i in shapes.values()) * n_layers
        rows.append(
            dict(
                mode=f"gemlite {bits}-bit",
                budget=float(bits),
                achieved_bits=float(bits),
                us_per_token=t,
                tok_s=1e6 / t,
                speedup=t16 / t,
                pct_copy=100 * nb / (t * 1e-6) / copy_bw,
            )
        )
        del g
        print(f"gemlite {bits}-bit stack: {t:.1f} us/token  x{t16 / t:.2f}")
    return rows


def our_linear_rows(tb, xs_unused, copy_bw, cfg=None, label="static"):
    """Our static views of gemlite's bits (2, 4, 8; those the layout has) on the same single linears as the
    gemlite rows, one token, with the launch config ``cfg`` (None: the library's defaults)."""
    rows = []
    gen = torch.Generator(device="cuda").manual_seed(4)
    shapes = layer_shapes()
    views = {view_bits(k): k for k in range(len(kb.SLICE_BITS), 0, -1)}
    for bits in GEMLITE_BITS:
        k = views.get(bits)
        if k is None:
            continue
        for name in ("q", "gate", "down", "k"):
            o, i = shapes[name]
            L = QLinear(o, i, tb, gen)
            x = torch.randn(1, i, device="cuda").half()
            QLinear.small_config = cfg
            try:
                g = graph_of(lambda _: L(x, k), [x] * STEPS)
                t = bench(g.replay, warmup=20, rep=200) / STEPS
            finally:
                QLinear.small_config = None
            nb = o * i * bits / 8 + o * math.ceil(i / GROUP) * 4
            rows.append(
                dict(
                    mode=f"{label} k={k} {name} {o}x{i}",
                    budget=float(bits),
                    achieved_bits=float(bits),
                    us_per_token=t,
                    tok_s=1e6 / t,
                    speedup=float("nan"),
                    pct_copy=100 * nb / (t * 1e-6) / copy_bw,
                )
            )
            del g
    return rows


def x_gemlite(rows):
    """Each of our static rows against gemlite's row of the same bits and shape (stack or single linear)."""

    def key(mode, budget):
        parts = mode.split(" ", 2)
        if parts[0] == "gemlite":
            what = "stack" if mode.endswith("-bit") else mode.split(" ", 1)[1]
        elif parts[0] in ("static", "bitpl") and parts[1].startswith("k="):
            what = parts[2] if len(parts) == 3 else "stack"
        else:
            return None
        return what, budget

    ref = {key(r["mode"], r["budget"]): r["us_per_token"] for r in rows if r["mode"].startswith("gemlite ")}
    for r in rows:
        k = key(r["mode"], r["budget"])
        r["x_gemlite"] = (
            ref[k] / r["us_per_token"] if not r["mode"].startswith("gemlite ") and k in ref else float("nan")
        )


def print_table(rows, title):
    print()
    print(title)
    print(
        f"{'mode':34s} {'budget':>6s} {'bits':>5s} {'us/token':>9s} {'tok/s':>8s} {'x fp16':>6s} {'%copy':>6s} "
        f"{'x gemlite':>9s} {'GPU us':>7s} {'gap us':>7s}"
    )
    nan = float("nan")
    for r_ in rows:
        print(
            f"{r_['mode']:34s} {r_['budget']:6.1f} {r_['achieved_bits']:5.2f} {r_['us_per_token']:9.1f} "
            f"{r_['tok_s']:8.0f} {r_['speedup']:6.2f} {r_['pct_copy']:6.1f} {r_.get('x_gemlite', nan):9.2f} "
            f"{r_.get('gpu_us', nan):7.1f} {r_.get('gap_us', nan):7.1f}"
        )


def package_routers(args) -> dict:
    """The package model's router settings from ``--package-policy`` and ``--package-placement``."""
    return dict(policy=args.package_policy, placement=args.package_placement)


def package_budgets(args) -> list[float] | None:
    """``--package-budgets`` as numbers (None: every integer budget)."""
    return [float(b) for b in args.package_budgets.split(",")] if args.package_budgets else None


def package_kernels(args, bits_cfg=None) -> list:
    """The package rows' ``(label, kernels)`` entries (:func:`package_rows`) the options ask for."""
    from mobiquant.kernels.triton_bitplane import SmallConfig

    kernels = [] if args.package_fused_only else [("package", None)]
    kernels += [("package bitpl", bits_cfg)] if bits_cfg is not None else []
    if args.fuse_sites:  # the library's default kernels with one launch per router site
        kernels.append(("package sites", "sites"))
    if args.fuse_inputs:  # ... and each norm and MLP product one launch with its site's router
        kernels.append(("package sites+inputs", "inputs"))
    if args.router_in_launch:  # ... and each router inside its site's launch
        kernels.append(("package sites+router", SmallConfig(router_in_launch=True)))
    if args.package_span:  # ... fused inputs, the two views of a pair alone, the large launches' on the fragment
        # kernel (the stack's 'device k span frag' rows, 2026-12-06: 3-7 bits 3-10% faster than 'device k')
        span_cfg = SmallConfig(span_bodies=True, fragment_device_from=1 << 25)
        kernels.append(("package sites+inputs span", ("inputs", span_cfg)))
    if args.package_span_rules:  # ... fused inputs, the span rules before the default of 2026-12-06 (later)
        # the rule of 2026-12-06: spans of 3-4 and 4-5 planes in the launches from 2^25 weights, no site launch
        before = dict(fragment_site_spans=False, fragment_span_planes=5, fragment_span_from=1 << 25)
        kernels.append(("package sites+inputs span rule before", ("inputs", SmallConfig(**before))))
        # every launch's spans of 3-4 and 4-5 planes, site launches too; 5-6 on the one-bit plane kernel
        kernels.append(("package sites+inputs spans to 5 planes", ("inputs", SmallConfig(fragment_span_planes=5))))
    if args.package_span_uncap:  # ... fused inputs, the large launches' spans of 4-5 and 5-6 planes uncapped
        kernels.append(("package sites+inputs span uncap", ("inputs", SmallConfig(fragment_span_uncap=5))))
    if args.package_early_l2:  # ... fused inputs, no group of a span's common planes asked of L2 before k (the
        # default asks for one since 2026-12-06, fourth run), then two groups, then two with pdl: the requests then go
        # out while the norm and router launch before runs (routed views only: pdl lost on the static views inside
        # the package)
        kernels.append(("package sites+inputs no early l2", ("inputs", SmallConfig(fragment_early_l2=0))))
        kernels.append(("package sites+inputs early l2 2", ("inputs", SmallConfig(fragment_early_l2=2))))
        cfg = SmallConfig(fragment_early_l2=2, pdl=True)
        kernels.append(("package sites+inputs early l2 pdl", ("inputs", cfg)))
    if args.package_fragment_loads:  # ... fused inputs, how the fragment kernel's programs keep bytes in flight: the
        # static views of 5-6 planes of the small launches (q/k/v, o) on it too (fragment=True: every launch it
        # serves), L2 asked for the group 2 or 4 ahead at each group, no group prefetched into registers, and both
        loads = (("frag everywhere", dict(fragment=True)), ("ahead 2", dict(fragment_ahead=2)),
                 ("ahead 4", dict(fragment_ahead=4)), ("prefetch 0", dict(fragment_prefetch=0)),
                 ("prefetch 0 ahead 2", dict(fragment_prefetch=0, fragment_ahead=2)))  # fmt: skip
        for name, kw in loads:
            kernels.append((f"package sites+inputs {name}", ("inputs", SmallConfig(**kw), True)))  # static too
    if args.package_router_l2:  # ... fused inputs, the routers' launches asking L2 for their weights first
        kernels.append(("package sites+inputs router early l2", ("inputs", SmallConfig(router_early_l2=True))))
    if args.package_router_partials:  # ... fused inputs, each router launch without its tail, finished by the GEMVs
        kernels.append(("package sites+inputs router partials", ("inputs", SmallConfig(router_partials=True))))
    if args.package_lean_step:  # ... fused inputs, each layer's rotary, cache write and attention one launch, then
        # also the residual adds in the o and down launches (static views too)
        kernels.append(("package sites+inputs lean attention", ("lean attention", None, True)))
        kernels.append(("package sites+inputs lean step", ("lean step", None, True)))
    if args.package_lean_prologues:  # ... and the norms and gated products in the launches they feed
        kernels.append(("package sites+inputs lean prologues", ("lean prologues", None, True)))
    if args.package_epilogues:  # ... and the post-attention norm made by the o launch, the product by gate/up
        cfg = SmallConfig(fragment_epilogues=True)
        kernels.append(("package sites+inputs lean epilogues", ("lean prologues", cfg, True)))
    if args.package_chain:  # ... the lean step with its prologues, the gated product chained from gate/up into
        # down (SmallConfig(fragment_chain=True): down's programs await their own groups' flags; NOTES 60)
        for chain in (True, "silu_mul", "rms_norm"):
            name = "chain" if chain is True else f"chain {chain}"
            kernels.append(
                (f"package sites+inputs lean {name}", ("lean prologues", SmallConfig(fragment_chain=chain), True))
            )
    if args.package_epilogue_kinds:  # ... each kind of epilogue alone at every static view (NOTES 41 (b))
        for kind in ("rms_norm", "silu_mul"):
            cfg = SmallConfig(fragment_epilogues=kind)
            kernels.append((f"package sites+inputs lean epilogues {kind}", ("lean prologues", cfg, True)))
    if args.package_pdl_static:  # ... the lean step with programmatic dependent launch for static views' launches
        # only (SmallConfig(pdl="static"): router launches and views on the device without it), and without any (the
        # default since 2026-12-07 gives it to static views of at most 4 planes)
        static_pdl = SmallConfig(pdl="static")
        if args.package_lean_step:
            kernels.append(("package sites+inputs lean step pdl static", ("lean step", static_pdl, True)))
        if args.package_lean_prologues:
            kernels.append(("package sites+inputs lean prologues pdl static", ("lean prologues", static_pdl, True)))
            cfg = SmallConfig(pdl=False)
            kernels.append(("package sites+inputs lean prologues pdl off", ("lean prologues", cfg, True)))
    if args.package_routed_epilogues:  # ... the lean step with its prologues without the routed budgets' savings
        # of the default (since 2026-12-07; NOTES 45, 49): the views read on the device making the next launch's
        # input (fragment_routed_epilogues: the o launch the post-attention norm's parts where gate/up borrow their
        # decisions, gate/up the product) and their launches under pdl, each apart and both; then with pdl on every
        # launch (the routers' too). pdl="static" leaves the device views' launches without it, and gives it to the
        # static views of 5-8 planes as well: read those rows' routed budgets only
        off = (("routed epilogues off", dict(fragment_routed_epilogues=False)), ("routed pdl off", dict(pdl="static")),
               ("routed savings off", dict(fragment_routed_epilogues=False, pdl="static")))  # fmt: skip
        if args.package_pdl:
            off += (("pdl", dict(pdl=True)),)
        for name, kw in off:
            kernels.append((f"package sites+inputs lean {name}", ("lean prologues", SmallConfig(**kw), True)))
    if args.package_pdl_views:  # ... the lean step with its prologues, pdl for every linear's launch, no router's
        kernels.append(
            ("package sites+inputs lean prologues pdl views", ("lean prologues", SmallConfig(pdl="views"), True))
        )
    if args.package_router_tail:  # ... the lean step with its prologues, each block's router finished by the down
        # launch before (SmallConfig(router_tail=True): no router launch in any block but the first; NOTES 48, 50;
        # timed slower, NOTES 52)
        cfg = SmallConfig(router_tail=True)
        kernels.append(("package sites+inputs lean router tail", ("lean prologues", cfg, True)))
    if args.package_router_tail_normed:  # ... the same with the normed row made by the tail too, so q/k/v read it
        # with no rms_scale in their launch (SmallConfig(router_tail="normed"); NOTES 52, 54)
        cfg = SmallConfig(router_tail="normed")
        kernels.append(("package sites+inputs lean router tail normed", ("lean prologues", cfg, True)))
    if args.package_inflight:  # ... the lean step with its prologues, more of the fragment launches' words in flight
        # (NOTES 63: a program's bandwidth is bounded by its bytes in flight): L2 asked for the group 2 ahead at each
        # group, or two groups loaded into registers ahead; at 3-4 planes both run capped at 128 registers
        # (gluon_fragment.DEEP_CAP_PLANES: four programs an SM, no spill)
        for name, kw in (("ahead 2", dict(fragment_ahead=2)), ("prefetch 2", dict(fragment_prefetch=2))):
            kernels.append((f"package sites+inputs lean {name}", ("lean prologues", SmallConfig(**kw), True)))
    for n in _programs(args.package_fragment_programs):  # ... the lean step with its prologues, the fragment
        # launches' grids aimed at n programs instead of TARGET_PROGRAMS (NOTES 46: the gate/up site's waves)
        cfg = SmallConfig(fragment_programs=n)
        kernels.append((f"package sites+inputs lean programs {n}", ("lean prologues", cfg, True)))
    if args.package_no_span:  # ... fused inputs, every view's body compiled (the default before 2026-12-06)
        kernels.append(("package sites+inputs no span", ("inputs", SmallConfig(span_bodies=False))))
    if args.package_pdl:  # ... fused inputs, every kernel launch of a linear with programmatic dependent launch
        kernels.append(("package sites+inputs pdl", ("inputs", SmallConfig(pdl=True), True)))
        if args.package_span:
            kernels.append(("package sites+inputs span pdl", ("inputs", dataclasses.replace(span_cfg, pdl=True))))
        if args.package_lean_step:  # the lean step's chain of launches, each started under the one before
            kernels.append(("package sites+inputs lean step pdl", ("lean step", SmallConfig(pdl=True), True)))
        if args.package_lean_prologues:  # ... and with the norms and products in the launches
            kernels.append(("package sites+inputs lean prologues pdl", ("lean prologues", SmallConfig(pdl=True), True)))
    return kernels


def prompt_views(args) -> dict:
    """:func:`package_rows`' ``prompt_tokens`` and ``views`` from ``--prompt-tokens`` and ``--package-views``."""
    if args.prompt_tokens < 1:
        raise SystemExit(f"--prompt-tokens must be at least 1, got {args.prompt_tokens}")
    views = _programs(args.package_views, "--package-views", "static views") or None
    return dict(prompt_tokens=args.prompt_tokens, views=views)


def _programs(text: str, option: str = "--package-fragment-programs", what: str = "numbers of programs") -> list[int]:
    """``option``'s positive integers by commas (empty: none)."""
    try:
        counts = [int(v) for v in text.split(",") if v.strip()] if text else []
    except ValueError:
        counts = [0]
    if any(n <= 0 for n in counts):
        raise SystemExit(f"{option}: positive {what} by commas, got {text!r}")
    return counts


def dry_run(args):
    """No GPU: the package rows on a tiny model on the CPU (eager decoding), gemlite's import status."""
    _, why = gemlite_module()
    print(f"# dry run on the CPU: gemlite {'importable' if not why else 'not importable (' + why + ')'}")
    fp, q = package_models(**DRY_RUN_SHAPE, device="cpu", dtype=torch.float32, **package_routers(args))
    budgets = package_budgets(args)
    warm = parse_shard(args.warm_shard) if args.warm_shard else None
    rows = package_rows(
        fp,
        q,
        "cpu",
        min(args.new_tokens, 6),
        "off",
        None,
        kernels=package_kernels(args),
        budgets=budgets,
        warm=warm,
        rounds=args.package_rounds,
        **prompt_views(args),
    )
    x_gemlite(rows)
    print_table(rows, "# package rows, tiny model on the CPU (not a measurement of anything but the code path)")
    return 0


def time_stack(q_layers, xs, static_k=None, cfg=None, run_routers=False, step=None):
    """us per token of the quantized stack (one CUDA graph of ``STEPS`` steps, median replay) with the launch
    config ``cfg`` (None: the library's defaults), or NaN and why when the stack cannot be captured
    (``static_k``, ``run_routers``: :func:`q_step`'s; ``step``: another step function of ``(layers, x, static_k)``,
    e.g. the site launches')."""
    QLinear.small_config = cfg
    try:
        if step is not None:
            g = graph_of(lambda x: step(q_layers, x, static_k=static_k), xs)
        else:
            g = graph_of(lambda x: q_step(q_layers, x, static_k=static_k, run_routers=run_routers), xs)
        t = bench(g.replay, warmup=20, rep=200) / STEPS
        del g
        return t, ""
    except Exception as e:  # e.g. a path with a host synchronisation (not capturable)
        torch.cuda.synchronize()
        return math.nan, f"{type(e).__name__}: {str(e)[:100]}"
    finally:
        QLinear.small_config = None


def stack_bytes(shapes, layers, bits):
    """Bytes of one token through the stack at ``bits`` code bits per weight: codes, fp16 step and zero."""
    return sum(o * i * bits / 8 + o * math.ceil(i / GROUP) * 4 for o, i in shapes.values()) * layers


def bits_sweep(tb, q_layers, xs, cfgs, views, log=print):
    """The one-bit plane kernel's configs on the stack at static views ``views``: the config with the least
    summed time, and every ``(config, view, us)``."""
    res, seen = [], []
    for cfg in cfgs:
        tot = 0.0
        for k in views:
            t, why = time_stack(q_layers, xs, static_k=k, cfg=cfg)
            tag = bits_tag(cfg)
            log(f"# bits sweep {tag} k={k} ({view_bits(k)} bits): {t:.1f} us/token {why}")
            res.append((tag, k, t))
            tot += t
        if tot == tot:
            seen.append((tot, cfg))
    seen.sort(key=lambda r: r[0])
    return (seen[0][1] if seen else tb.SmallConfig(bitplanes=True)), res


#: Configs of the one-bit plane kernel tried on the stack by ``--bits-sweep``: (block_n, block_k, warps, waves,
#: prefetch).
STACK_SWEEP = [
    (256, 64, 4, 4, False),
    (256, 64, 4, 2, False),
    (256, 64, 4, 1, False),
    (256, 128, 4, 2, True),
    (128, 64, 4, 4, False),
    (512, 64, 4, 2, False),
]


def print_comparison(rows, t16, config=None):
    """Static views and routed budgets: the library's default path beside the 'bitpl' rows: the one-bit plane kernel,
    or ``config`` (a ``--bits-config`` text) when one was named."""
    by = {r["mode"] + f"@{r['budget']}": r for r in rows}
    print()
    print(
        f"# comparison, us/token (x fp16; fp16 cuBLAS {t16:.1f} us/token); "
        "targets: 4-bit view >= 3.0x, routed 4 >= 2.5x"
    )
    if config:
        print(f"# right column: --bits-config {config}")
    print(f"{'row':14s} {'bits':>5s} {'default':>17s} {'config' if config else 'one-bit planes':>17s}")
    for r in rows:
        if r["mode"].startswith("static k="):
            k = r["mode"].split("=", 1)[1]
            other = by.get(f"bitpl k={k}@{r['budget']}")
            name = f"static k={k}"
        elif r["mode"] == "routed":
            other = by.get(f"routed bitpl@{r['budget']}")
            name = f"routed {r['budget']:.0f}"
        else:
            continue

        def cell(x):
            return f"{x['us_per_token']:8.1f} ({x['speedup']:5.2f}x)" if x is not None else f"{'-':>17s}"

        print(f"{name:14s} {r['achieved_bits']:5.2f} {cell(r):>17s} {cell(other):>17s}")


def print_sites(rows, t16, t16s):
    """Static views and routed budgets launched per linear and as the package launches them (one launch a site, the
    residual adds in the epilogue), against fp16 per linear and fp16 with one GEMV a site."""
    by = {r["mode"] + f"@{r['budget']}": r for r in rows}
    print()
    print(f"# sites, us/token (x fp16 per linear {t16:.1f} / x fp16 one GEMV a site {t16s:.1f})")
    print(f"{'row':16s} {'bits':>5s} {'per linear':>24s} {'sites':>24s}")

    def cell(x):
        if x is None:
            return f"{'-':>24s}"
        t = x["us_per_token"]
        return f"{t:8.1f} ({t16 / t:5.2f}x / {t16s / t:5.2f}x)"

    for r in rows:
        if r["mode"].startswith("sites k="):
            k = r["mode"].split("=", 1)[1]
            name, other = f"static k={k}", by.get(f"static k={k}@{r['budget']}")
        elif r["mode"] in ("routed sites", "routed sites+router", "routed sites sublayer"):
            name, other = f"routed {r['budget']:.0f}", by.get(f"routed@{r['budget']}")
            name += {"routed sites+router": " +router", "routed sites sublayer": " sublayer"}.get(r["mode"], "")
        else:
            continue
        print(f"{name:16s} {r['achieved_bits']:5.2f} {cell(other)} {cell(r)}")
    variants = [r for r in rows if r["mode"].startswith(("sites pf ", "sites ["))]
    if variants:
        print("# site stack variants: us/token (x the default site stack at the same view / x fp16 per linear)")
    for r in variants:
        base = by.get(f"sites k={r['mode'].rsplit('k=', 1)[1]}@{r['budget']}")
        rel = base["us_per_token"] / r["us_per_token"] if base is not None else float("nan")
        print(f"{r['mode']:40s} {r['us_per_token']:8.1f} ({rel:5.2f}x / {t16 / r['us_per_token']:5.2f}x)")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--out", default=os.environ.get("OUT"))
    ap.add_argument("--slices", default=None, help="slice layout of the quantized stack, e.g. 3,1,1,1,1,1 (2,2,2,2)")
    ap.add_argument(
        "--fields",
        action="store_true",
        help="also time static k with each one-token kernel forced: SmallConfig(fields=True) and "
        "fields=False (the default takes the field kernel for k <= FIELDS_MAX_K)",
    )
    ap.add_argument(
        "--bits",
        action="store_true",
        help="also time every static view and routed budget with the one-bit plane kernel "
        "(SmallConfig(bitplanes=True))",
    )
    ap.add_argument(
        "--bits-config",
        default=None,
        help=f"its config: {kb.BITS_CONFIG_FIELDS} (default: the library's, or --bits-sweep's best)",
    )
    ap.add_argument(
        "--bits-sweep",
        action="store_true",
        help="first try the one-bit plane kernel's configs on the stack (static views 1 and 2) and use the best",
    )
    ap.add_argument(
        "--view-steps",
        action="store_true",
        help="the quantized stack stores a step and zero point per view (quant.mobi.view_steps), read by each view",
    )
    ap.add_argument("--no-routed", action="store_true", help="skip the stack's routed rows (package rows keep theirs)")
    ap.add_argument(
        "--routed-parts",
        action="store_true",
        help="also each static view with the routers launched (their k dropped) and with k read on the device "
        "(no routers): what routing adds to a view, part by part",
    )
    ap.add_argument(
        "--sites",
        action="store_true",
        help="also the stack as the package's decode path launches it: one launch a site (q/k/v; gate/up), the "
        "residual adds in the o and down launches (static views and routed budgets), beside fp16 with one cuBLAS "
        "GEMV a site and the residual adds in cuBLAS (addmm)",
    )
    ap.add_argument(
        "--sites-configs",
        default="",
        help="with --sites: also the site stack's static views with each of these launch configs "
        f"(';'-separated {kb.BITS_CONFIG_FIELDS} texts, e.g. ',,,,,,0' stream-K, ',,,,,,,,1' pdl)",
    )
    ap.add_argument(
        "--sites-prefetch",
        action="store_true",
        help="with --sites: also the site stack's static views of 3, 4 and 8 bits with a later launch's weights asked "
        "of L2 while the launches before it run (mobiquant.kernels.l2_prefetch; modes line and bulk, plans "
        + "; ".join(f"{k}: {v}" for k, v in PREFETCH_PLANS.items())
        + ")",
    )
    ap.add_argument("--no-package", action="store_true", help="skip the rows of the model patched by the package")
    ap.add_argument(
        "--package-policy",
        default="free",
        choices=("free", "adjacent"),
        help="the package model's router gate policy (free: the rows of earlier sessions; adjacent: the default "
        "configuration's, where integer budgets decode as static views: pair it with fractional --package-budgets)",
    )
    ap.add_argument(
        "--package-placement",
        default="site",
        choices=PLACEMENTS,
        help="the package model's router placement (sublayer: o and down take q/k/v's and gate/up's decisions; "
        "attention: o alone takes q/k/v's; block: every later linear takes q/k/v's)",
    )
    ap.add_argument(
        "--package-budgets", default="", help="comma-separated routed budgets of the package rows (default: integers)"
    )
    ap.add_argument(
        "--package-span",
        action="store_true",
        help="also the package's routed budgets with fused inputs, each adjacent pair's two views alone compiled, on "
        "the fragment kernel in the launches of at least 2^25 weights (SmallConfig(span_bodies=True, "
        "fragment_device_from=2**25)); rows of 2026-12-06 with preload=True instead of the fragment kernel",
    )
    ap.add_argument(
        "--package-no-span",
        action="store_true",
        help="also the package's routed budgets with fused inputs and every view's body compiled "
        "(SmallConfig(span_bodies=False), the default before 2026-12-06)",
    )
    ap.add_argument(
        "--package-span-rules",
        action="store_true",
        help="also the package's routed budgets with fused inputs and the span rules beside the default (every span "
        "of at most 6 planes on the fragment kernel, site launches too): the rule before (3-4 and 4-5 plane spans of "
        "the launches from 2^25 weights, no site launch), and every launch's spans of at most 5 planes",
    )
    ap.add_argument(
        "--package-span-uncap",
        action="store_true",
        help="also the package's routed budgets with fused inputs and the views on the device of spans reaching 5 "
        "planes free of the 128-register cap of the large launches (SmallConfig(fragment_span_uncap=5))",
    )
    ap.add_argument(
        "--package-early-l2",
        action="store_true",
        help="also the package's routed budgets with fused inputs and each view on the device asking L2 for none "
        "of its span's common planes before it reads k (SmallConfig(fragment_early_l2=0); the default asks for one "
        "group), then for two groups, then two with programmatic dependent launch (pdl)",
    )
    ap.add_argument(
        "--package-fragment-loads",
        action="store_true",
        help="also the package's static views and routed budgets with fused inputs and the fragment kernel's loads "
        "otherwise: the 5-6 plane static views of the small launches on it too (SmallConfig(fragment=True)), L2 "
        "asked for the group 2 or 4 ahead at each group (fragment_ahead), no group prefetched into registers "
        "(fragment_prefetch=0), and both",
    )
    ap.add_argument(
        "--package-router-l2",
        action="store_true",
        help="also the package's routed budgets with fused inputs and the routers' launches asking L2 for their "
        "weights before they read their inputs (SmallConfig(router_early_l2=True))",
    )
    ap.add_argument(
        "--package-rounds",
        type=int,
        default=1,
        help="time every quantized package row this many times, the configs in turn each round, and keep each row's "
        "fastest (differences of a few percent between configs then do not depend on when each ran)",
    )
    ap.add_argument(
        "--package-router-tail",
        action="store_true",
        help="also the lean rows (with prologues) whose down launches finish the next block's router "
        "(SmallConfig(router_tail=True): no router launch in any block but the first)",
    )
    ap.add_argument(
        "--package-router-tail-normed",
        action="store_true",
        help="also the lean rows (with prologues) whose down launches finish the next block's router and make its "
        "normed row (SmallConfig(router_tail='normed'): q/k/v read it with no prologue)",
    )
    ap.add_argument(
        "--package-router-partials",
        action="store_true",
        help="also the package's routed budgets with fused inputs and each router launch without its tail, the GEMVs "
        "on the fragment kernel finishing the router from its partial sums (SmallConfig(router_partials=True))",
    )
    ap.add_argument(
        "--package-lean-step",
        action="store_true",
        help="also the package's static views and routed budgets with fused inputs and each layer's rotary embedding, "
        "cache write and attention in one launch (patching.lean_step(adds=False)), then also the residual adds in "
        "the o and down launches (lean_step), and fp16 with each",
    )
    ap.add_argument(
        "--package-lean-prologues",
        action="store_true",
        help="also the package's static views and routed budgets with the lean step and the RMS norms and gated "
        "products made in the launches they feed (patching.lean_step(prologues=True))",
    )
    ap.add_argument(
        "--package-epilogues",
        action="store_true",
        help="also the package's static views and routed budgets with the lean step, its prologues, and the "
        "fragment kernel's epilogues (SmallConfig(fragment_epilogues=True): the post-attention RMS norm's parts made "
        "by the o launch, the gated product by the gate/up launch; mobiquant.kernels.epilogue)",
    )
    ap.add_argument(
        "--package-chain",
        action="store_true",
        help="also the package's rows with the lean step, its prologues and the next inputs made in a layer chained "
        "into the launches reading them (SmallConfig(fragment_chain=...): True, then each kind alone)",
    )
    ap.add_argument(
        "--package-fused-only",
        action="store_true",
        help="leave out the package rows without fused sites (one launch a linear)",
    )
    ap.add_argument(
        "--package-pdl",
        action="store_true",
        help="also the package's rows with fused inputs with programmatic dependent launch (SmallConfig(pdl=True): "
        "the linears' and routers' kernels, the fragment kernel's since 2026-12-06), and with --package-span, "
        "--package-lean-step and --package-lean-prologues so (the lean step's attention launch too)",
    )
    ap.add_argument(
        "--package-epilogue-kinds",
        action="store_true",
        help="also the lean rows with one kind of epilogue alone at every static view (SmallConfig(fragment_epilogues="
        "'rms_norm'): the norms' parts made by the o and down launches; 'silu_mul': the products by gate/up)",
    )
    ap.add_argument(
        "--package-routed-epilogues",
        action="store_true",
        help="also the lean rows (with prologues) without the routed budgets' savings of the default: views read on "
        "the device making the next launch's input (SmallConfig(fragment_routed_epilogues=False)), their launches "
        "under pdl (pdl='static'), both; with --package-pdl also pdl on every launch",
    )
    ap.add_argument(
        "--package-fragment-programs",
        default="",
        help="also the lean rows (with prologues) with the fragment launches' grids aimed at these numbers of "
        "programs, by commas (SmallConfig(fragment_programs=N); the default aims at TARGET_PROGRAMS, 448)",
    )
    ap.add_argument(
        "--package-pdl-views",
        action="store_true",
        help="also the lean rows (with prologues) with programmatic dependent launch for every launch of a linear and "
        "none of the routers' (SmallConfig(pdl='views'))",
    )
    ap.add_argument(
        "--package-pdl-static",
        action="store_true",
        help="also the rows of --package-lean-step and --package-lean-prologues with programmatic dependent launch "
        "for the launches of static views only (SmallConfig(pdl='static'): routers and views on the device without)",
    )
    ap.add_argument(
        "--device-k",
        action="store_true",
        help="also each static view with k read on the device: every body, then the planes every body reads loaded "
        "before k (SmallConfig.preload), then only the view and the next one compiled (span_bodies) and preloaded, "
        "then so with the large launches on the fragment kernel (fragment_device_from 2^25)",
    )
    ap.add_argument("--new-tokens", type=int, default=64, help="tokens generated per package row")
    ap.add_argument(
        "--prompt-tokens",
        type=int,
        default=16,
        help="the package rows' prompt (prefilled; each timed step attends over it and the tokens before)",
    )
    ap.add_argument(
        "--package-inflight",
        action="store_true",
        help="also the lean step with its prologues and more words in flight: fragment_ahead 2, fragment_prefetch 2 "
        "(NOTES 63, 65)",
    )
    ap.add_argument("--package-views", default="", help="the package rows' static views k, by commas (default all)")
    ap.add_argument(
        "--package-graph",
        default="compile",
        choices=("graph", "compile"),
        help="the package rows' decode step, fp16 included: the step compiled between the package's kernels, then "
        "captured (cuda_graph='compile', what 'auto' picks on CUDA; quantized rows that fail in it are left out), or "
        "the model's own step captured as one CUDA graph (cuda_graph='graph')",
    )
    ap.add_argument(
        "--fuse-sites", action="store_true", help="also package rows with one launch per router site (fuse_sites)"
    )
    ap.add_argument(
        "--fuse-inputs",
        action="store_true",
        help="also package rows with one launch per site and fused inputs (patching.fuse_inputs), and fp16 with them",
    )
    ap.add_argument(
        "--router-in-launch",
        action="store_true",
        help="also package rows with one launch per site and its router inside it (SmallConfig(router_in_launch))",
    )
    ap.add_argument(
        "--profile", action="store_true", help="launches and kernel time of an eager package decode step (fp16, 4 bits)"
    )
    ap.add_argument("--gemlite", action="store_true", help="also time PyPI gemlite at 2/4/8 bits, group 128")
    ap.add_argument(
        "--router-tiling",
        default=None,
        help="the stack's router launches with hidden units a program, warps and columns a program, e.g. 1,4,0 "
        "(whole rows: the tiling before column splits); default the package's default_tiling",
    )
    ap.add_argument(
        "--pick-outside",
        action="store_true",
        help="greedy tokens picked outside the captured step, as before 2026-12-07's seventh session (argmax and the "
        "logits' copy launched eagerly after each replay; mobiquant.tasks.decode.PICK_IN_GRAPH off): the baseline of "
        "the pick inside the graph",
    )
    ap.add_argument("--dry-run", action="store_true", help="no GPU: the package rows on a tiny CPU model")
    ap.add_argument(
        "--warm-shard",
        default="",
        metavar="I/N",
        help="time nothing: shard I of N of the package rows' configs (fp16 with shard 0) decode a few tokens each, "
        "compiling their kernels into the on-disk caches; N such processes side by side before the timing run "
        "(benchmarks/decode_suite.sh WARM_SHARDS) take a stage's compiles off its timed run",
    )
    args = ap.parse_args(argv)
    if args.package_rounds < 1:
        ap.error(f"--package-rounds must be at least 1, got {args.package_rounds}")
    if args.warm_shard:
        try:
            parse_shard(args.warm_shard)
        except ValueError as e:
            ap.error(str(e))
    if args.new_tokens < 2:
        ap.error("--new-tokens must be at least 2")
    if args.slices:
        kb.set_slices(args.slices.split(","))
    if args.router_tiling:
        try:
            hb, nw, cols = (int(v) for v in args.router_tiling.split(","))
        except ValueError:
            ap.error(f"--router-tiling {args.router_tiling!r}: three integers HB,WARPS,COLS, e.g. 1,4,0")
        Router.tiling = dict(hidden_per_program=hb, num_warps=nw, cols_per_program=cols)
    QLinear.view_steps = args.view_steps
    if args.pick_outside:
        load_kernels()  # puts src/ on the path
        from mobiquant.tasks import decode

        decode.PICK_IN_GRAPH = False
    if args.dry_run:
        return dry_run(args)
    if not torch.cuda.is_available():
        ap.error("needs a CUDA device (use --dry-run to check the code path on the CPU)")
    if args.warm_shard:  # the package rows' compiles alone
        i, n = parse_shard(args.warm_shard)
        if i > 0 and i >= len(package_kernels(args)):  # a shard with no config (fp16 is shard 0's): nothing to build
            print(f"# warm shard {i}/{n}: no config of the {len(package_kernels(args))} falls to it")
            return 0
        fp, q = package_models(args.layers, D, FF, KV, 32, 1024, "cuda", torch.float16, **package_routers(args))
        warm = parse_shard(args.warm_shard)
        package_rows(fp, q, "cuda", args.new_tokens, args.package_graph, None, kernels=package_kernels(args),
                     budgets=package_budgets(args), warm=warm, **prompt_views(args))  # fmt: skip
        return 0
    tb = load_kernels()
    Router.fused = staticmethod(load_router_kernel())
    ns = len(kb.SLICE_BITS)
    dev = (
        f"{torch.cuda.get_device_name()}, torch {torch.__version__}, triton {triton.__version__}, "
        f"{time.strftime('%Y-%m-%d')}; slices {'-'.join(map(str, kb.SLICE_BITS))}, g{GROUP}"
        + ("; a step and zero point per view" if args.view_steps else "")
    )
    print(f"# {dev}")
    copy_bw, _ = copy_bandwidth()
    print(f"# copy bandwidth {copy_bw / 1e9:.0f} GB/s")
    gen = torch.Generator(device="cuda").manual_seed(0)
    shapes = layer_shapes()
    fp_layers = [
        {n: (torch.randn(o, i, generator=gen, device="cuda") / math.sqrt(i)).half() for n, (o, i) in shapes.items()}
        for _ in range(args.layers)
    ]
    q_layers = []
    for _ in range(args.layers):
        L = {n: QLinear(o, i, tb, gen) for n, (o, i) in shapes.items()}
        for r, d in (("qkv", D), ("o", D), ("gu", D), ("down", FF)):
            L["r_" + r] = Router(d, gen)
        q_layers.append(L)
    xs = [torch.randn(1, D, generator=gen, device="cuda").half() for _ in range(STEPS)]

    # router calibration on 256 tokens through the full-precision view (every slice)
    with torch.no_grad():
        calib = torch.randn(256, D, generator=gen, device="cuda").half()
        q_step(q_layers, calib, collect=True)

    rows = []
    fp16_bytes = sum(o * i * 2 for o, i in shapes.values()) * args.layers
    g = graph_of(lambda x: fp16_step(fp_layers, x), xs)
    t = bench(g.replay, warmup=20, rep=200) / STEPS
    rows.append(
        dict(
            mode="fp16",
            budget=16.0,
            achieved_bits=16.0,
            us_per_token=t,
            tok_s=1e6 / t,
            speedup=1.0,
            pct_copy=100 * fp16_bytes / (t * 1e-6) / copy_bw,
        )
    )
    t16 = t
    del g
    print(f"fp16: {t:.1f} us/token")

    def add(mode, bits, t, nb, achieved=None, why=""):
        rows.append(
            dict(
                mode=mode,
                budget=float(bits),
                achieved_bits=float(bits if achieved is None else achieved),
                us_per_token=t,
                tok_s=1e6 / t,
                speedup=t16 / t,
                pct_copy=100 * nb / (t * 1e-6) / copy_bw,
            )
        )
        print(f"{mode} ({bits} bits): {t:.1f} us/token  x{t16 / t:.2f}" + (f"  [{why}]" if why else ""))

    bits_cfg = None
    if args.bits or args.bits_sweep or args.bits_config:
        if not tb.bits_supported(kb.SLICE_BITS, GROUP):
            print(f"# one-bit plane kernel skipped: layout {kb.SLICE_BITS} / group {GROUP} not covered")
        elif args.bits_config:
            bits_cfg = kb.parse_bits_config(tb, args.bits_config)
        elif args.bits_sweep:
            cfgs = [
                tb.SmallConfig(bitplanes=True, block_n=a, block_k=b, num_warps=c, waves=d, prefetch=e)
                for a, b, c, d, e in STACK_SWEEP
            ]
            bits_cfg, res = bits_sweep(tb, q_layers, xs, cfgs, sorted({1, min(2, ns)}))
            for tag, k, t in res:
                rows.append(
                    dict(
                        mode=f"sweep bitpl {tag} k={k}",
                        budget=float(view_bits(k)),
                        achieved_bits=float(view_bits(k)),
                        us_per_token=t,
                        tok_s=1e6 / t,
                        speedup=t16 / t,
                        pct_copy=100 * stack_bytes(shapes, args.layers, view_bits(k)) / (t * 1e-6) / copy_bw,
                    )
                )
        else:
            bits_cfg = tb.SmallConfig(bitplanes=True)
        if bits_cfg is not None:
            print(f"# 'bitpl' rows' config: {bits_tag(bits_cfg)} (block_n/block_k/warps/waves; None: default)")

    for k in range(1, ns + 1):
        bits = view_bits(k)
        nb = stack_bytes(shapes, args.layers, bits)
        t, why = time_stack(q_layers, xs, static_k=k)
        add(f"static k={k}", bits, t, nb, why=why)
        if bits_cfg is not None:
            t, why = time_stack(q_layers, xs, static_k=k, cfg=bits_cfg)
            add(f"bitpl k={k}", bits, t, nb, why=why)
        for forced in (True, False) if args.fields and tb._fields_ok(kb.SLICE_BITS, min(k, 4)) and k <= 4 else ():
            tc, why = time_stack(q_layers, xs, static_k=k, cfg=tb.SmallConfig(fields=forced))
            add(f"{'fields' if forced else 'concat'} k={k}", bits, tc, nb, why=why)

    t16s = None
    if args.sites:
        fp16_sites(fp_layers)
        q_sites(tb, q_layers)
        g = graph_of(lambda x: fp16_step_sites(fp_layers, x), xs)
        t16s = bench(g.replay, warmup=20, rep=200) / STEPS
        del g
        add("fp16 sites", 16, t16s, fp16_bytes)
        print(f"# fp16 one GEMV a site, residual in cuBLAS: {t16s:.1f} us/token ({t16 / t16s:.2f}x per linear)")
        site_step = lambda ls, x, static_k=None: q_step_sites(tb, ls, x, static_k=static_k)  # noqa: E731
        with torch.no_grad():  # the same arithmetic as the per-linear stack, launched otherwise
            for k in sorted({1, min(2, ns), ns}):
                a, b = (f(q_layers, xs[0], static_k=k).float() for f in (q_step, site_step))
                rel = float((a - b).norm() / a.norm())
                print(f"# sites k={k}: relative difference to the per-linear stack {rel:.2e}")
        for k in range(1, ns + 1):
            bits = view_bits(k)
            t, why = time_stack(q_layers, xs, static_k=k, step=site_step)
            add(f"sites k={k}", bits, t, stack_bytes(shapes, args.layers, bits), why=why)
        for mode, plan in ((m, p) for m in ("line", "bulk") for p in PREFETCH_PLANS) if args.sites_prefetch else ():
            pf_step = lambda ls, x, static_k=None, pf=(mode, plan): q_step_sites(  # noqa: E731
                tb, ls, x, static_k=static_k, prefetch=pf
            )
            for k in sorted({1, min(2, ns), ns}):
                bits = view_bits(k)
                t, why = time_stack(q_layers, xs, static_k=k, step=pf_step)
                add(f"sites pf {mode} {plan} k={k}", bits, t, stack_bytes(shapes, args.layers, bits), why=why)
        for text in filter(None, (c.strip() for c in args.sites_configs.split(";"))):
            cfg = kb.parse_bits_config(tb, text)
            for k in range(1, ns + 1):
                bits = view_bits(k)
                t, why = time_stack(q_layers, xs, static_k=k, cfg=cfg, step=site_step)
                add(f"sites [{text}] k={k}", bits, t, stack_bytes(shapes, args.layers, bits), why=why)

    if args.routed_parts:  # where a routed token's time goes beside a static view's, per view
        for k in range(1, ns + 1):
            bits = view_bits(k)
            nb = stack_bytes(shapes, args.layers, bits)
            t, why = time_stack(q_layers, xs, static_k=k, run_routers=True)
            add(f"static k={k} + routers", bits, t, nb, why=why)
            k_dev = torch.full((1,), k, dtype=torch.int64, device="cuda")
            t, why = time_stack(q_layers, xs, static_k=k_dev)
            add(f"device k={k}", bits, t, nb, why=why)

    if args.device_k:  # what reading k on the device costs a view, and what preloading and a span take back
        for k in range(1, ns + 1):
            bits = view_bits(k)
            nb = stack_bytes(shapes, args.layers, bits)
            k_dev = torch.full((1,), k, dtype=torch.int64, device="cuda")
            span = (k, k + 1) if k < ns else (k - 1, k)
            for label, cfg, sp in (
                ("device k", None, None),
                ("device k preload", tb.SmallConfig(preload=True), None),
                ("device k span", tb.SmallConfig(preload=True, span_bodies=True), span),
                # ... and the large launches' views on the device on the fragment kernel, its bodies of the span alone
                (
                    "device k span frag",
                    tb.SmallConfig(preload=True, span_bodies=True, fragment_device_from=1 << 25),
                    span,
                ),
            ):
                QLinear.span = sp
                t, why = time_stack(q_layers, xs, static_k=k_dev, cfg=cfg)
                QLinear.span = None
                add(f"{label} k={k}", bits, t, nb, why=why)

    budgets = [] if args.no_routed else list(range(kb.SLICE_BITS[0], sum(kb.SLICE_BITS) + 1))
    # with k on the device, layouts that neither a one-token small kernel nor the one-bit plane kernel takes by
    # default fall to the tile path, whose per-token k is sorted with a host synchronisation: not capturable in a
    # CUDA graph (not tried)
    default_capturable = tb.small_supported(kb.SLICE_BITS, GROUP, None, False) or tb.wants_bitplanes(
        kb.SLICE_BITS, GROUP
    )
    for budget in budgets:
        for L in q_layers:
            for r in ("qkv", "o", "gu", "down"):
                L["r_" + r].set_budget(budget)
        # achieved bits on the timed tokens (parameter-weighted over linears), measured outside the graph
        tot_bits = tot_par = sub_bits = 0.0  # sub_bits: o and down at the q/k/v and gate/up views ('sublayer')
        ks = {}
        mismatch = 0

        def k_of(r, inp):
            nonlocal mismatch
            k_kernel = int(r(inp))
            k_torch = 1 + int((torch.cummin(r.scores(inp), -1).values > r.tau).sum())
            mismatch += k_kernel != k_torch
            return k_kernel

        for x in xs:
            h = x
            for L in q_layers:
                kq = k_of(L["r_qkv"], h)
                a = L["q"](h, kq)
                ko = k_of(L["r_o"], a)
                h2 = h + L["o"](a, ko)
                kg = k_of(L["r_gu"], h2)
                m = F.silu(L["gate"](h2, kg)) * L["up"](h2, kg)
                kd = k_of(L["r_down"], m)
                h = h2 + L["down"](m, kd)
                for name, kk in (("q", kq), ("k", kq), ("v", kq), ("o", ko), ("gate", kg), ("up", kg), ("down", kd)):
                    o, i = shapes[name]
                    tot_bits += view_bits(kk) * o * i
                    sub_bits += view_bits({"o": kq, "down": kg}.get(name, kk)) * o * i
                    tot_par += o * i
                    ks[kk] = ks.get(kk, 0) + 1
        achieved = tot_bits / tot_par
        finite = bool(torch.isfinite(h).all())
        nb = tot_bits / 8 / STEPS + sum(o * math.ceil(i / GROUP) * 4 for o, i in shapes.values()) * args.layers
        print(
            f"# routed budget {budget}: achieved {achieved:.2f} bits, k counts {ks}; router kernel vs torch k "
            f"mismatches: {mismatch}; last activations finite: {finite}"
        )
        if default_capturable:
            t, why = time_stack(q_layers, xs)
        else:
            t, why = math.nan, "the default one-token path of this layout sorts tokens by k on the host"
        add("routed", budget, t, nb, achieved=achieved, why=why)
        if args.sites:
            t, why = time_stack(q_layers, xs, step=site_step)
            add("routed sites", budget, t, nb, achieved=achieved, why=why)
            with torch.no_grad():  # the same views, the same outputs: per linear, sites, the router in the launch
                ref = q_step(q_layers, xs[0]).float()
                a, b = (q_step_sites(tb, q_layers, xs[0], in_launch=inl).float() for inl in (False, True))
            print(f"# routed budget {budget}: relative difference of the site stack to the per-linear one "
                  f"{float((a - ref).norm() / ref.norm()):.2e}; router in the launch against its own launch "
                  f"{float((a - b).norm() / a.norm()):.2e}")  # fmt: skip
            inl_step = lambda ls, x, static_k=None: q_step_sites(tb, ls, x, in_launch=True)  # noqa: E731
            t, why = time_stack(q_layers, xs, step=inl_step)
            add("routed sites+router", budget, t, nb, achieved=achieved, why=why)
            # placement 'sublayer': o and down on the decisions of q/k/v's and gate/up's routers (8 router launches a
            # token, not 16); its bits differ from the row's above (the tokens' views at o and down are others')
            sub_step = lambda ls, x, static_k=None: q_step_sites(tb, ls, x, sublayer=True)  # noqa: E731
            t, why = time_stack(q_layers, xs, step=sub_step)
            nb_sub = nb + (sub_bits - tot_bits) / 8 / STEPS
            add("routed sites sublayer", budget, t, nb_sub, achieved=sub_bits / tot_par, why=why)
        if bits_cfg is not None:
            t, why = time_stack(q_layers, xs, cfg=bits_cfg)
            add("routed bitpl", budget, t, nb, achieved=achieved, why=why)

    if args.fields and tb._fields_ok(kb.SLICE_BITS, min(ns, 4)) and not args.no_routed:
        # routed stack with the field kernel forced (device-side k: one body per k, branched)
        for budget in (2, 4, 6):
            for L in q_layers:
                for r in ("qkv", "o", "gu", "down"):
                    L["r_" + r].set_budget(budget)
            for bn in (None, 64):
                t, why = time_stack(q_layers, xs, cfg=tb.SmallConfig(fields=True, block_n=bn))
                name = "routed fields" + (f" n{bn}" if bn else "")
                rows.append(
                    dict(
                        mode=name,
                        budget=float(budget),
                        achieved_bits=float("nan"),
                        us_per_token=t,
                        tok_s=1e6 / t,
                        speedup=t16 / t,
                        pct_copy=float("nan"),
                    )
                )
                print(f"routed budget {budget}, field kernel forced (block_n {bn}): {t:.1f} us/token  x{t16 / t:.2f}")

    # router alone: 4 routers per layer, launched alone and inside a graph of a whole token's routers
    r = q_layers[0]["r_qkv"]
    tr = bench(lambda: r(xs[0]), warmup=20, rep=100)
    print(f"# one router launch (4096 -> 64 -> {ns - 1}, fused): {tr:.2f} us; {4 * args.layers} per token")
    m_in = torch.zeros(1, FF, device="cuda", dtype=xs[0].dtype)

    def routers_only(x):
        for L in q_layers:
            L["r_qkv"](x), L["r_o"](x), L["r_gu"](x), L["r_down"](m_in)

    g = graph_of(routers_only, xs)
    tg = bench(g.replay, warmup=20, rep=200) / STEPS
    del g
    print(
        f"# a token's {4 * args.layers} router launches inside a CUDA graph: {tg:.1f} us "
        f"({tg / (4 * args.layers):.2f} us each)"
    )
    rows.append(
        dict(
            mode="routers only",
            budget=float("nan"),
            achieved_bits=float("nan"),
            us_per_token=tg,
            tok_s=1e6 / tg,
            speedup=t16 / tg,
            pct_copy=float("nan"),
        )
    )

    if args.gemlite:
        api, why = gemlite_module()
        if api is None:
            print(f"# gemlite rows skipped: gemlite is not importable ({why}); pip install gemlite")
        else:
            try:
                rows += gemlite_rows(api, args.layers, xs, t16, copy_bw)
                rows += our_linear_rows(tb, xs, copy_bw)
                if bits_cfg is not None:
                    rows += our_linear_rows(tb, xs, copy_bw, cfg=bits_cfg, label="bitpl")
            except Exception as e:  # an API this script does not know: report, keep the other rows
                print(f"# gemlite rows skipped: {type(e).__name__}: {e}")

    if not args.no_package:
        fp, q = package_models(args.layers, D, FF, KV, 32, 1024, "cuda", torch.float16, **package_routers(args))
        rows += package_rows(
            fp,
            q,
            "cuda",
            args.new_tokens,
            args.package_graph,
            copy_bw,
            kernels=package_kernels(args, bits_cfg),
            budgets=package_budgets(args),
            rounds=args.package_rounds,
            **prompt_views(args),
        )
        if args.profile:
            import mobiquant as mq
            from e2e_decode import step_profile

            prompt = torch.randint(0, 1024, (1, 16), generator=torch.Generator().manual_seed(7)).cuda()
            step_profile(fp, None, "cuda", prompt, None, "package fp16")
            step_profile(q, None, "cuda", prompt, 4.0, "package routed 4")
            mq.set_static(q, 2)
            step_profile(q, None, "cuda", prompt, None, "package static k=2")
        del fp, q

    x_gemlite(rows)
    print_table(
        rows,
        f"# decode at batch 1, {args.layers} LLaMA-3-8B-shaped layers (7 linears each), {dev}; "
        "package rows: x fp16 against 'package fp16'",
    )
    print_comparison(rows, t16, args.bits_config)
    if t16s is not None:
        print_sites(rows, t16, t16s)
    if args.out:
        import csv

        keys = list(dict.fromkeys(k for r_ in rows for k in r_))
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "decode_bench.csv"), "w", newline="") as fh:
            w = csv.DictWriter(fh, fieldnames=keys)
            w.writeheader()
            w.writerows(rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())

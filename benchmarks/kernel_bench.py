#!/usr/bin/env python
"""Bit-plane kernel benchmark: LLaMA-3-8B linear shapes, fp16 cuBLAS and dequantize-then-matmul beside.

Needs only torch and triton (no hydra, omegaconf or wandb). Run from the repository root:

    python benchmarks/kernel_bench.py               # the table (defaults of the library)
    python benchmarks/kernel_bench.py --sweep       # first a launch-config sweep for 1/16/2048 tokens
    python benchmarks/kernel_bench.py --quick       # fewer shapes and token counts
    python benchmarks/kernel_bench.py --graph --tokens 1 --slices 3,1,1,1,1,1 --sweep --use-sweep
                                                    # the default layout, one token: every view with the
                                                    # library's default path and the one-bit plane kernel

``--slices`` sets the layout (default 2-2-2-2); the views are ``k = 1 .. len(slices)`` (``sum(slices[:k])``
bits) and a mixed/device-side ``k``. For one token the table also times the one-bit plane kernel
(``SmallConfig(bitplanes=True)``, column 'bitpl'; its config from ``--bits-config`` or, with ``--sweep
--use-sweep``, the sweep's best) and, for layouts of one width, the field kernel; fp16 cuBLAS is timed
beside every case and each kernel's ratio to it printed.

Every number is the median of ``triton.testing.do_bench`` (L2 flushed before each call) on the same card
in the same run, together with a device-to-device copy bandwidth measured first. Bytes are the fewest a
kernel must move: the planes it needs (up to the largest k among the tokens), scales and zero points,
activations in, outputs out. Prints one table; writes CSV files to ``$OUT`` (or ``--out``) when set.
"""

from __future__ import annotations

import argparse
import csv
import importlib.util
import math
import os
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent

SHAPES = [  # (name, out_features, in_features) of LLaMA-3-8B linears
    ("q/o 4096x4096", 4096, 4096),
    ("gate/up 4096->14336", 14336, 4096),
    ("down 14336->4096", 4096, 14336),
    ("k/v 4096->1024", 1024, 4096),
]
#: SmolLM2-135M's linears (``--shapes smollm2``): at these sizes a launch costs more than its bytes.
SMOL_SHAPES = [
    ("smol q/o 576x576", 576, 576),
    ("smol k/v 576->192", 192, 576),
    ("smol gate/up 576->1536", 1536, 576),
    ("smol down 1536->576", 576, 1536),
]
SHAPE_SETS = {"8b": SHAPES, "smollm2": SMOL_SHAPES, "all": SHAPES + SMOL_SHAPES}
TOKENS = [1, 4, 16, 128, 2048]
SLICE_BITS: tuple[int, ...] = (2, 2, 2, 2)
GROUP = 128


def set_slices(bits) -> None:
    """The slice layout of every benchmarked layer (``--slices``), here and in modules that imported it."""
    global SLICE_BITS
    SLICE_BITS = tuple(int(b) for b in bits)


def view_bits(k: int) -> int:
    """Code bits of view ``k``: ``b_1 + .. + b_k``."""
    return sum(SLICE_BITS[:k])


#: The fields of a one-bit plane config text (``parse_bits_config``), for the options' help.
BITS_CONFIG_FIELDS = (
    "BLOCK_N,BLOCK_K,WARPS,WAVES[,PREFETCH[,SPLIT_K[,WHOLE_K[,STAGES[,PDL[,L2PF[,AHEAD[,REDUCE[,FRAG[,CAP"
    "[,TMA[,INT4[,PRELOAD[,SPAN]]]]]]]]]]]]]]"
)


def parse_bits_config(tb, text: str):
    """A config text (``BITS_CONFIG_FIELDS``) -> ``SmallConfig(bitplanes=True, ...)``. Empty fields: the defaults;
    PREFETCH 1 or 0; SPLIT_K: programs per row block instead of WAVES programs per SM, 1 = one program per row block
    over all of K, no partial sums; WHOLE_K 1 or empty: the library's rule, one program per row block with all of K
    loaded at once where K <= 4096 and the launch has at most BITS_WHOLE_MAX_ROWS rows, unless BLOCK_K, WAVES,
    PREFETCH, SPLIT_K or STAGES is given; 0: never (stream-K); STAGES: num_stages of the stream-K group loop,
    Triton's pipeliner keeping later groups' words in flight; PDL 1: programmatic dependent launch, the weights
    loaded while the kernel before runs; L2PF 1: each stream-K program's whole range asked of L2 first (whole-K
    launches unchanged); AHEAD: at each group, the group this many later asked of L2 (stream-K); REDUCE 1: shared
    row blocks summed by a second launch (stream-K, one layer); FRAG 1: the fragment-native Gluon kernel where it
    serves, 0: never, empty: the library's rule (``SmallConfig.fragment``), 2: that rule and views on the device in
    launches of at least 2^25 weights (``fragment_device_from``), 3: the rule with static views of up to 4 planes in
    every launch (``fragment_static_from`` 0, the default since 2026-12-06), 4: the rule with them only in launches
    of at least 2^25 weights (``fragment_static_from`` 2^25, the default before); CAP: static views of at least this
    many planes on the large launches take the fragment kernel capped at 128 registers (``fragment_cap``; empty: the
    library's 5, 0: none); TMA -1 or -2: the fragment kernel's static views read their words by TMA
    (``fragment_tma``; empty or 0: registers); INT4 2-16: a packed layer's forwards of 2 to that many tokens through
    torch's CUDA int4 matmul (``int4_tokens``; 0: never; empty: the library's 16); PRELOAD 1: a whole-K launch that
    learns its view on the device loads the planes every body reads before reading ``k`` (``preload``); SPAN 1: a
    routed layer whose tokens choose between two adjacent views compiles those two bodies alone (``span_bodies``)."""
    parts = [p.strip() for p in text.split(",")] + [""] * 18
    bn, bk, nw, wv, pf, sk, wk, st, pdl, l2, ah, red, frag, cap, tma, i4, pre, span = (
        int(p) if p else None for p in parts[:18]
    )
    kw = {} if wk is None else {"whole_k": None if wk else False}
    return tb.SmallConfig(
        bitplanes=True,
        block_n=bn,
        block_k=bk,
        num_warps=nw or 4,
        waves=wv,
        prefetch=bool(pf),
        split_k=sk,
        stages=st,
        pdl=bool(pdl),
        l2_prefetch=bool(l2),
        ahead=ah or 0,
        reduce_launch=bool(red),
        fragment=None if frag in (None, 2, 3, 4) else bool(frag),
        fragment_device_from=1 << 25 if frag == 2 else None,
        **({"fragment_static_from": {3: 0, 4: 1 << 25}[frag]} if frag in (3, 4) else {}),
        **({} if cap is None else {"fragment_cap": cap}),
        fragment_tma=tma or 0,
        **({} if i4 is None else {"int4_tokens": i4}),
        preload=bool(pre),
        span_bodies=bool(span),
        **kw,
    )


def bits_tag(cfg) -> str:
    return (
        f"{cfg.block_n}/{cfg.block_k}/{cfg.num_warps}w/{cfg.waves}"
        + ("/pf" if cfg.prefetch else "")
        + (f"/sk{cfg.split_k}" if cfg.split_k else "")
        + {False: "/streamk", None: "", True: "/whole"}[cfg.whole_k]
        + (f"/st{cfg.stages}" if cfg.stages else "")
        + ("/pdl" if cfg.pdl is True else f"/pdl-{cfg.pdl}" if cfg.pdl else "")
        + ("/l2pf" if cfg.l2_prefetch else "")
        + (f"/ah{cfg.ahead}" if cfg.ahead else "")
        + ("/red" if cfg.reduce_launch else "")
        + {True: "/frag", False: "/nofrag", None: ""}[cfg.fragment]
        + ("/fragdev" if cfg.fragment_device_from else "")
        + (
            ""
            if cfg.fragment_static_from == type(cfg)().fragment_static_from
            else f"/fragfrom{cfg.fragment_static_from}"
        )
        + (f"/cap{cfg.fragment_cap}" if cfg.fragment_cap != type(cfg)().fragment_cap else "")
        + (f"/tma{-cfg.fragment_tma}" if cfg.fragment_tma else "")
        + (f"/int4x{cfg.int4_tokens}" if cfg.int4_tokens != type(cfg)().int4_tokens else "")
        + ("/pre" if cfg.preload else "")
        + ("/span" if cfg.span_bodies else "")
    )


#: One-token configs of the one-bit plane kernel swept by ``--sweep``: (block_n, block_k, warps, waves, prefetch,
#: split_k). ``split_k`` (programs per row block instead of ``waves`` programs per SM) with small row blocks: one
#: program per row block over all of K (no partial sums) or a few, for the shapes where latency, not bytes, rules.
BITS_SWEEP = [
    (256, 64, 4, 4, False, None),
    (256, 64, 4, 2, False, None),
    (256, 64, 4, 1, False, None),
    (256, 128, 4, 2, True, None),
    (256, 128, 8, 2, False, None),
    (128, 64, 4, 4, False, None),
    (512, 64, 4, 2, False, None),
    (128, 128, 4, 2, True, None),
    (32, 64, 4, None, False, 1),
    (64, 64, 4, None, False, 1),
    (32, 64, 4, None, False, 2),
    (64, 64, 4, None, False, 4),
    (128, 64, 4, None, False, 4),
    (128, 64, 4, None, False, 8),
]


#: ``--bits-sweep-configs`` (``parse_bits_config`` texts, ';'-separated): the configs ``--sweep`` times instead.
BITS_SWEEP_TEXTS: list[str] = []


def bits_sweep_configs(tb) -> list:
    """The one-bit plane configs of ``--sweep``: ``--bits-sweep-configs`` if given, else ``BITS_SWEEP``."""
    if BITS_SWEEP_TEXTS:
        return [parse_bits_config(tb, t) for t in BITS_SWEEP_TEXTS]
    return [
        tb.SmallConfig(bitplanes=True, block_n=bn, block_k=bk, num_warps=nw, waves=wv, prefetch=pf, split_k=sk)
        for bn, bk, nw, wv, pf, sk in BITS_SWEEP
    ]


def load_kernels():
    """``mobiquant.kernels.triton_bitplane``, or the file itself if the package cannot be imported."""
    sys.path.insert(0, str(ROOT / "src"))
    try:
        from mobiquant.kernels import triton_bitplane as tb

        return tb
    except Exception as exc:  # e.g. a dependency of the package missing on this machine
        print(f"# package import failed ({exc!r}); loading the kernel file directly", file=sys.stderr)
        path = ROOT / "src" / "mobiquant" / "kernels" / "triton_bitplane.py"
        spec = importlib.util.spec_from_file_location("triton_bitplane", path)
        mod = importlib.util.module_from_spec(spec)
        sys.modules["triton_bitplane"] = mod
        spec.loader.exec_module(mod)
        return mod


GRAPH = False  # --graph: time CUDA-graph replays (no host launch cost in the numbers)
#: --chain R: the one-bit plane sweep also times R launches in a row over R layers of the shape (distinct weights, so
#: together more than L2 holds at the 8B shapes), us per launch: what a launch costs inside a decode step, where it
#: follows another kernel (programmatic dependent launch overlaps the two); 1: the single launches only.
CHAIN = 1


def bench(fn, warmup=10, rep=40):
    """Median time of ``fn`` in us (``do_bench``: L2 flushed before each call).

    Without ``--graph`` the time includes any host time the launch takes beyond the flush before it
    (seen: ~50 us floors for one-token cases on an H100, see NOTES.md). With ``--graph`` ``fn`` is
    captured once in a CUDA graph and its replays are timed; a ``fn`` that cannot be captured (host
    synchronisation) falls back to the plain timing."""
    import triton.testing

    if GRAPH:
        try:
            s = torch.cuda.Stream()
            s.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(s):
                fn()
            torch.cuda.current_stream().wait_stream(s)
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g):
                fn()
            fn = g.replay
        except Exception as exc:  # e.g. a host synchronisation inside fn
            print(f"# graph capture failed ({type(exc).__name__}); timing plain launches", file=sys.stderr)
            torch.cuda.synchronize()
    return triton.testing.do_bench(fn, warmup=warmup, rep=rep, return_mode="median") * 1e3  # us


def gpu_bench_setup(script: str, slices: str):
    """The start of a one-GPU benchmark script: ``(kernels module, copy bandwidth in B/s)`` with graph-replayed
    timing (``GRAPH``) and the slice layout ``slices`` ('3,1,1,1,1,1') set, after a line naming the card, versions,
    date and layout and one giving the copy bandwidth measured now. Without a CUDA GPU it says so and exits (2)."""
    if not torch.cuda.is_available():
        print(f"{script}: needs a CUDA GPU", file=sys.stderr)
        raise SystemExit(2)
    import triton

    global GRAPH
    GRAPH = True
    set_slices(tuple(int(b) for b in slices.split(",")))
    tb = load_kernels()
    print(
        f"# {torch.cuda.get_device_name()}, torch {torch.__version__}, triton {triton.__version__}, "
        f"{time.strftime('%Y-%m-%d')}; slices {slices}, group {GROUP}"
    )
    copy_bw, _ = copy_bandwidth()
    print(f"# copy bandwidth {copy_bw / 1e9:.0f} GB/s")
    return tb, copy_bw


def copy_bandwidth(nbytes=1 << 30):
    a = torch.randint(0, 255, (nbytes,), dtype=torch.uint8, device="cuda")
    b = torch.empty_like(a)
    t = bench(lambda: b.copy_(a), warmup=20, rep=200)
    return 2 * nbytes / (t * 1e-6), t  # read + write


def make_layer(n_out, n_in, gen_seed=0):
    g = torch.Generator(device="cuda").manual_seed(gen_seed)
    planes = []
    for b in SLICE_BITS:
        per = 32 // b
        planes.append(
            torch.randint(
                -(2**31), 2**31 - 1, (n_out, math.ceil(n_in / per)), dtype=torch.int32, device="cuda", generator=g
            )
        )
    ng = math.ceil(n_in / GROUP)
    scale = (torch.rand(n_out, ng, device="cuda", generator=g) * 0.01 + 0.002).half()
    zero = torch.randint(0, 2 ** SLICE_BITS[0], (n_out, ng), device="cuda", generator=g).half()
    return planes, scale, zero


def plane_bytes(n_out, n_in, k):
    """Code bytes of view ``k``: ``sum(slices[:k])`` bits per weight (what the one-bit planes hold; the
    checkpoint's 3-, 5-, 6- and 7-bit planes leave a few top bits of each word unused)."""
    return n_out * n_in * view_bits(k) / 8


def min_bytes(n_out, n_in, m, kmax, act_bytes=2):
    ng = math.ceil(n_in / GROUP)
    return plane_bytes(n_out, n_in, kmax) + n_out * ng * 4 + m * n_in * act_bytes + m * n_out * act_bytes


def mixed_k(m, gen):
    """Per-token k for a mixed batch: every k equally likely; one token: k = 2 (read on the device)."""
    ns = len(SLICE_BITS)
    if m == 1:
        return torch.tensor([min(2, ns)], device="cuda")
    k = torch.randint(1, ns + 1, (m,), generator=gen)
    k[: min(m, ns)] = torch.arange(1, min(m, ns) + 1)
    return k.cuda()


def rel_err(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


# --------------------------------------------------------------------------------------------- sweep
def _time_cfg(tb, f, log, label):
    try:
        f()
        return bench(f)
    except Exception as exc:  # a config that does not compile or fit
        log(f"# sweep {label}: {type(exc).__name__}: {str(exc)[:120]}")
        return None


def sweep(tb, shapes, log, tokens=(1, 16, 2048)):
    """Launch configurations for 1, 16 and 2048 tokens at the first and the last view, and the one-bit plane
    kernel's configs for one token at views 1 and 2; returns the best per case (``(name, m, k)``, and
    ``(name, 'bits', k)`` for the one-bit plane kernel)."""
    ns = len(SLICE_BITS)
    small_cfgs_1 = [
        tb.SmallConfig(block_n=bn, block_k=bk, use_dot=False, num_warps=nw)
        for bn, bk, nw in (
            (16, 128, 4),
            (16, 256, 4),
            (16, 512, 4),
            (32, 128, 4),
            (32, 256, 4),
            (32, 512, 8),
            (64, 128, 4),
            (64, 256, 8),
            (8, 512, 4),
        )
    ]
    small_cfgs_16 = [
        tb.SmallConfig(block_n=bn, block_k=bk, use_dot=True, num_warps=nw)
        for bn, bk, nw in ((32, 64, 4), (32, 128, 4), (64, 64, 4), (64, 128, 4), (128, 64, 4), (64, 128, 8))
    ]
    tile_cfgs = [
        tb.TileConfig(128, 128, 64, 8, 8, 3),
        tb.TileConfig(128, 256, 64, 8, 8, 3),
        tb.TileConfig(128, 128, 64, 8, 4, 4),
        tb.TileConfig(64, 128, 64, 8, 4, 4),
    ]
    cases = []
    if 1 in tokens and tb.small_supported(SLICE_BITS, GROUP, None, False):
        cases.append((1, small_cfgs_1, "small"))
    if 16 in tokens and tb.small_supported(SLICE_BITS, GROUP, None, True):
        cases.append((16, small_cfgs_16, "small"))
    if 2048 in tokens:
        cases.append((2048, tile_cfgs, "tile"))
    bits_ok = 1 in tokens and tb.bits_supported(SLICE_BITS, GROUP)
    best = {}
    for name, n_out, n_in in shapes:
        planes, scale, zero = make_layer(n_out, n_in)
        for m, cfgs, path in cases:
            x = torch.randn(m, n_in, device="cuda", dtype=torch.float16)
            out = torch.empty(m, n_out, device="cuda", dtype=torch.float16)
            for k in sorted({1, ns}):
                res = []
                for cfg in cfgs:
                    kw = {"small_config": cfg} if path == "small" else {"tile_config": cfg}
                    f = lambda: tb.bitplane_linear(  # noqa: E731
                        x, planes, scale, zero, SLICE_BITS, GROUP, k, out=out, path=path, **kw
                    )
                    t = _time_cfg(tb, f, log, f"{name} m={m} k={k} {cfg}")
                    if t is None:
                        continue
                    res.append((t, cfg))
                    log(f"sweep,{name},{m},{k},{t:.2f},{cfg}")
                if res:
                    res.sort(key=lambda r: r[0])
                    best[(name, m, k)] = res[0]
                    log(f"# best {name} m={m} k={k}: {res[0][0]:.2f} us {res[0][1]}")
        if bits_ok:
            packed = tb.pack_bitplanes(planes, scale, zero, SLICE_BITS, GROUP, n_in)
            # the chain's other layers: packed buffers only (their codes random, as these are)
            chain = [packed] + [
                tb.pack_bitplanes(*make_layer(n_out, n_in, gen_seed=i), SLICE_BITS, GROUP, n_in)
                for i in range(1, CHAIN)
            ]
            x = torch.randn(1, n_in, device="cuda", dtype=torch.float16)
            out = torch.empty(1, n_out, device="cuda", dtype=torch.float16)
            for k in sorted({1, min(2, ns)}):
                res = []
                for cfg in bits_sweep_configs(tb):
                    if cfg.whole_k is True and n_in > tb.BITS_WHOLE_MAX_K:
                        continue  # whole-K cannot hold these inputs (whole_k None takes the stream-K grid there)
                    f = lambda: tb.bitplane_linear(  # noqa: E731
                        x, planes, scale, zero, SLICE_BITS, GROUP, k, out=out, small_config=cfg, packed=packed
                    )
                    t = _time_cfg(tb, f, log, f"{name} bits k={k} {cfg}")
                    if t is None:
                        continue
                    res.append((t, cfg))
                    log(f"sweep,{name},1,{k},{t:.2f},bits {bits_tag(cfg)}")
                    if CHAIN > 1:

                        def run_chain(cfg=cfg, k=k):
                            for p in chain:
                                tb.bitplane_linear(
                                    x, planes, scale, zero, SLICE_BITS, GROUP, k, out=out, small_config=cfg, packed=p
                                )

                        tc = _time_cfg(tb, run_chain, log, f"{name} bits k={k} chain {cfg}")
                        if tc is not None:
                            log(f"sweep,{name},1,{k},{tc / CHAIN:.2f},bits {bits_tag(cfg)} chain{CHAIN}")
                if res:
                    res.sort(key=lambda r: r[0])
                    best[(name, "bits", k)] = res[0]
                    c = res[0][1]
                    log(f"# best {name} bits k={k} ({view_bits(k)} bits): {res[0][0]:.2f} us {bits_tag(c)}")
            packed = chain = None
        planes = scale = zero = None
        torch.cuda.empty_cache()
    return best


# --------------------------------------------------------------------------------------------- table
def table(tb, shapes, tokens, copy_bw, log, check=True, best=None, bits_cfg=None, deq=True, path="auto"):
    """The main table; with ``best`` (from :func:`sweep`) each case uses the swept config nearest it. For one
    token the one-bit plane kernel (``bits_cfg``, or the swept best) and the field kernel are timed beside.
    ``path``: the entry's route for every case ('auto': its own choice)."""
    gen = torch.Generator().manual_seed(0)
    ns = len(SLICE_BITS)
    bits_ok = tb.bits_supported(SLICE_BITS, GROUP)

    def cfg_kwargs(name, m, k):
        if path != "auto":
            return {"path": path}
        if not best:
            return {}
        kk = 1 if k == "mixed" or k <= max(1, ns // 2) else ns
        mm = 1 if m == 1 else 16 if m <= 16 else 2048 if m > 256 else None
        hit = best.get((name, mm, kk)) if mm else None
        if hit is None:
            return {}
        cfg = hit[1]
        if isinstance(cfg, tb.SmallConfig):
            return {"small_config": cfg, "path": "small"}
        return {"tile_config": cfg, "path": "tile"}

    def bits_config(name, k):
        if bits_cfg is not None:
            return bits_cfg
        if best:
            kk = 1 if k == 1 else min(2, ns)
            hit = best.get((name, "bits", kk))
            if hit is not None:
                return hit[1]
        return tb.SmallConfig(bitplanes=True)

    def reference(x, planes, scale, zero, n_in, k, kmix):
        if k == "mixed":
            ref = torch.empty(x.shape[0], scale.shape[0], device="cuda", dtype=torch.float32)
            for j in kmix.unique().tolist():
                idx = (kmix == j).nonzero().flatten()
                wj = tb.dequantize(planes, scale, zero, SLICE_BITS, GROUP, j, n_in, dtype=torch.float32)
                ref[idx] = x[idx].float() @ wj.t()
            return ref
        wj = tb.dequantize(planes, scale, zero, SLICE_BITS, GROUP, k, n_in, dtype=torch.float32)
        return x.float() @ wj.t()

    rows = []
    for name, n_out, n_in in shapes:
        planes, scale, zero = make_layer(n_out, n_in)
        packed = tb.pack_bitplanes(planes, scale, zero, SLICE_BITS, GROUP, n_in) if bits_ok and 1 in tokens else None
        w16 = (torch.randn(n_out, n_in, device="cuda") / math.sqrt(n_in)).half()
        wbuf = torch.empty(n_out, n_in, device="cuda", dtype=torch.float16)
        for m in tokens:
            x = torch.randn(m, n_in, device="cuda", dtype=torch.float16)
            out = torch.empty(m, n_out, device="cuda", dtype=torch.float16)
            t16 = bench(lambda: torch.matmul(x, w16.t(), out=out))
            b16 = n_out * n_in * 2 + m * (n_in + n_out) * 2
            flops = 2.0 * m * n_in * n_out
            rows.append(
                dict(
                    shape=name,
                    tokens=m,
                    k="fp16",
                    bits=16,
                    us=t16,
                    fp16_us=t16,
                    speedup=1.0,
                    bytes=b16,
                    gbps=b16 / t16 / 1e3,
                    pct_copy=100 * b16 / (t16 * 1e-6) / copy_bw,
                    tflops=flops / t16 / 1e6,
                    deq_mm_us=float("nan"),
                    err=0.0,
                    fields_us=float("nan"),
                    bits_us=float("nan"),
                    bits_speedup=float("nan"),
                    bits_pct_copy=float("nan"),
                    bits_err=float("nan"),
                    config="cublas",
                )
            )
            kmix = mixed_k(m, gen)
            for k in [*range(1, ns + 1), "mixed"]:
                kk = kmix if k == "mixed" else k
                if k == "mixed":
                    kmax = int(kmix.max())
                    bits = float(sum(view_bits(int(j)) for j in kmix.tolist())) / m
                else:
                    kmax, bits = k, float(view_bits(k))
                kw = cfg_kwargs(name, m, k)
                f = lambda: tb.bitplane_linear(x, planes, scale, zero, SLICE_BITS, GROUP, kk, out=out, **kw)  # noqa: E731
                f()
                ref = reference(x, planes, scale, zero, n_in, k, kmix) if check else None
                err = rel_err(f(), ref) if check else float("nan")
                t = bench(f)
                # dequantize-then-matmul baseline (a Triton dequantize pass + cuBLAS), per k group
                if k == "mixed":
                    groups = [(j, (kmix == j).nonzero().flatten()) for j in kmix.unique().tolist()]

                    def dq():
                        for j, idx in groups:
                            tb.dequantize(planes, scale, zero, SLICE_BITS, GROUP, j, n_in, out=wbuf)
                            out.index_copy_(0, idx, torch.matmul(x.index_select(0, idx), wbuf.t()))
                else:

                    def dq():
                        tb.dequantize(planes, scale, zero, SLICE_BITS, GROUP, k, n_in, out=wbuf)
                        torch.matmul(x, wbuf.t(), out=out)

                tdq = float("nan")
                if deq:
                    dq()
                    tdq = bench(dq)
                # one token: the field kernel forced (layouts of one width), in the same run
                t_fields = float("nan")
                if m == 1 and not kw and tb._fields_ok(SLICE_BITS, min(kmax, 4)) and kmax <= 4:
                    cc = tb.SmallConfig(fields=True)
                    fc = lambda: tb.bitplane_linear(  # noqa: E731
                        x, planes, scale, zero, SLICE_BITS, GROUP, kk, out=out, path="small", small_config=cc
                    )
                    fc()
                    t_fields = bench(fc)
                # one token: the one-bit plane kernel, in the same run
                t_bits = err_bits = float("nan")
                bcfg = None
                if m == 1 and packed is not None:
                    bcfg = bits_config(name, kmax)
                    fb = lambda: tb.bitplane_linear(  # noqa: E731
                        x, planes, scale, zero, SLICE_BITS, GROUP, kk, out=out, small_config=bcfg, packed=packed
                    )
                    fb()
                    err_bits = rel_err(fb(), ref) if check else float("nan")
                    t_bits = bench(fb)
                nb = min_bytes(n_out, n_in, m, kmax)
                rows.append(
                    dict(
                        shape=name,
                        tokens=m,
                        k=k,
                        bits=bits,
                        us=t,
                        fp16_us=t16,
                        speedup=t16 / t,
                        bytes=nb,
                        gbps=nb / t / 1e3,
                        pct_copy=100 * nb / (t * 1e-6) / copy_bw,
                        tflops=flops / t / 1e6,
                        deq_mm_us=tdq,
                        err=err,
                        fields_us=t_fields,
                        bits_us=t_bits,
                        bits_speedup=t16 / t_bits,
                        bits_pct_copy=100 * nb / (t_bits * 1e-6) / copy_bw,
                        bits_err=err_bits,
                    )
                )
                r = rows[-1]
                r["config"] = str(kw.get("small_config") or kw.get("tile_config") or "default")
                if bcfg is not None:
                    r["bits_config"] = bits_tag(bcfg)
                log(
                    f"{name:22s} M={m:5d} k={str(k):5s} {t:9.2f} us  fp16 {t16:9.2f} us  x{r['speedup']:.2f}  "
                    f"{r['gbps']:7.0f} GB/s ({r['pct_copy']:5.1f}% copy)  deq+mm {tdq:9.2f} us  err {err:.1e}"
                    + (f"  field-kernel {t_fields:8.2f} us" if t_fields == t_fields else "")
                    + (
                        f"  one-bit planes {t_bits:8.2f} us x{r['bits_speedup']:.2f} "
                        f"({r['bits_pct_copy']:5.1f}% copy, err {err_bits:.1e})"
                        if t_bits == t_bits
                        else ""
                    )
                )
        # drop this shape's tensors (the benchmarked closures share these variables) before the next one
        planes = scale = zero = w16 = wbuf = packed = None
        torch.cuda.empty_cache()
    return rows


def print_table(rows, copy_bw, dev):
    print()
    print(
        f"# {dev}; slices {'-'.join(map(str, SLICE_BITS))}, g{GROUP}; copy bandwidth {copy_bw / 1e9:.0f} GB/s "
        "(read+write); times are medians in us; 'triton': the library's default path; 'bitpl': the one-bit plane "
        "kernel (one token)"
    )
    hdr = (
        f"{'shape':22s} {'M':>5s} {'k':>5s} {'bits':>4s} {'triton':>9s} {'fp16':>9s} {'x fp16':>6s} "
        f"{'deq+mm':>9s} {'GB/s':>6s} {'%copy':>5s} {'TFLOP/s':>7s} {'rel.err':>7s} {'bitpl':>8s} {'x fp16':>6s} "
        f"{'%copy':>5s}"
    )
    print(hdr)
    for r in rows:
        if r["k"] == "fp16":
            continue
        print(
            f"{r['shape']:22s} {r['tokens']:5d} {str(r['k']):>5s} {r['bits']:4.1f} {r['us']:9.2f} "
            f"{r['fp16_us']:9.2f} {r['speedup']:6.2f} {r['deq_mm_us']:9.2f} {r['gbps']:6.0f} "
            f"{r['pct_copy']:5.1f} {r['tflops']:7.1f} {r['err']:7.1e} {r.get('bits_us', math.nan):8.2f} "
            f"{r.get('bits_speedup', math.nan):6.2f} {r.get('bits_pct_copy', math.nan):5.1f}"
        )


def write_csv(rows, path):
    if not rows:
        return
    with open(path, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(rows[0].keys()))
        w.writeheader()
        w.writerows(rows)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sweep", action="store_true", help="sweep launch configs first (1/16/2048 tokens)")
    ap.add_argument("--sweep-only", action="store_true")
    ap.add_argument("--use-sweep", action="store_true", help="the table uses the best swept configs")
    ap.add_argument("--quick", action="store_true", help="two shapes, tokens 1/16/2048")
    ap.add_argument("--tokens", default=None, help="comma-separated token counts (default 1,4,16,128,2048)")
    ap.add_argument("--no-check", action="store_true", help="skip the correctness check of each case")
    ap.add_argument("--no-deq", action="store_true", help="skip the dequantize-then-matmul baseline (saves time)")
    ap.add_argument("--graph", action="store_true", help="time CUDA-graph replays (recommended for <= 16 tokens)")
    ap.add_argument("--slices", default=None, help="slice layout, e.g. 3,1,1,1,1,1 (default 2,2,2,2)")
    ap.add_argument(
        "--path",
        choices=["auto", "small", "tile", "dequant"],
        default="auto",
        help="the route the table times (default: the entry's own choice per case)",
    )
    ap.add_argument(
        "--bits-config",
        default=None,
        help=f"the one-bit plane kernel's config for the table: {BITS_CONFIG_FIELDS} (default: the library's, or "
        "the sweep's best with --use-sweep)",
    )
    ap.add_argument(
        "--bits-sweep-configs",
        default=None,
        help=f"';'-separated one-bit plane configs ({BITS_CONFIG_FIELDS}) that --sweep times instead of its own list",
    )
    ap.add_argument(
        "--shapes", choices=sorted(SHAPE_SETS), default="8b", help="LLaMA-3-8B's linears, SmolLM2's, or both"
    )
    ap.add_argument(
        "--chain",
        type=int,
        default=1,
        help="the one-bit plane sweep also times this many launches in a row over as many layers (us per launch)",
    )
    ap.add_argument("--out", default=os.environ.get("OUT"), help="folder for CSV files (default $OUT)")
    args = ap.parse_args(argv)
    if args.chain < 1:
        ap.error(f"--chain must be a positive number of launches, got {args.chain}")
    if args.bits_sweep_configs:
        BITS_SWEEP_TEXTS[:] = [c for c in args.bits_sweep_configs.split(";") if c.strip()]
    global GRAPH, CHAIN
    GRAPH, CHAIN = args.graph, args.chain
    if args.slices:
        set_slices(args.slices.split(","))
    if not torch.cuda.is_available():
        print("kernel_bench needs a CUDA device", file=sys.stderr)
        return 2
    import triton

    tb = load_kernels()
    dev = (
        f"{torch.cuda.get_device_name()} ({torch.cuda.get_device_properties(0).multi_processor_count} SMs), "
        f"torch {torch.__version__}, triton {triton.__version__}, {time.strftime('%Y-%m-%d')}"
    )
    print(f"# {dev}")
    if args.out:
        os.makedirs(args.out, exist_ok=True)
    logf = open(os.path.join(args.out, "kernel_bench.log"), "w") if args.out else None

    def log(msg):
        print(msg, flush=True)
        if logf:
            logf.write(msg + "\n")
            logf.flush()

    copy_bw, tcopy = copy_bandwidth()
    log(f"# copy bandwidth: {copy_bw / 1e9:.0f} GB/s (1 GiB copied in {tcopy:.0f} us)")
    shapes = SHAPE_SETS[args.shapes][:2] if args.quick else SHAPE_SETS[args.shapes]
    tokens = [1, 16, 2048] if args.quick else TOKENS
    if args.tokens:
        tokens = [int(t) for t in args.tokens.split(",")]
    t0 = time.time()
    best = None
    if args.sweep or args.sweep_only:
        best = sweep(tb, shapes, log, tokens)
        log(f"# sweep took {time.time() - t0:.0f} s")
        if args.out:
            with open(os.path.join(args.out, "kernel_sweep_best.csv"), "w") as fh:
                fh.write("shape,tokens,k,us,config\n")
                for (name, m, k), (t, cfg) in best.items():
                    fh.write(f'{name},{m},{k},{t:.3f},"{cfg}"\n')
        if args.sweep_only:
            return 0
    t1 = time.time()
    bits_cfg = parse_bits_config(tb, args.bits_config) if args.bits_config else None
    rows = table(
        tb,
        shapes,
        tokens,
        copy_bw,
        log,
        check=not args.no_check,
        best=best if args.use_sweep else None,
        bits_cfg=bits_cfg,
        deq=not args.no_deq,
        path=args.path,
    )
    log(f"# table took {time.time() - t1:.0f} s")
    if args.out:
        write_csv(rows, os.path.join(args.out, "kernel_bench.csv"))
    print_table(rows, copy_bw, dev)
    return 0


if __name__ == "__main__":
    sys.exit(main())

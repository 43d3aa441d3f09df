#!/usr/bin/env python
"""A routed site's one token: its router in its own launch, or inside the one-bit plane launch (``RoutedK.router``).

For each shape (SmolLM2-135M's q/k/v site and gate/up site, LLaMA-3-8B's), one CUDA graph holds ``--reps`` site
launches in a row, each preceded by its router's launch (``fused_router``, then ``RoutedK`` of its values: the
path before the router moved into the launch) or not (the router in the launch); the first without programmatic
dependent launch (``pdl``: a launch starts while the one before runs), again with it on the site's launch alone and
on both launches. Prints us per site (graph replay time / reps) and the ratios against the first, from one process;
the outputs are checked equal first.

    python benchmarks/router_launch_bench.py             # on a CUDA GPU
    python benchmarks/router_launch_bench.py --sweep     # the router launch alone, over its tilings

``--sweep`` times one router launch per token as ``patching.fuse_inputs`` makes it (``fused_input_router``: the
RMS norm before q/k/v and gate/up, the MLP product before down; ``fused_router`` alone for o), SmolLM2-135M's and
LLaMA-3-8B's widths, over hidden units a program x warps, in a CUDA graph of ``--reps``; each row's ratio is
against the default tiling (one hidden unit a program, 4 warps) timed in the same run.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))

SHAPES = {  # in_features, the site's layers' rows
    "smollm2 qkv 576->576/192/192": (576, (576, 192, 192)),
    "smollm2 gate/up 576->1536x2": (576, (1536, 1536)),
    "8b qkv 4096->4096/1024/1024": (4096, (4096, 1024, 1024)),
}


def site_of(n_in, outs, bits=(3, 1, 1, 1, 1, 1), group=128, hidden=64, seed=0, device="cuda"):
    from mobiquant.kernels import triton_bitplane as tb
    from mobiquant.nn.router import TokenRouter

    gen = torch.Generator().manual_seed(seed)
    parts = []
    for n in outs:
        npad = -(-n // 128) * 128  # rows padded as pack_bitplanes pads them
        words = torch.randint(-(2**31), 2**31 - 1, (sum(bits), n_in // 16, npad // 2), generator=gen, dtype=torch.int32)
        sz = torch.randint(0, 0x3C00, (2, n_in // group, npad // 2), generator=gen, dtype=torch.int32)
        sz = sz | (sz << 16)  # finite positive fp16 steps and zero points below 1
        parts.append(tb.BitPlanes(words.to(device), sz.to(device), bits, group, n_in, n))
    site = tb.site_bitplanes(parts)
    router = TokenRouter(n_in, bits, hidden=hidden).to(device)
    return site, router


def time_graph(f, reps, iters=20):
    f()
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(2):
            f()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for _ in range(reps):
            f()
    g.replay()
    torch.cuda.synchronize()
    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    best = float("inf")
    for _ in range(iters):
        a.record()
        g.replay()
        b.record()
        torch.cuda.synchronize()
        best = min(best, 1e3 * a.elapsed_time(b) / reps)
    return best


def one_shape(name, n_in, outs, reps):
    """The row of one site shape: us per site with the router launched before the site launch, and inside it."""
    from mobiquant.kernels import triton_bitplane as tb
    from mobiquant.kernels.triton_router import IN_LAUNCH_TILING, fused_router

    site, router = site_of(n_in, outs)
    x = torch.randn(1, n_in, device="cuda", dtype=torch.float16)
    buf, inl = router.in_launch(x)
    taus = [torch.tensor(t, device="cuda") for t in (0.2, -0.1, 0.0)[: len(outs)]]
    zero = torch.zeros((), device="cuda")

    def outside(pdl=False, site_pdl=False, tiling=None):
        """The router's launch (``pdl``: with programmatic dependent launch; ``tiling``: the router's, default its
        default), then the site's (``site_pdl``)."""
        _, v = fused_router(x, inl.w1, inl.b1, inl.w2, inl.b2, zero, pdl=pdl, **(tiling or {}))
        cfg = tb.SmallConfig(pdl=site_pdl)
        return tb.bitplane_site_bits(x, site, [tb.RoutedK(v, t) for t in taus], config=cfg)

    def inside():
        return tb.bitplane_site_bits(x, site, [tb.RoutedK(buf, t, inl) for t in taus])

    in_launch = dict(tiling=IN_LAUNCH_TILING)  # the tiling whose values the router in the launch computes
    same = torch.equal(outside(**in_launch), inside()) and torch.equal(
        outside(**in_launch), outside(True, True, **in_launch)
    )
    t_out, t_in = time_graph(outside, reps), time_graph(inside, reps)
    t_site_pdl = time_graph(lambda: outside(site_pdl=True), reps)
    t_pdl = time_graph(lambda: outside(True, True), reps)
    return dict(
        shape=name,
        router_launch_us=t_out,
        router_in_launch_us=t_in,
        ratio=t_out / t_in,
        site_pdl_us=t_site_pdl,
        site_pdl_ratio=t_out / t_site_pdl,
        router_launch_pdl_us=t_pdl,
        pdl_ratio=t_out / t_pdl,
        same_output=same,
    )


ROUTER_INPUTS = {  # name: (input width, prologue kind or None)
    "smollm2 qkv/gate-up (rms_norm, 576)": (576, "rms_norm"),
    "smollm2 down (silu_mul, 1536)": (1536, "silu_mul"),
    "smollm2 o (576)": (576, None),
    "8b qkv/gate-up (rms_norm, 4096)": (4096, "rms_norm"),
    "8b down (silu_mul, 14336)": (14336, "silu_mul"),
    "8b o (4096)": (4096, None),
    "8b down (14336)": (14336, None),  # decode_bench.py's stack: routers on the GEMVs' inputs, no prologue
}


def sweep_rows(
    reps, hidden=64, outputs=5, hbs=(1, 2, 4, 8, 16, 64), warps=(1, 2, 4, 8), cols=(0,), inputs=None, tokens=1
):
    """us per router launch for each input of :data:`ROUTER_INPUTS` (or those named in ``inputs``) and tiling
    (hidden units a program x warps x columns a program, 0: whole rows), with the ratio to the package's default
    tiling (``triton_router.default_tiling``) and to whole rows of one hidden unit, 4 warps (``IN_LAUNCH_TILING``);
    counts checked equal to the default's where no gate value sits within 1e-4 of the threshold."""
    from mobiquant.kernels.triton_router import IN_LAUNCH_TILING, default_tiling, fused_input_router, fused_router

    gen = torch.Generator().manual_seed(0)
    rows = []
    for name, (d, kind) in ROUTER_INPUTS.items():
        if inputs and name not in inputs:
            continue
        x = torch.randn(tokens, d, generator=gen).to("cuda", torch.float16)
        w1, b1 = torch.randn(hidden, d, generator=gen) / d**0.5, torch.randn(hidden, generator=gen)
        w2, b2 = torch.randn(outputs, hidden, generator=gen), torch.randn(outputs, generator=gen)
        router = tuple(t.to("cuda") for t in (w1, b1, w2, b2))
        tau = torch.zeros(1, device="cuda")
        pro: tuple | None = None
        if kind == "rms_norm":
            pro = ("rms_norm", torch.rand(d, generator=gen).to("cuda", torch.float16) + 0.5, 1e-5)
        elif kind == "silu_mul":
            pro = ("silu_mul", torch.randn(tokens, d, generator=gen).to("cuda", torch.float16))

        def launch(tiling, pro=pro, x=x, router=router, tau=tau):
            if pro is None:
                return fused_router(x, *router, tau, "free", **tiling)
            return fused_input_router(x, pro, router, tau, "free", **tiling)[1:]

        default = default_tiling(d, tokens)
        k_ref, v_ref = launch(default)
        base = time_graph(lambda default=default: launch(default), reps)
        one = time_graph(lambda: launch(IN_LAUNCH_TILING), reps)
        for hb in hbs:
            for nw in warps:
                for c in cols:
                    tiling = dict(hidden_per_program=hb, num_warps=nw, cols_per_program=c)
                    k, v = launch(tiling)
                    same = torch.equal(k, k_ref) or bool(((v_ref - tau).abs() < 1e-4).any())
                    t = time_graph(lambda tiling=tiling: launch(tiling), reps)
                    rows.append(
                        dict(input=name, tokens=tokens, **tiling, us=t, x_default=base / t, x_whole_rows=one / t,
                             same_k=same)
                    )  # fmt: skip
        best = min((r for r in rows if r["input"] == name), key=lambda r: r["us"])
        print(f"{name}, {tokens} token(s): default {base:.2f} us, whole rows one unit a program {one:.2f} us, "
              f"best {best['us']:.2f} us at {best['hidden_per_program']} hidden a program, {best['num_warps']} warps, "
              f"{best['cols_per_program']} columns a program", flush=True)  # fmt: skip
    return rows


def _ints(text):
    return tuple(int(v) for v in text.split(",") if v.strip())


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reps", type=int, default=64, help="site launches per graph")
    ap.add_argument("--sweep", action="store_true", help="time the router launch alone over its tilings")
    ap.add_argument("--out", default=os.environ.get("OUT"), help="folder for router_sweep.csv (with --sweep)")
    ap.add_argument("--hbs", type=_ints, default=(1, 2, 4, 8, 16, 64), help="--sweep: hidden units a program")
    ap.add_argument("--warps", type=_ints, default=(1, 2, 4, 8), help="--sweep: warps a program")
    ap.add_argument("--cols", type=_ints, default=(0,), help="--sweep: input columns a program (0: whole rows)")
    ap.add_argument("--inputs", default="", help="--sweep: ';'-separated names of ROUTER_INPUTS (default all)")
    ap.add_argument("--tokens", type=_ints, default=(1,), help="--sweep: tokens a launch (each count in turn)")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("needs a CUDA GPU", file=sys.stderr)
        return 1
    import pandas as pd

    if args.sweep:
        names = [n for n in args.inputs.split(";") if n]
        unknown = sorted(set(names) - set(ROUTER_INPUTS))
        if unknown:
            ap.error(f"--inputs {unknown} not among {sorted(ROUTER_INPUTS)}")
        df = pd.DataFrame(
            [
                row
                for t in args.tokens
                for row in sweep_rows(args.reps, hbs=args.hbs, warps=args.warps, cols=args.cols, inputs=names, tokens=t)
            ]
        )
        print(f"\n# one router launch (64 hidden, 5 outputs, fp16 inputs), us per launch in a CUDA graph "
              f"of {args.reps}; {torch.cuda.get_device_name()}")  # fmt: skip
        print(df.to_string(index=False, float_format=lambda v: f"{v:.2f}"))
        if args.out:
            Path(args.out).mkdir(parents=True, exist_ok=True)
            df.to_csv(Path(args.out) / "router_sweep.csv", index=False)
        return 0

    rows = []
    for name, (n_in, outs) in SHAPES.items():
        rows.append(one_shape(name, n_in, outs, args.reps))
        print(rows[-1], flush=True)
    print(f"\n# one routed site per token, us per site in a CUDA graph of {args.reps}; {torch.cuda.get_device_name()}")
    print(pd.DataFrame(rows).to_string(index=False, float_format=lambda v: f"{v:.2f}"))
    return 0


if __name__ == "__main__":
    sys.exit(main())

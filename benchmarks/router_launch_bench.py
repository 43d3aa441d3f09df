#!/usr/bin/env python
"""A routed site's one token: its router in its own launch, or inside the one-bit plane launch (``RoutedK.router``).

For each shape (SmolLM2-135M's q/k/v site and gate/up site, LLaMA-3-8B's), one CUDA graph holds ``--reps`` site
launches in a row, each preceded by its router's launch (``fused_router``, then ``RoutedK`` of its values: the
path before the router moved into the launch) or not (the router in the launch). Prints us per site (graph replay
time / reps) and the ratio, from one process; the gate values and outputs of the two are checked equal first.

    python benchmarks/router_launch_bench.py             # on a CUDA GPU
"""

from __future__ import annotations

import argparse
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
    from mobiquant.kernels.triton_router import fused_router

    site, router = site_of(n_in, outs)
    x = torch.randn(1, n_in, device="cuda", dtype=torch.float16)
    buf, inl = router.in_launch(x)
    taus = [torch.tensor(t, device="cuda") for t in (0.2, -0.1, 0.0)[: len(outs)]]
    zero = torch.zeros((), device="cuda")

    def outside():
        _, v = fused_router(x, inl.w1, inl.b1, inl.w2, inl.b2, zero)
        return tb.bitplane_site_bits(x, site, [tb.RoutedK(v, t) for t in taus])

    def inside():
        return tb.bitplane_site_bits(x, site, [tb.RoutedK(buf, t, inl) for t in taus])

    same = torch.equal(outside(), inside())
    t_out, t_in = time_graph(outside, reps), time_graph(inside, reps)
    return dict(shape=name, router_launch_us=t_out, router_in_launch_us=t_in, ratio=t_out / t_in, same_output=same)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reps", type=int, default=64, help="site launches per graph")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("needs a CUDA GPU", file=sys.stderr)
        return 1
    import pandas as pd

    rows = []
    for name, (n_in, outs) in SHAPES.items():
        rows.append(one_shape(name, n_in, outs, args.reps))
        print(rows[-1], flush=True)
    print(f"\n# one routed site per token, us per site in a CUDA graph of {args.reps}; {torch.cuda.get_device_name()}")
    print(pd.DataFrame(rows).to_string(index=False, float_format=lambda v: f"{v:.2f}"))
    return 0


if __name__ == "__main__":
    sys.exit(main())

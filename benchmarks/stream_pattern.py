#!/usr/bin/env python
"""How fast can a one-token GEMV's weight reads go on this card, with the one-bit plane kernel's access pattern?

Separates the memory pattern from the decode arithmetic. For each 8B shape and view, one CUDA graph holds
``--reps`` launches in a row, each over another copy of the weights (``--copies`` copies, together well past L2),
and the replay time / reps is one launch's time in a stream of launches:

* ``gemv``: the package's one-bit plane kernel (``bitplane_linear_bits``, default config), the real thing;
* ``fp16``: cuBLAS ``x @ W.T`` of the fp16 weights;
* ``pat wc``: a kernel with the one-bit plane kernel's grid and loads (stream-K over (row block, group) items,
  ``[BN2, NW]`` word loads of every plane of the view from the word-column-major buffers, ``[P, KW, NPAD / 2]``)
  and no decode: the words are XOR-ed together. What the layout and grid allow when the arithmetic is free;
* ``pat tile``: the same items from a tiled layout ``[P, row blocks, KW, BN2]`` (a row block's words of one plane
  contiguous: 2 KB per group and plane at 128 rows, 4 bits) instead of 256-byte runs 28 KB apart;
* ``flat``: every program XORs a contiguous share of the same bytes (the grid's streaming ceiling).

Columns: us per launch, GB/s of weight bytes (planes and one step/zero word per row and group), % of the copy
bandwidth measured in the same run. Needs only torch and triton and a CUDA GPU:

    PYTHONPATH=$PWD/src python3 benchmarks/stream_pattern.py [--views 2,6] [--out DIR]
"""

from __future__ import annotations

import argparse
import os
import sys
from functools import partial
from pathlib import Path

import torch
import triton
import triton.language as tl

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))

SHAPES = {"gate/up 4096->14336": (14336, 4096), "down 14336->4096": (4096, 14336), "q/o 4096x4096": (4096, 4096)}
SLICES = (3, 1, 1, 1, 1, 1)
GROUP = 128


@triton.jit
def _pattern(w_ptr, out_ptr, PSTRIDE, NPAD2, KW, GPB, TOTAL, G, P: tl.constexpr, BN2: tl.constexpr,
             NW: tl.constexpr, GW: tl.constexpr, TILED: tl.constexpr):  # fmt: skip
    pid = tl.program_id(0)
    item = (pid * TOTAL) // G
    end = ((pid + 1) * TOTAL) // G
    rp = tl.arange(0, BN2)
    wc = tl.arange(0, NW)
    acc = tl.zeros((BN2, NW), dtype=tl.int32)
    while item < end:
        t = item // GPB
        g = item - t * GPB
        for sc in tl.static_range(GW // NW):
            wcs = g * GW + sc * NW + wc
            if TILED:
                offs = t * (KW * BN2) + wcs[None, :] * BN2 + rp[:, None]
            else:
                offs = wcs[None, :] * NPAD2 + t * BN2 + rp[:, None]
            for e in tl.static_range(P):
                acc ^= tl.load(w_ptr + e * PSTRIDE + offs)
        item += 1
    tl.store(out_ptr + pid * BN2 * NW + rp[:, None] * NW + wc[None, :], acc)


@triton.jit
def _flat(w_ptr, out_ptr, TOTAL, G, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    nb = TOTAL // BLOCK
    lo = (pid * nb) // G * BLOCK
    hi = ((pid + 1) * nb) // G * BLOCK
    acc = tl.zeros((BLOCK,), dtype=tl.int32)
    for i in range(lo, hi, BLOCK):
        acc ^= tl.load(w_ptr + i + tl.arange(0, BLOCK))
    tl.store(out_ptr + pid * BLOCK + tl.arange(0, BLOCK), acc)


def graph_time(fns, reps):
    """us per call of ``fns[i % len(fns)]`` for i < reps, replayed from one CUDA graph."""
    for f in fns:
        f()
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for f in fns:
            f()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for i in range(reps):
            fns[i % len(fns)]()
    return triton.testing.do_bench(g.replay, warmup=5, rep=50, return_mode="median") * 1e3 / reps


def copy_bw():
    a = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")
    b = torch.empty_like(a)
    t = graph_time([lambda: b.copy_(a)], 4)
    return 2 * a.numel() / (t * 1e-6)


def main(argv=None):
    from mobiquant.kernels import triton_bitplane as tb

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--views", default="1,2,4,6", help="static views k (planes: 3, 4, 6, 8 of 3-1-1-1-1-1)")
    ap.add_argument("--copies", type=int, default=8)
    ap.add_argument("--reps", type=int, default=32)
    ap.add_argument(
        "--patterns",
        default="64,4,4;64,4,8;64,8,4;128,4,4;128,8,4;32,8,4",
        help="BN2,NW,waves;...: row pairs a program, word columns a load, programs per SM",
    )
    ap.add_argument("--out", default=os.environ.get("OUT"))
    args = ap.parse_args(argv)
    import pandas as pd

    dev = torch.device("cuda")
    sms = torch.cuda.get_device_properties(dev).multi_processor_count
    bw = copy_bw()
    print(
        f"# {torch.cuda.get_device_name()}, {sms} SMs, copy {bw / 1e9:.0f} GB/s, torch {torch.__version__}, "
        f"triton {triton.__version__}"
    )
    rows = []
    views = [int(v) for v in args.views.split(",")]
    pats = [tuple(int(v) for v in p.split(",")) for p in args.patterns.split(";")]
    for name, (n, kin) in SHAPES.items():
        gen = torch.Generator(device=dev).manual_seed(0)
        kw, ng, npad2 = kin // 16, kin // GROUP, -(-n // 128) * 64
        words = [torch.randint(-(2**31), 2**31 - 1, (sum(SLICES), kw, npad2), device=dev, dtype=torch.int32,
                               generator=gen) for _ in range(args.copies)]  # fmt: skip
        sz = torch.randint(0, 0x2C00, (2, ng, npad2), device=dev, dtype=torch.int32, generator=gen)
        sz = sz | (sz << 16)
        bps = [tb.BitPlanes(w, sz, SLICES, GROUP, kin, n) for w in words]
        x = torch.randn(1, kin, device=dev, dtype=torch.float16)
        out = torch.empty(1, n, device=dev, dtype=torch.float16)
        w16 = [torch.randn(n, kin, device=dev, dtype=torch.float16) for _ in range(3)]
        t16 = graph_time([partial(torch.matmul, x, w.t(), out=out) for w in w16], args.reps)
        rows.append(dict(shape=name, mode="fp16 cuBLAS", planes=16, us=t16, bytes=2 * n * kin))
        for k in views:
            p = sum(SLICES[:k])
            nbytes = p * kw * npad2 * 4 + 2 * ng * npad2 * 4
            t = graph_time([partial(tb.bitplane_linear_bits, x, b, k, out=out) for b in bps], args.reps)
            rows.append(dict(shape=name, mode="gemv (package)", planes=p, us=t, bytes=nbytes))
            sink = torch.empty(1 << 22, device=dev, dtype=torch.int32)
            for bn2, nw, waves in pats:
                for tiled in (0, 1):
                    nb = -(-npad2 // bn2)
                    if nb * bn2 != npad2:
                        continue
                    g_all = waves * sms

                    launch = _pattern[(g_all,)]
                    t = graph_time(
                        [partial(launch, w, sink, w.stride(0), npad2, kw, ng, nb * ng, g_all, P=p, BN2=bn2, NW=nw,
                                 GW=GROUP // 16, TILED=tiled, num_warps=4) for w in words],
                        args.reps,
                    )  # fmt: skip
                    mode = f"pat {'tile' if tiled else 'wc'} {2 * bn2}r/{16 * nw}c/{waves}w"
                    rows.append(dict(shape=name, mode=mode, planes=p, us=t, bytes=p * kw * npad2 * 4))
            flat_n = p * kw * npad2
            t = graph_time(
                [partial(_flat[(4 * sms,)], w, sink, flat_n, 4 * sms, BLOCK=2048, num_warps=4) for w in words],
                args.reps,
            )
            rows.append(dict(shape=name, mode="flat 4w", planes=p, us=t, bytes=flat_n * 4))
        for r in rows:
            if "gbs" not in r:
                r["gbs"] = r["bytes"] / (r["us"] * 1e-6) / 1e9
                r["pct_copy"] = 100 * r["bytes"] / (r["us"] * 1e-6) / bw
        del words, bps, w16
        torch.cuda.empty_cache()
    df = pd.DataFrame(rows)
    with pd.option_context("display.width", 200, "display.max_rows", 500):
        print(df.round(2).to_string(index=False))
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        df.to_csv(Path(args.out) / "stream_pattern.csv", index=False)


if __name__ == "__main__":
    main()

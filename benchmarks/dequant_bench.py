#!/usr/bin/env python
"""The dequantize pass of a prompt's forward (``W_k`` written in fp16, then cuBLAS), alone and with its matmul.

Two passes write the same weights: ``dequantize`` reads the checkpoint's planes (``32 // b`` codes a word; the
3-bit base of the default layout gathers each code's word), ``dequantize_bits`` reads the one-bit plane buffers
the one-token kernel decodes from (:class:`BitPlanes`, whole words, coalesced). Each is timed at a few block
shapes for every view, with the bytes it must move (the view's bits, a step and zero a group, the fp16 weight
written) as a share of the copy bandwidth measured first in the same run; then, at ``--tokens``, the pass plus
``torch.matmul`` beside fp16 cuBLAS and torch's int4 matmul (``aten._weight_int4pack_mm``, views of at most 4 bits,
where it exists). CUDA-graph replays (``kernel_bench.bench``), L2 flushed before each call. Every pass is checked
against the first one (the same codes; float rounding apart).

    PYTHONPATH=src python benchmarks/dequant_bench.py [--shapes all] [--tokens 16,64,256] [--out DIR]
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import kernel_bench as kb  # noqa: E402

#: (block_n, block_k, warps) of dequantize (the planes); (row pairs, words, warps) of dequantize_bits
PLANE_CONFIGS = ((32, 128, 4), (64, 128, 4), (16, 128, 4), (32, 128, 8))
BITS_CONFIGS = ((32, 8, 4), (16, 8, 4), (32, 4, 4), (64, 8, 8), (32, 8, 8), (64, 4, 4))


def parse_configs(text: str | None, default):
    if not text:
        return default
    return tuple(tuple(int(v) for v in c.split(",")) for c in text.split(";"))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shapes", default="all", choices=sorted(kb.SHAPE_SETS))
    ap.add_argument("--slices", default="3,1,1,1,1,1")
    ap.add_argument("--views", default=None, help="views to time, e.g. 1,2,6 (default: all)")
    ap.add_argument("--tokens", default="16,64,256", help="token counts of the pass + matmul rows ('' for none)")
    ap.add_argument("--plane-configs", default=None, help="block_n,block_k,warps;... of dequantize")
    ap.add_argument("--bits-configs", default=None, help="row_pairs,words,warps;... of dequantize_bits")
    ap.add_argument("--out", default=os.environ.get("OUT"), help="folder for dequant_bench.csv / dequant_mm.csv")
    a = ap.parse_args(argv)
    tb, copy_bw = kb.gpu_bench_setup("dequant_bench", a.slices)
    import pandas as pd

    from mobiquant.kernels import int4

    bits = kb.SLICE_BITS
    views = [int(v) for v in a.views.split(",")] if a.views else list(range(1, len(bits) + 1))
    pcfgs = parse_configs(a.plane_configs, PLANE_CONFIGS)
    bcfgs = parse_configs(a.bits_configs, BITS_CONFIGS)
    tokens = [int(t) for t in a.tokens.split(",") if t]
    rows, mm_rows = [], []
    for name, n_out, n_in in kb.SHAPE_SETS[a.shapes]:
        planes, scale, zero = kb.make_layer(n_out, n_in)
        bp = tb.pack_bitplanes(planes, scale, zero, bits, kb.GROUP, n_in)
        wbuf = torch.empty(n_out, n_in, dtype=torch.float16, device="cuda")
        ng = -(-n_in // kb.GROUP)
        for k in views:
            nbytes = kb.plane_bytes(n_out, n_in, k) + n_out * ng * 4 + n_out * n_in * 2
            ref = tb.dequantize(planes, scale, zero, bits, kb.GROUP, k, n_in).clone()
            passes = list(passes_for(tb, planes, scale, zero, bp, wbuf, n_in, k, pcfgs, bcfgs))
            for label, fn in passes:
                wbuf.zero_()
                fn()
                err = (wbuf.float() - ref.float()).abs().max().item()
                t = kb.bench(fn)
                row = dict(shape=name, view=k, bits=kb.view_bits(k), kernel=label, us=t, err=err)
                row["gbps"] = nbytes / (t * 1e-6) / 1e9
                row["pct_copy"] = 100 * nbytes / (t * 1e-6) / copy_bw
                rows.append(row)
                print(f"{name:28s} view {k} {label:22s} {t:8.2f} us {row['pct_copy']:5.1f}% copy  err {err:.1e}",
                      flush=True)  # fmt: skip
        # the prompt's forward: the fastest pass of each kind, then cuBLAS, beside fp16 and the int4 op
        best = pd.DataFrame([r for r in rows if r["shape"] == name])
        best["kind"] = best.kernel.str.split().str[0]
        pick = best.groupby("kind").apply(lambda d: d.groupby("kernel").us.sum().idxmin(), include_groups=False)
        w16 = torch.randn(n_out, n_in, device="cuda", dtype=torch.float16) / n_in**0.5
        g4 = int4.op_group(n_in, kb.GROUP)
        for m in tokens:
            x = torch.randn(m, n_in, device="cuda", dtype=torch.float16)
            out = torch.empty(m, n_out, device="cuda", dtype=torch.float16)
            t16 = kb.bench(lambda x=x, out=out, w=w16: torch.matmul(x, w.t(), out=out))
            mrow = dict(shape=name, tokens=m, fp16_us=t16)
            for k in views:
                for kind, label in pick.items():
                    fn = dict(passes_for(tb, planes, scale, zero, bp, wbuf, n_in, k, pcfgs, bcfgs))[label]
                    t = kb.bench(lambda fn=fn, x=x, out=out, w=wbuf: (fn(), torch.matmul(x, w.t(), out=out)))
                    mrow[f"v{k}_{kind}_us"] = t
                    mrow[f"v{k}_{kind}_x_fp16"] = t16 / t
            if g4 is not None and int4.available("cuda"):
                q = torch.randint(0, 16, (n_out, n_in), device="cuda", dtype=torch.int32)
                pack = int4.pack(q)
                sz = torch.ones(n_in // g4, n_out, 2, device="cuda", dtype=torch.bfloat16)
                xb = x.to(torch.bfloat16)
                t4 = kb.bench(lambda xb=xb, p=pack, sz=sz, g=g4: torch.ops.aten._weight_int4pack_mm(xb, p, g, sz))
                mrow.update(int4mm_us=t4, int4mm_x_fp16=t16 / t4)
            mm_rows.append(mrow)
            print(", ".join(f"{c} {v:.2f}" if isinstance(v, float) else f"{c} {v}" for c, v in mrow.items()),
                  flush=True)  # fmt: skip
        planes = scale = zero = bp = wbuf = w16 = None
        torch.cuda.empty_cache()
    df = pd.DataFrame(rows)
    summary = df.pivot_table(index=["shape", "view"], columns="kernel", values="pct_copy")
    with pd.option_context("display.width", 250, "display.max_columns", 40, "display.precision", 1):
        print("\n% of copy bandwidth, by pass\n" + summary.to_string())
        if mm_rows:
            print("\npass + matmul, us\n" + pd.DataFrame(mm_rows).to_string(index=False))
    if a.out:
        os.makedirs(a.out, exist_ok=True)
        df.to_csv(os.path.join(a.out, "dequant_bench.csv"), index=False)
        if mm_rows:
            pd.DataFrame(mm_rows).to_csv(os.path.join(a.out, "dequant_mm.csv"), index=False)
    return 0


def passes_for(tb, planes, scale, zero, bp, wbuf, n_in, k, pcfgs, bcfgs):
    """(label, call) of every pass timed, for view ``k``."""
    for bn, bk, nw in pcfgs:
        yield (
            f"planes {bn}x{bk} w{nw}",
            lambda c=(bn, bk, nw): tb.dequantize(
                planes,
                scale,
                zero,
                kb.SLICE_BITS,
                kb.GROUP,
                k,
                n_in,
                out=wbuf,
                block_n=c[0],
                block_k=c[1],
                num_warps=c[2],
            ),
        )
    for br, bw, nw in bcfgs:
        yield (
            f"bits {br}x{bw} w{nw}",
            lambda c=(br, bw, nw): tb.dequantize_bits(bp, k, out=wbuf, block_r=c[0], block_w=c[1], num_warps=c[2]),
        )


if __name__ == "__main__":
    sys.exit(main())

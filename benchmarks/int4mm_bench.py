#!/usr/bin/env python
"""torch's CUDA int4 weight-only matmul (``aten._weight_int4pack_mm``, the tinygemm kernels gpt-fast decodes with)
beside fp16 cuBLAS and the package's default path at its 3- and 4-bit views, one linear at a time.

The question it answers: would a static view of at most 4 bits decode faster through that op (its codes repacked
once, as ``mobiquant.kernels.int4`` does on the CPU) than through the package's own kernels? The op takes bf16
activations and reads 4 bits a weight with a bf16 step and zero a group (group 128 here, as the package's layers);
its 3-bit view would read 4 bits too. Shapes: LLaMA-3-8B's linears and SmolLM2-135M's (``kernel_bench.py``'s sets),
1-16 tokens, CUDA-graph replays (``kernel_bench.bench``), L2 flushed before each call; the copy bandwidth measured
first in the same run. Each op's output is checked against its own dense weight (relative error printed).

    PYTHONPATH=src python benchmarks/int4mm_bench.py [--tokens 1,2,6,16] [--shapes all]
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import kernel_bench as kb  # noqa: E402


def tinygemm_layer(n_out, n_in, group, gen):
    """Random 4-bit codes with a step and zero a group: the codes, ``[K / g, N, 2]`` scales and zeros, and the dense
    bf16 weight ``(q - 8) s + z`` they stand for."""
    q = torch.randint(0, 16, (n_out, n_in), device="cuda", dtype=torch.int32, generator=gen)
    ng = n_in // group
    s = torch.rand(n_out, ng, device="cuda", generator=gen) * 0.01 + 0.002
    z = (torch.rand(n_out, ng, device="cuda", generator=gen) - 0.5) * 0.02
    w = ((q.float() - 8).view(n_out, ng, group) * s[..., None] + z[..., None]).view(n_out, n_in)
    sz = torch.stack([s.t(), z.t()], -1).to(torch.bfloat16).contiguous()
    return q, sz, w.to(torch.bfloat16)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tokens", default="1,2,6,16")
    ap.add_argument("--shapes", default="all", choices=sorted(kb.SHAPE_SETS))
    ap.add_argument("--slices", default="3,1,1,1,1,1", help="the package's layout (its views of 3 and 4 bits timed)")
    ap.add_argument("--out", default=os.environ.get("OUT"), help="folder for int4mm_bench.csv")
    a = ap.parse_args(argv)
    tb, copy_bw = kb.gpu_bench_setup("int4mm_bench", a.slices)
    import pandas as pd

    from mobiquant.kernels import int4

    views = [k for k in range(1, len(kb.SLICE_BITS) + 1) if kb.view_bits(k) <= 4]
    gen = torch.Generator(device="cuda").manual_seed(0)
    rows = []
    for name, n_out, n_in in kb.SHAPE_SETS[a.shapes]:
        planes, scale, zero = kb.make_layer(n_out, n_in)
        w16 = (torch.randn(n_out, n_in, device="cuda") / math.sqrt(n_in)).half()
        g = next(g for g in (kb.GROUP, 64, 32) if n_in % g == 0)  # the op's groups must tile K (576: 64)
        q, sz, wq = tinygemm_layer(n_out, n_in, g, gen)
        pack = int4.pack(q)  # the package's own pack (kernels/int4.py), checked against the dense weight here
        xc = torch.randn(4, n_in, device="cuda", dtype=torch.bfloat16)
        err = kb.rel_err(torch.ops.aten._weight_int4pack_mm(xc, pack, g, sz), xc.float() @ wq.float().t())
        print(f"# {name}: group {g}, rel. error {err:.1e}")
        if err >= 2e-2:  # the op reads the pack otherwise than kernels/int4.py writes it: no timing of it
            print(f"# {name}: the op's pack format differs from kernels/int4.pack on this torch: rows without it")
            pack = None
        for m in [int(t) for t in a.tokens.split(",")]:
            x = torch.randn(m, n_in, device="cuda", dtype=torch.float16)
            xb = x.to(torch.bfloat16)
            out = torch.empty(m, n_out, device="cuda", dtype=torch.float16)
            t16 = kb.bench(lambda x=x, w=w16, out=out: torch.matmul(x, w.t(), out=out))
            b16 = n_out * n_in * 2 + m * (n_in + n_out) * 2
            row = dict(shape=name, tokens=m, fp16_us=t16, fp16_pct_copy=100 * b16 / (t16 * 1e-6) / copy_bw)
            for k in views:
                bits = kb.view_bits(k)
                t = kb.bench(
                    lambda k=k, x=x, layer=(planes, scale, zero), out=out: tb.bitplane_linear(
                        x, *layer, kb.SLICE_BITS, kb.GROUP, k, out=out
                    )
                )
                nb = kb.min_bytes(n_out, n_in, m, k)
                row[f"ours{bits}_us"] = t
                row[f"ours{bits}_x_fp16"] = t16 / t
                row[f"ours{bits}_pct_copy"] = 100 * nb / (t * 1e-6) / copy_bw
            if pack is not None:
                tt = kb.bench(lambda xb=xb, p=pack, sz=sz, g=g: torch.ops.aten._weight_int4pack_mm(xb, p, g, sz))
                nb4 = n_out * n_in / 2 + n_out * (n_in // g) * 4 + m * (n_in + n_out) * 2
                row.update(
                    int4mm_group=g,
                    int4mm_us=tt,
                    int4mm_x_fp16=t16 / tt,
                    int4mm_pct_copy=100 * nb4 / (tt * 1e-6) / copy_bw,
                )
                for k in views:
                    row[f"ours{kb.view_bits(k)}_x_int4mm"] = tt / row[f"ours{kb.view_bits(k)}_us"]
            rows.append(row)
            print(", ".join(f"{c} {v:.2f}" if isinstance(v, float) else f"{c} {v}" for c, v in row.items()), flush=True)
        planes = scale = zero = w16 = q = sz = wq = pack = None
        torch.cuda.empty_cache()
    df = pd.DataFrame(rows)
    with pd.option_context("display.width", 250, "display.max_columns", 40, "display.precision", 2):
        print(df.to_string(index=False))
    if a.out:
        os.makedirs(a.out, exist_ok=True)
        df.to_csv(os.path.join(a.out, "int4mm_bench.csv"), index=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())

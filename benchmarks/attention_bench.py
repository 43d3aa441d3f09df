#!/usr/bin/env python
"""One decode step's attention for one layer: the lean step's launch against the model's own arithmetic.

For LLaMA-3-8B's heads (32 query heads, 8 key/value heads, head_dim 128) and SmolLM2-135M's (9, 3, 64), one token
at ``--positions`` cached positions: ``kernels.triton_attention.decode_attention`` (rotary embedding, cache write,
attention, the write offset advanced: one launch) unsplit over positions per step x warps, as the package launches
it ('lean default': split past ``SPLIT_ABOVE`` positions of cache), and with the positions split over programs
(``--split-positions``; a second launch combining them, or the last split of each head, ``--combine``), against
what a Hugging Face LLaMA step runs for the same work (the rotary embedding of q and k, two ``index_copy_`` into the
static cache, ``scaled_dot_product_attention`` with grouped heads over the whole cache and its mask), compiled by
``torch.compile``. Each row: a CUDA graph of ``--reps`` layers' launches, each on its own cache, replayed; us per
launch and the ratio against the model's arithmetic timed in the same run. Outputs are checked against the PyTorch
reference first.

    python benchmarks/attention_bench.py                    # on a CUDA GPU
    python benchmarks/attention_bench.py --positions 80 1024
    python benchmarks/attention_bench.py --positions 80 --cache-len 2048 --blocks 128 --warps 4 --split-positions 128
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))

HEADS = {"8b": (32, 8, 128), "smollm2": (9, 3, 64)}


def layers(reps, heads, kv, dim, cache_len, pos, device="cuda", dtype=torch.float16, seed=0):
    """``reps`` layers' inputs: q/k/v of one token, cos/sin, a cache filled up to ``pos``, the offset and mask."""
    g = torch.Generator(device=device).manual_seed(seed)

    def r(*shape):
        return torch.randn(*shape, generator=g, device=device).to(dtype)

    ang = torch.rand(1, dim // 2, generator=g, device=device) * 6.28
    cos, sin = torch.cat([ang.cos()] * 2, -1).to(dtype), torch.cat([ang.sin()] * 2, -1).to(dtype)
    mask = torch.zeros(1, 1, 1, cache_len, dtype=torch.bool, device=device)
    mask[..., : pos + 1] = True
    return [
        dict(
            q=r(1, heads * dim),
            k=r(1, kv * dim),
            v=r(1, kv * dim),
            cos=cos,
            sin=sin,
            keys=r(1, kv, cache_len, dim),
            values=r(1, kv, cache_len, dim),
            offset=torch.tensor(pos, device=device),
            mask=mask,
        )  # fmt: skip
        for _ in range(reps)
    ]


def model_step(L, heads, kv, dim):
    """What a Hugging Face LLaMA step runs for one layer's attention of one token (rotate-half rotary embedding,
    ``index_copy_`` of k and v at the offset, sdpa with grouped heads over the cache and its mask)."""
    import torch.nn.functional as F

    def rot(x):
        return torch.cat((-x[..., dim // 2 :], x[..., : dim // 2]), -1)

    q = L["q"].view(1, 1, heads, dim).transpose(1, 2)
    k = L["k"].view(1, 1, kv, dim).transpose(1, 2)
    v = L["v"].view(1, 1, kv, dim).transpose(1, 2)
    c, s = L["cos"].view(1, 1, 1, dim), L["sin"].view(1, 1, 1, dim)
    q, k = q * c + rot(q) * s, k * c + rot(k) * s
    pos = L["offset"].view(1)
    L["keys"].index_copy_(2, pos, k)
    L["values"].index_copy_(2, pos, v)
    L["offset"].add_(1)
    out = F.scaled_dot_product_attention(q, L["keys"], L["values"], attn_mask=L["mask"], enable_gqa=True)
    return out.transpose(1, 2).reshape(1, heads * dim)


def timed(fn, ls, pos, reps_timed=50):
    """us per launch of ``fn`` over the layers ``ls`` in one CUDA graph (offsets reset before each replay)."""
    offs = [L["offset"] for L in ls]
    start = [torch.tensor(pos, device="cuda") for _ in ls]

    def reset():
        torch._foreach_copy_(offs, start)

    for _ in range(2):
        reset()
        for L in ls:
            fn(L)
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    reset()
    with torch.cuda.graph(g):
        for L in ls:
            fn(L)
    times = []
    for _ in range(reps_timed):
        reset()
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        g.replay()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) * 1e3 / len(ls))
    times.sort()
    return times[len(times) // 2]


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--positions", type=int, nargs="*", default=[80, 1024], help="cached positions before the token")
    ap.add_argument(
        "--cache-len",
        type=int,
        default=None,
        help="positions the cache holds (default: the positions + 64); a cache past SPLIT_ABOVE splits however few "
        "positions are cached",
    )
    ap.add_argument("--reps", type=int, default=32, help="layers (launches) in a graph")
    ap.add_argument(
        "--combine",
        nargs="*",
        choices=("launch", "last"),
        default=["launch", "last"],
        help="how the split rows combine their partials: a second launch, or the last split of each head",
    )
    ap.add_argument("--blocks", type=int, nargs="*", default=[16, 32, 64, 128], help="positions a program step")
    ap.add_argument("--warps", type=int, nargs="*", default=[1, 2, 4, 8])
    ap.add_argument(
        "--split-positions",
        type=int,
        nargs="*",
        default=[64, 128, 256],
        help="also the default block and warps with the positions split over programs of this many (where the cache "
        "holds more), a second launch combining them",
    )
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("attention_bench.py needs a CUDA device")
    import pandas as pd

    from mobiquant.kernels import triton_attention as ta

    rows = []
    print(f"# {torch.cuda.get_device_name()}, torch {torch.__version__}; fp16, one token, us per layer's launch")
    for name, (heads, kv, dim) in HEADS.items():
        for pos in args.positions:
            cache_len = pos + 64 if args.cache_len is None else args.cache_len
            if cache_len <= pos:
                raise SystemExit(f"--cache-len {cache_len} must exceed every --positions value, got {pos}")
            ls = layers(args.reps, heads, kv, dim, cache_len, pos)
            ticket = torch.zeros((), dtype=torch.int32, device="cuda")
            scale = dim**-0.5
            # correctness first: the kernel against the reference on copies
            L = ls[0]
            ref_in = {n: (t.clone() if torch.is_tensor(t) else t) for n, t in L.items()}
            got_in = {n: (t.clone() if torch.is_tensor(t) else t) for n, t in L.items()}
            ref = ta.decode_attention(**ref_in, ticket=None, scale=scale, backend="torch")
            got = ta.decode_attention(**got_in, ticket=ticket, scale=scale)
            err = (got.float() - ref.float()).abs().max().item()
            step = torch.compile(lambda L, h=heads, k=kv, d=dim: model_step(L, h, k, d), dynamic=False)
            base = timed(step, ls, pos)
            rows.append(dict(heads=name, positions=pos, kernel="model's (compiled)", us=base, x_model=1.0, err=0.0))
            for bn in args.blocks:
                for w in args.warps:

                    def lean(L, bn=bn, w=w, ticket=ticket, scale=scale, unsplit=cache_len):
                        return ta.decode_attention(**L, ticket=ticket, scale=scale, block_n=bn, num_warps=w,
                                                   split_above=unsplit)  # fmt: skip

                    t = timed(lean, ls, pos)
                    rows.append(dict(heads=name, positions=pos, kernel=f"lean BN={bn} warps={w}", us=t,
                                     x_model=base / t, err=err))  # fmt: skip

            def lean_default(L, ticket=ticket, scale=scale):  # the package's: split past SPLIT_ABOVE positions
                return ta.decode_attention(**L, ticket=ticket, scale=scale)

            t = timed(lean_default, ls, pos)
            rows.append(dict(heads=name, positions=pos, kernel="lean default", us=t, x_model=base / t, err=err))
            for split, comb in ((sp, c) for sp in args.split_positions if sp < cache_len for c in args.combine):

                def lean_split(L, split=split, comb=comb, ticket=ticket, scale=scale):
                    return ta.decode_attention(**L, ticket=ticket, scale=scale, split_positions=split, split_above=0,
                                               combine=comb)  # fmt: skip

                fresh = {n: (t.clone() if torch.is_tensor(t) else t) for n, t in L.items()}
                fresh["offset"] = torch.tensor(pos, device="cuda")  # (the timed replays left it one past)
                e = (lean_split(fresh).float() - ref.float()).abs().max().item()
                t = timed(lean_split, ls, pos)
                label = f"lean split {split}" + (" last" if comb == "last" else "")
                rows.append(dict(heads=name, positions=pos, kernel=label, us=t, x_model=base / t, err=e))
            print(pd.DataFrame([r for r in rows if r["heads"] == name and r["positions"] == pos]).to_string(
                index=False, float_format=lambda v: f"{v:.3g}"), flush=True)  # fmt: skip


if __name__ == "__main__":
    main()

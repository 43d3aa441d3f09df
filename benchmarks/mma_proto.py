#!/usr/bin/env python
"""Offline count of a tensor-core decode for one-bit planes: can Triton's ``tl.dot`` take the multiply off the ALU?

The one-bit plane kernel spends 4.1-4.5 SASS instructions a code at 4 bits, about one of them the FFMA and 0.5-0.8
the activations (benchmarks/NOTES.md, entry 17). This prototype (P = 4 planes, one row's 32 columns a word: low
half the even columns, high half the odd ones) builds each code's field as the current kernel does (plane shifts,
then bit selects per residue), but in three windows of codes so that every field sits inside an fp16 mantissa,
turns one field word into two fp16 values with one LOP3 (``(F & mask) | 0x64006400``: 1024 + C 2^s in each half),
joins the 16 pairs of a word into the A operand and lets ``tl.dot`` multiply by activations prepared per token
(``x 2^-s``, in the join's order; the 1024 offsets would be removed with each group's activation sum). It is
compiled for sm_90 (``offline_sass.py``'s path) and its main loop counted: counts only, the arithmetic is not
checked (the LOP3s are inline PTX, which Triton's interpreter cannot run).

    python benchmarks/mma_proto.py --block-n 64 --word-cols 8 --warps 4
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

os.environ.pop("TRITON_INTERPRET", None)  # compile, do not interpret

import torch  # noqa: E402
import triton  # noqa: E402
import triton.language as tl  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
import offline_sass as osx  # noqa: E402


@triton.jit
def _pair(g, M: tl.constexpr):
    """``(g & M) | 0x64006400`` (one LOP3) as two fp16: the low and the high half."""
    return tl.inline_asm_elementwise(
        "{ .reg .b32 t; lop3.b32 t, $2, $3, 0x64006400, 0xEA; mov.b32 {$0, $1}, t; }",
        "=h,=h,r,r",
        [g, tl.full(g.shape, M, tl.int32)],
        dtype=(tl.float16, tl.float16),
        is_pure=True,
        pack=1,
    )


@triton.jit
def _sel(f, v, M: tl.constexpr):
    """``M ? v : f`` bitwise (one LOP3)."""
    return tl.inline_asm_elementwise(
        "lop3.b32 $0, $1, $2, $3, 0xB8;",
        "=r,r,r,r",
        [f, tl.full(f.shape, M, tl.int32), v],
        dtype=tl.int32,
        is_pure=True,
        pack=1,
    )


@triton.jit
def _shift(w, S: tl.constexpr):
    if S > 0:
        return w << S
    elif S < 0:
        return w >> (-S)
    else:
        return w


@triton.jit
def _pj(w0, w1, w2, w3, J: tl.constexpr):
    """Code ``J`` of both halves of every word as an fp16 pair ``[BN, NWC, 2]``: fields at bits ``J - OFF ..``,
    ``OFF`` the offset of ``J``'s window (codes 0-6, 7-13, 14-15), so that they fit a mantissa (the shifts and selects
    repeat across the codes of one window and residue and are computed once)."""
    OFF: tl.constexpr = 0 if J < 7 else (7 if J < 14 else 12)
    l0 = _shift(w0, 3 - OFF)
    l1 = _shift(w1, 2 - OFF)
    l2 = _shift(w2, 1 - OFF)
    l3 = _shift(w3, 0 - OFF)
    r: tl.constexpr = J % 4
    f = _sel(l3, l2, 0x11111111 << ((r - OFF + 1) % 4))
    f = _sel(f, l1, 0x11111111 << ((r - OFF + 2) % 4))
    f = _sel(f, l0, 0x11111111 << ((r - OFF + 3) % 4))
    lo, hi = _pair(f, (15 << (J - OFF)) | (15 << (16 + J - OFF)))
    return tl.join(lo, hi)


@triton.jit
def _half(w0, w1, w2, w3, J0: tl.constexpr):
    """Codes ``J0 .. J0 + 7`` as ``[BN, NWC, 2, 2, 2, 2]`` (a binary tree of joins)."""
    return tl.join(
        tl.join(
            tl.join(_pj(w0, w1, w2, w3, J0), _pj(w0, w1, w2, w3, J0 + 1)),
            tl.join(_pj(w0, w1, w2, w3, J0 + 2), _pj(w0, w1, w2, w3, J0 + 3)),
        ),
        tl.join(
            tl.join(_pj(w0, w1, w2, w3, J0 + 4), _pj(w0, w1, w2, w3, J0 + 5)),
            tl.join(_pj(w0, w1, w2, w3, J0 + 6), _pj(w0, w1, w2, w3, J0 + 7)),
        ),
    )


@triton.jit
def mma_proto_kernel(w_ptr, x_ptr, out_ptr, N, PSTRIDE, KW, BN: tl.constexpr, NWC: tl.constexpr):
    """Rows ``[pid BN, (pid + 1) BN)``: ``out [BN, 16] = sum over K of A x'``, ``NWC`` word columns (32 columns
    each) an iteration, x' ``[K, 16]`` (one token in column 0; up to 16 tokens at no extra cost)."""
    pid = tl.program_id(0)
    rows = pid * BN + tl.arange(0, BN)
    acc = tl.zeros((BN, 16), dtype=tl.float32)
    wc0 = tl.arange(0, NWC)
    kk = tl.arange(0, NWC * 32)
    nn = tl.arange(0, 16)
    for kc in range(0, KW, NWC):
        offs = (kc + wc0)[None, :] * N + rows[:, None]
        w0 = tl.load(w_ptr + offs)
        w1 = tl.load(w_ptr + PSTRIDE + offs)
        w2 = tl.load(w_ptr + 2 * PSTRIDE + offs)
        w3 = tl.load(w_ptr + 3 * PSTRIDE + offs)
        a = tl.reshape(tl.join(_half(w0, w1, w2, w3, 0), _half(w0, w1, w2, w3, 8)), (BN, NWC * 32))
        xk = tl.load(x_ptr + (kc * 32 + kk)[:, None] * 16 + nn[None, :])
        acc = tl.dot(a, xk, acc)
    tl.store(out_ptr + rows[:, None] * 16 + nn[None, :], acc)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--block-n", type=int, default=64, help="rows a program")
    ap.add_argument("--word-cols", type=int, default=8, help="word columns (32 columns each) an iteration")
    ap.add_argument("--warps", type=int, default=4)
    ap.add_argument("--n", type=int, default=4096)
    ap.add_argument("--in-features", type=int, default=4096)
    a = ap.parse_args(argv)
    kw_total = a.in_features // 32
    w = torch.zeros(4, kw_total, a.n, dtype=torch.int32)
    x = torch.zeros(a.in_features, 16, dtype=torch.float16)
    out = torch.zeros(a.n, 16, dtype=torch.float32)
    args = (w, x, out, a.n, kw_total * a.n, kw_total)
    ck = osx.compile_sm90(mma_proto_kernel, args, dict(BN=a.block_n, NWC=a.word_cols, num_warps=a.warps))
    sass, res = osx.sass_and_resources(ck)
    codes = a.block_n * a.word_cols * 32 / (32 * a.warps)  # codes a thread handles an iteration
    label = f"mma_proto_kernel BN={a.block_n} NWC={a.word_cols} warps={a.warps} (triton {triton.__version__})"
    osx.report(sass, res, codes, label)
    return 0


if __name__ == "__main__":
    sys.exit(main())

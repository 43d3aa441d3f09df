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
* ``flat``: every program XORs a contiguous share of the same bytes (the grid's streaming ceiling);
* ``proto``: a prototype GEMV, the package's decode with the words by plain loads or by TMA boxes and the group
  loop pipelined over ``S`` stages (``--protos``); its time includes zeroing the fp32 output (row ``memset y``),
  ``err`` its largest difference from the package's output over the largest output; ``hot`` rows read
  one item's words over and over (cache hits): the decode's time without the memory stream.

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

from mobiquant.kernels import triton_bitplane as tb  # noqa: E402

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


# The prototype GEMV: the package's decode (``_bits_fields``, ``_bits_apply``) on its stream-K grid (a program's
# items in segments of one row block, one partial per segment), the words by plain loads or by TMA (a host
# ``TensorDescriptor`` over ``[planes x KW, NPAD / 2]``, one ``[GW, BN2]`` box per plane and group), the group loop
# handed to Triton's pipeliner with ``STAGES``; ``PFD`` > 0: at each group, the lines of the group ``PFD`` ahead
# asked of L2 (``PFL`` 1) or L1 (``PFL`` 2); each segment added into an fp32 output by atomics (a prototype).
@triton.jit
def _pf_lines(w_ptr, sz_ptr, t, g, PSTRIDE, SZSTRIDE, NPAD2, P: tl.constexpr, GW: tl.constexpr, BN2: tl.constexpr,
              PFL: tl.constexpr, ASM: tl.constexpr):  # fmt: skip
    if not ASM:
        return
    PP: tl.constexpr = 1 if P == 1 else (2 if P == 2 else (4 if P <= 4 else 8))
    LN: tl.constexpr = (BN2 + 31) // 32
    e = tl.minimum(tl.arange(0, PP), P - 1)
    r = t * BN2 + tl.arange(0, LN) * 32
    wo = e[:, None, None] * PSTRIDE + (g * GW + tl.arange(0, GW))[None, :, None] * NPAD2 + r[None, None, :]
    so = tl.arange(0, 2)[:, None] * SZSTRIDE + g * NPAD2 + r[None, :]
    if PFL == 1:
        tl.inline_asm_elementwise("prefetch.global.L2 [$1]; mov.u32 $0, 0;", "=r,l", [w_ptr + wo], dtype=tl.int32,
                                  is_pure=False, pack=1)  # fmt: skip
        tl.inline_asm_elementwise("prefetch.global.L2 [$1]; mov.u32 $0, 0;", "=r,l", [sz_ptr + so], dtype=tl.int32,
                                  is_pure=False, pack=1)  # fmt: skip
    else:
        tl.inline_asm_elementwise("prefetch.global.L1 [$1]; mov.u32 $0, 0;", "=r,l", [w_ptr + wo], dtype=tl.int32,
                                  is_pure=False, pack=1)  # fmt: skip
        tl.inline_asm_elementwise("prefetch.global.L1 [$1]; mov.u32 $0, 0;", "=r,l", [sz_ptr + so], dtype=tl.int32,
                                  is_pure=False, pack=1)  # fmt: skip


@triton.jit
def _tma_plane(wdesc, e: tl.constexpr, g, t, KW, P: tl.constexpr, GW: tl.constexpr, BN2: tl.constexpr, prev):
    """Plane ``e``'s ``[BN2, GW]`` words of group ``g``, row block ``t`` by one TMA box (``prev`` past ``P``)."""
    if e < P:
        return tl.trans(wdesc.load([e * KW + g * GW, t * BN2]))
    else:
        return prev


@triton.jit
def _proto_words(w_ptr, wdesc, g, t, rows2, wcol, PSTRIDE, NPAD2, KW, P: tl.constexpr, GW: tl.constexpr,
                 BN2: tl.constexpr, TMA: tl.constexpr):  # fmt: skip
    if TMA:
        w0 = _tma_plane(wdesc, 0, g, t, KW, P, GW, BN2, 0)
        return (
            w0, _tma_plane(wdesc, 1, g, t, KW, P, GW, BN2, w0), _tma_plane(wdesc, 2, g, t, KW, P, GW, BN2, w0),
            _tma_plane(wdesc, 3, g, t, KW, P, GW, BN2, w0), _tma_plane(wdesc, 4, g, t, KW, P, GW, BN2, w0),
            _tma_plane(wdesc, 5, g, t, KW, P, GW, BN2, w0), _tma_plane(wdesc, 6, g, t, KW, P, GW, BN2, w0),
            _tma_plane(wdesc, 7, g, t, KW, P, GW, BN2, w0),
        )  # fmt: skip
    else:
        return tb._bits_load_words(w_ptr, g * GW + wcol, rows2, PSTRIDE, NPAD2, P, True)


@triton.jit
def _shifted(w0, w1, w2, w3, w4, w5, w6, w7, P: tl.constexpr, HI: tl.constexpr):
    """Every plane moved to its field position for the low (or ``HI``) half words (``tb._bits_shift``)."""
    return (
        tb._bits_shift(w0, 0, HI, P), tb._bits_shift(w1, 1, HI, P), tb._bits_shift(w2, 2, HI, P),
        tb._bits_shift(w3, 3, HI, P), tb._bits_shift(w4, 4, HI, P), tb._bits_shift(w5, 5, HI, P),
        tb._bits_shift(w6, 6, HI, P), tb._bits_shift(w7, 7, HI, P),
    )  # fmt: skip


@triton.jit
def _fields_pre(T0, T1, xp_ptr, colw, w0, w1, w2, w3, w4, w5, w6, w7, P: tl.constexpr, ASM: tl.constexpr):
    """``tb._bits_fields`` with the activations prepared once per token (``XPRE``): ``xp`` holds ``x 2^(XE - j)`` in
    fp32 (``j`` the column's place in its word), so a code costs its AND and FMA and an activation one load."""
    l0, l1, l2, l3, l4, l5, l6, l7 = _shifted(w0, w1, w2, w3, w4, w5, w6, w7, P, False)
    h0, h1, h2, h3, h4, h5, h6, h7 = _shifted(w0, w1, w2, w3, w4, w5, w6, w7, P, True)
    FM: tl.constexpr = (1 << P) - 1
    for r in tl.static_range(P):
        f0 = tb._bits_field_word(l0, l1, l2, l3, l4, l5, l6, l7, r, P, ASM)
        f1 = tb._bits_field_word(h0, h1, h2, h3, h4, h5, h6, h7, r, P, ASM)
        for j in tl.static_range(r, 16, P):
            xq = tl.load(xp_ptr + colw + j)[None, :]
            T0 += (f0 & (FM << j)).to(tl.float32, bitcast=True) * xq
            T1 += (f1 & (FM << j)).to(tl.float32, bitcast=True) * xq
    return T0, T1


@triton.jit
def _proto(x_ptr, y_ptr, o_ptr, part_ptr, lock_ptr, N, w_ptr, wdesc, sz_ptr, SZSTRIDE, PSTRIDE, NPAD2, KW, K_IN,
           GPB, TOTAL, G, mult, hk, DET: tl.constexpr,
           GROUP: tl.constexpr, P: tl.constexpr, BN2: tl.constexpr, XE: tl.constexpr, STAGES: tl.constexpr,
           TMA: tl.constexpr, ASM: tl.constexpr, HOT: tl.constexpr, PFD: tl.constexpr, PFL: tl.constexpr,
           XPRE: tl.constexpr = False, xp_ptr=None, xs_ptr=None):  # fmt: skip
    GW: tl.constexpr = GROUP // 16
    pid = tl.program_id(0)
    item = (pid * TOTAL) // G
    end = ((pid + 1) * TOTAL) // G
    wcol = tl.arange(0, GW)
    rp = tl.arange(0, BN2)
    while item < end:
        t = item // GPB
        g_lo = item - t * GPB
        g_hi = tl.minimum(end - t * GPB, GPB)
        if HOT:  # every group reads the first item's words and steps (cache hits): the decode's time alone
            tl_ = t * 0
        else:
            tl_ = t
        rows2 = tl_ * BN2 + rp
        if PFD > 0:
            for gp in range(g_lo, tl.minimum(g_lo + PFD, g_hi)):
                _pf_lines(w_ptr, sz_ptr, tl_, gp, PSTRIDE, SZSTRIDE, NPAD2, P, GW, BN2, PFL, ASM)
        acc0 = tl.zeros((BN2, GW), dtype=tl.float32)
        acc1 = tl.zeros((BN2, GW), dtype=tl.float32)
        for g in tl.range(g_lo, g_hi, num_stages=STAGES):
            if PFD > 0:
                if g + PFD < g_hi:
                    _pf_lines(w_ptr, sz_ptr, tl_, g + PFD, PSTRIDE, SZSTRIDE, NPAD2, P, GW, BN2, PFL, ASM)
            if HOT:  # two groups in turn, so that nothing is hoisted out of the loop
                gg = g & 1
            else:
                gg = g
            w0, w1, w2, w3, w4, w5, w6, w7 = _proto_words(w_ptr, wdesc, gg, tl_, rows2, wcol, PSTRIDE, NPAD2, KW, P,
                                                          GW, BN2, TMA)  # fmt: skip
            T0 = tl.zeros((BN2, GW), dtype=tl.float32)
            T1 = tl.zeros((BN2, GW), dtype=tl.float32)
            xs = tl.zeros((1, GW), dtype=tl.float32)
            if XPRE:
                T0, T1 = _fields_pre(T0, T1, xp_ptr, (g * GW + wcol) * 16, w0, w1, w2, w3, w4, w5, w6, w7, P, ASM)
                xs = tl.zeros((1, GW), dtype=tl.float32) + tl.load(xs_ptr + g) / GW
            else:
                T0, T1, xs, _ = tb._bits_fields(T0, T1, xs, xs, x_ptr, x_ptr, (g * GW + wcol) * 16, K_IN, w0, w1,
                                                w2, w3, w4, w5, w6, w7, P, XE, ASM, True, 0)  # fmt: skip
            sz0, sz1 = tb._bits_load_sz(sz_ptr, gg, rows2, wcol, SZSTRIDE, NPAD2, True)
            acc0, acc1 = tb._bits_apply(acc0, acc1, T0, T1, xs, sz0, sz1, mult, hk)
        rows_o = t * BN2 + rp
        if DET:  # the package's store: partial slots, the last segment to arrive sums them in a fixed order
            p_first = ((t * GPB + 1) * G - 1) // TOTAL
            p_last = ((t + 1) * GPB * G - 1) // TOTAL
            tb._bits_segment_store(acc0, acc1, o_ptr, part_ptr, lock_ptr, o_ptr, rows_o, N, NPAD2, t, pid - p_first,
                                   p_last - p_first + 1, False)  # fmt: skip
        else:
            tl.atomic_add(y_ptr + 2 * rows_o, tl.sum(acc0, 1), sem="relaxed")
            tl.atomic_add(y_ptr + 2 * rows_o + 1, tl.sum(acc1, 1), sem="relaxed")
        item = t * GPB + g_hi


def proto_launch(
    kernel, x, y, bp, k, bn2, stages, tma, waves, sms, hot=0, num_warps=4, pfd=0, pfl=0, out=None, xpre=None
):
    """Launch the prototype for view ``k`` of ``bp``: into ``y`` (fp32, rows padded, zeroed here) by atomics, or
    with ``out`` (fp16) the package's deterministic segment store."""
    from triton.tools.tensor_descriptor import TensorDescriptor

    p = bp.planes_of_view[k - 1]
    b0 = bp.slice_bits[0]
    t_all, kw, npad2 = bp.words.shape
    gw = bp.group_size // 16
    w2d = bp.words.view(t_all * kw, npad2)
    desc = TensorDescriptor(w2d, [t_all * kw, npad2], [npad2, 1], [gw, bn2]) if tma else w2d
    gpb = kw // gw
    total = (npad2 // bn2) * gpb
    g_all = waves * sms
    if out is None:
        y.zero_()
        part, locks = y, y
    else:
        nblk = npad2 // bn2
        part = torch.empty((-(-g_all // nblk) + 2) * 2 * npad2, device=x.device, dtype=torch.float32)
        locks = tb._locks(x.device, nblk)
    kernel[(g_all,)](
        x, y, out if out is not None else y, part, locks, bp.out_features, bp.words, desc, bp.sz, bp.sz.stride(0),
        bp.words.stride(0), npad2, kw, bp.in_features, gpb, total,
        g_all, 2.0 ** (tb._FIELD_S - (p - b0)), (1.0 - 2.0 ** -(p - b0)) / 2, GROUP=bp.group_size, P=p, BN2=bn2,
        XE=149 - tb._FIELD_S, DET=out is not None, STAGES=stages, TMA=tma, ASM=not tb._interpreting(),
        HOT=bool(hot), PFD=pfd, PFL=pfl, XPRE=xpre is not None, xp_ptr=None if xpre is None else xpre[0],
        xs_ptr=None if xpre is None else xpre[1], num_warps=num_warps,
    )  # fmt: skip
    return y


def prepared_x(x, group):
    """``XPRE``'s per-token inputs: ``x 2^(149 - S - j)`` in fp32 (``j`` = column mod 16) and each group's sum."""
    j = torch.arange(x.shape[1], device=x.device) % 16
    xp = (x[0].float() * torch.exp2((149 - tb._FIELD_S - j).float())).contiguous()
    return xp, x[0].float().view(-1, group).sum(1).contiguous()


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
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--views", default="2,6", help="static views k (planes: 3, 4, 6, 8 of 3-1-1-1-1-1)")
    ap.add_argument("--copies", type=int, default=8)
    ap.add_argument("--reps", type=int, default=32)
    ap.add_argument(
        "--patterns",
        default="64,4,4;64,8,4;128,8,4",
        help="BN2,NW,waves;...: row pairs a program, word columns a load, programs per SM",
    )
    ap.add_argument(
        "--protos",
        default="64,1,0,4,0,4,0,0,0;64,1,0,4,1,4,0,0,0;64,1,0,4,0,4,0,0,1;64,1,0,4,1,4,0,0,1",
        help="BN2,stages,tma,waves,hot,warps,pf distance,pf level (1 L2, 2 L1),det[,xpre];...: prototype GEMV configs "
        "(hot: every program reads the first item's words, the decode's time alone; det: the package's partial-sum "
        "store, else fp32 atomics into a zeroed output, the zeroing included in the time; xpre: the activations "
        "prepared once per token, scaled fp32 and group sums, by the host, not timed)",
    )
    ap.add_argument("--package-configs", default="", help="kernel_bench config texts: the package's GEMV with them")
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
    pats = [tuple(int(v) for v in p.split(",")) for p in args.patterns.split(";") if p]
    protos = [tuple(int(v) for v in (p + ",0,0").split(",")[:10]) for p in args.protos.split(";") if p]
    import kernel_bench as kb

    pkg_cfgs = [kb.parse_bits_config(tb, c) for c in args.package_configs.split(";") if c]
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
            for c in pkg_cfgs:
                t = graph_time([partial(tb.bitplane_linear_bits, x, b, k, out=out, config=c) for b in bps], args.reps)
                rows.append(dict(shape=name, mode=f"gemv (package) {kb.bits_tag(c)}", planes=p, us=t, bytes=nbytes))
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
            y = torch.empty(npad2 * 2, device=dev, dtype=torch.float32)
            ref = tb.bitplane_linear_bits(x, bps[0], k).float()[0]
            t = graph_time([y.zero_], args.reps)
            rows.append(dict(shape=name, mode="memset y (in proto)", planes=p, us=t, bytes=0))
            xpre = prepared_x(x, GROUP)
            for bn2, stages, tma, waves, hot, nwarps, pfd, pfl, det, xp in protos:
                cfg = (bn2, stages, tma, waves, sms, hot, nwarps, pfd, pfl, out if det else None, xpre if xp else None)
                proto_launch(_proto, x, y, bps[0], k, *cfg)
                got = out[0].float() if det else y[:n]
                err = float((got - ref).abs().max() / ref.abs().max())
                t = graph_time([partial(proto_launch, _proto, x, y, b, k, *cfg) for b in bps], args.reps)
                how = (
                    f"{'tma' if tma else 'ptr'} S{stages} {2 * bn2}r/{waves}w/{nwarps}wp"
                    + (f" pf{pfd}L{2 if pfl == 1 else 1}" if pfd else "")
                    + (" det" if det else "")
                    + (" xpre" if xp else "")
                )
                mode = f"proto {how}{' hot' if hot else ''}"
                rows.append(dict(shape=name, mode=mode, planes=p, us=t, bytes=nbytes, err=err))
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

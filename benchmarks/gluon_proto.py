#!/usr/bin/env python
"""The fragment-native bit-plane GEMV (``mobiquant.kernels.gluon_fragment``: Gluon, codes decoded two at a time
straight into ``mma.sync``'s A fragment): offline instruction counts, its check against PyTorch and its timings on a
GPU, and a line-by-line PyTorch emulation of its logical operations for the CPU tests.

benchmarks/NOTES.md (entries 17-21): the one-bit plane kernel spends 4.1-4.5 SASS instructions a code at 4 bits, and
Triton's ``tl.dot`` gave no better; this kernel's group loop takes about 1.5 (the package module's docstring has the
pack, the decode and the views). On an H200 (docs/RESULTS.md "The fragment-native Gluon GEMV on the H200") it is
correct at every view, split and config, and 1.13-1.29x the one-bit plane kernel on the 8B gate/up and down.

    python benchmarks/gluon_proto.py                 # compile for sm_90 offline, count the group loop
    python benchmarks/gluon_proto.py --planes 0 --dispatch 3 --stages 3   # a device view, a ring in shared memory
    python benchmarks/gluon_proto.py --check --time  # on a GPU: every view against PyTorch, then the 8B shapes
                                                     # at 3, 4, 6, 8 planes beside the package's one-bit plane
                                                     # kernel at the same views and fp16 cuBLAS (--sweep: every
                                                     # batch, prefetch and split config)
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import triton

from mobiquant.kernels.gluon_fragment import (
    BATCH_GROUPS,
    BLOCK_N,
    GROUP,
    PLANES,
    _launch_args,
    b_slots,
    bulk_problem,
    column_of_k,
    field_planes,
    field_shift,
    frag_gemv,
    frag_gemv_kernel,
    logical_columns,
    pack_fragment,
    prepare_x,
    rotation,
    split_choices,
    unpack_x,
    word_slots,
)

__all__ = [  # re-exported for the CPU tests and the timing helpers below
    "b_slots",
    "column_of_k",
    "field_planes",
    "field_shift",
    "logical_columns",
    "pack_fragment",
    "prepare_x",
    "rotation",
    "unpack_x",
    "word_slots",
]


def _pj_reference(w: list[torch.Tensor], nf: int, j: int) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`_pj`'s bit operations on int64 words (a field's ``nf`` planes, most significant first): the low and
    high 16-bit lanes of code ``j``'s pair."""
    r, rot = j % 4, rotation(j)

    def sel(f, v, m):
        return (f & ~m & 0xFFFFFFFF) | (v & m)

    f = w[nf - 1]
    for e in range(nf - 2, -1, -1):
        f = sel(f, w[e], (0x11111111 << ((r + 3 - e) % 4)) & 0xFFFFFFFF)
    f = ((f >> rot) | (f << (32 - rot))) & 0xFFFFFFFF if rot else f
    sh, fm = field_shift(j), (15 >> (4 - nf)) << (4 - nf)
    t = (f & ((fm << sh) | (fm << (16 + sh)))) | 0x64006400
    return t & 0xFFFF, t >> 16


def decode_reference(words: torch.Tensor, e0: int = 0, nf: int = PLANES) -> torch.Tensor:
    """The A operand the kernel multiplies for the field of planes ``e0 .. e0 + nf - 1``, ``[N, K]`` (float64, the
    weights' column order), from :func:`pack_fragment`'s words by :func:`_pj`'s operations: ``1024 + F 2^s`` at
    column ``column_of_k(8 j + 2 q + par)`` of each group (``F`` the field's 4-bit value, absent planes zero)."""
    _, g, nb, _ = words.shape
    n = nb * BLOCK_N
    slots = word_slots().flatten()
    w = [(words[e][:, :, slots].reshape(g, n, 4).permute(1, 0, 2).reshape(n, g * 4).to(torch.int64) & 0xFFFFFFFF)
         for e in range(e0, e0 + nf)]  # fmt: skip
    a = torch.empty(n, g, GROUP, dtype=torch.float64)
    cols = logical_columns()
    for j in range(16):
        lo, hi = _pj_reference(w, nf, j)
        for par, lane in ((0, lo), (1, hi)):
            a[:, :, cols[j, :, par]] = _halves(lane).reshape(n, g, 4)
    return a.reshape(n, g * GROUP)


def _tree_reference(w: list[torch.Tensor], nf: int, j0: int, d: int) -> torch.Tensor:
    """:func:`_tree` on int64 words ``[128, 4]``: ``join`` is a stack on a new last dimension."""
    if d == 1:
        lo, hi = _pj_reference(w, nf, j0)
        return torch.stack([_halves(lo), _halves(hi)], dim=-1)
    return torch.stack([_tree_reference(w, nf, j0, d // 2), _tree_reference(w, nf, j0 + d // 2, d // 2)], dim=-1)


def _halves(lane: torch.Tensor) -> torch.Tensor:
    return torch.tensor(lane.numpy().astype("uint16").view("float16").astype("float64"))


def kernel_b_loads(x: torch.Tensor, g: int) -> torch.Tensor:
    """Group ``g``'s B halves ``[32 (lane), 32 (register)]`` as :func:`_load_group` loads them from the token ``x``
    (fp16): lane ``l`` of column ``l >> 2`` = ``g % 8`` its activations ``32 (l & 3) + register``, times ``2^-4`` in
    registers 8-15 and 24-31; the other lanes zeros."""
    lane, reg = torch.arange(32)[:, None], torch.arange(32)[None, :]
    v = x[g * GROUP + (lane & 3) * 32 + reg] * torch.where(reg & 8 > 0, 0.0625, 1.0).half()
    return torch.where(lane >> 2 == g % 8, v, torch.zeros((), dtype=v.dtype))


def kernel_group_sums(x: torch.Tensor, g0: int) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`_group_sums` of groups ``g0 .. g0 + 7``: ``off = 1024 sum x 2^-s`` (``s`` 4 at columns ``c & 8``)
    and ``xs = sum x``, from the token ``x`` read as ``[128 (column), 8 (group)]``."""
    xt = x[g0 * GROUP : (g0 + BATCH_GROUPS) * GROUP].reshape(BATCH_GROUPS, GROUP).t()
    xp = torch.where((torch.arange(GROUP)[:, None] >> 3 & 1) == 1, xt * 0.0625, xt)
    return 1024.0 * xp.double().sum(0), xt.double().sum(0)


def emulate_kernel(words, scale, zero, x, planes: int = PLANES) -> torch.Tensor:
    """:func:`frag_gemv_kernel`'s logical operations in PyTorch (float64), line by line, for the view of the first
    ``planes`` planes of one fp16 token ``x``: the B halves each lane loads from ``x`` (:func:`kernel_b_loads`), the
    words' and B's renaming (:func:`_words`, :func:`_b_operand`), each field's pairs, joins and permute into its A
    operand, an accumulator a field over eight groups, the groups' sums (:func:`kernel_group_sums`) and the epilogue.
    What it cannot check is the compiler's placement of those logical tensors in registers."""
    _, g, nb, _ = words.shape
    total = torch.zeros(nb * BLOCK_N, BATCH_GROUPS, dtype=torch.float64)
    fields = field_planes(planes)
    for b in range(nb):
        rows = slice(b * BLOCK_N, (b + 1) * BLOCK_N)
        for g0 in range(0, g, BATCH_GROUPS):
            acc = [torch.zeros(BLOCK_N, BATCH_GROUPS, dtype=torch.float64) for _ in fields]
            for i in range(BATCH_GROUPS):
                v = kernel_b_loads(x, g0 + i).double()  # [lane, register], as loaded
                bop = v.reshape([2] * 10).permute(5, 6, 7, 8, 3, 4, 9, 0, 1, 2).reshape(GROUP, BATCH_GROUPS)
                for f, (e0, nf, _) in enumerate(fields):
                    w = []
                    for e in range(e0, e0 + nf):
                        v = words[e, g0 + i, b].reshape(128, 4)  # [thread, register], as loaded
                        t = v.reshape([2] * 9).permute(7, 0, 1, 8, 2, 3, 4, 5, 6).reshape(128, 4)  # _words
                        w.append(t.to(torch.int64) & 0xFFFFFFFF)
                    t = _tree_reference(w, nf, 0, 16)  # [128, 4, 2, 2, 2, 2, 2]
                    acc[f] += t.permute(0, 6, 5, 4, 3, 1, 2).reshape(BLOCK_N, GROUP) @ bop
            off_g, xs_g = kernel_group_sums(x, g0)
            c = sum((a - off_g) * wt for a, (_, _, wt) in zip(acc, fields, strict=True))
            sc = scale[rows, g0 : g0 + BATCH_GROUPS].double()
            zp = zero[rows, g0 : g0 + BATCH_GROUPS].double()
            total[rows] += sc * (c - zp * xs_g)
    return total.sum(1)


def count(n, k, splits=1, planes=PLANES, batch=BATCH_GROUPS, prefetch=False, dispatch=None, stages=0, package=False,
          routed=False, maxnreg=None, dispatch_to=None):  # fmt: skip
    """Compile for sm_90 without a GPU and print the group loop's instructions a code; ``package``: as the package
    launches it (its step formula for a base slice of 3 bits, fp16 output plus a bias; over splits, the ticket
    epilogue; ``routed``, with a dispatched device view: the kernel counts the view from 5 gate values and a
    threshold, as for the default layout)."""
    from triton.experimental.gluon._runtime import GluonASTSource

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import offline_sass as osx

    g = k // GROUP
    words = torch.zeros(planes or 8, g, n // BLOCK_N, BLOCK_N * 4, dtype=torch.int32)
    sc = torch.zeros(*([8] if planes == 0 else []), n, g, dtype=torch.float16)
    x = torch.zeros(k, dtype=torch.float16)
    out = torch.zeros(n)
    view = torch.zeros(1, dtype=torch.int32) if planes == 0 else planes
    extra = dict(b0=3, n_out=n, bias=out.half(), out_mode=1) if package else {}
    if routed:
        extra.update(views=[3, 4, 5, 6, 7, 8], routed=(torch.zeros(5), torch.zeros(1)))
    if dispatch_to is not None:
        extra.update(dispatch_to=dispatch_to)
    if package and splits > 1:  # the ticket epilogue: the last split of a row block sums the slots
        extra.update(out_mode=2, part=torch.zeros(splits, n), locks=torch.zeros(n // BLOCK_N, dtype=torch.int32))
    out = out.half() if package else out
    args, kw = _launch_args(words, sc, sc, x, out, splits, view, batch, prefetch, dispatch, stages, **extra)
    if maxnreg:
        kw["maxnreg"] = maxnreg
    ck = osx.compile_sm90(frag_gemv_kernel, args, kw, source=GluonASTSource)
    sass, res = osx.sass_and_resources(ck)
    codes = BLOCK_N * GROUP * batch / 128  # codes a thread decodes an iteration of the batch loop
    what = (f"{planes} planes" if planes else "planes read on the device") + f", batch {batch}"
    what += f", {int(prefetch)} group(s) prefetched" if prefetch else ""
    what += f", a body per view from {dispatch} planes" if dispatch else ""
    what += f" to {dispatch_to}" if dispatch_to else ""
    tma = {-1: ", one TMA load a program", -2: ", a TMA load and a barrier a group"}
    what += f", a ring of {stages} groups" if stages > 0 else tma.get(stages, "")
    what += ", the package's launch" if package else ""
    what += ", the view counted from gate values" if routed else ""
    what += f", at most {maxnreg} registers" if maxnreg else ""
    osx.report(sass, res, codes, f"frag_gemv_kernel, {what}, BN={BLOCK_N} (triton {triton.__version__})")
    print(f"  shared memory at launch: {ck.metadata.shared} B")


#: LLaMA-3-8B's one-token GEMV shapes (rows, inputs)
SHAPES = {"q/o 4096x4096": (4096, 4096), "gate/up 14336x4096": (14336, 4096), "down 4096x14336": (4096, 14336)}


#: the views timed and checked on the 8B shapes: the package's default layout [3, 1, 1, 1, 1, 1] at k = 1, 2, 4, 6
VIEWS = (3, 4, 6, 8)
#: (groups an accumulator, groups prefetched) timed at every K split that gives 64 to 4096 programs (and checked)
CONFIGS = ((8, 0), (8, 1), (4, 1), (2, 1), (1, 1), (8, 2), (2, 2))
#: rings of groups in shared memory (cp.async) timed beside the best config
RINGS = (3, 4)
#: the fastest of those on an H200 (2026-12-03, docs/RESULTS.md): (shape, planes) -> (batch, prefetch, K splits);
#: ``--time`` without ``--sweep`` times these only
BEST = {
    **{("q/o 4096x4096", p): (1, True, 32) for p in (3, 4)},
    **{("q/o 4096x4096", p): (2, True, 8) for p in (6, 8)},
    **{("gate/up 14336x4096", p): (8, True, 4) for p in (3, 4)},
    ("gate/up 14336x4096", 6): (8, False, 2),
    ("gate/up 14336x4096", 8): (8, False, 4),
    **{("down 4096x14336", p): (8, True, 14) for p in (3, 4)},
    ("down 4096x14336", 6): (2, True, 8),
    ("down 4096x14336", 8): (8, False, 14),
}


def _random_layer(n, k, gen, planes=PLANES):
    g = k // GROUP
    codes = torch.randint(0, 2**planes, (n, k), generator=gen)
    scale = (torch.rand(n, g, generator=gen) * 0.02 + 0.01).half()
    zero = (torch.rand(n, g, generator=gen) * (2**planes - 1)).half()
    return codes, scale, zero


def _view_reference(codes, scale, zero, x, p):
    """``W x`` in float64 for the view of the first ``p`` planes of 8-bit ``codes``, ``W = scale (C - zero)``."""
    n, k = codes.shape
    c = (codes >> (8 - p)).double().reshape(n, -1, GROUP)
    return ((c - zero.double()[:, :, None]) * scale.double()[:, :, None]).reshape(n, k) @ x.double()


def _rel_error(y, ref):
    """The largest error of ``y`` over the largest output of ``ref``."""
    return float((y.double().cpu() - ref).abs().max() / ref.abs().max())


def check():
    """Each shape (and a small one) against PyTorch in float64, every view of an 8-plane pack (the first ``p``
    planes, their own step and zero point) at every K split: the largest error over the largest output."""
    gen = torch.Generator().manual_seed(0)
    for name, (n, k) in {"small 256x1024": (256, 1024), **SHAPES}.items():
        codes, _, _ = _random_layer(n, k, gen, 8)
        x = torch.randn(k, generator=gen).half()
        words = pack_fragment(codes, 8).cuda()
        views = [_random_layer(n, k, gen, p)[1:] for p in range(1, 9)]  # a step and zero point per view
        scales = torch.stack([v[0] for v in views]).cuda()
        zeros = torch.stack([v[1] for v in views]).cuda()
        for p in range(1, 9) if n == 256 else VIEWS:
            scale, zero = views[p - 1]
            ref = _view_reference(codes, scale, zero, x, p)
            on_device = torch.tensor([p], dtype=torch.int32, device="cuda")
            every = k == 1024 and p in VIEWS
            for batch, prefetch in CONFIGS if every else CONFIGS[:1]:
                for splits in split_choices(k, batch, 32):
                    modes = [(p, scales[p - 1], zeros[p - 1], None, "compiled in"),
                             (on_device, scales, zeros, None, "on the device")]  # fmt: skip
                    modes = [(*m, 0) for m in modes]
                    if p >= 3 and (batch, prefetch) == CONFIGS[1]:
                        modes.append((on_device, scales, zeros, 3, "on the device, a body per view", 0))
                    if (batch, prefetch) == CONFIGS[0]:
                        modes.append((p, scales[p - 1], zeros[p - 1], None, "compiled in, a ring of 3", 3))
                        if p >= 3:
                            modes.append((on_device, scales, zeros, 3, "on the device, a body per view, ring 3", 3))
                    for planes, sc, zp, dispatch, how, stages in modes:
                        y = frag_gemv(words, sc, zp, x.cuda(), None, splits, planes, batch, prefetch, dispatch,
                                      None, stages)  # fmt: skip
                        err = _rel_error(y, ref)
                        print(
                            f"check {name}, {p} planes {how}, batch {batch}, prefetch {int(prefetch)}, {splits} K "
                            f"splits: max |error| / max |ref| = {err:.2e}"
                        )


def time_shapes(copies, reps, sweep=False, deep=False):
    """us per launch in a CUDA graph of ``reps`` launches over ``copies`` weight copies (past L2): this kernel at
    each view of an 8-plane pack (its fastest K split; over splits, each launch's zeroing of the fp32 output timed
    with it), the package's GEMV at the same view of [3, 1, 1, 1, 1, 1] (the same planes; ``SmallConfig()``'s path:
    the fragment kernel where its rule takes it, at ``launch_config``'s config, one launch, else the one-bit plane
    kernel), fp16 cuBLAS. ``config``: the fastest (batch, groups prefetched, K splits)
    of :data:`CONFIGS` (``sweep``) or :data:`BEST`'s at its split and twice it (``deep``: and BEST's batch with two
    groups prefetched). The
    same view read by the kernel on the device (a routed token's path) at that config: ``on_device_us`` whole
    fields with absent planes predicated off, ``dispatch_us`` a compiled body per view of 3-8 planes,
    ``dispatch128_us`` the same capped at 128 registers; ``capped128_us`` the view compiled in, capped so (one group
    prefetched at most); ``ringS_us``: the view compiled in with its words through
    a ring of ``S`` groups in shared memory (``cp.async``) at the best batch and split.
    ``pct_copy``: of the copy bandwidth of ``kernel_bench.copy_bandwidth`` (decode_bench's), measured in the same
    run."""
    from functools import partial

    import pandas as pd

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import stream_pattern as sp
    from mobiquant.kernels import triton_bitplane as tb

    dev = torch.device("cuda")
    print(f"# {torch.cuda.get_device_name()}, torch {torch.__version__}, triton {triton.__version__}, BN={BLOCK_N}")
    from kernel_bench import copy_bandwidth

    bw, _ = copy_bandwidth()
    print(f"# copy bandwidth {bw / 1e9:.0f} GB/s (kernel_bench.copy_bandwidth; in a graph: {sp.copy_bw() / 1e9:.0f})")
    rows = []
    for name, (n, k) in SHAPES.items():
        gen = torch.Generator(device=dev).manual_seed(0)
        g = k // GROUP
        words = [torch.randint(-(2**31), 2**31 - 1, (8, g, n // BLOCK_N, BLOCK_N * 4), device=dev,
                               dtype=torch.int32, generator=gen) for _ in range(copies)]  # fmt: skip
        scales = (torch.rand(8, n, g, device=dev, generator=gen) * 0.02 + 0.01).half()
        zeros = (torch.rand(8, n, g, device=dev, generator=gen) * 15).half()
        x = torch.randn(k, device=dev, dtype=torch.float16)
        out = torch.empty(n, device=dev)
        slices = (3, 1, 1, 1, 1, 1)
        npad2 = -(-n // 128) * 64
        sz = torch.randint(0, 0x2C00, (len(slices), 2, g, npad2), device=dev, dtype=torch.int32, generator=gen)
        sz = sz | (sz << 16)
        bps = [tb.BitPlanes(torch.randint(-(2**31), 2**31 - 1, (sum(slices), k // 16, npad2), device=dev,
                                          dtype=torch.int32, generator=gen), sz, slices, GROUP, k, n)
               for _ in range(copies)]  # fmt: skip
        x2 = x[None]
        o16 = torch.empty(1, n, device=dev, dtype=torch.float16)
        w16 = [torch.randn(n, k, device=dev, dtype=torch.float16, generator=gen) for _ in range(3)]
        t16 = sp.graph_time([partial(torch.matmul, x2, w.t(), out=o16) for w in w16], reps)
        for p in VIEWS:
            sc, zp = scales[p - 1], zeros[p - 1]
            t_split = {}  # (batch, prefetch, splits) -> us; with splits > 1 each launch's zeroing of out timed with it
            for batch, pf in CONFIGS if sweep else [BEST[name, p][:2]]:
                # without sweep: BEST's split and twice it (the kernel's registers, so its programs an SM, changed
                # since BEST was measured)
                for s in split_choices(k, batch, 64) if sweep else [BEST[name, p][2], 2 * BEST[name, p][2]]:
                    if s in split_choices(k, batch, 64) and 64 <= s * n // BLOCK_N <= 4096:
                        fns = [partial(frag_gemv, w, sc, zp, x, out, s, p, batch, pf) for w in words]
                        t_split[batch, pf, s] = sp.graph_time(fns, reps)
            if deep and not sweep:  # two groups in flight: the best's batch at its split and at half of it
                b_, _, s_ = BEST[name, p]
                for s in {s_, max(1, s_ // 2)} & set(split_choices(k, b_, 64)):
                    fns = [partial(frag_gemv, w, sc, zp, x, out, s, p, b_, 2) for w in words]
                    t_split[b_, 2, s] = sp.graph_time(fns, reps)
            best = min(t_split, key=t_split.get)
            on_device = torch.tensor([p], dtype=torch.int32, device=dev)
            t_dev = {}
            for mode, extra in (("on_device_us", {}), ("dispatch_us", dict(dispatch=3)),
                                ("dispatch128_us", dict(dispatch=3, maxnreg=128))):  # fmt: skip
                fns = [partial(frag_gemv, w, scales, zeros, x, out, best[2], on_device, best[0], best[1],
                               **extra) for w in words]  # fmt: skip
                t_dev[mode] = sp.graph_time(fns, reps)
            # the view compiled in at the best config, capped at 128 registers (SmallConfig.fragment_cap's launch)
            fns = [partial(frag_gemv, w, sc, zp, x, out, best[2], p, best[0], min(int(best[1]), 1), maxnreg=128)
                   for w in words]  # fmt: skip
            t_dev["capped128_us"] = sp.graph_time(fns, reps)
            for st in RINGS:  # the words through shared memory instead of the prefetch, at the best batch and split
                fns = [partial(frag_gemv, w, sc, zp, x, out, best[2], p, best[0], False, stages=st)
                       for w in words]  # fmt: skip
                t_dev[f"ring{st}_us"] = sp.graph_time(fns, reps)
            t_pkg = sp.graph_time([partial(tb.bitplane_linear_bits, x2, b, p - 2, out=o16) for b in bps], reps)
            nbytes = n * k * p / 8 + 2 * n * g * 2
            by_cfg = {}
            for (b_, pf, s_), t in t_split.items():
                by_cfg.setdefault(f"b{b_}{'p' * int(pf)}", []).append(f"{s_}:{t:.1f}")
            print(f"{name} {p} planes, us by batch (p: a group prefetched) and splits: "
                  + "; ".join(f"{c} " + " ".join(v) for c, v in by_cfg.items()), flush=True)  # fmt: skip
            rows.append(dict(shape=name, bits=p, gluon_us=t_split[best], config=best, **t_dev,
                             package_us=t_pkg, fp16_us=t16,
                             x_fp16=t16 / t_split[best], x_package=t_pkg / t_split[best],
                             pct_copy=100 * nbytes / (t_split[best] * 1e-6) / bw))  # fmt: skip
            cells = [f"{c}={v:.2f}" if isinstance(v, float) else f"{c}={v}" for c, v in rows[-1].items()]
            print("row " + " ".join(cells), flush=True)
        del words, bps, w16
        torch.cuda.empty_cache()
    df = pd.DataFrame(rows)
    print(df.to_string(index=False, float_format=lambda v: f"{v:.2f}"))
    return df


def tma_run(copies, reps, shapes=None, views=VIEWS, stages=(-1, -2)):
    """Every word of a program by TMA loads issued at once, alone in its own process (a fault cannot take the other
    measurements with it): ``stages`` -1 (one load a plane, one barrier) and -2 (a load and a barrier a group, the
    decode of the first groups under the later ones' stream), each checked against PyTorch in float64 on each shape
    at BEST's batch, every split that fits shared memory, then timed there beside the register path at BEST's config,
    over ``copies`` weight copies. ``shapes``: the names of SHAPES that start with one of these (None: all);
    ``views``: the planes."""
    from functools import partial

    import pandas as pd

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import stream_pattern as sp

    gen = torch.Generator().manual_seed(0)
    rows = []
    for name, (n, k) in SHAPES.items():
        if shapes and not name.startswith(tuple(shapes)):
            continue
        g = k // GROUP
        codes, _, _ = _random_layer(n, k, gen, 8)
        x = torch.randn(k, generator=gen).half()
        words = [pack_fragment(codes, 8).cuda()] + [
            torch.randint(-(2**31), 2**31 - 1, (8, g, n // BLOCK_N, BLOCK_N * 4), dtype=torch.int32, device="cuda")
            for _ in range(copies - 1)
        ]
        for p in views:
            _, scale, zero = _random_layer(n, k, gen, p)
            ref = _view_reference(codes, scale, zero, x, p)
            sc, zp, xc, out = scale.cuda(), zero.cuda(), x.cuda(), torch.empty(n, device="cuda")
            batch, pf, s0 = BEST[name, p]
            base = sp.graph_time([partial(frag_gemv, w, sc, zp, xc, out, s0, p, batch, pf) for w in words], reps)
            for s in split_choices(k, batch, 64):
                if bulk_problem(p, g, s) or not 64 <= s * n // BLOCK_N <= 4096:
                    continue
                for st in stages:
                    y = frag_gemv(words[0], sc, zp, xc, None, s, p, batch, 0, stages=st)
                    err = _rel_error(y, ref)
                    t = sp.graph_time(
                        [partial(frag_gemv, w, sc, zp, xc, out, s, p, batch, 0, stages=st) for w in words], reps
                    )
                    rows.append(dict(shape=name, bits=p, batch=batch, splits=s, stages=st, tma_us=t, best_us=base,
                                     err=err, x_best=base / t))  # fmt: skip
                    print("row " + " ".join(f"{c}={v:.3g}" if isinstance(v, float) else f"{c}={v}"
                                            for c, v in rows[-1].items()), flush=True)  # fmt: skip
        del words
        torch.cuda.empty_cache()
    df = pd.DataFrame(rows)
    print(df.to_string(index=False, float_format=lambda v: f"{v:.3g}"))
    return df


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=4096, help="rows (offline count)")
    ap.add_argument("--in-features", type=int, default=4096, help="inputs (offline count), a multiple of 1024")
    ap.add_argument("--planes", type=int, default=PLANES, choices=range(9),
                    help="planes of the view (count); 0: read on the device, 8 planes packed")  # fmt: skip
    ap.add_argument("--batch", type=int, default=BATCH_GROUPS, choices=(1, 2, 4, 8), help="groups an accumulator")
    ap.add_argument("--dispatch", type=int, default=None, help="--planes 0: a compiled body per view from this many")
    ap.add_argument("--stages", type=int, default=0,
                    help="a ring of this many groups in shared memory (cp.async); -1: a program's words by one "
                    "TMA load; -2: a TMA load and a barrier a group")  # fmt: skip
    ap.add_argument("--routed", action="store_true", help="--dispatch: the view counted from gate values in the kernel")
    ap.add_argument("--dispatch-to", type=int, default=None, help="--dispatch: bodies up to this many planes (a span)")
    ap.add_argument("--package", action="store_true", help="count as the package launches it (fp16 out, bias)")
    ap.add_argument("--prefetch", type=int, nargs="?", const=1, default=0, choices=(0, 1, 2),
                    help="groups whose loads are issued before this one's decode (bare: 1)")  # fmt: skip
    ap.add_argument("--maxnreg", type=int, default=None, help="offline count: registers a thread at most")
    ap.add_argument("--splits", type=int, default=1, help="K splits (offline count; >1: the atomic-add epilogue)")
    ap.add_argument("--check", action="store_true", help="on a GPU: against PyTorch on random codes, 8B shapes")
    ap.add_argument("--time", action="store_true", help="on a GPU: 8B shapes beside the package and fp16 cuBLAS")
    ap.add_argument("--sweep", action="store_true", help="--time: every config of CONFIGS (else BEST's)")
    ap.add_argument("--deep", action="store_true", help="--time: also BEST's batch with two groups prefetched")
    ap.add_argument("--tma", action="store_true",
                    help="on a GPU: a program's words by TMA (stages -1 and -2), checked and timed alone")  # fmt: skip
    ap.add_argument("--tma-stages", default="-1,-2", help="--tma: the TMA modes, by commas")
    ap.add_argument("--shapes", default="", help="--tma: the shapes whose names start so, by commas (empty: all)")
    ap.add_argument("--views", default=",".join(map(str, VIEWS)), help="--tma: the views' planes, by commas")
    ap.add_argument("--copies", type=int, default=8, help="--time: weight copies (past L2)")
    ap.add_argument("--reps", type=int, default=32, help="--time: launches a graph")
    a = ap.parse_args(argv)
    if not (a.check or a.time or a.tma):
        if a.in_features % (GROUP * BATCH_GROUPS) or a.n % BLOCK_N:
            ap.error(f"--in-features must be a multiple of 1024 and --n of {BLOCK_N}")
        if a.splits not in split_choices(a.in_features, a.batch, a.in_features):
            ap.error(f"--splits {a.splits}: {a.in_features} inputs allow {split_choices(a.in_features, a.batch)}")
        count(a.n, a.in_features, a.splits, a.planes, a.batch, a.prefetch, a.dispatch, a.stages, a.package, a.routed,
              a.maxnreg, a.dispatch_to)  # fmt: skip
        return 0
    if not torch.cuda.is_available():
        ap.error("--check, --time and --tma need a CUDA GPU")
    if a.check:
        check()
    if a.time:
        time_shapes(a.copies, a.reps, a.sweep, a.deep)
    if a.tma:
        tma_run(a.copies, a.reps, [v for v in a.shapes.split(",") if v], [int(v) for v in a.views.split(",")],
                [int(v) for v in a.tma_stages.split(",") if v])  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())

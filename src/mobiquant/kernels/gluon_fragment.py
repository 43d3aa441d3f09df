"""A fragment-native one-token GEMV over bit planes (Gluon, ``mma.sync``): two codes decoded per LOP3 straight into
the tensor cores' A fragment.

**Pack** (:func:`pack_fragment`, groups of 128 columns, up to 8 planes, plane 0 the code's most significant bit).
The mma's reduction index ``k = 8 j + 2 q + par`` carries group column ``column_of_k(k)``; word ``q`` (0-3) of a
row, group and plane ``e`` holds, in bit ``(j + 16 par + 3 - e % 4) mod 32``, plane ``e``'s bit of that column's
code: each plane rotated by its
place in its field of four planes. The lane of a quad that owns the fragment pairs of quarter ``q`` loads that word,
so each thread reads only its own codes; a thread's four words of a plane and group (rows ``r, r + 8, r + 64,
r + 72`` of its 128-row block) are consecutive (:func:`word_slots`), one 16-byte load.

**Decode** (``_pj``): per residue ``r`` of ``j`` (mod 4) a bit select per plane past the first makes a field word
holding the 4-bit fields of its 8 codes side by side; rotated right by ``r`` (codes 0-7) or ``r + 8`` (8-15), a
code's field sits at bit 0 or 4 of each half, inside an fp16 mantissa; one LOP3 ``(F & mask) | 0x64006400`` makes
two fp16 values ``1024 + F 2^s`` (``s`` 0 or 4): columns ``k`` and ``k + 1`` of the row, the pair the A fragment
holds in one register.

**Views** (:func:`field_planes`): the view of the first ``p`` planes is two fields, planes 0-3 and 4-7 (absent planes
zero, decoded with a select fewer and a narrower pair mask), each its own accumulator; its code is
``F0 2^(p - 4) + F1 2^(p - 8)``.

**Activations**, read by the kernel from the token itself (:func:`prepare_x` is their tensor form, for the CPU
emulation): ``x' = x 2^-s``, group ``g``'s in column ``g % 8`` of its ``[128, 8]`` B (zeros elsewhere), so eight
groups share one accumulator, a column each. The pack orders a group's columns (:func:`column_of_k`) so that each
lane's 32 halves of B are 32 consecutive activations; per batch of groups the kernel sums ``off = 1024 sum x'`` and
``xs = sum x`` within each warp, into the accumulator's columns. Every batch of groups the kernel adds
``scale mult (acc - off - (zero zm + h) xs)`` per row and column (``W x`` with
``W = scale mult (C - zero zm - h)``: ``mult = 1``, ``zm = 1``, ``h = 0`` for ``W = scale (C - zero)``, and the
package's ``W_k = (s / 2^B) (C_k - 2^B z - (2^B - 1) / 2)`` with ``mult = 2^-B``, ``zm = 2^B``, ``h = (2^B - 1) / 2``),
and sums the columns at the end.

Measured on an H200 (docs/RESULTS.md "The fragment-native Gluon GEMV on the H200"): correct at every view, K split
and config; 1.13-1.29x the one-bit plane kernel on the 8B gate/up and down at 3, 4 and 8 planes, latency-bound.
Needs Gluon (``triton.experimental.gluon``) and a GPU with ``mma.sync`` (sm_80+). ``benchmarks/gluon_proto.py``
holds its CPU emulation, offline counts and timings.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from triton.experimental import gluon
from triton.experimental.gluon import language as ttgl
from triton.experimental.gluon.language.nvidia.ampere import async_copy, mma_v2
from triton.experimental.gluon.language.nvidia.hopper import fence_async_shared, mbarrier, tma

from .epilogue import KINDS, NextInput, chained_product
from .triton_bitplane import BIG_FRAGMENT_LAUNCH, planes_of_views, register_capped
from .triton_router import RouterPartials, prologue_operand

#: a barrier of the CTA's threads: ``thread_barrier`` in triton 3.6, ``barrier`` since
_cta_barrier = getattr(ttgl, "thread_barrier", None) or ttgl.barrier
#: a TMA load into shared memory: ``async_copy_global_to_shared`` in triton 3.6, ``async_load`` since
_tma_load = getattr(tma, "async_load", None) or tma.async_copy_global_to_shared
#: a cp.async copy of each thread's own bytes into shared memory: ``async_copy_global_to_shared`` in triton 3.6,
#: ``async_load`` since (the old name raises)
_cp_async = getattr(async_copy, "async_load", None) or async_copy.async_copy_global_to_shared
#: shared memory views re-read under another shape: ``_reinterpret`` in triton 3.6, ``reinterpret`` since
_REINTERPRET_PUBLIC = hasattr(ttgl.shared_memory_descriptor, "reinterpret")

GROUP = 128
PLANES = 4
BATCH_GROUPS = 8  # groups whose partial sums share one accumulator, one mma column each
BLOCK_N = 128  # rows a program
SHARES: ttgl.constexpr = ttgl.constexpr(8)  # row blocks' router shares the router tail's last program reads at once
NROW: ttgl.constexpr = ttgl.constexpr(1024)  # values of the normed row the router tail's last program scales at once


def field_shift(j: int) -> int:
    """The power of two code ``j``'s field carries once rotated into place: 0 for ``j % 8 < 4``, else 4."""
    return 4 if j % 8 >= 4 else 0


def rotation(j: int) -> int:
    """How far right field word ``F_r`` (``r = j % 4``) is rotated so that code ``j``'s field sits at bit
    :func:`field_shift` of each half: ``r`` for codes 0-7, ``r + 8`` for codes 8-15."""
    return j % 4 + (8 if j >= 8 else 0)


def column_of_k(k: torch.Tensor) -> torch.Tensor:
    """The group column whose product the mma's reduction index ``k`` (0-127) carries: ``k``'s bits 1, 8, 16, 32, 64
    become the column's bits 1-16 and its bits 2, 4 the column's 32, 64, so the 32 halves one lane holds of the B
    operand (:func:`b_slots`) are 32 consecutive activations, loaded by the kernel straight from ``x``."""
    return (k & 1) | (k >> 3 & 1) << 1 | (k >> 4 & 1) << 2 | (k >> 5 & 1) << 3 | (k >> 6 & 1) << 4 | (k >> 1 & 3) << 5


def logical_columns() -> torch.Tensor:
    """``[16, 4, 2]``: the group column of code ``j`` of quarter ``q``'s word, half ``par``: the column the mma's
    ``k = 8 j + 2 q + par`` carries (:func:`column_of_k`)."""
    j, q, par = torch.meshgrid(torch.arange(16), torch.arange(4), torch.arange(2), indexing="ij")
    return column_of_k(8 * j + 2 * q + par)


def word_slots() -> torch.Tensor:
    """``[128, 4]``: where word ``(row, quarter)`` of a 128-row block sits among the block's 512 words of one plane
    and group: thread ``t`` (warp ``row >> 4 & 3``, lane ``4 (row & 7) + quarter``) holds rows ``r, r + 8, r + 64,
    r + 72``, stored as its 4 consecutive words (one 16-byte load)."""
    r = torch.arange(BLOCK_N)[:, None]
    q = torch.arange(4)[None, :]
    return ((r >> 4 & 3) * 32 + (r & 7) * 4 + q) * 4 + ((r >> 3) & 1) + 2 * ((r >> 6) & 1)


def pack_fragment(codes: torch.Tensor, planes: int = PLANES) -> torch.Tensor:
    """Words ``[planes, G, N / 128, 512]`` (int32) of ``planes``-bit ``codes [N, K]`` (K a multiple of 128, N of
    128; plane 0 the most significant bit, planes 1-8): for row ``128 b + r``, group ``g``, quarter ``q``, the word at
    ``[e, g, b, word_slots()[r, q]]``; its bit ``(j + 16 par + 3 - e % 4) mod 32`` is plane ``e``'s bit of the code at
    group column ``8 j + 2 q + par`` (each plane rotated by its place in its field of four planes, so the fields need
    selects only). A view of the first ``p`` planes reads the first ``p`` of these."""
    n, k = codes.shape
    if not 1 <= planes <= 8:
        raise ValueError(f"planes must be 1-8, got {planes}")
    if k % GROUP or n % BLOCK_N or codes.min() < 0 or codes.max() >= 2**planes:
        raise ValueError(
            f"codes must be {planes}-bit with a multiple of {GROUP} columns and of {BLOCK_N} rows, "
            f"got {tuple(codes.shape)} in [{int(codes.min())}, {int(codes.max())}]"
        )
    g, nb = k // GROUP, n // BLOCK_N
    dev = codes.device
    cols = logical_columns().to(dev)  # [16, 4, 2]
    c = codes.reshape(n, g, GROUP)[:, :, cols]  # [N, G, 16, 4, 2]
    base = (torch.arange(16)[:, None, None] + 16 * torch.arange(2)[None, None, :]).expand(16, 4, 2).to(dev)
    slots = word_slots().to(dev)
    words = []
    for e in range(planes):
        pos = (base + 3 - e % 4) % 32
        bits = ((c >> (planes - 1 - e)) & 1).to(torch.int64) << pos  # [N, G, 16, 4, 2]
        w = bits.sum(dim=(2, 4))  # [N, G, 4]: each bit set once
        w = torch.where(w >= 2**31, w - 2**32, w).to(torch.int32).reshape(nb, BLOCK_N, g, 4).permute(2, 0, 1, 3)
        out = torch.empty(g, nb, BLOCK_N * 4, dtype=torch.int32, device=dev)
        out[:, :, slots.flatten()] = w.reshape(g, nb, BLOCK_N * 4)
        words.append(out)
    return torch.stack(words).contiguous()


def field_planes(p: int) -> list[tuple[int, int, float]]:
    """The fields of a view of ``p`` planes: ``(first plane, planes, weight)``, the view's code being the sum of
    each field's 4-bit value (absent low planes zero) times its weight: ``F0 2^(p - 4) + F1 2^(p - 8)``."""
    out = [(0, min(p, 4), 2.0 ** (p - 4))]
    if p > 4:
        out.append((4, p - 4, 2.0 ** (p - 8)))
    return out


def b_slots() -> torch.Tensor:
    """``[128 (group column), 8 (n)]``: where column ``c``'s activation sits among the 1024 halves of one group's
    ``[128, 8]`` B, as ``32 lane + register``: the mma's ``k`` whose column is ``c`` (:func:`column_of_k`) is held by
    lane ``4 n + (k >> 1 & 3)`` of every warp, in register ``k & 1 | (k >> 3 & 1) << 1 | .. | (k >> 6 & 1) << 4``,
    so lane ``4 n + c // 32`` holds columns ``32 (c // 32) ..`` in registers ``c % 32``: one 64-byte run of ``x``."""
    c = torch.arange(GROUP)[:, None]
    n = torch.arange(BATCH_GROUPS)[None, :]
    return (n * 4 + (c >> 5)) * 32 + (c & 31)


def prepare_x(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """What the kernel builds from activations ``x [K]`` (K a multiple of ``128 x 8``), as tensors (the CPU
    emulation's input): ``xb [G, 1024]`` fp16, group ``g``'s B operand (``x 2^-s``, ``s`` 4 at the columns ``c``
    with ``c & 8``, in column ``g % 8``, zeros in the others) at :func:`b_slots`, and per group
    ``off = 1024 sum x 2^-s`` and ``xs = sum x`` (fp32)."""
    k = x.numel()
    g = k // GROUP
    if k % (GROUP * BATCH_GROUPS):
        raise ValueError(f"activations must have a multiple of {GROUP * BATCH_GROUPS} columns, got {k}")
    cols = logical_columns()
    sh = torch.tensor([field_shift(j) for j in range(16)])[:, None, None].expand(16, 4, 2)
    scale = torch.empty(GROUP)
    scale[cols.flatten()] = torch.pow(2.0, -sh.flatten().float())
    xg = x.float().reshape(g, GROUP)
    xp = (xg * scale.to(x.device)).to(torch.float16)
    xb = torch.zeros(g, BATCH_GROUPS * GROUP, dtype=torch.float16, device=x.device)
    slots = b_slots().to(x.device)
    gi = torch.arange(g, device=x.device)
    xb[gi[:, None], slots[:, gi % BATCH_GROUPS].t()] = xp
    return xb, 1024.0 * xp.float().sum(1), xg.sum(1)


def unpack_x(xb: torch.Tensor) -> torch.Tensor:
    """:func:`prepare_x`'s ``x 2^-s`` back in the group's column order, ``[G, 128]`` (group ``g``'s column
    ``g % 8``)."""
    g = xb.shape[0]
    slots = b_slots().to(xb.device)
    gi = torch.arange(g, device=xb.device)
    return xb[gi[:, None], slots[:, gi % BATCH_GROUPS].t()]


@gluon.jit
def _griddep(WAIT: ttgl.constexpr):
    """Programmatic dependent launch (``SmallConfig.pdl``): ``WAIT`` until the kernel before this one has finished and
    its writes are visible (``griddepcontrol.wait``), else let the next kernel start its programs once every program
    of this one has come here (``griddepcontrol.launch_dependents``); a no-op in a launch without the attribute."""
    if WAIT:
        ttgl.inline_asm_elementwise("griddepcontrol.wait; // $0", "=r", [], dtype=ttgl.int32, is_pure=False, pack=1)
    else:
        ttgl.inline_asm_elementwise(
            "griddepcontrol.launch_dependents; // $0", "=r", [], dtype=ttgl.int32, is_pure=False, pack=1
        )


@gluon.jit
def _ask_l2(ptrs):
    """Ask L2 for the lines at ``ptrs`` (``prefetch.global.L2``: no register written, nothing waits on it)."""
    ttgl.inline_asm_elementwise(
        "prefetch.global.L2 [$1]; mov.u32 $0, 0;", "=r,l", [ptrs], dtype=ttgl.int32, is_pure=False, pack=1
    )


@gluon.jit
def _fence():
    """Order this thread's memory operations before and after at the GPU's scope (``fence.acq_rel.gpu``): a chained
    input's flags (:func:`_await_ready`, :func:`_await_count`) are seen set before the input is read."""
    ttgl.inline_asm_elementwise("fence.acq_rel.gpu; // $0", "=r", [], dtype=ttgl.int32, is_pure=False, pack=1)


@gluon.jit
def _doze():
    """Sleep a few hundred nanoseconds (``nanosleep``): a program polling flags leaves the SM's issue slots to the
    launch before, whose programs share the SM."""
    ttgl.inline_asm_elementwise("nanosleep.u32 256; // $0", "=r", [], dtype=ttgl.int32, is_pure=False, pack=1)


@gluon.jit
def _await_ready(rd_ptr, g_lo, GS, CHP: ttgl.constexpr):
    """Wait until the launch before has made groups ``g_lo .. g_lo + GS`` of this launch's input (a chained gated
    product, ``CREAD`` 1: each group's flag at ``rd_ptr`` set by the program that wrote it), then fence: the
    activations are read only after. ``CHP``: a power of 2 from ``GS`` and 128 up."""
    RL: ttgl.constexpr = ttgl.BlockedLayout(size_per_thread=[1], threads_per_warp=[32], warps_per_cta=[4], order=[0])
    o = ttgl.arange(0, CHP, layout=RL)
    m = o < GS
    n = 0
    while n < GS:
        _doze()
        f = ttgl.load(rd_ptr + g_lo + o, mask=m, other=0, volatile=True)
        n = ttgl.sum((f != 0).to(ttgl.int32), axis=0)
    _fence()


@gluon.jit
def _await_count(rd_ptr, n):
    """Wait until the launch before has counted ``n`` row blocks made at ``rd_ptr`` (a chained norm's parts,
    ``CREAD`` 2: every block's outputs times the weight and its sum of squares), then fence."""
    c = 0
    while c < n:
        _doze()
        c = ttgl.load(rd_ptr, volatile=True)
    _fence()


@gluon.jit
def _router_count(part_ptr, b1_ptr, w2_ptr, b2_ptr, t, RS: ttgl.constexpr, RBLK: ttgl.constexpr, RH: ttgl.constexpr,
                  RHP: ttgl.constexpr, R: ttgl.constexpr, ADJ: ttgl.constexpr):  # fmt: skip
    """``k = 1 + #{e : v_e > t}`` of one token from a router launch without its tail (``triton_router.RouterPartials``):
    the ``RS`` column splits' pre-activations (``RBLK`` apart) summed in their order, then :func:`_router_tail`, in
    fp32, every thread of the program the same."""
    HL: ttgl.constexpr = ttgl.BlockedLayout(size_per_thread=[1], threads_per_warp=[32], warps_per_cta=[4], order=[0])
    u = ttgl.arange(0, RHP, layout=HL)
    um = u < RH
    pre = ttgl.load(part_ptr + u, mask=um, other=0.0)
    for sp in ttgl.static_range(1, RS):
        pre += ttgl.load(part_ptr + sp * RBLK + u, mask=um, other=0.0)
    return _router_tail(pre, u, um, b1_ptr, w2_ptr, b2_ptr, t, part_ptr, RH, R, ADJ, False)


@gluon.jit
def _router_tail(pre, u, um, b1_ptr, w2_ptr, b2_ptr, t, v_ptr, RH: ttgl.constexpr, R: ttgl.constexpr,
                 ADJ: ttgl.constexpr, STORE: ttgl.constexpr):  # fmt: skip
    """A router finished from its first layer's pre-activations ``pre`` (units ``u``, ``um`` those that exist):
    ``b1``, the exact GELU, the second layer's ``R`` rows and the policy (``ADJ``: sigmoid plus slice ``e``'s band;
    else a running minimum), in fp32. ``STORE``: each gate value stored at ``v_ptr + e`` (returns 1); else
    ``k = 1 + #{e : v_e > t}``."""
    h = pre + ttgl.load(b1_ptr + u, mask=um, other=0.0).to(ttgl.float32)
    h = 0.5 * h * (1.0 + ttgl.erf(h * 0.7071067811865476))
    kk = 1
    prev = 0.0
    for e in ttgl.static_range(R):
        w = ttgl.load(w2_ptr + e * RH + u, mask=um, other=0.0).to(ttgl.float32)
        se = ttgl.sum(h * w, axis=0) + ttgl.load(b2_ptr + e).to(ttgl.float32)
        if ADJ:
            ve = 1.0 / (1.0 + ttgl.exp(-se)) + 2.0 * (R - 1 - e)
        elif e == 0:
            ve = se
        else:
            ve = ttgl.minimum(prev, se)
        prev = ve
        if STORE:
            ttgl.store(v_ptr + e, ve)
        else:
            kk += (ve > t).to(ttgl.int32)
    return kk


@gluon.jit
def _router_share(yw, pid, N, N_OUT, sq_ptr, w1_ptr, b1_ptr, w2_ptr, b2_ptr, part_ptr, lock_ptr, v_ptr, eps,
                  made_ptr, BN: ttgl.constexpr, R: ttgl.constexpr, RH: ttgl.constexpr, RHP: ttgl.constexpr,
                  ADJ: ttgl.constexpr, NORMED: ttgl.constexpr):  # fmt: skip
    """The router an RMS norm's parts feed (``EPI`` 3, ``epilogue.RouterTail``): row block ``pid``'s share of its
    first layer, ``W1[:, rows] yw`` (``yw``: the block's outputs times the norm's weight, as stored), at
    ``part_ptr + pid * RHP``; the last row block to arrive (a self-resetting ticket at ``lock_ptr``) sums the shares
    (a tile of :data:`SHARES` blocks at a time), scales them by the norm's ``rsqrt(sum(sq) / N_OUT + eps)`` from the
    blocks' sums of squares at ``sq_ptr`` and finishes the router (:func:`_router_tail`) into the gate values at
    ``v_ptr``; ``NORMED`` (``EPI`` 4): it also scales the whole row as stored at ``made_ptr`` (``yw`` of every
    block) into the normed row, in place, so the next launch reads it as it is (no ``rms_scale``)."""
    RL: ttgl.constexpr = ttgl.BlockedLayout(size_per_thread=[1, 8], threads_per_warp=[4, 8], warps_per_cta=[4, 1],
                                            order=[1, 0])  # fmt: skip
    uu = ttgl.arange(0, RHP, layout=ttgl.SliceLayout(1, RL))
    rr = pid * BN + ttgl.arange(0, BN, layout=ttgl.SliceLayout(0, RL))
    yr = ttgl.convert_layout(yw, ttgl.SliceLayout(0, RL)).to(ttgl.float32)
    wm = (uu < RH)[:, None] & (rr < N_OUT)[None, :]
    w1 = ttgl.load(w1_ptr + uu[:, None] * N_OUT + rr[None, :], mask=wm, other=0.0).to(ttgl.float32)
    ttgl.store(part_ptr + pid * RHP + uu, ttgl.sum(w1 * yr[None, :], axis=1))
    _cta_barrier()  # every thread's share (and the block's sum of squares) stored before the release below
    ticket = ttgl.atomic_add(lock_ptr, 1, sem="acq_rel")
    _cta_barrier()
    nb = N // BN
    if ticket == nb - 1:  # the last row block: every share and sum of squares is stored
        # the shares a tile of SHARES row blocks at a time: one round trip to L2 a tile, where a loop of one load a
        # block made as many dependent round trips as blocks (32 for a 4096-wide down launch; 4 tiles)
        TL: ttgl.constexpr = ttgl.BlockedLayout(size_per_thread=[1, 4], threads_per_warp=[2, 16], warps_per_cta=[4, 1],
                                                order=[1, 0])  # fmt: skip
        HL: ttgl.constexpr = ttgl.SliceLayout(0, TL)
        u = ttgl.arange(0, RHP, layout=HL)
        bq = ttgl.arange(0, SHARES, layout=ttgl.SliceLayout(1, TL))
        acc = ttgl.zeros([SHARES, RHP], ttgl.float32, TL)
        for c in range(0, nb, SHARES):
            b = c + bq
            bm = (b[:, None] < nb) & (u[None, :] < RHP)
            acc += ttgl.load(part_ptr + b[:, None] * RHP + u[None, :], mask=bm, other=0.0, cache_modifier=".cg")
        pre = ttgl.sum(acc, axis=0)
        qo = ttgl.arange(0, 128, layout=HL)
        sq = ttgl.zeros([128], ttgl.float32, HL)
        for c in range(0, nb, 128):
            sq += ttgl.load(sq_ptr + c + qo, mask=c + qo < nb, other=0.0, cache_modifier=".cg")
        scale = ttgl.rsqrt(ttgl.sum(sq, axis=0) / N_OUT + eps)
        _router_tail(pre * scale, u, u < RH, b1_ptr, w2_ptr, b2_ptr, 0.0, v_ptr, RH, R, ADJ, True)
        if NORMED:  # the row as the norm makes it: fp16(yw * scale), NROW values a round trip
            NL: ttgl.constexpr = ttgl.BlockedLayout(size_per_thread=[8], threads_per_warp=[32], warps_per_cta=[4],
                                                    order=[0])  # fmt: skip
            no = ttgl.arange(0, NROW, layout=NL)
            for c in range(0, N_OUT, NROW):
                nm = c + no < N_OUT
                row = ttgl.load(made_ptr + c + no, mask=nm, other=0.0, cache_modifier=".cg").to(ttgl.float32)
                ttgl.store(made_ptr + c + no, (row * scale).to(made_ptr.dtype.element_ty), mask=nm)
        ttgl.atomic_xchg(lock_ptr, 0)  # self-resetting


@gluon.jit
def _sel(f, v, M: ttgl.constexpr):
    """``M ? v : f`` bitwise (one LOP3)."""
    return ttgl.inline_asm_elementwise(
        "lop3.b32 $0, $1, $2, $3, 0xB8;",
        "=r,r,r,r",
        [f, ttgl.full(f.shape, M, ttgl.uint32, f.type.layout), v],
        dtype=ttgl.uint32,
        is_pure=True,
        pack=1,
    )


@gluon.jit
def _rot(f, S: ttgl.constexpr):
    """``f`` rotated right by ``S`` (one funnel shift)."""
    if S == 0:
        return f
    else:
        return ttgl.inline_asm_elementwise(
            "shf.r.wrap.b32 $0, $1, $1, $2;",
            "=r,r,r",
            [f, ttgl.full(f.shape, S, ttgl.uint32, f.type.layout)],
            dtype=ttgl.uint32,
            is_pure=True,
            pack=1,
        )


@gluon.jit
def _pair(g, M: ttgl.constexpr):
    """``(g & M) | 0x64006400`` (one LOP3) as two fp16: the low and the high half."""
    return ttgl.inline_asm_elementwise(
        "{ .reg .b32 t; lop3.b32 t, $2, $3, 0x64006400, 0xEA; mov.b32 {$0, $1}, t; }",
        "=h,=h,r,r",
        [g, ttgl.full(g.shape, M, ttgl.uint32, g.type.layout)],
        dtype=(ttgl.float16, ttgl.float16),
        is_pure=True,
        pack=1,
    )


@gluon.jit
def _pj(w0, w1, w2, w3, NF: ttgl.constexpr, J: ttgl.constexpr):
    """Code ``J`` of both halves of every word as an fp16 pair ``[BN, 4, 2]`` of a field of ``NF`` planes (``w0`` its
    most significant; planes past ``NF`` absent, their words unused): the field word of ``J``'s residue (a select a
    plane past the first, shared by the residue's codes), rotated (shared by two codes), then one LOP3 that keeps
    the present planes' bits."""
    r: ttgl.constexpr = J % 4
    if NF == 4:
        f = _sel(w3, w2, 0x11111111 << ((r + 1) % 4))
    elif NF == 3:
        f = w2
    if NF >= 3:
        f = _sel(f, w1, 0x11111111 << ((r + 2) % 4))
    elif NF == 2:
        f = w1
    if NF >= 2:
        f = _sel(f, w0, 0x11111111 << ((r + 3) % 4))
    else:
        f = w0
    f = _rot(f, r + (8 if J >= 8 else 0))
    SH: ttgl.constexpr = 4 if J % 8 >= 4 else 0
    FM: ttgl.constexpr = (15 >> (4 - NF)) << (4 - NF)  # the field bits of the present planes
    lo, hi = _pair(f, (FM << SH) | (FM << (16 + SH)))
    return ttgl.join(lo, hi)


@gluon.jit
def _tree(w0, w1, w2, w3, NF: ttgl.constexpr, J0: ttgl.constexpr, D: ttgl.constexpr):
    if D == 1:
        return _pj(w0, w1, w2, w3, NF, J0)
    else:
        return ttgl.join(_tree(w0, w1, w2, w3, NF, J0, D // 2), _tree(w0, w1, w2, w3, NF, J0 + D // 2, D // 2))


@gluon.jit
def _load_field(wp, PSTRIDE, E0: ttgl.constexpr, NF: ttgl.constexpr, p, DYN: ttgl.constexpr):
    """The raw words (the 16-byte loads' layout) of the field at planes ``E0 ..``: ``NF`` planes (1-4, the rest
    repeat the first, unused) or, with ``DYN``, four planes of which those at or past the device's view ``p`` are
    predicated off (zeros)."""
    if DYN:
        pv = ttgl.full(wp.shape, p, ttgl.int32, wp.type.layout)
        w0 = ttgl.load(wp + E0 * PSTRIDE, mask=pv > E0, other=0)
        w1 = ttgl.load(wp + (E0 + 1) * PSTRIDE, mask=pv > E0 + 1, other=0)
        w2 = ttgl.load(wp + (E0 + 2) * PSTRIDE, mask=pv > E0 + 2, other=0)
        w3 = ttgl.load(wp + (E0 + 3) * PSTRIDE, mask=pv > E0 + 3, other=0)
    else:
        w0 = ttgl.load(wp + E0 * PSTRIDE)
        w1 = w0
        w2 = w0
        w3 = w0
        if NF >= 2:
            w1 = ttgl.load(wp + (E0 + 1) * PSTRIDE)
        if NF >= 3:
            w2 = ttgl.load(wp + (E0 + 2) * PSTRIDE)
        if NF >= 4:
            w3 = ttgl.load(wp + (E0 + 3) * PSTRIDE)
    return w0, w1, w2, w3


@gluon.jit
def _field_operand(ws, NF: ttgl.constexpr, LW: ttgl.constexpr, AL: ttgl.constexpr):
    """The A operand ``[BN, 128]`` of one group's field from its raw words ``ws`` (:func:`_load_field`; ``NF``
    planes present, 4 for a view read on the device, whose absent planes are zeros): renamed into ``LW``, pairs,
    joins, and a permute into the mma's ``k`` order."""
    t = _tree(_words(ws[0], LW), _words(ws[1], LW), _words(ws[2], LW), _words(ws[3], LW), NF, 0, 16)
    a = ttgl.reshape(ttgl.permute(t, [0, 6, 5, 4, 3, 1, 2]), [t.shape[0], 128])  # column 8 j + 2 q + par
    return ttgl.convert_layout(a, AL, assert_trivial=True)  # registers already in place: no data moves


@gluon.jit
def _x_halves(x_ptr, g, xofs, xn, xsc, pro_ptr, s_pro, PRO: ttgl.constexpr):
    """Group ``g``'s B operand halves: the lanes of column ``g % 8`` (``xn``) load their 32 consecutive activations
    (``xofs``) times ``2^-s`` (``xsc``), the others zeros (:func:`b_slots`); ``PRO``: made from ``x`` as they are
    loaded (:func:`_made`)."""
    m = xn == g % 8
    v = ttgl.load(x_ptr + g * 128 + xofs, mask=m, other=0.0)
    if PRO == 1 or PRO == 2:
        v = _made(v, ttgl.load(pro_ptr + g * 128 + xofs, mask=m, other=0.0), s_pro, PRO)
    return v * xsc


@gluon.jit
def _made(v, q, s_pro, PRO: ttgl.constexpr):
    """What a prologue makes of the fp16 activations ``v`` with its operand ``q`` (fp16, ``v``'s layout), rounded as
    the model's own modules round: ``PRO`` 1, an RMS norm (``q`` its weight, ``s_pro`` the row's
    ``rsqrt(mean(x^2) + eps)``): ``q * fp16(v s)``; 2, a gated product (``v`` the gate, ``q`` the up projection):
    ``fp16(silu(v)) * q``."""
    vf = v.to(ttgl.float32)
    if PRO == 1:
        out = (vf * s_pro).to(ttgl.float16) * q
    else:
        out = (vf / (1.0 + ttgl.exp(-vf))).to(ttgl.float16) * q
    return out


@gluon.jit
def _load_group(w_ptr, x_ptr, vofs, xofs, xn, xsc, g, NB, PSTRIDE, P: ttgl.constexpr, p, WAIT: ttgl.constexpr,
                pro_ptr, s_pro, PRO: ttgl.constexpr):  # fmt: skip
    """Group ``g``'s raw words (field 0, field 1 when the view may reach it) and its B operand's halves
    (:func:`_x_halves`); ``WAIT``: the words asked for first, then the kernel before awaited (:func:`_griddep`),
    then the activations."""
    wp = w_ptr + g * NB * 512 + vofs
    if not WAIT:
        xv = _x_halves(x_ptr, g, xofs, xn, xsc, pro_ptr, s_pro, PRO)
    f0 = _load_field(wp, PSTRIDE, 0, min(P, 4) if P > 0 else 4, p, P == 0)
    if P == 0 or P > 4:
        f1 = _load_field(wp, PSTRIDE, 4, P - 4 if P > 0 else 4, p, P == 0)
    else:
        f1 = f0
    if WAIT:
        _griddep(True)
        xv = _x_halves(x_ptr, g, xofs, xn, xsc, pro_ptr, s_pro, PRO)
    return f0, f1, xv


@gluon.jit
def _words(v, LW: ttgl.constexpr):
    """A thread's loaded words ``[128 (thread), 4 (register)]`` as ``[128 (row), 4 (quarter)]`` in ``LW``: thread
    bits are quarter 0-1, rows 1-4 and 16-32 (lanes, warps), registers rows 8 and 64 (a renaming, no data moves)."""
    t = ttgl.reshape(v, [2, 2, 2, 2, 2, 2, 2, 2, 2])  # t6 t5 t4 t3 t2 t1 t0 g1 g0
    t = ttgl.permute(t, [7, 0, 1, 8, 2, 3, 4, 5, 6])  # r6=g1 r5=t6 r4=t5 r3=g0 r2=t4 r1=t3 r0=t2 q1=t1 q0=t0
    w = ttgl.reshape(t, [128, 4])
    return ttgl.convert_layout(w, LW, assert_trivial=True).to(ttgl.uint32, bitcast=True)


@gluon.jit
def _b_operand(v, BL: ttgl.constexpr):
    """A lane's loaded halves ``[32 (lane), 32 (register)]`` as ``B [128 (k), 8 (n)]`` in ``BL``: lane bits are
    ``k`` 2, 4 and ``n`` 1, 2, 4; register bits ``k`` 1, 8, 16, 32, 64 (a renaming, no data moves)."""
    t = ttgl.reshape(v, [2, 2, 2, 2, 2, 2, 2, 2, 2, 2])  # l4 l3 l2 l1 l0 g4 g3 g2 g1 g0
    t = ttgl.permute(t, [5, 6, 7, 8, 3, 4, 9, 0, 1, 2])  # k64 k32 k16 k8 k4 k2 k1 n4 n2 n1
    return ttgl.convert_layout(ttgl.reshape(t, [128, 8]), BL, assert_trivial=True)


@gluon.jit
def _stage_issue(smem, w_ptr, vofs, g, slot, NB, PSTRIDE, NPL: ttgl.constexpr, SSTRIDE: ttgl.constexpr):
    """``cp.async`` of group ``g``'s first ``NPL`` planes (each thread its own 16 bytes a plane) into ring slot
    ``slot`` (``SSTRIDE`` planes a slot), then one commit group."""
    wp = w_ptr + g * NB * 512 + vofs
    for e in ttgl.static_range(NPL):
        _cp_async(smem.index(slot * SSTRIDE + e), wp + e * PSTRIDE)
    async_copy.commit_group()


@gluon.jit
def _smem_field(smem, base, stride, E0: ttgl.constexpr, NF: ttgl.constexpr, VL: ttgl.constexpr):
    """:func:`_load_field`'s raw words of a field read back from shared memory (each thread its own): plane ``e`` at
    ``smem.index(base + e stride)``: a ring slot's planes (``stride`` 1), or a group's in :func:`_bulk_load`'s."""
    w0 = smem.index(base + E0 * stride).load(VL)
    w1 = w0
    w2 = w0
    w3 = w0
    if NF >= 2:
        w1 = smem.index(base + (E0 + 1) * stride).load(VL)
    if NF >= 3:
        w2 = smem.index(base + (E0 + 2) * stride).load(VL)
    if NF >= 4:
        w3 = smem.index(base + (E0 + 3) * stride).load(VL)
    return w0, w1, w2, w3


@gluon.jit
def _group_sums(x_ptr, c0, g0, BATCH: ttgl.constexpr, XL: ttgl.constexpr, MMA: ttgl.constexpr, pro_ptr, s_pro,
                PRO: ttgl.constexpr):  # fmt: skip
    """Per column ``n`` of the batch's accumulator (group ``c0 + n``, zeros outside ``g0 .. g0 + BATCH``):
    ``off = 1024 sum x 2^-s`` and ``xs = sum x`` over the group, read from ``x`` as ``[128, 8]`` in ``XL`` (the
    columns where the accumulator's are, each warp whole): the sums stay inside a warp and land in its columns."""
    kk = ttgl.arange(0, 128, layout=ttgl.SliceLayout(1, XL))
    nn = ttgl.arange(0, 8, layout=ttgl.SliceLayout(0, XL))
    gc = c0 + nn
    ptr = x_ptr + gc[None, :] * 128 + kk[:, None]
    if BATCH == 8:
        xt = ttgl.load(ptr)
        if PRO == 1 or PRO == 2:
            xt = _made(xt, ttgl.load(pro_ptr + gc[None, :] * 128 + kk[:, None]), s_pro, PRO)
    else:
        gm = ttgl.full([128, 8], 0, ttgl.int32, XL) + gc[None, :]
        gmask = (gm >= g0) & (gm < g0 + BATCH)
        xt = ttgl.load(ptr, mask=gmask, other=0.0)
        if PRO == 1 or PRO == 2:
            xt = _made(xt, ttgl.load(pro_ptr + gc[None, :] * 128 + kk[:, None], mask=gmask, other=0.0), s_pro, PRO)
    xp = ttgl.where(((kk >> 3) & 1)[:, None] == 1, xt * 0.0625, xt)
    off = ttgl.sum(xp.to(ttgl.float32), axis=0) * 1024.0
    xs = ttgl.sum(xt.to(ttgl.float32), axis=0)
    sl: ttgl.constexpr = ttgl.SliceLayout(0, MMA)
    return ttgl.convert_layout(off, sl, assert_trivial=True), ttgl.convert_layout(xs, sl, assert_trivial=True)


@gluon.jit
def _bulk_load(desc, pid, g_lo, P: ttgl.constexpr, PP: ttgl.constexpr, GSC: ttgl.constexpr, PUBLIC: ttgl.constexpr,
               PER_GROUP: ttgl.constexpr):  # fmt: skip
    """Every word a program reads, planes ``0 .. P`` of its ``GSC`` groups, by TMA loads into shared memory
    (``desc``: the pack as ``[planes, G, NB * 2, 256]``; a box's sides are powers of 2, as are a buffer's, hence
    ``PP``, the power of 2 from ``P`` up). Without ``PER_GROUP``: one load a plane (a box of all ``GSC`` groups), all
    waited for here on one mbarrier. With it: one load a plane and group (a box of one group), each group's planes on
    an mbarrier of its own, waited for by the decode just before it reads that group (:func:`_view_total`), so the
    decode of the first groups runs while the later ones stream in. Returns the words as ``[PP * GSC, 128, 4]``
    (plane ``e`` of the program's group ``j`` at ``e * GSC + j``; a thread's 4 words consecutive, as in registers) and
    the barriers (``[GSC, 1]``; with one barrier, already waited for)."""
    SL4: ttgl.constexpr = ttgl.NVMMASharedLayout(swizzle_byte_width=0, element_bitwidth=32, rank=4)
    buf = ttgl.allocate_shared_memory(ttgl.int32, [PP, GSC, 2, 256], SL4)
    if PER_GROUP:
        bars = ttgl.allocate_shared_memory(ttgl.int64, [GSC, 1], mbarrier.MBarrierLayout())
        for j in ttgl.static_range(GSC):
            mbarrier.init(bars.index(j), count=1)
        fence_async_shared()
        for j in ttgl.static_range(GSC):
            mbarrier.expect(bars.index(j), P * 2048)
            for e in ttgl.static_range(P):
                _tma_load(desc, [e, g_lo + j, pid * 2, 0], bars.index(j), buf.slice(e, 1).slice(j, 1, dim=1))
    else:
        bars = ttgl.allocate_shared_memory(ttgl.int64, [1, 1], mbarrier.MBarrierLayout())
        bar = bars.index(0)
        mbarrier.init(bar, count=1)
        fence_async_shared()
        mbarrier.expect(bar, P * GSC * 2048)
        for e in ttgl.static_range(P):
            _tma_load(desc, [e, g_lo, pid * 2, 0], bar, buf.slice(e, 1))
        mbarrier.wait(bar, 0)
    RL: ttgl.constexpr = ttgl.SwizzledSharedLayout(vec=1, per_phase=1, max_phase=1, order=[1, 0])
    if PUBLIC:
        flat = buf.reinterpret(ttgl.int32, [PP * GSC, 128, 4], RL)
    else:
        flat = buf._reinterpret(ttgl.int32, [PP * GSC, 128, 4], RL)
    return flat, bars


@gluon.jit
def _view_total(w_ptr, s_ptr, z_ptr, x_ptr, vofs, xofs, xn, xsc, ro, no, NB, PSTRIDE, G, g_lo, GS, p, mult,
                zm, hk, P: ttgl.constexpr, W0: ttgl.constexpr, W1: ttgl.constexpr, BN: ttgl.constexpr,
                BATCH: ttgl.constexpr, PREFETCH: ttgl.constexpr, LW: ttgl.constexpr, AL: ttgl.constexpr,
                BL: ttgl.constexpr, MMA: ttgl.constexpr, smem, STAGES: ttgl.constexpr, SSTRIDE: ttgl.constexpr,
                VL: ttgl.constexpr, XL: ttgl.constexpr, GSC: ttgl.constexpr, bars, WAIT: ttgl.constexpr, lofs,
                AHEAD: ttgl.constexpr, pro_ptr, s_pro, PRO: ttgl.constexpr):  # fmt: skip
    """A program's ``[BN, 8]`` sums over groups ``g_lo .. g_lo + GS`` (their columns summed by the caller) of the
    view of ``P`` planes (compiled in) or, ``P == 0``, of ``p`` read on the device (whole fields, absent planes
    predicated off). ``STAGES`` > 0 (``P`` > 0): the words stream through a ring of that many groups in shared
    memory (``cp.async``, ``STAGES - 1`` groups in flight ahead of the decode) instead of registers; -1: all ``GSC``
    groups' words are in ``smem`` already (:func:`_bulk_load`), the activations one group ahead in registers; -2: as
    -1, but each group is waited for on its own barrier of ``bars`` just before its decode. ``WAIT``
    (``SmallConfig.pdl``): the kernel before is awaited after the first words are asked for, before any activation
    is read. ``AHEAD`` > 0 (``P`` > 0, words through registers): at each group, the ``P`` planes of the group ``AHEAD``
    later (the last one past the end) asked of L2 (each thread its own 16 bytes a plane, ``lofs``), so later groups
    stream while this one decodes without registers held for them."""
    if P == 0:
        w0 = (1 << (p + 4)).to(ttgl.float32) * (1.0 / 256.0)  # 2^(p - 4)
    total = ttgl.zeros([BN, 8], ttgl.float32, MMA)
    g_last = g_lo + GS - 1
    if STAGES > 0:
        for s in ttgl.static_range(STAGES - 1):
            _stage_issue(smem, w_ptr, vofs, ttgl.minimum(g_lo + s, g_last), s, NB, PSTRIDE, P, SSTRIDE)
        if WAIT:
            _griddep(True)
    elif STAGES < 0:
        if WAIT:
            _griddep(True)
        xnx = _x_halves(x_ptr, g_lo, xofs, xn, xsc, pro_ptr, s_pro, PRO)
    elif PREFETCH:
        nxt = _load_group(w_ptr, x_ptr, vofs, xofs, xn, xsc, g_lo, NB, PSTRIDE, P, p, WAIT, pro_ptr, s_pro, PRO)
        if PREFETCH >= 2:
            g1 = ttgl.minimum(g_lo + 1, g_last)
            nxt2 = _load_group(w_ptr, x_ptr, vofs, xofs, xn, xsc, g1, NB, PSTRIDE, P, p, False, pro_ptr, s_pro, PRO)
    elif WAIT:
        _griddep(True)
    for g0 in range(g_lo, g_lo + GS, BATCH):
        acc = ttgl.zeros([BN, 8], ttgl.float32, MMA)  # column n: group g0 - g0 % 8 + n's sum of F0 x'
        acc1 = ttgl.zeros([BN, 8], ttgl.float32, MMA)  # and of F1 x' (P > 4)
        for i in ttgl.static_range(BATCH):
            if AHEAD > 0 and P > 0 and STAGES == 0:
                wa = w_ptr + ttgl.minimum(g0 + i + AHEAD, g_last) * NB * 512 + lofs
                for e in ttgl.static_range(P):
                    _ask_l2(wa + e * PSTRIDE)
            if STAGES > 0:
                j = g0 + i - g_lo
                _stage_issue(smem, w_ptr, vofs, ttgl.minimum(g0 + i + STAGES - 1, g_last), (j + STAGES - 1) % STAGES,
                             NB, PSTRIDE, P, SSTRIDE)  # fmt: skip
                async_copy.wait_group(STAGES - 1)  # group g0 + i's copies have landed
                f0 = _smem_field(smem, (j % STAGES) * SSTRIDE, 1, 0, min(P, 4), VL)
                f1 = f0
                if P > 4:
                    f1 = _smem_field(smem, (j % STAGES) * SSTRIDE, 1, 4, P - 4, VL)
                cur = (f0, f1, _x_halves(x_ptr, g0 + i, xofs, xn, xsc, pro_ptr, s_pro, PRO))
            elif STAGES < 0:
                j = g0 + i - g_lo
                if STAGES == -2:  # this group's planes have landed
                    mbarrier.wait(bars.index(j), 0)
                f0 = _smem_field(smem, j, GSC, 0, min(P, 4), VL)
                f1 = f0
                if P > 4:
                    f1 = _smem_field(smem, j, GSC, 4, P - 4, VL)
                cur = (f0, f1, xnx)
                xnx = _x_halves(x_ptr, ttgl.minimum(g0 + i + 1, g_last), xofs, xn, xsc, pro_ptr, s_pro, PRO)
            elif PREFETCH >= 2:  # two groups in flight under this one's decode
                cur = nxt
                nxt = nxt2
                g2 = ttgl.minimum(g0 + i + 2, g_last)
                nxt2 = _load_group(w_ptr, x_ptr, vofs, xofs, xn, xsc, g2, NB, PSTRIDE, P, p, False, pro_ptr, s_pro, PRO)
            elif PREFETCH:
                cur = nxt
                g1 = ttgl.minimum(g0 + i + 1, g_last)
                nxt = _load_group(w_ptr, x_ptr, vofs, xofs, xn, xsc, g1, NB, PSTRIDE, P, p, False, pro_ptr, s_pro, PRO)
            else:
                cur = _load_group(
                    w_ptr, x_ptr, vofs, xofs, xn, xsc, g0 + i, NB, PSTRIDE, P, p, False, pro_ptr, s_pro, PRO
                )
            xb = _b_operand(cur[2], BL)  # x' in column (g0 + i) % 8 only
            if P == 0:
                acc = mma_v2(_field_operand(cur[0], 4, LW, AL), xb, acc)
                if p > 4:
                    acc1 = mma_v2(_field_operand(cur[1], 4, LW, AL), xb, acc1)
            else:
                acc = mma_v2(_field_operand(cur[0], min(P, 4), LW, AL), xb, acc)
                if P > 4:
                    acc1 = mma_v2(_field_operand(cur[1], P - 4, LW, AL), xb, acc1)
        c0 = g0 - g0 % 8
        gcol = c0 + no
        if BATCH == 8:
            sc = ttgl.load(s_ptr + ro[:, None] * G + gcol[None, :]).to(ttgl.float32)
            zp = ttgl.load(z_ptr + ro[:, None] * G + gcol[None, :]).to(ttgl.float32)
        else:  # the columns of this batch's groups only (the others' steps read as zeros)
            cm = (gcol >= g0) & (gcol < g0 + BATCH)
            sc = ttgl.load(s_ptr + ro[:, None] * G + gcol[None, :], mask=cm[None, :], other=0.0).to(ttgl.float32)
            zp = ttgl.load(z_ptr + ro[:, None] * G + gcol[None, :], mask=cm[None, :], other=0.0).to(ttgl.float32)
        off, xs = _group_sums(x_ptr, c0, g0, BATCH, XL, MMA, pro_ptr, s_pro, PRO)
        off = off[None, :]
        if P == 0:
            c = (acc - off) * w0
            if p > 4:
                c += (acc1 - off) * (w0 * (1.0 / 16.0))
        else:
            c = (acc - off) * W0
            if P > 4:
                c += (acc1 - off) * W1
        total += (sc * mult) * (c - (zp * zm + hk) * xs[None, :])
    return total


@gluon.jit
def _epilogue(yo, out_ptr, ro, pid, N, N_OUT, ep_w_ptr, ep_out_ptr, ep_sq_ptr, w1_ptr, b1_ptr, w2_ptr, b2_ptr,
              part_ptr, lock_ptr, v_ptr, eps, BN: ttgl.constexpr, EPI: ttgl.constexpr, ER: ttgl.constexpr,
              ERH: ttgl.constexpr, ERHP: ttgl.constexpr, ERADJ: ttgl.constexpr, mk_ptr,
              CMAKE: ttgl.constexpr):  # fmt: skip
    """What the program that wrote row block ``pid``'s outputs ``yo`` (``out_ptr + ro``) makes of them for the next
    launch (the kernel's ``EPI``): 1, the next RMS norm's parts; 3, those and the router on the norm's output
    (:func:`_router_share`: its layers, shares, ticket, gate values and the norm's ``eps``); 4, as 3, the parts then
    scaled into the normed row by the last row block; 2, a gated MLP's product, by the later program of each gate /
    up pair of row blocks. ``CMAKE`` (a chained next input, ``SmallConfig.fragment_chain``): 1 (EPI 2), the pair's
    flag at ``mk_ptr`` set once its product is stored: the chained down launch reads that group once set; 2 (EPI 1),
    the block counted at ``mk_ptr`` once its parts are stored: the chained next launch reads them at the count of
    every block."""
    m = ro < N_OUT
    if EPI == 1 or EPI >= 3:
        w = ttgl.load(ep_w_ptr + ro, mask=m, other=0.0)
        yw = yo * w
        ttgl.store(ep_out_ptr + ro, yw, mask=m)
        hf = yo.to(ttgl.float32)
        ttgl.store(ep_sq_ptr + pid, ttgl.sum(ttgl.where(m, hf * hf, 0.0), axis=0))
        if CMAKE == 2:
            _cta_barrier()  # every thread's parts stored before the release below
            ttgl.atomic_add(mk_ptr, 1, sem="release")
        if EPI >= 3:
            _router_share(yw, pid, N, N_OUT, ep_sq_ptr, w1_ptr, b1_ptr, w2_ptr, b2_ptr, part_ptr, lock_ptr, v_ptr,
                          eps, ep_out_ptr, BN, ER, ERH, ERHP, ERADJ, EPI == 4)  # fmt: skip
    else:
        half = N // (2 * BN)
        pair = pid % half
        _cta_barrier()  # every thread's outputs stored before the release below
        t = ttgl.atomic_add(ep_w_ptr + pair, 1, sem="acq_rel")
        _cta_barrier()
        if t == 1:  # the later of the two: the other's outputs are stored
            other = ttgl.load(out_ptr + (ro + BN * half) % (2 * BN * half), cache_modifier=".cg")
            first = pid < half
            gate = ttgl.where(first, yo, other).to(ttgl.float32)
            up = ttgl.where(first, other, yo)
            act = (gate / (1.0 + ttgl.exp(-gate))).to(up.dtype)
            ttgl.store(ep_out_ptr + pair * BN + ro % BN, act * up)
            ttgl.atomic_xchg(ep_w_ptr + pair, 0)  # self-resetting
            if CMAKE == 1:
                _cta_barrier()  # every thread's products stored before the release below
                ttgl.atomic_xchg(mk_ptr + pair, 1, sem="release")


@gluon.jit
def frag_gemv_kernel(w_ptr, s_ptr, z_ptr, x_ptr, out_ptr, p_ptr, N, N_OUT, PSTRIDE, VSTRIDE, G, GS,
                     P: ttgl.constexpr, W0: ttgl.constexpr, W1: ttgl.constexpr, BN: ttgl.constexpr,
                     SPLIT: ttgl.constexpr, BATCH: ttgl.constexpr, PREFETCH: ttgl.constexpr,
                     PMIN: ttgl.constexpr, PMAX: ttgl.constexpr, STAGES: ttgl.constexpr, PKG: ttgl.constexpr,
                     B0: ttgl.constexpr, MULT: ttgl.constexpr, ZM: ttgl.constexpr, HK: ttgl.constexpr,
                     OUT_MODE: ttgl.constexpr, bias_ptr, HAS_BIAS: ttgl.constexpr, part_ptr, lock_ptr,
                     v_ptr, tau_ptr, tau1_ptr, tau2_ptr, SB1, SB2, NSEG: ttgl.constexpr, KMODE: ttgl.constexpr,
                     KV: ttgl.constexpr,
                     VIEWS: ttgl.constexpr, w_desc, BULK_GS: ttgl.constexpr, BULK_PP: ttgl.constexpr,
                     PUBLIC: ttgl.constexpr, PDL: ttgl.constexpr, EARLY: ttgl.constexpr,
                     AHEAD: ttgl.constexpr, r_b1_ptr, r_w2_ptr, r_b2_ptr, RS: ttgl.constexpr, RBLK: ttgl.constexpr,
                     RH: ttgl.constexpr, RHP: ttgl.constexpr, RADJ: ttgl.constexpr, pro_ptr, eps,
                     PRO: ttgl.constexpr, NSQ, NSQP: ttgl.constexpr, ep_w_ptr, ep_out_ptr, ep_sq_ptr,
                     EPI: ttgl.constexpr, ep_w1_ptr, ep_b1_ptr, ep_w2_ptr, ep_b2_ptr, ep_part_ptr, ep_lock_ptr,
                     ep_v_ptr, ep_eps, ER: ttgl.constexpr, ERH: ttgl.constexpr, ERHP: ttgl.constexpr,
                     ERADJ: ttgl.constexpr, mk_ptr, CMAKE: ttgl.constexpr, rd_ptr, CREAD: ttgl.constexpr,
                     CHE: ttgl.constexpr, CHP: ttgl.constexpr):  # fmt: skip
    # PDL: launched with programmatic dependent launch (SmallConfig.pdl): the next kernel may start its programs now;
    # a view on the device awaits the kernel before at once (it may have written k), a view compiled in once its
    # first words are asked for (_view_total), before any activation is read; with an RMS norm in the launch, once
    # its first group's words are asked of L2 (the norm's pass reads the row first)
    # PRO (a prologue): x is the input of what makes the layer's input, made as the activations are
    # loaded (_made): 1, an RMS norm (its weight at pro_ptr; every program first sums the squares of the whole row,
    # 8-28 KiB from L2, after its first weights are asked for); 2, a gated product (x the gate, pro_ptr the up)
    # PRO 3 (an RMS norm made by the launch before, EPI 1): x is the norm's input times its weight, pro_ptr the NSQ
    # (NSQP: the power of 2 from NSQ and 128 up) partial sums of the input's squares; the outputs are scaled by
    # rsqrt(sum / K + eps) (the loop reads x as it is)
    # EPI (with OUT_MODE 1 or 2, in the program that writes a row block's outputs): 1, the next RMS norm's parts
    # (its weight at ep_w_ptr): out * weight (fp16) at ep_out_ptr and the block's sum of out's squares at
    # ep_sq_ptr + pid (a PRO 3 launch reads them); 2, a gated MLP's product: the pack's first half of rows the gate,
    # its second the up; the later of each pair of row blocks pid, pid + NB / 2 (a self-resetting ticket at
    # ep_w_ptr + pid % (NB / 2)) writes fp16(silu(gate)) * up for its BN rows at ep_out_ptr; 3, EPI 1's parts and the
    # router that decides on the norm's output (epilogue.RouterTail: its layers at ep_w1/b1/w2/b2_ptr, ER gate values
    # from ERH hidden units, ERHP slots a share, ERADJ the policy): each row block's share of the first layer at
    # ep_part_ptr, the last block (a ticket at ep_lock_ptr) finishing the router into ep_v_ptr (_router_share); 4, as
    # 3, and the last block also scales the row at ep_out_ptr into the normed row in place (the next launch reads it
    # as a plain input)
    # CMAKE / CREAD (a next input chained from launch to launch, SmallConfig.fragment_chain): CMAKE, this launch
    # makes one (its flags at mk_ptr: _epilogue); CREAD, this launch reads one (a static view; flags at rd_ptr, then
    # a ticket): it asks L2 for its first CHE groups of weights, then waits only for what it reads instead of the
    # whole kernel before (griddepcontrol.wait), and its last program resets the flags: 1, a gated product (plain
    # input; a flag a group: its own groups awaited, _await_ready); 2, a norm's parts (PRO 3; a count of the NSQ row
    # blocks: every block awaited, _await_count). Its programs start on what is made while the launch before drains
    # EARLY (P == -1): the program's first EARLY groups of the PMIN planes every body reads are asked of L2 before
    # the view is read or counted, and before the wait of PDL (the weights' first loads then wait on L2, not memory)
    # AHEAD: at each group, the planes of the group AHEAD later asked of L2 (views compiled in, span bodies included)
    # KMODE (P == -1): 0 p_ptr holds the view's planes; 1 its k (1-based); 2 k = 1 + #(v_ptr[e] > tau) over KV gate
    # values, in the values' dtype, tau at tau_ptr (with NSEG layers of a site, 2-3: at tau1_ptr from row block SB1
    # on, at tau2_ptr from SB2 on); 3: the same count with the gate values finished here from a router launch without
    # its tail (v_ptr: RS splits' pre-activations RBLK apart, RH units; r_b1/r_w2/r_b2 and RADJ: _router_count), in
    # fp32. VIEWS: view k's planes minus one in bits 3 (k - 1) .. 3 (k - 1) + 2
    # the step applied as scale mult (C - zero zm - hk): MULT, ZM, HK for a view compiled in; with PKG the package's
    # W_k = (s / 2^B) (C_k - 2^B z - (2^B - 1) / 2), B = p - B0, for views read on the device (else 1, 1, 0).
    # OUT_MODE 0: fp32 out (atomics with SPLIT); 1: out in its own dtype (no split), + bias; 2 (SPLIT): each split's
    # rows into its fp32 slot of part_ptr, and the last split of a row block to arrive (a self-resetting ticket at
    # lock_ptr + pid) sums the slots in a fixed order, adds the bias and stores in out's dtype: one launch
    # BATCH groups (8, 4, 2 or 1) share an accumulator, group g in its column g % 8; PREFETCH 1 (or 2): the next
    # group's (next two groups') words and activations are loaded before this one's decode (in flight under it)
    # a view of the first P planes (1-8): field 0 planes 0-3 (those below P), field 1 planes 4 .. P - 1, each its own
    # accumulator; code = F0 W0 + F1 W1 with F the fields' 4-bit values (absent planes zero; field_planes).
    # P = 0: the view's planes p read on the device at p_ptr (a routed token's view; a captured graph serves every
    # budget), its step and zero point at view p - 1 of [views, N, G] (VSTRIDE apart); absent planes' loads are
    # predicated off and decode as zeros, field 1 is skipped below 5 planes
    # program (pid, split) takes rows pid * BN.. and groups split * GS.. (GS a multiple of BATCH); with SPLIT the
    # partial sums are added to a zeroed ``out`` (atomics), else stored
    # the words [BN, 4] of one plane and group: lanes 0-1 the quarter, lanes 2-4 rows 1, 2, 4, registers row 8 and
    # the M repeats, warps rows 16, 32: the rows and quarters whose A fragments each thread holds
    LW: ttgl.constexpr = ttgl.DistributedLinearLayout(
        reg_bases=[[8, 0], [64, 0]], lane_bases=[[0, 1], [0, 2], [1, 0], [2, 0], [4, 0]], warp_bases=[[16, 0], [32, 0]],
        block_bases=[], shape=[BN, 4],
    )  # fmt: skip
    MMA: ttgl.constexpr = ttgl.NVMMADistributedLayout(version=[2, 0], warps_per_cta=[4, 1], instr_shape=[16, 8])
    AL: ttgl.constexpr = ttgl.DotOperandLayout(operand_index=0, parent=MMA, k_width=2)
    BL: ttgl.constexpr = ttgl.DotOperandLayout(operand_index=1, parent=MMA, k_width=2)
    pid = ttgl.program_id(0)
    g_lo = ttgl.program_id(1) * GS
    # B: lane 4 n + q of every warp loads its 32 consecutive activations 32 q .. 32 q + 31 of column n's group
    # (b_slots: the pack's columns follow column_of_k), times 2^-4 at the columns with bit 8 set
    XV: ttgl.constexpr = ttgl.DistributedLinearLayout(
        reg_bases=[[0, 1], [0, 2], [0, 4], [0, 8], [0, 16]], lane_bases=[[1, 0], [2, 0], [4, 0], [8, 0], [16, 0]],
        warp_bases=[[0, 0], [0, 0]], block_bases=[], shape=[32, 32],
    )  # fmt: skip
    xl = ttgl.arange(0, 32, layout=ttgl.SliceLayout(1, XV))
    xr = ttgl.arange(0, 32, layout=ttgl.SliceLayout(0, XV))
    xofs = (xl[:, None] & 3) * 32 + xr[None, :]
    xn = (xl[:, None] >> 2) + 0 * xr[None, :]
    xsc = ttgl.where(((xr >> 3) & 1)[None, :] == 1, 0.0625, 1.0).to(ttgl.float16)
    # a batch's activations as [128 (column), 8 (group)] for its sums: registers columns 1-8 and group 1, lanes
    # groups 2, 4 (as the accumulator's columns) and columns 16-64, every warp the whole
    XL: ttgl.constexpr = ttgl.DistributedLinearLayout(
        reg_bases=[[1, 0], [2, 0], [4, 0], [8, 0], [0, 1]], lane_bases=[[0, 2], [0, 4], [16, 0], [32, 0], [64, 0]],
        warp_bases=[[0, 0], [0, 0]], block_bases=[], shape=[128, 8],
    )  # fmt: skip
    ro = pid * BN + ttgl.arange(0, BN, layout=ttgl.SliceLayout(1, MMA))
    no = ttgl.arange(0, 8, layout=ttgl.SliceLayout(0, MMA))
    # a thread's 4 words of one plane and group are consecutive (pack_fragment's word_slots): one 16-byte load, then
    # renamed (reshape, permute: no data moves) into the rows and quarters of LW
    VL: ttgl.constexpr = ttgl.DistributedLinearLayout(
        reg_bases=[[0, 1], [0, 2]], lane_bases=[[1, 0], [2, 0], [4, 0], [8, 0], [16, 0]],
        warp_bases=[[32, 0], [64, 0]], block_bases=[], shape=[128, 4],
    )  # fmt: skip
    tid = ttgl.arange(0, 128, layout=ttgl.SliceLayout(1, VL))
    rg = ttgl.arange(0, 4, layout=ttgl.SliceLayout(0, VL))
    vofs = pid * 512 + tid[:, None] * 4 + rg[None, :]
    NB = N // BN
    SSTRIDE: ttgl.constexpr = P if P > 0 else PMAX
    SL: ttgl.constexpr = ttgl.SwizzledSharedLayout(vec=1, per_phase=1, max_phase=1, order=[1, 0])
    if STAGES > 0:
        smem = ttgl.allocate_shared_memory(ttgl.int32, [STAGES * SSTRIDE, BN, 4], SL)  # the words' ring
    elif STAGES < 0:  # every word of the program by TMA loads issued at once (a view compiled in)
        smem, bars = _bulk_load(w_desc, pid, g_lo, P, BULK_PP, BULK_GS, PUBLIC, STAGES == -2)
    else:
        smem = 0
    if STAGES >= 0:
        bars = 0
    lofs = pid * 512 + ttgl.arange(0, 128, layout=ttgl.SliceLayout(1, VL)) * 4  # a thread's first word of a plane
    if P == -1 and EARLY > 0:  # a thread's 16 bytes of each plane (a warp: four 128-byte lines), before any wait
        wl = w_ptr + lofs
        for e in ttgl.static_range(EARLY * PMIN):
            _ask_l2(wl + (g_lo + e // PMIN) * NB * 512 + (e % PMIN) * PSTRIDE)
    if PDL:
        _griddep(False)
        if PRO == 1 and P > 0:  # the norm's pass below reads x: the first group's words asked of L2 before the wait
            for e in ttgl.static_range(P):
                _ask_l2(w_ptr + g_lo * NB * 512 + lofs + e * PSTRIDE)
        if (P <= 0 or PRO == 1 or PRO == 3) and CREAD == 0:
            _griddep(True)
    if CREAD > 0:  # the first groups' words asked of L2, then what this program reads of the input awaited
        for e in ttgl.static_range(CHE * P):
            _ask_l2(w_ptr + lofs + (g_lo + e // P) * NB * 512 + (e % P) * PSTRIDE)
        if CREAD == 1:
            _await_ready(rd_ptr, g_lo, GS, CHP)
        else:
            _await_count(rd_ptr, NSQ)
    s_pro = 1.0
    if PRO == 3:  # the norm's scale from the partial sums the launch before stored (they arrive under the weights)
        QL: ttgl.constexpr = ttgl.BlockedLayout(size_per_thread=[1], threads_per_warp=[32], warps_per_cta=[4],
                                                order=[0])  # fmt: skip
        qo = ttgl.arange(0, NSQP, layout=QL)
        sqs = ttgl.load(pro_ptr + qo, mask=qo < NSQ, other=0.0)
        s_pro = ttgl.rsqrt(ttgl.sum(sqs, axis=0) / (G * 128) + eps)
    if PRO == 1:  # the RMS norm's scale of the row: rsqrt(mean(x^2) + eps), in fp32 as the model's norm
        KL: ttgl.constexpr = ttgl.BlockedLayout(size_per_thread=[8], threads_per_warp=[32], warps_per_cta=[4],
                                                order=[0])  # fmt: skip
        ko = ttgl.arange(0, 1024, layout=KL)
        sq = ttgl.zeros([1024], ttgl.float32, KL)
        for c in range(0, G * 128, 1024):
            xk = ttgl.load(x_ptr + c + ko).to(ttgl.float32)
            sq += xk * xk
        s_pro = ttgl.rsqrt(ttgl.sum(sq, axis=0) / (G * 128) + eps)
    if P == -1:  # the view read on the device, one compiled body per view from PMIN planes up
        if KMODE == 0:  # p_ptr holds the view's planes
            p = ttgl.load(p_ptr)
        else:  # the view k: read (KMODE 1) or counted from the router's gate values (2); its planes from VIEWS
            if KMODE == 1:
                kk = ttgl.load(p_ptr)
            else:
                t = ttgl.load(tau_ptr)
                if NSEG > 1:  # a site's layers: each its own threshold on the one router's gate values
                    t = ttgl.where(pid >= SB1, ttgl.load(tau1_ptr), t)
                if NSEG > 2:
                    t = ttgl.where(pid >= SB2, ttgl.load(tau2_ptr), t)
                if KMODE == 3:
                    kk = _router_count(v_ptr, r_b1_ptr, r_w2_ptr, r_b2_ptr, t.to(ttgl.float32), RS, RBLK, RH, RHP,
                                       KV, RADJ)  # fmt: skip
                else:
                    t = t.to(v_ptr.dtype.element_ty)
                    kk = 1
                    for e in ttgl.static_range(KV):
                        kk += (ttgl.load(v_ptr + e) > t).to(ttgl.int32)
            p = ((VIEWS >> (3 * (kk - 1))) & 7) + 1
        p = ttgl.minimum(ttgl.maximum(p, PMIN), PMAX)  # a span of views known on the host: its bodies alone
        s_ptr += (p - 1) * VSTRIDE
        z_ptr += (p - 1) * VSTRIDE
        total = ttgl.zeros([BN, 8], ttgl.float32, MMA)
        for q in ttgl.static_range(PMIN, PMAX + 1):
            if p == q:
                SHQ: ttgl.constexpr = q - B0 if PKG else 0
                total = _view_total(w_ptr, s_ptr, z_ptr, x_ptr, vofs, xofs, xn, xsc, ro, no, NB, PSTRIDE, G,
                                    g_lo, GS, q, 1.0 / (1 << SHQ), 1.0 * (1 << SHQ), ((1 << SHQ) - 1) / 2, q,
                                    (1 << (q + 4)) / 256, (1 << (q + 4)) / 4096, BN, BATCH, PREFETCH, LW, AL, BL, MMA,
                                    smem, STAGES, SSTRIDE, VL, XL, BULK_GS, bars, False, lofs, AHEAD, pro_ptr, s_pro,
                                    PRO)  # fmt: skip
    else:
        if P == 0:
            p = ttgl.load(p_ptr)
            s_ptr += (p - 1) * VSTRIDE
            z_ptr += (p - 1) * VSTRIDE
            zmr = 1.0
            if PKG:
                zmr = (1 << (p - B0)).to(ttgl.float32)
            multr = 1.0 / zmr
            hkr = (zmr - 1.0) * 0.5
        else:
            p = P
            multr = MULT
            zmr = ZM
            hkr = HK
        total = _view_total(w_ptr, s_ptr, z_ptr, x_ptr, vofs, xofs, xn, xsc, ro, no, NB, PSTRIDE, G, g_lo, GS,
                            p, multr, zmr, hkr, P, W0, W1, BN, BATCH, PREFETCH, LW, AL, BL, MMA, smem, STAGES, SSTRIDE,
                            VL, XL, BULK_GS, bars, PDL and P > 0 and PRO != 1 and PRO != 3 and CREAD == 0, lofs, AHEAD,
                            pro_ptr, s_pro, PRO)  # fmt: skip
    y = ttgl.sum(total, axis=1)
    if PRO == 3:
        y = y * s_pro
    if OUT_MODE == 2:
        ns = ttgl.num_programs(1)
        ttgl.store(part_ptr + ttgl.program_id(1) * N + ro, y)
        _cta_barrier()  # every thread's slot stored before the release below
        ticket = ttgl.atomic_add(lock_ptr + pid, 1, sem="acq_rel")
        _cta_barrier()
        if ticket == ns - 1:
            y = ttgl.load(part_ptr + ro, cache_modifier=".cg")
            for s in range(1, ns):
                y += ttgl.load(part_ptr + s * N + ro, cache_modifier=".cg")
            if HAS_BIAS:
                y += ttgl.load(bias_ptr + ro, mask=ro < N_OUT, other=0.0).to(ttgl.float32)
            yo = y.to(out_ptr.dtype.element_ty)
            ttgl.store(out_ptr + ro, yo, mask=ro < N_OUT)
            ttgl.atomic_xchg(lock_ptr + pid, 0)  # self-resetting
            if EPI > 0:
                _epilogue(yo, out_ptr, ro, pid, N, N_OUT, ep_w_ptr, ep_out_ptr, ep_sq_ptr, ep_w1_ptr, ep_b1_ptr,
                          ep_w2_ptr, ep_b2_ptr, ep_part_ptr, ep_lock_ptr, ep_v_ptr, ep_eps, BN, EPI, ER, ERH, ERHP,
                          ERADJ, mk_ptr, CMAKE)  # fmt: skip
    elif OUT_MODE == 1:
        if HAS_BIAS:
            y += ttgl.load(bias_ptr + ro, mask=ro < N_OUT, other=0.0).to(ttgl.float32)
        yo = y.to(out_ptr.dtype.element_ty)
        ttgl.store(out_ptr + ro, yo, mask=ro < N_OUT)
        if EPI > 0:
            _epilogue(yo, out_ptr, ro, pid, N, N_OUT, ep_w_ptr, ep_out_ptr, ep_sq_ptr, ep_w1_ptr, ep_b1_ptr,
                      ep_w2_ptr, ep_b2_ptr, ep_part_ptr, ep_lock_ptr, ep_v_ptr, ep_eps, BN, EPI, ER, ERH, ERHP,
                      ERADJ, mk_ptr, CMAKE)  # fmt: skip
    elif SPLIT:
        ttgl.atomic_add(out_ptr + ro, y, mask=ro < N_OUT)
    else:
        ttgl.store(out_ptr + ro, y, mask=ro < N_OUT)
    if CREAD == 1:
        _chain_done(rd_ptr, G, CHP)
    elif CREAD == 2:
        _chain_done(rd_ptr, 1, CHP)


@gluon.jit
def _chain_done(rd_ptr, G, CHP: ttgl.constexpr):
    """A chained input's reader (``CREAD``) done: the last of the launch's programs to come here (the ticket after
    the ``G`` flags) resets every flag and the ticket for the next step's making launch."""
    _cta_barrier()  # every thread's reads of the input done before the ticket
    t = ttgl.atomic_add(rd_ptr + G, 1, sem="acq_rel")
    if t == ttgl.num_programs(0) * ttgl.num_programs(1) - 1:
        RL: ttgl.constexpr = ttgl.BlockedLayout(size_per_thread=[1], threads_per_warp=[32], warps_per_cta=[4],
                                                order=[0])  # fmt: skip
        o = ttgl.arange(0, CHP, layout=RL)
        for c in range(0, G, CHP):
            ttgl.store(rd_ptr + c + o, ttgl.zeros([CHP], ttgl.int32, RL), mask=c + o < G)
        ttgl.atomic_xchg(rd_ptr + G, 0)


def _launch_args(words, scale, zero, x, out, splits=1, planes=None, batch=BATCH_GROUPS, prefetch=False,
                 dispatch=None, stages=0, b0=None, n_out=None, bias=None, out_mode=0, part=None,
                 locks=None, views=None, routed=None, dispatch_to=None, pdl=False, seg_starts=(),
                 early=0, ahead=0, prologue=None, epilogue=None, chain=None):  # fmt: skip
    """``planes``: an int (the view, compiled in), None (every plane of the pack) or an int32 device tensor of one
    element (the view read by the kernel; ``scale``/``zero`` then ``[planes of the pack, N, G]``, view ``p`` at
    ``p - 1``). ``dispatch``, with a device view: None decodes whole fields with the absent planes predicated off;
    an int ``PMIN`` branches to a compiled body per view of ``PMIN`` planes to the pack's (to ``dispatch_to`` planes
    when given: views past it are clamped to it, as views below ``PMIN`` to ``PMIN``). ``stages`` > 1: the words
    through a ring of that many groups in shared memory (not with whole fields on the device); -1: all of a
    program's words by one TMA load into shared memory, waited for once (a view compiled in; sm_90+). ``b0``: the step
    applied as the package's (view ``p``'s code ``B = p - b0`` bits finer than the base slice of ``b0`` bits); else
    ``W = scale (C - zero)``. ``n_out``: rows written (default all); ``out_mode`` 1: ``out`` in its own dtype plus
    ``bias`` (one split only); 2: the same over splits, summed by the last split of each row block (``part``: fp32
    ``[splits, N]``, ``locks``: int32 zeros, one a row block); else fp32 (atomics over splits into a zeroed
    ``out``). ``views`` (each view's planes), with a dispatched device view: ``planes`` holds the view ``k``, or with
    ``routed = (gate values, threshold)`` the kernel counts ``k`` itself (``planes`` then unused); the threshold a
    tensor, or one a layer of a site whose later layers start at the row blocks ``seg_starts`` (at most 3 layers).
    ``pdl``: launched with programmatic dependent launch (``SmallConfig.pdl``; the launch attribute among the
    returned keywords). ``early``, with a dispatched device view: the program's first ``early`` groups (at most its
    groups) of the planes every body reads asked of L2 before the view is read (``SmallConfig.fragment_early_l2``).
    ``ahead``: at each group the planes of the group that many later asked of L2 (``SmallConfig.fragment_ahead``; a
    view compiled in or a dispatched device view's bodies, words through registers). ``prologue``: ``x`` is the
    input of what makes the layer's input, made by the kernel as it loads it: ``("rms_norm", weight, eps)`` or
    ``("silu_mul", up)`` (``triton_bitplane.bitplane_linear_bits``), or ``("rms_scale", sums, eps)``: a norm made
    by the launch before (``x`` its input times its weight; the outputs scaled). ``epilogue``: a
    :class:`~mobiquant.kernels.epilogue.NextInput` the programs that write the outputs fill for the next launch
    (out_mode 1 or 2, fp16); a gated product's with flags (``NextInput.ready``) sets them as its pairs are made.
    ``chain``: the chained :class:`~mobiquant.kernels.epilogue.NextInput` whose output ``x`` is (a view compiled in;
    a gated product read with no prologue, a norm's parts with their ``rms_scale``): the programs wait for what they
    read (their own groups' flags, or the count of every row block) instead of the kernel before."""
    n, g = words.shape[2] * BLOCK_N, x.numel() // GROUP
    if x.dtype != torch.float16 or not x.is_contiguous() or g * GROUP != x.numel() or g != words.shape[1]:
        raise ValueError(f"x must be {words.shape[1] * GROUP} contiguous fp16 activations, got {x.dtype} "
                         f"{tuple(x.shape)}")  # fmt: skip
    planes = words.shape[0] if planes is None else planes
    if batch not in (1, 2, 4, 8) or g % (splits * batch):
        raise ValueError(
            f"splits={splits}, batch={batch}: the {g} groups must split into multiples of the batch (1, 2, 4 or 8)"
        )
    pmin, pmax = 1, words.shape[0]
    if isinstance(planes, torch.Tensor):
        if scale.dim() != 3 or scale.shape[0] != words.shape[0]:
            raise ValueError(f"planes on the device: scale and zero must be [{words.shape[0]}, N, G] (one per view)")
        p_ptr, pc, wts, vstride = planes, 0, [0.0, 0.0], scale[0].numel()
        if dispatch is not None:
            if not 1 <= dispatch <= words.shape[0]:
                raise ValueError(f"dispatch from {dispatch} planes: the pack holds {words.shape[0]}")
            pc, pmin = -1, dispatch
            if dispatch_to is not None:
                if not dispatch <= dispatch_to <= words.shape[0]:
                    raise ValueError(
                        f"dispatch to {dispatch_to} planes: from {dispatch}, the pack holds {words.shape[0]}"
                    )
                pmax = dispatch_to
    else:
        if not 1 <= planes <= words.shape[0]:
            raise ValueError(f"a view of {planes} planes: the pack holds {words.shape[0]}")
        p_ptr, pc, vstride = out, planes, 0
        wts = [wt for _, _, wt in field_planes(planes)] + [0.0]
    n_out = n if n_out is None else n_out
    args = (words, scale, zero, x, out, p_ptr, n, n_out, words[0].numel(), vstride, g, g // splits)
    if stages and (pc == 0 or stages < -2 or stages == 1 or (stages < 0 and pc < 0)):
        raise ValueError(f"stages={stages}: a ring of at least 2 groups, for a view compiled in or dispatched, or -1 "
                         "(every group of a program by one TMA load) or -2 (a load and a barrier a group) for a "
                         "view compiled in")  # fmt: skip
    desc, bulk = words, 0
    if stages < 0:
        from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

        bulk = g // splits
        problem = bulk_problem(pc, g, splits)
        if problem:
            raise ValueError(f"stages={stages}: {problem}")
        w4 = words.view(words.shape[0], g, words.shape[2] * 2, 256)
        lay = ttgl.NVMMASharedLayout(swizzle_byte_width=0, element_bitwidth=32, rank=4)
        box = [1, bulk if stages == -1 else 1, 2, 256]  # -2: one group a load
        desc = TensorDescriptor(w4, list(w4.shape), list(w4.stride()), box, lay)
    if (out_mode == 1 and splits > 1) or (out_mode == 2 and (splits < 2 or part is None or locks is None)):
        raise ValueError("out_mode 1 takes one split; 2 takes several, a part buffer and tickets")
    sh = planes - b0 if b0 is not None and pc > 0 else 0
    if sh < 0:
        raise ValueError(f"a view of {planes} planes is coarser than the base slice of {b0} bits")
    kw = dict(P=pc, W0=wts[0], W1=wts[1], BN=BLOCK_N, SPLIT=splits > 1, BATCH=batch, PREFETCH=int(prefetch), PMIN=pmin,
              PMAX=pmax)  # fmt: skip
    kw.update(STAGES=stages, PKG=b0 is not None, B0=b0 or 0, MULT=2.0**-sh, ZM=2.0**sh, HK=(2.0**sh - 1) / 2)
    kw.update(OUT_MODE=out_mode, bias_ptr=out if bias is None else bias, HAS_BIAS=bias is not None)
    kw.update(w_desc=desc, BULK_GS=bulk, BULK_PP=bulk_pp(max(pc, 1)), PUBLIC=_REINTERPRET_PUBLIC)
    kw.update(part_ptr=out if part is None else part, lock_ptr=out if locks is None else locks)
    kmode, kv, code = 0, 0, 0
    if views is not None:
        if pc != -1 or len(views) > 8:
            raise ValueError("views (a device k) need a dispatched device view and at most 8 views")
        code = sum((v - 1) << (3 * i) for i, v in enumerate(views))
        kmode = 1 if routed is None else 3 if isinstance(routed[0], RouterPartials) else 2
        kv = 0 if routed is None else routed[0].w2.shape[0] if kmode == 3 else routed[0].numel()
    vals, tau = routed if routed is not None else (out, out)
    rkw = dict(r_b1_ptr=out, r_w2_ptr=out, r_b2_ptr=out, RS=1, RBLK=0, RH=1, RHP=2, RADJ=False)
    if isinstance(vals, RouterPartials):  # the gate values finished in every program from the router's partials
        if vals.tokens != 1:
            raise ValueError(f"router partials of {vals.tokens} tokens: a fragment launch takes one")
        rkw.update(r_b1_ptr=vals.b1, r_w2_ptr=vals.w2, r_b2_ptr=vals.b2, RS=vals.splits, RBLK=vals.bm * vals.hp,
                   RH=vals.b1.numel(), RHP=vals.hp, RADJ=vals.adjacent)  # fmt: skip
        vals = vals.part
    kw.update(rkw)
    taus = list(tau) if isinstance(tau, (list, tuple)) else [tau]
    if len(taus) != len(seg_starts) + 1 or len(taus) > 3 or (len(taus) > 1 and routed is None):
        raise ValueError(
            f"{len(taus)} thresholds for {len(seg_starts) + 1} layers: a routed launch takes one threshold a layer, "
            "at most 3 layers"
        )
    if list(seg_starts) != sorted(seg_starts) or any(not 0 < b < n // BLOCK_N for b in seg_starts):
        raise ValueError(f"seg_starts {list(seg_starts)}: increasing row blocks inside the launch's {n // BLOCK_N}")
    starts = [*seg_starts, 0, 0][:2]
    taus = [*taus, taus[0], taus[0]][:3]
    kw.update(v_ptr=vals, tau_ptr=taus[0], tau1_ptr=taus[1], tau2_ptr=taus[2], SB1=starts[0], SB2=starts[1])
    if early and (pc != -1 or early < 0):
        raise ValueError(f"early={early}: groups asked of L2 ahead of the view, for a dispatched device view only")
    kw.update(NSEG=len(seg_starts) + 1, KMODE=kmode, KV=kv, VIEWS=code, PDL=bool(pdl), EARLY=min(early, g // splits))
    if ahead and (ahead < 0 or stages or pc == 0):
        raise ValueError(f"ahead={ahead}: groups asked of L2 ahead of the decode, for words through registers "
                         "(stages 0) of a view compiled in or dispatched")  # fmt: skip
    kw.update(AHEAD=min(ahead, g // splits - 1) if ahead else 0)
    kw.update(_prologue_kw(prologue, x))
    kw.update(_epilogue_kw(epilogue, out, n, n_out, out_mode))
    kw.update(_chain_kw(chain, epilogue, x, out, pc, kw, g // splits))
    return args, dict(kw, num_warps=4, **({"launch_pdl": True} if pdl else {}))


def _chain_kw(chain, epilogue, x: torch.Tensor, out: torch.Tensor, planes: int, pro: dict, gs: int) -> dict:
    """The kernel's ``mk_ptr``, ``CMAKE``, ``rd_ptr``, ``CREAD``, ``CHE`` and ``CHP``, checked: ``CMAKE`` 1 / 2 where
    ``epilogue`` is a gated product / a norm's parts with flags (``NextInput.ready``; the launch sets them), ``CREAD``
    1 / 2 where ``x`` is such a product / such a norm's input (``chain``; the launch awaits them); else 0."""
    kw = dict(mk_ptr=out, CMAKE=0, rd_ptr=out, CREAD=0, CHE=0, CHP=128)
    ready = getattr(epilogue, "ready", None)
    if ready is not None:
        if epilogue.router is not None:
            raise ValueError("a chained norm's parts are made without a router's tail")
        slots = epilogue.out.numel() // BLOCK_N if epilogue.kind == "silu_mul" else 1
        if ready.numel() != slots + 1 or ready.dtype != torch.int32:
            raise ValueError(f"a chained {epilogue.kind}'s flags: int32, {slots} and a ticket, got {ready.dtype} "
                             f"{ready.numel()}")  # fmt: skip
        kw.update(mk_ptr=ready, CMAKE=1 if epilogue.kind == "silu_mul" else 2)
    if chain is None:
        return kw
    if not (isinstance(chain, NextInput) and chain.ready is not None and chain.out.data_ptr() == x.data_ptr()):
        raise ValueError("chain must be the NextInput (with flags) whose output is this launch's input")
    if planes < 1:
        raise ValueError("a chained input is read by a view compiled in")
    if chain.kind == "silu_mul":
        if pro["PRO"] != 0:
            raise ValueError("a chained product is read by a view compiled in, with no prologue")
        if chain.ready.numel() != x.numel() // GROUP + 1:
            raise ValueError(f"a chained product of {x.numel()} values needs a flag a group and a ticket: "
                             f"{x.numel() // GROUP + 1}, got {chain.ready.numel()}")  # fmt: skip
        read = 1
    else:
        if pro["PRO"] != 3 or pro["pro_ptr"] is not chain.sums:
            raise ValueError("a chained norm's parts are read with their own sums (prologue ('rms_scale', sums, eps))")
        if chain.ready.numel() != 2:
            raise ValueError(f"a chained norm's flags: a count and a ticket, got {chain.ready.numel()}")
        read = 2
    return dict(kw, rd_ptr=chain.ready, CREAD=read, CHE=min(2, gs), CHP=max(128, 1 << (gs - 1).bit_length()))


def _prologue_kw(prologue, x: torch.Tensor) -> dict:
    """The kernel's ``pro_ptr``, ``eps``, ``PRO``, ``NSQ`` and ``NSQP`` for ``prologue`` (:func:`_launch_args`),
    checked (:func:`~mobiquant.kernels.triton_router.prologue_operand`; the operand also fp16), or
    ``("rms_scale", sums, eps)``: a norm made by the launch before (:class:`~mobiquant.kernels.epilogue.NextInput`)."""
    if prologue is None:
        return dict(pro_ptr=x, eps=0.0, PRO=0, NSQ=1, NSQP=128)
    if isinstance(prologue, tuple) and prologue and prologue[0] == "rms_scale":
        sums, eps = prologue[1], prologue[2] if len(prologue) == 3 else None
        if not (torch.is_tensor(sums) and sums.dim() == 1 and sums.dtype == torch.float32 and sums.is_contiguous()
                and sums.device == x.device) or eps is None:  # fmt: skip
            got = f"{sums.dtype} {tuple(sums.shape)} on {sums.device}" if torch.is_tensor(sums) else type(sums).__name__
            raise ValueError(f"('rms_scale', sums, eps): sums must be contiguous fp32 [blocks] on {x.device}, "
                             f"got {got}")  # fmt: skip
        if not float(eps) > 0:
            raise ValueError(f"('rms_scale', sums, eps): eps must be positive, got {eps}")
        n = sums.numel()
        return dict(pro_ptr=sums, eps=float(eps), PRO=3, NSQ=n, NSQP=max(128, 1 << (n - 1).bit_length()))
    operand, eps, code = prologue_operand(prologue, x)
    if operand.dtype != torch.float16:
        raise ValueError(f"a {prologue[0]} in the fragment launch: its operand must be fp16, got {operand.dtype}")
    return dict(pro_ptr=operand.reshape(-1).contiguous(), eps=eps, PRO=code, NSQ=1, NSQP=128)


def _epilogue_kw(epilogue, out: torch.Tensor, n: int, n_out: int, out_mode: int) -> dict:
    """The kernel's ``ep_w_ptr``, ``ep_out_ptr``, ``ep_sq_ptr``, ``EPI`` and the router's (``ep_w1_ptr`` ..
    ``ERADJ``) for ``epilogue`` (a :class:`~mobiquant.kernels.epilogue.NextInput` or None; :func:`_launch_args`),
    checked against the launch's ``n`` rows (``n_out`` written) into ``out``."""
    kw = dict(_router_epilogue_kw(None, out, n), **_epilogue_parts_kw(epilogue, out, n, n_out, out_mode))
    if epilogue is not None and epilogue.router is not None:
        kw.update(_router_epilogue_kw(epilogue.router, out, n), EPI=4 if epilogue.router.normed else 3)
    return kw


def _router_epilogue_kw(tail, out: torch.Tensor, n: int) -> dict:
    """The kernel's router keywords of ``EPI`` 3 for ``tail`` (an :class:`~mobiquant.kernels.epilogue.RouterTail`;
    None: placeholders) in a launch of ``n`` rows."""
    if tail is None:
        return dict(ep_w1_ptr=out, ep_b1_ptr=out, ep_w2_ptr=out, ep_b2_ptr=out, ep_part_ptr=out, ep_lock_ptr=out,
                    ep_v_ptr=out, ep_eps=0.0, ER=1, ERH=1, ERHP=2, ERADJ=False)  # fmt: skip
    from .triton_bitplane import _locks

    blocks = n // BLOCK_N
    if tail.part.shape[0] < blocks:
        raise ValueError(
            f"a router finished in the epilogue needs a share a row block: {blocks}, got {tail.part.shape[0]}"
        )
    return dict(ep_w1_ptr=tail.w1, ep_b1_ptr=tail.b1, ep_w2_ptr=tail.w2, ep_b2_ptr=tail.b2, ep_part_ptr=tail.part,
                ep_lock_ptr=_locks(out.device, 1, "router tail"), ep_v_ptr=tail.values, ER=tail.w2.shape[0],
                ERH=tail.b1.numel(), ERHP=tail.part.shape[1], ERADJ=tail.adjacent)  # fmt: skip


def _epilogue_parts_kw(epilogue, out: torch.Tensor, n: int, n_out: int, out_mode: int) -> dict:
    """:func:`_epilogue_kw`'s norm or product keywords."""
    if epilogue is None:
        return dict(ep_w_ptr=out, ep_out_ptr=out, ep_sq_ptr=out, EPI=0)
    if not isinstance(epilogue, NextInput) or epilogue.kind not in KINDS:
        raise ValueError(f"epilogue must be a NextInput of kind {' or '.join(KINDS)}, got {epilogue!r}")
    if out_mode not in (1, 2) or out.dtype != torch.float16:
        raise ValueError("an epilogue needs the outputs in fp16 (out_mode 1 or 2), written by one program a row block")
    made = epilogue.out
    if epilogue.kind == "rms_norm":
        sums, weight = epilogue.sums, epilogue.weight
        blocks = n // BLOCK_N
        if (
            weight is None
            or sums is None
            or made.numel() != n_out
            or weight.numel() != n_out
            or sums.numel() < blocks
            or made.dtype != out.dtype
            or weight.dtype != out.dtype
        ):
            raise ValueError(f"a norm made in the epilogue: its input and weight must be {n_out} fp16 values and "
                             f"its sums at least {blocks} (one a block of {BLOCK_N} rows)")  # fmt: skip
        return dict(ep_w_ptr=weight, ep_out_ptr=made, ep_sq_ptr=sums, EPI=1, ep_eps=epilogue.eps)
    if n_out != n or n % (2 * BLOCK_N) or made.numel() != n // 2 or made.dtype != out.dtype:
        raise ValueError(f"a product made in the epilogue: the launch's {n_out} rows must be gate and up of whole "
                         f"blocks of {BLOCK_N} each, the product {n // 2} fp16 values; got {made.numel()} "
                         f"{made.dtype}")  # fmt: skip
    from .triton_bitplane import _locks

    return dict(ep_w_ptr=_locks(out.device, n // (2 * BLOCK_N), "pair"), ep_out_ptr=made, ep_sq_ptr=out, EPI=2)


def split_choices(k: int, batch: int = BATCH_GROUPS, most: int = 16) -> list[int]:
    """The K splits a layer of ``k`` inputs allows: divisors of its number of ``batch``-group batches, up to
    ``most``."""
    b = k // (GROUP * batch)
    return [s for s in range(1, min(b, most) + 1) if b % s == 0]


def frag_gemv(words, scale, zero, x, out=None, splits=1, planes=None, batch=BATCH_GROUPS,
              prefetch=False, dispatch=None, maxnreg=None, stages=0):  # fmt: skip
    """``W x`` on a GPU for one token ``x [K]`` (``W = scale (C - zero)`` per row and group, ``scale``/``zero``
    ``[N, G]`` fp16, ``C`` the code of the first ``planes`` planes, default all; ``x`` fp16, read by the kernel);
    ``splits``: programs along K per row block (their sums added atomically into ``out``, zeroed here first)."""
    n = words.shape[2] * BLOCK_N
    out = torch.empty(n, device=words.device) if out is None else out
    args, kw = _launch_args(words, scale, zero, x, out, splits, planes, batch, prefetch, dispatch, stages)
    if maxnreg:
        kw["maxnreg"] = maxnreg
    if splits > 1:
        out.zero_()
    frag_gemv_kernel[(n // BLOCK_N, splits)](*args, **kw)
    return out


# ------------------------------------------------------------------------------------------ the package's path
#: Rows a launch aims to keep busy per row block and split: about four programs an SM on an H200 (132 SMs), the
#: configs measured fastest there (docs/RESULTS.md "The fragment-native Gluon GEMV on the H200").
TARGET_PROGRAMS = 448
#: Weights (rows x inputs) from which a view read on the device compiles with at most 128 registers: measured 1.3x
#: faster on the 8B gate/up and down, slower on the 4096 x 4096 q/o (docs/RESULTS.md)
BIG_LAUNCH = BIG_FRAGMENT_LAUNCH
#: the most planes of a static view whose loop keeps 2 groups prefetched, or asks L2 for the group 1-2 ahead, within
#: 128 registers without a spill (offline for sm_90, the 8B gate/up and down: 127-128 registers at 3-4 planes, a
#: stack of 80-192 bytes at 5-6); ``fragment_linear`` caps such launches, which uncapped take 148-167 registers: three
#: programs an SM instead of four
DEEP_CAP_PLANES = 4
#: shared memory a program may fill with one TMA load (``stages=-1``), of the H200's 227 KiB
BULK_SMEM_MAX = 200 * 1024
_FRAG_CACHE: dict[int, tuple[torch.Tensor, FragPlanes]] = {}
_FRAG_CACHE_MAX = 256


def bulk_pp(planes: int) -> int:
    """The planes of ``stages=-1``'s shared buffer for a view of ``planes``: the power of 2 from ``planes`` up (a
    buffer's sides are powers of 2; the planes past the view's stay unwritten)."""
    return 1 << (planes - 1).bit_length()


def bulk_problem(planes: int, groups: int, splits: int) -> str | None:
    """Why ``stages=-1`` cannot serve a view of ``planes`` over ``groups`` groups in ``splits`` K splits (None: it
    can): a TMA box's sides are powers of 2, and a program's words must fit :data:`BULK_SMEM_MAX`."""
    bulk = groups // splits
    if bulk & (bulk - 1):
        return (f"{groups} groups in {splits} K splits make {bulk} a program; a TMA box's sides are powers of 2: take "
                "splits that leave 2^n groups a program")  # fmt: skip
    if bulk_pp(planes) * bulk * 2048 > BULK_SMEM_MAX:
        return (f"{planes} planes (a buffer of {bulk_pp(planes)}) x {bulk} groups a program need "
                f"{bulk_pp(planes) * bulk * 2} KiB of shared memory, at most {BULK_SMEM_MAX // 1024} KiB: take more K "
                "splits")  # fmt: skip
    return None


def fragment_supported(slice_bits, group_size: int, in_features: int) -> bool:
    """Layouts the fragment kernel serves: at most 8 planes in all, groups of 128, inputs a multiple of 1024 (its
    batches of eight groups)."""
    return sum(slice_bits) <= 8 and group_size == GROUP and in_features % (GROUP * BATCH_GROUPS) == 0


def fragment_device_ok(device: torch.device) -> bool:
    """A CUDA device with ``mma.sync`` (compute capability 8.0 or newer)."""
    return device.type == "cuda" and torch.cuda.get_device_capability(device) >= (8, 0)


@dataclass(frozen=True)
class FragPlanes:
    """One layer's fragment pack (:func:`fragment_of`): ``words`` ``[T, G, NPAD / 128, 512]`` int32 (every plane of
    the checkpoint's slices, most significant first), ``scale`` / ``zero`` fp16 ``[T, NPAD, G]``: the step and zero
    point of the view of ``p`` planes at ``p - 1`` (each view's own, or the shared pair at every view; zeros where
    no view ends), rows padded to a multiple of 128 with zeros."""

    words: torch.Tensor
    scale: torch.Tensor
    zero: torch.Tensor
    slice_bits: tuple[int, ...]
    in_features: int
    out_features: int

    @property
    def planes_of_view(self) -> list[int]:
        """The planes each view reads (view ``k`` at ``k - 1``)."""
        return planes_of_views(self.slice_bits)


def codes_of_bitplanes(words: torch.Tensor, r0: int, r1: int) -> torch.Tensor:
    """The ``T``-bit codes ``[r1 - r0, KW * 16]`` (int64) of rows ``r0 .. r1`` (even, within the padding) of one-bit
    plane buffers ``words [T, KW, NPAD / 2]`` (``triton_bitplane.BitPlanes``: bit ``b`` of a word is column
    ``16 w + b`` of row ``2 i``, ``b < 16``, else column ``16 w + b - 16`` of row ``2 i + 1``)."""
    t, kw, _ = words.shape
    w = words[:, :, r0 // 2 : r1 // 2].to(torch.int64) & 0xFFFFFFFF
    bits = (w[..., None] >> torch.arange(32, device=words.device)) & 1  # [T, KW, pairs, 32]
    bits = bits.reshape(t, kw, -1, 2, 16).permute(0, 2, 3, 1, 4).reshape(t, r1 - r0, kw * 16)
    shifts = torch.arange(t - 1, -1, -1, device=words.device)
    return (bits << shifts[:, None, None]).sum(0)


def fragment_of(bp, row_block: int = 1024) -> FragPlanes:
    """The fragment pack of one-bit plane buffers ``bp`` (``triton_bitplane.BitPlanes``), built on their device
    ``row_block`` rows at a time and cached while ``bp.words`` lives (the last 256)."""
    hit = _FRAG_CACHE.get(id(bp.words))
    if hit is not None and hit[0] is bp.words:
        return hit[1]
    if not fragment_supported(bp.slice_bits, bp.group_size, bp.in_features):
        raise ValueError(
            f"the fragment kernel takes at most 8 planes, groups of {GROUP} and inputs a multiple of "
            f"{GROUP * BATCH_GROUPS}: got {list(bp.slice_bits)}, group {bp.group_size}, {bp.in_features} inputs"
        )
    t, _, npad2 = bp.words.shape
    npad = 2 * npad2
    parts = []
    for r0 in range(0, npad, row_block):
        r1 = min(npad, r0 + row_block)
        codes = codes_of_bitplanes(bp.words, r0, r1)[:, : bp.in_features]
        parts.append(pack_fragment(codes, t))
    words = torch.cat(parts, dim=2).contiguous()
    sz = bp.sz if bp.per_view else bp.sz[None]  # [V, 2, G, NPAD / 2]: row 2 i in [:, 0], 2 i + 1 in [:, 1]
    sz = sz.permute(0, 3, 1, 2).reshape(sz.shape[0], npad, sz.shape[2])  # [V, NPAD, G]
    pv = torch.tensor([p - 1 for p in bp.planes_of_view], device=sz.device)
    pairs = sz if bp.per_view else sz.expand(len(pv), -1, -1)
    scale = torch.zeros(t, npad, sz.shape[2], dtype=torch.float16, device=sz.device)
    zero = torch.zeros_like(scale)
    scale[pv] = (pairs & 0xFFFF).to(torch.int16).view(torch.float16)
    zero[pv] = (pairs >> 16).to(torch.int16).view(torch.float16)
    fp = FragPlanes(words, scale, zero, tuple(bp.slice_bits), bp.in_features, bp.out_features)
    if len(_FRAG_CACHE) >= _FRAG_CACHE_MAX:
        _FRAG_CACHE.pop(next(iter(_FRAG_CACHE)))
    _FRAG_CACHE[id(bp.words)] = (bp.words, fp)
    return fp


def launch_config(n_blocks: int, groups: int, planes: int, target: int = 0) -> tuple[int, int, int]:
    """``(batch, groups prefetched, splits)`` for ``n_blocks`` row blocks of ``groups`` groups: the largest batch
    whose splits come nearest ``target`` programs (0: :data:`TARGET_PROGRAMS`); one group prefetched for views of at
    most 4 planes, two for 5-6, none above (as measured fastest on an H200, docs/RESULTS.md). ``planes`` 0: a view
    read on the device, one group prefetched (views of 3-4 planes carry a routed budget of 4)."""
    if target < 0:
        raise ValueError(f"target must be 0 (TARGET_PROGRAMS) or a number of programs, got {target}")
    target = target or TARGET_PROGRAMS
    best = None
    for batch in (8, 4, 2, 1):
        for s in split_choices(groups * GROUP, batch, groups):
            gap = abs(n_blocks * s - target)
            if best is None or gap < best[0]:
                best = (gap, batch, s)
    assert best is not None
    return best[1], 1 if planes <= 4 else 2 if planes <= 6 else 0, best[2]


#: shared memory a program of the package's TMA launches fills at most: three programs an SM on an H200 (227 KiB),
#: so that the decode of one hides the others' latencies (one program of 128 KiB would leave 4 warps an SM)
TMA_SMEM_PER_PROGRAM = 64 * 1024


def tma_config(n_blocks: int, groups: int, planes: int) -> tuple[int, int] | None:
    """``(batch, splits)`` for a static view of ``planes`` whose words come by TMA (``stages`` -1 or -2): the K split
    whose programs come nearest :data:`TARGET_PROGRAMS` among those that leave a power of 2 of groups a program within
    :data:`TMA_SMEM_PER_PROGRAM` (and :func:`bulk_problem`), a batch of up to 8 of them an accumulator; None where no
    split does (one group a program always fits: 16 KiB at 8 planes), and the register path serves. Chosen, not
    measured: ``gluon_proto.py --tma`` times every split."""
    best = None
    for s in split_choices(groups * GROUP, 1, groups):
        if bulk_problem(planes, groups, s) or bulk_pp(planes) * (groups // s) * 2048 > TMA_SMEM_PER_PROGRAM:
            continue
        gap = abs(n_blocks * s - TARGET_PROGRAMS)
        if best is None or gap < best[0]:
            best = (gap, min(BATCH_GROUPS, groups // s), s)
    return None if best is None else (best[1], best[2])


def fragment_linear(
    x2: torch.Tensor,
    fp: FragPlanes,
    k,
    bias=None,
    out=None,
    routed=None,
    cap: int = 0,
    tma: int = 0,
    span=None,
    pdl: bool = False,
    seg_starts=(),
    span_uncap: int = 0,
    early_l2: int = 0,
    prefetch: int | None = None,
    ahead: int = 0,
    prologue=None,
    epilogue: NextInput | None = None,
    programs: int = 0,
    chain: bool = True,
) -> torch.Tensor:
    """One token ``x2 [1, in]`` (fp16) -> ``[1, out]`` from a fragment pack: view ``k`` (an int, a one-element int
    tensor on the device, or None with ``routed = (gate values, threshold)`` on the device, counted by the kernel:
    a compiled body per view, picked there) with the package's step and zero point
    (``W_k = (s / 2^B) (C_k - 2^B z - (2^B - 1) / 2)``). One launch: the kernel builds its B operand and the groups'
    sums from the token itself; with K splits the last split of each row block sums them, in a fixed order.
    ``cap``: a static view of at least this many planes (0: none) in a launch of at least :data:`BIG_LAUNCH` weights
    runs capped at 128 registers, one group prefetched at most (no spill in its group loop, counted offline).
    ``tma`` -1 or -2: a static view's words come by TMA into shared memory (``stages``; the K split of
    :func:`tma_config`), where a split allows it; 0: through registers. ``span = (lo, hi)``, with a view on the
    device: the views it may be (their bodies alone compiled; others clamped into them). ``pdl``: launched with
    programmatic dependent launch (the weights' first loads overlap the kernel before). ``seg_starts``, with
    ``routed``: the pack is a site's layers, each later one from that row block on, and the threshold is a list of
    one a layer (their one router's gate values counted against each). A view on the device runs capped at 128
    registers in a launch of at least :data:`BIG_LAUNCH` weights, unless its ``span`` reaches ``span_uncap`` planes
    or more (0: never uncapped). ``early_l2``, with a view on the device: its first ``early_l2`` groups of the planes
    every compiled body reads asked of L2 before the view is read or counted (0: none). ``prefetch``: groups whose
    words a program loads into registers ahead of the decode (0-2; None: :func:`launch_config`'s; a capped static view
    of more than :data:`DEEP_CAP_PLANES` planes at most 1). ``ahead``: at each group the planes of the group that many
    later asked of L2 (0: none). A static view of at most :data:`DEEP_CAP_PLANES` planes with 2 groups prefetched or
    1-2 groups ahead runs capped at 128 registers in every launch.
    ``prologue``: ``x2`` is the input of what makes the layer's input, made as it is loaded (:func:`_launch_args`);
    ``epilogue``: what the launch makes of its outputs for the next one (:mod:`~mobiquant.kernels.epilogue`).
    ``programs``: the programs :func:`launch_config` aims the grid at (0: :data:`TARGET_PROGRAMS`). ``chain``: where
    ``x2`` is a chained next input (:func:`~mobiquant.kernels.epilogue.chained_product`: a gated product read with
    no prologue, a norm's parts with their ``rms_scale``) and the view is compiled in, the programs await what they
    read of it, not the whole launch before."""
    M, K_IN = x2.shape
    if M != 1 or K_IN != fp.in_features or x2.dtype != torch.float16:
        raise ValueError(f"the fragment kernel takes one fp16 token of {fp.in_features} features, got {x2.dtype} "
                         f"{tuple(x2.shape)}")  # fmt: skip
    ns = len(fp.slice_bits)
    n_out = fp.out_features
    if out is None:
        out = torch.empty(1, n_out, dtype=x2.dtype, device=x2.device)
    nb, g = fp.words.shape[2], K_IN // GROUP
    b0 = fp.slice_bits[0]
    planes: int | torch.Tensor
    dispatch: int | None
    if routed is None and not isinstance(k, int) and not torch.is_tensor(k):
        raise TypeError("k must be an int or a one-element tensor, or None with routed=(gate values, threshold)")
    if isinstance(k, int):
        if not 1 <= k <= ns:
            raise ValueError(f"k must be between 1 and {ns}, got {k}")
        planes = fp.planes_of_view[k - 1]
        sc, zp = fp.scale[planes - 1], fp.zero[planes - 1]
        dispatch = None
    else:  # the view on the device, read or counted by the kernel: a body per view there (of the span's views)
        planes = k.reshape(-1) if torch.is_tensor(k) else x2
        sc, zp = fp.scale, fp.zero
        dispatch = b0 if span is None else fp.planes_of_view[span[0] - 1]
    if tma not in (0, -1, -2):
        raise ValueError(f"tma must be 0 (registers), -1 or -2 (TMA loads: a plane, a plane and group), got {tma}")
    if prefetch is not None and prefetch not in (0, 1, 2):
        raise ValueError(f"prefetch must be 0, 1 or 2 groups (or None: the launch's own), got {prefetch}")
    batch, pf, splits = launch_config(nb, g, planes if isinstance(planes, int) else 0, programs)
    prefetch = pf if prefetch is None else prefetch
    capped = register_capped(n_out * K_IN, planes if isinstance(planes, int) else 0, cap)
    if capped and dispatch is not None and span is not None and 0 < span_uncap <= fp.planes_of_view[span[1] - 1]:
        capped = False  # the span's bodies in their own registers (no stack; counted offline, NOTES 30)
    static = dispatch is None and isinstance(planes, int)
    if static and planes <= DEEP_CAP_PLANES and (prefetch >= 2 or 0 < ahead <= 2):
        capped = True  # more words in flight only pays at four programs an SM (uncapped: 148-167 registers, three)
    if capped and static and planes > DEEP_CAP_PLANES:
        prefetch = min(prefetch, 1)  # two groups prefetched spill from 5 planes under the cap
    stages = 0
    bulk = tma_config(nb, g, planes) if tma and isinstance(planes, int) else None
    if bulk is not None:
        (batch, splits), prefetch, stages, ahead = bulk, 0, tma, 0
    extra: dict = {}
    if splits > 1:  # the last split of each row block sums the others' slots: one launch in all
        from .triton_bitplane import _locks

        extra = dict(part=torch.empty(splits, nb * BLOCK_N, device=x2.device), locks=_locks(x2.device, nb, "frag"))
    if pdl:
        from .triton_router import _check_pdl

        _check_pdl(x2.device)
        extra.update(pdl=True)
    if prologue is not None:
        extra.update(prologue=prologue)
    if epilogue is not None:
        extra.update(epilogue=epilogue)
    made_by = chained_product(x2) if chain and isinstance(planes, int) else None
    if made_by is not None and (prologue is None) != (made_by.kind == "rms_norm"):
        made_by = None  # a product is read plainly, a norm's parts with their sums
    if made_by is not None:
        extra.update(chain=made_by)
        made_by.chained = True
    if dispatch is not None:
        extra.update(views=fp.planes_of_view, routed=routed, seg_starts=tuple(seg_starts), early=early_l2)
        if span is not None:
            extra.update(dispatch_to=fp.planes_of_view[span[1] - 1])
    args, kw = _launch_args(fp.words, sc, zp, x2.reshape(-1), out.view(-1), splits, planes, batch, prefetch, dispatch,
                            stages, b0, n_out, bias, 2 if splits > 1 else 1, ahead=ahead, **extra)  # fmt: skip
    if capped:  # a device view's bodies measured faster so; static views from ``cap`` planes asked to be
        kw["maxnreg"] = 128
    frag_gemv_kernel[(nb, splits)](*args, **kw)
    if epilogue is not None:
        epilogue.made = True
    return out

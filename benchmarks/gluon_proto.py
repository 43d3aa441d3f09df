#!/usr/bin/env python
"""A fragment-native bit-plane GEMV prototype in Gluon: codes decoded two at a time, multiplied on the tensor cores.

benchmarks/NOTES.md (entries 17 and 19): the one-bit plane kernel spends 4.1-4.5 SASS instructions a code at 4 bits,
and Triton's ``tl.dot`` gave no better (4.1-4.3: the operand went through shared memory). Here the pack is laid out
for ``mma.sync.m16n8k16``'s A fragment and the kernel (Gluon: explicit layouts) takes it straight from registers.

**Pack** (:func:`pack_fragment`; 4 planes, plane 0 the code's most significant bit; groups of 128 columns). Logical
column ``k`` of a group is ``8 j + 2 q + par``; word ``q`` (0-3) of a row and group holds, in bit
``(j + 16 par + 3 - e) mod 32`` of plane ``e``, bit ``3 - e`` of the code at column ``k``: each plane rotated by its
place in the code. The lane of a quad that owns the fragment pairs of quarter ``q`` loads that word, so each thread
reads only its own codes; a thread's four words of a plane and group (rows ``r, r + 8, r + 64, r + 72`` of its
128-row block) are consecutive (:func:`word_slots`), one 16-byte load.

**Decode** (:func:`_pj`, emulated in :func:`decode_reference`): per residue ``r`` of ``j`` (mod 4) three bit selects
of the planes make a field word ``F_r`` holding the 4-bit fields of its 8 codes side by side (the planes need no
shift); rotated right by ``r`` (codes 0-7) or ``r + 8`` (8-15), a code's field sits at bit 0 or 4 of each half,
inside an fp16 mantissa; one LOP3 ``(F & mask) | 0x64006400`` makes two fp16 values ``1024 + C 2^s`` (``s`` 0 or 4):
columns ``k`` and ``k + 1`` of the row, the pair the A fragment holds in one register. Per 32 codes: 12 selects, 7
rotations, 16 pair LOP3s, 4 ``mma.sync`` (8 codes each).

**Views** (:func:`field_planes`): a pack of up to 8 planes serves the view of its first ``p``: planes 0-3 are one
field, 4-7 another (each plane rotated by its place in its field), a field with planes absent decodes them as zeros
(a select fewer, a narrower pair mask), each field has its own accumulator, and the view's code is
``F0 2^(p - 4) + F1 2^(p - 8)``, applied in the epilogue.

**Activations** (:func:`prepare_x`, once per token; :class:`PreparedX` as one Triton launch): ``x' = x 2^-s`` in
logical order, group ``g``'s in column ``g % 8`` of its ``[128, 8]`` B (zeros elsewhere), so eight groups share one
accumulator, a column each; per group ``off = 1024 sum x'`` and ``xs = sum x``. Every eight groups the kernel adds
``scale (acc - off - zero xs)`` per row and column (``W x`` with ``W = scale (C - zero)``), and sums the columns at
the end.

    python benchmarks/gluon_proto.py                 # compile for sm_90 offline, count the group loop
    python benchmarks/gluon_proto.py --check --time  # on a GPU: every view against PyTorch, then the 8B shapes
                                                     # at 3, 4, 6, 8 planes timed beside the package's same
                                                     # views and fp16 cuBLAS

Written against Gluon's ``DistributedLinearLayout`` and ``NVMMADistributedLayout``; compiles offline with triton 3.6.0
(the H200 machine's: 1.54 instructions a code) and 3.9.0 (1.52). Not yet run on a GPU: its logical operations are
checked on the CPU by :func:`emulate_kernel` (PyTorch, line by line), not the compiler's placement of them.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import triton
import triton.language as tl
from triton.experimental import gluon
from triton.experimental.gluon import language as ttgl
from triton.experimental.gluon.language.nvidia.ampere import async_copy, mma_v2

GROUP = 128
PLANES = 4
BATCH_GROUPS = 8  # groups whose partial sums share one accumulator, one mma column each
BLOCK_N = 128  # rows a program


def field_shift(j: int) -> int:
    """The power of two code ``j``'s field carries once rotated into place: 0 for ``j % 8 < 4``, else 4."""
    return 4 if j % 8 >= 4 else 0


def rotation(j: int) -> int:
    """How far right field word ``F_r`` (``r = j % 4``) is rotated so that code ``j``'s field sits at bit
    :func:`field_shift` of each half: ``r`` for codes 0-7, ``r + 8`` for codes 8-15."""
    return j % 4 + (8 if j >= 8 else 0)


def logical_columns() -> torch.Tensor:
    """``[16, 4, 2]``: the group column of code ``j`` of quarter ``q``'s word, half ``par`` (``8 j + 2 q + par``)."""
    j, q, par = torch.meshgrid(torch.arange(16), torch.arange(4), torch.arange(2), indexing="ij")
    return 8 * j + 2 * q + par


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
    cols = logical_columns()  # [16, 4, 2]
    c = codes.reshape(n, g, GROUP)[:, :, cols]  # [N, G, 16, 4, 2]
    base = (torch.arange(16)[:, None, None] + 16 * torch.arange(2)[None, None, :]).expand(16, 4, 2)
    slots = word_slots()
    words = []
    for e in range(planes):
        pos = (base + 3 - e % 4) % 32
        bits = ((c >> (planes - 1 - e)) & 1).to(torch.int64) << pos  # [N, G, 16, 4, 2]
        w = bits.sum(dim=(2, 4))  # [N, G, 4]: each bit set once
        w = torch.where(w >= 2**31, w - 2**32, w).to(torch.int32).reshape(nb, BLOCK_N, g, 4).permute(2, 0, 1, 3)
        out = torch.empty(g, nb, BLOCK_N * 4, dtype=torch.int32)
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
    """``[128 (k), 8 (n)]``: where ``B[k, n]`` of one group sits among its 1024 halves: lane ``4 n + (k >> 1 & 3)``
    of every warp holds ``k & 1``, ``k >> 3 & 1``, .. ``k >> 6 & 1`` in its registers, stored as its 32 consecutive
    halves (four 16-byte loads)."""
    k = torch.arange(GROUP)[:, None]
    n = torch.arange(BATCH_GROUPS)[None, :]
    reg = (k & 1) | ((k >> 3 & 1) << 1) | ((k >> 4 & 1) << 2) | ((k >> 5 & 1) << 3) | ((k >> 6 & 1) << 4)
    return (n * 4 + (k >> 1 & 3)) * 32 + reg


def prepare_x(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """For activations ``x [K]`` (K a multiple of ``128 x 8``): ``xb [G, 1024]`` fp16, group ``g``'s B operand
    (``x 2^-s`` in logical order in column ``g % 8``, zeros in the others) at :func:`b_slots`, and per group
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


@triton.jit
def _prepare_x_kernel(x_ptr, slot_ptr, xb_ptr, off_ptr, xs_ptr):
    # one program a group: x' = x 2^-s (s = 4 at group columns with bit 5 set: codes j % 8 >= 4) into its B
    # column's slots; the other columns of xb stay the zeros they were made with
    g = tl.program_id(0)
    k = tl.arange(0, 128)
    x = tl.load(x_ptr + g * 128 + k).to(tl.float32)
    xp = tl.where((k >> 5) & 1 == 1, x * 0.0625, x).to(tl.float16)
    slot = tl.load(slot_ptr + k * 8 + g % 8)
    tl.store(xb_ptr + g * 1024 + slot, xp)
    tl.store(off_ptr + g, 1024.0 * tl.sum(xp.to(tl.float32), axis=0))
    tl.store(xs_ptr + g, tl.sum(x, axis=0))


class PreparedX:
    """:func:`prepare_x` as one Triton launch into buffers made once (what the kernel before the GEMV would write:
    its epilogue could store the same slots), for activations of ``k`` inputs on ``device``."""

    def __init__(self, k: int, device):
        if k % (GROUP * BATCH_GROUPS):
            raise ValueError(f"activations must have a multiple of {GROUP * BATCH_GROUPS} columns, got {k}")
        g = k // GROUP
        self.slots = b_slots().to(device=device, dtype=torch.int32).contiguous()
        self.xb = torch.zeros(g, BATCH_GROUPS * GROUP, dtype=torch.float16, device=device)
        self.off = torch.empty(g, device=device)
        self.xs = torch.empty(g, device=device)

    def __call__(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        g = self.xb.shape[0]
        if x.numel() != g * GROUP:
            raise ValueError(f"these buffers take {g * GROUP} activations, got {x.numel()}")
        _prepare_x_kernel[(g,)](x, self.slots, self.xb, self.off, self.xs)
        return self.xb, self.off, self.xs


def unpack_x(xb: torch.Tensor) -> torch.Tensor:
    """:func:`prepare_x`'s ``x 2^-s`` back in logical order, ``[G, 128]`` (group ``g``'s column ``g % 8``)."""
    g = xb.shape[0]
    slots = b_slots().to(xb.device)
    gi = torch.arange(g, device=xb.device)
    return xb[gi[:, None], slots[:, gi % BATCH_GROUPS].t()]


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
    """The A operand the kernel multiplies for the field of planes ``e0 .. e0 + nf - 1``, ``[N, K]`` (float64, logical
    column order), from :func:`pack_fragment`'s words by :func:`_pj`'s operations: ``1024 + F 2^s`` at column
    ``8 j + 2 q + par`` of each group (``F`` the field's 4-bit value, absent planes zero)."""
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


def emulate_kernel(words, scale, zero, xb, off, xs, planes: int = PLANES) -> torch.Tensor:
    """:func:`frag_gemv_kernel`'s logical operations in PyTorch (float64), line by line, for the view of the first
    ``planes`` planes: the words' and B's renaming (:func:`_words`, :func:`_b_operand`), each field's pairs, joins
    and permute into its A operand, an accumulator a field over eight groups, and the epilogue. What it cannot check
    is the compiler's placement of those logical tensors in registers."""
    _, g, nb, _ = words.shape
    total = torch.zeros(nb * BLOCK_N, BATCH_GROUPS, dtype=torch.float64)
    fields = field_planes(planes)
    for b in range(nb):
        rows = slice(b * BLOCK_N, (b + 1) * BLOCK_N)
        for g0 in range(0, g, BATCH_GROUPS):
            acc = [torch.zeros(BLOCK_N, BATCH_GROUPS, dtype=torch.float64) for _ in fields]
            for i in range(BATCH_GROUPS):
                v = xb[g0 + i].double().reshape(32, 32)  # [lane, register], as loaded
                bop = v.reshape([2] * 10).permute(5, 6, 7, 8, 3, 4, 9, 0, 1, 2).reshape(GROUP, BATCH_GROUPS)
                for f, (e0, nf, _) in enumerate(fields):
                    w = []
                    for e in range(e0, e0 + nf):
                        v = words[e, g0 + i, b].reshape(128, 4)  # [thread, register], as loaded
                        t = v.reshape([2] * 9).permute(7, 0, 1, 8, 2, 3, 4, 5, 6).reshape(128, 4)  # _words
                        w.append(t.to(torch.int64) & 0xFFFFFFFF)
                    t = _tree_reference(w, nf, 0, 16)  # [128, 4, 2, 2, 2, 2, 2]
                    acc[f] += t.permute(0, 6, 5, 4, 3, 1, 2).reshape(BLOCK_N, GROUP) @ bop
            off_g = off[g0 : g0 + BATCH_GROUPS].double()
            c = sum((a - off_g) * wt for a, (_, _, wt) in zip(acc, fields, strict=True))
            sc = scale[rows, g0 : g0 + BATCH_GROUPS].double()
            zp = zero[rows, g0 : g0 + BATCH_GROUPS].double()
            total[rows] += sc * (c - zp * xs[g0 : g0 + BATCH_GROUPS].double())
    return total.sum(1)


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
    joins, and a permute into logical columns."""
    t = _tree(_words(ws[0], LW), _words(ws[1], LW), _words(ws[2], LW), _words(ws[3], LW), NF, 0, 16)
    a = ttgl.reshape(ttgl.permute(t, [0, 6, 5, 4, 3, 1, 2]), [t.shape[0], 128])  # column 8 j + 2 q + par
    return ttgl.convert_layout(a, AL, assert_trivial=True)  # registers already in place: no data moves


@gluon.jit
def _load_group(w_ptr, x_ptr, vofs, xofs, g, NB, PSTRIDE, P: ttgl.constexpr, p):
    """Group ``g``'s raw words (field 0, field 1 when the view may reach it) and its B operand's halves."""
    wp = w_ptr + g * NB * 512 + vofs
    xv = ttgl.load(x_ptr + g * 1024 + xofs)
    f0 = _load_field(wp, PSTRIDE, 0, min(P, 4) if P > 0 else 4, p, P == 0)
    if P == 0 or P > 4:
        f1 = _load_field(wp, PSTRIDE, 4, P - 4 if P > 0 else 4, p, P == 0)
    else:
        f1 = f0
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
        async_copy.async_copy_global_to_shared(smem.index(slot * SSTRIDE + e), wp + e * PSTRIDE)
    async_copy.commit_group()


@gluon.jit
def _stage_field(smem, slot, E0: ttgl.constexpr, NF: ttgl.constexpr, SSTRIDE: ttgl.constexpr, VL: ttgl.constexpr):
    """:func:`_load_field`'s raw words of a field, read back from ring slot ``slot`` (each thread its own)."""
    w0 = smem.index(slot * SSTRIDE + E0).load(VL)
    w1 = w0
    w2 = w0
    w3 = w0
    if NF >= 2:
        w1 = smem.index(slot * SSTRIDE + E0 + 1).load(VL)
    if NF >= 3:
        w2 = smem.index(slot * SSTRIDE + E0 + 2).load(VL)
    if NF >= 4:
        w3 = smem.index(slot * SSTRIDE + E0 + 3).load(VL)
    return w0, w1, w2, w3


@gluon.jit
def _view_total(w_ptr, s_ptr, z_ptr, x_ptr, off_ptr, xs_ptr, vofs, xofs, ro, no, NB, PSTRIDE, G, g_lo, GS, p,
                P: ttgl.constexpr, W0: ttgl.constexpr, W1: ttgl.constexpr, BN: ttgl.constexpr, BATCH: ttgl.constexpr,
                PREFETCH: ttgl.constexpr, LW: ttgl.constexpr, AL: ttgl.constexpr, BL: ttgl.constexpr,
                MMA: ttgl.constexpr, smem, STAGES: ttgl.constexpr, SSTRIDE: ttgl.constexpr,
                VL: ttgl.constexpr):  # fmt: skip
    """A program's ``[BN, 8]`` sums over groups ``g_lo .. g_lo + GS`` (their columns summed by the caller) of the
    view of ``P`` planes (compiled in) or, ``P == 0``, of ``p`` read on the device (whole fields, absent planes
    predicated off). ``STAGES`` > 0 (``P`` > 0): the words stream through a ring of that many groups in shared
    memory (``cp.async``, ``STAGES - 1`` groups in flight ahead of the decode) instead of registers."""
    if P == 0:
        w0 = (1 << (p + 4)).to(ttgl.float32) * (1.0 / 256.0)  # 2^(p - 4)
    total = ttgl.zeros([BN, 8], ttgl.float32, MMA)
    g_last = g_lo + GS - 1
    if STAGES > 0:
        for s in ttgl.static_range(STAGES - 1):
            _stage_issue(smem, w_ptr, vofs, ttgl.minimum(g_lo + s, g_last), s, NB, PSTRIDE, P, SSTRIDE)
    elif PREFETCH:
        nxt = _load_group(w_ptr, x_ptr, vofs, xofs, g_lo, NB, PSTRIDE, P, p)
    for g0 in range(g_lo, g_lo + GS, BATCH):
        acc = ttgl.zeros([BN, 8], ttgl.float32, MMA)  # column n: group g0 - g0 % 8 + n's sum of F0 x'
        acc1 = ttgl.zeros([BN, 8], ttgl.float32, MMA)  # and of F1 x' (P > 4)
        for i in ttgl.static_range(BATCH):
            if STAGES > 0:
                j = g0 + i - g_lo
                _stage_issue(smem, w_ptr, vofs, ttgl.minimum(g0 + i + STAGES - 1, g_last), (j + STAGES - 1) % STAGES,
                             NB, PSTRIDE, P, SSTRIDE)  # fmt: skip
                async_copy.wait_group(STAGES - 1)  # group g0 + i's copies have landed
                f0 = _stage_field(smem, j % STAGES, 0, min(P, 4), SSTRIDE, VL)
                f1 = f0
                if P > 4:
                    f1 = _stage_field(smem, j % STAGES, 4, P - 4, SSTRIDE, VL)
                cur = (f0, f1, ttgl.load(x_ptr + (g0 + i) * 1024 + xofs))
            elif PREFETCH:
                cur = nxt
                nxt = _load_group(w_ptr, x_ptr, vofs, xofs, ttgl.minimum(g0 + i + 1, g_last), NB, PSTRIDE, P, p)
            else:
                cur = _load_group(w_ptr, x_ptr, vofs, xofs, g0 + i, NB, PSTRIDE, P, p)
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
            off = ttgl.load(off_ptr + gcol)[None, :]
            xs = ttgl.load(xs_ptr + gcol)
        else:  # the columns of this batch's groups only (the others' steps read as zeros)
            cm = (gcol >= g0) & (gcol < g0 + BATCH)
            sc = ttgl.load(s_ptr + ro[:, None] * G + gcol[None, :], mask=cm[None, :], other=0.0).to(ttgl.float32)
            zp = ttgl.load(z_ptr + ro[:, None] * G + gcol[None, :], mask=cm[None, :], other=0.0).to(ttgl.float32)
            off = ttgl.load(off_ptr + gcol, mask=cm, other=0.0)[None, :]
            xs = ttgl.load(xs_ptr + gcol, mask=cm, other=0.0)
        if P == 0:
            c = (acc - off) * w0
            if p > 4:
                c += (acc1 - off) * (w0 * (1.0 / 16.0))
        else:
            c = (acc - off) * W0
            if P > 4:
                c += (acc1 - off) * W1
        total += sc * (c - zp * xs[None, :])
    return total


@gluon.jit
def frag_gemv_kernel(w_ptr, s_ptr, z_ptr, x_ptr, off_ptr, xs_ptr, out_ptr, p_ptr, N, PSTRIDE, VSTRIDE, G, GS,
                     P: ttgl.constexpr, W0: ttgl.constexpr, W1: ttgl.constexpr, BN: ttgl.constexpr,
                     SPLIT: ttgl.constexpr, BATCH: ttgl.constexpr, PREFETCH: ttgl.constexpr,
                     PMIN: ttgl.constexpr, STAGES: ttgl.constexpr):  # fmt: skip
    # BATCH groups (8, 4, 2 or 1) share an accumulator, group g in its column g % 8; PREFETCH: the next group's
    # words and activations are loaded before this one's decode (in flight under it)
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
    # B: lane 4 n + (k >> 1 & 3) of every warp loads its 32 consecutive halves (prepare_x's b_slots)
    XV: ttgl.constexpr = ttgl.DistributedLinearLayout(
        reg_bases=[[0, 1], [0, 2], [0, 4], [0, 8], [0, 16]], lane_bases=[[1, 0], [2, 0], [4, 0], [8, 0], [16, 0]],
        warp_bases=[[0, 0], [0, 0]], block_bases=[], shape=[32, 32],
    )  # fmt: skip
    xl = ttgl.arange(0, 32, layout=ttgl.SliceLayout(1, XV))
    xr = ttgl.arange(0, 32, layout=ttgl.SliceLayout(0, XV))
    xofs = xl[:, None] * 32 + xr[None, :]
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
    SSTRIDE: ttgl.constexpr = P if P > 0 else 8
    SL: ttgl.constexpr = ttgl.SwizzledSharedLayout(vec=1, per_phase=1, max_phase=1, order=[1, 0])
    if STAGES > 0:
        smem = ttgl.allocate_shared_memory(ttgl.int32, [STAGES * SSTRIDE, BN, 4], SL)  # the words' ring
    else:
        smem = 0
    if P == -1:  # the view read on the device, one compiled body per view from PMIN planes up
        p = ttgl.load(p_ptr)
        s_ptr += (p - 1) * VSTRIDE
        z_ptr += (p - 1) * VSTRIDE
        total = ttgl.zeros([BN, 8], ttgl.float32, MMA)
        for q in ttgl.static_range(PMIN, 9):
            if p == q:
                total = _view_total(w_ptr, s_ptr, z_ptr, x_ptr, off_ptr, xs_ptr, vofs, xofs, ro, no, NB, PSTRIDE, G,
                                    g_lo, GS, q, q, (1 << (q + 4)) / 256, (1 << (q + 4)) / 4096, BN, BATCH, PREFETCH,
                                    LW, AL, BL, MMA, smem, STAGES, SSTRIDE, VL)  # fmt: skip
    else:
        if P == 0:
            p = ttgl.load(p_ptr)
            s_ptr += (p - 1) * VSTRIDE
            z_ptr += (p - 1) * VSTRIDE
        else:
            p = P
        total = _view_total(w_ptr, s_ptr, z_ptr, x_ptr, off_ptr, xs_ptr, vofs, xofs, ro, no, NB, PSTRIDE, G, g_lo, GS,
                            p, P, W0, W1, BN, BATCH, PREFETCH, LW, AL, BL, MMA, smem, STAGES, SSTRIDE,
                            VL)  # fmt: skip
    if SPLIT:
        ttgl.atomic_add(out_ptr + ro, ttgl.sum(total, axis=1))
    else:
        ttgl.store(out_ptr + ro, ttgl.sum(total, axis=1))


def _launch_args(words, scale, zero, xb, off, xs, out, splits=1, planes=None, batch=BATCH_GROUPS, prefetch=False,
                 dispatch=None, stages=0):  # fmt: skip
    """``planes``: an int (the view, compiled in), None (every plane of the pack) or an int32 device tensor of one
    element (the view read by the kernel; ``scale``/``zero`` then ``[planes of the pack, N, G]``, view ``p`` at
    ``p - 1``). ``dispatch``, with a device view: None decodes whole fields with the absent planes predicated off;
    an int ``PMIN`` branches to a compiled body per view of ``PMIN`` to 8 planes. ``stages`` > 1: the words
    through a ring of that many groups in shared memory (not with whole fields on the device)."""
    n, g = words.shape[2] * BLOCK_N, xb.shape[0]
    planes = words.shape[0] if planes is None else planes
    if batch not in (1, 2, 4, 8) or g % (splits * batch):
        raise ValueError(
            f"splits={splits}, batch={batch}: the {g} groups must split into multiples of the batch (1, 2, 4 or 8)"
        )
    pmin = 1
    if isinstance(planes, torch.Tensor):
        if scale.dim() != 3 or scale.shape[0] != words.shape[0]:
            raise ValueError(f"planes on the device: scale and zero must be [{words.shape[0]}, N, G] (one per view)")
        p_ptr, pc, wts, vstride = planes, 0, [0.0, 0.0], scale[0].numel()
        if dispatch is not None:
            if words.shape[0] != 8 or not 1 <= dispatch <= 8:
                raise ValueError(f"dispatch from {dispatch} planes needs an 8-plane pack and 1 <= PMIN <= 8")
            pc, pmin = -1, dispatch
    else:
        if not 1 <= planes <= words.shape[0]:
            raise ValueError(f"a view of {planes} planes: the pack holds {words.shape[0]}")
        p_ptr, pc, vstride = out, planes, 0
        wts = [wt for _, _, wt in field_planes(planes)] + [0.0]
    args = (words, scale, zero, xb, off, xs, out, p_ptr, n, words[0].numel(), vstride, g, g // splits)
    if stages and (pc == 0 or stages < 2):
        raise ValueError(f"stages={stages}: a ring of at least 2 groups, for a view compiled in or dispatched")
    kw = dict(P=pc, W0=wts[0], W1=wts[1], BN=BLOCK_N, SPLIT=splits > 1, BATCH=batch, PREFETCH=prefetch, PMIN=pmin)
    kw["STAGES"] = stages
    return args, dict(kw, num_warps=4)


def split_choices(k: int, batch: int = BATCH_GROUPS, most: int = 16) -> list[int]:
    """The K splits a layer of ``k`` inputs allows: divisors of its number of ``batch``-group batches, up to
    ``most``."""
    b = k // (GROUP * batch)
    return [s for s in range(1, min(b, most) + 1) if b % s == 0]


def count(n, k, splits=1, planes=PLANES, batch=BATCH_GROUPS, prefetch=False, dispatch=None, stages=0):
    """Compile for sm_90 without a GPU and print the group loop's instructions a code."""
    from triton.experimental.gluon._runtime import GluonASTSource

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import offline_sass as osx

    g = k // GROUP
    words = torch.zeros(planes or 8, g, n // BLOCK_N, BLOCK_N * 4, dtype=torch.int32)
    sc = torch.zeros(*([8] if planes == 0 else []), n, g, dtype=torch.float16)
    xb = torch.zeros(g, BATCH_GROUPS * GROUP, dtype=torch.float16)
    vec = torch.zeros(g)
    out = torch.zeros(n)
    view = torch.zeros(1, dtype=torch.int32) if planes == 0 else planes
    args, kw = _launch_args(words, sc, sc, xb, vec, vec, out, splits, view, batch, prefetch, dispatch, stages)
    ck = osx.compile_sm90(frag_gemv_kernel, args, kw, source=GluonASTSource)
    sass, res = osx.sass_and_resources(ck)
    codes = BLOCK_N * GROUP * batch / 128  # codes a thread decodes an iteration of the batch loop
    what = (f"{planes} planes" if planes else "planes read on the device") + f", batch {batch}"
    what += ", prefetch" if prefetch else ""
    what += f", a body per view from {dispatch} planes" if dispatch else ""
    what += f", a ring of {stages} groups" if stages else ""
    osx.report(sass, res, codes, f"frag_gemv_kernel, {what}, BN={BLOCK_N} (triton {triton.__version__})")


def frag_gemv(words, scale, zero, x, prepared=None, out=None, splits=1, planes=None, batch=BATCH_GROUPS,
              prefetch=False, dispatch=None, maxnreg=None, stages=0):  # fmt: skip
    """``W x`` on a GPU for one token ``x [K]`` (``W = scale (C - zero)`` per row and group, ``scale``/``zero``
    ``[N, G]`` fp16, ``C`` the code of the first ``planes`` planes, default all); ``prepared``: :func:`prepare_x`'s
    tensors, made once per token (else made here); ``splits``: programs along K per row block (their sums added
    atomically into ``out``, zeroed here first)."""
    xb, off, xs = prepare_x(x) if prepared is None else prepared
    n = words.shape[2] * BLOCK_N
    out = torch.empty(n, device=words.device) if out is None else out
    args, kw = _launch_args(words, scale, zero, xb, off, xs, out, splits, planes, batch, prefetch, dispatch, stages)
    if maxnreg:
        kw["maxnreg"] = maxnreg
    if splits > 1:
        out.zero_()
    frag_gemv_kernel[(n // BLOCK_N, splits)](*args, **kw)
    return out


#: LLaMA-3-8B's one-token GEMV shapes (rows, inputs)
SHAPES = {"q/o 4096x4096": (4096, 4096), "gate/up 14336x4096": (14336, 4096), "down 4096x14336": (4096, 14336)}


#: the views timed and checked on the 8B shapes: the package's default layout [3, 1, 1, 1, 1, 1] at k = 1, 2, 4, 6
VIEWS = (3, 4, 6, 8)
#: (groups an accumulator, prefetch) timed at every K split that gives 64 to 4096 programs (and checked)
CONFIGS = ((8, False), (8, True), (4, True), (2, True), (1, True))
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
            c = (codes >> (8 - p)).double().reshape(n, -1, GROUP)
            ref = ((c - zero.double()[:, :, None]) * scale.double()[:, :, None]).reshape(n, k) @ x.double()
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
                        y = frag_gemv(words, sc, zp, x.cuda(), None, None, splits, planes, batch, prefetch, dispatch,
                                      None, stages)  # fmt: skip
                        err = float((y.double().cpu() - ref).abs().max() / ref.abs().max())
                        print(
                            f"check {name}, {p} planes {how}, batch {batch}, prefetch {int(prefetch)}, {splits} K "
                            f"splits: max |error| / max |ref| = {err:.2e}"
                        )


def time_shapes(copies, reps, sweep=False):
    """us per launch in a CUDA graph of ``reps`` launches over ``copies`` weight copies (past L2): this kernel at
    each view of an 8-plane pack (the activations prepared once, outside; its fastest K split), the package's one-bit
    plane GEMV at the same view of [3, 1, 1, 1, 1, 1] (the same planes), fp16 cuBLAS; and the activations'
    preparation alone (one launch). ``config``: the fastest (batch, prefetch, K splits) of :data:`CONFIGS`
    (``sweep``) or :data:`BEST`'s. The same view read by the kernel on the device (a routed token's path) at that
    config: ``on_device_us`` whole fields with absent planes predicated off, ``dispatch_us`` a compiled body per view
    of 3-8 planes, ``dispatch128_us`` the same capped at 128 registers; ``ringS_us``: the view compiled in with its
    words through a ring of ``S`` groups in shared memory (``cp.async``) at the best batch and split. ``pct_copy``:
    of the copy bandwidth of ``kernel_bench.copy_bandwidth`` (decode_bench's), measured in the same run."""
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
        prep = PreparedX(k, dev)
        prepared = prep(x)
        t_prep = sp.graph_time([partial(prep, x)], reps)
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
                for s in split_choices(k, batch, 64) if sweep else [BEST[name, p][2]]:
                    if 64 <= s * n // BLOCK_N <= 4096:
                        fns = [partial(frag_gemv, w, sc, zp, x, prepared, out, s, p, batch, pf) for w in words]
                        t_split[batch, pf, s] = sp.graph_time(fns, reps)
            best = min(t_split, key=t_split.get)
            on_device = torch.tensor([p], dtype=torch.int32, device=dev)
            t_dev = {}
            for mode, extra in (("on_device_us", {}), ("dispatch_us", dict(dispatch=3)),
                                ("dispatch128_us", dict(dispatch=3, maxnreg=128))):  # fmt: skip
                fns = [partial(frag_gemv, w, scales, zeros, x, prepared, out, best[2], on_device, best[0], best[1],
                               **extra) for w in words]  # fmt: skip
                t_dev[mode] = sp.graph_time(fns, reps)
            for st in RINGS:  # the words through shared memory instead of the prefetch, at the best batch and split
                fns = [partial(frag_gemv, w, sc, zp, x, prepared, out, best[2], p, best[0], False, stages=st)
                       for w in words]  # fmt: skip
                t_dev[f"ring{st}_us"] = sp.graph_time(fns, reps)
            t_pkg = sp.graph_time([partial(tb.bitplane_linear_bits, x2, b, p - 2, out=o16) for b in bps], reps)
            nbytes = n * k * p / 8 + 2 * n * g * 2
            by_cfg = {}
            for (b_, pf, s_), t in t_split.items():
                by_cfg.setdefault(f"b{b_}{'p' if pf else ''}", []).append(f"{s_}:{t:.1f}")
            print(f"{name} {p} planes, us by batch (p: prefetch) and splits: "
                  + "; ".join(f"{c} " + " ".join(v) for c, v in by_cfg.items()), flush=True)  # fmt: skip
            rows.append(dict(shape=name, bits=p, gluon_us=t_split[best], config=best, **t_dev,
                             package_us=t_pkg, fp16_us=t16,
                             x_fp16=t16 / t_split[best], x_package=t_pkg / t_split[best],
                             pct_copy=100 * nbytes / (t_split[best] * 1e-6) / bw, prepare_us=t_prep))  # fmt: skip
            cells = [f"{c}={v:.2f}" if isinstance(v, float) else f"{c}={v}" for c, v in rows[-1].items()]
            print("row " + " ".join(cells), flush=True)
        del words, bps, w16
        torch.cuda.empty_cache()
    df = pd.DataFrame(rows)
    print(df.to_string(index=False, float_format=lambda v: f"{v:.2f}"))
    return df


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=4096, help="rows (offline count)")
    ap.add_argument("--in-features", type=int, default=4096, help="inputs (offline count), a multiple of 1024")
    ap.add_argument("--planes", type=int, default=PLANES, choices=range(9),
                    help="planes of the view (count); 0: read on the device, 8 planes packed")  # fmt: skip
    ap.add_argument("--batch", type=int, default=BATCH_GROUPS, choices=(1, 2, 4, 8), help="groups an accumulator")
    ap.add_argument("--dispatch", type=int, default=None, help="--planes 0: a compiled body per view from this many")
    ap.add_argument("--stages", type=int, default=0, help="a ring of this many groups in shared memory (cp.async)")
    ap.add_argument("--prefetch", action="store_true", help="the next group's loads before this one's decode")
    ap.add_argument("--splits", type=int, default=1, help="K splits (offline count; >1: the atomic-add epilogue)")
    ap.add_argument("--check", action="store_true", help="on a GPU: against PyTorch on random codes, 8B shapes")
    ap.add_argument("--time", action="store_true", help="on a GPU: 8B shapes beside the package and fp16 cuBLAS")
    ap.add_argument("--sweep", action="store_true", help="--time: every config of CONFIGS (else BEST's)")
    ap.add_argument("--copies", type=int, default=8, help="--time: weight copies (past L2)")
    ap.add_argument("--reps", type=int, default=32, help="--time: launches a graph")
    a = ap.parse_args(argv)
    if not (a.check or a.time):
        if a.in_features % (GROUP * BATCH_GROUPS) or a.n % BLOCK_N:
            ap.error(f"--in-features must be a multiple of 1024 and --n of {BLOCK_N}")
        if a.splits not in split_choices(a.in_features, a.batch, a.in_features):
            ap.error(f"--splits {a.splits}: {a.in_features} inputs allow {split_choices(a.in_features, a.batch)}")
        count(a.n, a.in_features, a.splits, a.planes, a.batch, a.prefetch, a.dispatch, a.stages)
        return 0
    if not torch.cuda.is_available():
        ap.error("--check and --time need a CUDA GPU")
    if a.check:
        check()
    if a.time:
        time_shapes(a.copies, a.reps, a.sweep)
    return 0


if __name__ == "__main__":
    sys.exit(main())

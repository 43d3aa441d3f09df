"""Triton kernels for MoBiSlice bit-plane weights: read only the first ``k`` planes, rebuild, multiply.

Storage (see :class:`mobiquant.nn.linear.MoBiLinear`): plane ``e`` is int32 ``[out, ceil(in / per_e)]``
with ``per_e = 32 // b_e`` codes per word, the first code in the least significant bits; ``scale`` and
``zero`` are fp16 ``[out, n_groups]``. The ``k``-slice weight is
``W_k = (s / 2^B_k) (C_k - 2^B_k z - (2^B_k - 1) / 2)``, ``C_k = sum_e q_e << (b_(e+1) + ... + b_k)``,
which telescopes into per-plane residuals ``W_k = sum_(e<=k) D_e`` with
``D_1 = s (q_1 - z)`` and ``D_e = s 2^-B_e (q_e - (2^b_e - 1) / 2)``.

A pair per view: ``scale`` and ``zero`` may instead be ``[K, out, n_groups]`` (``K = len(slice_bits)``), and view
``k`` reads ``s = scale[k - 1]``, ``z = zero[k - 1]`` in the same formula, i.e. per group
``W_k = s_k (sum_(e<=k) 2^-B_e (q_e - c_e) - z_k)`` with the per-plane constants ``c_e`` above: the per-plane
accumulations stay shared, and only the step and zero point applied to a token's sum are those of its own ``k``.
Where ``k`` is known on the host at launch (an int, the tile and dequantize launches, a per-token ``k`` held on the
host that is the same for every token) the host passes view ``k``'s ``[out, n_groups]`` pair, so those launches
compile to the kernels of a shared pair; where it is read on the device (a per-token ``k`` of several tokens, one
token's ``k`` in a device tensor as in a captured CUDA graph) a ``PER_VIEW`` body offsets or gathers the pair by
``k`` (the one-bit plane buffers hold one set of step and zero point words per view).

Paths (``bitplane_linear(..., path=)``):

* ``bits``, one token, any layout of at most 8 bits in all (the default 3-1-1-1-1-1 included), opt-in with
  ``SmallConfig(bitplanes=True)``: ``_bp_gemv_bits_kernel`` on buffers built from the planes at load time
  (:func:`pack_bitplanes`: every slice split into one-bit planes, so view ``k`` is the first ``b_1 + .. + b_k``
  planes). Code fields read in place as subnormals (one AND and one FMA per code), a stream-K grid whose
  programs stream whole groups, activations loaded straight in the words' layout. See the section's comment.
* ``small``, one token, planes ``1..k`` of one width (e.g. 2-2-2-2), ``k <= FIELDS_MAX_K`` by default:
  ``_bp_gemv_fields_kernel`` on CUDA cores. Each code's field is masked out of its word where it lies
  (one AND per code and plane, one shift per word and plane) and read as a subnormal fp32; the
  activations are scaled per code position so that one FMA per code accumulates ``x C``. Words come
  in 16-byte loads (row strides passed from the host).
* ``small``, one token, other layouts and larger ``k``: ``_bp_gemv_kernel`` on CUDA cores. The token has one ``k``, so
  its planes are OR-ed straight into the bits of the fp32 ``1 + C_k / 2^bits`` (each code shifted to its
  place under the mantissa's top: one shift and one mask per code and plane, no int->float conversion)
  and the dot product needs one multiply-add per weight whatever ``k``. In both kernels the group's
  scale and zero point are applied once per group from ``sum(x)``.
* ``small``, 2..16 tokens: ``_bp_small_kernel`` on tensor cores. Every program covers all tokens and
  ``BLOCK_N`` output rows and reads each plane once, up to the largest ``k`` among its tokens. Same ``k``
  for all tokens: one dot on the concatenated code (as above, in the activation dtype when it holds the
  bits exactly). Mixed ``k``: one dot per plane with each token's activations gated by ``k_token > e``
  (the base plane is shared by every token); codes enter as exact ``1 + q / 2^b``.
  Both small kernels issue every needed plane's loads before decoding (planes past the largest ``k`` are
  masked off: no traffic) and may split K with an in-kernel serial reduction (the last program of an
  output tile sums the partials; self-resetting counters), so one launch either way.
* ``tile``: ``_bp_tile_kernel``, dequantize a ``[BLOCK_N, BLOCK_K]`` tile by shift-and-add of the first
  ``k`` planes (``k`` a compile-time constant), apply scale and zero, ``tl.dot`` (wgmma on Hopper).
  Mixed ``k``: tokens are sorted by ``k`` on the device, one launch per possible ``k`` reads its segment
  through the permutation and scatters rows back in place; programs past the segment's end exit at once.
  No host synchronisation. Also the path for layouts the small kernels do not cover (codes per word not a
  power of two, group sizes without a power-of-two chunk).
* ``dequant``: ``W_k`` by one Triton pass into a scratch buffer, then cuBLAS; 'auto' on CUDA for one view from 2
  tokens, for per-token views from ``DEQUANT_MIN_TOKENS`` (measured faster than ``small`` and ``tile`` there on an
  H200).

Codes are split out of their words by a tree of ``tl.join`` (``_expand_at``), which keeps all codes of a
word in the thread that loaded it.

Self-contained (torch and triton only) so that benchmarks can load it without the rest of the package.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
import triton
import triton.language as tl

from . import capturing, int4
from .triton_router import (
    PROLOGUES,
    RouterPartials,
    _check_pdl,
    _interpreting,
    _pdl_launch_dependents,
    _pdl_wait,
    _prefetch_l2,
    _router_part,
    _router_values,
    prologue_operand,
)

MAX_SLICES = 8
_DT_CODES = {torch.float16: 0, torch.bfloat16: 1, torch.float32: 2}


# ----------------------------------------------------------------------------------------------- helpers
@triton.jit
def _decode(
    plane_ptr,
    rows,
    row_mask,
    col0,
    K_IN,
    B: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    STRUCT: tl.constexpr,
):
    """Codes ``[BLOCK_N, BLOCK_K]`` (int32) of columns ``col0 ..`` of one plane.

    STRUCT: ``32 // B`` is a power of two dividing ``BLOCK_K`` and ``col0``: load whole words once and
    expand them by a broadcast shift; otherwise every element gathers its word (any bit-width)."""
    PER: tl.constexpr = 32 // B
    MASK: tl.constexpr = (1 << B) - 1
    n_words = (K_IN + PER - 1) // PER
    if STRUCT:
        NW: tl.constexpr = BLOCK_K // PER
        w_idx = col0 // PER + tl.arange(0, NW)
        words = tl.load(
            plane_ptr + rows[:, None].to(tl.int64) * n_words + w_idx[None, :],
            mask=row_mask[:, None] & (w_idx[None, :] < n_words),
            other=0,
        )
        codes = _expand(words, B, BLOCK_N, BLOCK_K)
    else:
        cols = col0 + tl.arange(0, BLOCK_K)
        words = tl.load(
            plane_ptr + rows[:, None].to(tl.int64) * n_words + (cols // PER)[None, :],
            mask=row_mask[:, None] & (cols[None, :] < K_IN),
            other=0,
        )
        codes = (words >> ((cols % PER) * B)[None, :]) & MASK
    return codes


@triton.jit
def _cast(v, DT: tl.constexpr):
    if DT == 0:
        return v.to(tl.float16)
    elif DT == 1:
        return v.to(tl.bfloat16)
    else:
        return v.to(tl.float32)


@triton.jit
def _load_words(
    plane_ptr, WS, rows, row_mask, col0, K_IN, B: tl.constexpr, BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr
):
    """Words ``[BLOCK_N, BLOCK_K // per]`` covering columns ``col0 ..`` (``col0`` a multiple of per);
    rows off in ``row_mask`` (outside the layer, or a plane no token of the tile needs) are not read.

    ``WS`` is the plane's row stride in words, passed from the host so that Triton specialises it (a
    multiple of 16 makes every row start 16-byte aligned: 16-byte vector loads). ``EVEN_K``: ``BLOCK_K``
    divides ``K_IN``, no column mask (a mask that varies along the row would split the vectors).

    A width whose codes per word are no power of two (3, 5 or 6 bits: 10, 6 or 5 codes and unused top bits) has
    no chunk of whole words inside a power-of-two group: each column gathers its word and the codes
    ``[BLOCK_N, BLOCK_K]`` come back already shifted down and masked (:func:`_expand_at` then only places them)."""
    PER: tl.constexpr = 32 // B
    if (PER & (PER - 1)) != 0:
        cols = col0 + tl.arange(0, BLOCK_K)
        words = tl.load(
            plane_ptr + rows[:, None].to(tl.int64) * WS + (cols // PER)[None, :],
            mask=row_mask[:, None] & (cols[None, :] < K_IN),
            other=0,
        )
        return (words >> ((cols % PER) * B)[None, :]) & ((1 << B) - 1)
    else:  # an else, not code after the return: the compiler builds both (tl.arange wants a power of two)
        NW: tl.constexpr = BLOCK_K // PER
        w_idx = col0 // PER + tl.arange(0, NW)
        ptrs = plane_ptr + rows[:, None].to(tl.int64) * WS + w_idx[None, :]
        if EVEN_K:
            return tl.load(ptrs, mask=row_mask[:, None], other=0)
        n_words = (K_IN + PER - 1) // PER
        return tl.load(ptrs, mask=row_mask[:, None] & (w_idx[None, :] < n_words), other=0)


@triton.jit
def _ex1(w, SB: tl.constexpr, ST: tl.constexpr, MASK: tl.constexpr, POS: tl.constexpr):
    # the code at bits SB.. of each word, moved to bits POS.. (one shift and one mask)
    if POS >= SB:
        return (w << (POS - SB)) & (MASK << POS)
    else:
        return (w >> (SB - POS)) & (MASK << POS)


@triton.jit
def _ex2(w, SB: tl.constexpr, ST: tl.constexpr, MASK: tl.constexpr, POS: tl.constexpr):
    return tl.join(_ex1(w, SB, 2 * ST, MASK, POS), _ex1(w, SB + ST, 2 * ST, MASK, POS))


@triton.jit
def _ex4(w, SB: tl.constexpr, ST: tl.constexpr, MASK: tl.constexpr, POS: tl.constexpr):
    return tl.join(_ex2(w, SB, 2 * ST, MASK, POS), _ex2(w, SB + ST, 2 * ST, MASK, POS))


@triton.jit
def _ex8(w, SB: tl.constexpr, ST: tl.constexpr, MASK: tl.constexpr, POS: tl.constexpr):
    return tl.join(_ex4(w, SB, 2 * ST, MASK, POS), _ex4(w, SB + ST, 2 * ST, MASK, POS))


@triton.jit
def _ex16(w, SB: tl.constexpr, ST: tl.constexpr, MASK: tl.constexpr, POS: tl.constexpr):
    return tl.join(_ex8(w, SB, 2 * ST, MASK, POS), _ex8(w, SB + ST, 2 * ST, MASK, POS))


@triton.jit
def _ex32(w, SB: tl.constexpr, ST: tl.constexpr, MASK: tl.constexpr, POS: tl.constexpr):
    return tl.join(_ex16(w, SB, 2 * ST, MASK, POS), _ex16(w, SB + ST, 2 * ST, MASK, POS))


@triton.jit
def _expand_at(words, B: tl.constexpr, POS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """Words ``[BLOCK_N, BLOCK_K // per]`` -> codes ``[BLOCK_N, BLOCK_K]`` (int32) shifted to bit ``POS``,
    column order kept.

    A tree of ``tl.join`` (the joined axis is the minor one and stays inside a thread) splits each word
    into its codes in registers: even codes then odd codes at every level, so the flattened minor axes
    count the codes in storage order. (A broadcast shift over a third axis would spread the codes of one
    word across lanes and copy every word to each of them through shared memory.)"""
    PER: tl.constexpr = 32 // B
    MASK: tl.constexpr = (1 << B) - 1
    if (PER & (PER - 1)) != 0:  # codes gathered one per column by _load_words
        return words << POS
    else:  # (as in _load_words: code after a constexpr branch's return is built too)
        if PER == 1:
            codes = _ex1(words, 0, B, MASK, POS)
        elif PER == 2:
            codes = _ex2(words, 0, B, MASK, POS)
        elif PER == 4:
            codes = _ex4(words, 0, B, MASK, POS)
        elif PER == 8:
            codes = _ex8(words, 0, B, MASK, POS)
        elif PER == 16:
            codes = _ex16(words, 0, B, MASK, POS)
        else:
            codes = _ex32(words, 0, B, MASK, POS)
        return tl.reshape(codes, (BLOCK_N, BLOCK_K))


@triton.jit
def _expand(words, B: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    return _expand_at(words, B, 0, BLOCK_N, BLOCK_K)


@triton.jit
def _small_proc(
    T,
    x,
    kvec,
    words,
    A,
    E: tl.constexpr,
    B: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    MAGIC: tl.constexpr,
    DT: tl.constexpr,
):
    """``T += (x * [k > E] * A) @ f^T`` with ``f = 1 + q / 2^B`` (MAGIC) or ``f = q``."""
    if MAGIC:
        if DT == 0:
            f = _bits_to(_expand_at(words, B, 10 - B, BLOCK_N, BLOCK_K) | 0x3C00, DT)
        elif DT == 1:
            f = _bits_to(_expand_at(words, B, 7 - B, BLOCK_N, BLOCK_K) | 0x3F80, DT)
        else:
            f = _bits_to(_expand_at(words, B, 23 - B, BLOCK_N, BLOCK_K) | 0x3F800000, DT)
    else:
        f = _cast(_expand(words, B, BLOCK_N, BLOCK_K), DT)
    xa = x * tl.where(kvec > E, A, 0.0)[:, None]
    if DT == 2:
        T = tl.dot(xa, tl.trans(f), T, input_precision="ieee")
    else:
        T = tl.dot(_cast(xa, DT), tl.trans(f), T)
    return T


@triton.jit
def _small_maybe(
    T,
    x,
    kvec,
    kmax,
    words,
    A,
    E: tl.constexpr,
    B: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    MAGIC: tl.constexpr,
    DT: tl.constexpr,
    PER_TOKEN: tl.constexpr,
):
    if PER_TOKEN:
        if kmax > E:
            T = _small_proc(T, x, kvec, words, A, E, B, BLOCK_N, BLOCK_K, MAGIC, DT)
    else:
        T = _small_proc(T, x, kvec, words, A, E, B, BLOCK_N, BLOCK_K, MAGIC, DT)
    return T


@triton.jit
def _or_plane(
    fb,
    words,
    kk,
    E: tl.constexpr,
    B: tl.constexpr,
    POS: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    PER_TOKEN: tl.constexpr,
):
    """OR plane ``E``'s codes into the concatenated code at bit ``POS`` (skipped when k <= E)."""
    if PER_TOKEN:
        if kk > E:
            fb = fb | _expand_at(words, B, POS, BLOCK_N, BLOCK_K)
    else:
        fb = fb | _expand_at(words, B, POS, BLOCK_N, BLOCK_K)
    return fb


@triton.jit
def _select(kv, H0, H1, H2, H3, H4, H5, H6, H7, NS: tl.constexpr):
    """``H[k - 1]`` per entry of ``kv``."""
    h = tl.where(kv == 1, H0, 0.0)
    if NS > 1:
        h += tl.where(kv == 2, H1, 0.0)
    if NS > 2:
        h += tl.where(kv == 3, H2, 0.0)
    if NS > 3:
        h += tl.where(kv == 4, H3, 0.0)
    if NS > 4:
        h += tl.where(kv == 5, H4, 0.0)
    if NS > 5:
        h += tl.where(kv == 6, H5, 0.0)
    if NS > 6:
        h += tl.where(kv == 7, H6, 0.0)
    if NS > 7:
        h += tl.where(kv == 8, H7, 0.0)
    return h


@triton.jit
def _concat_bits(
    w0,
    w1,
    w2,
    w3,
    w4,
    w5,
    w6,
    w7,
    kk,
    ONE: tl.constexpr,
    TOP: tl.constexpr,
    KMAX: tl.constexpr,
    B0: tl.constexpr,
    B1: tl.constexpr,
    B2: tl.constexpr,
    B3: tl.constexpr,
    B4: tl.constexpr,
    B5: tl.constexpr,
    B6: tl.constexpr,
    B7: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    PER_TOKEN: tl.constexpr,
):
    """Bits of the float ``1 + C_k / 2^(b_1 + .. + b_k)``: each plane's codes go straight to their place
    under the mantissa's top (``TOP`` mantissa bits, ``ONE`` the bits of 1.0): one shift and one mask
    (and one OR) per code and plane, no int->float conversion."""
    P0: tl.constexpr = TOP - B0
    P1: tl.constexpr = P0 - B1
    P2: tl.constexpr = P1 - B2
    P3: tl.constexpr = P2 - B3
    P4: tl.constexpr = P3 - B4
    P5: tl.constexpr = P4 - B5
    P6: tl.constexpr = P5 - B6
    P7: tl.constexpr = P6 - B7
    fb = _expand_at(w0, B0, P0, BLOCK_N, BLOCK_K) | ONE
    if KMAX > 1:
        fb = _or_plane(fb, w1, kk, 1, B1, P1, BLOCK_N, BLOCK_K, PER_TOKEN)
    if KMAX > 2:
        fb = _or_plane(fb, w2, kk, 2, B2, P2, BLOCK_N, BLOCK_K, PER_TOKEN)
    if KMAX > 3:
        fb = _or_plane(fb, w3, kk, 3, B3, P3, BLOCK_N, BLOCK_K, PER_TOKEN)
    if KMAX > 4:
        fb = _or_plane(fb, w4, kk, 4, B4, P4, BLOCK_N, BLOCK_K, PER_TOKEN)
    if KMAX > 5:
        fb = _or_plane(fb, w5, kk, 5, B5, P5, BLOCK_N, BLOCK_K, PER_TOKEN)
    if KMAX > 6:
        fb = _or_plane(fb, w6, kk, 6, B6, P6, BLOCK_N, BLOCK_K, PER_TOKEN)
    if KMAX > 7:
        fb = _or_plane(fb, w7, kk, 7, B7, P7, BLOCK_N, BLOCK_K, PER_TOKEN)
    return fb


@triton.jit
def _splitk_store(
    acc,
    out_ptr,
    part_ptr,
    lock_ptr,
    bias_ptr,
    offs_m,
    m_mask,
    rows,
    row_mask,
    N,
    stride_om,
    pid_n,
    pid_k,
    HAS_BIAS: tl.constexpr,
    SPLIT_K: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """Store ``acc`` ``[BLOCK_M, BLOCK_N]`` (+ bias); with split-K, the last split of a tile reduces."""
    out_offs = offs_m[:, None] * stride_om + rows[None, :]
    out_mask = m_mask[:, None] & row_mask[None, :]
    if SPLIT_K == 1:
        if HAS_BIAS:
            acc += tl.load(bias_ptr + rows, mask=row_mask, other=0.0).to(tl.float32)[None, :]
        tl.store(out_ptr + out_offs, acc.to(out_ptr.dtype.element_ty), mask=out_mask)
    else:
        part_offs = (pid_k * BLOCK_M + tl.arange(0, BLOCK_M))[:, None] * N + rows[None, :]
        tl.store(part_ptr + part_offs, acc, mask=row_mask[None, :])
        tl.debug_barrier()  # every thread's partial is stored before the release below
        ticket = tl.atomic_add(lock_ptr + pid_n, 1, sem="acq_rel")
        tl.debug_barrier()
        if ticket == SPLIT_K - 1:
            tot = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
            for sk in range(0, SPLIT_K):
                p_offs = (sk * BLOCK_M + tl.arange(0, BLOCK_M))[:, None] * N + rows[None, :]
                tot += tl.load(part_ptr + p_offs, mask=row_mask[None, :], other=0.0, cache_modifier=".cg")
            if HAS_BIAS:
                tot += tl.load(bias_ptr + rows, mask=row_mask, other=0.0).to(tl.float32)[None, :]
            tl.store(out_ptr + out_offs, tot.to(out_ptr.dtype.element_ty), mask=out_mask)
            tl.atomic_xchg(lock_ptr + pid_n, 0)  # self-resetting counter


@triton.jit
def _plane_consts(kvec, C0, C1, C2, C3, C4, C5, C6, C7, NS: tl.constexpr):
    """Per-token sum over its active planes of the group's constant terms (module docstring)."""
    pc = tl.where(kvec > 0, C0, 0.0)
    if NS > 1:
        pc += tl.where(kvec > 1, C1, 0.0)
    if NS > 2:
        pc += tl.where(kvec > 2, C2, 0.0)
    if NS > 3:
        pc += tl.where(kvec > 3, C3, 0.0)
    if NS > 4:
        pc += tl.where(kvec > 4, C4, 0.0)
    if NS > 5:
        pc += tl.where(kvec > 5, C5, 0.0)
    if NS > 6:
        pc += tl.where(kvec > 6, C6, 0.0)
    if NS > 7:
        pc += tl.where(kvec > 7, C7, 0.0)
    return pc


# ------------------------------------------------------------------------------------ small-batch kernel
@triton.jit
def _bits_to(fb, DT: tl.constexpr):
    if DT == 0:
        return fb.to(tl.int16).to(tl.float16, bitcast=True)
    elif DT == 1:
        return fb.to(tl.int16).to(tl.bfloat16, bitcast=True)
    else:
        return fb.to(tl.float32, bitcast=True)


@triton.jit
def _bp_small_kernel(
    x_ptr,
    out_ptr,
    part_ptr,
    lock_ptr,
    bias_ptr,
    k_ptr,
    scale_ptr,
    zero_ptr,
    p0,
    p1,
    p2,
    p3,
    p4,
    p5,
    p6,
    p7,
    WS0,
    WS1,
    WS2,
    WS3,
    WS4,
    WS5,
    WS6,
    WS7,
    A0,
    A1,
    A2,
    A3,
    A4,
    A5,
    A6,
    A7,
    C0,
    C1,
    C2,
    C3,
    C4,
    C5,
    C6,
    C7,
    H0,
    H1,
    H2,
    H3,
    H4,
    H5,
    H6,
    H7,
    M,
    N,
    K_IN,
    N_GROUPS,
    k_uniform,
    stride_xm,
    stride_om,
    CHUNKS_PER_SPLIT,
    GROUP: tl.constexpr,
    NS: tl.constexpr,
    KMAX: tl.constexpr,
    B0: tl.constexpr,
    B1: tl.constexpr,
    B2: tl.constexpr,
    B3: tl.constexpr,
    B4: tl.constexpr,
    B5: tl.constexpr,
    B6: tl.constexpr,
    B7: tl.constexpr,
    EVEN_K: tl.constexpr,
    PER_TOKEN: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    SPLIT_K: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    MAGIC: tl.constexpr,
    DT: tl.constexpr,
    COMBINED: tl.constexpr,
    PER_VIEW: tl.constexpr,
):
    """2..16 tokens, tensor cores; ``BLOCK_K`` divides the group size (one scale per row per chunk).

    COMBINED (every token the same ``k``): one dot per chunk with the concatenated code as the exact
    float ``1 + C_k / 2^bits``. Otherwise one dot per plane with each token's activations gated by
    ``k_token > e``, so that a plane is read once for all the tokens that need it.

    PER_VIEW: ``scale`` / ``zero`` are ``[NS, N, N_GROUPS]`` (a pair per view) and each token's sum takes the
    pair of its own ``k`` (``[BLOCK_M, BLOCK_N]`` gathered per chunk); otherwise one ``[N, N_GROUPS]`` pair (the
    host passes view ``k``'s own when every token reads the same ``k``)."""
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    offs_m = tl.arange(0, BLOCK_M)
    m_mask = offs_m < M
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask = rows < N
    if PER_TOKEN:
        kvec = tl.load(k_ptr + offs_m, mask=m_mask, other=0).to(tl.int32)
        kmax = tl.max(kvec, axis=0)
    else:
        kvec = tl.zeros((BLOCK_M,), dtype=tl.int32) + k_uniform
        kmax = tl.max(kvec, axis=0)
    pc = _plane_consts(kvec, C0, C1, C2, C3, C4, C5, C6, C7, NS)
    h = _select(kvec, H0, H1, H2, H3, H4, H5, H6, H7, NS)
    TWO_B0: tl.constexpr = 1 << B0
    if DT == 0:
        ONE: tl.constexpr = 0x3C00
        TOP: tl.constexpr = 10
    elif DT == 1:  # (one constexpr per branch, resolved at compile time: not a redefinition for Triton)
        ONE: tl.constexpr = 0x3F80  # type: ignore[no-redef]
        TOP: tl.constexpr = 7  # type: ignore[no-redef]
    else:
        ONE: tl.constexpr = 0x3F800000  # type: ignore[no-redef]
        TOP: tl.constexpr = 23  # type: ignore[no-redef]

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    n_chunks = tl.cdiv(K_IN, BLOCK_K)
    c_lo = pid_k * CHUNKS_PER_SPLIT
    c_hi = tl.minimum(c_lo + CHUNKS_PER_SPLIT, n_chunks)
    for c in range(c_lo, c_hi):
        col0 = c * BLOCK_K
        # Issue every needed plane's loads before any decode (planes past kmax are masked off: no traffic).
        w0 = _load_words(p0, WS0, rows, row_mask, col0, K_IN, B0, BLOCK_K, EVEN_K)
        w1 = w0
        w2 = w0
        w3 = w0
        w4 = w0
        w5 = w0
        w6 = w0
        w7 = w0
        if KMAX > 1:
            w1 = _load_words(p1, WS1, rows, row_mask & ((rows * 0 + kmax) > 1), col0, K_IN, B1, BLOCK_K, EVEN_K)
        if KMAX > 2:
            w2 = _load_words(p2, WS2, rows, row_mask & ((rows * 0 + kmax) > 2), col0, K_IN, B2, BLOCK_K, EVEN_K)
        if KMAX > 3:
            w3 = _load_words(p3, WS3, rows, row_mask & ((rows * 0 + kmax) > 3), col0, K_IN, B3, BLOCK_K, EVEN_K)
        if KMAX > 4:
            w4 = _load_words(p4, WS4, rows, row_mask & ((rows * 0 + kmax) > 4), col0, K_IN, B4, BLOCK_K, EVEN_K)
        if KMAX > 5:
            w5 = _load_words(p5, WS5, rows, row_mask & ((rows * 0 + kmax) > 5), col0, K_IN, B5, BLOCK_K, EVEN_K)
        if KMAX > 6:
            w6 = _load_words(p6, WS6, rows, row_mask & ((rows * 0 + kmax) > 6), col0, K_IN, B6, BLOCK_K, EVEN_K)
        if KMAX > 7:
            w7 = _load_words(p7, WS7, rows, row_mask & ((rows * 0 + kmax) > 7), col0, K_IN, B7, BLOCK_K, EVEN_K)
        g = col0 // GROUP
        if PER_VIEW:
            # each token's own view: [BLOCK_M, BLOCK_N] steps and zero points (padding tokens read none)
            vofs = (tl.maximum(kvec - 1, 0).to(tl.int64) * N * N_GROUPS)[:, None]
            sz_offs = vofs + (rows.to(tl.int64) * N_GROUPS + g)[None, :]
            sz_mask = m_mask[:, None] & row_mask[None, :]
            sv = tl.load(scale_ptr + sz_offs, mask=sz_mask, other=0.0).to(tl.float32)
            zv = tl.load(zero_ptr + sz_offs, mask=sz_mask, other=0.0).to(tl.float32)
        else:
            s = tl.load(scale_ptr + rows.to(tl.int64) * N_GROUPS + g, mask=row_mask, other=0.0).to(tl.float32)
            z = tl.load(zero_ptr + rows.to(tl.int64) * N_GROUPS + g, mask=row_mask, other=0.0).to(tl.float32)
        cols = col0 + tl.arange(0, BLOCK_K)
        xr = tl.load(
            x_ptr + offs_m[:, None] * stride_xm + cols[None, :],
            mask=m_mask[:, None] & (cols[None, :] < K_IN),
            other=0.0,
        )
        x = xr.to(tl.float32)
        xs = tl.sum(x, axis=1)  # [BLOCK_M]
        T = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        if COMBINED:
            fb = _concat_bits(
                w0,
                w1,
                w2,
                w3,
                w4,
                w5,
                w6,
                w7,
                kmax,
                ONE,
                TOP,
                KMAX,
                B0,
                B1,
                B2,
                B3,
                B4,
                B5,
                B6,
                B7,
                BLOCK_N,
                BLOCK_K,
                False,
            )
            f = _bits_to(fb, DT)
            if DT == 2:
                T = tl.dot(x, tl.trans(f), T, input_precision="ieee")
            else:
                T = tl.dot(_cast(xr, DT), tl.trans(f), T)
            if PER_VIEW:
                acc += sv * (TWO_B0 * (T - xs[:, None]) - xs[:, None] * (zv + h[:, None]))
            else:
                acc += s[None, :] * (TWO_B0 * (T - xs[:, None]) - xs[:, None] * (z[None, :] + h[:, None]))
        else:
            T = _small_proc(T, x, kvec, w0, A0, 0, B0, BLOCK_N, BLOCK_K, MAGIC, DT)
            if KMAX > 1:
                T = _small_maybe(T, x, kvec, kmax, w1, A1, 1, B1, BLOCK_N, BLOCK_K, MAGIC, DT, PER_TOKEN)
            if KMAX > 2:
                T = _small_maybe(T, x, kvec, kmax, w2, A2, 2, B2, BLOCK_N, BLOCK_K, MAGIC, DT, PER_TOKEN)
            if KMAX > 3:
                T = _small_maybe(T, x, kvec, kmax, w3, A3, 3, B3, BLOCK_N, BLOCK_K, MAGIC, DT, PER_TOKEN)
            if KMAX > 4:
                T = _small_maybe(T, x, kvec, kmax, w4, A4, 4, B4, BLOCK_N, BLOCK_K, MAGIC, DT, PER_TOKEN)
            if KMAX > 5:
                T = _small_maybe(T, x, kvec, kmax, w5, A5, 5, B5, BLOCK_N, BLOCK_K, MAGIC, DT, PER_TOKEN)
            if KMAX > 6:
                T = _small_maybe(T, x, kvec, kmax, w6, A6, 6, B6, BLOCK_N, BLOCK_K, MAGIC, DT, PER_TOKEN)
            if KMAX > 7:
                T = _small_maybe(T, x, kvec, kmax, w7, A7, 7, B7, BLOCK_N, BLOCK_K, MAGIC, DT, PER_TOKEN)
            if PER_VIEW:
                acc += sv * (T - (xs * pc)[:, None] - xs[:, None] * zv)
            else:
                acc += s[None, :] * (T - (xs * pc)[:, None] - xs[:, None] * z[None, :])
    _splitk_store(
        acc,
        out_ptr,
        part_ptr,
        lock_ptr,
        bias_ptr,
        offs_m,
        m_mask,
        rows,
        row_mask,
        N,
        stride_om,
        pid_n,
        pid_k,
        HAS_BIAS,
        SPLIT_K,
        BLOCK_M,
        BLOCK_N,
    )


# ------------------------------------------------------------------------------------- one-token kernel
@triton.jit
def _chunk_scale_zero(
    scale_ptr, zero_ptr, rows, row_mask, col0, N_GROUPS, GROUP: tl.constexpr, GPC: tl.constexpr, SUBG: tl.constexpr
):
    """Steps and zero points ``[rows, GPC]`` (fp32) of the ``GPC`` groups a one-token chunk at ``col0`` covers."""
    gidx = (col0 + tl.arange(0, GPC) * SUBG) // GROUP
    gptr = rows.to(tl.int64)[:, None] * N_GROUPS + gidx[None, :]
    gmask = row_mask[:, None] & (gidx < N_GROUPS)[None, :]
    s = tl.load(scale_ptr + gptr, mask=gmask, other=0.0).to(tl.float32)
    z = tl.load(zero_ptr + gptr, mask=gmask, other=0.0).to(tl.float32)
    return s, z


@triton.jit
def _bp_gemv_kernel(
    x_ptr,
    out_ptr,
    part_ptr,
    lock_ptr,
    bias_ptr,
    k_ptr,
    scale_ptr,
    zero_ptr,
    p0,
    p1,
    p2,
    p3,
    p4,
    p5,
    p6,
    p7,
    WS0,
    WS1,
    WS2,
    WS3,
    WS4,
    WS5,
    WS6,
    WS7,
    H0,
    H1,
    H2,
    H3,
    H4,
    H5,
    H6,
    H7,
    N,
    K_IN,
    N_GROUPS,
    k_uniform,
    CHUNKS_PER_SPLIT,
    GROUP: tl.constexpr,
    NS: tl.constexpr,
    KMAX: tl.constexpr,
    B0: tl.constexpr,
    B1: tl.constexpr,
    B2: tl.constexpr,
    B3: tl.constexpr,
    B4: tl.constexpr,
    B5: tl.constexpr,
    B6: tl.constexpr,
    B7: tl.constexpr,
    EVEN_K: tl.constexpr,
    PER_TOKEN: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    SPLIT_K: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GPC: tl.constexpr,
    PER_VIEW: tl.constexpr,
):
    """One token on CUDA cores. Its ``k`` is one number, so the planes are concatenated into
    ``f = 1 + C_k / 2^bits`` (exact fp32, built by bit placement) and ``sum(x f)`` needs one multiply-add
    per weight whatever ``k``; per group ``y += s (2^b_1 (sum(x f) - sum(x)) - sum(x) (z + h_k))``.

    A chunk of ``BLOCK_K`` columns holds ``GPC`` whole groups (``GPC > 1``) or lies inside one group.
    PER_VIEW: ``scale`` / ``zero`` are ``[NS, N, N_GROUPS]`` and the token reads view ``k``'s pair."""
    SUBG: tl.constexpr = BLOCK_K // GPC
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask = rows < N
    if PER_TOKEN:
        kk = tl.load(k_ptr).to(tl.int32)
    else:
        kk = tl.max(tl.zeros((1,), dtype=tl.int32) + k_uniform, axis=0)
    h = tl.sum(_select(tl.zeros((1,), dtype=tl.int32) + kk, H0, H1, H2, H3, H4, H5, H6, H7, NS), axis=0)
    TWO_B0: tl.constexpr = 1 << B0
    if PER_VIEW:  # view k's own step and zero point
        scale_ptr += (kk - 1).to(tl.int64) * N * N_GROUPS
        zero_ptr += (kk - 1).to(tl.int64) * N * N_GROUPS

    acc = tl.zeros((BLOCK_N, GPC), dtype=tl.float32)
    n_chunks = tl.cdiv(K_IN, BLOCK_K)
    c_lo = pid_k * CHUNKS_PER_SPLIT
    c_hi = tl.minimum(c_lo + CHUNKS_PER_SPLIT, n_chunks)
    for c in range(c_lo, c_hi):
        col0 = c * BLOCK_K
        # every needed plane's loads first (planes past k are masked off: no traffic)
        w0 = _load_words(p0, WS0, rows, row_mask, col0, K_IN, B0, BLOCK_K, EVEN_K)
        w1 = w0
        w2 = w0
        w3 = w0
        w4 = w0
        w5 = w0
        w6 = w0
        w7 = w0
        if KMAX > 1:
            w1 = _load_words(p1, WS1, rows, row_mask & ((rows * 0 + kk) > 1), col0, K_IN, B1, BLOCK_K, EVEN_K)
        if KMAX > 2:
            w2 = _load_words(p2, WS2, rows, row_mask & ((rows * 0 + kk) > 2), col0, K_IN, B2, BLOCK_K, EVEN_K)
        if KMAX > 3:
            w3 = _load_words(p3, WS3, rows, row_mask & ((rows * 0 + kk) > 3), col0, K_IN, B3, BLOCK_K, EVEN_K)
        if KMAX > 4:
            w4 = _load_words(p4, WS4, rows, row_mask & ((rows * 0 + kk) > 4), col0, K_IN, B4, BLOCK_K, EVEN_K)
        if KMAX > 5:
            w5 = _load_words(p5, WS5, rows, row_mask & ((rows * 0 + kk) > 5), col0, K_IN, B5, BLOCK_K, EVEN_K)
        if KMAX > 6:
            w6 = _load_words(p6, WS6, rows, row_mask & ((rows * 0 + kk) > 6), col0, K_IN, B6, BLOCK_K, EVEN_K)
        if KMAX > 7:
            w7 = _load_words(p7, WS7, rows, row_mask & ((rows * 0 + kk) > 7), col0, K_IN, B7, BLOCK_K, EVEN_K)
        s, z = _chunk_scale_zero(scale_ptr, zero_ptr, rows, row_mask, col0, N_GROUPS, GROUP, GPC, SUBG)
        cols = col0 + tl.arange(0, BLOCK_K)
        x = tl.load(x_ptr + cols, mask=cols < K_IN, other=0.0).to(tl.float32)
        fb = _concat_bits(
            w0,
            w1,
            w2,
            w3,
            w4,
            w5,
            w6,
            w7,
            kk,
            0x3F800000,
            23,
            KMAX,
            B0,
            B1,
            B2,
            B3,
            B4,
            B5,
            B6,
            B7,
            BLOCK_N,
            BLOCK_K,
            PER_TOKEN,
        )
        f = fb.to(tl.float32, bitcast=True)
        T = tl.sum(tl.reshape(f * x[None, :], (BLOCK_N, GPC, SUBG)), axis=2)  # [BLOCK_N, GPC]
        xs = tl.sum(tl.reshape(x, (GPC, SUBG)), axis=1)[None, :]  # [1, GPC]
        acc += s * (TWO_B0 * (T - xs) - xs * (z + h))
    y = tl.reshape(tl.sum(acc, axis=1), (1, BLOCK_N))
    zero_m = tl.zeros((1,), dtype=tl.int32)
    _splitk_store(
        y,
        out_ptr,
        part_ptr,
        lock_ptr,
        bias_ptr,
        zero_m,
        zero_m == 0,
        rows,
        row_mask,
        N,
        0,
        pid_n,
        pid_k,
        HAS_BIAS,
        SPLIT_K,
        1,
        BLOCK_N,
    )


# ------------------------------------------------------------- one-token kernel, equal slice widths
# Code fields read in place: with every plane ``B`` bits wide, the code of column ``j`` sits at the same
# bits ``(j mod per) B`` of word ``j // per`` in every plane. Plane ``e`` shifted up by ``(KMAX-1-e) B``
# and OR-ed with the others gives the concatenated code ``C`` at bit ``(j mod half) B`` of the low or
# high half word (``half = per / 2``). ``C`` masked out of that word, read as fp32 bits, is the
# subnormal ``C 2^(pos - 149)``: one AND per code and plane (plus one shift per word and plane), no
# int->float conversion and no constant 1 to remove. The activation of column ``j`` is scaled once per
# chunk by ``2^(149 - S - pos)`` so that every product ``x C 2^-S`` is a normal float.
_FIELD_S = 64  # products are x C 2^-64: normal for |x| > 2^-62; x 2^(85 - pos) finite for |x| < 2^42


@triton.jit
def _fld(lo, hi, J: tl.constexpr, HALF: tl.constexpr, B: tl.constexpr, SH: tl.constexpr):
    # plane field of code J (the plane's words shifted up by SH), left in place: one AND
    MASK: tl.constexpr = (1 << B) - 1
    if J < HALF:
        return lo & (MASK << (J * B + SH))
    else:
        return hi & (MASK << ((J - HALF) * B + SH))


@triton.jit
def _fa1(
    acc,
    xj,
    l0,
    h0,
    l1,
    h1,
    l2,
    h2,
    l3,
    h3,
    J: tl.constexpr,
    ST: tl.constexpr,
    HALF: tl.constexpr,
    B: tl.constexpr,
    KMAX: tl.constexpr,
):
    """``acc += field_J * x'_J``: the concatenated code of code position ``J`` of every word, read as a
    subnormal, times the scaled activation of that column (``xj`` ``[words]``)."""
    fb = _fld(l0, h0, J, HALF, B, (KMAX - 1) * B)
    if KMAX > 1:
        fb = fb | _fld(l1, h1, J, HALF, B, (KMAX - 2) * B)
    if KMAX > 2:
        fb = fb | _fld(l2, h2, J, HALF, B, (KMAX - 3) * B)
    if KMAX > 3:
        fb = fb | _fld(l3, h3, J, HALF, B, (KMAX - 4) * B)
    return acc + fb.to(tl.float32, bitcast=True) * xj[None, :]


@triton.jit
def _fa2(
    acc,
    xt,
    l0,
    h0,
    l1,
    h1,
    l2,
    h2,
    l3,
    h3,
    J: tl.constexpr,
    ST: tl.constexpr,
    HALF: tl.constexpr,
    B: tl.constexpr,
    KMAX: tl.constexpr,
):
    xa, xb = tl.split(xt)
    acc = _fa1(acc, xa, l0, h0, l1, h1, l2, h2, l3, h3, J, 2 * ST, HALF, B, KMAX)
    return _fa1(acc, xb, l0, h0, l1, h1, l2, h2, l3, h3, J + ST, 2 * ST, HALF, B, KMAX)


@triton.jit
def _fa4(
    acc,
    xt,
    l0,
    h0,
    l1,
    h1,
    l2,
    h2,
    l3,
    h3,
    J: tl.constexpr,
    ST: tl.constexpr,
    HALF: tl.constexpr,
    B: tl.constexpr,
    KMAX: tl.constexpr,
):
    xa, xb = tl.split(xt)
    acc = _fa2(acc, xa, l0, h0, l1, h1, l2, h2, l3, h3, J, 2 * ST, HALF, B, KMAX)
    return _fa2(acc, xb, l0, h0, l1, h1, l2, h2, l3, h3, J + ST, 2 * ST, HALF, B, KMAX)


@triton.jit
def _fa8(
    acc,
    xt,
    l0,
    h0,
    l1,
    h1,
    l2,
    h2,
    l3,
    h3,
    J: tl.constexpr,
    ST: tl.constexpr,
    HALF: tl.constexpr,
    B: tl.constexpr,
    KMAX: tl.constexpr,
):
    xa, xb = tl.split(xt)
    acc = _fa4(acc, xa, l0, h0, l1, h1, l2, h2, l3, h3, J, 2 * ST, HALF, B, KMAX)
    return _fa4(acc, xb, l0, h0, l1, h1, l2, h2, l3, h3, J + ST, 2 * ST, HALF, B, KMAX)


@triton.jit
def _fa16(
    acc,
    xt,
    l0,
    h0,
    l1,
    h1,
    l2,
    h2,
    l3,
    h3,
    J: tl.constexpr,
    ST: tl.constexpr,
    HALF: tl.constexpr,
    B: tl.constexpr,
    KMAX: tl.constexpr,
):
    xa, xb = tl.split(xt)
    acc = _fa8(acc, xa, l0, h0, l1, h1, l2, h2, l3, h3, J, 2 * ST, HALF, B, KMAX)
    return _fa8(acc, xb, l0, h0, l1, h1, l2, h2, l3, h3, J + ST, 2 * ST, HALF, B, KMAX)


@triton.jit
def _fa32(
    acc,
    xt,
    l0,
    h0,
    l1,
    h1,
    l2,
    h2,
    l3,
    h3,
    J: tl.constexpr,
    ST: tl.constexpr,
    HALF: tl.constexpr,
    B: tl.constexpr,
    KMAX: tl.constexpr,
):
    xa, xb = tl.split(xt)
    acc = _fa16(acc, xa, l0, h0, l1, h1, l2, h2, l3, h3, J, 2 * ST, HALF, B, KMAX)
    return _fa16(acc, xb, l0, h0, l1, h1, l2, h2, l3, h3, J + ST, 2 * ST, HALF, B, KMAX)


@triton.jit
def _fields_dot(acc, xw, w0, w1, w2, w3, B: tl.constexpr, KMAX: tl.constexpr, NW: tl.constexpr):
    """``acc [BLOCK_N, NW] += sum_j field_j(words) * x'[word, j]``, elementwise per code position ``j``
    (one AND per code and plane, one FMA per code; ``xw`` ``[NW, per]`` scaled activations)."""
    PER: tl.constexpr = 32 // B
    HALF: tl.constexpr = PER // 2
    # plane e shifted up by (KMAX - 1 - e) B; hi: the upper half word brought down (sign bits never reach
    # a field, which ends below bit 16 + shift)
    l0 = w0 << ((KMAX - 1) * B)
    h0 = w0 >> (16 - (KMAX - 1) * B)
    l1 = l0
    h1 = h0
    l2 = l0
    h2 = h0
    l3 = l0
    h3 = h0
    if KMAX > 1:
        l1 = w1 << ((KMAX - 2) * B)
        h1 = w1 >> (16 - (KMAX - 2) * B)
    if KMAX > 2:
        l2 = w2 << ((KMAX - 3) * B)
        h2 = w2 >> (16 - (KMAX - 3) * B)
    if KMAX > 3:
        l3 = w3 << ((KMAX - 4) * B)
        h3 = w3 >> (16 - (KMAX - 4) * B)
    if PER == 2:
        acc = _fa2(acc, xw, l0, h0, l1, h1, l2, h2, l3, h3, 0, 1, HALF, B, KMAX)
    elif PER == 4:
        acc = _fa4(acc, tl.reshape(xw, (NW, 2, 2)), l0, h0, l1, h1, l2, h2, l3, h3, 0, 1, HALF, B, KMAX)
    elif PER == 8:
        acc = _fa8(acc, tl.reshape(xw, (NW, 2, 2, 2)), l0, h0, l1, h1, l2, h2, l3, h3, 0, 1, HALF, B, KMAX)
    elif PER == 16:
        acc = _fa16(acc, tl.reshape(xw, (NW, 2, 2, 2, 2)), l0, h0, l1, h1, l2, h2, l3, h3, 0, 1, HALF, B, KMAX)
    else:
        acc = _fa32(acc, tl.reshape(xw, (NW, 2, 2, 2, 2, 2)), l0, h0, l1, h1, l2, h2, l3, h3, 0, 1, HALF, B, KMAX)
    return acc


@triton.jit
def _fields_chunks(
    acc,
    x_ptr,
    p0,
    p1,
    p2,
    p3,
    WS0,
    WS1,
    WS2,
    WS3,
    scale_ptr,
    zero_ptr,
    rows,
    row_mask,
    kk,
    h,
    mult,
    K_IN,
    N_GROUPS,
    c_lo,
    c_hi,
    xsc,
    wcol,
    GROUP: tl.constexpr,
    KMAX: tl.constexpr,
    B: tl.constexpr,
    EVEN_K: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GPC: tl.constexpr,
):
    """The field kernel's chunks ``c_lo..c_hi`` of one program for planes ``1..KMAX``, added to ``acc``."""
    SUBG: tl.constexpr = BLOCK_K // GPC
    PER: tl.constexpr = 32 // B
    NW: tl.constexpr = BLOCK_K // PER
    for c in range(c_lo, c_hi):
        col0 = c * BLOCK_K
        w0 = _load_words(p0, WS0, rows, row_mask, col0, K_IN, B, BLOCK_K, EVEN_K)
        w1 = w0
        w2 = w0
        w3 = w0
        if KMAX > 1:
            w1 = _load_words(p1, WS1, rows, row_mask & ((rows * 0 + kk) > 1), col0, K_IN, B, BLOCK_K, EVEN_K)
        if KMAX > 2:
            w2 = _load_words(p2, WS2, rows, row_mask & ((rows * 0 + kk) > 2), col0, K_IN, B, BLOCK_K, EVEN_K)
        if KMAX > 3:
            w3 = _load_words(p3, WS3, rows, row_mask & ((rows * 0 + kk) > 3), col0, K_IN, B, BLOCK_K, EVEN_K)
        s, z = _chunk_scale_zero(scale_ptr, zero_ptr, rows, row_mask, col0, N_GROUPS, GROUP, GPC, SUBG)
        if EVEN_K:
            xw = tl.load(x_ptr + col0 + wcol).to(tl.float32)
        else:
            xw = tl.load(x_ptr + col0 + wcol, mask=col0 + wcol < K_IN, other=0.0).to(tl.float32)
        P = tl.zeros((BLOCK_N, NW), dtype=tl.float32)
        P = _fields_dot(P, xw * xsc[None, :], w0, w1, w2, w3, B, KMAX, NW)
        T = tl.sum(tl.reshape(P, (BLOCK_N, GPC, NW // GPC)), axis=2)  # [BLOCK_N, GPC]
        xs = tl.sum(tl.reshape(xw, (GPC, SUBG)), axis=1)[None, :]  # [1, GPC]
        acc += s * (mult * T - xs * (z + h))
    return acc


@triton.jit
def _bp_gemv_fields_kernel(
    x_ptr,
    out_ptr,
    part_ptr,
    lock_ptr,
    bias_ptr,
    k_ptr,
    scale_ptr,
    zero_ptr,
    p0,
    p1,
    p2,
    p3,
    WS0,
    WS1,
    WS2,
    WS3,
    H0,
    H1,
    H2,
    H3,
    H4,
    H5,
    H6,
    H7,
    mult,
    N,
    K_IN,
    N_GROUPS,
    k_uniform,
    CHUNKS_PER_SPLIT,
    GROUP: tl.constexpr,
    NS: tl.constexpr,
    KMAX: tl.constexpr,
    B: tl.constexpr,
    XE: tl.constexpr,
    EVEN_K: tl.constexpr,
    PER_TOKEN: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    SPLIT_K: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GPC: tl.constexpr,
    BRANCH_K: tl.constexpr,
    PER_VIEW: tl.constexpr,
):
    """One token, every slice ``B`` bits: ``sum(x W_k)`` from the code fields read in place (see above).

    Per group ``y += s (mult sum(x' f) - sum(x) (z + h_k))`` with ``f`` the subnormal field, ``x'`` the
    scaled activations and ``mult = 2^(S - (KMAX-1) B)``: planes past ``k`` are zero, so the field holds
    ``C_k 2^((KMAX-k) B)`` and ``mult`` is the same for every ``k``. Per code and plane one AND, per code
    one FMA; the sum over a group is in-thread but for the few lanes that share a group. PER_VIEW: ``scale`` /
    ``zero`` are ``[NS, N, N_GROUPS]`` and the token reads view ``k``'s pair."""
    PER: tl.constexpr = 32 // B
    HALF: tl.constexpr = PER // 2
    NW: tl.constexpr = BLOCK_K // PER
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask = rows < N
    if PER_TOKEN:
        kk = tl.load(k_ptr).to(tl.int32)
    else:
        kk = tl.max(tl.zeros((1,), dtype=tl.int32) + k_uniform, axis=0)
    h = tl.sum(_select(tl.zeros((1,), dtype=tl.int32) + kk, H0, H1, H2, H3, H4, H5, H6, H7, NS), axis=0)
    if PER_VIEW:  # view k's own step and zero point
        scale_ptr += (kk - 1).to(tl.int64) * N * N_GROUPS
        zero_ptr += (kk - 1).to(tl.int64) * N * N_GROUPS
    # x' = x 2^(149 - S - pos): the exponent bits of 2^(149 - S - pos) for each code position (XE = 276 - S)
    jpos = tl.arange(0, PER)
    xsc = ((XE - (jpos % HALF) * B) << 23).to(tl.float32, bitcast=True)
    wcol = tl.arange(0, NW)[:, None] * PER + jpos[None, :]  # [NW, PER] column offsets

    acc = tl.zeros((BLOCK_N, GPC), dtype=tl.float32)
    n_chunks = tl.cdiv(K_IN, BLOCK_K)
    c_lo = pid_k * CHUNKS_PER_SPLIT
    c_hi = tl.minimum(c_lo + CHUNKS_PER_SPLIT, n_chunks)
    if BRANCH_K:
        # k read on the device: one body per k, compiled together, the token's own executed (a body for
        # k planes shifts them as if KMAX were k, so its multiplier is mult 2^((KMAX - k) B))
        if kk == 1:
            acc = _fields_chunks(
                acc,
                x_ptr,
                p0,
                p1,
                p2,
                p3,
                WS0,
                WS1,
                WS2,
                WS3,
                scale_ptr,
                zero_ptr,
                rows,
                row_mask,
                kk,
                h,
                mult * (1 << ((KMAX - 1) * B)),
                K_IN,
                N_GROUPS,
                c_lo,
                c_hi,
                xsc,
                wcol,
                GROUP,
                1,
                B,
                EVEN_K,
                BLOCK_N,
                BLOCK_K,
                GPC,
            )
        elif kk == 2:
            acc = _fields_chunks(
                acc,
                x_ptr,
                p0,
                p1,
                p2,
                p3,
                WS0,
                WS1,
                WS2,
                WS3,
                scale_ptr,
                zero_ptr,
                rows,
                row_mask,
                kk,
                h,
                mult * (1 << ((KMAX - 2) * B)),
                K_IN,
                N_GROUPS,
                c_lo,
                c_hi,
                xsc,
                wcol,
                GROUP,
                2,
                B,
                EVEN_K,
                BLOCK_N,
                BLOCK_K,
                GPC,
            )
        elif kk == 3:
            acc = _fields_chunks(
                acc,
                x_ptr,
                p0,
                p1,
                p2,
                p3,
                WS0,
                WS1,
                WS2,
                WS3,
                scale_ptr,
                zero_ptr,
                rows,
                row_mask,
                kk,
                h,
                mult * (1 << ((KMAX - 3) * B)),
                K_IN,
                N_GROUPS,
                c_lo,
                c_hi,
                xsc,
                wcol,
                GROUP,
                3,
                B,
                EVEN_K,
                BLOCK_N,
                BLOCK_K,
                GPC,
            )
        else:
            acc = _fields_chunks(
                acc,
                x_ptr,
                p0,
                p1,
                p2,
                p3,
                WS0,
                WS1,
                WS2,
                WS3,
                scale_ptr,
                zero_ptr,
                rows,
                row_mask,
                kk,
                h,
                mult,
                K_IN,
                N_GROUPS,
                c_lo,
                c_hi,
                xsc,
                wcol,
                GROUP,
                KMAX,
                B,
                EVEN_K,
                BLOCK_N,
                BLOCK_K,
                GPC,
            )
    else:
        acc = _fields_chunks(
            acc,
            x_ptr,
            p0,
            p1,
            p2,
            p3,
            WS0,
            WS1,
            WS2,
            WS3,
            scale_ptr,
            zero_ptr,
            rows,
            row_mask,
            kk,
            h,
            mult,
            K_IN,
            N_GROUPS,
            c_lo,
            c_hi,
            xsc,
            wcol,
            GROUP,
            KMAX,
            B,
            EVEN_K,
            BLOCK_N,
            BLOCK_K,
            GPC,
        )
    y = tl.reshape(tl.sum(acc, axis=1), (1, BLOCK_N))
    zero_m = tl.zeros((1,), dtype=tl.int32)
    _splitk_store(
        y,
        out_ptr,
        part_ptr,
        lock_ptr,
        bias_ptr,
        zero_m,
        zero_m == 0,
        rows,
        row_mask,
        N,
        0,
        pid_n,
        pid_k,
        HAS_BIAS,
        SPLIT_K,
        1,
        BLOCK_N,
    )


# ------------------------------------------------------------------------ one token, one-bit planes
# Kernel buffers built from the checkpoint's planes (``pack_bitplanes``): every slice of ``b`` bits becomes ``b``
# one-bit planes, most significant bit first, so that the concatenated code ``C_k`` of view ``k`` is the first
# ``P_k = b_1 + .. + b_k`` planes whatever the slice widths (3-1-1-1-1-1, 2-2-2-2, 4-2-2, ...). A word holds 16
# columns of two adjacent rows: bits 0-15 columns ``16 w .. 16 w + 15`` of row ``2 i``, bits 16-31 the same
# columns of row ``2 i + 1``; plane ``t`` is ``[KW, NPAD / 2]`` (word column major), so a thread loads four row
# pairs in one 16-byte vector and shares each activation over 8 rows.
#
# Per half word (16 codes of one row): plane ``e`` shifted so that bit ``e`` of code ``j`` lands at bit
# ``j + P-1-e`` makes code ``j``'s concatenated code the field of bits ``j .. j+P-1`` (below bit 23). Fields of
# codes ``P`` apart do not overlap: for each residue ``r`` (mod ``P``) one word ``F_r`` holds the fields of codes
# ``r, r+P, ..`` (``P-1`` bit selects of the shifted planes, one LOP3 each), and per code one AND takes its
# field out of ``F_r``; read as fp32 bits it is the subnormal ``C 2^(j-149)``, so one FMA with the activation
# scaled by ``2^(149-S-j)`` accumulates ``x C 2^-S``. Per code: one AND, one FMA, ``P (P-1) / 16`` selects and
# ``P / 16`` shifts; per activation and 8 rows: its load, conversion, scaling and sum. A program streams whole
# groups (the step and zero point applied once per row and group) of a contiguous range of (row block, group)
# items (stream-K), one partial per row block it touches.
@triton.jit
def _bsel(f, v, M: tl.constexpr, ASM: tl.constexpr):
    """``(f & ~M) | (v & M)``. ``ASM``: one ``lop3`` (the compiler otherwise emits two: an AND, then an AND-OR)."""
    if ASM:
        return tl.inline_asm_elementwise(
            "lop3.b32 $0, $1, $2, $3, 0xB8;",  # b ? c : a, with a = f, b = M, c = v
            "=r,r,r,r",
            [f, tl.full(f.shape, M, tl.int32), v],
            dtype=tl.int32,
            is_pure=True,
            pack=1,
        )
    else:
        return (f & ~M) | (v & M)


@triton.jit
def _bits_field_word(l0, l1, l2, l3, l4, l5, l6, l7, R: tl.constexpr, P: tl.constexpr, ASM: tl.constexpr):
    """``F_r``: at bits ``j .. j+P-1`` of every code ``j = R, R+P, ..`` (< 16) the bits of planes ``P-1 .. 0``
    (``l_e`` holds plane ``e`` shifted to bit ``j + P-1-e``); other bits are left over from the selects."""
    NC: tl.constexpr = (16 - R + P - 1) // P
    PAT: tl.constexpr = ((1 << (P * NC)) - 1) // ((1 << P) - 1) << R  # bit R + iP for each code of the residue
    f = l0
    if P > 1:
        f = _bsel(f, l1, PAT << (P - 2), ASM)
    if P > 2:
        f = _bsel(f, l2, PAT << (P - 3), ASM)
    if P > 3:
        f = _bsel(f, l3, PAT << (P - 4), ASM)
    if P > 4:
        f = _bsel(f, l4, PAT << (P - 5), ASM)
    if P > 5:
        f = _bsel(f, l5, PAT << (P - 6), ASM)
    if P > 6:
        f = _bsel(f, l6, PAT << (P - 7), ASM)
    if P > 7:
        f = _bsel(f, l7, PAT << (P - 8), ASM)
    return f


@triton.jit
def _bits_shift(w, E: tl.constexpr, HI: tl.constexpr, P: tl.constexpr):
    """Plane ``E`` moved so that bit ``E`` of code ``j`` of the low (or, ``HI``, high) half word sits at bit
    ``j + P-1-E`` (arithmetic shift: sign bits never reach a field, which ends below bit 16 + P-1)."""
    if HI:
        return w >> (17 + E - P)
    elif E < P - 1:
        return w << (P - 1 - E)
    else:
        return w


@triton.jit
def _bits_fields(
    T0,
    T1,
    xs,
    ss,
    x_ptr,
    pro_ptr,
    colw,
    K_IN,
    w0,
    w1,
    w2,
    w3,
    w4,
    w5,
    w6,
    w7,
    P: tl.constexpr,
    XE: tl.constexpr,
    ASM: tl.constexpr,
    EVEN_K: tl.constexpr,
    PRO: tl.constexpr,
):
    """One sub-chunk: ``T0 / T1 [BN2, NW] += sum_j field_j x'_j`` over the 16 codes of the low / high half of
    every word (even / odd rows), ``xs [1, NW] += sum_j x_j``; ``colw [NW]`` the first column of each word.
    ``PRO`` 1 (an RMS norm in the launch): ``ss [1, NW] += sum_j x_j^2`` and ``x_j`` taken times the norm's weight
    ``pro_ptr[j]`` (its scale, one number a token, is applied to the sums by the caller); 2 (a gated product):
    ``x_j`` taken as ``silu(x_j) * pro_ptr[j]`` (``x`` the gate, ``pro_ptr`` the up projection)."""
    l0 = _bits_shift(w0, 0, 0, P)
    h0 = _bits_shift(w0, 0, 1, P)
    l1 = l0
    h1 = h0
    l2 = l0
    h2 = h0
    l3 = l0
    h3 = h0
    l4 = l0
    h4 = h0
    l5 = l0
    h5 = h0
    l6 = l0
    h6 = h0
    l7 = l0
    h7 = h0
    if P > 1:
        l1 = _bits_shift(w1, 1, 0, P)
        h1 = _bits_shift(w1, 1, 1, P)
    if P > 2:
        l2 = _bits_shift(w2, 2, 0, P)
        h2 = _bits_shift(w2, 2, 1, P)
    if P > 3:
        l3 = _bits_shift(w3, 3, 0, P)
        h3 = _bits_shift(w3, 3, 1, P)
    if P > 4:
        l4 = _bits_shift(w4, 4, 0, P)
        h4 = _bits_shift(w4, 4, 1, P)
    if P > 5:
        l5 = _bits_shift(w5, 5, 0, P)
        h5 = _bits_shift(w5, 5, 1, P)
    if P > 6:
        l6 = _bits_shift(w6, 6, 0, P)
        h6 = _bits_shift(w6, 6, 1, P)
    if P > 7:
        l7 = _bits_shift(w7, 7, 0, P)
        h7 = _bits_shift(w7, 7, 1, P)
    FM: tl.constexpr = (1 << P) - 1
    for r in tl.static_range(P):
        f0 = _bits_field_word(l0, l1, l2, l3, l4, l5, l6, l7, r, P, ASM)
        f1 = _bits_field_word(h0, h1, h2, h3, h4, h5, h6, h7, r, P, ASM)
        for j in tl.static_range(r, 16, P):
            if EVEN_K:
                xj = tl.load(x_ptr + colw + j).to(tl.float32)
            else:
                xj = tl.load(x_ptr + colw + j, mask=colw + j < K_IN, other=0.0).to(tl.float32)
            if PRO > 0:
                if EVEN_K:
                    pj = tl.load(pro_ptr + colw + j).to(tl.float32)
                else:
                    pj = tl.load(pro_ptr + colw + j, mask=colw + j < K_IN, other=0.0).to(tl.float32)
                if PRO == 1:
                    ss += (xj * xj)[None, :]
                    xj = xj * pj
                else:
                    xj = xj / (1.0 + tl.exp(-xj)) * pj
            xs += xj[None, :]
            # x' = x 2^(149 - S - j) (XE = 149 - S), the power of two built from its exponent bits
            xq = (xj * tl.full([1], (XE + 127 - j) << 23, tl.int32).to(tl.float32, bitcast=True))[None, :]
            T0 += (f0 & (FM << j)).to(tl.float32, bitcast=True) * xq
            T1 += (f1 & (FM << j)).to(tl.float32, bitcast=True) * xq
    return T0, T1, xs, ss


@triton.jit
def _bits_load(w_ptr, offs, PSTRIDE, E: tl.constexpr, P: tl.constexpr, w_prev, EVEN_N: tl.constexpr, rmask):
    if E < P:
        if EVEN_N:
            return tl.load(w_ptr + E * PSTRIDE + offs)
        else:
            return tl.load(w_ptr + E * PSTRIDE + offs, mask=rmask, other=0)
    else:
        return w_prev


@triton.jit
def _bits_load_or(w_ptr, offs, PSTRIDE, E: tl.constexpr, P0: tl.constexpr, P: tl.constexpr, pre, w_prev,
                  EVEN_N: tl.constexpr, rmask):  # fmt: skip
    """Plane ``E``'s words: ``pre`` where ``E < P0`` (loaded before), else as :func:`_bits_load`."""
    if E < P0:
        return pre
    else:
        return _bits_load(w_ptr, offs, PSTRIDE, E, P, w_prev, EVEN_N, rmask)


@triton.jit
def _bits_load_rest(w_ptr, offs, PSTRIDE, P0: tl.constexpr, P: tl.constexpr, b0, b1, b2, b3, b4, b5, b6, b7,
                    EVEN_N: tl.constexpr, rmask):  # fmt: skip
    """The words of planes ``0 .. P-1`` at ``offs`` where planes ``0 .. P0-1`` were loaded before (``b0 ..``)."""
    w0 = _bits_load_or(w_ptr, offs, PSTRIDE, 0, P0, P, b0, 0, EVEN_N, rmask)
    w1 = _bits_load_or(w_ptr, offs, PSTRIDE, 1, P0, P, b1, w0, EVEN_N, rmask)
    w2 = _bits_load_or(w_ptr, offs, PSTRIDE, 2, P0, P, b2, w0, EVEN_N, rmask)
    w3 = _bits_load_or(w_ptr, offs, PSTRIDE, 3, P0, P, b3, w0, EVEN_N, rmask)
    w4 = _bits_load_or(w_ptr, offs, PSTRIDE, 4, P0, P, b4, w0, EVEN_N, rmask)
    w5 = _bits_load_or(w_ptr, offs, PSTRIDE, 5, P0, P, b5, w0, EVEN_N, rmask)
    w6 = _bits_load_or(w_ptr, offs, PSTRIDE, 6, P0, P, b6, w0, EVEN_N, rmask)
    w7 = _bits_load_or(w_ptr, offs, PSTRIDE, 7, P0, P, b7, w0, EVEN_N, rmask)
    return w0, w1, w2, w3, w4, w5, w6, w7


@triton.jit
def _bits_whole_offs(t, BN2: tl.constexpr, WKP: tl.constexpr, NPAD2, GPB, GW: tl.constexpr):
    """Row block ``t``'s row pairs, word offsets ``[BN2, WKP]`` and word-column mask of :func:`_bits_whole`."""
    rows2 = t * BN2 + tl.arange(0, BN2)
    wc = tl.arange(0, WKP)
    return rows2, wc, wc[None, :] * NPAD2 + rows2[:, None], (wc < GPB * GW)[None, :]


@triton.jit
def _bits_load_words(w_ptr, wc, rows2, PSTRIDE, NPAD2, P: tl.constexpr, EVEN_N: tl.constexpr):
    """The words ``[BN2, NW]`` of planes ``0 .. P-1`` at word columns ``wc`` (planes past ``P``: plane 0 again,
    unused)."""
    return _bits_load_at(w_ptr, wc[None, :] * NPAD2 + rows2[:, None], PSTRIDE, P, EVEN_N, (rows2 < NPAD2)[:, None])


@triton.jit
def _bits_load_at(w_ptr, offs, PSTRIDE, P: tl.constexpr, EVEN_N: tl.constexpr, rmask):
    """The words of planes ``0 .. P-1`` at ``offs`` (masked by ``rmask`` unless ``EVEN_N``)."""
    w0 = _bits_load(w_ptr, offs, PSTRIDE, 0, P, 0, EVEN_N, rmask)
    w1 = _bits_load(w_ptr, offs, PSTRIDE, 1, P, w0, EVEN_N, rmask)
    w2 = _bits_load(w_ptr, offs, PSTRIDE, 2, P, w0, EVEN_N, rmask)
    w3 = _bits_load(w_ptr, offs, PSTRIDE, 3, P, w0, EVEN_N, rmask)
    w4 = _bits_load(w_ptr, offs, PSTRIDE, 4, P, w0, EVEN_N, rmask)
    w5 = _bits_load(w_ptr, offs, PSTRIDE, 5, P, w0, EVEN_N, rmask)
    w6 = _bits_load(w_ptr, offs, PSTRIDE, 6, P, w0, EVEN_N, rmask)
    w7 = _bits_load(w_ptr, offs, PSTRIDE, 7, P, w0, EVEN_N, rmask)
    return w0, w1, w2, w3, w4, w5, w6, w7


@triton.jit
def _bits_load_sz(sz_ptr, g, rows2, wcol, SZSTRIDE, NPAD2, EVEN_N: tl.constexpr):
    """Group ``g``'s step and zero point words of the even and odd rows, loaded ``[BN2, NW]`` (the same for every
    column) so that they come in the words' layout."""
    sofs = g * NPAD2 + rows2[:, None] + 0 * wcol[None, :]
    return _bits_load_sz_at(sz_ptr, sofs, SZSTRIDE, EVEN_N, (rows2 < NPAD2)[:, None])


@triton.jit
def _bits_load_sz_at(sz_ptr, sofs, SZSTRIDE, EVEN_N: tl.constexpr, mask):
    """The step and zero point words of the even and odd rows at ``sofs`` (masked by ``mask`` unless ``EVEN_N``)."""
    if EVEN_N:
        sz0 = tl.load(sz_ptr + sofs)
        sz1 = tl.load(sz_ptr + SZSTRIDE + sofs)
    else:
        sz0 = tl.load(sz_ptr + sofs, mask=mask, other=0)
        sz1 = tl.load(sz_ptr + SZSTRIDE + sofs, mask=mask, other=0)
    return sz0, sz1


@triton.jit
def _bits_apply(acc0, acc1, T0, T1, xs, sz0, sz1, mult, hk):
    """``acc += s (mult T - sum(x) (z + h_k))`` for the even (0) and odd (1) rows of one group."""
    s0 = (sz0 & 0xFFFF).to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)
    z0 = (sz0 >> 16).to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)
    s1 = (sz1 & 0xFFFF).to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)
    z1 = (sz1 >> 16).to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)
    acc0 += s0 * (mult * T0 - xs * (z0 + hk))
    acc1 += s1 * (mult * T1 - xs * (z1 + hk))
    return acc0, acc1


@triton.jit
def _bits_groups(
    acc0,
    acc1,
    x_ptr,
    w_ptr,
    sz_ptr,
    rows2,
    wcol,
    PSTRIDE,
    SZSTRIDE,
    NPAD2,
    K_IN,
    g_lo,
    g_hi,
    mult,
    hk,
    GROUP: tl.constexpr,
    P: tl.constexpr,
    NW: tl.constexpr,
    EVEN_K: tl.constexpr,
    EVEN_N: tl.constexpr,
    XE: tl.constexpr,
    ASM: tl.constexpr,
    PREFETCH: tl.constexpr,
    STAGES: tl.constexpr,
    AHEAD: tl.constexpr = 0,
    r0=0,
):
    """Groups ``g_lo .. g_hi`` of one row block for a view of ``P`` planes, into ``acc0 / acc1 [BN2, NW]`` (even /
    odd rows): per row and group ``s (mult sum(x' f) - sum(x) (z + h_k))``, in sub-chunks of ``NW`` words.
    ``PREFETCH`` (one sub-chunk per group): the next group's words, step and zero point are loaded before this
    group's codes are reduced (kept in registers across the iteration). Else ``STAGES`` (the group loop's
    ``num_stages``; 0 or 1: none) lets Triton's loop pipeliner keep the loads of later groups in flight, and
    ``AHEAD`` > 0 asks L2 at each group for the lines of the group ``AHEAD`` later (the first ``AHEAD`` groups before
    the loop), row block from row pair ``r0``."""
    GW: tl.constexpr = GROUP // 16  # word columns per group
    if PREFETCH:
        w0, w1, w2, w3, w4, w5, w6, w7 = _bits_load_words(w_ptr, g_lo * GW + wcol, rows2, PSTRIDE, NPAD2, P, EVEN_N)
        sz0, sz1 = _bits_load_sz(sz_ptr, g_lo, rows2, wcol, SZSTRIDE, NPAD2, EVEN_N)
        for g in range(g_lo, g_hi):
            gn = tl.minimum(g + 1, g_hi - 1)  # the last iteration reloads its own group (in cache)
            n0, n1, n2, n3, n4, n5, n6, n7 = _bits_load_words(w_ptr, gn * GW + wcol, rows2, PSTRIDE, NPAD2, P, EVEN_N)
            nz0, nz1 = _bits_load_sz(sz_ptr, gn, rows2, wcol, SZSTRIDE, NPAD2, EVEN_N)
            T0 = tl.zeros(acc0.shape, dtype=tl.float32)
            T1 = tl.zeros(acc0.shape, dtype=tl.float32)
            xs = tl.zeros((1, NW), dtype=tl.float32)
            T0, T1, xs, _ = _bits_fields(
                T0, T1, xs, xs, x_ptr, x_ptr, (g * GW + wcol) * 16, K_IN, w0, w1, w2, w3, w4, w5, w6, w7, P, XE, ASM,
                EVEN_K, False,
            )  # fmt: skip
            acc0, acc1 = _bits_apply(acc0, acc1, T0, T1, xs, sz0, sz1, mult, hk)
            w0 = n0
            w1 = n1
            w2 = n2
            w3 = n3
            w4 = n4
            w5 = n5
            w6 = n6
            w7 = n7
            sz0 = nz0
            sz1 = nz1
    else:
        if AHEAD > 0:
            for ga in range(g_lo, tl.minimum(g_lo + AHEAD, g_hi)):
                _bits_group_lines(w_ptr, sz_ptr, r0, ga, PSTRIDE, SZSTRIDE, NPAD2, P, GW, rows2.shape[0], ASM)
        for g in tl.range(g_lo, g_hi, num_stages=STAGES if STAGES > 0 else None):
            if AHEAD > 0:
                if g + AHEAD < g_hi:
                    _bits_group_lines(
                        w_ptr, sz_ptr, r0, g + AHEAD, PSTRIDE, SZSTRIDE, NPAD2, P, GW, rows2.shape[0], ASM
                    )
            T0 = tl.zeros(acc0.shape, dtype=tl.float32)
            T1 = tl.zeros(acc0.shape, dtype=tl.float32)
            xs = tl.zeros((1, NW), dtype=tl.float32)
            for sc in tl.static_range(0, GW // NW):  # unrolled: nothing loop-carried, xs stays in the words' layout
                wc = g * GW + sc * NW + wcol
                w0, w1, w2, w3, w4, w5, w6, w7 = _bits_load_words(w_ptr, wc, rows2, PSTRIDE, NPAD2, P, EVEN_N)
                T0, T1, xs, _ = _bits_fields(
                    T0, T1, xs, xs, x_ptr, x_ptr, wc * 16, K_IN, w0, w1, w2, w3, w4, w5, w6, w7, P, XE, ASM, EVEN_K,
                    False,
                )  # fmt: skip
            sz0, sz1 = _bits_load_sz(sz_ptr, g, rows2, wcol, SZSTRIDE, NPAD2, EVEN_N)
            acc0, acc1 = _bits_apply(acc0, acc1, T0, T1, xs, sz0, sz1, mult, hk)
    return acc0, acc1


@triton.jit
def _bits_sum_slots(out_ptr, part_ptr, bias_ptr, rows2, N, NPAD2, nseg, HAS_BIAS: tl.constexpr):
    """Row pairs ``rows2``' outputs: the ``nseg`` partial slots summed eight at a time (one load wave per eight
    segments, in a fixed order), the bias added, stored in ``out``'s dtype."""
    r0 = 2 * rows2
    r1 = r0 + 1
    m0 = r0 < N
    m1 = r1 < N
    RED: tl.constexpr = 8
    tot0 = tl.zeros(rows2.shape, dtype=tl.float32)
    tot1 = tl.zeros(rows2.shape, dtype=tl.float32)
    for s0 in range(0, nseg, RED):
        sl = s0 + tl.arange(0, RED)
        sm = (sl < nseg)[:, None]
        p0 = part_ptr + (2 * sl)[:, None] * NPAD2 + rows2[None, :]
        tot0 += tl.sum(tl.load(p0, mask=sm & m0[None, :], other=0.0, cache_modifier=".cg"), axis=0)
        tot1 += tl.sum(tl.load(p0 + NPAD2, mask=sm & m1[None, :], other=0.0, cache_modifier=".cg"), axis=0)
    if HAS_BIAS:
        tot0 += tl.load(bias_ptr + r0, mask=m0, other=0.0).to(tl.float32)
        tot1 += tl.load(bias_ptr + r1, mask=m1, other=0.0).to(tl.float32)
    tl.store(out_ptr + r0, tot0.to(out_ptr.dtype.element_ty), mask=m0)
    tl.store(out_ptr + r1, tot1.to(out_ptr.dtype.element_ty), mask=m1)


@triton.jit
def _bits_segment_store(acc0, acc1, out_ptr, part_ptr, lock_ptr, bias_ptr, rows2, N, NPAD2, t, slot, nseg,
                        HAS_BIAS: tl.constexpr, TICKET: tl.constexpr = True):  # fmt: skip
    """Row block ``t``'s partial (``acc0 / acc1``: even / odd rows) from one program: stored as is when the block
    has one segment; else into partial slot ``slot`` (of ``nseg``; ``[slots, 2, NPAD2]``), and (``TICKET``) the last
    segment to arrive sums the slots (:func:`_bits_sum_slots`); without ``TICKET`` a second launch sums them
    (``_bits_reduce_kernel``, ``SmallConfig.reduce_launch``)."""
    y0 = tl.sum(acc0, axis=1)
    y1 = tl.sum(acc1, axis=1)
    r0 = 2 * rows2
    r1 = r0 + 1
    m0 = r0 < N
    m1 = r1 < N
    if nseg == 1:
        if HAS_BIAS:
            y0 += tl.load(bias_ptr + r0, mask=m0, other=0.0).to(tl.float32)
            y1 += tl.load(bias_ptr + r1, mask=m1, other=0.0).to(tl.float32)
        tl.store(out_ptr + r0, y0.to(out_ptr.dtype.element_ty), mask=m0)
        tl.store(out_ptr + r1, y1.to(out_ptr.dtype.element_ty), mask=m1)
    else:
        tl.store(part_ptr + (2 * slot) * NPAD2 + rows2, y0, mask=m0)
        tl.store(part_ptr + (2 * slot + 1) * NPAD2 + rows2, y1, mask=m1)
        if TICKET:
            tl.debug_barrier()  # every thread's partial is stored before the release below
            ticket = tl.atomic_add(lock_ptr + t, 1, sem="acq_rel")
            tl.debug_barrier()
            if ticket == nseg - 1:
                _bits_sum_slots(out_ptr, part_ptr, bias_ptr, rows2, N, NPAD2, nseg, HAS_BIAS)
                tl.atomic_xchg(lock_ptr + t, 0)  # self-resetting counter


@triton.jit
def _bits_block_programs(t, GPB, G, total):
    """The first and last of the ``G`` stream-K programs sharing row block ``t`` (``total`` items of ``GPB`` groups
    a block): the first holds its group 0, the last its group ``GPB - 1``."""
    return ((t * GPB + 1) * G - 1) // total, ((t + 1) * GPB * G - 1) // total


@triton.jit
def _bits_reduce_kernel(out_ptr, part_ptr, bias_ptr, N, NPAD2, GPB, G, HAS_BIAS: tl.constexpr, BN2: tl.constexpr):
    """``SmallConfig.reduce_launch``: row block ``t``'s partial slots summed after the stream-K launch of ``G``
    programs (row blocks of one program's segment were stored there already)."""
    t = tl.program_id(0)
    p_first, p_last = _bits_block_programs(t, GPB, G, tl.cdiv((N + 1) // 2, BN2) * GPB)
    if p_last > p_first:
        _bits_sum_slots(out_ptr, part_ptr, bias_ptr, t * BN2 + tl.arange(0, BN2), N, NPAD2, p_last - p_first + 1,
                        HAS_BIAS)  # fmt: skip


@triton.jit
def _bits_group_lines(w_ptr, sz_ptr, r0, g, PSTRIDE, SZSTRIDE, NPAD2, P: tl.constexpr, GW: tl.constexpr,
                      BN2: tl.constexpr, ASM: tl.constexpr):  # fmt: skip
    """Group ``g``'s 128-byte lines of the words (``P`` planes) and step/zero words of the row block from row pair
    ``r0`` asked of L2 (``SmallConfig.ahead``); addresses past the padded rows are clamped."""
    PP: tl.constexpr = 1 if P == 1 else (2 if P == 2 else (4 if P <= 4 else 8))  # P <= 8
    LN: tl.constexpr = (BN2 + 31) // 32
    r = tl.minimum(r0 + tl.arange(0, LN) * 32, NPAD2 - 1)
    e = tl.minimum(tl.arange(0, PP), P - 1)
    wo = e[:, None, None] * PSTRIDE + (g * GW + tl.arange(0, GW))[None, :, None] * NPAD2 + r[None, None, :]
    _prefetch_l2(w_ptr + wo, ASM)
    _prefetch_l2(sz_ptr + tl.arange(0, 2)[:, None] * SZSTRIDE + g * NPAD2 + r[None, :], ASM)


@triton.jit
def _bits_prefetch_items(w_ptr, sz_ptr, item, end, GPB, PSTRIDE, SZSTRIDE, NPAD2, P: tl.constexpr, GW: tl.constexpr,
                         BN2: tl.constexpr, ASM: tl.constexpr):  # fmt: skip
    """Every 128-byte line of the words (``P`` planes) and step/zero words of items ``[item, end)`` asked of L2 at
    once (``SmallConfig.l2_prefetch``), so the program's whole range streams from memory while its group loop
    runs. A row block's ``BN2`` row pairs of one word column are contiguous: ``ceil(BN2 / 32)`` lines; addresses
    past the padded rows are clamped (a line asked twice)."""
    for it in range(item, end):
        t = it // GPB
        _bits_group_lines(w_ptr, sz_ptr, t * BN2, it - t * GPB, PSTRIDE, SZSTRIDE, NPAD2, P, GW, BN2, ASM)


@triton.jit
def _bits_stream(
    x_ptr,
    out_ptr,
    part_ptr,
    lock_ptr,
    bias_ptr,
    w_ptr,
    sz_ptr,
    PSTRIDE,
    SZSTRIDE,
    NPAD2,
    N,
    K_IN,
    GPB,
    G,
    mult,
    hk,
    GROUP: tl.constexpr,
    P: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    BN2: tl.constexpr,
    NW: tl.constexpr,
    EVEN_K: tl.constexpr,
    EVEN_N: tl.constexpr,
    XE: tl.constexpr,
    ASM: tl.constexpr,
    PREFETCH: tl.constexpr,
    STAGES: tl.constexpr,
    L2PF: tl.constexpr,
    WAIT: tl.constexpr,
    pid,
    AHEAD: tl.constexpr = 0,
    TICKET: tl.constexpr = True,
):
    """Program ``pid``'s share (of ``G`` programs): the (row block, group) items ``[pid T / G, (pid+1) T / G)`` of
    the row-block-major sequence (``T = blocks x GPB``, ``GPB`` groups per row block), one segment per row block it
    touches (stream-K: every program streams the same number of groups, across row blocks). ``L2PF``: the whole
    range asked of L2 first (:func:`_bits_prefetch_items`); ``WAIT``: then the wait on the kernel before
    (``SmallConfig.pdl``)."""
    n_blocks = tl.cdiv((N + 1) // 2, BN2)
    total = n_blocks * GPB
    item = (pid * total) // G
    end = ((pid + 1) * total) // G
    if L2PF:
        _bits_prefetch_items(w_ptr, sz_ptr, item, end, GPB, PSTRIDE, SZSTRIDE, NPAD2, P, GROUP // 16, BN2, ASM)
    if WAIT:
        _pdl_wait(ASM)
    wcol = tl.arange(0, NW)
    while item < end:
        t = item // GPB
        g_lo = item - t * GPB
        g_hi = tl.minimum(end - t * GPB, GPB)
        rows2 = t * BN2 + tl.arange(0, BN2)
        acc0 = tl.zeros((BN2, NW), dtype=tl.float32)
        acc1 = tl.zeros((BN2, NW), dtype=tl.float32)
        acc0, acc1 = _bits_groups(
            acc0,
            acc1,
            x_ptr,
            w_ptr,
            sz_ptr,
            rows2,
            wcol,
            PSTRIDE,
            SZSTRIDE,
            NPAD2,
            K_IN,
            g_lo,
            g_hi,
            mult,
            hk,
            GROUP,
            P,
            NW,
            EVEN_K,
            EVEN_N,
            XE,
            ASM,
            PREFETCH,
            STAGES,
            AHEAD,
            t * BN2,
        )
        p_first, p_last = _bits_block_programs(t, GPB, G, total)
        _bits_segment_store(
            acc0,
            acc1,
            out_ptr,
            part_ptr,
            lock_ptr,
            bias_ptr,
            rows2,
            N,
            NPAD2,
            t,
            pid - p_first,
            p_last - p_first + 1,
            HAS_BIAS,
            TICKET,
        )
        item = t * GPB + g_hi


# fmt: off
@triton.jit
def _bits_whole(x_ptr, out_ptr, bias_ptr, w_ptr, sz_ptr, PSTRIDE, SZSTRIDE, NPAD2, N, K_IN, GPB, mult, hk,
                GROUP: tl.constexpr, P: tl.constexpr, HAS_BIAS: tl.constexpr, BN2: tl.constexpr, WKP: tl.constexpr,
                XE: tl.constexpr, ASM: tl.constexpr, WAIT: tl.constexpr, PRE: tl.constexpr, b0, b1, b2, b3, b4, b5,
                b6, b7, t, pro_ptr, eps, PRO: tl.constexpr):
    # fmt: on
    """Row block ``t`` over all of K in one pass: every word, step and zero point of the block is loaded at once
    (``[BN2, WKP]`` words per plane, masked past the ``GPB`` groups), so the program waits on memory once; the codes
    are summed per word as in :func:`_bits_groups`, then per group (``WKP / GW`` groups of ``GW`` words), and the
    rows are stored with no partial sums. For the small matrices of a decode step, whose time is latency, not
    bytes (``SmallConfig.whole_k``). ``WAIT``: the words, steps and zero points are loaded before the wait on the
    kernel before this one (``SmallConfig.pdl``), the activations after it. ``PRE`` > 0: the words of planes
    ``0 .. PRE-1`` are ``b0 ..`` (loaded by the caller before ``k`` was known). ``PRO`` 1: ``x`` is an RMS norm's
    input, not its output: the program, which reads the whole row, multiplies it by the norm's weight ``pro_ptr`` as
    it loads it, sums its squares, and scales the row block's sums by ``rsqrt(mean(x^2) + eps)`` before the bias
    (no launch for the norm); 2: ``x`` is a gated MLP's gate, ``pro_ptr`` its up projection, and the program reads
    ``silu(gate) * up`` (no launch for the product)."""
    GW: tl.constexpr = GROUP // 16
    GP: tl.constexpr = WKP // GW
    rows2, wc, offs, wmask = _bits_whole_offs(t, BN2, WKP, NPAD2, GPB, GW)
    w0, w1, w2, w3, w4, w5, w6, w7 = _bits_load_rest(
        w_ptr, offs, PSTRIDE, PRE, P, b0, b1, b2, b3, b4, b5, b6, b7, False, wmask
    )
    g = tl.arange(0, GP)
    sz0, sz1 = _bits_load_sz_at(sz_ptr, g[None, :] * NPAD2 + rows2[:, None], SZSTRIDE, False, (g < GPB)[None, :])
    if WAIT:
        _pdl_wait(ASM)
    T0 = tl.zeros((BN2, WKP), dtype=tl.float32)
    T1 = tl.zeros((BN2, WKP), dtype=tl.float32)
    xs = tl.zeros((1, WKP), dtype=tl.float32)
    ss = tl.zeros((1, WKP), dtype=tl.float32)
    T0, T1, xs, ss = _bits_fields(
        T0, T1, xs, ss, x_ptr, pro_ptr, wc * 16, K_IN, w0, w1, w2, w3, w4, w5, w6, w7, P, XE, ASM, False, PRO
    )
    T0 = tl.sum(tl.reshape(T0, (BN2, GP, GW)), axis=2)
    T1 = tl.sum(tl.reshape(T1, (BN2, GP, GW)), axis=2)
    xs = tl.sum(tl.reshape(xs, (1, GP, GW)), axis=2)
    acc0 = tl.zeros((BN2, GP), dtype=tl.float32)
    acc1 = tl.zeros((BN2, GP), dtype=tl.float32)
    acc0, acc1 = _bits_apply(acc0, acc1, T0, T1, xs, sz0, sz1, mult, hk)
    if PRO == 1:  # the RMS norm's scale of the token (mean over its K_IN inputs, in fp32 as the model's norm)
        inv = tl.math.rsqrt(tl.sum(ss) / K_IN + eps)
        acc0 = acc0 * inv
        acc1 = acc1 * inv
    _bits_segment_store(acc0, acc1, out_ptr, out_ptr, out_ptr, bias_ptr, rows2, N, NPAD2, t, 0, 1, HAS_BIAS)


@triton.jit
def _pick8(V: tl.constexpr, a1, a2, a3, a4, a5, a6, a7, a8):
    if V == 1:
        return a1
    elif V == 2:
        return a2
    elif V == 3:
        return a3
    elif V == 4:
        return a4
    elif V == 5:
        return a5
    elif V == 6:
        return a6
    elif V == 7:
        return a7
    else:
        return a8


# sizes that only bound loops and masks are not specialised (one compiled kernel for every shape and grid size)
@triton.jit(do_not_specialize=["N", "K_IN", "GPB", "G", "N1", "N2", "SP1", "SP2", "SR1", "SR2", "SO1", "SO2"])
def _bp_gemv_bits_kernel(
    x_ptr,
    out_ptr,
    part_ptr,
    lock_ptr,
    bias_ptr,
    k_ptr,
    v_ptr,
    tau_ptr,
    tau1_ptr,
    tau2_ptr,
    w_ptr,
    sz_ptr,
    sync_ptr,
    rw1_ptr,
    rb1_ptr,
    rw2_ptr,
    rb2_ptr,
    rpart_ptr,
    PSTRIDE,
    SZSTRIDE,
    NPAD2,
    N,
    K_IN,
    GPB,
    G,
    N1,
    N2,
    SP1,
    SP2,
    SR1,
    SR2,
    SO1,
    SO2,
    M1,
    M2,
    M3,
    M4,
    M5,
    M6,
    M7,
    M8,
    H1,
    H2,
    H3,
    H4,
    H5,
    H6,
    H7,
    H8,
    pro_ptr,
    eps,
    GROUP: tl.constexpr,
    NS: tl.constexpr,
    KSEL: tl.constexpr,
    P1: tl.constexpr,
    P2: tl.constexpr,
    P3: tl.constexpr,
    P4: tl.constexpr,
    P5: tl.constexpr,
    P6: tl.constexpr,
    P7: tl.constexpr,
    P8: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    BN2: tl.constexpr,
    NW: tl.constexpr,
    EVEN_K: tl.constexpr,
    EVEN_N: tl.constexpr,
    XE: tl.constexpr,
    ASM: tl.constexpr,
    PREFETCH: tl.constexpr,
    PER_VIEW: tl.constexpr,
    KVALS: tl.constexpr,
    NSEG: tl.constexpr,
    RH: tl.constexpr,
    RRP: tl.constexpr,
    RBD: tl.constexpr,
    RNPP: tl.constexpr,
    RADJ: tl.constexpr,
    WKP: tl.constexpr,
    STAGES: tl.constexpr,
    PDL: tl.constexpr,
    L2PF: tl.constexpr,
    AHEAD: tl.constexpr = 0,
    TICKET: tl.constexpr = True,
    KLO: tl.constexpr = 0,
    KHI: tl.constexpr = 0,
    PRELOAD: tl.constexpr = False,
    PRO: tl.constexpr = 0,
):
    """One token from one-bit planes (see above). ``KSEL`` > 0: the view ``k = KSEL`` (known on the host); 0: ``k``
    read on the device, one body per view ``v`` (``P_v`` planes, multiplier ``M_v``, zero-point term ``H_v``)
    compiled together, the token's own executed. ``KVALS`` > 0 (with ``KSEL`` 0): ``k`` is not read but counted
    here from the router's ``KVALS`` gate values at ``v_ptr`` and the threshold at ``tau_ptr`` (:class:`RoutedK`:
    ``k = 1 + #{e : v_e > tau}``, compared in the values' dtype), so a routed linear needs no launch of its own to
    turn its router's values into ``k``. ``PER_VIEW`` (with ``KSEL`` 0): ``sz`` holds a set of step and
    zero point words per view (``[NS, 2, groups, NPAD / 2]``, contiguous) and view ``v`` reads set ``v - 1``; with
    ``KSEL`` > 0 the host passes the view's own set.

    ``NSEG`` > 1: the buffers hold ``NSEG`` layers of one input side by side (a site's linears, :class:`SiteBits`):
    segment ``s`` has ``N_s`` rows (``N``, ``N1``, ``N2``) from row pair ``SR_s`` of the words and step/zero words,
    writes its outputs from column ``SO_s``, and owns the programs from ``SP_s`` (segment 0 from 0; each streams
    its own segment's items alone, stream-K within it); with ``KVALS`` its threshold is at ``tau_ptr``,
    ``tau1_ptr``, ``tau2_ptr``, so each segment takes its own view.

    ``WKP`` > 0: no stream-K; program ``pid`` of a segment takes its row block ``pid`` over all of K at once
    (:func:`_bits_whole`, ``WKP`` word columns, a power of two covering the ``GPB`` groups), so ``G`` and the
    segments' program starts count row blocks.

    ``RH`` > 0 (with ``KVALS``): the router of the token runs in this launch. Programs ``0 .. RH - 1`` compute one
    hidden unit each of the router ``rw1 / rb1 / rw2 / rb2`` (``mobiquant.kernels.triton_router``'s arithmetic,
    so the same values bit for bit), and the last of them to finish writes the gate values to ``v_ptr`` and raises
    a flag; the other programs (the GEMV's, ``pid - RH``) wait for it before they count ``k``. Program ids are
    taken from a counter in the order the programs start, so the router's are the first to start and every waiting
    program waits only on running ones; the last program to finish resets the flag and counters at ``sync_ptr``
    (self-resetting, like the split-K tickets).

    ``KLO``, ``KHI`` > 0 (with ``KSEL`` 0): the token's view lies in ``KLO .. KHI`` (known on the host, e.g. the two
    views of an adjacent-policy threshold): only those views' bodies are compiled, and ``k`` is clamped into them.

    ``PRELOAD`` (``SmallConfig.preload``) or ``PDL``: a whole-K launch that learns ``k`` on the device (no router in
    the launch) loads the planes that every compiled body reads before it reads ``k``, so their loads overlap that
    read (with ``PDL``, the kernel before as well).

    ``PRO`` (whole-K only, no router in the launch): 1, ``x`` is an RMS norm's input, its weight at ``pro_ptr`` and
    epsilon ``eps``; 2, ``x`` is a gated MLP's gate and ``pro_ptr`` its up projection: every program makes the norm
    or the product of the row it reads (:func:`_bits_whole`).

    ``PDL``: the launch has the programmatic-dependent-launch attribute (``SmallConfig.pdl``): every program lets
    the next kernel start, then waits for the kernel before it to finish before reading the activations, gate
    values, ``k`` or any buffer another launch writes; before that wait it only reads weights (a whole-K body of a
    view known on the host all of its words, steps and zero points; a whole-K launch with ``k`` on the device its
    base planes; a stream-K body of a known view its L2 requests, with ``L2PF``). ``L2PF``: stream-K programs ask L2
    for their whole range of groups first (``SmallConfig.l2_prefetch``).
    """
    pid = tl.program_id(0)
    # PDL: launched with programmatic dependent launch; the next kernel may start its programs now, and this one
    # reads nothing another kernel writes before its wait: the body of a view known here waits after loading its
    # words, steps and zero points (whole-K) or asking L2 for them (stream-K with L2PF), so they overlap the kernel
    # before; every other launch waits right here
    WAIT_IN_BODY: tl.constexpr = PDL and KSEL > 0
    # the views compiled in when k is learnt on the device: all, or the span the host knows
    V_LO: tl.constexpr = KLO + (KLO == 0)
    V_HI: tl.constexpr = KHI + NS * (KHI == 0)
    # a whole-K launch that learns k on the device loads the planes every compiled body reads (those of view V_LO)
    # before it reads k (PRELOAD), and with PDL before its wait: the loads overlap the read (and the kernel before)
    PRE_BASE: tl.constexpr = WKP > 0 and KSEL == 0 and RH == 0 and (PDL or PRELOAD)
    if PDL:
        _pdl_launch_dependents(ASM)
        if not WAIT_IN_BODY and not PRE_BASE:
            _pdl_wait(ASM)
    if RH > 0:
        # ids in the order programs start: every program that waits below started after all of the router's, so
        # those are running and finish whatever the hardware's block order (no wait on a program not yet started)
        pid = tl.atomic_add(sync_ptr + 3, 1, sem="acq_rel")
        if pid < RH:  # one hidden unit of the router for the token
            lm = tl.arange(0, 2)
            rr = tl.arange(0, RRP)
            part = _router_part(
                x_ptr, rw1_ptr, rb1_ptr, rw2_ptr, lm, lm < 1, pid, K_IN, RH, K_IN, rw1_ptr, rw1_ptr, 1.0, KVALS, RRP,
                1, 2, RBD, False,
            )  # fmt: skip
            tl.store(rpart_ptr + (pid * 2 + lm[:, None]) * RRP + rr[None, :], part)
            tl.debug_barrier()  # every thread's partial is stored before the release below
            ticket = tl.atomic_add(sync_ptr, 1, sem="acq_rel")
            tl.debug_barrier()
            if ticket == RH - 1:
                vals = _router_values(rpart_ptr, 0, rb2_ptr, RH, KVALS, RRP, 2, RNPP, RADJ)
                tl.store(
                    v_ptr + lm[:, None] * KVALS + rr[None, :], vals, mask=(lm < 1)[:, None] & (rr < KVALS)[None, :]
                )
                tl.debug_barrier()  # the values are stored before the flag
                tl.atomic_xchg(sync_ptr + 1, 1, sem="release")
        else:
            flag = tl.atomic_add(sync_ptr + 1, 0, sem="acquire")
            while flag == 0:
                flag = tl.atomic_add(sync_ptr + 1, 0, sem="acquire")
        pid = pid - RH
    if pid >= 0:
        seg = pid * 0
        n_s = N
        g_s = G
        r_s = SR1 * 0
        o_s = SO1 * 0
        if NSEG > 1:
            g_s = tl.minimum(SP1, G)
            if pid >= SP1:
                seg = seg + 1
                n_s = N1
                pid = pid - SP1
                g_s = G - SP1
                r_s = SR1
                o_s = SO1
                if NSEG > 2:
                    g_s = SP2 - SP1
                    if pid >= SP2 - SP1:
                        seg = seg + 1
                        n_s = N2
                        pid = pid - (SP2 - SP1)
                        g_s = G - SP2
                        r_s = SR2
                        o_s = SO2
        # this segment's rows: words, step/zero words and partial slots from row pair r_s (a whole number of row
        # blocks: the host checks), its row blocks' tickets after those of the segments before it, outputs (and bias)
        # from column o_s. Every layer's rows start at a multiple of 128 (site_bitplanes pads them): written so that
        # the compiler knows it (r_s // 64 * 64; a multiple_of hint on the scalar did not carry), or the words of a
        # site load 4 bytes at a time instead of 8 or 16 (offline sm_90 SASS: LDG.E against LDG.E.64 / .128)
        r_s = r_s // 64 * 64
        w_s = w_ptr + r_s
        sz_s = sz_ptr + r_s
        part_s = part_ptr + r_s
        lock_s = lock_ptr + r_s // BN2
        out_s = out_ptr + o_s
        bias_s = bias_ptr + o_s
        if PRE_BASE:
            PB: tl.constexpr = (
                P1 * (V_LO == 1) + P2 * (V_LO == 2) + P3 * (V_LO == 3) + P4 * (V_LO == 4)
                + P5 * (V_LO == 5) + P6 * (V_LO == 6) + P7 * (V_LO == 7) + P8 * (V_LO == 8)
            )  # fmt: skip
            _, _, offs_b, mask_b = _bits_whole_offs(pid, BN2, WKP, NPAD2, GPB, GROUP // 16)
            b0, b1, b2, b3, b4, b5, b6, b7 = _bits_load_at(w_s, offs_b, PSTRIDE, PB, False, mask_b)
            if PDL:
                _pdl_wait(ASM)
        else:
            PB: tl.constexpr = 0  # type: ignore[no-redef]
            b0, b1, b2, b3, b4, b5, b6, b7 = 0, 0, 0, 0, 0, 0, 0, 0
        if KSEL == 0:
            if KVALS > 0:
                val = tl.load(v_ptr, cache_modifier=".cg")
                if NSEG == 1:
                    tau = tl.load(tau_ptr)
                elif NSEG == 2:
                    tau = tl.where(seg == 0, tl.load(tau_ptr), tl.load(tau1_ptr))
                else:
                    tau = tl.where(seg == 0, tl.load(tau_ptr), tl.where(seg == 1, tl.load(tau1_ptr), tl.load(tau2_ptr)))
                tau = tau.to(val.dtype)
                kk = 1 + (val > tau).to(tl.int32)
                for r in tl.static_range(1, KVALS):
                    kk += (tl.load(v_ptr + r, cache_modifier=".cg") > tau).to(tl.int32)
            else:
                kk = tl.load(k_ptr).to(tl.int32)
            if KLO > 0:  # a span known on the host: its views alone
                kk = tl.minimum(tl.maximum(kk, V_LO), V_HI)
            B_LO: tl.constexpr = V_LO
            B_HI: tl.constexpr = V_HI
        else:  # the view known on the host: its body alone
            kk = KSEL
            B_LO: tl.constexpr = KSEL  # type: ignore[no-redef]
            B_HI: tl.constexpr = KSEL  # type: ignore[no-redef]
        for v in tl.static_range(B_LO, B_HI + 1):
            if kk == v:
                if PER_VIEW:
                    sz_v = sz_s + (v - 1) * 2 * SZSTRIDE
                else:
                    sz_v = sz_s
                # the view's plane count, a compile-time constant: the one term whose view matches
                P: tl.constexpr = (
                    P1 * (v == 1) + P2 * (v == 2) + P3 * (v == 3) + P4 * (v == 4)
                    + P5 * (v == 5) + P6 * (v == 6) + P7 * (v == 7) + P8 * (v == 8)
                )  # fmt: skip
                mult = _pick8(v, M1, M2, M3, M4, M5, M6, M7, M8)
                hk = _pick8(v, H1, H2, H3, H4, H5, H6, H7, H8)
                if WKP > 0:  # one row block per program, all of K at once
                    _bits_whole(
                        x_ptr, out_s, bias_s, w_s, sz_v, PSTRIDE, SZSTRIDE, NPAD2, n_s, K_IN, GPB, mult, hk, GROUP, P,
                        HAS_BIAS, BN2, WKP, XE, ASM, WAIT_IN_BODY, PB, b0, b1, b2, b3, b4, b5, b6, b7, pid, pro_ptr,
                        eps, PRO,
                    )  # fmt: skip
                else:
                    _bits_stream(
                        x_ptr, out_s, part_s, lock_s, bias_s, w_s, sz_v, PSTRIDE, SZSTRIDE, NPAD2, n_s, K_IN, GPB, g_s,
                        mult, hk, GROUP, P, HAS_BIAS, BN2, NW, EVEN_K, EVEN_N, XE, ASM, PREFETCH, STAGES, L2PF,
                        WAIT_IN_BODY, pid, AHEAD, TICKET,
                    )  # fmt: skip
    if RH > 0:  # the last program to finish resets the router's tickets and flag for the next launch
        tl.debug_barrier()
        done = tl.atomic_add(sync_ptr + 2, 1, sem="acq_rel")
        if done == RH + G - 1:
            tl.atomic_xchg(sync_ptr, 0)
            tl.atomic_xchg(sync_ptr + 1, 0)
            tl.atomic_xchg(sync_ptr + 2, 0)
            tl.atomic_xchg(sync_ptr + 3, 0)


# -------------------------------------------------------------------------------- tile (prefill) kernel
@triton.jit
def _tile_codes(
    c,
    plane_ptr,
    rows,
    row_mask,
    col0,
    K_IN,
    B: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    STRUCT: tl.constexpr,
):
    return (c << B) | _decode(plane_ptr, rows, row_mask, col0, K_IN, B, BLOCK_N, BLOCK_K, STRUCT)


@triton.jit
def _bp_tile_kernel(
    x_ptr,
    out_ptr,
    bias_ptr,
    perm_ptr,
    seg_ptr,
    scale_ptr,
    zero_ptr,
    p0,
    p1,
    p2,
    p3,
    p4,
    p5,
    p6,
    p7,
    inv_shift,
    half_off,
    M,
    N,
    K_IN,
    N_GROUPS,
    stride_xm,
    stride_om,
    GROUP: tl.constexpr,
    KSEL: tl.constexpr,
    B0: tl.constexpr,
    B1: tl.constexpr,
    B2: tl.constexpr,
    B3: tl.constexpr,
    B4: tl.constexpr,
    B5: tl.constexpr,
    B6: tl.constexpr,
    B7: tl.constexpr,
    S0: tl.constexpr,
    S1: tl.constexpr,
    S2: tl.constexpr,
    S3: tl.constexpr,
    S4: tl.constexpr,
    S5: tl.constexpr,
    S6: tl.constexpr,
    S7: tl.constexpr,
    HAS_PERM: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    SCALE_VEC: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
    DT: tl.constexpr,
    DOT_F32: tl.constexpr,
):
    pid = tl.program_id(0)
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    group_id = pid // (GROUP_M * num_pid_n)
    first_m = group_id * GROUP_M
    gsize = tl.minimum(num_pid_m - first_m, GROUP_M)
    pid_m = first_m + (pid % (GROUP_M * num_pid_n)) % gsize
    pid_n = (pid % (GROUP_M * num_pid_n)) // gsize

    if HAS_PERM:
        seg_lo = tl.load(seg_ptr + KSEL - 1)
        seg_hi = tl.load(seg_ptr + KSEL)
    else:
        seg_lo = 0
        seg_hi = M
    start = seg_lo + pid_m * BLOCK_M
    if start < seg_hi:
        pos = start + tl.arange(0, BLOCK_M)
        m_mask = pos < seg_hi
        if HAS_PERM:
            tok = tl.load(perm_ptr + pos, mask=m_mask, other=0).to(tl.int64)
        else:
            tok = pos.to(tl.int64)
        rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        row_mask = rows < N
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for col0 in range(0, K_IN, BLOCK_K):
            cols = col0 + tl.arange(0, BLOCK_K)
            x = tl.load(
                x_ptr + tok[:, None] * stride_xm + cols[None, :],
                mask=m_mask[:, None] & (cols[None, :] < K_IN),
                other=0.0,
            )
            c = _decode(p0, rows, row_mask, col0, K_IN, B0, BLOCK_N, BLOCK_K, S0)
            if KSEL > 1:
                c = _tile_codes(c, p1, rows, row_mask, col0, K_IN, B1, BLOCK_N, BLOCK_K, S1)
            if KSEL > 2:
                c = _tile_codes(c, p2, rows, row_mask, col0, K_IN, B2, BLOCK_N, BLOCK_K, S2)
            if KSEL > 3:
                c = _tile_codes(c, p3, rows, row_mask, col0, K_IN, B3, BLOCK_N, BLOCK_K, S3)
            if KSEL > 4:
                c = _tile_codes(c, p4, rows, row_mask, col0, K_IN, B4, BLOCK_N, BLOCK_K, S4)
            if KSEL > 5:
                c = _tile_codes(c, p5, rows, row_mask, col0, K_IN, B5, BLOCK_N, BLOCK_K, S5)
            if KSEL > 6:
                c = _tile_codes(c, p6, rows, row_mask, col0, K_IN, B6, BLOCK_N, BLOCK_K, S6)
            if KSEL > 7:
                c = _tile_codes(c, p7, rows, row_mask, col0, K_IN, B7, BLOCK_N, BLOCK_K, S7)
            if SCALE_VEC:
                g = col0 // GROUP
                s = tl.load(scale_ptr + rows.to(tl.int64) * N_GROUPS + g, mask=row_mask, other=0.0)
                z = tl.load(zero_ptr + rows.to(tl.int64) * N_GROUPS + g, mask=row_mask, other=0.0)
                s = s.to(tl.float32)[:, None]
                z = z.to(tl.float32)[:, None]
            else:
                gidx = rows.to(tl.int64)[:, None] * N_GROUPS + (cols // GROUP)[None, :]
                gmask = row_mask[:, None] & (cols[None, :] < K_IN)
                s = tl.load(scale_ptr + gidx, mask=gmask, other=0.0).to(tl.float32)
                z = tl.load(zero_ptr + gidx, mask=gmask, other=0.0).to(tl.float32)
            w = _cast(s * (c.to(tl.float32) * inv_shift - z - half_off), DT)
            if DT == 2 or DOT_F32:
                acc = tl.dot(x.to(tl.float32), tl.trans(w.to(tl.float32)), acc, input_precision="ieee")
            else:
                acc = tl.dot(_cast(x, DT), tl.trans(w), acc)
        if HAS_BIAS:
            acc += tl.load(bias_ptr + rows, mask=row_mask, other=0.0).to(tl.float32)[None, :]
        tl.store(
            out_ptr + tok[:, None] * stride_om + rows[None, :],
            acc.to(out_ptr.dtype.element_ty),
            mask=m_mask[:, None] & row_mask[None, :],
        )


# ------------------------------------------------------------------------------------ dequantize kernel
@triton.jit
def _bp_dequant_kernel(
    w_ptr,
    scale_ptr,
    zero_ptr,
    p0,
    p1,
    p2,
    p3,
    p4,
    p5,
    p6,
    p7,
    inv_shift,
    half_off,
    N,
    K_IN,
    N_GROUPS,
    GROUP: tl.constexpr,
    KSEL: tl.constexpr,
    B0: tl.constexpr,
    B1: tl.constexpr,
    B2: tl.constexpr,
    B3: tl.constexpr,
    B4: tl.constexpr,
    B5: tl.constexpr,
    B6: tl.constexpr,
    B7: tl.constexpr,
    S0: tl.constexpr,
    S1: tl.constexpr,
    S2: tl.constexpr,
    S3: tl.constexpr,
    S4: tl.constexpr,
    S5: tl.constexpr,
    S6: tl.constexpr,
    S7: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    ROW_SCALE: tl.constexpr,
):
    """``W_k`` ``[N, K_IN]`` written in ``w_ptr``'s dtype (the dequantize-then-matmul path). ``ROW_SCALE``: a block's
    columns lie in one group (``BLOCK_K`` divides ``GROUP``), so its steps and zero points are one per row, loaded
    once and broadcast (else one gathered load per element)."""
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    col0 = tl.program_id(1) * BLOCK_K
    row_mask = rows < N
    cols = col0 + tl.arange(0, BLOCK_K)
    c = _decode(p0, rows, row_mask, col0, K_IN, B0, BLOCK_N, BLOCK_K, S0)
    if KSEL > 1:
        c = _tile_codes(c, p1, rows, row_mask, col0, K_IN, B1, BLOCK_N, BLOCK_K, S1)
    if KSEL > 2:
        c = _tile_codes(c, p2, rows, row_mask, col0, K_IN, B2, BLOCK_N, BLOCK_K, S2)
    if KSEL > 3:
        c = _tile_codes(c, p3, rows, row_mask, col0, K_IN, B3, BLOCK_N, BLOCK_K, S3)
    if KSEL > 4:
        c = _tile_codes(c, p4, rows, row_mask, col0, K_IN, B4, BLOCK_N, BLOCK_K, S4)
    if KSEL > 5:
        c = _tile_codes(c, p5, rows, row_mask, col0, K_IN, B5, BLOCK_N, BLOCK_K, S5)
    if KSEL > 6:
        c = _tile_codes(c, p6, rows, row_mask, col0, K_IN, B6, BLOCK_N, BLOCK_K, S6)
    if KSEL > 7:
        c = _tile_codes(c, p7, rows, row_mask, col0, K_IN, B7, BLOCK_N, BLOCK_K, S7)
    mask = row_mask[:, None] & (cols[None, :] < K_IN)
    if ROW_SCALE:
        ridx = rows.to(tl.int64) * N_GROUPS + col0 // GROUP
        s = tl.load(scale_ptr + ridx, mask=row_mask, other=0.0).to(tl.float32)[:, None]
        z = tl.load(zero_ptr + ridx, mask=row_mask, other=0.0).to(tl.float32)[:, None]
    else:
        gidx = rows.to(tl.int64)[:, None] * N_GROUPS + (cols // GROUP)[None, :]
        s = tl.load(scale_ptr + gidx, mask=mask, other=0.0).to(tl.float32)
        z = tl.load(zero_ptr + gidx, mask=mask, other=0.0).to(tl.float32)
    w = s * (c.to(tl.float32) * inv_shift - z - half_off)
    tl.store(w_ptr + rows.to(tl.int64)[:, None] * K_IN + cols[None, :], w.to(w_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _bits_dequant_kernel(
    w_ptr,
    words_ptr,
    sz_ptr,
    inv_shift,
    half_off,
    N,
    K_IN,
    NPAD2,
    KW,
    N_GROUPS,
    P: tl.constexpr,
    GW: tl.constexpr,
    BR: tl.constexpr,
    BW: tl.constexpr,
):
    """``W_k`` ``[N, K_IN]`` from one-bit plane buffers (:class:`BitPlanes`): its first ``P`` planes. A program
    takes ``BR`` row pairs and ``BW`` word columns (``2 BR`` rows, ``16 BW`` columns): every plane word it loads is
    read once, whole (coalesced along the row pairs), and gives 32 codes. The codes are a 5-D
    ``[word, row pair, row, half, column]`` tensor: a word shifted once a half-word's eight columns (``u``), then
    each column's bit taken at a constant shift and placed at its plane's bit by one AND-OR (the eight consecutive
    columns of the last axis are one 16-byte store). The step and zero point are those of the word's group (``GW``
    words a group)."""
    i = tl.program_id(0) * BR + tl.arange(0, BR)  # row pairs (NPAD2 is a multiple of 64: no mask)
    wc = tl.program_id(1) * BW + tl.arange(0, BW)  # word columns
    wmask = wc < KW
    offs = wc[:, None] * NPAD2 + i[None, :]  # [BW, BR]
    r = tl.arange(0, 2)
    h = tl.arange(0, 2)
    jl = tl.arange(0, 8)[None, None, None, None, :]
    first = (r[:, None] * 16 + h[None, :] * 8)[None, None, :, :]  # the first bit of each eight in a word
    c = tl.zeros([BW, BR, 2, 2, 8], dtype=tl.int32)
    plane = KW * NPAD2
    for t in tl.static_range(P):  # most significant plane first
        wd = tl.load(words_ptr + t * plane + offs, mask=wmask[:, None], other=0)
        u = (wd[:, :, None, None] >> first)[:, :, :, :, None]
        c |= ((u >> jl) & 1) << (P - 1 - t)
    g = wc // GW
    szv = tl.load(
        sz_ptr + (r[None, None, :] * N_GROUPS + g[:, None, None]) * NPAD2 + i[None, :, None],
        mask=wmask[:, None, None],
        other=0,
    )  # [BW, BR, 2]
    s = (szv & 0xFFFF).to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)
    z = (szv >> 16).to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)
    a = (s * inv_shift)[:, :, :, None, None]
    b = (-s * (z + half_off))[:, :, :, None, None]
    # the code as an exact float without a conversion: its bits under 2^23's exponent, minus 2^23
    cf = (c | 0x4B000000).to(tl.float32, bitcast=True) - 8388608.0
    w = cf * a + b
    rows = 2 * i[None, :, None, None, None] + r[None, None, :, None, None]
    cols = 16 * wc[:, None, None, None, None] + 8 * h[None, None, None, :, None] + jl
    mask = (rows < N) & (cols < K_IN)
    tl.store(w_ptr + rows.to(tl.int64) * K_IN + cols, w.to(w_ptr.dtype.element_ty), mask=mask)


# ------------------------------------------------------------------------------------------- host side
#: ``SmallConfig.pdl`` None: the most planes a static view's launch has programmatic dependent launch at (measured on
#: an H100: the 8B-shaped lean step's 3 and 4-bit views faster with it, 5-8 bits slower)
PDL_MAX_PLANES = 4


@dataclass(frozen=True)
class SmallConfig:
    """Small-batch launch: ``use_dot`` None = tensor cores for 2..16 tokens, CUDA cores for one token."""

    block_n: int | None = None
    block_k: int | None = None  # tensor cores: must divide the group; one token: may hold whole groups
    split_k: int | None = None  # default: enough programs to fill the device
    num_warps: int = 4
    num_stages: int = 2
    use_dot: bool | None = None
    magic: bool = True  # codes enter the dot as exact floats 1 + q / 2^b built from bits (no I2F)
    combine: bool = True  # tensor cores, every token the same k: one dot on the concatenated code
    # one token, equal slice widths: code fields read in place (_bp_gemv_fields_kernel). None: used when at
    # most FIELDS_MAX_K planes are read (faster there on an H200, slower at k=4) and when k is read on the
    # device (a body per k; benchmarks/NOTES.md, versions 7 and 9).
    fields: bool | None = None
    # one token from one-bit planes (_bp_gemv_bits_kernel, any layout of at most 8 bits). None: for the layouts the
    # small-batch kernels do not cover (e.g. the default [3, 1, 1, 1, 1, 1], whose 3-bit plane packs 10 codes per
    # word: measured 19-39x faster than the tile kernel it replaces on an H200, docs/RESULTS.md "Decode");
    # True: for every layout it covers; False: never. With it: ``block_n`` rows per program and ``block_k``
    # columns (16 x a power of two dividing the group) per sub-chunk, ``waves`` programs per SM (stream-K grid;
    # ``split_k``: programs per row block instead).
    bitplanes: bool | None = None
    waves: int | None = None
    prefetch: bool = False  # one-bit plane kernel, block_k = group: next group's words loaded before this one's sum
    # one-bit plane kernel, stream-K without prefetch: num_stages of the group loop (Triton's pipeliner keeps later
    # groups' loads in flight through shared memory); None: no pipelining (S = 3 on an H200: 0.88-0.92x on the 8B
    # stream-K linears, docs/RESULTS.md "Programmatic dependent launch and L2 requests")
    stages: int | None = None
    maxnreg: int | None = None  # one-bit plane kernel's register cap (None: BITS_MAXNREG, none with prefetch)
    # one token, routed, on the one-bit plane kernel: the router runs in the GEMV's launch (RoutedK.router).
    # Off: correct on the GPU but slower than the router's own launch (0.73-0.86x per site on an H200, docs/RESULTS.md
    # "The router inside its site's launch"): the GEMV programs wait on a flag that the router's programs raise.
    router_in_launch: bool = False
    # one-bit plane kernel: one program per row block over all of K at once (no stream-K, no partial sums), for
    # inputs of at most BITS_WHOLE_MAX_K features and groups of a power of two words. None: where K allows and the
    # launch has at most BITS_WHOLE_MAX_ROWS rows, unless a stream-K knob is given (measured on an H200: 1.17-1.58x
    # faster than stream-K for every SmolLM2 linear and the 8B q/o and k/v, slower for gate/up's 14336 rows;
    # docs/RESULTS.md "Whole-K"). ``block_n`` None: at least K / 512 warps, about four words per thread and plane.
    whole_k: bool | None = None
    # one-bit plane and fragment kernels: launched with programmatic dependent launch (sm_90+): their programs start
    # while the kernel before is still running and wait for it (griddepcontrol) only before reading what that kernel
    # writes; a whole-K launch of a view known on the host loads its words, steps and zero points before that wait, so
    # they stream under the kernel before (the fragment kernel, since 2026-12-06: a static view's first group of words;
    # on an H100 the site stack's 3-6 bit views 1-6% faster, 7-8 bits 5-6% slower, the package's static views 2-3%
    # slower, docs/RESULTS.md "The fragment kernel's programmatic dependent launch, and spans in the package"). Off: on
    # an H200 it speeds up only launches of the one-bit plane kernel back to back
    # (1.4-1.6x per SmolLM2 linear, 0.96-1.2x per 8B one); in the 8B-shaped stack, where torch's kernels and the
    # routers sit between them, it was 0.98-1.02x (docs/RESULTS.md "Programmatic dependent launch and L2 requests").
    # "static": only the launches of static views (k known on the host, no router in or before them; the attention
    # before a static o projection in the lean step); router launches and views on the device without it.
    # "views": every launch of a linear, static or read on the device, none of the routers' (to time whether the
    # routed budgets' loss under True is the routers', benchmarks/NOTES.md entry 41 (c)).
    # None (the default): on cards that have it (compute capability 9.0+; elsewhere none), the launches of static
    # views of at most PDL_MAX_PLANES planes and those of views read on the device with no router in them (as
    # "views"): on an H100 the 8B-shaped lean step's static 3 / 4-bit views 4.3 / 3.9% faster with it, 5-8 bits 2-12%
    # slower (docs/RESULTS.md "`router=block` at the paper protocol; `pdl` for static views of at most 4 planes"); the
    # routed 3.5 / 4.5 / 5.5-bit budgets (router=block) 7.2 / 14.7 / 7.9 us faster with it on the linears' launches,
    # 8-14% slower with it on the routers' too (docs/RESULTS.md "Routed budgets with the static views' savings").
    pdl: bool | str | None = None
    # one-bit plane kernel, the launches on the stream-K grid (whole-K ones load everything at once anyway): each
    # program first asks L2 for every line of words and step/zero words of its whole range of groups
    # (prefetch.global.L2), so they stream from memory at once while the group loop, one group at a time, finds them
    # in L2 (bytes in flight without shared memory). Off: on an H200 0.82-0.93x alone for the 8B gate/up, down and q/o
    # (k/v unchanged), 0.87-0.91x for the 8B-shaped stack's static views with pdl (docs/RESULTS.md).
    l2_prefetch: bool = False
    # one-bit plane kernel, stream-K without prefetch: at each group, ask L2 for the lines of the group ``ahead`` groups
    # later in the same row block (one request a line, a few a thread), so the next groups stream while this one
    # decodes; 0: none. Off: on an H200 0.88-1.01x per 8B gate/up and down launch at 1, 2 and 4 groups ahead (the
    # decode, not the stream, bounds these launches: docs/RESULTS.md "Weight reads against the decode").
    ahead: int = 0
    # one-bit plane kernel, one layer on the stream-K grid (no router in the launch): the row blocks that several
    # programs share are summed by a second small launch in a fixed order (the same sums, bit for bit) instead of by
    # the last of their programs to arrive, which waits on a ticket (an atomic round trip) and then on the slots. On
    # an H200 1.03-1.13x per 8B gate/up and down launch, 1.02-1.04x on the 8B-shaped stack (docs/RESULTS.md "Weight
    # reads against the decode"); site launches (several layers) keep the tickets.
    reduce_launch: bool = True
    # one token, fp16, on a GPU with mma.sync: the fragment-native Gluon kernel (``gluon_fragment``: two codes decoded
    # per LOP3 into the tensor cores' A fragment) instead of the one-bit plane kernel, for layouts of groups of 128 and
    # inputs a multiple of 1024, static views, views read on the device and routed ones counted before the launch (no
    # router in the launch); a site launch takes it for one static view of layers whose rows are whole 128-row blocks.
    # True: wherever it serves; False: never; None (default): as measured on the 8B-shaped stack on an H200, static
    # views of 7-8 planes in every launch (1.13x fp16 against 1.01x at 8 bits) and of up to 4 planes in the launches
    # of at least ``fragment_static_from`` weights (all, by default; 2.03x against 1.86x at 3 bits, 1.82x against
    # 1.75x at 4 on the large launches), of 5-6
    # planes in the launches ``fragment_cap`` names (capped), not views read or counted on the device (routed budgets
    # 4-8: even to 0.91x; docs/RESULTS.md "The fragment-native Gluon GEMV on the H200").
    fragment: bool | None = None
    # with fragment None: views read or counted on the device (routed budgets) also take the fragment kernel in
    # launches of at least this many weights (rows x inputs; 2^25 covers the 8B gate/up and down, not the q/o); None:
    # never (the stack with 2^25: routed budget 3 1.45x fp16 against 1.34x, budget 4 1.20x against 1.21x, budgets 5-8
    # 0.91-0.96x of the one-bit plane kernel's)
    fragment_device_from: int | None = None
    # with fragment None: the rule's static views of up to 4 planes take the fragment kernel only in launches of at
    # least this many weights (0, the default: every launch). Measured on the 8B-shaped stack launched as the package
    # launches it (one launch a site) on an H100 (2026-12-06, docs/RESULTS.md "Spans, placements and the small
    # launches on an H100"): 0 took the static 3 / 4-bit views from 250.7 / 283.6 us a token to 239.3 / 269.0 (2.63x
    # -> 2.77x fp16 at 4 bits), the q/k/v site and o launch then on the fragment kernel; 2^25, the earlier default,
    # had been faster per linear on an H200 (4-bit stack 314.8 us against 328.8, the q/o and k/v launched alone)
    fragment_static_from: int = 0
    # static views of at least this many planes in launches of at least 2^25 weights: the fragment kernel (with
    # fragment None, 5-6 planes too) capped at 128 registers, one group prefetched at most; 0: none. Measured on the
    # 8B-shaped stack on an H200 (docs/RESULTS.md "The fragment-native Gluon GEMV on the H200"): static 5 / 6 / 7 / 8
    # bits 387.5 / 415.6 / 441.2 / 470.7 us a token with 5 against 413.9 / 453.6 / 486.4 / 510.0 with 0 (1.48x against
    # 1.38x fp16 at 5 bits, 1.22x against 1.12x at 8); 7 gains the same at 7-8 bits only; 3-4 planes unchanged
    fragment_cap: int = 5
    # static views on the fragment kernel: a program's words come by TMA into shared memory instead of registers,
    # where a K split leaves a power of 2 of groups a program within shared memory (gluon_fragment.tma_config): -1, one
    # load a plane waited for at once; -2, a load and a barrier a group, each group's decode under the later groups'
    # stream; 0 (default): registers. Measured on an H200 (docs/RESULTS.md "TMA loads for the fragment kernel"): both
    # modes slower than registers, the 8B stack's static views by 9-19%.
    fragment_tma: int = 0
    # a packed layer's CUDA forward of 2 to this many tokens (at most 16; under a graph capture only a static view
    # whose packs were built before, ``MoBiLinear._int4_serves``) multiplies through torch's int4 matmul
    # (``aten._weight_int4pack_mm``, bf16; ``mobiquant.kernels.int4``: one matmul a view of <= 4 bits, two above)
    # instead of this module's kernels; 0: off. Default 16 (``int4.CUDA_TOKENS``), as
    # measured on an H100 (docs/RESULTS.md "Prompts, the stack and SmolLM2 on an H100"): at 2-16 tokens the op took
    # 0.16-0.75x the time of the package's own path (dequantize-then-cuBLAS) on the 8B and SmolLM2 shapes at the 3-
    # and 4-bit views, and SmolLM2's 6-token prefill at the static 4-bit view went from 107.7 to 55.7 ms. Its packs
    # are built on a view's first use and kept (0.5 bytes a weight a pack; views of 5-8 bits add a second one).
    int4_tokens: int = int4.CUDA_TOKENS
    # one-bit plane kernel, a whole-K launch that learns its view on the device (no router in the launch): the planes
    # every compiled body reads are loaded before ``k`` is read, so the two reads overlap (otherwise every program
    # waits a memory round trip for ``k`` before its first weight load; with ``pdl`` they are loaded so anyway).
    # Off until timed on a GPU: the 8B-shaped stack's views with ``k`` read on the device took 1.07-1.16x the static
    # views' time on an H100 (2026-12-05, docs/RESULTS.md "Prompts, the stack and SmolLM2 on an H100")
    preload: bool = False
    # one token, a packed layer whose tokens choose between two adjacent views ``j`` and ``j + 1`` (the adjacent
    # policy, ``MoBiLinear.pair_k``): its one-bit plane launch compiles only those two views' bodies (``span``),
    # not one per view of the layout; a captured step then depends on each linear's pair (``BudgetControl.structure``).
    # On (the default since 2026-12-06) with the span rule of then (``fragment_span_planes`` 5 in the launches from
    # 2^25 weights, no site launch): measured on an H100 on the 8B-shaped model
    # patched by the package (sublayer routers, fused inputs, compiled step; docs/RESULTS.md "The fragment kernel's
    # programmatic dependent launch, and spans in the package"): routed budgets 3.5 / 4.5 499.9 / 553.2 us a token
    # against 529.0 / 567.4 without spans; at 5.5, with a 5-6 plane span on the fragment kernel, 620.8 against 601.1
    span_bodies: bool = True
    # a view learnt on the device within a span (``span_bodies``) whose larger view has at most this many planes, in a
    # launch of at least ``fragment_span_from`` weights: the fragment kernel, the span's bodies alone; 0: none (the
    # one-bit plane kernel). Default 6 with ``fragment_span_from`` 0 and ``fragment_site_spans`` on (since 2026-12-06,
    # later): measured on an H100 on the 8B-shaped model patched by the package (sublayer routers, fused inputs,
    # compiled step; docs/RESULTS.md "Routed sites on the fragment kernel"), every span on the fragment kernel took
    # the routed 3.5 / 4.5 / 5.5-bit budgets to 430.4 / 491.3 / 580.9 us a token against 502.3 / 551.1 / 604.5 with
    # the rule before (3-4 and 4-5 plane spans of the launches from 2^25 weights, gate/up's site on the one-bit plane
    # kernel): 14.3 / 10.8 / 3.9% faster. Spans reaching 7-8 planes were not measured and stay on the one-bit plane
    # kernel
    fragment_span_planes: int = 6
    # the launches whose spans ``fragment_span_planes`` moves: those of at least this many weights (2^25,
    # :data:`BIG_FRAGMENT_LAUNCH`, the rule before: the 8B gate/up and down, not q/k/v or o); 0 (default): all
    fragment_span_from: int = 0
    # ``fragment_span_planes`` for site launches too (q/k/v, gate/up: one router's gate values, a threshold a layer,
    # counted by the fragment kernel per row block; or one ``k`` tensor for all), the size rule on the whole site. On
    # (see ``fragment_span_planes``); off: those launches' views on the device run on the one-bit plane kernel
    fragment_site_spans: bool = True
    # a view learnt on the device within a span reaching at least this many planes runs on the fragment kernel without
    # the 128-register cap of the launches from 2^25 weights; 0 (default): capped. Counted offline for sm_90
    # (benchmarks/NOTES.md entry 30): capped, the 8B gate/up site's and down's 4-5 and 5-6 plane spans spill 16-48
    # bytes of stack; uncapped they take 135-148 registers and none. Measured slower on an H100 (docs/RESULTS.md
    # "What a view on the device still costs"): 5 took the routed 4.5 / 5.5-bit budgets from 495.9 / 584.2 us a
    # token to 558.2 / 645.3 (fewer programs an SM cost more than the spill), so it stays 0
    fragment_span_uncap: int = 0
    # a view learnt on the device on the fragment kernel: the program's first this many groups of the planes every
    # compiled body reads (the span's smaller view's) asked of L2 before the view is read or counted, so the first
    # weight loads wait on L2 rather than memory (the static views' loads need no read before them); 0: off. Default
    # 1 since 2026-12-06 (fourth run): measured on an H100 on the 8B-shaped model patched by the package (sublayer
    # routers, fused inputs, compiled step; docs/RESULTS.md "What a view on the device still costs") the routed 3.5 /
    # 4.5 / 5.5-bit budgets took 434.0 / 485.2 / 585.6 us a token against 445.7 / 495.9 / 584.2 without (2.6 / 2.2%
    # faster, level at 5.5); 2 groups with ``pdl`` 434.1 / 489.6 / 581.5
    fragment_early_l2: int = 1
    # the fragment kernel, words through registers: at each group a program asks L2 for the planes of the group this
    # many later, so the later groups stream while this one decodes, no register held for them (views compiled in
    # and the bodies of a view on the device; 0: none). The static views of 5-6 planes, prefetching one group at most
    # under the 128-register cap, cost 2x the bandwidth's share of their planes on an H100 (docs/RESULTS.md "What a
    # view on the device still costs"). Off until timed on a GPU (benchmarks/NOTES.md entry 32)
    fragment_ahead: int = 0
    # the fragment kernel: groups whose words a program loads into registers before the decode of the one before
    # (0, 1 or 2; a capped static view at most 1); None (default): ``gluon_fragment.launch_config``'s (1 for views
    # of at most 4 planes and views on the device, 2 for 5-6, 0 above, as measured on an H200). Off until timed
    fragment_prefetch: int | None = None
    # the routers' fused launches (norm or gated product, router, ``k``): each program asks L2 for its share of the
    # router's weights before it reads the inputs, so their memory latency runs under the inputs' reads and the RMS
    # scale (with ``pdl`` they are asked for so anyway, before the wait). On an H100 a router launch took 6.3 us
    # against a plain norm's 1.8 (docs/RESULTS.md "What a view on the device still costs"). Off until timed
    router_early_l2: bool = False
    # A one-token router launch without its tail (benchmarks/NOTES.md entry 33): its programs store their column
    # split's pre-activations and the launch ends (no ticket, no last program summing them); each routed GEMV on the
    # fragment kernel finishes the router itself in every program (its prologue: the partials, b1, GELU, W2, the
    # policy) before it counts k; a reader elsewhere (the one-bit plane kernel, PyTorch) finishes it with a few torch
    # operations. For routers over inputs wider than the router's column range (triton_router.SPLIT_COLS_ONE_TOKEN).
    # Off until timed
    router_partials: bool = False
    # The launch before a block's input norm (the previous block's down launch, on the fragment kernel) also finishes
    # the router that decides on that norm's output (kernels.epilogue.RouterTail: each row block's share of its first
    # layer, the last block scaling their sum by the norm's rsqrt and finishing it into gate values), where the norm
    # and that router would otherwise be one launch of their own (a fused input norm routing q/k/v: router=block, or a
    # site's router); q/k/v then read the norm's parts (rms_scale) and the gate values: no router launch in any block
    # but the first (benchmarks/NOTES.md entries 48, 50). Off: measured on an H100 (docs/RESULTS.md "The router tail
    # and the savings under `site`", NOTES entry 52) the routed 3.5 / 4.5 / 5.5-bit budgets took 362.3 / 449.2 / 556.2
    # us a token against 356.7 / 419.1 / 514.0 without it (the static views level). "normed": the tail's last program
    # also scales the row into the normed row (one more pass over it, in place), so q/k/v read it as they read the
    # router launch's by default, with no rms_scale in their launch (NOTES entry 52; not yet timed)
    router_tail: bool | str = False
    # The lean step's prologues (an RMS norm or gated product made in the launch that reads it) on the fragment
    # kernel too. Off: measured on an H100 (docs/RESULTS.md "Norms and gated products in the launches they feed") the
    # 8B static 4-bit step took 452.1 us with them against 361.1 without (its registers 100-115 -> 136-168 a thread,
    # its instructions 1.6-3x); the one-bit plane kernel's whole-K programs keep theirs (SmolLM2's static 4-bit step
    # 890.1 -> 789.2 us)
    fragment_prologues: bool = False
    # The widest input whose one-bit plane launches make their own prologue (takes_prologue): measured faster on
    # SmolLM2's 576-wide rows (its static 4-bit step 11% shorter), slower on the 8B-shaped q/k/v launch's 4096-wide
    # rows at 5-6 planes (the static 5 / 6-bit lean steps 4-7 us longer, two runs on an H100, docs/RESULTS.md "Norms
    # and products made by the launch before"); wider launches keep their norm launch (0: none)
    prologue_max_in: int = 2048
    # What a fragment launch makes of its outputs for the next launch, so that no launch of its own makes it
    # (kernels.epilogue, benchmarks/NOTES.md entry 40): the o launch the post-attention RMS norm's parts (its outputs
    # times the norm's weight, each row block's sum of squares; the gate/up launch scales its outputs), the gate/up
    # site launch the gated product, the down launch the next layer's input norm's parts. None (the default): static
    # views of at most 4 or at least 7 planes, as measured on an H100 (docs/RESULTS.md "Norms and products made by
    # the launch before"): the 8B static 3 / 4 / 7 / 8-bit lean steps 2-4% faster, 5 bits 1.4-1.8% slower and 6 bits
    # level (where only the product is made so, in the register-capped gate/up launch); True: every static view;
    # False: none; "rms_norm" or "silu_mul": that kind alone, at every static view (to time each kind apart)
    fragment_epilogues: bool | str | None = None
    # The same for views read on the device (a routed budget's launches on the fragment kernel, no router in the
    # launch): the o launch makes the post-attention norm's parts where gate/up borrow their decisions from another
    # input's router (router=block), the gate/up site launch the gated product. On (the default since 2026-12-07): on
    # an H100 the 8B-shaped lean step's routed 3.5 / 4.5 / 5.5-bit budgets (router=block) 7.0 / 5.0 / 4.7 us faster,
    # with the default pdl rule 19 / 27 / 15 us in one run, 4 / 10 / 2 us in a second (docs/RESULTS.md "Routed budgets
    # with the static views' savings"; benchmarks/NOTES.md entry 49).
    fragment_routed_epilogues: bool = True
    # fragment kernel: the programs a launch's grid aims at (row blocks x K splits; 0: TARGET_PROGRAMS of
    # gluon_fragment, 448, about 3.4 an SM on 132). The single 8B layers measured fastest there, but the gate/up site
    # launch (28672 rows) then runs 2 splits of 16 groups a program where the 14336-row layer ran its best at 4 splits
    # of 8; 896 gives the site that shape again, in two waves (benchmarks/NOTES.md entry 46). Not timed in the package.
    fragment_programs: int = 0
    # The next inputs the fragment launches make (fragment_epilogues) chained into the launches reading them, within
    # a layer: the gate/up launch's gated product into the down launch (a flag a group of 128 products, set as each
    # is stored) and the o launch's post-attention norm parts into the gate/up launch (a count of the row blocks
    # made). The reading launch of a static view, started early by pdl, waits for what it reads instead of the whole
    # launch before (griddepcontrol.wait), and its last program resets the flags (benchmarks/NOTES.md entry 60, the
    # first stage of entry 58's persistent layer). "silu_mul" or "rms_norm": that kind alone. Off until timed.
    fragment_chain: bool | str = False

    def __post_init__(self) -> None:
        if self.fragment_tma not in (0, -1, -2):
            raise ValueError(
                f"fragment_tma must be 0 (words through registers), -1 (a TMA load a plane) or -2 (a TMA load and a "
                f"barrier a group), got {self.fragment_tma!r}"
            )
        for name in ("fragment_span_planes", "fragment_span_from", "fragment_span_uncap", "fragment_early_l2",
                     "fragment_ahead", "prologue_max_in", "fragment_programs"):  # fmt: skip
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 0:
                raise ValueError(f"{name} must be an int >= 0 (0: off), got {getattr(self, name)!r}")
        if self.fragment_prefetch not in (None, 0, 1, 2):
            raise ValueError(
                f"fragment_prefetch must be None (the launch's own), 0, 1 or 2 groups, got {self.fragment_prefetch!r}"
            )
        if self.fragment_epilogues not in (None, False, True, "rms_norm", "silu_mul"):
            raise ValueError(
                "fragment_epilogues must be None (the measured rule), True, False, 'rms_norm' or 'silu_mul' (that "
                f"kind alone), got {self.fragment_epilogues!r}"
            )
        if self.pdl not in (None, False, True, "static", "views"):
            raise ValueError(
                f"pdl must be None (the measured rule: static views of at most {PDL_MAX_PLANES} planes, views on the "
                f"device without a router), False, True, "
                f"'static' (static views' launches only) or 'views' (every linear's launch, no router's), "
                f"got {self.pdl!r}"
            )
        if self.fragment_chain not in (False, True, "silu_mul", "rms_norm"):
            raise ValueError(
                "fragment_chain must be False, True (every next input made in a layer chained into its reader), "
                f"'silu_mul' or 'rms_norm' (that kind alone), got {self.fragment_chain!r}"
            )
        if self.router_tail not in (False, True, "normed"):
            raise ValueError(
                "router_tail must be False, True (the norm's parts and the router's values made by the launch before) "
                f"or 'normed' (the normed row made there too), got {self.router_tail!r}"
            )
        if not 0 <= self.int4_tokens <= 16 or self.int4_tokens == 1:
            raise ValueError(
                f"int4_tokens must be 0 (off) or 2-16 (the most tokens a forward), got {self.int4_tokens!r}"
            )


_DEFAULT_SMALL = SmallConfig()


def small_config_or_default(config: SmallConfig | None) -> SmallConfig:
    """``config``, or the defaults where none is set (one shared, frozen instance)."""
    return config or _DEFAULT_SMALL


@dataclass(frozen=True)
class TileConfig:
    block_m: int = 128
    block_n: int = 128
    block_k: int = 64
    group_m: int = 8
    num_warps: int = 8
    num_stages: int = 3


def _pow2_divisor(n: int, cap: int) -> int:
    p = 1
    while p * 2 <= cap and n % (p * 2) == 0:
        p *= 2
    return p


def _is_pow2(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


def _shifts(slice_bits: Sequence[int]) -> list[int]:
    """``B_e`` (0-based plane e): bits of planes 1..e, i.e. the shift of plane e's step below the base."""
    out, acc = [], 0
    for e, b in enumerate(slice_bits):
        if e > 0:
            acc += b
        out.append(acc)
    return out


def _num_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 8


_LOCKS: dict[tuple, torch.Tensor] = {}


def _locks(device: torch.device, n: int, pool: str = "split") -> torch.Tensor:
    """At least ``n`` int32 counters on ``device``, zero between launches (each kernel resets what it uses); one
    buffer per ``pool`` (the split-K tickets, the in-launch router's counters), so users of two pools never share."""
    key = (pool, device.type, device.index)
    buf = _LOCKS.get(key)
    if buf is None or buf.numel() < n:
        buf = torch.zeros(max(n, 1024), dtype=torch.int32, device=device)
        _LOCKS[key] = buf
    return buf


def _plane_args(planes: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    ps = [p if p.is_contiguous() else p.contiguous() for p in planes]
    return ps + [ps[0]] * (MAX_SLICES - len(ps))


def _bits_args(slice_bits: Sequence[int]) -> list[int]:
    return list(slice_bits) + [1] * (MAX_SLICES - len(slice_bits))


def _small_block_k(group_size: int, use_dot: bool, block_k: int | None) -> int:
    if block_k is not None:
        return block_k
    if use_dot:
        return _pow2_divisor(group_size, 128)
    return 256 if _is_pow2(group_size) and group_size <= 256 else _pow2_divisor(group_size, 256)


#: One-token rows per program of the field kernel by the largest k (registers: 16 words per plane and
#: thread at 4 warps and 512 columns; see benchmarks/NOTES.md, version 6).
_FIELDS_BLOCK_N = (64, 64, 32, 32)
#: Rows per program when ``k`` is read on the device (one body per k; 64 beat 32 on the routed H200 decode
#: stack at budgets 2, 4 and 6: 486.6 / 589.6 / 696.7 against 549.4 / 640.1 / 733.5 us per token).
_FIELDS_BRANCH_BLOCK_N = 64


#: ``SmallConfig(fields=None)`` takes the field kernel for one token when at most this many planes are read:
#: on an H200 it beat the default one-token kernel at k = 1-3 and lost at k = 4 (benchmarks/NOTES.md, version 6).
FIELDS_MAX_K = 3


def _fields_ok(slice_bits: Sequence[int], kmax: int) -> bool:
    """The field kernel covers up to four planes ``1..kmax`` of one width ``b`` (power-of-two codes per
    word, at least two) whose concatenated code fits under bit 23 of a half word: ``15 + (kmax-1) b <= 22``."""
    b = slice_bits[0]
    return (
        kmax <= 4 and all(bb == b for bb in slice_bits[:kmax]) and b <= 16 and _is_pow2(32 // b) and (kmax - 1) * b <= 7
    )


def _want_fields(cfg: SmallConfig, slice_bits: Sequence[int], kmax: int, device_k: bool = False) -> bool:
    """One-token kernel choice: the field kernel when the layout allows it and ``cfg.fields`` asks for it
    (``None``: when at most ``FIELDS_MAX_K`` planes are read, or when ``k`` is read on the device, where the
    field kernel branches into a body per k; benchmarks/NOTES.md, versions 7 and 9)."""
    want = cfg.fields if cfg.fields is not None else (kmax <= FIELDS_MAX_K or device_k)
    return bool(want) and _fields_ok(slice_bits, kmax)


def _fields_block_k(group_size: int, bk: int) -> int:
    """512 columns per chunk (32 words of 2-bit codes per row and plane: eight 16-byte loads per row)
    when the group is a power of two that divides or holds it; else the CUDA-core default."""
    if _is_pow2(group_size):
        return 512
    return bk


def small_supported(
    slice_bits: Sequence[int], group_size: int, block_k: int | None = None, use_dot: bool = True
) -> bool:
    """Layouts the small-batch kernels cover: chunks that lie in one group (tensor cores) or hold whole power-of-two
    groups (one token), of whole words where a plane has a power-of-two number of codes per word. On tensor cores a
    plane of another width (the default layout's 3-bit base: 10 codes a word) gathers each column's word
    (:func:`_load_words`); the one-token kernels take power-of-two widths only."""
    pers = [32 // b for b in slice_bits]
    whole = [p for p in pers if _is_pow2(p)]
    if len(whole) < len(pers) and not use_dot:
        return False
    bk = _small_block_k(group_size, use_dot, block_k)
    if not _is_pow2(bk) or (whole and bk % max(whole) != 0):
        return False
    if use_dot:
        return bk >= 16 and group_size % bk == 0
    return group_size % bk == 0 or (_is_pow2(group_size) and bk % group_size == 0)


def _host_k_range(k_t: torch.Tensor) -> tuple[int, int] | None:
    """``(min, max)`` of a per-token ``k`` that lives on the host (free to read), else None: the kernels
    then compile for every plane and read ``k`` on the device."""
    if k_t.device.type != "cpu":
        return None
    return int(k_t.min()), int(k_t.max())


def _host_routed_k(rk: RoutedK) -> int | None:
    """The one token's ``k`` of a :class:`RoutedK` whose values live on the host (free to count), else None: the
    kernel then counts on the device."""
    if isinstance(rk.values, RouterPartials) or rk.values.device.type != "cpu" or rk.tau.device.type != "cpu":
        return None
    return int(rk.counts().reshape(()))


def _per_view(scale: torch.Tensor, zero: torch.Tensor, num_slices: int) -> bool:
    """Whether ``scale`` / ``zero`` hold a pair per view (``[num_slices, out, groups]``) rather than one shared pair
    (``[out, groups]``); any other shape is an error."""
    if scale.dim() == 2 and zero.dim() == 2 and zero.shape == scale.shape:
        return False
    if scale.dim() == 3 and zero.shape == scale.shape and scale.shape[0] == num_slices:
        return True
    raise ValueError(
        f"scale/zero must be [out, groups] or [{num_slices}, out, groups] (one pair per view, one view per slice), "
        f"both of one shape; got {tuple(scale.shape)} and {tuple(zero.shape)}"
    )


def _view_pair(scale: torch.Tensor, zero: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``[out, groups]`` pair view ``k`` reads: the shared one, or view ``k``'s own (host slicing, for a ``k``
    known at launch)."""
    if scale.dim() == 3:
        return scale[k - 1], zero[k - 1]
    return scale, zero


def _check_k(k, num_slices: int):
    if isinstance(k, int):
        if not 1 <= k <= num_slices:
            raise ValueError(f"k must be between 1 and {num_slices}, got {k}")


def _small_consts(slice_bits: Sequence[int], magic: bool) -> tuple[list[float], list[float]]:
    """Per-plane activation factor ``A_e`` and group-constant coefficient ``C_e`` (module docstring)."""
    A, C = [], []
    for e, (b, sh) in enumerate(zip(slice_bits, _shifts(slice_bits), strict=True)):
        half = (2**b - 1) / 2 if e > 0 else 0.0
        if magic:  # f = 1 + q / 2^b, so q = 2^b (f - 1)
            A.append(2.0 ** (b - sh))
            C.append(2.0 ** (b - sh) + half * 2.0**-sh)
        else:
            A.append(2.0**-sh)
            C.append(half * 2.0**-sh)
    pad = [0.0] * (MAX_SLICES - len(slice_bits))
    return A + pad, C + pad


def bitplane_linear_small(
    x2: torch.Tensor,
    planes: Sequence[torch.Tensor],
    scale: torch.Tensor,
    zero: torch.Tensor,
    slice_bits: Sequence[int],
    group_size: int,
    k,
    bias: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
    config: SmallConfig | None = None,
) -> torch.Tensor:
    """``x2`` ``[M <= 16, in]`` -> ``[M, out]``: every plane read once per tile, up to the largest ``k``.

    ``scale`` / ``zero``: one pair ``[out, groups]`` or a pair per view ``[len(slice_bits), out, groups]`` (an int
    ``k`` reads view ``k``'s, sliced here; a per-token ``k`` makes every token read its own view's in the kernel)."""
    cfg = config or SmallConfig()
    M, K_IN = x2.shape
    N = scale.shape[-2]
    NS = len(slice_bits)
    per_view = _per_view(scale, zero, NS)
    scale, zero = scale.contiguous(), zero.contiguous()
    if per_view and isinstance(k, int):
        _check_k(k, NS)
        scale, zero = _view_pair(scale, zero, k)
        per_view = False
    if M > 16:
        raise ValueError(f"the small-batch kernels take at most 16 tokens, got {M}")
    use_dot = cfg.use_dot if cfg.use_dot is not None else M > 1
    if M > 1 and not use_dot:
        raise ValueError("the CUDA-core kernel takes one token; use tensor cores (use_dot) for more")
    bk = _small_block_k(group_size, use_dot, cfg.block_k)
    if not small_supported(slice_bits, group_size, bk, use_dot):
        raise ValueError(f"slice bits {list(slice_bits)} / group {group_size} / block_k {bk} not supported")
    dt = _DT_CODES[x2.dtype]
    if dt == 1 and _interpreting():
        dt = 2  # the interpreter's bf16 dot is wrong; bf16 operands are exact in fp32 anyway
    magic = cfg.magic and not (dt == 1 and use_dot and max(slice_bits) > 7)
    A, C = _small_consts(slice_bits, magic)
    if isinstance(k, int):
        _check_k(k, NS)
        per_token, kmax_c, k_t, k_u, rng = False, k, x2, k, None
    else:
        k_t = k.reshape(-1)
        if k_t.dtype not in (torch.int32, torch.int64) or k_t.device != x2.device:
            k_t = k_t.to(device=x2.device, dtype=torch.int32)
        k_t = k_t.contiguous()
        if k_t.numel() != M:
            raise ValueError(f"k has {k_t.numel()} entries for {M} tokens")
        per_token, kmax_c, k_u = True, NS, 0
        rng = _host_k_range(k_t) if M else None
        if rng is not None:
            lo, hi = rng
            if lo < 1 or hi > NS:
                raise ValueError(f"per-token k must be in [1, {NS}], got [{lo}, {hi}]")
            kmax_c = hi
            if per_view and lo == hi:  # one view for every token, known here: its own pair
                scale, zero = _view_pair(scale, zero, lo)
                per_view = False
    device_k = per_token and rng is None
    fields = not use_dot and _want_fields(cfg, slice_bits, kmax_c, device_k)
    branch_k = fields and per_token and kmax_c == 4
    if fields:
        if cfg.block_k is None:
            bk = _fields_block_k(group_size, bk)
        block_n = cfg.block_n or (_FIELDS_BRANCH_BLOCK_N if branch_k else _FIELDS_BLOCK_N[min(kmax_c, 4) - 1])
    else:
        block_n = cfg.block_n or (64 if use_dot else 32)
    n_tiles = triton.cdiv(N, block_n)
    n_chunks = triton.cdiv(K_IN, bk)
    split = cfg.split_k
    if split is None:
        target = 4 * _num_sms(x2.device)
        split = 1
        while n_tiles * split < target and split * 2 <= n_chunks and split < 32:
            split *= 2
    split = max(1, min(split, n_chunks))
    cps = triton.cdiv(n_chunks, split)
    split = triton.cdiv(n_chunks, cps)
    block_m = max(16, triton.next_power_of_2(M)) if use_dot else 1
    if out is None:
        out = torch.empty(M, N, dtype=x2.dtype, device=x2.device)
    if split > 1:
        part = torch.empty(split * block_m, N, dtype=torch.float32, device=x2.device)
        locks = _locks(x2.device, n_tiles)
    else:
        part = locks = out
    common = dict(
        GROUP=group_size,
        NS=NS,
        KMAX=kmax_c,
        PER_TOKEN=per_token,
        HAS_BIAS=bias is not None,
        SPLIT_K=split,
        BLOCK_N=block_n,
        BLOCK_K=bk,
        EVEN_K=K_IN % bk == 0,
        num_warps=cfg.num_warps,
        num_stages=cfg.num_stages,
    )
    bits_kw = {f"B{i}": b for i, b in enumerate(_bits_args(slice_bits))}
    H = [(1.0 - 2.0**-sh) / 2 for sh in _shifts(slice_bits)] + [0.0] * (MAX_SLICES - NS)
    ps = _plane_args(planes)
    head = (x2, out, part, locks, bias if bias is not None else out, k_t, scale, zero, *ps, *[p.stride(0) for p in ps])
    if use_dot:
        top = {0: 10, 1: 7, 2: 23}[dt]
        combined = cfg.combine and magic and not per_token and sum(slice_bits[:kmax_c]) <= top
        _bp_small_kernel[(n_tiles, split)](
            *head,
            *A,
            *C,
            *H,
            M,
            N,
            K_IN,
            scale.shape[-1],
            k_u,
            x2.stride(0),
            out.stride(0),
            cps,
            BLOCK_M=block_m,
            DT=dt,
            COMBINED=combined,
            MAGIC=magic,
            PER_VIEW=per_view,
            **common,
            **bits_kw,
        )
        return out
    gpc = 1 if group_size % bk == 0 else bk // group_size
    if fields:
        b = slice_bits[0]
        _bp_gemv_fields_kernel[(n_tiles, split)](
            *head[:8],
            *ps[:4],
            *head[16:20],
            *H,
            2.0 ** (_FIELD_S - (kmax_c - 1) * b),
            N,
            K_IN,
            scale.shape[-1],
            k_u,
            cps,
            GPC=gpc,
            B=b,
            XE=276 - _FIELD_S,
            BRANCH_K=branch_k,
            PER_VIEW=per_view,
            **common,
        )
    else:
        _bp_gemv_kernel[(n_tiles, split)](
            *head,
            *H,
            N,
            K_IN,
            scale.shape[-1],
            k_u,
            cps,
            GPC=gpc,
            PER_VIEW=per_view,
            **common,
            **bits_kw,
        )
    return out


# ----------------------------------------------------------------------------- one-bit plane buffers
class RoutedK(NamedTuple):
    """Per-token slice counts held as a router's gate values and a threshold: ``k = 1 + #{e : values[..., e] >
    tau}``, compared in the values' dtype as torch compares a tensor with a 0-dim one. Passed as ``k``, the one-bit
    plane kernel counts them itself (a routed linear then costs no launch besides its GEMV, and a captured graph
    reads the threshold tensor that a budget change writes); every other path counts with :meth:`counts`."""

    # [..., K - 1] gate values of the tokens, non-increasing along the last axis; or one token's router launch
    # without its tail (SmallConfig.router_partials), which the fragment kernel finishes itself (elsewhere: made())
    values: torch.Tensor | RouterPartials
    tau: torch.Tensor  # one element: the threshold
    # the router itself (InLaunchRouter): the one-bit plane launch computes the values into ``values`` first
    router: InLaunchRouter | None = None

    def gate_values(self) -> torch.Tensor:
        """The gate values (finished here, by a few torch operations, from router partials)."""
        v = self.values
        return v.values() if isinstance(v, RouterPartials) else v

    def counts(self) -> torch.Tensor:
        """``k`` per token (int64, the values' shape less the last axis)."""
        if self.router is not None:
            raise RuntimeError("this RoutedK's gate values are computed by the one-bit plane launch, not before it")
        return 1 + (self.gate_values() > self.tau.reshape(())).sum(-1)


class InLaunchRouter(NamedTuple):
    """A token router (``mobiquant.nn.router.TokenRouter``: ``W2 gelu(W1 x + b1) + b2``, then its policy) that the
    one-bit plane launch runs in its first programs (one hidden unit each, the fused router kernel's arithmetic),
    writing the gate values of :class:`RoutedK` ``values``: a routed one-token linear or site then takes one
    launch in all."""

    w1: torch.Tensor  # [H, in]
    b1: torch.Tensor  # [H]
    w2: torch.Tensor  # [K - 1, H]
    b2: torch.Tensor  # [K - 1]
    adjacent: bool  # policy 'adjacent' (else 'free')


@dataclass(frozen=True)
class BitPlanes:
    """Kernel buffers of one layer for ``_bp_gemv_bits_kernel``, built from the checkpoint's planes by
    :func:`pack_bitplanes` (the checkpoint keeps its format).

    ``words`` int32 ``[T, KW, NPAD / 2]``: one-bit plane ``t`` (``T = sum(slice_bits)``, each slice's bits most
    significant first), word column ``w``, row pair ``i``: bit ``b`` of the word is column ``16 w + b`` of row
    ``2 i`` (``b < 16``) or column ``16 w + b - 16`` of row ``2 i + 1``. ``KW`` covers whole groups and ``NPAD``
    rounds the rows up to a multiple of 128; the padding holds zeros. ``sz`` int32 ``[2, groups, NPAD / 2]``: the
    fp16 step (low half) and zero point (high half) of row ``2 i`` (``sz[0]``) and ``2 i + 1`` (``sz[1]``); with a
    pair per view, ``[len(slice_bits), 2, groups, NPAD / 2]``, one such set per view (``sz[k - 1]`` for view ``k``)."""

    words: torch.Tensor
    sz: torch.Tensor
    slice_bits: tuple[int, ...]
    group_size: int
    in_features: int
    out_features: int

    @property
    def per_view(self) -> bool:
        """Whether ``sz`` holds a step and zero point set per view (built from ``[K, out, groups]`` pairs)."""
        return self.sz.dim() == 4

    @property
    def planes_of_view(self) -> list[int]:
        """``P_k``: the one-bit planes view ``k`` (1-based) reads, for ``k = 1 .. len(slice_bits)``."""
        return planes_of_views(self.slice_bits)


def planes_of_views(slice_bits: Sequence[int]) -> list[int]:
    """The planes each view reads: the running sums of ``slice_bits``."""
    return list(itertools.accumulate(slice_bits))


BITS_MAX_PLANES = 8
_BITS_ROW_PAD = 128


def bits_supported(slice_bits: Sequence[int], group_size: int) -> bool:
    """Layouts the one-bit plane kernel covers: at most 8 bits in all (views up to 8-bit codes) and groups of
    whole 16-column words."""
    return 1 <= sum(slice_bits) <= BITS_MAX_PLANES and group_size % 16 == 0


def wants_bitplanes(slice_bits: Sequence[int], group_size: int, config: SmallConfig | None = None) -> bool:
    """Whether one token of this layout runs in the one-bit plane kernel: ``config.bitplanes`` True (where
    :func:`bits_supported`), False (never), or None / no config: where the small-batch kernels have no one-token
    path for the layout (they would fall to the tile kernel, which also reads ``k`` on the host)."""
    choice = None if config is None else config.bitplanes
    if choice is False or not bits_supported(slice_bits, group_size):
        return False
    return choice is True or not small_supported(slice_bits, group_size, None, False)


def _unpack_plane(plane: torch.Tensor, bits: int, cols: int) -> torch.Tensor:
    """Codes ``[rows, cols]`` (int32) of a plane packed ``32 // bits`` per int32 word, first code lowest."""
    per = 32 // bits
    shifts = torch.arange(per, dtype=torch.int32, device=plane.device) * bits
    codes = (plane.to(torch.int32).unsqueeze(-1) >> shifts) & ((1 << bits) - 1)
    return codes.reshape(plane.shape[0], -1)[:, :cols]


def pack_bitplanes(
    planes: Sequence[torch.Tensor],
    scale: torch.Tensor,
    zero: torch.Tensor,
    slice_bits: Sequence[int],
    group_size: int,
    in_features: int,
    row_block: int = 4096,
) -> BitPlanes:
    """The one-bit plane buffers (:class:`BitPlanes`) of a layer stored as int32 planes of ``slice_bits``
    (``32 // b`` codes per word) with fp16 ``scale`` / ``zero`` ``[out, groups]`` (or a pair per view,
    ``[len(slice_bits), out, groups]``: one set of step and zero point words per view): the same bytes as the
    planes (less the unused top bits of 3-, 5-, 6- and 7-bit words), on the planes' device; ``row_block`` rows at a
    time."""
    slice_bits = tuple(int(b) for b in slice_bits)
    if not bits_supported(slice_bits, group_size):
        raise ValueError(
            f"one-bit planes need at most {BITS_MAX_PLANES} bits in all and groups of whole 16-column words, "
            f"got {list(slice_bits)} / group {group_size}"
        )
    per_view = _per_view(scale, zero, len(slice_bits))
    dev = planes[0].device
    N, K = scale.shape[-2], in_features
    ng = -(-K // group_size)
    kw = ng * group_size // 16
    npad = -(-N // _BITS_ROW_PAD) * _BITS_ROW_PAD
    words = torch.zeros(sum(slice_bits), kw, npad // 2, dtype=torch.int32, device=dev)
    shifts = torch.arange(32, dtype=torch.int64, device=dev)
    row_block -= row_block % 2
    for r0 in range(0, N, row_block):
        r1 = min(N, r0 + row_block)
        rr = r1 - r0 + (r1 - r0) % 2
        t = 0
        for plane, b in zip(planes, slice_bits, strict=True):
            codes = _unpack_plane(plane[r0:r1], b, K)
            codes = torch.nn.functional.pad(codes, (0, kw * 16 - K, 0, rr - (r1 - r0)))
            # [row pairs, words, 2 rows, 16 columns]: the word's 32 bits in order
            codes = codes.reshape(rr // 2, 2, kw, 16).permute(0, 2, 1, 3).reshape(rr // 2, kw, 32)
            for i in reversed(range(b)):  # most significant bit first
                w = (((codes >> i) & 1).to(torch.int64) << shifts).sum(-1)
                w = torch.where(w >= 2**31, w - 2**32, w).to(torch.int32)
                words[t, :, r0 // 2 : r0 // 2 + rr // 2] = w.t()
                t += 1
    lo = scale.to(device=dev, dtype=torch.float16).view(torch.int16).to(torch.int32) & 0xFFFF
    hi = zero.to(device=dev, dtype=torch.float16).view(torch.int16).to(torch.int32) << 16
    nv = len(slice_bits) if per_view else 1
    szr = torch.zeros(nv, npad, ng, dtype=torch.int32, device=dev)
    szr[:, :N] = (lo | hi).reshape(nv, N, ng)
    sz = szr.reshape(nv, npad // 2, 2, ng).permute(0, 2, 3, 1).contiguous()
    return BitPlanes(words, sz if per_view else sz[0], slice_bits, group_size, K, N)


_BITS_CACHE: dict[tuple, tuple[tuple, BitPlanes]] = {}
_BITS_CACHE_MAX = 64


def bitplanes_for(
    planes: Sequence[torch.Tensor],
    scale: torch.Tensor,
    zero: torch.Tensor,
    slice_bits: Sequence[int],
    group_size: int,
    in_features: int,
) -> BitPlanes:
    """:func:`pack_bitplanes` of these tensors, cached while they live unchanged (an entry holds them, so their
    storage cannot be reused by other tensors while it is cached). Callers that keep a layer should hold its
    :class:`BitPlanes` themselves (``bitplane_linear(..., packed=)``); this cache keeps the last 64."""
    srcs = (*planes, scale, zero)
    key = (
        tuple((t.data_ptr(), t._version, tuple(t.shape), str(t.device)) for t in srcs),
        tuple(slice_bits),
        group_size,
    )
    hit = _BITS_CACHE.get(key)
    if hit is not None:
        return hit[1]
    bp = pack_bitplanes(planes, scale, zero, slice_bits, group_size, in_features)
    if len(_BITS_CACHE) >= _BITS_CACHE_MAX:
        _BITS_CACHE.pop(next(iter(_BITS_CACHE)))
    _BITS_CACHE[key] = (srcs, bp)
    return bp


#: Defaults of the one-bit plane kernel: rows per program (two per word), columns per sub-chunk (16 per word),
#: programs per SM of the stream-K grid. 128 / 64 / 4 was the fastest of the seven configs that
#: ``benchmarks/decode_bench.py --bits-sweep`` timed on an H200 (2026-11-30, slices 3-1-1-1-1-1, 8B-shaped stack:
#: 387 / 419 us per token at 3 / 4 bits against 512 / 537 for 256 / 64 / 4; docs/RESULTS.md "Decode").
BITS_BLOCK_N = 128
BITS_BLOCK_K = 64
BITS_WAVES = 4
#: Register cap of the one-bit plane kernel: 128 keeps 4 programs of 4 warps on an SM (the stream-K grid of 4
#: waves all resident); uncapped, an 8-plane body took 140 registers offline (sm_90), a spill of 16 bytes outside
#: the group loop with the cap.
BITS_MAXNREG = 128


def _made_values(v_t):
    """Gate values as a flat tensor: router partials (``SmallConfig.router_partials``) finished here, by a few torch
    operations, for a launch that does not finish them itself."""
    return v_t.values().reshape(-1).contiguous() if isinstance(v_t, RouterPartials) else v_t


def _bits_k(k, x2: torch.Tensor, NS: int) -> tuple[int, torch.Tensor, torch.Tensor | RouterPartials, torch.Tensor, int]:
    """``(ksel, k tensor, gate values, threshold, KVALS)`` of one token's ``k`` for the one-bit plane kernel: an int
    (``ksel``), a one-element tensor (read on the device unless it is on the host) or a :class:`RoutedK`
    (counted in the kernel unless its values are on the host). Unused tensors are ``x2`` (never read)."""
    v_t, tau_t = x2, x2
    if isinstance(k, RoutedK) and isinstance(k.values, RouterPartials):  # finished by the fragment kernel
        p, tau_t = k.values, k.tau.reshape(-1)
        if p.tokens != 1 or p.w2.shape[0] != NS - 1 or tau_t.numel() != 1:
            raise ValueError(f"router partials of one token need {NS - 1} outputs and one threshold, got {p.tokens} "
                             f"tokens, {p.w2.shape[0]} outputs and {tau_t.numel()} thresholds")  # fmt: skip
        if p.part.device != x2.device or tau_t.device != x2.device:
            raise ValueError(f"RoutedK's partials and threshold must be on the activations' device ({x2.device})")
        return 0, x2, p, tau_t.contiguous(), NS - 1
    if isinstance(k, RoutedK):
        assert isinstance(k.values, torch.Tensor)
        v_t, tau_t = k.values.reshape(-1), k.tau.reshape(-1)
        if v_t.numel() != NS - 1 or tau_t.numel() != 1:
            raise ValueError(
                f"RoutedK of one token needs {NS - 1} gate values and one threshold, got {v_t.numel()} and "
                f"{tau_t.numel()}"
            )
        if v_t.device != x2.device or tau_t.device != x2.device:
            raise ValueError(f"RoutedK's values and threshold must be on the activations' device ({x2.device})")
        if k.router is not None:  # computed in the launch: the buffer it writes, counted there
            _check_router(k.router, k.values, x2.shape[1], NS)
            return 0, x2, k.values, tau_t.contiguous(), NS - 1
        host_k = _host_routed_k(k)
        if host_k is not None:  # on the host: the view is known here
            k = host_k
        else:
            return 0, x2, v_t.contiguous(), tau_t.contiguous(), NS - 1
    if isinstance(k, int):
        _check_k(k, NS)
        return k, x2, v_t, tau_t, 0
    k_t = k.reshape(-1)
    if k_t.numel() != 1:
        raise ValueError(f"k has {k_t.numel()} entries for one token")
    rng = _host_k_range(k_t)
    if rng is not None:
        _check_k(rng[0], NS)
        return rng[0], x2, v_t, tau_t, 0
    if k_t.dtype not in (torch.int32, torch.int64) or k_t.device != x2.device:
        k_t = k_t.to(device=x2.device, dtype=torch.int32)
    return 0, k_t, v_t, tau_t, 0


#: Inputs up to this many features may take ``SmallConfig.whole_k`` (every word of a row block in registers at once).
BITS_WHOLE_MAX_K = 4096
#: ``whole_k=None`` takes it for launches of at most this many rows (every layer of a site): on an H200 the stream-K
#: grid is faster from about 8700 rows at 4096 features (2026-12-02, docs/RESULTS.md "Whole-K").
BITS_WHOLE_MAX_ROWS = 8192


def _whole_k_words(cfg: SmallConfig, kw: int, gw: int, rows: int) -> int:
    """Word columns (a power of two) of ``whole_k`` launches for ``kw`` word columns in groups of ``gw`` and ``rows``
    rows; 0: the stream-K grid (``whole_k`` False, or None where K, the group or the rows do not allow it)."""
    if cfg.whole_k is False or (cfg.whole_k is None and rows > BITS_WHOLE_MAX_ROWS):
        return 0
    ok = kw * 16 <= BITS_WHOLE_MAX_K and _is_pow2(gw)
    if not ok and cfg.whole_k:
        raise ValueError(
            f"whole_k needs at most {BITS_WHOLE_MAX_K} input features in groups of a power of two words, got "
            f"{kw * 16} features in groups of {gw * 16}"
        )
    return triton.next_power_of_2(kw) if ok else 0


def _check_router(r: InLaunchRouter, values: torch.Tensor, d: int, NS: int) -> None:
    n_hidden = r.w1.shape[0]
    if r.w1.shape != (n_hidden, d) or r.w2.shape != (NS - 1, n_hidden) or r.b1.numel() != n_hidden:
        raise ValueError(
            f"an in-launch router for {d} inputs and {NS} slices needs W1 [H, {d}] and W2 [{NS - 1}, H], got "
            f"{tuple(r.w1.shape)} and {tuple(r.w2.shape)}"
        )
    if r.b2.numel() != NS - 1 or values.dtype != torch.float32 or not values.is_contiguous():
        raise ValueError("an in-launch router needs K - 1 biases and a contiguous fp32 buffer for its gate values")
    if any(t.device != values.device or not t.is_contiguous() for t in r[:4]):
        raise ValueError("an in-launch router's weights must be contiguous and on the activations' device")


def _route_sync(device: torch.device) -> torch.Tensor:
    """The in-launch router's counters (router tickets, flag, finished programs, started programs): its own pool of
    :func:`_locks`."""
    return _locks(device, 4, pool="route")


#: the launches (rows x inputs) where ``SmallConfig.fragment_cap`` applies and a view on the device on the fragment
#: kernel is capped at 128 registers (``gluon_fragment.BIG_LAUNCH``)
BIG_FRAGMENT_LAUNCH = 1 << 25


def register_capped(weights: int, planes: int, cap: int) -> bool:
    """Whether a fragment-kernel launch of ``weights`` (rows x inputs) compiles with at most 128 registers: from
    :data:`BIG_FRAGMENT_LAUNCH` weights up, a view on the device (``planes`` 0, a body per view) or a static view of at
    least ``cap`` planes (``cap`` 0: none)."""
    return weights >= BIG_FRAGMENT_LAUNCH and (planes == 0 or 0 < cap <= planes)


def _fragment_wanted(
    cfg: SmallConfig, bp: BitPlanes, ksel: int | None, span: tuple[int, int] | None = None
) -> bool:
    """Whether ``cfg.fragment`` asks for the fragment kernel for view ``ksel`` (None: a view on the device, ``span``
    the views it may be when known)."""
    if cfg.fragment is not None:
        return cfg.fragment
    size = bp.out_features * bp.in_features
    if not ksel:
        big = cfg.fragment_device_from
        if big is not None and size >= big:
            return True
        if span is None or size < cfg.fragment_span_from:
            return False
        return planes_of_views(bp.slice_bits)[span[1] - 1] <= cfg.fragment_span_planes
    planes = planes_of_views(bp.slice_bits)[ksel - 1]
    if planes <= 4:
        return size >= cfg.fragment_static_from
    return planes > 6 or register_capped(size, planes, cfg.fragment_cap)


def _pdl_capable(device: torch.device | None) -> bool:
    """Whether launches on ``device`` can have programmatic dependent launch (a GPU of compute capability 9.0+;
    None: no device to ask, taken as able)."""
    if device is None:
        return True
    return device.type == "cuda" and torch.cuda.get_device_capability(device) >= (9, 0)


def launch_pdl(
    cfg: SmallConfig | None, static: bool, planes: int = 0, device: torch.device | None = None, router: bool = False
) -> bool:
    """Whether a launch has programmatic dependent launch under ``cfg.pdl`` (``cfg`` None: the defaults): True every
    launch, ``"views"`` every launch of a linear (static or not) but no ``router``'s (a router's launch, or one with
    a router's programs in it), ``"static"`` those of static views (``static``: the view known on the host, no router
    in the launch), None on a ``device`` that has it those of static views of ``planes`` from 1 to
    :data:`PDL_MAX_PLANES` and those of views read on the device with no router in the launch."""
    pdl = small_config_or_default(cfg).pdl
    if pdl is None:
        if router or not _pdl_capable(device):
            return False
        return 0 < planes <= PDL_MAX_PLANES if static else True
    if pdl == "views":
        return not router
    return pdl is True or (pdl == "static" and static)


def _view_planes(bp: BitPlanes, ksel: int) -> int:
    """The planes of the static view ``ksel`` of ``bp`` (0: no view known on the host)."""
    return planes_of_views(bp.slice_bits)[ksel - 1] if ksel else 0


def _fragment_options(cfg: SmallConfig, static: bool = False, planes: int = 0, device=None) -> dict:
    """``fragment_linear``'s keywords from ``cfg`` (each launch uses those of its kind: ``cap`` and ``tma`` static
    views', ``span_uncap`` and ``early_l2`` views' on the device; ``pdl`` as :func:`launch_pdl` says for a static view
    of ``planes``, or a view read on the device (no router in the launch), on ``device``)."""
    pdl = launch_pdl(cfg, static, planes, device)
    return dict(cap=cfg.fragment_cap, tma=cfg.fragment_tma, pdl=pdl, span_uncap=cfg.fragment_span_uncap,
                early_l2=cfg.fragment_early_l2, prefetch=cfg.fragment_prefetch, ahead=cfg.fragment_ahead,
                programs=cfg.fragment_programs)  # fmt: skip


def _fragment_ok(bp: BitPlanes, x2: torch.Tensor) -> bool:
    """Whether ``SmallConfig.fragment`` can serve this one-token launch (else the one-bit plane kernel does)."""
    if x2.dtype != torch.float16 or not x2.is_cuda or _interpreting():
        return False
    try:
        from .gluon_fragment import fragment_device_ok, fragment_supported
    except ImportError:  # a triton without Gluon
        return False

    return fragment_supported(bp.slice_bits, bp.group_size, bp.in_features) and fragment_device_ok(x2.device)


def fragment_serves(
    cfg: SmallConfig | None, bp: BitPlanes, ksel: int | None, x2: torch.Tensor, span: tuple[int, int] | None = None
) -> bool:
    """Whether a one-token launch of view ``ksel`` (None or 0: a view on the device, within ``span`` when known) of
    ``bp`` with config ``cfg`` (None: the defaults) goes to the fragment kernel: asked for by the config and servable
    here."""
    return _fragment_wanted(cfg or SmallConfig(), bp, ksel, span) and _fragment_ok(bp, x2)


def _router_of(ks: Sequence) -> InLaunchRouter | None:
    """The in-launch router of a launch's ``k``s (None: none, or static views)."""
    return ks[0].router if isinstance(ks[0], RoutedK) else None


def bitplane_linear_bits(
    x2: torch.Tensor,
    bp: BitPlanes,
    k,
    bias: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
    config: SmallConfig | None = None,
    span: tuple[int, int] | None = None,
    prologue: tuple | None = None,
    epilogue: Any = None,
) -> torch.Tensor:
    """One token ``x2 [1, in]`` -> ``[1, out]`` from one-bit plane buffers: ``_bp_gemv_bits_kernel`` on a
    stream-K grid (``config.waves`` programs per SM, or ``config.split_k`` programs per row block); ``k`` an int,
    a one-element tensor (on the device: read there, one compiled body per view) or a :class:`RoutedK` of one token
    (on the device: counted there from the gate values and the threshold). Buffers of a pair per view
    (``bp.per_view``): the view's own step and zero point words (picked here, or by ``k`` in the kernel).
    ``span = (lo, hi)``: the views a ``k`` learnt on the device may be, known here (e.g. ``(j, j + 1)``, the two views
    of an adjacent-policy threshold): only their bodies are compiled and ``k`` is clamped into them. ``prologue``:
    ``x2`` is the input of what makes the layer's input, made by the launch's whole-K programs as they read it:
    ``("rms_norm", weight, eps)`` (LLaMA's RMS norm) or ``("silu_mul", up)`` (a gated MLP's product, ``x2`` the
    gate); :func:`takes_prologue` says where (the fragment kernel is then not used); ``("rms_scale", sums, eps)``, a
    norm made by the launch before, and ``epilogue`` (a :class:`~mobiquant.kernels.epilogue.NextInput`), what this
    launch makes of its outputs for the next: the fragment kernel's static views only (:func:`takes_epilogue`)."""
    M, K_IN = x2.shape
    if M != 1:
        raise ValueError(f"the one-bit plane kernel takes one token, got {M}")
    if K_IN != bp.in_features:
        raise ValueError(f"x has {K_IN} features, the layer {bp.in_features}")
    _check_span(span, len(bp.slice_bits))
    ksel, k_t, v_t, tau_t, kvals = _bits_k(k, x2, len(bp.slice_bits))
    router = _router_of([k])
    cfg = config or SmallConfig()
    frag = fragment_serves(cfg, bp, ksel, x2, span)
    made_by = frag and router is None and (bool(ksel) or cfg.fragment_routed_epilogues)
    _check_made_by_fragment(prologue, epilogue, made_by)
    if router is None and (prologue is None or ksel or prologue[0] == "rms_scale") and frag:
        from .gluon_fragment import fragment_linear, fragment_of

        if kvals:  # the router's gate values (or its partials, finished there): counted by the kernel
            return fragment_linear(x2, fragment_of(bp), None, bias, out, routed=(v_t, tau_t), span=span,
                                   prologue=prologue, epilogue=epilogue,
                                   **_fragment_options(cfg, device=x2.device))  # fmt: skip
        return fragment_linear(x2, fragment_of(bp), ksel or k_t, bias, out, span=span, prologue=prologue,
                               epilogue=epilogue, **_fragment_options(cfg, bool(ksel), _view_planes(bp, ksel),
                                                                      x2.device))  # fmt: skip
    v_t = _made_values(v_t)
    if out is None:
        out = torch.empty(1, bp.out_features, dtype=x2.dtype, device=x2.device)
    return _bits_launch(
        x2, bp, [(bp.out_features, 0, 0)], ksel, k_t, v_t, [tau_t], kvals, bias, out, cfg, router, span, prologue
    )


def _check_made_by_fragment(prologue: tuple | None, epilogue: Any, on_fragment: bool) -> None:
    """Refuses a norm made by the launch before (prologue ``rms_scale``) or an ``epilogue`` for a launch that is not a
    static view on the fragment kernel, or a view on the device there with ``SmallConfig.fragment_routed_epilogues``
    and no router in the launch (the only ones that take them: :func:`takes_epilogue`)."""
    if on_fragment:
        return
    if epilogue is not None or (prologue is not None and prologue[0] == "rms_scale"):
        what = "an epilogue" if epilogue is not None else "a norm made by the launch before ('rms_scale')"
        raise ValueError(
            f"{what} needs a static view on the fragment kernel (fp16, CUDA, SmallConfig.fragment), or a view on the "
            "device there with SmallConfig.fragment_routed_epilogues and no router in the launch"
        )


def spans(config: SmallConfig | None) -> bool:
    """Whether the package's one-token launches take a routed layer's span of views (``SmallConfig.span_bodies``;
    ``config`` None: the default)."""
    return small_config_or_default(config).span_bodies


def _check_span(span: tuple[int, int] | None, NS: int) -> None:
    if span is None:
        return
    if len(span) != 2 or not 1 <= span[0] <= span[1] <= NS:
        raise ValueError(f"span must be (lo, hi) with 1 <= lo <= hi <= {NS} (the views k may take), got {span!r}")


@dataclass(frozen=True)
class SiteBits:
    """The one-bit plane buffers of up to three layers that read one input (a site's linears: q, k and v; gate
    and up), side by side for one launch (:func:`bitplane_site_bits`): ``planes.words`` / ``planes.sz`` hold the
    layers' buffers concatenated along the row pairs (each layer's rows padded to a multiple of 128), layer ``i``
    from row pair ``rows2[i]``; its outputs are columns ``cols[i] .. cols[i] + outs[i]`` of the launch's output."""

    planes: BitPlanes  # out_features: every layer's rows (sum(outs))
    outs: tuple[int, ...]
    rows2: tuple[int, ...]
    cols: tuple[int, ...]
    bias: torch.Tensor | None  # [sum(outs)] when some layer has a bias (zeros for those without)


BITS_MAX_SITE = 3


def site_bitplanes(parts: Sequence[BitPlanes], biases: Sequence[torch.Tensor | None] | None = None) -> SiteBits:
    """:class:`SiteBits` of the one-bit plane buffers ``parts`` (2 or 3 layers of one input width and layout)."""
    if not 1 <= len(parts) <= BITS_MAX_SITE:
        raise ValueError(f"a site launch holds 1 to {BITS_MAX_SITE} layers, got {len(parts)}")
    p0 = parts[0]
    for p in parts[1:]:
        if (p.slice_bits, p.group_size, p.in_features, p.per_view) != (
            p0.slice_bits,
            p0.group_size,
            p0.in_features,
            p0.per_view,
        ):
            raise ValueError("a site launch needs layers of one input width, slice layout, group and pair format")
    outs = tuple(p.out_features for p in parts)
    rows2, cols, r, c = [], [], 0, 0
    for p in parts:
        rows2.append(r)
        cols.append(c)
        r += p.words.shape[2]
        c += p.out_features
    words = torch.cat([p.words for p in parts], dim=-1)
    sz = torch.cat([p.sz for p in parts], dim=-1)
    bias = None
    if biases is not None and any(b is not None for b in biases):
        bias = torch.cat(
            [
                (b if b is not None else torch.zeros(n, device=words.device)).to(torch.float32).reshape(-1)
                for b, n in zip(biases, outs, strict=True)
            ]
        )
    planes = BitPlanes(words, sz, p0.slice_bits, p0.group_size, p0.in_features, sum(outs))
    return SiteBits(planes, outs, tuple(rows2), tuple(cols), bias)


def bitplane_site_bits(
    x2: torch.Tensor,
    site: SiteBits,
    ks: Sequence,
    out: torch.Tensor | None = None,
    config: SmallConfig | None = None,
    span: tuple[int, int] | None = None,
    prologue: tuple | None = None,
    epilogue: Any = None,
) -> torch.Tensor:
    """One token ``x2 [1, in]`` through every layer of ``site`` in one launch: ``[1, sum(outs)]``, layer ``i``'s
    outputs at columns ``site.cols[i]``. ``ks``: each layer's ``k``, either one int for all (the same static view)
    or a :class:`RoutedK` each, sharing their gate values (one router) with a threshold each, or one one-element
    tensor for all (the same view, read on the device unless it is on the host). ``span``: the views every layer's
    ``k`` learnt on the device lies in; ``prologue``: what makes the layers' input from ``x2`` (both
    :func:`bitplane_linear_bits`), as ``epilogue`` (a gated MLP's product: the site's gate then up)."""
    M, K_IN = x2.shape
    bp = site.planes
    if M != 1 or K_IN != bp.in_features:
        raise ValueError(f"a site launch takes one token of {bp.in_features} features, got {tuple(x2.shape)}")
    if len(ks) != len(site.outs):
        raise ValueError(f"a site of {len(site.outs)} layers needs one k each, got {len(ks)}")
    NS = len(bp.slice_bits)
    _check_span(span, NS)
    if all(isinstance(k, int) for k in ks):
        if len(set(ks)) != 1:
            raise ValueError(f"a site launch serves one static view for all its layers, got {list(ks)}")
        resolved = [_bits_k(ks[0], x2, NS)]
    elif all(isinstance(k, torch.Tensor) for k in ks):
        if any(k is not ks[0] for k in ks):
            raise ValueError("a site launch with k on the device needs one k tensor for all its layers")
        resolved = [_bits_k(ks[0], x2, NS)]
    elif all(isinstance(k, RoutedK) for k in ks):
        if any(k.values is not ks[0].values or k.router is not ks[0].router for k in ks):
            raise ValueError("a routed site launch needs one router's gate values (and one in-launch router or none)")
        if len({k.tau.dtype for k in ks}) != 1:
            raise ValueError("a routed site launch needs thresholds of one dtype")
        resolved = [_bits_k(k, x2, NS) for k in ks]
        if len({r[0] for r in resolved}) != 1:  # gate values on the host: each view known here, and they differ
            raise ValueError("routed layers whose views are known on the host and differ: launch them one by one")
    else:
        raise ValueError("a site launch takes one int or one k tensor for all its layers, or a RoutedK each")
    ksel, k_t, v_t, _, kvals = resolved[0]
    cfg = config or SmallConfig()
    whole = all(n % 128 == 0 for n in site.outs)  # the pack's rows are then the output columns
    static_frag = bool(ksel) and whole and fragment_serves(cfg, bp, ksel, x2)
    router = _router_of(ks)
    device_frag = not ksel and router is None and whole and _site_span_serves(cfg, bp, x2, len(site.outs), span)
    _check_made_by_fragment(prologue, epilogue, static_frag or (device_frag and cfg.fragment_routed_epilogues))
    if static_frag:
        from .gluon_fragment import fragment_linear, fragment_of  # one static view: the layers as one

        return fragment_linear(x2, fragment_of(bp), ksel, site.bias, out, prologue=prologue, epilogue=epilogue,
                               **_fragment_options(cfg, True, _view_planes(bp, ksel), x2.device))  # fmt: skip
    taus = [r[3] for r in resolved] if kvals else [x2]
    if device_frag and (prologue is None or prologue[0] == "rms_scale"):
        from .gluon_fragment import BLOCK_N, fragment_linear, fragment_of  # the layers as one, k per row block

        starts = tuple(c // BLOCK_N for c in site.cols[1:])
        made = dict(prologue=prologue, epilogue=epilogue)
        if kvals:  # the router's gate values (or its partials, finished there): counted by the kernel
            return fragment_linear(x2, fragment_of(bp), None, site.bias, out, routed=(v_t, taus), span=span,
                                   seg_starts=starts, **made, **_fragment_options(cfg, device=x2.device))  # fmt: skip
        return fragment_linear(x2, fragment_of(bp), k_t, site.bias, out, span=span, **made,
                               **_fragment_options(cfg, device=x2.device))  # fmt: skip
    v_t = _made_values(v_t)  # the launches below read made gate values
    if out is None:
        out = torch.empty(1, bp.out_features, dtype=x2.dtype, device=x2.device)
    segs = list(zip(site.outs, site.rows2, site.cols, strict=True))
    return _bits_launch(x2, bp, segs, ksel, k_t, v_t, taus, kvals, site.bias, out, cfg, router, span, prologue)


def _site_span_serves(
    cfg: SmallConfig, bp: BitPlanes, x2: torch.Tensor, layers: int, span: tuple[int, int] | None
) -> bool:
    """Whether the fragment kernel serves a site launch of ``layers`` layers (whole blocks of 128 rows each) whose
    view is read on the device, within ``span`` when known (``SmallConfig.fragment_site_spans``; at most 3 layers)."""
    return layers <= 3 and cfg.fragment_site_spans and fragment_serves(cfg, bp, None, x2, span)


def _bits_grid(cfg: SmallConfig, bp: BitPlanes, rows: int, router: bool) -> tuple[int, int, int, int]:
    """The grid of a one-bit plane launch of ``rows`` rows (every layer of a site) by ``cfg``: ``(word columns a
    sub-chunk, rows a program, warps, whole-K word columns)``, the last 0 for the stream-K grid; every knob checked.
    ``whole_k`` None takes stream-K where a stream-K knob is given (block_k, waves, split_k, prefetch, stages, or
    more rows than a whole-K block holds) and for a router in the launch (its GPU test compares the outputs bit for
    bit with a launch handed the router's values, which the whole-K body has not matched on an H200)."""
    block_n = cfg.block_n or BITS_BLOCK_N
    gw = bp.group_size // 16
    block_k = cfg.block_k or 16 * _pow2_divisor(gw, BITS_BLOCK_K // 16)
    nw = block_k // 16
    if block_k % 16 or not _is_pow2(nw) or gw % nw:
        raise ValueError(f"block_k must be 16 x a power of two dividing the group ({bp.group_size}), got {block_k}")
    if block_n < 2 or not _is_pow2(block_n):
        raise ValueError(f"block_n must be a power of two >= 2, got {block_n}")
    if cfg.prefetch and nw != gw:
        raise ValueError(f"prefetch needs block_k = the group ({bp.group_size}), got {block_k}")
    if cfg.stages is not None and (int(cfg.stages) < 1 or cfg.prefetch):
        raise ValueError(f"stages must be a positive number of pipeline stages, without prefetch; got {cfg.stages}")
    if int(cfg.ahead) < 0 or (cfg.ahead and cfg.prefetch):
        raise ValueError(f"ahead must be a number of groups >= 0, without prefetch; got {cfg.ahead}")
    num_warps = cfg.num_warps
    stream_knobs = cfg.prefetch or cfg.split_k or cfg.waves or cfg.stages or cfg.ahead
    if cfg.whole_k is None and (stream_knobs or cfg.block_k or (cfg.block_n or 0) > _BITS_ROW_PAD or router):
        return nw, block_n, num_warps, 0
    wkp = _whole_k_words(cfg, bp.words.shape[1], gw, rows)
    if wkp:
        if stream_knobs:
            raise ValueError("whole_k takes no prefetch, split_k, waves, stages or ahead: one program per row block")
        if cfg.block_n is None:
            num_warps = max(num_warps, wkp // 32)
        block_n = cfg.block_n or 2 * max(2, min(_BITS_ROW_PAD // 2, num_warps * 128 // wkp))
        if block_n < 2 or not _is_pow2(block_n) or block_n > _BITS_ROW_PAD:
            raise ValueError(f"whole_k needs block_n a power of two in [2, {_BITS_ROW_PAD}], got {block_n}")
    return nw, block_n, num_warps, wkp


def _prologue_args(prologue: tuple, x2: torch.Tensor) -> tuple[torch.Tensor, float, int]:
    """The kernel's ``pro_ptr``, ``eps`` and ``PRO`` for ``prologue`` (:func:`bitplane_linear_bits`), checked
    (:func:`~mobiquant.kernels.triton_router.prologue_operand`; the up rows also in the token's dtype)."""
    operand, eps, code = prologue_operand(prologue, x2)
    if code == PROLOGUES["silu_mul"] and operand.dtype != x2.dtype:
        raise ValueError(f"a gated product in the launch: its up rows must be {x2.dtype}, got {operand.dtype}")
    return operand.reshape(-1).contiguous(), eps, code  # the weight [K_IN], or the token's K_IN up values


def prologue_in_launch(x2: torch.Tensor, bp: BitPlanes, rows: int, config: SmallConfig | None = None) -> bool:
    """Whether a one-token launch of ``rows`` rows (a layer, or a site's layers) on ``bp`` by ``config`` runs whole-K
    programs on the one-bit plane kernel, each reading the whole row, so it can make its input itself
    (``prologue=`` of :func:`bitplane_linear_bits` and :func:`bitplane_site_bits`)."""
    cfg = config or SmallConfig()
    try:
        return bool(_bits_grid(cfg, bp, rows, False)[3])
    except ValueError:
        return False


def takes_prologue(
    x2: torch.Tensor,
    bp: BitPlanes,
    k: int | None,
    outs: Sequence[int],
    config: SmallConfig | None = None,
    kind: str = "rms_norm",
    span: tuple[int, int] | None = None,
) -> bool:
    """Whether the one-token launch at the static view ``k`` of ``bp``, a layer (``outs``: its rows) or a site's
    layers (each one's rows), makes its input from a prologue of ``kind`` itself: on the fragment kernel where it
    serves the launch (a site only with whole blocks of 128 rows a layer; fp16) only with
    ``SmallConfig.fragment_prologues`` (measured slower), else on the one-bit plane kernel's whole-K programs of
    inputs up to ``SmallConfig.prologue_max_in`` wide;
    ``"rms_scale"`` (a norm made by the launch before, :func:`takes_epilogue`) on the fragment kernel only, with
    ``SmallConfig.fragment_epilogues``; ``k`` None: a view read on the device (within ``span`` when known), which
    takes only ``"rms_scale"``, with ``SmallConfig.fragment_routed_epilogues`` (:func:`takes_epilogue`)."""
    if k is None:
        return kind == "rms_scale" and _routed_made_by(config, bp, x2, outs, span)
    frag = _fragment_launch(config, bp, k, x2, outs)
    if kind == "rms_scale":
        return frag and epilogues_on(config, bp, k, "rms_norm")  # the norm's parts made by the launch before
    if frag:
        return bool(config is not None and config.fragment_prologues) and x2.dtype == torch.float16
    if bp.in_features > small_config_or_default(config).prologue_max_in:
        return False
    return prologue_in_launch(x2, bp, sum(outs), config)


def epilogues_on(config: SmallConfig | None, bp: BitPlanes, k: int, kind: str = "rms_norm") -> bool:
    """Whether ``config`` (None: the defaults) asks the launches of the static view ``k`` of ``bp`` to make the next
    launch's input of ``kind`` (``SmallConfig.fragment_epilogues``; None: views of at most 4 or at least 7 planes; a
    kind's name: that kind alone)."""
    want = small_config_or_default(config).fragment_epilogues
    if want is None:
        planes = planes_of_views(bp.slice_bits)[k - 1]
        return planes <= 4 or planes >= 7
    if isinstance(want, str):
        return want == kind
    return bool(want)


def takes_epilogue(
    x2: torch.Tensor,
    bp: BitPlanes,
    k: int | None,
    outs: Sequence[int],
    config: SmallConfig | None,
    kind: str,
    span: tuple[int, int] | None = None,
) -> bool:
    """Whether the one-token launch at the static view ``k`` of ``bp`` (a layer, or a site's layers: ``outs``) makes
    the next launch's input of ``kind`` from its outputs (:mod:`~mobiquant.kernels.epilogue`): a fragment launch
    (fp16) where ``SmallConfig.fragment_epilogues`` asks for them (:func:`epilogues_on`); ``"silu_mul"`` only from a
    site of two layers of whole blocks of 128 rows, the gate's and the up's of one width. ``k`` None: a view read on
    the device (within ``span`` when known) with no router in the launch, on the fragment kernel where
    ``SmallConfig.fragment_routed_epilogues`` asks."""
    if kind == "silu_mul" and not (len(outs) == 2 and outs[0] == outs[1]):
        return False
    if k is None:
        return _routed_made_by(config, bp, x2, outs, span)
    if not isinstance(k, int) or not epilogues_on(config, bp, k, kind):
        return False
    return _fragment_launch(config, bp, k, x2, outs)


def _routed_made_by(
    config: SmallConfig | None, bp: BitPlanes, x2: torch.Tensor, outs: Sequence[int], span: tuple[int, int] | None
) -> bool:
    """Whether the one-token launch of a view read on the device (within ``span`` when known) of ``bp``, a layer or a
    site's layers (``outs``), takes an epilogue and a norm made by the launch before: on the fragment kernel (fp16),
    with ``SmallConfig.fragment_routed_epilogues``."""
    cfg = small_config_or_default(config)
    if not cfg.fragment_routed_epilogues or x2.dtype != torch.float16:
        return False
    if len(outs) == 1:
        return fragment_serves(cfg, bp, None, x2, span)
    return all(n % 128 == 0 for n in outs) and _site_span_serves(cfg, bp, x2, len(outs), span)


def _fragment_launch(config: SmallConfig | None, bp: BitPlanes, k: int, x2: torch.Tensor, outs: Sequence[int]) -> bool:
    """Whether the fragment kernel serves the one-token launch of view ``k`` of ``bp``, a layer or a site's layers
    (``outs``: a site's only as whole blocks of 128 rows a layer)."""
    return (len(outs) == 1 or all(n % 128 == 0 for n in outs)) and fragment_serves(config, bp, k, x2)


def _bits_launch(
    x2: torch.Tensor,
    bp: BitPlanes,
    segs: list[tuple[int, int, int]],
    ksel: int,
    k_t: torch.Tensor,
    v_t: torch.Tensor,
    taus: list[torch.Tensor],
    kvals: int,
    bias: torch.Tensor | None,
    out: torch.Tensor,
    cfg: SmallConfig,
    router: InLaunchRouter | None = None,
    span: tuple[int, int] | None = None,
    prologue: tuple | None = None,
) -> torch.Tensor:
    """``_bp_gemv_bits_kernel`` over the segments ``segs`` (``(rows, row-pair offset, output column)`` each) of the
    buffers ``bp``: the programs of the stream-K grid shared among them by their items; with ``router``, its
    programs first (they write ``v_t``); ``span``, with a view learnt on the device: the views it may be (only their
    bodies compiled); ``prologue``: what makes the layers' input from ``x2`` (:func:`bitplane_linear_bits`)."""
    K_IN = x2.shape[1]
    NS = len(bp.slice_bits)
    kw, npad2 = bp.words.shape[1], bp.words.shape[2]
    gw = bp.group_size // 16
    nw, block_n, num_warps, wkp = _bits_grid(cfg, bp, sum(n for n, _, _ in segs), router is not None)
    pro = (x2, 0.0, 0) if prologue is None else _prologue_args(prologue, x2)
    if prologue is not None and not wkp:
        raise ValueError(
            f"a {prologue[0]} in the launch needs whole-K programs (each reads the whole row); this launch streams K"
        )
    if prologue is not None and router is not None:
        raise ValueError(f"a {prologue[0]} in the launch: a router in the same launch reads its output")
    static = bool(ksel) and router is None and not kvals
    pdl = launch_pdl(cfg, static, _view_planes(bp, ksel), x2.device, router=router is not None)
    if pdl:
        _check_pdl(x2.device)
    bn2 = block_n // 2
    if len(segs) > 1 and (npad2 % bn2 or any(r2 % bn2 or r2 % (_BITS_ROW_PAD // 2) for _, r2, _ in segs)):
        raise ValueError(
            f"a site launch needs every layer's rows in whole blocks of {block_n} rows, each layer from a multiple of "
            f"{_BITS_ROW_PAD} rows (as site_bitplanes pads them)"
        )
    gpb = kw // gw
    blocks = [triton.cdiv(triton.cdiv(n, 2), bn2) for n, _, _ in segs]
    items = [b * gpb for b in blocks]
    if wkp:
        progs = sum(blocks)
    elif cfg.split_k:
        progs = sum(blocks) * cfg.split_k
    else:
        progs = (cfg.waves or BITS_WAVES) * _num_sms(x2.device)
    # each segment its share of the programs, by its items (at least one, at most one per item); whole_k: its blocks
    share = blocks if wkp else [max(1, min(i, round(progs * i / sum(items)))) for i in items]
    starts = [sum(share[:j]) for j in range(len(share))] + [0] * (BITS_MAX_SITE - len(share))
    progs = sum(share)
    # partial slots: a row block is shared by at most ceil(programs / blocks) + 1 programs of its segment (also with
    # fewer programs than row blocks, when a program's range ends inside one)
    max_seg = max(-(-g // b) + 1 for g, b in zip(share, blocks, strict=True))
    part = torch.empty(max_seg * 2 * npad2, dtype=torch.float32, device=x2.device)
    # the partial slots summed by a second launch: one layer on the stream-K grid without a router in the launch
    reduce_launch = cfg.reduce_launch and not wkp and len(segs) == 1 and router is None
    locks = _locks(x2.device, max(r2 // bn2 + b for (_, r2, _), b in zip(segs, blocks, strict=True)))
    pv = bp.planes_of_view
    b0 = bp.slice_bits[0]
    mults = [2.0 ** (_FIELD_S - (p - b0)) for p in pv] + [1.0] * (MAX_SLICES - NS)
    hs = [(1.0 - 2.0 ** -(p - b0)) / 2 for p in pv] + [0.0] * (MAX_SLICES - NS)
    pk = {f"P{i + 1}": p for i, p in enumerate(pv + [1] * (MAX_SLICES - NS))}
    # the cap, except with prefetch (twice the words in registers: capped, 8 planes spill in the loop)
    maxnreg = cfg.maxnreg or (None if cfg.prefetch or wkp else BITS_MAXNREG)
    # a set of step and zero point words per view: the view's own when k is known here, else all (read on the device)
    per_view = bp.per_view and ksel == 0
    sz = bp.sz[ksel - 1] if bp.per_view and ksel > 0 else bp.sz
    seg_n = [n for n, _, _ in segs] + [0] * (BITS_MAX_SITE - len(segs))
    seg_r = [r2 for _, r2, _ in segs] + [0] * (BITS_MAX_SITE - len(segs))
    seg_o = [o for _, _, o in segs] + [0] * (BITS_MAX_SITE - len(segs))
    taus = taus + [taus[0]] * (BITS_MAX_SITE - len(taus))
    if router is not None:
        from .triton_router import one_token_shapes

        n_hidden = router.w1.shape[0]
        rs = one_token_shapes(K_IN, n_hidden, NS - 1)
        rw = dict(RH=n_hidden, RRP=rs["RP"], RBD=rs["BD"], RNPP=rs["NPP"], RADJ=bool(router.adjacent))
        rargs = [_route_sync(x2.device), *router[:4]]
        rargs.append(torch.empty(rs["NPP"] * rs["BM"] * rs["RP"], dtype=torch.float32, device=x2.device))
    else:
        rw = dict(RH=0, RRP=2, RBD=16, RNPP=2, RADJ=False)
        rargs = [locks] + [x2] * 5
    _bp_gemv_bits_kernel[(rw["RH"] + progs,)](
        x2,
        out,
        part,
        locks,
        bias if bias is not None else out,
        k_t,
        v_t,
        *taus,
        bp.words,
        sz,
        *rargs,
        bp.words.stride(0),
        sz.stride(-3),
        npad2,
        seg_n[0],
        K_IN,
        gpb,
        progs,
        seg_n[1],
        seg_n[2],
        starts[1],
        starts[2],
        seg_r[1],
        seg_r[2],
        seg_o[1],
        seg_o[2],
        *mults,
        *hs,
        pro[0],
        pro[1],
        GROUP=bp.group_size,
        NS=NS,
        KSEL=ksel,
        KLO=span[0] if span and not ksel else 0,
        KHI=span[1] if span and not ksel else 0,
        PRELOAD=bool(cfg.preload),
        HAS_BIAS=bias is not None,
        BN2=bn2,
        NW=nw,
        EVEN_K=K_IN == kw * 16,
        EVEN_N=npad2 % bn2 == 0,
        XE=149 - _FIELD_S,
        ASM=not _interpreting(),
        PREFETCH=bool(cfg.prefetch),
        STAGES=cfg.stages or 0,
        PDL=pdl,
        L2PF=bool(cfg.l2_prefetch) and not wkp,
        AHEAD=0 if wkp or cfg.prefetch else cfg.ahead,
        TICKET=not reduce_launch,
        PER_VIEW=per_view,
        KVALS=kvals,
        NSEG=len(segs),
        WKP=wkp,
        PRO=pro[2],
        **rw,
        num_warps=num_warps,
        num_stages=cfg.num_stages,
        **pk,
        **({} if _interpreting() or maxnreg is None else {"maxnreg": maxnreg}),
        **({"launch_pdl": True} if pdl and not _interpreting() else {}),
    )
    if reduce_launch:
        _bits_reduce_kernel[(blocks[0],)](
            out, part, bias if bias is not None else out, seg_n[0], npad2, gpb, progs, HAS_BIAS=bias is not None,
            BN2=bn2, num_warps=1 if bn2 <= 64 else 2,
        )  # fmt: skip
    return out


def _tile_launch(x2, out, planes, scale, zero, slice_bits, group_size, ksel, bias, perm, seg, M_grid, cfg):
    M, K_IN = x2.shape
    scale, zero = _view_pair(scale, zero, ksel)  # one view per launch: its own pair where there is one per view
    N = scale.shape[0]
    bk = cfg.block_k
    shifts = _shifts(slice_bits)
    sh = shifts[ksel - 1]
    struct = [(_is_pow2(32 // b) and bk % (32 // b) == 0) for b in slice_bits]
    struct += [False] * (MAX_SLICES - len(struct))
    grid = (triton.cdiv(M_grid, cfg.block_m) * triton.cdiv(N, cfg.block_n),)
    _bp_tile_kernel[grid](
        x2,
        out,
        bias if bias is not None else out,
        perm if perm is not None else out,
        seg if seg is not None else out,
        scale,
        zero,
        *_plane_args(planes),
        2.0**-sh,
        (1.0 - 2.0**-sh) / 2,
        M_grid,
        N,
        K_IN,
        scale.shape[1],
        x2.stride(0),
        out.stride(0),
        GROUP=group_size,
        KSEL=ksel,
        **{f"B{i}": b for i, b in enumerate(_bits_args(slice_bits))},
        **{f"S{i}": s for i, s in enumerate(struct)},
        HAS_PERM=perm is not None,
        HAS_BIAS=bias is not None,
        SCALE_VEC=group_size % bk == 0,
        BLOCK_M=cfg.block_m,
        BLOCK_N=cfg.block_n,
        BLOCK_K=bk,
        GROUP_M=cfg.group_m,
        DT=_DT_CODES[x2.dtype],
        DOT_F32=x2.dtype == torch.bfloat16 and _interpreting(),
        num_warps=cfg.num_warps,
        num_stages=cfg.num_stages,
    )


def default_tile_config(M: int) -> TileConfig:
    if M <= 16:
        return TileConfig(block_m=16, block_n=64, block_k=128, num_warps=4, num_stages=3)
    if M <= 64:
        return TileConfig(block_m=64, block_n=64, block_k=128, num_warps=4, num_stages=3)
    if M <= 256:
        return TileConfig(block_m=64, block_n=128, block_k=64, num_warps=4, num_stages=4)
    # best of the H100 sweep at 2048 tokens on every LLaMA-3-8B shape but k/v (benchmarks/NOTES.md)
    return TileConfig(block_m=128, block_n=128, block_k=64, num_warps=4, num_stages=4)


#: From this many tokens on CUDA, 'auto' dequantizes W_k once per view present and calls cuBLAS even with a per-token
#: ``k`` (one host read of the device: the token count of each view; not while a CUDA graph is captured). Below it a
#: per-token ``k`` takes the small-batch kernel, which is faster there than a dequantize pass per view. A single view
#: (an int ``k``) is dequantized from 2 tokens. Measured on an H200 on the default layout (3, 1, 1, 1, 1, 1), LLaMA-3-8B
#: and SmolLM2 shapes (docs/RESULTS.md "Prompts on the GPU"): at 2-16 tokens and one view, dequantize-then-cuBLAS
#: 10-15 us a SmolLM2 linear against the small-batch kernel's 24-32 (8B: 0.44-0.89x its time); with mixed views the
#: small-batch kernel 32-38 us against 25-101; at 64 and 256 tokens dequantize-then-cuBLAS 0.06-0.52x the tile
#: kernel's time for every shape and view, 0.08-0.73x with mixed views (H100, 2026-11-28: 0.43-0.89x at 2048 tokens).
DEQUANT_MIN_TOKENS = 17
#: Whether a packed layer's dequantize pass reads its one-bit plane buffers (:func:`dequantize_bits`: whole words,
#: coalesced) instead of its planes (:func:`dequantize`, whose 3-bit base gathers each code's word): True always,
#: False never, None (default) in layers of at least :data:`DEQUANT_BITS_MIN_WEIGHTS` weights
#: (:func:`dequant_from_bits`). Measured by ``benchmarks/dequant_bench.py`` on an H100 (docs/RESULTS.md "Prompts, the
#: stack and SmolLM2 on an H100"): on the 8B shapes the buffers' pass was 0-21% faster at views of 3-6 bits (gate/up
#: and down at 57-67% of copy bandwidth with blocks of 32 row pairs x 4 words) and within 3% at 8 bits; on
#: SmolLM2's shapes (at most 0.9M weights, launch-bound) the planes' pass was mostly the faster, by 0.3-1.5 us.
DEQUANT_FROM_BITS: bool | None = None
#: From this many weights (rows x inputs) a layer's dequantize pass reads the one-bit plane buffers when
#: ``DEQUANT_FROM_BITS`` is None: the 8B k/v (4M) and every larger shape, none of SmolLM2's.
DEQUANT_BITS_MIN_WEIGHTS = 1 << 22


def dequant_from_bits(slice_bits: Sequence[int], group_size: int, out_features: int, in_features: int) -> bool:
    """Whether a prompt's dequantize pass of this layer reads its one-bit plane buffers (:data:`DEQUANT_FROM_BITS`):
    only for layouts the buffers cover (:func:`bits_supported`)."""
    if DEQUANT_FROM_BITS is False or not bits_supported(slice_bits, group_size):
        return False
    return DEQUANT_FROM_BITS is True or out_features * in_features >= DEQUANT_BITS_MIN_WEIGHTS


def bitplane_linear_dequant(
    x2: torch.Tensor,
    planes: Sequence[torch.Tensor],
    scale: torch.Tensor,
    zero: torch.Tensor,
    slice_bits: Sequence[int],
    group_size: int,
    k,
    bias: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
    packed: BitPlanes | None = None,
) -> torch.Tensor:
    """Prefill: ``W_k`` by one Triton pass over its planes into a scratch buffer, then ``torch.matmul``
    (cuBLAS on CUDA), once per ``k`` present. A per-token ``k`` tensor costs one host synchronisation
    (the token count of each ``k``). ``scale`` / ``zero``: one pair or a pair per view (:func:`dequantize`).
    ``packed``: the layer's one-bit plane buffers, read instead of the planes (:func:`dequantize_bits`)."""
    M, K_IN = x2.shape
    N = scale.shape[-2]
    NS = len(slice_bits)
    _per_view(scale, zero, NS)
    if out is None:
        out = torch.empty(M, N, dtype=x2.dtype, device=x2.device)
    if M == 0:
        return out
    wbuf = torch.empty(N, K_IN, dtype=x2.dtype, device=x2.device)
    b = None if bias is None else bias.to(x2.dtype)

    def run(kk, xs, dst):
        if packed is not None:
            dequantize_bits(packed, kk, out=wbuf)
        else:
            dequantize(planes, scale, zero, slice_bits, group_size, kk, K_IN, dtype=x2.dtype, out=wbuf)
        if b is None:
            torch.matmul(xs, wbuf.t(), out=dst)
        else:
            torch.addmm(b, xs, wbuf.t(), out=dst)

    if isinstance(k, int):
        _check_k(k, NS)
        run(k, x2, out)
        return out
    kf = k.reshape(-1).to(x2.device)
    if kf.numel() != M:
        raise ValueError(f"k has {kf.numel()} entries for {M} tokens")
    counts = torch.bincount(kf.long(), minlength=NS + 1).tolist()
    if counts[0] or len(counts) > NS + 1:
        raise ValueError(f"per-token k must be in [1, {NS}]")
    present = [j for j in range(1, NS + 1) if counts[j]]
    if len(present) == 1:
        run(present[0], x2, out)
        return out
    for j in present:
        idx = (kf == j).nonzero(as_tuple=True)[0]
        part = torch.empty(idx.numel(), N, dtype=x2.dtype, device=x2.device)
        run(j, x2.index_select(0, idx), part)
        out.index_copy_(0, idx, part)
    return out


def bitplane_linear_tiled(
    x2: torch.Tensor,
    planes: Sequence[torch.Tensor],
    scale: torch.Tensor,
    zero: torch.Tensor,
    slice_bits: Sequence[int],
    group_size: int,
    k,
    bias: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
    config: TileConfig | None = None,
) -> torch.Tensor:
    """Dequantize-tile-then-``tl.dot``; per-token ``k`` by sorting tokens and one launch per ``k``. ``scale`` /
    ``zero``: one pair ``[out, groups]`` or a pair per view ``[len(slice_bits), out, groups]`` (each launch reads
    its view's)."""
    M, K_IN = x2.shape
    N = scale.shape[-2]
    NS = len(slice_bits)
    _per_view(scale, zero, NS)
    cfg = config or default_tile_config(M)
    if out is None:
        out = torch.empty(M, N, dtype=x2.dtype, device=x2.device)
    if M == 0:
        return out
    if isinstance(k, int):
        _check_k(k, NS)
        _tile_launch(x2, out, planes, scale, zero, slice_bits, group_size, k, bias, None, None, M, cfg)
        return out
    kf = k.reshape(-1)
    if kf.numel() != M:
        raise ValueError(f"k has {kf.numel()} entries for {M} tokens")
    present: Sequence[int] = range(1, NS + 1)
    if kf.device.type == "cpu" or not capturing(x2):  # launch only the k values present: free on the host, one
        # read of the device otherwise (a prompt's forward: the host, not the device, bounds it; a launch costs more)
        counts = torch.bincount(kf.long().clamp(0, NS + 1), minlength=NS + 2).tolist()
        if counts[0] or counts[NS + 1]:
            raise ValueError(f"per-token k must be in [1, {NS}]")
        present = [j for j in range(1, NS + 1) if counts[j]]
        if len(present) == 1:
            j = present[0]
            _tile_launch(x2, out, planes, scale, zero, slice_bits, group_size, j, bias, None, None, M, cfg)
            return out
    kd = kf.to(device=x2.device).long().clamp(1, NS)
    perm = torch.argsort(kd, stable=True).to(torch.int32)
    # seg[j]: the tokens with k <= j. Not a bincount: on CUDA it reads its output size from the device, which a
    # graph capture cannot do
    seg = (kd.reshape(-1, 1) <= torch.arange(NS + 1, device=x2.device)).sum(0).to(torch.int32)
    for j in present:
        _tile_launch(x2, out, planes, scale, zero, slice_bits, group_size, j, bias, perm, seg, M, cfg)
    return out


def dequantize(
    planes: Sequence[torch.Tensor],
    scale: torch.Tensor,
    zero: torch.Tensor,
    slice_bits: Sequence[int],
    group_size: int,
    k: int,
    in_features: int,
    dtype: torch.dtype = torch.float16,
    out: torch.Tensor | None = None,
    block_n: int = 32,
    block_k: int = 128,
    num_warps: int = 4,
) -> torch.Tensor:
    """``W_k`` ``[out, in]`` by one Triton pass over the first ``k`` planes. ``scale`` / ``zero``: one pair
    ``[out, groups]`` or a pair per view ``[len(slice_bits), out, groups]`` (view ``k`` reads ``scale[k - 1]``,
    ``zero[k - 1]``)."""
    _check_k(k, len(slice_bits))
    if _per_view(scale, zero, len(slice_bits)):
        scale, zero = _view_pair(scale, zero, k)
    scale, zero = scale.contiguous(), zero.contiguous()
    N = scale.shape[0]
    sh = _shifts(slice_bits)[k - 1]
    if out is None:
        out = torch.empty(N, in_features, dtype=dtype, device=scale.device)
    struct = [(_is_pow2(32 // b) and block_k % (32 // b) == 0) for b in slice_bits]
    struct += [False] * (MAX_SLICES - len(struct))
    grid = (triton.cdiv(N, block_n), triton.cdiv(in_features, block_k))
    _bp_dequant_kernel[grid](
        out,
        scale,
        zero,
        *_plane_args(planes),
        2.0**-sh,
        (1.0 - 2.0**-sh) / 2,
        N,
        in_features,
        scale.shape[1],
        GROUP=group_size,
        KSEL=k,
        **{f"B{i}": b for i, b in enumerate(_bits_args(slice_bits))},
        **{f"S{i}": s for i, s in enumerate(struct)},
        BLOCK_N=block_n,
        BLOCK_K=block_k,
        ROW_SCALE=group_size % block_k == 0,
        num_warps=num_warps,
    )
    return out


def dequantize_bits(
    packed: BitPlanes,
    k: int,
    dtype: torch.dtype = torch.float16,
    out: torch.Tensor | None = None,
    block_r: int = 32,
    block_w: int = 4,
    num_warps: int = 4,
) -> torch.Tensor:
    """``W_k`` ``[out, in]`` by one Triton pass over the first planes of view ``k`` of one-bit plane buffers
    (:class:`BitPlanes`): the same weights as :func:`dequantize` of the planes they were built from. ``block_r``
    row pairs (a power of two dividing 64) and ``block_w`` 16-column words (a power of two) a program. The default
    32 x 4 (4 warps) was the fastest of the shapes tried across views on the 8B shapes (H100, 2026-12-05:
    57-67% of copy bandwidth; 32 x 8 56-65%)."""
    _check_k(k, len(packed.slice_bits))
    if block_r & (block_r - 1) or not 1 <= block_r <= 64 or block_w & (block_w - 1) or block_w < 1:
        raise ValueError(f"block_r: a power of two up to 64, block_w: a power of two; got {block_r}, {block_w}")
    N, K = packed.out_features, packed.in_features
    if out is None:
        out = torch.empty(N, K, dtype=dtype, device=packed.words.device)
    if out.shape != (N, K) or not out.is_contiguous():
        raise ValueError(f"out must be a contiguous tensor of shape {(N, K)}, got {tuple(out.shape)}")
    sh = _shifts(packed.slice_bits)[k - 1]
    sz = packed.sz[k - 1] if packed.per_view else packed.sz
    _, KW, NPAD2 = packed.words.shape
    grid = (NPAD2 // block_r, triton.cdiv(KW, block_w))
    _bits_dequant_kernel[grid](
        out,
        packed.words,
        sz,
        2.0**-sh,
        (1.0 - 2.0**-sh) / 2,
        N,
        K,
        NPAD2,
        KW,
        sz.shape[1],
        P=planes_of_views(packed.slice_bits)[k - 1],
        GW=packed.group_size // 16,
        BR=block_r,
        BW=block_w,
        num_warps=num_warps,
    )
    return out


def _check_packed(packed: BitPlanes, slice_bits: tuple, group_size: int, N: int, scale: torch.Tensor) -> None:
    if (
        packed.slice_bits != slice_bits
        or packed.group_size != group_size
        or packed.out_features != N
        or packed.per_view != (scale.dim() == 3)
    ):
        raise ValueError("packed bit planes of another layout or layer")


def bitplane_linear(
    x: torch.Tensor,
    planes: Sequence[torch.Tensor],
    scale: torch.Tensor,
    zero: torch.Tensor,
    slice_bits: Sequence[int],
    group_size: int,
    k,
    bias: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
    small_config: SmallConfig | None = None,
    tile_config: TileConfig | None = None,
    path: str = "auto",
    packed: BitPlanes | None = None,
    span: tuple[int, int] | None = None,
    prologue: tuple | None = None,
    epilogue: Any = None,
) -> torch.Tensor:
    """``y = x W_k^T (+ bias)`` reading only the first ``k`` bit-planes; ``k`` int, per-token tensor or
    :class:`RoutedK` (a router's gate values and a threshold: counted in the kernel on the 'bits' path). ``span``:
    the views a per-token ``k`` lies in, known on the host (the 'bits' path compiles only those views' bodies,
    :func:`bitplane_linear_bits`; the other paths ignore it).

    ``path``: 'auto' (one token where :func:`wants_bitplanes`: 'bits'; on CUDA 'dequant' for one view from 2
    tokens and for per-token views from ``DEQUANT_MIN_TOKENS``; small-batch kernels for other <= 16 tokens when the
    layout allows; else tiles), 'bits' (one token
    from one-bit plane buffers: ``packed``, else built from ``planes`` and cached, :func:`bitplanes_for`),
    'small', 'tile' (fused dequantize-tile-then-dot) or 'dequant' (dequantize W_k, then cuBLAS; from ``packed``
    when given, :func:`dequantize_bits`). ``out``, if given, is a ``[tokens, out_features]`` buffer to write
    (contiguous rows).

    ``scale`` / ``zero``: fp16 ``[out, groups]`` (one pair for every view) or ``[len(slice_bits), out, groups]``
    (a pair per view: view ``k`` reads ``scale[k - 1]``, ``zero[k - 1]``), every path, every kind of ``k``.
    ``prologue`` (the 'bits' path only): ``x`` is the input of what makes the layer's input
    (:func:`bitplane_linear_bits`)."""
    slice_bits = tuple(int(b) for b in slice_bits)
    if not 1 <= len(slice_bits) <= MAX_SLICES or len(planes) != len(slice_bits):
        raise ValueError(f"need one plane per slice (1..{MAX_SLICES}), got {len(planes)} for {slice_bits}")
    if x.dtype not in _DT_CODES:
        raise TypeError(f"activations must be fp16, bf16 or fp32, got {x.dtype}")
    _per_view(scale, zero, len(slice_bits))  # shapes checked here, for every path
    K_IN = x.shape[-1]
    N = scale.shape[-2]
    lead = x.shape[:-1]
    x2 = x.reshape(-1, K_IN)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    M = x2.shape[0]
    routed = isinstance(k, RoutedK)
    if not isinstance(k, int) and not routed:
        if not torch.is_tensor(k):
            raise TypeError("k must be an int, a tensor of per-token slice counts or a RoutedK")
        if k.numel() == 1 and k.device.type == "cpu":
            k = int(k.reshape(()))
    if out is not None:
        if out.shape != (M, N) or out.stride(-1) != 1 or out.dtype != x.dtype:
            raise ValueError(f"out must be a row-contiguous {x.dtype} tensor of shape {(M, N)}")
    scale = scale.contiguous()
    zero = zero.contiguous()
    if path == "auto":
        small_ok = M <= 16 and small_supported(slice_bits, group_size, None, M > 1)
        # cuBLAS on a dequantized view: one view from 2 tokens, mixed ones from DEQUANT_MIN_TOKENS (a host read of
        # which views are present, so not while a graph is captured); measured, see DEQUANT_MIN_TOKENS
        deq_ok = x2.is_cuda and tile_config is None
        deq_ok = deq_ok and (isinstance(k, int) or (M >= DEQUANT_MIN_TOKENS and not capturing(x2)))
        if M == 1 and wants_bitplanes(slice_bits, group_size, small_config):
            path = "bits"
        elif deq_ok and M >= 2:
            path = "dequant"
        elif small_ok:
            path = "small"
        else:
            path = "tile"
    if routed and path != "bits":  # only the one-bit plane kernel counts the gate values itself
        k = k.counts()
    if (prologue is not None or epilogue is not None) and path != "bits":
        what = f"a {prologue[0]}" if prologue is not None else "an epilogue"
        raise ValueError(f"{what} in the launch needs the 'bits' path (one token), got path {path!r}")
    if path == "bits":
        if packed is None:
            packed = bitplanes_for(planes, scale, zero, slice_bits, group_size, K_IN)
        else:
            _check_packed(packed, slice_bits, group_size, N, scale)
        y = bitplane_linear_bits(
            x2, packed, k, bias, out, small_config, span if spans(small_config) else None, prologue, epilogue
        )
    elif path == "small":
        y = bitplane_linear_small(x2, planes, scale, zero, slice_bits, group_size, k, bias, out, small_config)
    elif path == "tile":
        y = bitplane_linear_tiled(x2, planes, scale, zero, slice_bits, group_size, k, bias, out, tile_config)
    elif path == "dequant":
        if packed is not None:
            _check_packed(packed, slice_bits, group_size, N, scale)
        y = bitplane_linear_dequant(x2, planes, scale, zero, slice_bits, group_size, k, bias, out, packed)
    else:
        raise ValueError(f"path must be 'auto', 'bits', 'small', 'tile' or 'dequant', got {path!r}")
    return y.reshape(*lead, N)


__all__ = [
    "BitPlanes",
    "RoutedK",
    "InLaunchRouter",
    "SiteBits",
    "SmallConfig",
    "TileConfig",
    "DEQUANT_MIN_TOKENS",
    "DEQUANT_BITS_MIN_WEIGHTS",
    "DEQUANT_FROM_BITS",
    "bitplane_linear",
    "bitplane_linear_bits",
    "bitplane_site_bits",
    "bitplane_linear_dequant",
    "bitplane_linear_small",
    "bitplane_linear_tiled",
    "default_tile_config",
    "bits_supported",
    "bitplanes_for",
    "dequant_from_bits",
    "dequantize",
    "dequantize_bits",
    "pack_bitplanes",
    "site_bitplanes",
    "wants_bitplanes",
    "small_config_or_default",
    "small_supported",
]

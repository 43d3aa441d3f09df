"""Fused token router: ``d -> hidden -> K-1`` MLP, gate values and each token's slice count in one launch.

For tokens ``x [M, d]`` and a router (:class:`mobiquant.nn.router.TokenRouter`) with ``W1 [H, d]``, ``b1``,
``W2 [K-1, H]``, ``b2``::

    s = W2 gelu(W1 x + b1) + b2                      (exact erf GELU, fp32 accumulation)
    v = cummin(s)                                    policy 'free'
    v = sigmoid(s) + 2 (K - 2 - e)                   policy 'adjacent' (slice e's band)
    k = 1 + #{e : v_e > tau}

``tau`` is read from a device tensor (the router's ``tau`` buffer, or a linear's own threshold), so a
CUDA graph captured once serves every budget: a budget change writes new thresholds, nothing else.

Grid ``(hidden blocks, token blocks)``: each program computes ``HB`` hidden units for up to ``BM`` tokens
(the first layer's weights are read once per token block, spread over many programs) and stores its
partial scores; the last program of a token block to take its ticket sums them, applies the policy,
writes ``k`` (int64) and the gate values (fp32), and resets its counter (self-resetting: no memset per
launch). Self-contained (torch and triton only), like :mod:`.triton_bitplane`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import torch
import triton
import triton.language as tl


@triton.jit
def _pdl_wait(ASM: tl.constexpr):
    """Programmatic dependent launch: wait until the kernel before this one in the stream has finished and its
    writes are visible (``griddepcontrol.wait``; a no-op in a launch without the attribute, and in the interpreter)."""
    if ASM:
        tl.inline_asm_elementwise("griddepcontrol.wait; // $0", "=r", [], dtype=tl.int32, is_pure=False, pack=1)


@triton.jit
def _pdl_launch_dependents(ASM: tl.constexpr):
    """Programmatic dependent launch: let the next kernel in the stream start its programs (they run up to their own
    :func:`_pdl_wait`) once every program of this one has come here (``griddepcontrol.launch_dependents``)."""
    if ASM:
        tl.inline_asm_elementwise(
            "griddepcontrol.launch_dependents; // $0", "=r", [], dtype=tl.int32, is_pure=False, pack=1
        )


@triton.jit
def _prefetch_l2(ptrs, ASM: tl.constexpr):
    """Ask L2 for the 128-byte lines at ``ptrs`` (``prefetch.global.L2``: no registers, nothing waits on it)."""
    if ASM:
        tl.inline_asm_elementwise(
            "prefetch.global.L2 [$1]; mov.u32 $0, 0;", "=r,l", [ptrs], dtype=tl.int32, is_pure=False, pack=1
        )


@triton.jit
def _min_fn(a, b):
    return tl.minimum(a, b)


@triton.jit
def _rows(x_ptr, toks, tmask, cols, cmask, stride_xm):
    """Columns ``cols`` of the rows ``toks`` of ``x`` (zeros outside the masks), in ``x``'s dtype."""
    return tl.load(
        x_ptr + toks[:, None].to(tl.int64) * stride_xm + cols[None, :], mask=tmask[:, None] & cmask[None, :], other=0.0
    )


@triton.jit
def _rms_scale(x_ptr, toks, tmask, D_IN, stride_xm, eps, BM: tl.constexpr, BD: tl.constexpr):
    """``1 / sqrt(mean(x^2) + eps)`` of each token's row (fp32), as ``LlamaRMSNorm`` computes it."""
    acc = tl.zeros((BM,), dtype=tl.float32)
    for d0 in range(0, D_IN, BD):
        cols = d0 + tl.arange(0, BD)
        x = _rows(x_ptr, toks, tmask, cols, cols < D_IN, stride_xm).to(tl.float32)
        acc += tl.sum(x * x, axis=1)
    return 1.0 / tl.sqrt(acc / D_IN + eps)


@triton.jit
def _normed(x, cols, cmask, rstd, nw_ptr, y_ptr, toks, smask, D_IN):
    """RMS-normalized rows ``weight * (x rstd).to(x's dtype)`` in ``y``'s dtype (``LlamaRMSNorm``), stored to
    ``y_ptr`` for the tokens of ``smask``."""
    xn = (x.to(tl.float32) * rstd[:, None]).to(x.dtype).to(tl.float32)
    w = tl.load(nw_ptr + cols, mask=cmask, other=0.0).to(tl.float32)
    y = (w[None, :] * xn).to(y_ptr.dtype.element_ty)
    tl.store(y_ptr + toks[:, None].to(tl.int64) * D_IN + cols[None, :], y, mask=smask[:, None] & cmask[None, :])
    return y


@triton.jit
def _silu_mul(x, cols, cmask, u_ptr, stride_xm, y_ptr, toks, tmask, smask, D_IN):
    """A gated MLP's product ``silu(x).to(x's dtype) * u`` in ``y``'s dtype (``LlamaMLP``: ``act_fn(gate) * up``;
    ``u`` read with ``x``'s row stride), stored to ``y_ptr`` for the tokens of ``smask``."""
    g = x.to(tl.float32)
    a = (g / (1.0 + tl.exp(-g))).to(x.dtype).to(tl.float32)
    u = _rows(u_ptr, toks, tmask, cols, cmask, stride_xm).to(tl.float32)
    y = (a * u).to(y_ptr.dtype.element_ty)
    tl.store(y_ptr + toks[:, None].to(tl.int64) * D_IN + cols[None, :], y, mask=smask[:, None] & cmask[None, :])
    return y


@triton.jit
def _prologue(x, cols, cmask, rstd, aux_ptr, y_ptr, toks, tmask, smask, D_IN, stride_xm, PRE: tl.constexpr):
    """The rows a router reads: ``x`` itself (``PRE`` 0), its RMS norm (1, :func:`_normed`, weight at ``aux_ptr``)
    or the gated product with ``aux_ptr``'s rows (2, :func:`_silu_mul`); 1 and 2 stored for ``smask``."""
    if PRE == 1:
        x = _normed(x, cols, cmask, rstd, aux_ptr, y_ptr, toks, smask, D_IN)
    elif PRE == 2:
        x = _silu_mul(x, cols, cmask, aux_ptr, stride_xm, y_ptr, toks, tmask, smask, D_IN)
    return x


@triton.jit
def _router_chunk(
    x_ptr, w1_ptr, toks, tmask, hrows, hmask, d0, c_hi, D_IN, stride_xm, aux_ptr, y_ptr, rstd, smask,
    BD: tl.constexpr, PRE: tl.constexpr,
):  # fmt: skip
    """Columns ``[d0, d0 + BD)`` (below ``c_hi``) of the rows :func:`_prologue` makes (stored for ``smask``), rounded to
    the router's dtype as the module does, ``[BM, BD]``, and of the first layer's rows ``hrows``, ``[HB, BD]``: fp32."""
    cols = d0 + tl.arange(0, BD)
    cmask = cols < c_hi
    x = _rows(x_ptr, toks, tmask, cols, cmask, stride_xm)
    x = _prologue(x, cols, cmask, rstd, aux_ptr, y_ptr, toks, tmask, smask, D_IN, stride_xm, PRE)
    x = x.to(w1_ptr.dtype.element_ty).to(tl.float32)
    w = tl.load(
        w1_ptr + hrows[:, None].to(tl.int64) * D_IN + cols[None, :], mask=hmask[:, None] & cmask[None, :], other=0.0
    ).to(tl.float32)
    return x, w


@triton.jit
def _router_part(
    x_ptr,
    w1_ptr,
    b1_ptr,
    w2_ptr,
    toks,
    tmask,
    pid_h,
    D_IN,
    H,
    stride_xm,
    aux_ptr,
    y_ptr,
    rstd,
    R: tl.constexpr,
    RP: tl.constexpr,
    HB: tl.constexpr,
    BM: tl.constexpr,
    BD: tl.constexpr,
    PRE: tl.constexpr,
    S: tl.constexpr = 1,
    DS: tl.constexpr = 0,
    pid_s=0,
    SOLO: tl.constexpr = False,
    UNROLL: tl.constexpr = 1,
):
    """Hidden units ``[pid_h HB, (pid_h + 1) HB)`` of tokens ``toks``: their share of the scores, ``[BM, RP]``
    (``W2[:, units] gelu(W1[units] x + b1[units])``) of the rows :func:`_prologue` makes of ``x`` (RMS scale
    ``rstd``), which the program of the first hidden units stores to ``y_ptr`` (with ``PRE`` 0: none). With
    ``S`` > 1 column splits: the pre-activations ``[BM, HB]`` of columns ``[pid_s DS, (pid_s + 1) DS)`` alone
    (the GELU and second layer wait for every split: :func:`_router_split_values`). ``SOLO`` (one program holds
    every hidden unit): the products accumulate per column lane over ``UNROLL`` chunks unrolled at a time (their
    weight loads in flight together) and are summed over the columns once, after the loop (no shuffles in it)."""
    hrows = pid_h * HB + tl.arange(0, HB)
    hmask = hrows < H
    smask = tmask & (toks * 0 + pid_h == 0)
    c_lo, c_hi = _split_cols(pid_s, D_IN, S, DS)
    if SOLO:
        lanes = tl.zeros((BM, HB, BD), dtype=tl.float32)
        for d0 in tl.range(c_lo, c_hi, BD, loop_unroll_factor=UNROLL):
            x, w = _router_chunk(
                x_ptr, w1_ptr, toks, tmask, hrows, hmask, d0, c_hi, D_IN, stride_xm, aux_ptr, y_ptr, rstd, smask, BD,
                PRE,
            )  # fmt: skip
            lanes += x[:, None, :] * w[None, :, :]
        acc = tl.sum(lanes, axis=2)
    else:
        acc = tl.zeros((BM, HB), dtype=tl.float32)
        for d0 in range(c_lo, c_hi, BD):
            x, w = _router_chunk(
                x_ptr, w1_ptr, toks, tmask, hrows, hmask, d0, c_hi, D_IN, stride_xm, aux_ptr, y_ptr, rstd, smask, BD,
                PRE,
            )  # fmt: skip
            acc += tl.sum(x[:, None, :] * w[None, :, :], axis=2)
    if S > 1:
        out = acc  # [BM, HB]
    else:
        out = _router_head(acc, hrows, hmask, b1_ptr, w2_ptr, H, R, RP)
    return out


@triton.jit
def _split_cols(pid_s, D_IN, S: tl.constexpr, DS: tl.constexpr):
    """The input columns ``[c_lo, c_hi)`` column split ``pid_s`` reads (``S`` splits of ``DS``; 1: all of them)."""
    c_lo = 0
    c_hi = D_IN
    if S > 1:
        c_lo = pid_s * DS
        c_hi = tl.minimum(c_lo + DS, D_IN)
    return c_lo, c_hi


@triton.jit
def _router_head(pre, units, umask, b1_ptr, w2_ptr, H, R: tl.constexpr, RP: tl.constexpr):
    """Scores ``[BM, RP]`` (without ``b2``) of hidden ``units`` from their first-layer sums ``pre [BM, units]``:
    ``W2[:, units] gelu(pre + b1[units])`` (exact erf GELU, fp32)."""
    h = pre + tl.load(b1_ptr + units, mask=umask, other=0.0).to(tl.float32)[None, :]
    h = 0.5 * h * (1.0 + tl.erf(h * 0.7071067811865476))
    r = tl.arange(0, RP)
    w2 = tl.load(w2_ptr + r[:, None] * H + units[None, :], mask=(r[:, None] < R) & umask[None, :], other=0.0)
    return tl.sum(h[:, None, :] * w2.to(tl.float32)[None, :, :], axis=2)


@triton.jit
def _router_values(
    part_ptr,
    base,
    b2_ptr,
    NPROG,
    R: tl.constexpr,
    RP: tl.constexpr,
    BM: tl.constexpr,
    NPP: tl.constexpr,
    ADJACENT: tl.constexpr,
):
    """Gate values ``[BM, RP]`` of a token block from the ``NPROG`` partial scores stored at ``part_ptr + base``
    (slot ``p`` at ``(p BM + token) RP``), summed in a fixed order: the policy's values (padding past ``R``)."""
    lm = tl.arange(0, BM)
    r = tl.arange(0, RP)
    p = tl.arange(0, NPP)
    offs = base + (p[:, None, None] * BM + lm[None, :, None]) * RP + r[None, None, :]
    parts = tl.load(part_ptr + offs, mask=(p < NPROG)[:, None, None], other=0.0, cache_modifier=".cg")
    s = tl.sum(parts, axis=0) + tl.load(b2_ptr + r, mask=r < R, other=0.0).to(tl.float32)[None, :]
    return _router_policy(s, R, RP, ADJACENT)


@triton.jit
def _router_policy(s, R: tl.constexpr, RP: tl.constexpr, ADJACENT: tl.constexpr):
    """The policy's gate values ``[BM, RP]`` of scores ``s`` (padding past ``R``)."""
    r = tl.arange(0, RP)
    if ADJACENT:
        band = 2.0 * (R - 1 - r).to(tl.float32)
        v = tl.sigmoid(s) + band[None, :]
    else:
        v = tl.associative_scan(s, 1, _min_fn)  # padded slices come after the real ones
    return v


@triton.jit
def _router_split_values(
    part_ptr,
    base,
    b1_ptr,
    w2_ptr,
    b2_ptr,
    S,
    H,
    R: tl.constexpr,
    RP: tl.constexpr,
    BM: tl.constexpr,
    SP: tl.constexpr,
    HP: tl.constexpr,
    ADJACENT: tl.constexpr,
):
    """Gate values ``[BM, RP]`` of a token block from the pre-activations of ``S`` column splits stored at
    ``part_ptr + base`` (split ``p``'s at ``(p BM + token) HP + unit``), summed in a fixed order, then the GELU and
    the second layer."""
    lm = tl.arange(0, BM)
    hu = tl.arange(0, HP)
    p = tl.arange(0, SP)
    offs = base + (p[:, None, None] * BM + lm[None, :, None]) * HP + hu[None, None, :]
    parts = tl.load(part_ptr + offs, mask=(p < S)[:, None, None] & (hu < H)[None, None, :], other=0.0,
                    cache_modifier=".cg")  # fmt: skip
    s = _router_head(tl.sum(parts, axis=0), hu, hu < H, b1_ptr, w2_ptr, H, R, RP)
    r = tl.arange(0, RP)
    s += tl.load(b2_ptr + r, mask=r < R, other=0.0).to(tl.float32)[None, :]
    return _router_policy(s, R, RP, ADJACENT)


@triton.jit
def _router_prefetch(w1_ptr, w2_ptr, pid_h, D_IN, H, R: tl.constexpr, RP: tl.constexpr, HB: tl.constexpr,
                     W1_LINE: tl.constexpr, ASM: tl.constexpr, c_lo, c_hi):  # fmt: skip
    """The 128-byte lines of the first layer's rows of hidden units ``[pid_h HB, (pid_h + 1) HB)`` (``W1_LINE``
    weights a line; columns ``c_lo .. c_hi``) and of the second layer's columns for them, asked of L2 (clamped to
    the last row / column)."""
    hrows = tl.minimum(pid_h * HB + tl.arange(0, HB), H - 1).to(tl.int64)
    lines = tl.arange(0, 128) * W1_LINE
    for d0 in range(c_lo, c_hi, 128 * W1_LINE):
        _prefetch_l2(w1_ptr + hrows[:, None] * D_IN + tl.minimum(d0 + lines, c_hi - 1)[None, :], ASM)
    _prefetch_l2(w2_ptr + tl.minimum(tl.arange(0, RP), R - 1)[:, None] * H + hrows[None, :], ASM)


@triton.jit
def _router_kernel(
    x_ptr,
    w1_ptr,
    b1_ptr,
    w2_ptr,
    b2_ptr,
    tau_ptr,
    part_ptr,
    lock_ptr,
    k_ptr,
    v_ptr,
    aux_ptr,
    y_ptr,
    eps,
    M,
    D_IN,
    H,
    stride_xm,
    R: tl.constexpr,
    RP: tl.constexpr,
    HB: tl.constexpr,
    BM: tl.constexpr,
    BD: tl.constexpr,
    NPROG: tl.constexpr,
    NPP: tl.constexpr,
    ADJACENT: tl.constexpr,
    PRE: tl.constexpr,
    PDL: tl.constexpr,
    ASM: tl.constexpr,
    W1_LINE: tl.constexpr,
    S: tl.constexpr = 1,
    DS: tl.constexpr = 0,
    SP: tl.constexpr = 1,
    HP: tl.constexpr = 1,
    BDR: tl.constexpr = 16,
    SOLO: tl.constexpr = False,
    UNROLL: tl.constexpr = 1,
    EARLY: tl.constexpr = False,
    TAIL: tl.constexpr = True,
):
    pid_s = tl.program_id(0) % S  # S column splits (1: every program reads all of them)
    pid_h = tl.program_id(0) // S
    pid_m = tl.program_id(1)
    if PDL:
        _pdl_launch_dependents(ASM)
    if PDL or EARLY:  # the weights asked of L2 before the inputs are read (with PDL: before the wait on the kernel
        # before); EARLY without PDL: their memory latency under the reads of the inputs and the RMS scale
        c_lo, c_hi = _split_cols(pid_s, D_IN, S, DS)
        _router_prefetch(w1_ptr, w2_ptr, pid_h, D_IN, H, R, RP, HB, W1_LINE, ASM, c_lo, c_hi)
    if PDL:
        _pdl_wait(ASM)
    lm = tl.arange(0, BM)
    toks = pid_m * BM + lm
    tmask = toks < M
    if PRE == 1:  # every program makes the rows it reads (the same code, the same values); the first stores them
        rstd = _rms_scale(x_ptr, toks, tmask, D_IN, stride_xm, eps, BM, BDR)
    else:
        rstd = tl.full((BM,), 1.0, tl.float32)
    r = tl.arange(0, RP)
    if SOLO:  # one program a token block holds every hidden unit: the values straight from its scores
        s = _router_part(
            x_ptr, w1_ptr, b1_ptr, w2_ptr, toks, tmask, pid_h, D_IN, H, stride_xm, aux_ptr, y_ptr, rstd, R, RP, HB,
            BM, BD, PRE, 1, 0, 0, True, UNROLL,
        )  # fmt: skip
        s += tl.load(b2_ptr + r, mask=r < R, other=0.0).to(tl.float32)[None, :]
        _router_emit(_router_policy(s, R, RP, ADJACENT), tau_ptr, k_ptr, v_ptr, toks, tmask, R, RP)
    else:
        part = _router_part(
            x_ptr, w1_ptr, b1_ptr, w2_ptr, toks, tmask, pid_h, D_IN, H, stride_xm, aux_ptr, y_ptr, rstd, R, RP, HB,
            BM, BD, PRE, S, DS, pid_s,
        )  # fmt: skip
        if S > 1:  # pre-activations [BM, HB] of this split's columns, at (split, token, unit)
            base = pid_m * SP * BM * HP
            hu = pid_h * HB + tl.arange(0, HB)
            tl.store(part_ptr + base + (pid_s * BM + lm[:, None]) * HP + hu[None, :], part, mask=(hu < HP)[None, :])
        else:
            base = pid_m * NPP * BM * RP
            tl.store(part_ptr + base + (pid_h * BM + lm[:, None]) * RP + r[None, :], part)
        if TAIL:  # else the partials are the launch's result (router_partials): its readers finish the router
            _router_tail(part_ptr, lock_ptr, base, pid_m, b1_ptr, w2_ptr, b2_ptr, tau_ptr, k_ptr, v_ptr, toks, tmask,
                         S, H, R, RP, BM, SP, HP, NPROG, NPP, ADJACENT)  # fmt: skip


@triton.jit
def _router_tail(part_ptr, lock_ptr, base, pid_m, b1_ptr, w2_ptr, b2_ptr, tau_ptr, k_ptr, v_ptr, toks, tmask, S, H,
                 R: tl.constexpr, RP: tl.constexpr, BM: tl.constexpr, SP: tl.constexpr, HP: tl.constexpr,
                 NPROG: tl.constexpr, NPP: tl.constexpr, ADJACENT: tl.constexpr):  # fmt: skip
    """The last program of a token block to take its ticket sums the block's partials (stored at ``part_ptr + base``),
    finishes the router and stores ``k`` and the gate values; it resets the ticket."""
    tl.debug_barrier()  # every thread's partial is stored before the release below
    ticket = tl.atomic_add(lock_ptr + pid_m, 1, sem="acq_rel")
    tl.debug_barrier()
    if ticket == NPROG * S - 1:
        if S > 1:
            v = _router_split_values(part_ptr, base, b1_ptr, w2_ptr, b2_ptr, S, H, R, RP, BM, SP, HP, ADJACENT)
        else:
            v = _router_values(part_ptr, base, b2_ptr, NPROG, R, RP, BM, NPP, ADJACENT)
        _router_emit(v, tau_ptr, k_ptr, v_ptr, toks, tmask, R, RP)
        tl.atomic_xchg(lock_ptr + pid_m, 0)  # self-resetting counter


@triton.jit
def _router_emit(v, tau_ptr, k_ptr, v_ptr, toks, tmask, R: tl.constexpr, RP: tl.constexpr):
    """Store the gate values ``v [BM, RP]`` of tokens ``toks`` and their slice counts ``1 + #{v > tau}``."""
    r = tl.arange(0, RP)
    tau = tl.load(tau_ptr).to(tl.float32)
    on = (v > tau) & (r < R)[None, :]
    k = 1 + tl.sum(on.to(tl.int32), axis=1)
    tl.store(k_ptr + toks, k.to(tl.int64), mask=tmask)
    tl.store(v_ptr + toks[:, None] * R + r[None, :], v, mask=tmask[:, None] & (r < R)[None, :])


def _interpreting() -> bool:
    import os

    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def _check_pdl(device: torch.device) -> None:
    """``SmallConfig.pdl`` needs ``griddepcontrol`` (compute capability 9.0 or later) where the launch is on a GPU."""
    if device.type == "cuda" and torch.cuda.get_device_capability(device) < (9, 0):
        cap = ".".join(map(str, torch.cuda.get_device_capability(device)))
        raise ValueError(f"pdl (programmatic dependent launch) needs compute capability 9.0 or later, got {cap}")


def one_token_shapes(d: int, n_hidden: int, r_out: int) -> dict[str, int]:
    """The fused router's block shapes for one token (shared with the one-bit plane kernel's router programs, so
    both compute the same gate values bit for bit): one hidden unit per program."""
    return dict(
        HB=1,
        BM=2,
        BD=max(16, min(1024, triton.next_power_of_2(d))),
        RP=max(2, triton.next_power_of_2(r_out)),
        NPP=max(2, triton.next_power_of_2(n_hidden)),
    )


#: The tiling whose gate values a router inside the one-bit plane launch (``RoutedK.router``) computes, bit for bit:
#: one hidden unit a program over whole rows (:func:`one_token_shapes`).
IN_LAUNCH_TILING = dict(hidden_per_program=1, num_warps=4, cols_per_program=0)


#: Input columns a program of the default tiling for one token (at most two rows: one token block) and for more:
#: rows wider than that split into ranges of that many columns, :data:`SPLIT_HIDDEN` hidden units a program; the
#: fastest measured (docs/RESULTS.md "Router launches: column splits").
SPLIT_COLS_ONE_TOKEN = 1024
SPLIT_COLS = 512
SPLIT_HIDDEN = 4


def default_tiling(d: int, tokens: int) -> dict[str, int]:
    """The launch's tiling where the caller names none, for inputs of width ``d`` and ``tokens`` rows: rows wider
    than :data:`SPLIT_COLS_ONE_TOKEN` (one or two tokens) or :data:`SPLIT_COLS` (more) split into column ranges of
    that many, :data:`SPLIT_HIDDEN` hidden units a program, 4 warps (on an H200 a LLaMA-3-8B router launch for one
    token took 4.5-5.5 us so against 6.0-14.2 us over whole rows); narrower rows whole, one hidden unit a program."""
    cols = SPLIT_COLS_ONE_TOKEN if tokens <= 2 else SPLIT_COLS
    if d > cols:
        return dict(hidden_per_program=SPLIT_HIDDEN, num_warps=4, cols_per_program=cols)
    return dict(IN_LAUNCH_TILING)


def _tiling(d: int, tokens: int, hidden_per_program, num_warps, cols_per_program) -> tuple[int, int, int]:
    """The tiling asked for, each ``None`` filled from :func:`default_tiling`."""
    t = default_tiling(d, tokens)
    return (
        t["hidden_per_program"] if hidden_per_program is None else hidden_per_program,
        t["num_warps"] if num_warps is None else num_warps,
        t["cols_per_program"] if cols_per_program is None else cols_per_program,
    )


#: A tiling of one program a token block (``hidden_per_program`` >= the router's hidden units, whole rows) computes
#: every score in that program, with no partial sums and no ticket: chunks of at most ``SOLO_TILE / (tokens x
#: units)`` columns, :data:`SOLO_UNROLL` of them unrolled (their weight loads in flight together). Built for narrow
#: routers (SmolLM2's 576 x 64: 74 KB of weights); not yet timed on a GPU, so no default tiling picks it.
SOLO_TILE = 8192
SOLO_UNROLL = 4

_LOCKS: dict[tuple, torch.Tensor] = {}


def _locks(device: torch.device, n: int) -> torch.Tensor:
    key = (device.type, device.index)
    buf = _LOCKS.get(key)
    if buf is None or buf.numel() < n:
        buf = torch.zeros(max(n, 64), dtype=torch.int32, device=device)
        _LOCKS[key] = buf
    return buf


#: What a router can read besides its input itself: the input's RMS norm, ``("rms_norm", weight, eps)``
#: (``LlamaRMSNorm``), or a gated MLP's product with it as the gate, ``("silu_mul", up)`` (``LlamaMLP``'s
#: ``act_fn(gate) * up`` with SiLU).
PROLOGUES = {"rms_norm": 1, "silu_mul": 2}


def prologue_operand(prologue: tuple, x: torch.Tensor) -> tuple[torch.Tensor, float, int]:
    """The operand (the norm's weight ``[d]``, or the up rows as given), epsilon and code (:data:`PROLOGUES`) that
    a launch reading tokens ``x`` ``[..., d]`` needs to make its input by ``prologue`` itself, checked: what does
    not fit is refused with what was wrong and what is allowed. Every kernel with a prologue asks this."""
    d = x.shape[-1]
    kind = prologue[0] if isinstance(prologue, tuple) and prologue else None
    if kind not in PROLOGUES or len(prologue) != (3 if kind == "rms_norm" else 2):
        raise ValueError(
            f"prologue {kind!r} is not one of {sorted(PROLOGUES)}: a prologue must be ('rms_norm', weight, eps > 0) "
            "or ('silu_mul', up)"
        )
    if kind == "rms_norm":
        _, weight, eps = prologue
        if not (torch.is_tensor(weight) and weight.shape == (d,) and weight.device == x.device):
            got = f"{tuple(weight.shape)} on {weight.device}" if torch.is_tensor(weight) else type(weight).__name__
            raise ValueError(f"an RMS norm in the launch: its norm weight must be [{d}] on {x.device}, got {got}")
        if not float(eps) > 0:
            raise ValueError(f"an RMS norm in the launch: eps must be positive, got {eps}")
        return weight.contiguous(), float(eps), PROLOGUES[kind]
    up = prologue[1]
    if not (torch.is_tensor(up) and up.numel() == x.numel() and up.shape[-1:] == x.shape[-1:]
            and up.device == x.device):  # fmt: skip
        got = f"{tuple(up.shape)} on {up.device}" if torch.is_tensor(up) else type(up).__name__
        raise ValueError(
            f"a gated product in the launch: its up rows must match the gate's {tuple(x.shape)} on {x.device}, "
            f"got {got}"
        )
    return up, 0.0, PROLOGUES[kind]


def fused_router(
    x: torch.Tensor,
    w1: torch.Tensor,
    b1: torch.Tensor,
    w2: torch.Tensor,
    b2: torch.Tensor,
    tau: torch.Tensor,
    policy: str = "free",
    hidden_per_program: int | None = None,
    num_warps: int | None = None,
    pdl: bool = False,
    cols_per_program: int | None = None,
    early_l2: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Slice counts ``k`` (int64, ``x.shape[:-1]``) and gate values (fp32, ``[..., K-1]``) of tokens ``x``.

    ``tau`` is a one-element tensor on ``x``'s device, read by the kernel (no host synchronisation).
    ``hidden_per_program``, ``num_warps`` and ``cols_per_program`` (below): the launch's tiling, each ``None``
    from :func:`default_tiling` (``benchmarks/router_launch_bench.py --sweep`` times others); another tiling sums
    in another order, so gate values may differ in the last bits. ``pdl``: launched with programmatic dependent
    launch (compute capability 9.0+): the programs start while the kernel before runs, ask L2 for their weights,
    and wait for it before reading anything it writes.
    ``cols_per_program``: each program reads that many input columns (rounded up to a power of two; the launch
    runs ``ceil(d / cols)`` column splits of every hidden block and the last program sums their pre-activations);
    0 or at least ``d``: whole rows, the GELU and second layer in every hidden block's program. ``early_l2``: each
    program asks L2 for its weights first, before it reads the inputs (as ``pdl`` does before its wait)."""
    k, v = _counted(_route(_Rows(x, None), (w1, b1, w2, b2), tau, policy, hidden_per_program, num_warps, pdl,
                           cols_per_program, early_l2))  # fmt: skip
    return k.reshape(x.shape[:-1]), v.reshape(*x.shape[:-1], -1)


def fused_input_router(
    x: torch.Tensor,
    prologue: tuple,
    router: Sequence[torch.Tensor],
    tau: torch.Tensor,
    policy: str,
    hidden_per_program: int | None = None,
    num_warps: int | None = None,
    pdl: bool = False,
    cols_per_program: int | None = None,
    early_l2: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The rows ``y`` that ``prologue`` (:data:`PROLOGUES`) makes of ``x`` and the router ``(w1, b1, w2, b2)`` on
    them, in one launch: ``(y, k, v)``, ``y`` with the arithmetic of the model's own modules (in the dtype of their
    result), ``k`` and ``v`` exactly those of :func:`fused_router` on ``y``. Every router program makes the rows it
    reads; the first stores them. ``hidden_per_program``, ``num_warps``, ``pdl``, ``cols_per_program``,
    ``early_l2``: as :func:`fused_router`'s."""
    rows = _Rows(x, prologue)
    k, v = _counted(_route(rows, tuple(router), tau, policy, hidden_per_program, num_warps, pdl, cols_per_program,
                           early_l2))  # fmt: skip
    assert rows.y is not None
    return rows.y.reshape(x.shape), k.reshape(x.shape[:-1]), v.reshape(*x.shape[:-1], -1)


def fused_input(x: torch.Tensor, prologue: tuple) -> torch.Tensor:
    """The rows ``prologue`` makes of ``x`` (:func:`fused_input_router`'s), in one launch and without a router."""
    rows = _Rows(x, prologue)
    if rows.M > 0:
        bm = max(2, min(16, triton.next_power_of_2(rows.M)))
        bd = max(16, min(1024 if bm <= 2 else 256, triton.next_power_of_2(rows.d)))
        _input_kernel[(triton.cdiv(rows.M, bm),)](
            rows.x2, rows.aux, rows.y, rows.eps, rows.M, rows.d, rows.x2.stride(0), BM=bm, BD=bd, PRE=rows.pre,
            num_warps=4,
        )  # fmt: skip
    assert rows.y is not None
    return rows.y.reshape(x.shape)


class _Rows:
    """A kernel's view of tokens ``x`` ``[..., d]`` as rows ``x2 [M, d]`` (unit column stride), with a prologue's
    operand ``aux`` (the norm weight, or the up rows with ``x2``'s row stride), epsilon and output rows ``y``."""

    def __init__(self, x: torch.Tensor, prologue: tuple | None):
        self.d = d = x.shape[-1]
        x2 = x.reshape(-1, d)  # read in its own dtype (the router rounds to its own; no copy, no launch)
        if x2.stride(-1) != 1:
            x2 = x2.contiguous()
        self.M = x2.shape[0]
        self.pre, self.aux, self.eps, self.y = 0, x2, 0.0, None
        if prologue is None:
            self.x2 = x2
            return
        operand, self.eps, self.pre = prologue_operand(prologue, x)
        if self.pre == PROLOGUES["rms_norm"]:
            self.aux, out_dtype = operand, torch.result_type(operand, x)
        else:
            u2 = operand.reshape(-1, d)
            if u2.stride() != x2.stride():  # one row stride for both (columns of one site launch share it)
                x2, u2 = x2.contiguous(), u2.contiguous()
            self.aux, out_dtype = u2, torch.result_type(x, operand)
        self.x2 = x2
        self.y = torch.empty(self.M, d, dtype=out_dtype, device=x.device)


@dataclasses.dataclass(frozen=True)
class RouterPartials:
    """A router launch's result without its tail (:func:`router_partials`): each column split's pre-activations of
    the hidden units, for their readers to finish the router (sum the splits, add ``b1``, GELU, the second layer,
    the policy) and count ``k`` against their own thresholds. Token ``t``'s split ``s`` holds unit ``u`` at
    ``part[(t // bm) * block + (s * bm + t % bm) * hp + u]`` (``block = sp * bm * hp``)."""

    part: torch.Tensor  # fp32, flat
    tokens: int
    splits: int
    sp: int  # split slots a token block (a power of 2, at least ``splits``)
    bm: int  # tokens a block
    hp: int  # unit slots a split (a power of 2, at least the hidden units)
    b1: torch.Tensor
    w2: torch.Tensor
    b2: torch.Tensor
    adjacent: bool  # policy 'adjacent' (else 'free')

    def pre_activations(self) -> torch.Tensor:
        """``W1 x`` of every token, ``[tokens, hidden]`` fp32: the splits summed in their order."""
        blocks = self.part.numel() // (self.sp * self.bm * self.hp)
        parts = self.part.view(blocks, self.sp, self.bm, self.hp)[:, : self.splits, :, : self.b1.numel()]
        pre = parts[:, 0]
        for s in range(1, self.splits):
            pre = pre + parts[:, s]
        return pre.reshape(blocks * self.bm, -1)[: self.tokens]

    def values(self) -> torch.Tensor:
        """The gate values ``[tokens, K-1]`` fp32, as the router's tail computes them (in another order: they may
        differ from the fused kernel's in the last bits)."""
        return finished_values(self.pre_activations(), self.b1, self.w2, self.b2, self.adjacent)


def finished_values(
    pre: torch.Tensor, b1: torch.Tensor, w2: torch.Tensor, b2: torch.Tensor, adjacent: bool
) -> torch.Tensor:
    """A router's gate values ``[tokens, K-1]`` fp32 from its first layer's pre-activations ``pre`` (``W1 x``,
    ``[tokens, hidden]`` fp32): ``b1``, the exact GELU, the second layer and the policy (``adjacent``: each slice's
    sigmoid in its band; else a running minimum), as the kernels that finish a router compute them."""
    h = pre + b1.float()
    h = 0.5 * h * (1.0 + torch.erf(h * 0.7071067811865476))
    s = h @ w2.float().t() + b2.float()
    if adjacent:
        r = s.shape[-1]
        band = 2.0 * torch.arange(r - 1, -1, -1, dtype=s.dtype, device=s.device)
        return torch.sigmoid(s) + band
    return torch.cummin(s, dim=-1).values


def _counted(result: tuple[torch.Tensor, torch.Tensor] | RouterPartials) -> tuple[torch.Tensor, torch.Tensor]:
    """``(k, v)`` of a launch with its tail."""
    assert not isinstance(result, RouterPartials)
    return result


def router_partials(
    x: torch.Tensor,
    router: Sequence[torch.Tensor],
    policy: str,
    prologue: tuple | None = None,
    hidden_per_program: int | None = None,
    num_warps: int | None = None,
    pdl: bool = False,
    cols_per_program: int | None = None,
    early_l2: bool = False,
) -> tuple[torch.Tensor | None, RouterPartials]:
    """The router ``(w1, b1, w2, b2)`` on tokens ``x`` (the rows ``prologue`` makes of them, as
    :func:`fused_input_router`'s, returned first; else None) without its tail: no ticket, no last program; the launch
    ends once every program has stored its column split's pre-activations. For rows split into columns (the default
    tiling for inputs wider than :data:`SPLIT_COLS_ONE_TOKEN`, or ``cols_per_program`` below their width)."""
    rows = _Rows(x, prologue)
    unread = router[0].reshape(-1)[:1]  # the threshold: not read without the tail
    part = _route(rows, tuple(router), unread, policy, hidden_per_program, num_warps, pdl, cols_per_program, early_l2,
                  tail=False)  # fmt: skip
    assert isinstance(part, RouterPartials)
    return (None if rows.y is None else rows.y.reshape(x.shape)), part


def _route(
    rows: _Rows,
    weights: tuple[torch.Tensor, ...],
    tau: torch.Tensor,
    policy: str,
    hidden_per_program: int | None,
    num_warps: int | None,
    pdl: bool = False,
    cols_per_program: int | None = None,
    early_l2: bool = False,
    tail: bool = True,
) -> tuple[torch.Tensor, torch.Tensor] | RouterPartials:
    hidden_per_program, num_warps, cols_per_program = _tiling(
        rows.d, rows.M, hidden_per_program, num_warps, cols_per_program
    )
    if policy not in ("free", "adjacent"):
        raise ValueError(f"router policy must be 'free' or 'adjacent', got {policy!r}")
    if num_warps not in (1, 2, 4, 8, 16):
        raise ValueError(f"num_warps={num_warps!r} is not one of 1, 2, 4, 8, 16")
    if int(hidden_per_program) < 1:
        raise ValueError(f"hidden_per_program={hidden_per_program!r} must be a positive integer")
    if int(cols_per_program) < 0:
        raise ValueError(f"cols_per_program={cols_per_program!r} must be 0 (whole rows) or a positive integer")
    w1, b1, w2, b2 = weights
    d, M, x2 = rows.d, rows.M, rows.x2
    n_hidden, r_out = w1.shape[0], w2.shape[0]
    if w1.shape[1] != d or w2.shape[1] != n_hidden or b1.numel() != n_hidden or b2.numel() != r_out:
        raise ValueError(f"router weights {tuple(w1.shape)}, {tuple(w2.shape)} do not fit inputs of width {d}")
    if tau.numel() != 1 or tau.device != x2.device:
        raise ValueError("tau must be a one-element tensor on the inputs' device")
    if pdl:
        _check_pdl(x2.device)
    if tail:  # without the tail the launch writes neither (their pointers then go unread)
        k = torch.empty(M, dtype=torch.int64, device=x2.device)
        v = torch.empty(M, r_out, dtype=torch.float32, device=x2.device)
    else:
        k = v = x2
    if M > 0:
        hb = triton.next_power_of_2(max(1, int(hidden_per_program)))
        nprog = triton.cdiv(n_hidden, hb)
        npp = max(2, triton.next_power_of_2(nprog))
        bm = max(2, min(16, triton.next_power_of_2(M)))
        bd = 1024 if bm <= 2 else (512 if bm <= 4 else 256)
        bd = max(16, min(bd, triton.next_power_of_2(d)))
        bdr = bd  # the RMS scale's chunk (the sum's order: one split keeps the values of before)
        rp = max(2, triton.next_power_of_2(r_out))
        m_blocks = triton.cdiv(M, bm)
        splits, ds, sp, hp = 1, 0, 1, 1
        if cols_per_program and cols_per_program < d:
            ds = max(16, triton.next_power_of_2(int(cols_per_program)))
            splits = triton.cdiv(d, ds)
            bd = min(bd, ds)
            bdr = max(16, min(4096 // bm, triton.next_power_of_2(d)))
            sp = max(2, triton.next_power_of_2(splits))
            hp = max(2, triton.next_power_of_2(nprog * hb))
            part = torch.empty(m_blocks * sp * bm * hp, dtype=torch.float32, device=x2.device)
        else:
            part = torch.empty(m_blocks * npp * bm * rp, dtype=torch.float32, device=x2.device)
        if not tail and splits < 2:
            raise ValueError(f"router partials are column splits' pre-activations: rows of {d} inputs split into none "
                             f"with cols_per_program={cols_per_program} (the default splits rows wider than "
                             f"{SPLIT_COLS_ONE_TOKEN})")  # fmt: skip
        solo = nprog * splits == 1  # every hidden unit in one program a token block: no ticket, no partial sums
        unroll = 1
        if solo:  # chunks small enough for [tokens, units, columns] in registers, a few in flight at once
            bd = max(16, min(bd, SOLO_TILE // (bm * hb)))
            unroll = max(1, min(SOLO_UNROLL, triton.cdiv(d, bd)))
        locks = _locks(x2.device, m_blocks)
        _router_kernel[(nprog * splits, m_blocks)](
            x2,
            w1.contiguous(),
            b1.contiguous(),
            w2.contiguous(),
            b2.contiguous(),
            tau.reshape(1),
            part,
            locks,
            k,
            v,
            rows.aux,
            x2 if rows.y is None else rows.y,
            rows.eps,
            M,
            d,
            n_hidden,
            x2.stride(0),
            R=r_out,
            RP=rp,
            HB=hb,
            BM=bm,
            BD=bd,
            NPROG=nprog,
            NPP=npp,
            ADJACENT=policy == "adjacent",
            PRE=rows.pre,
            PDL=bool(pdl),
            ASM=not _interpreting(),
            W1_LINE=128 // w1.element_size(),
            S=splits,
            DS=ds,
            SP=sp,
            HP=hp,
            BDR=bdr,
            SOLO=solo,
            UNROLL=unroll,
            EARLY=bool(early_l2),
            TAIL=tail,
            num_warps=num_warps,
            **({"launch_pdl": True} if pdl and not _interpreting() else {}),
        )
        if not tail:
            return RouterPartials(part, M, splits, sp, bm, hp, b1, w2, b2, policy == "adjacent")
    elif not tail:
        raise ValueError("router partials need at least one token")
    return k, v  # [M], [M, K-1]


@triton.jit
def _input_kernel(
    x_ptr, aux_ptr, y_ptr, eps, M, D_IN, stride_xm, BM: tl.constexpr, BD: tl.constexpr, PRE: tl.constexpr
):
    toks = tl.program_id(0) * BM + tl.arange(0, BM)
    tmask = toks < M
    if PRE == 1:
        rstd = _rms_scale(x_ptr, toks, tmask, D_IN, stride_xm, eps, BM, BD)
    else:
        rstd = tl.full((BM,), 1.0, tl.float32)
    for d0 in range(0, D_IN, BD):
        cols = d0 + tl.arange(0, BD)
        cmask = cols < D_IN
        x = _rows(x_ptr, toks, tmask, cols, cmask, stride_xm)
        _prologue(x, cols, cmask, rstd, aux_ptr, y_ptr, toks, tmask, tmask, D_IN, stride_xm, PRE)


__all__ = [
    "IN_LAUNCH_TILING",
    "PROLOGUES",
    "prologue_operand",
    "RouterPartials",
    "default_tiling",
    "fused_input",
    "fused_input_router",
    "fused_router",
    "router_partials",
]

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

from collections.abc import Sequence

import torch
import triton
import triton.language as tl


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
    nw_ptr,
    y_ptr,
    rstd,
    R: tl.constexpr,
    RP: tl.constexpr,
    HB: tl.constexpr,
    BM: tl.constexpr,
    BD: tl.constexpr,
    NORM: tl.constexpr,
):
    """Hidden units ``[pid_h HB, (pid_h + 1) HB)`` of tokens ``toks``: their share of the scores, ``[BM, RP]``
    (``W2[:, units] gelu(W1[units] x + b1[units])``); with ``NORM`` of the RMS-normalized rows (:func:`_normed`,
    scale ``rstd``), which the program of the first hidden units stores to ``y_ptr`` (without, those three unused)."""
    hrows = pid_h * HB + tl.arange(0, HB)
    hmask = hrows < H
    acc = tl.zeros((BM, HB), dtype=tl.float32)
    for d0 in range(0, D_IN, BD):
        cols = d0 + tl.arange(0, BD)
        cmask = cols < D_IN
        x = _rows(x_ptr, toks, tmask, cols, cmask, stride_xm)
        if NORM:
            x = _normed(x, cols, cmask, rstd, nw_ptr, y_ptr, toks, tmask & (toks * 0 + pid_h == 0), D_IN)
        x = x.to(w1_ptr.dtype.element_ty).to(tl.float32)  # rounded to the router's dtype, as the module does
        w = tl.load(
            w1_ptr + hrows[:, None].to(tl.int64) * D_IN + cols[None, :], mask=hmask[:, None] & cmask[None, :], other=0.0
        ).to(tl.float32)
        acc += tl.sum(x[:, None, :] * w[None, :, :], axis=2)
    h = acc + tl.load(b1_ptr + hrows, mask=hmask, other=0.0).to(tl.float32)[None, :]
    h = 0.5 * h * (1.0 + tl.erf(h * 0.7071067811865476))
    r = tl.arange(0, RP)
    w2 = tl.load(w2_ptr + r[:, None] * H + hrows[None, :], mask=(r[:, None] < R) & hmask[None, :], other=0.0).to(
        tl.float32
    )
    return tl.sum(h[:, None, :] * w2[None, :, :], axis=2)  # [BM, RP]


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
    if ADJACENT:
        band = 2.0 * (R - 1 - r).to(tl.float32)
        v = tl.sigmoid(s) + band[None, :]
    else:
        v = tl.associative_scan(s, 1, _min_fn)  # padded slices come after the real ones
    return v


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
    nw_ptr,
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
    NORM: tl.constexpr,
):
    pid_h = tl.program_id(0)
    pid_m = tl.program_id(1)
    lm = tl.arange(0, BM)
    toks = pid_m * BM + lm
    tmask = toks < M
    if NORM:  # every program normalizes the rows it reads (the same code, the same values); one stores them
        rstd = _rms_scale(x_ptr, toks, tmask, D_IN, stride_xm, eps, BM, BD)
    else:
        rstd = tl.full((BM,), 1.0, tl.float32)
    part = _router_part(
        x_ptr, w1_ptr, b1_ptr, w2_ptr, toks, tmask, pid_h, D_IN, H, stride_xm, nw_ptr, y_ptr, rstd, R, RP, HB,
        BM, BD, NORM,
    )  # fmt: skip
    r = tl.arange(0, RP)
    base = pid_m * NPP * BM * RP
    tl.store(part_ptr + base + (pid_h * BM + lm[:, None]) * RP + r[None, :], part)
    tl.debug_barrier()  # every thread's partial is stored before the release below
    ticket = tl.atomic_add(lock_ptr + pid_m, 1, sem="acq_rel")
    tl.debug_barrier()
    if ticket == NPROG - 1:
        v = _router_values(part_ptr, base, b2_ptr, NPROG, R, RP, BM, NPP, ADJACENT)
        tau = tl.load(tau_ptr).to(tl.float32)
        on = (v > tau) & (r < R)[None, :]
        k = 1 + tl.sum(on.to(tl.int32), axis=1)
        tl.store(k_ptr + toks, k.to(tl.int64), mask=tmask)
        tl.store(v_ptr + toks[:, None] * R + r[None, :], v, mask=tmask[:, None] & (r < R)[None, :])
        tl.atomic_xchg(lock_ptr + pid_m, 0)  # self-resetting counter


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


_LOCKS: dict[tuple, torch.Tensor] = {}


def _locks(device: torch.device, n: int) -> torch.Tensor:
    key = (device.type, device.index)
    buf = _LOCKS.get(key)
    if buf is None or buf.numel() < n:
        buf = torch.zeros(max(n, 64), dtype=torch.int32, device=device)
        _LOCKS[key] = buf
    return buf


def fused_router(
    x: torch.Tensor,
    w1: torch.Tensor,
    b1: torch.Tensor,
    w2: torch.Tensor,
    b2: torch.Tensor,
    tau: torch.Tensor,
    policy: str = "free",
    hidden_per_program: int = 1,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Slice counts ``k`` (int64, ``x.shape[:-1]``) and gate values (fp32, ``[..., K-1]``) of tokens ``x``.

    ``tau`` is a one-element tensor on ``x``'s device, read by the kernel (no host synchronisation)."""
    k, v, _ = _route(x, (w1, b1, w2, b2), tau, policy, hidden_per_program, None)
    return k, v


def fused_norm_router(
    x: torch.Tensor, weight: torch.Tensor, eps: float, router: Sequence[torch.Tensor], tau: torch.Tensor, policy: str
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``LlamaRMSNorm`` of ``x`` and the router ``(w1, b1, w2, b2)`` on its output in one launch: ``(y, k, v)``,
    ``y = weight * (x / sqrt(mean(x^2) + eps)).to(x.dtype)`` in the dtype of that product, and the slice counts
    and gate values of :func:`fused_router` on ``y`` (exactly those of ``fused_router(y, ...)``)."""
    if weight.shape != (x.shape[-1],) or weight.device != x.device:
        raise ValueError(f"norm weight {tuple(weight.shape)} does not fit inputs of width {x.shape[-1]}")
    k, v, y = _route(x, tuple(router), tau, policy, 1, (weight, float(eps)))
    assert y is not None
    return y, k, v


def _route(
    x: torch.Tensor,
    weights: tuple[torch.Tensor, ...],
    tau: torch.Tensor,
    policy: str,
    hidden_per_program: int,
    norm: tuple[torch.Tensor, float] | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    if policy not in ("free", "adjacent"):
        raise ValueError(f"router policy must be 'free' or 'adjacent', got {policy!r}")
    w1, b1, w2, b2 = weights
    d = x.shape[-1]
    n_hidden, r_out = w1.shape[0], w2.shape[0]
    if w1.shape[1] != d or w2.shape[1] != n_hidden or b1.numel() != n_hidden or b2.numel() != r_out:
        raise ValueError(f"router weights {tuple(w1.shape)}, {tuple(w2.shape)} do not fit inputs of width {d}")
    if tau.numel() != 1 or tau.device != x.device:
        raise ValueError("tau must be a one-element tensor on the inputs' device")
    lead = x.shape[:-1]
    x2 = x.reshape(-1, d)  # read in its own dtype, rounded to the router's in the kernel (no copy, no launch)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    M = x2.shape[0]
    k = torch.empty(M, dtype=torch.int64, device=x.device)
    v = torch.empty(M, r_out, dtype=torch.float32, device=x.device)
    y = None
    if norm is not None:
        y = torch.empty(M, d, dtype=torch.result_type(norm[0], x), device=x.device)
    if M > 0:
        hb = triton.next_power_of_2(max(1, int(hidden_per_program)))
        nprog = triton.cdiv(n_hidden, hb)
        npp = max(2, triton.next_power_of_2(nprog))
        bm = max(2, min(16, triton.next_power_of_2(M)))
        bd = 1024 if bm <= 2 else (512 if bm <= 4 else 256)
        bd = max(16, min(bd, triton.next_power_of_2(d)))
        rp = max(2, triton.next_power_of_2(r_out))
        m_blocks = triton.cdiv(M, bm)
        part = torch.empty(m_blocks * npp * bm * rp, dtype=torch.float32, device=x.device)
        locks = _locks(x.device, m_blocks)
        _router_kernel[(nprog, m_blocks)](
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
            w1 if norm is None else norm[0].contiguous(),
            w1 if y is None else y,
            0.0 if norm is None else norm[1],
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
            NORM=norm is not None,
            num_warps=4,
        )
    return k.reshape(lead), v.reshape(*lead, r_out), None if y is None else y.reshape(x.shape)


@triton.jit
def _rms_norm_kernel(x_ptr, nw_ptr, y_ptr, eps, M, D_IN, stride_xm, BM: tl.constexpr, BD: tl.constexpr):
    toks = tl.program_id(0) * BM + tl.arange(0, BM)
    tmask = toks < M
    rstd = _rms_scale(x_ptr, toks, tmask, D_IN, stride_xm, eps, BM, BD)
    for d0 in range(0, D_IN, BD):
        cols = d0 + tl.arange(0, BD)
        cmask = cols < D_IN
        x = _rows(x_ptr, toks, tmask, cols, cmask, stride_xm)
        _normed(x, cols, cmask, rstd, nw_ptr, y_ptr, toks, tmask, D_IN)


def rms_norm(x: torch.Tensor, norm_weight: torch.Tensor, eps: float) -> torch.Tensor:
    """``LlamaRMSNorm`` of ``x`` in one launch (the normalization of :func:`fused_norm_router`, without a router)."""
    d = x.shape[-1]
    if norm_weight.shape != (d,) or norm_weight.device != x.device:
        raise ValueError(f"norm weight {tuple(norm_weight.shape)} does not fit inputs of width {d}")
    x2 = x.reshape(-1, d)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    M = x2.shape[0]
    y = torch.empty(M, d, dtype=torch.result_type(norm_weight, x), device=x.device)
    if M > 0:
        bm = max(2, min(16, triton.next_power_of_2(M)))
        bd = max(16, min(1024 if bm <= 2 else 256, triton.next_power_of_2(d)))
        _rms_norm_kernel[(triton.cdiv(M, bm),)](
            x2, norm_weight.contiguous(), y, float(eps), M, d, x2.stride(0), BM=bm, BD=bd, num_warps=4
        )
    return y.reshape(x.shape)


__all__ = ["fused_norm_router", "fused_router", "rms_norm"]

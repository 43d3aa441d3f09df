"""Asking L2 for a later launch's weights while the launch before it runs.

A one-token GEMV of a small layer (the 8B q/k/v site, the o projection) is latency-bound: on an H100 it reads its
bytes at about a third of copy bandwidth, and the rest of the memory system idles for its 9-14 us. :func:`prefetch_l2`
is one short launch that asks L2 for every byte of up to two buffers (a layer's bit-plane words and its step/zero
words) and exits at once, without waiting for them: the requests stream in under the launches that follow, and the
layer, when its turn comes, finds its weights in L2 (50 MB on an H100 or H200) instead of memory.

Two ways of asking (``mode``): ``'line'``, one ``prefetch.global.L2::evict_last`` per 128-byte line, and ``'bulk'``,
one ``cp.async.bulk.prefetch.L2.global`` per 4 KiB chunk (sm_90: a Hopper card). Both are hints: nothing is written,
and a line evicted before its reader comes is read from memory as before. Triton's CPU interpreter runs the address
arithmetic without the requests (``record`` writes each request's byte offset instead, for the tests).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import interpreting

#: Bytes a request asks for: one 128-byte line, or a 4 KiB chunk of a bulk request.
CHUNK = {"line": 128, "bulk": 4096}
#: Requests a program issues (one a thread at 4 warps for lines; bulk chunks share the block).
BLOCK = 512


@triton.jit
def _request(base_ptr, offs, size, BULK: tl.constexpr, ASM: tl.constexpr):
    """Ask L2 for the bytes at ``base_ptr + offs`` (a line, or ``size`` bytes in bulk); nothing waits on it. The line
    request is ``triton_router._prefetch_l2``'s with the ``evict_last`` priority: these lines must outlive the
    launches streaming past them before their reader comes."""
    if ASM:
        if BULK:
            tl.inline_asm_elementwise(
                "cp.async.bulk.prefetch.L2.global [$1], $2; mov.u32 $0, 0;",
                "=r,l,r",
                [base_ptr + offs, size],
                dtype=tl.int32,
                is_pure=False,
                pack=1,
            )
        else:
            tl.inline_asm_elementwise(
                "prefetch.global.L2::evict_last [$1]; mov.u32 $0, 0;",
                "=r,l",
                [base_ptr + offs],
                dtype=tl.int32,
                is_pure=False,
                pack=1,
            )


@triton.jit
def _prefetch_kernel(a_ptr, a_last, a_progs, b_ptr, b_last, rec_ptr, CHUNK: tl.constexpr, BLOCK: tl.constexpr,
                     BULK: tl.constexpr, ASM: tl.constexpr, RECORD: tl.constexpr):  # fmt: skip
    """Programs ``[0, a_progs)`` ask for buffer ``a``'s chunks, the others for ``b``'s. ``*_last``: the byte offset of
    a buffer's last whole chunk; chunks past it are asked from there (a repeat, never past the buffer's end).
    ``RECORD``: each request's byte offset written to ``rec_ptr`` (``[programs * BLOCK]``, int64) instead."""
    pid = tl.program_id(0)
    in_a = pid < a_progs
    local = tl.where(in_a, pid, pid - a_progs)
    last = tl.where(in_a, a_last, b_last)
    offs = tl.minimum((local * BLOCK + tl.arange(0, BLOCK)).to(tl.int64) * CHUNK, last)
    if RECORD:
        tl.store(rec_ptr + pid * BLOCK + tl.arange(0, BLOCK), offs)
    else:
        size = tl.full([BLOCK], CHUNK, tl.int32)
        if in_a:
            _request(a_ptr, offs, size, BULK, ASM)
        else:
            _request(b_ptr, offs, size, BULK, ASM)


def _plan(t: torch.Tensor, chunk: int) -> tuple[int, int]:
    """``(last, programs)`` of buffer ``t``: the byte offset of its last whole chunk (16-byte aligned, as bulk
    requests need) and the programs that cover it."""
    nbytes = t.numel() * t.element_size()
    if nbytes < chunk:
        return 0, 0
    last = (nbytes - chunk) // 16 * 16
    return last, triton.cdiv(triton.cdiv(last, chunk) + 1, BLOCK)


def prefetch_l2(a: torch.Tensor, b: torch.Tensor | None = None, mode: str = "bulk", record: bool = False):
    """Ask L2 for every byte of ``a`` (and ``b``) in one launch that does not wait for them (see the module's
    docstring). Buffers smaller than one chunk are left alone. ``record``: returns the requests' byte offsets,
    ``a``'s then ``b``'s (padded with repeats of a buffer's last chunk), without asking (the tests' view of the
    addresses); else None."""
    if mode not in CHUNK:
        raise ValueError(f"prefetch_l2 mode {mode!r}: one of {sorted(CHUNK)}")
    if b is not None and b.device != a.device:
        raise ValueError(f"prefetch_l2 buffers on two devices: {a.device} and {b.device}")
    if not a.is_contiguous() or (b is not None and not b.is_contiguous()):
        raise ValueError("prefetch_l2 asks for contiguous buffers only")
    chunk = CHUNK[mode]
    a_last, a_progs = _plan(a, chunk)
    b_last, b_progs = _plan(b, chunk) if b is not None else (0, 0)
    progs = a_progs + b_progs
    if progs == 0:
        return torch.empty(0, dtype=torch.int64, device=a.device) if record else None
    rec = torch.empty(progs * BLOCK if record else 1, dtype=torch.int64, device=a.device)
    a8 = a.reshape(-1).view(torch.uint8)
    b8 = a8 if b is None else b.reshape(-1).view(torch.uint8)
    _prefetch_kernel[(progs,)](
        a8, a_last, a_progs, b8, b_last, rec, CHUNK=chunk, BLOCK=BLOCK, BULK=mode == "bulk",
        ASM=not interpreting() and a.is_cuda, RECORD=record, num_warps=4,
    )  # fmt: skip
    return rec if record else None

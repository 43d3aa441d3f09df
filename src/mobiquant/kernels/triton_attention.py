"""One launch for a decode step's attention: rotary embedding, cache write and attention over the static cache.

A Hugging Face LLaMA decode step runs its attention as several small launches a layer: the rotary embedding of
``q`` and ``k`` (casts, halves, products), the two writes of ``k`` and ``v`` into the static cache (``index_copy_``),
the key/value heads expanded to the query heads (grouped-query attention) and the attention itself. For one token
each is a launch of a microsecond or two. :func:`decode_attention` does all of it in one launch:

    q', k' = rope(q), rope(k)            (LLaMA's rotate-half form, from the model's ``cos`` and ``sin``)
    keys[:, :, pos], values[:, :, pos] = k', v
    out = softmax(scale * q' . keys[:, :, :pos + 1]) values[:, :, :pos + 1]     (each query head on its key head)

``pos`` is read on the device from the cache layer's write offset (transformers' ``StaticLayer.cumulative_length``),
and the last program to finish advances it by one (a ticket, self-resetting): a captured CUDA graph serves every
position, as the cache's own ``update`` does. Grid: one program per (row, query head); the programs of a key head's
query heads read its keys from L2 after the first. The current token's key and value enter the softmax from
registers (rounded to the cache's dtype as the cache holds them), so no program reads a slot another writes in the
same launch. An optional boolean mask ``[B, 1, 1, L]`` (sdpa's; True = attend) is honoured; positions past ``pos``
are never read. A cache of more than :data:`SPLIT_ABOVE` positions is split over programs of
:data:`SPLIT_POSITIONS` positions each on a second grid axis, each storing its partial softmax (running max, sum,
weighted values), and a second launch combines them and advances the offset (flash-decoding's split).
With ``pdl`` the launch (and the combining one) has the programmatic-dependent-launch attribute: its programs let
the next kernel start (the o projection's launch then loads its weights while the attention runs), then wait for the
kernel before them before reading anything. Torch and triton only, with the router module's ``griddepcontrol`` helpers.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .triton_router import _check_pdl, _interpreting, _pdl_launch_dependents, _pdl_wait

#: Cache positions a program reads per step of its loop, and its warps: the fastest of
#: ``benchmarks/attention_bench.py``'s sweep (positions a step 16-128 x warps 1-8) for LLaMA-3-8B's and SmolLM2's heads
#: at 80 and 1024 cached positions (H100, docs/RESULTS.md "The greedy pick timed; the attention launch's sweep").
BLOCK_N = 128
NUM_WARPS = 4
#: A cache of more positions than :data:`SPLIT_ABOVE` is split over programs of this many positions each (a second
#: launch combines them): 128, the fastest of ``benchmarks/attention_bench.py``'s splits (128 / 256 / 512) for both
#: head shapes at 512-2048 positions, 1.4-2.1x the unsplit launch and 1.45-1.95x the model's compiled attention
#: (H100, docs/RESULTS.md "The chain with a pause and each kind alone; grids of half the slots; the split attention
#: launch"). Caches of at most :data:`SPLIT_ABOVE` positions, where the one launch was timed fastest (80-150
#: positions), are not split.
SPLIT_POSITIONS = 128
SPLIT_ABOVE = 512
#: How a split launch's partials become the output: "launch", a second launch (timed, the default); "last", the last
#: split program of each query head combines them in the same launch (a ticket a head; one launch a layer fewer,
#: not yet timed: ``benchmarks/attention_bench.py --combine last``)
SPLIT_COMBINE = "launch"
_HEAD_TICKETS: dict[tuple[torch.device, int], torch.Tensor] = {}


@triton.jit
def _rope_table(c_ptr, s_ptr, pos, rope_scale, HALF: tl.constexpr, FROM_POS: tl.constexpr, DT: tl.constexpr):
    """This step's ``cos`` and ``sin`` halves (fp32): loaded (``c_ptr`` / ``s_ptr``: a row of ``HALF * 2`` values),
    or with ``FROM_POS`` made from the position as a Hugging Face LLaMA rotary embedding makes them (``c_ptr``: its
    ``inv_freq``, fp32; ``emb = pos * inv_freq`` twice over, ``cos(emb) * rope_scale`` rounded to ``DT``)."""
    d = tl.arange(0, HALF)
    if FROM_POS:
        f = pos.to(tl.float32) * tl.load(c_ptr + d)
        c = (tl.cos(f) * rope_scale).to(DT).to(tl.float32)
        sn = (tl.sin(f) * rope_scale).to(DT).to(tl.float32)
        return c, c, sn, sn
    c1 = tl.load(c_ptr + d).to(tl.float32)
    c2 = tl.load(c_ptr + HALF + d).to(tl.float32)
    s1 = tl.load(s_ptr + d).to(tl.float32)
    s2 = tl.load(s_ptr + HALF + d).to(tl.float32)
    return c1, c2, s1, s2


@triton.jit
def _rope_halves(x_ptr, c1, c2, s1, s2, HALF: tl.constexpr):
    """The two halves of ``x * cos + rotate_half(x) * sin`` (fp32) for one head of ``HALF * 2`` values."""
    d = tl.arange(0, HALF)
    x1 = tl.load(x_ptr + d).to(tl.float32)
    x2 = tl.load(x_ptr + HALF + d).to(tl.float32)
    return x1 * c1 - x2 * s1, x2 * c2 + x1 * s2


@triton.jit
def _decode_attention_kernel(
    q_ptr, k_ptr, v_ptr, cos_ptr, sin_ptr,  # q [B, H*D], k / v [B, KVH*D], cos / sin [B, D] (ROPE_POS: inv_freq)
    keys_ptr, values_ptr,  # the cache layer's [B, KVH, L, D] tensors (contiguous)
    off_ptr, ticket_ptr, mask_ptr, out_ptr,  # offset (0-dim int), ticket (int32), mask [B, L] (int8), out [B, H*D]
    part_ptr,  # SPLIT: each (row, head, split)'s running max, sum and weighted values [B*H*S, 2 + D] (fp32)
    heads_ptr,  # LAST: a ticket a (row, head) [B*H] (int32 zeros, left at 0)
    L, scale, cos_b, rope_scale,  # cos_b: cos / sin row stride (0: one row for the batch); ROPE_POS: the scaling
    H: tl.constexpr, KVH: tl.constexpr, HALF: tl.constexpr, BN: tl.constexpr, HAS_MASK: tl.constexpr,
    SPLIT: tl.constexpr, CHUNK: tl.constexpr,  # SPLIT: grid axis 1 splits the positions, CHUNK each
    LAST: tl.constexpr = False, SP: tl.constexpr = 1,  # LAST: the last split of a head combines (SP: splits, pow2)
    PDL: tl.constexpr = False, ASM: tl.constexpr = False,  # programmatic dependent launch (ASM: on a GPU)
    ROPE_POS: tl.constexpr = False,  # cos / sin made from the offset and inv_freq (_rope_table)
):  # fmt: skip
    if PDL:  # the next kernel may start now; nothing is read before the kernel before has finished
        _pdl_launch_dependents(ASM)
        _pdl_wait(ASM)
    pid = tl.program_id(0)
    sp = tl.program_id(1)
    b = pid // H
    h = pid % H
    kh = h // (H // KVH)
    D: tl.constexpr = 2 * HALF
    pos = tl.load(off_ptr).to(tl.int64)
    cs = b * cos_b
    c1, c2, s1, s2 = _rope_table(cos_ptr + cs, sin_ptr + cs, pos, rope_scale, HALF, ROPE_POS, q_ptr.dtype.element_ty)
    q1, q2 = _rope_halves(q_ptr + b * H * D + h * D, c1, c2, s1, s2, HALF)
    q1 = q1 * scale
    q2 = q2 * scale
    k1, k2 = _rope_halves(k_ptr + b * KVH * D + kh * D, c1, c2, s1, s2, HALF)
    d = tl.arange(0, HALF)
    vrow = v_ptr + b * KVH * D + kh * D
    v1 = tl.load(vrow + d)
    v2 = tl.load(vrow + HALF + d)
    head = (b * KVH + kh) * L * D  # this key head's slots
    k1 = k1.to(keys_ptr.dtype.element_ty)  # as the cache holds them
    k2 = k2.to(keys_ptr.dtype.element_ty)
    if (h % (H // KVH) == 0) & (sp == 0):  # one writer per key head
        slot = head + pos * D
        tl.store(keys_ptr + slot + d, k1)
        tl.store(keys_ptr + slot + HALF + d, k2)
        tl.store(values_ptr + slot + d, v1)
        tl.store(values_ptr + slot + HALF + d, v2)
    # the current token first: the running max, sum and weighted values start from it
    m_i = tl.sum(q1 * k1.to(tl.float32), 0) + tl.sum(q2 * k2.to(tl.float32), 0)
    self_ok = sp == 0  # the first split holds the current token
    if HAS_MASK:
        self_ok = self_ok & (tl.load(mask_ptr + b * L + pos) != 0)
    m_i = tl.where(self_ok, m_i, -1.0e30)
    l_i = tl.where(self_ok, 1.0, 0.0)
    acc1 = v1.to(tl.float32) * l_i
    acc2 = v2.to(tl.float32) * l_i
    n = tl.arange(0, BN)
    lo = sp * CHUNK  # this program's cached positions: [lo, hi) (without SPLIT, sp is 0 and hi is pos)
    hi = pos
    if SPLIT:
        hi = tl.minimum(pos, lo + CHUNK)
    for start in range(lo, hi, BN):
        offs = start + n
        ok = offs < hi
        if HAS_MASK:
            ok = ok & (tl.load(mask_ptr + b * L + offs, mask=ok, other=0) != 0)
        rows = head + offs[:, None] * D
        kb1 = tl.load(keys_ptr + rows + d[None, :], mask=ok[:, None], other=0.0).to(tl.float32)
        kb2 = tl.load(keys_ptr + rows + HALF + d[None, :], mask=ok[:, None], other=0.0).to(tl.float32)
        s = tl.sum(kb1 * q1[None, :], 1) + tl.sum(kb2 * q2[None, :], 1)
        s = tl.where(ok, s, -1.0e30)
        m_new = tl.maximum(m_i, tl.max(s, 0))
        alpha = tl.exp(m_i - m_new)
        p = tl.where(ok, tl.exp(s - m_new), 0.0)
        vb1 = tl.load(values_ptr + rows + d[None, :], mask=ok[:, None], other=0.0).to(tl.float32)
        vb2 = tl.load(values_ptr + rows + HALF + d[None, :], mask=ok[:, None], other=0.0).to(tl.float32)
        acc1 = acc1 * alpha + tl.sum(p[:, None] * vb1, 0)
        acc2 = acc2 * alpha + tl.sum(p[:, None] * vb2, 0)
        l_i = l_i * alpha + tl.sum(p, 0)
        m_i = m_new
    if SPLIT:  # the combine launch (or with LAST the head's last split) finishes the softmax, advances the offset
        part = part_ptr + (pid * tl.num_programs(1) + sp) * (2 + D)
        tl.store(part, m_i)
        tl.store(part + 1, l_i)
        tl.store(part + 2 + d, acc1)
        tl.store(part + 2 + HALF + d, acc2)
        if LAST:  # a ticket a head (acquire-release at GPU scope: the other splits' partials are visible after it)
            if tl.atomic_add(heads_ptr + pid, 1) == tl.num_programs(1) - 1:
                tl.store(heads_ptr + pid, 0)
                _combine_head(part_ptr, out_ptr, off_ptr, ticket_ptr, pid, tl.num_programs(1), pos, HALF, SP)
    else:
        _finish(out_ptr + b * H * D + h * D, acc1, acc2, l_i, d, HALF)
        _advance(off_ptr, ticket_ptr, pos)


@triton.jit
def _finish(o, acc1, acc2, l_i, d, HALF: tl.constexpr):
    """Store ``acc / l`` (a row with nothing to attend to reads zeros)."""
    inv = tl.where(l_i > 0, 1.0 / tl.maximum(l_i, 1.0e-30), 0.0)
    tl.store(o + d, (acc1 * inv).to(o.dtype.element_ty))
    tl.store(o + HALF + d, (acc2 * inv).to(o.dtype.element_ty))


@triton.jit
def _advance(off_ptr, ticket_ptr, pos):
    """The last program of the launch advances the write offset (every program has read it by then) and resets the
    ticket."""
    t = tl.atomic_add(ticket_ptr, 1)
    if t == tl.num_programs(0) - 1:
        tl.store(off_ptr, (pos + 1).to(off_ptr.dtype.element_ty))
        tl.store(ticket_ptr, 0)


@triton.jit
def _combine_head(part_ptr, out_ptr, off_ptr, ticket_ptr, pid, S, pos, HALF: tl.constexpr, SP: tl.constexpr):
    """The ``S`` splits of one (row, query head) ``pid`` into its output: the softmax's running maxima rescaled to
    their largest; then the launch's ticket (the last head advances the offset)."""
    D: tl.constexpr = 2 * HALF
    j = tl.arange(0, SP)
    d = tl.arange(0, HALF)
    rows = part_ptr + (pid * S + j) * (2 + D)
    m = tl.load(rows, mask=j < S, other=-1.0e30)
    scale = tl.where(j < S, tl.exp(m - tl.max(m, 0)), 0.0)  # empty splits hold -1e30 and 0: weight 0
    l_i = tl.sum(scale * tl.load(rows + 1, mask=j < S, other=0.0), 0)
    part = rows[:, None] + 2 + d[None, :]
    acc1 = tl.sum(scale[:, None] * tl.load(part, mask=(j < S)[:, None], other=0.0), 0)
    acc2 = tl.sum(scale[:, None] * tl.load(part + HALF, mask=(j < S)[:, None], other=0.0), 0)
    _finish(out_ptr + pid * D, acc1, acc2, l_i, d, HALF)
    _advance(off_ptr, ticket_ptr, pos)


@triton.jit
def _combine_kernel(
    part_ptr, out_ptr, off_ptr, ticket_ptr, S, HALF: tl.constexpr, SP: tl.constexpr,
    PDL: tl.constexpr = False, ASM: tl.constexpr = False,  # as the split launch before it
):  # fmt: skip
    """The splits of one (row, query head) into its output: the softmax's running maxima rescaled to their largest."""
    if PDL:  # the next kernel may start now; the splits are read once the split launch has finished
        _pdl_launch_dependents(ASM)
        _pdl_wait(ASM)
    pos = tl.load(off_ptr).to(tl.int64)
    _combine_head(part_ptr, out_ptr, off_ptr, ticket_ptr, tl.program_id(0), S, pos, HALF, SP)


def supported(head_dim: int, num_heads: int, num_kv_heads: int) -> str | None:
    """Why :func:`decode_attention` cannot serve these heads, or None."""
    if head_dim < 4 or head_dim & (head_dim - 1):
        return f"head_dim must be a power of two >= 4, got {head_dim}"
    if num_kv_heads < 1 or num_heads % num_kv_heads:
        return f"the query heads ({num_heads}) must be a multiple of the key/value heads ({num_kv_heads})"
    return None


def decode_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cos: torch.Tensor | None,
    sin: torch.Tensor | None,
    keys: torch.Tensor,
    values: torch.Tensor,
    offset: torch.Tensor,
    ticket: torch.Tensor | None,
    scale: float,
    mask: torch.Tensor | None = None,
    backend: str = "triton",
    block_n: int | None = None,
    num_warps: int | None = None,
    split_positions: int | None = None,
    split_above: int | None = None,
    pdl: bool = False,
    combine: str | None = None,
    rope: tuple[torch.Tensor, float] | None = None,
) -> torch.Tensor:
    """One decode step's attention for one layer (module docstring): ``q [B, H*D]``, ``k`` / ``v [B, KVH*D]``
    (this token's projections, before the rotary embedding), ``cos`` / ``sin [B, D]`` (or ``[1, D]`` for every
    row), the cache layer's ``keys`` / ``values [B, KVH, L, D]`` (written at ``offset``, which is then advanced by
    one), ``ticket`` an int32 device scalar left at 0, ``mask`` None or bool ``[B, 1, 1, L]``. Returns
    ``[B, H*D]`` in ``q``'s dtype. ``backend='torch'``: the same in PyTorch (the tests' reference). ``block_n``
    positions a program reads per step (None: :data:`BLOCK_N`), ``num_warps`` its warps (:data:`NUM_WARPS`); a cache
    of more than ``split_above`` positions (:data:`SPLIT_ABOVE`; 0: any cache of more than one split) is split over
    programs of ``split_positions`` positions each (:data:`SPLIT_POSITIONS`, rounded up to whole loop steps), their
    partial softmaxes combined by a second launch, or with ``combine`` "last" by the last split of each head
    (:data:`SPLIT_COMBINE`; ``benchmarks/attention_bench.py`` times them). ``pdl``: launched with programmatic
    dependent launch (compute capability 9.0+; module docstring). ``rope = (inv_freq, scaling)`` with ``cos`` and
    ``sin`` None: the launch makes them from the offset, as a Hugging Face LLaMA rotary embedding makes them from a
    position (``inv_freq`` fp32 ``[D / 2]``; every row at the offset)."""
    B, kvh, L, D = keys.shape
    H = q.shape[-1] // D
    why = supported(D, H, kvh)
    if why is not None:
        raise ValueError(f"decode_attention: {why}")
    if q.shape != (B, H * D) or k.shape != (B, kvh * D) or v.shape != (B, kvh * D):
        raise ValueError(
            f"decode_attention: q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)} do not match the cache "
            f"{tuple(keys.shape)} (expected [B, H*D] and [B, KVH*D] with B={B}, KVH={kvh}, D={D})"
        )
    if values.shape != keys.shape or not (keys.is_contiguous() and values.is_contiguous()):
        raise ValueError("decode_attention: keys and values must be contiguous tensors of one shape [B, KVH, L, D]")
    if (cos is None) != (sin is None) or (cos is None) == (rope is None):
        raise ValueError("decode_attention: give cos and sin, or rope=(inv_freq, scaling) with neither")
    if rope is not None:
        inv = rope[0]
        if inv.dtype != torch.float32 or inv.numel() != D // 2 or inv.device != q.device:
            raise ValueError(f"decode_attention: rope's inv_freq must be fp32 [{D // 2}] on {q.device}, got "
                             f"{inv.dtype} {tuple(inv.shape)} on {inv.device}")  # fmt: skip
        if backend == "torch":
            cos, sin = rope_from_offset(inv, float(rope[1]), offset, q.dtype)
    elif cos is None or sin is None or cos.shape[-1] != D or cos.numel() not in (D, B * D) or sin.shape != cos.shape:
        raise ValueError(
            f"decode_attention: cos / sin must hold [B, D] = [{B}, {D}] or [1, D] values, got "
            f"{None if cos is None else tuple(cos.shape)}"
        )
    rows = 1 if cos is None else cos.numel() // D
    m = None
    if mask is not None:
        if mask.dtype != torch.bool or mask.numel() != B * L:
            raise ValueError(f"decode_attention: mask must be bool [B, 1, 1, L] = [{B}, 1, 1, {L}], got {mask.dtype} "
                             f"{tuple(mask.shape)}")  # fmt: skip
        m = mask.reshape(B, L).contiguous().view(torch.int8)  # an expanded mask: one row per batch row
    if backend == "torch":
        assert cos is not None and sin is not None
        return _torch_attention(q, k, v, cos, sin, keys, values, offset, scale, mask)
    if backend != "triton" or ticket is None:
        raise ValueError(f"decode_attention: backend must be 'triton' (with a ticket) or 'torch', got {backend!r}")
    block_n = BLOCK_N if block_n is None else block_n
    num_warps = NUM_WARPS if num_warps is None else num_warps
    split_positions = SPLIT_POSITIONS if split_positions is None else split_positions
    split_above = SPLIT_ABOVE if split_above is None else split_above
    for name, val in (("block_n", block_n), ("split_positions", split_positions)):
        if isinstance(val, bool) or not isinstance(val, int) or val < 1:
            raise ValueError(f"decode_attention: {name} must be a positive integer, got {val!r}")
    if block_n & (block_n - 1):
        raise ValueError(f"decode_attention: block_n must be a power of two, got {block_n}")
    combine = SPLIT_COMBINE if combine is None else combine
    if combine not in ("launch", "last"):
        raise ValueError(f"decode_attention: combine must be 'launch' or 'last', got {combine!r}")
    if pdl:
        _check_pdl(q.device)
    asm = not _interpreting()
    launch = {"launch_pdl": True} if pdl and asm else {}  # both launches' attribute
    out = torch.empty_like(q)
    chunk = -(-split_positions // block_n) * block_n  # whole steps of the loop
    splits = -(-L // chunk) if L > max(chunk, split_above) else 1
    part = torch.empty(B * H * splits, 2 + D, dtype=torch.float32, device=q.device) if splits > 1 else out
    last = splits > 1 and combine == "last"
    heads = _head_tickets(q.device, B * H) if last else ticket
    if rope is not None:  # the kernel makes cos and sin: inv_freq in their place
        c, sn, rope_scale = rope[0].contiguous(), rope[0], float(rope[1])
    else:
        assert cos is not None and sin is not None
        c, sn, rope_scale = cos.reshape(rows, D).contiguous(), sin.reshape(rows, D).contiguous(), 1.0
    _decode_attention_kernel[(B * H, splits)](
        q.contiguous(), k.contiguous(), v.contiguous(), c, sn, keys, values, offset, ticket,
        m if m is not None else q, out, part, heads, L, float(scale), 0 if rows == 1 else D, rope_scale, H=H,
        KVH=kvh, HALF=D // 2, BN=block_n, HAS_MASK=m is not None, SPLIT=splits > 1, CHUNK=chunk, LAST=last,
        SP=triton.next_power_of_2(splits), PDL=pdl, ASM=asm and pdl, ROPE_POS=rope is not None,
        num_warps=num_warps, **launch,
    )  # fmt: skip
    if splits > 1 and not last:
        _combine_kernel[(B * H,)](
            part, out, offset, ticket, splits, HALF=D // 2, SP=triton.next_power_of_2(splits), PDL=pdl,
            ASM=asm and pdl, **launch,
        )  # fmt: skip
    return out


def rope_from_offset(
    inv_freq: torch.Tensor, scaling: float, offset: torch.Tensor, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """``cos``, ``sin [1, D]`` at the position ``offset`` holds, as a Hugging Face LLaMA rotary embedding makes them
    (``emb = cat(pos * inv_freq, pos * inv_freq)`` in fp32, ``cos(emb) * scaling`` in ``dtype``): the PyTorch form
    of ``decode_attention(rope=...)``."""
    freqs = offset.reshape(1, 1).float() * inv_freq.float().reshape(1, -1)
    emb = torch.cat((freqs, freqs), dim=-1)
    return (emb.cos() * scaling).to(dtype), (emb.sin() * scaling).to(dtype)


def _head_tickets(device: torch.device, n: int) -> torch.Tensor:
    """``n`` int32 zeros on ``device`` for the per-head tickets of ``combine="last"``, kept per device and count:
    every launch leaves them at 0, and launches of one stream never run their tickets at once (a launch started
    early under ``pdl`` waits for the one before before it takes any)."""
    key = (device, n)
    if key not in _HEAD_TICKETS:
        _HEAD_TICKETS[key] = torch.zeros(n, dtype=torch.int32, device=device)
    return _HEAD_TICKETS[key]


def _torch_attention(q, k, v, cos, sin, keys, values, offset, scale, mask) -> torch.Tensor:
    """:func:`decode_attention` in PyTorch (writes the cache and advances ``offset`` the same way)."""
    B, kvh, L, D = keys.shape
    H = q.shape[-1] // D

    def rope(x: torch.Tensor) -> torch.Tensor:
        c, s = cos.reshape(-1, 1, D).float(), sin.reshape(-1, 1, D).float()
        x = x.float()
        half = torch.cat((-x[..., D // 2 :], x[..., : D // 2]), -1)
        return x * c + half * s

    pos = int(offset)
    qr = rope(q.reshape(B, H, D))
    keys[:, :, pos] = rope(k.reshape(B, kvh, D)).to(keys.dtype)
    values[:, :, pos] = v.reshape(B, kvh, D).to(values.dtype)
    kk = keys[:, :, : pos + 1].float().repeat_interleave(H // kvh, 1)
    vv = values[:, :, : pos + 1].float().repeat_interleave(H // kvh, 1)
    s = torch.einsum("bhd,bhld->bhl", qr * scale, kk)
    if mask is not None:
        s = s.masked_fill(~mask.reshape(B, 1, L)[..., : pos + 1], float("-inf"))
    p = torch.softmax(s, -1).nan_to_num(0.0)
    offset.add_(1)
    return torch.einsum("bhl,bhld->bhd", p, vv).reshape(B, H * D).to(q.dtype)

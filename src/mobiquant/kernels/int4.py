"""Packed views through ATen's weight-only int4 matmuls: decode that reads 4 or 8 bits a weight instead of a dense
16-bit view's.

On the CPU ``_weight_int4pack_mm_for_cpu`` serves bf16 decode (at most :data:`MAX_TOKENS` tokens); on CUDA
``_weight_int4pack_mm`` (the tinygemm kernels) serves forwards of 2 to ``SmallConfig.int4_tokens`` tokens (default
:data:`CUDA_TOKENS`; 0 turns it off), its activations cast to bf16 and back. Both read 4-bit codes ``q`` as
``(q - 8) scale + zero`` per group of ``g`` inputs (``g`` 32-256) and output row. A view of the package reads
``W_k = a C_k + b`` per row and group (``a = s / 2^B``, ``b = -a (2^B z + (2^B - 1) / 2)``,
:func:`mobiquant.kernels.dequantize_reference`), so:

* a view of at most 4 bits is one int4 matmul of its codes;
* a view of 5-8 bits is two: its top 4 bits ``H = C_k >> r`` and the ``r = bits - 4`` bits below them ``L``
  (``C_k = 2^r H + L``), read with steps ``2^r a`` and ``a``, the offset ``b`` with ``H``.

A code ``c`` of ``w`` bits is packed as ``c + 8 - 2^(w - 1)``, centred on the op's 8, so that the op's ``zero``
(``offset + 2^(w - 1) scale``) stays near the group's centre, where bf16 holds it finely.

The codes are windows of the layer's full code (views are its prefixes), so the top-4-bit window is one pack shared
by every view of 4 bits or more. Packs are built on a view's first use and kept by the layer
(:class:`Int4Views`). Measured on this project's 2-core CPU (docs/RESULTS.md "Decode on the CPU"), the CUDA op alone
on the 8B shapes on an H200 (docs/RESULTS.md "Prompts on the GPU") and beside the package's own path on an H100
(docs/RESULTS.md "Prompts, the stack and SmolLM2 on an H100").
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

#: the int4 op's group sizes, largest first
_OP_GROUPS = (256, 128, 64, 32)
#: Tokens a forward may hold to take the int4 matmuls: decode and small batches. Above it the dense view's GEMM
#: is as fast or faster: on this project's 2-core CPU, SmolLM2's shapes (576 x 1536, 1536 x 576, 192 x 576), the dense
#: bf16 matmul took 1.5-3.7x the int4 op's time at 1-4 tokens, 0.8-2.4x at 6-12, 0.4-0.6x at 64-2048 (a prefill, an
#: evaluation window)
MAX_TOKENS = 4
#: On CUDA, the default of ``SmallConfig.int4_tokens`` (also for a layer with no ``small_config``): forwards of 2 to
#: this many tokens take the op. On an H100 (docs/RESULTS.md "Prompts, the stack and SmolLM2 on an H100") it took
#: 0.16-0.75x the time of the package's own path at 2-16 tokens on the 8B and SmolLM2 shapes; at 64 tokens
#: dequantize-then-cuBLAS was faster.
CUDA_TOKENS = 16


_AVAILABLE: bool | None = None


def available(device_type: str = "cpu") -> bool:
    """Whether this torch has the int4 weight-only matmul for ``device_type`` ('cpu', checked once; 'cuda': the op
    and a CUDA device)."""
    global _AVAILABLE
    ops = torch.ops.aten
    if device_type == "cuda":
        return hasattr(ops, "_weight_int4pack_mm") and torch.cuda.is_available()
    if _AVAILABLE is None:
        _AVAILABLE = hasattr(ops, "_weight_int4pack_mm_for_cpu") and hasattr(ops, "_convert_weight_to_int4pack_for_cpu")
    return _AVAILABLE


def op_group(in_features: int, group_size: int) -> int | None:
    """The op's group: the largest of 256, 128, 64, 32 dividing both the inputs and the layer's group size (each of
    the layer's groups is then whole sub-groups of the op's); None when none does."""
    for g in _OP_GROUPS:
        if in_features % g == 0 and group_size % g == 0:
            return g
    return None


def layer_fits(out_features: int, in_features: int, group_size: int, view_bits: int, device_type: str = "cpu") -> bool:
    """The layer's part of :func:`usable` (fixed for a layer, so a layer keeps it): rows a multiple of 16, inputs
    and group size sharing a group of 32-256 (on CUDA the op's K tiles then fit too: a multiple of 32), a view of at
    most 8 bits, and the op present for ``device_type``."""
    fits = out_features % 16 == 0 and view_bits <= 8 and op_group(in_features, group_size) is not None
    return fits and available(device_type)


def cuda_input_fits(x: torch.Tensor, max_tokens: int) -> bool:
    """The input's part on CUDA: fp16 or bf16 on a CUDA device, 2 to ``max_tokens`` tokens (a layer's
    ``SmallConfig.int4_tokens``; one token stays on the package's kernels, faster there), no gradient asked. Under a
    graph capture the caller decides (``MoBiLinear._int4_serves``: only packs built before the capture, since a pack
    built under it would live in the graph's memory)."""
    n = x.numel() // max(x.shape[-1], 1)
    return (
        x.is_cuda
        and x.dtype in (torch.float16, torch.bfloat16)
        and 2 <= n <= max_tokens
        and not (torch.is_grad_enabled() and x.requires_grad)
    )


def input_fits(x: torch.Tensor) -> bool:
    """The input's part of :func:`usable`: bf16 on the CPU, at most :data:`MAX_TOKENS` tokens, no gradient asked."""
    return (
        x.dtype == torch.bfloat16
        and x.numel() <= MAX_TOKENS * x.shape[-1]
        and x.device.type == "cpu"
        and not (torch.is_grad_enabled() and x.requires_grad)
    )


def usable(x: torch.Tensor, out_features: int, in_features: int, group_size: int, view_bits: int) -> bool:
    """Whether ``x W^T`` of a view of ``view_bits`` bits can take the int4 op: a bf16 input on the CPU of at most
    :data:`MAX_TOKENS` tokens that needs no gradient, rows a multiple of 16, inputs and group size sharing a group of
    32-256, a view of at most 8 bits."""
    return input_fits(x) and layer_fits(out_features, in_features, group_size, view_bits)


def pack(codes: torch.Tensor) -> torch.Tensor:
    """The op's pack of 4-bit codes ``[out, in]`` (int32, 0-15) on their device: on CUDA two codes a byte, the even
    column in the high nibble (checked against the dense weight on an H200, ``benchmarks/int4mm_bench.py``), K in tiles
    of 16 x the most of 8, 4, 2 inner tiles that divide it."""
    if codes.is_cuda:
        inner = next(t for t in (8, 4, 2) if codes.shape[1] % (16 * t) == 0)
        pairs = ((codes[:, ::2] << 4) | codes[:, 1::2]).to(torch.uint8).contiguous()
        return torch.ops.aten._convert_weight_to_int4pack(pairs, inner)
    return torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes.contiguous(), 1)


class Int4Views:
    """One packed layer's views as int4 packs (built on first use, kept): ``matmul(x2, k)`` = ``x2 W_k^T``.

    ``codes``: a callable giving the layer's full code ``[out, in]`` (every slice, base first: ``view_codes`` of the
    last view), read when a pack is built; ``scale``/``zero``: the layer's step and zero point (shared ``[out, G]``
    or per view ``[views, out, G]``)."""

    def __init__(
        self,
        codes,
        scale: torch.Tensor,
        zero: torch.Tensor,
        slice_bits: Sequence[int],
        group_size: int,
        in_features: int,
    ):
        self._codes_fn = codes
        self.scale, self.zero = scale, zero
        self.slice_bits = tuple(int(b) for b in slice_bits)
        self.total = sum(self.slice_bits)
        self.group_size, self.in_features = group_size, in_features
        g = op_group(in_features, group_size)
        if g is None:
            raise ValueError(f"no int4 group of 32-256 divides {in_features} inputs and groups of {group_size}")
        self.g = g
        self._packs: dict[tuple[int, int], torch.Tensor] = {}  # code window (top bit, width) -> int4 pack
        self._parts: dict[int, list[tuple[torch.Tensor, torch.Tensor]]] = {}  # view -> (pack, scales and zeros)

    def view_bits(self, k: int) -> int:
        return sum(self.slice_bits[:k])

    def _pack(self, start: int, width: int) -> torch.Tensor:
        """The int4 pack of bits ``start .. start + width`` (from the top) of the full code."""
        key = (start, width)
        if key not in self._packs:  # the full code is read again for each pack (a few a layer), not kept
            c = (self._codes_fn().to(torch.int64) >> (self.total - start - width)) & ((1 << width) - 1)
            c = (c + 8 - (1 << (width - 1))).to(torch.int32)  # centred on the op's 8: its zeros stay small
            self._packs[key] = pack(c)
        return self._packs[key]

    def _sz(self, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
        """``[in / g, out, 2]`` bf16 of per-group ``scale``/``zero`` ``[out, G]`` (each group repeated over its
        sub-groups of the op)."""
        rep = self.group_size // self.g
        n_sub = self.in_features // self.g
        s = scale.repeat_interleave(rep, dim=1)[:, :n_sub]
        z = zero.repeat_interleave(rep, dim=1)[:, :n_sub]
        return torch.stack([s.t(), z.t()], -1).to(torch.bfloat16).contiguous()

    def built(self, k: int) -> bool:
        """Whether view ``k``'s packs exist (a traced forward reads them; it cannot build them)."""
        return k in self._parts

    def parts(self, k: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """View ``k``'s int4 matmuls: ``[(pack, scales and zeros)]``, one for at most 4 bits, two above."""
        if k not in self._parts:
            with torch.inference_mode(False), torch.no_grad():  # kept: usable in and out of inference mode
                self._parts[k] = self._build(k)
        return self._parts[k]

    def _build(self, k: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        from . import view_pair

        bits = self.view_bits(k)
        if bits > 8:
            raise ValueError(f"view {k} reads {bits} bits: the int4 path serves views of at most 8")
        s, z = view_pair(self.scale, self.zero, k, len(self.slice_bits))
        shift = sum(self.slice_bits[1:k])
        a = s.double() / 2**shift
        b = -a * (2**shift * z.double() + (2**shift - 1) / 2)
        if bits <= 4:  # a code c of w bits is packed as c + 8 - 2^(w - 1): c scale + off = (q - 8) scale + zero
            return [(self._pack(0, bits), self._sz(a, b + 2 ** (bits - 1) * a))]
        r = bits - 4
        hi = a * 2**r
        return [(self._pack(0, 4), self._sz(hi, b + 8 * hi)), (self._pack(4, r), self._sz(a, 2 ** (r - 1) * a))]

    def matmul(self, x2: torch.Tensor, k: int) -> torch.Tensor:
        """``x2 W_k^T`` for rows ``x2 [M, in]``: bf16 on the CPU; on CUDA fp16 or bf16 (multiplied in bf16, returned
        in ``x2``'s dtype)."""
        aten = torch.ops.aten
        op = aten._weight_int4pack_mm if x2.is_cuda else aten._weight_int4pack_mm_for_cpu
        xb = x2.to(torch.bfloat16)
        y = None
        for p, sz in self.parts(k):
            part = op(xb, p, self.g, sz)
            y = part if y is None else y + part
        assert y is not None
        return y.to(x2.dtype)

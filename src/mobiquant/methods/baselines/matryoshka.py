"""Matryoshka-style nested slicing: one ``T``-bit RTN code per weight, read at fewer bits by truncation.

Each weight gets one per-group asymmetric min-max code ``q`` of ``T = sum(slice_bits)`` bits (default
``T = 8``: step ``s``, integer zero point ``z_T``). The ``k``-slice view keeps the ``S_k = b_1 + ... + b_k``
most significant bits, ``C_k = q >> m`` with ``m = T - S_k``, and puts the value at the middle of the
``2^m`` codes it stands for (mid-point correction)::

    W_k = s * ((C_k << m) + (2^m - 1) / 2 - z_T)

No router, no calibration. This fits the MoBiLinear format *exactly*: the ``T``-bit code is split into
``K`` bit-planes (most significant first: plane ``e`` holds bits ``[T - S_e, T - S_(e-1))``), so the
concatenation of the first ``k`` planes is ``C_k``, and with ``R = T - b_1``

    h    = 2^R * s
    zero = z_T / 2^R - (2^R - 1) / 2^(R + 1)            (T = 8, 2-bit slices: 64 s, z_8/64 - 63/128)

the packed ``k``-slice view ``(h / 2^B_k) (C_k - 2^B_k zero - (2^B_k - 1) / 2)`` (``B_k = S_k - b_1``)
equals ``W_k`` above: ``h / 2^B_k = s 2^m`` and ``-2^B_k zero - (2^B_k - 1)/2 = (1 - 2^-m)/2 - z_T 2^-m``.
Both ``h`` (a power-of-two multiple of an fp16 step) and ``zero`` (a multiple of ``2^-(R+1)``, for
``|2 z_T - 2^R + 1| <= 2048``) are exact in fp16, so the stored layer is the truncation scheme bit for bit.
``set_static(model, k)`` then gives the ``S_k``-bit truncated view.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn as nn

from ...patching import find_blocks
from ...quant.primitives import GroupQuantParams, check_group_size, from_groups, lwc_params, quantize, to_groups
from ...quant.slicer import check_slice_bits
from .common import mark_quantized, pack_linear_from_codes, quantizable_linears, set_submodule


@torch.no_grad()
def matryoshka_codes(weight: torch.Tensor, group_size: int = 128, slice_bits: Sequence[int] = (2, 2, 2, 2)):
    """``(codes_per_slice, scale, zero, full_code, s, z_T)`` for one weight ``[out, in]``.

    ``codes_per_slice`` are the bit-planes of the ``T``-bit code (uint8 ``[out, in]``, MSB first);
    ``scale``/``zero`` ``[out, n_groups]`` are the MoBiLinear base step ``h`` and zero point; ``full_code``
    is the ``T``-bit code, ``s`` and ``z_T`` its own step and zero point ``[out, n_groups]``.
    """
    bits = check_slice_bits(slice_bits)
    check_group_size(group_size)
    T = sum(bits)
    R = T - bits[0]
    grouped = to_groups(weight.detach().float(), group_size)
    p = lwc_params(grouped, T)
    h = (p.scale * 2**R).half().float()  # the stored base step
    s = h / 2**R  # the T-bit step actually used (exactly h / 2^R)
    # zero = (2 z_T - 2^R + 1) / 2^(R+1) is exact in fp16 while its numerator is within +-2048; z_T lies
    # outside that range only for narrow one-signed groups, whose codes then saturate (kept consistent)
    z_lo, z_hi = -((2048 - 2**R + 1) // 2), (2048 + 2**R - 1) // 2
    zT = p.zero.clamp(z_lo, z_hi)
    params = GroupQuantParams(scale=s, zero=zT)
    q = from_groups(quantize(grouped, params, T), weight.shape[1]).to(torch.int64)
    planes = []
    hi = T
    for b in bits:
        lo = hi - b
        planes.append(((q >> lo) & (2**b - 1)).to(torch.uint8))
        hi = lo
    zero = zT / 2**R - (2**R - 1) / 2 ** (R + 1)
    return (planes, h.squeeze(-1), zero.squeeze(-1), q.to(torch.uint8), s.squeeze(-1), zT.squeeze(-1))


def truncated_view(
    full_code: torch.Tensor, s: torch.Tensor, z: torch.Tensor, total_bits: int, keep_bits: int, group_size: int
) -> torch.Tensor:
    """Reference dequantization of the ``keep_bits`` MSB truncation with mid-point correction, ``[out, in]``."""
    m = total_bits - keep_bits
    idx = torch.arange(full_code.shape[1], device=full_code.device) // group_size
    c = (full_code.to(torch.int64) >> m) << m
    return s[:, idx].double() * (c.double() + (2**m - 1) / 2 - z[:, idx].double())


@torch.no_grad()
def quantize_matryoshka(
    model: nn.Module,
    group_size: int = 128,
    slice_bits: Sequence[int] = (2, 2, 2, 2),
    skip: Sequence[str] = (),
) -> nn.Module:
    """Replace every block linear by a packed ``MoBiLinear`` holding one nested ``sum(slice_bits)``-bit code.

    Afterwards ``mobiquant.set_static(model, k)`` selects the ``b_1 + ... + b_k``-bit truncated view.
    """
    bits = check_slice_bits(slice_bits)
    check_group_size(group_size)
    blocks_name, blocks = find_blocks(model)
    for bi, block in enumerate(blocks):
        for name, lin in quantizable_linears(block, skip, prefix=f"{blocks_name}.{bi}").items():
            if not isinstance(lin, nn.Linear):
                continue
            planes, h, zero, *_ = matryoshka_codes(lin.weight, group_size, bits)
            set_submodule(block, name, pack_linear_from_codes(lin, planes, h, zero, bits, group_size))
    return mark_quantized(model, (blocks_name, blocks), bits, group_size, method="matryoshka", skip=skip)


__all__ = ["matryoshka_codes", "quantize_matryoshka", "truncated_view"]

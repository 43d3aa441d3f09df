"""Bit-plane packing of slice codes.

Each MoBiSlice slice is stored as its own plane, so a token that uses ``k`` slices reads only the first
``k`` planes. Within a plane, ``word_bits // bits`` consecutive codes of a row share one word (uint8 or
int32), the first code in the least significant bits. Bit-widths that do not divide the word (3, 5, 6, 7)
leave the top bits of each word unused. Rows are padded with zero codes to whole words.
"""

from __future__ import annotations

import math

import torch

from .primitives import check_bits

_WORD_DTYPES = {8: torch.uint8, 32: torch.int32}


def codes_per_word(bits: int, word_bits: int = 32) -> int:
    check_bits(bits)
    if word_bits not in _WORD_DTYPES:
        raise ValueError(f"word_bits must be 8 or 32, got {word_bits!r}")
    return word_bits // bits


def packed_width(in_features: int, bits: int, word_bits: int = 32) -> int:
    return math.ceil(in_features / codes_per_word(bits, word_bits))


def pack_codes(codes: torch.Tensor, bits: int, word_bits: int = 32) -> torch.Tensor:
    """Pack integer codes ``[rows, cols]`` in ``[0, 2^bits)`` into words ``[rows, ceil(cols / per_word)]``."""
    if codes.dim() != 2:
        raise ValueError(f"pack_codes expects a 2-D tensor of codes, got shape {tuple(codes.shape)}")
    per = codes_per_word(bits, word_bits)
    c = codes.to(torch.int64)
    if c.numel() and (int(c.min()) < 0 or int(c.max()) >= 2**bits):
        raise ValueError(f"codes out of range for {bits}-bit packing: [{int(c.min())}, {int(c.max())}]")
    rows, cols = c.shape
    pad = packed_width(cols, bits, word_bits) * per - cols
    if pad:
        c = torch.nn.functional.pad(c, (0, pad))
    c = c.reshape(rows, -1, per)
    shifts = torch.arange(per, dtype=torch.int64, device=c.device) * bits
    words = (c << shifts).sum(dim=-1)
    if word_bits == 32:
        words = torch.where(words >= 2**31, words - 2**32, words)
    return words.to(_WORD_DTYPES[word_bits])


def unpack_codes(packed: torch.Tensor, bits: int, cols: int, word_bits: int | None = None) -> torch.Tensor:
    """Inverse of :func:`pack_codes`: words -> uint8 codes ``[rows, cols]``."""
    if word_bits is None:
        word_bits = {torch.uint8: 8, torch.int32: 32}.get(packed.dtype)
        if word_bits is None:
            raise ValueError(f"packed words must be uint8 or int32, got {packed.dtype}")
    per = codes_per_word(bits, word_bits)
    w = packed.to(torch.int64)
    if word_bits == 32:
        w = w & 0xFFFFFFFF
    shifts = torch.arange(per, dtype=torch.int64, device=w.device) * bits
    codes = (w.unsqueeze(-1) >> shifts) & (2**bits - 1)
    return codes.reshape(packed.shape[0], -1)[:, :cols].to(torch.uint8)

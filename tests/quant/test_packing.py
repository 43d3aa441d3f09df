"""Bit-plane packing: exact round trips for every bit-width and word size, layout and errors."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from mobiquant.quant.packing import codes_per_word, pack_codes, packed_width, unpack_codes


def random_codes(rows: int, cols: int, bits: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 2**bits, (rows, cols), generator=g, dtype=torch.int64).to(torch.uint8)


@pytest.mark.parametrize("word_bits", [8, 32])
@pytest.mark.parametrize("bits", range(1, 9))
@pytest.mark.parametrize("cols", [1, 7, 33, 64, 100, 577])
def test_round_trip_exact(bits, word_bits, cols):
    codes = random_codes(5, cols, bits, seed=bits * 1000 + cols)
    # Make sure the extreme codes (all ones, zero) are present: the sign bit of int32 words included.
    codes[0, :] = 2**bits - 1
    codes[1, :] = 0
    packed = pack_codes(codes, bits, word_bits)
    assert packed.dtype == (torch.uint8 if word_bits == 8 else torch.int32)
    assert packed.shape == (5, packed_width(cols, bits, word_bits))
    assert torch.equal(unpack_codes(packed, bits, cols), codes)
    assert torch.equal(unpack_codes(packed, bits, cols, word_bits=word_bits), codes)


@settings(max_examples=150, deadline=None)
@given(
    rows=st.integers(1, 6),
    cols=st.integers(1, 130),
    bits=st.integers(1, 8),
    word_bits=st.sampled_from([8, 32]),
    seed=st.integers(0, 2**16),
)
def test_round_trip_property(rows, cols, bits, word_bits, seed):
    codes = random_codes(rows, cols, bits, seed)
    packed = pack_codes(codes, bits, word_bits)
    per = word_bits // bits
    assert packed.shape == (rows, -(-cols // per))
    assert torch.equal(unpack_codes(packed, bits, cols, word_bits), codes)


@pytest.mark.parametrize(
    "bits,word_bits,per",
    [
        (1, 8, 8),
        (2, 8, 4),
        (3, 8, 2),
        (5, 8, 1),
        (8, 8, 1),
        (1, 32, 32),
        (2, 32, 16),
        (3, 32, 10),
        (7, 32, 4),
        (8, 32, 4),
    ],
)
def test_codes_per_word(bits, word_bits, per):
    assert codes_per_word(bits, word_bits) == per


def test_layout_first_code_in_least_significant_bits():
    codes = torch.tensor([[1, 2, 3, 0, 1]], dtype=torch.uint8)
    packed = pack_codes(codes, 2, 8)
    # 1 | 2<<2 | 3<<4 | 0<<6 = 0b00111001 = 57; the 5th code starts a new word, zero padded.
    assert packed.tolist() == [[57, 1]]
    packed32 = pack_codes(codes, 2, 32)
    assert packed32.tolist() == [[1 | 2 << 2 | 3 << 4 | 1 << 8]]


def test_int32_top_bit_is_stored_as_negative_word():
    codes = torch.full((1, 32), 1, dtype=torch.uint8)
    packed = pack_codes(codes, 1, 32)
    assert packed.dtype == torch.int32 and packed.item() == -1
    assert torch.equal(unpack_codes(packed, 1, 32), codes)


def test_bits_that_do_not_divide_the_word_leave_top_bits_unused():
    codes = torch.full((2, 20), 7, dtype=torch.uint8)
    packed = pack_codes(codes, 3, 32)  # 10 codes per word, bits 30 and 31 unused
    assert packed.shape == (2, 2)
    assert bool(((packed.to(torch.int64) & 0xFFFFFFFF) >> 30 == 0).all())


@pytest.mark.parametrize("bad", [torch.tensor([[4]]), torch.tensor([[-1]])])
def test_out_of_range_codes_raise(bad):
    with pytest.raises(ValueError, match="out of range"):
        pack_codes(bad, 2)


def test_invalid_arguments_raise():
    with pytest.raises(ValueError, match="2-D"):
        pack_codes(torch.zeros(3, dtype=torch.uint8), 2)
    with pytest.raises(ValueError, match="word_bits"):
        pack_codes(torch.zeros(1, 4, dtype=torch.uint8), 2, word_bits=16)
    with pytest.raises(ValueError, match="bits"):
        pack_codes(torch.zeros(1, 4, dtype=torch.uint8), 9)
    with pytest.raises(ValueError, match="uint8 or int32"):
        unpack_codes(torch.zeros(1, 4, dtype=torch.int64), 2, 4)

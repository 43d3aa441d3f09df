"""Triton bit-plane kernels against the PyTorch reference and ``MoBiLinear.dequantized``.

On a machine without CUDA these run in Triton's interpreter (``TRITON_INTERPRET=1``, set by this folder's
conftest) on tiny shapes. Every check draws fresh random inputs, poisons the output buffer with NaN and
checks that every element was written. Tests marked ``gpu`` need CUDA and skip cleanly without it.
"""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys

import pytest
import torch

from mobiquant import MoBiLinear
from mobiquant.kernels import available, bitplane_linear, dequantize_reference, torch_reference
from mobiquant.nn.fused import rms_norm
from mobiquant.quant.packing import pack_codes

triton = pytest.importorskip(
    "triton", reason="triton is not installed (pip install 'mobiquant[test]' or 'triton'): kernel tests skipped"
)
from mobiquant.kernels import triton_bitplane as tb  # noqa: E402

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA and os.environ.get("TRITON_INTERPRET", "0") in ("", "0") else "cpu"
if DEVICE == "cpu" and os.environ.get("TRITON_INTERPRET", "0") in ("", "0"):
    pytest.skip("no CUDA device and TRITON_INTERPRET is not set", allow_module_level=True)

# Relative-error bounds against a float64 reference (output rounding of each dtype, plus the weight
# rounding of the tile path in 16-bit formats).
TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.5e-2}
DTYPES = [torch.float16, torch.bfloat16, torch.float32]


def make_layer(n_out, n_in, slice_bits, group, gen, device=DEVICE):
    planes = [pack_codes(torch.randint(0, 2**b, (n_out, n_in), generator=gen), b).to(device) for b in slice_bits]
    ng = -(-n_in // group)
    scale = (torch.rand(n_out, ng, generator=gen) * 0.02 + 0.002).half().to(device)
    # Fractional zero points (multiples of 1/8, as a grid anchored above the base slice stores) include the
    # integer ones of the paper's grid.
    zero = (torch.randint(0, 8 * 2 ** slice_bits[0], (n_out, ng), generator=gen) / 8 - 0.375).half().to(device)
    return planes, scale, zero


def check(x, planes, scale, zero, bits, group, k, bias=None, **kw):
    """Run the Triton entry into a NaN-poisoned buffer; compare with a float64 reference."""
    m = x.reshape(-1, x.shape[-1]).shape[0]
    out = torch.full((m, scale.shape[-2]), float("nan"), dtype=x.dtype, device=x.device)
    y = tb.bitplane_linear(x, planes, scale, zero, bits, group, k, bias=bias, out=out, **kw)
    assert y.shape == (*x.shape[:-1], scale.shape[-2])
    assert not torch.isnan(out).any(), "some output elements were never written"
    assert torch.isfinite(y).all()
    ref = torch_reference(x, planes, scale, zero, bits, group, k, bias=bias, compute_dtype=torch.float64)
    err = ((y.double() - ref.double()).norm() / ref.double().norm()).item()
    assert err < TOL[x.dtype], f"relative error {err:.2e} (dtype {x.dtype}, k={k}, {kw})"
    return y


@pytest.fixture
def gen():
    # Fresh inputs for every test (and every run): a seed drawn from the OS, reported on failure;
    # MOBIQUANT_TEST_SEED=<seed> replays a reported one.
    seed = int(os.environ.get("MOBIQUANT_TEST_SEED") or int.from_bytes(os.urandom(4), "little"))
    print(f"seed={seed}")
    return torch.Generator().manual_seed(seed)


def randx(m, n_in, dtype, gen):
    return torch.randn(m, n_in, generator=gen).to(dtype).to(DEVICE)


# ------------------------------------------------------------------------------- every k, every path
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).split(".")[-1])
@pytest.mark.parametrize(
    "path,m", [("small", 1), ("small", 5), ("tile", 1), ("tile", 21), ("dequant", 6)], ids=lambda v: str(v)
)
def test_every_k(path, m, dtype, gen):
    bits, group = (2, 2, 2, 2), 64
    planes, scale, zero = make_layer(48, 200, bits, group, gen)  # ragged last group, partial last word
    x = randx(m, 200, dtype, gen)
    for k in range(1, len(bits) + 1):
        check(x, planes, scale, zero, bits, group, k, path=path)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).split(".")[-1])
@pytest.mark.parametrize("path,m", [("small", 1), ("small", 16), ("tile", 37), ("dequant", 10)], ids=lambda v: str(v))
def test_mixed_k_in_one_batch(path, m, dtype, gen):
    bits, group = (2, 2, 2, 2), 64
    planes, scale, zero = make_layer(48, 200, bits, group, gen)
    x = randx(m, 200, dtype, gen)
    k = torch.randint(1, 5, (m,), generator=gen)
    if m >= 4:
        k[:4] = torch.tensor([4, 1, 3, 2])[torch.randperm(4, generator=gen)]  # every k present
    bias = torch.randn(48, generator=gen).to(DEVICE)
    check(x, planes, scale, zero, bits, group, k.to(DEVICE), bias=bias, path=path)
    # 3-D activations with a per-token k of the same leading shape
    if m in (16, 37):
        x3 = randx(m, 200, dtype, gen).reshape(1, m, 200)
        check(x3, planes, scale, zero, bits, group, k.reshape(1, m).to(DEVICE), path=path)


def test_small_batch_reads_only_needed_planes(gen):
    """With every token at k=1, planes 2..4 may hold garbage that must not leak into the result."""
    bits, group = (2, 2, 2, 2), 64
    planes, scale, zero = make_layer(32, 128, bits, group, gen)
    x = randx(3, 128, torch.float32, gen)
    ref = tb.bitplane_linear(x, planes, scale, zero, bits, group, 1, path="small")
    nan_planes = [planes[0]] + [torch.full_like(p, -1) for p in planes[1:]]
    k = torch.ones(3, dtype=torch.long, device=DEVICE)
    y = tb.bitplane_linear(x, nan_planes, scale, zero, bits, group, k, path="small")
    torch.testing.assert_close(y, ref)
    y1 = tb.bitplane_linear(x[:1], nan_planes, scale, zero, bits, group, k[:1], path="small")
    torch.testing.assert_close(y1, ref[:1])


# Every (pairs, k_on) combination once, and every dtype: pairwise cover of the 12 combinations.
@pytest.mark.parametrize(
    "dtype,pairs,k_on",
    [
        (torch.float16, "shared", "host"),
        (torch.bfloat16, "per_view", "host"),
        (torch.float32, "shared", "device"),
        (torch.float16, "per_view", "device"),
    ],
    ids=lambda v: str(v).split(".")[-1],
)
def test_small_batch_on_the_default_layout(dtype, pairs, k_on, gen, monkeypatch):
    """2-16 tokens of the default layout (a 3-bit base: 10 codes a word, no chunk of whole words in a group) in the
    small-batch kernel, whose base plane gathers each column's word: every view, mixed per-token k read on the host
    or on the device (as in a captured graph), one pair or a pair per view, a bias, ragged K (a partial last group
    and word) and odd rows; planes past the largest k hold garbage that must not leak. The 'auto' dispatch takes it
    for a few tokens, the one-bit plane kernel for one."""
    if k_on == "device":
        monkeypatch.setattr(tb, "_host_k_range", lambda k_t: None)
    bits, group, n_out, n_in = DEFAULT_LAYOUT, 64, 70, 200
    assert tb.small_supported(bits, group, None, True) and not tb.small_supported(bits, group, None, False)
    make = make_views if pairs == "per_view" else make_layer
    planes, scale, zero = make(n_out, n_in, bits, group, gen)
    bias = torch.randn(n_out, generator=gen).to(DEVICE)
    for m in (3, 16):
        x = randx(m, n_in, dtype, gen)
        for k in (1, 4, 6):
            check(x, planes, scale, zero, bits, group, k, bias=bias, path="small")
        kt = torch.randint(1, len(bits) + 1, (m,), generator=gen)
        kt[:2] = torch.tensor([1, len(bits)])
        check(x, planes, scale, zero, bits, group, kt.to(DEVICE), bias=bias, path="small")
        low = torch.randint(1, 3, (m,), generator=gen).to(DEVICE)  # k <= 2: planes 3-6 unread
        bad = planes[:2] + [torch.full_like(p, -1) for p in planes[2:]]
        y = tb.bitplane_linear(x, bad, scale, zero, bits, group, low, path="small")
        ref = torch_reference(x, planes, scale, zero, bits, group, low, compute_dtype=torch.float64)
        assert ((y.double() - ref.double()).norm() / ref.double().norm()).item() < TOL[dtype]
    launched = []
    real = tb.bitplane_linear_small
    monkeypatch.setattr(tb, "bitplane_linear_small", lambda *a, **kw: launched.append(a[0].shape[0]) or real(*a, **kw))
    check(randx(5, n_in, dtype, gen), planes, scale, zero, bits, group, torch.tensor([3, 1, 6, 3, 2]).to(DEVICE))
    check(randx(1, n_in, dtype, gen), planes, scale, zero, bits, group, 3)
    assert launched == [5]


def test_auto_path_rule(gen, monkeypatch):
    """'auto' on the default layout: one token the one-bit plane kernel; on CUDA one view of 2+ tokens and per-token
    views of DEQUANT_MIN_TOKENS+ tokens dequantize then call cuBLAS (measured faster there on an H200), per-token views
    of 2-16 tokens take the small-batch kernel; off CUDA no dequantize pass: the small-batch kernel up to 16 tokens,
    tiles beyond. Every choice's output is checked against the reference."""
    bits, group, n_out, n_in = DEFAULT_LAYOUT, 128, 64, 256
    planes, scale, zero = make_layer(n_out, n_in, bits, group, gen)
    taken = []
    for name in ("bitplane_linear_bits", "bitplane_linear_small", "bitplane_linear_tiled", "bitplane_linear_dequant"):
        real = getattr(tb, name)
        monkeypatch.setattr(
            tb, name, lambda *a, _n=name, _f=real, **kw: taken.append(_n.split("_")[-1]) or _f(*a, **kw)
        )
    big = tb.DEQUANT_MIN_TOKENS
    cases = [(1, 3), (5, 3), (5, "mixed"), (big, 3), (big, "mixed")]
    for m, k in cases:
        kk = torch.randint(1, len(bits) + 1, (m,), generator=gen).to(DEVICE) if k == "mixed" else k
        check(randx(m, n_in, torch.float16, gen), planes, scale, zero, bits, group, kk)
    cuda = DEVICE == "cuda"
    want = [
        "bits",
        "dequant" if cuda else "small",
        "small",
        "dequant" if cuda else "tiled",
        "dequant" if cuda else "tiled",
    ]
    assert taken == want


# ----------------------------------------------------------------- one token: field kernel vs concat
FIELDS = tb.SmallConfig(fields=True)
CONCAT = tb.SmallConfig(fields=False)


def test_field_kernel_default_choice():
    """By default one token takes the field kernel up to FIELDS_MAX_K planes (faster there on an H200),
    the concatenated-code kernel beyond; an explicit choice wins where the layout allows it."""
    bits = (2, 2, 2, 2)
    auto = tb.SmallConfig()
    assert [tb._want_fields(auto, bits, k) for k in range(1, 5)] == [k <= tb.FIELDS_MAX_K for k in range(1, 5)]
    assert all(tb._want_fields(FIELDS, bits, k) for k in range(1, 5))
    assert not any(tb._want_fields(CONCAT, bits, k) for k in range(1, 5))
    assert not tb._want_fields(FIELDS, (4, 2, 2), 2)  # unequal widths: never
    # k read on the device (every plane compiled): the field kernel, which branches into a body per k
    assert tb._want_fields(auto, bits, 4, device_k=True) and not tb._want_fields(CONCAT, bits, 4, device_k=True)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).split(".")[-1])
@pytest.mark.parametrize(
    "n_out,n_in,group",
    [(40, 1024, 128), (33, 200, 64), (24, 130, 128), (70, 96, 32), (16, 2048, 1024)],
    ids=str,
)
def test_one_token_field_kernel(n_out, n_in, group, dtype, gen):
    """The field kernel (one token, equal slice widths) against the reference and against the
    concatenated-code kernel, every k, on even and ragged K (partial chunk, partial word, row stride not a
    multiple of 16), rows not a multiple of the block, several chunks per split."""
    bits = (2, 2, 2, 2)
    planes, scale, zero = make_layer(n_out, n_in, bits, group, gen)
    bias = torch.randn(n_out, generator=gen).to(DEVICE)
    x = randx(1, n_in, dtype, gen)
    assert tb._fields_ok(bits, 4)
    for k in range(1, 5):
        y = check(x, planes, scale, zero, bits, group, k, bias=bias, path="small", small_config=FIELDS)
        y_old = check(x, planes, scale, zero, bits, group, k, bias=bias, path="small", small_config=CONCAT)
        torch.testing.assert_close(y, y_old, rtol=TOL[dtype] * 4, atol=TOL[dtype] * 4 * y_old.abs().max().item())
    for cfg in (
        tb.SmallConfig(block_n=16, block_k=256, split_k=1, fields=True),
        tb.SmallConfig(block_n=64, split_k=3, fields=True),
        tb.SmallConfig(block_n=32, block_k=128, split_k=2, num_warps=2, fields=True),
    ):
        check(x, planes, scale, zero, bits, group, 3, path="small", small_config=cfg)


@pytest.mark.parametrize("scale_x", [1e-4, 1.0, 3e3])
def test_one_token_field_kernel_activation_range(scale_x, gen):
    """Products are formed as x C 2^-64 from subnormal code fields: small and large activations keep
    their relative accuracy."""
    bits, group = (2, 2, 2, 2), 128
    planes, scale, zero = make_layer(32, 512, bits, group, gen)
    for dtype in (torch.float16, torch.float32):
        x = (randx(1, 512, torch.float32, gen) * scale_x).to(dtype)
        for k in (1, 4):
            check(x, planes, scale, zero, bits, group, k, path="small", small_config=FIELDS)


@pytest.mark.parametrize(
    "bits,group,n_in", [((1,) * 8, 64, 160), ((4, 4), 64, 136), ((8,), 32, 96), ((4, 2, 2), 64, 130)], ids=str
)
def test_one_token_field_kernel_widths(bits, group, n_in, gen):
    """Other equal widths (1, 4, 8 bits) use the field kernel up to the k it covers; wider codes and mixed
    widths fall back to the concatenated-code kernel."""
    planes, scale, zero = make_layer(24, n_in, bits, group, gen)
    x = randx(1, n_in, torch.float32, gen)
    for k in range(1, len(bits) + 1):
        check(x, planes, scale, zero, bits, group, k, path="small", small_config=FIELDS)
    assert tb._fields_ok((1,) * 8, 4) and not tb._fields_ok((1,) * 8, 8)
    assert tb._fields_ok((4, 4), 2) and tb._fields_ok((8,), 1)
    assert tb._fields_ok((4, 2, 2), 1) and not tb._fields_ok((4, 2, 2), 2)


def test_one_token_device_k_compiles_every_plane(gen, monkeypatch):
    """A per-token k read on the device (as on CUDA: the kernel compiles for every plane and masks the
    planes past k): planes past k hold garbage that must not leak, for both one-token kernels."""
    monkeypatch.setattr(tb, "_host_k_range", lambda k_t: None)
    bits, group = (2, 2, 2, 2), 64
    planes, scale, zero = make_layer(40, 320, bits, group, gen)
    x = randx(1, 320, torch.float16, gen)
    for kk in range(1, 5):
        bad = planes[:kk] + [torch.full_like(p, -1) for p in planes[kk:]]
        ref = torch_reference(x, planes, scale, zero, bits, group, kk, compute_dtype=torch.float64)
        for cfg in (FIELDS, tb.SmallConfig()):
            out = torch.full((1, 40), float("nan"), dtype=x.dtype, device=DEVICE)
            k = torch.tensor([kk], device=DEVICE)
            y = tb.bitplane_linear_small(x, bad, scale, zero, bits, group, k, out=out, config=cfg)
            assert not torch.isnan(out).any()
            err = ((y.double() - ref.double()).norm() / ref.double().norm()).item()
            assert err < TOL[torch.float16], (kk, cfg, err)


# ------------------------------------------------------------------------ one token from one-bit planes
BITS = tb.SmallConfig(bitplanes=True)  # whole_k where K and the rows allow (every test shape here)
STREAMK = tb.SmallConfig(bitplanes=True, whole_k=False)
WHOLE = tb.SmallConfig(bitplanes=True, whole_k=True)
# programmatic dependent launch: in the interpreter the waits are no-ops, the order of the loads is what runs
WHOLE_PDL = tb.SmallConfig(bitplanes=True, whole_k=True, pdl=True)
DEFAULT_LAYOUT = (3, 1, 1, 1, 1, 1)


def test_pack_bitplanes_layout(gen):
    """Every slice becomes its bits as one-bit planes, most significant first: the first P_k planes are C_k's bits.
    Words hold 16 columns of two adjacent rows; the padding (rows, words, groups) is zero."""
    bits, group, n_out, n_in = DEFAULT_LAYOUT, 32, 5, 40
    planes, scale, zero = make_layer(n_out, n_in, bits, group, gen)
    bp = tb.pack_bitplanes(planes, scale, zero, bits, group, n_in)
    assert bp.planes_of_view == [3, 4, 5, 6, 7, 8]
    assert bp.words.shape == (8, 4, 64) and bp.sz.shape == (2, 2, 64)  # whole groups, rows to 128
    w = bp.words.cpu().to(torch.int64) & 0xFFFFFFFF
    # bit b of word (t, col // 16, row // 2): plane t of (row, col) at b = col % 16 + 16 (row % 2)
    rows = torch.arange(n_out)[:, None]
    cols = torch.arange(n_in)[None, :]
    planes_bits = ((w[:, cols // 16, rows // 2] >> (cols % 16 + 16 * (rows % 2))) & 1).to(torch.int64)
    from mobiquant.quant.packing import unpack_codes

    c = torch.zeros(n_out, n_in, dtype=torch.int64)  # the full concatenated code, 8 bits
    for e, b in enumerate(bits):
        c = (c << b) | unpack_codes(planes[e].cpu(), b, n_in).to(torch.int64)
    top = torch.zeros_like(c)
    for t in range(8):  # the first t + 1 planes are the top t + 1 bits of the code
        top = (top << 1) | planes_bits[t]
        assert torch.equal(top, c >> (7 - t))
    assert not w[:, 3:, :].any() and not w[:, :, 3:].any()  # columns 48.. and row pairs 3.. are padding
    sz = bp.sz.cpu().to(torch.int64) & 0xFFFFFFFF
    s16 = (sz & 0xFFFF).to(torch.int16).view(torch.float16)
    z16 = (sz >> 16).to(torch.int16).view(torch.float16)
    r = torch.arange(n_out)
    torch.testing.assert_close(s16[r % 2, :, r // 2], scale.cpu())
    torch.testing.assert_close(z16[r % 2, :, r // 2], zero.cpu())


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).split(".")[-1])
@pytest.mark.parametrize(
    "n_out,n_in,group",
    [(70, 300, 64), (33, 256, 128), (256, 128, 32)],
    ids=str,
)
def test_bits_kernel_every_k(n_out, n_in, group, dtype, gen):
    """The one-bit plane kernel on the default layout 3-1-1-1-1-1, every view (3..8 bits), against the
    reference: ragged K (partial word, partial group), odd rows, a bias, several programs per row block."""
    bits = DEFAULT_LAYOUT
    planes, scale, zero = make_layer(n_out, n_in, bits, group, gen)
    bias = torch.randn(n_out, generator=gen).to(DEVICE)
    x = randx(1, n_in, dtype, gen)
    for k in range(1, len(bits) + 1):
        check(x, planes, scale, zero, bits, group, k, bias=bias, small_config=BITS)
    assert not tb.small_supported(bits, group, None, False)  # the old one-token kernels do not cover this layout


@pytest.mark.parametrize(
    "bits,group,n_in",
    [((2, 2, 2, 2), 64, 200), ((4, 2, 2), 32, 96), ((1,) * 8, 64, 160), ((8,), 32, 64), ((3, 3, 2), 64, 130)],
    ids=str,
)
def test_bits_kernel_layouts(bits, group, n_in, gen):
    """Any layout of at most 8 bits: 2-2-2-2, 4-2-2, eight 1-bit slices, one 8-bit slice, 3-3-2."""
    planes, scale, zero = make_layer(24, n_in, bits, group, gen)
    x = randx(1, n_in, torch.float16, gen)
    for k in range(1, len(bits) + 1):
        check(x, planes, scale, zero, bits, group, k, path="bits")
    assert tb.bits_supported(bits, group)
    assert not tb.bits_supported((4, 4, 2), 64) and not tb.bits_supported((2, 2), 24)


@pytest.mark.parametrize(
    "cfg",
    [
        tb.SmallConfig(bitplanes=True, block_n=64, block_k=32, split_k=1),  # one program per row block
        tb.SmallConfig(bitplanes=True, block_n=32, block_k=16, split_k=5),  # groups split unevenly
        tb.SmallConfig(bitplanes=True, block_n=128, block_k=64, waves=1, num_warps=2),
        tb.SmallConfig(bitplanes=True, block_n=16, block_k=16, waves=3),  # segments across row blocks
        tb.SmallConfig(bitplanes=True, block_n=32, block_k=64, waves=1, prefetch=True),  # next group preloaded
        tb.SmallConfig(bitplanes=True, whole_k=True),  # a row block over all of K at once: 32 rows, 32 words
        tb.SmallConfig(bitplanes=True, whole_k=True, block_n=2, num_warps=1),  # one row pair per program
        tb.SmallConfig(bitplanes=True, block_n=64, num_warps=8),  # the default whole_k: here
        tb.SmallConfig(bitplanes=True, block_n=128, block_k=64, whole_k=False),  # stream-K, 4 programs per SM
        tb.SmallConfig(bitplanes=True, block_n=32, block_k=32, waves=1, stages=3),  # the group loop pipelined
        WHOLE_PDL,  # the weights loaded before the wait on the kernel before
        tb.SmallConfig(bitplanes=True, block_n=32, block_k=32, waves=1, pdl=True),  # stream-K: waits first
        tb.SmallConfig(bitplanes=True, block_n=256, block_k=64, waves=2, l2_prefetch=True),  # range asked of L2
        tb.SmallConfig(bitplanes=True, l2_prefetch=True),  # whole-K here: l2_prefetch only for stream-K launches
        tb.SmallConfig(bitplanes=True, block_n=32, block_k=32, waves=1, ahead=2),  # 2 groups ahead asked of L2
        tb.SmallConfig(bitplanes=True, block_n=256, block_k=64, waves=3, ahead=1),  # rows past the padding
    ],
    ids=str,
)
def test_bits_kernel_configs(cfg, gen):
    """Each launch configuration at the largest view in half precision and a low one in float32 (every view and
    dtype of the default configuration: ``test_bits_kernel_every_k``)."""
    bits, group = DEFAULT_LAYOUT, 64
    planes, scale, zero = make_layer(100, 384, bits, group, gen)
    bias = torch.randn(100, generator=gen).to(DEVICE)
    for dtype, k in ((torch.float16, 6), (torch.float32, 2)):
        check(randx(1, 384, dtype, gen), planes, scale, zero, bits, group, k, bias=bias, small_config=cfg)


@pytest.mark.parametrize(
    "cfg",
    [
        tb.SmallConfig(bitplanes=True, block_n=16, block_k=32, waves=3),  # segments across row blocks
        tb.SmallConfig(bitplanes=True, block_n=32, block_k=32, split_k=5),  # groups split unevenly
        tb.SmallConfig(bitplanes=True, block_n=256, block_k=32, waves=1),  # few segments a row block
    ],
    ids=str,
)
def test_bits_kernel_reduce_launch_matches_the_ticket_path(cfg, gen, monkeypatch):
    """``reduce_launch``: the shared row blocks summed by a second launch give the ticket path's outputs (static views,
    ``k`` on the device, a bias, rows not a multiple of the block; a site keeps its tickets). Both sum the same
    partials in the same order, but on a GPU the two compiled variants may contract the float32 arithmetic
    differently (an H100, 2026-12-05: float32 outputs differed in the last bits), so the outputs agree to one unit
    in the last place of their dtype, not bit for bit (the interpreter gives equal bits)."""
    monkeypatch.setattr(tb, "_host_k_range", lambda k_t: None)
    bits, group, n_in = DEFAULT_LAYOUT, 32, 160
    bp = tb.pack_bitplanes(*make_layer(150, n_in, bits, group, gen), bits, group, n_in)
    bias = torch.randn(150, generator=gen).to(DEVICE).half()
    cfg = dataclasses.replace(cfg, reduce_launch=False)  # the ticket path
    red = dataclasses.replace(cfg, reduce_launch=True)  # the default
    x = randx(1, n_in, torch.float16, gen)

    def same(a, c, what):
        eps = torch.finfo(a.dtype).eps
        torch.testing.assert_close(c, a, rtol=eps, atol=eps * float(a.abs().max()), msg=lambda m: f"{what}: {m}")

    kd2, kd4 = (torch.tensor([k], device=DEVICE) for k in (2, 4))
    for k, b in ((1, None), (6, bias), (kd2, bias), (kd4, None)):
        a, c = (tb.bitplane_linear_bits(x, bp, k, bias=b, config=f) for f in (cfg, red))
        same(a, c, (k, b is None))
    ref = tb.bitplane_linear_bits(x.float(), bp, 2, config=cfg)
    got = tb.bitplane_linear_bits(x.float(), bp, 2, config=red)
    same(ref, got, "float32")
    site = tb.site_bitplanes([bp, bp])
    a, c = (tb.bitplane_site_bits(x, site, [2, 2], config=f) for f in (cfg, red))
    same(a, c, "site")


def test_bits_kernel_fewer_programs_than_row_blocks(gen, monkeypatch):
    """Stream-K with fewer programs than row blocks: programs end inside row blocks, whose segments meet in the
    partial slots (13 row blocks of 16 rows, 8 programs)."""
    monkeypatch.setattr(tb, "_num_sms", lambda device: 8)
    bits, group = DEFAULT_LAYOUT, 32
    planes, scale, zero = make_layer(200, 96, bits, group, gen)
    x = randx(1, 96, torch.float32, gen)
    cfg = tb.SmallConfig(bitplanes=True, block_n=16, block_k=32, waves=1)
    for k in (1, 4):
        check(x, planes, scale, zero, bits, group, k, small_config=cfg)


@pytest.mark.parametrize("cfg", [STREAMK, WHOLE, WHOLE_PDL], ids=["streamk", "whole_k", "whole_k_pdl"])
def test_bits_kernel_device_k(cfg, gen, monkeypatch):
    """k read on the device: one body per view compiled together; planes past the view hold garbage that must not
    leak. The packed buffers may be passed in (``packed=``) or built and cached from the planes."""
    monkeypatch.setattr(tb, "_host_k_range", lambda k_t: None)
    bits, group = DEFAULT_LAYOUT, 64
    planes, scale, zero = make_layer(40, 192, bits, group, gen)
    x = randx(1, 192, torch.float16, gen)
    for kk in range(1, len(bits) + 1):
        bad = planes[:kk] + [torch.full_like(p, -1) for p in planes[kk:]]
        ref = torch_reference(x, planes, scale, zero, bits, group, kk, compute_dtype=torch.float64)
        packed = tb.pack_bitplanes(bad, scale, zero, bits, group, 192)
        out = torch.full((1, 40), float("nan"), dtype=x.dtype, device=DEVICE)
        k = torch.tensor([kk], device=DEVICE)
        y = tb.bitplane_linear(x, bad, scale, zero, bits, group, k, out=out, small_config=cfg, packed=packed)
        assert not torch.isnan(out).any()
        err = ((y.double() - ref.double()).norm() / ref.double().norm()).item()
        assert err < TOL[torch.float16], (kk, err)
        # the entry takes a one-element k on the CPU as an int (the interpreter's case): the kernel's own entry
        # reads it on the "device", every body compiled
        y_dev = tb.bitplane_linear_bits(x, packed, k, config=cfg)
        err = ((y_dev.double() - ref.double()).norm() / ref.double().norm()).item()
        assert err < TOL[torch.float16], (kk, err)


@pytest.mark.parametrize("cfg", [STREAMK, WHOLE, WHOLE_PDL], ids=["streamk", "whole_k", "whole_k_pdl"])
@pytest.mark.parametrize("vdtype", [torch.float32, torch.float16], ids=lambda d: str(d).split(".")[-1])
def test_bits_kernel_routed_k(vdtype, cfg, gen, monkeypatch):
    """k counted in the kernel from a router's gate values and a threshold (``RoutedK``, the device path): the
    count torch makes, ties not counted and the threshold compared in the values' dtype; the planes past the view
    are poisoned, so a wrong count reads garbage."""
    monkeypatch.setattr(tb, "_host_routed_k", lambda rk: None)
    bits, group = DEFAULT_LAYOUT, 64
    planes, scale, zero = make_layer(40, 192, bits, group, gen)
    x = randx(1, 192, torch.float16, gen)
    values = torch.tensor([[0.9, 0.7001953125, 0.5, 0.3, 0.1]], dtype=vdtype, device=DEVICE)  # 0.7002 in both
    tie16 = 0.7001953125 - 1e-4  # below the second value, the same value once rounded to fp16
    cases = [(1.0, 1), (0.95, 1), (0.8, 2), (0.4, 4), (0.0, 6), (float(values[0, 2]), 3)]
    cases.append((tie16, 2 if vdtype == torch.float16 else 3))  # fp16 values: a tie, not counted
    for tau_v, want in cases:
        rk = tb.RoutedK(values, torch.tensor(tau_v, device=DEVICE))
        assert int(rk.counts()) == want, (tau_v, vdtype)
        bad = planes[:want] + [torch.full_like(p, -1) for p in planes[want:]]
        packed = tb.pack_bitplanes(bad, scale, zero, bits, group, 192)
        out = torch.full((1, 40), float("nan"), dtype=x.dtype, device=DEVICE)
        y = tb.bitplane_linear(x, bad, scale, zero, bits, group, rk, out=out, small_config=cfg, packed=packed)
        ref = torch_reference(x, planes, scale, zero, bits, group, want, compute_dtype=torch.float64)
        assert not torch.isnan(out).any()
        err = ((y.double() - ref.double()).norm() / ref.double().norm()).item()
        assert err < TOL[torch.float16], (tau_v, want, err)


WHOLE_PRELOAD = tb.SmallConfig(bitplanes=True, whole_k=True, preload=True)


@pytest.mark.parametrize(
    "cfg", [STREAMK, WHOLE, WHOLE_PRELOAD, WHOLE_PDL], ids=["streamk", "whole_k", "whole_k_preload", "whole_k_pdl"]
)
def test_bits_kernel_span(cfg, gen, monkeypatch):
    """A ``k`` read on the device with a span of views known on the host (``span=(j, j + 1)``: only those bodies
    compiled; with ``preload`` or ``pdl`` the planes of view ``j`` loaded before ``k`` is read): both views of every
    span equal the reference, the planes past the view poisoned; a ``k`` outside the span is clamped into it; without
    a span, preloading serves every view."""
    monkeypatch.setattr(tb, "_host_k_range", lambda k_t: None)
    bits, group = DEFAULT_LAYOUT, 64
    planes, scale, zero = make_layer(40, 192, bits, group, gen)
    x = randx(1, 192, torch.float16, gen)

    def run(kk, span, upto):
        bad = planes[:upto] + [torch.full_like(p, -1) for p in planes[upto:]]
        packed = tb.pack_bitplanes(bad, scale, zero, bits, group, 192)
        out = torch.full((1, 40), float("nan"), dtype=x.dtype, device=DEVICE)
        k = torch.tensor([kk], device=DEVICE)  # (the entry would take a one-element k on the CPU as an int)
        y = tb.bitplane_linear_bits(x, packed, k, out=out, config=cfg, span=span)
        assert not torch.isnan(out).any()
        ref = torch_reference(x, planes, scale, zero, bits, group, upto, compute_dtype=torch.float64)
        return ((y.double() - ref.double()).norm() / ref.double().norm()).item()

    for j in range(1, len(bits)):
        for kk in (j, j + 1):
            assert run(kk, (j, j + 1), kk) < TOL[torch.float16], (j, kk)
    assert run(1, (3, 4), 3) < TOL[torch.float16]  # clamped up to the span
    assert run(6, (2, 3), 3) < TOL[torch.float16]  # and down
    assert run(4, (4, 4), 4) < TOL[torch.float16]  # a span of one view
    for kk in (1, 6):  # no span: every body
        assert run(kk, None, kk) < TOL[torch.float16], kk
    bp = tb.pack_bitplanes(planes, scale, zero, bits, group, 192)
    for bad_span in ((0, 2), (3, 2), (5, 7)):
        with pytest.raises(ValueError, match="span must be"):
            tb.bitplane_linear_bits(x, bp, torch.tensor([2], device=DEVICE), config=cfg, span=bad_span)


def test_site_bits_span(gen, monkeypatch):
    """A routed site launch whose layers' thresholds each lie between two views, with their span: each layer its own
    view, as without the span."""
    monkeypatch.setattr(tb, "_host_routed_k", lambda rk: None)
    monkeypatch.setattr(tb, "_num_sms", lambda device: 3)
    bits, group, n_in = DEFAULT_LAYOUT, 64, 192
    layers = [make_layer(n, n_in, bits, group, gen) for n in (130, 40)]
    site = tb.site_bitplanes([tb.pack_bitplanes(*layer, bits, group, n_in) for layer in layers])
    x = randx(1, n_in, torch.float16, gen)
    values = torch.tensor([[0.9, 0.7, 0.5, 0.3, 0.1]], device=DEVICE)
    ks = [tb.RoutedK(values, torch.tensor(t, device=DEVICE)) for t in (0.6, 0.4)]  # views 3 and 4
    for cfg in (tb.SmallConfig(bitplanes=True), WHOLE_PRELOAD):
        y = tb.bitplane_site_bits(x, site, ks, config=cfg, span=(2, 4))
        for (p, s_, z), c, n, want in zip(layers, (0, 130), (130, 40), (3, 4), strict=True):
            ref = torch_reference(x, p, s_, z, bits, group, want, compute_dtype=torch.float64)
            err = ((y[:, c : c + n].double() - ref.double()).norm() / ref.double().norm()).item()
            assert err < TOL[torch.float16], (want, err)
        torch.testing.assert_close(y, tb.bitplane_site_bits(x, site, ks, config=cfg), rtol=0, atol=0)


def test_routed_k_other_paths_and_errors(gen):
    """A ``RoutedK`` on a path that does not count in the kernel (several tokens, the PyTorch backend) is counted
    first; a ``RoutedK`` of the wrong size is refused with what it needs."""
    bits, group = DEFAULT_LAYOUT, 64
    planes, scale, zero = make_layer(24, 128, bits, group, gen)
    x = randx(5, 128, torch.float32, gen)
    j = torch.arange(5.0)
    values = torch.where(j < torch.arange(5.0)[:, None], 0.9 - 0.01 * j, 0.4 - 0.01 * j).to(DEVICE)  # token i: i above
    rk = tb.RoutedK(values, torch.tensor(0.5, device=DEVICE))
    k = rk.counts()
    assert k.tolist() == [1, 2, 3, 4, 5]
    ref = torch_reference(x, planes, scale, zero, bits, group, k, compute_dtype=torch.float64)
    for y in (
        tb.bitplane_linear(x, planes, scale, zero, bits, group, rk),
        bitplane_linear(x, planes, scale, zero, bits, group, rk, backend="torch"),
    ):
        err = ((y.double() - ref.double()).norm() / ref.double().norm()).item()
        assert err < TOL[torch.float32], err
    with pytest.raises(ValueError, match="needs 5 gate values and one threshold, got 3"):
        tb.bitplane_linear(x[:1], planes, scale, zero, bits, group, tb.RoutedK(values[0, :3], rk.tau), path="bits")


SITE_CONFIGS = [
    STREAMK,  # stream-K over 4 programs per SM, 128 rows
    tb.SmallConfig(bitplanes=True, block_n=64, block_k=32, split_k=1),  # one program per row block
    tb.SmallConfig(bitplanes=True, block_n=32, block_k=32, waves=1),  # few programs: ranges cross row blocks
    None,  # the default: whole_k here, one program per row block of every layer
    WHOLE_PDL,  # each layer's base planes loaded before its view is known
]


# Every configuration with one pair for all views; a pair per view on a stream-K and a whole-K configuration.
SITE_CASES = [(cfg, False) for cfg in SITE_CONFIGS] + [(STREAMK, True), (WHOLE_PDL, True)]


@pytest.mark.parametrize(
    "cfg,per_view",
    SITE_CASES,
    ids=["streamk", "split1", "streamk_few", "default", "whole_k_pdl", "streamk-per_view", "whole_k_pdl-per_view"],
)
def test_site_bits_kernel(cfg, per_view, gen, monkeypatch):
    """Three layers of one input (a site: q, k and v) in one launch of the one-bit plane kernel: every layer's
    outputs equal its own reference, at one static view for all and with a view each counted on the device from
    shared gate values and a threshold each (the planes past each layer's view poisoned); a bias on one layer."""
    monkeypatch.setattr(tb, "_num_sms", lambda device: 3)
    bits, group, n_in = DEFAULT_LAYOUT, 64, 192
    layers = [(make_views if per_view else make_layer)(n, n_in, bits, group, gen) for n in (200, 70, 33)]
    biases = [None, torch.randn(70, generator=gen).to(DEVICE), None]
    x = randx(1, n_in, torch.float16, gen)

    def refs(views):
        return [
            torch_reference(x, p, s_, z, bits, group, k, bias=b, compute_dtype=torch.float64)
            for (p, s_, z), b, k in zip(layers, biases, views, strict=True)
        ]

    def check_site(y, views):
        assert y.shape == (1, 303) and not torch.isnan(y).any()
        for i, (ref, c, n) in enumerate(zip(refs(views), (0, 200, 270), (200, 70, 33), strict=True)):
            err = ((y[:, c : c + n].double() - ref.double()).norm() / ref.double().norm()).item()
            assert err < TOL[torch.float16], (i, views, err)

    site = tb.site_bitplanes([tb.pack_bitplanes(*layer, bits, group, n_in) for layer in layers], biases)
    assert site.outs == (200, 70, 33) and site.rows2 == (0, 128, 192) and site.cols == (0, 200, 270)
    for k in (1, 6):  # the views between: the routed cases below
        out = torch.full((1, 303), float("nan"), dtype=x.dtype, device=DEVICE)
        check_site(tb.bitplane_site_bits(x, site, [k] * 3, out=out, config=cfg), [k] * 3)
    monkeypatch.setattr(tb, "_host_routed_k", lambda rk: None)
    values = torch.tensor([[0.9, 0.7, 0.5, 0.3, 0.1]], device=DEVICE)
    for views, taus in (((2, 4, 6), (0.8, 0.4, 0.0)), ((5, 1, 3), (0.2, 0.95, 0.6))):
        poisoned = [
            (p[:k] + [torch.full_like(q, -1) for q in p[k:]], s_, z)
            for (p, s_, z), k in zip(layers, views, strict=True)
        ]
        site = tb.site_bitplanes([tb.pack_bitplanes(*layer, bits, group, n_in) for layer in poisoned], biases)
        ks = [tb.RoutedK(values, torch.tensor(t, device=DEVICE)) for t in taus]
        assert [int(k.counts()) for k in ks] == list(views)
        out = torch.full((1, 303), float("nan"), dtype=x.dtype, device=DEVICE)
        check_site(tb.bitplane_site_bits(x, site, ks, out=out, config=cfg), views)


@pytest.mark.parametrize("n_in", [192, 576])
def test_prologues_in_the_launch(n_in, gen, monkeypatch):
    """``prologue``: the launch takes what makes its input and makes it itself (whole-K programs, each reading the
    whole row): an RMS norm for one layer and for a site of three, a gated product for one layer, at a static view
    and a view read on the device; the outputs equal the launch fed the model's own arithmetic's output; what it
    cannot serve is refused with the reason."""
    monkeypatch.setattr(tb, "_num_sms", lambda device: 3)
    bits, group = DEFAULT_LAYOUT, 64
    layers = [make_layer(n, n_in, bits, group, gen) for n in (200, 70, 33)]
    bps = [tb.pack_bitplanes(*layer, bits, group, n_in) for layer in layers]
    site = tb.site_bitplanes(bps, [None, torch.randn(70, generator=gen).to(DEVICE), None])
    x = (randx(1, n_in, torch.float16, gen) * 3).half()
    weight = (torch.rand(n_in, generator=gen) * 2 + 0.1).half().to(DEVICE)
    up = randx(1, n_in, torch.float16, gen)
    rms, silu = ("rms_norm", weight, 1e-5), ("silu_mul", up)
    whole = tb.SmallConfig(whole_k=True)
    assert tb.prologue_in_launch(x, bps[0], 200, whole)
    assert not tb.prologue_in_launch(x, bps[0], 200, tb.SmallConfig(whole_k=False))
    assert tb.takes_prologue(x, bps[0], 2, (200,), whole) and tb.takes_prologue(x, site.planes, 2, site.outs, whole)
    with monkeypatch.context() as m:  # a launch the fragment kernel serves: only with fragment_prologues
        m.setattr(tb, "fragment_serves", lambda *a, **k: True)
        assert not tb.takes_prologue(x, bps[0], 2, (200,), whole) and not tb.takes_prologue(x, bps[0], 2, (200,))
        assert tb.takes_prologue(x, bps[0], 2, (200,), tb.SmallConfig(fragment_prologues=True))
    narrow = tb.SmallConfig(whole_k=True, prologue_max_in=n_in - 1)  # wider inputs keep their norm launch
    assert not tb.takes_prologue(x, bps[0], 2, (200,), narrow) and not tb.takes_prologue(
        x, site.planes, 2, site.outs, narrow
    )
    assert tb.takes_prologue(x, bps[0], 2, (200,), dataclasses.replace(narrow, prologue_max_in=n_in))
    with pytest.raises(ValueError, match="prologue_max_in must be an int >= 0"):
        tb.SmallConfig(prologue_max_in=-1)

    def close(got, ref, what):
        err = ((got.double() - ref.double()).norm() / ref.double().norm()).item()
        assert err < TOL[torch.float16], (what, err)

    monkeypatch.setattr(tb, "_host_k_range", lambda k_t: None)  # as on a GPU: a k tensor's view unknown here
    for k in (1, 4, torch.tensor([2], device=DEVICE)):
        for pro in (rms, silu):
            made = rms_norm(x, weight, 1e-5) if pro is rms else torch.nn.functional.silu(x) * up
            ref = tb.bitplane_linear_bits(made, bps[0], k, config=whole)
            close(tb.bitplane_linear_bits(x, bps[0], k, config=whole, prologue=pro), ref, (k, pro[0]))
        ref = tb.bitplane_site_bits(rms_norm(x, weight, 1e-5), site, [k] * 3, config=whole)
        close(tb.bitplane_site_bits(x, site, [k] * 3, config=whole, prologue=rms), ref, (k, "site"))
    with pytest.raises(ValueError, match="needs whole-K programs"):
        tb.bitplane_linear_bits(x, bps[0], 2, config=tb.SmallConfig(whole_k=False), prologue=rms)
    with pytest.raises(ValueError, match=rf"its norm weight must be \[{n_in}\]"):
        tb.bitplane_linear_bits(x, bps[0], 2, config=whole, prologue=("rms_norm", weight[:-1], 1e-5))
    with pytest.raises(ValueError, match="eps must be positive"):
        tb.bitplane_linear_bits(x, bps[0], 2, config=whole, prologue=("rms_norm", weight, 0.0))
    with pytest.raises(ValueError, match="up rows must match"):
        tb.bitplane_linear_bits(x, bps[0], 2, config=whole, prologue=("silu_mul", up[:, :-1]))
    with pytest.raises(ValueError, match="prologue must be"):
        tb.bitplane_linear_bits(x, bps[0], 2, config=whole, prologue=("gelu", up))


def test_site_bits_device_k(gen, monkeypatch):
    """A site launch with one ``k`` tensor for all its layers (a router's output: one view, read on the device, as
    the bare 8B stack's routed sites take it) equals the launch at the same static view; two tensors are refused."""
    monkeypatch.setattr(tb, "_num_sms", lambda device: 3)
    bits, group, n_in = DEFAULT_LAYOUT, 64, 192
    layers = [make_layer(n, n_in, bits, group, gen) for n in (130, 40)]
    site = tb.site_bitplanes([tb.pack_bitplanes(*layer, bits, group, n_in) for layer in layers])
    x = randx(1, n_in, torch.float16, gen)
    cfg = tb.SmallConfig(bitplanes=True)
    monkeypatch.setattr(tb, "_host_k_range", lambda k_t: None)  # as on a GPU: the view unknown on the host
    k_t = torch.tensor([3], device=DEVICE)
    y = tb.bitplane_site_bits(x, site, [k_t, k_t], config=cfg)
    for (p, s_, z), c, n in zip(layers, (0, 130), (130, 40), strict=True):
        ref = torch_reference(x, p, s_, z, bits, group, 3, compute_dtype=torch.float64)
        err = ((y[:, c : c + n].double() - ref.double()).norm() / ref.double().norm()).item()
        assert err < TOL[torch.float16], err
    with pytest.raises(ValueError, match="one k tensor for all its layers"):
        tb.bitplane_site_bits(x, site, [k_t, k_t.clone()], config=cfg)
    with pytest.raises(ValueError, match="one int or one k tensor for all its layers"):
        tb.bitplane_site_bits(x, site, [3, k_t], config=cfg)


def _packed_linears(n_outs, gen, n_in=192):
    """Packed ``MoBiLinear`` of the default layout on the Triton backend, one per output width (a bias on 40)."""
    layers = []
    for n_out in n_outs:
        lin = torch.nn.Linear(n_in, n_out, bias=n_out == 40)
        with torch.no_grad():
            lin.weight.copy_(torch.randn(n_out, n_in, generator=gen) * 0.05)
        m = MoBiLinear.from_linear(lin, group_size=64, slice_bits=DEFAULT_LAYOUT)
        m.freeze()
        m.backend = "triton"
        layers.append(m.to(DEVICE))
    return layers


def _router_of(n_in, policy, gen):
    from mobiquant.nn.router import TokenRouter

    router = TokenRouter(n_in, DEFAULT_LAYOUT, hidden=24, policy=policy).to(DEVICE)
    with torch.no_grad():
        for p in router.parameters():
            p.copy_(torch.randn(p.shape, generator=gen).to(DEVICE) * 0.3)
    router.backend = "triton"
    return router


@pytest.mark.parametrize("policy", ["free", "adjacent"])
def test_bits_kernel_router_in_launch(policy, gen, monkeypatch):
    """The router in the one-bit plane launch (``RoutedK.router``): its programs write the gate values the fused
    router kernel computes, bit for bit, and each layer's output is that of a launch handed those values, for one
    linear and for a site of three with a threshold each; twice in a row (the counters reset themselves)."""
    from mobiquant.kernels.triton_router import IN_LAUNCH_TILING, fused_router

    bits, group, n_in = DEFAULT_LAYOUT, 64, 192
    router = _router_of(n_in, policy, gen)
    x = randx(1, n_in, torch.float16, gen) * 2
    buf, inl = router.in_launch(x)
    assert buf.shape == (1, 5) and buf.dtype == torch.float32
    _, ref_v = fused_router(
        x, inl.w1, inl.b1, inl.w2, inl.b2, torch.zeros((), device=DEVICE), policy, **IN_LAUNCH_TILING
    )
    vals = ref_v[0].sort(descending=True).values
    taus = [float(vals[0] + vals[1]) / 2, float(vals[2] + vals[3]) / 2, float(vals[4]) - 1.0]
    taus = [torch.tensor(t, device=DEVICE) for t in taus]
    layers = [tb.pack_bitplanes(*make_layer(n, n_in, bits, group, gen), bits, group, n_in) for n in (200, 70, 33)]
    # each grid against itself (their sums differ in order); the default with a router is the stream-K grid
    for cfg, ref_cfg in ((STREAMK, STREAMK), (WHOLE, WHOLE), (BITS, STREAMK)):
        for _ in range(2 if cfg is STREAMK else 1):  # twice: stream-K's counters reset themselves
            buf.fill_(float("nan"))
            y = tb.bitplane_linear_bits(x, layers[0], tb.RoutedK(buf, taus[1], inl), config=cfg)
            assert torch.equal(buf, ref_v), (buf, ref_v)
            ref = tb.bitplane_linear_bits(x, layers[0], tb.RoutedK(ref_v, taus[1]), config=ref_cfg)
            assert torch.equal(y, ref), (cfg, (y - ref).abs().max())
            assert not tb._route_sync(x.device).any()
    site = tb.site_bitplanes(layers)
    cfg = tb.SmallConfig(bitplanes=True, block_n=32, block_k=32, waves=1)
    monkeypatch.setattr(tb, "_host_routed_k", lambda rk: None)  # the reference counts on the "device" too
    for _ in range(2):
        buf.fill_(float("nan"))
        y = tb.bitplane_site_bits(x, site, [tb.RoutedK(buf, t, inl) for t in taus], config=cfg)
        ref = tb.bitplane_site_bits(x, site, [tb.RoutedK(ref_v, t) for t in taus], config=cfg)
        assert torch.equal(buf, ref_v) and torch.equal(y, ref)
        assert not tb._route_sync(x.device).any()
    with pytest.raises(RuntimeError, match="computed by the one-bit plane launch"):
        tb.RoutedK(buf, taus[0], inl).counts()
    with pytest.raises(ValueError, match=r"needs W1 \[H, 192\] and W2 \[5, H\]"):
        tb.bitplane_linear_bits(x, layers[0], tb.RoutedK(buf, taus[0], inl._replace(w2=inl.w2[:4])))
    with pytest.raises(ValueError, match="one in-launch router or none"):
        tb.bitplane_site_bits(
            x, site, [tb.RoutedK(buf, taus[0], inl), tb.RoutedK(buf, taus[1]), tb.RoutedK(buf, taus[2])]
        )


@pytest.mark.parametrize("whole_k", [False, True], ids=["streamk", "whole_k"])
def test_mobilinear_router_in_launch(whole_k, gen, monkeypatch):
    """With ``SmallConfig(router_in_launch=True)``, routed one-token linears whose router takes the fused kernel's
    path run it inside their own launch: a site of two (``fuse_sites``) and a linear alone take one launch each and
    no router launch, with the outputs of the router's own launch to the bit (on the same GEMV grid)."""
    from mobiquant import kernels
    from mobiquant.patching import fuse_sites

    monkeypatch.setattr(tb, "_host_routed_k", lambda rk: None)
    routers_run = []
    real_router = kernels.fused_router
    monkeypatch.setattr(kernels, "fused_router", lambda *a, **kw: routers_run.append(1) or real_router(*a, **kw))
    launches = []
    real = tb._bits_launch
    monkeypatch.setattr(tb, "_bits_launch", lambda *a, **kw: launches.append(len(a[2])) or real(*a, **kw))
    layers = _packed_linears((40, 24, 56), gen)
    site_router, own_router = _router_of(192, "free", gen), _router_of(192, "adjacent", gen)
    for m, r, tau in zip(layers, (site_router, site_router, own_router), (0.3, -0.5, 0.9), strict=True):
        m.attach_router(r)
        m.set_routed()
        m.route_tau = torch.tensor(tau, device=DEVICE)
    assert fuse_sites(torch.nn.ModuleList(layers)) == 1
    x = randx(1, 192, torch.float32, gen) * 3

    def forward(cfg):
        for m in layers:
            m.small_config = cfg
        for r in (site_router, own_router):
            r.clear_cache()
        launches.clear()
        routers_run.clear()
        return [m(x).clone() for m in layers]

    inside = forward(tb.SmallConfig(router_in_launch=True, whole_k=whole_k))
    assert launches == [2, 1] and routers_run == []
    outside = forward(tb.SmallConfig(whole_k=whole_k))  # the router's own launch, as by default
    assert launches == [2, 1] and len(routers_run) == 2
    for a, b in zip(inside, outside, strict=True):
        assert torch.equal(a, b)


def test_site_bits_errors(gen):
    bits, group = DEFAULT_LAYOUT, 64
    a = tb.pack_bitplanes(*make_layer(40, 128, bits, group, gen), bits, group, 128)
    b = tb.pack_bitplanes(*make_layer(40, 192, bits, group, gen), bits, group, 192)
    with pytest.raises(ValueError, match="one input width, slice layout"):
        tb.site_bitplanes([a, b])
    site = tb.site_bitplanes([a, a])
    x = randx(1, 128, torch.float16, gen)
    with pytest.raises(ValueError, match="one static view for all its layers"):
        tb.bitplane_site_bits(x, site, [1, 2])
    with pytest.raises(ValueError, match="needs one k each"):
        tb.bitplane_site_bits(x, site, [1])
    with pytest.raises(ValueError, match="whole blocks of 256 rows"):
        tb.bitplane_site_bits(x, site, [1, 1], config=tb.SmallConfig(bitplanes=True, block_n=256))
    shifted = dataclasses.replace(site, rows2=(0, 32))  # the second layer's rows not from a multiple of 128
    with pytest.raises(ValueError, match="each layer from a multiple of 128 rows"):
        tb.bitplane_site_bits(x, shifted, [1, 1], config=tb.SmallConfig(bitplanes=True, block_n=16))


@pytest.mark.parametrize("scale_x", [1e-4, 3e3])
def test_bits_kernel_activation_range(scale_x, gen):
    bits, group = DEFAULT_LAYOUT, 128
    planes, scale, zero = make_layer(32, 256, bits, group, gen)
    for dtype in (torch.float16, torch.bfloat16):
        x = (randx(1, 256, torch.float32, gen) * scale_x).to(dtype)
        for k in (1, 6):
            check(x, planes, scale, zero, bits, group, k, small_config=BITS)


def test_bits_kernel_dispatch_and_errors(gen, monkeypatch):
    """'auto' takes the one-bit plane kernel for one token of a layout the small-batch kernels do not cover (the
    default [3, 1, 1, 1, 1, 1]), or of any layout with ``SmallConfig(bitplanes=True)``; never with ``bitplanes=False``
    or for more tokens. The cache returns the same buffers for unchanged planes."""
    assert tb.wants_bitplanes(DEFAULT_LAYOUT, 64) and tb.wants_bitplanes(DEFAULT_LAYOUT, 64, tb.SmallConfig())
    assert not tb.wants_bitplanes(DEFAULT_LAYOUT, 64, tb.SmallConfig(bitplanes=False))
    assert not tb.wants_bitplanes((2, 2, 2, 2), 64) and tb.wants_bitplanes((2, 2, 2, 2), 64, BITS)
    assert not tb.wants_bitplanes((3, 3, 3), 64, BITS)  # 9 bits: views beyond 8-bit codes
    bits, group = DEFAULT_LAYOUT, 64
    planes, scale, zero = make_layer(16, 128, bits, group, gen)
    bp = tb.bitplanes_for(planes, scale, zero, bits, group, 128)
    assert tb.bitplanes_for(planes, scale, zero, bits, group, 128) is bp
    taken = []
    real = tb.bitplane_linear_bits
    monkeypatch.setattr(tb, "bitplane_linear_bits", lambda *a, **kw: taken.append(1) or real(*a, **kw))
    x = randx(3, 128, torch.float32, gen)
    check(x, planes, scale, zero, bits, group, 2, small_config=BITS)  # 3 tokens: not the one-bit plane kernel
    assert not taken
    check(x[:1], planes, scale, zero, bits, group, 2)  # the default config: one-bit planes for this layout
    assert len(taken) == 1
    check(x[:1], planes, scale, zero, bits, group, 2, small_config=tb.SmallConfig(bitplanes=False))
    assert len(taken) == 1
    with pytest.raises(ValueError, match="one token"):
        tb.bitplane_linear_bits(x, bp, 1)
    with pytest.raises(ValueError, match="block_k"):
        tb.bitplane_linear_bits(x[:1], bp, 1, config=tb.SmallConfig(bitplanes=True, block_k=48))
    with pytest.raises(ValueError, match="prefetch"):
        tb.bitplane_linear_bits(x[:1], bp, 1, config=tb.SmallConfig(bitplanes=True, block_k=32, prefetch=True))
    with pytest.raises(ValueError):
        tb.bitplane_linear_bits(x[:1], bp, 7)
    # whole_k None: K <= 4096 and at most 8192 rows in the launch; True refuses what it cannot hold
    assert tb._whole_k_words(tb.SmallConfig(), 256, 8, 8192) == 256 and tb._whole_k_words(WHOLE, 36, 4, 9000) == 64
    assert tb._whole_k_words(tb.SmallConfig(), 256, 8, 8193) == 0 and tb._whole_k_words(STREAMK, 8, 8, 16) == 0
    assert tb._whole_k_words(tb.SmallConfig(), 896, 8, 4096) == 0 and tb._whole_k_words(tb.SmallConfig(), 6, 6, 8) == 0
    with pytest.raises(ValueError, match="stages must be a positive number of pipeline stages, without prefetch"):
        cfg = tb.SmallConfig(bitplanes=True, block_k=64, prefetch=True, stages=2)
        tb.bitplane_linear_bits(x[:1], bp, 1, config=cfg)
    with pytest.raises(ValueError, match="ahead must be a number of groups >= 0, without prefetch; got 1"):
        cfg = tb.SmallConfig(bitplanes=True, block_k=64, prefetch=True, ahead=1)
        tb.bitplane_linear_bits(x[:1], bp, 1, config=cfg)
    with pytest.raises(ValueError, match="ahead must be a number of groups >= 0, without prefetch; got -1"):
        tb.bitplane_linear_bits(x[:1], bp, 1, config=tb.SmallConfig(bitplanes=True, ahead=-1))
    with pytest.raises(ValueError, match="whole_k takes no prefetch, split_k, waves, stages or ahead"):
        tb.bitplane_linear_bits(x[:1], bp, 1, config=tb.SmallConfig(bitplanes=True, whole_k=True, ahead=2))
    with pytest.raises(ValueError, match="whole_k takes no prefetch, split_k, waves, stages or ahead"):
        tb.bitplane_linear_bits(x[:1], bp, 1, config=tb.SmallConfig(bitplanes=True, whole_k=True, split_k=2))
    with pytest.raises(ValueError, match=r"whole_k needs block_n a power of two in \[2, 128\], got 256"):
        tb.bitplane_linear_bits(x[:1], bp, 1, config=tb.SmallConfig(bitplanes=True, whole_k=True, block_n=256))
    wide = tb.BitPlanes(bp.words.new_zeros(8, 320, 64), bp.sz.new_zeros(2, 80, 64), bits, group, 5120, 16)
    with pytest.raises(ValueError, match="whole_k needs at most 4096 input features .* got 5120 features"):
        tb.bitplane_linear_bits(x[:1].new_zeros(1, 5120), wide, 1, config=WHOLE)
    with pytest.raises(ValueError, match="another layout"):
        tb.bitplane_linear(x[:1], planes, scale, zero, bits, 32, 1, path="bits", packed=bp)


def test_bits_kernel_pdl_changes_no_arithmetic(gen, monkeypatch):
    """``SmallConfig.pdl`` moves the weight loads before the wait on the kernel before (whole-K: all of a known
    view's; a view known on the device: the base planes; stream-K with ``l2_prefetch``: its L2 requests) and changes
    nothing else: every output is bit-equal to the launch without it, for a static view, ``k`` on the device and a
    routed site of three on both grids; it needs compute capability 9.0 on a GPU."""
    monkeypatch.setattr(tb, "_host_k_range", lambda k_t: None)
    monkeypatch.setattr(tb, "_host_routed_k", lambda rk: None)
    bits, group, n_in = DEFAULT_LAYOUT, 64, 192
    layers = [tb.pack_bitplanes(*make_layer(n, n_in, bits, group, gen), bits, group, n_in) for n in (200, 70, 33)]
    site = tb.site_bitplanes(layers)
    x = randx(1, n_in, torch.float16, gen)
    values = torch.tensor([[0.9, 0.7, 0.5, 0.3, 0.1]], device=DEVICE)
    taus = [torch.tensor(t, device=DEVICE) for t in (0.8, 0.0, 0.4)]  # views 2, 6 and 4
    for base in (STREAMK, WHOLE, dataclasses.replace(STREAMK, l2_prefetch=True)):
        pdl = dataclasses.replace(base, pdl=True)
        for k in (6, torch.tensor([3], device=DEVICE)):
            a, b = (tb.bitplane_linear_bits(x, layers[0], k, config=c) for c in (base, pdl))
            assert torch.equal(a, b), (base, k)
        a, b = (tb.bitplane_site_bits(x, site, [tb.RoutedK(values, t) for t in taus], config=c) for c in (base, pdl))
        assert torch.equal(a, b), base
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    with pytest.raises(ValueError, match=r"pdl \(programmatic dependent launch\) needs compute capability 9.0 .* 8.0"):
        tb._check_pdl(torch.device("cuda", 0))
    tb._check_pdl(torch.device("cpu"))  # the interpreter: nothing to check


def _pdl_marks(gen, monkeypatch, static_ks):
    """A function of ``(config, reference config)`` that runs a set of one-token launches (one layer at each static
    view of ``static_ks``, a site of two layers at view 2, a view on the device, a routed site), asserts each output
    equal to the reference config's and returns the names of the launches that asked for programmatic dependent
    launch (their check ran)."""
    monkeypatch.setattr(tb, "_host_k_range", lambda k_t: None)
    monkeypatch.setattr(tb, "_host_routed_k", lambda rk: None)
    checked = []
    monkeypatch.setattr(tb, "_check_pdl", lambda device: checked.append(device))
    bits, group, n_in = DEFAULT_LAYOUT, 64, 192
    layers = [tb.pack_bitplanes(*make_layer(n, n_in, bits, group, gen), bits, group, n_in) for n in (200, 70)]
    site = tb.site_bitplanes(layers)
    x = randx(1, n_in, torch.float16, gen)
    values = torch.tensor([[0.9, 0.7, 0.5, 0.3, 0.1]], device=DEVICE)
    taus = [torch.tensor(t, device=DEVICE) for t in (0.8, 0.4)]
    k_dev = torch.tensor([3], device=DEVICE)
    launches = {f"static {k}": (lambda c, k=k: tb.bitplane_linear_bits(x, layers[0], k, config=c)) for k in static_ks}
    launches["site static 2"] = lambda c: tb.bitplane_site_bits(x, site, [2, 2], config=c)
    launches["device"] = lambda c: tb.bitplane_linear_bits(x, layers[0], k_dev, config=c)
    launches["routed"] = lambda c: tb.bitplane_site_bits(x, site, [tb.RoutedK(values, t) for t in taus], config=c)

    def marks(cfg, ref):
        marked = set()
        for name, launch in launches.items():
            want = launch(ref)  # the reference's own marks are not counted
            n = len(checked)
            assert torch.equal(launch(cfg), want), (cfg.pdl, name)
            if len(checked) > n:
                marked.add(name)
        return marked

    return marks


def test_pdl_static_marks_only_the_static_views_launches(gen, monkeypatch):
    """``SmallConfig(pdl="static")``: a static view's launch has programmatic dependent launch (its check runs), a
    view on the device's and a routed site's do not (``pdl=True`` and ``"views"``: all of them); the outputs are those
    without it."""
    marks = _pdl_marks(gen, monkeypatch, (6,))
    static, every = {"static 6", "site static 2"}, {"static 6", "site static 2", "device", "routed"}
    # None on a GPU of compute capability 9.0+: static views of at most 4 planes and views read on the device with no
    # router in the launch (the routed site here is given its values); elsewhere none
    default = {"site static 2", "device", "routed"} if tb._pdl_capable(torch.device(DEVICE)) else set()
    for pdl, want in (("static", static), (True, every), ("views", every), (False, set()), (None, default)):
        assert marks(dataclasses.replace(WHOLE, pdl=pdl), WHOLE) == want, pdl
    assert tb.launch_pdl(None, True) is False and tb.launch_pdl(tb.SmallConfig(pdl="static"), False) is False
    assert tb.launch_pdl(tb.SmallConfig(pdl="views"), False, router=True) is False  # routers: only with True
    assert tb.launch_pdl(tb.SmallConfig(pdl=True), False, router=True) is True
    with pytest.raises(ValueError, match=r"pdl must be None \(the measured rule: .* at most 4 planes, .*\), False, "
                       r"True, 'static' .* or 'views' .* got 'yes'"):  # fmt: skip
        tb.SmallConfig(pdl="yes")


def test_pdl_default_marks_static_views_of_at_most_four_planes(gen, monkeypatch):
    """``SmallConfig.pdl`` None (the default): on a card that has it, the launches of static views of at most
    :data:`PDL_MAX_PLANES` planes, views on the device and routed sites (no router in the launch) have programmatic
    dependent launch, those of wider static views not; on a card without it (or the CPU) none; the outputs are those
    without it; a router's launch never."""
    marks = _pdl_marks(gen, monkeypatch, (1, 2, 3, 6))
    off = dataclasses.replace(WHOLE, pdl=False)
    assert WHOLE.pdl is None and tb.PDL_MAX_PLANES == 4
    views = {"static 1", "static 2", "site static 2", "device", "routed"}
    for capable, want in ((True, views), (False, set())):
        monkeypatch.setattr(tb, "_pdl_capable", lambda device, capable=capable: capable)
        assert marks(WHOLE, off) == want, capable
    monkeypatch.undo()
    assert not tb._pdl_capable(torch.device("cpu")) and tb._pdl_capable(None)
    assert [tb.launch_pdl(None, True, p) for p in (0, 3, 4, 5)] == [False, True, True, False]
    assert tb.launch_pdl(None, False) and not tb.launch_pdl(None, False, router=True)


# ------------------------------------------------------------------------------ layouts and configs
@pytest.mark.parametrize(
    "bits,group,n_out,n_in",
    [
        ((2, 2, 2, 2), 128, 40, 256),
        ((4, 4), 48, 24, 130),  # group not a power of two: one-token kernel chunks inside groups
        ((4, 2, 2), 64, 24, 130),
        ((3, 3, 2), 64, 24, 130),  # 10 codes per word: tile path with gathered words
        ((1,) * 8, 64, 16, 96),
        ((8,), 32, 24, 130),
        ((2, 2, 2, 2), 100, 24, 230),  # group size with no power-of-two chunk: scale per column
    ],
    ids=str,
)
def test_slice_layouts(bits, group, n_out, n_in, gen):
    planes, scale, zero = make_layer(n_out, n_in, bits, group, gen)
    ks = sorted({1, (len(bits) + 1) // 2, len(bits)}) if len(bits) < 8 else [1, 8]
    for m in (1, 3, 20):
        x = randx(m, n_in, torch.float16, gen)
        for k in ks:
            check(x, planes, scale, zero, bits, group, k)
        kt = torch.randint(1, len(bits) + 1, (m,), generator=gen).to(DEVICE)
        check(x, planes, scale, zero, bits, group, kt)


@pytest.mark.parametrize(
    "cfg,m",
    [
        (tb.SmallConfig(block_n=16, split_k=1), 1),
        (tb.SmallConfig(block_n=16, split_k=3), 1),  # uneven split of 4 chunks
        (tb.SmallConfig(block_n=32, block_k=128, split_k=2), 1),  # two groups per chunk
        (tb.SmallConfig(block_n=16, split_k=2, magic=False), 1),
        (tb.SmallConfig(block_n=16, block_k=64, split_k=3), 7),
        (tb.SmallConfig(block_n=32, split_k=1, magic=False), 9),
    ],
    ids=str,
)
def test_small_configs(cfg, m, gen):
    bits, group = (2, 2, 2, 2), 64
    planes, scale, zero = make_layer(40, 256, bits, group, gen)
    bias = torch.randn(40, generator=gen).to(DEVICE)
    for dtype in (torch.float16, torch.float32):
        x = randx(m, 256, dtype, gen)
        check(x, planes, scale, zero, bits, group, 3, bias=bias, path="small", small_config=cfg)
        kt = torch.randint(1, 5, (m,), generator=gen).to(DEVICE)
        check(x, planes, scale, zero, bits, group, kt, bias=bias, path="small", small_config=cfg)


def test_split_k_counters_reset(gen):
    """The serial split-K counters reset themselves: repeated launches stay correct."""
    bits, group = (2, 2, 2, 2), 64
    planes, scale, zero = make_layer(32, 256, bits, group, gen)
    cfg = tb.SmallConfig(block_n=16, split_k=4)
    for _ in range(3):
        x = randx(2, 256, torch.float32, gen)
        check(x, planes, scale, zero, bits, group, 2, path="small", small_config=cfg)


def test_tile_configs(gen):
    bits, group = (2, 2, 2, 2), 64
    planes, scale, zero = make_layer(40, 200, bits, group, gen)
    x = randx(25, 200, torch.float16, gen)
    kt = torch.randint(1, 5, (25,), generator=gen)
    for cfg in (tb.TileConfig(16, 32, 32, 1, 1, 1), tb.TileConfig(32, 32, 64, 2, 2, 2)):
        check(x, planes, scale, zero, bits, group, 2, path="tile", tile_config=cfg)
        check(x, planes, scale, zero, bits, group, kt.to(DEVICE), path="tile", tile_config=cfg)
    # k given on the host: only the k values present are launched
    check(x, planes, scale, zero, bits, group, kt, path="tile")


@pytest.mark.parametrize(
    "bits,group,block_k",
    [((2, 2, 2, 2), 64, 128), (DEFAULT_LAYOUT, 128, 128), (DEFAULT_LAYOUT, 128, 64), (DEFAULT_LAYOUT, 64, 128)],
    ids=["gathered-steps", "row-steps", "row-steps-half-group", "default-gathered"],
)
def test_dequantize_kernel(bits, group, block_k, gen):
    """Every view of the dequantize pass, with a block of columns inside one group (one step a row, broadcast) and
    across groups (a step an element); ragged K (a partial last group and word)."""
    planes, scale, zero = make_layer(40, 200, bits, group, gen)
    for k in range(1, len(bits) + 1):
        w = tb.dequantize(planes, scale, zero, bits, group, k, 200, dtype=torch.float32, block_k=block_k)
        ref = dequantize_reference(planes, scale, zero, bits, group, k, 200)
        torch.testing.assert_close(w, ref, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize(
    "bits,group,n_out,n_in,per_view,blocks",
    [
        (DEFAULT_LAYOUT, 128, 70, 300, False, (32, 8, 4)),
        (DEFAULT_LAYOUT, 64, 130, 192, True, (16, 4, 4)),
        ((2, 2, 2, 2), 128, 40, 256, False, (64, 16, 8)),
        ((4, 4), 32, 34, 96, True, (8, 2, 2)),
    ],
    ids=["default-ragged", "default-per-view", "two-bit-slices", "two-slices-small-groups"],
)
def test_dequantize_bits_kernel(bits, group, n_out, n_in, per_view, blocks, gen):
    """The dequantize pass over one-bit plane buffers writes the views' weights (float rounding apart), every view, with
    ragged rows (odd, not a multiple of the block) and columns (a partial last group), a pair per view or one."""
    planes, scale, zero = (make_views if per_view else make_layer)(n_out, n_in, bits, group, gen)
    bp = tb.pack_bitplanes(planes, scale, zero, bits, group, n_in)
    br, bw, nw = blocks
    for k in range(1, len(bits) + 1):
        ref = dequantize_reference(planes, scale, zero, bits, group, k, n_in)
        out = torch.full((n_out, n_in), float("nan"), device=DEVICE)
        w = tb.dequantize_bits(bp, k, out=out, block_r=br, block_w=bw, num_warps=nw)
        assert w is out
        torch.testing.assert_close(w, ref, rtol=1e-6, atol=1e-6)


def test_dequantize_bits_rejects_bad_blocks(gen):
    planes, scale, zero = make_layer(8, 128, DEFAULT_LAYOUT, 128, gen)
    bp = tb.pack_bitplanes(planes, scale, zero, DEFAULT_LAYOUT, 128, 128)
    with pytest.raises(ValueError, match="block_r: a power of two up to 64"):
        tb.dequantize_bits(bp, 1, block_r=128)
    with pytest.raises(ValueError, match="block_w: a power of two"):
        tb.dequantize_bits(bp, 1, block_w=3)
    with pytest.raises(ValueError, match="k must be between 1 and 6"):
        tb.dequantize_bits(bp, 7)
    with pytest.raises(ValueError, match="out must be a contiguous tensor of shape"):
        tb.dequantize_bits(bp, 1, out=torch.empty(8, 64, device=DEVICE))


def test_dequant_path_reads_packed_buffers(gen):
    """The 'dequant' path with ``packed`` reads the one-bit plane buffers (one view and mixed views) and gives the
    planes' result; buffers of another layer are refused."""
    bits, group = DEFAULT_LAYOUT, 64
    planes, scale, zero = make_layer(48, 192, bits, group, gen)
    bp = tb.pack_bitplanes(planes, scale, zero, bits, group, 192)
    x = randx(5, 192, torch.float32, gen)
    for k in (3, torch.tensor([1, 6, 2, 2, 5], device=DEVICE)):
        y = tb.bitplane_linear(x, planes, scale, zero, bits, group, k, path="dequant", packed=bp)
        torch.testing.assert_close(y, tb.bitplane_linear(x, planes, scale, zero, bits, group, k, path="dequant"))
    other = tb.pack_bitplanes(*make_layer(32, 192, bits, group, gen), bits, group, 192)
    with pytest.raises(ValueError, match="another layout or layer"):
        tb.bitplane_linear(x, planes, scale, zero, bits, group, 3, path="dequant", packed=other)


# ------------------------------------------------------------------------------------ MoBiLinear hook
def _frozen_layer(n_in, n_out, group, gen, bias=True):
    lin = torch.nn.Linear(n_in, n_out, bias=bias)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(n_out, n_in, generator=gen) * 0.05)
        if bias:
            lin.bias.copy_(torch.randn(n_out, generator=gen))
    m = MoBiLinear.from_linear(lin, group_size=group)
    m.freeze()
    return m.to(DEVICE)


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32], ids=lambda d: str(d).split(".")[-1])
def test_mobilinear_backend_matches_dequantized(dtype, gen):
    m = _frozen_layer(200, 48, 64, gen).to(dtype)
    for tokens in (1, 4, 19):
        x = randx(tokens, 200, dtype, gen)
        for k in range(1, 5):
            m.set_static(k)
            m.backend = "triton"
            y = m(x)
            ref = x.double() @ m.dequantized(k).double().T + m.bias.double()
            err = ((y.double() - ref).norm() / ref.norm()).item()
            assert err < TOL[dtype], (tokens, k, err)
            m.backend = "torch"
            torch.testing.assert_close(m(x), y, rtol=TOL[dtype] * 5, atol=TOL[dtype] * 5)


@pytest.mark.parametrize(
    "from_bits, min_weights, reads_bits",
    [(False, 0, False), (True, 1 << 30, True), (None, 40 * 192, True), (None, 40 * 192 + 1, False)],
    ids=["never", "always", "by-size-large", "by-size-small"],
)
def test_mobilinear_prompt_dequantizes_from_its_buffers(from_bits, min_weights, reads_bits, gen, monkeypatch):
    """``DEQUANT_FROM_BITS`` True: a packed layer hands its one-bit plane buffers to a prompt's forward (the
    dequantize pass reads them); False: never; None (default): from ``DEQUANT_BITS_MIN_WEIGHTS`` weights. The
    output is the dequantized view's either way."""
    seen = []
    real = tb.bitplane_linear
    monkeypatch.setattr(tb, "bitplane_linear", lambda *a, **kw: seen.append(kw.get("packed")) or real(*a, **kw))
    monkeypatch.setattr(tb, "DEQUANT_FROM_BITS", from_bits)
    monkeypatch.setattr(tb, "DEQUANT_BITS_MIN_WEIGHTS", min_weights)
    assert tb.dequant_from_bits(DEFAULT_LAYOUT, 64, 40, 192) is reads_bits
    assert not tb.dequant_from_bits((3, 1, 1, 1, 1, 1), 8, 40, 192)  # groups of half a word: no buffers
    lin = torch.nn.Linear(192, 40, bias=False)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(40, 192, generator=gen) * 0.05)
    m = MoBiLinear.from_linear(lin, group_size=64, slice_bits=DEFAULT_LAYOUT)
    m.freeze()
    m = m.to(DEVICE)
    m.backend = "triton"
    m.set_static(3)
    x = randx(7, 192, torch.float32, gen)
    y = m(x)
    assert (seen[-1] is m.bitplane_buffers()) if reads_bits else seen[-1] is None
    ref = x.double() @ m.dequantized(3).double().T
    assert ((y.double() - ref).norm() / ref.norm()).item() < TOL[torch.float32]


@pytest.mark.parametrize("config", [None, BITS], ids=["default", "forced"])
def test_mobilinear_bitplanes(config, gen, monkeypatch):
    """The default layout 3-1-1-1-1-1 in a MoBiLinear takes the one-bit plane kernel for one token, by default
    and when forced: every view of one token matches the dequantized view; the kernel buffers are the layer's
    own, built once and dropped when the device changes."""
    from mobiquant.patching import set_small_config

    calls = []
    real = tb.bitplane_linear_bits
    monkeypatch.setattr(tb, "bitplane_linear_bits", lambda *a, **kw: calls.append(1) or real(*a, **kw))

    lin = torch.nn.Linear(192, 40)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(40, 192, generator=gen) * 0.05)
    m = MoBiLinear.from_linear(lin, group_size=64, slice_bits=DEFAULT_LAYOUT)
    m.freeze()
    m = m.to(DEVICE).to(torch.float16)
    m.backend = "triton"
    model = torch.nn.Sequential(m)
    set_small_config(model, config)
    x = randx(1, 192, torch.float16, gen)
    for k in range(1, 7):
        m.set_static(k)
        y = m(x)
        ref = x.double() @ m.dequantized(k).double().T + m.bias.double()
        err = ((y.double() - ref).norm() / ref.norm()).item()
        assert err < TOL[torch.float16], (k, err)
    assert len(calls) == 6
    assert m._bitplanes is not None  # the layer passed its own buffers (not the module-level cache)
    bp = m.bitplane_buffers()
    assert bp is m.bitplane_buffers() and bp.words.shape[0] == 8
    m.to(torch.float16)
    assert m._bitplanes is None


def test_mobilinear_routed_backend(gen):
    from mobiquant.nn.router import TokenRouter

    m = _frozen_layer(128, 32, 64, gen, bias=False)
    router = TokenRouter(128, m.slice_bits, policy="free").to(DEVICE)
    m.attach_router(router)
    m.set_routed()
    x = randx(12, 128, torch.float32, gen) * 3
    scores = torch.cummin(router.scores(x), -1).values.detach()
    router.tau.fill_(float(scores.median()))  # a mix of slice counts
    k = router.slice_counts(x)
    m.backend = "torch"
    ref = m(x)
    m.backend = "triton"
    y = m(x)
    torch.testing.assert_close(y, ref, rtol=1e-4, atol=1e-4)
    assert k.unique().numel() > 1


def test_mobilinear_routed_one_token_counts_in_kernel(gen, monkeypatch):
    """Two linears of one site (a shared router, each its own threshold tensor, as a budget plan deploys them):
    one token on the one-bit plane kernel gives each linear its own view, and no torch op turns the router's
    values into counts (the kernel counts them: no launch per linear besides its GEMV)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from mobiquant.nn.router import TokenRouter

    monkeypatch.setattr(tb, "_host_routed_k", lambda rk: None)  # count on the "device", also in the interpreter

    class Ops(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.names = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.names.append(func.__name__)
            return func(*args, **(kwargs or {}))

    layers = []
    for n_out in (40, 24):
        lin = torch.nn.Linear(192, n_out, bias=False)
        with torch.no_grad():
            lin.weight.copy_(torch.randn(n_out, 192, generator=gen) * 0.05)
        m = MoBiLinear.from_linear(lin, group_size=64, slice_bits=DEFAULT_LAYOUT)
        m.freeze()
        layers.append(m.to(DEVICE))
    router = TokenRouter(192, DEFAULT_LAYOUT, policy="adjacent").to(DEVICE)  # strictly decreasing gate values
    x = randx(1, 192, torch.float32, gen) * 3
    vals = router.gate_values(router.scores(x)).detach()[0]
    distinct = torch.unique(vals).flip(0)  # descending
    assert distinct.numel() >= 3, vals
    taus = [float(distinct[0] + distinct[1]) / 2, float(distinct[-2] + distinct[-1]) / 2]
    wants = [1 + int((vals > t).sum()) for t in taus]  # two different views of the token
    assert wants[0] < wants[1]
    for m, tau in zip(layers, taus, strict=True):
        m.attach_router(router)
        m.set_routed()
        m.route_tau = torch.tensor(tau, device=DEVICE)
    for want, m in zip(wants, layers, strict=True):
        m.backend = "triton"
        m(x)  # builds the layer's kernel buffers
        router.clear_cache()
        with Ops() as ops:
            y = m(x)
        assert not {"gt.Tensor", "gt.Scalar", "sum.dim_IntList"} & set(ops.names), ops.names
        ref = x.double() @ m.dequantized(want).double().T
        err = ((y.double() - ref).norm() / ref.norm()).item()
        assert err < TOL[torch.float32], (want, err)
        m.backend = "torch"
        torch.testing.assert_close(m(x), y, rtol=1e-4, atol=1e-4)


def test_fused_site_one_launch_per_site(gen, monkeypatch):
    """``patching.fuse_sites``: three linears of one router (q, k, v; each its own threshold tensor) serve one
    token from one launch, each the output of its own launch; so do static views; members at different static
    views, or ungrouped, launch one by one."""
    from mobiquant.nn.router import TokenRouter
    from mobiquant.patching import fuse_sites

    monkeypatch.setattr(tb, "_host_routed_k", lambda rk: None)
    launches = []
    real = tb._bits_launch
    monkeypatch.setattr(tb, "_bits_launch", lambda *a, **kw: launches.append(len(a[2])) or real(*a, **kw))
    layers = _packed_linears((40, 24, 24), gen)
    model = torch.nn.ModuleList(layers)
    router = TokenRouter(192, DEFAULT_LAYOUT, policy="adjacent").to(DEVICE)
    x = randx(1, 192, torch.float32, gen) * 3
    vals = router.gate_values(router.scores(x)).detach()[0]
    taus = [float(vals[0] + vals[1]) / 2, float(vals[2] + vals[3]) / 2, -10.0]  # views 2, 4 and 6
    for m, tau in zip(layers, taus, strict=True):
        m.attach_router(router)
        m.set_routed()
        m.route_tau = torch.tensor(tau, device=DEVICE)

    def forward():
        launches.clear()
        router.clear_cache()
        return [m(x) for m in layers]

    alone = forward()
    assert launches == [1, 1, 1]
    assert fuse_sites(model) == 1
    fused = forward()
    assert launches == [3]  # one launch, three segments
    for want, m, a, f in zip((2, 4, 6), layers, alone, fused, strict=True):
        ref = x.double() @ m.dequantized(want).double().T + (m.bias.double() if m.bias is not None else 0)
        assert ((f.double() - ref).norm() / ref.norm()).item() < TOL[torch.float32], want
        torch.testing.assert_close(f, a, rtol=1e-5, atol=1e-5)
    for m in layers:
        m.set_static(3)
    static = forward()
    assert launches == [3]
    for m, y in zip(layers, static, strict=True):
        ref = x.double() @ m.dequantized(3).double().T + (m.bias.double() if m.bias is not None else 0)
        assert ((y.double() - ref).norm() / ref.norm()).item() < TOL[torch.float32]
    layers[1].set_static(4)  # different static views: each its own launch
    forward()
    assert launches == [1, 1, 1]
    assert fuse_sites(model, enable=False) == 0
    forward()
    assert launches == [1, 1, 1]


def test_adjacent_pairs_compile_two_bodies(gen, monkeypatch):
    """Linears whose tokens choose between two adjacent views (thresholds inside the adjacent policy's bands, each
    linear's ``pair_k`` as decode sets it) with ``SmallConfig(span_bodies=True)``: one token's launches get the
    span of their pairs (one linear: its pair; a fused site: the pairs' union) and give the outputs of the launches
    without it; without the knob no span is passed."""
    from mobiquant.nn.router import TokenRouter
    from mobiquant.patching import fuse_sites

    monkeypatch.setattr(tb, "_host_routed_k", lambda rk: None)
    spans = []
    real = tb._bits_launch
    monkeypatch.setattr(tb, "_bits_launch", lambda *a: spans.append(a[12] if len(a) > 12 else None) or real(*a))
    layers = _packed_linears((40, 24, 24), gen)
    router = TokenRouter(192, DEFAULT_LAYOUT, policy="adjacent").to(DEVICE)
    x = randx(1, 192, torch.float32, gen) * 3
    vals = router.gate_values(router.scores(x)).detach()[0]
    # inside the bands of residual slices 1, 2 and 2: pairs (2, 3), (3, 4), (3, 4); the first two below the token's
    # value (the upper view), the last above it (the lower)
    floors = router._band_floors()
    taus = [max(floors[1], float(vals[1]) - 0.01), max(floors[2], float(vals[2]) - 0.01)]
    taus.append(min(floors[2] + 0.99, float(vals[2]) + 0.01))
    for m, tau in zip(layers, taus, strict=True):
        m.attach_router(router)
        m.set_routed()
        m.route_tau = torch.tensor(tau, device=DEVICE)
        m.pair_k = router.adjacent_view(tau)
    assert [m.pair_k for m in layers] == [2, 3, 3]

    def forward(span_bodies):
        for m in layers:
            m.small_config = tb.SmallConfig(bitplanes=True, span_bodies=span_bodies)
        spans.clear()
        router.clear_cache()
        return [m(x) for m in layers]

    for fused in (False, True):
        if fused:
            assert fuse_sites(torch.nn.ModuleList(layers)) == 1
        plain = forward(False)
        assert spans == ([None] if fused else [None] * 3)
        two = forward(True)
        assert spans == ([(2, 4)] if fused else [(2, 3), (3, 4), (3, 4)])
        for a, b in zip(plain, two, strict=True):
            torch.testing.assert_close(a, b, rtol=0, atol=0)
    wants = [1 + int((vals > t).sum()) for t in taus]
    assert wants == [3, 4, 3]
    for want, m, y in zip(wants, layers, two, strict=True):
        ref = x.double() @ m.dequantized(want).double().T + (m.bias.double() if m.bias is not None else 0)
        assert ((y.double() - ref).norm() / ref.norm()).item() < TOL[torch.float32], want


def test_triton_backend_is_inference_only(gen):
    """The kernels carry no autograd: an input that needs gradients is refused by backend='triton' with a
    clear error (backend='auto' takes the PyTorch path for it), and the same input runs under no_grad."""
    m = _frozen_layer(64, 16, 32, gen)
    m.set_static(2)
    m.backend = "triton"
    x = randx(3, 64, torch.float32, gen).requires_grad_(True)
    with pytest.raises(RuntimeError, match="inference only"):
        m(x)
    with torch.no_grad():
        y = m(x)
    m.backend = "auto"
    assert not m._use_triton(x)
    y_auto = m(x)
    y_auto.sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()
    torch.testing.assert_close(y_auto.detach(), y, rtol=1e-4, atol=1e-4)


def test_backend_auto_uses_torch_on_cpu(gen):
    m = _frozen_layer(64, 16, 32, gen).cpu()
    assert m.backend == "auto"
    assert not m._use_triton(torch.zeros(1, 64))
    m.backend = "torch"
    assert not m._use_triton(torch.zeros(1, 64))


# ---------------------------------------------------------------------------------- API and errors
def test_entry_dispatch_and_errors(gen):
    bits, group = (2, 2, 2, 2), 64
    planes, scale, zero = make_layer(16, 64, bits, group, gen)
    x = randx(2, 64, torch.float32, gen)
    y_t = bitplane_linear(x, planes, scale, zero, bits, group, 2, backend="triton")
    y_r = bitplane_linear(x, planes, scale, zero, bits, group, 2, backend="torch")
    torch.testing.assert_close(y_t, y_r, rtol=1e-5, atol=1e-5)
    assert available(DEVICE)
    with pytest.raises(ValueError):
        tb.bitplane_linear(x, planes, scale, zero, bits, group, 5)
    with pytest.raises(ValueError):
        tb.bitplane_linear(x, planes[:3], scale, zero, bits, group, 1)
    if DEVICE == "cpu":  # per-token k is validated where it costs no device synchronisation
        with pytest.raises(ValueError):
            tb.bitplane_linear(x, planes, scale, zero, bits, group, torch.tensor([0, 2]))
    with pytest.raises(TypeError):
        tb.bitplane_linear(x.to(torch.int32), planes, scale, zero, bits, group, 1)


def test_package_imports_without_triton():
    """The core library and the torch fallback work where ``import triton`` fails."""
    code = (
        "import sys; sys.modules['triton'] = None\n"
        "import torch, mobiquant, mobiquant.kernels as K\n"
        "assert not K.triton_importable() and not K.available()\n"
        "from mobiquant.quant.packing import pack_codes\n"
        "p = [pack_codes(torch.randint(0, 4, (8, 32)), 2) for _ in range(4)]\n"
        "s = torch.full((8, 1), 0.01).half(); z = torch.ones(8, 1).half()\n"
        "y = K.bitplane_linear(torch.randn(3, 32), p, s, z, (2, 2, 2, 2), 32, torch.tensor([1, 2, 4]))\n"
        "assert y.shape == (3, 8)\n"
        "m = mobiquant.MoBiLinear(32, 8, group_size=32); m.weight.normal_(); m.freeze(); m.backend = 'triton'\n"
        "try:\n    m(torch.randn(2, 32))\nexcept RuntimeError:\n    print('ok')\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip().endswith("ok")


# ------------------------------------------------------------------------------------ a pair per view
def per_view_pair(scale, zero, num_slices, gen):
    """``[K, out, groups]`` steps and zero points, distinct per view: random positive steps around the shared
    ones and random fractional zero points (not on the 1/8 grid), view 1 the shared pair itself."""
    k_s = torch.rand(num_slices - 1, *scale.shape, generator=gen) * 1.5 + 0.25
    k_z = torch.rand(num_slices - 1, *zero.shape, generator=gen) * 2 - 1
    s = torch.cat([scale.cpu().float()[None], scale.cpu().float()[None] * k_s]).half().to(scale.device)
    z = torch.cat([zero.cpu().float()[None], zero.cpu().float()[None] + k_z]).half().to(zero.device)
    return s, z


def make_views(n_out, n_in, bits, group, gen):
    planes, scale, zero = make_layer(n_out, n_in, bits, group, gen)
    return (planes, *per_view_pair(scale, zero, len(bits), gen))


def test_per_view_reference_uses_each_views_pair(gen):
    """The reference the tests compare with: view k with pairs [K, out, groups] is view k of pair k - 1."""
    bits, group = (2, 2, 2, 2), 64
    planes, scale, zero = make_views(8, 128, bits, group, gen)
    assert not torch.equal(scale[0], scale[1]) and not torch.equal(zero[2], zero[3])
    for k in range(1, 5):
        w = dequantize_reference(planes, scale, zero, bits, group, k, 128)
        torch.testing.assert_close(w, dequantize_reference(planes, scale[k - 1], zero[k - 1], bits, group, k, 128))


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).split(".")[-1])
@pytest.mark.parametrize(
    "path,m,cfg",
    [
        ("small", 1, None),  # field kernel up to k = 3, concatenated-code kernel at k = 4
        ("small", 1, CONCAT),
        ("small", 5, None),  # tensor cores, one k: one dot on the concatenated code
        ("small", 5, tb.SmallConfig(combine=False)),  # tensor cores, a dot per plane
        ("bits", 1, None),
        ("tile", 3, None),
        ("dequant", 4, None),
    ],
    ids=str,
)
def test_per_view_every_k(path, m, cfg, dtype, gen):
    """A pair per view, every static k, every path: ragged last group, partial last word, rows not a multiple of
    the block, a bias."""
    bits, group = (2, 2, 2, 2), 64
    planes, scale, zero = make_views(48, 200, bits, group, gen)
    bias = torch.randn(48, generator=gen).to(DEVICE)
    x = randx(m, 200, dtype, gen)
    for k in range(1, len(bits) + 1):
        check(x, planes, scale, zero, bits, group, k, bias=bias, path=path, small_config=cfg)


@pytest.mark.parametrize(
    "path,m,cfg",
    [
        ("small", 2, None),
        ("small", 16, None),
        ("small", 7, tb.SmallConfig(block_n=16, block_k=32, split_k=3)),
        ("small", 9, tb.SmallConfig(block_n=32, split_k=1, magic=False)),
        ("small", 1, None),  # one token's k in a host tensor: read as an int
        ("tile", 21, None),
        ("dequant", 10, None),
    ],
    ids=str,
)
def test_per_view_mixed_k(path, m, cfg, gen):
    """Per-token k with a pair per view: every token's sum takes its own view's step and zero point (a gather by
    k in the small-batch kernel; a launch per view in the others); also every token at one k."""
    bits, group = (2, 2, 2, 2), 64
    planes, scale, zero = make_views(40, 200, bits, group, gen)
    bias = torch.randn(40, generator=gen).to(DEVICE)
    for dtype in (torch.float16, torch.float32):
        x = randx(m, 200, dtype, gen)
        k = torch.randint(1, 5, (m,), generator=gen)
        if m >= 4:
            k[:4] = torch.tensor([4, 1, 3, 2])[torch.randperm(4, generator=gen)]  # every k present
        check(x, planes, scale, zero, bits, group, k.to(DEVICE), bias=bias, path=path, small_config=cfg)
        k_same = torch.full((m,), int(k[0]), dtype=torch.long, device=DEVICE)
        check(x, planes, scale, zero, bits, group, k_same, path=path, small_config=cfg)


@pytest.mark.parametrize(
    "bits,group,n_out,n_in",
    [
        ((3, 1, 1, 1, 1, 1), 64, 33, 200),  # the default layout: one-bit planes for one token, tiles otherwise
        ((2, 2, 2, 2), 32, 24, 130),
        ((4, 2, 2), 64, 24, 130),
        ((2, 2, 2, 2), 100, 24, 230),  # group size with no power-of-two chunk: tile path, scale per column
    ],
    ids=str,
)
def test_per_view_layouts(bits, group, n_out, n_in, gen):
    """The 'auto' dispatch with a pair per view on other layouts, one token and a few, static and per-token k."""
    planes, scale, zero = make_views(n_out, n_in, bits, group, gen)
    for m in (1, 3):
        x = randx(m, n_in, torch.float16, gen)
        for k in range(1, len(bits) + 1):
            check(x, planes, scale, zero, bits, group, k)
        kt = torch.randint(1, len(bits) + 1, (m,), generator=gen).to(DEVICE)
        check(x, planes, scale, zero, bits, group, kt)


def test_per_view_device_k(gen, monkeypatch):
    """k read on the device (as in a captured CUDA graph) with a pair per view: one token in the field kernel, the
    concatenated-code kernel and the one-bit plane kernel (each reads its view's pair by k), and tokens of mixed k
    in the small-batch kernel; planes past k hold garbage that must not leak."""
    monkeypatch.setattr(tb, "_host_k_range", lambda k_t: None)
    bits, group = (2, 2, 2, 2), 64
    planes, scale, zero = make_views(40, 320, bits, group, gen)
    x = randx(1, 320, torch.float16, gen)
    for kk in range(1, 5):
        bad = planes[:kk] + [torch.full_like(p, -1) for p in planes[kk:]]
        ref = torch_reference(x, planes, scale, zero, bits, group, kk, compute_dtype=torch.float64)
        packed = tb.pack_bitplanes(bad, scale, zero, bits, group, 320)
        for cfg in (FIELDS, CONCAT, tb.SmallConfig(), BITS):
            out = torch.full((1, 40), float("nan"), dtype=x.dtype, device=DEVICE)
            k = torch.tensor([kk], device=DEVICE)  # the entries themselves (bitplane_linear reads a host k as an int)
            if cfg is BITS:
                y = tb.bitplane_linear_bits(x, packed, k, out=out, config=cfg)
            else:
                y = tb.bitplane_linear_small(x, bad, scale, zero, bits, group, k, out=out, config=cfg)
            assert not torch.isnan(out).any()
            err = ((y.double() - ref.double()).norm() / ref.double().norm()).item()
            assert err < TOL[torch.float16], (kk, cfg, err)
    xm = randx(6, 320, torch.float16, gen)
    km = torch.tensor([2, 4, 1, 3, 4, 1], device=DEVICE)
    check(xm, planes, scale, zero, bits, group, km, path="small")


@pytest.mark.parametrize(
    "cfg",
    [
        BITS,
        tb.SmallConfig(bitplanes=True, block_n=32, block_k=16, split_k=5),  # groups split unevenly
        tb.SmallConfig(bitplanes=True, block_n=16, block_k=16, waves=3),  # segments across row blocks
        tb.SmallConfig(bitplanes=True, block_n=32, block_k=64, waves=1, prefetch=True),  # next group preloaded
    ],
    ids=str,
)
def test_per_view_bits_kernel(cfg, gen, monkeypatch):
    """The one-bit plane kernel on the default layout 3-1-1-1-1-1 with a pair per view: every view with k on the
    host (the view's own set of step and zero point words) and on the device (the set picked by k in the kernel),
    ragged K, odd rows, a bias."""
    bits, group, n_out, n_in = DEFAULT_LAYOUT, 64, 70, 200
    planes, scale, zero = make_views(n_out, n_in, bits, group, gen)
    packed = tb.pack_bitplanes(planes, scale, zero, bits, group, n_in)
    assert packed.per_view and packed.sz.shape == (6, 2, 4, 64)
    bias = torch.randn(n_out, generator=gen).to(DEVICE)
    x = randx(1, n_in, torch.float16, gen)
    # every view on the default configuration; the smallest, the largest on the host and a middle one on the device
    # for the others
    every = range(1, len(bits) + 1)
    for k in every if cfg is BITS else (1, 6):
        check(x, planes, scale, zero, bits, group, k, bias=bias, small_config=cfg, packed=packed)
    monkeypatch.setattr(tb, "_host_k_range", lambda k_t: None)
    for k in every if cfg is BITS else (4,):  # the entry itself (bitplane_linear reads a host k as an int)
        kd = torch.tensor([k], device=DEVICE)
        out = torch.full((1, n_out), float("nan"), dtype=x.dtype, device=DEVICE)
        y = tb.bitplane_linear_bits(x, packed, kd, bias=bias, out=out, config=cfg)
        assert not torch.isnan(out).any()
        ref = torch_reference(x, planes, scale, zero, bits, group, k, bias=bias, compute_dtype=torch.float64)
        err = ((y.double() - ref.double()).norm() / ref.double().norm()).item()
        assert err < TOL[torch.float16], (k, err)


def test_per_view_pack_bitplanes(gen):
    """One set of step and zero point words per view, each the set a shared pair of that view's values packs to;
    the planes' words are those of a shared pair."""
    bits, group, n_in = DEFAULT_LAYOUT, 32, 40
    planes, scale, zero = make_views(5, n_in, bits, group, gen)
    bp = tb.pack_bitplanes(planes, scale, zero, bits, group, n_in)
    assert bp.sz.shape == (6, 2, 2, 64) and bp.sz.is_contiguous()
    for v in range(6):
        one = tb.pack_bitplanes(planes, scale[v], zero[v], bits, group, n_in)
        assert not one.per_view
        assert torch.equal(bp.sz[v], one.sz) and torch.equal(bp.words, one.words)


def test_per_view_dequantize_kernel(gen):
    bits, group = (2, 2, 2, 2), 64
    planes, scale, zero = make_views(40, 200, bits, group, gen)
    for k in range(1, 5):
        w = tb.dequantize(planes, scale, zero, bits, group, k, 200, dtype=torch.float32)
        ref = dequantize_reference(planes, scale, zero, bits, group, k, 200)
        torch.testing.assert_close(w, ref, rtol=1e-6, atol=1e-6)


def test_per_view_package_dispatch(gen):
    """``mobiquant.kernels.bitplane_linear`` takes a pair per view on both backends."""
    bits, group = DEFAULT_LAYOUT, 64
    planes, scale, zero = make_views(16, 128, bits, group, gen)
    x = randx(3, 128, torch.float32, gen)
    k = torch.tensor([1, 6, 3], device=DEVICE)
    y_t = bitplane_linear(x, planes, scale, zero, bits, group, k, backend="triton")
    y_r = bitplane_linear(x, planes, scale, zero, bits, group, k, backend="torch")
    torch.testing.assert_close(y_t, y_r, rtol=1e-5, atol=1e-5)
    y1 = bitplane_linear(x[:1], planes, scale, zero, bits, group, 4, backend="triton")
    torch.testing.assert_close(y1, bitplane_linear(x[:1], planes, scale, zero, bits, group, 4, backend="torch"))


def test_per_view_errors(gen):
    """Pairs per view must be [len(slice_bits), out, groups], the zero point of the step's shape; packed buffers of
    a shared pair do not serve pairs per view (nor the other way round)."""
    bits, group = (2, 2, 2, 2), 64
    planes, scale, zero = make_views(16, 128, bits, group, gen)
    x = randx(2, 128, torch.float32, gen)
    for s, z in (
        (scale[:3], zero[:3]),  # a pair for 3 of 4 views
        (scale, zero[0]),  # a step per view, one zero point
        (scale[0], zero),
        (scale[None], zero[None]),
        (scale, zero[:, :, :1]),
    ):
        for path in ("auto", "small", "tile", "dequant", "bits"):
            with pytest.raises(ValueError, match="one pair per view"):
                tb.bitplane_linear(x[:1], planes, s, z, bits, group, 1, path=path, small_config=BITS)
        with pytest.raises(ValueError, match="one pair per view"):
            tb.pack_bitplanes(planes, s, z, bits, group, 128)
    with pytest.raises(ValueError, match="one pair per view"):
        tb.dequantize(planes, scale[:2], zero[:2], bits, group, 1, 128)
    shared = tb.pack_bitplanes(planes, scale[0], zero[0], bits, group, 128)
    with pytest.raises(ValueError, match="another layout"):
        tb.bitplane_linear(x[:1], planes, scale, zero, bits, group, 1, path="bits", packed=shared)
    views = tb.pack_bitplanes(planes, scale, zero, bits, group, 128)
    with pytest.raises(ValueError, match="another layout"):
        tb.bitplane_linear(x[:1], planes, scale[0], zero[0], bits, group, 1, path="bits", packed=views)


# ------------------------------------------------------------------------------------------ GPU only
gpu = pytest.mark.gpu
needs_cuda = pytest.mark.skipif(DEVICE != "cuda", reason="needs a CUDA device (and TRITON_INTERPRET unset)")


@gpu
@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=lambda d: str(d).split(".")[-1])
@pytest.mark.parametrize("m", [1, 4, 16, 128, 300, 1100])
def test_gpu_llama_like_shapes(m, dtype, gen):
    bits, group = (2, 2, 2, 2), 128
    planes, scale, zero = make_layer(1024, 4096, bits, group, gen)
    x = randx(m, 4096, dtype, gen)
    for k in range(1, 5):
        check(x, planes, scale, zero, bits, group, k)
    check(x, planes, scale, zero, bits, group, torch.randint(1, 5, (m,), generator=gen).to(DEVICE))
    if m == 1:  # the field kernel forced, with k on the host and on the device (one body per k)
        for k in range(1, 5):
            check(x, planes, scale, zero, bits, group, k, path="small", small_config=FIELDS)
            check(
                x, planes, scale, zero, bits, group, torch.tensor([k], device=DEVICE), path="small", small_config=FIELDS
            )


@gpu
@needs_cuda
@pytest.mark.parametrize("cfg", [None, FIELDS], ids=["default", "fields"])
def test_gpu_cuda_graph_capture(cfg, gen):
    """The small-batch path with a device-side per-token k needs no host sync: it captures in a graph, and
    one captured graph serves every k (the field kernel branches on k inside)."""
    bits, group = (2, 2, 2, 2), 128
    planes, scale, zero = make_layer(2048, 1024, bits, group, gen)
    x = randx(1, 1024, torch.float16, gen)
    k = torch.tensor([3], device=DEVICE)
    y = tb.bitplane_linear(x, planes, scale, zero, bits, group, k, small_config=cfg)  # warm-up compiles
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        tb.bitplane_linear(x, planes, scale, zero, bits, group, k, small_config=cfg)
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        yg = tb.bitplane_linear(x, planes, scale, zero, bits, group, k, small_config=cfg)
    for kk in (1, 4, 2, 3):
        x.copy_(randx(1, 1024, torch.float16, gen))
        k.fill_(kk)
        g.replay()
        torch.cuda.synchronize()
        ref = torch_reference(x, planes, scale, zero, bits, group, kk, compute_dtype=torch.float64)
        err = ((yg.double() - ref.double()).norm() / ref.double().norm()).item()
        assert err < TOL[torch.float16]
    assert y.shape == yg.shape


@gpu
@needs_cuda
def test_gpu_tiles_with_a_device_k(gen, monkeypatch):
    """The tile path (a layout the small kernels do not cover, a few tokens) with a per-token k on the device: an
    uncaptured call reads which k are present and launches only those; a captured one reads nothing and launches
    every view, so one graph serves every mix of k."""
    bits, group = DEFAULT_LAYOUT, 128
    planes, scale, zero = make_layer(1024, 1024, bits, group, gen)
    x = randx(6, 1024, torch.float16, gen)
    k = torch.tensor([2, 2, 5, 2, 5, 2], device=DEVICE)
    launched = []
    real = tb._tile_launch
    monkeypatch.setattr(tb, "_tile_launch", lambda *a, **kw: launched.append(a[7]) or real(*a, **kw))
    y = tb.bitplane_linear(x, planes, scale, zero, bits, group, k, path="tile")
    assert launched == [2, 5]
    ref = torch_reference(x, planes, scale, zero, bits, group, k, compute_dtype=torch.float64)
    assert ((y.double() - ref.double()).norm() / ref.double().norm()).item() < TOL[torch.float16]
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        tb.bitplane_linear(x, planes, scale, zero, bits, group, k, path="tile")
    torch.cuda.current_stream().wait_stream(s)
    launched.clear()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        yg = tb.bitplane_linear(x, planes, scale, zero, bits, group, k, path="tile")
    assert launched == list(range(1, len(bits) + 1))
    for mix in ([1, 6, 3, 3, 4, 2], [4] * 6):
        k.copy_(torch.tensor(mix, device=DEVICE))
        g.replay()
        torch.cuda.synchronize()
        ref = torch_reference(x, planes, scale, zero, bits, group, k.cpu(), compute_dtype=torch.float64)
        assert ((yg.double() - ref.double()).norm() / ref.double().norm()).item() < TOL[torch.float16]


@gpu
@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=lambda d: str(d).split(".")[-1])
@pytest.mark.parametrize("bits", [DEFAULT_LAYOUT, (2, 2, 2, 2)], ids=str)
@pytest.mark.parametrize("n_out,n_in", [(1024, 4096), (4096, 14336), (1000, 1100)], ids=str)
def test_gpu_bits_kernel(n_out, n_in, bits, dtype, gen):
    """The one-bit plane kernel at LLaMA-like and ragged shapes, every view, k on the host and on the device, and
    the default and a swept config."""
    group = 128
    planes, scale, zero = make_layer(n_out, n_in, bits, group, gen)
    x = randx(1, n_in, dtype, gen)
    packed = tb.pack_bitplanes(planes, scale, zero, bits, group, n_in)
    cfgs = (
        BITS,
        tb.SmallConfig(bitplanes=True, block_n=128, block_k=128, waves=1, num_warps=8),
        STREAMK,  # the default picks whole_k for these rows where K <= 4096
        tb.SmallConfig(bitplanes=True, waves=4, stages=3),  # stream-K, the group loop pipelined
        WHOLE_PDL,  # programmatic dependent launch
        tb.SmallConfig(bitplanes=True, waves=4, l2_prefetch=True, pdl=True),  # stream-K, its range asked of L2
    )
    for cfg in cfgs:
        for k in range(1, len(bits) + 1):
            check(x, planes, scale, zero, bits, group, k, small_config=cfg, packed=packed)
            check(
                x, planes, scale, zero, bits, group, torch.tensor([k], device=DEVICE), small_config=cfg, packed=packed
            )


@gpu
@needs_cuda
def test_gpu_bits_kernel_graph_capture(gen):
    """One captured graph of the one-bit plane kernel with k on the device serves every view (a body per view)."""
    bits, group = DEFAULT_LAYOUT, 128
    planes, scale, zero = make_layer(4096, 4096, bits, group, gen)
    packed = tb.pack_bitplanes(planes, scale, zero, bits, group, 4096)
    x = randx(1, 4096, torch.float16, gen)
    k = torch.tensor([2], device=DEVICE)

    def f():
        return tb.bitplane_linear(x, planes, scale, zero, bits, group, k, small_config=BITS, packed=packed)

    _graph_serves_views(f, x, k, (1, 6, 3, 2, 5, 4), planes, scale, zero, bits, group, gen)


@gpu
@needs_cuda
@pytest.mark.parametrize("cfg", [STREAMK, WHOLE, WHOLE_PDL], ids=["streamk", "whole_k", "whole_k_pdl"])
def test_gpu_bits_kernel_routed_k_graph_capture(cfg, gen):
    """One captured graph of the one-bit plane kernel counting ``k`` from gate values and a threshold tensor
    (``RoutedK``) serves every view: a budget change writes the threshold, nothing else."""
    bits, group = DEFAULT_LAYOUT, 128
    planes, scale, zero = make_layer(4096, 4096, bits, group, gen)
    packed = tb.pack_bitplanes(planes, scale, zero, bits, group, 4096)
    x = randx(1, 4096, torch.float16, gen)
    values = torch.tensor([[0.9, 0.7, 0.5, 0.3, 0.1]], device=DEVICE)
    tau = torch.zeros((), device=DEVICE)
    rk = tb.RoutedK(values, tau)
    taus = {1: 0.95, 2: 0.8, 3: 0.6, 4: 0.4, 5: 0.2, 6: 0.0}

    def f():
        return tb.bitplane_linear(x, planes, scale, zero, bits, group, rk, small_config=cfg, packed=packed)

    order = (1, 6, 3, 2, 5, 4)
    _graph_serves_views(f, x, lambda kk: tau.fill_(taus[kk]), order, planes, scale, zero, bits, group, gen)


@gpu
@needs_cuda
@pytest.mark.parametrize("n", [576, 4096], ids=["smollm2", "8b"])
def test_gpu_pdl_chain_graph(n, gen):
    """Programmatic dependent launch in a captured graph: a chain of launches, each reading the one before's output
    (static whole-K, routed whole-K whose gate values a torch kernel makes from that output, stream-K, a torch
    kernel between), starts each launch early, and its outputs are bit-equal to the same chain without it, on
    every replay with fresh inputs and thresholds (a wait in the wrong place reads a stale activation)."""
    if torch.cuda.get_device_capability() < (9, 0):
        pytest.skip("programmatic dependent launch needs compute capability 9.0")
    bits, group = DEFAULT_LAYOUT, 128
    layers = [tb.pack_bitplanes(*make_layer(n, n, bits, group, gen), bits, group, n) for _ in range(4)]
    x = randx(1, n, torch.float16, gen)
    tau = torch.zeros((), device=DEVICE)

    def chain(pdl):
        whole, stream = (dataclasses.replace(c, pdl=pdl) for c in (WHOLE, STREAMK))
        h = tb.bitplane_linear_bits(x, layers[0], 2, config=whole)
        h = tb.bitplane_linear_bits(h, layers[1], tb.RoutedK(h[:, :5].float().sigmoid(), tau), config=whole)
        h = tb.bitplane_linear_bits(h, layers[2], 4, config=stream)
        h = torch.nn.functional.rms_norm(h, (n,))  # a kernel of torch's between
        return tb.bitplane_linear_bits(h, layers[3], 3, config=whole)

    g, yg = _captured(lambda: chain(True))
    for i in range(6):
        x.copy_(randx(1, n, torch.float16, gen))
        tau.fill_(0.2 * i)
        g.replay()
        torch.cuda.synchronize()
        ref = chain(False)
        assert torch.equal(yg, ref), (i, (yg - ref).abs().max())
        assert torch.equal(chain(True), ref), i


@gpu
@needs_cuda
@pytest.mark.parametrize("shape", [(576, (576, 192, 192)), (4096, (4096, 1024, 1024))], ids=["smollm2", "8b"])
@pytest.mark.parametrize(
    "cfg",
    [
        STREAMK,  # the grid a router in the launch takes by default
        pytest.param(
            WHOLE,
            marks=pytest.mark.xfail(
                reason="H200 2026-12-02: [8b] outputs differed in the last bits from the whole-K launch handed the "
                "same values (values bit-equal); not reproduced in the interpreter, so whole_k stays opt-in here",
                strict=False,
            ),
        ),
    ],
    ids=["streamk", "whole_k"],
)
def test_gpu_router_in_launch_graph(shape, cfg, gen):
    """A site of three layers with its router in the launch, captured once in a CUDA graph: every replay with
    fresh activations and thresholds writes the fused router kernel's gate values and gives the outputs of the
    launch on the same grid handed those values, and leaves the counters at zero (no replay waits on a stale
    flag)."""
    from mobiquant.kernels.triton_router import IN_LAUNCH_TILING, fused_router

    n_in, outs = shape
    bits, group = DEFAULT_LAYOUT, 128
    router = _router_of(n_in, "free", gen)
    router.net[0].weight.data /= n_in**0.5
    site = tb.site_bitplanes(
        [tb.pack_bitplanes(*make_layer(n, n_in, bits, group, gen), bits, group, n_in) for n in outs]
    )
    x = randx(1, n_in, torch.float16, gen)
    buf, inl = router.in_launch(x)
    taus = [torch.zeros((), device=DEVICE) for _ in outs]
    ks = [tb.RoutedK(buf, t, inl) for t in taus]

    g, yg = _captured(lambda: tb.bitplane_site_bits(x, site, ks, config=cfg))
    for i in range(6):
        x.copy_(randx(1, n_in, torch.float16, gen))
        _, ref_v = fused_router(x, inl.w1, inl.b1, inl.w2, inl.b2, taus[0], "free", **IN_LAUNCH_TILING)
        for j, t in enumerate(taus):
            t.fill_(float(ref_v[0, (i + 2 * j) % 5]) - 1e-3)  # a view each, moving between replays
        g.replay()
        torch.cuda.synchronize()
        ref = tb.bitplane_site_bits(x, site, [tb.RoutedK(ref_v, t) for t in taus], config=cfg)
        assert torch.equal(buf, ref_v), i
        assert torch.equal(yg, ref), (i, (yg - ref).abs().max())
        assert not tb._route_sync(x.device).any()


def _captured(f):
    """``(graph, output)``: ``f`` run eagerly, warmed up on a side stream, then captured in one CUDA graph."""
    f()
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        f()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        y = f()
    return g, y


def _graph_serves_views(f, x, k, order, planes, scale, zero, bits, group, gen):
    """Capture ``f`` (one token ``x``, its ``k`` in the device tensor ``k``, or set by calling ``k(view)``) in one
    CUDA graph, then replay it at every view of ``order`` with fresh activations against the float64 reference."""
    g, yg = _captured(f)
    for kk in order:
        x.copy_(randx(1, x.shape[-1], torch.float16, gen))
        k(kk) if callable(k) else k.fill_(kk)
        g.replay()
        torch.cuda.synchronize()
        ref = torch_reference(x, planes, scale, zero, bits, group, kk, compute_dtype=torch.float64)
        err = ((yg.double() - ref.double()).norm() / ref.double().norm()).item()
        assert err < TOL[torch.float16], (kk, err)


@gpu
@needs_cuda
@pytest.mark.parametrize("bits", [DEFAULT_LAYOUT, (2, 2, 2, 2)], ids=str)
def test_gpu_per_view(bits, gen):
    """A pair per view at a LLaMA-like shape: every view with k on the host and on the device for one token (one
    captured graph of the default dispatch serves every view), and mixed per-token k for 4 and 16 tokens."""
    group, n_out, n_in = 128, 1024, 4096
    planes, scale, zero = make_views(n_out, n_in, bits, group, gen)
    packed = tb.pack_bitplanes(planes, scale, zero, bits, group, n_in)
    x = randx(1, n_in, torch.float16, gen)
    for k in range(1, len(bits) + 1):
        check(x, planes, scale, zero, bits, group, k)
        check(x, planes, scale, zero, bits, group, torch.tensor([k], device=DEVICE))
        check(x, planes, scale, zero, bits, group, torch.tensor([k], device=DEVICE), small_config=BITS, packed=packed)
    for m in (4, 16):
        xm = randx(m, n_in, torch.float16, gen)
        check(xm, planes, scale, zero, bits, group, torch.randint(1, len(bits) + 1, (m,), generator=gen).to(DEVICE))
    k = torch.tensor([1], device=DEVICE)

    def f():
        return tb.bitplane_linear(x, planes, scale, zero, bits, group, k)

    _graph_serves_views(f, x, k, reversed(range(1, len(bits) + 1)), planes, scale, zero, bits, group, gen)


def test_mobilinear_with_a_pair_per_view_on_the_triton_path(gen):
    """A layer packed with ``view_steps`` (a step and zero point per view, fitted at packing) serves one token
    (one-bit plane kernel) and a routed small batch (mixed ``k``) through Triton exactly as its dequantized
    views do."""
    from mobiquant.nn.router import TokenRouter

    lin = torch.nn.Linear(192, 40, bias=False)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(40, 192, generator=gen) * 0.05)
    m = MoBiLinear.from_linear(lin, group_size=64, slice_bits=DEFAULT_LAYOUT, view_steps=True)
    m.freeze(col_weight=torch.rand(192, generator=gen) + 0.1)
    m = m.to(DEVICE)
    assert m.scale.shape == (6, 40, 3)
    assert not torch.equal(m.scale[0], m.scale[5])  # the views really read different pairs
    m.backend = "triton"
    x1 = randx(1, 192, torch.float32, gen)
    for k in range(1, 7):
        m.set_static(k)
        ref = x1.double() @ m.dequantized(k).double().T
        err = ((m(x1).double() - ref).norm() / ref.norm()).item()
        assert err < TOL[torch.float32], (k, err)
    router = TokenRouter(192, m.slice_bits, policy="free").to(DEVICE)
    m.attach_router(router)
    m.set_routed()
    x = randx(12, 192, torch.float32, gen) * 3
    router.tau.fill_(float(torch.cummin(router.scores(x), -1).values.median()))
    assert router.slice_counts(x).unique().numel() > 1  # a mix of views in one batch
    m.backend = "torch"
    ref = m(x)
    m.backend = "triton"
    torch.testing.assert_close(m(x), ref, rtol=1e-4, atol=1e-4)


def test_routed_epilogues_are_asked_of_fragment_launches_of_views_on_the_device(gen, monkeypatch):
    """``SmallConfig.fragment_routed_epilogues``: a launch of a view read on the device (``k`` None, a span or
    none) takes an epilogue and a norm made by the launch before (``"rms_scale"``) only with the switch (on by
    default), on the
    fragment kernel (fp16; a site of whole blocks of 128 rows, the product only from two layers of one width), and no
    other prologue; a launch handed one without the switch is refused with the reason."""
    bits, group, n_in = DEFAULT_LAYOUT, 64, 256
    bp = tb.pack_bitplanes(*make_layer(256, n_in, bits, group, gen), bits, group, n_in)
    x16 = torch.zeros(1, n_in, dtype=torch.float16)
    on, off = tb.SmallConfig(), tb.SmallConfig(fragment_routed_epilogues=False)
    served = []
    monkeypatch.setattr(tb, "fragment_serves", lambda cfg, bp, k, x2, span=None: served.append((k, span)) or True)
    assert on.fragment_routed_epilogues is True  # the default since 2026-12-07
    assert not tb.takes_epilogue(x16, bp, None, (256,), off, "rms_norm")
    assert tb.takes_epilogue(x16, bp, None, (256,), on, "rms_norm", (1, 2)) and served[-1] == (None, (1, 2))
    assert not tb.takes_epilogue(x16.float(), bp, None, (256,), on, "rms_norm")  # fp16 only
    assert not tb.takes_epilogue(x16, bp, None, (256,), on, "silu_mul")  # a product needs gate and up
    assert tb.takes_epilogue(x16, bp, None, (128, 128), on, "silu_mul")
    assert not tb.takes_epilogue(x16, bp, None, (128, 64, 64), on, "rms_norm")  # not whole blocks of 128 rows
    assert not tb.takes_epilogue(
        x16, bp, None, (128, 128), dataclasses.replace(on, fragment_site_spans=False), "rms_norm"
    )
    assert tb.takes_prologue(x16, bp, None, (256,), on, "rms_scale")
    assert not tb.takes_prologue(x16, bp, None, (256,), on, "rms_norm")  # a device view's router makes its norm
    assert not tb.takes_prologue(x16, bp, None, (256,), off, "rms_scale")
    with pytest.raises(ValueError, match="or a view on the device there with SmallConfig.fragment_routed_epilogues"):
        tb._check_made_by_fragment(None, object(), False)

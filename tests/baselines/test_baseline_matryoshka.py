"""Matryoshka nested slicing: the packed MoBiLinear views are exactly the truncated-code dequantization."""

from __future__ import annotations

import pytest
import torch

from mobiquant import set_static, storage_bits
from mobiquant.methods.baselines import matryoshka_codes, pack_linear_from_codes, quantize_matryoshka, truncated_view
from mobiquant.patching import mobi_linears
from mobiquant.quant.primitives import fake_quant_rtn


@pytest.mark.parametrize(
    "slice_bits,group_size",
    [((2, 2, 2, 2), 64), ((2, 2, 2, 2), 128), ((3, 2, 1), 64), ((4, 4), 48), ((1, 1, 2, 3), 128)],
)
def test_views_equal_truncated_code(slice_bits, group_size):
    g = torch.Generator().manual_seed(0)
    W = torch.randn(48, 200, generator=g) * 0.04  # 200 columns: ragged last group
    W[3, 7] = 0.5  # an outlier
    lin = torch.nn.Linear(200, 48, bias=False)
    planes, h, zero, full, s, zT = matryoshka_codes(W, group_size, slice_bits)
    m = pack_linear_from_codes(lin, planes, h, zero, slice_bits, group_size)
    T = sum(slice_bits)
    kept = 0
    for k, b in enumerate(slice_bits, start=1):
        kept += b
        ref = truncated_view(full, s, zT, T, kept, group_size)
        got = m.dequantized(k).double()
        torch.testing.assert_close(got, ref, rtol=0, atol=1e-7 * float(ref.abs().max()))
    # the full view is the T-bit RTN code
    torch.testing.assert_close(
        m.dequantized(len(slice_bits)), fake_quant_rtn(W, T, group_size), rtol=0, atol=float(s.max()) * 0.51
    )


def test_stored_parameters_follow_the_derivation():
    W = torch.randn(16, 128, generator=torch.Generator().manual_seed(1))
    planes, h, zero, full, s, z8 = matryoshka_codes(W, 128, (2, 2, 2, 2))
    torch.testing.assert_close(h, 64 * s, rtol=0, atol=0)
    torch.testing.assert_close(zero, z8 / 64 - 63 / 128, rtol=0, atol=0)
    assert torch.equal(zero.half().float(), zero) and torch.equal(h.half().float(), h)  # exact in fp16
    recon = sum(p.to(torch.int64) << (6 - 2 * e) for e, p in enumerate(planes))
    assert torch.equal(recon, full.to(torch.int64))  # planes are the code's bits, MSB first


def test_model_static_views(llama_factory, eval_ids):
    model = llama_factory(0)
    fp = model(input_ids=eval_ids).logits
    quantize_matryoshka(model, group_size=64)
    assert all(m.packed and m.slice_bits == (2, 2, 2, 2) for _, m in mobi_linears(model))
    errs = []
    for k in (4, 3, 2, 1):
        set_static(model, k)
        logits = model(input_ids=eval_ids).logits
        assert torch.isfinite(logits).all()
        errs.append(float((logits - fp).abs().max()))
    assert errs[0] < 0.02 * float(fp.abs().max())  # 8 bits: close to FP
    assert errs == sorted(errs)  # fewer bits, larger error
    assert 8.5 <= storage_bits(model) < 9  # 4 x 2-bit planes + fp16 step and zero per 64 weights


def test_narrow_one_signed_groups_stay_exact_and_finite():
    W = torch.randn(4, 64, generator=torch.Generator().manual_seed(2)) * 1e-4 + 1.0  # far from zero, narrow
    W[1] = 1.0  # constant row
    lin = torch.nn.Linear(64, 4, bias=False)
    planes, h, zero, full, s, zT = matryoshka_codes(W, 64, (2, 2, 2, 2))
    m = pack_linear_from_codes(lin, planes, h, zero, (2, 2, 2, 2), 64)
    for k in range(1, 5):
        got = m.dequantized(k).double()
        assert torch.isfinite(got).all()
        torch.testing.assert_close(got, truncated_view(full, s, zT, 8, 2 * k, 64), rtol=0, atol=1e-9)


def test_matryoshka_checkpoint_reloads_without_routers(tmp_path):
    from mobiquant.io.checkpoint import load_quantized, save_quantized
    from mobiquant.patching import mobi_linears, routers, set_static
    from mobiquant.tiny import tiny_llama

    model, _ = tiny_llama(num_hidden_layers=1, seed=0)
    quantize_matryoshka(model, group_size=32)
    save_quantized(model, tmp_path / "ckpt")
    fresh, _ = tiny_llama(num_hidden_layers=1, seed=0)
    load_quantized(fresh, tmp_path / "ckpt")
    assert not list(routers(fresh))
    ids = torch.randint(0, 256, (1, 16))
    for k in (1, 2, 4):
        set_static(model, k)
        set_static(fresh, k)
        assert torch.equal(model(input_ids=ids).logits, fresh(input_ids=ids).logits)
    assert len(list(mobi_linears(fresh))) == len(list(mobi_linears(model)))

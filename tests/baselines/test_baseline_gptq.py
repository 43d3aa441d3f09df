"""GPTQ: layer-level error against RTN on correlated inputs, act-order, ragged groups, the model driver."""

from __future__ import annotations

import pytest
import torch

from mobiquant import load_quantized, save_quantized, storage_bits
from mobiquant.methods.baselines import gptq_quantize_weight, pack_linear_from_codes, quantize_gptq
from mobiquant.nn.linear import MoBiLinear
from mobiquant.patching import find_blocks, mobi_linears
from mobiquant.quant.primitives import fake_quant_rtn, lwc_params, to_groups


def correlated_inputs(n: int, d: int, seed: int = 0) -> torch.Tensor:
    """Tokens with strongly correlated channels and a few outlier channels, like LLM activations."""
    g = torch.Generator().manual_seed(seed)
    spectrum = torch.logspace(0, -2.5, d)
    mix = torch.linalg.qr(torch.randn(d, d, generator=g))[0] * spectrum
    x = torch.randn(n, d, generator=g) @ mix.t()
    x[:, :3] *= 8.0
    return x


def layer_case(out_f=96, in_f=200, seed=0):
    g = torch.Generator().manual_seed(seed + 1)
    W = torch.randn(out_f, in_f, generator=g) * 0.05
    X = correlated_inputs(4096, in_f, seed)
    H = 2 * X.t() @ X / X.shape[0]
    return W, X, H


def out_err(X, W, Wq):
    return float(torch.linalg.norm(X @ W.t() - X @ Wq.t()))


@pytest.mark.parametrize("act_order", [False, True])
@pytest.mark.parametrize("group_size", [64, 128])  # 200 = 3 x 64 + 8 and 128 + 72: ragged last groups
def test_gptq_beats_rtn_on_layer_output(act_order, group_size):
    W, X, H = layer_case()
    res = gptq_quantize_weight(W, H, bits=3, group_size=group_size, act_order=act_order)
    e_gptq = out_err(X, W, res.dequantize())
    e_rtn = out_err(X, W, fake_quant_rtn(W, 3, group_size))
    assert e_gptq < 0.8 * e_rtn, (e_gptq, e_rtn)
    assert res.codes.dtype == torch.uint8 and int(res.codes.max()) <= 7
    assert res.scale.shape == (96, -(-200 // group_size))


def test_static_groups_follow_original_columns():
    W, _, H = layer_case()
    res = gptq_quantize_weight(W, H, bits=4, group_size=64, act_order=True)
    p = lwc_params(to_groups(W, 64), 4)
    torch.testing.assert_close(res.scale, p.scale.squeeze(-1).half().float(), rtol=0, atol=0)
    torch.testing.assert_close(res.zero, p.zero.squeeze(-1), rtol=0, atol=0)


def test_gptq_8bit_is_near_lossless_and_identity_hessian_is_rtn():
    W, _, H = layer_case()
    res = gptq_quantize_weight(W, H, bits=8, group_size=64)
    assert float((res.dequantize() - W).abs().max()) < 2e-3
    # with an identity Hessian there is nothing to compensate: GPTQ reduces to RTN
    res = gptq_quantize_weight(W, torch.eye(200), bits=3, group_size=64, act_order=False, percdamp=0.0)
    rtn = fake_quant_rtn(W, 3, 64)
    differs = (res.dequantize() - rtn).abs() > 1e-3 * float(W.abs().max())
    assert float(differs.float().mean()) < 0.005  # only rounding ties flipped by the fp16 step


def test_packed_layer_reproduces_gptq_solution():
    W, X, H = layer_case(out_f=40, in_f=200)
    lin = torch.nn.Linear(200, 40)
    lin.weight.data.copy_(W)
    res = gptq_quantize_weight(W, H, bits=3, group_size=128, act_order=True)
    m = pack_linear_from_codes(lin, [res.codes], res.scale, res.zero, (3,), 128)
    assert isinstance(m, MoBiLinear) and m.packed
    torch.testing.assert_close(m.dequantized(1), res.dequantize(), rtol=0, atol=1e-6)
    torch.testing.assert_close(m(X[:5]), X[:5] @ res.dequantize().t() + lin.bias, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("act_order", [True, False])
def test_quantize_gptq_model(llama_factory, calib_ids, eval_ids, act_order, tmp_path):
    model = llama_factory(0)
    fp = model(input_ids=eval_ids).logits
    _, blocks = find_blocks(model)
    quantize_gptq(model, calib_ids, bits=3, group_size=64, act_order=act_order, progress=False)
    layers = dict(mobi_linears(model))
    assert len(layers) == 14  # 7 linears x 2 blocks
    assert all(m.packed and m.slice_bits == (3,) for m in layers.values())
    assert not any(isinstance(m, torch.nn.Linear) for b in blocks for m in b.modules())
    logits = model(input_ids=eval_ids).logits
    assert torch.isfinite(logits).all()
    assert 0 < float((logits - fp).abs().mean()) < float(fp.abs().mean())
    assert 3.0 < storage_bits(model) < 4.5
    assert len(model.gptq_report) == 14
    if act_order:  # the packed model is a regular checkpoint
        save_quantized(model, tmp_path / "ckpt")
        fresh = load_quantized(llama_factory(0), tmp_path / "ckpt")
        torch.testing.assert_close(fresh(input_ids=eval_ids).logits, logits)


def test_gptq_model_beats_rtn_model(llama_factory, calib_ids):
    """On the calibration windows, the GPTQ model's logits are closer to FP than RTN's at 3 bits."""
    from mobiquant.patching import block_linears

    fp_model = llama_factory(0)
    fp = fp_model(input_ids=calib_ids).logits
    rtn = llama_factory(0)
    _, blocks = find_blocks(rtn)
    for b in blocks:
        for lin in block_linears(b).values():
            lin.weight.data = fake_quant_rtn(lin.weight.data, 3, 64)
    gptq = quantize_gptq(llama_factory(0), calib_ids, bits=3, group_size=64, progress=False)
    e_rtn = float((rtn(input_ids=calib_ids).logits - fp).pow(2).mean())
    e_gptq = float((gptq(input_ids=calib_ids).logits - fp).pow(2).mean())
    assert e_gptq < e_rtn, (e_gptq, e_rtn)


def test_true_sequential_off_and_bad_inputs(llama_factory, calib_ids):
    model = quantize_gptq(
        llama_factory(0), calib_ids[:2], bits=4, group_size=128, true_sequential=False, progress=False
    )
    assert all(m.packed for _, m in mobi_linears(model))
    with pytest.raises(ValueError):
        quantize_gptq(llama_factory(0), calib_ids[0], bits=4, progress=False)
    with pytest.raises(ValueError):
        quantize_gptq(llama_factory(0), calib_ids, bits=9, progress=False)


def test_constant_and_one_signed_groups_stay_finite():
    W = torch.randn(8, 128, generator=torch.Generator().manual_seed(3)) * 1e-3 + 2.0
    W[0] = 1.0
    X = correlated_inputs(512, 128)
    res = gptq_quantize_weight(W, 2 * X.t() @ X / 512, bits=4, group_size=64)
    assert torch.isfinite(res.dequantize()).all()
    assert torch.isfinite(res.zero).all()


def test_lazy_batch_size_does_not_change_the_result():
    """Lazy batch updates are exact: any blocksize (also one not aligned with the groups) gives one answer."""
    W, _, H = layer_case(out_f=24, in_f=200)
    ref = gptq_quantize_weight(W, H, bits=3, group_size=64, act_order=False, blocksize=200)
    for bs in (1, 48, 128):
        res = gptq_quantize_weight(W, H, bits=3, group_size=64, act_order=False, blocksize=bs)
        assert float((res.codes.int() != ref.codes.int()).float().mean()) < 0.01
        torch.testing.assert_close(res.scale, ref.scale, rtol=1e-3, atol=1e-6)

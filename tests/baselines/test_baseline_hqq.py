"""HQQ from the external ``hqq`` package, converted exactly into packed MoBiLinears."""

from __future__ import annotations

import pytest
import torch

from mobiquant.methods.baselines import hqq_available, hqq_storage_bits, quantize_hqq
from mobiquant.patching import mobi_linears

pytestmark = pytest.mark.skipif(
    not hqq_available(), reason="the `hqq` package is not importable (DISABLE_CUDA=1 pip install hqq)"
)


def test_hqq_4bit_tiny_model(llama_factory, eval_ids):
    model = llama_factory(0)
    fp = model(input_ids=eval_ids).logits
    quantize_hqq(model, bits=4, group_size=128)
    layers = dict(mobi_linears(model))
    assert len(layers) == 14 and all(m.packed and m.slice_bits == (4,) for m in layers.values())
    assert model.mobiquant_config.group_size == 32  # gcd(128, 64, 160): HQQ's row-crossing groups, exactly
    logits = model(input_ids=eval_ids).logits
    assert torch.isfinite(logits).all()
    assert float((logits - fp).abs().mean()) < 0.2 * float(fp.abs().mean())
    assert hqq_storage_bits(model) == pytest.approx(4 + 32 / 128)


def test_conversion_matches_hqq_own_module(llama_factory, eval_ids):
    from hqq.core.quantize import BaseQuantizeConfig, HQQLinear

    model = llama_factory(0)
    lin = model.model.layers[0].mlp.down_proj  # in = 160: HQQ's groups of 128 cross rows
    W = lin.weight.detach().clone()
    own = HQQLinear(
        lin,
        BaseQuantizeConfig(nbits=3, group_size=128, axis=1),
        del_orig=False,
        compute_dtype=torch.float32,
        device="cpu",
    )
    ref = own.dequantize().float()
    quantize_hqq(model, bits=3, group_size=128)
    got = model.model.layers[0].mlp.down_proj.dequantized(1).float()
    # identical codes; only the fp16 storage of HQQ's step and fractional zero point differs
    step = float((W.max() - W.min()) / 7)
    assert float((got - ref).abs().max()) < 0.01 * step


def test_keep_module_runs(llama_factory, eval_ids):
    from hqq.core.quantize import HQQLinear

    converted = quantize_hqq(llama_factory(0), bits=4)
    native = quantize_hqq(llama_factory(0), bits=4, keep_module=True)
    assert sum(isinstance(m, HQQLinear) for m in native.modules()) == 14
    a = converted(input_ids=eval_ids).logits
    b = native(input_ids=eval_ids).logits
    assert torch.isfinite(b).all()
    assert float((a - b).abs().max()) < 0.02 * float(b.abs().max())


def test_unsupported_settings(llama_factory):
    with pytest.raises(ValueError):
        quantize_hqq(llama_factory(0), bits=7)
    with pytest.raises(ValueError):
        quantize_hqq(llama_factory(0), bits=4, axis=0)

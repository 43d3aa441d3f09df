"""The RMS norm fused with its site's router (``kernels.fused_norm_router``, ``patching.fuse_norms``).

On a machine without CUDA these run in Triton's interpreter (this folder's conftest sets ``TRITON_INTERPRET=1``).
"""

from __future__ import annotations

import os

import pytest
import torch
import torch.nn as nn

import mobiquant as mq
from mobiquant import kernels
from mobiquant.nn.norm import FusedRMSNorm
from mobiquant.patching import fuse_norms, routers, set_budget
from mobiquant.tiny import tiny_llama

pytest.importorskip("triton", reason="triton is not installed: kernel tests skipped")

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA and os.environ.get("TRITON_INTERPRET", "0") in ("", "0") else "cpu"
if DEVICE == "cpu" and os.environ.get("TRITON_INTERPRET", "0") in ("", "0"):
    pytest.skip("no CUDA device and TRITON_INTERPRET is not set", allow_module_level=True)


def llama_norm(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    """``LlamaRMSNorm.forward``'s arithmetic."""
    h = x.float()
    return w * (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


@pytest.mark.parametrize("policy", ["free", "adjacent"])
@pytest.mark.parametrize(
    "d,tokens,dtype",
    [(64, 1, torch.float32), (100, 5, torch.float32), (72, 19, torch.float32), (96, 1, torch.float16)],
    ids=["d64-t1", "d100-t5", "d72-t19", "d96-t1-fp16"],
)
def test_fused_norm_router_is_the_norm_then_the_router(policy, d, tokens, dtype):
    """``y`` is the model's norm (to fp32 rounding of the mean; fp16 rows equal), and ``k``, ``v`` are exactly
    what the fused router gives on ``y``: mixed slice counts over tokens, odd widths, several token blocks."""
    g = torch.Generator().manual_seed(d + tokens)
    x = (torch.randn(tokens, d, generator=g) * 3).to(DEVICE, dtype)
    w = (torch.rand(d, generator=g) + 0.5).to(DEVICE, dtype)
    w1, b1 = torch.randn(12, d, generator=g).to(DEVICE), torch.randn(12, generator=g).to(DEVICE)
    w2, b2 = (torch.randn(5, 12, generator=g) * 10).to(DEVICE), torch.randn(5, generator=g).to(DEVICE)
    seen = set()
    for tau in (-1e9, 0.0, 0.5, 1e9):
        t = torch.tensor([tau], device=DEVICE)
        y, k, v = kernels.fused_norm_router(x, w, 1e-5, (w1, b1, w2, b2), t, policy)
        assert y.dtype == dtype and y.shape == x.shape and k.shape == (tokens,) and v.shape == (tokens, 5)
        ref = llama_norm(x, w, 1e-5)
        if dtype == torch.float16:
            assert torch.equal(y, ref)
        torch.testing.assert_close(y, ref, rtol=1e-6, atol=1e-6)
        k2, v2 = kernels.fused_router(y, w1, b1, w2, b2, t, policy)
        assert torch.equal(k, k2) and torch.equal(v, v2)
        assert torch.equal(kernels.rms_norm(x, w, 1e-5), y)
        seen |= set(k.tolist())
    assert {1, 6} <= seen


def test_fused_norm_rejects_a_weight_of_another_width():
    x, w = torch.randn(1, 64, device=DEVICE), torch.ones(48, device=DEVICE)
    r = [torch.randn(8, 64, device=DEVICE), torch.zeros(8, device=DEVICE)]
    r += [torch.randn(3, 8, device=DEVICE), torch.zeros(3, device=DEVICE)]
    with pytest.raises(ValueError, match="norm weight"):
        kernels.fused_norm_router(x, w, 1e-5, r, torch.zeros(1, device=DEVICE), "free")
    with pytest.raises(ValueError, match="norm weight"):
        kernels.rms_norm(x, w, 1e-5)


class OffsetRMSNorm(nn.Module):
    """An RMS norm of another arithmetic (``(1 + weight)``, as Gemma's): ``fuse_norms`` must leave it alone."""

    def __init__(self, d: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(d))
        self.eps = eps

    def forward(self, x):
        h = x.float()
        return ((1 + self.weight) * h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype)


@pytest.fixture(scope="module")
def qmodel():
    model = tiny_llama(seed=0)[0]
    mq.quantize_model(model, mq.MoBiConfig(group_size=32, router_hidden=8))  # 8 programs a router launch
    g = torch.Generator().manual_seed(100)
    mq.calibrate_thresholds(model, [torch.randint(0, 257, (4, 32), generator=g) for _ in range(2)])
    mq.freeze(model)
    return model.to(DEVICE).eval()


def test_fuse_norms_routes_each_site_in_its_norms_launch(qmodel, monkeypatch):
    """Each layer's input norm takes the q/k/v router and its post-attention norm the gate/up router (found by
    tracing); the final norm is fused alone; a norm of another arithmetic is left; state dict keys do not move.
    A one-token forward then launches only the o and down routers, and its logits are the unfused model's at two
    budgets; the greedy tokens of eager decoding are the unfused model's. ``enable=False`` restores the model."""
    from mobiquant.tasks.decode import generate

    model = qmodel
    layers = model.model.layers
    keys = list(model.state_dict())
    for _, r in routers(model):
        r.backend = "triton"
    x = torch.tensor([[5]], device=DEVICE)
    prompt = torch.randint(0, 257, (10,), generator=torch.Generator().manual_seed(7))
    refs = {}
    for b in (2.5, 5.5):
        set_budget(model, b)
        with torch.no_grad():
            refs[b] = model(input_ids=x).logits
    tokens = generate(model, prompt, 3, budget=4.0, cuda_graph="off").tokens
    own = layers[1].post_attention_layernorm
    layers[1].post_attention_layernorm = OffsetRMSNorm(own.weight.shape[0]).to(DEVICE)
    try:
        assert fuse_norms(model) == 2 * len(layers)  # the offset norm left alone
        assert isinstance(layers[1].post_attention_layernorm, OffsetRMSNorm)
    finally:
        fuse_norms(model, enable=False)
        layers[1].post_attention_layernorm = own
    assert fuse_norms(model) == 2 * len(layers) + 1
    assert list(model.state_dict()) == keys
    fused = {n: m for n, m in model.named_modules() if isinstance(m, FusedRMSNorm)}
    assert fused["model.layers.0.input_layernorm"].router is layers[0].self_attn.q_proj.router
    assert fused["model.layers.0.post_attention_layernorm"].router is layers[0].mlp.gate_proj.router
    assert fused["model.layers.1.input_layernorm"].router is layers[1].self_attn.q_proj.router
    assert fused["model.norm"].router is None
    for m in fused.values():
        m.backend = "triton"
    launches = []
    real = kernels.fused_router
    monkeypatch.setattr(kernels, "fused_router", lambda *a, **k: (launches.append(1), real(*a, **k))[1])
    for b, logits in refs.items():
        set_budget(model, b)
        launches.clear()
        with torch.no_grad():
            out = model(input_ids=x).logits
        assert len(launches) == 2 * len(layers)  # o and down: their inputs come from no norm
        torch.testing.assert_close(out, logits, rtol=1e-5, atol=1e-5)
    assert torch.equal(generate(model, prompt, 3, budget=4.0, cuda_graph="off").tokens, tokens)
    assert fuse_norms(model, enable=False) == 0
    assert not any(isinstance(m, FusedRMSNorm) for m in model.modules())
    assert list(model.state_dict()) == keys

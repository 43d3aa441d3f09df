"""The suite's tiny seeded random decoder-only LMs (LLaMA and OPT) and token batches, importable by name.

The models are small enough that a forward pass takes milliseconds on a laptop CPU, yet they have every
structural feature the patcher must discover: a ``ModuleList`` of blocks, q/k/v and gate/up linears that
read one input, ragged groups (intermediate width 160 with ``g = 64``), embeddings and an ``lm_head``.
Test modules import these builders (``from tiny_models import build_tiny_llama``); ``conftest.py`` wraps them
in fixtures. transformers is imported inside the builders: it is slow to import and the quantizer tests
never need it.
"""

from __future__ import annotations

from typing import Any

import torch

VOCAB = 128


def tiny_llama_config(**overrides: Any):
    """The tiny LLaMA's ``LlamaConfig``; ``overrides`` replace any of its fields (or add others)."""
    from transformers import LlamaConfig

    fields: dict[str, Any] = {
        "vocab_size": VOCAB,
        "hidden_size": 64,
        "intermediate_size": 160,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
    }
    return LlamaConfig(**(fields | overrides))


def tiny_opt_config():
    from transformers import OPTConfig

    # A different family on purpose: blocks live in ``model.decoder.layers``, linears have biases and
    # other names (k/v/q/out_proj, fc1/fc2), and there are learned position embeddings.
    return OPTConfig(
        vocab_size=VOCAB,
        hidden_size=64,
        ffn_dim=160,
        word_embed_proj_dim=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=128,
    )


def build_tiny_llama(seed: int = 0, **overrides: Any):
    """A fresh tiny random LLaMA in eval mode (same seed and overrides, same weights); see :func:`tiny_llama_config`."""
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    return LlamaForCausalLM(tiny_llama_config(**overrides)).eval()


def build_tiny_opt(seed: int = 0):
    from transformers import OPTForCausalLM

    torch.manual_seed(seed)
    return OPTForCausalLM(tiny_opt_config()).eval()


def token_batches(n: int, batch: int = 4, seqlen: int = 32, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, VOCAB, (batch, seqlen), generator=g) for _ in range(n)]


def mixed_view_model(seed: int = 0, placement: str = "site"):
    """``task=decode``'s tiny LLaMA (257 byte tokens) quantized with adjacent routers at ``placement`` and a budget
    plan whose thresholds fix every routed linear's view at every budget (view ``k`` at ``2 + k`` bits), except that
    at 4 bits one linear of a router serving several (its first: q_proj) sits a view above the others (view 3, its
    router's others view 2). Returns ``(model, named, router, odd)``: the routed ``(name, linear)`` pairs, that
    router, and the odd linear's index in ``named``."""
    import mobiquant as mq
    from mobiquant.elastic.plan import BudgetPlan
    from mobiquant.patching import install_plan, mobi_linears
    from mobiquant.tiny import tiny_llama

    model = tiny_llama(seed=seed)[0]  # task=decode's tiny model: 257 byte tokens
    cfg = mq.MoBiConfig(group_size=32, slice_bits=(3, 1, 1, 1, 1, 1), router_policy="adjacent",
                        router_placement=placement)  # fmt: skip
    mq.quantize_model(model, cfg)
    g = torch.Generator().manual_seed(100)
    mq.calibrate_thresholds(model, [torch.randint(0, 257, (4, 32), generator=g) for _ in range(4)])
    mq.freeze(model)
    named = [(n, m) for n, m in mobi_linears(model) if m.router is not None]
    router = next(m.router for _, m in named if sum(o.router is m.router for _, o in named) > 1)
    gap = {router.constant_k(2.0 * j + 1.5): 2.0 * j + 1.5 for j in range(-1, 5)}  # view k -> a threshold fixing it
    views = [3.0, 4.0, 5.0, 6.0, 7.0, 8.0]
    taus = torch.tensor([[gap[k] for k in range(1, 7)] for _ in named])
    odd = next(i for i, (_, m) in enumerate(named) if m.router is router)
    taus[odd, 1] = gap[3]
    local = torch.tensor(views).expand(len(named), -1)
    plan = BudgetPlan(budgets=views, linears=[n for n, _ in named], taus=taus, local=local, reading=["uniform"] * 6)
    install_plan(model, plan)
    return model, named, router, odd

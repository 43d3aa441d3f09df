"""Shared fixtures: tiny seeded random decoder-only LMs (LLaMA and OPT) and token batches.

The models are small enough that a forward pass takes milliseconds on a laptop CPU, yet they have every
structural feature the patcher must discover: a ``ModuleList`` of blocks, q/k/v and gate/up linears that
read one input, ragged groups (intermediate width 160 with ``g = 64``), embeddings and an ``lm_head``.
"""

from __future__ import annotations

import os

import pytest
import torch

# Triton reads TRITON_INTERPRET when a kernel is defined, and any test that runs a packed MoBiLinear may
# import the kernel module first: without a GPU, every test session uses Triton's CPU interpreter.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

VOCAB = 128

# Every tensor in this suite is tiny: intra-op threads only add synchronisation, which costs far more than
# it saves (and much more when other jobs share the cores). One thread keeps the suite fast and steady.
torch.set_num_threads(1)


# transformers is imported inside the builders: it is slow to import and the quantizer tests never need it.
def tiny_llama_config():
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=160,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
    )


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


def build_tiny_llama(seed: int = 0):
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    return LlamaForCausalLM(tiny_llama_config()).eval()


def build_tiny_opt(seed: int = 0):
    from transformers import OPTForCausalLM

    torch.manual_seed(seed)
    return OPTForCausalLM(tiny_opt_config()).eval()


def token_batches(n: int, batch: int = 4, seqlen: int = 32, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, VOCAB, (batch, seqlen), generator=g) for _ in range(n)]


@pytest.fixture
def make_llama():
    """Factory: ``make_llama(seed)`` -> a fresh tiny random LLaMA in eval mode (same seed, same weights)."""
    return build_tiny_llama


@pytest.fixture
def tiny_llama():
    return build_tiny_llama(0)


@pytest.fixture
def make_opt():
    return build_tiny_opt


@pytest.fixture
def tiny_opt():
    return build_tiny_opt(0)


@pytest.fixture
def input_ids() -> torch.Tensor:
    """One held-out batch of token ids, 2 x 16."""
    return token_batches(1, batch=2, seqlen=16, seed=1234)[0]


@pytest.fixture
def gen() -> torch.Generator:
    return torch.Generator().manual_seed(0)


@pytest.fixture
def make_batches():
    """Factory: ``make_batches(n, batch, seqlen, seed)`` -> list of random token-id batches."""
    return token_batches

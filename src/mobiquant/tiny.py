"""A tiny random-initialised LLaMA with a byte-level tokenizer, for smoke runs and tests.

It needs no download and builds in milliseconds, yet goes through the same code paths as a real model
(Hugging Face ``LlamaForCausalLM``, a ``PreTrainedTokenizerFast``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerFast

#: The tiny model's context (``max_position_embeddings``): the configuration checks read it without
#: importing torch or transformers, which this module imports only when a model or tokenizer is built.
MAX_POSITIONS = 4096


def byte_tokenizer() -> PreTrainedTokenizerFast:
    """256 byte tokens (GPT-2 style byte alphabet) and an end-of-text token; no merges."""
    import numpy as np
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {ch: i for i, ch in enumerate(sorted(alphabet))}
    vocab["<|endoftext|>"] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>")
    # Without merges every UTF-8 byte is one token: mobiquant.io.data.tokenize_corpus maps bytes through this
    # table (the same ids as the tokenizer, tested) instead of running it over megabytes of text.
    fast.byte_table = np.array([vocab[ch] for ch in _byte_chars()], dtype=np.int64)
    return fast


def _byte_chars() -> list[str]:
    """The ByteLevel alphabet's character for each byte 0..255: printable Latin-1 bytes stand for
    themselves, the others take the code points from 256 on, in byte order."""
    keep = set(range(ord("!"), ord("~") + 1)) | set(range(0xA1, 0xAC + 1)) | set(range(0xAE, 0xFF + 1))
    chars, extra = [], 0
    for b in range(256):
        if b in keep:
            chars.append(chr(b))
        else:
            chars.append(chr(256 + extra))
            extra += 1
    return chars


def tiny_llama(
    hidden_size: int = 64,
    intermediate_size: int = 160,
    num_hidden_layers: int = 2,
    num_attention_heads: int = 4,
    num_key_value_heads: int = 2,
    seed: int = 0,
    dtype: str = "float32",
):
    """``(model, tokenizer)``: a random LLaMA over the byte tokenizer's 257 tokens. ``dtype``: a name of
    ``mobiquant.io.models.DTYPES``."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from .io.models import resolve_dtype

    tokenizer = byte_tokenizer()
    cfg = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_hidden_layers,
        num_attention_heads=num_attention_heads,
        num_key_value_heads=num_key_value_heads,
        max_position_embeddings=MAX_POSITIONS,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=tokenizer.eos_token_id,
    )
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = LlamaForCausalLM(cfg)
    torch_dtype: Any = resolve_dtype(dtype)
    model = model.to(torch_dtype).eval()
    model.requires_grad_(False)
    model.config._name_or_path = f"tiny-llama-h{hidden_size}-l{num_hidden_layers}-seed{seed}"
    return model, tokenizer

"""Shared fixtures: the tiny seeded random decoder-only LMs of :mod:`tiny_models` (LLaMA and OPT) and token
batches."""

from __future__ import annotations

import os

import pytest
import torch

from interpreter_speed import install as install_interpreter_speed
from tiny_models import build_tiny_llama, build_tiny_opt, token_batches

# Triton reads TRITON_INTERPRET when a kernel is defined, and any test that runs a packed MoBiLinear may
# import the kernel module first: without a GPU, every test session uses Triton's CPU interpreter.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
    install_interpreter_speed()

# Every tensor in this suite is tiny: intra-op threads only add synchronisation, which costs far more than
# it saves (and much more when other jobs share the cores). One thread keeps the suite fast and steady.
torch.set_num_threads(1)


@pytest.fixture(
    params=[
        "cpu",
        pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")),
    ]
)
def calib_device(request) -> str:
    """A test run on the CPU and, where there is one, on a CUDA device (calibration's Trainer included)."""
    return request.param


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

"""Fixtures for the baseline tests: a tiny seeded random LLaMA and calibration windows."""

from __future__ import annotations

import pytest
import torch

from tiny_models import build_tiny_llama


def small_llama(seed: int = 0):
    return build_tiny_llama(seed).requires_grad_(False)


@pytest.fixture
def llama_factory():
    return small_llama


@pytest.fixture
def calib_ids() -> torch.Tensor:
    return torch.randint(0, 128, (8, 32), generator=torch.Generator().manual_seed(7))


@pytest.fixture
def eval_ids() -> torch.Tensor:
    return torch.randint(0, 128, (2, 24), generator=torch.Generator().manual_seed(11))

"""Kernel tests run Triton's CPU interpreter when no CUDA device is present.

``TRITON_INTERPRET`` is read when a ``@triton.jit`` function is defined, so it must be set before the
kernel module is first imported; this conftest is loaded before the test modules of this folder.
"""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

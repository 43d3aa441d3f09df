"""Bit-plane matmul kernels for packed MoBiSlice weights.

``bitplane_linear(x, planes, scale, zero, slice_bits, group_size, k, bias=None)`` computes
``x W_k^T + bias`` reading only the first ``k`` bit-planes (``k`` an int, or a per-token tensor of slice
counts with ``x.shape[:-1]``). The Triton implementation lives in :mod:`.triton_bitplane` and is imported
lazily: this package imports and runs (through :func:`torch_reference`) without Triton or a GPU.
:func:`available` says whether the Triton path can run for a device (a CUDA device, or any device when
``TRITON_INTERPRET=1`` asks for Triton's CPU interpreter).
"""

from __future__ import annotations

import importlib.util
import os
from typing import Sequence

import torch

__all__ = ["available", "bitplane_linear", "dequantize_reference", "torch_reference", "triton_importable"]

_TRITON_OK: bool | None = None


def triton_importable() -> bool:
    """Whether ``import triton`` works here (checked once, lazily)."""
    global _TRITON_OK
    if _TRITON_OK is None:
        if importlib.util.find_spec("triton") is None:
            _TRITON_OK = False
        else:
            try:
                import triton  # noqa: F401
                import triton.language  # noqa: F401

                _TRITON_OK = True
            except Exception:  # a broken install counts as absent
                _TRITON_OK = False
    return _TRITON_OK


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def available(device: torch.device | str | None = None) -> bool:
    """True when the Triton kernels can run on ``device`` (default: CUDA if present)."""
    if not triton_importable():
        return False
    if device is None:
        return torch.cuda.is_available() or interpreting()
    dev = torch.device(device)
    if dev.type == "cuda":
        return torch.cuda.is_available() and not interpreting()
    return dev.type == "cpu" and interpreting()


def _unpack(plane: torch.Tensor, bits: int, cols: int) -> torch.Tensor:
    """int32 words ``[rows, W]`` -> int64 codes ``[rows, cols]`` (first code in the low bits)."""
    per = 32 // bits
    w = plane.to(torch.int64) & 0xFFFFFFFF
    shifts = torch.arange(per, dtype=torch.int64, device=plane.device) * bits
    codes = (w.unsqueeze(-1) >> shifts) & (2**bits - 1)
    return codes.reshape(plane.shape[0], -1)[:, :cols]


def dequantize_reference(
    planes: Sequence[torch.Tensor],
    scale: torch.Tensor,
    zero: torch.Tensor,
    slice_bits: Sequence[int],
    group_size: int,
    k: int,
    in_features: int,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """``W_k = (s / 2^B_k) (C_k - 2^B_k z - (2^B_k - 1) / 2)`` ``[out, in]`` in float32, then ``dtype``."""
    if not 1 <= k <= len(slice_bits):
        raise ValueError(f"k must be between 1 and {len(slice_bits)}, got {k}")
    c = _unpack(planes[0], slice_bits[0], in_features)
    for e in range(1, k):
        c = (c << slice_bits[e]) + _unpack(planes[e], slice_bits[e], in_features)
    shift = sum(slice_bits[1:k])
    g = torch.arange(in_features, device=scale.device) // group_size
    s = scale.float()[:, g]
    z = zero.float()[:, g]
    w = (s / 2**shift) * (c.float() - (2**shift * z + (2**shift - 1) / 2))
    return w.to(dtype)


def torch_reference(
    x: torch.Tensor,
    planes: Sequence[torch.Tensor],
    scale: torch.Tensor,
    zero: torch.Tensor,
    slice_bits: Sequence[int],
    group_size: int,
    k,
    bias: torch.Tensor | None = None,
    compute_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """Pure PyTorch ``x W_k^T + bias``; per-token ``k`` by grouping tokens of equal ``k``.

    ``compute_dtype`` (default ``x.dtype``) is the dtype of the dequantized weight and of the matmul;
    pass ``torch.float64`` for a high-precision reference. The result has ``x``'s dtype."""
    in_f = x.shape[-1]
    n_out = scale.shape[0]
    cdt = compute_dtype or x.dtype
    x2 = x.reshape(-1, in_f).to(cdt)
    b = bias.to(cdt) if bias is not None else None

    def lin(xx, kk):
        w = dequantize_reference(planes, scale, zero, slice_bits, group_size, kk, in_f).to(cdt)
        return torch.nn.functional.linear(xx, w, b)

    if isinstance(k, int):
        y = lin(x2, int(k))
    else:
        kf = torch.as_tensor(k).reshape(-1).to(x2.device)
        if kf.numel() != x2.shape[0]:
            raise ValueError(f"k has {kf.numel()} entries for {x2.shape[0]} tokens")
        y = torch.empty(x2.shape[0], n_out, dtype=cdt, device=x2.device)
        for kk in torch.unique(kf).tolist():
            idx = (kf == kk).nonzero(as_tuple=True)[0]
            y[idx] = lin(x2[idx], int(kk))
    return y.to(x.dtype).reshape(*x.shape[:-1], n_out)


def bitplane_linear(
    x: torch.Tensor,
    planes: Sequence[torch.Tensor],
    scale: torch.Tensor,
    zero: torch.Tensor,
    slice_bits: Sequence[int],
    group_size: int,
    k,
    bias: torch.Tensor | None = None,
    backend: str = "auto",
    **kwargs,
) -> torch.Tensor:
    """``x W_k^T + bias`` from the first ``k`` bit-planes.

    ``backend``: 'triton' (error if unavailable), 'torch' (:func:`torch_reference`), or 'auto' (Triton when
    :func:`available` for ``x``'s device, else torch). Extra keyword arguments go to the Triton entry
    (``out``, ``small_config``, ``tile_config``, ``path``)."""
    if backend not in ("auto", "torch", "triton"):
        raise ValueError(f"backend must be 'auto', 'torch' or 'triton', got {backend!r}")
    use_triton = backend == "triton" or (backend == "auto" and available(x.device))
    if use_triton:
        if not available(x.device):
            raise RuntimeError(
                "the Triton backend needs `triton` and a CUDA device (or TRITON_INTERPRET=1 on CPU)"
            )
        from .triton_bitplane import bitplane_linear as _tri

        return _tri(x, planes, scale, zero, slice_bits, group_size, k, bias, **kwargs)
    y = torch_reference(x, planes, scale, zero, slice_bits, group_size, k, bias)
    out = kwargs.get("out")
    if out is not None:
        out.copy_(y.reshape(out.shape))
        return out.reshape(y.shape)
    return y

"""Per-group asymmetric quantization primitives shared by every method.

A weight ``W[out, in]`` is split along its input dimension into groups of ``group_size`` columns; when
``group_size`` does not divide ``in`` the last group of each row is narrower (SmolLM2: 576 = 4 x 128 + 64).
Internally the weight is padded to whole groups by repeating each row's last column, which changes no
group's min or max, and the padding is cut off again after dequantization.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

#: Smallest allowed step, as in OmniQuant: keeps constant groups finite.
MIN_SCALE = 1e-5


def check_bits(bits: int, name: str = "bits") -> int:
    if isinstance(bits, bool) or not isinstance(bits, int) or not 1 <= bits <= 8:
        raise ValueError(f"{name} must be an integer from 1 to 8, got {bits!r}")
    return bits


def check_group_size(group_size: int) -> int:
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size <= 0:
        raise ValueError(
            f"group_size must be a positive integer, got {group_size!r} "
            "(it need not divide the layer width: the last group of each row is narrower)"
        )
    return group_size


def num_groups(in_features: int, group_size: int) -> int:
    return math.ceil(in_features / group_size)


def to_groups(weight: torch.Tensor, group_size: int) -> torch.Tensor:
    """``[out, in]`` -> ``[out, n_groups, group_size]``, padding a ragged last group by replication."""
    out_f, in_f = weight.shape
    pad = num_groups(in_f, group_size) * group_size - in_f
    if pad:
        weight = F.pad(weight.unsqueeze(0), (0, pad), mode="replicate").squeeze(0)
    return weight.reshape(out_f, -1, group_size)


def from_groups(grouped: torch.Tensor, in_features: int) -> torch.Tensor:
    """Inverse of :func:`to_groups`: ``[out, n_groups, group_size]`` -> ``[out, in]``."""
    return grouped.reshape(grouped.shape[0], -1)[:, :in_features]


def round_ste(x: torch.Tensor) -> torch.Tensor:
    """Round with a straight-through gradient."""
    return (x.round() - x).detach() + x


def floor_ste(x: torch.Tensor) -> torch.Tensor:
    return (x.floor() - x).detach() + x


@dataclass
class GroupQuantParams:
    """Step ``scale`` and integer zero point ``zero`` per row and group, each ``[out, n_groups, 1]``."""

    scale: torch.Tensor
    zero: torch.Tensor


def lwc_params(
    grouped: torch.Tensor,
    bits: int,
    gamma: torch.Tensor | None = None,
    beta: torch.Tensor | None = None,
    ste: bool = False,
    anchor_bits: int | None = None,
) -> GroupQuantParams:
    """Asymmetric min-max parameters with optional learnable weight clipping (LWC).

    ``h = (sigmoid(gamma) max - sigmoid(beta) min) / (2^b - 1)``, ``z = round(-sigmoid(beta) min / h)``.
    Without ``gamma``/``beta`` this is plain min-max (round-to-nearest) quantization.

    ``anchor_bits = a > b`` builds the ``b``-bit grid by merging ``m = 2^(a - b)`` neighbouring steps of the
    ``a``-bit min-max grid ``s_a = range / (2^a - 1)`` (zero-aligned: its zero point is an integer):
    ``h = m s_a`` and ``z = (round(-min / s_a) - (m - 1) / 2) / m``, so every ``b``-bit level is the centre
    of ``m`` levels of the ``a``-bit grid. Mid-rise residual slices of ``a - b`` bits then rebuild that
    ``a``-bit grid exactly (see :mod:`mobiquant.quant.slicer`). The zero point is a multiple of ``1/(2m)``.
    """
    wmax = grouped.amax(dim=-1, keepdim=True)
    wmin = grouped.amin(dim=-1, keepdim=True)
    if gamma is not None:
        wmax = torch.sigmoid(gamma).unsqueeze(-1) * wmax
    if beta is not None:
        wmin = torch.sigmoid(beta).unsqueeze(-1) * wmin
    a = bits if anchor_bits is None else anchor_bits
    if isinstance(a, bool) or not isinstance(a, int) or a < bits:
        raise ValueError(f"anchor_bits must be an integer >= the base bit-width {bits}, got {anchor_bits!r}")
    m = 2 ** (a - bits)
    fine = ((wmax - wmin) / (2**a - 1)).clamp(min=MIN_SCALE / m)
    zero = -wmin / fine
    zero = round_ste(zero) if ste else zero.round()
    if m > 1:
        zero = (zero - (m - 1) / 2) / m
    return GroupQuantParams(scale=fine * m, zero=zero)


def quantize(grouped: torch.Tensor, params: GroupQuantParams, bits: int, ste: bool = False) -> torch.Tensor:
    """Integer codes in ``[0, 2^bits - 1]`` (as floats, so the STE path stays differentiable)."""
    # The zero point may be fractional (``anchor_bits``): add its fractional part before rounding and its
    # integer part after, which for an integer zero point is exactly ``round(W / h) + z``.
    whole = params.zero.detach().round()
    x = grouped / params.scale + (params.zero - whole)
    x = round_ste(x) if ste else x.round()
    return (x + whole).clamp(0, 2**bits - 1)


def dequantize(codes: torch.Tensor, params: GroupQuantParams) -> torch.Tensor:
    return params.scale * (codes - params.zero)


def weighted_affine_fit(
    w: torch.Tensor, t: torch.Tensor, d: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per group (last dim), the ``d``-weighted least-squares line ``w ~ a t + c``: returns ``(a, mean_t, mean_w)``
    (weighted means, so ``c = mean_w - a mean_t``), each ``[..., 1]`` in float64. A group whose ``t`` does not
    vary, or whose weights are all zero, gets ``a = 0``."""
    t, w, d = t.double(), w.double(), d.double()
    dn = d.sum(-1, keepdim=True).clamp_min(1e-300)
    mt, mw = (d * t).sum(-1, keepdim=True) / dn, (d * w).sum(-1, keepdim=True) / dn
    var = (d * (t - mt) ** 2).sum(-1, keepdim=True)
    cov = (d * (t - mt) * (w - mw)).sum(-1, keepdim=True)
    a = torch.where(var > 0, cov / var.clamp_min(1e-300), torch.zeros_like(var))
    return a, mt, mw


def fake_quant_rtn(weight: torch.Tensor, bits: int, group_size: int = 128) -> torch.Tensor:
    """Round-to-nearest per-group asymmetric quantize-dequantize of ``weight`` (no calibration)."""
    check_bits(bits)
    check_group_size(group_size)
    grouped = to_groups(weight.float(), group_size)
    params = lwc_params(grouped, bits)
    deq = dequantize(quantize(grouped, params, bits), params)
    return from_groups(deq, weight.shape[1]).to(weight.dtype)

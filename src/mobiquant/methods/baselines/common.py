"""Helpers shared by the baselines: build packed ``MoBiLinear``s from integer codes, swap modules.

Every baseline whose weights fit the MoBiSlice format ends as a model of *packed* ``MoBiLinear``s, so
evaluation, achieved-bit and storage accounting, checkpoints and GPU kernels are shared with MoBiQuant.
A packed layer with slices ``b_1..b_K`` and group size ``g`` holds

* ``plane{e}``: the codes of slice ``e`` ``[out, in]`` packed into int32 (or uint8) words,
* ``scale``, ``zero``: fp16 ``[out, n_groups]``, ``n_groups = ceil(in / g)`` (the last group of a row is
  narrower when ``g`` does not divide ``in``),

and its ``k``-slice view is ``W_k = (scale / 2^B_k) (C_k - 2^B_k zero - (2^B_k - 1) / 2)`` with
``C_k`` the first ``k`` codes concatenated most-significant first and ``B_k = b_2 + ... + b_k``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn as nn

from ...nn.linear import MoBiLinear
from ...patching import block_linears
from ...quant.config import MoBiConfig
from ...quant.packing import pack_codes
from ...quant.primitives import check_group_size, num_groups
from ...quant.slicer import check_slice_bits


def _layer_meta(layer: nn.Module) -> tuple[int, int, torch.Tensor | None, torch.device, torch.dtype]:
    """``(in, out, bias, device, compute dtype)`` of an ``nn.Linear`` or a (packed or not) MoBiLinear."""
    if isinstance(layer, MoBiLinear):
        if layer.packed:
            dtype = layer.weight_dtype
            ref = layer.scale
        else:
            dtype, ref = layer.weight.dtype, layer.weight
        return layer.in_features, layer.out_features, layer.bias, ref.device, dtype
    if isinstance(layer, nn.Linear):
        w = layer.weight
        return layer.in_features, layer.out_features, layer.bias, w.device, w.dtype
    raise TypeError(f"expected nn.Linear or MoBiLinear, got {type(layer).__name__}")


@torch.no_grad()
def pack_linear_from_codes(
    linear_or_mobi: nn.Module,
    codes_per_slice: Sequence[torch.Tensor],
    scale: torch.Tensor,
    zero: torch.Tensor,
    slice_bits: Sequence[int],
    group_size: int,
    word_bits: int = 32,
    compute_dtype: torch.dtype | None = None,
) -> MoBiLinear:
    """A packed ``MoBiLinear`` with the given slice codes and per-group step/zero point.

    ``codes_per_slice``: one integer tensor ``[out, in]`` per slice, values in ``[0, 2^b_e)``.
    ``scale``/``zero``: ``[out, n_groups]`` (``n_groups = ceil(in / group_size)``), stored as fp16.
    The bias (if any) and the compute dtype come from ``linear_or_mobi``; its weight is not used.
    """
    bits = check_slice_bits(slice_bits)
    group_size = check_group_size(group_size)
    in_f, out_f, bias, device, dtype = _layer_meta(linear_or_mobi)
    if len(codes_per_slice) != len(bits):
        raise ValueError(f"got {len(codes_per_slice)} code tensors for {len(bits)} slices {list(bits)}")
    ng = num_groups(in_f, group_size)
    for name, t in (("scale", scale), ("zero", zero)):
        if tuple(t.shape) != (out_f, ng):
            raise ValueError(f"{name} must have shape {(out_f, ng)} (out, ceil(in / group_size)), got {tuple(t.shape)}")
    m = MoBiLinear(
        in_f,
        out_f,
        bias=bias is not None,
        slice_bits=bits,
        group_size=group_size,
        lwc_init=None,
        word_bits=word_bits,
        device=device,
        dtype=dtype,
    )
    if bias is not None:
        m.bias.copy_(bias.detach().to(device=device, dtype=dtype))
    m.make_packed_buffers(compute_dtype or dtype)
    for e, (c, b) in enumerate(zip(codes_per_slice, bits, strict=True)):
        if tuple(c.shape) != (out_f, in_f):
            raise ValueError(f"codes of slice {e} must have shape {(out_f, in_f)}, got {tuple(c.shape)}")
        if c.is_floating_point():
            c = c.round()
        setattr(m, f"plane{e}", pack_codes(c.to(torch.int64), b, word_bits).to(device))
    m.scale = scale.detach().to(device=device, dtype=torch.float16).contiguous()
    m.zero = zero.detach().to(device=device, dtype=torch.float16).contiguous()
    m.set_static(m.num_slices)
    m.clear_cache()
    return m


def set_submodule(root: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, child, new)


def quantizable_linears(block: nn.Module, skip: Sequence[str] = (), prefix: str = "") -> dict[str, nn.Module]:
    """Block-relative names of the block's linears (``nn.Linear`` or ``MoBiLinear``), skip regexes applied."""
    return block_linears(block, skip, prefix=prefix)


def mark_quantized(
    model: nn.Module,
    blocks: tuple[str, nn.ModuleList],
    slice_bits: Sequence[int],
    group_size: int,
    method: str,
    skip: Sequence[str] = (),
    word_bits: int = 32,
) -> nn.Module:
    """Record the MoBiSlice config and per-linear sites (no routers) on a model built by a baseline.

    ``blocks``: ``find_blocks(model)`` taken *before* patching (afterwards the blocks hold no nn.Linear).
    """
    blocks_name, blocks = blocks
    model.mobiquant_config = MoBiConfig(
        slice_bits=tuple(slice_bits),
        group_size=group_size,
        lwc_init=None,
        router_placement="linear",
        routers=False,
        skip=list(skip),
        word_bits=word_bits,
    )
    model.mobiquant_sites = [
        [[n] for n, m in block_linears(b, prefix=f"{blocks_name}.{i}").items() if isinstance(m, MoBiLinear)]
        for i, b in enumerate(blocks)
    ]
    model.mobiquant_method = method
    return model

"""HQQ (Half-Quadratic Quantization, Badri & Shaji 2023) from the external PyPI package ``hqq``.

An outside anchor for the results table: the package's own quantizer (``hqq.core.quantize.Quantizer``
with ``BaseQuantizeConfig(nbits, group_size, axis=1)``: ``optimize=True``, i.e. its proximal
half-quadratic solver for the step and zero point, ``round_zero`` only at 4 bits) runs on each block
linear. Checked with hqq 0.2.8.post1: it runs on CPU (``device="cpu"``; its CUDA kernels are optional,
install with ``DISABLE_CUDA=1 pip install hqq`` to skip building them). Bit-widths: 1, 2, 3, 4, 5, 6, 8.

Group layout. HQQ flattens the weight ``[out, in]`` and cuts it into consecutive groups of ``group_size``
values, so when ``group_size`` does not divide ``in`` its groups cross row boundaries (SmolLM2: 576 =
4.5 x 128). Every HQQ group boundary is then at a multiple of ``s = gcd(group_size, in)`` within a row,
so the result is *exactly* a per-row grouped code with group size ``s`` in which consecutive groups share
(duplicate) HQQ's step and zero point. Default (``keep_module=False``): the result is converted into a
packed ``MoBiLinear`` with one slice of ``bits`` bits and group size ``s`` (``s = group_size`` when it
divides ``in``), fp16 step and zero point (HQQ's zero point is fractional except at 4 bits; fp16 as
HQQ itself stores it with its default fp16 compute dtype). Such a model shares evaluation and kernels
with everything else, but :func:`mobiquant.storage_bits` counts the duplicated per-``s`` parameters; the
honest storage of HQQ's own layout is :func:`hqq_storage_bits` (its packed codes, 3-bit codes as ten per
int32, plus fp16 step and zero per HQQ group), recorded as ``model.hqq_storage_bits``.
``keep_module=True`` keeps hqq's own ``HQQLinear`` modules instead (for ``axis=0`` this is the only
option; our accounting tools do not see those layers).
"""

from __future__ import annotations

import importlib.util
import math
import time
from collections.abc import Sequence

import torch
import torch.nn as nn

from ...patching import find_blocks
from ...quant.primitives import check_group_size
from .common import mark_quantized, pack_linear_from_codes, quantizable_linears, set_submodule

HQQ_BITS = (1, 2, 3, 4, 5, 6, 8)
_INSTALL_HINT = (
    "the HQQ baseline needs the PyPI package `hqq` (tested with 0.2.8.post1): "
    "`DISABLE_CUDA=1 pip install hqq` (the variable skips its optional CUDA kernels)"
)


def hqq_available() -> bool:
    """True when the ``hqq`` package can be imported."""
    if importlib.util.find_spec("hqq") is None:
        return False
    try:
        _import_hqq()
    except ImportError:
        return False
    return True


def _import_hqq():
    try:
        from hqq.core.quantize import BaseQuantizeConfig, HQQLinear, Quantizer
    except ImportError as e:
        raise ImportError(_INSTALL_HINT) from e
    return BaseQuantizeConfig, HQQLinear, Quantizer


def hqq_version() -> str | None:
    try:
        from importlib.metadata import version

        return version("hqq")
    except Exception:  # pragma: no cover
        return None


def _check(bits: int, group_size: int, weight_shape: torch.Size) -> None:
    if bits not in HQQ_BITS:
        raise ValueError(f"hqq supports bit-widths {HQQ_BITS}, got {bits!r}")
    if group_size % 8:
        raise ValueError(f"hqq needs a group size that is a multiple of 8, got {group_size}")
    numel = weight_shape[0] * weight_shape[1]
    if numel % group_size:
        raise ValueError(
            f"hqq needs group_size {group_size} to divide the weight's {numel} values (shape {tuple(weight_shape)})"
        )


def _hqq_native_bits(nbits: int, n_groups: int, group_size: int, meta_bits: int = 16) -> int:
    """Bits hqq itself stores for one weight: packed codes + fp16 step and zero per HQQ group."""
    if nbits == 3:  # '3bit_32': 10 codes per int32 along the groups axis
        code_bits = math.ceil(n_groups / 10) * group_size * 32
    elif nbits in (5, 6, 8):  # stored as uint8
        code_bits = n_groups * group_size * 8
    else:
        code_bits = n_groups * group_size * nbits
    return code_bits + n_groups * 2 * meta_bits


@torch.no_grad()
def hqq_quantize_weight(weight: torch.Tensor, bits: int, group_size: int = 128, axis: int = 1, optimize: bool = True):
    """``(codes [n_groups, group_size] float, scale [n_groups, 1], zero [n_groups, 1])`` from hqq (axis 1).

    Dequantization is ``(codes - zero) * scale``, reshaped to the weight's shape.
    """
    BaseQuantizeConfig, _, Quantizer = _import_hqq()
    _check(bits, group_size, weight.shape)
    params = dict(BaseQuantizeConfig(nbits=bits, group_size=group_size, axis=axis)["weight_quant_params"])
    params["optimize"] = optimize
    params.pop("view_as_float", None)
    W_q, meta = Quantizer.quantize(
        weight.detach().float(),
        bitpack=False,
        compute_dtype=torch.float32,
        view_as_float=False,
        device=str(weight.device),
        **params,
    )
    return W_q.float(), meta["scale"].float(), meta["zero"].float()


@torch.no_grad()
def hqq_to_mobi(
    linear: nn.Linear,
    codes: torch.Tensor,
    scale: torch.Tensor,
    zero: torch.Tensor,
    bits: int,
    group_size: int,
    row_group: int | None = None,
):
    """Exact per-row re-grouping of an axis-1 HQQ result as a packed one-slice ``MoBiLinear``.

    ``row_group`` (default ``gcd(group_size, in)``) must divide both; returns ``(layer, row_group)``.
    """
    out_f, in_f = linear.out_features, linear.in_features
    s = row_group or math.gcd(group_size, in_f)
    if group_size % s or in_f % s:
        raise ValueError(f"row group {s} must divide both the HQQ group size {group_size} and the width {in_f}")
    per = group_size // s  # per-row groups of width s inside one HQQ group
    rows_codes = codes.reshape(out_f, in_f)
    seg_scale = scale.reshape(-1).repeat_interleave(per).reshape(out_f, in_f // s)
    seg_zero = zero.reshape(-1).repeat_interleave(per).reshape(out_f, in_f // s)
    return pack_linear_from_codes(linear, [rows_codes], seg_scale, seg_zero, (bits,), s), s


@torch.no_grad()
def quantize_hqq(
    model: nn.Module,
    bits: int,
    group_size: int = 128,
    axis: int = 1,
    optimize: bool = True,
    keep_module: bool = False,
    skip: Sequence[str] = (),
) -> nn.Module:
    """HQQ-quantize every block linear of ``model`` in place (on its current device); returns the model.

    Sets ``model.hqq_storage_bits`` (hqq's own layout: codes + fp16 step/zero per HQQ group) and
    ``model.hqq_settings``. See the module docstring for the layout and the two output forms.
    """
    BaseQuantizeConfig, HQQLinear, _ = _import_hqq()
    check_group_size(group_size)
    if axis not in (0, 1):
        raise ValueError(f"axis must be 0 or 1, got {axis}")
    if axis == 0 and not keep_module:
        raise ValueError(
            "axis=0 groups run along the output dimension, which the MoBiLinear format cannot "
            "hold: use keep_module=True"
        )
    t0 = time.perf_counter()
    blocks_name, blocks = find_blocks(model)
    todo = [
        (block, name, lin)
        for bi, block in enumerate(blocks)
        for name, lin in quantizable_linears(block, skip, prefix=f"{blocks_name}.{bi}").items()
        if isinstance(lin, nn.Linear)
    ]
    # one per-row group size for the whole model (MoBiConfig has one): divides every width and group_size
    row_group = math.gcd(group_size, *[lin.in_features for _, _, lin in todo]) if todo else group_size
    native_bits, weights = 0, 0
    for block, name, lin in todo:
        _check(bits, group_size, lin.weight.shape)
        numel = lin.weight.numel()
        native_bits += _hqq_native_bits(bits, numel // group_size, group_size)
        weights += numel
        if keep_module:
            cfg = BaseQuantizeConfig(nbits=bits, group_size=group_size, axis=axis)
            cfg["weight_quant_params"]["optimize"] = optimize
            dev = lin.weight.device
            q = HQQLinear(lin, cfg, del_orig=True, compute_dtype=lin.weight.dtype, device=str(dev))
        else:
            codes, scale, zero = hqq_quantize_weight(lin.weight, bits, group_size, axis, optimize)
            q, _ = hqq_to_mobi(lin, codes, scale, zero, bits, group_size, row_group)
        set_submodule(block, name, q)
    if not keep_module:
        mark_quantized(model, (blocks_name, blocks), (bits,), row_group, method="hqq", skip=skip)
    model.hqq_storage_bits = native_bits / max(weights, 1)
    model.hqq_settings = {
        "bits": bits,
        "group_size": group_size,
        "row_group": None if keep_module else row_group,
        "axis": axis,
        "optimize": optimize,
        "keep_module": keep_module,
        "hqq_version": hqq_version(),
        "seconds": time.perf_counter() - t0,
    }
    return model


def hqq_storage_bits(model: nn.Module) -> float:
    """Bits per weight in hqq's own storage layout (set by :func:`quantize_hqq`)."""
    if not hasattr(model, "hqq_storage_bits"):
        raise ValueError("model was not quantized by quantize_hqq")
    return float(model.hqq_storage_bits)


__all__ = ["HQQ_BITS", "hqq_available", "hqq_quantize_weight", "hqq_storage_bits", "hqq_to_mobi", "quantize_hqq"]

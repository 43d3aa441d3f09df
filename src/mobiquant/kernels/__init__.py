"""Bit-plane matmul kernels for packed MoBiSlice weights: the one inference dispatch of the package.

``bitplane_linear(x, planes, scale, zero, slice_bits, group_size, k, bias=None, backend=...)`` computes
``x W_k^T + bias`` reading only the first ``k`` bit-planes (``k`` an int, or a per-token tensor of slice
counts with ``x.shape[:-1]``). :class:`mobiquant.nn.linear.MoBiLinear` calls it for static and per-token
``k``; :func:`use_triton` decides the backend for every caller. The Triton implementation lives in
:mod:`.triton_bitplane` and is imported lazily: this package imports and runs (through the PyTorch path)
without Triton or a GPU. :func:`available` says whether the Triton path can run for a device (a CUDA
device, or any device when ``TRITON_INTERPRET=1`` asks for Triton's CPU interpreter); ``backend='auto'``
takes Triton on CUDA only (the interpreter is a test tool, asked for with ``backend='triton'``).
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F

from ..quant.packing import unpack_codes

__all__ = [
    "BACKENDS",
    "ROUTER_MAX_TOKENS",
    "available",
    "bitplane_linear",
    "capturing",
    "dequantize_reference",
    "fused_input",
    "fused_input_router",
    "fused_router",
    "router_partials",
    "spans",
    "torch_reference",
    "triton_importable",
    "use_fused_router",
    "use_triton",
    "view_pair",
]

BACKENDS = ("auto", "torch", "triton")
#: With backend 'auto', batches of more tokens than this route in PyTorch (a prefill's router is a plain GEMM
#: that cuBLAS does well); the fused router kernel serves decode-sized batches.
ROUTER_MAX_TOKENS = 64

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


def spans(config=None) -> bool:
    """Whether the one-bit plane kernel compiles a routed layer's two adjacent views alone (``triton_bitplane.
    SmallConfig.span_bodies``; ``config`` None: the default); False without Triton."""
    if config is None and not triton_importable():
        return False
    from .triton_bitplane import spans as _spans

    return _spans(config)


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


def use_triton(x: torch.Tensor, planes: Sequence[torch.Tensor], backend: str = "auto") -> bool:
    """Whether ``x W_k^T`` runs in the Triton kernels: 'torch' never; 'triton' always (an error when Triton
    cannot run on ``x``'s device or ``x`` must carry gradients); 'auto' on CUDA when Triton is available and
    no gradient is needed. The kernels read int32 words only: planes packed in bytes take the PyTorch path."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be 'auto', 'torch' or 'triton', got {backend!r}")
    if backend == "torch" or planes[0].dtype != torch.int32:
        return False
    # the kernels are inference-only (no autograd): a forward that must carry gradients back to its input
    # (e.g. mixed_layer's Fisher sensitivity) takes the PyTorch path
    needs_grad = torch.is_grad_enabled() and x.requires_grad
    if backend == "triton":
        if not available(x.device):
            raise RuntimeError("backend='triton' needs triton and a CUDA tensor (or TRITON_INTERPRET=1 on CPU)")
        if needs_grad:
            raise RuntimeError(
                "backend='triton' runs inference only, but this input requires grad: "
                "use backend='auto' (PyTorch path when gradients are needed) or torch.no_grad()"
            )
        return True
    return not needs_grad and x.is_cuda and available(x.device)


def capturing(x: torch.Tensor) -> bool:
    """Whether a CUDA graph is being captured on the current stream of ``x``'s device: no host read of the device
    then (it would end the capture). False off CUDA."""
    return x.is_cuda and torch.cuda.is_current_stream_capturing()


def _codes(plane: torch.Tensor, bits: int, cols: int) -> torch.Tensor:
    return unpack_codes(plane, bits, cols).to(torch.int64)


def view_pair(scale: torch.Tensor, zero: torch.Tensor, k: int, num_slices: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The step and zero point ``[out, n_groups]`` that view ``k`` reads: the shared pair (2-D ``scale``/``zero``)
    or the view's own (3-D, ``[num_slices, out, n_groups]``)."""
    if scale.dim() == 2 and zero.dim() == 2:
        return scale, zero
    if scale.dim() != 3 or zero.shape != scale.shape or scale.shape[0] != num_slices:
        raise ValueError(
            f"scale/zero must be [out, groups] or [{num_slices}, out, groups] (one pair per view), "
            f"got {tuple(scale.shape)} and {tuple(zero.shape)}"
        )
    return scale[k - 1], zero[k - 1]


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
    """``W_k = (s / 2^B_k) (C_k - 2^B_k z - (2^B_k - 1) / 2)`` ``[out, in]`` in float32, then ``dtype``.

    ``scale`` and ``zero`` are ``[out, n_groups]`` (one pair for every view) or ``[K, out, n_groups]`` (a pair
    per view: view ``k`` reads ``scale[k - 1]``, ``zero[k - 1]`` in the same formula)."""
    if not 1 <= k <= len(slice_bits):
        raise ValueError(f"k must be between 1 and {len(slice_bits)}, got {k}")
    scale, zero = view_pair(scale, zero, k, len(slice_bits))
    c = _codes(planes[0], slice_bits[0], in_features)
    for e in range(1, k):
        c = (c << slice_bits[e]) + _codes(planes[e], slice_bits[e], in_features)
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
    n_out = scale.shape[-2]
    cdt = compute_dtype or x.dtype
    x2 = x.reshape(-1, in_f).to(cdt)
    b = bias.to(cdt) if bias is not None else None

    def weight(kk: int) -> torch.Tensor:
        return dequantize_reference(planes, scale, zero, slice_bits, group_size, kk, in_f).to(cdt)

    return _torch_linear(x2, weight, k, b, n_out).to(x.dtype).reshape(*x.shape[:-1], n_out)


def _torch_linear(
    x: torch.Tensor,
    weight: Callable[[int], torch.Tensor],
    k,
    bias: torch.Tensor | None,
    n_out: int,
    matmul: Callable[[torch.Tensor, int], torch.Tensor] | None = None,
    pair: int | None = None,
) -> torch.Tensor:
    """``x W_k^T + bias`` with dense views ``weight(k)``, or ``matmul(rows [M, in], k)`` giving ``rows W_k^T`` (e.g.
    :class:`.int4.Int4Views`); per-token ``k`` by grouping tokens of equal ``k``.

    Per-token ``k`` costs one host read (the token count of each ``k``): tokens that all take one view run in
    one matmul; otherwise they are sorted by ``k`` once, each view multiplies its contiguous run of rows, and
    one scatter puts the rows back. ``pair`` ``j`` (with ``matmul``: a few tokens): every ``k`` is ``j`` or
    ``j + 1`` (the adjacent policy's threshold inside a band), so both views multiply every row and each token
    takes its own: no host read."""

    def linear(rows: torch.Tensor, kk: int) -> torch.Tensor:
        if matmul is None:
            return F.linear(rows, weight(kk).to(rows.dtype), bias)
        y = matmul(rows.reshape(-1, rows.shape[-1]), kk).reshape(*rows.shape[:-1], n_out)
        return y if bias is None else y + bias.to(y.dtype)

    if isinstance(k, int):
        return linear(x, k)
    flat_x = x.reshape(-1, x.shape[-1])
    flat_k = torch.as_tensor(k, device=x.device).reshape(-1)
    if flat_k.numel() != flat_x.shape[0]:
        raise ValueError(f"k has {flat_k.numel()} entries for {flat_x.shape[0]} tokens")
    if flat_k.numel() == 0:
        return x.new_empty(*x.shape[:-1], n_out)
    if pair is not None and matmul is not None:
        up = (flat_k > pair)[:, None]
        y = torch.where(up, linear(flat_x, pair + 1), linear(flat_x, pair))
        return y.reshape(*x.shape[:-1], n_out)
    counts = torch.bincount(flat_k).tolist()  # the one host read
    present = [(kk, n) for kk, n in enumerate(counts) if n]
    if len(present) == 1:
        return linear(x, present[0][0])
    order = torch.argsort(flat_k, stable=True)
    rows = flat_x.index_select(0, order)
    ys, start = [], 0
    for kk, n in present:
        ys.append(linear(rows[start : start + n], kk))
        start += n
    out = torch.empty(flat_x.shape[0], n_out, dtype=x.dtype, device=x.device)
    out.index_copy_(0, order, torch.cat(ys))
    return out.reshape(*x.shape[:-1], n_out)


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
    weight: Callable[[int], torch.Tensor] | None = None,
    matmul: Callable[[torch.Tensor, int], torch.Tensor] | None = None,
    pair: int | None = None,
    **kwargs,
) -> torch.Tensor:
    """``x W_k^T + bias`` from the first ``k`` bit-planes (``k``: an int, per-token counts, or a
    ``triton_bitplane.RoutedK`` of gate values and a threshold).

    ``scale`` / ``zero``: ``[out, n_groups]`` (one pair for every view) or ``[len(slice_bits), out, n_groups]`` (a
    pair per view, :func:`dequantize_reference`), on either backend and every Triton path, for any kind of ``k``.
    ``backend``: see :func:`use_triton`. ``weight``, optional: ``k -> W_k`` (dense ``[out, in]``, e.g. a
    cached view) for the PyTorch path, which otherwise dequantizes the planes on every call
    (:func:`torch_reference`); ``matmul``, optional: ``(rows [M, in], k) -> rows W_k^T`` for that path instead of a
    dense view (``MoBiLinear`` passes :class:`.int4.Int4Views`' for bf16 on the CPU); ``pair``: every per-token
    ``k`` is ``pair`` or ``pair + 1`` (with ``matmul``: both views taken, no host read, :func:`_torch_linear`; on
    Triton's one-bit plane path: only those two views' bodies compiled, ``triton_bitplane.bitplane_linear_bits``'s
    ``span``). Extra
    keyword arguments go to the Triton entry (``out``, ``small_config``, ``tile_config``, ``path``, ``packed``: e.g.
    ``small_config=SmallConfig(bitplanes=True)`` runs one token in the one-bit plane kernel); the PyTorch path
    honours ``out``."""
    if use_triton(x, planes, backend):
        from .triton_bitplane import bitplane_linear as _tri

        span = None if pair is None or isinstance(k, int) else (pair, pair + 1)
        return _tri(x, planes, scale, zero, slice_bits, group_size, k, bias, span=span, **kwargs)
    if isinstance(k, tuple) and hasattr(k, "counts"):  # triton_bitplane.RoutedK: gate values and a threshold
        k = k.counts()
    if weight is None and matmul is None:
        y = torch_reference(x, planes, scale, zero, slice_bits, group_size, k, bias)
    else:
        dense = weight or (
            lambda kk: dequantize_reference(planes, scale, zero, slice_bits, group_size, kk, x.shape[-1])
        )
        y = _torch_linear(x, dense, k, bias, scale.shape[-2], matmul, pair)
    out = kwargs.get("out")
    if out is not None:
        out.copy_(y.reshape(out.shape))
        return out.reshape(y.shape)
    return y


# ------------------------------------------------------------------------------------------- router
def use_fused_router(x: torch.Tensor, backend: str = "auto") -> bool:
    """Whether a router's hard decisions for ``x`` run in the fused Triton kernel: 'torch' never, 'triton'
    always (an error when Triton cannot run on ``x``'s device), 'auto' on CUDA for at most
    :data:`ROUTER_MAX_TOKENS` tokens. Hard decisions carry no gradient, so none is needed here."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be 'auto', 'torch' or 'triton', got {backend!r}")
    if backend == "torch":
        return False
    if backend == "triton":
        if not available(x.device):
            raise RuntimeError("backend='triton' needs triton and a CUDA tensor (or TRITON_INTERPRET=1 on CPU)")
        return True
    return x.is_cuda and x.numel() <= ROUTER_MAX_TOKENS * x.shape[-1] and available(x.device)


def fused_router(
    x: torch.Tensor,
    w1: torch.Tensor,
    b1: torch.Tensor,
    w2: torch.Tensor,
    b2: torch.Tensor,
    tau: torch.Tensor,
    policy: str = "free",
    pdl: bool = False,
    early_l2: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One launch: slice counts ``k`` and gate values of a ``d -> hidden -> K-1`` router for tokens ``x``,
    against the threshold held in the device tensor ``tau`` (:mod:`.triton_router`); ``pdl``: with programmatic
    dependent launch; ``early_l2``: the router's weights asked of L2 before its inputs are read."""
    from .triton_router import fused_router as _fused

    return _fused(x, w1, b1, w2, b2, tau, policy, pdl=pdl, early_l2=early_l2)


def fused_input_router(
    x: torch.Tensor,
    prologue: tuple,
    router: Sequence[torch.Tensor],
    tau: torch.Tensor,
    policy: str,
    pdl: bool = False,
    early_l2: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One launch: the rows ``y`` a prologue makes of ``x`` (``("rms_norm", weight, eps)``: ``LlamaRMSNorm``'s
    arithmetic; ``("silu_mul", up)``: a gated MLP's ``silu(x) * up``) and the slice counts and gate values on ``y``
    of the router ``(w1, b1, w2, b2)`` (:func:`fused_router`'s, exactly): ``(y, k, v)`` (:mod:`.triton_router`);
    ``pdl``: with programmatic dependent launch; ``early_l2``: as :func:`fused_router`'s."""
    from .triton_router import fused_input_router as _fused

    return _fused(x, prologue, router, tau, policy, pdl=pdl, early_l2=early_l2)


def router_partials(
    x: torch.Tensor,
    router: Sequence[torch.Tensor],
    policy: str,
    prologue: tuple | None = None,
    pdl: bool = False,
    early_l2: bool = False,
):
    """One launch of the router ``(w1, b1, w2, b2)`` on ``x`` (the rows ``prologue`` makes of it, as
    :func:`fused_input_router`'s) without its tail: ``(y or None, RouterPartials)``, the column splits'
    pre-activations for the GEMVs to finish (:mod:`.triton_router`, ``SmallConfig.router_partials``)."""
    from .triton_router import router_partials as _partials

    return _partials(x, router, policy, prologue=prologue, pdl=pdl, early_l2=early_l2)


def fused_input(x: torch.Tensor, prologue: tuple) -> torch.Tensor:
    """One launch: the rows a prologue makes of ``x`` (:func:`fused_input_router`'s), without a router."""
    from .triton_router import fused_input as _input

    return _input(x, prologue)

"""MoBiSlice: one weight stored as a base slice plus recursive mid-rise residual slices.

Base slice (asymmetric, LWC):      ``W1 = h (q1 - z)``
Residual slice ``e`` (no params):  ``h_e = h_(e-1) / 2^b_e``,
                                   ``q_e = clamp(floor((W - W_(e-1)) / h_e) + 2^(b_e-1), 0, 2^b_e - 1)``,
                                   ``W_e = W_(e-1) + h_e (q_e - (2^b_e - 1) / 2)``.

The ``k``-slice view is also one integer code times one shared step (what a kernel computes):
``C_k = sum_e q_e 2^(B_k - B_e)`` with ``B_e = b_2 + ... + b_e`` and
``W_k = (h / 2^B_k) (C_k - 2^B_k z - (2^B_k - 1) / 2)`` (the half offsets of the residuals telescope).

Grid anchor (``anchor_bits``, an option beyond the paper): by default the base slice is the min-max grid of
``b_1`` bits (``h = range / (2^b_1 - 1)``) and the nested ``k``-slice view has step ``range / 12`` at 4 bits
for slices 2-2-2-2, coarser than the direct 4-bit grid (``range / 15``). With ``anchor_bits = a`` the base
step is ``2^(a - b_1)`` steps of the ``a``-bit min-max grid and its levels are their centres (a fractional
zero point), so the ``a``-bit view is exactly the zero-aligned ``a``-bit min-max grid, views above it
subdivide it, and views below it merge its steps. Nothing else changes: the residual recursion, the codes,
the shift-and-add form and the kernels are the same.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from .primitives import (
    GroupQuantParams,
    check_bits,
    check_group_size,
    floor_ste,
    from_groups,
    lwc_params,
    num_groups,
    quantize,
    to_groups,
    weighted_affine_fit,
)


def check_slice_bits(slice_bits: Sequence[int]) -> tuple[int, ...]:
    if isinstance(slice_bits, (str, bytes)) or not isinstance(slice_bits, Sequence):
        raise ValueError(f"slice_bits must be a list of slice bit-widths, e.g. [2, 2, 2, 2], got {slice_bits!r}")
    bits = tuple(slice_bits)
    if not bits:
        raise ValueError("slice_bits must list at least one slice bit-width, e.g. [2, 2, 2, 2]")
    for i, b in enumerate(bits):
        check_bits(b, name=f"slice_bits[{i}]")
    if sum(bits) > 8:
        raise ValueError(f"slice_bits {list(bits)} sum to {sum(bits)} bits; the concatenated code must fit 8 bits")
    return bits


def check_anchor_bits(anchor_bits: int | None, slice_bits: Sequence[int]) -> int | None:
    """``None`` (the base slice's own min-max grid, as in the paper) or a view's bit-width ``b_1 + ... + b_k``."""
    if anchor_bits is None:
        return None
    views = [sum(slice_bits[:k]) for k in range(1, len(slice_bits) + 1)]
    if isinstance(anchor_bits, bool) or not isinstance(anchor_bits, int) or anchor_bits not in views:
        raise ValueError(
            f"anchor_bits must be null (grid anchored at the base slice) or the bit-width of one of the views "
            f"of slice_bits {list(slice_bits)}, i.e. one of {views}; got {anchor_bits!r}"
        )
    return None if anchor_bits == slice_bits[0] else anchor_bits


@dataclass
class SliceCodes:
    """Integer codes of every slice (``[out, n_groups, group_size]`` each, padded) and the base params."""

    codes: list[torch.Tensor]
    scale: torch.Tensor  # [out, n_groups, 1]
    zero: torch.Tensor  # [out, n_groups, 1]


class _SteViews(torch.autograd.Function):
    """All views ``W_1..W_n`` with straight-through rounding, differentiable in step ``h`` and zero ``z``.

    Equal in value and gradient to the autograd recursion of :meth:`ResidualSlicer.grouped_views` with
    ``ste=True``, but it keeps no per-op graph: the backward re-runs the recursion and accumulates
    ``dW_e/dh`` and ``dW_e/dz`` in closed form, which is several times cheaper in time and memory.
    With ``in_e`` the clamp pass-through mask of slice ``e`` and ``r_e`` its unrounded residual code:
    ``dW_1/dh = (q_1 - z) - in_1 W/h``, ``dW_1/dz = -h (1 - in_1)``,
    ``dW_e/dh = (1 - in_e) dW_(e-1)/dh + (q_e - c_e - in_e r_e) / 2^B_e``, ``dW_e/dz = (1 - in_e) dW_(e-1)/dz``.
    """

    @staticmethod
    def _recursion(grouped, scale, zero, bits, want_grads):
        qmax = 2 ** bits[0] - 1
        whole = zero.round()  # as in primitives.quantize: exact for integer zero points
        t = (grouped / scale + (zero - whole)).round() + whole
        inside = (t >= 0) & (t <= qmax)
        q = t.clamp(0, qmax)
        view = scale * (q - zero)
        views = [view]
        if want_grads:
            a = (q - zero) - inside * (grouped / scale)
            c = -scale * (~inside)
            grads = [(a, c)]
        shift = 0
        step = scale
        for b in bits[1:]:
            shift += b
            step = step / 2**b
            r = (grouped - view) / step
            t = r.floor() + 2 ** (b - 1)
            inside = (t >= 0) & (t <= 2**b - 1)
            q = t.clamp(0, 2**b - 1)
            view = view + step * (q - (2**b - 1) / 2)
            views.append(view)
            if want_grads:
                keep = (~inside).to(grouped.dtype)
                a = a * keep + (q - (2**b - 1) / 2 - inside * r) / 2**shift
                c = c * keep
                grads.append((a, c))
        return views, (grads if want_grads else None)

    @staticmethod
    def forward(ctx, grouped, scale, zero, bits):
        views, _ = _SteViews._recursion(grouped, scale, zero, bits, False)
        ctx.save_for_backward(grouped, scale, zero)
        ctx.bits = bits
        return tuple(views)

    @staticmethod
    def backward(ctx, *grad_views):
        grouped, scale, zero = ctx.saved_tensors
        with torch.no_grad():
            _, grads = _SteViews._recursion(grouped, scale, zero, ctx.bits, True)
            d_scale = torch.zeros_like(scale)
            d_zero = torch.zeros_like(zero)
            for g, (a, c) in zip(grad_views, grads, strict=True):
                if g is None:
                    continue
                d_scale += (g * a).sum(-1, keepdim=True)
                d_zero += (g * c).sum(-1, keepdim=True)
        return None, d_scale, d_zero, None


class ResidualSlicer:
    """Decomposes weights into ``len(slice_bits)`` slices and rebuilds the ``k``-slice views."""

    def __init__(self, slice_bits: Sequence[int] = (2, 2, 2, 2), group_size: int = 128, anchor_bits: int | None = None):
        self.slice_bits = check_slice_bits(slice_bits)
        self.group_size = check_group_size(group_size)
        self.anchor_bits = check_anchor_bits(anchor_bits, self.slice_bits)

    @property
    def num_slices(self) -> int:
        return len(self.slice_bits)

    def bits_at(self, k: int) -> int:
        """Bits per weight of the ``k``-slice view (codes only)."""
        self._check_k(k)
        return sum(self.slice_bits[:k])

    def _check_k(self, k: int) -> None:
        if not 1 <= k <= self.num_slices:
            raise ValueError(f"k must be between 1 and {self.num_slices} slices, got {k}")

    def residual_shift(self, k: int) -> int:
        """``B_k = b_2 + ... + b_k``: the extra bits of the ``k``-slice code over the base slice."""
        return sum(self.slice_bits[1:k])

    # ----- floating-point recursion (also the differentiable fake-quant path) -----
    def base_params(
        self,
        grouped: torch.Tensor,
        gamma: torch.Tensor | None = None,
        beta: torch.Tensor | None = None,
        ste: bool = False,
        scale_dtype: torch.dtype | None = None,
    ) -> GroupQuantParams:
        params = lwc_params(grouped, self.slice_bits[0], gamma, beta, ste=ste, anchor_bits=self.anchor_bits)
        if scale_dtype is not None:  # step and zero point as stored (e.g. fp16): views match the checkpoint
            rounded = params.scale.to(scale_dtype).to(params.scale.dtype)
            # The zero point is an integer but lies far outside [0, 2^b1 - 1] for one-signed narrow groups
            # (e.g. constant ones): keep it finite and exactly what the fp16 buffer will hold.
            limit = torch.finfo(scale_dtype).max
            zero = params.zero.clamp(-limit, limit).to(scale_dtype).to(params.zero.dtype)
            params = GroupQuantParams(
                scale=(rounded - params.scale).detach() + params.scale,
                zero=(zero - params.zero).detach() + params.zero,
            )
        return params

    def grouped_views(
        self,
        grouped: torch.Tensor,
        params: GroupQuantParams,
        ste: bool = False,
        return_codes: bool = False,
        upto: int | None = None,
    ):
        """Views ``W_1..W_upto`` (default all ``K``) of a grouped weight (and optionally the codes)."""
        b1 = self.slice_bits[0]
        q = quantize(grouped, params, b1, ste=ste)
        view = params.scale * (q - params.zero)
        views, codes = [view], [q]
        step = params.scale
        for b in self.slice_bits[1 : upto or self.num_slices]:
            step = step / 2**b
            r = (grouped - view) / step
            r = floor_ste(r) if ste else r.floor()
            q = (r + 2 ** (b - 1)).clamp(0, 2**b - 1)
            view = view + step * (q - (2**b - 1) / 2)
            views.append(view)
            codes.append(q)
        return (views, codes) if return_codes else views

    def views(
        self,
        weight: torch.Tensor,
        gamma: torch.Tensor | None = None,
        beta: torch.Tensor | None = None,
        ste: bool = False,
        scale_dtype: torch.dtype | None = None,
        upto: int | None = None,
    ) -> list[torch.Tensor]:
        """Reconstructions ``[W_1, ..., W_upto]`` of ``weight`` ``[out, in]`` in floating point.

        With ``ste=True`` the views are differentiable in ``gamma``/``beta`` (straight-through rounding).
        """
        grouped = to_groups(weight, self.group_size)
        params = self.base_params(grouped, gamma, beta, ste=ste, scale_dtype=scale_dtype)
        if ste:
            bits = self.slice_bits[: upto or self.num_slices]
            views = _SteViews.apply(grouped.detach(), params.scale, params.zero, bits)
        else:
            views = self.grouped_views(grouped, params, ste=ste, upto=upto)
        return [from_groups(v, weight.shape[1]) for v in views]

    def decompose(
        self,
        weight: torch.Tensor,
        gamma: torch.Tensor | None = None,
        beta: torch.Tensor | None = None,
        scale_dtype: torch.dtype | None = torch.float16,
    ) -> SliceCodes:
        """Integer codes of every slice for storage (no gradient)."""
        with torch.no_grad():
            grouped = to_groups(weight.float(), self.group_size)
            params = self.base_params(grouped, gamma, beta, scale_dtype=scale_dtype)
            _, codes = self.grouped_views(grouped, params, return_codes=True)
        return SliceCodes(codes=[c.to(torch.uint8) for c in codes], scale=params.scale, zero=params.zero)

    # ----- integer shift-and-add form (what the kernels compute) -----
    def concat_codes(self, codes: Sequence[torch.Tensor], k: int) -> torch.Tensor:
        """``C_k``: the first ``k`` slice codes concatenated most-significant first (int32)."""
        self._check_k(k)
        c = codes[0].to(torch.int32)
        for e in range(1, k):
            c = (c << self.slice_bits[e]) + codes[e].to(torch.int32)
        return c

    def fit_view_pairs(
        self,
        weight: torch.Tensor,
        codes: Sequence[torch.Tensor],
        scale: torch.Tensor,
        col_weight: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """A step and zero point per view and group for the unchanged codes: ``([K, out, n_groups], same)`` fp16.

        View ``k`` reads its code ``C_k`` as ``W_k = s_k (t_k - z_k)`` with ``t_k = C_k / 2^B_k - (1 - 2^-B_k) / 2``
        (the formula of :meth:`integer_view` with the view's own pair), and ``(s_k, z_k)`` is the least-squares
        fit of ``weight`` ``[out, in]``: with ``col_weight`` ``[in]`` each input column's error weighted by it
        (e.g. its mean squared activation; None: equal weights), with ``col_weight`` ``[n_groups, group_size,
        group_size]`` the error ``e`` of each row and group measured as ``e^T H_g e`` (``H_g``: the group's block of
        the input second-moment matrix, so the fit minimises the group's output error on those inputs). The step
        is rounded to fp16 first and the zero point fitted for the rounded step. Groups where the slope is
        degenerate (a constant code, a non-positive slope) keep the shared step ``scale`` (``[out, n_groups, 1]``,
        as :meth:`decompose` returns it) with the zero point fitted for it.
        ``codes``: the slice codes, grouped ``[out, n_groups, group_size]``."""
        out_f, in_f = weight.shape
        gs, ng = self.group_size, num_groups(in_f, self.group_size)
        w = to_groups(weight.double(), gs)
        pad = ng * gs - in_f
        keep = torch.cat([torch.ones(in_f), torch.zeros(pad)]).double().to(weight.device).reshape(ng, gs)
        if col_weight is None:
            col_weight = torch.ones(in_f, dtype=torch.float64, device=weight.device)
        cw = col_weight.double()
        if cw.shape == (in_f,):
            d = torch.cat([cw, cw.new_zeros(pad)]).reshape(1, ng, gs)  # padding: no weight
            H = None
        elif cw.shape == (ng, gs, gs):
            H = cw * keep[:, :, None] * keep[:, None, :]
        else:
            raise ValueError(f"col_weight must be [{in_f}] or [{ng}, {gs}, {gs}], got shape {tuple(cw.shape)}")
        if not bool(torch.isfinite(cw).all()) or (H is None and bool((cw < 0).any())):
            raise ValueError("col_weight must be finite (and >= 0 as per-column weights)")
        fp16 = torch.finfo(torch.float16)
        s_shared = scale.double()
        ones = torch.ones_like(w)
        if H is not None:
            H1 = torch.einsum("rgi,gij->rgj", ones, H)  # H 1 per row and group
            oHo = (H1 * ones).sum(-1, keepdim=True)
            oHw = (H1 * w).sum(-1, keepdim=True)
        scales, zeros = [], []
        for k in range(1, self.num_slices + 1):
            shift = self.residual_shift(k)
            t = self.concat_codes(codes, k).double() / 2**shift - (1 - 2.0**-shift) / 2
            if H is None:
                a, mt, mw = weighted_affine_fit(w, t, d.expand_as(w))
                ok = torch.isfinite(a) & (a >= fp16.tiny)
                s = torch.where(ok, a, s_shared).clamp(max=fp16.max).half().double()
                z = mt - mw / s
            else:
                # e = w - s t + c 1 minimising e^T H e: [tHt, -tH1; 1Ht, -1H1] [s; c] = [tHw; 1Hw]
                Ht = torch.einsum("rgi,gij->rgj", t, H)
                tHt, tHw, oHt = (
                    (Ht * t).sum(-1, keepdim=True),
                    (Ht * w).sum(-1, keepdim=True),
                    (H1 * t).sum(-1, keepdim=True),
                )
                det = oHt * oHt - tHt * oHo
                a = torch.where(det.abs() > 1e-30, (oHt * oHw - tHw * oHo) / torch.where(det == 0, 1.0, det), 0.0)
                ok = torch.isfinite(a) & (a >= fp16.tiny)
                s = torch.where(ok, a, s_shared).clamp(max=fp16.max).half().double()
                c = torch.where(oHo > 0, (s * oHt - oHw) / torch.where(oHo > 0, oHo, 1.0), 0.0)  # best c for s
                z = c / s
            scales.append(s.squeeze(-1).half())
            zeros.append(z.clamp(-fp16.max, fp16.max).squeeze(-1).half())
        return torch.stack(scales), torch.stack(zeros)

    def integer_view(
        self, codes: Sequence[torch.Tensor], scale: torch.Tensor, zero: torch.Tensor, k: int
    ) -> torch.Tensor:
        """``W_k`` (grouped layout) from the concatenated code and the ONE shared step ``h``."""
        shift = self.residual_shift(k)
        c = self.concat_codes(codes, k).to(scale.dtype)
        return (scale / 2**shift) * (c - (2**shift * zero + (2**shift - 1) / 2))

    def integer_reconstruct(self, sc: SliceCodes, k: int, in_features: int) -> torch.Tensor:
        return from_groups(self.integer_view(sc.codes, sc.scale, sc.zero, k), in_features)

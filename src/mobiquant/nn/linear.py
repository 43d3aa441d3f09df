"""``MoBiLinear``: a drop-in replacement for ``nn.Linear`` holding a MoBiSlice weight and a router link.

Two lives:
* *fake-quant* (during calibration): keeps the frozen full-precision weight and the learnable LWC
  parameters ``gamma``/``beta``; slices are recomputed every forward with straight-through rounding, so the
  loss is differentiable in LWC and router parameters.
* *packed* (after :meth:`freeze`): only bit-plane codes (one packed buffer per slice), the fp16 step and
  zero point per group (``scale``/``zero`` ``[out, n_groups]``), or with ``view_steps`` one such pair per view
  (``[K, out, n_groups]``, fitted at packing time). This is the deployable checkpoint; every reported number
  comes from it.

In either life the forward runs in one of two modes: ``static`` (every token uses ``static_k`` slices)
or ``routed`` (the router picks ``k`` per token; during training, straight-through nested gates).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..kernels import int4
from ..quant.packing import pack_codes, packed_width, unpack_codes
from ..quant.primitives import from_groups, num_groups
from ..quant.slicer import ResidualSlicer
from .fused import made_input
from .router import TokenRouter

Mode = Literal["static", "routed"]


class MoBiLinear(nn.Module):
    # buffers and parameters registered at run time, declared for type checkers: ``weight`` is the FP weight
    # until the layer is packed (then None); ``scale``, ``zero`` and ``plane<e>`` exist once it is packed.
    weight: torch.Tensor
    bias: torch.Tensor | None
    gamma: nn.Parameter | None
    beta: nn.Parameter | None
    scale: torch.Tensor
    zero: torch.Tensor
    _compute_dtype: torch.dtype

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        slice_bits=(2, 2, 2, 2),
        group_size: int = 128,
        lwc_init: float | None = 4.0,
        word_bits: int = 32,
        device=None,
        dtype=None,
        anchor_bits: int | None = None,
        view_steps: bool = False,
    ):
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.slicer = ResidualSlicer(slice_bits, group_size, anchor_bits)
        self.word_bits = word_bits
        self.lwc_init = lwc_init
        self.view_steps = view_steps
        ng = num_groups(in_features, group_size)
        factory = {"device": device, "dtype": dtype}
        self.register_buffer("weight", torch.empty(out_features, in_features, **factory))
        if bias:
            self.register_buffer("bias", torch.zeros(out_features, **factory))
        else:
            self.bias = None
        if lwc_init is not None:
            self.gamma = nn.Parameter(torch.full((out_features, ng), float(lwc_init), device=device))
            self.beta = nn.Parameter(torch.full((out_features, ng), float(lwc_init), device=device))
        else:
            self.gamma = self.beta = None
        self.packed = False
        # the learned pair and the fitted per-view pairs, kept while calibration chooses between them per view
        self.shared_pair: tuple[torch.Tensor, torch.Tensor] | None = None
        self._fitted_pairs: tuple[torch.Tensor, torch.Tensor] | None = None
        self.mode: Mode = "static"
        self.static_k = self.num_slices
        self.target_bits: float | None = None  # training-time budget for routed fake-quant
        self._router: TokenRouter | None = None
        # Packed routed inference with this linear's own threshold on its (shared) router's gate values
        # (None: the router's threshold). A float, or a 0-dim tensor on the module's device (a budget change
        # then writes it on the device: a captured CUDA graph reads the new value). Set by
        # mobiquant.elastic.site_budgets for per-linear budgets; cleared by patching.set_budget. While a
        # router.ThresholdRecorder that holds this linear is attached, the batch's quantile threshold for the
        # linear's budget is used (and recorded) instead.
        self.route_tau: float | torch.Tensor | None = None
        # The view this linear's threshold fixes at the budget decode applied (``tasks.decode.BudgetControl``), known
        # on the host. While its router is fixed (``TokenRouter.fixed``) an uncaptured forward of several tokens (a
        # prompt) runs that view in one launch, not a routed launch per view; a compiled CPU step traces it as a static
        # view whether or not the router is fixed (``_traced_int4``).
        self.fixed_k: int | None = None
        self.pair_k: int | None = None  # set with fixed_k: the lower of the two views the tokens choose from
        self.track = False
        self.k_counts = torch.zeros(self.num_slices, dtype=torch.float64)
        # False: this linear borrows its router's decisions on another input, that of the router's home linears
        # (router placement 'sublayer': o takes the decisions made on q/k/v's input, down those on gate/up's)
        self.router_home = True
        # a borrower's input site in its block (patching.router_homes): borrowers of one input share a site launch
        self.input_site: int | None = None
        self._view_cache: dict[Any, torch.Tensor] = {}  # view k (compute dtype), or (k, dtype) (dense_view)
        # While set (calibration's per-view pair tuning, calibration.ViewPairTuning), a packed layer computes
        # ``x W^T + bias`` with ``W = weight_override()``, a differentiable weight, instead of its stored view.
        self.weight_override: Callable[[], torch.Tensor] | None = None
        # Packed matmul: 'torch' (dequantize + F.linear), 'triton' (bit-plane kernels), or 'auto' (triton
        # when x is on CUDA and triton imports, else torch).
        self.backend: Literal["auto", "torch", "triton"] = "auto"
        # Launch configuration of the Triton small-batch kernels (a triton_bitplane.SmallConfig; None: the
        # defaults). One-token forwards that run the one-bit plane kernel (``triton_bitplane.wants_bitplanes``: by
        # default for layouts such as [3, 1, 1, 1, 1, 1]) read buffers (the planes split into one-bit planes, same
        # bytes) built on first use and kept beside the planes.
        self.small_config: Any = None
        self._bitplanes: Any = None
        self._int4: Any = None  # kernels.int4.Int4Views, built on first use

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_linear(cls, linear: nn.Linear, **kwargs) -> MoBiLinear:
        m = cls(
            linear.in_features,
            linear.out_features,
            bias=linear.bias is not None,
            device=linear.weight.device,
            dtype=linear.weight.dtype,
            **kwargs,
        )
        with torch.no_grad():
            m.weight.copy_(linear.weight)
            if linear.bias is not None:
                assert m.bias is not None
                m.bias.copy_(linear.bias)
        return m

    @property
    def slice_bits(self) -> tuple[int, ...]:
        return self.slicer.slice_bits

    @property
    def num_slices(self) -> int:
        return self.slicer.num_slices

    @property
    def router(self) -> TokenRouter | None:
        return self._router

    def attach_router(self, router: TokenRouter | None) -> None:
        # A plain attribute, not a submodule: routers are shared by several linears and registered once,
        # at the block level, so state dicts hold each router exactly once.
        object.__setattr__(self, "_router", router)

    def extra_repr(self) -> str:
        return (
            f"in={self.in_features}, out={self.out_features}, slices={list(self.slice_bits)}, "
            f"g={self.slicer.group_size}, packed={self.packed}, mode={self.mode}"
            + (f", k={self.static_k}" if self.mode == "static" else "")
        )

    # ------------------------------------------------------------------ mode control
    @property
    def decodes_static(self) -> bool:
        """Whether every token takes the static view ``static_k`` (static mode, or no router to decide)."""
        return self.mode == "static" or self._router is None

    def set_static(self, k: int) -> None:
        self.slicer._check_k(k)
        self.mode, self.static_k = "static", k

    def set_routed(self) -> None:
        if self._router is None:
            raise RuntimeError("this MoBiLinear has no router attached; routed mode is unavailable")
        self.mode = "routed"

    def reset_counts(self) -> None:
        self.k_counts = torch.zeros(self.num_slices, dtype=torch.float64)

    # ------------------------------------------------------------------ weights
    def fake_views(self, ste: bool = True, upto: int | None = None) -> list[torch.Tensor]:
        """Differentiable ``[W_1..W_upto]`` (default all K) from the FP weight and the LWC parameters."""
        return self.slicer.views(
            self.weight.float(), self.gamma, self.beta, ste=ste, scale_dtype=torch.float16, upto=upto
        )

    def plane(self, e: int) -> torch.Tensor:
        return self._buffers[f"plane{e}"]  # type: ignore[return-value]  # a packed layer's buffer (no __getattr__)

    def codes(self) -> list[torch.Tensor]:
        """Unpacked slice codes ``[out, in]`` (uint8) of a packed layer."""
        self._require_packed()
        return [unpack_codes(self.plane(e), b, self.in_features, self.word_bits) for e, b in enumerate(self.slice_bits)]

    def dequantized(self, k: int) -> torch.Tensor:
        """``W_k`` of a packed layer by integer shift-and-add, cached until the codes change."""
        self._require_packed()
        if k not in self._view_cache:
            with torch.inference_mode(False), torch.no_grad():  # a cache usable both in and out of inference
                self._view_cache[k] = self._integer_view(k)
        return self._view_cache[k]

    def dense_view(self, k: int, dtype: torch.dtype) -> torch.Tensor:
        """:meth:`dequantized` view ``k`` in ``dtype`` (a bf16 model over a checkpoint that dequantizes in fp32), cast
        once and cached beside it rather than on every forward."""
        w = self.dequantized(k)
        if w.dtype == dtype:
            return w
        key = (k, dtype)
        if key not in self._view_cache:
            with torch.inference_mode(False), torch.no_grad():
                self._view_cache[key] = w.to(dtype)
        return self._view_cache[key]

    def view_codes(self, k: int) -> torch.Tensor:
        """The integer codes view ``k`` reads, ``C_k`` ``[out, in]`` (int64): the first ``k`` slices' codes
        concatenated, base first (``kernels.dequantize_reference`` gives the formula of the weight)."""
        self._require_packed()
        self.slicer._check_k(k)
        codes = self.codes()
        c = codes[0].long()
        for e in range(1, k):
            c = (c << self.slice_bits[e]) + codes[e].long()
        return c

    def view_weight(self, k: int, scale: torch.Tensor, zero: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
        """``W_k`` ``[out, in]`` (float32) from view ``k``'s ``codes`` (:meth:`view_codes`) read with the step and
        zero point ``scale``/``zero`` ``[out, n_groups]`` (any float tensors: differentiable in both)."""
        shift = sum(self.slice_bits[1:k])
        gs = self.slicer.group_size
        s = scale.float().repeat_interleave(gs, dim=1)[:, : self.in_features]
        z = zero.float().repeat_interleave(gs, dim=1)[:, : self.in_features]
        return (s / 2**shift) * (codes.float() - (2**shift * z + (2**shift - 1) / 2))

    def _integer_view(self, k: int) -> torch.Tensor:
        from ..kernels import dequantize_reference

        planes = [self.plane(e) for e in range(self.num_slices)]
        return dequantize_reference(
            planes,
            self.scale,
            self.zero,
            self.slice_bits,
            self.slicer.group_size,
            k,
            self.in_features,
            dtype=self.weight_dtype,
        )

    @property
    def weight_dtype(self) -> torch.dtype:
        return self._compute_dtype

    def _require_packed(self) -> None:
        if not self.packed:
            raise RuntimeError("layer is not packed yet: call freeze() after calibration")

    @torch.no_grad()
    def freeze(self, col_weight: torch.Tensor | None = None, keep_shared: bool = False) -> None:
        """Turn the learned LWC into stored codes: bit-planes, fp16 steps and zero points; drop FP weight.

        With ``view_steps`` every view gets its own step and zero point per group, fitted to the FP weight by
        least squares with each input column's error weighted by ``col_weight`` ``[in]`` (its mean squared
        input activation on calibration text; None: equal weights), or each group's error measured by its block
        of the input second-moment matrix (``col_weight`` ``[n_groups, group_size, group_size]``; see
        ``ResidualSlicer.fit_view_pairs``). ``keep_shared``: also keep the learned (shared) pair, so that
        :meth:`blend_view_pair` can put it back (or part of it) for a view (calibration chooses per view by the
        block's error; :meth:`drop_shared_pair` ends the choice)."""
        if self.packed:
            return
        sc = self.slicer.decompose(self.weight.float(), self.gamma, self.beta, scale_dtype=torch.float16)
        self._compute_dtype = self.weight.dtype
        for e, (c, b) in enumerate(zip(sc.codes, self.slice_bits, strict=True)):
            flat = from_groups(c, self.in_features)
            self.register_buffer(f"plane{e}", pack_codes(flat, b, self.word_bits))
        if self.view_steps:
            cw = None if col_weight is None else col_weight.to(self.weight.device)
            scale, zero = self.slicer.fit_view_pairs(self.weight.float(), sc.codes, sc.scale, cw)
            if keep_shared:
                self.shared_pair = (sc.scale.squeeze(-1).to(torch.float16), sc.zero.squeeze(-1).to(torch.float16))
        else:
            if col_weight is not None:
                raise ValueError("col_weight fits a step and zero point per view: this layer has view_steps=False")
            scale, zero = sc.scale.squeeze(-1), sc.zero.squeeze(-1)
        self.register_buffer("scale", scale.to(torch.float16).contiguous())
        self.register_buffer("zero", zero.to(torch.float16).contiguous())
        del self.weight
        self.register_buffer("weight", None)
        self.gamma = self.beta = None
        self.packed = True
        self.clear_cache()

    @torch.no_grad()
    def blend_view_pair(self, k: int, t: float) -> None:
        """View ``k`` reads ``t`` of its fitted step and zero point and ``1 - t`` of the learned shared pair.

        ``t = 1``: the fitted pair (as packed), ``t = 0``: the shared pair, exactly; in between, the step and the
        offset ``step * zero`` are blended linearly (the view's weights move on the line between the two
        readings) and rounded to fp16. Only between ``freeze(keep_shared=True)`` and :meth:`drop_shared_pair` of
        a layer with ``view_steps``."""
        if self.shared_pair is None:
            raise RuntimeError("no shared pair kept: freeze(keep_shared=True) a layer with view_steps first")
        self.slicer._check_k(k)
        if not 0.0 <= t <= 1.0:
            raise ValueError(f"t must be in [0, 1] (1: the fitted pair, 0: the shared pair), got {t}")
        if self._fitted_pairs is None:
            self._fitted_pairs = (self.scale.clone(), self.zero.clone())
        fit_s, fit_z = self._fitted_pairs[0][k - 1], self._fitted_pairs[1][k - 1]
        sh_s, sh_z = self.shared_pair
        if t == 1.0 or t == 0.0:
            scale, zero = (fit_s, fit_z) if t == 1.0 else (sh_s, sh_z)
        else:
            s1, s0 = fit_s.float(), sh_s.float()
            scale = ((1 - t) * s0 + t * s1).half()
            offset = (1 - t) * s0 * sh_z.float() + t * s1 * fit_z.float()
            limit = torch.finfo(torch.float16).max
            zero = (offset / scale.float()).clamp(-limit, limit).half()
        self.scale[k - 1].copy_(scale)
        self.zero[k - 1].copy_(zero)
        self.clear_cache()

    def drop_shared_pair(self) -> None:
        """End the per-view choice: the pairs stay as chosen, the kept copies go."""
        self.shared_pair = None
        self._fitted_pairs = None

    def make_packed_buffers(self, compute_dtype: torch.dtype = torch.float32) -> None:
        """Empty packed buffers of the right shapes, to be filled by ``load_state_dict``."""
        ng = num_groups(self.in_features, self.slicer.group_size)
        dev = self.weight.device if self.weight is not None else None
        for e, b in enumerate(self.slice_bits):
            dtype = torch.int32 if self.word_bits == 32 else torch.uint8
            width = packed_width(self.in_features, b, self.word_bits)
            self.register_buffer(f"plane{e}", torch.zeros(self.out_features, width, dtype=dtype, device=dev))
        shape = (self.num_slices, self.out_features, ng) if self.view_steps else (self.out_features, ng)
        self.register_buffer("scale", torch.ones(shape, dtype=torch.float16, device=dev))
        self.register_buffer("zero", torch.zeros(shape, dtype=torch.float16, device=dev))
        self._compute_dtype = compute_dtype
        if "weight" in self._buffers:
            del self._buffers["weight"]
        self.register_buffer("weight", None)
        self.gamma = self.beta = None
        self.packed = True
        self.clear_cache()

    def clear_cache(self) -> None:
        self._view_cache.clear()
        self._bitplanes = None
        self._int4 = None

    def _apply(self, fn, recurse=True):  # .to()/.cuda() invalidate cached dequantized views and kernel buffers
        self._view_cache.clear()
        self._bitplanes = None
        self._int4 = None
        out = super()._apply(fn, recurse)
        if self.packed and getattr(self, "_compute_dtype", None) is not None:
            probe = fn(torch.zeros((), dtype=self._compute_dtype))
            if probe.is_floating_point():
                self._compute_dtype = probe.dtype
        return out

    # ------------------------------------------------------------------ forward
    def forward(
        self, x: torch.Tensor, residual: torch.Tensor | None = None, prologue: Any = None, epilogue: Any = None
    ) -> torch.Tensor:
        """``x W^T + bias``, plus ``residual`` (of the output's shape) when given: for one token on the one-bit
        plane and fragment kernels added in the launch's epilogue (as the bias is), else by one addition.
        ``prologue``: ``x`` is the input of what makes this linear's input (:func:`~mobiquant.nn.fused.made_input`:
        ``("rms_norm", weight, eps)``, LLaMA's RMS norm, or ``("silu_mul", up)``, a gated MLP's product of the gate
        ``x``): made in this linear's launch (or its site group's) where that launch can (:meth:`takes_prologue`),
        else here first. ``epilogue``: a :class:`~mobiquant.kernels.epilogue.NextInput` filled from the outputs (the
        residual added) for the next launch, by this launch where it can (:meth:`takes_epilogue`), else here after."""
        router = self._router
        if router is not None and router.has_borrowers:  # the borrowers' input, recorded as the home linears run:
            return self._forward_opaque(x, residual, prologue, epilogue)  # kept out of a compiled trace
        if torch.compiler.is_compiling():  # decode's cuda_graph='compile': a CPU int4 view is traced with the rest
            y = self._traced_int4(x if prologue is None else made_input(x, prologue))
            if y is not None:
                y = y if residual is None else y + residual
                if epilogue is not None:
                    epilogue.make(y)
                return y
        return self._forward_opaque(x, residual, prologue, epilogue)

    def takes_prologue(
        self, x: torch.Tensor, alone: bool = True, kind: str = "rms_norm", home_made: bool = False
    ) -> bool:
        """Whether this linear's one-token launch for ``x`` makes its input from a prologue of ``kind`` itself
        (:meth:`forward`): a packed static view on the one-bit plane kernel's whole-K programs, where the fragment
        kernel does not serve it, or a norm made by the launch before (``"rms_scale"``) on the fragment kernel
        (``triton_bitplane.takes_prologue``); ``alone=False``: this linear's part of its site group's answer
        (:meth:`~mobiquant.nn.site.SiteGroup.takes_prologue`). A linear whose own router reads its input takes a
        made norm only where that router's decisions for ``x`` were made by the launch before too
        (``TokenRouter.made_for``; ``home_made``: asked before they are, as if they were)."""
        if (
            kind == "rms_scale"
            and self._device_view_launch(x)
            and (not self.router_home or home_made or self._decisions_made_for(x))
        ):
            # its decisions come from another input (or were made before): it may read a made norm
            return alone is False or self._routed_made_by(x, kind)
        if not self._static_launch(x):
            return False
        from ..kernels import triton_bitplane as tbp

        cfg = getattr(self, "small_config", None)
        if not alone:
            return True
        x2 = x.reshape(1, -1)
        return tbp.takes_prologue(x2, self.bitplane_buffers(), self.static_k, (self.out_features,), cfg, kind)

    def takes_epilogue(self, x: torch.Tensor, kind: str, alone: bool = True) -> bool:
        """Whether this linear's one-token launch for ``x`` fills a :class:`~mobiquant.kernels.epilogue.NextInput`
        of ``kind`` itself (``triton_bitplane.takes_epilogue``: a static view on the fragment kernel); ``alone=False``:
        this linear's part of its site group's answer (:meth:`~mobiquant.nn.site.SiteGroup.takes_epilogue`)."""
        if self._device_view_launch(x):
            return alone is False or self._routed_made_by(x, kind)
        if not self._static_launch(x):
            return False
        from ..kernels import triton_bitplane as tbp

        if not alone:
            return True
        cfg = getattr(self, "small_config", None)
        x2 = x.reshape(1, -1)
        return tbp.takes_epilogue(x2, self.bitplane_buffers(), self.static_k, (self.out_features,), cfg, kind)

    def _routed_made_by(self, x: torch.Tensor, kind: str) -> bool:
        """This routed linear's own launch's answer to :meth:`takes_epilogue` or :meth:`takes_prologue`
        (``"rms_scale"``): ``triton_bitplane``'s for its view on the device, within its tokens' pair of views when
        the config asks for spans."""
        from ..kernels import triton_bitplane as tbp

        cfg = getattr(self, "small_config", None)
        j = self._token_pair()
        span = (j, j + 1) if j is not None and tbp.spans(cfg) else None
        x2, bp, outs = x.reshape(1, -1), self.bitplane_buffers(), (self.out_features,)
        if kind == "rms_scale":
            return tbp.takes_prologue(x2, bp, None, outs, cfg, kind, span)
        return tbp.takes_epilogue(x2, bp, None, outs, cfg, kind, span)

    def _made_here(self, x: torch.Tensor, prologue: tuple) -> torch.Tensor:
        """The input ``prologue`` makes of ``x``, made here (no launch makes it); where this linear's router holds
        its decisions for ``x``, made elsewhere, they are its decisions for the made input too
        (``TokenRouter.pass_values``: no router runs on it)."""
        made = made_input(x, prologue)
        if self._decisions_made_for(x):
            self._router.pass_values(x, made)  # type: ignore[union-attr]
        return made

    def _decisions_made_for(self, x: torch.Tensor) -> bool:
        """Whether this linear's router holds its decisions for ``x``, made elsewhere (``TokenRouter.made_for``: the
        launch before finished it; for this linear, or for the borrowers of a home linear at a static view)."""
        router = self._router
        return router is not None and router.made_for(x)

    def _device_view_launch(self, x: torch.Tensor) -> bool:
        """Whether ``x`` is one token this packed routed linear decodes at a view read on the device (its router's
        gate values, no router in its launch) on the one-bit plane buffers' kernels, with
        ``SmallConfig.fragment_routed_epilogues`` (the launches that may then take an epilogue or a made norm; no
        ``small_config``: the defaults, as every launch reads them)."""
        from ..kernels.triton_bitplane import small_config_or_default

        cfg = small_config_or_default(getattr(self, "small_config", None))
        if not cfg.fragment_routed_epilogues or self.decodes_static:
            return False
        if cfg.router_in_launch and self.router_home:
            return False  # its router's programs in the launch: the norm is theirs to read
        return self._one_token_bits(x)

    def _static_launch(self, x: torch.Tensor) -> bool:
        """Whether ``x`` is one token this packed linear decodes at a static view on the one-bit plane buffers'
        kernels (the launches that may take a prologue or an epilogue)."""
        if not self.decodes_static:
            return False  # a routed linear's router makes (or reads) the prologue's output
        return self._one_token_bits(x)

    def _one_token_bits(self, x: torch.Tensor) -> bool:
        """Whether ``x`` is one token this packed linear (no weight override, not tracking) decodes on the one-bit
        plane buffers' kernels (Triton on CUDA, or the backend asked for)."""
        if x.numel() != x.shape[-1] or not self.packed or self.weight_override is not None or self.track:
            return False
        if not (x.is_cuda or getattr(self, "backend", "auto") != "auto") or not self._use_triton(x):
            return False
        from ..kernels import triton_bitplane as tbp

        cfg = getattr(self, "small_config", None)
        return bool(tbp.wants_bitplanes(self.slice_bits, self.slicer.group_size, cfg))

    def _traced_int4(self, x: torch.Tensor) -> torch.Tensor | None:
        """Under ``torch.compile``, the forward that Inductor can take into the step's graph: a packed layer's bf16
        decode on the CPU through int4 matmuls whose packs exist (built by an eager forward before), at a view known
        on the host (a static view, or the view a budget fixed), nothing counted. None otherwise (the forward then
        stays opaque). Dynamo guards on the view: a budget that changes it compiles the step again."""
        if x.is_cuda or not self.packed or self.weight_override is not None or self.track:
            return None
        if getattr(self, "backend", "auto") != "auto" or not int4.input_fits(x):
            return None
        k = self.static_k if self.decodes_static else self._host_view()
        views = self._int4
        x2 = x.reshape(-1, x.shape[-1])
        if k is not None:
            if views is None or not views.built(k):
                return None
            y = views.matmul(x2, k)
        else:  # tokens decide between two adjacent views: both computed, each token's taken
            j, router = self._token_pair(), self._router
            if j is None or views is None or not (views.built(j) and views.built(j + 1)):
                return None
            assert router is not None
            tau = router.tau if self.route_tau is None else self.route_tau
            up = router.gate_values(router.scores(x2))[:, j - 1] > tau  # (a router with borrowers: never traced)
            y = torch.where(up[:, None], views.matmul(x2, j + 1), views.matmul(x2, j))
        y = y.reshape(*x.shape[:-1], self.out_features)
        bias = self._buffers.get("bias")
        return y if bias is None else y + bias.to(y.dtype)

    def _host_view(self) -> int | None:
        """The view this routed layer's own threshold gives every token at the budget applied (``fixed_k``, set by
        decode with it), whether or not its router is fixed (the router's other linears may leave it to the tokens);
        None while thresholds are fitted or where the tokens decide."""
        router = self._router
        if router is None or router.recorder is not None:
            return None
        return self.fixed_k

    def _token_pair(self) -> int | None:
        """``j`` when this routed layer's tokens choose between views ``j`` and ``j + 1`` (the adjacent policy with
        its threshold inside a band, set with the budget: ``pair_k``), its router not fitting thresholds or fixed;
        else None."""
        router = self._router
        if self.mode != "routed" or router is None or router.fixed or router.recorder is not None:
            return None
        return self.pair_k

    # opaque to torch.compile: Inductor cannot take the Triton launches (decode's cuda_graph='compile' compiles the
    # code between these calls and captures them in its graph)
    @torch.compiler.disable
    def _forward_opaque(
        self, x: torch.Tensor, residual: torch.Tensor | None = None, prologue: Any = None, epilogue: Any = None
    ) -> torch.Tensor:
        router = self._router
        home = router is not None and router.has_borrowers and self.router_home
        # the router's decisions on x made before, or asked by no one (router.idle_for): x may stay unmade
        made = home and (self._decisions_made_for(x) or router.idle_for(x))  # type: ignore[union-attr]
        if prologue is not None and home and not made:  # the router's input, made once for its home linears
            x, prologue = router.made_once(x, prologue, made_input), None  # type: ignore[union-attr]
        elif prologue is not None and (not self.packed or self.weight_override is not None):
            x, prologue = made_input(x, prologue), None  # the input made here, once: no launch makes it
        if home:
            router.see_home(x)  # type: ignore[union-attr]
        if self.weight_override is not None:
            y = F.linear(x, self.weight_override().to(x.dtype), self.bias)
        elif self.packed:
            return self._forward_packed(x, residual, prologue, epilogue)
        else:
            y = self._forward_fake(x)
        y = y if residual is None else y + residual
        if epilogue is not None:  # no launch of ours made it: made here
            epilogue.make(y)
        return y

    def _count(self, k: torch.Tensor | int, n_tokens: int) -> None:
        if not self.track:
            return
        if isinstance(k, int):
            self.k_counts[k - 1] += n_tokens
        else:
            self.k_counts += torch.bincount(k.reshape(-1).cpu(), minlength=self.num_slices + 1)[1:].double()

    def _forward_fake(self, x: torch.Tensor) -> torch.Tensor:
        n_tokens = x.numel() // x.shape[-1]
        if self.mode == "static" or self._router is None:  # decodes_static, spelled out for the type checker
            w = self.fake_views(upto=self.static_k)[-1]
            self._count(self.static_k, n_tokens)
            return F.linear(x, w.to(x.dtype), self.bias)
        views = self.fake_views()
        gates, _ = self._router.gates(self._router_input(x), self.target_bits)
        y = F.linear(x, views[0].to(x.dtype), self.bias)
        for e in range(1, self.num_slices):
            delta = (views[e] - views[e - 1]).to(x.dtype)
            y = y + gates[..., e - 1 : e].to(x.dtype) * F.linear(x, delta)
        if self.track:
            self._count(1 + (gates.detach() > 0.5).cumprod(-1).sum(-1), n_tokens)
        return y

    def _use_triton(self, x: torch.Tensor) -> bool:
        """Whether the packed forward of ``x`` runs in the Triton kernels (:func:`mobiquant.kernels.use_triton`)."""
        from .. import kernels

        return kernels.use_triton(x, [self.plane(0)], getattr(self, "backend", "auto"))

    def _routed_k(self, x: torch.Tensor, in_kernel: bool = False) -> Any:
        """Slices per token: the router's choice, or this linear's own threshold on the router's values.
        ``in_kernel``: the kernel can count them itself (the one-bit plane kernel): where the threshold is a
        tensor, the router's gate values and that threshold (``triton_bitplane.RoutedK``), so that no launch
        turns the values into counts for this linear; for one token on the fused router's path, the router
        itself (``TokenRouter.in_launch``) with ``SmallConfig(router_in_launch=True)``, which the one-bit plane
        launch runs first (no router launch at all)."""
        from .. import kernels

        router = self._router
        assert router is not None  # routed mode only
        x = self._router_input(x)  # the router decides on its own input (a borrower's differs: 'sublayer')
        rec = router.recorder
        budget = None if rec is None else rec.budget(self)
        if budget is not None:  # threshold fitting: this batch's quantile for this linear's budget
            assert rec is not None
            tau = router.batch_threshold(x, budget)
            rec.record(self, tau)
            return router.slice_counts_at(x, tau)
        if self._fixed_view() is not None and not kernels.capturing(x):
            return self.fixed_k  # every token's view, known on the host (a captured graph reads the thresholds)
        own = router.tau if self.route_tau is None else self.route_tau
        if in_kernel and torch.is_tensor(own) and own.device == x.device:
            from ..kernels.triton_bitplane import RoutedK

            cfg = getattr(self, "small_config", None)
            in_launch = cfg is not None and cfg.router_in_launch and self.router_home  # a borrower's GEMV reads
            launch = router.in_launch(x) if in_launch else None  # another input than the router's
            if launch is not None:  # the router runs in the GEMV's own launch (its site's, with fuse_sites)
                return RoutedK(launch[0], own, launch[1])
            partials = router.partials_of(x)  # SmallConfig.router_partials: the GEMV finishes the router
            return RoutedK(router.gate_values_of(x) if partials is None else partials, own)
        if self.route_tau is None:
            return router.slice_counts(x)
        return router.slice_counts_at(x, self.route_tau)

    def _router_input(self, x: torch.Tensor) -> torch.Tensor:
        """The input this linear's router decides on: ``x``, or for a borrower (``router_home`` False) the input its
        router's home linears last saw (:meth:`TokenRouter.home_input`, which checks that it holds ``x``'s tokens)."""
        if self.router_home or self._router is None:
            return x
        return self._router.home_input(x)

    def _fixed_view(self) -> int | None:
        """The view every token takes when the budget fixed this routed layer's router (its thresholds lie between
        bands), not fitting thresholds; else None (the tokens decide)."""
        router = self._router
        return self._host_view() if router is not None and router.fixed else None

    def _forward_packed(
        self, x: torch.Tensor, residual: torch.Tensor | None = None, prologue: Any = None, epilogue: Any = None
    ) -> torch.Tensor:
        from .. import kernels

        n_tokens = x.numel() // x.shape[-1]
        bias = self._buffers.get("bias")
        extra = {}
        cfg = getattr(self, "small_config", None)
        backend = getattr(self, "backend", "auto")
        int4_mm = backend == "auto" and self._int4_serves(x, cfg)
        if int4_mm and x.is_cuda:  # a few tokens on CUDA through torch's int4 matmul (SmallConfig.int4_tokens)
            backend = "torch"
        elif (x.is_cuda or backend != "auto") and self._use_triton(x):  # 'auto' takes Triton on CUDA only
            if cfg is not None:
                extra["small_config"] = cfg
            from ..kernels import triton_bitplane as tbp

            if n_tokens == 1:
                if tbp.wants_bitplanes(self.slice_bits, self.slicer.group_size, cfg):
                    extra["packed"] = self.bitplane_buffers()
                    extra["path"] = "bits"  # decided here: the kernel entry need not decide again
            elif tbp.dequant_from_bits(self.slice_bits, self.slicer.group_size, self.out_features, self.in_features):
                extra["packed"] = self.bitplane_buffers()  # read by the dequantize pass of a prompt
        group = getattr(self, "_site_group", None)
        if group is not None and extra.get("path") == "bits":  # one launch for the site (patching.fuse_sites)
            y = group.output(self, x, cfg, prologue, epilogue)  # (the group fills an epilogue itself)
            if y is not None:
                return y if residual is None else y + residual
        if prologue is not None:
            if group is None and extra.get("path") == "bits" and self.takes_prologue(x, kind=prologue[0]):
                extra["prologue"] = prologue  # made in this linear's launch
            else:  # no launch makes it: made here
                x = self._made_here(x, prologue)
        # one token's residual is the launch's bias: added in the kernel's epilogue
        in_epilogue = residual is not None and bias is None and extra.get("path") == "bits"
        epi_in_launch = (
            epilogue is not None
            and group is None
            and extra.get("path") == "bits"
            and (residual is None or in_epilogue)
            and self.takes_epilogue(x, epilogue.kind)
        )
        if epi_in_launch:
            extra["epilogue"] = epilogue  # filled by this linear's launch
        if in_epilogue:
            assert residual is not None
            bias = residual.reshape(-1)
        k: Any
        if self.decodes_static:
            k = self.static_k
        else:  # the one-bit plane kernel counts the slices itself, unless they are counted here (track)
            k = self._routed_k(x, in_kernel=extra.get("path") == "bits" and not self.track)
        self._count(k, n_tokens)
        planes = [self.plane(e) for e in range(self.num_slices)]
        matmul = None
        # tokens between two adjacent views: the int4 matmuls take both (no host read), the one-bit plane kernel
        # compiles those two views' bodies alone (SmallConfig.span_bodies)
        j = self._token_pair()
        pair = None if isinstance(k, int) else j
        if int4_mm:  # (then no Triton entry was chosen above)
            views = self.int4_views()
            matmul = views.matmul  # int4 matmuls of the views (kernels.int4)
            if j is not None and not x.is_cuda:  # both views' packs, for a compiled step to trace (_traced_int4)
                views.parts(j), views.parts(j + 1)
        buffers = self._buffers
        y = kernels.bitplane_linear(
            x,
            planes,
            buffers["scale"],  # type: ignore[arg-type]
            buffers["zero"],  # type: ignore[arg-type]
            self.slice_bits,
            self.slicer.group_size,
            k,
            bias,
            backend=backend,
            weight=lambda kk: self.dense_view(kk, x.dtype),
            matmul=matmul,
            pair=pair,
            **extra,
        )
        y = y if residual is None or in_epilogue else y + residual
        if epilogue is not None and not epilogue.made and group is None:  # no launch made it: made here (a site
            epilogue.make(y)  # member's is its caller's to make, from every member's outputs)
        return y

    def _int4_serves(self, x: torch.Tensor, cfg: Any = None) -> bool:
        """Whether the int4 matmuls (``kernels.int4``) serve ``x``: bf16 decode on the CPU; on CUDA 2 to
        ``cfg.int4_tokens`` tokens (``SmallConfig``; without one, ``int4.CUDA_TOKENS``), and while a CUDA graph is
        captured (batched decode) only a static view whose packs an earlier forward built (the graph replays them;
        it cannot build one, nor read per-token views on the host). The layer's part of the answer (its shape,
        group, widest view) is kept per device type after the first call."""
        if x.is_cuda:
            cuda_tokens = int4.CUDA_TOKENS if cfg is None else getattr(cfg, "int4_tokens", 0)
            if not cuda_tokens:
                return False
        dev = x.device.type
        fits = self.__dict__.setdefault("_int4_ok", {})
        if dev not in fits:
            fits[dev] = int4.layer_fits(
                self.out_features, self.in_features, self.slicer.group_size, sum(self.slice_bits), dev
            )
        if not fits[dev]:
            return False
        if not x.is_cuda:
            return int4.input_fits(x)
        if not int4.cuda_input_fits(x, cuda_tokens):
            return False
        from .. import kernels

        if kernels.capturing(x):
            views = self._int4
            return self.decodes_static and views is not None and views.built(self.static_k)
        return True

    def int4_views(self) -> Any:
        """The views of this packed layer as int4 packs (``kernels.int4.Int4Views``, for the layer's device), built
        view by view on first use and kept until the codes, steps or device change."""
        self._require_packed()
        views = getattr(self, "_int4", None)
        if views is None:
            from ..kernels.int4 import Int4Views

            views = Int4Views(
                lambda: self.view_codes(self.num_slices),
                self.scale,
                self.zero,
                self.slice_bits,
                self.slicer.group_size,
                self.in_features,
            )
            self._int4 = views
        return views

    def bitplane_buffers(self) -> Any:
        """The one-bit plane kernel's buffers of this packed layer (``triton_bitplane.BitPlanes``), built on first
        use from the planes (the checkpoint keeps its format) and kept until the codes or the device change."""
        self._require_packed()
        bp = getattr(self, "_bitplanes", None)
        if bp is None or bp.words.device != self.scale.device:
            from ..kernels.triton_bitplane import pack_bitplanes

            with torch.inference_mode(False), torch.no_grad():
                bp = pack_bitplanes(
                    [self.plane(e) for e in range(self.num_slices)],
                    self.scale,
                    self.zero,
                    self.slice_bits,
                    self.slicer.group_size,
                    self.in_features,
                )
            self._bitplanes = bp
        return bp

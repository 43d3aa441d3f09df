"""The modules that make a routed site's input, fused with the site's router at decode time.

A decode step of a Hugging Face LLaMA runs ``LlamaRMSNorm`` as eight small kernels (casts, square, mean, add,
rsqrt, two products) and ``LlamaMLP``'s ``act_fn(gate) * up`` as two, and then, on a routed site, the site's
router as one more launch that reads those rows again. :func:`mobiquant.patching.fuse_inputs` puts these modules in
place of each norm and gated MLP whose arithmetic they reproduce: for decode-sized inputs on the GPU (those
:func:`mobiquant.kernels.use_fused_router` sends to the kernels) one launch makes the rows and, where they feed a
routed linear, runs that linear's router on them (:meth:`~mobiquant.nn.router.TokenRouter.routed_input`): the
linears of the site then find their router's decisions made. Other inputs (prefill, training, the CPU) run the
model's own arithmetic. Parameters and submodules keep their names: state dicts do not change.
"""

from __future__ import annotations

from typing import Any, cast

import torch
import torch.nn as nn
import torch.nn.functional as F

from .router import TokenRouter


def _fast(x: torch.Tensor, backend: str, operands: Any) -> bool:
    """Whether ``x`` goes to the kernels: decode-sized, on their device, and no gradient asked for (of ``x`` or the
    other ``operands``)."""
    from .. import kernels

    if not kernels.use_fused_router(x, backend):
        return False
    return not (torch.is_grad_enabled() and (x.requires_grad or any(p.requires_grad for p in operands)))


def routes(router: TokenRouter | None, consumer: Any) -> bool:
    """Whether ``router`` decides for ``consumer`` (the linear fed by the rows) in the launch that makes them: a routed
    linear, not training, thresholds not being fitted, views not all fixed by their thresholds (``router.fixed``: the
    decisions are then a constant buffer). An unquantized consumer (nn.Linear) has no mode."""
    routed = getattr(consumer, "mode", None) == "routed" and not consumer.training
    own = getattr(consumer, "router_home", True)  # a borrower's router decides on another input (placement 'sublayer')
    return router is not None and routed and own and router.recorder is None and not router.fixed


def _compiled_away(router: TokenRouter | None, consumer: Any) -> bool:
    """Under ``torch.compile`` (decode's ``cuda_graph='compile'``) the rows of a consumer no router decides for are
    left to Inductor, which fuses the norm or product with the code around it: a fused launch there breaks the
    compiled graph for nothing (an H200, the 8B-shaped package model in fp16: 752.6 us a token with fused inputs
    against 678.7 without; docs/RESULTS.md "The fragment-native Gluon GEMV on the H200", seventh-session part)."""
    return torch.compiler.is_compiling() and not routes(router, consumer)


@torch.compiler.disable  # a Triton launch: opaque to torch.compile, like MoBiLinear.forward
def _made(x: torch.Tensor, prologue: tuple, router: TokenRouter | None, consumer: Any) -> torch.Tensor:
    """The rows ``prologue`` makes of ``x`` in one launch, with ``router``'s decisions on them where ``consumer`` (the
    linear fed by the rows) will ask for them."""
    from .. import kernels

    if routes(router, consumer):
        return router.routed_input(x, prologue)  # type: ignore[union-attr]
    return kernels.fused_input(x, prologue)


class FusedRMSNorm(nn.Module):
    """Stands in for ``norm`` (an RMS norm computing ``weight * (x * rsqrt(mean(x^2) + eps)).to(x.dtype)``)."""

    weight: nn.Parameter
    original: nn.Module
    router: TokenRouter | None
    consumer: Any

    def __init__(self, norm: nn.Module, eps: float, router: TokenRouter | None = None, consumer: Any = None):
        super().__init__()
        weight = norm.weight
        if not isinstance(weight, nn.Parameter):
            raise TypeError(f"{type(norm).__name__} has no weight parameter to share")
        self.weight = weight
        self.variance_epsilon = float(eps)
        # 'auto': the kernels on CUDA for decode-sized inputs; 'torch' never; 'triton' always (interpreter on CPU)
        self.backend = "auto"
        # held outside the module tree: the norm and the router stay where the model registers them
        object.__setattr__(self, "original", norm)
        object.__setattr__(self, "router", router)
        object.__setattr__(self, "consumer", consumer)

    def extra_repr(self) -> str:
        return f"{tuple(self.weight.shape)}, eps={self.variance_epsilon}, routes={self.router is not None}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not _fast(x, self.backend, (self.weight,)) or _compiled_away(self.router, self.consumer):
            return self.original(x)
        return _made(x, ("rms_norm", self.weight, self.variance_epsilon), self.router, self.consumer)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """LLaMA's RMS norm (``LlamaRMSNorm``'s arithmetic: the mean of squares in fp32, the row rounded to ``x``'s
    dtype, then times ``weight``)."""
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(x.dtype)


#: The RMS norms whose forward is :func:`rms_norm` (by class name): the model's own, or ours in their place.
RMS_NORMS = ("LlamaRMSNorm", "MistralRMSNorm", "Qwen2RMSNorm", "FusedRMSNorm")


def made_input(x: torch.Tensor, prologue: tuple) -> torch.Tensor:
    """What ``prologue`` makes of ``x``: ``("rms_norm", weight, eps)``, :func:`rms_norm`; ``("silu_mul", up)``,
    a gated MLP's ``silu(x) * up`` (``x`` the gate); ``("rms_scale", sums, eps)``, a norm whose parts the launch
    before made (``x`` its input times its weight, :mod:`mobiquant.kernels.epilogue`)."""
    if prologue[0] == "rms_norm":
        return rms_norm(x, prologue[1], prologue[2])
    if prologue[0] == "silu_mul":
        return F.silu(x) * prologue[1]
    if prologue[0] == "rms_scale":
        from ..kernels.epilogue import rms_scaled

        return rms_scaled(x, prologue[1], prologue[2])
    raise ValueError(
        f"prologue must be ('rms_norm', weight, eps), ('silu_mul', up) or ('rms_scale', sums, eps), got {prologue[0]!r}"
    )


def norm_prologue(norm: nn.Module, consumer: Any) -> tuple | None:
    """``("rms_norm", weight, eps)`` of ``norm`` when it is an RMS norm of :data:`RMS_NORMS` whose output
    ``consumer`` (the linear it feeds) may make in its own launch: not a fused norm whose launch runs the consumer's
    router on the rows it makes (the router needs them). None otherwise."""
    if type(norm).__name__ not in RMS_NORMS:
        return None
    weight = getattr(norm, "weight", None)
    eps = getattr(norm, "variance_epsilon", None)
    if not isinstance(weight, torch.Tensor) or weight.dim() != 1 or eps is None:
        return None
    if isinstance(norm, FusedRMSNorm) and routes(norm.router, consumer):
        return None
    return "rms_norm", weight, float(eps)


def linear_add(linear: nn.Module, x: torch.Tensor, residual: torch.Tensor | None, epilogue: Any = None) -> torch.Tensor:
    """``residual + linear(x)`` (``linear(x)`` when ``residual`` is None) in as few launches as the linear allows: a
    :class:`~mobiquant.nn.linear.MoBiLinear` adds it in its kernel's epilogue (one token), a plain ``nn.Linear``
    without bias through one ``addmm`` (cuBLAS's epilogue) when eager, anything else, and anything under
    ``torch.compile``, by an addition: Inductor fuses it with the next norm (the model's own step does so), where
    ``addmm`` first copies the residual into its output (8 more copies a step of the 8B-shaped fp16 model on an H100,
    docs/RESULTS.md "A lean decode step"). ``epilogue``: a :class:`~mobiquant.kernels.epilogue.NextInput` filled from
    the sum (in the launch where a :class:`~mobiquant.nn.linear.MoBiLinear` can, else after)."""
    from .linear import MoBiLinear

    if isinstance(linear, MoBiLinear):
        return linear(x, residual=residual, epilogue=epilogue)
    if epilogue is not None:
        y = linear_add(linear, x, residual)
        epilogue.make(y)
        return y
    if residual is None:
        return linear(x)
    if isinstance(linear, nn.Linear) and type(linear) is nn.Linear and not torch.compiler.is_compiling():
        n = linear.out_features
        if linear.bias is None and residual.shape[-1] == n:
            y = torch.addmm(residual.reshape(-1, n), x.reshape(-1, x.shape[-1]), linear.weight.t())
            return y.reshape(residual.shape)
    return residual + linear(x)


def prologue_outputs(
    linears: tuple[nn.Module, ...], x: torch.Tensor, prologue: tuple | None, epilogue: Any = None
) -> list:
    """Each linear's output on ``made_input(x, prologue)`` (on ``x`` when ``prologue`` is None): a packed linear is
    handed ``x`` and the prologue, to make in its (site's) launch (:class:`~mobiquant.nn.linear.MoBiLinear`), the
    others the prologue's output, made once. ``epilogue``: a :class:`~mobiquant.kernels.epilogue.NextInput` of the
    linears' outputs side by side (e.g. gate and up: their product), handed to the first where it is packed (its site
    group's launch fills it), else made here from the outputs."""
    from .linear import MoBiLinear

    if epilogue is not None:
        first = linears[0]
        if isinstance(first, MoBiLinear) and getattr(first, "_site_group", None) is not None:
            outs = [first(x, prologue=prologue, epilogue=epilogue)] + prologue_outputs(linears[1:], x, prologue)
        else:
            outs = prologue_outputs(linears, x, prologue)
        if not epilogue.made:  # no launch made it: made here
            epilogue.make(torch.cat([o.reshape(-1) for o in outs]))
        return outs
    if prologue is None:
        return [lin(x) for lin in linears]
    made: list[torch.Tensor] = []

    def input_() -> torch.Tensor:
        if not made:
            made.append(made_input(x, prologue))
        return made[0]

    return [lin(x, prologue=prologue) if isinstance(lin, MoBiLinear) else lin(input_()) for lin in linears]


#: The linears of a gated MLP, by their Hugging Face names (LLaMA, Mistral, Qwen2).
PARTS = ("gate_proj", "up_proj", "down_proj")


def gated_mlp(mod: nn.Module) -> bool:
    """Whether ``mod`` has the parts of a gated MLP (``gate_proj``, ``up_proj``, ``down_proj``, ``act_fn``)."""
    return all(isinstance(getattr(mod, p, None), nn.Module) for p in PARTS) and callable(getattr(mod, "act_fn", None))


class FusedGatedMLP(nn.Module):
    """Stands in for ``mlp`` (``down_proj(act_fn(gate_proj(x)) * up_proj(x))`` with SiLU), its linears its own: the
    product, and the router of ``down_proj`` on it, in one launch."""

    original: nn.Module
    gate_proj: nn.Module
    up_proj: nn.Module
    down_proj: nn.Module
    act_fn: Any

    def __init__(self, mlp: nn.Module):
        super().__init__()
        self.gate_proj, self.up_proj, self.down_proj = (cast(nn.Module, getattr(mlp, p)) for p in PARTS)
        self.act_fn = mlp.act_fn
        self.backend = "auto"
        object.__setattr__(self, "original", mlp)

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None, prologue: Any = None) -> torch.Tensor:
        """The MLP's output, plus ``residual`` when given (:func:`linear_add`: in the down launch's epilogue);
        ``prologue``: what makes the MLP's input from ``x`` (:func:`prologue_outputs`)."""
        gate, up = prologue_outputs((self.gate_proj, self.up_proj), x, prologue)
        return self.down_of(gate, up, residual)

    def down_of(self, gate: torch.Tensor, up: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        """``down_proj(act_fn(gate) * up)`` (+ ``residual``): the product, and the down router on it, in one launch
        where the kernels serve it."""
        router = getattr(self.down_proj, "router", None)
        if not _fast(gate, self.backend, (up,)) or _compiled_away(router, self.down_proj):
            return linear_add(self.down_proj, self.act_fn(gate) * up, residual)
        return linear_add(self.down_proj, _made(gate, ("silu_mul", up), router, self.down_proj), residual)

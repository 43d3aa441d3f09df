"""``FusedRMSNorm``: a model's RMS norm, with the router of the site it feeds, in one kernel launch at decode time.

A decode step of a Hugging Face LLaMA runs ``LlamaRMSNorm`` as eight small kernels (casts, square, mean, add,
rsqrt, two products) and then, on a routed site, the site's router as one more launch that reads the norm's
output again. :func:`mobiquant.patching.fuse_norms` puts this module in place of each norm whose arithmetic it
reproduces: for decode-sized inputs on the GPU (those :func:`mobiquant.kernels.use_fused_router` sends to the
kernels) one launch computes the norm and, where the norm feeds a routed linear, that linear's router on the
norm's output (:meth:`~mobiquant.nn.router.TokenRouter.normed_input`): the linears of the site then find their
router's decisions made. Other inputs (prefill, training, the CPU) run the model's own norm module unchanged.
The weight is the model's own parameter, under the same name: state dicts do not change.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn

from .router import TokenRouter


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

    def _routes(self) -> bool:
        """Whether the linear fed by this norm will ask its router for hard decisions on the norm's output."""
        r, m = self.router, self.consumer
        return r is not None and m is not None and m.mode == "routed" and r.recorder is None and not m.training

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from .. import kernels

        if not kernels.use_fused_router(x, self.backend) or (
            torch.is_grad_enabled() and (x.requires_grad or self.weight.requires_grad)
        ):  # the kernels carry no gradient
            return self.original(x)
        if self._routes():
            assert self.router is not None
            return self.router.normed_input(x, self.weight, self.variance_epsilon)
        return kernels.rms_norm(x, self.weight, self.variance_epsilon)

"""What a one-token launch makes of its outputs for the launch after it, so that no launch of its own does.

A LLaMA decode step runs, between the linears of a layer, an RMS norm (after the attention's ``o_proj``, which
adds the residual) and a gated MLP's product ``silu(gate) * up`` (after the gate/up launch): each a launch of a
few microseconds, plus its gap. The launch before already holds what they need when it writes its outputs:

* ``"rms_norm"``: the program that writes a block of rows also writes those rows times the norm's weight and the
  sum of their squares (one number a row block). The next launch reads ``outputs * weight`` as its plain input and
  scales its own outputs by ``rsqrt(sum / d + eps)`` (:meth:`NextInput.prologue`, ``("rms_scale", sums, eps)``):
  ``W (norm(h)) = rsqrt(mean(h^2) + eps) * W (h * weight)``, so its loop over the weights is untouched.
* ``"silu_mul"``: the launch's rows are a gate and an up projection (first half, second half); the later program
  of each pair of row blocks writes ``fp16(silu(gate)) * up`` for its rows, the down projection's input.

:class:`NextInput` holds the request and its outputs; :meth:`NextInput.make` is the same arithmetic in PyTorch
(what a launch that cannot make it does instead, and the tests' reference). The fragment kernel makes them in its
epilogue (``gluon_fragment.frag_gemv_kernel``'s ``EPI``); ``triton_bitplane.takes_epilogue`` says where.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

#: Rows a program's block writes (the fragment kernel's ``BLOCK_N``): one partial sum of squares each.
ROW_BLOCK = 128

#: The kinds of :class:`NextInput`.
KINDS = ("rms_norm", "silu_mul")


@dataclass(eq=False)
class NextInput:
    """A launch's request to make the next launch's input from its outputs (module docstring): ``out`` the made
    input (``[..., n]`` times the norm's ``weight``, or the ``[..., n / 2]`` product), ``sums`` (``"rms_norm"``)
    each block of :data:`ROW_BLOCK` rows' sum of squares, in fp32. Built by :meth:`rms_norm` or :meth:`silu_mul`, a
    new one each step (:attr:`made` tells whether it was filled)."""

    kind: str
    out: torch.Tensor
    sums: torch.Tensor | None = None
    weight: torch.Tensor | None = None
    eps: float = 0.0
    #: whether a launch (or :meth:`make`) filled it: a launch that could not leaves it to the caller, who holds
    #: every output it is made of (a site group's members side by side)
    made: bool = False

    @classmethod
    def rms_norm(cls, weight: torch.Tensor, eps: float, like: torch.Tensor) -> NextInput:
        """The parts of an RMS norm (``weight [n]``, ``eps``) of outputs shaped like ``like`` (one token,
        ``[..., n]``)."""
        n = like.shape[-1]
        if like.numel() != n:
            raise ValueError(f"a norm made in the launch before takes one token, got outputs {tuple(like.shape)}")
        if not (torch.is_tensor(weight) and weight.shape == (n,) and weight.device == like.device):
            got = f"{tuple(weight.shape)} on {weight.device}" if torch.is_tensor(weight) else type(weight).__name__
            raise ValueError(f"the norm's weight must be [{n}] on {like.device}, got {got}")
        if not float(eps) > 0:
            raise ValueError(f"the norm's eps must be positive, got {eps}")
        blocks = -(-n // ROW_BLOCK)
        out = torch.empty_like(like)
        sums = torch.empty(blocks, dtype=torch.float32, device=like.device)
        return cls("rms_norm", out, sums, weight.to(like.dtype).contiguous(), float(eps))

    @classmethod
    def silu_mul(cls, like: torch.Tensor, m: int) -> NextInput:
        """A gated MLP's product of ``m`` values for one token shaped like ``like`` (``[..., d]``: the launch's
        outputs are the gate's ``m`` then the up's ``m``)."""
        if like.numel() != like.shape[-1] or m < 1:
            raise ValueError(f"a product made in the launch before takes one token and m >= 1, got {tuple(like.shape)}")
        return cls("silu_mul", torch.empty(*like.shape[:-1], m, dtype=like.dtype, device=like.device))

    def prologue(self) -> tuple | None:
        """What the next launch adds to its reading of :attr:`out` (``("rms_scale", sums, eps)``: its outputs scaled
        by ``rsqrt(sum(sums) / n + eps)``), or None (the product is the input as it is)."""
        return ("rms_scale", self.sums, self.eps) if self.kind == "rms_norm" else None

    def make(self, y: torch.Tensor) -> None:
        """Fills :attr:`out` (and :attr:`sums`) from the launch's outputs ``y`` in PyTorch, with the kernel's
        rounding: the outputs as stored (``y``'s dtype), then ``out * weight`` in that dtype; the squares in fp32."""
        n = self.out.shape[-1] * (2 if self.kind == "silu_mul" else 1)
        if y.numel() != n:
            raise ValueError(f"a {self.kind} made from {y.numel()} outputs: it takes {n} (one token)")
        y = y.reshape(self.out.shape[:-1] + (n,))
        if self.kind == "rms_norm":
            assert self.sums is not None and self.weight is not None
            self.out.copy_(y * self.weight)
            hf = y.reshape(-1).float()
            pad = self.sums.numel() * ROW_BLOCK - hf.numel()
            self.sums.copy_(F.pad(hf * hf, (0, pad)).reshape(-1, ROW_BLOCK).sum(1))
        else:
            gate, up = y.chunk(2, dim=-1)
            self.out.copy_(F.silu(gate.float()).to(up.dtype) * up)
        self.made = True


def rms_scaled(x: torch.Tensor, sums: torch.Tensor, eps: float) -> torch.Tensor:
    """``x`` (a norm's input times its weight) scaled by ``rsqrt(sum(sums) / d + eps)``: what the prologue
    ``("rms_scale", sums, eps)`` makes of it (:meth:`NextInput.prologue`), in ``x``'s dtype."""
    s = torch.rsqrt(sums.float().sum() / x.shape[-1] + eps)
    return (x.float() * s).to(x.dtype)


__all__ = ["KINDS", "NextInput", "ROW_BLOCK", "rms_scaled"]

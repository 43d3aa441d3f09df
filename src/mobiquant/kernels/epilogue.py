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

An ``"rms_norm"`` request may also carry the router that decides on the norm's output (:class:`RouterTail`: with one
router a block, the next block's, whose launch would otherwise make the norm and run the router): its first layer is
linear in the normed row, ``W1 norm(h) = rsqrt(mean(h^2) + eps) * W1 (h * weight)``, so each program also writes its
row block's share of ``W1 (h * weight)``, and the last row block's program to finish (a ticket) sums the shares,
scales them by the norm's rsqrt and finishes the router (``b1``, GELU, second layer, policy) into the gate values
the next block's linears read: no router launch. With ``normed`` that program also scales the whole row into the
normed row in place (``out`` then holds ``norm(h)``, read as a plain input: no ``rms_scale`` in the next launch).

:class:`NextInput` holds the request and its outputs; :meth:`NextInput.make` is the same arithmetic in PyTorch
(what a launch that cannot make it does instead, and the tests' reference). The fragment kernel makes them in its
epilogue (``gluon_fragment.frag_gemv_kernel``'s ``EPI``); ``triton_bitplane.takes_epilogue`` says where.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass

import torch
import torch.nn.functional as F

#: Rows a program's block writes (the fragment kernel's ``BLOCK_N``): one partial sum of squares each.
ROW_BLOCK = 128

#: The kinds of :class:`NextInput`.
KINDS = ("rms_norm", "silu_mul")

#: The most hidden units of a router an epilogue finishes (:class:`RouterTail`).
ROUTER_MAX_HIDDEN = 128


@dataclass(eq=False)
class RouterTail:
    """The router an ``"rms_norm"`` request also finishes (module docstring): its layers ``w1 [hidden, n]``, ``b1``,
    ``w2 [K-1, hidden]``, ``b2`` and policy (``adjacent``, else the running minimum), each row block's share of the
    first layer (``part``, fp32 ``[blocks, hp]``, ``hp`` a power of 2 at least the hidden units) and the gate values
    it makes (``values``, fp32 ``[1, K-1]``); ``normed``: the request's ``out`` scaled into the normed row too."""

    w1: torch.Tensor
    b1: torch.Tensor
    w2: torch.Tensor
    b2: torch.Tensor
    adjacent: bool
    values: torch.Tensor
    part: torch.Tensor
    normed: bool = False

    @classmethod
    def of(cls, router: tuple, n: int, blocks: int, like: torch.Tensor, normed: bool = False) -> RouterTail:
        """The tail of ``router`` (``(w1, b1, w2, b2, adjacent)``) for a norm of ``n`` values in ``blocks`` row
        blocks, its buffers on ``like``'s device; its layers checked. ``normed``: the normed row made too."""
        w1, b1, w2, b2, adjacent = router
        hidden = w1.shape[0] if torch.is_tensor(w1) and w1.dim() == 2 else -1
        r = w2.shape[0] if torch.is_tensor(w2) and w2.dim() == 2 else -1
        shapes_ok = (
            torch.is_tensor(b1) and torch.is_tensor(b2) and w1.shape[1] == n and tuple(b1.shape) == (hidden,)
            and r >= 1 and tuple(w2.shape) == (r, hidden) and tuple(b2.shape) == (r,)
        )  # fmt: skip
        if hidden < 1 or not shapes_ok:
            raise ValueError(
                f"a router finished by the epilogue takes w1 [hidden, {n}], b1 [hidden], w2 [K-1, hidden] and b2 "
                f"[K-1]; got {_shapes(w1, b1, w2, b2)}"
            )
        if hidden > ROUTER_MAX_HIDDEN:
            raise ValueError(
                f"a router finished by the epilogue has at most {ROUTER_MAX_HIDDEN} hidden units, got {hidden}"
            )
        if any(t.device != like.device for t in (w1, b1, w2, b2)):
            raise ValueError(f"the router's layers must be on {like.device}, as the launch's outputs")
        hp = max(2, 1 << (hidden - 1).bit_length())
        values = torch.empty(1, r, dtype=torch.float32, device=like.device)
        part = torch.empty(blocks, hp, dtype=torch.float32, device=like.device)
        w1, b1, w2, b2 = (t.detach().contiguous() for t in (w1, b1, w2, b2))
        return cls(w1, b1, w2, b2, bool(adjacent), values, part, bool(normed))

    def finish(self, made: torch.Tensor, sums: torch.Tensor, eps: float) -> None:
        """Fills :attr:`part` and :attr:`values` in PyTorch from the norm's parts (``made``: the row times the norm's
        weight; ``sums``: each row block's sum of squares), in the kernel's order: each row block's share in fp32,
        the shares summed block by block, times ``rsqrt(sum(sums) / n + eps)``."""
        from .triton_router import finished_values

        h = made.reshape(-1).float()
        n, hidden = h.numel(), self.b1.numel()
        blocks = self.part.shape[0]
        pad = blocks * ROW_BLOCK - n
        w1 = F.pad(self.w1.float(), (0, pad)).reshape(hidden, blocks, ROW_BLOCK)
        shares = torch.einsum("hbr,br->bh", w1, F.pad(h, (0, pad)).reshape(blocks, ROW_BLOCK))
        self.part.zero_()
        self.part[:, :hidden] = shares
        pre = shares[0]
        for b in range(1, blocks):
            pre = pre + shares[b]
        scale = torch.rsqrt(sums.float().sum() / n + eps)
        self.values.copy_(finished_values((pre * scale)[None], self.b1, self.w2, self.b2, self.adjacent))


def _shapes(*ts: object) -> str:
    return ", ".join(str(tuple(t.shape)) if torch.is_tensor(t) else type(t).__name__ for t in ts)


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
    #: the router an ``"rms_norm"`` request also finishes (:class:`RouterTail`), or None
    router: RouterTail | None = None
    #: a chained input's flags (:func:`chain_flags`: int32 zeros, then a ticket): a product's one a group of 128
    #: values, a norm's parts one count of their row blocks; or None
    ready: torch.Tensor | None = None
    #: whether a launch read it chained (and so reset :attr:`ready` when done)
    chained: bool = False

    @classmethod
    def rms_norm(
        cls,
        weight: torch.Tensor,
        eps: float,
        like: torch.Tensor,
        router: tuple | None = None,
        normed: bool = False,
        ready: torch.Tensor | None = None,
    ) -> NextInput:
        """The parts of an RMS norm (``weight [n]``, ``eps``) of outputs shaped like ``like`` (one token,
        ``[..., n]``); ``router``: ``(w1, b1, w2, b2, adjacent)``, the router deciding on the norm's output, finished
        too (:class:`RouterTail`); ``normed`` (with ``router``): ``out`` made into the normed row itself. ``ready``
        (no router): the chain's flags (:func:`chain_flags` of one slot), the making launch counting its row blocks
        made, the reading launch awaiting the count of all (:func:`chained_product`)."""
        if normed and router is None:
            raise ValueError("normed: the normed row is made by a router's tail (router=(w1, b1, w2, b2, adjacent))")
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
        tail = None if router is None else RouterTail.of(router, n, blocks, like, normed)
        made = cls("rms_norm", out, sums, weight.to(like.dtype).contiguous(), float(eps), router=tail)
        if ready is not None:
            if router is not None:
                raise ValueError("a chained norm's parts are made without a router's tail")
            made._chain(ready, 1)
        return made

    @classmethod
    def silu_mul(cls, like: torch.Tensor, m: int, ready: torch.Tensor | None = None) -> NextInput:
        """A gated MLP's product of ``m`` values for one token shaped like ``like`` (``[..., d]``: the launch's
        outputs are the gate's ``m`` then the up's ``m``). ``ready``: the chain's flags (:func:`chain_flags`), which
        the making launch sets as it goes and the reading launch resets (:func:`chained_product`)."""
        if like.numel() != like.shape[-1] or m < 1:
            raise ValueError(f"a product made in the launch before takes one token and m >= 1, got {tuple(like.shape)}")
        made = cls("silu_mul", torch.empty(*like.shape[:-1], m, dtype=like.dtype, device=like.device))
        if ready is not None:
            made._chain(ready, -(-m // ROW_BLOCK))
        return made

    def _chain(self, ready: torch.Tensor, slots: int) -> None:
        """Take the chain's flags ``ready`` (``slots`` flags and a ticket, checked) and register :attr:`out` for
        :func:`chained_product`."""
        dev = self.out.device
        if ready.dtype != torch.int32 or ready.numel() != slots + 1 or ready.device != dev:
            raise ValueError(
                f"a chained {self.kind}'s flags: {slots + 1} int32 on {dev} ({slots} a flag a group of {ROW_BLOCK} "
                f"values or a count of row blocks, then a ticket), got {ready.dtype} {ready.numel()} on {ready.device}"
            )
        self.ready = ready
        _CHAINED[(dev, self.out.data_ptr())] = weakref.ref(self)
        if len(_CHAINED) > 256:  # requests of earlier steps, gone
            for key in [key for key, ref in _CHAINED.items() if ref() is None]:
                del _CHAINED[key]

    @property
    def normed(self) -> bool:
        """Whether :attr:`out` is the normed row itself (a router's tail made it so: :class:`RouterTail`)."""
        return self.router is not None and self.router.normed

    def prologue(self) -> tuple | None:
        """What the next launch adds to its reading of :attr:`out` (``("rms_scale", sums, eps)``: its outputs scaled
        by ``rsqrt(sum(sums) / n + eps)``), or None (the product, or the normed row, is the input as it is)."""
        return ("rms_scale", self.sums, self.eps) if self.kind == "rms_norm" and not self.normed else None

    def unchain(self) -> None:
        """Reset :attr:`ready` where no launch read this input chained (the making launch set its flags)."""
        if self.ready is not None and not self.chained:
            self.ready.zero_()

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
            if self.ready is not None:  # made here, in stream order: every block counted for a chained reader
                self.ready[0].fill_(self.sums.numel())
            hf = y.reshape(-1).float()
            pad = self.sums.numel() * ROW_BLOCK - hf.numel()
            self.sums.copy_(F.pad(hf * hf, (0, pad)).reshape(-1, ROW_BLOCK).sum(1))
            if self.router is not None:
                self.router.finish(self.out, self.sums, self.eps)
                if self.router.normed:  # the kernel's rounding: fp16(fp32(out) * rsqrt), in place
                    self.out.copy_(rms_scaled(self.out, self.sums, self.eps))
        else:
            gate, up = y.chunk(2, dim=-1)
            self.out.copy_(F.silu(gate.float()).to(up.dtype) * up)
            if self.ready is not None:  # made here, in stream order: every group ready for a chained reader
                self.ready[:-1].fill_(1)
        self.made = True


#: the chained next inputs (:meth:`NextInput.silu_mul` / :meth:`NextInput.rms_norm` with flags) by their output's
#: device and address
_CHAINED: dict[tuple[torch.device, int], weakref.ref] = {}


def chain_flags(owner: object, slots: int, device: torch.device) -> torch.Tensor:
    """The chain's flags of an input made by ``owner``'s launch (the gate/up linear's product: a flag a group of
    :data:`ROW_BLOCK` values; a linear's norm parts: ``slots`` 1, a count of row blocks) on ``device``: int32 zeros,
    ``slots`` then a ticket, made once and kept on ``owner`` (not in a state dict; each layer its own, so a later
    layer's reading launch never reads an earlier layer's flags)."""
    held = owner.__dict__.setdefault("_chain_flags", {})
    key = (device, slots)
    if key not in held:
        held[key] = torch.zeros(slots + 1, dtype=torch.int32, device=device)
    return held[key]


def chained_product(x: torch.Tensor) -> NextInput | None:
    """The live chained next input whose output ``x`` is (same device and address), or None. A launch that reads it
    (``gluon_fragment.fragment_linear``) may start before the launch making it has finished and wait only for what it
    reads: the making launch sets a gated product's flag a group as each is stored, or counts a norm's row blocks,
    and the reading launch's last program resets them (``SmallConfig.fragment_chain``); a caller whose reading launch
    did not take the chain (:attr:`NextInput.chained` False) resets them itself (:meth:`NextInput.unchain`)."""
    ref = _CHAINED.get((x.device, x.data_ptr()))
    made = ref() if ref is not None else None
    if made is None or made.ready is None or made.out.data_ptr() != x.data_ptr() or made.out.device != x.device:
        return None
    return made


def rms_scaled(x: torch.Tensor, sums: torch.Tensor, eps: float) -> torch.Tensor:
    """``x`` (a norm's input times its weight) scaled by ``rsqrt(sum(sums) / d + eps)``: what the prologue
    ``("rms_scale", sums, eps)`` makes of it (:meth:`NextInput.prologue`), in ``x``'s dtype."""
    s = torch.rsqrt(sums.float().sum() / x.shape[-1] + eps)
    return (x.float() * s).to(x.dtype)


__all__ = ["KINDS", "NextInput", "ROUTER_MAX_HIDDEN", "ROW_BLOCK", "RouterTail", "rms_scaled"]

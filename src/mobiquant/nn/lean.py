"""A LLaMA-family decoder layer whose one-token decode step takes few launches besides its linears.

:func:`mobiquant.patching.lean_step` gives each supported attention module (:data:`LEAN_CLASSES`) and decoder
layer (:data:`LEAN_LAYERS`) of a Hugging Face model the forwards below, keeping parameters, names and state dicts.
For one token against a transformers static cache on a device the kernels serve:

* the attention runs ``q_proj``, ``k_proj`` and ``v_proj`` (the package's linears or the model's own), then one
  launch of :func:`mobiquant.kernels.triton_attention.decode_attention` (rotary embedding, the cache write, the
  attention over the cache, the cache's write offset advanced; a cache of more than
  :data:`~mobiquant.kernels.triton_attention.SPLIT_ABOVE` positions split over programs and combined by a second
  launch), then ``o_proj``: the model's own step spends six or more small launches a layer between ``v_proj`` and
  ``o_proj``;
* the layer's two residual additions go into the ``o_proj`` and ``down_proj`` launches
  (:func:`mobiquant.nn.fused.linear_add`: the epilogue of the package's kernels; for fp16 cuBLAS's ``addmm``
  eager, under ``torch.compile`` an addition Inductor fuses with the next norm).

Anything else (a prompt's prefill, training, a dynamic cache, sliding-window layers, a float mask, the CPU without
Triton's interpreter) runs the model's own forwards.
"""

from __future__ import annotations

import contextlib
import weakref
from typing import Any

import torch

from .fused import (
    FusedGatedMLP,
    FusedRMSNorm,
    gated_mlp,
    linear_add,
    made_input,
    norm_prologue,
    prologue_outputs,
    routes,
)

#: The decoder layers whose forward is the pre-norm pattern :class:`LeanDecoderLayer` reproduces
#: (``h = x + attn(norm1(x)); out = h + mlp(norm2(h))``).
LEAN_LAYERS = ("LlamaDecoderLayer", "MistralDecoderLayer", "Qwen2DecoderLayer")

#: The attention classes whose arithmetic :func:`~mobiquant.kernels.triton_attention.decode_attention` reproduces
#: (rotate-half rotary embedding, grouped-query attention, ``module.scaling``, no per-head norms or soft-capping).
LEAN_CLASSES = ("LlamaAttention", "MistralAttention", "Qwen2Attention")


def _static_layer(cache: Any, idx: int) -> Any:
    """The transformers static cache layer ``idx`` holding this step's keys and values, or None (another cache,
    a layer not yet written, a sliding window, an offset held on the host)."""
    layers = getattr(cache, "layers", None)
    if layers is None or not 0 <= idx < len(layers):
        return None
    layer = layers[idx]
    if type(layer).__name__ != "StaticLayer" or not getattr(layer, "is_initialized", False):
        return None
    off = getattr(layer, "cumulative_length", None)
    if not (torch.is_tensor(off) and off.dim() == 0 and off.device == layer.keys.device):
        return None
    return layer


def _shape_reason(module: torch.nn.Module, classes: tuple[str, ...], attrs: tuple[str, ...]) -> str | None:
    """Why ``module`` is not of one of ``classes`` (by name, its own or a base's) with every attribute of ``attrs``."""
    name = next((c.__name__ for c in type(module).__mro__ if c.__name__ in classes), None)
    if name is None:
        return f"{type(module).__name__} is not one of {', '.join(classes)}"
    missing = next((a for a in attrs if not hasattr(module, a)), None)
    return None if missing is None else f"{name} has no attribute {missing!r}"


def lean_reason(module: torch.nn.Module) -> str | None:
    """Why ``module`` cannot take the lean forward, or None."""
    from ..kernels.triton_attention import supported

    attrs = ("q_proj", "k_proj", "v_proj", "o_proj", "head_dim", "layer_idx", "scaling", "num_key_value_groups")
    why = _shape_reason(module, LEAN_CLASSES, attrs)
    if why is not None:
        return why
    name = type(module).__name__
    if getattr(module, "sliding_window", None):
        return f"{name} layer {module.layer_idx} attends over a sliding window"
    cfg = getattr(module, "config", None)
    heads = getattr(cfg, "num_attention_heads", None)
    if heads is None:
        return f"{name} has no config with num_attention_heads"
    m: Any = module  # head_dim and num_key_value_groups are ints on these classes
    return supported(int(m.head_dim), int(heads), int(heads) // int(m.num_key_value_groups))


def _o_launch_pdl(o_proj: Any, device: torch.device | None = None) -> bool:
    """Whether the o projection's one-token launch on ``device`` has programmatic dependent launch (``launch_pdl``;
    with ``SmallConfig.pdl="static"`` where it decodes a static view: no router of its own or borrowed deciding; with
    the default None where that view has at most ``PDL_MAX_PLANES`` planes, or where the view is read on the device
    with no router in the o launch; an fp16 linear never)."""
    from ..kernels.triton_bitplane import launch_pdl

    static = getattr(o_proj, "decodes_static", True)
    planes = o_proj.slicer.bits_at(o_proj.static_k) if static and hasattr(o_proj, "slicer") else 0
    cfg = getattr(o_proj, "small_config", None)
    router = not static and cfg is not None and cfg.router_in_launch and o_proj.router_home  # its router's programs
    return launch_pdl(cfg, static, planes, device, router=router)


#: Where the decode loop knows every row's position is its cache's write offset (the package's own ``generate``, with
#: ``decode.ROPE_IN_LAUNCH``): the attention launch makes the rotary embedding's cos and sin from that offset and the
#: model's ``inv_freq``, so the compiled step drops the model's own rotary kernels (:func:`rope_in_launch`)
ROPE_FROM_OFFSET = False

#: rope types whose ``inv_freq`` a forward may change (transformers' ``dynamic_rope_update``): never made in the launch
_DYNAMIC_ROPE = ("dynamic", "longrope")


def rotary_for_launch(model: torch.nn.Module) -> torch.nn.Module | None:
    """The model's rotary embedding module where the attention launch can make its cos and sin from a position
    (an ``inv_freq`` no forward changes, an ``attention_scaling``), or None."""
    for mod in model.modules():
        rope_type = getattr(mod, "rope_type", None)
        if torch.is_tensor(getattr(mod, "inv_freq", None)) and hasattr(mod, "attention_scaling"):
            if isinstance(rope_type, str) and not any(t in rope_type for t in _DYNAMIC_ROPE):
                return mod
            return None
    return None


@contextlib.contextmanager
def rope_in_launch(enable: bool = True):
    """Within it, the lean attention launches make cos and sin from the cache's write offset (:data:`ROPE_FROM_OFFSET`);
    only where every row's position is that offset."""
    global ROPE_FROM_OFFSET
    before, ROPE_FROM_OFFSET = ROPE_FROM_OFFSET, bool(enable)
    try:
        yield
    finally:
        ROPE_FROM_OFFSET = before


def _inv_freq32(module: Any) -> torch.Tensor:
    """The rotary module's ``inv_freq`` in fp32 as its forward uses it, converted once per buffer for every layer
    (a model cast to fp16 casts the buffer too; the copy is held on the rotary module)."""
    rotary = module.lean_rotary
    inv = rotary.inv_freq
    if inv.dtype == torch.float32:
        return inv
    held = rotary.__dict__.get("_lean_inv32")
    if held is None or held[0] is not inv or held[1] != inv._version:
        held = (inv, inv._version, inv.float())
        rotary.__dict__["_lean_inv32"] = held
    return held[2]


@torch.compiler.disable  # a Triton launch: opaque to torch.compile, like MoBiLinear.forward
def _attend(module: Any, q, k, v, cos, sin, layer: Any, mask) -> torch.Tensor:
    from ..kernels.triton_attention import decode_attention

    # with programmatic dependent launch where the o projection's launch has it (SmallConfig.pdl; "static": where
    # it decodes a static view; None: a static view of at most 4 planes, or a view read on the device): it then loads
    # its weights while the attention runs
    pdl = q.is_cuda and _o_launch_pdl(module.o_proj, q.device)
    rope = None if cos is not None else (_inv_freq32(module), float(module.lean_rotary.attention_scaling))
    return decode_attention(q, k, v, cos, sin, layer.keys, layer.values, layer.cumulative_length,
                            module.lean_ticket, module.scaling, mask, pdl=pdl, rope=rope)  # fmt: skip


class LeanAttention:
    """The forward placed before a supported attention class (module docstring); :attr:`lean_ticket` is the
    launch's ticket (an int32 device scalar, not in the state dict), :attr:`lean_interpret` whether Triton's CPU
    interpreter was asked for when it was patched (CPU tensors then take the lean step too)."""

    lean_ticket: torch.Tensor
    lean_interpret: bool

    def _lean_layer(self, x: torch.Tensor, kwargs: dict) -> Any:
        """The static cache layer for a lean step on ``x``, or None (the model's own forward)."""
        from .. import kernels

        if x.dim() != 3 or x.shape[1] != 1 or self.training or kwargs.get("position_embeddings") is None:  # type: ignore[attr-defined]
            return None
        if torch.is_grad_enabled() and x.requires_grad:
            return None
        if not (x.is_cuda or getattr(self, "lean_interpret", False)) or not kernels.available(x.device):
            return None  # (the interpreter's setting read at patch time: no environment read in a compiled step)
        mask = kwargs.get("attention_mask")
        if mask is not None and (mask.dtype != torch.bool or mask.shape[-2] != 1):
            return None
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        layer = _static_layer(cache, self.layer_idx)  # type: ignore[attr-defined]
        if layer is None or layer.keys.shape[0] != x.shape[0]:
            return None  # (a cache of any length: past triton_attention.SPLIT_ABOVE positions its launch splits them)
        if mask is not None and mask.numel() != x.shape[0] * layer.keys.shape[2]:
            return None
        return layer

    def forward(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        """The model's attention output, plus ``residual`` (a keyword, :class:`LeanDecoderLayer`'s) when given;
        ``lean_layer``: the cache layer the decoder layer already found for this input (not looked up again)."""
        residual = kwargs.pop("residual", None)
        nxt = kwargs.pop("lean_next", None)  # a NextInput the o launch fills (LeanDecoderLayer)
        layer = kwargs.pop("lean_layer", None)
        prologue = kwargs.pop("lean_prologue", None)  # hidden_states is this norm's input (LeanDecoderLayer)
        if layer is None and not args:
            layer = self._lean_layer(hidden_states, kwargs)
        if layer is None:
            if prologue is not None:
                hidden_states = made_input(hidden_states, prologue)
            out, weights = super().forward(hidden_states, *args, **kwargs)  # type: ignore[misc]
            out = out if residual is None else residual + out
            if nxt is not None:
                nxt.make(out)
            return out, weights
        B = hidden_states.shape[0]
        projs = (self.q_proj, self.k_proj, self.v_proj)  # type: ignore[attr-defined]
        q, k, v = (y.reshape(B, -1) for y in prologue_outputs(projs, hidden_states, prologue))
        cos, sin = kwargs["position_embeddings"]
        if ROPE_FROM_OFFSET and getattr(self, "lean_rotary", None) is not None:  # the launch makes them
            cos = sin = None
        out = _attend(self, q, k, v, cos, sin, layer, kwargs.get("attention_mask")).reshape(B, 1, -1)
        return linear_add(self.o_proj, out, residual, nxt), None  # type: ignore[attr-defined]


class LeanDecoderLayer:
    """The forward placed before a supported decoder layer's class (module docstring): where its attention takes
    the lean step, the residual additions ride in the ``o_proj`` and ``down_proj`` launches; with
    :attr:`lean_prologues` the RMS norms ride in the q/k/v and gate/up launches and the gated product in the down
    launch where those can make them (:func:`_prologue_for`), and where the linears' kernels make them in the launch
    before instead (``SmallConfig.fragment_epilogues``: :mod:`mobiquant.kernels.epilogue`), the post-attention norm
    rides in the o launch and the product in the gate/up launch (:func:`_post_norm_by_o`, :func:`_product_by`)."""

    lean_prologues: bool

    def forward(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        attn: Any = self.self_attn  # type: ignore[attr-defined]
        layer = None if args or not isinstance(attn, LeanAttention) else attn._lean_layer(hidden_states, kwargs)
        if layer is None:
            return super().forward(hidden_states, *args, **kwargs)  # type: ignore[misc]
        module: Any = attn  # an nn.Module of a lean class
        lean = getattr(self, "lean_prologues", False)
        handed = _handed(self, hidden_states) if lean else None  # the layer before's down launch made our norm's parts
        norm = None
        if handed is not None:
            norm = handed.prologue()
        elif lean:
            norm = _prologue_for(self.input_layernorm, module.q_proj, hidden_states)  # type: ignore[attr-defined]
        mlp: Any = self.mlp  # type: ignore[attr-defined]
        gated = isinstance(mlp, FusedGatedMLP) or gated_mlp(mlp)
        post = _post_norm_by_o(self, module, mlp, hidden_states) if lean and gated else None
        if handed is not None:  # the launch before made our input: the norm's parts (``norm`` scales them in the
            # q/k/v launch) or the normed row, and with a router's tail that router's values for it
            x = handed.out.view_as(hidden_states)
            if handed.router is not None:
                _hold_decisions(self.input_layernorm, x, handed)  # type: ignore[attr-defined]
        elif norm is None:
            x = self.input_layernorm(hidden_states)  # type: ignore[attr-defined]
        else:  # the norm made in the q/k/v launch from the input
            x = hidden_states
        if norm is not None and (handed is None or handed.router is None):  # x is not the router's input
            _idle_router(self, module.q_proj, x)
        h, _ = module(x, residual=hidden_states, lean_layer=layer, lean_prologue=norm, lean_next=post, **kwargs)
        if not gated:
            return h + mlp(self.post_attention_layernorm(h))  # type: ignore[attr-defined]
        if post is not None:  # the o launch made the norm's parts: gate/up scale their outputs
            x, norm = post.out.view_as(h), post.prologue()
        else:
            norm = _prologue_for(self.post_attention_layernorm, mlp.gate_proj, h) if lean else None  # type: ignore[attr-defined]
            x = h if norm is not None else self.post_attention_layernorm(h)  # type: ignore[attr-defined]
        product = _product_by(mlp, h) if lean else None
        gate, up = prologue_outputs((mlp.gate_proj, mlp.up_proj), x, norm, product)
        if post is not None and post.ready is not None:  # (no call, so no graph break, where nothing is chained)
            _unchain(post)
        if product is not None:  # made by the gate/up launch
            nxt = _next_norm_by_down(self, mlp, h)
            out = linear_add(mlp.down_proj, product.out, h, nxt)
            if product.ready is not None:
                _unchain(product)
            if nxt is not None:
                _hand(self.lean_next_layer, out, nxt)  # type: ignore[attr-defined]
            return out
        if lean and _silu(mlp.act_fn) and _takes(mlp.down_proj, gate):  # the product made in the down launch
            return mlp.down_proj(gate, residual=h, prologue=("silu_mul", up))
        if isinstance(mlp, FusedGatedMLP):
            return mlp.down_of(gate, up, residual=h)
        return linear_add(mlp.down_proj, mlp.act_fn(gate) * up, h)


@torch.compiler.disable  # a request's flags, outside a compiled trace as its buffers
def _unchain(made: Any) -> None:
    """Reset a chained input's flags where the launch reading it did not read it chained
    (:meth:`~mobiquant.kernels.epilogue.NextInput.unchain`)."""
    made.unchain()


@torch.compiler.disable  # reads the views and kernel choice, as the linears' own launches do
def _takes(linear: Any, x: torch.Tensor, kind: str = "rms_norm", home_made: bool = False) -> bool:
    """Whether ``linear`` (a packed linear, alone or in a site group) makes its input from a prologue of ``kind`` on
    ``x`` in its launch (``MoBiLinear.takes_prologue``, ``SiteGroup.takes_prologue``; ``home_made``: as if its
    router's decisions were made by the launch before)."""
    from .linear import MoBiLinear

    if not isinstance(linear, MoBiLinear):
        return False
    group = getattr(linear, "_site_group", None)
    if group is not None:
        return bool(group.takes_prologue(x, getattr(linear, "small_config", None), kind, home_made))
    return linear.takes_prologue(x, kind=kind, home_made=home_made)


@torch.compiler.disable  # reads the views and kernel choice, as the linears' own launches do
def _makes(linear: Any, x: torch.Tensor, kind: str) -> bool:
    """Whether ``linear``'s launch on the one token ``x`` (alone, or its site group's whole launch) fills a
    :class:`~mobiquant.kernels.epilogue.NextInput` of ``kind`` itself (``MoBiLinear.takes_epilogue``,
    ``SiteGroup.takes_epilogue``)."""
    from .linear import MoBiLinear

    if not isinstance(linear, MoBiLinear):
        return False
    group = getattr(linear, "_site_group", None)
    if group is not None:
        return bool(group.takes_epilogue(x, getattr(linear, "small_config", None), kind))
    return linear.takes_epilogue(x, kind)


@torch.compiler.disable  # its request's buffers made outside a compiled trace, as the launches' are
def _post_norm_by_o(layer: Any, attn: Any, mlp: Any, x: torch.Tensor) -> Any:
    """A :class:`~mobiquant.kernels.epilogue.NextInput` of ``layer``'s post-attention RMS norm for its o launch to
    fill (:func:`_norm_request`); else None. ``x``, the layer's input, stands for the o launch's input and outputs
    (one token of the model's width)."""
    if attn.o_proj.in_features != x.shape[-1]:
        return None
    return _norm_request(attn.o_proj, layer.post_attention_layernorm, mlp.gate_proj, x, chain=True)


@torch.compiler.disable  # its request's buffers made outside a compiled trace, as the launches' are
def _next_norm_by_down(layer: Any, mlp: Any, h: torch.Tensor) -> Any:
    """A :class:`~mobiquant.kernels.epilogue.NextInput` of the next decoder layer's input RMS norm for ``layer``'s
    down launch to fill (:func:`_norm_request`); else None (the last layer: the model's final norm stays its own
    launch). ``h``: one token of the model's width."""
    nxt = getattr(layer, "lean_next_layer", None)
    if nxt is None or not getattr(nxt, "lean_prologues", False):
        return None
    q_proj = getattr(getattr(nxt, "self_attn", None), "q_proj", None)
    made = _router_norm_request(mlp.down_proj, nxt.input_layernorm, q_proj, h, nxt)  # with its router, where asked
    return made if made is not None else _norm_request(mlp.down_proj, nxt.input_layernorm, q_proj, h)


def _router_norm_request(producer: Any, norm: Any, consumer: Any, x: torch.Tensor, layer: Any) -> Any:
    """A :class:`~mobiquant.kernels.epilogue.NextInput` of the RMS norm ``norm`` and the router that decides on its
    output (a fused norm's, for ``consumer`` or for the linears of ``layer`` that borrow its decisions:
    :func:`_decided_on`) for ``producer``'s launch to fill (``SmallConfig.router_tail``;
    :class:`~mobiquant.kernels.epilogue.RouterTail`), where that launch makes the norm's parts and ``consumer``'s
    launch can take them once the router's decisions are made (``router_tail="normed"``: the normed row made there
    too, which any consumer reads as it is); else None."""
    from ..kernels.epilogue import ROUTER_MAX_HIDDEN, NextInput

    cfg = getattr(producer, "small_config", None)
    tail = getattr(cfg, "router_tail", False)
    if not tail or not isinstance(norm, FusedRMSNorm):
        return None
    router = norm.router
    if router is None or not _decided_on(router, consumer, layer):
        return None
    w1, b1, w2, b2 = router._weights()
    if w1.shape[0] > ROUTER_MAX_HIDDEN:
        return None
    normed = tail == "normed"  # the launch makes the normed row too: the consumer reads it as it is
    if not (_makes(producer, x, "rms_norm") and (normed or _takes(consumer, x, "rms_scale", home_made=True))):
        return None
    adjacent = router.policy == "adjacent"
    return NextInput.rms_norm(norm.weight, norm.variance_epsilon, x, router=(w1, b1, w2, b2, adjacent), normed=normed)


def _decided_on(router: Any, consumer: Any, layer: Any) -> bool:
    """Whether ``router``, run by a fused norm feeding ``consumer``, decides on the norm's output this step: for
    ``consumer`` (:func:`~mobiquant.nn.fused.routes`), or for the linears of ``layer`` that borrow its decisions
    (placement 'block' or 'sublayer') while ``consumer`` decodes a static view, its views not all fixed and one of
    those borrowers routed (at static views everywhere, ``set_static``, no one asks for the decisions)."""
    if routes(router, consumer):
        return True
    if not router.has_borrowers or router.recorder is not None or router.fixed or consumer.training:
        return False
    return any(not m.router_home for m in _routed_by(router, layer))


def _routed_by(router: Any, layer: Any) -> list:
    """The linears of ``layer`` that read ``router``'s decisions and decode no static view (its home linears and
    borrowers alike)."""
    from .linear import MoBiLinear

    return [m for m in layer.modules() if isinstance(m, MoBiLinear) and m.router is router and not m.decodes_static]


@torch.compiler.disable  # host state beside the step's tensors, as the routers' caches
def _idle_router(layer: Any, consumer: Any, x: torch.Tensor) -> None:
    """Tells the router of ``consumer`` (a home linear of ``layer``'s input, e.g. q_proj) that no linear asks its
    decisions for ``x`` (the input norm's input, or its parts made by the launch before: what the norm's prologue
    reads), where every linear of ``layer`` reading them decodes a static view (no thresholds being fitted): the home
    linears then make the norm in their (site's) launch instead of each making the normed row for the router first
    (``TokenRouter.hold_idle``)."""
    router = getattr(consumer, "router", None)
    if router is None or not router.has_borrowers or router.recorder is not None or _routed_by(router, layer):
        return
    router.hold_idle(x)


@torch.compiler.disable  # host state beside the step's tensors, as the routers' caches
def _hold_decisions(norm: Any, x: torch.Tensor, handed: Any) -> None:
    """Gives the router of ``norm`` (a fused input norm) the decisions the launch before made for the input ``x``
    (the norm's parts it handed over with ``handed``, a :class:`~mobiquant.kernels.epilogue.NextInput` with a
    router), so the linears that read ``x`` launch no router (``TokenRouter.hold_values``)."""
    norm.router.hold_values(x, handed.router.values)


def _norm_request(producer: Any, norm: Any, consumer: Any, x: torch.Tensor, chain: bool = False) -> Any:
    """A :class:`~mobiquant.kernels.epilogue.NextInput` of the RMS norm ``norm`` for ``producer``'s launch to fill,
    where that launch can and ``consumer``'s launch can take it (``("rms_scale", ...)``); else None. ``x``: one token
    shaped as the producer's outputs. ``chain`` (a consumer in the same layer, which resets the flags where its launch
    does not read them chained: :func:`_unchain`): chained from producer to consumer where ``producer``'s
    ``SmallConfig.fragment_chain`` asks, on a GPU, for a consumer decoding a static view."""
    from ..kernels.epilogue import NextInput, chain_flags

    spec = norm_prologue(norm, consumer)
    if spec is None or not (_makes(producer, x, "rms_norm") and _takes(consumer, x, "rms_scale")):
        return None
    chain = chain and _chains(producer, consumer, x, "rms_norm")
    return NextInput.rms_norm(spec[1], spec[2], x, ready=chain_flags(producer, 1, x.device) if chain else None)


def _chains(producer: Any, consumer: Any, x: torch.Tensor, kind: str) -> bool:
    """Whether ``producer``'s launch chains the next input of ``kind`` it makes into ``consumer``'s
    (``SmallConfig.fragment_chain``: True, or that kind's name; on a GPU, ``consumer`` decoding a static view: a view
    on the device reads its input unchained)."""
    want = getattr(getattr(producer, "small_config", None), "fragment_chain", False)
    asked = want is True or want == kind
    return asked and x.is_cuda and bool(getattr(consumer, "decodes_static", False))


@torch.compiler.disable  # host state beside the step's tensors, as a site group's cache
def _hand(layer: Any, out: torch.Tensor, made: Any) -> None:
    """Hands ``layer`` (the next decoder layer) the parts of its input norm ``made`` from ``out`` (its input)."""
    layer._lean_handed = (weakref.ref(out), made)


@torch.compiler.disable  # host state beside the step's tensors, as a site group's cache
def _handed(layer: Any, x: torch.Tensor) -> Any:
    """The :class:`~mobiquant.kernels.epilogue.NextInput` the layer before handed ``layer`` for its input ``x``
    (:func:`_hand`), once; None where there is none for this very tensor."""
    entry = layer.__dict__.pop("_lean_handed", None)
    return entry[1] if entry is not None and entry[0]() is x and entry[1].made else None


@torch.compiler.disable  # its request's buffers made outside a compiled trace, as the launches' are
def _product_by(mlp: Any, x: torch.Tensor) -> Any:
    """A :class:`~mobiquant.kernels.epilogue.NextInput` of the gated product for the gate/up site launch to fill
    (a site group of exactly gate then up, SiLU, a launch that can: :func:`_makes`), chained into the down launch
    where gate/up's ``SmallConfig.fragment_chain`` asks (on a GPU); else None. ``x``: one token of the MLP's input
    width."""
    from ..kernels.epilogue import ROW_BLOCK, NextInput, chain_flags

    group = getattr(mlp.gate_proj, "_site_group", None)
    if group is None or group.members != [mlp.gate_proj, mlp.up_proj] or not _silu(mlp.act_fn):
        return None
    if not _makes(mlp.gate_proj, x, "silu_mul"):
        return None
    m = mlp.gate_proj.out_features
    chain = _chains(mlp.gate_proj, mlp.down_proj, x, "silu_mul")
    return NextInput.silu_mul(x, m, chain_flags(mlp.gate_proj, -(-m // ROW_BLOCK), x.device) if chain else None)


def _silu(act: Any) -> bool:
    """Whether ``act`` is SiLU (the product the kernels make is ``silu(gate) * up``)."""
    return type(act).__name__ in ("SiLU", "SiLUActivation")


def _prologue_for(norm: torch.nn.Module, linear: Any, x: torch.Tensor) -> tuple | None:
    """``("rms_norm", weight, eps)`` of ``norm`` when ``linear``'s launch (its site group's: q/k/v, gate/up) can make
    the norm from ``x`` itself (:func:`_takes`: static views on the one-bit plane kernel's whole-K programs), so no
    launch of its own makes it; else None."""
    spec = norm_prologue(norm, linear)
    return spec if spec is not None and _takes(linear, x) else None


def layer_reason(module: torch.nn.Module) -> str | None:
    """Why the decoder layer ``module`` cannot take the lean forward, or None."""
    return _shape_reason(module, LEAN_LAYERS, ("self_attn", "mlp", "input_layernorm", "post_attention_layernorm"))


_LEAN_TYPES: dict[type, type] = {}


def lean_type(cls: type, mixin: type) -> type:
    """The class with ``mixin``'s forward before ``cls``'s (one per class; the same name)."""
    if cls not in _LEAN_TYPES:
        _LEAN_TYPES[cls] = type(cls.__name__, (mixin, cls), {"__module__": cls.__module__})
    return _LEAN_TYPES[cls]


def base_type(cls: type) -> type:
    """The model's own class of a lean one (``cls`` itself otherwise)."""
    return cls.__mro__[2] if issubclass(cls, (LeanAttention, LeanDecoderLayer)) else cls

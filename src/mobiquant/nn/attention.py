"""A LLaMA-family attention whose one-token decode step is one launch besides its projections.

:func:`mobiquant.patching.lean_attention` gives each supported attention module of a Hugging Face model
(:data:`LEAN_CLASSES`) this class's forward, keeping the module's parameters, names and state dict. For one token
against a transformers static cache on a device the kernels serve, the step runs ``q_proj``, ``k_proj`` and
``v_proj`` (the package's linears or the model's own), then one launch of
:func:`mobiquant.kernels.triton_attention.decode_attention` (rotary embedding, the cache write, the attention over
the cache, the cache's write offset advanced), then ``o_proj``: the model's own step spends six or more small
launches a layer between ``v_proj`` and ``o_proj``. Anything else (a prompt's prefill, training, a dynamic cache,
sliding-window layers, a float mask, the CPU without Triton's interpreter) runs the model's own forward.
"""

from __future__ import annotations

from typing import Any

import torch

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


def lean_reason(module: torch.nn.Module) -> str | None:
    """Why ``module`` cannot take the lean forward, or None."""
    from ..kernels.triton_attention import supported

    name = next((c.__name__ for c in type(module).__mro__ if c.__name__ in LEAN_CLASSES), None)
    if name is None:
        return f"{type(module).__name__} is not one of {', '.join(LEAN_CLASSES)}"
    for a in ("q_proj", "k_proj", "v_proj", "o_proj", "head_dim", "layer_idx", "scaling", "num_key_value_groups"):
        if not hasattr(module, a):
            return f"{name} has no attribute {a!r}"
    if getattr(module, "sliding_window", None):
        return f"{name} layer {module.layer_idx} attends over a sliding window"
    cfg = getattr(module, "config", None)
    heads = getattr(cfg, "num_attention_heads", None)
    if heads is None:
        return f"{name} has no config with num_attention_heads"
    m: Any = module  # head_dim and num_key_value_groups are ints on these classes
    return supported(int(m.head_dim), int(heads), int(heads) // int(m.num_key_value_groups))


@torch.compiler.disable  # a Triton launch: opaque to torch.compile, like MoBiLinear.forward
def _attend(module: Any, q, k, v, cos, sin, layer: Any, mask) -> torch.Tensor:
    from ..kernels.triton_attention import decode_attention

    ticket = module.lean_ticket
    if ticket.device != q.device:
        module.lean_ticket = ticket = torch.zeros((), dtype=torch.int32, device=q.device)
    return decode_attention(q, k, v, cos, sin, layer.keys, layer.values, layer.cumulative_length, ticket,
                            module.scaling, mask)  # fmt: skip


class LeanAttention:
    """The forward placed before a supported attention class (module docstring); :attr:`lean_ticket` is the
    launch's ticket (an int32 device scalar, not in the state dict)."""

    lean_ticket: torch.Tensor

    def _lean_layer(self, x: torch.Tensor, kwargs: dict) -> Any:
        """The static cache layer for a lean step on ``x``, or None (the model's own forward)."""
        from .. import kernels

        if x.dim() != 3 or x.shape[1] != 1 or self.training or kwargs.get("position_embeddings") is None:  # type: ignore[attr-defined]
            return None
        if torch.is_grad_enabled() and x.requires_grad:
            return None
        if not (kernels.available(x.device) and (x.is_cuda or kernels.interpreting())):
            return None
        mask = kwargs.get("attention_mask")
        if mask is not None and (mask.dtype != torch.bool or mask.shape[-2] != 1):
            return None
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        layer = _static_layer(cache, self.layer_idx)  # type: ignore[attr-defined]
        if layer is None or layer.keys.shape[0] != x.shape[0]:
            return None
        if mask is not None and mask.numel() != x.shape[0] * layer.keys.shape[2]:
            return None
        return layer

    def forward(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        layer = None if args else self._lean_layer(hidden_states, kwargs)
        if layer is None:
            return super().forward(hidden_states, *args, **kwargs)  # type: ignore[misc]
        B = hidden_states.shape[0]
        q = self.q_proj(hidden_states).reshape(B, -1)  # type: ignore[attr-defined]
        k = self.k_proj(hidden_states).reshape(B, -1)  # type: ignore[attr-defined]
        v = self.v_proj(hidden_states).reshape(B, -1)  # type: ignore[attr-defined]
        cos, sin = kwargs["position_embeddings"]
        out = _attend(self, q, k, v, cos, sin, layer, kwargs.get("attention_mask"))
        return self.o_proj(out.reshape(B, 1, -1)), None  # type: ignore[attr-defined]


_LEAN_TYPES: dict[type, type] = {}


def lean_type(cls: type) -> type:
    """The class with :class:`LeanAttention`'s forward before ``cls``'s (one per class; the same name)."""
    if cls not in _LEAN_TYPES:
        _LEAN_TYPES[cls] = type(cls.__name__, (LeanAttention, cls), {"__module__": cls.__module__})
    return _LEAN_TYPES[cls]


def base_type(cls: type) -> type:
    """The model's own class of a lean one (``cls`` itself otherwise)."""
    return cls.__mro__[2] if issubclass(cls, LeanAttention) else cls

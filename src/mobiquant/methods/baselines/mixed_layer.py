"""Static per-layer mixed precision: one slice count ``k`` per linear for a fractional bit budget.

No per-token routing: every token uses the same ``k`` in a given linear. Works on any model of
multi-slice ``MoBiLinear``s (a MoBiQuant checkpoint, the Matryoshka baseline, packed or fake-quant).

1. :func:`layer_sensitivity` measures, for every linear and every ``k``, the damage of reading the
   ``k``-slice view instead of the full ``K``-slice view, with the linear's real inputs captured by hooks
   over a few calibration windows (every other linear at ``K`` slices). ``dY = X (W_k - W_K)^T``:

   * ``fisher`` (default): ``0.5 * sum_t (g_t . dY_t)^2`` with ``g_t`` the gradient of the summed token
     NLL w.r.t. the linear's output, i.e. the empirical-Fisher estimate of the loss increase (a
     second-order Taylor term in the output space; comparable across layers);
   * ``output_mse``: ``sum_t ||dY_t||^2 / N`` (layer-output MSE; not loss-aware).

   The marginal cost of dropping a layer from ``k`` to ``k - 1`` slices is ``cost[k-1] - cost[k]``.
2. :func:`~mobiquant.elastic.sensitivity.allocate_bits` chooses ``k`` per linear to minimise the summed
   cost subject to the parameter-weighted average code bits ``<= budget`` (the knapsack of
   :mod:`mobiquant.elastic.sensitivity`).
3. :func:`apply_allocation` sets each linear static at its ``k``; :func:`allocation_bits` gives the
   achieved parameter-weighted average bits.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping

import pandas as pd
import torch
import torch.nn as nn

from ...elastic.sensitivity import allocate_bits, allocation_bits, nll_backward, release_hooks, weight_views
from ...nn.linear import MoBiLinear
from ...patching import mobi_linears

METRICS = ("fisher", "output_mse")


@torch.no_grad()
def _accumulate(stats: dict, name: str, m: MoBiLinear, x: torch.Tensor, g: torch.Tensor | None):
    x2 = x.reshape(-1, x.shape[-1]).float()
    g2 = None if g is None else g.reshape(-1, g.shape[-1]).float()
    st = stats[name]
    st["tokens"] += x2.shape[0]
    views = weight_views(m)  # packed: cached by the layer; fake-quant: recomputed (nothing kept here)
    for k in range(1, len(views)):
        dy = x2 @ (views[k - 1] - views[-1]).t()
        st["output_mse"][k - 1] += float((dy * dy).sum())
        if g2 is not None:
            s = (g2 * dy).sum(-1)
            st["fisher"][k - 1] += 0.5 * float((s.double() ** 2).sum())


def layer_sensitivity(
    model: nn.Module,
    calib_ids: torch.Tensor,
    metrics: Iterable[str] = METRICS,
    max_windows: int | None = None,
    batch_size: int = 1,
) -> pd.DataFrame:
    """Per linear and per ``k``: the cost of using ``k`` slices instead of ``K`` (see module docstring).

    Returns a DataFrame with one row per (linear, k): ``name, k, bits, params, fisher, output_mse``
    (``NaN`` for a metric not asked for; the row ``k = K`` has cost 0). Every linear is left in static
    mode at ``K`` slices, routers off.
    """
    metrics = tuple(metrics)
    for m_ in metrics:
        if m_ not in METRICS:
            raise ValueError(f"unknown sensitivity metric {m_!r}; choose from {METRICS}")
    if calib_ids.dim() != 2 or calib_ids.shape[0] == 0:
        raise ValueError(f"calib_ids must be a non-empty [n, T] tensor, got {tuple(calib_ids.shape)}")
    layers = dict(mobi_linears(model))
    if not layers:
        raise ValueError("the model has no MoBiLinear: quantize it (MoBiQuant, Matryoshka, ...) first")
    if max_windows is not None:
        calib_ids = calib_ids[:max_windows]
    need_grad = "fisher" in metrics
    device = next(model.parameters()).device
    for m in layers.values():
        m.set_static(m.num_slices)
    K_of = {name: m.num_slices for name, m in layers.items()}
    stats = {
        name: {"tokens": 0, "fisher": [0.0] * (K_of[name] - 1), "output_mse": [0.0] * (K_of[name] - 1)}
        for name in layers
    }
    hooks = []
    for name, m in layers.items():
        if m.num_slices == 1:
            continue

        def fwd(mod, args, out, name=name):
            x = args[0].detach()
            if need_grad:
                if not out.requires_grad:
                    raise RuntimeError(
                        f"{name}: its output carries no gradient, so the Fisher metric cannot be measured "
                        "(the model's input embeddings were not found); use metrics=('output_mse',)"
                    )
                out.register_hook(lambda g, x=x, mod=mod: _accumulate(stats, name, mod, x, g))
            else:
                _accumulate(stats, name, mod, x, None)

        hooks.append(m.register_forward_hook(fwd))
    emb = model.get_input_embeddings() if need_grad else None
    if emb is not None:
        hooks.append(emb.register_forward_hook(lambda mod, a, out: out.detach().requires_grad_(True)))
    was_training = model.training
    model.eval()
    try:
        for start in range(0, calib_ids.shape[0], batch_size):
            ids = calib_ids[start : start + batch_size].to(device)
            if need_grad:
                nll_backward(model, ids)
            else:
                with torch.no_grad():
                    model(input_ids=ids, use_cache=False)
    finally:
        release_hooks(hooks, model, was_training, layers.values())
    rows = []
    for name, m in layers.items():
        st = stats[name]
        n = max(st["tokens"], 1)
        params = m.in_features * m.out_features
        for k in range(1, m.num_slices + 1):
            last = k == m.num_slices
            rows.append(
                {
                    "name": name,
                    "k": k,
                    "bits": m.slicer.bits_at(k),
                    "params": params,
                    "fisher": (0.0 if last else st["fisher"][k - 1]) if need_grad else math.nan,
                    "output_mse": (0.0 if last else st["output_mse"][k - 1] / n)
                    if "output_mse" in metrics
                    else math.nan,
                    "tokens": st["tokens"],
                }
            )
    return pd.DataFrame(rows)


# ---------------------------------------------------------------------------- allocation
def apply_allocation(model: nn.Module, alloc: Mapping[str, int]) -> float:
    """Set every MoBiLinear static at its allocated ``k``; returns the achieved average code bits."""
    layers = dict(mobi_linears(model))
    missing = set(layers) - set(alloc)
    unknown = set(alloc) - set(layers)
    if missing or unknown:
        raise ValueError(
            f"allocation does not match the model's linears: missing {sorted(missing)[:5]}, "
            f"unknown {sorted(unknown)[:5]}"
        )
    for name, m in layers.items():
        m.set_static(int(alloc[name]))
    return allocation_bits(model, alloc)


def allocation_table(sensitivity: pd.DataFrame, alloc: Mapping[str, int]) -> pd.DataFrame:
    """One row per linear: allocated ``k`` and bits, params (for reports)."""
    first = sensitivity.groupby("name", sort=False).first().reset_index()[["name", "params"]]
    first["k"] = first["name"].map(alloc)
    bits = sensitivity.set_index(["name", "k"])["bits"]
    first["bits"] = [int(bits[(n, k)]) for n, k in zip(first["name"], first["k"], strict=True)]
    return first


__all__ = [
    "METRICS",
    "allocate_bits",
    "allocation_bits",
    "allocation_table",
    "apply_allocation",
    "layer_sensitivity",
]

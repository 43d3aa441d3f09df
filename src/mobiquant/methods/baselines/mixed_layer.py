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
2. :func:`allocate_bits` chooses ``k`` per linear to minimise the summed cost subject to the
   parameter-weighted average code bits ``<= budget``: an exact multiple-choice knapsack by dynamic
   programming over the bit budget (in units of the gcd of ``params * bits``), or a greedy
   marginal-cost-per-bit descent when the table would be too large. The achieved average is never above
   the budget, and below it by less than one layer's upgrade step whenever costs decrease with ``k``.
3. :func:`apply_allocation` sets each linear static at its ``k``; :func:`allocation_bits` gives the
   achieved parameter-weighted average bits.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from functools import reduce
from itertools import pairwise

import numpy as np
import pandas as pd
import torch
import torch.nn as nn
import torch.nn.functional as F

from ...nn.linear import MoBiLinear
from ...patching import mobi_linears

METRICS = ("fisher", "output_mse")


def _views(m: MoBiLinear) -> list[torch.Tensor]:
    """``[W_1, ..., W_K]`` in float32 for a packed or fake-quant MoBiLinear."""
    if m.packed:
        return [m.dequantized(k).float() for k in range(1, m.num_slices + 1)]
    with torch.no_grad():
        return [v.float() for v in m.fake_views(ste=False)]


@torch.no_grad()
def _accumulate(stats: dict, name: str, m: MoBiLinear, x: torch.Tensor, g: torch.Tensor | None):
    x2 = x.reshape(-1, x.shape[-1]).float()
    g2 = None if g is None else g.reshape(-1, g.shape[-1]).float()
    st = stats[name]
    st["tokens"] += x2.shape[0]
    views = _views(m)  # packed: cached by the layer; fake-quant: recomputed (nothing kept here)
    for k in range(1, len(views)):
        dy = x2 @ (views[k - 1] - views[-1]).t()
        st["output_mse"][k - 1] += float((dy * dy).sum())
        if g2 is not None:
            s = (g2 * dy).sum(-1)
            st["fisher"][k - 1] += 0.5 * float((s.double() ** 2).sum())


def nll_backward(model: nn.Module, ids: torch.Tensor) -> None:
    """Backward pass of the summed next-token NLL of ``ids`` (the gradients the Fisher hooks read)."""
    with torch.enable_grad():
        logits = model(input_ids=ids, use_cache=False).logits
        loss = F.cross_entropy(
            logits[:, :-1].reshape(-1, logits.shape[-1]).float(), ids[:, 1:].reshape(-1), reduction="sum"
        )
        loss.backward()


def release_hooks(hooks, model: nn.Module, was_training: bool, layers: Iterable[MoBiLinear]) -> None:
    """After a measuring pass: hooks removed, train/eval mode restored, packed layers' cached views freed."""
    for h in hooks:
        h.remove()
    model.train(was_training)
    for m in layers:
        if m.packed:
            m.clear_cache()


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
@dataclass
class _Layer:
    name: str
    params: int
    bits: list[int]  # code bits of k = 1..K
    cost: list[float]  # cost of k = 1..K


def _layers_from(sensitivity, metric: str | None) -> list[_Layer]:
    """Per-layer params, bits and costs of ``metric`` (``None``: costs are not needed, zeros)."""
    if isinstance(sensitivity, pd.DataFrame):
        if metric is not None and metric not in sensitivity.columns:
            raise ValueError(f"sensitivity table has no column {metric!r} (columns: {list(sensitivity.columns)})")
        out = []
        for name, df in sensitivity.groupby("name", sort=False):
            df = df.sort_values("k")
            if metric is not None and df[metric].isna().any():
                raise ValueError(f"metric {metric!r} was not measured for {name}")
            cost = [0.0] * len(df) if metric is None else [float(c) for c in df[metric]]
            out.append(_Layer(str(name), int(df["params"].iloc[0]), [int(b) for b in df["bits"]], cost))
        return out
    if isinstance(sensitivity, Mapping):
        out = []
        for name, d in sensitivity.items():
            cost = [0.0] * len(d["bits"]) if metric is None else (d[metric] if metric in d else d["cost"])
            out.append(_Layer(str(name), int(d["params"]), [int(b) for b in d["bits"]], [float(c) for c in cost]))
        return out
    raise TypeError(
        "sensitivity must be the DataFrame from layer_sensitivity or a dict name -> "
        "{'params', 'bits': [b(k)...], 'cost' or <metric>: [c(k)...]}"
    )


def _check_layers(layers: list[_Layer]) -> None:
    if not layers:
        raise ValueError("empty sensitivity table: nothing to allocate")
    for L in layers:
        if len(L.bits) != len(L.cost) or not L.bits:
            raise ValueError(f"{L.name}: bits and cost must list one value per k")
        if any(b2 <= b1 for b1, b2 in pairwise(L.bits)):
            raise ValueError(f"{L.name}: bits must increase with k, got {L.bits}")
        if L.params <= 0:
            raise ValueError(f"{L.name}: params must be positive")


def _bits_range(layers: list[_Layer]) -> tuple[float, float]:
    total = sum(L.params for L in layers)
    lo = sum(L.params * L.bits[0] for L in layers) / total
    hi = sum(L.params * L.bits[-1] for L in layers) / total
    return lo, hi


def _dp(layers: list[_Layer], cap_units: int, unit: int) -> list[int] | None:
    """Exact multiple-choice knapsack: min sum cost s.t. sum params*bits <= cap_units*unit."""
    n = len(layers)
    INF = float("inf")
    # best[c] = min cost using exactly c units so far
    best = np.full(cap_units + 1, INF)
    best[0] = 0.0
    choice = np.zeros((n, cap_units + 1), dtype=np.int16)
    for i, L in enumerate(layers):
        new = np.full(cap_units + 1, INF)
        arg = np.zeros(cap_units + 1, dtype=np.int16)
        for k, (b, c) in enumerate(zip(L.bits, L.cost, strict=True)):
            w = L.params * b // unit
            if w > cap_units:
                continue
            cand = np.full(cap_units + 1, INF)
            cand[w:] = best[: cap_units + 1 - w] + c
            # prefer the lower cost; on ties prefer more bits (later k)
            better = cand <= new
            new = np.where(better, cand, new)
            arg = np.where(better, k, arg)
        best = new
        choice[i] = arg
        if not np.isfinite(best).any():
            return None
    finite = np.isfinite(best)
    # minimum cost; among equal costs (relative 1e-12), the largest bit use
    mn = best[finite].min()
    tol = 1e-12 * max(abs(mn), 1e-300)
    cands = np.nonzero(finite & (best <= mn + tol))[0]
    c = int(cands.max())
    ks = [0] * n
    for i in range(n - 1, -1, -1):
        k = int(choice[i, c])
        ks[i] = k + 1
        c -= layers[i].params * layers[i].bits[k] // unit
    return ks


def _greedy(layers: list[_Layer], budget_total: float) -> list[int]:
    """Start at K everywhere, drop the cheapest marginal cost per saved bit until within budget, refill."""
    ks = [len(L.bits) for L in layers]
    used = sum(L.params * L.bits[-1] for L in layers)
    while used > budget_total + 1e-9:
        best, arg = None, None
        for i, L in enumerate(layers):
            k = ks[i]
            if k == 1:
                continue
            saved = L.params * (L.bits[k - 1] - L.bits[k - 2])
            ratio = (L.cost[k - 2] - L.cost[k - 1]) / saved
            if best is None or ratio < best:
                best, arg = ratio, i
        if arg is None:
            break
        L = layers[arg]
        used -= L.params * (L.bits[ks[arg] - 1] - L.bits[ks[arg] - 2])
        ks[arg] -= 1
    improved = True
    while improved:  # spend what is left on the best-gain upgrade that still fits
        improved = False
        best, arg = None, None
        for i, L in enumerate(layers):
            k = ks[i]
            if k == len(L.bits):
                continue
            extra = L.params * (L.bits[k] - L.bits[k - 1])
            if used + extra <= budget_total + 1e-9:
                gain = (L.cost[k - 1] - L.cost[k]) / extra
                if best is None or gain > best:
                    best, arg = gain, i
        if arg is not None and best is not None and best >= 0:
            L = layers[arg]
            used += L.params * (L.bits[ks[arg]] - L.bits[ks[arg] - 1])
            ks[arg] += 1
            improved = True
    return ks


def allocate_bits(
    sensitivity, budget: float, metric: str = "fisher", method: str = "auto", max_dp_states: int = 20_000_000
) -> dict[str, int]:
    """``{linear name: k}`` minimising the summed ``metric`` cost at parameter-weighted bits ``<= budget``.

    ``sensitivity``: the DataFrame of :func:`layer_sensitivity`, or ``{name: {"params", "bits", "cost"}}``.
    ``method``: ``"dp"`` (exact knapsack), ``"greedy"``, or ``"auto"`` (dp when small enough).
    """
    layers = _layers_from(sensitivity, metric)
    _check_layers(layers)
    lo, hi = _bits_range(layers)
    if not lo - 1e-9 <= budget:
        raise ValueError(f"budget {budget} bits is below the smallest achievable {lo:.4f} (every layer at k=1)")
    if budget >= hi:
        return {L.name: len(L.bits) for L in layers}
    total = sum(L.params for L in layers)
    budget_total = budget * total
    if method not in ("auto", "dp", "greedy"):
        raise ValueError(f"method must be 'auto', 'dp' or 'greedy', got {method!r}")
    ks = None
    if method in ("auto", "dp"):
        unit = reduce(math.gcd, [L.params * b for L in layers for b in L.bits])
        cap_units = int(math.floor(budget_total / unit + 1e-9))
        states = cap_units * len(layers) * max(len(L.bits) for L in layers)
        if method == "dp" or states <= max_dp_states:
            ks = _dp(layers, cap_units, unit)
    if ks is None:
        ks = _greedy(layers, budget_total)
    return {L.name: k for L, k in zip(layers, ks, strict=True)}


def allocation_bits(sensitivity_or_model, alloc: Mapping[str, int]) -> float:
    """Parameter-weighted average code bits of ``alloc`` (over a sensitivity table or a model's linears)."""
    if isinstance(sensitivity_or_model, nn.Module):
        layers = dict(mobi_linears(sensitivity_or_model))
        num = sum(m.in_features * m.out_features * m.slicer.bits_at(alloc[n]) for n, m in layers.items())
        den = sum(m.in_features * m.out_features for m in layers.values())
        return num / den
    layers = _layers_from(sensitivity_or_model, None)
    num = sum(L.params * L.bits[alloc[L.name] - 1] for L in layers)
    return num / sum(L.params for L in layers)


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

"""Fisher costs and the knapsack over them, shared by the ``mixed_layer`` baseline and the site budgets.

* Measuring: :func:`weight_views` gives a ``MoBiLinear``'s ``k``-slice weights ``W_1 .. W_K``;
  :func:`nll_backward` runs the backward pass of the summed token NLL whose output gradients ``g_t`` give the
  empirical-Fisher cost ``0.5 (g_t . dY_t)^2`` of ``dY = X (W_k - W_K)^T``, read by forward hooks that
  :func:`release_hooks` removes afterwards (:func:`mobiquant.methods.baselines.mixed_layer.layer_sensitivity`
  per linear, :func:`mobiquant.elastic.site_budgets.site_cost_curves` per token and router site).
* Allocating: :func:`allocate_bits` chooses one option ``k`` per item (a linear, or a router site) to minimise
  the summed cost subject to the parameter-weighted average bits ``<= budget``: an exact multiple-choice
  knapsack by dynamic programming over the bit budget (in units of the gcd of ``params * bits``), or a greedy
  marginal-cost-per-bit descent when the table would be too large. The achieved average is never above the
  budget, and below it by less than one item's upgrade step whenever costs decrease with ``k``.
  :func:`allocation_bits` gives the achieved average.
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

from ..nn.linear import MoBiLinear
from ..patching import mobi_linears


def weight_views(m: MoBiLinear) -> list[torch.Tensor]:
    """``[W_1, ..., W_K]`` in float32 for a packed or fake-quant MoBiLinear."""
    if m.packed:
        return [m.dequantized(k).float() for k in range(1, m.num_slices + 1)]
    with torch.no_grad():
        return [v.float() for v in m.fake_views(ste=False)]


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
        linears = dict(mobi_linears(sensitivity_or_model))
        num = sum(m.in_features * m.out_features * m.slicer.bits_at(alloc[n]) for n, m in linears.items())
        den = sum(m.in_features * m.out_features for m in linears.values())
        return num / den
    layers = _layers_from(sensitivity_or_model, None)
    return sum(L.params * L.bits[alloc[L.name] - 1] for L in layers) / sum(L.params for L in layers)


__all__ = ["allocate_bits", "allocation_bits", "nll_backward", "release_hooks", "weight_views"]

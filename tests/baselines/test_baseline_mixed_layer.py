"""Static per-layer mixed precision: budget met from below, sensitive layers get more bits."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mobiquant import MoBiConfig, achieved_bits, freeze, quantize_model, reset_counts
from mobiquant.methods.baselines import (
    allocate_bits,
    allocation_bits,
    apply_allocation,
    layer_sensitivity,
    quantize_matryoshka,
)
from mobiquant.patching import mobi_linears

BITS = [2, 4, 6, 8]


def synthetic_table(seed: int = 0, n: int = 12) -> dict:
    rng = np.random.default_rng(seed)
    table = {}
    for i in range(n):
        params = int(rng.choice([64 * 64, 64 * 160, 32 * 64]))
        scale = float(rng.lognormal(0, 2))
        table[f"l{i}"] = {"params": params, "bits": BITS, "cost": [scale * 4.0**-j for j in range(3)] + [0.0]}
    return table


def granularity(table: dict) -> float:
    total = sum(d["params"] for d in table.values())
    return max(d["params"] * 2 for d in table.values()) / total


@pytest.mark.parametrize("method", ["dp", "greedy"])
def test_budget_met_from_below(method):
    table = synthetic_table()
    for budget in np.arange(2.0, 8.01, 0.25):
        alloc = allocate_bits(table, float(budget), method=method)
        got = allocation_bits(table, alloc)
        assert got <= budget + 1e-9
        assert budget - got < granularity(table), (budget, got)
    assert allocation_bits(table, allocate_bits(table, 8.0)) == 8.0
    assert allocation_bits(table, allocate_bits(table, 2.0)) == 2.0
    with pytest.raises(ValueError):
        allocate_bits(table, 1.5)


def test_sensitive_layers_get_more_bits():
    p = 64 * 64
    table = {
        "sensitive": {"params": p, "bits": BITS, "cost": [100.0, 25.0, 6.0, 0.0]},
        "robust": {"params": p, "bits": BITS, "cost": [1.0, 0.25, 0.06, 0.0]},
        "middle": {"params": p, "bits": BITS, "cost": [10.0, 2.5, 0.6, 0.0]},
    }
    for budget in (3.0, 4.0, 5.0, 6.0):
        alloc = allocate_bits(table, budget)
        assert alloc["sensitive"] >= alloc["middle"] >= alloc["robust"], (budget, alloc)
    alloc = allocate_bits(table, 4.0)
    assert alloc["sensitive"] > alloc["robust"]
    assert allocation_bits(table, alloc) == pytest.approx(4.0)


def test_dp_not_worse_than_greedy():
    table = synthetic_table(3, n=20)
    for budget in (3.3, 4.6, 5.9):
        dp = allocate_bits(table, budget, method="dp")
        gr = allocate_bits(table, budget, method="greedy")
        cost = lambda a: sum(table[n]["cost"][k - 1] for n, k in a.items())  # noqa: E731
        assert cost(dp) <= cost(gr) + 1e-12


@pytest.mark.parametrize("quantizer", ["mobiquant", "matryoshka"])
def test_model_sensitivity_and_allocation(llama_factory, calib_ids, eval_ids, quantizer):
    model = llama_factory(0)
    if quantizer == "mobiquant":
        quantize_model(model, MoBiConfig(group_size=64))
        freeze(model)  # packed, uncalibrated
    else:
        quantize_matryoshka(model, group_size=64)
    sens = layer_sensitivity(model, calib_ids[:2])
    names = [n for n, _ in mobi_linears(model)]
    assert set(sens["name"]) == set(names) and len(sens) == 4 * len(names)
    for _, df in sens.groupby("name"):
        df = df.sort_values("k")
        assert (df["fisher"] >= 0).all() and df["fisher"].iloc[-1] == 0
        assert np.all(np.diff(df["output_mse"].to_numpy()) <= 1e-12)  # more slices, less output error
        assert df["output_mse"].iloc[0] > 0
    for budget in (3.0, 4.5, 6.25):
        alloc = allocate_bits(sens, budget)
        bits = apply_allocation(model, alloc)
        assert bits <= budget + 1e-9 and budget - bits < 2 * 64 * 160 / sum(
            m.in_features * m.out_features for _, m in mobi_linears(model)
        )
        reset_counts(model)
        logits = model(input_ids=eval_ids).logits
        assert torch.isfinite(logits).all()
        assert achieved_bits(model) == pytest.approx(bits)
    alloc_mse = allocate_bits(sens, 4.5, metric="output_mse")
    assert allocation_bits(sens, alloc_mse) <= 4.5


def test_output_mse_only_runs_without_gradients(llama_factory, calib_ids):
    model = quantize_matryoshka(llama_factory(0), group_size=64)
    sens = layer_sensitivity(model, calib_ids[:1], metrics=("output_mse",))
    assert sens["fisher"].isna().all() and (sens["output_mse"] >= 0).all()
    with pytest.raises(ValueError):
        allocate_bits(sens, 4.0, metric="fisher")

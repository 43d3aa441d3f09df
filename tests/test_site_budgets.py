"""Sensitivity-allocated router budgets: cost curves, the knapsack over sites, thresholds per site."""

from __future__ import annotations

import pytest
import torch

from mobiquant import MoBiConfig, achieved_bits, freeze, quantize_model, reset_counts
from mobiquant.elastic.site_budgets import (
    allocate_site_budgets,
    allocated_bits,
    apply_site_budgets,
    default_grid,
    site_cost_curves,
)
from mobiquant.patching import fit_budget_thresholds, mobi_linears, routers, set_budget
from tiny_models import build_tiny_llama


def fp_model(seed: int = 0):
    """The tiny FP LLaMA that :func:`routed_model` quantizes (same seed, same weights)."""
    return build_tiny_llama(seed).requires_grad_(False)


def routed_model(seed: int = 0, policy: str = "adjacent"):
    model = fp_model(seed)
    quantize_model(model, MoBiConfig(group_size=32, router_hidden=8, router_policy=policy))
    freeze(model)
    return model


@pytest.fixture(scope="module")
def calib_ids() -> torch.Tensor:
    return torch.randint(0, 128, (6, 32), generator=torch.Generator().manual_seed(7))


@pytest.fixture(scope="module")
def model_and_curves(calib_ids):
    model = routed_model()
    fit_budget_thresholds(model, list(calib_ids.split(2)), default_grid((2, 2, 2, 2), 0.5))
    curves = site_cost_curves(model, calib_ids, default_grid((2, 2, 2, 2), 0.5), max_windows=4, batch_size=2)
    return model, curves


def test_cost_curves_per_site(model_and_curves):
    model, curves = model_and_curves
    rs = dict(routers(model))
    assert set(curves) == set(rs) and len(rs) == 8  # 4 sites per block (qkv, o, gate/up, down)
    assert sum(c["params"] for c in curves.values()) == sum(
        m.in_features * m.out_features for _, m in mobi_linears(model)
    )
    for name, c in curves.items():
        assert c["budgets"] == default_grid((2, 2, 2, 2), 0.5)
        assert c["cost"][-1] == 0.0  # every token at all slices: the reference view
        assert c["cost"][0] > 0.0
        # more bits, lower cost (up to ties where the router's threshold does not move a token)
        assert c["cost"][0] >= c["cost"][len(c["cost"]) // 2] >= c["cost"][-1], (name, c["cost"])
    for _, m in mobi_linears(model):  # left routed, as a reading of the checkpoint expects
        assert m.mode == "routed"


def test_allocation_meets_budget_and_beats_uniform(model_and_curves):
    _, curves = model_and_curves
    grid = default_grid((2, 2, 2, 2), 0.5)
    total = sum(c["params"] for c in curves.values())
    step_granularity = 0.5 * max(c["params"] for c in curves.values()) / total
    for j, budget in enumerate(grid):
        alloc = allocate_site_budgets(curves, budget)
        got = allocated_bits(curves, alloc)
        assert got <= budget + 1e-9 and budget - got <= step_granularity + 1e-9, (budget, got)
        ours = sum(curves[s]["cost"][grid.index(b)] for s, b in alloc.items())
        uniform = sum(c["cost"][j] for c in curves.values())  # every site at the global budget
        assert ours <= uniform * (1 + 1e-12), (budget, ours, uniform)
    assert set(allocate_site_budgets(curves, 8.0).values()) == {8.0}


def test_sensitive_site_gets_more_bits():
    grid = [2.0, 4.0, 6.0, 8.0]
    curves = {
        "sensitive": {"params": 100, "budgets": grid, "cost": [100.0, 25.0, 6.0, 0.0]},
        "robust": {"params": 100, "budgets": grid, "cost": [1.0, 0.25, 0.06, 0.0]},
    }
    alloc = allocate_site_budgets(curves, 5.0)
    assert alloc == {"sensitive": 8.0, "robust": 2.0}  # cost 1.0, against 6.25 for (6, 4) and 25.06 for (4, 6)
    with pytest.raises(ValueError, match="same budget grid"):
        allocate_site_budgets({**curves, "other": {"params": 1, "budgets": [2.0, 8.0], "cost": [1.0, 0.0]}}, 5.0)


def test_apply_sets_each_router_at_its_local_budget(model_and_curves, calib_ids):
    model, curves = model_and_curves
    alloc = allocate_site_budgets(curves, 4.5)
    apply_site_budgets(model, alloc)
    for name, r in routers(model):
        expect = torch.tensor(r.bits_table.tolist()), torch.tensor(r.tau_table.tolist())
        from mobiquant.nn.router import interp_tau

        assert float(r.tau) == pytest.approx(interp_tau(*expect, alloc[name]), rel=1e-6, abs=1e-6)
    reset_counts(model)
    with torch.no_grad():
        logits = model(input_ids=calib_ids[:2]).logits
    assert torch.isfinite(logits).all()
    # thresholds were fitted on these windows, so the achieved bits follow the allocation closely
    assert achieved_bits(model) == pytest.approx(allocated_bits(curves, alloc), abs=0.35)
    set_budget(model, 4.5)  # plain MoBiQuant reading still works afterwards


def test_bad_input_is_refused(model_and_curves, calib_ids):
    model, curves = model_and_curves
    with pytest.raises(ValueError, match=r"must lie in \[2.0, 8.0\]"):
        site_cost_curves(model, calib_ids, [1.0, 2.0])
    with pytest.raises(ValueError, match="non-empty"):
        site_cost_curves(model, calib_ids[:0])
    with pytest.raises(ValueError, match=r"grid step 0.35 must be positive and divide the range \[2.0, 8.0\]"):
        default_grid((2, 2, 2, 2), 0.35)
    assert default_grid((2, 2, 2, 2), 2.0) == [2.0, 4.0, 6.0, 8.0]
    with pytest.raises(ValueError, match="missing"):
        apply_site_budgets(model, {})
    plain = build_tiny_llama(0, num_hidden_layers=1)
    with pytest.raises(ValueError, match="no routers"):
        site_cost_curves(plain, calib_ids)


def test_refit_thresholds_at_local_budgets(model_and_curves, calib_ids):
    """Refitted with every router at its own local budget, the thresholds meet the allocation on the
    windows they were fitted on (up to the ties of a tiny model), and bad windows are refused."""
    model, curves = model_and_curves
    alloc = allocate_site_budgets(curves, 4.5)
    apply_site_budgets(model, alloc, calib_ids=calib_ids[:2])
    for r in (r for _, r in routers(model)):
        assert r.recorder is None  # recording switched off again
    reset_counts(model)
    with torch.no_grad():
        model(input_ids=calib_ids[:2])
    refit_gap = abs(achieved_bits(model) - allocated_bits(curves, alloc))
    assert refit_gap < 0.15, refit_gap
    with pytest.raises(ValueError, match="non-empty"):
        apply_site_budgets(model, alloc, calib_ids=calib_ids[:0])


def test_per_linear_curves_and_thresholds(model_and_curves, calib_ids):
    """per="linear": one curve per linear; each linear reads its own threshold on its router's values, so
    linears sharing a router can sit at different budgets; set_budget puts them back on the router's."""
    from mobiquant.elastic.site_budgets import apply_linear_budgets

    model, _ = model_and_curves
    grid = default_grid((2, 2, 2, 2), 0.5)
    curves = site_cost_curves(model, calib_ids, grid, max_windows=4, batch_size=2, per="linear")
    lin = dict(mobi_linears(model))
    assert set(curves) == set(lin)
    for name, c in curves.items():
        assert c["params"] == lin[name].in_features * lin[name].out_features
        assert c["cost"][-1] == 0.0 and c["cost"][0] >= c["cost"][-1]
    # q at the base, k and v at all slices, though q/k/v share one router
    alloc = {n: (2.0 if n.endswith("q_proj") else 8.0) for n in lin}
    apply_linear_budgets(model, alloc)
    reset_counts(model)
    with torch.no_grad():
        model(input_ids=calib_ids[:2])
    for n, m in lin.items():
        k_used = {i + 1 for i, c in enumerate(m.k_counts.tolist()) if c > 0}
        assert k_used == ({1} if n.endswith("q_proj") else {4}), (n, m.k_counts)
    # refitted at the allocation of a budget: achieved bits follow it on the windows it was fitted on
    alloc = allocate_site_budgets(curves, 4.5)
    apply_linear_budgets(model, alloc, calib_ids=calib_ids[:2])
    assert all(m.router.recorder is None for m in lin.values())
    reset_counts(model)
    with torch.no_grad():
        model(input_ids=calib_ids[:2])
    assert achieved_bits(model) == pytest.approx(allocated_bits(curves, alloc), abs=0.15)
    set_budget(model, 4.5)
    assert all(m.route_tau is None for m in lin.values())
    with pytest.raises(ValueError, match=r"local budget must be in \[2, 8\] bits, got 9.0"):
        apply_linear_budgets(model, {n: 9.0 for n in lin})
    with pytest.raises(ValueError, match="missing"):
        apply_linear_budgets(model, {})
    with pytest.raises(ValueError, match="per must be 'site' or 'linear'"):
        site_cost_curves(model, calib_ids, grid, per="block")


def test_per_linear_thresholds_need_packed_linears(calib_ids):
    from mobiquant.elastic.site_budgets import apply_linear_budgets

    model = build_tiny_llama(0, num_hidden_layers=1)
    quantize_model(model, MoBiConfig(group_size=32, router_hidden=8, router_policy="adjacent"))
    for _, r in routers(model):
        r.set_table([2.0, 8.0], [10.0, -10.0])
    with pytest.raises(ValueError, match="is not packed"):
        apply_linear_budgets(model, {n: 4.0 for n, _ in mobi_linears(model)})

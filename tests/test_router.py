"""MoBiRoute: nested gates, straight-through training gates, and elastic threshold calibration."""

from __future__ import annotations

import pickle

import pytest
import torch

from mobiquant.nn.router import TokenRouter, budget_bits, interp_tau, nested_min, weighted_tail_table

DIM = 64


def site_activations(n: int, seed: int, dim: int = DIM) -> torch.Tensor:
    """Gaussian tokens with a fixed random scale per channel (the same 'site' for every seed)."""
    scale = torch.exp(torch.randn(dim, generator=torch.Generator().manual_seed(1234)))
    return torch.randn(n, dim, generator=torch.Generator().manual_seed(seed)) * scale


def make_router(slice_bits=(2, 2, 2, 2), seed: int = 0, **kw) -> TokenRouter:
    torch.manual_seed(seed)
    return TokenRouter(DIM, slice_bits, **kw)


def per_token_bits(k: torch.Tensor, slice_bits) -> torch.Tensor:
    """Code bits of each token: the sum of the bit-widths of the ``k`` slices it uses."""
    widths = torch.cumsum(torch.tensor(slice_bits, dtype=torch.float64), 0)
    return widths[k - 1]


def is_prefix(on: torch.Tensor) -> bool:
    """Rows of the form 1..1 0..0 (nested gates)."""
    on = on.to(torch.int64)
    return bool((on[..., 1:] <= on[..., :-1]).all())


# ---------------------------------------------------------------------------- nested gates
def test_nested_min_is_running_minimum():
    s = torch.tensor([[3.0, 1.0, 2.0, 0.5], [0.0, 1.0, -1.0, 2.0]])
    assert nested_min(s).tolist() == [[3.0, 1.0, 1.0, 0.5], [0.0, 0.0, -1.0, -1.0]]


@pytest.mark.parametrize("policy", ["free", "adjacent"])
@pytest.mark.parametrize("slice_bits", [(2, 2, 2, 2), (3, 1, 1, 1, 1, 1), (4, 2, 2)])
def test_slice_counts_are_nested_and_in_range(slice_bits, policy):
    r = make_router(slice_bits, policy=policy)
    x = site_activations(3000, seed=1).reshape(30, 100, DIM)
    for tau in [-1.0, -0.1, 0.0, 0.05, 0.5, 1.0, 2.5, 3.2, 9.0]:
        r.tau.fill_(tau)
        k = r.slice_counts(x)
        assert k.shape == (30, 100) and k.dtype == torch.int64
        assert int(k.min()) >= 1 and int(k.max()) <= len(slice_bits)
        on = r.gate_values(r.scores(x)) > tau
        assert is_prefix(on)
        # k counts exactly the leading run of active residual slices.
        j = torch.arange(len(slice_bits) - 1)
        assert torch.equal(on, j < (k - 1).unsqueeze(-1))


def test_hard_and_straight_through_gates_are_nested():
    r = make_router((2, 2, 2, 2))
    x = site_activations(2000, seed=2)
    r.fit_thresholds(x)
    for target in [None, 2.5, 4.0, 6.7]:
        if target is None:
            r.set_budget(5.0)
        gates, soft = r.gates(x, target)
        hard = gates.detach() > 0.5
        assert is_prefix(hard)
        assert bool(((gates.detach() - hard.float()).abs() < 1e-6).all())  # forward value is 0/1
        assert bool(((soft > 0) & (soft < 1)).all())
        r.clear_cache()
    # Without a batch target the training gates agree with the inference counts at the same tau.
    gates, _ = r.gates(x)
    assert torch.equal(1 + (gates.detach() > 0.5).sum(-1), r.slice_counts(x))


def test_raising_the_budget_never_takes_a_slice_away_from_a_token():
    r = make_router()
    r.fit_thresholds(site_activations(5000, seed=3))
    x = site_activations(2000, seed=4)
    prev = None
    for b in torch.linspace(2, 8, 13).tolist():
        r.set_budget(b)
        k = r.slice_counts(x)
        if prev is not None:
            assert bool((k >= prev).all())
        prev = k


@pytest.mark.parametrize("target", [2.3, 3.0, 4.5, 7.9])
def test_batch_target_gates_hit_the_target_on_that_batch(target):
    r = make_router()
    x = site_activations(4096, seed=5)
    gates, soft = r.gates(x, target)
    hard = (gates.detach() > 0.5).double()
    achieved = 2 + 2 * hard.mean(0).sum()
    assert float(achieved) == pytest.approx(target, abs=0.02)
    assert soft.shape == (4096, 3) and r.last_soft is soft


def test_gradients_reach_router_through_straight_through_gates():
    r = make_router()
    x = site_activations(512, seed=6)
    gates, soft = r.gates(x, 5.0)
    # Loss through the hard (STE) gates and the soft budget term.
    loss = (gates * torch.tensor([1.0, 2.0, 3.0])).sum() + (budget_bits(soft, r.slice_bits) - 4.0) ** 2
    loss.backward()
    for name, p in r.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_budget_bits_of_hard_and_soft_gates():
    assert float(budget_bits(torch.ones(10, 3), (2, 2, 2, 2))) == 8.0
    assert float(budget_bits(torch.zeros(10, 3), (2, 2, 2, 2))) == 2.0
    g = torch.tensor([[1.0, 1.0, 0.0, 0.0, 0.0], [1.0, 0.0, 0.0, 0.0, 0.0]])
    assert float(budget_bits(g, (3, 1, 1, 1, 1, 1))) == pytest.approx(3 + 1.5 / 1)


# ---------------------------------------------------------------------------- elastic thresholds
@pytest.mark.parametrize("slice_bits", [(2, 2, 2, 2), (3, 1, 1, 1, 1, 1), (4, 2, 2)])
def test_calibrated_budgets_hold_on_fresh_activations(slice_bits):
    r = make_router(slice_bits)
    r.fit_thresholds(site_activations(20000, seed=10))
    fresh = site_activations(20000, seed=11)
    with torch.no_grad():
        fresh_min = r.gate_values(r.scores(fresh))  # scores do not depend on the budget: compute once
    lo, hi = slice_bits[0], sum(slice_bits)
    budgets = [b for b in torch.arange(2.0, 8.01, 0.25).tolist() if lo <= b <= hi]
    assert len(budgets) >= 17
    for b in budgets:
        r.set_budget(b)
        k = 1 + (fresh_min > r.tau).sum(-1)
        if b == int(b):  # the public per-token path gives the same counts
            assert torch.equal(r.slice_counts(fresh), k)
        achieved = float(per_token_bits(k, slice_bits).mean())
        assert achieved == pytest.approx(b, abs=0.05), (b, achieved)
    # The end points are exact: nothing on, everything on.
    r.set_budget(lo)
    assert bool((r.slice_counts(fresh) == 1).all())
    r.set_budget(hi)
    assert bool((r.slice_counts(fresh) == len(slice_bits)).all())


def test_threshold_table_is_monotone_and_saved_in_state_dict():
    r = make_router()
    r.fit_thresholds(site_activations(3000, seed=12))
    assert r.calibrated
    assert r.bits_table[0] == 2 and r.bits_table[-1] == 8
    assert bool((r.bits_table[1:] > r.bits_table[:-1]).all())
    assert bool((r.tau_table[1:] <= r.tau_table[:-1]).all())
    r.set_budget(3.7)
    sd = r.state_dict()
    assert {"tau", "bits_table", "tau_table"} <= set(sd)
    r2 = make_router(seed=99)
    r2.fit_thresholds(site_activations(100, seed=15))  # tables are buffers sized by calibration
    r2.load_state_dict(sd)
    x = site_activations(1000, seed=13)
    assert torch.equal(r2.slice_counts(x), r.slice_counts(x))


def test_weighted_tail_table_on_hand_made_values():
    # Two tokens, one residual of 2 bits: scores 1.0 and -1.0 -> 2 bits (none), 3 (one), 4 (both).
    bits, taus = weighted_tail_table(torch.tensor([[1.0], [-1.0]]), (2, 2), points=5)
    assert bits.tolist() == [2.0, 2.5, 3.0, 3.5, 4.0]
    assert taus[0] > 1.0 and taus[-1] < -1.0
    assert -1.0 < float(taus[2]) < 1.0  # exactly one token on at 3 bits
    assert float(interp_tau(bits, taus, 3.0)) == pytest.approx(float(taus[2]))
    with pytest.raises(ValueError, match="zero tokens"):
        weighted_tail_table(torch.empty(0, 1), (2, 2))


# ---------------------------------------------------------------------------- errors
@pytest.mark.parametrize("budget", [1.99, 8.01, 0.0, 12.0])
def test_budget_outside_range_raises(budget):
    r = make_router()
    r.fit_thresholds(site_activations(500, seed=14))
    with pytest.raises(ValueError, match=r"outside this router's range \[2, 8\]"):
        r.set_budget(budget)


def test_uncalibrated_router_refuses_a_budget():
    with pytest.raises(RuntimeError, match="not calibrated"):
        make_router().set_budget(4.0)


def test_invalid_router_shapes_raise():
    with pytest.raises(ValueError, match="at least two slices"):
        TokenRouter(DIM, (8,))
    with pytest.raises(ValueError, match="hidden size"):
        TokenRouter(DIM, (2, 2), hidden=0)


@pytest.mark.parametrize("slice_bits", [(2, 2, 2, 2), (2, 1, 1, 1, 1, 1, 1)])
def test_adjacent_policy_uses_only_the_two_views_around_the_budget(slice_bits):
    r = make_router(slice_bits, policy="adjacent")
    x = site_activations(4000, seed=3)
    r.fit_thresholds(x)
    levels = torch.cumsum(torch.tensor(slice_bits, dtype=torch.float64), 0)
    lo, hi = float(levels[0]), float(levels[-1])
    for budget in torch.linspace(lo, hi, 23).tolist():
        r.set_budget(budget)
        bits = per_token_bits(r.slice_counts(x), slice_bits)
        below, above = levels[levels <= budget + 1e-9].max(), levels[levels >= budget - 1e-9].min()
        assert set(bits.unique().tolist()) <= {float(below), float(above)}
        assert abs(float(bits.mean()) - budget) < 0.02
    # An integer view is the static view: every token at the same k.
    r.set_budget(float(levels[1]))
    assert r.slice_counts(x).unique().tolist() == [2]


def test_unknown_router_policy_is_rejected():
    with pytest.raises(ValueError, match="policy must be one of"):
        make_router(policy="greedy")


def test_caches_serve_one_input_without_keeping_it_alive():
    """The linears of a site share one router computation per input, but a finished forward's activations
    are not kept alive by the router (they were 0.19 GB a block at the paper protocol)."""
    import gc
    import weakref

    r = make_router()
    x = site_activations(32, seed=0)
    k = r.slice_counts(x)
    assert r.slice_counts(x) is k  # the second linear of the site reuses the first's result
    tau = r.batch_threshold(x, 5.0)
    assert torch.equal(r.slice_counts_at(x, tau), r.slice_counts_at(x, tau))
    with torch.no_grad():  # with autograd on, the gates' graph itself holds the input until the step ends
        gates = r.gates(x, target_bits=5.0)
        assert r.gates(x, target_bits=5.0) is gates
    ref = weakref.ref(x)
    del x
    gc.collect()
    assert ref() is None
    with torch.no_grad():
        assert r.gates(site_activations(32, seed=1), target_bits=5.0) is not gates  # a new input: computed afresh


def test_constant_k_is_the_count_a_threshold_fixes_for_every_token():
    """``constant_k``: adjacent policy, 5 residual slices (bands 8, 6, 4, 2, 0): a threshold between bands fixes every
    gate (the count of bands above it, plus the base), one inside a band's [band, band + 1) does not; it matches the
    counts of random scores, extreme ones included. Free policy: only an infinite threshold fixes the count."""
    r = TokenRouter(16, (3, 1, 1, 1, 1, 1), hidden=8, policy="adjacent")
    cases = {9.0: 1, 17.5: 1, 7.5: 2, 7.0: 2, 5.2: 3, 3.99: 4, 1.5: 5, -0.01: 6, -9.0: 6}
    for tau, k in cases.items():
        assert r.constant_k(tau) == k, tau
    for tau in (8.0, 8.5, 6.0, 6.999, 4.3, 2.0, 0.0, 0.5):
        assert r.constant_k(tau) is None, tau
    scores = torch.cat([torch.randn(256, 5) * 4, torch.full((1, 5), 100.0), torch.full((1, 5), -100.0)])
    values = r.gate_values(scores)
    for tau, k in cases.items():
        assert torch.equal(1 + (values > tau).sum(-1), torch.full((258,), k)), tau
    free = TokenRouter(16, (3, 1, 1, 1, 1, 1), hidden=8, policy="free")
    assert free.constant_k(float("inf")) == 1 and free.constant_k(float("-inf")) == 6
    assert free.constant_k(7.5) is None


def test_adjacent_view_is_the_lower_of_the_two_views_tokens_choose():
    """``adjacent_view``: a threshold inside a band lets each token take one of two views, ``j`` or ``j + 1``, and a
    token takes ``j + 1`` iff its value for residual slice ``j - 1`` exceeds the threshold (what a compiled decode
    step computes); a threshold between bands, or the free policy, gives None."""
    r = TokenRouter(16, (3, 1, 1, 1, 1, 1), hidden=8, policy="adjacent")
    scores = torch.cat([torch.randn(256, 5) * 4, torch.full((1, 5), 100.0), torch.full((1, 5), -100.0)])
    values = r.gate_values(scores)
    for tau, j in {8.0: 1, 8.5: 1, 6.999: 2, 4.3: 3, 2.0: 4, 0.5: 5}.items():
        assert r.adjacent_view(tau) == j and r.constant_k(tau) is None, tau
        k = 1 + (values > tau).sum(-1)
        assert torch.equal(k, j + (values[:, j - 1] > tau).long()), tau
    for tau in (9.0, 7.5, 3.99, -0.01):
        assert r.adjacent_view(tau) is None, tau
    assert TokenRouter(16, (3, 1, 1, 1, 1, 1), hidden=8, policy="free").adjacent_view(4.3) is None


def test_budget_switches_read_the_table_on_the_host_until_it_changes(monkeypatch):
    """``set_budget`` interpolates a host copy of the (bits, tau) table, read from the device once and again only after
    the table changed (``load_state_dict``, ``fit_thresholds``, ``set_table``); the threshold it wrote is known on the
    host (``tau_value``) until something else writes ``tau``. Its values equal ``interp_tau`` on the live tables."""
    r = make_router()
    r.fit_thresholds(site_activations(3000, seed=12))
    budgets = (2, 3.7, 5.25, 8)
    want = {b: float(torch.tensor(interp_tau(r.bits_table, r.tau_table, b), dtype=r.tau.dtype)) for b in budgets}
    reads = []
    real_cpu = torch.Tensor.cpu
    monkeypatch.setattr(torch.Tensor, "cpu", lambda self, *a, **k: reads.append(self.shape) or real_cpu(self, *a, **k))
    r.set_budget(3.7)
    assert len(reads) == 1  # the first switch reads both tables in one transfer
    for b, tau in want.items():
        r.set_budget(b)
        assert float(r.tau) == r.tau_value() == tau
    assert len(reads) == 1  # the later switches read nothing
    reads.clear()
    r.set_budget(4.5)
    assert reads == []
    other = make_router(seed=99)
    other.fit_thresholds(site_activations(3000, seed=15))
    r.load_state_dict(other.state_dict())  # new tables written in place: read again
    r.set_budget(4.5)
    assert len(reads) == 1 and float(r.tau) == pytest.approx(interp_tau(other.bits_table, other.tau_table, 4.5))
    r.set_table([2.0, 8.0], [1.0, -1.0])  # new table tensors: read again
    r.set_budget(5.0)
    assert float(r.tau) == pytest.approx(0.0, abs=1e-7)
    with torch.no_grad():
        r.tau.fill_(0.25)  # written by something other than set_budget: tau_value reads it
    assert r.tau_value() == 0.25
    r.set_budget(5.0)
    again = pickle.loads(pickle.dumps(r))  # the host copies hold weak references: not pickled, rebuilt
    assert again.tau_value() == r.tau_value() and again.host_table() == r.host_table()

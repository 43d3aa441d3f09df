"""Sensitivity-allocated router budgets: where the bits of a global budget go, per router site.

Plain MoBiQuant reads a global budget ``B`` by giving every router the same local budget ``B``, so every
layer, sensitive or not, sends its share of tokens to the cheap views. Per-layer sensitivity differs by
orders of magnitude (on SmolLM2-135M a static per-layer allocation, ``mixed_layer``, beat uniform routing
by 8x at 3.5 bits; docs/RESULTS.md). Here each router site (the linears sharing one input and router)
gets its own local budget ``b_s``, with the parameter-weighted mean of the ``b_s`` at most ``B``, and its
router still picks WHICH tokens get the extra slices within ``b_s``.

1. :func:`site_cost_curves` measures, on calibration windows, every site's loss cost as a function of its
   local budget with its own router doing the routing: per token and view ``k``, the empirical-Fisher
   estimate ``0.5 (g_t . dY_t)^2`` with ``dY = X (W_k - W_K)^T`` and ``g_t`` the gradient of the summed
   token NLL w.r.t. the linear's output (as in :mod:`mobiquant.methods.baselines.mixed_layer`, kept per token and
   summed over the site's linears); the router's gate values for the same tokens say which view each
   token takes when the threshold is set to meet ``b`` on these tokens. ``C_s(b)`` is the summed cost.
2. :func:`allocate_site_budgets` picks one point of each site's curve to minimise ``sum_s C_s(b_s)``
   subject to ``sum_s P_s b_s <= B sum_s P_s`` (the multiple-choice knapsack of ``mixed_layer``).
3. :func:`apply_site_budgets` sets each router's threshold from its own (budget-conditioned) table at its
   local budget; weights and routers are unchanged, only thresholds move.

This is a reading of any calibrated MoBiQuant checkpoint (no training); it needs a backward pass over a
few calibration windows once, then a knapsack per budget.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn

from ..dist import broadcast_object, is_rank_zero, share_work, world_size
from ..nn.router import ThresholdRecorder, TokenRouter, interp_tau, weighted_tail_table
from ..patching import _body, mobi_linears, routers
from .plan import BudgetPlan, stack_plan
from .sensitivity import allocate_bits, nll_backward, release_hooks
from .sensitivity import weight_views as _views


def _site_of(model: nn.Module) -> tuple[dict[str, TokenRouter], dict[str, str], dict[str, int]]:
    """Router name -> router; linear name -> its router's name; router name -> parameters it serves."""
    rs = dict(routers(model))
    by_id = {id(r): name for name, r in rs.items()}
    site_of, params = {}, {name: 0 for name in rs}
    for name, m in mobi_linears(model):
        if m.router is None:
            continue
        site = by_id[id(m.router)]
        site_of[name] = site
        params[site] += m.in_features * m.out_features
    return rs, site_of, params


def default_grid(slice_bits: Sequence[int], step: float = 0.25) -> list[float]:
    """Local budgets from the base slice's bits to all slices' bits in steps of ``step`` (which must divide
    the range, so that both ends are on the grid)."""
    lo, hi = float(slice_bits[0]), float(sum(slice_bits))
    n = int(round((hi - lo) / step)) if step > 0 else 0
    if step <= 0 or abs(n * step - (hi - lo)) > 1e-9:
        raise ValueError(f"grid step {step} must be positive and divide the range [{lo}, {hi}] bits")
    return [lo + i * step for i in range(n + 1)]


def site_cost_curves(
    model: nn.Module,
    calib_ids: torch.Tensor,
    grid: Sequence[float] | None = None,
    max_windows: int | None = 8,
    batch_size: int = 1,
    per: str = "site",
) -> dict[str, dict]:
    """``{router name: {"params", "budgets": grid, "cost": [C_s(b) for b in grid]}}`` (see module docstring).

    ``per="linear"``: one curve per linear instead (keyed by the linear's name), each routed by its site's
    router with a threshold of its own (:func:`apply_linear_budgets`), so q/k/v or gate/up need not share
    a budget.

    Every linear is left in static mode at ``K`` slices during the measurement (the full-precision view
    downstream, as for ``mixed_layer``'s sensitivity) and restored to routed mode afterwards.
    """
    if calib_ids.dim() != 2 or calib_ids.shape[0] == 0:
        raise ValueError(f"calib_ids must be a non-empty [n, T] tensor, got {tuple(calib_ids.shape)}")
    if per not in ("site", "linear"):
        raise ValueError(f"per must be 'site' or 'linear', got {per!r}")
    rs, site_of, params = _site_of(model)
    if not rs:
        raise ValueError("the model has no routers: site budgets need a MoBiQuant checkpoint with routers")
    slice_bits = next(iter(rs.values())).slice_bits
    grid = [float(b) for b in (grid if grid is not None else default_grid(slice_bits))]
    lo, hi = float(slice_bits[0]), float(sum(slice_bits))
    bad = [b for b in grid if not lo <= b <= hi]
    if bad or not grid:
        raise ValueError(
            f"site budget grid must lie in [{lo}, {hi}] bits of slices {list(slice_bits)}, got {bad or grid}"
        )
    if max_windows is not None:
        calib_ids = calib_ids[:max_windows]
    layers = {n: m for n, m in mobi_linears(model) if n in site_of}
    K = len(slice_bits)
    keys = list(rs) if per == "site" else list(layers)
    token_cost: dict[str, list[torch.Tensor]] = {s: [] for s in keys}  # per batch: [T, K] (per site: summed)
    gate_vals: dict[str, list[torch.Tensor]] = {s: [] for s in rs}
    pending: dict[str, torch.Tensor] = {}

    @torch.no_grad()
    def accumulate(name: str, m, x: torch.Tensor, g: torch.Tensor) -> None:
        x2 = x.reshape(-1, x.shape[-1]).float()
        g2 = g.reshape(-1, g.shape[-1]).float()
        views = _views(m)
        cost = torch.zeros(x2.shape[0], K, dtype=torch.float64)
        for k in range(1, K):
            dy = x2 @ (views[k - 1] - views[-1]).t()
            cost[:, k - 1] = (0.5 * (g2 * dy).sum(-1).double() ** 2).cpu()
        key = site_of[name] if per == "site" else name
        pending[key] = pending[key] + cost if key in pending else cost

    hooks = []
    for name, m in layers.items():

        def fwd(mod, args, out, name=name):
            x = args[0].detach()
            site = site_of[name]
            if site not in seen:
                r = rs[site]
                with torch.no_grad():
                    gv = r.gate_values(r.scores(x.reshape(-1, x.shape[-1])))
                gate_vals[site].append(gv.float().cpu())
                seen.add(site)
            if not out.requires_grad:
                raise RuntimeError(
                    f"{name}: its output carries no gradient (the model's input embeddings "
                    "were not found), so site costs cannot be measured"
                )
            out.register_hook(lambda g, x=x, mod=mod: accumulate(name, mod, x, g))

        hooks.append(m.register_forward_hook(fwd))
    emb = model.get_input_embeddings()
    if emb is None:
        raise ValueError("the model has no input embeddings to start the backward pass from")
    hooks.append(emb.register_forward_hook(lambda mod, a, out: out.detach().requires_grad_(True)))
    for m in layers.values():
        m.set_static(m.num_slices)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        for start in range(0, calib_ids.shape[0], batch_size):
            seen: set[str] = set()
            pending.clear()
            ids = calib_ids[start : start + batch_size].to(device)
            nll_backward(model, ids)
            for key, c in pending.items():
                token_cost[key].append(c)
    finally:
        release_hooks(hooks, model, was_training, layers.values())
        for m in layers.values():
            m.set_routed()
        model.zero_grad(set_to_none=True)
    views_at = {}  # per site: view index (0-based) of every token at each grid budget
    for site in rs:
        gv = torch.cat(gate_vals[site]).double()  # [T, K-1]
        bits_t, tau_t = weighted_tail_table(gv, slice_bits)
        views_at[site] = [(gv > interp_tau(bits_t, tau_t, b)).sum(-1) for b in grid]
    curves = {}
    for key in keys:
        site = key if per == "site" else site_of[key]
        cost = torch.cat(token_cost[key])  # [T, K], column K-1 (all slices) is zero
        rows = torch.arange(cost.shape[0])
        c = [float(cost[rows, k].sum()) for k in views_at[site]]
        n_params = params[key] if per == "site" else layers[key].in_features * layers[key].out_features
        curves[key] = {"params": n_params, "budgets": list(grid), "cost": c}
    return curves


def allocate_site_budgets(
    curves: Mapping[str, dict], budget: float, max_dp_states: int = 200_000_000
) -> dict[str, float]:
    """``{site or linear name: local budget}`` minimising the summed cost at a parameter-weighted mean
    ``<= budget`` (the keys of ``curves``)."""
    grids = {tuple(c["budgets"]) for c in curves.values()}
    if len(grids) != 1:
        raise ValueError("every site's curve must use the same budget grid")
    grid = list(next(iter(grids)))
    steps = np.diff(grid)
    step = float(steps.min()) if len(steps) else 1.0
    units = [g / step for g in grid]
    if any(abs(u - round(u)) > 1e-6 for u in units):
        raise ValueError(f"the budget grid must be a multiple of its smallest step {step}: {grid}")
    units = [int(round(u)) for u in units]
    table = {s: {"params": int(c["params"]), "bits": units, "cost": list(c["cost"])} for s, c in curves.items()}
    ks = allocate_bits(table, budget / step + 1e-9, metric="cost", max_dp_states=max_dp_states)
    return {s: grid[k - 1] for s, k in ks.items()}


def allocated_bits(curves: Mapping[str, dict], alloc: Mapping[str, float]) -> float:
    """Parameter-weighted mean of the local budgets."""
    num = sum(curves[s]["params"] * alloc[s] for s in curves)
    return num / sum(curves[s]["params"] for s in curves)


def _check_keys(have: Mapping[str, object], alloc: Mapping[str, float], what: str) -> None:
    missing, unknown = set(have) - set(alloc), set(alloc) - set(have)
    if missing or unknown:
        raise ValueError(f"{what}: missing {sorted(missing)[:5]}, unknown {sorted(unknown)[:5]}")


def apply_site_budgets(
    model: nn.Module, alloc: Mapping[str, float], calib_ids: torch.Tensor | None = None, batch_size: int = 1
) -> None:
    """Each router's threshold for its local budget; linears routed.

    Without ``calib_ids`` the threshold comes from the router's own budget table, which was fitted with
    every router at one global budget. With ``calib_ids`` it is refitted on those windows while every
    router runs at its OWN local budget (the mean of its batch quantiles, as ``fit_budget_thresholds``
    does for one budget), so the activations each router sees match the allocation: measured on
    SmolLM2-135M this hit the budget exactly and lowered perplexity at 3-3.5 bits by 18-22%
    (docs/RESULTS.md)."""
    rs = dict(routers(model))
    _check_keys(rs, alloc, "site budgets do not match the model's routers")
    for name, r in rs.items():
        b = float(alloc[name])
        if not math.isfinite(b):
            raise ValueError(f"{name}: local budget must be finite, got {b}")
        r.set_budget(b)
    for _, m in mobi_linears(model):
        m.route_tau = None
        if m.router is not None:
            m.set_routed()
        else:
            m.set_static(m.num_slices)
    if calib_ids is not None:
        taus = _recorded_thresholds(model, rs, alloc, calib_ids, batch_size)
        for name, r in rs.items():
            r.tau.fill_(taus[name])


def apply_linear_budgets(
    model: nn.Module, alloc: Mapping[str, float], calib_ids: torch.Tensor | None = None, batch_size: int = 1
) -> None:
    """Each linear's own threshold on its router's gate values for its local budget (``alloc`` keyed by
    linear name, from ``site_cost_curves(..., per="linear")``); linears routed. Without ``calib_ids`` the
    threshold is read from the router's budget table at the linear's budget; with them it is fitted on those
    windows while every linear runs at its own budget (as :func:`apply_site_budgets`)."""
    layers = {n: m for n, m in mobi_linears(model) if m.router is not None}
    _check_keys(layers, alloc, "linear budgets do not match the model's routed linears")
    for name, m in layers.items():
        b = float(alloc[name])
        lo, hi = m.router.slice_bits[0], sum(m.router.slice_bits)
        if not (math.isfinite(b) and lo <= b <= hi):
            raise ValueError(f"{name}: local budget must be in [{lo}, {hi}] bits, got {b}")
        if not m.router.calibrated:
            raise RuntimeError(f"{name}: its router's thresholds are not calibrated")
        if not m.packed:
            raise ValueError(
                f"{name} is not packed: per-linear thresholds apply to packed inference "
                "(call mobiquant.freeze(model) first)"
            )
        m.route_tau = interp_tau(m.router.bits_table, m.router.tau_table, b)
        m.set_routed()
    if calib_ids is not None:
        taus = _recorded_thresholds(model, layers, alloc, calib_ids, batch_size)
        for name, m in layers.items():
            m.route_tau = taus[name]


@torch.no_grad()
def _mean_nll(model: nn.Module, ids: torch.Tensor, batch_size: int) -> float:
    from ..evaluation import window_nll

    device = next(model.parameters()).device
    total = sum(
        float(window_nll(model, ids[i : i + batch_size].to(device)).sum()) for i in range(0, ids.shape[0], batch_size)
    )
    return total / (ids.shape[0] * (ids.shape[1] - 1))


def _current_taus(model: nn.Module) -> dict[str, float]:
    """Each routed linear's threshold as it runs now (its own, or its router's)."""
    return {
        n: float(m.route_tau) if m.route_tau is not None else float(m.router.tau)
        for n, m in mobi_linears(model)
        if m.router is not None
    }


#: Where a plan build scores uniform routing against the allocated reading (:func:`build_plan`).
SELECT_AT = ("views", "all")
#: Where a plan's windows come from (:func:`build_plan`): the calibration windows, or calibration text they miss.
PLAN_WINDOWS = ("train", "held_out")


def build_plan(
    model: nn.Module,
    calib_ids: torch.Tensor,
    per: str = "linear",
    step: float = 0.25,
    sensitivity_windows: int | None = 8,
    refit_thresholds: bool = True,
    select_windows: int = 2,
    refit_windows: int | None = 4,
    batch_size: int = 1,
    log=None,
    select_at: str = "views",
    state_dir: str | Path | None = None,
    state_key: Mapping[str, Any] | None = None,
    windows: str = "train",
    local_step: float | None = None,
) -> BudgetPlan:
    """The deployed reading of a calibrated, packed checkpoint at every budget of a ``step`` grid.

    1. Cost curves per linear (or per site) on the first ``sensitivity_windows`` calibration windows
       (:func:`site_cost_curves`), and at every grid budget the knapsack allocation of local budgets
       (:func:`allocate_site_budgets`) with thresholds refitted at those budgets (:func:`apply_linear_budgets`)
       on the first ``refit_windows`` of them (``None``: all).
    2. With ``select_windows > 0``: at the grid budgets strictly inside the range that ``select_at`` names
       (``"views"``: those equal to a view's bits, where uniform routing is that static view; ``"all"``: every
       one), the allocated reading and uniform routing are both scored (mean token NLL) on calibration
       windows held out from step 1 (the last ``select_windows`` windows when too few are left), and the
       lower one is kept; elsewhere the allocated reading. Evaluation text is never used. ``"views"`` is the
       default because uniform routing never won at a fractional budget in any measured plan (it won once,
       at the exact 4-bit view of an anchored [2, 2, 2, 2] checkpoint; docs/RESULTS.md, "Budget plans"), and
       it scores 4 budgets instead of 19 on the default layout.

    ``local_step``: the grid of the local budgets the knapsack chooses from (default ``step``). At 1.0 (whole
    views only) every linear of a grid budget reads one view for every token: its threshold fixes the view, and
    decoding runs no router there (a static per-linear mix of views; between grid budgets the interpolated
    thresholds route).

    ``windows`` says where ``calib_ids`` come from, recorded in the plan's settings: ``"train"``, the windows
    calibration trained on, or ``"held_out"``, windows of the calibration text it never saw
    (:func:`mobiquant.io.data.held_out_windows`). A router reads fewer bits, and its cost curves look better,
    on tokens it was trained on than on the tokens it will serve.

    Returns a :class:`~mobiquant.elastic.plan.BudgetPlan`; install it with ``patching.install_plan`` so that
    ``set_budget`` serves it. Leaves every routed linear on its router's own threshold.

    ``state_dir``: the cost curves and every finished budget are saved there as they complete, so an
    interrupted build resumes at the next budget; ``state_key`` (what the plan depends on beyond these
    settings: the checkpoint and the calibration windows) must match for saved work to be reused.
    """
    from ..patching import set_budget

    if per not in ("site", "linear"):
        raise ValueError(f"per must be 'site' or 'linear', got {per!r}")
    if calib_ids.dim() != 2 or calib_ids.shape[0] == 0:
        raise ValueError(f"calib_ids must be a non-empty [n, T] tensor, got {tuple(calib_ids.shape)}")
    if select_windows < 0:
        raise ValueError(f"select_windows must be >= 0, got {select_windows}")
    if select_at not in SELECT_AT:
        raise ValueError(f"select_at must be one of {SELECT_AT}, got {select_at!r}")
    rs, site_of, _ = _site_of(model)
    if not rs:
        raise ValueError("the model has no routers: a budget plan needs a MoBiQuant checkpoint with routers")
    slice_bits = next(iter(rs.values())).slice_bits
    grid = default_grid(slice_bits, step)
    local_grid = grid if local_step is None else default_grid(slice_bits, local_step)
    n_sens = calib_ids.shape[0] if sensitivity_windows is None else min(sensitivity_windows, calib_ids.shape[0])
    sens = calib_ids[:n_sens]
    held = calib_ids[n_sens : n_sens + select_windows]
    if held.shape[0] < select_windows:
        held = calib_ids[-select_windows:] if select_windows else held
    if refit_windows is not None and refit_windows < 1:
        raise ValueError(f"refit_windows must be >= 1 or None, got {refit_windows}")
    if windows not in PLAN_WINDOWS:
        raise ValueError(f"windows must be one of {PLAN_WINDOWS}, got {windows!r}")
    refit_ids = sens if refit_windows is None else sens[:refit_windows]
    settings = {
        "per": per,
        "step": float(step),
        "sensitivity_windows": int(n_sens),
        "refit_thresholds": bool(refit_thresholds),
        "refit_windows": int(refit_ids.shape[0]),
        "select_windows": int(select_windows),
        "select_at": select_at,
        "windows": windows,
        "local_step": None if local_step is None else float(local_step),
    }
    views = [float(sum(slice_bits[: k + 1])) for k in range(len(slice_bits))]
    state = _PlanState(state_dir, {"settings": settings, "grid": grid, **(state_key or {})}, log)
    curves = broadcast_object(state.curves())  # saved on rank 0 alone
    if curves is None:
        curves = site_cost_curves(model, sens, local_grid, max_windows=None, batch_size=batch_size, per=per)
        state.save_curves(curves)
    apply = apply_site_budgets if per == "site" else apply_linear_budgets
    lo, hi = grid[0], grid[-1]

    def plan_row(i: int) -> tuple[dict[str, float], dict[str, float], str]:
        b = grid[i]
        alloc = allocate_site_budgets(curves, b)
        apply(model, alloc, calib_ids=refit_ids if refit_thresholds else None, batch_size=batch_size)
        taus = _current_taus(model)
        local = {n: float(alloc[n] if per == "linear" else alloc[site_of[n]]) for n in taus}
        reading = "allocated"
        if select_windows and lo < b < hi and (select_at == "all" or any(abs(b - v) < 1e-9 for v in views)):
            nll_alloc = _mean_nll(model, held, batch_size)
            set_budget(model, b, uniform=True)
            nll_uniform = _mean_nll(model, held, batch_size)
            if nll_uniform < nll_alloc:
                taus, local, reading = _current_taus(model), {n: float(b) for n in taus}, "uniform"
            if log is not None:
                log.info(
                    "plan at %.2f bits: held-out nll allocated %.4f, uniform %.4f -> %s",
                    b,
                    nll_alloc,
                    nll_uniform,
                    reading,
                )
        state.save_row(b, (taus, local, reading))
        return taus, local, reading

    # Every budget is planned on its own, so under torch.distributed (every rank holding the same model, as
    # after a DDP calibration) the ranks share the budgets left to do and exchange the rows.
    done = broadcast_object({i: row for i, b in enumerate(grid) if (row := state.row(b)) is not None})
    todo = [i for i in range(len(grid)) if i not in done]
    if log is not None and world_size() > 1:
        log.info("plan: %d budgets to do, shared between %d ranks", len(todo), world_size())
    new = share_work(todo, plan_row)
    for i, row in new.items():
        state.save_row(grid[i], row)  # the other ranks' rows too (rank 0 writes)
    done.update(new)
    rows = [done[i] for i in range(len(grid))]
    for _, m in mobi_linears(model):
        m.route_tau = None
    return stack_plan(grid, rows, settings)


class _PlanState:
    """Finished parts of one plan build (cost curves, then one file per budget), written atomically as they
    complete and reused only under the same key; no folder: nothing is kept."""

    def __init__(self, folder: str | Path | None, key: Mapping[str, Any], log=None):
        from ..io.fileio import atomic_write_text, ensure_dir

        self.folder = None if folder is None or not is_rank_zero() else Path(folder)
        self.log = log
        self.key = json.loads(json.dumps(key, sort_keys=True, default=str))
        self._write = atomic_write_text
        if self.folder is None:
            return
        ensure_dir(self.folder)
        key_file = self.folder / "key.json"
        old = json.loads(key_file.read_text()) if key_file.is_file() else None
        if old != self.key:
            if old is not None and log is not None:
                log.warning("plan state in %s was made for another checkpoint or settings: starting over", self.folder)
            for f in self.folder.glob("*.json"):
                f.unlink(missing_ok=True)
            atomic_write_text(key_file, json.dumps(self.key, indent=1))

    def curves(self) -> dict[str, dict] | None:
        f = None if self.folder is None else self.folder / "curves.json"
        if f is None or not f.is_file():
            return None
        if self.log is not None:
            self.log.info("plan: cost curves resumed from %s", f)
        return json.loads(f.read_text())

    def save_curves(self, curves: Mapping[str, dict]) -> None:
        if self.folder is not None:
            self._write(self.folder / "curves.json", json.dumps(curves, default=float))

    def _row_file(self, b: float) -> Path | None:
        return None if self.folder is None else self.folder / f"budget_{b:.4f}.json"

    def row(self, b: float) -> tuple[dict[str, float], dict[str, float], str] | None:
        f = self._row_file(b)
        if f is None or not f.is_file():
            return None
        saved = json.loads(f.read_text())
        if self.log is not None:
            self.log.info("plan at %.2f bits: resumed (%s)", b, saved["reading"])
        return saved["taus"], saved["local"], saved["reading"]

    def save_row(self, b: float, row: tuple[dict[str, float], dict[str, float], str]) -> None:
        f = self._row_file(b)
        if f is not None:
            taus, local, reading = row
            self._write(f, json.dumps({"taus": taus, "local": local, "reading": reading}))


def plan_budgets(model: nn.Module, calib_ids: torch.Tensor, **settings: Any) -> BudgetPlan:
    """Build the budget plan of a calibrated, packed model (:func:`build_plan`, ``settings`` its keywords)
    and install it, so that ``set_budget`` serves it and ``save_quantized`` stores it; returns the plan."""
    from ..patching import install_plan

    install_plan(model, None)
    plan = build_plan(model, calib_ids, **settings)
    install_plan(model, plan)
    return plan


@torch.no_grad()
def _recorded_thresholds(
    model: nn.Module,
    holders: Mapping[str, nn.Module],
    alloc: Mapping[str, float],
    calib_ids: torch.Tensor,
    batch_size: int,
) -> dict[str, float]:
    """Run ``calib_ids`` with every holder (router or linear) recording its batch-quantile threshold for its
    budget ``alloc[name]`` (a :class:`~mobiquant.nn.router.ThresholdRecorder`); the mean threshold per holder."""
    if calib_ids.dim() != 2 or calib_ids.shape[0] == 0:
        raise ValueError(f"calib_ids must be a non-empty [n, T] tensor, got {tuple(calib_ids.shape)}")
    device = next(model.parameters()).device
    recorder = ThresholdRecorder({name: (h, float(alloc[name])) for name, h in holders.items()})
    body = _body(model)
    with recorder.attached(r for _, r in routers(model)):
        for start in range(0, calib_ids.shape[0], batch_size):
            body(input_ids=calib_ids[start : start + batch_size].to(device), use_cache=False)
        return recorder.means()


__all__ = [
    "allocate_site_budgets",
    "allocated_bits",
    "apply_linear_budgets",
    "apply_site_budgets",
    "build_plan",
    "default_grid",
    "plan_budgets",
    "site_cost_curves",
]

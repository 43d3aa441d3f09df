"""Budget plans: the deployed reading of a MoBiQuant checkpoint at every average bit-width.

A plan stores, for a grid of global budgets ``B_1 < ... < B_G`` (every 0.25 bit by default), each routed
linear's threshold on its router's gate values (``MoBiLinear.route_tau``) and the local budget it was given.
``set_budget(model, B)`` with a plan installed interpolates every linear's threshold linearly between the
two grid budgets around ``B``; without a plan it falls back to uniform routing (every router at ``B``).
The plan travels with the checkpoint (``plan.*`` tensors, ``plan`` in the JSON), so what a run evaluated
is what a reloaded checkpoint serves, to the bit.

How a plan is built (per-linear budgets from measured cost curves, thresholds refitted at those budgets,
and at every grid budget the reading with the lower calibration loss) is in :mod:`mobiquant.elastic.site_budgets`;
this module only holds, interpolates and serialises it, and depends on nothing else in the package.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from itertools import pairwise

import torch

PLAN_ATTR = "mobiquant_plan"
#: How a grid budget was read: thresholds of the per-linear/per-site allocation, or uniform routing.
READINGS = ("allocated", "uniform")


@dataclass
class BudgetPlan:
    """Per-linear thresholds (``taus [L, G]``) and local budgets (``local [L, G]``) at grid budgets ``[G]``."""

    budgets: list[float]
    linears: list[str]
    taus: torch.Tensor
    local: torch.Tensor
    reading: list[str]
    settings: dict = field(default_factory=dict)

    def __post_init__(self):
        self.budgets = [float(b) for b in self.budgets]
        self.linears = list(self.linears)
        self.reading = list(self.reading)
        G, L = len(self.budgets), len(self.linears)
        if G == 0 or L == 0:
            raise ValueError(f"a budget plan needs at least one budget and one linear, got {G} and {L}")
        if any(b2 <= b1 for b1, b2 in pairwise(self.budgets)):
            raise ValueError(f"plan budgets must increase strictly, got {self.budgets}")
        if len(set(self.linears)) != L:
            raise ValueError("plan linears must be unique")
        self.taus = torch.as_tensor(self.taus, dtype=torch.float64).reshape(L, G).cpu()
        self.local = torch.as_tensor(self.local, dtype=torch.float64).reshape(L, G).cpu()
        if len(self.reading) != G or any(r not in READINGS for r in self.reading):
            raise ValueError(f"plan reading must list one of {READINGS} per budget, got {self.reading}")
        if not torch.isfinite(self.taus).all():
            raise ValueError("plan thresholds must be finite")

    @property
    def lo(self) -> float:
        return self.budgets[0]

    @property
    def hi(self) -> float:
        return self.budgets[-1]

    def _weights(self, budget: float) -> tuple[int, int, float]:
        b = float(budget)
        if not (math.isfinite(b) and self.lo - 1e-9 <= b <= self.hi + 1e-9):
            raise ValueError(f"budget {budget} is outside this plan's range [{self.lo}, {self.hi}] bits")
        b = min(max(b, self.lo), self.hi)
        j = 0
        while j + 1 < len(self.budgets) and self.budgets[j + 1] < b:
            j += 1
        if j + 1 >= len(self.budgets):
            return j, j, 0.0
        w = (b - self.budgets[j]) / (self.budgets[j + 1] - self.budgets[j])
        return j, j + 1, w

    def taus_at(self, budget: float) -> dict[str, float]:
        """Every linear's threshold at ``budget`` (linear interpolation between the grid budgets)."""
        i, j, w = self._weights(budget)
        t = (1 - w) * self.taus[:, i] + w * self.taus[:, j]
        return dict(zip(self.linears, t.tolist(), strict=True))

    def local_at(self, budget: float) -> dict[str, float]:
        i, j, w = self._weights(budget)
        t = (1 - w) * self.local[:, i] + w * self.local[:, j]
        return dict(zip(self.linears, t.tolist(), strict=True))

    # ------------------------------------------------------------------ serialisation
    def state(self) -> dict[str, torch.Tensor]:
        return {
            "plan.budgets": torch.tensor(self.budgets, dtype=torch.float64),
            "plan.taus": self.taus.contiguous(),
            "plan.local": self.local.contiguous(),
        }

    def meta(self) -> dict:
        return {"linears": self.linears, "reading": self.reading, "settings": dict(self.settings)}

    @classmethod
    def from_state(cls, state: Mapping[str, torch.Tensor], meta: Mapping) -> BudgetPlan:
        missing = [k for k in ("plan.budgets", "plan.taus", "plan.local") if k not in state]
        if missing:
            raise ValueError(f"plan tensors missing: {missing}")
        for key in ("linears", "reading"):
            if not isinstance(meta.get(key), list):
                raise ValueError(f"plan field {key!r} must be a list, got {type(meta.get(key)).__name__}")
        G, L = state["plan.budgets"].numel(), len(meta["linears"])
        for key in ("plan.taus", "plan.local"):
            if tuple(state[key].shape) != (L, G):
                raise ValueError(
                    f"{key} has shape {tuple(state[key].shape)}, expected {(L, G)} ({L} linears x {G} budgets)"
                )
        return cls(
            state["plan.budgets"].tolist(),
            meta["linears"],
            state["plan.taus"],
            state["plan.local"],
            meta["reading"],
            dict(meta.get("settings") or {}),
        )


def stack_plan(
    budgets: Sequence[float],
    per_budget: Sequence[tuple[dict[str, float], dict[str, float], str]],
    settings: Mapping | None = None,
) -> BudgetPlan:
    """A plan from one ``(taus by linear, local budgets by linear, reading)`` triple per budget."""
    if len(budgets) != len(per_budget) or not per_budget:
        raise ValueError("one (taus, local, reading) entry per plan budget is needed")
    names = sorted(per_budget[0][0])
    for taus, local, _ in per_budget:
        if sorted(taus) != names or sorted(local) != names:
            raise ValueError("every plan budget must cover the same linears")
    taus_t = torch.tensor([[t[n] for t, _, _ in per_budget] for n in names], dtype=torch.float64)
    local_t = torch.tensor([[lo[n] for _, lo, _ in per_budget] for n in names], dtype=torch.float64)
    return BudgetPlan(list(budgets), names, taus_t, local_t, [r for _, _, r in per_budget], dict(settings or {}))


__all__ = ["PLAN_ATTR", "READINGS", "BudgetPlan", "stack_plan"]

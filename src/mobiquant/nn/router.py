"""MoBiRoute: a tiny per-token router that chooses how many residual slices each token uses.

Each router is a 2-layer MLP ``d -> hidden -> K-1`` on a token's input activation, one score per residual
slice. Gates are nested: residual slice ``e`` is on only if slices ``2..e-1`` are, so the gate of slice
``e`` is decided by ``min(score_2..score_e)`` against ONE threshold ``tau`` per router. A higher ``tau``
means fewer slices; the achieved average bits fall monotonically as ``tau`` rises.

Two gate policies (``policy``):

* ``free`` (the default): the gate of slice ``e`` is ``min(score_2..score_e) > tau``; at a given budget a
  token may use any number of slices.
* ``adjacent``: the sigmoid of each slice's score is placed in its own band,
  ``v_e = sigmoid(score_e) + 2 (K - 1 - e)``, so one ``tau`` inside the band of slice ``e`` turns every
  earlier slice on, every later slice off, and slice ``e`` on for the tokens that score highest. At a
  budget between two views every token uses one of those two views; integer views are exact static views.
  This keeps tokens off views far below the budget. Measured on SmolLM2-135M (docs/RESULTS.md): with the
  paper's grid and a short CPU calibration free routing was better at most budgets (sending some tokens
  to 6-8 bits pays for others at 2 bits); after a GPU-length calibration of a grid anchored at 4 bits,
  free routing put tokens on the unusable 2-bit base and fell far below the static views it could have
  used (634.7 at 4.26 bits against 27.6 for the static 4-bit view), which ``adjacent`` rules out.

Elastic control: after calibration, each router keeps a table mapping ``tau`` to the average bits it
achieved on calibration activations (a weighted quantile function of its scores). Asking for a budget
``B`` looks ``tau`` up in that table: thresholds change, weights never do.
"""

from __future__ import annotations

import bisect
import weakref
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any, cast

import torch
import torch.nn as nn

TABLE_POINTS = 513


def nested_min(scores: torch.Tensor) -> torch.Tensor:
    """Running minimum over the slice axis: slice ``e`` is on iff ``nested_min[..., e] > tau``."""
    return torch.cummin(scores, dim=-1).values


def _tail(values: torch.Tensor, slice_bits: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gate values ``[N, K-1]`` sorted in decreasing order (float64), the average bits reached once entries
    ``0..i`` are on (``bits_after[i]``), and each entry's next smaller value (a threshold halfway between
    the two switches on exactly entries ``0..i``)."""
    flat = values.detach().reshape(-1, len(slice_bits) - 1)
    n = flat.shape[0]
    if n == 0:
        raise ValueError("cannot calibrate router thresholds from zero tokens")
    flat = flat.reshape(-1).double()
    tau_sorted, order = torch.sort(flat, descending=True)
    weights = torch.tensor(slice_bits[1:], dtype=torch.float64, device=flat.device).expand(n, -1).reshape(-1)
    bits_after = slice_bits[0] + torch.cumsum(weights[order], 0) / n
    nxt = torch.cat([tau_sorted[1:], tau_sorted[-1:] - 1.0])
    return tau_sorted, bits_after, nxt


def weighted_tail_table(
    values: torch.Tensor, slice_bits: Sequence[int], points: int = TABLE_POINTS
) -> tuple[torch.Tensor, torch.Tensor]:
    """Table of (bits, tau) for values ``[N, K-1]`` (nested minima), sorted by increasing bits.

    ``bits(tau) = b_1 + (1/N) sum_{t,j} b_(j+1) [values[t, j] > tau]`` is the average code width per
    weight when the threshold is ``tau``; it is evaluated at ``points`` thresholds spread evenly in bits.
    """
    tau_sorted, bits_after, nxt = _tail(values, slice_bits)
    lo, hi = float(slice_bits[0]), float(sum(slice_bits))
    targets = torch.linspace(lo, hi, points, dtype=torch.float64, device=values.device)
    idx = torch.searchsorted(bits_after, targets, right=False).clamp(max=len(bits_after) - 1)
    taus = (tau_sorted[idx] + nxt[idx]) / 2
    span = float(tau_sorted[0] - tau_sorted[-1]) + 1.0
    taus[0] = tau_sorted[0] + span  # nothing on
    taus[-1] = tau_sorted[-1] - span  # everything on
    return targets.float(), taus.float()


def batch_tau(values: torch.Tensor, slice_bits: Sequence[int], budget: float) -> torch.Tensor:
    """The threshold (a 0-dim tensor on ``values``' device, no host sync) at which gate values ``[N, K-1]``
    first reach ``budget`` average bits: the entries above it are the highest-valued ones whose summed
    slice bits, per token, reach ``budget - b_1``. Outside ``(b_1, sum b)`` every gate is off or on."""
    return tail_tau(_tail(values, slice_bits), slice_bits, budget).to(values.dtype)


def tail_tau(
    tail: tuple[torch.Tensor, torch.Tensor, torch.Tensor], slice_bits: Sequence[int], budget: float
) -> torch.Tensor:
    """:func:`batch_tau` (in float64) from the sorted tail of the values (``_tail``), which several budgets on
    the same values share: one sort per batch, one search per budget."""
    tau_sorted, bits_after, nxt = tail
    lo, hi = float(slice_bits[0]), float(sum(slice_bits))
    target = min(max(float(budget), lo), hi)
    if target <= lo:
        return tau_sorted[0] + 1.0
    if target >= hi:
        return tau_sorted[-1] - 1.0
    idx = torch.searchsorted(bits_after, torch.tensor([target], dtype=torch.float64, device=bits_after.device))
    idx = idx.clamp(max=len(bits_after) - 1)[0]
    return (tau_sorted[idx] + nxt[idx]) / 2


def _hit(entry: tuple | None, x: torch.Tensor, key) -> bool:
    """Whether a cache entry ``(weakref to input, key, value)`` was made for this very ``x`` and ``key``."""
    return entry is not None and entry[0]() is x and entry[1] == key


class ThresholdRecorder:
    """Budget-conditioned threshold fitting, one object for routers and linears alike.

    ``holders`` maps a name to ``(holder, budget)``: a :class:`TokenRouter` (its own threshold) or a linear
    routed by one (its own threshold on the router's gate values, ``MoBiLinear.route_tau``). While the
    recorder is attached (``with recorder.attached(routers):``), every forward routes each holder's tokens at
    its batch's quantile threshold for its budget (:func:`batch_tau`, no host sync) and keeps that threshold;
    :meth:`means` is then each holder's mean threshold. Holders that share a router and an input share one
    sort of its gate values."""

    def __init__(self, holders: Mapping[str, tuple[nn.Module, float]]):
        self.names = list(holders)
        self._budget = {id(h): float(b) for h, b in holders.values()}
        self._taus: dict[int, list[torch.Tensor]] = {id(h): [] for h, _ in holders.values()}
        self._ids = [id(h) for h, _ in holders.values()]

    def budget(self, holder: nn.Module) -> float | None:
        """The budget ``holder`` records at, or None when it runs as usual."""
        return self._budget.get(id(holder))

    def record(self, holder: nn.Module, tau: torch.Tensor) -> None:
        self._taus[id(holder)].append(tau)

    def means(self) -> dict[str, float]:
        """Each holder's mean recorded threshold (one host sync for all of them)."""
        for name, i in zip(self.names, self._ids, strict=True):
            if not self._taus[i]:
                raise RuntimeError(f"{name} saw no tokens while fitting its threshold")
        means = torch.stack([torch.stack([t.double() for t in self._taus[i]]).mean() for i in self._ids])
        return dict(zip(self.names, means.cpu().tolist(), strict=True))

    @contextmanager
    def attached(self, routers: Iterable[TokenRouter]) -> Iterator[ThresholdRecorder]:
        """Attach to ``routers`` (every router of the model) for the ``with`` block; detached afterwards."""
        rs = list(routers)
        for r in rs:
            r.recorder = self
            r.clear_cache()
        try:
            yield self
        finally:
            for r in rs:
                r.recorder = None
                r.clear_cache()


def interp_tau(bits_table: torch.Tensor, tau_table: torch.Tensor, budget: float) -> float:
    """Linear interpolation of ``tau`` for ``budget`` in a (bits, tau) table sorted by bits."""
    bits, taus = (t.detach().double().cpu().tolist() for t in (bits_table, tau_table))
    return interp_values(bits, taus, budget)


def interp_values(bits: Sequence[float], taus: Sequence[float], budget: float) -> float:
    """:func:`interp_tau` on host lists: clamped to the table's range, linear between its neighbours."""
    budget = min(max(float(budget), bits[0]), bits[-1])
    i = min(max(bisect.bisect_left(bits, budget), 1), len(bits) - 1)
    w = (budget - bits[i - 1]) / max(bits[i] - bits[i - 1], 1e-12)
    return taus[i - 1] + w * (taus[i] - taus[i - 1])


POLICIES = ("free", "adjacent")


class TokenRouter(nn.Module):
    """Scores the need of each token for residual slices ``2..K`` of one input site."""

    # buffers (registered in __init__), declared for type checkers
    tau: torch.Tensor
    bits_table: torch.Tensor
    tau_table: torch.Tensor
    _fixed: bool = False  # see ``fixed`` (a class default for routers pickled before it existed)
    _fixed_buf: dict | None = None
    has_borrowers: bool = False  # see __init__ (class defaults for routers pickled before placement 'sublayer')
    _home: weakref.ref | None = None
    hold_home: bool = False  # see __init__ (placement 'block')
    _held: torch.Tensor | None = None
    _host_table: tuple | None = None  # (stamp, (bits, taus)): the table on the host, see :meth:`host_table`
    _host_tau: tuple | None = None  # (stamp, value): the threshold on the host, see :meth:`tau_value`

    def __init__(
        self,
        in_features: int,
        slice_bits: Sequence[int],
        hidden: int = 64,
        temperature: float = 1.0,
        policy: str = "free",
    ):
        super().__init__()
        if policy not in POLICIES:
            raise ValueError(f"router policy must be one of {POLICIES}, got {policy!r}")
        self.policy = policy
        if len(slice_bits) < 2:
            raise ValueError("a router needs at least two slices (one base and one residual)")
        if hidden <= 0:
            raise ValueError(f"router hidden size must be positive, got {hidden}")
        self.slice_bits = tuple(int(b) for b in slice_bits)
        self.temperature = float(temperature)
        self.net = nn.Sequential(nn.Linear(in_features, hidden), nn.GELU(), nn.Linear(hidden, len(slice_bits) - 1))
        # Small random scores to start with (ties would make every token choose alike), and a mild
        # preference for fewer slices at the deeper residuals.
        head = cast(nn.Linear, self.net[2])
        with torch.no_grad():
            head.weight.mul_(0.1)
            head.bias.copy_(-torch.arange(len(slice_bits) - 1, dtype=torch.float32) * 0.1)
        self.register_buffer("tau", torch.zeros(()))
        self.register_buffer("bits_table", torch.empty(0))
        self.register_buffer("tau_table", torch.empty(0))
        # Training-time budget target (set by the calibration loop each step).
        # Per-input caches shared by the linears of one site within a forward. They refer to their input
        # weakly, so a finished forward's activations are not kept alive by the router.
        self._cache: tuple | None = None  # (input ref, key, result)
        self._values: tuple | None = None  # (input ref, key, gate values) for slice_counts_at
        self._tail: tuple | None = None  # (gate values, their sorted tail) for batch_threshold
        self._launch: tuple | None = None  # (key, gate-value buffer, InLaunchRouter) for in_launch
        self.last_soft: torch.Tensor | None = None
        # Budget-conditioned threshold fitting: a ThresholdRecorder while one is attached.
        self.recorder: ThresholdRecorder | None = None
        # Hard routing (slice_counts, slice_counts_at): 'auto' runs the fused Triton kernel on CUDA for
        # decode-sized batches (mobiquant.kernels.use_fused_router), 'torch' this module's layers, 'triton'
        # the kernel always (also in Triton's CPU interpreter).
        self.backend: str = "auto"
        # The fused kernel launched with programmatic dependent launch (SmallConfig.pdl, set by set_small_config).
        self.launch_pdl: bool = False
        # Set with it (SmallConfig.router_early_l2): the fused kernel asks L2 for the weights before it reads inputs
        self.launch_early_l2: bool = False
        # Set with it (SmallConfig.router_partials): one token's launch ends without its tail (partials_of)
        self.launch_partials: bool = False
        # Set by decode (mobiquant.tasks.decode.BudgetControl) at a budget where the threshold of every linear this
        # router serves fixes that linear's view whatever the scores (constant_k), the views not all alike: the
        # hard gate values are then a constant buffer (:meth:`fixed_values`) and no router runs. set_budget resets it,
        # and decode at its end; clear_cache (decisions kept for an input) leaves it: a graph capture clears the caches
        # of a step whose routers are fixed.
        self._fixed = False
        self._fixed_buf = None  # (shape, device) -> buffer of fixed_values
        # Placement 'sublayer' (MoBiConfig.router_placement): linears of a later input (o after q/k/v, down after
        # gate/up) take this router's decisions on the input of its home linears, which record it as they run
        # (:meth:`see_home`; held weakly: the sublayer's forward keeps it alive while its later linears run).
        # ``hold_home`` (placement 'block': the MLP's linears borrow the decisions made on the attention's input, which
        # the block's forward no longer holds by then): the last home input is also held, until the next replaces it
        # (its autograd history is the norm that made it, nothing of the block after it).
        self.has_borrowers = False
        self._home: weakref.ref | None = None
        self.hold_home = False
        self._held: torch.Tensor | None = None

    def see_home(self, x: torch.Tensor) -> None:
        """Record ``x``, the input of a linear that reads this router's own input (placements 'sublayer',
        'attention', 'block'; held with ``hold_home``)."""
        self._home = weakref.ref(x)
        if self.hold_home:
            self._held = x

    def home_input(self, like: torch.Tensor) -> torch.Tensor:
        """The input this router decides on, for a linear that borrows its decisions: the last input its home
        linears saw, which must still be alive and hold the same tokens as ``like`` (the borrower's input)."""
        home = None if self._home is None else self._home()
        if home is None:
            raise RuntimeError(
                "a linear that borrows its router's decisions (router placement 'sublayer', 'attention' or 'block') "
                "ran before the linears that read the router's input, or after that input was freed: run the "
                "sublayer's (the block's, for 'block') forward in order"
            )
        if home.shape[:-1] != like.shape[:-1]:
            raise RuntimeError(
                f"the router's input holds tokens of shape {tuple(home.shape[:-1])}, the borrowing linear's input "
                f"{tuple(like.shape[:-1])}: its home linears last ran on another batch"
            )
        return home

    @property
    def fixed(self) -> bool:
        return self._fixed

    @fixed.setter
    def fixed(self, value: bool) -> None:
        if bool(value) != self._fixed:  # decisions kept for an input were made the other way
            self._cache = None
            self._values = None
            self.__dict__["_partials"] = None
            self.__dict__["_made_for"] = None
        self._fixed = bool(value)

    @property
    def num_residuals(self) -> int:
        return len(self.slice_bits) - 1

    @property
    def calibrated(self) -> bool:
        return self.bits_table.numel() > 0

    def scores(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x.to(cast(nn.Linear, self.net[0]).weight.dtype))

    def gate_values(self, scores: torch.Tensor) -> torch.Tensor:
        """Values compared with ``tau``: slice ``e`` is on iff ``gate_values[..., e] > tau``; they are
        non-increasing along the slice axis, so gates are nested under either policy."""
        if self.policy == "free":
            return nested_min(scores)
        return torch.sigmoid(scores) + self._bands(scores.dtype, scores.device)

    def _bands(self, dtype: torch.dtype, device: torch.device | None = None) -> torch.Tensor:
        """The adjacent policy's band of each residual slice, ``[K-1]``: slice ``e``'s values lie in
        ``[band_e, band_e + 1]`` (bands 2 apart, the deepest slice's at 0). Made once per dtype and device and kept
        (only ever read; not while Dynamo traces), instead of an arange and a product at every routed forward."""
        key = (dtype, device)
        kept = self.__dict__.get("_band_kept") or {}
        bands = kept.get(key)
        if bands is None:
            bands = 2.0 * torch.arange(self.num_residuals - 1, -1, -1, dtype=dtype, device=device)
            if not torch.compiler.is_compiling():
                self.__dict__["_band_kept"] = {**kept, key: bands}
        return bands

    def fixed_values(self, x: torch.Tensor) -> torch.Tensor:
        """Gate values, ``[..., K-1]`` fp32 for the tokens of ``x``, that give every threshold :meth:`constant_k`
        fixes its view: each slice's band midpoint (adjacent policy). For decode-sized inputs one buffer per shape and
        device, made once (by a decode's eager warm-up, before any capture), kept and only ever read."""
        if self.policy != "adjacent":
            raise RuntimeError("only the adjacent policy's gate values lie in bands a threshold can fix")
        shape = (*x.shape[:-1], self.num_residuals)
        key = (shape, x.device)
        kept = self._fixed_buf if self._fixed_buf is not None else {}
        buf = kept.get(key)
        if buf is None:
            buf = (self._bands(torch.float32, x.device) + 0.5).expand(shape).contiguous()
            if x.numel() // x.shape[-1] <= 64:  # decode-sized: kept for good (a captured graph reads it); a
                self._fixed_buf = {**kept, key: buf}  # prefill's is made again each time
        return buf

    def constant_k(self, tau: float) -> int | None:
        """The slice count every token gets at threshold ``tau`` whatever its scores, or None if the scores decide.
        With the adjacent policy slice ``e``'s values lie in ``[band_e, band_e + 1]`` (a sigmoid, which may round to
        0 or 1, plus its band): a threshold below the band turns the slice on for every token, one at or above the
        band's top turns it off, one in ``[band_e, band_e + 1)`` leaves it to the scores. With the free policy the
        values are unbounded and only an infinite threshold decides."""
        if self.policy == "free":
            return 1 if tau == float("inf") else (len(self.slice_bits) if tau == float("-inf") else None)
        if self._band_of(tau) is not None:
            return None
        return 1 + sum(band > tau for band in self._band_floors())

    def adjacent_view(self, tau: float) -> int | None:
        """With the adjacent policy and ``tau`` inside a slice's band (the scores decide, :meth:`constant_k` None):
        the lower of the two views every token then takes, ``j`` (a token takes ``j + 1`` iff its value for
        residual slice ``j - 1`` exceeds ``tau``); None otherwise."""
        if self.policy != "adjacent":
            return None
        e = self._band_of(tau)
        return None if e is None else 1 + e

    def _band_floors(self) -> list[float]:
        """The adjacent policy's band of each residual slice on the host (:meth:`_bands`)."""
        return [2.0 * (self.num_residuals - 1 - e) for e in range(self.num_residuals)]

    def _band_of(self, tau: float) -> int | None:
        """The residual slice whose band ``[band_e, band_e + 1)`` holds ``tau`` (adjacent policy), or None."""
        return next((e for e, band in enumerate(self._band_floors()) if band <= tau < band + 1), None)

    # ---------------- hard routing (inference) ----------------
    def _hard_values(self, x: torch.Tensor, tau: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Gate values of ``x``; also the slice counts at the threshold tensor ``tau`` when the fused kernel
        computed them (``None`` otherwise: the caller compares)."""
        from .. import kernels

        if self.fixed and self.recorder is None:  # every linear's view fixed by its threshold: no router runs
            return self.fixed_values(x), None
        if kernels.use_fused_router(x, getattr(self, "backend", "auto")):
            k, m = kernels.fused_router(x, *self._weights(), tau, self.policy, **self._launch_options())
            return m, k
        return self.gate_values(self.scores(x)), None

    def _launch_options(self) -> dict:
        """The fused kernel's launch keywords (``set_small_config`` sets them; getattr: routers pickled before)."""
        return dict(pdl=getattr(self, "launch_pdl", False), early_l2=getattr(self, "launch_early_l2", False))

    def _values_key(self) -> tuple:
        """The versions of the router's parameters (its two linears' weights and biases, read from the modules'
        dicts: ``parameters()`` walks the module tree, about 17 us a call, once per router a forward)."""
        mods = self.net._modules
        ps = (p for m in (mods["0"], mods["2"]) if m is not None for p in m._parameters.values())
        return ("values", *(p._version for p in ps if p is not None))

    def slice_counts(self, x: torch.Tensor) -> torch.Tensor:
        """Number of slices ``k`` in ``[1, K]`` per token (``long``, shape ``x.shape[:-1]``)."""
        budget = None if self.recorder is None else self.recorder.budget(self)
        key = (id(x), self.tau._version, budget)  # no host sync on CUDA
        if _hit(self._cache, x, key):
            return self._cache[2]  # type: ignore[index]
        with torch.no_grad():
            if budget is not None:  # threshold fitting: this batch's quantile for the budget
                assert self.recorder is not None
                m = self.gate_values(self.scores(x))
                tau = self._threshold_of(m, budget)
                self.recorder.record(self, tau)
                k = 1 + (m > tau).sum(-1)
            elif (known := self._known_values(x, self._values_key())) is not None:  # held, or a linear's
                k = 1 + (known > self.tau).sum(-1)
            else:
                held = self._held_partials(x)  # a launch without its tail on x: finished here
                m, k_fused = (held.values(), None) if held is not None else self._hard_values(x, self.tau)
                k = 1 + (m > self.tau).sum(-1) if k_fused is None else k_fused
                # linears with own thresholds reuse them (plain attributes, written to the instance dict:
                # nn.Module.__setattr__'s checks cost more than the rest of a hit, once per router a forward)
                self.__dict__["_values"] = (weakref.ref(x), self._values_key(), m)
        self.__dict__["_cache"] = (weakref.ref(x), key, k)
        return k

    def _partials_ok(self, x: torch.Tensor) -> bool:
        """Whether this router's decisions on ``x`` may be a launch without its tail (:meth:`partials_of`):
        ``SmallConfig.router_partials`` set, one token on the fused kernel's path, no threshold fitting, views not
        fixed, and inputs wider than one program's columns (the launch then splits them)."""
        from .. import kernels
        from ..kernels.triton_router import SPLIT_COLS_ONE_TOKEN

        if not getattr(self, "launch_partials", False) or self.fixed or self.recorder is not None:
            return False
        return x.numel() == x.shape[-1] > SPLIT_COLS_ONE_TOKEN and kernels.use_fused_router(
            x, getattr(self, "backend", "auto")
        )

    def _held_partials(self, x: torch.Tensor):
        """The router partials kept for this very ``x`` (:meth:`partials_of`, :meth:`routed_input`), or None."""
        entry = self.__dict__.get("_partials")
        return entry[2] if entry is not None and _hit(entry, x, self._values_key()) else None

    @torch.no_grad()
    def partials_of(self, x: torch.Tensor):
        """For one token ``x`` with ``SmallConfig.router_partials``: this router's launch on ``x`` without its tail
        (``mobiquant.kernels.triton_router.RouterPartials``), launched once per input and kept, for the GEMVs on the
        fragment kernel to finish (``RoutedK``); None where the option is off or does not apply (:meth:`_partials_ok`):
        the caller then asks for gate values."""
        if not getattr(self, "launch_partials", False):  # off: gate values (gate_values_of finishes partials held)
            return None
        held = self._held_partials(x)
        if held is not None or not self._partials_ok(x):
            return held
        from .. import kernels

        _, p = kernels.router_partials(x, self._weights(), self.policy, **self._launch_options())
        self.__dict__["_partials"] = (weakref.ref(x), self._values_key(), p)
        return p

    def _weights(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(w1, b1, w2, b2)``: the two layers' weights and biases, as the fused kernels take them."""
        first, last = cast(nn.Linear, self.net[0]), cast(nn.Linear, self.net[2])
        return first.weight, first.bias, last.weight, last.bias

    @torch.no_grad()
    def routed_input(self, x: torch.Tensor, prologue: tuple) -> torch.Tensor:
        """The rows ``y`` that ``prologue`` makes of ``x`` (the RMS norm before a site, or a gated MLP's product:
        :data:`mobiquant.kernels.triton_router.PROLOGUES`) and this router's hard decisions on ``y``, in one launch
        of the fused kernel (:func:`mobiquant.kernels.fused_input_router`); the decisions are kept as
        :meth:`slice_counts` and :meth:`gate_values_of` keep their own, so the linears that read ``y`` launch no
        router. For inputs :func:`mobiquant.kernels.use_fused_router` sends to the kernel."""
        from .. import kernels

        router = self._weights()
        if self._partials_ok(x):  # the launch without its tail: its readers finish the router (partials_of)
            y, p = kernels.router_partials(x, router, self.policy, prologue=prologue, **self._launch_options())
            assert y is not None
            self.__dict__["_partials"] = (weakref.ref(y), self._values_key(), p)
            return y
        y, k, m = kernels.fused_input_router(x, prologue, router, self.tau, self.policy, **self._launch_options())
        self.__dict__["_values"] = (weakref.ref(y), self._values_key(), m)
        self.__dict__["_cache"] = (weakref.ref(y), (id(y), self.tau._version, None), k)
        return y

    def gate_values_of(self, x: torch.Tensor) -> torch.Tensor:
        """Hard gate values of ``x``, computed once per input and shared by every linear of the site."""
        key = self._values_key()
        known = self._known_values(x, key)
        if known is not None:
            return known
        held = self._held_partials(x)  # a launch without its tail on x: finished here (a few torch operations)
        m = held.values() if held is not None else self._hard_values(x, self.tau)[0]
        self.__dict__["_values"] = (weakref.ref(x), key, m)
        return m

    def in_launch(self, x: torch.Tensor) -> tuple[torch.Tensor, Any] | None:
        """For one token ``x`` whose hard decisions run in the fused kernel: ``(buffer, InLaunchRouter)``, this
        router for the one-bit plane launch to run itself, writing the gate values into ``buffer`` (``[1, K-1]``
        fp32, one per router and device, written by every launch that reads it). None for other inputs."""
        from .. import kernels

        if self.fixed or x.numel() != x.shape[-1] or not kernels.use_fused_router(x, getattr(self, "backend", "auto")):
            return None
        from ..kernels.triton_bitplane import InLaunchRouter

        params = self._weights()
        key = (x.device, self.policy, tuple((p.data_ptr(), p._version) for p in params))
        if self._launch is None or self._launch[0] != key:
            buf = torch.empty(1, self.num_residuals, dtype=torch.float32, device=x.device)
            w1, b1, w2, b2 = (p.detach().contiguous() for p in params)
            r = InLaunchRouter(w1, b1, w2, b2, adjacent=self.policy == "adjacent")
            self._launch = (key, buf, r)
        return self._launch[1], self._launch[2]

    def _threshold_of(self, m: torch.Tensor, budget: float) -> torch.Tensor:
        """:func:`batch_tau` of gate values ``m``, their sort kept for the next budget on the same values."""
        if self._tail is None or self._tail[0] is not m:
            self._tail = (m, _tail(m, self.slice_bits))
        return tail_tau(self._tail[1], self.slice_bits, budget).to(m.dtype)

    @torch.no_grad()
    def batch_threshold(self, x: torch.Tensor, budget: float) -> torch.Tensor:
        """The threshold (0-dim, on the device) at which this batch's gate values meet ``budget``."""
        return self._threshold_of(self.gate_values_of(x), budget)

    @torch.no_grad()
    def slice_counts_at(self, x: torch.Tensor, tau: float | torch.Tensor) -> torch.Tensor:
        """Slices per token for a caller's own threshold ``tau`` on this router's gate values (the values
        are computed once per input and shared by every caller)."""
        m = self.gate_values_of(x)
        if torch.is_tensor(tau) and tau.device != m.device:
            tau = tau.to(m.device)
        return 1 + (m > tau).sum(-1)

    # ---------------- soft / straight-through gates (training) ----------------
    def gates(self, x: torch.Tensor, target_bits: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Nested straight-through gates ``m [..., K-1]`` and their soft values (for the budget loss).

        With ``target_bits`` the threshold is the weighted quantile of this batch's scores that meets it,
        so the hard gates achieve the target exactly and the router learns WHICH tokens get more slices.
        """
        # The cache serves the linears that share this router within one forward. A later step on the same
        # input tensor has updated parameters (new versions) and must not reuse the first step's graph.
        key = ("gates", target_bits, torch.is_grad_enabled(), self._values_key()[1:])
        if _hit(self._cache, x, key):
            return self._cache[2]  # type: ignore[index]
        s = self.scores(x)
        m_nested = self.gate_values(s)
        if target_bits is not None:
            bits_t, tau_t = weighted_tail_table(m_nested.detach().reshape(-1, self.num_residuals), self.slice_bits)
            tau = interp_tau(bits_t, tau_t, target_bits)
        else:
            tau = float(self.tau)
        soft = torch.sigmoid((m_nested - tau) / self.temperature)
        hard = (m_nested > tau).to(soft.dtype)
        gates = hard + soft - soft.detach()
        result = (gates, soft)
        self._cache = (weakref.ref(x), key, result)
        self.last_soft = soft  # read by the calibration loop's budget loss
        return result

    def hold_values(self, x: torch.Tensor, values: torch.Tensor) -> None:
        """Keeps ``values`` (hard gate values of ``x``'s tokens, ``[..., K-1]``) as this router's decisions for
        ``x``, made elsewhere: the launch before finished this router on the norm whose parts ``x`` holds
        (``SmallConfig.router_tail``, ``kernels.epilogue.RouterTail``). Its linears read them (:meth:`gate_values_of`,
        :meth:`slice_counts`) and launch no router; :meth:`made_for` tells them that ``x`` is not itself the input the
        router decides on (the norm's output is ``x`` scaled), so they may take it with the norm's scale."""
        self.__dict__["_made_for"] = (weakref.ref(x), self._values_key(), values)

    def pass_values(self, x: torch.Tensor, made: torch.Tensor) -> None:
        """Where this router's decisions for ``x`` are held (:meth:`made_for`) and a linear makes the input they
        decide on from ``x`` itself (``made``: the norm applied, its launch could not): the same decisions for
        ``made``, which is the router's input (no router launched for it)."""
        held = self.__dict__.get("_made_for")
        if _hit(held, x, self._values_key()):
            self.__dict__["_values"] = (weakref.ref(made), held[1], held[2])  # type: ignore[index]

    def made_for(self, x: torch.Tensor) -> bool:
        """Whether this router's decisions for ``x`` are held, made elsewhere (:meth:`hold_values`)."""
        return _hit(self.__dict__.get("_made_for"), x, self._values_key())

    def hold_idle(self, x: torch.Tensor) -> None:
        """Marks ``x`` (an input of this router's home linears that is not itself the input it decides on: a norm's
        parts, made by the launch before) as one that no linear asks this router's decisions for (every linear
        reading them decodes a static view this step): its home linears then need not make the input it would decide
        on, and take the norm in their launch (:meth:`idle_for`)."""
        self.__dict__["_idle_for"] = weakref.ref(x)

    def made_once(self, x: torch.Tensor, prologue: tuple, make: Any) -> torch.Tensor:
        """``make(x, prologue)``: the input this router decides on, made from ``x`` by a norm's ``prologue`` its home
        linears were handed, once for all of them (the same tensor for each: their site's one launch is kept for one
        input)."""
        held = self.__dict__.get("_made_once")
        if held is not None and held[0]() is x and held[1] is prologue:
            return held[2]
        made = make(x, prologue)
        self.__dict__["_made_once"] = (weakref.ref(x), prologue, made)
        return made

    def idle_for(self, x: torch.Tensor) -> bool:
        """Whether ``x`` was marked by :meth:`hold_idle`: no linear asks this router's decisions for it."""
        held = self.__dict__.get("_idle_for")
        return held is not None and held() is x

    def _known_values(self, x: torch.Tensor, key: tuple) -> torch.Tensor | None:
        """The gate values known for this very ``x`` (kept by a linear, or held: :meth:`hold_values`), or None."""
        if _hit(self._values, x, key):
            return self._values[2]  # type: ignore[index]
        held = self.__dict__.get("_made_for")
        return held[2] if held is not None and _hit(held, x, key) else None

    def clear_cache(self) -> None:
        self._cache = None
        self._values = None
        self.__dict__["_made_for"] = None
        self.__dict__["_idle_for"] = None
        self.__dict__["_made_once"] = None
        self.__dict__["_partials"] = None
        self._tail = None
        self.last_soft = None

    # ---------------- elastic thresholds ----------------
    @torch.no_grad()
    def fit_thresholds(self, activations: torch.Tensor) -> None:
        """Build the bits -> tau table from calibration activations ``[..., d]``."""
        x = activations.reshape(-1, activations.shape[-1])
        m = self.gate_values(self.scores(x))
        bits, taus = weighted_tail_table(m, self.slice_bits)
        self.bits_table = bits.to(self.tau.device)
        self.tau_table = taus.to(self.tau.device)

    def set_table(self, budgets: Sequence[float], taus: Sequence[float]) -> None:
        """Install a (budget -> tau) table; taus are made non-increasing in the budget."""
        b = torch.tensor(list(budgets), dtype=torch.float32)
        t = torch.tensor(list(taus), dtype=torch.float32)
        order = torch.argsort(b)
        b, t = b[order], torch.cummin(t[order], 0).values
        self.bits_table = b.to(self.tau.device)
        self.tau_table = t.to(self.tau.device)
        self._cache = None

    def __getstate__(self) -> dict:
        """Pickled without its host copies and per-input caches (they hold weak references; both are rebuilt)."""
        state = dict(self.__dict__)
        state.update(_host_table=None, _host_tau=None, _cache=None, _values=None, _tail=None, _launch=None,
                     _partials=None, _made_for=None, _idle_for=None,
                     _made_once=None)  # fmt: skip
        state.update(last_soft=None, _home=None, _held=None)
        return state

    @staticmethod
    def _stamp(*tensors: torch.Tensor) -> tuple:
        """What identifies tensors' contents without reading them: each tensor (weakly: an id could be reused by a new
        tensor) and its in-place write count."""
        return tuple((weakref.ref(t), t._version) for t in tensors)

    @staticmethod
    def _current(stamp: tuple, *tensors: torch.Tensor) -> bool:
        if len(stamp) != len(tensors):
            return False
        return all(ref() is t and v == t._version for (ref, v), t in zip(stamp, tensors, strict=True))

    def host_table(self) -> tuple[list[float], list[float]]:
        """The (bits, tau) table on the host, read from the device only when the table changed since the last read
        (a new tensor, or an in-place write: ``load_state_dict``, :meth:`fit_thresholds`): switching budgets then
        costs no device synchronisation."""
        kept = self._host_table
        if kept is None or not self._current(kept[0], self.bits_table, self.tau_table):
            b, t = torch.stack([self.bits_table, self.tau_table]).detach().double().cpu().tolist()
            kept = self._host_table = (self._stamp(self.bits_table, self.tau_table), (b, t))
        return kept[1]

    def tau_value(self) -> float:
        """``float(self.tau)``, without a device synchronisation when :meth:`set_budget` wrote it last."""
        kept = self._host_tau
        if kept is None or not self._current(kept[0], self.tau):
            kept = self._host_tau = (self._stamp(self.tau), float(self.tau))
        return kept[1]

    def set_budget(self, avg_bits: float) -> None:
        lo, hi = self.slice_bits[0], sum(self.slice_bits)
        if not lo <= avg_bits <= hi:
            raise ValueError(f"budget {avg_bits} bits is outside this router's range [{lo}, {hi}]")
        if not self.calibrated:
            raise RuntimeError("router thresholds are not calibrated: call calibrate_thresholds(model, inputs) first")
        value = interp_values(*self.host_table(), avg_bits)
        self.tau.fill_(value)
        held = float(torch.tensor(value, dtype=self.tau.dtype))  # what tau holds: rounded to its dtype
        self._host_tau = (self._stamp(self.tau), held)
        self._cache = None
        self.fixed = False


def budget_bits(soft_gates: torch.Tensor, slice_bits: Sequence[int]) -> torch.Tensor:
    """Mean code width implied by (soft) nested gates ``[..., K-1]``: ``b_1 + sum_e b_e mean(m_e)``."""
    w = torch.tensor(slice_bits[1:], dtype=soft_gates.dtype, device=soft_gates.device)
    return slice_bits[0] + (soft_gates.reshape(-1, len(slice_bits) - 1).mean(0) * w).sum()

"""Token generation for any patched Hugging Face causal LM: static KV cache, elastic budget per token.

    from mobiquant.tasks.decode import generate
    out = generate(model, "The capital of France is", 32, tokenizer=tok, budget=4.0)      # greedy at 4 bits
    out = generate(model, ids, 64, budget=[2.0] * 32 + [6.0] * 32, temperature=0.8, top_k=50, seed=0)
    out.tokens, out.text, out.tokens_per_s

The prompt is prefilled in ONE forward pass into a transformers ``StaticCache``; every later token is one
forward of one position. ``budget`` may change between tokens (a per-step list, or a callable of the
step): a change writes router thresholds (and linears' own thresholds) on the device, so on CUDA one
captured decode step (a CUDA graph, in the spirit of gpt-fast) serves every budget; it is re-captured
only when the model's structure changes (static ``k`` of a model without routers). Greedy (temperature 0)
or sampled (temperature, top-k, seeded generator) tokens.

``task=decode`` (:func:`run`) times this for a saved checkpoint or a freshly calibrated ``quant`` at each
budget of ``decode.budgets`` (and the unquantized model) and writes ``decode.csv``.
"""

from __future__ import annotations

import contextlib
import gc
import inspect
import logging
import math
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn as nn

from ..nn.lean import rope_in_launch
from ..patching import (
    achieved_bits,
    budget_plan,
    fuse_inputs,
    lean_step,
    mobi_linears,
    reset_counts,
    routers,
    set_budget,
    set_small_config,
    set_static,
    static_k_for_bits,
)

log = logging.getLogger("mobiquant")

GRAPH_MODES = ("auto", "graph", "compile", "off")
Budget = float | Sequence[float] | Callable[[int], float | None] | None


@dataclass
class Generation:
    """What :func:`generate` produced and how long it took."""

    tokens: torch.Tensor  # [batch, new] generated ids (CPU)
    prompt_tokens: int
    text: list[str] | None  # one string per row when a tokenizer was given
    prefill_s: float  # prompt forward and first token
    decode_s: float  # the timed decode steps (capture and its check excluded)
    timed_tokens: int  # tokens produced in decode_s (all rows)
    budgets: list[float | None]  # the budget in force for each new token (index 0: the prefill)
    achieved_bits: list[float] | None = None  # per new token, when track_bits
    graph: str = "off"  # 'off', 'graph', 'compile', or why the graph was not used
    captures: int = 0
    extra: dict = field(default_factory=dict)  # "routing": budget -> BudgetControl.routing() (models with routers)

    @property
    def new_tokens(self) -> int:
        return int(self.tokens.shape[1])

    @property
    def tokens_per_s(self) -> float:
        return self.timed_tokens / self.decode_s if self.decode_s > 0 and self.timed_tokens else math.nan

    @property
    def us_per_token(self) -> float:
        """Microseconds per decode step (one token per row)."""
        rows = max(int(self.tokens.shape[0]), 1)
        return 1e6 * self.decode_s * rows / self.timed_tokens if self.timed_tokens else math.nan


# ------------------------------------------------------------------------------------------ budgets
_CONTROL_ATTR = "_mobiquant_budget_control"  # BudgetControl.of keeps the model's control here


class BudgetControl:
    """Switches a model between budgets by writing thresholds on the device.

    Where every linear of one launch (a site group's members, or a linear alone) has a threshold that decides for
    every token whatever its scores, the same view for all (:meth:`TokenRouter.constant_k`: with the adjacent
    policy, thresholds between two slices' bands), they decode that budget as the static view: the same slices for
    every token, on the static views' kernels (with one router a block, its o, gate/up and down launches so each,
    whatever the block's other launches do). Linears of one launch fixed at different views (q, k and v at 3, 4 and
    4 bits) stay routed, one site launch for them where static views would take a launch each; where every linear
    of a router is fixed, its router does not run (``TokenRouter.fixed``: constant gate values that give each
    threshold its fixed view). Otherwise the router runs for the linears its scores decide. Such budgets change
    which linears are routed and which routers run, so a graph is captured per such structure.

    The first time a budget is asked for, :func:`mobiquant.patching.set_budget` (or ``set_static`` for a
    model without routers) sets it the library's way; the resulting state (every router's ``tau``, every
    linear's mode, static ``k`` and own threshold ``route_tau``) is kept as a snapshot. Later switches
    copy the snapshot's thresholds into the live device tensors with one fused copy (no host
    synchronisation), so a captured graph reads them. A linear that has its own threshold at any budget
    gets a device tensor for it at every budget (at a budget where it has none, the router's threshold:
    the same decisions)."""

    def __init__(self, model: nn.Module):
        self.model = model
        self.cfg = getattr(model, "mobiquant_config", None)
        self.routers = [r for _, r in routers(model)]
        self.linears = [m for _, m in mobi_linears(model)]
        self._snaps: dict[float, dict] = {}
        self._holders: dict[int, torch.Tensor] = {}  # linear index -> its route_tau device tensor
        self._structure: tuple | None = None
        self._applied: float | None = None  # the budget the live tensors hold (a repeat of it is free)
        self._basis = self._snapshot_basis()

    def _snapshot_basis(self) -> tuple:
        """What the snapshots are made of: the model's configuration and budget plan (objects), each router's table
        (its host copy, a new object whenever the table changes), gate policy and device (the snapshots' thresholds
        live on it)."""
        objects = (getattr(self.model, "mobiquant_config", None), budget_plan(self.model))
        return (*objects, *(r.host_table() for r in self.routers)), [(r.policy, r.tau.device) for r in self.routers]

    @classmethod
    def of(cls, model: nn.Module) -> BudgetControl:
        """The model's control, kept between generations while what its snapshots are made of is unchanged (the
        configuration, the plan and every router's table: a budget's first use then costs no host work in a later
        generation); otherwise a new one. Either way every budget is applied again at its next use: thresholds and
        modes may have been set another way in between (``set_budget``, ``set_static``)."""
        kept = model.__dict__.get(_CONTROL_ATTR)
        if kept is not None and kept.model is model:
            (objects, values), (was_objects, was_values) = kept._snapshot_basis(), kept._basis
            if values == was_values and all(a is b for a, b in zip(objects, was_objects, strict=True)):
                kept._applied, kept._structure = None, None
                return kept
        control = model.__dict__[_CONTROL_ATTR] = cls(model)
        return control

    @staticmethod
    def forget(model: nn.Module) -> None:
        """Drop the control :meth:`of` keeps with ``model``: the next generation snapshots every budget anew (after a
        change the snapshots cannot see, e.g. a linear or router replaced under the same configuration)."""
        model.__dict__.pop(_CONTROL_ATTR, None)

    @property
    def quantized(self) -> bool:
        return bool(self.linears)

    def check(self, budget: float | None) -> None:
        if budget is None:
            return
        if isinstance(budget, bool) or not isinstance(budget, (int, float)) or not math.isfinite(budget):
            raise ValueError(f"budget must be a finite number of average bits or None, got {budget!r}")
        if not self.quantized or self.cfg is None:
            raise ValueError("this model has no MoBiQuant linears: its budget must be None")
        if self.routers:
            lo, hi = self.cfg.min_bits, self.cfg.max_bits
            if not lo <= budget <= hi:
                raise ValueError(
                    f"budget {budget:g} is outside this model's range [{lo:g}, {hi:g}] bits "
                    f"(slices {list(self.cfg.slice_bits)})"
                )
        elif static_k_for_bits(self.cfg, budget) is None:
            views = list(self.cfg.view_bits)
            raise ValueError(f"budget {budget:g} is not a static view of this model (no routers): one of {views}")

    def _snapshot(self, budget: float) -> dict:
        if self.routers:
            set_budget(self.model, budget)
        else:
            set_static(self.model, static_k_for_bits(self.cfg, budget))
        taus = [r.tau.detach().clone() for r in self.routers]
        lin = []
        fixed: dict[int, list[int | None]] = {}  # router -> the view its linears' thresholds fix (None: routed)
        for m in self.linears:
            t = m.route_tau
            k_fixed = pair = None
            if m.mode == "routed" and m.router is not None:  # read on the host before it moves (no device sync)
                tau = m.router.tau_value() if t is None else float(t)
                k_fixed = m.router.constant_k(tau)
                pair = m.router.adjacent_view(tau) if k_fixed is None else None
                fixed.setdefault(id(m.router), []).append(k_fixed)
            if t is not None:
                dev = m.router.tau.device if m.router is not None else torch.device("cpu")
                t = torch.as_tensor(t).detach().to(device=dev, dtype=torch.float32).clone()
            lin.append((m.mode, m.static_k, t, k_fixed, pair))
        k_of = {id(m): entry[3] for m, entry in zip(self.linears, lin, strict=True)}
        for i, m in enumerate(self.linears):  # a launch's linears all fixed at one view: that static view
            views = [k_of.get(id(x)) for x in _launch_members(m)] if m.mode == "routed" else [None]
            if views[0] is not None and views.count(views[0]) == len(views):
                lin[i] = ("static", views[0], lin[i][2], None, None)
        # fixed at different views: the router's decisions are constants (adjacent policy: band midpoints)
        held = [r.policy == "adjacent" and None not in fixed.get(id(r), [None]) for r in self.routers]
        return {"taus": taus, "linears": lin, "fixed": held}

    def apply(self, budget: float | None) -> None:
        if budget is None:
            return
        budget = float(budget)
        if budget == self._applied:  # every decode step sets its budget: a repeat costs no host work
            return
        self._structure = None
        snap = self._snaps.get(budget)
        if snap is None:
            snap = self._snaps[budget] = self._snapshot(budget)
        dst, src = [], []
        if self.routers:
            dst += [r.tau for r in self.routers]
            src += snap["taus"]
        for i, (m, (mode, k, own, k_fixed, pair)) in enumerate(zip(self.linears, snap["linears"], strict=False)):
            # plain attributes, written to the instance dict: nn.Module.__setattr__ (its checks for parameters,
            # buffers and modules) cost about as much as the rest of a budget's application, paid again at each
            # generation's first step, inside its time to first token
            d = m.__dict__
            d["mode"], d["static_k"], d["fixed_k"] = mode, k, k_fixed  # fixed_k: the view this linear's threshold fixes
            d["pair_k"] = pair  # the lower of the two views the tokens choose from (adjacent policy), or None
            holder = self._holders.get(i)
            if own is None and holder is None:
                d["route_tau"] = None
                continue
            if holder is None:
                dev = m.router.tau.device if m.router is not None else own.device
                holder = self._holders[i] = torch.zeros((), dtype=torch.float32, device=dev)
            d["route_tau"] = holder
            dst.append(holder)
            src.append(own if own is not None else snap["taus"][self._router_index(m)])
        if dst:
            with torch.no_grad():
                torch._foreach_copy_(dst, src)
        for r, held in zip(self.routers, snap["fixed"], strict=True):
            r._cache = None
            r.fixed = held
        self._applied = budget

    def routing(self) -> dict[str, int]:
        """How the budget applied last decodes: routed linears (those with a router), those decoded as static views,
        routers, those fixed (their linears routed at views their thresholds fix; no launch), and those that run."""
        routed = [m for m in self.linears if m.router is not None]
        return dict(
            routed_linears=len(routed),
            static_linears=sum(m.mode == "static" for m in routed),
            routers=len(self.routers),
            routers_fixed=len({id(m.router) for m in routed if m.mode == "routed" and m.router.fixed}),
            routers_run=len({id(m.router) for m in routed if m.mode == "routed" and not m.router.fixed}),
        )

    def _router_index(self, m) -> int:
        for j, r in enumerate(self.routers):
            if r is m.router:
                return j
        raise RuntimeError("a routed linear's router is not part of the model")

    def structure(self) -> tuple:
        """What a captured graph depends on beyond device tensors: modes, static k, own thresholds, and where the
        one-bit plane kernel compiles a routed linear's two views alone (``SmallConfig.span_bodies``) its pair
        (computed again only after a budget change: the per-token host work of a graph replay stays small)."""
        if self._structure is None:
            from ..kernels import spans

            self._structure = tuple(
                (
                    m.mode,
                    m.static_k if m.mode == "static" else 0,
                    m.route_tau is not None,
                    m.pair_k if m.mode == "routed" and spans(getattr(m, "small_config", None)) else None,
                )
                for m in self.linears
            ) + tuple(r.fixed for r in self.routers)
        return self._structure


def _launch_members(m: nn.Module) -> list:
    """The linears of ``m``'s one-token launch: its site group's members (``patching.fuse_sites``), or ``m`` alone."""
    group = getattr(m, "_site_group", None)
    return list(group.members) if group is not None else [m]


def _budget_fn(budget: Budget, n: int) -> Callable[[int], float | None]:
    if budget is None or isinstance(budget, (int, float)) and not isinstance(budget, bool):
        return lambda i: budget if i == 0 else None
    if callable(budget):
        return budget
    if isinstance(budget, (str, bytes)) or not isinstance(budget, Sequence):
        raise ValueError(f"budget must be a number, a per-step list, a callable or None, got {type(budget).__name__}")
    if len(budget) != n:
        raise ValueError(f"a per-step budget list needs one entry per new token: {len(budget)} for max_new_tokens={n}")
    steps = list(budget)
    return lambda i: steps[i]


# ------------------------------------------------------------------------------------------ model calls
def _forward_kwargs(model: nn.Module) -> tuple[str, str | None]:
    """The cache keyword of ``model.forward`` (``cache`` in newer transformers) and the logits-trimming one."""
    params = inspect.signature(model.forward).parameters
    cache_kw = "cache" if "cache" in params else "past_key_values"
    keep = (
        "logits_to_keep"
        if "logits_to_keep" in params
        else ("num_logits_to_keep" if "num_logits_to_keep" in params else None)
    )
    return cache_kw, keep


def _pick(logits: torch.Tensor, temperature: float, top_k: int | None, gen: torch.Generator | None) -> torch.Tensor:
    """Next token per row from last-position logits ``[batch, vocab]``."""
    if temperature <= 0:
        return logits.argmax(-1)
    z = logits.float() / temperature
    if top_k is not None and top_k < z.shape[-1]:
        kth = torch.topk(z, top_k, dim=-1).values[..., -1:]
        z = z.masked_fill(z < kth, float("-inf"))
    probs = torch.softmax(z, dim=-1)
    return torch.multinomial(probs, 1, generator=gen).squeeze(-1)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class _CacheOffsets:
    """Where each layer of the static cache writes next.

    transformers 5 (5.17, 5.24) does not write a step's keys and values at the ``cache_position`` it is handed:
    every ``StaticLayer`` keeps its own write offset (``cumulative_length``, a 0-dim device tensor), advances it
    in place by the tokens of each forward, and derives the positions (RoPE, causal mask) from it too. So every
    forward through the cache takes a new slot, also one that is not a decode step (the two warm-up runs before
    a capture, the first replay, its eager check): without a rewind, a capture attempt leaves the cache three
    positions ahead of the tokens fed, and the decode steps after it write past ``max_cache_len``
    (``index_copy_(): index out of bounds``). :meth:`save` and :meth:`restore` put the offsets back in place
    (the same tensors: a captured graph reads and advances these). Older caches that write at
    ``cache_position`` have no offsets: both are no-ops there."""

    TENSORS = ("cumulative_length", "indexer_cumulative_length")
    HOST = ("cumulative_length_int",)  # sliding-window layers: positions a captured graph cannot advance

    def __init__(self, cache):
        self.layers = list(getattr(cache, "layers", None) or [])

    def tensors(self) -> list[torch.Tensor]:
        return [t for layer in self.layers for a in self.TENSORS if torch.is_tensor(t := getattr(layer, a, None))]

    def not_rewindable(self) -> str | None:
        """Why a forward through this cache cannot be undone by :meth:`restore` (so no capture is tried)."""
        if any(isinstance(getattr(layer, a, None), int) for layer in self.layers for a in self.TENSORS + self.HOST):
            return "the static cache keeps positions on the host (sliding-window layers)"
        if any(c.__name__ == "LinearAttentionCacheLayerMixin" for layer in self.layers for c in type(layer).__mro__):
            return "the cache holds recurrent states (linear-attention layers)"
        return None

    def save(self) -> tuple[list[torch.Tensor], list[tuple[Any, str, int]]]:
        dev = [t.clone() for t in self.tensors()]
        host = [
            (layer, a, v)
            for layer in self.layers
            for a in self.TENSORS + self.HOST
            if isinstance(v := getattr(layer, a, None), int)
        ]
        return dev, host

    def restore(self, saved) -> None:
        dev, host = saved
        live = self.tensors()
        if len(live) != len(dev):
            raise RuntimeError("the static cache's layers changed during a decode step")
        if live:
            torch._foreach_copy_(live, dev)
        for layer, a, v in host:
            setattr(layer, a, v)

    def values(self) -> list[int]:
        """The offset of every layer that the model wrote (a host synchronisation)."""
        used = [layer for layer in self.layers if getattr(layer, "is_initialized", True)]
        dev = [t for layer in used for a in self.TENSORS if torch.is_tensor(t := getattr(layer, a, None))]
        host = [v for layer in used for a in self.TENSORS + self.HOST if isinstance(v := getattr(layer, a, None), int)]
        return (torch.stack([t.reshape(()) for t in dev]).tolist() if dev else []) + host

    def check(self, expected: int, when: str) -> None:
        """Raise if some layer's write offset is not ``expected`` (tokens fed so far)."""
        bad = sorted({v for v in self.values() if v != expected})
        if bad:
            raise RuntimeError(
                f"mobiquant.tasks.decode: the static cache's write offset is {bad} {when}, expected "
                f"{expected} (tokens fed so far): a forward outside the decode steps moved it"
            )


# The first replay of a captured step is checked against an eager forward of the same position. Bit equality (or
# a tolerance of 1e-3 absolute) is the wrong test: the graph and the eager forward may run different kernels
# (cuBLAS picks algorithms per stream and workspace, TF32 for float32 matmuls, split-K reductions in another
# order), so logits differ by a few units in the last place of their largest values, and fp16 logits of a few
# units have ulps of 2e-3 and more. What a faulty capture produces -- a wrong position or cache slot, stale router
# thresholds, a host value baked into the graph -- moves logits by a sizeable part of their own scale (a step
# two positions off moved the tiny test model's by 4 %, a large model's by far more) and changes greedy tokens.
# So: the largest difference must stay below REPLAY_RTOL (at least 4 ulp of the logits' dtype: 3 % for bfloat16)
# times the largest |eager logit|, and the greedy token must agree in every row unless the eager logits of the
# two tokens are within that tolerance (a near tie that such noise can flip).
REPLAY_RTOL = 2e-2


def _replay_mismatch(got: torch.Tensor, ref: torch.Tensor) -> str | None:
    """Why the graph's logits ``got`` are not those of the eager forward ``ref`` (``[batch, vocab]``), or None."""
    rtol = max(REPLAY_RTOL, 4 * torch.finfo(ref.dtype).eps) if ref.is_floating_point() else REPLAY_RTOL
    g, r = got.float(), ref.float()
    finite = torch.isfinite(r)
    if not torch.equal(torch.isfinite(g), finite):
        return "a graph replay gave non-finite logits where the eager forward's are finite, or the reverse"
    g, r = g.where(finite, 0.0), r.where(finite, 0.0)
    scale = float(r.abs().amax())
    tol = rtol * max(scale, torch.finfo(torch.float32).tiny)
    err = float((g - r).abs().amax())
    if err > tol:
        return (
            f"a graph replay differed from the eager forward: max |logit difference| {err:.4g} > {tol:.4g} "
            f"({rtol:g} x max |logit| {scale:.4g})"
        )
    top_g, top_r = g.argmax(-1), r.argmax(-1)
    lead = r.gather(-1, top_r[:, None]) - r.gather(-1, top_g[:, None])
    flipped = ((top_g != top_r) & (lead.squeeze(-1) > tol)).nonzero().flatten().tolist()
    if flipped:
        return (
            f"a graph replay picked another greedy token than the eager forward in rows {flipped} "
            f"(eager leads by more than {tol:.4g})"
        )
    return None


def _compiled_step(step, model: nn.Module):
    """``step`` compiled by ``torch.compile`` (Inductor, no CUDA graphs of its own): the code between the package's
    kernels (norms, rotary embedding, the cache update, attention, residual sums) fused into few kernels; the
    package's modules stay opaque (``torch.compiler.disable`` on them: Inductor cannot take their Triton launches).
    A frame compiles once per layer where Dynamo specialises on the layer's index, and again for each state its
    guards see change (a profiler, the inputs fused or not): the recompile limit is raised to 8 entries a layer.
    At 2 a layer (before) a profiled SmolLM2-135M step ran the glue of its last layers eagerly on an H200 (Dynamo's
    limit warning, 68 entries): hitting the limit is silent but for that warning, and slow."""
    import torch._dynamo

    layers = int(getattr(getattr(model, "config", None), "num_hidden_layers", 0) or 0)
    cfg = torch._dynamo.config
    name = "recompile_limit" if hasattr(cfg, "recompile_limit") else "cache_size_limit"
    setattr(cfg, name, max(getattr(cfg, name), 8 * layers + 16))
    if hasattr(cfg, "accumulated_recompile_limit"):  # the same entries counted over every frame
        cfg.accumulated_recompile_limit = max(cfg.accumulated_recompile_limit, 32 * layers + 64)
    return torch.compile(step, dynamic=False)


#: Greedy decoding picks each token inside the captured step (:class:`_Stepper`'s ``greedy``); off: the argmax after
#: each replay, launched eagerly (the behaviour before; ``benchmarks/decode_bench.py --pick-outside`` times both)
PICK_IN_GRAPH = True

#: With the pick inside (and no ``eos_token_id``), the captured step also writes its token into the next step's input
#: and advances the position (:class:`_Stepper`'s ``feed``), so a replay follows a replay with no copy launched
#: between them; off until timed (``benchmarks/pick_ab.py --feed`` times both)
FEED_IN_GRAPH = False

#: The lean attention launches make the rotary embedding's cos and sin from the cache's write offset while
#: :func:`generate` decodes (every row's position is that offset there), so the compiled step drops the model's own
#: rotary kernels (``mobiquant.nn.lean.ROPE_FROM_OFFSET``); off until timed (``benchmarks/pick_ab.py --rope``)
ROPE_IN_LAUNCH = False


def _split(out) -> tuple[torch.Tensor, torch.Tensor | None]:
    """A step's output as ``(logits, greedy token or None)`` (a step that picks returns both)."""
    return (out[0], out[1]) if isinstance(out, tuple) else (out, None)


class _Stepper:
    """One decode position: eager, a captured CUDA graph, or that graph of a step compiled by ``torch.compile``
    between the package's kernels (``compile``; on the CPU compiled, not captured).

    ``greedy``: the captured or compiled step also picks the greedy token (its ``argmax`` in the graph; the token
    is then :attr:`picked`), so a replayed step launches nothing outside its graph for the pick and its logits are
    not copied out (they stay the graph's buffer: valid until the next step). ``feed`` (with ``greedy``): the step
    also copies that token into its own input and advances its position, so the next step fed :attr:`picked` at the
    next position launches no copy before its replay (:attr:`fed_at`: the position the inputs hold so, or None)."""

    def __init__(
        self,
        model,
        cache,
        cache_kw: str,
        device: torch.device,
        batch: int,
        mode: str,
        cache_len: int | None = None,
        fallback: str | None = None,
        greedy: bool = False,
        feed: bool = False,
    ):
        self.model, self.cache, self.cache_kw, self.device, self.mode = model, cache, cache_kw, device, mode
        self.fallback = fallback  # the mode to capture with when a compiled capture fails ('auto' on CUDA)
        self.cache_len = cache_len
        self.offsets = _CacheOffsets(cache)
        self.ids = torch.zeros(batch, 1, dtype=torch.long, device=device)
        self.pos = torch.zeros(1, dtype=torch.long, device=device)
        # key -> (graph, its output: the logits, or with ``greedy`` the logits and the picked token)
        self.graphs: dict[tuple, tuple[torch.cuda.CUDAGraph, Any]] = {}
        self.captures = 0
        self.status = mode
        self.greedy = bool(greedy)
        self.feed = self.greedy and bool(feed)
        self.picked: torch.Tensor | None = None  # the last step's greedy token where the step picked it
        self.fed_at: int | None = None  # the position whose token the last step wrote into ids (and pos)
        self._forward = self._step_fn()
        if mode == "compile":
            self._forward = _compiled_step(self._forward, model)
        self._compiled: set[tuple] = set()  # compiled-only (CPU): the states whose compiled step has run
        self._warmed: set[tuple] = set()  # ... and those whose step ran eagerly first

    def _model_step(self, ids: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        out = self.model(input_ids=ids, **{self.cache_kw: self.cache}, cache_position=pos, use_cache=True)
        return out.logits[:, -1]

    def _picked_step(self, ids: torch.Tensor, pos: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = self._model_step(ids, pos)
        return logits, logits.argmax(-1)

    def _fed_step(self, ids: torch.Tensor, pos: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits, tok = self._picked_step(ids, pos)
        ids.copy_(tok.view(-1, 1))  # the next step's input, written by this step
        pos.add_(1)
        return logits, tok

    def _step_fn(self):
        """The forward a captured or compiled step runs: with :attr:`greedy` the pick too, with :attr:`feed` the
        next step's input as well."""
        if not (self.greedy and self.mode in ("graph", "compile")):
            return self._model_step
        return self._fed_step if self.feed else self._picked_step

    def _inputs(self, saved: tuple[torch.Tensor, torch.Tensor] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """A copy of the step's inputs (token, position), or with ``saved`` those put back (a feeding step writes
        them; every warm-up, capture check and reference forward starts from the same ones)."""
        if saved is not None:
            self.ids.copy_(saved[0])
            self.pos.copy_(saved[1])
        return self.ids.clone(), self.pos.clone()

    def _eager(self, ids: torch.Tensor, pos: torch.Tensor) -> Any:
        """One forward of the step: the model's own, or with ``compile`` the one whose code between the package's
        kernels Inductor compiled (the graph captures and checks this one)."""
        return self._forward(ids, pos)

    def eager(self, tok: torch.Tensor, pos: int) -> torch.Tensor:
        self.ids.copy_(tok.view(-1, 1))
        self.pos.fill_(pos)
        return self._eager(self.ids, self.pos)

    def clear_routers(self) -> None:
        """Around a capture: no router decision kept from another input (a router fixed by the budget stays fixed)."""
        for r in (r for _, r in routers(self.model)):
            r.clear_cache()

    def _warm_up(self, saved, runs: int = 2) -> None:
        """Forwards of the step before its capture (kernels compile, allocations settle). Each starts from the
        cache offsets ``saved`` and so writes the step's own slot; the offsets are back at ``saved`` after."""
        inputs = self._inputs()
        for _ in range(runs):
            self.offsets.restore(saved)
            self._inputs(inputs)
            self._eager(self.ids, self.pos)
        self.offsets.restore(saved)
        self._inputs(inputs)

    def _capture(self, saved) -> tuple[torch.cuda.CUDAGraph, torch.Tensor]:
        """Warm up on a side stream, then capture; the cache offsets are at ``saved`` when it returns."""
        self.clear_routers()
        s = torch.cuda.Stream(self.device)
        s.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(s):
            self._warm_up(saved)
        torch.cuda.current_stream(self.device).wait_stream(s)
        g = torch.cuda.CUDAGraph()
        # no automatic garbage collection while recording: a collection that frees an earlier graph (its
        # destructor calls the CUDA runtime) would invalidate the capture; torch.cuda.graph collects on entry
        collecting = gc.isenabled()
        gc.disable()
        try:
            with torch.cuda.graph(g):  # recorded, not run: the offsets do not move
                logits = self._eager(self.ids, self.pos)
        finally:
            if collecting:
                gc.enable()
        self.clear_routers()
        self.captures += 1
        return g, logits

    def _first_step(self, pos: int, key: tuple) -> torch.Tensor:
        """Capture the step for ``key``, replay it once and check the replay against an eager forward. Returns
        the eager forward's logits, so that whether the graph is kept or not, the cache and its offsets are
        exactly those of an eager step (the eager forward runs last, from the offsets the step began with)."""
        why = self.offsets.not_rewindable()
        if why is not None:
            self._give_up(f"{why}: a capture attempt could not be undone")
            return self._eager(self.ids, self.pos)
        saved = self.offsets.save()
        inputs = self._inputs()
        try:
            entry = self._capture(saved)
            entry[0].replay()
            got = _split(entry[1])[0].clone()
            self._inputs(inputs)  # a feeding replay wrote them
        except Exception as e:  # a forward that synchronises with the host cannot be captured
            _sync(self.device)
            self.offsets.restore(saved)
            self._inputs(inputs)
            why = (
                f"capture failed: {type(e).__name__}: {str(e).strip().splitlines()[0][:200]}"
                if str(e).strip()
                else f"capture failed: {type(e).__name__}"
            )
            if self._fall_back(why):
                return self._first_step(pos, key)
            self._give_up(why)
            return self._eager(self.ids, self.pos)
        self.offsets.restore(saved)
        ref = self._eager(self.ids, self.pos)
        why = _replay_mismatch(got, _split(ref)[0])
        if why is not None:
            if self._fall_back(why):
                self.offsets.restore(saved)  # the retry writes this step's slot again
                self._inputs(inputs)
                return self._first_step(pos, key)
            self._give_up(why)
            return ref
        self.graphs[key] = entry
        return ref

    @property
    def _compiled_only(self) -> bool:
        """``compile`` off CUDA: the compiled step runs each time, no graph is captured."""
        return self.mode == "compile" and self.device.type != "cuda"

    def will_capture(self, key: tuple) -> bool:
        """Whether :meth:`step` with ``key`` captures (or compiles, or runs the eager step before a compile) instead
        of replaying."""
        if self._compiled_only:
            return key not in self._compiled
        return self.mode in ("graph", "compile") and key not in self.graphs

    def step(self, tok: torch.Tensor, pos: int, key: tuple) -> tuple[torch.Tensor, bool]:
        """Logits of position ``pos`` fed ``tok``; the flag says the step was a capture or its check (keep it
        out of the timing). :attr:`picked` is then the step's greedy token where the step picked it, else None."""
        logits, picked, untimed = self._step(tok, pos, key)
        self.picked = picked
        self.fed_at = pos + 1 if picked is not None and self.feed and self.mode != "off" else None
        return logits, untimed

    def _step(self, tok: torch.Tensor, pos: int, key: tuple) -> tuple[torch.Tensor, torch.Tensor | None, bool]:
        if self.cache_len is not None and not 0 <= pos < self.cache_len:
            raise ValueError(f"decode position {pos} is outside the static cache of {self.cache_len} positions")
        if self.mode == "off":
            return self.eager(tok, pos), None, False
        if not (self.fed_at == pos and tok is self.picked):  # else the step before wrote them
            self.ids.copy_(tok.view(-1, 1))
            self.pos.fill_(pos)
        if self._compiled_only:
            if key not in self._warmed:  # a new state: its first step eager, which builds what the traced forward
                self._warmed.add(key)  # reads and cannot build (MoBiLinear's int4 packs of the views now served)
                return self._model_step(self.ids, self.pos).clone(), None, True
            first = key not in self._compiled
            self._compiled.add(key)
            logits, picked = _split(self._eager(self.ids, self.pos))
            return logits.clone(), picked, first
        entry = self.graphs.get(key)
        if entry is None:
            return *_split(self._first_step(pos, key)), True
        entry[0].replay()
        logits, picked = _split(entry[1])
        return (logits, picked, False) if picked is not None else (logits.clone(), None, False)

    def close(self) -> None:
        """Free the captured graphs now, at a point where no capture is under way (left to the cyclic garbage
        collector, a graph could be freed during a later capture and break it)."""
        if self.graphs:
            _sync(self.device)
            self.graphs = {}

    def _fall_back(self, why: str) -> bool:
        """After a failed compiled capture, switch to the fallback mode (the model's own step captured) if there
        is one; the caller then tries again."""
        if self.mode != "compile" or self.fallback is None:
            return False
        warnings.warn(
            f"mobiquant.tasks.decode: compiled decode step not used ({why}); capturing the model's own step "
            f"({self.fallback!r})",
            stacklevel=5,
        )
        self.mode, self.status, self.fallback, self.graphs = self.fallback, self.fallback, None, {}
        self._forward = self._step_fn()
        return True

    def _give_up(self, why: str) -> None:
        warnings.warn(f"mobiquant.tasks.decode: CUDA graph not used ({why}); decoding eagerly", stacklevel=4)
        self.mode, self.status, self.graphs = "off", why, {}
        self._forward = self._model_step  # the model's own forward from here on


# ------------------------------------------------------------------------------------------ generate
def _prompt_ids(prompt, tokenizer, device: torch.device) -> torch.Tensor:
    if isinstance(prompt, str):
        if tokenizer is None:
            raise ValueError("a text prompt needs a tokenizer (tokenizer=...); or pass token ids")
        ids = tokenizer(prompt, return_tensors="pt").input_ids
    elif torch.is_tensor(prompt):
        ids = prompt
    elif isinstance(prompt, Sequence) and all(isinstance(t, int) for t in prompt):
        ids = torch.tensor(list(prompt), dtype=torch.long)
    else:
        raise ValueError("prompt must be a string, a list of token ids or a tensor of ids")
    if ids.dim() == 1:
        ids = ids.unsqueeze(0)
    if ids.dim() != 2 or ids.shape[1] == 0 or ids.dtype not in (torch.int32, torch.int64):
        raise ValueError(
            f"prompt ids must be a non-empty [tokens] or [batch, tokens] integer tensor, got "
            f"{tuple(ids.shape)} {ids.dtype}"
        )
    return ids.to(device=device, dtype=torch.long)


def _graph_mode(cuda_graph: str | bool, device: torch.device, track_bits: bool, linears) -> str:
    mode = {True: "graph", False: "off"}.get(cuda_graph, cuda_graph) if isinstance(cuda_graph, bool) else cuda_graph
    if mode not in GRAPH_MODES:
        raise ValueError(f"cuda_graph must be one of {GRAPH_MODES}, got {cuda_graph!r}")
    counting = track_bits or any(m.track for m in linears)
    if mode == "auto":  # the fastest measured on CUDA (docs/RESULTS.md "The compiled decode step")
        mode = "compile" if device.type == "cuda" and not counting else "off"
    if mode != "off":
        if device.type != "cuda" and mode != "compile":  # compile on the CPU: compiled, not captured
            raise ValueError(f"cuda_graph={mode!r} needs the model on a CUDA device (it is on {device})")
        if counting:
            raise ValueError(
                "slice counting (track_bits, MoBiLinear.track) synchronises with the host every "
                "step: use cuda_graph='off' with it"
            )
    return mode


@torch.no_grad()
def generate(
    model: nn.Module,
    prompt: str | Sequence[int] | torch.Tensor,
    max_new_tokens: int,
    *,
    tokenizer=None,
    budget: Budget = None,
    temperature: float = 0.0,
    top_k: int | None = None,
    seed: int | None = None,
    cache_len: int | None = None,
    cuda_graph: str | bool = "auto",
    eos_token_id: int | None = None,
    track_bits: bool = False,
) -> Generation:
    """Generate ``max_new_tokens`` tokens after ``prompt`` (text with ``tokenizer``, or ids ``[T]`` /
    ``[batch, T]``).

    ``budget``: average bits for every token (a number), one per new token (a list; entry 0 applies to the
    prefill, entry ``i`` to the forward that produces token ``i``), a callable ``step -> bits`` (``None``:
    keep), or ``None`` (the model as it is set). ``temperature`` 0: greedy; otherwise sampling, from the
    ``top_k`` most likely tokens when given, with a generator seeded by ``seed``. ``cache_len``: positions
    of the static cache (default prompt + new tokens - 1: the last token is never fed back). ``cuda_graph``:
    'auto' ('compile' on CUDA, falling back to 'graph' if the compiled capture fails; eager elsewhere and when
    slices are counted), 'graph' (the
    model's own step captured as one CUDA graph), 'compile' (the step's code between the package's kernels compiled
    by ``torch.compile``, then captured as one graph; on the CPU compiled only) or 'off'. A capture that fails, or
    whose first replay does not match an eager forward, falls back to eager decoding with a warning that says why.
    The first step of a new model (or shape) under 'compile' takes long: Inductor compiles every layer (about a
    minute for SmolLM2-135M on an H200); later generations reuse it.
    ``eos_token_id``: stop once every row has produced it (one host synchronisation per token).
    ``track_bits``: the achieved average bits of every new token (eager only)."""
    from transformers import StaticCache

    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be an integer >= 1, got {max_new_tokens!r}")
    if not (isinstance(temperature, (int, float)) and math.isfinite(temperature) and temperature >= 0):
        raise ValueError(f"temperature must be a finite number >= 0, got {temperature!r}")
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1):
        raise ValueError(f"top_k must be None or an integer >= 1, got {top_k!r}")
    device = next(model.parameters()).device
    ids = _prompt_ids(prompt, tokenizer, device)
    batch, T = ids.shape
    need = T + max_new_tokens - 1  # the last token is never fed back
    if cache_len is None:
        cache_len = need
    if isinstance(cache_len, bool) or not isinstance(cache_len, int) or cache_len < 1:
        raise ValueError(f"cache_len must be a positive integer, got {cache_len!r}")
    if need > cache_len:
        raise ValueError(
            f"prompt of {T} tokens + {max_new_tokens} new tokens needs {need} cache positions, "
            f"the cache holds {cache_len}"
        )
    control = BudgetControl.of(model)
    budget_at = _budget_fn(budget, max_new_tokens)
    if not callable(budget) and budget is not None:  # every budget checked before any work
        for i in range(max_new_tokens):
            control.check(budget_at(i))
    mode = _graph_mode(cuda_graph, device, track_bits, control.linears)
    gen = None
    if temperature > 0:
        gen = torch.Generator(device=device)
        gen.manual_seed(int(seed) if seed is not None else int(torch.randint(0, 2**62, ()).item()))
    cache_kw, keep_kw = _forward_kwargs(model)
    cache = StaticCache(config=model.config, max_cache_len=cache_len)
    out = torch.empty(batch, max_new_tokens, dtype=torch.long, device=device)
    used: list[float | None] = []
    routing: dict[float, dict[str, int]] = {}  # budget -> BudgetControl.routing() there
    bits: list[float] | None = [] if track_bits else None
    current: float | None = None

    def set_step_budget(i: int) -> None:
        nonlocal current
        b = budget_at(i)
        if b is not None:
            control.check(b)
            control.apply(b)
            current = float(b)
            if control.routers and current not in routing:
                routing[current] = control.routing()
        used.append(current)
        if track_bits:
            reset_counts(model)

    def record_bits() -> None:
        if track_bits:
            bits.append(achieved_bits(model) if control.quantized else math.nan)
            reset_counts(model, track=False)

    was_training = model.training
    if any(m.training for m in model.modules()):  # eval() walks every module (thousands): only when needed
        model.eval()
    stepper: _Stepper | None = None
    rope_ctx = contextlib.ExitStack()
    try:
        _sync(device)
        t0 = time.perf_counter()
        set_step_budget(0)
        kw = {cache_kw: cache, "cache_position": torch.arange(T, device=device), "use_cache": True}
        if keep_kw is not None:
            kw[keep_kw] = 1
        logits = model(input_ids=ids, **kw).logits[:, -1]
        record_bits()
        tok = _pick(logits, temperature, top_k, gen)
        out[:, 0] = tok
        done = (tok == eos_token_id) if eos_token_id is not None else None
        _sync(device)
        prefill_s = time.perf_counter() - t0
        fallback = "graph" if cuda_graph == "auto" and mode == "compile" else None
        stepper = _Stepper(
            model,
            cache,
            cache_kw,
            device,
            batch,
            mode,
            cache_len,
            fallback,
            greedy=temperature <= 0 and PICK_IN_GRAPH,
            feed=FEED_IN_GRAPH and eos_token_id is None,
        )
        decode_s, timed, n = 0.0, 0, 1
        rope_ctx.enter_context(rope_in_launch(ROPE_IN_LAUNCH))  # left in the finally below
        seg_start, seg_tokens = time.perf_counter(), 0
        for i in range(1, max_new_tokens):
            if done is not None and bool(done.all()):
                break
            set_step_budget(i)
            key = control.structure()
            if stepper.will_capture(key):  # the timed segment ends before a capture and its check
                _sync(device)
                decode_s += time.perf_counter() - seg_start
                timed += seg_tokens
                seg_tokens = 0
            logits, untimed = stepper.step(tok, T + i - 1, key)
            if untimed:
                stepper.offsets.check(T + i, f"after the capture step of position {T + i - 1}")
            record_bits()
            tok = stepper.picked if stepper.picked is not None else _pick(logits, temperature, top_k, gen)
            if done is not None:
                tok = torch.where(done, torch.full_like(tok, eos_token_id), tok)
                done |= tok == eos_token_id
            out[:, i] = tok
            n = i + 1
            if untimed:
                _sync(device)
                seg_start = time.perf_counter()
            else:
                seg_tokens += batch
        _sync(device)
        decode_s += time.perf_counter() - seg_start
        timed += seg_tokens
        stepper.offsets.check(T + n - 1, f"after {n} new tokens of a {T}-token prompt")
    finally:
        rope_ctx.close()
        if was_training:
            model.train(True)
        for m in control.linears:
            m.fixed_k = m.pair_k = None
        for r in control.routers:  # the model as generate found it: every router runs at the budget it holds
            r.clear_cache()
            r.fixed = False
        if stepper is not None:
            stepper.close()
    tokens = out[:, :n].cpu()
    text = None
    if tokenizer is not None:
        text = [tokenizer.decode(row.tolist(), skip_special_tokens=True) for row in tokens]
    return Generation(
        tokens=tokens,
        prompt_tokens=T,
        text=text,
        prefill_s=prefill_s,
        decode_s=decode_s,
        timed_tokens=timed,
        budgets=used,
        achieved_bits=bits,
        graph=stepper.status,
        captures=stepper.captures,
        extra={"routing": routing} if routing else {},
    )


# ------------------------------------------------------------------------------------------ task=decode
def _decode_settings(cfg) -> dict[str, Any]:
    from omegaconf import ListConfig

    from .session import ConfigError, pos_int

    d = cfg.get("decode")
    if d is None:
        raise ConfigError("task=decode needs the `decode` config block (conf/decode/default.yaml)")
    prompt = d.get("prompt")
    if not isinstance(prompt, str) or not prompt:
        raise ConfigError(f"decode.prompt={prompt!r} must be a non-empty string")
    n = pos_int(d.get("max_new_tokens"), "decode.max_new_tokens")
    node = d.get("budgets")
    key = "decode.budgets"
    if node is None:
        node, key = cfg.budget.get("budgets"), "budget.budgets"
    if (
        not isinstance(node, (list, ListConfig))
        or not node
        or not all(isinstance(b, (int, float)) and not isinstance(b, bool) for b in node)
    ):
        raise ConfigError(f"{key}={node!r} must be a non-empty list of average bit-widths")
    temperature = d.get("temperature", 0.0)
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or temperature < 0:
        raise ConfigError(f"decode.temperature={temperature!r} must be a number >= 0 (0: greedy)")
    top_k = d.get("top_k")
    if top_k is not None:
        top_k = pos_int(top_k, "decode.top_k", "null or a positive integer")
    graph = d.get("cuda_graph", "auto")
    if graph not in GRAPH_MODES:
        raise ConfigError(f"decode.cuda_graph={graph!r} is invalid; allowed: {', '.join(GRAPH_MODES)}")
    repeats = pos_int(d.get("repeats", 1), "decode.repeats")
    fuse = d.get("fuse_inputs", True)
    if not isinstance(fuse, bool):
        raise ConfigError(f"decode.fuse_inputs={fuse!r} must be true or false")
    lean = d.get("lean_step", True)
    if not isinstance(lean, bool):
        raise ConfigError(f"decode.lean_step={lean!r} must be true or false")
    prologues = d.get("lean_prologues", True)
    if not isinstance(prologues, bool):
        raise ConfigError(f"decode.lean_prologues={prologues!r} must be true or false")
    prologues = prologues and lean  # the lean layer hands them over: nothing to make without it
    kernels = _kernel_settings(d.get("kernels"), ConfigError)
    return dict(
        prompt=prompt,
        max_new_tokens=n,
        budgets=[float(b) for b in node],
        temperature=float(temperature),
        top_k=top_k,
        seed=d.get("seed"),
        cuda_graph=graph,
        repeats=repeats,
        fp=bool(d.get("fp", True)),
        checkpoint=d.get("checkpoint"),
        fuse_inputs=fuse,
        lean_step=lean,
        lean_prologues=prologues,
        kernels=kernels,
    )


def _kernel_settings(node, error: type[Exception]) -> dict[str, Any]:
    """``decode.kernels``: fields of the one-token kernels' launch configuration
    (``mobiquant.kernels.triton_bitplane.SmallConfig``, e.g. ``{pdl: static, l2_prefetch: true}``); ``{}`` or null:
    the library's defaults. Checked here, so a sweep over them fails before any calibration."""
    import dataclasses

    from omegaconf import DictConfig, OmegaConf

    if node is None or (isinstance(node, (dict, DictConfig)) and not node):
        return {}
    if isinstance(node, DictConfig):
        node = OmegaConf.to_container(node)
    if not isinstance(node, dict):
        raise error(f"decode.kernels={node!r} must be a mapping of SmallConfig fields (or {{}})")
    from ..kernels.triton_bitplane import SmallConfig

    fields = {f.name: f for f in dataclasses.fields(SmallConfig)}
    unknown = sorted(set(node) - set(fields))
    if unknown:
        raise error(f"decode.kernels has unknown fields {unknown}; allowed: {', '.join(fields)}")
    for name, value in node.items():
        kind = str(fields[name].type)
        ok = value is None and "None" in kind
        ok = ok or (isinstance(value, bool) and "bool" in kind)
        ok = ok or (isinstance(value, int) and not isinstance(value, bool) and "int" in kind and value > 0)
        ok = ok or (isinstance(value, str) and "str" in kind)
        if not ok:
            raise error(f"decode.kernels.{name}={value!r} must be of type {kind} (numbers positive)")
    try:
        SmallConfig(**node)  # the values' own checks (e.g. pdl: true, false or 'static')
    except ValueError as e:
        raise error(f"decode.kernels: {e}") from None
    return dict(node)


def _bits_on(model: nn.Module, tokens: torch.Tensor) -> float:
    """Achieved average bits of the model's current setting on ``tokens`` (one tracked forward)."""
    if not any(True for _ in mobi_linears(model)):
        return 16.0 if next(model.parameters()).dtype in (torch.float16, torch.bfloat16) else 32.0
    device = next(model.parameters()).device
    reset_counts(model)
    try:
        with torch.no_grad():
            model(input_ids=tokens.to(device), use_cache=False)
        return achieved_bits(model)
    finally:
        reset_counts(model, track=False)


def run(cfg) -> float:
    """``task=decode``: tokens/s of the quantized model at every budget (and of the unquantized model),
    written to ``decode.csv`` with the generated text; returns the mean tokens/s of the quantized model."""
    import copy
    from pathlib import Path

    import pandas as pd

    from ..io.checkpoint import CheckpointError, load_quantized
    from ..io.results import write_csv
    from .session import ConfigError, checkpoint_serving, open_session, validate

    def check(cfg) -> tuple[dict[str, Any], Any, Path | None]:
        s = _decode_settings(cfg)
        methods, _ = validate(cfg)
        folder = Path(str(s["checkpoint"])) if s["checkpoint"] else None
        main = methods[0]
        if folder is not None:
            checkpoint_serving(folder, s["budgets"], "decode.checkpoint")
        else:
            served = main.budgets(s["budgets"])
            missing = [b for b in s["budgets"] if not any(abs(b - x) < 1e-6 for x in served)]
            if missing:
                raise ConfigError(f"decode.budgets {missing} are not served by quant={main.name}")
        return s, main, folder

    with open_session(cfg, "decode", check=check) as ses:
        s, main, folder = ses.checked
        rows: list[dict] = []
        base, tokenizer = ses.load()
        out_dir, tracker = ses.out_dir, ses.tracker
        device = next(base.parameters()).device
        dtype = next(base.parameters()).dtype
        if device.type == "cpu" and dtype != torch.bfloat16:
            log.info(
                "decode on the CPU in %s: packed views run as dense matmuls; in bf16 (model.dtype=bfloat16) they run "
                "as int4 matmuls, 1.6-1.9x the FP model at 3-4 bits on 2 cores (docs/RESULTS.md 'Decode on the CPU')",
                str(dtype).removeprefix("torch."),
            )

        def variants():
            if s["fp"]:
                yield "fp", math.nan, base
            if folder is not None:
                model = copy.deepcopy(base)
                try:
                    load_quantized(model, folder)
                except CheckpointError as e:
                    raise ConfigError(f"decode.checkpoint: {e}") from e
                for b in s["budgets"]:
                    yield folder.name, b, model
                return
            for v in main.run(ses.context(), s["budgets"]):
                if any(abs(v.budget - b) < 1e-6 for b in s["budgets"]):
                    yield v.method, v.budget, v.model

        for method, budget, model in variants():
            model.to(device)
            ses.use_backend(model)
            # every row: a method may hand back the same model with other modules in it; a 4-token trace each
            fuse_inputs(model, enable=s["fuse_inputs"])  # the fp model too: its rows time the same kernels
            lean_step(model, enable=s["lean_step"], prologues=s["lean_prologues"])
            if s["kernels"] and method != "fp":
                from ..kernels.triton_bitplane import SmallConfig

                set_small_config(model, SmallConfig(**s["kernels"]))
            kw = dict(
                tokenizer=tokenizer,
                temperature=s["temperature"],
                top_k=s["top_k"],
                seed=s["seed"],
                cuda_graph=s["cuda_graph"],
            )
            b = None if math.isnan(budget) else budget
            generate(model, s["prompt"], min(4, s["max_new_tokens"]), budget=b, **kw)  # warm-up: compile kernels
            best = None
            for _ in range(s["repeats"]):
                g = generate(model, s["prompt"], s["max_new_tokens"], budget=b, **kw)
                if best is None or g.tokens_per_s > best.tokens_per_s:
                    best = g
            full = torch.cat([tokenizer(s["prompt"], return_tensors="pt").input_ids, best.tokens], 1)
            bits = _bits_on(model, full)
            how = best.extra.get("routing", {}).get(b, {})  # BudgetControl.routing() at this budget
            rows.append(
                dict(
                    model=cfg.model.name,
                    method=method,
                    budget=budget,
                    avg_bits=bits,
                    prompt_tokens=best.prompt_tokens,
                    new_tokens=best.new_tokens,
                    prefill_s=best.prefill_s,
                    decode_s=best.decode_s,
                    tokens_per_s=best.tokens_per_s,
                    us_per_token=best.us_per_token,
                    graph=best.graph,
                    routers_run=how.get("routers_run", math.nan),
                    static_linears=how.get("static_linears", math.nan),
                    kernels=",".join(f"{k}={v}" for k, v in s["kernels"].items()) if method != "fp" else "",
                    device=str(device),
                    text=best.text[0],
                )
            )
            log.info(
                "[%s] budget %s: %.1f tokens/s (%.0f us/token, %.2f bits, graph %s)",
                method,
                "FP" if math.isnan(budget) else f"{budget:g}",
                best.tokens_per_s,
                best.us_per_token,
                bits,
                best.graph,
            )
        df = pd.DataFrame(rows)
        fp = df.loc[df["method"] == "fp", "us_per_token"]
        df["x_fp"] = float(fp.iloc[0]) / df["us_per_token"] if len(fp) else math.nan
        write_csv(df, out_dir / "decode.csv")
        show = df.drop(columns=["text"]).to_string(index=False, float_format=lambda v: f"{v:.4g}")
        print(f"\ndecode ({cfg.model.name}, {device}, {s['max_new_tokens']} new tokens):\n\n{show}\n")
        for r in rows:
            b = "FP" if math.isnan(r["budget"]) else f"{r['budget']:g}"
            print(f"[{r['method']} @ {b}] {s['prompt']}{r['text']}\n")
        tracker.log_table("decode", df, show)
        quant = df[df["method"] != "fp"]["tokens_per_s"]
        return float(quant.mean()) if len(quant) else math.nan

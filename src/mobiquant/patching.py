"""Swap the linears of a Hugging Face decoder-only LM for ``MoBiLinear`` by module discovery.

* Transformer blocks are found as the longest ``nn.ModuleList`` whose children contain ``nn.Linear``s
  (``model.layers`` in LLaMA/Qwen2/Gemma, ``gpt_neox.layers``, ``decoder.layers`` in OPT, ...).
* Router sites are found by tracing: linears of one block that receive the very same input tensor in a
  forward pass share one router (q/k/v; gate/up). No architecture names are hard-coded.
* Embeddings and ``lm_head`` stay in full precision unless asked otherwise.
"""

from __future__ import annotations

import itertools
import re
from collections.abc import Iterable, Iterator, Sequence
from functools import partial
from typing import Any

import torch
import torch.nn as nn

from .dist import share_work
from .elastic.plan import PLAN_ATTR, BudgetPlan
from .nn.linear import MoBiLinear
from .nn.router import ThresholdRecorder, TokenRouter
from .quant.config import BORROWING, MoBiConfig
from .quant.packing import packed_width
from .quant.primitives import num_groups

ROUTERS_ATTR = "mobi_routers"


# ---------------------------------------------------------------------------- discovery
def find_blocks(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The model's stack of transformer blocks: the longest ModuleList of modules containing linears."""
    best: tuple[str, nn.ModuleList] | None = None
    for name, mod in model.named_modules():
        if isinstance(mod, nn.ModuleList) and len(mod) > 0:
            if all(any(isinstance(m, nn.Linear) for m in child.modules()) for child in mod):
                if best is None or len(mod) > len(best[1]):
                    best = (name, mod)
    if best is None:
        raise ValueError(f"{type(model).__name__} has no stack of blocks built from nn.Linear: nothing to quantize")
    return best


def block_linears(block: nn.Module, skip: Iterable[str] = (), prefix: str = "") -> dict[str, nn.Linear]:
    pats = [re.compile(p) for p in skip]
    out = {}
    for name, mod in block.named_modules():
        if isinstance(mod, (nn.Linear, MoBiLinear)) and name:
            full = f"{prefix}.{name}" if prefix else name
            if not any(p.search(full) for p in pats):
                out[name] = mod
    return out


def site_key(linear_names: Sequence[str]) -> str:
    return linear_names[0].replace(".", "_")


def trace_model_sites(model: nn.Module, linear_names_per_block: list[list[str]], seqlen: int = 8):
    """Trace every block once with a short dummy input; returns the site groups of each block."""
    _, blocks = find_blocks(model)
    result: list[list[list[str]] | None] = [None] * len(blocks)
    hooks = []
    seen: list[dict[str, torch.Tensor]] = [dict() for _ in blocks]
    for bi, block in enumerate(blocks):
        modules = dict(block.named_modules())
        for name in linear_names_per_block[bi]:

            def hook(mod, args, bi=bi, name=name):
                seen[bi].setdefault(name, args[0])

            hooks.append(modules[name].register_forward_pre_hook(hook))
    _traced_forward(model, hooks, seqlen)
    for bi in range(len(blocks)):
        groups: list[list[str]] = []
        tensors: list[torch.Tensor | None] = []
        for name in linear_names_per_block[bi]:
            t = seen[bi].get(name)
            for i, other in enumerate(tensors):
                if t is not None and other is t:
                    groups[i].append(name)
                    break
            else:
                groups.append([name])
                tensors.append(t)
        result[bi] = groups
    return result


def _traced_forward(model: nn.Module, hooks: list, seqlen: int) -> None:
    """One forward of ``model`` on ``seqlen`` dummy tokens for the tracing ``hooks``, removed afterwards."""
    vocab = getattr(getattr(model, "config", None), "vocab_size", 2)
    device = next(model.parameters()).device
    ids = torch.arange(seqlen, device=device).remainder(vocab).unsqueeze(0)
    try:
        with torch.no_grad():
            model(input_ids=ids)
    finally:
        for h in hooks:
            h.remove()


# ---------------------------------------------------------------------------- patching
def _set_submodule(root: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, child, new)


def quantize_block(
    block: nn.Module, block_sites: list[list[str]], cfg: MoBiConfig, homes: list[list[int]] | None = None
) -> nn.Module:
    """Replace the linears named in ``block_sites`` by fake-quant ``MoBiLinear``s, one router per site.
    ``homes`` (per site, per linear, :func:`router_homes`): the input each linear reads; one other than the site's
    first linear's borrows the router's decisions on that input (placements 'sublayer', 'attention', 'block');
    None: every linear reads the router's input."""
    routers_ = nn.ModuleDict()
    for gi, group in enumerate(block_sites):
        first = block.get_submodule(group[0])
        router = None
        if len(cfg.slice_bits) > 1 and cfg.routers:
            router = TokenRouter(
                first.in_features, cfg.slice_bits, cfg.router_hidden, cfg.router_temperature, cfg.router_policy
            ).to(device=first.weight.device)
            routers_[site_key(group)] = router
        for name in group:
            lin = block.get_submodule(name)
            q = MoBiLinear.from_linear(
                lin,
                slice_bits=cfg.slice_bits,
                group_size=cfg.group_size,
                lwc_init=cfg.lwc_init,
                word_bits=cfg.word_bits,
                anchor_bits=cfg.anchor_bits,
                view_steps=cfg.view_steps,
            )
            q.attach_router(router)
            q.site = site_key(group)
            q.router_home = True if homes is None else homes[gi][group.index(name)] == homes[gi][0]
            q.input_site = None if homes is None or q.router_home else homes[gi][group.index(name)]
            if router is not None and not q.router_home:
                router.has_borrowers = True
                router.hold_home = cfg.router_placement == "block"  # its MLP borrowers run after the attention
            _set_submodule(block, name, q)
    setattr(block, ROUTERS_ATTR, routers_)
    return block


def discover_sites(model: nn.Module, cfg: MoBiConfig) -> list[list[list[str]]]:
    """Per block, the groups of linear names that share one router (by ``cfg.router_placement``)."""
    blocks_name, blocks = find_blocks(model)
    names_per_block = [
        list(block_linears(b, cfg.skip, prefix=f"{blocks_name}.{i}").keys()) for i, b in enumerate(blocks)
    ]
    if not any(names_per_block):
        raise ValueError("every linear of the model was skipped: nothing to quantize (check `skip`)")
    if cfg.router_placement == "linear" or len(cfg.slice_bits) == 1:
        return [[[n] for n in names] for names in names_per_block]
    traced = trace_model_sites(model, names_per_block)
    if cfg.router_placement in BORROWING:
        pairs = sublayer_pairs(traced, cfg.router_placement)
        return [[[n for site in group for n in site] for group in block] for block in pairs]
    return traced


def sublayer_pairs(traced: list[list[list[str]]], placement: str = "sublayer") -> list[list[list[list[str]]]]:
    """Per block, the input sites that share a router under a borrowing ``placement`` (:data:`BORROWING`): in a
    block of four input sites in forward order (attention input, attention output, MLP input, MLP output: LLaMA's
    q/k/v, o, gate/up, down; sites in the order the block registers its linears, which is LLaMA's forward order)
    'sublayer' pairs the first and second, and the third and fourth; 'attention' the first and second only, the
    MLP's two sites a router each; 'block' all four on the first's router. Any other block keeps one router per
    site."""
    if placement not in BORROWING:
        raise ValueError(f"placement {placement!r} borrows no router: one of {BORROWING}")
    groups = {"sublayer": lambda b: [b[0:2], b[2:4]], "attention": lambda b: [b[0:2], [b[2]], [b[3]]],
              "block": lambda b: [b[0:4]]}[placement]  # fmt: skip
    return [groups(b) if len(b) == 4 else [[site] for site in b] for b in traced]


def router_homes(model: nn.Module, sites: list[list[list[str]]], cfg: MoBiConfig) -> list[list[list[int]]] | None:
    """Per block, per router site, per linear: the input the linear reads, as the index of its input site in the
    block (found by tracing ``model`` before it is quantized); a linear reads the router's own input where its index
    is the site's first linear's. None unless a borrowing placement (:data:`BORROWING`)."""
    if cfg.router_placement not in BORROWING or len(cfg.slice_bits) == 1:
        return None
    traced = trace_model_sites(model, [[n for group in block for n in group] for block in sites])
    homes = []
    for block, inputs in zip(sites, traced, strict=True):
        site_of = {n: i for i, site in enumerate(inputs) for n in site}
        homes.append([[site_of[n] for n in group] for group in block])
    return homes


def quantize_model(
    model: nn.Module,
    cfg: MoBiConfig | None = None,
    sites: list[list[list[str]]] | None = None,
) -> nn.Module:
    """Replace the block linears of ``model`` in place by fake-quant ``MoBiLinear`` + routers.

    ``sites`` (per block, the groups of linear names that share a router) is traced when not given.
    """
    cfg = cfg or MoBiConfig()
    _, blocks = find_blocks(model)
    if sites is None:
        sites = discover_sites(model, cfg)
    homes = router_homes(model, sites, cfg)
    for bi, block in enumerate(blocks):
        quantize_block(block, sites[bi], cfg, None if homes is None else homes[bi])
    model.mobiquant_config = cfg
    model.mobiquant_sites = sites
    return model


def mobi_linears(model: nn.Module) -> Iterator[tuple[str, MoBiLinear]]:
    for name, mod in model.named_modules():
        if isinstance(mod, MoBiLinear):
            yield name, mod


def routers(model: nn.Module) -> Iterator[tuple[str, TokenRouter]]:
    for name, mod in model.named_modules():
        if isinstance(mod, TokenRouter):
            yield name, mod


# ---------------------------------------------------------------------------- elastic control
def set_static(model: nn.Module, k: int) -> None:
    """Any-precision view without routing: every token uses ``k`` slices in every layer."""
    for _, m in mobi_linears(model):
        m.set_static(k)


def set_small_config(model: nn.Module, config) -> None:
    """Launch configuration of the Triton small-batch kernels for every :class:`MoBiLinear` (a
    ``mobiquant.kernels.triton_bitplane.SmallConfig``; None: the defaults). ``SmallConfig(bitplanes=True)``
    runs one-token forwards of every layout in the one-bit plane kernel (by default only the layouts the other
    small-batch kernels do not cover; ``bitplanes=False`` never), whose buffers each linear builds on first use.
    With ``pdl=True`` the linears' routers launch their fused kernel with programmatic dependent launch too (not
    with ``pdl="static"``, static views' launches only, nor ``"views"``, the linears' launches only), with
    ``router_early_l2`` asking L2 for their weights first, with ``router_partials`` without its tail (one token:
    the GEMVs finish the router)."""
    from .kernels.triton_bitplane import launch_pdl

    for _, m in mobi_linears(model):
        m.small_config = config
        m._bitplanes = None
        if m.router is not None:
            m.router.launch_pdl = launch_pdl(config, static=False, router=True)
            m.router.launch_early_l2 = bool(getattr(config, "router_early_l2", False))
            m.router.launch_partials = bool(getattr(config, "router_partials", False))


def fuse_sites(model: nn.Module, enable: bool = True) -> int:
    """One kernel launch per router site for one-token forwards on the one-bit plane kernel: the linears that share
    a router, an input and its width (q, k and v; gate and up, under placement 'block' too, where they borrow q/k/v's
    router; two or three, of one slice layout and group) form a
    :class:`~mobiquant.nn.site.SiteGroup`, whose first member called with a token runs them all (each its own view)
    and whose others return their columns (7 launches per LLaMA layer become 4). ``enable=False`` ungroups.
    :func:`freeze` and ``load_quantized`` call it: a packed model decodes this way by default.
    Returns the number of groups formed."""
    from .nn.site import SiteGroup

    by_router: dict[tuple, list[MoBiLinear]] = {}
    for _, m in mobi_linears(model):
        object.__setattr__(m, "_site_group", None)
        if m.router is not None:  # borrowers by the input they read (gate and up under 'block'), others by router
            key = (id(m.router), None if m.router_home else getattr(m, "input_site", None))
            by_router.setdefault(key, []).append(m)
    groups = 0
    if not enable:
        return groups
    for members in by_router.values():
        shape = {(m.in_features, m.slice_bits, m.slicer.group_size) for m in members}
        if 2 <= len(members) <= 3 and len(shape) == 1:
            group = SiteGroup(members)
            for m in members:
                object.__setattr__(m, "_site_group", group)
            groups += 1
    return groups


def _rms_eps(mod: nn.Module) -> float | None:
    """The epsilon of an RMS norm module (a 1-D ``weight``, no bias, ``variance_epsilon`` or ``eps``), else None."""
    w, eps = getattr(mod, "weight", None), getattr(mod, "variance_epsilon", getattr(mod, "eps", None))
    if "RMSNorm" not in type(mod).__name__ or not isinstance(w, nn.Parameter) or w.dim() != 1:
        return None
    if getattr(mod, "bias", None) is not None or not isinstance(eps, float):
        return None
    return eps


def fuse_inputs(model: nn.Module, enable: bool = True) -> int:
    """The kernels that make a routed site's input run with that site's router, at decode time
    (:mod:`mobiquant.nn.fused`): each RMS norm is one launch that, in a LLaMA layer, also routes q, k and v (the
    input norm) or gate and up (the post-attention norm), and each gated MLP's ``silu(gate) * up`` is one launch that
    also routes ``down_proj``; a routed decode step loses three router launches and fifteen elementwise launches per
    layer. Which module feeds which linear is found by tracing one short forward (as router sites are), and a module
    is taken only where its traced output is exactly what the fused arithmetic gives (a norm
    ``weight * (x * rsqrt(mean(x^2) + eps)).to(x.dtype)``, an MLP ``down(silu(gate(x)) * up(x))``). Works on
    unquantized models too (the same launches, no routers). ``enable=False`` puts the model's own modules back.
    Returns the number of modules fused."""
    import torch.nn.functional as F

    from .nn.fused import PARTS, FusedGatedMLP, FusedRMSNorm, gated_mlp

    for name, mod in list(model.named_modules()):
        if isinstance(mod, (FusedRMSNorm, FusedGatedMLP)):
            if isinstance(mod, FusedGatedMLP):  # its linears as they are now (quantized since it was made, say)
                for attr in PARTS:
                    setattr(mod.original, attr, getattr(mod, attr))
            _set_submodule(model, name, mod.original)
    if not enable:
        return 0
    norms = {name: eps for name, mod in model.named_modules() if (eps := _rms_eps(mod)) is not None}
    mlps = {name for name, mod in model.named_modules() if gated_mlp(mod)}
    linears = [m for _, m in mobi_linears(model) if m.router is not None]
    seen: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    inputs: dict[int, torch.Tensor] = {}

    def module_hook(mod, args, out, name):
        seen.setdefault(name, (args[0], out))

    def linear_hook(mod, args):
        inputs.setdefault(id(mod), args[0])

    hooks = [model.get_submodule(n).register_forward_hook(partial(module_hook, name=n)) for n in (*norms, *mlps)]
    hooks += [m.register_forward_pre_hook(linear_hook) for m in linears]
    _traced_forward(model, hooks, 4)
    fused = 0
    with torch.no_grad():
        for name in (n for n in (*norms, *mlps) if n in seen):
            part: Any = model.get_submodule(name)
            x, out = seen[name]
            if name in norms:
                xf = x.float()
                ref = part.weight * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + norms[name])).to(x.dtype)
            else:
                ref = part.down_proj(F.silu(part.gate_proj(x)) * part.up_proj(x))
            if ref.dtype != out.dtype or not torch.equal(ref, out):
                continue  # another arithmetic (e.g. a (1 + weight) norm, a GELU MLP): left as it is
            if name in norms:
                consumer = next((m for m in linears if inputs.get(id(m)) is out), None)
                router = None if consumer is None else consumer.router
                _set_submodule(model, name, FusedRMSNorm(part, norms[name], router, consumer))
            else:
                _set_submodule(model, name, FusedGatedMLP(part))
            fused += 1
    return fused


def lean_step(model: nn.Module, enable: bool = True, adds: bool = True, prologues: bool = False) -> int:
    """A one-token decode step of LLaMA-family layers in fewer launches (:mod:`mobiquant.nn.lean`): every attention
    module of a supported class (LLaMA, Mistral, Qwen2 without sliding windows) runs the rotary embedding, the
    cache write and the attention over a transformers static cache as one launch (the model's own step: six or
    more a layer), and every supported decoder layer adds its residuals in the ``o_proj`` and ``down_proj``
    launches (``adds=False``: the attention alone). ``prologues`` (with ``adds``): where a layer's q/k/v or gate/up
    site launch, or its down launch, runs a static view on the one-bit plane kernel's whole-K programs, that launch
    makes its input itself, the RMS norm or the gated product before it (no launch for them; off by default until
    timed, ``benchmarks/NOTES.md`` entry 37).
    Works on unquantized models too. Parameters, names and state dicts do not change. ``enable=False`` puts the
    model's own forwards back. Returns the number of attention modules that take the lean step."""
    from . import kernels
    from .nn.lean import (
        LeanAttention,
        LeanDecoderLayer,
        base_type,
        layer_reason,
        lean_reason,
        lean_type,
        rotary_for_launch,
    )

    done = 0
    rotary = rotary_for_launch(model) if enable else None  # held outside the module tree (not a submodule)
    for mod in model.modules():
        if isinstance(mod, (LeanAttention, LeanDecoderLayer)):
            mod.__class__ = base_type(type(mod))
            for key in ("lean_next_layer", "_lean_handed", "lean_rotary"):
                mod.__dict__.pop(key, None)
        if not enable:
            continue
        if lean_reason(mod) is None:
            # a packed model's linears hold buffers, not parameters: the device of either
            dev = next((t.device for t in itertools.chain(mod.parameters(), mod.buffers())), torch.device("cpu"))
            mod.__class__ = lean_type(type(mod), LeanAttention)
            mod.register_buffer("lean_ticket", torch.zeros((), dtype=torch.int32, device=dev), persistent=False)
            mod.lean_interpret = kernels.interpreting()
            if rotary is not None:
                mod.__dict__["lean_rotary"] = rotary
            done += 1
        elif adds and layer_reason(mod) is None:
            mod.__class__ = lean_type(type(mod), LeanDecoderLayer)
            mod.lean_prologues = bool(prologues)
    for mod in model.modules():  # each lean layer's next in its stack (its down launch may make that one's norm)
        if isinstance(mod, nn.ModuleList):
            items = list(mod)
            for i, a in enumerate(items):
                b = items[i + 1] if i + 1 < len(items) else None
                if isinstance(a, LeanDecoderLayer):  # held outside the module tree: not a submodule of a
                    object.__setattr__(a, "lean_next_layer", b if isinstance(b, LeanDecoderLayer) else None)
    return done


def set_budget(model: nn.Module, avg_bits: float, uniform: bool = False) -> None:
    """Elastic inference at ``avg_bits`` average code bits: moves thresholds only, never weights.

    With a budget plan installed (:func:`install_plan`; saved checkpoints carry theirs) every routed linear
    takes its own threshold from the plan, interpolated at ``avg_bits`` (:mod:`mobiquant.elastic.plan`). Without one,
    or with ``uniform=True``, every router runs at ``avg_bits`` itself (uniform routing, as in the paper).
    """
    cfg: MoBiConfig = model.mobiquant_config
    if not cfg.min_bits <= avg_bits <= cfg.max_bits:
        raise ValueError(
            f"budget {avg_bits} is outside the achievable range [{cfg.min_bits}, {cfg.max_bits}] bits "
            f"of slices {list(cfg.slice_bits)}"
        )
    plan = None if uniform else getattr(model, PLAN_ATTR, None)
    for _, r in routers(model):
        r.set_budget(avg_bits)
    taus = plan.taus_at(avg_bits) if plan is not None else {}
    for name, m in mobi_linears(model):
        m.route_tau = taus.get(name)  # None: the router's own threshold (see mobiquant.elastic.site_budgets)
        if m.router is not None:
            m.set_routed()
        else:  # no router (K = 1): the one static view
            m.set_static(m.num_slices)


def install_plan(model: nn.Module, plan: BudgetPlan | None) -> None:
    """Make ``plan`` the model's deployed reading (``None`` removes it: uniform routing)."""
    if plan is None:
        if hasattr(model, PLAN_ATTR):
            delattr(model, PLAN_ATTR)
        return
    routed = {n for n, m in mobi_linears(model) if m.router is not None}
    missing, unknown = routed - set(plan.linears), set(plan.linears) - routed
    if missing or unknown:
        raise ValueError(
            f"budget plan does not match the model's routed linears: missing {sorted(missing)[:3]}, "
            f"unknown {sorted(unknown)[:3]}"
        )
    cfg: MoBiConfig = model.mobiquant_config
    if plan.lo > cfg.min_bits + 1e-9 or plan.hi < cfg.max_bits - 1e-9:
        raise ValueError(
            f"budget plan covers [{plan.lo}, {plan.hi}] bits, the slices [{cfg.min_bits}, "
            f"{cfg.max_bits}]: a plan must span the whole range"
        )
    setattr(model, PLAN_ATTR, plan)


def budget_plan(model: nn.Module) -> BudgetPlan | None:
    return getattr(model, PLAN_ATTR, None)


def static_k_for_bits(cfg: MoBiConfig, bits: float) -> int | None:
    """``k`` whose static view has exactly ``bits`` code bits, if any."""
    for k, total in enumerate(cfg.view_bits, start=1):
        if abs(total - bits) < 1e-9:
            return k
    return None


@torch.no_grad()
def calibrate_thresholds(model: nn.Module, batches: Iterable[torch.Tensor], max_tokens: int = 1 << 16) -> None:
    """Record each router's input activations on ``batches`` of token ids and fit its bits->tau table."""
    acts: dict[str, list[torch.Tensor]] = {}
    counts: dict[str, int] = {}
    hooks = []
    for _name, lin in mobi_linears(model):
        r = lin.router
        if r is None or not lin.router_home:  # a borrower's input is not the router's
            continue
        rid = str(id(r))
        if rid in acts:
            continue
        acts[rid], counts[rid] = [], 0

        def hook(mod, args, rid=rid):
            if counts[rid] < max_tokens:
                x = args[0].detach().reshape(-1, args[0].shape[-1])
                x = x[: max_tokens - counts[rid]]
                acts[rid].append(x.float().cpu())
                counts[rid] += x.shape[0]

        hooks.append(lin.register_forward_pre_hook(hook))
    by_id = {str(id(r)): r for _, r in routers(model)}
    try:
        for ids in batches:
            model(input_ids=ids.to(next(model.parameters()).device))
    finally:
        for h in hooks:
            h.remove()
    for rid, xs in acts.items():
        if not xs:
            raise RuntimeError("a router saw no tokens while calibrating thresholds")
        r = by_id[rid]
        r.fit_thresholds(torch.cat(xs).to(r.tau.device))


def _body(model: nn.Module) -> nn.Module:
    """The part of ``model`` that runs every quantized linear: a Hugging Face LM's base model, without the
    output head (whose logits threshold fitting never reads), or ``model`` itself."""
    base = getattr(model, "base_model", None)
    if isinstance(base, nn.Module) and base is not model:
        inside = {id(m) for _, m in mobi_linears(base)}
        if all(id(m) in inside for _, m in mobi_linears(model)):
            return base
    return model


@torch.no_grad()
def fit_budget_thresholds(model: nn.Module, batches: Sequence[torch.Tensor], budgets: Sequence[float]) -> None:
    """Budget-conditioned thresholds: for each budget ``B``, run the whole model with EVERY router at
    its batch-quantile threshold for ``B`` (as in training) and record the thresholds it used; set_budget
    then interpolates between these. Unlike a per-router table fitted on one activation distribution,
    each router's table reflects the activations it sees when all upstream layers run at ``B`` too.

    Under ``torch.distributed`` (every rank holding the same model, as after a DDP calibration) each rank
    fits every N-th budget and the rows are exchanged, so N ranks share the work; the tables are the same
    as one process's, since every budget is fitted on its own.
    """
    rs = [r for _, r in routers(model)]
    if not rs:
        return
    for _, m in mobi_linears(model):
        if m.router is not None:
            m.set_routed()
    device = next(model.parameters()).device
    body = _body(model)

    def fit(j: int) -> list[float]:  # one threshold per router at budget j
        recorder = ThresholdRecorder({str(i): (r, float(budgets[j])) for i, r in enumerate(rs)})
        with recorder.attached(rs):
            for ids in batches:
                body(input_ids=ids.to(device))
            try:
                means = recorder.means()
            except RuntimeError as err:
                raise RuntimeError("a router saw no tokens while fitting budget thresholds") from err
        return [means[str(i)] for i in range(len(rs))]

    rows = share_work(range(len(budgets)), fit)
    for i, r in enumerate(rs):
        r.set_table(budgets, [rows[j][i] for j in range(len(budgets))])


# ---------------------------------------------------------------------------- accounting
def reset_counts(model: nn.Module, track: bool = True) -> None:
    for _, m in mobi_linears(model):
        m.reset_counts()
        m.track = track


def achieved_bits(model: nn.Module) -> float:
    """Parameter-weighted average code bits over all MoBiLinears and all tokens seen since reset."""
    num, den = 0.0, 0.0
    for _, m in mobi_linears(model):
        tokens = float(m.k_counts.sum())
        if tokens == 0:
            continue
        widths = torch.tensor([m.slicer.bits_at(k) for k in range(1, m.num_slices + 1)], dtype=torch.float64)
        params = m.in_features * m.out_features
        num += params * float((m.k_counts * widths).sum())
        den += params * tokens
    if den == 0:
        raise RuntimeError("no tokens were counted: call reset_counts(model) before the forward passes")
    return num / den


def storage_bits(model: nn.Module) -> float:
    """Stored bits per quantized weight: every packed slice plane (word padding included) plus the
    fp16 step and fp16 zero point of each group (of each group and view with ``view_steps``). Routers are
    reported separately (``router_params``)."""
    bits, weights = 0, 0
    for _, m in mobi_linears(model):
        groups = m.out_features * num_groups(m.in_features, m.slicer.group_size)
        words = sum(packed_width(m.in_features, b, m.word_bits) for b in m.slice_bits)
        pairs = m.num_slices if getattr(m, "view_steps", False) else 1
        bits += m.out_features * words * m.word_bits + groups * 32 * pairs
        weights += m.in_features * m.out_features
    return bits / weights


def router_params(model: nn.Module) -> int:
    return sum(p.numel() for _, r in routers(model) for p in r.parameters())


def freeze(model: nn.Module) -> nn.Module:
    """Pack every MoBiLinear (codes from the learned LWC); the model is then a real quantized checkpoint. The
    linears of each router site decode a token in one launch (:func:`fuse_sites`; measured faster on the H200 in
    every row of docs/RESULTS.md "One launch per router site")."""
    for _, m in mobi_linears(model):
        m.freeze()
    for _, r in routers(model):
        r.requires_grad_(False)
    fuse_sites(model)
    return model

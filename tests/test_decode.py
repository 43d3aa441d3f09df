"""``mobiquant.tasks.decode``: cached generation equals the eager model, budgets switch per token, bad input fails.

The model is the tiny random LLaMA of ``mobiquant.tiny``, quantized (slices 2-2-2-2, g32), its router thresholds
calibrated on random tokens and packed: every routed forward runs the package's inference dispatch.
"""

from __future__ import annotations

import contextlib
import math
import re
import types
import warnings
from pathlib import Path

import pandas as pd
import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.hydra_config import HydraConfig
from omegaconf import open_dict

import mobiquant as mq
from mobiquant.tasks import decode
from mobiquant.tasks.decode import BudgetControl, generate
from mobiquant.tiny import tiny_llama


def build_tiny_llama(seed: int = 0):
    """The tiny random LLaMA of ``task=decode``'s smoke runs (vocabulary: 257 byte tokens)."""
    return tiny_llama(seed=seed)[0]


def token_batches(n: int, batch: int = 4, seqlen: int = 32, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 257, (batch, seqlen), generator=g) for _ in range(n)]


@pytest.fixture(scope="module")
def qmodel():
    model = build_tiny_llama(0)
    mq.quantize_model(model, mq.MoBiConfig(group_size=32))
    mq.calibrate_thresholds(model, token_batches(4, batch=4, seqlen=32, seed=100))
    mq.freeze(model)
    return model


@pytest.fixture
def prompt():
    return token_batches(1, batch=1, seqlen=12, seed=7)[0][0]


def eager_greedy(model, prompt, n, budget=None):
    """The reference: one full forward of the whole sequence per new token, no cache."""
    if budget is not None:
        mq.set_budget(model, budget)
    ids = prompt.reshape(1, -1).clone()
    out = []
    with torch.no_grad():
        for _ in range(n):
            nxt = model(input_ids=ids, use_cache=False).logits[:, -1].argmax(-1)
            out.append(int(nxt))
            ids = torch.cat([ids, nxt[:, None]], 1)
    return out


def test_budgets_whose_thresholds_decide_every_token_decode_as_static_views(prompt, cpu_graph):
    """Adjacent routers: where a budget's thresholds lie between two slices' bands (here 3, 4 and 8 bits) every token
    gets the same slices, so decoding runs those linears as static views (no router work); where a threshold lies
    in a band (4.5 bits) they stay routed. Greedy tokens are the routed eager model's either way, and one generation
    whose budget moves between such budgets captures one graph per set of static and routed linears."""
    from mobiquant.patching import mobi_linears

    model = build_tiny_llama(0)
    mq.quantize_model(model, mq.MoBiConfig(group_size=32, slice_bits=(3, 1, 1, 1, 1, 1), router_policy="adjacent"))
    mq.calibrate_thresholds(model, token_batches(4, batch=4, seqlen=32, seed=100))
    mq.freeze(model)
    linears = [m for _, m in mobi_linears(model) if m.router is not None]
    for budget, constant in ((3.0, True), (4.0, True), (4.5, False), (8.0, True)):
        ref = eager_greedy(model, prompt, 6, budget)
        fixed = [m.router.constant_k(float(m.router.tau)) for m in linears]
        assert all(k is not None for k in fixed) == constant and any(k is not None for k in fixed) == constant
        g = generate(model, prompt, 6, budget=budget)
        assert g.tokens[0].tolist() == ref, budget
        assert [m.mode == "static" for m in linears] == [constant] * len(linears), budget
        if constant:
            assert [m.static_k for m in linears] == fixed
            assert fixed[0] == mq.patching.static_k_for_bits(model.mobiquant_config, budget)
    cpu_graph()  # the graph path on the CPU: a budget list over both kinds
    sched = [4.0, 4.5, 4.0, 4.5, 3.0, 4.5]
    g = generate(model, prompt, 6, budget=sched, cuda_graph="graph")
    assert g.graph == "graph" and g.captures == 3  # 4.5 routed, 4.0 and 3.0 two static structures
    assert torch.equal(g.tokens, generate(model, prompt, 6, budget=sched, cuda_graph="off").tokens)


@pytest.mark.parametrize("graph", ["off", "graph"])
def test_linears_of_one_router_fixed_at_different_views_stay_routed(prompt, monkeypatch, cpu_graph, graph):
    """A plan whose thresholds fix every linear of a budget, but one router's linears at different views (one of
    q/k/v a view above the others): that router's linears stay routed (one site launch; each still gets its fixed
    view) but the router itself never runs (``TokenRouter.fixed``: constant gate values), every other router's
    linears decode as static views; the tokens are the routed eager model's, also through a graph capture (which
    clears the routers' decisions, not their being fixed). ``set_budget`` lets the router run again."""
    from tiny_models import mixed_view_model

    model, named, router, odd = mixed_view_model(0)
    ref = eager_greedy(model, prompt, 6, 4.0)
    assert not router.fixed
    scored, ks = [], []
    real_scores = type(router).scores
    monkeypatch.setattr(type(router), "scores", lambda self, x: scored.append(x.shape) or real_scores(self, x))
    real_k = mq.MoBiLinear._routed_k

    def routed_k(self, x, in_kernel=False):
        k = real_k(self, x, in_kernel)
        ks.append((self, x.numel() // x.shape[-1], mq.kernels.capturing(x), k))
        return k

    monkeypatch.setattr(mq.MoBiLinear, "_routed_k", routed_k)
    cpu_graph()
    g = generate(model, prompt, 6, budget=4.0, cuda_graph=graph)
    assert g.tokens[0].tolist() == ref and g.graph == graph
    assert scored == [] and not router.fixed  # prefill and steps: no router ran; the generation's end clears it
    # uncaptured forwards take each member's fixed view from the host (the prompt: one launch of that view); a
    # captured step reads the thresholds on the device (one graph serves every budget of the same structure)
    fixed_view = {id(m): 3 if i == odd else 2 for i, (_, m) in enumerate(named) if m.router is router}
    prefill = [(m, k) for m, n, cap, k in ks if n == len(prompt)]
    assert sorted(id(m) for m, _ in prefill) == sorted(fixed_view)
    assert all(isinstance(k, int) and k == fixed_view[id(m)] for m, k in prefill)
    in_graph = [k for _, n, cap, k in ks if cap]
    assert (graph == "graph") == bool(in_graph) and not any(isinstance(k, int) for k in in_graph)
    assert all(m.fixed_k is None for _, m in named)  # released with the routers at the generation's end
    members = sum(m.router is router for _, m in named)
    assert g.extra["routing"] == {
        4.0: dict(
            routed_linears=len(named),
            static_linears=len(named) - members,
            routers=len({id(m.router) for _, m in named}),
            routers_fixed=1,
            routers_run=0,
        )
    }
    for _, m in named:
        assert (m.mode, m.static_k if m.mode == "static" else None) == (
            ("routed", None) if m.router is router else ("static", 2)
        )
    x = torch.randn(3, router.net[0].in_features)
    k_odd = named[odd][1]
    router.fixed = True  # as decode sets it at 4 bits: constant values giving each threshold its view
    assert router.slice_counts_at(x, k_odd.route_tau).tolist() == [3, 3, 3] and scored == []
    mq.set_budget(model, 4.0)
    assert not router.fixed
    router.slice_counts_at(x, k_odd.route_tau)
    assert scored == [x.shape]  # thresholds set the library's way: the router runs again


@pytest.mark.parametrize("graph", ["off", "graph"])
def test_one_router_a_block_fixed_at_different_views_decodes_its_even_launches_static(prompt, cpu_graph, graph):
    """One router a block (``router=block``) whose linears a plan fixes, q_proj a view above the block's others: the
    q/k/v site launch stays routed (one launch; each member its fixed view) while o, gate/up and down, each launch's
    linears at one view, decode as static views; the router never runs, and the tokens are the routed eager
    model's, also through a graph capture."""
    from tiny_models import mixed_view_model

    model, named, router, odd = mixed_view_model(0, "block")
    ref = eager_greedy(model, prompt, 6, 4.0)
    cpu_graph()
    g = generate(model, prompt, 6, budget=4.0, cuda_graph=graph)
    assert g.tokens[0].tolist() == ref and g.graph == graph
    block = [(n, m) for n, m in named if m.router is router]
    assert named[odd][0].endswith("q_proj") and len(block) == 7
    for n, m in block:
        qkv = n.rsplit(".", 1)[1] in ("q_proj", "k_proj", "v_proj")
        assert (m.mode, m.static_k if m.mode == "static" else None) == (("routed", None) if qkv else ("static", 2)), n
    assert g.extra["routing"][4.0] == dict(
        routed_linears=len(named),
        static_linears=len(named) - 3,
        routers=len({id(m.router) for _, m in named}),
        routers_fixed=1,
        routers_run=0,
    )


@pytest.mark.parametrize("budget", [2.0, 3.3, 5.0, 8.0])
def test_greedy_equals_the_eager_model_at_a_budget(qmodel, prompt, budget):
    g = generate(qmodel, prompt, 12, budget=budget)
    assert g.tokens.shape == (1, 12) and g.prompt_tokens == 12 and g.graph == "off"
    assert g.tokens[0].tolist() == eager_greedy(qmodel, prompt, 12, budget)
    assert g.budgets == [budget] * 12
    assert g.timed_tokens == 11 and g.tokens_per_s > 0 and g.us_per_token > 0


def test_unquantized_model_and_budget_none(prompt):
    fp = build_tiny_llama(0)
    g = generate(fp, prompt.tolist(), 10)
    assert g.tokens[0].tolist() == eager_greedy(fp, prompt, 10)
    with pytest.raises(ValueError, match="no MoBiQuant linears"):
        generate(fp, prompt, 4, budget=4.0)


def test_prefill_is_one_forward_of_the_whole_prompt(qmodel, prompt):
    lengths = []
    hook = qmodel.model.register_forward_pre_hook(
        lambda mod, args, kwargs: lengths.append(kwargs["input_ids"].shape[1]), with_kwargs=True
    )
    try:
        generate(qmodel, prompt, 6, budget=4.0)
    finally:
        hook.remove()
    assert lengths == [12, 1, 1, 1, 1, 1]


def test_budget_switch_between_tokens_is_honoured(qmodel, prompt):
    """Per-step list and callable: the achieved bits of each new token follow the budget in force (one token
    per step: budget 2 puts every linear at k=1, 8 at k=4, so the achieved bits are exact)."""
    g = generate(qmodel, prompt, 6, budget=[2.0, 2.0, 2.0, 8.0, 8.0, 2.0], track_bits=True)
    assert g.achieved_bits == pytest.approx([2.0, 2.0, 2.0, 8.0, 8.0, 2.0])
    g = generate(qmodel, prompt, 5, budget=lambda i: 8.0 if i % 2 else (2.0 if i == 0 else None), track_bits=True)
    assert g.budgets == [2.0, 8.0, 8.0, 8.0, 8.0]
    assert g.achieved_bits == pytest.approx([2.0, 8.0, 8.0, 8.0, 8.0])
    mid = generate(qmodel, prompt, 4, budget=[5.0, 3.0, 5.0, 3.0], track_bits=True)
    assert len(set(round(b, 6) for b in mid.achieved_bits)) > 1


def test_per_linear_thresholds_become_device_tensors(qmodel, prompt, monkeypatch):
    """A budget setter that gives some linears their own thresholds (a per-linear plan): generation honours
    them through 0-dim tensors written per budget, and still equals the eager model at a fixed budget."""
    from mobiquant.nn.router import interp_tau

    real = mq.set_budget
    own = [m for _, m in mq.patching.mobi_linears(qmodel)][:5]

    def plan(model, b):
        real(model, b)
        for m in own:  # these linears run one bit above the global budget
            m.route_tau = interp_tau(m.router.bits_table, m.router.tau_table, min(b + 1.0, 8.0))

    monkeypatch.setattr(decode, "set_budget", plan)
    BudgetControl.forget(qmodel)  # snapshots made by the library's set_budget in earlier tests
    g = generate(qmodel, prompt, 8, budget=3.5)
    plan(qmodel, 3.5)
    ref = eager_greedy(qmodel, prompt, 8)
    assert g.tokens[0].tolist() == ref
    ctl = BudgetControl(qmodel)
    ctl.apply(3.5)
    holders = [m.route_tau for m in own]
    assert all(torch.is_tensor(t) and t.dim() == 0 for t in holders)
    ctl.apply(6.0)
    assert [m.route_tau for m in own] == holders  # the same tensors, new values
    expect = interp_tau(own[0].router.bits_table, own[0].router.tau_table, 7.0)
    assert float(own[0].route_tau) == pytest.approx(expect)
    others = [m for _, m in mq.patching.mobi_linears(qmodel) if m not in own]
    assert all(m.route_tau is None for m in others)
    copies = []
    real_copy = torch._foreach_copy_
    monkeypatch.setattr(torch, "_foreach_copy_", lambda d, s: copies.append(len(d)) or real_copy(d, s))
    ctl.apply(6.0)  # the budget in force: nothing to write (every decode step sets its budget)
    assert not copies
    ctl.apply(3.5)
    assert len(copies) == 1 and float(own[0].route_tau) == pytest.approx(
        interp_tau(own[0].router.bits_table, own[0].router.tau_table, 4.5)
    )
    mq.set_budget(qmodel, 4.0)  # leave the shared model as the library sets it
    BudgetControl.forget(qmodel)  # and no snapshot made by the patched set_budget


def test_a_later_generation_reuses_the_budget_snapshots(qmodel, prompt, monkeypatch):
    """A budget's first use on a model makes its snapshot (``set_budget``'s work, the host cost of a first token); a
    later generation reuses it, and still runs at its budget when the thresholds were set another way in between; a
    router table written since makes new snapshots."""
    BudgetControl.forget(qmodel)  # the shared model: no snapshot kept by an earlier test
    calls = []
    real = decode.set_budget
    monkeypatch.setattr(decode, "set_budget", lambda m, b: calls.append(b) or real(m, b))
    a = generate(qmodel, prompt, 6, budget=3.5)
    assert calls == [3.5]
    mq.set_budget(qmodel, 6.0)  # the library's own call, not decode's: thresholds of another budget meanwhile
    b = generate(qmodel, prompt, 6, budget=3.5)
    assert calls == [3.5] and torch.equal(a.tokens, b.tokens)
    assert b.tokens[0].tolist() == eager_greedy(qmodel, prompt, 6, 3.5)
    router = next(r for _, r in mq.patching.routers(qmodel))
    with torch.no_grad():
        router.tau_table.add_(0.0)  # an in-place write: the table may have changed
    generate(qmodel, prompt, 2, budget=3.5)
    assert calls == [3.5, 3.5]
    kept = BudgetControl.of(qmodel)
    tau = router.tau
    router.tau = torch.zeros((), device="meta")  # as if moved to another device
    try:
        assert BudgetControl.of(qmodel) is not kept  # its thresholds' tensors live where the model no longer is
    finally:
        router.tau = tau
        BudgetControl.forget(qmodel)


def test_sampling_is_seeded_and_top_k_one_is_greedy(qmodel, prompt):
    a = generate(qmodel, prompt, 10, budget=4.0, temperature=1.0, top_k=20, seed=3)
    b = generate(qmodel, prompt, 10, budget=4.0, temperature=1.0, top_k=20, seed=3)
    c = generate(qmodel, prompt, 10, budget=4.0, temperature=1.0, seed=4)
    assert torch.equal(a.tokens, b.tokens) and not torch.equal(a.tokens, c.tokens)
    greedy = generate(qmodel, prompt, 10, budget=4.0)
    assert torch.equal(generate(qmodel, prompt, 10, budget=4.0, temperature=0.7, top_k=1, seed=0).tokens, greedy.tokens)


def test_batch_rows_and_eos_stop(qmodel, prompt):
    two = torch.stack([prompt, prompt.flip(0)])
    g = generate(qmodel, two, 6, budget=4.0)
    assert g.tokens.shape == (2, 6)
    assert g.tokens[1].tolist() == eager_greedy(qmodel, prompt.flip(0), 6, 4.0)
    first = int(g.tokens[0, 2])
    stop = generate(qmodel, prompt, 6, budget=4.0, eos_token_id=first)
    assert stop.tokens[0].tolist() == g.tokens[0, :3].tolist()


def test_text_prompt_with_a_tokenizer():
    from mobiquant.tiny import tiny_llama

    model, tok = tiny_llama()
    g = generate(model, "hello", 5, tokenizer=tok)
    assert g.prompt_tokens == len(tok("hello").input_ids)
    assert isinstance(g.text, list) and len(g.text) == 1 and isinstance(g.text[0], str)


@pytest.mark.parametrize(
    "kw,match",
    [
        (dict(budget=9.0), r"budget 9 is outside this model's range \[2, 8\]"),
        (dict(budget=1.0), r"outside this model's range"),
        (dict(budget=[4.0] * 3), "one entry per new token: 3 for max_new_tokens=6"),
        (dict(budget=[4.0] * 5 + [12.0]), "budget 12 is outside"),
        (dict(budget=lambda i: 9.5), "budget 9.5 is outside"),
        (dict(budget="4"), "budget must be"),
        (dict(max_new_tokens=0), "max_new_tokens must be an integer >= 1"),
        (dict(cache_len=10), "needs 17 cache positions, the cache holds 10"),
        (dict(temperature=-1.0), "temperature must be"),
        (dict(top_k=0), "top_k must be"),
        (dict(cuda_graph="graph"), "needs the model on a CUDA device"),
        (dict(cuda_graph="fast"), "cuda_graph must be one of"),
    ],
)
def test_bad_input_gives_one_clear_error(qmodel, prompt, kw, match):
    args = dict(max_new_tokens=6)
    args.update(kw)
    n = args.pop("max_new_tokens")
    with pytest.raises(ValueError, match=match):
        generate(qmodel, prompt, n, **args)


def test_bad_prompts(qmodel):
    with pytest.raises(ValueError, match="needs a tokenizer"):
        generate(qmodel, "text", 3)
    with pytest.raises(ValueError, match="non-empty"):
        generate(qmodel, torch.zeros(1, 0, dtype=torch.long), 3)


def test_static_only_model_decodes_static_views(prompt):
    model = build_tiny_llama(0)
    mq.quantize_model(model, mq.MoBiConfig(group_size=32, routers=False))
    mq.freeze(model)
    g = generate(model, prompt, 6, budget=4.0)
    mq.set_static(model, 2)
    assert g.tokens[0].tolist() == eager_greedy(model, prompt, 6)
    with pytest.raises(ValueError, match="not a static view"):
        generate(model, prompt, 3, budget=5.0)


# ------------------------------------------------------------------------------------------ graph fallback (CPU)
# transformers' StaticLayer writes each forward's keys and values at its own offset (``cumulative_length``) and
# advances it; a capture attempt runs forwards that are not decode steps (warm-ups, the first replay, its eager
# check). On the CPU a stand-in for the CUDA graph runs the same sequence, so a capture attempt that moves the
# cache shows here as it did on the GPU (``index_copy_(): index out of bounds`` after the fallback).
@contextlib.contextmanager
def recorded_in_capture():
    """A captured graph replays what its forward did while the stream was capturing: ``kernels.capturing`` true."""
    real = mq.kernels.capturing
    mq.kernels.capturing = lambda x: True
    try:
        yield
    finally:
        mq.kernels.capturing = real


class ReplayOnCPU:
    """A captured step on the CPU: like a CUDA graph, ``replay`` runs the recorded forward from the stepper's
    static inputs (token, position, the cache's offset tensors) into a static output; ``fault`` changes it."""

    def __init__(self, stepper, out, fault=None):
        self.stepper, self.out, self.fault = stepper, out, fault

    def replay(self):
        with recorded_in_capture():
            logits, _ = decode._split(self.stepper._eager(self.stepper.ids, self.stepper.pos))
        if self.fault == "raise":  # after the forward wrote the cache
            raise RuntimeError("CUDA error: an illegal memory access was encountered")
        logits = self.fault(logits) if callable(self.fault) else logits
        outs = self.out if isinstance(self.out, tuple) else (self.out,)
        outs[0].copy_(logits)
        if len(outs) > 1:  # a greedy step's pick, from the logits the graph made
            outs[1].copy_(logits.argmax(-1))


def simulated_capture(fail: str | None = None, fault=None):
    """A ``_Stepper._capture`` for the CPU: the real warm-up forwards (they write the cache), then a capture that
    runs nothing (as CUDA stream capture records without running) or raises."""

    def capture(self, saved):
        if fail == "before warm-up":
            raise RuntimeError("CUDA error: out of memory")
        self.clear_routers()
        self._warm_up(saved)
        if fail == "after warm-up":
            raise RuntimeError("CUDA error: operation not permitted when stream is capturing\nmore detail")
        out = torch.full((self.ids.shape[0], self.model.config.vocab_size), math.nan)
        if self.greedy:  # the step picks the greedy token too: its graph's second output
            out = (out, torch.zeros(self.ids.shape[0], dtype=torch.long))
        self.clear_routers()
        self.captures += 1
        return ReplayOnCPU(self, out, fault), out

    return capture


@pytest.fixture
def cpu_graph(monkeypatch):
    """``install(**simulated_capture kwargs)``: ``cuda_graph='graph'`` then runs the graph path on the CPU."""
    real = decode._graph_mode

    def mode(cuda_graph, device, *args):
        return "graph" if cuda_graph == "graph" else real(cuda_graph, device, *args)

    monkeypatch.setattr(decode, "_graph_mode", mode)

    def install(**kw):
        monkeypatch.setattr(decode._Stepper, "_capture", simulated_capture(**kw))

    return install


@pytest.fixture
def prompt16():
    """The benchmark's prompt length (decode_bench.package_rows)."""
    return token_batches(1, batch=1, seqlen=16, seed=7)[0]


def negate(logits):
    return -logits


FAILURES = {
    "capture raises after warm-up": (
        dict(fail="after warm-up"),
        "capture failed: RuntimeError: CUDA error: operation not permitted",
    ),
    "capture raises at once": (dict(fail="before warm-up"), "capture failed: RuntimeError: CUDA error: out of memory"),
    "replay raises": (dict(fault="raise"), "capture failed: RuntimeError: CUDA error: an illegal memory access"),
    "replay differs": (dict(fault=negate), r"max \|logit difference\| [0-9.e+-]+ > [0-9.e+-]+ \(0.02 x max \|logit\|"),
}


@pytest.mark.parametrize("failure", list(FAILURES))
def test_rejected_graph_attempt_decodes_as_if_none_was_made(qmodel, prompt16, cpu_graph, failure):
    """The benchmark's sequence of calls (a short warm-up generation, then longer ones, on one model), each with a
    rejected capture: the eager fallback gives the tokens of a run that never tried a graph, up to the last
    position of the cache (the failure on the GPU: the fallback wrote past it)."""
    kw, reason = FAILURES[failure]
    cpu_graph(**kw)
    for n, cache_len in [(8, None), (16, None), (8, 16 + 8), (2, None)]:
        ref = generate(qmodel, prompt16, n, budget=4.0, cache_len=cache_len, cuda_graph="off")
        with pytest.warns(UserWarning, match="CUDA graph not used") as rec:
            g = generate(qmodel, prompt16, n, budget=4.0, cache_len=cache_len, cuda_graph="graph")
        assert torch.equal(g.tokens, ref.tokens), (n, cache_len)
        assert g.new_tokens == n and g.timed_tokens == n - 2
        msg = str(rec[0].message)
        assert re.search(reason, msg) and re.search(reason, g.graph), msg
        assert "\n" not in g.graph


def test_a_rejected_check_decodes_as_if_none_was_made(qmodel, prompt16, cpu_graph, monkeypatch):
    """A faithful replay that the check rejects anyway (as on the H200): eager decoding goes on as without it."""
    cpu_graph()
    monkeypatch.setattr(decode, "_replay_mismatch", lambda got, ref: "rejected for the test")
    for n in (8, 16):
        with pytest.warns(UserWarning, match=r"CUDA graph not used \(rejected for the test\); decoding eagerly"):
            g = generate(qmodel, prompt16, n, budget=3.0, cuda_graph="graph")
        assert g.graph == "rejected for the test"
        assert torch.equal(g.tokens, generate(qmodel, prompt16, n, budget=3.0, cuda_graph="off").tokens)


def test_auto_picks_the_compiled_step_on_cuda_and_eager_when_slices_are_counted():
    """The choice of ``cuda_graph='auto'`` (no GPU needed): the compiled step on CUDA, eager on the CPU and wherever
    slices are counted (a host synchronisation every step); a named graph mode with counting is refused."""
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    assert decode._graph_mode("auto", cuda, False, []) == "compile"
    assert decode._graph_mode("auto", cpu, False, []) == "off"
    assert decode._graph_mode("auto", cuda, True, []) == "off"
    counting = types.SimpleNamespace(track=True)
    assert decode._graph_mode("auto", cuda, False, [counting]) == "off"
    assert decode._graph_mode(True, cuda, False, []) == "graph"
    for mode in ("graph", "compile"):
        with pytest.raises(ValueError, match="use cuda_graph='off'"):
            decode._graph_mode(mode, cuda, True, [])
    with pytest.raises(ValueError, match="cuda_graph must be one of"):
        decode._graph_mode("fast", cuda, False, [])


@pytest.mark.parametrize("failure", ["compile raises", "compiled replay rejected"])
def test_auto_falls_back_from_the_compiled_step_to_the_model_own(qmodel, prompt16, cpu_graph, monkeypatch, failure):
    """'auto' captures the compiled step (the CUDA default); when compiling raises, or the compiled graph's replay
    is rejected, it warns and captures the model's own step instead: its graph kept, the tokens eager decoding's
    up to the last position of the cache. 'compile' named explicitly decodes eagerly instead."""
    cpu_graph()
    real_mode = decode._graph_mode
    monkeypatch.setattr(
        decode, "_graph_mode", lambda g, device, *a: "compile" if g in ("auto", "compile") else real_mode(g, device, *a)
    )
    monkeypatch.setattr(decode._Stepper, "_compiled_only", property(lambda self: False))
    rejected = []
    if failure == "compile raises":

        def compiled(step, model):
            def fail(ids, pos):
                raise RuntimeError("BackendCompilerFailed: no compiler for the test")

            return fail

        reason = "capture failed: RuntimeError: BackendCompilerFailed"
    else:

        def compiled(step, model):
            return step  # the model's own step, its first check rejected

        real_check = decode._replay_mismatch

        def check(got, ref):
            if rejected:
                return real_check(got, ref)
            rejected.append(True)
            return "rejected for the test"

        monkeypatch.setattr(decode, "_replay_mismatch", check)
        reason = "rejected for the test"
    monkeypatch.setattr(decode, "_compiled_step", compiled)
    for n, cache_len in [(8, None), (8, 16 + 8)]:
        rejected.clear()
        ref = generate(qmodel, prompt16, n, budget=4.0, cache_len=cache_len, cuda_graph="off")
        with pytest.warns(UserWarning, match="compiled decode step not used") as rec:
            g = generate(qmodel, prompt16, n, budget=4.0, cache_len=cache_len)
        assert reason in str(rec[0].message)
        captures = 1 if failure == "compile raises" else 2  # the rejected one was captured
        assert g.graph == "graph" and g.captures == captures and torch.equal(g.tokens, ref.tokens), (n, cache_len)
    if failure == "compile raises":
        with pytest.warns(UserWarning, match="CUDA graph not used"):
            g = generate(qmodel, prompt16, 8, budget=4.0, cuda_graph="compile")
        assert g.graph.startswith(reason) and torch.equal(g.tokens, ref.tokens)


@pytest.mark.parametrize("failure", list(FAILURES) + ["accepted"])
def test_the_cache_after_a_capture_attempt_is_that_of_an_eager_step(prompt16, cpu_graph, failure):
    """Step by step, every layer's keys, values and write offset equal those of eager decoding, bit for bit,
    whether the capture failed, its replay was rejected, or the graph was kept."""
    from transformers import StaticCache

    model = build_tiny_llama(0).eval()
    cpu_graph(**(FAILURES[failure][0] if failure in FAILURES else {}))
    T, n = prompt16.shape[1], 6
    kw = decode._forward_kwargs(model)[0]
    steppers = []
    for mode in ("off", "graph"):
        cache = StaticCache(config=model.config, max_cache_len=T + n)
        with torch.no_grad():
            logits = model(input_ids=prompt16, **{kw: cache}, use_cache=True).logits[:, -1]
        steppers.append(decode._Stepper(model, cache, kw, torch.device("cpu"), 1, mode, T + n))
    tok = logits.argmax(-1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for pos in range(T, T + n):
            with torch.no_grad():
                (a, _), (b, _) = (s.step(tok, pos, ()) for s in steppers)
            for la, lb in zip(*(s.cache.layers for s in steppers), strict=False):
                assert torch.equal(la.keys, lb.keys) and torch.equal(la.values, lb.values), pos
                assert int(la.cumulative_length) == int(lb.cumulative_length) == pos + 1
            assert torch.equal(a.argmax(-1), b.argmax(-1))
            tok = a.argmax(-1)
    graph = steppers[1]
    assert graph.status == "graph" if failure == "accepted" else graph.mode == "off"
    assert len(graph.graphs) == (failure == "accepted")


def _greedy_stepper(qmodel, prompt, n, feed=False):
    """A greedy graph-mode ``_Stepper`` on the CPU at budget 4 after ``prompt``'s prefill (a cache of ``n`` more
    positions), and the prompt's token."""
    from transformers import StaticCache

    T = prompt.shape[1]
    kw = decode._forward_kwargs(qmodel)[0]
    mq.set_budget(qmodel, 4.0)
    cache = StaticCache(config=qmodel.config, max_cache_len=T + n)
    with torch.no_grad():
        tok = qmodel(input_ids=prompt, **{kw: cache}, use_cache=True).logits[:, -1].argmax(-1)
    return decode._Stepper(qmodel, cache, kw, torch.device("cpu"), 1, "graph", T + n, greedy=True, feed=feed), tok


def test_a_greedy_step_picks_its_token_in_the_graph(qmodel, prompt16, cpu_graph, monkeypatch):
    """Greedy decoding: the captured step also takes the argmax (the graph's second output), so a replayed step
    hands its token over without a pick launched outside the graph, and its logits stay the graph's buffer; the
    tokens are eager decoding's. Sampling picks outside the graph as before."""
    cpu_graph()
    T, n = prompt16.shape[1], 5
    s, tok = _greedy_stepper(qmodel, prompt16, n)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the capture kept
        for pos in range(T, T + n):
            with torch.no_grad():
                logits, untimed = s.step(tok, pos, ())
            assert s.picked is not None and torch.equal(s.picked, logits.argmax(-1)), pos
            if not untimed:  # a replay: the graph's own outputs, not copies
                assert s.picked is s.graphs[()][1][1] and logits is s.graphs[()][1][0]
            tok = s.picked
    assert s.status == "graph" and s.captures == 1
    picks = []
    real = decode._pick

    def counted(logits, *a):
        picks.append(logits.shape)
        return real(logits, *a)

    monkeypatch.setattr(decode, "_pick", counted)
    ref = generate(qmodel, prompt16, 8, budget=4.0, cuda_graph="off")
    assert len(picks) == 8  # eager: one pick a token
    picks.clear()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        g = generate(qmodel, prompt16, 8, budget=4.0, cuda_graph="graph")
    assert g.graph == "graph" and torch.equal(g.tokens, ref.tokens)
    assert len(picks) == 1  # the prompt's token only: every decode step picked its own
    picks.clear()
    monkeypatch.setattr(decode, "PICK_IN_GRAPH", False)  # the baseline benchmarks/decode_bench.py --pick-outside times
    assert torch.equal(generate(qmodel, prompt16, 8, budget=4.0, cuda_graph="graph").tokens, ref.tokens)
    assert len(picks) == 8
    monkeypatch.setattr(decode, "PICK_IN_GRAPH", True)
    picks.clear()
    sampled = generate(qmodel, prompt16, 8, budget=4.0, cuda_graph="graph", temperature=0.7, seed=3)
    assert len(picks) == 8 and sampled.tokens.shape == (1, 8)
    assert torch.equal(sampled.tokens, generate(qmodel, prompt16, 8, budget=4.0, cuda_graph="off", temperature=0.7,
                                                seed=3).tokens)  # fmt: skip


def test_a_feeding_step_writes_the_next_input_in_the_graph(qmodel, prompt16, cpu_graph, monkeypatch):
    """``FEED_IN_GRAPH``: the greedy captured step also writes its token into the next step's input and advances the
    position, so a replay fed that token at the next position copies nothing first (``fed_at``); the capture's
    warm-up and check start from the step's own inputs. The tokens are eager decoding's, with a budget changing
    between tokens (a capture a state) and under ``torch.compile`` on the CPU (the step mutating its inputs)."""
    cpu_graph()
    T, n = prompt16.shape[1], 6
    s, tok = _greedy_stepper(qmodel, prompt16, n, feed=True)
    copies: list = []
    s.pos = _Spied(s.pos, copies)
    for pos in range(T, T + n):
        with torch.no_grad():
            logits, untimed = s.step(tok, pos, ())
        assert torch.equal(s.picked, logits.argmax(-1)) and s.fed_at == pos + 1
        assert int(s.pos) == pos + 1 and torch.equal(s.ids.view(-1), s.picked.view(-1))
        tok = s.picked
    assert s.status == "graph" and s.captures == 1 and len(copies) == 1  # the first step's inputs only
    monkeypatch.setattr(decode, "FEED_IN_GRAPH", True)
    sched = [2.0, 8.0, 8.0, 3.0, 6.0, 4.0, 4.0, 2.0]
    for budget in (4.0, sched):
        ref = generate(qmodel, prompt16, 8, budget=budget, cuda_graph="off")
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            g = generate(qmodel, prompt16, 8, budget=budget, cuda_graph="graph")
        assert g.graph == "graph" and torch.equal(g.tokens, ref.tokens), budget
    g = generate(qmodel, prompt16, 6, budget=4.0, cuda_graph="compile")
    assert torch.equal(g.tokens, generate(qmodel, prompt16, 6, budget=4.0, cuda_graph="off").tokens)


class _Spied(torch.Tensor):
    """A position tensor whose ``fill_`` calls are counted (the stepper's host-side writes of its input)."""

    @staticmethod
    def __new__(cls, t, calls):
        out = t.as_subclass(cls)
        out._calls = calls
        return out

    def fill_(self, value):
        self._calls.append(value)
        return super().fill_(value)


def test_accepted_graph_replays_decode_like_eager(qmodel, prompt16, cpu_graph):
    """A replay that differs from the eager forward by rounding noise is kept, and every later step replays it:
    the same tokens as eager decoding, one capture per generation, to the last position of the cache."""
    cpu_graph(fault=lambda logits: logits * (1 + 1e-4) + 1e-5)
    for n, cache_len in [(8, None), (16, None), (8, 16 + 8)]:
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # no fallback
            g = generate(qmodel, prompt16, n, budget=4.0, cache_len=cache_len, cuda_graph="graph")
        assert g.graph == "graph" and g.captures == 1 and g.timed_tokens == n - 2
        assert torch.equal(g.tokens, generate(qmodel, prompt16, n, budget=4.0, cuda_graph="off").tokens)
    sched = [2.0, 8.0, 3.0, 6.0, 4.0, 2.0, 8.0, 5.0]
    g = generate(qmodel, prompt16, 8, budget=sched, cuda_graph="graph")
    assert g.graph == "graph" and g.captures == 1
    assert torch.equal(g.tokens, generate(qmodel, prompt16, 8, budget=sched, cuda_graph="off").tokens)


def test_replay_check_tolerates_rounding_and_names_the_failed_check():
    g = torch.Generator().manual_seed(0)
    ref = torch.randn(2, 300, generator=g) * 4
    assert decode._replay_mismatch(ref.clone(), ref) is None
    noise = ref * (1 + 1e-3 * torch.randn(ref.shape, generator=g))  # TF32-like rounding
    assert decode._replay_mismatch(noise, ref) is None
    assert decode._replay_mismatch(ref.half().float(), ref) is None  # fp16 rounding of every logit
    scale = float(ref.abs().max())
    shifted = ref.clone()
    shifted[1, 7] += 0.05 * scale
    why = decode._replay_mismatch(shifted, ref)
    assert why.startswith("a graph replay differed from the eager forward: max |logit difference| ")
    assert f"{0.05 * scale:.4g} > {0.02 * scale:.4g} (0.02 x max |logit| {scale:.4g})" in why
    # a near tie that rounding can flip is no reason to give the graph up; a clear lead is
    r = torch.tensor([[1.0, 0.985, 0.1, -1.0]])
    assert decode._replay_mismatch(torch.tensor([[0.99, 0.999, 0.1, -1.0]]), r) is None
    r = torch.tensor([[1.0, 0.975, 0.1, -1.0]])
    why = decode._replay_mismatch(torch.tensor([[0.986, 0.99, 0.1, -1.0]]), r)
    assert why == (
        "a graph replay picked another greedy token than the eager forward in rows [0] (eager leads by more than 0.02)"
    )
    bad = ref.clone()
    bad[0, 3] = math.nan
    assert "non-finite" in decode._replay_mismatch(bad, ref)
    assert decode._replay_mismatch(bad, bad.clone()) is None  # both non-finite in the same place: compare the rest
    assert decode._replay_mismatch(torch.zeros(1, 5), torch.zeros(1, 5)) is None
    # bfloat16 logits: the tolerance is at least 4 ulp of the dtype
    assert "0.03125 x max" in decode._replay_mismatch(ref.bfloat16() + scale, ref.bfloat16())


def test_decoding_to_the_end_of_the_cache_and_past_it(qmodel, prompt16):
    T, n = prompt16.shape[1], 10
    full = generate(qmodel, prompt16, n, budget=4.0)
    assert torch.equal(generate(qmodel, prompt16, n, budget=4.0, cache_len=T + n - 1).tokens, full.tokens)
    assert torch.equal(generate(qmodel, prompt16, n, budget=4.0, cache_len=T + n).tokens, full.tokens)
    with pytest.raises(ValueError, match=f"needs {T + n - 1} cache positions, the cache holds {T + n - 2}"):
        generate(qmodel, prompt16, n, budget=4.0, cache_len=T + n - 2)
    stepper = decode._Stepper(qmodel, None, "past_key_values", torch.device("cpu"), 1, "off", T + 2)
    with pytest.raises(ValueError, match=f"decode position {T + 2} is outside the static cache of {T + 2} positions"):
        stepper.step(torch.tensor([1]), T + 2, ())


def test_a_moved_cache_offset_is_a_clear_error(prompt16, monkeypatch):
    """A forward outside the decode steps that moved the cache is reported, not left to write out of range."""
    model = build_tiny_llama(0)
    real = decode._Stepper.eager

    def twice(self, tok, pos):  # one stray forward at the first decode step
        if pos == prompt16.shape[1]:
            real(self, tok, pos)
        return real(self, tok, pos)

    monkeypatch.setattr(decode._Stepper, "eager", twice)
    with pytest.raises(RuntimeError, match=r"offset is \[20\] after 4 new tokens of a 16-token prompt, expected 19"):
        generate(model, prompt16, 4, cache_len=32)


def test_cache_offsets_save_and_restore_in_place():
    from transformers import StaticCache

    model = build_tiny_llama(0).eval()
    cache = StaticCache(config=model.config, max_cache_len=8)
    offsets = decode._CacheOffsets(cache)
    kw = decode._forward_kwargs(model)[0]
    assert offsets.not_rewindable() is None
    with torch.no_grad():
        model(input_ids=torch.arange(3)[None], **{kw: cache}, use_cache=True)
    live = offsets.tensors()
    assert len(live) == model.config.num_hidden_layers and offsets.values() == [3, 3]
    saved = offsets.save()
    with torch.no_grad():
        model(input_ids=torch.tensor([[5]]), **{kw: cache}, use_cache=True)
    assert offsets.values() == [4, 4]
    offsets.restore(saved)
    assert offsets.values() == [3, 3] and all(a is b for a, b in zip(offsets.tensors(), live, strict=False))
    offsets.check(3, "now")
    with pytest.raises(RuntimeError, match=r"write offset is \[3\] now, expected 4"):
        offsets.check(4, "now")

    class Sliding:
        cumulative_length_int = 3

    sliding = decode._CacheOffsets(type("Cache", (), {"layers": [Sliding()]})())
    assert "keeps positions on the host" in sliding.not_rewindable()


# ------------------------------------------------------------------------------------------ task=decode
from mobiquant.__main__ import CONF_DIR  # noqa: E402  (also registers the config resolvers)


def decode_cfg(tmp_path: Path, *overrides: str):
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose(
            "config",
            overrides=["experiment=decode_smoke", "torch_threads=1", "logger=none", *overrides],
            return_hydra_config=True,
        )
    HydraConfig.instance().set_config(cfg)
    with open_dict(cfg):
        del cfg["hydra"]
        cfg.paths.output_dir = str(tmp_path / "run")
        cfg.paths.cache_dir = str(tmp_path / "cache")
    return cfg


def test_task_decode_writes_tokens_per_second_per_budget(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    cfg = decode_cfg(tmp_path)
    metric = decode.run(cfg)
    df = pd.read_csv(tmp_path / "run" / "decode.csv")
    assert df["method"].tolist() == ["fp", "mobiquant", "mobiquant"]
    assert df["budget"].iloc[1:].tolist() == [3.0, 4.5]
    assert (df["new_tokens"] == 8).all() and (df["tokens_per_s"] > 0).all()
    assert df["avg_bits"].iloc[1] == pytest.approx(3.0) and 3.0 < df["avg_bits"].iloc[2] < 8.0
    assert df["x_fp"].iloc[0] == pytest.approx(1.0) and df["text"].map(lambda t: isinstance(t, str)).all()
    assert math.isclose(metric, df["tokens_per_s"].iloc[1:].mean(), rel_tol=1e-9)
    # how each budget decoded: at 3 bits (every token the base) nothing routes, at 4.5 routers run
    assert df["routers_run"].isna().iloc[0] and df["routers_run"].iloc[1] == 0 and df["routers_run"].iloc[2] > 0
    assert df["static_linears"].iloc[1] > 0


def test_task_decode_from_a_saved_checkpoint(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    from mobiquant.tiny import tiny_llama

    base, _ = tiny_llama()
    mq.quantize_model(base, mq.MoBiConfig(group_size=32, router_hidden=8))
    mq.calibrate_thresholds(base, [torch.randint(0, 257, (2, 16), generator=torch.Generator().manual_seed(1))])
    mq.freeze(base)
    mq.save_quantized(base, tmp_path / "ckpt", base_model="tiny")
    cfg = decode_cfg(tmp_path, f"decode.checkpoint={tmp_path / 'ckpt'}", "decode.fp=false", "decode.budgets=[3]")
    decode.run(cfg)
    df = pd.read_csv(tmp_path / "run" / "decode.csv")
    assert df["method"].tolist() == ["ckpt"] and df["budget"].tolist() == [3.0]
    # with the fp row first (the default) the checkpoint's model is still all quantized: the fp row's fused inputs
    # once put the base model's own MLP linears back into it (its MLPs then decoded in full precision)
    cfg = decode_cfg(tmp_path / "with_fp", f"decode.checkpoint={tmp_path / 'ckpt'}", "decode.budgets=[3]")
    assert cfg.decode.fp and cfg.decode.fuse_inputs
    decode.run(cfg)
    with_fp = pd.read_csv(tmp_path / "with_fp" / "run" / "decode.csv")
    assert with_fp["method"].tolist() == ["fp", "ckpt"]
    assert with_fp["routers_run"].iloc[1] == df["routers_run"].iloc[0] == 8  # both MLP routers of a layer too
    assert with_fp["avg_bits"].iloc[1] == pytest.approx(df["avg_bits"].iloc[0])
    cfg = decode_cfg(tmp_path, f"decode.checkpoint={tmp_path / 'ckpt'}", "decode.budgets=[9]")
    with pytest.raises(ValueError, match=r"outside what checkpoint .* serves"):
        decode.run(cfg)


def test_task_decode_rejects_bad_settings(tmp_path):
    for override, match in [
        ("decode.max_new_tokens=0", "decode.max_new_tokens"),
        ("decode.temperature=-1", "decode.temperature"),
        ("decode.cuda_graph=always", "decode.cuda_graph"),
        ("decode.budgets=[]", "decode.budgets"),
        ("decode.prompt=''", "decode.prompt"),
        ("decode.fuse_inputs=maybe", "decode.fuse_inputs"),
        ("decode.lean_step=1", "decode.lean_step=1 must be true or false"),
        ("decode.lean_prologues=2", "decode.lean_prologues=2 must be true or false"),
        ("+decode.kernels.turbo=true", r"decode.kernels has unknown fields \['turbo'\]; allowed: block_n,"),
        ("+decode.kernels.num_warps=0", r"decode.kernels.num_warps=0 must be of type int"),
        ("+decode.kernels.pdl=yes", r"decode.kernels: pdl must be None \(the measured rule: .*\), False, True,"),
        ("+decode.kernels.pdl=2", r"decode.kernels.pdl=2 must be of type bool \| str"),
        ("decode.kernels=3", "decode.kernels=3 must be a mapping of SmallConfig fields"),
    ]:
        with pytest.raises(ValueError, match=match):
            decode.run(decode_cfg(tmp_path, override))


def test_task_decode_kernel_settings_take_strings_smallconfig_accepts():
    """``decode.kernels`` takes a string field where ``SmallConfig`` does (``pdl: static``) and checks its value
    there: a clear error names what is allowed."""
    from omegaconf import OmegaConf

    node = OmegaConf.create({"pdl": "static", "fragment_epilogues": "silu_mul"})
    assert decode._kernel_settings(node, ValueError) == {"pdl": "static", "fragment_epilogues": "silu_mul"}
    with pytest.raises(ValueError, match=r"decode.kernels: fragment_epilogues must be None .* got 'gelu'"):
        decode._kernel_settings(OmegaConf.create({"fragment_epilogues": "gelu"}), ValueError)


def test_task_decode_kernel_settings_reach_the_quantized_model(tmp_path, monkeypatch):
    """``decode.kernels`` (SmallConfig fields, sweepable) is set on the quantized model's linears and routers for
    its rows, not on the unquantized model, and written to the results."""
    monkeypatch.setenv("WANDB_MODE", "offline")
    from mobiquant.patching import set_small_config as real

    seen = []
    monkeypatch.setattr(decode, "set_small_config", lambda model, cfg: seen.append(cfg) or real(model, cfg))
    cfg = decode_cfg(tmp_path, "+decode.kernels.pdl=true", "+decode.kernels.num_warps=8", "decode.budgets=[3]")
    decode.run(cfg)
    assert [(c.pdl, c.num_warps, c.l2_prefetch) for c in seen] == [(True, 8, False)]
    leans = []
    monkeypatch.setattr(
        decode, "lean_step", lambda model, enable=True, prologues=False: leans.append((enable, prologues))
    )
    decode.run(decode_cfg(tmp_path / "lean", "decode.lean_step=false", "decode.budgets=[3]"))
    assert leans == [(False, False)] * 2  # the fp row and the quantized one (true by default)
    leans.clear()
    decode.run(decode_cfg(tmp_path / "prologues", "decode.budgets=[3]"))
    assert leans == [(True, True)] * 2  # on by default with the lean step
    leans.clear()
    decode.run(decode_cfg(tmp_path / "no_prologues", "decode.lean_prologues=false", "decode.budgets=[3]"))
    assert leans == [(True, False)] * 2
    df = pd.read_csv(tmp_path / "run" / "decode.csv")
    assert df["method"].tolist() == ["fp", "mobiquant"]
    assert df["kernels"].fillna("").tolist() == ["", "pdl=True,num_warps=8"]


@pytest.mark.slow
def test_compiled_step_decodes_as_eager_with_the_package_opaque(qmodel, prompt):
    """``cuda_graph='compile'`` (on the CPU compiled, not captured): the step's code between the package's modules
    compiled by Inductor gives eager decoding's greedy tokens at each budget, the model in fp32 and in its quantized
    form; the package's modules run as they are (opaque to Dynamo: their launches are not traced)."""
    import torch._dynamo

    fp = build_tiny_llama(0)
    assert generate(fp, prompt, 6, cuda_graph="compile").tokens.tolist() == generate(fp, prompt, 6).tokens.tolist()
    for b in (2.0, 5.0):
        g = generate(qmodel, prompt, 6, budget=b, cuda_graph="compile")
        # left out of the timing: the state's first step (eager, before any compile) and the compiling one
        assert g.graph == "compile" and g.timed_tokens == 3
        assert g.tokens[0].tolist() == eager_greedy(qmodel, prompt, 6, b)
    explained = torch._dynamo.explain(qmodel.model.layers[0].mlp.down_proj.forward)(torch.zeros(1, 1, 160))
    assert explained.graph_count == 0  # an fp32 MoBiLinear forward is not traced: it runs opaque


def test_captured_step_depends_on_pairs_only_with_span_bodies():
    """A captured step's structure (what a graph replay cannot change) holds each routed linear's pair of views only
    where the one-bit plane kernel compiles that pair alone (``SmallConfig.span_bodies``, the default): without it
    one graph serves budgets whose pairs differ."""
    pytest.importorskip("triton")
    from mobiquant.kernels.triton_bitplane import SmallConfig

    model = build_tiny_llama(0)
    mq.quantize_model(model, mq.MoBiConfig(group_size=32, slice_bits=(3, 1, 1, 1, 1, 1), router_policy="adjacent"))
    mq.calibrate_thresholds(model, token_batches(2, batch=4, seqlen=32, seed=100))
    mq.freeze(model)
    control = BudgetControl.of(model)
    control.apply(4.5)
    pairs = [m.pair_k if m.mode == "routed" else None for m in control.linears]
    assert any(p is not None for p in pairs)
    assert [s[3] for s in control.structure()[: len(pairs)]] == pairs
    mq.patching.set_small_config(model, SmallConfig(span_bodies=False))
    control._structure = None
    assert [s[3] for s in control.structure()[: len(pairs)]] == [None] * len(pairs)


@pytest.mark.slow
@pytest.mark.parametrize("budget", [None, 4.5], ids=["static-view", "tokens-decide"])
def test_compiled_cpu_step_traces_the_int4_views(prompt, monkeypatch, budget):
    """On the CPU, ``cuda_graph='compile'`` of a bf16 model, at a static view or at a budget where adjacent routers'
    tokens choose between two views: the state's first step runs eagerly (it builds the int4 packs), and from the
    compiled step on no MoBiLinear runs opaque: the int4 matmuls (both views and the router where tokens decide) are
    traced into the step's graph. The tokens are those of eager decoding's step by step."""
    from mobiquant.kernels import int4
    from mobiquant.nn.linear import MoBiLinear
    from mobiquant.tasks.decode import BudgetControl

    if not int4.available():
        pytest.skip("this torch has no CPU int4 matmul")
    model = build_tiny_llama(0)
    cfg = mq.MoBiConfig(group_size=32, slice_bits=(3, 1, 1, 1, 1, 1), router_policy="adjacent")
    mq.quantize_model(model, cfg)
    mq.calibrate_thresholds(model, token_batches(4, batch=4, seqlen=32, seed=100))
    mq.freeze(model)
    model = model.to(torch.bfloat16)
    if budget is None:
        mq.set_static(model, 2)
    else:
        control = BudgetControl.of(model)
        control.apply(budget)
        assert any(m.pair_k is not None for m in control.linears)  # some tokens decide
        control._applied = None
    n_linears = sum(isinstance(m, MoBiLinear) for m in model.modules())
    calls = []
    real = MoBiLinear._forward_opaque
    monkeypatch.setattr(
        MoBiLinear,
        "_forward_opaque",
        torch.compiler.disable(
            lambda self, x, residual=None, prologue=None, epilogue=None: (
                calls.append(1) or real(self, x, residual, prologue, epilogue)
            )
        ),
    )
    g = generate(model, prompt, 6, budget=budget, cuda_graph="compile")
    assert g.graph == "compile" and g.timed_tokens == 3
    assert len(calls) == 2 * n_linears  # the prompt's forward and the first step's; none once compiled
    calls.clear()
    assert g.tokens.tolist() == generate(model, prompt, 6, budget=budget, cuda_graph="off").tokens.tolist()
    assert len(calls) == 6 * n_linears  # eager: every forward opaque


# ------------------------------------------------------------------------------------------ GPU only
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32], ids=["fp16", "fp32"])
def test_gpu_graph_decode_equals_eager_and_switches_without_recapture(dtype, prompt):
    """On CUDA: the captured decode step gives the eager path's greedy tokens at a budget, and one graph
    serves a per-token budget list (thresholds written on the device)."""
    model = build_tiny_llama(0)
    mq.quantize_model(model, mq.MoBiConfig(group_size=32))
    mq.calibrate_thresholds(model, token_batches(4, batch=4, seqlen=32, seed=100))
    mq.freeze(model)
    model = model.to("cuda", dtype)
    for b in (2.0, 4.0, 8.0):
        eager = generate(model, prompt, 12, budget=b, cuda_graph="off")
        graph = generate(model, prompt, 12, budget=b, cuda_graph="graph")
        assert graph.graph == "graph" and graph.captures == 1
        assert torch.equal(graph.tokens, eager.tokens), b
    sched = [2.0, 8.0, 3.0, 6.0, 4.0, 2.0, 8.0, 5.0]
    g = generate(model, prompt, 8, budget=sched, cuda_graph="graph")
    assert g.graph == "graph" and g.captures == 1
    assert torch.equal(g.tokens, generate(model, prompt, 8, budget=sched, cuda_graph="off").tokens)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_gpu_fused_sites_decode_in_one_graph(prompt):
    """With ``patching.fuse_sites`` (one launch per router site) the captured decode step gives eager decoding's
    greedy tokens at every budget, and one graph serves a per-token budget list."""
    from mobiquant.kernels.triton_bitplane import SmallConfig
    from mobiquant.patching import fuse_sites, set_small_config

    _, q = gpu_models(torch.float16)
    set_small_config(q, SmallConfig(bitplanes=True))
    assert fuse_sites(q) > 0
    assert_one_graph_decodes_as_eager(q, prompt)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_gpu_fused_inputs_decode_in_one_graph(prompt):
    """With ``patching.fuse_inputs`` (norms and MLP products one launch each, with the router of the site they
    feed) and one launch per site, the captured decode step gives eager decoding's greedy tokens at every budget,
    one graph serves a per-token budget list, and the unquantized model decodes as well with its inputs fused."""
    from mobiquant.kernels.triton_bitplane import SmallConfig
    from mobiquant.patching import fuse_inputs, fuse_sites, set_small_config

    fp, q = gpu_models(torch.float16)
    set_small_config(q, SmallConfig(bitplanes=True))
    assert fuse_sites(q) > 0
    n_layers = len(q.model.layers)
    assert fuse_inputs(q) == 3 * n_layers + 1  # two norms and the MLP a layer, the final norm
    assert_one_graph_decodes_as_eager(q, prompt)
    assert fuse_inputs(fp) == 3 * n_layers + 1
    g = generate(fp, prompt, 12, cuda_graph="graph")
    assert g.graph == "graph" and torch.equal(g.tokens, generate(fp, prompt, 12, cuda_graph="off").tokens)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("feed", [False, True])
def test_gpu_compiled_step_decodes_in_one_graph(prompt, monkeypatch, feed):
    """``cuda_graph='compile'`` on CUDA: the step's code between the package's kernels compiled by Inductor and the
    whole step captured as one graph gives eager decoding's greedy tokens at every budget, with fused inputs and
    one launch per site, and one graph serves a per-token budget list; fp16 too. ``feed``: with
    ``FEED_IN_GRAPH`` (the captured step writing its token into the next step's input)."""
    from mobiquant.patching import fuse_inputs, fuse_sites

    monkeypatch.setattr(decode, "FEED_IN_GRAPH", feed)
    fp, q = gpu_models(torch.float16)
    assert fuse_sites(q) > 0 and fuse_inputs(q) > 0
    assert_one_graph_decodes_as_eager(q, prompt, mode="compile")
    g = generate(fp, prompt, 12, cuda_graph="compile")
    assert g.graph == "compile" and torch.equal(g.tokens, generate(fp, prompt, 12, cuda_graph="off").tokens)


@pytest.mark.gpu
@pytest.mark.skipif(
    not torch.cuda.is_available() or torch.cuda.get_device_capability() < (9, 0),
    reason="needs a CUDA device of compute capability 9.0 (programmatic dependent launch)",
)
def test_gpu_pdl_decodes_as_without(prompt):
    """With ``SmallConfig(pdl=True)`` (every one-bit plane launch and router launch with programmatic dependent
    launch; whole-K, and stream-K asking L2 for its range) the captured decode step gives eager decoding's greedy
    tokens at every budget, and the tokens of the same model without it."""
    from mobiquant.kernels.triton_bitplane import SmallConfig
    from mobiquant.patching import fuse_inputs, fuse_sites, set_small_config

    _, q = gpu_models(torch.float16)
    assert fuse_sites(q) > 0 and fuse_inputs(q) > 0
    ref = {}
    for cfg in (SmallConfig(bitplanes=True), SmallConfig(bitplanes=True, pdl=True, l2_prefetch=True)):
        set_small_config(q, cfg)
        if cfg.pdl:
            assert_one_graph_decodes_as_eager(q, prompt)
        lo, hi = q.mobiquant_config.min_bits, q.mobiquant_config.max_bits
        for b in (lo, (lo + hi) / 2, hi):
            g = generate(q, prompt, 12, budget=b, cuda_graph="graph")
            assert torch.equal(g.tokens, ref.setdefault(b, g.tokens)), b


def assert_one_graph_decodes_as_eager(q, prompt, mode="graph"):
    """The captured decode step (``mode`` 'graph' or 'compile') gives eager decoding's greedy tokens at the lowest,
    middle and highest budget, and one graph serves a per-token budget list."""
    lo, hi = q.mobiquant_config.min_bits, q.mobiquant_config.max_bits
    for b in (lo, (lo + hi) / 2, hi):
        eager = generate(q, prompt, 12, budget=b, cuda_graph="off")
        graph = generate(q, prompt, 12, budget=b, cuda_graph=mode)
        assert graph.graph == mode and graph.captures == 1
        assert torch.equal(graph.tokens, eager.tokens), b
    sched = [lo, hi, (lo + hi) / 2, hi, lo, lo + 1, hi, lo]
    g = generate(q, prompt, 8, budget=sched, cuda_graph=mode)
    assert g.graph == mode and g.captures == 1
    assert torch.equal(g.tokens, generate(q, prompt, 8, budget=sched, cuda_graph="off").tokens)


def gpu_models(dtype):
    """The tiny LLaMA unquantized and quantized (routers calibrated, packed), on CUDA in ``dtype``."""
    fp = build_tiny_llama(0).to("cuda", dtype)
    q = build_tiny_llama(0)
    mq.quantize_model(q, mq.MoBiConfig(group_size=32))
    mq.calibrate_thresholds(q, token_batches(4, batch=4, seqlen=32, seed=100))
    mq.freeze(q)
    return fp, q.to("cuda", dtype)


# decode_bench.package_rows: a warm-up generation of min(8, new_tokens), then the timed one; here also one that
# ends at the last position of a cache of prompt + new tokens, and one that fills a cache of the default length
BENCH_CALLS = [(8, None), (32, None), (8, 16 + 8), (2, None)]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32], ids=["fp16", "fp32"])
def test_gpu_benchmark_calls_keep_the_graph_and_the_cache_positions(dtype, prompt16):
    """The calls of the decode benchmark on one model: each generation captures once, its first replay passes the
    check, the tokens are eager decoding's, and the cache is filled to its last position without a write past it
    (``generate`` checks every layer's write offset at the end)."""
    fp, q = gpu_models(dtype)
    prompt = prompt16.cuda()
    for model, budget in ((fp, None), (q, 4.0), (q, 2.0), (q, 8.0)):
        for n, cache_len in BENCH_CALLS:
            g = generate(model, prompt, n, budget=budget, cache_len=cache_len, cuda_graph="graph")
            assert g.graph == "graph" and g.captures == 1, (model is fp, budget, n, cache_len, g.graph)
            ref = generate(model, prompt, n, budget=budget, cache_len=cache_len, cuda_graph="off")
            assert torch.equal(g.tokens, ref.tokens), (budget, n, cache_len)
    torch.cuda.synchronize()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("failure", ["replay rejected", "capture raises", "host sync in capture"])
def test_gpu_failed_graph_attempt_decodes_as_if_none_was_made(failure, prompt16, monkeypatch):
    """The failure on the H200: after a real capture attempt that fails or whose replay is rejected, eager
    decoding gives the tokens of a run without a graph, for consecutive generations on one model, up to the last
    position of the cache, and no device-side assert (the attempt no longer moves the cache's write offsets)."""
    fp, q = gpu_models(torch.float16)
    prompt = prompt16.cuda()
    hooks = []
    if failure == "replay rejected":
        monkeypatch.setattr(decode, "_replay_mismatch", lambda got, ref: "rejected for the test")
        reason = "rejected for the test"
    else:

        def during_capture(mod, args):
            if torch.cuda.is_current_stream_capturing():
                if failure == "capture raises":
                    raise RuntimeError("a forward that cannot be captured")
                torch.ones(1, device="cuda").item()  # a host synchronisation: CUDA refuses it while capturing

        hooks = [m.model.register_forward_pre_hook(during_capture) for m in (fp, q)]
        reason = "capture failed: "
    try:
        for model, budget in ((fp, None), (q, 4.0)):
            for n, cache_len in BENCH_CALLS:
                ref = generate(model, prompt, n, budget=budget, cache_len=cache_len, cuda_graph="off")
                with pytest.warns(UserWarning, match="CUDA graph not used"):
                    g = generate(model, prompt, n, budget=budget, cache_len=cache_len, cuda_graph="graph")
                assert g.graph.startswith(reason), g.graph
                assert torch.equal(g.tokens, ref.tokens), (budget, n, cache_len)
        torch.cuda.synchronize()
    finally:
        for h in hooks:
            h.remove()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_gpu_capture_leaves_the_cache_as_an_eager_step(prompt16):
    """Step by step on CUDA: with the graph kept, every layer's write offset after each step is the position fed
    plus one, and the keys and values of the positions written equal eager decoding's to rounding."""
    from transformers import StaticCache

    fp, _ = gpu_models(torch.float32)
    prompt = prompt16.cuda()
    T, n = prompt.shape[1], 6
    kw = decode._forward_kwargs(fp)[0]
    steppers = []
    for mode in ("off", "graph"):
        cache = StaticCache(config=fp.config, max_cache_len=T + n)
        with torch.no_grad():
            logits = fp(input_ids=prompt, **{kw: cache}, use_cache=True).logits[:, -1]
        steppers.append(decode._Stepper(fp, cache, kw, torch.device("cuda"), 1, mode, T + n))
    tok = logits.argmax(-1)
    with torch.no_grad():
        for pos in range(T, T + n):
            a, _ = steppers[0].step(tok, pos, ())
            b, _ = steppers[1].step(tok, pos, ())
            assert steppers[1].status == "graph", steppers[1].status
            for s in steppers:
                assert s.offsets.values() == [pos + 1] * fp.config.num_hidden_layers
            for la, lb in zip(*(s.cache.layers for s in steppers), strict=False):
                torch.testing.assert_close(la.keys, lb.keys, rtol=1e-4, atol=1e-5)
                torch.testing.assert_close(la.values, lb.values, rtol=1e-4, atol=1e-5)
            assert torch.equal(a.argmax(-1), b.argmax(-1))
            tok = a.argmax(-1)


def test_decode_time_leaves_the_capture_step_out(qmodel, prompt16, cpu_graph, monkeypatch):
    """The capture and its check (warm-up forwards, capture, replay, eager check) take no part in ``decode_s``:
    a capture that takes 0.6 s leaves the timed replay steps far below it (it once counted in, which tripled the
    us/token of a 64-token run of SmolLM2 on the H200)."""
    import time

    slow = simulated_capture(fault=lambda logits: logits)

    def capture(self, saved):
        time.sleep(0.6)
        return slow(self, saved)

    monkeypatch.setattr(decode._Stepper, "_capture", capture)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        g = generate(qmodel, prompt16, 8, budget=4.0, cuda_graph="graph")
    assert g.graph == "graph" and g.captures == 1 and g.timed_tokens == 6
    assert g.decode_s < 0.3, g.decode_s

"""Model patching: block and site discovery by tracing, elastic control and accounting on tiny LMs."""

from __future__ import annotations

import copy
from itertools import pairwise

import pytest
import torch
import torch.nn as nn

import mobiquant as mq
from mobiquant.nn.linear import MoBiLinear
from mobiquant.patching import (
    ROUTERS_ATTR,
    find_blocks,
    mobi_linears,
    router_params,
    routers,
    static_k_for_bits,
)
from mobiquant.quant.primitives import fake_quant_rtn

LLAMA_SITES = [
    ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"],
    ["self_attn.o_proj"],
    ["mlp.gate_proj", "mlp.up_proj"],
    ["mlp.down_proj"],
]


def logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def rel_err(a, b) -> float:
    return float((a - b).norm() / b.norm())


class ToyBlock(nn.Module):
    """Names that mean nothing to an architecture table: only tracing can tell that a and b share x."""

    def __init__(self, d: int):
        super().__init__()
        self.norm = nn.LayerNorm(d)
        self.a = nn.Linear(d, d)
        self.b = nn.Linear(d, d)
        self.c = nn.Linear(d, d)
        self.d = nn.Linear(d, d)

    def forward(self, x):
        h = self.norm(x)
        y = self.c(torch.relu(self.a(h)) * self.b(h))
        return x + y + self.d(x)


class ToyLM(nn.Module):
    def __init__(self, vocab: int = 32, d: int = 16, n: int = 3):
        super().__init__()
        self.embed = nn.Embedding(vocab, d)
        self.layers = nn.ModuleList(ToyBlock(d) for _ in range(n))
        self.head = nn.Linear(d, vocab)  # a lone Linear outside the block stack

    def forward(self, input_ids):
        x = self.embed(input_ids)
        for blk in self.layers:
            x = blk(x)
        return self.head(x)


# ---------------------------------------------------------------------------- discovery
def test_llama_blocks_sites_and_shared_routers(tiny_llama):
    emb = tiny_llama.get_input_embeddings().weight.clone()
    head = tiny_llama.lm_head.weight.clone()
    mq.quantize_model(tiny_llama, mq.MoBiConfig(group_size=64))
    assert tiny_llama.mobiquant_sites == [LLAMA_SITES, LLAMA_SITES]
    name, blocks = find_blocks(tiny_llama)
    assert name == "model.layers" and len(blocks) == 2
    for block in blocks:
        assert len(getattr(block, ROUTERS_ATTR)) == 4
        attn, mlp = block.self_attn, block.mlp
        lins = (attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj, mlp.gate_proj, mlp.up_proj, mlp.down_proj)
        assert all(isinstance(lin, MoBiLinear) and lin.router is not None for lin in lins)
        assert attn.q_proj.router is attn.k_proj.router is attn.v_proj.router
        assert mlp.gate_proj.router is mlp.up_proj.router
        site_routers = (attn.q_proj.router, attn.o_proj.router, mlp.gate_proj.router, mlp.down_proj.router)
        assert len({id(r) for r in site_routers}) == 4
    assert len(list(mobi_linears(tiny_llama))) == 14
    assert len(list(routers(tiny_llama))) == 8
    # Embeddings and lm_head stay full precision and untouched.
    assert type(tiny_llama.lm_head) is nn.Linear and torch.equal(tiny_llama.lm_head.weight, head)
    assert type(tiny_llama.get_input_embeddings()) is nn.Embedding
    assert torch.equal(tiny_llama.get_input_embeddings().weight, emb)
    # Routers are registered once (in the block), not once per linear that uses them.
    names = [n for n, _ in tiny_llama.named_parameters() if ".net." in n]
    assert len(names) == 8 * 4 and all(f".{ROUTERS_ATTR}." in n for n in names)


def test_discovery_is_not_llama_specific(tiny_opt, input_ids):
    ref = logits(tiny_opt, input_ids)
    mq.quantize_model(tiny_opt, mq.MoBiConfig(group_size=32))
    name, _ = find_blocks(tiny_opt)
    assert name == "model.decoder.layers"
    sites = tiny_opt.mobiquant_sites[0]
    assert sorted(map(sorted, sites)) == sorted(
        [["self_attn.k_proj", "self_attn.q_proj", "self_attn.v_proj"], ["self_attn.out_proj"], ["fc1"], ["fc2"]]
    )
    layer = tiny_opt.model.decoder.layers[0]
    assert layer.self_attn.q_proj.router is layer.self_attn.k_proj.router is layer.self_attn.v_proj.router
    assert layer.fc1.router is not layer.fc2.router
    assert layer.fc1.bias is not None  # OPT linears carry biases through the patch
    assert type(tiny_opt.lm_head) is nn.Linear
    assert rel_err(logits(tiny_opt, input_ids), ref) < 0.02  # static k = 4: the 8-bit view


def test_sites_come_from_tracing_not_from_names():
    torch.manual_seed(0)
    model = ToyLM().eval()
    ids = torch.randint(0, 32, (2, 8))
    ref = model(input_ids=ids)
    mq.quantize_model(model, mq.MoBiConfig(group_size=8, lwc_init=None))
    assert model.mobiquant_sites == [[["a", "b"], ["c"], ["d"]]] * 3
    blk = model.layers[0]
    assert blk.a.router is blk.b.router and blk.c.router is not blk.a.router
    assert type(model.head) is nn.Linear
    with torch.no_grad():
        assert rel_err(model(input_ids=ids), ref) < 0.02


def test_router_placement_linear_gives_one_router_per_linear(tiny_llama):
    mq.quantize_model(tiny_llama, mq.MoBiConfig(group_size=64, router_placement="linear"))
    lins = list(mobi_linears(tiny_llama))
    assert len(lins) == 14
    assert len({id(m.router) for _, m in lins}) == 14
    assert len(list(routers(tiny_llama))) == 14
    assert all(len(group) == 1 for block in tiny_llama.mobiquant_sites for group in block)


def test_skip_patterns_keep_matching_linears_in_full_precision(tiny_llama, input_ids):
    skip = [r"\.mlp\.", r"layers\.1\.self_attn\.k_proj"]
    mq.quantize_model(tiny_llama, mq.MoBiConfig(group_size=64, skip=skip))
    l0, l1 = tiny_llama.model.layers
    for layer in (l0, l1):
        assert all(type(getattr(layer.mlp, n)) is nn.Linear for n in ("gate_proj", "up_proj", "down_proj"))
        assert isinstance(layer.self_attn.q_proj, MoBiLinear)
    assert isinstance(l0.self_attn.k_proj, MoBiLinear) and type(l1.self_attn.k_proj) is nn.Linear
    assert l1.self_attn.q_proj.router is l1.self_attn.v_proj.router
    assert tiny_llama.mobiquant_sites[1] == [["self_attn.q_proj", "self_attn.v_proj"], ["self_attn.o_proj"]]
    assert len(list(mobi_linears(tiny_llama))) == 7
    assert torch.isfinite(logits(tiny_llama, input_ids)).all()


def test_skipping_everything_raises(tiny_llama):
    with pytest.raises(ValueError, match="every linear of the model was skipped"):
        mq.quantize_model(tiny_llama, mq.MoBiConfig(skip=[r"proj"]))


def test_model_without_linears_raises():
    class NoLinears(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = nn.Embedding(10, 4)
            self.layers = nn.ModuleList(nn.LayerNorm(4) for _ in range(2))

    with pytest.raises(ValueError, match="nothing to quantize"):
        mq.quantize_model(NoLinears())


@pytest.mark.parametrize(
    "kw,match",
    [
        ({"slice_bits": (2, 2, 2, 3)}, "sum to 9"),
        ({"slice_bits": (2, 0)}, "slice_bits"),
        ({"slice_bits": (2.5, 2)}, "slice_bits"),
        ({"group_size": 0}, "group_size"),
        ({"group_size": -1}, "group_size"),
        ({"router_placement": "head"}, "router_placement"),
    ],
)
def test_invalid_config_raises(kw, match):
    with pytest.raises(ValueError, match=match):
        mq.MoBiConfig(**kw)


# ---------------------------------------------------------------------------- accuracy and counts
def test_static_views_approach_the_original_model(tiny_llama, input_ids):
    ref = logits(tiny_llama, input_ids)
    mq.quantize_model(tiny_llama, mq.MoBiConfig(slice_bits=(2, 2, 2, 2), group_size=64))
    errs = []
    for k in range(1, 5):
        mq.set_static(tiny_llama, k)
        errs.append(rel_err(logits(tiny_llama, input_ids), ref))
    assert errs[-1] < 0.02, errs  # 8-bit view: close to the FP model
    assert all(a > 2 * b for a, b in pairwise(errs)), errs
    with pytest.raises(ValueError, match="k must be between 1 and 4"):
        mq.set_static(tiny_llama, 5)


def test_counts_match_tokens_seen_in_every_linear(tiny_llama, make_batches):
    mq.quantize_model(tiny_llama, mq.MoBiConfig(group_size=64))
    batches = make_batches(3, batch=2, seqlen=16, seed=5)
    mq.calibrate_thresholds(tiny_llama, batches)
    mq.set_static(tiny_llama, 3)
    mq.reset_counts(tiny_llama)
    logits(tiny_llama, batches[0])
    for name, m in mobi_linears(tiny_llama):
        assert m.k_counts.tolist() == [0, 0, 32, 0], name
    assert mq.achieved_bits(tiny_llama) == 6.0
    mq.set_budget(tiny_llama, 4.5)
    mq.reset_counts(tiny_llama)
    for ids in batches:
        logits(tiny_llama, ids)
    for name, m in mobi_linears(tiny_llama):
        assert m.mode == "routed"
        assert float(m.k_counts.sum()) == 96, name
    # Linears sharing a router make the same choice for every token.
    attn = tiny_llama.model.layers[0].self_attn
    assert torch.equal(attn.q_proj.k_counts, attn.k_proj.k_counts)
    assert torch.equal(attn.q_proj.k_counts, attn.v_proj.k_counts)
    mq.reset_counts(tiny_llama, track=False)
    logits(tiny_llama, batches[0])
    assert all(float(m.k_counts.sum()) == 0 for _, m in mobi_linears(tiny_llama))
    with pytest.raises(RuntimeError, match="no tokens were counted"):
        mq.achieved_bits(tiny_llama)


def test_calibrated_budgets_are_met_on_fresh_tokens(tiny_llama, make_batches):
    """Model-level elastic control (calibrate_thresholds, set_budget, reset_counts, achieved_bits), packed.

    Each router's bits->tau table is fit on 8192 calibration tokens, so on those tokens each linear is
    within the table's resolution (6/512 bit) of the budget, up to a small shift of layer-2 inputs:
    thresholds were calibrated with layer 1 in its 8-bit view, and routing changes its output a little.
    On 4096 fresh tokens the fraction of tokens above each threshold moves by sampling noise. Tokens of
    one sequence are correlated (attention outputs vary slowly along a sequence), so single sites move
    by up to ~0.25 bit, but the parameter-weighted average over 14 linears and 8 routers stayed within
    0.04 bit in every seed tried (4 seeds x 8 budgets). Tolerances: 0.1 bit fresh, 0.05 bit calibration.
    """
    mq.quantize_model(tiny_llama, mq.MoBiConfig(group_size=64))
    calib = make_batches(16, batch=8, seqlen=64, seed=100)
    fresh = make_batches(8, batch=8, seqlen=64, seed=200)
    with pytest.raises(RuntimeError, match="not calibrated"):
        mq.set_budget(tiny_llama, 4.0)
    mq.calibrate_thresholds(tiny_llama, calib)
    mq.freeze(tiny_llama)

    def achieved(budget, data):
        mq.set_budget(tiny_llama, budget)
        mq.reset_counts(tiny_llama)
        for ids in data:
            logits(tiny_llama, ids)
        return mq.achieved_bits(tiny_llama)

    for budget in [2.0, 2.4, 3.0, 3.75, 4.5, 5.2, 6.9, 7.6, 8.0]:
        assert achieved(budget, fresh) == pytest.approx(budget, abs=0.1), budget
    assert achieved(4.4, calib) == pytest.approx(4.4, abs=0.05)


@pytest.mark.parametrize("budget", [1.5, 8.5, 0.0])
def test_budget_outside_range_raises(tiny_llama, budget):
    mq.quantize_model(tiny_llama, mq.MoBiConfig(group_size=64))
    with pytest.raises(ValueError, match=r"outside the achievable range \[2, 8\]"):
        mq.set_budget(tiny_llama, budget)


def test_single_slice_model_has_no_routers_and_is_rtn(tiny_llama, input_ids):
    fp = logits(tiny_llama, input_ids)
    rtn_model = copy.deepcopy(tiny_llama)
    mq.quantize_model(tiny_llama, mq.MoBiConfig(slice_bits=(4,), group_size=64, lwc_init=None))
    assert not list(routers(tiny_llama)) and router_params(tiny_llama) == 0
    mq.set_budget(tiny_llama, 4)
    assert all(m.mode == "static" and m.static_k == 1 for _, m in mobi_linears(tiny_llama))
    # Reference: each block linear quantized with plain 4-bit RTN.
    for name, mod in list(rtn_model.named_modules()):
        if isinstance(mod, nn.Linear) and ".layers." in name:
            with torch.no_grad():
                mod.weight.copy_(fake_quant_rtn(mod.weight, 4, 64))
    rtn = logits(rtn_model, input_ids)
    # MoBiLinear rounds the step to fp16 (as stored) where plain RTN keeps fp32, which flips a few codes at
    # rounding boundaries: the two models differ by far less than either differs from the FP model.
    assert rel_err(logits(tiny_llama, input_ids), rtn) < 0.15 * rel_err(rtn, fp)


def test_static_k_for_bits():
    cfg = mq.MoBiConfig(slice_bits=(3, 1, 2, 2))
    assert [static_k_for_bits(cfg, b) for b in (3, 4, 6, 8)] == [1, 2, 3, 4]
    assert static_k_for_bits(cfg, 5) is None and static_k_for_bits(cfg, 4.5) is None


# ---------------------------------------------------------------------------- freeze and storage
def test_freeze_model_keeps_outputs_and_disables_router_training(tiny_llama, input_ids):
    mq.quantize_model(tiny_llama, mq.MoBiConfig(group_size=64))
    fake = {}
    for k in range(1, 5):
        mq.set_static(tiny_llama, k)
        fake[k] = logits(tiny_llama, input_ids)
    mq.freeze(tiny_llama)
    assert all(m.packed for _, m in mobi_linears(tiny_llama))
    assert not any(p.requires_grad for _, r in routers(tiny_llama) for p in r.parameters())
    for k in range(1, 5):
        mq.set_static(tiny_llama, k)
        torch.testing.assert_close(logits(tiny_llama, input_ids), fake[k], rtol=1e-4, atol=1e-5)


def test_storage_bits_counts_planes_padding_and_group_params(tiny_llama):
    mq.quantize_model(tiny_llama, mq.MoBiConfig(slice_bits=(3, 1, 2, 2), group_size=64, word_bits=32))

    # Widths 64 (six linears per block) and 160 (down_proj). Per row: words of each plane (32-bit words
    # hold 10 three-bit codes, 32 one-bit codes, 16 two-bit codes), plus 32 bits per group.
    def row_bits(width):
        words = sum(-(-width // per) for per in (10, 32, 16, 16))
        return words * 32 + (-(-width // 64)) * 32

    c = tiny_llama.config
    kv = c.hidden_size // c.num_attention_heads * c.num_key_value_heads
    outs_64 = [64, kv, kv, 64, 160, 160]  # q, k, v, o, gate, up: rows reading width 64
    bits = sum(o * row_bits(64) for o in outs_64) + 64 * row_bits(160)
    weights = sum(o * 64 for o in outs_64) + 64 * 160
    assert mq.storage_bits(tiny_llama) == pytest.approx(bits / weights)
    assert 8.5 < mq.storage_bits(tiny_llama) < 10


def test_budget_conditioned_thresholds_meet_budgets_on_fresh_text():
    """fit_budget_thresholds: every router at its budget-B quantile while upstream layers run at B too;
    achieved bits on unseen token windows then track the requested budget."""
    import mobiquant as mq
    from mobiquant.patching import fit_budget_thresholds
    from mobiquant.tiny import tiny_llama

    model, _ = tiny_llama(hidden_size=64, num_hidden_layers=2)
    mq.quantize_model(model, mq.MoBiConfig(group_size=32, router_hidden=8))
    mq.freeze(model)
    gen = torch.Generator().manual_seed(3)
    calib = torch.randint(0, 257, (8, 128), generator=gen)
    grid = [2 + 0.25 * i for i in range(25)]
    fit_budget_thresholds(model, list(calib.split(2)), grid)
    fresh = torch.randint(0, 257, (8, 128), generator=gen)
    for budget in (2.0, 2.5, 3.25, 4.0, 5.5, 7.0, 8.0):
        mq.set_budget(model, budget)
        mq.reset_counts(model)
        model(input_ids=fresh)
        assert abs(mq.achieved_bits(model) - budget) < 0.1, budget
    for _, r in mq.patching.routers(model):
        assert torch.all(r.tau_table[1:] <= r.tau_table[:-1])  # non-increasing in the budget
        assert r.recorder is None


def _threshold_model():
    from mobiquant.tiny import tiny_llama

    model, _ = tiny_llama(hidden_size=64, num_hidden_layers=2, seed=0)
    torch.manual_seed(0)  # router init
    mq.quantize_model(model, mq.MoBiConfig(group_size=32, router_hidden=8))
    mq.freeze(model)
    calib = torch.randint(0, 257, (4, 64), generator=torch.Generator().manual_seed(3))
    return model, list(calib.split(2)), [2 + 0.5 * i for i in range(13)]


def _fit_on_rank(rank, world, init_file, out_dir):
    import torch.distributed as dist

    from mobiquant.patching import fit_budget_thresholds

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        model, batches, grid = _threshold_model()
        calls = []
        body = model.model  # threshold fitting runs the blocks, not the output head
        body.register_forward_pre_hook(lambda mod, args, kwargs: calls.append(1), with_kwargs=True)
        fit_budget_thresholds(model, batches, grid)
        tables = {name: r.tau_table.clone() for name, r in mq.patching.routers(model)}
        torch.save({"tables": tables, "forwards": len(calls)}, f"{out_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_budget_thresholds_split_across_ranks_match_one_process(tmp_path):
    """Under torch.distributed each rank fits every N-th budget and the rows are exchanged: every rank ends
    with the tables that one process computes alone."""
    import torch.multiprocessing as tmp

    from mobiquant.patching import fit_budget_thresholds

    model, batches, grid = _threshold_model()
    fit_budget_thresholds(model, batches, grid)
    alone = {name: r.tau_table.clone() for name, r in mq.patching.routers(model)}
    tmp.spawn(_fit_on_rank, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    for rank, budgets in ((0, 7), (1, 6)):  # 13 budgets: 0, 2, ..., 12 on rank 0; 1, 3, ..., 11 on rank 1
        saved = torch.load(tmp_path / f"rank{rank}.pt")
        assert saved["forwards"] == budgets * len(batches)
        split = saved["tables"]
        assert split.keys() == alone.keys() and len(alone) > 0
        for name in alone:
            torch.testing.assert_close(split[name], alone[name], rtol=1e-6, atol=1e-7)


def test_fused_inputs_keep_the_linears_quantized_since(tiny_llama):
    """A model whose inputs were fused before it was quantized (the FP model's decode row, then a copy of it loaded
    with a checkpoint): fusing again, or undoing it, keeps the MLPs' quantized linears, not the FP ones the fused
    modules were made from."""
    from mobiquant.patching import fuse_inputs

    assert fuse_inputs(tiny_llama) > 0
    q = copy.deepcopy(tiny_llama)
    mq.quantize_model(q, mq.MoBiConfig(group_size=64))
    assert len(list(mobi_linears(q))) == 14
    assert fuse_inputs(q) > 0
    assert len(list(mobi_linears(q))) == 14
    fuse_inputs(q, enable=False)
    mlp = q.model.layers[0].mlp
    assert type(mlp).__name__ == "LlamaMLP" and all(
        isinstance(getattr(mlp, p), MoBiLinear) for p in ("gate_proj", "up_proj", "down_proj")
    )

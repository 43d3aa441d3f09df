"""Router placements 'sublayer', 'attention' and 'block': the router of a sublayer's input also decides for its later
linears.

In a LLaMA block the attention's router (q/k/v's input) decides for ``o_proj`` and the MLP's (gate/up's input) for
``down_proj``: two routers a block instead of four, the later linears taking the decisions made on the sublayer's
input. Checked on the tiny random LLaMA: the structure (and its round trip through a checkpoint), the decisions
(a borrower's equal its home's at every budget), calibration end to end, and the error of a borrower run alone;
'attention' does so for the attention sublayer only (o), the MLP's two inputs keeping a router each; 'block' for the
whole block on q/k/v's router.
"""

from __future__ import annotations

import contextlib
import functools

import pytest
import torch

import mobiquant as mq
from mobiquant.calibration import CalibConfig, calibrate_model
from mobiquant.io.checkpoint import load_quantized, save_quantized
from mobiquant.patching import fuse_sites, mobi_linears, routers
from mobiquant.tiny import tiny_llama

ATTN = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj"]
MLP = ["mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"]


def batches(n: int, seed: int, batch: int = 4, seqlen: int = 32) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 257, (batch, seqlen), generator=g) for _ in range(n)]


def sublayer_model(policy: str = "adjacent", seed: int = 0, placement: str = "sublayer"):
    model = tiny_llama(seed=seed)[0]
    cfg = mq.MoBiConfig(group_size=32, router_placement=placement, router_policy=policy)
    mq.quantize_model(model, cfg)
    return model


def test_two_routers_a_block_and_which_linears_borrow():
    model = sublayer_model()
    assert model.mobiquant_sites == [[ATTN, MLP]] * 2
    assert len(list(routers(model))) == 4
    for layer in model.model.layers:
        attn, mlp = layer.self_attn, layer.mlp
        assert attn.q_proj.router is attn.o_proj.router and mlp.gate_proj.router is mlp.down_proj.router
        assert attn.q_proj.router is not mlp.gate_proj.router
        homes = [m.router_home for m in (attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj)]
        assert homes == [True, True, True, False]
        assert [m.router_home for m in (mlp.gate_proj, mlp.up_proj, mlp.down_proj)] == [True, True, False]
        assert attn.q_proj.router.has_borrowers and mlp.gate_proj.router.has_borrowers


def test_attention_placement_borrows_for_o_only():
    """Placement 'attention': o on q/k/v's router, the MLP's gate/up and down a router each (three a block)."""
    model = sublayer_model(placement="attention")
    assert model.mobiquant_sites == [[ATTN, MLP[:2], MLP[2:]]] * 2
    assert len(list(routers(model))) == 6
    for layer in model.model.layers:
        attn, mlp = layer.self_attn, layer.mlp
        assert attn.q_proj.router is attn.o_proj.router and not attn.o_proj.router_home
        assert mlp.gate_proj.router is not mlp.down_proj.router
        assert [m.router_home for m in (mlp.gate_proj, mlp.up_proj, mlp.down_proj)] == [True, True, True]
        assert attn.q_proj.router.has_borrowers and not mlp.gate_proj.router.has_borrowers
    mq.calibrate_thresholds(model, batches(2, seed=100))
    mq.freeze(model)
    mq.set_budget(model, 4.5)
    seen = forward_k(model, batches(1, seed=7, batch=2, seqlen=12)[0])
    for i in range(2):
        p = f"model.layers.{i}."
        assert torch.equal(seen[p + "self_attn.o_proj"], seen[p + "self_attn.q_proj"])


def forward_k(model, ids) -> dict[str, torch.Tensor]:
    """Each routed linear's slice counts in a forward of ``ids``, by name."""
    seen: dict[str, torch.Tensor] = {}

    def hook(mod, args, out, name):
        seen[name] = mod._routed_k(args[0]).clone()

    with contextlib.ExitStack() as handles, torch.no_grad():
        for name, m in mobi_linears(model):
            handles.enter_context(m.register_forward_hook(functools.partial(hook, name=name)))
        model(input_ids=ids)
    return seen


@pytest.mark.parametrize("policy", ["free", "adjacent"])
def test_a_borrower_takes_its_home_decisions_at_every_budget(policy):
    model = sublayer_model(policy)
    mq.calibrate_thresholds(model, batches(2, seed=100))
    mq.freeze(model)
    ids = batches(1, seed=7, batch=2, seqlen=12)[0]
    for budget in (3.0, 4.5, 6.0):
        mq.set_budget(model, budget)
        seen = forward_k(model, ids)
        for i in range(2):
            p = f"model.layers.{i}."
            assert torch.equal(seen[p + "self_attn.o_proj"], seen[p + "self_attn.q_proj"])
            assert torch.equal(seen[p + "mlp.down_proj"], seen[p + "mlp.gate_proj"])
        ks = torch.cat([k.reshape(-1) for k in seen.values()])
        if budget == 4.5:  # the tokens decide: some take the lower view, some the upper
            assert len(set(ks.tolist())) > 1


def test_borrowed_decisions_differ_from_the_borrower_own_input():
    """What placement 'sublayer' changes: o's tokens routed on q/k/v's input, not on o's own input."""
    model = sublayer_model("free")
    mq.calibrate_thresholds(model, batches(2, seed=100))
    mq.freeze(model)
    mq.set_budget(model, 4.5)
    o = model.model.layers[0].self_attn.o_proj
    inputs = {}
    hooks = [m.register_forward_pre_hook(lambda mod, a, n=n: inputs.setdefault(n, a[0])) for n, m in
             (("q", model.model.layers[0].self_attn.q_proj), ("o", o))]  # fmt: skip
    with torch.no_grad():
        model(input_ids=batches(1, seed=3, batch=2, seqlen=16)[0])
    for h in hooks:
        h.remove()
    router = o.router
    on_q, on_o = (router.slice_counts(inputs[n]) for n in ("q", "o"))
    assert not torch.equal(on_q, on_o)  # routing o on its own input would decide otherwise


def test_a_borrower_run_alone_is_a_clear_error():
    model = sublayer_model()
    o = model.model.layers[0].self_attn.o_proj
    o.set_routed()
    with pytest.raises(RuntimeError, match="borrows its router's decisions"):
        o(torch.randn(1, 3, o.in_features))
    q = model.model.layers[0].self_attn.q_proj
    x = torch.randn(1, 5, q.in_features)
    q.set_routed()
    q(x)  # its router now holds five tokens
    with pytest.raises(RuntimeError, match="another batch"):
        o(torch.randn(1, 3, o.in_features))


def test_block_placement_one_router_a_block():
    """Placement 'block': every later linear of a block (o, gate/up, down) on q/k/v's router, one a block; its MLP
    borrowers run after the attention, so the router holds its home input (no longer held by the block's forward),
    and each borrower's decisions are those of its threshold on the scores of that input."""
    model = sublayer_model(placement="block")
    assert model.mobiquant_sites == [[ATTN + MLP]] * 2
    assert len(list(routers(model))) == 2
    for layer in model.model.layers:
        attn, mlp = layer.self_attn, layer.mlp
        router = attn.q_proj.router
        assert all(m.router is router for m in (attn.o_proj, mlp.gate_proj, mlp.up_proj, mlp.down_proj))
        homes = [m.router_home for m in (attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj)]
        assert homes == [True, True, True, False]
        assert [m.router_home for m in (mlp.gate_proj, mlp.up_proj, mlp.down_proj)] == [False, False, False]
        assert router.has_borrowers and router.hold_home
    mq.calibrate_thresholds(model, batches(1, seed=100))
    mq.freeze(model)
    assert fuse_sites(model) == 4  # q/k/v, and gate/up on the input they share though they borrow; o and down alone
    for layer in model.model.layers:
        assert layer.mlp.gate_proj._site_group is layer.mlp.up_proj._site_group is not None
        assert layer.self_attn.o_proj._site_group is None and layer.mlp.down_proj._site_group is None
    mq.set_budget(model, 4.5)
    seen: dict = {}
    hooks = [m.register_forward_pre_hook(lambda mod, a, n=n: seen.setdefault(n, a[0]))
             for n, m in mobi_linears(model)]  # fmt: skip
    held = batches(1, seed=9, batch=2, seqlen=16)[0]
    with torch.no_grad():
        assert torch.isfinite(model(input_ids=held).logits).all()
    for h in hooks:
        h.remove()
    layer = model.model.layers[0]
    router = layer.self_attn.q_proj.router
    home = seen["model.layers.0.self_attn.q_proj"]
    assert router.home_input(home) is home  # held past the block's forward
    gate = layer.mlp.gate_proj
    tau = router.tau if gate.route_tau is None else gate.route_tau
    with torch.no_grad():
        assert torch.equal(gate._routed_k(seen["model.layers.0.mlp.gate_proj"]), router.slice_counts_at(home, tau))


@pytest.mark.parametrize("placement", ["sublayer", "attention", "block"])
def test_calibration_and_a_checkpoint_round_trip(tmp_path, placement):
    model = sublayer_model(placement=placement)
    ids = batches(1, seed=0, batch=4, seqlen=32)[0]
    cfg = CalibConfig(epochs_stage1=1, epochs_stage2=1, batch_size=2, progress_bar=False, threshold_windows=2,
                      threshold_step=1.0)  # fmt: skip
    calibrate_model(model, ids, model.mobiquant_config, cfg)
    mq.freeze(model)
    held = batches(1, seed=9, batch=2, seqlen=16)[0]
    mq.set_budget(model, 4.5)
    with torch.no_grad():
        ref = model(input_ids=held).logits
    assert torch.isfinite(ref).all()
    save_quantized(model, tmp_path / "ckpt")
    fresh = tiny_llama(seed=0)[0]
    load_quantized(fresh, tmp_path / "ckpt")
    assert [m.router_home for _, m in mobi_linears(fresh)] == [m.router_home for _, m in mobi_linears(model)]
    mq.set_budget(fresh, 4.5)
    with torch.no_grad():
        assert torch.equal(fresh(input_ids=held).logits, ref)


def test_site_groups_leave_the_borrowers_out():
    model = sublayer_model()
    mq.calibrate_thresholds(model, batches(1, seed=100))
    mq.freeze(model)
    assert fuse_sites(model) == 4  # q/k/v and gate/up of each block; o and down launch alone
    for layer in model.model.layers:
        assert layer.self_attn.o_proj._site_group is None and layer.mlp.down_proj._site_group is None
        assert layer.self_attn.q_proj._site_group is layer.self_attn.v_proj._site_group


def test_other_blocks_keep_a_router_a_site():
    from mobiquant.patching import sublayer_pairs

    traced = [[["a", "b"], ["c"]], [["q"], ["o"], ["g"], ["d"]]]
    assert sublayer_pairs(traced) == [[[["a", "b"]], [["c"]]], [[["q"], ["o"]], [["g"], ["d"]]]]
    assert sublayer_pairs(traced, "attention") == [[[["a", "b"]], [["c"]]], [[["q"], ["o"]], [["g"]], [["d"]]]]
    assert sublayer_pairs(traced, "block") == [[[["a", "b"]], [["c"]]], [[["q"], ["o"], ["g"], ["d"]]]]
    with pytest.raises(ValueError, match="borrows no router"):
        sublayer_pairs(traced, "site")

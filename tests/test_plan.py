"""Budget plans: built from cost curves, served by set_budget, saved with the checkpoint, reloaded exactly."""

from __future__ import annotations

import json

import pytest
import torch

import mobiquant as mq
from mobiquant.elastic.plan import BudgetPlan, stack_plan
from mobiquant.elastic.site_budgets import _mean_nll, build_plan, default_grid
from mobiquant.io.checkpoint import CONFIG_NAME, FORMAT_VERSION, TENSORS_NAME
from mobiquant.patching import budget_plan, fit_budget_thresholds, install_plan, mobi_linears, routers
from test_checkpoint import rewrite_meta
from test_site_budgets import fp_model, routed_model  # tests/ is on sys.path (pytest's default import mode)


def test_plan_interpolates_and_validates():
    plan = BudgetPlan(
        [2.0, 3.0, 4.0],
        ["a", "b"],
        [[10.0, 8.0, 6.0], [1.0, 1.0, 0.0]],
        [[2.0, 3.0, 4.0], [2.0, 3.0, 4.0]],
        ["allocated", "uniform", "allocated"],
    )
    assert plan.taus_at(2.0) == {"a": 10.0, "b": 1.0}
    assert plan.taus_at(3.5) == {"a": 7.0, "b": 0.5}
    assert plan.taus_at(4.0) == {"a": 6.0, "b": 0.0}
    assert plan.local_at(2.25)["a"] == pytest.approx(2.25)
    with pytest.raises(ValueError, match="outside this plan's range"):
        plan.taus_at(4.5)
    with pytest.raises(ValueError, match="increase strictly"):
        BudgetPlan([3.0, 2.0], ["a"], [[1.0, 2.0]], [[3.0, 2.0]], ["allocated"] * 2)
    with pytest.raises(ValueError, match="reading"):
        BudgetPlan([2.0, 3.0], ["a"], [[1.0, 2.0]], [[2.0, 3.0]], ["allocated", "best"])
    back = BudgetPlan.from_state(plan.state(), json.loads(json.dumps(plan.meta())))
    assert back.budgets == plan.budgets and torch.equal(back.taus, plan.taus) and back.reading == plan.reading
    with pytest.raises(ValueError, match="expected"):
        BudgetPlan.from_state({**plan.state(), "plan.taus": torch.zeros(3, 3)}, plan.meta())


def test_batch_tau_meets_the_budget_without_leaving_the_device():
    from mobiquant.nn.router import batch_tau

    g = torch.Generator().manual_seed(0)
    values = torch.sort(torch.randn(500, 3, generator=g), dim=-1, descending=True).values  # nested, no ties
    for budget in (2.0, 2.7, 4.0, 5.5, 8.0):
        tau = batch_tau(values, (2, 2, 2, 2), budget)
        assert isinstance(tau, torch.Tensor) and tau.dim() == 0 and tau.dtype == values.dtype
        bits = 2 + 2 * (values > tau).sum() / 500
        assert abs(float(bits) - budget) <= 2 / 500 + 1e-6, (budget, float(bits))
    layout = (3, 1, 1, 1, 1, 1)
    v5 = torch.sort(torch.randn(400, 5, generator=g), dim=-1, descending=True).values
    for budget in (3.0, 3.3, 6.5, 8.0):
        bits = 3 + (v5 > batch_tau(v5, layout, budget)).sum() / 400
        assert abs(float(bits) - budget) <= 1 / 400 + 1e-6


def test_stack_plan_needs_the_same_linears_at_every_budget():
    with pytest.raises(ValueError, match="same linears"):
        stack_plan([2.0, 3.0], [({"a": 1.0}, {"a": 2.0}, "allocated"), ({"b": 1.0}, {"b": 3.0}, "allocated")])


@pytest.fixture(scope="module")
def planned():
    model = routed_model()
    ids = torch.randint(0, 128, (8, 32), generator=torch.Generator().manual_seed(3))
    fit_budget_thresholds(model, list(ids.split(2)), default_grid((2, 2, 2, 2), 0.5))
    plan = build_plan(
        model, ids, per="linear", step=0.5, sensitivity_windows=4, select_windows=4, batch_size=2, select_at="all"
    )
    return model, ids, plan


def test_build_plan_covers_every_routed_linear_and_the_whole_range(planned):
    model, _, plan = planned
    routed = {n for n, m in mobi_linears(model) if m.router is not None}
    assert set(plan.linears) == routed
    assert plan.budgets == default_grid((2, 2, 2, 2), 0.5)
    assert plan.reading[0] == plan.reading[-1] == "allocated"  # the ends are the static views
    assert set(plan.reading) <= {"allocated", "uniform"}
    assert plan.settings == {
        "per": "linear",
        "step": 0.5,
        "sensitivity_windows": 4,
        "refit_thresholds": True,
        "refit_windows": 4,
        "select_windows": 4,
        "select_at": "all",
        "windows": "train",
        "local_step": None,
    }
    # Local budgets of an allocated reading are parameter-weighted at most the budget.
    params = {n: m.in_features * m.out_features for n, m in mobi_linears(model)}
    for j, b in enumerate(plan.budgets):
        mean = sum(params[n] * float(plan.local[i, j]) for i, n in enumerate(plan.linears)) / sum(params.values())
        assert mean <= b + 1e-9
    assert all(m.route_tau is None for _, m in mobi_linears(model))  # building leaves no threshold behind


def test_a_plan_of_whole_views_runs_no_router_at_its_budgets():
    """``local_step=1.0``: every linear's local budget is a view's bits at every grid budget (half-bit steps here),
    each refitted threshold fixes that view (adjacent routers), and decoding at a grid budget runs no router; the
    parameter-weighted mean still meets the budget."""
    from mobiquant.patching import install_plan
    from mobiquant.tasks.decode import BudgetControl
    from mobiquant.tiny import tiny_llama

    model = tiny_llama(seed=0)[0]
    mq.quantize_model(model, mq.MoBiConfig(group_size=32, slice_bits=(3, 1, 1, 1, 1, 1), router_policy="adjacent"))
    g = torch.Generator().manual_seed(100)
    mq.calibrate_thresholds(model, [torch.randint(0, 257, (4, 32), generator=g) for _ in range(2)])
    mq.freeze(model)
    ids = torch.randint(0, 257, (4, 32), generator=torch.Generator().manual_seed(5))
    plan = build_plan(model, ids, per="linear", step=0.5, local_step=1.0, sensitivity_windows=4, select_windows=0)
    assert plan.settings["local_step"] == 1.0 and plan.budgets == default_grid((3, 1, 1, 1, 1, 1), 0.5)
    views = {3.0, 4.0, 5.0, 6.0, 7.0, 8.0}
    assert {float(v) for v in plan.local.flatten()} <= views
    assert len({float(v) for v in plan.local[:, plan.budgets.index(4.5)]}) > 1  # 4.5 bits: a mix of whole views
    install_plan(model, plan)
    params = {n: m.in_features * m.out_features for n, m in mobi_linears(model) if m.router is not None}
    control = BudgetControl(model)
    for j, b in enumerate(plan.budgets):
        mean = sum(params[n] * float(plan.local[i, j]) for i, n in enumerate(plan.linears)) / sum(params.values())
        assert mean <= b + 1e-9
        control.apply(b)
        assert control.routing()["routers_run"] == 0, b
    with pytest.raises(ValueError, match="must be positive and divide"):
        build_plan(model, ids, per="linear", step=0.5, local_step=0.75, sensitivity_windows=4, select_windows=0)


def test_a_plan_records_where_its_windows_come_from(planned):
    model, ids, _ = planned
    kw = dict(per="linear", step=0.5, sensitivity_windows=4, select_windows=0, batch_size=2)
    assert build_plan(model, ids, windows="held_out", **kw).settings["windows"] == "held_out"
    with pytest.raises(ValueError, match="windows must be one of"):
        build_plan(model, ids, windows="eval", **kw)


def test_set_budget_serves_the_plan_and_its_choice_is_the_lower_held_out_loss(planned):
    model, ids, plan = planned
    held = ids[-4:]
    install_plan(model, plan)
    try:
        for j, b in enumerate(plan.budgets[1:-1], start=1):
            mq.set_budget(model, b)
            taus = plan.taus_at(b)
            assert all(m.route_tau == taus[n] for n, m in mobi_linears(model) if m.router is not None)
            planned_nll = _mean_nll(model, held, 2)
            mq.set_budget(model, b, uniform=True)
            assert all(m.route_tau is None for _, m in mobi_linears(model))
            uniform_nll = _mean_nll(model, held, 2)
            # the plan keeps whichever reading was lower on these held-out windows
            assert planned_nll <= uniform_nll + 1e-9, (b, plan.reading[j])
        # Achieved bits track the budget between grid points too (interpolated thresholds).
        for b in (3.0, 4.25, 6.0):
            mq.set_budget(model, b)
            mq.reset_counts(model)
            with torch.no_grad():
                model(input_ids=ids)
            assert abs(mq.achieved_bits(model) - b) < 0.6
    finally:
        install_plan(model, None)


def test_plan_scores_uniform_routing_only_at_the_views_by_default(planned, monkeypatch):
    """select_at='views' (the default) scores the two readings only at budgets equal to a view's bits (there
    uniform routing is that static view); every other budget keeps the allocated reading unscored."""
    from mobiquant.elastic import site_budgets

    model, ids, _ = planned
    scored = []
    real = site_budgets._mean_nll
    monkeypatch.setattr(site_budgets, "_mean_nll", lambda m, held, bs: scored.append(1) or real(m, held, bs))
    plan = build_plan(model, ids, per="linear", step=0.5, sensitivity_windows=4, select_windows=4, batch_size=2)
    assert plan.settings["select_at"] == "views"
    assert len(scored) == 2 * 2  # views 4 and 6 of (2, 2, 2, 2) lie strictly inside [2, 8]: two readings each
    assert all(r == "allocated" for b, r in zip(plan.budgets, plan.reading, strict=True) if b not in (4.0, 6.0))
    with pytest.raises(ValueError, match="select_at must be one of"):
        build_plan(model, ids, per="linear", step=0.5, sensitivity_windows=4, select_at="some")


def test_install_plan_refuses_a_plan_of_another_model(planned):
    model, _, plan = planned
    other = BudgetPlan(plan.budgets, ["x"] * 1, plan.taus[:1], plan.local[:1], plan.reading)
    with pytest.raises(ValueError, match="does not match"):
        install_plan(model, other)
    short = BudgetPlan(plan.budgets[:3], plan.linears, plan.taus[:, :3], plan.local[:, :3], plan.reading[:3])
    with pytest.raises(ValueError, match="whole range"):
        install_plan(model, short)


def test_checkpoint_carries_the_plan_and_reproduces_every_budget(planned, tmp_path):
    model, ids, plan = planned
    install_plan(model, plan)
    try:
        folder = mq.save_quantized(model, tmp_path / "ckpt")
        meta = json.loads((folder / CONFIG_NAME).read_text())
        assert meta["format_version"] == FORMAT_VERSION and meta["plan"]["linears"] == plan.linears
        loaded = mq.load_quantized(fp_model(), folder)
        assert budget_plan(loaded) is not None and budget_plan(loaded).budgets == plan.budgets
        for b in (2.0, 3.25, 4.0, 5.5, 8.0):
            mq.set_budget(model, b)
            mq.set_budget(loaded, b)
            with torch.no_grad():
                assert torch.equal(model(input_ids=ids).logits, loaded(input_ids=ids).logits), b
    finally:
        install_plan(model, None)


def test_version_1_checkpoints_still_load_without_a_plan(tmp_path):
    model = routed_model()
    fit_budget_thresholds(model, [torch.randint(0, 128, (2, 16))], default_grid((2, 2, 2, 2), 1.0))
    folder = mq.save_quantized(model, tmp_path / "v1")
    rewrite_meta(folder, lambda meta: meta.update(format_version=1))
    loaded = mq.load_quantized(fp_model(), folder)
    assert budget_plan(loaded) is None
    mq.set_budget(loaded, 5.0)
    assert len(list(routers(loaded))) == 8


def test_a_plan_without_its_tensors_is_refused(planned, tmp_path):
    model, _, plan = planned
    install_plan(model, plan)
    try:
        folder = mq.save_quantized(model, tmp_path / "ckpt")
    finally:
        install_plan(model, None)
    rewrite_meta(folder, lambda meta: meta["plan"].update(reading=meta["plan"]["reading"][:-1]))
    with pytest.raises(mq.CheckpointError, match="budget plan is invalid"):
        mq.load_quantized(fp_model(), folder)
    assert (folder / TENSORS_NAME).is_file()


@pytest.mark.parametrize("windows", ["train", "held_out"])
def test_pipeline_evaluates_what_a_reloaded_checkpoint_serves(tmp_path, monkeypatch, windows):
    """`quant=mobiquant` (a per-linear plan by default): the perplexity in results.csv at every budget,
    fractional ones included, is reproduced exactly by load_quantized + set_budget on a fresh base model;
    a plan built on calibration windows or on unseen windows of the calibration text alike."""
    import pandas as pd

    from mobiquant.evaluation import perplexity
    from mobiquant.io.data import eval_windows
    from mobiquant.tasks.quantize import run
    from mobiquant.tasks.session import load_base_model, load_token_ids
    from test_pipeline import smoke_cfg

    monkeypatch.setenv("WANDB_MODE", "offline")
    cfg = smoke_cfg(
        tmp_path, "baselines=none", "budget.budgets=[3,3.5,4.25,8]", "plan.step=0.5", f"plan.windows={windows}"
    )
    run(cfg)
    df = pd.read_csv(tmp_path / "run" / "results.csv")
    folder = tmp_path / "run" / "checkpoints" / "mobiquant"
    meta = json.loads((folder / CONFIG_NAME).read_text())
    assert meta["plan"]["settings"]["per"] == "linear" and meta["extra"]["plan_seconds"] > 0
    assert meta["plan"]["settings"]["windows"] == windows
    base, tokenizer = load_base_model(cfg)
    model = mq.load_quantized(base, folder)
    spec = next(iter(cfg.data.eval.values()))
    windows = eval_windows(load_token_ids(spec, tokenizer), cfg.eval.seqlen, cfg.eval.max_windows)
    for row in df[df["method"] == "mobiquant"].itertuples():
        mq.set_budget(model, row.budget)
        assert perplexity(model, windows)["ppl"] == row.ppl, row.budget


def _plans_equal(a: BudgetPlan, b: BudgetPlan) -> bool:
    return (
        a.budgets == b.budgets
        and a.linears == b.linears
        and a.reading == b.reading
        and torch.equal(a.taus, b.taus)
        and torch.equal(a.local, b.local)
    )


def test_an_interrupted_plan_resumes_at_the_next_budget(planned, tmp_path, monkeypatch):
    """Cost curves and finished budgets are saved as they complete; a rerun computes only what is missing
    and gives the plan of an uninterrupted build. Another key starts over."""
    import mobiquant.elastic.site_budgets as sb

    model, ids, reference = planned
    settings = dict(per="linear", step=0.5, sensitivity_windows=4, select_windows=4, batch_size=2, select_at="all")
    state = tmp_path / "plan_state"
    calls = {"n": 0}
    real_apply = sb.apply_linear_budgets

    def dying_apply(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt  # killed while refitting the third budget
        return real_apply(*args, **kwargs)

    monkeypatch.setattr(sb, "apply_linear_budgets", dying_apply)
    with pytest.raises(KeyboardInterrupt):
        build_plan(model, ids, state_dir=state, state_key={"ckpt": "a"}, **settings)
    assert sorted(p.name for p in state.glob("budget_*.json")) == ["budget_2.0000.json", "budget_2.5000.json"]
    monkeypatch.setattr(sb, "apply_linear_budgets", real_apply)
    monkeypatch.setattr(sb, "site_cost_curves", lambda *a, **k: pytest.fail("cost curves measured again"))
    resumed = build_plan(model, ids, state_dir=state, state_key={"ckpt": "a"}, **settings)
    assert _plans_equal(resumed, reference)
    with pytest.raises(pytest.fail.Exception, match="measured again"):  # another checkpoint: nothing reused
        build_plan(model, ids, state_dir=state, state_key={"ckpt": "b"}, **settings)
    assert not list(state.glob("budget_*.json"))


def test_a_run_killed_while_planning_resumes_its_plan(tmp_path, monkeypatch, caplog):
    """The pipeline keeps the plan's finished budgets beside the saved checkpoint: a rerun of the same
    folder reloads the checkpoint, resumes the plan and drops its state once the plan is saved."""
    import logging

    import mobiquant.elastic.site_budgets as sb
    from mobiquant.tasks.quantize import run
    from test_pipeline import smoke_cfg

    monkeypatch.setenv("WANDB_MODE", "offline")
    cfg = smoke_cfg(tmp_path, "baselines=none", "budget.budgets=[3,4]", "plan.step=0.5")
    real_apply, calls = sb.apply_linear_budgets, {"n": 0}

    def dying_apply(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 4:
            raise KeyboardInterrupt
        return real_apply(*args, **kwargs)

    monkeypatch.setattr(sb, "apply_linear_budgets", dying_apply)
    with pytest.raises(KeyboardInterrupt):
        run(cfg)
    state = tmp_path / "run" / "calib_state" / "mobiquant-plan"
    assert len(list(state.glob("budget_*.json"))) == 3
    monkeypatch.setattr(sb, "apply_linear_budgets", real_apply)
    with caplog.at_level(logging.INFO):
        run(cfg)
    assert "resumed from checkpoint" in caplog.text and caplog.text.count("resumed (") == 3
    assert not state.exists()


def test_refitted_thresholds_are_each_linears_mean_batch_quantile():
    """apply_linear_budgets(..., calib_ids): every linear's threshold is the mean over the windows of the batch
    quantile (batch_tau) of its router's gate values at its own budget, with every linear routing at its own
    batch quantile: the ThresholdRecorder reproduces that definition, written out here with hooks, exactly."""
    from mobiquant.elastic.site_budgets import apply_linear_budgets
    from mobiquant.nn.router import batch_tau

    model = routed_model()
    ids = torch.randint(0, 128, (3, 32), generator=torch.Generator().manual_seed(5))
    fit_budget_thresholds(model, list(ids.split(1)), default_grid((2, 2, 2, 2), 0.5))
    lin = {n: m for n, m in mobi_linears(model) if m.router is not None}
    alloc = {n: [2.0, 3.25, 4.5, 5.0, 6.75, 8.0][i % 6] for i, n in enumerate(lin)}
    seen: dict[str, list[torch.Tensor]] = {n: [] for n in lin}

    def own_quantile(mod, args, name):
        r = mod.router
        tau = batch_tau(r.gate_values(r.scores(args[0].reshape(-1, args[0].shape[-1]))), r.slice_bits, alloc[name])
        seen[name].append(tau)
        mod.route_tau = tau

    hooks = [m.register_forward_pre_hook(lambda mod, a, n=n: own_quantile(mod, a, n)) for n, m in lin.items()]
    try:
        with torch.no_grad():
            for w in ids.split(1):
                model(input_ids=w)
    finally:
        for h in hooks:
            h.remove()
    expect = {n: float(torch.stack(t).double().mean()) for n, t in seen.items()}
    apply_linear_budgets(model, alloc, calib_ids=ids, batch_size=1)
    assert {n: m.route_tau for n, m in lin.items()} == expect
    assert all(r.recorder is None for _, r in routers(model))


_SPLIT = dict(per="linear", step=0.5, sensitivity_windows=4, select_windows=4, batch_size=2, select_at="all")


def _split_plan_model():
    model = routed_model()
    ids = torch.randint(0, 128, (8, 32), generator=torch.Generator().manual_seed(3))
    fit_budget_thresholds(model, list(ids.split(2)), default_grid((2, 2, 2, 2), 0.5))
    return model, ids


def _plan_on_rank(rank, world, init_file, out_dir):
    import torch.distributed as dist

    import mobiquant.elastic.site_budgets as sb

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        model, ids = _split_plan_model()
        refits = []
        real_apply = sb.apply_linear_budgets
        sb.apply_linear_budgets = lambda *a, **k: (refits.append(1), real_apply(*a, **k))[1]
        state = f"{out_dir}/state" if rank == 0 else None  # as in a run: rank 0 alone keeps the state
        plan = build_plan(model, ids, state_dir=state, state_key={"ckpt": "a"}, **_SPLIT)
        torch.save({"plan": (plan.state(), plan.meta()), "refits": len(refits)}, f"{out_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_plan_budgets_split_across_ranks_match_one_process(tmp_path):
    """Under torch.distributed each rank plans every N-th budget and the rows are exchanged: every rank ends
    with the plan one process builds alone, and rank 0's saved state holds every budget."""
    import torch.multiprocessing as tmp

    model, ids = _split_plan_model()
    alone = build_plan(model, ids, **_SPLIT)
    tmp.spawn(_plan_on_rank, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    n = len(alone.budgets)
    for rank, refits in ((0, (n + 1) // 2), (1, n // 2)):
        saved = torch.load(tmp_path / f"rank{rank}.pt")
        assert saved["refits"] == refits
        assert _plans_equal(BudgetPlan.from_state(*saved["plan"]), alone)
    assert len(list((tmp_path / "state").glob("budget_*.json"))) == n

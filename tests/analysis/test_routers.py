"""``task=routers`` end to end on the tiny random LLaMA (experiment=routers_smoke), resume, bad inputs."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from mobiquant.evaluation import perplexity
from mobiquant.io.checkpoint import load_quantized
from mobiquant.io.data import eval_windows
from mobiquant.patching import achieved_bits, reset_counts, set_budget
from mobiquant.tasks.analysis import routers
from mobiquant.tasks.session import ConfigError, load_base_model, load_token_ids

FILES = [
    "router_sites.csv",
    "router_layers.csv",
    "router_budgets.csv",
    "router_bits.png",
    "router_k_shares.png",
    "routers.md",
    "calibration.csv",
]
BUDGETS = [2, 2.5, 3, 3.5, 4, 5, 6, 8]
# the 2-bit-slice layout: four views that cover the whole 2-8 bit grid of the smoke run
SMOKE = ("experiment=routers_smoke", "quant.mobi.slice_bits=[2,2,2,2]")
SHARES = [f"share_k{k}" for k in range(1, 5)]


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory, compose_cfg):
    root = tmp_path_factory.mktemp("routers")
    # the 2-bit-slice layout: four views that cover the whole 2-8 bit grid
    cfg = compose_cfg(root / "run", *SMOKE)
    metric = routers.run(cfg)
    return root / "run", metric, cfg


def test_routers_writes_every_file(smoke_run):
    out, metric, _ = smoke_run
    for name in FILES:
        assert (out / name).stat().st_size > 0, name
    md = (out / "routers.md").read_text()
    assert "Achieved bits per layer" in md and "Deviation from the model's achieved bits" in md
    layers = pd.read_csv(out / "router_layers.csv")
    assert metric == pytest.approx(layers["abs_deviation"].mean())
    assert (out / "checkpoints" / "mobiquant" / "mobiquant.json").is_file()


def test_k_distributions_sum_to_one(smoke_run):
    out, _, _ = smoke_run
    sites = pd.read_csv(out / "router_sites.csv")
    layers = pd.read_csv(out / "router_layers.csv")
    for df in (sites, layers):
        np.testing.assert_allclose(df[SHARES].sum(axis=1), 1.0, atol=1e-12)
        assert (df[SHARES] >= 0).all().all()
    # the default placement, block, on LLaMA: one router a block, at q/k/v's input, deciding for all seven linears
    one = sites[(sites["budget"] == 3) & (sites["layer"] == 0)]
    assert dict(zip(one["site"], one["linears"], strict=True)) == {"self_attn_q_proj": 7}
    assert (sites["tokens"] == 4 * 64).all()  # every window token, counted once per site
    assert sorted(sites["budget"].unique()) == BUDGETS and sorted(layers["layer"].unique()) == [0, 1]


def test_achieved_bits_in_range_and_consistent_with_the_global_figure(smoke_run):
    out, _, _ = smoke_run
    sites = pd.read_csv(out / "router_sites.csv")
    layers = pd.read_csv(out / "router_layers.csv")
    per_budget = pd.read_csv(out / "router_budgets.csv")
    for df in (sites, layers):
        assert df["achieved_bits"].between(2, 8).all()
        widths = np.array([2, 4, 6, 8])
        np.testing.assert_allclose(df[SHARES].to_numpy() @ widths, df["achieved_bits"], rtol=1e-12)
    for r in per_budget.itertuples():
        lay = layers[layers["budget"] == r.budget]
        site = sites[sites["budget"] == r.budget]
        weighted = (lay["params"] * lay["achieved_bits"]).sum() / lay["params"].sum()
        assert weighted == pytest.approx(r.achieved_bits, rel=1e-12)
        assert (site["params"] * site["achieved_bits"]).sum() / site["params"].sum() == pytest.approx(
            r.achieved_bits, rel=1e-12
        )
        np.testing.assert_allclose(lay["deviation"], lay["achieved_bits"] - r.achieved_bits, atol=1e-12)
        assert abs(r.achieved_bits - r.budget) < 0.5
        assert math.isfinite(r.ppl)
    # the lowest and highest budgets leave the routers no choice: every token uses 1 / all slices
    for b, k in ((2, "share_k1"), (8, "share_k4")):
        assert (sites.loc[sites["budget"] == b, k] == 1).all()
        assert (layers.loc[layers["budget"] == b, "deviation"] == 0).all()


def test_global_bits_match_the_checkpoint_reloaded(smoke_run):
    """The global achieved bits are what `achieved_bits` reports for the saved checkpoint on the same text."""
    out, _, cfg = smoke_run
    base, tok = load_base_model(cfg)
    model = load_quantized(base, out / "checkpoints" / "mobiquant")
    windows = eval_windows(load_token_ids(cfg.data.eval.wiki_extract, tok), cfg.eval.seqlen, cfg.eval.max_windows)
    per_budget = pd.read_csv(out / "router_budgets.csv").set_index("budget")
    for b in (2.5, 3.5):
        set_budget(model, b)
        reset_counts(model)
        ppl = perplexity(model, windows)["ppl"]
        assert achieved_bits(model) == pytest.approx(per_budget.loc[b, "achieved_bits"], rel=1e-12)
        assert ppl == pytest.approx(per_budget.loc[b, "ppl"], rel=1e-9)


def test_resume_does_not_recalibrate(smoke_run, compose_cfg, no_calibration):
    out, metric, _ = smoke_run
    before = pd.read_csv(out / "router_layers.csv")
    assert routers.run(compose_cfg(out, *SMOKE)) == pytest.approx(metric)
    pd.testing.assert_frame_equal(pd.read_csv(out / "router_layers.csv"), before)
    assert "reloaded from" in (out / "routers.md").read_text()


def test_explicit_budgets(tmp_path, compose_cfg, smoke_run, no_calibration):
    """analysis.routers.budgets replaces the grid; the checkpoint of another run directory is reused
    by copying it (no calibration)."""
    import shutil

    out, _, _ = smoke_run
    shutil.copytree(out / "checkpoints", tmp_path / "run" / "checkpoints")
    routers.run(
        compose_cfg(tmp_path / "run", *SMOKE, "analysis.routers.budgets=[3.25,2.5]", "analysis.routers.early_layers=1")
    )
    assert sorted(pd.read_csv(tmp_path / "run" / "router_budgets.csv")["budget"]) == [2.5, 3.25]


@pytest.mark.parametrize(
    "override,fragment",
    [
        ("analysis.routers.budgets=[1.5]", "analysis.routers.budgets[0]=1.5 is out of range"),
        ("analysis.routers.budgets=[3,8.5]", "analysis.routers.budgets[1]=8.5 is out of range"),
        ("analysis.routers.budgets=[]", "non-empty list"),
        ("analysis.routers.budgets=[low]", "is not a number"),
        ("quant=lwc", "routed MoBiQuant"),
        ("quant=mobiquant_static", "routed MoBiQuant"),
        ("quant.mobi.slice_bits=[4]", "no router to analyse"),
        ("analysis.dataset=wikitext2", "not an evaluation corpus"),
        ("trainer=ddp", "runs in one process"),
    ],
)
def test_bad_inputs_fail_before_work(override, fragment, tmp_path, compose_cfg):
    overrides = ["experiment=routers_smoke", override]
    if override == "quant.mobi.slice_bits=[4]":
        overrides.append("budget.budgets=[4]")
    cfg = compose_cfg(tmp_path / "run", *overrides)
    with pytest.raises(ConfigError) as e:
        routers.run(cfg)
    assert fragment in str(e.value)
    assert not (tmp_path / "run").exists()


def test_early_layers_checked_against_the_model(tmp_path, compose_cfg, no_calibration):
    cfg = compose_cfg(tmp_path / "run", "experiment=routers_smoke", "analysis.routers.early_layers=2")
    with pytest.raises(ConfigError, match="early_layers=2 is invalid.*this model has 2 blocks"):
        routers.run(cfg)


def test_site_placement_reports_one_row_a_router_site(tmp_path, compose_cfg):
    """``router=site`` (the paper's placement): q/k/v share a router, gate/up share one, o_proj and down_proj one
    each, every site's shares a distribution."""
    out = tmp_path / "run"
    routers.run(compose_cfg(out, *SMOKE, "router=site", "analysis.routers.budgets=[3]"))
    sites = pd.read_csv(out / "router_sites.csv")
    np.testing.assert_allclose(sites[SHARES].sum(axis=1), 1.0, atol=1e-12)
    one = sites[(sites["budget"] == 3) & (sites["layer"] == 0)]
    assert dict(zip(one["site"], one["linears"], strict=True)) == {
        "self_attn_q_proj": 3,
        "self_attn_o_proj": 1,
        "mlp_gate_proj": 2,
        "mlp_down_proj": 1,
    }

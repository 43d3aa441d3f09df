"""``task=outliers`` end to end on the tiny random LLaMA (experiment=outliers_smoke), its pieces, resume,
and bad inputs rejected before any work."""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
import torch
from safetensors.torch import load_file

from mobiquant.evaluation import perplexity
from mobiquant.io.checkpoint import load_quantized
from mobiquant.patching import mobi_linears
from mobiquant.tasks.analysis import outliers
from mobiquant.tasks.analysis.outliers import (
    CLIPPING_NAME,
    TokenPrecisionSplit,
    requantize_lwc,
    split_nll,
    top_mask,
)
from mobiquant.tasks.session import ConfigError, load_base_model

FILES = [
    "token_errors.csv",
    "ppl_matrix.csv",
    "jaccard.csv",
    "top_tokens.csv",
    "ppl_matrix.png",
    "error_scatter.png",
    "outliers.md",
    "calibration.csv",
]


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory, compose_cfg):
    """One ``experiment=outliers_smoke`` run with the W&B logger (offline), shared by the tests below."""
    root = tmp_path_factory.mktemp("outliers")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("WANDB_MODE", "offline")
        mp.setenv("WANDB_SILENT", "true")
        mp.setenv("WANDB_DIR", str(root))
        cfg = compose_cfg(root / "run", "experiment=outliers_smoke", "logger=wandb")
        metric = outliers.run(cfg)
    return root / "run", metric, cfg


def windows_from(errors: pd.DataFrame) -> torch.Tensor:
    """The evaluation windows, rebuilt from token_errors.csv (tokens, plus each window's last next token)."""
    rows = []
    for _, g in errors.groupby("window", sort=True):
        g = g.sort_values("position")
        rows.append(g["token"].tolist() + [int(g["next_token"].iloc[-1])])
    return torch.tensor(rows, dtype=torch.long)


def test_outliers_writes_every_file(smoke_run):
    out, _, _ = smoke_run
    for name in FILES:
        assert (out / name).stat().st_size > 0, name
    md = (out / "outliers.md").read_text()
    assert "Perplexity: calibrated at" in md and "Jaccard" in md and "top at A" in md
    for tag in ("lwc-w3", "lwc-w4"):
        assert (out / "checkpoints" / tag / "mobiquant.json").is_file()
        assert (out / "checkpoints" / tag / CLIPPING_NAME).is_file()
    assert (out / "checkpoints" / "mobiquant" / "mobiquant.json").is_file()
    assert set(pd.read_csv(out / "calibration.csv")["method"]) == {"lwc-w3", "lwc-w4", "mobiquant"}


def test_ppl_matrix_shape_and_bits(smoke_run):
    out, _, cfg = smoke_run
    m = pd.read_csv(out / "ppl_matrix.csv")
    q = m[m["calibrated"] != "fp"]
    pivot = q.pivot_table(index="calibrated", columns="run_at_bits", values="ppl")
    assert pivot.shape == (3, 2)  # lwc-w3, lwc-w4, mobiquant x run at 3, 4
    assert sorted(pivot.index) == ["lwc-w3", "lwc-w4", "mobiquant"]
    assert list(pivot.columns) == [3.0, 4.0]
    assert (m["ppl"] > 1).all() and m["ppl"].map(math.isfinite).all()
    assert len(m[m["calibrated"] == "fp"]) == 1
    lwc = q[q["calibrated"] != "mobiquant"]
    assert (lwc["avg_bits"] == lwc["run_at_bits"]).all()  # one slice of B bits, counted per token
    mobi = q[q["calibrated"] == "mobiquant"]
    assert ((mobi["avg_bits"] - mobi["run_at_bits"]).abs() < 0.5).all()  # measured by the routers
    assert (m["n_windows"] == cfg.eval.max_windows).all() and (m["seqlen"] == cfg.eval.seqlen).all()


def test_ppl_of_the_checkpoint_matches_the_evaluation_protocol(smoke_run):
    """The matrix cell 'calibrated at 3, run at 3' is the saved checkpoint's perplexity as
    mobiquant.evaluation.perplexity computes it on the same windows."""
    out, _, cfg = smoke_run
    errors = pd.read_csv(out / "token_errors.csv")
    windows = windows_from(errors)
    fp, _ = load_base_model(cfg)
    assert math.isclose(perplexity(fp, windows)["ppl"], math.exp(errors["fp:nll"].mean()), rel_tol=1e-6)
    model = load_quantized(fp, out / "checkpoints" / "lwc-w3")
    m = pd.read_csv(out / "ppl_matrix.csv")
    cell = m[(m["calibrated"] == "lwc-w3") & (m["run_at_bits"] == 3)]["ppl"].item()
    assert math.isclose(perplexity(model, windows)["ppl"], cell, rel_tol=1e-6)


def test_jaccard_in_unit_interval_and_recomputable(smoke_run):
    out, metric, _ = smoke_run
    jac = pd.read_csv(out / "jaccard.csv")
    errors = pd.read_csv(out / "token_errors.csv")
    n = len(errors)
    assert jac["jaccard"].between(0, 1).all()
    assert set(jac["site"]) == {"block0", "block1", "kl", "dnll"}
    assert (jac["n_top"] == round(0.10 * n)).all() and (jac["n_tokens"] == n).all()
    assert len(jac) == 4 * math.comb(6, 2)  # 4 sites x pairs of the 6 variants
    for r in jac.sample(8, random_state=0).itertuples():
        a = top_mask(errors[f"{r.variant_a}:{r.site}"].to_numpy(), 10)
        b = top_mask(errors[f"{r.variant_b}:{r.site}"].to_numpy(), 10)
        assert math.isclose(r.jaccard, (a & b).sum() / (a | b).sum())
    same = jac[(jac["site"] == "kl") & (jac["variant_a"] == "lwc-w3@3") & (jac["variant_b"] == "lwc-w3@4")]
    assert same["kind"].item() == "same checkpoint, other bits"
    assert metric == pytest.approx(same["jaccard"].item())


def test_top_token_experiment_rows(smoke_run):
    out, _, _ = smoke_run
    top = pd.read_csv(out / "top_tokens.csv")
    errors = pd.read_csv(out / "token_errors.csv")
    assert len(top) == 2 * 3 * 2  # ordered pairs (3->4, 4->3) x token sets x splits
    assert set(top["token_set"]) == {"top at A", "top at B", "random"}
    assert (top["n_set"] == round(0.10 * len(errors))).all()
    assert top["ppl"].map(math.isfinite).all()
    assert ((top["avg_bits"] > top["low_bits"]) & (top["avg_bits"] < top["high_bits"])).all()
    assert (top.loc[top["token_set"] == "top at A", "jaccard_with_top_at_A"] == 1).all()
    assert top["jaccard_with_top_at_A"].between(0, 1).all()
    # the uniform runs of the same checkpoint, from the matrix
    m = pd.read_csv(out / "ppl_matrix.csv")
    for r in top.itertuples():
        cell = m[(m["calibrated"] == f"lwc-w{r.calibrated_at}") & (m["run_at_bits"] == r.low_bits)]["ppl"].item()
        assert r.ppl_all_low == pytest.approx(cell)


def test_figures_and_wandb_run(smoke_run):
    out, _, _ = smoke_run
    runs = list((out / "wandb").glob("offline-run-*"))
    assert len(runs) == 1
    tables = {p.name.split("_")[0] for p in runs[0].glob("files/media/table/outliers/tables/*.table.json")}
    assert tables == {"ppl", "jaccard", "top"}
    logged = json.loads(next(runs[0].glob("files/media/table/outliers/tables/ppl_matrix_*.table.json")).read_text())
    assert "ppl" in logged["columns"] and len(logged["data"]) == len(pd.read_csv(out / "ppl_matrix.csv"))
    images = {p.name.rsplit("_", 2)[0] for p in runs[0].glob("files/media/images/outliers/figures/*.png")}
    assert images == {"ppl_matrix", "error_scatter"}


def test_requantize_at_the_calibrated_bits_gives_the_checkpoint(smoke_run):
    """Keeping the learned clipping and quantizing at A reproduces the A-bit checkpoint bit for bit; at
    B it uses the B-bit grid inside the same window."""
    out, _, cfg = smoke_run
    clipping = load_file(str(out / "checkpoints" / "lwc-w3" / CLIPPING_NAME))
    saved = dict(mobi_linears(load_quantized(load_base_model(cfg)[0], out / "checkpoints" / "lwc-w3")))
    again = dict(mobi_linears(requantize_lwc(load_base_model(cfg)[0], clipping, 3, cfg.group_size)))
    assert saved.keys() == again.keys()
    for name, m in saved.items():
        assert torch.equal(m.plane(0), again[name].plane(0)), name
        assert torch.equal(m.scale, again[name].scale) and torch.equal(m.zero, again[name].zero), name
    at4 = dict(mobi_linears(requantize_lwc(load_base_model(cfg)[0], clipping, 4, cfg.group_size)))
    for name, m in at4.items():
        codes = m.codes()[0]
        assert m.slice_bits == (4,) and int(codes.max()) <= 15 and int(codes.max()) > 7
        # same window: (2^B - 1) steps of B bits span what (2^A - 1) steps of A bits span (fp16 steps)
        torch.testing.assert_close(m.scale.float() * 15, saved[name].scale.float() * 7, rtol=2e-3, atol=1e-6)
    with pytest.raises(ValueError, match="has no"):
        requantize_lwc(load_base_model(cfg)[0], {}, 4, cfg.group_size)


def test_token_precision_split_endpoints(smoke_run):
    """No token in the set: the high model; every token: the low model; hooks removed afterwards."""
    out, _, cfg = smoke_run
    errors = pd.read_csv(out / "token_errors.csv")
    windows = windows_from(errors)[:2]
    clipping = load_file(str(out / "checkpoints" / "lwc-w3" / CLIPPING_NAME))
    low = requantize_lwc(load_base_model(cfg)[0], clipping, 3, cfg.group_size)
    high = requantize_lwc(load_base_model(cfg)[0], clipping, 4, cfg.group_size)
    n = windows.shape[0] * (windows.shape[1] - 1)
    none = split_nll(high, low, windows, np.zeros(n, dtype=bool))
    every = split_nll(high, low, windows, np.ones(n, dtype=bool))
    np.testing.assert_allclose(none, errors["lwc-w3@4:nll"].to_numpy()[:n], rtol=1e-5, atol=1e-6)
    # the unscored last token of each window stays high: compare the first T-2 positions of each window
    T = windows.shape[1]
    every_low = errors["lwc-w3@3:nll"].to_numpy()[:n].reshape(2, T - 1)[:, :-1]
    np.testing.assert_allclose(every.reshape(2, T - 1)[:, :-1], every_low, rtol=1e-5, atol=1e-6)
    assert all(not m._forward_hooks for _, m in mobi_linears(high))
    with pytest.raises(RuntimeError, match="does not fit"):
        with TokenPrecisionSplit(high, low) as split, torch.no_grad():
            split.mask = torch.ones(1, 3, dtype=torch.bool)
            high(input_ids=windows[:1])


def test_top_mask_and_jaccard_helpers():
    v = np.array([0.1, 5.0, 3.0, 3.0, -1.0, 2.0, 0.0, 4.0, 1.0, 0.5])
    assert np.flatnonzero(top_mask(v, 20)).tolist() == [1, 7]
    assert np.flatnonzero(top_mask(v, 30)).tolist() == [1, 2, 7]  # ties: the earlier position
    assert top_mask(v, 1).sum() == 1 and top_mask(v, 100).all()
    a, b = top_mask(v, 30), top_mask(-v, 30)
    assert outliers.jaccard(a, a) == 1.0 and outliers.jaccard(a, b) == 0.0
    assert outliers.random_jaccard(10, 100) == pytest.approx(0.1 / 1.9)


def test_resume_does_not_recalibrate(smoke_run, compose_cfg, no_calibration):
    out, metric, _ = smoke_run
    before = pd.read_csv(out / "ppl_matrix.csv")
    calib_before = (out / "calibration.csv").read_bytes()
    again = outliers.run(compose_cfg(out, "experiment=outliers_smoke"))
    assert again == metric
    pd.testing.assert_frame_equal(pd.read_csv(out / "ppl_matrix.csv"), before)
    assert (out / "calibration.csv").read_bytes() == calib_before  # nothing calibrated, nothing rewritten


@pytest.mark.slow  # three runs of the task: tens of seconds on a 2-core CPU
def test_missing_clipping_or_other_settings_recalibrate(tmp_path, compose_cfg, monkeypatch):
    """A checkpoint without its learned clipping (e.g. written by task=quantize) cannot run at other bits:
    only that LWC checkpoint is calibrated again; other LWC calibration settings recalibrate both."""
    cfg = compose_cfg(tmp_path / "run", "experiment=outliers_smoke", "analysis.outliers.mobiquant=false")
    outliers.run(cfg)
    (tmp_path / "run" / "checkpoints" / "lwc-w4" / CLIPPING_NAME).unlink()
    calls = []
    real = outliers.calibrate_model

    def counting(model, ids, mobi, *args, **kwargs):
        calls.append(mobi.slice_bits)
        return real(model, ids, mobi, *args, **kwargs)

    monkeypatch.setattr(outliers, "calibrate_model", counting)
    outliers.run(cfg)
    assert calls == [(4,)]
    assert (tmp_path / "run" / "checkpoints" / "lwc-w4" / CLIPPING_NAME).is_file()
    m = pd.read_csv(tmp_path / "run" / "ppl_matrix.csv")
    assert set(m["calibrated"]) == {"fp", "lwc-w3", "lwc-w4"}
    # other LWC calibration settings: both checkpoints are stale (in a folder of its own, the checkpoints
    # copied there: the run folder of the first settings refuses other ones)
    calls.clear()
    shutil.copytree(tmp_path / "run" / "checkpoints", tmp_path / "other" / "checkpoints")
    outliers.run(
        compose_cfg(
            tmp_path / "other",
            "experiment=outliers_smoke",
            "analysis.outliers.mobiquant=false",
            "analysis.outliers.lwc_calib.lr_lwc=0.02",
        )
    )
    assert calls == [(3,), (4,)]


@pytest.mark.slow  # two runs of the task: tens of seconds on a 2-core CPU
def test_interrupted_lwc_calibration_resumes_with_its_clipping(smoke_run, tmp_path, compose_cfg, monkeypatch):
    """Stopped after block 0 of lwc-w3: the re-run reloads block 0 from the calibration state together
    with its learned clipping, and ends with the clipping of an uninterrupted run."""
    from mobiquant.io.tracking import Tracker

    def stop(self, method, block, report):
        if (method, block) == ("lwc-w3", 0):
            raise KeyboardInterrupt

    cfg = compose_cfg(tmp_path / "run", "experiment=outliers_smoke", "analysis.outliers.mobiquant=false")
    with monkeypatch.context() as mp:
        mp.setattr(Tracker, "log_block", stop)
        with pytest.raises(KeyboardInterrupt):
            outliers.run(cfg)
    state = tmp_path / "run" / "calib_state" / "lwc-w3"
    assert (state / "block_000.safetensors").is_file() and (state / "clip_000.safetensors").is_file()
    outliers.run(cfg)
    assert not state.exists()  # superseded by the checkpoint
    resumed = load_file(str(tmp_path / "run" / "checkpoints" / "lwc-w3" / CLIPPING_NAME))
    reference = load_file(str(smoke_run[0] / "checkpoints" / "lwc-w3" / CLIPPING_NAME))
    assert resumed.keys() == reference.keys()
    for key, t in reference.items():
        assert torch.equal(resumed[key], t), key


@pytest.mark.parametrize(
    "override,fragment",
    [
        ("analysis.outliers.bits=[3,9]", "analysis.outliers.bits[1]=9 is out of range"),
        ("analysis.outliers.bits=[0,4]", "analysis.outliers.bits[0]=0 is out of range"),
        ("analysis.outliers.bits=[1,4]", "out of range for the MoBiQuant row"),
        ("analysis.outliers.bits=[3]", "at least two bit-widths"),
        ("analysis.outliers.bits=[3,3]", "twice"),
        ("analysis.outliers.top_percent=0", "0 < p <= 100"),
        ("analysis.outliers.top_percent=100.5", "0 < p <= 100"),
        ("analysis.outliers.top_percent=-10", "0 < p <= 100"),
        ("analysis.outliers.block_error=l1", "block_error"),
        ("analysis.outliers.rank_by=logits", "rank_by"),
        ("analysis.dataset=ptb", "not an evaluation corpus"),
        ("data.eval.wiki_extract.split=calib", "is the calibration text itself"),
        ("quant=lwc", "routed MoBiQuant"),
        ("calib.epochs_stage1=0", "at least one stage-1 epoch"),
        ("analysis.outliers.lwc_calib.epochs_stage1=0", "at least one stage-1 epoch"),
        ("+analysis.outliers.lwc_calib.learning_rate=0.1", "analysis.outliers.lwc_calib={'learning_rate': 0.1}"),
        ("budget.budgets=[2,9]", "budget.budgets[1]=9"),
    ],
)
def test_bad_inputs_fail_before_work(override, fragment, tmp_path, compose_cfg):
    cfg = compose_cfg(tmp_path / "run", "experiment=outliers_smoke", override)
    with pytest.raises(ConfigError) as e:
        outliers.run(cfg)
    assert fragment in str(e.value)
    assert not (tmp_path / "run").exists()  # failed before the run directory was made


def test_bad_layers_fail_before_calibration(tmp_path, compose_cfg, no_calibration):
    """Block indices are checked against the loaded model, before any calibration."""
    cfg = compose_cfg(tmp_path / "run", "experiment=outliers_smoke", "analysis.outliers.layers=[0,2]")
    with pytest.raises(ConfigError, match=r"layers\[1\]=2 is outside this model's 2 blocks: allowed -2 to 1"):
        outliers.run(cfg)
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_rank_site_must_be_a_measured_block():
    assert outliers.resolve_rank_site("kl", [0, 1], 2) == "kl"
    assert outliers.resolve_rank_site("block-1", [0, 1], 2) == "block1"
    with pytest.raises(ConfigError, match="not measured"):
        outliers.resolve_rank_site("block1", [0], 2)
    with pytest.raises(ConfigError, match="not measured"):
        outliers.resolve_rank_site("block5", [0, 1], 2)


@pytest.mark.slow  # a child process starting the app: tens of seconds on a 2-core CPU
def test_cli_reports_a_bad_percentage_in_one_line(tmp_path):
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "mobiquant",
            "experiment=outliers_smoke",
            "analysis.outliers.top_percent=0",
            f"hydra.run.dir={tmp_path / 'run'}",
        ],
        capture_output=True,
        text=True,
        timeout=120,
        env={**__import__("os").environ, "OMP_NUM_THREADS": "1"},
    )
    assert proc.returncode == 2
    assert "mobiquant: invalid configuration: analysis.outliers.top_percent=0" in proc.stderr
    assert "Traceback" not in proc.stderr

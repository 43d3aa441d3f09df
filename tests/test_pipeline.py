"""``experiment=smoke`` end to end on the tiny random model: files, tables, W&B offline run, resume."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pandas as pd
import pytest
from hydra import compose, initialize_config_dir
from hydra.core.hydra_config import HydraConfig
from omegaconf import open_dict

from mobiquant.__main__ import CONF_DIR
from mobiquant.io.results import COLUMNS, first_windows_ppl
from mobiquant.tasks.quantize import run
from wandb_offline import read_run

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def smoke_cfg(tmp_path: Path, *overrides: str):
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose("config", overrides=["experiment=smoke", *overrides], return_hydra_config=True)
    HydraConfig.instance().set_config(cfg)
    with open_dict(cfg):
        del cfg["hydra"]
        cfg.paths.output_dir = str(tmp_path / "run")
        cfg.paths.cache_dir = str(tmp_path / "cache")
        cfg.paths.shared_data_dir = str(SHARED)
    return cfg


@pytest.fixture
def wandb_env(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wandb_dir"))
    monkeypatch.setenv("WANDB_SILENT", "true")
    (tmp_path / "wandb_dir").mkdir()


def test_smoke_end_to_end_with_wandb_offline(tmp_path, wandb_env):
    cfg = smoke_cfg(tmp_path, "logger=wandb")
    metric = run(cfg)
    out = tmp_path / "run"
    df = pd.read_csv(out / "results.csv")
    assert set(COLUMNS) <= set(df.columns)
    # fp once, rtn at integer budgets, mobiquant at every budget of the grid its slices [3, 1, 1, 1, 1, 1] serve
    assert set(df["method"]) == {"fp", "rtn", "mobiquant"}
    mobi = df[df["method"] == "mobiquant"].sort_values("budget")
    assert mobi["budget"].tolist() == [3.0, 4.0, 8.0]
    assert (mobi["avg_bits"] - mobi["budget"]).abs().max() < 0.5  # measured, not assumed
    assert df["ppl"].map(math.isfinite).all()
    assert (df["n_windows"] == 4).all() and (df["seqlen"] == 64).all()
    assert math.isclose(metric, mobi["ppl"].map(math.log).mean(), rel_tol=1e-9)  # the sweepers' objective
    for name in ("elasticity.png", "results.md", "calibration.csv"):
        assert (out / name).stat().st_size > 0, name
    win = pd.read_csv(out / "windows.csv")  # every evaluation's windows, the perplexity of each row
    assert len(win) == 4 * len(df)
    per_eval = first_windows_ppl(win).merge(df, on=["method", "budget", "dataset"])
    assert len(per_eval) == len(df)
    assert (per_eval["ppl_x"] - per_eval["ppl_y"]).abs().max() <= 1e-9 * per_eval["ppl_y"].max()
    ck = out / "checkpoints" / "mobiquant"
    meta = json.loads((ck / "mobiquant.json").read_text())
    assert meta["config"]["slice_bits"] == [3, 1, 1, 1, 1, 1] and meta["plan"]["settings"]["per"] == "linear"
    calib = pd.read_csv(out / "calibration.csv")
    assert len(calib) == 2 and calib["final_mse"].map(math.isfinite).all()
    # W&B offline run: exists and holds the logged results table
    runs = list((out / "wandb").glob("offline-run-*"))
    assert len(runs) == 1
    tables = list(runs[0].glob("files/media/table/results_*.table.json"))
    assert tables, "results table not logged to W&B"
    logged = json.loads(tables[0].read_text())
    assert "ppl" in logged["columns"] and len(logged["data"]) == len(df)
    # the summary: one key per method, dataset and budget, and the whole curve as `objective`
    wb = read_run(runs[0])
    assert wb["group"] == "smoke" and wb["name"] == "smoke-mobiquant"  # a single run: its experiment
    assert {"method:mobiquant", "model:tiny-llama", "budgets:2,3,4,8"} <= set(wb["tags"])
    summary = wb["summary"]
    assert summary["objective"] == pytest.approx(metric)
    for b, ppl in zip(mobi["budget"], mobi["ppl"], strict=True):
        assert summary[f"ppl/mobiquant/wiki_extract/b{b:g}"] == pytest.approx(ppl)
    assert summary["ppl/fp/wiki_extract"] == pytest.approx(df.loc[df["method"] == "fp", "ppl"].iloc[0])
    assert "eval/mobiquant/wiki_extract/ppl" not in summary  # was the last (8-bit) row, not the curve


def test_resume_skips_finished_rows(tmp_path, wandb_env):
    cfg = smoke_cfg(tmp_path, "logger=none", "baselines=fp")
    run(cfg)
    out = tmp_path / "run"
    first = pd.read_csv(out / "results.csv")
    (out / "checkpoints").rename(out / "moved")  # a recalibration would recreate it
    run(smoke_cfg(tmp_path, "logger=none", "baselines=fp"))
    second = pd.read_csv(out / "results.csv")
    pd.testing.assert_frame_equal(first, second)
    assert not (out / "checkpoints").exists()


def test_saved_checkpoint_reused_only_with_the_same_calibration(tmp_path, wandb_env, caplog):
    """A checkpoint in a run folder is reused for the same calibration settings and tokens, never for others.

    The same folder refuses another configuration (its identity), so each re-run below gets a new folder
    holding a copy of the first run's checkpoints: a checkpoint is found by what it is, not by name."""
    import logging
    import shutil

    args = ("logger=none", "baselines=none", "budget.budgets=[4]")
    run(smoke_cfg(tmp_path / "first", *args))
    first_ckpts = tmp_path / "first" / "run" / "checkpoints"
    first = json.loads((first_ckpts / "mobiquant" / "mobiquant.json").read_text())["extra"]["calib"]
    assert first["lr_lwc"] == 1e-2 and first["calib_tokens"].startswith("[")
    reruns = iter(range(100))

    def rerun(*extra):
        root = tmp_path / f"rerun{next(reruns)}"
        shutil.copytree(first_ckpts, root / "run" / "checkpoints")
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="mobiquant"):
            run(smoke_cfg(root, *args, *extra))
        return caplog.text, root / "run"

    text, out = rerun()
    assert "resumed from checkpoint" in text
    text, out = rerun("calib.lr_lwc=0.02")
    assert "other calibration settings or tokens (lr_lwc)" in text and "resumed from" not in text
    meta_file = out / "checkpoints" / "mobiquant" / "mobiquant.json"
    assert json.loads(meta_file.read_text())["extra"]["calib"]["lr_lwc"] == 0.02  # the new calibration
    text, _ = rerun("seed=3")  # other calibration windows
    assert "calib_tokens" in text and "resumed from" not in text
    assert "resumed from" not in rerun("resume=false")[0]  # calibrate anew
    # Found by what it is, not by name: the uniform reading of the same settings reuses this checkpoint.
    text, out = rerun("quant=mobiquant_uniform")
    assert f"resumed from checkpoint {out / 'checkpoints' / 'mobiquant'}" in text
    text, _ = rerun("model.tiny.seed=1")  # another base model: its checkpoints are never reused
    assert "built for another base model" in text and "resumed from" not in text


def test_text_files_corpus_from_shared_data(tmp_path, wandb_env):
    if not SHARED.exists():
        pytest.skip("../shared/data is not beside the repository")
    cfg = smoke_cfg(
        tmp_path,
        "logger=csv",
        "baselines=none",
        "data=wikitext2_local",
        "data.calib.corpus=text_files",
        f"data.calib.paths=[{SHARED}/ptb/ptb.valid.txt]",
        "budget.budgets=[3,8]",
    )
    run(cfg)
    df = pd.read_csv(tmp_path / "run" / "results.csv")
    assert set(df["dataset"]) == {"wikitext2", "ptb"}
    assert list((tmp_path / "run" / "csv").rglob("metrics.csv")), "Lightning CSV logger wrote no metrics"

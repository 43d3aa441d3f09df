"""Run identity (W&B group, name, tags) and the run summary's objective, with W&B offline."""

from __future__ import annotations

import math

import pandas as pd
import pytest
from hydra import compose, initialize_config_dir
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import open_dict

from mobiquant.__main__ import CONF_DIR
from mobiquant.io.tracking import OBJECTIVE, Tracker, curve_summary, plain_config, run_group, run_name, run_tags
from wandb_offline import read_run

SWEEP = ["quant=mobiquant,rtn", "seed=0,1"]  # `mobiquant -m experiment=smoke quant=mobiquant,rtn seed=0,1`


def _job_cfg(overrides, tmp_path, multirun=True):
    """A job's config as the task sees it inside a Hydra multirun (or a single run)."""
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose("config", overrides=list(overrides), return_hydra_config=True)
    with open_dict(cfg):
        cfg.hydra.mode = RunMode.MULTIRUN if multirun else RunMode.RUN
        cfg.hydra.sweep.dir = "outputs/smoke/multiruns/2026-11-30_10-00-00"
    HydraConfig.instance().set_config(cfg)
    cfg = cfg.copy()
    with open_dict(cfg):
        del cfg["hydra"]
        cfg.paths.output_dir = str(tmp_path)
    return cfg


def _jobs():
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parsed = OverridesParser.create().parse_overrides(["experiment=smoke", *SWEEP, "logger=wandb"])
    return [job for batch in BasicSweeper.split_arguments(parsed, None) for job in batch]


@pytest.fixture
def wandb_offline(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.delenv("WANDB_SWEEP_ID", raising=False)


def test_plain_multirun_jobs_share_a_group_and_have_distinct_names(tmp_path, wandb_offline):
    jobs = _jobs()
    assert len(jobs) == 4
    names, groups = [], set()
    for job in jobs:
        config = plain_config(_job_cfg(job, tmp_path))
        names.append(run_name(config))
        groups.add(run_group(config))
    assert groups == {"outputs/smoke/multiruns/2026-11-30_10-00-00"}
    assert names == ["smoke-mobiquant-seed=0", "smoke-mobiquant-seed=1", "smoke-rtn-seed=0", "smoke-rtn-seed=1"]


def test_group_precedence(tmp_path, wandb_offline, monkeypatch):
    single = plain_config(_job_cfg(["experiment=smoke"], tmp_path, multirun=False))
    assert run_group(single) == "smoke"  # a single run: its experiment
    monkeypatch.setenv("WANDB_SWEEP_ID", "swp9")
    assert run_group(single) == "swp9"  # under `wandb agent`: the W&B sweep
    assert run_group({**single, "logger_group": "mine"}) == "mine"  # set by hand or by a preset


def test_tags_name_method_model_and_budgets(tmp_path):
    config = plain_config(_job_cfg(["experiment=smoke", "quant=rtn", "tags=[ablation]"], tmp_path))
    assert run_tags(config) == ["ablation", "method:rtn", "model:tiny-llama", "budgets:2,3,4,8"]
    assert (
        run_name(
            config,
            overrides=["hydra/launcher=local", "paths.cache_dir=/x", "router.hidden=8", "quant=rtn", "logger=wandb"],
        )
        == "smoke-rtn-router.hidden=8"
    )


def test_wandb_run_of_a_multirun_job(tmp_path, wandb_offline):
    """The real WandbLogger behind Tracker: group, name and tags as the run records them; the summary."""
    cfg = _job_cfg(["experiment=smoke", "quant=rtn", "seed=1", "logger=wandb"], tmp_path)
    tracker = Tracker(cfg.logger, plain_config(cfg))
    run_dir = tracker.wandb_dir
    tracker.log_row({"method": "rtn", "dataset": "wiki", "ppl": 20.0, "avg_bits": 4.0})
    tracker.log_summary({OBJECTIVE: 3.0, "ppl/rtn/wiki/b4": 20.0})
    tracker.finish(failed=False)
    from pathlib import Path

    wb = read_run(Path(run_dir).parent)
    assert wb["group"] == "outputs/smoke/multiruns/2026-11-30_10-00-00"
    assert wb["name"] == "smoke-rtn-seed=1"
    assert {"method:rtn", "model:tiny-llama", "budgets:2,3,4,8"} <= set(wb["tags"])
    assert wb["summary"][OBJECTIVE] == 3.0 and wb["summary"]["ppl/rtn/wiki/b4"] == 20.0
    assert "eval/rtn/wiki/ppl" not in wb["summary"]  # one row's value is not the run's


def test_explicit_logger_settings_are_kept(tmp_path, wandb_offline):
    from mobiquant.io.tracking import wandb_identity

    cfg = _job_cfg(["experiment=smoke", "logger=wandb", "logger.wandb.name=mine", "logger.wandb.group=g"], tmp_path)
    ident = wandb_identity(cfg.logger.wandb, plain_config(cfg))
    assert "name" not in ident and "group" not in ident and "method:mobiquant" in ident["tags"]


def test_curve_summary():
    df = pd.DataFrame(
        {
            "method": ["fp", "mobiquant", "mobiquant", "rtn", "mobiquant"],
            "dataset": ["wiki", "wiki", "wiki", "wiki", "ptb"],
            "budget": [math.nan, 2.5, 4.0, 4.0, 2.5],
            "ppl": [10.0, 40.0, 12.0, 14.0, 50.0],
        }
    )
    s = curve_summary(df, "mobiquant", ["wiki", "ptb"])
    assert s["ppl/fp/wiki"] == 10.0 and s["ppl/mobiquant/wiki/b2.5"] == 40.0 and s["ppl/rtn/wiki/b4"] == 14.0
    assert s[OBJECTIVE] == pytest.approx((math.log(40) + math.log(12)) / 2)
    assert s["curve/mobiquant/ptb/mean_log_ppl"] == pytest.approx(math.log(50))
    assert "curve/fp/wiki/mean_log_ppl" not in s
    assert math.isnan(curve_summary(df, "gptq", ["wiki"])[OBJECTIVE])


def test_checkpoint_artifact_leaves_out_temporaries(tmp_path):
    """Stray temporaries of our atomic writers (a killed save) never go into the W&B checkpoint artifact."""
    from mobiquant.io.fileio import owner_tag
    from mobiquant.io.tracking import artifact_files

    folder = tmp_path / "ckpt"
    folder.mkdir()
    for name in ("mobiquant.json", "quantized.safetensors"):
        (folder / name).write_text("x")
    (folder / f".quantized.safetensors.{owner_tag()}.abcd1234.tmp").write_text("half")
    (folder / ".mobiquant.json.k2j4h5l6.tmp").write_text("half")  # the naming before owners were recorded
    (folder / ".quantized.safetensors.tmp-1@h-abcd1234").mkdir()
    (folder / ".quantized.safetensors.tmp-1@h-abcd1234" / "x").write_text("x")
    assert [p.name for p in artifact_files(folder)] == ["mobiquant.json", "quantized.safetensors"]

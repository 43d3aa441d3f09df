"""The command line: help, job and log names, and configuration errors that stop before any work."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import open_dict

from mobiquant.__main__ import CONF_DIR, TASK_HELP, TASKS

SRC = str(Path(__file__).resolve().parents[1] / "src")


def mobiquant(*args: str, cwd: Path, timeout: int = 300) -> subprocess.CompletedProcess:
    env = {
        **os.environ,
        "WANDB_MODE": "offline",
        "WANDB_SILENT": "true",
        "PYTHONPATH": SRC + os.pathsep + os.environ.get("PYTHONPATH", ""),
    }
    return subprocess.run(
        [sys.executable, "-m", "mobiquant", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout
    )


def test_help_introduces_the_app_tasks_and_report(tmp_path):
    proc = mobiquant("--help", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert out.startswith("mobiquant: elastic LLM quantization")
    for name in TASKS:
        assert f"task={name}" in out
    assert "mobiquant-report" in out and "quant: " in out and "experiment: " in out
    assert "__main__" not in out and "powered by Hydra" not in out
    assert not (tmp_path / "outputs").exists()


def test_every_task_has_a_help_line():
    assert set(TASK_HELP) == set(TASKS)


def test_job_and_log_file_are_named_mobiquant():
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose("config", return_hydra_config=True)
    assert cfg.hydra.job.name == "mobiquant"  # also the SLURM job name (hydra/launcher=slurm)
    with open_dict(cfg):
        cfg.hydra.runtime.output_dir = "/run"
    assert cfg.hydra.job_logging.handlers.file.filename == "/run/mobiquant.log"


# ---------------------------------------------------------------------------- errors before any work
@pytest.mark.parametrize(
    "args,fragments",
    [
        (["model=local", "model.path=/nope", "logger=wandb"], ["model.path=/nope does not exist"]),
        (["model=local"], ["model.path is not set", "model.path=<"]),
        (["calib.epochs_stage1=abc"], ["calib.epochs_stage1='abc' is invalid: expected an integer"]),
        (["calib.epoch=3"], ["calib.epoch is not a key of `calib`", "did you mean `epochs_stage1`", "+calib.epoch=3"]),
        (["quant=nope"], ["quant=nope is unknown; allowed:", "mobiquant_a4"]),
        (["task=lm_evl"], ["task=lm_evl is unknown", "did you mean `lm_eval`"]),
        (["budget.budgets=[2,9]"], ["budget.budgets[1]=9"]),
        (
            ["experiment=lm_eval_smoke", "paths.shared_data_dir=/nodata"],
            ["lm_eval.data.wikitext2_path", "set paths.shared_data_dir="],
        ),
        (["-m", "experiment=smoke", "seed=0,1", "calib.epoch=3"], ["did you mean `epochs_stage1`"]),
    ],
    ids=[
        "bad_model_path",
        "no_model_path",
        "type",
        "unknown_key",
        "group_option",
        "task",
        "pipeline",
        "data_dir",
        "multirun",
    ],
)
def test_config_errors_are_one_line_before_any_run_folder(args, fragments, tmp_path):
    proc = mobiquant(*args, cwd=tmp_path)
    assert proc.returncode != 0
    err = proc.stderr.strip()
    assert err.startswith("mobiquant: invalid configuration: ") and "\n" not in err, err
    for f in fragments:
        assert f in err, err
    assert list(tmp_path.iterdir()) == []  # no outputs/ (run or sweep folder), no wandb/


def test_multirun_leaves_swept_values_to_their_jobs(tmp_path):
    from mobiquant.configcheck import preflight

    # one bad value among the swept ones fails its own job, not the sweep (tests/test_sweeps.py runs one)
    assert preflight(["-m", "experiment=smoke", "data.calib.nsamples=0,2"], CONF_DIR, TASKS) is None
    assert preflight(["-m", "model=local", "model.path=/a,/b"], CONF_DIR, TASKS) is None
    assert "data.calib.nsamples=0" in preflight(["experiment=smoke", "data.calib.nsamples=0"], CONF_DIR, TASKS)


def test_schema_from_the_built_class():
    from mobiquant.calibration import CalibConfig
    from mobiquant.configcheck import ConfigError, check_node, did_you_mean

    check_node(
        "calib",
        {
            "epochs_stage1": 2,
            "lr_lwc": 1,
            "stage1_bits": "anchor",
            "devices": "auto",
            "propagate_budget": None,
            "budgets": [2, 3.5],
        },
        CalibConfig,
    )
    with pytest.raises(ConfigError, match=r"calib.lr_lwc='fast' is invalid: expected a number"):
        check_node("calib", {"lr_lwc": "fast"}, CalibConfig)
    with pytest.raises(ConfigError, match=r"calib.budgets=\['a'\] is invalid: expected a list of numbers"):
        check_node("calib", {"budgets": ["a"]}, CalibConfig)
    with pytest.raises(ConfigError, match=r"calib.progress_bar=1 is invalid: expected true or false"):
        check_node("calib", {"progress_bar": 1}, CalibConfig)
    with pytest.raises(ConfigError, match="did you mean `batch_size`"):
        check_node("calib", {"batch_sise": 2}, CalibConfig)
    assert did_you_mean("zzz", ["epochs_stage1"]) == ""


def test_shared_data_dir_follows_the_project_not_the_working_directory(tmp_path, monkeypatch):
    from hydra.core.hydra_config import HydraConfig

    monkeypatch.delenv("MOBIQUANT_SHARED_DATA", raising=False)
    monkeypatch.chdir(tmp_path)
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose("config", overrides=["data=wikitext2_local"], return_hydra_config=True)
    HydraConfig.instance().set_config(cfg)
    root = Path(CONF_DIR).resolve().parent
    assert cfg.paths.root_dir == str(root)
    assert Path(cfg.data.eval.ptb.paths[0]) == root / ".." / "shared" / "data" / "ptb" / "ptb.test.txt"

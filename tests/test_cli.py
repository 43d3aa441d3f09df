"""The command line: help, job and log names, and configuration errors that stop before any work."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from hydra import compose, initialize_config_dir
from omegaconf import open_dict

from mobiquant.__main__ import CONF_DIR, TASK_HELP, TASKS

SRC = str(Path(__file__).resolve().parents[1] / "src")


def mobiquant(*args: str, cwd: Path, timeout: int = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "WANDB_MODE": "offline", "WANDB_SILENT": "true",
           "PYTHONPATH": SRC + os.pathsep + os.environ.get("PYTHONPATH", "")}
    return subprocess.run([sys.executable, "-m", "mobiquant", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=timeout)


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

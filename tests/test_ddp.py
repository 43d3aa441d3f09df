"""trainer=ddp: data-parallel block calibration with Lightning's DDP over gloo, two CPU processes."""

from __future__ import annotations

import os
import subprocess
import sys

import pandas as pd
import pytest

SMOKE = ["experiment=smoke", "baselines=none", "torch_threads=1", "logger=none", "calib.batch_size=2"]


def _run(run_dir, *overrides):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "offline"}
    for key in ("LOCAL_RANK", "NODE_RANK", "RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    proc = subprocess.run(
        [sys.executable, "-m", "mobiquant", *SMOKE, *overrides, f"hydra.run.dir={run_dir}"],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("ddp")
    _run(root / "one", "trainer=cpu")
    _run(root / "two", "trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2")
    return root / "one", root / "two"


def test_per_device_batch_halves_the_steps(tmp_path):
    _run(
        tmp_path,
        "trainer=ddp",
        "trainer.accelerator=cpu",
        "trainer.devices=2",
        "calib.batch_scope=per_device",
        "model.tiny.num_hidden_layers=1",
    )
    # Each rank takes 2 windows per step from its shard of 2: one step per epoch, two epochs.
    assert list(pd.read_csv(tmp_path / "calibration.csv")["steps"]) == [2]


def test_ddp_tunes_the_view_pairs_on_both_ranks(tmp_path):
    """calib.view_tune_epochs under DDP: each view's tuning is a Lightning fit over the ranks' shards, kept or
    undone by rank 0's decision, and the run completes with one report per block."""
    _run(
        tmp_path,
        "trainer=ddp",
        "trainer.accelerator=cpu",
        "trainer.devices=2",
        "model.tiny.num_hidden_layers=1",
        "calib.view_tune_epochs=1",
        "calib.view_tune_views=[1]",
    )
    assert len(pd.read_csv(tmp_path / "calibration.csv")) == 1
    log = (tmp_path / "mobiquant.log").read_text()
    assert "block 0: view pairs tuned (view: block MSE before -> after) {1: " in log


def test_ddp_splits_each_block_between_two_ranks(runs):
    one, two = runs
    assert (two / "train_ddp_process_1.log").is_file()  # Lightning started a second rank with our overrides
    c1, c2 = pd.read_csv(one / "calibration.csv"), pd.read_csv(two / "calibration.csv")
    assert len(c1) == len(c2) == 2  # one report per block, written once (rank 0)
    # Same global batch (2): one device takes 2 windows per step, each of two ranks takes 1 of its shard of
    # 2 windows, so both make the same number of optimizer steps over the 4 windows.
    assert list(c1["steps"]) == list(c2["steps"]) == [4, 4]


def test_ddp_results_are_written_once_and_match_one_device(runs):
    one, two = runs
    r1, r2 = pd.read_csv(one / "results.csv"), pd.read_csv(two / "results.csv")
    assert len(r2) == len(r1) == 3 and not r2.duplicated(["method", "budget", "dataset"]).any()
    assert (two / "checkpoints" / "mobiquant" / "quantized.safetensors").is_file()
    # Different shards per step, same data and global batch: the same result up to sampling noise.
    merged = r1.merge(r2, on=["method", "budget", "dataset"], suffixes=("_1", "_2"))
    rel = (merged["ppl_1"] - merged["ppl_2"]).abs() / merged["ppl_1"]
    assert (rel < 0.02).all(), merged[["budget", "ppl_1", "ppl_2"]]


def test_torchrun_starts_every_rank_at_once(tmp_path, runs):
    """Launched by torchrun (every rank started together, no Lightning launcher), the same job gives the
    same split of each block and writes its results once."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "offline"}
    for key in ("LOCAL_RANK", "NODE_RANK", "RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=2",
        "-m",
        "mobiquant",
        *SMOKE,
        "trainer=ddp",
        "trainer.accelerator=cpu",
        "trainer.devices=2",
        f"hydra.run.dir={tmp_path}",
    ]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert not (tmp_path / "train_ddp_process_1.log").exists()  # no rank started by Lightning
    two = runs[1]
    assert list(pd.read_csv(tmp_path / "calibration.csv")["steps"]) == [4, 4]
    r_torchrun, r_lightning = pd.read_csv(tmp_path / "results.csv"), pd.read_csv(two / "results.csv")
    assert len(r_torchrun) == len(r_lightning) and not r_torchrun.duplicated(["method", "budget", "dataset"]).any()

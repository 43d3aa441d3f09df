"""hydra/launcher=gpus: the GPU claim (file locks, CUDA_VISIBLE_DEVICES) and the launcher, with two fake GPUs
on the CPU: a trivial Hydra app's sweep (concurrency, slot reuse, failures) and a smoke-sized mobiquant sweep
whose results equal a single run's."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
import types
from pathlib import Path

import pytest
import yaml

from mobiquant import gpus
from mobiquant.__main__ import CONF_DIR

SRC = Path(gpus.__file__).resolve().parents[1]


# ---------------------------------------------------------------------------- devices
def _fake_smi(tmp_path: Path, listing: str) -> str:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    smi = bin_dir / "nvidia-smi"
    smi.write_text(f"#!/bin/sh\ncat <<'EOF'\n{listing}EOF\n")
    smi.chmod(0o755)
    return str(bin_dir)


@pytest.mark.parametrize(
    "value,expected",
    [("2,3", ["2", "3"]), (" 1 ", ["1"]), ("0,-1,1", ["0"]), ("", []), ("-1", []), ("GPU-a,GPU-b", ["GPU-a", "GPU-b"])],
)
def test_visible_devices_from_cuda_env(monkeypatch, value, expected):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", value)
    assert gpus.visible_devices() == expected


def test_visible_devices_from_nvidia_smi(monkeypatch, tmp_path):
    listing = (
        "GPU 0: NVIDIA H200 (UUID: GPU-aaa)\n"
        "  MIG 1g.18gb     Device  0: (UUID: MIG-bbb)\n"
        "GPU 1: NVIDIA H200 (UUID: GPU-ccc)\n"
    )
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    monkeypatch.setenv("PATH", f"{_fake_smi(tmp_path, listing)}{os.pathsep}{os.environ['PATH']}")
    assert gpus.visible_devices() == ["0", "1"]
    assert gpus.resolve_devices(None) == ["0", "1"]
    assert gpus.resolve_devices(1) == ["0"]
    with pytest.raises(ValueError, match="only 2 GPU"):
        gpus.resolve_devices(3)


def test_resolve_devices_without_gpus(monkeypatch, tmp_path):
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    monkeypatch.setenv("PATH", str(tmp_path))  # no nvidia-smi
    assert gpus.visible_devices() == []
    with pytest.raises(ValueError, match="no GPU found"):
        gpus.resolve_devices(None)
    assert gpus.resolve_devices(2) == ["0", "1"]  # slots without CUDA: the tests' fake GPUs
    assert gpus.resolve_devices([3, "GPU-x"]) == ["3", "GPU-x"]
    for bad in (0, True, [], [1, 1], "0,1", [""]):
        with pytest.raises(ValueError):
            gpus.resolve_devices(bad)


# ---------------------------------------------------------------------------- the claim
def test_claim_takes_free_devices_and_waits_when_all_are_held(monkeypatch, tmp_path):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    a = gpus.claim(["0", "1"], tmp_path, note="job 0")
    assert (a.device, a.slot) == ("0", 0) and os.environ["CUDA_VISIBLE_DEVICES"] == "0"
    assert a.path.read_text() == f"pid {os.getpid()} job 0\n"
    b = gpus.claim(["0", "1"], tmp_path, note="job 1")
    assert b.device == "1" and os.environ["CUDA_VISIBLE_DEVICES"] == "1"
    with pytest.raises(TimeoutError, match="no free GPU"):
        gpus.claim(["0", "1"], tmp_path, poll_s=0.05, timeout_s=0.2)
    a.release()
    assert not a.held
    c = gpus.claim(["0", "1"], tmp_path, note="job 2", poll_s=0.05, timeout_s=1)
    assert c.device == "0" and c.path.read_text() == f"pid {os.getpid()} job 2\n"  # reused
    b.release()
    c.release()


def test_claim_of_a_uuid_uses_a_safe_file_name(monkeypatch, tmp_path):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    held = gpus.claim(["MIG-GPU-1/2/0"], tmp_path)
    assert held.path == tmp_path / "MIG-GPU-1_2_0.lock" and os.environ["CUDA_VISIBLE_DEVICES"] == "MIG-GPU-1/2/0"
    held.release()


def test_claim_refuses_once_cuda_is_initialised(monkeypatch, tmp_path):
    fake = types.SimpleNamespace(cuda=types.SimpleNamespace(is_initialized=lambda: True))
    monkeypatch.setitem(sys.modules, "torch", fake)
    with pytest.raises(RuntimeError, match="already initialised"):
        gpus.claim(["0"], tmp_path)


def test_lock_of_a_killed_process_is_released(monkeypatch, tmp_path):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    code = (
        f"import time; from mobiquant.gpus import claim; claim(['0'], {str(tmp_path)!r}, note='holder'); time.sleep(60)"
    )
    env = {**os.environ, "PYTHONPATH": f"{SRC}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    holder = subprocess.Popen([sys.executable, "-c", code], env=env)
    try:
        lock = gpus.lock_path(tmp_path, "0")
        deadline = time.monotonic() + 30
        while not (lock.exists() and "holder" in lock.read_text()):
            assert time.monotonic() < deadline and holder.poll() is None
            time.sleep(0.05)
        with pytest.raises(TimeoutError):
            gpus.claim(["0"], tmp_path, poll_s=0.05, timeout_s=0.2)
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    held = gpus.claim(["0"], tmp_path, poll_s=0.05, timeout_s=5)  # the kernel dropped the dead process's lock
    held.release()


def test_gpus_preset_composes():
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        overrides = ["hydra/launcher=gpus", "hydra.launcher.gpus=[0,2]"]
        cfg = compose("config", overrides=overrides, return_hydra_config=True)
    launcher = cfg.hydra.launcher
    assert launcher._target_ == "hydra_plugins.mobiquant_launcher.gpus_launcher.GpusLauncher"
    assert list(launcher.gpus) == [0, 2] and launcher.lock_dir is None


# ---------------------------------------------------------------------------- a trivial app's sweep
APP = '''
"""A Hydra app on mobiquant's config whose jobs record what they saw (run as `python -m gpuapp`)."""
import json, os, sys, time
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig

import mobiquant.__main__ as mq  # registers the config's resolvers


@hydra.main(version_base="1.3", config_path=mq.CONF_DIR, config_name="config")
def app(cfg):
    start = time.time()
    if cfg.seed == 4:
        raise ValueError("job 4 fails on purpose")
    if cfg.seed == 5:
        os.kill(os.getpid(), 9)  # dies without a word, as out of memory would
    time.sleep(2.0)
    seen = {"device": os.environ.get("CUDA_VISIBLE_DEVICES"), "pid": os.getpid(), "start": start,
            "end": time.time(), "torch": "torch" in sys.modules}
    Path(HydraConfig.get().runtime.output_dir, "seen.json").write_text(json.dumps(seen))
    return 10.0 * cfg.seed


if __name__ == "__main__":
    app()
'''


def _ledger(sweep: Path) -> list[dict]:
    with open(sweep / ".gpus" / "jobs.csv") as f:
        return sorted(csv.DictReader(f), key=lambda r: int(r["job"]))


def _check_one_job_per_device(rows: list[dict]) -> int:
    """Jobs on one device never overlap in time (claim to end); returns the most jobs running at once."""
    spans = [(float(r["start"]), float(r["end"]), r["device"]) for r in rows]
    for i, (s1, e1, d1) in enumerate(spans):
        for s2, e2, d2 in spans[i + 1 :]:
            if s1 < e2 and s2 < e1:
                assert d1 != d2, rows
    return max(sum(s <= t < e for s, e, _ in spans) for t, _, _ in spans)


@pytest.fixture(scope="module")
def app_sweep(tmp_path_factory):
    """Six jobs on two fake GPUs: four that sleep 2 s, one that raises, one that kills itself."""
    tmp = tmp_path_factory.mktemp("gpus_app")
    (tmp / "gpuapp").mkdir()
    (tmp / "gpuapp" / "__init__.py").write_text("")
    (tmp / "gpuapp" / "__main__.py").write_text(textwrap.dedent(APP))
    sweep = tmp / "sweep"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp), str(SRC), os.environ.get("PYTHONPATH", "")])}
    env.pop("CUDA_VISIBLE_DEVICES", None)
    cmd = [sys.executable, "-m", "gpuapp", "-m", "seed=0,1,2,3,4,5", "hydra/launcher=gpus"]
    cmd += ["hydra.launcher.gpus=2", "hydra.launcher.poll_s=0.05", f"hydra.sweep.dir={sweep}"]
    start = time.time()
    proc = subprocess.run(cmd, cwd=tmp, env=env, capture_output=True, text=True, timeout=300)
    return sweep, proc, time.time() - start


def test_app_sweep_runs_two_jobs_at_a_time_one_per_device(app_sweep):
    sweep, proc, _ = app_sweep
    out = proc.stdout + proc.stderr
    rows = _ledger(sweep)
    assert [r["job"] for r in rows] == ["0", "1", "2", "3", "4", "5"], out
    assert _check_one_job_per_device(rows) == 2, rows  # in parallel, never two on one device
    assert {r["device"] for r in rows} == {"0", "1"}  # two slots for six jobs: reused
    seen = {n: json.loads((sweep / str(n) / "seen.json").read_text()) for n in range(4)}
    for n, job in seen.items():
        row = rows[n]
        assert row["status"] == "ok" and job["device"] == row["device"] and str(job["pid"]) == row["pid"]
        assert float(row["start"]) <= job["start"] <= job["end"] <= float(row["end"])
        hydra_yaml = yaml.safe_load((sweep / str(n) / ".hydra" / "hydra.yaml").read_text())
        assert hydra_yaml["hydra"]["job"]["env_set"]["CUDA_VISIBLE_DEVICES"] == job["device"]
        assert hydra_yaml["hydra"]["job"]["num"] == n
        assert not job["torch"]  # nothing the launcher does imports torch into a job
    assert len({job["pid"] for job in seen.values()}) == 4  # a fresh process per job


def test_app_sweep_reports_failed_and_killed_jobs(app_sweep):
    sweep, proc, _ = app_sweep
    out = proc.stdout + proc.stderr
    assert proc.returncode == 1, out
    rows = _ledger(sweep)
    assert [r["status"] for r in rows] == ["ok"] * 4 + ["failed"] * 2
    assert "job 4 fails on purpose" in out and "Error executing job with overrides" in out
    assert "#5 FAILED" in out and "#5 started on GPU" in out
    # the locks of the finished (and the killed) jobs are free again
    for device in ("0", "1"):
        gpus.claim([device], sweep / ".gpus", timeout_s=0).release()


# ---------------------------------------------------------------------------- a mobiquant sweep
TIMING = ["calib_seconds", "eval_seconds", "checkpoint"]


@pytest.mark.slow  # five smoke runs (four of them two at a time): about a minute on a 2-core CPU
def test_mobiquant_sweep_on_two_fake_gpus_matches_single_runs(tmp_path):
    import pandas as pd

    env = {**os.environ, "WANDB_MODE": "offline", "OMP_NUM_THREADS": "1"}
    env.pop("CUDA_VISIBLE_DEVICES", None)
    common = ["experiment=smoke", "save_checkpoints=false", f"paths.cache_dir={tmp_path / 'cache'}"]
    sweep = tmp_path / "sweep"
    cmd = [sys.executable, "-m", "mobiquant", "-m", *common, "seed=0,1,2,3", "hydra/launcher=gpus"]
    proc = subprocess.run(
        [*cmd, "hydra.launcher.gpus=2", f"hydra.sweep.dir={sweep}"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = _ledger(sweep)
    assert [r["status"] for r in rows] == ["ok"] * 4
    assert _check_one_job_per_device(rows) == 2 and {r["device"] for r in rows} == {"0", "1"}
    single = tmp_path / "single"
    proc = subprocess.run(
        [sys.executable, "-m", "mobiquant", *common, "seed=1", f"hydra.run.dir={single}"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    one = pd.read_csv(single / "results.csv").drop(columns=TIMING)
    pd.testing.assert_frame_equal(pd.read_csv(sweep / "1" / "results.csv").drop(columns=TIMING), one)
    other = pd.read_csv(sweep / "0" / "results.csv").drop(columns=TIMING)
    assert not other["ppl"].equals(one["ppl"])  # another seed: the comparison can tell jobs apart


def test_claim_shares_a_device_between_per_device_processes(monkeypatch, tmp_path):
    """jobs_per_gpu: every device is taken once before any is shared, and never more than per_device times."""
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    held = [gpus.claim(["0", "1"], tmp_path, per_device=2, poll_s=0.05, timeout_s=1) for _ in range(4)]
    assert [h.device for h in held] == ["0", "1", "0", "1"]
    with pytest.raises(TimeoutError, match="no free GPU"):
        gpus.claim(["0", "1"], tmp_path, per_device=2, poll_s=0.05, timeout_s=0.2)
    held[2].release()
    again = gpus.claim(["0", "1"], tmp_path, per_device=2, poll_s=0.05, timeout_s=1)
    assert again.device == "0" and again.path == held[2].path
    for h in [*held, again]:
        h.release()
    with pytest.raises(ValueError, match="jobs_per_gpu=0"):
        gpus.claim(["0"], tmp_path, per_device=0)

"""The run folder: its identity (what made it), its lock (who writes it) and its stray temporaries."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest

from lock_holder import lock_holder
from mobiquant.__main__ import CONF_DIR, TASKS
from mobiquant.configcheck import PlainMessage, preflight
from mobiquant.io.fileio import host_tag, owner_tag
from mobiquant.io.runfolder import (
    IDENTITY_NAME,
    LOCK_NAME,
    RunFolderError,
    RunLock,
    config_identity,
    digest,
    open_run_folder,
)
from mobiquant.tasks import quantize as pipeline
from mobiquant.tasks import session
from mobiquant.tasks.quantize import run
from test_pipeline import smoke_cfg

SRC = str(Path(__file__).resolve().parents[1] / "src")
FAST = ("logger=none", "baselines=none", "budget.budgets=[4]")


@pytest.fixture
def quiet(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")


def no_model(monkeypatch):
    """From now on, loading the model fails the test: what follows must be refused before any work."""
    monkeypatch.setattr(session, "load_base_model", lambda cfg: pytest.fail("the model was loaded"))


def dead_pid() -> int:
    """The pid of a process that has ended (and was reaped)."""
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def identity(out: Path) -> dict:
    return json.loads((out / IDENTITY_NAME).read_text())


# ---------------------------------------------------------------------------- identity
def test_rows_carry_the_identity_and_other_settings_are_refused_before_work(tmp_path, quiet, monkeypatch):
    """Re-running a finished folder with other data and evaluation settings (issue case 2) refuses before
    loading anything, naming the keys that differ and the override that starts a fresh sub-run; nothing in
    the folder changes."""
    run(smoke_cfg(tmp_path, *FAST))
    out = tmp_path / "run"
    record = identity(out)
    assert record["run_id"] and record["base_model"]["fingerprint"] and record["config"]["eval"]["seqlen"] == 64
    results = pd.read_csv(out / "results.csv")
    calib = pd.read_csv(out / "calibration.csv")
    assert set(results["run_id"]) == {record["run_id"]} and set(calib["run_id"]) == {record["run_id"]}
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file() and p.name != LOCK_NAME}

    no_model(monkeypatch)
    with pytest.raises(RunFolderError) as e:
        run(smoke_cfg(tmp_path, *FAST, "data.calib.nsamples=2", "eval.seqlen=32"))
    text = str(e.value)
    assert "\n" not in text and f"run folder {out} was made by another configuration" in text
    assert "data.calib.nsamples: 4 there, 2 now" in text and "eval.seqlen: 64 there, 32 now" in text
    assert "run.on_mismatch=new_subrun" in text and str(out / "subruns") in text
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file() and p.name != LOCK_NAME} == before


def test_settings_that_change_no_number_are_not_part_of_the_identity(tmp_path, quiet):
    run(smoke_cfg(tmp_path, *FAST))
    out = tmp_path / "run"
    first = pd.read_csv(out / "results.csv")
    run(smoke_cfg(tmp_path, *FAST, "logger=csv", "calib.progress_bar=true", "eval.batch_size=2", "tags=[x]"))
    pd.testing.assert_frame_equal(first, pd.read_csv(out / "results.csv"))  # all rows present: skipped


def test_new_subrun_runs_apart_and_resumes_there(tmp_path, quiet, caplog):
    """``run.on_mismatch=new_subrun``: another configuration calibrates and evaluates in a sub-run folder of
    its own; the folder's own rows stay as they were, and the same command resumes in the same sub-run."""
    run(smoke_cfg(tmp_path, *FAST))
    out = tmp_path / "run"
    first = (out / "results.csv").read_bytes()
    other = (*FAST, "eval.seqlen=32", "run.on_mismatch=new_subrun")
    run(smoke_cfg(tmp_path, *other))
    assert (out / "results.csv").read_bytes() == first
    (sub,) = (out / "subruns").iterdir()
    cfg = smoke_cfg(tmp_path, *other)
    assert sub.name == digest(config_identity(cfg))[:12]
    rows = pd.read_csv(sub / "results.csv")
    assert (rows["seqlen"] == 32).all() and set(rows["run_id"]) == {identity(sub)["run_id"]}
    assert identity(sub)["run_id"] != identity(out)["run_id"]
    assert (sub / "checkpoints" / "mobiquant" / "mobiquant.json").is_file()
    caplog.clear()
    with caplog.at_level("INFO", logger="mobiquant"):
        run(cfg)
    assert f"all results present in {sub / 'results.csv'}: skipped" in caplog.text


def test_another_base_model_is_refused_after_loading_it(tmp_path, quiet):
    """The base model's fingerprint is part of the identity: a folder made with another model (the files
    at model.path changed) is refused once the model is loaded, before any calibration."""
    run(smoke_cfg(tmp_path, *FAST))
    out = tmp_path / "run"
    record = identity(out)
    real = record["base_model"]["fingerprint"]
    record["base_model"]["fingerprint"] = "0" * 64
    (out / IDENTITY_NAME).write_text(json.dumps(record))
    with pytest.raises(RunFolderError, match="was made with another base model"):
        run(smoke_cfg(tmp_path, *FAST))
    run(smoke_cfg(tmp_path, *FAST, "run.on_mismatch=new_subrun"))
    sub = out / "subruns" / f"{record['config_sha256'][:12]}-{real[:8]}"
    assert identity(sub)["base_model"]["fingerprint"] == real and (sub / "results.csv").is_file()


def test_a_folder_without_work_takes_the_new_identity(tmp_path):
    """A run that stopped before any work (no rows, checkpoints or calibration state) does not bind its
    folder: the next run records its own identity there."""
    out = tmp_path / "run"
    made_by = config_identity(smoke_cfg(tmp_path, "seed=5"))
    record = {"format": "mobiquant-run", "config": made_by, "config_sha256": digest(made_by), "base_model": None}
    out.mkdir()
    (out / IDENTITY_NAME).write_text(json.dumps(record))
    cfg = smoke_cfg(tmp_path)
    folder = open_run_folder(out, cfg)
    folder.release()
    assert folder.path == out and identity(out)["config_sha256"] == digest(config_identity(cfg))
    (out / "checkpoints" / "x").mkdir(parents=True)
    (out / "checkpoints" / "x" / "mobiquant.json").write_text("{}")
    with pytest.raises(RunFolderError, match=r"another configuration \(calib.seed: 0 there, 5 now"):
        open_run_folder(out, smoke_cfg(tmp_path, "seed=5"))


def test_folder_with_rows_of_unknown_identity_is_refused(tmp_path, quiet, monkeypatch):
    """results.csv without identity.json (a folder of an earlier mobiquant): its rows cannot be told apart."""
    out = tmp_path / "run"
    out.mkdir()
    (out / "results.csv").write_text("method,budget,dataset,ppl\nmobiquant,4,wiki_extract,12.0\n")
    no_model(monkeypatch)
    with pytest.raises(RunFolderError, match="holds results.csv of a run that recorded no identity"):
        run(smoke_cfg(tmp_path, *FAST))


def test_rows_of_another_run_id_are_refused(tmp_path, quiet):
    run(smoke_cfg(tmp_path, *FAST))
    out = tmp_path / "run"
    df = pd.read_csv(out / "results.csv")
    df["run_id"] = "feedfacefeedface"
    df.to_csv(out / "results.csv", index=False)
    with pytest.raises(RunFolderError, match="results.csv holds rows of another run"):
        run(smoke_cfg(tmp_path, *FAST))


def test_cli_refuses_before_hydra_writes_the_folder(tmp_path):
    """On the command line the identity is checked before Hydra writes ``.hydra/`` and its log there;
    ``run.on_mismatch=new_subrun`` points Hydra at the sub-run instead."""
    out = tmp_path / "run"
    (out / ".hydra").mkdir(parents=True)
    (out / ".hydra" / "config.yaml").write_text("the earlier run's config\n")
    made_by = config_identity(smoke_cfg(tmp_path, "seed=5"))
    record = {"format": "mobiquant-run", "config": made_by, "config_sha256": digest(made_by), "base_model": None}
    (out / IDENTITY_NAME).write_text(json.dumps(record))
    (out / "results.csv").write_text("method,budget,dataset,ppl,run_id\nmobiquant,4,wiki_extract,12.0,x\n")
    argv = ["experiment=smoke", f"hydra.run.dir={out}", f"paths.cache_dir={tmp_path / 'cache'}"]
    error = preflight(argv, CONF_DIR, tasks=TASKS)
    assert isinstance(error, PlainMessage)
    assert "was made by another configuration (calib.seed: 5 there, 0 now; seed: 5 there, 0 now)" in error
    extra: list[str] = []
    assert preflight([*argv, "run.on_mismatch=new_subrun"], CONF_DIR, tasks=TASKS, extra_overrides=extra) is None
    assert len(extra) == 1 and extra[0].startswith(f'hydra.run.dir="{out / "subruns"}/')
    env = {**os.environ, "PYTHONPATH": SRC, "WANDB_MODE": "offline"}
    done = subprocess.run(
        [sys.executable, "-m", "mobiquant", *argv], env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 1
    assert done.stderr.strip().splitlines()[-1].startswith(f"mobiquant: run folder {out} was made by another")
    assert (out / ".hydra" / "config.yaml").read_text() == "the earlier run's config\n"
    assert not (out / "mobiquant.log").exists()


# ---------------------------------------------------------------------------- lock
def test_second_process_in_the_same_folder_is_refused_naming_the_holder(tmp_path, quiet, monkeypatch):
    out = tmp_path / "run"
    out.mkdir()
    with lock_holder(out) as holder:
        no_model(monkeypatch)
        with pytest.raises(RunFolderError) as e:
            run(smoke_cfg(tmp_path, *FAST))
        text = str(e.value)
        assert f"run folder {out} is in use by process {holder.pid} on host {host_tag()}" in text
        assert "\n" not in text
        error = preflight(["experiment=smoke", f"hydra.run.dir={out}"], CONF_DIR, tasks=TASKS)  # the CLI
        assert isinstance(error, PlainMessage) and f"is in use by process {holder.pid}" in error
    # The kernel dropped the lock with its process; the entry it left names a process that is gone.
    folder = open_run_folder(out, smoke_cfg(tmp_path, *FAST))
    folder.release()


def test_lock_is_released_after_a_run_and_after_a_failure(tmp_path, quiet, monkeypatch):
    run(smoke_cfg(tmp_path, *FAST))
    out = tmp_path / "run"
    assert (out / LOCK_NAME).read_text() == ""  # released cleanly
    RunLock(out).acquire().release()

    def boom(cfg):
        raise RuntimeError("loading failed")

    monkeypatch.setattr(session, "load_base_model", boom)
    with pytest.raises(RuntimeError, match="loading failed"):
        run(smoke_cfg(tmp_path, *FAST))
    RunLock(out).acquire().release()


def test_stale_lock_of_a_dead_process_is_taken_over(tmp_path, caplog):
    out = tmp_path / "run"
    out.mkdir()
    pid = dead_pid()
    (out / LOCK_NAME).write_text(json.dumps({"pid": pid, "host": host_tag(), "started": "then"}))
    with caplog.at_level("WARNING", logger="mobiquant"):
        lock = RunLock(out).acquire()
    assert f"stale lock of process {pid} on host {host_tag()}" in caplog.text
    assert json.loads((out / LOCK_NAME).read_text())["pid"] == os.getpid()
    with pytest.raises(RunFolderError, match=f"in use by process {os.getpid()}"):
        RunLock(out).acquire()  # one lock per open file: a second taker is refused, even in one process
    lock.release()


# ---------------------------------------------------------------------------- stray temporaries
def test_stray_temporaries_are_removed_at_start_unless_a_live_process_owns_them(tmp_path, quiet):
    out = tmp_path / "run"
    ck = out / "checkpoints" / "mobiquant"
    ck.mkdir(parents=True)
    gone = f"{dead_pid()}@{host_tag()}"
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        alive = f"{sleeper.pid}@{host_tag()}"
        strays = [
            out / f".results.csv.{gone}.a1b2c3d4.tmp",
            ck / f".quantized.safetensors.{gone}.zz00yy11.tmp",
            ck / ".mobiquant.json.k2j4h5l6.tmp",  # no owner in the name (an earlier mobiquant): the lock decides
            out / "calib_state" / "mobiquant" / f".block_000.safetensors.{gone}.q1w2e3r4.tmp",
        ]
        kept = [
            out / f".calibration.csv.{alive}.a1b2c3d4.tmp",  # a process that still runs
            out / "wandb" / ".some.k2j4h5l6.tmp",  # not ours
            out / "notes.tmp",  # not our naming
        ]
        for p in strays + kept:
            p.parent.mkdir(parents=True, exist_ok=True)
            p.write_text("partial")
        cache = tmp_path / "cache"
        model_tmp = cache / "models" / f".smollm2-135m-instruct.tmp-{gone}-ab12cd34"
        model_tmp.mkdir(parents=True)
        (model_tmp / "model.safetensors").write_text("half a model")
        run(smoke_cfg(tmp_path, *FAST))
        assert not [p for p in strays if p.exists()] and not model_tmp.exists()
        assert all(p.exists() for p in kept)
    finally:
        sleeper.kill()
        sleeper.wait()


def test_temporary_names_carry_their_owner(tmp_path):
    from mobiquant.io.fileio import TEMP_FILE_RE, stage_bytes

    tmp = stage_bytes(tmp_path / "results.csv", b"x")
    m = TEMP_FILE_RE.match(tmp.name)
    assert m and f"{m['pid']}@{m['host']}" == owner_tag() and m["base"] == "results.csv"
    tmp.unlink()


def test_calibration_csv_survives_a_failure_during_evaluation(tmp_path, quiet, monkeypatch):
    """Killed during evaluation (issue case 6): calibration.csv was written after every block, and the
    re-run (which reloads the saved checkpoint, calibrating nothing) keeps those rows and their times."""
    from mobiquant import evaluation

    writes: list[tuple[str, int]] = []
    real_write = pipeline.write_csv

    def spy(df, path):
        writes.append((Path(path).name, len(df)))
        real_write(df, path)

    monkeypatch.setattr(pipeline, "write_csv", spy)
    monkeypatch.setattr(session, "write_csv", spy)  # calibration.csv after every block

    def killed(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(evaluation, "perplexity", killed)
    with pytest.raises(KeyboardInterrupt):
        run(smoke_cfg(tmp_path, *FAST))
    assert [n for name, n in writes if name == "calibration.csv"] == [1, 2]  # after each of the 2 blocks
    out = tmp_path / "run"
    first = pd.read_csv(out / "calibration.csv")
    assert (first["seconds"] > 0).all() and (first["steps"] > 0).all()
    monkeypatch.undo()
    monkeypatch.setenv("WANDB_MODE", "offline")
    run(smoke_cfg(tmp_path, *FAST))
    pd.testing.assert_frame_equal(pd.read_csv(out / "calibration.csv"), first)
    row = pd.read_csv(out / "results.csv").iloc[0]
    assert row["calib_seconds"] >= first["seconds"].sum()


def test_calib_seconds_sum_over_processes(tmp_path, quiet, monkeypatch):
    """A calibration killed after its first block and resumed: the resumed block keeps its seconds and steps
    in calibration.csv, and calib_seconds counts both processes."""
    from mobiquant.io.tracking import Tracker

    def killed(self, method, block, report):
        raise KeyboardInterrupt

    monkeypatch.setattr(Tracker, "log_block", killed)
    with pytest.raises(KeyboardInterrupt):
        run(smoke_cfg(tmp_path, *FAST))
    out = tmp_path / "run"
    state = json.loads((out / "calib_state" / "mobiquant" / "state.json").read_text())
    first = state["blocks"]["0"]
    monkeypatch.undo()
    monkeypatch.setenv("WANDB_MODE", "offline")
    time.sleep(0.01)
    run(smoke_cfg(tmp_path, *FAST))
    calib = pd.read_csv(out / "calibration.csv").set_index("block")
    assert calib.loc[0, "seconds"] == pytest.approx(first["seconds"]) and calib.loc[0, "steps"] == first["steps"]
    row = pd.read_csv(out / "results.csv").iloc[0]
    assert row["calib_seconds"] >= state["seconds"] + calib.loc[1, "seconds"]

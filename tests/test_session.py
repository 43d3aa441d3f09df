"""The one task session: every task (lm_eval, decode, outliers, routers, as quantize) takes its run folder's
lock and identity before any work, and the identity is made of the settings that decide the task's numbers."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
from hydra import compose, initialize_config_dir
from hydra.core.hydra_config import HydraConfig
from omegaconf import open_dict

from lock_holder import lock_holder
from mobiquant.__main__ import CONF_DIR, TASKS, resolve_task
from mobiquant.configcheck import ConfigError, PlainMessage, preflight
from mobiquant.io.checkpoint import CONFIG_NAME, FORMAT, FORMAT_VERSION, TENSORS_NAME
from mobiquant.io.fileio import host_tag
from mobiquant.io.runfolder import IDENTITY_NAME, LOCK_NAME, RunFolderError, config_identity, digest
from mobiquant.quant.config import MoBiConfig
from mobiquant.tasks import session

# task -> (experiment, a setting of that task, its value in the experiment, another value, a rows file it writes)
TASK_CASES = {
    "lm_eval": ("lm_eval_smoke", "lm_eval.limit", "8", "4", "lm_eval.csv"),
    "decode": ("decode_smoke", "decode.max_new_tokens", "8", "4", "decode.csv"),
    "outliers": ("outliers_smoke", "analysis.outliers.top_percent", "10", "20", "ppl_matrix.csv"),
    "routers": ("routers_smoke", "analysis.routers.early_layers", "null", "1", "router_budgets.csv"),
}


@pytest.fixture
def text_file(tmp_path) -> Path:
    """A stand-in for the WikiText-2 file the local lm-eval task is built from (only its existence is checked
    before the run folder is taken)."""
    path = tmp_path / "wiki.test.raw"
    path.write_text(" = A title = \n\n A paragraph of text that ends with a word .\n")
    return path


def task_cfg(tmp_path: Path, task: str, text: Path, *overrides: str):
    experiment = TASK_CASES[task][0]
    extra = [f"lm_eval.data.wikitext2_path={text}"] if task == "lm_eval" else []
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose(
            "config",
            overrides=[f"experiment={experiment}", "torch_threads=1", "logger=none", *extra, *overrides],
            return_hydra_config=True,
        )
    HydraConfig.instance().set_config(cfg)
    with open_dict(cfg):
        del cfg["hydra"]
        cfg.paths.output_dir = str(tmp_path / "run")
        cfg.paths.cache_dir = str(tmp_path / "cache")
    assert cfg.task == task
    return cfg


def needs(task: str) -> None:
    if task == "lm_eval":
        pytest.importorskip("lm_eval")


def no_model(monkeypatch) -> None:
    """From now on, loading the model fails the test: what follows must be refused before any work."""
    monkeypatch.setattr(session, "load_base_model", lambda cfg: pytest.fail("the model was loaded"))


def files(out: Path) -> dict[Path, bytes]:
    return {p: p.read_bytes() for p in out.rglob("*") if p.is_file() and p.name != LOCK_NAME}


@pytest.mark.parametrize("task", list(TASK_CASES))
def test_second_process_on_the_folder_of_any_task_is_refused(task, tmp_path, text_file, monkeypatch):
    """Another process holds the run folder: the task is refused, naming the holder, before it loads
    anything; on the command line before Hydra writes there."""
    needs(task)
    out = tmp_path / "run"
    out.mkdir()
    with lock_holder(out) as holder:
        no_model(monkeypatch)
        with pytest.raises(RunFolderError) as e:
            resolve_task(task)(task_cfg(tmp_path, task, text_file))
        text = str(e.value)
        assert f"run folder {out} is in use by process {holder.pid} on host {host_tag()}" in text and "\n" not in text
        argv = [f"experiment={TASK_CASES[task][0]}", f"hydra.run.dir={out}", f"lm_eval.data.wikitext2_path={text_file}"]
        error = preflight(argv, CONF_DIR, tasks=TASKS)
        assert isinstance(error, PlainMessage) and f"is in use by process {holder.pid}" in error


@pytest.mark.parametrize("task", list(TASK_CASES))
def test_folder_of_another_identity_is_refused_before_work(task, tmp_path, text_file, monkeypatch):
    """A folder holding the rows of a run with another setting of the task is refused before the model
    loads, naming that setting; the folder is left as it was."""
    needs(task)
    _, key, there, now, rows = TASK_CASES[task]
    made_by = config_identity(task_cfg(tmp_path, task, text_file))
    out = tmp_path / "run"
    out.mkdir()
    record = {"format": "mobiquant-run", "config": made_by, "config_sha256": digest(made_by), "base_model": None}
    (out / IDENTITY_NAME).write_text(json.dumps(record))
    (out / rows).write_text("method,budget\nx,4\n")
    before = files(out)
    no_model(monkeypatch)
    with pytest.raises(RunFolderError) as e:
        resolve_task(task)(task_cfg(tmp_path, task, text_file, f"{key}={now}"))
    text = str(e.value)
    assert f"run folder {out} was made by another configuration ({key}: {there} there, {now} now)" in text
    assert "run.on_mismatch=new_subrun" in text and "\n" not in text
    assert files(out) == before


def test_rows_of_a_task_without_identity_are_refused(tmp_path, text_file, monkeypatch):
    """A folder with the rows of a task but no identity.json (an earlier mobiquant) is refused."""
    out = tmp_path / "run"
    out.mkdir()
    (out / "decode.csv").write_text("method,budget\nfp,\n")
    no_model(monkeypatch)
    with pytest.raises(RunFolderError, match="holds decode.csv of a run that recorded no identity"):
        resolve_task("decode")(task_cfg(tmp_path, "decode", text_file))


def test_identity_of_each_task_is_what_decides_its_numbers(tmp_path, text_file):
    """Each task's identity holds its own settings and those it calibrates with, not those it never reads
    (decode reads no evaluation corpus or baseline; the analyses no lm-eval or decode block)."""
    ident = {task: config_identity(task_cfg(tmp_path, task, text_file)) for task in TASK_CASES}
    assert ident["lm_eval"]["lm_eval"]["limit"] == 8 and "decode" not in ident["lm_eval"]
    assert "eval" not in ident["lm_eval"] and set(ident["lm_eval"]["data"]) == {"calib"}
    assert ident["decode"]["decode"]["max_new_tokens"] == 8 and "baselines" not in ident["decode"]
    assert "outliers" in ident["outliers"]["analysis"] and "routers" not in ident["outliers"]["analysis"]
    assert "routers" in ident["routers"]["analysis"] and ident["routers"]["eval"]["seqlen"] == 64
    for task in TASK_CASES:
        assert ident[task]["task"] == task and "seed" in ident[task]["calib"] and "quant" in ident[task]
        assert "progress_bar" not in ident[task]["calib"] and "device" not in ident[task]["model"]  # runtime only
    same = config_identity(task_cfg(tmp_path, "decode", text_file, "eval.seqlen=32", "lm_eval.limit=2"))
    assert same == ident["decode"]


def test_decode_records_its_identity_and_refuses_another(tmp_path, text_file, monkeypatch):
    """A real task=decode run records its identity with the base model, releases the lock, resumes with
    the same settings, and refuses other ones before work."""
    monkeypatch.setenv("WANDB_MODE", "offline")
    decode = resolve_task("decode")
    decode(task_cfg(tmp_path, "decode", text_file, "decode.fp=false", "decode.budgets=[4]"))
    out = tmp_path / "run"
    record = json.loads((out / IDENTITY_NAME).read_text())
    assert record["config"]["task"] == "decode" and record["base_model"]["fingerprint"] and record["run_id"]
    assert (out / LOCK_NAME).read_text() == ""  # released cleanly
    first = pd.read_csv(out / "decode.csv")
    decode(task_cfg(tmp_path, "decode", text_file, "decode.fp=false", "decode.budgets=[4]"))
    assert pd.read_csv(out / "decode.csv")["method"].tolist() == first["method"].tolist()
    no_model(monkeypatch)
    with pytest.raises(RunFolderError, match=r"decode.budgets: \[4\] there, \[3\] now"):
        decode(task_cfg(tmp_path, "decode", text_file, "decode.fp=false", "decode.budgets=[3]"))


def checkpoint_meta(folder: Path, mobi: MoBiConfig) -> Path:
    """A checkpoint folder holding only its JSON (what the budget check reads) for the config ``mobi``."""
    folder.mkdir()
    meta = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "config": mobi.to_dict(),
        "sites": [],
        "compute_dtype": "float32",
        "base_model": {"name_or_path": None, "architecture": "LlamaForCausalLM", "fingerprint": "0" * 64},
        "tensors": {"file": TENSORS_NAME, "sha256": "0" * 64, "bytes": 0, "count": 0},
    }
    (folder / CONFIG_NAME).write_text(json.dumps(meta))
    return folder


def test_checkpoint_serving_names_the_budgets_outside_the_checkpoint_and_what_it_allows(tmp_path):
    routed = checkpoint_meta(tmp_path / "routed", MoBiConfig(slice_bits=(3, 1, 1, 1, 1, 1)))
    mobi, is_routed = session.checkpoint_serving(routed, [3.0, 5.5, 8.0], "lm_eval.checkpoint")
    assert is_routed and mobi.slice_bits == (3, 1, 1, 1, 1, 1)
    assert session.checkpoint_serving(routed, [8.0 + 1e-7], "lm_eval.checkpoint", tol=1e-6)[1]
    with pytest.raises(ConfigError) as e:
        session.checkpoint_serving(routed, [8.0 + 1e-7, 2.0, 4.0], "lm_eval.checkpoint")
    assert str(e.value) == (
        f"lm_eval.checkpoint: budgets [8.0000001, 2.0] are outside what checkpoint {routed} serves "
        "(slices [3, 1, 1, 1, 1, 1]): allowed 3 <= bits <= 8"
    )
    static = checkpoint_meta(tmp_path / "static", MoBiConfig(slice_bits=(2, 2, 2), routers=False))
    assert session.checkpoint_serving(static, [2.0, 6.0], "decode.checkpoint")[1] is False
    with pytest.raises(ConfigError, match=r"^decode.checkpoint: budgets \[5.0\] .* allowed one of \[2, 4, 6\] \(no r"):
        session.checkpoint_serving(static, [4.0, 5.0], "decode.checkpoint")
    with pytest.raises(ConfigError, match=r"^decode.checkpoint: checkpoint folder .* does not exist"):
        session.checkpoint_serving(tmp_path / "missing", [4.0], "decode.checkpoint")

"""Fault injection: a calibration killed with SIGKILL, a read-only output folder, a full disk.

The kill is real: ``python -m mobiquant`` runs as a child process and gets SIGKILL once a block picked by
a seeded random draw is listed in its calibration state. The disk faults are simulated, because tests run
as root (permission bits do not stop root) and mounting a read-only or a tiny file system needs
privileges CI does not have:

* read-only: every call that creates, changes or removes a file or folder below a given root
  (``os.open`` for writing, ``open`` for writing, ``mkdir``, ``rename``/``replace``, ``unlink``,
  ``rmdir``, ``chmod``) raises the error a read-only folder gives: ``EACCES`` (a folder without write
  permission) or ``EROFS`` (a read-only mount).
* full disk: :func:`mobiquant.io.fileio._write_all`, through which every byte of every artifact is
  written, writes part of the data for real and then raises ``ENOSPC``, as ``write`` does when a file
  system fills up; from then on every write fails the same way.
"""

from __future__ import annotations

import builtins
import errno
import io
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.hydra_config import HydraConfig
from omegaconf import open_dict

import mobiquant as mq
from mobiquant.__main__ import CONF_DIR
from mobiquant.calibration import CalibConfig, calibrate_model
from mobiquant.io import fileio
from mobiquant.io.checkpoint import CONFIG_NAME, TENSORS_NAME, load_quantized, quantized_state, save_quantized
from mobiquant.io.fileio import WriteError
from mobiquant.io.results import COLUMNS, first_windows_ppl, read_results, write_csv
from mobiquant.tasks import quantize as pipeline
from mobiquant.tasks import session
from mobiquant.tiny import tiny_llama

REPO = Path(__file__).resolve().parents[1]
TIMING = ["calib_seconds", "eval_seconds"]  # wall-clock columns of results.csv: never equal between runs
REASONS = {
    errno.EACCES: "Permission denied",
    errno.EROFS: "Read-only file system",
    errno.ENOSPC: "No space left on device",
}


# ---------------------------------------------------------------------------- fault injectors
def _under(path, root: Path, dir_fd=None) -> bool:
    if isinstance(path, int):  # an open descriptor: nothing is created by name
        return False
    p = os.fsdecode(path)
    if dir_fd is not None and not os.path.isabs(p):
        p = os.path.join(os.readlink(f"/proc/self/fd/{dir_fd}"), p)
    p = Path(os.path.abspath(p))
    return p == root or root in p.parents


def make_read_only(monkeypatch, root: Path, code: int = errno.EACCES) -> None:
    """From now on ``root`` and everything below it behaves like a read-only folder (see the module doc)."""
    root = Path(os.path.abspath(root))

    def deny(path):
        raise OSError(code, os.strerror(code), os.fsdecode(path))  # OSError picks PermissionError for EACCES

    real_open, real_os_open, real_mkdir = builtins.open, os.open, os.mkdir
    writes = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND

    def fake_os_open(path, flags, mode=0o777, *, dir_fd=None):
        if flags & writes and _under(path, root, dir_fd):
            deny(path)
        return real_os_open(path, flags, mode, dir_fd=dir_fd)

    def fake_open(file, mode="r", *args, **kwargs):
        if any(c in mode for c in "wax+") and _under(file, root):
            deny(file)
        return real_open(file, mode, *args, **kwargs)

    def fake_mkdir(path, mode=0o777, *, dir_fd=None):
        if _under(path, root, dir_fd):
            if os.path.lexists(path if dir_fd is None else os.path.join(os.readlink(f"/proc/self/fd/{dir_fd}"), path)):
                raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), os.fsdecode(path))
            deny(path)
        return real_mkdir(path, mode, dir_fd=dir_fd)

    def guard(real, n_paths=1):
        def fake(*args, **kwargs):
            fds = [kwargs.get("src_dir_fd"), kwargs.get("dst_dir_fd")] if n_paths == 2 else [kwargs.get("dir_fd")]
            for path, fd in zip(args[:n_paths], fds, strict=True):
                if _under(path, root, fd):
                    deny(path)
            return real(*args, **kwargs)

        return fake

    monkeypatch.setattr(os, "open", fake_os_open)
    monkeypatch.setattr(builtins, "open", fake_open)
    monkeypatch.setattr(io, "open", fake_open)
    monkeypatch.setattr(os, "mkdir", fake_mkdir)
    for name in ("replace", "rename"):
        monkeypatch.setattr(os, name, guard(getattr(os, name), 2))
    for name in ("unlink", "remove", "rmdir", "chmod"):
        monkeypatch.setattr(os, name, guard(getattr(os, name)))


class FullDisk:
    """The file system fills up during the ``nth`` write (1-based) of a file named ``name``: ``keep`` of
    that write's bytes land in the temporary file, then ``ENOSPC``; every later write fails at once."""

    def __init__(self, monkeypatch, name: str, nth: int = 1, keep: float = 0.5):
        self.name, self.nth, self.keep = name, nth, keep
        self.seen, self.full, self.partial = 0, False, None
        self._real = fileio._write_all
        monkeypatch.setattr(fileio, "_write_all", self)

    def __call__(self, fh, data: bytes) -> None:
        tmp = os.readlink(f"/proc/self/fd/{fh.fileno()}")
        if not self.full and Path(tmp).name.startswith(f".{self.name}."):
            self.seen += 1
            if self.seen == self.nth:
                self.full = True
                self._real(fh, data[: int(len(data) * self.keep)])
                fh.flush()
                self.partial = (tmp, os.path.getsize(tmp), len(data))  # really written, then the disk is full
        if self.full:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        self._real(fh, data)


def snapshot(root: Path) -> dict[str, tuple[bytes, int]]:
    """Every file below ``root``: its bytes and modification time."""
    return {
        str(p.relative_to(root)): (p.read_bytes(), p.stat().st_mtime_ns) for p in sorted(root.rglob("*")) if p.is_file()
    }


def temporaries(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*.tmp"))


def assert_write_error(err: WriteError, path: Path, code: int) -> None:
    text = str(err)
    assert err.errno == code
    assert f"cannot write {path}: {REASONS[code]}" in text, text
    if code == errno.ENOSPC:
        assert "is full" in text, text
    else:
        assert "is not writable" in text, text


# ---------------------------------------------------------------------------- SIGKILL of a real calibration
def _cli(run_dir: Path, cache: Path, layers: int) -> list[str]:
    return [
        sys.executable,
        "-m",
        "mobiquant",
        "experiment=smoke",
        "quant=mobiquant",
        "baselines=none",
        "torch_threads=1",
        f"model.tiny.num_hidden_layers={layers}",
        f"paths.cache_dir={cache}",
        f"hydra.run.dir={run_dir}",
    ]


def _child_env() -> dict[str, str]:
    return {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "MKL_NUM_THREADS": "1",
        "WANDB_MODE": "offline",
        "PYTHONUNBUFFERED": "1",
    }


def _run_cli(cmd, cwd: Path) -> str:
    done = subprocess.run(cmd, cwd=cwd, env=_child_env(), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done.stdout + done.stderr


def _finished_blocks(state_json: Path) -> list[int]:
    """The blocks ``state.json`` lists as finished (it is replaced atomically: never read half written)."""
    try:
        return sorted(int(k) for k in json.loads(state_json.read_text())["blocks"])
    except FileNotFoundError:
        return []


def _comparable(results: Path) -> pd.DataFrame:
    df = read_results(results).drop(columns=TIMING)
    df["checkpoint"] = [str(Path(c).relative_to(results.parent)) for c in df["checkpoint"]]
    return df


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """One corpus cache for the runs of this module (the cleaned text is built once, by the first run)."""
    return tmp_path_factory.mktemp("cache")


@pytest.mark.slow  # three runs of the app in child processes: about a minute on a 2-core CPU
def test_sigkill_during_calibration_resumes_bit_identical(tmp_path, cache):
    layers = 6
    kill_after = random.Random(20250607).randrange(layers - 1)  # any block but the last
    ref_dir, run_dir = tmp_path / "reference", tmp_path / "killed"

    _run_cli(_cli(ref_dir, cache, layers), tmp_path)  # uninterrupted, in its own run directory

    state_dir = run_dir / "calib_state" / "mobiquant"
    ckpt_dir = run_dir / "checkpoints" / "mobiquant"
    proc = subprocess.Popen(
        _cli(run_dir, cache, layers),
        cwd=tmp_path,
        env=_child_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 300
        while kill_after not in _finished_blocks(state_dir / "state.json"):
            assert proc.poll() is None, f"the run ended (rc {proc.returncode}) before block {kill_after} was seen"
            assert time.monotonic() < deadline, "block never finished"
            time.sleep(0.002)
        proc.send_signal(signal.SIGKILL)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
    assert proc.returncode == -signal.SIGKILL

    finished = _finished_blocks(state_dir / "state.json")
    assert kill_after in finished and finished == list(range(len(finished)))
    for i in finished:
        assert (state_dir / f"block_{i:03d}.safetensors").is_file()
    # Killed mid-calibration: nothing in the run directory looks like a finished result.
    assert not (ckpt_dir / CONFIG_NAME).exists() and not (run_dir / "results.csv").exists()
    # What a kill in the middle of a write leaves behind (a temporary file, a block file renamed into
    # place but not yet listed in state.json), planted here because the kill above lands between writes
    # most of the time. None of it may be taken for a finished block, checkpoint or result row.
    nxt = len(finished)
    planted = {
        state_dir / f".block_{nxt:03d}.safetensors.k1ll3d.tmp": b"\x08\x00",
        ckpt_dir / f".{TENSORS_NAME}.k1ll3d.tmp": (state_dir / "block_000.safetensors").read_bytes()[:100],
        run_dir / ".results.csv.k1ll3d.tmp": b"model,method,budget,dataset,ppl\nx,mobiquant,2.0,wiki_extract,1.0\n",
    }
    if nxt < layers:
        planted[state_dir / f"block_{nxt:03d}.safetensors"] = b"not a finished block"
    for path, data in planted.items():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)

    out = _run_cli(_cli(run_dir, cache, layers), tmp_path)  # the same command, the same run directory
    for i in finished:
        assert f"block {i}: resumed from {state_dir}" in out
    assert f"block {len(finished)}: resumed" not in out

    ref_ckpt = ref_dir / "checkpoints" / "mobiquant"
    assert (ckpt_dir / TENSORS_NAME).read_bytes() == (ref_ckpt / TENSORS_NAME).read_bytes()
    meta, ref_meta = (json.loads((d / CONFIG_NAME).read_text()) for d in (ckpt_dir, ref_ckpt))
    for m in (meta, ref_meta):
        del m["extra"]["calib_seconds"]  # wall-clock time
        m["extra"].pop("plan_seconds", None)
        m.pop("meta_sha256", None)  # covers the wall-clock times above
    assert meta == ref_meta
    resumed, reference = _comparable(run_dir / "results.csv"), _comparable(ref_dir / "results.csv")
    assert len(reference) == 3  # one row per budget of the smoke grid the default slices serve (3, 4, 8)
    pd.testing.assert_frame_equal(resumed, reference)
    assert not state_dir.exists()  # the finished checkpoint supersedes the per-block state
    for path in planted:  # outside calib_state: left where they were, never renamed into place or read
        if path.parent != state_dir:
            assert path.read_bytes() == planted[path]


# ---------------------------------------------------------------------------- read-only output folder
def _smoke_cfg(out: Path, cache: Path, *overrides: str):
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose(
            "config",
            overrides=["experiment=smoke", "logger=none", "torch_threads=1", *overrides],
            return_hydra_config=True,
        )
    HydraConfig.instance().set_config(cfg)
    with open_dict(cfg):
        del cfg["hydra"]
        cfg.paths.output_dir = str(out)
        cfg.paths.cache_dir = str(cache)
    return cfg


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, cache):
    """A complete smoke run (fp, rtn, mobiquant): results.csv, checkpoints, calibration.csv, ..."""
    out = tmp_path_factory.mktemp("finished") / "run"
    pipeline.run(_smoke_cfg(out, cache))
    return out


@pytest.mark.parametrize("code", [errno.EACCES, errno.EROFS], ids=["no-write-permission", "read-only-mount"])
def test_read_only_output_dir_fails_before_work_and_keeps_earlier_files(
    finished_run, cache, tmp_path, monkeypatch, code
):
    out = tmp_path / "run"
    shutil.copytree(finished_run, out)
    before = snapshot(out)
    assert {"results.csv", f"checkpoints/mobiquant/{TENSORS_NAME}"} <= set(before)
    loaded = []
    monkeypatch.setattr(session, "load_base_model", lambda cfg: loaded.append(cfg) or pytest.fail("model loaded"))
    cfg = _smoke_cfg(out, cache, "budget.budgets=[2,3,4,6,8]")  # a budget still to evaluate
    make_read_only(monkeypatch, out, code)
    with pytest.raises(WriteError) as e:
        pipeline.run(cfg)
    assert_write_error(e.value, out, code)
    assert f"{out} is not writable" in str(e.value)
    assert not loaded  # refused before the model was loaded
    monkeypatch.undo()
    assert snapshot(out) == before  # every earlier file intact and unchanged, nothing added


# ---------------------------------------------------------------------------- each writer: read-only and full disk
def _packed(slice_bits):
    model, _ = tiny_llama(num_hidden_layers=1)
    mq.quantize_model(model, mq.MoBiConfig(slice_bits=slice_bits, group_size=32, lwc_init=None, router_hidden=8))
    mq.freeze(model)
    return model


def _fault(kind: str, monkeypatch, folder: Path, name: str) -> int:
    if kind == "full-disk":
        FullDisk(monkeypatch, name)
        return errno.ENOSPC
    make_read_only(monkeypatch, folder)
    return errno.EACCES


@pytest.mark.parametrize("kind", ["full-disk", "read-only"])
def test_results_csv_write_fault_keeps_the_previous_table(tmp_path, monkeypatch, kind):
    path = tmp_path / "results.csv"
    rows = [
        {c: None for c in COLUMNS} | {"method": "rtn", "budget": float(b), "dataset": "d", "ppl": 10.0 + b}
        for b in range(2, 9)
    ]
    write_csv(pd.DataFrame(rows[:3]), path)
    before = snapshot(tmp_path)
    code = _fault(kind, monkeypatch, tmp_path, "results.csv")
    with pytest.raises(WriteError) as e:
        write_csv(pd.DataFrame(rows), path)
    assert_write_error(e.value, path, code)
    assert "any earlier results.csv is unchanged" in str(e.value)
    monkeypatch.undo()
    assert snapshot(tmp_path) == before  # old table byte for byte, no temporary file
    assert len(read_results(path)) == 3


@pytest.mark.parametrize(
    "kind,name", [("full-disk", TENSORS_NAME), ("full-disk", CONFIG_NAME), ("read-only", TENSORS_NAME)]
)
def test_checkpoint_write_fault_keeps_the_previous_checkpoint(tmp_path, monkeypatch, kind, name):
    folder = tmp_path / "ckpt"
    old = _packed((4,))
    save_quantized(old, folder, base_model="tiny")
    before = snapshot(folder)
    code = _fault(kind, monkeypatch, folder, name)
    with pytest.raises(WriteError) as e:
        save_quantized(_packed((2, 2)), folder, base_model="tiny")
    # The JSON case: the disk fills while the JSON is written, after the new tensors are complete on disk
    # under a temporary name; the old JSON must not end up beside the new tensors (or the reverse).
    assert_write_error(e.value, folder / name, code)
    monkeypatch.undo()
    assert snapshot(folder) == before  # no temporary file, and the old pair of files untouched
    loaded = load_quantized(tiny_llama(num_hidden_layers=1)[0], folder)
    assert loaded.mobiquant_config.slice_bits == (4,)
    reference = quantized_state(old)
    assert all(torch.equal(v, reference[k]) for k, v in quantized_state(loaded).items())


# ---------------------------------------------------------------------------- full disk during calibration
def _calibrate(state_dir, layers=3):
    model, _ = tiny_llama(num_hidden_layers=layers)
    ids = torch.randint(0, 257, (4, 32), generator=torch.Generator().manual_seed(0))
    cfg = CalibConfig(
        epochs_stage1=1, epochs_stage2=1, batch_size=2, progress_bar=False, threshold_windows=2, threshold_step=1.0
    )
    calibrate_model(model, ids, mq.MoBiConfig(group_size=32, router_hidden=8), cfg, state_dir=state_dir)
    return quantized_state(model)


@pytest.mark.parametrize(
    "name,nth", [("block_001.safetensors", 1), ("state.json", 3)], ids=["block-file", "state-json"]
)
def test_full_disk_during_calibration_keeps_finished_blocks_and_resumes(tmp_path, monkeypatch, caplog, name, nth):
    """state.json is written at the start and after each block: its third write is the one naming block 1."""
    torch.set_num_threads(1)
    state = tmp_path / "state"
    disk = FullDisk(monkeypatch, name, nth=nth)
    with pytest.raises(WriteError) as e:
        _calibrate(state)
    assert_write_error(e.value, state / name, errno.ENOSPC)
    assert disk.partial is not None and 0 < disk.partial[1] < disk.partial[2]  # it failed midway
    monkeypatch.undo()
    assert temporaries(state) == []
    assert json.loads((state / "state.json").read_text())["blocks"].keys() == {"0"}  # block 0 kept, listed
    # After space is freed, the same call resumes from block 0 and ends bit-identical.
    with caplog.at_level("INFO", logger="mobiquant.calibration"):
        resumed = _calibrate(state)
    assert "block 0: resumed" in caplog.text and "block 1: resumed" not in caplog.text
    reference = _calibrate(None)
    assert resumed.keys() == reference.keys()
    assert all(torch.equal(resumed[k], reference[k]) for k in reference)


def test_full_disk_while_writing_results_keeps_finished_rows(cache, tmp_path, monkeypatch):
    """results.csv is rewritten after every evaluation; the disk fills during the third rewrite."""
    out = tmp_path / "run"
    cfg = _smoke_cfg(out, cache, "baselines=fp")
    disk = FullDisk(monkeypatch, "results.csv", nth=3)
    with pytest.raises(WriteError) as e:
        pipeline.run(cfg)
    assert_write_error(e.value, out / "results.csv", errno.ENOSPC)
    assert disk.partial is not None
    monkeypatch.undo()
    assert temporaries(out) == []
    kept = read_results(out / "results.csv")
    assert len(kept) == 2  # the two rows written before the disk filled, complete and readable
    ckpt = snapshot(out / "checkpoints")
    assert (out / "checkpoints" / "mobiquant" / CONFIG_NAME).is_file()
    pipeline.run(_smoke_cfg(out, cache, "baselines=fp"))  # space freed: the same run again
    final = read_results(out / "results.csv")
    assert len(final) == 4  # fp + mobiquant at 3 budgets
    pd.testing.assert_frame_equal(final.iloc[:2], kept)  # finished rows kept, not recomputed
    assert snapshot(out / "checkpoints") == ckpt  # the checkpoint was reloaded, not rewritten
    # windows.csv was written before the failed results.csv: the redone evaluation replaced its windows
    win = pd.read_csv(out / "windows.csv")
    assert not win.duplicated(["method", "budget", "dataset", "window"]).any()
    assert len(win) == int(final["n_windows"].sum())
    per_eval = first_windows_ppl(win).merge(final, on=["method", "budget", "dataset"])
    assert len(per_eval) == 4
    assert (per_eval["ppl_x"] - per_eval["ppl_y"]).abs().max() <= 1e-9 * per_eval["ppl_y"].max()

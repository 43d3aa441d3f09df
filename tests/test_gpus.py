"""The GPU claim of hydra/launcher=gpus (file locks, CUDA_VISIBLE_DEVICES), with fake GPUs on the CPU."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import types
from pathlib import Path

import pytest

from mobiquant import gpus

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

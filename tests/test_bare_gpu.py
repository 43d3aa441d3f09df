"""benchmarks/bare_gpu.sh's detached jobs: `launch` runs a command in its own copy of the repository and
`poll` brings the logs and result files back to $OUT (no GPU needed)."""

from __future__ import annotations

import os
import subprocess
import tarfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "bare_gpu.sh"


def _sh(*args: str, env: dict) -> str:
    return subprocess.run(
        ["bash", str(SCRIPT), *args], cwd=ROOT, env=env, check=True, capture_output=True, text=True, timeout=120
    ).stdout


def test_launch_runs_detached_jobs_and_poll_returns_their_logs_and_results(tmp_path):
    root, out = tmp_path / "root", tmp_path / "out"
    out.mkdir()
    env = {**os.environ, "ROOT": str(root), "OUT": str(out), "POLL_EVERY": "1"}
    _sh("launch", "writer", "bash", "-c", f"pwd; mkdir -p {root}/res; echo a,b > {root}/res/r.csv", env=env)
    _sh("launch", "failer", "python3", "-c", "raise SystemExit(3)", env=env)
    text = _sh("poll", "60", env=env)
    assert "2 of 2 jobs done" in text
    log = (out / "logs" / "writer.log").read_text()
    assert log.splitlines()[0] == str(root / "repo.writer") and log.splitlines()[-1] == "exit 0"
    assert (root / "repo.writer" / "benchmarks" / "bare_gpu.sh").is_file()  # the job's own copy of the tree
    assert (out / "logs" / "failer.log").read_text().splitlines()[-1] == "exit 3"
    with tarfile.open(out / "results.tgz") as tar:
        assert tar.getnames() == ["res/r.csv"]


def test_poll_needs_out(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "OUT"} | {"ROOT": str(tmp_path)}
    with pytest.raises(subprocess.CalledProcessError) as e:
        _sh("poll", "1", env=env)
    assert "OUT" in e.value.stderr

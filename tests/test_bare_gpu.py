"""benchmarks/bare_gpu.sh's detached jobs: `launch` runs a command in its own copy of the repository and
`poll` brings the logs and result files back to $OUT (no GPU needed)."""

from __future__ import annotations

import os
import subprocess
import sys
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


def test_a_job_queued_after_another_starts_when_it_is_done(tmp_path):
    """`launch B bash benchmarks/bare_gpu.sh after A CMD`: B's command waits for job A's end (so two jobs do not share
    a GPU), then runs; both logs come back."""
    root, out = tmp_path / "root", tmp_path / "out"
    out.mkdir()
    env = {**os.environ, "ROOT": str(root), "OUT": str(out), "POLL_EVERY": "1"}
    stamp = root / "order.txt"
    _sh("launch", "first", "bash", "-c", f"sleep 3; echo first >> {stamp}", env=env)
    _sh("launch", "second", "bash", "benchmarks/bare_gpu.sh", "after", "first", "bash", "-c", f"echo second >> {stamp}",
        env=env)  # fmt: skip
    assert "2 of 2 jobs done" in _sh("poll", "60", env=env)
    assert stamp.read_text().split() == ["first", "second"]
    assert "after first:" in (out / "logs" / "second.log").read_text()


def test_poll_needs_out(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "OUT"} | {"ROOT": str(tmp_path)}
    with pytest.raises(subprocess.CalledProcessError) as e:
        _sh("poll", "1", env=env)
    assert "OUT" in e.value.stderr


SUITE = ROOT / "benchmarks" / "decode_suite.sh"


def test_decode_suite_runs_its_stages_in_order_and_resumes(tmp_path):
    """benchmarks/decode_suite.sh: each stage's command under its own log; a stage that ended well is skipped on
    the next start, a failed one runs again; without the model the end-to-end stage is skipped; an unknown stage
    is refused with the known ones."""
    calls, fail = tmp_path / "calls", tmp_path / "fail"
    py = tmp_path / "py"
    py.write_text(f'#!/usr/bin/env bash\necho "$*" >> {calls}\n[ -e {fail} ] && grep -q -- "--bits-config " <<< "$*" '
                  "&& exit 1\nexit 0\n")  # fmt: skip
    py.chmod(0o755)
    env = {**os.environ, "ROOT": str(tmp_path), "PY": str(py), "WARM_SHARDS": "0"}

    def suite(*stages):
        return subprocess.run(
            ["bash", str(SUITE), *stages], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60
        )

    fail.touch()  # the second stack run fails
    r = suite()
    assert r.returncode == 0, r.stderr

    def ran():  # what each call ran (its first word that is not an option), after the version line
        return [next(w for w in line.split() if not w.startswith("-")) for line in calls.read_text().splitlines()[1:]]

    assert ran() == [
        "benchmarks/decode_bench.py",
        "benchmarks/decode_bench.py",
        "benchmarks/kernel_bench.py",
        "benchmarks/router_launch_bench.py",
        "pytest",
    ]
    assert "== e2e: no model at" in r.stdout
    res = tmp_path / "res"
    assert sorted(p.name for p in res.glob("*.done")) == [
        "kernels.done",
        "routers.done",
        "stack_default.done",
        "tests.done",
    ]
    assert "--bits-configs" not in calls.read_text() and "--out " + str(res / "kernels") in calls.read_text()
    fail.unlink()
    calls.unlink()
    r = suite("stack", "kernels")
    assert r.returncode == 0 and "== stack_default: done before, skipped" in r.stdout
    assert ran() == ["benchmarks/decode_bench.py"]
    assert (res / "stack_config.done").exists()
    r = suite("bench")
    assert r.returncode == 2 and "unknown stage 'bench' (stages: tests kernels routers stack e2e pattern" in r.stderr
    calls.unlink()
    r = suite("pattern")
    assert r.returncode == 0 and ran() == ["benchmarks/stream_pattern.py"] and (res / "pattern.done").exists()
    calls.unlink()
    r = suite("package", "gluon")  # gluon: checks and timings, then the TMA mode in its own process
    assert r.returncode == 0 and ran() == ["benchmarks/decode_bench.py", *["benchmarks/gluon_proto.py"] * 2]
    assert all((res / f"{name}.done").exists() for name in ("package", "gluon", "gluon_tma"))
    assert "gluon_proto.py --check --time" in calls.read_text() and "gluon_proto.py --tma" in calls.read_text()
    calls.unlink()
    r = suite("placement")  # the package rows with site routers, then sublayer ones
    assert r.returncode == 0 and ran() == ["benchmarks/decode_bench.py"] * 2, r.stdout
    assert all(
        f"--package-placement {w} --package-budgets 3.5,4.5,5.5" in calls.read_text() for w in ("site", "sublayer")
    )
    assert all((res / f"placement_{w}.done").exists() for w in ("site", "sublayer"))
    assert calls.read_text().count("--package-span") == 1  # the site routers' run also with spans
    calls.unlink()
    r = suite("span")  # the stack's views with k on the device, then the tests of spans compiled
    assert r.returncode == 0 and ran() == ["benchmarks/decode_bench.py", "pytest"], r.stdout
    assert "--device-k" in calls.read_text() and (res / "span_stack.done").exists()
    calls.unlink()
    r = suite("fragment")  # its GPU tests, then the stack with each placement of the fragment kernel
    assert r.returncode == 0 and ran() == ["pytest", *["benchmarks/decode_bench.py"] * 3], r.stdout
    assert all(f",,4,,0,,1,,0,0,0,1,{f} " in calls.read_text() for f in ("1", ",7", ",0"))
    calls.unlink()
    r = suite("compile")  # the compiled step's GPU tests, then graph against compile on the package's model
    assert r.returncode == 0 and ran() == ["pytest", "benchmarks/step_overhead.py"], r.stdout
    assert (res / "step_overhead.done").exists() and "-k compiled or graph" in calls.read_text()
    calls.unlink()
    r = suite("prefill")  # needs the model and a checkpoint: skipped without them
    assert r.returncode == 0 and "== prefill: needs the model at" in r.stdout and ran() == []
    calls.unlink()
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "smol.gguf").touch()
    (tmp_path / "ckpt" / "mobiquant").mkdir(parents=True)
    (tmp_path / "ckpt" / "mobiquant" / "mobiquant.json").write_text("{}")
    r = suite("prefill")
    assert r.returncode == 0 and ran() == ["benchmarks/e2e_decode.py"] and "--prefill-profile" in calls.read_text()
    assert (res / "prefill.done").exists()
    calls.unlink()
    r = suite("prompt")  # the tile path's GPU tests, then a few-token prompt's kernels on the default layout
    assert r.returncode == 0 and ran() == ["pytest", *["benchmarks/kernel_bench.py"] * 2], r.stdout
    assert "--path tile" in calls.read_text() and (res / "prompt_tile.done").exists()
    assert "--slices 3,1,1,1,1,1" in calls.read_text() and (res / "prompt.done").exists()
    calls.unlink()
    r = suite("tiling")  # router tests, the sweep, the pick (here none: whole rows), the stack with each tiling
    assert r.returncode == 0 and "== stack router tiling: 1,4,0" in r.stdout, r.stdout
    assert ran() == ["pytest", "benchmarks/router_launch_bench.py", "import", *["benchmarks/decode_bench.py"] * 2]
    assert calls.read_text().count("--router-tiling 1,4,0") == 2 and (res / "stack_whole_rows.done").exists()


def test_package_stages_compile_in_warm_shards_first(tmp_path):
    """benchmarks/decode_suite.sh: a package stage first runs its command once a shard (``--warm-shard I/N``, side by
    side), then the timed run with ``--out``; a stage done before runs neither."""
    calls = tmp_path / "calls"
    py = tmp_path / "py"
    py.write_text(f'#!/usr/bin/env bash\necho "$*" >> {calls}\nexit 0\n')
    py.chmod(0o755)
    env = {**os.environ, "ROOT": str(tmp_path), "PY": str(py), "WARM_SHARDS": "3"}
    r = subprocess.run(["bash", str(SUITE), "block"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    lines = calls.read_text().splitlines()[1:]  # after the version line
    bench = [line for line in lines if "decode_bench.py" in line]
    assert len(bench) == 4 and all("--package-placement block" in line for line in bench)
    assert sorted(line.split("--warm-shard ")[1] for line in bench[:3]) == ["0/3", "1/3", "2/3"]
    assert "--warm-shard" not in bench[3] and bench[3].endswith("--out " + str(tmp_path / "res" / "loads_block"))
    assert "loads_block: compiling in 3 warm shards" in r.stdout
    assert all((tmp_path / "res" / f"loads_block.warm{i}.txt").exists() for i in range(3))
    calls.unlink()
    r = subprocess.run(["bash", str(SUITE), "block"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and "decode_bench.py" not in calls.read_text()


def test_decode_bench_warm_shards_split_the_configs(capsys):
    """``decode_bench.py --warm-shard I/N`` (the dry run on the CPU): shard I decodes in the configs ``j`` with ``j % N
    == I`` only, times nothing and returns no row; a malformed shard is refused."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import decode_bench

    args = ("--dry-run --slices 3,1,1,1,1,1 --no-routed --fuse-inputs --package-policy adjacent --package-budgets 3.5 "
            "--package-fused-only --package-fragment-loads --new-tokens 2").split()  # fmt: skip
    assert decode_bench.main([*args, "--warm-shard", "1/3"]) == 0
    out = capsys.readouterr().out
    labels = {line.removeprefix("# warming: ") for line in out.splitlines() if line.startswith("# warming: ")}
    assert labels == {"package sites+inputs frag everywhere", "package sites+inputs prefetch 0"}
    assert "package fp16:" not in out and out.count("# warmed:") == 2 * 7
    assert "nan us/token" not in out  # nothing timed: no row line
    for bad in ("3/3", "a/b", "1"):
        with pytest.raises(SystemExit):
            decode_bench.main([*args, "--warm-shard", bad])


def test_triton_cache_travels_from_one_machine_to_the_next(tmp_path):
    """A launched job compiles into $ROOT/triton_cache; the poll that sees every job ended packs it into
    $OUT/triton_cache.tgz; `keep-cache` keeps that here and `install` of the kept folder unpacks it on a fresh
    machine, file for file. A cut poll (jobs still running) packs nothing; a file that is no tar is refused."""
    root, out, fresh, keep = tmp_path / "root", tmp_path / "out", tmp_path / "fresh", tmp_path / "keep"
    out.mkdir()
    env = {**os.environ, "ROOT": str(root), "OUT": str(out), "POLL_EVERY": "1"}
    job = 'mkdir -p "$TRITON_CACHE_DIR/ab12" && echo cubin > "$TRITON_CACHE_DIR/ab12/k.cubin"; sleep 3'
    _sh("launch", "compiler", "bash", "-c", job, env=env)
    assert "0 of 1 jobs done" in _sh("poll", "0", env=env) and not (out / "triton_cache.tgz").exists()
    text = _sh("poll", "60", env=env)
    assert "1 of 1 jobs done" in text and "triton cache packed" in text
    assert "kept" in _sh("keep-cache", str(out / "triton_cache.tgz"), str(keep), env=env)
    text = _sh("install", str(keep), env={**env, "ROOT": str(fresh)})
    assert "triton cache: 1 files" in text
    assert (fresh / "triton_cache" / "ab12" / "k.cubin").read_text() == "cubin\n"
    (tmp_path / "bad.tgz").write_text("not a tar")
    with pytest.raises(subprocess.CalledProcessError) as e:
        _sh("keep-cache", str(tmp_path / "bad.tgz"), str(keep), env=env)
    assert "is not a tar.gz of a Triton cache" in e.value.stderr


def test_a_checkpoint_travels_in_parts_and_is_unpacked_once_all_are_there(tmp_path):
    """`bundle-ckpt` splits a saved checkpoint folder into parts of one transfer each; `install` of each part copies
    it, and the last one unpacks the folder, byte for byte, under $ROOT/ckpt; a folder without mobiquant.json is
    refused."""
    ckpt = tmp_path / "run" / "mobiquant"
    ckpt.mkdir(parents=True)
    (ckpt / "mobiquant.json").write_text('{"format": 1}')
    payload = os.urandom(300_000)
    (ckpt / "quantized.safetensors").write_bytes(payload)
    bundle, root = tmp_path / "bundle", tmp_path / "root"
    env = {**os.environ, "ROOT": str(root)}
    _sh("bundle-ckpt", str(ckpt), str(bundle), "3", env=env)
    parts = sorted(p.name for p in bundle.iterdir())
    assert parts == ["k1", "k2", "k3"]
    assert "checkpoint ready" not in _sh("install", str(bundle / "k2"), env=env)
    assert "checkpoint ready" not in _sh("install", str(bundle / "k1"), env=env)
    assert f"checkpoint ready: {root / 'ckpt' / 'mobiquant'}" in _sh("install", str(bundle / "k3"), env=env)
    assert (root / "ckpt" / "mobiquant" / "quantized.safetensors").read_bytes() == payload
    assert (root / "ckpt" / "mobiquant" / "mobiquant.json").read_text() == '{"format": 1}'
    with pytest.raises(subprocess.CalledProcessError):
        _sh("bundle-ckpt", str(tmp_path / "run"), str(bundle), env=env)

"""The decode benchmarks import and check their arguments without a GPU; their dry runs exercise the code
path of the GPU tables on a tiny CPU model (slow: tens of seconds on a shared CPU)."""

from __future__ import annotations

import dataclasses
import re
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCH))

pytest.importorskip("triton", reason="decode_bench.py needs triton")
import decode_bench  # noqa: E402
import e2e_decode  # noqa: E402


def test_kernel_kinds_of_a_census():
    """A decode step's kernels summed by kind (names as an H100's compiled step gave them): the GEMVs, the routers'
    launches, norms, attention, Inductor's elementwise code, copies; anything else 'other'."""
    count = {"frag_gemv_kernel": 16.0, "_router_kernel": 8.0, "triton_red_fused_add_mean_mul_pow_rsqrt_0": 1.0,
             "cudnn_generated_fort_native_sdpa_sm80_flash_fprop": 4.0, "triton_poi_fused_add_0": 8.0,
             "nvjet_sm90_hsh_64x8_64x16_4x1_v_bz_splitK_TNT": 1.0, "Memcpy DtoD (Device -> Device)": 3.0,
             "some_new_kernel": 2.0}  # fmt: skip
    time_us = dict(zip(count, (233.0, 50.2, 1.9, 14.2, 9.9, 5.7, 3.4, 1.0), strict=True))
    kinds = e2e_decode.kernel_kinds(count, time_us)
    assert kinds["gemv"] == (17.0, 233.0 + 5.7) and kinds["router"] == (8.0, 50.2)
    assert kinds["norm"] == (1.0, 1.9) and kinds["attention"] == (4.0, 14.2)
    assert kinds["elementwise"] == (8.0, 9.9) and kinds["copy"] == (3.0, 3.4) and kinds["other"] == (2.0, 1.0)


@pytest.mark.parametrize(
    "argv",
    [
        ["--budgets", "0.5,4"],
        ["--budgets", "x"],
        ["--slices", "3,x"],
        ["--new-tokens", "1"],
        ["--gguf", "/nonexistent.gguf"],
    ],
)
def test_e2e_decode_rejects_bad_arguments(argv):
    with pytest.raises(SystemExit):
        e2e_decode.parse_args(argv)


def test_e2e_decode_arguments():
    a = e2e_decode.parse_args(["--budgets", "2,4.5", "--new-tokens", "32"])
    assert a.budgets == [2.0, 4.5] and a.new_tokens == 32 and a.graph == "auto"


def test_e2e_decode_prompt_from_a_file(tmp_path):
    """``--prompt-file`` / ``--prompt-tokens``: the file's first tokens as ids, or a clear error."""
    from mobiquant.tiny import tiny_llama

    _, tok = tiny_llama(dtype="float32")
    text = tmp_path / "t.txt"
    text.write_text("The tower is 324 metres tall, about the same height as an 81-storey building. " * 20)
    ids = e2e_decode.prompt_from_file(tok, text, 40)
    assert ids.shape == (1, 40) and ids[0].tolist() == tok(text.read_text()).input_ids[:40]
    with pytest.raises(ValueError, match="fewer than --prompt-tokens 100000"):
        e2e_decode.prompt_from_file(tok, text, 100000)
    with pytest.raises(ValueError, match="at least 1"):
        e2e_decode.prompt_from_file(tok, text, 0)


def test_kernel_bench_chain_option(capsys):
    """``kernel_bench.py --chain R`` (R launches in a row over R layers) takes a positive count, checked first."""
    import kernel_bench as kb

    with pytest.raises(SystemExit):
        kb.main(["--chain", "0"])
    assert "--chain must be a positive number of launches, got 0" in capsys.readouterr().err


def test_benchmark_placements_are_the_package_ones():
    from mobiquant.quant.config import PLACEMENTS

    assert decode_bench.PLACEMENTS == PLACEMENTS


def test_decode_bench_needs_a_gpu_or_dry_run(monkeypatch):
    monkeypatch.setattr(decode_bench.torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit):
        decode_bench.main([])
    with pytest.raises(SystemExit):
        decode_bench.main(["--dry-run", "--new-tokens", "1"])


def test_x_gemlite_pairs_rows_of_the_same_bits_and_shape():
    rows = [
        dict(mode="gemlite 2-bit", budget=2.0, us_per_token=100.0),
        dict(mode="gemlite q 4096x4096", budget=4.0, us_per_token=20.0),
        dict(mode="static k=1", budget=2.0, us_per_token=50.0),
        dict(mode="static k=2 q 4096x4096", budget=4.0, us_per_token=10.0),
        dict(mode="static k=2", budget=4.0, us_per_token=10.0),
        dict(mode="routed", budget=2.0, us_per_token=1.0),
    ]
    decode_bench.x_gemlite(rows)
    got = [r["x_gemlite"] for r in rows]
    assert got[2:4] == [2.0, 2.0] and all(x != x for x in got[:2] + got[4:])  # NaN where there is no pair


@pytest.mark.slow
def test_dry_runs(tmp_path, capsys):
    assert e2e_decode.main(["--dry-run", "--slices", "2,2,2,2", "--budgets", "2,8", "--out", str(tmp_path)]) == 0
    df = pd.read_csv(tmp_path / "e2e_decode.csv")
    statics = [f"static k={k}" for k in range(1, 5)]
    assert df["mode"].tolist() == ["fp16", "mobiquant", "mobiquant", *statics]
    assert df["bits"].iloc[1:].tolist() == [2.0, 8.0, 2.0, 4.0, 6.0, 8.0] and (df["tokens_per_s"] > 0).all()
    assert e2e_decode.main(["--dry-run", "--new-tokens", "2", "--profile", "--out", str(tmp_path)]) == 0
    df = pd.read_csv(tmp_path / "e2e_decode.csv")
    assert df["budget"].iloc[1:7].tolist() == [3.0, 4.0, 5.0, 6.0, 7.0, 8.0]  # every integer view
    out = capsys.readouterr().out
    assert "launches and kernel time per step" in out and "routed 4" in out and "static k=6" in out
    argv = ["--dry-run", "--budgets", "4", "--views", "2", "--new-tokens", "2", "--prefill-profile"]
    assert e2e_decode.main([*argv, "--out", str(tmp_path)]) == 0
    pre = pd.read_csv(tmp_path / "e2e_prefill.csv")
    assert pre["mode"].tolist() == ["fp16", "routed 4", "static k=2"]
    assert (pre["prefill_ms"] > 0).all() and (pre["kernels"] == 0).all()  # the CPU runs no device kernel
    assert (pre["py_mobiquant_ms"] > 0).all() and (pre["py_builtin_ms"] > 0).all()  # Python's self time by area
    out = capsys.readouterr().out
    assert "# prefill routed 4:" in out and "under cProfile" in out and "mobiquant linear.py:" in out
    argv = ["--dry-run", "--budgets", "4", "--new-tokens", "2", "--bits-configs", "64,64,4,,0,1", "--ab"]
    argv += ["--out", str(tmp_path)]
    assert e2e_decode.main(argv) == 0
    df = pd.read_csv(tmp_path / "e2e_decode.csv")
    assert df["mode"].tolist()[-6:] == [
        "mobiquant [64/64/4w/None/sk1]",
        "static k=2 [64/64/4w/None/sk1]",
        "mobiquant [per linear]",
        "static k=2 [per linear]",
        "mobiquant [host count]",
        "mobiquant [router in launch]",
    ]
    assert decode_bench.main(["--dry-run", "--new-tokens", "3", "--fuse-sites"]) == 0
    out = capsys.readouterr().out
    assert "package routed" in out and "package static k=4" in out and "package sites routed" in out
    argv = ["--dry-run", "--new-tokens", "3", "--fuse-inputs", "--package-policy", "adjacent"]
    argv += ["--package-placement", "sublayer", "--package-budgets", "4.5", "--package-span", "--package-pdl"]
    more = ["--package-span-uncap", "--package-early-l2", "--package-fragment-loads", "--package-router-l2"]
    assert decode_bench.main([*argv, "--package-no-span", "--package-fused-only", "--package-span-rules", *more]) == 0
    out = capsys.readouterr().out
    assert "package sites+inputs span rule before routed budget 4.5" in out
    assert "package sites+inputs spans to 5 planes routed budget 4.5" in out
    assert "package sites+inputs span uncap routed budget 4.5" in out
    assert "package sites+inputs no early l2 routed budget 4.5" in out
    assert "package sites+inputs early l2 2 routed budget 4.5" in out
    assert "package sites+inputs early l2 pdl routed budget 4.5" in out
    assert "package sites+inputs router early l2 routed budget 4.5" in out
    for name in ("frag everywhere", "ahead 2", "ahead 4", "prefetch 0", "prefetch 0 ahead 2"):
        assert f"package sites+inputs {name} routed budget 4.5" in out and f"{name} static k=4" in out
    assert "package sites+inputs no span routed budget 4.5" in out and "no span static" not in out
    assert "package routed" not in out and "package static" not in out  # no per-linear rows
    assert decode_bench.main(argv) == 0
    out = capsys.readouterr().out
    assert "package sites+inputs routed budget 4.5" in out and "routed budget 5" not in out
    # the span entry: its routed budgets only, no static views
    assert "package sites+inputs span routed budget 4.5" in out and "span static" not in out
    # programmatic dependent launch: fused inputs, and with the span
    assert "package sites+inputs pdl routed budget 4.5" in out and "sites+inputs pdl static k=2" in out
    assert "package sites+inputs span pdl routed budget 4.5" in out
    lean = ["--dry-run", "--new-tokens", "3", "--fuse-inputs", "--package-policy", "adjacent", "--package-budgets"]
    lean += ["3.5", "--package-lean-step", "--package-lean-prologues", "--package-fused-only", "--package-pdl"]
    extra = ["--package-epilogues", "--package-epilogue-kinds", "--package-pdl-static", "--package-routed-epilogues"]
    extra += ["--package-fragment-programs", "896", "--package-pdl-views", "--package-router-tail"]
    extra += ["--package-router-tail-normed"]
    assert decode_bench.main([*lean, *extra]) == 0
    out = capsys.readouterr().out
    modes = ("lean step", "lean prologues", "lean step pdl", "lean prologues pdl", "lean epilogues")
    modes += ("lean epilogues rms_norm", "lean epilogues silu_mul", "lean step pdl static", "lean prologues pdl static")
    modes += ("lean prologues pdl off", "lean routed epilogues off", "lean routed pdl off", "lean routed savings off")
    modes += ("lean pdl", "lean programs 896", "lean prologues pdl views", "lean router tail")
    modes += ("lean router tail normed",)
    for mode in modes:
        assert f"package sites+inputs {mode} static k=2" in out and f"sites+inputs {mode} routed budget 3.5" in out


def test_package_rounds_keep_each_rows_fastest(capsys):
    """``--package-rounds 2`` (dry run): every quantized package row is timed in both rounds, the configs in turn, the
    table keeps one row each (its fastest); fewer than one round is refused."""
    argv = ["--dry-run", "--new-tokens", "3", "--fuse-inputs", "--package-policy", "adjacent", "--package-budgets"]
    argv += [
        "3.5",
        "--package-lean-prologues",
        "--package-router-tail",
        "--package-fused-only",
        "--package-rounds",
        "2",
    ]
    assert decode_bench.main(argv) == 0
    out = capsys.readouterr().out
    for mode in ("lean prologues", "lean router tail"):
        for r in (1, 2):
            assert f"[round {r}/2] package sites+inputs {mode} routed budget 3.5" in out, (mode, r)
    assert "2 rounds: each quantized row below the fastest of its rounds" in out
    table = [ln for ln in out.splitlines() if ln.startswith("package sites+inputs lean router tail routed")]
    assert len(table) == 1, table
    with pytest.raises(SystemExit):
        decode_bench.main(["--dry-run", "--package-rounds", "0"])
    assert "--package-rounds must be at least 1, got 0" in capsys.readouterr().err


def test_e2e_plan_gives_every_linear_its_own_threshold():
    """Without a checkpoint, e2e_decode installs a plan of the routers' own thresholds (the decode path of a
    deployed checkpoint: a threshold tensor per linear), which decides as the routers do."""
    import mobiquant as mq
    from mobiquant.tiny import tiny_llama

    q, _ = tiny_llama(dtype="float32")
    mq.quantize_model(q, mq.MoBiConfig(slice_bits=(2, 2, 2, 2), group_size=32))
    ids = torch.randint(0, q.config.vocab_size, (2, 32), generator=torch.Generator().manual_seed(0))
    mq.calibrate_thresholds(q, [ids])
    mq.freeze(q)
    e2e_decode.install_router_plan(q)
    mq.set_budget(q, 6.0)
    lins = [m for _, m in mq.patching.mobi_linears(q)]
    assert all(m.route_tau is not None for m in lins)
    assert all(m.route_tau == pytest.approx(float(m.router.tau)) for m in lins)


def test_layout_option_and_bits_config(monkeypatch, capsys):
    """--slices sets the benchmarked layout (views of sum(slices[:k]) bits); --bits-config parses into the one-bit
    plane kernel's SmallConfig; the closing comparison pairs each default row with its one-bit plane row."""
    import kernel_bench as kb
    from mobiquant.kernels import triton_bitplane as tb

    monkeypatch.setattr(kb, "SLICE_BITS", kb.SLICE_BITS)
    kb.set_slices("3,1,1,1,1,1".split(","))
    assert [kb.view_bits(k) for k in range(1, 7)] == [3, 4, 5, 6, 7, 8]
    cfg = kb.parse_bits_config(tb, "256,64,,2")
    assert cfg.bitplanes and (cfg.block_n, cfg.block_k, cfg.num_warps, cfg.waves) == (256, 64, 4, 2)
    assert not cfg.pdl and cfg.whole_k is None and kb.bits_tag(cfg) == "256/64/4w/2"
    cfg = kb.parse_bits_config(tb, ",,8,,0,,1,,1")  # whole-K by the library's rule, programmatic dependent launch
    assert cfg.pdl and cfg.whole_k is None and cfg.num_warps == 8 and kb.bits_tag(cfg) == "None/None/8w/None/pdl"
    cfg = kb.parse_bits_config(tb, "128,64,4,4,0,,0,3")
    assert cfg.whole_k is False and cfg.stages == 3 and not cfg.pdl and not cfg.l2_prefetch
    cfg = kb.parse_bits_config(tb, "128,64,4,4,0,,0,,1,1")
    assert cfg.pdl and cfg.l2_prefetch and kb.bits_tag(cfg) == "128/64/4w/4/streamk/pdl/l2pf"
    assert kb.bits_tag(dataclasses.replace(cfg, pdl="static")) == "128/64/4w/4/streamk/pdl-static/l2pf"
    cfg = kb.parse_bits_config(tb, "128,64,4,4,0,,0,,,,2")
    assert cfg.ahead == 2 and not cfg.l2_prefetch and kb.bits_tag(cfg) == "128/64/4w/4/streamk/ah2"
    cfg = kb.parse_bits_config(tb, ",,4,,0,,1,,,,,1")
    assert cfg.reduce_launch and cfg.whole_k is None and kb.bits_tag(cfg) == "None/None/4w/None/red"
    assert cfg.fragment is None  # the library's rule
    frag = [kb.parse_bits_config(tb, f",,4,,0,,1,,0,0,0,1,{f}") for f in (0, 1, 2)]
    assert [c.fragment for c in frag] == [False, True, None] and kb.bits_tag(frag[1]).endswith("/red/frag")
    assert frag[2].fragment_device_from == 1 << 25 and kb.bits_tag(frag[2]).endswith("/red/fragdev")
    small = kb.parse_bits_config(tb, ",,4,,0,,1,,0,0,0,1,3")  # 3-4 planes in every launch: the default since
    assert small.fragment_static_from == 0 and small.fragment_device_from is None  # 2026-12-06
    assert kb.bits_tag(small).endswith("/red") and frag[2].fragment_static_from == 0
    large = kb.parse_bits_config(tb, ",,4,,0,,1,,0,0,0,1,4")  # ... only in launches of 2^25 weights: the rule before
    assert large.fragment_static_from == 1 << 25 and kb.bits_tag(large).endswith("/red/fragfrom33554432")
    cap = kb.parse_bits_config(tb, ",,4,,0,,1,,0,0,0,1,,7")
    assert cap.fragment is None and cap.fragment_cap == 7 and kb.bits_tag(cap).endswith("/red/cap7")
    assert kb.parse_bits_config(tb, ",,4,,0,,1,,0,0,0,1").fragment_cap == 5  # empty: the library's default
    assert kb.bits_tag(kb.parse_bits_config(tb, ",,4,,0,,1,,0,0,0,1,,0")).endswith("/red/cap0")
    tma = kb.parse_bits_config(tb, ",,4,,0,,1,,0,0,0,1,,,-2")  # the fragment kernel's static views by TMA
    assert tma.fragment_tma == -2 and tma.fragment_cap == 5 and kb.bits_tag(tma).endswith("/red/tma2")
    assert kb.parse_bits_config(tb, ",,4,,0,,1,,0,0,0,1").fragment_tma == 0
    i4 = kb.parse_bits_config(tb, ",,4,,0,,1,,0,0,0,1,,,,8")  # up to 8 tokens through torch's int4 matmul
    assert i4.int4_tokens == 8 and kb.bits_tag(i4).endswith("/int4x8")
    off = kb.parse_bits_config(tb, ",,4,,0,,1,,0,0,0,1,,,,0")  # never
    assert off.int4_tokens == 0 and kb.bits_tag(off).endswith("/int4x0")
    lib = kb.parse_bits_config(tb, ",,4,,0,,1,,0,0,0,1")  # empty: the library's default, untagged
    assert lib.int4_tokens == tb.SmallConfig().int4_tokens == 16 and kb.bits_tag(lib).endswith("/red")
    rows = [
        dict(mode="static k=2", budget=4.0, achieved_bits=4.0, us_per_token=200.0, speedup=2.0),
        dict(mode="bitpl k=2", budget=4.0, achieved_bits=4.0, us_per_token=100.0, speedup=4.0),
        dict(mode="routed", budget=4.0, achieved_bits=4.1, us_per_token=float("nan"), speedup=float("nan")),
    ]
    decode_bench.print_comparison(rows, 400.0)
    out = capsys.readouterr().out
    assert "100.0 ( 4.00x)" in out and "routed 4" in out and "one-bit planes" in out
    decode_bench.print_comparison(rows, 400.0, ",,4,,0,,1,,0,0,0,1,,,-2")  # a named config heads its own column
    out = capsys.readouterr().out
    assert "--bits-config ,,4,,0,,1,,0,0,0,1,,,-2" in out and "one-bit planes" not in out


def test_q_step_routes_static_runs_routers_or_takes_device_k():
    """``q_step``'s modes for ``--routed-parts``: a static view with the routers launched gets the static ``k`` at
    every linear and runs every router once; a device ``k`` reaches the linears as that tensor, no router runs; the
    routed step takes each site's ``k`` from its router."""
    calls = []

    class Lin:
        def __init__(self, name):
            self.name = name

        def __call__(self, x, k):
            calls.append((self.name, k))
            return x

    class Rout:
        def __init__(self, name, k):
            self.name, self.k = name, k

        def __call__(self, x):
            calls.append(("r_" + self.name, None))
            return self.k

    layer = {n: Lin(n) for n in ("q", "k", "v", "o", "gate", "up", "down")}
    layer.update({"r_" + n: Rout(n, k) for n, k in (("qkv", 3), ("o", 4), ("gu", 5), ("down", 6))})
    h = torch.ones(1, 4)
    decode_bench.q_step([layer], h, static_k=2, run_routers=True)
    assert sorted(c[0] for c in calls if c[0].startswith("r_")) == ["r_down", "r_gu", "r_o", "r_qkv"]
    assert all(k == 2 for n, k in calls if not n.startswith("r_"))
    calls.clear()
    k_dev = torch.full((1,), 2, dtype=torch.int64)
    decode_bench.q_step([layer], h, static_k=k_dev)
    assert len(calls) == 7 and all(k is k_dev for _, k in calls)
    calls.clear()
    decode_bench.q_step([layer], h)
    got = {n: k for n, k in calls if not n.startswith("r_")}
    assert got == {"q": 3, "k": 3, "v": 3, "o": 4, "gate": 5, "up": 5, "down": 6}


def _compiled_offline(script: str, args: list[str]) -> str:
    """Runs ``benchmarks/<script>`` (an offline sm_90 compile with Triton's bundled tools; TRITON_INTERPRET unset, in
    a process of its own) and returns its output; skips where this triton ships no cuobjdump."""
    import os
    import subprocess

    import triton

    if not (Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump").exists():
        pytest.skip("this triton has no bundled CUDA tools")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    path = BENCH / script
    run = subprocess.run([sys.executable, str(path), *args], capture_output=True, text=True, env=env, timeout=600)
    assert run.returncode == 0, run.stderr[-2000:]
    return run.stdout


@pytest.mark.parametrize(
    "args",
    [["--k", "2"], ["--device-k"], ["--routed", "--site", "3"], ["--routed", "--site", "3", "--router-in-launch"]],
    ids=" ".join,
)
def test_one_bit_plane_kernel_compiles_for_sm90(args):
    """The one-bit plane kernel's launches (a static view, k read on the device, k counted from gate values for
    three layers in one launch) compile for sm_90 with Triton's bundled ptxas, without a GPU: a kernel that only the
    interpreter has run cannot reach a GPU broken. No spill (stack 0)."""
    out = _compiled_offline("offline_sass.py", args)
    assert "_bp_gemv_bits_kernel" in out and "stack 0 B" in out, out


@pytest.mark.parametrize("args", [["--tokens", "6", "--device-k"], ["--tokens", "16", "--k", "3"]], ids=" ".join)
def test_small_batch_kernel_compiles_for_sm90(args):
    """The small-batch kernel (2-16 tokens) on the default layout compiles for sm_90 without a GPU: its 3-bit base
    plane gathers one word a column, and the power-of-two branch after it (a ``tl.arange`` of 6 words there) must not
    be built; the interpreter never builds it and took this kernel to a GPU broken once (2026-12-05)."""
    shape = ["--slices", "3,1,1,1,1,1", "--n", "576", "--in-features", "576"]
    out = _compiled_offline("offline_sass.py", [*shape, *args])
    assert "_bp_small_kernel" in out and "HMMA" in out, out


@pytest.mark.parametrize("source", ["planes", "bits"])
def test_dequantize_passes_compile_for_sm90(source):
    """Both dequantize passes of a prompt's forward compile for sm_90 without a GPU, at the widest view of the
    default layout (the interpreter builds no kernel, so it cannot catch a kernel that does not compile)."""
    out = _compiled_offline("offline_sass.py", ["--dequant", source, "--k", "6", "--n", "576", "--in-features", "1536"])
    assert "dequant_kernel" in out and "stack 0 B" in out and "no loop" in out, out


@pytest.mark.parametrize(
    "prologue,tiling,pdl",
    [
        ("none", "1,4,0", False),
        ("rms_norm", "16,4,256", True),
        ("silu_mul", "4,8,128", False),
        ("silu_mul", "64,8,0", True),
    ],
    ids=["whole-rows", "splits-norm-pdl", "splits-product", "one-program-product-pdl"],
)
def test_router_kernel_compiles_for_sm90(prologue, tiling, pdl):
    """The fused router kernel's launches (whole rows, column splits with each prologue, and one program holding
    every hidden unit) compile for sm_90
    without a GPU, without spills: the interpreter accepts code (an early return of another shape in a constexpr
    branch) that the compiler rejects."""
    args = ["--router", prologue, "--router-tiling", tiling, "--in-features", "4096", *(["--pdl"] if pdl else [])]
    out = _compiled_offline("offline_sass.py", args)
    assert "_router_kernel" in out and "stack 0 B" in out, out


def test_mma_proto_compiles_for_sm90():
    """``mma_proto.py`` (a tensor-core decode counted offline, benchmarks/NOTES.md entry 19) compiles for sm_90 and
    reports its loop's instructions a code."""
    out = _compiled_offline(
        "mma_proto.py", ["--block-n", "64", "--word-cols", "4", "--n", "256", "--in-features", "512"]
    )
    assert "per code" in out and "LOP3" in out, out


def test_fragment_kernel_instruction_estimate_offline():
    """``offline_sass.py --fragment`` compiles the fragment kernel's static 4-bit view for sm_90 without a GPU and
    estimates what its loop's instructions cost against the layer's bytes at copy bandwidth (a share below one: on
    the 8B gate/up shapes the loop issues for about a third of the copy time, benchmarks/NOTES.md entry 43)."""
    out = _compiled_offline("offline_sass.py", ["--fragment", "4", "--k", "2", "--n", "1024", "--in-features", "4096"])
    assert "frag_gemv_kernel 4 planes" in out and "stack 0 B" in out and "HMMA" in out, out
    share = re.search(r"issue ([0-9.]+) us against ([0-9.]+) us of copy", out)
    assert share is not None and 0 < float(share.group(1)) < float(share.group(2)), out


def test_gluon_proto_pack_and_decode_give_the_codes():
    """``gluon_proto.py``'s fragment-native pack, decoded by the kernel's own bit operations (emulated on int64):
    every code comes out as ``1024 + C 2^s`` at its logical column, and with ``prepare_x``'s activations and offsets a
    group's product minus the offset is ``sum C x``."""
    pytest.importorskip("triton.experimental.gluon", reason="this triton has no Gluon")
    import gluon_proto as gp

    gen = torch.Generator().manual_seed(0)
    n, k = 128, 1024
    codes = torch.randint(0, 16, (n, k), generator=gen)
    assert sorted(gp.word_slots().flatten().tolist()) == list(range(512))  # every word of a block once
    assert sorted(gp.b_slots().flatten().tolist()) == list(range(1024))
    a = gp.decode_reference(gp.pack_fragment(codes))
    s = torch.tensor([gp.field_shift(j) for j in range(16)])
    col_s = torch.empty(128, dtype=torch.long)
    col_s[gp.logical_columns().flatten()] = s[:, None, None].expand(16, 4, 2).flatten()
    assert torch.equal(a, 1024 + codes.double() * torch.pow(2.0, col_s.repeat(k // 128).double()))
    x = torch.randn(k, generator=gen).half()
    xb, off, xs = gp.prepare_x(x)
    xcol = gp.unpack_x(xb).double()  # group g's x' (column g % 8 of its B), in logical order
    assert int((xb != 0).sum()) == int((xcol != 0).sum())  # the other columns are zeros
    got = (a.reshape(n, -1, 128) * xcol).sum(-1) - off.double()
    ref = (codes.double().reshape(n, -1, 128) * x.double().reshape(-1, 128)).sum(-1)
    torch.testing.assert_close(got, ref, rtol=0, atol=1e-3)
    torch.testing.assert_close(xs.double(), x.double().reshape(-1, 128).sum(1))
    with pytest.raises(ValueError, match="4-bit"):
        gp.pack_fragment(codes[:, :100])
    with pytest.raises(ValueError, match="3-bit"):
        gp.pack_fragment(codes, 3)  # codes up to 15 do not fit 3 planes
    with pytest.raises(ValueError, match="multiple of 1024"):
        gp.prepare_x(x[:256])


@pytest.mark.parametrize("planes", [1, 2, 3, 5, 8])
def test_gluon_proto_fields_give_each_view_its_code(planes):
    """An 8-plane fragment pack read as the view of its first ``planes`` planes: each field's decode (planes 0-3 and
    4-7, absent planes zero) weighted by ``field_planes`` sums to the view's code, the top ``planes`` bits."""
    pytest.importorskip("triton.experimental.gluon", reason="this triton has no Gluon")
    import gluon_proto as gp

    gen = torch.Generator().manual_seed(planes)
    codes = torch.randint(0, 256, (128, 256), generator=gen)
    words = gp.pack_fragment(codes, 8)
    s = torch.tensor([gp.field_shift(j) for j in range(16)])
    col_s = torch.empty(128, dtype=torch.long)
    col_s[gp.logical_columns().flatten()] = s[:, None, None].expand(16, 4, 2).flatten()
    pw = torch.pow(2.0, col_s.repeat(2).double())
    got = sum(wt * (gp.decode_reference(words, e0, nf) - 1024) / pw for e0, nf, wt in gp.field_planes(planes))
    assert torch.equal(got, (codes >> (8 - planes)).double())
    # the view read on the device: whole fields decoded, the absent planes' loads predicated off (zeros)
    absent = words.clone()
    absent[planes:] = 0
    for e0, nf, _ in gp.field_planes(planes):
        assert torch.equal(gp.decode_reference(absent, e0, 4), gp.decode_reference(words, e0, nf))


def test_gluon_proto_kernel_emulated_gives_w_x():
    """``gluon_proto.py``'s kernel, its logical operations emulated line by line in PyTorch (the words' and B's
    renaming from their 16-byte loads, the joins and permute into the A operand, eight groups an accumulator, the
    scale and zero point): ``W x`` to float64 rounding of the fp16 activations, over two 8-group batches, for views
    of 3, 4 and 6 planes of one 8-plane pack (one field, one field with a plane absent, two fields)."""
    pytest.importorskip("triton.experimental.gluon", reason="this triton has no Gluon")
    import gluon_proto as gp

    gen = torch.Generator().manual_seed(3)
    n, k = 128, 2048
    codes, _, _ = gp._random_layer(n, k, gen, 8)
    x = torch.randn(k, generator=gen).half()
    words = gp.pack_fragment(codes, 8)
    for planes in (3, 4, 6):  # views of one 8-plane pack, each its own step and zero point
        _, scale, zero = gp._random_layer(n, k, gen, planes)
        y = gp.emulate_kernel(words, scale, zero, x, planes=planes)
        c = (codes >> (8 - planes)).double().reshape(n, -1, 128)
        ref = ((c - zero.double()[:, :, None]) * scale.double()[:, :, None]).reshape(n, k) @ x.double()
        assert float((y - ref).abs().max() / ref.abs().max()) < 1e-5, planes


@pytest.mark.parametrize(
    ("planes", "splits", "more"),
    [
        (4, 1, []),
        (6, 2, []),
        (0, 1, []),
        (4, 1, ["--package", "--prefetch"]),
        (0, 2, ["--package", "--dispatch", "3"]),
        (0, 1, ["--package", "--dispatch", "3", "--routed"]),
        (3, 2, ["--package", "--stages", "-1"]),
    ],
    ids=["4", "6_split", "device", "package_4", "package_dispatch_split", "package_routed", "package_tma"],
)
def test_gluon_proto_compiles_for_sm90(planes, splits, more):
    """``gluon_proto.py``'s kernel compiles for sm_90 offline (its A operand needs no data movement:
    ``convert_layout(assert_trivial=True)``), no spill inside its group loop, and reports the loop's instructions a
    code; with K splits (the atomic-add epilogue), the view read on the device (``--planes 0``) and as the package
    launches it (``mobiquant.kernels.gluon_fragment``: fp16 output and bias, a body per device view; a program's
    words by one TMA load, ``--stages -1``) too."""
    import os
    import subprocess

    import triton

    pytest.importorskip("triton.experimental.gluon", reason="this triton has no Gluon")
    if not (Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump").exists():
        pytest.skip("this triton has no bundled CUDA tools")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    script = Path(__file__).resolve().parent.parent / "benchmarks" / "gluon_proto.py"
    args = ["--n", "256", "--in-features", "2048", "--splits", str(splits), "--planes", str(planes), *more]
    run = subprocess.run([sys.executable, str(script), *args], capture_output=True, text=True, env=env, timeout=600)
    assert run.returncode == 0, run.stderr[-2000:]
    loops = [line for line in run.stdout.splitlines() if "per code" in line]
    assert any("HMMA" in line for line in loops), run.stdout  # the group loops (the ticket's sum has none)
    assert not any(op in line for line in loops for op in ("LDL", "STL")), run.stdout  # no spill inside the loop


def test_stream_pattern_kernels_on_cpu():
    """``stream_pattern.py``'s kernels in Triton's interpreter: each load pattern (word-column-major and tiled) and
    the flat stream read every word exactly once (their XOR is the buffer's), and the prototype GEMV matches the
    package's one-bit plane kernel: bit for bit with the package's store, to fp16 rounding with atomics, TMA or the
    activations prepared per token."""
    import numpy as np

    import stream_pattern as sp
    from mobiquant.kernels import triton_bitplane as tb

    gen = torch.Generator().manual_seed(0)
    n, k_in, bits = 256, 512, (3, 1, 1, 1, 1, 1)
    words = torch.randint(-(2**31), 2**31 - 1, (sum(bits), k_in // 16, n // 2), dtype=torch.int32, generator=gen)
    everything = np.bitwise_xor.reduce(words[:4].numpy().reshape(-1))
    sink = torch.zeros(1 << 14, dtype=torch.int32)
    for tiled in (0, 1):
        sink.zero_()
        sp._pattern[(6,)](words, sink, words.stride(0), n // 2, k_in // 16, 4, 8, 6, P=4, BN2=64, NW=4, GW=8,
                          TILED=tiled)  # fmt: skip
        assert np.bitwise_xor.reduce(sink.numpy()) == everything, tiled
    sink.zero_()
    sp._flat[(4,)](words[:4], sink, words[:4].numel(), 4, BLOCK=256)
    assert np.bitwise_xor.reduce(sink.numpy()) == everything
    sz = torch.randint(0, 0x2C00, (2, k_in // 128, n // 2), dtype=torch.int32, generator=gen)
    bp = tb.BitPlanes(words, sz | (sz << 16), bits, 128, k_in, n)
    x = torch.randn(1, k_in, generator=gen).half()
    for k in (1, 6):
        ref = tb.bitplane_linear_bits(x, bp, k, config=tb.SmallConfig(bitplanes=True, whole_k=False))
        out, y = torch.empty(1, n).half(), torch.zeros(n)
        sp.proto_launch(sp._proto, x, y, bp, k, 16, 1, 0, 1, 3, 0, 4, 0, 0, out)
        assert torch.equal(out, ref), k
        for tma, xpre in ((0, None), (1, None), (0, sp.prepared_x(x, 128))):
            sp.proto_launch(sp._proto, x, y, bp, k, 64, 2, tma, 1, 3, xpre=xpre)
            assert torch.allclose(y, ref[0].float(), rtol=2e-3, atol=2e-3 * ref.abs().max().item()), (k, tma)


def test_static_share_counts_the_linears_a_threshold_fixes():
    """``static_share.share_rows`` on a tiny model with adjacent routers: at 3, 4 and 8 bits every routed linear's
    threshold lies between bands (decoded as that static view, its whole weight share), at 4.5 inside one (none)."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import mobiquant as mq
    import static_share
    from tiny_models import build_tiny_llama, mixed_view_model, token_batches

    model = build_tiny_llama(0)
    mq.quantize_model(model, mq.MoBiConfig(group_size=32, slice_bits=(3, 1, 1, 1, 1, 1), router_policy="adjacent"))
    mq.calibrate_thresholds(model, token_batches(4, batch=4, seqlen=32, seed=100))
    mq.freeze(model)
    rows = {r["budget"]: r for r in static_share.share_rows(model, [3.0, 4.0, 4.5, 8.0])}
    n = rows[3.0]["routed_linears"]
    assert n > 0 and all(
        rows[b]["static_by_threshold"] == n and rows[b]["weight_share"] == 1.0 for b in (3.0, 4.0, 8.0)
    )
    assert (rows[3.0]["views"], rows[4.0]["views"], rows[8.0]["views"]) == ("1", "2", "6")
    assert rows[4.5]["static_by_threshold"] == 0 and rows[4.5]["weight_share"] == 0.0
    assert rows[4.0]["routers_fixed"] == rows[4.0]["routers_launched"] == 0
    assert rows[4.5]["routers_fixed"] == 0 and rows[4.5]["routers_launched"] == rows[4.5]["routers"]
    with pytest.raises(ValueError, match="outside this model's range"):
        static_share.share_rows(model, [9.0])
    # one router's linears fixed at different views: routed, its router fixed (no launch), every other static
    mixed, named, router, _ = mixed_view_model(0)
    row = static_share.share_rows(mixed, [4.0])[0]
    routers = len({id(m.router) for _, m in named})
    members = sum(m.router is router for _, m in named)
    assert (row["routers"], row["routers_fixed"], row["routers_launched"]) == (routers, 1, 0)
    assert row["static_by_threshold"] == len(named) - members


def test_cpu_decode_dry_run(tmp_path):
    """``cpu_decode.py --dry-run``: the FP rows, then each budget and view on the int4 path and the dense one, in a
    table with each row against the bf16 and fp32 FP model."""
    import cpu_decode

    assert cpu_decode.main(["--dry-run", "--out", str(tmp_path)]) == 0
    df = pd.read_csv(tmp_path / "cpu_decode.csv")
    assert df["row"].tolist() == [
        "fp bf16",
        "fp fp32",
        "budget 3 [int4]",
        "budget 3 [dense]",
        "budget 4 [int4]",
        "budget 4 [dense]",
        "static 3 bits (k=1) [int4]",
        "static 3 bits (k=1) [dense]",
    ]
    assert df["x_bf16"].iloc[0] == 1.0 and df["x_fp32"].iloc[1] == 1.0 and (df["us_per_token"] > 0).all()
    with pytest.raises(SystemExit):
        cpu_decode.main(["--dry-run", "--budgets", "x"])


@pytest.mark.slow
def test_cpu_decode_dry_run_compiled(tmp_path):
    """``cpu_decode.py --modes off,compile``: every row eager, then with the compiled step, each against the FP bf16
    model decoded the same way too; an unknown mode is refused."""
    import cpu_decode

    argv = ["--dry-run", "--no-dense", "--modes", "off,compile", "--budgets", "3", "--out", str(tmp_path)]
    assert cpu_decode.main(argv) == 0
    df = pd.read_csv(tmp_path / "cpu_decode.csv")
    rows = ["fp bf16", "fp fp32", "budget 3 [int4]", "static 3 bits (k=1) [int4]"]
    assert df["row"].tolist() == rows + [r + " compiled" for r in rows]
    assert df["mode"].tolist() == ["off"] * 4 + ["compile"] * 4
    assert df["x_bf16_same_mode"].iloc[0] == 1.0 and df["x_bf16_same_mode"].iloc[4] == 1.0
    with pytest.raises(SystemExit):
        cpu_decode.main(["--dry-run", "--modes", "graph"])


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU these run the whole benchmark")
@pytest.mark.parametrize("script", ["int4mm_bench", "dequant_bench"])
def test_gpu_benchmarks_say_they_need_a_gpu(script, capsys):
    import importlib

    with pytest.raises(SystemExit) as exit_:
        importlib.import_module(script).main([])
    assert exit_.value.code == 2
    assert f"{script}: needs a CUDA GPU" in capsys.readouterr().err


def test_site_stack_computes_the_per_linear_stack(monkeypatch, capsys):
    """``decode_bench.py --sites`` on a small stack on the CPU (Triton's interpreter): the site launches with the
    residual in the o and down launches give the per-linear stack's outputs at static views, with every prefetch plan
    (requests only: nothing changes) and at a routed budget, the router inside the launches too; the site table
    prints each row beside its per-linear one."""
    db = decode_bench
    monkeypatch.setattr(db, "DEVICE", "cpu")
    monkeypatch.setattr(db, "D", 256)
    monkeypatch.setattr(db, "FF", 384)
    monkeypatch.setattr(db, "KV", 128)
    monkeypatch.setattr(db.kb, "SLICE_BITS", (3, 1, 1, 1, 1, 1))
    monkeypatch.setattr(db.Router, "fused", staticmethod(db.load_router_kernel()))
    tb = db.load_kernels()
    gen = torch.Generator().manual_seed(0)
    layer = {n: db.QLinear(o, i, tb, gen) for n, (o, i) in db.layer_shapes().items()}
    for r, d in (("qkv", 256), ("o", 256), ("gu", 256), ("down", 384)):
        layer["r_" + r] = db.Router(d, gen)
    layers = [layer]
    db.q_sites(tb, layers)
    x = torch.randn(1, 256, generator=gen).half()

    def close(a, b):
        return float((a.float() - b.float()).norm() / a.float().norm()) < 5e-3  # one fp16 rounding apart

    with torch.no_grad():
        for k in (1, 2):
            site = db.q_step_sites(tb, layers, x, static_k=k)
            assert close(db.q_step(layers, x, static_k=k), site), k
            for plan in db.PREFETCH_PLANS:
                assert torch.equal(db.q_step_sites(tb, layers, x, static_k=k, prefetch=("bulk", plan)), site)
        db.q_step(layers, torch.randn(32, 256, generator=gen).half(), collect=True)
        for r in ("qkv", "o", "gu", "down"):
            layer["r_" + r].set_budget(4)
        routed = db.q_step_sites(tb, layers, x)
        assert close(db.q_step(layers, x), routed)
        assert torch.equal(db.q_step_sites(tb, layers, x, in_launch=True), routed)
        sub = db.q_step_sites(tb, layers, x, sublayer=True)  # o and down on the q/k/v and gate/up routers' k
        own = {r: layer["r_" + r] for r in ("qkv", "o", "gu", "down")}
        seen: dict = {}
        layer["r_qkv"] = lambda inp: seen.setdefault("q", own["qkv"](inp))
        layer["r_gu"] = lambda inp: seen.setdefault("g", own["gu"](inp))
        layer["r_o"], layer["r_down"] = (lambda inp: seen["q"]), (lambda inp: seen["g"])
        try:
            assert torch.equal(db.q_step_sites(tb, layers, x), sub)
        finally:
            layer.update({"r_" + r: v for r, v in own.items()})
    with pytest.raises(ValueError, match="static view's buffers"):
        db.q_step_sites(tb, layers, x, prefetch=("line", "o"))
    rows = [
        dict(mode="static k=2", budget=4.0, achieved_bits=4.0, us_per_token=300.0),
        dict(mode="sites k=2", budget=4.0, achieved_bits=4.0, us_per_token=250.0),
        dict(mode="routed", budget=4.0, achieved_bits=3.9, us_per_token=500.0),
        dict(mode="routed sites+router", budget=4.0, achieved_bits=3.9, us_per_token=400.0),
        dict(mode="routed sites sublayer", budget=4.0, achieved_bits=3.8, us_per_token=375.0),
        dict(mode="sites pf bulk o k=2", budget=4.0, achieved_bits=4.0, us_per_token=200.0),
    ]
    capsys.readouterr()
    db.print_sites(rows, 750.0, 700.0)
    out = capsys.readouterr().out.splitlines()
    static = next(line for line in out if line.startswith("static k=2"))
    assert "300.0 ( 2.50x /  2.33x)" in static and "250.0 ( 3.00x /  2.80x)" in static
    assert any(line.startswith("routed 4 +router") and "500.0" in line and "400.0" in line for line in out)
    assert any(line.startswith("routed 4 sublayer") and " 3.80 " in line and "375.0 ( 2.00x" in line for line in out)
    assert any(line.startswith("sites pf bulk o k=2") and "( 1.25x /  3.75x)" in line for line in out)


def test_fragment_programs_argument_is_checked():
    """``--package-fragment-programs``: counts by commas; a count that is not positive is refused with the reason."""
    assert decode_bench._programs("") == [] and decode_bench._programs("896,1792") == [896, 1792]
    with pytest.raises(SystemExit, match="positive numbers of programs by commas, got '0'"):
        decode_bench._programs("0")


def test_step_overhead_kernels_argument_is_checked():
    """``step_overhead.py --kernels``: each entry a SmallConfig of ``field=value`` pairs (values as YAML reads them,
    '' the defaults); an unknown field, a pair without ``=`` or a value the config refuses stops it before any GPU
    work, saying what was wrong."""
    import step_overhead
    from mobiquant.kernels.triton_bitplane import SmallConfig

    assert step_overhead._small_config("") is None
    assert step_overhead._small_config("router_tail=true, fragment_cap=7") == SmallConfig(
        router_tail=True, fragment_cap=7
    )
    assert step_overhead._small_config("pdl=static").pdl == "static"
    for text, why in (("bogus=1", r"no SmallConfig field \['bogus'\]; fields: \["), ("pdl", "FIELD=VALUE pairs"),
                      ("pdl=maybe", "pdl must be None")):  # fmt: skip
        with pytest.raises(SystemExit, match=why):
            step_overhead._small_config(text)
    with pytest.raises(SystemExit, match="--lean-prologues needs --lean-step"):
        step_overhead.main(["--lean-prologues"])


@pytest.mark.slow
def test_pick_benchmarks_dry_run(monkeypatch, capsys):
    """``pick_ab.py`` (dry run) times every row with the greedy pick inside and outside the captured step and leaves
    it inside; ``decode_bench.py --pick-outside`` turns it off for its run."""
    import pick_ab
    from mobiquant.tasks import decode

    monkeypatch.setattr(decode, "PICK_IN_GRAPH", True)  # put back after the test, whatever the runs set
    assert pick_ab.main(["--dry-run", "--rounds", "1", "--new-tokens", "3", "--budgets", "4.5"]) == 0
    out = capsys.readouterr().out
    for row in ("fp16, own step", "static k=2", "routed 4.5"):
        assert re.search(rf"\| {re.escape(row)} \| [\d.]+ \| [\d.]+ \|", out), row
        assert out.count(f"{row:<16} pick") == 2, row  # inside and outside
    assert decode.PICK_IN_GRAPH
    assert decode_bench.main(["--dry-run", "--new-tokens", "2", "--pick-outside"]) == 0
    assert not decode.PICK_IN_GRAPH
    with pytest.raises(SystemExit):
        pick_ab.main(["--rounds", "0", "--dry-run"])

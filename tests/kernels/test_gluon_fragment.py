"""The fragment-native Gluon GEMV in the package (``mobiquant.kernels.gluon_fragment``, ``SmallConfig(fragment=True)``).

On the CPU: the pack built from the one-bit plane buffers is the pack of the checkpoint's codes, its step and zero
point sit at each view's plane count, the B operand the kernel loads from the token is ``prepare_x``'s, and the
kernel's logical operations (``benchmarks/gluon_proto.py``'s line-by-line emulation) with the constants the launch
passes reproduce the package's ``torch_reference`` at every view. On a GPU (skipped without one): the kernel itself
through ``bitplane_linear`` against the float64 reference, static views, views read on the device, routed ones and
a site launch. Gluon has no CPU interpreter, hence the emulation.
"""

from __future__ import annotations

import dataclasses
import os
import sys
from pathlib import Path

import pytest
import torch

from mobiquant.kernels import torch_reference
from mobiquant.quant.packing import pack_codes

pytest.importorskip("triton.experimental.gluon", reason="this triton has no Gluon")
from mobiquant.kernels import gluon_fragment as gf  # noqa: E402
from mobiquant.kernels import triton_bitplane as tb  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
import gluon_proto as gp  # noqa: E402

GPU = torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET", "0") in ("", "0")
DEVICE = "cuda" if GPU else "cpu"
SLICES = (3, 1, 1, 1, 1, 1)


@pytest.fixture
def gen():
    seed = int(os.environ.get("MOBIQUANT_TEST_SEED") or int.from_bytes(os.urandom(4), "little"))
    print(f"seed={seed}")
    return torch.Generator().manual_seed(seed)


def make_layer(n_out, n_in, gen, per_view=True, device="cpu"):
    """Planes of the default layout, a step and zero point per view (or one pair), fp16."""
    planes = [pack_codes(torch.randint(0, 2**b, (n_out, n_in), generator=gen), b).to(device) for b in SLICES]
    ng = n_in // 128
    lead = (len(SLICES),) if per_view else ()
    scale = (torch.rand(*lead, n_out, ng, generator=gen) * 0.02 + 0.002).half().to(device)
    zero = (torch.randint(0, 8 * 2 ** SLICES[0], (*lead, n_out, ng), generator=gen) / 8 - 0.375).half().to(device)
    return planes, scale, zero


def full_codes(planes, n_in):
    """The 8-bit code of every weight: each slice's codes, most significant slice first."""
    from mobiquant.kernels import _codes

    c = torch.zeros(planes[0].shape[0], n_in, dtype=torch.int64)
    for p, b in zip(planes, SLICES, strict=True):
        c = (c << b) + _codes(p.cpu(), b, n_in)
    return c


@pytest.mark.parametrize("per_view", [True, False], ids=["per_view", "shared"])
def test_fragment_of_packs_the_checkpoint_codes(per_view, gen):
    n_out, n_in = 200, 1024  # rows padded to 256
    planes, scale, zero = make_layer(n_out, n_in, gen, per_view)
    bp = tb.pack_bitplanes(planes, scale, zero, SLICES, 128, n_in)
    fp = gf.fragment_of(bp)
    assert fp is gf.fragment_of(bp)  # cached while the buffers live
    codes = torch.nn.functional.pad(full_codes(planes, n_in), (0, 0, 0, 256 - n_out))
    assert torch.equal(fp.words, gf.pack_fragment(codes, 8))
    assert fp.scale.shape == (8, 256, n_in // 128)
    for k, p in enumerate(fp.planes_of_view, start=1):
        want_s = scale[k - 1] if per_view else scale
        want_z = zero[k - 1] if per_view else zero
        assert torch.equal(fp.scale[p - 1, :n_out], want_s) and torch.equal(fp.zero[p - 1, :n_out], want_z)
    assert not fp.scale[:2].any()  # no view ends at 1 or 2 planes
    with pytest.raises(ValueError, match="groups of 128"):
        gf.fragment_of(tb.pack_bitplanes(planes, scale[..., :4], zero[..., :4], SLICES, 256, n_in))


@pytest.mark.parametrize("k", [1, 2, 4, 6])
def test_kernel_with_the_launch_constants_is_the_package_view(k, gen):
    """The emulated kernel (fields, accumulators, epilogue) with ``scale mult`` and ``zero zm + hk`` as
    ``_launch_args`` passes them for view ``k`` equals ``torch_reference`` (float64) of the same layer."""
    n_out, n_in = 128, 2048
    planes, scale, zero = make_layer(n_out, n_in, gen)
    fp = gf.fragment_of(tb.pack_bitplanes(planes, scale, zero, SLICES, 128, n_in))
    x = torch.randn(1, n_in, generator=gen).half()
    p = fp.planes_of_view[k - 1]
    sc, zp = fp.scale[p - 1], fp.zero[p - 1]
    out = torch.empty(n_out)
    _, kw = gf._launch_args(fp.words, sc, zp, x[0], out, planes=p, b0=SLICES[0])
    assert (kw["MULT"], kw["ZM"], kw["HK"]) == (2.0 ** -(p - 3), 2.0 ** (p - 3), (2.0 ** (p - 3) - 1) / 2)
    y = gp.emulate_kernel(fp.words, sc.double() * kw["MULT"], zp.double() * kw["ZM"] + kw["HK"], x[0], planes=p)
    ref = torch_reference(x.double(), planes, scale.double(), zero.double(), SLICES, 128, k)[0]
    assert float((y - ref).abs().max() / ref.abs().max()) < 1e-5


def test_launch_config_follows_the_measured_configs():
    """The 8B shapes get the configs measured fastest on an H200 (or, for the q/o, the nearest with batches of two
    groups): gate/up 112 row blocks x 4 splits of 8-group batches, down 32 x 14, q/o 32 x 16 of 2-group batches."""
    assert gf.launch_config(112, 32, 4) == (8, 1, 4)
    assert gf.launch_config(32, 112, 4) == (8, 1, 14)
    assert gf.launch_config(32, 32, 4) == (2, 1, 16)
    assert [gf.launch_config(112, 32, p)[1] for p in (0, 3, 5, 6, 7, 8)] == [1, 1, 2, 2, 0, 0]


def test_launch_config_aims_at_the_programs_asked_for():
    """``SmallConfig.fragment_programs`` (``fragment_linear(programs=)``): the grid aims at that many programs; the
    8B gate/up site launch (224 row blocks) runs 2 splits by default, 4 (the single layer's best shape, 8 groups a
    program) at 896, 8 at 1792; a negative count is refused."""
    assert gf.launch_config(224, 32, 4) == (8, 1, 2)
    assert gf.launch_config(224, 32, 4, 896) == (8, 1, 4)
    assert gf.launch_config(224, 32, 4, 1792) == (4, 1, 8)
    assert gf.launch_config(112, 32, 4, 0) == gf.launch_config(112, 32, 4, gf.TARGET_PROGRAMS)
    with pytest.raises(ValueError, match="target must be 0"):
        gf.launch_config(224, 32, 4, -1)
    assert tb._fragment_options(tb.SmallConfig(fragment_programs=896))["programs"] == 896
    assert tb._fragment_options(tb.SmallConfig())["programs"] == 0
    with pytest.raises(ValueError, match="fragment_programs must be an int >= 0"):
        tb.SmallConfig(fragment_programs=-2)


def test_kernel_builds_prepare_x_from_the_token(gen):
    """The B halves each lane loads straight from the token (``gluon_proto.kernel_b_loads``: its 32 consecutive
    activations, scaled) are ``prepare_x``'s B operand at ``b_slots``, the columns the pack assigns to the mma's
    ``k`` (``column_of_k``, a permutation); the in-kernel group sums are its offsets and sums."""
    assert sorted(gf.column_of_k(torch.arange(128)).tolist()) == list(range(128))
    x = torch.randn(2048, generator=gen).half()
    xb, off, xs = gf.prepare_x(x)
    for g in range(16):
        assert torch.equal(gp.kernel_b_loads(x, g), xb[g].reshape(32, 32))
    for g0 in (0, 8):
        koff, kxs = gp.kernel_group_sums(x, g0)
        torch.testing.assert_close(koff, off[g0 : g0 + 8].double(), rtol=1e-6, atol=1e-3)
        torch.testing.assert_close(kxs, xs[g0 : g0 + 8].double(), rtol=1e-6, atol=1e-4)


def test_fragment_config_needs_a_gpu_and_fp16():
    """Where the fragment kernel cannot run (CPU, the interpreter, other dtypes) the one-bit plane kernel serves."""
    bp = tb.BitPlanes(torch.zeros(8, 64, 64, dtype=torch.int32), torch.zeros(2, 8, 64, dtype=torch.int32), SLICES,
                      128, 1024, 128)  # fmt: skip
    assert not tb._fragment_ok(bp, torch.zeros(1, 1024, dtype=torch.float16))
    assert not tb._fragment_ok(bp, torch.zeros(1, 1024, dtype=torch.float32))
    assert not gf.fragment_supported(SLICES, 64, 1024) and not gf.fragment_supported(SLICES, 128, 576)
    assert gf.fragment_supported(SLICES, 128, 14336)


def test_one_tma_load_a_program_launch_args():
    """``stages=-1``: one TMA descriptor over the pack as ``[planes, G, NB * 2, 256]`` whose box is one plane of a
    program's words (its groups, its row block: one load a plane, any plane count); ``stages=-2``: a box of one
    group, the same words in the same places; refused for a view on the device, past shared memory or for groups a
    program that are not a power of 2 (a box's side)."""
    words = torch.zeros(8, 32, 4, 512, dtype=torch.int32)  # 8 planes, 32 groups (4096 inputs), 4 row blocks
    sc = torch.zeros(512, 32, dtype=torch.float16)
    x, out = torch.zeros(4096, dtype=torch.float16), torch.zeros(512)
    _, kw = gf._launch_args(words, sc, sc, x, out, splits=4, planes=4, stages=-1)
    assert kw["BULK_GS"] == 8 and kw["STAGES"] == -1
    assert list(kw["w_desc"].shape) == [8, 32, 8, 256] and list(kw["w_desc"].block_shape) == [1, 8, 2, 256]
    _, kw = gf._launch_args(words, sc, sc, x, out, splits=2, planes=3, stages=-1)  # 3 planes: three loads of a box
    assert kw["P"] == 3 and list(kw["w_desc"].block_shape) == [1, 16, 2, 256]
    # the boxes a program (row block 3, split 2) loads, read back as _bulk_load's [P * GSC, 128, 4]: plane e of its
    # group j at e * GSC + j holds that plane's and group's words of the row block, a thread's 4 consecutive
    words = torch.randint(-(2**31), 2**31 - 1, (8, 32, 4, 512), dtype=torch.int32)
    w4 = words.view(8, 32, 8, 256)
    boxes = [w4[e : e + 1, 16:24, 6:8, :] for e in range(4)]  # coords [e, g_lo = 2 * 8, pid * 2, 0], box [1, 8, 2, 256]
    flat = torch.cat(boxes).contiguous().view(4 * 8, 128, 4)  # buf [P, GSC, 2, 256], plane e's box at buf.slice(e, 1)
    for e in range(4):
        for j in range(8):
            assert torch.equal(flat[e * 8 + j], words[e, 16 + j, 3].view(128, 4))
    # stages=-2: the same buffer, filled by one load a plane and group (box [1, 1, 2, 256] at [e, g_lo + j, pid * 2, 0]
    # into buf.slice(e, 1).slice(j, 1, dim=1)), each group on a barrier of its own
    _, kw = gf._launch_args(words, sc, sc, x, out, splits=4, planes=4, stages=-2)
    assert kw["BULK_GS"] == 8 and kw["STAGES"] == -2 and list(kw["w_desc"].block_shape) == [1, 1, 2, 256]
    buf = torch.zeros(4, 8, 2, 256, dtype=torch.int32)
    for e in range(4):
        for j in range(8):
            buf[e : e + 1, j : j + 1] = w4[e : e + 1, 16 + j : 17 + j, 6:8, :]
    assert torch.equal(buf.view(4 * 8, 128, 4), flat)
    with pytest.raises(ValueError, match="stages=-3"):
        gf._launch_args(words, sc, sc, x, out, splits=4, planes=4, stages=-3)
    w48, x48 = torch.zeros(8, 48, 4, 512, dtype=torch.int32), torch.zeros(6144, dtype=torch.float16)
    with pytest.raises(ValueError, match="24 a program"):  # 48 groups in 2 splits
        gf._launch_args(w48, torch.zeros(512, 48, dtype=torch.float16), torch.zeros(512, 48, dtype=torch.float16), x48,
                        out, splits=2, planes=4, stages=-1)  # fmt: skip
    with pytest.raises(ValueError, match="more K splits"):
        gf._launch_args(words, sc, sc, x, out, splits=1, planes=8, stages=-1)  # 8 planes x 32 groups: 512 KiB
    with pytest.raises(ValueError, match="compiled in"):
        gf._launch_args(words, sc[None].expand(8, -1, -1), sc[None].expand(8, -1, -1), x, out, splits=4,
                        planes=torch.ones(1, dtype=torch.int32), dispatch=3, stages=-1)  # fmt: skip
    with pytest.raises(ValueError, match="fp16 activations"):
        gf._launch_args(words, sc, sc, x.float(), out, planes=4)


# the offline scripts' start: the 8B gate/up's 4-plane pack and its launch buffers (argv[1]: benchmarks/)
_OFFLINE_PRELUDE = """
import re, sys, torch
sys.path.insert(0, sys.argv[1])
import offline_sass as osx
from triton.experimental.gluon._runtime import GluonASTSource
from mobiquant.kernels import gluon_fragment as gf
words = torch.zeros(4, 32, 112, 512, dtype=torch.int32)  # 14336 x 4096, the 8B gate/up
sc, x, out = torch.zeros(14336, 32, dtype=torch.float16), torch.zeros(4096, dtype=torch.float16), torch.zeros(14336)
"""

_OFFLINE = (
    _OFFLINE_PRELUDE
    + """
args, kw = gf._launch_args(words, sc, sc, x, out, splits=4, planes=4, stages=int(sys.argv[2]))
ck = osx.compile_sm90(gf.frag_gemv_kernel, args, kw, source=GluonASTSource)
sass, _ = osx.sass_and_resources(ck)
print("RESULT", ck.metadata.shared, sass.count("SYNCS.PHASECHK"))
"""
)


def test_tma_modes_compile_for_sm90_offline():
    """Both TMA modes compile for sm_90 without a GPU (Triton's bundled ptxas, in a process of its own: the compile
    needs TRITON_INTERPRET unset, which the kernels tested after it need set): the program's words in 64 KiB of
    shared memory (4 planes x 8 groups x 2 KiB); ``-2`` waits on 8 barriers (one a group) where ``-1`` waits on
    one."""
    import subprocess

    import triton

    # offline_sass is not imported here: it drops TRITON_INTERPRET from the environment on import
    if not (Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump").exists():
        pytest.skip("this triton ships no cuobjdump")
    bench = str(Path(__file__).resolve().parents[2] / "benchmarks")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    waits = {}
    for stages in (-1, -2):
        r = subprocess.run(
            [sys.executable, "-c", _OFFLINE, bench, str(stages)], capture_output=True, text=True, env=env, timeout=600
        )
        line = next((ln for ln in r.stdout.splitlines() if ln.startswith("RESULT")), None)
        assert line is not None, r.stderr[-2000:]
        shared, waits[stages] = (int(v) for v in line.split()[1:])
        assert shared >= 4 * 8 * 2048
    assert waits[-1] > 0 and waits[-2] == 8 * waits[-1], waits  # a barrier's wait: a test, then a retry loop


_OFFLINE_PDL = (
    _OFFLINE_PRELUDE
    + """
dev = dict(planes=torch.ones(1, dtype=torch.int32), dispatch=3)
taus = [torch.zeros(1, dtype=torch.float16) for _ in range(3)]
site = dict(dev, views=[3, 4], routed=(torch.zeros(1, dtype=torch.float16), taus), seg_starts=(48, 80))
cases = (("static", dict(planes=4, prefetch=True)), ("tma", dict(planes=4, stages=-1)), ("device", dev), ("site", site),
         ("ring", dict(planes=4, stages=3)), ("early", dict(site, early=1)),
         ("ahead", dict(planes=4, prefetch=True, ahead=2)))
for name, kw in cases:
    s3 = sc if name in ("static", "tma", "ring") else sc[None].expand(4, -1, -1)
    args, kw = gf._launch_args(words, s3, s3, x, out, splits=4, pdl=True, **kw)
    kw.pop("launch_pdl")
    sass, _ = osx.sass_and_resources(osx.compile_sm90(gf.frag_gemv_kernel, args, kw, source=GluonASTSource))
    ops = [m.group(3) for m in osx.LINE.finditer(sass)]
    wait = ops.index("ACQBULK")
    cp = sum(o.startswith("LDGSTS") for o in ops[:wait])
    l2 = ops[:wait].count("CCTL.E.PF2")
    print("RESULT", name, ops.index("PREEXIT") < wait, ops[:wait].count("LDG.E.128"), ops.count("ACQBULK"), cp, l2,
          ops.count("CCTL.E.PF2"))
"""
)


def run_offline(script: str) -> dict[str, list[str]]:
    """Run an offline compile ``script`` (sm_90, Triton's bundled ptxas and cuobjdump) in a process of its own (the
    compile needs TRITON_INTERPRET unset, which the kernels tested after it need set): its ``RESULT name ...`` lines,
    by name. Skips where this triton ships no cuobjdump."""
    import subprocess

    import triton

    # offline_sass is not imported here: it drops TRITON_INTERPRET from the environment on import
    if not (Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump").exists():
        pytest.skip("this triton ships no cuobjdump")
    bench = str(Path(__file__).resolve().parents[2] / "benchmarks")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    r = subprocess.run([sys.executable, "-c", script, bench], capture_output=True, text=True, env=env, timeout=900)
    got = {ln.split()[1]: ln.split()[2:] for ln in r.stdout.splitlines() if ln.startswith("RESULT")}
    assert got, r.stderr[-2000:]
    return got


_OFFLINE_PARTIALS = (
    _OFFLINE_PRELUDE
    + """
from mobiquant.kernels.triton_router import RouterPartials
s3 = sc[None].expand(4, -1, -1)
taus = [torch.zeros(1, dtype=torch.float32) for _ in range(3)]
dev = dict(planes=torch.ones(1, dtype=torch.int32), dispatch=3, views=[3, 4], seg_starts=(48, 80), early=1)
for name, adj in (("values", None), ("adjacent", True), ("free", False)):
    vals = torch.zeros(1, 5) if adj is None else RouterPartials(
        torch.zeros(4 * 2 * 64), 1, 4, 4, 2, 64, torch.zeros(64), torch.zeros(5, 64), torch.zeros(5), adj)
    args, kw = gf._launch_args(words, s3, s3, x, out, splits=4, routed=(vals, taus), **dev)
    sass, res = osx.sass_and_resources(osx.compile_sm90(gf.frag_gemv_kernel, args, kw, source=GluonASTSource))
    ops = [m.group(3) for m in osx.LINE.finditer(sass)]
    print("RESULT", name, kw["KMODE"], re.search(r"STACK:(\\d+)", res).group(1), ops.count("MUFU.EX2"))
"""
)


def test_router_partials_finished_in_the_launch_offline():
    """Compiled for sm_90 without a GPU: a routed site launch (the 8B gate/up, a span of 3-4 planes, a threshold a
    layer) that finishes its router from the router launch's partials (``KMODE`` 3: the splits' pre-activations
    summed, GELU, the second layer, the policy) compiles without spilling under the 128-register cap, one exponential
    a slice for the adjacent policy's sigmoid (plus the GELU's), none of them where the gate values come made."""
    got = run_offline(_OFFLINE_PARTIALS)
    assert set(got) == {"values", "adjacent", "free"}, got
    assert got["values"] == ["2", "0", "0"]
    assert got["adjacent"][:2] == ["3", "0"] and got["free"][:2] == ["3", "0"]
    assert int(got["adjacent"][2]) == int(got["free"][2]) + 5 >= 6


_OFFLINE_PROLOGUE = (
    _OFFLINE_PRELUDE
    + """
w = torch.zeros(4096, dtype=torch.float16)
for name, pro in (("none", None), ("rms_norm", ("rms_norm", w, 1e-5)), ("silu_mul", ("silu_mul", w))):
    for splits, pdl in ((1, False), (4, False), (1, True)):
        args, kw = gf._launch_args(words, sc, sc, x, out, splits=splits, planes=4, prefetch=True, prologue=pro,
                                   pdl=pdl)
        ck = osx.compile_sm90(gf.frag_gemv_kernel, args, kw, source=GluonASTSource)
        sass, res = osx.sass_and_resources(ck)
        ops = [m.group(3) for m in osx.LINE.finditer(sass)]
        ptx = ck.asm["ptx"]
        # with pdl: where the one wait sits among the loads (the words asked of L2 or loaded before it)
        wait = ptx.find("griddepcontrol.wait")
        before = ptx[:wait] if wait >= 0 else ""
        print("RESULT", f"{name}/{splits}{'/pdl' * pdl}", kw["PRO"], re.search(r"STACK:(\\d+)", res).group(1),
              ops.count("MUFU.RSQ"), ops.count("MUFU.EX2"), ptx.count("griddepcontrol.wait"),
              before.count("prefetch.global.L2") + before.count("ld.global"))
"""
)


def test_prologues_compile_for_sm90_offline():
    """Compiled for sm_90 without a GPU: the 8B gate/up's static 4-plane view with a prologue (``PRO`` 1, the RMS norm
    before it: one reciprocal square root a program; 2, a gated product: exponentials for the SiLU), one split and
    four, and with programmatic dependent launch, without spilling; none of it without a prologue. With ``pdl`` one
    wait each, after the program's first weights are asked for (loaded, or asked of L2 before the norm's pass reads
    the row); without it no wait. (Run on a GPU: ``test_gpu_prologues``.)"""
    got = run_offline(_OFFLINE_PROLOGUE)
    for tag in ("1", "4", "1/pdl"):
        none, rms, silu = (got[f"{n}/{tag}"] for n in ("none", "rms_norm", "silu_mul"))
        assert [none[0], rms[0], silu[0]] == ["0", "1", "2"], got
        assert none[1] == rms[1] == silu[1] == "0", got  # no stack: nothing spilled
        assert none[2] == "0" and int(rms[2]) >= 1 and silu[2] == "0", got
        assert none[3] == rms[3] == "0" and int(silu[3]) >= 1, got
        waits = [int(r[4]) for r in (none, rms, silu)]
        assert waits == ([1, 1, 1] if tag.endswith("pdl") else [0, 0, 0]), got
        if tag.endswith("pdl"):
            assert all(int(r[5]) >= 4 for r in (none, rms, silu)), got  # the 4 planes' words before the wait


def test_prologue_launch_args():
    """``_launch_args(prologue=...)``: the kernel's operand, epsilon and mode; what it cannot serve refused with the
    reason."""
    words = torch.zeros(4, 32, 8, 512, dtype=torch.int32)
    sc, x, out = torch.zeros(1024, 32, dtype=torch.float16), torch.zeros(4096, dtype=torch.float16), torch.zeros(1024)
    w = torch.rand(4096).half()
    _, kw = gf._launch_args(words, sc, sc, x, out, planes=4)
    assert kw["PRO"] == 0 and kw["pro_ptr"] is x
    _, kw = gf._launch_args(words, sc, sc, x, out, planes=4, prologue=("rms_norm", w, 1e-6))
    assert kw["PRO"] == 1 and kw["pro_ptr"].data_ptr() == w.data_ptr() and kw["eps"] == 1e-6
    _, kw = gf._launch_args(words, sc, sc, x, out, planes=4, prologue=("silu_mul", w[None]))
    assert kw["PRO"] == 2 and kw["pro_ptr"].data_ptr() == w.data_ptr()
    with pytest.raises(ValueError, match="operand must be fp16, got torch.float32"):
        gf._launch_args(words, sc, sc, x, out, planes=4, prologue=("rms_norm", w.float(), 1e-6))
    with pytest.raises(ValueError, match="eps must be positive"):
        gf._launch_args(words, sc, sc, x, out, planes=4, prologue=("rms_norm", w, 0.0))
    with pytest.raises(ValueError, match=r"norm weight must be \[4096\]"):
        gf._launch_args(words, sc, sc, x, out, planes=4, prologue=("rms_norm", w[:-1], 1e-6))
    with pytest.raises(ValueError, match="prologue must be"):
        gf._launch_args(words, sc, sc, x, out, planes=4, prologue=("silu_mul", w, 1e-6))
    _, kw = gf._launch_args(words, sc, sc, x, out, planes=4, pdl=True, prologue=("silu_mul", w))
    assert kw["PRO"] == 2 and kw["PDL"] and kw["launch_pdl"]  # the activations are read after the wait


def test_epilogue_launch_args():
    """``_launch_args(epilogue=...)`` and the prologue ``("rms_scale", sums, eps)``: the kernel's ``EPI`` and its
    buffers, ``PRO`` 3 with the sums' count; what it cannot serve refused with the reason."""
    from mobiquant.kernels.epilogue import NextInput

    words = torch.zeros(4, 32, 8, 512, dtype=torch.int32)  # 1024 rows (8 blocks) x 4096
    sc, x = torch.zeros(1024, 32, dtype=torch.float16), torch.zeros(4096, dtype=torch.float16)
    out = torch.zeros(1024, dtype=torch.float16)
    like = torch.zeros(1, 1024, dtype=torch.float16)
    norm = NextInput.rms_norm(torch.ones(1024), 1e-5, like)
    _, kw = gf._launch_args(words, sc, sc, x, out, planes=4, out_mode=1, epilogue=norm)
    assert kw["EPI"] == 1 and kw["ep_out_ptr"] is norm.out and kw["ep_sq_ptr"] is norm.sums
    assert norm.sums.numel() == 8 and kw["ep_w_ptr"].dtype == torch.float16
    prod = NextInput.silu_mul(like, 512)
    _, kw = gf._launch_args(words, sc, sc, x, out, planes=4, out_mode=1, epilogue=prod)
    assert kw["EPI"] == 2 and kw["ep_out_ptr"] is prod.out and kw["ep_w_ptr"].dtype == torch.int32
    _, kw = gf._launch_args(words, sc, sc, x, out, planes=4, out_mode=1)
    assert kw["EPI"] == 0 and kw["NSQ"] == 1
    sums = torch.zeros(32)
    _, kw = gf._launch_args(words, sc, sc, x, out, planes=4, prologue=("rms_scale", sums, 1e-5))
    assert kw["PRO"] == 3 and kw["pro_ptr"] is sums and (kw["NSQ"], kw["NSQP"]) == (32, 128)
    _, kw = gf._launch_args(words, sc, sc, x, out, planes=4, prologue=("rms_scale", torch.zeros(200), 1e-5))
    assert (kw["NSQ"], kw["NSQP"]) == (200, 256)
    with pytest.raises(ValueError, match="sums must be contiguous fp32"):
        gf._launch_args(words, sc, sc, x, out, planes=4, prologue=("rms_scale", sums.half(), 1e-5))
    with pytest.raises(ValueError, match="eps must be positive"):
        gf._launch_args(words, sc, sc, x, out, planes=4, prologue=("rms_scale", sums, 0.0))
    with pytest.raises(ValueError, match="outputs in fp16"):
        gf._launch_args(words, sc, sc, x, out.float(), planes=4, epilogue=norm)  # fp32 atomics: no writer a block
    with pytest.raises(ValueError, match="must be 1000 fp16 values"):
        gf._launch_args(words, sc, sc, x, out, planes=4, out_mode=1, n_out=1000, epilogue=norm)
    with pytest.raises(ValueError, match="gate and up of whole blocks"):
        gf._launch_args(words, sc, sc, x, out, planes=4, out_mode=1, epilogue=NextInput.silu_mul(like, 500))
    with pytest.raises(ValueError, match="NextInput"):
        gf._launch_args(words, sc, sc, x, out, planes=4, out_mode=1, epilogue=("silu_mul",))


def test_epilogues_on_the_views_measured_faster():
    """``SmallConfig.fragment_epilogues``: by default (None) the static views of at most 4 or at least 7 planes make
    the next launch's input in their launches (the views measured faster so), True every view, False none; a launch
    the fragment kernel does not serve (here: the CPU) never."""
    planes, scale, zero = make_layer(256, 1024, torch.Generator().manual_seed(0), True, "cpu")
    bp = tb.pack_bitplanes(planes, scale, zero, SLICES, 128, 1024)
    views = tb.planes_of_views(bp.slice_bits)
    assert [tb.epilogues_on(None, bp, k) for k in range(1, 7)] == [p <= 4 or p >= 7 for p in views]
    assert [p for p in views if not tb.epilogues_on(None, bp, views.index(p) + 1)] == [5, 6]
    on, off = tb.SmallConfig(fragment_epilogues=True), tb.SmallConfig(fragment_epilogues=False)
    assert all(tb.epilogues_on(on, bp, k) and not tb.epilogues_on(off, bp, k) for k in range(1, 7))
    for kind, other in (("rms_norm", "silu_mul"), ("silu_mul", "rms_norm")):  # one kind alone, at every view
        alone = tb.SmallConfig(fragment_epilogues=kind)
        assert all(tb.epilogues_on(alone, bp, k, kind) for k in range(1, 7))
        assert not any(tb.epilogues_on(alone, bp, k, other) for k in range(1, 7))
    with pytest.raises(ValueError, match=r"fragment_epilogues must be None .* got 'gelu'"):
        tb.SmallConfig(fragment_epilogues="gelu")
    x = torch.zeros(1, 1024, dtype=torch.float16)
    assert not tb.takes_epilogue(x, bp, 2, (256,), on, "rms_norm")
    assert not tb.takes_prologue(x, bp, 2, (256,), on, "rms_scale")


_OFFLINE_EPILOGUE = (
    _OFFLINE_PRELUDE
    + """
from mobiquant.kernels.epilogue import NextInput
like = torch.zeros(1, 14336, dtype=torch.float16)
cases = (("none", {}), ("norm", dict(epilogue=NextInput.rms_norm(torch.ones(14336), 1e-5, like))),
         ("product", dict(epilogue=NextInput.silu_mul(like, 7168))),
         ("scale", dict(prologue=("rms_scale", torch.zeros(32), 1e-5))))
for name, extra in cases:
    o16 = torch.zeros(14336, dtype=torch.float16)
    args, kw = gf._launch_args(words, sc, sc, x, o16, splits=4, planes=4, prefetch=True, out_mode=2,
                               part=torch.zeros(4, 14336), locks=torch.zeros(112, dtype=torch.int32), **extra)
    sass, res = osx.sass_and_resources(osx.compile_sm90(gf.frag_gemv_kernel, args, kw, source=GluonASTSource))
    ops = [m.group(3) for m in osx.LINE.finditer(sass)]
    print("RESULT", name, kw["EPI"], kw["PRO"], re.search(r"STACK:(\\d+)", res).group(1),
          sum(o.startswith(("ATOM", "RED")) for o in ops), ops.count("MUFU.RSQ"), ops.count("MUFU.EX2"))
"""
)


def _made_by_the_launch(got: dict[str, list[str]]) -> None:
    """The offline compiles' readings (``name: EPI, PRO, stack, atomics, RSQ, EX2``) of a launch without, with the
    norm's parts, with the product and with a made norm: nothing spilled, the product one ticket a row-block pair
    (and its reset) and the SiLU's exponential, the made norm one reciprocal square root, the norm's parts neither."""
    none, norm, prod, scale = (got[n] for n in ("none", "norm", "product", "scale"))
    assert [r[:2] for r in (none, norm, prod, scale)] == [["0", "0"], ["1", "0"], ["2", "0"], ["0", "3"]], got
    assert all(r[2] == "0" for r in (none, norm, prod, scale)), got  # no stack: nothing spilled
    atoms = int(none[3])
    assert int(norm[3]) == atoms and int(prod[3]) == atoms + 2 and int(scale[3]) == atoms, got
    assert none[4] == norm[4] == prod[4] == "0" and scale[4] == "1", got
    assert none[5] == norm[5] == scale[5] == "0" and int(prod[5]) >= 1, got


def test_epilogues_compile_for_sm90_offline():
    """Compiled for sm_90 without a GPU: the 8B gate/up's static 4-plane view over 4 K splits (the last split of a
    row block writes its outputs) with each epilogue and the norm made by the launch before, without spilling: the
    norm's parts add no atomic, the product one ticket a row-block pair (and its reset) and the SiLU's
    exponential, the scaled launch one reciprocal square root; none of it without them. (Run on a GPU:
    ``test_gpu_epilogues``.)"""
    got = run_offline(_OFFLINE_EPILOGUE)
    _made_by_the_launch(got)


_OFFLINE_ROUTED_EPILOGUE = (
    _OFFLINE_PRELUDE
    + """
from mobiquant.kernels.epilogue import NextInput
s3 = sc[None].expand(4, -1, -1)
like = torch.zeros(1, 14336, dtype=torch.float16)
taus = [torch.zeros(1, dtype=torch.float16) for _ in range(2)]
dev = dict(planes=torch.ones(1, dtype=torch.int32), dispatch=3, views=[3, 4], seg_starts=(56,), early=1)
cases = (("none", {}), ("norm", dict(epilogue=NextInput.rms_norm(torch.ones(14336), 1e-5, like))),
         ("product", dict(epilogue=NextInput.silu_mul(like, 7168))),
         ("scale", dict(prologue=("rms_scale", torch.zeros(32), 1e-5))))
for name, extra in cases:
    o16 = torch.zeros(14336, dtype=torch.float16)
    args, kw = gf._launch_args(words, s3, s3, x, o16, splits=4, out_mode=2, part=torch.zeros(4, 14336),
                               locks=torch.zeros(112, dtype=torch.int32), routed=(torch.zeros(1, 5), taus), **dev,
                               **extra)
    kw["maxnreg"] = 128  # as fragment_linear caps a view on the device in a launch of this size
    sass, res = osx.sass_and_resources(osx.compile_sm90(gf.frag_gemv_kernel, args, kw, source=GluonASTSource))
    ops = [m.group(3) for m in osx.LINE.finditer(sass)]
    print("RESULT", name, kw["EPI"], kw["PRO"], re.search(r"STACK:(\\d+)", res).group(1),
          sum(o.startswith(("ATOM", "RED")) for o in ops), ops.count("MUFU.RSQ"), ops.count("MUFU.EX2"))
"""
)


def test_routed_epilogues_compile_for_sm90_offline():
    """Compiled for sm_90 without a GPU: a routed site launch of two layers (gate and up, the view counted from the
    router's gate values against a threshold a layer, a span of 3-4 planes, 4 K splits, capped at 128 registers as
    the package launches it) with each epilogue and the norm made by the launch before
    (``SmallConfig.fragment_routed_epilogues``), without spilling: the product one ticket a row-block pair more and
    the SiLU's exponential, the scaled launch one reciprocal square root, the norm's parts nothing of either.
    (Run on a GPU: ``test_gpu_lean_routed_epilogues``.)"""
    got = run_offline(_OFFLINE_ROUTED_EPILOGUE)
    _made_by_the_launch(got)


_OFFLINE_ROUTER_TAIL = (
    _OFFLINE_PRELUDE
    + """
from mobiquant.kernels.epilogue import NextInput
words = torch.zeros(4, 112, 32, 512, dtype=torch.int32)  # 4096 x 14336, the 8B down
s3 = torch.zeros(4, 4096, 112, dtype=torch.float16)
x = torch.zeros(14336, dtype=torch.float16)
like = torch.zeros(1, 4096, dtype=torch.float16)
router = (torch.zeros(64, 4096, dtype=torch.float16), torch.zeros(64, dtype=torch.float16),
          torch.zeros(5, 64, dtype=torch.float16), torch.zeros(5, dtype=torch.float16), True)
dev = dict(planes=torch.ones(1, dtype=torch.int32), dispatch=3, views=[3, 4], early=1)
cases = (("norm", NextInput.rms_norm(torch.ones(4096), 1e-5, like)),
         ("router", NextInput.rms_norm(torch.ones(4096), 1e-5, like, router=router)),
         ("normed", NextInput.rms_norm(torch.ones(4096), 1e-5, like, router=router, normed=True)))
for name, epilogue in cases:
    o16 = torch.zeros(4096, dtype=torch.float16)
    args, kw = gf._launch_args(words, s3, s3, x, o16, splits=14, out_mode=2, part=torch.zeros(14, 4096),
                               locks=torch.zeros(32, dtype=torch.int32),
                               routed=(torch.zeros(1, 5), torch.zeros(1, dtype=torch.float16)), epilogue=epilogue,
                               **dev)
    kw["maxnreg"] = 128
    sass, res = osx.sass_and_resources(osx.compile_sm90(gf.frag_gemv_kernel, args, kw, source=GluonASTSource))
    ops = [m.group(3) for m in osx.LINE.finditer(sass)]
    print("RESULT", name, kw["EPI"], kw["ER"], kw["ERH"], kw["ERHP"], re.search(r"STACK:(\\d+)", res).group(1),
          sum(o.startswith(("ATOM", "RED")) for o in ops), ops.count("MUFU.RSQ"), ops.count("MUFU.EX2"),
          osx.local_in_loops(sass))
# the next block's q/k/v site (6144 x 4096, 8 K splits, a threshold a layer): the norm's parts with its scale, the
# views counted from the gate values the down launch made
words = torch.zeros(4, 32, 48, 512, dtype=torch.int32)
s3, x = torch.zeros(4, 6144, 32, dtype=torch.float16), torch.zeros(4096, dtype=torch.float16)
taus = [torch.zeros(1, dtype=torch.float16) for _ in range(3)]
args, kw = gf._launch_args(words, s3, s3, x, torch.zeros(6144, dtype=torch.float16), splits=8, batch=4, out_mode=2,
                           part=torch.zeros(8, 6144), locks=torch.zeros(48, dtype=torch.int32),
                           routed=(torch.zeros(1, 5), taus), seg_starts=(32, 40),
                           prologue=("rms_scale", torch.zeros(32), 1e-5), **dev)
kw["maxnreg"] = 128
sass, res = osx.sass_and_resources(osx.compile_sm90(gf.frag_gemv_kernel, args, kw, source=GluonASTSource))
print("RESULT qkv", kw["PRO"], kw["KMODE"], kw["NSEG"], re.search(r"STACK:(\\d+)", res).group(1))
"""
)


def test_router_tail_compiles_for_sm90_offline():
    """Compiled for sm_90 without a GPU: the 8B down launch at a routed budget (the view counted from gate values, a
    span of 3-4 planes, 14 K splits, capped at 128 registers) making the next block's input norm's parts and also
    finishing the router that decides on that norm's output (``EPI`` 3, ``epilogue.RouterTail``: 5 gate values from
    64 hidden units), and also making the normed row (``EPI`` 4; 8 bytes spilled outside every loop), without
    spilling: one ticket more than the norm's parts alone (its add and its reset), the
    norm's reciprocal square root and the adjacent policy's five sigmoids' exponentials; and the next block's q/k/v
    site launch that reads them (the norm's scale, three thresholds on the made gate values) without spilling."""
    got = run_offline(_OFFLINE_ROUTER_TAIL)
    assert got["qkv"] == ["3", "2", "3", "0"], got  # the next q/k/v site: the made norm's scale, no spill
    norm, tail, normed = got["norm"], got["router"], got["normed"]
    assert norm[0] == "1" and tail[:4] == ["3", "5", "64", "64"] and normed[:4] == ["4", "5", "64", "64"], got
    assert norm[4] == tail[4] == "0", got  # no stack: nothing spilled
    # the normed row's pass: one register kept in local memory (8 bytes), stored at the start and read back between
    # the loops (sm_90, triton 3.6), none of its accesses inside a loop
    assert int(normed[4]) <= 8 and norm[8] == tail[8] == normed[8] == "0", got
    assert int(tail[5]) == int(normed[5]) == int(norm[5]) + 2, got
    assert norm[6] == "0" and int(tail[6]) >= 1 and int(tail[7]) >= 5 + int(norm[7]), got
    assert normed[6:8] == tail[6:8], got  # the normed row: no ticket, rsqrt or exponential more


def test_router_partials_launch_args():
    """``routed = (RouterPartials, threshold)``: ``KMODE`` 3 with the router's second layer and the partials' layout;
    partials of more than one token refused."""
    from mobiquant.kernels.triton_router import RouterPartials

    words = torch.zeros(4, 32, 4, 512, dtype=torch.int32)
    sc, x, out = torch.zeros(4, 512, 32, dtype=torch.float16), torch.zeros(4096, dtype=torch.float16), torch.zeros(512)
    b1, w2, b2 = torch.zeros(48), torch.zeros(5, 48), torch.zeros(5)
    p = RouterPartials(torch.zeros(4 * 2 * 64), 1, 3, 4, 2, 64, b1, w2, b2, True)
    common = dict(planes=torch.ones(1, dtype=torch.int32), dispatch=3, views=[3, 4])
    args, kw = gf._launch_args(words, sc, sc, x, out, **common, routed=(p, torch.zeros(1)))
    assert kw["KMODE"] == 3 and kw["KV"] == 5 and kw["v_ptr"] is p.part and kw["r_w2_ptr"] is w2
    assert (kw["RS"], kw["RBLK"], kw["RH"], kw["RHP"], kw["RADJ"]) == (3, 2 * 64, 48, 64, True)
    _, kw = gf._launch_args(words, sc, sc, x, out, **common, routed=(torch.zeros(1, 5), torch.zeros(1)))
    assert kw["KMODE"] == 2 and kw["RS"] == 1
    with pytest.raises(ValueError, match="one"):
        gf._launch_args(words, sc, sc, x, out, **common, routed=(dataclasses.replace(p, tokens=2), torch.zeros(1)))


def test_pdl_launch_args():
    """``pdl``: the kernel's ``PDL`` constexpr and the launch attribute; neither without it."""
    words = torch.zeros(4, 32, 4, 512, dtype=torch.int32)
    sc, x, out = torch.zeros(512, 32, dtype=torch.float16), torch.zeros(4096, dtype=torch.float16), torch.zeros(512)
    _, kw = gf._launch_args(words, sc, sc, x, out, planes=4, pdl=True)
    assert kw["PDL"] is True and kw["launch_pdl"] is True
    _, kw = gf._launch_args(words, sc, sc, x, out, planes=4)
    assert kw["PDL"] is False and "launch_pdl" not in kw


def test_pdl_waits_after_the_first_weights_offline():
    """Compiled for sm_90 without a GPU: with ``pdl`` every program lets the next kernel start
    (``griddepcontrol.launch_dependents``, SASS ``PREEXIT``) and waits for the kernel before (``griddepcontrol.wait``,
    ``ACQBULK``) once; a static view's first group of words (4 planes: four 16-byte loads) is asked for before that
    wait, and the TMA mode's too (issued as bulk copies, no LDG); a view on the device (``k`` maybe written by the
    kernel before) waits before any load, as does a routed site launch (a threshold a layer: it compiles); the
    shared-memory ring (``stages=3``) issues its first two groups' copies (``cp.async``) before the wait; with
    ``early=1`` a routed site asks L2 for its first group of the planes every body reads (``prefetch.global.L2``, SASS
    ``CCTL.E.PF2``) before the wait; with ``ahead=2`` a static view asks L2 for a later group's 4 planes at each group
    of its loop, none before the wait."""
    got = run_offline(_OFFLINE_PDL)
    assert set(got) == {"static", "tma", "device", "site", "ring", "early", "ahead"}, got
    assert got["static"] == ["True", "4", "1", "0", "0", "0"]
    assert got["tma"] == ["True", "0", "1", "0", "0", "0"] and got["device"] == ["True", "0", "1", "0", "0", "0"]
    assert got["site"] == ["True", "0", "1", "0", "0", "0"]  # a routed site: its thresholds are read after the wait
    assert got["ring"] == ["True", "0", "1", "8", "0", "0"]  # the ring's first two groups (4 planes each) by cp.async
    # fragment_early_l2: the first group of the 3 planes every body reads asked of L2 before the wait, no load
    assert got["early"] == ["True", "0", "1", "0", "3", "3"]
    # fragment_ahead 2: 4 planes asked of L2 at each of a batch's 8 groups (a static view: none before the wait)
    assert got["ahead"] == ["True", "4", "1", "0", "0", "32"]


def test_chain_launch_args():
    """Next inputs with the chain's flags: the gate/up launch making a gated product sets a flag a group (``CMAKE``
    1), a launch making a norm's parts counts its row blocks (``CMAKE`` 2); the down launch reading the product awaits
    its groups' flags (``CREAD`` 1), the gate/up launch reading the norm's parts with their sums the count (``CREAD``
    2), both asking L2 for their first 2 groups first (a power of 2 from their groups and 128 up for the wait), the
    gate/up launch both reading one and making another. Refused: a view on the device, a product read with a
    prologue, a norm's parts without their sums, an input that is not the launch's, flags of the wrong size, a chained
    norm with a router's tail. None asked: 0 and 0."""
    from mobiquant.kernels.epilogue import NextInput, chain_flags

    owner = torch.nn.Linear(1, 1)
    x = torch.zeros(4096, dtype=torch.float16)
    flags = chain_flags(owner, 16, x.device)
    assert flags.dtype == torch.int32 and flags.tolist() == [0] * 17 and chain_flags(owner, 16, x.device) is flags
    prod = NextInput.silu_mul(x[None], 2048, flags)
    norm = NextInput.rms_norm(torch.ones(4096, dtype=torch.float16), 1e-5, x[None], ready=chain_flags(owner, 1, "cpu"))
    up = torch.zeros(4, 32, 32, 512, dtype=torch.int32)  # gate and up: 2 x 2048 rows
    sc, out = torch.zeros(4096, 32, dtype=torch.float16), torch.zeros(4096, dtype=torch.float16)
    _, kw = gf._launch_args(up, sc, sc, x, out, planes=4, out_mode=1, epilogue=prod)
    assert (kw["CMAKE"], kw["CREAD"]) == (1, 0) and kw["mk_ptr"] is flags and kw["EPI"] == 2
    made_by_o = dict(prologue=("rms_scale", norm.sums, 1e-5), chain=norm)
    _, kw = gf._launch_args(up, sc, sc, norm.out.view(-1), out, planes=4, out_mode=1, epilogue=prod, **made_by_o)
    assert (kw["CMAKE"], kw["CREAD"], kw["CHE"]) == (1, 2, 2) and kw["rd_ptr"] is norm.ready and kw["mk_ptr"] is flags
    o_w, o_sc = torch.zeros(4, 32, 32, 512, dtype=torch.int32), torch.zeros(4096, 32, dtype=torch.float16)
    _, kw = gf._launch_args(o_w, o_sc, o_sc, x, out, planes=4, out_mode=1, epilogue=norm)
    assert (kw["CMAKE"], kw["CREAD"], kw["EPI"]) == (2, 0, 1) and kw["mk_ptr"] is norm.ready
    down = torch.zeros(4, 16, 8, 512, dtype=torch.int32)  # 1024 x 2048
    sc2, out2 = torch.zeros(1024, 16, dtype=torch.float16), torch.zeros(1024, dtype=torch.float16)
    _, kw = gf._launch_args(down, sc2, sc2, prod.out.view(-1), out2, planes=4, out_mode=1, chain=prod)
    assert (kw["CMAKE"], kw["CREAD"], kw["CHE"], kw["CHP"]) == (0, 1, 2, 128) and kw["rd_ptr"] is flags
    _, kw = gf._launch_args(down, sc2, sc2, prod.out.view(-1), out2, planes=4, out_mode=1)
    assert (kw["CMAKE"], kw["CREAD"]) == (0, 0)
    with pytest.raises(ValueError, match="compiled in, with no prologue"):
        gf._launch_args(down, sc2, sc2, prod.out.view(-1), out2, planes=4, out_mode=1, chain=prod,
                        prologue=("silu_mul", prod.out.view(-1)))  # fmt: skip
    with pytest.raises(ValueError, match="with their own sums"):
        gf._launch_args(up, sc, sc, norm.out.view(-1), out, planes=4, out_mode=1, chain=norm)
    with pytest.raises(ValueError, match="compiled in"):
        gf._launch_args(down, sc2[None].expand(4, -1, -1), sc2[None].expand(4, -1, -1), prod.out.view(-1), out2,
                        planes=torch.ones(1, dtype=torch.int32), out_mode=1, chain=prod)  # fmt: skip
    with pytest.raises(ValueError, match="this launch's input"):
        gf._launch_args(down, sc2, sc2, torch.zeros(2048, dtype=torch.float16), out2, planes=4, out_mode=1, chain=prod)
    with pytest.raises(ValueError, match="a flag a group"):
        NextInput.silu_mul(x[None], 2048, torch.zeros(16, dtype=torch.int32))
    with pytest.raises(ValueError, match="without a router's tail"):
        r = (torch.zeros(8, 4096), torch.zeros(8), torch.zeros(5, 8), torch.zeros(5), True)
        NextInput.rms_norm(torch.ones(4096), 1e-5, x[None].float(), router=r, ready=torch.zeros(2, dtype=torch.int32))


def test_chained_product_found_by_its_output():
    """:func:`chained_product` finds a live chained product by its output's address (a view of it too), nothing for
    another tensor, a product without flags or one gone; a product made in PyTorch sets every flag (not the ticket),
    a norm's parts the count of their row blocks, and :meth:`NextInput.unchain` resets them unless a launch read them
    chained."""
    import gc

    from mobiquant.kernels.epilogue import NextInput, chained_product

    x = torch.zeros(1, 512, dtype=torch.float16)
    prod = NextInput.silu_mul(x, 256, torch.zeros(3, dtype=torch.int32))
    assert chained_product(prod.out) is prod and chained_product(prod.out.view(-1)) is prod
    assert chained_product(x) is None and chained_product(NextInput.silu_mul(x, 256).out) is None
    prod.make(torch.randn(1, 512).half())
    assert prod.ready.tolist() == [1, 1, 0] and prod.made
    prod.unchain()
    assert prod.ready.tolist() == [0, 0, 0]
    prod.make(torch.randn(1, 512).half())
    prod.chained = True  # a launch read it chained: its last program resets the flags
    prod.unchain()
    assert prod.ready.tolist() == [1, 1, 0]
    out = prod.out
    del prod
    gc.collect()
    assert chained_product(out) is None
    norm = NextInput.rms_norm(torch.ones(300), 1e-5, torch.zeros(1, 300), ready=torch.zeros(2, dtype=torch.int32))
    assert chained_product(norm.out) is norm
    norm.make(torch.randn(1, 300))
    assert norm.ready.tolist() == [3, 0]  # three row blocks of 128
    norm.unchain()
    assert norm.ready.tolist() == [0, 0]


_OFFLINE_CHAIN = (
    _OFFLINE_PRELUDE
    + """
from mobiquant.kernels.epilogue import NextInput
for name, chained in (("plain", False), ("chained", True)):
    flags = lambda n: torch.zeros(n, dtype=torch.int32) if chained else None
    norm = NextInput.rms_norm(torch.ones(4096, dtype=torch.float16), 1e-5, x[None], ready=flags(2))
    prod = NextInput.silu_mul(x[None], 7168, flags(57))
    lk = dict(part=torch.zeros(4, 14336), locks=torch.zeros(112, dtype=torch.int32), out_mode=2, pdl=True)
    pro = dict(prologue=("rms_scale", norm.sums, 1e-5), chain=norm if chained else None)
    args, kw = gf._launch_args(words, sc, sc, norm.out.view(-1), out.half(), splits=4, planes=4, prefetch=True,
                               epilogue=prod, **lk, **pro)
    kw.pop("launch_pdl")
    sass, res = osx.sass_and_resources(osx.compile_sm90(gf.frag_gemv_kernel, args, kw, source=GluonASTSource))
    ops = [m.group(3) for m in osx.LINE.finditer(sass)]
    print("RESULT gateup-" + name, re.search(r"REG:(\\d+)", res).group(1), re.search(r"STACK:(\\d+)", res).group(1),
          sum(o.startswith("ATOMG.E.EXCH") for o in ops), ops.count("ACQBULK"), ops.count("CCTL.E.PF2"))
    w2, s2 = torch.zeros(4, 56, 32, 512, dtype=torch.int32), torch.zeros(4096, 56, dtype=torch.float16)
    lk = dict(part=torch.zeros(7, 4096), locks=torch.zeros(32, dtype=torch.int32), out_mode=2, pdl=True)
    args, kw = gf._launch_args(w2, s2, s2, prod.out.view(-1), torch.zeros(4096, dtype=torch.float16), splits=7,
                               planes=4, prefetch=True, chain=prod if chained else None, epilogue=norm, **lk)
    kw.pop("launch_pdl")
    sass, res = osx.sass_and_resources(osx.compile_sm90(gf.frag_gemv_kernel, args, kw, source=GluonASTSource))
    ops = [m.group(3) for m in osx.LINE.finditer(sass)]
    print("RESULT down-" + name, ops.count("ACQBULK"), ops.count("PREEXIT"), ops.count("CCTL.E.PF2"),
          sum(o.startswith("LDG.E.STRONG.SYS") for o in ops), re.search(r"STACK:(\\d+)", res).group(1))
"""
)


def test_chain_compiles_for_sm90_offline():
    """Compiled for sm_90 without a GPU (``SmallConfig.fragment_chain``): the gate/up launch reading a chained norm's
    parts and making a chained product keeps its registers within 4 (no spill), sets a pair's flag and resets the
    count's ticket (two more exchanges) and waits for no kernel before (no ``griddepcontrol.wait``, SASS
    ``ACQBULK``), asking L2 for its first 2 groups' 4 planes first (``CCTL.E.PF2``); the down launch reading the
    product lets the next kernel start (``PREEXIT``), never waits for the kernel before, asks L2 for its first groups
    and polls its groups' flags (volatile loads), its epilogue counting the next norm's row blocks, no spill."""
    got = run_offline(_OFFLINE_CHAIN)
    regs_plain, stack_plain, xchg_plain, wait_plain, l2_plain = got["gateup-plain"]
    regs, stack, xchg, wait, l2 = got["gateup-chained"]
    assert stack == stack_plain == "0" and int(regs) <= int(regs_plain) + 4, got
    # one exchange more sets a pair's flag, one more resets the read count's ticket
    assert int(xchg) == int(xchg_plain) + 2 and (wait_plain, wait) == ("1", "0") and (l2_plain, l2) == ("0", "8"), got
    assert got["down-plain"] == ["1", "1", "0", "0", "0"], got
    assert got["down-chained"][:3] == ["0", "1", "8"] and int(got["down-chained"][3]) >= 1, got
    assert got["down-chained"][4] == "0", got


def test_early_l2_launch_args():
    """``early``: the ``EARLY`` constexpr of a dispatched device view, at most the program's groups; refused for a
    static view; 0 when not asked for. ``SmallConfig.fragment_early_l2`` (1 by default, as measured) reaches
    ``fragment_linear``'s ``early_l2``."""
    words = torch.zeros(4, 32, 4, 512, dtype=torch.int32)
    sc, x, out = torch.zeros(512, 32, dtype=torch.float16), torch.zeros(4096, dtype=torch.float16), torch.zeros(512)
    s3 = sc[None].expand(4, -1, -1)
    dev = dict(planes=torch.ones(1, dtype=torch.int32), dispatch=3)
    assert gf._launch_args(words, s3, s3, x, out, **dev)[1]["EARLY"] == 0
    assert gf._launch_args(words, s3, s3, x, out, **dev, early=2)[1]["EARLY"] == 2
    many = gf._launch_args(words, s3, s3, x, out, splits=16, batch=2, **dev, early=4)
    assert many[1]["EARLY"] == 2  # 2 groups a program
    with pytest.raises(ValueError, match="dispatched device view only"):
        gf._launch_args(words, sc, sc, x, out, planes=4, early=1)
    assert tb.SmallConfig().fragment_early_l2 == 1
    with pytest.raises(ValueError, match="fragment_early_l2 must be an int >= 0"):
        tb.SmallConfig(fragment_early_l2=-1)


def test_fragment_loads_launch_args():
    """``ahead``: the ``AHEAD`` constexpr of a view compiled in or a dispatched device view, less than the program's
    groups; refused with shared-memory loads or whole fields on the device. ``SmallConfig.fragment_ahead`` and
    ``fragment_prefetch`` (off by default) reach ``fragment_linear``, whose ``prefetch`` overrides the launch's."""
    words = torch.zeros(4, 32, 4, 512, dtype=torch.int32)
    sc, x, out = torch.zeros(512, 32, dtype=torch.float16), torch.zeros(4096, dtype=torch.float16), torch.zeros(512)
    s3 = sc[None].expand(4, -1, -1)
    assert gf._launch_args(words, sc, sc, x, out, planes=4)[1]["AHEAD"] == 0
    assert gf._launch_args(words, sc, sc, x, out, planes=4, ahead=2)[1]["AHEAD"] == 2
    assert gf._launch_args(words, sc, sc, x, out, planes=4, splits=16, batch=2, ahead=4)[1]["AHEAD"] == 1
    dev = dict(planes=torch.ones(1, dtype=torch.int32), dispatch=3)
    assert gf._launch_args(words, s3, s3, x, out, **dev, ahead=2)[1]["AHEAD"] == 2
    with pytest.raises(ValueError, match="words through registers"):
        gf._launch_args(words, sc, sc, x, out, planes=4, stages=3, ahead=2)
    with pytest.raises(ValueError, match="words through registers"):
        gf._launch_args(words, s3, s3, x, out, planes=torch.ones(1, dtype=torch.int32), ahead=2)
    cfg = tb.SmallConfig()
    assert (cfg.fragment_ahead, cfg.fragment_prefetch) == (0, None)
    opts = tb._fragment_options(tb.SmallConfig(fragment_ahead=2, fragment_prefetch=0))
    assert (opts["ahead"], opts["prefetch"]) == (2, 0)
    with pytest.raises(ValueError, match="fragment_ahead must be an int >= 0"):
        tb.SmallConfig(fragment_ahead=-1)
    with pytest.raises(ValueError, match="fragment_prefetch must be None"):
        tb.SmallConfig(fragment_prefetch=3)
    fp = gf.FragPlanes(words, s3, s3, (3, 1), 4096, 512)
    with pytest.raises(ValueError, match="prefetch must be 0, 1 or 2"):
        gf.fragment_linear(x[None], fp, 1, prefetch=3)


def test_site_thresholds_launch_args():
    """A routed site on the fragment kernel: one threshold a layer, the later layers' first row blocks (``SB1``,
    ``SB2``), ``NSEG`` layers; unused slots repeat the first threshold; refused: a threshold count that is not the
    layer count, more than 3 layers, row blocks out of order or outside the launch, several thresholds unrouted."""
    words = torch.zeros(6, 32, 10, 512, dtype=torch.int32)  # 10 row blocks
    sc, x, out = (
        torch.zeros(6, 1280, 32, dtype=torch.float16),
        torch.zeros(4096, dtype=torch.float16),
        torch.zeros(1280),
    )
    vals, t = torch.zeros(5), [torch.zeros(1) + i for i in range(3)]
    planes = torch.ones(1, dtype=torch.int32)
    common = dict(planes=planes, dispatch=3, views=[3, 4, 5, 6, 7, 8])
    _, kw = gf._launch_args(words, sc, sc, x, out, **common, routed=(vals, t), seg_starts=(4, 6))
    assert (kw["NSEG"], kw["SB1"], kw["SB2"], kw["KMODE"], kw["KV"]) == (3, 4, 6, 2, 5)
    assert [kw["tau_ptr"], kw["tau1_ptr"], kw["tau2_ptr"]] == t
    _, kw = gf._launch_args(words, sc, sc, x, out, **common, routed=(vals, t[:2]), seg_starts=(4,))
    assert (kw["NSEG"], kw["SB1"]) == (2, 4) and kw["tau2_ptr"] is t[0]
    _, kw = gf._launch_args(words, sc, sc, x, out, **common, routed=(vals, t[0]))
    assert kw["NSEG"] == 1 and kw["tau1_ptr"] is t[0]
    for taus, starts, match in (
        (t, (4,), "3 thresholds for 2 layers"),
        (t, (6, 4), "increasing"),
        (t[:2], (10,), "inside"),
        (t[:2], (0,), "inside"),
    ):
        with pytest.raises(ValueError, match=match):
            gf._launch_args(words, sc, sc, x, out, **common, routed=(vals, taus), seg_starts=starts)
    with pytest.raises(ValueError, match="at most 3 layers"):
        gf._launch_args(words, sc, sc, x, out, **common, routed=(vals, [*t, t[0]]), seg_starts=(2, 4, 6))


def test_routed_site_takes_the_fragment_kernel_when_asked(monkeypatch):
    """``SmallConfig.fragment_site_spans`` (on by default): a routed site launch (one router's gate values, a threshold
    a layer) within a span of at most ``fragment_span_planes`` planes goes to the fragment kernel as one pack, each
    layer's threshold with its first row block; a span of more planes, or the option off, keeps the one-bit plane
    kernel. (Which kernel serves, decided on the CPU with the GPU checks stubbed.)"""
    seen = []
    monkeypatch.setattr(tb, "_fragment_ok", lambda bp, x2: True)
    monkeypatch.setattr(gf, "fragment_of", lambda bp: bp)
    monkeypatch.setattr(gf, "fragment_linear", lambda *a, **kw: seen.append((a, kw)) or "fragment")
    monkeypatch.setattr(tb, "_bits_launch", lambda *a, **kw: "bits")
    parts = [
        tb.BitPlanes(
            torch.zeros(8, 32, n // 2, dtype=torch.int32),
            torch.zeros(2, 32, n // 2, dtype=torch.int32),
            SLICES,
            128,
            4096,
            n,
        )  # fmt: skip
        for n in (8192, 4096)
    ]
    site = tb.site_bitplanes(parts)  # 12288 x 4096 = 3 x 2^24 weights
    x = torch.zeros(1, 4096, dtype=torch.float16)
    vals = torch.zeros(5, dtype=torch.float16)
    ks = [tb.RoutedK(vals, torch.zeros(1, dtype=torch.float16) + i) for i in range(2)]
    on = tb.SmallConfig()
    monkeypatch.setattr(tb, "_host_routed_k", lambda k: None)
    assert tb.bitplane_site_bits(x, site, ks, config=on, span=(1, 2)) == "fragment"
    (args, kw) = seen[-1]
    assert args[2] is None and kw["seg_starts"] == (64,) and kw["span"] == (1, 2)
    assert [t.item() for t in kw["routed"][1]] == [0, 1] and kw["routed"][0] is not None
    assert tb.bitplane_site_bits(x, site, ks, span=(3, 4)) == "fragment"  # 5-6 planes; config None: the defaults
    assert tb.bitplane_site_bits(x, site, ks, config=on, span=(4, 5)) == "bits"  # 6-7 planes
    off = tb.SmallConfig(fragment_site_spans=False)
    assert tb.bitplane_site_bits(x, site, ks, config=off, span=(1, 2)) == "bits"
    k_t = torch.full((1,), 2, dtype=torch.int32)
    monkeypatch.setattr(tb, "_host_k_range", lambda k: None)
    assert tb.bitplane_site_bits(x, site, [k_t, k_t], config=on, span=(1, 2)) == "fragment"
    assert torch.equal(seen[-1][0][2], k_t) and "routed" not in seen[-1][1]


def test_tma_config_picks_splits_that_fit():
    """The package's TMA launches (``SmallConfig.fragment_tma``): the K split nearest 448 programs among those leaving
    a power of 2 of groups a program in at most 64 KiB of shared memory (three programs an SM)."""
    assert gf.tma_config(224, 32, 4) == (8, 4)  # the 8B gate/up site: 8 groups a program, 64 KiB (16: 128 KiB)
    assert gf.tma_config(112, 32, 4) == (8, 4)  # the 8B gate/up: 448 programs
    assert gf.tma_config(32, 112, 4) == (8, 14)  # the 8B down: 8 groups a program
    assert gf.tma_config(32, 32, 4) == (2, 16)  # the 8B q/o: 2 groups a program, 512 programs
    assert gf.tma_config(112, 32, 8) == (4, 8)  # 8 planes: 4 groups a program, 64 KiB
    assert gf.tma_config(112, 32, 3) == (8, 4)  # 3 planes fill a buffer of 4
    assert gf.tma_config(4, 3, 4) == (1, 3)  # 3 groups: one a program is the only power of 2
    # every choice is one _launch_args accepts
    words = torch.zeros(4, 32, 32, 512, dtype=torch.int32)
    sc, x, out = torch.zeros(4096, 32, dtype=torch.float16), torch.zeros(4096, dtype=torch.float16), torch.zeros(4096)
    batch, splits = gf.tma_config(32, 32, 4)
    for stages in (-1, -2):
        _, kw = gf._launch_args(words, sc, sc, x, out, splits, 4, batch, False, None, stages)
        assert kw["BULK_GS"] == 32 // splits and kw["STAGES"] == stages
    with pytest.raises(ValueError, match="fragment_tma must be"):
        tb.SmallConfig(fragment_tma=1)


def test_fragment_default_follows_the_stack():
    """``SmallConfig()`` takes the fragment kernel for the static views the 8B-shaped site stack measured faster
    with it (3-4 and 7-8 planes of the default layout in every launch; 5-6 planes in launches of at least 2^25
    weights, capped at 128 registers), not for 5-6 planes of smaller launches nor views on the device; True and
    False force; ``fragment_static_from`` 2^25 keeps 3-4 planes of smaller launches off it (the rule before)."""
    bp = tb.BitPlanes(torch.zeros(8, 64, 64, dtype=torch.int32), torch.zeros(2, 8, 64, dtype=torch.int32), SLICES,
                      128, 1024, 128)  # fmt: skip
    auto, on, off = tb.SmallConfig(), tb.SmallConfig(fragment=True), tb.SmallConfig(fragment=False)
    assert [tb._fragment_wanted(auto, bp, k) for k in (1, 2, 3, 4, 5, 6, None)] == [1, 1, 0, 0, 1, 1, 0]
    big = dataclasses.replace(bp, out_features=1 << 15)  # 2^15 x 2^10 = 2^25 weights: 5-6 planes too
    assert [tb._fragment_wanted(auto, big, k) for k in (1, 2, 3, 4, 5, 6, None)] == [1, 1, 1, 1, 1, 1, 0]
    large = tb.SmallConfig(fragment_static_from=1 << 25)  # 3-4 planes only in launches of 2^25 weights
    assert [tb._fragment_wanted(large, bp, k) for k in (1, 2, 3, 4, 5, 6)] == [0, 0, 0, 0, 1, 1]
    assert [tb._fragment_wanted(large, big, k) for k in (1, 2)] == [1, 1]
    assert all(tb._fragment_wanted(on, bp, k) for k in (3, None))
    assert not any(tb._fragment_wanted(off, big, k) for k in (1, 6))
    nocap = tb.SmallConfig(fragment_cap=0)  # no cap: 5-6 planes back on the one-bit plane kernel everywhere
    assert [tb._fragment_wanted(nocap, big, k) for k in (1, 2, 3, 4, 5, 6)] == [1, 1, 0, 0, 1, 1]
    assert [tb._fragment_wanted(auto, bp, k) for k in (3, 4)] == [0, 0]  # 5-6 planes of a small launch: not
    assert gf.register_capped(1 << 25, 0, 0) and not gf.register_capped((1 << 25) - 1, 0, 0)  # device views
    assert gf.register_capped(1 << 25, 7, 5) and not gf.register_capped(1 << 25, 4, 5)  # static views from cap
    assert not gf.register_capped(1 << 26, 8, 0)  # no cap asked
    dev = tb.SmallConfig(fragment_device_from=1 << 17)  # device views of launches from 2^17 weights (this 128 x 1024)
    assert tb._fragment_wanted(dev, bp, None) and not tb._fragment_wanted(tb.SmallConfig(fragment_device_from=1 << 18),
                                                                           bp, None)  # fmt: skip


def test_fragment_for_spans():
    """``fragment_span_planes`` (6 by default, every launch: ``fragment_span_from`` 0): a view learnt on the device
    within a known span whose larger view has at most 6 planes (3-4, 4-5 or 5-6 of the default layout) takes the
    fragment kernel; a 6-7 or 7-8 plane span, no span, ``fragment_span_planes=0``, or a launch under
    ``fragment_span_from`` weights (2^25: the rule before) keep the one-bit plane kernel."""
    bp = tb.BitPlanes(torch.zeros(8, 64, 64, dtype=torch.int32), torch.zeros(2, 8, 64, dtype=torch.int32), SLICES,
                      128, 1024, 128)  # fmt: skip
    big = dataclasses.replace(bp, out_features=1 << 15)  # 2^25 weights
    auto = tb.SmallConfig()
    assert auto.span_bodies and auto.fragment_span_planes == 6 and auto.fragment_span_from == 0
    for layer in (bp, big):
        assert [tb._fragment_wanted(auto, layer, None, (lo, lo + 1)) for lo in range(1, 6)] == [1, 1, 1, 0, 0]
    assert not tb._fragment_wanted(auto, big, None)  # no span: views on the device stay on the one-bit plane kernel
    before = tb.SmallConfig(fragment_span_planes=5, fragment_span_from=tb.BIG_FRAGMENT_LAUNCH)
    assert [tb._fragment_wanted(before, big, None, (lo, lo + 1)) for lo in range(1, 6)] == [1, 1, 0, 0, 0]
    assert not tb._fragment_wanted(before, bp, None, (1, 2))  # under 2^25 weights
    assert not tb._fragment_wanted(tb.SmallConfig(fragment_span_planes=0), big, None, (1, 2))
    assert tb._fragment_wanted(tb.SmallConfig(fragment_span_planes=8), big, None, (5, 6))
    assert tb._fragment_wanted(auto, big, 3, (1, 2))  # a static view: the static rule (5 planes, capped)


def test_span_uncap_lifts_the_register_cap(monkeypatch):
    """``fragment_linear(span_uncap=)`` (``SmallConfig.fragment_span_uncap``): a view on the device in a launch of
    2^25 weights runs capped at 128 registers, unless its span reaches ``span_uncap`` planes; a static view's cap and
    a smaller launch are untouched. (The launch keywords, recorded on the CPU.)"""
    launched = []

    class Kernel:
        def __getitem__(self, grid):
            return lambda *a, **kw: launched.append(kw)

    monkeypatch.setattr(gf, "frag_gemv_kernel", Kernel())

    def pack(n, k_in):
        g = k_in // 128
        words = torch.zeros(8, g, n // 128, 512, dtype=torch.int32)
        pair = torch.zeros(8, n, g, dtype=torch.float16)
        return gf.FragPlanes(words, pair, pair, SLICES, k_in, n)

    big, small = pack(8192, 4096), pack(4096, 4096)  # 2^25 and 2^24 weights
    kd = torch.full((1,), 2, dtype=torch.int32)

    def maxnreg(fp, k, **kw):
        gf.fragment_linear(torch.zeros(1, fp.in_features, dtype=torch.float16), fp, k, **kw)
        return launched[-1].get("maxnreg")

    assert maxnreg(big, kd, span=(2, 3)) == 128  # capped by default
    assert maxnreg(big, kd, span=(2, 3), span_uncap=5) is None  # a 4-5 plane span
    assert maxnreg(big, kd, span=(1, 2), span_uncap=5) == 128  # 3-4 planes: under 5
    assert maxnreg(big, kd, span_uncap=5) == 128  # no span: every body, capped
    assert maxnreg(small, kd, span=(2, 3)) is None  # under 2^25 weights: never capped
    assert maxnreg(big, 6, cap=5, span_uncap=5) == 128  # a static view of 8 planes: its own cap
    with pytest.raises(ValueError, match="fragment_span_uncap must be an int >= 0"):
        tb.SmallConfig(fragment_span_uncap=-1)


def test_deep_loads_run_capped(monkeypatch):
    """A static view of at most ``DEEP_CAP_PLANES`` planes with 2 groups prefetched or the group 1-2 ahead asked of
    L2 runs capped at 128 registers in any launch (uncapped it takes 148-167: three programs an SM), with its 2 groups
    prefetched; a capped view of more planes keeps at most 1 (it spills with 2); the default launches are untouched.
    (The launch keywords, recorded on the CPU.)"""
    launched = []

    class Kernel:
        def __getitem__(self, grid):
            return lambda *a, **kw: launched.append(kw)

    monkeypatch.setattr(gf, "frag_gemv_kernel", Kernel())
    g = 4096 // 128
    big, small = (gf.FragPlanes(torch.zeros(8, g, n // 128, 512, dtype=torch.int32),
                                torch.zeros(8, n, g, dtype=torch.float16), torch.zeros(8, n, g, dtype=torch.float16),
                                SLICES, 4096, n) for n in (8192, 4096))  # fmt: skip

    def launch(fp, k, **kw):
        gf.fragment_linear(torch.zeros(1, 4096, dtype=torch.float16), fp, k, **kw)
        return launched[-1].get("maxnreg"), launched[-1]["PREFETCH"], launched[-1]["AHEAD"]

    assert gf.DEEP_CAP_PLANES == 4 and [gf.planes_of_views(SLICES)[k - 1] for k in (2, 3)] == [4, 5]
    assert launch(small, 2) == (None, 1, 0)  # the default: one group prefetched, uncapped
    assert launch(small, 2, prefetch=2) == (128, 2, 0)
    assert launch(small, 2, ahead=2)[:2] == (128, 1)
    assert launch(small, 2, ahead=4)[0] is None  # 4 ahead spills under the cap: not capped by this rule
    assert launch(small, 3, prefetch=2) == (None, 2, 0)  # 5 planes: spills under the cap
    assert launch(big, 3, cap=5) == (128, 1, 0)  # the default cap from 5 planes, one group prefetched
    assert launch(big, 3, cap=5, prefetch=2) == (128, 1, 0)
    assert launch(big, 2, cap=3, prefetch=2) == (128, 2, 0)  # capped from 3 planes: 2 groups fit at 4


# ------------------------------------------------------------------------------------------------------- GPU
needs_gpu = pytest.mark.skipif(not GPU, reason="needs a CUDA device (Gluon kernels do not run in the interpreter)")


def _check(y, x, planes, scale, zero, k, bias=None):
    ref = torch_reference(x, planes, scale, zero, SLICES, 128, k, bias=bias, compute_dtype=torch.float64)
    err = ((y.double() - ref.double()).norm() / ref.double().norm()).item()
    assert err < 2e-3, f"relative error {err:.2e} at k={k}"


@needs_gpu
@pytest.mark.parametrize("n_out,n_in", [(256, 1024), (4096, 4096), (1024, 14336), (200, 2048)])
@pytest.mark.parametrize("per_view", [True, False], ids=["per_view", "shared"])
def test_gpu_static_and_device_views(n_out, n_in, per_view, gen):
    planes, scale, zero = make_layer(n_out, n_in, gen, per_view, "cuda")
    bias = torch.randn(n_out, generator=gen).half().cuda()
    x = torch.randn(1, n_in, generator=gen).half().cuda()
    cfg = tb.SmallConfig(fragment=True)
    for k in range(1, len(SLICES) + 1):
        y = tb.bitplane_linear(x, planes, scale, zero, SLICES, 128, k, bias=bias, path="bits", small_config=cfg)
        _check(y, x, planes, scale, zero, k, bias)
        kd = torch.tensor([k], dtype=torch.int32, device="cuda")
        y = tb.bitplane_linear(x, planes, scale, zero, SLICES, 128, kd, bias=bias, path="bits", small_config=cfg)
        _check(y, x, planes, scale, zero, k, bias)


@needs_gpu
@pytest.mark.parametrize("n_out,n_in", [(4096, 4096), (1024, 14336)])
def test_gpu_prologues(n_out, n_in, gen):
    """The fragment kernel with a prologue (the RMS norm before the layer, the gated product) at every static view
    equals the launch fed the model's own norm or product (LLaMA's rounding), one layer and a site of two; so too
    launched with programmatic dependent launch (the activations read after its wait)."""
    from mobiquant.nn.fused import made_input

    planes, scale, zero = make_layer(n_out, n_in, gen, True, "cuda")
    x = (torch.randn(1, n_in, generator=gen) * 4).half().cuda()
    w = (torch.rand(n_in, generator=gen) * 2 + 0.1).half().cuda()
    up = torch.randn(1, n_in, generator=gen).half().cuda()
    cfg = tb.SmallConfig(fragment=True)
    for pro in (("rms_norm", w, 1e-5), ("silu_mul", up)):
        made = made_input(x, pro)
        for k in range(1, len(SLICES) + 1):
            ref = tb.bitplane_linear(made, planes, scale, zero, SLICES, 128, k, path="bits", small_config=cfg)
            for c in (cfg, tb.SmallConfig(fragment=True, pdl=True)):
                y = tb.bitplane_linear(x, planes, scale, zero, SLICES, 128, k, prologue=pro, path="bits",
                                       small_config=c)  # fmt: skip
                err = ((y.double() - ref.double()).norm() / ref.double().norm()).item()
                assert err < 2e-3, (pro[0], k, c.pdl, err)
    bps = [tb.pack_bitplanes(planes, scale, zero, SLICES, 128, n_in)] * 2
    site = tb.site_bitplanes(bps)
    pro = ("rms_norm", w, 1e-5)
    y = tb.bitplane_site_bits(x, site, [2, 2], config=cfg, prologue=pro)
    ref = tb.bitplane_site_bits(made_input(x, pro), site, [2, 2], config=cfg)
    assert ((y.double() - ref.double()).norm() / ref.double().norm()).item() < 2e-3


@needs_gpu
@pytest.mark.parametrize("n_in", [4096, 14336])
def test_gpu_epilogues(n_in, gen):
    """On the GPU, every static view, one split and several: a launch that makes the next RMS norm's parts
    (``EPI`` 1) fills them as :meth:`NextInput.make` does from its outputs (the residual added), and the launch fed
    them (``("rms_scale", sums, eps)``) equals the launch fed the model's own norm; a gate/up site that makes the
    product (``EPI`` 2) fills it as ``make`` does, its outputs unchanged; twice in a row (the pair tickets reset)."""
    from mobiquant.kernels.epilogue import NextInput
    from mobiquant.nn.fused import made_input

    n_out = 4096
    planes, scale, zero = make_layer(n_out, n_in, gen, True, "cuda")
    nxt = make_layer(1024, n_out, gen, True, "cuda")  # the launch after, reading the norm
    x = torch.randn(1, n_in, generator=gen).half().cuda()
    res = (torch.randn(1, n_out, generator=gen) * 4).half().cuda()
    w = (torch.rand(n_out, generator=gen) * 2 + 0.1).half().cuda()
    for cfg in (tb.SmallConfig(fragment=True), tb.SmallConfig(fragment=True, pdl=True)):
        for k in range(1, len(SLICES) + 1):
            ref = tb.bitplane_linear(x, planes, scale, zero, SLICES, 128, k, bias=res.reshape(-1), path="bits",
                                     small_config=cfg)  # fmt: skip
            ni = NextInput.rms_norm(w, 1e-5, ref)
            y = tb.bitplane_linear(x, planes, scale, zero, SLICES, 128, k, bias=res.reshape(-1), path="bits",
                                   small_config=cfg, epilogue=ni)  # fmt: skip
            assert ni.made and torch.equal(y, ref), k
            want = NextInput.rms_norm(w, 1e-5, ref)
            want.make(y)
            torch.testing.assert_close(ni.out, want.out, rtol=0, atol=0)
            torch.testing.assert_close(ni.sums, want.sums, rtol=1e-5, atol=1e-3)
            p2, s2, z2 = nxt
            got = tb.bitplane_linear(ni.out, p2, s2, z2, SLICES, 128, 2, path="bits", small_config=cfg,
                                     prologue=ni.prologue())  # fmt: skip
            ref2 = tb.bitplane_linear(made_input(y, ("rms_norm", w, 1e-5)), p2, s2, z2, SLICES, 128, 2, path="bits",
                                      small_config=cfg)  # fmt: skip
            err = ((got.double() - ref2.double()).norm() / ref2.double().norm()).item()
            assert err < 2e-3, (k, cfg.pdl, err)
    up = make_layer(n_out, n_in, gen, True, "cuda")
    site = tb.site_bitplanes([tb.pack_bitplanes(*layer, SLICES, 128, n_in) for layer in ((planes, scale, zero), up)])
    cfg = tb.SmallConfig(fragment=True)
    for k in (1, 3, len(SLICES)):
        ref = tb.bitplane_site_bits(x, site, [k, k], config=cfg)
        for _ in range(2):
            prod = NextInput.silu_mul(x, n_out)
            y = tb.bitplane_site_bits(x, site, [k, k], config=cfg, epilogue=prod)
            assert prod.made and torch.equal(y, ref), k
            want = NextInput.silu_mul(x, n_out)
            want.make(y)
            torch.testing.assert_close(prod.out, want.out, rtol=2e-3, atol=1e-3)  # exp's last bits: an fp16 ulp


@needs_gpu
def test_gpu_routed_and_site(gen):
    n_in = 4096
    layers = [make_layer(n, n_in, gen, True, "cuda") for n in (1024, 512, 512)]
    x = torch.randn(1, n_in, generator=gen).half().cuda()
    cfg = tb.SmallConfig(fragment=True)
    values = torch.sort(torch.rand(len(SLICES) - 1, generator=gen), descending=True).values.cuda()
    tau = torch.tensor([0.5], device="cuda")
    k_ref = int(1 + (values > 0.5).sum())
    planes, scale, zero = layers[0]
    y = tb.bitplane_linear(x, planes, scale, zero, SLICES, 128, tb.RoutedK(values, tau), path="bits", small_config=cfg)
    _check(y, x, planes, scale, zero, k_ref)
    parts = [tb.pack_bitplanes(p, s, z, SLICES, 128, n_in) for p, s, z in layers]
    site = tb.site_bitplanes(parts)
    y = tb.bitplane_site_bits(x, site, [3, 3, 3], config=cfg)
    for (p, s, z), c, n in zip(layers, site.cols, site.outs, strict=True):
        _check(y[:, c : c + n], x, p, s, z, 3)


@needs_gpu
def test_gpu_routed_site_spans(gen):
    """``SmallConfig.fragment_site_spans`` (the default): a routed site of three layers (one router's gate values, a
    threshold each, so each layer its own view) on the fragment kernel, within spans of 3-4, 4-5 and 5-6 planes; and
    one ``k`` tensor for the whole site; each layer's columns against its own view's reference; with
    ``fragment_early_l2`` or ``fragment_span_uncap`` the same output."""
    n_in = 4096
    layers = [make_layer(n, n_in, gen, True, "cuda") for n in (8192, 2048, 2048)]  # 2^25 weights in all
    x = torch.randn(1, n_in, generator=gen).half().cuda()
    site = tb.site_bitplanes([tb.pack_bitplanes(p, s, z, SLICES, 128, n_in) for p, s, z in layers])
    cfg = tb.SmallConfig()
    values = torch.tensor([0.9, 0.7, 0.5, 0.3, 0.1], device="cuda", dtype=torch.float16)
    for lo, taus in ((1, (0.8, 0.95, 0.8)), (2, (0.6, 0.8, 0.6)), (3, (0.4, 0.6, 0.4))):  # views lo + 1, lo, lo + 1
        ks = [tb.RoutedK(values, torch.tensor([t], device="cuda", dtype=torch.float16)) for t in taus]
        want = [1 + int((values > t).sum()) for t in taus]
        assert sorted(set(want)) == [lo, lo + 1]
        y = tb.bitplane_site_bits(x, site, ks, config=cfg, span=(lo, lo + 1))
        for (p, s, z), c, n, k in zip(layers, site.cols, site.outs, want, strict=True):
            _check(y[:, c : c + n], x, p, s, z, k)
    kd = torch.tensor([2], dtype=torch.int32, device="cuda")
    y = tb.bitplane_site_bits(x, site, [kd, kd, kd], config=cfg, span=(1, 2))
    for (p, s, z), c, n in zip(layers, site.cols, site.outs, strict=True):
        _check(y[:, c : c + n], x, p, s, z, 2)
    loads = (dict(fragment_ahead=2), dict(fragment_prefetch=0), dict(fragment_prefetch=0, fragment_ahead=4))
    for extra in (dict(fragment_early_l2=2), dict(fragment_span_uncap=5), *loads):  # the same results
        ks = [tb.RoutedK(values, torch.tensor([t], device="cuda", dtype=torch.float16)) for t in (0.6, 0.8, 0.6)]
        y2 = tb.bitplane_site_bits(x, site, ks, config=tb.SmallConfig(**extra), span=(2, 3))
        y1 = tb.bitplane_site_bits(x, site, ks, config=cfg, span=(2, 3))
        assert torch.equal(y1, y2), extra


@needs_gpu
@pytest.mark.parametrize("loads", [dict(fragment_ahead=2), dict(fragment_prefetch=0), dict(fragment_prefetch=2)])
def test_gpu_fragment_loads(loads, gen):
    """``SmallConfig.fragment_ahead`` / ``fragment_prefetch``: every static view of a one-layer launch (one large
    enough for the register cap from 5 planes) and of a site launch exact, and a view on the device in a span."""
    cfg = tb.SmallConfig(fragment=True, **loads)
    n_in = 4096
    planes, scale, zero = make_layer(8192, n_in, gen, True, "cuda")  # 2^25 weights: capped from 5 planes
    x = torch.randn(1, n_in, generator=gen).half().cuda()
    for k in range(1, len(SLICES) + 1):
        y = tb.bitplane_linear(x, planes, scale, zero, SLICES, 128, k, path="bits", small_config=cfg)
        _check(y, x, planes, scale, zero, k)
    bp = tb.pack_bitplanes(planes, scale, zero, SLICES, 128, n_in)
    for lo in (1, 3):
        kd = torch.tensor([lo + 1], dtype=torch.int32, device="cuda")
        _check(tb.bitplane_linear_bits(x, bp, kd, config=cfg, span=(lo, lo + 1)), x, planes, scale, zero, lo + 1)
    layers = [make_layer(n, n_in, gen, True, "cuda") for n in (1024, 512, 512)]
    site = tb.site_bitplanes([tb.pack_bitplanes(p, s, z, SLICES, 128, n_in) for p, s, z in layers])
    for k in (2, 4):
        y = tb.bitplane_site_bits(x, site, [k, k, k], config=cfg)
        for (p, s, z), c, n in zip(layers, site.cols, site.outs, strict=True):
            _check(y[:, c : c + n], x, p, s, z, k)


@needs_gpu
@pytest.mark.parametrize("policy", ["adjacent", "free"])
def test_gpu_router_partials_finished_in_the_launch(policy, gen):
    """A routed launch that finishes its router from a router launch without its tail (``router_partials``) reads
    the views the router's own gate values give, at thresholds between them: equal outputs, one layer and a site of
    three layers with a threshold each."""
    from mobiquant.kernels.triton_router import router_partials

    n_in, hidden, r = 4096, 64, len(SLICES) - 1
    # scores about 4 apart (b2) with a token's part on top: the free policy's running minimum then falls at each slice
    w = (torch.randn(hidden, n_in, generator=gen) / 64, torch.randn(hidden, generator=gen),
         torch.randn(r, hidden, generator=gen) / 10, torch.arange(r, 0, -1, dtype=torch.float32) * 4)  # fmt: skip
    w = tuple(t.cuda() for t in w)
    x = torch.randn(1, n_in, generator=gen).half().cuda()
    _, p = router_partials(x, w, policy)
    v = p.values()
    vs = v[0].sort(descending=True).values
    assert bool((vs[:-1] - vs[1:] > 1e-3).all()), vs
    taus = [float(vs[i] + vs[i + 1]) / 2 for i in range(r - 1)]  # k = 2 .. K-1
    planes, scale, zero = make_layer(1024, n_in, gen, True, "cuda")
    fp = gf.fragment_of(tb.pack_bitplanes(planes, scale, zero, SLICES, 128, n_in))
    for t in taus:
        tau = torch.tensor([t], device="cuda")
        k = int(1 + (v > tau).sum())
        span = (max(1, k - 1), k) if k > 1 else (1, 2)
        a = gf.fragment_linear(x, fp, None, routed=(p, tau), span=span, early_l2=1)
        b = gf.fragment_linear(x, fp, None, routed=(v, tau), span=span, early_l2=1)
        assert torch.equal(a, b), (t, k)
    layers = [make_layer(n, n_in, gen, True, "cuda") for n in (1024, 512, 512)]
    site = tb.site_bitplanes([tb.pack_bitplanes(pl, s, z, SLICES, 128, n_in) for pl, s, z in layers])
    fs = gf.fragment_of(site.planes)
    starts = tuple(c // gf.BLOCK_N for c in site.cols[1:])
    three = [torch.tensor([t], device="cuda") for t in taus[:3]]
    a = gf.fragment_linear(x, fs, None, routed=(p, three), seg_starts=starts, span=(2, 4))
    b = gf.fragment_linear(x, fs, None, routed=(v, three), seg_starts=starts, span=(2, 4))
    assert torch.equal(a, b)


@needs_gpu
def test_gpu_device_views_in_a_span(gen):
    """A view read or counted on the device with a span of two views (``span``): those two bodies alone, each
    view of the span exact, a view outside it clamped into it."""
    n_in = 4096
    planes, scale, zero = make_layer(1024, n_in, gen, True, "cuda")
    x = torch.randn(1, n_in, generator=gen).half().cuda()
    bp = tb.pack_bitplanes(planes, scale, zero, SLICES, 128, n_in)
    cfg = tb.SmallConfig(fragment=True)
    for lo in range(1, len(SLICES)):
        for k in (lo, lo + 1):
            kd = torch.tensor([k], dtype=torch.int32, device="cuda")
            _check(tb.bitplane_linear_bits(x, bp, kd, config=cfg, span=(lo, lo + 1)), x, planes, scale, zero, k)
    kd = torch.tensor([1], dtype=torch.int32, device="cuda")
    _check(tb.bitplane_linear_bits(x, bp, kd, config=cfg, span=(3, 4)), x, planes, scale, zero, 3)
    values = torch.tensor([0.9, 0.7, 0.5, 0.3, 0.1], device="cuda")
    rk = tb.RoutedK(values, torch.tensor([0.6], device="cuda"))  # view 3
    _check(tb.bitplane_linear_bits(x, bp, rk, config=cfg, span=(2, 3)), x, planes, scale, zero, 3)


@needs_gpu
@pytest.mark.parametrize("tma", [-1, -2])
def test_gpu_static_views_by_tma(tma, gen):
    """``SmallConfig(fragment_tma=...)``: static views whose words come by TMA, as exact as through registers, on a
    one-layer launch (K split by ``tma_config``) and on a site launch of three layers."""
    cfg = tb.SmallConfig(fragment=True, fragment_tma=tma)
    n_in = 4096
    planes, scale, zero = make_layer(1024, n_in, gen, True, "cuda")
    bias = torch.randn(1024, generator=gen).half().cuda()
    x = torch.randn(1, n_in, generator=gen).half().cuda()
    for k in range(1, len(SLICES) + 1):
        y = tb.bitplane_linear(x, planes, scale, zero, SLICES, 128, k, bias=bias, path="bits", small_config=cfg)
        _check(y, x, planes, scale, zero, k, bias)
    layers = [make_layer(n, n_in, gen, True, "cuda") for n in (1024, 512, 512)]
    site = tb.site_bitplanes([tb.pack_bitplanes(p, s, z, SLICES, 128, n_in) for p, s, z in layers])
    y = tb.bitplane_site_bits(x, site, [2, 2, 2], config=cfg)
    for (p, s, z), c, n in zip(layers, site.cols, site.outs, strict=True):
        _check(y[:, c : c + n], x, p, s, z, 2)


@needs_gpu
def test_gpu_pdl_launches_in_a_chain(gen):
    """``SmallConfig(pdl=True)`` on the fragment kernel: launches in a row where each reads the one before's output
    (static views, a view read on the device written by the kernel before, a site) are as exact as without."""
    if torch.cuda.get_device_capability()[0] < 9:
        pytest.skip("programmatic dependent launch needs compute capability 9.0")
    n = 4096
    layers = [make_layer(n, n, gen, True, "cuda") for _ in range(3)]
    cfg = tb.SmallConfig(fragment=True, pdl=True)
    x = (torch.randn(1, n, generator=gen) * 0.05).half().cuda()  # two layers' outputs stay well inside fp16
    for k in range(1, len(SLICES) + 1):
        ys, h = [], x
        for p, s, z in layers[:2]:  # the second launch reads the first one's output, nothing between them
            h = tb.bitplane_linear(h, p, s, z, SLICES, 128, k, path="bits", small_config=cfg)
            ys.append(h)
        torch.cuda.synchronize()
        h = x
        for (p, s, z), y in zip(layers, ys, strict=False):
            _check(y, h, p, s, z, k)
            h = y
    kd = torch.zeros(1, dtype=torch.int32, device="cuda")
    p, s, z = layers[0]
    for k in range(1, len(SLICES) + 1):
        kd.fill_(k)  # written by a kernel just before the launch that reads it
        y = tb.bitplane_linear(x, p, s, z, SLICES, 128, kd, path="bits", small_config=cfg)
        _check(y, x, p, s, z, k)
    site = tb.site_bitplanes([tb.pack_bitplanes(p, s, z, SLICES, 128, n) for p, s, z in layers])
    y = tb.bitplane_site_bits(x, site, [2, 2, 2], config=cfg)
    for (p, s, z), c, m in zip(layers, site.cols, site.outs, strict=True):
        _check(y[:, c : c + m], x, p, s, z, 2)


@needs_gpu
def test_gpu_capped_static_views(gen):
    """``fragment_cap``: on a launch of 2^25 weights the static views of 5-8 planes run on the fragment kernel at
    most 128 registers (6 planes with one group prefetched instead of two), as exact as uncapped."""
    n_out, n_in = 8192, 4096
    planes, scale, zero = make_layer(n_out, n_in, gen, True, "cuda")
    x = torch.randn(1, n_in, generator=gen).half().cuda()
    cfg = tb.SmallConfig(fragment_cap=5)
    for k in range(3, len(SLICES) + 1):  # 5-8 planes
        y = tb.bitplane_linear(x, planes, scale, zero, SLICES, 128, k, path="bits", small_config=cfg)
        _check(y, x, planes, scale, zero, k)

#!/usr/bin/env python
"""Offline SASS counts of the one-token kernels: compile for sm_90 on a machine without a GPU and count.

The launch is recorded from the library's own host code (the same arguments, constexprs and 16-divisibility a
real launch on 4096-row LLaMA shapes gets), compiled with ``triton.compile`` for ``GPUTarget("cuda", 90, 32)``
(Triton's bundled ptxas), disassembled with its bundled ``cuobjdump``; every loop (a backward branch) is
listed with its instruction count by opcode, and the registers, stack and shared memory of the kernel.
'per code' divides a loop's count by the codes one thread handles per iteration (the group loop of the
one-bit plane kernel; the chunk loop of the field kernel). This is the feedback loop of benchmarks/NOTES.md
(versions 5, 6 and 10) while no GPU is at hand. Uses Triton internals (written against triton 3.9).

    python benchmarks/offline_sass.py --slices 3,1,1,1,1,1 --k 2          # one-bit plane kernel, 4-bit view
    python benchmarks/offline_sass.py --slices 3,1,1,1,1,1 --device-k     # k read on the device: every body
    python benchmarks/offline_sass.py --device-k --span 2,3 --whole-k --preload  # two views' bodies, preloaded
    python benchmarks/offline_sass.py --slices 2,2,2,2 --k 1 --fields     # version 6's field kernel
    python benchmarks/offline_sass.py --routed --site 3                   # q, k and v in one launch, k counted
    python benchmarks/offline_sass.py --routed --site 3 --router-in-launch  # ... and their router in it too
    python benchmarks/offline_sass.py --k 2 --whole-k --in-features 576    # a row block over all of K at once
    python benchmarks/offline_sass.py --k 2 --n 14336 --stages 3           # the group loop pipelined (cp.async)
    python benchmarks/offline_sass.py --tokens 6 --device-k                # the small-batch kernel, 6 tokens
    python benchmarks/offline_sass.py --router rms_norm --router-tiling 16,4,256 --in-features 4096  # router kernel
    python benchmarks/offline_sass.py --dequant bits --k 6                 # a prompt's dequantize pass (or planes)
"""

from __future__ import annotations

import argparse
import collections
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

os.environ.pop("TRITON_INTERPRET", None)  # compile, do not interpret

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource, make_backend  # noqa: E402
from triton.runtime.jit import create_function_from_signature  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))
from mobiquant.kernels import triton_bitplane as tb  # noqa: E402
from mobiquant.quant.packing import pack_codes  # noqa: E402

TARGET = GPUTarget("cuda", 90, 32)
BIN = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
LINE = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)([^;]*);")


def _recorded(module, name, call, skip=()):
    """The (kernel, grid, args, kwargs) of the last launch ``call()`` makes of ``module.<name>``, nothing launched;
    the launches of ``module.<skip...>`` are dropped."""
    seen = []
    real = {n: getattr(module, n) for n in (name, *skip)}

    class Rec:
        def __init__(self, keep):
            self.keep = keep

        def __getitem__(self, grid):
            return lambda *a, **k: seen.append((real[name], grid, a, k)) if self.keep else None

    for n in real:
        setattr(module, n, Rec(n == name))
    try:
        call()
    finally:
        for n, fn in real.items():
            setattr(module, n, fn)
    return seen[-1]


def record(kernel_name, call):
    """The (kernel, args, kwargs) of the launch ``call()`` makes of ``tb.<kernel_name>``; the small launch that may
    follow it (``_bits_reduce_kernel``, ``SmallConfig.reduce_launch``) is skipped (its tensors are on the CPU)."""
    return _recorded(tb, kernel_name, call, skip=("_bits_reduce_kernel",))


def router_launch(prologue, tiling, d, pdl, early_l2=False):
    """The (kernel, grid, args, kwargs) of one token's fused router launch (``triton_router``) with ``prologue``
    ('none', 'rms_norm', 'silu_mul') and ``tiling`` (hidden units a program, warps, columns a program), width ``d``,
    64 hidden units, 5 outputs."""
    from mobiquant.kernels import triton_router as tr

    hb, nw, cols = tiling
    x = torch.zeros(1, d, dtype=torch.float16)
    router = (torch.zeros(64, d), torch.zeros(64), torch.zeros(5, 64), torch.zeros(5))
    tau = torch.zeros(1)
    kw = dict(hidden_per_program=hb, num_warps=nw, cols_per_program=cols, pdl=pdl, early_l2=early_l2)
    if prologue == "none":
        return _recorded(tr, "_router_kernel", lambda: tr.fused_router(x, *router, tau, "free", **kw))
    pro = ("rms_norm", torch.ones(d, dtype=torch.float16), 1e-5) if prologue == "rms_norm" else (
        "silu_mul", torch.zeros(1, d, dtype=torch.float16))  # fmt: skip
    return _recorded(tr, "_router_kernel", lambda: tr.fused_input_router(x, pro, router, tau, "free", **kw))


def compile_sm90(fn, args, kwargs, source=ASTSource):
    """``fn`` compiled for sm_90 as a launch with ``args``, ``kwargs`` would compile it (``source``: the AST source
    class, e.g. Gluon's ``GluonASTSource``)."""
    backend = make_backend(TARGET)
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    bound, spec, opts = binder(*args, **kwargs)
    options, signature, constexprs, attrs = fn._pack_args(backend, kwargs, bound, spec, opts)
    return triton.compile(source(fn, signature, constexprs, attrs), target=TARGET, options=options.__dict__)


def sass_and_resources(ck):
    with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
        f.write(ck.asm["cubin"])
        path = f.name
    try:
        sass = subprocess.run([str(BIN / "cuobjdump"), "-sass", path], capture_output=True, text=True).stdout
        res = subprocess.run(
            [str(BIN / "cuobjdump"), "--dump-resource-usage", path], capture_output=True, text=True
        ).stdout
    finally:
        os.unlink(path)
    return sass, res


def local_in_loops(sass) -> int:
    """The local-memory loads and stores (a spill's ``LDL`` / ``STL``) inside a loop of the kernel (the range of a
    backward branch): a spill outside every loop costs a few L1 accesses a program, one inside costs every pass."""
    ins = [(int(m.group(1), 16), m.group(3), m.group(4)) for m in LINE.finditer(sass)]
    loops = []
    for addr, op, rest in ins:
        t = re.search(r"0x([0-9a-f]+)", rest) if op.startswith("BRA") else None
        if t is not None and int(t.group(1), 16) < addr:
            loops.append((int(t.group(1), 16), addr))
    return sum(op.startswith(("LDL", "STL")) and any(lo <= a <= hi for lo, hi in loops) for a, op, _ in ins)


def report(sass, res, codes_per_iter, label) -> list[int]:
    """Prints the kernel's resources and each loop's instructions by opcode; returns the loops' sizes."""
    sizes: list[int] = []
    ins = [(int(m.group(1), 16), m.group(3), m.group(4)) for m in LINE.finditer(sass)]
    regs = re.search(r"REG:(\d+)", res).group(1)
    stack = re.search(r"STACK:(\d+)", res).group(1)
    shared = re.search(r"SHARED:(\d+)", res).group(1)
    print(f"{label}: {len(ins)} instructions, {regs} registers, stack {stack} B, shared {shared} B")
    loops = 0
    for addr, op, rest in ins:
        t = re.search(r"0x([0-9a-f]+)", rest) if op.startswith("BRA") else None
        if t is None or int(t.group(1), 16) >= addr:
            continue
        lo, hi = int(t.group(1), 16), addr
        c = collections.Counter()
        for a, o, _ in ins:
            if lo <= a <= hi:
                c[o.split(".")[0]] += 1
                if o.startswith(("LDG", "LDS", "STS", "BAR", "LDL", "STL")):
                    c[o] += 1
        n = sum(v for k, v in c.items() if "." not in k)
        top = ", ".join(f"{k} {v}" for k, v in c.most_common(14))
        print(f"  loop {lo:#x}-{hi:#x}: {n} instructions, {n / codes_per_iter:.2f} per code; {top}")
        sizes.append(n)
        loops += 1
    if not loops:  # straight-line code (the dequantize passes): the whole kernel, per code of a thread
        c = collections.Counter(o.split(".")[0] for _, o, _ in ins)
        top = ", ".join(f"{k} {v}" for k, v in c.most_common(14))
        print(f"  no loop: {len(ins) / codes_per_iter:.2f} instructions per code; {top}")
    return sizes


def fragment_report(a) -> int:
    """The fragment kernel's loop at the static view ``a.k`` of ``a.slices`` for an ``a.n x a.in_features`` layer, and
    what its instructions cost the launch if the H100's schedulers issued nothing else: one warp instruction a clock
    on each of 132 x 4 schedulers at 1.98 GHz, beside the layer's bytes (the view's bits plus its step and zero point,
    4 bytes a group of 128) at 3000 GB/s of copy (an estimate: it leaves out latency and the loop's stalls)."""
    from triton.experimental.gluon._runtime import GluonASTSource

    from mobiquant.kernels import gluon_fragment as gf

    planes = tb.planes_of_views(tuple(int(b) for b in a.slices.split(",")))[a.k - 1]
    N, K = a.n, a.in_features
    words = torch.zeros(planes, K // gf.GROUP, -(-N // gf.BLOCK_N), gf.BLOCK_N * gf.GROUP // 32, dtype=torch.int32)
    sc = torch.zeros(N, K // gf.GROUP, dtype=torch.float16)
    x, out = torch.zeros(K, dtype=torch.float16), torch.zeros(N)
    args, kw = gf._launch_args(
        words, sc, sc, x, out, splits=a.fragment, planes=planes, prefetch=a.frag_prefetch, ahead=a.ahead
    )
    sass, res = sass_and_resources(compile_sm90(gf.frag_gemv_kernel, args, kw, source=GluonASTSource))
    per_warp = gf.BLOCK_N * gf.BATCH_GROUPS * gf.GROUP // 4  # a warp's weights an iteration (4 warps a program)
    sizes = report(sass, res, per_warp / 32, f"frag_gemv_kernel {planes} planes, {N} x {K}, {a.fragment} splits")
    per_weight = max(sizes) / per_warp  # warp instructions a weight, in the loop alone
    issue_us = N * K * per_weight / (132 * 4 * 1.98e9) * 1e6
    copy_us = N * K * (planes + 32 / gf.GROUP) / 8 / 3000e9 * 1e6
    print(f"  estimate: {per_weight:.4f} warp instructions a weight; issue {issue_us:.2f} us against {copy_us:.2f} us "
          f"of copy for the layer's bytes ({issue_us / copy_us:.0%})")  # fmt: skip
    return 0


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--slices", default="3,1,1,1,1,1")
    ap.add_argument("--k", type=int, default=1, help="the view (ignored with --device-k)")
    ap.add_argument("--device-k", action="store_true", help="k read on the device (one body per view)")
    ap.add_argument("--fields", action="store_true", help="version 6's field kernel instead (one slice width)")
    ap.add_argument(
        "--tokens", type=int, default=1, help="2-16: the small-batch kernel (path 'small') for this many tokens instead"
    )
    ap.add_argument("--path", choices=("small", "tile"), default="small", help="with --tokens: the kernel")
    ap.add_argument("--n", type=int, default=4096, help="rows")
    ap.add_argument("--in-features", type=int, default=4096)
    ap.add_argument("--block-n", type=int, default=None)
    ap.add_argument("--block-k", type=int, default=None)
    ap.add_argument("--warps", type=int, default=4)
    ap.add_argument("--waves", type=int, default=None)
    ap.add_argument("--prefetch", action="store_true")
    ap.add_argument(
        "--whole-k",
        action="store_true",
        help="one program per row block over all of K (whole_k=True); without it the stream-K grid (whole_k=False), "
        "which the library's default takes only above 4096 inputs or 8192 rows",
    )
    ap.add_argument("--stages", type=int, default=None, help="num_stages of the stream-K group loop (stages)")
    ap.add_argument("--pdl", action="store_true", help="programmatic dependent launch (pdl): where the wait sits")
    ap.add_argument("--l2-prefetch", action="store_true", help="stream-K: the range asked of L2 first (l2_prefetch)")
    ap.add_argument("--ahead", type=int, default=0, help="stream-K, --fragment: the group this far ahead asked of L2")
    ap.add_argument(
        "--routed", action="store_true", help="k counted in the kernel from gate values and a threshold (RoutedK)"
    )
    ap.add_argument("--site", type=int, default=1, help="layers of one launch (patching.fuse_sites: 2 or 3)")
    ap.add_argument("--span", default=None, help="with --device-k or --routed: the views k may be, e.g. 2,3 (span)")
    ap.add_argument(
        "--preload", action="store_true", help="whole-K, k on the device: the planes every body reads loaded first"
    )
    ap.add_argument(
        "--router-in-launch", action="store_true", help="with --routed: the router runs in the launch (64 hidden)"
    )
    ap.add_argument(
        "--router",
        choices=("none", "rms_norm", "silu_mul"),
        default=None,
        help="instead: the fused router kernel for one token with this prologue (width --in-features, 64 hidden)",
    )
    ap.add_argument("--router-tiling", default="1,4,0", help="with --router: hidden units a program, warps, columns")
    ap.add_argument(
        "--dequant",
        choices=("planes", "bits"),
        default=None,
        help="the dequantize pass of view --k: from the planes (dequantize) or one-bit planes (dequantize_bits)",
    )
    ap.add_argument(
        "--fragment",
        type=int,
        default=None,
        metavar="SPLITS",
        help="instead: the fragment-native Gluon kernel (gluon_fragment.frag_gemv_kernel) at the static view --k, "
        "--n rows, --in-features inputs, K split in this many programs a row block; with an issue estimate",
    )
    ap.add_argument(
        "--frag-prefetch", type=int, default=1, help="with --fragment: groups loaded into registers ahead (0-2)"
    )
    ap.add_argument("--save", default=None, help="write the SASS, TTGIR and PTX to this path prefix")
    a = ap.parse_args(argv)
    if a.fragment is not None:
        return fragment_report(a)
    if a.router:
        tiling = tuple(int(v) for v in a.router_tiling.split(","))
        fn, grid, args, kw = router_launch(a.router, tiling, a.in_features, a.pdl)
        sass, res = sass_and_resources(compile_sm90(fn, args, kw))
        report(sass, res, 1, f"_router_kernel {a.router} d={a.in_features} tiling {tiling} grid {grid}")
        return 0
    bits = tuple(int(b) for b in a.slices.split(","))
    N, K, group = a.n, a.in_features, 128
    tb._num_sms = lambda device: 132
    k = a.k
    if a.device_k:
        tb._host_k_range = lambda k_t: None
        k = torch.tensor([1], dtype=torch.int32)
    x = torch.zeros(max(a.tokens, 1), K, dtype=torch.float16)
    if a.dequant == "planes":
        planes = [pack_codes(torch.zeros(N, K, dtype=torch.int32), b) for b in bits]
        scale = torch.zeros(N, -(-K // group), dtype=torch.float16)
        name = "_bp_dequant_kernel"
        fn, grid, args, kw = record(name, lambda: tb.dequantize(planes, scale, scale, bits, group, k, K))
        codes = kw["BLOCK_N"] * kw["BLOCK_K"] / (32 * 4)  # a thread's weights
    elif a.dequant == "bits":
        G, NPAD = -(-K // group), -(-N // 128) * 128
        words = torch.zeros(sum(bits), G * group // 16, NPAD // 2, dtype=torch.int32)
        bp = tb.BitPlanes(words, torch.zeros(2, G, NPAD // 2, dtype=torch.int32), bits, group, K, N)
        name = "_bits_dequant_kernel"
        fn, grid, args, kw = record(name, lambda: tb.dequantize_bits(bp, k, num_warps=a.warps))
        codes = 32 * kw["BR"] * kw["BW"] / (32 * a.warps)
    elif a.tokens > 1:
        if a.device_k:
            k = torch.ones(a.tokens, dtype=torch.int32)
        planes = [pack_codes(torch.zeros(N, K, dtype=torch.int32), b) for b in bits]
        scale = torch.zeros(N, -(-K // group), dtype=torch.float16)
        name = "_bp_small_kernel" if a.path == "small" else "_bp_tile_kernel"
        fn, grid, args, kw = record(
            name, lambda: tb.bitplane_linear(x, planes, scale, scale, bits, group, k, path=a.path)
        )
        codes = kw["BLOCK_N"] * kw["BLOCK_K"] / (32 * kw["num_warps"])  # a thread's codes a chunk, every token
    elif a.fields:
        planes = [torch.zeros(N, K // (32 // b), dtype=torch.int32) for b in bits]
        scale = torch.zeros(N, K // group, dtype=torch.float16)
        cfg = tb.SmallConfig(fields=True, block_n=a.block_n, block_k=a.block_k, num_warps=a.warps)
        name = "_bp_gemv_fields_kernel"
        fn, grid, args, kw = record(
            name, lambda: tb.bitplane_linear(x, planes, scale, scale, bits, group, k, small_config=cfg)
        )
        codes = kw["BLOCK_N"] * kw["BLOCK_K"] / (32 * a.warps)
    else:
        T = sum(bits)
        # padded as pack_bitplanes pads: whole groups of columns, rows to a multiple of 128
        G, NPAD = -(-K // group), -(-N // 128) * 128
        words = torch.zeros(T, G * group // 16, NPAD // 2, dtype=torch.int32)
        sz = torch.zeros(2, G, NPAD // 2, dtype=torch.int32)
        bp = tb.BitPlanes(words, sz, bits, group, K, N)
        cfg = tb.SmallConfig(
            bitplanes=True,
            block_n=a.block_n,
            block_k=a.block_k,
            num_warps=a.warps,
            waves=a.waves,
            prefetch=a.prefetch,
            whole_k=a.whole_k or False,
            stages=a.stages,
            pdl=a.pdl,
            l2_prefetch=a.l2_prefetch,
            ahead=a.ahead,
            preload=a.preload,
        )
        span = None if a.span is None else tuple(int(v) for v in a.span.split(","))
        name = "_bp_gemv_bits_kernel"
        ks = [k] * a.site
        if a.routed:
            tb._host_routed_k = lambda rk: None
            values = torch.zeros(1, len(bits) - 1)
            router = None
            if a.router_in_launch:
                r = len(bits) - 1
                router = tb.InLaunchRouter(
                    torch.zeros(64, K), torch.zeros(64), torch.zeros(r, 64), torch.zeros(r), False
                )
            ks = [tb.RoutedK(values, torch.zeros(()), router) for _ in range(a.site)]
        if a.site > 1:
            site = tb.site_bitplanes([bp] * a.site)
            fn, grid, args, kw = record(name, lambda: tb.bitplane_site_bits(x, site, ks, config=cfg, span=span))
        else:
            fn, grid, args, kw = record(name, lambda: tb.bitplane_linear_bits(x, bp, ks[0], config=cfg, span=span))
        # per thread and group (whole_k: per thread and launch, the codes of all of K)
        codes = 2 * kw["BN2"] * (kw["WKP"] * 16 if a.whole_k else group) / (32 * a.warps)
    ck = compile_sm90(fn, args, kw)
    sass, res = sass_and_resources(ck)
    if a.save:
        Path(a.save + ".sass").write_text(sass)
        Path(a.save + ".ttgir").write_text(ck.asm["ttgir"])
        Path(a.save + ".ptx").write_text(ck.asm["ptx"])
    how = "k counted from gate values" if a.routed else ("k on the device" if a.device_k else f"k={a.k}")
    how += ", the router in the launch" * a.router_in_launch
    how += f", views {a.span}" * (a.span is not None) + ", preloaded" * a.preload
    label = f"{name} slices {a.slices} {how}, {a.site} layer(s), {a.tokens} token(s), grid {grid}"
    report(sass, res, codes, label)
    print(f"  shared memory at launch (static + the pipeliner's buffers): {ck.metadata.shared} B")
    return 0


if __name__ == "__main__":
    sys.exit(main())

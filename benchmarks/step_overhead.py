"""Where a decode step of the package's 8B-shaped model spends its time outside the linears (GPU).

The 4 LLaMA-3-8B-shaped layers of ``decode_bench.py``'s package rows (vocabulary 1024), fp16 and quantized by the
package (one launch per site, fused inputs: ``task=decode``'s defaults): the kernels of one eager decode step
(``e2e_decode.step_profile``: count and GPU time per kernel, the top 25), then the wall time per token of
``mobiquant.tasks.decode.generate`` with the step captured as one CUDA graph (``cuda_graph='graph'``) and with its
code between the package's kernels compiled by Inductor before the capture (``'compile'``), in the same run.

    python3 benchmarks/step_overhead.py [--layers 4] [--smol] [--new-tokens 64] [--top 25] [--slices 3,1,1,1,1,1]
        [--views 1 2 6] [--budgets 3 4] [--census {off,compile,graph}] [--census-only] [--census-budgets 4]
        [--policy {free,adjacent}] [--placement {site,linear,sublayer,attention,block}]

The quantized rows run with fused inputs and again without them (Inductor then fuses the norms itself; the routers
of the routed rows launch on their own).
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from decode_bench import PLACEMENTS  # noqa: E402


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=None, help="layers (default: 4 of the 8B shapes, 30 with --smol)")
    ap.add_argument(
        "--smol",
        action="store_true",
        help="SmolLM2-135M's shapes (576 wide, MLP 1536, 9 heads, 3 KV heads, vocabulary 49152), random weights",
    )
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--top", type=int, default=25, help="kernels listed, by GPU time")
    ap.add_argument("--slices", default="3,1,1,1,1,1", help="slice layout of the quantized model (default layout)")
    ap.add_argument("--views", type=int, nargs="*", default=[1, 2, 6], help="static views timed (k)")
    ap.add_argument("--budgets", type=float, nargs="*", default=[3.0, 4.0], help="routed budgets timed")
    ap.add_argument(
        "--census",
        default="off",
        choices=("off", "compile", "graph"),
        help="the kernel census's step: eager (off) or the captured step's replays; with a captured one the routed "
        "steps of --census-budgets too",
    )
    ap.add_argument("--census-only", action="store_true", help="the kernel census alone, no timed rows")
    ap.add_argument(
        "--census-budgets",
        type=float,
        nargs="*",
        default=[4.0],
        help="routed budgets of the census with a captured step (3.5 4.5: where the adjacent policy's tokens decide)",
    )
    ap.add_argument(
        "--placement",
        default="site",
        choices=PLACEMENTS,
        help="the routers' placement (MoBiConfig.router_placement)",
    )
    ap.add_argument(
        "--policy",
        default="free",
        choices=("free", "adjacent"),
        help="the routers' gate policy (adjacent: quant=mobiquant's; budgets whose thresholds lie between bands run "
        "static views)",
    )
    ap.add_argument(
        "--lean-step",
        action="store_true",
        help="the census's fp16 and quantized steps with the lean step (patching.lean_step: each layer's attention "
        "in one launch, its residual adds in the o and down launches)",
    )
    ap.add_argument(
        "--lean-prologues",
        action="store_true",
        help="with --lean-step, the norms and gated products made in the launches that read them or by the launch "
        "before (lean_step(prologues=True), decode.lean_prologues: the package's decode default)",
    )
    ap.add_argument(
        "--kernels",
        nargs="*",
        default=[""],
        metavar="FIELD=VALUE,...",
        help="the quantized model's census once per entry under that SmallConfig (fields of "
        "mobiquant.kernels.triton_bitplane.SmallConfig, values as YAML reads them, e.g. router_tail=true; '' the "
        "defaults): two entries put two configurations' kernels side by side",
    )
    args = ap.parse_args(argv)
    configs = [_small_config(text) for text in args.kernels]  # bad fields refused before any GPU work
    if args.lean_prologues and not args.lean_step:
        raise SystemExit("--lean-prologues needs --lean-step (the prologues are the lean step's)")
    if not torch.cuda.is_available():
        raise SystemExit("step_overhead.py needs a CUDA device")

    import kernel_bench as kb
    from decode_bench import FF, KV, D, load_kernels, package_models, timed_generate

    kb.set_slices(args.slices.split(","))

    load_kernels()  # puts src/ on the path
    import e2e_decode
    import mobiquant as mq
    from mobiquant.patching import fuse_inputs, fuse_sites, lean_step, set_small_config

    d, ff, kv, heads, vocab, what = (
        (576, 1536, 192, 9, 49152, "SmolLM2-shaped") if args.smol else (D, FF, KV, 32, 1024, "8B-shaped")
    )
    layers = args.layers or (30 if args.smol else 4)
    fp, q = package_models(layers, d, ff, kv, heads, vocab, "cuda", torch.float16, policy=args.policy,
                           placement=args.placement)  # fmt: skip
    prompt = torch.randint(0, vocab, (1, 16), generator=torch.Generator().manual_seed(7)).cuda()
    print(f"# {torch.cuda.get_device_name()}, torch {torch.__version__}; {layers} {what} layers, fp16", flush=True)
    census = dict(top=args.top, cuda_graph=args.census)
    lean = " [lean step]" if args.lean_step else ""
    lean_step(fp, enable=args.lean_step)
    e2e_decode.step_profile(fp, None, "cuda", prompt, None, "fp16" + lean, **census)
    lean_step(fp, enable=False)
    fuse_sites(q), fuse_inputs(q)  # the package's decode defaults (task=decode)
    lean_step(q, enable=args.lean_step, prologues=args.lean_prologues)
    lean += " with prologues" if args.lean_prologues else ""
    for text, cfg in zip(args.kernels, configs, strict=True):
        set_small_config(q, cfg)
        tag = f"{lean}{f' [{text}]' if text else ''}"
        for b in args.census_budgets if args.census != "off" else ():
            e2e_decode.step_profile(q, None, "cuda", prompt, b, f"routed budget {b:g}, fused inputs{tag}", **census)
        mq.set_static(q, 2)
        e2e_decode.step_profile(q, None, "cuda", prompt, None, f"static 4-bit view, fused inputs{tag}", **census)
    set_small_config(q, None)
    lean_step(q, enable=False)
    if args.census_only:
        return

    def timed(model, label, budget=None):
        for mode in ("graph", "compile"):
            try:
                g, s = timed_generate(model, prompt, args.new_tokens, mode, budget)
                gpu = f"GPU {s['gpu_us']:.1f} us a step; {g.graph}"
                print(f"{label} cuda_graph={mode}: {g.us_per_token:.1f} us/token ({gpu})")
            except Exception as e:  # report, keep the other rows
                print(f"{label} cuda_graph={mode}: failed: {type(e).__name__}: {str(e).strip()[:300]}")

    timed(fp, "fp16")
    fuse_inputs(fp)
    timed(fp, "fp16 [fused inputs]")
    for fused in (True, False):
        fuse_inputs(q, enable=fused)
        tag = "sites+inputs" if fused else "sites"
        for k in args.views:
            mq.set_static(q, k)
            timed(q, f"static k={k} [{tag}]")
        for b in args.budgets:
            timed(q, f"routed {b:g} [{tag}]", budget=b)


def _small_config(text: str):
    """A ``--kernels`` entry as a ``SmallConfig`` (``''``: None, the defaults): ``field=value`` pairs by commas, each
    value read as YAML reads it (``true``, ``5``, ``static``, ``null``)."""
    import yaml

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
    from mobiquant.kernels.triton_bitplane import SmallConfig

    if not text.strip():
        return None
    fields = {}
    for pair in text.split(","):
        name, eq, value = pair.partition("=")
        if not eq or not name.strip():
            raise SystemExit(f"--kernels: FIELD=VALUE pairs by commas, got {pair!r} in {text!r}")
        fields[name.strip()] = yaml.safe_load(value)
    known = {f.name for f in dataclasses.fields(SmallConfig)}
    if set(fields) - known:
        raise SystemExit(f"--kernels: no SmallConfig field {sorted(set(fields) - known)}; fields: {sorted(known)}")
    try:
        return SmallConfig(**fields)
    except (TypeError, ValueError) as e:
        raise SystemExit(f"--kernels {text!r}: {e}") from None


if __name__ == "__main__":
    main()

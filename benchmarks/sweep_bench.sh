#!/usr/bin/env bash
# A 4-job sweep on one GPU against the same sweep on two (`hydra/launcher=gpus`): wall time of each, the
# speed-up, each job's device and time, and whether every job's results.csv is the same in both sweeps
# (timing columns left out). Writes $OUT/sweep_bench.md; the sweeps stay in $OUT/gpus1 and $OUT/gpus2.
#
#   bash benchmarks/sweep_bench.sh [extra overrides for every job]
#
# On the bare GPU machine prepared by benchmarks/bare_gpu.sh (no gensim there: the texts come as files):
#   export PYTHONPATH=$PWD/src:/root/pylib MOBIQUANT_CACHE=/root/mqcache WANDB_MODE=offline
#   bash benchmarks/sweep_bench.sh model=local model.path=/root/model/smol.gguf data=offline_wikitext2 \
#     data.calib.corpus=text_files 'data.calib.paths=[/root/data/wiki_extract_calib.txt]' \
#     '~data.eval.wiki_extract' 'data.eval.wikitext2.paths=[/root/data/wiki.test.raw]'
#
# Environment: SWEEP (the 4 jobs; default the slice-layout ablation), JOB (what every job runs; default
# one-GPU jobs of about two minutes each on SmolLM2-135M on an H200, uniform routing: the budget plan would
# add about a minute to each job and nothing to what the launcher is measured on), ORDER (default "2 1":
# the two-GPU sweep runs first, so any first-run cost such as the model conversion or kernel compilation
# counts against it; ORDER=1 or ORDER=2 runs one half, and the table is written once both halves are in
# $OUT), OUT, PY.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-python3}
OUT=${OUT:-/tmp/sweep_bench}
ORDER=${ORDER:-2 1}
SWEEP=${SWEEP:-experiment=ablation_slices}
JOB=${JOB:-trainer=gpu model.device=cuda logger=csv calib.progress_bar=false save_checkpoints=false \
resume=false data.calib.nsamples=32 data.calib.seqlen=2048 calib.batch_size=4 calib.epochs_stage1=2 \
calib.epochs_stage2=2 eval.max_windows=16 quant.allocation=uniform}
mkdir -p "$OUT"
for g in $ORDER; do
  dir="$OUT/gpus$g"
  rm -rf "$dir"  # a fresh sweep: finished rows left in place would be resumed, not measured
  echo "== $g GPU(s): $dir"
  t0=$(date +%s.%N)
  # shellcheck disable=SC2086  # SWEEP and JOB are lists of overrides
  "$PY" -m mobiquant -m $SWEEP $JOB "$@" hydra/launcher=gpus "hydra.launcher.gpus=$g" \
    "hydra.sweep.dir=$dir" >"$OUT/gpus$g.log" 2>&1 || { tail -40 "$OUT/gpus$g.log"; exit 1; }
  t1=$(date +%s.%N)
  awk "BEGIN { print $t1 - $t0 }" >"$OUT/gpus$g.wall.txt"
  grep -E "GpusLauncher|started on|done on|FAILED" "$OUT/gpus$g.log" || true
done
for g in 1 2; do
  [ -f "$OUT/gpus$g.wall.txt" ] || { echo "no $g-GPU half in $OUT yet: run it with ORDER=$g"; exit 0; }
done
"$PY" - "$OUT" "$(cat "$OUT/gpus1.wall.txt")" "$(cat "$OUT/gpus2.wall.txt")" <<'EOF'
import sys
from pathlib import Path

import pandas as pd

out, wall = Path(sys.argv[1]), {1: float(sys.argv[2]), 2: float(sys.argv[3])}
TIMING = ["calib_seconds", "eval_seconds", "checkpoint"]
lines = ["| GPUs | wall (s) | jobs | job time (s), mean | job time (s), each | devices |", "|---|---|---|---|---|---|"]
ledgers = {}
for g in (1, 2):
    jobs = pd.read_csv(out / f"gpus{g}" / ".gpus" / "jobs.csv").sort_values("job")
    ledgers[g] = jobs
    each = " / ".join(f"{s:.0f}" for s in jobs["seconds"])
    devices = " ".join(f"{j}:{d}" for j, d in zip(jobs["job"], jobs["device"], strict=True))
    lines.append(f"| {g} | {wall[g]:.1f} | {len(jobs)} | {jobs['seconds'].mean():.1f} | {each} | {devices} |")
lines.append("")
lines.append(f"speed-up, 2 GPUs against 1: **{wall[1] / wall[2]:.2f}x** (target >= 1.8x)")
same, notes = 0, []
for job in ledgers[1]["job"]:
    a = pd.read_csv(out / "gpus1" / str(job) / "results.csv").drop(columns=TIMING, errors="ignore")
    b = pd.read_csv(out / "gpus2" / str(job) / "results.csv").drop(columns=TIMING, errors="ignore")
    if a.equals(b):
        same += 1
    elif a.shape == b.shape and "ppl" in a:
        rel = ((a["ppl"] - b["ppl"]).abs() / a["ppl"].abs()).max()
        notes.append(f"job {job}: ppl differs, largest relative difference {rel:.2e}")
    else:
        notes.append(f"job {job}: different rows ({a.shape} against {b.shape})")
lines.append(f"results.csv identical on 1 and 2 GPUs: {same} of {len(ledgers[1])} jobs")
lines += notes
text = "\n".join(lines)
print(text)
(out / "sweep_bench.md").write_text(text + "\n")
EOF

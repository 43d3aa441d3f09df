#!/usr/bin/env bash
# Runs `experiment=compare` on a bare GPU machine (torch, triton, transformers present; no network).
# Expects, from the repository root: .device/wheels (hydra-core, omegaconf, antlr4, lightning, gguf,
# hqq, ...), the SmolLM2 GGUF at $GGUF, .device/wiki.test.raw and .device/wiki_extract_calib.txt
# (the offline corpus's calibration articles, one per line). Extra Hydra overrides are passed through.
set -euo pipefail
GGUF=${GGUF:-/root/model/SmolLM2-135M-Instruct.Q4_1.gguf}
LIB=${LIB:-/root/pylib}
OUT=${OUT:-/tmp/out}
if [ ! -d "$LIB/hydra" ]; then
  python3 -m pip install -q --no-index --no-deps --no-build-isolation --target "$LIB" .device/wheels/* 2>&1 | tail -3
fi
export PYTHONPATH="$PWD/src:$LIB:${PYTHONPATH:-}" MOBIQUANT_CACHE=/root/mqcache WANDB_MODE=offline
RUN=/root/runs/compare
mkdir -p "$RUN"
set +e
timeout "${LIMIT:-500}" python3 -m mobiquant experiment=compare trainer=gpu trainer.precision=32-true \
  model=local model.path="$GGUF" model.device=cuda logger=csv hydra.run.dir="$RUN" \
  data.calib.corpus=text_files "data.calib.paths=[$PWD/.device/wiki_extract_calib.txt]" \
  "~data.eval.ptb" "data.eval.wikitext2.paths=[$PWD/.device/wiki.test.raw]" \
  calib.progress_bar=false "$@" 2>&1 | grep -v "Warning\|warn(" | tail -120
rc=${PIPESTATUS[0]}
set -e
for f in results.csv results.md calibration.csv elasticity.png; do cp "$RUN/$f" "$OUT/" 2>/dev/null || true; done
cp "$RUN"/*.log "$OUT/run.log" 2>/dev/null || true
exit "$rc"

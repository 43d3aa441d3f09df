#!/usr/bin/env bash
# Brings what the GPU benchmarks need to a bare GPU machine (torch, triton, transformers, lightning and
# pandas present; no network, no hydra/omegaconf/gguf) when only small transfers are allowed.
#
#   bash benchmarks/bare_gpu.sh bundle [DIR] [PARTS]   # here, with .venv: DIR (default .device) gets
#                                                     #   p1/ = GGUF part 0 + texts, wheels/, p2..pN/ = parts
#   bash benchmarks/bare_gpu.sh install DIR/p1 DIR/wheels   # there, first transfer: part 0, texts, wheels
#   bash benchmarks/bare_gpu.sh install DIR/p2              # there, each further transfer: one more part
#
# `install` copies into $ROOT (default /root): model parts to $ROOT/model, texts to $ROOT/data, wheels
# into $ROOT/pylib; once every part is there it joins them into $ROOT/model/smol.gguf. Then:
#   export PYTHONPATH=$PWD/src:$ROOT/pylib MOBIQUANT_CACHE=$ROOT/mqcache WANDB_MODE=offline
#   python3 benchmarks/calib_bench.py --model $ROOT/model/smol.gguf \
#     --calib-text $ROOT/data/wiki_extract_calib.txt --eval-text $ROOT/data/wiki.test.raw ...
# The calibration text is the offline Wikipedia extract's calibration articles (never WikiText-2).
set -euo pipefail
cmd=${1:-}
ROOT=${ROOT:-/root}
case "$cmd" in
  bundle)
    dir=${2:-.device}
    parts=${3:-2}
    py=${PY:-.venv/bin/python}
    gguf=$("$py" -c "from mobiquant.io.models import smollm2_gguf_path; print(smollm2_gguf_path())")
    rm -rf "$dir" && mkdir -p "$dir/wheels" "$dir/p1"
    split -n "$parts" -d -a 2 "$gguf" "$dir/part"
    for i in $(seq 1 "$parts"); do
      mkdir -p "$dir/p$i" && mv "$dir/part$(printf %02d $((i - 1)))" "$dir/p$i/"
    done
    echo "$parts" > "$dir/p1/nparts"
    wikitext=${WIKITEXT:-../shared/data/wikitext-2-raw/wiki.test.raw}
    [ -f "$wikitext" ] && cp "$wikitext" "$dir/p1/wiki.test.raw"
    "$py" - "$dir/p1/wiki_extract_calib.txt" <<'EOF'
import sys
from mobiquant.io.data import load_wiki_extract
docs = load_wiki_extract("calib")
with open(sys.argv[1], "w") as f:
    f.write("\n".join(d.replace("\n", " ") for d in docs) + "\n")
EOF
    "$py" -m pip wheel -q --no-deps -w "$dir/wheels" hydra-core==1.3.8 omegaconf==2.3.1 \
      antlr4-python3-runtime==4.9.3 gguf==0.19.0
    du -sh "$dir"/*
    ;;
  install)
    shift
    mkdir -p "$ROOT/model" "$ROOT/data" "$ROOT/pylib"
    for src in "$@"; do
      if [ "$(basename "$src")" = wheels ]; then
        python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$ROOT/pylib" "$src"/*.whl
        continue
      fi
      cp "$src"/part* "$ROOT/model/"
      [ -f "$src/nparts" ] && cp "$src/nparts" "$ROOT/model/"
      for t in "$src"/*.txt "$src"/*.raw; do [ -f "$t" ] && cp "$t" "$ROOT/data/"; done
    done
    if [ -f "$ROOT/model/nparts" ] && [ "$(ls "$ROOT"/model/part* 2>/dev/null | wc -l)" -eq "$(cat "$ROOT/model/nparts")" ]; then
      cat "$ROOT"/model/part* > "$ROOT/model/smol.gguf" && rm "$ROOT"/model/part*
      echo "model ready: $ROOT/model/smol.gguf"
    fi
    ;;
  *)
    sed -n 2,15p "$0"
    exit 2
    ;;
esac

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
# The calibration text is the offline Wikipedia extract's calibration articles (never WikiText-2); its
# held-out articles (wiki_extract_eval.txt) are a second evaluation text (--extra-eval extract=...).
#
# The paper protocol of docs/RESULTS.md on what `install` brought (128 x 2048 calibration tokens of the
# extract, 10 + 10 epochs, WikiText-2 test 40 windows and the extract's held-out articles, plan with 8 refit
# and 4 selection windows), results under $ROOT/bench/TAG_1gpu:
#   bash benchmarks/bare_gpu.sh paper [calib_bench args, e.g. --runs mobiquant:1 --tag T] [-- overrides]
#
# A saved checkpoint (e.g. a `make run` one, for `e2e_decode.py --checkpoint`) in parts of one transfer each:
#   bash benchmarks/bare_gpu.sh bundle-ckpt outputs/demo/runs/<time>/checkpoints/mobiquant [DIR] [PARTS]  # -> DIR/k1..
#   bash benchmarks/bare_gpu.sh install DIR/kI     # there, one call a part; the last unpacks it under $ROOT/ckpt/
#
# Jobs longer than one call (a call ends after at most 10 minutes; a machine stays warm ~30 s between calls):
#   bash benchmarks/bare_gpu.sh launch NAME CMD...   # CMD detached (setsid) in its own copy of this repo
#                                                    #   ($ROOT/repo.NAME),
#                                                    #   output in $ROOT/logs/NAME.log, then NAME.done
#   bash benchmarks/bare_gpu.sh poll SECONDS [N]     # wait until N jobs are done (default: all launched) or
#                                                    #   SECONDS pass; every 15 s copies the log tails and the
#                                                    #   csv/md/json/txt files under $ROOT/bench and $ROOT/res
#                                                    #   to $OUT (what a call cut at its limit still returns)
#   bash benchmarks/bare_gpu.sh launch B bash benchmarks/bare_gpu.sh after A CMD...  # B's CMD once job A is done
#                                                    #   (e.g. the paper protocol queued behind a timing suite)
# Issue `poll` calls back to back: the jobs run on only while the machine is held.
#
# Compiled kernels across machines: launched jobs keep Triton's cache in $ROOT/triton_cache; the last collect of a
# `poll` whose jobs all ended packs it into $OUT/triton_cache.tgz (when under $CACHE_MAX_MB, default 40). Here:
#   bash benchmarks/bare_gpu.sh keep-cache FILES_AT/triton_cache.tgz   # -> .device/cache/ (git-ignored)
# and carry .device/cache in a later session's first call: `install .device/cache` unpacks it, so the kernels whose
# source did not change are not compiled again (the first routed SmolLM2 decode compiled for about 6 minutes).
set -euo pipefail
cmd=${1:-}
ROOT=${ROOT:-/root}
case "$cmd" in
  bundle)
    dir=${2:-.device}
    parts=${3:-2}
    py=${PY:-.venv/bin/python}
    gguf=$("$py" -c "from mobiquant.io.models import smollm2_gguf_path; print(smollm2_gguf_path())")
    rm -rf "$dir"/p[0-9]* "$dir/wheels" && mkdir -p "$dir/wheels" "$dir/p1"  # keeps $dir/cache
    split -n "$parts" -d -a 2 "$gguf" "$dir/part"
    for i in $(seq 1 "$parts"); do
      mkdir -p "$dir/p$i" && mv "$dir/part$(printf %02d $((i - 1)))" "$dir/p$i/"
    done
    echo "$parts" > "$dir/p1/nparts"
    wikitext=${WIKITEXT:-../shared/data/wikitext-2-raw/wiki.test.raw}
    [ -f "$wikitext" ] && cp "$wikitext" "$dir/p1/wiki.test.raw"
    "$py" - "$dir/p1" <<'EOF'
import sys
from mobiquant.io.data import load_wiki_extract
for split in ("calib", "eval"):  # calibration articles and the held-out ones, one document per line
    docs = load_wiki_extract(split)
    with open(f"{sys.argv[1]}/wiki_extract_{split}.txt", "w") as f:
        f.write("\n".join(d.replace("\n", " ") for d in docs) + "\n")
EOF
    # gemlite: the peer kernels of decode_bench.py --gemlite (Triton, pure Python; built from its sdist)
    "$py" -m pip wheel -q --no-deps -w "$dir/wheels" hydra-core==1.3.8 omegaconf==2.3.1 \
      antlr4-python3-runtime==4.9.3 gguf==0.19.0 gemlite==0.6.0.post2
    du -sh "$dir"/*
    ;;
  bundle-ckpt)
    src=${2:?bundle-ckpt CHECKPOINT_DIR [DIR] [PARTS]}
    dir=${3:-.device}
    parts=${4:-3}
    [ -f "$src/mobiquant.json" ] || { echo "bundle-ckpt: $src is not a saved checkpoint folder" >&2; exit 2; }
    rm -rf "$dir"/k[0-9]* && mkdir -p "$dir"
    tar -c -C "$(dirname "$src")" "$(basename "$src")" > "$dir/ckpt.tar"
    split -n "$parts" -d -a 2 "$dir/ckpt.tar" "$dir/ckpart" && rm "$dir/ckpt.tar"
    for i in $(seq 1 "$parts"); do
      mkdir -p "$dir/k$i" && mv "$dir/ckpart$(printf %02d $((i - 1)))" "$dir/k$i/" && echo "$parts" > "$dir/k$i/cknparts"
    done
    du -sh "$dir"/k*
    ;;
  install)
    shift
    mkdir -p "$ROOT/model" "$ROOT/data" "$ROOT/pylib"
    for src in "$@"; do
      if [ "$(basename "$src")" = wheels ]; then
        python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$ROOT/pylib" "$src"/*.whl
        continue
      fi
      if [ -f "$src/cknparts" ]; then  # a part of a checkpoint (bundle-ckpt): unpacked once every part is there
        mkdir -p "$ROOT/ckparts" && cp "$src"/ckpart* "$src/cknparts" "$ROOT/ckparts/"
        if [ "$(ls "$ROOT"/ckparts/ckpart* | wc -l)" -eq "$(cat "$ROOT/ckparts/cknparts")" ]; then
          mkdir -p "$ROOT/ckpt" && cat "$ROOT"/ckparts/ckpart* | tar -x -C "$ROOT/ckpt" && rm -r "$ROOT/ckparts"
          echo "checkpoint ready: $(ls -d "$ROOT"/ckpt/*)"
        fi
        continue
      fi
      if [ -f "$src/triton_cache.tgz" ]; then
        mkdir -p "$ROOT/triton_cache" && tar xzf "$src/triton_cache.tgz" -C "$ROOT"
        echo "triton cache: $(find "$ROOT/triton_cache" -type f | wc -l) files"
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
  paper)
    shift
    pre=() post=()
    while [ $# -gt 0 ] && [ "$1" != -- ]; do pre+=("$1"); shift; done
    [ $# -gt 0 ] && shift
    post=("$@")
    python3 benchmarks/calib_bench.py --model "$ROOT/model/smol.gguf" --calib-text "$ROOT/data/wiki_extract_calib.txt" \
      --eval-text "$ROOT/data/wiki.test.raw" --max-windows 40 --extra-eval "extract=$ROOT/data/wiki_extract_eval.txt" \
      --out "$ROOT/bench" "${pre[@]}" -- calib.sync_every=50 plan.refit_windows=8 plan.select_windows=4 "${post[@]}"
    ;;
  launch)
    name=${2:?launch NAME CMD...}
    shift 2
    mkdir -p "$ROOT/logs" "$ROOT/bench" "$ROOT/res"
    repo="$ROOT/repo.$name"  # the job's own copy: the next call replaces the working tree, not this
    rm -rf "$repo" && mkdir -p "$repo"
    tar -c --exclude=./.venv --exclude=./.git --exclude=./.device --exclude=./outputs . | tar -x -C "$repo"
    rm -f "$ROOT/logs/$name.done"
    printf '%q ' "$@" > "$ROOT/logs/$name.cmd"
    setsid bash -c "cd '$repo' && export PYTHONPATH='$repo/src:$ROOT/pylib' MOBIQUANT_CACHE='$ROOT/mqcache' \
      TRITON_CACHE_DIR='$ROOT/triton_cache' WANDB_MODE=offline PYTHONUNBUFFERED=1 && \
      bash '$ROOT/logs/$name.cmd' > '$ROOT/logs/$name.log' 2>&1; \
      echo \"exit \$?\" >> '$ROOT/logs/$name.log'; touch '$ROOT/logs/$name.done'" < /dev/null > /dev/null 2>&1 &
    echo "launched $name: $*"
    ;;
  after)
    # inside a launched job: wait until job NAME is done, then run CMD (two jobs queued on one GPU, not sharing it)
    name=${2:?after NAME CMD...}
    shift 2
    while [ ! -e "$ROOT/logs/$name.done" ]; do sleep "${POLL_EVERY:-5}"; done
    echo "after $name: $*"
    "$@"
    ;;
  poll)
    limit=${2:-540}
    out=${OUT:?poll copies results to \$OUT}
    count() { { ls "$ROOT"/logs/*."$1" 2>/dev/null || true; } | wc -l; }
    want=${3:-$(count cmd)}
    t0=$(date +%s)
    collect() {
      mkdir -p "$out/logs"
      for f in "$ROOT"/logs/*.log; do [ -f "$f" ] && tail -c 30000 "$f" > "$out/logs/$(basename "$f")"; done
      (cd "$ROOT" && find bench res \( -name '*.csv' -o -name '*.md' -o -name '*.json' -o -name '*.txt' \) \
        -size -4M 2>/dev/null | tar czf "$out/results.tgz" -T - 2>/dev/null) || true
      nvidia-smi --query-gpu=index,utilization.gpu,memory.used --format=csv > "$out/logs/smi.txt" 2>/dev/null || true
    }
    while :; do
      collect
      done_n=$(count done)
      [ "$done_n" -ge "$want" ] && break
      [ $(( $(date +%s) - t0 )) -ge "$limit" ] && break
      sleep "${POLL_EVERY:-15}"
    done
    collect
    if [ "$done_n" -ge "$want" ] && [ -d "$ROOT/triton_cache" ]; then  # every job ended: the cache is complete
      max=${CACHE_MAX_MB:-40} mb=$(du -sm "$ROOT/triton_cache" | cut -f1)
      # packing compresses it about 3x: a larger cache is not packed at all
      [ "$mb" -le $((max * 3)) ] && tar czf "$out/triton_cache.tgz" -C "$ROOT" triton_cache
      [ -f "$out/triton_cache.tgz" ] && [ "$(du -m "$out/triton_cache.tgz" | cut -f1)" -gt "$max" ] \
        && rm "$out/triton_cache.tgz"
      [ -f "$out/triton_cache.tgz" ] && echo "triton cache packed: $out/triton_cache.tgz" \
        || echo "triton cache of $mb MB not packed (over $max MB packed)"
    fi
    echo "$done_n of $want jobs done after $(( $(date +%s) - t0 )) s"
    for f in "$ROOT"/logs/*.log; do [ -f "$f" ] && { echo "== $f"; tail -n 3 "$f"; }; done
    ;;
  keep-cache)
    src=${2:?keep-cache PATH/triton_cache.tgz (what a poll brought back)}
    dir=${3:-.device/cache}
    tar tzf "$src" > /dev/null || { echo "$src is not a tar.gz of a Triton cache" >&2; exit 1; }
    mkdir -p "$dir" && cp "$src" "$dir/triton_cache.tgz.tmp" && mv "$dir/triton_cache.tgz.tmp" "$dir/triton_cache.tgz"
    echo "kept $(du -h "$dir/triton_cache.tgz" | cut -f1) in $dir: carry it and run install $dir there"
    ;;
  *)
    sed -n 2,37p "$0"
    exit 2
    ;;
esac

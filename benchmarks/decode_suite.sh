#!/usr/bin/env bash
# The decode-speed measurements of one GPU session, in order, each stage resumable: a stage that finished
# (its $RES/STAGE.done exists) is skipped when the suite is started again, so a run cut by a call's limit or
# a lost machine goes on where it stopped. Output of stage STAGE in $RES/STAGE.txt (and the benchmark's own
# csv files under $RES/STAGE/), which `bare_gpu.sh poll` copies back.
#
#   bash benchmarks/decode_suite.sh [STAGE...]     # default: every stage below, in this order
#
# Stages:
#   stack    the 8B-shaped stack, static views and routed budgets: the library's default beside gemlite at 2, 4
#            and 8 bits (if importable: bare_gpu.sh bundle carries its wheel) and each view with its routers
#            launched or its k on the device (--routed-parts), then $STACK_CONFIG
#   gluon    (only when named) benchmarks/gluon_proto.py --check --time: the fragment-native Gluon GEMV prototype
#            against PyTorch, then the 8B shapes beside the package's 4-bit view and fp16 cuBLAS; then --tma (one
#            TMA load a program, checked and timed in its own process)
#   fragment (only when named) its GPU tests, then the stack with the fragment-native Gluon kernel wherever it
#            serves ($FRAGMENT_CONFIG) beside the default (the library's rule), then the rule with static views
#            of 7-8 planes on the large launches capped at 128 registers ($FRAGCAP7_CONFIG), then the rule without
#            the cap ($FRAGCAP0_CONFIG; the default caps 5-8 planes)
#   tma      (only when named) the fragment kernel's static views with their words by TMA: the GPU tests of both
#            modes, gluon_proto.py --tma (each mode against the register path on the 8B shapes, one kernel), then the
#            stack with SmallConfig(fragment_tma=-2), then (=-1), each beside the default ($TMA2_CONFIG, $TMA1_CONFIG)
#   compile  (only when named) decode's cuda_graph='compile' (the step's glue compiled by Inductor, then captured): its
#            GPU tests with the graph ones, then benchmarks/step_overhead.py (an eager step's kernels; graph against
#            compile for fp16 and the default layout's views and budgets)
#   ckpt     (only when named) SmolLM2-135M from a saved checkpoint of the default configuration ($CKPT, brought by
#            bare_gpu.sh bundle-ckpt / install: adjacent routers, the budget plan; most linears then decode as static
#            views, benchmarks/static_share.py) at budgets 3.5-5 (CKPT_BUDGETS) and the static 4-bit view, fused
#            inputs, compiled step, with and without the lean step and its prologues (the package's decode defaults);
#            then budget 4 with the compiled step's kernel census (e2e_decode.py --profile --census compile;
#            CKPT_CENSUS=0: without it)
#   prefill  (only when named) where SmolLM2's time to first token goes, from the checkpoint at $CKPT: fp16, routed budget 4
#            and the static 4-bit view, one profiled prefill each (e2e_decode.py --prefill-profile; routed prefill took
#            166-340 ms against fp16's 28-104 on 2026-12-04, 69-87 after its mend), for the 6-token prompt and for a
#            512-token one (the extract's held-out text, when bare_gpu.sh install brought it), that one also with the
#            dequantize pass reading the one-bit plane buffers (--dequant-from-bits)
#   prompt   (only when named) the kernels of a few-token prompt's forward (and of batched decode) on the default layout
#            (3,1,1,1,1,1): the entry's choice (2-16 tokens: the small-batch kernel, its 3-bit base gathered; more: the
#            tile kernel) against dequantize-then-cuBLAS and fp16 cuBLAS at 2-256 tokens, then the tile kernel alone at
#            2-16 tokens (what served them before), SmolLM2 and 8B shapes, graph-replayed (kernel_bench.py); first the
#            GPU tests of those paths. On 2026-12-04 the tile kernel took 12 ms for SmolLM2's 210 linears at 6 tokens,
#            cuBLAS 2.7
#   dequant  (only when named) the dequantize pass of a prompt's forward (a view written in fp16 for cuBLAS): from the
#            planes (dequantize) and from the one-bit plane buffers (dequantize_bits), a few block shapes, views of
#            3, 4, 6 and 8 bits, as % of copy bandwidth; then each with its matmul at 16, 64 and 256 tokens beside fp16
#            and torch's int4 matmul (benchmarks/dequant_bench.py); first their GPU tests
#   int4mm   (only when named) torch's CUDA int4 weight-only matmul (tinygemm) beside fp16 cuBLAS and the package's 3-
#            and 4-bit views, 1-16 tokens, 8B and SmolLM2 shapes (benchmarks/int4mm_bench.py); its GPU tests through
#            the package (SmallConfig.int4_tokens); then, with the model and checkpoint, SmolLM2's 6-token prefill
#            with and without it, and with the dequantize pass from the one-bit plane buffers (e2e_decode.py
#            --prefill-profile --int4-tokens 0 --dequant-from-bits)
#   adjacent (only when named) benchmarks/step_overhead.py on the 8B-shaped model with the adjacent gate policy (the
#            default configuration's): fp16, the static 4-bit view, routed budgets 3, 4 and 4.5
#   solo     (only when named) the router tests compiled, then one router launch for one token on SmolLM2's inputs:
#            one program holding every hidden unit (no partial sums, no ticket; 4, 8 and 16 warps) against the
#            default tiling there (whole rows, one hidden unit a program), in one sweep
#   sites    (only when named) the 8B-shaped stack with its linears launched as the package's decode path launches
#            them (decode_bench.py --sites: one launch a site, q/k/v and gate/up; the residual adds in the o and down
#            launches) beside the per-linear stack, fp16 per linear and fp16 with one cuBLAS GEMV a site and its
#            residual adds in cuBLAS (addmm); the site stack with a later launch's weights asked of L2 during the
#            latency-bound launches (--sites-prefetch); under $SITES_CONFIGS; routed sites with the router in the
#            launch, and with router placement 'sublayer' (o and down on the q/k/v and gate/up routers' k: 8 router
#            launches a token instead of 16); then the GPU tests of the site launches, the reduce launch, the router
#            in the launch and the L2 requests
#   package  (only when named) the 8B-shaped stack inside a Hugging Face model patched by the package: its decode path
#            (captured graphs, one launch per router site, fused inputs) against the same model in fp16
#   placement (only when named) the package rows with the default configuration's adjacent routers at budgets where
#            tokens decide (3.5, 4.5, 5.5), router placement site (also with each pair's two views alone and their
#            shared planes preloaded: --package-span), then sublayer (o and down on q/k/v's and gate/up's decisions:
#            with fused inputs no router launch of its own), each against fp16 with the same fused inputs
#   pdl      (only when named) programmatic dependent launch with the fragment kernel's launches too (they took no
#            attribute before 2026-12-06): the site stack's static views with pdl, with the fragment kernel wherever it
#            serves, with both ($PDL_SITES_CONFIGS); then the package rows with fused inputs, sublayer routers at budgets
#            3.5, 4.5 and 5.5: the default, pdl (static views too), the span of each pair on the fragment kernel for the
#            large launches, and both (--package-pdl --package-span)
#   spandef  (only when named) the package rows with fused inputs, sublayer routers at budgets 3.5, 4.5 and 5.5: the
#            default (spans, those of at most 5 planes on the fragment kernel in the large launches) beside every view's
#            body compiled (--package-no-span); the per-linear rows left out
#   spanrule (only when named) the GPU tests of the fragment kernel's routed sites and spans, then the package rows of
#            spandef with the default span rule (every span of at most 6 planes on the fragment kernel, site launches
#            too) beside the rule before it and every launch's spans of at most 5 planes (--package-span-rules; the
#            stage 'sitespan' of 2026-12-06 timed --package-site-spans, whose rows are now the default and the first)
#   spancost (only when named) what a view on the device still costs over a static one, the package rows of spanrule
#            beside: the large launches' spans reaching 5 planes free of the 128-register cap (--package-span-uncap;
#            capped, they spill 16-48 bytes, benchmarks/NOTES.md entry 30), the first group of a span's common planes
#            asked of L2 before k is read (entry 31; the default since its run of 2026-12-06, fourth: --package-early-l2
#            now times none, two groups, two with pdl); router placement sublayer; then
#            the default rows with the default placement (site: the default configuration's routed speed under the
#            span rule of 2026-12-06, third run), then with placement attention (o on q/k/v's router, no router launch
#            of its own); then the compiled step's kernel census at routed 3.5 and 4.5 bits beside the static 4-bit
#            view's (step_overhead.py; sublayer routers); first the GPU tests of routed sites and spans
#   loads    (only when named) how the fragment kernel keeps bytes in flight (benchmarks/NOTES.md entry 32): the GPU
#            tests of its loads, then the package's static views and routed budgets (sublayer routers) with the 5-6
#            plane static views of the small launches on it too, L2 asked for the group 2 / 4 ahead, no group
#            prefetched into registers, and both (--package-fragment-loads), and the routers' launches asking L2 for
#            their weights first (--package-router-l2), and the routers' launches without their tail, the GEMVs
#            finishing them (--package-router-partials, NOTES entry 33); then the default rows with router
#            placement block (stage block), then the default placement site's census at 3.5
#   lean     (only when named) the lean decode step (patching.lean_step): each layer's rotary embedding, cache write
#            and attention in one launch, then also its residual adds in the o and down launches: its GPU tests, then
#            the package rows (sublayer routers) with each, and with the routers' tails in the GEMVs (NOTES entry
#            33), beside fp16 with each, then the compiled step's kernel census with it, then SmolLM2-135M end to
#            end with it (needs $GGUF)
#   attn     (only when named) benchmarks/attention_bench.py (the lean step's attention launch, positions a step x
#            warps, against the model's own rotary, cache writes and sdpa), then the package rows with the lean step
#            and the default router placement site
#   prologues (only when named) the RMS norms and gated products made in the launches they feed
#            (patching.lean_step(prologues=True), benchmarks/NOTES.md entry 37): their GPU tests, then the package rows
#            with the lean step with and without them (default placement site), then SmolLM2-135M end to end with the
#            lean step, with and without them (needs $GGUF). PROLOGUE_TESTS: the test files (default all three);
#            PROLOGUE_PDL=1: also every such row with programmatic dependent launch (the lean step's attention too)
#   epilogues (only when named) the post-attention RMS norm's parts made by the o launch and the gated product by
#            the gate/up launch (SmallConfig.fragment_epilogues, benchmarks/NOTES.md entry 40): their GPU tests, then
#            the package rows with the lean step, its prologues, and the epilogues too (default placement site);
#            EPILOGUE_TESTS=0: without the tests; EPILOGUE_PDL=1: also the lean rows with programmatic dependent launch
#   epikinds (only when named) the package rows with the lean step and its prologues: the default epilogues, every
#            kind at every static view, each kind alone at every static view (benchmarks/NOTES.md entry 41 (b))
#   pdlstatic (only when named) the package rows with the lean step and its prologues (the default epilogues) with
#            programmatic dependent launch for static views' launches only (SmallConfig(pdl="static")) and without
#            any (pdl=False; the default since 2026-12-07 gives it to static views of at most 4 planes), router
#            placement site, then block
#   routedepi (only when named) the GPU tests of the routed budgets' savings (views read on the device making the
#            next launch's input, SmallConfig.fragment_routed_epilogues; their launches under pdl: benchmarks/NOTES.md
#            entries 45, 49), then the package rows with router placement block, the lean step's prologues (the
#            default) beside those without each saving and without both
#   routedsite (only when named) the same with router placement site
#   routertail (only when named) the GPU tests of each block's router finished by the down launch before
#            (SmallConfig.router_tail, benchmarks/NOTES.md entries 48, 50), then the package rows with router placement
#            block, the lean step's prologues (the default) beside the same with it and with its normed row
#            (router_tail="normed", NOTES entry 54), two rounds (each row's fastest)
#   blockstatic (only when named) router placement block's static views taking the handed norms in their launches
#            (NOTES entry 55): its GPU tests beside the compiles, then the package rows with the lean step's prologues
#            and with every static view's epilogues on
#   chain    (only when named) the gated product chained from gate/up into down (SmallConfig.fragment_chain,
#            benchmarks/NOTES.md entry 60): its GPU tests beside the compiles, then the package rows with the lean step's
#            prologues (the default) and with the chain, router placement block, two rounds
#   tailcensus (only when named) the compiled step's kernels at routed 3.5 / 4.5 bits and the static 4-bit view, the
#            default and SmallConfig.router_tail (True, "normed") side by side (step_overhead.py --kernels; NOTES 52)
#   pick     (only when named) the default rows (block, lean step with its prologues) with the greedy token picked
#            inside the captured step (the default since 2026-12-07, seventh) and outside it (--pick-outside: the
#            argmax and the logits' copy launched after each replay), each in its own process (NOTES entry 59)
#   stepcensus (only when named) the compiled step's kernels at routed 3.5 / 4.5 bits and the static 4-bit view under
#            the defaults beside pdl=false (under pdl a launch's time includes its wait on the one before: only the
#            row without it says which launches hold the step; NOTES 57)
#   programs (only when named) the package rows (block, lean step and prologues) with the fragment launches' grids
#            aimed at $PROGRAMS programs beside the default 448 (SmallConfig.fragment_programs, NOTES entries 46, 62)
#   inflight (only when named) the package rows (block, lean step and prologues) with more of the fragment launches'
#            words in flight: L2 asked 2 groups ahead, or 2 groups loaded ahead (capped at 128 registers; NOTES 65)
#   longctx  (only when named) a long cache: the GPU tests of the split attention in the lean step, then the package
#            rows at a prompt of $PROMPT (default 1024) tokens, the static 3 / 4-bit views and routed 3.5 bits, with
#            the model's own attention (fused inputs) and with the lean step and its prologues (the split launch past
#            512 positions, NOTES 64), then the attention launch at 80 / 1024 positions of a 2048-position cache
#   block    (only when named; in loads) the default rows with router placement block (one router a layer), with
#            and without the lean step, and its compiled step's census at routed 3.5 / 4.5 bits with it
#            (BLOCK_CENSUS=0: without the census)
#   span     (only when named) the stack's static views beside each view with k read on the device: every body
#            compiled, the planes every body reads loaded before k (SmallConfig.preload), and the view's span of two
#            views alone (span_bodies) preloaded; then the tests of spans and preloading, compiled
#   kernels  single linears, one token, graph-replayed: stream-K and whole-K with and without pdl / l2_prefetch /
#            stages ($KERNEL_CONFIGS, benchmarks/kernel_bench.py parse_bits_config texts), 8B and SmolLM2 shapes,
#            each alone and as 4 launches in a row over 4 layers (where pdl can overlap them)
#   routers  a routed site's router launch then site launch, with and without pdl, and the router inside the launch
#   e2e      SmolLM2-135M through the package, routed budget 4 and the static 4-bit view, fused inputs, with
#            each of $E2E_CONFIGS (needs $GGUF; the first routed row compiles for several minutes)
#   pattern  (only when named) benchmarks/stream_pattern.py: the weight reads alone against the decode, the package's
#            GEMV with $PATTERN_CONFIGS beside the default (docs/RESULTS.md "Weight reads against the decode")
#   tiling   (only when named) the router launch's tilings (router_launch_bench.py --sweep over $ROUTER_SWEEP), then the
#            stack with the tiling fastest on its router inputs (one token, the sum over the 8B o and down widths)
#            and with whole rows of one hidden unit a program (the tiling before column splits), after the router
#            tests compiled
#   tests    GPU tests of the launch modes measured (programmatic dependent launch, L2 requests, graphs); last:
#            they compile every case and took more than one 10-minute call on an H200 (2026-12-03)
#
# Expects what `bare_gpu.sh install` brings (the wheels, the model) and the environment `bare_gpu.sh launch` sets
# (PYTHONPATH with src/ and the wheels); as a detached job:  bash benchmarks/bare_gpu.sh launch suite bash
# benchmarks/decode_suite.sh, then `bare_gpu.sh poll` calls back to back.
set -uo pipefail
ROOT=${ROOT:-/root}
RES=${RES:-$ROOT/res}
GGUF=${GGUF:-$ROOT/model/smol.gguf}
CKPT=${CKPT:-$ROOT/ckpt/mobiquant}
PY=${PY:-python3}
# stream-K default; + pdl; + l2_prefetch; + both; stages 3; whole-K; whole-K + pdl; then bytes in flight by other
# means with l2_prefetch: whole groups a sub-chunk, and 8 programs of 2 warps an SM
KERNEL_CONFIGS=${KERNEL_CONFIGS:-"128,64,4,4,0,,0,,0;128,64,4,4,0,,0,,1;128,64,4,4,0,,0,,0,1;128,64,4,4,0,,0,,1,1;\
128,64,4,4,0,,0,3,0;,,4,,0,,1,,0;,,4,,0,,1,,1;128,128,4,4,0,,0,,1,1;128,64,2,8,0,,0,,1,1"}
# the stack again by the library's grid rule (whole-K up to 8192 rows, stream-K above) with pdl, so the one run
# compares the default (without) and pdl; e2e: the same pair
STACK_CONFIG=${STACK_CONFIG:-",,4,,0,,1,,1"}
E2E_CONFIGS=${E2E_CONFIGS:-",,4,,0,,1,,0;,,4,,0,,1,,1"}
# the library's grid rule with reduce_launch and the fragment-native Gluon kernel (fragment stage)
FRAGMENT_CONFIG=${FRAGMENT_CONFIG:-",,4,,0,,1,,0,0,0,1,1"}
# the library's rule without the register cap (SmallConfig.fragment_cap 0: 5-6 planes on the one-bit plane kernel,
# 7-8 on the fragment kernel uncapped), and with the cap from 7 planes only
FRAGCAP0_CONFIG=${FRAGCAP0_CONFIG:-",,4,,0,,1,,0,0,0,1,,0"}
FRAGCAP7_CONFIG=${FRAGCAP7_CONFIG:-",,4,,0,,1,,0,0,0,1,,7"}
# the library's rule (fragment kernel where it serves) with static views' words by TMA: a barrier a group, one a plane
TMA2_CONFIG=${TMA2_CONFIG:-",,4,,0,,1,,0,0,0,1,,,-2"}
TMA1_CONFIG=${TMA1_CONFIG:-",,4,,0,,1,,0,0,0,1,,,-1"}
# the site stack's launch configs beside the default (sites stage): stream-K, pdl, both, the fragment kernel for every
# static view of up to 4 planes, the fragment kernel wherever it serves (the site stack's 7- and 8-bit views, all on the
# fragment kernel, gained 97-100 us over per-linear launches where the others gained 33-57: are 5-6 planes faster there?)
SITES_CONFIGS=${SITES_CONFIGS:-",,,,,,0;,,,,,,,,1;,,,,,,0,,1;,,,,,,,,,,,,3;,,,,,,,,,,,,1"}
# the pdl stage's site stack configs: pdl; the fragment kernel wherever it serves; both
PDL_SITES_CONFIGS=${PDL_SITES_CONFIGS:-",,,,,,,,1;,,,,,,,,,,,,1;,,,,,,,,1,,,,1"}
# gluon_proto.py's arguments (gluon stage): checked against PyTorch, then BEST's configs timed
GLUON_ARGS=${GLUON_ARGS:-"--check --time"}
# the package's one-token GEMV on the stream-K grid with the ticket store, then with the second launch (the default)
PATTERN_CONFIGS=${PATTERN_CONFIGS:-"128,64,4,4,0,,0,,,,,0;128,64,4,4,0,,0,,,,,1"}
# the router sweep of the `tiling` stage: hidden units a program, warps, columns a program (0: whole rows); its inputs
# (the first sweep, 2026-12-03: --hbs 4,16,64 --warps 4,8 --cols 0,128,256,512 on the four 8B inputs); empty: all
ROUTER_SWEEP=${ROUTER_SWEEP:-"--hbs 2,4,8 --warps 2,4 --cols 256,512,1024,2048 --tokens 1,8"}
ROUTER_INPUTS=${ROUTER_INPUTS:-""}
# processes that compile a package stage's kernels side by side before its timed run (0: none; the first stage of
# 2026-12-06's fourth run, 5 new configs, took 10.6 minutes, nearly all of it compiling, the next ones 45 s)
WARM_SHARDS=${WARM_SHARDS:-6}
mkdir -p "$RES"

run_stage() {  # NAME LIMIT CMD...: CMD under `timeout LIMIT`, output to $RES/NAME.txt, NAME.done on success
  local name=$1 limit=$2
  shift 2
  if [ -e "$RES/$name.done" ]; then
    echo "== $name: done before, skipped"
    return 0
  fi
  echo "== $name ($(date -u +%H:%M:%S)): $*"
  timeout "$limit" "$@" > "$RES/$name.txt" 2>&1
  local rc=$?
  tail -40 "$RES/$name.txt"
  echo "== $name: exit $rc ($(date -u +%H:%M:%S))"
  [ "$rc" -eq 0 ] && touch "$RES/$name.done"
  return 0
}

warm_shards() {  # NAME CMD...: unless NAME is done, CMD --warm-shard I/$WARM_SHARDS for each I side by side (their
  # output in $RES/NAME.warmI.txt), waited for: the timed run after them finds its kernels compiled
  local name=$1 n=$WARM_SHARDS i
  shift
  [ "$n" -gt 0 ] && [ ! -e "$RES/$name.done" ] || return 0
  echo "== $name: compiling in $n warm shards ($(date -u +%H:%M:%S))"
  for ((i = 0; i < n; i++)); do  # few Inductor compile workers each: the shards are the parallelism
    TORCHINDUCTOR_COMPILE_THREADS=${WARM_COMPILE_THREADS:-2} timeout 900 "$@" --warm-shard "$i/$n" \
      > "$RES/$name.warm$i.txt" 2>&1 &
  done
  wait
  echo "== $name: warm shards ended ($(date -u +%H:%M:%S))"
}

package_stage() {  # NAME PLACEMENT ARGS...: the package rows with fused inputs and the adjacent routers at budgets 3.5,
  # 4.5 and 5.5 (where the tokens decide) with router placement PLACEMENT, decode_bench.py's ARGS added; their
  # compiles first in $WARM_SHARDS processes side by side; $PACKAGE_ROUNDS rounds (default 1; a stage's own
  # --package-rounds wins)
  local name=$1 placement=$2
  shift 2
  local cmd=("$PY" benchmarks/decode_bench.py --slices 3,1,1,1,1,1 --no-routed --fuse-inputs \
    --package-policy adjacent --package-placement "$placement" --package-budgets 3.5,4.5,5.5 \
    --package-rounds "${PACKAGE_ROUNDS:-1}" "$@")
  warm_shards "$name" "${cmd[@]}"
  run_stage "$name" 900 "${cmd[@]}" --out "$RES/$name"
}

stage() {
  case "$1" in
    tests)
      # every test of these modes, the CPU ones too (on a GPU they run compiled, with the real waits)
      run_stage tests 600 "$PY" -m pytest -q -p no:cacheprovider \
        tests/kernels/test_triton_bitplane.py tests/kernels/test_triton_router.py tests/test_decode.py \
        -k "pdl or routed_k_graph_capture" ;;
    kernels)
      run_stage kernels 900 "$PY" benchmarks/kernel_bench.py --graph --tokens 1 --slices 3,1,1,1,1,1 \
        --shapes all --sweep-only --chain 4 --bits-sweep-configs "$KERNEL_CONFIGS" --out "$RES/kernels" ;;
    routers)
      run_stage routers 300 "$PY" benchmarks/router_launch_bench.py ;;
    stack)
      run_stage stack_default 900 "$PY" benchmarks/decode_bench.py --slices 3,1,1,1,1,1 --bits --no-package \
        --gemlite --routed-parts --out "$RES/stack_default"
      run_stage stack_config 900 "$PY" benchmarks/decode_bench.py --slices 3,1,1,1,1,1 --bits --no-package \
        --bits-config "$STACK_CONFIG" --out "$RES/stack_config" ;;
    e2e)
      if [ ! -e "$GGUF" ]; then
        echo "== e2e: no model at $GGUF (bare_gpu.sh install brings it), skipped"
        return 0
      fi
      run_stage e2e 1500 "$PY" benchmarks/e2e_decode.py --gguf "$GGUF" --budgets 4 --views 2 --fuse-inputs \
        --bits-configs "$E2E_CONFIGS" --out "$RES/e2e" ;;
    gluon)
      # shellcheck disable=SC2086  # the arguments split on spaces
      run_stage gluon 600 "$PY" benchmarks/gluon_proto.py $GLUON_ARGS
      # one TMA load a program (stages=-1): checked and timed in its own process
      run_stage gluon_tma 420 "$PY" benchmarks/gluon_proto.py --tma ;;
    fragment)
      # the package path's GPU tests, then the stack with SmallConfig(fragment=True) (the Gluon kernel where it
      # serves, reduce_launch kept), beside the default in the same run
      run_stage fragment_tests 420 "$PY" -m pytest -q -p no:cacheprovider tests/kernels/test_gluon_fragment.py
      run_stage stack_fragment 900 "$PY" benchmarks/decode_bench.py --slices 3,1,1,1,1,1 --bits --no-package \
        --bits-config "$FRAGMENT_CONFIG" --out "$RES/stack_fragment"
      run_stage stack_fragcap7 900 "$PY" benchmarks/decode_bench.py --slices 3,1,1,1,1,1 --bits --no-package \
        --bits-config "$FRAGCAP7_CONFIG" --out "$RES/stack_fragcap7"
      run_stage stack_fragcap0 900 "$PY" benchmarks/decode_bench.py --slices 3,1,1,1,1,1 --bits --no-package \
        --bits-config "$FRAGCAP0_CONFIG" --out "$RES/stack_fragcap0" ;;
    tma)
      run_stage tma_tests 420 "$PY" -m pytest -q -p no:cacheprovider tests/kernels/test_gluon_fragment.py -k "tma"
      run_stage tma_kernel 420 "$PY" benchmarks/gluon_proto.py --tma
      run_stage stack_tma2 900 "$PY" benchmarks/decode_bench.py --slices 3,1,1,1,1,1 --bits --no-package \
        --bits-config "$TMA2_CONFIG" --out "$RES/stack_tma2"
      run_stage stack_tma1 900 "$PY" benchmarks/decode_bench.py --slices 3,1,1,1,1,1 --bits --no-package \
        --bits-config "$TMA1_CONFIG" --out "$RES/stack_tma1" ;;
    compile)
      # the compiled step (decode's cuda_graph='compile'): its GPU tests, then graph against compile on the package's
      # 8B-shaped model (fp16, the default layout's static views and routed budgets, with and without fused inputs)
      run_stage compile_tests 420 "$PY" -m pytest -q -p no:cacheprovider tests/test_decode.py -k "compiled or graph"
      run_stage step_overhead 900 "$PY" benchmarks/step_overhead.py --views 1 2 6 --budgets 3 4 ;;
    ckpt)
      if [ ! -e "$GGUF" ] || [ ! -f "$CKPT/mobiquant.json" ]; then
        echo "== ckpt: needs the model at $GGUF and a checkpoint at $CKPT (bare_gpu.sh install), skipped"
        return 0
      fi
      run_stage e2e_ckpt 1500 "$PY" benchmarks/e2e_decode.py --gguf "$GGUF" --checkpoint "$CKPT" \
        --budgets "${CKPT_BUDGETS:-3.5,4,4.5,5}" --views 2 --fuse-inputs --lean-step --lean-prologues \
        --out "$RES/e2e_ckpt"
      # budget 4 again with the compiled step's kernel census (fp16, routed 4, the static 4-bit view; CKPT_CENSUS=0:
      # without it)
      [ "${CKPT_CENSUS:-1}" = 0 ] || run_stage e2e_ckpt_census 900 "$PY" benchmarks/e2e_decode.py --gguf "$GGUF" \
        --checkpoint "$CKPT" --budgets 4 --views 2 --fuse-inputs --repeats 2 --profile --census compile \
        --out "$RES/e2e_ckpt_census" ;;
    prefill)
      if [ ! -e "$GGUF" ] || [ ! -f "$CKPT/mobiquant.json" ]; then
        echo "== prefill: needs the model at $GGUF and a checkpoint at $CKPT (bare_gpu.sh install), skipped"
        return 0
      fi
      run_stage prefill 600 "$PY" benchmarks/e2e_decode.py --gguf "$GGUF" --checkpoint "$CKPT" --budgets 4 --views 2 \
        --new-tokens 8 --repeats 1 --prefill-profile --out "$RES/prefill"
      if [ -f "$ROOT/data/wiki_extract_eval.txt" ]; then  # a long prompt: the many-token kernels (bare_gpu.sh install)
        run_stage prefill_long 600 "$PY" benchmarks/e2e_decode.py --gguf "$GGUF" --checkpoint "$CKPT" --budgets 4 \
          --views 2 --new-tokens 8 --repeats 1 --prefill-profile --prompt-file "$ROOT/data/wiki_extract_eval.txt" \
          --prompt-tokens 512 --dequant-from-bits --out "$RES/prefill_long"
      fi ;;
    prompt)
      run_stage prompt_tests 420 "$PY" -m pytest -q -p no:cacheprovider tests/kernels/test_triton_bitplane.py \
        -k "device_k or tile or default_layout"
      run_stage prompt 900 "$PY" benchmarks/kernel_bench.py --slices 3,1,1,1,1,1 --shapes all --tokens 2,6,16,64,256 \
        --graph --out "$RES/prompt"
      run_stage prompt_tile 900 "$PY" benchmarks/kernel_bench.py --slices 3,1,1,1,1,1 --shapes all --tokens 2,6,16 \
        --graph --path tile --no-deq --out "$RES/prompt_tile" ;;
    dequant)
      run_stage dequant_tests 420 "$PY" -m pytest -q -p no:cacheprovider tests/kernels/test_triton_bitplane.py \
        -k "dequantize or dequant_path or prompt_dequantizes"
      run_stage dequant 600 "$PY" benchmarks/dequant_bench.py --views 1,2,4,6 --plane-configs "32,128,4;64,128,4;32,128,8" \
        --bits-configs "32,8,4;16,8,4;64,8,8;32,4,4" --out "$RES/dequant" ;;
    int4mm)
      run_stage int4mm 420 "$PY" benchmarks/int4mm_bench.py --out "$RES/int4mm"
      run_stage int4_tests 300 "$PY" -m pytest -q -p no:cacheprovider tests/kernels/test_int4.py
      if [ -e "$GGUF" ] && [ -f "$CKPT/mobiquant.json" ]; then
        run_stage int4_prefill 600 "$PY" benchmarks/e2e_decode.py --gguf "$GGUF" --checkpoint "$CKPT" --budgets 4 \
          --views 2 --new-tokens 8 --repeats 1 --prefill-profile --int4-tokens 0 --dequant-from-bits \
          --out "$RES/int4_prefill"
      fi ;;
    adjacent)
      # the 8B-shaped model with quant=mobiquant's gate policy: budgets whose thresholds lie between bands run as
      # static views (no router launch), the fractional one keeps its routers; fp16 and the static 4-bit view beside
      run_stage step_adjacent 900 "$PY" benchmarks/step_overhead.py --views 2 --budgets 3 4 4.5 --policy adjacent ;;
    solo)
      run_stage router_tests 300 "$PY" -m pytest -q -p no:cacheprovider tests/kernels/test_triton_router.py \
        tests/kernels/test_fused_inputs.py
      run_stage router_solo 420 "$PY" benchmarks/router_launch_bench.py --sweep --out "$RES/router_solo" \
        --hbs 1,64 --warps 4,8,16 --cols 0 --tokens 1 \
        --inputs "smollm2 qkv/gate-up (rms_norm, 576);smollm2 down (silu_mul, 1536);smollm2 o (576)" ;;
    sites)
      # its own process (inline PTX of L2 requests, never run on a GPU before: a fault there ends only this one),
      # the default site stack beside it; first: the shortest
      run_stage sites_prefetch 600 "$PY" benchmarks/decode_bench.py --slices 3,1,1,1,1,1 --no-package --no-routed \
        --sites --sites-prefetch --out "$RES/sites_prefetch"
      run_stage sites 1200 "$PY" benchmarks/decode_bench.py --slices 3,1,1,1,1,1 --no-package --sites \
        --sites-configs "$SITES_CONFIGS" --out "$RES/sites"
      # after the timings: compiling these took 5-7 minutes on an H100 (2026-12-05)
      run_stage sites_tests 420 "$PY" -m pytest -q -p no:cacheprovider tests/kernels/test_triton_bitplane.py \
        tests/kernels/test_l2_prefetch.py -k "site_bits or reduce_launch_matches or router_in_launch or l2_prefetch" ;;
    package)
      run_stage package 900 "$PY" benchmarks/decode_bench.py --slices 3,1,1,1,1,1 --no-routed --fuse-inputs \
        --out "$RES/package" ;;
    placement)
      # site routers also with each pair's two views alone and preloaded (--package-span)
      run_stage placement_site 600 "$PY" benchmarks/decode_bench.py --slices 3,1,1,1,1,1 --no-routed \
        --fuse-inputs --package-policy adjacent --package-placement site --package-budgets 3.5,4.5,5.5 \
        --package-span --out "$RES/placement_site"
      run_stage placement_sublayer 600 "$PY" benchmarks/decode_bench.py --slices 3,1,1,1,1,1 --no-routed \
        --fuse-inputs --package-policy adjacent --package-placement sublayer --package-budgets 3.5,4.5,5.5 \
        --out "$RES/placement_sublayer" ;;
    pdl)
      run_stage pdl_sites 900 "$PY" benchmarks/decode_bench.py --slices 3,1,1,1,1,1 --no-package --no-routed --sites \
        --sites-configs "$PDL_SITES_CONFIGS" --out "$RES/pdl_sites"
      package_stage pdl_package sublayer --package-pdl --package-span
      run_stage pdl_tests 420 "$PY" -m pytest -q -p no:cacheprovider tests/kernels/test_gluon_fragment.py -k pdl ;;
    spandef)
      package_stage spandef sublayer --package-no-span --package-fused-only ;;
    spanrule)
      run_stage spanrule_tests 420 "$PY" -m pytest -q -p no:cacheprovider tests/kernels/test_gluon_fragment.py \
        -k "routed_site or span"
      package_stage spanrule sublayer --package-span-rules --package-fused-only ;;
    spancost)
      run_stage spancost_tests 420 "$PY" -m pytest -q -p no:cacheprovider tests/kernels/test_gluon_fragment.py \
        -k "routed_site or span or uncap or early"
      package_stage spancost sublayer --package-span-uncap --package-early-l2 --package-fused-only
      package_stage spancost_site site --package-fused-only
      package_stage spancost_attention attention --package-fused-only
      # where the routed step's time goes beside the static view's: the compiled step's kernels (sublayer routers)
      run_stage spancost_census 600 "$PY" benchmarks/step_overhead.py --policy adjacent --placement sublayer \
        --census compile --census-only --census-budgets 3.5 4.5 ;;
    loads)
      run_stage loads_tests 420 "$PY" -m pytest -q -p no:cacheprovider tests/kernels/test_gluon_fragment.py \
        tests/kernels/test_triton_router.py tests/kernels/test_fused_inputs.py \
        -k "loads or routed_site or pdl_changes or partials"
      package_stage loads sublayer --package-fragment-loads --package-router-l2 --package-router-partials \
        --package-fused-only
      stage block
      # the default placement's step: where its routed budgets' 23-27% over the static views go
      run_stage loads_census_site 600 "$PY" benchmarks/step_overhead.py --policy adjacent --placement site \
        --census compile --census-only --census-budgets 3.5 ;;
    lean)
      run_stage lean_tests 420 "$PY" -m pytest -q -p no:cacheprovider tests/kernels/test_lean_step.py
      package_stage lean sublayer --package-lean-step --package-router-partials --package-fused-only
      run_stage lean_census 600 "$PY" benchmarks/step_overhead.py --policy adjacent --placement sublayer \
        --census compile --census-only --census-budgets 3.5 --lean-step
      if [ -e "$GGUF" ]; then
        run_stage lean_e2e 900 "$PY" benchmarks/e2e_decode.py --gguf "$GGUF" --budgets 4 --views 2 --fuse-inputs \
          --lean-step --out "$RES/lean_e2e"
      fi ;;
    attn)
      # the lean step's attention launch over positions a step x warps against the model's own arithmetic, then the
      # default placement's package rows with the lean step
      run_stage attn_bench 600 "$PY" benchmarks/attention_bench.py
      package_stage lean_site site --package-lean-step --package-fused-only ;;
    prologues)
      # PROLOGUE_TESTS narrows the test files (the kernels' own prologue tests compile for about 5 minutes)
      # shellcheck disable=SC2086
      run_stage prologue_tests 600 "$PY" -m pytest -q -p no:cacheprovider ${PROLOGUE_TESTS:-tests/kernels/test_triton_bitplane.py \
        tests/kernels/test_lean_step.py tests/kernels/test_gluon_fragment.py} -k "prologue"
      package_stage prologue_pkg site --package-lean-step --package-lean-prologues --package-fused-only ${PROLOGUE_PDL:+--package-pdl}
      if [ -e "$GGUF" ]; then
        run_stage prologue_e2e 900 "$PY" benchmarks/e2e_decode.py --gguf "$GGUF" --budgets 4 --views 2 \
          --lean-step --lean-prologues ${PROLOGUE_PDL:+--lean-pdl} --out "$RES/prologue_e2e"
      fi ;;
    block)
      package_stage loads_block block --package-lean-step --package-fused-only
      [ "${BLOCK_CENSUS:-1}" = 0 ] || run_stage loads_census 600 "$PY" benchmarks/step_overhead.py --policy adjacent --placement block \
        --census compile --census-only --census-budgets 3.5 4.5 --lean-step ;;
    epilogues)
      # the norm and product made by the launch before (mobiquant.kernels.epilogue): GPU tests, then the package rows
      [ "${EPILOGUE_TESTS:-1}" = 0 ] || run_stage epilogue_tests 420 "$PY" -m pytest -q -p no:cacheprovider \
        tests/kernels/test_gluon_fragment.py tests/kernels/test_lean_step.py -k epilogue
      package_stage loads_epi site --package-lean-step --package-lean-prologues --package-epilogues \
        --package-fused-only ${EPILOGUE_PDL:+--package-pdl} ;;
    epikinds)
      # each kind of epilogue alone at every static view beside the default rule and every kind (NOTES 41 (b): what
      # costs the 5-bit view), the lean step with its prologues, site placement
      package_stage epikinds site --package-lean-step --package-lean-prologues --package-epilogues \
        --package-epilogue-kinds --package-fused-only ;;
    pdlstatic)
      # programmatic dependent launch for the static views' launches only (SmallConfig(pdl="static")) over the lean
      # step with its prologues and the default epilogues; site placement (the default), then block; then the GPU
      # test of the lean chain with pdl (static views, and a routed budget with pdl="static")
      package_stage pdlstatic_site site --package-lean-step --package-lean-prologues --package-pdl-static \
        --package-fused-only
      package_stage pdlstatic_block block --package-lean-step --package-lean-prologues --package-pdl-static \
        --package-fused-only
      run_stage pdlstatic_tests 420 "$PY" -m pytest -q -p no:cacheprovider tests/kernels/test_lean_step.py \
        -k lean_prologues_with_pdl ;;
    routedepi|routedsite)
      # the routed budgets' savings of the default (since 2026-12-07; NOTES 45, 49: views read on the device making
      # the next launch's input, their launches under pdl): their GPU tests, then the package rows with the lean step's
      # prologues (the default) beside those without each saving and without both, router placement block
      # (routedepi) or site (routedsite)
      run_stage routedepi_tests 420 "$PY" -m pytest -q -p no:cacheprovider tests/kernels/test_lean_step.py \
        tests/kernels/test_triton_bitplane.py -k "test_routed_epilogues_asked or test_lean_epilogues_at_a_routed or test_gpu_lean or test_gpu_pdl or test_pdl_default or test_pdl_static"
      local placement=block
      [ "$1" = routedsite ] && placement=site
      package_stage "$1" "$placement" --package-lean-prologues --package-routed-epilogues --package-fused-only ;;
    routertail)
      # each block's router finished by the down launch before (SmallConfig.router_tail, NOTES 48 and 50): its GPU
      # tests, then the block placement's package rows with the lean step's prologues (the default) beside it
      run_stage routertail_tests 420 "$PY" -m pytest -q -p no:cacheprovider tests/kernels/test_lean_step.py \
        tests/kernels/test_epilogue.py -k "router_tail"
      package_stage routertail block --package-lean-prologues --package-router-tail --package-router-tail-normed \
        --package-fused-only --package-rounds 2 ;;
    chain)
      local cmd=("$PY" benchmarks/decode_bench.py --slices 3,1,1,1,1,1 --no-routed --fuse-inputs \
        --package-policy adjacent --package-placement block --package-budgets 3.5,4.5 --package-lean-prologues \
        --package-chain --package-fused-only --package-rounds "${PACKAGE_ROUNDS:-2}")
      run_stage chain_tests 420 "$PY" -m pytest -q -p no:cacheprovider tests/kernels/test_lean_step.py \
        tests/kernels/test_gluon_fragment.py -k "gpu_lean_chain or gpu_lean_epilogues or gpu_epilogues" &
      warm_shards chain "${cmd[@]}"
      wait
      run_stage chain 900 "${cmd[@]}" --out "$RES/chain" ;;
    blockstatic)
      # the static views under router=block with the norms the launches before hand over, their home linears no
      # longer making the normed row for the router first (TokenRouter.idle_for, NOTES 55): the GPU tests side by side
      # with the compiles, then the package rows with the lean step's prologues (the default) and with every static
      # view's epilogues on (SmallConfig(fragment_epilogues=True))
      local cmd=("$PY" benchmarks/decode_bench.py --slices 3,1,1,1,1,1 --no-routed --fuse-inputs \
        --package-policy adjacent --package-placement block --package-budgets 3.5,4.5,5.5 --package-lean-prologues \
        --package-epilogues --package-fused-only --package-rounds "${PACKAGE_ROUNDS:-1}")
      run_stage blockstatic_tests 420 "$PY" -m pytest -q -p no:cacheprovider tests/kernels/test_lean_step.py \
        -k "gpu_static_block_router or gpu_lean_epilogues" &
      warm_shards blockstatic "${cmd[@]}"
      wait
      run_stage blockstatic 900 "${cmd[@]}" --out "$RES/blockstatic" ;;
    tailcensus)
      # where the router tail's routed steps lose (NOTES 52): the compiled step's kernels at routed 3.5 / 4.5 bits, the
      # default and SmallConfig(router_tail=True) side by side, block placement, the lean step with its prologues
      run_stage tailcensus 900 "$PY" benchmarks/step_overhead.py --policy adjacent --placement block --census compile \
        --census-only --census-budgets 3.5 4.5 --lean-step --lean-prologues --kernels "" "router_tail=true" \
        "router_tail=normed" ;;
    pick)
      # the greedy pick inside the captured step against outside it (NOTES 59): the default rows twice, one process
      # each, the compiles shared
      local cmd=("$PY" benchmarks/decode_bench.py --slices 3,1,1,1,1,1 --no-routed --fuse-inputs \
        --package-policy adjacent --package-placement block --package-budgets 3.5,4.5,5.5 --package-lean-prologues \
        --package-fused-only --package-rounds "${PACKAGE_ROUNDS:-1}")
      warm_shards pick "${cmd[@]}"
      run_stage pick_outside 900 "${cmd[@]}" --pick-outside --out "$RES/pick_outside"
      run_stage pick_inside 900 "${cmd[@]}" --out "$RES/pick_inside" ;;
    stepcensus)
      # where the default step's time goes (NOTES 57): the compiled step's kernels, block placement, the lean step with
      # its prologues, the defaults beside pdl off (whose kernel times are the launches' own)
      run_stage stepcensus 900 "$PY" benchmarks/step_overhead.py --policy adjacent --placement block --census compile \
        --census-only --census-budgets 3.5 4.5 --lean-step --lean-prologues --top 40 --kernels "" "pdl=false" ;;
    programs)
      # the fragment launches' grids aimed at $PROGRAMS programs instead of 448 (default 264,896: 264, two launches'
      # grids resident at once at four programs an SM on 132 SMs, NOTES 62; 896, the gate/up site launch at the single
      # layer's best shape, 8 groups a program, in two waves, NOTES 46), block placement, the lean step and its
      # prologues
      package_stage programs block --package-lean-step --package-lean-prologues \
        --package-fragment-programs "${PROGRAMS:-264,896}" --package-fused-only ;;
    inflight)
      # the static 3 / 4-bit views and routed 3.5 / 4.5 bits (the targets' rows)
      package_stage inflight block --package-lean-prologues --package-inflight --package-fused-only \
        --package-views 1,2 --package-budgets 3.5,4.5 ;;
    longctx)
      local cmd=("$PY" benchmarks/decode_bench.py --slices 3,1,1,1,1,1 --no-routed --fuse-inputs \
        --package-policy adjacent --package-placement block --package-budgets 3.5 --package-lean-prologues \
        --package-fused-only --package-rounds "${PACKAGE_ROUNDS:-1}" --prompt-tokens "${PROMPT:-1024}" \
        --package-views 1,2)
      run_stage longctx_tests 600 "$PY" -m pytest -q -p no:cacheprovider tests/kernels/test_lean_step.py \
        -k "gpu_lean_step_in_the_compiled_step or splits_long or matches_the_reference or steps_through" &
      warm_shards longctx "${cmd[@]}"
      wait
      run_stage longctx 900 "${cmd[@]}" --out "$RES/longctx"
      run_stage longctx_attn 300 "$PY" benchmarks/attention_bench.py --positions 80 1024 --cache-len 2048 \
        --blocks 128 --warps 4 --split-positions 128 ;;
    span)
      # k read on the device against the static views: every body, preloaded, a span of two views (the stack);
      # then their tests compiled
      run_stage span_stack 900 "$PY" benchmarks/decode_bench.py --slices 3,1,1,1,1,1 --no-package --no-routed \
        --device-k --out "$RES/span_stack"
      run_stage span_tests 420 "$PY" -m pytest -q -p no:cacheprovider tests/kernels/test_triton_bitplane.py \
        tests/kernels/test_gluon_fragment.py -k "bits_kernel_span or site_bits_span or two_bodies or in_a_span" ;;
    tiling)
      run_stage router_tests 300 "$PY" -m pytest -q -p no:cacheprovider tests/kernels/test_triton_router.py \
        tests/kernels/test_fused_inputs.py
      # shellcheck disable=SC2086  # the sweep's arguments split on spaces
      run_stage router_sweep 420 "$PY" benchmarks/router_launch_bench.py --sweep --out "$RES/router_sweep" \
        $ROUTER_SWEEP --inputs "$ROUTER_INPUTS"
      local pick
      pick=$("$PY" -c "import pandas as pd, sys; d = pd.read_csv(sys.argv[1]); \
d = d[d.input.isin(['8b o (4096)', '8b down (14336)']) & (d.tokens == 1)]; \
t = d.groupby(['hidden_per_program', 'num_warps', 'cols_per_program']).us.sum().idxmin(); \
print(','.join(str(int(v)) for v in t))" "$RES/router_sweep/router_sweep.csv" 2>/dev/null || true)
      pick=${pick:-1,4,0}  # no sweep to read: whole rows
      echo "== stack router tiling: $pick"
      run_stage stack_tiling 900 "$PY" benchmarks/decode_bench.py --slices 3,1,1,1,1,1 --bits --no-package \
        --router-tiling "$pick" --out "$RES/stack_tiling"
      run_stage stack_whole_rows 900 "$PY" benchmarks/decode_bench.py --slices 3,1,1,1,1,1 --bits --no-package \
        --router-tiling 1,4,0 --out "$RES/stack_whole_rows" ;;
    pattern)
      run_stage pattern 600 "$PY" benchmarks/stream_pattern.py --views 1,2,6 \
        --package-configs "$PATTERN_CONFIGS" --out "$RES/pattern" ;;
    *)
      echo "unknown stage '$1' (stages: tests kernels routers stack e2e pattern tiling package placement pdl spandef spanrule spancost loads lean attn prologues block pdlstatic epikinds routedepi routedsite routertail blockstatic chain tailcensus stepcensus pick programs inflight longctx epilogues span gluon fragment tma compile solo ckpt prefill prompt int4mm adjacent)" >&2
      return 2 ;;
  esac
}

nvidia-smi --query-gpu=name,clocks.max.sm,memory.total --format=csv,noheader 2>/dev/null
"$PY" -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
for s in "${@:-stack kernels routers e2e tests}"; do
  for t in $s; do
    stage "$t" || exit $?
  done
done

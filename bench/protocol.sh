#!/usr/bin/env bash
# The leaderboard protocol (issues 9, 21, 22): Table 1 (uniform and allocated rows, three calibration
# seeds at 0.3/0.4), Tables 3 and 4 with paired bootstrap CIs, the adaptive window budget, and the
# activation-similarity analysis, on SmolLM2-135M-Instruct, sized for <= 3 hours on a 2-core CPU.
#
#   bench/protocol.sh [all|first|adapt|similarity|tables|estimate|cost]      (default: all)
#
#   all         first (worker b ends with the similarity), adapt, tables; one wall time for all of it (logs/wall.txt) and
#               one line per stage and sweep (logs/stages.tsv)
#   estimate    what a run from here would cost: every sweep's command priced by bench/protocol_estimate.py
#               (windows and recompressions still to do, times the measured unit costs)
#   cost        worker time spent so far, from the results files
#
# How it gets under 3 hours (bench/results/protocol/README.md has the numbers):
# * a cheap first pass (FIRST_WINDOWS per set), then windows only where a cell is still open:
#   `nsvd-lm adapt` gives every nsvd-i cell at ADAPT_RATIOS that contains 0 and is wider than +-5
#   points more windows (nested, so pairs stay window by window), until it is decided, narrow, the
#   set is exhausted, or the calibration seeds' spread alone is wider than the target (then only more
#   seeds would help: the report says about how many), within ADAPT_BUDGET_S per worker; worker a
#   takes the uniform rows, worker b the allocated ones (disjoint files, so both run at once);
# * each sweep builds its tasks once (every set tokenized once for all its configurations), shares
#   first-step SVDs across ratios (--reuse-svd) and the allocation curves (cached per statistics);
# * rows that cannot change a conclusion get few windows (SVD and ASVD-0 collapse: COLLAPSE_WINDOWS;
#   ASVD-II / NSVD-II, the paper's equivalents: EQUIVALENT_WINDOWS), and no row is run twice
#   (Table 3's k1=0.95 row is Table 1's NSVD-I, its k1=1.0 row is ASVD-I; Table 4 pairs with Table 3).
#
# Two workers, one per core (OMP_NUM_THREADS=1 each), about equal work. Everything resumes: a sweep
# skips finished configurations (results written atomically) and tops up files that hold fewer
# windows than asked; the adaptive pass re-reads its state from the files; the calibration
# statistics and allocation curves are cached (file-locked between the workers). A killed run loses
# at most the configuration in progress: rerun the same command.
#
# Small-scale check of the whole pipeline (tests/test_protocol_small.py runs it on a tiny model):
#   MODEL=... TASKS=nsvd_wikitext2,nsvd_ptb MAX_LENGTH=64 CALIB=/path/corpus.txt CALIB_NSAMPLES=4 \
#   CALIB_SEQLEN=32 SIM_NSAMPLES=2 SIM_SEQLEN=32 OUT=/tmp/p bench/protocol.sh all
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
. "$ROOT/bench/env.sh"  # offline, one thread, AVX2 kernels pinned (reproducible numbers)

PART="${1:-all}"
MODEL="${MODEL:-$(python -c 'from nsvd_lm.smollm2 import smollm2_path; print(smollm2_path())')}"
OUT="${OUT:-bench/results/protocol}"
SWEEPS="$OUT/sweeps"
LOGS="$OUT/logs"
# Statistics computed under the pinned kernels, apart from caches filled under other settings.
CACHE="${CACHE:-${NSVD_LM_CACHE:-$HOME/.cache/nsvd_lm}/stats-protocol}"
TASKS="${TASKS:-nsvd_ppl}"
MAX_LENGTH="${MAX_LENGTH:-1024}"
CALIB="${CALIB:-wikitext2}"
CALIB_NSAMPLES="${CALIB_NSAMPLES:-64}"
CALIB_SEQLEN="${CALIB_SEQLEN:-512}"

# ---- what is scored (one place; every stage and the estimate read these) ----------------------
RATIOS="${RATIOS:-0.1,0.2,0.3,0.4,0.5}"
SEED_RATIOS="${SEED_RATIOS:-0.3,0.4}"  # seeds 4 and 5 too (seed 3 everywhere)
TABLE1_METHODS="asvd-i,nsvd-i"
# Table 1 row groups by rank_allocation (issue 21: NSVD with allocation vs ASVD with allocation).
ALLOCATIONS="${ALLOCATIONS:-uniform fisher}"
# Sequential (propagation-aware) compression + allocation rows (issue 21 item 3): `sequential=true` is
# on main (0ec10c4), but its measurement against the 75 % goal was still running when this was
# written (2026-12-07), so the rows are off: SEQUENTIAL_ALLOCATIONS="fisher" adds them (sweeps/seq-fisher).
SEQUENTIAL_ALLOCATIONS="${SEQUENTIAL_ALLOCATIONS:-}"
# Table 1 first pass: the ratios the adaptive pass works on start at its minimum (8 windows per set:
# no cell is decided on fewer), the others, whose cells are +20 ... +500 % apart, at a screen of 3.
FIRST_WINDOWS="${FIRST_WINDOWS:-*=8}"            # rows at ADAPT_RATIOS
SCREEN_WINDOWS="${SCREEN_WINDOWS:-*=3}"          # rows at the other ratios
COLLAPSE_WINDOWS="${COLLAPSE_WINDOWS:-*=1}"      # svd, asvd-0: ppl 1e4-1e8, a window shows it
EQUIVALENT_WINDOWS="${EQUIVALENT_WINDOWS:-*=1}"  # asvd-ii, nsvd-ii (the paper: = asvd-i, nsvd-i)
TABLE34_WINDOWS="${TABLE34_WINDOWS:-*=3}"
TABLE34_RATIOS="${TABLE34_RATIOS:-0.2,0.3,0.4}"
K1_TABLE3="${K1_TABLE3:-0.99,0.9,0.8}"           # + 0.95 (= Table 1's nsvd-i) and 1.0 (= asvd-i)
K1_TABLE4="${K1_TABLE4:-0.95,0.9}"               # NID-I and NID-II, paired with NSVD-I at the same k1
ADAPT_METHODS="${ADAPT_METHODS:-nsvd-i}"         # issue 22's goal: nsvd-i cells at 0.1-0.3
ADAPT_RATIOS="${ADAPT_RATIOS:-0.1,0.2,0.3}"      # the rule's ratios (worker a: uniform rows, b: allocated)
# Per worker, estimated seconds of top-ups. 1,200 (the first cold run, 2026-12-07) left 0.3's two
# open cells (80 and 120 windows of three seeds' runs: ~2,600 and ~3,900 s) unextended; 4,000 pays
# for both, and the whole protocol stays under 3 h (5,944 s first pass + 4,000 + the tables).
ADAPT_BUDGET_S="${ADAPT_BUDGET_S:-4000}"
ADAPT_COSTS=(--window-seconds "${ADAPT_WINDOW_S:-5.4}" --compress-seconds "${ADAPT_COMPRESS_S:-50}")  # SmolLM2
SIM_SEEDS="${SIM_SEEDS:-3 4 5}"
SIM_NSAMPLES="${SIM_NSAMPLES:-16}"
SIM_SEQLEN="${SIM_SEQLEN:-512}"
SIM_DATASETS="${SIM_DATASETS:-wikitext2,ptb,c4,snips,alpaca_eval,mctest,cmrc,alpaca_eval_ja}"

CALIB_ARGS=(--calib-dataset "$CALIB" --calib-nsamples "$CALIB_NSAMPLES" --calib-seqlen "$CALIB_SEQLEN"
            --cache-dir "$CACHE")
EVAL_ARGS=(--tasks "$TASKS" --device cpu --batch-size 1 --no-leaderboard --reuse-svd)
PLAN_ONLY=0  # 1 (the estimate): print each stage's command line instead of running it

stage() {  # stage NAME CMD...: run it, and log its wall time (logs/stages.tsv: name, seconds, exit, end)
  local name="$1" started status=0
  shift
  if [ "$PLAN_ONLY" = 1 ]; then
    printf 'PLAN\t%s\t' "$name"; printf '%q ' "$@"; printf '\n'
    return 0
  fi
  started=$(date +%s)
  "$@" || status=$?
  printf '%s\t%s\t%s\t%s\n' "$name" "$(( $(date +%s) - started ))" "$status" "$(date -Is)" >> "$LOGS/stages.tsv"
  return "$status"
}

sweep() {  # sweep NAME WINDOWS MODEL_ARGS ARGS...
  local name="$1" windows="$2" model_args="$3"
  shift 3
  echo "== $name ($*): $(date -Is)"
  stage "sweep $name" nsvd-lm sweep --model "$MODEL" --output "$SWEEPS/$name" "${CALIB_ARGS[@]}" "${EVAL_ARGS[@]}" \
    --model-args "dtype=float32,max_length=$MAX_LENGTH$model_args" --windows "$windows" "$@"
}

folder() {  # the sweep folder of a Table 1 row group: uniform -> headline (the committed name), else the allocation
  case "$1" in uniform) echo headline ;; *) echo "$1" ;; esac
}

split_ratios() {  # split_ratios LIST: "adapted,ratios others" (either part may be empty: "-")
  local adapted="" others="" r
  for r in ${1//,/ }; do
    if [[ ",$ADAPT_RATIOS," == *",$r,"* ]]; then adapted+="${adapted:+,}$r"; else others+="${others:+,}$r"; fi
  done
  echo "${adapted:--} ${others:--}"
}

table1_rows() {  # table1_rows ALLOCATION [MODEL_ARGS_EXTRA] [PREFIX]: seed 3 at every ratio, 4 and 5 at SEED_RATIOS
  local allocation="$1" extra="${2:-}" prefix="${3:-}" name args="" adapted others seeds ratios
  name="$prefix$(folder "$allocation")"
  local original=()
  [ "$allocation" = uniform ] && [ -z "$prefix" ] && original=(--include-original)
  # uniform rows pass no rank_allocation at all: exactly the paper's protocol (and the committed files' settings)
  [ "$allocation" = uniform ] || args=",rank_allocation=$allocation"
  for seeds in 3 4,5; do
    ratios="$RATIOS"
    [ "$seeds" = 3 ] || ratios="$SEED_RATIOS"
    read -r adapted others < <(split_ratios "$ratios")
    if [ "$adapted" != - ]; then
      sweep "$name" "$FIRST_WINDOWS" "$args$extra" --methods "$TABLE1_METHODS" --ratios "$adapted" --seeds "$seeds" \
        "${original[@]}"
      original=()
    fi
    if [ "$others" != - ]; then
      sweep "$name" "$SCREEN_WINDOWS" "$args$extra" --methods "$TABLE1_METHODS" --ratios "$others" --seeds "$seeds" \
        "${original[@]}"
      original=()
    fi
  done
}

worker_a() {
  table1_rows uniform
  sweep table3 "$TABLE34_WINDOWS" "" --methods nsvd-i --ratios "$TABLE34_RATIOS" --k1-fracs "$K1_TABLE3" --seeds 3
  sweep table4 "$TABLE34_WINDOWS" "" --methods nid-i --ratios "$TABLE34_RATIOS" --k1-fracs "$K1_TABLE4" --seeds 3
  sweep reduced "$EQUIVALENT_WINDOWS" "" --methods asvd-ii,nsvd-ii --ratios "$RATIOS" --seeds 3
}

worker_b() {
  local allocation
  for allocation in $ALLOCATIONS; do
    [ "$allocation" = uniform ] || table1_rows "$allocation"
  done
  for allocation in $SEQUENTIAL_ALLOCATIONS; do
    table1_rows "$allocation" ",sequential=true" seq-
  done
  sweep table4 "$TABLE34_WINDOWS" "" --methods nid-ii --ratios "$TABLE34_RATIOS" --k1-fracs "$K1_TABLE4" --seeds 3
  sweep collapse "$COLLAPSE_WINDOWS" "" --methods svd,asvd-0 --ratios "$RATIOS" --seeds 3
  similarity
}

table1_sources() {  # every Table 1 folder that has results
  local part
  # seed4/seed5: where the issue 9 run kept seeds 4 and 5 (now in each row group's own folder)
  for part in headline seed4 seed5 $ALLOCATIONS $(for a in $SEQUENTIAL_ALLOCATIONS; do echo "seq-$a"; done) \
      reduced collapse; do
    [ "$part" = uniform ] && continue
    [ -n "$(ls "$SWEEPS/$part"/*.json 2>/dev/null)" ] && echo "$SWEEPS/$part"
  done
  return 0
}

adapt() {  # adapt WORKER ALLOCATIONS (comma-separated rank_allocation values; empty: nothing to do)
  local sources
  [ -n "$2" ] || return 0
  mapfile -t sources < <(table1_sources)
  echo "== adapt $1 ($2): $(date -Is)"
  stage "adapt $1" nsvd-lm adapt "${sources[@]}" --methods "$ADAPT_METHODS" --ratios "$ADAPT_RATIOS" \
    --allocations "$2" --reuse-svd --device cpu \
    --budget-seconds "$ADAPT_BUDGET_S" "${ADAPT_COSTS[@]}" --report "$OUT/adaptive_$1.json"
}

similarity() {
  echo "== similarity: $(date -Is)"
  local seed
  for seed in $SIM_SEEDS; do
    stage "similarity seed $seed" nsvd-lm similarity --model "$MODEL" --calib "$CALIB" --datasets "$SIM_DATASETS" \
      --nsamples "$SIM_NSAMPLES" --seqlen "$SIM_SEQLEN" --calib-nsamples "$CALIB_NSAMPLES" \
      --calib-seqlen "$CALIB_SEQLEN" --seed "$seed" --cache-dir "$CACHE" --out "$OUT/similarity_s$seed" \
      --command "bench/protocol.sh (seed $seed)"
  done
}

tables() {  # from whatever has finished so far (a partial run renders partial tables)
  local table1=() table34=()
  mapfile -t table1 < <(table1_sources)
  [ ${#table1[@]} -gt 0 ] && nsvd-lm leaderboard "${table1[@]}" --versus uniform --out "$OUT/table1" > /dev/null
  # Tables 3 and 4: the k1 grids with their ratios' uniform ASVD-I and NSVD-I (k1 = 0.95) rows, seed 3.
  local ratio method f
  for ratio in ${TABLE34_RATIOS//,/ }; do
    for method in asvd-i nsvd-i; do
      f="$SWEEPS/headline/${method}_r${ratio}.json"
      [ -f "$f" ] && table34+=("$f")
    done
  done
  if [ -n "$(ls "$SWEEPS/table3"/*.json 2>/dev/null)" ]; then
    nsvd-lm leaderboard "$SWEEPS/table3" "${table34[@]}" --out "$OUT/table3" > /dev/null
  fi
  if [ -n "$(ls "$SWEEPS/table4"/*.json 2>/dev/null)" ]; then
    nsvd-lm leaderboard "$SWEEPS/table4" "$SWEEPS/table3" "${table34[@]}" --versus nsvd --out "$OUT/table4" > /dev/null
  fi
  ls "$OUT"/table*.md 2>/dev/null || true
}

cost() {  # core-seconds per part from the results files (each configuration's wall time on its worker)
  python - "$SWEEPS" <<'PY'
import json, sys
from pathlib import Path
total = 0.0
for part in sorted(p for p in Path(sys.argv[1]).iterdir() if p.is_dir()):
    seconds = []
    for f in sorted(part.glob("*.json")):
        sweep = json.loads(f.read_text())["nsvd_sweep"]
        seconds.append(sweep["seconds"] + sum(e["seconds"] for e in sweep.get("extensions", [])))
    total += sum(seconds)
    print(f"{part.name:10} {len(seconds):3d} configurations {sum(seconds) / 3600:6.2f} h")
print(f"{'total':10} {total / 3600:20.2f} h of worker time (two workers run at once)")
PY
}

run_parallel() {  # run_parallel NAME FUNC_A FUNC_B: both workers at once, one stage line for the pair
  local name="$1" started status=0 a b
  started=$(date +%s)
  "$2" > "$LOGS/${name}_a.log" 2>&1 &
  a=$!
  "$3" > "$LOGS/${name}_b.log" 2>&1 &
  b=$!
  wait "$a" || status=$?
  wait "$b" || status=$?
  printf '%s\t%s\t%s\t%s\n' "$name (both workers)" "$(( $(date +%s) - started ))" "$status" "$(date -Is)" \
    >> "$LOGS/stages.tsv"
  return "$status"
}

allocated() {  # the allocated row groups (ALLOCATIONS without uniform), comma-separated
  local a out=""
  for a in $ALLOCATIONS; do [ "$a" = uniform ] || out+="${out:+,}$a"; done
  echo "$out"
}

adapt_a() { if [[ " $ALLOCATIONS " == *" uniform "* ]]; then adapt a uniform; fi; }
adapt_b() { adapt b "$(allocated)"; }

estimate() {  # every stage's command, priced by bench/protocol_estimate.py (nothing is run or tokenized)
  PLAN_ONLY=1
  mkdir -p "$LOGS"
  local plan="$LOGS/estimate_plan.txt"
  # Paths as names.portable writes them (~/..., $NSVD_LM_DATA_DIR/...): the plan is committed.
  { echo "## worker a"; worker_a; echo "## worker b"; worker_b; echo "## adapt"; adapt_a; adapt_b; } \
    | python -c 'import sys; from nsvd_lm.names import portable_text; sys.stdout.write(portable_text(sys.stdin.read()))' \
    > "$plan"
  python bench/protocol_estimate.py "$plan" --sweeps "$SWEEPS" --adapt-budget "$ADAPT_BUDGET_S" \
    --json "$LOGS/estimate.json"
}

case "$PART" in
  all)
    mkdir -p "$LOGS"
    started=$(date +%s)
    status=0
    run_parallel first worker_a worker_b || status=$?  # worker b ends with the similarity analysis
    [ "$status" -eq 0 ] && { run_parallel adapt adapt_a adapt_b || status=$?; }
    [ "$status" -eq 0 ] && { stage tables tables || status=$?; }
    echo "protocol: $(( $(date +%s) - started )) s wall for all of it (first pass + similarity, adapt, tables)," \
      "exit $status" | tee -a "$LOGS/wall.txt"
    exit "$status"
    ;;
  first) mkdir -p "$LOGS"; run_parallel first worker_a worker_b ;;
  adapt) mkdir -p "$LOGS"; run_parallel adapt adapt_a adapt_b ;;
  similarity) mkdir -p "$LOGS"; stage similarity similarity ;;
  tables) tables ;;
  estimate) estimate ;;
  cost) cost ;;
  *)
    echo "usage: bench/protocol.sh [all|first|adapt|similarity|tables|estimate|cost]" >&2
    exit 2
    ;;
esac

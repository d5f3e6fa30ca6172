#!/usr/bin/env bash
# The leaderboard protocol (issue 9): Tables 1, 3 and 4 with paired bootstrap CIs, three
# calibration seeds for the headline pair, and the activation-similarity analysis, on
# SmolLM2-135M-Instruct, sized to run in about 3 hours on a 2-core CPU.
#
#   bench/protocol.sh [run|tables|cost]      (default: run, then tables; cost: worker time so far)
#
# Why these window counts: bench/results/protocol/README.md (from the pilot in
# bench/results/protocol/pilot, read by bench/protocol_pilot.py). Headline rows (ASVD-I and NSVD-I
# at every ratio, + the original) score HEADLINE_WINDOWS per set: what the pilot says meets a 5-point
# CI half-width at ratio 0.3 on the five quieter sets, and what the 3-hour budget leaves for
# AlpacaEval, AlpacaEval-JA and CMRC (which would need their whole sets, and more at 0.4-0.5).
# Rows that cannot change a conclusion (SVD and ASVD-0 collapse; the paper calls ASVD-II and
# NSVD-II equivalent to ASVD-I and NSVD-I) score REDUCED_WINDOWS and the k1 grids of Tables 3/4
# TABLE34_WINDOWS: nested subsets of the headline windows (nsvd-lm sweep --windows), marked ‡.
#
# Two workers, one per core (OMP_NUM_THREADS=1 each), about equal work: A = the headline grid
# (seed 3) and Tables 3/4; B = the reduced rows, seeds 5 and 4 of the headline pair at ratios
# 0.3/0.4, the similarity under seeds 3/4/5. Everything
# resumes: a sweep skips configurations whose results file exists (written atomically), the
# calibration statistics are cached (one forward pass per seed, file-locked between the workers),
# so a killed run loses at most the configuration in progress; rerun the same command.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
. "$ROOT/bench/env.sh"  # offline, one thread, AVX2 kernels pinned (reproducible numbers)

PART="${1:-all}"
MODEL="${MODEL:-$(python -c 'from nsvd_lm.smollm2 import smollm2_path; print(smollm2_path())')}"
OUT="${OUT:-bench/results/protocol}"
SWEEPS="$OUT/sweeps"
# Statistics computed under the pinned kernels, apart from caches filled under other settings.
CACHE="${CACHE:-${NSVD_LM_CACHE:-$HOME/.cache/nsvd_lm}/stats-protocol}"
HEADLINE_WINDOWS="${HEADLINE_WINDOWS:-nsvd_wikitext2=12,nsvd_ptb=16,nsvd_c4=28,nsvd_snips=9,nsvd_mctest=12,nsvd_alpaca_eval=32,nsvd_alpaca_eval_ja=32,nsvd_cmrc=40}"
REDUCED_WINDOWS="${REDUCED_WINDOWS:-*=4}"
TABLE34_WINDOWS="${TABLE34_WINDOWS:-*=6}"
RATIOS="0.1,0.2,0.3,0.4,0.5"
SEED_RATIOS="0.3,0.4"
K1_GRID="0.99,0.95,0.9,0.85,0.8"
SIM_NSAMPLES="${SIM_NSAMPLES:-16}"

CALIB_ARGS=(--calib-dataset wikitext2 --calib-nsamples 64 --calib-seqlen 512 --cache-dir "$CACHE")
EVAL_ARGS=(--tasks nsvd_ppl --model-args "dtype=float32,max_length=1024" --device cpu --batch-size 1
           --no-leaderboard --reuse-svd)

sweep() {  # sweep NAME WINDOWS ARGS...
  local name="$1" windows="$2"; shift 2
  echo "== $name ($*): $(date -Is)"
  nsvd-lm sweep --model "$MODEL" --output "$SWEEPS/$name" "${CALIB_ARGS[@]}" "${EVAL_ARGS[@]}" \
    --windows "$windows" "$@"
}

worker_a() {
  sweep headline "$HEADLINE_WINDOWS" --methods asvd-i,nsvd-i --ratios "$RATIOS" --seeds 3 --include-original
  sweep table3 "$TABLE34_WINDOWS" --methods nsvd-i --ratios 0.3 --k1-fracs 0.99,0.9,0.85,0.8 --seeds 3
  sweep table4 "$TABLE34_WINDOWS" --methods nid-i --ratios 0.3 --k1-fracs "$K1_GRID" --seeds 3
}

worker_b() {
  sweep reduced "$REDUCED_WINDOWS" --methods svd,asvd-0,asvd-ii,nsvd-ii --ratios "$RATIOS" --seeds 3
  sweep seed5 "$HEADLINE_WINDOWS" --methods asvd-i,nsvd-i --ratios "$SEED_RATIOS" --seeds 5
  sweep seed4 "$HEADLINE_WINDOWS" --methods asvd-i,nsvd-i --ratios "$SEED_RATIOS" --seeds 4
  echo "== similarity: $(date -Is)"
  for seed in 3 4 5; do
    nsvd-lm similarity --model "$MODEL" --calib wikitext2 \
      --datasets wikitext2,ptb,c4,snips,alpaca_eval,mctest,cmrc,alpaca_eval_ja \
      --nsamples "$SIM_NSAMPLES" --seqlen 512 --calib-nsamples 64 --calib-seqlen 512 --seed "$seed" \
      --cache-dir "$CACHE" --out "$OUT/similarity_s$seed" --command "bench/protocol.sh (seed $seed)"
  done
}

tables() {  # from whatever has finished so far (a partial run renders partial tables)
  local headline="$SWEEPS/headline" table1=() seed3=()
  for part in headline seed4 seed5 reduced; do
    [ -n "$(ls "$SWEEPS/$part"/*.json 2>/dev/null)" ] && table1+=("$SWEEPS/$part")
  done
  for f in "$headline/asvd-i_r0.3.json" "$headline/nsvd-i_r0.3.json"; do [ -f "$f" ] && seed3+=("$f"); done
  [ ${#table1[@]} -gt 0 ] && nsvd-lm leaderboard "${table1[@]}" --out "$OUT/table1" > /dev/null
  for t in table3 table4; do
    if [ -n "$(ls "$SWEEPS/$t"/*.json 2>/dev/null)" ]; then
      nsvd-lm leaderboard "$SWEEPS/$t" "${seed3[@]}" --out "$OUT/$t" > /dev/null
    fi
  done
  ls "$OUT"/table*.md 2>/dev/null || true
}

cost() {  # core-seconds per part from the results files (each configuration's wall time on its worker)
  python - "$SWEEPS" <<'PY'
import json, sys
from pathlib import Path
total = 0.0
for part in sorted(p for p in Path(sys.argv[1]).iterdir() if p.is_dir()):
    seconds = [json.loads(f.read_text())["nsvd_sweep"]["seconds"] for f in sorted(part.glob("*.json"))]
    total += sum(seconds)
    print(f"{part.name:10} {len(seconds):3d} configurations {sum(seconds) / 3600:6.2f} h")
print(f"{'total':10} {total / 3600:20.2f} h of worker time (two workers run at once)")
PY
}

case "$PART" in
  run|all)
    mkdir -p "$OUT/logs"
    started=$(date +%s)
    worker_a > "$OUT/logs/worker_a.log" 2>&1 &
    a=$!
    worker_b > "$OUT/logs/worker_b.log" 2>&1 &
    b=$!
    status=0
    wait "$a" || status=$?
    wait "$b" || status=$?
    echo "protocol run: $(( $(date +%s) - started )) s wall, exit $status" | tee -a "$OUT/logs/wall.txt"
    [ "$status" -eq 0 ] || exit "$status"
    ;;&
  tables|all)
    tables
    ;;
  cost)
    cost
    ;;
  run) ;;
  *)
    echo "usage: bench/protocol.sh [run|tables|cost|all]" >&2
    exit 2
    ;;
esac

#!/usr/bin/env bash
# Rank allocation on SmolLM2-135M-Instruct (issue 12): each criterion of nsvd_lm/allocation.py
# against the paper's uniform ranks, for asvd-i and nsvd-i at ratios 0.2-0.5, on all eight sets.
#
#   bench/rank_allocation.sh [run|report]      (default: run, then report)
#
# Uniform is the leaderboard protocol's headline grid (bench/protocol.sh: same calibration, seed 3,
# same statistics cache); each criterion scores WINDOWS per set, a nested subset of the headline
# windows, so every comparison is paired window by window (bench/rank_allocation_report.py).
# The criteria's curves are cached beside the statistics, so each method pays for them once, at
# its first ratio. Resumes like the protocol: finished configurations are skipped.
# Environment: CRITERIA, METHODS, RATIOS, WINDOWS override the grid. SEQUENTIAL=1 (issue 21) runs each
# criterion (uniform included: CRITERIA=uniform) with sequential=true into sweeps/sequential-<criterion>,
# on the same windows and calibration, so it pairs with the uniform headline runs the same way.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
. "$ROOT/bench/env.sh"  # offline, one thread, AVX2 kernels pinned (reproducible numbers)

PART="${1:-all}"
MODEL="${MODEL:-$(python -c 'from nsvd_lm.smollm2 import smollm2_path; print(smollm2_path())')}"
OUT="${OUT:-bench/results/rank_allocation}"
UNIFORM="${UNIFORM:-bench/results/protocol/sweeps/headline}"
CACHE="${CACHE:-${NSVD_LM_CACHE:-$HOME/.cache/nsvd_lm}/stats-protocol}"
CRITERIA="${CRITERIA:-fisher,block_error,sensitivity}"
METHODS="${METHODS:-asvd-i,nsvd-i}"
RATIOS="${RATIOS:-0.2,0.3,0.4,0.5}"
WINDOWS="${WINDOWS:-*=4}"
SEQUENTIAL="${SEQUENTIAL:-0}"

run() {
  mkdir -p "$OUT/logs"
  for criterion in ${CRITERIA//,/ }; do
    local name="$criterion" args="dtype=float32,max_length=1024,rank_allocation=$criterion"
    if [ "$SEQUENTIAL" = 1 ]; then name="sequential-$criterion" args="$args,sequential=true"; fi
    echo "== $name ($METHODS @ $RATIOS, windows $WINDOWS): $(date -Is)"
    nsvd-lm sweep --model "$MODEL" --output "$OUT/sweeps/$name" \
      --calib-dataset wikitext2 --calib-nsamples 64 --calib-seqlen 512 --cache-dir "$CACHE" \
      --tasks nsvd_ppl --model-args "$args" \
      --device cpu --batch-size 1 --no-leaderboard --reuse-svd --windows "$WINDOWS" \
      --methods "$METHODS" --ratios "$RATIOS" --seeds 3
  done
}

report() {
  python bench/rank_allocation_report.py --uniform "$UNIFORM" --sweeps "$OUT/sweeps" --out "$OUT"
}

case "$PART" in
  run) run ;;
  report) report ;;
  all) run && report ;;
  *) echo "usage: bench/rank_allocation.sh [run|report|all]" >&2; exit 2 ;;
esac

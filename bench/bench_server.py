"""Serving speed, side by side in one run: ``nsvd-lm serve`` on the nsvd-i 0.4 export and on the
dense export, and ``transformers serve --continuous-batching`` (dense PyTorch), SmolLM2-135M.

Every server gets the same requests and the same treatment:

* OpenAI chat completions (``/v1/chat/completions``, not streamed, ``temperature: 0``), prompts that
  ask for long answers, so the instruct model really produces ``--max-tokens`` tokens (the share of
  full-length answers is reported: a prompt the model ends early measures prefill, not decode);
* loads: 1, 8, 16 and 64 concurrent clients (``--clients``; each client sends ``--requests``
  requests in a row), and a prefill-heavy load (``--prefill-clients`` clients, prompts of 512-1,024
  tokens of WikiText-2 text plus an instruction, 64 new tokens);
* per round, each server is started fresh, warmed up with one pass of the widest load, measured on
  every load, and stopped; the server order rotates from round to round (interleaved rounds);
* throughput = completion tokens (from ``usage``) of all requests / wall time of the load; the
  median over ``--rounds`` (>= 3) rounds is reported with the min-max range.

Writes --out (Markdown) and the same numbers as JSON next to it. Run under the bench lock:

    flock /tmp/nsvd-bench.lock nice -n 5 python bench/bench_server.py \
        --onnx "nsvd-i 0.4"=DIR --onnx dense=DIR --transformers dense=HF_DIR
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import platform
import random
import shlex
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from nsvd_lm.names import portable, portable_text

REPO = Path(__file__).resolve().parents[1]
TOPICS = [
    "the history of the Roman Empire",
    "how a steam engine works",
    "the life cycle of a star",
    "the causes of the French Revolution",
    "how bread is baked, from flour to loaf",
    "the planets of the solar system",
    "the invention of the printing press",
    "how the human heart works",
    "the history of the bicycle",
    "why the sky is blue",
    "how computers store numbers",
    "the rules and history of chess",
    "the water cycle",
    "the building of the pyramids of Egypt",
    "how vaccines train the immune system",
    "the migration of birds",
]
TEMPLATES = [
    "Write a long, detailed essay about {}. Use several paragraphs.",
    "Explain {} in great detail, step by step, for a curious student.",
    "Tell me everything you know about {}, in a long answer.",
    "Write a detailed, multi-paragraph article about {}.",
]
PREFILL_INSTRUCTION = "\n\nSummarize the text above in detail, paragraph by paragraph."


def short_prompts() -> list[str]:
    return [t.format(topic) for topic in TOPICS for t in TEMPLATES]


def long_prompts(tokenizer, count: int, data_dir: Path, seed: int = 0) -> list[str]:
    """``count`` WikiText-2 passages of 512-1,024 tokens (random lengths, seeded) + an instruction."""
    text = (data_dir / "wikitext2" / "wiki.test.raw").read_text(encoding="utf-8")
    ids = tokenizer(text[:2_000_000], add_special_tokens=False)["input_ids"]
    rng = random.Random(seed)
    prompts = []
    for _ in range(count):
        n = rng.randint(512, 1024)
        start = rng.randrange(0, len(ids) - n)
        prompts.append(tokenizer.decode(ids[start : start + n]) + PREFILL_INSTRUCTION)
    return prompts


# ------------------------------------------------------------------------------------------------
# Servers
# ------------------------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """One server process: ``kind`` "nsvd" (``nsvd-lm serve``) or "transformers" (``transformers serve``)."""

    def __init__(self, name: str, kind: str, path: str, args) -> None:
        self.name, self.kind, self.path, self.args = name, kind, path, args
        self.proc: subprocess.Popen | None = None
        self.model = None

    def start(self) -> None:
        port = _free_port()
        env = {
            **os.environ,
            "HF_HUB_OFFLINE": "1",
            "HF_DATASETS_OFFLINE": "1",
            "OMP_NUM_THREADS": str(self.args.threads),
            "TOKENIZERS_PARALLELISM": "false",
        }
        if self.kind == "nsvd":
            cmd = [
                sys.executable, "-m", "nsvd_lm", "serve", "--onnx", self.path, "--port", str(port),
                "--threads", str(self.args.threads), "--backend", self.args.backend,
                "--max-batch-seqs", "16", "--max-queue", "256", "--max-prompt-tokens", "2048",
                "--provider", self.args.provider,
            ]  # fmt: skip
            self.model = Path(self.path).name
        else:
            cmd = [
                "transformers", "serve", "--continuous-batching", "--device", self.args.device,
                "--dtype", self.args.dtype,
                "--host", "127.0.0.1", "--port", str(port), "--log-level", "warning", self.path,
            ]  # fmt: skip
            self.model = self.path
        self.log = open(Path(self.args.log_dir) / f"{self.name.replace(' ', '_')}.log", "ab")
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT, env=env)
        self.address = ("127.0.0.1", port)
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name}: server exited (see {self.log.name})")
            try:
                conn = http.client.HTTPConnection(*self.address, timeout=5)
                conn.request("GET", "/health")
                if conn.getresponse().status == 200:
                    conn.close()
                    return
            except OSError:
                time.sleep(0.5)
        raise RuntimeError(f"{self.name}: no /health within 600 s")

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
            self.proc = None
            self.log.close()


def chat_request(server: Server, prompt: str, max_tokens: int) -> dict:
    body = json.dumps(
        {
            "model": server.model,
            "messages": [{"role": "user", "content": prompt}],
            "max_tokens": max_tokens,
            "temperature": 0,
        }
    )
    start = time.perf_counter()
    conn = http.client.HTTPConnection(*server.address, timeout=1800)
    try:
        conn.request("POST", "/v1/chat/completions", body=body, headers={"Content-Type": "application/json"})
        response = conn.getresponse()
        raw = response.read()
        if response.status != 200:
            return {"ok": False, "status": response.status, "error": raw[:300].decode("latin-1")}
        data = json.loads(raw)
        usage = data.get("usage") or {}
        return {
            "ok": True,
            "latency": time.perf_counter() - start,
            "completion_tokens": int(usage.get("completion_tokens", 0)),
            "prompt_tokens": int(usage.get("prompt_tokens", 0)),
            "finish_reason": data["choices"][0].get("finish_reason"),
        }
    finally:
        conn.close()


def run_load(server: Server, prompts: list[str], clients: int, requests: int, max_tokens: int) -> dict:
    def client(i: int) -> list[dict]:
        return [chat_request(server, prompts[(i + r * clients) % len(prompts)], max_tokens) for r in range(requests)]

    start = time.perf_counter()
    with ThreadPoolExecutor(max_workers=clients) as pool:
        results = [r for rs in pool.map(client, range(clients)) for r in rs]
    wall = time.perf_counter() - start
    ok = [r for r in results if r["ok"]]
    tokens = sum(r["completion_tokens"] for r in ok)
    return {
        "requests": len(results),
        "ok": len(ok),
        "wall_s": wall,
        "completion_tokens": tokens,
        "prompt_tokens": sum(r["prompt_tokens"] for r in ok),
        "tok_per_s": tokens / wall,
        "full_length_share": sum(1 for r in ok if r["completion_tokens"] >= max_tokens) / max(len(ok), 1),
        "latency_p50_s": float(np.median([r["latency"] for r in ok])) if ok else float("nan"),
        "failures": [r for r in results if not r["ok"]][:3],
    }


# ------------------------------------------------------------------------------------------------
# Main
# ------------------------------------------------------------------------------------------------


def render(result: dict) -> str:
    a = result["args"]
    names = result["servers"]
    loads = result["loads"]
    lines = [
        "# Serving speed side by side: nsvd-i 0.4 export vs dense export vs `transformers serve` "
        f"(SmolLM2-135M, {'CPU' if a['provider'] == 'cpu' else a['provider'].upper()})",
        "",
        "```",
        result["command"],
        "```",
        "",
        f"Machine: {result['machine']}. **Shared**: the benchmark ran under the bench lock, but the other "
        f"core(s) were busy with other jobs' tests (load average {result['load_start']:.1f} at the start, "
        f"{result['load_end']:.1f} at the end), so absolute tok/s are below an idle machine's; the rounds are "
        "interleaved so all servers see the same conditions. "
        f"onnxruntime {result['versions']['onnxruntime']}, torch {result['versions']['torch']}, "
        f"transformers {result['versions']['transformers']}; {a['threads']} threads per server "
        f"(ORT intra-op / OMP); `nsvd-lm serve --backend {a['backend']} --provider {a['provider']}`, 16 rows; "
        f"`transformers serve --device {a['device']} --dtype {a['dtype']}`. "
        f"{a['rounds']} rounds; per round each server is started fresh, warmed up with one pass of the widest "
        "load, then measured on every load; server order rotates per round. Chat completions, greedy, "
        f"{a['max_tokens']} new tokens (prefill-heavy: 64) per request; throughput = completion tokens / wall "
        f"time; median over rounds (min-max). Total wall time {result['wall_s'] / 60:.1f} min.",
        "",
        "| load | " + " | ".join(f"{n} tok/s" for n in names) + " | full-length answers | p50 latency s |",
        "|---|" + "---:|" * len(names) + "---|---|",
    ]
    for load in loads:
        cells, full, lat = [], [], []
        for n in names:
            s = result["summary"][n][load]
            cells.append(f"{s['median']:.1f} ({s['min']:.1f}-{s['max']:.1f})")
            full.append(f"{100 * s['full_length_share']:.0f}%")
            lat.append(f"{s['latency_p50_s']:.1f}")
        lines.append(f"| {load} | " + " | ".join(cells) + f" | {' / '.join(full)} | {' / '.join(lat)} |")
    lines += ["", "## Against the goals", ""]
    for g in result["goals"]:
        lines.append(f"- {g['what']}: x{g['ratio']:.2f} (goal >= {g['goal']:.2f}: {'met' if g['met'] else 'NOT met'})")
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--onnx", action="append", default=[], metavar="NAME=DIR", help="an export for nsvd-lm serve")
    parser.add_argument(
        "--transformers", action="append", default=[], metavar="NAME=HF_DIR", help="a HF folder for transformers serve"
    )
    parser.add_argument("--clients", default="1,8,16,64")
    parser.add_argument("--requests", default="4,2,2,1", help="requests per client, per --clients entry")
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--prefill-clients", type=int, default=8, help="clients of the prefill-heavy load (0: none)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--backend", default="ort", help="nsvd-lm serve --backend (default ort)")
    parser.add_argument("--provider", default="cpu", help="nsvd-lm serve --provider (default cpu)")
    parser.add_argument("--device", default="cpu", help="transformers serve --device (default cpu)")
    parser.add_argument("--dtype", default="float32", help="transformers serve --dtype (default float32)")
    parser.add_argument("--out", default=str(REPO / "bench" / "results" / "server_speed.md"))
    parser.add_argument("--log-dir", default="/tmp/nsvd-bench-server-logs")
    args = parser.parse_args()
    if args.rounds < 3:
        parser.error("--rounds must be >= 3 (the report is a median)")
    clients = [int(c) for c in args.clients.split(",")]
    requests = [int(r) for r in args.requests.split(",")]
    if len(requests) != len(clients):
        parser.error("--requests needs one entry per --clients entry")
    servers = []
    for spec in args.onnx:
        name, _, folder = spec.partition("=")
        if not (Path(folder) / "model.onnx").is_file():
            parser.error(f"--onnx {spec}: no model.onnx in {folder}")
        servers.append(Server(name, "nsvd", folder, args))
    for spec in args.transformers:
        name, _, folder = spec.partition("=")
        if not (Path(folder) / "config.json").is_file():
            parser.error(f"--transformers {spec}: no config.json in {folder}")
        servers.append(Server(f"transformers serve {name}", "transformers", folder, args))
    if not servers:
        parser.error("give at least one --onnx or --transformers")
    Path(args.log_dir).mkdir(parents=True, exist_ok=True)

    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(servers[0].path)
    prompts = short_prompts()
    data_dir = Path(os.environ.get("NSVD_LM_DATA_DIR", REPO.parent / "shared" / "data"))
    long = long_prompts(tokenizer, max(args.prefill_clients, 1) * 2, data_dir) if args.prefill_clients else []
    loads = {f"{c} clients": (prompts, c, r, args.max_tokens) for c, r in zip(clients, requests)}
    if args.prefill_clients:
        loads[f"prefill-heavy, {args.prefill_clients} clients"] = (long, args.prefill_clients, 1, 64)
    widest = max(clients)

    load_start = os.getloadavg()[0]
    started = time.perf_counter()
    runs: dict = {s.name: {load: [] for load in loads} for s in servers}
    for r in range(args.rounds):
        order = servers[r % len(servers) :] + servers[: r % len(servers)]
        for server in order:
            print(f"[bench] round {r + 1}/{args.rounds}: {server.name}: start", flush=True)
            server.start()
            try:
                run_load(server, prompts, widest, 1, args.max_tokens)  # warm-up at the widest load
                for load, (ps, c, n, mt) in loads.items():
                    got = run_load(server, ps, c, n, mt)
                    runs[server.name][load].append(got)
                    print(
                        f"[bench]   {load}: {got['tok_per_s']:.1f} tok/s ({got['ok']}/{got['requests']} ok, "
                        f"{100 * got['full_length_share']:.0f}% full length)",
                        flush=True,
                    )
            finally:
                server.stop()
    wall = time.perf_counter() - started

    summary = {}
    for name, by_load in runs.items():
        summary[name] = {}
        for load, rs in by_load.items():
            tps = [x["tok_per_s"] for x in rs]
            summary[name][load] = {
                "median": float(np.median(tps)),
                "min": float(min(tps)),
                "max": float(max(tps)),
                "full_length_share": float(np.mean([x["full_length_share"] for x in rs])),
                "latency_p50_s": float(np.median([x["latency_p50_s"] for x in rs])),
                "all_ok": all(x["ok"] == x["requests"] for x in rs),
            }
    goals = []
    names = [s.name for s in servers]
    nsvd = next((n for n in names if n.startswith("nsvd")), None)
    dense = next((n for n in names if n == "dense"), None)
    stock = next((n for n in names if n.startswith("transformers serve")), None)
    for c in (1, 8, 16):
        load = f"{c} clients"
        if nsvd and dense and load in loads:
            ratio = summary[nsvd][load]["median"] / summary[dense][load]["median"]
            goals.append(
                {"what": f"{nsvd} / {dense} export, {load}", "ratio": ratio, "goal": 1.30, "met": ratio >= 1.30}
            )
    if nsvd and stock and "16 clients" in loads:
        ratio = summary[nsvd]["16 clients"]["median"] / summary[stock]["16 clients"]["median"]
        goals.append({"what": f"{nsvd} / {stock}, 16 clients", "ratio": ratio, "goal": 1.5, "met": ratio >= 1.5})

    import onnxruntime
    import torch
    import transformers

    result = {
        "command": "python bench/bench_server.py " + portable_text(" ".join(shlex.quote(a) for a in sys.argv[1:])),
        "machine": f"{platform.machine()}, {os.cpu_count()} logical CPUs",
        "load_start": load_start,
        "load_end": os.getloadavg()[0],
        "versions": {
            "onnxruntime": onnxruntime.__version__,
            "torch": torch.__version__,
            "transformers": transformers.__version__,
        },
        "args": portable({k: v for k, v in vars(args).items() if k != "log_dir"}),  # logs: this machine's temp
        "servers": names,
        "loads": list(loads),
        "wall_s": wall,
        "summary": summary,
        "goals": goals,
        "runs": runs,
    }
    out = Path(args.out)
    for path, text in ((out, render(result)), (out.with_suffix(".json"), json.dumps(result, indent=1))):
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(text)
        tmp.replace(path)
    print(out.read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Load, faults and bad input against ``nsvd-lm serve`` (nsvd_lm/serve/http.py), dense vs low-rank SmolLM2.

For each exported folder (--onnx NAME=DIR, repeatable) the server runs in its own process (so its
RSS is its own) and is measured with streaming clients over HTTP (``/v1/completions``,
``stream: true``, ``temperature: 0``, usage in the last chunk):

* 1, 4 and 16 concurrent clients (--clients), each sending --requests requests in a row; aggregate
  decode throughput (completion tokens / wall time), p50/p99 request latency and time to first token;
* the same 16 clients against the same server started with ``max_batch_seqs=1``: the requests are
  then served one by one (the old behaviour), the baseline of the ">= 3x" target;
* --hostile malformed or hostile requests (bad JSON, bodies over the limit, slowloris bodies that
  stall, negative / huge / non-integer max_tokens, invalid UTF-8, unknown fields, a prompt longer
  than the context, deep nesting, chunked bodies, no Content-Length, bad chat roles) sent by their
  own threads *during* the 16-client run; every one must get a 4xx;
* correctness: each streamed text must equal the text of the same prompt served alone (1 client);
* the server's RSS after warm-up and after everything.

Writes --out (Markdown) and the same numbers as JSON next to it.

    nice -n 10 python bench/bench_server_faults.py --onnx dense=/tmp/smol-dense-onnx \
        --onnx "nsvd-i 0.4"=/tmp/smol-nsvd04-onnx
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
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from nsvd_lm.names import portable, portable_text

REPO = Path(__file__).resolve().parents[1]
PROMPTS = [
    "The history of the city of Paris",
    "Photosynthesis is the process by which",
    "In the beginning of the twentieth century, the railway",
    "A good recipe for bread starts with",
    "The main causes of the French Revolution were",
    "Mount Everest is the highest mountain",
    "Once upon a time, in a small village by the sea,",
    "The theory of relativity explains",
]


# ------------------------------------------------------------------------------------------------
# The server process
# ------------------------------------------------------------------------------------------------


def serve(args) -> None:
    from nsvd_lm.serve.http import ServerLimits, make_server
    from nsvd_lm.serve.runtime import OnnxCausalLM

    lm = OnnxCausalLM(args.serve, provider="cpu", intra_op_threads=args.threads)
    limits = ServerLimits(
        max_batch_seqs=args.max_batch_seqs, read_timeout_s=args.read_timeout, max_tokens=512, max_queue=256
    )
    server = make_server(lm, "127.0.0.1", 0, limits, model_name="bench")
    print(f"PORT {server.server_address[1]}", flush=True)
    server.serve_forever()


class ServerProc:
    def __init__(self, onnx_dir: str, max_batch_seqs: int, args) -> None:
        cmd = [
            sys.executable,
            __file__,
            "--serve",
            onnx_dir,
            "--max-batch-seqs",
            str(max_batch_seqs),
            "--threads",
            str(args.threads),
            "--read-timeout",
            str(args.read_timeout),
        ]
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": str(args.threads)}
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, env=env)
        line = self.proc.stdout.readline()
        if not line.startswith("PORT "):
            self.proc.kill()
            raise RuntimeError(f"server did not start: {line!r}")
        self.address = ("127.0.0.1", int(line.split()[1]))

    def rss_mib(self) -> float:
        with open(f"/proc/{self.proc.pid}/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
        return float("nan")

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


# ------------------------------------------------------------------------------------------------
# Well-formed streaming clients
# ------------------------------------------------------------------------------------------------


def stream_request(address, prompt: str, max_tokens: int) -> dict:
    body = json.dumps(
        {
            "model": "bench",
            "prompt": prompt,
            "max_tokens": max_tokens,
            "temperature": 0,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
    )
    start = time.perf_counter()
    conn = http.client.HTTPConnection(*address, timeout=600)
    try:
        conn.request("POST", "/v1/completions", body=body, headers={"Content-Type": "application/json"})
        response = conn.getresponse()
        if response.status != 200:
            return {"ok": False, "status": response.status, "error": response.read()[:200].decode("latin-1")}
        text, first, usage, done = [], None, None, False
        while True:
            line = response.fp.readline()
            if not line:
                break
            line = line.strip()
            if not line.startswith(b"data: "):
                continue
            data = line[6:]
            if data == b"[DONE]":
                done = True
                break
            event = json.loads(data)
            if event.get("usage"):
                usage = event["usage"]
            for choice in event.get("choices", []):
                if choice.get("text"):
                    if first is None:
                        first = time.perf_counter() - start
                    text.append(choice["text"])
        return {
            "ok": done and usage is not None,
            "status": 200,
            "text": "".join(text),
            "ttft": first,
            "latency": time.perf_counter() - start,
            "tokens": (usage or {}).get("completion_tokens", 0),
            "prompt": prompt,
        }
    finally:
        conn.close()


def run_clients(address, clients: int, requests: int, max_tokens: int, offset: int = 0) -> dict:
    def client(i: int) -> list[dict]:
        return [
            stream_request(address, PROMPTS[(offset + i + r * clients) % len(PROMPTS)], max_tokens)
            for r in range(requests)
        ]

    start = time.perf_counter()
    with ThreadPoolExecutor(max_workers=clients) as pool:
        results = [r for rs in pool.map(client, range(clients)) for r in rs]
    wall = time.perf_counter() - start
    return summarize(results, wall, clients)


def summarize(results: list[dict], wall: float, clients: int) -> dict:
    import numpy as np

    ok = [r for r in results if r["ok"]]
    lat = np.array([r["latency"] for r in ok]) if ok else np.array([float("nan")])
    ttft = np.array([r["ttft"] for r in ok if r["ttft"] is not None]) if ok else np.array([float("nan")])
    tokens = sum(r["tokens"] for r in ok)
    return {
        "clients": clients,
        "requests": len(results),
        "ok": len(ok),
        "tokens": tokens,
        "wall_s": wall,
        "tok_per_s": tokens / wall,
        "p50_s": float(np.percentile(lat, 50)),
        "p99_s": float(np.percentile(lat, 99)),
        "ttft_p50_s": float(np.percentile(ttft, 50)),
        "ttft_p99_s": float(np.percentile(ttft, 99)),
        "failures": [r for r in results if not r["ok"]][:5],
        "texts": [(r["prompt"], r.get("text")) for r in ok],
    }


# ------------------------------------------------------------------------------------------------
# Hostile requests (raw sockets: most of them cannot be sent by a well-behaved client library)
# ------------------------------------------------------------------------------------------------


def _post(body: bytes, content_length: int | None = None, path: str = "/v1/completions", extra: str = "") -> bytes:
    length = len(body) if content_length is None else content_length
    head = (
        f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {length}\r\n{extra}\r\n"
    )
    return head.encode() + body


def hostile_kinds(context: int) -> dict:
    """name -> (bytes to send, then stall?)"""
    j = lambda d: json.dumps(d).encode()  # noqa: E731
    return {
        "bad JSON": (_post(b'{"prompt": "hi", "max_tokens": '), False),
        "huge body (8 MiB declared)": (_post(b'{"prompt": "' + b"x" * 4096, content_length=8 << 20), False),
        "slowloris body (stalls)": (_post(b'{"prompt": "hel', content_length=200), True),
        "negative max_tokens": (_post(j({"prompt": "hi", "max_tokens": -5})), False),
        "huge max_tokens": (_post(j({"prompt": "hi", "max_tokens": 10**12})), False),
        "float max_tokens": (_post(j({"prompt": "hi", "max_tokens": 3.5})), False),
        "invalid UTF-8": (_post(b'{"prompt": "\xff\xfe\xc3("}'), False),
        "unknown fields": (_post(j({"prompt": "hi", "max_tokens": 4, "mystery": [1, 2], "__proto__": {}})), False),
        "prompt longer than context": (_post(j({"prompt": "word " * (4 * context), "max_tokens": 4})), False),
        "deeply nested JSON": (_post(b"[" * 100000 + b"]" * 100000), False),
        "chunked body": (
            b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
            False,
        ),
        "no Content-Length": (b"POST /v1/completions HTTP/1.1\r\nHost: x\r\n\r\n", False),
        "bad chat role": (
            _post(j({"messages": [{"role": "root", "content": "hi"}]}), path="/v1/chat/completions"),
            False,
        ),
        "NaN temperature": (_post(b'{"prompt": "hi", "temperature": NaN}'), False),
    }


def send_hostile(address, payload: bytes, stall: bool, timeout: float) -> int:
    """Send raw bytes (then keep the socket open without sending more if ``stall``); return the
    HTTP status of the reply (0 if none)."""
    with socket.create_connection(address, timeout=timeout) as sock:
        try:
            sock.sendall(payload)
        except OSError:  # the server may reply and close before a huge body is fully sent
            pass
        data = b""
        try:
            while b"\r\n" not in data:
                chunk = sock.recv(4096)
                if not chunk:
                    break
                data += chunk
        except OSError:
            pass
    try:
        return int(data.split(b" ", 2)[1])
    except (IndexError, ValueError):
        return 0


def run_hostile(address, total: int, context: int, read_timeout: float, threads: int = 24) -> dict:
    kinds = hostile_kinds(context)
    names = list(kinds)
    plan = [names[i % len(names)] for i in range(total)]
    random.Random(0).shuffle(plan)
    results: dict[str, dict[int, int]] = {n: {} for n in names}
    lock = threading.Lock()

    def one(name: str) -> None:
        payload, stall = kinds[name]
        status = send_hostile(address, payload, stall, timeout=read_timeout + 30)
        with lock:
            results[name][status] = results[name].get(status, 0) + 1

    start = time.perf_counter()
    with ThreadPoolExecutor(max_workers=threads) as pool:
        list(pool.map(one, plan))
    wall = time.perf_counter() - start
    all_4xx = all(400 <= s < 500 for r in results.values() for s in r)
    return {"total": total, "wall_s": wall, "by_kind": results, "all_4xx": all_4xx}


# ------------------------------------------------------------------------------------------------
# One model
# ------------------------------------------------------------------------------------------------


def bench_model(name: str, onnx_dir: str, args) -> dict:
    context = json.loads((Path(onnx_dir) / "config.json").read_text()).get("max_position_embeddings", 2048)
    out = {"name": name, "onnx_dir": onnx_dir, "runs": {}}
    # Baseline: the same 16 clients served one by one (max_batch_seqs=1).
    print(f"[bench] {name}: serial baseline", flush=True)
    srv = ServerProc(onnx_dir, 1, args)
    try:
        run_clients(srv.address, 1, 1, 8)  # warm-up
        out["runs"]["16 clients, one by one"] = run_clients(
            srv.address, max(args.clients), args.requests, args.max_tokens
        )
    finally:
        srv.stop()

    print(f"[bench] {name}: batched server", flush=True)
    srv = ServerProc(onnx_dir, args.max_batch_seqs, args)
    try:
        run_clients(srv.address, 4, 1, 8)  # warm-up (ORT shapes)
        out["rss_initial_mib"] = srv.rss_mib()
        # Warm-up at the largest load's shape (16 rows x the full length): the ORT arena and the
        # allocator grow once to that working set; "before" is measured after it, so the growth
        # reported is what the measured runs and the hostile traffic add.
        run_clients(srv.address, max(args.clients), 1, args.max_tokens)
        out["rss_before_mib"] = srv.rss_mib()
        reference: dict[str, str] = {}
        labels = [(c, False) for c in args.clients] + ([(max(args.clients), True)] if args.hostile else [])
        for clients, with_hostile in labels:
            label = f"{clients} clients" + (f" + {args.hostile} hostile" if with_hostile else "")
            print(f"[bench] {name}: {label}", flush=True)
            if with_hostile:
                holder: dict = {}
                t = threading.Thread(
                    target=lambda: holder.update(run_hostile(srv.address, args.hostile, context, args.read_timeout))
                )
                t.start()
            run = run_clients(srv.address, clients, args.requests, args.max_tokens)
            if with_hostile:
                t.join()
                out["hostile"] = holder
            if clients == 1 and not reference:
                reference = dict(run["texts"])
                for p in PROMPTS:  # every prompt once alone
                    if p not in reference:
                        reference[p] = stream_request(srv.address, p, args.max_tokens)["text"]
            run["mismatches_vs_alone"] = sum(1 for p, t in run["texts"] if reference.get(p) != t)
            out["runs"][label] = run
        # Still serving, and still right, after the hostile traffic.
        after = stream_request(srv.address, PROMPTS[0], args.max_tokens)
        out["after_hostile_ok"] = after["ok"] and after["text"] == reference[PROMPTS[0]]
        out["rss_after_mib"] = srv.rss_mib()
    finally:
        srv.stop()
    for run in out["runs"].values():
        run.pop("texts", None)
    top = out["runs"][f"{max(args.clients)} clients"]["tok_per_s"]
    out["speedup_vs_one_by_one"] = top / out["runs"]["16 clients, one by one"]["tok_per_s"]
    out["rss_growth"] = out["rss_after_mib"] / out["rss_before_mib"] - 1
    return out


def render(results: list[dict], args, wall: float) -> str:
    import numpy as np
    import onnxruntime

    lines = [
        "# Server benchmark: continuous batching, streaming clients, hostile requests (SmolLM2-135M, CPU)",
        "",
        "```",
        "nice -n 10 python bench/bench_server_faults.py "
        + portable_text(" ".join(shlex.quote(a) for a in sys.argv[1:])),
        "```",
        "",
        f"Environment: {platform.machine()}, {os.cpu_count()} logical CPUs (shared with other work), "
        f"server ORT threads={args.threads}; "
        f"onnxruntime {onnxruntime.__version__}, numpy {np.__version__}. "
        f"Load average at the end: {os.getloadavg()[0]:.1f}. Total wall time {wall / 60:.1f} min.",
        f"Each client sends {args.requests} streaming requests in a row "
        f"(`temperature: 0`, `max_tokens: {args.max_tokens}`, "
        f"short text prompts); throughput = completion tokens of all clients / wall time (prefill included). "
        f'"one by one" = the same 16 clients against the same server with `max_batch_seqs=1`. '
        f"Server: `max_batch_seqs={args.max_batch_seqs}`, body read deadline {args.read_timeout:g} s.",
        "",
        "| model | clients | requests ok | tok/s (aggregate) | latency p50 s | latency p99 s "
        "| TTFT p50 s | TTFT p99 s | texts != alone |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for res in results:
        for label, run in res["runs"].items():
            lines.append(
                f"| {res['name']} | {label} | {run['ok']}/{run['requests']} | {run['tok_per_s']:.1f} "
                f"| {run['p50_s']:.2f} | {run['p99_s']:.2f} | "
                f"{run['ttft_p50_s']:.2f} | {run['ttft_p99_s']:.2f} | {run.get('mismatches_vs_alone', '–')} |"
            )
    lines += ["", "## Against the targets", ""]
    for res in results:
        h = res.get("hostile", {})
        n4 = sum(c for r in h.get("by_kind", {}).values() for s, c in r.items() if 400 <= int(s) < 500)
        lines.append(
            f"- **{res['name']}**: 16 concurrent clients x{res['speedup_vs_one_by_one']:.2f} "
            f"the aggregate throughput of the same clients "
            f"served one by one (target >= 3: {'met' if res['speedup_vs_one_by_one'] >= 3 else 'NOT met'}); "
            f"hostile requests answered 4xx: {n4}/{h.get('total', 0)} "
            f"(target all: {'met' if h.get('all_4xx') else 'NOT met'}), "
            f"still serving correctly after them: {res['after_hostile_ok']}; "
            f"RSS after a full-size warm-up {res['rss_before_mib']:.0f} MiB -> "
            f"{res['rss_after_mib']:.0f} MiB after all runs and the hostile requests "
            f"({100 * res['rss_growth']:+.1f}%, target < 10%: "
            f"{'met' if res['rss_growth'] < 0.10 else 'NOT met'}); "
            f"after the first small warm-up it was {res['rss_initial_mib']:.0f} MiB."
        )
    lines += ["", "## Hostile requests by kind (status: count)", ""]
    for res in results:
        h = res.get("hostile")
        if not h:
            continue
        lines.append(
            f"**{res['name']}** ({h['total']} requests in {h['wall_s']:.1f} s, "
            f"sent by 24 threads during the 16-client run):"
        )
        lines.append("")
        lines.append("| kind | statuses |")
        lines.append("|---|---|")
        for kind, statuses in h["by_kind"].items():
            lines.append(f"| {kind} | {', '.join(f'{s}: {c}' for s, c in sorted(statuses.items()))} |")
        lines.append("")
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--onnx", action="append", default=[], metavar="NAME=DIR", help="an exported folder to serve (repeatable)"
    )
    parser.add_argument("--clients", default="1,4,16", help="concurrent client counts (default 1,4,16)")
    parser.add_argument("--requests", type=int, default=2, help="requests per client (default 2)")
    parser.add_argument("--max-tokens", type=int, default=64, help="max_tokens per request (default 64)")
    parser.add_argument(
        "--hostile", type=int, default=1000, help="hostile requests during the largest run (default 1000)"
    )
    parser.add_argument(
        "--threads", type=int, default=2, help="ONNX Runtime intra-op threads of the server (default 2)"
    )
    parser.add_argument("--max-batch-seqs", type=int, default=16)
    parser.add_argument("--read-timeout", type=float, default=2.0, help="server body read deadline (default 2 s)")
    parser.add_argument("--out", default=str(REPO / "bench" / "results" / "server.md"))
    parser.add_argument("--serve", help=argparse.SUPPRESS)  # internal: run the server process
    args = parser.parse_args()
    if args.serve:
        serve(args)
        return 0
    args.clients = [int(c) for c in args.clients.split(",")]
    if not args.onnx:
        parser.error("give at least one --onnx NAME=DIR")
    start = time.perf_counter()
    results = []
    for spec in args.onnx:
        name, _, folder = spec.partition("=")
        if not (Path(folder) / "model.onnx").is_file():
            parser.error(f"{folder} has no model.onnx")
        results.append(bench_model(name, folder, args))
    wall = time.perf_counter() - start
    out = Path(args.out)
    out.write_text(render(results, args, wall))
    out.with_suffix(".json").write_text(json.dumps(portable(json.loads(json.dumps(results, default=str))), indent=1))
    print(out.read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())

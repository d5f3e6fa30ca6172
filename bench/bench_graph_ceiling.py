"""How fast can a server on an export be, at most? The graph's own speed, split into its parts.

A server's tok/s ratio between two exports cannot exceed the ratio of their graphs: every token is
one graph run (a decode step, or its share of a prefill) plus work that is the same for both
(HTTP, tokenizer, sampling, engine). This benchmark measures, for each exported folder
(``--onnx NAME=DIR``, repeatable; the first is the reference the ratios are taken against):

* **whole graph, decode**: one step of B rows (B = ``--batches``) over a ``--past``-token cache;
* **whole graph, prefill**: one prompt of ``--prefill`` tokens, empty cache, ``logits_to_keep=1``
  (what the engine runs);
* **linears**: the graph's weight MatMuls only (every MatMul whose weight is a 2-D initializer:
  the 7 projections of each layer, or their low-rank factor pairs), each on its own input, B rows
  (decode) or ``--prefill`` rows (prefill) -- what the compression changes;
* **LM head**: the tied (vocab x hidden) MatMul alone, at B rows -- the same for both.

``rest = whole - linears - LM head`` is what is left: attention over the cache, norms, rotary,
residuals, the cache copy -- also the same for both. Each measurement runs in a fresh process
(one ONNX Runtime session, ``--threads`` intra-op threads, ONNX Runtime's default thread
spinning -- the server's settings; two sessions in one process would spin against each other),
``--runs`` timed runs after 3 warm-ups, median; ``--rounds`` rounds interleave the exports, and
the median over rounds is reported.

    flock /tmp/nsvd-bench.lock nice -n 5 python bench/bench_graph_ceiling.py \\
        --onnx dense=DIR --onnx "nsvd-i 0.4"=DIR --out bench/results/graph_ceiling.md
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from nsvd_lm.export import io_names

from nsvd_lm.names import portable_text

REPO = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------------------------------
# Sub-graphs of an export
# ------------------------------------------------------------------------------------------


def _lm_head(graph, initializers: dict):
    """The LM head MatMul behind ``logits`` and the initializer (and transpose) its weight is."""
    producers = {out: node for node in graph.node for out in node.output}
    node = producers[io_names.LOGITS]
    while node.op_type != "MatMul":  # logits_to_keep's Slice, a soft-cap, a Cast
        node = producers[node.input[0]]
    weight = node.input[1]
    if weight in initializers:
        return initializers[weight], False
    source = producers[weight]  # tied embeddings: Transpose(embed_tokens.weight)
    if source.op_type != "Transpose" or source.input[0] not in initializers:
        raise ValueError(f"LM head weight {weight!r} is neither an initializer nor its transpose")
    return initializers[source.input[0]], True


def build_parts(export_dir: Path, out_dir: Path) -> dict:
    """Write ``linears/model.onnx`` and ``lm_head/model.onnx`` for one export under ``out_dir``."""
    import onnx
    from onnx import TensorProto, helper

    model = onnx.load(str(export_dir / io_names.ONNX_FILENAME))
    graph = model.graph
    initializers = {i.name: i for i in graph.initializer}
    head, transposed = _lm_head(graph, initializers)
    opset = [helper.make_opsetid("", 18)]

    nodes, weights, inputs, outputs = [], [], {}, []
    for node in graph.node:
        weight = initializers.get(node.input[1]) if node.op_type == "MatMul" and len(node.input) > 1 else None
        if weight is None or len(weight.dims) != 2 or weight.name == head.name:
            continue
        rows = int(weight.dims[0])
        inputs.setdefault(rows, helper.make_tensor_value_info(f"x{rows}", TensorProto.FLOAT, ["rows", rows]))
        out = f"{node.name or node.output[0]}/out"
        nodes.append(helper.make_node("MatMul", [f"x{rows}", weight.name], [out]))
        outputs.append(helper.make_tensor_value_info(out, TensorProto.FLOAT, None))
        weights.append(weight)
    linears = helper.make_model(
        helper.make_graph(nodes, "linears", list(inputs.values()), outputs, weights), opset_imports=opset
    )
    hidden = int(head.dims[1] if transposed else head.dims[0])
    head_nodes = [helper.make_node("Transpose", [head.name], ["head_t"], perm=[1, 0])] if transposed else []
    head_nodes.append(helper.make_node("MatMul", ["h", "head_t" if transposed else head.name], ["logits"]))
    lm_head = helper.make_model(
        helper.make_graph(
            head_nodes,
            "lm_head",
            [helper.make_tensor_value_info("h", TensorProto.FLOAT, ["rows", hidden])],
            [helper.make_tensor_value_info("logits", TensorProto.FLOAT, None)],
            [head],
        ),
        opset_imports=opset,
    )
    for name, part in (("linears", linears), ("lm_head", lm_head)):
        (out_dir / name).mkdir(parents=True)
        onnx.save(part, str(out_dir / name / "model.onnx"), save_as_external_data=True, location="model.onnx.data")
    return {"linear_matmuls": len(nodes), "linear_weights": int(sum(np.prod(w.dims) for w in weights))}


# ------------------------------------------------------------------------------------------
# One measurement, in its own process
# ------------------------------------------------------------------------------------------


def _feeds(session, kind: str, rows: int, past: int, prefill: int) -> dict:
    rng = np.random.default_rng(0)
    feeds = {}
    seq = prefill if kind == "prefill" else 1
    past = 0 if kind == "prefill" else past
    batch = 1 if kind == "prefill" else rows
    for spec in session.get_inputs():
        name = spec.name
        if kind in ("linears", "lm_head"):
            feeds[name] = rng.standard_normal((rows, int(spec.shape[1]))).astype(np.float32)
        elif name == io_names.INPUT_IDS:
            feeds[name] = np.ones((batch, seq), np.int64)
        elif name == io_names.ATTENTION_MASK:
            feeds[name] = np.ones((batch, past + seq), np.int64)
        elif name == io_names.POSITION_IDS:
            feeds[name] = np.tile(np.arange(past, past + seq, dtype=np.int64), (batch, 1))
        elif name == io_names.LOGITS_TO_KEEP:
            feeds[name] = np.array([1], np.int64)
        else:  # past_key_values.*: (batch, kv_heads, past, head_dim)
            feeds[name] = rng.standard_normal((batch, int(spec.shape[1]), past, int(spec.shape[3]))).astype(np.float32)
    return feeds


def worker(path: str, kind: str, rows: int, past: int, prefill: int, threads: int, runs: int) -> None:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.log_severity_level = 3
    session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
    feeds = _feeds(session, kind, rows, past, prefill)
    for _ in range(3):
        session.run(None, feeds)
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        session.run(None, feeds)
        times.append(time.perf_counter() - start)
    print(json.dumps({"ms": 1000 * float(np.median(times))}))


def measure(path: Path, kind: str, rows: int, args) -> float:
    command = [sys.executable, __file__, "--worker", str(path), kind, str(rows)]
    command += [str(args.past), str(args.prefill), str(args.threads), str(args.runs)]
    done = subprocess.run(command, capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])["ms"]


# ------------------------------------------------------------------------------------------
# Report
# ------------------------------------------------------------------------------------------


def main() -> int:
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        path, kind, *numbers = sys.argv[2:]
        worker(path, kind, *(int(n) for n in numbers))
        return 0
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--onnx", action="append", required=True, metavar="NAME=DIR", help="an export (first = reference)"
    )
    parser.add_argument("--batches", default="1,8,16", help="decode rows (default 1,8,16)")
    parser.add_argument("--past", type=int, default=64, help="cache length of a decode step (default 64)")
    parser.add_argument("--prefill", type=int, default=64, help="prompt tokens of a prefill (default 64)")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds (default 3)")
    parser.add_argument("--runs", type=int, default=30, help="timed runs per measurement (default 30)")
    parser.add_argument("--threads", type=int, default=2, help="ONNX Runtime intra-op threads (default 2)")
    parser.add_argument("--out", default=str(REPO / "bench" / "results" / "graph_ceiling.md"))
    args = parser.parse_args()
    exports = []
    for spec in args.onnx:
        name, sep, folder = spec.partition("=")
        folder = Path(folder).expanduser()
        if not sep or not (folder / io_names.ONNX_FILENAME).is_file():
            parser.error(f"--onnx must be NAME=DIR with DIR an exported folder; got {spec!r}")
        exports.append((name, folder))
    batches = [int(b) for b in args.batches.split(",")]
    started = time.time()

    with tempfile.TemporaryDirectory(prefix="nsvd-graph-ceiling-") as tmp:
        parts, sizes = {}, {}
        for i, (name, folder) in enumerate(exports):
            sizes[name] = build_parts(folder, Path(tmp) / str(i))
            parts[name] = Path(tmp) / str(i)
        # (kind, rows, label): decode rows per step; prefill = one prompt of --prefill tokens.
        cells = [(kind, b, f"decode, {b} rows") for b in batches for kind in ("whole", "linears", "lm_head")]
        cells += [(kind, args.prefill, f"prefill, {args.prefill} tokens") for kind in ("prefill", "linears", "lm_head")]
        times: dict = {}
        for _ in range(args.rounds):
            for kind, rows, label in cells:
                for name, folder in exports:
                    path = {
                        "whole": folder / io_names.ONNX_FILENAME,
                        "prefill": folder / io_names.ONNX_FILENAME,
                        "linears": parts[name] / "linears" / "model.onnx",
                        # a prefill keeps one position's logits: its LM head is one row
                        "lm_head": parts[name] / "lm_head" / "model.onnx",
                    }[kind]
                    head_rows = 1 if label.startswith("prefill") and kind == "lm_head" else rows
                    ms = measure(path, "decode" if kind == "whole" else kind, head_rows, args)
                    times.setdefault((label, name, "whole" if kind == "prefill" else kind), []).append(ms)

    rows_out = []
    for label in dict.fromkeys(label for _, _, label in cells):
        ref = None
        for name, _ in exports:
            whole, linears, head = (float(np.median(times[(label, name, k)])) for k in ("whole", "linears", "lm_head"))
            row = {"load": label, "export": name, "whole_ms": whole, "linears_ms": linears, "lm_head_ms": head}
            row["rest_ms"] = whole - linears - head
            if ref is None:
                ref = row
            row["whole_ratio"] = ref["whole_ms"] / whole
            row["linears_ratio"] = ref["linears_ms"] / linears
            rows_out.append(row)
    import onnxruntime

    result = {
        "command": "python bench/bench_graph_ceiling.py "
        + portable_text(" ".join(shlex.quote(a) for a in sys.argv[1:])),
        "machine": f"{platform.machine()}, {os.cpu_count()} logical CPUs",
        "load_average_end": os.getloadavg()[0],
        "onnxruntime": onnxruntime.__version__,
        "threads": args.threads,
        "rounds": args.rounds,
        "runs": args.runs,
        "exports": {name: sizes[name] for name, _ in exports},
        "rows": rows_out,
        "minutes": (time.time() - started) / 60,
    }
    out = Path(args.out)
    out.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    out.write_text(render(result, exports[0][0]))
    print(out.read_text())
    return 0


def render(result: dict, reference: str) -> str:
    lines = [
        "# The graph's own speed, split into its parts (SmolLM2-135M, CPU)",
        "",
        "```",
        result["command"],
        "```",
        "",
        f"Machine: {result['machine']} (load average at the end {result['load_average_end']:.1f}); "
        f"onnxruntime {result['onnxruntime']}, {result['threads']} intra-op threads, default spinning; "
        f"each number is the median of {result['runs']} runs in a fresh process, then the median of "
        f"{result['rounds']} interleaved rounds. whole = one run of the exported graph; linears = its weight "
        "MatMuls alone (the projections or their factor pairs); LM head = the tied vocab x hidden MatMul "
        "alone; rest = whole - linears - LM head (attention, norms, rotary, residuals, cache copy). "
        f"Ratios are {reference} / export. Total wall time {result['minutes']:.1f} min.",
        "",
        "| load | export | whole ms | linears ms | LM head ms | rest ms | whole ratio | linears ratio |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in result["rows"]:
        lines.append(
            f"| {r['load']} | {r['export']} | {r['whole_ms']:.2f} | {r['linears_ms']:.2f} | {r['lm_head_ms']:.2f} | "
            f"{r['rest_ms']:.2f} | x{r['whole_ratio']:.2f} | x{r['linears_ratio']:.2f} |"
        )
    lines += [
        "",
        "Weights in the linears: "
        + ", ".join(
            f"{name} {s['linear_weights']:,} in {s['linear_matmuls']} MatMuls" for name, s in result["exports"].items()
        )
        + ".",
    ]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())

"""Every benchmark figure README.md and docs/ quote is read from its committed result file.

``CLAIMS`` is the table: which document quotes the figure (a regex whose groups are the figures
as written), which committed result file it comes from, and how to read it there and write it as
the document does. A figure that drifts from its file fails here, and so does a quote the
document no longer holds (then change the table with the text). To add a figure: add a row; the
readers below (``json_at``, ``table1``, ``markdown_row``, ...) cover the result files we have.
"""

from __future__ import annotations

import csv
import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results"
PROTOCOL = RESULTS / "protocol"
HEADLINE_04 = "bench/results/protocol/sweeps/headline/nsvd-i_r0.4.json"
WALL = r"(\d+) s wall"  # logs/wall.txt: "protocol run: 8529 s wall, exit 0"
ENGLISH = ("nsvd_wikitext2", "nsvd_ptb", "nsvd_c4", "nsvd_snips", "nsvd_alpaca_eval", "nsvd_mctest")


# ----------------------------------------------------------------------------- readers


def json_at(path: str, *keys: str | int):
    value = json.loads((REPO / path).read_text(encoding="utf-8"))
    for key in keys:
        value = value[key]
    return value


def table1(method: str = "nsvd-i") -> list[dict[str, str]]:
    with open(PROTOCOL / "table1.csv", encoding="utf-8") as handle:
        return [row for row in csv.DictReader(handle) if row["method"] == method]


def tasks_of(row: dict[str, str]) -> list[str]:
    return [c[: -len("_impro_pct")] for c in row if c.endswith("_impro_pct") and c != "avg_impro_pct"]


def markdown_row(path: str, *cells: str) -> list[str]:
    """The cells of the first table row of ``path`` whose leading cells are ``cells``."""
    for line in (REPO / path).read_text(encoding="utf-8").splitlines():
        row = [c.strip() for c in line.strip().strip("|").split("|")]
        if row[: len(cells)] == list(cells):
            return row
    raise AssertionError(f"{path} has no table row starting {cells}")


def server(name: str) -> dict:
    return next(m for m in json_at("bench/results/server.json") if m["name"] == name)


def joined(values: list[str]) -> str:
    """``a, b and c``."""
    return values[0] if len(values) == 1 else ", ".join(values[:-1]) + " and " + values[-1]


def scoring_minutes() -> tuple[str, str, str]:
    windows = json_at("bench/results/protocol/full_set_windows.json", "total_windows")
    rate = json_at("bench/results/protocol/scoring_throughput.json", "bare_forward_tokens_per_s")
    return f"{windows * 2048 / rate / 60:.0f}", str(windows), f"{int(rate)}"


def significant_english_losses() -> str:
    counts = []
    for row in sorted(table1(), key=lambda r: float(r["ratio"])):
        losses = [t for t in ENGLISH if row[f"{t}_significant"] == "true" and float(row[f"{t}_impro_pct"]) < 0]
        counts.append(str(len(losses)))
    return joined(counts)


def ratios_where_average(sign: int) -> str:
    rows = [r for r in table1() if r["avg_significant"] == "true" and sign * float(r["avg_impro_pct"]) > 0]
    return joined([r["ratio"] for r in sorted(rows, key=lambda r: float(r["ratio"]))])


def headline_windows() -> tuple[str, str]:
    counts = [int(r[f"{t}_windows"]) for r in table1() for t in tasks_of(r) if r[f"{t}_windows"]]
    return str(min(counts)), str(max(counts))


def average_at(ratio: str) -> tuple[str, ...]:
    (row,) = [r for r in table1() if r["ratio"] == ratio and r["seeds"] == "3"]
    return tuple(f"{float(row[k]):+.1f}" for k in ("avg_impro_pct", "avg_impro_ci_low", "avg_impro_ci_high"))


def serving() -> tuple[str, ...]:
    dense = markdown_row("bench/results/serving.md", "cpu", "ONNX Runtime", "dense")
    low = markdown_row("bench/results/serving.md", "cpu", "ONNX Runtime", "nsvd-i 0.4")
    int8 = markdown_row("bench/results/serving.md", "cpu", "ONNX Runtime int8", "nsvd-i 0.4")
    b1, b8 = (float(dense[5]), float(low[5])), (float(dense[6]), float(low[6]))
    return (
        dense[5], low[5], f"{b1[1] / b1[0]:.2f}", dense[6], low[6], f"{b8[1] / b8[0]:.2f}",
        f"{float(dense[3]):.0f}", f"{float(low[3]):.0f}", f"{float(int8[3]):.0f}",
    )  # fmt: skip


def serving_table(model: str, int8: bool) -> tuple[str, ...]:
    """docs/onnx.md's row of ``model``: ONNX weights, prefill, decode b1, decode b8 (+ PyTorch decode b1 / b8)."""
    ort = markdown_row("bench/results/serving.md", "cpu", "ONNX Runtime int8" if int8 else "ONNX Runtime", model)
    if int8:
        return ort[3], ort[4], ort[5], ort[6]
    torch_row = markdown_row("bench/results/serving.md", "cpu", "PyTorch", model)
    return ort[3], ort[4], ort[5], ort[6], torch_row[5], torch_row[6]


def server_table(name: str) -> tuple[str, ...]:
    m = server(name)
    runs = m["runs"]
    per = [f"{runs[k]['tok_per_s']:.1f}" for k in ("1 clients", "4 clients", "16 clients", "16 clients, one by one")]
    return (*per, f"{m['speedup_vs_one_by_one']:.2f}", f"{runs['16 clients']['p50_s']:.1f}",
            f"{runs['16 clients']['p99_s']:.1f}")  # fmt: skip


def server_rss(name: str) -> tuple[str, ...]:
    m = server(name)
    return f"{m['rss_before_mib']:.0f}", f"{m['rss_after_mib']:.0f}", f"{100 * m['rss_growth']:.1f}"


SERVER_LOADS = {  # docs/onnx.md's row labels -> bench_server.py's load names
    "1 client": "1 clients",
    "8 clients": "8 clients",
    "16 clients": "16 clients",
    "64 clients (16 rows, the rest queued)": "64 clients",
    "prefill-heavy: 8 clients, 512-1,024-token prompts, 64 new tokens": "prefill-heavy, 8 clients",
}


CEILING_LOADS = {  # docs/onnx.md's row labels -> bench_graph_ceiling.py's load names
    "decode, 1 row": "decode, 1 rows",
    "decode, 8 rows": "decode, 8 rows",
    "decode, 16 rows": "decode, 16 rows",
    "prefill, 64 tokens": "prefill, 64 tokens",
}


def server_speed_row(path: str, load: str) -> tuple[str, ...]:
    """tok/s of the three servers at ``load`` (medians) and nsvd-i 0.4 / dense, as docs/onnx.md writes them."""
    summary = json_at(path, "summary")
    tok = [summary[name][load]["median"] for name in ("nsvd-i 0.4", "dense", "transformers serve dense")]
    return (*(f"{t:.1f}" for t in tok), f"{tok[0] / tok[1]:.2f}")


def ceiling_row(path: str, load: str) -> tuple[str, ...]:
    """bench_graph_ceiling.py's dense and nsvd-i 0.4 rows at ``load``, as docs/onnx.md writes them."""
    rows = {r["export"]: r for r in json_at(path, "rows") if r["load"] == load}
    dense, low = rows["dense"], rows["nsvd-i 0.4"]
    return (
        f"{dense['whole_ms']:.2f}", f"{low['whole_ms']:.2f}", f"{low['whole_ratio']:.2f}",
        f"{low['linears_ratio']:.2f}", f"{dense['lm_head_ms'] + dense['rest_ms']:.2f}",
    )  # fmt: skip


def compression_04() -> tuple[str, ...]:
    c = json_at(HEADLINE_04, "config", "compression")
    target_removed = 1 - c["target_params_after"] / c["target_params_before"]
    return (
        f"{c['params_before'] / 1e6:.1f}", f"{c['params_after'] / 1e6:.1f}", f"{100 * target_removed:.1f}",
        f"{100 * c['params_removed_fraction']:.1f}", str(c["layers_factored"]), f"{c['seconds']['decomposition']:.0f}",
    )  # fmt: skip


def allocation(method: str, ratio: str, criterion: str) -> dict[str, float]:
    with open(RESULTS / "rank_allocation" / "rank_allocation.csv", encoding="utf-8") as handle:
        (row,) = [
            r
            for r in csv.DictReader(handle)
            if (r["method"], r["ratio"], r["allocation"]) == (method, ratio, criterion)
            and r.get("sequential", "False") == "False"  # the dense-fitted rows the README quotes
        ]
    return {k: float(v) for k, v in row.items() if k not in ("method", "ratio", "allocation", "sequential")}


def change_ci(method: str, ratio: str, criterion: str, sign: str = "") -> tuple[str, ...]:
    """``mean_change`` and its CI as the README writes them (``sign="+"``: with the sign; ``""``: magnitude)."""
    row = allocation(method, ratio, criterion)
    values = (row["mean_change"], row["mean_low"], row["mean_high"])
    if sign:
        return tuple(f"{v:+.1f}" for v in values)
    return (f"{abs(values[0]):.1f}", *(f"{v:.1f}".replace("-", "−") for v in values[1:]))


def cost_ratios(method: str, criterion: str) -> list[float]:
    return sorted({allocation(method, r, criterion)["cost_ratio"] for r in ("0.2", "0.3", "0.4", "0.5")})


def lowrank_speedups() -> tuple[str, ...]:
    shapes = json_at("bench/results/compression_llama7b_cpu.json", "per_shape")
    return tuple(
        f"{shapes[s]['asvd-i_lowrank']['speedup_vs_exact']:.2f}"
        for s in ("self_attn.q_proj", "mlp.down_proj", "mlp.gate_proj")
    )


# ----------------------------------------------------------------------------- the table


@dataclass(frozen=True)
class Claim:
    doc: str  # the file that quotes the figure
    quote: str  # regex; its groups are the figures as written
    source: str  # the committed result file (for the failure message)
    figures: Callable[[], tuple[str, ...] | str]  # the same figures, read from ``source``


CLAIMS: tuple[Claim, ...] = (
    # README.md
    Claim(
        "README.md",
        r"scoring alone is about (\d+) min \((\d+) windows of 2048\s+tokens at the (\d+) tokens/s of a bare forward",
        "bench/results/protocol/{full_set_windows,scoring_throughput}.json",
        scoring_minutes,
    ),
    Claim(
        "README.md",
        r"one LLaMA-7B-shaped block peaked at ([\d.]+) GiB RSS in\s+calibration",
        "bench/results/compression_llama7b_cpu.json",
        lambda: f"{json_at('bench/results/compression_llama7b_cpu.json', 'memory', 'peak_rss_gib', 'calibration'):.1f}",
    ),
    Claim(
        "README.md",
        r"it was ([\d.]+)× faster on q_proj\s+\(4096²\), ([\d.]+)× on down_proj and ([\d.]+)× \(slower\) on gate_proj",
        "bench/results/compression_llama7b_cpu.json",
        lowrank_speedups,
    ),
    Claim(
        "README.md",
        r"([\d.]+)M → ([\d.]+)M parameters \(([\d.]+)% of\s+the compressed layers, ([\d.]+)% of the model, (\d+) "
        r"layers factored\), decomposition (\d+) s",
        HEADLINE_04,
        compression_04,
    ),
    Claim(
        "README.md",
        r"Calibration of (\d+) × (\d+) tokens takes ([\d.]+) s, ([\d.]+)× a plain forward",
        "bench/results/compression_smollm2.json",
        lambda: (
            str(json_at("bench/results/compression_smollm2.json", "setup", "nsamples")),
            str(json_at("bench/results/compression_smollm2.json", "setup", "seqlen")),
            f"{json_at('bench/results/compression_smollm2.json', 'calibration', 'collect_statistics', 'cpu_s'):.1f}",
            f"{json_at('bench/results/compression_smollm2.json', 'calibration', 'ratio'):.2f}",
        ),
    ),
    Claim(
        "README.md",
        r"(\d+)–(\d+) windows of 1024 tokens per\s+set for the headline rows",
        "bench/results/protocol/table1.csv",
        headline_windows,
    ),
    Claim(
        "README.md",
        r"beats the best ASVD baseline on average only at ratio ([\d.]+) \(([+-][\d.]+) %\s+\[([+-][\d.]+), "
        r"([+-][\d.]+)\]\)",
        "bench/results/protocol/table1.csv",
        lambda: (ratios_where_average(+1), *average_at("0.1")),
    ),
    Claim(
        "README.md",
        r"loses significantly on ([\d, and]+) of the six English sets at ratios 0\.1–0\.5",
        "bench/results/protocol/table1.csv",
        significant_english_losses,
    ),
    Claim(
        "README.md",
        r"its average is a significant loss at\s+([\d., and]+?)\.\s",
        "bench/results/protocol/table1.csv",
        lambda: ratios_where_average(-1),
    ),
    Claim(
        "README.md",
        r"batch 1 dense ([\d.]+) → nsvd-i 0\.4 ([\d.]+) \(×([\d.]+)\), batch 8\s+([\d.]+) → ([\d.]+) \(×([\d.]+)\); "
        r"ONNX weights (\d+) → (\d+) MiB \(int8 on top: (\d+) MiB\)",
        "bench/results/serving.md",
        serving,
    ),
    Claim(
        "README.md",
        r"At ratio 0\.4 it lowers perplexity by ([\d.]+) %\s+\(asvd-i\) and ([\d.]+) % \(nsvd-i\) on average over "
        r"the eight sets \(CIs \[([−\d.]+), ([−\d.]+)\] and\s+\[([−\d.]+), ([−\d.]+)\] %",
        "bench/results/rank_allocation/rank_allocation.csv",
        lambda: (
            change_ci("asvd-i", "0.4", "fisher")[0],
            change_ci("nsvd-i", "0.4", "fisher")[0],
            *change_ci("asvd-i", "0.4", "fisher")[1:],
            *change_ci("nsvd-i", "0.4", "fisher")[1:],
        ),
    ),
    Claim(
        "README.md",
        r"for ([\d.]+)× \(asvd-i\) and ([\d.]+)–([\d.]+)× \(nsvd-i, two\s+measurements of its curves\)",
        "bench/results/rank_allocation/rank_allocation.csv",
        lambda: (
            *(f"{v:.2f}" for v in cost_ratios("asvd-i", "fisher")),
            *(f"{v:.2f}" for v in cost_ratios("nsvd-i", "fisher")),
        ),
    ),
    Claim(
        "README.md",
        r"loses for\s+asvd-i at 0\.5\*\* \(([+-][\d.]+) % \[([+-][\d.]+), ([+-][\d.]+)\]\)",
        "bench/results/rank_allocation/rank_allocation.csv",
        lambda: change_ci("asvd-i", "0.5", "fisher", sign="+"),
    ),
    Claim(
        "README.md",
        r"\(−([\d.]+) % asvd-i,\s+−([\d.]+) % nsvd-i at 0\.4; every set better at every ratio\), but its probes cost "
        r"([\d.]+)× / ([\d.]+)× a uniform\s+compression \((\d+) / (\d+) min",
        "bench/results/rank_allocation/rank_allocation.csv",
        lambda: (
            change_ci("asvd-i", "0.4", "sensitivity")[0],
            change_ci("nsvd-i", "0.4", "sensitivity")[0],
            *(f"{cost_ratios(m, 'sensitivity')[0]:.2f}" for m in ("asvd-i", "nsvd-i")),
            *(f"{allocation(m, '0.4', 'sensitivity')['curve_seconds'] / 60:.0f}" for m in ("asvd-i", "nsvd-i")),
        ),
    ),
    Claim(
        "README.md",
        r"it loses at 0\.3 for both methods, \+(\d+) % and \+(\d+) %",
        "bench/results/rank_allocation/rank_allocation.csv",
        lambda: tuple(f"{allocation(m, '0.3', 'block_error')['mean_change']:.0f}" for m in ("asvd-i", "nsvd-i")),
    ),
    Claim(
        "README.md",
        r"transformers serve = ([\d.]+) / ([\d.]+) / ([\d.]+) tok/s at 1 client,\s+"
        r"([\d.]+) / ([\d.]+) / ([\d.]+) at 8, "
        r"([\d.]+) / ([\d.]+) / ([\d.]+) at 16: nsvd-i 0\.4 is ×([\d.]+) / ×([\d.]+) / ×([\d.]+) the\s+dense export "
        r"\(goal ×1\.30: met\) and ×([\d.]+) transformers serve",
        "bench/results/server_speed_gqa_1thread.json",
        lambda: (
            *(
                f
                for load in ("1 clients", "8 clients", "16 clients")
                for f in server_speed_row("bench/results/server_speed_gqa_1thread.json", load)[:3]
            ),
            *(f"{g['ratio']:.2f}" for g in json_at("bench/results/server_speed_gqa_1thread.json", "goals")),
        ),
    ),
    Claim(
        "README.md",
        r"\(nsvd-i 0\.4: ([\d.]+) / ([\d.]+) / ([\d.]+) tok/s\) but the lead over the dense export\s+falls to "
        r"×([\d.]+) / ×([\d.]+) / ×([\d.]+) \(×([\d.]+) transformers serve\)",
        "bench/results/server_speed_gqa_quiet.json",
        lambda: (
            *(
                server_speed_row("bench/results/server_speed_gqa_quiet.json", load)[0]
                for load in ("1 clients", "8 clients", "16 clients")
            ),
            *(f"{g['ratio']:.2f}" for g in json_at("bench/results/server_speed_gqa_quiet.json", "goals")),
        ),
    ),  # fmt: skip
    # docs/onnx.md
    Claim(
        "docs/onnx.md",
        r"load average ([\d.]+) at the end of the run",
        "bench/results/server.md",
        lambda: re.search(r"Load average at the end: (\d+(?:\.\d+)?)", (RESULTS / "server.md").read_text()).group(1),
    ),
    *(
        Claim(
            "docs/onnx.md",
            rf"\| {re.escape(name)} \| ([\d.]+) \| ([\d.]+) \| ([\d.]+) \| ([\d.]+) \| ×([\d.]+) "
            r"\| ([\d.]+) / ([\d.]+) s \|",
            "bench/results/server.json",
            lambda name=name: server_table(name),
        )
        for name in ("dense", "nsvd-i 0.4")
    ),
    *(
        Claim(
            "docs/onnx.md",
            rf"\| {re.escape(model)} \| ([\d.]+) \| (\d+) \| ([\d.]+) \| ([\d.]+) \| ([\d.]+) / ([\d.]+) \|",
            "bench/results/serving.md",
            lambda model=model: serving_table(model, int8=False),
        )
        for model in ("dense", "nsvd-i 0.2", "nsvd-i 0.4")
    ),
    Claim(
        "docs/onnx.md",
        r"\| nsvd-i 0\.4 \+ int8 \| ([\d.]+) \| (\d+) \| ([\d.]+) \| ([\d.]+) \| – \|",
        "bench/results/serving.md",
        lambda: serving_table("nsvd-i 0.4", int8=True),
    ),
    Claim(
        "docs/onnx.md",
        r"dense (\d+) → (\d+) MiB \(\+([\d.]+)%\), nsvd-i 0\.4 (\d+) → (\d+) MiB\s+\(\+([\d.]+)%\)",
        "bench/results/server.json",
        lambda: (*server_rss("dense"), *server_rss("nsvd-i 0.4")),
    ),
    *(
        Claim(
            "docs/onnx.md",
            rf"\| {re.escape(label)} \| {threads} \| {cells}",
            path,
            lambda r=read, p=path, k=key: r(p, k),
        )
        for cells, read, labels, files in (
            (
                r"([\d.]+)(?: tok/s)? \| ([\d.]+) \| ([\d.]+) \| ×([\d.]+) \|",
                server_speed_row,
                SERVER_LOADS,
                {2: "bench/results/server_speed_gqa_quiet.json", 1: "bench/results/server_speed_gqa_1thread.json"},
            ),
            (
                r"([\d.]+) \| ([\d.]+) \| ×([\d.]+) \| ×([\d.]+) \| ([\d.]+) \|",
                ceiling_row,
                CEILING_LOADS,
                {2: "bench/results/graph_ceiling.json", 1: "bench/results/graph_ceiling_1thread.json"},
            ),
        )
        for threads, path in files.items()
        for label, key in labels.items()
    ),
    Claim(
        "docs/onnx.md",
        r"nsvd-i 0\.4 is ×([\d.]+) / ×([\d.]+) / ×([\d.]+) the dense export at 1 / 8 / 16\s+clients "
        r"\(goal ≥ ×1\.30: met\) and ×([\d.]+) `transformers serve`",
        "bench/results/server_speed_gqa_1thread.json",
        lambda: tuple(f"{g['ratio']:.2f}" for g in json_at("bench/results/server_speed_gqa_1thread.json", "goals")),
    ),
    Claim(
        "docs/onnx.md",
        r"\(nsvd-i 0\.4 at 16 clients: ([\d.]+) against ([\d.]+) tok/s\), nsvd-i 0\.4 is ×([\d.]+) `transformers serve`"
        r"\s+at 16 clients \(met\), but only ×([\d.]+) / ×([\d.]+) / ×([\d.]+) the dense export",
        "bench/results/server_speed_gqa_quiet.json",
        lambda: (
            server_speed_row("bench/results/server_speed_gqa_quiet.json", "16 clients")[0],
            server_speed_row("bench/results/server_speed_gqa_1thread.json", "16 clients")[0],
            *(f"{g['ratio']:.2f}" for g in json_at("bench/results/server_speed_gqa_quiet.json", "goals")[3:]),
            *(f"{g['ratio']:.2f}" for g in json_at("bench/results/server_speed_gqa_quiet.json", "goals")[:3]),
        ),
    ),
    # docs/lm_eval.md
    Claim(
        "docs/lm_eval.md",
        r"ratio 0\.4: ([\d,]+) -> ([\d,]+) parameters in ([\d.]+)s",
        HEADLINE_04,
        lambda: (
            f"{json_at(HEADLINE_04, 'config', 'compression', 'params_before'):,}",
            f"{json_at(HEADLINE_04, 'config', 'compression', 'params_after'):,}",
            f"{json_at(HEADLINE_04, 'config', 'compression', 'compression_seconds'):.1f}",
        ),
    ),
    Claim(
        "docs/lm_eval.md",
        r'"model_num_parameters": (\d+),',
        HEADLINE_04,
        lambda: str(json_at(HEADLINE_04, "config", "model_num_parameters")),
    ),
    Claim(
        "docs/lm_eval.md",
        r'"params_before": (\d+), "params_after": (\d+), "params_removed_fraction": ([\d.]+)',
        HEADLINE_04,
        lambda: tuple(
            str(json_at(HEADLINE_04, "config", "compression", k))
            for k in ("params_before", "params_after", "params_removed_fraction")
        ),
    ),
    Claim(
        "docs/lm_eval.md",
        r'"seconds": \{"statistics": ([\d.]+), "decomposition": ([\d.]+)\},\s+"compression_seconds": ([\d.]+),',
        HEADLINE_04,
        lambda: (
            str(json_at(HEADLINE_04, "config", "compression", "seconds", "statistics")),
            str(json_at(HEADLINE_04, "config", "compression", "seconds", "decomposition")),
            str(json_at(HEADLINE_04, "config", "compression", "compression_seconds")),
        ),
    ),
    # bench/results/protocol/README.md (its cost table describes a run whose files the rerun replaced)
    Claim(
        "bench/results/protocol/README.md",
        r"\(([\d,]+) s, `logs/wall.txt`\)",
        "bench/results/protocol/logs/wall.txt",
        lambda: f"{int(re.search(WALL, (PROTOCOL / 'logs' / 'wall.txt').read_text()).group(1)):,}",
    ),
)


@pytest.mark.parametrize("claim", CLAIMS, ids=lambda c: f"{c.doc}:{c.quote[:40]}")
def test_quoted_figures_match_their_result_files(claim: Claim):
    text = (REPO / claim.doc).read_text(encoding="utf-8")
    found = re.search(claim.quote, text)
    assert found, f"{claim.doc} no longer quotes {claim.quote!r}: update tests/test_claims.py with the text"
    expected = claim.figures()
    expected = (expected,) if isinstance(expected, str) else tuple(expected)
    assert found.groups() == expected, f"{claim.doc} quotes {found.groups()}, {claim.source} says {expected}"


def test_the_readers_find_what_they_read():
    """The claims above read real rows: a renamed column or file would otherwise pass as a KeyError here."""
    assert len(table1()) == 5 and {"nsvd_snips", "nsvd_cmrc"} <= set(tasks_of(table1()[0]))
    assert joined(["1"]) == "1" and joined(["1", "2", "3"]) == "1, 2 and 3"

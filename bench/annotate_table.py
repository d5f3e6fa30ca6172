"""Stamp a leaderboard written by ``nsvd-lm leaderboard`` with the settings of the sweep behind it.

    python bench/annotate_table.py SWEEP_DIR PREFIX [--command "bench/paper_tables.sh table1"]

Reads every per-configuration lm-eval results file in SWEEP_DIR (``nsvd-lm sweep`` output) and
writes ``PREFIX.settings.json`` (model, calibration text and size, window length, cap, seed,
library versions, per-configuration compression and wall time) and prepends a header to
``PREFIX.md`` saying the table is capped and how it was produced. Idempotent: a header written
before is replaced.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path
from typing import Any

HEADER_START = "<!-- settings-header -->"
HEADER_END = "<!-- /settings-header -->"


def _first(values: list[Any]) -> Any:
    return next((v for v in values if v not in (None, "", {})), None)


def _torch_version(env_info: str | None) -> str | None:
    match = re.search(r"PyTorch version: (\S+)", env_info or "")
    return match.group(1) if match else None


def collect_settings(sweep_dir: Path) -> dict[str, Any]:
    """Settings shared by the sweep's results files, plus per-configuration timings."""
    files = sorted(p for p in sweep_dir.glob("*.json") if not p.name.startswith("."))
    if not files:
        raise FileNotFoundError(f"no results files in {sweep_dir}")
    runs = [(p, json.loads(p.read_text(encoding="utf-8"))) for p in files]
    configs = [d.get("config") or {} for _, d in runs]
    compressions = [c.get("compression") or {} for c in configs]
    sweep = [d.get("nsvd_sweep") or {} for _, d in runs]
    calibration = _first([c.get("calibration") for c in compressions])
    if not calibration:  # only the uncompressed row so far: the sweep's requested calibration
        requested = _first([s.get("calibration") for s in sweep]) or {}
        calibration = {k.removeprefix("calib_"): v for k, v in requested.items()}
    model_args = _first([c.get("model_args") for c in configs]) or {}
    windows: dict[str, str] = {}
    for _, data in runs:
        for task, res in (data.get("results") or {}).items():
            scored, full = res.get("n_windows,none"), res.get("n_windows_full,none")
            if scored is not None and full is not None:
                windows[task] = f"{scored:g}/{full:g}"
    per_config = {}
    for (path, data), comp, sw in zip(runs, compressions, sweep):
        per_config[path.stem] = {
            "method": comp.get("method"),
            "ratio": comp.get("ratio"),
            "k1_frac": comp.get("k1_frac"),
            "params_removed_fraction": comp.get("params_removed_fraction"),
            "compression_seconds": comp.get("seconds") or comp.get("compression_seconds"),
            "stats_cache_hit": comp.get("stats_cache_hit"),
            "wall_seconds": sw.get("seconds"),
        }
        if sw.get("point") and sw["point"] != path.stem:  # copied from an identical configuration of another table
            per_config[path.stem]["reused_result_of"] = sw["point"]
    model = str(_first([s.get("model") for s in sweep]) or model_args.get("pretrained"))
    first = runs[0][1]
    return {
        "capped": True,
        "model": model,
        "model_note": (
            "SmolLM2-135M-Instruct, Q4_1 GGUF weights dequantized to float32 (nsvd_lm.smollm2), "
            "not the bf16 hub checkpoint"
            if "SmolLM2" in model
            else None
        ),
        "model_num_parameters": _first([c.get("model_num_parameters") for c in configs]),
        "calibration": calibration,
        "tasks": _first([s.get("tasks") for s in sweep]),
        "limit_windows_per_task": _first([s.get("limit") for s in sweep]),
        "max_length": model_args.get("max_length"),
        "dtype": model_args.get("dtype"),
        "device": _first([c.get("device") for c in configs]),
        "batch_size": _first([c.get("batch_size") for c in configs]),
        "windows_scored_of_full": windows,
        "alpaca_eval_ja_note": (
            "offline AlpacaEval (JA) is the ja_vicuna_qa substitute "
            "(80 Japanese Vicuna questions + text-davinci-003 answers)"
        ),
        "versions": {
            "nsvd_lm": _first([c.get("nsvd_lm_version") for c in compressions]),
            "lm_eval": first.get("lm_eval_version"),
            "transformers": first.get("transformers_version"),
            "torch": _torch_version(first.get("pretty_env_info")),
            "python": sys.version.split()[0],
        },
        "configurations": per_config,
    }


def _windows_text(windows: dict[str, str]) -> str:
    return ", ".join(f"{task.removeprefix('nsvd_')} {count}" for task, count in windows.items())


def header_markdown(settings: dict[str, Any], command: str | None) -> str:
    calib = settings["calibration"] or {}
    windows = settings["windows_scored_of_full"]
    lines = [
        HEADER_START,
        f"> **CAPPED RUN — not comparable with full-set numbers.** Each perplexity is over the first "
        f"{settings['limit_windows_per_task']:g} windows of {settings['max_length']} tokens of each set "
        f"(scored/full windows: {_windows_text(windows)}).",
        f"> Model: `{settings['model']}`" + (f" — {settings['model_note']}." if settings.get("model_note") else "."),
        f"> Calibration: {calib.get('nsamples')} × {calib.get('seqlen')} tokens of `{calib.get('dataset')}`"
        + (f" (`{calib['source']}`)" if calib.get("source") else "")
        + f", seed {calib.get('seed')}; one calibration forward for the whole grid. "
        f"AlpacaEval (JA) offline = ja_vicuna_qa substitute.",
        "> Versions: "
        + ", ".join(f"{k} {v}" for k, v in settings["versions"].items() if v)
        + f"; {settings['dtype']} on {settings['device']}, batch size {settings['batch_size']}.",
    ]
    if command:
        lines.append(f"> Command: `{command}` (then `nsvd-lm leaderboard`; all settings: `*.settings.json`).")
    lines.append(HEADER_END)
    return "\n".join(lines) + "\n\n"


def annotate(sweep_dir: Path, prefix: Path, command: str | None = None) -> dict[str, Any]:
    settings = collect_settings(sweep_dir)
    settings["command"] = command
    prefix.with_name(prefix.name + ".settings.json").write_text(json.dumps(settings, indent=1) + "\n", encoding="utf-8")
    md = prefix.with_name(prefix.name + ".md")
    body = md.read_text(encoding="utf-8")
    body = re.sub(re.escape(HEADER_START) + r".*?" + re.escape(HEADER_END) + r"\n*", "", body, flags=re.S)
    md.write_text(header_markdown(settings, command) + body, encoding="utf-8")
    return settings


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("sweep_dir", type=Path)
    parser.add_argument("prefix", type=Path, help="leaderboard prefix (PREFIX.md must exist)")
    parser.add_argument("--command", default=None, help="command that produced the sweep, for the header")
    args = parser.parse_args(argv)
    annotate(args.sweep_dir, args.prefix, args.command)
    return 0


if __name__ == "__main__":
    sys.exit(main())

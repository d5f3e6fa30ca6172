"""The leaderboard written out: Markdown (the paper's layout), CSV and PNG."""

from __future__ import annotations

import csv
import io
import math
import os
from pathlib import Path

from nsvd_lm.experiments.leaderboard.parse import BASELINE_METHODS, ORIGINAL
from nsvd_lm.experiments.leaderboard.rows import BASELINE_TIE_PCT, DATASET_LABELS, Leaderboard, usual_windows
from nsvd_lm.experiments.paired import BOOTSTRAP_SEED, PairedChange


def _fmt_value(value: float | None) -> str:
    if value is None:
        return "–"
    return f"{value:.2f}" if value < 1e4 else f"{value:.3g}"


def _fmt_pct(value: float | None) -> str:
    return "" if value is None else f"{value:+.1f}%"


def _fmt_ci(ci: PairedChange) -> str:
    return f"[{ci.low:+.1f}, {ci.high:+.1f}]"


def _fmt_improvement(value: float | None, std: float | None, ci: PairedChange | None, has_ci: bool) -> str:
    """``(+4.5%) [+1.0, +8.0]``; ``**bold**`` = CI excludes 0, ``n.s.`` = it does not, ``†`` = no window scores."""
    if value is None:
        return ""
    text = f"({_fmt_pct(value)}" + (f" ± {std:.1f}" if std is not None else "") + ")"
    if ci is not None:
        return text + " " + _fmt_ci(ci)
    return text + (" †" if not has_ci else "")


def _mark(cell: str, ci: PairedChange | None) -> str:
    if ci is None:
        return cell
    return f"**{cell}**" if ci.significant else f"{cell} n.s."


def _windows_note(board: Leaderboard) -> str | None:
    """How many windows / tokens stand behind the CIs of each column."""
    parts = []
    for task in board.tasks:
        counts = sorted(
            {(c.n_windows, c.n_tokens) for r in board.rows for t, c in r.improvement_ci.items() if t == task}
        )
        if not counts:
            continue
        lo, hi = counts[0], counts[-1]
        text = f"{lo[0]} windows / {lo[1]:,} tokens"
        if lo != hi:
            text = f"{lo[0]}-{hi[0]} windows / {lo[1]:,}-{hi[1]:,} tokens"
        parts.append(f"{DATASET_LABELS.get(task, task)}: {text}")
    return "; ".join(parts) if parts else None


def to_markdown(board: Leaderboard) -> str:
    seeded = any(r.n_seeds > 1 for r in board.rows)
    header = ["Ratio", "Method", *(board.column_label(t) for t in board.tasks), "Avg. Impro."]
    if seeded:
        header.append("Seeds")
    any_ci = any(r.improvement_ci for r in board.rows)
    lines = [
        f"# {board.metric} — {board.model}",
        "",
        f"NSVD/NID cells: {board.metric} (relative improvement over the best of "
        f"{', '.join(BASELINE_METHODS)} at the same ratio, ranked on the windows they share; a baseline "
        f"scored on fewer windows that is not lower by a significant {BASELINE_TIE_PCT:g} % gives way to the fuller "
        "one; + = lower perplexity). "
        f"Avg. Impro. excludes the calibration set"
        + (
            f" ({DATASET_LABELS.get(board.calibration_task, board.calibration_task)})."
            if board.calibration_task
            else "."
        ),
        "",
        f"[low, high]: paired bootstrap {board.confidence:.0%} CI of the improvement over the windows both "
        f"results scored ({board.n_resamples} resamples of windows, seed {BOOTSTRAP_SEED}); **bold** = the CI "
        "excludes 0 (significant), n.s. = it contains 0 (a tie); † = no per-window scores in the results, no CI. "
        f"Other cells: perplexity [low, high] = its own bootstrap {board.confidence:.0%} CI over the windows "
        "(and the calibration seeds) behind it; ± = std over calibration seeds.",
        "",
        "| " + " | ".join(header) + " |",
        "|" + "|".join(["---"] * 2 + ["---:"] * (len(header) - 2)) + "|",
    ]
    for row in board.rows:
        cells = [("–" if row.method is None else f"{row.ratio:g}"), row.label + (" ‡" if row.reduced else "")]
        for task in board.tasks:
            cell = _fmt_value(row.values.get(task))
            if task in row.value_std:
                cell += f" ± {_fmt_value(row.value_std[task])}"
            if task in row.value_ci:
                low, high = row.value_ci[task]
                cell += f" [{_fmt_value(low)}, {_fmt_value(high)}]"
            ci = row.improvement_ci.get(task)
            if task in row.improvements:
                cell += " " + _fmt_improvement(
                    row.improvements[task], row.improvement_std.get(task), ci, has_ci=ci is not None
                )
                cell = _mark(cell, ci)
                if task in row.exhausted:
                    cell += " §"
            cells.append(cell)
        avg = _fmt_pct(row.avg_improvement)
        if row.avg_improvement is not None:
            avg = _mark(
                avg + (" " + _fmt_ci(row.avg_ci) if row.avg_ci else (" †" if not row.avg_ci else "")), row.avg_ci
            )
        cells.append(avg)
        if seeded:
            cells.append(",".join("–" if s is None else str(s) for s in row.seeds))
        lines.append("| " + " | ".join(cells) + " |")
    if board.capped:
        lines += [
            "",
            "**Capped results** (not comparable to full-set numbers): "
            + "; ".join(f"{DATASET_LABELS.get(t, t)}: {n}" for t, n in board.capped.items()),
        ]
    if any_ci:
        lines += ["", "Windows behind each CI (per run): " + (_windows_note(board) or "–")]
    reduced = [r for r in board.rows if r.reduced]
    if reduced:
        most = usual_windows(board.rows, board.tasks)
        lines += [
            "",
            "‡ = scored on fewer windows than the fullest rows' own sweep gave them (a nested subset, so pairs "
            "still match window by window; wider CIs): "
            + "; ".join(
                f"{DATASET_LABELS.get(t, t)} {min(r.windows.get(t, most[t]) for r in reduced)} of {most[t]}"
                for t in board.tasks
                if any(r.windows.get(t, most[t]) < most[t] for r in reduced)
            )
            + ".",
        ]
    if any(r.exhausted for r in board.rows) or any(c.exhausted for c in board.comparisons):
        lines += [
            "",
            "§ = the CI contains 0 although every window of the set is scored: the set is exhausted, more windows "
            "cannot decide this cell.",
        ]
    for note in board.notes:
        lines.append(f"- {note}")
    if board.comparisons:
        lines += ["", *_comparisons_markdown(board)]
    return "\n".join(lines) + "\n"


def _comparison_cell(ci: PairedChange | None, exhausted: bool) -> str:
    if ci is None:
        return "–"
    text = _mark(f"{_fmt_pct(ci.estimate)} {_fmt_ci(ci)}", ci)
    return text + (" §" if exhausted else "")


def _comparisons_markdown(board: Leaderboard) -> list[str]:
    """The extra paired comparisons (``versus``): one line per row and reference."""
    header = ["Ratio", "Row", "vs", *(DATASET_LABELS.get(t, t) for t in board.tasks), "Avg."]
    lines = [
        "## Paired comparisons",
        "",
        "Relative improvement of the row over the reference at the same ratio (+ = the row has lower perplexity), "
        f"paired bootstrap {board.confidence:.0%} CI on the windows (and calibration seeds) both share; **bold** = "
        "significant. `best ASVD [variant]` = per set, the lowest of the ASVD rows with the same rank allocation "
        "(and sequential fitting) as the row.",
        "",
        "| " + " | ".join(header) + " |",
        "|" + "|".join(["---"] * 3 + ["---:"] * (len(header) - 3)) + "|",
    ]
    for c in board.comparisons:
        cells = [f"{c.ratio:g}", c.label, c.reference]
        cells += [_comparison_cell(c.cells.get(t), t in c.exhausted) for t in board.tasks]
        cells.append(_comparison_cell(c.average, False))
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def comparisons_csv(board: Leaderboard) -> str:
    """The extra paired comparisons, one line per (row, reference, set) and one for the average ("avg")."""
    out = io.StringIO()
    writer = csv.writer(out)
    writer.writerow(
        [
            "model",
            "ratio",
            "row",
            "reference",
            "task",
            "reference_row",
            "impro_pct",
            "ci_low",
            "ci_high",
            "significant",
            "n_windows",
            "n_seeds",
            "exhausted",
        ]
    )
    for c in board.comparisons:
        for task, ci in [*c.cells.items(), *([("avg", c.average)] if c.average else [])]:
            writer.writerow(
                [
                    board.model,
                    f"{c.ratio:g}",
                    c.label,
                    c.reference,
                    task,
                    c.references.get(task, c.reference),
                    f"{ci.estimate:.4f}",
                    f"{ci.low:.4f}",
                    f"{ci.high:.4f}",
                    str(ci.significant).lower(),
                    ci.n_windows,
                    ci.n_seeds,
                    str(task in c.exhausted).lower(),
                ]
            )
    return out.getvalue()


def to_csv(board: Leaderboard) -> str:
    """One row per table row; the CI columns follow the original ones (impro = + lower perplexity)."""
    out = io.StringIO()
    writer = csv.writer(out)
    ci_columns = [
        f"{t}_{c}"
        for t in board.tasks
        for c in ("impro_ci_low", "impro_ci_high", "significant", "n_windows", "n_tokens", "std", "impro_std")
    ]
    writer.writerow(
        [
            "model",
            "ratio",
            "method",
            *board.tasks,
            *(f"{t}_impro_pct" for t in board.tasks),
            "avg_impro_pct",
            "capped",
            *ci_columns,
            "avg_impro_ci_low",
            "avg_impro_ci_high",
            "avg_significant",
            "n_seeds",
            "seeds",
            "reduced",
            *(f"{t}_windows" for t in board.tasks),
            *(f"{t}_ci_{end}" for t in board.tasks for end in ("low", "high")),
        ]
    )
    capped = "; ".join(f"{t}: {n}" for t, n in board.capped.items())

    def num(value: float | None, fmt: str = ".4f") -> str:
        return "" if value is None else format(value, fmt)

    def exact(value: float | None) -> str:  # perplexities keep every digit, as the value columns do
        return "" if value is None else repr(float(value))

    for row in board.rows:
        extra = []
        for task in board.tasks:
            ci = row.improvement_ci.get(task)
            extra += [
                num(ci.low if ci else None),
                num(ci.high if ci else None),
                "" if ci is None else str(ci.significant).lower(),
                "" if ci is None else str(ci.n_windows),
                "" if ci is None else str(ci.n_tokens),
                exact(row.value_std.get(task)),
                num(row.improvement_std.get(task)),
            ]
        avg = row.avg_ci
        writer.writerow(
            [
                board.model,
                f"{row.ratio:g}",
                row.label,
                *(("" if row.values.get(t) is None else repr(row.values[t])) for t in board.tasks),
                *(("" if t not in row.improvements else f"{row.improvements[t]:.4f}") for t in board.tasks),
                "" if row.avg_improvement is None else f"{row.avg_improvement:.4f}",
                capped,
                *extra,
                num(avg.low if avg else None),
                num(avg.high if avg else None),
                "" if avg is None else str(avg.significant).lower(),
                str(row.n_seeds),
                " ".join("" if s is None else str(s) for s in row.seeds).strip(),
                str(row.reduced).lower(),
                *(str(row.windows[t]) if t in row.windows else "" for t in board.tasks),
                *(exact(row.value_ci[t][i] if t in row.value_ci else None) for t in board.tasks for i in (0, 1)),
            ]
        )
    return out.getvalue()


def plot_png(board: Leaderboard, path: str | os.PathLike) -> Path:
    """Perplexity vs ratio per dataset (log y), one line per method, Original dashed.

    With CIs, a second block of panels shows each NSVD/NID improvement with its CI as an error
    bar: filled markers = significant, hollow grey = the CI contains 0.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(board.tasks)
    cols = min(4, n)
    block = math.ceil(n / cols)
    with_ci = any(r.improvement_ci for r in board.rows)
    nrows = block * (2 if with_ci else 1)
    fig, axes = plt.subplots(nrows, cols, figsize=(4.2 * cols, 3.4 * nrows), squeeze=False)
    labels = []
    for row in board.rows:
        if row.method is not None and row.label not in labels:
            labels.append(row.label)
    colors = {label: f"C{i % 10}" for i, label in enumerate(labels)}
    flat = list(axes.flat)
    for ax, task in zip(flat[: block * cols], board.tasks):
        for label in labels:
            points = sorted((r.ratio, r.values[task]) for r in board.rows if r.label == label and task in r.values)
            if points:
                ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=label, color=colors[label])
        original = [r.values[task] for r in board.rows if r.method is None and task in r.values]
        if original:
            ax.axhline(original[0], color="black", linestyle="--", linewidth=1, label=ORIGINAL)
        ax.set_yscale("log")
        ax.set_title(board.column_label(task), fontsize=9)
        ax.set_xlabel("compression ratio")
        ax.set_ylabel(board.metric)
        ax.grid(True, which="both", alpha=0.3)
    for ax in flat[n : block * cols]:
        ax.axis("off")
    if with_ci:
        for ax, task in zip(flat[block * cols :], board.tasks):
            for i, label in enumerate(labels):
                for r in board.rows:
                    ci = r.improvement_ci.get(task)
                    if r.label != label or ci is None:
                        continue
                    x = r.ratio + (i - len(labels) / 2) * 0.004  # side by side at one ratio
                    significant = ci.significant
                    ax.errorbar(
                        [x],
                        [r.improvements[task]],
                        yerr=[[r.improvements[task] - ci.low], [ci.high - r.improvements[task]]],
                        fmt="o",
                        color=colors[label] if significant else "0.6",
                        markerfacecolor=colors[label] if significant else "white",
                        capsize=2,
                    )
            ax.axhline(0, color="black", linewidth=0.8)
            ax.set_title(f"{DATASET_LABELS.get(task, task)}: improvement, {board.confidence:.0%} CI", fontsize=9)
            ax.set_xlabel("compression ratio")
            ax.set_ylabel("% vs best baseline")
            ax.grid(True, alpha=0.3)
        for ax in flat[block * cols + n :]:
            ax.axis("off")
    handles, names = flat[0].get_legend_handles_labels()
    fig.legend(handles, names, loc="lower center", ncol=min(len(names), 6), fontsize=8)
    fig.suptitle(f"{board.model}" + (" (capped results)" if board.capped else ""), fontsize=10)
    fig.tight_layout(rect=(0, 0.14 / nrows, 1, 0.97))  # room for the legend
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out

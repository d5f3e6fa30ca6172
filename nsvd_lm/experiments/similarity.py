"""How similar are a set's activations to the calibration set's? (the paper's Table 2 / Figure 1)

The NSVD paper motivates the nested step by showing that activations of out-of-domain sets
(other languages, other genres) are less similar to the calibration activations than in-domain
ones, so a decomposition that trusts the calibration statistics alone loses on them.

Statistic, precisely. The model is the uncompressed one. For every *distinct input* of the
layers that compression targets (linears fed the same tensor share one input: for a Llama
block these are {q,k,v}_proj, o_proj, {gate,up}_proj and down_proj, i.e. 4 inputs per block),
and every token t of a set D with activation ``x_t`` (n-dim) at that input:

* ``G_D = Σ_t x_t x_tᵀ`` (n × n), the Gram matrix that activation-aware whitening is built from
  (ASVD-I/II, NSVD), and ``a_D = (1/N_D) Σ_t |x_t|`` (n,), ASVD-0's per-channel scale;
* ``gram_cosine(C, D) = ⟨G_C, G_D⟩_F / (‖G_C‖_F ‖G_D‖_F)``: the cosine similarity of the two
  Gram matrices seen as vectors (Frobenius inner product over norms). Both are positive
  semi-definite, so it lies in [0, 1]; it is 1 exactly when ``G_D`` is a positive multiple of
  ``G_C`` (the token count does not matter);
* ``mean_abs_cosine(C, D) = a_C·a_D / (‖a_C‖ ‖a_D‖)``, the same for the mean-|x| vectors.

C is the calibration set: exactly the windows a compression with the same calibration settings
uses (``nsvd_lm.calib_data.calibration_windows``: ``calib_nsamples`` random windows of
``calib_seqlen`` tokens, seed ``seed``), so its statistics are shared with the compression cache.
D is an evaluation set's text (``nsvd_lm.experiments.evaldata.load_eval_text``, the text its perplexity is
computed on), tokenized once and cut into disjoint windows of ``seqlen`` tokens; when there are
more than ``nsamples`` windows, ``nsamples`` of them evenly spaced over the text are used
(``evaluation_windows``). Per set the report gives, over the L distinct inputs of the model, the
mean, the population standard deviation (ddof = 0) and the minimum of each cosine, and the mean
per kind of input (attention input, o_proj, MLP input, down_proj).

C's statistics are the calibration statistics (``nsvd_lm.calibration.calibrate``, cached). D's are
streamed block by block per window (``nsvd_lm.calibration.window_statistics``; no raw activations
kept) and reduced to inner products (``WindowParts``, cached beside C's statistics, so a rerun is
cheap), so every summary also gets a
bootstrap 95 % CI over D's windows (2000 resamples, fixed seed, as the leaderboard's CIs; the
basic interval, which corrects the resampling bias of a cosine of sums: ``basic_interval``): the
mean, the minimum over inputs and the per-kind means. The CI covers the choice of D's windows,
not C's (rerun with other ``--seed`` values for that).
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import logging
import math
import os
import statistics
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from nsvd_lm.calibration import CalibrationStats, calibrate, window_statistics
from nsvd_lm.config import CalibrationConfig
from nsvd_lm.experiments.paired import BOOTSTRAP_SEED, CONFIDENCE, N_RESAMPLES
from nsvd_lm.files import write_json_atomic, write_text_atomic
from nsvd_lm.names import model_name as short_model_name
from nsvd_lm.names import portable, portable_text
from nsvd_lm.targets import Target, select_targets
from nsvd_lm.windows import bos_per_window, encode_plain, windows_fingerprint

logger = logging.getLogger(__name__)

STATISTICS: tuple[str, ...] = ("gram_cosine", "mean_abs_cosine")
CI_COLUMNS: tuple[str, ...] = ("gram_cosine:mean", "gram_cosine:min", "mean_abs_cosine:mean")
PARTS_FORMAT = "nsvd-lm-similarity-parts-v1"


# ----------------------------------------------------------------------------- the math


def gram_cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    """``⟨A, B⟩_F / (‖A‖_F ‖B‖_F)`` in float64; 0 when either matrix is zero."""
    return vector_cosine(a.reshape(-1), b.reshape(-1))


def vector_cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    """Cosine similarity of two vectors in float64; 0 when either is zero."""
    a64, b64 = a.to(torch.float64).reshape(-1), b.to(torch.float64).reshape(-1)
    if a64.shape != b64.shape:
        raise ValueError(f"cannot compare statistics of shapes {tuple(a.shape)} and {tuple(b.shape)}")
    denominator = float(a64.norm() * b64.norm())
    return float(a64 @ b64) / denominator if denominator > 0 else 0.0


@dataclass
class InputSimilarity:
    """Similarity at one distinct layer input."""

    key: str  # the first module fed this input, e.g. model.layers.3.self_attn.q_proj
    block: int
    kind: str  # the modules sharing it, e.g. "q_proj+k_proj+v_proj"
    gram_cosine: float
    mean_abs_cosine: float


def distinct_inputs(stats: CalibrationStats, targets: Sequence[Target]) -> list[tuple[str, int, str]]:
    """``(key, block index, kind)`` of every distinct input, in model order."""
    by_key: dict[str, list[Target]] = {}
    for target in targets:
        by_key.setdefault(stats.module_to_key[target.name], []).append(target)
    return [
        (key, group[0].block_index, "+".join(t.name.rsplit(".", 1)[-1] for t in group)) for key, group in by_key.items()
    ]


def compare_statistics(
    reference: CalibrationStats, other: CalibrationStats, targets: Sequence[Target]
) -> list[InputSimilarity]:
    """Per distinct input, the cosines between two sets' statistics of the same model."""
    rows = []
    for key, block, kind in distinct_inputs(reference, targets):
        rows.append(
            InputSimilarity(
                key=key,
                block=block,
                kind=kind,
                gram_cosine=gram_cosine(reference.gram(key), other.gram(key)),
                mean_abs_cosine=vector_cosine(reference.mean_abs(key), other.mean_abs(key)),
            )
        )
    return rows


@dataclass
class WindowParts:
    """One distinct input's cosines as functions of how often each of D's windows is counted.

    With ``G_D = Σ_w c_w G_w`` and ``s_D = Σ_w c_w s_w`` (``s_w`` = window w's ``Σ|x|``), both
    cosines need only inner products, so a bootstrap over windows never forms a Gram matrix:
    ``gram_cosine = c·cross / (‖G_C‖ sqrt(cᵀ inner c))`` with ``cross_w = ⟨G_C, G_w⟩`` and
    ``inner_wv = ⟨G_w, G_v⟩``, and the same for the mean-|x| vectors (the token count cancels).
    """

    key: str
    block: int
    kind: str
    cross: np.ndarray  # (W,)
    inner: np.ndarray  # (W, W)
    reference_norm: float
    abs_cross: np.ndarray  # (W,)
    abs_inner: np.ndarray  # (W, W)
    reference_abs_norm: float

    def to_dict(self) -> dict[str, Any]:
        return {k: (v.tolist() if isinstance(v, np.ndarray) else v) for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "WindowParts":
        arrays = ("cross", "inner", "abs_cross", "abs_inner")
        return cls(**{k: (np.asarray(v, dtype=np.float64) if k in arrays else v) for k, v in data.items()})

    def cosines(self, counts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``(gram_cosine, mean_abs_cosine)`` for each row of ``counts`` (R × W window multiplicities)."""

        def cosine(cross, inner, norm):
            squared = np.einsum("rw,wv,rv->r", counts, inner, counts)
            denominator = norm * np.sqrt(np.maximum(squared, 0.0))
            with np.errstate(divide="ignore", invalid="ignore"):
                return np.where(denominator > 0, (counts @ cross) / denominator, 0.0)

        return (
            cosine(self.cross, self.inner, self.reference_norm),
            cosine(self.abs_cross, self.abs_inner, self.reference_abs_norm),
        )


def window_parts(
    model: nn.Module,
    windows: torch.Tensor,
    reference: CalibrationStats,
    targets: Sequence[Target],
    progress: bool = True,
) -> list[WindowParts]:
    """Per distinct input, the inner products of D's per-window statistics with each other and with C's.

    Cached beside C's statistics (a few kB: W × W numbers per input), keyed by C's cache entry, D's
    windows and the targets, so a rerun makes no forward pass.
    """
    key_payload = [reference.path.name, windows_fingerprint(windows), [t.name for t in targets], PARTS_FORMAT]
    digest = hashlib.sha256(json.dumps(key_payload).encode()).hexdigest()[:24]
    cache_file = reference.path.parent / f"similarity-{digest}.json"
    if cache_file.exists():
        return [WindowParts.from_dict(d) for d in json.loads(cache_file.read_text())["inputs"]]
    kinds = {key: (block, kind) for key, block, kind in distinct_inputs(reference, targets)}
    parts = []
    for _, module_to_key, grams, abs_sums in window_statistics(model, windows, list(targets), progress=progress):
        for key in dict.fromkeys(module_to_key.values()):
            block, kind = kinds[key]
            g_c = reference.gram(key)  # float64
            a_c = reference.mean_abs(key)
            per_window = torch.stack([g.to(torch.float64).reshape(-1) for g in grams[key]])  # (W, n²)
            sums = torch.stack([a.to(torch.float64) for a in abs_sums[key]])  # (W, n)
            parts.append(
                WindowParts(
                    key=key,
                    block=block,
                    kind=kind,
                    cross=(per_window @ g_c.reshape(-1)).numpy(),
                    inner=(per_window @ per_window.T).numpy(),
                    reference_norm=float(g_c.norm()),
                    abs_cross=(sums @ a_c).numpy(),
                    abs_inner=(sums @ sums.T).numpy(),
                    reference_abs_norm=float(a_c.norm()),
                )
            )
            del per_window
    write_json_atomic(cache_file, {"format": PARTS_FORMAT, "inputs": [p.to_dict() for p in parts]})
    return parts


def bootstrap_counts(n_windows: int, n_resamples: int = N_RESAMPLES, seed: int = BOOTSTRAP_SEED) -> np.ndarray:
    """(R, W) window multiplicities of ``n_resamples`` resamples with replacement (fixed seed)."""
    rng = np.random.default_rng(seed)
    return rng.multinomial(n_windows, np.full(n_windows, 1.0 / n_windows), size=n_resamples).astype(np.float64)


def basic_interval(estimate: float, replicates: np.ndarray, confidence: float = CONFIDENCE) -> list[float]:
    """The basic (reverse-percentile) bootstrap interval ``[2θ̂ − q_hi, 2θ̂ − q_lo]``, clipped to [−1, 1].

    Why not the plain percentile interval: a resample repeats some of D's windows and drops
    others, so its Gram matrix is less averaged and its cosine with C's is systematically lower
    than the estimate's (for WikiText-2 against itself every replicate lies below the estimate).
    The basic interval corrects for that bias: it is an interval for the cosine of the whole set,
    of which the estimate over ``nsamples`` windows is itself a low-biased reading, so for the sets
    closest to C it can lie above the estimate.
    """
    alpha = (1.0 - confidence) / 2.0
    low, high = np.quantile(replicates, [alpha, 1.0 - alpha])
    return [float(np.clip(2.0 * estimate - high, -1.0, 1.0)), float(np.clip(2.0 * estimate - low, -1.0, 1.0))]


# ----------------------------------------------------------------------------- the data


def evaluation_windows(tokenizer: Any, text: str, nsamples: int, seqlen: int, bos: bool = False) -> torch.Tensor:
    """Disjoint ``seqlen``-token windows of ``text``: all of them, or ``nsamples`` evenly spaced.

    The text is tokenized once without special tokens (as calibration text is); with ``bos``
    each window is BOS + ``seqlen - 1`` text tokens (``nsvd_lm.windows``). Returns a LongTensor
    (windows × seqlen); an error if the text is shorter than one window.
    """
    if nsamples < 1 or seqlen < 2:
        raise ValueError(f"nsamples={nsamples} must be >= 1 and seqlen={seqlen} >= 2")
    ids = encode_plain(tokenizer, text)
    body = seqlen - 1 if bos else seqlen
    available = len(ids) // body
    if available < 1:
        raise ValueError(f"text has {len(ids)} tokens, fewer than one window of seqlen={seqlen}")
    count = min(nsamples, available)
    # Evenly spaced window indices so a capped run still sees the whole text, not its first pages.
    picks = sorted({int(i * available / count) for i in range(count)})
    ids_t = torch.tensor(ids[: available * body], dtype=torch.long).view(available, body)[picks]
    if bos:
        ids_t = torch.cat(
            [torch.full((ids_t.shape[0], 1), int(tokenizer.bos_token_id), dtype=torch.long), ids_t], dim=1
        )
    return ids_t


# ----------------------------------------------------------------------------- the report


@dataclass
class DatasetSimilarity:
    name: str
    label: str
    source: str
    substitute: bool
    windows: int
    windows_available: int
    tokens: int
    inputs: list[InputSimilarity]
    # Bootstrap CIs over D's windows: "<statistic>:<mean|min>" and "gram_cosine:kind:<kind>" -> [low, high].
    intervals: dict[str, list[float]] = field(default_factory=dict)

    def values(self, statistic: str) -> list[float]:
        if statistic not in STATISTICS:
            raise ValueError(f"statistic={statistic!r}; allowed values: {', '.join(STATISTICS)}")
        return [getattr(row, statistic) for row in self.inputs]

    def summary(self, statistic: str) -> dict[str, float]:
        """mean, std (population, over inputs), min and max of one statistic."""
        values = self.values(statistic)
        return {
            "mean": statistics.fmean(values),
            "std": statistics.pstdev(values),
            "min": min(values),
            "max": max(values),
        }

    def by_kind(self, statistic: str) -> dict[str, float]:
        groups: dict[str, list[float]] = {}
        for row in self.inputs:
            groups.setdefault(row.kind, []).append(getattr(row, statistic))
        return {kind: statistics.fmean(values) for kind, values in groups.items()}


@dataclass
class SimilarityReport:
    model: str
    calibration: dict[str, Any]  # dataset, source, nsamples, seqlen, seed, tokens
    nsamples: int
    seqlen: int
    datasets: list[DatasetSimilarity]
    settings: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        for entry, data in zip(self.datasets, out["datasets"]):
            data["summary"] = {s: entry.summary(s) for s in STATISTICS}
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SimilarityReport:
        """The report back from :meth:`to_dict`'s output (``similarity.json``); summaries are recomputed."""
        datasets = [
            DatasetSimilarity(
                **{k: v for k, v in entry.items() if k not in ("inputs", "summary")},
                inputs=[InputSimilarity(**row) for row in entry["inputs"]],
            )
            for entry in data["datasets"]
        ]
        return cls(
            model=short_model_name(data["model"]),
            calibration=data["calibration"],
            nsamples=data["nsamples"],
            seqlen=data["seqlen"],
            datasets=datasets,
            settings=data.get("settings", {}),
        )


def _summarize_parts(parts: list[WindowParts], n_windows: int) -> tuple[list[InputSimilarity], dict[str, list[float]]]:
    """The per-input cosines on all windows, and bootstrap CIs (over windows) of the per-set summaries."""
    everything = np.ones((1, n_windows))
    counts = bootstrap_counts(n_windows)
    inputs, gram_reps, abs_reps = [], [], []
    for part in parts:
        gram, mean_abs = part.cosines(everything)
        inputs.append(InputSimilarity(part.key, part.block, part.kind, float(gram[0]), float(mean_abs[0])))
        gram_r, abs_r = part.cosines(counts)
        gram_reps.append(gram_r)
        abs_reps.append(abs_r)
    gram_all, abs_all = np.stack(gram_reps), np.stack(abs_reps)  # (inputs, resamples)
    gram_hat = np.array([i.gram_cosine for i in inputs])
    abs_hat = np.array([i.mean_abs_cosine for i in inputs])
    intervals = {
        "gram_cosine:mean": basic_interval(float(gram_hat.mean()), gram_all.mean(0)),
        "gram_cosine:min": basic_interval(float(gram_hat.min()), gram_all.min(0)),
        "mean_abs_cosine:mean": basic_interval(float(abs_hat.mean()), abs_all.mean(0)),
    }
    for kind in dict.fromkeys(p.kind for p in parts):
        rows = [i for i, p in enumerate(parts) if p.kind == kind]
        intervals[f"gram_cosine:kind:{kind}"] = basic_interval(float(gram_hat[rows].mean()), gram_all[rows].mean(0))
    return inputs, intervals


def activation_similarity(
    model: nn.Module,
    tokenizer: Any,
    datasets: Sequence[str],
    calib: str = "wikitext2",
    nsamples: int = 64,
    seqlen: int = 512,
    calib_nsamples: int | None = None,
    calib_seqlen: int | None = None,
    seed: int = 3,
    cache_dir: str | os.PathLike | None = None,
    data_dir: str | os.PathLike | None = None,
    batch_size: int = 1,
    progress: bool = True,
    model_name: str | None = None,
    bos: str = "auto",
) -> SimilarityReport:
    """Similarity of each of ``datasets``' activations to the calibration set ``calib``'s (see module doc)."""
    from nsvd_lm.experiments.evaldata import DATASET_NAMES, get_spec, load_eval_text

    names = list(dict.fromkeys(datasets))
    if not names:
        raise ValueError(f"datasets is empty; allowed: {', '.join(DATASET_NAMES)}")
    for name in names:
        get_spec(name)  # unknown names fail here, before any forward pass
    if nsamples < 1 or seqlen < 2:
        raise ValueError(f"nsamples={nsamples} must be >= 1 and seqlen={seqlen} >= 2")
    with_bos = bos_per_window(tokenizer, bos)
    targets = select_targets(model)
    calibration = CalibrationConfig(
        calib_dataset=calib,
        calib_nsamples=calib_nsamples or nsamples,
        calib_seqlen=calib_seqlen or seqlen,
        seed=seed,
        calib_bos=bos,
        calib_batch_size=batch_size,
        cache_dir=str(cache_dir) if cache_dir is not None else None,
    )
    reference = calibrate(model, tokenizer, calibration, targets, progress=progress)

    results = []
    for name in tqdm(names, desc="similarity: datasets", disable=not progress):
        text = load_eval_text(name, data_dir=data_dir)
        windows = evaluation_windows(tokenizer, text.text, nsamples, seqlen, bos=with_bos)
        n_tokens = len(encode_plain(tokenizer, text.text))
        parts = window_parts(model, windows, reference, targets, progress=progress)
        inputs, intervals = _summarize_parts(parts, int(windows.shape[0]))
        results.append(
            DatasetSimilarity(
                name=name,
                label=text.label,
                source=text.source,
                substitute=text.substitute,
                windows=int(windows.shape[0]),
                windows_available=n_tokens // (seqlen - 1 if with_bos else seqlen),
                tokens=int(windows.numel()),
                inputs=inputs,
                intervals=intervals,
            )
        )
    described = {
        **calibration.describe(),
        "bos_per_window": with_bos,
        "source": reference.meta.get("calibration", {}).get("source"),
        "tokens": reference.token_count,
    }
    return SimilarityReport(
        model=short_model_name(model_name or getattr(model, "name_or_path", "") or type(model).__name__),
        calibration=described,
        nsamples=nsamples,
        seqlen=seqlen,
        datasets=results,
    )


# ----------------------------------------------------------------------------- output


def to_markdown(report: SimilarityReport, command: str | None = None) -> str:
    calib = report.calibration
    lines = [
        f"# Activation similarity to the calibration set — {report.model}",
        "",
        f"Calibration set C: {calib['nsamples']} × {calib['seqlen']} tokens of `{calib['dataset']}`"
        + (f" (`{portable_text(calib['source'])}`)" if calib.get("source") else "")
        + f", seed {calib['seed']}. Each set D: up to {report.nsamples} disjoint windows of {report.seqlen} tokens, "
        "evenly spaced over its evaluation text.",
        "Per distinct input of the compressed linears (q/k/v share one, gate/up share one): "
        "`gram` = ⟨G_C, G_D⟩_F / (‖G_C‖_F‖G_D‖_F) with G = Σ x xᵀ; `|x|` = cosine of the mean-|x| vectors. "
        "mean ± std (population) and min over all inputs of the uncompressed model.",
    ]
    if command:
        lines += ["", f"Command: `{command}`"]
    lines += [
        "",
        "| Dataset | windows (of all) | tokens | gram cos. mean [95% CI] | std over inputs | gram cos. min [95% CI] "
        "| mean-abs cos. mean [95% CI] |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for entry in report.datasets:
        g, a = entry.summary("gram_cosine"), entry.summary("mean_abs_cosine")
        label = entry.name + (" (substitute)" if entry.substitute else "")
        lines.append(
            f"| {label} | {entry.windows} ({entry.windows_available}) | {entry.tokens:,} | "
            f"{g['mean']:.4f} {_ci(entry, 'gram_cosine:mean')} | {g['std']:.4f} | "
            f"{g['min']:.4f} {_ci(entry, 'gram_cosine:min')} | {a['mean']:.4f} {_ci(entry, 'mean_abs_cosine:mean')} |"
        )
    kinds = list(dict.fromkeys(k for entry in report.datasets for k in entry.by_kind("gram_cosine")))
    if kinds:
        lines += [
            "",
            "Gram cosine, mean per kind of input:",
            "",
            "| Dataset | " + " | ".join(kinds) + " |",
            "|---|" + "---:|" * len(kinds),
        ]
        for entry in report.datasets:
            per_kind = entry.by_kind("gram_cosine")
            lines.append(
                f"| {entry.name} | "
                + " | ".join(f"{per_kind.get(k, math.nan):.4f} {_ci(entry, 'gram_cosine:kind:' + k)}" for k in kinds)
                + " |"
            )
    substitutes = [e for e in report.datasets if e.substitute]
    for entry in substitutes:
        lines += ["", f"- `{entry.name}` is a substitute: {entry.label} ({portable_text(entry.source)})."]
    return "\n".join(lines) + "\n"


def _ci(entry: DatasetSimilarity, name: str) -> str:
    interval = entry.intervals.get(name)
    return f"[{interval[0]:.4f}, {interval[1]:.4f}]" if interval else "(no CI)"


def summary_csv(report: SimilarityReport) -> str:
    out = io.StringIO()
    writer = csv.writer(out)
    writer.writerow(
        [
            "dataset",
            "label",
            "substitute",
            "windows",
            "windows_available",
            "tokens",
            *(f"{s}_{k}" for s in STATISTICS for k in ("mean", "std", "min", "max")),
            *(f"{name.replace(':', '_')}_ci_{end}" for name in CI_COLUMNS for end in ("low", "high")),
        ]
    )
    for entry in report.datasets:
        writer.writerow(
            [
                entry.name,
                entry.label,
                entry.substitute,
                entry.windows,
                entry.windows_available,
                entry.tokens,
                *(f"{entry.summary(s)[k]:.6f}" for s in STATISTICS for k in ("mean", "std", "min", "max")),
                *(
                    f"{entry.intervals[name][i]:.6f}" if name in entry.intervals else ""
                    for name in CI_COLUMNS
                    for i in (0, 1)
                ),
            ]
        )
    return out.getvalue()


def layers_csv(report: SimilarityReport) -> str:
    out = io.StringIO()
    writer = csv.writer(out)
    writer.writerow(["dataset", "input", "block", "kind", *STATISTICS])
    for entry in report.datasets:
        for row in entry.inputs:
            writer.writerow([entry.name, row.key, row.block, row.kind, *(f"{getattr(row, s):.6f}" for s in STATISTICS)])
    return out.getvalue()


def plot_histograms(report: SimilarityReport, path: str | os.PathLike, statistic: str = "gram_cosine") -> Path:
    """One histogram per dataset of the per-input cosine (shared x axis), mean ± std in the title."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(report.datasets)
    cols = min(4, n)
    rows = math.ceil(n / cols)
    low = min(min(e.values(statistic)) for e in report.datasets)
    low = max(0.0, math.floor(low * 20) / 20)  # round down to 0.05
    bins = [low + (1.0 - low) * i / 40 for i in range(41)]
    fig, axes = plt.subplots(rows, cols, figsize=(3.6 * cols, 2.8 * rows), squeeze=False, sharex=True)
    for ax, entry in zip(axes.flat, report.datasets):
        s = entry.summary(statistic)
        ax.hist(entry.values(statistic), bins=bins, color="tab:blue", alpha=0.8)
        ax.axvline(s["mean"], color="black", linestyle="--", linewidth=1)
        ax.set_title(
            f"{entry.name}{' (subst.)' if entry.substitute else ''}\n{s['mean']:.3f} ± {s['std']:.3f}", fontsize=9
        )
        ax.set_xlabel(statistic.replace("_", " "))
        ax.set_ylabel("layer inputs")
    for ax in list(axes.flat)[n:]:
        ax.axis("off")
    fig.suptitle(f"{report.model}: similarity to calibration set {report.calibration['dataset']}", fontsize=10)
    fig.tight_layout()
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out


def write_report(
    report: SimilarityReport, out_dir: str | os.PathLike, command: str | None = None, prefix: str = "similarity"
) -> dict[str, Path]:
    """``similarity.md``, ``.csv`` (per dataset), ``_layers.csv`` (per input), ``.json`` and ``.png`` in ``out_dir``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {
        "markdown": out / f"{prefix}.md",
        "csv": out / f"{prefix}.csv",
        "layers_csv": out / f"{prefix}_layers.csv",
        "json": out / f"{prefix}.json",
        "png": out / f"{prefix}.png",
    }
    write_text_atomic(paths["markdown"], to_markdown(report, command))
    write_text_atomic(paths["csv"], summary_csv(report))
    write_text_atomic(paths["layers_csv"], layers_csv(report))
    write_text_atomic(paths["json"], json.dumps(portable({**report.to_dict(), "command": command}), indent=1) + "\n")
    plot_histograms(report, paths["png"])
    return paths

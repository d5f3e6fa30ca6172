"""Calibration text (knows nothing of lm-eval or of the compression; the token windows: ``windows.py``)."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

from nsvd_lm.datadir import DATA_DIR_ENV, resolve_data_dir, wikitext_rows

logger = logging.getLogger(__name__)

LOCAL_SUFFIXES = (".txt", ".raw", ".json", ".jsonl", ".parquet")


@dataclass
class CalibrationText:
    text: str
    source: str  # where it came from, for logs and result files


def _read_local_file(path: Path) -> list[str]:
    suffix = path.suffix.lower()
    if suffix in (".txt", ".raw"):
        return [path.read_text(encoding="utf-8")]
    if suffix == ".jsonl":
        return [json.loads(line)["text"] for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if suffix == ".json":
        data = json.loads(path.read_text(encoding="utf-8"))
        if isinstance(data, dict) and "text" in data:
            data = data["text"] if isinstance(data["text"], list) else [data["text"]]
        return [d["text"] if isinstance(d, dict) else str(d) for d in data]
    if suffix == ".parquet":
        import pyarrow.parquet as pq

        table = pq.read_table(path, columns=["text"])
        return [str(t) for t in table.column("text").to_pylist()]
    raise ValueError(f"calib_dataset file {path} has suffix {suffix!r}; allowed: {', '.join(LOCAL_SUFFIXES)}")


def check_calibration_source(dataset: str) -> None:
    """A ``calib_dataset`` that names a local path which does not exist: FileNotFoundError, before any work."""
    name = str(dataset).strip()
    looks_local = name.startswith((".", "/", "~")) or name.lower().endswith(LOCAL_SUFFIXES)
    if looks_local and not Path(name).expanduser().exists():
        raise FileNotFoundError(f"calib_dataset={name!r}: no such file or folder")


def load_calibration_text(dataset: str) -> CalibrationText:
    """Resolve ``calib_dataset`` to text.

    * ``wikitext2``: ``$NSVD_LM_DATA_DIR/wikitext2/wiki.train.raw`` if present, else
      ``wiki.valid.raw`` there (the offline stand-in: same genre, disjoint from the test split),
      else the Hub's ``Salesforce/wikitext`` (``wikitext-2-raw-v1``, train) rows.
    * ``c4``: ``$NSVD_LM_DATA_DIR/c4/c4_train_head.jsonl`` else the Hub's ``allenai/c4`` train shard 0.
    * a local file (.txt/.raw/.json/.jsonl/.parquet, field ``text``) or folder of such files.
    * any other string: a Hub dataset id, ``id`` or ``id:config``, train split, column ``text``.
    Documents are joined with ``"\\n\\n"``.
    """
    name = str(dataset).strip()
    data_dir = resolve_data_dir()
    if name.lower() == "wikitext2":
        if data_dir is not None:
            for fname in ("wiki.train.raw", "wiki.valid.raw"):
                path = data_dir / "wikitext2" / fname
                if path.exists():
                    if fname != "wiki.train.raw":
                        logger.warning("WikiText-2 train split not in %s; calibrating on %s instead", data_dir, path)
                    # Rows joined with "\n\n", as SVD-LLM forms its calibration text.
                    return CalibrationText("\n\n".join(wikitext_rows(path.read_text(encoding="utf-8"))), str(path))
            raise FileNotFoundError(
                f"{DATA_DIR_ENV}={data_dir} has no wikitext2/wiki.train.raw or wikitext2/wiki.valid.raw"
            )
        return _from_hub("Salesforce/wikitext", "wikitext-2-raw-v1", "train")
    if name.lower() == "c4":
        if data_dir is not None:
            path = data_dir / "c4" / "c4_train_head.jsonl"
            if not path.exists():
                raise FileNotFoundError(f"{DATA_DIR_ENV}={data_dir} has no c4/c4_train_head.jsonl")
            return CalibrationText("\n\n".join(_read_local_file(path)), str(path))
        return _from_hub("allenai/c4", None, "train", data_files={"train": "en/c4-train.00000-of-01024.json.gz"})
    path = Path(name).expanduser()
    if path.exists():
        files = sorted(p for p in path.rglob("*") if p.suffix.lower() in LOCAL_SUFFIXES) if path.is_dir() else [path]
        if not files:
            raise ValueError(f"calib_dataset folder {path} has no {', '.join(LOCAL_SUFFIXES)} files")
        texts = [t for f in files for t in _read_local_file(f)]
        return CalibrationText("\n\n".join(texts), str(path))
    check_calibration_source(name)
    hub_id, _, config = name.partition(":")
    return _from_hub(hub_id, config or None, "train")


def _from_hub(hub_id: str, config: str | None, split: str, data_files: dict | None = None) -> CalibrationText:
    import datasets

    try:
        ds = datasets.load_dataset(hub_id, config, split=split, data_files=data_files)
    except Exception as exc:  # offline, unknown id, script-based dataset...
        raise ValueError(
            f"calib_dataset: could not load {hub_id!r} ({config or 'default'}, {split}) from the Hub: {exc}. "
            f"Offline, set {DATA_DIR_ENV} to a data folder or pass a local file."
        ) from exc
    if "text" not in ds.column_names:
        raise ValueError(f"calib_dataset {hub_id!r} has no 'text' column (columns: {', '.join(ds.column_names)})")
    return CalibrationText("\n\n".join(ds["text"]), f"hf://{hub_id}" + (f":{config}" if config else "") + f"/{split}")

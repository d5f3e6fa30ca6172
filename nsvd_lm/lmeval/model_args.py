"""Every ``model_args`` key of ``lm_eval --model nsvd`` and the ``nsvd_*`` tasks: the one list.

lm-eval 0.4.13 merges ``--model_args`` into every task's metadata, so each key reaches both the
model (``nsvd_lm/lmeval/adapter.py``) and the tasks (``tasks/utils.py``); each must accept what the
other takes and still reject a misspelt key. Both read the list from here, and the tables in
docs/lm_eval.md and docs/tasks.md are generated from it (``markdown_table``; a test checks them).
By origin:

* the compression and calibration fields: ``nsvd_lm.config.config_fields()``, declared with their
  defaults and help beside the two config dataclasses;
* ``AdapterOptions``: the adapter's own switches;
* ``TaskOptions``: what the tasks read (``pretrained`` and ``max_length`` are HFLM arguments as well);
* HFLM's own arguments (read off its signature) and ``FROM_PRETRAINED_KWARGS``, the
  ``from_pretrained`` keywords HFLM forwards.

Fields are declared the way the config fields are (``nsvd_lm.fields.described``).
"""

from __future__ import annotations

import dataclasses
import inspect
from dataclasses import dataclass, field
from typing import Any

from nsvd_lm.config import config_fields
from nsvd_lm.context import DEFAULT_CONTEXT_LENGTH
from nsvd_lm.fields import described

# Keyword arguments HFLM forwards to ``from_pretrained`` that ``--model nsvd`` accepts without complaint.
FROM_PRETRAINED_KWARGS: frozenset[str] = frozenset(
    {
        "attn_implementation",
        "device_map",
        "low_cpu_mem_usage",
        "load_in_8bit",
        "load_in_4bit",
        "bnb_4bit_quant_type",
        "bnb_4bit_compute_dtype",
        "bnb_4bit_use_double_quant",
        "llm_int8_threshold",
        "use_safetensors",
        "variant",
        "token",
        "local_files_only",
        "offload_state_dict",
        "torch_dtype",
        "rope_scaling",
        "use_flash_attention_2",
    }
)


@dataclass(frozen=True)
class AdapterOptions:
    """``--model nsvd``'s own switches (not compression settings)."""

    progress: bool = field(default=True, metadata=described("tqdm bars for calibration and decompositions"))
    strict_model_args: bool = field(
        default=True,
        metadata=described("an unknown arg is an error listing the known ones; `false` passes it to `from_pretrained`"),
    )
    svd_cache: dict | None = field(
        default=None,
        metadata=described(
            "Python only: a dict in which models built one after another share their first-step SVDs "
            "(`nsvd-lm sweep --reuse-svd`; see `compress_model`)"
        ),
    )


@dataclass(frozen=True)
class TaskOptions:
    """What the ``nsvd_*`` tasks read from their metadata (``--model_args`` merged with ``--metadata``)."""

    data_dir: str | None = field(
        default=None, metadata=described("local data folder (default `$NSVD_LM_DATA_DIR`, else the Hub)")
    )
    max_windows: int | None = field(
        default=None, metadata=described("quick-mode cap on the windows of each set (default: all windows)")
    )
    max_length: int = field(
        default=DEFAULT_CONTEXT_LENGTH,  # lm-eval HFLM's default window
        metadata=described(
            "window length L in tokens; must not exceed the model's context (read from its config). "
            "The default is the tasks'; the model's (HFLM's) is its context"
        ),
    )
    split: str | None = field(
        default=None, metadata=described("another split of each set (default: the protocol's, see docs/tasks.md)")
    )
    tokenizer: str | None = field(
        default=None,
        metadata=described("where the windows' tokenizer is loaded from (wins over `pretrained`)"),
    )
    pretrained: str | None = field(
        default=None,
        metadata=described("the model, and the tokenizer when `tokenizer` is absent (default: the default model)"),
    )


def option_names(options: type) -> tuple[str, ...]:
    """The keys of ``AdapterOptions`` or ``TaskOptions``."""
    return tuple(f.name for f in dataclasses.fields(options))


def option_default(options: type, name: str) -> Any:
    """The default of key ``name`` of ``AdapterOptions`` / ``TaskOptions``."""
    return {f.name: f.default for f in dataclasses.fields(options)}[name]


def hflm_argument_names() -> frozenset[str]:
    """HFLM's own ``__init__`` arguments."""
    from lm_eval.models.huggingface import HFLM

    return frozenset(inspect.signature(HFLM.__init__).parameters) - {"self", "kwargs"}


def model_keys() -> frozenset[str]:
    """Every key ``--model nsvd`` itself reads."""
    return (
        hflm_argument_names()
        | FROM_PRETRAINED_KWARGS
        | {f.name for f in config_fields()}
        | set(option_names(AdapterOptions))
    )


def task_only_keys() -> frozenset[str]:
    """Keys only the tasks read (the model drops them)."""
    return frozenset(option_names(TaskOptions)) - model_keys()


def known_model_args() -> list[str]:
    """Every ``model_args`` key ``--model nsvd`` accepts: its own and the tasks'."""
    return sorted(model_keys() | set(option_names(TaskOptions)))


def markdown_table(options: type) -> str:
    """The table of ``AdapterOptions`` or ``TaskOptions`` in the docs (a test checks the docs hold exactly this)."""
    model = model_keys()
    lines = ["| model_arg | default | read by | meaning |", "|---|---|---|---|"]
    for f in dataclasses.fields(options):
        shown = str(f.default).lower() if isinstance(f.default, bool) else f.default  # as typed in model_args
        default = "—" if f.default is None else f"`{shown}`"
        readers = ["tasks"] if options is TaskOptions else []
        readers += ["model"] if f.name in model else []
        help_text = f.metadata["help"].replace("|", "\\|")
        lines.append(f"| `{f.name}` | {default} | {' + '.join(readers)} | {help_text} |")
    return "\n".join(lines)

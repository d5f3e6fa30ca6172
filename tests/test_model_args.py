"""One list of model_args (nsvd_lm/lmeval/model_args.py), read by the adapter, the tasks and the docs."""

from __future__ import annotations

import inspect
import logging
from pathlib import Path

import pytest

from nsvd_lm.lmeval.model_args import (
    AdapterOptions,
    TaskOptions,
    known_model_args,
    markdown_table,
    option_default,
    option_names,
    task_only_keys,
)

REPO = Path(__file__).resolve().parents[1]


def _block(doc: str, marker: str) -> str:
    text = (REPO / "docs" / doc).read_text(encoding="utf-8")
    return text.split(f"<!-- {marker}:start -->\n", 1)[1].split(f"\n<!-- {marker}:end -->", 1)[0]


@pytest.mark.parametrize(
    ("doc", "marker", "options"),
    [
        ("lm_eval.md", "adapter-options-table", AdapterOptions),
        ("lm_eval.md", "task-options-table", TaskOptions),
        ("tasks.md", "task-options-table", TaskOptions),
    ],
)
def test_docs_tables_are_the_generated_ones(doc, marker, options):
    assert _block(doc, marker) == markdown_table(options)


def test_tasks_accept_every_model_arg_without_a_warning(caplog):
    """The tasks see every model_arg (lm-eval merges them into metadata): none is "unknown" to them."""
    from nsvd_lm.tasks import utils as task_utils

    assert task_utils.TASK_KEYS == option_names(TaskOptions)
    assert task_utils.DEFAULT_MAX_LENGTH == option_default(TaskOptions, "max_length")
    with caplog.at_level(logging.WARNING, logger="nsvd_lm.tasks"):
        task_utils.check_metadata_keys({key: None for key in known_model_args()})
    assert not caplog.records, [r.getMessage() for r in caplog.records]
    # Keys that the old hand-kept list of the tasks lacked: the adapter's svd_cache, from_pretrained keywords.
    assert {"svd_cache", "attn_implementation", "calib_bos", "rank_allocation"} <= set(known_model_args())
    with pytest.raises(ValueError, match="did you mean 'max_windows'"):
        task_utils.check_metadata_keys({"max_window": 2})


def test_adapter_takes_every_key_and_drops_the_task_only_ones():
    from nsvd_lm.lmeval.adapter import NSVDLM

    params = inspect.signature(NSVDLM.__init__).parameters
    for name in option_names(AdapterOptions):
        assert params[name].default == option_default(AdapterOptions, name)
    assert task_only_keys() == {"data_dir", "max_windows", "split"}
    task_args = {key: "x" for key in task_only_keys()}
    # Task keys pass, the misspelt one is named, before anything is loaded.
    with pytest.raises(ValueError, match=r"unknown model_args for --model nsvd: bogus_arg\. Known: .*data_dir") as info:
        NSVDLM(pretrained="/nonexistent/model", ratio=0.4, bogus_arg=1, **task_args)
    assert "max_windows," not in str(info.value).split("Known:")[0]

"""One fact, one place: the method table and the config fields, and everything generated from them."""

from __future__ import annotations

import dataclasses
import inspect
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_docs_model_args_table_is_the_generated_one():
    from nsvd_lm.config import markdown_table

    text = (REPO / "docs" / "lm_eval.md").read_text(encoding="utf-8")
    block = text.split("<!-- config-table:start -->\n", 1)[1].split("\n<!-- config-table:end -->", 1)[0]
    assert block == markdown_table()


def test_adapter_signature_and_cli_flags_come_from_the_fields():
    from nsvd_lm.cli import build_parser
    from nsvd_lm.config import config_fields
    from nsvd_lm.lmeval.adapter import NSVDLM

    names = [f.name for f in config_fields()]
    assert set(names) <= set(inspect.signature(NSVDLM.__init__).parameters)
    compress = build_parser()._subparsers._group_actions[0].choices["compress"]
    flags = {a.dest: a for a in compress._actions}
    for f in config_fields():
        assert f.name in flags and f.metadata["help"] in flags[f.name].help
        assert f"--{f.name.replace('_', '-')}" in flags[f.name].option_strings


def test_method_names_are_spelled_out_only_in_the_method_table():
    """No code outside decompose.py (the method table) lists methods by name (config.py names its one default)."""
    import ast

    from nsvd_lm.decompose import METHOD_TABLE

    offenders = []
    for path in (REPO / "nsvd_lm").rglob("*.py"):
        if path.name == "decompose.py":
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Constant) and node.value in METHOD_TABLE and node.value != "svd":
                offenders.append(f"{path.relative_to(REPO)}:{node.lineno}: {node.value!r}")
    assert offenders == [
        "nsvd_lm/config.py:%d: 'nsvd-i'" % _line_of(REPO / "nsvd_lm" / "config.py", 'default="nsvd-i"')
    ]


def _line_of(path: Path, needle: str) -> int:
    return next(i for i, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1) if needle in line)


def test_flat_keywords_split_into_the_two_configs():
    from nsvd_lm.config import CalibrationConfig, CompressionConfig, parse_configs

    config, calibration = parse_configs(method="SVD-LLM", ratio="0.3", calib_nsamples="8", seed=5)
    assert config == CompressionConfig(method="asvd-i", ratio=0.3)
    assert calibration == CalibrationConfig(calib_nsamples=8, seed=5)
    assert {f.name for f in dataclasses.fields(CompressionConfig)}.isdisjoint(
        f.name for f in dataclasses.fields(CalibrationConfig)
    )


def test_record_and_knobs_read_the_config_fields():
    """The record takes every setting from CompressionConfig, the factorizer every knob from MethodKnobs."""
    import dataclasses

    from nsvd_lm.compress import CompressionRecord
    from nsvd_lm.config import CompressionConfig
    from nsvd_lm.decompose import METHOD_TABLE, MethodKnobs

    config_names = {f.name for f in dataclasses.fields(CompressionConfig)}
    record_names = {f.name for f in dataclasses.fields(CompressionRecord)}
    # compute_device says where the work ran, not what it produced: the one setting not recorded.
    assert config_names - record_names == {"compute_device"}
    knob_names = {f.name for f in dataclasses.fields(MethodKnobs)}
    assert set().union(*(m.knobs for m in METHOD_TABLE.values())) == knob_names <= config_names
    config = CompressionConfig(method="asvd-0", ratio=0.3, asvd_alpha=0.25, include="*q_proj")
    assert config.knobs == MethodKnobs(k1_frac=0.95, asvd_alpha=0.25, asvd3_beta=0.5)
    record = CompressionRecord.from_config(config, params_before=10, params_after=7)
    assert (record.method, record.ratio, record.asvd_alpha, record.include) == ("asvd-0", 0.3, 0.25, ["*q_proj"])
    assert record.params_after == 7 and record.sequential is False

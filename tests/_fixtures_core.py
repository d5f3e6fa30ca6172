"""Tiny random causal LMs of each supported architecture, built from configs (never downloaded)."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch

_WORDS = (
    "a compressed model keeps the directions that the calibration activations use most while the "
    "residual step spends a few ranks on the weight itself so that text from other domains still "
    "sees the parts of the matrix that calibration never excited rivers mountains cities music"
).split()


def tiny_config(arch: str, vocab_size: int):
    """A 2-block model of ``arch`` in {llama, mistral, qwen2, opt, gpt2}; llama/mistral/qwen2 use GQA."""
    from transformers import GPT2Config, LlamaConfig, MistralConfig, OPTConfig, Qwen2Config

    common = dict(vocab_size=vocab_size, max_position_embeddings=128)
    if arch == "llama":
        return LlamaConfig(hidden_size=64, intermediate_size=112, num_hidden_layers=2, num_attention_heads=4,
                           num_key_value_heads=2, tie_word_embeddings=True, **common)
    if arch == "mistral":
        return MistralConfig(hidden_size=64, intermediate_size=112, num_hidden_layers=2, num_attention_heads=4,
                             num_key_value_heads=2, sliding_window=32, **common)
    if arch == "qwen2":
        return Qwen2Config(hidden_size=64, intermediate_size=112, num_hidden_layers=2, num_attention_heads=4,
                           num_key_value_heads=2, **common)
    if arch == "opt":
        return OPTConfig(hidden_size=64, ffn_dim=112, num_hidden_layers=2, num_attention_heads=4,
                         word_embed_proj_dim=64, **common)
    if arch == "gpt2":
        return GPT2Config(n_embd=64, n_layer=2, n_head=4, n_positions=128, vocab_size=vocab_size)
    raise ValueError(arch)


ARCHS = ("llama", "mistral", "qwen2", "opt", "gpt2")


def tiny_model(arch: str, vocab_size: int, seed: int = 0):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(arch, vocab_size), dtype=torch.float32)
    return model.eval()


@pytest.fixture(scope="session")
def tokenizer():
    from transformers import AutoTokenizer

    from nsvd_lm.smollm2 import smollm2_path

    return AutoTokenizer.from_pretrained(smollm2_path())


@pytest.fixture(scope="session")
def calib_file(tmp_path_factory) -> Path:
    """A small local calibration text (the .txt path form of calib_dataset)."""
    rng = random.Random(0)
    path = tmp_path_factory.mktemp("calib") / "calib.txt"
    path.write_text("\n\n".join(" ".join(rng.choice(_WORDS) for _ in range(60)) for _ in range(40)))
    return path

"""Tiny random causal LMs of each supported architecture, built from configs (never downloaded)."""

from __future__ import annotations

import functools
import random
from pathlib import Path
from typing import Any

import torch

_WORDS = (
    "a compressed model keeps the directions that the calibration activations use most while the "
    "residual step spends a few ranks on the weight itself so that text from other domains still "
    "sees the parts of the matrix that calibration never excited rivers mountains cities music"
).split()


@functools.lru_cache(maxsize=1)
def smollm2_tokenizer():
    """SmolLM2's tokenizer (the offline copy, ``nsvd_lm.smollm2``): a real vocabulary for the tiny models."""
    from transformers import AutoTokenizer

    from nsvd_lm.smollm2 import smollm2_path

    return AutoTokenizer.from_pretrained(smollm2_path())


def tiny_config(arch: str, vocab_size: int, **overrides: Any):
    """A 2-block model of ``arch`` in {llama, mistral, qwen2, opt, gpt2}; llama/mistral/qwen2 use GQA.

    ``overrides``: config fields over these defaults (the ONNX tests' sizes, token ids, ...).
    """
    from transformers import GPT2Config, LlamaConfig, MistralConfig, OPTConfig, Qwen2Config

    common = dict(vocab_size=vocab_size, max_position_embeddings=128)
    gqa = dict(hidden_size=64, intermediate_size=112, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
    if arch == "llama":
        cls, kwargs = LlamaConfig, dict(gqa, tie_word_embeddings=True, **common)
    elif arch == "mistral":
        cls, kwargs = MistralConfig, dict(gqa, sliding_window=32, **common)
    elif arch == "qwen2":
        cls, kwargs = Qwen2Config, dict(gqa, **common)
    elif arch == "opt":
        kwargs = dict(hidden_size=64, ffn_dim=112, num_hidden_layers=2, num_attention_heads=4, word_embed_proj_dim=64)
        cls, kwargs = OPTConfig, dict(kwargs, **common)
    elif arch == "gpt2":
        cls, kwargs = GPT2Config, dict(n_embd=64, n_layer=2, n_head=4, n_positions=128, vocab_size=vocab_size)
    else:
        raise ValueError(arch)
    return cls(**{**kwargs, **overrides})


ARCHS = ("llama", "mistral", "qwen2", "opt", "gpt2")


def tiny_model(arch: str, vocab_size: int, seed: int = 0, weight_scale: float | None = None, **overrides: Any):
    """A random ``tiny_config`` model in eval mode; ``weight_scale`` multiplies every 2-D weight."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(arch, vocab_size, **overrides), dtype=torch.float32)
    model = model.eval()
    if weight_scale is not None:
        with torch.no_grad():
            for p in model.parameters():
                if p.dim() == 2:
                    p.mul_(weight_scale)
    return model


def build_tiny_model(
    out_dir: Path, seed: int = 0, *, max_positions: int = 256, tie_word_embeddings: bool = True
) -> Path:
    """A 2-layer random Llama (GQA) with SmolLM2's tokenizer, saved to ``out_dir`` (a model folder)."""
    from transformers import LlamaForCausalLM

    tokenizer = smollm2_tokenizer()
    config = tiny_config(
        "llama",
        len(tokenizer),
        intermediate_size=128,
        max_position_embeddings=max_positions,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        tie_word_embeddings=tie_word_embeddings,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).eval()
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return out_dir


_TOKENIZER_WORDS = (
    "the river carries sediment from distant mountains toward a quiet delta where farmers plant rice and "
    "children watch herons while old boats drift past stone bridges under a pale morning sky"
).split()


def _tokenizer_corpus() -> list[str]:
    rng = random.Random(0)
    docs = [
        "\n\n".join(" ".join(rng.choice(_TOKENIZER_WORDS) for _ in range(30)) for _ in range(3)) for _ in range(100)
    ]
    return docs + [
        "基于游戏开发与发行中国大陆运营 時間管理能力を向上させる 0123456789 , . ; : ! ? = @ - ( ) \" ' < > \n"
    ]


def build_fixture_tokenizer(kind: str):
    """A tiny fast tokenizer trained in code: ``bpe`` (byte-level BPE, no BOS, like GPT-2/SmolLM2) or
    ``spm`` (SentencePiece-style Unigram with a Metaspace ▁ prefix that adds BOS by default, like Llama)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    if kind == "bpe":
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=400, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
        )
        tok.train_from_iterator(_tokenizer_corpus(), trainer)
        return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>")
    if kind == "spm":
        tok = Tokenizer(models.Unigram())
        tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
        tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="first")
        trainer = trainers.UnigramTrainer(vocab_size=400, special_tokens=["<unk>", "<s>", "</s>"], unk_token="<unk>")
        tok.train_from_iterator(_tokenizer_corpus(), trainer)
        tok.post_processor = processors.TemplateProcessing(
            single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", tok.token_to_id("<s>"))]
        )
        return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    raise ValueError(kind)

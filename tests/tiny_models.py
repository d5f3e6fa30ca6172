"""Tiny random causal LMs of each supported architecture, built from configs (never downloaded)."""

from __future__ import annotations

import random

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
        return LlamaConfig(
            hidden_size=64,
            intermediate_size=112,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            tie_word_embeddings=True,
            **common,
        )
    if arch == "mistral":
        return MistralConfig(
            hidden_size=64,
            intermediate_size=112,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            sliding_window=32,
            **common,
        )
    if arch == "qwen2":
        return Qwen2Config(
            hidden_size=64,
            intermediate_size=112,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            **common,
        )
    if arch == "opt":
        return OPTConfig(
            hidden_size=64, ffn_dim=112, num_hidden_layers=2, num_attention_heads=4, word_embed_proj_dim=64, **common
        )
    if arch == "gpt2":
        return GPT2Config(n_embd=64, n_layer=2, n_head=4, n_positions=128, vocab_size=vocab_size)
    raise ValueError(arch)


ARCHS = ("llama", "mistral", "qwen2", "opt", "gpt2")


def tiny_model(arch: str, vocab_size: int, seed: int = 0):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(arch, vocab_size), dtype=torch.float32)
    return model.eval()


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

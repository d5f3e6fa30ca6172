"""Test-suite wide settings: offline, and the shared evaluation data beside the repository."""

import os
from pathlib import Path

# Tests never reach the Hugging Face Hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# One BLAS/OpenMP thread: several tests start subprocesses (lm_eval CLI, servers, two ranks), and
# MKL's spinning OpenMP threads on an oversubscribed 2-core machine run 20-30x slower.
os.environ.setdefault("OMP_NUM_THREADS", "1")

_SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"
if _SHARED.is_dir():
    os.environ.setdefault("NSVD_LM_DATA_DIR", str(_SHARED))


# ----------------------------------------------------------------------------- tokenizers of each kind

import random  # noqa: E402

import pytest  # noqa: E402

_TOKENIZER_WORDS = (
    "the river carries sediment from distant mountains toward a quiet delta where farmers plant rice and "
    "children watch herons while old boats drift past stone bridges under a pale morning sky"
).split()


def _tokenizer_corpus() -> list[str]:
    rng = random.Random(0)
    docs = ["\n\n".join(" ".join(rng.choice(_TOKENIZER_WORDS) for _ in range(30)) for _ in range(3)) for _ in range(100)]
    return docs + ["基于游戏开发与发行中国大陆运营 時間管理能力を向上させる 0123456789 , . ; : ! ? = @ - ( ) \" ' < > \n"]


def build_fixture_tokenizer(kind: str):
    """A tiny fast tokenizer trained in code: ``bpe`` (byte-level BPE, no BOS, like GPT-2/SmolLM2) or
    ``spm`` (SentencePiece-style Unigram with a Metaspace ▁ prefix that adds BOS by default, like Llama)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    if kind == "bpe":
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<|endoftext|>"],
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
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


@pytest.fixture(scope="session", params=["bpe", "spm"])
def tokenizer_kind_model(request, tmp_path_factory):
    """(kind, folder): a 2-block random Llama saved with a fixture tokenizer of each kind."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = build_fixture_tokenizer(request.param)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=112, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, tie_word_embeddings=True,
    )
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp(f"tok_{request.param}")
    LlamaForCausalLM(config).eval().save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return request.param, folder

"""Run an exported folder (see :mod:`nsvd_lm.export.onnx_export`) with ONNX Runtime.

``OnnxCausalLM`` opens ``model.onnx`` on CUDA when onnxruntime-gpu and a GPU are present (else CPU),
keeps the KV cache on that device between steps with IO binding (``OrtValue`` outputs fed back as
the next step's inputs, never copied to numpy), and generates for a batch of prompts with left
padding: greedy or temperature / top-p sampling, stopping on EOS, stop strings or
``max_new_tokens``, with an optional per-token streaming callback. It also scores token sequences
(log-probabilities, perplexity) for evaluation.
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from nsvd_lm.context import DEFAULT_CONTEXT_LENGTH, context_length
from nsvd_lm.export import io_names

from .sampling import check_sampling_args, choose_next_tokens
from .stops import contains_stop, cut_at_stop

logger = logging.getLogger(__name__)

PROVIDERS = ("auto", "cpu", "cuda")
_ORT_FLOAT = {"tensor(float)": np.float32, "tensor(float16)": np.float16}
_TORCH_TO_NUMPY = {"torch.float32": np.float32, "torch.float16": np.float16, "torch.int64": np.int64}

# (row, token_id, text_delta): called once per generated token, as soon as it is chosen.
TokenCallback = Callable[[int, int, str], None]


@dataclass
class Completion:
    prompt_tokens: list[int]
    tokens: list[int]  # generated ids (EOS included when it ended the row)
    text: str  # decoded generated text, cut before the first stop string
    finish_reason: str  # "stop" (EOS or stop string) or "length"


def _read_json(path: Path) -> dict:
    if not path.is_file():
        return {}
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def _as_id_list(value) -> list[int]:
    if value is None:
        return []
    if isinstance(value, (list, tuple)):
        return [int(v) for v in value]
    return [int(value)]


def _is_torch(value) -> bool:
    return type(value).__module__.startswith("torch")


class OnnxCausalLM:
    """An exported decoder with KV cache, ready to generate and to score."""

    def __init__(
        self,
        model_dir: str | os.PathLike,
        provider: str = "auto",
        intra_op_threads: int | None = None,
        tokenizer=None,
    ) -> None:
        if provider not in PROVIDERS:
            raise ValueError(f"provider must be one of {', '.join(PROVIDERS)}; got {provider!r}")
        self.model_dir = Path(model_dir)
        onnx_path = self.model_dir / io_names.ONNX_FILENAME
        if not onnx_path.is_file():
            raise FileNotFoundError(
                f"{self.model_dir} has no {io_names.ONNX_FILENAME}: not an exported folder (run `nsvd-lm export`)"
            )

        import onnxruntime as ort

        self._ort = ort
        options = ort.SessionOptions()
        if intra_op_threads:
            options.intra_op_num_threads = int(intra_op_threads)
        providers = self._providers(ort, provider)
        self.session = ort.InferenceSession(str(onnx_path), options, providers=providers)
        active = self.session.get_providers()
        if provider == "cuda" and active[0] != "CUDAExecutionProvider":
            raise ValueError(
                "provider='cuda': CUDAExecutionProvider failed to start (CUDA/cuDNN libraries?); "
                f"the session runs on {active}"
            )
        # Where presents live between steps: the KV cache never leaves the device.
        self.device = "cuda" if active[0] == "CUDAExecutionProvider" else "cpu"

        self._read_graph()
        self.last_run_s = 0.0
        config = _read_json(self.model_dir / "config.json")
        generation = _read_json(self.model_dir / "generation_config.json")
        self.context_length = context_length(config, default=DEFAULT_CONTEXT_LENGTH)
        self.eos_token_ids = set(_as_id_list(generation.get("eos_token_id", config.get("eos_token_id"))))
        pad = generation.get("pad_token_id", config.get("pad_token_id"))
        self.pad_token_id = (
            int(_as_id_list(pad)[0]) if pad is not None else (min(self.eos_token_ids) if self.eos_token_ids else 0)
        )

        if tokenizer is None:
            from transformers import AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(str(self.model_dir))
        self.tokenizer = tokenizer
        if not self.eos_token_ids and tokenizer.eos_token_id is not None:
            self.eos_token_ids = {int(tokenizer.eos_token_id)}

    # ---------------------------------------------------------------------------------------
    # Session set-up
    # ---------------------------------------------------------------------------------------

    @staticmethod
    def _providers(ort, provider: str) -> list:
        available = ort.get_available_providers()
        want_cuda = provider == "cuda" or (provider == "auto" and "CUDAExecutionProvider" in available)
        if provider == "cuda" and "CUDAExecutionProvider" not in available:
            raise ValueError(
                f"provider='cuda' needs onnxruntime-gpu with CUDAExecutionProvider; this onnxruntime has {available}"
            )
        if want_cuda:
            return [("CUDAExecutionProvider", {"device_id": 0}), "CPUExecutionProvider"]
        return ["CPUExecutionProvider"]

    def _read_graph(self) -> None:
        inputs = {i.name: i for i in self.session.get_inputs()}
        missing = [n for n in (io_names.INPUT_IDS, io_names.ATTENTION_MASK) if n not in inputs]
        if missing:
            raise ValueError(
                f"{self.model_dir}/{io_names.ONNX_FILENAME} lacks inputs {missing}: not an nsvd-lm decoder export"
            )
        self.has_position_ids = io_names.POSITION_IDS in inputs
        # Exports before this input existed compute logits at every position (still correct).
        # (An input with a default is listed with the overridable initializers, not the inputs.)
        overridable = {i.name for i in self.session.get_overridable_initializers()}
        self.has_logits_to_keep = io_names.LOGITS_TO_KEEP in overridable | set(inputs)
        self.num_layers = sum(1 for n in inputs if n.startswith("past_key_values.") and n.endswith(".key"))
        first = inputs[io_names.PAST_KEY_TEMPLATE % 0]
        self.num_kv_heads, self.head_dim = int(first.shape[1]), int(first.shape[3])
        self.float_dtype = _ORT_FLOAT[first.type]
        self.past_names = io_names.past_names(self.num_layers)
        self.present_names = io_names.present_names(self.num_layers)

    # ---------------------------------------------------------------------------------------
    # One forward step
    # ---------------------------------------------------------------------------------------

    def empty_past(self, batch: int) -> list:
        """Past tensors of length 0 on the session's device: the prefill step's cache."""
        shape = [batch, self.num_kv_heads, 0, self.head_dim]
        return [
            self._ort.OrtValue.ortvalue_from_shape_and_type(shape, self.float_dtype, self.device, 0)
            for _ in self.past_names
        ]

    def run(
        self,
        input_ids: np.ndarray,
        attention_mask: np.ndarray,
        position_ids: np.ndarray,
        past: Sequence | None = None,
        presents: Sequence | None = None,
        logits: Any = None,
        logits_to_keep: int = 0,
    ) -> tuple[Any, list]:
        """One decoder step with IO binding (the one place the graph's inputs and outputs are bound).

        ``past``: None (an empty cache: the prefill), device ``OrtValue`` s, or torch tensors on the
        session's device. ``presents`` / ``logits``: None (ONNX Runtime allocates them: presents on
        the device as ``OrtValue`` s, logits on the host as numpy), or preallocated contiguous torch
        tensors of the output shapes, which the graph writes into in place. ``logits_to_keep``:
        logits for the last N positions only, 0 = all; a graph without that input (an older
        export) returns all positions, so a caller reads the last ones as ``logits[:, -N:]``.
        Returns (logits, presents) in the same kinds."""
        batch, seq = input_ids.shape
        binding = self.session.io_binding()
        binding.bind_cpu_input(io_names.INPUT_IDS, np.ascontiguousarray(input_ids, dtype=np.int64))
        binding.bind_cpu_input(io_names.ATTENTION_MASK, np.ascontiguousarray(attention_mask, dtype=np.int64))
        if self.has_position_ids:
            binding.bind_cpu_input(io_names.POSITION_IDS, np.ascontiguousarray(position_ids, dtype=np.int64))
        if logits_to_keep and self.has_logits_to_keep:
            # An input with a default: bind_cpu_input does not find it, an OrtValue binds.
            keep = self._ort.OrtValue.ortvalue_from_numpy(np.asarray([logits_to_keep], dtype=np.int64))
            binding.bind_ortvalue_input(io_names.LOGITS_TO_KEEP, keep)
        for name, value in zip(self.past_names, past if past is not None else self.empty_past(batch)):
            self._bind(binding, name, value, output=False)
        if logits is None:
            binding.bind_output(io_names.LOGITS, "cpu")  # sampling happens on the host
        else:
            self._bind(binding, io_names.LOGITS, logits, output=True)
        for i, name in enumerate(self.present_names):
            if presents is None:
                binding.bind_output(name, self.device, 0)
            else:
                self._bind(binding, name, presents[i], output=True)
        torch_in_use = presents is not None or logits is not None or (past is not None and _is_torch(past[0]))
        if self.device == "cuda" and torch_in_use:
            import torch

            torch.cuda.synchronize()  # torch wrote the past on its own stream; ORT reads it on its own
        started = time.perf_counter()
        self.session.run_with_iobinding(binding)
        if self.device == "cuda":
            binding.synchronize_outputs()
        self.last_run_s = time.perf_counter() - started  # the graph alone, for profiles
        if presents is not None and logits is not None:
            return logits, list(presents)
        outputs = binding.get_outputs()
        out_logits = outputs[0].numpy() if logits is None else logits
        return out_logits, (list(outputs[1:]) if presents is None else list(presents))

    def _bind(self, binding, name: str, value, output: bool) -> None:
        if isinstance(value, self._ort.OrtValue):
            if output:
                binding.bind_ortvalue_output(name, value)
            else:
                binding.bind_ortvalue_input(name, value)
            return
        # A torch tensor: bound by pointer, so ORT reads / writes its memory in place.
        device = "cuda" if value.is_cuda else "cpu"
        dtype = _TORCH_TO_NUMPY[str(value.dtype)]
        if not value.is_contiguous():
            raise ValueError(f"{name}: a bound tensor must be contiguous")
        bind = binding.bind_output if output else binding.bind_input
        bind(name, device, 0, dtype, tuple(value.shape), value.data_ptr())

    def forward(
        self, input_ids: np.ndarray, attention_mask: np.ndarray, position_ids: np.ndarray, past: list | None = None
    ) -> tuple[np.ndarray, list]:
        """One decoder step. Returns host logits (batch, seq, vocab) and the presents as device
        ``OrtValue`` s, to pass back as ``past`` on the next call."""
        return self.run(input_ids, attention_mask, position_ids, past)

    # ---------------------------------------------------------------------------------------
    # Generation
    # ---------------------------------------------------------------------------------------

    def encode(self, prompt: str | Sequence[int]) -> list[int]:
        if isinstance(prompt, str):
            return list(self.tokenizer(prompt)["input_ids"])
        return [int(t) for t in prompt]

    def generate(
        self,
        prompts: Sequence[str | Sequence[int]],
        max_new_tokens: int = 32,
        temperature: float = 0.0,
        top_p: float = 1.0,
        seed: int | None = None,
        stop: Sequence[str] = (),
        on_token: TokenCallback | None = None,
    ) -> list[Completion]:
        """Generate for a batch of prompts (text or token ids), left-padded into one batch."""
        if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
            raise ValueError("prompts must be a list of prompts (strings or token-id lists), not a single prompt")
        if not prompts:
            raise ValueError("prompts must not be empty")
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be an integer >= 1; got {max_new_tokens!r}")
        check_sampling_args(temperature, top_p)
        stop = [s for s in stop if s]
        encoded = [self.encode(p) for p in prompts]
        if any(len(e) == 0 for e in encoded):
            raise ValueError("every prompt must have at least one token")
        longest = max(len(e) for e in encoded)
        if longest + max_new_tokens > self.context_length:
            raise ValueError(
                f"prompt ({longest} tokens) + max_new_tokens ({max_new_tokens}) "
                f"exceeds the context length {self.context_length}"
            )

        batch = len(encoded)
        input_ids = np.full((batch, longest), self.pad_token_id, dtype=np.int64)
        attention_mask = np.zeros((batch, longest), dtype=np.int64)
        for row, tokens in enumerate(encoded):
            input_ids[row, longest - len(tokens) :] = tokens
            attention_mask[row, longest - len(tokens) :] = 1
        # Same convention as transformers' generate: positions count real tokens only.
        position_ids = np.maximum(np.cumsum(attention_mask, axis=1) - 1, 0)
        position_ids[attention_mask == 0] = 1

        rng = np.random.default_rng(seed)
        generated: list[list[int]] = [[] for _ in range(batch)]
        texts = [""] * batch
        finish = [""] * batch
        need_text = on_token is not None or bool(stop)
        past = None
        for _ in range(max_new_tokens):
            logits, past = self.run(input_ids, attention_mask, position_ids, past, logits_to_keep=1)
            next_tokens = choose_next_tokens(logits[:, -1, :], temperature, top_p, rng)
            for row in range(batch):
                if finish[row]:
                    next_tokens[row] = self.pad_token_id
                    continue
                token = int(next_tokens[row])
                generated[row].append(token)
                delta = ""
                if need_text:
                    text = self._decode(generated[row])
                    delta, texts[row] = text[len(texts[row]) :], text
                if on_token is not None:
                    on_token(row, token, delta)
                if token in self.eos_token_ids or contains_stop(texts[row], stop):
                    finish[row] = "stop"
            if all(finish):
                break
            input_ids = next_tokens[:, None]
            attention_mask = np.concatenate([attention_mask, np.ones((batch, 1), dtype=np.int64)], axis=1)
            position_ids = position_ids[:, -1:] + 1

        completions = []
        for row in range(batch):
            text = cut_at_stop(self._decode(generated[row]), stop)
            completions.append(Completion(encoded[row], generated[row], text, finish[row] or "length"))
        return completions

    def _decode(self, tokens: list[int]) -> str:
        return self.tokenizer.decode(tokens, skip_special_tokens=True)

    # ---------------------------------------------------------------------------------------
    # Scoring
    # ---------------------------------------------------------------------------------------

    def logits(self, token_ids: Sequence[int]) -> np.ndarray:
        """Float32 logits (len, vocab) for one sequence, in one pass with an empty cache."""
        ids = np.asarray([list(token_ids)], dtype=np.int64)
        n = ids.shape[1]
        logits, _ = self.forward(ids, np.ones_like(ids), np.arange(n, dtype=np.int64)[None], None)
        return logits[0].astype(np.float32)

    def token_logprobs(self, token_ids: Sequence[int]) -> np.ndarray:
        """log p(token[i] | token[:i]) for i = 1..len-1 (float64)."""
        logits = self.logits(token_ids)[:-1].astype(np.float64)
        logits -= logits.max(axis=-1, keepdims=True)
        logz = np.log(np.exp(logits).sum(axis=-1))
        targets = np.asarray(token_ids[1:], dtype=np.int64)
        return logits[np.arange(len(targets)), targets] - logz

    def perplexity(self, token_ids: Sequence[int], window: int | None = None) -> float:
        """exp(mean NLL) over disjoint windows of ``window`` tokens (default: the context length);
        the first token of each window is context only."""
        window = window or self.context_length
        if window < 2:
            raise ValueError(f"window must be >= 2; got {window}")
        nll, count = 0.0, 0
        for start in range(0, len(token_ids), window):
            chunk = list(token_ids[start : start + window])
            if len(chunk) < 2:
                continue
            lp = self.token_logprobs(chunk)
            nll -= float(lp.sum())
            count += len(lp)
        if count == 0:
            raise ValueError("need at least 2 tokens to compute perplexity")
        return float(np.exp(nll / count))

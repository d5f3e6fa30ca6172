"""``lm_eval --model nsvd-onnx``: lm-eval's ONNX Runtime model for ``nsvd-lm export`` folders, which also
generates (``generate_until``) with the KV cache.

lm-eval 0.4.13's built-in ``--model onnxruntime`` already scores our exports (loglikelihood,
multiple choice, rolling perplexity: it reads ``genai_config.json`` and our tensor/axis names), but
raises NotImplementedError on generative tasks. This subclass keeps its scoring and answers
``generate_until`` with :class:`~nsvd_lm.serve.runtime.OnnxCausalLM` (greedy unless the task asks
to sample), sharing one ``InferenceSession``.

``lm_eval --model nsvd-onnx --model_args pretrained=EXPORTED_DIR[,execution_provider=cuda]``: registered
like ``nsvd`` (``nsvd_lm/lmeval/hook.py``, the ``lm_eval.models`` entry point), and by importing this
module. The ``nsvd_*`` tasks take ``max_length`` from the same model_args.
"""

from __future__ import annotations

from typing import Any

from lm_eval.api.registry import model_registry
from lm_eval.models.onnxruntime_ort import ONNXRuntimeLM

from nsvd_lm.lmeval import hook

_PROVIDER_ALIASES = {
    None: "auto",
    "auto": "auto",
    "cpu": "cpu",
    "cpuexecutionprovider": "cpu",
    "cuda": "cuda",
    "cudaexecutionprovider": "cuda",
}


class NSVDOnnxLM(ONNXRuntimeLM):
    """``ONNXRuntimeLM`` + KV-cache generation for folders written by ``nsvd-lm export``."""

    def _load(self) -> None:
        from nsvd_lm.serve.runtime import OnnxCausalLM

        key = self.execution_provider.lower() if isinstance(self.execution_provider, str) else None
        if key not in _PROVIDER_ALIASES:
            raise ValueError(f"execution_provider must be one of auto, cpu, cuda; got {self.execution_provider!r}")
        self.runtime = OnnxCausalLM(self.model_dir, provider=_PROVIDER_ALIASES[key], tokenizer=self.tokenizer)
        self.session = self.runtime.session
        self._introspect_graph()

    def _complete(self, tokens: list[int], gen_kwargs: dict[str, Any], until: list[str]):
        max_new = int(gen_kwargs.get("max_gen_toks", self.max_gen_toks))
        do_sample = bool(gen_kwargs.get("do_sample", False))
        temperature = float(gen_kwargs.get("temperature", 0.0) or 0.0) if do_sample else 0.0
        top_p = float(gen_kwargs.get("top_p", 1.0) or 1.0) if do_sample else 1.0
        # Keep the prompt's end when prompt + generation would overflow the context.
        budget = max(1, min(self.max_length, self.runtime.context_length) - max_new)
        prompt = tokens[-budget:] if tokens else [self.prefix_token_id]
        (completion,) = self.runtime.generate(
            [prompt],
            max_new_tokens=max_new,
            temperature=temperature,
            top_p=top_p,
            seed=gen_kwargs.get("seed"),
            stop=until,
        )
        return completion

    def _generate(self, tokens: list[int], gen_kwargs: dict[str, Any]) -> list[int]:
        completion = self._complete(tokens, gen_kwargs, [])
        return [t for t in completion.tokens if t not in self.runtime.eos_token_ids]

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Like the base class, but stop strings end generation early instead of trimming afterwards."""
        from tqdm import tqdm

        results: list[str] = []
        for context, gen_kwargs in tqdm([r.args for r in requests], disable=disable_tqdm, desc="Generating text"):
            kwargs = dict(gen_kwargs)
            until = kwargs.pop("until", None) or []
            until = [until] if isinstance(until, str) else list(until)
            text = self._complete(self.tok_encode(context), kwargs, until).text
            results.append(text)
            self.cache_hook.add_partial("generate_until", (context, gen_kwargs), text)
        return results


def _register() -> None:
    """``simple_evaluate(model="nsvd-onnx")`` works after importing this module, .pth hook or not."""
    try:
        # Upgrades the hook's lazy "module:Class" placeholder to the class itself.
        model_registry.register(hook.ONNX_MODEL_NAME)(NSVDOnnxLM)
    except ValueError:  # a newer lm-eval registered our entry point object already
        pass
    hook.install()  # our tasks in every TaskManager, also without the .pth file


_register()

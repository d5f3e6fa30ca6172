"""``nsvd-lm generate --onnx DIR --prompt "..."``: stream a continuation from an exported model."""

from __future__ import annotations

import argparse
import sys


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "generate",
        help="generate text with an exported ONNX model (ONNX Runtime), streaming to stdout",
        description="Greedy by default (--temperature 0); --temperature/--top-p/--seed for sampling.",
    )
    parser.add_argument("--onnx", required=True, metavar="DIR", help="folder written by `nsvd-lm export`")
    parser.add_argument("--prompt", required=True, help="prompt text")
    parser.add_argument("--max-new-tokens", type=int, default=32, help="tokens to generate at most (default 32)")
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default); > 0 samples")
    parser.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass in (0, 1] (default 1)")
    parser.add_argument("--seed", type=int, default=None, help="sampling seed")
    parser.add_argument("--chat", action="store_true", help="wrap the prompt with the tokenizer's chat template")
    parser.add_argument("--provider", default="auto", help="auto (CUDA if available, else CPU), cpu or cuda")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from nsvd_lm.serve.runtime import OnnxCausalLM
    from nsvd_lm.serve.sampling import check_sampling_args

    check_sampling_args(args.temperature, args.top_p)
    if args.max_new_tokens < 1:
        raise ValueError(f"--max-new-tokens must be >= 1; got {args.max_new_tokens}")
    lm = OnnxCausalLM(args.onnx, provider=args.provider)
    prompt = args.prompt
    if args.chat:
        prompt = lm.tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
        )

    def stream(row: int, token: int, delta: str) -> None:
        sys.stdout.write(delta)
        sys.stdout.flush()

    if not args.chat:
        sys.stdout.write(prompt)
    (completion,) = lm.generate(
        [prompt],
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        seed=args.seed,
        on_token=stream,
    )
    sys.stdout.write("\n")
    print(
        f"[{len(completion.tokens)} tokens, finish: {completion.finish_reason}, provider: {lm.device}]", file=sys.stderr
    )
    return 0

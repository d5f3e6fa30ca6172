"""``nsvd-lm serve --onnx DIR --port N``: OpenAI-style /v1/completions over ONNX Runtime."""

from __future__ import annotations

import argparse


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "serve",
        help="serve an exported ONNX model over HTTP (POST /v1/completions, GET /health)",
        description=(
            "Bounded OpenAI-style completion endpoint: prompt (str or list), max_tokens, temperature "
            "(default 1.0 as in OpenAI; 0 = greedy), top_p, stop, seed. Bad requests get 4xx JSON errors."
        ),
    )
    parser.add_argument("--onnx", required=True, metavar="DIR", help="folder written by `nsvd-lm export`")
    parser.add_argument("--port", type=int, default=8000, help="TCP port (0 = any free port; default 8000)")
    parser.add_argument("--host", default="127.0.0.1", help="bind address (default 127.0.0.1, local only)")
    parser.add_argument("--provider", default="auto", help="auto (CUDA if available, else CPU), cpu or cuda")
    parser.add_argument("--max-tokens", type=int, default=512, help="largest max_tokens a request may ask (default 512)")
    parser.add_argument("--max-prompt-tokens", type=int, default=2048, help="longest prompt in tokens (default 2048)")
    parser.add_argument("--max-prompts", type=int, default=8, help="prompts per request (default 8)")
    parser.add_argument("--max-body-bytes", type=int, default=1 << 20, help="request body limit (default 1 MiB)")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from nsvd_lm.export.server import ServerLimits

    for name in ("max_tokens", "max_prompt_tokens", "max_prompts", "max_body_bytes"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1; got {getattr(args, name)}")
    if not 0 <= args.port <= 65535:
        raise ValueError(f"--port must be in [0, 65535]; got {args.port}")
    limits = ServerLimits(
        max_body_bytes=args.max_body_bytes,
        max_prompts=args.max_prompts,
        max_prompt_tokens=args.max_prompt_tokens,
        max_tokens=args.max_tokens,
    )

    from nsvd_lm.export.runtime import OnnxCausalLM
    from nsvd_lm.export.server import make_server

    lm = OnnxCausalLM(args.onnx, provider=args.provider)
    server = make_server(lm, args.host, args.port, limits)
    host, port = server.server_address[:2]
    print(f"serving {args.onnx} on http://{host}:{port} (POST /v1/completions, GET /health; provider {lm.device}); Ctrl-C stops", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    return 0

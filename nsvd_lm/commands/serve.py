"""``nsvd-lm serve --onnx DIR --port N``: an OpenAI-compatible server over ONNX Runtime (docs/onnx.md)."""

from __future__ import annotations

import argparse
import dataclasses

# Help for the ServerLimits fields; the flags themselves, their types and defaults come from the dataclass.
LIMIT_HELP = {
    "max_body_bytes": "request body limit in bytes",
    "max_prompts": "prompts per completion request",
    "max_prompt_tokens": "longest prompt in tokens",
    "max_tokens": "largest max_tokens a request may ask",
    "max_stop_strings": "stop strings per request",
    "read_timeout_s": "seconds a client may take to send its request body (then 408)",
    "max_batch_seqs": "sequences decoding together (continuous batching)",
    "max_tokens_in_flight": "prompt + max_tokens summed over the sequences in flight",
    "max_queue": "sequences waiting for a slot; beyond it a 429",
    "max_messages": "chat messages per request",
    "max_concurrent_requests": "HTTP requests handled at once; beyond it a 503",
    "prefill_chunk_tokens": "prompt tokens prefilled between two decode steps",
}


def _limit_fields() -> list[dataclasses.Field]:
    try:
        from nsvd_lm.serve.http import ServerLimits
    except ImportError:  # the onnx extra is not installed: `run` says so
        return []
    return list(dataclasses.fields(ServerLimits))


def _backends() -> tuple[str, ...]:
    from nsvd_lm.serve.engine import BACKENDS  # numpy only: cheap

    return BACKENDS


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "serve",
        help="serve an exported ONNX model over HTTP (OpenAI-compatible: completions, chat, streaming, batching)",
        description=(
            "OpenAI-compatible server: POST /v1/completions and /v1/chat/completions (stream: true as server-sent "
            "events), GET /v1/models, /health, /stats. Concurrent requests join one running batch at the next "
            "decode step (continuous batching). Bad requests get 4xx JSON errors; past the queue a 429."
        ),
    )
    parser.add_argument("--onnx", required=True, metavar="DIR", help="folder written by `nsvd-lm export`")
    parser.add_argument("--port", type=int, default=8000, help="TCP port (0 = any free port; default 8000)")
    parser.add_argument("--host", default="127.0.0.1", help="bind address (default 127.0.0.1, local only)")
    parser.add_argument(
        "--backend",
        default="ort",
        choices=_backends(),
        help=(
            "generation engine: ort = ONNX Runtime, step-level continuous batching, seeded sampling (default); "
            "genai = onnxruntime-genai's engine (static batches on our exports); docs/onnx.md"
        ),
    )
    parser.add_argument("--provider", default="auto", help="auto (CUDA if available, else CPU), cpu or cuda")
    parser.add_argument("--threads", type=int, default=None, help="ONNX Runtime intra-op threads (default: its own)")
    parser.add_argument("--model-name", default=None, help="the model id clients send (default: the folder name)")
    limits = parser.add_argument_group("limits (nsvd_lm.serve.http.ServerLimits)")
    for f in _limit_fields():
        limits.add_argument(
            "--" + f.name.replace("_", "-"),
            type=type(f.default),
            default=None,
            dest=f.name,
            help=f"{LIMIT_HELP.get(f.name, f.name)} (default {f.default})",
        )
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from nsvd_lm.serve.http import ServerLimits

    if not 0 <= args.port <= 65535:
        raise ValueError(f"--port must be in [0, 65535]; got {args.port}")
    if args.threads is not None and args.threads < 1:
        raise ValueError(f"--threads must be >= 1; got {args.threads}")
    given = {
        f.name: getattr(args, f.name)
        for f in dataclasses.fields(ServerLimits)
        if getattr(args, f.name, None) is not None
    }
    try:
        limits = ServerLimits(**given)
    except ValueError as exc:  # name the flag, not the dataclass field
        name = str(exc).split(".", 1)[-1].split(" ", 1)[0]
        raise ValueError(f"--{name.replace('_', '-')} must be a positive number; got {given.get(name)!r}") from None

    from nsvd_lm.serve.engine import make_engine
    from nsvd_lm.serve.http import make_server

    engine = make_engine(
        args.backend, args.onnx, provider=args.provider, intra_op_threads=args.threads, **limits.engine_limits()
    )
    server = make_server(engine, args.host, args.port, limits, model_name=args.model_name)
    host, port = server.server_address[:2]
    print(
        f"serving {args.onnx} on http://{host}:{port} (POST /v1/completions, /v1/chat/completions, stream: true; "
        f"GET /v1/models, /health, /stats; backend {engine.backend}, provider {engine.device}; "
        f"batch up to {limits.max_batch_seqs}); Ctrl-C stops",
        flush=True,
    )
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    return 0

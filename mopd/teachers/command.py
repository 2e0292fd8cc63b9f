"""`mopd serve-teacher`: a teacher checkpoint as a prefill service (MOPD 3.3).

Its own module (not `mopd.cli`) because local teacher servers are started as
`python -m mopd.teachers.command serve-teacher ...` by the distill stage: this file and what it
imports are part of that stage's code identity (`mopd.codedeps`), the rest of the CLI is not.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

from mopd.teachers.server import ServerLimits


def serve_teacher(args: argparse.Namespace) -> int:
    from mopd.teachers.launch import serve

    token = None
    if args.token_env:
        token = os.environ.get(args.token_env)
        if not token:
            print(f"error: --token-env {args.token_env}: environment variable is unset or empty",
                  file=sys.stderr)
            return 2
    try:
        limits = ServerLimits(**{f: getattr(args, f) for f in ServerLimits.model_fields})
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    serve(args.model, host=args.host, port=args.port, token=token, limits=limits, dtype=args.dtype,
          device=args.device, threads=args.threads, name=args.served_model_name)
    return 0


def add_parser(sub) -> None:
    """Register `serve-teacher` on an argparse subparsers object."""
    p = sub.add_parser("serve-teacher", help="serve a teacher checkpoint for scoring and sampling",
                       description="Serve POST /v1/completions (vLLM's prompt_logprobs scoring and "
                                   "sampled generation) and GET /health for a causal LM.")
    p.add_argument("--model", required=True, help="checkpoint directory or hub id")
    p.add_argument("--host", default="127.0.0.1", help="bind address (default 127.0.0.1: local only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--token-env", default=None,
                   help="environment variable holding a bearer token that requests must carry")
    p.add_argument("--served-model-name", default=None,
                   help="name reported by /v1/models; requests may use it or the --model path, "
                        "any other `model` is a 404 (default: the --model path)")
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                   help="default: $MOPD_DTYPE (the stage's runtime setting), else float32")
    p.add_argument("--device", default=None, help="default: $MOPD_DEVICE (the stage's runtime setting), else cpu")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    d = ServerLimits()
    p.add_argument("--max-request-tokens", type=int, default=d.max_request_tokens)
    p.add_argument("--max-batch", type=int, default=d.max_batch, help="prompts per request")
    p.add_argument("--max-logprobs", type=int, default=d.max_logprobs, help="largest prompt_logprobs")
    p.add_argument("--max-generated-tokens", type=int, default=d.max_generated_tokens,
                   help="n x prompts x max_tokens a generating request may ask for (413 beyond)")
    p.add_argument("--max-batch-tokens", type=int, default=d.max_batch_tokens,
                   help="padded tokens per forward pass (dynamic batching)")
    p.add_argument("--max-body-bytes", type=int, default=d.max_body_bytes,
                   help="largest request body, checked before it is parsed (413 beyond)")
    p.add_argument("--body-timeout", type=float, default=d.body_timeout,
                   help="seconds to receive a request body (408 beyond)")
    p.add_argument("--header-timeout", type=float, default=d.header_timeout,
                   help="seconds to receive a request's headers (connection closed beyond)")
    p.add_argument("--keep-alive-timeout", type=int, default=d.keep_alive_timeout,
                   help="seconds an idle connection is kept open")
    p.add_argument("--max-header-bytes", type=int, default=d.max_header_bytes,
                   help="largest request line + headers")
    p.add_argument("--max-connections", type=int, default=d.max_connections,
                   help="concurrent connections (503 beyond)")
    p.set_defaults(func=serve_teacher)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="mopd", description=__doc__)
    add_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    logging.basicConfig(level=os.environ.get("MOPD_LOG_LEVEL", "INFO"),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return args.func(args)


if __name__ == "__main__":
    raise SystemExit(main())

"""`python -m router`: run the HTTP router in front of running workers."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Callable, Sequence
from typing import TypeVar

from kvtransfer.security import ClusterSecurity, add_security_args
from router.discovery import dns_discovery
from router.selection import DEFAULT_LOCAL_PREFILL_THRESHOLD, POLICIES
from router.server import RouterConfig, serve
from router.tools import DEFAULT_PARSER as DEFAULT_TOOL_PARSER
from router.tools import PARSERS as TOOL_PARSERS

T = TypeVar("T", int, float)


def _address(value: str) -> str:
    host, sep, port = value.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise argparse.ArgumentTypeError(f"expected HOST:PORT, got {value!r}")
    return value


def _checked(
    parse: Callable[[str], T], ok: Callable[[T], bool], expected: str
) -> Callable[[str], T]:
    """An argparse type: `parse` the text, then refuse what is not `ok`."""

    def convert(value: str) -> T:
        try:
            x = parse(value)
        except ValueError:
            x = None
        if x is None or not ok(x):
            raise argparse.ArgumentTypeError(f"expected {expected}, got {value!r}")
        return x

    return convert


_positive = _checked(int, lambda n: n >= 1, "a positive integer")
_non_negative = _checked(int, lambda n: n >= 0, "an integer >= 0")
_seconds = _checked(float, lambda x: 0 < x < float("inf"), "seconds (> 0)")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m router",
        description="The splitserve router: an OpenAI-compatible HTTP API (/v1/completions, "
        "/v1/chat/completions, streaming) in front of decode workers, which it picks by free "
        "KV cache and load; it passes each request the prefill workers to use, ranked by "
        "queued prompt tokens. Also serves /health, /metrics and /cluster.",
        epilog="example: python -m router --model ./tiny --decode 127.0.0.1:50061 "
        "--prefill 127.0.0.1:50051 --port 8000",
    )
    p.add_argument(
        "--model",
        required=True,
        help="model directory (its config.json and tokenizer; the workers serve the same model)",
    )
    p.add_argument(
        "--decode",
        action="append",
        type=_address,
        default=[],
        metavar="HOST:PORT",
        help="a decode or colocated worker (repeat for each)",
    )
    p.add_argument(
        "--decode-dns",
        type=_address,
        metavar="NAME:PORT",
        help="a DNS name that resolves to every decode worker (a Kubernetes headless "
        "Service), resolved again at every poll, so workers may come and go",
    )
    p.add_argument(
        "--prefill-dns",
        type=_address,
        metavar="NAME:PORT",
        help="the same, for the prefill workers",
    )
    p.add_argument(
        "--prefill",
        action="append",
        type=_address,
        default=[],
        metavar="HOST:PORT",
        help="a prefill worker (repeat for each; none for a colocated deployment)",
    )
    p.add_argument(
        "--host", default="127.0.0.1", help="address to listen on (default: %(default)s)"
    )
    p.add_argument("--port", type=_positive, default=8000, help="port (default: %(default)s)")
    p.add_argument(
        "--served-model-name", help="the model name clients send (default: the directory's name)"
    )
    p.add_argument("--max-model-len", type=_positive, help="context length (default: the model's)")
    p.add_argument(
        "--max-body-bytes",
        type=_positive,
        default=1 << 20,
        help="largest request body accepted (default: %(default)s)",
    )
    p.add_argument(
        "--poll-interval",
        type=float,
        default=0.5,
        help="seconds between worker Status polls (default: %(default)s)",
    )
    p.add_argument(
        "--policy",
        choices=list(POLICIES),
        default="cache_aware",
        help="how to pick workers: cache_aware weighs the prompt tokens a worker likely holds "
        "in its prefix cache against its queued prompt tokens; least_loaded: most free KV "
        "blocks and least load; round_robin: in turn (default: %(default)s)",
    )
    p.add_argument(
        "--tool-call-parser",
        choices=list(TOOL_PARSERS),
        default=DEFAULT_TOOL_PARSER,
        help="how tool calls are read from a chat answer under tool_choice auto: hermes "
        "(<tool_call>{...}</tool_call>, the built-in model's template; Qwen, Hermes) or "
        "llama3_json (Llama 3's bare JSON calls) (default: %(default)s)",
    )
    p.add_argument(
        "--local-prefill-threshold",
        type=_non_negative,
        default=DEFAULT_LOCAL_PREFILL_THRESHOLD,
        metavar="TOKENS",
        help="prefill a prompt on its decode worker, with no KV transfer, when the part of it "
        "that worker likely lacks is at most this many tokens; 0: always use the prefill "
        "pool (default: %(default)s)",
    )
    p.add_argument(
        "--migration-limit",
        type=_non_negative,
        default=3,
        help="times one request may move to another decode worker when its worker fails "
        "mid-stream (the new worker recomputes the prompt and the tokens streamed so far and "
        "goes on); 0: the stream ends with an error event (default: %(default)s)",
    )
    p.add_argument(
        "--request-timeout",
        type=_seconds,
        metavar="SECONDS",
        help="end-to-end limit on one request, from its arrival: past it the request is "
        "cancelled on its worker and answered 504 (a stream that started ends with an error "
        "event) (default: none)",
    )
    p.add_argument(
        "--api-key",
        default=os.environ.get("SPLITSERVE_API_KEY"),
        help="require 'Authorization: Bearer KEY' on /v1/ (default: $SPLITSERVE_API_KEY, "
        "so a Kubernetes Secret can supply it)",
    )
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    add_security_args(p)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if args.port > 65535:
        parser.error(f"--port must be at most 65535, got {args.port}")
    if not args.decode and not args.decode_dns:
        parser.error("name the decode workers: --decode HOST:PORT or --decode-dns NAME:PORT")
    if not args.poll_interval > 0:
        parser.error(f"--poll-interval must be > 0, got {args.poll_interval}")
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        security = ClusterSecurity.from_args(args)
    except ValueError as e:
        parser.error(str(e))
    config = RouterConfig(
        model=args.model,
        served_model_name=args.served_model_name,
        decode_addresses=tuple(args.decode),
        prefill_addresses=tuple(args.prefill),
        host=args.host,
        port=args.port,
        max_model_len=args.max_model_len,
        max_body_bytes=args.max_body_bytes,
        poll_interval_s=args.poll_interval,
        policy=args.policy,
        migration_limit=args.migration_limit,
        local_prefill_threshold=args.local_prefill_threshold,
        tool_call_parser=args.tool_call_parser,
        request_timeout_s=args.request_timeout,
        api_key=args.api_key or None,
        security=security,
        discover=(
            dns_discovery(args.decode_dns, args.prefill_dns, args.decode, args.prefill)
            if args.decode_dns or args.prefill_dns
            else None
        ),
    )
    try:
        serve(config)
    except (OSError, ValueError, RuntimeError) as e:  # a bad model directory, a port in use
        print(f"router: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())

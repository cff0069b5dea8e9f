"""The `splitserve` command line: the top-level parser and error handling;
each subcommand lives in deploy/commands/."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from deploy.commands import bench, doctor, model, ray, serve

log = logging.getLogger("splitserve")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="splitserve",
        description="LLM serving with prefill and decode on separate pools.",
    )
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    # The order of `splitserve --help`.
    model.add_make_model_parser(sub)
    serve.add_serve_parser(sub)
    ray.add_parser(sub)
    serve.add_check_config_parser(sub)
    bench.add_parser(sub)
    doctor.add_parser(sub)
    model.add_generate_parser(sub)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per request otherwise
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    try:
        return int(args.run(args))
    except (ValueError, FileNotFoundError, FileExistsError, RuntimeError) as e:
        if args.verbose:
            raise
        print(f"splitserve {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())

"""Regenerate the gRPC stubs from splitserve.proto, reproducibly.

    python -m protos.generate          # rewrite protos/splitserve_pb2*.py
    python -m protos.generate --check  # exit 1 if the committed stubs are stale

The stubs depend on the exact grpcio-tools release (pinned in pyproject.toml's
dev extras), so a version bump shows up as a stale-stub failure, not as
silent drift.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
PROTO = "splitserve.proto"
STUBS = ("splitserve_pb2.py", "splitserve_pb2.pyi", "splitserve_pb2_grpc.py")


def generate(out_dir: Path) -> None:
    from grpc_tools import protoc

    args = [
        "protoc",
        f"-I{HERE}",
        f"--python_out={out_dir}",
        f"--pyi_out={out_dir}",
        f"--grpc_python_out={out_dir}",
        str(HERE / PROTO),
    ]
    if protoc.main(args) != 0:
        raise SystemExit(f"protoc failed on {HERE / PROTO}")
    # grpcio-tools imports the sibling module absolutely; we live in a package.
    grpc_stub = out_dir / "splitserve_pb2_grpc.py"
    text = grpc_stub.read_text()
    text = text.replace(
        "import splitserve_pb2 as splitserve__pb2",
        "from protos import splitserve_pb2 as splitserve__pb2",
    )
    grpc_stub.write_text(text)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="compare, do not write")
    args = parser.parse_args(argv)
    if not args.check:
        generate(HERE)
        print(f"wrote {', '.join(STUBS)} in {HERE}")
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        generate(Path(tmp))
        stale = [s for s in STUBS if (Path(tmp) / s).read_bytes() != _read(HERE / s)]
    if stale:
        print(f"stale stubs: {', '.join(stale)}; run `python -m protos.generate`", file=sys.stderr)
        return 1
    print("stubs are up to date")
    return 0


def _read(path: Path) -> bytes:
    return path.read_bytes() if path.exists() else b""


if __name__ == "__main__":
    sys.exit(main())

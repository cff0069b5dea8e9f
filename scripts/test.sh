#!/usr/bin/env bash
# The project's test command: installs what is missing, then runs the suite.
#   scripts/test.sh            everything (what CI runs): tests/unit, tests/e2e, tests/deploy, tests/gpu
#                              (the gpu lane skips itself, saying why, without CUDA)
#   scripts/test.sh --fast     the unit lane only (in-process, a few minutes)
# Other arguments go to pytest (e.g. scripts/test.sh -k scheduler, scripts/test.sh -m e2e).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install.sh
if [[ "${1:-}" == "--fast" ]]; then
    shift
    exec .venv/bin/python -m pytest -q tests/unit "$@"
fi
exec .venv/bin/python -m pytest -q "$@"

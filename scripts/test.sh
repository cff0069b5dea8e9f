#!/usr/bin/env bash
# The project's test command: installs what is missing, then runs the suite.
# Extra arguments go to pytest (e.g. scripts/test.sh -k scheduler).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install.sh
exec .venv/bin/python -m pytest -q "$@"

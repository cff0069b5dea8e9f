#!/usr/bin/env bash
# Creates .venv in the repository and installs splitserve into it, with the
# dev extras (tests, linters, Triton). Safe to run again: it only adds what is
# missing.
#
# torch: when the venv has no torch yet, the CPU build of torch 2.13 is put in
# place first, because an unpinned `pip install torch` resolves to a CUDA build
# of several GB. A GPU user installs a CUDA build of torch into .venv first
# (or sets SPLITSERVE_TORCH to a pip requirement), and this script keeps it.
set -euo pipefail
cd "$(dirname "$0")/.."

python=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    echo "[install] creating .venv with $($python --version)"
    "$python" -m venv .venv
fi
pip() { .venv/bin/python -m pip --disable-pip-version-check -q "$@"; }

if ! .venv/bin/python -c "import torch" >/dev/null 2>&1; then
    torch_spec=${SPLITSERVE_TORCH:-torch==2.13.*}
    echo "[install] installing $torch_spec"
    pip install "$torch_spec"
fi
echo "[install] installing splitserve and its dev extras"
pip install -e '.[dev]'
echo "[install] done: $(.venv/bin/python -c 'import torch; print("torch", torch.__version__, "cuda" if torch.cuda.is_available() else "cpu")')"

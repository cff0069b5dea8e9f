"""What several subcommands share."""

from __future__ import annotations

import os

DEFAULT_STATE_FILE = os.path.join(
    os.environ.get("SPLITSERVE_STATE_DIR", "~/.splitserve"), "up.json"
)
DTYPE_HELP = (
    "auto (default): bfloat16 on a CPU that runs it natively (AMX or AVX512-BF16), "
    "float32 on other CPUs, the checkpoint's dtype on GPU; the choice and why are logged "
    "at startup (and shown on /cluster)"
)

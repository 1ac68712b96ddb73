"""tiny_gpt, after noting what the worker sees of its secret: the SHA-256 of WANDB_API_KEY
(never the value) in ``$ENV_PROBE_DIR/rank-<RANK>.sha256``, then the recipe as usual."""

from __future__ import annotations

import hashlib
import os
import runpy
import sys
from pathlib import Path

RECIPES = Path(__file__).resolve().parents[3] / "recipes"

if __name__ == "__main__":
    value = os.environ.get("WANDB_API_KEY", "")
    probe = Path(os.environ["ENV_PROBE_DIR"]) / f"rank-{os.environ.get('RANK', '0')}.sha256"
    probe.write_text(hashlib.sha256(value.encode()).hexdigest() if value else "missing")
    sys.path.insert(0, str(RECIPES))
    runpy.run_path(str(RECIPES / "tiny_gpt.py"), run_name="__main__")

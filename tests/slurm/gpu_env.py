"""A training script that records what a worker sees of its GPUs, then exits 0.

Each worker writes ``$GPU_ENV_DIR/rank-<RANK>.json`` with the GPU variables Slurm sets for a
step (`CUDA_VISIBLE_DEVICES`, `SLURM_GPUS_ON_NODE`, ...) and its node. No torch: the point is
the environment trainctl's agent, torchrun and the worker inherit from the srun step.
"""

import json
import os
from pathlib import Path

NAMES = (
    "CUDA_VISIBLE_DEVICES",
    "GPU_DEVICE_ORDINAL",
    "SLURM_GPUS_ON_NODE",
    "SLURM_JOB_GPUS",
    "SLURM_STEP_GPUS",
    "SLURM_GPUS_PER_NODE",
    "SLURMD_NODENAME",
    "SLURM_STEP_ID",
    "RANK",
    "LOCAL_RANK",
)

if __name__ == "__main__":
    seen = {name: os.environ.get(name) for name in NAMES}
    out = Path(os.environ["GPU_ENV_DIR"]) / f"rank-{os.environ['RANK']}.json"
    out.write_text(json.dumps(seen))

"""The weight fingerprint: the oracle for "same weights as an uninterrupted run"."""

from __future__ import annotations

import hashlib

import torch


def fingerprint_state(state: dict[str, torch.Tensor]) -> str:
    """sha256 over every tensor's name, dtype, shape and bytes, in sorted name order."""
    digest = hashlib.sha256()
    for name in sorted(state):
        tensor = state[name].detach().to("cpu").contiguous()
        digest.update(name.encode())
        digest.update(str(tensor.dtype).encode())
        digest.update(repr(tuple(tensor.shape)).encode())
        digest.update(tensor.view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    return digest.hexdigest()


def model_fingerprint(model: torch.nn.Module) -> str | None:
    """Gather the full model state (a collective: every rank must call) and hash it on rank 0.

    Works for FSDP2 (DTensor) and plain modules. Returns the hex digest on rank 0 (or without a
    process group), None on other ranks.
    """
    import torch.distributed as dist
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    distributed = dist.is_available() and dist.is_initialized()
    if distributed:
        state = get_model_state_dict(
            model, options=StateDictOptions(full_state_dict=True, cpu_offload=True)
        )
        if dist.get_rank() != 0:
            return None
    else:
        state = model.state_dict()
    return fingerprint_state({k: v for k, v in state.items() if isinstance(v, torch.Tensor)})

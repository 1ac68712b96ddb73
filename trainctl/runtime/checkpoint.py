"""Checkpointing from a training script: the recipe's `checkpoint:` section, ready to use.

    ckpt = runtime.checkpointing(ctx, model, optimizer)     # None when the recipe saves none
    step = ckpt.restore() if ckpt else 0                     # newest committed, verified step
    ...
    if ckpt: ckpt.maybe_save(step)                           # async: returns after staging

`TrainingCheckpoint` bundles the FSDP2 model and optimizer (sharded state dicts through DCP's
`get_state_dict`/`set_state_dict`, so restore reshards to any world size) with the trainer's
own state: the step (which is also the data position: batches are drawn per step) and the
global RNG state, so a resumed run is bit-identical to an uninterrupted one.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
from torch.distributed.checkpoint.stateful import Stateful
from torch.distributed.tensor import DTensor

from trainctl.checkpoint.checkpointer import Checkpointer
from trainctl.checkpoint.fence import FencedStorage
from trainctl.checkpoint.layout import node_memory_root
from trainctl.checkpoint.memory import restore_tiers
from trainctl.checkpoint.outage import OUTAGE_FILE, InjectedOutage
from trainctl.checkpoint.storage import open_storage, transfer_config
from trainctl.runtime.memory_tier import MemoryTier
from trainctl.runtime.reporter import Reporter
from trainctl.secrets import JobSecrets, merge_options

if TYPE_CHECKING:
    from trainctl.runtime import RankContext


class ModelAndOptimizer(Stateful):
    """FSDP2 model + optimizer as DCP `Stateful` (sharded: no gather on save)."""

    def __init__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
        self.model = model
        self.optimizer = optimizer
        self._live: dict[str, Any] | None = None
        self._live_key: tuple[int, ...] = ()

    def state_dict(self) -> dict[str, Any]:
        model_state, optim_state = get_state_dict(self.model, self.optimizer)
        return {"model": model_state, "optim": optim_state}

    def live_state_dict(self) -> dict[str, Any]:
        """`state_dict()`, rebuilt only when a tensor of the model or optimizer is not the one
        it was (its storage moved, a state was added): the memory tier's per-step save.

        ``get_state_dict`` costs ~3-6 ms per call on tiny-gpt (it walks every parameter and
        rebuilds the fqn maps), more than the copy of the state it returns. Its tensors share
        storage with the live ones (training updates them in place), so the last result stays
        right while every tensor's storage is where it was: checked here by data pointer (the
        cached dict holds the old tensors, so a freed address cannot be reused meanwhile).
        The optimizer's non-tensor values (a scheduled learning rate) are refreshed every call.
        """
        key = self._tensor_key()
        if self._live is not None and key == self._live_key and self._refresh_groups(self._live):
            return self._live
        self._live, self._live_key = self.state_dict(), key
        return self._live

    def _tensor_key(self) -> tuple[int, ...]:
        pointers = [
            (t._local_tensor if isinstance(t, DTensor) else t).data_ptr()
            for t in (*self.model.parameters(), *self.model.buffers())
        ]
        for per_param in self.optimizer.state.values():
            pointers.append(len(per_param))
            for value in per_param.values():
                if isinstance(value, torch.Tensor):
                    local = value._local_tensor if isinstance(value, DTensor) else value
                    pointers.append(local.data_ptr())
        return tuple(pointers)

    def _refresh_groups(self, cached: dict[str, Any]) -> bool:
        """Copy the live param groups' values into `cached` (False: their shape changed)."""
        groups = cached["optim"].get("param_groups", [])
        if len(groups) != len(self.optimizer.param_groups):
            return False
        for saved, live in zip(groups, self.optimizer.param_groups, strict=True):
            if saved.keys() != live.keys():
                return False
            for name, value in live.items():
                if name != "params":
                    saved[name] = value
        return True

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        set_state_dict(
            self.model,
            self.optimizer,
            model_state_dict=state_dict["model"],
            optim_state_dict=state_dict["optim"],
        )


class TrainerState(Stateful):
    """The step (= data position) and the global CPU RNG state, identical on every rank."""

    def __init__(self) -> None:
        self.step = 0

    def state_dict(self) -> dict[str, Any]:
        return {"step": torch.tensor(self.step, dtype=torch.int64), "rng": torch.get_rng_state()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.step = int(state_dict["step"].item())
        torch.set_rng_state(state_dict["rng"])


class TrainingCheckpoint:
    """A job's checkpoints as a training loop uses them."""

    def __init__(
        self,
        checkpointer: Checkpointer,
        model: torch.nn.Module,
        optimizer: torch.optim.Optimizer,
        reporter: Reporter | None = None,
        memory: MemoryTier | None = None,
    ) -> None:
        self.checkpointer = checkpointer
        self.memory = memory
        self.reporter = reporter or Reporter(None, 0)
        self.trainer = TrainerState()
        self.state: dict[str, Stateful] = {
            "app": ModelAndOptimizer(model, optimizer),
            "trainer": self.trainer,
        }

    def restore(self) -> int:
        """Load the newest committed, verified step of the fastest tier (memory, then durable
        storage); returns the step to continue from (0: none)."""
        memory = self.memory.restorer if self.memory is not None else None
        if self.memory is not None:
            self.memory.report_assembly()
        step = restore_tiers(memory, self.checkpointer, self.state, self.checkpointer.emit)
        return 0 if step is None else self.trainer.step

    def maybe_save(self, step: int) -> bool:
        """Save into memory and to storage when `step` is on their intervals; returns whether
        either save started. The memory save is done (its slot record written) on return."""
        in_memory = self.memory is not None and self.memory.should_save(step)
        durable = self.checkpointer.should_save(step)
        self.trainer.step = step
        # A step on both intervals builds the model's and optimizer's state dict once for both
        # tiers (``get_state_dict`` walks every parameter: ~2.5 ms for tiny-gpt, as long as
        # the copy of its state many times over); each tier stages its own copy of it.
        state = self._state_dict() if in_memory and durable else self.state
        if self.memory is not None and in_memory:
            self.memory.save(step, state)
        if not durable:
            return in_memory
        self.save(step, state)
        return True

    def save(self, step: int, state: Mapping[str, Any] | None = None) -> None:
        """Stage now, upload in the background (after the previous upload finished).
        `state`: this step's state dict when the caller built it already."""
        self.reporter.saving(step)
        self.trainer.step = step
        self.checkpointer.save(step, state or self.state, extra={"step": step})
        self.reporter.staged(step)

    def _state_dict(self) -> dict[str, Any]:
        return {name: value.state_dict() for name, value in self.state.items()}

    def finish(self) -> None:
        """Wait for the last upload and release the checkpoint process group's resources."""
        self.checkpointer.wait()
        self.checkpointer.close()
        if self.memory is not None:
            self.memory.close()


def checkpointing(
    ctx: RankContext, model: torch.nn.Module, optimizer: torch.optim.Optimizer
) -> TrainingCheckpoint | None:
    """The job's checkpointing as the recipe's ``checkpoint:`` section asks, or None.

    A collective when torch.distributed is initialised: call it on every rank. Events
    (commits, failures, skipped steps, GC) go to the job store through the node agent.
    Storage credentials come from the job's secrets file (else the standard AWS chain); a
    planned storage-outage fault (testing) wraps the storage here, at the edge.
    """
    settings = ctx.settings
    spec, root = settings.checkpoint, settings.checkpoint_root
    if spec is None or not root or not (spec.interval_steps or spec.memory.enabled):
        return None

    def on_event(name: str, fields: dict[str, Any]) -> None:
        ctx.event(name, _describe(name, fields), **fields)

    credentials = (
        JobSecrets.read(settings.secrets_file).storage_options if settings.secrets_file else {}
    )
    options = merge_options(spec.storage_options, credentials)
    storage = open_storage(root, storage_options=options or None, config=transfer_config(spec))
    if settings.faults_dir:
        storage = InjectedOutage(storage, Path(settings.faults_dir) / OUTAGE_FILE)
    # A superseded attempt (an orphan on a partitioned node) writes nothing that matters.
    storage = FencedStorage(storage, settings.attempt)
    checkpointer = Checkpointer.from_spec(root, spec, storage=storage, on_event=on_event)
    memory = None
    if spec.memory.enabled:
        memory = MemoryTier.open(
            node_memory_root(settings.job_id, settings.node),
            spec.memory.interval_steps,
            on_event=on_event,
            replicas=spec.memory.replicas,
            attempt=settings.attempt,
            slots=spec.memory.slots,
        )
    return TrainingCheckpoint(checkpointer, model, optimizer, ctx.reporter, memory)


def _describe(name: str, fields: dict[str, Any]) -> str:
    step = fields.get("step")
    reason = fields.get("reason") or fields.get("error")
    text = name.replace("_", " ")
    if step is not None:
        text += f" step {step}"
    if reason:
        text += f": {reason}"
    return text

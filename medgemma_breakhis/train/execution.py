"""How a training step is executed (`execution` in params.yaml): micro-batches, checkpointing, compile, workers, and
processes under `accelerate launch`. None of it changes what is trained (docs/gpu.md), so no stage depends on it."""

import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from medgemma_breakhis.core.errors import ExpectedError
from medgemma_breakhis.core.params import ExecutionParams
from medgemma_breakhis.model.load import world_size

# (GiB at least, micro-batch, gradient checkpointing) of `auto`: what `make gpu-memory` derives for MedGemma 4B.
AUTO_BY_GPU_MEMORY = ((120.0, 8, False), (60.0, 4, False), (30.0, 2, False), (0.0, 8, True))
MAX_WORKERS = 4


class ProcessCountError(ExpectedError, RuntimeError):
    """The processes that were launched are not as many as the params ask for."""


@dataclass(frozen=True)
class ExecutionPlan:
    micro_batch_size: int
    grad_accum_steps: int
    gradient_checkpointing: bool
    dataloader_workers: int
    compile: bool

    def describe(self) -> str:
        return (
            f"micro-batch {self.micro_batch_size} x {self.grad_accum_steps} accumulation steps, gradient checkpointing "
            f"{'on' if self.gradient_checkpointing else 'off'}, {self.dataloader_workers} dataloader workers, "
            f"torch.compile {'on' if self.compile else 'off'}"
        )


def auto_setting(gpu_memory_gib: float) -> tuple[int, bool]:
    """(micro-batch, gradient checkpointing) that `auto` takes on a GPU of this much memory."""
    return next((micro, checkpointing) for least, micro, checkpointing in AUTO_BY_GPU_MEMORY if gpu_memory_gib >= least)


def plan_execution(execution: ExecutionParams, batch_size: int, device: torch.device) -> ExecutionPlan:
    """The plan for `batch_size` examples per optimizer step: explicit settings as given, `auto` by the GPU's memory."""
    per_process = batch_size // execution.num_processes
    on_gpu = device.type == "cuda"
    micro, checkpointing = per_process, False
    if on_gpu and "auto" in (execution.micro_batch_size, execution.gradient_checkpointing):
        micro, checkpointing = auto_setting(torch.cuda.get_device_properties(device).total_memory / 2**30)
    if execution.micro_batch_size != "auto":
        micro = execution.micro_batch_size
    micro = max(m for m in range(1, min(micro, per_process) + 1) if per_process % m == 0)
    if execution.gradient_checkpointing != "auto":
        checkpointing = execution.gradient_checkpointing
    workers = max(0, min(MAX_WORKERS, (os.cpu_count() or 1) - 1)) if on_gpu else 0
    return ExecutionPlan(
        micro_batch_size=micro,
        grad_accum_steps=per_process // micro,
        gradient_checkpointing=checkpointing,
        dataloader_workers=workers if execution.dataloader_workers == "auto" else execution.dataloader_workers,
        # measured only without checkpointing, and on a CPU compilation costs more than it saves in a short run
        compile=on_gpu and not checkpointing if execution.compile == "auto" else execution.compile,
    )


def is_main_process() -> bool:
    """Rank 0: the one process that tracks in MLflow and writes the stage's outputs."""
    return int(os.environ.get("RANK", "0")) == 0


def run_distributed_if_asked(num_processes: int, module: str, arguments: Sequence[str]) -> None:
    """Replace this process by `accelerate launch` of `python -m module arguments` (every setting given; port 0: runs
    never clash) when `num_processes` > 1; in a launched process, refuse another number than the params say."""
    launched = world_size()
    if launched > 1 or "LOCAL_RANK" in os.environ:
        if launched != num_processes:
            raise ProcessCountError(
                f"launched on {launched} processes but execution.num_processes={num_processes}; set "
                f"-S execution.num_processes={launched} so the params record what ran"
            )
        return
    if num_processes > 1:
        settings = f"--multi_gpu --num_processes={num_processes} --num_machines=1 --main_process_port=0"
        settings += " --mixed_precision=no --dynamo_backend=no --module"  # the trainer sets the precision
        command = [sys.executable, "-m", "accelerate.commands.launch", *settings.split(), module, *arguments]
        sys.stdout.flush()
        sys.stderr.flush()
        os.execv(command[0], command)  # exec: Ctrl-C and SIGTERM reach the launcher, which passes them to every rank

"""Beside the trainer's loop: the non-finite loss guard, stop on a signal, skipped steps, timing, progress, MLflow."""

import logging
import signal
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np
import torch
from transformers import ProgressCallback, TrainerCallback
from trl import SFTTrainer

from medgemma_breakhis.core.logs import in_terminal, progress
from medgemma_breakhis.core.params import Precision
from medgemma_breakhis.core.stage import PARENT_GONE, stopping
from medgemma_breakhis.model.load import NonFiniteError, non_finite_advice
from medgemma_breakhis.train.execution import ExecutionPlan

logger = logging.getLogger(__name__)


class TrainingDivergedError(NonFiniteError):
    def __init__(self, message: str, step: int, loss: float) -> None:
        super().__init__(message)
        self.step, self.loss = step, loss


class TrainingInterrupted(KeyboardInterrupt):
    """Training was stopped by a signal after saving a checkpoint; running the stage again resumes from it."""


def _all_processes_agree(flag: bool, device: torch.device) -> bool:
    """`flag` if it holds in every process of a distributed run: they stop, or go on, together."""
    if not torch.distributed.is_initialized():
        return flag
    agreed = torch.tensor(int(flag), device=device)
    torch.distributed.all_reduce(agreed, op=torch.distributed.ReduceOp.MIN)
    return bool(agreed.item())


class GuardedSFTTrainer(SFTTrainer):
    """SFTTrainer that stops at the first NaN or infinite loss of any micro-batch (docs/design.md#non-finite-values)."""

    def __init__(self, *args: Any, precision: Precision, weights_dtype: str, plan: ExecutionPlan, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.precision, self.weights_dtype, self.plan = precision, weights_dtype, plan

    @property
    def precision_ran(self) -> str:
        autocast = self.accelerator.mixed_precision
        if autocast != "no":
            return f"{self.weights_dtype} base weights + {autocast} autocast"
        note = " (fp16 mixed precision needs a GPU)" if self.precision == "fp16" and self.args.use_cpu else ""
        return f"{self.weights_dtype} base weights, no autocast{note}"

    def training_step(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        loss = super().training_step(*args, **kwargs)
        if not _all_processes_agree(bool(torch.isfinite(loss).all()), loss.device):
            step, value = self.state.global_step + 1, loss.item()
            raise TrainingDivergedError(
                f"training loss is {value} at optimizer step {step} of {self.state.max_steps} with "
                f"train.precision={self.precision} ({self.precision_ran}); training stopped and no adapter was saved. "
                f"{non_finite_advice(self.precision, 'train.precision')}",
                step,
                value,
            )
        return loss


class StopOnSignal(TrainerCallback):
    """SIGTERM, SIGINT or the stage's dvc gone during training: finish the step under way, save a checkpoint and stop;
    a second SIGTERM or SIGINT stops at once, without one."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT, PARENT_GONE)

    def __init__(self) -> None:
        self.received: str | None = None

    @contextmanager
    def installed(self) -> Iterator["StopOnSignal"]:
        previous = {signum: signal.signal(signum, self._handle) for signum in self.SIGNALS}
        try:
            yield self
        finally:
            for signum, handler in previous.items():
                signal.signal(signum, handler)

    def _handle(self, signum: int, frame: object) -> None:
        name = signal.Signals(signum).name
        if self.received is not None and signum == PARENT_GONE:
            return  # dvc went away because of the signal being handled: not a second request
        if self.received is not None:
            raise KeyboardInterrupt(f"{name} received again: stopped without saving a checkpoint")
        self.received = name
        stopping(name)
        logger.warning(
            "%s received: finishing this optimizer step, saving a checkpoint, then stopping "
            "(send it again to stop at once, without a checkpoint)",
            name,
        )

    def on_step_end(self, args, state, control, **kwargs) -> None:
        # a signal may reach the processes of a distributed run at different steps: all stop at the same one
        if not _all_processes_agree(self.received is None, args.device):
            control.should_save = control.should_training_stop = True


class SkippedStepCounter(TrainerCallback):
    """The optimizer steps fp16's loss scaler skipped (gradients overflowed), which accelerate does silently."""

    def __init__(self, trainer: SFTTrainer) -> None:
        self.trainer, self.steps = trainer, []

    def on_step_end(self, args, state, control, **kwargs) -> None:
        if self.trainer.accelerator.optimizer_step_was_skipped:
            self.steps.append(state.global_step)
            logger.warning("optimizer step %d skipped: fp16's loss scaler found inf/NaN gradients", state.global_step)


class StepTimes(TrainerCallback):
    """When steps, saves and epochs began and ended (GPU work included): where `trainer.train`'s time goes."""

    def __init__(self) -> None:
        self.started, self.begins, self.ends, self.saves, self.epochs = 0.0, [], [], [], []

    @staticmethod
    def _now() -> float:
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        return time.perf_counter()

    def on_train_begin(self, *args: Any, **kwargs: Any) -> None:
        self.started = self._now()

    def on_epoch_begin(self, *args: Any, **kwargs: Any) -> None:
        self.epochs.append(len(self.begins))  # the index of the epoch's first step

    def on_step_begin(self, *args: Any, **kwargs: Any) -> None:
        self.begins.append(self._now())

    def on_step_end(self, args, state, control, **kwargs) -> None:
        self.ends.append(self._now())
        if len(self.ends) == 1:  # the log's sign that training runs
            first = "optimizer step %d of %d done in %.1f s (the first: warm-up and any compilation included)"
            logger.info(first, state.global_step, state.max_steps, self.steps[0])

    def on_save(self, *args: Any, **kwargs: Any) -> None:
        self.saves.append((len(self.ends), self._now()))  # after step len(ends)

    @property
    def steps(self) -> list[float]:
        return [end - begin for begin, end in zip(self.begins, self.ends, strict=False)]

    def metrics(self) -> dict[str, float]:
        """Seconds: the first step, medians of the others and of the gaps between them, means of saves and epochs."""
        saved = dict(self.saves)
        gaps = {i: begin - saved.get(i, self.ends[i - 1]) for i, begin in enumerate(self.begins) if i}
        saves = [at - self.ends[step - 1] for step, at in self.saves]
        parts = {
            "time_first_step_s": self.steps[:1],
            "time_step_median_s": self.steps[1:],
            "time_between_steps_median_s": [gap for i, gap in gaps.items() if i not in self.epochs],
            "time_checkpoint_save_mean_s": saves,
            "time_epoch_boundary_mean_s": [gap for i, gap in gaps.items() if i in self.epochs],
        }
        return {name: float(np.median(v) if "median" in name else np.mean(v)) for name, v in parts.items() if v}


class TrainingProgress(ProgressCallback):
    """transformers' step bar drawn by `logs.progress`: in a log file, a line per tenth of the steps, with the loss."""

    def on_train_begin(self, args, state, control, **kwargs) -> None:
        if state.is_world_process_zero:
            self.training_bar = progress(total=state.max_steps, desc="training", unit="step", dynamic_ncols=True)
        self.current_step = 0

    def on_log(self, args, state, control, logs=None, **kwargs) -> None:
        if in_terminal():
            super().on_log(args, state, control, logs=logs, **kwargs)
        elif self.training_bar is not None and logs and "loss" in logs:
            self.training_bar.set_postfix(loss=f"{logs['loss']:.4g}", refresh=False)


class LogSteps(TrainerCallback):
    """Each logged step's figures (loss, learning rate, gradient norm) to `log`, in the main process."""

    def __init__(self, log: Callable[[dict[str, float], int], None]) -> None:
        self.log = log

    def on_log(self, args, state, control, logs=None, **kwargs) -> None:
        numbers = {k: v for k, v in (logs or {}).items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        if state.is_world_process_zero and numbers:
            self.log(numbers, state.global_step)

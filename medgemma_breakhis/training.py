"""LoRA fine-tuning with peft and trl's SFTTrainer, loss on the answer tokens only."""

from __future__ import annotations

import functools
import json
import logging
import shutil
import signal
import time
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import datasets
import mlflow
import numpy as np
import pandas as pd
import torch
from matplotlib.figure import Figure
from peft import LoraConfig
from PIL import Image
from transformers import (
    PreTrainedModel,
    ProcessorMixin,
    ProgressCallback,
    TrainerCallback,
    TrainerControl,
    TrainerState,
    TrainingArguments,
)
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR
from trl import SFTConfig, SFTTrainer
from trl.trainer.sft_trainer import DataCollatorForVisionLanguageModeling

from medgemma_breakhis.atomic import atomic_directory, atomic_write_json, atomic_write_text
from medgemma_breakhis.checkpoints import (
    checkpoint_folder,
    last_complete_checkpoint,
    prepare_checkpoint_folder,
    training_fingerprint,
)
from medgemma_breakhis.distributed import is_main_process
from medgemma_breakhis.execution import ExecutionPlan, explicit_plan, model_shape, plan_execution
from medgemma_breakhis.logs import in_terminal, progress
from medgemma_breakhis.modeling import (
    LoadedModelInfo,
    NonFiniteError,
    check_model,
    device,
    load_base_model,
    non_finite_advice,
)
from medgemma_breakhis.params import LoraParams, Params, Precision, TrainParams
from medgemma_breakhis.prompt import completion_messages, prompt_messages
from medgemma_breakhis.signals import PARENT_GONE, stopping
from medgemma_breakhis.splits import read_split
from medgemma_breakhis.tracking import TrackedStage, loaded_model_tags, stage_run, untracked_record

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrainResult:
    model: LoadedModelInfo
    precision_ran: str
    global_steps: int
    resumed_from_step: int
    train_loss_mean: float
    train_loss_last: float


class TrainingDivergedError(NonFiniteError):
    """The training loss became NaN or infinite at optimizer step `step`."""

    def __init__(self, message: str, step: int, loss: float) -> None:
        super().__init__(message)
        self.step = step
        self.loss = loss


class TrainingInterrupted(KeyboardInterrupt):
    """Training was stopped by a signal after saving a checkpoint; running the stage again resumes from it."""


def _all_processes_agree(flag: bool, device: torch.device) -> bool:
    """`flag` if it holds in every process of a distributed run: they must stop, or go on, together."""
    if not torch.distributed.is_initialized():
        return flag
    agreed = torch.tensor(int(flag), device=device)
    torch.distributed.all_reduce(agreed, op=torch.distributed.ReduceOp.MIN)
    return bool(agreed.item())


class GuardedSFTTrainer(SFTTrainer):
    """SFTTrainer that stops at the first NaN or infinite loss instead of training on it.

    Checked on every micro-batch: transformers would otherwise replace a non-finite loss by the running mean in its
    logs and keep going. trl's fused LM head never builds the logits, and a non-finite logit of a supervised token
    makes the loss non-finite, so the loss is the check.
    """

    def __init__(
        self, *args: Any, precision: Precision, weights_dtype: str, plan: ExecutionPlan, **kwargs: Any
    ) -> None:
        super().__init__(*args, **kwargs)
        self.precision = precision
        self.weights_dtype = weights_dtype
        self.plan = plan  # how each optimizer step is executed

    @property
    def precision_ran(self) -> str:
        """The precision accelerate actually set up, not the one requested."""
        autocast = self.accelerator.mixed_precision
        if autocast == "no":
            note = " (fp16 mixed precision needs a GPU)" if self.precision == "fp16" and self.args.use_cpu else ""
            return f"{self.weights_dtype} base weights, no autocast{note}"
        return f"{self.weights_dtype} base weights + {autocast} autocast"

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
    """SIGTERM (a scheduler's preemption, `kill`), SIGINT (Ctrl-C) or the stage's dvc gone (`signals.PARENT_GONE`)
    during training: finish the optimizer step under way, save a checkpoint and stop. A second SIGTERM or SIGINT
    stops at once, without a checkpoint."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT, PARENT_GONE)

    def __init__(self) -> None:
        self.received: str | None = None

    @contextmanager
    def installed(self) -> Iterator[StopOnSignal]:
        """The handlers, for the duration of training only."""
        previous = {signum: signal.signal(signum, self._handle) for signum in self.SIGNALS}
        try:
            yield self
        finally:
            for signum, handler in previous.items():
                signal.signal(signum, handler)

    def _handle(self, signum: int, frame: object) -> None:
        name = signal.Signals(signum).name
        if self.received is not None and signum == PARENT_GONE:
            return  # dvc went away because of the signal that is being handled: not a second request
        if self.received is not None:
            raise KeyboardInterrupt(f"{name} received again: stopped without saving a checkpoint")
        self.received = name
        stopping(name)  # the handlers put back after training must not take dvc's end for a second request
        logger.warning(
            "%s received: finishing this optimizer step, saving a checkpoint, then stopping "
            "(send it again to stop at once, without a checkpoint)",
            name,
        )

    def on_step_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any) -> None:
        # A signal may reach the processes of a distributed run at different steps: all stop at the same one.
        if not _all_processes_agree(self.received is None, args.device):
            control.should_save = True
            control.should_training_stop = True


class SkippedStepCounter(TrainerCallback):
    """The optimizer steps that fp16's loss scaler skipped: a step whose gradients overflowed is dropped and the
    scale lowered, which accelerate does silently. The first steps of an fp16 run often are, while the scale settles."""

    def __init__(self, trainer: SFTTrainer) -> None:
        self.trainer = trainer
        self.steps: list[int] = []

    def on_step_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any) -> None:
        if self.trainer.accelerator.optimizer_step_was_skipped:
            self.steps.append(state.global_step)
            logger.warning(
                "optimizer step %d skipped: the fp16 loss scaler found non-finite gradients and lowered its scale",
                state.global_step,
            )


class StepTimes(TrainerCallback):
    """Where the time of `trainer.train` goes: the optimizer steps themselves, the time between two steps (logging),
    checkpoint saves, and epoch boundaries (the dataloader's workers start again). Logged with the run as `time_*`
    metrics, from which `make rehearse` projects the reference run's time from a short one."""

    def __init__(self) -> None:
        self.steps: list[float] = []
        self.between_steps: list[float] = []
        self.saves: list[float] = []
        self.epoch_boundaries: list[float] = []
        self._began = self._ended = self._saved = 0.0
        self._new_epoch = False

    @staticmethod
    def _now() -> float:
        if torch.cuda.is_available():
            torch.cuda.synchronize()  # the GPU's queued work belongs to the step that queued it
        return time.perf_counter()

    def on_epoch_begin(self, *args: Any, **kwargs: Any) -> None:
        self._new_epoch = True

    def on_step_begin(self, *args: Any, **kwargs: Any) -> None:
        self._began = self._now()
        if self._ended:  # not the first step
            gap = self._began - max(self._ended, self._saved)
            (self.epoch_boundaries if self._new_epoch else self.between_steps).append(gap)
        self._new_epoch = False

    def on_step_end(self, args: TrainingArguments, state: TrainerState, *rest: Any, **kwargs: Any) -> None:
        self._ended = self._now()
        self.steps.append(self._ended - self._began)
        if len(self.steps) == 1:  # the log's sign that training runs, and what its first step cost
            logger.info(
                "optimizer step %d of %d done in %.1f s (the first: warm-up and any compilation included)",
                state.global_step,
                state.max_steps,
                self.steps[0],
            )

    def on_save(self, *args: Any, **kwargs: Any) -> None:
        self._saved = self._now()
        self.saves.append(self._saved - self._ended)

    def metrics(self) -> dict[str, float]:
        """Seconds: the first step (compilation included) on its own, medians of the others and of the time between
        steps, means of saves and epoch boundaries; those there were none of are left out."""
        parts = {
            "time_first_step_s": self.steps[:1],
            "time_step_median_s": self.steps[1:],
            "time_between_steps_median_s": self.between_steps,
            "time_checkpoint_save_mean_s": self.saves,
            "time_epoch_boundary_mean_s": self.epoch_boundaries,
        }
        return {
            name: float(np.median(values) if "median" in name else np.mean(values))
            for name, values in parts.items()
            if values
        }


class TrainingProgress(ProgressCallback):
    """transformers' bar of the optimizer steps, drawn by `logs.progress`: in a log file, a line per tenth of the
    steps carrying the last logged loss, rather than a line per update and another per logged step (every loss is
    in MLflow and plots/train_loss.csv)."""

    def on_train_begin(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        if state.is_world_process_zero:
            self.training_bar = progress(total=state.max_steps, desc="training", unit="step", dynamic_ncols=True)
        self.current_step = 0

    def on_log(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        logs: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> None:
        if in_terminal():
            super().on_log(args, state, control, logs=logs, **kwargs)
        elif self.training_bar is not None and logs and "loss" in logs:
            self.training_bar.set_postfix(loss=f"{logs['loss']:.4g}", refresh=False)


def compile_layers(model: torch.nn.Module) -> int:
    """torch.compile each decoder and vision-encoder layer, LoRA included: one graph per layer instead of some
    fifteen small kernels per adapted linear layer. Per layer, not the whole model, so the 61 layers share two or three
    compiled graphs and compilation takes under a minute. Returns how many layers were compiled."""
    layers = [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]
    for layer in layers:
        layer.compile()
    return len(layers)


def build_sft_dataset(rows: pd.DataFrame, image_root: Path) -> datasets.Dataset:
    """Prompt-completion examples (trl's format): SFTTrainer then masks the prompt and trains on the answer only."""
    prompt = prompt_messages()
    table = datasets.Dataset.from_dict(
        {
            "images": [[str(image_root / f)] for f in rows["filename"]],
            "prompt": [prompt] * len(rows),
            "completion": [completion_messages(int(label)) for label in rows["label"]],
        }
    )
    # Decoded lazily per batch by the collator, so the whole image set never sits in memory.
    return table.cast_column("images", datasets.List(datasets.Image(mode="RGB")))


def mixed_precision_mode(precision: str, on_cuda: bool) -> dict[str, bool]:
    """SFTConfig precision flags; CPU has no fp16 autocast, so fp16 there means fp16 weights without mixed precision."""
    return {
        "bf16": precision == "bf16",
        "fp16": precision == "fp16" and on_cuda,
        "use_cpu": not on_cuda,
    }


def decoder_tokens_per_example(processor: ProcessorMixin) -> int:
    """Tokens the decoder sees per training example, counted by the trainer's own collator: the templated prompt with
    its image tokens, and the answer, each tokenised as trl tokenises them (apart, then joined)."""
    collator = DataCollatorForVisionLanguageModeling(processor, completion_only_loss=True)
    blank = Image.new("RGB", (1, 1))  # any image: the processor gives every image the same number of tokens
    example = {"images": [blank], "prompt": prompt_messages(), "completion": completion_messages(0)}
    return int(collator([example])["attention_mask"].sum())


def plan_for(model: PreTrainedModel, processor: ProcessorMixin, lora: LoraParams, train: TrainParams) -> ExecutionPlan:
    """The execution plan of `train` for this model on this process's device. The memory estimate behind `auto`
    (`execution.plan_execution`) reads Gemma 3's shapes; settings given explicitly need none of it."""
    if (plan := explicit_plan(train, device())) is not None:
        return plan
    activation_bytes = 4 if train.precision == "fp32" else 2
    return plan_execution(
        train, model_shape(model, lora.r), decoder_tokens_per_example(processor), device(), activation_bytes
    )


def build_trainer(
    *,
    model: PreTrainedModel,
    processor: ProcessorMixin,
    info: LoadedModelInfo,
    params: Params,
    rows: pd.DataFrame,
    image_root: Path,
    output_dir: Path,
    config_overrides: dict[str, Any] | None = None,
) -> GuardedSFTTrainer:
    """The trainer of a LoRA adapter on `model` as `params` say, its execution planned for this device
    (`trainer.plan`), checkpointing every `train.checkpoint_steps` into `output_dir`: the one assembly the `train`
    stage and `make bench-train` share. `config_overrides` replace SFTConfig arguments (for benchmarks)."""
    lora, train = params.lora, params.train
    plan = plan_for(model, processor, lora, train)
    on_cuda = torch.cuda.is_available()
    if train.precision == "fp16" and not on_cuda:
        logger.warning("fp16 mixed precision does not exist on CPU: training runs with fp16 weights and no autocast")
    settings = dict(
        output_dir=str(output_dir),
        num_train_epochs=train.epochs,
        per_device_train_batch_size=plan.micro_batch_size,
        gradient_accumulation_steps=plan.grad_accum_steps,
        activation_checkpointing=plan.gradient_checkpointing,
        activation_checkpointing_kwargs={"use_reentrant": False},
        optim=train.optim,
        learning_rate=train.learning_rate,
        lr_scheduler_type=train.lr_scheduler,
        warmup_steps=train.warmup_ratio,  # transformers 5 reads a value below 1 as a fraction of all steps
        max_grad_norm=train.max_grad_norm,
        logging_steps=train.logging_steps,
        logging_nan_inf_filter=False,  # a NaN loss must show in the logs, not be averaged away
        save_strategy="steps",
        save_steps=train.checkpoint_steps,
        save_total_limit=1,  # the older checkpoint is deleted only once the newer one is complete
        eval_strategy="no",  # the test set is never seen during training
        seed=train.seed,
        data_seed=train.seed,
        max_length=None,  # truncation could cut image tokens
        report_to=["mlflow"],
        remove_unused_columns=False,
        dataloader_pin_memory=on_cuda,
        # Not persistent: with pinned memory, persistent workers hang the process at exit (pytorch#81794), as seen on
        # an H100. Starting them again costs a second per epoch.
        dataloader_num_workers=plan.dataloader_workers,
        **mixed_precision_mode(train.precision, on_cuda),
    )
    config = SFTConfig(**(settings | (config_overrides or {})))
    peft_config = LoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        bias="none",
        target_modules=lora.target_modules,
        task_type="CAUSAL_LM",
    )
    trainer = GuardedSFTTrainer(
        model=model,
        args=config,
        train_dataset=build_sft_dataset(rows, image_root),
        peft_config=peft_config,
        processing_class=processor,
        precision=train.precision,
        weights_dtype=info.dtype,
        plan=plan,
    )
    trainer.remove_callback(ProgressCallback)
    trainer.add_callback(TrainingProgress)
    if plan.compile:
        logger.info("compiled %d layers with torch.compile", compile_layers(trainer.model))
    return trainer


def loss_curve(log_history: list[dict[str, float]]) -> pd.DataFrame:
    """Loss, learning rate and gradient norm per logged optimizer step, from the trainer's log history."""
    logged = [entry for entry in log_history if "loss" in entry]
    return pd.DataFrame(
        {
            "step": [entry["step"] for entry in logged],
            "loss": [entry["loss"] for entry in logged],
            "learning_rate": [entry["learning_rate"] for entry in logged],
            "grad_norm": [entry.get("grad_norm") for entry in logged],
        }
    )


def loss_figure(curve: pd.DataFrame) -> Figure:
    """The training loss per optimizer step (`loss_curve`), as `dvc plots` draws it, for MLflow."""
    figure = Figure(figsize=(6, 4), layout="constrained")
    axes = figure.subplots()
    axes.plot(curve["step"], curve["loss"], marker="." if len(curve) < 50 else None)
    axes.set(xlabel="optimizer step", ylabel="loss", title="Training loss per optimizer step")
    axes.grid(alpha=0.3)
    return figure


def save_adapter(trainer: SFTTrainer, folder: Path) -> None:
    """The adapter and processor, byte-identical whenever the training was, so DVC's hash of the adapter changes only
    when what was trained does.

    Not `trainer.save_model`, which adds training_args.bin: a pickle of paths and settings such as the checkpoint
    frequency, all of which MLflow records as params. And peft keeps `target_modules` as a set and writes it in hash
    order, which changes from process to process (PYTHONHASHSEED): it is written sorted.
    """
    model = trainer.accelerator.unwrap_model(trainer.model)
    model.save_pretrained(folder)
    trainer.processing_class.save_pretrained(folder)
    config_path = folder / "adapter_config.json"
    saved = json.loads(config_path.read_text(encoding="utf-8"))
    for key, value in vars(model.peft_config["default"]).items():
        if isinstance(value, set):
            saved[key] = sorted(value)
    config_path.write_text(json.dumps(saved, indent=2, sort_keys=True), encoding="utf-8")


@dataclass
class TrainingRun:
    """One `train` stage's trainer, what it was built from, and where it checkpoints and resumes."""

    trainer: GuardedSFTTrainer
    info: LoadedModelInfo
    folder: Path  # this run's checkpoint folder, named by its inputs' fingerprint
    resume_from: Path | None
    load_seconds: float
    skipped: SkippedStepCounter
    stop: StopOnSignal = field(default_factory=StopOnSignal)
    times: StepTimes = field(default_factory=StepTimes)

    @property
    def resumed_from_step(self) -> int:
        return int(self.resume_from.name.rsplit("-", 1)[1]) if self.resume_from else 0


def prepare(
    params: Params, rows: pd.DataFrame, image_root: Path, train_csv: Path, checkpoint_root: Path
) -> TrainingRun:
    """Load the model, build its trainer into the checkpoint folder of these inputs, and find where to resume."""
    started = time.perf_counter()
    model, processor, info = load_base_model(params.model, params.train.precision)
    load_seconds = time.perf_counter() - started
    fingerprint = training_fingerprint(params, info.resolved_revision, train_csv, image_root, rows["filename"])
    folder = checkpoint_folder(checkpoint_root, fingerprint)
    trainer = build_trainer(
        model=model, processor=processor, info=info, params=params, rows=rows, image_root=image_root, output_dir=folder
    )
    main = is_main_process()
    with trainer.args.main_process_first(desc="preparing the checkpoint folder"):
        if main:
            prepare_checkpoint_folder(checkpoint_root, fingerprint)
        resume_from = last_complete_checkpoint(folder, clean=main)
    run = TrainingRun(trainer, info, folder, resume_from, load_seconds, SkippedStepCounter(trainer))
    for callback in (run.stop, run.skipped, run.times):
        trainer.add_callback(callback)
    return run


def track_start(tracked: TrackedStage, run: TrainingRun, adapter_dir: Path, batch_size: int) -> None:
    """What the run was built from and how it executes, in MLflow and the log, before the first step."""
    trainer, plan = run.trainer, run.trainer.plan
    tracked.tags("the loaded model's tags", loaded_model_tags(run.info, trainer.precision_ran))
    tracked.tags(
        "the training tags",
        {
            "adapter_path": str(adapter_dir),
            "checkpoint_folder": str(run.folder),
            "resumed_from_step": str(run.resumed_from_step),
            "num_processes": str(trainer.args.world_size),
            "distributed_backend": str(trainer.accelerator.state.backend or "none"),
            **{"execution_" + key: str(value) for key, value in asdict(plan).items()},
        },
    )
    logger.info(
        "training on %d process(es), %d examples per optimizer step; each process: %s",
        trainer.args.world_size,
        batch_size,
        plan.describe(),
    )
    if run.resume_from:
        logger.info("resuming from %s: optimizer steps 1-%d are done", run.resume_from, run.resumed_from_step)


def train(run: TrainingRun, tracked: TrackedStage | None) -> None:
    """Train to the end, or stop: at a signal, after saving a checkpoint (TrainingInterrupted); at a non-finite loss
    (TrainingDivergedError, whose step and loss `tracked` records)."""
    trainer = run.trainer
    try:
        with run.stop.installed():
            trainer.train(resume_from_checkpoint=str(run.resume_from) if run.resume_from else None)
    except TrainingDivergedError as err:
        if tracked is not None:  # the curve shows where it diverged
            tracked.track("the diverged loss", functools.partial(mlflow.log_metric, "loss", err.loss, step=err.step))
            tracked.tags("the diverged_at_step tag", {"diverged_at_step": str(err.step)})
        raise
    if run.stop.received:
        step = trainer.state.global_step
        raise TrainingInterrupted(
            f"{run.stop.received}: training stopped at optimizer step {step} of {trainer.state.max_steps} and saved "
            f"{run.folder / f'{PREFIX_CHECKPOINT_DIR}-{step}'}; run `dvc repro` (or this stage) again to resume "
            "from it"
        )


def write_outputs(
    run: TrainingRun, rows: pd.DataFrame, adapter_dir: Path, metrics_path: Path, loss_path: Path
) -> TrainResult:
    """The training summary, the loss curve and the adapter, each written atomically."""
    trainer = run.trainer
    curve = loss_curve(trainer.state.log_history)
    result = TrainResult(
        model=run.info,
        precision_ran=trainer.precision_ran,
        global_steps=trainer.state.global_step,
        resumed_from_step=run.resumed_from_step,
        # from the log history, which a resumed run restores: the same figure as an uninterrupted run
        train_loss_mean=float(curve["loss"].mean()),
        train_loss_last=float(curve["loss"].iloc[-1]),
    )
    atomic_write_json(
        metrics_path,
        {
            "train_loss_mean": result.train_loss_mean,
            "train_loss_last": result.train_loss_last,
            "global_steps": result.global_steps,
            "n_images": len(rows),
            "skipped_optimizer_steps": len(run.skipped.steps),
        },
    )
    atomic_write_text(loss_path, curve.to_csv(index=False))
    with atomic_directory(adapter_dir) as staging:
        save_adapter(trainer, staging)
    return result


def track_end(tracked: TrackedStage, run: TrainingRun, artifacts: dict[Path, str]) -> None:
    """The finished run's figures and files in MLflow: skipped steps, where the time went, every logged step the
    store lacks, and `artifacts` (path: artifact folder)."""
    skipped = run.skipped.steps
    tracked.metrics("the skipped optimizer steps", {"skipped_optimizer_steps": len(skipped)})
    if skipped:
        tracked.tags("the steps skipped", {"skipped_optimizer_steps_at": ",".join(map(str, skipped))})
    tracked.metrics("where the time went", {"time_model_load_s": run.load_seconds, **run.times.metrics()})
    # the steps up to a resumed checkpoint belong to the run that made it, which tracked them
    history = run.trainer.state.log_history
    tracked.restore_metrics([entry for entry in history if entry["step"] > run.resumed_from_step])
    tracked.figure("the loss curve", loss_figure(loss_curve(history)), "loss_curve.png")
    for path, folder in artifacts.items():
        tracked.artifact(path, folder)


def run_training(
    params: Params,
    *,
    image_root: Path,
    train_csv: Path,
    adapter_dir: Path,
    metrics_path: Path,
    loss_path: Path,
    checkpoint_root: Path,
) -> TrainResult | None:
    """The `train` stage: fine-tune, save the adapter, write a training summary and the loss curve, track it all in
    MLflow. Returns the result in the main process, None in the others of a distributed run.

    Resumes from the last complete checkpoint made under the same inputs (see `checkpoints`). A run stopped by a
    signal saves a checkpoint and ends with TrainingInterrupted; a diverged run ends with TrainingDivergedError.
    Either way its MLflow run is marked so, and no adapter is written.
    """
    rows = read_split(train_csv, image_root)
    check_model(params.model, params.lora)
    main = is_main_process()
    with stage_run("train", params, train_csv, untracked_record(metrics_path)) if main else nullcontext() as tracked:
        run = prepare(params, rows, image_root, train_csv, checkpoint_root)
        if main:
            track_start(tracked, run, adapter_dir, params.train.batch_size)
        train(run, tracked)
        if not main:
            return None
        tracked.refuse_if_params_changed()  # the checkpoints stay: the same params resume from them
        result = write_outputs(run, rows, adapter_dir, metrics_path, loss_path)
        artifacts = {
            metrics_path: metrics_path.parent.name,
            loss_path: loss_path.parent.name,
            adapter_dir / "adapter_config.json": "adapter",
        }
        track_end(tracked, run, artifacts)
    # Only once the adapter is saved and tracking is over, which can no longer fail the stage: before, a failure would
    # leave the adapter unrecorded by DVC, and the next run would have to train again from step 1.
    shutil.rmtree(run.folder)
    logger.info(
        "trained %d steps (resumed after step %d), last logged loss %.4f, adapter in %s; precision that ran: %s",
        result.global_steps,
        result.resumed_from_step,
        result.train_loss_last,
        adapter_dir,
        result.precision_ran,
    )
    return result

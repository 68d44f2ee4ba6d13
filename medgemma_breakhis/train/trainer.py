"""The `train` stage: LoRA fine-tuning with trl's SFTTrainer, loss on the answer only (docs/design.md#training)."""

import json
import logging
import time
from contextlib import nullcontext
from dataclasses import asdict
from pathlib import Path
from typing import Any

import datasets
import pandas as pd
import torch
from matplotlib.figure import Figure
from peft import LoraConfig
from transformers import PreTrainedModel, ProcessorMixin, ProgressCallback
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR
from trl import SFTConfig

from medgemma_breakhis.core.files import atomic_directory, atomic_write_json, atomic_write_text
from medgemma_breakhis.core.params import Params
from medgemma_breakhis.data.split import read_split
from medgemma_breakhis.model.load import LoadedModelInfo, check_model, device, load_base_model
from medgemma_breakhis.model.prompt import completion_messages, prompt_messages, prompt_text
from medgemma_breakhis.track.runs import tracked_run, untracked_record
from medgemma_breakhis.train import callbacks, checkpoints
from medgemma_breakhis.train.callbacks import GuardedSFTTrainer, TrainingDivergedError
from medgemma_breakhis.train.execution import is_main_process, plan_execution

logger = logging.getLogger(__name__)


def build_sft_dataset(rows: pd.DataFrame, image_root: Path) -> datasets.Dataset:
    """Prompt-completion examples (trl's format), images decoded lazily per batch by the collator."""
    return datasets.Dataset.from_dict(
        {
            "images": [[str(image_root / f)] for f in rows["filename"]],
            "prompt": [prompt_messages()] * len(rows),
            "completion": [completion_messages(int(label)) for label in rows["label"]],
        }
    ).cast_column("images", datasets.List(datasets.Image(mode="RGB")))


def build_trainer(
    model: PreTrainedModel,
    processor: ProcessorMixin,
    info: LoadedModelInfo,
    params: Params,
    rows: pd.DataFrame,
    image_root: Path,
    output_dir: Path,
    *,
    config_overrides: dict[str, Any] | None = None,
) -> GuardedSFTTrainer:
    """A LoRA trainer on `model` as `params` say, planned for this device, checkpointing into `output_dir`."""
    train, lora = params.train, params.lora
    plan = plan_execution(params.execution, train.batch_size, device())
    on_cuda = torch.cuda.is_available()
    if train.precision == "fp16" and not on_cuda:
        logger.warning("fp16 mixed precision does not exist on CPU: training runs with fp16 weights and no autocast")
    settings = dict(
        **train.model_dump(by_alias=True, exclude={"batch_size", "precision"}),  # by SFTConfig's names
        output_dir=str(output_dir),
        per_device_train_batch_size=plan.micro_batch_size,
        gradient_accumulation_steps=plan.grad_accum_steps,
        activation_checkpointing=plan.gradient_checkpointing,
        activation_checkpointing_kwargs={"use_reentrant": False},
        dataloader_num_workers=plan.dataloader_workers,
        dataloader_pin_memory=on_cuda,  # workers not persistent: with pinned memory they hang at exit (pytorch#81794)
        bf16=train.precision == "bf16",
        fp16=train.precision == "fp16" and on_cuda,
        use_cpu=not on_cuda,
        data_seed=train.seed,
        save_steps=params.execution.checkpoint_steps,
        save_total_limit=1,  # the older checkpoint is deleted only once the newer one is complete
        logging_nan_inf_filter=False,  # a NaN loss must show, not be averaged away
        max_length=None,  # truncation could cut image tokens
        report_to=[],  # the stage logs each step to its own MLflow run (`LogSteps`)
        remove_unused_columns=False,
    )
    trainer = GuardedSFTTrainer(
        model=model,
        args=SFTConfig(**settings | (config_overrides or {})),
        train_dataset=build_sft_dataset(rows, image_root),
        peft_config=LoraConfig(
            r=lora.r,
            lora_alpha=lora.alpha,
            lora_dropout=lora.dropout,
            target_modules=lora.target_modules,
            task_type="CAUSAL_LM",
        ),
        processing_class=processor,
        precision=train.precision,
        weights_dtype=info.dtype,
        plan=plan,
    )
    trainer.remove_callback(ProgressCallback)
    trainer.add_callback(callbacks.TrainingProgress)
    if plan.compile:  # per layer: one graph per layer instead of some fifteen small kernels per LoRA-wrapped linear
        layers = [m for m in trainer.model.modules() if isinstance(m, GradientCheckpointingLayer)]
        for layer in layers:
            layer.compile()
        logger.info("compiled %d layers with torch.compile", len(layers))
    return trainer


def loss_curve(log_history: list[dict[str, float]]) -> pd.DataFrame:
    columns = ["step", "loss", "learning_rate", "grad_norm"]
    return pd.DataFrame([entry for entry in log_history if "loss" in entry]).reindex(columns=columns)


def save_adapter(trainer: GuardedSFTTrainer, folder: Path) -> None:
    """The adapter and processor, byte-identical whenever the training was (no training_args.bin; peft's set of
    `target_modules`, written in hash order, sorted)."""
    model = trainer.accelerator.unwrap_model(trainer.model)
    model.save_pretrained(folder)
    trainer.processing_class.save_pretrained(folder)
    config_path = folder / "adapter_config.json"
    saved = json.loads(config_path.read_text(encoding="utf-8"))
    saved |= {key: sorted(value) for key, value in vars(model.peft_config["default"]).items() if isinstance(value, set)}
    config_path.write_text(json.dumps(saved, indent=2, sort_keys=True), encoding="utf-8")


def run_training(
    params: Params,
    *,
    image_root: Path,
    train_csv: Path,
    adapter_dir: Path,
    metrics_path: Path,
    loss_path: Path,
    checkpoint_root: Path,
) -> dict[str, Any] | None:
    """The `train` stage: fine-tune, resuming from a checkpoint of the same inputs, and write the adapter, loss curve
    and summary, which it returns (None off the main process); a signal saves a checkpoint and stops."""
    rows = read_split(train_csv, image_root)
    check_model(params.model, params.lora)
    main = is_main_process()
    with tracked_run("train", params, train_csv, untracked_record(metrics_path)) if main else nullcontext() as run:
        started = time.perf_counter()
        model, processor, info = load_base_model(params.model, params.train.precision)
        load_seconds = time.perf_counter() - started
        revision, prompt, images = info.resolved_revision, prompt_text(processor), rows["filename"]
        fingerprint = checkpoints.training_fingerprint(params, revision, prompt, train_csv, image_root, images)
        folder = checkpoints.checkpoint_folder(checkpoint_root, fingerprint)
        trainer = build_trainer(model, processor, info, params, rows, image_root, folder)
        with trainer.args.main_process_first(desc="preparing the checkpoint folder"):
            if main:
                checkpoints.prepare_checkpoint_folder(checkpoint_root, fingerprint)
            resume_from = checkpoints.last_complete_checkpoint(folder, clean=main)
        resumed = int(resume_from.name.rsplit("-", 1)[1]) if resume_from else 0
        stop, skipped, times = callbacks.StopOnSignal(), callbacks.SkippedStepCounter(trainer), callbacks.StepTimes()
        for callback in (stop, skipped, times, *([callbacks.LogSteps(run.log_step)] if main else [])):
            trainer.add_callback(callback)
        world, plan = trainer.args.world_size, trainer.plan
        shape = (world, params.train.batch_size, plan.describe())
        logger.info("training on %d process(es), %d examples per optimizer step; each process: %s", *shape)
        if resume_from:
            logger.info("resuming from %s: optimizer steps 1-%d are done", resume_from, resumed)
        if main:
            run.tags |= info.tags(trainer.precision_ran) | {
                "adapter_path": str(adapter_dir),
                "checkpoint_folder": str(folder),
                "resumed_from_step": str(resumed),
                "num_processes": str(world),
                "distributed_backend": str(trainer.accelerator.state.backend or "none"),
                **{f"execution_{key}": str(value) for key, value in asdict(plan).items()},
            }
        try:
            with stop.installed():
                trainer.train(resume_from_checkpoint=str(resume_from) if resume_from else None)
        except TrainingDivergedError as err:
            if main:  # the curve shows where it diverged
                run.history.append({"loss": err.loss, "step": err.step})
                run.tags["diverged_at_step"] = str(err.step)
            raise
        step = trainer.state.global_step
        if stop.received:
            raise callbacks.TrainingInterrupted(
                f"{stop.received}: training stopped at optimizer step {step} of {trainer.state.max_steps} and saved "
                f"{folder / f'{PREFIX_CHECKPOINT_DIR}-{step}'}; run `dvc repro` (or this stage) again to resume from it"
            )
        if not main:
            return None
        run.refuse_if_params_changed()  # the checkpoints stay: the same params resume from them
        curve = loss_curve(trainer.state.log_history)  # which a resumed run restores: an uninterrupted run's figures
        summary = {
            "train_loss_mean": float(curve["loss"].mean()),
            "train_loss_last": float(curve["loss"].iloc[-1]),
            "global_steps": step,
            "n_images": len(rows),
            "skipped_optimizer_steps": len(skipped.steps),
        }
        atomic_write_json(metrics_path, summary)
        atomic_write_text(loss_path, curve.to_csv(index=False))
        with atomic_directory(adapter_dir) as staging:
            save_adapter(trainer, staging)
        run.metrics |= {"skipped_optimizer_steps": len(skipped.steps), "time_model_load_s": load_seconds}
        run.metrics |= times.metrics()
        run.parent_metrics["train_loss_last"] = summary["train_loss_last"]
        if skipped.steps:
            run.tags["skipped_optimizer_steps_at"] = ",".join(map(str, skipped.steps))
        # the steps up to a resumed checkpoint belong to the run that made them, which tracked them
        run.history += [entry for entry in trainer.state.log_history if entry["step"] > resumed]
        run.figures["loss_curve.png"] = loss_figure(curve)
        run.artifacts += [(path, path.parent.name) for path in (metrics_path, loss_path)]
        run.artifacts.append((adapter_dir / "adapter_config.json", "adapter"))
    logger.info("trained %d steps (after step %d), last loss %.4f", step, resumed, summary["train_loss_last"])
    logger.info("adapter in %s; precision: %s", adapter_dir, trainer.precision_ran)
    return summary


def loss_figure(curve: pd.DataFrame) -> Figure:
    axes = Figure(figsize=(6, 4), layout="constrained").subplots()
    axes.plot(curve["step"], curve["loss"], marker="." if len(curve) < 50 else None)
    axes.set(xlabel="optimizer step", ylabel="loss", title="Training loss per optimizer step")
    axes.grid(alpha=0.3)
    return axes.figure

"""LoRA fine-tuning with peft and trl's SFTTrainer, loss on the answer tokens only."""

from __future__ import annotations

import logging
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import datasets
import mlflow
import pandas as pd
import torch
from peft import LoraConfig
from trl import SFTConfig, SFTTrainer

from medgemma_breakhis.atomic import atomic_directory, atomic_write_json, atomic_write_text
from medgemma_breakhis.data import read_split
from medgemma_breakhis.modeling import LoadedModelInfo, NonFiniteError, load_base_model, non_finite_advice
from medgemma_breakhis.params import LoraParams, ModelParams, Params, Precision, TrainParams
from medgemma_breakhis.scoring import completion_messages, prompt_messages
from medgemma_breakhis.tracking import log_loaded_model, stage_run

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrainResult:
    model: LoadedModelInfo
    precision_ran: str
    global_steps: int
    train_loss_mean: float
    train_loss_last: float


class TrainingDivergedError(NonFiniteError):
    """The training loss became NaN or infinite at optimizer step `step`."""

    def __init__(self, message: str, step: int, loss: float) -> None:
        super().__init__(message)
        self.step = step
        self.loss = loss


class GuardedSFTTrainer(SFTTrainer):
    """SFTTrainer that stops at the first NaN or infinite loss instead of training on it (REFERENCE.md §4).

    Checked on every micro-batch: transformers would otherwise replace a non-finite loss by the running mean in its
    logs and keep going. trl's fused LM head never builds the logits, and a non-finite logit of a supervised token
    makes the loss non-finite, so the loss is the check.
    """

    def __init__(self, *args: Any, precision: Precision, weights_dtype: str, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.precision = precision
        self.weights_dtype = weights_dtype

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
        if not torch.isfinite(loss).all():
            step, value = self.state.global_step + 1, loss.item()
            raise TrainingDivergedError(
                f"training loss is {value} at optimizer step {step} of {self.state.max_steps} with "
                f"train.precision={self.precision} ({self.precision_ran}); training stopped and no adapter was saved. "
                f"{non_finite_advice(self.precision, 'train.precision')}",
                step,
                value,
            )
        return loss


def build_sft_dataset(rows: pd.DataFrame, image_root: Path) -> datasets.Dataset:
    """Prompt-completion examples (trl's format): SFTTrainer then masks the prompt and trains on the answer only."""
    prompt = prompt_messages()
    table = datasets.Dataset.from_dict({
        "images": [[str(image_root / f)] for f in rows["filename"]],
        "prompt": [prompt] * len(rows),
        "completion": [completion_messages(int(label)) for label in rows["label"]],
    })
    # Decoded lazily per batch by the collator, so the whole image set never sits in memory.
    return table.cast_column("images", datasets.List(datasets.Image(mode="RGB")))


def mixed_precision_mode(precision: str, on_cuda: bool) -> dict[str, bool]:
    """SFTConfig precision flags; CPU has no fp16 autocast, so fp16 there means fp16 weights without mixed precision."""
    return {
        "bf16": precision == "bf16",
        "fp16": precision == "fp16" and on_cuda,
        "use_cpu": not on_cuda,
    }


def build_trainer(model_params: ModelParams, lora: LoraParams, train: TrainParams, rows: pd.DataFrame,
                  image_root: Path, work_dir: Path) -> tuple[GuardedSFTTrainer, LoadedModelInfo]:
    """A trainer for a LoRA adapter on the base model loaded in `train.precision`, and what was loaded."""
    model, processor, info = load_base_model(model_params, train.precision)
    on_cuda = torch.cuda.is_available()
    if train.precision == "fp16" and not on_cuda:
        logger.warning("fp16 mixed precision does not exist on CPU: training runs with fp16 weights and no autocast")
    config = SFTConfig(
        output_dir=str(work_dir),
        num_train_epochs=train.epochs,
        per_device_train_batch_size=train.batch_size,
        gradient_accumulation_steps=train.grad_accum_steps,
        activation_checkpointing=train.gradient_checkpointing,
        activation_checkpointing_kwargs={"use_reentrant": False},
        optim=train.optim,
        learning_rate=train.learning_rate,
        lr_scheduler_type=train.lr_scheduler,
        warmup_steps=train.warmup_ratio,  # transformers 5 reads a value below 1 as a fraction of all steps
        max_grad_norm=train.max_grad_norm,
        logging_steps=train.logging_steps,
        logging_nan_inf_filter=False,  # a NaN loss must show in the logs, not be averaged away
        save_strategy="no",
        eval_strategy="no",  # the test set is never seen during training
        seed=train.seed,
        data_seed=train.seed,
        max_length=None,  # truncation could cut image tokens
        report_to=["mlflow"],
        remove_unused_columns=False,
        dataloader_pin_memory=on_cuda,
        **mixed_precision_mode(train.precision, on_cuda),
    )
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
    )
    return trainer, info


def loss_curve(log_history: list[dict[str, float]]) -> pd.DataFrame:
    """Loss, learning rate and gradient norm per logged optimizer step, from the trainer's log history."""
    logged = [entry for entry in log_history if "loss" in entry]
    return pd.DataFrame({
        "step": [entry["step"] for entry in logged],
        "loss": [entry["loss"] for entry in logged],
        "learning_rate": [entry["learning_rate"] for entry in logged],
        "grad_norm": [entry.get("grad_norm") for entry in logged],
    })


def run_training(params: Params, image_root: Path, train_csv: Path, adapter_dir: Path, metrics_path: Path,
                 loss_path: Path) -> TrainResult:
    """The `train` stage: fine-tune, save the adapter, write a training summary and the loss curve, track it all in
    MLflow.

    A diverged run ends with TrainingDivergedError, its MLflow run FAILED, and no adapter written.
    """
    rows = read_split(train_csv, image_root)
    with stage_run("train", params, train_csv), tempfile.TemporaryDirectory(prefix="trainer-") as work_dir:
        trainer, info = build_trainer(params.model, params.lora, params.train, rows, image_root, Path(work_dir))
        log_loaded_model(info, trainer.precision_ran)
        try:
            output = trainer.train()
        except TrainingDivergedError as err:
            mlflow.log_metric("loss", err.loss, step=err.step)  # the curve shows where it diverged
            mlflow.set_tag("diverged_at_step", str(err.step))
            raise
        with atomic_directory(adapter_dir) as staging:
            trainer.save_model(str(staging))
        result = TrainResult(
            model=info,
            precision_ran=trainer.precision_ran,
            global_steps=output.global_step,
            train_loss_mean=float(output.training_loss),
            train_loss_last=next(float(e["loss"]) for e in reversed(trainer.state.log_history) if "loss" in e),
        )
        atomic_write_json(metrics_path, {
            "train_loss_mean": result.train_loss_mean,
            "train_loss_last": result.train_loss_last,
            "global_steps": result.global_steps,
            "n_images": len(rows),
        })
        atomic_write_text(loss_path, loss_curve(trainer.state.log_history).to_csv(index=False))
        mlflow.log_artifact(str(metrics_path), artifact_path=metrics_path.parent.name)
        mlflow.log_artifact(str(loss_path), artifact_path=loss_path.parent.name)
        mlflow.log_artifact(str(adapter_dir / "adapter_config.json"), artifact_path="adapter")
    logger.info("trained %d steps, last logged loss %.4f, adapter in %s; precision that ran: %s", result.global_steps,
                result.train_loss_last, adapter_dir, result.precision_ran)
    return result

"""LoRA fine-tuning with peft and trl's SFTTrainer, loss on the answer tokens only."""

from __future__ import annotations

import dataclasses
import logging
import tempfile
from dataclasses import dataclass
from pathlib import Path

import datasets
import mlflow
import pandas as pd
import torch
from peft import LoraConfig
from trl import SFTConfig, SFTTrainer

from medgemma_breakhis.atomic import atomic_directory, atomic_write_json
from medgemma_breakhis.data import read_split
from medgemma_breakhis.modeling import LoadedModelInfo, load_base_model
from medgemma_breakhis.params import LoraParams, ModelParams, Params, TrainParams
from medgemma_breakhis.scoring import completion_messages, prompt_messages
from medgemma_breakhis.tracking import stage_run

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrainResult:
    model: LoadedModelInfo
    precision_ran: str
    global_steps: int
    train_loss_mean: float
    train_loss_last: float


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


def train_lora(model_params: ModelParams, lora: LoraParams, train: TrainParams, rows: pd.DataFrame,
               image_root: Path, adapter_dir: Path, work_dir: Path) -> TrainResult:
    """Fine-tune a LoRA adapter and save it (with the processor) to `adapter_dir`, atomically."""
    model, processor, info = load_base_model(model_params, train.precision)
    on_cuda = torch.cuda.is_available()
    flags = mixed_precision_mode(train.precision, on_cuda)
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
        save_strategy="no",
        eval_strategy="no",  # the test set is never seen during training
        seed=train.seed,
        data_seed=train.seed,
        max_length=None,  # truncation could cut image tokens
        report_to=["mlflow"],
        remove_unused_columns=False,
        dataloader_pin_memory=on_cuda,
        **flags,
    )
    peft_config = LoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        bias="none",
        target_modules=lora.target_modules,
        task_type="CAUSAL_LM",
    )
    trainer = SFTTrainer(
        model=model,
        args=config,
        train_dataset=build_sft_dataset(rows, image_root),
        peft_config=peft_config,
        processing_class=processor,
    )
    output = trainer.train()
    with atomic_directory(adapter_dir) as staging:
        trainer.save_model(str(staging))
    precision_ran = ("bf16 mixed" if flags["bf16"] else "fp16 mixed" if flags["fp16"]
                     else f"{info.dtype} weights, no mixed precision")
    return TrainResult(
        model=info,
        precision_ran=precision_ran,
        global_steps=output.global_step,
        train_loss_mean=float(output.training_loss),
        train_loss_last=next(float(e["loss"]) for e in reversed(trainer.state.log_history) if "loss" in e),
    )


def run_training(params: Params, image_root: Path, train_csv: Path, adapter_dir: Path,
                 metrics_path: Path) -> TrainResult:
    """The `train` stage: fine-tune, save the adapter, write a training summary, track it all in MLflow."""
    rows = read_split(train_csv, image_root)
    with stage_run("train", params), tempfile.TemporaryDirectory(prefix="trainer-") as work_dir:
        result = train_lora(params.model, params.lora, params.train, rows, image_root, adapter_dir, Path(work_dir))
        mlflow.set_tags({f"loaded_{k}": v for k, v in dataclasses.asdict(result.model).items()})
        mlflow.set_tag("precision_ran", result.precision_ran)
        atomic_write_json(metrics_path, {
            "train_loss_mean": result.train_loss_mean,
            "train_loss_last": result.train_loss_last,
            "global_steps": result.global_steps,
            "n_images": len(rows),
        })
        mlflow.log_artifact(str(metrics_path))
    logger.info("trained %d steps, last logged loss %.4f, adapter in %s", result.global_steps, result.train_loss_last,
                adapter_dir)
    return result

"""The training module in-process, as trl tests its trainers: a few rows, two optimizer steps on the tiny model."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest
import torch
from repo_params import params

from medgemma_breakhis.data.breakhis import label_from_path
from medgemma_breakhis.model.load import load_base_model
from medgemma_breakhis.train.callbacks import GuardedSFTTrainer
from medgemma_breakhis.train.trainer import build_trainer, save_adapter

# Two rows, one optimizer step each: the smallest run with more than one step. fp32 and no gradient checkpointing:
# exact comparisons, and fast on a CPU.
PARAMS = params(
    {
        "model": {"id": "tiny-gemma3"},
        "train": {"epochs": 1, "batch_size": 1, "warmup_ratio": 0.0, "precision": "fp32"},
        "execution": {
            "checkpoint_steps": 1000,
            "micro_batch_size": 1,
            "gradient_checkpointing": False,
            "dataloader_workers": 0,
        },
    }
)


@pytest.fixture(scope="module")
def rows(synthetic_folds: pd.DataFrame) -> pd.DataFrame:
    """A benign and a malignant training image of fold 1 at 100X."""
    train = synthetic_folds[
        (synthetic_folds["fold"] == 1) & (synthetic_folds["mag"] == 100) & (synthetic_folds["grp"] == "train")
    ]
    files = list(train["filename"].iloc[[0, -1]])
    return pd.DataFrame({"filename": files, "label": [label_from_path(f) for f in files]})


def trainer_for(rows: pd.DataFrame, image_root: Path, output_dir: Path) -> GuardedSFTTrainer:
    """A trainer on a freshly loaded tiny model (LoRA changes the model it wraps: it cannot share one)."""
    model, processor, info = load_base_model(PARAMS.model, "fp32")
    trainer = build_trainer(
        model=model,
        processor=processor,
        info=info,
        params=PARAMS,
        rows=rows,
        image_root=image_root,
        output_dir=output_dir,
    )
    return trainer


def test_a_batch_supervises_the_answer_only(rows: pd.DataFrame, synthetic_root: Path, tmp_path: Path) -> None:
    trainer = trainer_for(rows, synthetic_root, tmp_path)
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(len(rows))])
    tokenizer = trainer.processing_class.tokenizer
    for input_ids, labels, label in zip(batch["input_ids"], batch["labels"], rows["label"]):
        # Right padding: the answer ends the row, after the prompt and its image tokens.
        answer = tokenizer.convert_tokens_to_ids([str(label), "<end_of_turn>", "\n"])
        # The answer digit, the end of the turn and the newline Gemma 3's template puts after it: nothing else.
        assert labels.tolist() == [-100] * (len(labels) - 3) + answer
        assert input_ids[-3:].tolist() == answer


def test_two_steps_change_the_adapter_only_and_save_it_byte_for_byte(
    rows: pd.DataFrame, synthetic_root: Path, tmp_path: Path
) -> None:
    saved = []
    for attempt in ("first", "second"):
        trainer = trainer_for(rows, synthetic_root, tmp_path / attempt / "checkpoints")
        before = {name: value.detach().clone() for name, value in trainer.model.named_parameters()}
        trainer.train()
        assert trainer.state.global_step == 2
        after = dict(trainer.model.named_parameters())
        adapter = {name for name, value in after.items() if value.requires_grad}
        assert adapter and all("lora_" in name for name in adapter)
        # LoRA's B starts at zero, so A gets no gradient on the first step: B is what must move. Gemma 3 never runs
        # SigLIP's pooling head (it takes the patch embeddings), so the LoRA put there learns nothing.
        unchanged = {name for name in adapter if torch.equal(before[name], after[name])}
        assert all("vision_tower.head." in name for name in unchanged if "lora_B" in name), sorted(unchanged)
        assert any("language_model" in name for name in adapter - unchanged)
        assert all(torch.equal(before[name], after[name]) for name in after if name not in adapter)
        save_adapter(trainer, tmp_path / attempt / "adapter")
        saved.append(tmp_path / attempt / "adapter")
    files = sorted(path.name for path in saved[0].iterdir())
    assert "adapter_model.safetensors" in files and files == sorted(path.name for path in saved[1].iterdir())
    for name in files:
        assert (saved[0] / name).read_bytes() == (saved[1] / name).read_bytes(), name

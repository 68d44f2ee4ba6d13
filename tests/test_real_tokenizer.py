"""Gemma 3's real tokenizer (`make tokenizer`) with MedGemma's processor: what the model is trained on and scored by,
as a real run sees it. Skipped, with the reason, only where the tokenizer could not be fetched."""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image
from repo_params import params

from medgemma_breakhis.data.breakhis import NUM_CLASSES
from medgemma_breakhis.evaluate.scoring import score_images
from medgemma_breakhis.model.builtin import IMAGE_TOKENS
from medgemma_breakhis.model.load import check_lora_targets, load_processor
from medgemma_breakhis.model.prompt import answer_token_ids, prompt_text
from medgemma_breakhis.train.trainer import build_trainer
from tools.gpu_memory import decoder_tokens_per_example

# its module-scoped fixture is built once: `make test` hands these tests to one worker
pytestmark = pytest.mark.xdist_group("real_tokenizer_batch")

# Gemma 3's ids of the answers "0".."7": each a single token.
GEMMA3_DIGIT_IDS = [236771, 236770, 236778, 236800, 236812, 236810, 236825, 236832]


@pytest.fixture(scope="module")
def filenames(synthetic_folds: pd.DataFrame) -> list[str]:
    """A benign and two malignant images, relative to the dataset's root."""
    names = synthetic_folds.loc[synthetic_folds["mag"] == 100, "filename"].drop_duplicates()
    return names.iloc[[0, -2, -1]].tolist()


@pytest.fixture(scope="module")
def images(filenames: list[str], synthetic_root: Path) -> list[Path]:
    return [synthetic_root / name for name in filenames]


@pytest.fixture(scope="module")
def batch(real_vocabulary_model, filenames: list[str], synthetic_root: Path, tmp_path_factory):
    """A training batch of two examples, as the trainer's own collator makes it (by a trainer of a copy of the model:
    trl's trainer changes the model it is given, which the session shares)."""
    model, processor, info = real_vocabulary_model
    model = copy.deepcopy(model)
    rows = pd.DataFrame({"filename": filenames[:2], "label": [1, 6]})
    trainer = build_trainer(
        model=model,
        processor=processor,
        info=info,
        params=params(
            {
                "train": {"precision": "fp32", "batch_size": 2},
                "execution": {"micro_batch_size": 2, "gradient_checkpointing": False, "dataloader_workers": 0},
            }
        ),
        rows=rows,
        image_root=synthetic_root,
        output_dir=tmp_path_factory.mktemp("trainer"),
    )
    collated = trainer.data_collator([trainer.train_dataset[i] for i in range(len(rows))])
    trainer.model.unload()  # LoRA off again: the model is shared with the other tests
    return collated, rows["label"].tolist()


def test_medgemma_4b_random_resolves_offline_with_375_decoder_tokens(gemma3_tokenizer: Path) -> None:
    model = params({"model": {"id": "medgemma-4b-random"}}).model
    check_lora_targets(model, params().lora)
    processor = load_processor(model)
    assert processor.image_seq_length == IMAGE_TOKENS and processor.image_processor.size["height"] == 896
    # the prompt alone is 104 tokens: Gemma 3 splits every digit, and the prompt lists the classes 0-7
    assert decoder_tokens_per_example(processor) == 375


def test_the_answers_are_gemma3s_single_digit_tokens(medgemma_processor) -> None:
    ids = answer_token_ids(medgemma_processor)
    assert ids == GEMMA3_DIGIT_IDS
    assert [medgemma_processor.tokenizer.decode([i]) for i in ids] == [str(d) for d in range(NUM_CLASSES)]
    assert prompt_text(medgemma_processor).endswith("<start_of_turn>model\n")


@pytest.mark.slow  # a model with Gemma 3's 262,145-row vocabulary, built and loaded
def test_a_batch_supervises_the_answer_only_with_one_bos_and_the_image_tokens_typed(batch, medgemma_processor) -> None:
    collated, labels = batch
    tokenizer = medgemma_processor.tokenizer
    image_token = tokenizer.convert_tokens_to_ids(tokenizer.image_token)
    for row, label in enumerate(labels):
        input_ids, supervised = collated["input_ids"][row], collated["labels"][row]
        answer = tokenizer.convert_tokens_to_ids([str(label), "<end_of_turn>", "\n"])
        # right padding, flushed left: the answer digit, the end of the turn and its newline end the row
        assert supervised.tolist() == [-100] * (len(supervised) - 3) + answer
        assert input_ids[-3:].tolist() == answer
        assert int((input_ids == tokenizer.bos_token_id).sum()) == 1 and input_ids[0] == tokenizer.bos_token_id
        token_types = collated["token_type_ids"][row]
        assert int(token_types.sum()) == IMAGE_TOKENS
        assert torch.equal(token_types.bool(), input_ids == image_token)
        assert int(collated["attention_mask"][row].sum()) == 375


@pytest.mark.slow  # a model with Gemma 3's 262,145-row vocabulary, built and loaded
def test_scores_are_a_softmax_over_the_eight_answer_logits(real_vocabulary_model, images: list[Path]) -> None:
    model, processor, _ = real_vocabulary_model
    scores = score_images(model, processor, images, batch_size=2)
    answers = torch.tensor(answer_token_ids(processor))
    for path, score in zip(images, scores, strict=True):
        with Image.open(path) as image:
            inputs = processor(
                text=[prompt_text(processor)],
                images=[[image.convert("RGB")]],
                add_special_tokens=False,
                return_tensors="pt",
            )
        with torch.inference_mode():
            logits = model(**inputs).logits[0, -1, answers]
        np.testing.assert_allclose(score, torch.softmax(logits, dim=-1).numpy(), atol=1e-6)

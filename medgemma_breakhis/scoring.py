"""Classifying images by one forward pass over the answer tokens "0".."7", and the metrics of the result.

Instead of generating text and parsing it (the reference), the prompt is run once and the next-token logits of
the eight answer tokens are compared: every image gets a class and a probability for each, nothing is unparseable.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from PIL import Image
from sklearn.metrics import accuracy_score, f1_score
from tqdm import tqdm
from transformers import PreTrainedModel, ProcessorMixin
from trl.data_utils import apply_chat_template

from medgemma_breakhis.labels import NUM_CLASSES, PROMPT
from medgemma_breakhis.modeling import NonFiniteError


def prompt_messages() -> list[dict[str, Any]]:
    return [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": PROMPT}]}]


def completion_messages(label: int) -> list[dict[str, Any]]:
    return [{"role": "assistant", "content": [{"type": "text", "text": str(label)}]}]


def prompt_text(processor: ProcessorMixin) -> str:
    """The templated prompt, ending where the model's answer starts, exactly as in training."""
    return apply_chat_template({"prompt": prompt_messages(), "completion": completion_messages(0)}, processor)["prompt"]


def answer_token_ids(processor: ProcessorMixin) -> list[int]:
    """Id of the first completion token for each answer "0".."7", tokenised as the trainer tokenises completions."""
    ids = []
    for label in range(NUM_CLASSES):
        example = apply_chat_template({"prompt": prompt_messages(), "completion": completion_messages(label)},
                                      processor)
        tokens = processor.tokenizer(example["completion"], add_special_tokens=False)["input_ids"]
        if not tokens or processor.tokenizer.decode(tokens[:1]).strip() != str(label):
            raise ValueError(f"answer {label} is not a single leading token in completion {example['completion']!r}")
        ids.append(tokens[0])
    if len(set(ids)) != NUM_CLASSES:
        raise ValueError(f"answer tokens are not distinct: {ids}")
    return ids


def _load_rgb(path: Path) -> Image.Image:
    with Image.open(path) as image:
        return image.convert("RGB")


@torch.inference_mode()
def score_images(model: PreTrainedModel, processor: ProcessorMixin, image_paths: list[Path],
                 batch_size: int) -> np.ndarray:
    """Probabilities (n_images x 8) of each answer, from the logits of the first answer token."""
    model.eval()
    text = prompt_text(processor)
    answer_ids = torch.tensor(answer_token_ids(processor))
    probabilities = []
    for start in tqdm(range(0, len(image_paths), batch_size), desc="scoring", unit="batch"):
        batch_paths = image_paths[start:start + batch_size]
        inputs = processor(
            text=[text] * len(batch_paths),
            images=[[_load_rgb(p)] for p in batch_paths],
            padding=True,
            padding_side="left",  # the last position is then every row's next-token position
            add_special_tokens=False,  # the template already starts with <bos>
            return_tensors="pt",
        ).to(model.device)
        inputs["pixel_values"] = inputs["pixel_values"].to(model.dtype)
        logits = model(**inputs, logits_to_keep=1).logits[:, -1, :]
        answer_logits = logits.float()[:, answer_ids.to(logits.device)]
        if not torch.isfinite(answer_logits).all():
            # A NaN would otherwise become class 0 at argmax, silently.
            bad = [p.name for p, ok in zip(batch_paths, torch.isfinite(answer_logits).all(dim=-1).tolist()) if not ok]
            raise NonFiniteError(f"non-finite logits with the model in {model.dtype} for {', '.join(bad)}")
        probabilities.append(torch.softmax(answer_logits, dim=-1).cpu().numpy())
    return np.concatenate(probabilities)


def classification_metrics(labels: np.ndarray, predictions: np.ndarray) -> dict[str, Any]:
    """8-class and binary (benign 0-3 / malignant 4-7) metrics, the reference's definitions, via scikit-learn."""
    malignant_true = labels >= NUM_CLASSES // 2
    malignant_pred = predictions >= NUM_CLASSES // 2
    return {
        "eight_class": {
            "accuracy": float(accuracy_score(labels, predictions)),
            "f1_weighted": float(f1_score(labels, predictions, average="weighted", zero_division=0)),
        },
        "binary": {
            "accuracy": float(accuracy_score(malignant_true, malignant_pred)),
            "f1_malignant": float(f1_score(malignant_true, malignant_pred, pos_label=True, zero_division=0)),
        },
        "n_images": len(labels),
    }


def predictions_frame(rows: pd.DataFrame, probabilities: np.ndarray) -> pd.DataFrame:
    """One row per image: filename, patient, true and predicted label, and the probability of each class."""
    frame = rows[["filename", "patient", "label"]].reset_index(drop=True)
    frame["predicted"] = probabilities.argmax(axis=1)
    for label in range(NUM_CLASSES):
        frame[f"prob_{label}"] = probabilities[:, label]
    return frame


def evaluate_split(model: PreTrainedModel, processor: ProcessorMixin, rows: pd.DataFrame, image_root: Path,
                   batch_size: int) -> tuple[dict[str, Any], pd.DataFrame]:
    """Metrics of the split, and the per-image predictions they were computed from."""
    probabilities = score_images(model, processor, [image_root / f for f in rows["filename"]], batch_size)
    predictions = predictions_frame(rows, probabilities)
    return classification_metrics(predictions["label"].to_numpy(), predictions["predicted"].to_numpy()), predictions

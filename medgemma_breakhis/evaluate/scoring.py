"""Classifying images: one forward pass over the answer tokens "0".."7" (`score`), or, as the reference did, greedy
generation and parsing the answer (`generate`) (docs/design.md#evaluation); or a linear probe on the frozen image
features (docs/metrics.md#the-linear-probe)."""

import re
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from PIL import Image
from sklearn.linear_model import LogisticRegressionCV
from sklearn.model_selection import GroupKFold
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from transformers import PreTrainedModel, ProcessorMixin

from medgemma_breakhis.core.logs import progress
from medgemma_breakhis.core.params import EvalParams
from medgemma_breakhis.data.breakhis import NUM_CLASSES
from medgemma_breakhis.evaluate.metrics import UNPARSEABLE, predictions_frame
from medgemma_breakhis.model.load import NonFiniteError
from medgemma_breakhis.model.prompt import answer_token_ids, end_of_turn_id, prompt_text

# The reference's parsing: the first standalone digit 0-7 in the generated text.
ANSWER_PATTERN = re.compile(r"\b([0-7])\b")
# The probe's inverse regularisation strengths, tried by cross-validation grouped by patient.
PROBE_STRENGTHS = np.logspace(-4, 2, 7)


def _load_rgb(source: Path | Image.Image) -> Image.Image:
    with nullcontext(source) if isinstance(source, Image.Image) else Image.open(source) as image:
        return image.convert("RGB")


def _batch_inputs(
    processor: ProcessorMixin, text: str, images: list[Path | Image.Image], device: torch.device, dtype: torch.dtype
) -> dict[str, torch.Tensor]:
    inputs = processor(
        text=[text] * len(images),
        images=[[_load_rgb(image)] for image in images],
        padding=True,
        padding_side="left",  # the last position is then every row's next-token position
        add_special_tokens=False,  # the template already starts with <bos>
        return_tensors="pt",
    ).to(device)
    inputs["pixel_values"] = inputs["pixel_values"].to(dtype)
    return inputs


@torch.inference_mode()
def score_images(
    model: PreTrainedModel, processor: ProcessorMixin, images: list[Path | Image.Image], batch_size: int
) -> np.ndarray:
    """Probabilities (n_images x 8) of each answer, from the logits of the first answer token."""
    model.eval()
    text, answer_ids = prompt_text(processor), torch.tensor(answer_token_ids(processor))
    probabilities = []
    for start in progress(range(0, len(images), batch_size), desc="scoring", unit="batch"):
        batch = images[start : start + batch_size]
        inputs = _batch_inputs(processor, text, batch, model.device, model.dtype)
        logits = model(**inputs, logits_to_keep=1).logits[:, -1, :]
        answer_logits = logits.float()[:, answer_ids.to(logits.device)]
        finite = torch.isfinite(answer_logits).all(dim=-1).tolist()
        if not all(finite):  # a NaN would otherwise become class 0 at argmax, silently
            bad = [getattr(image, "name", f"image {start + i}") for i, image in enumerate(batch) if not finite[i]]
            raise NonFiniteError(f"non-finite logits with the model in {model.dtype} for {', '.join(bad)}")
        probabilities.append(torch.softmax(answer_logits, dim=-1).cpu().numpy())
    return np.concatenate(probabilities)


def parse_answer(text: str) -> int:
    """The class number in a generated answer, or UNPARSEABLE: never a guess."""
    match = ANSWER_PATTERN.search(text)
    return int(match.group(1)) if match else UNPARSEABLE


@torch.inference_mode()
def generate_answers(
    model: PreTrainedModel, processor: ProcessorMixin, image_paths: list[Path], batch_size: int, max_new_tokens: int
) -> list[str]:
    """The reference's evaluation: greedy generation of up to `max_new_tokens`, decoded without special tokens."""
    model.eval()
    text = prompt_text(processor)
    tokenizer = processor.tokenizer
    # A fine-tuned model learnt to end its turn as its chat template does (Gemma 3: <end_of_turn>), not with <eos>.
    stop_ids = list(dict.fromkeys([tokenizer.eos_token_id, end_of_turn_id(processor)]))
    answers = []
    for start in progress(range(0, len(image_paths), batch_size), desc="generating", unit="batch"):
        inputs = _batch_inputs(processor, text, image_paths[start : start + batch_size], model.device, model.dtype)
        output = model.generate(
            **inputs,
            do_sample=False,
            max_new_tokens=max_new_tokens,
            eos_token_id=stop_ids,
            pad_token_id=tokenizer.pad_token_id,
        )
        answers += tokenizer.batch_decode(output[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
    return answers


def predict_split(
    model: PreTrainedModel, processor: ProcessorMixin, rows: pd.DataFrame, image_root: Path, settings: EvalParams
) -> pd.DataFrame:
    """Per-image predictions of a split (see `metrics.predictions_frame`) by `settings.method`."""
    paths = [image_root / f for f in rows["filename"]]
    if settings.method == "score":
        probabilities = score_images(model, processor, paths, settings.batch_size)
        return predictions_frame(rows, probabilities.argmax(axis=1), probabilities=probabilities)
    answers = generate_answers(model, processor, paths, settings.batch_size, settings.max_new_tokens)
    return predictions_frame(rows, np.array([parse_answer(a) for a in answers]), answers=answers)


@torch.inference_mode()
def image_features(model: PreTrainedModel, processor: ProcessorMixin, paths: list[Path], batch_size: int) -> np.ndarray:
    """Each image's tokens as the language model receives them (the vision tower through the projector), averaged."""
    features = []
    for start in progress(range(0, len(paths), batch_size), desc="image features", unit="batch"):
        images = [_load_rgb(path) for path in paths[start : start + batch_size]]
        pixels = processor.image_processor(images, return_tensors="pt")["pixel_values"]
        tokens = model.get_image_features(pixel_values=pixels.to(model.device, model.dtype)).pooler_output
        features.append(tokens.float().mean(dim=1).cpu().numpy())
    return np.concatenate(features)


def probe_predictions(
    model: PreTrainedModel,
    processor: ProcessorMixin,
    rows: pd.DataFrame,
    image_root: Path,
    settings: EvalParams,
    *,
    train: pd.DataFrame,
) -> pd.DataFrame:
    """The test `rows` classified by a logistic regression on the `train` rows' image features, its regularisation
    chosen by log loss in a cross-validation grouped by patient (no patient on both sides of a fold)."""
    train_features, test_features = (
        image_features(model, processor, [image_root / f for f in split["filename"]], settings.batch_size)
        for split in (train, rows)
    )
    folds = GroupKFold(n_splits=min(5, train["patient"].nunique()))
    splits = list(folds.split(train_features, train["label"], groups=train["patient"]))
    regression = LogisticRegressionCV(
        Cs=PROBE_STRENGTHS,
        l1_ratios=(0.0,),
        cv=splits,
        scoring="neg_log_loss",
        max_iter=5000,
        use_legacy_attributes=False,
    )
    probe = make_pipeline(StandardScaler(), regression).fit(train_features, train["label"])
    probabilities = np.zeros((len(rows), NUM_CLASSES))
    probabilities[:, probe.classes_] = probe.predict_proba(test_features)  # a class never trained on: 0
    return predictions_frame(rows, probabilities.argmax(axis=1), probabilities=probabilities)

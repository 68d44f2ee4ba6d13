"""MedGemma 4B's architecture with random weights, built locally: for timing and sizing runs on any GPU without the
gated weights, never for results.

`model.id=medgemma-4b-random` gives `Gemma3ForConditionalGeneration` with Gemma 3 4B's published shapes (a 34-layer
text decoder, the 27-layer SigLIP so400m vision tower without its pooling head, 896x896 images reaching the decoder
as 256 tokens), so every matmul, activation and optimizer state has its real size. Its processor is MedGemma's:
Gemma 3's own tokenizer and chat template (`gemma3_tokenizer`, fetched by `make tokenizer`), images resized to 896x896
and expanded into 256 soft tokens, so each training example has as many decoder tokens as with MedGemma.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
from pathlib import Path

import torch
from transformers import (
    AutoTokenizer,
    Gemma3Config,
    Gemma3ForConditionalGeneration,
    Gemma3Processor,
    Gemma3TextConfig,
    SiglipVisionConfig,
)

from medgemma_breakhis.gemma3_tokenizer import verified_tokenizer_folder
from medgemma_breakhis.model_source import DIGEST_FILE, RANDOM_MEDGEMMA_ID, weights_digest
from medgemma_breakhis.tiny_model import build_processor, image_token_ids, set_generation_stops

logger = logging.getLogger(__name__)

# google/medgemma-4b-it is Gemma 3 4B (its model card); these are Gemma 3 4B's published shapes. The text decoder
# without its 64 extra vocabulary rows has 3,880,099,328 parameters, as keras-hub's gemma3_4b_text preset says.
TEXT = {
    "vocab_size": 262_208,
    "hidden_size": 2560,
    "intermediate_size": 10_240,
    "num_hidden_layers": 34,
    "num_attention_heads": 8,
    "num_key_value_heads": 4,
    "head_dim": 256,
    "query_pre_attn_scalar": 256,
    "sliding_window": 1024,
    "rope_parameters": {
        "full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1_000_000.0},
        "sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0},
    },
}
VISION = {
    "hidden_size": 1152,
    "intermediate_size": 4304,
    "num_hidden_layers": 27,
    "num_attention_heads": 16,
    "image_size": 896,
    "patch_size": 14,
    "vision_use_head": False,
}
IMAGE_TOKENS = 256  # each image reaches the decoder as 256 tokens (model card)
SEED = 0
# Bumped whenever the recipe changes, so a cached build of an older recipe is never loaded. 2: Gemma 3's tokenizer.
RECIPE_VERSION = 2


def medgemma_4b_config(**token_ids: int) -> Gemma3Config:
    """Gemma 3 4B's configuration; `token_ids` are the image token indices of the tokenizer in use."""
    return Gemma3Config(
        text_config=Gemma3TextConfig(**TEXT),
        vision_config=SiglipVisionConfig(**VISION),
        mm_tokens_per_image=IMAGE_TOKENS,
        **token_ids,
    )


def medgemma_processor() -> Gemma3Processor:
    """MedGemma's processor: Gemma 3's own tokenizer and chat template, 896x896 images as 256 soft tokens."""
    return build_processor(
        VISION["image_size"], IMAGE_TOKENS, AutoTokenizer.from_pretrained(verified_tokenizer_folder())
    )


def build_random_medgemma(output_dir: Path, weights: bool) -> Path:
    """Save the model's config and processor into `output_dir` and, with `weights`, the model with deterministic
    random bf16 weights, built on the GPU if there is one (seconds, where the CPU takes minutes)."""
    processor = medgemma_processor()
    config = medgemma_4b_config(**image_token_ids(processor.tokenizer))
    processor.save_pretrained(output_dir)
    if not weights:
        config.save_pretrained(output_dir)
        return output_dir
    torch.manual_seed(SEED)
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        model = Gemma3ForConditionalGeneration._from_config(config, dtype=torch.bfloat16)
    with torch.no_grad():  # Gemma 3 initialises the projector to zeros: the images would reach the decoder as zeros
        model.model.multi_modal_projector.mm_input_projection_weight.normal_(std=VISION["hidden_size"] ** -0.5)
    set_generation_stops(model, processor.tokenizer)
    model.save_pretrained(output_dir)
    # Computed once, at build time, instead of reading 8 GB on every load.
    (output_dir / DIGEST_FILE).write_text(weights_digest(output_dir), encoding="utf-8")
    return output_dir


def random_medgemma_folder(weights: bool) -> Path:
    """The cached build, made on first use in the temporary folder: without `weights`, config and processor only
    (seconds, any machine); with them, 8 GB more (on a GPU).

    The folder is named by the recipe, so peft writes the same base-model path into every adapter. Built beside it
    and renamed into place, so concurrent processes never see a half-written model.
    """
    parent = Path(tempfile.gettempdir())
    folder = parent / f"{RANDOM_MEDGEMMA_ID}-v{RECIPE_VERSION}"
    if (folder / (DIGEST_FILE if weights else "config.json")).is_file():
        return folder
    what = "MedGemma 4B's architecture, random weights" if weights else "config and processor only"
    logger.info("building %s (%s) in %s", RANDOM_MEDGEMMA_ID, what, folder)
    staging = Path(tempfile.mkdtemp(prefix=f".{RANDOM_MEDGEMMA_ID}.partial-", dir=parent))
    try:
        build_random_medgemma(staging, weights)
        if weights:
            shutil.rmtree(folder, ignore_errors=True)  # a build without weights
        staging.rename(folder)
    except OSError:
        if not (folder / (DIGEST_FILE if weights else "config.json")).is_file():  # another process renamed first
            raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return folder

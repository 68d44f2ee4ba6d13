"""MedGemma 4B's architecture with random weights, built locally: for timing and sizing runs on any GPU without the
gated weights, never for results.

`model.id=medgemma-4b-random` gives `Gemma3ForConditionalGeneration` with Gemma 3 4B's published shapes (a 34-layer
text decoder, the 27-layer SigLIP so400m vision tower without its pooling head, 896x896 images reaching the decoder
as 256 tokens), so every matmul, activation and optimizer state has its real size. The processor resizes to 896x896
and expands each image into 256 soft tokens as MedGemma's does; its tokenizer is the small one of `tiny_model`, so the
prompt is shorter in tokens than MedGemma's (the image tokens, most of each example, are the same).
"""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch
from transformers import Gemma3Config, Gemma3ForConditionalGeneration, Gemma3TextConfig, SiglipVisionConfig

from medgemma_breakhis.tiny_model import build_processor, image_token_ids, set_generation_stops

logger = logging.getLogger(__name__)

RANDOM_MEDGEMMA_ID = "medgemma-4b-random"
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
# Bumped whenever the recipe changes, so a cached build of an older recipe is never loaded.
RECIPE_VERSION = 1
DIGEST_FILE = "weights_digest.txt"


def medgemma_4b_config(**token_ids: int) -> Gemma3Config:
    """Gemma 3 4B's configuration; `token_ids` are the image token indices of the tokenizer in use."""
    return Gemma3Config(
        text_config=Gemma3TextConfig(**TEXT),
        vision_config=SiglipVisionConfig(**VISION),
        mm_tokens_per_image=IMAGE_TOKENS,
        **token_ids,
    )


def medgemma_4b_on_meta() -> Gemma3ForConditionalGeneration:
    """The architecture on PyTorch's meta device: every parameter's shape, no memory."""
    with torch.device("meta"):  # unlike accelerate's init_empty_weights, this ties lm_head to the embeddings
        return Gemma3ForConditionalGeneration(medgemma_4b_config())


def build_random_medgemma(output_dir: Path) -> Path:
    """Build the model with deterministic random bf16 weights, on the GPU if there is one (seconds, where the CPU
    takes minutes), and save it with its processor into `output_dir`."""
    processor = build_processor(VISION["image_size"], IMAGE_TOKENS)
    config = medgemma_4b_config(**image_token_ids(processor.tokenizer))
    torch.manual_seed(SEED)
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        model = Gemma3ForConditionalGeneration._from_config(config, dtype=torch.bfloat16)
    with torch.no_grad():  # Gemma 3 initialises the projector to zeros: the images would reach the decoder as zeros
        model.model.multi_modal_projector.mm_input_projection_weight.normal_(std=VISION["hidden_size"] ** -0.5)
    set_generation_stops(model, processor.tokenizer)
    model.save_pretrained(output_dir)
    processor.save_pretrained(output_dir)
    return output_dir


def random_medgemma_folder(weights_digest: Callable[[Path], str]) -> tuple[Path, str]:
    """The cached build (made on first use, 8 GB in the temporary folder) and its weights' digest.

    The folder is named by the recipe, so peft writes the same base-model path into every adapter; the digest is
    computed once, at build time, instead of reading 8 GB on every load. Built beside it and renamed into place, so
    concurrent processes never see a half-written model.
    """
    parent = Path(tempfile.gettempdir())
    folder = parent / f"{RANDOM_MEDGEMMA_ID}-v{RECIPE_VERSION}"
    if not (folder / DIGEST_FILE).is_file():
        logger.info("building %s (MedGemma 4B's architecture, random weights) in %s", RANDOM_MEDGEMMA_ID, folder)
        staging = Path(tempfile.mkdtemp(prefix=f".{RANDOM_MEDGEMMA_ID}.partial-", dir=parent))
        try:
            build_random_medgemma(staging)
            (staging / DIGEST_FILE).write_text(json.dumps(weights_digest(staging)), encoding="utf-8")
            shutil.rmtree(folder, ignore_errors=True)
            staging.rename(folder)
        except OSError:
            if not (folder / DIGEST_FILE).is_file():  # another process renamed its identical build into place first
                raise
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    return folder, json.loads((folder / DIGEST_FILE).read_text(encoding="utf-8"))

"""A tiny random Gemma 3 vision-language model and processor, built offline.

It has MedGemma's architecture (`Gemma3ForConditionalGeneration`, SigLIP vision tower, Gemma 3 chat template,
`<start_of_image>` expanded to image soft tokens) at a size that trains on two CPU cores in minutes. It is saved
with `save_pretrained` and loaded back through the same Auto classes as the real model, so the pipeline has one
code path. The pitfalls it avoids are listed in docs/design.md#the-tiny-model.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, trainers
from transformers import (
    Gemma3Config,
    Gemma3ForConditionalGeneration,
    Gemma3Processor,
    Gemma3TextConfig,
    GemmaTokenizer,
    PreTrainedTokenizerBase,
    SiglipVisionConfig,
)
from transformers.models.gemma3.image_processing_pil_gemma3 import Gemma3ImageProcessorPil
from trl.chat_template_utils import gemma3_chat_template

from medgemma_breakhis.labels import CLASS_NAMES
from medgemma_breakhis.prompt import PROMPT

IMAGE_SIZE = 64
MM_TOKENS_PER_IMAGE = 16  # must be a square: the projector average-pools patches to sqrt x sqrt tokens
SEED = 0

# Order matters: Gemma's config expects pad=0, eos=1, bos=2.
_BASE_SPECIAL_TOKENS = ["<pad>", "<eos>", "<bos>", "<unk>", "<mask>"]
_TURN_TOKENS = ["<start_of_turn>", "<end_of_turn>"]
_IMAGE_TOKENS = {"boi_token": "<start_of_image>", "eoi_token": "<end_of_image>", "image_token": "<image_soft_token>"}
_BYTE_TOKENS = [f"<0x{b:02X}>" for b in range(256)]


def train_tokenizer(vocab_size: int) -> GemmaTokenizer:
    """A small BPE tokenizer with Gemma's normalisation ("▁" for spaces) and byte fallback."""
    special = _BASE_SPECIAL_TOKENS + _TURN_TOKENS + list(_IMAGE_TOKENS.values())
    bpe = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True))
    bpe.normalizer = normalizers.Replace(" ", "▁")
    bpe.pre_tokenizer = pre_tokenizers.Split(pattern="▁", behavior="merged_with_next")
    corpus = [PROMPT, *CLASS_NAMES, "user model assistant", "0 1 2 3 4 5 6 7 8 9"]
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=special + _BYTE_TOKENS,
        # Digits stay single tokens: each answer "0".."7" must be exactly one token to be scored.
        initial_alphabet=list("0123456789"),
        show_progress=False,
    )
    bpe.train_from_iterator(corpus, trainer=trainer)
    state = json.loads(bpe.to_str())["model"]
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in state["merges"]]
    return GemmaTokenizer(
        vocab=state["vocab"],
        merges=merges,
        add_bos_token=True,
        extra_special_tokens={"start_of_turn": "<start_of_turn>", "end_of_turn": "<end_of_turn>", **_IMAGE_TOKENS},
    )


def build_processor(
    image_size: int, image_tokens: int, tokenizer: PreTrainedTokenizerBase | None = None
) -> Gemma3Processor:
    """A Gemma 3 processor with its chat template: images resized to `image_size` and expanded into `image_tokens`
    soft tokens, as MedGemma's processor does (mean and std 0.5), over `tokenizer` (Gemma 3's own, with its chat
    template) or else a small tokenizer trained here, with Gemma 3's chat template as trl ships it."""
    if tokenizer is None:
        tokenizer = train_tokenizer(vocab_size=512)
        tokenizer.chat_template = gemma3_chat_template
    image_processor = Gemma3ImageProcessorPil(
        size={"height": image_size, "width": image_size},
        image_mean=[0.5, 0.5, 0.5],
        image_std=[0.5, 0.5, 0.5],
    )
    return Gemma3Processor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        chat_template=tokenizer.chat_template,
        image_seq_length=image_tokens,
    )


def image_token_ids(tokenizer: PreTrainedTokenizerBase) -> dict[str, int]:
    """The config's `boi_token_index`, `eoi_token_index` and `image_token_index` for this tokenizer."""
    return {
        f"{name.removesuffix('_token')}_token_index": tokenizer.convert_tokens_to_ids(token)
        for name, token in _IMAGE_TOKENS.items()
    }


def set_generation_stops(model: Gemma3ForConditionalGeneration, tokenizer: PreTrainedTokenizerBase) -> None:
    """As in Gemma 3's own generation config: stop at <eos> or at the end of the model's turn."""
    # Gemma 3's own tokenizer names <end_of_turn> its eos: listed once
    model.generation_config.eos_token_id = list(
        dict.fromkeys([tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids("<end_of_turn>")])
    )
    model.generation_config.pad_token_id = tokenizer.pad_token_id


def build_tiny_gemma3(output_dir: Path, processor: Gemma3Processor | None = None) -> Path:
    """Build, initialise deterministically and save a tiny Gemma 3 model and processor into `output_dir`: with the
    small processor of `build_processor`, or with `processor` (its vocabulary, image size and image tokens)."""
    processor = processor or build_processor(IMAGE_SIZE, MM_TOKENS_PER_IMAGE)
    tokenizer = processor.tokenizer
    image_size = processor.image_processor.size["height"]
    image_tokens = processor.image_seq_length

    text_config = Gemma3TextConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        query_pre_attn_scalar=16,
        max_position_embeddings=1024,
        sliding_window=512,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=tokenizer.bos_token_id,
    )
    vision_config = SiglipVisionConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        image_size=image_size,
        # the projector average-pools 2x2 patches into each image token
        patch_size=image_size // (2 * math.isqrt(image_tokens)),
    )
    config = Gemma3Config(
        text_config=text_config,
        vision_config=vision_config,
        mm_tokens_per_image=image_tokens,
        **image_token_ids(tokenizer),
    )

    torch.manual_seed(SEED)
    model = Gemma3ForConditionalGeneration(config)
    # Gemma 3 initialises the projector to zeros; a random model would then receive no image information.
    with torch.no_grad():
        projector = model.model.multi_modal_projector.mm_input_projection_weight
        projector.normal_(mean=0.0, std=vision_config.hidden_size**-0.5)
    set_generation_stops(model, tokenizer)

    output_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(output_dir)
    processor.save_pretrained(output_dir)
    return output_dir

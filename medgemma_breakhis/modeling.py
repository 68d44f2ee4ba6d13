"""Loading the base model and processor (MedGemma from the hub, a local copy, or the tiny offline model)."""

from __future__ import annotations

import contextlib
import hashlib
import logging
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoConfig, AutoModelForImageTextToText, AutoProcessor, PreTrainedModel, ProcessorMixin

from medgemma_breakhis.distributed import local_rank, world_size
from medgemma_breakhis.errors import ExpectedError
from medgemma_breakhis.medgemma_architecture import RANDOM_MEDGEMMA_ID, random_medgemma_folder
from medgemma_breakhis.params import LoraParams, ModelParams, ParamsError, Precision
from medgemma_breakhis.tiny_model import TINY_MODEL_ID, build_tiny_gemma3

logger = logging.getLogger(__name__)

DTYPES: dict[Precision, torch.dtype] = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


class ModelLoadError(ExpectedError, RuntimeError):
    """The model could not be loaded; the message says what to set."""


class NonFiniteError(FloatingPointError):
    """A loss or logits became NaN or infinite: the numbers overflowed their format or training diverged."""


def non_finite_advice(precision: Precision, param: str) -> str:
    """What to change when values stop being finite at `precision` (set by the params key `param`)."""
    if precision == "fp16":
        return (
            f"float16 overflows past 65,504, as Gemma 3 activations do (transformers#36822): "
            f"set {param}=bf16, which has float32's range"
        )
    return "the values diverged: lower train.learning_rate or train.max_grad_norm, and check the data"


@dataclass(frozen=True)
class LoadedModelInfo:
    """What was actually loaded, recorded with the results."""

    model_id: str
    requested_revision: str
    resolved_revision: str
    device: str
    dtype: str


def device() -> torch.device:
    """The GPU if there is one (in a distributed run, this process's own), else the CPU."""
    return torch.device(f"cuda:{local_rank()}" if torch.cuda.is_available() else "cpu")


def _weights_digest(folder: Path) -> str:
    digest = hashlib.sha256()
    for weights in sorted(folder.glob("*.safetensors")):
        with weights.open("rb") as stream:  # file_digest reads in 256 KiB chunks: a local MedGemma copy is 8 GB
            digest.update(hashlib.file_digest(stream, "sha256").digest())
    return f"sha256:{digest.hexdigest()[:16]}"


def _tiny_model_folder() -> Path:
    """The tiny model, built afresh and kept in a folder named by its digest.

    peft writes the base model's folder into the adapter's files: a folder that depends only on the model's content
    keeps the adapter byte-identical between runs, so DVC sees the same hash. Built beside it and renamed into place,
    so concurrent stages (DVC's queue workers, distributed ranks) never see a half-written model.
    """
    parent = Path(tempfile.gettempdir())
    staging = Path(tempfile.mkdtemp(prefix=f".{TINY_MODEL_ID}.partial-", dir=parent))
    try:
        build_tiny_gemma3(staging)
        folder = parent / f"{TINY_MODEL_ID}-{_weights_digest(staging).removeprefix('sha256:')}"
        if not folder.exists():
            with contextlib.suppress(OSError):  # another process renamed its identical build into place first
                staging.rename(folder)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return folder


def _hub_error_advice(model_id: str) -> str:
    from huggingface_hub import get_token

    token = "a Hugging Face token was found" if get_token() else "no Hugging Face token was found"
    return (
        f"{token}. {model_id} may be gated: accept its terms on https://huggingface.co/{model_id} with your "
        "account, then set HF_TOKEN or run `hf auth login`, and check network access (or HF_HUB_OFFLINE with a "
        "filled cache). To run offline without it, use model.id=tiny-gemma3."
    )


def _refuse_missing_folder(model_id: str) -> None:
    """A `model_id` that can only mean a folder (a hub id is `name` or `owner/name`, never ./x, /x, ~/x or a/b/c)
    where there is none: said so, rather than sent to the hub and answered with advice about gated models."""
    is_path = model_id.startswith((".", "/", "~")) or model_id.count("/") > 1 or "\\" in model_id
    if is_path and not Path(model_id).is_dir():
        raise ModelLoadError(
            f"model.id={model_id!r} is a local path, and no folder is there (from {Path.cwd()}); "
            "set model.id to the folder holding the model's config.json and weights, or to a hub id "
            "such as google/medgemma-4b-it"
        )


def _load(source: str, params: ModelParams, dtype: torch.dtype) -> tuple[PreTrainedModel, ProcessorMixin]:
    revision = None if Path(source).is_dir() else params.revision
    target = device()
    model = AutoModelForImageTextToText.from_pretrained(
        source,
        revision=revision,
        dtype=dtype,
        attn_implementation=params.attn_implementation,
        # one process: spread over the GPUs there are; one of several (DDP): a whole copy on its own GPU
        device_map=None if target.type != "cuda" else "auto" if world_size() == 1 else {"": target.index},
    )
    processor = AutoProcessor.from_pretrained(source, revision=revision)
    return model, processor


def load_base_model(
    params: ModelParams, precision: Precision
) -> tuple[PreTrainedModel, ProcessorMixin, LoadedModelInfo]:
    """Load model and processor through the Auto classes, in the dtype of `precision`, on the GPU if there is one."""
    dtype = DTYPES[precision]
    _refuse_missing_folder(params.id)
    if params.id == TINY_MODEL_ID:
        folder = _tiny_model_folder()
        model, processor = _load(str(folder), params, dtype)
        resolved = _weights_digest(folder)
    elif params.id == RANDOM_MEDGEMMA_ID:
        folder, resolved = random_medgemma_folder(_weights_digest)
        model, processor = _load(str(folder), params, dtype)
        logger.warning(
            "%s has random weights: its figures are for timing and memory only, never results", RANDOM_MEDGEMMA_ID
        )
    elif Path(params.id).is_dir():
        model, processor = _load(params.id, params, dtype)
        resolved = _weights_digest(Path(params.id))
    else:
        try:
            model, processor = _load(params.id, params, dtype)
        except OSError as err:  # transformers turns hub HTTP, gating and offline failures into OSError
            raise ModelLoadError(
                f"could not load model {params.id!r} at revision {params.revision!r}: {err}\n"
                f"{_hub_error_advice(params.id)}"
            ) from err
        resolved = getattr(model.config, "_commit_hash", None) or "unknown"
    info = LoadedModelInfo(
        model_id=params.id,
        requested_revision=params.revision,
        resolved_revision=resolved,
        device=str(model.device),
        dtype=str(dtype).removeprefix("torch."),
    )
    logger.info("loaded %s (revision %s) on %s as %s", info.model_id, info.resolved_revision, info.device, info.dtype)
    return model, processor, info


def check_lora_targets(params: ModelParams, lora: LoraParams) -> None:
    """Refuse a `lora.target_modules` that matches no module of the model, from its config alone: in seconds and
    naming the key, rather than once the weights have loaded (minutes, for MedGemma)."""
    _refuse_missing_folder(params.id)
    if params.id == TINY_MODEL_ID:
        source, revision = str(_tiny_model_folder()), None
    elif Path(params.id).is_dir():
        source, revision = params.id, None
    else:
        source, revision = params.id, params.revision
    try:
        config = AutoConfig.from_pretrained(source, revision=revision)
    except OSError as err:  # the same failures as loading the weights, so the same advice
        raise ModelLoadError(
            f"could not load the config of model {params.id!r} at revision {params.revision!r}: "
            f"{err}\n{_hub_error_advice(params.id)}"
        ) from err
    with torch.device("meta"):  # shapes only: no memory, no weights
        skeleton = AutoModelForImageTextToText.from_config(config)
    try:
        get_peft_model(skeleton, LoraConfig(target_modules=lora.target_modules, task_type="CAUSAL_LM"))
    except ValueError as err:
        raise ParamsError(
            f"params: lora.target_modules={lora.target_modules!r} matches no module of {params.id} "
            f"({err}); expected all-linear, or a regular expression over its module names"
        ) from err
